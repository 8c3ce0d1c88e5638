"""The silicon: cores, caches, the memory controller with its AES engine, and DRAM."""

from sevsim.soc.faults import GeneralProtection, HardwareFault, MachineCheck, PageFault
from sevsim.soc.machine import Machine

__all__ = ["GeneralProtection", "HardwareFault", "Machine", "MachineCheck", "PageFault"]
