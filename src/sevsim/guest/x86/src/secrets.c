/* SPDX-License-Identifier: MIT */
/*
 * secrets.c - the launch secrets the guest owner injected (LAUNCH_SECRET).
 *
 * Read next to Linux's drivers/virt/coco/efi_secret/efi_secret.c, which reads
 * the same table from the area OVMF reserves for it. The owner builds a
 * secret table (sevctl secret build, sevsim owner secret), encrypts it with
 * its transport key, and the PSP decrypts it into this guest's private memory
 * at the secret area the footer table names. Only this guest can read it.
 *
 *   secret table: GUID 1e74f542-71dd-4d66-963e-ef4287ff173b | u32 length |
 *                 entries: GUID | u32 length | the secret
 *
 * Before an injection the area holds whatever the guest's key makes of
 * untouched memory, so the table's GUID does not match: no secrets.
 * Never print a secret or copy it to shared memory.
 */
#include "guest.h"

/* 4c2eb361-7d9b-4cc3-8081-127c90d3d294: the footer-table entry of the area */
static const guid_t sev_secret_area_guid =
	GUID_INIT(0x4c2eb361, 0x7d9b, 0x4cc3, 0x80, 0x81, 0x12, 0x7c, 0x90, 0xd3, 0xd2, 0x94);
/* 1e74f542-71dd-4d66-963e-ef4287ff173b: the secret table's header */
static const guid_t secret_table_guid =
	GUID_INIT(0x1e74f542, 0x71dd, 0x4d66, 0x96, 0x3e, 0xef, 0x42, 0x87, 0xff, 0x17, 0x3b);

#define SECRET_LEN_SIZE	4		/* the secret table's lengths are u32 */

/* The secret area (from the footer table), or NULL if this image has none. */
const uint8_t *sev_secret_area(uint32_t *size)
{
	uint32_t base;

	if (!ovmf_area(&sev_secret_area_guid, &base, size))
		return NULL;
	return (const uint8_t *)(uintptr_t)base;
}

/* Secret i of the table: 1 and its GUID, data and length, or 0 past the last
 * one (or when no secret was injected). */
int sev_secret_next(int i, const uint8_t **guid, const uint8_t **data, uint32_t *len)
{
	uint32_t size;
	const uint8_t *area = sev_secret_area(&size);

	if (!area)
		return 0;
	return guid_table_entry(area, size, &secret_table_guid, SECRET_LEN_SIZE, i,
				guid, data, len);
}

/* The secret tagged guid: 1 and its data and length, or 0 if there is none. */
int sev_secret_find(const uint8_t guid[16], const uint8_t **data, uint32_t *len)
{
	const uint8_t *g;

	for (int i = 0; sev_secret_next(i, &g, data, len); i++)
		if (memcmp(g, guid, GUID_SIZE) == 0)
			return 1;
	return 0;
}
