/* SPDX-License-Identifier: MIT */
/*
 * exceptions.c - the common exception handler, called by entry64.S's stubs.
 * #VC goes on to sev_es.c; every other exception is reported.
 */
#include "guest.h"

/* The names of vectors 0-31 as in the AMD64 APM, vol. 2, 8.2. */
static const char vector_names[IDT_VECTORS][28] = {
	"divide-by-zero",		/*  0 #DE */
	"debug",			/*  1 #DB */
	"nmi",				/*  2 NMI */
	"breakpoint",			/*  3 #BP */
	"overflow",			/*  4 #OF */
	"bound-range",			/*  5 #BR */
	"invalid-opcode",		/*  6 #UD */
	"device-not-available",		/*  7 #NM */
	"double-fault",			/*  8 #DF */
	"coprocessor-segment-overrun",	/*  9 */
	"invalid-tss",			/* 10 #TS */
	"segment-not-present",		/* 11 #NP */
	"stack",			/* 12 #SS */
	"general-protection",		/* 13 #GP */
	"page-fault",			/* 14 #PF */
	"reserved",			/* 15 */
	"x87-floating-point",		/* 16 #MF */
	"alignment-check",		/* 17 #AC */
	"machine-check",		/* 18 #MC */
	"simd-floating-point",		/* 19 #XF */
	"reserved",			/* 20 */
	"control-protection",		/* 21 #CP */
	"reserved", "reserved", "reserved", "reserved", "reserved", "reserved", /* 22-27 */
	"hypervisor-injection",		/* 28 #HV */
	"vmm-communication",		/* 29 #VC */
	"security",			/* 30 #SX */
	"reserved",			/* 31 */
};

void exception_handler(struct trap_frame *f)
{
	volatile struct boot_info *bi = BOOT_INFO;

	/* SEV-ES: an instruction the hypervisor must emulate (sev_es.c). */
	if (f->vector == VC_VECTOR) {
		vc_handler(f);
		return;
	}

	uint64_t cr2 = read_cr2();
	uint64_t resume = bi->resume_rip;

	say("exception %s (#%lu) at rip=0x%lx error=0x%lx cr2=0x%lx",
	    f->vector < IDT_VECTORS ? vector_names[f->vector] : "?",
	    f->vector, f->rip, f->error_code, cr2);

	bi->last_vector = f->vector;
	bi->last_error = f->error_code;
	bi->last_cr2 = cr2;

	/* A self-test expected this: continue at its resume address, once. */
	if (resume) {
		bi->resume_rip = 0;
		f->rip = resume;
		return;		/* entry64.S restores the registers and IRETQs */
	}
	say("halted");
	halt_forever();
}
