"""The bitmap the real-code guest draws into private memory for the pictures (its
``picture`` workload, ``guest/x86/src/picture.c``; ``sevsim.pictures``): a padlock with
large flat areas, so that any structure the memory encryption lets through shows.

This module draws the same bitmap from the same integer geometry, so that the host side
knows what the guest holds without asking it (the guest is the code under test; its own
console line gives the SHA-256 of what it drew)."""

from __future__ import annotations

from functools import cache

SIZE = 256  # SIZE x SIZE bytes: 64 KiB, 16 pages
BACKGROUND, SHACKLE, BODY, LETTERS = 235, 60, 40, 200

# "SEV" in a 5 x 7 font, one number per row, bit 4 the leftmost column (as picture.c).
GLYPHS = (
    (0x0E, 0x11, 0x10, 0x0E, 0x01, 0x11, 0x0E),  # S
    (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),  # E
    (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),  # V
)
TEXT_X, TEXT_Y, TEXT_SCALE = 111, 214, 2


def _in_rounded_box(x: int, y: int, x0: int, y0: int, x1: int, y1: int, r: int) -> bool:
    """Is the centre of pixel (x, y) in [x0, x1) x [y0, y1) with corners of radius r?
    (Doubled coordinates, so that the centre x + 0.5 is an integer.)"""
    px, py = 2 * x + 1, 2 * y + 1
    if not (2 * x0 <= px <= 2 * x1 and 2 * y0 <= py <= 2 * y1):
        return False
    cx = min(max(px, 2 * (x0 + r)), 2 * (x1 - r))
    cy = min(max(py, 2 * (y0 + r)), 2 * (y1 - r))
    return (px - cx) ** 2 + (py - cy) ** 2 <= 4 * r * r


def _in_text(x: int, y: int) -> bool:
    if x < TEXT_X or y < TEXT_Y:
        return False
    col, row = (x - TEXT_X) // TEXT_SCALE, (y - TEXT_Y) // TEXT_SCALE
    if row >= 7 or col >= 3 * 6 or col % 6 == 5:
        return False
    return bool(GLYPHS[col // 6][row] >> (4 - col % 6) & 1)


def _pixel(x: int, y: int) -> int:
    """Later parts cover earlier ones, as a painter draws."""
    value = BACKGROUND
    if _in_rounded_box(x, y, 72, 20, 185, 151, 56) and not _in_rounded_box(
        x, y, 94, 42, 163, 129, 34
    ):
        value = SHACKLE  # a rounded frame 22 pixels wide, most of it behind the body
    if 40 <= x <= 216 and 112 <= y <= 236:
        value = BODY
    if (2 * x + 1 - 256) ** 2 + (2 * y + 1 - 312) ** 2 <= 4 * 16 * 16:
        value = BACKGROUND  # the keyhole: a circle of radius 16 around (128, 156)...
    if 122 <= x <= 134 and 160 <= y <= 208:
        value = BACKGROUND  # ...and a slot below it
    if _in_text(x, y):
        value = LETTERS
    return value


@cache
def padlock() -> bytes:
    """A padlock with "SEV" on it, grayscale, one byte per pixel, row by row."""
    return bytes(_pixel(x, y) for y in range(SIZE) for x in range(SIZE))
