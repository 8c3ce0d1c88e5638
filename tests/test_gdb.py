"""`vm run --gdb`: the GDB remote stub, its packet layer, and real gdb against the real-code
guest (with a debuggable policy, and with NODBG)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import sevsim

from sevsim.host import gdbstub
from sevsim.host.gdbstub import (
    PacketReader,
    escape,
    frame,
    parse_gdb_address,
    unescape,
)

SYMBOLS = json.loads(
    (Path(__file__).resolve().parents[1] / "src/sevsim/guest/x86/sevsim-guest.sym.json").read_text()
)
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian package gdb)")


# ---- the packet layer ----------------------------------------------------------------------
def test_frames_carry_the_byte_sum_modulo_256():
    # Values from GDB's own traces: "$?#3f", "$g#67", "$OK#9a".
    assert frame(b"?") == b"$?#3f"
    assert frame(b"g") == b"$g#67"
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"


def test_escapes_use_0x7d_and_xor_0x20():
    assert escape(b"a#b$c}d*e") == b"a}\x03b}\x04c}]d}\x0ae"
    assert unescape(b"a}\x03b}\x04c}]d}\x0ae") == b"a#b$c}d*e"
    every = bytes(range(256))
    assert unescape(escape(every)) == every
    assert not any(ch in escape(every) for ch in b"#$*")


def test_reader_splits_acks_packets_interrupts_and_bad_checksums():
    reader = PacketReader()
    # The bytes of "qSupported:x+" add up to 0x514: checksum 14.
    events = reader.feed(b"+$qSupported:x+#1")  # a packet cut in the middle
    assert events == [("ack", b"+")]
    events = reader.feed(b"4\x03$g#00-$g#67")
    assert events == [
        ("packet", b"qSupported:x+"),
        ("interrupt", b"\x03"),
        ("bad", b"g"),
        ("nak", b"-"),
        ("packet", b"g"),
    ]


def test_gdb_addresses_follow_qemu():
    assert parse_gdb_address("tcp::1234") == ("", 1234)
    assert parse_gdb_address("tcp:127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_gdb_address("tcp:[::1]:9") == ("::1", 9)
    for bad in ("unix:/tmp/gdb.sock", "tcp:host", "tcp::99999", "1234"):
        with pytest.raises(ValueError):
            parse_gdb_address(bad)


def test_target_description_is_gdbs_amd64_layout():
    root = ET.fromstring(gdbstub.TARGET_XML)
    assert root.findtext("architecture") == "i386:x86-64"
    features = [f.get("name") for f in root.iter("feature")]
    assert features[:2] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"]
    names = [r.get("name") for r in root.iter("reg")]
    # gdb/features/i386/64bit-core.xml's order, which the 'g' packet follows.
    assert names[:24] == [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    ]  # fmt: skip
    assert names[24:32] == [f"st{i}" for i in range(8)]
    assert names[40:57] == [f"xmm{i}" for i in range(16)] + ["mxcsr"]


# ---- real gdb against `vm run --gdb` -----------------------------------------------------------
class GuestUnderGdb:
    """`sevsim vm run --gdb tcp:127.0.0.1:0` with the real-code guest, and its port."""

    def __init__(self, tmp: Path, policy: str, *extra: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "sevsim", "vm", "guest-image", str(tmp / "guest.fd")],
            check=True,
            capture_output=True,
        )
        self.console = tmp / "console.log"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "sevsim", "vm", "run", "--state", str(tmp / "state"),
                "--bios", str(tmp / "guest.fd"), "-m", "32M", "--sev-policy", policy,
                "--console", str(self.console), "--gdb", "tcp:127.0.0.1:0", *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.first = self.proc.stderr.readline()
        found = re.search(r"gdb server on tcp:127\.0\.0\.1:(\d+)$", self.first.strip())
        if found is None:
            self.proc.kill()
            raise AssertionError(f"vm run did not start its gdb server: {self.first!r}")
        self.port = int(found[1])

    def gdb(self, *commands: str) -> str:
        args = [GDB, "-batch", "-nx", "-ex", "set pagination off"]
        args += ["-ex", f"target remote 127.0.0.1:{self.port}"]
        for command in commands:
            args += ["-ex", command]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        return out.stdout + out.stderr

    def finish(self) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=120)
        return out, self.first + err


@needs_gdb
def test_gdb_breaks_at_entry64_steps_and_reads_private_memory(tmp_path):
    entry64 = SYMBOLS["entry64"]
    guest = GuestUnderGdb(tmp_path, "0x0", "-S")  # NODBG clear: the owner allows debugging
    dump = tmp_path / "secret.bin"
    out = guest.gdb(
        "info registers rip cs",
        f"break *{entry64:#x}",
        "continue",
        "info registers rip cs",
        "x/2gx 0x9000",
        "stepi",
        "info registers",
        "continue",  # to the end: every vCPU halts with interrupts disabled
        f"dump binary memory {dump} 0x200000 0x20002e",
        "kill",
    )
    _, err = guest.finish()
    # The reset state: CS:IP = F000:FFF0.
    regs = re.findall(r"^(rip|cs)\s+(0x[0-9a-f]+)", out, re.M)
    assert regs[:2] == [("rip", "0xfff0"), ("cs", "0xf000")], out
    assert f"Breakpoint 1, {entry64:#018x}" in out, out
    # At entry64 the CPU is in long mode on the GDT's 64-bit code selector (0x18).
    assert regs[2:4] == [("rip", hex(entry64)), ("cs", "0x18")], out
    # After one stepi: the next instruction, and 'info registers' shows the lot.
    stepped = re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)[2]
    assert entry64 < int(stepped, 16) <= entry64 + 15, out
    for name in ("rax", "rsp", "eflags", "ss", "fs_base", "cr0", "cr3", "efer"):
        assert re.search(rf"^{name}\s+0x", out, re.M), (name, out)
    # boot_info (0x9000, private): SEV_STATUS, then me_mask = 1 << C-bit, as the guest says.
    console = guest.console.read_text()
    cbit = int(re.search(r"SEV active, C-bit (\d+), SEV_STATUS (0x[0-9a-f]+)", console)[1])
    status = re.search(r"SEV_STATUS (0x[0-9a-f]+)", console)[1]
    words = re.search(r"0x9000:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out)
    assert words is not None, out
    assert int(words[1], 16) == int(status, 16) == 1
    assert int(words[2], 16) == 1 << cbit
    # The secret page, decrypted by the firmware: the guest's hash of it matches.
    secret = dump.read_bytes()
    assert secret[:14] == b"sevsim secret:"
    printed = re.search(r"secret at 0x200000, sha256 ([0-9a-f]{64})", console)[1]
    assert hashlib.sha256(secret[14:]).hexdigest() == printed
    assert "the debugger killed the VM" in err


@needs_gdb
def test_gdb_on_a_nodbg_guest_sees_registers_but_no_memory(tmp_path):
    entry64 = SYMBOLS["entry64"]
    guest = GuestUnderGdb(tmp_path, "0x1", "-S")  # QEMU's default policy: NODBG
    out = guest.gdb(
        "info registers rip",
        "x/2gx 0x9000",
        f"break *{entry64:#x}",  # INT3 would have to be written into private memory
        "continue",
        "delete 1",
        f"hbreak *{entry64:#x}",  # DR0: no memory is touched
        "continue",
        "info registers rip cs",
        "kill",
    )
    _, err = guest.finish()
    assert re.search(r"^rip\s+0xfff0\b", out, re.M), out
    assert "Cannot access memory at address 0x9000" in out, out
    assert "Cannot insert breakpoint 1" in out, out
    assert f"Breakpoint 2, {entry64:#018x}" in out, out
    assert re.search(rf"^rip\s+{entry64:#x}\b", out, re.M), out
    assert re.search(r"^cs\s+0x18\b", out, re.M), out
    reason = "policy forbids debugging (NODBG)"
    assert reason in err
    assert reason in guest.console.read_text()


def _rsp(sock: socket.socket, payload: bytes) -> bytes:
    """Send one packet, take the '+' and the reply packet (its payload)."""
    sock.sendall(frame(payload))
    return _reply(sock)


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"\$([^#]*)#[0-9a-f]{2}", data):
        chunk = sock.recv(4096)
        assert chunk, "the stub hung up"
        data += chunk
    sock.sendall(b"+")
    return re.search(rb"\$([^#]*)#[0-9a-f]{2}", data)[1]


def test_ctrl_c_stops_a_spinning_guest(tmp_path):
    # No -S: the guest runs; attaching stops it, 'c' runs it again, 0x03 interrupts it.
    guest = GuestUnderGdb(tmp_path, "0x0", "--fw-cfg", "name=opt/sevsim/workload,string=spin")
    with socket.create_connection(("127.0.0.1", guest.port), timeout=120) as sock:
        assert b"qXfer:features:read+" in _rsp(sock, b"qSupported:swbreak+")
        assert _rsp(sock, b"?").startswith(b"T")
        assert _rsp(sock, b"qfThreadInfo") == b"m1"
        sock.sendall(frame(b"c"))
        assert sock.recv(1) == b"+"
        deadline = time.monotonic() + 120  # a loaded machine boots slowly
        while time.monotonic() < deadline:  # until the guest spins (its console says so)
            if guest.console.exists() and "spinning" in guest.console.read_text():
                break
            sock.settimeout(0.1)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # no stop reply while it runs
        sock.settimeout(120)
        sock.sendall(b"\x03")
        assert _reply(sock) == b"T02thread:1;"  # SIGINT, vCPU 0
        rip = int.from_bytes(bytes.fromhex(_rsp(sock, b"p10").decode()), "little")
        assert 0xFFFF_0000 <= rip < 1 << 32  # in the flash's code (main's spin loop)
        sock.sendall(frame(b"k"))
    _, err = guest.finish()
    assert "the debugger killed the VM" in err


def test_bad_gdb_options_are_one_line_usage_errors(tmp_path):
    image = tmp_path / "guest.fd"
    sevsim("vm", "guest-image", str(image), cwd=tmp_path)
    base = ["vm", "run", "--state", str(tmp_path / "state"), "--bios", str(image)]
    for extra, words in (
        (["--gdb", "unix:/tmp/gdb.sock"], "tcp:[HOST]:PORT"),
        (["--gdb", "tcp::70000"], "port 0..65535"),
        (["-S"], "-S needs --gdb or --qmp"),
    ):
        out = sevsim(*base, *extra, cwd=tmp_path, check=False)
        assert out.returncode == 2, out
        assert words in out.stderr and "Traceback" not in out.stderr, out.stderr
