"""x86 paging over real page-table bytes, with the C-bit (hardware.md §3).

The walker reads entries through a ``TableMemory`` (the core gives it one that goes through
the cache with the key the pointing entry's C-bit selects), so an encrypted page table is
really read decrypted, and a table read with the wrong key really is garbage.

Formats: legacy 32-bit (4 KiB and 4 MiB pages, PSE-36), PAE (4 KiB, 2 MiB), long mode with
4 or 5 levels (4 KiB, 2 MiB, 1 GiB). The C-bit exists only in the 64-bit formats. Reserved
bits follow §3.2: with SYSCFG[23] set, address bits from MAXPHYADDR - reduction up to bit 51
are reserved except the C-bit; a present entry with a reserved bit gives #PF with RSVD.

MODEL choices (documented in docs/model.md): PAE PDPTEs are read during the walk, not
cached at CR3 load, so a reserved bit in one gives #PF(RSVD) rather than #GP; MTRRs are
all WB, so the memory type comes from the PAT alone; accessed and dirty bits are written
only when the access succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from sevsim.soc.cache import MemType
from sevsim.soc.faults import PF_ID, PF_P, PF_RSVD, PF_U, PF_W, PageFault

# Entry bits (the same positions in every format that has them).
P = 1 << 0
RW = 1 << 1
US = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
A = 1 << 5
D = 1 << 6
PS = 1 << 7  # page size in PDE/PDPTE; the PAT bit in a 4 KiB PTE
PAT_4K = 1 << 7
G = 1 << 8
PAT_LARGE = 1 << 12
NX = 1 << 63

# Control-register and EFER bits the walker depends on.
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_SMEP = 1 << 20
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_4M = 1 << 22
PAGE_1G = 1 << 30

DEFAULT_PAT = 0x0007040600070406  # the reset value: WB, WT, UC-, UC, WB, WT, UC-, UC


class Access(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


class PagingMode(IntEnum):
    NONE = 0  # real mode or protected mode without paging: linear = physical
    LEGACY = 1  # 32-bit paging, 2 levels of 4-byte entries
    PAE = 2  # 32-bit PAE paging, 3 levels of 8-byte entries
    LONG4 = 4  # long mode, 4-level paging
    LONG5 = 5  # long mode, 5-level paging (CR4.LA57)


class TableMemory(Protocol):
    def read_entry(self, pa: int, size: int, c_bit: bool) -> int: ...

    def write_entry(self, pa: int, size: int, c_bit: bool, value: int) -> None: ...


@dataclass(slots=True)
class Translation:
    """A successful walk: what a TLB entry holds."""

    page_pa: int  # physical address of the 4 KiB page holding the VA, C-bit removed
    c_bit: bool  # the leaf's C-bit: the data's encryption attribute
    memtype: MemType
    writable: bool  # R/W of every level
    user: bool  # U/S of every level
    nx: bool  # NX of any level (only with EFER.NXE)
    dirty: bool
    global_: bool
    page_size: int
    page_base: int  # VA of the start of the (possibly large) page
    # Key slots decided at translation time (guest mode, hardware.md §3.4); -1: the key
    # follows from the C-bit and the current ASID.
    slot: int = -1
    fetch_slot: int = -1
    # Guest mode: the NPT's R/W, which the guest's CR0.WP=0 does not override.
    npt_writable: bool = True


@dataclass(frozen=True, slots=True)
class WalkConfig:
    """Everything about the core's state that shapes a walk; rebuilt when CRs/MSRs change."""

    mode: PagingMode
    cr3: int
    pa_bits: int  # effective physical-address width (MAXPHYADDR - reduction when SMEE is on)
    cbit_mask: int  # 0 when SYSCFG[23] is clear: the bit is then just an address/reserved bit
    nxe: bool
    wp: bool
    pse: bool
    pge: bool
    smep: bool
    pat: int

    @property
    def addr_mask(self) -> int:
        return ((1 << self.pa_bits) - 1) & ~0xFFF & ~self.cbit_mask

    def reserved_mask(self) -> int:
        """Bits that must be zero in any present 64-bit-format entry."""
        top = 52 if self.mode >= PagingMode.LONG4 else 63  # 62:52 are ignored in long mode
        mask = ((1 << top) - 1) & ~((1 << self.pa_bits) - 1) & ~self.cbit_mask
        if not self.nxe:
            mask |= NX
        return mask

    def memtype(self, pat_index: int) -> MemType:
        return MemType((self.pat >> (8 * pat_index)) & 7)


