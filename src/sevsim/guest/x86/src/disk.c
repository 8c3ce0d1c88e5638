/* SPDX-License-Identifier: MIT */
/*
 * disk.c - the `disk` workload: write a known pattern to the virtio disk
 * through the bounce buffers, read it back, compare; optionally encrypt the
 * disk as dm-crypt does, and keep integrity tags as dm-integrity does.
 *
 *   disk:<MiB>[:<seed>[:write|:auth]]
 *
 * The pattern: the first 512-byte sector holds the line
 *   "sevsim guest disk, seed <seed>: written by the guest through its bounce buffers\n"
 * padded with NULs; the rest is the byte stream of Python's
 * random.Random(<seed>).randbytes(), i.e. MT19937 seeded with
 * init_by_array(<seed> as 32-bit words), each output a little-endian u32.
 * Anyone can recompute it without this code.
 *
 * Disk encryption: when the owner injected a 64-byte launch secret under
 * DISK_KEY_GUID, every 4 KiB block is encrypted with AES-256-XTS before it
 * leaves private memory, as dm-crypt's aes-xts-plain64 with sector_size
 * 4096: the tweak is the 512-byte sector number of the block. The bounce
 * buffers, the device and the disk file then hold only ciphertext.
 *
 * Integrity (`auth`, with the disk key): XTS hides the data but a changed
 * block just decrypts to garbage. With `auth` each 4 KiB block also gets an
 * HMAC-SHA256 tag over its number (u64, little-endian) and its contents as
 * written, under the key HMAC-SHA256(disk key, "sevsim disk integrity"); the
 * tags follow the data on the disk, as dm-integrity keeps its own metadata.
 * Reading back, every block is checked before it is used.
 *
 * The data moves in chunks of DISK_CHUNK bytes through the private buffer
 * at DISK_BUFFER_GPA; the read-back is compared with the pattern made again
 * in DISK_EXPECT_GPA.
 */
#include "guest.h"

#define SECTOR_SIZE	512
#define XTS_BLOCK	4096		/* dm-crypt's sector_size, and a tag's block */
#define TAG_SIZE	SHA256_DIGEST_SIZE
#define MIB		(1ULL << 20)
#define DISK_MAX_MIB	(1ULL << 20)	/* a sanity bound on the workload's size */

/* 5e4f6a3c-9b1d-4c2e-8f7a-0d3b2c1e4a5f: sevsim's own GUID for the disk key
 * in the launch secret table (docs/devices.md). */
static const guid_t disk_key_guid =
	GUID_INIT(0x5e4f6a3c, 0x9b1d, 0x4c2e, 0x8f, 0x7a, 0x0d, 0x3b, 0x2c, 0x1e, 0x4a, 0x5f);

/* MT19937 (Matsumoto and Nishimura), as CPython's Modules/_randommodule.c
 * runs it. */
#define MT_N		624
#define MT_M		397
#define MATRIX_A	0x9908b0dfU
#define UPPER_MASK	0x80000000U
#define LOWER_MASK	0x7fffffffU

/* Private state, at DISK_STATE_GPA. */
struct disk_state {
	uint32_t mt[MT_N];
	uint32_t mti;
	struct xts_ctx xts;
	uint8_t mac_key[TAG_SIZE];
	uint8_t tag_msg[8 + XTS_BLOCK];	/* a tag's message: block number, block */
};
#define DISK	((struct disk_state *)DISK_STATE_GPA)
_Static_assert(sizeof(struct disk_state) <= 0x3000, "the state fits below DISK_TAGS_GPA");
_Static_assert(DISK_STATE_GPA + 0x3000 <= DISK_TAGS_GPA, "layout");

/* --- the pattern ------------------------------------------------------------ */

static void init_genrand(struct disk_state *d, uint32_t s)
{
	d->mt[0] = s;
	for (uint32_t i = 1; i < MT_N; i++)
		d->mt[i] = 1812433253U * (d->mt[i - 1] ^ (d->mt[i - 1] >> 30)) + i;
	d->mti = MT_N;
}

/* CPython's random_seed() for an int: init_by_array() with its absolute
 * value as 32-bit words, least significant first. */
