"""``sevsim verify-chain``: check a platform's certificate chain like a guest owner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from sevsim.certs.chain import decode_chain
from sevsim.certs.sev import CertError
from sevsim.owner.trust import ROOT_CHOICES, TrustError, verify
from sevsim.paths import data_dir


@click.command("verify-chain")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    type=click.Choice(ROOT_CHOICES),
    default="sim",
    show_default=True,
    help="The root to trust: AMD's real ARK of a generation (naples ... turin), or the "
    "simulator's (sim: the generation that signed the CEK; sim:<gen>: that one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_chain_cmd(file: Path, root: str, as_json: bool) -> None:
    """Verify a chain file (PDH, PEK, OCA, CEK [, ASK, ARK]) link by link.

    Checks ARK (self-signed) -> ASK -> CEK -> PEK -> PDH and OCA (self-signed) -> PEK, and
    says which link fails and why. Exit code: 0 verified, 1 a link fails, 2 bad input.
    """
    try:
        chain = decode_chain(file.read_bytes())
        report = verify(chain, root, data_dir())
    except (CertError, TrustError) as exc:
        raise click.UsageError(f"{file}: {exc}") from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "file": str(file),
                    "root": report.root,
                    "ok": report.ok,
                    "links": [vars(link) for link in report.links],
                },
                indent=2,
            )
        )
    else:
        console = Console()
        console.print(f"Chain {file}, trusting the {report.root} root", highlight=False)
        for link in report.links:
            mark = "[green]✔[/green]" if link.ok else "[red]✘[/red]"
            reason = f" — {link.reason}" if link.reason else ""
            console.print(f"  {mark} {link.subject} {link.check}{reason}", highlight=False)
        failure = report.first_failure()
        if failure is None:
            console.print("[bold green]The chain verifies.[/bold green]")
        else:
            console.print(
                f"[bold red]The chain does not verify: {failure.subject} {failure.check} "
                f"fails.[/bold red]",
                highlight=False,
            )
    sys.exit(0 if report.ok else 1)
