/* SPDX-License-Identifier: MIT */
/*
 * virtio_blk.c - a virtio block driver, in miniature.
 *
 * Read next to Linux's drivers/block/virtio_blk.c (virtblk_probe,
 * virtblk_setup_cmd), drivers/virtio/virtio.c (virtio_dev_probe,
 * virtio_features_ok), drivers/virtio/virtio_ring.c (the split ring) and the
 * virtio 1.2 specification (2.1 status, 2.7 split virtqueues, 5.2 block
 * device, 6 reserved feature bits).
 *
 * Transport (sevsim's, docs/devices.md): the registers of virtio-mmio
 * version 2 (virtio 1.2, 4.2.2), reached with 32-bit port I/O at
 * VIRTIO_PORT_BASE + offset instead of MMIO. A port access is an IOIO exit
 * the VMM handles; the guest never needs the hypervisor to decode an
 * instruction of its (encrypted) code.
 *
 * One virtqueue with at most QUEUE_SIZE descriptors, in shared memory at
 * VIRTQ_GPA (the device is VMM software: it reads and writes the rings with
 * the host's key). A request is a chain of three descriptors: the header
 * (type, sector), one data buffer of at most max_segment bytes, the status
 * byte. In an SEV guest each of the three is a swiotlb bounce buffer: the
 * driver's own header, data and status stay in private memory.
 *
 * Requests go out in batches: the driver fills free chains, then notifies the
 * device once (QUEUE_NOTIFY, a VM exit) when it runs out of chains or of pool
 * room, or at the end; then it takes every completion off the used ring. The
 * model's device serves the ring during the notify's exit, so there are no
 * interrupts: the driver polls, and sleeps (HLT) while nothing is done.
 */
#include "guest.h"

#define VIRTIO_PORT_BASE	0xC000

/* virtio-mmio v2 register offsets (virtio 1.2, 4.2.2) */
#define VIRTIO_MMIO_MAGIC_VALUE		0x000
#define VIRTIO_MMIO_VERSION		0x004
#define VIRTIO_MMIO_DEVICE_ID		0x008
#define VIRTIO_MMIO_DEVICE_FEATURES	0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL	0x014
#define VIRTIO_MMIO_DRIVER_FEATURES	0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL	0x024
#define VIRTIO_MMIO_QUEUE_SEL		0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX	0x034
#define VIRTIO_MMIO_QUEUE_NUM		0x038
#define VIRTIO_MMIO_QUEUE_READY		0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY	0x050
#define VIRTIO_MMIO_STATUS		0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW	0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH	0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW	0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH	0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW	0x0A0
#define VIRTIO_MMIO_QUEUE_USED_HIGH	0x0A4
#define VIRTIO_MMIO_CONFIG		0x100

#define VIRTIO_MAGIC		0x74726976	/* "virt" */
#define VIRTIO_ID_BLOCK		2

/* Device status (2.1) */
#define VIRTIO_CONFIG_S_ACKNOWLEDGE	1
#define VIRTIO_CONFIG_S_DRIVER		2
#define VIRTIO_CONFIG_S_DRIVER_OK	4
#define VIRTIO_CONFIG_S_FEATURES_OK	8
#define VIRTIO_CONFIG_S_NEEDS_RESET	0x40
#define VIRTIO_CONFIG_S_FAILED		0x80

/* Feature bits */
#define VIRTIO_BLK_F_SIZE_MAX		(1ULL << 1)
#define VIRTIO_F_VERSION_1		(1ULL << 32)
#define VIRTIO_F_ACCESS_PLATFORM	(1ULL << 33)	/* the device obeys the platform's DMA rules */
#define DRIVER_FEATURES	(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_BLK_F_SIZE_MAX)

/* struct virtio_blk_config (5.2.4): what this driver reads of it */
#define VIRTIO_BLK_CONFIG_CAPACITY	0x00	/* u64, in 512-byte sectors */
#define VIRTIO_BLK_CONFIG_SIZE_MAX	0x08	/* u32, the largest data buffer */

/* Requests (5.2.6) */
#define VIRTIO_BLK_T_IN		0	/* read */
#define VIRTIO_BLK_T_OUT	1	/* write */
#define VIRTIO_BLK_S_OK		0
#define SECTOR_SIZE		512

