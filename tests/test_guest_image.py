"""The x86 guest firmware image (src/sevsim/guest/x86): its build is reproducible, its
shape is what a reset vector needs, and it boots on plain QEMU (TCG) with the console
lines each workload promises. None of this needs sevsim's engine."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

# The sources and the shipped files in the repository (the package may be installed
# elsewhere: see test_the_package_ships_the_repositorys_image).
X86 = Path(__file__).resolve().parents[1] / "src" / "sevsim" / "guest" / "x86"
IMAGE = X86 / "sevsim-guest.fd"
SYMS = X86 / "sevsim-guest.sym.json"
BUILD = X86 / "build.sh"
FOUR_GIB = 1 << 32
RAM = 64 << 20  # what the QEMU runs below give the guest
PREFIX = "sevsim-guest: "
M64 = (1 << 64) - 1
# The attack lab's victims: their fixed pages (layout.h).
VICTIM_GPAS = {
    "BALANCE_GPA": 0x204000,
    "FLAGS_GPA": 0x205000,
    "INBOX_BUFFER_GPA": 0x206000,
    "SETTING_GPA": 0x207000,
    "INBOX_SHARED_GPA": 0x208000,
}

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
)


def test_build_check_reproduces_the_shipped_files():
    missing = [t for t in ("gcc", "as", "ld", "objcopy", "nm") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"toolchain missing: {', '.join(missing)}")
    gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout
    ld = subprocess.run(["ld", "--version"], capture_output=True, text=True).stdout
    if gcc.strip() != "12.2.0" or not ld.splitlines()[0].endswith(" 2.40"):
        pytest.skip("the image is pinned to gcc 12.2.0 / binutils 2.40 (Debian 12)")
    r = subprocess.run(["bash", str(BUILD), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_is_64k_and_ends_with_the_reset_vector():
    image = IMAGE.read_bytes()
    assert len(image) in (64 << 10, 128 << 10)
    vector = image[-16:]
    # A jump: near (E9 rel16) or short (EB rel8), as real-mode code at 0xFFFFFFF0.
    assert vector[0] in (0xE9, 0xEB), vector.hex()
    # Its target lies inside the 64 KiB real-mode segment, in the image.
    if vector[0] == 0xE9:
        target = (0xFFF3 + int.from_bytes(vector[1:3], "little")) & 0xFFFF
    else:
        target = (0xFFF2 + int.from_bytes(vector[1:2], "little", signed=True)) & 0xFFFF
    assert target < 0xFFF0
    assert image[len(image) - 0x10000 + target] == 0xFA  # real_start begins with CLI


def test_symbol_file():
    text = SYMS.read_text()
    assert text.endswith("}\n")
    syms = json.loads(text)
    assert list(syms) == sorted(syms)
    image_base = FOUR_GIB - IMAGE.stat().st_size
    functions = ("entry32", "entry64", "main", "alu_loop", "mem_loop", "load_loop", "yield_to_host")
    required = {
        "reset_vector",
        *functions,
        "idt",
        "LOADS_GPA",
        "SECRET_GPA",
        "SHARED_GPA",
        "ALIAS_GPA",
        "ALIAS_FLUSH_GPA",
        "PML4_GPA",
        "SPLIT_PT_GPA",
        *VICTIM_GPAS,
    }
    assert required <= set(syms)
    for name, addr in syms.items():
        assert isinstance(addr, int), name
        # Code in the flash window below 4 GiB, or a fixed address in the guest's RAM.
        assert image_base <= addr < FOUR_GIB or 0 <= addr <= RAM, (name, hex(addr))
    assert syms["reset_vector"] == FOUR_GIB - 16
    assert syms["IMAGE_BASE"] == image_base
    assert (syms["SECRET_GPA"], syms["SHARED_GPA"], syms["PML4_GPA"]) == (
        0x200000,
        0x201000,
        0x10000,
    )
    assert (syms["ALIAS_GPA"], syms["ALIAS_FLUSH_GPA"]) == (0x202000, 0x203000)
    assert {n: syms[n] for n in VICTIM_GPAS} == VICTIM_GPAS
    # The pages made shared and the victims' pages are distinct 4 KiB pages of the one
    # 2 MiB page the firmware splits (into the table at SPLIT_PT_GPA), all below the
    # guest's 32 MiB minimum.
    pages = [
        syms[n] for n in ("SECRET_GPA", "SHARED_GPA", "ALIAS_GPA", "ALIAS_FLUSH_GPA", *VICTIM_GPAS)
    ]
    assert len(set(pages)) == len(pages)
    assert all(gpa % 4096 == 0 and gpa >> 21 == 1 for gpa in pages)
    assert syms["SPLIT_PT_GPA"] == 0x16000
    # loads' 256 KiB lies between selfmod's code page and mem_loop's 8 MiB.
    assert syms["LOADS_GPA"] == 0x340000
    assert syms["SELFMOD_GPA"] + 4096 <= syms["LOADS_GPA"]
    assert syms["LOADS_GPA"] + LOADS_BYTES <= syms["MEM_LOOP_GPA"]
    for name in functions:
        assert image_base <= syms[name] < FOUR_GIB - 16, name
    # The functions are in the image, not in the 0xFF padding.
    image = IMAGE.read_bytes()
    for code in ("alu_loop", "mem_loop", "load_loop"):
        assert image[syms[code] - image_base] != 0xFF, code


def yield_resume_rip() -> int:
    """Where a vCPU halted in yield_to_host() resumes: the CLI just after `sti; hlt`."""
    syms = json.loads(SYMS.read_text())
    image = IMAGE.read_bytes()
    start = syms["yield_to_host"] - (FOUR_GIB - len(image))
    at = image.index(bytes([0xFB, 0xF4, 0xFA]), start, start + 128)  # sti; hlt; cli
    return FOUR_GIB - len(image) + at + 2


def test_yield_to_host_is_sti_hlt_cli_once():
    """One HLT site for every yield, reached with only the reserved RFLAGS bit set."""
    syms = json.loads(SYMS.read_text())
    image = IMAGE.read_bytes()
    start = syms["yield_to_host"] - (FOUR_GIB - len(image))
    body = image[start : start + 128]
    body = body[: body.index(0xC3) + 1]  # up to its RET (no C3 byte in its instructions)
    assert body.count(bytes([0xFB, 0xF4, 0xFA])) == 1  # sti; hlt; cli
    assert bytes([0x6A, 0x02, 0x9D]) in body  # push $2; popfq
    assert yield_resume_rip() - syms["yield_to_host"] < len(body)


# --- QEMU -------------------------------------------------------------------------


def alu_model(n: int) -> int:
    """What alu_loop(n) computes (see workloads.S)."""
    x = 0x0123456789ABCDEF
    for c in range(n, 0, -1):
        x = ((x + 0x9E3779B97F4A7C15) & M64) ^ c
        x = ((x << 13) | (x >> 51)) & M64
    return x


def mem_model(nbytes: int, rounds: int) -> int:
    """What mem_loop(base, nbytes, rounds) returns (see workloads.S)."""
    n = nbytes // 8
    return (rounds * n * (n - 1) // 2 + n * rounds * (rounds - 1) // 2) & M64


LOADS_BYTES = 256 << 10  # the `loads` workload's region at LOADS_GPA


def loads_model(nbytes: int, count: int) -> int:
    """What load_loop(base, nbytes, count) returns over memory holding q[i] = i (see
    workloads.S): the word at byte offset o holds o // 8."""
    x, total = 0x9E3779B97F4A7C15, 0
    for _ in range(count):
        x ^= (x << 13) & M64
        x ^= x >> 7
        x ^= (x << 17) & M64
        total += (x & (nbytes - 8)) // 8
    return total & M64


