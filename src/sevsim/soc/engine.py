"""The AES engine in the memory controller (hardware.md §5).

Every aligned 16-byte block is encrypted on its own with AES under the key of its key slot
and a tweak T taken from its system physical address:

* ``xe``  (Zen 1):        C = E_K(P ^ T(pa)),          P = D_K(C) ^ T(pa)
* ``xex`` (Zen 2 and up): C = E_K(P ^ T(pa)) ^ T(pa),  P = D_K(C ^ T(pa)) ^ T(pa)

Deterministic, no integrity: the same key, address and plaintext always give the same
ciphertext, and a flipped ciphertext bit garbles exactly one block.

Two paths, one formula: a bulk path over whole blocks (numpy, 256 KiB chunks so the tweak
table and scratch buffer stay in the L2 cache) and a line path for 64-byte cache fills and
write-backs (512-bit Python integers, one ECB call per line). Tests check that both agree
with a block-by-block reference.

The real engine is pipelined hardware in every memory channel; the model's bulk path
spreads a large request over *lanes*, one per host core: the calling thread and worker
threads take its chunks one at a time until none is left (``update_into`` and numpy's XOR
release the GIL). A worker that starts late, on a busy machine, finds less or nothing to
do, so the caller never waits for one to be scheduled. Each lane has its own ECB contexts
(a context is not thread-safe) and scratch buffers.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevsim.soc.tweak import CHUNK_SIZE, TweakFunction

EngineMode = Literal["xe", "xex"]
ENGINE_MODES: tuple[EngineMode, ...] = ("xe", "xex")
PATTERN_WORDS = 1024  # uint64 words per row when a chunk's base tweak is XORed in
# One lane per host core the process may use; capped at 4, as more were never measured.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
LANES = max(1, min(4, _CORES or 1))
# Below this a request stays on the calling thread: waking a worker costs tens of
# microseconds, as much as encrypting a hundred KiB.
PARALLEL_MIN = 4 * CHUNK_SIZE


class SlotCipher:
    """The AES contexts of one key slot, one pair per lane. The key bytes are not kept."""

    __slots__ = ("_enc", "_dec", "_lanes")

    def __init__(self, key: bytes, lanes: int = LANES) -> None:
        if len(key) not in (16, 32):
            raise ValueError("a key slot holds an AES-128 or AES-256 key")
        algorithm = algorithms.AES(key)
        self._lanes = tuple(
            (Cipher(algorithm, modes.ECB()).encryptor(), Cipher(algorithm, modes.ECB()).decryptor())
            for _ in range(lanes)
        )
        self._enc, self._dec = self._lanes[0]  # lane 0: the calling thread, and the line path

    def __repr__(self) -> str:
        return "<SlotCipher (key not readable)>"


class _Lane:
    """One lane's scratch: the tweaks of the current chunk and the pre-ECB buffer."""

    def __init__(self) -> None:
        self.tw = np.empty(CHUNK_SIZE // 8, dtype=np.uint64)
        # The chunk base whose tweaks ``tw`` holds for a whole chunk (None: it holds part
        # of one). The next whole chunk's tweaks differ by the XOR of the two bases, so the
        # table stays in the cache and is updated in place instead of rebuilt.
        self.base: int | None = None
        self.pat = np.empty(PATTERN_WORDS, dtype=np.uint64)  # a 128-bit value, repeated
        self.pat_blocks = self.pat.view(np.dtype("V16"))
        self.buf = np.empty(CHUNK_SIZE, dtype=np.uint8)  # P ^ T, or ECB's output
        self.buf64 = self.buf.view(np.uint64)
        self.last = np.empty(32, dtype=np.uint8)  # a block, and update_into's 15 spare bytes

    def pattern(self, value: int) -> np.ndarray:
        # One 16-byte fill (blocks are little-endian integers, as in tweak.py): a quarter
        # of the cost of two strided uint64 stores.
        self.pat_blocks.fill(value.to_bytes(16, "little"))
        return self.pat

    def tweaks(self, offsets: np.ndarray, base: int, off: int, words: int) -> np.ndarray:
        """The tweaks of ``words`` uint64 words from byte ``off`` of a chunk whose base tweak
        is ``base``."""
        tw = self.tw
        # XOR with the base repeated in rows of PATTERN_WORDS: much faster than two
        # strided column XORs (numpy's inner loop then runs over contiguous words).
        if words == len(tw):
            rows = tw.reshape(-1, PATTERN_WORDS)
            if self.base is None:
                np.bitwise_xor(offsets.reshape(-1, PATTERN_WORDS), self.pattern(base), out=rows)
            elif self.base != base:
                np.bitwise_xor(rows, self.pattern(base ^ self.base), out=rows)
            self.base = base
            return tw
        self.base = None
        pat = self.pattern(base)
        wf = offsets[off >> 3 : (off >> 3) + words]
        full = words - words % PATTERN_WORDS
        if full:
            np.bitwise_xor(
                wf[:full].reshape(-1, PATTERN_WORDS),
                pat,
                out=tw[:full].reshape(-1, PATTERN_WORDS),
            )
        if full < words:
            np.bitwise_xor(wf[full:], pat[: words - full], out=tw[full:words])
        return tw[:words]


class _Job:
    """A large request's chunks, handed out one at a time to whichever lane asks."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.next = 0
        self.busy = 0  # pieces being worked on
        self.error: BaseException | None = None
        self.cond = threading.Condition(threading.Lock())

    def claim(self) -> int | None:
        with self.cond:
            if self.next >= self.pieces:
                return None
            self.next += 1
            self.busy += 1
            return self.next - 1

    def release(self) -> None:
        with self.cond:
            self.busy -= 1
            if not self.busy:
                self.cond.notify_all()

    def close(self) -> None:
        """No more claims; wait for the pieces in flight (they write into the caller's
        buffers and the lanes' scratch)."""
        with self.cond:
            self.next = self.pieces
            self.cond.wait_for(lambda: not self.busy)


_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


def _worker_pool() -> ThreadPoolExecutor:
    """The process's lane workers (LANES - 1 threads), started on first use."""
    global _workers
    with _workers_lock:
        if _workers is None:
            workers = max(1, LANES - 1)
            _workers = ThreadPoolExecutor(workers, thread_name_prefix="sevsim-aes-lane")
        return _workers


def _forget_workers() -> None:
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()  # a forked child has no worker threads


os.register_at_fork(after_in_child=_forget_workers)


class AesEngine:
    def __init__(self, mode: EngineMode, tweak: TweakFunction, lanes: int = LANES) -> None:
        """``lanes``: how many threads (the caller and lanes - 1 workers) work on a large
        request; the slot ciphers used with this engine must have at least as many."""
        if mode not in ENGINE_MODES:
            raise ValueError(f"engine mode must be one of {ENGINE_MODES}, not {mode!r}")
        self.mode: EngineMode = mode
        self._xex = mode == "xex"
        self._tweak = tweak
        self._offsets = tweak.chunk_offsets.reshape(-1)
        self._lanes = [_Lane() for _ in range(lanes)]

    def __repr__(self) -> str:
        return f"<AesEngine mode={self.mode}>"

    # ---- line path: one 64-byte cache line -------------------------------------------
    def encrypt_line(self, cipher: SlotCipher, line_pa: int, plaintext: bytes) -> bytes:
        tw = self._tweak.line_int(line_pa)
        x = (int.from_bytes(plaintext, "little") ^ tw).to_bytes(64, "little")
        c = cipher._enc.update(x)
        if self._xex:
            return (int.from_bytes(c, "little") ^ tw).to_bytes(64, "little")
        return c

    def decrypt_line(self, cipher: SlotCipher, line_pa: int, ciphertext: bytes) -> bytes:
        tw = self._tweak.line_int(line_pa)
        if self._xex:
            ciphertext = (int.from_bytes(ciphertext, "little") ^ tw).to_bytes(64, "little")
        p = cipher._dec.update(bytes(ciphertext))
        return (int.from_bytes(p, "little") ^ tw).to_bytes(64, "little")

    # ---- bulk path: any 16-byte aligned range -----------------------------------------
    def encrypt(self, cipher: SlotCipher, pa: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Encrypt src (plaintext for [pa, pa+len)) into dst. Both uint8, same length."""
        self._bulk(cipher, pa, src, dst, encrypt=True)

    def decrypt(self, cipher: SlotCipher, pa: int, src: np.ndarray, dst: np.ndarray) -> None:
        self._bulk(cipher, pa, src, dst, encrypt=False)

    def _bulk(self, cipher: SlotCipher, pa: int, src, dst, encrypt: bool) -> None:
        n = len(src)
        if pa % 16 or n % 16 or len(dst) != n:
            raise ValueError("the engine works on whole, aligned 16-byte blocks")
        which = 0 if encrypt else 1
        lanes = min(len(self._lanes), len(cipher._lanes))
        if n < PARALLEL_MIN or lanes == 1:
            self._run(0, cipher._lanes[0][which], pa, src, dst, encrypt)
            return
        first = pa & -CHUNK_SIZE
        job = _Job((pa + n - first + CHUNK_SIZE - 1) // CHUNK_SIZE)
        try:  # whatever happens, no worker writes into dst once this returns
            pool = _worker_pool()
            for i in range(1, lanes):
                try:
                    pool.submit(self._take, job, i, cipher._lanes[i][which], pa, src, dst, encrypt)
                except RuntimeError:  # the interpreter is shutting down: the caller does it all
                    break
            self._take(job, 0, cipher._lanes[0][which], pa, src, dst, encrypt)
        finally:
            job.close()
        if job.error is not None:
            raise job.error  # a worker's exception is the caller's

    def _take(self, job: _Job, lane: int, ctx, pa: int, src, dst, encrypt: bool) -> None:
        """Work on the job's chunks until none is left."""
        first, end = pa & -CHUNK_SIZE, pa + len(src)
        while (k := job.claim()) is not None:
            try:
                lo = max(pa, first + k * CHUNK_SIZE) - pa
                hi = min(end, first + (k + 1) * CHUNK_SIZE) - pa
                self._run(lane, ctx, pa + lo, src[lo:hi], dst[lo:hi], encrypt)
            except BaseException as error:
                if job.error is None:
                    job.error = error
                if lane:
                    return  # a worker stops; the caller goes on and then raises
                raise
            finally:
                job.release()

    def _run(self, lane_index: int, ctx, pa: int, src, dst, encrypt: bool) -> None:
        """One lane's share: per chunk, XOR the tweak in, ECB, XOR it out."""
        lane = self._lanes[lane_index]
        buf, buf64_all, last = lane.buf, lane.buf64, lane.last
        tweak, offsets = self._tweak, self._offsets
        xor_in = encrypt or self._xex  # xe decryption runs D_K on the ciphertext itself
        xor_out = not encrypt or self._xex  # xe encryption stores E_K's output as it is
        n = len(src)
        chunk_mask = CHUNK_SIZE - 1
        pos = 0
        while pos < n:
            cur = pa + pos
            off = cur & chunk_mask
            length = min(n - pos, CHUNK_SIZE - off)
            words = length >> 3
            end = pos + length
            # Tweaks of this span: the chunk's base tweak XOR the in-chunk table (linearity).
            tw = lane.tweaks(offsets, tweak.chunk_base(cur - off), off, words)
            s = src[pos:end]
            if xor_in:
                np.bitwise_xor(s.view(np.uint64), tw, out=buf64_all[:words])  # P ^ T, or C ^ T
                s = buf[:length]
            d64 = dst[pos:end].view(np.uint64)
            if length < CHUNK_SIZE:
                # Part of a chunk (a page, say): ECB into the scratch buffer, whose spare
                # room takes update_into's 15 extra bytes, then out to dst in one pass.
                ctx.update_into(s, buf)
                if xor_out:
                    np.bitwise_xor(buf64_all[:words], tw, out=d64)
                else:
                    d64[:] = buf64_all[:words]
            else:
                # A whole chunk: ECB straight into dst, then the tweak XORed there while the
                # chunk is still in the cache. update_into wants 15 spare bytes after its
                # output, so the last block goes through a small scratch: nothing is
                # written past dst[end], where another lane may be working.
                ctx.update_into(s[:-16], dst[pos : end - 1])
                ctx.update_into(s[-16:], last)
                dst[end - 16 : end] = last[:16]
                if xor_out:
                    np.bitwise_xor(d64, tw, out=d64)
            pos = end
