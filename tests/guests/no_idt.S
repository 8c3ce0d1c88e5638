/*
 * no_idt.S - a fault with nowhere to go. The guest turns paging on (one
 * 4 MiB page for the first 4 MiB), loads an empty IDT (limit 0) and reads an
 * unmapped address: the #PF cannot be delivered, nor can the #DF that
 * follows, and the CPU shuts down (a triple fault: #VMEXIT(SHUTDOWN)).
 */
	.include "boot.inc"

	.set	PD_GPA, 0x10000
	.set	UNMAPPED, 0x40000000	/* 1 GiB: PDE 256, not present */
	.set	CR4_PSE, 1 << 4

start32:
	movl	$PD_GPA, %edi		/* fresh memory: zero the page directory */
	movl	$(4096 / 4), %ecx
	xorl	%eax, %eax
	rep stosl
	movl	$(0 | _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE), PD_GPA
	movl	%cr4, %eax
	orl	$CR4_PSE, %eax
	movl	%eax, %cr4
	movl	$PD_GPA, %eax
	movl	%eax, %cr3
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0

	lidt	empty_idt
	movl	$message, %esi
	call	puts
	movl	UNMAPPED, %eax		/* #PF, then #DF, then shutdown */
	movl	$survived, %esi		/* never reached */
	call	puts
	cli
1:	hlt
	jmp	1b

empty_idt:				/* the operand of LIDT: no gate at all */
	.word	0
	.long	0
message:
	.asciz	"reading an unmapped page with no IDT\n"
survived:
	.asciz	"still here\n"