static void pattern_seed(struct disk_state *d, uint64_t seed)
{
	uint32_t key[2] = { (uint32_t)seed, (uint32_t)(seed >> 32) };
	uint32_t key_length = key[1] ? 2 : 1;
	uint32_t i = 1, j = 0, k;

	init_genrand(d, 19650218U);
	for (k = MT_N > key_length ? MT_N : key_length; k; k--) {
		d->mt[i] = (d->mt[i] ^ ((d->mt[i - 1] ^ (d->mt[i - 1] >> 30)) * 1664525U)) +
			   key[j] + j;
		i++;
		j++;
		if (i >= MT_N) {
			d->mt[0] = d->mt[MT_N - 1];
			i = 1;
		}
		if (j >= key_length)
			j = 0;
	}
	for (k = MT_N - 1; k; k--) {
		d->mt[i] = (d->mt[i] ^ ((d->mt[i - 1] ^ (d->mt[i - 1] >> 30)) * 1566083941U)) - i;
		i++;
		if (i >= MT_N) {
			d->mt[0] = d->mt[MT_N - 1];
			i = 1;
		}
	}
	d->mt[0] = 0x80000000U;		/* a non-zero initial state */
}

static uint32_t genrand_uint32(struct disk_state *d)
{
	uint32_t y;

	if (d->mti >= MT_N) {		/* the next 624 words at once */
		int kk;
		for (kk = 0; kk < MT_N - MT_M; kk++) {
			y = (d->mt[kk] & UPPER_MASK) | (d->mt[kk + 1] & LOWER_MASK);
			d->mt[kk] = d->mt[kk + MT_M] ^ (y >> 1) ^ (y & 1 ? MATRIX_A : 0);
		}
		for (; kk < MT_N - 1; kk++) {
			y = (d->mt[kk] & UPPER_MASK) | (d->mt[kk + 1] & LOWER_MASK);
			d->mt[kk] = d->mt[kk + (MT_M - MT_N)] ^ (y >> 1) ^ (y & 1 ? MATRIX_A : 0);
		}
		y = (d->mt[MT_N - 1] & UPPER_MASK) | (d->mt[0] & LOWER_MASK);
		d->mt[MT_N - 1] = d->mt[MT_M - 1] ^ (y >> 1) ^ (y & 1 ? MATRIX_A : 0);
		d->mti = 0;
	}
	y = d->mt[d->mti++];
	y ^= y >> 11;			/* tempering */
	y ^= (y << 7) & 0x9d2c5680U;
	y ^= (y << 15) & 0xefc60000U;
	y ^= y >> 18;
	return y;
}

/* Decimal digits of v at out; returns how many. */
static size_t put_decimal(char *out, uint64_t v)
{
	char digits[20];
	size_t n = 0, len = 0;

	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		out[len++] = digits[--n];
	return len;
}

/*
 * The pattern's bytes [off, off + n) into buf. Calls go in order from
 * off = 0 (after pattern_seed), in multiples of 4 bytes: the stream is the
 * generator's, not random access.
 */
static void pattern_fill(struct disk_state *d, uint8_t *buf, uint64_t off, uint64_t n,
			 uint64_t seed)
{
	uint64_t pos = 0;

	if (off == 0) {
		static const char head[] = "sevsim guest disk, seed ";
		static const char tail[] = ": written by the guest through its bounce buffers\n";
		size_t len = 0;

		memset(buf, 0, SECTOR_SIZE);
		memcpy(buf, head, sizeof(head) - 1);
		len = sizeof(head) - 1;
		len += put_decimal((char *)buf + len, seed);
		memcpy(buf + len, tail, sizeof(tail) - 1);
		pos = SECTOR_SIZE;
	}
	for (uint32_t *w = (uint32_t *)(buf + pos); pos < n; pos += 4)
		*w++ = genrand_uint32(d);
}

/* --- integrity tags --------------------------------------------------------- */

static void block_tag(struct disk_state *d, uint64_t block, const uint8_t *data,
		      uint8_t tag[TAG_SIZE])
{
	memcpy(d->tag_msg, &block, 8);
	memcpy_fast(d->tag_msg + 8, data, XTS_BLOCK);
	hmac_sha256(d->mac_key, sizeof(d->mac_key), d->tag_msg, sizeof(d->tag_msg), tag);
}

/* Compare without an early exit, so the time taken says nothing of where a
 * forged tag first differs (crypto_memneq). */
