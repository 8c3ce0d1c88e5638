/*
 * paging32.S - which data accesses of an SEV guest the C-bit can make
 * shared: none under legacy 32-bit paging, whose 4-byte entries have no
 * room for it; under PAE, those through an entry with the C-bit clear
 * (hardware.md §3.3; AMD APM vol. 2, "SEV Encryption Behavior").
 *
 *   1. Legacy paging, one 4 MiB page (CR4.PSE) mapping the first 4 MiB:
 *      write LEGACY_DATA at 0x200000. Paging off again.
 *   2. PAE paging, two 2 MiB pages: 0-2 MiB with the C-bit (private, the
 *      code, the stack), 2-4 MiB without it (shared): write PAE_DATA at
 *      0x300000, and read it back into RESULT_GPA (private).
 *
 * The host looks at both places, and reads RESULT_GPA with DBG_DECRYPT.
 */
	.include "boot.inc"

	.set	LEGACY_PD_GPA, 0x10000	/* 1024 4-byte entries */
	.set	PAE_PDPT_GPA, 0x11000	/* 4 8-byte entries, 32-byte aligned */
	.set	PAE_PD_GPA, 0x12000
	.set	LEGACY_GPA, 0x200000
	.set	PAE_GPA, 0x300000
	.set	RESULT_GPA, 0x1F0000
	.set	CR4_PSE, 1 << 4
	.set	CR4_PAE, 1 << 5
	.set	LARGE, _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_PSE

start32:
	/* Fresh memory reads as garbage with the guest's key: zero the tables. */
	movl	$LEGACY_PD_GPA, %edi
	movl	$(3 * 4096 / 4), %ecx
	xorl	%eax, %eax
	rep stosl

/* 1. Legacy paging: 0-4 MiB identity-mapped by PDE 0, a 4 MiB page. */
	movl	$(0 | LARGE), LEGACY_PD_GPA
	movl	%cr4, %eax
	orl	$CR4_PSE, %eax
	movl	%eax, %cr4
	movl	$LEGACY_PD_GPA, %eax
	movl	%eax, %cr3
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0

	movl	$legacy_data, %esi
	movl	$LEGACY_GPA, %edi
	movl	$legacy_data_len, %ecx
	rep movsb

	movl	%cr0, %eax
	andl	$~CR0_PG, %eax
	movl	%eax, %cr0

/* 2. PAE paging: 0-2 MiB private, 2-4 MiB shared. */
	call	c_bit_high
	movl	$(0 | LARGE), PAE_PD_GPA
	movl	%eax, PAE_PD_GPA + 4		/* C=1 */
	movl	$(0x200000 | LARGE), PAE_PD_GPA + 8	/* C=0 */
	movl	$(PAE_PD_GPA | _PAGE_PRESENT), PAE_PDPT_GPA

	movl	%cr4, %eax
	andl	$~CR4_PSE, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$PAE_PDPT_GPA, %eax
	movl	%eax, %cr3
	movl	%cr0, %eax
	orl	$CR0_PG, %eax
	movl	%eax, %cr0

	movl	$pae_data, %esi
	movl	$PAE_GPA, %edi
	movl	$pae_data_len, %ecx
	rep movsb

	movl	$PAE_GPA, %esi
	movl	$RESULT_GPA, %edi
	movl	$pae_data_len, %ecx
	rep movsb

	movl	$done, %esi
	call	puts
	cli
1:	hlt				/* IF=0: the vCPU is done */
	jmp	1b

legacy_data:
	.ascii	"legacy-paging data"
	.set	legacy_data_len, . - legacy_data
pae_data:
	.ascii	"PAE data with C=0"
	.set	pae_data_len, . - pae_data
done:
	.asciz	"paging32 done\n"
