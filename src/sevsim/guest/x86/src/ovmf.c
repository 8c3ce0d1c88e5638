/* SPDX-License-Identifier: MIT */
/*
 * ovmf.c - reading the firmware's own OVMF footer table (ovmf_table.S) and
 * the GUID-tagged tables found in the areas it names.
 *
 * Read next to OVMF's OvmfPkg/Library/PlatformInitLib (the SEV areas come
 * from PCDs there) and QEMU's hw/i386/pc_sysfw_ovmf.c
 * (pc_system_ovmf_table_find), which walks the same table from the host.
 */
#include "guest.h"

/* 96b582de-1fb2-45f7-baea-a366c55a082d: the footer's own GUID */
static const guid_t ovmf_table_footer_guid =
	GUID_INIT(0x96b582de, 0x1fb2, 0x45f7, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d);

#define OVMF_TRAILER	(2 + GUID_SIZE)		/* u16 size | GUID after each entry */

static uint32_t get_le(const uint8_t *p, unsigned int n)
{
	uint32_t v = 0;

	while (n--)
		v = v << 8 | p[n];
	return v;
}

/*
 * The data of the footer-table entry tagged guid, and its length; NULL if the
 * table has no such entry or is malformed. The table ends at OVMF_TABLE_END,
 * in this image's flash: the same bytes the VMM and the guest owner read.
 */
const uint8_t *ovmf_table_find(const guid_t *guid, uint32_t *len)
{
	const uint8_t *end = (const uint8_t *)OVMF_TABLE_END;
	const uint8_t *footer = end - OVMF_TRAILER;

	if (!guid_equal(&ovmf_table_footer_guid, footer + 2))
		return NULL;
	uint32_t size = get_le(footer, 2);
	if (size < OVMF_TRAILER || size > PAGE_SIZE)
		return NULL;
	const uint8_t *start = end - size;

	/* Entries lie before the footer's trailer, each ending with its own. */
	for (const uint8_t *pos = footer; pos > start;) {
		if (pos - OVMF_TRAILER < start)
			return NULL;
		uint32_t entry = get_le(pos - OVMF_TRAILER, 2);
		if (entry < OVMF_TRAILER || pos - entry < start)
			return NULL;
		if (guid_equal(guid, pos - GUID_SIZE)) {
			*len = entry - OVMF_TRAILER;
			return pos - entry;
		}
		pos -= entry;
	}
	return NULL;
}

/* An entry whose data is u32 base | u32 size: an area of guest RAM. */
int ovmf_area(const guid_t *guid, uint32_t *base, uint32_t *size)
{
	uint32_t len;
	const uint8_t *data = ovmf_table_find(guid, &len);

	if (!data || len < 8)
		return 0;
	*base = get_le(data, 4);
	*size = get_le(data + 4, 4);
	return 1;
}

/*
 * Entry i of a GUID-tagged table, as QEMU builds the SEV hashes table and the
 * guest owner the secret table: the table is one entry (header GUID, length,
 * data) whose data are its entries, each GUID | length | data. The length is
 * len_size bytes (2 in the hashes table, 4 in the secret table), little-endian,
 * and counts the whole entry. Returns 1 and the entry's GUID and data, or 0
 * past the last entry or when the table is not there or is malformed.
 */
int guid_table_entry(const uint8_t *table, uint32_t size, const guid_t *table_guid,
		     unsigned int len_size, int i,
		     const uint8_t **guid, const uint8_t **data, uint32_t *len)
{
	uint32_t header = GUID_SIZE + len_size;

	if (size < header || !guid_equal(table_guid, table))
		return 0;
	uint32_t total = get_le(table + GUID_SIZE, len_size);
	if (total < header || total > size)
		return 0;

	for (uint32_t pos = header; pos + header <= total; i--) {
		uint32_t entry = get_le(table + pos + GUID_SIZE, len_size);
		if (entry < header || entry > total - pos)
			return 0;
		if (i == 0) {
			*guid = table + pos;
			*data = table + pos + header;
			*len = entry - header;
			return 1;
		}
		pos += entry;
	}
	return 0;
}

/* A GUID as text, 8-4-4-4-12 lowercase hex digits (the first three fields
 * are stored little-endian). out holds 37 bytes. */
void guid_string(char *out, const uint8_t *g)
{
	static const uint8_t order[GUID_SIZE] = {
		3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15,
	};
	int n = 0;

	for (int i = 0; i < GUID_SIZE; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			out[n++] = '-';
		hex_string(out + n, &g[order[i]], 1);
		n += 2;
	}
	out[n] = '\0';
}
