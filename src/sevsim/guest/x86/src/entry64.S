/* SPDX-License-Identifier: MIT */
/*
 * entry64.S - 64-bit mode: segments, CR3 with the C-bit, the IDT, the SEV-ES
 * GHCB, then C.
 *
 * Read next to Linux's arch/x86/boot/compressed/head_64.S (startup_64) and
 * arch/x86/boot/compressed/idt_handlers_64.S.
 */
#include "layout.h"

/* Each exception stub below is this many bytes; the IDT loop relies on it. */
#define EXCEPTION_STUB_SIZE 16
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || \
			   (v) == 21 || (v) == 29 || (v) == 30)

	.code64
	.section .text.entry64, "ax"
	.globl entry64
entry64:
	/* In 64-bit mode DS/ES/SS bases are ignored, but they must hold
	 * usable selectors; load the flat data segment everywhere. */
	movl	$DATA_SEL, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	/*
	 * Now CR3 can take a 64-bit value: PML4_GPA | me_mask, so the PML4 too is
	 * named with its C-bit (me_mask is 0 without SEV). Writing CR3 also
	 * flushes the TLB. Absolute addressing (not RIP-relative) reaches RAM:
	 * the code runs at 0xFFFFxxxx, more than 2 GiB away.
	 */
	movq	BOOT_INFO_GPA + BI_ME_MASK, %rax
	orq	$PML4_GPA, %rax
	movq	%rax, %cr3

	movl	$STACK_TOP, %esp

	/*
	 * The IDT, in RAM at IDT_GPA: one 16-byte interrupt gate per vector
	 * 0-31, each pointing at its stub below (#VC, 29, among them: the
	 * handler sends it on to sev_es.c), then the two vectors of the
	 * local APIC that smpboot.c uses (WAKEUP_VECTOR, SPURIOUS_VECTOR).
	 */
	leaq	exception_stubs(%rip), %rsi
	movl	$IDT_GPA, %edi
	movl	$IDT_VECTORS, %ecx
1:	call	set_idt_gate
	addq	$EXCEPTION_STUB_SIZE, %rsi
	addq	$16, %rdi
	loop	1b
	leaq	wakeup_interrupt(%rip), %rsi
	movl	$(IDT_GPA + WAKEUP_VECTOR * 16), %edi
	call	set_idt_gate
	leaq	spurious_interrupt(%rip), %rsi
	movl	$(IDT_GPA + SPURIOUS_VECTOR * 16), %edi
	call	set_idt_gate
	lidt	idt_desc(%rip)

	/*
	 * Under SEV-ES, this CPU's GHCB before anything else: from now on
	 * every OUT, CPUID or MMIO access is a #VC that needs it. Returns at
	 * once on any other guest.
	 */
	cld
	call	sev_es_setup_ghcb
	call	main
	/* main() does not return; in case it does, stop. */
2:	cli
	hlt
	jmp	2b

/*
 * set_idt_gate: the gate at %rdi points at the handler at %rsi. Type 0xE =
 * 64-bit interrupt gate (IF cleared on entry), P=1, DPL=0, IST=0 (stay on
 * the current stack): AMD64 APM vol. 2, 4.8.4 "Gate Descriptors".
 * Clobbers %rax.
 */
set_idt_gate:
	movq	%rsi, %rax
	movw	%ax, 0(%rdi)			/* offset 15:0 */
	movw	$CODE64_SEL, 2(%rdi)		/* segment selector */
	movw	$0x8E00, 4(%rdi)		/* P=1, DPL=0, type=0xE, IST=0 */
	shrq	$16, %rax
	movw	%ax, 6(%rdi)			/* offset 31:16 */
	shrq	$16, %rax
	movl	%eax, 8(%rdi)			/* offset 63:32 */
	movl	$0, 12(%rdi)			/* reserved */
	ret

	.section .rodata
	.balign 8
	.globl	idt_desc			/* the APs load it too (trampoline.S) */
idt_desc:
	.word	IDT_ENTRIES * 16 - 1		/* limit */
	.quad	IDT_GPA				/* base */

/* ------------------------------------------------------------------------
 * Exception stubs, one per vector, each EXCEPTION_STUB_SIZE bytes, so the
 * gate for vector v points at exception_stubs + v * EXCEPTION_STUB_SIZE.
 * The CPU pushes SS, RSP, RFLAGS, CS, RIP and, for some vectors, an error
 * code. A stub pushes a dummy 0 where the CPU pushes none, so every frame
 * looks alike, then the vector number.
 * Vectors with an error code: #DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14,
 * #AC 17, #CP 21, #VC 29, #SX 30.
 * ------------------------------------------------------------------------ */

	.section .text
	.macro	STUB v
	.balign	EXCEPTION_STUB_SIZE, 0xCC
	.if	!HAS_ERROR_CODE(\v)
	pushq	$0				/* dummy error code */
	.endif
	pushq	$\v				/* vector number */
	jmp	exception_common
	.endm

	.balign	EXCEPTION_STUB_SIZE
	.globl	exception_stubs
exception_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	STUB	\v
	.endr
	/* If a stub outgrew EXCEPTION_STUB_SIZE, this .org moves backwards and
	 * the assembler stops with an error. */
	.org	exception_stubs + IDT_VECTORS * EXCEPTION_STUB_SIZE, 0xCC

/*
 * Save every general-purpose register, so the frame is a struct trap_frame
 * (guest.h) and the C handler may change the saved RIP, then call C.
 * The CPU aligned RSP to 16 bytes before pushing its 5 quadwords; with the
 * error code, the vector and 15 registers the frame is 22 quadwords, so RSP is
 * still 16-byte aligned at the call, as the System V ABI wants.
 */
	.globl	exception_common
exception_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi			/* struct trap_frame * */
	cld
	call	exception_handler		/* returns only to resume */
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp			/* drop vector and error code */
	iretq

/*
 * The wake-up IPI (smpboot.c): an AP sends it to the BSP once it has
 * reported, so that a BSP waiting in HLT runs again. Its only work is the
 * local APIC's end-of-interrupt. On sevsim the hypervisor runs a halted vCPU
 * again anyway and delivers no interrupt, so this runs on QEMU and hardware.
 * The APIC page is mapped decrypted (smpboot.c); its address does not fit a
 * sign-extended 32-bit displacement, hence the register.
 */
	.globl	wakeup_interrupt
wakeup_interrupt:
	pushq	%rax
	movl	$(APIC_BASE + APIC_EOI), %eax
	movl	$0, (%rax)
	popq	%rax
	iretq

/* A spurious interrupt needs no end-of-interrupt (Intel SDM vol. 3, 11.9). */
	.globl	spurious_interrupt
spurious_interrupt:
	iretq

/* The IDT itself is in RAM; export its address for debuggers and tests. */
	.globl	idt
	.set	idt, IDT_GPA

	.section .note.GNU-stack, "", @progbits
