"""The firmware's persistent data: OCA, PEK and PDH keys and certificates, and the owner flag.

Real parts keep it in the SPI flash (INIT) or in a 32 KiB NV area the host provides
(INIT_EX), protected by the firmware. Here it is serialised and sealed with AES-256-GCM
under a key derived from the chip-unique key, so neither the host (which holds the NV file
and can read the flash) nor anyone else learns a private key from it, and any change to it
is detected (SECURE_DATA_INVALID at INIT, sev-api.md §7.2).

The SPI flash of a platform with a state directory is the file ``spi.bin`` there, written
atomically (temporary file, fsync, rename); PLATFORM_RESET erases it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevsim import crypto
from sevsim.api.layout import Layout
from sevsim.fsutil import atomic_write

MAGIC = b"SEVSIMNV"
VERSION = 1
NV_LENGTH = 32 * 1024
ERASED = 0xFF  # erased flash, and an empty INIT_EX NV file (Linux docs: 32 KiB of 0xFF)
SPI_FILE = "spi.bin"

# MODEL: the real firmware's NV format is not public (sev-api.md §7.2 only names its
# failure, SECURE_DATA_INVALID); this header precedes the AES-GCM ciphertext and tag.
NV_HEADER = Layout(
    "SEVSIM_NV_HEADER",
    28,
    "MODEL, sev-api.md §7.2",
    (0x00, "8s", "magic"),
    (0x08, "I", "version"),
    (0x0C, "I", "length"),  # of the ciphertext and tag that follow
    (0x10, "12s", "nonce"),
)
AAD_SIZE = NV_HEADER.field("length").offset  # magic and version are authenticated


class SealError(ValueError):
    """The persistent data is damaged or was not sealed by this chip."""


@dataclass
class PersistentIdentity:
    externally_owned: bool = False
    oca_key: int | None = None  # None when an external owner holds the OCA key
    oca_cert: str = ""  # hex of the 2084-byte certificates
    pek_key: int | None = None
    pek_cert: str = ""
    pdh_key: int | None = None
    pdh_cert: str = ""

    def __repr__(self) -> str:
        return f"<PersistentIdentity externally_owned={self.externally_owned} (keys not shown)>"


def _seal_key(cuk: bytes) -> bytes:
    return crypto.kdf(hashlib.sha256(cuk).digest(), b"sevsim-persistent-seal", b"", 256)


def seal(cuk: bytes, data: PersistentIdentity, nonce: bytes) -> bytes:
    header = NV_HEADER.new(magic=MAGIC, version=VERSION, nonce=nonce)
    body = json.dumps(asdict(data), sort_keys=True).encode()
    aad = NV_HEADER.build(header)[:AAD_SIZE]
    sealed = AESGCM(_seal_key(cuk)).encrypt(nonce, body, aad)
    header.length = len(sealed)
    return NV_HEADER.build(header) + sealed


def unseal(cuk: bytes, blob: bytes) -> PersistentIdentity | None:
    """None for erased storage; raises SealError for anything else that does not open."""
    if not blob or all(b == ERASED for b in blob) or all(b == 0 for b in blob):
        return None
    header = NV_HEADER.parse(blob) if len(blob) >= NV_HEADER.size else None
    if header is None or header.magic != MAGIC or header.version != VERSION:
        raise SealError("not sealed persistent data")
    sealed = blob[NV_HEADER.size : NV_HEADER.size + header.length]
    if len(sealed) != header.length:
        raise SealError("truncated persistent data")
    try:
        body = AESGCM(_seal_key(cuk)).decrypt(header.nonce, sealed, blob[:AAD_SIZE])
        return PersistentIdentity(**json.loads(body))
    except (InvalidTag, ValueError, TypeError) as exc:
        raise SealError(f"persistent data does not open: {type(exc).__name__}") from None


class SpiFlash:
    """The SPI flash: a file in the platform's state directory, or memory only."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / SPI_FILE
        self._volatile: bytes | None = None

    def read(self) -> bytes | None:
        if self.path is None:
            return self._volatile
        return self.path.read_bytes() if self.path.exists() else None

    def write(self, blob: bytes) -> None:
        if self.path is None:
            self._volatile = blob
        else:
            atomic_write(self.path, blob)

    def erase(self) -> None:
        if self.path is None:
            self._volatile = None
        elif self.path.exists():
            self.path.unlink()
