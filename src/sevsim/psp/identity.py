"""The chip's identity as the firmware derives it (sev-api.md §4).

* CUK: the chip-unique key, 32 bytes in fuses. MODEL: read as a little-endian scalar on
  secp256k1 (the firmware feeds it to the CCP, which is little-endian).
* GET_ID: Q = CUK·G on secp256k1, returned as X(32) ‖ Y(32) big-endian; its hex is what
  AMD's key distribution service indexes the CEK by.
* CEK: seed = SHA-256(CUK); rdata = KDF(seed, "sev-chip-endorsement-key", no context,
  448 bits); d = (rdata as a little-endian integer mod (n − 1)) + 1 on P-384.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto

P384_N = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def cuk_scalar(cuk: bytes) -> int:
    return int.from_bytes(cuk, "little") % (SECP256K1_N - 1) + 1


def chip_id(cuk: bytes) -> bytes:
    q = ec.derive_private_key(cuk_scalar(cuk), ec.SECP256K1()).public_key().public_numbers()
    return q.x.to_bytes(32, "big") + q.y.to_bytes(32, "big")


def scalar_from_random(rdata: bytes) -> int:
    """FIPS 186-4 'extra random bits' key generation on P-384 (56 random bytes)."""
    return int.from_bytes(rdata, "little") % (P384_N - 1) + 1


def derive_cek(cuk: bytes) -> ec.EllipticCurvePrivateKey:
    seed = hashlib.sha256(cuk).digest()
    rdata = crypto.kdf(seed, b"sev-chip-endorsement-key", b"", 448)
    return crypto.p384_private_from_scalar(scalar_from_random(rdata))
