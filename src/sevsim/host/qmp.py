"""A QEMU Machine Protocol server for one VMM (QEMU docs/interop/qmp-spec.rst).

JSON objects over a Unix or TCP socket (addresses in QEMU's ``-qmp`` syntax,
``parse_qmp_address``): the server greets, the client negotiates with
``qmp_capabilities``, then sends ``{"execute": NAME, "arguments": {...}, "id": ...}``
and gets ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` (with the same
``id``); events (``RESUME``, ``STOP``, ``SHUTDOWN``) arrive as ``{"event": ...}`` with a
timestamp. The SEV commands and result shapes are QEMU's (qapi/misc-target.json). One
client at a time, as on a QEMU monitor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


class QmpAddressError(ValueError):
    """A ``--qmp`` address sevsim cannot serve on; one line, for a usage error."""


@dataclass(frozen=True)
class QmpAddress:
    """Where a QMP server listens (or a client connects): a Unix socket ``path``, or TCP
    ``host`` and ``port``. ``server`` is always True (sevsim only listens); ``wait`` makes
    the server take its first client before the VM goes on, as QEMU's ``wait=on``."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None
    server: bool = True
    wait: bool = False

    @property
    def kind(self) -> str:
        return "unix" if self.path is not None else "tcp"

    def __str__(self) -> str:
        if self.path is not None:
            return "unix:" + str(self.path).replace(",", ",,")  # parses back to the same
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host or ""
        return f"tcp:{host}:{self.port}"


_TRUE = {"on", "yes", "true", "y"}  # the spellings QEMU's option parser takes
_FALSE = {"off", "no", "false", "n"}


def parse_qmp_address(spec: str) -> QmpAddress:
    """QEMU's ``-qmp`` socket syntax: ``unix:PATH[,server=on|off][,wait=on|off]`` or
    ``tcp:[HOST]:PORT[,...]`` (``[V6ADDR]`` in brackets; an empty HOST is every
    interface, port 0 lets the kernel pick). The short forms ``server``, ``nowait`` of old
    QEMU command lines are taken too, and ``,,`` is a comma inside the path. A bare path
    (no ``unix:``) is a Unix socket, as sevsim has always taken it.

    QEMU's defaults differ where sevsim can only be a server: with no ``server=`` QEMU
    would connect out as a client; sevsim listens, and does not wait (as before). With an
    explicit ``server=on`` the QEMU default ``wait=on`` applies. Anything sevsim does not
    offer raises QmpAddressError, a one-line ValueError."""
    if not spec:
        raise QmpAddressError("an empty QMP address: give unix:PATH or tcp:HOST:PORT")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", spec)
    if scheme is not None and scheme[1] not in ("unix", "tcp"):
        raise QmpAddressError(
            f"QMP address {spec!r}: '{scheme[1]}:' is not offered; "
            "sevsim serves QMP on unix:PATH or tcp:HOST:PORT"
        )
    if scheme is not None and scheme[1] == "tcp":
        hostport, _, options = spec[len("tcp:") :].partition(",")
        host, port = _host_port(spec, hostport)
        address = QmpAddress(host=host, port=port)
        parts = _split_options(options) if options else []
    else:
        rest = spec[len("unix:") :] if scheme is not None else spec
        path, *parts = _split_options(rest)
        if not path:
            raise QmpAddressError(f"QMP address {spec!r}: a Unix socket needs a path")
        address = QmpAddress(path=Path(path))
    flags: dict[str, bool] = {}
    for part in parts:
        name, value = _flag(spec, part)
        flags[name] = value  # the last one wins, as in QEMU
    if flags.get("server") is False:
        raise QmpAddressError(
            f"QMP address {spec!r}: server=off (connect out to a QMP client) is not "
            "offered; sevsim's QMP is always a listening server socket"
        )
    wait = flags.get("wait", "server" in flags)  # QEMU: a server waits unless wait=off
    return dataclasses.replace(address, wait=wait)


