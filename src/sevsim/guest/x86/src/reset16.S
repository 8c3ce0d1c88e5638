/* SPDX-License-Identifier: MIT */
/*
 * reset16.S - the first instructions: 16-bit real mode at the reset vector.
 *
 * Read next to OVMF's OvmfPkg/ResetVector (Ia16/ResetVectorVtf0.asm,
 * Ia16/Real16ToFlat32.asm) and Linux's arch/x86/boot/pm.c + pmjump.S.
 *
 * After reset the CPU is in real mode with CS.selector = 0xF000 and
 * IP = 0xFFF0. Real hardware (and QEMU) sets CS.base = 0xFFFF0000, so the
 * first fetch is at 0xFFFFFFF0, the last 16 bytes of the flash image. The
 * image's top 64 KiB is also visible at 0xF0000-0xFFFFF (the legacy BIOS
 * alias), where a CPU runs once a far jump reloads CS with 0xF000 (CS.base =
 * 0xF0000). Both windows hold the same 64 KiB, at the same 16-bit offsets, so
 * this code is written to work in either: only near (IP-relative) jumps and CS-relative operands whose
 * offset is the address minus IMAGE_BASE. The one far jump at the end names a
 * full 32-bit linear address, which is the same in both cases.
 */
#include "layout.h"

	.code16

/* ------------------------------------------------------------------------
 * The GDT. Linear addresses in it (and in its descriptor) are 0xFFFFxxxx:
 * the 4 GiB window is always there, the alias below 1 MiB may not be.
 * Every descriptor has its Accessed bit already set (type 0x9B/0x93): the CPU
 * writes that bit when it loads a selector whose bit is clear, and this table
 * is in read-only flash. Linux's boot GDT does the same.
 * ------------------------------------------------------------------------ */
	.section .text16, "ax"
	.balign 8
	.globl gdt
gdt:
	.quad 0				/* 0x00: the null descriptor */
	.quad 0x00CF9B000000FFFF	/* 0x08 CODE32_SEL: base 0, limit 4 GiB (G=1), D=1 */
	.quad 0x00CF93000000FFFF	/* 0x10 DATA_SEL: base 0, limit 4 GiB, writable */
	.quad 0x00AF9B000000FFFF	/* 0x18 CODE64_SEL: L=1 (64-bit), D=0 */
gdt_end:

	.balign 2
	.globl gdt_desc
gdt_desc:				/* the 6-byte operand of LGDT */
	.word gdt_end - gdt - 1		/* limit */
	.long gdt			/* base: linear, 0xFFFFxxxx */

/* ------------------------------------------------------------------------
 * real_start: reached by a near jump from the reset vector.
 * ------------------------------------------------------------------------ */
	.globl real_start
real_start:
	cli				/* no IDT yet: keep maskable interrupts off */
	cld				/* string instructions count up (C expects it) */

	/*
	 * LGDT with an operand-size prefix (lgdtl) takes a full 32-bit base.
	 * The operand is addressed through CS: DS is not set up, and
	 * CS.base + (gdt_desc - IMAGE_BASE) is gdt_desc in either window.
	 */
	lgdtl	%cs:(gdt_desc - IMAGE_BASE)

	/*
	 * CR0.PE = 1: protected mode. Also clear CR0.CD and CR0.NW, which are
	 * set at reset (caches off); OVMF writes CR0 = 0x23 for the same reason.
	 */
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0

	/*
	 * A far jump loads CS from the GDT (flat 32-bit code) and so finishes
	 * the switch. With the 0x66 prefix (ljmpl) its offset is 32 bits wide:
	 * entry32 is a 0xFFFFxxxx linear address, valid whatever CS.base was.
	 */
	ljmpl	$CODE32_SEL, $entry32

/* ------------------------------------------------------------------------
 * sev_es_ap_reset: where an AP of an SEV-ES guest starts. The hypervisor
 * cannot set an ES guest's registers, so it ignores the STARTUP IPI's vector
 * and starts the AP at the address the footer table's SEV-ES reset block
 * names (ovmf_table.S), in real mode with CS.base = that address & 0xFFFF0000
 * (here IMAGE_BASE) and IP = its low 16 bits (QEMU's sev_es_set_reset_vector).
 * OVMF jumps from there to an address the BSP left in the AP jump table; this
 * firmware goes straight to the trampoline the BSP copied to TRAMPOLINE_GPA,
 * as if the STARTUP IPI's vector had been obeyed.
 * ------------------------------------------------------------------------ */
	.globl sev_es_ap_reset
sev_es_ap_reset:
	ljmp	$(TRAMPOLINE_GPA >> 4), $0	/* CS = 0x0800, IP = 0: linear 0x8000 */

/* ------------------------------------------------------------------------
 * The reset vector: the last 16 bytes of the image, at 0xFFFFFFF0.
 * There is room for little more than a jump; OVMF also puts a near jump here.
 * ------------------------------------------------------------------------ */
	.section .reset_vector, "ax"
	.globl reset_vector
reset_vector:
	jmp	real_start		/* near jump (E9 rel16): CS.base does not matter */
	.balign 16, 0xF4		/* pad with HLT up to 4 GiB */

	.section .note.GNU-stack, "", @progbits
