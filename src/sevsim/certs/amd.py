"""The AMD CA certificate, used for the ARK (root) and ASK (SEV signing key) (sev-api.md §3.2).

Variable size: a 64-byte header, then the public exponent, the modulus and the RSA-PSS
signature, all little-endian, each as wide as its declared size (2048-bit keys: 832 bytes,
4096-bit: 1600 bytes). Signed bytes: header + exponent + modulus; SHA-256 for 2048-bit,
SHA-384 for 4096-bit keys; PSS salt = hash length.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from sevsim import crypto
from sevsim.api.layout import Layout
from sevsim.certs.sev import Algo, CertError, SigningKey, Usage

HEADER = Layout(
    "AMD_CERT_HEADER",
    0x40,
    "sev-api.md §3.2",
    (0x00, "I", "version"),
    (0x04, "16s", "key_id"),
    (0x14, "16s", "certifying_id"),
    (0x24, "I", "key_usage"),
    (0x38, "I", "pubexp_size"),
    (0x3C, "I", "modulus_size"),
)
KEY_SIZES = (2048, 4096)


def size_for(bits: int) -> int:
    return 0x40 + 3 * (bits // 8)


def digest_for(bits: int) -> hashes.HashAlgorithm:
    return hashes.SHA256() if bits == 2048 else hashes.SHA384()


class AmdCert:
    def __init__(self, raw: bytes) -> None:
        if len(raw) < 0x40:
            raise CertError(f"an AMD certificate has a 64-byte header; got {len(raw)} bytes")
        h = HEADER.parse(raw)
        if h.version != 1:
            raise CertError(f"AMD certificate version {h.version}, expected 1")
        if h.modulus_size not in KEY_SIZES or h.pubexp_size not in KEY_SIZES:
            raise CertError(
                f"AMD certificate key sizes {h.pubexp_size}/{h.modulus_size} bits "
                f"are not 2048 or 4096"
            )
        expected = 0x40 + h.pubexp_size // 8 + 2 * (h.modulus_size // 8)
        if len(raw) != expected:
            what = "truncated" if len(raw) < expected else "has trailing bytes"
            raise CertError(
                f"AMD certificate {what}: its header declares {expected} bytes, got {len(raw)}"
            )
        self.raw = bytes(raw)
        self.header = h

    @classmethod
    def parse(cls, data: bytes) -> AmdCert:
        return cls(data)

    @classmethod
    def size_of(cls, data: bytes) -> int:
        """The length the header at the start of ``data`` declares."""
        if len(data) < 0x40:
            raise CertError("too short for an AMD certificate header")
        h = HEADER.parse(data)
        return 0x40 + h.pubexp_size // 8 + 2 * (h.modulus_size // 8)

    @classmethod
    def create(
        cls,
        public_key: rsa.RSAPublicKey,
        key_id: bytes,
        certifying_id: bytes,
        usage: Usage,
        signer: rsa.RSAPrivateKey,
    ) -> AmdCert:
        bits = public_key.key_size
        if bits not in KEY_SIZES:
            raise CertError("AMD keys are RSA-2048 or RSA-4096")
        n = public_key.public_numbers()
        header = HEADER.build(
            version=1,
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=usage,
            pubexp_size=bits,
            modulus_size=bits,
        )
        signed = header + crypto.le(n.e, bits // 8) + crypto.le(n.n, bits // 8)
        signature = crypto.rsa_pss_sign(signer, signed, digest_for(signer.key_size))
        return cls(signed + signature[::-1])

    @property
    def key_id(self) -> bytes:
        return self.header.key_id

    @property
    def certifying_id(self) -> bytes:
        return self.header.certifying_id

    @property
    def usage(self) -> int:
        return self.header.key_usage

    @property
    def bits(self) -> int:
        return self.header.modulus_size

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: 0x40 + self.header.pubexp_size // 8 + self.bits // 8]

    @property
    def signature(self) -> bytes:
        """The signature in the standard (big-endian) form."""
        return self.raw[len(self.signed_bytes) :][::-1]

    def public_key(self) -> rsa.RSAPublicKey:
        start = 0x40
        exp_end = start + self.header.pubexp_size // 8
        e = crypto.from_le(self.raw[start:exp_end])
        n = crypto.from_le(self.raw[exp_end : exp_end + self.bits // 8])
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise CertError(f"bad RSA key in AMD certificate: {exc}") from None

    def signing_key(self) -> SigningKey:
        """The ASK as the signer of CEKs: RSA-PSS with the hash of its key size (Naples:
        RSA_SHA256; the Genoa firmware always uses RSA_SHA384)."""
        algo = Algo.RSA_SHA256 if self.bits == 2048 else Algo.RSA_SHA384
        usage = Usage.ASK if self.usage == Usage.ASK else Usage.ARK
        return SigningKey(usage, algo, self.public_key())

    def public_key_hash(self) -> bytes:
        """SHA-384 of the header, exponent and modulus: what a chip's fuses hold of its ARK
        (AMD-ASPFW amd_cert_public_key_hash)."""
        return hashlib.sha384(self.signed_bytes).digest()

    def check_signed_by(self, parent: AmdCert) -> str | None:
        """None if ``parent`` (the ARK; the ARK itself for the ARK) signed this certificate."""
        if self.certifying_id != parent.key_id:
            return (
                f"certifying id {self.certifying_id.hex()} is not the signer's key id "
                f"{parent.key_id.hex()}"
            )
        ok = crypto.rsa_pss_verify(
            parent.public_key(), self.signature, self.signed_bytes, digest_for(parent.bits)
        )
        return None if ok else "the RSA-PSS signature does not verify"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AmdCert) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        kind = {0x00: "ARK", 0x13: "ASK"}.get(self.usage, f"usage {self.usage:#x}")
        return f"<AmdCert {kind} RSA-{self.bits} key_id {self.key_id.hex()}>"
