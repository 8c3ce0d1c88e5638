/* SPDX-License-Identifier: MIT */
/*
 * sev_es.c - SEV-ES: the #VC handler and the GHCB.
 *
 * Read next to Linux's arch/x86/coco/sev/ (vc_handle_exitcode,
 * sev_es_ghcb_hv_call, verify_exception_info, vc_handle_mmio,
 * vc_slow_virt_to_phys, do_vc_no_ghcb), arch/x86/boot/compressed/sev.c
 * (sev_es_setup_ghcb), arch/x86/include/asm/svm.h (struct ghcb) and OVMF's
 * OvmfPkg/Library/CcExitLib (CcExitHandleVc).
 *
 * Under SEV-ES the guest's registers live in its encrypted VMSA: the
 * hypervisor can neither read nor write them. So an instruction it has to
 * emulate (CPUID, IN/OUT, RDMSR/WRMSR, VMMCALL, an access to MMIO) does not
 * exit: it raises #VC (vector 29) in the guest, a fault with RIP at the
 * instruction and the SVM exit code as its error code. The handler copies
 * just the registers the hypervisor needs into the GHCB, a page this CPU
 * shares with the hypervisor (C-bit clear), marks them valid, and exits with
 * VMGEXIT. The hypervisor finds the GHCB through the GHCB MSR, answers in the
 * same page and resumes the guest after the VMGEXIT; the handler copies the
 * answer into the saved registers and moves RIP past the instruction.
 *
 * Before a CPU has a GHCB, the GHCB MSR protocol carries a request in the MSR
 * itself: CPUID, one register at a time, is all it can do (entry32.S and
 * trampoline.S use it too).
 *
 * The handler must not raise #VC itself while it fills the GHCB: it prints
 * nothing, and what it cannot handle ends the guest with a termination
 * request. Each CPU finds its own GHCB in its GHCB MSR (each vCPU has one),
 * at GHCB_GPA + APIC ID * 4 KiB; the map is the identity, so a GHCB's GPA is
 * also its address.
 */
#include "guest.h"

/* The GHCB's fields (GHCB specification; Linux's struct ghcb_save_area): the
 * registers at their offsets in the VMSA, the exit code and information, and
 * a valid bitmap with one bit per quadword before it. */
#define GHCB_CPL		0x0CB	/* u8 */
#define GHCB_RAX		0x1F8
#define GHCB_RCX		0x308
#define GHCB_RDX		0x310
#define GHCB_RBX		0x318
#define GHCB_RSI		0x330
#define GHCB_SW_EXIT_CODE	0x390
#define GHCB_SW_EXIT_INFO_1	0x398
#define GHCB_SW_EXIT_INFO_2	0x3A0
#define GHCB_SW_SCRATCH		0x3A8
#define GHCB_VALID_BITMAP	0x3F0	/* 16 bytes */
#define GHCB_SHARED_BUFFER	0x800	/* 2032 bytes: MMIO data here */
#define GHCB_PROTOCOL		0xFFA	/* u16: the protocol version */
#define GHCB_USAGE		0xFFC	/* u32: 0, the standard GHCB */

/* SVM exit codes (the #VC error code, and sw_exit_code) and VMGEXIT's own. */
#define SVM_EXIT_IOIO		0x7B
#define SVM_EXIT_MSR		0x7C
#define SVM_EXIT_VMMCALL	0x81
#define SVM_EXIT_NPF		0x400
#define SVM_VMGEXIT_MMIO_READ	0x80000001
#define SVM_VMGEXIT_MMIO_WRITE	0x80000002

/* IOIO's EXITINFO1 (AMD64 APM vol. 2, 15.10.2). */
#define IOIO_TYPE_IN		(1 << 0)
#define IOIO_DATA_8		(1 << 4)
#define IOIO_DATA_16		(1 << 5)
#define IOIO_DATA_32		(1 << 6)
#define IOIO_ADDR_64		(1 << 9)
#define IOIO_PORT_SHIFT		16

/* EVENTINJ, the form of an exception the hypervisor asks the guest to raise. */
#define EVENTINJ_VECTOR_MASK	0xFF
#define EVENTINJ_TYPE_MASK	(7 << 8)
#define EVENTINJ_TYPE_EXCEPTION	(3 << 8)
#define EVENTINJ_ERROR_VALID	(1 << 11)
#define EVENTINJ_VALID		(1U << 31)
#define X86_TRAP_UD		6
#define X86_TRAP_GP		13

