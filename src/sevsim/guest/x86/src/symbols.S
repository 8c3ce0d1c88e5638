/* SPDX-License-Identifier: MIT */
/*
 * symbols.S - the fixed addresses of layout.h as absolute ELF symbols, so
 * that they reach sevsim-guest.sym.json (and a debugger) by name.
 *
 * EXPORT_ABS(SECRET_GPA) becomes
 *     .globl "SECRET_GPA"; .set "SECRET_GPA", 0x200000
 * The quoted name (#name) is not macro-expanded; the second use is.
 */
#include "layout.h"

#define EXPORT_ABS(name) .globl #name; .set #name, name

EXPORT_ABS(IMAGE_BASE)
EXPORT_ABS(BOOT_INFO_GPA)
EXPORT_ABS(PML4_GPA)
EXPORT_ABS(PDPT_GPA)
EXPORT_ABS(PD_GPA)
EXPORT_ABS(SPLIT_PT_GPA)
EXPORT_ABS(IDT_GPA)
EXPORT_ABS(STACK_TOP)
EXPORT_ABS(SECRET_GPA)
EXPORT_ABS(SHARED_GPA)
EXPORT_ABS(ALIAS_GPA)
EXPORT_ABS(ALIAS_FLUSH_GPA)
EXPORT_ABS(BALANCE_GPA)
EXPORT_ABS(FLAGS_GPA)
EXPORT_ABS(INBOX_BUFFER_GPA)
EXPORT_ABS(SETTING_GPA)
EXPORT_ABS(INBOX_SHARED_GPA)
EXPORT_ABS(TRAMPOLINE_GPA)
EXPORT_ABS(AP_STACKS_GPA)
EXPORT_ABS(AP_MAILBOX_GPA)
EXPORT_ABS(PICTURE_GPA)
EXPORT_ABS(SELFMOD_GPA)
EXPORT_ABS(LOADS_GPA)
EXPORT_ABS(MEM_LOOP_GPA)

	.section .note.GNU-stack, "", @progbits
