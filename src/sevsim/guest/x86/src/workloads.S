/* SPDX-License-Identifier: MIT */
/*
 * workloads.S - small functions in hand-written assembly, with the System V
 * calling convention (arguments in RDI, RSI, RDX; result in RAX), exported
 * by name in sevsim-guest.sym.json so that a bare emulator can call them too.
 * alu_loop, mem_loop, load_loop and probe_read8 use no memory but their
 * arguments (and the boot-info block) and no stack beyond the return address.
 */
#include "layout.h"

	.code64
	.section .text

/*
 * uint64_t alu_loop(uint64_t n)
 *
 * A register-only loop: n rounds of add, xor, rotate. No loads, no stores.
 *     x = 0x0123456789ABCDEF
 *     for c = n down to 1:  x = rol64((x + 0x9E3779B97F4A7C15) ^ c, 13)
 *     return x
 */
	.globl	alu_loop
	.balign	16
alu_loop:
	movabsq	$0x0123456789ABCDEF, %rax
	movabsq	$0x9E3779B97F4A7C15, %rdx	/* 2^64 / golden ratio, odd */
	testq	%rdi, %rdi
	jz	2f
1:	addq	%rdx, %rax
	xorq	%rdi, %rax
	rolq	$13, %rax
	decq	%rdi
	jnz	1b
2:	ret

/*
 * uint64_t mem_loop(uint64_t base, uint64_t bytes, uint64_t rounds)
 *
 * 8-byte loads and stores over [base, base + bytes). With n = bytes / 8:
 *     q[i] = i                     for every i < n        (one store pass)
 *     repeat rounds times:
 *         for i < n: x = q[i]; sum += x; q[i] = x + 1     (load + store)
 *     return sum   (= rounds * n(n-1)/2 + n * rounds(rounds-1)/2, mod 2^64)
 * Filling first makes the result independent of what RAM held before.
 */
	.globl	mem_loop
	.balign	16
mem_loop:
	shrq	$3, %rsi			/* n: number of 8-byte words */
	xorl	%eax, %eax			/* sum */
	xorl	%ecx, %ecx			/* i */
	testq	%rsi, %rsi
	jz	9f
1:	movq	%rcx, (%rdi, %rcx, 8)		/* q[i] = i */
	incq	%rcx
	cmpq	%rsi, %rcx
	jb	1b
	testq	%rdx, %rdx
	jz	9f
2:	xorl	%ecx, %ecx
3:	movq	(%rdi, %rcx, 8), %r8		/* x = q[i] */
	addq	%r8, %rax			/* sum += x */
	incq	%r8
	movq	%r8, (%rdi, %rcx, 8)		/* q[i] = x + 1 */
	incq	%rcx
	cmpq	%rsi, %rcx
	jb	3b
	decq	%rdx
	jnz	2b
9:	ret

/*
 * uint64_t load_loop(uint64_t base, uint64_t bytes, uint64_t count)
 *
 * count 8-byte loads at pseudo-random, 8-byte aligned places in
 * [base, base + bytes); bytes is a power of two, at least 8. No stores.
 *     x = 0x9E3779B97F4A7C15                  (xorshift64 state, odd so never 0)
 *     repeat count times:
 *         x ^= x << 13;  x ^= x >> 7;  x ^= x << 17
 *         sum += *(uint64_t *)(base + (x & (bytes - 8)))
 *     return sum   (mod 2^64)
 * It reads whatever memory holds: the `loads` workload fills it first with
 * q[i] = i (so a load at offset o gives o / 8); over its 256 KiB,
 * count = 1000 gives 0xfecc3a.
 */
	.globl	load_loop
	.balign	16
load_loop:
	leaq	-8(%rsi), %rsi			/* mask: bytes - 8 */
	xorl	%eax, %eax			/* sum */
	movabsq	$0x9E3779B97F4A7C15, %rcx	/* x */
	testq	%rdx, %rdx
	jz	9f
