"""Guest mode: VMRUN/#VMEXIT, nested translation and key selection (hardware.md §3.3–3.4, §7).

Translation of a guest access: the guest's page walk (over guest page-table bytes in guest
memory) gives a guest-physical address and the guest's C-bit; the C-bit is removed; the
nested walk (the hypervisor's host-format tables from nCR3, read with the host key where
their C-bits say, every access treated as a user access) gives the system-physical
address and the host C-bit of the NPT leaf. The key is chosen as in hardware.md §3.4:

=================  ===========  ==========================================
guest C-bit        NPT leaf C   key
=================  ===========  ==========================================
1 (or forced)      any          the guest's key, by the VMCB's ASID
0                  1            the host key
0                  0            none (plaintext), or the TSME key under TSME
=================  ===========  ==========================================

Forced private in an SEV guest: every guest page-table access and every instruction fetch;
and every data access outside long mode and PAE (paging off, or legacy 32-bit paging).
A non-SEV guest has no key of its own: only the NPT leaf's C-bit counts.

A failed nested walk is a #VMEXIT(NPF) with the architectural error code (plus bit 32 for
the final address, bit 33 for a guest page-table access) and the GPA without the C-bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sevsim.soc import msr
from sevsim.soc.cache import MemType
from sevsim.soc.faults import (
    GeneralProtection,
    HardwareFault,
    InvalidOpcode,
    NestedPageFault,
    PageFault,
)
from sevsim.soc.paging import (
    CR4_LA57,
    EFER_NXE,
    Access,
    PagingMode,
    Translation,
    WalkConfig,
    walk,
)
from sevsim.soc.svm import (
    EVENTINJ_VALID,
    EXIT_CPUID,
    EXIT_HLT,
    EXIT_INVALID,
    EXIT_IOIO,
    EXIT_MSR,
    EXIT_NPF,
    EXIT_SHUTDOWN,
    EXIT_VMMCALL,
    EXIT_WBINVD,
    INTERCEPT_CPUID,
    INTERCEPT_HLT,
    INTERCEPT_IOIO_PROT,
    INTERCEPT_MSR_PROT,
    INTERCEPT_VMMCALL,
    INTERCEPT_WBINVD,
    IOIO_PORT_SHIFT,
    IOIO_SIZE_BITS,
    IOIO_TYPE_IN,
    NP_ENABLE,
    NPF_FINAL_GPA,
    NPF_GUEST_PAGE_TABLE,
    SEV_ENABLE,
    SEV_ES_ENABLE,
    TLB_CONTROL_FLUSH_ALL_ASIDS,
    TLB_CONTROL_FLUSH_ASID,
    TLB_CONTROL_FLUSH_ASID_LOCAL,
    VMCB,
    VMCB_SIZE,
    Exit,
    GuestThread,
    decode,
)

if TYPE_CHECKING:
    from sevsim.soc.core import Core

CODE_SIZE = 4096  # how many bytes at RIP a Python guest program's check looks at
_INJECTABLE = {6: InvalidOpcode, 13: GeneralProtection}
EFER_SVME = 1 << 12


class HostTables:
    """Host-format tables (the host's own, or the NPT) read through the cache with the host
    key where the pointing entry's C-bit is set — ASID 0's view, whatever the core runs."""

    __slots__ = ("_cache", "_memctl")

    def __init__(self, core: Core) -> None:
        self._cache = core._cache
        self._memctl = core._memctl

    def read_entry(self, pa: int, size: int, c_bit: bool) -> int:
        slot = self._memctl.key_slot(c_bit, 0)
        return int.from_bytes(self._cache.read(pa, size, slot), "little")

    def write_entry(self, pa: int, size: int, c_bit: bool, value: int) -> None:
        self._cache.write(pa, value.to_bytes(size, "little"), self._memctl.key_slot(c_bit, 0))


class GuestTables:
    """The guest's own page tables: each access is itself translated through the NPT, and is
    always private in an SEV guest."""

    __slots__ = ("_mode",)

    def __init__(self, mode: GuestMode) -> None:
        self._mode = mode

    def read_entry(self, gpa: int, size: int, c_bit: bool) -> int:
        spa, slot = self._mode.table_access(gpa, write=False)
        frame = self._frame(spa, slot)
        if frame is not None:
            off = spa & 0xFFF
            return int.from_bytes(frame.view[off : off + size].tobytes(), "little")
        return int.from_bytes(self._mode.cache.read(spa, size, slot), "little")

    def write_entry(self, gpa: int, size: int, c_bit: bool, value: int) -> None:
        spa, slot = self._mode.table_access(gpa, write=True)
        frame = self._frame(spa, slot)
        if frame is not None:
            off = spa & 0xFFF
            frame.view[off : off + size] = memoryview(value.to_bytes(size, "little"))
            frame.written = True
            return
        self._mode.cache.write(spa, value.to_bytes(size, "little"), slot)

    def _frame(self, spa: int, slot: int):
        """The instruction engine's current copy of a table page, if it has one: the walk
        sees the vCPU's own latest stores, as the hardware walker does."""
        frames = self._mode.frames
        return None if frames is None else frames.lookup(slot, spa & ~0xFFF)


class GuestMode:
    """What the core knows while it runs a guest: the VMCB's controls and the NPT."""

    def __init__(self, core: Core, vmcb, host_cr4: int, host_efer: int, host_pat: int) -> None:
        machine = core.machine
        self.core = core
        self.cache = core._cache
        self.memctl = core._memctl
        self.vmcb = vmcb
        self.asid = vmcb.asid
        self.np = bool(vmcb.nested_ctl & NP_ENABLE)
        self.sev = bool(vmcb.nested_ctl & SEV_ENABLE)
        self.sev_es = bool(vmcb.nested_ctl & SEV_ES_ENABLE)
        self.intercept_misc1 = vmcb.intercept_misc1
        self.intercept_misc2 = vmcb.intercept_misc2
        smee = bool(machine.syscfg & msr.SYSCFG_MEM_ENCRYPT)
        self.npt_cfg = WalkConfig(
            mode=PagingMode.LONG5 if host_cr4 & CR4_LA57 else PagingMode.LONG4,
            cr3=vmcb.ncr3,
            pa_bits=machine.phys_bits,
            cbit_mask=machine.cbit_mask if smee else 0,
            nxe=bool(host_efer & EFER_NXE),
            wp=True,
            pse=False,
            pge=False,
            smep=False,
            pat=host_pat,
        )
        self.tables = GuestTables(self)
        self.host_tables = HostTables(core)
        self.frames = None  # the instruction engine's memory, while a real-code vCPU runs

    @property
    def sev_status(self) -> int:
        return (1 if self.sev else 0) | (2 if self.sev_es else 0)

    def _key(self, private: bool, host_c: bool) -> int:
        if self.sev and private:
            return self.memctl.key_slot(True, self.asid)
        return self.memctl.key_slot(host_c, 0)

    def npt(self, gpa: int, access: Access, table: bool) -> Translation:
        if not self.np:
            page = gpa & ~0xFFF
            return Translation(page, False, MemType.WB, True, True, False, True, False, 4096, page)
        try:
            return walk(gpa, access, 3, self.npt_cfg, self.host_tables)
        except PageFault as pf:
            kind = NPF_GUEST_PAGE_TABLE if table else NPF_FINAL_GPA
            raise NestedPageFault(gpa, pf.error_code | kind, pf.reason) from None

    def table_access(self, gpa: int, write: bool) -> tuple[int, int]:
        t = self.npt(gpa, Access.WRITE if write else Access.READ, table=True)
        return t.page_pa | (gpa & 0xFFF), self._key(True, t.c_bit)

    def translate(self, va: int, access: Access, cfg: WalkConfig, cpl: int) -> Translation:
        if cfg.mode == PagingMode.NONE:
            gpa_page, guest_c, forced = va & 0xFFFF_F000, False, True
            writable, user, nx, dirty, global_ = True, True, False, True, False
            guest_size = 1 << 30  # no guest paging: only the nested page limits the size
        else:
            gt = walk(va, access, cpl, cfg, self.tables)
            gpa_page, guest_c = gt.page_pa, gt.c_bit
            forced = cfg.mode == PagingMode.LEGACY
            writable, user, nx, dirty, global_ = gt.writable, gt.user, gt.nx, gt.dirty, gt.global_
            guest_size = gt.page_size
        ht = self.npt(gpa_page | (va & 0xFFF), access, table=False)
        # What the TLB may cache: the smaller of the two page sizes (a contiguous block).
        size = min(guest_size, ht.page_size)
        return Translation(
            page_pa=ht.page_pa,
            c_bit=guest_c,
            memtype=MemType.WB,
            writable=writable,
            npt_writable=ht.writable,
            user=user,
            nx=nx or ht.nx,
            dirty=dirty and ht.dirty,
            global_=global_,
            page_size=size,
            page_base=va & ~(size - 1),
            slot=self._key(guest_c or forced, ht.c_bit),
            fetch_slot=self._key(True, ht.c_bit),
        )


class GuestVcpu:
    """The vCPU as guest code sees it: the interface an instruction engine would drive.

    Accesses that take a nested page fault exit to the hypervisor and are retried when the
    guest resumes. Intercepted instructions (CPUID, HLT, VMMCALL, MSRs other than those the
    VMCB virtualises) exit with their operands in the general-purpose registers, which in a
    non-ES SEV guest the hypervisor reads and writes (``regs``).
    """

    def __init__(self) -> None:
        self._core: Core | None = None
        self._thread: GuestThread | None = None
        self.regs: dict[str, int] = {}
        self._event = 0  # an exception the hypervisor injected (VMCB EVENTINJ)

    def _bind(self, core: Core, thread: GuestThread, regs: dict[str, int], event: int) -> None:
        self._core, self._thread, self.regs, self._event = core, thread, regs, event

    def _trap(self, exit_: Exit) -> None:
        assert self._thread is not None
        self._thread.trap(exit_)
        if self._event:
            # Delivered at the guest's next instruction; a guest program handles it with
            # try/except (its IDT), or dies of it (triple fault).
            vector, self._event = self._event & 0xFF, 0
            raise _INJECTABLE.get(vector, GeneralProtection)(f"exception {vector} injected")

    def _npf(self, fault: NestedPageFault) -> None:
        self._trap(Exit(EXIT_NPF, fault.error_code, fault.gpa, {"reason": fault.reason}))

    @property
    def _mode(self) -> GuestMode:
        mode = self._core._guest
        assert mode is not None
        return mode

    # ---- memory ------------------------------------------------------------------------
    def load(self, va: int, size: int = 8) -> int:
        try:
            return self._core.load(va, size)
        except NestedPageFault as fault:
            self._npf(fault)
            return self.load(va, size)

    def store(self, va: int, size: int, value: int) -> None:
        try:
            self._core.store(va, size, value)
        except NestedPageFault as fault:
            self._npf(fault)
            self.store(va, size, value)

    def read(self, va: int, n: int) -> bytes:
        while True:
            try:
                return self._core.read(va, n)
            except NestedPageFault as fault:
                self._npf(fault)

    def write(self, va: int, data: bytes) -> None:
        while True:
            try:
                return self._core.write(va, data)
            except NestedPageFault as fault:
                self._npf(fault)

    def fetch(self, va: int, n: int) -> bytes:
        while True:
            try:
                return self._core.fetch(va, n)
            except NestedPageFault as fault:
                self._npf(fault)

    def clflush(self, va: int) -> None:
        while True:
            try:
                return self._core.clflush(va)
            except NestedPageFault as fault:
                self._npf(fault)

    def clflush_range(self, va: int, n: int) -> None:
        while True:
            try:
                return self._core.clflush_range(va, n)
            except NestedPageFault as fault:
                self._npf(fault)

    def read_stream(self, va: int, n: int) -> bytes:
        """A bulk copy out with non-temporal loads (no cache lines allocated)."""
        while True:
            try:
                return self._core.read_stream(va, n)
            except NestedPageFault as fault:
                self._npf(fault)

    def write_stream(self, va: int, data: bytes) -> None:
        """A bulk copy in with non-temporal stores; nothing is written if a page faults."""
        while True:
            try:
                return self._core.write_stream(va, data)
            except NestedPageFault as fault:
                self._npf(fault)

    def copy_stream(self, dst_va: int, src_va: int, n: int) -> None:
        """A bulk memcpy with non-temporal loads and stores (no cache lines allocated)."""
        while True:
            try:
                return self._core.copy_stream(dst_va, src_va, n)
            except NestedPageFault as fault:
                self._npf(fault)

    def invlpg(self, va: int) -> None:
        self._core.invlpg(va)

    # ---- control registers --------------------------------------------------------------
    def write_cr0(self, value: int) -> None:
        self._core.write_cr0(value)

    def write_cr3(self, value: int) -> None:
        self._core.write_cr3(value)

    def write_cr4(self, value: int) -> None:
        self._core.write_cr4(value)

    @property
    def cr0(self) -> int:
        return self._core.cr0

    @property
    def cr3(self) -> int:
        return self._core.cr3

    @property
    def cr4(self) -> int:
        return self._core.cr4

    # ---- intercepted instructions ---------------------------------------------------------
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        if not self._mode.intercept_misc1 & INTERCEPT_CPUID:
            return self._core.cpuid(leaf, subleaf)
        self.regs.update(rax=leaf, rcx=subleaf)
        self._trap(Exit(EXIT_CPUID, detail={"leaf": leaf, "subleaf": subleaf}))
        r = self.regs
        return (r.get("rax", 0), r.get("rbx", 0), r.get("rcx", 0), r.get("rdx", 0))

    def rdmsr(self, index: int) -> int:
        if index == msr.SEV_STATUS:
            return self._mode.sev_status  # MODEL: provided by the hardware, not intercepted
        if index in (msr.EFER, msr.PAT):
            return self._core.rdmsr(index)
        if not self._mode.intercept_misc1 & INTERCEPT_MSR_PROT:
            raise GeneralProtection(f"RDMSR {index:#x} in a guest without MSR intercepts")
        self.regs.update(rcx=index)
        self._trap(Exit(EXIT_MSR, 0, detail={"msr": index}))
        return (self.regs.get("rdx", 0) << 32) | self.regs.get("rax", 0)

    def wrmsr(self, index: int, value: int) -> None:
        if index == msr.SEV_STATUS:
            raise GeneralProtection("SEV_STATUS is read-only")
        if index in (msr.EFER, msr.PAT):
            self._core.wrmsr(index, value)
            return
        if not self._mode.intercept_misc1 & INTERCEPT_MSR_PROT:
            raise GeneralProtection(f"WRMSR {index:#x} in a guest without MSR intercepts")
        self.regs.update(rcx=index, rax=value & 0xFFFF_FFFF, rdx=value >> 32)
        self._trap(Exit(EXIT_MSR, 1, detail={"msr": index, "value": value}))

    def vmmcall(self, nr: int, *args: int) -> int:
        if not self._mode.intercept_misc2 & INTERCEPT_VMMCALL:
            raise InvalidOpcode("VMMCALL is not intercepted")
        self.regs["rax"] = nr
        self.regs.update(zip(("rbx", "rcx", "rdx", "rsi"), args, strict=False))
        self._trap(Exit(EXIT_VMMCALL, detail={"nr": nr, "args": args}))
        return self.regs.get("rax", 0)

    def out(self, port: int, value: int, size: int = 1) -> None:
        """OUT of 1, 2 or 4 bytes to an I/O port: the hypervisor sees the value."""
        if not self._mode.intercept_misc1 & INTERCEPT_IOIO_PROT:
            raise GeneralProtection("I/O port access without IOIO intercepts (no device)")
        value &= (1 << 8 * size) - 1
        self.regs["rax"] = value
        info1 = (port & 0xFFFF) << IOIO_PORT_SHIFT | IOIO_SIZE_BITS[size]
        self._trap(Exit(EXIT_IOIO, info1, detail={"port": port, "value": value}))

    def in_(self, port: int, size: int = 1) -> int:
        """IN of 1, 2 or 4 bytes from an I/O port, as the hypervisor answers it."""
        if not self._mode.intercept_misc1 & INTERCEPT_IOIO_PROT:
            raise GeneralProtection("I/O port access without IOIO intercepts (no device)")
        info1 = (port & 0xFFFF) << IOIO_PORT_SHIFT | IOIO_SIZE_BITS[size] | IOIO_TYPE_IN
        self._trap(Exit(EXIT_IOIO, info1, detail={"port": port}))
        return self.regs.get("rax", 0) & ((1 << 8 * size) - 1)

    def outb(self, port: int, value: int) -> None:
        self.out(port, value, 1)

    def inb(self, port: int) -> int:
        return self.in_(port, 1)

    def rdrand64(self) -> int:
        """RDRAND: the core's random-number generator (not intercepted)."""
        return int.from_bytes(self._core.machine.rdrand.random_bytes(8, "rdrand"), "little")

    def hlt(self) -> None:
        if self._mode.intercept_misc1 & INTERCEPT_HLT:
            self._trap(Exit(EXIT_HLT))

    def wbinvd(self) -> None:
        if self._mode.intercept_misc2 & INTERCEPT_WBINVD:
            self._trap(Exit(EXIT_WBINVD))
        else:
            self._core.wbinvd()


def guest_view(core: Core, vmcb_addr: int, va: int, n: int) -> bytes:
    """What the guest of this VMCB reads at its virtual address ``va``: its own page walk,
    the NPT and its key, as a debugger inside the guest would see it. An observer's window
    (demos, tests, the debugger stub): it changes no TLB and no register."""
    machine = core.machine
    smee = bool(machine.syscfg & msr.SYSCFG_MEM_ENCRYPT)
    vmcb_slot = core._memctl.key_slot(bool(vmcb_addr & machine.cbit_mask) and smee, 0)
    v = VMCB.parse(core._cache.read(vmcb_addr & ~machine.cbit_mask, VMCB_SIZE, vmcb_slot))
    saved = (core.cr0, core.cr3, core.cr4, core.efer, core.pat, core._guest, core._cfg)
    try:
        core.cr0, core.cr3, core.cr4, core.efer = v.cr0, v.cr3, v.cr4, v.efer
        core.pat = v.g_pat
        mode = core._guest = GuestMode(core, v, core.cr4, core.efer, core.pat)
        mode.frames = getattr(machine.x86_vcpu(vmcb_addr & ~machine.cbit_mask), "frames", None)
        cfg = core._walk_config()
        out = bytearray()
        pos, end = va, va + n
        while pos < end:
            t = mode.translate(pos, Access.READ, cfg, v.cpl)
            length = min(end, (pos | 0xFFF) + 1) - pos
            out += core._cache.read(t.page_pa | (pos & 0xFFF), length, t.slot)
            pos += length
        return bytes(out)
    finally:
        core.cr0, core.cr3, core.cr4, core.efer, core.pat, core._guest, core._cfg = saved


def vmrun(core: Core, vmcb_addr: int, regs: dict[str, int]) -> Exit:
    """VMRUN: enter the guest the VMCB at ``vmcb_addr`` describes; return at its #VMEXIT."""
    machine = core.machine
    profile = machine.profile
    if not core.efer & EFER_SVME:
        raise InvalidOpcode("VMRUN with EFER.SVME clear")
    if core._guest is not None:
        raise GeneralProtection("VMRUN inside a guest")
    smee = bool(machine.syscfg & msr.SYSCFG_MEM_ENCRYPT)
    vmcb_slot = core._memctl.key_slot(bool(vmcb_addr & machine.cbit_mask) and smee, 0)
    vmcb_pa = vmcb_addr & ~machine.cbit_mask
    if vmcb_pa % 4096:
        raise GeneralProtection("VMCB address not page aligned")
    raw = bytearray(core._cache.read(vmcb_pa, VMCB_SIZE, vmcb_slot))
    v = VMCB.parse(bytes(raw))

    def finish(exit_: Exit) -> Exit:
        v.exit_code, v.exit_info_1, v.exit_info_2 = exit_.code, exit_.info1, exit_.info2
        core._cache.write(vmcb_pa, VMCB.build(v), vmcb_slot)
        return exit_

    sev = bool(v.nested_ctl & SEV_ENABLE)
    invalid = (
        v.asid == 0
        or v.asid >= profile.nasid
        or (sev and not v.nested_ctl & NP_ENABLE)
        or (sev and v.asid > profile.max_asid)
        or (sev and not machine.hwcr & msr.HWCR_SMMLOCK)
        or (sev and not machine.chip.asid_valid_on(v.asid, core.index))
    )
    if invalid:
        return finish(Exit(EXIT_INVALID))

    host = (core.cr0, core.cr3, core.cr4, core.efer, core.pat, core._cpl)
    if v.tlb_control == TLB_CONTROL_FLUSH_ALL_ASIDS:
        for tlb in core._tlbs.values():
            tlb.clear()
        core.tlb_epoch += 1
    core.cr0, core.cr3, core.cr4, core.efer = v.cr0, v.cr3, v.cr4, v.efer
    core.pat = v.g_pat if v.nested_ctl & NP_ENABLE else core.pat
    core._cpl = v.cpl
    core._guest = GuestMode(core, v, host[2], host[3], host[4])
    core.switch_asid(v.asid)
    if v.tlb_control in (TLB_CONTROL_FLUSH_ASID, TLB_CONTROL_FLUSH_ASID_LOCAL):
        core._flush_tlb(keep_global=v.tlb_control == TLB_CONTROL_FLUSH_ASID_LOCAL)
    core._cfg = core._walk_config()
    threads = machine.guest_threads
    x86 = machine.x86_vcpu(vmcb_pa)
    try:
        if x86 is not None:
            exit_ = x86.run(core, core._guest, v, regs)
        else:
            exit_ = _run_program(core, v, regs, threads, vmcb_pa)
    finally:
        v.cr0, v.cr3, v.cr4, v.efer, v.cpl = core.cr0, core.cr3, core.cr4, core.efer, core._cpl
        if v.nested_ctl & NP_ENABLE:
            v.g_pat = core.pat
        core.cr0, core.cr3, core.cr4, core.efer, core.pat, core._cpl = host
        core._guest = None
        core.switch_asid(0)
        core._cfg = core._walk_config()
    if exit_.code == EXIT_SHUTDOWN:
        stale = threads.pop(vmcb_pa, None)
        if stale is not None:
            stale.kill()
    v.next_rip = exit_.next_rip
    insn = exit_.detail.get("insn_bytes", b"") if exit_.code == EXIT_NPF else b""
    v.insn_len, v.insn_bytes = len(insn), insn.ljust(15, b"\0")
    return finish(exit_)


def _run_program(core: Core, v, regs: dict[str, int], threads: dict, vmcb_pa: int) -> Exit:
    """The model's Python guest programs (chosen per VM, docs/model.md): the 4 KiB at RIP
    must be the program's code image, else they are no instruction."""
    if True:
        try:
            code = core.fetch(v.rip, CODE_SIZE)
        except NestedPageFault as fault:
            exit_ = Exit(EXIT_NPF, fault.error_code, fault.gpa, {"reason": fault.reason})
        except HardwareFault as fault:
            exit_ = Exit(EXIT_SHUTDOWN, detail={"reason": f"{fault} fetching at RIP; triple fault"})
        else:
            program = decode(code)
            thread = threads.get(vmcb_pa)
            if program is None:
                exit_ = Exit(
                    EXIT_SHUTDOWN,
                    detail={
                        "reason": "#UD: the bytes at RIP decode to no instruction; no handler "
                        "can be delivered: triple fault"
                    },
                )
            else:
                if thread is None or thread.program is not program:
                    if thread is not None:
                        thread.kill()
                    thread = GuestThread(program, GuestVcpu(), core.machine.turns)
                    threads[vmcb_pa] = thread
                event = v.event_inj if v.event_inj & EVENTINJ_VALID else 0
                v.event_inj = 0  # taken
                thread.vcpu._bind(core, thread, regs, event)
                exit_ = thread.run()
                v.rflags = thread.rflags  # saved in the VMCB at #VMEXIT
    return exit_
