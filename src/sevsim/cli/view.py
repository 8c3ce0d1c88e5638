"""``sevsim view``: memory as pictures."""

from __future__ import annotations

import json
from pathlib import Path

import click
from PIL import Image

from sevsim import pictures
from sevsim.cli.options import build_profile, json_option, profile_option, seed_option


def _range(text: str) -> tuple[int, int]:
    try:
        start, length = (int(part, 0) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter("START:LENGTH, e.g. 0x1a00000:0x10000") from None
    if start < 0 or length <= 0 or start % 4096:
        raise click.BadParameter("START must be page aligned and LENGTH positive")
    return start, length


@click.command("view")
@click.option(
    "--what",
    type=click.Choice(["classic", "cpu", "dram", "keys"]),
    default="classic",
    show_default=True,
    help="classic: a guest's picture as it reads it and in DRAM under no encryption, xe, a "
    "weak xe tweak and xex, side by side; dram: a physical range as DRAM holds it; cpu: "
    "the same range as the host CPU reads it through its direct map; keys: which "
    "encryption domain each 4 KiB page belongs to.",
)
@click.option(
    "--range",
    "range_",
    help="START:LENGTH of physical memory for cpu/dram/keys [default: the picture a guest "
    "keeps, for keys all memory in use].",
)
@click.option("--width", default=256, show_default=True, help="Bytes per row for cpu/dram.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@profile_option()
@seed_option
@json_option
def view_cmd(
    what: str,
    range_: str | None,
    width: int,
    out: Path,
    profile_name: str,
    seed: int | None,
    as_json: bool,
) -> None:
    """Draw memory as a PNG, one pixel per byte (one square per page for --what keys).
    The machine is a fresh one: an SME host with two SEV guests — the first keeping a
    256x256 padlock bitmap in private memory — and an ordinary VM."""
    if width <= 0 or width % 16:
        raise click.BadParameter("a multiple of 16", param_hint="--width")
    profile = build_profile(profile_name, seed)
    figures: dict = {}
    if what == "classic":
        panels = pictures.classic_panels(profile)
        image = pictures.side_by_side(panels)
        figures = {
            p.label: {
                "chi_square": round(pictures.chi_square(p.data), 1),
                "repeated_blocks": round(pictures.repeated_blocks(p.data), 3),
            }
            for p in panels
        }
    else:
        system, vms = pictures.scenario(profile)
        try:
            if range_:
                start, length = _range(range_)
            elif what == "keys":
                start, length = 0, system.kernel._next_free  # all the host has handed out
            else:
                start, length = vms[0].spa(pictures.PICTURE_GPA), pictures.PICTURE_BYTES
            if start + length > system.machine.dram.size:
                raise click.BadParameter("beyond DRAM", param_hint="--range")
            if what == "keys":
                domains = pictures.page_domains(system, vms, start, -(-length // 4096))
                image = pictures.key_map(domains)
                figures = {label: domains.count(label) for label in dict.fromkeys(domains)}
            else:
                data = (
                    system.machine.dram.read(start, length)
                    if what == "dram"
                    else system.kernel.read(system.kernel.va(start), length)
                )
                rows = length // width
                image = Image.frombytes("L", (width, rows), data[: rows * width])
                figures = {"chi_square": round(pictures.chi_square(data), 1)}
            figures["range"] = f"{start:#x}:{length:#x}"
        finally:
            system.close()
    try:
        image.save(out, format="PNG")
    except OSError as exc:
        raise click.ClickException(f"{out}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(
            json.dumps(
                {"what": what, "out": str(out), "width": image.width, "height": image.height}
                | {"figures": figures}
            )
        )
    else:
        click.echo(f"{what}: {image.width}x{image.height} picture written to {out}")
