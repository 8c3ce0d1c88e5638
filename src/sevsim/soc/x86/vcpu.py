"""A vCPU that executes real x86 code (Unicorn: QEMU's TCG) over the model's memory.

The engine decodes and executes; the model keeps everything else:

* **Memory.** Unicorn runs with its own TLB in "virtual" mode: on every miss it asks the
  model (``_tlb_fill``), which translates through the guest's page tables, the NPT, the
  C-bit and forced-private rules and the ASID-tagged TLB (``Core.translate``), picks the key
  slot, and hands back a frame of the page as that domain sees it (``frames.py``). A
  failed translation is the guest's #PF or the hypervisor's #NPF, at the exact instruction.
* **Intercepts.** The engine runs in SVM guest mode with every intercept the model may
  need (``hidden.py``): CPUID, RDMSR/WRMSR, HLT, INVLPG, MOV to CR0/CR3/CR4, WBINVD/INVD
  stop *before* the instruction, as a #VMEXIT does. The model then either exits to the
  hypervisor (the VMCB intercepts it: exit code, EXITINFO1/2, NEXT_RIP) or performs the
  instruction itself and moves RIP on. VMMCALL, RDRAND and CLFLUSHOPT reach the model as
  #UD; CLFLUSH through an engine exit placed where a fetched page holds one. IN and OUT are
  completed in place: the engine stops inside the instruction, the hypervisor handles the
  IOIO exit, and the instruction finishes with its answer.
* **Exceptions** are delivered by ``delivery.py`` through the guest's IVT or IDT.
* **Time.** The engine runs on its own thread; the host's VMRUN waits for the next exit.
  A guest that does not exit within a time slice is stopped (#VMEXIT(INTR), like the host
  timer interrupt KVM's guests take), so code that spins cannot hang the host. The stop
  lands only between translated blocks (``hidden.stop_only_between_blocks``), never
  between an instruction's store and its end.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from sevsim.api.layout import Layout
from sevsim.api.vmsa import VC_VECTOR
from sevsim.soc.faults import (
    PF_ID,
    PF_RSVD,
    GeneralProtection,
    HardwareFault,
    NestedPageFault,
    PageFault,
)
from sevsim.soc.paging import Access
from sevsim.soc.svm import (
    BP_VECTOR,
    DB_VECTOR,
    DR6_B,
    DR6_BS,
    DR7_L,
    DR7_RW_LEN_SHIFT,
    EXIT_CPUID,
    EXIT_EXCP_BASE,
    EXIT_HLT,
    EXIT_INTR,
    EXIT_INVD,
    EXIT_INVLPG,
    EXIT_IOIO,
    EXIT_MSR,
    EXIT_NPF,
    EXIT_SHUTDOWN,
    EXIT_VMRUN,
    EXIT_WBINVD,
    INTERCEPT_IOIO_PROT,
    IOIO_PORT_SHIFT,
    IOIO_SIZE_BITS,
    IOIO_TYPE_IN,
    NPF_FINAL_GPA,
    RFLAGS_TF,
    VMCB,
    Exit,
    exit_name,
)
from sevsim.soc.x86 import decode as dec
from sevsim.soc.x86 import insn
from sevsim.soc.x86.delivery import TripleFault, deliver, vector_name
from sevsim.soc.x86.frames import PAGE, FrameCache
from sevsim.soc.x86.hidden import (
    CS,
    SEG_NAMES,
    HiddenState,
    Segment,
    check_layout,
    stop_only_between_blocks,
)

if TYPE_CHECKING:
    from sevsim.soc.core import Core
    from sevsim.soc.nested import GuestMode

SEGMENT_DESCRIPTOR = Layout(
    "SEGMENT_DESCRIPTOR",
    8,
    "AMD APM vol. 2, Legacy Segment Descriptors",
    (0, "H", "limit_low"),
    (2, "H", "base_low"),
    (4, "B", "base_mid"),
    (5, "B", "access"),  # type, S, DPL, P
    (6, "B", "flags_limit_high"),  # bits 3:0 limit 19:16; AVL, L, D/B, G
    (7, "B", "base_high"),
)
SHADOW_BASE = 1 << 39  # the engine's own VMCB and permission maps (never guest memory)
# Intercepts the engine always takes (bit n = exit code 0x60 + n), whatever the VMCB says:
# the model decides what each one means.
ENGINE_INTERCEPTS = sum(
    1 << (code - 0x60)
    for code in (EXIT_CPUID, EXIT_HLT, EXIT_INVLPG, EXIT_MSR, EXIT_INVD, EXIT_VMRUN, EXIT_WBINVD)
)
CR_WRITES = (1 << 0) | (1 << 3) | (1 << 4)
# Instruction prefixes: an instruction found by its opcode may start at any of those before.
PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}) | frozenset(
    range(0x40, 0x50)
)
# The opcodes of IN, OUT, INS and OUTS. Unicorn performs port I/O without QEMU's SVM I/O
# intercept check, so an SEV-ES guest's IN/OUT is stopped before it as an engine exit.
IO_OPCODES = np.array([0x6C, 0x6D, 0x6E, 0x6F, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF])
IO_MNEMONICS = frozenset(
    getattr(dec.Mnemonic, m)
    for m in ("IN", "OUT", "INSB", "INSW", "INSD", "OUTSB", "OUTSW", "OUTSD")
)
TIME_SLICE = 0.05  # seconds of guest execution between host timer exits
# The engine's TLB (QEMU's softmmu TLB: direct-mapped, 256 entries at first) grows only
# when it is flushed after heavy use. A run that refilled it more than this many times
# gets a flush before the next one, up to TLB_GROWTH_FLUSHES times per vCPU: a guest
# streaming through megabytes would otherwise keep 256 entries, where two hot pages 1 MiB
# apart evict each other on every access.
TLB_GROWTH_FILLS = 2048
TLB_GROWTH_FLUSHES = 6
# The GPRs that KVM keeps for the guest (RAX and RSP live in the VMCB save area).
GPRS = tuple(n for n in dec.GPR_NAMES if n not in ("rax", "rsp"))
UC_GPR = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GPRS + ("rax", "rsp")}
EFER_LMA = 1 << 10


class GuestMemory:
    """Guest-virtual accesses made by the model on the vCPU's behalf (delivering an
    exception, reading an instruction): through the same translation and frames as the
    engine's own accesses, so both always agree."""

    def __init__(self, cpu: X86Vcpu) -> None:
        self._cpu = cpu

    def _pieces(self, va: int, n: int, access: Access):
        pos, end = va, va + n
        while pos < end:
            frame = self._cpu.frame_for(pos, access)
            length = min(end, (pos | 0xFFF) + 1) - pos
            yield frame, pos & 0xFFF, length
            pos += length

    def read(self, va: int, n: int, access: Access = Access.READ) -> bytes:
        return b"".join(
            f.view[o : o + n].tobytes() for f, o, n in list(self._pieces(va, n, access))
        )

    def write(self, va: int, data: bytes) -> None:
        pieces = list(self._pieces(va, len(data), Access.WRITE))  # all pages first
        pos = 0
        for frame, off, n in pieces:
            frame.view[off : off + n] = np.frombuffer(data[pos : pos + n], dtype=np.uint8)
            self._cpu.frames.mark_written(frame)
            pos += n