/* The split virtqueue (2.7) */
#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2	/* the device writes this buffer */
#define QUEUE_SIZE		128
#define DESCS_PER_REQ		3	/* header, data, status */
#define MAX_REQS		(QUEUE_SIZE / DESCS_PER_REQ)

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QUEUE_SIZE];
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[QUEUE_SIZE];
};

/* The rings in the shared pages at VIRTQ_GPA: descriptors and the driver
 * (avail) ring in the first page, the device (used) ring in the second. */
#define VRING_DESC	((volatile struct vring_desc *)VIRTQ_GPA)
#define VRING_AVAIL	((volatile struct vring_avail *)(VIRTQ_GPA + QUEUE_SIZE * 16))
#define VRING_USED	((volatile struct vring_used *)(VIRTQ_GPA + PAGE_SIZE))
#define VRING_PAGES	2

_Static_assert(sizeof(struct vring_desc) == 16, "virtq_desc");
_Static_assert(QUEUE_SIZE * 16 + sizeof(struct vring_avail) + 2 <= PAGE_SIZE, "page 1");
_Static_assert(sizeof(struct vring_used) + 2 <= PAGE_SIZE, "page 2");
_Static_assert(VRING_PAGES * PAGE_SIZE <= VIRTQ_BYTES, "the rings fit");

/* struct virtio_blk_outhdr (5.2.6), then the status byte: the driver's
 * private copy of a request, at BLK_REQ_GPA + slot * BLK_REQ_SIZE. */
struct virtio_blk_outhdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};
#define BLK_REQ_SIZE	32
#define BLK_STATUS_OFF	16

/* One request in flight: the bus addresses its three buffers were given. */
struct blk_req {
	uint64_t hdr_dma, data_dma, status_dma;
	uint64_t data, len;	/* the private buffer */
	uint64_t sector;
	uint32_t type;
	uint32_t busy;
};

/* The driver's state, in private memory after swiotlb's (IO_STATE_GPA). */
struct virtio_blk {
	uint64_t capacity;	/* sectors */
	uint64_t features;
	uint64_t max_segment;	/* bytes per data buffer */
	uint64_t requests, notifies;
	uint32_t num;		/* queue size */
	uint32_t in_flight;
	uint16_t avail_idx;	/* the next free entry of the avail ring */
	uint16_t last_used;	/* the next used entry to take */
	uint64_t rings_magic;	/* RINGS_MAGIC once the rings are shared */
	struct blk_req req[MAX_REQS];
};
#define RINGS_MAGIC	0x53474e4952ULL	/* "RINGS" */
#define VBLK_GPA	(IO_STATE_GPA + 0x100)
#define VBLK		((volatile struct virtio_blk *)VBLK_GPA)
_Static_assert(0x100 + sizeof(struct virtio_blk) <= PAGE_SIZE, "state page");

/* The compiler must not move ring accesses across this (x86 keeps stores in
 * order by itself: Linux's virt_wmb() is a compiler barrier here too). */
#define barrier()	__asm__ volatile("" : : : "memory")

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static uint32_t vm_read(uint32_t reg)
{
	return inl((uint16_t)(VIRTIO_PORT_BASE + reg));
}

static void vm_write(uint32_t reg, uint32_t v)
{
	outl((uint16_t)(VIRTIO_PORT_BASE + reg), v);
}

static void vm_write64(uint32_t low_reg, uint64_t v)
{
	vm_write(low_reg, (uint32_t)v);
	vm_write(low_reg + 4, (uint32_t)(v >> 32));
}

static int fail(const char *why)
{
	vm_write(VIRTIO_MMIO_STATUS, vm_read(VIRTIO_MMIO_STATUS) | VIRTIO_CONFIG_S_FAILED);
	say("virtio_blk: %s", why);
	return 0;
}

/* --- the DMA API: in an SEV guest every buffer bounces (force_dma_unencrypted) */

static uint64_t dma_map_single(uint64_t buf, uint64_t len, enum dma_data_direction dir)
{
	if (!sev_active())
		return buf;		/* the GPA is the bus address */
	return swiotlb_map(buf, len, dir);
}

static void dma_unmap_single(uint64_t dma, uint64_t buf, uint64_t len, enum dma_data_direction dir)
{
	if (sev_active())
		swiotlb_unmap(dma, buf, len, dir);
}

/* --- probe ------------------------------------------------------------------ */

/* dma_alloc_coherent() for the rings: zeroed pages the device can reach,
 * shared in an SEV guest. */
