"""What the guest owner expects the launch measurement to be (sev-api.md §5.4, §8).

The launch digest is SHA-256 over what QEMU has the firmware encrypt with
LAUNCH_UPDATE_DATA: the firmware image, then — when QEMU was given --kernel — the padded
SEV hashes table of kernel, initrd and command line. The measurement is
HMAC-SHA256(TIK, 0x04 ‖ API major ‖ API minor ‖ build ‖ LE32 policy ‖ digest ‖ MNONCE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sevsim import crypto
from sevsim.api import channel, guidtable
from sevsim.api.commands import MEASUREMENT

MEASUREMENT_SIZE = MEASUREMENT.size  # MEASURE ‖ MNONCE


def launch_digest(
    firmware: bytes,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | None = None,
) -> bytes:
    """SHA-256(firmware [‖ hashes table]); a missing initrd hashes as empty data and a
    missing command line as the empty string (its NUL byte only), as QEMU does."""
    digest = hashlib.sha256(firmware)
    if kernel is not None:
        digest.update(guidtable.sev_hashes_table(kernel, initrd or b"", cmdline or ""))
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
