"""The cache: plaintext lines tagged by domain, write-back encryption, the aliasing
corruption of hardware.md §4.1 with and without HwEnforcedCacheCoh, flushes, memory types."""

from __future__ import annotations

import pytest
from conftest import COHERENT, NON_COHERENT, make_machine

from sevsim.profiles import CacheGeometry
from sevsim.soc import GeneralProtection, msr
from sevsim.soc.cache import MemType
from sevsim.soc.paging import CR0_PE

A = b"A-old-secret-data-written-with-C=1-before-the-attribute-change.."
B = b"B-new-public-data-written-through-the-C=0-alias-afterwards......"
assert len(A) == len(B) == 64


def test_fill_decrypts_and_eviction_writes_back_encrypted():
    # 4 sets x 2 ways: the third line of a set evicts the first.
    m = make_machine("milan", cache=CacheGeometry(size=4 * 2 * 64, ways=2))
    host = m.memctl.host_key_slot
    set_stride = 4 * 64
    m.cache.write(0x1000, A, host)
    assert m.dram.read(0x1000, 64) == bytes(64)  # still only in the cache
    m.cache.write(0x1000 + set_stride, B, host)
    m.cache.write(0x1000 + 2 * set_stride, B, host)  # evicts the first line (FIFO)
    assert m.cache.resident(0x1000) == []
    stored = m.dram.read(0x1000, 64)
    assert stored != A
    assert m.memctl.read(0x1000, 64, host) == A  # the write-back was encrypted, correctly
    assert m.cache.read(0x1000, 64, host) == A  # and the next fill decrypts it


def _alias_scenario(name: str) -> bytes:
    """A page written with C=1 is flipped to C=0 without flushing the cache; new data goes
    through C=0 and reaches DRAM; later the stale C=1 line is written back."""
    m = make_machine(name)
    host = m.memctl.host_key_slot
    pa = 0x30000
    m.cache.write(pa, A, host)  # dirty line tagged with the host key
    m.cache.write(pa, B, 0)  # the same address, plaintext domain
    m.cache.clflush(pa, 0)  # B reaches DRAM
    m.cache.wbinvd()  # ... and any stale line follows it
    return m.memctl.read(pa, 64, 0)


@pytest.mark.parametrize("name", NON_COHERENT)
def test_alias_corrupts_without_hw_coherency(name):
    result = _alias_scenario(name)
    assert result != B  # the newer data was overwritten
    assert result != A  # by the old data encrypted with the host key: garbage here


@pytest.mark.parametrize("name", COHERENT)
def test_alias_is_safe_with_hw_coherency(name):
    assert _alias_scenario(name) == B


def test_two_domains_hold_one_address_without_coherency():
    m = make_machine("rome")
    host = m.memctl.host_key_slot
    m.cache.write(0x8000, A, host)
    assert m.cache.read(0x8000, 64, 0) != A  # the C=0 alias misses and reads DRAM
    assert sorted(m.cache.resident(0x8000)) == sorted([(host, True), (0, False)])
    m2 = make_machine("milan")
    m2.cache.write(0x8000, A, host)
    m2.cache.read(0x8000, 64, 0)
    assert m2.cache.resident(0x8000) == [(0, False)]  # the host line was written back and dropped


def test_clflush_only_flushes_its_own_domain():
    m = make_machine("rome")
    host = m.memctl.host_key_slot
    m.cache.write(0x8000, A, host)
    m.cache.clflush(0x8000, 0)
    assert m.cache.resident(0x8000) == [(host, True)]
    m.cache.clflush(0x8000, host)
    assert m.cache.resident(0x8000) == []
    assert m.memctl.read(0x8000, 64, host) == A


def test_wbinvd_and_wbnoinvd():
    m = make_machine("milan")
    host = m.memctl.host_key_slot
    m.cache.write(0x1000, A, host)
    m.cache.write(0x2000, B, 0)
    assert m.cores[1].wbnoinvd() == 2
    assert len(m.cache) == 2 and not list(m.cache.dirty_lines())
    assert m.dram.read(0x2000, 64) == B
    m.cache.write(0x1000, B, host)
    assert m.cores[0].wbinvd() == 1
    assert len(m.cache) == 0
    assert m.memctl.read(0x1000, 64, host) == B


def _physical_core(m):
    core = m.cores[0]
    core.write_cr0(core.cr0 | CR0_PE)  # paging off: linear = physical
    return core


def test_vm_page_flush_flushes_one_page_of_one_asid():
    m = make_machine("milan")
    core = _physical_core(m)
    page = 0x40000
    for asid in (5, 6):
        m.cache.write(page + 0x40, A, asid)  # lines a guest with this ASID left behind
    m.cache.write(page + 0x1000, A, 5)  # the next page: not flushed
    core.wrmsr(msr.VM_PAGE_FLUSH, page | 5)
    assert m.cache.resident(page + 0x40) == [(6, True)]
    assert m.cache.resident(page + 0x1000) == [(5, True)]
    assert m.memctl.read(page + 0x40, 64, 5) == A
    with pytest.raises(GeneralProtection):
        core.rdmsr(msr.VM_PAGE_FLUSH)  # write-only


def test_vm_page_flush_is_absent_on_naples():
    m = make_machine("naples")
    with pytest.raises(GeneralProtection):
        _physical_core(m).wrmsr(msr.VM_PAGE_FLUSH, 0x40000 | 1)


def test_write_protect_never_creates_a_dirty_line():
    m = make_machine("rome")
    host = m.memctl.host_key_slot
    m.cache.read(0x9000, 64, host, MemType.WP)  # reads allocate
    assert m.cache.resident(0x9000) == [(host, False)]
    m.cache.write(0x9010, b"wp-write", host, MemType.WP)
    assert m.cache.resident(0x9000) == []  # the line was dropped, not dirtied
    assert m.memctl.read(0x9010, 8, host) == b"wp-write"


def test_write_through_keeps_the_line_clean_and_memory_current():
    m = make_machine("rome")
    m.cache.read(0xA000, 64, 0, MemType.WT)
    m.cache.write(0xA008, b"through!", 0, MemType.WT)
    assert m.cache.resident(0xA000) == [(0, False)]
    assert m.dram.read(0xA008, 8) == b"through!"
    assert m.cache.read(0xA008, 8, 0, MemType.WT) == b"through!"


def test_uncached_access_bypasses_the_cache_and_snoops_its_own_domain():
    m = make_machine("rome")
    host = m.memctl.host_key_slot
    m.cache.write(0xB000, A, host)  # dirty WB line
    assert m.cache.read(0xB000, 64, host, MemType.UC) == A  # self-snoop wrote it back first
    assert m.cache.resident(0xB000) == []
    m.cache.write(0xB000, B, host, MemType.UC)
    assert m.cache.resident(0xB000) == []
    assert m.memctl.read(0xB000, 64, host) == B
    m.memctl.write(0xB000, A, host)  # memory changes behind a cached copy (no snoop)
    m.cache.read(0xB000, 64, host)
    m.memctl.write(0xB000, B, host)
    assert m.cache.read(0xB000, 64, host) == A  # the WB read hits the stale line
    assert m.cache.read(0xB000, 64, host, MemType.UC) == B
