"""The board of QEMU's pc machine (i440FX + PIIX), as far as sevsim has it: which device
answers at which I/O port. Firmware finds the machine through these (OVMF: the host
bridge's device ID first), so a VM that runs real firmware gets them all.

  0xCF8, 0xCFC-0xCFF  PCI configuration (``sevsim.host.pci``) with, on bus 0,
                      00:00.0 the i440FX host bridge, 00:01.0 the PIIX3 ISA bridge,
                      00:01.3 the PIIX4 power-management function
  PMBA (0xB000 once   the ACPI PM registers and PM timer (``sevsim.host.acpi_pm``),
  firmware sets it)   decoded only after firmware enables them
  0xAF00-0xAF1F       QEMU's CPU-hotplug registers (``sevsim.host.cpuhp``)

The CMOS/RTC (0x70/0x71), fw_cfg and COM1 are wired by the VMM itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sevsim.host.acpi_pm import AcpiPm
from sevsim.host.cpuhp import CpuHotplug
from sevsim.host.i440fx import I440fx
from sevsim.host.pci import PciHost, devfn
from sevsim.host.piix import Piix3
from sevsim.host.piix4_pm import Piix4Pm


@dataclass
class PcBoard:
    pci: PciHost
    host_bridge: I440fx
    isa_bridge: Piix3
    pm_function: Piix4Pm
    pm: AcpiPm
    cpu_hotplug: CpuHotplug


def attach(io_ports: dict[int, Any], ram_size: int, cpus: int) -> PcBoard:
    """Put the pc machine's devices on a VM's I/O ports."""
    pci = PciHost()
    pm = AcpiPm()
    board = PcBoard(
        pci=pci,
        host_bridge=pci.add(devfn(0), I440fx(ram_size)),
        isa_bridge=pci.add(devfn(1), Piix3()),
        pm_function=pci.add(devfn(1, 3), Piix4Pm(pm, io_ports)),
        pm=pm,
        cpu_hotplug=CpuHotplug(cpus),
    )
    for port in pci.ports():
        io_ports[port] = pci
    for port in board.cpu_hotplug.ports():
        io_ports[port] = board.cpu_hotplug
    return board
