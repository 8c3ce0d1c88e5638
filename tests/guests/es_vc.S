/*
 * es_vc.S - an SEV-ES guest's conversation with its hypervisor, by hand:
 * every intercepted instruction raises #VC (vector 29) in the guest, whose
 * handler asks the hypervisor itself, first through the GHCB MSR protocol,
 * then through a shared GHCB page (hardware.md §8.1-8.3). In 32-bit mode:
 *
 *   CPUID 0x8000001F   #VC(0x72) before any GHCB page: four MSR-protocol
 *                      requests, one per register
 *   RDMSR SEV_STATUS   no #VC: the hardware answers
 *   (PAE paging on, the page at 2 MiB mapped C=0: the GHCB; WRMSR of the
 *   GHCB MSR with its address, again without #VC)
 *   OUTB "es ok\n"     #VC(0x7B) per byte: an IOIO request in the GHCB
 *   CPUID 0x8000001F   #VC(0x72): one CPUID request in the GHCB
 *   MOV from the APIC  #VC(0x400): an MMIO read request, data in the GHCB's
 *                      shared buffer (KVM maps MMIO with a reserved bit)
 *   VMMCALL 0xFFFF     #VC(0x81): KVM answers -KVM_ENOSYS in RAX
 *   RDMSR 0xC0001234   #VC(0x7C): KVM asks the guest to raise #GP itself
 *
 * Results go to RESULT_GPA (private), the #VC error codes seen to VC_LOG_GPA.
 * The handler knows each instruction it emulates by its bytes; a real one
 * decodes (the shipped guest's sev_es.c).
 */
	.include "boot.inc"

	.set	RESULT_GPA, 0x10000
	.set	VC_LOG_GPA, 0x10100	/* u32 count, then the error codes */
	.set	GHCB_READY_GPA, 0x10040	/* nonzero once the GHCB page is registered */
	.set	IDT_GPA, 0x17000
	.set	PDPT_GPA, 0x18000
	.set	PD0_GPA, 0x19000
	.set	PD3_GPA, 0x1A000
	.set	GHCB_GPA, 0x200000	/* the second 2 MiB page, mapped C=0 */
	.set	APIC_ID_GPA, 0xFEE00020
	.set	VC_VECTOR, 29
	.set	GATE_INTR32, 0x8E
	.set	MSR_SEV_STATUS, 0xC0010131
	.set	MSR_GHCB, 0xC0010130
	.set	MSR_UNKNOWN, 0xC0001234
	.set	CR4_PAE, 1 << 5

	/* GHCB offsets and their valid-bitmap bits (offset / 8). */
	.set	GHCB_CPL, 0x0CB
	.set	GHCB_RAX, 0x1F8
	.set	GHCB_RCX, 0x308
	.set	GHCB_RDX, 0x310
	.set	GHCB_RBX, 0x318
	.set	GHCB_EXIT_CODE, 0x390
	.set	GHCB_INFO1, 0x398
	.set	GHCB_INFO2, 0x3A0
	.set	GHCB_SCRATCH, 0x3A8
	.set	GHCB_BITMAP, 0x3F0
	.set	GHCB_BUFFER, 0x800
	.set	GHCB_VERSION, 0xFFA

/* valid OFF: set the valid bit of the GHCB field at OFF (bit OFF / 8 of the bitmap). */
.macro	valid off
	orb	$(1 << ((\off / 8) % 8)), GHCB_GPA + GHCB_BITMAP + \off / 64
.endm
/* put OFF, REG: a 64-bit GHCB field from a 32-bit register, and its valid bit. */
.macro	put off, reg
	movl	\reg, GHCB_GPA + \off
	movl	$0, GHCB_GPA + \off + 4
	valid	\off
.endm