def walk(va: int, access: Access, cpl: int, cfg: WalkConfig, mem: TableMemory) -> Translation:
    """Translate a linear address, raising PageFault exactly as the hardware would."""
    if cfg.mode >= PagingMode.LONG4:
        t, visited = _walk_64(va, access, cpl, cfg, mem, levels=int(cfg.mode))
    elif cfg.mode == PagingMode.PAE:
        t, visited = _walk_pae(va, access, cpl, cfg, mem)
    else:
        t, visited = _walk_legacy(va, access, cpl, cfg, mem)
    _check_rights(va, access, cpl, cfg, t)
    # Accessed bits on every level, dirty on the leaf for a write.
    last = len(visited) - 1
    for i, (epa, size, c_bit, entry) in enumerate(visited):
        new = entry | A
        if i == last and access == Access.WRITE:
            new |= D
        if new != entry:
            mem.write_entry(epa, size, c_bit, new)
    t.dirty = t.dirty or access == Access.WRITE
    return t


def _error_code(access: Access, cpl: int, cfg: WalkConfig) -> int:
    code = PF_U if cpl == 3 else 0
    if access == Access.WRITE:
        code |= PF_W
    elif access == Access.FETCH and (cfg.nxe or cfg.smep):
        code |= PF_ID
    return code


def _not_present(va: int, access: Access, cpl: int, cfg: WalkConfig, level: str) -> PageFault:
    return PageFault(va, _error_code(access, cpl, cfg), f"{level} not present")


def _reserved(
    va: int, access: Access, cpl: int, cfg: WalkConfig, level: str, bits: int
) -> PageFault:
    code = _error_code(access, cpl, cfg) | PF_P | PF_RSVD
    return PageFault(va, code, f"{level} has reserved bits {bits:#x} set")


def _check_rights(va: int, access: Access, cpl: int, cfg: WalkConfig, t: Translation) -> None:
    why = ""
    if cpl == 3 and not t.user:
        why = "user access to a supervisor page"
    elif access == Access.WRITE and not t.writable and (cpl == 3 or cfg.wp):
        why = "write to a read-only page"
    elif access == Access.FETCH and t.nx:
        why = "fetch from a no-execute page"
    elif access == Access.FETCH and cpl < 3 and t.user and cfg.smep:
        why = "supervisor fetch from a user page (SMEP)"
    if why:
        raise PageFault(va, _error_code(access, cpl, cfg) | PF_P, why)


_LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def _pat_index(e: int, pat_bit: int) -> int:
    return (4 if e & pat_bit else 0) | (2 if e & PCD else 0) | (1 if e & PWT else 0)


def _leaf(va, frame, size, c_bit, e, pat_bit, writable, user, nx, cfg: WalkConfig) -> Translation:
    return Translation(
        page_pa=frame | (va & (size - 1) & ~0xFFF),
        c_bit=c_bit,
        memtype=cfg.memtype(_pat_index(e, pat_bit)),
        writable=writable,
        user=user,
        nx=nx,
        dirty=bool(e & D),
        global_=cfg.pge and bool(e & G),
        page_size=size,
        page_base=va & ~(size - 1),
    )