/* sw_exit_info_1 bits 31:0 of an answer. */
#define GHCB_RESULT_OK		0
#define GHCB_RESULT_EXCEPTION	1	/* sw_exit_info_2: the event to raise */

/* REX prefix bits (64-bit operand, ModRM.reg, SIB.index, ModRM.rm/SIB.base). */
#define REX_W			0x8
#define REX_R			0x4
#define REX_X			0x2
#define REX_B			0x1

int sev_es_active(void)
{
	return (BOOT_INFO->sev_status & SEV_STATUS_SEV_ES) != 0;
}

noreturn void sev_es_terminate(unsigned int set, unsigned int reason)
{
	/* Always through the MSR protocol: it needs no GHCB (Linux's sev_es_terminate). */
	wrmsr(MSR_GHCB, GHCB_TERM_REASON(set, reason));
	vmgexit();
	halt_forever();		/* the hypervisor does not run this CPU again */
}

static void vc_count(unsigned int kind)
{
	__atomic_add_fetch(&BOOT_INFO->vc_counts[kind], 1, __ATOMIC_RELAXED);
}

/* Bytes at p, little-endian: the operands of an instruction, unaligned. */
static uint64_t load_le(const volatile uint8_t *p, unsigned int n)
{
	uint64_t v = 0;

	for (unsigned int i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static void store_le(volatile uint8_t *p, uint64_t v, unsigned int n)
{
	for (unsigned int i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Do the bytes at RIP hold this instruction? */
static int insn_is(const struct trap_frame *f, const uint8_t *bytes, unsigned int n)
{
	return memcmp((const void *)f->rip, bytes, n) == 0;
}

/* --- the GHCB MSR protocol ----------------------------------------------- */

static uint64_t ghcb_msr_call(uint64_t request)
{
	wrmsr(MSR_GHCB, request);
	vmgexit();
	return rdmsr(MSR_GHCB);
}

/* One CPUID register (0 EAX .. 3 EDX) of leaf, through the MSR. */
static uint32_t ghcb_msr_cpuid(uint32_t leaf, unsigned int reg)
{
	uint64_t v = ghcb_msr_call((uint64_t)leaf << 32 |
				   (uint64_t)reg << GHCB_CPUID_REG_SHIFT | GHCB_MSR_CPUID_REQ);

	if ((v & GHCB_MSR_INFO_MASK) != GHCB_MSR_CPUID_RESP)
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_HV_ANSWER);
	return (uint32_t)(v >> 32);
}

/* Linux's do_vc_no_ghcb(): without a GHCB only CPUID can be answered. (The
 * subleaf cannot be passed: this serves only leaves that have none.) */
static void vc_no_ghcb(struct trap_frame *f)
{
	static const uint8_t cpuid_insn[] = { 0x0F, 0xA2 };
	uint32_t leaf = (uint32_t)f->rax;

	if (f->error_code != SVM_EXIT_CPUID || !insn_is(f, cpuid_insn, 2))
		sev_es_terminate(SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
	f->rax = ghcb_msr_cpuid(leaf, 0);
	f->rbx = ghcb_msr_cpuid(leaf, 1);
	f->rcx = ghcb_msr_cpuid(leaf, 2);
	f->rdx = ghcb_msr_cpuid(leaf, 3);
	f->rip += 2;
	vc_count(VC_MSR_PROTOCOL);
}

/* --- the GHCB page ------------------------------------------------------- */

/* This CPU's GHCB, or 0 while the MSR holds no GHCB address (its low 12 bits
 * are then a protocol code, or it is still 0 as after reset). */
static uint64_t this_cpu_ghcb(void)
{
	uint64_t v = rdmsr(MSR_GHCB);

	return (v && !(v & GHCB_MSR_INFO_MASK)) ? v : 0;
}

static void ghcb_mark_valid(uint64_t ghcb, unsigned int offset)
{
	volatile uint8_t *bitmap = (volatile uint8_t *)(ghcb + GHCB_VALID_BITMAP);
	unsigned int bit = offset / 8;

	bitmap[bit / 8] |= (uint8_t)(1 << (bit % 8));
}

static int ghcb_is_valid(uint64_t ghcb, unsigned int offset)
{
	volatile uint8_t *bitmap = (volatile uint8_t *)(ghcb + GHCB_VALID_BITMAP);
	unsigned int bit = offset / 8;

	return (bitmap[bit / 8] >> (bit % 8)) & 1;
}

/* A quadword field: its value, and its valid bit. */
static void ghcb_set(uint64_t ghcb, unsigned int offset, uint64_t v)
{
	*(volatile uint64_t *)(ghcb + offset) = v;
	ghcb_mark_valid(ghcb, offset);
}

/* A field of the answer; the hypervisor must have marked it valid. */
static uint64_t ghcb_get(uint64_t ghcb, unsigned int offset)
{
	if (!ghcb_is_valid(ghcb, offset))
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_HV_ANSWER);
	return *(volatile uint64_t *)(ghcb + offset);
}

/* Linux's vc_ghcb_invalidate(): nothing of the last request stays valid. */
static void ghcb_invalidate(uint64_t ghcb)
{
	*(volatile uint64_t *)(ghcb + GHCB_SW_EXIT_CODE) = 0;
	for (unsigned int i = 0; i < 16; i++)
		((volatile uint8_t *)(ghcb + GHCB_VALID_BITMAP))[i] = 0;
}

/*
 * Linux's sev_es_ghcb_hv_call() and verify_exception_info(): the exit code
 * and its information into the GHCB, VMGEXIT, then the hypervisor's verdict.
 * Returns 0, or the event (EVENTINJ) to raise instead of the instruction's
 * result: #GP or #UD, as if the instruction had raised it (a RDMSR of an MSR
 * the hypervisor does not know). Anything else ends the guest.
 */
static uint64_t ghcb_hv_call(uint64_t ghcb, uint64_t exit_code, uint64_t info1, uint64_t info2)
{
	ghcb_set(ghcb, GHCB_SW_EXIT_CODE, exit_code);
	ghcb_set(ghcb, GHCB_SW_EXIT_INFO_1, info1);
	ghcb_set(ghcb, GHCB_SW_EXIT_INFO_2, info2);
	*(volatile uint16_t *)(ghcb + GHCB_PROTOCOL) = GHCB_PROTOCOL_VERSION;
	*(volatile uint32_t *)(ghcb + GHCB_USAGE) = 0;

	vmgexit();

	uint32_t result = (uint32_t)*(volatile uint64_t *)(ghcb + GHCB_SW_EXIT_INFO_1);
	if (result == GHCB_RESULT_OK)
		return 0;
	if (result == GHCB_RESULT_EXCEPTION) {
		uint64_t event = *(volatile uint64_t *)(ghcb + GHCB_SW_EXIT_INFO_2);
		unsigned int vector = event & EVENTINJ_VECTOR_MASK;

		if ((event & EVENTINJ_VALID) &&
		    (event & EVENTINJ_TYPE_MASK) == EVENTINJ_TYPE_EXCEPTION &&
		    (vector == X86_TRAP_GP || vector == X86_TRAP_UD))
			return event;
	}
	sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_HV_ANSWER);
}

/* --- the exits ------------------------------------------------------------ */

/* CPUID (0F A2): leaf and subleaf in, the four registers out. (Leaf 0xD would
 * need XCR0 in the GHCB too; this firmware never asks for it.) */
static uint64_t vc_handle_cpuid(struct trap_frame *f, uint64_t ghcb)
{
	static const uint8_t insn[] = { 0x0F, 0xA2 };
	uint64_t event;

	if (!insn_is(f, insn, sizeof(insn)))
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_DECODE);
	ghcb_set(ghcb, GHCB_RAX, (uint32_t)f->rax);
	ghcb_set(ghcb, GHCB_RCX, (uint32_t)f->rcx);
	event = ghcb_hv_call(ghcb, SVM_EXIT_CPUID, 0, 0);
	if (event)
		return event;
	/* CPUID writes 32-bit registers: the upper halves become 0. */
	f->rax = (uint32_t)ghcb_get(ghcb, GHCB_RAX);
	f->rbx = (uint32_t)ghcb_get(ghcb, GHCB_RBX);
	f->rcx = (uint32_t)ghcb_get(ghcb, GHCB_RCX);
	f->rdx = (uint32_t)ghcb_get(ghcb, GHCB_RDX);
	f->rip += sizeof(insn);
	return 0;
}

/*
 * IN/OUT with the port in an immediate (E4-E7) or in DX (EC-EF), byte-sized
 * for even opcodes, else 32-bit or, after 0x66, 16-bit. The hypervisor gets
 * IOIO's EXITINFO1 built from the instruction (Linux's vc_ioio_exitinfo), and
 * RAX only for an OUT. INS/OUTS would need the shared buffer: not supported.
 */
static uint64_t vc_handle_ioio(struct trap_frame *f, uint64_t ghcb)
{
	const volatile uint8_t *insn = (const volatile uint8_t *)f->rip;
	unsigned int len = 0, size = 4;
	uint64_t info1 = IOIO_ADDR_64, event;
	uint16_t port;

	if (insn[len] == 0x66) {
		size = 2;
		len++;
	}
	uint8_t op = insn[len++];
	if (op >= 0xE4 && op <= 0xE7)
		port = insn[len++];
	else if (op >= 0xEC && op <= 0xEF)
		port = (uint16_t)f->rdx;
	else
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_DECODE);
	if (!(op & 1))
		size = 1;
	int in = !(op & 2);
	uint64_t mask = size == 4 ? 0xFFFFFFFFULL : (1ULL << (8 * size)) - 1;

	info1 |= (uint64_t)port << IOIO_PORT_SHIFT;
	info1 |= size == 1 ? IOIO_DATA_8 : size == 2 ? IOIO_DATA_16 : IOIO_DATA_32;
	if (in)
		info1 |= IOIO_TYPE_IN;
	else
		ghcb_set(ghcb, GHCB_RAX, f->rax & mask);
	event = ghcb_hv_call(ghcb, SVM_EXIT_IOIO, info1, 0);
	if (event)
		return event;
	if (in) {
		uint64_t v = ghcb_get(ghcb, GHCB_RAX) & mask;
		/* IN AL/AX keeps the rest of RAX; IN EAX zero-extends. */
		f->rax = size == 4 ? v : (f->rax & ~mask) | v;
	}
	f->rip += len;
	return 0;
}

