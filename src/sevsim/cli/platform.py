"""``sevsim platform``: the platform owner's commands, through the host's /dev/sev.

When a platform service runs on the state directory (``platform serve``, or one that
``vm run`` started), a command goes through it, while its VMs run, and the firmware's own
state rules decide what is allowed. Otherwise the command powers on the platform kept in
the state directory (its chip fuses and SPI flash), boots the host kernel, probes the SEV
device (INIT, WBINVD, DF_FLUSH), runs, and powers off. Either way the next command finds
the same chip and the same keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sevsim.api.status import PlatformState
from sevsim.certs.sev import CERT_SIZE, CertError, SevCert
from sevsim.fsutil import LockBusy, atomic_write
from sevsim.owner import ca as owner_ca
from sevsim.paths import default_state_dir
from sevsim.platform import PlatformMismatch
from sevsim.platform.client import RemoteSystem, ServiceClient, ServiceLost
from sevsim.profiles import PROFILES, get_profile
from sevsim.system import HostSystem, PlatformError


def _platform_options(f: Callable) -> Callable:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)
    f = click.option(
        "--nv-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="SEVSIM_NV_FILE",
        help="Keep the firmware's persistent data in this 32 KiB file (INIT_EX, like "
        "Linux's init_ex_path) instead of the SPI flash.  [env: SEVSIM_NV_FILE]",
    )(f)
    f = click.option(
        "--state",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="SEVSIM_STATE",
        help="The platform's state directory (chip fuses, SPI flash). "
        "[env: SEVSIM_STATE; default: <data dir>/platforms/<profile>]",
    )(f)
    f = click.option(
        "--profile",
        "profile_name",
        type=click.Choice(list(PROFILES), case_sensitive=False),
        envvar="SEVSIM_PROFILE",
        default="milan",
        show_default=True,
        help="Which EPYC generation the platform is.  [env: SEVSIM_PROFILE]",
    )(f)
    return f


def _run(opts: dict[str, Any], action: Callable[[HostSystem], dict[str, Any]]) -> dict[str, Any]:
    profile = get_profile(opts["profile_name"])
    state = opts["state"] or default_state_dir(profile.name)
    try:
        client = ServiceClient.connect(state)
        if client is not None:
            try:
                if client.hello["profile"] != profile.name:
                    raise PlatformMismatch(
                        f"{state} holds a {client.hello['profile']} platform, not {profile.name}"
                    )
                result = action(RemoteSystem(client))
            finally:
                client.close()
        else:
            with HostSystem.start(profile, state_dir=state, nv_file=opts["nv_file"]) as system:
                result = action(system)
    except (PlatformError, LockBusy, PlatformMismatch, CertError, ServiceLost) as exc:
        raise click.ClickException(str(exc)) from None
    result.setdefault("profile", profile.name)
    result.setdefault("state_dir", str(state))
    return result


def _emit(opts: dict[str, Any], result: dict[str, Any], lines: list[str]) -> None:
    if opts["as_json"]:
        click.echo(json.dumps(result, indent=2))
    else:
        for line in lines:
            Console().print(line, highlight=False)


def _fingerprint(cert: bytes) -> str:
    return hashlib.sha256(cert).hexdigest()[:16]


@click.group()
def platform() -> None:
    """Manage a simulated SEV platform: status, keys, ownership, certificate export.

    The platform lives in a state directory (--state, default under the user's data
    directory), so its chip identity and its OCA/PEK/PDH persist from one command to the
    next, as on a real machine.
    """


@platform.command()
@_platform_options
def status(**opts: Any) -> None:
    """Show PLATFORM_STATUS: firmware version, state, owner, guests, chip ID."""

    def action(system: HostSystem) -> dict[str, Any]:
        st = system.check("PLATFORM_STATUS", system.sev.platform_status()).data["status"]
        return {
            "api_major": st.api_major,
            "api_minor": st.api_minor,
            "build": st.build,
            "state": st.state.name,
            "owner": "external" if st.externally_owned else "self",
            "config_es": st.config_es,
            "guest_count": st.guest_count,
            "chip_id": system.chip_id().hex(),
            "service": system.service() if isinstance(system, RemoteSystem) else None,
        }

    r = _run(opts, action)
    table = Table(show_header=False, title=f"SEV platform ({r['profile']})", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in (
        ("firmware", f"SEV API {r['api_major']}.{r['api_minor']}, build {r['build']}"),
        ("state", r["state"]),
        ("owner", "externally owned" if r["owner"] == "external" else "self-owned"),
        ("SEV-ES", "initialised" if r["config_es"] else "not initialised"),
        ("guests", str(r["guest_count"])),
        ("chip ID", r["chip_id"][:32] + "..."),
        ("state directory", r["state_dir"]),
    ):
        table.add_row(k, v)
    if r["service"] is not None:
        vms = len(r["service"]["vms"])
        table.add_row("service", f"pid {r['service']['pid']}, {vms} VM{'s' * (vms != 1)}")
    if opts["as_json"]:
        _emit(opts, r, [])
    else:
        Console().print(table)


@platform.command()
@_platform_options
def reset(**opts: Any) -> None:
    """Factory reset: erase the OCA, PEK and PDH (the next INIT makes new ones, self-owned)."""

    def action(system: HostSystem) -> dict[str, Any]:
        system.check("FACTORY_RESET", system.sev.factory_reset())
        return {"reset": True, "nv_file_kept": system.sev.init_ex_path is not None}

    r = _run(opts, action)
    lines = ["Platform reset: the SPI flash is erased; the next INIT generates a new identity."]
    if r["nv_file_kept"]:
        lines.append(
            "Note: with an NV file the firmware's data is in that file, which PLATFORM_RESET "
            "does not touch (the firmware erases the SPI flash only); delete the file to "
            "forget the keys."
        )
    _emit(opts, r, lines)


def _regen(opts: dict[str, Any], what: str) -> None:
    def action(system: HostSystem) -> dict[str, Any]:
        result = system.sev.pek_gen() if what == "PEK_GEN" else system.sev.pdh_gen()
        system.check(what, result)
        pdh = system.check("PDH_CERT_EXPORT", system.sev.pdh_cert_export()).data["pdh"]
        return {"command": what, "pdh_fingerprint": _fingerprint(pdh)}

    r = _run(opts, action)
    _emit(opts, r, [f"{what} done. New PDH certificate, SHA-256 {r['pdh_fingerprint']}..."])


@platform.command("pek-gen")
@_platform_options
def pek_gen(**opts: Any) -> None:
    """Generate a new OCA, PEK and PDH (the platform becomes self-owned)."""
    _regen(opts, "PEK_GEN")


@platform.command("pdh-gen")
@_platform_options
def pdh_gen(**opts: Any) -> None:
    """Generate a new PDH (sevctl rotate)."""
    _regen(opts, "PDH_GEN")


@platform.command("pek-csr")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_platform_options
def pek_csr(file: Path, **opts: Any) -> None:
    """Write the PEK certificate signing request to FILE (for external ownership)."""

    def action(system: HostSystem) -> dict[str, Any]:
        csr = system.check("PEK_CSR", system.sev.pek_csr()).data["csr"]
        atomic_write(file, csr, 0o644)
        return {"csr": str(file), "bytes": len(csr)}

    r = _run(opts, action)
    _emit(opts, r, [f"PEK signing request written to {file} ({r['bytes']} bytes)."])


@platform.command("pek-import")
@click.argument("pek", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("oca", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_platform_options
def pek_import(pek: Path, oca: Path, **opts: Any) -> None:
    """Import a PEK signed by an owner's OCA, and the OCA certificate (PEK_CERT_IMPORT)."""

    def action(system: HostSystem) -> dict[str, Any]:
        system.check(
            "PEK_CERT_IMPORT", system.sev.pek_cert_import(pek.read_bytes(), oca.read_bytes())
        )
        return {"imported": True, "owner": "external"}

    r = _run(opts, action)
    _emit(opts, r, ["PEK and OCA imported: the platform is now externally owned."])


