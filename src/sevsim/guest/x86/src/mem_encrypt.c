/* SPDX-License-Identifier: MIT */
/*
 * mem_encrypt.c - turning private memory into shared memory and back under SEV.
 *
 * Read next to Linux's arch/x86/mm/pat/set_memory.c (set_memory_decrypted,
 * __set_memory_enc_pgtable, cpa_flush, __change_page_attr, split_large_page)
 * and arch/x86/mm/mem_encrypt_amd.c (amd_enc_cache_flush_required,
 * amd_enc_status_change_finish, notify_range_enc_status_changed).
 *
 * A page is private when the guest maps it with the C-bit set: the memory
 * controller then encrypts it with the guest's key, and the hypervisor sees
 * only ciphertext. To share a page (for a message to the host, a DMA bounce
 * buffer, a virtqueue...) the guest clears the C-bit in the page's PTE and
 * tells the hypervisor, which tracks which guest pages are shared.
 *
 * The API:
 *   set_memory_decrypted(addr, numpages)  private -> shared
 *   set_memory_encrypted(addr, numpages)  shared -> private
 *   set_page_decrypted(gpa, flush)        one page, the cache flush optional
 *   early_set_page_decrypted(gpa)         one page, the hypervisor not told (a GHCB)
 *   __set_memory_enc_pgtable(addr, numpages, enc, flush)   what they all do
 *   enc_cache_flush_required()            must the cache be flushed first?
 *   clflush_page(va)                      write back and drop a page's lines
 *   split_large_page(gpa)                 the 4 KiB PTE of gpa, splitting if needed
 *
 * Neither direction keeps the contents: what was written through one mapping
 * reads as garbage through the other (ciphertext, or plaintext decrypted).
 *
 * The cache is why the flush matters. On parts without HwEnforcedCacheCoh it
 * does not keep the two views of a page coherent: the same address used with
 * C=1 and with C=0 can sit in the cache as two different lines. A dirty C=1
 * line that outlives the switch to C=0 is written back some time later,
 * encrypted, over whatever the page holds by then (the `alias` workload in
 * main.c shows it).
 *
 * The page tables (entry32.S) identity-map the first 4 GiB with 2 MiB pages.
 * A range that covers a 2 MiB page whole changes its PDE; a range that covers
 * part of one needs 4 KiB pages there, so that large page is split first.
 */
#include "guest.h"

#define PTRS_PER_TABLE	512
#define FOUR_GB		0x100000000ULL
/* Linux's tlb_single_page_flush_ceiling: above this many pages, one full TLB
 * flush is cheaper than an INVLPG per page. */
#define TLB_SINGLE_PAGE_FLUSH_CEILING 33

int sev_active(void)
{
	return (BOOT_INFO->sev_status & SEV_STATUS_SEV) != 0;
}

/* The PDE that maps the 2 MiB region holding gpa (below 4 GiB). */
static volatile uint64_t *pde_of(uint64_t gpa)
{
	return (volatile uint64_t *)PD_GPA + (gpa >> 21);
}

/*
 * A page table for the 2 MiB region at base: SPLIT_PT_GPA for the region of
 * the fixed pages (SPLIT_REGION_GPA), else the next one of the pool at
 * PT_POOL_GPA. A real kernel allocates one; this firmware has no allocator.
 */
static uint64_t alloc_page_table(uint64_t base)
{
	volatile struct boot_info *bi = BOOT_INFO;

	if (base == SPLIT_REGION_GPA)
		return SPLIT_PT_GPA;
	if (bi->pt_pool_used == PT_POOL_PAGES) {
		say("cannot split the 2 MiB page at 0x%lx: all %u page tables are in use",
		    base, PT_POOL_PAGES);
		halt_forever();
	}
	return PT_POOL_GPA + PAGE_SIZE * bi->pt_pool_used++;
}

