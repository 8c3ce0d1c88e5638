/* SPDX-License-Identifier: MIT */
/*
 * sha256.c - SHA-256 as specified in FIPS 180-4 (same as 180-2 for SHA-256),
 * and HMAC-SHA256 on top of it, written for reading rather than speed.
 */
#include "guest.h"

/* The first 32 bits of the fractional parts of the cube roots of the first
 * 64 primes (FIPS 180-4, 4.2.2). */
static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, unsigned int n)
{
	return (x >> n) | (x << (32 - n));
}

/* One 64-byte block into the state h[8] (FIPS 180-4, 6.2.2). */
static void sha256_block(uint32_t h[8], const uint8_t *p)
{
	uint32_t w[64];

	for (int t = 0; t < 16; t++)	/* the message is big-endian */
		w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
		       (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
	for (int t = 16; t < 64; t++) {
		uint32_t s0 = ror(w[t - 15], 7) ^ ror(w[t - 15], 18) ^ (w[t - 15] >> 3);
		uint32_t s1 = ror(w[t - 2], 17) ^ ror(w[t - 2], 19) ^ (w[t - 2] >> 10);
		w[t] = w[t - 16] + s0 + w[t - 7] + s1;
	}

	uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
	uint32_t e = h[4], f = h[5], g = h[6], k = h[7];

	for (int t = 0; t < 64; t++) {
		uint32_t S1 = ror(e, 6) ^ ror(e, 11) ^ ror(e, 25);
		uint32_t ch = (e & f) ^ (~e & g);
		uint32_t t1 = k + S1 + ch + K[t] + w[t];
		uint32_t S0 = ror(a, 2) ^ ror(a, 13) ^ ror(a, 22);
		uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
		uint32_t t2 = S0 + maj;

		k = g;
		g = f;
		f = e;
		e = d + t1;
		d = c;
		c = b;
		b = a;
		a = t1 + t2;
	}
	h[0] += a; h[1] += b; h[2] += c; h[3] += d;
	h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

void sha256_init(struct sha256_ctx *ctx)
{
	/* Initial hash value: the fractional parts of the square roots of the
	 * first 8 primes (FIPS 180-4, 5.3.3). */
	static const uint32_t h0[8] = {
		0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
		0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
	};

	memcpy(ctx->h, h0, sizeof(h0));
	ctx->len = 0;
}

/* More message: whole blocks go through at once, the rest waits in ctx->buf. */
void sha256_update(struct sha256_ctx *ctx, const void *data, size_t len)
{
	const uint8_t *p = data;
	size_t fill = ctx->len % SHA256_BLOCK_SIZE;

	ctx->len += len;
	if (fill) {
		size_t n = SHA256_BLOCK_SIZE - fill < len ? SHA256_BLOCK_SIZE - fill : len;
		memcpy(ctx->buf + fill, p, n);
		p += n;
		len -= n;
		if (fill + n < SHA256_BLOCK_SIZE)
			return;
		sha256_block(ctx->h, ctx->buf);
	}
	for (; len >= SHA256_BLOCK_SIZE; len -= SHA256_BLOCK_SIZE, p += SHA256_BLOCK_SIZE)
		sha256_block(ctx->h, p);
	memcpy(ctx->buf, p, len);
}

void sha256_final(struct sha256_ctx *ctx, uint8_t digest[SHA256_DIGEST_SIZE])
{
	size_t left = ctx->len % SHA256_BLOCK_SIZE;
	uint64_t bits = ctx->len * 8;
	uint8_t last[2 * SHA256_BLOCK_SIZE];

	/* Padding (5.1.1): the rest, a 1 bit, zeros, and the length in bits as
	 * a big-endian 64-bit number, filling one or two final blocks. */
	size_t n = left < 56 ? SHA256_BLOCK_SIZE : 2 * SHA256_BLOCK_SIZE;
	memset(last, 0, sizeof(last));
	memcpy(last, ctx->buf, left);
	last[left] = 0x80;
	for (int i = 0; i < 8; i++)
		last[n - 1 - i] = (uint8_t)(bits >> (8 * i));
	for (size_t off = 0; off < n; off += SHA256_BLOCK_SIZE)
		sha256_block(ctx->h, last + off);

	for (int i = 0; i < 8; i++) {
		digest[4 * i] = (uint8_t)(ctx->h[i] >> 24);
		digest[4 * i + 1] = (uint8_t)(ctx->h[i] >> 16);
		digest[4 * i + 2] = (uint8_t)(ctx->h[i] >> 8);
		digest[4 * i + 3] = (uint8_t)ctx->h[i];
	}
	memset(ctx, 0, sizeof(*ctx));	/* it may have held a key (HMAC) */
}

void sha256(const void *data, size_t len, uint8_t digest[SHA256_DIGEST_SIZE])
{
	struct sha256_ctx ctx;

	sha256_init(&ctx);
	sha256_update(&ctx, data, len);
	sha256_final(&ctx, digest);
}

/*
 * HMAC-SHA256 (RFC 2104, FIPS 198-1):
 *   H((K ^ opad) | H((K ^ ipad) | message)),  ipad = 0x36.., opad = 0x5c..
 * with K the key zero-padded to one block, or first hashed if it is longer.
 */
void hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
		 uint8_t mac[SHA256_DIGEST_SIZE])
{
	uint8_t k[SHA256_BLOCK_SIZE], pad[SHA256_BLOCK_SIZE], inner[SHA256_DIGEST_SIZE];
	struct sha256_ctx ctx;

	memset(k, 0, sizeof(k));
	if (key_len > SHA256_BLOCK_SIZE)
		sha256(key, key_len, k);
	else
		memcpy(k, key, key_len);

	for (int i = 0; i < SHA256_BLOCK_SIZE; i++)
		pad[i] = k[i] ^ 0x36;
	sha256_init(&ctx);
	sha256_update(&ctx, pad, sizeof(pad));
	sha256_update(&ctx, msg, msg_len);
	sha256_final(&ctx, inner);

	for (int i = 0; i < SHA256_BLOCK_SIZE; i++)
		pad[i] = k[i] ^ 0x5c;
	sha256_init(&ctx);
	sha256_update(&ctx, pad, sizeof(pad));
	sha256_update(&ctx, inner, sizeof(inner));
	sha256_final(&ctx, mac);

	/* The key stays in private memory: still, leave no copy on the stack. */
	memset(k, 0, sizeof(k));
	memset(pad, 0, sizeof(pad));
}

/* The "abc" example of FIPS 180-2, appendix B.1. Returns 1 if it matches. */
int sha256_self_test(void)
{
	static const uint8_t expected[SHA256_DIGEST_SIZE] = {
		0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde,
		0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c,
		0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
	};
	uint8_t digest[SHA256_DIGEST_SIZE];

	sha256("abc", 3, digest);
	return memcmp(digest, expected, sizeof(digest)) == 0;
}

static void hmac_case(unsigned int n, const void *key, size_t key_len, const void *msg,
		      size_t msg_len)
{
	uint8_t mac[SHA256_DIGEST_SIZE];
	char hex[2 * SHA256_DIGEST_SIZE + 1];

	hmac_sha256(key, key_len, msg, msg_len, mac);
	hex_string(hex, mac, sizeof(mac));
	say("hmac-sha256 rfc4231 case %u %s", n, hex);
}

/*
 * The `hmac-selftest` workload: HMAC-SHA256 of the inputs of RFC 4231's test
 * cases 1-4, 6 and 7 (5 truncates its output), printed so that a test can
 * compare them with the RFC. 6 and 7 have keys longer than a block.
 */
void hmac_sha256_rfc4231(void)
{
	uint8_t key[131], data[50];

	memset(key, 0x0b, 20);
	hmac_case(1, key, 20, "Hi There", 8);
	hmac_case(2, "Jefe", 4, "what do ya want for nothing?", 28);
	memset(key, 0xaa, 20);
	memset(data, 0xdd, 50);
	hmac_case(3, key, 20, data, 50);
	for (int i = 0; i < 25; i++)
		key[i] = (uint8_t)(i + 1);
	memset(data, 0xcd, 50);
	hmac_case(4, key, 25, data, 50);
	memset(key, 0xaa, 131);
	hmac_case(6, key, 131, "Test Using Larger Than Block-Size Key - Hash Key First", 54);
	hmac_case(7, key, 131,
		  "This is a test using a larger than block-size key and a larger than "
		  "block-size data. The key needs to be hashed before being used by the "
		  "HMAC algorithm.", 152);
}
