"""The machine: DRAM, the memory controller with its AES engine, the cache, the cores, the
IOMMU, and the chip state the cores share with the AMD Secure Processor.

Constructing a ``Machine`` is a power-on of the silicon: the memory controller draws the
host key (and, in ``xex`` mode, the tweak constants), the BIOS options of the profile are
latched into SYSCFG and HWCR, and every core starts in real mode. The Secure Processor and
its firmware sit above this package (``sevsim.platform`` powers on the whole platform);
``psp_port`` is what the firmware can reach here.
"""

from __future__ import annotations

from typing import Any

from sevsim.profiles import MachineProfile
from sevsim.soc import msr
from sevsim.soc.cache import Cache
from sevsim.soc.chip import ChipState
from sevsim.soc.core import Core
from sevsim.soc.dram import DRAM
from sevsim.soc.engine import EngineMode
from sevsim.soc.fabric import FabricPort
from sevsim.soc.iommu import Iommu
from sevsim.soc.memctl import MemoryController
from sevsim.soc.rng import EntropySource
from sevsim.soc.turns import Turns


class Machine:
    def __init__(self, profile: MachineProfile, engine_mode: EngineMode | None = None) -> None:
        self.profile = profile
        self._entropy = EntropySource(profile.seed, f"machine/{profile.name}")
        self.turns = Turns()  # who is running on the silicon (turns.py)
        self.dram = DRAM(profile.dram_size)
        self.memctl = MemoryController(profile, self.dram, self._entropy, engine_mode)
        self.rdrand = EntropySource(profile.seed, f"rdrand/{profile.name}")  # the cores' RNG
        # Coherence between encryption domains is CPUID 8000_001F EAX[10] (HwEnforcedCacheCoh).
        self.cache = Cache(profile.cache, self.memctl, coherent=profile.sme_coherent)
        self.fabric = FabricPort(self.cache, self.memctl)
        self.iommu = Iommu(self)  # off until host software programs and enables it
        self.syscfg = profile.syscfg_bios | (msr.SYSCFG_MEM_ENCRYPT if profile.smee else 0)
        self.hwcr = msr.HWCR_SMMLOCK if profile.smmlock else 0
        self.chip = ChipState(profile.cores, profile.cores_per_ccx)
        self._x86_vcpus: dict = {}  # VMCB PA -> the instruction engine of that vCPU
        self.cores = [Core(self, i) for i in range(profile.cores)]

    def ccx_of(self, core_index: int) -> int:
        return core_index // self.profile.cores_per_ccx

    def guest_view(self, vmcb_addr: int, va: int, n: int) -> bytes:
        """What the guest of this vCPU reads at its virtual address ``va`` (its translation
        and its key): the observer's window of demos, tests and a debugger inside the guest
        — hardware has no such thing, and host code never uses it."""
        from sevsim.soc.nested import guest_view

        return guest_view(self.cores[0], vmcb_addr, va, n)

    def use_x86(self, vmcb_addr: int) -> Any:
        """The instruction engine (``sevsim.soc.x86``) of this VMCB's vCPU, made at its
        first VMRUN or when the hypervisor creates the vCPU. MODEL plumbing: on hardware
        the VMCB is all there is."""
        from sevsim.soc.x86.vcpu import X86Vcpu

        pa = vmcb_addr & ~self.cbit_mask
        engine = self._x86_vcpus.get(pa)
        if engine is None:
            engine = self._x86_vcpus[pa] = X86Vcpu(self)
        return engine

    def x86_vcpu(self, vmcb_pa: int) -> Any:
        """The engine of this VMCB's vCPU, if it has one (an observer's look-up)."""
        return self._x86_vcpus.get(vmcb_pa)

    def forget_vmcb(self, vmcb_addr: int) -> None:
        """The VMCB page is being freed: end the execution context of its vCPU. (Model
        plumbing: on hardware a vCPU that is never run again simply stops existing.)"""
        engine = self._x86_vcpus.pop(vmcb_addr & ~self.cbit_mask, None)
        if engine is not None:
            engine.kill()

    def close(self) -> None:
        """Power off: end every guest's execution context."""
        for engine in self._x86_vcpus.values():
            engine.kill()
        self._x86_vcpus.clear()

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