static void setup_rings(void)
{
	volatile struct virtio_blk *vblk = VBLK;

	/* Once: RAM holds garbage at boot, hence a magic rather than a flag. */
	if (vblk->rings_magic != RINGS_MAGIC) {
		set_memory_decrypted(VIRTQ_GPA, VRING_PAGES);
		vblk->rings_magic = RINGS_MAGIC;
	}
	memset((void *)VIRTQ_GPA, 0, VRING_PAGES * PAGE_SIZE);
}

static int setup_queue(void)
{
	volatile struct virtio_blk *vblk = VBLK;
	uint32_t num;

	vm_write(VIRTIO_MMIO_QUEUE_SEL, 0);
	num = vm_read(VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (num > QUEUE_SIZE)
		num = QUEUE_SIZE;
	if (num < DESCS_PER_REQ)
		return fail("the device's queue is too small");
	setup_rings();
	vm_write64(VIRTIO_MMIO_QUEUE_DESC_LOW, (uint64_t)VRING_DESC);
	vm_write64(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint64_t)VRING_AVAIL);
	vm_write64(VIRTIO_MMIO_QUEUE_USED_LOW, (uint64_t)VRING_USED);
	vm_write(VIRTIO_MMIO_QUEUE_NUM, num);
	vm_write(VIRTIO_MMIO_QUEUE_READY, 1);
	vblk->num = num;
	vblk->avail_idx = 0;
	vblk->last_used = 0;
	vblk->in_flight = 0;
	for (int i = 0; i < MAX_REQS; i++)
		vblk->req[i].busy = 0;
	return 1;
}

/* "(33.6 MB/32.0 MiB)", as Linux's string_get_size() shows a capacity. */
static void say_capacity(uint64_t sectors)
{
	uint64_t bytes = sectors * SECTOR_SIZE;
	uint64_t mb10 = (bytes + 50000) / 100000;		/* tenths of 10^6 */
	uint64_t mib10 = (bytes * 10 + (1 << 19)) >> 20;	/* tenths of 2^20 */

	say("virtio_blk virtio0: [vda] %lu 512-byte logical blocks (%lu.%lu MB/%lu.%lu MiB)",
	    sectors, mb10 / 10, mb10 % 10, mib10 / 10, mib10 % 10);
}

/*
 * virtio_dev_probe(): reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, the
 * queue, DRIVER_OK. An SEV guest insists on VIRTIO_F_ACCESS_PLATFORM, as
 * Linux's virtio_features_ok() does when the platform restricts memory
 * access: without it the device would use guest-physical addresses as they
 * are, ignoring the bounce buffers, and see only ciphertext.
 */
int virtblk_probe(void)
{
	volatile struct virtio_blk *vblk = VBLK;
	uint64_t offered;
	uint32_t status;

	if (vm_read(VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MAGIC ||
	    vm_read(VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_BLOCK) {
		say("virtio_blk: no virtio block device at port 0x%x", VIRTIO_PORT_BASE);
		return 0;
	}
	if (vm_read(VIRTIO_MMIO_VERSION) != 2) {
		say("virtio_blk: unsupported virtio-mmio version %u", vm_read(VIRTIO_MMIO_VERSION));
		return 0;
	}

	vm_write(VIRTIO_MMIO_STATUS, 0);			/* reset */
	status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
	vm_write(VIRTIO_MMIO_STATUS, status);
	status |= VIRTIO_CONFIG_S_DRIVER;
	vm_write(VIRTIO_MMIO_STATUS, status);

	vm_write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered = vm_read(VIRTIO_MMIO_DEVICE_FEATURES);
	vm_write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (uint64_t)vm_read(VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (sev_active()) {
		if (!(offered & VIRTIO_F_VERSION_1))
			return fail("device must provide VIRTIO_F_VERSION_1");
		if (!(offered & VIRTIO_F_ACCESS_PLATFORM))
			return fail("device must provide VIRTIO_F_ACCESS_PLATFORM");
	}
	vblk->features = offered & DRIVER_FEATURES;
	vm_write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vm_write(VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)vblk->features);
	vm_write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vm_write(VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(vblk->features >> 32));
	status |= VIRTIO_CONFIG_S_FEATURES_OK;
	vm_write(VIRTIO_MMIO_STATUS, status);
	if (!(vm_read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK))
		return fail("the device refused the features");

	if (!setup_queue())
		return 0;

	vblk->capacity = vm_read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CONFIG_CAPACITY) |
			 (uint64_t)vm_read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CONFIG_CAPACITY + 4) << 32;
	/* A data buffer: at most size_max, and with bounce buffers at most what
	 * one swiotlb mapping can be (dma_max_mapping_size); whole sectors. */
	uint64_t max = 1ULL << 30;
	if (vblk->features & VIRTIO_BLK_F_SIZE_MAX)
		max = vm_read(VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CONFIG_SIZE_MAX);
	if (sev_active() && max > IO_TLB_MAX_MAPPING)
		max = IO_TLB_MAX_MAPPING;
	vblk->max_segment = max & ~(uint64_t)(SECTOR_SIZE - 1);
	if (!vblk->max_segment)
		return fail("the device's size_max is below one sector");
	vblk->requests = 0;
	vblk->notifies = 0;

	status |= VIRTIO_CONFIG_S_DRIVER_OK;
	vm_write(VIRTIO_MMIO_STATUS, status);
	say_capacity(vblk->capacity);
	return 1;
}

