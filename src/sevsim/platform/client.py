"""A client of the platform service: what a VM process or a 'sevsim platform' command
holds instead of a platform of its own (``service.py`` says who does what)."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sevsim.certs.chain import SevChain, decode_chain
from sevsim.platform import PlatformMismatch, wire
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem


class ServiceLost(RuntimeError):
    """The platform service went away (stopped, crashed or killed)."""


class ServiceUnavailable(RuntimeError):
    """No platform service could be reached or started."""


class ServiceClient:
    def __init__(self, sock: socket.socket, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, list[Any]] = {}  # id -> [event, reply]
        self._pending_lock = threading.Lock()
        self.lost = False
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self._reader = threading.Thread(target=self._read, name="platform-service", daemon=True)
        self._reader.start()
        self.hello = self.request("hello")

    @classmethod
    def connect(cls, state_dir: Path) -> ServiceClient | None:
        """The service of this state directory, or None when none runs."""
        path = Path(state_dir) / wire.SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        return cls(sock, Path(state_dir))

    def _read(self) -> None:
        try:
            while True:
                kind, *rest = wire.recv(self._sock)
                if kind == "event":
                    if self.on_event is not None:
                        self.on_event(*rest)
                    continue
                request_id, value = rest
                with self._pending_lock:
                    slot = self._pending.pop(request_id, None)
                if slot is not None:
                    slot[1] = (kind, value)
                    slot[0].set()
        except (EOFError, OSError):
            pass
        with self._pending_lock:  # with request()'s registration: no request is missed
            self.lost = True
            waiting, self._pending = list(self._pending.values()), {}
        for slot in waiting:
            slot[0].set()
        if self.on_lost is not None:
            self.on_lost()

    def request(self, verb: str, *args: Any) -> Any:
        request_id = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        with self._pending_lock:
            if self.lost:
                raise ServiceLost(f"the platform service of {self.state_dir} has gone")
            self._pending[request_id] = slot
        try:
            with self._send_lock:
                wire.send(self._sock, (request_id, verb, args))
        except OSError:
            pass  # the reader sees the connection close and wakes this request
        slot[0].wait()
        if slot[1] is None:
            raise ServiceLost(f"the platform service of {self.state_dir} has gone")
        kind, value = slot[1]
        if kind == "error":
            raise wire.rebuild_error(*value)
        return value

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def attach(
    state_dir: Path, profile: MachineProfile, nv_file: Path | None = None, timeout: float = 60.0
) -> ServiceClient:
    """The running service of ``state_dir``, started in the background when none runs
    (it then exits by itself once no client has been connected for a few seconds)."""
    state_dir = Path(state_dir)
    client = ServiceClient.connect(state_dir)
    if client is None:
        _start_service(state_dir, profile, nv_file, timeout)
        deadline = time.monotonic() + timeout
        while (client := ServiceClient.connect(state_dir)) is None:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the platform service of {state_dir} did not start")
            time.sleep(0.05)
    served = client.hello["profile"]
    if served != profile.name:
        client.close()
        raise PlatformMismatch(f"{state_dir} holds a {served} platform, not {profile.name}")
    if nv_file is not None and client.hello["nv_file"] != str(Path(nv_file).resolve()):
        client.close()
        raise ServiceUnavailable(
            f"the platform service of {state_dir} runs with --nv-file "
            f"{client.hello['nv_file']}, not {nv_file}"
        )
    return client


IDLE_EXIT_SECONDS = 3.0


def _start_service(
    state_dir: Path, profile: MachineProfile, nv_file: Path | None, timeout: float
) -> None:
    command = [
        sys.executable, "-m", "sevsim", "platform", "serve", "--daemonize",
        "--state", str(state_dir), "--profile", profile.name,
        "--exit-when-idle", str(IDLE_EXIT_SECONDS),
    ]  # fmt: skip
    if nv_file is not None:
        command += ["--nv-file", str(Path(nv_file).resolve())]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(
            f"the platform service of {state_dir} did not come up in {timeout:.0f} s "
            f"(see {state_dir / wire.LOG_NAME})"
        ) from None
    if result.returncode != 0 and ServiceClient.connect(state_dir) is None:
        # (Another process may have started the service first: then this one lost the race.)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        if "already" in reason or "in use" in reason:
            return  # the other one is starting; the caller waits for its socket
        raise ServiceUnavailable(f"could not start the platform service: {reason}")


class RemoteSev:
    """/dev/sev's ioctls, issued by the service's host kernel."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client
        self.init_ex_path = client.hello["nv_file"]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: self._client.request("sev", name, args, kwargs)


class RemoteSystem:
    """What 'sevsim platform' commands use of a HostSystem, through the service."""

    check = HostSystem.check

    def __init__(self, client: ServiceClient) -> None:
        self._client = client
        self.sev = RemoteSev(client)

    def chip_id(self) -> bytes:
        return self._client.request("chip_id")

    def service(self) -> dict[str, Any]:
        """The service's pid, its VMs and KVM's ASIDs."""
        return self._client.request("status")

    def export_chain(self, full: bool = False) -> SevChain:
        return decode_chain(self._client.request("export_chain", full))


class RemoteVmm:
    """A VM process's handle on its VMM in the service: the calls QMP and 'vm run' make."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        client.on_event = lambda name, data: self.on_event and self.on_event(name, data)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._client.request("vm.call", name, args, kwargs)

    def _get(self, name: str) -> Any:
        return self._client.request("vm.get", name)

    status = property(lambda self: self._get("status"))
    measurement = property(lambda self: self._get("measurement"))
    guest_died = property(lambda self: self._get("guest_died"))
    migration = property(lambda self: self._get("migration"))

    def listen_incoming(self, where: str) -> tuple[str, int]:
        """Bind ``HOST:PORT`` in the service; the address bound (``PORT`` may be 0)."""
        host, port = self._client.request("vm.listen_incoming", where)
        return host, port

    def serve_incoming(self) -> None:
        self._client.request("vm.serve_incoming")
