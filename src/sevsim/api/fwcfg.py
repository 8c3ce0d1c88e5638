"""QEMU's firmware configuration device, fw_cfg (QEMU docs/specs/fw_cfg.rst), as far as
a firmware needs it to boot a measured kernel: the I/O ports, the item keys, and the DMA
descriptor. The host side is ``sevsim.host.vmm``; the guest side is the real-code guest's
``fw_cfg.c`` (src/sevsim/guest/x86).

Under SEV the guest cannot let the device read or write private memory: DMA descriptors
and data buffers must live in pages it has shared (C=0) — OVMF's bounce buffers.
"""

from __future__ import annotations

import struct

PORT_SELECTOR = 0x510  # 16-bit write: select an item (and rewind it)
PORT_DATA = 0x511  # 8-bit read: the next byte of the selected item
PORT_DMA_HIGH = 0x514  # 32-bit big-endian write: bits 63:32 of the descriptor's address
PORT_DMA_LOW = 0x518  # 32-bit big-endian write: bits 31:0, and go

SIGNATURE = 0x00  # b"QEMU"
ID = 0x01  # u32 feature bits: 1 traditional interface, 2 DMA
RAM_SIZE = 0x03  # u64
NB_CPUS = 0x05  # u16
KERNEL_SIZE = 0x08  # u32
INITRD_SIZE = 0x0B  # u32
KERNEL_DATA = 0x11
INITRD_DATA = 0x12
CMDLINE_SIZE = 0x14  # u32, the terminating NUL included
CMDLINE_DATA = 0x15  # the command line with its NUL
FILE_DIR = 0x19  # be32 count, then per file: be32 size, be16 select, be16 0, name[56]
FILE_FIRST = 0x20  # named files (QEMU -fw_cfg name=...) take keys from here
FILE_ENTRY = struct.Struct(">IHH56s")

FEATURE_TRADITIONAL = 1 << 0
FEATURE_DMA = 1 << 1

# The DMA descriptor: be32 control, be32 length, be64 address.
DMA_DESCRIPTOR = struct.Struct(">IIQ")
DMA_ERROR = 1 << 0
DMA_READ = 1 << 1
DMA_SKIP = 1 << 2
DMA_SELECT = 1 << 3
DMA_WRITE = 1 << 4


def file_directory(files: dict[str, bytes]) -> tuple[bytes, dict[int, bytes]]:
    """The FILE_DIR item and the items of named files, keys in order from FILE_FIRST."""
    directory = len(files).to_bytes(4, "big")
    items = {}
    for i, (name, data) in enumerate(sorted(files.items())):
        if len(name.encode()) > 55:
            raise ValueError(f"fw_cfg file name too long: {name!r}")
        key = FILE_FIRST + i
        directory += FILE_ENTRY.pack(len(data), key, 0, name.encode())
        items[key] = data
    return directory, items


def parse_file_directory(directory: bytes) -> dict[str, tuple[int, int]]:
    """name -> (key, size)."""
    count = int.from_bytes(directory[:4], "big")
    out = {}
    for i in range(count):
        size, key, _, name = FILE_ENTRY.unpack_from(directory, 4 + i * FILE_ENTRY.size)
        out[name.rstrip(b"\0").decode("utf-8", "replace")] = (key, size)
    return out
