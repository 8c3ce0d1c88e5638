"""SEV-ES launch: the firmware's LAUNCH_UPDATE_VMSA (sev-api.md §5.3, AMD-ASPFW sev_mcmd.c
launch_update_common), DBG_DECRYPT/DBG_ENCRYPT on a VMSA page (§7.4), the initial VMSA
(§8.4) and the SEV-ES launch digest (§8.1) against published vectors (§9.2, §9.4)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RawMailbox, make_platform, psp_port

from sevsim.api import commands as c
from sevsim.api import ovmf
from sevsim.api import policy as pol
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.api.vmsa import VMSA, initial_vmsa, vcpu_signature
from sevsim.cli import main
from sevsim.guest import x86 as x86_guest
from sevsim.owner import measure as measure_mod

VECTORS = Path(__file__).parent / "testdata" / "vectors"
AMDSEV_SUFFIX = VECTORS / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"
SEVCTL = VECTORS / "sevctl"

IMAGE_PA = 0x40_0000
VMSA_PA = 0x50_0000
MEASURE_PA = 0x30_0000
DBG_PA = 0x60_0000
ES_ASID = 5  # below min_sev_asid (the part reserves 1..99 for SEV-ES)
ES = pol.PolicyFlag.ES


# ---- a firmware with SEV-ES configured, driven through the raw mailbox ---------------------
def es_platform() -> RawMailbox:
    mb = RawMailbox(make_platform("milan", sev_edx=100))
    status = mb.init(flags=c.CONFIG_FLAG_ES, tmr_paddr=0x100_0000, tmr_len=1 << 20)
    assert status == Status.SUCCESS
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    return mb


def cmd(mb, command, **fields) -> Status:
    return mb.cmd(command, c.BUFFERS[command].build(**fields))[0]


def launch_start(mb, policy) -> int:
    status, out = mb.cmd(Command.LAUNCH_START, c.LAUNCH_START.build(handle=0, policy=policy))
    assert status == Status.SUCCESS
    return c.LAUNCH_START.parse(out).handle


def update_vmsa(mb, handle, paddr=VMSA_PA, length=4096) -> Status:
    return cmd(mb, Command.LAUNCH_UPDATE_VMSA, handle=handle, paddr=paddr, len=length)


def launch_measure(mb, handle) -> bytes:
    buf = c.LAUNCH_MEASURE.build(handle=handle, measure_paddr=MEASURE_PA, measure_len=48)
    assert mb.cmd(Command.LAUNCH_MEASURE, buf)[0] == Status.SUCCESS
    return mb.read(MEASURE_PA, 48)


def hmac_measure(api, policy: int, digest: bytes, mnonce: bytes, tik: bytes) -> bytes:
    """sev-api.md §5.4, written out here rather than taken from the package."""
    major, minor, build = api
    data = bytes([0x04, major, minor, build]) + policy.to_bytes(4, "little") + digest + mnonce
    return hmac.new(tik, data, "sha256").digest()


@pytest.fixture
def mb() -> RawMailbox:
    return es_platform()


# ---- LAUNCH_UPDATE_VMSA: the checks, in AMD-ASPFW's order -----------------------------------
def test_the_length_is_checked_before_anything_else():
    mb = RawMailbox(make_platform("milan"))  # UNINIT: no platform, no guest
    assert update_vmsa(mb, 7, length=4080) == Status.INVALID_LENGTH
    assert update_vmsa(mb, 7, length=8192) == Status.INVALID_LENGTH
    assert update_vmsa(mb, 7) == Status.INVALID_PLATFORM_STATE


def test_checks_follow_the_firmware_order(mb):
    assert update_vmsa(mb, 1) == Status.INVALID_PLATFORM_STATE  # INIT: no guest yet
    plain = launch_start(mb, 0)  # the platform is WORKING now
    assert update_vmsa(mb, 99) == Status.INVALID_GUEST
    assert cmd(mb, Command.ACTIVATE, handle=plain, asid=100) == Status.SUCCESS
    assert update_vmsa(mb, plain) == Status.UNSUPPORTED  # a VMSA needs the ES policy bit
    es = launch_start(mb, ES)
    assert update_vmsa(mb, es) == Status.INACTIVE  # before ACTIVATE
    assert cmd(mb, Command.ACTIVATE, handle=es, asid=ES_ASID) == Status.SUCCESS
    assert update_vmsa(mb, es, paddr=VMSA_PA + 8) == Status.INVALID_ADDRESS
    assert update_vmsa(mb, es, paddr=1 << 45) == Status.INVALID_ADDRESS  # a reduced bit
    assert update_vmsa(mb, es) == Status.SUCCESS
    launch_measure(mb, es)
    assert update_vmsa(mb, es) == Status.INVALID_GUEST_STATE  # LSECRET: the launch is measured


def test_the_guest_state_is_checked_before_the_policy(mb):
    plain = launch_start(mb, 0)
    launch_measure(mb, plain)  # LSECRET
    assert update_vmsa(mb, plain) == Status.INVALID_GUEST_STATE


# ---- LAUNCH_UPDATE_VMSA: the effect -------------------------------------------------------
def test_vmsa_pages_are_measured_encrypted_and_sealed(mb):
    m = mb.machine
    h = launch_start(mb, ES)
    assert cmd(mb, Command.ACTIVATE, handle=h, asid=ES_ASID) == Status.SUCCESS
    image = os.urandom(4096)
    mb.write(IMAGE_PA, image)
    assert cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=4096) == (
        Status.SUCCESS
    )
    sig = vcpu_signature("EPYC-Milan")
    pages = [initial_vmsa(None, sig), initial_vmsa(0x80_B004, sig)]
    for i, page in enumerate(pages):
        mb.write(VMSA_PA + 0x1000 * i, page)
        assert update_vmsa(mb, h, paddr=VMSA_PA + 0x1000 * i) == Status.SUCCESS
    m.cache.wbinvd()
    guest_key = m.memctl.key_slot(True, ES_ASID)
    for i, page in enumerate(pages):
        pa = VMSA_PA + 0x1000 * i
        assert m.dram.read(pa, 4096) != page  # ciphertext in DRAM
        assert m.memctl.read(pa, 4096, guest_key) == page
        # The hardware holds the page's integrity value: VMRUN accepts this page only.
        assert m.chip.vmsa_intact(pa, page)
        assert not m.chip.vmsa_intact(pa, page[:-1] + b"\1")
    # The digest covers the plaintexts in command order: image, BSP, AP (§5.3, §8.1).
    blob = launch_measure(mb, h)
    digest = hashlib.sha256(image + pages[0] + pages[1]).digest()
    api = psp_port(mb).api_version
    assert blob[:32] == hmac_measure(api, ES, digest, blob[32:], bytes(16))


def test_the_c_bit_in_paddr_reads_the_page_with_the_host_key(mb):
    """KVM gives the VMSA's address with the C-bit (an SME host writes it encrypted)."""
    m = mb.machine
    h = launch_start(mb, ES)
    cmd(mb, Command.ACTIVATE, handle=h, asid=ES_ASID)
    page = initial_vmsa(None, vcpu_signature("EPYC"))
    m.cache.write(VMSA_PA, page, m.memctl.host_key_slot)
    assert update_vmsa(mb, h, paddr=VMSA_PA | m.cbit_mask) == Status.SUCCESS
    m.cache.wbinvd()
    assert m.memctl.read(VMSA_PA, 4096, m.memctl.key_slot(True, ES_ASID)) == page
    assert m.chip.vmsa_intact(VMSA_PA, page)
    digest = hashlib.sha256(page).digest()
    blob = launch_measure(mb, h)
    assert blob[:32] == hmac_measure(psp_port(mb).api_version, ES, digest, blob[32:], bytes(16))


