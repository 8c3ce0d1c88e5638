"""QEMU's ACPI CPU-hotplug register block (docs/specs/acpi_cpu_hotplug.rst,
hw/acpi/cpu.c and cpu_hotplug.c), at I/O port 0xAF00 on the pc machine (PIIX4).

It starts in the legacy mode: 32 bytes, a bitmap of the present CPUs by APIC ID. Writing
0 to the CPU selector (offset 0) switches it for good to the modern interface of 12
bytes, which firmware uses to count the possible CPUs — OVMF's
PlatformMaxCpuCountInitialization does, in that order: select CPU 0, command 0
(CPHP_GET_NEXT_CPU_WITH_EVENT), read "command data 2" (0 confirms the modern interface),
then select 0, 1, 2, ... reading the status (bit 0: enabled) and "command data" (the
selector, or 0 once the selector is past the last possible CPU).

MODEL: every possible CPU is present (no hotplug); insert and remove events never occur.
"""

from __future__ import annotations

BASE = 0xAF00
LEGACY_SIZE = 32  # ACPI_GPE_PROC_LEN
MODERN_SIZE = 12  # ACPI_CPU_HOTPLUG_REG_LEN
SELECTOR, FLAGS, COMMAND, COMMAND_DATA = 0x0, 0x4, 0x5, 0x8  # COMMAND_DATA_2 reads at 0x0
CMD_GET_NEXT_CPU_WITH_EVENT, CMD_OST_EVENT, CMD_OST_STATUS, CMD_GET_CPU_ID = 0, 1, 2, 3
STATUS_ENABLED = 1 << 0


class CpuHotplug:
    def __init__(self, cpus: int, base: int = BASE) -> None:
        self.cpus = cpus
        self.base = base
        self.modern = False
        self.selector = 0
        self.command = 0

    def ports(self) -> range:
        return range(self.base, self.base + LEGACY_SIZE)

    def io_in(self, port: int, size: int) -> int:
        offset = port - self.base
        if not self.modern:
            bitmap = ((1 << self.cpus) - 1).to_bytes(LEGACY_SIZE, "little")
            return int.from_bytes(bitmap[offset : offset + size].ljust(size, b"\0"), "little")
        if offset >= MODERN_SIZE:
            return (1 << 8 * size) - 1  # past the modern block: nothing there
        if self.selector >= self.cpus:
            return 0  # no valid CPU selected: every register reads 0
        if offset == FLAGS:
            return STATUS_ENABLED
        if offset == COMMAND_DATA:
            if self.command == CMD_GET_NEXT_CPU_WITH_EVENT:
                return self.selector
            if self.command == CMD_GET_CPU_ID:
                return self.selector  # the APIC ID: vCPU n has APIC ID n here
        return 0  # command data 2 (the upper ID bits), reserved registers

    def io_out(self, port: int, value: int, size: int) -> None:
        offset = port - self.base
        if not self.modern:
            if offset == SELECTOR and value == 0:
                self.modern = True  # what a write of 0 to CPU_SEL does in QEMU
            return
        if offset == SELECTOR:
            self.selector = value & 0xFFFF_FFFF
        elif offset == COMMAND and self.selector < self.cpus:
            self.command = value & 0xFF
        # FLAGS (clear events, eject) and COMMAND_DATA (_OST): no events, nothing to do
