/* SPDX-License-Identifier: MIT */
/*
 * guest.h - what the C files of the sevsim guest firmware share.
 */
#ifndef SEVSIM_GUEST_H
#define SEVSIM_GUEST_H

/*
 * The code is position-independent (-fpie) and every symbol is hidden, so the
 * compiler reaches code and constants RIP-relative, with no GOT: the firmware
 * runs at 0xFFFFxxxx, where the small code model's sign-extended 32-bit
 * absolute addresses cannot point. Linux's arch/x86/boot/compressed does the
 * same (its hidden.h). RAM is reached through fixed addresses (layout.h).
 */
#pragma GCC visibility push(hidden)

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#define noreturn __attribute__((noreturn))

/* --- Port I/O and privileged instructions ------------------------------- */
static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (uint64_t)hi << 32 | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

/* VMGEXIT (SEV-ES): REP VMMCALL, F3 0F 01 D9. An exit the guest asks for; the
 * hypervisor reads this CPU's GHCB MSR to learn what it wants. */
static inline void vmgexit(void)
{
	__asm__ volatile("rep; vmmcall" : : : "memory");
}

static inline uint64_t read_cr2(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static inline uint64_t read_cr3(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

static inline void write_cr3(uint64_t v)
{
	__asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory");
}

static inline void invlpg(uint64_t va)
{
	__asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
}

static inline void clflush(uint64_t va)
{
	__asm__ volatile("clflush (%0)" : : "r"(va) : "memory");
}

/* Write back and invalidate every line of every cache. */
static inline void wbinvd(void)
{
	__asm__ volatile("wbinvd" : : : "memory");
}

static inline noreturn void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* --- serial.c: the console on COM1 ------------------------------------- */
void serial_init(void);
void serial_putc(char c);
/* One console line: "sevsim-guest: " + fmt + "\n". A tiny printf: %s %c %u %x,
 * with 'l' for 64-bit values (%lu, %lx). */
void say(const char *fmt, ...);
/* Writes len bytes as 2*len lowercase hex digits and a NUL into out. */
void hex_string(char *out, const uint8_t *data, size_t len);

/* --- string.c ---------------------------------------------------------- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* --- sha256.c ----------------------------------------------------------- */
#define SHA256_DIGEST_SIZE 32
#define SHA256_BLOCK_SIZE 64
struct sha256_ctx {			/* a hash in progress */
	uint32_t h[8];
	uint64_t len;			/* bytes so far */
	uint8_t buf[SHA256_BLOCK_SIZE];	/* the part of a block not hashed yet */
};
void sha256_init(struct sha256_ctx *ctx);
void sha256_update(struct sha256_ctx *ctx, const void *data, size_t len);
void sha256_final(struct sha256_ctx *ctx, uint8_t digest[SHA256_DIGEST_SIZE]);
void sha256(const void *data, size_t len, uint8_t digest[SHA256_DIGEST_SIZE]);
void hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
		 uint8_t mac[SHA256_DIGEST_SIZE]);
void hmac_sha256_rfc4231(void);		/* the `hmac-selftest` workload */
int sha256_self_test(void);

/* --- GUIDs, in EFI's byte order (Linux's guid_t, include/linux/uuid.h) ----- */
#define GUID_SIZE 16
typedef struct {
	uint8_t b[GUID_SIZE];
} guid_t;
/* a-b-c-d0d1-d2..d7 as written; the first three fields are stored little-endian. */
#define GUID_INIT(a, b, c, d0, d1, d2, d3, d4, d5, d6, d7)			\
	((guid_t){ { (a) & 0xff, ((a) >> 8) & 0xff, ((a) >> 16) & 0xff,		\
		     ((a) >> 24) & 0xff, (b) & 0xff, ((b) >> 8) & 0xff,		\
		     (c) & 0xff, ((c) >> 8) & 0xff,					\
		     (d0), (d1), (d2), (d3), (d4), (d5), (d6), (d7) } })

static inline int guid_equal(const guid_t *guid, const void *bytes)
{
	return memcmp(guid->b, bytes, GUID_SIZE) == 0;
}

/* --- ovmf.c: the footer table of ovmf_table.S, GUID-tagged tables ------- */
const uint8_t *ovmf_table_find(const guid_t *guid, uint32_t *len);
int ovmf_area(const guid_t *guid, uint32_t *base, uint32_t *size);
int guid_table_entry(const uint8_t *table, uint32_t size, const guid_t *table_guid,
		     unsigned int len_size, int i,
		     const uint8_t **guid, const uint8_t **data, uint32_t *len);
void guid_string(char *out, const uint8_t *guid);	/* 37 bytes: 8-4-4-4-12 + NUL */

/* --- secrets.c: the launch secrets (LAUNCH_SECRET) ----------------------- */
const uint8_t *sev_secret_area(uint32_t *size);	/* NULL: this image has none */
int sev_secret_next(int i, const uint8_t **guid, const uint8_t **data, uint32_t *len);
int sev_secret_find(const uint8_t guid[16], const uint8_t **data, uint32_t *len);

/* --- fw_cfg.c ----------------------------------------------------------- */
/* fw_cfg item keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h) */
#define FW_CFG_RAM_SIZE		0x03	/* u64 */
#define FW_CFG_KERNEL_SIZE	0x08	/* u32 */
#define FW_CFG_INITRD_SIZE	0x0b	/* u32 */
#define FW_CFG_KERNEL_DATA	0x11
#define FW_CFG_INITRD_DATA	0x12
#define FW_CFG_CMDLINE_SIZE	0x14	/* u32, the terminating NUL included */
#define FW_CFG_CMDLINE_DATA	0x15
int fw_cfg_present(void);
void fw_cfg_init(void);			/* DMA if offered: shares the bounce buffer under SEV */
void fw_cfg_select(uint16_t key);
int fw_cfg_read(void *buf, uint32_t len);	/* next bytes of the selected item; -1: error */
uint64_t fw_cfg_read_int(uint16_t key, uint32_t size);
int fw_cfg_find_file(const char *name, uint16_t *key, uint32_t *size);
/* Reads the fw_cfg file `name` into buf (NUL-terminated); returns its length,
 * or -1 if there is no fw_cfg device or no such file. */
int fw_cfg_read_file(const char *name, char *buf, size_t size);
/* Reads the first n bytes of the fw_cfg item `key`; -1 if there is no fw_cfg. */
int fw_cfg_read_item(uint16_t key, void *buf, size_t n);

/* --- rdrand.c ----------------------------------------------------------- */
int rdrand_supported(void);		/* CPUID.01H:ECX.RDRAND */
int rdrand64(uint64_t *v);		/* 1 if *v is random, 0 if RDRAND gave none */
uint64_t rdrand64_or_halt(void);	/* says "rdrand failed" and halts without one */

/* --- mem_encrypt.c ------------------------------------------------------ */
int sev_active(void);
/* The PTE of the 4 KiB page at gpa in SPLIT_REGION_GPA's 2 MiB region,
 * splitting the region's large page first if no one has yet. */
volatile uint64_t *split_large_page(uint64_t gpa);
int enc_cache_flush_required(void);
void clflush_page(uint64_t va);
void set_memory_decrypted(uint64_t addr, uint64_t numpages);
void set_memory_encrypted(uint64_t addr, uint64_t numpages);
/* Both of the above, the cache flush first only if flush. */
void __set_memory_enc_pgtable(uint64_t addr, uint64_t numpages, int enc, int flush);
void set_page_decrypted(uint64_t gpa, int flush);

void early_set_page_decrypted(uint64_t gpa);	/* no hypercall: for a GHCB */

/* --- sev_es.c: SEV-ES, the #VC handler and the GHCB ---------------------- */
int sev_es_active(void);
void sev_es_setup_ghcb(void);		/* the BSP's, from entry64.S */
void sev_es_prepare_ap_ghcbs(unsigned int cpus);
void sev_es_ap_setup_ghcb(uint32_t apic_id);
noreturn void sev_es_terminate(unsigned int set, unsigned int reason);
void sev_es_report(void);		/* the #VC counts, on the console */

/* --- swiotlb.c: bounce buffers in shared memory ------------------------- */
#define IO_TLB_SHIFT	11
#define IO_TLB_SIZE	(1 << IO_TLB_SHIFT)	/* a 2 KiB slot */
#define IO_TLB_SEGSIZE	128			/* slots no mapping crosses */
#define IO_TLB_MAX_MAPPING (IO_TLB_SIZE * IO_TLB_SEGSIZE)	/* 256 KiB */
enum dma_data_direction { DMA_BIDIRECTIONAL = 0, DMA_TO_DEVICE = 1, DMA_FROM_DEVICE = 2 };
/* Sets the pool up, once; 0 (and says why) if it cannot. */
int swiotlb_init(void);
/* The bus address of pool slots holding a copy of size bytes at orig, or 0
 * if the pool has no room for them now. */
uint64_t swiotlb_map(uint64_t orig, uint64_t size, enum dma_data_direction dir);
/* Copies back what the device may have written (dir), frees the slots. */
void swiotlb_unmap(uint64_t tlb_addr, uint64_t orig, uint64_t size, enum dma_data_direction dir);
/* Says why the last swiotlb_map() failed, as Linux words it, after prefix. */
void swiotlb_report_full(const char *prefix);
void memcpy_fast(void *dst, const void *src, size_t n);

/* --- virtio_blk.c: the virtio block driver ------------------------------ */
int virtblk_probe(void);			/* 1 if a usable device is there */
/* n bytes (a multiple of 512) between the disk at sector and buf; 1 if ok. */
int virtblk_write(uint64_t sector, uint64_t buf, uint64_t n);
int virtblk_read(uint64_t sector, uint64_t buf, uint64_t n);
uint64_t virtblk_capacity(void);		/* in 512-byte sectors */
uint64_t virtblk_requests(void);
uint64_t virtblk_notifies(void);

/* --- aesni.S, xts.c: AES-256-XTS with AES-NI --------------------------- */
#define AES256_ROUND_KEYS 15
int aesni_supported(void);			/* CPUID.01H:ECX.AES */
void sse_enable(void);				/* CR0.EM = 0, CR4.OSFXSR = 1 */
void aesni_expand_key256(const uint8_t key[32], uint8_t enc[AES256_ROUND_KEYS * 16],
			 uint8_t dec[AES256_ROUND_KEYS * 16]);
void aesni_encrypt(const uint8_t *round_keys, uint8_t block[16]);
void aesni_decrypt(const uint8_t *round_keys, uint8_t block[16]);
struct xts_ctx {
	uint8_t enc1[AES256_ROUND_KEYS * 16];	/* data key, encryption schedule */
	uint8_t dec1[AES256_ROUND_KEYS * 16];	/* data key, decryption schedule */
	uint8_t enc2[AES256_ROUND_KEYS * 16];	/* tweak key (only ever encrypts) */
};
void xts_setkey(struct xts_ctx *ctx, const uint8_t key[64]);
/* One data unit of len bytes (a multiple of 16) in place; tweak = sector. */
void xts_crypt(const struct xts_ctx *ctx, uint8_t *buf, size_t len, uint64_t sector, int enc);

/* --- disk.c -------------------------------------------------------------- */
void workload_disk(const char *word);

/* --- exceptions.c ------------------------------------------------------- */
struct trap_frame {			/* as built by entry64.S */
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error_code;	/* pushed by the stub */
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};
void exception_handler(struct trap_frame *f);
void vc_handler(struct trap_frame *f);		/* sev_es.c: #VC */

/* --- workloads.S -------------------------------------------------------- */
uint64_t alu_loop(uint64_t n);
uint64_t mem_loop(uint64_t base, uint64_t bytes, uint64_t rounds);
uint64_t load_loop(uint64_t base, uint64_t bytes, uint64_t count);
uint64_t probe_read8(uint64_t addr);	/* ~0 if the read faulted */
uint64_t probe_rdmsr(uint32_t msr);	/* ~0 if the RDMSR faulted */
void yield_to_host(void);		/* sti; hlt; cli, with the registers cleared */

/* --- victims.c ---------------------------------------------------------- */
void workload_balance(void);
void workload_flags(void);
void workload_inbox(void);

/* --- smpboot.c, picture.c: the kernel's workloads ------------------------ */
void workload_aps(void);
noreturn void ap_main(uint32_t apic_id);
void workload_picture(void);

/* --- launch.c: measured direct boot, launch secrets ---------------------- */
int launch_checks(void);		/* 0: the kernel was refused, run nothing */
const char *kernel_cmdline(void);	/* the verified command line, or "" */

/* --- count.c ------------------------------------------------------------ */
void workload_count(uint64_t limit);	/* 0: count forever */

/* --- main.c ------------------------------------------------------------- */
#define DMA_CHECK_BYTES 64	/* `dma` hashes this much of the secret's page */
void secret_ensure(void);	/* runs `secret` unless it ran in this boot */
noreturn void main(void);

#endif
