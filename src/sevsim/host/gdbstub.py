"""A GDB remote stub for a VM's vCPUs, as QEMU's ``-gdb`` (gdbstub/gdbstub.c; the
protocol is GDB's "Remote Serial Protocol", gdb/doc/gdb.texinfo, "Remote Protocol").

Packets are ``$payload#cc`` (``cc``: the payload's byte sum modulo 256, two hex digits),
acknowledged with ``+`` (or ``-``: send it again); ``}`` escapes ``#``, ``$``, ``}`` and ``*``
in binary data (the byte XOR 0x20); a lone 0x03 byte is Ctrl-C. Each vCPU is a thread
(id = index + 1, as in QEMU). The stub runs in the VM process and asks the VMM for
everything (``Vmm.debug_*``, ``host/debug.py``): registers from the VMCB and KVM, memory
as the guest sees it through DBG_DECRYPT/DBG_ENCRYPT, breakpoints and steps through
KVM's guest debugging. One debugger at a time.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from sevsim.host.debug import DebugError

PACKET_SIZE = 0x4000  # what qSupported offers: GDB's packets (and 'g' replies) fit in it
INTERRUPT = 0x03
WAIT_SLICE = 0.1  # seconds between looks at the socket while the guest runs

# The x86-64 target description: GDB's amd64 layout (gdb/features/i386/64bit-core.xml and
# 64bit-sse.xml, also QEMU's gdb-xml/i386-64bit*.xml), then fs_base/gs_base and the
# control registers. (name, bits, type, available): the x87 and SSE registers are
# reported unavailable ('xx'): the model's KVM does not keep the guest's FPU state.
_CORE = (
    [(n, 64, "int64") for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")]
    + [("rbp", 64, "data_ptr"), ("rsp", 64, "data_ptr")]
    + [(f"r{i}", 64, "int64") for i in range(8, 16)]
    + [("rip", 64, "code_ptr"), ("eflags", 32, "i386_eflags")]
    + [(s, 32, "int32") for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(f"st{i}", 80, "i387_ext") for i in range(8)]
    + [
        (n, 32, "int")
        for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
    ]
)
_SSE = [(f"xmm{i}", 128, "vec128") for i in range(16)] + [("mxcsr", 32, "i386_mxcsr")]
_SEGMENTS = [("fs_base", 64, "int64"), ("gs_base", 64, "int64")]
_SYS = [(n, 64, "int64") for n in ("cr0", "cr2", "cr3", "cr4", "efer")]
FEATURES = (
    ("org.gnu.gdb.i386.core", _CORE),
    ("org.gnu.gdb.i386.sse", _SSE),
    ("org.gnu.gdb.i386.segments", _SEGMENTS),
    ("org.gnu.gdb.i386.sys", _SYS),  # the name OpenOCD gives x86 control registers
)
REGISTERS = [(name, bits // 8) for _, regs in FEATURES for name, bits, _ in regs]
UNAVAILABLE = {n for n, _, t in _CORE + _SSE if t in ("i387_ext", "int", "vec128", "i386_mxcsr")}


def _fields(bits: tuple[tuple[str, int], ...]) -> str:
    return "".join(f'<field name="{name}" start="{bit}" end="{bit}"/>' for name, bit in bits)


def _target_xml() -> str:
    eflags = _fields((
        ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
        ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
        ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21),
    ))  # fmt: skip
    mxcsr = _fields((
        ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
        ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
    ))  # fmt: skip
    types = {
        "org.gnu.gdb.i386.core": f'<flags id="i386_eflags" size="4">{eflags}</flags>',
        "org.gnu.gdb.i386.sse": (
            '<vector id="v4f" type="ieee_single" count="4"/>'
            '<vector id="v2d" type="ieee_double" count="2"/>'
            '<vector id="v16i8" type="int8" count="16"/>'
            '<vector id="v8i16" type="int16" count="8"/>'
            '<vector id="v4i32" type="int32" count="4"/>'
            '<vector id="v2i64" type="int64" count="2"/>'
            '<union id="vec128"><field name="v4_float" type="v4f"/>'
            '<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>'
            '<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>'
            '<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/>'
            f'</union><flags id="i386_mxcsr" size="4">{mxcsr}</flags>'
        ),
    }
    parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>']
    parts.append("<architecture>i386:x86-64</architecture>")
    for feature, regs in FEATURES:
        parts.append(f'<feature name="{feature}">{types.get(feature, "")}')
        parts += [f'<reg name="{n}" bitsize="{b}" type="{t}"/>' for n, b, t in regs]
        parts.append("</feature>")
    parts.append("</target>")
    return "".join(parts)


TARGET_XML = _target_xml().encode()


# ---- the packet layer ----------------------------------------------------------------------
def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    """Binary data in a packet: '#', '$', '}' and '*' become '}' and the byte XOR 0x20."""
    out = bytearray()
    for byte in data:
        if byte in b"#$}*":
            out += bytes([0x7D, byte ^ 0x20])
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for byte in it:
        if byte == 0x7D:
            byte = next(it, 0x20) ^ 0x20
        out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


class PacketReader:
    """Splits what the debugger sends into events: ('packet', payload) for a packet whose
    checksum is right, ('bad', payload) for one whose checksum is wrong, ('ack', b'+'),
    ('nak', b'-') and ('interrupt', b'\\x03')."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._buffer += data
        events: list[tuple[str, bytes]] = []
        buf = self._buffer
        while buf:
            first = buf[0]
            if first == ord("$"):
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    break  # the rest is still on its way
                payload = bytes(buf[1:end])
                try:
                    good = int(buf[end + 1 : end + 3], 16) == checksum(payload)
                except ValueError:
                    good = False
                events.append(("packet" if good else "bad", payload))
                del buf[: end + 3]
                continue
            if first == ord("+"):
                events.append(("ack", b"+"))
            elif first == ord("-"):
                events.append(("nak", b"-"))
            elif first == INTERRUPT:
                events.append(("interrupt", b"\x03"))
            del buf[:1]  # anything else between packets is noise
        return events


