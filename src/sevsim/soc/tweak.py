"""The physical-address tweak of the memory encryption engine (hardware.md §5.2).

The engine holds one 16-byte constant t_i per physical-address bit i >= 4 (bits 3:0 pick a
byte inside a block) and uses T(p) = XOR of t_i over the set bits of p. T is linear:
T(p) ^ T(q) = T(p ^ q). That linearity is what SEVurity's ciphertext moving exploits, and
it is also what makes the tweak cheap to compute here: T of a page, line or chunk is the
XOR of a few table lookups.

Constants:
* ``xe`` (Zen 1): fixed in the silicon. t4..t6 are the EPYC 7251 values published in
  SEVurity Table I; higher bits were never published, so they are generated (4-byte
  periodic like the published ones, fixed per profile) — a MODEL choice.
* ``xex`` (Zen 2 and later): AMD said the tweak is no longer periodic and is fresh each
  boot; the function is UNCONFIRMED. MODEL: 128-bit random t_i per boot, same linear form.

Integers hold blocks little-endian (byte 0 of the block is the least significant byte) so
that integer XOR and byte-wise XOR agree.
"""

from __future__ import annotations

import numpy as np

from sevsim.soc.rng import EntropySource, fixed_bytes

# SEVurity Table I (EPYC 7251), bytes in the printed order.
SEVURITY_T4 = bytes.fromhex("82253838" * 4)
SEVURITY_T5 = bytes.fromhex("ec09079c" * 4)
SEVURITY_T6 = bytes.fromhex("40000018" * 4)

FIRST_TWEAK_BIT = 4
# Bulk work is done in 256 KiB chunks: the chunk's tweaks, the scratch buffer and the
# in-chunk table (3 x 256 KiB) stay in a core's L2 cache while the data streams through.
CHUNK_SHIFT = 18
CHUNK_SIZE = 1 << CHUNK_SHIFT
_LINE_REPLICATE = sum(1 << (128 * i) for i in range(4))  # one 128-bit value -> 4 blocks
LINE_PAGES_KEPT = 4096  # pages whose line tweak is kept (about 1 MiB of Python ints)


def xe_constants(
    profile_name: str, phys_bits: int, zero_bits: tuple[int, ...] = ()
) -> dict[int, bytes]:
    """Zen 1 style constants: published t4..t6, the rest fixed per profile, 4-byte periodic;
    ``zero_bits`` are zero (a weak tweak, as on early firmware)."""
    consts = {4: SEVURITY_T4, 5: SEVURITY_T5, 6: SEVURITY_T6}
    for bit in range(7, phys_bits):
        consts[bit] = fixed_bytes(4, f"{profile_name}/xe-tweak/t{bit}") * 4
    for bit in zero_bits:
        consts[bit] = bytes(16)
    return consts


def random_constants(entropy: EntropySource, phys_bits: int) -> dict[int, bytes]:
    """Zen 2+ style constants (MODEL): independent random 128-bit values, new each boot."""
    return {bit: entropy.random_bytes(16, f"xex-tweak/t{bit}") for bit in range(4, phys_bits)}


class TweakFunction:
    """T(pa) for a fixed set of per-bit constants, in the three shapes the engine needs."""

    def __init__(self, constants: dict[int, bytes], phys_bits: int) -> None:
        self._phys_bits = phys_bits
        self._t = [0] * 64  # bits at or above phys_bits have no constant
        for bit, value in constants.items():
            if not FIRST_TWEAK_BIT <= bit < phys_bits or len(value) != 16:
                raise ValueError(f"bad tweak constant for bit {bit}")
            self._t[bit] = int.from_bytes(value, "little")
        # T of bits 4..11 (position inside a page), and of bits >= 12 eight bits at a time.
        self._in_page = [self._xor_bits(i << 4) for i in range(256)]
        self._page_tables = [
            [self._xor_bits(v << shift) for v in range(256)] for shift in range(12, phys_bits, 8)
        ]
        self._line_pages: dict[int, int] = {}  # page number -> its tweak, replicated x4
        # Per line of a page: the four blocks' in-page tweaks packed into one 512-bit int.
        self._line_in_page = [
            sum(self._in_page[line * 4 + j] << (128 * j) for j in range(4)) for line in range(64)
        ]
        # Bulk path: T of every block offset inside a CHUNK_SIZE chunk, as uint64 pairs.
        # Built by linearity, one address bit at a time: the second half of the offsets
        # with bit b set is the first half XOR t_b.
        offsets = np.zeros((CHUNK_SIZE >> FIRST_TWEAK_BIT, 2), dtype=np.uint64)
        for bit in range(FIRST_TWEAK_BIT, CHUNK_SHIFT):
            half = 1 << (bit - FIRST_TWEAK_BIT)
            t = self._t[bit]
            const = np.array([t & 0xFFFFFFFFFFFFFFFF, t >> 64], dtype=np.uint64)
            np.bitwise_xor(offsets[:half], const, out=offsets[half : 2 * half])
        self.chunk_offsets = offsets

    def _xor_bits(self, pa: int) -> int:
        t = 0
        pa >>= FIRST_TWEAK_BIT
        bit = FIRST_TWEAK_BIT
        while pa:
            if pa & 1:
                t ^= self._t[bit]
            pa >>= 1
            bit += 1
        return t

    def page_int(self, pa: int) -> int:
        """T of the page-number bits of pa (bits >= 12) as a 128-bit integer."""
        t = 0
        pfn = pa >> 12
        for table in self._page_tables:
            t ^= table[pfn & 0xFF]
            pfn >>= 8
        return t

    def block_int(self, pa: int) -> int:
        """T(pa) for the 16-byte block at pa, as a 128-bit integer."""
        return self.page_int(pa) ^ self._in_page[(pa >> 4) & 0xFF]

    def block(self, pa: int) -> bytes:
        """T(pa) as 16 bytes: the value the SEVurity equations call T(p)."""
        return self.block_int(pa).to_bytes(16, "little")

    def line_int(self, line_pa: int) -> int:
        """The four block tweaks of the 64-byte line at line_pa, packed into 512 bits."""
        pfn = line_pa >> 12
        page = self._line_pages.get(pfn)
        if page is None:  # the line path meets the same pages again and again: keep a few
            if len(self._line_pages) >= LINE_PAGES_KEPT:
                self._line_pages.clear()
            page = self._line_pages[pfn] = self.page_int(line_pa) * _LINE_REPLICATE
        return page ^ self._line_in_page[(line_pa >> 6) & 63]

    def chunk_base(self, chunk_pa: int) -> int:
        """T of a CHUNK_SIZE-aligned address: XORed with ``chunk_offsets`` it gives the
        tweaks of the chunk's blocks."""
        return self.page_int(chunk_pa)

    def __repr__(self) -> str:  # the constants are silicon secrets under xex: never print them
        return f"<TweakFunction over {self._phys_bits} physical-address bits>"
