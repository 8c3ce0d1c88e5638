"""The real-code guest: a 64 KiB firmware image built from the sources beside this file
(``build.sh``; see README.md). It boots from the reset vector and runs the workloads named
in QEMU's fw_cfg file ``opt/sevsim/workload``."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

IMAGE_NAME = "sevsim-guest.fd"
WORKLOAD_FILE = "opt/sevsim/workload"  # fw_cfg file with the space-separated workloads
MIN_MEMORY = 32 << 20  # RAM the image's fixed addresses need (layout.h MIN_RAM, README.md)
IMAGE_SIZE = 64 << 10


@cache
def image() -> bytes:
    return files(__package__).joinpath(IMAGE_NAME).read_bytes()


@cache
def symbols() -> dict[str, int]:
    """Symbol name -> address (code in the flash window, fixed RAM addresses)."""
    return json.loads(files(__package__).joinpath("sevsim-guest.sym.json").read_text())


def flash_image(size: int = IMAGE_SIZE) -> bytes:
    """The image in a flash of ``size`` bytes (a multiple of 64 KiB): erased flash (0xFF)
    in front, the image at the top, so that it still ends at 4 GiB with its footer table
    and reset vector in place, as OVMF's larger builds do."""
    if size < IMAGE_SIZE or size % IMAGE_SIZE:
        raise ValueError(f"a flash image is a multiple of 64 KiB of at least {IMAGE_SIZE >> 10}K")
    return b"\xff" * (size - IMAGE_SIZE) + image()
