"""A QEMU Machine Protocol server for one VMM (QEMU docs/interop/qmp-spec.rst).

JSON objects over a Unix socket: the server greets, the client negotiates with
``qmp_capabilities``, then sends ``{"execute": NAME, "arguments": {...}, "id": ...}``
and gets ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` (with the same
``id``); events (``RESUME``, ``STOP``, ``SHUTDOWN``) arrive as ``{"event": ...}`` with a
timestamp. The SEV commands and result shapes are QEMU's (qapi/misc-target.json). One
client at a time, as on a QEMU monitor.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sevsim import __version__
from sevsim.host.vmm import Vmm, VmmError

QEMU_VERSION = {"major": 8, "minor": 2, "micro": 0}  # the QMP dialect we speak
ARGUMENTS = {  # what each command accepts; any other argument is an error, as in QEMU
    "qmp_capabilities": {"enable"},
    "query-sev-attestation-report": {"mnonce"},
    "sev-inject-launch-secret": {"packet-header", "secret", "gpa"},
    "migrate-set-parameters": {"sev-pdh", "sev-plat-cert", "sev-amd-cert"},
    "migrate": {"uri"},
    "human-monitor-command": {"command-line", "cpu-index"},
}


class QmpError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class


def socket_path(spec: str) -> Path:
    """QEMU's ``unix:PATH[,server=on][,wait=off]`` (or a bare path)."""
    if spec.startswith("unix:"):
        spec = spec[len("unix:") :]
    path = spec.split(",", 1)[0]
    if not path:
        raise ValueError("a QMP socket needs a path: unix:/path/to/qmp.sock")
    return Path(path)


