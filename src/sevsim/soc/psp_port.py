"""What the AMD Secure Processor's firmware can reach on the chip — nothing more.

The key-slot port (write-only), the data fabric (coherent memory access with an explicit
key slot), the per-core WBINVD-done flags it checks before DF_FLUSH, the SYSCFG state of
the cores, and the topology it tracks ASIDs by. Built once per power-on by the machine
and handed to the firmware.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sevsim.soc import msr

if TYPE_CHECKING:
    from sevsim.soc.machine import Machine


class PspHardware:
    def __init__(self, machine: Machine) -> None:
        profile = machine.profile
        self._machine = machine
        self._chip = machine.chip
        self.key_port = machine.memctl.key_port()
        self.memory = machine.fabric
        self.key_slot = machine.memctl.key_slot
        self.cbit_mask = machine.cbit_mask
        self.phys_bits = machine.phys_bits
        self.dram_size = machine.dram.size
        self.max_asid = profile.max_asid
        self.min_sev_asid = profile.min_sev_asid
        self.sev_es = profile.sev_es
        self.vek_bytes = profile.engine_key_bits // 8
        self.cores = profile.cores
        self.ccx_count = profile.ccx_count
        self._cores_per_ccx = profile.cores_per_ccx

    def __repr__(self) -> str:
        return f"<PspHardware cores={self.cores} ccxs={self.ccx_count}>"

    def cores_of_ccx(self, ccx: int) -> range:
        start = ccx * self._cores_per_ccx
        return range(start, min(start + self._cores_per_ccx, self.cores))

    def wbinvd_done(self) -> list[bool]:
        return self._chip.wbinvd_done()

    def clear_wbinvd_done(self, cores: Iterable[int]) -> None:
        self._chip.clear_wbinvd_done(cores)

    def ccx_of_apic_id(self, apic_id: int) -> int | None:
        """A core's APIC id is its index here (CPUID 1 EBX[31:24])."""
        return apic_id // self._cores_per_ccx if 0 <= apic_id < self.cores else None

    def enable_asid(self, asid: int, ccxs: int) -> None:
        """Clear the 'ASID invalid' state of an ASID on these CCXs: VMRUN may use it there."""
        self._chip.enable_asid(asid, ccxs)

    def disable_asid(self, asid: int, ccxs: int) -> None:
        self._chip.disable_asid(asid, ccxs)

    def seal_vmsa(self, spa: int, plaintext: bytes) -> None:
        """LAUNCH_UPDATE_VMSA: the integrity value VMRUN checks an SEV-ES VMSA against."""
        self._chip.seal_vmsa(spa, plaintext)

    def forget_vmsa(self, spa: int) -> None:
        """DECOMMISSION: the guest's VMSA integrity values are freed."""
        self._chip.forget_vmsa(spa)

    def smee_all_cores(self) -> bool:
        return bool(self._machine.syscfg & msr.SYSCFG_MEM_ENCRYPT)
