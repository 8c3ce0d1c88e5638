"""The PIIX3 PCI-to-ISA bridge at 00:01.0 of QEMU's pc machine (hw/isa/piix.c; Intel
82371SB data sheet): the function that puts the ISA devices (PIC, PIT, RTC, keyboard
controller) behind PCI. Firmware reads its IDs while it scans bus 0 and programs its
PIRQ routing registers (0x60-0x63: which 8259 input each PCI interrupt line drives).

Its header says "multi-function": the IDE controller (01.1) and the power-management
function (01.3, ``sevsim.host.piix4_pm``) are functions of the same device.

MODEL: the routing is stored, not used (no interrupt reaches a vCPU through the 8259);
the IDE function 01.1 is not there.
"""

from __future__ import annotations

from sevsim.host.pci import COMMAND, STATUS, PciFunction

VENDOR_INTEL = 0x8086
DEVICE_82371SB_0 = 0x7000
CLASS_BRIDGE_ISA = 0x060100
PIRQ_ROUTE = 0x60  # PIRQRC[A:D], 4 bytes; bit 7 set: not routed
# The reset values QEMU's piix_reset gives the bridge's own registers.
RESET_VALUES = {
    0x4C: 0x4D,  # IORT: ISA I/O recovery timer
    0x4E: 0x03,  # XBCS: X-bus chip select (RTC, keyboard controller)
    0x60: 0x80,
    0x61: 0x80,
    0x62: 0x80,
    0x63: 0x80,
    0x69: 0x02,  # TOM: top of memory
    0x70: 0x80,  # MBIRQ0: not routed
    0x76: 0x0C,  # MBDMA0/1: no channel
    0x77: 0x0C,
    0x78: 0x02,  # PCSC: programmable chip select
    0xA0: 0x08,  # SMICNTL
    0xA8: 0x0F,  # SEE: system event enable
}


class Piix3(PciFunction):
    def __init__(self) -> None:
        super().__init__(VENDOR_INTEL, DEVICE_82371SB_0, CLASS_BRIDGE_ISA, multifunction=True)
        self.config[COMMAND] = 0x07  # I/O, memory and bus master on from reset
        self.config[STATUS + 1] = 0x02  # DEVSEL timing medium
        for offset, value in RESET_VALUES.items():
            self.config[offset] = value

    def pirq_route(self, line: int) -> int | None:
        """The 8259 input PCI interrupt line ``line`` (0-3: INTA#-INTD#) is routed to."""
        value = self.config[PIRQ_ROUTE + line]
        return None if value & 0x80 else value & 0x0F