/* RDMSR (0F 32) and WRMSR (0F 30): ECX, and EDX:EAX for a write. */
static uint64_t vc_handle_msr(struct trap_frame *f, uint64_t ghcb)
{
	static const uint8_t rdmsr_insn[] = { 0x0F, 0x32 }, wrmsr_insn[] = { 0x0F, 0x30 };
	int write = insn_is(f, wrmsr_insn, 2);
	uint64_t event;

	if (!write && !insn_is(f, rdmsr_insn, 2))
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_DECODE);
	ghcb_set(ghcb, GHCB_RCX, (uint32_t)f->rcx);
	if (write) {
		ghcb_set(ghcb, GHCB_RAX, (uint32_t)f->rax);
		ghcb_set(ghcb, GHCB_RDX, (uint32_t)f->rdx);
	}
	event = ghcb_hv_call(ghcb, SVM_EXIT_MSR, write, 0);
	if (event)
		return event;
	if (!write) {
		f->rax = (uint32_t)ghcb_get(ghcb, GHCB_RAX);
		f->rdx = (uint32_t)ghcb_get(ghcb, GHCB_RDX);
	}
	f->rip += 2;
	return 0;
}

/* VMMCALL (0F 01 D9): KVM's hypercall, number in RAX, arguments in RBX, RCX,
 * RDX, RSI, the result in RAX; the hypervisor also wants the CPL. */
