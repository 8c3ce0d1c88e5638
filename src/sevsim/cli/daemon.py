"""Detaching from the terminal (QEMU's -daemonize): the parent returns once the child says
it is ready, or prints the child's error and fails."""

from __future__ import annotations

import os
from pathlib import Path

from sevsim.fsutil import atomic_write

_ready_fd: int | None = None


def daemonize(pidfile: Path | None, log: Path | None = None) -> None:
    """Fork; the parent waits for ``signal_ready`` (exit 0) or ``signal_failure`` (its
    message on stderr, exit 1). The child's output goes to ``log`` (or nowhere)."""
    global _ready_fd
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        answer = b"".join(chunks)
        if answer[:1] in (b"1", b"2"):  # ready; the message goes to stderr (1) or stdout (2)
            if answer[1:]:
                os.write(int(answer[:1]) % 2 + 1, answer[1:] + b"\n")
            os._exit(0)
        message = answer[1:].decode(errors="replace").strip()
        os.write(2, (message or "the daemon exited before it was ready").encode() + b"\n")
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    out = os.open(log if log is not None else os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    _ready_fd = write_fd
    if pidfile:
        atomic_write(pidfile, f"{os.getpid()}\n".encode(), 0o644)


def signal_ready(message: str = "", stdout: bool = False) -> None:
    """The daemon is ready; the parent prints ``message`` (e.g. where it listens) on stderr,
    or on stdout (output a script reads)."""
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, (b"2" if stdout else b"1") + message.encode())
        os.close(_ready_fd)
        _ready_fd = None


def signal_failure(message: str) -> None:
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, b"0" + message.encode())
        os.close(_ready_fd)
        _ready_fd = None
