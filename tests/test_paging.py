"""Page walks over real page-table bytes: the C-bit at every level, reserved bits from the
address-space reduction (hardware.md §3.2), page sizes, A/D bits, permissions, modes."""

from __future__ import annotations

import pytest
from conftest import ALL_PROFILES, Bump, Phys, long_mode, make_machine

from sevsim.pagetables import PageTables
from sevsim.profiles import PROFILES
from sevsim.soc import GeneralProtection, PageFault, msr
from sevsim.soc.faults import PF_ID, PF_P, PF_RSVD, PF_U, PF_W
from sevsim.soc.paging import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LME,
    EFER_NXE,
    NX,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PS,
    RW,
    US,
    A,
    D,
    P,
)

VA = 0x0000_4000_0020_0000
FLAGS = P | RW


def reserved_bits(name: str) -> list[int]:
    p = PROFILES[name]
    return [b for b in range(p.maxphyaddr - p.phys_reduction, 52) if b != p.cbit]


CASES = [
    (name, bit, level)
    for name in ALL_PROFILES
    for bit in reserved_bits(name)
    for level in (4, 3, 2, 1)
]


@pytest.mark.parametrize(("name", "bit", "level"), CASES)
def test_reserved_address_bit_at_every_level_faults_rsvd(name, bit, level):
    m = make_machine(name)
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    core.load(VA, 8)  # fine before
    epa = {lvl: epa for lvl, epa, _ in pt.path(VA)}[level]
    pt.write_entry(epa, pt.read_entry(epa) | 1 << bit)
    core.invlpg(VA)
    with pytest.raises(PageFault) as exc:
        core.load(VA, 8)
    assert exc.value.error_code == PF_P | PF_RSVD
    assert exc.value.address == VA


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_c_bit_is_not_reserved_at_any_level(name):
    m = make_machine(name)
    core, pt = long_mode(m, encrypted_tables=True)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS, encrypted=True)
    assert all(e & m.cbit_mask for _, _, e in pt.path(VA))
    core.store(VA, 8, 0x1122334455667788)
    assert core.load(VA, 8) == 0x1122334455667788
    assert core.cr3 & m.cbit_mask


def test_without_smee_the_unreduced_bits_are_address_bits():
    # Rome: C-bit 47 is an ordinary address bit when SYSCFG[23] is clear; bits 48..51 reserved.
    m = make_machine("rome", smee=False, dram_size=1 << 32)
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    leaf_pa = pt.path(VA)[-1][1]
    pt.write_entry(leaf_pa, pt.read_entry(leaf_pa) | 1 << 45)
    core.invlpg(VA)
    assert core.translate(VA).page_pa == 0x20_0000 | 1 << 45
    pt.write_entry(leaf_pa, pt.read_entry(leaf_pa) | 1 << 48)
    core.invlpg(VA)
    with pytest.raises(PageFault) as exc:
        core.load(VA, 8)
    assert exc.value.error_code & PF_RSVD
    m2 = make_machine("milan", smee=False)  # C-bit 51 >= MAXPHYADDR 48: reserved
    core2, pt2 = long_mode(m2)
    pt2.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    leaf2 = pt2.path(VA)[-1][1]
    pt2.write_entry(leaf2, pt2.read_entry(leaf2) | 1 << 51)
    with pytest.raises(PageFault):
        core2.load(VA, 8)


def test_structural_reserved_bits():
    m = make_machine("milan")
    core, pt = long_mode(m, nxe=False)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    path = {lvl: epa for lvl, epa, _ in pt.path(VA)}
    for level, bit in ((4, 7), (1, 63)):  # PS in a PML4E; NX without EFER.NXE
        original = pt.read_entry(path[level])
        pt.write_entry(path[level], original | 1 << bit)
        core.invlpg(VA)
        with pytest.raises(PageFault) as exc:
            core.load(VA, 8)
        assert exc.value.error_code == PF_P | PF_RSVD
        pt.write_entry(path[level], original)
    core.invlpg(VA)
    core.load(VA, 8)


@pytest.mark.parametrize(
    ("size", "low_bit"), [(PAGE_2M, 13), (PAGE_2M, 20), (PAGE_1G, 13), (PAGE_1G, 29)]
)
def test_large_page_unaligned_address_bits_are_reserved(size, low_bit):
    m = make_machine("milan")
    core, pt = long_mode(m)
    va = 0x0000_0040_0000_0000
    pt.map(va, PAGE_1G, size, FLAGS)
    leaf = pt.leaf(va)
    pt.write_entry(leaf.entry_pa, leaf.entry | 1 << low_bit)
    with pytest.raises(PageFault) as exc:
        core.load(va, 8)
    assert exc.value.error_code == PF_P | PF_RSVD


