"""The memory controller (UMC): key slots, key selection, and the AES engine in the DRAM path.

Everything that reaches DRAM from the CPU caches, the firmware or a device passes through
here with a *key slot* (hardware.md §2.5, §5.1): slot 0 means "no key" (plaintext), slots
1..max_asid hold the guests' VEKs (one per ASID), and ``host_key_slot`` (1023 on Genoa)
holds the host SME/TSME key. The controller generates the host key itself at power-on.
Guest keys are loaded by the AMD Secure Processor through the one-time ``key_port()``; no
method returns key bytes, and the slot objects keep only AES contexts.

A slot that was never loaded still "holds" something on real silicon; here it gets a
random key on first use, so reading memory with the wrong or an empty slot yields garbage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sevsim.soc.dram import DRAM
from sevsim.soc.engine import AesEngine, EngineMode, SlotCipher
from sevsim.soc.rng import EntropySource
from sevsim.soc.tweak import TweakFunction, random_constants, xe_constants

if TYPE_CHECKING:
    from sevsim.profiles import MachineProfile

NO_KEY = 0
LINE_SIZE = 64


class KeySlotPort:
    """The narrow hardware interface through which the AMD-SP programs key slots.

    Handed out once per power-on; the firmware keeps it. It can write keys, never read them.
    """

    def __init__(self, memctl: MemoryController) -> None:
        self._memctl = memctl

    def load(self, slot: int, key: bytes) -> None:
        self._memctl._load_slot(slot, key)

    def __repr__(self) -> str:
        return "<KeySlotPort (write-only)>"


BULK_MIN = 1024  # below this, the per-line path beats the vectorised one's set-up cost
_ZERO_LINE = bytes(LINE_SIZE)  # what a never-written line holds


class MemoryController:
    def __init__(
        self,
        profile: MachineProfile,
        dram: DRAM,
        entropy: EntropySource,
        engine_mode: EngineMode | None = None,
    ) -> None:
        self.dram = dram
        self.smee = profile.smee
        self.tsme = profile.tsme
        self.host_key_slot = profile.host_key_slot
        self.max_slot = max(profile.host_key_slot, profile.max_asid)
        self.key_bytes = profile.engine_key_bits // 8
        mode = engine_mode or profile.engine_mode
        if mode == "xe" or profile.xex_fixed_tweak:
            constants = xe_constants(profile.name, profile.maxphyaddr, profile.xe_zero_tweak_bits)
        else:
            constants = random_constants(entropy, profile.maxphyaddr)
        self._engine = AesEngine(mode, TweakFunction(constants, profile.maxphyaddr))
        self._entropy = entropy
        self._slots: dict[int, SlotCipher] = {}
        self._port_handed_out = False
        # Power-on: the host (SME/TSME) key is generated inside the controller.
        self._slots[self.host_key_slot] = SlotCipher(
            entropy.random_bytes(self.key_bytes, "host-key")
        )

    @property
    def engine_mode(self) -> EngineMode:
        return self._engine.mode

    def __repr__(self) -> str:
        return (
            f"<MemoryController engine={self.engine_mode} host_key_slot={self.host_key_slot}"
            f" smee={self.smee} tsme={self.tsme}>"
        )

    # ---- key selection (hardware.md §3.4, §5.4) ------------------------------------
    def key_slot(self, c_bit: bool, asid: int = 0) -> int:
        """The slot for an access with this C-bit by this ASID (0 = the host).

        C=1 selects the ASID's key (the host key for ASID 0), but only with SYSCFG[23]
        MemEncryptionModEn set. Under TSME every access that would be plaintext uses the
        host key instead, so the C-bit makes no difference to the host.
        """
        if c_bit and self.smee:
            return asid if asid else self.host_key_slot
        return self.host_key_slot if self.tsme else NO_KEY

    def key_port(self) -> KeySlotPort:
        """The firmware's write-only door to the key slots; available once per power-on."""
        if self._port_handed_out:
            raise PermissionError("the key-slot port belongs to the AMD Secure Processor")
        self._port_handed_out = True
        return KeySlotPort(self)

    def _load_slot(self, slot: int, key: bytes) -> None:
        if not 0 < slot <= self.max_slot:
            raise ValueError(f"no key slot {slot}")
        if len(key) != self.key_bytes:
            raise ValueError(f"key slots hold {self.key_bytes}-byte keys")
        self._slots[slot] = SlotCipher(key)

    def _cipher(self, slot: int) -> SlotCipher:
        cipher = self._slots.get(slot)
        if cipher is None:
            if not 0 < slot <= self.max_slot:
                raise ValueError(f"no key slot {slot}")
            # Never loaded since power-on: whatever the slot holds is unknown to everyone.
            cipher = SlotCipher(self._entropy.random_bytes(self.key_bytes, f"empty-slot/{slot}"))
            self._slots[slot] = cipher
        return cipher

    # ---- line access (cache fills and write-backs) ------------------------------------
    def read_line(self, line_pa: int, slot: int) -> bytes:
        self.dram.check(line_pa, LINE_SIZE)
        stored = self.dram.load_line(line_pa, LINE_SIZE)
        if stored is None:
            stored = _ZERO_LINE
        if slot == NO_KEY:
            return stored
        return self._engine.decrypt_line(self._cipher(slot), line_pa, stored)

    def write_line(self, line_pa: int, slot: int, plaintext: bytes) -> None:
        self.dram.check(line_pa, LINE_SIZE)
        if slot != NO_KEY:
            plaintext = self._engine.encrypt_line(self._cipher(slot), line_pa, plaintext)
        self.dram.store_line(line_pa, plaintext)

    # ---- byte access (uncached CPU accesses, firmware, devices) -------------------------
    def read(self, pa: int, n: int, slot: int) -> bytes:
        """Read n bytes at pa, decrypted with the slot's key. Any alignment."""
        self.dram.check(pa, n)
        off = pa & (LINE_SIZE - 1)
        if 0 < n and off + n <= LINE_SIZE:  # one line: the common case of command buffers
            line = self.read_line(pa - off, slot)
            return line if n == LINE_SIZE else line[off : off + n]
        if pa % 16 == 0 and n % 16 == 0 and n >= BULK_MIN:
            out = np.empty(n, dtype=np.uint8)
            self.read_into(pa, out, slot)
            return out.tobytes()
        start = pa - off
        end = (pa + n + LINE_SIZE - 1) & ~(LINE_SIZE - 1)
        data = b"".join([self.read_line(line, slot) for line in range(start, end, LINE_SIZE)])
        return data[off : off + n]

    def write(self, pa: int, data: bytes, slot: int) -> None:
        """Write bytes at pa, encrypted with the slot's key. Partial blocks are
        read-modify-written, as the controller does for a write smaller than a block."""
        n = len(data)
        self.dram.check(pa, n)
        if pa % 16 == 0 and n % 16 == 0 and n >= BULK_MIN:
            self.write_from(pa, np.frombuffer(data, dtype=np.uint8), slot)
            return
        start = pa & ~(LINE_SIZE - 1)
        end = (pa + n + LINE_SIZE - 1) & ~(LINE_SIZE - 1)
        for line in range(start, end, LINE_SIZE):
            lo, hi = max(pa, line), min(pa + n, line + LINE_SIZE)
            if hi - lo == LINE_SIZE:
                self.write_line(line, slot, bytes(data[lo - pa : hi - pa]))
            else:
                merged = bytearray(self.read_line(line, slot))
                merged[lo - line : hi - line] = data[lo - pa : hi - pa]
                self.write_line(line, slot, bytes(merged))

    # ---- bulk access: whole 16-byte blocks, vectorised ----------------------------------
    def read_into(self, pa: int, out: np.ndarray, slot: int) -> None:
        """Decrypt [pa, pa+len(out)) into the uint8 array out (16-byte aligned range)."""
        n = len(out)
        self.dram.check(pa, n)
        cipher = None if slot == NO_KEY else self._cipher(slot)
        pos = 0
        for span_pa, _, length in self.dram.spans(pa, n):
            stored = self.dram.load_view(span_pa, length)
            dst = out[pos : pos + length]
            if stored is None:
                stored = np.zeros(length, dtype=np.uint8)
            if cipher is None:
                dst[:] = stored
            else:
                self._engine.decrypt(cipher, span_pa, stored, dst)
            pos += length

    def write_from(self, pa: int, src: np.ndarray, slot: int) -> None:
        """Encrypt the uint8 array src into [pa, pa+len(src)) (16-byte aligned range)."""
        n = len(src)
        self.dram.check(pa, n)
        cipher = None if slot == NO_KEY else self._cipher(slot)
        pos = 0
        for span_pa, _, length in self.dram.spans(pa, n):
            dst = self.dram.store_view(span_pa, length)
            if cipher is None:
                dst[:] = src[pos : pos + length]
            else:
                self._engine.encrypt(cipher, span_pa, src[pos : pos + length], dst)
            pos += length