# ---- DBG_DECRYPT / DBG_ENCRYPT on a VMSA page (AMD-ASPFW: no VMSA check, only NODBG) -------
def _es_guest_with_vmsa(mb, policy) -> tuple[int, bytes]:
    h = launch_start(mb, policy)
    cmd(mb, Command.ACTIVATE, handle=h, asid=ES_ASID)
    page = initial_vmsa(None, vcpu_signature("EPYC-Rome"))
    mb.write(VMSA_PA, page)
    assert update_vmsa(mb, h) == Status.SUCCESS
    return h, page


def test_dbg_decrypt_reads_a_debuggable_guests_vmsa(mb):
    h, page = _es_guest_with_vmsa(mb, ES)
    status = cmd(mb, Command.DBG_DECRYPT, handle=h, src_paddr=VMSA_PA, dst_paddr=DBG_PA, len=4096)
    assert status == Status.SUCCESS
    out = mb.read(DBG_PA, 4096)
    assert out == page
    assert VMSA.parse(out).rdx == vcpu_signature("EPYC-Rome")


def test_dbg_on_a_vmsa_is_refused_by_nodbg(mb):
    h, _ = _es_guest_with_vmsa(mb, ES | pol.PolicyFlag.NODBG)
    for command, src, dst in (
        (Command.DBG_DECRYPT, VMSA_PA, DBG_PA),
        (Command.DBG_ENCRYPT, DBG_PA, VMSA_PA),
    ):
        status = cmd(mb, command, handle=h, src_paddr=src, dst_paddr=dst, len=4096)
        assert status == Status.POLICY_FAILURE


