/* SPDX-License-Identifier: MIT */
/*
 * entry32.S - 32-bit protected mode, paging off: find SEV, build the page
 * tables, enter long mode.
 *
 * Read next to Linux's arch/x86/boot/compressed/head_64.S (startup_32),
 * arch/x86/boot/compressed/mem_encrypt.S (get_sev_encryption_bit),
 * arch/x86/mm/mem_encrypt_identity.c (sme_enable), and OVMF's
 * OvmfPkg/ResetVector/Ia32/{AmdSev.asm,PageTables64.asm,Flat32ToFlat64.asm}.
 *
 * Under SEV-ES, CPUID raises #VC even here: early_vc_handler answers it
 * through the GHCB MSR protocol.
 *
 * Under SEV, with paging off, every data access of the guest is private:
 * encrypted with the guest's key. So the boot-info block and the page tables
 * written here land in RAM encrypted, which is what the guest wants.
 */
#include "layout.h"

	.code32
	.section .text.entry32, "ax"
	.globl entry32
entry32:
	/* Flat data segments: base 0, limit 4 GiB. */
	movl	$DATA_SEL, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	/*
	 * A stack, and an IDT with a #VC handler, before the first CPUID: in an
	 * SEV-ES guest CPUID raises #VC, which the CPU delivers through the
	 * IDT, pushing its frame on this stack (OVMF's reset vector does the
	 * same, Ia32/AmdSev.asm). In other guests the IDT is never used.
	 */
	movl	$STACK_TOP, %esp
	lidt	early_idt_desc

	/* Zero the boot-info block: "not SEV" until proven otherwise. */
	movl	$BOOT_INFO_GPA, %edi
	movl	$(BOOT_INFO_SIZE / 4), %ecx
	xorl	%eax, %eax
	rep stosl

	/*
	 * Only the bootstrap processor boots. CPUID(1) EBX[31:24] is this CPU's
	 * initial APIC ID; an application processor (AP) stops here. APs do
	 * not come this way on QEMU or sevsim: they wait for a STARTUP IPI
	 * (smpboot.c), or under SEV-ES start at the reset block (reset16.S).
	 */
	movl	$1, %eax
	cpuid
	shrl	$24, %ebx
	jnz	ap_halt

	/*
	 * The 8259 PICs are masked in C (main.c), not here: under SEV-ES an
	 * OUT raises #VC, and this early handler can only answer CPUID.
	 */

/* ------------------------------------------------------------------------
 * SEV detection, in the order Linux's sme_enable() uses in a guest.
 * CPUID and RDMSR may be intercepted by the hypervisor; a machine without
 * SEV has no leaf 0x8000001F, and may raise #GP for the SEV_STATUS MSR, so
 * the MSR is read only once CPUID says SEV exists.
 * Registers: %esi:%ebp = me_mask (low:high dword) for the page tables.
 * ------------------------------------------------------------------------ */
	xorl	%esi, %esi
	xorl	%ebp, %ebp

	/* Is the memory-encryption leaf there? (max extended leaf >= 0x8000001F) */
	movl	$0x80000000, %eax
	cpuid
	cmpl	$CPUID_SEV_LEAF, %eax
	jb	.Lno_sev

	/* CPUID 0x8000001F: EAX = features, EBX[5:0] = C-bit position. */
	movl	$CPUID_SEV_LEAF, %eax
	cpuid
	movl	%eax, BOOT_INFO_GPA + BI_SEV_CPUID
	testl	$SEV_CPUID_SEV, %eax
	jz	.Lno_sev
	movl	%ebx, %edi			/* keep EBX: RDMSR clobbers EDX:EAX */

	/* SEV_STATUS bit 0: SEV is active for this guest; bit 1: SEV-ES too
	 * (boot_info keeps the whole MSR). The hardware answers this RDMSR
	 * itself, so it never raises #VC. */
	movl	$MSR_SEV_STATUS, %ecx
	rdmsr
	movl	%eax, BOOT_INFO_GPA + BI_SEV_STATUS
	movl	%edx, BOOT_INFO_GPA + BI_SEV_STATUS + 4
	testl	$SEV_STATUS_SEV, %eax
	jz	.Lno_sev

	/*
	 * me_mask = 1 << C-bit. It is a 64-bit value (the C-bit is bit 47 or 51
	 * on EPYC parts), built here as two dwords because this is 32-bit code.
	 */
	andl	$0x3F, %edi
	movl	%edi, BOOT_INFO_GPA + BI_CBIT
	movl	%edi, %ecx
	cmpl	$32, %ecx
	jae	1f
	btsl	%ecx, %esi			/* C-bit in the low dword */
	jmp	2f