class Qemu:
    """One QEMU TCG run of the image; its console (COM1 on stdio) read line by line."""

    def __init__(self, workload: str | None, cpu: str = "qemu64,+rdrand", qmp: Path | None = None):
        cmd = [
            QEMU,
            "-machine",
            "pc",
            "-cpu",
            cpu,
            "-nographic",
            "-no-reboot",
            "-m",
            "64M",
            "-bios",
            str(IMAGE),
            "-serial",
            "stdio",
            "-display",
            "none",
            "-monitor",
            "none",
        ]
        if workload is not None:
            cmd += ["-fw_cfg", f"name=opt/sevsim/workload,string={workload}"]
        if qmp is not None:
            cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.lines: list[str | None] = []  # None marks the end of output
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\r\n"))
                self._new.notify_all()
        with self._new:
            self.lines.append(None)  # EOF
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 8.0) -> list[str]:
        """Waits for a console line matching pattern; returns all lines so far."""
        deadline = time.monotonic() + timeout
        with self._new:
            while not any(ln is not None and re.search(pattern, ln) for ln in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] is None):
                    raise AssertionError(f"no line matching {pattern!r}; got {self.lines}")
                self._new.wait(left)
            return [ln for ln in self.lines if ln is not None]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def run_guest(workload: str | None, until: str = r"^sevsim-guest: (done|halted)$", **kw):
    with Qemu(workload, **kw) as q:
        lines = q.wait_for(until)
    guest = [ln for ln in lines if ln.startswith(PREFIX)]
    return [ln[len(PREFIX) :] for ln in guest]


