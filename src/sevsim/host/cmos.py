"""The CMOS RAM and real-time clock of a PC (Motorola MC146818, QEMU's mc146818rtc) on
ports 0x70 (index; bit 7 masks NMI) and 0x71 (data), as far as firmware reads it: the
time, the status registers, and the memory sizes QEMU's pc machine stores there, which
OVMF's PlatformPei uses to size RAM below and above 4 GiB."""

from __future__ import annotations

import time

PORT_INDEX, PORT_DATA = 0x70, 0x71
KiB, MiB = 1 << 10, 1 << 20


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class Cmos:
    def __init__(self, below_4g: int, above_4g: int, cpus: int) -> None:
        ram = bytearray(128)
        ram[0x0A], ram[0x0B], ram[0x0D] = 0x26, 0x02, 0x80  # 32.768 kHz, 24 h + BCD, valid
        ram[0x15:0x17] = (640).to_bytes(2, "little")  # base memory, KiB
        extended = min(max(below_4g - MiB, 0) // KiB, 0xFFFF)  # KiB above 1 MiB
        ram[0x17:0x19] = ram[0x30:0x32] = extended.to_bytes(2, "little")
        high = min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)  # above 16 MiB
        ram[0x34:0x36] = high.to_bytes(2, "little")
        ram[0x5B:0x5E] = (above_4g // (64 * KiB)).to_bytes(3, "little")  # above 4 GiB
        ram[0x5F] = cpus - 1
        self.ram = ram
        self.index = 0

    def io_out(self, port: int, value: int, size: int) -> None:
        if port == PORT_INDEX:
            self.index = value & 0x7F
        elif port == PORT_DATA and self.index not in (0x0C, 0x0D):
            self.ram[self.index] = value & 0xFF

    def io_in(self, port: int, size: int) -> int:
        if port != PORT_DATA:
            return 0xFF
        if self.index < 10 and self.index % 2 == 0 or self.index in (7, 8, 9):
            now = time.gmtime()
            clock = {
                0: now.tm_sec,
                2: now.tm_min,
                4: now.tm_hour,
                6: now.tm_wday + 1,
                7: now.tm_mday,
                8: now.tm_mon,
                9: now.tm_year % 100,
            }
            return _bcd(clock[self.index])
        return self.ram[self.index]
