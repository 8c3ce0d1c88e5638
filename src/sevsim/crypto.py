"""The SEV formulas built on ``cryptography``'s primitives (sev-api.md §3, §5.2).

Only compositions the spec defines live here — the SP 800-108 counter-mode KDF with the
SEV's little-endian encodings, the little-endian big-number encodings of certificates,
ECDSA/ECDH on P-384, RSA-PSS with salt = hash length. The primitives (AES, HMAC, SHA,
ECDSA, ECDH, RSA) all come from ``cryptography``.
"""

from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

P384 = ec.SECP384R1()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, for MACs."""
    return _hmac.compare_digest(a, b)


def kdf(key: bytes, label: bytes, context: bytes, length_bits: int) -> bytes:
    """NIST SP 800-108 counter mode with HMAC-SHA256 as the SEV firmware does it:
    K(i) = HMAC(key, LE32(i) || label || 0x00 || context || LE32(L)), i = 1, 2, ..."""
    out = b""
    i = 1
    suffix = label + b"\x00" + context + length_bits.to_bytes(4, "little")
    while len(out) * 8 < length_bits:
        out += hmac_sha256(key, i.to_bytes(4, "little") + suffix)
        i += 1
    return out[: length_bits // 8]


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR with the 16-byte IV as the initial counter block (128-bit increment)."""
    c = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return c.update(data) + c.finalize()


# ---- little-endian big numbers (certificates store them zero-padded, LE) ----------------
def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def from_le(data: bytes) -> int:
    return int.from_bytes(data, "little")


# ---- P-384 -------------------------------------------------------------------------------
def p384_private_from_scalar(d: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(d, P384)


def p384_public_from_xy(x: int, y: int) -> ec.EllipticCurvePublicKey:
    """Raises ValueError if the point is not on the curve (the firmware's check)."""
    return ec.EllipticCurvePublicNumbers(x, y, P384).public_key()


def ecdsa_sign(
    key: ec.EllipticCurvePrivateKey, data: bytes, digest: hashes.HashAlgorithm
) -> tuple[int, int]:
    return utils.decode_dss_signature(key.sign(data, ec.ECDSA(digest)))


def ecdsa_verify(
    key: ec.EllipticCurvePublicKey, r: int, s: int, data: bytes, digest: hashes.HashAlgorithm
) -> bool:
    try:
        key.verify(utils.encode_dss_signature(r, s), data, ec.ECDSA(digest))
    except Exception:  # noqa: BLE001 - any failure means "does not verify"
        return False
    return True


def ecdh_z(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The shared secret Z: the x-coordinate, 48 bytes big-endian (sev-api.md §5.2)."""
    return private.exchange(ec.ECDH(), peer)


# ---- RSA-PSS, salt length = hash length ---------------------------------------------------
def _pss(digest: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)


def rsa_pss_sign(key: rsa.RSAPrivateKey, data: bytes, digest: hashes.HashAlgorithm) -> bytes:
    """The signature as a big-endian integer of the modulus size (standard form)."""
    return key.sign(data, _pss(digest), digest)


def rsa_pss_verify(
    key: rsa.RSAPublicKey, signature: bytes, data: bytes, digest: hashes.HashAlgorithm
) -> bool:
    try:
        key.verify(signature, data, _pss(digest), digest)
    except Exception:  # noqa: BLE001
        return False
    return True