@platform.command("get-id")
@_platform_options
def get_id(**opts: Any) -> None:
    """Print the chip ID (GET_ID): the key under which AMD's KDS serves this chip's CEK."""
    r = _run(opts, lambda system: {"chip_id": system.chip_id().hex()})
    _emit(opts, r, [r["chip_id"]])


@platform.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--full", is_flag=True, help="Append the ASK and ARK (the whole chain).")
@_platform_options
def export(file: Path, full: bool, **opts: Any) -> None:
    """Write the certificate chain in sevctl's export format: PDH, PEK, OCA, CEK (signed by
    the ASK, from the key distribution service), and with --full also ASK and ARK."""

    def action(system: HostSystem) -> dict[str, Any]:
        chain = system.export_chain(full)
        data = chain.encode(full)
        atomic_write(file, data, 0o644)
        return {"chain": str(file), "bytes": len(data), "full": full}

    r = _run(opts, action)
    what = "PDH, PEK, OCA, CEK" + (", ASK, ARK" if full else "")
    _emit(opts, r, [f"Chain ({what}) written to {file} ({r['bytes']} bytes)."])


@platform.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for oca.cert and oca.key.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ca(out_dir: Path, as_json: bool) -> None:
    """Create an owner CA: a P-384 OCA key (oca.key) and its self-signed certificate
    (oca.cert), for taking ownership of platforms (see 'platform provision')."""
    cert, key = owner_ca.generate(out_dir)
    r = {"oca_cert": str(cert), "oca_key": str(key)}
    _emit({"as_json": as_json}, r, [f"Owner CA written: {cert} and {key} (keep the key private)."])


