"""A CPU core: control registers, operating modes, CPUID/MSRs, TLB, and memory accesses.

Host software in the model is Python code that drives a core through ``load``/``store``/
``read``/``write``/``fetch``/``cpuid``/``rdmsr``/``wrmsr``/``write_cr*``/``invlpg``/
``clflush``/``wbinvd``; a real-code guest's instruction engine (``sevsim.soc.x86``) uses
the same translation (``translation``). Every access goes through the real
path: linear address -> page walk over page-table bytes in DRAM (or the TLB) -> physical
address + C-bit -> key slot -> cache -> memory controller -> DRAM.

Segmentation is flat (linear address = effective address) in every mode.

The TLB is tagged by ASID (a dict per ASID); a CR3 write drops the current ASID's
non-global entries, INVLPG one page. Stale entries are kept exactly as long as the
hardware keeps them, so software that forgets a flush sees the old translation.

Hot path: ``load``/``store`` of 1, 2, 4 or 8 bytes inside one cache line of a WB page that
hits the TLB and the cache touch two dicts and no other Python code. The ``_fast_*`` maps
are derived from the TLB for the current CPL and are dropped whenever anything they depend
on changes.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from threading import get_ident as _get_ident
from typing import TYPE_CHECKING

import numpy as np

from sevsim.soc import msr
from sevsim.soc.cache import DOMAIN_SHIFT, MemType
from sevsim.soc.cpuid import Regs, host_cpuid
from sevsim.soc.faults import GeneralProtection, PageFault
from sevsim.soc.nested import GuestMode, HostTables, vmrun
from sevsim.soc.paging import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMEP,
    DEFAULT_PAT,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    Access,
    PagingMode,
    Translation,
    WalkConfig,
    walk,
)
from sevsim.soc.svm import Exit
from sevsim.soc.turns import taking_turns

if TYPE_CHECKING:
    from sevsim.soc.machine import Machine

_UNPACK = {n: struct.Struct(f).unpack_from for n, f in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"))}
_PACK = {n: struct.Struct(f).pack_into for n, f in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"))}
_MASK = {n: (1 << (8 * n)) - 1 for n in (1, 2, 4, 8)}
# TLB keys of large-page entries: a tag above any VPN, then the VPN of the page's base.
_LARGE_TAG = {1 << 21: 1 << 60, 1 << 22: 1 << 61, 1 << 30: 1 << 62}  # 2M, 4M (32-bit), 1G
_U64 = _UNPACK[8]
_PAGE_ADDR = (1 << 52) - 4096  # a line key's page address (below the domain bits)
_EFER_WRITABLE = (1 << 0) | EFER_LME | EFER_NXE | (1 << 12)  # SCE, LME, NXE, SVME
_SYSCFG_WRITABLE = sum(1 << b for b in (18, 19, 20, 21, 22, 24, 25))  # not 23: the BIOS's


class Core:
    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.turns = machine.turns
        self.index = index
        self._profile = machine.profile
        self._memctl = machine.memctl
        self._cache = machine.cache
        self._fabric = machine.fabric
        self._dirty = machine.cache._dirty  # shared with the cache; never rebound there
        self._touch = machine.dram.touch
        self.tlb_epoch = 0  # counts TLB flushes: a cache of this TLB (the engine's) follows it
        self._tables = HostTables(self)
        self._guest: GuestMode | None = None  # set between VMRUN and #VMEXIT
        # Architectural state at reset: real mode, paging off.
        self.cr0 = 0x6000_0010
        self.cr2 = 0
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.pat = DEFAULT_PAT
        self.dr = [0, 0, 0, 0]  # DR0-DR3: while a guest runs, the values its hypervisor loaded
        self.vm_hsave_pa = 0
        self._cpl = 0
        self.asid = 0  # the host; VMRUN (a later issue) switches it
        self._tlbs: dict[int, dict[int, Translation]] = {0: {}}
        self._tlb = self._tlbs[0]
        # vpn -> the cache's dict of that page's resident lines (and, for stores, the
        # page's line-key prefix for the dirty set); only WB pages the current CPL may use.
        self._fast_r: dict[int, dict[int, bytearray]] = {}
        self._fast_w: dict[int, tuple[dict[int, bytearray], int]] = {}
        self._cfg = self._walk_config()

    def __repr__(self) -> str:
        return f"<Core {self.index} mode={self.mode.name} cpl={self._cpl} asid={self.asid}>"

    # ---- modes ---------------------------------------------------------------------------
    @property
    def mode(self) -> PagingMode:
        return self._cfg.mode

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def cpl(self) -> int:
        return self._cpl

    @cpl.setter
    def cpl(self, value: int) -> None:
        if value not in (0, 1, 2, 3):
            raise ValueError("CPL is 0..3")
        self._cpl = value
        self._drop_fast()

    def _paging_mode(self) -> PagingMode:
        if not self.cr0 & CR0_PG:
            return PagingMode.NONE
        if self.efer & EFER_LMA:
            return PagingMode.LONG5 if self.cr4 & CR4_LA57 else PagingMode.LONG4
        return PagingMode.PAE if self.cr4 & CR4_PAE else PagingMode.LEGACY

    def _walk_config(self) -> WalkConfig:
        mode = self._paging_mode()
        wide = mode in (PagingMode.PAE, PagingMode.LONG4, PagingMode.LONG5)
        if self._guest is None:
            smee = bool(self.machine.syscfg & msr.SYSCFG_MEM_ENCRYPT)
            pa_bits = self.machine.phys_bits
            cbit = smee and wide
        else:
            # Guest-physical addresses are not reduced (they all go through the NPT); the
            # C-bit means something only to an SEV guest (hardware.md §1.3, §3.3).
            pa_bits = self._profile.maxphyaddr
            cbit = self._guest.sev and wide
        return WalkConfig(
            mode=mode,
            cr3=self.cr3,
            pa_bits=pa_bits,
            cbit_mask=(1 << self._profile.cbit) if cbit else 0,
            nxe=bool(self.efer & EFER_NXE),
            wp=bool(self.cr0 & CR0_WP),
            pse=bool(self.cr4 & CR4_PSE),
            pge=bool(self.cr4 & CR4_PGE),
            smep=bool(self.cr4 & CR4_SMEP),
            pat=self.pat,
        )

    def _drop_fast(self) -> None:
        self._fast_r.clear()
        self._fast_w.clear()

    def _flush_tlb(self, keep_global: bool) -> None:
        self.tlb_epoch += 1
        if keep_global:
            for vpn in [v for v, t in self._tlb.items() if not t.global_]:
                del self._tlb[vpn]
        else:
            self._tlb.clear()
        self._drop_fast()

    def _state_changed(self, flush_all: bool) -> None:
        self._cfg = self._walk_config()
        if flush_all:
            self._flush_tlb(keep_global=False)
        else:
            self._drop_fast()

    @taking_turns
    def switch_asid(self, asid: int) -> None:
        """Change the ASID the core runs with: the TLB tag, and the key a C=1 access uses.
        This is the part of VMRUN/#VMEXIT that concerns memory; the TLB of the previous
        ASID is kept (tagged), not flushed."""
        if not 0 <= asid < self._profile.nasid:
            raise GeneralProtection(f"ASID {asid} is outside 0..{self._profile.nasid - 1}")
        self.asid = asid
        self._tlb = self._tlbs.setdefault(asid, {})
        self._drop_fast()

    # ---- control registers -------------------------------------------------------------
    @taking_turns
    def write_cr0(self, value: int) -> None:
        value &= 0xFFFF_FFFF
        if value & CR0_PG and not value & CR0_PE:
            raise GeneralProtection("CR0.PG without CR0.PE")
        turning_on = bool(value & CR0_PG) and not self.cr0 & CR0_PG
        if turning_on and self.efer & EFER_LME:
            if not self.cr4 & CR4_PAE:
                raise GeneralProtection("long mode needs CR4.PAE before CR0.PG")
            self.efer |= EFER_LMA
        if not value & CR0_PG:
            self.efer &= ~EFER_LMA
        changed = value ^ self.cr0
        self.cr0 = value
        self._state_changed(flush_all=bool(changed & (CR0_PG | CR0_PE)))

    @taking_turns
    def write_cr3(self, value: int) -> None:
        if self.long_mode:
            # Reserved: address bits the reduction removed (except the C-bit) up to bit 51.
            cbit = self._cfg.cbit_mask
            reserved = ((1 << 52) - 1) & ~((1 << self._cfg.pa_bits) - 1) & ~cbit
            if value & reserved or value >> 52:
                raise GeneralProtection(f"CR3 value {value:#x} sets reserved bits")
        else:
            value &= 0xFFFF_FFFF
        self.cr3 = value
        self._cfg = self._walk_config()
        self._flush_tlb(keep_global=True)

    @taking_turns
    def write_cr4(self, value: int) -> None:
        if self.long_mode and not value & CR4_PAE:
            raise GeneralProtection("cannot clear CR4.PAE in long mode")
        if (value ^ self.cr4) & CR4_LA57 and self.long_mode:
            raise GeneralProtection("cannot change CR4.LA57 in long mode")
        if value & CR4_LA57 and not self._profile.la57:
            raise GeneralProtection("CR4.LA57: 5-level paging is not supported by this part")
        changed = value ^ self.cr4
        self.cr4 = value
        self._state_changed(
            flush_all=bool(changed & (CR4_PGE | CR4_PAE | CR4_PSE | CR4_LA57 | CR4_SMEP))
        )

    # ---- CPUID / MSRs --------------------------------------------------------------------
    def cpuid(self, leaf: int, subleaf: int = 0) -> Regs:
        return host_cpuid(self._profile, leaf, subleaf, self.index)

    @taking_turns
    def rdmsr(self, index: int) -> int:
        m = self.machine
        if index == msr.EFER:
            return self.efer
        if index == msr.PAT:
            return self.pat
        if index == msr.SYSCFG:
            return m.syscfg
        if index == msr.HWCR:
            return m.hwcr
        if index == msr.SEV_STATUS:
            return 0 if self._guest is None else self._guest.sev_status
        if index == msr.VM_HSAVE_PA:
            return self.vm_hsave_pa
        raise GeneralProtection(f"RDMSR of unimplemented or write-only MSR {index:#x}")

    @taking_turns
    def wrmsr(self, index: int, value: int) -> None:
        m = self.machine
        if index == msr.EFER:
            if value & ~(_EFER_WRITABLE | EFER_LMA):
                raise GeneralProtection(f"EFER value {value:#x} sets reserved bits")
            if (value ^ self.efer) & EFER_LME and self.cr0 & CR0_PG:
                raise GeneralProtection("cannot change EFER.LME while paging is on")
            self.efer = (self.efer & EFER_LMA) | (value & _EFER_WRITABLE)
            self._state_changed(flush_all=True)
        elif index == msr.PAT:
            if any(((value >> (8 * i)) & 0xFF) not in (0, 1, 4, 5, 6, 7) for i in range(8)):
                raise GeneralProtection(f"PAT value {value:#x} has an invalid memory type")
            self.pat = value
            self._state_changed(flush_all=True)  # MODEL: TLB entries carry the memory type
        elif index == msr.SYSCFG:
            if (value ^ m.syscfg) & ~_SYSCFG_WRITABLE:
                raise GeneralProtection("SYSCFG: only the BIOS sets MemEncryptionModEn")
            m.syscfg = value
        elif index == msr.HWCR:
            if (value ^ m.hwcr) & msr.HWCR_SMMLOCK:
                raise GeneralProtection("HWCR.SMMLOCK is locked by the BIOS")
            m.hwcr = value
        elif index == msr.VM_HSAVE_PA:
            self.vm_hsave_pa = value
        elif index == msr.VM_PAGE_FLUSH:
            self._vm_page_flush(value)
        else:
            raise GeneralProtection(f"WRMSR to unimplemented or read-only MSR {index:#x}")

    def _vm_page_flush(self, value: int) -> None:
        """VM_PAGE_FLUSH: value = host virtual page address | guest ASID (hardware.md §2.4)."""
        if not self._profile.vm_page_flush:
            raise GeneralProtection("VM_PAGE_FLUSH is not supported by this part")
        asid = value & 0xFFF
        if asid > self._profile.max_asid:
            raise GeneralProtection(f"VM_PAGE_FLUSH: ASID {asid} is not an encrypted ASID")
        t = self.translate(value & ~0xFFF, Access.READ)
        self._cache.flush_page(t.page_pa, self._memctl.key_slot(True, asid))

    # ---- translation -----------------------------------------------------------------------
    def key_slot(self, c_bit: bool) -> int:
        return self._memctl.key_slot(c_bit, self.asid)

    def _canonical(self, va: int) -> int:
        mode = self._cfg.mode
        if mode >= PagingMode.LONG4:
            bits = 57 if mode == PagingMode.LONG5 else 48
            top = va >> (bits - 1)
            if top != 0 and top != (1 << (65 - bits)) - 1:
                raise GeneralProtection(f"non-canonical address {va:#x}")
            return va
        if not 0 <= va < 1 << 64:
            raise GeneralProtection(f"address {va:#x} is not a 64-bit value")
        return va & 0xFFFF_FFFF

    @taking_turns
    def translate(self, va: int, access: Access = Access.READ) -> Translation:
        """Linear -> physical for one access, through the TLB (filling it on a miss)."""
        t = self.translation(va, access)
        if t.memtype == MemType.WB:
            vpn = (va & (1 << 64) - 1) >> 12
            slot = t.slot if t.slot >= 0 else self.key_slot(t.c_bit)
            lines = self._cache.page_lines(slot, t.page_pa)
            if self._allowed(t, Access.READ):
                self._fast_r[vpn] = lines
            if self._allowed(t, Access.WRITE):
                self._fast_w[vpn] = (lines, (slot << DOMAIN_SHIFT) | t.page_pa)
        return t

    def translation(self, va: int, access: Access = Access.READ) -> Translation:
        """``translate`` without setting up the fast path of ``load``/``store`` (what an
        instruction engine that keeps its own TLB asks for)."""
        va = self._canonical(va)
        vpn = va >> 12
        t = self._tlb.get(vpn)
        if t is None:
            t = self._large_entry(va)
        if t is None or not self._allowed(t, access):
            if self._guest is not None:
                t = self._guest.translate(va, access, self._cfg, self._cpl)
            elif self._cfg.mode == PagingMode.NONE:
                t = Translation(
                    va & ~0xFFF,
                    False,
                    MemType.WB,
                    True,
                    True,
                    False,
                    True,
                    False,
                    4096,
                    va & ~0xFFF,
                )
            else:
                try:
                    t = walk(va, access, self._cpl, self._cfg, self._tables)
                except PageFault as fault:
                    self.cr2 = fault.address
                    raise
            self._tlb[vpn] = t
            if t.page_size > 4096:
                # A large-page entry serves every 4 KiB page it covers, as on hardware.
                base_pa = t.page_pa - ((va & ~0xFFF) - t.page_base)
                self._tlb[_LARGE_TAG[t.page_size] | t.page_base >> 12] = replace(t, page_pa=base_pa)
        return t

    def _large_entry(self, va: int) -> Translation | None:
        """A 2 MiB or 1 GiB TLB entry covering va, as the 4 KiB page's translation."""
        for size, tag in _LARGE_TAG.items():
            base = va & ~(size - 1)
            t = self._tlb.get(tag | base >> 12)
            if t is not None:
                t = replace(t, page_pa=t.page_pa + ((va & ~0xFFF) - base))
                self._tlb[va >> 12] = t
                return t
        return None

    def _slot(self, t: Translation, access: Access) -> int:
        if t.slot < 0:
            return self.key_slot(t.c_bit)
        return t.fetch_slot if access == Access.FETCH else t.slot

    def _allowed(self, t: Translation, access: Access) -> bool:
        if self._cpl == 3 and not t.user:
            return False
        if access == Access.WRITE:
            return (
                t.dirty and (t.writable or (self._cpl < 3 and not self._cfg.wp)) and t.npt_writable
            )
        if access == Access.FETCH:
            return not t.nx and not (self._cpl < 3 and t.user and self._cfg.smep)
        return True

    def _pieces(
        self, va: int, n: int, access: Access, fast: bool = True
    ) -> list[tuple[int, int, MemType, int]]:
        """Translate every page an access touches *before* any byte moves, so an access
        that faults on its second page has no effect (as on hardware). ``fast=False``: no
        fast path for later loads and stores is set up (a streaming access goes through
        the fabric's snoop, and setting one up would first pull an instruction engine's
        lines of the page into the cache one by one)."""
        pieces = []
        pos, end = va, va + n
        translate = self.translate if fast else self.translation
        while pos < end:
            t = translate(pos, access)
            # The rest of a large page is contiguous and has the same attributes.
            length = min(end, t.page_base + t.page_size) - pos
            pieces.append((t.page_pa | (pos & 0xFFF), self._slot(t, access), t.memtype, length))
            pos += length
        return pieces

    @taking_turns
    def invlpg(self, va: int) -> None:
        """Drop the translation of the page holding va, whatever its size."""
        va = self._canonical(va)
        self.tlb_epoch += 1
        self._tlb.pop(va >> 12, None)
        covering = [
            vpn
            for vpn, t in self._tlb.items()
            if t.page_size > 4096 and t.page_base <= va < t.page_base + t.page_size
        ]
        for vpn in covering:
            del self._tlb[vpn]
        self._drop_fast()

    # ---- memory accesses ---------------------------------------------------------------------
    def load(self, va: int, size: int = 8) -> int:
        """A data load of 1, 2, 4 or 8 bytes (any alignment), little-endian."""
        turns = self.turns
        if turns.owner != (turns.local.activity or _get_ident()):  # (taking_turns, inlined)
            with turns:
                return self.load(va, size)
        lines = self._fast_r.get(va >> 12)
        if lines is not None:
            off = va & 63
            if off + size <= 64:
                line = lines.get((va >> 6) & 63)
                if line is not None:
                    if size == 8:
                        return _U64(line, off)[0]
                    if size in _UNPACK:
                        return _UNPACK[size](line, off)[0]
        return int.from_bytes(self.read(va, size), "little")

    def store(self, va: int, size: int, value: int) -> None:
        """A data store of 1, 2, 4 or 8 bytes (any alignment), little-endian."""
        turns = self.turns
        if turns.owner != (turns.local.activity or _get_ident()):  # (taking_turns, inlined)
            with turns:
                return self.store(va, size, value)
        entry = self._fast_w.get(va >> 12)
        if entry is not None and (va & 63) + size <= 64 and size in _PACK:
            line = entry[0].get((va >> 6) & 63)
            if line is not None:
                _PACK[size](line, va & 63, value & _MASK[size])
                self._dirty.add(entry[1] | (va & 0xFC0))
                self._touch(entry[1] & _PAGE_ADDR, 1)
                return
        self.write(va, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read(self, va: int, n: int) -> bytes:
        """Read n bytes of data at va (crossing lines and pages as needed)."""
        turns = self.turns
        if turns.owner != (turns.local.activity or _get_ident()):  # (taking_turns, inlined)
            with turns:
                return self.read(va, n)
        # ``load``'s fast path for any size inside one resident line (a small kernel copy).
        lines = self._fast_r.get(va >> 12)
        if lines is not None and (va & 63) + n <= 64:
            line = lines.get((va >> 6) & 63)
            if line is not None:
                return bytes(line[va & 63 : (va & 63) + n])
        fast = self._fast_page(va, n)
        if fast is not None:
            return self._cache.read(fast[0], n, fast[1])
        return self._read(va, n, Access.READ)

    def _fast_page(self, va: int, n: int) -> tuple[int, int] | None:
        """(pa, slot) of [va, va+n) when it lies in one page that ``store``'s fast path is
        set up for (WB, writable at this CPL, translated since the last TLB flush, so
        readable too); None otherwise. Saves a TLB lookup's checks for small copies."""
        entry = self._fast_w.get(va >> 12)
        if entry is None or not 0 < n <= 4096 - (va & 0xFFF):
            return None
        key = entry[1]
        return (key & _PAGE_ADDR) | (va & 0xFFF), key >> DOMAIN_SHIFT

    @taking_turns
    def fetch(self, va: int, n: int) -> bytes:
        """Instruction fetch of n bytes at va: execute permission, fetch error codes."""
        return self._read(va, n, Access.FETCH)

    def _read(self, va: int, n: int, access: Access) -> bytes:
        pieces = self._pieces(va, n, access)
        cache = self._cache
        if len(pieces) == 1:
            pa, slot, memtype, length = pieces[0]
            return cache.read(pa, length, slot, memtype)
        return b"".join(cache.read(pa, length, slot, mt) for pa, slot, mt, length in pieces)

    def write(self, va: int, data: bytes) -> None:
        """Write bytes at va; nothing is written if any page of the range faults."""
        turns = self.turns
        if turns.owner != (turns.local.activity or _get_ident()):  # (taking_turns, inlined)
            with turns:
                return self.write(va, data)
        # ``store``'s fast path for any size inside one resident line (a small kernel copy).
        entry = self._fast_w.get(va >> 12)
        if entry is not None and 0 < len(data) <= 64 - (va & 63):
            line = entry[0].get((va >> 6) & 63)
            if line is not None:
                line[va & 63 : (va & 63) + len(data)] = data
                self._dirty.add(entry[1] | (va & 0xFC0))
                self._touch(entry[1] & _PAGE_ADDR, 1)
                return
        fast = self._fast_page(va, len(data))
        if fast is not None:
            self._cache.write(fast[0], data, fast[1])
            return
        pos = 0
        for pa, slot, memtype, length in self._pieces(va, len(data), Access.WRITE):
            self._cache.write(pa, data[pos : pos + length], slot, memtype)
            pos += length

    # Streaming (non-temporal) copies, as bulk-copy routines use them (MOVNTDQ and friends):
    # coherent with the lines of the same encryption domain, but they neither allocate
    # lines nor leave dirty ones (the data goes to DRAM at once). Other domains' lines are
    # left alone unless the part keeps domains coherent (hardware.md §4.1).
    @taking_turns
    def read_stream(self, va: int, n: int) -> bytes:
        out = np.empty(n, dtype=np.uint8)
        self.read_stream_into(va, out)
        return out.tobytes()

    @taking_turns
    def read_stream_into(self, va: int, out: np.ndarray) -> None:
        """``read_stream`` into a caller's uint8 buffer (a device's DMA buffer, say): the
        16-byte aligned runs go straight from the engine into it."""
        fast = self._fast_page(va, len(out))
        if fast is not None:
            runs = [(fast[0], fast[1], len(out))]
        else:
            runs = _physical_runs(self._pieces(va, len(out), Access.READ, fast=False))
        pos = 0
        for pa, slot, length in runs:
            piece = out[pos : pos + length]
            if (pa | length) % 16:
                piece[:] = np.frombuffer(self._fabric.read(pa, length, slot), dtype=np.uint8)
            else:
                self._fabric.read_into(pa, piece, slot)
            pos += length

    @taking_turns
    def write_stream(self, va: int, data: bytes) -> None:
        fast = self._fast_page(va, len(data))
        if fast is not None:
            self._fabric.write(fast[0], data, fast[1])
            return
        pos = 0
        for pa, slot, length in _physical_runs(self._pieces(va, len(data), Access.WRITE, False)):
            self._fabric.write(pa, data[pos : pos + length], slot)
            pos += length

    @taking_turns
    def copy(self, dst_va: int, src_va: int, n: int, chunk: int = 4096) -> None:
        """REP MOVSB: copy n bytes, a page at a time."""
        for off in range(0, n, chunk):
            length = min(chunk, n - off)
            self.write(dst_va + off, self.read(src_va + off, length))

    # ---- SVM ----------------------------------------------------------------------------------
    @taking_turns
    def vmrun(self, vmcb_addr: int, regs: dict[str, int]) -> Exit:
        """VMRUN (RAX = the VMCB's physical address): run the guest until its #VMEXIT.
        ``regs`` are the guest's other general-purpose registers, which the hypervisor keeps
        (as KVM does) and which a non-ES guest's intercepted instructions use."""
        return vmrun(self, vmcb_addr, regs)

    # ---- cache control ---------------------------------------------------------------------
    @taking_turns
    def clflush(self, va: int) -> None:
        """CLFLUSH: write back and drop the line of va in the domain of va's mapping."""
        t = self.translate(va, Access.READ)
        self._cache.clflush(t.page_pa | (va & 0xFFF), self._slot(t, Access.READ))

    @taking_turns
    def clflush_range(self, va: int, n: int) -> None:
        """Linux's clflush_cache_range: CLFLUSH every line of [va, va+n)."""
        pos, end = va, va + n
        while pos < end:
            t = self.translate(pos, Access.READ)
            slot = self._slot(t, Access.READ)
            pa = t.page_pa | (pos & 0xFFF)
            stop = min(end, t.page_base + t.page_size)  # a large page is contiguous
            while pos < stop:
                length = min(stop, (pos | 0xFFF) + 1) - pos
                self._cache.clflush_range(pa, length, slot)
                pos += length
                pa += length

    @taking_turns
    def wbinvd(self) -> int:
        """WBINVD: write back and invalidate every line; returns lines written back. Sets
        this core's WBINVD-done flag, which the SEV firmware checks at DF_FLUSH."""
        written = self._cache.wbinvd(invalidate=True)
        self.machine.chip.note_wbinvd(self.index)
        return written

    @taking_turns
    def wbnoinvd(self) -> int:
        written = self._cache.wbinvd(invalidate=False)
        self.machine.chip.note_wbinvd(self.index)
        return written


def _physical_runs(pieces: list[tuple[int, int, MemType, int]]) -> list[tuple[int, int, int]]:
    """Merge the pieces of an access that are physically contiguous in one domain."""
    runs: list[tuple[int, int, int]] = []
    for pa, slot, _, length in pieces:
        if runs and runs[-1][1] == slot and runs[-1][0] + runs[-1][2] == pa:
            runs[-1] = (runs[-1][0], slot, runs[-1][2] + length)
        else:
            runs.append((pa, slot, length))
    return runs
