"""A running host: a powered-on machine, its booted host kernel, and the probed SEV device.

This is what a ``sevsim`` command or the demo starts from. It also carries the platform
operator's tasks that involve AMD's public services, as sevctl does: fetching the
ASK-signed CEK from the key distribution service for an exported chain, and the AMD root
of the platform's generation for a full chain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from sevsim.amd.kds import KeyDistributionService
from sevsim.api.status import Status
from sevsim.certs.chain import SevChain, decode_platform_certs
from sevsim.certs.sev import SevCert
from sevsim.host import HostKernel
from sevsim.host.kvm import Kvm, Vm
from sevsim.host.sev import IoctlResult, SevDevice
from sevsim.platform import Platform
from sevsim.profiles import MachineProfile
from sevsim.psp.inspect import PspDebugPort
from sevsim.soc import Machine

HINTS = {
    ("PEK_CERT_IMPORT", Status.ALREADY_OWNED): "the platform already has an external owner; "
    "'sevsim platform pek-gen' makes it self-owned again",
    ("PEK_CERT_IMPORT", Status.INVALID_CERTIFICATE): "the PEK must be this platform's current "
    "PEK signing request signed by the OCA, and the OCA must be self-signed",
    ("PEK_CERT_IMPORT", Status.BAD_SIGNATURE): "a signature on the PEK or the OCA does not verify",
    ("PEK_GEN", Status.INVALID_PLATFORM_STATE): "PEK_GEN needs the INIT state (no guests running)",
}


class PlatformError(RuntimeError):
    """A firmware command failed; carries the ioctl result."""

    def __init__(self, what: str, result: IoctlResult) -> None:
        hint = HINTS.get((what, result.error))
        super().__init__(f"{what}: {result.explain()}" + (f" ({hint})" if hint else ""))
        self.result = result


@dataclass
class HostSystem:
    platform: Platform
    kernel: HostKernel
    sev: SevDevice

    @property
    def machine(self) -> Machine:
        return self.platform.machine

    @property
    def data_dir(self) -> Path:
        return self.platform.data_dir

    @classmethod
    def start(
        cls,
        profile: MachineProfile,
        state_dir: Path | None = None,
        nv_file: Path | None = None,
        data_dir: Path | None = None,
        cmdline: str = "mem_encrypt=on",
    ) -> HostSystem:
        platform = Platform(profile, state_dir=state_dir, data_dir=data_dir)
        try:
            kernel = HostKernel(platform.machine.cores[0], cmdline=cmdline)
            kernel.boot()
            sev = SevDevice(kernel, platform.mailbox, init_ex_path=nv_file)
            probe = sev.probe()
            if not probe.ok:
                raise PlatformError("SEV platform initialisation failed", probe)
        except BaseException:
            platform.close()
            raise
        return cls(platform, kernel, sev)

    def close(self) -> None:
        self.platform.close()

    def __enter__(self) -> HostSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inspection_port(self) -> PspDebugPort:
        """A debugger's view of this platform's PSP firmware (``sevsim.psp.inspect``), for
        the fuzzer, the tamper campaign, the demo's narration and tests — never for host,
        guest, owner or attack code."""
        return self.platform.psp_debug_port()

    @functools.cached_property
    def kvm(self) -> Kvm:
        """The host's hypervisor (one per host: it owns the ASID allocator)."""
        return Kvm(self.kernel, self.sev)

    def start_x86_guest(
        self,
        name: str,
        workload: str = "secret",
        memory: int = 32 << 20,
        sev: bool = True,
        policy: int = 0,
        firmware: bytes | None = None,
        vcpus: int = 1,
        cpu_signature: int = 0,
    ) -> Vm:
        """A VM whose vCPUs execute real code: a firmware image (the package's real-code
        guest by default) mapped below 4 GiB as QEMU's -bios, the workload, the RAM size and
        the number of vCPUs in fw_cfg (with its DMA interface, as QEMU offers it), and for
        SEV the image encrypted and measured
        (LAUNCH_UPDATE_DATA) before it runs. The first vCPU boots; the others wait for
        its STARTUP IPIs (the image's ``aps`` workload). A policy with the ES bit makes it
        an SEV-ES guest: its APs start at the image's SEV-ES reset block, and every vCPU's
        VMSA is encrypted and measured after the image (LAUNCH_UPDATE_VMSA)."""
        from sevsim.api import fwcfg, ovmf
        from sevsim.api.policy import PolicyFlag
        from sevsim.guest import x86 as x86_guest
        from sevsim.host.vmm import FwCfgDevice, set_ap_reset_vectors

        es = sev and bool(policy & PolicyFlag.ES)
        vm = self.kvm.create_vm(
            memory, vcpus=vcpus, sev=sev, name=name, sev_es=es, cpu_signature=cpu_signature
        )
        image = x86_guest.image() if firmware is None else firmware
        base = vm.load_firmware(image)
        if es:
            try:
                set_ap_reset_vectors(vm, ovmf.parse_table(image))
            except ValueError:
                vm.destroy()
                raise
        directory, items = fwcfg.file_directory({x86_guest.WORKLOAD_FILE: workload.encode()})
        items[fwcfg.FILE_DIR] = directory
        items[fwcfg.SIGNATURE] = b"QEMU"
        items[fwcfg.RAM_SIZE] = memory.to_bytes(8, "little")
        items[fwcfg.ID] = (fwcfg.FEATURE_TRADITIONAL | fwcfg.FEATURE_DMA).to_bytes(4, "little")
        items[fwcfg.NB_CPUS] = vcpus.to_bytes(2, "little")
        device = FwCfgDevice(vm, items)
        for port in (fwcfg.PORT_SELECTOR, fwcfg.PORT_DATA, fwcfg.PORT_DMA_HIGH, fwcfg.PORT_DMA_LOW):
            vm.io_ports[port] = device
        if sev:
            vm.sev_launch_start(policy)
            vm.sev_launch_update_data(base, len(image))
            if es:
                vm.sev_launch_update_vmsa()
            vm.sev_launch_measure()
            vm.sev_launch_finish()
        return vm

    @property
    def kds(self) -> KeyDistributionService:
        return KeyDistributionService(self.data_dir)

    def check(self, what: str, result: IoctlResult) -> IoctlResult:
        if not result.ok:
            raise PlatformError(what, result)
        return result

    def chip_id(self) -> bytes:
        return self.check("GET_ID", self.sev.get_id2()).data["id"]

    def export_chain(self, full: bool = False) -> SevChain:
        """sevctl ``export``: PDH_CERT_EXPORT, with the CEK replaced by the KDS's signed one;
        ``full`` adds the ASK and ARK of the platform's generation."""
        result = self.check("PDH_CERT_EXPORT", self.sev.pdh_cert_export())
        pek, oca, _unsigned_cek = decode_platform_certs(result.data["chain"])
        kds = self.kds
        chip = self.chip_id()
        chain = SevChain(SevCert.parse(result.data["pdh"]), pek, oca, kds.cek_cert(chip))
        if full:
            root = kds.root(kds.generation_of(chip))
            chain.ask, chain.ark = root.ask, root.ark
        return chain