1:	movq	%rcx, %r8
	shlq	$13, %r8
	xorq	%r8, %rcx			/* x ^= x << 13 */
	movq	%rcx, %r8
	shrq	$7, %r8
	xorq	%r8, %rcx			/* x ^= x >> 7 */
	movq	%rcx, %r8
	shlq	$17, %r8
	xorq	%r8, %rcx			/* x ^= x << 17 */
	movq	%rcx, %r8
	andq	%rsi, %r8			/* offset: x & (bytes - 8) */
	addq	(%rdi, %r8), %rax		/* sum += load */
	decq	%rdx
	jnz	1b
9:	ret

/*
 * uint64_t probe_read8(uint64_t addr)
 *
 * Reads one byte at addr and returns it, or returns ~0 if the read raised an
 * exception. It registers a resume address in the boot-info block; the
 * exception handler (exceptions.c) sends the faulting CPU there instead of
 * halting. RSP is the same at the load and at the resume label, because the
 * IRETQ restores the RSP the CPU saved at the fault.
 */
	.globl	probe_read8
	.balign	16
probe_read8:
	leaq	1f(%rip), %rax
	movq	%rax, BOOT_INFO_GPA + BI_RESUME_RIP	/* register the resume address */
	movzbl	(%rdi), %eax			/* the access that may fault */
	jmp	2f
1:	movq	$-1, %rax			/* resumed here after an exception */
2:	movq	$0, BOOT_INFO_GPA + BI_RESUME_RIP	/* unregister */
	ret

/*
 * uint64_t probe_rdmsr(uint32_t msr)
 *
 * RDMSR of msr: EDX:EAX as one value, or ~0 if the RDMSR raised an exception
 * (#GP for an MSR that does not exist), with probe_read8's resume address.
 * Under SEV-ES the RDMSR is a #VC: the hypervisor answers "raise #GP" and
 * sev_es.c raises it here, at the RDMSR.
 */
	.globl	probe_rdmsr
	.balign	16
probe_rdmsr:
	leaq	1f(%rip), %rax
	movq	%rax, BOOT_INFO_GPA + BI_RESUME_RIP	/* register the resume address */
	movl	%edi, %ecx
	rdmsr					/* the access that may fault */
	shlq	$32, %rdx
	orq	%rdx, %rax
	jmp	2f
1:	movq	$-1, %rax			/* resumed here after an exception */
2:	movq	$0, BOOT_INFO_GPA + BI_RESUME_RIP	/* unregister */
	ret

/*
 * void yield_to_host(void)
 *
 * Let the hypervisor run, and come back: `sti; hlt; cli`. On sevsim a HLT is
 * an exit to the hypervisor; with RFLAGS.IF=1 the vCPU only sleeps, and the
 * hypervisor runs it again later (it delivers no interrupt, so the guest goes
 * on right after the HLT, with `cli`). With IF=0
 * (halt_forever's `cli; hlt`) the vCPU has finished for good. The attack
 * lab's victims yield between their steps so that the host can act between
 * them. On plain QEMU nothing wakes the CPU (the 8259s are masked, the local
 * APIC is left as reset leaves it): the guest waits there for good.
 *
 * Under SEV (without -ES) the hypervisor sees the guest's registers at every
 * exit, in the VMCB. So that the host learns only what memory tells it, the
 * callee-saved registers go to the (private) stack and every general-purpose
 * register but RSP is zeroed; RFLAGS is set to 0x2 (arithmetic flags clear,
 * DF=0), so no flag carries a value either. The host sees RIP (always here)
 * and RSP. Clobbers the caller-saved registers (System V), returns nothing.
 */
	.globl	yield_to_host
	.balign	16
yield_to_host:
	pushq	%rbx
	pushq	%rbp
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	xorl	%eax, %eax
	xorl	%ebx, %ebx
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	xorl	%esi, %esi
	xorl	%edi, %edi
	xorl	%ebp, %ebp
	xorl	%r8d, %r8d
	xorl	%r9d, %r9d
	xorl	%r10d, %r10d
	xorl	%r11d, %r11d
	xorl	%r12d, %r12d
	xorl	%r13d, %r13d
	xorl	%r14d, %r14d
	xorl	%r15d, %r15d
	pushq	$0x2				/* RFLAGS: only the reserved bit 1 */
	popfq
	sti					/* IF=1: the HLT below sleeps, not ends */
	hlt					/* exit to the hypervisor */
	cli
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbp
	popq	%rbx
	ret

	.section .note.GNU-stack, "", @progbits