@pytest.mark.parametrize("size", [PAGE_4K, PAGE_2M, PAGE_1G])
def test_each_page_size_translates(size):
    m = make_machine("genoa")
    core, pt = long_mode(m)
    va = 0x0000_0080_0000_0000
    pa = 2 * PAGE_1G
    pt.map(va, pa, size, FLAGS)
    offset = size - 4096 + 0x123
    core.write(va + offset, b"here")
    assert core.translate(va + offset).page_pa == pa + offset - 0x123
    assert core.translate(va + offset).page_size == size
    assert Phys(m).read(pa + offset, 4) == b"here"


def test_accessed_and_dirty_bits_are_written_back():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    for _, epa, e in pt.path(VA):  # Linux's table flags preset A and D; start clean
        pt.write_entry(epa, e & ~(A | D))
    assert not any(e & (A | D) for _, _, e in pt.path(VA))
    core.load(VA, 8)
    path = pt.path(VA)
    assert all(e & A for _, _, e in path)
    assert not path[-1][2] & D
    core.store(VA, 8, 1)
    assert pt.path(VA)[-1][2] & D
    assert not any(e & D for _, _, e in pt.path(VA)[:-1])


def test_store_to_a_clean_page_sets_dirty_even_after_a_read_hit():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    core.load(VA, 8)  # TLB entry with D clear
    core.store(VA, 8, 7)  # must re-walk to set D
    assert pt.path(VA)[-1][2] & D
    assert core.load(VA, 8) == 7


@pytest.mark.parametrize(
    ("flags", "cpl", "wp", "action", "code"),
    [
        (P | RW, 3, True, "read", PF_P | PF_U),  # user touches a supervisor page
        (P | US, 3, True, "write", PF_P | PF_W | PF_U),  # user writes a read-only page
        (P | US | RW, 0, True, "fetch_nx", PF_P | PF_ID),  # fetch from a no-execute page
        (P, 0, True, "write", PF_P | PF_W),  # kernel write, CR0.WP set
        (0, 0, True, "read", 0),  # not present
        (0, 3, True, "write", PF_W | PF_U),  # not present, user write
    ],
)
def test_permission_faults_carry_the_architectural_error_code(flags, cpl, wp, action, code):
    m = make_machine("milan")
    core, pt = long_mode(m)
    extra = NX if action == "fetch_nx" else 0
    pt.map(VA, 0x20_0000, PAGE_4K, flags | extra)
    for _level, epa, e in pt.path(VA)[:-1]:  # upper levels allow everything
        pt.write_entry(epa, e | US)
    core.cpl = cpl
    if not wp:
        core.write_cr0(core.cr0 & ~CR0_WP)
    with pytest.raises(PageFault) as exc:
        if action == "read":
            core.load(VA, 8)
        elif action == "write":
            core.store(VA, 8, 1)
        else:
            core.fetch(VA, 4)
    assert exc.value.error_code == code


def test_kernel_may_write_read_only_pages_when_cr0_wp_is_clear():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, P)
    core.write_cr0(core.cr0 & ~CR0_WP)
    core.store(VA, 4, 0xABCD)
    assert core.load(VA, 4) == 0xABCD


def test_encrypted_tables_are_ciphertext_in_dram_and_need_the_c_bit_in_cr3():
    m = make_machine("milan")
    core, pt = long_mode(m, encrypted_tables=True)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS, encrypted=True)
    core.store(VA, 8, 42)
    m.cores[0].wbinvd()
    level, pml4e_pa, entry = pt.path(VA)[0]
    assert m.dram.read(pml4e_pa, 8) != entry.to_bytes(8, "little")
    core.write_cr3(pt.root_pa)  # the same tables, without the C-bit in CR3
    with pytest.raises(PageFault):
        core.load(VA, 8)  # the PML4 decrypts to garbage
    core.write_cr3(pt.cr3())
    assert core.load(VA, 8) == 42


def test_data_c_bit_decides_how_the_page_is_stored():
    m = make_machine("rome")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS, encrypted=True)
    pt.map(VA + 4096, 0x20_0000, PAGE_4K, FLAGS, encrypted=False)  # a C=0 alias
    core.write(VA, b"private")
    core.wbinvd()
    assert m.dram.read(0x20_0000, 7) != b"private"
    assert core.read(VA + 4096, 7) == m.dram.read(0x20_0000, 7)  # the alias sees ciphertext


