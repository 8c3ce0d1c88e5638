/*
 * forced_private.S - an SEV guest's page walks and instruction fetches are
 * private whatever the C-bit says (hardware.md §3.3; AMD APM vol. 2, "SEV
 * Encryption Behavior").
 *
 * The guest writes a string with paging off (private), then builds long-mode
 * page tables that an OS would never build: no C-bit in CR3 or in any entry
 * that points to a table, and its code page mapped with the C-bit clear. It
 * enters long mode and runs from that page:
 *
 *   RESULT_GPA        the string, read back through a C=1 mapping
 *   RESULT_GPA + 64   the first 64 bytes of the code page, read as data
 *                     through its C=0 mapping
 *
 * then prints a line, one I/O exit per byte (each VMRUN after one fetches
 * through the C=0 mapping again), and halts. The host reads RESULT_GPA with
 * DBG_DECRYPT.
 */
	.include "boot.inc"

	.set	PML4_GPA, 0x10000
	.set	PDPT_GPA, 0x11000
	.set	PD_GPA, 0x12000
	.set	PT_GPA, 0x13000		/* 4 KiB pages for the first 2 MiB */
	.set	DATA_GPA, 0x180000
	.set	RESULT_GPA, 0x190000
	.set	MSR_EFER, 0xC0000080
	.set	EFER_LME, 1 << 8
	.set	CR4_PAE, 1 << 5

start32:
	/* Paging off: this write is private (encrypted with the guest's key). */
	movl	$before_paging, %esi
	movl	$DATA_GPA, %edi
	movl	$before_paging_len, %ecx
	rep movsb

	/*
	 * Zero the four table pages. Fresh guest memory is not zero for an
	 * SEV guest: the host cleared it with its own key, and it reads as
	 * garbage with the guest's.
	 */
	movl	$PML4_GPA, %edi
	movl	$(4 * 4096 / 4), %ecx
	xorl	%eax, %eax
	rep stosl

	/* Table pointers without the C-bit (an OS puts it in every one). */
	movl	$(PDPT_GPA | _PAGE_PRESENT | _PAGE_RW), PML4_GPA
	movl	$(PD_GPA | _PAGE_PRESENT | _PAGE_RW), PDPT_GPA
	movl	$(PT_GPA | _PAGE_PRESENT | _PAGE_RW), PD_GPA

	/* The first 2 MiB in 4 KiB pages, private (C=1) ... */
	call	c_bit_high
	movl	%eax, %edx
	movl	$PT_GPA, %edi
	movl	$(_PAGE_PRESENT | _PAGE_RW), %ebx
	movl	$512, %ecx
1:	movl	%ebx, (%edi)
	movl	%edx, 4(%edi)
	addl	$4096, %ebx
	addl	$8, %edi
	loop	1b

	/* ... but for the page that holds the 64-bit code: C=0. */
	movl	$0, PT_GPA + ((IMAGE_BASE + code64 - image_start) >> 12) * 8 + 4

	/* Long mode: CR4.PAE, CR3 (no C-bit), EFER.LME, then CR0.PG. */
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$PML4_GPA, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0
	ljmpl	$CODE64_SEL, $code64

/* ------------------------------------------------------------------------
 * Long mode, on a page of its own: the one mapped with the C-bit clear.
 * ------------------------------------------------------------------------ */
	.code64
	.balign	4096
code64:
	/* The string, now through the C=1 mapping of DATA_GPA. */
	movl	$DATA_GPA, %esi
	movl	$RESULT_GPA, %edi
	movl	$before_paging_len, %ecx
	rep movsb

	/* This page as data, through its C=0 mapping: the host's key. */
	movl	$code64, %esi
	movl	$(RESULT_GPA + 64), %edi
	movl	$64, %ecx
	rep movsb

	/* The line comes from the next page, mapped C=1 (data is not forced). */
	movl	$in_long_mode, %esi
	movw	$COM1, %dx
1:	lodsb
	testb	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	cli
3:	hlt				/* IF=0: the vCPU is done */
	jmp	3b

	.balign	4096
before_paging:
	.ascii	"private before paging"
	.set	before_paging_len, . - before_paging
in_long_mode:
	.asciz	"running from a C=0 code page\n"
