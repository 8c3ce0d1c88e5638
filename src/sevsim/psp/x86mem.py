"""How the firmware reaches x86 memory (AMD-ASPFW x86_copy.c).

Every address the host gives is checked first: the C-bit is set aside, then address bits
the memory-encryption reduction removed (they carry the key id on the fabric) must be
zero, and the range must lie in DRAM and outside reserved regions such as an SEV-ES TMR —
otherwise INVALID_ADDRESS. A "plaintext" access uses the host (SME) key when the address
has the C-bit and no key otherwise (the TSME key under TSME); a guest access uses the
guest's key slot. Accesses go through the coherent fabric port (``soc.fabric``).
"""

from __future__ import annotations

import numpy as np

from sevsim.api.status import Status


class FirmwareError(Exception):
    """Unwinds a command handler with the status the firmware returns."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.name)
        self.status = status


class X86Memory:
    def __init__(self, hw) -> None:
        self._hw = hw
        self._memory = hw.memory
        self._cbit = hw.cbit_mask
        self._no_cbit = ~hw.cbit_mask
        self._reserved_bits = ((1 << 64) - 1) & ~((1 << hw.phys_bits) - 1)
        self._dram_size = hw.dram_size
        # The "plaintext" access's slot by C-bit: the host key with it (none under plain
        # SME without it; the TSME key under TSME). Fixed by the part's configuration.
        self._plain_slots = (hw.key_slot(False), hw.key_slot(True))
        self.reserved: list[tuple[int, int]] = []  # [start, end) the x86 may not name

    def check(self, addr: int, size: int) -> int:
        """The physical address without the C-bit, or FirmwareError(INVALID_ADDRESS)."""
        if size <= 0:
            raise FirmwareError(Status.INVALID_PARAM)  # MODEL: FW-internal ERR_INVALID_PARAMS
        pa = addr & self._no_cbit
        reserved_bits = self._reserved_bits
        end = pa + size
        if pa & reserved_bits or (end - 1) & reserved_bits or end > self._dram_size:
            raise FirmwareError(Status.INVALID_ADDRESS)
        for start, stop in self.reserved:
            if pa < stop and start < end:
                raise FirmwareError(Status.INVALID_ADDRESS)
        return pa

    def _plain_slot(self, addr: int) -> int:
        return self._plain_slots[bool(addr & self._cbit)]

    def read(self, addr: int, size: int, flush: bool = False) -> bytes:
        """``flush``: the read-sized write-back-invalidate mode (rd_sz_wbinvd) the firmware
        turns on before it re-encrypts memory in place: cached lines of the range are
        written back and dropped rather than left to alias the new contents."""
        pa = self.check(addr, size)
        return self._memory.read(pa, size, self._plain_slot(addr), invalidate=flush)

    def write(self, addr: int, data: bytes) -> None:
        pa = self.check(addr, len(data))
        self._memory.write(pa, data, self._plain_slot(addr))

    def read_guest(self, addr: int, size: int, asid: int) -> bytes:
        pa = self.check(addr, size)
        return self._hw.memory.read(pa, size, self._hw.key_slot(True, asid))

    def write_guest(self, addr: int, data: bytes, asid: int) -> None:
        pa = self.check(addr, len(data))
        self._hw.memory.write(pa, data, self._hw.key_slot(True, asid))

    def read_into(self, addr: int, out: np.ndarray, flush: bool = False) -> None:
        """Bulk ``read`` into a uint8 array (16-byte aligned range)."""
        pa = self.check(addr, len(out))
        self._hw.memory.read_into(pa, out, self._plain_slot(addr), invalidate=flush)

    def read_guest_into(self, addr: int, out: np.ndarray, asid: int) -> None:
        pa = self.check(addr, len(out))
        self._hw.memory.read_into(pa, out, self._hw.key_slot(True, asid))

    def write_guest_from(self, addr: int, src: np.ndarray, asid: int) -> None:
        pa = self.check(addr, len(src))
        self._hw.memory.write_from(pa, src, self._hw.key_slot(True, asid))
