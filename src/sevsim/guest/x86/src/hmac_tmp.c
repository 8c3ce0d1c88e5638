/* SPDX-License-Identifier: MIT */
/* TEMPORARY: HMAC-SHA256 until branch fw's sha256.c (hmac_sha256) is merged. */
#include "guest.h"

void hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
		 uint8_t mac[SHA256_DIGEST_SIZE])
{
	uint8_t buf[64 + 8 + 4096];
	uint8_t k[64], inner[SHA256_DIGEST_SIZE];

	memset(k, 0, sizeof(k));
	if (key_len > 64)
		sha256(key, key_len, k);
	else
		memcpy(k, key, key_len);
	for (int i = 0; i < 64; i++)
		buf[i] = k[i] ^ 0x36;
	if (msg_len > sizeof(buf) - 64)
		halt_forever();
	memcpy(buf + 64, msg, msg_len);
	sha256(buf, 64 + msg_len, inner);
	for (int i = 0; i < 64; i++)
		buf[i] = k[i] ^ 0x5c;
	memcpy(buf + 64, inner, 32);
	sha256(buf, 64 + 32, mac);
}
