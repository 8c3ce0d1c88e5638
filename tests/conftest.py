"""Shared helpers: small seeded machines and page tables built in simulated memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevsim.host.pagetables import PageTables
from sevsim.profiles import PROFILES, get_profile
from sevsim.soc import Machine, msr
from sevsim.soc.paging import CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, EFER_LME, EFER_NXE

ALL_PROFILES = list(PROFILES)
NON_COHERENT = [name for name, p in PROFILES.items() if not p.sme_coherent]
COHERENT = [name for name, p in PROFILES.items() if p.sme_coherent]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_machine(name: str = "milan", **changes) -> Machine:
    changes.setdefault("seed", 1234)
    changes.setdefault("dram_size", 4 << 30)
    return Machine(get_profile(name).with_(**changes))


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
