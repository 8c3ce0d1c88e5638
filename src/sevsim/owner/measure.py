"""What the guest owner expects the launch measurement to be (sev-api.md §5.4, §8).

The launch digest is SHA-256 over what QEMU has the firmware encrypt with
LAUNCH_UPDATE_DATA: the firmware image, then — when QEMU was given --kernel — the padded
SEV hashes table of kernel, initrd and command line. An SEV-ES guest (policy bit ES) adds
one 4096-byte VMSA per vCPU, in vCPU order, from LAUNCH_UPDATE_VMSA: the boot processor's
at the reset vector, then every AP's at the firmware's SEV-ES reset block. The measurement
is HMAC-SHA256(TIK, 0x04 ‖ API major ‖ API minor ‖ build ‖ LE32 policy ‖ digest ‖ MNONCE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sevsim import crypto
from sevsim.api import channel, guidtable, ovmf
from sevsim.api import vmsa as sev_vmsa
from sevsim.api.commands import MEASUREMENT

MEASUREMENT_SIZE = MEASUREMENT.size  # MEASURE ‖ MNONCE


class MeasureError(ValueError):
    """Inputs from which no launch digest can be computed (one line for the user)."""


@dataclass(frozen=True)
class EsVcpus:
    """What an SEV-ES digest needs beyond the images: the vCPUs the VMM launched."""

    count: int = 1  # QEMU -smp
    signature: int = sev_vmsa.vcpu_signature("EPYC")  # RDX at reset (QEMU -cpu)
    fpu_state: bool = True  # Linux >= 6.10 (KVM_SEV_INIT2) sets MXCSR and the x87 FCW


def ap_reset_eip(firmware: bytes) -> int:
    """Where APs start: the SEV-ES reset block of the firmware's footer table."""
    try:
        eip = ovmf.reset_address(ovmf.parse_table(firmware))
    except ovmf.OvmfError as exc:
        raise MeasureError(f"the firmware's footer table is damaged: {exc}") from None
    if eip is None:
        raise MeasureError(
            "the firmware has no SEV-ES reset block: it cannot start an SEV-ES guest"
        )
    return eip


def vmsa_pages(firmware: bytes, vcpus: EsVcpus) -> list[bytes]:
    """The plaintext VMSA of each vCPU, in the order LAUNCH_UPDATE_VMSA measures them."""
    if vcpus.count < 1:
        raise MeasureError(f"an SEV-ES guest has at least one vCPU, not {vcpus.count}")
    ap_eip = ap_reset_eip(firmware)
    bsp = sev_vmsa.initial_vmsa(None, vcpus.signature, vcpus.fpu_state)
    ap = sev_vmsa.initial_vmsa(ap_eip, vcpus.signature, vcpus.fpu_state)
    return [bsp] + [ap] * (vcpus.count - 1)


def launch_digest(
    firmware: bytes,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | None = None,
    es: EsVcpus | None = None,
) -> bytes:
    """SHA-256(firmware [‖ hashes table] [‖ VMSA pages]); a missing initrd hashes as empty
    data and a missing command line as the empty string (its NUL byte only), as QEMU
    does. ``es``: an SEV-ES guest's vCPUs (None: plain SEV, no VMSA)."""
    digest = hashlib.sha256(firmware)
    if kernel is not None:
        digest.update(guidtable.sev_hashes_table(kernel, initrd or b"", cmdline or ""))
    if es is not None:
        for page in vmsa_pages(firmware, es):
            digest.update(page)
    return digest.digest()


def measurement(
    tik: bytes,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    digest: bytes,
    mnonce: bytes,
) -> bytes:
    data = bytes([channel.CTX_MEASURE, api_major, api_minor, build]) + crypto.le(policy, 4)
    return crypto.hmac_sha256(tik, data + digest + mnonce)


@dataclass
class Verdict:
    """The owner's comparison of a reported measurement with the expected one."""

    ok: bool
    expected: bytes  # MEASURE ‖ MNONCE as the owner computes it
    reported: bytes
    digest: bytes
    checklist: list[str] = field(default_factory=list)


MISMATCH_CHECKLIST = [
    "the firmware image: the very file the VMM loaded (same build, same size, not patched)",
    "--kernel/--initrd/--cmdline: given if and only if the VMM was given them, byte for byte"
    " (the command line without a trailing newline)",
    "the policy: the value the VMM passed to LAUNCH_START (e.g. QEMU's sev-guest policy=)",
    "SEV-ES (policy 0x4): --smp and --cpu as the VMM had them, and --legacy-vmsa when the"
    " host kernel is older than Linux 6.10 (its VMSA has no MXCSR/x87 control word)",
    "the TIK: the NAME_tik.bin of the session the VMM used (a new session means new keys)",
    "the API version and build: those the platform reports (query-sev), not the policy's minimum",
    "the nonce: the MNONCE of this very launch (the last 16 bytes of the measurement blob)",
]


def check(
    reported: bytes,
    tik: bytes,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    digest: bytes,
) -> Verdict:
    if len(reported) != MEASUREMENT_SIZE:
        raise ValueError(f"a launch measurement is {MEASUREMENT_SIZE} bytes, not {len(reported)}")
    mnonce = MEASUREMENT.parse(reported).mnonce
    measure = measurement(tik, api_major, api_minor, build, policy, digest, mnonce)
    expected = MEASUREMENT.build(measure=measure, mnonce=mnonce)
    ok = crypto.equal(expected, reported)
    return Verdict(ok, expected, reported, digest, [] if ok else list(MISMATCH_CHECKLIST))
