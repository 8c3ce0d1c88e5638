"""The engine's hidden CPU state: what the x86 architecture keeps in a core but Unicorn's
API does not expose.

Unicorn runs QEMU's TCG. Its register API covers the software-visible registers, but a
vCPU needs more: segment descriptor caches (the reset state has CS base 0xFFFF0000 with
selector 0xF000, which no selector load produces), the SVM intercept controls that make an
intercepted instruction stop *before* it executes (QEMU's ``cpu_vmexit`` unwinds to the
instruction, exactly like a #VMEXIT), and the error code of an exception.

Unicorn saves and restores the CPU state as one block (``uc_context``: QEMU's
``CPUX86State`` up to ``end_reset_fields``). This module reads and writes fields of that
block at their offsets in the pinned Unicorn build (``unicorn==2.1.4``, see
pyproject.toml). ``check_layout`` proves the offsets on a live engine before any guest
runs: a wrong build fails loudly instead of misbehaving.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from unicorn import Uc
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import UcContext

# Offsets in CPUX86State (QEMU 5.0 as built into Unicorn 2.1.4, x86-64 target).
HEADER = 40  # uc_context's own header before the CPU state
REGS = 0  # target_ulong regs[16]
EIP = 128
HFLAGS = 176
HFLAGS2 = 180
SEGS = 184  # SegmentCache segs[6]: u32 selector, (pad), u64 base, u32 limit, u32 flags
SEG_SIZE = 24
CR = 424  # target_ulong cr[9]
EFER = 592
ERROR_CODE = 5384
VM_VMCB = 5504
INTERCEPT = 5520  # u64: bit n = SVM exit code 0x60 + n (the VMCB's misc1 | misc2 << 32)
INTERCEPT_CR_READ = 5528
INTERCEPT_CR_WRITE = 5530
INTERCEPT_EXCEPTIONS = 5536
CONTEXT_SIZE = 5568

ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# QEMU's hflags bits (target/i386/cpu.h).
HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_SVME = 1 << 20
HF_GUEST = 1 << 21  # SVM intercepts are active
HF2_GIF = 1 << 0

# Descriptor flag bits as QEMU keeps them (the descriptor's high dword).
DESC_B = 1 << 22
DESC_L = 1 << 21
DESC_DPL_SHIFT = 13
VM_FLAG = 1 << 17  # RFLAGS.VM
CR0_PE = 1


@dataclass(frozen=True)
class Segment:
    """A segment register with its descriptor cache."""

    selector: int
    base: int
    limit: int
    flags: int  # descriptor bits 8..23 of the high dword, in place (QEMU's layout)

    @property
    def attrib(self) -> int:
        """The VMCB's 12-bit form of the flags (type, S, DPL, P, AVL, L, D/B, G)."""
        return (self.flags >> 8) & 0xFF | (self.flags >> 12) & 0xF00

    @classmethod
    def from_attrib(cls, selector: int, base: int, limit: int, attrib: int) -> Segment:
        flags = (attrib & 0xFF) << 8 | (attrib & 0xF00) << 12
        return cls(selector, base, limit, flags)


