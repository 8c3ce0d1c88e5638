"""GUID-tagged tables the SEV ecosystem passes into guests (sev-api.md §5.5, §8.3).

An entry is ``GUID (bytes_le) ‖ length ‖ data``, the length counting the whole entry; a
table is one entry whose data is the concatenation of other entries, zero-padded to a
16-byte multiple (what LAUNCH_UPDATE_DATA and LAUNCH_SECRET need). The length field is
2 bytes in QEMU's SEV hashes table and 4 bytes in the OVMF/Linux secrets table.
"""

from __future__ import annotations

import hashlib
import uuid

# The SEV hashes table QEMU measures with --kernel (sev-api.md §8.3).
SEV_HASH_TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
SEV_CMDLINE_ENTRY_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
SEV_INITRD_ENTRY_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
SEV_KERNEL_ENTRY_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")
HASHES_LEN_SIZE = 2

# The secrets table a guest owner injects (OVMF, Linux efi_secret).
SECRET_TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
SECRETS_LEN_SIZE = 4

GUID_SIZE = 16


class GuidTableError(ValueError):
    pass


def entry(guid: uuid.UUID, data: bytes, len_size: int) -> bytes:
    length = GUID_SIZE + len_size + len(data)
    return guid.bytes_le + length.to_bytes(len_size, "little") + data


def table(guid: uuid.UUID, entries: list[bytes], len_size: int) -> bytes:
    body = entry(guid, b"".join(entries), len_size)
    return body + bytes(-len(body) % 16)


def parse(data: bytes, guid: uuid.UUID, len_size: int) -> list[tuple[uuid.UUID, bytes]]:
    """The (GUID, data) entries of a table whose header GUID is ``guid``."""
    header = GUID_SIZE + len_size
    if len(data) < header or uuid.UUID(bytes_le=data[:GUID_SIZE]) != guid:
        raise GuidTableError(f"no table with GUID {guid} here")
    total = int.from_bytes(data[GUID_SIZE:header], "little")
    if not header <= total <= len(data):
        raise GuidTableError(f"table length {total} does not fit {len(data)} bytes")
    out, pos = [], header
    while pos < total:
        if pos + header > total:
            raise GuidTableError(f"truncated entry at offset {pos}")
        length = int.from_bytes(data[pos + GUID_SIZE : pos + header], "little")
        if length < header or pos + length > total:
            raise GuidTableError(f"entry at offset {pos} has a bad length {length}")
        out.append(
            (uuid.UUID(bytes_le=data[pos : pos + GUID_SIZE]), data[pos + header : pos + length])
        )
        pos += length
    return out


def sev_hashes_table(kernel: bytes, initrd: bytes, cmdline: str) -> bytes:
    """QEMU's padded SEV hashes table (176 bytes): SHA-256 of the command line with its
    terminating NUL, of the initrd and of the kernel, in that order."""
    entries = [
        entry(SEV_CMDLINE_ENTRY_GUID, hashlib.sha256(cmdline.encode() + b"\0").digest(), 2),
        entry(SEV_INITRD_ENTRY_GUID, hashlib.sha256(initrd).digest(), 2),
        entry(SEV_KERNEL_ENTRY_GUID, hashlib.sha256(kernel).digest(), 2),
    ]
    return table(SEV_HASH_TABLE_GUID, entries, HASHES_LEN_SIZE)


def secrets_table(secrets: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """The secrets table of sevctl ``secret build`` and OVMF's secret area."""
    entries = [entry(guid, data, SECRETS_LEN_SIZE) for guid, data in secrets]
    return table(SECRET_TABLE_GUID, entries, SECRETS_LEN_SIZE)
