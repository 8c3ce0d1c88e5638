"""The small accesses a firmware command makes (command buffers, packet headers): the
fabric's single-line path, the memory controller's line path and a core's small copies give
what the general paths give, whatever the cache holds."""

from __future__ import annotations

import random

import pytest
from conftest import COHERENT, NON_COHERENT, make_machine

from sevsim.api import commands as cmd
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

LINE = 64
PA = 0x2_0000


def _state(m, slot: int, resident: str, content: bytes) -> None:
    """Line PA holds ``content`` in ``slot``'s domain, and the cache holds it ``resident``:
    "dirty", "clean" or "absent"."""
    m.memctl.write(PA, content, slot)
    if resident == "absent":
        return
    m.cache.read(PA, LINE, slot)  # filled, clean
    if resident == "dirty":
        m.cache.write(PA, content, slot)


@pytest.mark.parametrize("name", [COHERENT[0], NON_COHERENT[0]])
@pytest.mark.parametrize("resident", ["dirty", "clean", "absent"])
def test_single_line_fabric_accesses_match_the_general_path(name, resident):
    rng = random.Random(f"{name}/{resident}")
    fast, general = make_machine(name), make_machine(name)
    slot = fast.memctl.host_key_slot
    for _ in range(20):
        content = rng.randbytes(LINE)
        off = rng.randrange(LINE)
        n = rng.randrange(1, LINE - off + 1)
        for m in (fast, general):
            _state(m, slot, resident, content)
        assert fast.fabric.read(PA + off, n, slot) == content[off : off + n]
        general.cache.snoop(PA + off, n, slot, invalidate=False)
        assert general.memctl.read(PA + off, n, slot) == content[off : off + n]
        assert fast.cache.resident(PA) == general.cache.resident(PA)

        data = rng.randbytes(n)
        fast.fabric.write(PA + off, data, slot)
        general.cache.snoop(PA + off, n, slot, invalidate=True)
        general.memctl.write(PA + off, data, slot)
        # The same ciphertext in DRAM, no line left behind in the cache.
        assert fast.dram.read(PA, LINE) == general.dram.read(PA, LINE)
        assert fast.cache.resident(PA) == general.cache.resident(PA) == []
        expected = content[:off] + data + content[off + n :]
        assert fast.memctl.read(PA, LINE, slot) == expected


def test_a_single_line_read_writes_a_dirty_line_back():
    m = make_machine("milan")
    slot = m.memctl.host_key_slot
    m.cache.write(PA, b"\x5a" * LINE, slot)  # dirty, DRAM still zero
    assert m.fabric.read(PA + 8, 8, slot) == b"\x5a" * 8
    assert m.cache.resident(PA) == [(slot, False)]  # clean now ...
    assert m.memctl.read(PA, LINE, slot) == b"\x5a" * LINE  # ... because DRAM has it


def test_memctl_line_path_matches_its_bulk_path():
    m = make_machine("milan")
    slot = m.memctl.host_key_slot
    data = random.Random(7).randbytes(2048)
    m.memctl.write(PA, data, slot)  # the bulk path (>= BULK_MIN, aligned)
    for off, n in ((0, 64), (5, 11), (63, 1), (100, 300), (2000, 48)):
        assert m.memctl.read(PA + off, n, slot) == data[off : off + n]
    m.memctl.write(PA + 70, b"x" * 20, slot)  # one partial line: read-modify-write
    assert m.memctl.read(PA, 2048, slot) == data[:70] + b"x" * 20 + data[90:]


def test_never_written_memory_reads_as_zeros_through_the_line_path():
    m = make_machine("milan")
    assert m.memctl.read(0x40_0000 + 3, 20, 0) == bytes(20)
    assert m.dram.load_line(0x40_0000, LINE) is None


def test_a_cores_small_copies_miss_after_wbinvd_on_another_core():
    """A core's fast path holds the cache's dict of a page's lines; WBINVD on any core
    empties the cache, so a later small write must reach a line the cache owns."""
    with HostSystem.start(get_profile("milan").with_(seed=5, dram_size=1 << 30)) as system:
        kernel, fabric = system.kernel, system.machine.fabric
        slot = system.machine.memctl.host_key_slot
        va = kernel.alloc_pages(1)
        pa = kernel.pa(va)
        kernel.write(va, b"first")
        assert kernel.read(va, 5) == b"first"  # the line is resident: the fast path is set
        kernel.cpu(1).wbinvd()
        kernel.write(va, b"again")
        assert fabric.read(pa, 5, slot) == b"again"  # the firmware's view: the new bytes
        assert kernel.read(va, 5) == b"again"


def test_command_buffers_round_trip_through_the_mailbox():
    profile = get_profile("milan").with_(seed=6, dram_size=1 << 30)
    with HostSystem.start(profile) as system:
        sev = system.sev
        for _ in range(3):
            status = sev.platform_status()
            assert status.ok and status.data["status"].api_major == profile.fw_api_major
        # A command whose buffer goes both ways, answered with the sizes the host must give.
        result = sev.pdh_cert_export(pdh_length=8, chain_length=8)
        assert result.data == {"pdh_length": 2084, "chain_length": 3 * 2084}
        result = sev.pdh_cert_export()
        assert result.ok and len(result.data["pdh"]) == 2084
        assert cmd.PDH_CERT_EXPORT.size == 32