def test_dbg_encrypt_over_a_vmsa_breaks_its_integrity_value(mb):
    """The firmware writes the page but does not reseal it: VMRUN would refuse the VMSA."""
    m = mb.machine
    h, page = _es_guest_with_vmsa(mb, ES)
    changed = VMSA.build(dataclasses.replace(VMSA.parse(page), rip=0x1234))
    mb.write(DBG_PA, changed)
    status = cmd(mb, Command.DBG_ENCRYPT, handle=h, src_paddr=DBG_PA, dst_paddr=VMSA_PA, len=4096)
    assert status == Status.SUCCESS
    m.cache.wbinvd()
    assert m.memctl.read(VMSA_PA, 4096, m.memctl.key_slot(True, ES_ASID)) == changed
    assert m.chip.vmsa_intact(VMSA_PA, page)  # the sealed value is still the launch page's
    assert not m.chip.vmsa_intact(VMSA_PA, changed)


# ---- the initial VMSA and the SEV-ES launch digest (known answers) ------------------------
def test_initial_vmsa_equals_sevctls_pages_for_the_pre_6_10_kernel():
    """sevctl's VMSA files (Milan signature 0xA00F11, AP reset EIP 0x80B004) were dumped
    from a host kernel older than 6.10: MXCSR and FCW are zero there."""
    sig = 0x00A0_0F11
    assert sig == vcpu_signature("EPYC-Milan")
    assert initial_vmsa(None, sig, fpu_state=False) == (SEVCTL / "vmsa0.bin").read_bytes()
    assert initial_vmsa(0x80_B004, sig, fpu_state=False) == (SEVCTL / "vmsa1.bin").read_bytes()