class X86Vcpu:
    """The instruction engine of one vCPU (one VMCB)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self._activity: object = None  # the turn of the VMRUN this engine runs for
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        check_layout(uc)
        stop_only_between_blocks(uc)  # the host's time slice must not split an instruction
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # No end address: the engine stops only where the model stops it (an empty set of
        # exits also spares the TLB lookups of an `until` address that is not guest code).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.uc = uc
        # The engine's own VMCB: its MSR permission map has every bit set, so every
        # RDMSR/WRMSR stops (the model decides). Never visible to any guest.
        self._shadow = np.zeros(6 * PAGE, dtype=np.uint8)
        vmcb = VMCB.build(iopm_base_pa=SHADOW_BASE + PAGE, msrpm_base_pa=SHADOW_BASE + 4 * PAGE)
        self._shadow[:PAGE] = np.frombuffer(vmcb, dtype=np.uint8)
        self._shadow[PAGE:] = 0xFF
        uc.mem_map_ptr(SHADOW_BASE, len(self._shadow), UC_PROT_ALL, self._shadow.ctypes.data)
        self.frames = FrameCache(
            self._map_chunk,
            machine.cache,
            self.flush_tlb,
            lambda: [core._drop_fast() for core in machine.cores],
        )
        self.memory = GuestMemory(self)
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INTR, self._intr)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, X.UC_X86_INS_OUT)
        hidden = HiddenState(uc)
        hidden.set_intercepts(SHADOW_BASE, ENGINE_INTERCEPTS, CR_WRITES)
        hidden.commit()
        self._clflush_sites: set[int] = set()
        self._io_sites: set[int] = set()  # SEV-ES: where an IN/OUT may start
        self._exits_key: tuple | None = None  # the paging registers the exits were set under
        self._scanned: set[tuple[int, int]] = set()  # (linear page, frame) scanned for sites
        self._site_pages: set[int] = set()  # linear pages with sites
        self._exit_pages: set[int] = set()  # those whose sites the engine has now
        self._fills = 0  # engine TLB fills since its last flush
        self._growth_flushes = 0
        self._breakpoints: dict[int, int] = {}  # linear address -> n, for DR7-enabled DRn
        self.core: Core | None = None
        self.gm: GuestMode | None = None
        self._vmcb: Any = None
        self._regs: dict[str, int] = {}
        self._loaded: tuple | None = None  # the VMCB register state the engine holds
        self._tlb_key: tuple | None = None  # the model TLB the engine's TLB was filled from
        self._stop: tuple | None = None
        self._fault: HardwareFault | None = None
        self._fault_va = 0
        self._preempt = False
        self._pending_event: tuple[int, int | None] | None = None
        self.log: list[str] = []  # what the model noticed (delivery failures, ...)
        # The engine's thread and the host's VMRUN take turns.
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._exit: Exit | None = None
        self._error: BaseException | None = None
        self._kill = False
        self._thread: threading.Thread | None = None

    # ---- plumbing -------------------------------------------------------------------------
    def _map_chunk(self, addr: int, buf: np.ndarray) -> None:
        self.uc.mem_map_ptr(addr, len(buf), UC_PROT_ALL, buf.ctypes.data)

    def flush_tlb(self) -> None:
        """Drop the engine's TLB (the binding of unicorn 2.1.4 has no wrapper for it)."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self._fills = 0

    def set_efer(self, value: int) -> None:
        hidden = HiddenState(self.uc)
        hidden.efer = value & ~(1 << 12)  # the engine's own SVME stays off
        hidden.commit()

    def note(self, text: str) -> None:
        self.log.append(text)

    def reg(self, reg: int) -> int:
        return self.uc.reg_read(reg)

    def set_reg(self, reg: int, value: int) -> None:
        self.uc.reg_write(reg, value)

    def segment(self, index: int) -> Segment:
        return HiddenState(self.uc).segment(index)

    def load_segment(self, index: int, seg: Segment) -> None:
        hidden = HiddenState(self.uc)
        hidden.set_segment(index, seg)
        hidden.commit()

    def table_register(self, reg: int) -> tuple[int, int]:
        _, base, limit, _ = self.uc.reg_read(reg)
        return base, limit

    @property
    def cpl(self) -> int:
        return HiddenState(self.uc).hflags & 3

    @property
    def bitness(self) -> int:
        cs = self.segment(CS)
        if self.core.efer & EFER_LMA and cs.flags & (1 << 21):
            return 64
        if not self.core.cr0 & 1:
            return 16
        return 32 if cs.flags & (1 << 22) else 16

    def descriptor(self, selector: int) -> Segment:
        """A GDT (or LDT) descriptor, read through the guest's memory."""
        if selector & 4:
            raise GeneralProtection(f"selector {selector:#x} is in the LDT (not modelled)")
        base, limit = self.table_register(X.UC_X86_REG_GDTR)
        index = selector & ~7
        if not index or index + 7 > limit:
            raise GeneralProtection(f"selector {selector:#x} is outside the GDT", selector)
        d = SEGMENT_DESCRIPTOR.parse(self.memory.read(base + index, SEGMENT_DESCRIPTOR.size))
        seg_base = d.base_low | d.base_mid << 16 | d.base_high << 24
        seg_limit = d.limit_low | (d.flags_limit_high & 0xF) << 16
        if d.flags_limit_high & 0x80:  # G: the limit counts 4 KiB pages
            seg_limit = seg_limit << 12 | 0xFFF
        # The hidden flags, as QEMU keeps them: the descriptor's high dword, bits 23:20, 15:8.
        return Segment(
            selector, seg_base, seg_limit, d.access << 8 | (d.flags_limit_high & 0xF0) << 16
        )

    def linear(self, rip: int) -> int:
        return (self.segment(CS).base + rip) & ((1 << 64) - 1)

    def instruction(self, rip: int | None = None):
        """The instruction at CS:RIP, read as the CPU fetches it."""
        rip = self.reg(X.UC_X86_REG_RIP) if rip is None else rip
        lin = self.linear(rip)
        first = min(dec.MAX_INSN, PAGE - (lin & 0xFFF))
        code = self.memory.read(lin, first, Access.FETCH)
        if first < dec.MAX_INSN:
            try:
                code += self.memory.read(lin + first, dec.MAX_INSN - first, Access.FETCH)
            except HardwareFault:
                pass  # the instruction may end on this page
        return dec.decode(code, rip, self.bitness)

    # ---- memory: the engine's TLB fill -------------------------------------------------
    def frame_for(self, va: int, access: Access):
        core = self.core
        t = core.translation(va, access)
        return self.frames.frame(core._slot(t, access), t.page_pa)

    def _tlb_fill(self, uc, va: int, kind: int, entry, _ud) -> bool:
        self._fills += 1
        core = self.core
        access = (
            Access.FETCH
            if kind == UC_MEM_FETCH
            else (Access.WRITE if kind == UC_MEM_WRITE else Access.READ)
        )
        try:
            t = core.translation(va, access)
        except HardwareFault as fault:
            if self._fault is None:
                self._fault, self._fault_va = fault, va
            return False
        slot = core._slot(t, access)
        frame = self.frames.frame(slot, t.page_pa)
        perms = 0
        same = core._slot(t, Access.READ) == core._slot(t, Access.FETCH)
        # SEV-ES: a read does not make a page executable, so that the first fetch from it
        # fills again and scans it for IN/OUT (a data page read first would otherwise be
        # scanned: its bytes give thousands of false sites).
        if access == Access.FETCH or (same and not self.gm.sev_es):
            if core._allowed(t, Access.FETCH):
                perms |= UC_PROT_EXEC
        if access != Access.FETCH or same:
            perms |= UC_PROT_READ
            if core._allowed(t, Access.WRITE):
                perms |= UC_PROT_WRITE
                if not frame.written:
                    self.frames.mark_written(frame)
        if perms & UC_PROT_EXEC and (
            not frame.executed or (va & ~0xFFF, frame.addr) not in self._scanned
        ):
            # Sites are linear addresses: a page seen through another window (the flash
            # and its isa-bios alias) is scanned again there.
            frame.executed = True
            self._scanned.add((va & ~0xFFF, frame.addr))
            self._scan_page(va & ~0xFFF, frame.view)
        page = va & ~0xFFF
        if perms & UC_PROT_EXEC and page in self._site_pages and page not in self._exit_pages:
            self._set_exits()  # a page left out while it was not mapped is back
        entry.paddr = frame.addr
        entry.perms = perms
        return True

    def _scan_page(self, page_va: int, view: np.ndarray) -> None:
        """Engine exits where an instruction the model must see first may start: CLFLUSH (0F
        AE /7 with a memory operand: a no-op inside the engine, the model flushes the line)
        and, in an SEV-ES guest, IN/OUT/INS/OUTS (they raise #VC before they execute). A
        byte inside another instruction is never reached as an instruction start, so a
        false hit costs nothing. (Exits, not code hooks: with any code hook installed
        Unicorn 2.1.4 does not write RIP back when another thread stops it between chained
        blocks.)"""
        b = view
        clflush = np.flatnonzero(
            (b[:-2] == 0x0F)
            & (b[1:-1] == 0xAE)
            & ((b[2:] & 0x38) == 0x38)
            & ((b[2:] & 0xC0) != 0xC0)
        )
        added = self._add_sites(page_va, b, clflush, self._clflush_sites)
        if len(clflush):
            self._site_pages.add(page_va)
        if self.gm is not None and self.gm.sev_es:
            io = np.flatnonzero(np.isin(b, IO_OPCODES))
            added = self._add_sites(page_va, b, io, self._io_sites) or added
            if len(io):
                self._site_pages.add(page_va)
        if added:
            self._set_exits()

    @staticmethod
    def _add_sites(page_va: int, b: np.ndarray, hits: np.ndarray, sites: set[int]) -> bool:
        added = False
        for i in hits:
            start = int(i)
            starts = [start]
            while start > 0 and int(b[start - 1]) in PREFIXES and len(starts) < 14:
                start -= 1
                starts.append(start)
            for s in starts:
                addr = page_va + s
                if addr not in sites:
                    sites.add(addr)
                    added = True
        return added

    def _set_exits(self) -> None:
        """Hand the engine its exits. Unicorn translates every exit's address when the
        engine starts, and one on a page that is not mapped would fault inside the guest:
        sites on such pages are left out, until the paging registers change or the page is
        filled again (``_tlb_fill``)."""
        core = self.core
        self._exits_key = (core.cr0, core.cr3, core.cr4, core.efer)
        sites = self._clflush_sites | self._io_sites | self._breakpoints.keys()
        mapped: dict[int, bool] = {}
        for page in {site & ~0xFFF for site in sites}:
            try:
                self.core.translation(page, Access.FETCH)
                mapped[page] = True
            except HardwareFault:
                mapped[page] = False
        self._exit_pages = {page for page, ok in mapped.items() if ok}
        self.uc.ctl_set_exits(sorted(site for site in sites if mapped[site & ~0xFFF]))

    def _load_breakpoints(self) -> None:
        """Instruction breakpoints (DR0-DR3 enabled in the VMCB's DR7 with R/W and LEN zero)
        are engine exits, like CLFLUSH sites; code translated before they changed goes."""
        dr7 = self._vmcb.dr7
        wanted = {
            self.core.dr[n]: n
            for n in range(4)
            if dr7 & DR7_L[n] and not dr7 >> (DR7_RW_LEN_SHIFT + 4 * n) & 0xF
        }
        if wanted != self._breakpoints:
            self._breakpoints = wanted
            self._site_pages.update(address & ~0xFFF for address in wanted)
            self._set_exits()
            self.uc.ctl_flush_tb()

    def _clflush_site(self, rip: int) -> Exit | None:
        """The engine stopped at a possible CLFLUSH (it translates an exit as an
        intercepted HLT, RIP at the instruction). Flush the line and step over it; if the
        bytes there are no CLFLUSH after all, the place stops being an exit."""
        try:
            ins = self.instruction(rip)
        except HardwareFault as fault:
            return self.model_fault(fault, rip, self.linear(rip))
        if ins.mnemonic not in (dec.Mnemonic.CLFLUSH, dec.Mnemonic.CLFLUSHOPT):
            self._clflush_sites.discard(self.linear(rip))
            self._set_exits()
            self.uc.ctl_flush_tb()  # the block translated with the exit goes
            return None
        va = self.operand_address(ins)
        try:
            insn.clflush(self, va)
        except HardwareFault as fault:
            return self.model_fault(fault, rip, va)
        self.uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
        return None

    def _io_site(self, rip: int) -> Exit | None:
        """SEV-ES: the engine stopped at a possible IN/OUT: #VC(IOIO) before it executes;
        if the bytes there are no port I/O after all, the place stops being an exit."""
        try:
            ins = self.instruction(rip)
        except HardwareFault as fault:
            return self.model_fault(fault, rip, self.linear(rip))
        if ins.mnemonic in IO_MNEMONICS:
            return self.vc(EXIT_IOIO, rip)
        self._io_sites.discard(self.linear(rip))
        self._set_exits()
        self.uc.ctl_flush_tb()
        return None

    def model_fault(self, fault: HardwareFault, rip: int, va: int) -> Exit | None:
        """A fault the model raised performing the instruction at RIP on address va: a
        #VMEXIT(NPF) for the hypervisor, or an exception for the guest."""
        if isinstance(fault, NestedPageFault):
            gpa = fault.gpa | (va & 0xFFF if fault.error_code & NPF_FINAL_GPA else 0)
            return self.nested_page_fault(fault, gpa, rip)
        if isinstance(fault, PageFault):
            self.core.cr2 = fault.address
            self.uc.reg_write(X.UC_X86_REG_CR2, fault.address)
        return self.deliver_exception(
            fault.vector, getattr(fault, "error_code", 0), rip, str(fault)
        )

    def operand_address(self, ins) -> int:
        bitness = self.bitness
        return dec.memory_address(
            ins,
            self.uc.reg_read,
            lambda seg: self.segment(dec.segment_index(seg)).base,
            bitness,
        )

    # ---- the host's side: VMRUN ---------------------------------------------------------
    def run(self, core: Core, gm: GuestMode, vmcb: Any, regs: dict[str, int]) -> Exit:
        """Run the guest until its next #VMEXIT. Called on the host's thread."""
        self.core, self.gm, self._vmcb, self._regs = core, gm, vmcb, regs
        gm.frames = self.frames
        self._preempt = False  # a timer that fired as the last run ended is not this run's
        self._activity = self.machine.turns.activity()  # the engine's thread runs in this turn
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="vcpu", daemon=True)
            self._thread.start()
        self._go.release()
        while not self._done.acquire(timeout=TIME_SLICE):
            self._preempt = True
            self.uc.emu_stop()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._exit is not None
        return self._exit

    def kill(self) -> None:
        """The vCPU ends (its VMCB is freed): stop the engine's thread, and hand what its
        frames hold to the model's cache, as a cache level that goes away would."""
        if self._thread is not None and self._thread.is_alive():
            self._kill = True
            self.uc.emu_stop()
            self._go.release()
            self._thread.join(timeout=5)
        if self._thread is not None and self._thread.is_alive():
            self.frames.write_back()  # a stuck engine thread keeps its frames mapped
            return
        # Let the frames go now: the engine's hooks point back at this object, so they would
        # otherwise wait for Python's cycle collector (MiB per vCPU).
        self.frames.release()

    # ---- the engine's thread ------------------------------------------------------------
    def _main(self) -> None:
        while True:
            self._go.acquire()
            self.machine.turns.adopt(self._activity)
            if self._kill:
                return
            try:
                self._load_state()
                exit_ = self._execute()
            except BaseException as exc:  # noqa: BLE001 - a bug: the host sees it
                self._error = exc
                exit_ = None
            if self._kill:
                return
            self._leave(exit_)

    def _leave(self, exit_: Exit | None) -> None:
        """Hand an exit to the host: memory written back, registers into the VMCB."""
        try:
            self.frames.end_run()
            if exit_ is not None:
                self._save_state()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        self._exit = exit_
        self._done.release()

    def _resume(self) -> bool:
        """Wait inside a hook for the next VMRUN; False if the vCPU is being destroyed."""
        self._go.acquire()
        self.machine.turns.adopt(self._activity)
        if self._kill:
            self.uc.emu_stop()
            return False
        self._load_state(in_instruction=True)
        return True

    def _load_state(self, in_instruction: bool = False) -> None:
        """Registers from the VMCB save area and the hypervisor's GPRs (VMRUN's load)."""
        v, uc, core = self._vmcb, self.uc, self.core
        state = self._vmcb_state()
        if state != self._loaded:
            self.set_efer(core.efer)
            uc.reg_write(X.UC_X86_REG_CR4, core.cr4)
            uc.reg_write(X.UC_X86_REG_CR3, core.cr3)
            uc.reg_write(X.UC_X86_REG_CR0, core.cr0)
            uc.reg_write(X.UC_X86_REG_CR2, v.cr2)
            for name, reg in (("gdtr", X.UC_X86_REG_GDTR), ("idtr", X.UC_X86_REG_IDTR)):
                uc.reg_write(reg, (0, getattr(v, f"{name}_base"), getattr(v, f"{name}_limit"), 0))
            hidden = HiddenState(uc)
            for index, name in list(enumerate(SEG_NAMES)) + [(7, "tr")]:
                hidden.set_segment(
                    index,
                    Segment.from_attrib(
                        getattr(v, f"{name}_selector"),
                        getattr(v, f"{name}_base"),
                        getattr(v, f"{name}_limit"),
                        getattr(v, f"{name}_attrib"),
                    ),
                )
            hidden.commit()
            uc.reg_write(X.UC_X86_REG_RFLAGS, v.rflags | 2)
            uc.reg_write(X.UC_X86_REG_RSP, v.rsp)
        if not in_instruction:
            uc.reg_write(X.UC_X86_REG_RIP, v.rip)
        self._load_breakpoints()
        uc.reg_write(X.UC_X86_REG_RAX, v.rax)
        for name in GPRS:
            uc.reg_write(UC_GPR[name], self._regs.get(name, 0))
        # The engine's TLB caches the model's TLB and points at frames: keep it only if
        # neither moved on since the last exit.
        shrunk = not in_instruction and self.frames.shrink_if_full()
        moved = self.frames.revalidate()
        grow = self._fills > TLB_GROWTH_FILLS and self._growth_flushes < TLB_GROWTH_FLUSHES
        if grow:
            self._growth_flushes += 1
        if (
            grow
            or shrunk
            or moved
            or state != self._loaded
            or self._tlb_key != self._model_tlb_key()
        ):
            self.flush_tlb()
        if not in_instruction:
            self.frames.recycle(self.uc.ctl_flush_tb)
        if v.event_inj & (1 << 31):
            vector = v.event_inj & 0xFF
            error = v.event_inj >> 32 if v.event_inj & (1 << 11) else None
            self._pending_event = (vector, error)
            v.event_inj = 0

    _STATE = (
        "rsp",
        "rflags",
        "cr2",
        "cs_selector",
        "cs_base",
        "cs_attrib",
        "ss_selector",
        "ss_attrib",
        "ds_base",
        "es_base",
        "fs_base",
        "gs_base",
        "gdtr_base",
        "gdtr_limit",
        "idtr_base",
        "idtr_limit",
        "tr_base",
        "cr0",
        "cr3",
        "cr4",
        "efer",
    )

    def _model_tlb_key(self) -> tuple:
        core = self.core
        return (id(core), core.asid, core.tlb_epoch)

    def _vmcb_state(self) -> tuple:
        """The save-area state the engine holds; a hypervisor that changed any of it (a
        reset, an attack lab) gets it loaded at the next VMRUN. RIP is loaded every time."""
        v = self._vmcb
        return tuple(getattr(v, f) for f in self._STATE)

    def _save_state(self) -> None:
        """#VMEXIT's save: registers into the VMCB save area and the hypervisor's GPRs."""
        v, uc = self._vmcb, self.uc
        v.rip = uc.reg_read(X.UC_X86_REG_RIP)
        v.rsp = uc.reg_read(X.UC_X86_REG_RSP)
        v.rax = uc.reg_read(X.UC_X86_REG_RAX)
        v.rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        v.cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        hidden = HiddenState(uc)
        for index, name in list(enumerate(SEG_NAMES)) + [(7, "tr")]:
            seg = hidden.segment(index)
            setattr(v, f"{name}_selector", seg.selector)
            setattr(v, f"{name}_base", seg.base)
            setattr(v, f"{name}_limit", seg.limit)
            setattr(v, f"{name}_attrib", seg.attrib)
        for name, reg in (("gdtr", X.UC_X86_REG_GDTR), ("idtr", X.UC_X86_REG_IDTR)):
            _, base, limit, _ = uc.reg_read(reg)
            setattr(v, f"{name}_base", base)
            setattr(v, f"{name}_limit", limit)
        self._tlb_key = self._model_tlb_key()
        self.core._cpl = hidden.hflags & 3
        v.cpl = self.core._cpl
        self._regs["rax"] = v.rax
        for name in GPRS:
            self._regs[name] = uc.reg_read(UC_GPR[name])
        self.core.cr2 = v.cr2
        core = self.core
        # vmrun() writes the core's control registers into the VMCB after this.
        self._loaded = self._vmcb_state()[:-4] + (core.cr0, core.cr3, core.cr4, core.efer)

    def _execute(self) -> Exit:
        uc = self.uc
        while True:
            if self._pending_event is not None:
                vector, error = self._pending_event
                self._pending_event = None
                exit_ = self.deliver_exception(
                    vector,
                    error,
                    uc.reg_read(X.UC_X86_REG_RIP),
                    f"injected {vector_name(vector)}",
                    injected=True,
                )
                if exit_ is not None:
                    return exit_
            if self._kill:
                return Exit(EXIT_SHUTDOWN, detail={"reason": "the vCPU was destroyed"})
            if self._preempt:
                self._preempt = False
                return Exit(EXIT_INTR)
            self._stop, self._fault = None, None
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            core = self.core
            if self._exits_key != (core.cr0, core.cr3, core.cr4, core.efer):
                self._set_exits()
            try:
                uc.emu_start(rip, 0)  # ends where hooks, intercepts and faults stop it
            except UcError as err:
                exit_ = self._engine_error(err)
            else:
                exit_ = self._stopped()
            if exit_ is not None:
                return exit_

    def _engine_error(self, err: UcError) -> Exit | None:
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        if err.errno == UC_ERR_EXCEPTION and self._fault is not None:
            fault = self._fault
            if isinstance(fault, NestedPageFault):
                gpa = fault.gpa
                if fault.error_code & NPF_FINAL_GPA:
                    # The engine reports the page; the access's offset is the address's.
                    fetch = bool(fault.error_code & PF_ID)
                    gpa |= self._exact_address(self._fault_va, fetch, rip) & 0xFFF
                return self.nested_page_fault(fault, gpa, rip)
            if isinstance(fault, PageFault):
                cr2 = self._exact_address(fault.address, bool(fault.error_code & PF_ID), rip)
                self.core.cr2 = cr2
                self.uc.reg_write(X.UC_X86_REG_CR2, cr2)
                exact = PageFault(cr2, fault.error_code, fault.reason)
                return self.deliver_exception(14, fault.error_code, rip, str(exact))
            return self.deliver_exception(
                fault.vector, getattr(fault, "error_code", 0), rip, str(fault)
            )
        if err.errno == UC_ERR_INSN_INVALID:
            return insn.invalid_opcode(self, rip)
        return self.shutdown(f"the engine stopped: {err} at rip {rip:#x}")

    def nested_page_fault(self, fault: NestedPageFault, gpa: int, rip: int) -> Exit | None:
        """#VMEXIT(NPF), with the instruction's bytes (decode assists). SEV-ES: a reserved-bit
        fault (how KVM marks MMIO) is not automatic: it raises #VC (the guest emulates MMIO
        through the GHCB), and no instruction bytes are given for the others."""
        if not self.gm.sev_es:
            detail = {"reason": fault.reason, "insn_bytes": self._insn_bytes(rip)}
            return Exit(EXIT_NPF, fault.error_code, gpa, detail=detail)
        if fault.error_code & PF_RSVD:
            return self.vc(EXIT_NPF, rip)
        return Exit(EXIT_NPF, fault.error_code, gpa, detail={"reason": fault.reason})

    def vc(self, code: int, rip: int) -> Exit | None:
        """SEV-ES: a non-automatic exit becomes #VC in the guest, its error code the exit code;
        a fault, RIP at the instruction (hardware.md §8.1)."""
        return self.deliver_exception(VC_VECTOR, code, rip, f"#VC for {exit_name(code)}")

    def _insn_bytes(self, rip: int) -> bytes:
        """Decode assists: the bytes of the instruction at RIP as the CPU fetched them (with
        the guest's key), which the hardware puts in the VMCB on a #NPF — how KVM emulates
        MMIO for an SEV guest whose memory it cannot read."""
        try:
            ins = self.instruction(rip)
        except HardwareFault:
            return b""
        lin = self.linear(rip)
        try:
            return self.memory.read(lin, ins.len, Access.FETCH)
        except HardwareFault:
            return b""

    def _exact_address(self, page_va: int, fetch: bool, rip: int) -> int:
        """The engine reports a fault's page; the architecture reports the address the
        instruction used (CR2, and the offset of a #NPF's GPA)."""
        page = page_va & ~0xFFF
        if fetch:
            lin = self.linear(rip)
            return lin if lin & ~0xFFF == page else page
        try:
            ea = self.operand_address(self.instruction(rip))
        except (HardwareFault, ValueError):
            return page_va
        return ea if ea & ~0xFFF == page else page

    def _stopped(self) -> Exit | None:
        stop, self._stop = self._stop, None
        if stop is None:
            return None  # a host timer stop: checked at the top of the loop
        kind = stop[0]
        if kind == "svm":
            rip = self.uc.reg_read(X.UC_X86_REG_RIP)
            n = self._breakpoints.get(self.linear(rip))
            if stop[1] == EXIT_HLT and n is not None:
                # An instruction breakpoint: #DB before the instruction (a fault).
                self._vmcb.dr6 |= DR6_B[n]
                return self.deliver_exception(DB_VECTOR, None, rip, f"breakpoint DR{n}")
            if stop[1] == EXIT_HLT and self.linear(rip) in self._clflush_sites:
                return self._clflush_site(rip)
            if stop[1] == EXIT_HLT and self.linear(rip) in self._io_sites:
                return self._io_site(rip)
            return insn.intercept(self, stop[1], stop[2])
        if kind == "shutdown":
            return self.shutdown(stop[1])
        if kind == "exception":
            _, vector, error, rip = stop
            if vector == DB_VECTOR and self.uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_TF:
                self._vmcb.dr6 |= DR6_BS  # the trap after an instruction run with TF set
            return self.deliver_exception(vector, error, rip, f"{vector_name(vector)}")
        return None

    def _intr(self, uc, intno: int, _ud) -> None:
        """QEMU raises an exception or an SVM intercept: stop, the model handles it."""
        if intno >= 0x100:
            self._stop = ("svm", intno - 0x100, HiddenState(uc).error_code)
        else:
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            error = HiddenState(uc).error_code if intno in (8, 10, 11, 12, 13, 14, 17) else None
            self._stop = ("exception", intno, error, rip)
        uc.emu_stop()

    def deliver_exception(
        self, vector: int, error: int | None, rip: int, reason: str, injected: bool = False
    ) -> Exit | None:
        if not injected and self._vmcb.intercept_exceptions >> vector & 1:
            # An intercepted exception: #VMEXIT(EXCP) instead of delivery. For #BP the
            # saved RIP is the INT3 (one byte, 0xCC), where the engine reports the next one.
            if vector == BP_VECTOR:
                rip -= 1
            self.uc.reg_write(X.UC_X86_REG_RIP, rip)
            return Exit(EXIT_EXCP_BASE + vector, error or 0, self.core.cr2 if vector == 14 else 0)
        try:
            deliver(self, vector, error, rip, reason)
        except NestedPageFault as fault:
            self._pending_event = (vector, error)
            return Exit(EXIT_NPF, fault.error_code, fault.gpa, detail={"reason": fault.reason})
        except TripleFault as tf:
            return self.shutdown(f"triple fault: {tf}")
        return None

    def shutdown(self, reason: str) -> Exit:
        self.note(reason)  # the model's own log (what an observer of the silicon sees)
        if self.gm is not None and self.gm.sev_es:
            # A SHUTDOWN exit tells the hypervisor nothing of an SEV-ES guest's state.
            reason = "shutdown (an SEV-ES guest: its state stays in its VMSA)"
        return Exit(EXIT_SHUTDOWN, detail={"reason": reason})

    # ---- intercepted instructions -----------------------------------------------------------
    def vmexit(self, code: int, **detail) -> Exit | None:
        """#VMEXIT for the intercepted instruction at RIP, with its NEXT_RIP. SEV-ES: HLT is an
        automatic exit that leaves RIP after the instruction (the hypervisor cannot move it);
        the others raise #VC."""
        ins = self.instruction()
        if self.gm.sev_es:
            if code != EXIT_HLT:
                return self.vc(code, ins.ip)
            self.uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
            return Exit(code)
        return Exit(code, next_rip=ins.next_ip, detail=detail)

    def skip(self) -> None:
        ins = self.instruction()
        self.uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)

    # ---- port I/O: completed in place ----------------------------------------------------------
    def _in(self, uc, port: int, size: int, _ud) -> int:
        return self._io(port, size, None)

    def _out(self, uc, port: int, size: int, value: int, _ud) -> None:
        self._io(port, size, value)

    def _io(self, port: int, size: int, value: int | None) -> int:
        uc = self.uc
        mask = (1 << 8 * size) - 1
        if self.gm.sev_es:
            # The page scan missed this IN/OUT (code written after its page first ran): it
            # cannot raise #VC any more. Stop the guest rather than let the host see it.
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            self._stop = ("shutdown", f"SEV-ES: port I/O at {rip:#x} was not stopped for #VC")
            uc.emu_stop()
            return uc.reg_read(X.UC_X86_REG_RAX) & mask
        if not self.gm.intercept_misc1 & INTERCEPT_IOIO_PROT:
            return mask  # no device answers
        ins = self.instruction(uc.reg_read(X.UC_X86_REG_RIP))
        info1 = (
            port << IOIO_PORT_SHIFT
            | IOIO_SIZE_BITS.get(size, 0)
            | (IOIO_TYPE_IN if value is None else 0)
        )
        if value is not None:
            uc.reg_write(X.UC_X86_REG_RAX, (uc.reg_read(X.UC_X86_REG_RAX) & ~mask) | value)
        exit_ = Exit(
            EXIT_IOIO,
            info1,
            ins.next_ip,
            next_rip=ins.next_ip,
            detail={"port": port, **({"value": value} if value is not None else {})},
        )
        self._leave(exit_)
        if not self._resume():
            return 0
        return uc.reg_read(X.UC_X86_REG_RAX) & mask
