"""x86-64 page tables built the way kernel code builds them: by storing entries in memory.

The builder never touches the silicon directly. It reads and writes table pages through a
``TableAccess`` — for the host kernel that is a range of its own virtual address space
(the identity map during early boot, the direct map afterwards), for KVM's nested tables
the host direct map, for a guest kernel its own vCPU — so whether the tables end up
encrypted in DRAM, and with which key, depends on the mapping used, exactly as on hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sevsim.soc.paging import (
    NX,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PAT_4K,
    PAT_LARGE,
    PCD,
    PS,
    PWT,
    RW,
    A,
    D,
    G,
    P,
)

ENTRY_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12; the C-bit is handled separately

# Linux's flag sets (arch/x86/include/asm/pgtable_types.h), without _PAGE_ENC.
KERNPG_TABLE = P | RW | A | D
PAGE_KERNEL = P | RW | A | D | G | NX
PAGE_KERNEL_EXEC = P | RW | A | D | G


class TableAccess(Protocol):
    def read(self, pa: int, n: int) -> bytes: ...

    def write(self, pa: int, data: bytes) -> None: ...


class LinearWindow:
    """Physical memory seen through a core at linear address pa + offset."""

    def __init__(self, core, offset: int) -> None:
        self.core = core
        self.offset = offset

    def read(self, pa: int, n: int) -> bytes:
        return self.core.read(pa + self.offset, n)

    def write(self, pa: int, data: bytes) -> None:
        self.core.write(pa + self.offset, data)


@dataclass
class Leaf:
    """Where a virtual address is mapped, as software reads it from the tables."""

    entry_pa: int
    entry: int
    level: int  # 1 = PTE, 2 = PDE, 3 = PDPTE
    size: int


class PageTables:
    """One set of 4- or 5-level tables rooted at ``root_pa``.

    ``me_mask`` is the C-bit (Linux's sme_me_mask); it is added to every entry that points
    to a table when ``encrypted_tables`` is set, and to CR3 by ``cr3()``.
    """

    def __init__(
        self,
        mem: TableAccess,
        alloc_page: Callable[[], int],
        me_mask: int = 0,
        encrypted_tables: bool = False,
        levels: int = 4,
        root_pa: int | None = None,
        table_flags: int = KERNPG_TABLE,
    ) -> None:
        self.mem = mem
        self.table_flags = table_flags  # bits of the entries that point to tables
        self.alloc_page = alloc_page
        self.me_mask = me_mask
        self.table_c = me_mask if encrypted_tables else 0
        self.levels = levels
        if root_pa is None:
            root_pa = self.new_table()
        self.root_pa = root_pa

    def new_table(self) -> int:
        pa = self.alloc_page()
        self.mem.write(pa, bytes(PAGE_4K))
        return pa

    def cr3(self) -> int:
        return self.root_pa | self.table_c

    def read_entry(self, entry_pa: int) -> int:
        return int.from_bytes(self.mem.read(entry_pa, 8), "little")

    def write_entry(self, entry_pa: int, value: int) -> None:
        self.mem.write(entry_pa, value.to_bytes(8, "little"))

    def _entry_pa(self, table_pa: int, va: int, level: int) -> int:
        return table_pa + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * 8

    def map(
        self,
        va: int,
        pa: int,
        size: int = PAGE_4K,
        flags: int = PAGE_KERNEL,
        encrypted: bool = False,
        pat_index: int = 0,
    ) -> None:
        """Map one page of ``size`` (4 KiB, 2 MiB or 1 GiB) at va -> pa.

        ``flags`` are the permission bits (no PS/PWT/PCD/PAT); ``pat_index`` (0..7) picks
        the PAT entry, i.e. the memory type, and is encoded in PWT, PCD and the PAT bit of
        the entry's format."""
        leaf_level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}[size]
        if va % size or pa % size:
            raise ValueError(f"{size:#x} mapping of {va:#x} -> {pa:#x} is not aligned")
        table = self.root_pa
        for level in range(self.levels, leaf_level, -1):
            epa = self._entry_pa(table, va, level)
            e = self.read_entry(epa)
            if not e & P:
                child = self.new_table()
                self.write_entry(epa, child | self.table_flags | self.table_c)
                table = child
            elif e & PS:
                raise ValueError(f"{va:#x} is inside a large page; split it first")
            else:
                table = e & ENTRY_ADDR_MASK & ~self.me_mask
        if flags & (PS | PWT | PCD | PAT_LARGE):
            raise ValueError("pass the memory type as pat_index, not as entry bits")
        leaf_flags = flags | (PWT if pat_index & 1 else 0) | (PCD if pat_index & 2 else 0)
        if size == PAGE_4K:
            leaf_flags |= PAT_4K if pat_index & 4 else 0
        else:
            leaf_flags |= PS | (PAT_LARGE if pat_index & 4 else 0)
        value = pa | leaf_flags | (self.me_mask if encrypted else 0)
        self.write_entry(self._entry_pa(table, va, leaf_level), value)

    def map_range(
        self,
        va: int,
        pa: int,
        length: int,
        flags: int = PAGE_KERNEL,
        encrypted: bool = False,
        pat_index: int = 0,
    ) -> None:
        """Map [va, va+length) with 2 MiB pages where aligned and 4 KiB pages at the
        unaligned edges (Linux's __sme_map_range)."""
        end = va + length
        while va < end:
            if va % PAGE_2M == 0 and pa % PAGE_2M == 0 and end - va >= PAGE_2M:
                self.map(va, pa, PAGE_2M, flags, encrypted, pat_index)
                step = PAGE_2M
            else:
                self.map(va, pa, PAGE_4K, flags, encrypted, pat_index)
                step = PAGE_4K
            va += step
            pa += step

    def clear_top_entries(self, va: int, length: int) -> None:
        """Zero the top-level entries covering [va, va+length) (Linux's sme_clear_pgd)."""
        shift = 12 + 9 * (self.levels - 1)
        for index in range(va >> shift, ((va + length - 1) >> shift) + 1):
            self.write_entry(self.root_pa + (index & 0x1FF) * 8, 0)

    def path(self, va: int) -> list[tuple[int, int, int]]:
        """(level, entry address, entry value) of every entry a walk of va reads."""
        out = []
        table = self.root_pa
        for level in range(self.levels, 0, -1):
            epa = self._entry_pa(table, va, level)
            e = self.read_entry(epa)
            out.append((level, epa, e))
            if not e & P or level == 1 or (level in (2, 3) and e & PS):
                break
            table = e & ENTRY_ADDR_MASK & ~self.me_mask
        return out

    def leaf(self, va: int) -> Leaf | None:
        """Software walk: the leaf entry mapping va, or None if unmapped."""
        table = self.root_pa
        for level in range(self.levels, 0, -1):
            epa = self._entry_pa(table, va, level)
            e = self.read_entry(epa)
            if not e & P:
                return None
            if level == 1 or (level in (2, 3) and e & PS):
                return Leaf(epa, e, level, 1 << (12 + 9 * (level - 1)))
            table = e & ENTRY_ADDR_MASK & ~self.me_mask
        return None

    def leaf_4k(self, va: int) -> Leaf:
        """The 4 KiB leaf mapping va, splitting large pages on the way (Linux's CPA does
        this before it changes one page's attributes)."""
        leaf = self.leaf(va)
        while leaf is not None and leaf.level > 1:
            leaf = self.split(va)
        if leaf is None:
            raise ValueError(f"{va:#x} is not mapped")
        return leaf

    def leaf_within(self, va: int, end: int) -> Leaf:
        """The leaf mapping va, split until its page starts at va and ends by ``end``: a
        large page whose whole range changes keeps its size (Linux's CPA,
        try_preserve_large_page)."""
        leaf = self.leaf(va)
        while leaf is not None and leaf.level > 1 and (va % leaf.size or va + leaf.size > end):
            leaf = self.split(va)
        if leaf is None:
            raise ValueError(f"{va:#x} is not mapped")
        return leaf

    def split(self, va: int) -> Leaf:
        """Split the large page holding va into 512 smaller ones with the same attributes
        (including the C-bit); returns the new, smaller leaf for va."""
        leaf = self.leaf(va)
        if leaf is None or leaf.level == 1:
            raise ValueError(f"{va:#x} is not mapped by a large page")
        child_size = leaf.size // 512
        e = leaf.entry
        frame = e & ENTRY_ADDR_MASK & ~self.me_mask & ~(leaf.size - 1)
        flags = (e & ~ENTRY_ADDR_MASK & ~self.me_mask) | (e & PAT_LARGE)  # low flags, NX, PAT
        c = e & self.me_mask
        if child_size == PAGE_4K:
            flags &= ~PS
            if e & PAT_LARGE:
                flags = (flags & ~PAT_LARGE) | PAT_4K
        table = self.new_table()
        data = b"".join(
            (frame + i * child_size | flags | c).to_bytes(8, "little") for i in range(512)
        )
        self.mem.write(table, data)
        self.write_entry(leaf.entry_pa, table | self.table_flags | self.table_c)
        new = self.leaf(va)
        assert new is not None
        return new
