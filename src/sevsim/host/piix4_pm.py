"""The PIIX4 power-management function at 00:01.3 of QEMU's pc machine
(hw/acpi/piix4.c; Intel 82371AB data sheet): a PCI function whose PMBA register (0x40)
places the ACPI power-management I/O block (``sevsim.host.acpi_pm``) and whose PMREGMISC
bit 0 (PMIOSE, 0x80) turns its decoding on.

Firmware programs both: OVMF's AcpiTimerLib, already in SEC, finds PMIOSE clear and
writes PMBA = 0xB000, then sets PMIOSE (PlatformPei would also set the command register's
I/O-space bit, but finds the block enabled and leaves it); from then on the PM timer is at
0xB008. QEMU takes the base from bits 15:6 of PMBA and enables the block on PMIOSE alone.

MODEL: the SMBus controller's registers (SMBBA 0x90, enabled by 0xD2) hold QEMU's
values, but no SMBus is behind them.
"""

from __future__ import annotations

from typing import Any

from sevsim.host.acpi_pm import BLOCK_SIZE, AcpiPm
from sevsim.host.pci import INTERRUPT_PIN, STATUS, PciFunction, overlaps

VENDOR_INTEL = 0x8086
DEVICE_82371AB_3 = 0x7113
CLASS_BRIDGE_OTHER = 0x068000
PMBA, PMREGMISC = 0x40, 0x80
PMBA_MASK = 0xFFC0
PMIOSE = 1 << 0
DEVACTB = 0x58  # device activity B; 0x5B bit 1: SMM already initialised (QEMU, KVM)
SMBBA, SMBHSTCFG = 0x90, 0xD2
SMB_IO_BASE = 0xB100  # where QEMU's pc machine puts the SMBus


class Piix4Pm(PciFunction):
    def __init__(self, pm: AcpiPm, io_ports: dict[int, Any]) -> None:
        super().__init__(VENDOR_INTEL, DEVICE_82371AB_3, CLASS_BRIDGE_OTHER, revision=0x03)
        self.pm = pm
        self.io_ports = io_ports
        config = self.config
        config[STATUS : STATUS + 2] = (0x0280).to_bytes(2, "little")  # fast b2b, DEVSEL medium
        config[INTERRUPT_PIN] = 1  # INTA#
        config[PMBA] = 0x01  # bit 0: an I/O-space base
        config[DEVACTB + 3] = 0x02
        config[SMBBA : SMBBA + 2] = (SMB_IO_BASE | 1).to_bytes(2, "little")
        config[SMBHSTCFG] = 0x09
        self.mapped: int | None = None  # where the PM block is decoded, if it is

    def config_written(self, offset: int, size: int) -> None:
        if overlaps(offset, size, PMBA, 4) or overlaps(offset, size, PMREGMISC):
            self._map()

    def _map(self) -> None:
        """pm_io_space_update: move the PM block to PMBA, on or off with PMIOSE."""
        if self.mapped is not None:
            for port in range(self.mapped, self.mapped + BLOCK_SIZE):
                if self.io_ports.get(port) is self.pm:
                    del self.io_ports[port]
            self.mapped = None
        if self.config[PMREGMISC] & PMIOSE:
            base = self.dword(PMBA) & PMBA_MASK
            self.pm.base = self.mapped = base
            for port in range(base, base + BLOCK_SIZE):
                self.io_ports[port] = self.pm
