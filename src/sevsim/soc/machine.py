"""The machine: DRAM, the memory controller with its AES engine, the cache, and the cores.

Constructing a ``Machine`` is a power-on: the memory controller draws the host key (and,
in ``xex`` mode, the tweak constants), the BIOS options of the profile are latched into
SYSCFG and HWCR, and every core starts in real mode.
"""

from __future__ import annotations

from sevsim.profiles import MachineProfile
from sevsim.soc import msr
from sevsim.soc.cache import Cache
from sevsim.soc.core import Core
from sevsim.soc.dram import DRAM
from sevsim.soc.engine import EngineMode
from sevsim.soc.memctl import MemoryController
from sevsim.soc.rng import EntropySource


class Machine:
    def __init__(self, profile: MachineProfile, engine_mode: EngineMode | None = None) -> None:
        self.profile = profile
        self._entropy = EntropySource(profile.seed, f"machine/{profile.name}")
        self.dram = DRAM(profile.dram_size)
        self.memctl = MemoryController(profile, self.dram, self._entropy, engine_mode)
        # Coherence between encryption domains is CPUID 8000_001F EAX[10] (HwEnforcedCacheCoh).
        self.cache = Cache(profile.cache, self.memctl, coherent=profile.sme_coherent)
        self.syscfg = profile.syscfg_bios | (msr.SYSCFG_MEM_ENCRYPT if profile.smee else 0)
        self.hwcr = msr.HWCR_SMMLOCK if profile.smmlock else 0
        self.cores = [Core(self, i) for i in range(profile.cores)]

    @property
    def phys_bits(self) -> int:
        """Effective physical-address width: reduced while SYSCFG[23] is set."""
        reduction = self.profile.phys_reduction if self.syscfg & msr.SYSCFG_MEM_ENCRYPT else 0
        return self.profile.maxphyaddr - reduction

    @property
    def cbit_mask(self) -> int:
        return 1 << self.profile.cbit

    def __repr__(self) -> str:
        return (
            f"<Machine {self.profile.name} engine={self.memctl.engine_mode}"
            f" smee={self.profile.smee} tsme={self.profile.tsme} dram={self.dram.size:#x}>"
        )
