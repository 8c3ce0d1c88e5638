"""The CPU cache: 64-byte lines of *plaintext*, tagged by physical line address and
encryption domain (hardware.md §4).

The domain of a line is the key slot its data is encrypted with on the way to DRAM
(0 = plaintext, the host key slot, or a guest's ASID slot). MODEL: the architecture says a
line is tagged with the C-bit and the ASID; tagging by the key slot is the same thing for
every access the model makes, and it answers the open question of §10 for shared guest
pages (they are tagged with the host or the plaintext domain, the key they really use).

* A fill reads DRAM through the memory controller, which decrypts with the domain's key.
* A dirty line is encrypted with its domain's key when it is evicted or flushed.
* Two domains may hold the same physical line at once. Without HwEnforcedCacheCoh they
  are not kept coherent: a stale dirty line can be written back after newer data went to
  DRAM through another domain, which is the aliasing corruption of §4.1. With it, an
  access in one domain first writes back and drops the other domains' lines of that
  address (the MODEL of §4.1).

Set-associative with FIFO replacement (MODEL: FIFO needs no bookkeeping on a hit, which
keeps the CPU's hit path short; real parts use a pseudo-LRU). One cache is shared by all
cores: per-core L1/L2 are not modelled.

Memory types (from the PAT) decide how a store behaves: WB allocates and dirties a line;
WT updates a resident line and memory; WP writes memory and drops the line, so no dirty
line can ever be created through a WP mapping (what Linux's in-place kernel encryption
relies on); UC/WC bypass the cache after writing back and dropping the line of the same
domain (processor self-snoop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import IntEnum

import numpy as np

from sevsim.profiles import CacheGeometry
from sevsim.soc.memctl import BULK_MIN, LINE_SIZE, MemoryController

LINE_MASK = LINE_SIZE - 1
DOMAIN_SHIFT = 52  # key = slot << 52 | line address: one int, cheap to hash
ADDR_MASK = (1 << DOMAIN_SHIFT) - 1


class MemType(IntEnum):
    """x86 memory types, with their PAT encodings."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6
    UC_MINUS = 7


def line_key(line_pa: int, slot: int) -> int:
    return (slot << DOMAIN_SHIFT) | line_pa


