"""The platform service's wire: length-prefixed pickled messages on a Unix socket.

The socket is mode 0600 in the state directory: only the platform's owner (the user who
runs the VMs, as with /dev/kvm and /dev/sev) can connect, and it could run any code as
that user anyway, so pickle is no new power. Frames are an 8-byte little-endian length
and the pickled message.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any

SOCKET_NAME = "platform.sock"
PIDFILE_NAME = "platform.pid"
LOG_NAME = "platform.log"


def send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(len(data).to_bytes(8, "little") + data)


def _exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the connection")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def recv(sock: socket.socket) -> Any:
    n = int.from_bytes(_exactly(sock, 8), "little")
    return pickle.loads(_exactly(sock, n))


def describe_error(exc: BaseException) -> tuple[str, str, str, dict[str, Any]]:
    """An exception as (module, class name, message, attributes), to raise again on the
    other side; attributes that do not pickle are left out."""
    cls = type(exc)
    attrs = {}
    for key, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - anything that does not travel stays behind
            continue
        attrs[key] = value
    return cls.__module__, cls.__qualname__, str(exc), attrs


def rebuild_error(module: str, name: str, message: str, attrs: dict[str, Any]) -> Exception:
    """The same exception class with the same message and attributes when it can be found
    (so callers' ``except KvmError`` still works), else a RuntimeError with the message."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        exc = cls.__new__(cls)
        exc.args = (message,)
        exc.__dict__.update(attrs)
        return exc
    return RuntimeError(message)
