/* SPDX-License-Identifier: MIT */
/*
 * main.c - the C part: report SEV, set up fw_cfg, do the launch checks
 * (launch.c), then run the workloads named in the fw_cfg file
 * opt/sevsim/workload (default: "secret"), in order.
 */
#include "guest.h"

#define WORKLOAD_FILE	"opt/sevsim/workload"
#define WORKLOAD_MAX	256

/* --- secret -------------------------------------------------------------- */

/*
 * A secret in private memory, and a message about it in a shared page:
 *   SECRET_GPA: "sevsim secret:" + 32 random bytes       (private, encrypted)
 *   SHARED_GPA: "SEVSIM-SHARED\0\0\0" + u64 SECRET_GPA + SHA-256 of the 32 bytes
 *               + the label of `secret:LABEL` (NUL-padded; empty for `secret`)
 * The hypervisor should be able to read the shared page but never the secret.
 */
static void workload_secret(const char *label)
{
	uint8_t *page = (uint8_t *)SECRET_GPA;
	uint8_t *secret = page + sizeof(SECRET_MARKER) - 1;
	uint8_t *shared = (uint8_t *)SHARED_GPA;
	uint8_t digest[SHA256_DIGEST_SIZE];
	char hex[2 * SHA256_DIGEST_SIZE + 1];
	uint64_t word, gpa = SECRET_GPA;

	if (strlen(label) > SECRET_LABEL_MAX) {
		say("secret: the label is longer than %u characters", (unsigned)SECRET_LABEL_MAX);
		return;
	}
	if (!rdrand_supported()) {
		say("rdrand failed (CPUID.01H:ECX.RDRAND is 0)");
		halt_forever();
	}
	memset(page, 0, PAGE_SIZE);
	memcpy(page, SECRET_MARKER, sizeof(SECRET_MARKER) - 1);
	for (int i = 0; i < SECRET_BYTES / 8; i++) {
		if (!rdrand64(&word)) {
			say("rdrand failed");
			halt_forever();
		}
		memcpy(secret + 8 * i, &word, 8);
	}
	word = 0;
	sha256(secret, SECRET_BYTES, digest);

	set_page_decrypted(SHARED_GPA, enc_cache_flush_required());
	memset(shared, 0, PAGE_SIZE);		/* the old contents read as ciphertext */
	memcpy(shared, SHARED_MAGIC, sizeof(SHARED_MAGIC) - 1);	/* zero-padded to 16 */
	memcpy(shared + 16, &gpa, 8);
	memcpy(shared + 24, digest, SHA256_DIGEST_SIZE);
	memcpy(shared + SHARED_LABEL_OFFSET, label, strlen(label));

	hex_string(hex, digest, SHA256_DIGEST_SIZE);
	say("secret at 0x%x, sha256 %s", SECRET_GPA, hex);
	say("shared page at 0x%x", SHARED_GPA);
}

/* The secret, made now unless a `secret` made it earlier in this boot (RAM
 * the guest never wrote does not hold the marker: it is zero, or under SEV
 * the decryption of whatever the host left there). */
void secret_ensure(void)
{
	if (memcmp((const void *)SECRET_GPA, SECRET_MARKER, sizeof(SECRET_MARKER) - 1) != 0)
		workload_secret("");
}

/* --- dma: a device writes at the secret ------------------------------------- */

/*
 * The secret's page, hashed before and after a yield during which the host
 * may have a device DMA at it. A DMA carries no ASID: what a device writes
 * there lands in DRAM without the guest's key, and the guest then reads its
 * decryption, garbage. Only digests are printed, never the page itself.
 */
static void workload_dma(void)
{
	uint8_t before[SHA256_DIGEST_SIZE], after[SHA256_DIGEST_SIZE];
	char hex[2 * SHA256_DIGEST_SIZE + 1];

	secret_ensure();
	sha256((const void *)SECRET_GPA, DMA_CHECK_BYTES, before);
	say("dma: waiting while a device may write at 0x%x", SECRET_GPA);
	yield_to_host();
	sha256((const void *)SECRET_GPA, DMA_CHECK_BYTES, after);
	hex_string(hex, after, SHA256_DIGEST_SIZE);
	say("dma read back: %s, sha256 %s",
	    memcmp(before, after, sizeof(after)) == 0 ? "intact" : "changed", hex);
}

/* --- alias, alias-flush: the cache and the C-bit --------------------------- */