# ---- addresses -----------------------------------------------------------------------------
class GdbAddressError(ValueError):
    """A --gdb address sevsim cannot serve on; one line, for a usage error."""


def parse_gdb_address(spec: str) -> tuple[str, int]:
    """QEMU's ``-gdb tcp::PORT`` or ``tcp:HOST:PORT`` (``[V6ADDR]`` in brackets; an empty
    HOST is every interface, port 0 a free one). Returns (host, port)."""
    if not spec.startswith("tcp:"):
        raise GdbAddressError(f"--gdb {spec!r}: sevsim serves GDB on tcp:[HOST]:PORT")
    text = spec[len("tcp:") :]
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise GdbAddressError(f"--gdb {spec!r}: expected tcp:[HOST]:PORT with a port 0..65535")
    return host, int(port)


# ---- the server --------------------------------------------------------------------------
class GdbServer:
    """Listens on (host, port) and serves one debugger at a time until ``close``.
    ``target`` is a VMM (or its remote handle) with the ``debug_*`` methods. ``on_kill``
    runs when the debugger kills the VM ('k'); ``log`` gets one-line notices (a refused
    memory access, say) for the VM's stderr."""

    def __init__(
        self,
        target: Any,
        host: str,
        port: int,
        on_kill: Callable[[], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.target = target
        self.on_kill = on_kill
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.sock = socket.create_server((host, port))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.connected = threading.Event()  # a debugger is attached now
        self.ever_connected = threading.Event()
        self.killed = False
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="gdbstub", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.sock.settimeout(0.2)
        try:
            while not self.done.is_set():
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed
                with conn:
                    self.connected.set()
                    self.ever_connected.set()
                    try:
                        GdbSession(self, conn).serve()
                    finally:
                        self.connected.clear()
        finally:
            self.sock.close()

    def close(self) -> None:
        self.done.set()
        self.sock.close()


class GdbSession:
    """One debugger's connection: the packets and what each one does."""

    def __init__(self, server: GdbServer, conn: socket.socket) -> None:
        self.server = server
        self.target = server.target
        self.conn = conn
        self.reader = PacketReader()
        self.events: list[tuple[str, bytes]] = []
        self.last_sent = b""
        self.g_cpu = 0  # Hg: the vCPU registers and memory are read on
        self.c_cpu = 0  # Hc: the vCPU to step
        self.last_stop: dict[str, Any] = {"cpu": 0, "signal": 5, "reason": "attach"}
        self.closed = False
        self.ended = False  # the debugger detached ('D') or killed the VM ('k')
        self._logged: set[str] = set()

    # ---- the wire ------------------------------------------------------------------------
    def _recv(self, timeout: float | None) -> bool:
        """Read what has arrived into the event queue; False once the connection is gone."""
        if timeout is not None and not select.select([self.conn], [], [], timeout)[0]:
            return True
        try:
            data = self.conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.events += self.reader.feed(data)
        return True

    def _send_raw(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            self.closed = True

    def send(self, payload: bytes) -> None:
        self.last_sent = frame(payload)
        self._send_raw(self.last_sent)

    def next_packet(self) -> bytes | None:
        """The next good packet (acknowledged), or None when the connection closed."""
        while True:
            while self.events:
                kind, payload = self.events.pop(0)
                if kind == "packet":
                    self._send_raw(b"+")
                    return payload
                if kind == "bad":
                    self._send_raw(b"-")  # send it again, please
                elif kind == "nak" and self.last_sent:
                    self._send_raw(self.last_sent)
                # (a Ctrl-C while the guest is stopped already asks for nothing)
            if self.closed or not self._recv(None):
                return None

    # ---- serving -------------------------------------------------------------------------
    def serve(self) -> None:
        self.last_stop = self.target.debug_attach()
        self.g_cpu = self.c_cpu = self.last_stop["cpu"]
        while not self.closed:
            payload = self.next_packet()
            if payload is None:
                break
            reply = self.handle(payload)
            if reply is not None:
                self.send(reply)
        if not self.ended:
            self._detach()  # the debugger went away: as after 'D', the guest runs on

    def _note(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            self.server.log(f"sevsim vm: gdb: {text}")

    def _error(self, exc: Exception, code: bytes = b"E01") -> bytes:
        self._note(str(exc))
        return code

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet (None: the reply was sent already, or there is none)."""
        text = payload.decode("latin-1")
        command = text[:1]
        try:
            if text.startswith("qSupported"):
                return (
                    f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "vContSupported+"
                ).encode()
            if text.startswith("qXfer:features:read:"):
                return self._xfer(text[len("qXfer:features:read:") :])
            if text == "?":
                return self._stop_reply(self.last_stop)
            if command == "g":
                return self._read_registers()
            if command == "G":
                return self._write_registers(bytes.fromhex(text[1:]))
            if command == "p":
                return self._read_register(int(text[1:], 16))
            if command == "P":
                number, _, value = text[1:].partition("=")
                return self._write_register(int(number, 16), bytes.fromhex(value))
            if command == "m":
                addr, _, length = text[1:].partition(",")
                data = self.target.debug_read(self.g_cpu, int(addr, 16), int(length, 16))
                return data.hex().encode()
            if command in ("M", "X"):
                head, _, body = payload[1:].partition(b":")
                addr, _, _length = head.decode().partition(",")
                data = bytes.fromhex(body.decode()) if command == "M" else unescape(body)
                if data:
                    self.target.debug_write(self.g_cpu, int(addr, 16), data)
                return b"OK"
            if command in ("Z", "z") and text[1:2] in ("0", "1"):
                _, addr, _kind = text[1:].split(",", 2)
                kind = "sw" if text[1] == "0" else "hw"
                self.target.debug_breakpoint(kind, self.g_cpu, int(addr, 16), command == "Z")
                return b"OK"
            if command in ("Z", "z"):
                return b""  # watchpoints are not offered
            if command in ("c", "C", "s", "S"):
                if command in ("c", "s") and len(text) > 1:  # resume at ADDR
                    self.target.debug_set_registers(self.c_cpu, {"rip": int(text[1:], 16)})
                if command in ("s", "S"):
                    return self._stopped(self.target.debug_step(self.c_cpu))
                return self._continue()
            if text == "vCont?":
                return b"vCont;c;C;s;S"
            if text.startswith("vCont;"):
                return self._vcont(text[len("vCont;") :])
            if command == "H" and len(text) > 2:
                thread = int(text[2:], 16)
                if thread > 0:
                    self._vcpu_of(thread)
                if text[1] == "g":
                    self.g_cpu = thread - 1 if thread > 0 else self.g_cpu
                else:
                    self.c_cpu = thread - 1 if thread > 0 else self.c_cpu
                return b"OK"
            if command == "T":
                self._vcpu_of(int(text[1:], 16))
                return b"OK"
            if text == "qfThreadInfo":
                count = self.target.debug_vcpus()
                return b"m" + ",".join(f"{i + 1:x}" for i in range(count)).encode()
            if text == "qsThreadInfo":
                return b"l"
            if text == "qC":
                return f"QC{self.g_cpu + 1:x}".encode()
            if text.startswith("qThreadExtraInfo,"):
                cpu = self._vcpu_of(int(text.split(",")[1], 16))
                return f"vCPU {cpu}".encode().hex().encode()
            if text.startswith("qAttached"):
                return b"1"  # an existing VM: GDB detaches on quit, the guest runs on
            if command == "D":
                self._detach()
                self.send(b"OK")
                self.closed = self.ended = True
                return None
            if command == "k" or text.startswith("vKill"):
                self.closed = self.ended = True
                if text.startswith("vKill"):
                    self.send(b"OK")
                self.server.killed = True
                if self.server.on_kill is not None:
                    self.server.on_kill()
                return None
        except DebugError as exc:
            return self._error(exc, b"E14" if command in "mMXZz" else b"E01")
        except (ValueError, IndexError, KeyError):
            return b"E01"  # a malformed packet
        return b""  # not supported: GDB falls back or says so

    def _vcpu_of(self, thread: int) -> int:
        cpu = thread - 1
        if not 0 <= cpu < self.target.debug_vcpus():
            raise DebugError(f"no thread {thread:x}")
        return cpu

    # ---- registers -------------------------------------------------------------------------
    def _read_registers(self) -> bytes:
        values = self.target.debug_registers(self.g_cpu)
        return b"".join(self._encode(name, size, values) for name, size in REGISTERS)

    @staticmethod
    def _encode(name: str, size: int, values: dict[str, int]) -> bytes:
        if name in UNAVAILABLE:
            return b"xx" * size
        return values.get(name, 0).to_bytes(size, "little").hex().encode()

    def _read_register(self, number: int) -> bytes:
        name, size = REGISTERS[number]
        return self._encode(name, size, self.target.debug_registers(self.g_cpu))

    def _write_registers(self, data: bytes) -> bytes:
        values, pos = {}, 0
        for name, size in REGISTERS:
            if pos + size > len(data):
                break
            if name not in UNAVAILABLE:
                values[name] = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        self.target.debug_set_registers(self.g_cpu, values)
        return b"OK"

    def _write_register(self, number: int, data: bytes) -> bytes:
        name, size = REGISTERS[number]
        if name in UNAVAILABLE:
            return b"E01"
        value = int.from_bytes(data[:size], "little")
        self.target.debug_set_registers(self.g_cpu, {name: value})
        return b"OK"

    # ---- target description ----------------------------------------------------------------
    def _xfer(self, spec: str) -> bytes:
        annex, _, window = spec.partition(":")
        if annex != "target.xml":
            return b"E00"
        offset, _, length = window.partition(",")
        start, n = int(offset, 16), int(length, 16)
        chunk = TARGET_XML[start : start + n]
        return (b"m" if start + n < len(TARGET_XML) else b"l") + escape(chunk)

    # ---- running -------------------------------------------------------------------------
    def _vcont(self, actions: str) -> bytes | None:
        """vCont;ACTION[:THREAD]...: a step of one thread (the others stay stopped), or
        continue."""
        for action in actions.split(";"):
            verb, _, thread = action.partition(":")
            if verb[:1] in ("s", "S"):
                cpu = self._vcpu_of(int(thread, 16)) if thread and thread != "-1" else self.c_cpu
                return self._stopped(self.target.debug_step(cpu))
        return self._continue()

    def _continue(self) -> bytes | None:
        """Run until a stop; a Ctrl-C (0x03) from the debugger interrupts the guest."""
        self.target.debug_cont()
        while True:
            stop = self.target.debug_wait(WAIT_SLICE)
            if stop is not None:
                return self._stopped(stop)
            if not self._recv(0):
                return None  # the debugger went away; serve() detaches
            if any(kind == "interrupt" for kind, _ in self.events):
                self.events = [e for e in self.events if e[0] != "interrupt"]
                self.target.debug_interrupt()

    def _stopped(self, stop: dict[str, Any]) -> bytes:
        self.last_stop = stop
        self.g_cpu = self.c_cpu = stop["cpu"]
        if stop["reason"] == "finished":
            self._note("every vCPU has stopped for good (halted with interrupts disabled)")
        elif stop["reason"] == "died":
            self._note("the guest died (see the console log)")
        return self._stop_reply(stop)

    @staticmethod
    def _stop_reply(stop: dict[str, Any]) -> bytes:
        reply = f"T{stop['signal']:02x}thread:{stop['cpu'] + 1:x};"
        if stop["reason"] in ("swbreak", "hwbreak"):
            reply += f"{stop['reason']}:;"
        return reply.encode()

    def _detach(self) -> None:
        try:
            self.target.debug_detach()
        except DebugError as exc:
            self._note(str(exc))
