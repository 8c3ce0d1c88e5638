"""``sevsim vm``: run an SEV guest the way QEMU does, and make its firmware image."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sevsim.api.vmsa import VCPU_TYPES
from sevsim.cli import daemon
from sevsim.cli.options import POLICY, json_option
from sevsim.cli.platform import _platform_options
from sevsim.fsutil import atomic_write
from sevsim.guest import x86 as x86_guest
from sevsim.host.gdbstub import GdbAddressError, GdbServer, parse_gdb_address
from sevsim.host.migration import MigrationError, TargetChain
from sevsim.host.qmp import QmpAddress, QmpClient, QmpError, QmpServer, parse_qmp_address
from sevsim.host.virtio_blk import create_image
from sevsim.host.vmm import VmConfig, VmmError
from sevsim.paths import default_state_dir
from sevsim.platform import PlatformMismatch
from sevsim.platform.client import RemoteVmm, ServiceLost, ServiceUnavailable, attach
from sevsim.platform.service import ServiceError
from sevsim.profiles import MachineProfile, get_profile

SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str, what: str) -> int:
    """QEMU-style sizes: 512M, 2G, 65536 (bytes; a bare number of 1..65535 means MiB, as
    QEMU's -m does)."""
    value = text.strip().upper()
    try:
        if value and value[-1] in SIZE_SUFFIXES:
            return int(value[:-1]) * SIZE_SUFFIXES[value[-1]]
        number = int(value)
    except ValueError:
        raise click.UsageError(f"{what}: not a size: {text!r} (e.g. 512M, 2G)") from None
    return number << 20 if number < 1 << 16 else number


@click.group()
def vm() -> None:
    """Run an SEV guest like QEMU (launch, QMP, measured boot) and build its firmware."""


@vm.command("firmware")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    default="2M",
    show_default=True,
    help="Flash size (a multiple of 64 KiB): the 64 KiB guest image at its top, erased "
    "flash (0xFF) in front of it, as a larger OVMF build would fill it.",
)
@json_option
def firmware_cmd(out: Path, size: str, as_json: bool) -> None:
    """Write the guest firmware (OVMF's role): the real-code guest of sevsim/guest/x86 in a
    flash image of --size bytes, ending with its OVMF footer table (SEV-ES reset block,
    secret area, kernel-hashes area) and reset vector. Give it to `vm run --bios` and to
    `owner measure --firmware`; with --kernel it checks the measured kernel hashes, then
    it proves it got the owner's secret and runs the workloads of
    --fw-cfg name=opt/sevsim/workload,string='WORDS' (see `vm guest-image`)."""
    try:
        image = x86_guest.flash_image(parse_size(size, "--size"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    atomic_write(out, image, 0o644)
    if as_json:
        click.echo(json.dumps({"firmware": str(out), "size": len(image)}))
    else:
        click.echo(f"Guest firmware ({len(image)} bytes) written to {out}.")


@vm.command("guest-image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def guest_image_cmd(out: Path, as_json: bool) -> None:
    """Write the real-code guest (64 KiB of x86 machine code, built from the sources in
    sevsim/guest/x86; the same bytes as `vm firmware --size 64K`) for `vm run --bios`.
    Choose what it does with --fw-cfg name=opt/sevsim/workload,string='WORDS': secret,
    secret:LABEL, dma, aps (with --smp), picture, pf, gp, selfmod, alias, alias-flush,
    spin, alu:N, mem:N, loads:N[:ROUNDS], cpuid:N, count, count:N, disk:MIB[:SEED[:write|:auth]]
    (with --disk), hmac-selftest, and the attack lab's balance, flags, inbox (default:
    secret; the image's README.md says what each does). It also boots on plain QEMU."""
    image = x86_guest.image()
    atomic_write(out, image, 0o644)
    if as_json:
        click.echo(json.dumps({"image": str(out), "size": len(image)}))
    else:
        click.echo(f"Real-code guest ({len(image)} bytes) written to {out}.")


@vm.command("run")
@_platform_options
@click.option(
    "--bios",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The firmware image, as QEMU's -bios: any image whose size is a multiple of "
    "64 KiB (up to 16 MiB), mapped to end at 4 GiB; the vCPUs execute it from the reset "
    "vector (0xFFFFFFF0), as 'sevsim vm firmware' makes them.",
)
@click.option(
    "--incoming",
    help="Wait for a migration on tcp:HOST:PORT instead of launching: the guest, its "
    "memory and its state all arrive in the stream (no firmware, no owner session).",
)
@click.option(
    "--restore",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Start the guest from a snapshot file ('vm snapshot') made for this platform.",
)
@click.option(
    "--fw-cfg",
    "fw_cfg",
    multiple=True,
    help="A fw_cfg file for the firmware, as QEMU's -fw_cfg: name=NAME,string=TEXT or "
    "name=NAME,file=PATH (e.g. name=opt/sevsim/workload,string=count).",
)
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--append", help="The kernel command line.")
@click.option("--memory", "-m", default="512M", show_default=True, help="Guest RAM.")
@click.option(
    "--smp",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="vCPUs. Under SEV-ES each has its own VMSA, measured at launch.",
)
@click.option(
    "--cpu",
    type=click.Choice(list(VCPU_TYPES), case_sensitive=True),
    help="The vCPU model, as QEMU's -cpu: its family/model/stepping signature is CPUID 1 "
    "EAX and RDX at reset, so under SEV-ES it is part of each VMSA and of the launch "
    "measurement (default: the host's).",
)
@click.option(
    "--sev-policy",
    type=POLICY,
    default="0x1",
    show_default=True,
    help="The guest policy (decimal or 0x...). Bit 2 (ES) makes an SEV-ES guest: "
    "encrypted register state (VMSA), the GHCB protocol, no migration.",
)
@click.option(
    "--sev/--no-sev",
    default=True,
    show_default=True,
    help="--no-sev runs the same image as an ordinary VM (QEMU without a sev-guest object), "
    "to compare what the hypervisor sees.",
)
@click.option(
    "--dh-cert-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The owner's GODH certificate, base64 (NAME_godh.b64 from 'owner session').",
)
@click.option(
    "--session-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The owner's session blob, base64 (NAME_session.b64).",
)
@click.option(
    "--qmp",
    help="A QMP server, in QEMU's -qmp syntax: unix:PATH or tcp:HOST:PORT (port 0: a free "
    "one, printed), optionally ,server=on,wait=on|off; wait=on (QEMU's default once "
    "server=on is given) waits for a QMP client before going on. The guest then starts "
    "paused after LAUNCH_MEASURE, as QEMU with -S: query the measurement, inject secrets, "
    "then 'cont'. Without --qmp it runs at once and the command returns when the guest has "
    "finished.",
)
@click.option(
    "--console",
    "console_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Log the guest's serial console here [default: <state>/NAME-console.log, where "
    "NAME is the VM's --name; vm-console.log for the first VM].",
)
@click.option(
    "--disk",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A raw disk image ('vm disk') for a virtio block device, as QEMU's "
    "-drive file=PATH,format=raw,if=virtio. What the guest writes lands in the file as it "
    "is: encrypt the disk in the guest if the host must not read it.",
)
@click.option(
    "--access-platform/--no-access-platform",
    "disk_access_platform",
    default=True,
    show_default=True,
    help="Offer VIRTIO_F_ACCESS_PLATFORM on the disk (QEMU's iommu_platform=on). An SEV "
    "guest refuses a device without it: it could not use bounce buffers.",
)
@click.option(
    "--name",
    help="The VM's name on its platform, as QEMU's -name [default: the first free of vm, "
    "vm-2, vm-3, ...]; the default console log is <state>/NAME-console.log.",
)
@click.option(
    "--gdb",
    "gdb",
    metavar="tcp:[HOST]:PORT",
    help="Serve GDB's remote protocol for the vCPUs, as QEMU's -gdb (e.g. tcp::1234; port "
    "0: a free one, printed; an empty HOST is every interface). Connect with gdb's 'target "
    "remote HOST:PORT'; each vCPU is a thread. Registers come from the VMCB and KVM, memory "
    "is read as the guest sees it, through its page tables and the firmware's DBG_DECRYPT / "
    "DBG_ENCRYPT: a guest whose policy has NODBG (bit 0, the default 0x1) shows registers "
    "but no memory. The command ends when the debugger kills the VM ('kill'), or once the "
    "guest has finished and no debugger is attached (docs/debugging.md).",
)
@click.option(
    "-S",
    "--paused",
    "paused",
    is_flag=True,
    help="Do not start the vCPUs (QEMU's -S): with --gdb they wait, before the first "
    "instruction, for the debugger's 'continue' or 'stepi'; with --qmp for 'cont'.",
)
@click.option("--daemonize", is_flag=True, help="Detach once the VM is ready (needs --qmp).")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path))
def run_cmd(**opts: Any) -> None:
    """Launch a guest on the platform in the state directory, the way QEMU does. An SEV
    guest is created with LAUNCH_START (with the owner's session when given), the firmware
    — and with --kernel the SEV hashes table — encrypted and measured; then the vCPUs run
    the firmware from the reset vector (with --qmp, after 'cont'). A guest that dies
    (triple fault, a vCPU stuck without exits) ends the command with exit status 1 and its
    reason in the console log."""
    if opts["daemonize"] and not opts["qmp"]:
        raise click.UsageError("--daemonize needs --qmp: a detached VM must be reachable")
    sources = [k for k in ("bios", "incoming", "restore") if opts[k]]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --bios, --incoming and --restore")
    if not opts["bios"] and any(
        opts[k] for k in ("kernel", "dh_cert_file", "session_file", "fw_cfg")
    ):
        raise click.UsageError("an incoming or restored guest takes everything from its stream")
    if not opts["sev"] and not opts["bios"]:
        raise click.UsageError("--no-sev goes with --bios (migration and snapshots are SEV's)")
    if (opts["dh_cert_file"] is None) != (opts["session_file"] is None):
        raise click.UsageError("--dh-cert-file and --session-file go together ('owner session')")
    try:
        qmp_address = parse_qmp_address(opts["qmp"]) if opts["qmp"] else None
        if opts["gdb"]:
            parse_gdb_address(opts["gdb"])
    except (ValueError, GdbAddressError) as exc:
        raise click.UsageError(str(exc)) from None
    if opts["paused"] and not (opts["gdb"] or opts["qmp"]):
        raise click.UsageError("-S needs --gdb or --qmp: nothing else could start the guest")
    profile = get_profile(opts["profile_name"])
    state = Path(opts["state"] or default_state_dir(profile.name)).resolve()

    def absolute(path: Path | None) -> Path | None:  # the service has its own cwd
        return None if path is None else Path(path).resolve()

    config = VmConfig(
        firmware=absolute(opts["bios"]),
        memory=parse_size(opts["memory"], "--memory"),
        smp=opts["smp"],
        cpu=opts["cpu"],
        policy=opts["sev_policy"] if opts["sev"] else 0,
        sev=opts["sev"],
        dh_cert_file=absolute(opts["dh_cert_file"]),
        session_file=absolute(opts["session_file"]),
        kernel=absolute(opts["kernel"]),
        initrd=absolute(opts["initrd"]),
        append=opts["append"],
        console=absolute(opts["console_path"]),  # None: <state>/NAME-console.log
        name=opts["name"],
        fw_cfg_files=dict(_fw_cfg_file(spec) for spec in opts["fw_cfg"]),
        disk=absolute(opts["disk"]),
        disk_access_platform=opts["disk_access_platform"],
    )
    if (config.initrd or config.append is not None) and not config.kernel:
        raise click.UsageError("--initrd and --append go with --kernel")
    if config.sev_es and opts["gdb"]:
        raise click.UsageError(
            "--gdb: an SEV-ES guest's registers are encrypted in its VMSA; KVM cannot debug it"
        )
    if opts["daemonize"]:
        daemon.daemonize(opts["pidfile"])  # before any thread starts: the child attaches
    elif opts["pidfile"]:
        atomic_write(opts["pidfile"], f"{os.getpid()}\n".encode(), 0o644)
    try:
        _run_vm(opts, profile, state, config, qmp_address)
    except click.ClickException as exc:
        daemon.signal_failure(f"sevsim vm run: error: {exc.format_message()}")
        raise
    finally:
        if opts["pidfile"]:
            Path(opts["pidfile"]).unlink(missing_ok=True)


def _run_vm(
    opts: dict[str, Any],
    profile: MachineProfile,
    state: Path,
    config: VmConfig,
    qmp_address: QmpAddress | None,
) -> None:
    """The VM process: attach to the platform service (starting one when none runs),
    create the VM there, and be its face — QMP, exit status — until it ends."""
    try:
        client = attach(state, profile, opts["nv_file"])
    except (ServiceUnavailable, ServiceLost, PlatformMismatch) as exc:
        raise click.ClickException(str(exc)) from None
    ending = threading.Event()
    leftovers: list[Path] = []
    if opts["pidfile"]:
        leftovers.append(Path(opts["pidfile"]))

    def service_lost() -> None:
        if ending.is_set():
            return  # this process closed the connection itself
        for path in leftovers:
            path.unlink(missing_ok=True)
        sys.stderr.write(f"sevsim vm: the platform service of {state} ended; the guest is gone\n")
        sys.stderr.flush()
        os._exit(1)

    client.on_lost = service_lost
    vmm = RemoteVmm(client)

    created = False

    def end() -> None:
        ending.set()
        try:
            if created:
                vmm.quit()
        except ServiceLost:
            pass
        client.close()

    try:
        client.request("vm.create", config)
        created = True
        if opts["incoming"]:
            vmm.listen_incoming(_tcp(opts["incoming"]))
        elif opts["restore"]:
            vmm.restore(Path(opts["restore"]).resolve())
        else:
            vmm.start()
    except (VmmError, ServiceError, ServiceLost) as exc:
        end()
        raise click.ClickException(str(exc)) from None
    # Without -S the guest runs before a debugger can connect (QEMU's -gdb): attaching
    # stops it wherever it is.
    run_now = qmp_address is None and not opts["incoming"] and not opts["paused"]
    gdb = _start_gdb(opts, vmm, config, end, run_now) if opts["gdb"] else None
    if qmp_address is None:
        if opts["incoming"]:
            click.echo(f"waiting for a migration on {opts['incoming']}", err=True)
            vmm.serve_incoming()
        if gdb is not None and not _debug_until_done(vmm, gdb):
            end()  # the debugger killed the VM
            return
        _run_to_completion(vmm, end, opts["as_json"])
        return
    try:
        server = QmpServer(vmm, qmp_address, on_wait=_announce_qmp_wait)
    except OSError as exc:
        end()
        raise click.ClickException(f"QMP on {qmp_address}: {exc.strerror or exc}") from None
    if server.path is not None:
        leftovers.append(server.path)
    if opts["incoming"]:
        threading.Thread(target=vmm.serve_incoming, daemon=True).start()
    if opts["restore"]:
        vmm.cont()
    status = vmm.status
    what = {"inmigrate": "waiting for a migration", "running": "running"}.get(
        status, "paused after LAUNCH_MEASURE" if config.sev else "paused"
    )
    kind = "SEV guest" if config.sev else "VM"
    line = f"{kind} {what}; QMP on {server.address}"
    if opts["daemonize"]:
        daemon.signal_ready(line)  # the parent says it: the daemon has no terminal
    else:
        click.echo(line, err=True)
    signal.signal(signal.SIGTERM, lambda *_: server.done.set())
    if gdb is not None:
        gdb.on_kill = server.done.set  # the debugger's 'kill' ends the VM, as 'quit' does
    try:
        server.serve_forever()
    finally:
        died = vmm.guest_died
        end()
    if died is not None:
        raise SystemExit(f"sevsim vm: the guest stopped: {died.reason}: {died.detail}")


def _start_gdb(
    opts: dict[str, Any], vmm: RemoteVmm, config: VmConfig, end, run_now: bool
) -> GdbServer:
    host, port = parse_gdb_address(opts["gdb"])
    try:
        gdb = GdbServer(vmm, host, port)
    except OSError as exc:
        end()
        raise click.ClickException(f"gdb on {opts['gdb']}: {exc.strerror or exc}") from None
    vmm.debug_serve()
    if run_now:
        vmm.cont()
    gdb.start()
    kind = "SEV guest" if config.sev else "VM"
    state = "stopped before its first instruction" if opts["paused"] else "starting"
    click.echo(f"{kind} {state}; gdb server on {gdb.address}", err=True)
    return gdb


def _debug_until_done(vmm: RemoteVmm, gdb: GdbServer) -> bool:
    """Wait while a debugger may attach (the guest runs, unless -S). False if the debugger
    killed the VM; True once the guest has finished with no debugger attached."""
    killed = threading.Event()
    gdb.on_kill = killed.set
    while not killed.wait(0.2):
        if gdb.connected.is_set() or vmm.status in ("prelaunch", "debug"):
            continue  # a debugger holds the guest, or may still come to start it
        if vmm.wait_idle(0):
            return True
    gdb.close()
    click.echo("sevsim vm: the debugger killed the VM", err=True)
    return False


def _announce_qmp_wait(address: QmpAddress) -> None:
    click.echo(f"waiting for a QMP client on {address}", err=True)  # QEMU's wait=on


def _tcp(spec: str) -> str:
    if not spec.startswith("tcp:"):
        raise click.UsageError(f"{spec!r}: migrations come over tcp:HOST:PORT")
    return spec[len("tcp:") :]


def _fw_cfg_file(spec: str) -> tuple[str, bytes]:
    """QEMU's -fw_cfg [name=]NAME,string=TEXT|file=PATH."""
    fields = dict(part.split("=", 1) if "=" in part else ("name", part) for part in spec.split(","))
    name = fields.get("name")
    if not name or ("string" in fields) == ("file" in fields):
        raise click.UsageError(f"--fw-cfg {spec!r}: name=NAME with string=TEXT or file=PATH")
    if "string" in fields:
        return name, fields["string"].encode()
    try:
        return name, Path(fields["file"]).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"--fw-cfg: {exc}") from None


