"""The launch-attestation part of the demo: a remote guest owner, a platform, and a VMM.

The owner side uses only ``sevsim.owner`` and files in a directory of its own: it receives
the platform's certificate chain and the launch measurement as bytes, and sends back its
session files and a secret packet. The host side is the QEMU-like VMM; the guest is the
real-code guest firmware (``sevsim vm firmware``). The physical view is a DRAM dump.
"""

from __future__ import annotations

import base64
import tempfile
import uuid
from pathlib import Path

from sevsim.attacks.physical import ColdBootDump
from sevsim.certs.chain import verify_chain
from sevsim.demo.steps import Step, Story, Working
from sevsim.guest import x86 as x86_guest
from sevsim.host.vmm import VmConfig, Vmm, VmmError
from sevsim.owner import measure, secret, session
from sevsim.owner.trust import choose_root
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

POLICY = 0x1  # NODBG
SECRET = b"disk key: 7f3c9a11d2e84b60a5f1c0de"
SECRET_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")


def attest_story(profile: MachineProfile) -> Story:
    yield Working("the guest owner opens a session with a platform")
    system = HostSystem.start(profile)
    try:
        with tempfile.TemporaryDirectory(prefix="sevsim-owner-") as owner_dir:
            yield from _story(system, Path(owner_dir))
    finally:
        system.close()


def _story(system: HostSystem, owner_dir: Path) -> Story:
    firmware = owner_dir / "OVMF.fd"  # the owner and the VMM use the same published image
    firmware.write_bytes(x86_guest.flash_image(2 << 20))
    chain = system.export_chain()
    report = verify_chain(chain, choose_root(chain, "sim", system.data_dir))
    owner = session.start(chain.pdh, POLICY)
    files = owner.write(owner_dir, "vm")
    s = Step(
        "The guest owner opens a session with this platform",
        "The owner receives the platform's certificate chain, checks every link up to "
        "AMD's root, and only then uses its PDH: a fresh ECDH key of its own, a shared "
        "secret, and from it a KEK and a KIK that wrap new transport keys (TEK, TIK) for "
        "the firmware alone. The GODH certificate and the session blob go to the VMM; the "
        "TEK and the TIK never leave the owner.",
        facts=[
            ("chain", "verified link by link" if report.ok else "REJECTED"),
            ("policy", f"{POLICY:#x} (no debugging)"),
            ("files for the VMM", f"{files['godh'].name}, {files['session'].name}"),
            ("files the owner keeps", f"{files['tek'].name}, {files['tik'].name}"),
        ],
    )
    s.check("the platform's chain verifies", report.ok)
    yield s

    # The launch, paused before LAUNCH_FINISH; the owner checks the measurement.
    yield Working("the VMM launches the guest; the owner checks the measurement")
    vmm = _vmm(system, firmware, files, POLICY)
    vmm.start()
    major, minor, build = system.sev.api_version
    expected = measure.launch_digest(firmware.read_bytes())
    blob = base64.b64decode(vmm.query_launch_measure()["data"])
    verdict = measure.check(blob, owner.tik, major, minor, build, POLICY, expected)
    s = Step(
        "The VMM launches the guest; the owner checks the measurement",
        "Like QEMU: LAUNCH_START with the owner's files, the 2 MiB firmware encrypted in "
        "place and hashed by the firmware (LAUNCH_UPDATE_DATA), then LAUNCH_MEASURE — an "
        "HMAC under the TIK of the firmware version, the policy, the launch digest and a "
        "nonce. The guest waits, paused. The owner recomputes the digest from the same "
        "firmware file and the HMAC from its TIK.",
        facts=[
            ("launch digest (owner)", expected.hex()),
            ("measurement (platform)", base64.b64encode(blob).decode()),
            ("firmware", f"SEV API {major}.{minor} build {build}"),
        ],
    )
    s.check("the owner's expected measurement matches", verdict.ok)
    s.check("the guest waits in LAUNCH_SECRET state", vmm.query_sev()["state"] == "launch-secret")
    yield s

    yield Working("launching a patched firmware and a weaker policy")
    yield _tamper_step(system, owner, owner_dir, firmware, files)

    # The secret, and the guest using it.
    yield Working("the owner sends a secret; the guest runs")
    entries = [(SECRET_GUID, SECRET)]
    vmm.inject_secret(*secret.secrets_table_packet_b64(owner.tek, owner.tik, blob, entries), None)
    vmm.cont()
    vmm.wait_idle(60)
    console = vmm.console_text()
    system.kernel.wbinvd_on_all_cpus()
    dump = ColdBootDump(system.machine)
    s = Step(
        "The owner sends a secret; the guest uses it",
        "The owner encrypts the secret with the TEK and MACs the packet with the TIK and the "
        "verified measurement, so it opens only inside this launch. The firmware checks the "
        "MAC and writes the secret into the guest's secret area under the guest's key "
        "(LAUNCH_SECRET); then LAUNCH_FINISH, and the guest runs. It proves it holds the "
        'secret without showing it: it prints HMAC(secret, "sevsim guest ready").',
        facts=[("guest console", console.rstrip())],
    )
    secret_gpa = x86_guest.symbols()["SEV_LAUNCH_SECRET_GPA"]
    s.check(
        "the guest's proof matches the owner's secret",
        secret.ready_tag(SECRET) in console,
    )
    s.check("the secret is not on the console", SECRET not in console.encode())
    s.check("a DRAM dump does not contain the secret", not dump.find(SECRET))
    s.check(
        "the hypervisor reads only ciphertext in the secret area",
        SECRET not in vmm.vm.read(secret_gpa, 0xC00),
    )
    vmm.quit()
    yield s


