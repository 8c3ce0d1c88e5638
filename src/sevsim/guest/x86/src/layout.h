/* SPDX-License-Identifier: MIT */
/*
 * layout.h - every fixed address of the sevsim guest firmware, in one place.
 *
 * Included by the assembly (.S, through the C preprocessor) and by the C files,
 * so only plain numbers and macros live outside the __ASSEMBLER__ guard.
 *
 * "GPA" is a guest-physical address. Until paging is on, and afterwards through
 * the identity map, a guest-virtual address equals its GPA.
 */
#ifndef SEVSIM_GUEST_LAYOUT_H
#define SEVSIM_GUEST_LAYOUT_H

/* --- The image: a flat 64 KiB flash image that ends at 4 GiB. ----------- */
#define IMAGE_SIZE      0x10000
#define IMAGE_BASE      0xFFFF0000      /* 4 GiB - IMAGE_SIZE */
#define RESET_VECTOR    0xFFFFFFF0      /* where every x86 CPU fetches first */
#define TEXT16_BASE     0xFFFFEF00      /* real-mode code + GDT, below the last page */
#define OVMF_TABLE_PAGE 0xFFFFF000      /* the last page: the OVMF footer table ... */
#define OVMF_TABLE_END  0xFFFFFFE0      /* ... which ends 32 bytes below 4 GiB */

/* --- Segment selectors (index * 8) of the GDT in reset16.S. ------------- */
#define CODE32_SEL      0x08            /* flat 32-bit code */
#define DATA_SEL        0x10            /* flat 32-bit data (also used in long mode) */
#define CODE64_SEL      0x18            /* 64-bit code (L=1) */

/* --- RAM (all private, i.e. encrypted, when SEV is active). ------------ */
#define TRAMPOLINE_GPA  0x8000          /* the APs' real-mode start (trampoline.S), < 4 KiB */
#define SIPI_VECTOR     (TRAMPOLINE_GPA >> 12) /* STARTUP IPI vector: CS = 0x0800, IP = 0 */
#define BOOT_INFO_GPA   0x9000          /* struct boot_info, below */
#define PML4_GPA        0x10000         /* page-map level 4 */
#define PDPT_GPA        0x11000         /* page-directory-pointer table */
#define PD_GPA          0x12000         /* 4 page directories, 0x12000-0x15FFF */
#define PD_COUNT        4               /* 4 x 1 GiB = the first 4 GiB */
#define SPLIT_PT_GPA    0x16000         /* 4 KiB page table made when a 2 MiB page is split */
#define IDT_GPA         0x17000         /* interrupt descriptor table (vectors 0-31) */
#define IDT_VECTORS     32              /* the exceptions' gates (vectors 0-31) */
#define WAKEUP_VECTOR   0x20            /* the IPI an AP sends the BSP when it has reported */
#define SPURIOUS_VECTOR 0x21            /* the local APIC's spurious-interrupt vector */
#define IDT_ENTRIES     (SPURIOUS_VECTOR + 1)
#define AP_STACKS_GPA   0x40000         /* AP n's stack: the page at 0x40000 + (n - 1) * 4 KiB */
#define AP_STACK_SHIFT  12              /* AP_STACK_SIZE = 1 << this */
#define AP_STACK_SIZE   (1 << AP_STACK_SHIFT)
#define AP_MAX_CPUS     32              /* APIC IDs 0-31, so the stacks end below 0x60000 */
#define STACK_TOP       0x80000         /* the BSP's stack grows down from here */

