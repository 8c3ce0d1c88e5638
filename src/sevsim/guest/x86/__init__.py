"""The real-code guest: a 64 KiB firmware image built from the sources beside this file
(``build.sh``; see README.md). It boots from the reset vector and runs the workloads named
in QEMU's fw_cfg file ``opt/sevsim/workload``."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

IMAGE_NAME = "sevsim-guest.fd"
WORKLOAD_FILE = "opt/sevsim/workload"  # fw_cfg file with the space-separated workloads
MIN_MEMORY = 12 << 20  # RAM the image's fixed addresses need (README.md)


@cache
def image() -> bytes:
    return files(__package__).joinpath(IMAGE_NAME).read_bytes()


@cache
def symbols() -> dict[str, int]:
    """Symbol name -> address (code in the flash window, fixed RAM addresses)."""
    return json.loads(files(__package__).joinpath("sevsim-guest.sym.json").read_text())
