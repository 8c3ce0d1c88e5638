"""The SEV certificate: 2084 bytes, used for OCA, PEK, PDH and CEK (sev-api.md §3.1).

``SevCert`` parses and builds the exact bytes; big numbers are little-endian and
zero-padded to their field. ``firmware_validate`` applies the firmware's rules and returns
its status code; ``check_signed_by`` says in words why a signature does or does not hold,
for the people reading a chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevsim import crypto
from sevsim.api.layout import Layout
from sevsim.api.status import Status

CERT_SIZE = 0x824  # 2084
BODY_SIZE = 0x414  # the signed bytes: everything before the first signature slot
CURVE_P384 = 2
EC_FIELD = 72  # coordinates and signature halves: 72-byte little-endian fields


class CertError(ValueError):
    """A certificate that cannot be parsed (wrong size, unknown encoding)."""


class Usage(IntEnum):
    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(IntEnum):
    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103

    @property
    def digest(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.value & 0x100 else hashes.SHA256()

    @property
    def is_rsa(self) -> bool:
        return self.value & 0xFF == 1

    @property
    def is_ec(self) -> bool:
        return self.value & 0xFF in (2, 3)


LAYOUT = Layout(
    "SEV_CERT",
    CERT_SIZE,
    "sev-api.md §3.1",
    (0x000, "I", "version"),
    (0x004, "B", "api_major"),
    (0x005, "B", "api_minor"),
    (0x008, "I", "pubkey_usage"),
    (0x00C, "I", "pubkey_algo"),
    (0x010, "1028s", "pubkey"),
    (0x414, "I", "sig1_usage"),
    (0x418, "I", "sig1_algo"),
    (0x41C, "512s", "sig1"),
    (0x61C, "I", "sig2_usage"),
    (0x620, "I", "sig2_algo"),
    (0x624, "512s", "sig2"),
)

# The public-key union at 0x010, by algorithm, and the ECDSA signature union (sev-api.md
# §3.1). An RSA signature is one little-endian integer in the 512 bytes: no layout.
EC_PUBKEY = Layout(
    "SEV_EC_PUBKEY",
    1028,
    "sev-api.md §3.1",
    (0x000, "I", "curve"),
    (0x004, f"{EC_FIELD}s", "qx"),
    (0x04C, f"{EC_FIELD}s", "qy"),
)
RSA_PUBKEY = Layout(
    "SEV_RSA_PUBKEY",
    1028,
    "sev-api.md §3.1",
    (0x000, "I", "modulus_size"),
    (0x004, "512s", "pub_exp"),
    (0x204, "512s", "modulus"),
)
ECDSA_SIG = Layout(
    "SEV_ECDSA_SIG",
    512,
    "sev-api.md §3.1",
    (0x000, f"{EC_FIELD}s", "r"),
    (0x048, f"{EC_FIELD}s", "s"),
)

# Who may sign what (the firmware's sev_cert_validate, rule 4).
ALLOWED_SIGNERS: dict[Usage, tuple[Usage, ...]] = {
    Usage.PDH: (Usage.PEK,),
    Usage.PEK: (Usage.OCA, Usage.CEK),
    Usage.OCA: (Usage.OCA,),
    Usage.CEK: (Usage.ASK,),
}

PublicKeyType = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class SigningKey:
    """A public key with its usage and algorithm: what the firmware calls a pubkey."""

    usage: Usage
    algo: Algo
    key: PublicKeyType


def encode_public_key(key: PublicKeyType) -> bytes:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name != "secp384r1":
            raise CertError("SEV certificates carry P-384 keys")
        n = key.public_numbers()
        return EC_PUBKEY.build(
            curve=CURVE_P384, qx=crypto.le(n.x, EC_FIELD), qy=crypto.le(n.y, EC_FIELD)
        )
    n = key.public_numbers()
    return RSA_PUBKEY.build(
        modulus_size=key.key_size, pub_exp=crypto.le(n.e, 512), modulus=crypto.le(n.n, 512)
    )


def decode_public_key(algo: Algo, union: bytes) -> PublicKeyType:
    """Raises CertError for an unknown algorithm, a curve other than P-384, or a point that
    is not on the curve (the firmware's ecc_pubkey_is_valid)."""
    if algo.is_ec:
        ec_key = EC_PUBKEY.parse(union)
        if ec_key.curve != CURVE_P384:
            raise CertError(f"curve id {ec_key.curve} is not P-384 (2)")
        x, y = crypto.from_le(ec_key.qx), crypto.from_le(ec_key.qy)
        try:
            return crypto.p384_public_from_xy(x, y)
        except ValueError:
            raise CertError("the public key is not a point on P-384") from None
    if algo.is_rsa:
        rsa_key = RSA_PUBKEY.parse(union)
        if rsa_key.modulus_size not in (2048, 4096):
            raise CertError(f"RSA modulus size {rsa_key.modulus_size} is not 2048 or 4096")
        e, n = crypto.from_le(rsa_key.pub_exp), crypto.from_le(rsa_key.modulus)
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise CertError(f"bad RSA public key: {exc}") from None
    raise CertError(f"unknown public-key algorithm {int(algo):#x}")


def _enum(cls, value: int):
    try:
        return cls(value)
    except ValueError:
        return None


class SevCert:
    """One SEV certificate. Immutable: signing returns a new certificate."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != CERT_SIZE:
            raise CertError(f"an SEV certificate is {CERT_SIZE} bytes, not {len(raw)}")
        self.raw = bytes(raw)
        self.fields = LAYOUT.parse(self.raw)

    @classmethod
    def parse(cls, data: bytes) -> SevCert:
        return cls(data)

    @classmethod
    def create(
        cls, usage: Usage, algo: Algo, key: PublicKeyType, api_major: int, api_minor: int
    ) -> SevCert:
        """An unsigned certificate (both signature slots INVALID)."""
        raw = LAYOUT.build(
            version=1,
            api_major=api_major,
            api_minor=api_minor,
            pubkey_usage=usage,
            pubkey_algo=algo,
            pubkey=encode_public_key(key),
            sig1_usage=Usage.INVALID,
            sig2_usage=Usage.INVALID,
        )
        return cls(raw)

    # ---- fields -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.fields.version

    @property
    def api_version(self) -> tuple[int, int]:
        return self.fields.api_major, self.fields.api_minor

    @property
    def usage(self) -> Usage | None:
        return _enum(Usage, self.fields.pubkey_usage)

    @property
    def algo(self) -> Algo | None:
        return _enum(Algo, self.fields.pubkey_algo)

    @property
    def body(self) -> bytes:
        return self.raw[:BODY_SIZE]

    def public_key(self) -> PublicKeyType:
        algo = self.algo
        if algo is None:
            raise CertError(f"unknown public-key algorithm {self.fields.pubkey_algo:#x}")
        return decode_public_key(algo, self.fields.pubkey)

    def signing_key(self) -> SigningKey:
        """This certificate's key as a signer (raises CertError if the key is unusable)."""
        usage, algo = self.usage, self.algo
        if usage is None or algo is None:
            raise CertError("unknown usage or algorithm")
        return SigningKey(usage, algo, self.public_key())

    def slots(self) -> list[tuple[int, int, bytes]]:
        f = self.fields
        return [(f.sig1_usage, f.sig1_algo, f.sig1), (f.sig2_usage, f.sig2_algo, f.sig2)]

    def signers(self) -> list[Usage | int]:
        """The usages that signed this certificate, slot by slot (INVALID = empty)."""
        return [_enum(Usage, u) or u for u, _, _ in self.slots()]

    def body_valid(self) -> bool:
        """Version 1 and a usable public key (the firmware's body check)."""
        if self.version != 1:
            return False
        try:
            self.public_key()
        except CertError:
            return False
        return True

    # ---- signing ------------------------------------------------------------------------
    def signed(
        self, key, signer_usage: Usage, signer_algo: Algo, slot: int | None = None
    ) -> SevCert:
        """A copy with a signature by ``key`` (an EC or RSA private key) in ``slot`` (0 or
        1; default: the first slot whose usage is INVALID)."""
        if slot is None:
            free = [i for i, (u, _, _) in enumerate(self.slots()) if u == Usage.INVALID]
            if not free:
                raise CertError("both signature slots are in use")
            slot = free[0]
        digest = signer_algo.digest
        if signer_algo.is_ec:
            r, s = crypto.ecdsa_sign(key, self.body, digest)
            sig = ECDSA_SIG.build(r=crypto.le(r, EC_FIELD), s=crypto.le(s, EC_FIELD))
        elif signer_algo.is_rsa:
            sig = crypto.rsa_pss_sign(key, self.body, digest)[::-1].ljust(512, b"\0")
        else:
            raise CertError("a signature needs an ECDSA or RSA algorithm")
        return self.with_slot(slot, signer_usage, signer_algo, sig)

    def with_slot(self, slot: int, usage: int, algo: int, sig: bytes) -> SevCert:
        f = LAYOUT.parse(self.raw)
        setattr(f, f"sig{slot + 1}_usage", usage)
        setattr(f, f"sig{slot + 1}_algo", algo)
        setattr(f, f"sig{slot + 1}", sig.ljust(512, b"\0"))
        return SevCert(LAYOUT.build(f))

    def without_signatures(self) -> SevCert:
        return SevCert(
            self.body + LAYOUT.build(sig1_usage=Usage.INVALID, sig2_usage=Usage.INVALID)[BODY_SIZE:]
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SevCert) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        usage = self.usage.name if self.usage is not None else f"{self.fields.pubkey_usage:#x}"
        return f"<SevCert {usage} v{self.version} api {self.api_version[0]}.{self.api_version[1]}>"


def _slot_verifies(cert: SevCert, algo: Algo, sig: bytes, key: PublicKeyType) -> bool:
    if algo.is_ec and isinstance(key, ec.EllipticCurvePublicKey):
        halves = ECDSA_SIG.parse(sig)
        r, s = crypto.from_le(halves.r), crypto.from_le(halves.s)
        return crypto.ecdsa_verify(key, r, s, cert.body, algo.digest)
    if algo.is_rsa and isinstance(key, rsa.RSAPublicKey):
        size = key.key_size // 8
        return crypto.rsa_pss_verify(key, sig[:size][::-1], cert.body, algo.digest)
    return False


def firmware_validate(cert: SevCert, signer: SigningKey) -> Status:
    """The firmware's sev_cert_validate (sev-api.md §3.1), as a status code."""
    if signer.usage == Usage.INVALID or signer.algo == Algo.INVALID:
        return Status.INVALID_CERTIFICATE
    if isinstance(signer.key, rsa.RSAPublicKey) and signer.key.key_size not in (2048, 4096):
        return Status.INVALID_CERTIFICATE
    # AMD-ASPFW sev_cert_validate_sig: a malformed slot fails at once, even after a good
    # one; of the slots made by this signer, the last one's result stands.
    result: Status | None = None
    for usage, algo, sig in cert.slots():
        if (usage == Usage.INVALID) != (algo == Algo.INVALID):
            return Status.BAD_SIGNATURE
        if usage != signer.usage or algo != signer.algo:
            continue
        ok = _slot_verifies(cert, signer.algo, sig, signer.key)
        result = Status.SUCCESS if ok else Status.BAD_SIGNATURE
    if result is None:
        return Status.INVALID_CERTIFICATE  # no slot was signed by this signer
    if result != Status.SUCCESS:
        return result
    if not cert.body_valid():
        return Status.INVALID_CERTIFICATE
    if cert.usage is None or signer.usage not in ALLOWED_SIGNERS.get(cert.usage, ()):
        return Status.INVALID_CERTIFICATE
    return Status.SUCCESS


def sanity_check(cert: SevCert, usage: Usage, algo: Algo) -> Status:
    """The firmware's sev_cert_sanity_check (used for DH certificates): a valid body with the
    expected usage and algorithm; signatures are not checked."""
    if not cert.body_valid() or cert.usage != usage or cert.algo != algo:
        return Status.INVALID_CERTIFICATE
    return Status.SUCCESS


def check_signed_by(cert: SevCert, signer: SigningKey) -> str | None:
    """None if ``signer`` validly signed ``cert``; otherwise why not, in words."""
    status = firmware_validate(cert, signer)
    if status == Status.SUCCESS:
        return None
    name = cert.usage.name if cert.usage is not None else "certificate"
    slots = [u for u, _, _ in cert.slots()]
    if status == Status.BAD_SIGNATURE:
        return f"the {signer.usage.name} signature on the {name} does not verify"
    if signer.usage not in [_enum(Usage, u) for u in slots]:
        return f"the {name} carries no {signer.usage.name} signature"
    if not any(_enum(Usage, u) == signer.usage and a == signer.algo for u, a, _ in cert.slots()):
        return (
            f"the {name}'s {signer.usage.name} signature uses another algorithm "
            f"than {signer.algo.name}"
        )
    if not cert.body_valid():
        return f"the {name} has an invalid body (version {cert.version}, or an unusable key)"
    return f"a {signer.usage.name} may not sign a {name}"