#define SPLIT_REGION_GPA 0x200000       /* the 2 MiB page split into SPLIT_PT_GPA's 4 KiB pages */
#define SECRET_GPA      0x200000        /* private page: "sevsim secret:" + 32 random bytes */
#define SHARED_GPA      0x201000        /* page shared with the hypervisor (C-bit clear) */
#define ALIAS_GPA       0x202000        /* `alias`: made shared without a cache flush */
#define ALIAS_FLUSH_GPA 0x203000        /* `alias-flush`: made shared after a cache flush */
/* The attack lab's victims (victims.c): private pages, and one shared page. */
#define BALANCE_GPA     0x204000        /* `balance`: "balance: 100 EUR", then " 40" */
#define FLAGS_GPA       0x205000        /* `flags`: "flag: 0" / "flag: 1", one per key bit */
#define FLAGS_KEY_OFFSET 0x100          /* the key's 16 bits as '0'/'1' at FLAGS_GPA + this */
#define INBOX_BUFFER_GPA 0x206000       /* `inbox`: private copy of the delivered message */
#define SETTING_GPA     0x207000        /* `inbox`: the private setting "role: user" */
#define INBOX_SHARED_GPA 0x208000       /* `inbox`: page shared with the host, its mailbox */
#define INBOX_MESSAGE_SIZE 64           /* bytes copied from the mailbox into the buffer */
/* fw_cfg DMA (fw_cfg.c): under SEV a bounce buffer shared with the hypervisor. */
#define FW_CFG_DMA_GPA  0x210000        /* the descriptor's page, then the data pages */
#define FW_CFG_DMA_PAGES 16             /* 64 KiB: 0x210000-0x21FFFF */
#define COUNT_GPA       0x220000        /* `count`: the counter (private) */
#define COUNT_STATUS_GPA 0x221000       /* `count`: "count N" for the host (shared) */
#define CMDLINE_GPA     0x222000        /* the verified kernel command line (private) */
#define CMDLINE_MAX     PAGE_SIZE       /* bytes kept of it, NUL included */
#define AP_MAILBOX_GPA  0x240000        /* struct ap_mailbox: the BSP and the APs (smpboot.c) */
#define PICTURE_GPA     0x250000        /* `picture`: 16 private pages, 0x250000-0x25FFFF */
/* SEV-ES (sev_es.c): each CPU's GHCB, the page it shares with the hypervisor to
 * ask for what a #VC needs: CPU n (its APIC ID) uses GHCB_GPA + n * 4 KiB. */
#define GHCB_GPA        0x260000        /* 0x260000-0x27FFFF: AP_MAX_CPUS pages */
#define PICTURE_SIZE    256             /* 256 x 256 pixels, one byte each: 64 KiB */
#define PICTURE_BYTES   (PICTURE_SIZE * PICTURE_SIZE)
#define SELFMOD_GPA     0x300000        /* private buffer for the self-modifying-code test */
#define LOADS_GPA       0x340000        /* 256 KiB read at random by `loads` (load_loop()) */
#define LOADS_BYTES     0x40000
#define MEM_LOOP_GPA    0x1000000       /* 8 MiB worked over by mem_loop() */
#define MEM_LOOP_BYTES  0x800000
#define MIN_RAM         0x2000000       /* 32 MiB: the guest needs RAM up to here */
/* QEMU's pc machine: RAM above PC_LOWMEM_LIMIT does not all fit below 4 GiB, and
 * then only the first 3 GiB are there (hw/i386/pc_piix.c). */
#define PC_LOWMEM_LIMIT 0xE0000000ULL
#define PC_LOWMEM       0xC0000000ULL

/*
 * The launch areas the OVMF footer table (ovmf_table.S) names, at the addresses
 * of OVMF's AmdSev build: the VMM writes the measured kernel hashes into the
 * first (QEMU's -kernel with kernel-hashes=on), the guest owner's secret goes
 * into the second (LAUNCH_SECRET). The firmware finds them through the table.
 */
#define SEV_LAUNCH_SECRET_GPA  0x810000 /* OVMF: PcdSevLaunchSecretBase */
#define SEV_LAUNCH_SECRET_SIZE 0xC00
#define QEMU_HASH_TABLE_GPA    0x810C00 /* OVMF: PcdQemuHashTableBase */
#define QEMU_HASH_TABLE_SIZE   0x400

/* Guest I/O (mem_encrypt.c, swiotlb.c, virtio_blk.c, disk.c): README.md, "Disk I/O". */
#define PT_POOL_GPA     0x20000         /* page tables for splitting 2 MiB pages, */
#define PT_POOL_PAGES   32              /* 0x20000-0x3FFFF (SPLIT_PT_GPA stays 0x200000's) */
#define VIRTQ_GPA       0x230000        /* the virtqueue's rings, shared: 0x230000-0x23FFFF */
#define VIRTQ_BYTES     0x10000
#define IO_STATE_GPA    0x1800000       /* private: swiotlb's and the driver's state (a page) */
#define IO_TLB_SLOTS_GPA 0x1801000      /* private: one byte per pool slot, up to 512 KiB */
#define BLK_REQ_GPA     0x1881000       /* private: request headers and status bytes */
#define DISK_STATE_GPA  0x1882000       /* private: the disk workload's state (8 KiB) */
#define DISK_TAGS_GPA   0x1900000       /* private: integrity tags, 1 MiB */
#define DISK_TAGS_BYTES 0x100000
#define DISK_BUFFER_GPA 0x1A00000       /* private: the data going to / coming from the disk */
#define DISK_EXPECT_GPA 0x1E00000       /* private: what the read-back should hold */
#define DISK_CHUNK      0x400000        /* each of the two buffers: 4 MiB */
#define IO_AREA_END     0x2200000       /* the swiotlb pool goes above this */

