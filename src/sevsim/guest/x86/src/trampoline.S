/* SPDX-License-Identifier: MIT */
/*
 * trampoline.S - where an application processor (AP) starts: real mode at
 * TRAMPOLINE_GPA, then protected mode, then long mode, then ap_main() in C.
 *
 * Read next to Linux's arch/x86/realmode/rm/trampoline_64.S and
 * arch/x86/kernel/smpboot.c (do_boot_cpu, wakeup_secondary_cpu_via_init).
 *
 * A STARTUP IPI with vector V starts a waiting AP in real mode at CS:IP =
 * (V << 8):0000, i.e. at linear V << 12. The code there must be below 1 MiB
 * and page aligned, and the flash is not (its alias at 0xF0000 is, but only
 * one page of it could be named), so the BSP copies the bytes between
 * trampoline_start and trampoline_end to TRAMPOLINE_GPA and sends
 * SIPI_VECTOR = TRAMPOLINE_GPA >> 12. Everything below is written to run
 * there: real-mode offsets are relative to trampoline_start (CS.base is
 * TRAMPOLINE_GPA), and linear addresses are TRAMPOLINE_GPA + that offset.
 *
 * Under SEV the copy is private memory, encrypted with the guest's key: the
 * BSP wrote it through its C=1 mapping, and an AP with paging off fetches
 * (and reads) everything as private, so it decrypts the same bytes. The AP
 * also shares the BSP's page tables (the C-bit in every entry) and, through
 * the ASID the VMs vCPUs share, the key: it can read the BSP's secret.
 *
 * Under SEV-ES the hypervisor ignores the STARTUP IPI's vector (it cannot
 * set the AP's CS:IP) and starts the AP at the firmware's reset block
 * (reset16.S), which jumps here; the BSP says in the mailbox whether ES is
 * on, and then the one CPUID below goes through the GHCB MSR instead.
 */
#include "layout.h"

/* A linear address inside the copy at TRAMPOLINE_GPA. */
#define TR(sym)		(TRAMPOLINE_GPA + ((sym) - trampoline_start))
/* A field of the mailbox the BSP fills in before the IPIs (struct ap_mailbox). */
#define MB(field)	(AP_MAILBOX_GPA + (field))

	.section .rodata.trampoline, "a"
	.balign 16
	.globl trampoline_start
	.code16
trampoline_start:
	cli				/* no IDT yet */
	cld
	/* DS = CS: the data below is reached by its offset in the copy. */
	movw	%cs, %ax
	movw	%ax, %ds

	/* The GDT of the copy (the same three descriptors as reset16.S's). */
	lgdtl	tr_gdt_desc - trampoline_start

	/*
	 * Protected mode, caches on: an AP leaves INIT with CR0.CD and CR0.NW
	 * set, as after reset (reset16.S clears them for the BSP).
	 */
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$CODE32_SEL, $TR(startup_32)

	.code32
startup_32:
	movl	$DATA_SEL, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	/*
	 * Long mode with the BSP's settings, which it left in the mailbox
	 * (Linux's trampoline_header: tr_cr4, tr_efer): CR4.PAE, CR3 (its low
	 * 32 bits: no C-bit in 32-bit mode, as in entry32.S), EFER.LME/NXE,
	 * then CR0.PG.
	 */
	movl	MB(AP_MB_CR4), %eax
	movl	%eax, %cr4
	movl	MB(AP_MB_CR3), %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	movl	MB(AP_MB_EFER), %eax
	movl	MB(AP_MB_EFER) + 4, %edx
	wrmsr
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_WP), %eax
	movl	%eax, %cr0
	ljmpl	$CODE64_SEL, $TR(startup_64)

	.code64
startup_64:
	/* The full CR3 now, with the C-bit, as the BSP has it (entry64.S). */
	movq	MB(AP_MB_CR3), %rax
	movq	%rax, %cr3

	/*
	 * This AP's stack: its initial APIC ID (CPUID 1 EBX[31:24]) picks one
	 * of the AP_STACK_SIZE stacks at AP_STACKS_GPA. An ID the stacks do
	 * not cover stops here.
	 *
	 * Under SEV-ES a CPUID would raise #VC, and this AP has neither a
	 * stack nor an IDT yet: it asks through the GHCB MSR protocol instead,
	 * for register EBX (1) of leaf 1, as entry32.S's early handler does.
	 */
	cmpl	$0, MB(AP_MB_SEV_ES)
	jne	2f
	movl	$1, %eax
	cpuid
	jmp	3f
2:	movl	$MSR_GHCB, %ecx
	movl	$(1 << GHCB_CPUID_REG_SHIFT | GHCB_MSR_CPUID_REQ), %eax
	movl	$1, %edx			/* the leaf, in bits 63:32 */
	wrmsr
	rep; vmmcall				/* VMGEXIT */
	rdmsr
	movl	%eax, %ecx
	andl	$GHCB_MSR_INFO_MASK, %ecx
	cmpl	$GHCB_MSR_CPUID_RESP, %ecx
	jne	1f
	movl	%edx, %ebx			/* the value, from bits 63:32 */
3:	shrl	$24, %ebx
	jz	1f				/* APIC ID 0 is the BSP's */
	cmpl	$AP_MAX_CPUS, %ebx
	jae	1f
	movl	%ebx, %eax
	shll	$AP_STACK_SHIFT, %eax
	leaq	AP_STACKS_GPA(%rax), %rsp	/* top of stack number ebx - 1 */

	/* The BSP's IDT: an exception on an AP is reported, not a triple fault. */
	movabsq	$idt_desc, %rax
	lidt	(%rax)

	/* ap_main(apic_id) in the flash, 4 GiB away: an absolute jump. */
	movl	%ebx, %edi
	movabsq	$ap_main, %rax
	call	*%rax
1:	cli
	hlt
	jmp	1b

	.balign 8
tr_gdt:
	.quad 0				/* the null descriptor */
	.quad 0x00CF9B000000FFFF	/* CODE32_SEL */
	.quad 0x00CF93000000FFFF	/* DATA_SEL */
	.quad 0x00AF9B000000FFFF	/* CODE64_SEL */
tr_gdt_end:
	.balign 2
tr_gdt_desc:
	.word	tr_gdt_end - tr_gdt - 1
	.long	TR(tr_gdt)
	.globl trampoline_end
trampoline_end:

	.section .note.GNU-stack, "", @progbits
