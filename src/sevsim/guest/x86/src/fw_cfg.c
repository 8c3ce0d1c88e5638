/* SPDX-License-Identifier: MIT */
/*
 * fw_cfg.c - QEMU's firmware configuration device: the traditional I/O
 * interface, and DMA through a bounce buffer shared with the hypervisor.
 *
 * Read next to QEMU's docs/specs/fw_cfg.rst, Linux's
 * drivers/firmware/qemu_fw_cfg.c and OVMF's OvmfPkg/Library/QemuFwCfgLib
 * (QemuFwCfgLib.c, QemuFwCfgDxe.c: the SEV bounce buffer).
 *
 * Traditional interface: a 16-bit write of a selector to port 0x510 picks an
 * item; each byte read from port 0x511 returns its next byte. Port I/O is
 * never encrypted, but it costs one exit per byte.
 *
 * DMA interface: the guest writes a descriptor, struct FWCfgDmaAccess
 * (be32 control, be32 length, be64 address), and the descriptor's address,
 * big-endian, to port 0x514 (high half) and 0x518 (low half: go). The device
 * reads the descriptor and writes the data straight into guest memory, and
 * clears the control word when done. Under SEV the device can only reach
 * pages the guest has shared: like OVMF, the descriptor and the data go
 * through a bounce buffer made shared once (FW_CFG_DMA_GPA, C-bit clear), and
 * the data is copied from there into private memory before anything uses it.
 * Both interfaces share the selected item and its offset.
 */
#include "guest.h"

#define FW_CFG_PORT_SEL		0x510
#define FW_CFG_PORT_DATA	0x511
#define FW_CFG_PORT_DMA		0x514	/* be32 address 63:32; +4: be32 address 31:0 */
#define FW_CFG_SIGNATURE	0x0000	/* reads "QEMU" */
#define FW_CFG_ID		0x0001	/* u32 feature bits */
#define FW_CFG_VERSION_DMA	(1 << 1)	/* ... bit 1: the DMA interface */
#define FW_CFG_FILE_DIR		0x0019	/* the file directory */
#define FW_CFG_MAX_FILES	4096	/* sanity bound on the directory */

/* FWCfgDmaAccess.control bits */
#define FW_CFG_DMA_CTL_ERROR	(1 << 0)
#define FW_CFG_DMA_CTL_READ	(1 << 1)

struct fw_cfg_dma_access {		/* every field big-endian */
	uint32_t control;
	uint32_t length;
	uint64_t address;
};

/* The bounce buffer: the descriptor in its first page, the data after it. */
#define FW_CFG_DMA_DATA_GPA	(FW_CFG_DMA_GPA + PAGE_SIZE)
#define FW_CFG_DMA_DATA_SIZE	((FW_CFG_DMA_PAGES - 1) * PAGE_SIZE)

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int fw_cfg_present(void)
{
	uint8_t sig[4];

	fw_cfg_select(FW_CFG_SIGNATURE);
	for (int i = 0; i < 4; i++)
		sig[i] = inb(FW_CFG_PORT_DATA);
	return memcmp(sig, "QEMU", 4) == 0;
}

/*
 * Use DMA if the device offers it. Under SEV first share the bounce buffer,
 * page by page, as set_memory_decrypted() would (once: its pages stay shared).
 * Without SEV the device reaches all of memory and nothing needs sharing.
 */
void fw_cfg_init(void)
{
	uint32_t id = 0;

	BOOT_INFO->fw_cfg_dma = 0;
	if (!fw_cfg_present())
		return;
	fw_cfg_select(FW_CFG_ID);
	for (int i = 0; i < 4; i++)
		id |= (uint32_t)inb(FW_CFG_PORT_DATA) << (8 * i);
	if (!(id & FW_CFG_VERSION_DMA))
		return;
	if (sev_active())
		for (int i = 0; i < FW_CFG_DMA_PAGES; i++)
			set_page_decrypted(FW_CFG_DMA_GPA + (uint64_t)i * PAGE_SIZE,
					   enc_cache_flush_required());
	BOOT_INFO->fw_cfg_dma = 1;
}

void fw_cfg_select(uint16_t key)
{
	outw(FW_CFG_PORT_SEL, key);
}