start32:
	movl	$IDT_GPA, %edi			/* the IDT: only #VC present */
	movl	$((VC_VECTOR + 1) * 2), %ecx
	xorl	%eax, %eax
	rep stosl
	movl	$vc_handler, %eax
	movw	%ax, IDT_GPA + VC_VECTOR * 8
	movw	$CODE32_SEL, IDT_GPA + VC_VECTOR * 8 + 2
	movb	$GATE_INTR32, IDT_GPA + VC_VECTOR * 8 + 5
	shrl	$16, %eax
	movw	%ax, IDT_GPA + VC_VECTOR * 8 + 6
	lidt	idt_desc
	movl	$0, VC_LOG_GPA
	movl	$0, GHCB_READY_GPA

	movl	$0x8000001F, %eax		/* #VC: the MSR protocol */
	cpuid
	movl	%eax, RESULT_GPA
	movl	%ebx, RESULT_GPA + 4
	movl	$MSR_SEV_STATUS, %ecx		/* no #VC */
	rdmsr
	movl	%eax, RESULT_GPA + 8

	/* PAE: 0-2 MiB private, 2-4 MiB shared (the GHCB), the APIC's 2 MiB shared. */
	movl	RESULT_GPA + 4, %ecx
	andl	$0x3F, %ecx
	subl	$32, %ecx
	movl	$1, %esi
	shll	%cl, %esi			/* the C-bit in an entry's high dword */
	movl	$PDPT_GPA, %edi
	movl	$(3 * 1024), %ecx
	xorl	%eax, %eax
	rep stosl
	movl	$(PD0_GPA | _PAGE_PRESENT), PDPT_GPA
	movl	%esi, PDPT_GPA + 4
	movl	$(PD3_GPA | _PAGE_PRESENT), PDPT_GPA + 3 * 8
	movl	%esi, PDPT_GPA + 3 * 8 + 4
	movl	$(_PAGE_PRESENT | _PAGE_RW | _PAGE_PSE), PD0_GPA
	movl	%esi, PD0_GPA + 4
	movl	$(GHCB_GPA | _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE), PD0_GPA + 8
	movl	$(0xFEE00000 | _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE), PD3_GPA + 503 * 8
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$PDPT_GPA, %eax
	movl	%eax, %cr3
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0

	movl	$GHCB_GPA, %edi			/* the GHCB, zeroed, then registered */
	movl	$1024, %ecx
	xorl	%eax, %eax
	rep stosl
	movl	$MSR_GHCB, %ecx
	movl	$GHCB_GPA, %eax
	xorl	%edx, %edx
	wrmsr
	movl	$1, GHCB_READY_GPA

	movl	$es_ok, %esi			/* #VC per OUT */
	call	puts
	movl	$0x8000001F, %eax		/* #VC: the GHCB page */
	xorl	%ecx, %ecx
	cpuid
	movl	%eax, RESULT_GPA + 12
	movl	%ebx, RESULT_GPA + 16
mmio_insn:
	movl	APIC_ID_GPA, %eax		/* A1 moffs32: five bytes */
	movl	%eax, RESULT_GPA + 20
	movl	$0xFFFF, %eax			/* no such hypercall */
	vmmcall
	movl	%eax, RESULT_GPA + 24
	movl	%edx, RESULT_GPA + 28
	movl	$MSR_UNKNOWN, %ecx
	rdmsr
	movl	$MSR_GHCB, %ecx			/* the GHCB MSR, read back without #VC */
	rdmsr
	movl	%eax, RESULT_GPA + 36
	cli
1:	hlt				/* IF=0: done */
	jmp	1b

/*
 * vc_handler - #VC: the CPU pushed EFLAGS, CS, EIP and the error code (the
 * SVM exit code). After PUSHAL the saved registers are at (%esp): EDI, ESI,
 * EBP, ESP, EBX, EDX, ECX, EAX; the error code at 32(%esp), EIP at 36(%esp).
 */
	.set	F_EBX, 16
	.set	F_EDX, 20
	.set	F_ECX, 24
	.set	F_EAX, 28
	.set	F_ERROR, 32
	.set	F_EIP, 36