/*
 * The PTE that maps gpa with a 4 KiB page. The first call for a 2 MiB region
 * splits its large page into 512 4 KiB pages (Linux's split_large_page);
 * later calls find the split done and only look the PTE up. Each new PTE
 * keeps the attributes of the large page: present, writable and its C-bit.
 */
volatile uint64_t *split_large_page(uint64_t gpa)
{
	uint64_t base = gpa & ~(uint64_t)(LARGE_PAGE_SIZE - 1);
	volatile uint64_t *pde = pde_of(gpa);
	uint64_t me_mask = BOOT_INFO->me_mask;

	if (*pde & PTE_PS) {
		uint64_t table = alloc_page_table(base);
		volatile uint64_t *pt = (volatile uint64_t *)table;
		uint64_t enc = *pde & me_mask;	/* the large page's C-bit */

		for (int i = 0; i < PTRS_PER_TABLE; i++)
			pt[i] = (base + (uint64_t)i * PAGE_SIZE) | PTE_P | PTE_RW | enc;
		/* The table itself is private memory: C-bit in the PDE. */
		*pde = table | PTE_P | PTE_RW | me_mask;
		/* The TLB may hold the 2 MiB translation: drop it (a CR3 write
		 * flushes all non-global entries). */
		write_cr3(read_cr3());
	}
	uint64_t table = *pde & PTE_ADDR_MASK & ~me_mask;
	return (volatile uint64_t *)table + ((gpa >> 12) & (PTRS_PER_TABLE - 1));
}

/*
 * KVM_HC_MAP_GPA_RANGE: tell the hypervisor that npages at gpa changed
 * encryption state (Documentation/virt/kvm/x86/hypercalls.rst). Hypercall
 * convention: VMMCALL (AMD), RAX = number, RBX, RCX, RDX = arguments.
 */
static uint64_t kvm_map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs)
{
	uint64_t ret = KVM_HC_MAP_GPA_RANGE;

	__asm__ volatile("vmmcall"
			 : "+a"(ret)
			 : "b"(gpa), "c"(npages), "d"(attrs)
			 : "memory");
	return ret;
}

/*
 * Linux's amd_enc_cache_flush_required(): memory must be flushed from the
 * cache before its C-bit changes unless the CPU keeps the cache coherent
 * across encryption domains (CPUID 0x8000001F EAX bit 10, HwEnforcedCacheCoh).
 */
int enc_cache_flush_required(void)
{
	return !(BOOT_INFO->sev_cpuid_eax & SEV_CPUID_COHERENT);
}

/* CLFLUSH every line of the 4 KiB page at va, through va's current mapping
 * (Linux's clflush_cache_range). */
void clflush_page(uint64_t va)
{
	for (uint64_t off = 0; off < PAGE_SIZE; off += CACHE_LINE_SIZE)
		clflush(va + off);
}

/* Set or clear the C-bit of one page-table entry (a PTE or a 2 MiB PDE). */
static void set_enc(volatile uint64_t *entry, int enc)
{
	uint64_t me_mask = BOOT_INFO->me_mask;

	*entry = enc ? (*entry | me_mask) : (*entry & ~me_mask);
}

/*
 * Linux's __change_page_attr_set_clr() for the C-bit: walk the range; where
 * it covers a whole 2 MiB page that is still large, change its PDE; else
 * change the 4 KiB PTEs, splitting the large page first.
 */
static void change_page_enc(uint64_t addr, uint64_t numpages, int enc)
{
	uint64_t end = addr + numpages * PAGE_SIZE;

	while (addr < end) {
		uint64_t base = addr & ~(uint64_t)(LARGE_PAGE_SIZE - 1);
		volatile uint64_t *pde = pde_of(addr);

		if (addr == base && end - addr >= LARGE_PAGE_SIZE && (*pde & PTE_PS)) {
			set_enc(pde, enc);
			addr += LARGE_PAGE_SIZE;
		} else {
			set_enc(split_large_page(addr), enc);
			addr += PAGE_SIZE;
		}
	}
}

