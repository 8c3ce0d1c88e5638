"""SWIOTLB: bounce buffers for DMA that cannot reach a buffer where it is (Linux
kernel/dma/swiotlb.c), for the host kernel under SME (``sevsim.host.dma``). An SEV guest's
pool is the real-code guest's own (``guest/x86/src/swiotlb.c``).

The pool is a physically contiguous range cut into 2 KiB slots (IO_TLB_SHIFT 11), grouped
in segments of 128 slots (IO_TLB_SEGSIZE) that no mapping crosses — so no mapping is
larger than 256 KiB, which drivers learn as ``dma_max_mapping_size``. On a machine with
memory encryption the pool is *decrypted* (C=0): on an SME host so that devices which
cannot express the C-bit reach it, in an SEV guest because devices can only ever reach
shared pages.

``map`` takes slots and copies the buffer in; ``unmap`` copies it back for the
directions a device writes, and frees the slots. Like Linux since 5.19, ``map`` copies
for every direction (so a device that writes less than it was given cannot expose stale
pool contents); in an SEV guest that means the old contents of a private buffer about to
be read into pass through the shared pool once. A pool with no room left refuses the
mapping with Linux's message — it never hands out a slot twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT
IO_TLB_SEGSIZE = 128
IO_TLB_DEFAULT_SIZE = 64 << 20
IO_TLB_MIN_SLABS = (1 << 20) >> IO_TLB_SHIFT
MAX_MAPPING_SIZE = IO_TLB_SIZE * IO_TLB_SEGSIZE  # 256 KiB
PAGE_SIZE = 4096


class DmaDirection(IntEnum):
    """Linux's enum dma_data_direction."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2


class SwiotlbFull(MemoryError):
    """No room in the pool for a mapping (the DMA API returns DMA_MAPPING_ERROR)."""


# How the owning kernel copies between a buffer and the pool: memcpy(dst_va, src_va, n).
BounceCopy = Callable[[int, int, int], None]


def nslabs_option(text: str) -> int:
    """The ``swiotlb=<slabs>[,force]`` boot option: slots, rounded up to whole segments."""
    count = text.split(",", 1)[0]
    if not count.isdigit() or int(count) == 0:
        raise ValueError(f"swiotlb={text}: expected a number of 2 KiB slots")
    return -(-int(count) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE


def sev_guest_pool_size(memory: int) -> int:
    """The pool an SEV guest asks for: 6 % of its memory, within 64 MiB .. 1 GiB (Linux's
    mem_encrypt_setup_arch; hardware.md §6.2)."""
    return min(max(memory * 6 // 100, IO_TLB_DEFAULT_SIZE), 1 << 30)


@dataclass
class Bounce:
    """One live mapping: where the data is, and where the device sees it."""

    orig_va: int
    tlb_pa: int
    size: int
    direction: DmaDirection


class Swiotlb:
    def __init__(self, pool_pa: int, pool_va: int, nslabs: int, copy: BounceCopy) -> None:
        if nslabs <= 0 or nslabs % IO_TLB_SEGSIZE:
            raise ValueError(f"a pool is whole segments of {IO_TLB_SEGSIZE} slots")
        self.pool_pa = pool_pa
        self.pool_va = pool_va
        self.nslabs = nslabs
        self._copy = copy
        self._used = bytearray(nslabs)  # 1 per slot in use
        self.used = 0
        self._index = 0  # where the next search starts (Linux's area->index)
        self.peak = 0

    @property
    def size(self) -> int:
        return self.nslabs * IO_TLB_SIZE

    def __repr__(self) -> str:
        return f"<Swiotlb {self.pool_pa:#x} {self.size >> 20} MiB used {self.used}/{self.nslabs}>"

    def contains(self, pa: int) -> bool:
        return self.pool_pa <= pa < self.pool_pa + self.size

    # ---- slots --------------------------------------------------------------------------
    def _find_slots(self, size: int) -> int:
        if size > MAX_MAPPING_SIZE:
            raise ValueError(
                f"a {size}-byte mapping exceeds swiotlb's maximum of {MAX_MAPPING_SIZE} bytes "
                "(dma_max_mapping_size)"
            )
        nslots = -(-size // IO_TLB_SIZE)
        stride = PAGE_SIZE // IO_TLB_SIZE if size >= PAGE_SIZE else 1  # page-align big ones
        start = -(-self._index // stride) * stride
        free = bytes(nslots)
        for step in range(0, self.nslabs, stride):
            index = (start + step) % self.nslabs
            if index // IO_TLB_SEGSIZE != (index + nslots - 1) // IO_TLB_SEGSIZE:
                continue  # would cross a segment
            if self._used[index : index + nslots] == free:
                self._used[index : index + nslots] = b"\1" * nslots
                self.used += nslots
                self.peak = max(self.peak, self.used)
                self._index = (index + nslots) % self.nslabs
                return index
        raise SwiotlbFull(
            f"swiotlb buffer is full (sz: {size} bytes), total {self.nslabs} (slots), "
            f"used {self.used} (slots)"
        )

    def _release(self, index: int, size: int) -> None:
        nslots = -(-size // IO_TLB_SIZE)
        self._used[index : index + nslots] = bytes(nslots)
        self.used -= nslots

    # ---- mappings ---------------------------------------------------------------------------
    def map(self, orig_va: int, size: int, direction: DmaDirection) -> Bounce:
        """swiotlb_tbl_map_single: slots for ``size`` bytes, the buffer copied in."""
        index = self._find_slots(size)
        tlb_pa = self.pool_pa + index * IO_TLB_SIZE
        self._copy(self._va(tlb_pa), orig_va, size)
        return Bounce(orig_va, tlb_pa, size, direction)

    def sync_for_cpu(self, bounce: Bounce) -> None:
        """What the device wrote, into the original buffer."""
        if bounce.direction != DmaDirection.TO_DEVICE:
            self._copy(bounce.orig_va, self._va(bounce.tlb_pa), bounce.size)

    def unmap(self, bounce: Bounce) -> None:
        """swiotlb_tbl_unmap_single: copy back what the device may have written; free."""
        self.sync_for_cpu(bounce)
        self._release((bounce.tlb_pa - self.pool_pa) // IO_TLB_SIZE, bounce.size)

    def _va(self, pa: int) -> int:
        return self.pool_va + (pa - self.pool_pa)
