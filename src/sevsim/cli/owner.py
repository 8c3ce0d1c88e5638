"""``sevsim owner``: the guest owner's tools. They read and write files only."""

from __future__ import annotations

import base64
import binascii
import json
import sys
import uuid
from pathlib import Path

import click

from sevsim.api import guidtable
from sevsim.api import policy as pol
from sevsim.api import vmsa as sev_vmsa
from sevsim.certs.chain import decode_chain
from sevsim.certs.sev import CERT_SIZE, CertError, SevCert
from sevsim.cli.options import POLICY, json_option
from sevsim.fsutil import atomic_write
from sevsim.owner import ca as owner_ca
from sevsim.owner import measure as measure_mod
from sevsim.owner import secret as secret_mod
from sevsim.owner import session as session_mod
from sevsim.owner.trust import ROOT_CHOICES, TrustError
from sevsim.owner.trust import verify as verify_chain_report
from sevsim.paths import data_dir

SECRET_MAX = 0x5000  # the most one LAUNCH_SECRET carries


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


# ---- launch attestation (sevctl session / measurement build / secret build) ----------------
def _int(value: str, what: str) -> int:
    """An integer given in decimal or 0x-hex, as sevctl and QEMU accept it."""
    try:
        return int(value, 0)
    except ValueError:
        raise click.UsageError(
            f"{what} must be an integer (decimal or 0x...), not {value!r}"
        ) from None


def _b64_or_path(value: str, what: str) -> bytes:
    """sevctl's convention: an existing file's bytes, else the value as base64."""
    path = Path(value)
    if path.is_file():
        return path.read_bytes()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise click.UsageError(f"{what}: neither a file nor base64: {value!r}") from None


def _key_file(path: Path, what: str) -> bytes:
    try:
        return session_mod.read_key(path, what)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@owner.command("session")
