"""``sevsim owner``: the guest owner's tools. They read and write files only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sevsim.certs.sev import CERT_SIZE, CertError, SevCert
from sevsim.fsutil import atomic_write
from sevsim.owner import ca as owner_ca


@click.group()
def owner() -> None:
    """Guest-owner tools: they work on files, never on the machine."""


@owner.command("sign-csr")
@click.argument("csr", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--ca-cert", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--ca-key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def sign_csr(csr: Path, ca_cert: Path, ca_key: Path, out: Path, as_json: bool) -> None:
    """Sign a platform's PEK signing request (from 'platform pek-csr') with the owner's OCA
    key; import the result with 'platform pek-import OUT CA_CERT'."""
    try:
        if csr.stat().st_size != CERT_SIZE or ca_cert.stat().st_size != CERT_SIZE:
            raise CertError(f"the CSR and the CA certificate are {CERT_SIZE}-byte SEV certificates")
        signed = owner_ca.sign_csr(
            csr.read_bytes(), owner_ca.load_key(ca_key), SevCert.parse(ca_cert.read_bytes())
        )
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    atomic_write(out, signed.raw, 0o644)
    if as_json:
        click.echo(json.dumps({"pek": str(out)}))
    else:
        click.echo(f"Signed PEK written to {out}.")