/* One DMA read of n bytes of the selected item into the bounce buffer. */
static int fw_cfg_dma_read(uint32_t n)
{
	volatile struct fw_cfg_dma_access *access = (void *)FW_CFG_DMA_GPA;
	uint64_t gpa = FW_CFG_DMA_GPA;
	uint32_t control;

	access->control = __builtin_bswap32(FW_CFG_DMA_CTL_READ);
	access->length = __builtin_bswap32(n);
	access->address = __builtin_bswap64(FW_CFG_DMA_DATA_GPA);
	/* The descriptor must be in memory before the device looks (a compiler
	 * barrier: x86 keeps stores in order, and OUT waits for them). */
	__asm__ volatile("" : : : "memory");
	outl(FW_CFG_PORT_DMA, __builtin_bswap32((uint32_t)(gpa >> 32)));
	outl(FW_CFG_PORT_DMA + 4, __builtin_bswap32((uint32_t)gpa));
	/* QEMU finishes the transfer before the OUT returns; poll as the
	 * specification asks anyway. */
	do
		control = __builtin_bswap32(access->control);
	while (control & ~FW_CFG_DMA_CTL_ERROR);
	return control & FW_CFG_DMA_CTL_ERROR ? -1 : 0;
}

/*
 * The next len bytes of the selected item, into buf (private memory): by DMA
 * in chunks through the bounce buffer, or byte by byte from the data port.
 * Returns 0, or -1 if the device reported an error (buf is then zeroed).
 */
int fw_cfg_read(void *buf, uint32_t len)
{
	uint8_t *out = buf;

	if (!BOOT_INFO->fw_cfg_dma) {
		while (len--)
			*out++ = inb(FW_CFG_PORT_DATA);
		return 0;
	}
	while (len) {
		uint32_t n = len < FW_CFG_DMA_DATA_SIZE ? len : FW_CFG_DMA_DATA_SIZE;

		if (fw_cfg_dma_read(n) < 0) {
			memset(out, 0, len);
			return -1;
		}
		/* Out of the shared buffer, into ours: from here on the
		 * hypervisor cannot change what we use. */
		memcpy(out, (const void *)FW_CFG_DMA_DATA_GPA, n);
		out += n;
		len -= n;
	}
	return 0;
}

/* A little-endian integer item of size bytes (4 or 8): RAM size, kernel size, ... */
uint64_t fw_cfg_read_int(uint16_t key, uint32_t size)
{
	uint64_t v = 0;

	fw_cfg_select(key);
	fw_cfg_read(&v, size);
	return v;
}

/* The selector and size of the fw_cfg file called name; 0 if there is none. */
int fw_cfg_find_file(const char *name, uint16_t *key, uint32_t *size)
{
	uint8_t count_be[4];
	/* struct FWCfgFile: be32 size, be16 select, be16 reserved, char name[56] */
	struct {
		uint8_t size[4];
		uint8_t select[2];
		uint8_t reserved[2];
		char name[56];
	} file;
	size_t name_len = strlen(name);

	if (name_len >= sizeof(file.name) || !fw_cfg_present())
		return 0;
	fw_cfg_select(FW_CFG_FILE_DIR);
	if (fw_cfg_read(count_be, sizeof(count_be)) < 0)
		return 0;
	uint32_t count = be32(count_be);
	if (count > FW_CFG_MAX_FILES)
		return 0;
	for (uint32_t i = 0; i < count; i++) {
		if (fw_cfg_read(&file, sizeof(file)) < 0)
			return 0;
		if (memcmp(file.name, name, name_len + 1) == 0) {
			*key = (uint16_t)(file.select[0] << 8 | file.select[1]);
			*size = be32(file.size);
			return 1;
		}
	}
	return 0;
}

int fw_cfg_read_file(const char *name, char *buf, size_t size)
{
	uint16_t key;
	uint32_t len;

	if (!fw_cfg_find_file(name, &key, &len))
		return -1;
	if (len > size - 1)
		len = (uint32_t)(size - 1);
	fw_cfg_select(key);
	if (fw_cfg_read(buf, len) < 0)
		return -1;
	buf[len] = '\0';
	return (int)len;
}