def test_initial_vmsa_fields_match_the_table():
    """sev-api.md §8.4, field by field (an AP differs in CS base and RIP only)."""
    bsp = VMSA.parse(initial_vmsa(None, 0x0080_0F12))
    ap = VMSA.parse(initial_vmsa(0x80_B004, 0x0080_0F12))
    assert (bsp.cs_selector, bsp.cs_base, bsp.rip) == (0xF000, 0xFFFF_0000, 0xFFF0)
    assert (ap.cs_base, ap.rip) == (0x80_0000, 0xB004)
    assert dataclasses.replace(bsp, cs_base=0, rip=0) == dataclasses.replace(ap, cs_base=0, rip=0)
    assert (bsp.efer, bsp.cr4, bsp.cr0, bsp.dr7, bsp.dr6) == (0x1000, 0x40, 0x10, 0x400, 0xFFFF0FF0)
    assert (bsp.rflags, bsp.g_pat, bsp.rdx) == (2, 0x0007040600070406, 0x0080_0F12)
    assert (bsp.xcr0, bsp.mxcsr, bsp.x87_fcw, bsp.sev_features) == (1, 0x1F80, 0x037F, 0)
    assert (bsp.tr_attrib, bsp.ldtr_attrib, bsp.ss_attrib) == (0x8B, 0x82, 0x93)


@pytest.mark.parametrize(
    "vcpus, expected",
    [
        (1, "13810ae661ea11e2bb205621f582fee268f0367c8f97bc297b7fadef3e12002c"),
        (4, "0dccbcaba8e90b261bd0d2e1863a2f9da714768b7b2a19363cd6ae35aa90de91"),
    ],
)
def test_sev_es_launch_digest_equals_sev_snp_measures_vectors(vcpus, expected):
    """sev-api.md §9.4: AmdSev fixture, EPYC-v4, kernel and initrd empty, append ""."""
    es = measure_mod.EsVcpus(vcpus, vcpu_signature("EPYC-v4"))
    digest = measure_mod.launch_digest(AMDSEV_SUFFIX.read_bytes(), b"", b"", "", es)
    assert digest.hex() == expected


def test_sevctls_sev_es_measurement_vector():
    """sev-api.md §9.2: policy 5, API 1.49 build 6, 4 vCPUs, LD over OVMF and sevctl's
    VMSA files, which the pre-6.10 layout of initial_vmsa reproduces."""
    firmware = (
        SEVCTL / "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"
    ).read_bytes()
    files = (SEVCTL / "vmsa0.bin").read_bytes() + (SEVCTL / "vmsa1.bin").read_bytes() * 3
    expected = base64.b64decode("/o0nzDKE5XgtVnUZWPhUea/WZYrTKLExR7KCwuMdbActvpWfXTFk21KMZIAAhQny")
    es = measure_mod.EsVcpus(4, vcpu_signature("EPYC-Milan"), fpu_state=False)
    digest = measure_mod.launch_digest(firmware, es=es)
    assert digest == hashlib.sha256(firmware + files).digest()
    tik = (SEVCTL / "measurement" / "tik1.bin").read_bytes()
    measure = measure_mod.measurement(tik, 1, 49, 6, 5, digest, expected[32:])
    assert measure + expected[32:] == expected


def test_an_es_digest_needs_the_sev_es_reset_block():
    with pytest.raises(measure_mod.MeasureError, match="no SEV-ES reset block"):
        measure_mod.launch_digest(bytes(4096), es=measure_mod.EsVcpus())


# ---- KVM's sev_es_sync_vmsa: the VMSA a reset vCPU gets is the owner's (§8.4) -------------
@pytest.fixture(scope="module")
def host():
    from conftest import boot_host

    host = boot_host("milan")
    yield host
    host.close()


def test_kvm_builds_the_spec_vmsa_of_a_reset_bsp_and_ap(host):
    from sevsim.host.kvm.sev_es import build_vmsa

    vm = host.kvm.create_vm(16 << 20, vcpus=2, name="es-sync")
    try:
        bsp, ap = vm.vcpus
        sig = vcpu_signature("EPYC-Milan")
        # What the VMM does for an SEV-ES guest (QEMU): RDX = the vCPU type's signature,
        # and the AP starts at the firmware's SEV-ES reset block (CS base ‖ IP).
        for vcpu in vm.vcpus:
            vcpu.regs["rdx"] = sig
        ap.set_vmcb(cs_base=0x80_0000, rip=0xB004)
        assert build_vmsa(bsp) == initial_vmsa(None, sig)
        assert build_vmsa(ap) == initial_vmsa(0x80_B004, sig)
        assert build_vmsa(bsp, fpu_state=False) == initial_vmsa(None, sig, fpu_state=False)
    finally:
        vm.destroy()


