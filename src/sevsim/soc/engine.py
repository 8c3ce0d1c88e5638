"""The AES engine in the memory controller (hardware.md §5).

Every aligned 16-byte block is encrypted on its own with AES under the key of its key slot
and a tweak T taken from its system physical address:

* ``xe``  (Zen 1):        C = E_K(P ^ T(pa)),          P = D_K(C) ^ T(pa)
* ``xex`` (Zen 2 and up): C = E_K(P ^ T(pa)) ^ T(pa),  P = D_K(C ^ T(pa)) ^ T(pa)

Deterministic, no integrity: the same key, address and plaintext always give the same
ciphertext, and a flipped ciphertext bit garbles exactly one block.

Two paths, one formula: a bulk path over whole pages (numpy, one reusable ECB context per
key slot, 1 MiB chunks so the tweak table and scratch buffers stay in the L2 cache) and
a line path for 64-byte cache fills and write-backs (512-bit Python integers, one ECB call
per line). Tests check that both agree with a block-by-block reference.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevsim.soc.tweak import CHUNK_SIZE, TweakFunction

EngineMode = Literal["xe", "xex"]
ENGINE_MODES: tuple[EngineMode, ...] = ("xe", "xex")
PATTERN_WORDS = 1024  # uint64 words per row when a chunk's base tweak is XORed in


class SlotCipher:
    """The AES contexts of one key slot. The key bytes are not kept anywhere."""

    __slots__ = ("_enc", "_dec")

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 32):
            raise ValueError("a key slot holds an AES-128 or AES-256 key")
        algorithm = algorithms.AES(key)
        self._enc = Cipher(algorithm, modes.ECB()).encryptor()
        self._dec = Cipher(algorithm, modes.ECB()).decryptor()

    def __repr__(self) -> str:
        return "<SlotCipher (key not readable)>"


class AesEngine:
    def __init__(self, mode: EngineMode, tweak: TweakFunction) -> None:
        if mode not in ENGINE_MODES:
            raise ValueError(f"engine mode must be one of {ENGINE_MODES}, not {mode!r}")
        self.mode: EngineMode = mode
        self._xex = mode == "xex"
        self._tweak = tweak
        blocks = CHUNK_SIZE // 16
        self._tw = np.empty((blocks, 2), dtype=np.uint64)
        self._pat = np.empty(PATTERN_WORDS, dtype=np.uint64)  # the chunk's base tweak, repeated
        # ECB's update_into wants 15 spare bytes after the output.
        self._buf = np.empty(CHUNK_SIZE + 16, dtype=np.uint8)
        self._buf64 = self._buf[:CHUNK_SIZE].view(np.uint64)

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
        self._bulk(cipher._enc, pa, src, dst, encrypt=True)

    def decrypt(self, cipher: SlotCipher, pa: int, src: np.ndarray, dst: np.ndarray) -> None:
        self._bulk(cipher._dec, pa, src, dst, encrypt=False)

    def _bulk(self, ctx, pa: int, src: np.ndarray, dst: np.ndarray, encrypt: bool) -> None:
        n = len(src)
        if pa % 16 or n % 16 or len(dst) != n:
            raise ValueError("the engine works on whole, aligned 16-byte blocks")
        offsets = self._tweak.chunk_offsets
        chunk_mask = CHUNK_SIZE - 1
        pos = 0
        while pos < n:
            cur = pa + pos
            off = cur & chunk_mask
            length = min(n - pos, CHUNK_SIZE - off)
            blocks = length >> 4
            # Tweaks of this span: the chunk's base tweak XOR the in-chunk table (linearity).
            b0, b1 = self._tweak.chunk_base(cur - off)
            first = off >> 4
            wf = offsets[first : first + blocks].reshape(-1)
            twf = self._tw[:blocks].reshape(-1)
            # XOR with the base repeated in rows of PATTERN_WORDS: much faster than two
            # strided column XORs (numpy's inner loop then runs over contiguous words).
            pat = self._pat
            pat[0::2] = b0
            pat[1::2] = b1
            words = 2 * blocks
            full = words - words % PATTERN_WORDS
            if full:
                np.bitwise_xor(
                    wf[:full].reshape(-1, PATTERN_WORDS),
                    pat,
                    out=twf[:full].reshape(-1, PATTERN_WORDS),
                )
            if full < words:
                np.bitwise_xor(wf[full:], pat[: words - full], out=twf[full:])
            s = src[pos : pos + length]
            d64 = dst[pos : pos + length].view(np.uint64)
            buf = self._buf[:length]
            buf64 = self._buf64[: length >> 3]
            if encrypt or self._xex:
                np.bitwise_xor(s.view(np.uint64), twf, out=buf64)  # P ^ T, or C ^ T
                ctx.update_into(buf, self._buf)
            else:
                ctx.update_into(s, self._buf)  # xe decryption: D(C) first
            if encrypt and not self._xex:
                d64[:] = buf64
            else:
                np.bitwise_xor(buf64, twf, out=d64)
            pos += length