SHA_RE = r"secret at 0x200000, sha256 ([0-9a-f]{64})"


@needs_qemu
def test_qemu_workloads():
    out = run_guest("secret pf gp selfmod alu:1000 mem:1 loads:1000 nonsense")
    assert out[:4] == [
        "booting",
        "SEV not active",
        "sha256 self-test ok",
        "workload secret pf gp selfmod alu:1000 mem:1 loads:1000 nonsense",
    ]
    rest = out[4:]
    assert re.fullmatch(SHA_RE, rest[0]), rest
    assert rest[1] == "shared page at 0x201000"
    assert re.fullmatch(
        r"exception page-fault \(#14\) at rip=0xffff[0-9a-f]{4} error=0x0 "
        r"cr2=0x100000000",
        rest[2],
    ), rest[2]
    assert rest[3] == "pf ok"
    assert re.fullmatch(
        r"exception general-protection \(#13\) at rip=0xffff[0-9a-f]{4} "
        r"error=0x0 cr2=0x[0-9a-f]+",
        rest[4],
    ), rest[4]
    assert rest[5] == "gp ok"
    assert rest[6] == "selfmod 1 2"
    assert rest[7] == f"alu {alu_model(1000):x}"
    assert rest[8] == f"mem {mem_model(8 << 20, 1):x}"
    assert rest[9] == f"loads {loads_model(LOADS_BYTES, 1000):x}"
    assert rest[10] == "unknown workload nonsense"
    assert rest[11:] == ["done"]


@needs_qemu
def test_qemu_alias_workloads_need_sev():
    """Plain QEMU has no SEV: the cache-alias lessons say so and the boot goes on."""
    out = run_guest("secret alias alias-flush pf")
    assert out[:4] == [
        "booting",
        "SEV not active",
        "sha256 self-test ok",
        "workload secret alias alias-flush pf",
    ]
    assert re.fullmatch(SHA_RE, out[4]), out
    assert out[5:8] == ["shared page at 0x201000", "alias needs SEV", "alias-flush needs SEV"]
    assert out[8].startswith("exception page-fault (#14)"), out
    assert out[9:] == ["pf ok", "done"]


@needs_qemu
def test_qemu_alias_alone_leaves_memory_alone(tmp_path):
    """Without SEV `alias` returns before it writes anything or splits the 2 MiB page."""
    sock = tmp_path / "qmp.sock"
    with Qemu("alias alias-flush", qmp=sock) as q:
        lines = q.wait_for(r"^sevsim-guest: done$")
        mem = _pmem(sock, tmp_path, 0x204000)
    assert "sevsim-guest: alias needs SEV" in lines
    assert "sevsim-guest: alias-flush needs SEV" in lines
    assert mem[0x202000:0x204000] == bytes(0x2000)
    pde = int.from_bytes(mem[0x12008:0x12010], "little") & ~0x60
    assert pde == 0x200000 | 0x83  # still one 2 MiB page


@needs_qemu
def test_qemu_default_workload_is_secret():
    out = run_guest(None)
    assert out[3] == "workload secret"
    assert re.fullmatch(SHA_RE, out[4])
    assert out[5:] == ["shared page at 0x201000", "done"]


@needs_qemu
def test_qemu_without_rdrand_the_secret_halts():
    # QEMU's default TCG CPU (qemu64) has no RDRAND: the reason the runs above add it.
    out = run_guest("secret", cpu="qemu64", until=r"rdrand failed")
    assert out[-1].startswith("rdrand failed")


@needs_qemu
def test_qemu_spin_never_returns():
    with Qemu("spin selfmod") as q:
        q.wait_for(r"^sevsim-guest: spinning$")
        time.sleep(0.5)
        assert q.proc.poll() is None
        assert not any(ln and "selfmod" in ln and "workload" not in ln for ln in q.lines)


