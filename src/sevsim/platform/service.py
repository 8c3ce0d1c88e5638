"""The platform service: one powered-on platform that many VM processes share.

On a real host the platform is always there: every QEMU process opens /dev/kvm and
/dev/sev, sevctl talks to the firmware while guests run, and KVM hands out ASIDs across
all VMs. Here one process holds the platform (machine, PSP firmware, host kernel, KVM)
and serves it on a Unix socket in the state directory; ``sevsim vm run`` processes and
``sevsim platform`` commands are its clients.

A VM process is its VM's face and lifetime, as a QEMU process is: its QMP socket, console
log, pidfile and exit status. The VMM's device models and vCPU threads run here, next to
the memory they touch (MODEL: in QEMU they run in the VM's own process; guest memory here
is the machine's DRAM, which lives in this process). When the VM process's connection
closes — it quit, crashed or was killed with SIGKILL — the guest is torn down as KVM does
when the last file descriptor of a VM closes (DEACTIVATE, DECOMMISSION, the ASID to the
reclaim set, the memory back to the host); nothing else is disturbed.

The vCPUs of all VMs take fair turns on the silicon (``sevsim.soc.turns``): a VMRUN runs
until its #VMEXIT or the end of its time slice, and turns are granted in arrival order.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevsim.host.vmm import Vmm
from sevsim.platform import wire
from sevsim.system import HostSystem

# What a VM process may ask of its VMM (QEMU's monitor and launch paths), and read.
VM_METHODS = frozenset(
    {
        "start", "restore", "cont", "stop", "quit", "wait_idle", "summary", "query_sev",
        "query_launch_measure", "query_capabilities", "inject_secret", "attestation_report",
        "human_monitor_command", "set_migration_parameters", "migrate", "query_migrate",
        "console_text", "guest_state",
        # a debugger's (vm run --gdb): host/debug.py
        "debug_serve", "debug_vcpus", "debug_attach", "debug_interrupt", "debug_wait", "debug_cont",
        "debug_step", "debug_registers", "debug_set_registers", "debug_read", "debug_write",
        "debug_breakpoint", "debug_detach",
    }
)  # fmt: skip
VM_ATTRIBUTES = frozenset({"status", "measurement", "guest_died", "migration"})
# The /dev/sev ioctls sevctl and 'sevsim platform' use.
SEV_IOCTLS = frozenset(
    {
        "platform_status", "factory_reset", "pek_gen", "pdh_gen", "pek_csr",
        "pek_cert_import", "pdh_cert_export", "get_id2",
    }
)  # fmt: skip


class ServiceError(RuntimeError):
    pass


@dataclass(eq=False)  # one per connection, kept in a set
class _Client:
    sock: socket.socket
    send_lock: threading.Lock
    vmm: Vmm | None = None
    incoming: socket.socket | None = None

    def send(self, message: Any) -> None:
        with self.send_lock:
            try:
                wire.send(self.sock, message)
            except OSError:
                pass  # the client is gone; its reader notices and tears down


class PlatformService:
    def __init__(self, system: HostSystem, state_dir: Path, exit_when_idle: float | None = None):
        self.system = system
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / wire.SOCKET_NAME
        self.exit_when_idle = exit_when_idle
        self.done = threading.Event()
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._idle_since = time.monotonic()
        # This process holds the state directory's lock: a socket file left here is a dead
        # service's.
        self.path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only the platform's owner connects
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(64)
        self._sock.settimeout(0.2)

    # ---- the accept loop --------------------------------------------------------------------
    def serve_forever(self) -> None:
        try:
            while not self.done.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    self._check_idle()
                    continue
                conn.settimeout(None)
                client = _Client(conn, threading.Lock())
                with self._lock:
                    self._clients.add(client)
                threading.Thread(
                    target=self._serve_client, args=(client,), name="platform-client", daemon=True
                ).start()
        finally:
            self.shutdown()

    def _check_idle(self) -> None:
        if self.exit_when_idle is None:
            return
        with self._lock:
            busy = bool(self._clients)
            if busy:
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since >= self.exit_when_idle:
                self.done.set()

    def shutdown(self) -> None:
        """Stop serving: every VM torn down as KVM does on close, the platform powered off
        (its firmware state is already sealed in the state directory's flash)."""
        self._sock.close()
        self.path.unlink(missing_ok=True)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            self._drop_vm(client)
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.system.close()

    # ---- one client -------------------------------------------------------------------------
    def _serve_client(self, client: _Client) -> None:
        try:
            while True:
                message = wire.recv(client.sock)
                threading.Thread(target=self._answer, args=(client, message), daemon=True).start()
        except (EOFError, OSError):
            pass
        finally:
            # The VM process closed its connection (quit, crash, SIGKILL): its guest goes.
            self._drop_vm(client)
            client.sock.close()
            with self._lock:
                self._clients.discard(client)
                self._idle_since = time.monotonic()

    def _drop_vm(self, client: _Client) -> None:
        if client.incoming is not None:
            client.incoming.close()
            client.incoming = None
        vmm = client.vmm
        if vmm is not None:  # (shutdown and the client's thread may both get here)
            vmm.quit()  # KVM's release of the VM's last fd: the guest goes (quit is idempotent)
            client.vmm = None

    def _answer(self, client: _Client, message: tuple) -> None:
        request_id, verb, args = message
        try:
            value = self._execute(client, verb, *args)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            client.send(("error", request_id, wire.describe_error(exc)))
        else:
            client.send(("return", request_id, value))

    def _execute(self, client: _Client, verb: str, *args: Any) -> Any:
        system = self.system
        if verb == "hello":
            nv_file = system.sev.init_ex_path
            return {
                "pid": os.getpid(),
                "profile": system.machine.profile.name,
                "nv_file": None if nv_file is None else str(nv_file),
            }
        if verb == "status":
            with self._lock:
                vms = [c.vmm for c in self._clients if c.vmm is not None]
            asids = system.kvm.asids
            return {
                "pid": os.getpid(),
                "vms": [
                    {"status": v.status, "asid": v.vm.asid if v.vm is not None else None}
                    for v in vms
                ],
                "asids_in_use": sorted(asids.used - asids.reclaim),
                "asids_to_reclaim": sorted(asids.reclaim),
                "host_free_bytes": system.kernel.free_bytes(),
                "dram_written_bytes": system.machine.dram.written_bytes,
            }
        if verb == "stop":
            self.done.set()
            return None
        if verb == "sev":
            name, call_args, kwargs = args
            if name not in SEV_IOCTLS:
                raise ServiceError(f"no such /dev/sev ioctl: {name}")
            return getattr(system.sev, name)(*call_args, **kwargs)
        if verb == "chip_id":
            return system.chip_id()
        if verb == "export_chain":
            (full,) = args
            return system.export_chain(full).encode(full)
        if verb == "vm.create":
            (config,) = args
            if client.vmm is not None:
                raise ServiceError("this connection already has a VM")
            with self._lock:
                taken = {c.vmm.config.name for c in self._clients if c.vmm is not None}
            if config.name is None:  # the first free of vm, vm-2, vm-3, ...
                names = itertools.chain(["vm"], (f"vm-{i}" for i in itertools.count(2)))
                config.name = next(n for n in names if n not in taken)
            elif config.name in taken:
                raise ServiceError(f"a VM named {config.name!r} already runs on this platform")
            if config.console is None:
                config.console = self.state_dir / f"{config.name}-console.log"
            vmm = Vmm(system, config)
            vmm.on_event = lambda name, data: client.send(("event", name, data))
            client.vmm = vmm
            return None
        vmm = client.vmm
        if vmm is None:
            raise ServiceError(f"{verb}: no VM on this connection")
        if verb == "vm.call":
            name, call_args, kwargs = args
            if name not in VM_METHODS:
                raise ServiceError(f"no such VMM request: {name}")
            return getattr(vmm, name)(*call_args, **kwargs)
        if verb == "vm.get":
            (name,) = args
            if name not in VM_ATTRIBUTES:
                raise ServiceError(f"no such VMM attribute: {name}")
            return getattr(vmm, name)
        if verb == "vm.listen_incoming":
            (where,) = args
            client.incoming = vmm.listen_incoming(where)
            return list(client.incoming.getsockname()[:2])  # the port, when 0 was asked
        if verb == "vm.serve_incoming":
            server, client.incoming = client.incoming, None
            if server is None:
                raise ServiceError("no incoming migration is being listened for")
            vmm.serve_incoming(server)
            return None
        raise ServiceError(f"unknown request {verb!r}")