@click.argument("pdh_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("policy", type=POLICY)
@click.option("--name", default="vm", show_default=True, help="Prefix of the four files.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Where to write them (default: the current directory).",
)
@click.option(
    "--root",
    type=click.Choice(ROOT_CHOICES),
    default="sim",
    show_default=True,
    help="The root to check a chain file against before trusting its PDH.",
)
@json_option
def session_cmd(
    pdh_file: Path, policy: int, name: str, directory: Path, root: str, as_json: bool
) -> None:
    """Start a launch session with a platform: NAME_godh.b64, NAME_session.b64 (give them
    to the VMM, e.g. QEMU's dh-cert-file and session-file) and NAME_tek.bin, NAME_tik.bin
    (keep them: they check the measurement and encrypt secrets).

    PDH_FILE is the platform's PDH certificate, or a chain export (PDH, PEK, OCA, CEK
    [, ASK, ARK]) — then every link is verified first and nothing is written if one fails.
    POLICY is the guest policy (e.g. 0x1: no debugging).
    """
    data = pdh_file.read_bytes()
    try:
        if len(data) == CERT_SIZE:
            pdh, verified = SevCert.parse(data), None
        else:
            chain = decode_chain(data)
            report = verify_chain_report(chain, root, data_dir())
            if not report.ok:
                failure = report.first_failure()
                raise click.ClickException(
                    f"{pdh_file}: the chain does not verify ({failure.subject} "
                    f"{failure.check}: {failure.reason}); no session written"
                )
            pdh, verified = chain.pdh, report.root
        started = session_mod.start(pdh, policy)
    except (CertError, TrustError) as exc:
        raise click.UsageError(f"{pdh_file}: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    paths = started.write(directory, name)
    if as_json:
        out = {k: str(v) for k, v in paths.items()}
        click.echo(json.dumps(out | {"policy": policy, "chain_verified_against": verified}))
        return
    if verified:
        click.echo(f"The chain verifies against the {verified} root.")
    click.echo(f"Session for policy {policy:#x} ({pol.describe(policy)}):")
    for kind, path in paths.items():
        click.echo(f"  {kind:8} {path}")


@owner.command("measure")
@click.option("--firmware", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cmdline", help="The kernel command line given to the VMM (--append).")
@click.option("--launch-digest", help="The launch digest itself (base64), instead of files.")
@click.option("--policy", required=True, type=POLICY, help="The guest policy (decimal or 0x...).")
@click.option("--api-major", required=True, help="The platform's SEV API major version.")
@click.option("--api-minor", required=True, help="... minor version.")
@click.option("--build-id", required=True, help="... and firmware build.")
@click.option("--nonce", help="MNONCE (base64 or file): print the expected measurement.")
@click.option(
    "--measurement", help="The reported measurement, MEASURE ‖ MNONCE (base64 or file): check it."
)
@click.option("--tik", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--cpu",
    type=click.Choice(list(sev_vmsa.VCPU_TYPES)),
    help="SEV-ES: the VMM's vCPU type (QEMU -cpu; its signature is RDX in the VMSA)."
    "  [default: EPYC]",
)
@click.option("--smp", type=click.IntRange(1, 4096), help="SEV-ES: vCPUs.  [default: 1]")
@click.option(
    "--legacy-vmsa",
    is_flag=True,
    help="SEV-ES: the host kernel is older than Linux 6.10 (KVM_SEV_ES_INIT), whose VMSA"
    " leaves MXCSR and the x87 control word zero.",
)
@json_option
def measure_cmd(
    firmware: Path | None,
    kernel: Path | None,
    initrd: Path | None,
    cmdline: str | None,
    launch_digest: str | None,
    policy: int,
    api_major: str,
    api_minor: str,
    build_id: str,
    nonce: str | None,
    measurement: str | None,
    tik: Path,
    cpu: str | None,
    smp: int | None,
    legacy_vmsa: bool,
    as_json: bool,
) -> None:
    """Recompute the launch measurement a platform should report, and compare.

    The launch digest is SHA-256 of the firmware image and, when the VMM was given
    --kernel, of QEMU's SEV hashes table (kernel, initrd, command line). When the policy
    has the ES bit (0x4), one VMSA page per vCPU follows (--smp, --cpu). With
    --measurement (as from QMP query-sev-launch-measure) it says match or mismatch and, on
    a mismatch, what usually causes one. With --nonce it prints the expected value.
    Exit code: 0 match (or printed), 1 mismatch, 2 bad input.
    """
    if (nonce is None) == (measurement is None):
        raise click.UsageError("give exactly one of --nonce and --measurement")
    if (firmware is None) == (launch_digest is None):
        raise click.UsageError("give exactly one of --firmware and --launch-digest")
    if firmware is None and (kernel or initrd or cmdline is not None):
        raise click.UsageError("--kernel/--initrd/--cmdline go with --firmware")
    if kernel is None and (initrd or cmdline is not None):
        raise click.UsageError("--initrd and --cmdline need --kernel (QEMU measures them with it)")
    es_given = cpu is not None or smp is not None or legacy_vmsa
    if es_given and not policy & pol.PolicyFlag.ES:
        raise click.UsageError("--cpu, --smp and --legacy-vmsa are for SEV-ES (policy bit 0x4)")
    if es_given and firmware is None:
        raise click.UsageError("--cpu, --smp and --legacy-vmsa go with --firmware")
    numbers = [policy] + [
        _int(v, n)
        for v, n in (
            (api_major, "--api-major"),
            (api_minor, "--api-minor"),
            (build_id, "--build-id"),
        )
    ]
    if not all(0 <= v < 256 for v in numbers[1:]):
        raise click.UsageError("--api-major, --api-minor and --build-id are bytes (0..255)")
    tik_key = _key_file(tik, "TIK")
    if launch_digest is not None:
        digest = _b64_or_path(launch_digest, "--launch-digest")
        if len(digest) != 32:
            raise click.UsageError("--launch-digest: a SHA-256 digest is 32 bytes")
    else:
        es = None
        if policy & pol.PolicyFlag.ES:
            es = measure_mod.EsVcpus(
                smp or 1, sev_vmsa.vcpu_signature(cpu or "EPYC"), not legacy_vmsa
            )
        try:
            digest = measure_mod.launch_digest(
                firmware.read_bytes(),
                kernel.read_bytes() if kernel else None,
                initrd.read_bytes() if initrd else None,
                cmdline,
                es,
            )
        except measure_mod.MeasureError as exc:
            raise click.UsageError(f"--firmware: {exc}") from None
    if nonce is not None:
        mnonce = _b64_or_path(nonce, "--nonce")
        if len(mnonce) != 16:
            raise click.UsageError("--nonce: MNONCE is 16 bytes")
        expected = measure_mod.measurement(tik_key, *numbers[1:], numbers[0], digest, mnonce)
        text = base64.b64encode(expected + mnonce).decode()
        click.echo(
            json.dumps({"measurement": text, "launch_digest": digest.hex()}) if as_json else text
        )
        return
    reported = _b64_or_path(measurement, "--measurement")
    try:
        verdict = measure_mod.check(reported, tik_key, *numbers[1:], numbers[0], digest)
    except ValueError as exc:
        raise click.UsageError(f"--measurement: {exc}") from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "match": verdict.ok,
                    "launch_digest": digest.hex(),
                    "expected": base64.b64encode(verdict.expected).decode(),
                    "reported": base64.b64encode(verdict.reported).decode(),
                    "check": verdict.checklist,
                }
            )
        )
    elif verdict.ok:
        click.echo(f"match: the platform measured what you expect (launch digest {digest.hex()})")
    else:
        click.echo("MISMATCH: the reported measurement is not the expected one.")
        click.echo(f"  expected {base64.b64encode(verdict.expected).decode()}")
        click.echo(f"  reported {base64.b64encode(verdict.reported).decode()}")
        click.echo("Check, one by one:")
        for item in verdict.checklist:
            click.echo(f"  - {item}")
    sys.exit(0 if verdict.ok else 1)


