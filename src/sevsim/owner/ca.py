"""The owner's certificate authority, for external ownership of a platform.

Like sevctl's ``generate`` and ``provision``: the owner makes a P-384 OCA key and a
self-signed OCA certificate, signs the PEK certificate signing request the platform
produced (PEK_CSR: the PEK body with both signature slots empty) in slot 1 with the OCA
key, and the platform imports the signed PEK together with the OCA certificate
(PEK_CERT_IMPORT), which makes it externally owned. The OCA private key never leaves the
owner's files.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto
from sevsim.certs.sev import Algo, CertError, SevCert, Usage
from sevsim.fsutil import atomic_write

CA_CERT = "oca.cert"
CA_KEY = "oca.key"


def generate(out_dir: Path) -> tuple[Path, Path]:
    """Write ``oca.key`` (PEM, mode 0600) and ``oca.cert`` (2084 bytes, self-signed)."""
    out = Path(out_dir)
    key = ec.generate_private_key(crypto.P384)
    cert = SevCert.create(Usage.OCA, Algo.ECDSA_SHA256, key.public_key(), 0, 0)
    cert = cert.signed(key, Usage.OCA, Algo.ECDSA_SHA256)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(out / CA_KEY, pem, 0o600)
    atomic_write(out / CA_CERT, cert.raw, 0o644)
    return out / CA_CERT, out / CA_KEY


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise CertError(f"{path} is not a P-384 key")
    return key


def sign_csr(csr: bytes, oca_key: ec.EllipticCurvePrivateKey, oca_cert: SevCert) -> SevCert:
    """Sign a PEK certificate signing request with the owner's OCA key."""
    pek = SevCert.parse(csr)
    if pek.usage != Usage.PEK:
        raise CertError("this is not a PEK certificate signing request")
    if any(u != Usage.INVALID for u, _, _ in pek.slots()):
        raise CertError("a PEK signing request has both signature slots empty")
    if oca_cert.public_key().public_numbers() != oca_key.public_key().public_numbers():
        raise CertError("the OCA key does not belong to the OCA certificate")
    return pek.signed(oca_key, Usage.OCA, Algo.ECDSA_SHA256, slot=0)