static uint64_t vc_handle_vmmcall(struct trap_frame *f, uint64_t ghcb)
{
	static const uint8_t insn[] = { 0x0F, 0x01, 0xD9 };
	uint64_t event;

	if (!insn_is(f, insn, sizeof(insn)))
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_DECODE);
	ghcb_set(ghcb, GHCB_RAX, f->rax);
	ghcb_set(ghcb, GHCB_RBX, f->rbx);
	ghcb_set(ghcb, GHCB_RCX, f->rcx);
	ghcb_set(ghcb, GHCB_RDX, f->rdx);
	ghcb_set(ghcb, GHCB_RSI, f->rsi);
	*(volatile uint8_t *)(ghcb + GHCB_CPL) = (uint8_t)(f->cs & 3);
	ghcb_mark_valid(ghcb, GHCB_CPL);
	event = ghcb_hv_call(ghcb, SVM_EXIT_VMMCALL, 0, 0);
	if (event)
		return event;
	f->rax = ghcb_get(ghcb, GHCB_RAX);
	f->rip += sizeof(insn);
	return 0;
}

/* --- MMIO ------------------------------------------------------------------ */

/* A general-purpose register of the interrupted code, by its number in an
 * instruction encoding (RAX 0 ... R15 15). */
static uint64_t *gpr(struct trap_frame *f, unsigned int n)
{
	switch (n) {
	case 0: return &f->rax;
	case 1: return &f->rcx;
	case 2: return &f->rdx;
	case 3: return &f->rbx;
	case 4: return &f->rsp;
	case 5: return &f->rbp;
	case 6: return &f->rsi;
	case 7: return &f->rdi;
	case 8: return &f->r8;
	case 9: return &f->r9;
	case 10: return &f->r10;
	case 11: return &f->r11;
	case 12: return &f->r12;
	case 13: return &f->r13;
	case 14: return &f->r14;
	default: return &f->r15;
	}
}