@owner.command("secret")
@click.option("--measurement", required=True, help="The verified measurement (base64 or file).")
@click.option("--tik", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tek", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--secret",
    "secret_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The secret's bytes.",
)
@click.option(
    "--guid",
    help="Put the secret in an OVMF secrets table under this GUID (what OVMF and Linux's "
    "efi_secret read); without it the file is sent as it is, zero-padded to 16 bytes.",
)
@click.option("--iv", hidden=True, help="Fixed IV (base64), for known-answer tests.")
@click.option("--out-header", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out-payload", required=True, type=click.Path(dir_okay=False, path_type=Path))
@json_option
def secret_cmd(
    measurement: str,
    tik: Path,
    tek: Path,
    secret_file: Path,
    guid: str | None,
    iv: str | None,
    out_header: Path,
    out_payload: Path,
    as_json: bool,
) -> None:
    """Build a LAUNCH_SECRET packet for the launch whose measurement you verified: the
    header and the encrypted payload, base64, as QEMU's sev-inject-launch-secret takes
    them (packet-header, secret)."""
    blob = _b64_or_path(measurement, "--measurement")
    if len(blob) != measure_mod.MEASUREMENT_SIZE:
        raise click.UsageError("--measurement: MEASURE ‖ MNONCE is 48 bytes")
    data = secret_file.read_bytes()
    if guid is not None:
        try:
            data = guidtable.secrets_table([(uuid.UUID(guid), data)])
        except ValueError:
            raise click.UsageError(f"--guid: not a GUID: {guid!r}") from None
    else:
        data += bytes(-len(data) % 16)
    if not data or len(data) > SECRET_MAX:
        raise click.UsageError(f"a secret packet carries 16 to {SECRET_MAX} bytes")
    fixed_iv = _b64_or_path(iv, "--iv") if iv else None
    header, payload = secret_mod.build_packet(
        _key_file(tek, "TEK"), _key_file(tik, "TIK"), blob[:32], data, iv=fixed_iv
    )
    atomic_write(out_header, base64.b64encode(header), 0o644)
    atomic_write(out_payload, base64.b64encode(payload), 0o644)
    if as_json:
        click.echo(json.dumps({"header": str(out_header), "payload": str(out_payload)}))
    else:
        click.echo(f"Header ({len(header)} bytes) written to {out_header}, base64.")
        click.echo(f"Payload ({len(payload)} bytes) written to {out_payload}, base64.")