#define PAGE_SIZE       0x1000
#define LARGE_PAGE_SIZE 0x200000        /* a PDE with PTE_PS */
#define CACHE_LINE_SIZE 64              /* what CLFLUSH works on (CPUID 1 EBX[15:8] * 8) */

#define SECRET_MARKER   "sevsim secret:"
#define SECRET_BYTES    32              /* the random bytes after the marker */
#define SECRET_LABEL_MAX 40             /* `secret:LABEL`: at most this many characters */
#define SHARED_LABEL_OFFSET 56          /* the label in the shared page, after the digest */
#define SHARED_MAGIC    "SEVSIM-SHARED"
#define SETTING_TEXT    "role: user"    /* space-padded to 16 bytes at SETTING_GPA */

/* --- struct boot_info at BOOT_INFO_GPA: byte offsets, for the assembly. -- */
#define BI_SEV_STATUS   0x00    /* u64: SEV_STATUS MSR (0 when not read) */
#define BI_ME_MASK      0x08    /* u64: 1 << C-bit when SEV is active, else 0 */
#define BI_CBIT         0x10    /* u32: C-bit position when SEV is active, else 0 */
#define BI_SEV_CPUID    0x14    /* u32: CPUID 0x8000001F EAX (0 if the leaf is absent) */
#define BI_RESUME_RIP   0x18    /* u64: where the next exception resumes (0 = halt) */
#define BI_LAST_VECTOR  0x20    /* u64: vector of the last exception taken */
#define BI_LAST_ERROR   0x28    /* u64: its error code */
#define BI_LAST_CR2     0x30    /* u64: CR2 when it was taken */
#define BI_FW_CFG_DMA   0x38    /* u32: 1 once fw_cfg.c reads by DMA */
#define BI_PT_POOL_USED 0x3C    /* u32: page tables taken from PT_POOL_GPA */
#define BI_VC_COUNTS    0x40    /* u64[VC_KINDS]: #VC exceptions handled, by kind (below) */
#define BOOT_INFO_SIZE  0x70

/* The kinds of #VC BI_VC_COUNTS counts (sev_es.c; entry32.S counts the first). */
#define VC_MSR_PROTOCOL 0       /* CPUID answered through the GHCB MSR protocol */
#define VC_CPUID        1       /* the others through the GHCB page */
#define VC_IOIO         2
#define VC_MSR          3
#define VC_VMMCALL      4
#define VC_MMIO         5
#define VC_KINDS        6
#define VC_COUNTS_GPA   (BOOT_INFO_GPA + BI_VC_COUNTS)

/* --- Architectural bits (names as in the AMD64 APM). -------------------- */
#define CR0_PE          (1 << 0)        /* protection enable */
#define CR0_WP          (1 << 16)       /* write protect (also in ring 0) */
#define CR0_NW          (1 << 29)       /* not write-through */
#define CR0_CD          (1 << 30)       /* cache disable */
#define CR0_PG          (1 << 31)       /* paging */
#define CR4_PAE         (1 << 5)        /* physical-address extension */
#define CR0_MP          (1 << 1)        /* monitor coprocessor */
#define CR0_EM          (1 << 2)        /* emulation: x87/SSE instructions raise #UD/#NM */
#define CR4_OSFXSR      (1 << 9)        /* the OS saves SSE state: SSE instructions allowed */
#define CR4_OSXMMEXCPT  (1 << 10)       /* the OS handles #XM */

#define MSR_EFER        0xC0000080
#define EFER_LME        (1 << 8)        /* long mode enable */
#define EFER_LMA        (1 << 10)       /* long mode active (read-only: set by CR0.PG) */
#define EFER_NXE        (1 << 11)       /* no-execute enable */
#define MSR_SEV_STATUS  0xC0010131      /* Linux: MSR_AMD64_SEV */
#define UNKNOWN_MSR     0xC0011FFF      /* `msr-gp`: an MSR no one implements */
#define SEV_STATUS_SEV  (1 << 0)        /* bit 0: SEV is active for this guest */
#define SEV_STATUS_SEV_ES (1 << 1)      /* bit 1: SEV-ES: its registers are encrypted too */

