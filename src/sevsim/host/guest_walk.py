"""The guest's 4-level page walk as a VMM tool does it from outside (QEMU's monitor ``x``,
its gdbstub): read each entry of the guest's own tables — how is the caller's business
(its mapping, or DBG_DECRYPT for an SEV guest's always-private tables) — and follow them
with the C-bit masked out of every address."""

from __future__ import annotations

from collections.abc import Callable

ADDR_MASK = (1 << 52) - 1 & ~0xFFF  # bits 51:12 of an entry


class NotMapped(Exception):
    """A non-present entry on the way."""


def walk(read_entry: Callable[[int], int], cr3: int, va: int, me_mask: int) -> tuple[int, bool]:
    """The guest-physical address of ``va`` and whether its leaf has the C-bit (the guest
    reaches it privately). 2 MiB and 1 GiB leaves are followed; raises NotMapped."""
    mask = ADDR_MASK & ~me_mask
    table = cr3 & mask
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = read_entry(table + (va >> shift & 511) * 8)
        if not entry & 1:
            raise NotMapped(va)
        if level == 3 or (level in (1, 2) and entry & 0x80):  # a 4 KiB, 2 MiB or 1 GiB leaf
            size = 1 << shift
            return (entry & mask & ~(size - 1)) | (va & (size - 1)), bool(entry & me_mask)
        table = entry & mask
    raise AssertionError("unreachable")