/* A decoded MOV between a register (or an immediate) and memory. */
struct mmio_insn {
	uint64_t va;		/* the effective address */
	unsigned int size;	/* 2, 4 or 8 bytes */
	int write;
	uint64_t value;		/* for a write: what it stores */
	unsigned int reg;	/* for a read: where the value goes */
	unsigned int len;	/* the instruction's length */
};

/*
 * The forms gcc emits for a volatile pointer to 16-, 32- or 64-bit MMIO:
 * MOV r/m,r (89), MOV r,r/m (8B) and MOV r/m,imm (C7 /0), after an optional
 * 0x66 and REX prefix, with ModRM and SIB, disp8 or disp32, or RIP-relative;
 * and MOV between RAX and a 64-bit absolute address (A1 load, A3 store),
 * which it picks for a constant address such as APIC_BASE + APIC_ID.
 * The #VC carries no address: the handler finds it from the instruction and
 * the saved registers (Linux's insn_get_addr_ref). 0 if not such a MOV.
 */
static int decode_mmio(struct trap_frame *f, struct mmio_insn *m)
{
	const volatile uint8_t *p = (const volatile uint8_t *)f->rip;
	unsigned int rex = 0, size = 4, rip_relative = 0;
	uint64_t va = 0;

	if (*p == 0x66) {
		size = 2;
		p++;
	}
	if ((*p & 0xF0) == 0x40) {
		rex = *p++ & 0xF;
		if (rex & REX_W)
			size = 8;
	}
	uint8_t op = *p++;
	if (op == 0xA1 || op == 0xA3) {		/* moffs64: no ModRM */
		m->va = load_le(p, 8);
		p += 8;
		m->size = size;
		m->write = op == 0xA3;
		m->reg = 0;			/* RAX */
		m->value = f->rax;
		m->len = (unsigned int)((uintptr_t)p - f->rip);
		return 1;
	}
	uint8_t modrm = *p++;
	unsigned int mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7;

	if ((op != 0x89 && op != 0x8B && op != 0xC7) || mod == 3 || (op == 0xC7 && reg != 0))
		return 0;
	if (rm == 4) {				/* a SIB byte follows */
		uint8_t sib = *p++;
		unsigned int index = ((sib >> 3) & 7) | (rex & REX_X ? 8 : 0);
		unsigned int base = (sib & 7) | (rex & REX_B ? 8 : 0);

		if (index != 4)			/* 4 without REX.X: no index */
			va = *gpr(f, index) << (sib >> 6);
		if ((sib & 7) == 5 && mod == 0) {	/* no base: disp32 */
			va += (uint64_t)(int64_t)(int32_t)load_le(p, 4);
			p += 4;
		} else {
			va += *gpr(f, base);
		}
	} else if (rm == 5 && mod == 0) {
		rip_relative = 1;		/* disp32 from the next instruction */
	} else {
		va = *gpr(f, rm | (rex & REX_B ? 8 : 0));
	}
	if (mod == 1) {
		va += (uint64_t)(int64_t)(int8_t)*p;
		p += 1;
	} else if (mod == 2 || rip_relative) {
		va += (uint64_t)(int64_t)(int32_t)load_le(p, 4);
		p += 4;
	}

	m->size = size;
	m->write = op != 0x8B;
	m->reg = reg | (rex & REX_R ? 8 : 0);
	if (op == 0xC7) {			/* imm16, or imm32 sign-extended */
		unsigned int n = size == 2 ? 2 : 4;
		m->value = size == 2 ? load_le(p, 2) : (uint64_t)(int64_t)(int32_t)load_le(p, 4);
		p += n;
	} else if (op == 0x89) {
		m->value = *gpr(f, m->reg);
	}
	m->len = (unsigned int)((uintptr_t)p - f->rip);
	m->va = rip_relative ? va + f->rip + m->len : va;
	return 1;
}

