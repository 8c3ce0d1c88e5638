"""The CMOS RAM and real-time clock of a PC (Motorola MC146818, QEMU's mc146818rtc) on
ports 0x70 (index; bit 7 masks NMI) and 0x71 (data), as far as firmware reads it: the
time, the status registers, and the memory sizes QEMU's pc machine stores there, which
OVMF's PlatformPei uses to size RAM below and above 4 GiB."""

from __future__ import annotations

import time

from sevsim.api.layout import Layout

PORT_INDEX, PORT_DATA = 0x70, 0x71
KiB, MiB = 1 << 10, 1 << 20

# The CMOS RAM as QEMU's pc machine fills it (hw/i386/pc.c, pc_cmos_init); bytes 0-9 are
# the clock, read live.
CMOS_RAM = Layout(
    "CMOS_RAM",
    128,
    "MC146818 status registers; QEMU hw/i386/pc.c pc_cmos_init",
    (0x0A, "B", "status_a"),
    (0x0B, "B", "status_b"),
    (0x0D, "B", "status_d"),
    (0x15, "H", "base_memory"),  # KiB
    (0x17, "H", "extended_memory"),  # KiB above 1 MiB
    (0x30, "H", "extended_memory_post"),  # the same, as POST found it
    (0x34, "H", "memory_above_16m"),  # 64 KiB units, below 4 GiB
    (0x5B, "3s", "memory_above_4g"),  # 64 KiB units
    (0x5F, "B", "cpus_minus_1"),
)


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class Cmos:
    def __init__(self, below_4g: int, above_4g: int, cpus: int) -> None:
        extended = min(max(below_4g - MiB, 0) // KiB, 0xFFFF)
        ram = CMOS_RAM.build(
            status_a=0x26,  # 32.768 kHz time base
            status_b=0x02,  # 24 h, BCD
            status_d=0x80,  # the RAM and time are valid
            base_memory=640,
            extended_memory=extended,
            extended_memory_post=extended,
            memory_above_16m=min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF),
            memory_above_4g=(above_4g // (64 * KiB)).to_bytes(3, "little"),
            cpus_minus_1=cpus - 1,
        )
        self.ram = bytearray(ram)
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
