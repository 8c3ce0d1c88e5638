/* SPDX-License-Identifier: MIT */
/*
 * fw_cfg.c - QEMU's firmware configuration device, traditional I/O interface.
 *
 * Read next to QEMU's docs/specs/fw_cfg.rst and Linux's
 * drivers/firmware/qemu_fw_cfg.c. A 16-bit write of a selector to port 0x510
 * picks an item; each byte read from port 0x511 returns its next byte.
 * (The DMA interface is avoided on purpose: under SEV a DMA buffer would have
 * to be a shared page first, while port I/O is never encrypted.)
 */
#include "guest.h"

#define FW_CFG_PORT_SEL		0x510
#define FW_CFG_PORT_DATA	0x511
#define FW_CFG_SIGNATURE	0x0000	/* reads "QEMU" */
#define FW_CFG_FILE_DIR		0x0019	/* the file directory */
#define FW_CFG_MAX_FILES	4096	/* sanity bound on the directory */

static void fw_cfg_select(uint16_t key)
{
	outw(FW_CFG_PORT_SEL, key);
}

static void fw_cfg_read(void *buf, size_t n)
{
	uint8_t *p = buf;

	while (n--)
		*p++ = inb(FW_CFG_PORT_DATA);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int fw_cfg_present(void)
{
	uint8_t sig[4];

	fw_cfg_select(FW_CFG_SIGNATURE);
	fw_cfg_read(sig, sizeof(sig));
	return memcmp(sig, "QEMU", 4) == 0;
}

int fw_cfg_read_item(uint16_t key, void *buf, size_t n)
{
	if (!fw_cfg_present())
		return -1;
	fw_cfg_select(key);
	fw_cfg_read(buf, n);
	return 0;
}

int fw_cfg_read_file(const char *name, char *buf, size_t size)
{
	uint8_t sig[4], count_be[4];
	/* struct FWCfgFile: be32 size, be16 select, be16 reserved, char name[56] */
	struct {
		uint8_t size[4];
		uint8_t select[2];
		uint8_t reserved[2];
		char name[56];
	} file;
	size_t name_len = strlen(name);

	if (name_len >= sizeof(file.name))
		return -1;

	fw_cfg_select(FW_CFG_SIGNATURE);
	fw_cfg_read(sig, sizeof(sig));
	if (memcmp(sig, "QEMU", 4) != 0)
		return -1;		/* no fw_cfg device here */

	fw_cfg_select(FW_CFG_FILE_DIR);
	fw_cfg_read(count_be, sizeof(count_be));
	uint32_t count = be32(count_be);
	if (count > FW_CFG_MAX_FILES)
		return -1;

	for (uint32_t i = 0; i < count; i++) {
		fw_cfg_read(&file, sizeof(file));
		if (memcmp(file.name, name, name_len + 1) != 0)
			continue;

		uint32_t len = be32(file.size);
		if (len > size - 1)
			len = (uint32_t)(size - 1);
		fw_cfg_select((uint16_t)(file.select[0] << 8 | file.select[1]));
		fw_cfg_read(buf, len);
		buf[len] = '\0';
		return (int)len;
	}
	return -1;
}