class HiddenState:
    """A read-modify-write window on the engine's CPU state block."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._ctx = uc.context_save()
        if self._ctx.size != HEADER + CONTEXT_SIZE:
            raise RuntimeError(
                f"unexpected Unicorn CPU state size {self._ctx.size}: sevsim needs unicorn==2.1.4"
            )
        self._raw = bytearray(bytes(self._ctx))

    def _u(self, fmt: str, off: int) -> int:
        return struct.unpack_from(fmt, self._raw, HEADER + off)[0]

    def _p(self, fmt: str, off: int, value: int) -> None:
        struct.pack_into(fmt, self._raw, HEADER + off, value)

    def commit(self) -> None:
        ctx = UcContext.__new__(UcContext)
        ctx.__setstate__((bytes(self._raw), self._ctx.size, self._ctx.arch, self._ctx.mode))
        self._uc.context_restore(ctx)

    # ---- fields -------------------------------------------------------------------------
    @property
    def hflags(self) -> int:
        return self._u("<I", HFLAGS)

    @hflags.setter
    def hflags(self, value: int) -> None:
        self._p("<I", HFLAGS, value)

    @property
    def error_code(self) -> int:
        return self._u("<i", ERROR_CODE) & 0xFFFF_FFFF

    def segment(self, index: int) -> Segment:
        off = SEGS + SEG_SIZE * index
        selector, base, limit, flags = struct.unpack_from("<I4xQII", self._raw, HEADER + off)
        return Segment(selector & 0xFFFF, base, limit, flags)

    def set_segment(self, index: int, seg: Segment) -> None:
        """Load a descriptor cache and update the hidden flags as the CPU does
        (QEMU's cpu_x86_load_seg_cache)."""
        off = SEGS + SEG_SIZE * index
        struct.pack_into(
            "<I4xQII", self._raw, HEADER + off, seg.selector, seg.base, seg.limit, seg.flags
        )
        hflags = self.hflags
        if index == CS:
            if hflags & HF_LMA and seg.flags & DESC_L:
                hflags |= HF_CS32 | HF_SS32 | HF_CS64
                hflags &= ~HF_ADDSEG
            else:
                cs32 = HF_CS32 if seg.flags & DESC_B else 0
                hflags = (hflags & ~(HF_CS32 | HF_CS64)) | cs32
        if index == SS:
            hflags = (hflags & ~HF_CPL_MASK) | (seg.flags >> DESC_DPL_SHIFT) & 3
        new = HF_SS32 if self.segment(SS).flags & DESC_B else 0
        if hflags & HF_CS64:
            pass  # long mode: DS, ES and SS bases are zero
        else:
            cr0 = self._u("<Q", CR)
            eflags = self._u("<Q", EIP + 8)
            if not cr0 & CR0_PE or eflags & VM_FLAG or not hflags & HF_CS32:
                new |= HF_ADDSEG
            elif self.segment(DS).base | self.segment(ES).base | self.segment(SS).base:
                new |= HF_ADDSEG
        self.hflags = (hflags & ~(HF_SS32 | HF_ADDSEG)) | new

    @property
    def efer(self) -> int:
        return self._u("<Q", EFER)

    @efer.setter
    def efer(self, value: int) -> None:
        """EFER as WRMSR loads it (QEMU's cpu_load_efer), without WRMSR: in guest mode the
        engine's WRMSR is intercepted."""
        self._p("<Q", EFER, value)
        hflags = self.hflags & ~(HF_LMA | HF_SVME)
        hflags |= (HF_LMA if value & (1 << 10) else 0) | (HF_SVME if value & (1 << 12) else 0)
        self.hflags = hflags

    def set_intercepts(self, vmcb_pa: int, intercept: int, cr_write: int) -> None:
        """Put the engine in SVM guest mode with these intercepts (QEMU checks them inline
        and unwinds to the instruction: a precise exit)."""
        self.hflags = self.hflags | HF_GUEST
        self._p("<I", HFLAGS2, self._u("<I", HFLAGS2) | HF2_GIF)
        self._p("<Q", VM_VMCB, vmcb_pa)
        self._p("<Q", INTERCEPT, intercept)
        self._p("<H", INTERCEPT_CR_READ, 0)
        self._p("<H", INTERCEPT_CR_WRITE, cr_write)
        self._p("<I", INTERCEPT_EXCEPTIONS, 0)


def check_layout(uc: Uc) -> None:
    """Prove the offsets against the register API of this very engine."""
    probes = {
        REGS + 8 * 3: (X.UC_X86_REG_RBX, 0x5EB5_1A1B_0000_0001),
        EIP: (X.UC_X86_REG_RIP, 0x5EB5_1A1B_0000_0002),
        CR + 8 * 3: (X.UC_X86_REG_CR3, 0x5EB5_1000),
    }
    saved = {reg: uc.reg_read(reg) for reg, _ in probes.values()}
    try:
        for reg, value in probes.values():
            uc.reg_write(reg, value)
        raw = bytes(uc.context_save())
        for off, (_, value) in probes.items():
            if struct.unpack_from("<Q", raw, HEADER + off)[0] != value:
                raise RuntimeError(
                    "the Unicorn CPU state layout is not the one sevsim knows: install "
                    "unicorn==2.1.4"
                )
    finally:
        for reg, value in saved.items():
            uc.reg_write(reg, value)


# Where ``no_exit_request`` sits in Unicorn's own ``uc_struct`` (include/uc_priv.h of the
# pinned build): it follows a run of fields whose values are known, found by scanning.
_UC_STRUCT_SCAN = 8192
_PAGE_FIELDS = "<IIQQiii"  # target_page_size/align, host page sizes, icache line, context
_NO_EXIT_REQUEST = 50  # bytes after target_page_size; init_done is the next byte


def stop_only_between_blocks(uc: Uc) -> None:
    """Let a stop from another thread (the host's time slice) take effect only where a
    translated block starts.

    Unicorn 2.1.4 checks for a requested stop after every memory access inside a block
    and leaves RIP at the instruction that made the access. After the store of a
    read-modify-write instruction (``inc [mem]``, ``xchg``, ``add [mem], reg``) the
    instruction has taken effect but RIP still points at it, so the next run executes it
    again: an asynchronous ``emu_stop`` corrupts the guest about once per stop. Unicorn
    keeps a switch that leaves those checks out of translated code (``no_exit_request``,
    for ARM IT blocks); the check at each block's start stays, and a stop there is exact.
    Must be set before the first block is translated."""
    uc.reg_read(X.UC_X86_REG_RIP)  # Unicorn completes its struct on first use
    base = uc._uch.value
    raw = ctypes.string_at(base, _UC_STRUCT_SCAN)
    hits = []
    for off in range(0, _UC_STRUCT_SCAN - 64, 8):
        page, _, host_page, real_host_page, _, _, context = struct.unpack_from(
            _PAGE_FIELDS, raw, off
        )
        if (page, host_page, real_host_page, context) == (4096, 4096, 4096, CONTEXT_SIZE):
            hits.append(off)
    flags = raw[hits[0] + _NO_EXIT_REQUEST - 2 : hits[0] + _NO_EXIT_REQUEST + 2] if hits else b""
    if len(hits) != 1 or flags != b"\0\0\0\1":  # hook_insert, first_tb, no_exit_request, init_done
        raise RuntimeError(
            "the Unicorn engine layout is not the one sevsim knows: install unicorn==2.1.4"
        )
    ctypes.memset(base + hits[0] + _NO_EXIT_REQUEST, 1, 1)