/* Linux's vc_slow_virt_to_phys(): walk this CPU's page tables (4 levels,
 * 1 GiB and 2 MiB pages allowed), the C-bit left out of every address. */
static int virt_to_phys(uint64_t va, uint64_t *gpa)
{
	uint64_t me_mask = BOOT_INFO->me_mask;
	uint64_t table = read_cr3() & PTE_ADDR_MASK & ~me_mask;

	for (int level = 3; level >= 0; level--) {	/* PML4, PDPT, PD, PT */
		unsigned int shift = 12 + 9 * (unsigned int)level;
		uint64_t entry = ((volatile uint64_t *)table)[(va >> shift) & 511];
		uint64_t addr = entry & PTE_ADDR_MASK & ~me_mask;

		if (!(entry & PTE_P))
			return 0;
		if (level == 0 || ((level == 1 || level == 2) && (entry & PTE_PS))) {
			uint64_t page_mask = (1ULL << shift) - 1;

			*gpa = (addr & ~page_mask) | (va & page_mask);
			return 1;
		}
		table = addr;
	}
	return 0;
}

/*
 * An access to an MMIO page (the hypervisor marks it with a reserved bit in
 * its nested page table, so the access raises #VC with the #NPF exit code):
 * decode the MOV, find the GPA, and ask with VMGEXIT's MMIO events; the data
 * travels in the GHCB's shared buffer, which sw_scratch names.
 */
static uint64_t vc_handle_mmio(struct trap_frame *f, uint64_t ghcb)
{
	volatile uint8_t *buffer = (volatile uint8_t *)(ghcb + GHCB_SHARED_BUFFER);
	struct mmio_insn m = { 0 };
	uint64_t gpa, event;

	if (!decode_mmio(f, &m) || !virt_to_phys(m.va, &gpa))
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_DECODE);
	if (m.write)
		store_le(buffer, m.value, m.size);
	ghcb_set(ghcb, GHCB_SW_SCRATCH, ghcb + GHCB_SHARED_BUFFER);
	event = ghcb_hv_call(ghcb, m.write ? SVM_VMGEXIT_MMIO_WRITE : SVM_VMGEXIT_MMIO_READ,
			     gpa, m.size);
	if (event)
		return event;
	if (!m.write) {
		uint64_t *reg = gpr(f, m.reg);
		uint64_t v = load_le(buffer, m.size);

		/* A 32-bit load zero-extends; a 16-bit one keeps the rest. */
		*reg = m.size == 2 ? (*reg & ~0xFFFFULL) | v : v;
	}
	f->rip += m.len;
	return 0;
}

/* --- the handler ------------------------------------------------------------ */

/*
 * #VC, from exception_handler(). A #GP or #UD the hypervisor asks for is
 * raised as if the instruction had: exception_handler() reports it (and
 * resumes at a registered address, or halts), RIP still at the instruction.
 */
