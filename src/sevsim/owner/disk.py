"""The owner's side of a guest's encrypted disk: the key's GUID in the launch secret table,
and how to read the image with the key (the guest's ``disk`` workload, guest/x86/src/disk.c,
writes it; docs/devices.md).

The guest encrypts each 4 KiB block with AES-256-XTS as dm-crypt's ``aes-xts-plain64`` with
``sector_size:4096``: the tweak is the block's 512-byte sector number, little-endian in 16
bytes. Its test pattern is public: a readable first sector, then the bytes of
``random.Random(seed).randbytes``.
"""

from __future__ import annotations

import random
import uuid

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# MODEL: sevsim's own GUID for a disk key in the launch secret table.
DISK_KEY_GUID = uuid.UUID("5e4f6a3c-9b1d-4c2e-8f7a-0d3b2c1e4a5f")
SECTOR = 512
XTS_BLOCK = 4096


def disk_pattern(size: int, seed: int) -> bytes:
    """What ``disk:<MiB>:<seed>`` writes: a readable first sector, then random bytes."""
    first = f"sevsim guest disk, seed {seed}: written by the guest through its bounce buffers\n"
    head = first.encode().ljust(SECTOR, b"\0")[: min(size, SECTOR)]
    return head + random.Random(seed).randbytes(max(0, size - SECTOR))


def xts(key: bytes, data: bytes, first_sector: int, encrypt: bool) -> bytes:
    """AES-XTS over whole 4 KiB blocks, plain64 tweaks (512-byte sector numbers)."""
    out = bytearray()
    for off in range(0, len(data), XTS_BLOCK):
        tweak = (first_sector + off // SECTOR).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        op = cipher.encryptor() if encrypt else cipher.decryptor()
        out += op.update(data[off : off + XTS_BLOCK]) + op.finalize()
    return bytes(out)