def test_tlb_keeps_stale_translations_until_invalidated():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    Phys(m).write(0x20_0000, b"old-page")
    Phys(m).write(0x30_0000, b"new-page")
    assert core.read(VA, 8) == b"old-page"
    leaf = pt.leaf(VA)
    pt.write_entry(leaf.entry_pa, (leaf.entry & ~0x20_0000) | 0x30_0000)
    assert core.read(VA, 8) == b"old-page"  # no INVLPG yet
    core.invlpg(VA)
    assert core.read(VA, 8) == b"new-page"


def test_cr3_write_keeps_global_pages_and_pge_toggle_drops_them():
    from sevsim.soc.paging import CR4_PGE, G

    m = make_machine("milan")
    core, pt = long_mode(m)
    core.write_cr4(core.cr4 | CR4_PGE)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS | G)
    pt.map(VA + 4096, 0x20_1000, PAGE_4K, FLAGS)
    Phys(m).write(0x30_0000, b"moved")
    core.read(VA, 1), core.read(VA + 4096, 1)
    for va in (VA, VA + 4096):
        leaf = pt.leaf(va)
        pt.write_entry(leaf.entry_pa, (leaf.entry & ~0xFFFFF000) | 0x30_0000 | (leaf.entry & 0xFFF))
    core.write_cr3(core.cr3)
    assert core.read(VA, 5) != b"moved"  # global: survives the CR3 write
    assert core.read(VA + 4096, 5) == b"moved"
    core.write_cr4(core.cr4 & ~CR4_PGE)
    assert core.read(VA, 5) == b"moved"


def test_tlb_is_tagged_by_asid():
    m = make_machine("milan")
    core, pt = long_mode(m)
    pt.map(VA, 0x20_0000, PAGE_4K, FLAGS)
    Phys(m).write(0x20_0000, b"asid-0")
    Phys(m).write(0x30_0000, b"asid-9")
    assert core.read(VA, 6) == b"asid-0"
    leaf = pt.leaf(VA)
    pt.write_entry(leaf.entry_pa, (leaf.entry & ~0x20_0000) | 0x30_0000)
    core.switch_asid(600)  # an unencrypted-guest ASID: no key involved
    assert core.read(VA, 6) == b"asid-9"  # no stale hit from ASID 0's entry
    core.switch_asid(0)
    assert core.read(VA, 6) == b"asid-0"  # ASID 0's entry is still there
    with pytest.raises(GeneralProtection):
        core.switch_asid(1 << 20)


def test_large_page_invlpg_drops_the_whole_page():
    m = make_machine("milan")
    core, pt = long_mode(m)
    va = 0x0000_0040_0000_0000
    pt.map(va, PAGE_2M, PAGE_2M, FLAGS)
    core.read(va, 1), core.read(va + 0x1000, 1)
    leaf = pt.leaf(va)
    pt.write_entry(leaf.entry_pa, (leaf.entry & ~PAGE_2M) | 2 * PAGE_2M)
    core.invlpg(va + 0x5000)
    assert core.translate(va + 0x1000).page_pa == 2 * PAGE_2M + 0x1000


def test_one_large_page_entry_serves_every_4k_page_it_covers():
    m = make_machine("milan")
    core, pt = long_mode(m)
    va = 0x0000_0040_0000_0000
    pt.map(va, PAGE_2M, PAGE_2M, FLAGS)
    Phys(m).write(PAGE_2M + 0x7_3000, b"first")
    Phys(m).write(2 * PAGE_2M + 0x7_3000, b"moved")
    core.read(va, 1)  # one walk fills a 2 MiB entry
    leaf = pt.leaf(va)
    pt.write_entry(leaf.entry_pa, (leaf.entry & ~PAGE_2M) | 2 * PAGE_2M)
    # Another 4 KiB page of the same large page: a TLB hit on the stale entry, no walk.
    assert core.read(va + 0x7_3000, 5) == b"first"
    assert core.translate(va + 0x1F_F000).page_pa == PAGE_2M + 0x1F_F000
    core.invlpg(va + 0x10_0000)
    assert core.read(va + 0x7_3000, 5) == b"moved"


def test_non_canonical_address_is_a_general_protection_fault():
    m = make_machine("milan")
    core, _ = long_mode(m)
    with pytest.raises(GeneralProtection):
        core.load(0x0000_8000_0000_0000, 8)