static int tag_equal(const uint8_t *a, const uint8_t *b)
{
	uint8_t diff = 0;

	for (int i = 0; i < TAG_SIZE; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* --- the workload ------------------------------------------------------------- */

enum disk_mode { MODE_ROUND_TRIP, MODE_WRITE, MODE_AUTH };

/* disk:<MiB>[:<seed>[:write|:auth]]; 0 if the word is not that. */
static int parse(const char *word, uint64_t *mib, uint64_t *seed, enum disk_mode *mode)
{
	const char *p = word + 5;		/* after "disk:" */
	uint64_t v;

	*seed = 1;
	*mode = MODE_ROUND_TRIP;
	if (*p < '0' || *p > '9')
		return 0;
	for (v = 0; *p >= '0' && *p <= '9'; p++)
		if ((v = v * 10 + (uint64_t)(*p - '0')) > DISK_MAX_MIB)
			return 0;
	*mib = v;
	if (!*p)
		return v > 0;
	if (*p++ != ':')
		return 0;
	if (*p >= '0' && *p <= '9') {
		for (v = 0; *p >= '0' && *p <= '9'; p++) {
			if (v > (~0ULL - 9) / 10)
				return 0;
			v = v * 10 + (uint64_t)(*p - '0');
		}
		*seed = v;
	}
	if (!*p)
		return *mib > 0;
	if (*p++ != ':')
		return 0;
	if (memcmp(p, "write", 6) == 0)
		*mode = MODE_WRITE;
	else if (memcmp(p, "auth", 5) == 0)
		*mode = MODE_AUTH;
	else
		return 0;
	return *mib > 0;
}

static void xts_chunk(struct disk_state *d, uint8_t *buf, uint64_t off, uint64_t n, int enc)
{
	for (uint64_t b = 0; b < n; b += XTS_BLOCK)
		xts_crypt(&d->xts, buf + b, XTS_BLOCK, (off + b) / SECTOR_SIZE, enc);
}

/* The pattern to the disk (encrypted and tagged as asked); 1 if written. */
static int write_pattern(struct disk_state *d, uint64_t size, uint64_t seed, int key,
			 int auth)
{
	uint8_t *buf = (uint8_t *)DISK_BUFFER_GPA;
	uint8_t *tags = (uint8_t *)DISK_TAGS_GPA;

	pattern_seed(d, seed);
	for (uint64_t off = 0; off < size; off += DISK_CHUNK) {
		uint64_t n = size - off < DISK_CHUNK ? size - off : DISK_CHUNK;

		pattern_fill(d, buf, off, n, seed);
		if (key)
			xts_chunk(d, buf, off, n, 1);
		if (auth)
			for (uint64_t b = 0; b < n; b += XTS_BLOCK)
				block_tag(d, (off + b) / XTS_BLOCK, buf + b,
					  tags + (off + b) / XTS_BLOCK * TAG_SIZE);
		if (!virtblk_write(off / SECTOR_SIZE, (uint64_t)buf, n))
			return 0;
	}
	if (auth) {
		uint64_t len = size / XTS_BLOCK * TAG_SIZE;
		len = (len + SECTOR_SIZE - 1) & ~(uint64_t)(SECTOR_SIZE - 1);
		return virtblk_write(size / SECTOR_SIZE, (uint64_t)tags, len);
	}
	return 1;
}

/* Read the disk back, check the tags, decrypt, compare with the pattern. */
static int read_back(struct disk_state *d, uint64_t size, uint64_t seed, int key, int auth)
{
	uint8_t *buf = (uint8_t *)DISK_BUFFER_GPA;
	uint8_t *expect = (uint8_t *)DISK_EXPECT_GPA;
	uint8_t *tags = (uint8_t *)DISK_TAGS_GPA;
	uint8_t tag[TAG_SIZE];
	uint64_t bad = 0, first_bad = 0, differ = ~0ULL;

	if (auth) {
		uint64_t len = size / XTS_BLOCK * TAG_SIZE;
		len = (len + SECTOR_SIZE - 1) & ~(uint64_t)(SECTOR_SIZE - 1);
		if (!virtblk_read(size / SECTOR_SIZE, (uint64_t)tags, len))
			return 0;
	}
	pattern_seed(d, seed);
	for (uint64_t off = 0; off < size; off += DISK_CHUNK) {
		uint64_t n = size - off < DISK_CHUNK ? size - off : DISK_CHUNK;

		if (!virtblk_read(off / SECTOR_SIZE, (uint64_t)buf, n))
			return 0;
		for (uint64_t b = 0; auth && b < n; b += XTS_BLOCK) {
			uint64_t block = (off + b) / XTS_BLOCK;

			block_tag(d, block, buf + b, tag);
			if (!tag_equal(tag, tags + block * TAG_SIZE) && !bad++)
				first_bad = block;
		}
		if (bad)
			continue;	/* nothing of a refused disk is used */
		if (key)
			xts_chunk(d, buf, off, n, 0);
		pattern_fill(d, expect, off, n, seed);
		for (uint64_t i = 0; differ == ~0ULL && i < n; i += 8)
			if (*(uint64_t *)(buf + i) != *(uint64_t *)(expect + i))
				differ = off + i;
	}
	if (bad) {
		say("disk: integrity check failed for %lu block(s), first at sector %lu: "
		    "the data is refused", bad, first_bad * (XTS_BLOCK / SECTOR_SIZE));
		return 0;
	}
	if (differ == ~0ULL)
		say("disk: read %lu MiB back, matches what was written", size / MIB);
	else
		say("disk: read %lu MiB back, DOES NOT MATCH (from byte 0x%lx on)",
		    size / MIB, differ & ~7ULL);
	return differ == ~0ULL;
}

void workload_disk(const char *word)
{
	struct disk_state *d = DISK;
	uint64_t mib, seed, size;
	enum disk_mode mode;
	const uint8_t *key = NULL;
	uint32_t key_len = 0;

	if (!parse(word, &mib, &seed, &mode)) {
		say("disk: expected disk:<MiB>[:<seed>[:write|:auth]], not %s", word);
		return;
	}
	size = mib * MIB;
	if (sev_secret_find(disk_key_guid.b, &key, &key_len) && key_len != 64) {
		say("disk: the disk key must be 64 bytes (AES-256-XTS), not %u", key_len);
		return;
	}
	if (mode == MODE_AUTH && !key) {
		say("disk: integrity tags need the disk key (a launch secret)");
		return;
	}
	if (mode == MODE_AUTH && size / XTS_BLOCK * TAG_SIZE > DISK_TAGS_BYTES) {
		say("disk: integrity tags for at most %u MiB",
		    (unsigned)(DISK_TAGS_BYTES / TAG_SIZE * XTS_BLOCK / MIB));
		return;
	}
	if (key && !aesni_supported()) {
		say("disk: no AES-NI (CPUID.01H:ECX.AES): cannot encrypt the disk");
		return;
	}
	if (sev_active() && !swiotlb_init())
		return;
	if (!virtblk_probe())
		return;
	uint64_t need = size + (mode == MODE_AUTH ? size / XTS_BLOCK * TAG_SIZE : 0);
	if (need > virtblk_capacity() * SECTOR_SIZE) {
		say("disk: %lu MiB do not fit the disk (%lu sectors)", mib, virtblk_capacity());
		return;
	}
	if (key) {
		static const char label[] = "sevsim disk integrity";
		sse_enable();
		xts_setkey(&d->xts, key);
		hmac_sha256(key, key_len, label, sizeof(label) - 1, d->mac_key);
	}

	const char *how = !key ? "in the clear" :
			  mode == MODE_AUTH ? "AES-XTS encrypted, with integrity tags" :
					      "AES-XTS encrypted";
	say("disk: writing %lu MiB to vda (%s)", mib, how);
	if (write_pattern(d, size, seed, key != NULL, mode == MODE_AUTH)) {
		say("disk: wrote %lu MiB to vda (%s) with %lu requests, %lu notifies", mib, how,
		    virtblk_requests(), virtblk_notifies());
		if (mode != MODE_WRITE)
			read_back(d, size, seed, key != NULL, mode == MODE_AUTH);
	} else {
		say("disk: writing vda failed");
	}
	/* The key schedules are key material: do not leave them behind. */
	memset(&d->xts, 0, sizeof(d->xts));
	memset(d->mac_key, 0, sizeof(d->mac_key));
}
