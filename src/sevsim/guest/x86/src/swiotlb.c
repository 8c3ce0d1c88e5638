/* SPDX-License-Identifier: MIT */
/*
 * swiotlb.c - bounce buffers: a pool of shared memory that every DMA of an
 * SEV guest goes through.
 *
 * Read next to Linux's kernel/dma/swiotlb.c (swiotlb_init_remap,
 * swiotlb_update_mem_attributes, swiotlb_tbl_map_single,
 * swiotlb_tbl_unmap_single) and arch/x86/mm/mem_encrypt.c
 * (mem_encrypt_setup_arch).
 *
 * No device can use the guest's key: what a device reads from a private page
 * is ciphertext, and what it writes there the guest decrypts into garbage.
 * So an SEV guest keeps a pool of pages it has made shared, and a driver hands
 * a device a copy of its buffer in the pool (a "bounce buffer") instead of
 * the buffer: swiotlb_map() copies the buffer into free slots of the pool and
 * returns their address; swiotlb_unmap() copies back what the device wrote
 * and frees the slots.
 *
 * The pool is cut into 2 KiB slots (IO_TLB_SIZE) in segments of 128 slots
 * (IO_TLB_SEGSIZE) that no mapping crosses: no mapping is larger than
 * 256 KiB. Mappings of a page or more start on a page boundary.
 *
 * Its size is Linux's for an SEV guest (mem_encrypt_setup_arch): 6% of RAM,
 * at least 64 MiB (IO_TLB_DEFAULT_SIZE) and at most 1 GiB, or swiotlb=<slots>
 * on the kernel command line (launch.c keeps the verified one). Linux allocates it from low memory and halves
 * it while the allocation fails, down to 1 MiB (IO_TLB_MIN_SLABS); here it
 * sits at the top of the RAM below 4 GiB, 2 MiB-aligned so that making it
 * shared keeps the large pages whole, and it is halved while it does not fit
 * above the firmware's own areas (IO_AREA_END).
 */
#include "guest.h"

#define IO_TLB_DEFAULT_SIZE	(64ULL << 20)
#define IO_TLB_MAX_SIZE		(1ULL << 30)
#define IO_TLB_MIN_SLABS	((1 << 20) >> IO_TLB_SHIFT)	/* 1 MiB */
#define IO_TLB_MAX_SLABS	(IO_TLB_MAX_SIZE >> IO_TLB_SHIFT)
#define SWIOTLB_MAGIC		0x424c54494f5753ULL		/* "SWIOTLB" */

/* Linux's struct io_tlb_mem, in private memory. */
struct io_tlb_mem {
	uint64_t magic;		/* SWIOTLB_MAGIC once the pool is set up */
	uint64_t start;		/* GPA (= bus address) of the pool */
	uint64_t nslabs;	/* slots */
	uint64_t index;		/* where the next search starts */
	uint64_t used;		/* slots in use */
	uint64_t fail_size;	/* the last mapping that found no room */
	uint64_t fail_used;
};

#define IO_TLB	((volatile struct io_tlb_mem *)IO_STATE_GPA)
#define SLOTS	((volatile uint8_t *)IO_TLB_SLOTS_GPA)	/* 1 = in use */

_Static_assert(IO_TLB_SLOTS_GPA + IO_TLB_MAX_SLABS <= BLK_REQ_GPA, "the slot map fits");

/* Copy n bytes with REP MOVSQ, then REP MOVSB for the tail: the bounce copies
 * move megabytes, and string.c's memcpy goes a byte at a time. */
void memcpy_fast(void *dst, const void *src, size_t n)
{
	size_t words = n / 8, bytes = n % 8;

	__asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(words) : : "memory");
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(bytes) : : "memory");
}

/* "swiotlb=<slots>[,force]" on the (verified) kernel command line, or 0. */
static uint64_t swiotlb_option(void)
{
	const char *cmdline = kernel_cmdline();

	for (const char *p = cmdline; *p; p++) {
		if ((p != cmdline && p[-1] != ' ') || memcmp(p, "swiotlb=", 8) != 0)
			continue;
		uint64_t n = 0;
		for (p += 8; *p >= '0' && *p <= '9' && n < IO_TLB_MAX_SLABS; p++)
			n = n * 10 + (uint64_t)(*p - '0');
		return n;
	}
	return 0;
}

/* 0x%016lx, as Linux's %pa prints a physical address. */
static void phys_string(char out[19], uint64_t addr)
{
	uint8_t be[8];

	for (int i = 0; i < 8; i++)
		be[i] = (uint8_t)(addr >> (56 - 8 * i));
	out[0] = '0';
	out[1] = 'x';
	hex_string(out + 2, be, sizeof(be));
}