/* --- requests --------------------------------------------------------------- */

/* Map a request's three buffers and put its chain on the avail ring; 0 if the
 * bounce pool has no room for them now (nothing is left mapped). */
static int submit(int slot, uint32_t type, uint64_t sector, uint64_t data, uint64_t len)
{
	volatile struct virtio_blk *vblk = VBLK;
	volatile struct blk_req *req = &vblk->req[slot];
	uint64_t hdr_va = BLK_REQ_GPA + (uint64_t)slot * BLK_REQ_SIZE;
	uint64_t status_va = hdr_va + BLK_STATUS_OFF;
	struct virtio_blk_outhdr *hdr = (struct virtio_blk_outhdr *)hdr_va;
	enum dma_data_direction dir = type == VIRTIO_BLK_T_IN ? DMA_FROM_DEVICE : DMA_TO_DEVICE;
	uint64_t hdr_dma, data_dma, status_dma;

	hdr->type = type;
	hdr->ioprio = 0;
	hdr->sector = sector;
	*(volatile uint8_t *)status_va = 0xFF;			/* not done yet */

	hdr_dma = dma_map_single(hdr_va, sizeof(*hdr), DMA_TO_DEVICE);
	if (!hdr_dma)
		return 0;
	data_dma = dma_map_single(data, len, dir);
	if (!data_dma) {
		dma_unmap_single(hdr_dma, hdr_va, sizeof(*hdr), DMA_TO_DEVICE);
		return 0;
	}
	status_dma = dma_map_single(status_va, 1, DMA_FROM_DEVICE);
	if (!status_dma) {
		dma_unmap_single(data_dma, data, len, dir);
		dma_unmap_single(hdr_dma, hdr_va, sizeof(*hdr), DMA_TO_DEVICE);
		return 0;
	}

	uint16_t head = (uint16_t)(slot * DESCS_PER_REQ);
	volatile struct vring_desc *d = VRING_DESC + head;
	d[0].addr = hdr_dma;
	d[0].len = sizeof(*hdr);
	d[0].flags = VRING_DESC_F_NEXT;
	d[0].next = head + 1;
	d[1].addr = data_dma;
	d[1].len = (uint32_t)len;
	d[1].flags = VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0);
	d[1].next = head + 2;
	d[2].addr = status_dma;
	d[2].len = 1;
	d[2].flags = VRING_DESC_F_WRITE;
	d[2].next = 0;

	req->hdr_dma = hdr_dma;
	req->data_dma = data_dma;
	req->status_dma = status_dma;
	req->data = data;
	req->len = len;
	req->sector = sector;
	req->type = type;
	req->busy = 1;

	/* The entry first, then the index that publishes it (2.7.13). */
	VRING_AVAIL->ring[vblk->avail_idx % vblk->num] = head;
	barrier();
	vblk->avail_idx++;
	VRING_AVAIL->idx = vblk->avail_idx;
	vblk->in_flight++;
	vblk->requests++;
	return 1;
}

/* Unmap a completed request (its data and status come back here) and free
 * its chain; 1 if the device says it went well. */