#define ALIAS_OLD	"old data through C=1 "	/* 21 bytes, repeated over the page */
#define ALIAS_NEW	"new data through C=0 "
#define ALIAS_LEN	(sizeof(ALIAS_OLD) - 1)
#define LINES_PER_PAGE	(PAGE_SIZE / CACHE_LINE_SIZE)

_Static_assert(sizeof(ALIAS_OLD) == sizeof(ALIAS_NEW), "the two patterns have one length");

static void fill_pattern(volatile uint8_t *page, const char *pattern)
{
	for (size_t i = 0; i < PAGE_SIZE; i++)
		page[i] = (uint8_t)pattern[i % ALIAS_LEN];
}

/* How many of the page's 64-byte lines do not hold exactly their part of the
 * pattern. */
static unsigned lines_not_holding(volatile const uint8_t *page, const char *pattern)
{
	unsigned lost = 0;

	for (size_t line = 0; line < PAGE_SIZE; line += CACHE_LINE_SIZE)
		for (size_t i = line; i < line + CACHE_LINE_SIZE; i++)
			if (page[i] != (uint8_t)pattern[i % ALIAS_LEN]) {
				lost++;
				break;
			}
	return lost;
}

/*
 * A private page made shared, then used as a driver uses a buffer it hands to
 * a device: write through the new (C=0) mapping, push the data to DRAM with
 * CLFLUSH, and later (WBINVD) let the caches write back whatever they hold.
 *
 * flush = 0 (`alias`) skips the flush that set_memory_decrypted() does before
 * clearing the C-bit, whatever CPUID says: dirty lines written through the
 * C=1 mapping stay in the cache, tagged with the guest's key. A CLFLUSH
 * through the C=0 mapping names the other alias and misses them; WBINVD then
 * writes them back, encrypted, over the new data. Without HwEnforcedCacheCoh
 * every line is lost (64 of 64); with it, the CPU writes back and drops the
 * C=1 lines as soon as the page is used through C=0, and none is.
 * flush = 1 (`alias-flush`) flushes through the C=1 mapping first, as Linux
 * does: nothing is lost anywhere.
 */
static void workload_alias(const char *name, uint64_t gpa, int flush)
{
	volatile uint8_t *page = (volatile uint8_t *)gpa;

	if (!sev_active()) {
		/* Without SEV there is one mapping, not two: nothing to show. */
		say("%s needs SEV", name);
		return;
	}
	fill_pattern(page, ALIAS_OLD);		/* through C=1: dirty private lines */
	set_page_decrypted(gpa, flush);		/* C=1 -> C=0, flushed only if flush */
	fill_pattern(page, ALIAS_NEW);		/* through C=0 */
	clflush_page(gpa);			/* the new data to DRAM, for a device */
	wbinvd();				/* later: every cache written back */
	say("%s %u of %u lines lost", name, lines_not_holding(page, ALIAS_NEW),
	    (unsigned)LINES_PER_PAGE);
}

/* --- pf, gp: exceptions that the handler reports and resumes from --------- */

static void expect_fault(const char *name, uint64_t addr, uint64_t vector)
{
	volatile struct boot_info *bi = BOOT_INFO;

	bi->last_vector = ~0ULL;
	uint64_t v = probe_read8(addr);
	if (v == ~0ULL && bi->last_vector == vector && (vector != 14 || bi->last_cr2 == addr))
		say("%s ok", name);
	else
		say("%s FAILED", name);
}

/*
 * msr-gp: RDMSR of an MSR no one implements raises #GP. Without SEV-ES the
 * hypervisor injects it; under SEV-ES the RDMSR raises #VC, the hypervisor
 * answers "raise #GP" in the GHCB, and sev_es.c raises it as if the RDMSR had.
 * (QEMU's TCG reads 0 instead.)
 */
static void workload_msr_gp(void)
{
	volatile struct boot_info *bi = BOOT_INFO;

	bi->last_vector = ~0ULL;
	uint64_t v = probe_rdmsr(UNKNOWN_MSR);
	if (v == ~0ULL && bi->last_vector == 13)
		say("msr-gp ok");
	else
		say("msr-gp: no #GP, RDMSR 0x%x read 0x%lx", UNKNOWN_MSR, v);
}

/* --- selfmod: code written as data, then run -------------------------------- */

typedef uint32_t (*selfmod_fn)(void);

