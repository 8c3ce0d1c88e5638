"""The guest kernel's DMA API (Linux kernel/dma/direct.c with swiotlb; hardware.md §6.2).

No device can use the guest's key, so in an SEV guest every DMA goes through shared
(C=0) pages: ``force_dma_unencrypted`` is always true, streaming mappings are *forced*
through the swiotlb pool, which the kernel shares at boot, and coherent buffers (such as
virtio rings) are allocated shared. Outside SEV, bus addresses are the guest-physical
addresses and nothing bounces.

Pool size, as Linux sizes it for an SEV guest: 6 % of memory, clamped to 64 MiB..1 GiB,
or ``swiotlb=<slots>`` on the command line; when memory is too tight for it, halved
until it fits (down to 1 MiB), as swiotlb_init does when its allocation fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevsim.guest.kernel import GuestKernel
from sevsim.soc.paging import PAGE_2M, PAGE_4K
from sevsim.swiotlb import (
    IO_TLB_MIN_SLABS,
    IO_TLB_SEGSIZE,
    IO_TLB_SIZE,
    MAX_MAPPING_SIZE,
    Bounce,
    DmaDirection,
    Swiotlb,
    nslabs_option,
    sev_guest_pool_size,
)

ZERO_STEP = 4 << 20


@dataclass
class GuestMapping:
    dma_addr: int
    size: int
    bounce: Bounce | None


class GuestDma:
    def __init__(self, kernel: GuestKernel) -> None:
        self.kernel = kernel
        self.swiotlb: Swiotlb | None = None
        if kernel.sev_active:
            self._init_swiotlb()

    @property
    def force_dma_unencrypted(self) -> bool:
        return self.kernel.sev_active

    @property
    def max_mapping_size(self) -> int:
        """dma_max_mapping_size: what one mapping may be (drivers split larger I/O)."""
        return MAX_MAPPING_SIZE if self.swiotlb is not None else 1 << 30

    def _init_swiotlb(self) -> None:
        kernel = self.kernel
        option = kernel.params.get("swiotlb")
        if option:
            nslabs = nslabs_option(option)
        else:
            nslabs = sev_guest_pool_size(kernel.memory_size) // IO_TLB_SIZE
            while nslabs * IO_TLB_SIZE > kernel.free_memory // 2 and nslabs > IO_TLB_MIN_SLABS:
                nslabs = -(-(nslabs // 2) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE
        npages = nslabs * IO_TLB_SIZE // PAGE_4K
        pool = kernel.alloc_pages(npages, align=PAGE_2M)  # MODEL: aligned, keeps 2 MiB pages
        kernel.set_memory_decrypted(pool, npages)  # swiotlb_update_mem_attributes, which
        for off in range(0, npages * PAGE_4K, ZERO_STEP):  # then clears the pool (Linux 5.x)
            kernel.vcpu.write_stream(pool + off, bytes(min(ZERO_STEP, npages * PAGE_4K - off)))
        self.swiotlb = Swiotlb(pool, pool, nslabs, kernel.vcpu.copy_stream)
        kernel.printk(
            f"software IO TLB: mapped [mem {pool:#018x}-{pool + npages * PAGE_4K - 1:#018x}] "
            f"({npages * PAGE_4K >> 20}MB)"
        )

    def map_single(self, va: int, size: int, direction: DmaDirection) -> GuestMapping:
        """dma_map_single; raises SwiotlbFull when the pool has no room."""
        if self.swiotlb is None:
            return GuestMapping(va, size, None)  # identity map: the GPA is the bus address
        bounce = self.swiotlb.map(va, size, direction)
        return GuestMapping(bounce.tlb_pa, size, bounce)

    def unmap_single(self, mapping: GuestMapping) -> None:
        if mapping.bounce is not None:
            assert self.swiotlb is not None
            self.swiotlb.unmap(mapping.bounce)

    def alloc_coherent(self, npages: int) -> int:
        """dma_alloc_coherent: zeroed pages the device can reach (shared in SEV); their
        address is both the guest's and the device's."""
        va = self.kernel.alloc_pages(npages)
        self.kernel.set_memory_decrypted(va, npages)  # a no-op without SEV
        self.kernel.vcpu.write(va, bytes(npages * PAGE_4K))
        return va
