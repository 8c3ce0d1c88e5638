/*
 * msr.S - #GP from two sources, caught by the guest's own handler:
 *
 *   RDMSR 0xC0001234   an MSR KVM does not know: it injects #GP (EVENTINJ),
 *                      delivered at the next VMRUN
 *   WRMSR SEV_STATUS   the MSR is read-only: the CPU raises #GP itself
 *
 * then RDMSR SEV_STATUS (0xC0010131), which an SEV guest reads without an
 * exit, printed in hex. The console shows it all:
 *
 *   rdmsr 0xc0001234
 *   #GP
 *   wrmsr SEV_STATUS
 *   #GP
 *   SEV_STATUS 0x00000001
 */
	.include "boot.inc"

	.set	IDT_GPA, 0x17000
	.set	GP_VECTOR, 13
	.set	MSR_UNKNOWN, 0xC0001234
	.set	MSR_SEV_STATUS, 0xC0010131
	.set	GATE_INTR32, 0x8E	/* present, DPL 0, 32-bit interrupt gate */

start32:
	/*
	 * The IDT: vectors 0-13, only #GP present. Fresh memory reads as
	 * garbage with the guest's key, so zero it first.
	 */
	movl	$IDT_GPA, %edi
	movl	$((GP_VECTOR + 1) * 8 / 4), %ecx
	xorl	%eax, %eax
	rep stosl
	movl	$gp_handler, %eax
	movw	%ax, IDT_GPA + GP_VECTOR * 8		/* offset 15:0 */
	movw	$CODE32_SEL, IDT_GPA + GP_VECTOR * 8 + 2
	movb	$GATE_INTR32, IDT_GPA + GP_VECTOR * 8 + 5
	shrl	$16, %eax
	movw	%ax, IDT_GPA + GP_VECTOR * 8 + 6	/* offset 31:16 */
	lidt	idt_desc

	movl	$rdmsr_unknown, %esi
	call	puts
	movl	$MSR_UNKNOWN, %ecx
	rdmsr

	movl	$wrmsr_sev_status, %esi
	call	puts
	movl	$MSR_SEV_STATUS, %ecx
	xorl	%eax, %eax
	xorl	%edx, %edx
	wrmsr

	movl	$MSR_SEV_STATUS, %ecx
	rdmsr
	movl	$sev_status, %esi
	call	puts
	call	put_hex32
	movl	$newline, %esi
	call	puts
	cli
1:	hlt				/* IF=0: the vCPU is done */
	jmp	1b

/*
 * gp_handler - #GP: say so, and resume after the faulting RDMSR or WRMSR
 * (both are two bytes long). The CPU pushed EFLAGS, CS, EIP and an error
 * code; IRET wants the error code gone.
 */
gp_handler:
	addl	$4, %esp
	addl	$2, (%esp)
	pushl	%esi
	movl	$gp, %esi
	call	puts
	popl	%esi
	iret

/* put_hex32 - write %eax as 0x and eight hex digits to COM1. */
put_hex32:
	pushl	%eax
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	movl	%eax, %ebx
	movw	$COM1, %dx
	movb	$'0', %al
	outb	%al, %dx
	movb	$'x', %al
	outb	%al, %dx
	movl	$8, %ecx
1:	roll	$4, %ebx		/* the next digit, most significant first */
	movl	%ebx, %eax
	andl	$0xF, %eax
	movb	hex_digits(%eax), %al
	outb	%al, %dx
	loop	1b
	popl	%edx
	popl	%ecx
	popl	%ebx
	popl	%eax
	ret

idt_desc:				/* the operand of LIDT */
	.word	(GP_VECTOR + 1) * 8 - 1
	.long	IDT_GPA
hex_digits:
	.ascii	"0123456789abcdef"
rdmsr_unknown:
	.asciz	"rdmsr 0xc0001234\n"
wrmsr_sev_status:
	.asciz	"wrmsr SEV_STATUS\n"
gp:
	.asciz	"#GP\n"
sev_status:
	.asciz	"SEV_STATUS "
newline:
	.asciz	"\n"