1:	subl	$32, %ecx
	btsl	%ecx, %ebp			/* C-bit in the high dword */
2:	movl	%esi, BOOT_INFO_GPA + BI_ME_MASK
	movl	%ebp, BOOT_INFO_GPA + BI_ME_MASK + 4
.Lno_sev:

/* ------------------------------------------------------------------------
 * Page tables: an identity map of the first 4 GiB with 2 MiB pages.
 *   PML4[0]    -> PDPT
 *   PDPT[0..3] -> PD 0..3 (1 GiB each)
 *   PD n[i]    -> 2 MiB page at (n * 512 + i) * 2 MiB
 * Every entry, at every level, carries the C-bit when SEV is active, so all
 * of memory (and the page tables themselves) is private. The flash window and
 * MMIO below 4 GiB are mapped too; the firmware runs from the former.
 * ------------------------------------------------------------------------ */
	/* Zero PML4, PDPT and the four PDs. */
	movl	$PML4_GPA, %edi
	movl	$((PD_GPA + PD_COUNT * 0x1000 - PML4_GPA) / 4), %ecx
	xorl	%eax, %eax
	rep stosl

	/* PML4[0] */
	movl	$(PDPT_GPA | PTE_P | PTE_RW), %eax
	orl	%esi, %eax
	movl	%eax, PML4_GPA
	movl	%ebp, PML4_GPA + 4

	/* PDPT[0..3] */
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$12, %eax
	addl	$(PD_GPA | PTE_P | PTE_RW), %eax
	orl	%esi, %eax
	movl	%eax, PDPT_GPA(, %ecx, 8)
	movl	%ebp, PDPT_GPA + 4(, %ecx, 8)
	incl	%ecx
	cmpl	$PD_COUNT, %ecx
	jb	1b

	/* PD entries 0..2047: 2 MiB pages. Entry i maps i << 21 (fits 32 bits). */
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$(PTE_P | PTE_RW | PTE_PS), %eax
	orl	%esi, %eax
	movl	%eax, PD_GPA(, %ecx, 8)
	movl	%ebp, PD_GPA + 4(, %ecx, 8)
	incl	%ecx
	cmpl	$(PD_COUNT * 512), %ecx
	jb	1b

/* ------------------------------------------------------------------------
 * Enter long mode: CR4.PAE, CR3, EFER.LME, then CR0.PG (AMD64 APM vol. 2,
 * 14.6.1 "Activating Long Mode").
 * ------------------------------------------------------------------------ */
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4

	/*
	 * In 32-bit mode MOV to CR3 writes only bits 31:0, so the C-bit (bit 47
	 * or 51) cannot be set yet: like Linux's startup_32 we load the bare
	 * address. entry64 rewrites CR3 with the C-bit as its first act.
	 */
	movl	$PML4_GPA, %eax
	movl	%eax, %cr3

	/* EFER.LME, and EFER.NXE if CPUID 0x80000001 EDX bit 20 (NX) says so. */
	movl	$0x80000001, %eax
	cpuid
	xorl	%ebx, %ebx
	btl	$20, %edx
	jnc	1f
	movl	$EFER_NXE, %ebx
1:	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	orl	%ebx, %eax
	wrmsr

	/* CR0.PG turns long mode on (EFER.LMA = 1); CR0.WP makes read-only
	 * pages read-only for ring 0 too. We now run in compatibility mode. */
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_WP), %eax
	movl	%eax, %cr0

	/* A far jump to a code segment with L=1 enters 64-bit mode. */
	ljmpl	$CODE64_SEL, $entry64

