"""The bitmap a guest keeps in private memory for the pictures (sevsim.pictures): a padlock
with large flat areas, so that any structure the memory encryption lets through shows."""

from __future__ import annotations

from PIL import Image, ImageDraw

SIZE = 256  # SIZE x SIZE bytes: 64 KiB, 16 pages


def padlock(size: int = SIZE) -> bytes:
    """A padlock with "SEV" on it, grayscale, one byte per pixel."""
    img = Image.new("L", (size, size), 235)
    d = ImageDraw.Draw(img)
    s = size / 256
    d.rounded_rectangle(
        [72 * s, 20 * s, 184 * s, 150 * s], radius=56 * s, outline=60, width=int(22 * s)
    )
    d.rectangle([40 * s, 112 * s, 216 * s, 236 * s], fill=40)
    d.ellipse([112 * s, 140 * s, 144 * s, 172 * s], fill=235)
    d.rectangle([122 * s, 160 * s, 134 * s, 208 * s], fill=235)
    d.text((104 * s, 214 * s), "SEV", fill=200)
    return img.tobytes()
