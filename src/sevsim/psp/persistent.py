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
from sevsim.fsutil import atomic_write

MAGIC = b"SEVSIMNV"
VERSION = 1
NV_LENGTH = 32 * 1024
ERASED = 0xFF  # erased flash, and an empty INIT_EX NV file (Linux docs: 32 KiB of 0xFF)
SPI_FILE = "spi.bin"


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
    header = MAGIC + VERSION.to_bytes(4, "little")
    body = json.dumps(asdict(data), sort_keys=True).encode()
    sealed = AESGCM(_seal_key(cuk)).encrypt(nonce, body, header)
    return header + len(sealed).to_bytes(4, "little") + nonce + sealed


def unseal(cuk: bytes, blob: bytes) -> PersistentIdentity | None:
    """None for erased storage; raises SealError for anything else that does not open."""
    if not blob or all(b == ERASED for b in blob) or all(b == 0 for b in blob):
        return None
    if len(blob) < 28 or blob[:8] != MAGIC or int.from_bytes(blob[8:12], "little") != VERSION:
        raise SealError("not sealed persistent data")
    length = int.from_bytes(blob[12:16], "little")
    nonce, sealed = blob[16:28], blob[28 : 28 + length]
    if len(sealed) != length:
        raise SealError("truncated persistent data")
    try:
        body = AESGCM(_seal_key(cuk)).decrypt(nonce, sealed, blob[:12])
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