def test_kvm_carries_registers_into_the_vmsa_and_refuses_host_debugging(host):
    from sevsim.host.kvm.sev_es import build_vmsa
    from sevsim.host.kvm.uapi import KvmError

    vm = host.kvm.create_vm(16 << 20, vcpus=1, name="es-regs")
    try:
        (vcpu,) = vm.vcpus
        vcpu.regs.update(rax=0x1111, rbx=0x2222, r15=0xF0F0)
        vcpu.set_vmcb(rsp=0x7000)
        page = VMSA.parse(build_vmsa(vcpu))
        assert (page.rax, page.rbx, page.r15, page.rsp) == (0x1111, 0x2222, 0xF0F0, 0x7000)
        vcpu.set_guest_debug(1 | 2)  # KVM_GUESTDBG_ENABLE | SINGLESTEP
        with pytest.raises(KvmError, match="host debugging"):
            build_vmsa(vcpu)
    finally:
        vm.destroy()


# ---- against sev-snp-measure, the tool guest owners use (its --mode seves) ----------------
STOCK_OVMF = Path("/usr/share/ovmf/OVMF.fd")  # Debian's ovmf package


def sev_snp_measure() -> str:
    """Its command, installed by the test extra next to this Python."""
    script = Path(sys.executable).parent / "sev-snp-measure"
    if not script.exists():
        pytest.skip("sev-snp-measure is not installed (pip install '.[test]')")
    return str(script)


def firmware_path(which: str, tmp_path: Path) -> Path:
    if which == "stock-ovmf":
        if not STOCK_OVMF.exists():
            pytest.skip(f"{STOCK_OVMF} is absent (Debian package ovmf)")
        return STOCK_OVMF
    image = x86_guest.image()
    if ovmf.reset_address(ovmf.parse_table(image)) is None:
        pytest.skip("the shipped guest image has no SEV-ES reset block yet")
    path = tmp_path / "sevsim-guest.fd"
    path.write_bytes(image)
    return path


def owner_measure_digest(capsys, firmware: Path, tik: Path, *extra: str) -> str:
    args = ["owner", "measure", "--firmware", str(firmware), "--policy", "0x5", "--tik", str(tik)]
    args += ["--api-major", "1", "--api-minor", "55", "--build-id", "0"]
    args += ["--nonce", base64.b64encode(bytes(16)).decode(), "--json", *extra]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["launch_digest"]


@pytest.mark.parametrize("which", ["stock-ovmf", "sevsim-guest"])
@pytest.mark.parametrize("cpu", ["EPYC-v4", "EPYC-Milan"])
@pytest.mark.parametrize("vcpus", [1, 4])
def test_owner_measure_equals_sev_snp_measure(which, cpu, vcpus, tmp_path, capsys):
    firmware = firmware_path(which, tmp_path)
    tik = tmp_path / "tik.bin"
    tik.write_bytes(bytes(16))
    theirs = subprocess.run(
        [sev_snp_measure(), "--mode", "seves", "--vcpus", str(vcpus), "--vcpu-type", cpu]
        + ["--ovmf", str(firmware)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = owner_measure_digest(capsys, firmware, tik, "--cpu", cpu, "--smp", str(vcpus))
    assert ours == theirs
    # And by the spec's formula, written out here: SHA-256(firmware ‖ BSP ‖ AP × (n − 1)).
    image = firmware.read_bytes()
    ap_eip = ovmf.reset_address(ovmf.parse_table(image))
    sig = vcpu_signature(cpu)
    pages = initial_vmsa(None, sig) + initial_vmsa(ap_eip, sig) * (vcpus - 1)
    assert hashlib.sha256(image + pages).hexdigest() == ours
