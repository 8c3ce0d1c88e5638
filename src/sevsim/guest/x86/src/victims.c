/* SPDX-License-Identifier: MIT */
/*
 * victims.c - the attack lab's victims: `balance`, `flags` and `inbox`.
 *
 * Each keeps something in private (encrypted) memory and yields to the host
 * (yield_to_host(): `sti; hlt; cli`) between its steps, so that a hostile
 * hypervisor can watch, copy or move ciphertext in between. They are the
 * real-code versions of the model kernel's workloads of the same names
 * (src/sevsim/guest/kernel.py: balance, flags, inbox), at the fixed
 * addresses of layout.h instead of allocated pages.
 *
 * SEV encrypts memory in 16-byte blocks, each with a tweak that depends on its
 * physical address. So every value here fills one aligned 16-byte block,
 * padded with spaces, and is written and read with 8-byte accesses: the same
 * plaintext at the same place always gives the same ciphertext, which is what
 * the attacks work with.
 */
#include "guest.h"

#define BLOCK	16		/* one block of the memory encryption */

/* text padded with spaces to 16 bytes, as Python's bytes.ljust(16). */
static void pad16(uint8_t out[BLOCK], const char *text)
{
	size_t n = strlen(text);

	memset(out, ' ', BLOCK);
	memcpy(out, text, n < BLOCK ? n : BLOCK);
}

/* One 16-byte block to private memory at gpa, as two 8-byte stores. */
static void store16(uint64_t gpa, const uint8_t block[BLOCK])
{
	volatile uint64_t *q = (volatile uint64_t *)gpa;
	uint64_t lo, hi;

	__builtin_memcpy(&lo, block, 8);
	__builtin_memcpy(&hi, block + 8, 8);
	q[0] = lo;
	q[1] = hi;
}

/* The 16-byte block at gpa, as two 8-byte loads. */
static void load16(uint64_t gpa, uint8_t block[BLOCK])
{
	volatile const uint64_t *q = (volatile const uint64_t *)gpa;
	uint64_t lo = q[0], hi = q[1];

	__builtin_memcpy(block, &lo, 8);
	__builtin_memcpy(block + 8, &hi, 8);
}

/*
 * A block made fit for the console: trailing spaces (and, if strip_nul,
 * NULs) dropped, every byte that is not printable ASCII shown as '?'. What
 * the guest reads back after the host had its turn may be anything: the
 * decryption of ciphertext that belongs elsewhere is 16 random-looking bytes.
 */
static void printable(char out[BLOCK + 1], const uint8_t block[BLOCK], int strip_nul)
{
	size_t n = BLOCK;

	while (n && (block[n - 1] == ' ' || (strip_nul && block[n - 1] == '\0')))
		n--;
	for (size_t i = 0; i < n; i++)
		out[i] = block[i] >= 0x20 && block[i] < 0x7F ? (char)block[i] : '?';
	out[n] = '\0';
}

/*
 * balance: a private account balance, 100 EUR, then 40 after a payment, with
 * a yield after each write; then read it back. A host that saved the
 * ciphertext of "balance: 100 EUR" at the first yield and writes it back at
 * the second one (a replay) makes the guest read 100 again.
 */
void workload_balance(void)
{
	static const unsigned amounts[] = { 100, 40 };
	uint8_t block[BLOCK];
	char line[BLOCK + 1];

	split_large_page(BALANCE_GPA);
	for (size_t i = 0; i < sizeof(amounts) / sizeof(amounts[0]); i++) {
		/* f"balance: {amount:3d} EUR": the amount right-aligned in 3 columns */
		char text[] = "balance:     EUR";
		unsigned v = amounts[i];
		int pos = 11;

		do {
			text[pos--] = (char)('0' + v % 10);
			v /= 10;
		} while (v && pos >= 9);
		pad16(block, text);
		store16(BALANCE_GPA, block);
		yield_to_host();
	}
	load16(BALANCE_GPA, block);
	printable(line, block, 0);
	say("balance read back: %s", line);
}

/*
 * flags: walk the 16 bits of a random private key, most significant first,
 * storing each bit's flag ("flag: 1" or "flag: 0") in the same private
 * variable, with a yield after each store: a key-dependent value that the
 * host can watch (its ciphertext takes one of two values) but not decrypt.
 * The key stays in private memory, as 16 characters '0'/'1' at
 * FLAGS_GPA + FLAGS_KEY_OFFSET, and is never printed. The flag is chosen
 * without a branch and the store is the same either way; yield_to_host()
 * clears the registers, so only the ciphertext tells the bits apart.
 */
void workload_flags(void)
{
	volatile char *key = (volatile char *)(FLAGS_GPA + FLAGS_KEY_OFFSET);
	uint64_t word = rdrand64_or_halt();
	uint8_t block[BLOCK];

	split_large_page(FLAGS_GPA);
	for (int i = 0; i < 16; i++)
		key[i] = (char)('0' + ((word >> (15 - i)) & 1));
	for (int i = 0; i < 16; i++) {
		char text[] = "flag: 0";

		text[6] = key[i];
		pad16(block, text);
		store16(FLAGS_GPA, block);
		yield_to_host();
	}
	say("walked the key's bits");
}

/*
 * inbox: a private setting ("role: user") at SETTING_GPA; a page shared with
 * the host at INBOX_SHARED_GPA, made shared as `secret` shares its page. At
 * the first yield the host delivers a message into the shared page; the guest
 * copies its first 64 bytes into the private buffer at INBOX_BUFFER_GPA, as a
 * network driver copies a received packet out of its bounce buffer; at the
 * second yield the host acts; then the guest reads its setting.
 *
 * The copy uses aligned 8-byte loads and stores, so each 16-byte block of the
 * message lands at the same offset of the buffer, encrypted there with the
 * guest's key: the host gets the ciphertext of plaintext it chose.
 */
void workload_inbox(void)
{
	volatile const uint64_t *shared = (volatile const uint64_t *)INBOX_SHARED_GPA;
	volatile uint64_t *buffer = (volatile uint64_t *)INBOX_BUFFER_GPA;
	uint8_t block[BLOCK];
	char line[BLOCK + 1];

	split_large_page(SETTING_GPA);
	pad16(block, SETTING_TEXT);
	store16(SETTING_GPA, block);
	set_page_decrypted(INBOX_SHARED_GPA, enc_cache_flush_required());
	say("inbox at 0x%x", INBOX_SHARED_GPA);
	yield_to_host();		/* the host delivers a message */
	for (int i = 0; i < INBOX_MESSAGE_SIZE / 8; i++)
		buffer[i] = shared[i];
	yield_to_host();		/* the host acts */
	load16(SETTING_GPA, block);
	printable(line, block, 1);
	say("setting: %s", line);
}
