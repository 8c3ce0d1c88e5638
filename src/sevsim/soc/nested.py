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

from sevsim.api.vmsa import GPR_OFFSETS, VMSA, VMSA_SIZE
from sevsim.soc import msr
from sevsim.soc.cache import MemType
from sevsim.soc.faults import (
    GeneralProtection,
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
    EXIT_INVALID,
    EXIT_NPF,
    EXIT_SHUTDOWN,
    GUEST_INTERRUPT_MASK,
    NP_ENABLE,
    NPF_FINAL_GPA,
    NPF_GUEST_PAGE_TABLE,
    RFLAGS_IF,
    SEV_ENABLE,
    SEV_ES_ENABLE,
    TLB_CONTROL_FLUSH_ALL_ASIDS,
    TLB_CONTROL_FLUSH_ASID,
    TLB_CONTROL_FLUSH_ASID_LOCAL,
    VMCB,
    VMCB_SIZE,
    VMSA_SAVE_FIELDS,
    Exit,
)

if TYPE_CHECKING:
    from sevsim.soc.core import Core

EFER_SVME = 1 << 12
# Where #VMEXIT writes each of them, and the GPRs, in the VMSA: (name, offset, size).
_VMSA_SLOTS = tuple(
    (name, VMSA.field(name).offset, VMSA.field(name).size)
    for name in VMSA_SAVE_FIELDS + tuple(GPR_OFFSETS)
)


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
        # SEV-ES: the guest's GHCB MSR, loaded from the VMCB at VMRUN and saved at #VMEXIT.
        self.ghcb_msr = vmcb.ghcb_gpa if self.sev_es else 0

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
    es = bool(v.nested_ctl & SEV_ES_ENABLE)
    invalid = (
        invalid
        or (es and not (sev and profile.sev_es))
        or (es and v.vmsa_pa % 4096)
        # CPUID 0x8000001F EDX is the lowest ASID of an SEV guest without SEV-ES, and the
        # ASIDs below it are SEV-ES ones (hardware.md §7.1): an SEV-ES guest cannot be run
        # as a plain SEV guest on its own ASID, with its registers in the VMCB.
        or (sev and not es and v.asid < profile.min_sev_asid)
        or (es and v.asid >= profile.min_sev_asid)
    )
    if invalid:
        return finish(Exit(EXIT_INVALID))
    vmsa = None
    if es:
        vmsa = EncryptedState.load(core, v)
        if vmsa is None:
            return finish(
                Exit(EXIT_SHUTDOWN, detail={"reason": "the VMSA failed its integrity check"})
            )
        regs = vmsa.regs  # the hypervisor's copy of the GPRs is neither used nor changed

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
    guest = core._guest
    try:
        exit_ = machine.use_x86(vmcb_pa).run(core, guest, v, regs)
    finally:
        v.cr0, v.cr3, v.cr4, v.efer, v.cpl = core.cr0, core.cr3, core.cr4, core.efer, core._cpl
        if v.nested_ctl & NP_ENABLE:
            v.g_pat = core.pat
        if vmsa is not None:
            vmsa.save(v, guest.ghcb_msr)
        core.cr0, core.cr3, core.cr4, core.efer, core.pat, core._cpl = host
        core._guest = None
        core.switch_asid(0)
        core._cfg = core._walk_config()
    v.next_rip = exit_.next_rip
    insn = exit_.detail.get("insn_bytes", b"") if exit_.code == EXIT_NPF and not es else b""
    v.insn_len, v.insn_bytes = len(insn), insn.ljust(15, b"\0")
    return finish(exit_)


class EncryptedState:
    """An SEV-ES guest's register state for one VMRUN (hardware.md §8.1): read from the VMSA
    through the guest's key and checked against the integrity value the chip keeps, lent to
    the engine in the VMCB record's save-area fields and a GPR dict of its own, and written
    back encrypted at #VMEXIT. The hypervisor's save area and GPRs are left as they were; what
    it learns is the control area: the exit code and information, the GHCB MSR, and whether
    the guest takes interrupts (INT_STATE)."""

    def __init__(self, core: Core, spa: int, slot: int, plain: bytes, vmcb) -> None:
        self._core, self._spa, self._slot = core, spa, slot
        self._plain = bytearray(plain)
        state = VMSA.parse(plain)
        self._hypervisor_view = {name: getattr(vmcb, name) for name in VMSA_SAVE_FIELDS}
        for name in VMSA_SAVE_FIELDS:
            setattr(vmcb, name, getattr(state, name))
        self.regs = {name: getattr(state, name) for name in GPR_OFFSETS}

    @classmethod
    def load(cls, core: Core, vmcb) -> EncryptedState | None:
        machine = core.machine
        spa = vmcb.vmsa_pa & ~machine.cbit_mask
        slot = core._memctl.key_slot(True, vmcb.asid)
        plain = core._cache.read(spa, VMSA_SIZE, slot)
        if not machine.chip.vmsa_intact(spa, plain):
            return None
        return cls(core, spa, slot, plain, vmcb)

    def save(self, vmcb, ghcb_msr: int) -> None:
        values = {name: getattr(vmcb, name) for name in VMSA_SAVE_FIELDS}
        values.update(self.regs)
        plain = self._plain
        for name, offset, size in _VMSA_SLOTS:
            plain[offset : offset + size] = values.get(name, 0).to_bytes(size, "little")
        for name, value in self._hypervisor_view.items():
            setattr(vmcb, name, value)
        vmcb.ghcb_gpa = ghcb_msr
        vmcb.int_state = GUEST_INTERRUPT_MASK if values["rflags"] & RFLAGS_IF else 0
        plain = bytes(self._plain)
        self._core._cache.write(self._spa, plain, self._slot)
        self._core.machine.chip.seal_vmsa(self._spa, plain)
