"""A stock OVMF (Debian's /usr/share/ovmf/OVMF.fd, a release build) in an SEV guest on
sevsim's x86 engine, as far as it goes (docs/model.md, "A stock OVMF"). Nothing here knows
OVMF's internals: the tests look at what it did to the machine's devices — the fw_cfg
items it selected, the PCI registers it programmed, the CPU-hotplug interface it switched
to — and at what it printed on the serial console."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sevsim.api import fwcfg
from sevsim.host.vmm import VmConfig, Vmm
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

OVMF = Path("/usr/share/ovmf/OVMF.fd")
pytestmark = pytest.mark.skipif(
    not OVMF.exists(), reason="no stock OVMF: install Debian's ovmf package (/usr/share/ovmf)"
)
NX_FILE = "opt/ovmf/PcdSetNxForStack"  # PlatformPei looks it up by name (QemuFwCfgParseBool)


def run_until(tmp_path: Path, done, timeout: float, record: list[int] | None = None):
    """Launch OVMF in an SEV guest (256 MiB, as QEMU's -m 256M) and run it until
    ``done(vmm)`` holds; return the VMM (still there) and the fw_cfg keys selected."""
    host = HostSystem.start(get_profile("milan").with_(seed=3), tmp_path / "state")
    config = VmConfig(
        firmware=OVMF,
        memory=256 << 20,
        console=tmp_path / "console.log",
        fw_cfg_files={NX_FILE: b"no"},  # Debian's default: a file only to be looked up
    )
    vmm = Vmm(host, config)
    vmm.start()
    selected = [] if record is None else record
    device = vmm.vm.io_ports[fwcfg.PORT_SELECTOR]
    select = device._select

    def recording_select(key: int) -> None:  # every selection, by port or by DMA
        selected.append(key)
        select(key)

    device._select = recording_select
    vmm.cont()
    deadline = time.monotonic() + timeout
    while not done(vmm) and vmm.guest_died is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return host, vmm, selected


def finish(host, vmm) -> None:
    vmm.quit()
    host.close()


def test_ovmf_identifies_the_pc_machine_in_pei_and_reads_fw_cfg(tmp_path):
    """PlatformPei: the host bridge's ID (i440FX) picks the PIIX4 PM function, whose
    PMBA it sets to 0xB000 and enables; the boot CPU count comes from fw_cfg and the
    possible count from QEMU's CPU-hotplug registers, switched to the modern interface."""

    selected: list[int] = []

    def read_nx_file(vmm) -> bool:
        return fwcfg.FILE_FIRST in selected

    host, vmm, selected = run_until(tmp_path, read_nx_file, timeout=120, record=selected)
    try:
        assert vmm.guest_died is None, vmm.guest_died
        board = vmm.board
        # QemuFwCfgLib first checks the signature and the interface revision; PlatformPei
        # asks for the boot CPU count, and finds its options by name in the directory.
        assert selected[:2] == [fwcfg.SIGNATURE, fwcfg.ID]
        assert fwcfg.NB_CPUS in selected
        nx = selected.index(fwcfg.FILE_FIRST)
        assert fwcfg.FILE_DIR in selected[:nx] and selected.index(fwcfg.NB_CPUS) < nx
        # PIIX4 PM: PMBA 0xB000 (an I/O base) and PMIOSE, set by SEC's AcpiTimerLib: what
        # OVMF does only when it found the i440FX (0x1237) at 00:00.0.
        pm = board.pm_function
        assert pm.dword(0x40) == 0xB001 and pm.config[0x80] & 1
        assert board.pm.base == 0xB000
        assert board.cpu_hotplug.modern
    finally:
        finish(host, vmm)


@pytest.mark.slow
def test_stock_ovmf_boots_an_sev_guest_to_the_uefi_shell(tmp_path):
    """All the way: PEI, DXE (its timer is the local APIC's, its console COM1), BDS with
    no disk boots the built-in shell, which counts 5 seconds down on timer interrupts."""

    def at_prompt(vmm) -> bool:
        return b"Shell> " in vmm.vm.console

    host, vmm, selected = run_until(tmp_path, at_prompt, timeout=900)
    try:
        assert vmm.guest_died is None, vmm.guest_died
        console = vmm.console_text()
        assert 'BdsDxe: starting Boot0001 "EFI Internal Shell"' in console
        assert "UEFI Interactive Shell v2.2" in console
        for n in (5, 4, 3, 2, 1):
            assert f"in {n} seconds to skip" in console
        assert "Shell> " in console
        # The named file PlatformPei looked up was found in the directory and read.
        assert fwcfg.FILE_FIRST in selected
        board, apic = vmm.board, vmm.vm.vcpus[0].apic
        # BDS routed the PCI interrupt lines (OVMF's PciAcpiInitialization: PIRQA-D 10/11).
        assert [board.isa_bridge.pirq_route(i) for i in range(4)] == [10, 10, 11, 11]
        # LocalApicTimerDxe: a periodic, unmasked timer.
        assert apic.regs[0x320] & (1 << 17) and not apic.regs[0x320] & (1 << 16)
    finally:
        finish(host, vmm)
