"""Shared helpers: small seeded machines and page tables built in simulated memory."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sevsim.pagetables import PageTables
from sevsim.platform import Platform
from sevsim.profiles import PROFILES, get_profile
from sevsim.soc import Machine, MachineCheck, msr
from sevsim.soc.paging import CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, EFER_LME, EFER_NXE

ALL_PROFILES = list(PROFILES)
NON_COHERENT = [name for name, p in PROFILES.items() if not p.sme_coherent]
COHERENT = [name for name, p in PROFILES.items() if p.sme_coherent]
# The project's own copy of the public test data it needs (real AMD certificates, published
# known-answer inputs; tests/testdata/README.md says where each comes from).
TESTDATA = Path(__file__).resolve().parent / "testdata"


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the tests marked slow (minutes each)"
    )


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (minutes): run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_machine(name: str = "milan", **changes) -> Machine:
    """The silicon alone (no Secure Processor): caches, engine, cores."""
    changes.setdefault("seed", 1234)
    changes.setdefault("dram_size", 4 << 30)
    return Machine(get_profile(name).with_(**changes))


def make_platform(name: str = "milan", state_dir=None, **changes) -> Platform:
    """The silicon with its Secure Processor and SEV firmware behind the mailbox."""
    changes.setdefault("seed", 1234)
    changes.setdefault("dram_size", 4 << 30)
    return Platform(get_profile(name).with_(**changes), state_dir=state_dir)


def make_memctl(name: str = "milan", **changes):
    """A memory controller on its own, as on a test bench: its key port is free to use."""
    from sevsim.soc.dram import DRAM
    from sevsim.soc.memctl import MemoryController
    from sevsim.soc.rng import EntropySource

    changes.setdefault("seed", 1234)
    profile = get_profile(name).with_(**changes)
    return MemoryController(profile, DRAM(4 << 30), EntropySource(profile.seed, "bench"))


class Phys:
    """Test-bench access to physical memory through the cache, in one encryption domain —
    what firmware or a boot loader would use to lay out memory before paging."""

    def __init__(self, machine: Machine, encrypted: bool = False) -> None:
        self.machine = machine
        self.slot = machine.memctl.key_slot(encrypted)

    def read(self, pa: int, n: int) -> bytes:
        return self.machine.cache.read(pa, n, self.slot)

    def write(self, pa: int, data: bytes) -> None:
        self.machine.cache.write(pa, data, self.slot)


class Bump:
    """Hands out zeroable physical pages from a fixed start."""

    def __init__(self, start: int = 0x10_0000) -> None:
        self.next = start

    def __call__(self) -> int:
        pa = self.next
        self.next += 4096
        return pa


def long_mode(
    machine: Machine,
    encrypted_tables: bool = False,
    levels: int = 4,
    nxe: bool = True,
    core_index: int = 0,
) -> tuple:
    """A core in long mode on fresh tables (no mappings yet); returns (core, tables)."""
    core = machine.cores[core_index]
    tables = PageTables(
        Phys(machine, encrypted_tables),
        Bump(),
        me_mask=machine.cbit_mask,
        encrypted_tables=encrypted_tables,
        levels=levels,
    )
    core.write_cr0(core.cr0 | CR0_PE)
    core.write_cr4(CR4_PAE | (CR4_LA57 if levels == 5 else 0))
    core.wrmsr(msr.EFER, EFER_LME | (EFER_NXE if nxe else 0))
    core.write_cr3(tables.root_pa)  # a 32-bit MOV to CR3: no room for the C-bit yet
    core.write_cr0(core.cr0 | CR0_PG | CR0_WP)
    core.write_cr3(tables.cr3())  # in long mode: the full CR3, C-bit included
    return core, tables


@pytest.fixture(params=ALL_PROFILES)
def profile_name(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _sevsim_data_dir(tmp_path_factory):
    """Keep the simulated AMD roots and KDS registry of a test run out of the user's home."""
    import os

    path = tmp_path_factory.mktemp("sevsim-data")
    old = os.environ.get("SEVSIM_DATA")
    os.environ["SEVSIM_DATA"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SEVSIM_DATA", None)
    else:
        os.environ["SEVSIM_DATA"] = old


def psp_port(mb: RawMailbox):
    """The PSP's inspection port of a test bench's platform (a booted host has
    ``HostSystem.inspection_port()``): for tests that check the firmware's own state."""
    return mb.platform.psp_debug_port()


class RawMailbox:
    """Issue firmware commands the way a minimal host would: buffers in plaintext memory at
    fixed physical addresses (no C-bit), CmdBufAddr, CmdResp, poll. No kernel needed."""

    CMD_PA = 0x10_0000  # the command buffer
    DATA_PA = 0x20_0000  # room for certificates and other data

    def __init__(self, platform: Platform) -> None:
        from sevsim.api.commands import CMDRESP_CMD_SHIFT, CMDRESP_RESP

        self.platform = platform
        self.machine = machine = platform.machine
        self.mailbox = platform.mailbox
        self._shift, self._resp = CMDRESP_CMD_SHIFT, CMDRESP_RESP
        self.phys = Phys(machine)

    def write(self, pa: int, data: bytes) -> None:
        self.phys.write(pa, data)

    def read(self, pa: int, n: int) -> bytes:
        return self.phys.read(pa, n)

    def ring(self, command: int, addr: int) -> int:
        mb = self.mailbox
        regs = mb.registers
        mb.write32(regs["cmdbuff_addr_lo"], addr & 0xFFFFFFFF)
        mb.write32(regs["cmdbuff_addr_hi"], addr >> 32)
        mb.write32(regs["cmdresp"], command << self._shift | 1)
        reg = mb.read32(regs["cmdresp"])
        assert reg & self._resp and (reg >> self._shift) & 0x7FF == command & 0x7FF
        return reg & 0xFFFF

    def cmd(self, command, buffer: bytes | None = None, addr: int | None = None):
        """(Status, command buffer after the command)."""
        from sevsim.api import commands as c
        from sevsim.api.status import Status

        layout = c.BUFFERS.get(command)
        size = layout.size if layout else 0
        addr = self.CMD_PA if addr is None else addr
        if buffer is not None:
            self.write(addr, bytes(buffer).ljust(size, b"\0"))
        status = Status(self.ring(int(command), addr))
        try:
            out = self.read(addr, size) if size else b""
        except MachineCheck:
            out = b""  # the test named an address outside DRAM on purpose
        return status, out

    def init(self, flags: int = 0, **fields):
        from sevsim.api import commands as c

        return self.cmd(c.Command.INIT, c.INIT.build(flags=flags, **fields))[0]

    def wbinvd_all(self) -> None:
        for core in self.machine.cores:
            core.wbinvd()


def boot_host(name: str = "milan", **changes):
    """A HostSystem (machine, booted kernel, probed /dev/sev) on a fresh volatile platform."""
    from sevsim.system import HostSystem

    changes.setdefault("seed", 1234)
    changes.setdefault("dram_size", 4 << 30)
    state_dir = changes.pop("state_dir", None)
    nv_file = changes.pop("nv_file", None)
    return HostSystem.start(
        get_profile(name).with_(**changes), state_dir=state_dir, nv_file=nv_file
    )


def sevsim(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The command line in a child process, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sevsim", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sevsim {' '.join(args)} failed: {proc.stderr}")
    return proc


# ---- small guests of their own (tests/guests/*.S) ----------------------------------------
GUESTS = Path(__file__).resolve().parent / "guests"


@functools.cache
def small_guest(name: str) -> tuple[bytes, dict[str, int]]:
    """tests/guests/NAME.S as a 64 KiB flash image (linked at the isa-bios alias, 0xF0000),
    and its symbols."""
    missing = [tool for tool in ("as", "ld", "objcopy", "nm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the small guests need GNU binutils ({', '.join(missing)} not found)")
    with tempfile.TemporaryDirectory() as tmp:
        obj, elf, image = (f"{tmp}/{name}.{ext}" for ext in ("o", "elf", "fd"))
        out = ""
        for cmd in (
            ["as", "--64", "--noexecstack", "-I", str(GUESTS), "-o", obj, f"{GUESTS}/{name}.S"],
            ["ld", "-m", "elf_x86_64", "-Ttext=0xF0000", "--section-start=.reset=0xFFFF0"]
            + ["-e", "reset_vector", "-o", elf, obj],
            ["objcopy", "-O", "binary", "--gap-fill=0xff", "--pad-to=0x100000", elf, image],
            ["nm", elf],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
            out = proc.stdout
        symbols = {name: int(value, 16) for value, _, name in map(str.split, out.splitlines())}
        return Path(image).read_bytes(), symbols