static int complete(int slot)
{
	volatile struct blk_req *req = &VBLK->req[slot];
	uint64_t hdr_va = BLK_REQ_GPA + (uint64_t)slot * BLK_REQ_SIZE;
	uint64_t status_va = hdr_va + BLK_STATUS_OFF;
	enum dma_data_direction dir =
		req->type == VIRTIO_BLK_T_IN ? DMA_FROM_DEVICE : DMA_TO_DEVICE;

	dma_unmap_single(req->status_dma, status_va, 1, DMA_FROM_DEVICE);
	dma_unmap_single(req->data_dma, req->data, req->len, dir);
	dma_unmap_single(req->hdr_dma, hdr_va, sizeof(struct virtio_blk_outhdr), DMA_TO_DEVICE);
	req->busy = 0;

	uint8_t status = *(volatile uint8_t *)status_va;
	if (status != VIRTIO_BLK_S_OK) {
		say("virtio_blk: I/O error, sector %lu, status %u", req->sector, status);
		return 0;
	}
	return 1;
}

/* Notify the device, then take every completion off the used ring; the
 * number of failed requests, or -1 if the device broke. */
static int complete_all(void)
{
	volatile struct virtio_blk *vblk = VBLK;
	int errors = 0;

	if (!vblk->in_flight)
		return 0;
	barrier();
	vm_write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	vblk->notifies++;
	while (vblk->in_flight) {
		uint16_t used_idx = VRING_USED->idx;

		if (used_idx == vblk->last_used) {
			if (vm_read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET) {
				say("virtio_blk: the device needs a reset");
				return -1;
			}
			yield_to_host();	/* nothing done yet: let the host run */
			continue;
		}
		barrier();	/* read the entries after the index (virt_rmb) */
		while (vblk->last_used != used_idx) {
			uint32_t id = VRING_USED->ring[vblk->last_used % vblk->num].id;
			int slot = (int)(id / DESCS_PER_REQ);

			if (id % DESCS_PER_REQ || slot >= MAX_REQS || !vblk->req[slot].busy) {
				say("virtio_blk: the device completed a chain it was not given (%u)", id);
				return -1;
			}
			errors += !complete(slot);
			vblk->last_used++;
			vblk->in_flight--;
		}
	}
	return errors;
}

static int free_slot(void)
{
	volatile struct virtio_blk *vblk = VBLK;
	int slots = (int)(vblk->num / DESCS_PER_REQ);

	for (int i = 0; i < slots; i++)
		if (!vblk->req[i].busy)
			return i;
	return -1;
}

/*
 * n bytes between the disk at sector and the private buffer at buf, in
 * requests of at most max_segment bytes. When the chains or the bounce pool
 * run out, complete what is in flight and go on; a request that cannot be
 * mapped even with nothing in flight fails the I/O before it reaches the
 * device. Returns 1 if every request succeeded.
 */
static int blk_io(uint32_t type, uint64_t sector, uint64_t buf, uint64_t n)
{
	volatile struct virtio_blk *vblk = VBLK;
	int errors = 0, done;

	if (n % SECTOR_SIZE || sector > vblk->capacity ||
	    n / SECTOR_SIZE > vblk->capacity - sector) {
		say("virtio_blk: %lu bytes at sector %lu: beyond the disk or not whole sectors",
		    n, sector);
		return 0;
	}
	for (uint64_t pos = 0; pos < n;) {
		uint64_t len = n - pos < vblk->max_segment ? n - pos : vblk->max_segment;
		int slot = free_slot();

		if (slot >= 0 && submit(slot, type, sector + pos / SECTOR_SIZE, buf + pos, len)) {
			pos += len;
			continue;
		}
		if (!vblk->in_flight) {		/* the pool is too small for one request */
			swiotlb_report_full("virtio_blk: I/O error: ");
			return 0;
		}
		if ((done = complete_all()) < 0)	/* room comes back as requests complete */
			return 0;
		errors += done;
	}
	if ((done = complete_all()) < 0)
		return 0;
	return errors + done == 0;
}

int virtblk_write(uint64_t sector, uint64_t buf, uint64_t n)
{
	return blk_io(VIRTIO_BLK_T_OUT, sector, buf, n);
}

int virtblk_read(uint64_t sector, uint64_t buf, uint64_t n)
{
	return blk_io(VIRTIO_BLK_T_IN, sector, buf, n);
}

uint64_t virtblk_capacity(void)
{
	return VBLK->capacity;
}

uint64_t virtblk_requests(void)
{
	return VBLK->requests;
}

uint64_t virtblk_notifies(void)
{
	return VBLK->notifies;
}
