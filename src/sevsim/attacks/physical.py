"""The physical attacker: reads DRAM below the memory controller (cold boot, bus probe).

It sees the bytes as stored — ciphertext wherever a key was used — and nothing else: no
cache contents, no keys.
"""

from __future__ import annotations

from sevsim.soc import Machine
from sevsim.soc.dram import PAGE_SIZE


class ColdBootDump:
    def __init__(self, machine: Machine) -> None:
        self._dram = machine.dram

    def read(self, pa: int, n: int) -> bytes:
        return self._dram.read(pa, n)

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of the contiguous runs of ever-written memory; the rest of DRAM
        is still the zeros it powered on with."""
        runs: list[tuple[int, int]] = []
        for page in self._dram.written_pages():
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
            else:
                runs.append((page, PAGE_SIZE))
        return runs

    def find(self, needle: bytes) -> list[int]:
        """Every physical address where the dump contains needle."""
        hits = []
        for start, length in self.runs():
            data = self._dram.read(start, length)
            pos = data.find(needle)
            while pos >= 0:
                hits.append(start + pos)
                pos = data.find(needle, pos + 1)
        return hits