static void workload_selfmod(void)
{
	/* mov $1, %eax (B8 imm32); ret (C3) */
	static const uint8_t code[] = { 0xB8, 0x01, 0x00, 0x00, 0x00, 0xC3 };
	volatile uint8_t *buf = (volatile uint8_t *)SELFMOD_GPA;
	selfmod_fn fn = (selfmod_fn)(uintptr_t)SELFMOD_GPA;

	for (size_t i = 0; i < sizeof(code); i++)
		buf[i] = code[i];
	uint32_t first = fn();
	/* x86 notices stores to code it is about to run; no flush is needed
	 * on the same CPU (AMD64 APM vol. 2, 7.6.1 "Self-modifying code"). */
	buf[1] = 0x02;
	uint32_t second = fn();
	say("selfmod %u %u", first, second);
}

/* --- loads: 8-byte loads at pseudo-random addresses ------------------------ */

/*
 * q[i] = i over the LOADS_BYTES at LOADS_GPA, then `rounds` times: count
 * random loads there, print their sum, and (when more than one round is
 * asked for, as a benchmark does) yield, so the host can time its own
 * baseline between two rounds.
 */
static void workload_loads(uint64_t count, uint64_t rounds)
{
	volatile uint64_t *q = (volatile uint64_t *)LOADS_GPA;

	for (uint64_t i = 0; i < LOADS_BYTES / 8; i++)
		q[i] = i;
	for (uint64_t r = 0; r < rounds; r++) {
		say("loads %lx", load_loop(LOADS_GPA, LOADS_BYTES, count));
		if (rounds > 1)
			yield_to_host();
	}
}

/*
 * fill: write every 8-byte word of the RAM above the I/O area and below 4 GiB
 * (q[i] = i, mem_loop with no rounds), so that every page of a large guest
 * holds data it wrote: what a migration benchmark moves. Under SEV all of it
 * is private, i.e. ciphertext in DRAM. (Run it before `disk`, whose swiotlb
 * pool sits at the top of this range.)
 */
static void workload_fill(void)
{
	uint64_t ram = fw_cfg_present() ? fw_cfg_read_int(FW_CFG_RAM_SIZE, 8) : MIN_RAM;
	uint64_t top = ram > PC_LOWMEM_LIMIT ? PC_LOWMEM : ram;
	uint64_t bytes = top > IO_AREA_END ? top - IO_AREA_END : 0;

	mem_loop(IO_AREA_END, bytes, 0);
	say("filled %lu MiB", bytes >> 20);
}

/* --- cpuid: the price of one intercepted instruction ------------------------ */

/*
 * n CPUIDs of leaf 0. Each is intercepted by the hypervisor: an exit under
 * SEV; under SEV-ES a #VC, the handler's GHCB request and a VMGEXIT. A
 * benchmark times the loop in both.
 */
static void workload_cpuid(uint64_t n)
{
	uint32_t a, b, c, d, sum = 0;

	for (uint64_t i = 0; i < n; i++) {
		cpuid(0, &a, &b, &c, &d);
		sum += a;
	}
	say("cpuid %lu, max leaf sum %x", n, sum);
}

/* --- the workload list ------------------------------------------------------ */

/* Decimal digits only, at least one, no overflow. */
static int parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (~0ULL - 9) / 10)
			return 0;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return 1;
}

static int streq(const char *a, const char *b)
{
	return strlen(a) == strlen(b) && memcmp(a, b, strlen(a)) == 0;
}

static int starts_with(const char *s, const char *prefix)
{
	return strlen(s) >= strlen(prefix) && memcmp(s, prefix, strlen(prefix)) == 0;
}

/* "N" or "N:R" (R defaults to 1). */
static int parse_count_rounds(char *s, uint64_t *n, uint64_t *rounds)
{
	char *colon = s;

	while (*colon && *colon != ':')
		colon++;
	*rounds = 1;
	if (*colon) {
		*colon = '\0';
		if (!parse_u64(colon + 1, rounds) || *rounds == 0)
			return 0;
	}
	return parse_u64(s, n);
}