def _walk_levels(va, access, cpl, cfg: WalkConfig, mem: TableMemory, top, table, table_c, visited):
    """The 8-byte-entry levels from ``top`` down to the leaf (long mode, and PAE below its
    PDPT)."""
    addr_mask = cfg.addr_mask
    rsvd = cfg.reserved_mask()
    cbit = cfg.cbit_mask
    writable, user, nx = True, True, False
    for level in range(top, 0, -1):
        shift = 12 + 9 * (level - 1)
        epa = table + ((va >> shift) & 0x1FF) * 8
        e = mem.read_entry(epa, 8, table_c)
        name = _LEVEL_NAMES[level]
        if not e & P:
            raise _not_present(va, access, cpl, cfg, name)
        large = level in (2, 3) and bool(e & PS)
        bad = rsvd
        if level >= 4:
            bad |= PS
        elif large:
            bad |= ((1 << shift) - 1) & ~0x1FFF  # address bits below the page size, above PAT
        if e & bad:
            raise _reserved(va, access, cpl, cfg, name, e & bad)
        writable = writable and bool(e & RW)
        user = user and bool(e & US)
        nx = nx or (cfg.nxe and bool(e & NX))
        visited.append((epa, 8, table_c, e))
        c_bit = bool(e & cbit)
        if large or level == 1:
            size = 1 << shift
            frame = e & addr_mask & ~(size - 1)
            pat_bit = PAT_LARGE if large else PAT_4K
            return _leaf(va, frame, size, c_bit, e, pat_bit, writable, user, nx, cfg), visited
        table = e & addr_mask
        table_c = c_bit
    raise AssertionError("unreachable")


def _walk_64(va, access, cpl, cfg: WalkConfig, mem: TableMemory, levels: int):
    table = cfg.cr3 & cfg.addr_mask
    table_c = bool(cfg.cr3 & cfg.cbit_mask)
    return _walk_levels(va, access, cpl, cfg, mem, levels, table, table_c, [])


def _walk_pae(va, access, cpl, cfg: WalkConfig, mem: TableMemory):
    va &= 0xFFFFFFFF
    cbit = cfg.cbit_mask
    # The PDPT: 4 entries at CR3[31:5]. CR3 is 32 bits wide here, so it cannot carry a C-bit.
    epa = (cfg.cr3 & 0xFFFFFFE0) + ((va >> 30) & 3) * 8
    e = mem.read_entry(epa, 8, False)
    if not e & P:
        raise _not_present(va, access, cpl, cfg, "PDPTE")
    bad = (cfg.reserved_mask() | NX | 0x1E6) & ~cbit  # bits 2:1 and 8:5 are reserved here
    if e & bad:
        raise _reserved(va, access, cpl, cfg, "PDPTE", e & bad)
    # PAE PDPTEs have no accessed bit and no rights: the walk goes on at the PD.
    return _walk_levels(va, access, cpl, cfg, mem, 2, e & cfg.addr_mask, bool(e & cbit), [])


def _walk_legacy(va, access, cpl, cfg: WalkConfig, mem: TableMemory):
    va &= 0xFFFFFFFF
    epa = (cfg.cr3 & 0xFFFFF000) + (va >> 22) * 4
    e = mem.read_entry(epa, 4, False)
    if not e & P:
        raise _not_present(va, access, cpl, cfg, "PDE")
    writable, user = bool(e & RW), bool(e & US)
    visited = [(epa, 4, False, e)]
    if cfg.pse and e & PS:
        # 4 MiB page; PSE-36 puts physical bits 39:32 in entry bits 20:13, bit 21 is reserved.
        high_bits = max(0, min(8, cfg.pa_bits - 32))
        bad = (1 << 21) | (((1 << 8) - 1) & ~((1 << high_bits) - 1)) << 13
        if e & bad:
            raise _reserved(va, access, cpl, cfg, "PDE", e & bad)
        frame = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32)
        return _leaf(va, frame, PAGE_4M, False, e, PAT_LARGE, writable, user, False, cfg), visited
    epa = (e & 0xFFFFF000) + ((va >> 12) & 0x3FF) * 4
    e = mem.read_entry(epa, 4, False)
    if not e & P:
        raise _not_present(va, access, cpl, cfg, "PTE")
    writable, user = writable and bool(e & RW), user and bool(e & US)
    visited.append((epa, 4, False, e))
    frame = e & 0xFFFFF000
    return _leaf(va, frame, PAGE_4K, False, e, PAT_4K, writable, user, False, cfg), visited