def _run_to_completion(vmm: RemoteVmm, end: Callable[[], None], as_json: bool) -> None:
    try:
        vmm.cont()
        vmm.wait_idle()
        out = vmm.summary()
    finally:
        end()
    exits, disk = out["exits"], out.get("disk")
    if as_json:
        click.echo(json.dumps(out))
    else:
        if out["measurement"]:
            click.echo(f"launch measurement: {out['measurement']}")
        click.echo(out["console"], nl=False)
        for e in exits:
            if e["reason"] != "DONE":
                click.echo(f"vCPU stopped: {e['reason']} {e['detail']}")
        if disk is not None:
            click.echo(
                f"disk: {disk['reads']} reads ({disk['bytes_read']} bytes), "
                f"{disk['writes']} writes ({disk['bytes_written']} bytes)"
            )
    if any(e["reason"] not in ("DONE", "HLT") for e in exits):
        raise SystemExit(1)  # the guest died (triple fault, stuck, internal error)


@vm.command("disk")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", required=True, help="Image size: 64M, 1G, or bytes (a multiple of 512).")
@json_option
def disk_cmd(path: Path, size: str, as_json: bool) -> None:
    """Create a sparse raw disk image for `vm run --disk`, as `qemu-img create -f raw`.
    It refuses to overwrite an existing file."""
    # qemu-img reads a bare number as bytes (QEMU's -m reads it as MiB).
    nbytes = int(size) if size.strip().isdigit() else parse_size(size, "--size")
    try:
        create_image(path, nbytes)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; remove it first") from None
    except OSError as exc:
        raise click.ClickException(
            f"{path}: {exc.strerror}" if exc.strerror else str(exc)
        ) from None
    if as_json:
        click.echo(json.dumps({"disk": str(path), "size": nbytes}))
    else:
        click.echo(f"Disk image {path} ({nbytes} bytes, sparse) created.")


