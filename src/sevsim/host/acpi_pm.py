"""The ACPI fixed-hardware power-management registers of QEMU's pc machine
(hw/acpi/core.c; ACPI 6.5 §4.8): the PM1a event block (PM1_STS, PM1_EN), the PM1a control
block (PM1_CNT) and the PM timer, in one 64-byte I/O block that the PIIX4 power-management
function maps where its PMBA register says (``sevsim.host.piix4_pm``).

The PM timer counts at 3.579545 MHz from the VM's start and is 24 bits wide, as QEMU's
(its FADT does not set TMR_VAL_EXT); firmware uses it for delays (OVMF's AcpiTimerLib).
When bit 23 of the count changes, TMR_STS is set in PM1_STS.

MODEL: no SCI is raised; a sleep request (SLP_EN) is kept in ``sleep_request`` for the
VMM (QEMU's pc machine: SLP_TYP 0 is S5, power off).
"""

from __future__ import annotations

import time
from collections.abc import Callable

PM_TIMER_HZ = 3_579_545
BLOCK_SIZE = 64
PM1_STS, PM1_EN, PM1_CNT, PM_TMR = 0x0, 0x2, 0x4, 0x8
TMR_STS, PWRBTN_STS, WAK_STS = 1 << 0, 1 << 8, 1 << 15
SCI_EN, SLP_EN = 1 << 0, 1 << 13
SLP_TYP_SHIFT = 10


class AcpiPm:
    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns, bits: int = 24) -> None:
        self.clock_ns = clock_ns
        self.mask = (1 << bits) - 1
        self.start = clock_ns()
        self.sts = 0
        self.en = 0
        self.cnt = 0
        self.base = 0  # where PMBA put the block (the PIIX4 function sets it)
        self.sleep_request: int | None = None  # SLP_TYP of the last write with SLP_EN
        self._overflows = 0

    def ticks(self) -> int:
        """Timer ticks since the VM started: ns * 3579545 / 10**9, as QEMU computes it."""
        return (self.clock_ns() - self.start) * PM_TIMER_HZ // 1_000_000_000

    def timer(self) -> int:
        return self.ticks() & self.mask

    def _status(self) -> int:
        # TMR_STS: the count's most significant bit changed since software last cleared it.
        overflows = self.ticks() >> self.mask.bit_length() - 1
        if overflows != self._overflows:
            self._overflows = overflows
            self.sts |= TMR_STS
        return self.sts

    def _block(self) -> bytes:
        regs = (self._status(), self.en, self.cnt, 0)
        return b"".join(r.to_bytes(2, "little") for r in regs) + self.timer().to_bytes(4, "little")

    def io_in(self, port: int, size: int) -> int:
        offset = port - self.base
        block = self._block()
        if offset + size > len(block):
            return 0  # the rest of the 64 bytes: reserved, reads as zero
        return int.from_bytes(block[offset : offset + size], "little")

    def io_out(self, port: int, value: int, size: int) -> None:
        offset = port - self.base
        data = (value & (1 << 8 * size) - 1).to_bytes(size, "little")
        for i, byte in enumerate(data):
            self._write_byte(offset + i, byte)

    def _write_byte(self, offset: int, byte: int) -> None:
        shift = 8 * (offset & 1)
        if offset in (PM1_STS, PM1_STS + 1):  # write one to clear
            self._status()
            self.sts &= ~(byte << shift)
        elif offset in (PM1_EN, PM1_EN + 1):
            self.en = self.en & ~(0xFF << shift) | byte << shift
        elif offset in (PM1_CNT, PM1_CNT + 1):
            cnt = self.cnt & ~(0xFF << shift) | byte << shift
            if cnt & SLP_EN:
                self.sleep_request = cnt >> SLP_TYP_SHIFT & 7
            self.cnt = cnt & ~SLP_EN  # SLP_EN reads as zero
