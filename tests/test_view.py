"""Pictures of memory, checked by their properties (never against stored images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sevsim import pictures
from sevsim.cli import main
from sevsim.guest import x86 as x86_guest
from sevsim.guest.picture import padlock
from sevsim.profiles import get_profile


@pytest.fixture(scope="module")
def panels():
    return {p.label: p.data for p in pictures.classic_panels(get_profile("milan").with_(seed=8))}


def test_the_guest_reads_its_picture_and_unencrypted_dram_shows_it(panels):
    assert panels["what the guest reads"] == padlock()
    assert panels["DRAM, no encryption"] == padlock()


def test_xex_dram_is_statistically_noise(panels):
    data = panels["DRAM, xex (Zen 2+)"]
    # Byte histogram: chi-square with 255 degrees of freedom, mean 255, sd ~22.6.
    assert 150 < pictures.chi_square(data) < 400
    assert pictures.repeated_blocks(data) < 0.001
    assert pictures.chi_square(padlock()) > 100_000  # the picture itself is far from it


def test_a_weak_xe_tweak_lets_the_structure_through(panels):
    plain = pictures.repeated_blocks(padlock())
    weak = pictures.repeated_blocks(panels["DRAM, xe, t8=t9=0"])
    # With t8 = t9 = 0 a block and the one a row (256 bytes) above share their tweak unless
    # the row crosses a 1 KiB boundary: 3 rows in 4 repeat wherever the picture does.
    assert weak == pytest.approx(plain * 3 / 4, abs=0.02)
    assert pictures.repeated_blocks(panels["DRAM, xe (Zen 1)"]) < 0.001


def test_side_by_side_layout(panels):
    items = [pictures.Panel(label, data) for label, data in panels.items()]
    image = pictures.side_by_side(items)
    assert image.size == (5 * 256 + 4 * pictures.GAP, 256 + pictures.CAPTION)
    # The first panel's pixels are the guest's picture, byte for byte.
    first = np.asarray(image)[pictures.CAPTION :, :256]
    assert first.tobytes() == padlock()


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_view_command_draws_dram_cpu_and_keys(tmp_path, capsys):
    code, out, _ = _cli(
        ["view", "--what", "keys", "--seed", "3", "--json", "--out", str(tmp_path / "k.png")],
        capsys,
    )
    data = json.loads(out)
    # Every page of alpha's RAM and of its 64 KiB flash is in alpha's domain, but the 16
    # of fw_cfg's DMA bounce buffer, which it shares at boot.
    pages = (x86_guest.MIN_MEMORY + len(x86_guest.image())) // 4096 - 16
    assert code == 0 and data["figures"]["alpha (ASID 9)"] == pages
    # alpha's and beta's bounce buffers, and beta's published page
    assert data["figures"]["guest shared (C=0)"] == 16 + 16 + 1
    with Image.open(tmp_path / "k.png") as img:
        assert img.size == (data["width"], data["height"]) and img.mode == "RGB"
    for what in ("dram", "cpu"):
        code, out, _ = _cli(
            [
                "view",
                "--what",
                what,
                "--seed",
                "3",
                "--json",
                "--out",
                str(tmp_path / f"{what}.png"),
            ],
            capsys,
        )
        data = json.loads(out)
        assert code == 0 and (data["width"], data["height"]) == (256, 256)
        with Image.open(tmp_path / f"{what}.png") as img:
            pixels = img.tobytes()
        assert pixels != padlock() and 150 < pictures.chi_square(pixels) < 400
    code, _, err = _cli(
        ["view", "--what", "dram", "--range", "5:10", "--out", str(tmp_path / "x.png")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