class Cache:
    def __init__(self, geometry: CacheGeometry, memctl: MemoryController, coherent: bool) -> None:
        if geometry.line != LINE_SIZE:
            raise ValueError("the model uses 64-byte cache lines")
        self.geometry = geometry
        self.coherent = coherent
        self._memctl = memctl
        self._dram = memctl.dram
        self._set_mask = geometry.sets - 1
        if geometry.sets & self._set_mask:
            raise ValueError("the number of cache sets must be a power of two")
        self._ways = geometry.ways
        # Lines are grouped per (domain, page): a core's fast path keeps a page's dict and
        # finds a line with a small-integer lookup. Shared with the cores: never rebound.
        self._pages: dict[int, dict[int, bytearray]] = {}  # page key -> {line index: data}
        self._dirty: set[int] = set()  # line keys
        self._count = 0
        self._sets: dict[int, list[int]] = {}
        self._slots_of_line: dict[int, list[int]] = {}  # line PA -> domains holding it
        self._lines_in_page: dict[int, int] = {}  # page PA -> cached lines (all domains)
        self.stats = {"fills": 0, "writebacks": 0, "evictions": 0}
        # Pages a cache level above this one may hold newer data of (the instruction
        # engine's frames): page PA -> a function that writes that data back into this
        # cache, called as sync(pages, snoop). Every access to such a page by anyone calls
        # it first; a fabric snoop passes itself as (key slot, first PA, end PA), so that
        # the lines of that domain inside its range may go on to DRAM in bulk
        # (``write_through``); else snoop is None.
        self.upper: dict[int, Callable[..., None]] = {}

    def __repr__(self) -> str:
        return (
            f"<Cache {self.geometry.size >> 20} MiB {self._ways}-way coherent={self.coherent}"
            f" lines={self._count} dirty={len(self._dirty)}>"
        )

    # ---- lines ------------------------------------------------------------------------
    def page_lines(self, slot: int, page_pa: int) -> dict[int, bytearray]:
        """The live dict of one page's resident lines in one domain (line index -> data).
        A core may keep it for its fast path; a dict that empties is dropped and replaced,
        so a stale one only ever misses."""
        if page_pa in self.upper:
            self._sync(page_pa, 1)
        return self._pages.setdefault((slot << DOMAIN_SHIFT) | page_pa, {})

    def _sync(self, pa: int, n: int, snoop: tuple[int, int, int] | None = None) -> None:
        upper = self.upper
        lo, hi = pa & ~0xFFF, pa + max(n, 1)
        if (hi - lo) >> 12 > len(upper):
            pages = [page for page in upper if lo <= page < hi]
        else:
            pages = range(lo, hi, 4096)
        calls: dict[Callable[..., None], list[int]] = {}  # one call per level above
        for page_pa in pages:
            sync = upper.pop(page_pa, None)
            if sync is not None:
                calls.setdefault(sync, []).append(page_pa)
        for sync, synced in calls.items():
            sync(synced, snoop)

    def _get(self, key: int) -> bytearray | None:
        lines = self._pages.get(key & ~0xFFF)
        return None if lines is None else lines.get((key >> 6) & 63)

    def _line(self, line_pa: int, slot: int, fill: bool = True) -> bytearray:
        """The resident line for (line_pa, slot), filled from DRAM if needed (a full-line
        write allocates without reading: ``fill=False``)."""
        key = (slot << DOMAIN_SHIFT) | line_pa
        lines = self._pages.get(key & ~0xFFF)
        if lines is not None:
            line = lines.get((line_pa >> 6) & 63)
            if line is not None:
                return line
        if self.coherent:
            self._drop_other_domains(line_pa, slot)
        if fill:
            line = bytearray(self._memctl.read_line(line_pa, slot))
            self.stats["fills"] += 1
        else:
            line = bytearray(LINE_SIZE)
        ways = self._sets.setdefault((line_pa >> 6) & self._set_mask, [])
        if len(ways) >= self._ways:
            self._evict(ways[0])
        ways.append(key)
        self._pages.setdefault(key & ~0xFFF, {})[(line_pa >> 6) & 63] = line
        self._count += 1
        self._slots_of_line.setdefault(line_pa, []).append(slot)
        page_pa = line_pa & ~0xFFF
        self._lines_in_page[page_pa] = self._lines_in_page.get(page_pa, 0) + 1
        return line

    def _evict(self, key: int) -> None:
        """Write back (if dirty) and drop one line."""
        page_key = key & ~0xFFF
        lines = self._pages[page_key]
        line = lines.pop((key >> 6) & 63)
        if not lines:
            del self._pages[page_key]
        self._count -= 1
        line_pa = key & ADDR_MASK
        slot = key >> DOMAIN_SHIFT
        if key in self._dirty:
            self._dirty.discard(key)
            self._memctl.write_line(line_pa, slot, bytes(line))
            self.stats["writebacks"] += 1
        self._sets[(line_pa >> 6) & self._set_mask].remove(key)
        page_pa = line_pa & ~0xFFF
        if self._lines_in_page[page_pa] == 1:
            del self._lines_in_page[page_pa]
        else:
            self._lines_in_page[page_pa] -= 1
        slots = self._slots_of_line[line_pa]
        slots.remove(slot)
        if not slots:
            del self._slots_of_line[line_pa]
        self.stats["evictions"] += 1

    def _drop_other_domains(self, line_pa: int, slot: int) -> None:
        for other in list(self._slots_of_line.get(line_pa, ())):
            if other != slot:
                self._evict((other << DOMAIN_SHIFT) | line_pa)

    def _write_back_other_domains(self, line_pa: int, slot: int) -> None:
        for other in self._slots_of_line.get(line_pa, ()):
            key = (other << DOMAIN_SHIFT) | line_pa
            if other != slot and key in self._dirty:
                self._dirty.discard(key)
                self._memctl.write_line(line_pa, other, bytes(self._get(key)))
                self.stats["writebacks"] += 1

    def _flush_line(self, line_pa: int, slot: int) -> None:
        key = (slot << DOMAIN_SHIFT) | line_pa
        if self._get(key) is not None:
            self._evict(key)

    # ---- CPU accesses -----------------------------------------------------------------
    def read(self, pa: int, n: int, slot: int, memtype: MemType = MemType.WB) -> bytes:
        """Read n bytes at pa (may span lines) in the given domain."""
        if self.upper:
            self._sync(pa, n)
        if memtype in (MemType.UC, MemType.WC, MemType.UC_MINUS):
            for line_pa in _lines_of(pa, n):
                if self.coherent:
                    self._drop_other_domains(line_pa, slot)
                self._flush_line(line_pa, slot)
            return self._memctl.read(pa, n, slot)
        if (pa & LINE_MASK) + n <= LINE_SIZE:
            off = pa & LINE_MASK
            return bytes(self._line(pa - off, slot)[off : off + n])
        out = bytearray()
        for line_pa in _lines_of(pa, n):
            lo, hi = max(pa, line_pa), min(pa + n, line_pa + LINE_SIZE)
            out += self._line(line_pa, slot)[lo - line_pa : hi - line_pa]
        return bytes(out)

    def read_page_into(self, page_pa: int, slot: int, out: np.ndarray) -> None:
        """A whole page as this domain sees it, into ``out``, without allocating lines:
        resident lines of the domain as they are, the rest decrypted from DRAM (what a
        cache level above this one loads; with HwEnforcedCacheCoh the other domains'
        lines of the page are written back and dropped first)."""
        if self.upper:
            self._sync(page_pa, 4096)
        if page_pa in self._lines_in_page:
            if self.coherent:
                for line_pa in range(page_pa, page_pa + 4096, LINE_SIZE):
                    if line_pa in self._slots_of_line:
                        self._drop_other_domains(line_pa, slot)
            self._memctl.read_into(page_pa, out, slot)
            for index, line in self._pages.get((slot << DOMAIN_SHIFT) | page_pa, {}).items():
                out[index * LINE_SIZE : (index + 1) * LINE_SIZE] = np.frombuffer(line, np.uint8)
        else:
            self._memctl.read_into(page_pa, out, slot)

    def write(self, pa: int, data: bytes, slot: int, memtype: MemType = MemType.WB) -> None:
        if self.upper:
            self._sync(pa, len(data))
        n = len(data)
        self._dram.touch(pa, n)
        for line_pa in _lines_of(pa, n):
            lo, hi = max(pa, line_pa), min(pa + n, line_pa + LINE_SIZE)
            part = data[lo - pa : hi - pa]
            key = (slot << DOMAIN_SHIFT) | line_pa
            if memtype == MemType.WB:
                self._line(line_pa, slot, fill=hi - lo < LINE_SIZE)[lo - line_pa : hi - line_pa] = (
                    part
                )
                self._dirty.add(key)
                continue
            if self.coherent:
                self._drop_other_domains(line_pa, slot)
            line = self._get(key)
            if memtype == MemType.WT and line is not None and key not in self._dirty:
                line[lo - line_pa : hi - line_pa] = part  # stays clean
            else:
                self._flush_line(line_pa, slot)  # WP, UC, WC: the line must not survive
            self._memctl.write(lo, part, slot)

    # ---- flushes ------------------------------------------------------------------------
    def clflush(self, pa: int, slot: int) -> None:
        """CLFLUSH: write back and invalidate the line of pa *in this domain only*; other
        domains' lines of the same address survive unless the hardware is coherent."""
        if self.upper:
            self._sync(pa, 1)
        line_pa = pa & ~LINE_MASK
        if self.coherent:
            self._drop_other_domains(line_pa, slot)
        self._flush_line(line_pa, slot)

    def clflush_range(self, pa: int, n: int, slot: int) -> None:
        """CLFLUSH of every line of [pa, pa+n) (one physical page at most), skipping the
        lines that are not cached at all."""
        if self.upper:
            self._sync(pa, n)
        if (pa & ~0xFFF) in self._lines_in_page:
            for line_pa in _lines_of(pa, n):
                self.clflush(line_pa, slot)

    def flush_page(self, page_pa: int, slot: int) -> int:
        """VM_PAGE_FLUSH: write back and invalidate one page's lines of one domain.
        Returns how many lines were flushed."""
        if self.upper:
            self._sync(page_pa, 1)
        flushed = 0
        lines = self._pages.get((slot << DOMAIN_SHIFT) | page_pa, {})
        for index in sorted(lines):
            self._evict((slot << DOMAIN_SHIFT) | page_pa | index << 6)
            flushed += 1
        return flushed

    def wbinvd(self, invalidate: bool = True) -> int:
        """WBINVD (or WBNOINVD with invalidate=False): write back every dirty line of
        every domain, set by set, oldest first within a set (so of two aliases of one
        address, the older is written first and the newer stays in DRAM). Returns how many
        lines were written back."""
        while self.upper:
            page_pa, sync = self.upper.popitem()
            sync([page_pa], None)
        written = len(self._dirty)
        self._write_back_all()
        self._dirty.clear()
        self.stats["writebacks"] += written
        if invalidate:
            self.stats["evictions"] += self._count
            for lines in self._pages.values():
                lines.clear()  # a core's fast path may hold these dicts: it must miss now
            self._pages.clear()
            self._sets.clear()
            self._slots_of_line.clear()
            self._lines_in_page.clear()
            self._count = 0
        return written

    def _write_back_all(self) -> None:
        """All dirty lines to DRAM, batched: contiguous lines of one domain go through the
        engine's bulk path in one call."""
        runs: list[tuple[int, int, list[bytearray]]] = []  # (slot, first line PA, lines)
        for key in sorted(self._dirty):
            slot, line_pa = key >> DOMAIN_SHIFT, key & ADDR_MASK
            line = self._get(key)
            assert line is not None
            last = runs[-1] if runs else None
            if last and last[0] == slot and last[1] + LINE_SIZE * len(last[2]) == line_pa:
                last[2].append(line)
            else:
                runs.append((slot, line_pa, [line]))
        for slot, pa, lines in runs:
            if len(lines) == 1:
                self._memctl.write_line(pa, slot, bytes(lines[0]))
            else:
                self._memctl.write_from(pa, np.frombuffer(b"".join(lines), dtype=np.uint8), slot)
        # Aliases dirty in several domains: the newest (last in its set) must end up in DRAM.
        for line_pa, slots in self._slots_of_line.items():
            dirty = [s for s in slots if ((s << DOMAIN_SHIFT) | line_pa) in self._dirty]
            if len(dirty) > 1:
                ways = self._sets[(line_pa >> 6) & self._set_mask]
                newest = max(dirty, key=lambda s: ways.index((s << DOMAIN_SHIFT) | line_pa))
                line = self._get((newest << DOMAIN_SHIFT) | line_pa)
                self._memctl.write_line(line_pa, newest, bytes(line))

    def write_through(
        self, pa: int, data: np.ndarray, slot: int, older_aliases_first: bool = False
    ) -> None:
        """Whole lines a cache level above writes back while a fabric access of the same
        domain snoops them: they go on to DRAM in one bulk write, which is where that snoop
        would put them next (``write`` then the snoop's write-back, without making each a
        dirty line first). This domain's own lines of the range are older and go; with
        HwEnforcedCacheCoh the other domains' lines are written back and dropped first, as
        an allocation would do. MODEL: no line is left behind (the line-level path would
        leave them clean), and nothing is evicted to make room.

        ``older_aliases_first`` (lines that would have entered the cache and been evicted
        in turn): without coherence, another domain's dirty copy of a line is older and
        would have been evicted first, so it is written back (and left clean) before the
        new data goes to DRAM, keeping the aliasing outcome of §4.1."""
        n = len(data)
        lines_in_page = self._lines_in_page
        for page_pa in range(pa & ~0xFFF, pa + n, 4096):  # every page of the range
            if page_pa not in lines_in_page:
                continue
            lo, hi = max(pa, page_pa), min(pa + n, page_pa + 4096)
            for line_pa in _lines_of(lo, hi - lo):
                if line_pa not in self._slots_of_line:
                    continue
                if self.coherent:
                    self._drop_other_domains(line_pa, slot)
                elif older_aliases_first:
                    self._write_back_other_domains(line_pa, slot)
                key = (slot << DOMAIN_SHIFT) | line_pa
                if self._get(key) is not None:
                    self._dirty.discard(key)  # overwritten below: no write-back
                    self._evict(key)
        if n >= BULK_MIN:
            self._memctl.write_from(pa, data, slot)
        else:
            self._memctl.write(pa, data.tobytes(), slot)
        self.stats["writebacks"] += n // LINE_SIZE

    def snoop(self, pa: int, n: int, slot: int, invalidate: bool) -> None:
        """What a fabric access (firmware, DMA) does to the cache before it reaches DRAM:
        write back the same domain's dirty lines of the range (and drop them for a write);
        with HwEnforcedCacheCoh, write back and drop the other domains' lines too."""
        if self.upper:
            self._sync(pa, n, (slot, pa & ~LINE_MASK, pa + n))
        slots_of_line = self._slots_of_line
        lines_in_page = self._lines_in_page
        cached: list[int] = []
        for page_pa in range(pa & ~0xFFF, pa + n, 4096):  # skip pages with nothing cached
            if page_pa in lines_in_page:
                lo, hi = max(pa, page_pa), min(pa + n, page_pa + 4096)
                cached.extend(_lines_of(lo, hi - lo))
        for line_pa in cached:
            if line_pa not in slots_of_line:
                continue
            if self.coherent:
                self._drop_other_domains(line_pa, slot)
            key = (slot << DOMAIN_SHIFT) | line_pa
            line = self._get(key)
            if line is None:
                continue
            if invalidate:
                self._evict(key)
            elif key in self._dirty:
                self._dirty.discard(key)
                self._memctl.write_line(line_pa, slot, bytes(line))
                self.stats["writebacks"] += 1

    # ---- inspection (what a debugger or a test may look at; holds no keys) -----------------
    def resident(self, pa: int) -> list[tuple[int, bool]]:
        """The domains (slots) holding the line of pa, each with its dirty flag."""
        line_pa = pa & ~LINE_MASK
        return [
            (slot, line_key(line_pa, slot) in self._dirty)
            for slot in self._slots_of_line.get(line_pa, ())
        ]

    def dirty_lines(self) -> Iterator[tuple[int, int]]:
        """(line PA, slot) of every dirty line."""
        for key in self._dirty:
            yield key & ADDR_MASK, key >> DOMAIN_SHIFT

    def __len__(self) -> int:
        return self._count


