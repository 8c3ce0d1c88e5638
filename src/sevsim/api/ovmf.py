"""The OVMF footer GUID table: what a firmware image tells the VMM and the guest owner about
itself (sev-api.md §8.2; QEMU pc_system_ovmf_table_find, sev-snp-measure ovmf.py).

The table ends 32 bytes before the end of the image (the reset vector lives in those 32
bytes). Its last 18 bytes are the footer: ``u16 table size ‖ footer GUID``. Entries are
read backwards from there, each ``data ‖ u16 entry size ‖ GUID`` with the size counting
the 18-byte trailer.
"""

from __future__ import annotations

import struct
import uuid

from sevsim.api.layout import Layout

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_SECRET_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
# The data of the hash-table and secret entries: where the area is in guest memory.
AREA = Layout(
    "OVMF_SEV_AREA",
    8,
    "sev-api.md §8.2",
    (0, "I", "base"),
    (4, "I", "size"),
)

TAIL = 32  # bytes after the table: the reset vector
TRAILER = 2 + 16  # u16 size ‖ GUID, after every entry's data
FOUR_GB = 1 << 32


class OvmfError(ValueError):
    pass


def parse_table(image: bytes) -> dict[uuid.UUID, bytes]:
    """GUID -> data of every entry; {} when the image has no footer table."""
    end = len(image) - TAIL
    if end < TRAILER:
        return {}
    size, guid = struct.unpack_from("<H16s", image, end - TRAILER)
    if uuid.UUID(bytes_le=guid) != FOOTER_GUID:
        return {}
    start = end - size
    if size < TRAILER or start < 0:
        raise OvmfError(f"the footer table claims {size} bytes")
    entries = {}
    pos = end - TRAILER  # the footer's own trailer; entries lie before it
    while pos > start:
        if pos - TRAILER < start:
            raise OvmfError("a truncated entry in the footer table")
        length, guid = struct.unpack_from("<H16s", image, pos - TRAILER)
        if length < TRAILER or pos - length < start:
            raise OvmfError(f"an entry of bad length {length} in the footer table")
        entries[uuid.UUID(bytes_le=guid)] = image[pos - length : pos - TRAILER]
        pos -= length
    return entries


def build_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """The bytes of a footer table (to be placed to end 32 bytes before the image's end)."""
    body = b"".join(
        data + struct.pack("<H16s", len(data) + TRAILER, g.bytes_le) for g, data in entries
    )
    return body + struct.pack("<H16s", len(body) + TRAILER, FOOTER_GUID.bytes_le)


def area(entries: dict[uuid.UUID, bytes], guid: uuid.UUID) -> tuple[int, int] | None:
    """(base, size) from an entry whose data is ``u32 base ‖ u32 size``."""
    data = entries.get(guid)
    if data is None or len(data) < AREA.size:
        return None
    a = AREA.parse(data)
    return a.base, a.size


def reset_address(entries: dict[uuid.UUID, bytes]) -> int | None:
    data = entries.get(SEV_ES_RESET_BLOCK_GUID)
    return None if data is None or len(data) < 4 else struct.unpack_from("<I", data)[0]


def flash_base(image_size: int) -> int:
    """Where a VMM maps the image: it ends at 4 GiB."""
    return FOUR_GB - image_size
