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


class PolicyType(click.ParamType):
    """A guest policy: a 32-bit number in decimal or 0x-hex, as sevctl and QEMU take it. A
    bad one is a usage error naming the option: ``Invalid value for '--sev-policy': ...``."""

    name = "policy"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 0)
            except ValueError:
                self.fail(f"{value!r} is not a number (decimal or 0x...)", param, ctx)
        if not 0 <= number < 1 << 32:
            self.fail(f"{value!r} is not a 32-bit policy (0 to 0xffffffff)", param, ctx)
        return number


POLICY = PolicyType()


def build_profile(name: str, seed: int | None = None, **changes: object) -> MachineProfile:
    return get_profile(name).with_(seed=seed, **changes)