def _qmp(path: Path, *commands: dict) -> list:
    """Runs the commands on a fresh QMP connection; returns their "return" values."""
    results = []
    deadline = time.monotonic() + 5
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s, s.makefile("rw") as f:
        json.loads(f.readline())  # the greeting
        for cmd in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply:
                    results.append(reply["return"])
                    break
                assert "error" not in reply, reply
    return results[1:]


def _hmp(path: Path, command: str) -> str:
    return _qmp(path, {"execute": "human-monitor-command", "arguments": {"command-line": command}})[
        0
    ]


def _pmem(path: Path, tmp_path: Path, size: int = 0x209000) -> bytes:
    dump = tmp_path / "mem.bin"
    _qmp(
        path, {"execute": "pmemsave", "arguments": {"val": 0, "size": size, "filename": str(dump)}}
    )
    return dump.read_bytes()


def _wait_halted_in_yield(path: Path, timeout: float = 8.0) -> str:
    """Polls `info registers` until the CPU sleeps in yield_to_host(): HLT=1, RIP just
    after the HLT, RFLAGS.IF=1. Returns the register dump."""
    deadline = time.monotonic() + timeout
    want = yield_resume_rip()
    while True:
        regs = _hmp(path, "info registers")
        rip = int(re.search(r"RIP=([0-9a-f]+)", regs).group(1), 16)
        rfl = int(re.search(r"RFL=([0-9a-f]+)", regs).group(1), 16)
        if "HLT=1" in regs and rip == want and rfl & 0x200:
            return regs
        if time.monotonic() > deadline:
            raise AssertionError(f"not halted in yield_to_host:\n{regs}")
        time.sleep(0.05)


@needs_qemu
def test_qemu_secret_and_shared_page_in_memory(tmp_path):
    """After `secret`: the private page holds marker + secret, the shared page holds the
    magic, SECRET_GPA and the secret's SHA-256, and the 2 MiB page was split."""
    sock = tmp_path / "qmp.sock"
    with Qemu("secret", qmp=sock) as q:
        lines = q.wait_for(r"^sevsim-guest: done$")
        mem = _pmem(sock, tmp_path, 0x202000)
    digest = re.search(SHA_RE, "\n".join(lines)).group(1)

    secret_page = mem[0x200000:0x201000]
    assert secret_page.startswith(b"sevsim secret:")
    secret = secret_page[14:46]
    assert hashlib.sha256(secret).hexdigest() == digest
    assert secret != bytes(32)

    shared = mem[0x201000:0x202000]
    assert shared[:16] == b"SEVSIM-SHARED\0\0\0"
    assert int.from_bytes(shared[16:24], "little") == 0x200000
    assert shared[24:56].hex() == digest

    def entry(gpa: int) -> int:  # without the Accessed and Dirty bits the CPU sets
        return int.from_bytes(mem[gpa : gpa + 8], "little") & ~0x60

    assert entry(0x10000) & ~0xFFF == 0x11000  # PML4[0] -> PDPT
    pde = entry(0x12000 + 8)  # PD 0, entry 1: 0x200000-0x3FFFFF
    assert pde & 0x80 == 0 and pde & ~0xFFF == 0x16000  # split into the table at 0x16000
    assert entry(0x16000 + 8) == 0x201000 | 0x3  # present, writable, no C-bit without SEV
    assert entry(0x12000) == 0x83  # 2 MiB pages elsewhere


# --- the attack lab's victims on plain QEMU ---------------------------------------------
#
# On sevsim a victim's `sti; hlt` (yield_to_host) is an exit that the hypervisor answers
# by running the vCPU again later. Plain QEMU has nothing to wake it (the 8259s are masked,
# the local APIC is as reset leaves it): each victim waits for good at its first yield.
# So here only what comes before that yield is checked: the console, the CPU's state (in
# HLT, interrupts on, registers cleared) and memory.

BOOT = ["booting", "SEV not active", "sha256 self-test ok"]


def _pte(mem: bytes, gpa: int) -> int:
    """The 4 KiB PTE of gpa in the split table, without Accessed and Dirty."""
    return int.from_bytes(mem[0x16000 + 8 * (gpa >> 12 & 511) :][:8], "little") & ~0x60


def _guest(lines: list[str]) -> list[str]:
    return [ln[len(PREFIX) :] for ln in lines if ln.startswith(PREFIX)]


