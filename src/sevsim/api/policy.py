"""The SEV guest policy: 32 bits, little-endian (sev-api.md §2)."""

from __future__ import annotations

from enum import IntFlag


class PolicyFlag(IntFlag):
    NODBG = 1 << 0  # no DBG_DECRYPT / DBG_ENCRYPT
    NOKS = 1 << 1  # no key sharing with other guests
    ES = 1 << 2  # SEV-ES guest
    NOSEND = 1 << 3  # no migration (SEND_START refused)
    DOMAIN = 1 << 4  # migrate only to platforms with the same OCA
    SEV = 1 << 5  # migrate only to SEV platforms (AMD chain checked)


RESERVED_MASK = 0xFFC0  # bits 6..15 must be zero


def api_min(policy: int) -> tuple[int, int]:
    """(minimum API major, minimum API minor) the firmware must have."""
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


def make(flags: int = 0, api_major: int = 0, api_minor: int = 0) -> int:
    return (flags & 0xFFFF) | (api_major & 0xFF) << 16 | (api_minor & 0xFF) << 24


def describe(policy: int) -> str:
    names = [f.name for f in PolicyFlag if policy & f]
    major, minor = api_min(policy)
    text = "|".join(names) if names else "no flags"
    if major or minor:
        text += f", API >= {major}.{minor}"
    if policy & RESERVED_MASK:
        text += f", reserved bits {policy & RESERVED_MASK:#x}"
    return text