int swiotlb_init(void)
{
	volatile struct io_tlb_mem *mem = IO_TLB;
	uint64_t ram, lowmem, nslabs, bytes, start;
	char first[19], last[19];

	if (mem->magic == SWIOTLB_MAGIC)
		return 1;

	ram = fw_cfg_read_int(FW_CFG_RAM_SIZE, 8);
	lowmem = ram > PC_LOWMEM_LIMIT ? PC_LOWMEM : ram;

	nslabs = swiotlb_option();
	if (nslabs) {
		nslabs = (nslabs + IO_TLB_SEGSIZE - 1) & ~(uint64_t)(IO_TLB_SEGSIZE - 1);
	} else {
		uint64_t size = ram * 6 / 100;
		if (size < IO_TLB_DEFAULT_SIZE)
			size = IO_TLB_DEFAULT_SIZE;
		if (size > IO_TLB_MAX_SIZE)
			size = IO_TLB_MAX_SIZE;
		nslabs = size >> IO_TLB_SHIFT;
	}

	for (;;) {
		bytes = nslabs << IO_TLB_SHIFT;
		start = (lowmem - bytes) & ~(uint64_t)(LARGE_PAGE_SIZE - 1);
		if (lowmem >= bytes && start >= IO_AREA_END)
			break;
		if (nslabs <= IO_TLB_MIN_SLABS) {
			say("software IO TLB: no room for a pool in %lu MiB of RAM "
			    "(needs at least %u MiB)", ram >> 20,
			    (unsigned)((IO_AREA_END + (IO_TLB_MIN_SLABS << IO_TLB_SHIFT)) >> 20));
			return 0;
		}
		/* ALIGN(nslabs >> 1, IO_TLB_SEGSIZE) */
		nslabs = ((nslabs >> 1) + IO_TLB_SEGSIZE - 1) & ~(uint64_t)(IO_TLB_SEGSIZE - 1);
	}

	/*
	 * swiotlb_update_mem_attributes(): the pool becomes shared. Its old
	 * contents read as garbage now, but every slot is written before a
	 * device is given it (swiotlb_map copies in for every direction).
	 *
	 * Without the cache flush that set_memory_decrypted() does first: that
	 * flush is for dirty lines written through the private mapping, and
	 * nothing in this firmware ever writes the pool's pages through it (not
	 * even a memset). Linux cannot say that of its memory and flushes; for
	 * sevsim's engine the 2^20 CLFLUSHes of a 64 MiB pool would take minutes.
	 */
	__set_memory_enc_pgtable(start, (bytes + PAGE_SIZE - 1) / PAGE_SIZE, 0, 0);

	for (uint64_t i = 0; i < nslabs; i++)
		SLOTS[i] = 0;
	mem->start = start;
	mem->nslabs = nslabs;
	mem->index = 0;
	mem->used = 0;
	mem->magic = SWIOTLB_MAGIC;

	phys_string(first, start);
	phys_string(last, start + bytes - 1);
	say("software IO TLB: mapped [mem %s-%s] (%luMB)", first, last, bytes >> 20);
	return 1;
}

/* Linux's swiotlb_search_pool_area(): nslots free slots in one segment,
 * page-aligned for a page or more, from mem->index on; -1 if none. */
static int64_t find_slots(uint64_t size)
{
	volatile struct io_tlb_mem *mem = IO_TLB;
	uint64_t nslots = (size + IO_TLB_SIZE - 1) >> IO_TLB_SHIFT;
	uint64_t stride = size >= PAGE_SIZE ? PAGE_SIZE / IO_TLB_SIZE : 1;
	uint64_t nslabs = mem->nslabs;
	uint64_t start = (mem->index + stride - 1) / stride * stride;

	for (uint64_t step = 0; step < nslabs; step += stride) {
		uint64_t index = (start + step) % nslabs;
		uint64_t i;

		if (index / IO_TLB_SEGSIZE != (index + nslots - 1) / IO_TLB_SEGSIZE ||
		    index + nslots > nslabs)
			continue;
		for (i = 0; i < nslots && !SLOTS[index + i]; i++)
			;
		if (i < nslots)
			continue;
		for (i = 0; i < nslots; i++)
			SLOTS[index + i] = 1;
		mem->used += nslots;
		mem->index = (index + nslots) % nslabs;
		return (int64_t)index;
	}
	return -1;
}

/*
 * Linux's swiotlb_tbl_map_single(). The buffer is copied into the slots for
 * every direction (since Linux 5.19): a device that writes less than it was
 * given must not hand back whatever the pool held before.
 */
uint64_t swiotlb_map(uint64_t orig, uint64_t size, enum dma_data_direction dir)
{
	volatile struct io_tlb_mem *mem = IO_TLB;
	int64_t index;

	(void)dir;
	if (size == 0 || size > IO_TLB_MAX_MAPPING || (index = find_slots(size)) < 0) {
		mem->fail_size = size;
		mem->fail_used = mem->used;
		return 0;
	}
	uint64_t tlb_addr = mem->start + ((uint64_t)index << IO_TLB_SHIFT);
	memcpy_fast((void *)tlb_addr, (const void *)orig, size);
	return tlb_addr;
}

/* Linux's swiotlb_tbl_unmap_single(): what a device wrote goes back into the
 * private buffer (the sync for the CPU), then the slots are free again. */
void swiotlb_unmap(uint64_t tlb_addr, uint64_t orig, uint64_t size, enum dma_data_direction dir)
{
	volatile struct io_tlb_mem *mem = IO_TLB;
	uint64_t index = (tlb_addr - mem->start) >> IO_TLB_SHIFT;
	uint64_t nslots = (size + IO_TLB_SIZE - 1) >> IO_TLB_SHIFT;

	if (dir != DMA_TO_DEVICE)
		memcpy_fast((void *)orig, (const void *)tlb_addr, size);
	for (uint64_t i = 0; i < nslots; i++)
		SLOTS[index + i] = 0;
	mem->used -= nslots;
}

void swiotlb_report_full(const char *prefix)
{
	volatile struct io_tlb_mem *mem = IO_TLB;

	say("%sswiotlb buffer is full (sz: %lu bytes), total %lu (slots), used %lu (slots)",
	    prefix, mem->fail_size, mem->nslabs, mem->fail_used);
}
