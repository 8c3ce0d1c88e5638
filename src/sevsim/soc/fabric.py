"""The data fabric as seen by agents other than the cores: the AMD Secure Processor and DMA.

Such accesses name a physical address and a key slot and go to the memory controller.
They are coherent with the CPU cache for the *same* encryption domain: a read first
writes back a dirty line of that domain, a write drops it. Lines of other domains (the
aliases of hardware.md §4.1) are left alone unless the part has HwEnforcedCacheCoh, which
is why the firmware and KVM flush before re-encrypting memory in place.
"""

from __future__ import annotations

import numpy as np

from sevsim.soc.cache import Cache, snoop_line
from sevsim.soc.memctl import LINE_SIZE, MemoryController


class FabricPort:
    def __init__(self, cache: Cache, memctl: MemoryController) -> None:
        self._cache = cache
        self._memctl = memctl

    def read(self, pa: int, n: int, slot: int, invalidate: bool = False) -> bytes:
        off = pa & (LINE_SIZE - 1)
        if 0 < n <= LINE_SIZE - off:
            # One line: the probe's copy, if the cache had one, is the line's plaintext.
            self._memctl.dram.check(pa, n)
            line = snoop_line(self._cache, pa - off, slot, invalidate, whole=False)
            if line is not None:
                return line[off : off + n]
            return self._memctl.read(pa, n, slot)
        self._cache.snoop(pa, n, slot, invalidate=invalidate)
        return self._memctl.read(pa, n, slot)

    def write(self, pa: int, data: bytes, slot: int) -> None:
        n = len(data)
        off = pa & (LINE_SIZE - 1)
        if 0 < n <= LINE_SIZE - off:
            # One line: a resident copy is merged with the new bytes and the line written
            # once, instead of written back, read again and written (same DRAM contents).
            self._memctl.dram.check(pa, n)
            line = snoop_line(self._cache, pa - off, slot, invalidate=True, whole=True)
            if line is None:
                self._memctl.write(pa, data, slot)
            else:
                merged = bytearray(line)
                merged[off : off + n] = data
                self._memctl.write_line(pa - off, slot, bytes(merged))
            return
        self._cache.snoop(pa, n, slot, invalidate=True)
        self._memctl.write(pa, data, slot)

    def read_into(self, pa: int, out: np.ndarray, slot: int, invalidate: bool = False) -> None:
        """Bulk form of ``read`` (16-byte aligned range)."""
        self._cache.snoop(pa, len(out), slot, invalidate=invalidate)
        self._memctl.read_into(pa, out, slot)

    def write_from(self, pa: int, src: np.ndarray, slot: int) -> None:
        self._cache.snoop(pa, len(src), slot, invalidate=True)
        self._memctl.write_from(pa, src, slot)
