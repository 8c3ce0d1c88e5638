"""Small helpers for rich output."""

from __future__ import annotations

from rich.text import Text


def hexdump(data: bytes, width: int = 16, rows: int = 2) -> Text:
    """A few rows of hex + ASCII; printable text stands out from ciphertext at a glance.
    Pass width=8, rows=4 for narrow terminals: the same 32 bytes."""
    text = Text()
    for r in range(rows):
        chunk = data[r * width : (r + 1) * width]
        if not chunk:
            break
        if r:
            text.append("\n")
        text.append(" ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1), style="dim")
        text.append("  ")
        printable = all(32 <= b < 127 for b in chunk)
        shown = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        text.append(shown, style="bold green" if printable else "red")
    return text
