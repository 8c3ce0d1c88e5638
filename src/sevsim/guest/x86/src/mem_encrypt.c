/* SPDX-License-Identifier: MIT */
/*
 * mem_encrypt.c - turning one private page into a shared one under SEV.
 *
 * Read next to Linux's arch/x86/mm/pat/set_memory.c (__set_memory_enc_pgtable,
 * cpa_flush, split_large_page) and arch/x86/mm/mem_encrypt_amd.c
 * (amd_enc_cache_flush_required, amd_enc_status_change_finish,
 * enc_dec_hypercall).
 *
 * A page is private when the guest maps it with the C-bit set: the memory
 * controller then encrypts it with the guest's key, and the hypervisor sees
 * only ciphertext. To share a page (for a message to the host, a DMA bounce
 * buffer...) the guest clears the C-bit in the page's PTE and tells the
 * hypervisor, which tracks which guest pages are shared.
 *
 * The API, for one 4 KiB page:
 *   enc_cache_flush_required()     must the cache be flushed before a C-bit change?
 *   set_page_decrypted(gpa, flush) private -> shared; flush first if asked
 *   clflush_page(va)               write back and drop the page's lines
 *
 * The cache is why the flush matters. On parts without HwEnforcedCacheCoh it
 * does not keep the two views of a page coherent: the same address used with
 * C=1 and with C=0 can sit in the cache as two different lines. A dirty C=1
 * line that outlives the switch to C=0 is written back some time later,
 * encrypted, over whatever the page holds by then (the `alias` workload in
 * main.c shows it).
 */
#include "guest.h"

int sev_active(void)
{
	return (BOOT_INFO->sev_status & SEV_STATUS_SEV) != 0;
}

/*
 * The PTE that maps gpa with a 4 KiB page. The first call for the 2 MiB region
 * that holds gpa splits its large page into 512 4 KiB pages, in the page table
 * at SPLIT_PT_GPA; later calls find the split done and only look the PTE up.
 * Each new PTE keeps the attributes of the large page: present, writable and,
 * under SEV, the C-bit. This tiny firmware has one such table, so it splits
 * one 2 MiB region only (SPLIT_REGION_GPA, which holds SHARED_GPA, the alias
 * pages and the attack lab's victim pages); asking for another one halts.
 */
volatile uint64_t *split_large_page(uint64_t gpa)
{
	uint64_t me_mask = BOOT_INFO->me_mask;
	uint64_t base = gpa & ~(uint64_t)(LARGE_PAGE_SIZE - 1);
	volatile uint64_t *pde = (volatile uint64_t *)PD_GPA + (gpa >> 21);
	volatile uint64_t *pt = (volatile uint64_t *)SPLIT_PT_GPA;

	if (base != SPLIT_REGION_GPA) {
		say("cannot split the 2 MiB page at 0x%lx: only 0x%x has a page table",
		    base, SPLIT_REGION_GPA);
		halt_forever();
	}
	if (*pde & PTE_PS) {
		for (int i = 0; i < 512; i++)
			pt[i] = (base + (uint64_t)i * PAGE_SIZE) | PTE_P | PTE_RW | me_mask;
		*pde = SPLIT_PT_GPA | PTE_P | PTE_RW | me_mask;
		/* The TLB may hold the 2 MiB translation: drop it (a CR3 write
		 * flushes all non-global entries). */
		write_cr3(read_cr3());
	}
	return pt + ((gpa >> 12) & 511);
}

/* KVM_HC_MAP_GPA_RANGE: tell the hypervisor that npages at gpa changed
 * encryption state. attrs 0 = decrypted (shared), 4 KiB pages. Hypercall
 * convention: VMMCALL (AMD), RAX = number, RBX, RCX, RDX = arguments. */
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
 * Linux's amd_enc_cache_flush_required(): a page must be flushed from the
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

/*
 * The guest's side of set_memory_decrypted() for one 4 KiB page, in the order
 * of Linux's __set_memory_enc_pgtable(): flush the cache (if flush), change
 * the PTE, tell the hypervisor. Its old (encrypted) contents are not kept:
 * read through the new mapping they would be ciphertext.
 *
 * Callers pass flush = enc_cache_flush_required(). Only the `alias` workload
 * passes 0 on purpose, to show what the flush prevents.
 */
void set_page_decrypted(uint64_t gpa, int flush)
{
	volatile uint64_t *pte = split_large_page(gpa);

	/*
	 * The cache may hold lines of this page tagged with the guest's key,
	 * dirty ones among them. Write them back and drop them now, through the
	 * still-encrypted mapping: once the C-bit is clear, a CLFLUSH of this
	 * address names the other (unencrypted) alias and misses them, and a
	 * dirty private line written back later would land over the shared data.
	 */
	if (flush)
		clflush_page(gpa);

	/*
	 * Break before make: mark the PTE not present while its C-bit changes,
	 * so no translation with the old attribute can be used meanwhile.
	 */
	*pte = (*pte & ~(PTE_P | BOOT_INFO->me_mask));
	invlpg(gpa);

	/* The hypercall exists only for an SEV guest; without SEV there is no
	 * hypervisor to tell (plain QEMU with TCG raises #UD for VMMCALL). */
	if (sev_active()) {
		uint64_t ret = kvm_map_gpa_range(gpa, 1, 0);
		if (ret != 0)
			say("KVM_HC_MAP_GPA_RANGE failed: 0x%lx", ret);
	}

	*pte |= PTE_P;
	invlpg(gpa);
}