def test_five_level_paging_on_genoa_only():
    m = make_machine("genoa")
    core, pt = long_mode(m, levels=5)
    va = 0x0080_0000_0000_0000  # needs 57-bit linear addresses
    pt.map(va, 0x20_0000, PAGE_4K, FLAGS)
    core.write(va, b"la57")
    assert Phys(m).read(0x20_0000, 4) == b"la57"
    milan = make_machine("milan").cores[0]
    with pytest.raises(GeneralProtection):
        milan.write_cr4(CR4_LA57)


def test_real_and_protected_mode_access_physical_memory_in_plaintext():
    m = make_machine("milan")
    core = m.cores[0]
    assert core.mode.name == "NONE"
    core.write(0x7C00, b"boot sector")
    core.write_cr0(core.cr0 | CR0_PE)
    assert core.read(0x7C00, 11) == b"boot sector"
    core.wbinvd()
    assert m.dram.read(0x7C00, 11) == b"boot sector"


def test_legacy_32bit_paging_with_4k_and_4m_pages_has_no_c_bit():
    m = make_machine("rome")
    core = m.cores[0]
    core.write_cr0(core.cr0 | CR0_PE)
    pd = 0x10_0000
    pt_page = 0x10_1000
    core.write(pd, (pt_page | P | RW).to_bytes(4, "little"))  # PDE 0 -> page table
    core.write(pt_page + 4 * 5, (0x40_0000 | P | RW).to_bytes(4, "little"))  # 4K: VA 0x5000
    core.write(pd + 4 * 2, (0x80_0000 | P | RW | PS).to_bytes(4, "little"))  # 4M: VA 0x800000
    core.write_cr4(CR4_PSE)
    core.write_cr3(pd)
    core.write_cr0(core.cr0 | CR0_PG)
    assert core.mode.name == "LEGACY"
    core.write(0x5010, b"4k")
    core.write(0x80_1234, b"4m")
    assert core.translate(0x80_1234).page_size == 4 << 20
    core.wbinvd()
    assert m.dram.read(0x40_0010, 2) == b"4k"  # no C-bit in 32-bit entries: plaintext
    assert m.dram.read(0x80_1234, 2) == b"4m"


def test_pae_paging_with_c_bit_and_nx():
    m = make_machine("milan")
    core = m.cores[0]
    core.write_cr0(core.cr0 | CR0_PE)
    pdpt, pd = 0x10_0000, 0x10_1000
    phys = Phys(m)
    phys.write(pdpt, (pd | P).to_bytes(8, "little"))
    phys.write(pd + 8, (0x20_0000 | P | RW | PS | m.cbit_mask).to_bytes(8, "little"))  # 2M, C=1
    core.wrmsr(msr.EFER, EFER_NXE)
    core.write_cr4(CR4_PAE)
    core.write_cr3(pdpt)
    core.write_cr0(core.cr0 | CR0_PG)
    assert core.mode.name == "PAE"
    core.write(0x20_0040, b"pae, encrypted")
    core.wbinvd()
    assert m.dram.read(0x20_0040, 14) != b"pae, encrypted"
    assert core.read(0x20_0040, 14) == b"pae, encrypted"
    phys.write(pd + 8, (0x20_0000 | P | RW | PS | NX).to_bytes(8, "little"))
    core.invlpg(0x20_0000)
    with pytest.raises(PageFault) as exc:
        core.fetch(0x20_0040, 1)
    assert exc.value.error_code == PF_P | PF_ID


def test_mode_switch_rules():
    m = make_machine("milan")
    core = m.cores[0]
    with pytest.raises(GeneralProtection):
        core.write_cr0(core.cr0 | CR0_PG)  # paging without protection
    core.write_cr0(core.cr0 | CR0_PE)
    core.wrmsr(msr.EFER, EFER_LME)
    with pytest.raises(GeneralProtection):
        core.write_cr0(core.cr0 | CR0_PG)  # long mode without PAE
    tables = PageTables(Phys(m), Bump())
    core.write_cr4(CR4_PAE)
    core.write_cr3(tables.cr3())
    core.write_cr0(core.cr0 | CR0_PG)
    assert core.long_mode
    with pytest.raises(GeneralProtection):
        core.wrmsr(msr.EFER, 0)  # clearing LME with paging on
    with pytest.raises(GeneralProtection):
        core.write_cr4(0)  # clearing PAE in long mode
    with pytest.raises(GeneralProtection):
        core.write_cr3(1 << 45)  # a reduced-away address bit in CR3