static void run_workload(char *w)
{
	uint64_t n, rounds;

	if (streq(w, "secret")) {
		workload_secret("");
	} else if (starts_with(w, "secret:")) {
		workload_secret(w + 7);
	} else if (streq(w, "dma")) {
		workload_dma();
	} else if (streq(w, "aps")) {
		workload_aps();
	} else if (streq(w, "picture")) {
		workload_picture();
	} else if (streq(w, "alias")) {
		workload_alias("alias", ALIAS_GPA, 0);
	} else if (streq(w, "alias-flush")) {
		workload_alias("alias-flush", ALIAS_FLUSH_GPA, 1);
	} else if (streq(w, "pf")) {
		/* 4 GiB: just above the identity map, so no PDPT entry maps it. */
		expect_fault("pf", 0x100000000ULL, 14);
	} else if (streq(w, "gp")) {
		/* Bits 63:48 are not copies of bit 47: a non-canonical address. */
		expect_fault("gp", 0x8000000000000000ULL, 13);
	} else if (streq(w, "msr-gp")) {
		workload_msr_gp();
	} else if (streq(w, "balance")) {
		workload_balance();
	} else if (streq(w, "flags")) {
		workload_flags();
	} else if (streq(w, "inbox")) {
		workload_inbox();
	} else if (streq(w, "selfmod")) {
		workload_selfmod();
	} else if (streq(w, "spin")) {
		say("spinning");
		/* Never exits to the hypervisor: only a timer can take the CPU back. */
		for (;;)
			__asm__ volatile("1: jmp 1b");
	} else if (starts_with(w, "disk:")) {
		workload_disk(w);
	} else if (starts_with(w, "cpuid:") && parse_u64(w + 6, &n)) {
		workload_cpuid(n);
	} else if (starts_with(w, "alu:") && parse_u64(w + 4, &n)) {
		say("alu %lx", alu_loop(n));
	} else if (starts_with(w, "mem:") && parse_u64(w + 4, &n)) {
		say("mem %lx", mem_loop(MEM_LOOP_GPA, MEM_LOOP_BYTES, n));
	} else if (starts_with(w, "loads:") && parse_count_rounds(w + 6, &n, &rounds)) {
		workload_loads(n, rounds);
	} else if (streq(w, "fill")) {
		workload_fill();
	} else if (streq(w, "count")) {
		workload_count(0);
	} else if (starts_with(w, "count:") && parse_u64(w + 6, &n) && n) {
		workload_count(n);
	} else if (streq(w, "hmac-selftest")) {
		hmac_sha256_rfc4231();
	} else {
		say("unknown workload %s", w);
	}
}

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * Mask every line of both 8259 PICs (OCW1). A BIOS programs the PICs before
 * it enables interrupts; this firmware never programs them and has no
 * handlers for device interrupts (its IDT holds the exception vectors and
 * the two of smpboot.c), so it masks them all, once, before any `sti`
 * (yield_to_host): whatever state the PICs are in after reset, no device
 * interrupt can reach an exception stub. On sevsim no device raises
 * interrupts, and the hypervisor ignores these two writes. It is done here,
 * not in entry32.S, because under SEV-ES an OUT needs the GHCB.
 */
static void pic_mask_all(void)
{
	outb(PIC1_DATA, 0xFF);
	outb(PIC2_DATA, 0xFF);
}

noreturn void main(void)
{
	char list[WORKLOAD_MAX];

	pic_mask_all();
	serial_init();
	say("booting");

	if (sev_active())
		say("SEV active, C-bit %u, SEV_STATUS 0x%lx%s", BOOT_INFO->cbit,
		    BOOT_INFO->sev_status, sev_es_active() ? " (SEV-ES)" : "");
	else
		say("SEV not active");

	say(sha256_self_test() ? "sha256 self-test ok" : "sha256 self-test failed");

	fw_cfg_init();
	uint64_t ram = fw_cfg_present() ? fw_cfg_read_int(FW_CFG_RAM_SIZE, 8) : 0;
	if (ram && ram < MIN_RAM) {
		say("%lu MiB of RAM: the guest needs at least %u MiB", ram >> 20, MIN_RAM >> 20);
		halt_forever();
	}
	/* A refused kernel: nothing may run. */
	if (!launch_checks())
		halt_forever();

	if (fw_cfg_read_file(WORKLOAD_FILE, list, sizeof(list)) < 0)
		memcpy(list, "secret", sizeof("secret"));
	say("workload %s", list);

	/* Split the list in place at white space and run each word. */
	for (char *p = list; *p;) {
		while (is_space(*p))
			p++;
		if (!*p)
			break;
		char *word = p;
		while (*p && !is_space(*p))
			p++;
		if (*p)
			*p++ = '\0';
		run_workload(word);
	}

	if (sev_es_active())
		sev_es_report();
	say("done");
	halt_forever();
}