vc_handler:
	pushal
	movl	VC_LOG_GPA, %ecx		/* log the error code */
	movl	F_ERROR(%esp), %eax
	movl	%eax, VC_LOG_GPA + 4(, %ecx, 4)
	incl	VC_LOG_GPA
	cmpl	$0, GHCB_READY_GPA
	je	vc_msr_protocol
	call	ghcb_clear
	movl	F_ERROR(%esp), %eax
	cmpl	$0x72, %eax
	je	vc_cpuid
	cmpl	$0x7B, %eax
	je	vc_ioio
	cmpl	$0x400, %eax
	je	vc_mmio
	cmpl	$0x81, %eax
	je	vc_vmmcall
	cmpl	$0x7C, %eax
	je	vc_msr
	jmp	vc_terminate

/* CPUID through the MSR protocol: request 0x004, function in 63:32, register in 31:30. */
vc_msr_protocol:
	cmpl	$0x72, F_ERROR(%esp)
	jne	vc_terminate
	movl	F_EAX(%esp), %esi		/* the function */
	xorl	%ebx, %ebx			/* register index 0..3: EAX, EBX, ECX, EDX */
1:	movl	%ebx, %eax
	shll	$30, %eax
	orl	$0x004, %eax
	movl	%esi, %edx
	movl	$MSR_GHCB, %ecx
	wrmsr
	.byte	0xF3, 0x0F, 0x01, 0xD9		/* VMGEXIT (REP VMMCALL) */
	rdmsr
	movl	%eax, %ecx
	andl	$0xFFF, %ecx
	cmpl	$0x005, %ecx
	jne	vc_terminate
	movl	regs_order(, %ebx, 4), %ecx	/* where this register is in the frame */
	movl	%edx, (%esp, %ecx)
	incl	%ebx
	cmpl	$4, %ebx
	jb	1b
	addl	$2, F_EIP(%esp)			/* CPUID is two bytes */
	jmp	vc_return

vc_cpuid:
	movl	F_EAX(%esp), %eax
	put	GHCB_RAX, %eax
	movl	F_ECX(%esp), %eax
	put	GHCB_RCX, %eax
	movl	$0x72, %eax
	xorl	%ecx, %ecx
	call	ghcb_call
	movl	GHCB_GPA + GHCB_RAX, %eax
	movl	%eax, F_EAX(%esp)
	movl	GHCB_GPA + GHCB_RBX, %eax
	movl	%eax, F_EBX(%esp)
	movl	GHCB_GPA + GHCB_RCX, %eax
	movl	%eax, F_ECX(%esp)
	movl	GHCB_GPA + GHCB_RDX, %eax
	movl	%eax, F_EDX(%esp)
	addl	$2, F_EIP(%esp)
	jmp	vc_return

/* Only OUTB %al, %dx (EE): port in 31:16, 8-bit size (bit 4), OUT (bit 0 clear). */
vc_ioio:
	movl	F_EIP(%esp), %eax
	cmpb	$0xEE, (%eax)
	jne	vc_terminate
	movzbl	F_EAX(%esp), %eax
	put	GHCB_RAX, %eax
	movzwl	F_EDX(%esp), %ecx
	shll	$16, %ecx
	orl	$(1 << 4), %ecx
	movl	$0x7B, %eax
	call	ghcb_call
	incl	F_EIP(%esp)
	jmp	vc_return

/* Only the read at mmio_insn: 4 bytes of the APIC at APIC_ID_GPA. */
vc_mmio:
	cmpl	$mmio_insn, F_EIP(%esp)
	jne	vc_terminate
	movl	$(GHCB_GPA + GHCB_BUFFER), %eax
	put	GHCB_SCRATCH, %eax
	movl	$4, %eax
	put	GHCB_INFO2, %eax
	movl	$APIC_ID_GPA, %ecx
	movl	$0x80000001, %eax		/* MMIO read */
	call	ghcb_call_info2
	movl	GHCB_GPA + GHCB_BUFFER, %eax
	movl	%eax, F_EAX(%esp)
	addl	$5, F_EIP(%esp)
	jmp	vc_return

