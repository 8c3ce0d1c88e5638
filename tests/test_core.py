"""Cores: CPUID and MSRs as the profiles say, and memory accesses of any size and alignment."""

from __future__ import annotations

import pytest
from conftest import ALL_PROFILES, Phys, long_mode, make_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevsim.profiles import PROFILES
from sevsim.soc import GeneralProtection, PageFault, msr
from sevsim.soc.paging import PAGE_4K, RW, P


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_cpuid_reports_the_profile(name):
    p = PROFILES[name]
    core = make_machine(name).cores[0]
    assert core.cpuid(0x8000_0000)[0] >= 0x8000_001F
    assert core.cpuid(0x8000_001F) == (p.sev_eax, p.sev_ebx, p.sev_ecx, p.sev_edx)
    assert core.cpuid(0x8000_0008)[0] & 0xFF == p.maxphyaddr
    assert core.cpuid(0x8000_000A)[1] == p.nasid
    eax = core.cpuid(1)[0]
    assert ((eax >> 8) & 0xF) + ((eax >> 20) & 0xFF) == p.family
    assert ((eax >> 16) & 0xF) << 4 | ((eax >> 4) & 0xF) == p.model
    assert not core.cpuid(1)[2] >> 31  # a host: no hypervisor bit
    vendor = b"".join(r.to_bytes(4, "little") for r in (core.cpuid(0)[i] for i in (1, 3, 2)))
    assert vendor == b"AuthenticAMD"


def test_observed_cpuid_values_decode_as_published():
    milan = PROFILES["milan"]
    assert (milan.cbit, milan.phys_reduction, milan.num_vmpl) == (51, 5, 4)  # EBX 0x4173
    assert milan.sme_coherent and not PROFILES["rome"].sme_coherent
    assert (PROFILES["rome"].cbit, PROFILES["naples"].cbit, PROFILES["genoa"].cbit) == (47, 47, 51)
    assert PROFILES["genoa"].max_asid == 1006 and PROFILES["naples"].max_asid == 15
    assert milan.effective_phys_bits == 43


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_msrs_on_a_host_core(name):
    core = make_machine(name).cores[0]
    syscfg = core.rdmsr(msr.SYSCFG)
    assert syscfg & msr.SYSCFG_MEM_ENCRYPT
    assert core.rdmsr(msr.SEV_STATUS) == 0
    assert core.rdmsr(msr.HWCR) & msr.HWCR_SMMLOCK
    with pytest.raises(GeneralProtection):
        core.wrmsr(msr.SEV_STATUS, 1)  # read-only
    with pytest.raises(GeneralProtection):
        core.wrmsr(msr.SYSCFG, syscfg & ~msr.SYSCFG_MEM_ENCRYPT)  # the BIOS owns SMEE
    with pytest.raises(GeneralProtection):
        core.wrmsr(msr.HWCR, 0)  # SMMLOCK is locked
    with pytest.raises(GeneralProtection):
        core.rdmsr(0xC001_FFFF)
    core.wrmsr(msr.SYSCFG, syscfg | msr.SYSCFG_SNP_EN)  # the OS may set other bits
    assert core.rdmsr(msr.SYSCFG) & msr.SYSCFG_SNP_EN


def test_smee_off_clears_syscfg_bit_and_reduction():
    m = make_machine("milan", smee=False)
    assert not m.cores[0].rdmsr(msr.SYSCFG) & msr.SYSCFG_MEM_ENCRYPT
    assert m.phys_bits == 48
    with pytest.raises(GeneralProtection):
        m.cores[0].wrmsr(msr.PAT, 0x02)  # memory type 2 is reserved


# Three virtual pages on scattered physical pages, one of them encrypted.
BASE = 0x0000_1000_0000_0000
LAYOUT = [(0x21_3000, False), (0x20_1000, True), (0x35_F000, False)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "read", "store", "load"]),
            st.integers(0, 3 * 4096 - 1),
            st.sampled_from([1, 2, 4, 8, 3, 16, 63, 64, 65, 200, 4097]),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_accesses_of_any_size_and_alignment_match_a_flat_model(ops):
    m = make_machine("rome")
    core, pt = long_mode(m)
    for i, (pa, enc) in enumerate(LAYOUT):
        pt.map(BASE + i * PAGE_4K, pa, PAGE_4K, P | RW, encrypted=enc)
    model = bytearray(3 * 4096)
    core.write(BASE, bytes(model))
    for op, off, size, fill in ops:
        size = min(size, len(model) - off)
        va = BASE + off
        if op == "write":
            data = bytes((fill + i) & 0xFF for i in range(size))
            core.write(va, data)
            model[off : off + size] = data
        elif op == "read":
            assert core.read(va, size) == bytes(model[off : off + size])
        elif op == "store" and size in (1, 2, 4, 8):
            value = int.from_bytes(bytes((fill * 7 + i) & 0xFF for i in range(size)), "little")
            core.store(va, size, value)
            model[off : off + size] = value.to_bytes(size, "little")
        elif op == "load" and size in (1, 2, 4, 8):
            assert core.load(va, size) == int.from_bytes(model[off : off + size], "little")
    core.wbinvd()
    for i, (pa, enc) in enumerate(LAYOUT):
        stored = m.dram.read(pa, 4096)
        page = bytes(model[i * 4096 : (i + 1) * 4096])
        if enc:
            assert stored != page and Phys(m, encrypted=True).read(pa, 4096) == page
        else:
            assert stored == page


def test_an_access_that_faults_on_its_second_page_changes_nothing():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(BASE, 0x21_3000, PAGE_4K, P | RW)  # the next page is not mapped
    core.write(BASE + 4090, b"before")
    with pytest.raises(PageFault) as exc:
        core.write(BASE + 4090, b"0123456789")
    assert exc.value.address == core.cr2 == BASE + 4096  # the first byte of the faulting page
    assert core.read(BASE + 4090, 6) == b"before"
    with pytest.raises(PageFault):
        core.load(BASE + 4092, 8)


def test_fetch_reads_through_the_same_path():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(BASE, 0x21_3000, PAGE_4K, P | RW, encrypted=True)
    core.write(BASE, b"\x0f\x01\xd8")  # VMRUN's opcode, as data
    assert core.fetch(BASE, 3) == b"\x0f\x01\xd8"
