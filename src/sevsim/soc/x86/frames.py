"""The engine's fast memory: a page-granular cache of the model's cache.

The instruction engine reads and writes host memory directly, at full speed, through its
own TLB. What it reads must be exactly what the model's cache and memory controller yield,
so the engine never sees DRAM: it sees *frames*, one 4 KiB plaintext copy per (key slot,
system-physical page) — the page as the line-level cache would give it to that encryption
domain. A frame is a cache above the model's cache, with these points of write-back and
invalidation (docs/model.md, "The instruction engine"):

* **Fill.** On the engine's first access to a page, the frame is loaded from the model's
  cache (``Cache.read_page_into``: the domain's resident lines, the rest decrypted from
  DRAM with the domain's key).
* **Write-back.** A 64-byte line a frame changed since its fill is written into the
  model's cache, as a dirty line of the frame's domain, the moment anything else touches
  that page through the cache: another core or vCPU, the hypervisor through its own
  mapping, DMA and the PSP (fabric snoops), CLFLUSH, VM_PAGE_FLUSH, WBINVD (every page).
  After a #VMEXIT the pages the engine may have written are registered with the model's
  cache for that (``Cache.upper``). So every observer sees what the line-level model would
  show: plaintext in the cache, ciphertext in DRAM only after a flush — a cold-boot dump,
  which reads DRAM, does not see the engine's data any more than a cache's.
* **Invalidation.** Every write to the model's memory — a cache line written, a DRAM
  write by any agent — advances its page's generation (``DRAM.touch``). Before the engine
  runs again, a frame whose page moved on is stale and reloads on its next use, so a
  hypervisor that rewrote a page's ciphertext (or DMA, the PSP, another vCPU) is seen;
  with HwEnforcedCacheCoh, a fill in one domain also drops the engine's copies of the page
  in the other domains. A frame whose contents
  changed while the engine had translated code from it gets a new engine address, so no
  stale translated code can run.

MODEL: a page is the unit of this level (a real L1 holds lines); a frame fill allocates no
line in the model's cache, and a line the engine rewrote with the same bytes is not dirty.
So the model's cache may hold fewer clean lines than a line-level engine would leave
there; the data any reader sees is the same, except that a clean line of one domain that
a line-level engine would have kept (and that another domain's write to DRAM would make
stale on a part without HwEnforcedCacheCoh) is read fresh instead.
"""

from __future__ import annotations

import numpy as np

from sevsim.soc.cache import DOMAIN_SHIFT, Cache

PAGE = 4096
LINE = 64
FRAME_BASE = 1 << 40  # where frames live in the engine's physical address space
CHUNK_FRAMES = 512  # frames are mapped 2 MiB at a time
MAX_FRAMES = 16384  # 64 MiB of frames (and as much of snapshots): past it, start over


class Frame:
    __slots__ = (
        "addr",
        "view",
        "snapshot",
        "slot",
        "page_pa",
        "gen",
        "version",
        "executed",
        "written",
    )

    def __init__(self, addr: int, view: np.ndarray) -> None:
        self.addr = addr
        self.view = view  # the engine's bytes (mapped into the engine)
        self.snapshot = np.empty(PAGE, dtype=np.uint8)  # the model's bytes at the last sync
        self.slot = -1
        self.page_pa = -1
        self.gen = -1
        self.version = -1  # the page's change generation (DRAM.page_gen) the frame matches
        self.executed = False  # the engine translated code from it
        self.written = False  # the engine may have written it (it was given write access)


