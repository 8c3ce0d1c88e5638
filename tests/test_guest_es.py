"""The real-code guest image as an SEV-ES guest (src/sevsim/guest/x86: entry32.S's early #VC
handler, sev_es.c, the reset block in reset16.S and ovmf_table.S, trampoline.S's ES path):
it boots, runs its workloads with every intercepted instruction handled by its own #VC
handler, and starts its APs through the reset block. Each guest here is checked from the
outside: its console, its memory as the host sees it (the GHCB pages in the clear, private
pages as ciphertext), and, where its policy allows debugging, DBG_DECRYPT."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import struct
import uuid

import pytest
from conftest import boot_host

from sevsim.api import guidtable, ovmf
from sevsim.api.vmsa import GHCB, GHCB_SHARED_BUFFER, ghcb_is_valid
from sevsim.certs.sev import SevCert
from sevsim.guest import x86 as x86_guest
from sevsim.host.virtio_blk import create_image
from sevsim.host.vmm import VmConfig, Vmm
from sevsim.owner import secret, session

SYMBOLS = x86_guest.symbols()
ES_DEBUG = 0x4  # policy: SEV-ES, debugging allowed (DBG_DECRYPT reads what the guest keeps)
ES = 0x5  # policy: SEV-ES, no debugging (QEMU's default NODBG, plus ES)
MARKER = b"sevsim secret:"
VC_KINDS = ("msr-protocol", "cpuid", "ioio", "msr", "vmmcall", "mmio")  # layout.h VC_*
VC_LINE = re.compile(
    r"#VC handled: cpuid (\d+) \((\d+) more through the GHCB MSR\), ioio (\d+), msr (\d+), "
    r"vmmcall (\d+), mmio (\d+)"
)
DISK_KEY_GUID = uuid.UUID("5e4f6a3c-9b1d-4c2e-8f7a-0d3b2c1e4a5f")  # docs/devices.md
MiB = 1 << 20


@pytest.fixture(scope="module")
def milan():
    host = boot_host("milan")
    yield host
    host.close()


@pytest.fixture(scope="module")
def smp_guest(milan):
    """Four vCPUs: the secret, the APs (each hashes it), an unknown MSR, a short count."""
    vm = milan.start_x86_guest("es-smp", "aps msr-gp count:70000", policy=ES_DEBUG, vcpus=4)
    exits = vm.run()
    assert [e.reason for e in exits] == ["DONE"] * 4, (exits, vm.console_text())
    yield vm
    vm.destroy()


def vc_counts(console: str) -> dict[str, int]:
    cpuid, msr_protocol, *rest = (int(n) for n in VC_LINE.search(console).groups())
    return dict(zip(VC_KINDS, (msr_protocol, cpuid, *rest), strict=True))


def test_the_guest_knows_it_is_sev_es_and_runs_its_workloads(smp_guest):
    console = smp_guest.console_text()
    cbit = int(re.search(r"SEV active, C-bit (\d+), SEV_STATUS 0x3 \(SEV-ES\)", console)[1])
    assert cbit == 51  # Milan
    assert "sevsim-guest: count 65536" in console and "sevsim-guest: count 70000" in console
    assert "sevsim-guest: aps: 4 CPUs online" in console
    assert console.endswith("sevsim-guest: done\n")


def test_each_ap_started_at_the_reset_block_and_read_the_secret(smp_guest):
    console = smp_guest.console_text()
    digest = re.search(r"secret at 0x200000, sha256 ([0-9a-f]{64})", console)[1]
    # The digest recomputed here from the private page, read with DBG_DECRYPT.
    kept = smp_guest.sev_dbg_decrypt(SYMBOLS["SECRET_GPA"], 64)
    assert kept.startswith(MARKER)
    assert hashlib.sha256(kept[len(MARKER) : len(MARKER) + 32]).hexdigest() == digest
    for n in (1, 2, 3):
        assert f"sevsim-guest: cpu {n} read the secret, sha256 {digest}" in console
    # KVM never loaded an AP's registers after the launch: its view is the reset state the
    # VMM gave it, the reset block's address from the image's footer table.
    reset = ovmf.reset_address(ovmf.parse_table(x86_guest.image()))
    assert reset == SYMBOLS["sev_es_ap_reset"]
    for vcpu in smp_guest.vcpus[1:]:
        vmcb = vcpu.vmcb()
        assert (vmcb.cs_base, vmcb.rip) == (reset & 0xFFFF_0000, reset & 0xFFFF)


def test_the_vc_handler_served_every_kind_of_exit(smp_guest):
    printed = vc_counts(smp_guest.console_text())
    # entry32.S's CPUIDs went over the MSR protocol (the APIC ID, 0x80000000, 0x8000001F,
    # 0x80000001); every other kind went through a GHCB: CPUID (rdrand_supported), IOIO
    # (the console, fw_cfg), MSR (aps reads MSR_IA32_APICBASE, msr-gp an unknown MSR),
    # VMMCALL (KVM_HC_MAP_GPA_RANGE), MMIO (the local APIC).
    assert printed["msr-protocol"] == 4
    assert all(printed[kind] > 0 for kind in VC_KINDS), printed
    assert printed["msr"] == 2
    # The counters in the guest's memory, read after the run: the console line and "done"
    # were printed after the snapshot, so only IOIO grew.
    raw = smp_guest.sev_dbg_decrypt(SYMBOLS["VC_COUNTS_GPA"], 8 * len(VC_KINDS))
    kept = dict(zip(VC_KINDS, struct.unpack(f"<{len(VC_KINDS)}Q", raw), strict=True))
    assert kept["ioio"] > printed["ioio"]
    assert {k: v for k, v in kept.items() if k != "ioio"} == {
        k: v for k, v in printed.items() if k != "ioio"
    }
    assert not smp_guest.ghcb_errors


def test_kvm_s_gp_for_an_unknown_msr_is_raised_at_the_rdmsr(smp_guest):
    """KVM answers the #VC of a RDMSR it does not know with "raise #GP" (sw_exit_info_1 =
    1); the handler raises it as if the RDMSR had: RIP at the RDMSR, error code 0."""
    image = x86_guest.image()
    base = SYMBOLS["IMAGE_BASE"]
    rdmsr = base + image.index(b"\x0f\x32", SYMBOLS["probe_rdmsr"] - base)  # its first RDMSR
    console = smp_guest.console_text()
    assert f"exception general-protection (#13) at rip={rdmsr:#x} error=0x0" in console
    assert "sevsim-guest: msr-gp ok" in console


def test_the_ghcbs_are_shared_and_the_secret_stays_private(smp_guest):
    vm = smp_guest
    ghcb_gpa = SYMBOLS["GHCB_GPA"]
    # The BSP's GHCB, read through the host's mapping in the clear: its last request was
    # the OUT of the final newline to COM1 (KVM's answer, 0 = done, replaced EXITINFO1).
    bsp = GHCB.parse(vm.read(ghcb_gpa, GHCB.size))
    assert bsp.protocol_version == 1 and bsp.ghcb_usage == 0
    assert (bsp.sw_exit_code, bsp.sw_exit_info_1) == (0x7B, 0)
    assert bsp.rax == ord("\n")
    # KVM cleared the valid bitmap when it took the request, and its answer to an OUT
    # marks no register.
    assert ghcb_is_valid(bsp.valid_bitmap, "sw_exit_info_1")
    assert not ghcb_is_valid(bsp.valid_bitmap, "rax")
    # Each AP's GHCB: its last request read the APIC's ICR (waiting for the wake-up IPI to
    # leave) through the shared buffer, which sw_scratch names.
    for n in (1, 2, 3):
        ap = GHCB.parse(vm.read(ghcb_gpa + n * 4096, GHCB.size))
        assert (ap.sw_exit_code, ap.sw_exit_info_1) == (0x8000_0001, 0)
        assert ap.sw_scratch == ghcb_gpa + n * 4096 + GHCB_SHARED_BUFFER
    # The secret's page is private: ciphertext through the host's mapping.
    assert MARKER not in vm.read(SYMBOLS["SECRET_GPA"], 4096)
    assert vm.sev_dbg_decrypt(SYMBOLS["SECRET_GPA"], len(MARKER)) == MARKER


def test_a_plain_sev_guest_takes_no_vc(milan):
    vm = milan.start_x86_guest("sev", "secret", policy=0)
    assert [e.reason for e in vm.run()] == ["DONE"]
    console = vm.console_text()
    assert "SEV_STATUS 0x1\n" in console and "SEV-ES" not in console
    assert "#VC" not in console
    assert vm.vmgexits == 0
    vm.destroy()


def test_measured_launch_secret_and_an_encrypted_disk(milan, tmp_path):
    """Through the VMM with QEMU's policy plus ES (no debugging): the owner's secret is
    injected after the measurement, the guest proves it has it and uses it as its disk
    key; the data goes out through the virtio disk and comes back."""
    key = bytes(range(64))
    fw = tmp_path / "fw.fd"
    fw.write_bytes(x86_guest.image())
    disk = tmp_path / "disk.img"
    create_image(disk, 8 * MiB)
    pdh = SevCert.parse(milan.sev.pdh_cert_export().data["pdh"])
    owner = session.start(pdh, ES)
    owner.write(tmp_path, "vm")
    cfg = VmConfig(
        firmware=fw,
        memory=128 * MiB,
        policy=ES,
        dh_cert_file=tmp_path / "vm_godh.b64",
        session_file=tmp_path / "vm_session.b64",
        console=tmp_path / "console.log",
        fw_cfg_files={x86_guest.WORKLOAD_FILE: b"disk:1:3"},
        disk=disk,
    )
    vmm = Vmm(milan, cfg)
    vmm.start()
    table = guidtable.secrets_table([(DISK_KEY_GUID, key)])
    header, payload = secret.build_packet(owner.tek, owner.tik, vmm.measurement[:32], table)
    vmm.inject_secret(base64.b64encode(header).decode(), base64.b64encode(payload).decode(), None)
    vmm.cont()
    assert vmm.wait_idle(600), vmm.console_text()
    log = vmm.console_text()
    assert "(SEV-ES)" in log and log.endswith("sevsim-guest: done\n"), log
    assert secret.ready_tag(key) in log
    assert "disk: wrote 1 MiB to vda (AES-XTS encrypted)" in log
    assert "disk: read 1 MiB back, matches what was written" in log
    # The file holds no plaintext of the public pattern (disk.c's recipe).
    line = b"sevsim guest disk, seed 3: written by the guest through its bounce buffers\n"
    want = line.ljust(512, b"\0") + random.Random(3).randbytes(MiB - 512)
    assert disk.read_bytes()[:MiB] != want and line not in disk.read_bytes()
    assert vc_counts(log)["vmmcall"] > 0  # the bounce pool and the virtqueue were shared
    vmm.quit()