@platform.command()
@click.argument("ca_cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("ca_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_platform_options
def provision(ca_cert: Path, ca_key: Path, **opts: Any) -> None:
    """Take ownership (sevctl provision): PEK_CSR, sign it with CA_KEY, PEK_CERT_IMPORT."""
    oca = SevCert.parse(ca_cert.read_bytes()) if ca_cert.stat().st_size == CERT_SIZE else None
    if oca is None:
        raise click.BadParameter(
            f"{ca_cert} is not a {CERT_SIZE}-byte SEV certificate", param_hint="CA_CERT"
        )
    try:
        key = owner_ca.load_key(ca_key)
    except CertError as exc:
        raise click.BadParameter(str(exc), param_hint="CA_KEY") from None

    def action(system: HostSystem) -> dict[str, Any]:
        csr = system.check("PEK_CSR", system.sev.pek_csr()).data["csr"]
        signed = owner_ca.sign_csr(csr, key, oca)
        system.check("PEK_CERT_IMPORT", system.sev.pek_cert_import(signed.raw, oca.raw))
        st = system.check("PLATFORM_STATUS", system.sev.platform_status()).data["status"]
        return {
            "owner": "external" if st.externally_owned else "self",
            "state": PlatformState(st.state).name,
        }

    r = _run(opts, action)
    _emit(opts, r, ["The platform is now owned by the CA in " + str(ca_cert) + "."])


@platform.command()
@click.option("--daemonize", is_flag=True, help="Detach once the service is ready.")
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the service's pid here [default with --daemonize: <state>/platform.pid].",
)
@click.option(
    "--exit-when-idle",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Stop once no client has been connected for this long (what 'vm run' asks of the "
    "service it starts).",
)
@_platform_options
def serve(daemonize: bool, pidfile: Path | None, exit_when_idle: float | None, **opts: Any) -> None:
    """Run the platform — machine, PSP firmware, host kernel, KVM — as one long-lived
    service on a Unix socket (mode 0600) in the state directory. 'vm run' processes attach
    to it (and start one in the background when none runs); 'platform' commands go through
    it while VMs run. 'platform stop' (or SIGTERM) ends it: every VM is torn down as KVM
    does when its last file descriptor closes, and the firmware's state stays sealed in the
    state directory for the next start. Two services on one state directory are refused."""
    from sevsim.cli import daemon
    from sevsim.platform import wire
    from sevsim.platform.service import PlatformService

    profile = get_profile(opts["profile_name"])
    state = Path(opts["state"] or default_state_dir(profile.name)).resolve()
    running = ServiceClient.connect(state)
    if running is not None:
        pid = running.hello["pid"]
        running.close()
        raise click.ClickException(f"a platform service already runs on {state} (pid {pid})")
    if daemonize:
        state.mkdir(parents=True, exist_ok=True)
        daemon.daemonize(pidfile or state / wire.PIDFILE_NAME, log=state / wire.LOG_NAME)
    elif pidfile:
        atomic_write(pidfile, f"{os.getpid()}\n".encode(), 0o644)
    try:
        system = HostSystem.start(profile, state_dir=state, nv_file=opts["nv_file"])
        service = PlatformService(system, state, exit_when_idle)
    except (PlatformError, LockBusy, PlatformMismatch, CertError, OSError) as exc:
        if isinstance(exc, LockBusy):
            exc = LockBusy(f"the platform at {state} is in use by another process (a service?)")
        daemon.signal_failure(str(exc))
        raise click.ClickException(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: service.done.set())
    signal.signal(signal.SIGINT, lambda *_: service.done.set())
    if opts["as_json"]:  # one line a script can wait for
        ready = {"pid": os.getpid(), "socket": str(service.path), "profile": profile.name}
        if daemonize:
            daemon.signal_ready(json.dumps(ready), stdout=True)
        else:
            click.echo(json.dumps(ready))
    elif daemonize:
        daemon.signal_ready()
    else:
        click.echo(
            f"{profile.name} platform service on {service.path} (pid {os.getpid()}); "
            "'sevsim platform stop' or Ctrl-C ends it",
            err=True,
        )
    try:
        service.serve_forever()
    finally:
        written = pidfile or (state / wire.PIDFILE_NAME if daemonize else None)
        if written is not None:
            Path(written).unlink(missing_ok=True)


@platform.command()
@_platform_options
def stop(**opts: Any) -> None:
    """Stop the platform service of the state directory: its VMs are torn down (their
    processes exit with one line saying so) and the platform powers off."""
    profile = get_profile(opts["profile_name"])
    state = opts["state"] or default_state_dir(profile.name)
    client = ServiceClient.connect(state)
    if client is None:
        raise click.ClickException(f"no platform service runs on {state}")
    pid = client.hello["pid"]
    stopped = threading.Event()
    client.on_lost = stopped.set
    client.request("stop")
    stopped.wait(60)
    client.close()
    result = {"stopped": True, "pid": pid, "state_dir": str(state)}
    _emit(opts, result, [f"platform service {pid} on {state} stopped"])