vc_vmmcall:
	movl	F_EAX(%esp), %eax
	put	GHCB_RAX, %eax
	movl	F_EBX(%esp), %eax
	put	GHCB_RBX, %eax
	movl	F_ECX(%esp), %eax
	put	GHCB_RCX, %eax
	movl	F_EDX(%esp), %eax
	put	GHCB_RDX, %eax
	movb	$0, GHCB_GPA + GHCB_CPL
	valid	GHCB_CPL
	movl	$0x81, %eax
	xorl	%ecx, %ecx
	call	ghcb_call
	movl	GHCB_GPA + GHCB_RAX, %eax
	movl	%eax, F_EAX(%esp)
	movl	GHCB_GPA + GHCB_RAX + 4, %eax
	movl	%eax, F_EDX(%esp)		/* RAX's high half, for the test to see */
	addl	$3, F_EIP(%esp)
	jmp	vc_return

/* RDMSR: the answer's sw_exit_info_1 and _2 go to RESULT_GPA + 32 (low bytes). */
vc_msr:
	movl	F_ECX(%esp), %eax
	put	GHCB_RCX, %eax
	movl	$0x7C, %eax
	xorl	%ecx, %ecx			/* 0: RDMSR */
	call	ghcb_call
	movb	GHCB_GPA + GHCB_INFO1, %al
	movb	%al, RESULT_GPA + 32
	movb	GHCB_GPA + GHCB_INFO2, %al	/* the event: vector 13 */
	movb	%al, RESULT_GPA + 33
	addl	$2, F_EIP(%esp)
	jmp	vc_return

vc_return:
	popal
	addl	$4, %esp			/* the error code */
	iret

/* A request the handler does not know: the MSR protocol's termination request. */
vc_terminate:
	movl	$MSR_GHCB, %ecx
	movl	$0x100, %eax
	xorl	%edx, %edx
	wrmsr
	.byte	0xF3, 0x0F, 0x01, 0xD9
	hlt

ghcb_clear:
	pushl	%edi
	pushl	%ecx
	pushl	%eax
	movl	$(GHCB_GPA + GHCB_BITMAP), %edi
	movl	$4, %ecx
	xorl	%eax, %eax
	rep stosl
	popl	%eax
	popl	%ecx
	popl	%edi
	ret

/*
 * ghcb_call - sw_exit_code = %eax, sw_exit_info_1 = %ecx, sw_exit_info_2 = 0,
 * then VMGEXIT; ghcb_call_info2 keeps the sw_exit_info_2 already put.
 */
ghcb_call:
	movl	$0, GHCB_GPA + GHCB_INFO2
	movl	$0, GHCB_GPA + GHCB_INFO2 + 4
	valid	GHCB_INFO2
ghcb_call_info2:
	put	GHCB_EXIT_CODE, %eax
	put	GHCB_INFO1, %ecx
	movw	$1, GHCB_GPA + GHCB_VERSION
	movl	$0, GHCB_GPA + GHCB_VERSION + 2	/* usage 0: standard */
	.byte	0xF3, 0x0F, 0x01, 0xD9		/* VMGEXIT */
	ret

	.balign	4
regs_order:
	.long	F_EAX, F_EBX, F_ECX, F_EDX
idt_desc:
	.word	(VC_VECTOR + 1) * 8 - 1
	.long	IDT_GPA
es_ok:
	.asciz	"es ok\n"

	.code16
ap_reset:				/* the SEV-ES AP reset address: APs just stop */
	cli
1:	hlt
	jmp	1b

/*
 * The OVMF footer table (sev-api.md §8.2), ending 32 bytes before the end of
 * the image: one SEV-ES reset block (the AP reset EIP), then the footer.
 */
	.org	0xFFE0 - 40
	.long	0xFFFF0000 + (ap_reset - image_start)
	.word	22
	.byte	0xde, 0x71, 0xf7, 0x00, 0x7e, 0x1a, 0xcb, 0x4f, 0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e
	.word	40
	.byte	0xde, 0x82, 0xb5, 0x96, 0xb2, 0x1f, 0xf7, 0x45, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d
