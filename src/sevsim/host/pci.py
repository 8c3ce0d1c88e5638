"""PCI configuration space of a VMM's root bus, reached the way a PC reaches it: the
configuration mechanism #1 on I/O ports 0xCF8 (CONFIG_ADDRESS) and 0xCFC-0xCFF
(CONFIG_DATA), as QEMU's pci_host does it (hw/pci/pci_host.c) for the i440FX.

CONFIG_ADDRESS (a 32-bit register): bit 31 enable, bits 23:16 bus, 15:11 device, 10:8
function, 7:2 the dword; the byte within it comes from the data port used
(0xCFC + offset & 3). A function that is not there reads all ones, and a write to it
goes nowhere (a master abort).

Each function has QEMU's 256-byte conventional configuration space with its write mask:
only what QEMU's pci_init_wmask lets software change does change (the command bits IO,
MEM, MASTER, SERR and INTx disable; cache line size; interrupt line; everything from
0x40 up), and the status register's error bits are write-one-to-clear.
"""

from __future__ import annotations

from typing import TypeVar

PORT_ADDRESS, PORT_DATA = 0xCF8, 0xCFC
CONFIG_ENABLE = 1 << 31

# The configuration header (PCI Local Bus Specification 3.0, §6.1), as Linux's pci_regs.h
# names the offsets.
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, CLASS_DEVICE = 0x08, 0x09, 0x0A
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x0C, 0x0D, 0x0E
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
HEADER_SIZE = 0x40
CONFIG_SIZE = 0x100

COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x1, 0x2, 0x4
COMMAND_SERR, COMMAND_INTX_DISABLE = 0x100, 0x400
HEADER_TYPE_MULTI_FUNCTION = 0x80
# Status bits software clears by writing one (QEMU's pci_init_w1cmask).
STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000

# QEMU gives every device that sets none its own subsystem IDs (Red Hat/Qumranet, QEMU).
SUBVENDOR_QEMU, SUBDEVICE_QEMU = 0x1AF4, 0x1100


F = TypeVar("F", bound="PciFunction")


def devfn(device: int, function: int = 0) -> int:
    return device << 3 | function


class PciFunction:
    """One function's configuration space. Devices set their header in ``__init__`` and
    react to writes in ``config_written``."""

    def __init__(
        self,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        multifunction: bool = False,
    ) -> None:
        config = self.config = bytearray(CONFIG_SIZE)
        config[VENDOR_ID : VENDOR_ID + 2] = vendor.to_bytes(2, "little")
        config[DEVICE_ID : DEVICE_ID + 2] = device.to_bytes(2, "little")
        config[REVISION_ID] = revision
        config[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        config[HEADER_TYPE] = HEADER_TYPE_MULTI_FUNCTION if multifunction else 0
        config[SUBSYSTEM_VENDOR_ID : SUBSYSTEM_VENDOR_ID + 2] = SUBVENDOR_QEMU.to_bytes(2, "little")
        config[SUBSYSTEM_ID : SUBSYSTEM_ID + 2] = SUBDEVICE_QEMU.to_bytes(2, "little")
        wmask = self.wmask = bytearray(CONFIG_SIZE)
        command = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
        wmask[COMMAND : COMMAND + 2] = command.to_bytes(2, "little")
        wmask[CACHE_LINE_SIZE] = wmask[INTERRUPT_LINE] = 0xFF
        wmask[HEADER_SIZE:] = b"\xff" * (CONFIG_SIZE - HEADER_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self.w1cmask[STATUS : STATUS + 2] = STATUS_W1C.to_bytes(2, "little")

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, value: int, size: int) -> None:
        """pci_default_write_config: each byte changes only where the mask allows."""
        for i in range(size):
            at, byte = offset + i, value >> 8 * i & 0xFF
            keep = self.config[at] & ~self.wmask[at]
            self.config[at] = keep | byte & self.wmask[at]
            self.config[at] &= ~(byte & self.w1cmask[at]) & 0xFF
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """A device's reaction to a configuration write (a BAR moved, a region enabled)."""

    def dword(self, offset: int) -> int:
        return self.read_config(offset, 4)


def overlaps(offset: int, size: int, start: int, length: int = 1) -> bool:
    """Whether an access of ``size`` bytes at ``offset`` touches [start, start + length)."""
    return offset < start + length and start < offset + size


class PciHost:
    """The host bridge's configuration ports with the functions on bus 0."""

    def __init__(self) -> None:
        self.functions: dict[int, PciFunction] = {}
        self.address = 0

    def add(self, slot: int, function: F) -> F:
        self.functions[slot] = function
        return function

    def ports(self) -> list[int]:
        # 0xCF9 is not ours: on a PC it is the PIIX's reset control register.
        return [PORT_ADDRESS, *range(PORT_DATA, PORT_DATA + 4)]

    def _target(self, port: int) -> tuple[PciFunction | None, int]:
        address = self.address
        if not address & CONFIG_ENABLE or address >> 16 & 0xFF:
            return None, 0  # disabled, or a bus behind no bridge
        offset = address & 0xFC | port - PORT_DATA
        return self.functions.get(address >> 8 & 0xFF), offset

    def io_in(self, port: int, size: int) -> int:
        if port == PORT_ADDRESS:
            return self.address if size == 4 else (1 << 8 * size) - 1
        function, offset = self._target(port)
        if function is None or offset + size > CONFIG_SIZE:
            return (1 << 8 * size) - 1
        return function.read_config(offset, size)

    def io_out(self, port: int, value: int, size: int) -> None:
        if port == PORT_ADDRESS:
            if size == 4:  # QEMU takes only dword writes of CONFIG_ADDRESS
                self.address = value & 0xFFFF_FFFF
            return
        function, offset = self._target(port)
        if function is not None and offset + size <= CONFIG_SIZE:
            function.write_config(offset, value & (1 << 8 * size) - 1, size)
