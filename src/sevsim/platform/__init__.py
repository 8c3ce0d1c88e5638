"""The platform: the silicon, the AMD Secure Processor with its SEV firmware, and the
state that makes them the same chip from one process to the next.

This layer sits above ``sevsim.soc`` (the silicon) and ``sevsim.psp`` (the firmware) and
owns what neither should: power-on (the silicon first, then the PSP boots its firmware
from SPI flash), the chip's fuses from the simulated AMD factory and key distribution
service, and the state directory with its lock. ``sevsim.platform.service`` serves one
powered-on platform to many VM processes.
"""

from sevsim.platform.power import PROFILE_FILE, Platform, PlatformMismatch

__all__ = ["PROFILE_FILE", "Platform", "PlatformMismatch"]