/* SEV-ES: the GHCB MSR and its protocol (GHCB specification; Linux's
 * asm/sev-common.h). Request or response code in bits 11:0, data above. */
#define MSR_GHCB        0xC0010130      /* Linux: MSR_AMD64_SEV_ES_GHCB */
#define GHCB_MSR_INFO_MASK 0xFFF
#define GHCB_MSR_SEV_INFO_RESP 0x001    /* max version 63:48, min 47:32, C-bit 31:24 */
#define GHCB_MSR_SEV_INFO_REQ 0x002
#define GHCB_MSR_CPUID_REQ 0x004        /* function 63:32, register 31:30 (EAX..EDX) */
#define GHCB_MSR_CPUID_RESP 0x005       /* the register's value in 63:32 */
#define GHCB_CPUID_REG_SHIFT 30
#define GHCB_MSR_TERM_REQ 0x100         /* reason set 15:12, reason code 23:16 */
#define GHCB_PROTOCOL_VERSION 1         /* the SEV-ES protocol (2 adds SNP's) */
/* A termination request's reason: a set (0 = the GHCB specification's general
 * reasons, 1 = this firmware's) and a code in it. */
#define GHCB_TERM_REASON(set, code) (GHCB_MSR_TERM_REQ | (set) << 12 | (code) << 16)
#define SEV_TERM_SET_GEN 0
#define GHCB_SEV_ES_GEN_REQ 0           /* general termination request */
#define GHCB_SEV_ES_PROT_UNSUPPORTED 1  /* no common protocol version */
#define SEV_TERM_SET_GUEST 1
#define GUEST_TERM_VC_UNSUPPORTED 1     /* a #VC this handler does not emulate */
#define GUEST_TERM_VC_DECODE 2          /* an instruction it cannot decode */
#define GUEST_TERM_HV_ANSWER 3          /* the hypervisor's answer is missing or malformed */
#define VC_VECTOR       29              /* #VC, the VMM communication exception */
#define SVM_EXIT_CPUID  0x72            /* the #VC error code is the SVM exit code */

#define CPUID_SEV_LEAF  0x8000001F      /* AMD memory encryption leaf */
#define SEV_CPUID_SME   (1 << 0)        /* EAX bit 0: SME supported */
#define SEV_CPUID_SEV   (1 << 1)        /* EAX bit 1: SEV supported */
#define SEV_CPUID_COHERENT (1 << 10)    /* EAX bit 10: HwEnforcedCacheCoh */

#define PTE_P           (1 << 0)        /* present */
#define PTE_RW          (1 << 1)        /* writable */
#define PTE_PS          (1 << 7)        /* page size: a 2 MiB page in a PDE */
#define PTE_ADDR_MASK   0x000FFFFFFFFFF000ULL   /* bits 51:12 (the C-bit among them) */

#define KVM_HC_MAP_GPA_RANGE 12         /* include/uapi/linux/kvm_para.h */
#define KVM_MAP_GPA_RANGE_ENCRYPTED (1 << 4)    /* attrs: private; 0 = shared */
#define KVM_MAP_GPA_RANGE_PAGE_SZ_4K 0          /* attrs: in 4 KiB pages */

#define PIC1_DATA       0x21            /* 8259 master: interrupt mask register (OCW1) */
#define PIC2_DATA       0xA1            /* 8259 slave: interrupt mask register (OCW1) */

/* --- struct ap_mailbox at AP_MAILBOX_GPA: byte offsets, for the assembly. -- */
#define AP_MB_CR3       0x00    /* u64: the BSP's CR3 (PML4_GPA | me_mask) */
#define AP_MB_EFER      0x08    /* u64: the BSP's EFER (LME, NXE) */
#define AP_MB_CR4       0x10    /* u32: the BSP's CR4 (PAE) */
#define AP_MB_ONLINE    0x14    /* u32: APs that have reported (LOCK-incremented) */
#define AP_MB_BSP_APIC_ID 0x18  /* u32: where the APs send WAKEUP_VECTOR */
#define AP_MB_SEV_ES    0x1C    /* u32: 1 under SEV-ES (the trampoline asks CPUID via the GHCB MSR) */
#define AP_MB_DIGEST    0x20    /* u8[AP_MAX_CPUS][32]: SHA-256 of the secret, by APIC ID */