/* An application processor parks here for good. */
ap_halt:
	cli
1:	hlt
	jmp	1b

/* ------------------------------------------------------------------------
 * The early #VC handler (OVMF's SevEsIdtVmmComm): 32-bit, paging off, no
 * GHCB page yet, so it answers CPUID only, through the GHCB MSR protocol,
 * one register per request. Anything else ends the guest. The CPU pushed
 * EFLAGS, CS, EIP and the error code, which is the SVM exit code.
 * ------------------------------------------------------------------------ */
early_vc_handler:
	cmpl	$SVM_EXIT_CPUID, (%esp)
	jne	early_vc_terminate
	pushl	%esi
	pushl	%edi
	movl	%eax, %esi			/* the leaf */
	xorl	%edi, %edi
	call	ghcb_msr_cpuid32
	pushl	%edx				/* EAX */
	incl	%edi
	call	ghcb_msr_cpuid32
	pushl	%edx				/* EBX */
	incl	%edi
	call	ghcb_msr_cpuid32
	pushl	%edx				/* ECX */
	incl	%edi
	call	ghcb_msr_cpuid32		/* EDX stays in %edx */
	popl	%ecx
	popl	%ebx
	popl	%eax
	popl	%edi
	popl	%esi
	addl	$1, BOOT_INFO_GPA + BI_VC_COUNTS + 8 * VC_MSR_PROTOCOL
	adcl	$0, BOOT_INFO_GPA + BI_VC_COUNTS + 8 * VC_MSR_PROTOCOL + 4
	addl	$4, %esp			/* drop the error code */
	addl	$2, (%esp)			/* #VC is a fault: step over CPUID (0F A2) */
	iretl					/* IRET restores EFLAGS too */

/*
 * ghcb_msr_cpuid32: register %edi (0 EAX .. 3 EDX) of CPUID leaf %esi, in
 * %edx. Request: the leaf in 63:32, the register in 31:30, code 0x004; the
 * answer, code 0x005, has the value in 63:32. Clobbers %eax, %ecx.
 */
ghcb_msr_cpuid32:
	movl	%edi, %eax
	shll	$GHCB_CPUID_REG_SHIFT, %eax
	orl	$GHCB_MSR_CPUID_REQ, %eax
	movl	%esi, %edx
	movl	$MSR_GHCB, %ecx
	wrmsr
	rep; vmmcall				/* VMGEXIT */
	rdmsr
	andl	$GHCB_MSR_INFO_MASK, %eax
	cmpl	$GHCB_MSR_CPUID_RESP, %eax
	jne	early_vc_terminate
	ret

/* A termination request through the MSR protocol; the hypervisor ends the guest. */
early_vc_terminate:
	movl	$MSR_GHCB, %ecx
	movl	$GHCB_TERM_REASON(SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ), %eax
	xorl	%edx, %edx
	wrmsr
	rep; vmmcall
	jmp	ap_halt

/*
 * The early IDT, in flash: vectors 0-28 not present (an exception there is a
 * triple fault, as with no IDT at all), 29 a 32-bit interrupt gate to the
 * handler above. The handler is in the image's 64 KiB, so its offset is
 * IMAGE_BASE's upper half and its own offset in the image.
 */
	.section .rodata
	.balign 8
early_idt:
	.fill	VC_VECTOR, 8, 0
	.word	early_vc_handler - IMAGE_BASE	/* offset 15:0 */
	.word	CODE32_SEL
	.word	0x8E00				/* P=1, DPL=0, type 0xE: 32-bit interrupt gate */
	.word	IMAGE_BASE >> 16		/* offset 31:16 */
early_idt_end:
	.balign 2
early_idt_desc:
	.word	early_idt_end - early_idt - 1	/* limit */
	.long	early_idt			/* base */

	.section .note.GNU-stack, "", @progbits