def _lines_of(pa: int, n: int) -> range:
    return range(pa & ~LINE_MASK, pa + n, LINE_SIZE) if n else range(0)


# ---- the fabric's single-line snoop (its small accesses: command buffers, headers) ----------
def snoop_line(
    cache: Cache, line_pa: int, slot: int, invalidate: bool, whole: bool
) -> bytes | None:
    """``Cache.snoop`` of one line that also returns this domain's copy of it, if resident,
    so the fabric need not decrypt DRAM again for what the probe just saw. ``whole``: the
    caller is about to write the whole line to DRAM, so a dirty copy is dropped without
    its write-back (the caller's write supersedes it)."""
    if cache.upper:
        cache._sync(line_pa, LINE_SIZE)
    if line_pa not in cache._slots_of_line:
        return None
    if cache.coherent:
        cache._drop_other_domains(line_pa, slot)
    key = (slot << DOMAIN_SHIFT) | line_pa
    line = cache._get(key)
    if line is None:
        return None
    data = bytes(line)
    if whole:
        cache._dirty.discard(key)
        cache._evict(key)
    elif invalidate:
        cache._evict(key)
    elif key in cache._dirty:
        cache._dirty.discard(key)
        cache._memctl.write_line(line_pa, slot, data)
        cache.stats["writebacks"] += 1
    return data