def _split_options(text: str) -> list[str]:
    """Split at commas; ``,,`` stands for one comma (QEMU's option syntax)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def _host_port(spec: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise QmpAddressError(f"QMP address {spec!r}: expected tcp:[IPV6]:PORT")
        port = port[1:]
    else:
        host, colon, port = text.partition(":")
        if not colon:
            raise QmpAddressError(f"QMP address {spec!r}: tcp:HOST:PORT needs a port")
        if ":" in port:
            raise QmpAddressError(
                f"QMP address {spec!r}: an IPv6 host goes in brackets, tcp:[::1]:PORT"
            )
    if not port:
        raise QmpAddressError(f"QMP address {spec!r}: tcp:HOST:PORT needs a port")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise QmpAddressError(f"QMP address {spec!r}: port {port!r} is not 0..65535")
    if any(c.isspace() for c in host):
        raise QmpAddressError(f"QMP address {spec!r}: bad host {host!r}")
    return host, int(port)


def _flag(spec: str, part: str) -> tuple[str, bool]:
    name, eq, value = part.partition("=")
    if not eq:  # QEMU's short form: "server" is server=on, "nowait" is wait=off
        name, value = (name[2:], "off") if name.startswith("no") else (name, "on")
    if name not in ("server", "wait"):
        raise QmpAddressError(
            f"QMP address {spec!r}: option {part!r} is not offered "
            "(sevsim's QMP socket takes server=on and wait=on|off)"
        )
    if value not in _TRUE | _FALSE:
        raise QmpAddressError(f"QMP address {spec!r}: {name}={value!r}: expected on or off")
    return name, value in _TRUE


def socket_path(spec: str) -> Path:
    """The Unix socket path of ``spec`` (kept for callers that only take Unix sockets)."""
    address = parse_qmp_address(spec)
    if address.path is None:
        raise QmpAddressError(f"QMP address {spec!r}: a Unix socket is needed here")
    return address.path


def _as_address(address: QmpAddress | Path | str) -> QmpAddress:
    if isinstance(address, QmpAddress):
        return address
    if isinstance(address, Path):
        return QmpAddress(path=address)
    return parse_qmp_address(address)


class QmpServer:
    """Listens on ``address`` (a QmpAddress, a Unix socket Path, or a ``--qmp`` string).
    A Unix socket file is replaced if present, made mode 0600 and removed when serving
    ends; a TCP socket is bound with SO_REUSEADDR, port 0 taking a free port.
    ``self.address`` is where it listens (the real port). With ``wait`` the constructor
    returns only once the first client has connected, after calling ``on_wait(address)``
    (QEMU prints "waiting for connection" there). Binding failures raise OSError."""

    def __init__(
        self,
        vmm: Vmm,
        address: QmpAddress | Path | str,
        on_wait: Callable[[QmpAddress], None] | None = None,
    ) -> None:
        self.vmm = vmm
        address = _as_address(address)
        self.path: Path | None = address.path
        if address.path is not None:
            if self.path.exists() or self.path.is_symlink():
                self.path.unlink()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.bind(str(self.path))
                os.chmod(self.path, 0o600)
            except OSError:
                self.sock.close()
                raise
        else:
            self.sock = _bind_tcp(address.host or "", address.port or 0)
            host, port = self.sock.getsockname()[:2]
            address = dataclasses.replace(address, host=host, port=port)
        self.address = address
        self.sock.listen(1)
        self.done = threading.Event()
        self._conn: socket.socket | None = None
        self._pending: socket.socket | None = None
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

        if address.wait:
            try:
                if on_wait is not None:
                    on_wait(address)
                self._pending, _ = self.sock.accept()
            except BaseException:  # ^C while waiting: leave no socket file behind
                self.sock.close()
                if self.path is not None:
                    self.path.unlink(missing_ok=True)
                raise

    # ---- serving ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept clients one after another until ``quit`` (first the one ``wait`` took)."""
        self.sock.settimeout(0.2)
        try:
            while not self.done.is_set():
                if self._pending is not None:
                    conn, self._pending = self._pending, None
                else:
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
            if self._pending is not None:
                self._pending.close()
            if self.path is not None:
                self.path.unlink(missing_ok=True)

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


def _bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to the first address HOST resolves to ("" = every interface)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


class QmpClient:
    """A minimal QMP client: connect, negotiate, execute; events are kept aside."""

    def __init__(self, address: QmpAddress | Path | str, timeout: float = 30.0) -> None:
        """Connects to a QmpAddress, a Unix socket Path or a ``--qmp`` string (its
        server/wait flags are ignored). QmpAddressError for an address no server can
        have (TCP port 0); OSError when nothing answers there."""
        address = _as_address(address)
        if address.path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(address.path))
            except OSError:
                self.sock.close()
                raise
        else:
            if not address.port:
                raise QmpAddressError(
                    f"QMP address '{address}': port 0 is for a server; give the port it printed"
                )
            self.sock = socket.create_connection(
                (address.host or "localhost", address.port), timeout=timeout
            )
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.events: list[dict[str, Any]] = []
        self.received: list[str] = []  # the raw traffic, for leak scans
        try:
            self.greeting = self._next()
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()  # not a QMP server, or it went away: do not keep the socket
            raise

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