void vc_handler(struct trap_frame *f)
{
	uint64_t ghcb = this_cpu_ghcb();
	uint64_t event;
	unsigned int kind;

	if (!ghcb) {
		vc_no_ghcb(f);
		return;
	}
	ghcb_invalidate(ghcb);
	switch (f->error_code) {
	case SVM_EXIT_CPUID:
		kind = VC_CPUID;
		event = vc_handle_cpuid(f, ghcb);
		break;
	case SVM_EXIT_IOIO:
		kind = VC_IOIO;
		event = vc_handle_ioio(f, ghcb);
		break;
	case SVM_EXIT_MSR:
		kind = VC_MSR;
		event = vc_handle_msr(f, ghcb);
		break;
	case SVM_EXIT_VMMCALL:
		kind = VC_VMMCALL;
		event = vc_handle_vmmcall(f, ghcb);
		break;
	case SVM_EXIT_NPF:
		kind = VC_MMIO;
		event = vc_handle_mmio(f, ghcb);
		break;
	default:
		sev_es_terminate(SEV_TERM_SET_GUEST, GUEST_TERM_VC_UNSUPPORTED);
	}
	vc_count(kind);
	if (event) {
		f->vector = event & EVENTINJ_VECTOR_MASK;
		f->error_code = (event & EVENTINJ_ERROR_VALID) ? event >> 32 : 0;
		exception_handler(f);
	}
}

/* --- setting the GHCBs up ------------------------------------------------------ */

/* Linux's sev_es_negotiate_protocol(): the hypervisor's range of GHCB
 * protocol versions must include ours. */
static void sev_es_negotiate_protocol(void)
{
	uint64_t v = ghcb_msr_call(GHCB_MSR_SEV_INFO_REQ);
	unsigned int max = (unsigned int)(v >> 48), min = (unsigned int)(v >> 32) & 0xFFFF;

	if ((v & GHCB_MSR_INFO_MASK) != GHCB_MSR_SEV_INFO_RESP ||
	    min > GHCB_PROTOCOL_VERSION || max < GHCB_PROTOCOL_VERSION)
		sev_es_terminate(SEV_TERM_SET_GEN, GHCB_SEV_ES_PROT_UNSUPPORTED);
}

static void ghcb_clear(uint64_t ghcb)
{
	for (uint64_t off = 0; off < PAGE_SIZE; off += 8)
		*(volatile uint64_t *)(ghcb + off) = 0;
}

/*
 * The BSP's GHCB, called by entry64.S once the IDT is in place, before
 * main() prints its first line (each byte an OUT, each OUT a #VC). As in
 * Linux's boot/compressed sev_es_setup_ghcb(): agree on the protocol, make
 * the page shared (no hypercall: early_set_page_decrypted), clear it through
 * the new mapping, and register it in the GHCB MSR. The BSP is APIC ID 0
 * (entry32.S stops any other CPU).
 */
void sev_es_setup_ghcb(void)
{
	uint64_t ghcb = GHCB_GPA;

	if (!sev_es_active())
		return;
	sev_es_negotiate_protocol();
	early_set_page_decrypted(ghcb);
	ghcb_clear(ghcb);
	wrmsr(MSR_GHCB, ghcb);
}

/* The APs' GHCBs, made shared by the BSP before it starts them (Linux's
 * per-CPU GHCBs, set_memory_decrypted() in init_ghcb()). APIC IDs 1 to
 * cpus - 1: the BSP is 0, and its GHCB is made already. */
void sev_es_prepare_ap_ghcbs(unsigned int cpus)
{
	for (unsigned int id = 1; id < cpus; id++) {
		uint64_t ghcb = GHCB_GPA + (uint64_t)id * PAGE_SIZE;

		set_memory_decrypted(ghcb, 1);
		ghcb_clear(ghcb);
	}
}

/* An AP registers its GHCB first thing in ap_main(). */
void sev_es_ap_setup_ghcb(uint32_t apic_id)
{
	wrmsr(MSR_GHCB, GHCB_GPA + (uint64_t)apic_id * PAGE_SIZE);
}

/* The counts, read before say() adds its own #VCs. */
void sev_es_report(void)
{
	volatile uint64_t *n = BOOT_INFO->vc_counts;
	uint64_t c[VC_KINDS];

	for (int i = 0; i < VC_KINDS; i++)
		c[i] = n[i];
	say("#VC handled: cpuid %lu (%lu more through the GHCB MSR), ioio %lu, msr %lu, "
	    "vmmcall %lu, mmio %lu", c[VC_CPUID], c[VC_MSR_PROTOCOL], c[VC_IOIO], c[VC_MSR],
	    c[VC_VMMCALL], c[VC_MMIO]);
}
