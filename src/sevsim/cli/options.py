"""Options shared by several commands."""

from __future__ import annotations

import click

from sevsim.profiles import PROFILES, MachineProfile, get_profile


def profile_option(default: str = "milan"):
    return click.option(
        "--profile",
        "profile_name",
        type=click.Choice(list(PROFILES), case_sensitive=False),
        default=default,
        show_default=True,
        help="Which EPYC generation to simulate.",
    )


seed_option = click.option(
    "--seed",
    type=int,
    default=None,
    help="Make keys and tweaks reproducible (default: fresh random values each run).",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def build_profile(name: str, seed: int | None = None, **changes: object) -> MachineProfile:
    return get_profile(name).with_(seed=seed, **changes)