class QmpServer:
    def __init__(self, vmm: Vmm, path: Path) -> None:
        self.vmm = vmm
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(1)
        self.done = threading.Event()
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self.transcript: list[bytes] = []  # everything sent, for leak scans in tests
        vmm.on_event = self.event
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": lambda a: {},
            "query-version": lambda a: {"qemu": QEMU_VERSION, "package": f"sevsim {__version__}"},
            "query-commands": lambda a: [{"name": n} for n in sorted(self.commands)],
            "query-status": self._query_status,
            "query-sev": lambda a: vmm.query_sev(),
            "query-sev-launch-measure": lambda a: vmm.query_launch_measure(),
            "query-sev-capabilities": lambda a: vmm.query_capabilities(),
            "query-sev-attestation-report": lambda a: vmm.attestation_report(
                _arg(a, "mnonce", str)
            ),
            "sev-inject-launch-secret": lambda a: (
                vmm.inject_secret(
                    _arg(a, "packet-header", str),
                    _arg(a, "secret", str),
                    _arg(a, "gpa", int, required=False),
                )
                or {}
            ),
            "migrate-set-parameters": lambda a: (
                vmm.set_migration_parameters(
                    _arg(a, "sev-pdh", str),
                    _arg(a, "sev-plat-cert", str),
                    _arg(a, "sev-amd-cert", str, required=False) or "",
                )
                or {}
            ),
            "migrate": lambda a: vmm.migrate(_arg(a, "uri", str)) or {},
            "query-migrate": lambda a: vmm.query_migrate(),
            "human-monitor-command": lambda a: vmm.human_monitor_command(
                _arg(a, "command-line", str), _arg(a, "cpu-index", int, required=False)
            ),
            "cont": lambda a: vmm.cont() or {},
            "stop": lambda a: vmm.stop() or {},
            "quit": self._quit,
        }

    # ---- serving ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept clients one after another until ``quit``."""
        self.sock.settimeout(0.2)
        try:
            while not self.done.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    self._conn = conn
                    self._serve(conn)
                    self._conn = None
        finally:
            self.sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        self._send({"QMP": {"version": {"qemu": QEMU_VERSION, "package": ""}, "capabilities": []}})
        negotiated = False
        decoder = json.JSONDecoder()
        buffer = ""
        while not self.done.is_set():
            data = conn.recv(65536)
            if not data:
                return
            buffer += data.decode("utf-8", "replace")
            while True:
                buffer = buffer.lstrip()
                if not buffer:
                    break
                try:
                    request, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError:
                    if len(buffer) > 1 << 20:
                        self._send(_error("JSON parse error", None))
                        buffer = ""
                    break  # wait for the rest of the object
                buffer = buffer[end:]
                negotiated = self._dispatch(request, negotiated)
                if self.done.is_set():
                    return

    def _dispatch(self, request: Any, negotiated: bool) -> bool:
        request_id = request.get("id") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            self._send(_error("QMP input must be a JSON object with 'execute'", request_id))
            return negotiated
        name = request["execute"]
        arguments = request.get("arguments", {})
        if not negotiated and name != "qmp_capabilities":
            self._send(
                _error(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                    request_id,
                    "CommandNotFound",
                )
            )
            return False
        handler = self.commands.get(name)
        if handler is None:
            desc = f"The command {name} has not been found"
            self._send(_error(desc, request_id, "CommandNotFound"))
            return negotiated
        try:
            if not isinstance(arguments, dict):
                raise QmpError("'arguments' must be a JSON object")
            unexpected = sorted(set(arguments) - ARGUMENTS.get(name, set()))
            if unexpected:
                raise QmpError(f"Parameter '{unexpected[0]}' is unexpected")
            result = handler(arguments)
        except QmpError as exc:
            self._send(_error(str(exc), request_id, exc.error_class))
            return negotiated or name == "qmp_capabilities"
        except VmmError as exc:
            self._send(_error(str(exc), request_id))
            return negotiated or name == "qmp_capabilities"
        reply: dict[str, Any] = {"return": result}
        if request_id is not None:
            reply["id"] = request_id
        self._send(reply)
        if name == "quit":
            self.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            self.done.set()
        return True

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\r\n"
        with self._send_lock:
            self.transcript.append(data)
            if self._conn is not None:
                try:
                    self._conn.sendall(data)
                except OSError:
                    pass

    def event(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        self._send({"event": name, "data": data, "timestamp": stamp})

    # ---- commands -------------------------------------------------------------------------
    def _query_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        status = self.vmm.status
        return {"running": status == "running", "singlestep": False, "status": status}

    def _quit(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.vmm.quit()
        return {}


def _arg(args: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    if name not in args:
        if required:
            raise QmpError(f"Parameter '{name}' is missing")
        return None
    value = args[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise QmpError(f"Invalid parameter type for '{name}', expected: integer")
    if kind is str and not isinstance(value, str):
        raise QmpError(f"Invalid parameter type for '{name}', expected: string")
    return value


def _error(desc: str, request_id: Any, error_class: str = "GenericError") -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if request_id is not None:
        reply["id"] = request_id
    return reply


class QmpClient:
    """A minimal QMP client: connect, negotiate, execute; events are kept aside."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.events: list[dict[str, Any]] = []
        self.received: list[str] = []  # the raw traffic, for leak scans
        self.greeting = self._next()
        self.execute("qmp_capabilities")

    def _next(self) -> dict[str, Any]:
        while True:
            self._buffer = self._buffer.lstrip()
            if self._buffer:
                try:
                    message, end = self._decoder.raw_decode(self._buffer)
                    self.received.append(self._buffer[:end])
                    self._buffer = self._buffer[end:]
                    return message
                except json.JSONDecodeError:
                    pass
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the QMP server closed the connection")
            self._buffer += data.decode()

    def execute(self, name: str, **arguments: Any) -> Any:
        """The command's return value; a QMP error raises QmpError with its class."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        while True:
            message = self._next()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QmpError(message["error"]["desc"], message["error"]["class"])
            return message["return"]

    def close(self) -> None:
        self.sock.close()