/* --- The local APIC (xAPIC, MMIO), as Linux's asm/apicdef.h names it. ---- */
#define MSR_IA32_APICBASE 0x1B          /* where the APIC is, and whether it is on */
#define APICBASE_BSP    (1 << 8)
#define APICBASE_ENABLE (1 << 11)
#define APICBASE_BASE_MASK 0xFFFFF000ULL
#define APIC_BASE       0xFEE00000      /* its MMIO page */
#define APIC_ID         0x020           /* bits 31:24: the APIC ID */
#define APIC_EOI        0x0B0
#define APIC_SPIV       0x0F0           /* spurious-interrupt vector register */
#define APIC_SPIV_APIC_ENABLED (1 << 8) /* software enable */
#define APIC_ICR        0x300           /* interrupt command, low: writing it sends */
#define APIC_ICR2       0x310           /* interrupt command, high: destination in 31:24 */
#define APIC_ICR_BUSY   (1 << 12)       /* delivery status: send pending */
#define APIC_DM_FIXED   (0 << 8)
#define APIC_DM_INIT    (5 << 8)
#define APIC_DM_STARTUP (6 << 8)
#define APIC_INT_ASSERT (1 << 14)
#define APIC_INT_LEVELTRIG (1 << 15)
#define APIC_DEST_ALLBUT (3 << 18)      /* shorthand: all excluding self */

/* --- QEMU's fw_cfg items read by number (docs/specs/fw_cfg.rst). --------- */
#define FW_CFG_NB_CPUS  0x05            /* u16: the number of CPUs */

#ifndef __ASSEMBLER__
#include <stdint.h>

struct boot_info {
	uint64_t sev_status;
	uint64_t me_mask;
	uint32_t cbit;
	uint32_t sev_cpuid_eax;
	uint64_t resume_rip;
	uint64_t last_vector;
	uint64_t last_error;
	uint64_t last_cr2;
	uint32_t fw_cfg_dma;
	uint32_t pt_pool_used;
	uint64_t vc_counts[VC_KINDS];
};

_Static_assert(__builtin_offsetof(struct boot_info, sev_status) == BI_SEV_STATUS, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, me_mask) == BI_ME_MASK, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, cbit) == BI_CBIT, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, sev_cpuid_eax) == BI_SEV_CPUID, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, resume_rip) == BI_RESUME_RIP, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, last_vector) == BI_LAST_VECTOR, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, last_error) == BI_LAST_ERROR, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, last_cr2) == BI_LAST_CR2, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, fw_cfg_dma) == BI_FW_CFG_DMA, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, pt_pool_used) == BI_PT_POOL_USED, "layout");
_Static_assert(__builtin_offsetof(struct boot_info, vc_counts) == BI_VC_COUNTS, "layout");
_Static_assert(sizeof(struct boot_info) <= BOOT_INFO_SIZE, "layout");

struct ap_mailbox {
	uint64_t cr3;
	uint64_t efer;
	uint32_t cr4;
	uint32_t online;
	uint32_t bsp_apic_id;
	uint32_t sev_es;
	uint8_t digest[AP_MAX_CPUS][32];
};

_Static_assert(__builtin_offsetof(struct ap_mailbox, cr3) == AP_MB_CR3, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, efer) == AP_MB_EFER, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, cr4) == AP_MB_CR4, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, online) == AP_MB_ONLINE, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, bsp_apic_id) == AP_MB_BSP_APIC_ID, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, sev_es) == AP_MB_SEV_ES, "layout");
_Static_assert(__builtin_offsetof(struct ap_mailbox, digest) == AP_MB_DIGEST, "layout");
_Static_assert(sizeof(struct ap_mailbox) <= PAGE_SIZE, "layout");

/* The firmware runs from flash, so it has no writable globals: its state lives
 * at fixed RAM addresses, like the temporary RAM of OVMF's SEC phase. */
#define BOOT_INFO ((volatile struct boot_info *)BOOT_INFO_GPA)
#define AP_MAILBOX ((volatile struct ap_mailbox *)AP_MAILBOX_GPA)
#endif

#endif
