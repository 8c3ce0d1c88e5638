"""The Intel 440FX host bridge (PMC) at 00:00.0, as QEMU's pc machine has it
(hw/pci-host/i440fx.c; Intel 82441FX data sheet, 29054901).

Firmware identifies the machine by it: OVMF reads the device ID at 00:00.0 first thing
(0x1237 is the i440FX pc machine; all ones, no device, is QEMU's microvm) and chooses its
power-management function, ACPI base and CPU-hotplug ports from that.

MODEL: the PAM (0x59-0x5F) and SMRAM (0x72) registers hold what software writes but do
not remap anything: below 1 MiB the firmware's alias stays ROM, and there is no SMM.
"""

from __future__ import annotations

from sevsim.host.pci import PciFunction

VENDOR_INTEL = 0x8086
DEVICE_82441 = 0x1237
CLASS_BRIDGE_HOST = 0x060000
PAM, PAM_SIZE = 0x59, 7
SMRAM = 0x72
SMRAM_RESET = 0x02  # C_BASE_SEG: SMRAM at 0xA0000, closed
RAM_SIZE_8M = 0x57  # QEMU's register for old coreboot: RAM in 8 MiB units, at most 255


class I440fx(PciFunction):
    def __init__(self, ram_size: int) -> None:
        super().__init__(VENDOR_INTEL, DEVICE_82441, CLASS_BRIDGE_HOST, revision=0x02)
        self.config[SMRAM] = SMRAM_RESET
        self.config[RAM_SIZE_8M] = min(ram_size >> 23, 255)