@vm.command("qmp")
@click.argument("socket_spec", metavar="ADDRESS")
@click.argument("command")
@click.argument("arguments", required=False)
def qmp_cmd(socket_spec: str, command: str, arguments: str | None) -> None:
    """Send one QMP command to a running VM and print its return value as JSON, e.g.
    `sevsim vm qmp unix:qmp.sock query-sev-launch-measure` (or tcp:HOST:PORT) or
    `sevsim vm qmp qmp.sock sev-inject-launch-secret '{"packet-header": ..., "secret": ...}'`
    or, for QEMU's human monitor, `sevsim vm qmp qmp.sock human-monitor-command
    '{"command-line": "info registers"}'` (also `x /8xg ADDR`, `xp`, `info tlb`, `info mem`)."""
    try:
        args = json.loads(arguments) if arguments else {}
        if not isinstance(args, dict):
            raise ValueError("ARGUMENTS must be a JSON object")
        address = parse_qmp_address(socket_spec)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        client = QmpClient(address)
    except (OSError, QmpError) as exc:  # no socket, nobody listening, not a QMP server
        reason = getattr(exc, "strerror", None) or str(exc)
        where = address.path if address.kind == "unix" else address
        raise click.ClickException(f"cannot connect to QMP socket {where}: {reason}") from None
    try:
        result = client.execute(command, **args)
        if isinstance(result, str):  # human-monitor-command: HMP's own text
            click.echo(result, nl=False)
        else:
            click.echo(json.dumps(result, indent=2))
    except QmpError as exc:
        raise click.ClickException(f"{exc.error_class}: {exc}") from None
    finally:
        client.close()


