/* SPDX-License-Identifier: MIT */
/*
 * mem_encrypt.c - turning one private page into a shared one under SEV.
 *
 * Read next to Linux's arch/x86/mm/pat/set_memory.c (__set_memory_enc_pgtable,
 * split_large_page) and arch/x86/mm/mem_encrypt_amd.c
 * (amd_enc_status_change_finish, enc_dec_hypercall).
 *
 * A page is private when the guest maps it with the C-bit set: the memory
 * controller then encrypts it with the guest's key, and the hypervisor sees
 * only ciphertext. To share a page (for a message to the host, a DMA bounce
 * buffer...) the guest clears the C-bit in the page's PTE and tells the
 * hypervisor, which tracks which guest pages are shared.
 */
#include "guest.h"

#define PAGE_SIZE	0x1000
#define LARGE_PAGE_SIZE	0x200000
#define CACHE_LINE	64

int sev_active(void)
{
	return (BOOT_INFO->sev_status & SEV_STATUS_SEV) != 0;
}

/*
 * Split the 2 MiB page that maps gpa into 512 4 KiB pages, in a new page
 * table at SPLIT_PT_GPA (this tiny firmware splits at most one large page).
 * Each new PTE keeps the attributes of the large page: present, writable and,
 * under SEV, the C-bit. Returns the PTE that maps gpa.
 */
static volatile uint64_t *split_large_page(uint64_t gpa)
{
	uint64_t me_mask = BOOT_INFO->me_mask;
	volatile uint64_t *pde = (volatile uint64_t *)PD_GPA + (gpa >> 21);
	volatile uint64_t *pt = (volatile uint64_t *)SPLIT_PT_GPA;

	if (*pde & PTE_PS) {
		uint64_t base = gpa & ~(uint64_t)(LARGE_PAGE_SIZE - 1);

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

/* The guest's side of set_memory_decrypted() for one 4 KiB page. Its old
 * (encrypted) contents are not kept: read through the new mapping they would
 * be ciphertext. */
void set_page_decrypted(uint64_t gpa)
{
	volatile uint64_t *pte = split_large_page(gpa);

	/*
	 * The cache may hold lines of this page tagged with the guest's key.
	 * Unless the CPU keeps the cache coherent across encryption domains
	 * (CPUID 0x8000001F EAX bit 10, HwEnforcedCacheCoh), write them back and
	 * drop them now, through the still-encrypted mapping, so a dirty private
	 * line can never be written over the shared data later.
	 */
	if (!(BOOT_INFO->sev_cpuid_eax & SEV_CPUID_COHERENT))
		for (uint64_t off = 0; off < PAGE_SIZE; off += CACHE_LINE)
			clflush(gpa + off);

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
