/* SPDX-License-Identifier: MIT */
/*
 * aesni.S - AES-256 with the AES-NI instructions: the key schedule
 * (AESKEYGENASSIST, AESIMC) and one 16-byte block at a time (AESENC,
 * AESENCLAST, AESDEC, AESDECLAST).
 *
 * Read next to FIPS 197 (5.2 KeyExpansion, 5.3.5 the equivalent inverse
 * cipher), Intel's "Advanced Encryption Standard (AES) New Instructions Set"
 * white paper, and Linux's arch/x86/crypto/aesni-intel_asm.S.
 *
 * The C files are built with -mgeneral-regs-only: the SSE registers appear
 * only here. Nothing saves them across an exception, and nothing needs to:
 * the exception handler uses none. sse_enable() must run first (CR4.OSFXSR:
 * without it SSE instructions raise #UD).
 *
 * A round-key schedule is 15 round keys of 16 bytes (AES-256: 14 rounds).
 */
#include "layout.h"

	.code64
	.section .text

/*
 * void sse_enable(void)
 * CR0.EM = 0 and CR0.MP = 1 (SSE instructions run, no x87 emulation);
 * CR4.OSFXSR and CR4.OSXMMEXCPT (the OS handles SSE state and #XM).
 */
	.globl	sse_enable
	.balign	16
sse_enable:
	movq	%cr0, %rax
	andq	$~CR0_EM, %rax
	orq	$CR0_MP, %rax
	movq	%rax, %cr0
	movq	%cr4, %rax
	orq	$(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
	movq	%rax, %cr4
	ret

/*
 * One step of the AES-256 key expansion (FIPS 197, 5.2), for the round key
 * in %xmm1 from the one two steps back (%xmm1) and %xmm2, the output of
 * AESKEYGENASSIST on the previous round key with the word we need
 * broadcast to all four lanes:
 *     w[i] = w[i-8] ^ temp,   w[i+1] = w[i-7] ^ w[i], ...
 * which is: xmm1 ^= xmm1 << 32; xmm1 ^= xmm1 << 64 (as three shifts of 4
 * bytes, each xor-ed in), then xmm1 ^= the broadcast word.
 */
	.macro	EXPAND_STEP shuffle
	pshufd	$\shuffle, %xmm2, %xmm2		/* the word we need, in every lane */
	movdqa	%xmm1, %xmm4
	pslldq	$4, %xmm4
	pxor	%xmm4, %xmm1
	pslldq	$4, %xmm4
	pxor	%xmm4, %xmm1
	pslldq	$4, %xmm4
	pxor	%xmm4, %xmm1
	pxor	%xmm2, %xmm1
	.endm

/*
 * void aesni_expand_key256(const uint8_t key[32], uint8_t enc[15 * 16],
 *                          uint8_t dec[15 * 16])
 *
 * enc: the encryption schedule. Round keys 2i are RotWord-SubWord-Rcon
 * steps (AESKEYGENASSIST with rcon, word 3: shuffle 0xff) on round key 2i-1;
 * round keys 2i+1 are SubWord steps (rcon 0, word 2: shuffle 0xaa) on round
 * key 2i.
 * dec: the schedule of the equivalent inverse cipher (FIPS 197, 5.3.5):
 * the round keys in reverse order, InvMixColumns (AESIMC) applied to all but
 * the first and the last, which is what AESDEC expects.
 */
	.macro	EVEN_KEY n, rcon
	aeskeygenassist $\rcon, %xmm3, %xmm2	/* xmm1 = key n-2, xmm3 = key n-1 */
	EXPAND_STEP 0xff
	movdqu	%xmm1, (16 * \n)(%rsi)		/* xmm1 = key n */
	.endm

	.macro	ODD_KEY n
	movdqa	%xmm1, %xmm6
	aeskeygenassist $0, %xmm1, %xmm2
	movdqa	%xmm3, %xmm1			/* xmm1 = key n-2 */
	EXPAND_STEP 0xaa
	movdqu	%xmm1, (16 * \n)(%rsi)		/* xmm1 = key n */
	movdqa	%xmm1, %xmm3			/* xmm3 = key n, */
	movdqa	%xmm6, %xmm1			/* xmm1 = key n-1 */
	.endm

	.globl	aesni_expand_key256
	.balign	16
aesni_expand_key256:
	movdqu	(%rdi), %xmm1			/* key 0: the first half of the key */
	movdqu	16(%rdi), %xmm3			/* key 1: the second half */
	movdqu	%xmm1, (%rsi)
	movdqu	%xmm3, 16(%rsi)
	EVEN_KEY 2, 0x01
	ODD_KEY 3
	EVEN_KEY 4, 0x02
	ODD_KEY 5
	EVEN_KEY 6, 0x04
	ODD_KEY 7
	EVEN_KEY 8, 0x08
	ODD_KEY 9
	EVEN_KEY 10, 0x10
	ODD_KEY 11
	EVEN_KEY 12, 0x20
	ODD_KEY 13
	EVEN_KEY 14, 0x40

	/* dec[0] = enc[14], dec[i] = AESIMC(enc[14 - i]), dec[14] = enc[0] */
	movdqu	(16 * 14)(%rsi), %xmm0
	movdqu	%xmm0, (%rdx)
	movl	$1, %ecx
1:	movl	$14, %eax
	subl	%ecx, %eax
	shll	$4, %eax
	movdqu	(%rsi, %rax), %xmm0
	aesimc	%xmm0, %xmm0
	movl	%ecx, %eax
	shll	$4, %eax
	movdqu	%xmm0, (%rdx, %rax)
	incl	%ecx
	cmpl	$14, %ecx
	jb	1b
	movdqu	(%rsi), %xmm0
	movdqu	%xmm0, (16 * 14)(%rdx)
	ret

/*
 * void aesni_encrypt(const uint8_t *round_keys, uint8_t block[16])
 * void aesni_decrypt(const uint8_t *round_keys, uint8_t block[16])
 *
 * One block, in place: AddRoundKey with key 0, 13 full rounds, the last
 * round (no MixColumns). aesni_decrypt takes the dec schedule. The round
 * keys are loaded with MOVDQU first: a legacy SSE memory operand must be
 * 16-byte aligned, and the callers' schedules need not be.
 */
	.globl	aesni_encrypt
	.balign	16
aesni_encrypt:
	movdqu	(%rsi), %xmm0
	movdqu	(%rdi), %xmm1
	pxor	%xmm1, %xmm0
	.irp	n, 1,2,3,4,5,6,7,8,9,10,11,12,13
	movdqu	(16 * \n)(%rdi), %xmm1
	aesenc	%xmm1, %xmm0
	.endr
	movdqu	(16 * 14)(%rdi), %xmm1
	aesenclast %xmm1, %xmm0
	movdqu	%xmm0, (%rsi)
	ret

	.globl	aesni_decrypt
	.balign	16
aesni_decrypt:
	movdqu	(%rsi), %xmm0
	movdqu	(%rdi), %xmm1
	pxor	%xmm1, %xmm0
	.irp	n, 1,2,3,4,5,6,7,8,9,10,11,12,13
	movdqu	(16 * \n)(%rdi), %xmm1
	aesdec	%xmm1, %xmm0
	.endr
	movdqu	(16 * 14)(%rdi), %xmm1
	aesdeclast %xmm1, %xmm0
	movdqu	%xmm0, (%rsi)
	ret

	.section .note.GNU-stack, "", @progbits