# ---- --daemonize: the parent returns once the child is ready, as QEMU's does -------------
# ---- migration and snapshots, driven over QMP -------------------------------------------------
def _qmp_migrate(socket_spec: str, chain_file: Path, uri: str, what: str, as_json: bool) -> None:
    """Set the target's certificates, start the migration, follow query-migrate."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    try:
        target = TargetChain.from_chain(chain_file.read_bytes())
        client = QmpClient(parse_qmp_address(socket_spec))
    except (MigrationError, ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    try:
        client.execute(
            "migrate-set-parameters",
            **{
                "sev-pdh": b64(target.pdh),
                "sev-plat-cert": b64(target.plat_certs),
                "sev-amd-cert": b64(target.amd_certs),
            },
        )
        client.execute("migrate", uri=uri)
        with Progress(
            TextColumn(what), BarColumn(), DownloadColumn(), disable=as_json, transient=True
        ) as bar:
            task = bar.add_task(what, total=None)
            while True:
                info = client.execute("query-migrate")
                if "ram" in info:
                    bar.update(
                        task, total=info["ram"]["total"], completed=info["ram"]["transferred"]
                    )
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.05)
    except QmpError as exc:
        raise click.ClickException(f"{exc.error_class}: {exc}") from None
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(info))
    elif info["status"] == "completed":
        moved = info.get("ram", {}).get("total", 0)
        click.echo(f"{what}: completed ({moved >> 10} KiB of guest memory).")
    else:
        click.echo(f"{what}: {info['status']}: {info.get('error-desc', '')}", err=True)
    sys.exit(0 if info["status"] == "completed" else 1)


@click.command("migrate")
@click.option("--from", "source", required=True, help="The source VM's QMP socket.")
@click.option(
    "--to", "destination", required=True, help="tcp:HOST:PORT of a VM run with --incoming."
)
@click.option(
    "--target-chain",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The destination platform's chain ('platform export --full' there).",
)
@json_option
def migrate_cmd(source: str, destination: str, target_chain: Path, as_json: bool) -> None:
    """Migrate a running SEV guest to another platform. The source's firmware checks the
    destination's chain as the guest policy demands (SEV: up to AMD's root; DOMAIN: the
    same OCA; NOSEND: never), wraps new transport keys for it, and sends every page
    encrypted. On any failure the guest keeps running where it was, untouched."""
    _tcp(destination)
    _qmp_migrate(source, target_chain, destination, "migration", as_json)


@vm.command("snapshot")
@click.option("--qmp", "socket_spec", required=True, help="The VM's QMP socket.")
@click.option(
    "--target-chain",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The chain of the platform that will restore it (this one, or another).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@json_option
def snapshot_cmd(socket_spec: str, target_chain: Path, out: Path, as_json: bool) -> None:
    """Save a running SEV guest to a file (the migration stream, encrypted for the target
    platform); the guest carries on. Restore it with 'vm run --restore FILE'."""
    _qmp_migrate(socket_spec, target_chain, f"file:{out.resolve()}", "snapshot", as_json)