@needs_qemu
@pytest.mark.parametrize(
    "workload, before_yield", [("balance", []), ("flags", []), ("inbox", ["inbox at 0x208000"])]
)
def test_qemu_victim_waits_for_good_at_its_first_yield(tmp_path, workload, before_yield):
    sock = tmp_path / "qmp.sock"
    with Qemu(workload, qmp=sock) as q:
        q.wait_for(rf"^sevsim-guest: workload {workload}$")
        regs = _wait_halted_in_yield(sock)
        assert "II=0" in regs  # not in STI's interrupt shadow any more: truly waiting
        assert "RFL=00000202" in regs  # only IF and the reserved bit: no flag tells anything
        # Every general-purpose register but RSP was cleared before the HLT.
        for reg in (
            "RAX",
            "RBX",
            "RCX",
            "RDX",
            "RSI",
            "RDI",
            "RBP",
            "R8",
            "R9",
            "R10",
            "R11",
            "R12",
            "R13",
            "R14",
            "R15",
        ):
            assert re.search(rf"\b{reg}\s*=0{{16}}\b", regs), (reg, regs)
        time.sleep(0.5)
        mem = _pmem(sock, tmp_path)
        assert q.proc.poll() is None
        assert "HLT=1" in _hmp(sock, "info registers")
        out = _guest([ln for ln in q.lines if ln is not None])
    assert out == [*BOOT, f"workload {workload}", *before_yield]
    for gpa in VICTIM_GPAS.values():
        assert _pte(mem, gpa) == gpa | 0x3  # split: present, writable, no C-bit without SEV
    if workload == "balance":
        assert mem[0x204000:0x204010] == b"balance: 100 EUR"
    elif workload == "flags":
        key = mem[0x205100:0x205110]
        assert re.fullmatch(rb"[01]{16}", key), key
        assert mem[0x205000:0x205010] == b"flag: " + key[:1] + b" " * 9
    else:
        assert mem[0x207000:0x207010] == b"role: user      "


@needs_qemu
def test_qemu_victim_after_other_workloads(tmp_path):
    """Workloads before a victim run as usual; the victim stops the list at its yield."""
    sock = tmp_path / "qmp.sock"
    with Qemu("secret inbox selfmod", qmp=sock) as q:
        q.wait_for(r"^sevsim-guest: inbox at 0x208000$")
        _wait_halted_in_yield(sock)
        time.sleep(0.3)
        mem = _pmem(sock, tmp_path)
        out = _guest([ln for ln in q.lines if ln is not None])
    assert out[:4] == [*BOOT, "workload secret inbox selfmod"]
    assert re.fullmatch(SHA_RE, out[4]), out
    assert out[5:] == ["shared page at 0x201000", "inbox at 0x208000"]
    assert mem[0x201000:0x201010] == b"SEVSIM-SHARED\0\0\0"
    assert mem[0x207000:0x207010] == b"role: user      "
    assert mem[0x206000:0x207000] == bytes(0x1000)  # nothing copied before the yield
    assert mem[0x208000:0x209000] == bytes(0x1000)  # the guest never writes the mailbox


@needs_qemu
def test_qemu_flags_without_rdrand_halts():
    out = run_guest("flags", cpu="qemu64", until=r"rdrand failed")
    assert out[-1] == "rdrand failed (CPUID.01H:ECX.RDRAND is 0)"


def test_mem_model_small():
    # The closed form of mem_model against the loop it describes.
    n_bytes, rounds = 64, 3
    q = list(range(n_bytes // 8))
    total = 0
    for _ in range(rounds):
        for i, x in enumerate(q):
            total += x
            q[i] = x + 1
    assert mem_model(n_bytes, rounds) == total


def test_loads_model_small():
    # loads_model against a plain xorshift64 over a filled list.
    n_bytes, count = 64, 50
    q = list(range(n_bytes // 8))
    x, total = 0x9E3779B97F4A7C15, 0
    for _ in range(count):
        x = (x ^ (x << 13)) % 2**64
        x = x ^ (x >> 7)
        x = (x ^ (x << 17)) % 2**64
        total += q[(x % n_bytes) // 8]
    assert loads_model(n_bytes, count) == total
    assert loads_model(n_bytes, 0) == 0


def test_the_package_ships_the_repositorys_image():
    """What `pip install .` puts in the package is the image and symbols built here."""
    from sevsim.guest import x86 as x86_guest

    assert x86_guest.image() == IMAGE.read_bytes()
    assert x86_guest.symbols() == json.loads(SYMS.read_text())
