/* SPDX-License-Identifier: MIT */
/*
 * xts.c - AES-256-XTS (IEEE 1619, NIST SP 800-38E), the mode dm-crypt uses
 * for disks, on top of aesni.S.
 *
 * Read next to Linux's crypto/xts.c and include/crypto/gf128mul.h
 * (gf128mul_x_ble).
 *
 * A 64-byte key is two AES-256 keys: the first encrypts the data, the second
 * the tweak. A data unit (here one 4 KiB block of the disk) is encrypted
 * with the tweak T = AES(key2, its sector number as a 16-byte little-endian
 * number), dm-crypt's "plain64" IV; then its j-th 16-byte block P becomes
 *     C = AES(key1, P ^ T_j) ^ T_j,   T_0 = T,   T_j+1 = T_j * x
 * where "* x" is multiplication by x in GF(2^128) with the bytes read
 * little-endian (the modulus x^128 + x^7 + x^2 + x + 1 gives the 0x87).
 * So one plaintext block encrypts differently at every place on the disk,
 * yet a sector can be read or written on its own.
 */
#include "guest.h"

int aesni_supported(void)
{
	uint32_t a, b, c, d;

	cpuid(1, &a, &b, &c, &d);
	return (c >> 25) & 1;		/* CPUID.01H:ECX bit 25 = AES */
}

void xts_setkey(struct xts_ctx *ctx, const uint8_t key[64])
{
	uint8_t unused[AES256_ROUND_KEYS * 16];

	aesni_expand_key256(key, ctx->enc1, ctx->dec1);
	aesni_expand_key256(key + 32, ctx->enc2, unused);
	memset(unused, 0, sizeof(unused));
}

static void xor16(uint8_t *dst, const uint8_t *t)
{
	for (int i = 0; i < 16; i++)
		dst[i] ^= t[i];
}

/* t = t * x in GF(2^128), little-endian byte order (gf128mul_x_ble). */
static void gf128mul_x_ble(uint8_t t[16])
{
	uint64_t lo, hi;

	memcpy(&lo, t, 8);
	memcpy(&hi, t + 8, 8);
	uint64_t carry = hi >> 63;
	hi = hi << 1 | lo >> 63;
	lo = lo << 1 ^ (carry ? 0x87 : 0);
	memcpy(t, &lo, 8);
	memcpy(t + 8, &hi, 8);
}

void xts_crypt(const struct xts_ctx *ctx, uint8_t *buf, size_t len, uint64_t sector, int enc)
{
	uint8_t t[16];

	memset(t, 0, sizeof(t));
	memcpy(t, &sector, 8);			/* plain64: the sector, little-endian */
	aesni_encrypt(ctx->enc2, t);
	for (size_t off = 0; off + 16 <= len; off += 16) {
		xor16(buf + off, t);
		if (enc)
			aesni_encrypt(ctx->enc1, buf + off);
		else
			aesni_decrypt(ctx->dec1, buf + off);
		xor16(buf + off, t);
		gf128mul_x_ble(t);
	}
}