/*
 * Linux's __set_memory_enc_pgtable(): change the encryption attribute of
 * numpages 4 KiB pages at addr (a GPA: the map is the identity).
 *
 *  1. cpa_flush(cache = enc_cache_flush_required()): write back and drop
 *     the range's lines through the old mapping. Once the C-bit has changed,
 *     a CLFLUSH of these addresses names the other alias and misses them.
 *  2. __change_page_attr_set_clr(): the new C-bit in the page tables.
 *  3. cpa_flush(cache = 0): no TLB entry with the old C-bit may survive:
 *     INVLPG each page, or reload CR3 for a big range.
 *  4. amd_enc_status_change_finish(): tell the hypervisor, under SEV only
 *     (without SEV there is no one to tell, and plain QEMU with TCG raises
 *     #UD for VMMCALL). Under SEV-ES the VMMCALL raises #VC and goes to the
 *     hypervisor through the GHCB (sev_es.c).
 *
 * `flush` is step 1's condition: set_memory_decrypted() and
 * set_memory_encrypted() pass enc_cache_flush_required(). Only two callers
 * skip it: the `alias` lesson, to show what it prevents, and the swiotlb
 * pool, which is never written through its private mapping (swiotlb.c).
 *
 * set_memory_enc_pgtable_only() is steps 1-3; __set_memory_enc_pgtable()
 * adds step 4.
 */
static void set_memory_enc_pgtable_only(uint64_t addr, uint64_t numpages, int enc, int flush)
{
	if (addr & (PAGE_SIZE - 1) || !numpages || numpages > (FOUR_GB - addr) / PAGE_SIZE) {
		say("set_memory_%scrypted: 0x%lx + %lu pages is not page-aligned memory "
		    "below 4 GiB", enc ? "en" : "de", addr, numpages);
		halt_forever();
	}

	if (flush)
		for (uint64_t i = 0; i < numpages; i++)
			clflush_page(addr + i * PAGE_SIZE);

	change_page_enc(addr, numpages, enc);

	if (numpages <= TLB_SINGLE_PAGE_FLUSH_CEILING)
		for (uint64_t i = 0; i < numpages; i++)
			invlpg(addr + i * PAGE_SIZE);
	else
		write_cr3(read_cr3());
}

void __set_memory_enc_pgtable(uint64_t addr, uint64_t numpages, int enc, int flush)
{
	set_memory_enc_pgtable_only(addr, numpages, enc, flush);
	if (sev_active()) {
		uint64_t attrs = KVM_MAP_GPA_RANGE_PAGE_SZ_4K |
				 (enc ? KVM_MAP_GPA_RANGE_ENCRYPTED : 0);
		uint64_t ret = kvm_map_gpa_range(addr, numpages, attrs);
		if (ret != 0)
			say("KVM_HC_MAP_GPA_RANGE failed: 0x%lx", ret);
	}
}

void set_memory_decrypted(uint64_t addr, uint64_t numpages)
{
	__set_memory_enc_pgtable(addr, numpages, 0, enc_cache_flush_required());
}

void set_memory_encrypted(uint64_t addr, uint64_t numpages)
{
	__set_memory_enc_pgtable(addr, numpages, 1, enc_cache_flush_required());
}

/* One page made shared; flush = 0 skips the cache flush, whatever CPUID says
 * (the `alias` workload's lesson: what Linux never does). */
void set_page_decrypted(uint64_t gpa, int flush)
{
	__set_memory_enc_pgtable(gpa, 1, 0, flush);
}

/*
 * One page made shared without step 4, as Linux's boot/compressed
 * set_page_decrypted() makes its boot GHCB shared: an SEV-ES guest's GHCB,
 * before it exists. The hypervisor reads a GHCB through its own mapping, so
 * it needs no notice, and the hypercall would itself need the GHCB.
 */
void early_set_page_decrypted(uint64_t gpa)
{
	set_memory_enc_pgtable_only(gpa, 1, 0, enc_cache_flush_required());
}
