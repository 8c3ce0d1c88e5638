/* SPDX-License-Identifier: MIT */
/*
 * ovmf_table.S - the OVMF footer GUID table: what the image tells the VMM and
 * the guest owner about itself, in the format of OVMF's
 * OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm (read by QEMU's
 * pc_system_ovmf_table_find() and by sev-snp-measure's ovmf.py).
 *
 * The linker puts the table so that it ends 32 bytes below 4 GiB; the reset
 * vector follows. It is read backwards from there:
 *
 *   ... | data | u16 size | GUID | ... | u16 table size | footer GUID | 32 bytes
 *
 * Each entry's size counts its data and its 18-byte trailer (size + GUID);
 * the footer's size counts the whole table, itself included.
 *
 * Three entries: where the APs of an SEV-ES guest start, and, with the
 * addresses of OVMF's AmdSev build (layout.h), where the VMM puts the
 * measured kernel hashes and where the guest owner's secret is injected. The
 * firmware finds the last two here too (ovmf.c), as OVMF does.
 */
#include "layout.h"

/* A GUID as EFI stores it: the first three fields little-endian, then 8 bytes. */
.macro GUID a, b, c, d0, d1, d2, d3, d4, d5, d6, d7
	.long	\a
	.word	\b, \c
	.byte	\d0, \d1, \d2, \d3, \d4, \d5, \d6, \d7
.endm

	.section .ovmf_table, "a"
	.globl	ovmf_table
ovmf_table:

/* SEV_ES_RESET_BLOCK_GUID 00f771de-1a7e-4fcb-890e-68c77e2fb44e: u32, where an
 * SEV-ES guest's APs start (reset16.S); QEMU reads it (sev_es_find_reset_vector). */
sev_es_reset_block:
	.long	sev_es_ap_reset
	.word	sev_es_reset_block_end - sev_es_reset_block
	GUID	0x00f771de, 0x1a7e, 0x4fcb, 0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e
sev_es_reset_block_end:

/* SEV_HASH_TABLE_RV_GUID 7255371f-3a3b-4b04-927b-1da6efa8d454: u32 base, u32 size */
sev_hash_table_block:
	.long	QEMU_HASH_TABLE_GPA
	.long	QEMU_HASH_TABLE_SIZE
	.word	sev_hash_table_block_end - sev_hash_table_block
	GUID	0x7255371f, 0x3a3b, 0x4b04, 0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54
sev_hash_table_block_end:

/* SEV_SECRET_GUID 4c2eb361-7d9b-4cc3-8081-127c90d3d294: u32 base, u32 size */
sev_secret_block:
	.long	SEV_LAUNCH_SECRET_GPA
	.long	SEV_LAUNCH_SECRET_SIZE
	.word	sev_secret_block_end - sev_secret_block
	GUID	0x4c2eb361, 0x7d9b, 0x4cc3, 0x80, 0x81, 0x12, 0x7c, 0x90, 0xd3, 0xd2, 0x94
sev_secret_block_end:

/* The footer: the size of the whole table, and the table's own GUID
 * 96b582de-1fb2-45f7-baea-a366c55a082d. */
	.word	ovmf_table_end - ovmf_table
	GUID	0x96b582de, 0x1fb2, 0x45f7, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d
ovmf_table_end:

	.section .note.GNU-stack, "", @progbits