def _vmm(system: HostSystem, firmware: Path, files: dict[str, Path], policy: int) -> Vmm:
    config = VmConfig(
        firmware=firmware,
        memory=64 << 20,
        policy=policy,
        dh_cert_file=files["godh"],
        session_file=files["session"],
    )
    return Vmm(system, config)


def _tamper_step(
    system: HostSystem,
    owner: session.OwnerSession,
    owner_dir: Path,
    firmware: Path,
    files: dict[str, Path],
) -> Step:
    # 1. A host that boots a patched firmware: the owner's check fails.
    patched = bytearray(firmware.read_bytes())
    patched[0x1000] ^= 0x01
    bad_fw = owner_dir / "patched.fd"
    bad_fw.write_bytes(bytes(patched))
    vmm = _vmm(system, bad_fw, files, POLICY)
    vmm.start()
    major, minor, build = system.sev.api_version
    blob = base64.b64decode(vmm.query_launch_measure()["data"])
    honest = measure.launch_digest(firmware.read_bytes())
    verdict = measure.check(blob, owner.tik, major, minor, build, POLICY, honest)
    vmm.quit()
    # 2. A host that launches with a weaker policy (debugging allowed): the firmware
    #    refuses the session, whose policy MAC covers the owner's policy.
    weak = _vmm(system, firmware, files, 0x0)
    try:
        weak.start()
        refused = ""
    except VmmError as exc:
        refused = str(exc)
    weak.quit()
    s = Step(
        "Tampering is caught",
        "A host that boots a patched firmware gets a different launch digest, so the owner's "
        "check fails and it sends no secret. A host that launches with a weaker policy than "
        "the owner's (debugging allowed) is refused by the firmware itself: the session's "
        "policy MAC covers the owner's policy.",
        facts=[
            ("patched firmware", "MISMATCH" if not verdict.ok else "accepted!"),
            ("weaker policy", refused or "accepted!"),
        ],
    )
    s.check("the owner rejects the patched firmware's measurement", not verdict.ok)
    s.check(
        "LAUNCH_START refuses the weaker policy (BAD_MEASUREMENT)", "BAD_MEASUREMENT" in refused
    )
    return s
