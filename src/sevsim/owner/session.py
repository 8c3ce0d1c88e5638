"""The guest owner's side of LAUNCH_START: a transport session with one platform's PDH
(sev-api.md §5.1–5.2; the files of sevctl ``session``).

The owner makes a fresh P-384 key (its GODH certificate carries the public half), agrees
Z with the platform's PDH by ECDH, derives the master secret, KEK and KIK with the
SP 800-108 KDF, wraps fresh TEK ‖ TIK with AES-128-CTR under the KEK and MACs the wrap
with the KIK and the policy with the TIK. Only the platform holding the PDH's private key
can unwrap them. Files: NAME_godh.b64 and NAME_session.b64 (base64, for QEMU's
dh-cert-file / session-file), NAME_tek.bin and NAME_tik.bin (raw 16 bytes, for the
owner's later steps).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto
from sevsim.api import channel
from sevsim.api.status import Status
from sevsim.certs.sev import Algo, CertError, SevCert, Usage, sanity_check
from sevsim.fsutil import atomic_write

KEY_SIZE = 16


def session_blob(
    z: bytes, nonce: bytes, wrap_iv: bytes, tek: bytes, tik: bytes, policy: int
) -> bytes:
    """The 128-byte session blob for a shared secret Z (a pure function: the KATs of
    sev-api.md §9.1 call it with Z = 16 zero bytes)."""
    return channel.wrap(z, nonce, wrap_iv, tek, tik, policy)


@dataclass
class OwnerSession:
    policy: int
    godh_cert: bytes  # 2084 bytes: the owner's ECDH public key, unsigned
    session: bytes  # 128 bytes
    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)

    def write(self, directory: Path, name: str) -> dict[str, Path]:
        """sevctl's four files; the key files are readable by the owner only."""
        paths = session_files(directory, name)
        atomic_write(paths["godh"], base64.b64encode(self.godh_cert), 0o644)
        atomic_write(paths["session"], base64.b64encode(self.session), 0o644)
        atomic_write(paths["tek"], self.tek, 0o600)
        atomic_write(paths["tik"], self.tik, 0o600)
        return paths


def session_files(directory: Path, name: str) -> dict[str, Path]:
    directory = Path(directory)
    return {
        "godh": directory / f"{name}_godh.b64",
        "session": directory / f"{name}_session.b64",
        "tek": directory / f"{name}_tek.bin",
        "tik": directory / f"{name}_tik.bin",
    }


def start(pdh: SevCert, policy: int) -> OwnerSession:
    """A new session with the platform whose PDH this is (fresh keys and nonces)."""
    if sanity_check(pdh, Usage.PDH, Algo.ECDH_SHA256) != Status.SUCCESS:
        raise CertError("not a PDH certificate with an ECDH P-384 key")
    godh_key = ec.generate_private_key(ec.SECP384R1())
    z = crypto.ecdh_z(godh_key, pdh.public_key())
    tek, tik = os.urandom(KEY_SIZE), os.urandom(KEY_SIZE)
    blob = session_blob(z, os.urandom(16), os.urandom(16), tek, tik, policy)
    godh = SevCert.create(Usage.PDH, Algo.ECDH_SHA256, godh_key.public_key(), 0, 0)
    return OwnerSession(policy, godh.raw, blob, tek, tik)


def read_key(path: Path, what: str) -> bytes:
    data = Path(path).read_bytes()
    if len(data) != KEY_SIZE:
        raise ValueError(f"{path}: a {what} file holds {KEY_SIZE} bytes, not {len(data)}")
    return data
