"""DRAM: the bytes as they are stored, ciphertext or plaintext.

Sparse: memory is kept in regions that are anonymous memory maps created on first write,
so the operating system backs only the 4 KiB pages that were ever written. A machine with
a 1 TiB physical address space costs nothing until it is used, and its resident size grows
with the touched pages only. Never-written memory reads as zeros.

Nothing here knows about keys: the memory controller encrypts before it stores and
decrypts after it loads. A physical attacker (cold boot, bus probe) reads this directly.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

from sevsim.soc.faults import MachineCheck

PAGE_SIZE = 4096
PAGE_SHIFT = 12
REGION_SHIFT = 25  # 32 MiB regions: at most 32768 maps for 1 TiB, under vm.max_map_count
REGION_SIZE = 1 << REGION_SHIFT
PAGES_PER_REGION = REGION_SIZE // PAGE_SIZE


class DRAM:
    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"DRAM size must be a positive multiple of 4 KiB, not {size}")
        self.size = size
        self._maps: dict[int, mmap.mmap] = {}
        self._regions: dict[int, np.ndarray] = {}
        self._written: dict[int, np.ndarray] = {}  # per region: which pages were ever written
        self.page_gen: dict[int, int] = {}  # page number -> clock of its last change
        self.clock = 0

    # ---- bounds ------------------------------------------------------------------
    def check(self, pa: int, n: int) -> None:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise MachineCheck(
                pa, f"{n} bytes at {pa:#x} are outside the {self.size:#x} bytes of DRAM"
            )

    # ---- region access (used by the memory controller) ------------------------------
    def _region(self, index: int) -> np.ndarray:
        region = self._regions.get(index)
        if region is None:
            size = min(REGION_SIZE, self.size - (index << REGION_SHIFT))
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._maps[index] = m
            region = np.frombuffer(m, dtype=np.uint8)
            self._regions[index] = region
            self._written[index] = np.zeros(PAGES_PER_REGION, dtype=bool)
        return region

    def spans(self, pa: int, n: int) -> Iterator[tuple[int, int, int]]:
        """Split [pa, pa+n) at region boundaries: yields (pa, region index, length)."""
        end = pa + n
        while pa < end:
            index = pa >> REGION_SHIFT
            length = min(end, (index + 1) << REGION_SHIFT) - pa
            yield pa, index, length
            pa += length

    def touch(self, pa: int, n: int) -> None:
        """Note that what [pa, pa+n) holds (here, or in a cache line above) changed: a copy
        kept elsewhere (the instruction engine's frames) compares generations to know."""
        gen = self.page_gen
        for page in range(pa >> PAGE_SHIFT, (pa + max(n, 1) - 1 >> PAGE_SHIFT) + 1):
            self.clock += 1
            gen[page] = self.clock

    def store_view(self, pa: int, n: int) -> np.ndarray:
        """A writable view of [pa, pa+n) inside one region; marks its pages written."""
        self.touch(pa, n)
        index = pa >> REGION_SHIFT
        off = pa & (REGION_SIZE - 1)
        region = self._region(index)
        self._written[index][off >> PAGE_SHIFT : (off + n - 1 >> PAGE_SHIFT) + 1] = True
        return region[off : off + n]

    def load_view(self, pa: int, n: int) -> np.ndarray | None:
        """A read-only view of [pa, pa+n) inside one region, or None if never written."""
        region = self._regions.get(pa >> REGION_SHIFT)
        if region is None:
            return None
        off = pa & (REGION_SIZE - 1)
        return region[off : off + n]

    # ---- one cache line (the memory controller's line path, no numpy) -----------------
    def load_line(self, pa: int, n: int) -> bytes | None:
        """The stored bytes of [pa, pa+n) inside one region, or None if never written."""
        m = self._maps.get(pa >> REGION_SHIFT)
        if m is None:
            return None
        off = pa & (REGION_SIZE - 1)
        return m[off : off + n]

    def store_line(self, pa: int, data: bytes) -> None:
        """Store bytes inside one page (``store_view`` for a cache line, without numpy)."""
        index = pa >> REGION_SHIFT
        m = self._maps.get(index)
        if m is None:
            self._region(index)
            m = self._maps[index]
        off = pa & (REGION_SIZE - 1)
        m[off : off + len(data)] = data
        self._written[index][off >> PAGE_SHIFT] = True
        self.clock += 1
        self.page_gen[pa >> PAGE_SHIFT] = self.clock

    # ---- raw byte access (the physical view) --------------------------------------
    def read(self, pa: int, n: int) -> bytes:
        """The stored bytes of [pa, pa+n): what a cold-boot dump or a bus probe sees."""
        self.check(pa, n)
        out = bytearray(n)
        pos = 0
        for span_pa, _, length in self.spans(pa, n):
            view = self.load_view(span_pa, length)
            if view is not None:
                out[pos : pos + length] = view.data
            pos += length
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        """Store raw bytes (a physical attacker writing DRAM, or the memory controller)."""
        n = len(data)
        self.check(pa, n)
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        for span_pa, _, length in self.spans(pa, n):
            self.store_view(span_pa, length)[:] = src[pos : pos + length]
            pos += length

    # ---- bookkeeping ----------------------------------------------------------------
    def written_pages(self) -> Iterator[int]:
        """Physical addresses of the pages that were ever written, in address order."""
        for index in sorted(self._written):
            for page in np.flatnonzero(self._written[index]):
                yield (index << REGION_SHIFT) + (int(page) << PAGE_SHIFT)

    @property
    def written_bytes(self) -> int:
        return sum(int(w.sum()) for w in self._written.values()) * PAGE_SIZE