class FrameCache:
    def __init__(self, map_chunk, cache: Cache, flush_engine_tlb, drop_host_fast_paths) -> None:
        self._map_chunk = map_chunk  # (engine address, numpy buffer) -> None
        self._flush_engine_tlb = flush_engine_tlb
        self._drop_host_fast_paths = drop_host_fast_paths
        self._cache = cache
        self._page_gen = cache._dram.page_gen
        self._chunks: list[np.ndarray] = []
        self._free: list[Frame] = []
        self._retired: list[Frame] = []  # may still have translated code: reuse after a TB flush
        self._by_key: dict[int, Frame] = {}
        self._by_page: dict[int, list[Frame]] = {}  # page PA -> its frames (all domains)
        self._live: list[Frame] = []  # frames loaded in this run
        # Pages of frames the engine may have written (a superset after frames go stale):
        # what ``end_run`` registers with the model's cache, without a pass over every frame.
        self._written_pages: set[int] = set()
        self._run_clock = -1  # DRAM's change clock when the frames were last all current
        self._scratch = np.empty(PAGE, dtype=np.uint8)
        self.gen = 0
        self.max_frames = MAX_FRAMES
        self.stats = {"fills": 0, "reloads": 0, "lines_written_back": 0, "shrinks": 0}

    def __len__(self) -> int:
        return len(self._by_key)

    def _new_frame(self) -> Frame:
        if not self._free:
            base = FRAME_BASE + len(self._chunks) * CHUNK_FRAMES * PAGE
            chunk = np.zeros(CHUNK_FRAMES * PAGE, dtype=np.uint8)
            self._map_chunk(base, chunk)
            self._chunks.append(chunk)
            self._free = [
                Frame(base + i * PAGE, chunk[i * PAGE : (i + 1) * PAGE])
                for i in reversed(range(CHUNK_FRAMES))
            ]
        return self._free.pop()

    def mark_written(self, frame: Frame) -> None:
        frame.written = True
        self._written_pages.add(frame.page_pa)

    def lookup(self, slot: int, page_pa: int) -> Frame | None:
        """The frame of (slot, page) if it is current in this run."""
        frame = self._by_key.get(slot << DOMAIN_SHIFT | page_pa)
        return frame if frame is not None and frame.gen == self.gen else None

    def frame(self, slot: int, page_pa: int) -> Frame:
        """The current frame of (slot, page), loading it from the model's cache if needed."""
        key = slot << DOMAIN_SHIFT | page_pa
        frame = self._by_key.get(key)
        if frame is not None and frame.gen == self.gen:
            return frame
        if self._cache.coherent:
            self._drop_other_domains(slot, page_pa)
        data = self._scratch
        self._cache.read_page_into(page_pa, slot, data)
        if frame is not None:
            if np.array_equal(frame.view, data):
                frame.gen = self.gen
                frame.version = self._page_gen.get(page_pa >> 12, 0)
                self._live.append(frame)
                if frame.written:  # the engine's TLB may still let it write there
                    self._written_pages.add(page_pa)
                return frame
            self.stats["reloads"] += 1
            if frame.executed:
                # Translated code may exist for this engine address: retire it.
                self._retired.append(frame)
                frame = None
        if frame is None:
            old = self._by_key.get(key)
            if old is not None:
                self._by_page[page_pa].remove(old)
            frame = self._new_frame()
            frame.slot, frame.page_pa, frame.executed, frame.written = slot, page_pa, False, False
            self._by_key[key] = frame
            self._by_page.setdefault(page_pa, []).append(frame)
        frame.view[:] = data
        frame.snapshot[:] = data
        if frame.written:
            self._written_pages.add(page_pa)
        frame.gen = self.gen
        frame.version = self._page_gen.get(page_pa >> 12, 0)
        self._live.append(frame)
        self.stats["fills"] += 1
        return frame

    def _drop_other_domains(self, slot: int, page_pa: int) -> None:
        """HwEnforcedCacheCoh: the engine's copies of this page in other domains are written
        back and dropped before this domain uses it, as the cache does with its lines."""
        others = [f for f in self._by_page.get(page_pa, ()) if f.slot != slot and f.gen == self.gen]
        if not others:
            return
        self.write_back(others)
        for frame in others:
            frame.gen = -1  # stale: reloaded from the model if used again
        self._flush_engine_tlb()

    def write_back(
        self,
        frames: list[Frame] | None = None,
        snoop: tuple[int, int, int] | None = None,
        evict: bool = False,
    ) -> None:
        """Every line the engine changed goes into the model's cache (dirty, in the frame's
        domain). Frames stay current. For a fabric ``snoop`` (key slot, first PA, end PA),
        the lines of that domain inside its range go on to DRAM in bulk
        (``Cache.write_through``), as the snoop would write them back next. With ``evict``
        every changed line goes on to DRAM in bulk: a write-back of more than the model's
        cache holds, whose lines would be evicted on the way anyway."""
        cache = self._cache
        frames = self._live if frames is None else frames
        for frame in frames:
            cache.upper.pop(frame.page_pa, None)  # this is the write-back it would ask for
        through: list[tuple[int, np.ndarray, int]] = []  # (PA, lines, slot) to DRAM
        written = [frame for frame in frames if frame.written]
        if not written:
            return
        # Which lines changed, for all the frames in one comparison (a page's worth of
        # numpy calls each would cost more than the comparison itself).
        lines = PAGE // LINE
        if len(written) == 1:  # a snoop of one page, the common case: no stacking copy
            views, snapshots = written[0].view, written[0].snapshot
        else:
            views = np.stack([f.view for f in written])
            snapshots = np.stack([f.snapshot for f in written])
        changed_lines = (views.reshape(-1, lines, LINE) != snapshots.reshape(-1, lines, LINE)).any(
            axis=2
        )
        whole = changed_lines.all(axis=1).tolist()
        some = changed_lines.any(axis=1).tolist()
        for i, frame in enumerate(written):
            if not some[i]:
                continue
            if whole[i]:
                runs = [(0, lines - 1)]
                count = lines
            else:
                changed = np.flatnonzero(changed_lines[i])
                count = len(changed)
                # Contiguous runs of changed lines, one cache write each.
                pieces = np.split(changed, np.flatnonzero(np.diff(changed) != 1) + 1)
                runs = [(int(run[0]), int(run[-1])) for run in pieces]
            for first, last in runs:
                lo, hi = first * LINE, (last + 1) * LINE
                # Lines inside the snoop's range, in its domain, go on to DRAM (where the
                # snoop puts them next); the rest become dirty lines, as they would be.
                a, b = hi, hi
                if evict:
                    a = lo
                elif snoop is not None and frame.slot == snoop[0]:
                    a = min(max(snoop[1] - frame.page_pa, lo), hi)
                    b = min(max(snoop[2] - frame.page_pa, lo), hi)
                    b = min((b + LINE - 1) & ~(LINE - 1), hi)
                if a > lo:
                    cache.write(frame.page_pa + lo, frame.view[lo:a].tobytes(), frame.slot)
                if b > a:
                    through.append((frame.page_pa + a, frame.view[a:b], frame.slot))
                if hi > b:
                    cache.write(frame.page_pa + b, frame.view[b:hi].tobytes(), frame.slot)
                frame.snapshot[lo:hi] = frame.view[lo:hi]
            self.stats["lines_written_back"] += count
        # Runs that continue from one page into the next go to DRAM as one bulk write: the
        # engine's set-up is paid once per run, not once per page.
        start = 0
        for i in range(1, len(through) + 1):
            if i < len(through):
                pa, data, slot = through[i - 1]
                if through[i][0] == pa + len(data) and through[i][2] == slot:
                    continue
            pa, data, slot = through[start]
            if i - start > 1:
                data = np.concatenate([piece for _, piece, _ in through[start:i]])
            cache.write_through(pa, data, slot, older_aliases_first=evict)
            start = i

    def release(self) -> None:
        """The engine goes away: what it changed goes to the model's cache, then every frame
        and chunk is let go at once (not left to Python's cycle collector)."""
        self.write_back([f for f in self._by_key.values() if f.gen == self.gen])
        for page_pa in self._by_page:
            if self._cache.upper.get(page_pa) == self._sync_pages:
                del self._cache.upper[page_pa]
        self._chunks, self._free, self._retired, self._live = [], [], [], []
        self._by_key, self._by_page = {}, {}
        self._written_pages = set()

    def write_back_line(self, slot: int, line_pa: int) -> None:
        """Write back one line (CLFLUSH), if its frame holds a change."""
        frame = self.lookup(slot, line_pa & ~0xFFF)
        if frame is None or not frame.written:
            return
        lo = line_pa & 0xFC0
        if not np.array_equal(frame.view[lo : lo + LINE], frame.snapshot[lo : lo + LINE]):
            self._cache.write(line_pa, frame.view[lo : lo + LINE].tobytes(), slot)
            frame.snapshot[lo : lo + LINE] = frame.view[lo : lo + LINE]
            self.stats["lines_written_back"] += 1

    def end_run(self) -> None:
        """Control goes back to the host. Nothing is copied now: the pages the engine may
        have written are registered with the model's cache, which asks for them back
        (``_sync_pages``) the moment anyone touches them, as a cache above it would be
        snooped. The frames stay, with their page's generation as it is now."""
        upper, sync = self._cache.upper, self._sync_pages
        fresh = self._written_pages.difference(upper)
        for page_pa in fresh:
            upper[page_pa] = sync
        if self._cache._dram.clock != self._run_clock:
            # Something wrote memory during the run (a CLFLUSH write-back, an exception
            # frame the model pushed): the frames are current, at the pages' new versions.
            gen = self._page_gen
            for frame in self._live:
                frame.version = gen.get(frame.page_pa >> 12, 0)
        if fresh:
            self._drop_host_fast_paths()  # their direct line maps must now come via the cache

    def _sync_pages(self, pages: list[int], snoop: tuple[int, int, int] | None) -> None:
        """What the model's cache calls before anyone touches these pages."""
        by_page = self._by_page
        frames = [f for page_pa in pages for f in by_page.get(page_pa, ()) if f.gen == self.gen]
        self.write_back(frames, snoop)
        gen = self._page_gen
        for frame in frames:
            frame.version = gen.get(frame.page_pa >> 12, 0)

    def invalidate(self) -> None:
        """WBINVD: every frame was written back (the cache asked for it); all are dropped,
        so the next access reads what DRAM now holds."""
        self.write_back()
        self._live = []
        self.gen += 1

    def revalidate(self) -> int:
        """Before the engine runs again: a frame whose page changed since (anything wrote
        it: the hypervisor, DMA, the PSP, another vCPU, a write-back) is stale, and is
        reloaded from the model now, in place. Returns how many frames moved to a new
        engine address (a reloaded page the engine had translated code from), after which
        the engine's TLB must go; a frame reloaded in place keeps the engine's TLB entries
        to it valid, so a device that wrote one status byte does not cost the engine every
        TLB entry it had. (Nothing else runs between now and the engine's next access, so
        loading now reads what loading then would.)

        A page another engine (another vCPU) may have written since is snooped first: its
        lines are written back into the model's cache, which moves the page on, as a
        coherent cache hierarchy makes one core's stores visible to the others. Without
        this, a frame here would keep reading what the page held before."""
        upper, own = self._cache.upper, self._sync_pages
        if len(upper) < len(self._live):  # look from the smaller side
            pages = [
                page_pa
                for page_pa, sync in upper.items()
                if sync != own and any(f.gen == self.gen for f in self._by_page.get(page_pa, ()))
            ]
        else:
            pages = [f.page_pa for f in self._live if f.page_pa in upper]
        for page_pa in pages:
            sync = upper.get(page_pa)
            if sync is not None and sync != own:
                del upper[page_pa]
                sync([page_pa], None)
        gen = self._page_gen
        keep, stale = [], []
        for frame in self._live:
            if frame.gen != self.gen:
                continue
            if gen.get(frame.page_pa >> 12, 0) == frame.version:
                keep.append(frame)
            else:
                frame.gen = -1
                stale.append(frame)
        self._live = keep
        moved = 0
        for frame in stale:
            if self.frame(frame.slot, frame.page_pa) is not frame:
                moved += 1
        self._run_clock = self._cache._dram.clock
        return moved

    def shrink_if_full(self) -> bool:
        """Between two runs: past ``max_frames``, write every frame back and drop them all
        (the next run reloads what it touches), so the engine's memory stays bounded
        however much memory a guest touches. True if it did."""
        if len(self._by_key) <= self.max_frames:
            return False
        self.write_back(evict=True)  # more than the model's cache holds: on to DRAM
        self.invalidate()
        self.stats["shrinks"] += 1
        self._retired.extend(self._by_key.values())
        self._by_key.clear()
        self._written_pages.clear()  # every frame is retired: none is current any more
        self._by_page.clear()
        return True

    def recycle(self, flush_translations) -> None:
        """Reuse retired frames once the engine's translated code has been flushed."""
        if self._retired:
            flush_translations()
            self._free.extend(self._retired)
            self._retired = []
