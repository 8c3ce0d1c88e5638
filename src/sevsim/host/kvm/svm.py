"""A vCPU of KVM's SVM support (Linux arch/x86/kvm/svm/svm.c): a VMCB page in host
memory, VMRUN on a host core, and the exits KVM handles itself (CPUID, MSRs, port I/O,
hypercalls, #NPF with the MMIO it emulates) or returns to the VMM (HLT, SHUTDOWN, a
failed entry) as KVM_RUN returns to QEMU."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sevsim import crypto
from sevsim.host import lapic
from sevsim.host.kvm import vmgexit
from sevsim.host.kvm.uapi import (
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SIGNATURE,
    PARKED,
    KvmError,
    RunExit,
)
from sevsim.soc.core import Core
from sevsim.soc.cpuid import LEAF1_ECX_HYPERVISOR
from sevsim.soc.svm import (
    BP_VECTOR,
    DB_VECTOR,
    DR6_BS,
    DR7_L,
    EVENTINJ_VALID,
    EXIT_CPUID,
    EXIT_EXCP_BASE,
    EXIT_HLT,
    EXIT_INTR,
    EXIT_INVALID,
    EXIT_IOIO,
    EXIT_MSR,
    EXIT_NPF,
    EXIT_SHUTDOWN,
    EXIT_VMGEXIT,
    EXIT_VMMCALL,
    GP_EVENT,
    GUEST_INTERRUPT_MASK,
    INTERCEPT_CPUID,
    INTERCEPT_HLT,
    INTERCEPT_IOIO_PROT,
    INTERCEPT_MSR_PROT,
    INTERCEPT_SHUTDOWN,
    INTERCEPT_VMMCALL,
    INTERCEPT_VMRUN,
    IOIO_PORT_SHIFT,
    IOIO_SIZE_BITS,
    IOIO_TYPE_IN,
    NP_ENABLE,
    RFLAGS_IF,
    RFLAGS_TF,
    SEV_ENABLE,
    SEV_ES_ENABLE,
    TLB_CONTROL_DO_NOTHING,
    TLB_CONTROL_FLUSH_ASID,
    VMCB,
    Exit,
)
from sevsim.soc.x86.decode import (
    GPR_NAMES,
    Mnemonic,
    OpKind,
    Register,
    RegisterInfo,
    decode,
    disassemble,
)

if TYPE_CHECKING:
    from sevsim.host.kvm.kvm_main import Vm

EFER_SVME = 1 << 12
DEFAULT_GUEST_PAT = 0x0007_0406_0007_0406  # the PAT's power-on value
MSR_APIC_BASE = 0x1B
GP_VECTOR = 13
NPF_WRITE = 1 << 1  # #NPF EXITINFO1: the access was a write
NPF_RSVD = 1 << 3  # #NPF EXITINFO1: a reserved bit was set (KVM's MMIO entries)
# KVM_SET_GUEST_DEBUG's control flags (Linux include/uapi/linux/kvm.h, x86)
KVM_GUESTDBG_ENABLE = 1 << 0
KVM_GUESTDBG_SINGLESTEP = 1 << 1
KVM_GUESTDBG_USE_SW_BP = 1 << 16
KVM_GUESTDBG_USE_HW_BP = 1 << 17
EVENTINJ_TYPE_INTR = 0 << 8  # an external interrupt
HALT_POLL = 0.001  # longest a halted vCPU waits in KVM_RUN for its interrupt


class _Rom:
    """What stands behind a read-only memslot for a guest's write: nothing."""

    def read(self, offset: int) -> int:
        return 0

    def write(self, offset: int, value: int) -> None:
        pass


class _Unassigned(_Rom):
    """No device at all: reads give all ones, writes vanish (QEMU's unassigned memory)."""

    def read(self, offset: int) -> int:
        return (1 << 64) - 1


ROM, UNASSIGNED = _Rom(), _Unassigned()
_REG_NAMES = {getattr(Register, name.upper()): name for name in GPR_NAMES}


@dataclass
class Vcpu:
    vm: Vm
    index: int
    regs: dict[str, int] = field(default_factory=dict)
    exits: int = 0
    npfs: list[tuple[int, int]] = field(default_factory=list)  # (GPA, error code) per #NPF

    def __post_init__(self) -> None:
        kernel = self.vm.kernel
        self.vmcb_va = kernel.alloc_pages(1)
        self.vmcb_addr = kernel.pa(self.vmcb_va) | kernel.me_mask  # __sme_set(vmcb page)
        self.core_index = self.index % len(kernel.core.machine.cores)
        self.asid = self.vm.asid  # what pre_run puts into the VMCB (svm->asid)
        self._last_core: int | None = None
        # SEV-ES (sev_es_init_vmcb): a VMSA page per vCPU holds its registers once
        # LAUNCH_UPDATE_VMSA has encrypted it; from then on KVM can neither read nor set them.
        self.guest_state_protected = False
        self.vmsa_va = self.vmsa_pa = 0
        if self.vm.sev_es:
            self.vmsa_va = kernel.alloc_pages(1)
            self.vmsa_pa = kernel.pa(self.vmsa_va)
        self.set_vmcb(
            intercept_misc1=INTERCEPT_CPUID
            | INTERCEPT_HLT
            | INTERCEPT_IOIO_PROT
            | INTERCEPT_MSR_PROT
            | INTERCEPT_SHUTDOWN,
            intercept_misc2=INTERCEPT_VMRUN | INTERCEPT_VMMCALL,
            asid=self.vm.asid,
            nested_ctl=NP_ENABLE
            | (SEV_ENABLE if self.vm.sev else 0)
            | (SEV_ES_ENABLE if self.vm.sev_es else 0),
            vmsa_pa=self.vmsa_pa,
            ncr3=self.vm.npt.cr3(),
            g_pat=DEFAULT_GUEST_PAT,
        )
        # Each vCPU has a local APIC; all but the first (the APs) wait for a STARTUP IPI.
        self.apic = lapic.LocalApic(self.index, self._send_ipi)
        self.parked = self.index > 0
        self.kick = threading.Event()  # set by the VMM to get the vCPU out of KVM_RUN
        self.guest_debug = 0  # KVM_GUESTDBG_* flags from KVM_SET_GUEST_DEBUG
        self.eff_db = [0, 0, 0, 0]  # the debugger's DR0-DR3 (linear addresses)
        self._tf_added = False  # KVM set RFLAGS.TF for a single step (the guest had it clear)
        self.debug_exit = (0, 0)  # the last KVM_EXIT_DEBUG's (exception vector, DR6)
        self.halted = False  # in HLT with interrupts on, until an interrupt wakes it
        kernel.core.machine.use_x86(self.vmcb_addr)  # its engine, for tools to see before VMRUN
        self.reset()
        self._spins = 0

    def __repr__(self) -> str:
        return f"<Vcpu {self.vm.name}#{self.index} core {self.core_index}>"

    def _send_ipi(self, mode: int, vector: int, target: int) -> None:
        self.vm.ipi_source = self
        try:
            self.vm.send_ipi(mode, vector, target)
        finally:
            self.vm.ipi_source = None

    def reset(self) -> None:
        """The architectural reset state (KVM/QEMU's vCPU reset): real mode, CS selector
        0xF000 with base 0xFFFF0000 and RIP 0xFFF0, so the first fetch is at 0xFFFFFFF0;
        RDX holds the processor signature (CPUID 1 EAX). An SEV-ES vCPU whose state is
        protected keeps it: INIT only makes it wait for its STARTUP IPI again."""
        self.halted = False
        if self.guest_state_protected:
            return
        data = {
            f"{seg}_{f}": 0 for seg in ("es", "ss", "ds", "fs", "gs") for f in ("selector", "base")
        }
        data.update({f"{seg}_limit": 0xFFFF for seg in ("es", "ss", "ds", "fs", "gs", "cs")})
        data.update({f"{seg}_attrib": 0x93 for seg in ("es", "ss", "ds", "fs", "gs")})
        self.set_vmcb(
            **data,
            cs_selector=0xF000,
            cs_base=0xFFFF_0000,
            cs_attrib=0x9B,
            gdtr_base=0,
            gdtr_limit=0xFFFF,
            idtr_base=0,
            idtr_limit=0xFFFF,
            ldtr_selector=0,
            ldtr_base=0,
            ldtr_limit=0xFFFF,
            ldtr_attrib=0x82,
            tr_selector=0,
            tr_base=0,
            tr_limit=0xFFFF,
            tr_attrib=0x8B,
            rip=0xFFF0,
            rsp=0,
            rax=0,
            rflags=2,
            cr0=0x6000_0010,
            cr3=0,
            cr4=0,
            cr2=0,
            efer=EFER_SVME,
            cpl=0,
        )
        self.regs.clear()
        self.regs["rdx"] = self.cpuid(1)[0]

    # ---- the VMCB, in host memory ------------------------------------------------------------
    def vmcb(self) -> Any:
        return VMCB.parse(self.vm.kernel.read(self.vmcb_va, VMCB.size))

    def _vmcb_field(self, name: str) -> int:
        """One field of the VMCB (what KVM reads as svm->vmcb->save.<name>)."""
        f = VMCB.field(name)
        return int.from_bytes(self.vm.kernel.read(self.vmcb_va + f.offset, f.size), "little")

    def set_vmcb(self, **values: int) -> None:
        kernel = self.vm.kernel
        for name, value in values.items():
            f = VMCB.field(name)
            kernel.write(self.vmcb_va + f.offset, value.to_bytes(f.size, "little"))

    # ---- KVM_SET_GUEST_DEBUG (svm_update_exception_bitmap, svm_set_dr7) ---------------------
    def set_guest_debug(self, control: int, breakpoints: list[int] | tuple = ()) -> None:
        """Debug the guest from the host: single step (RFLAGS.TF and a #DB intercept),
        software breakpoints (a #BP intercept: INT3 exits instead of reaching the guest),
        hardware breakpoints (up to four instruction addresses in DR0-DR3, enabled in the
        VMCB's DR7, and the #DB intercept). Each stop is a KVM_EXIT_DEBUG ("DEBUG")."""
        if self.guest_state_protected:
            # svm_vcpu_after_set_cpuid/KVM_SET_GUEST_DEBUG: the registers are encrypted.
            raise KvmError(
                "SEV-ES: the guest's registers are encrypted; KVM cannot debug it", err=errno.EINVAL
            )
        if not control & KVM_GUESTDBG_ENABLE:
            control, breakpoints = 0, ()
        if len(breakpoints) > 4:
            raise ValueError("x86 has four debug address registers (DR0-DR3)")
        self.guest_debug = control
        self.eff_db = list(breakpoints) + [0] * (4 - len(breakpoints))
        intercepts = self._vmcb_field("intercept_exceptions") & ~(1 << DB_VECTOR | 1 << BP_VECTOR)
        if control & (KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP):
            intercepts |= 1 << DB_VECTOR
        if control & KVM_GUESTDBG_USE_SW_BP:
            intercepts |= 1 << BP_VECTOR
        dr7 = 0
        if control & KVM_GUESTDBG_USE_HW_BP:
            dr7 = sum(DR7_L[n] for n in range(len(breakpoints)))
        self.set_vmcb(intercept_exceptions=intercepts, dr7=dr7, dr6=0)

    def _single_step_begin(self) -> None:
        if self.guest_debug & KVM_GUESTDBG_SINGLESTEP:
            rflags = self._vmcb_field("rflags")
            self._tf_added = not rflags & RFLAGS_TF
            self.set_vmcb(rflags=rflags | RFLAGS_TF)

    def _single_step_end(self) -> None:
        """KVM hides the TF it set itself (kvm_get_rflags): the guest's RFLAGS come back."""
        if self._tf_added:
            self.set_vmcb(rflags=self._vmcb_field("rflags") & ~RFLAGS_TF)
            self._tf_added = False

    # ---- KVM_RUN -----------------------------------------------------------------------------
    def run(self) -> RunExit:
        """Enter the guest until an exit the VMM must see."""
        vm = self.vm
        while True:
            if vm.dead is not None:
                return vm.dead
            if self.parked:
                return RunExit("WAIT_SIPI", PARKED)
            if self.kick.is_set():  # a signal for the vCPU thread: KVM_RUN returns -EINTR
                self.kick.clear()
                return RunExit("INTR", "interrupted by the VMM")
            if self.halted and not self._wakes():
                return RunExit("HLT", "waiting for an interrupt")
            self.halted = False
            exit_ = self._vmrun()
            stepping = self.guest_debug & KVM_GUESTDBG_SINGLESTEP
            rip = self._vmcb_field("rip") if stepping else 0
            result = self._handle(exit_)
            if result is not None:
                return result
            if (
                stepping
                and exit_.code != EXIT_IOIO  # the engine finishes IN/OUT, then traps itself
                and self._vmcb_field("rip") != rip
            ):
                # KVM emulated the instruction (CPUID, RDMSR, VMMCALL, MMIO) and moved RIP
                # on: kvm_skip_emulated_instruction ends the single step there.
                self.debug_exit = (DB_VECTOR, DR6_BS)
                return RunExit("DEBUG", "#DB", exit_)
            if stepping and exit_.code == EXIT_INTR:
                # The host's timer ended a slice before the step did: back to the VMM,
                # which decides whether to go on (a signal pending for the vCPU thread).
                return RunExit("INTR", "a time slice ended during a single step", exit_)

    def _wakes(self) -> bool:
        """kvm_vcpu_block for a halted vCPU: an interrupt its APIC would deliver, waited
        for up to HALT_POLL (then KVM_RUN returns, so the VMM can run the other vCPUs). A
        vCPU with no timer armed wakes at once instead (MODEL: the model's devices
        complete without interrupts; guests that wait for them poll after HLT)."""
        apic = self.apic
        if apic.next_expiry() is None and not apic.irr:
            return True
        if apic.pending() is not None:
            return True
        expiry = apic.next_expiry()
        if expiry is not None:
            self.kick.wait(min(max(expiry - apic.clock(), 0.0), HALT_POLL))
        return apic.pending() is not None

    def _inject_interrupt(self) -> None:
        """inject_pending_event: the APIC's highest deliverable vector goes into EVENTINJ
        when the guest can take an interrupt (RFLAGS.IF, which KVM reads in the VMCB of a
        non-ES guest) and nothing else is being injected. MODEL: the STI/MOV SS interrupt
        shadow is not looked at."""
        if self._vmcb_field("event_inj") & EVENTINJ_VALID:
            return
        vector = self.apic.pending()
        if vector is None or not self.interrupts_enabled():
            return
        self.apic.acknowledge(vector)
        self.set_vmcb(event_inj=EVENTINJ_VALID | EVENTINJ_TYPE_INTR | vector)

    def interrupts_enabled(self) -> bool:
        """The guest's RFLAGS.IF: in the VMCB's save area, or for an SEV-ES guest whose
        RFLAGS are encrypted, the hardware's INT_STATE bit (svm_interrupt_blocked)."""
        if self.guest_state_protected:
            return bool(self._vmcb_field("int_state") & GUEST_INTERRUPT_MASK)
        return bool(self._vmcb_field("rflags") & RFLAGS_IF)

    def _vmrun(self) -> Exit:
        core = self.vm.kvm.cpu(self.core_index)
        self._inject_interrupt()
        self._pre_run(core)
        self._single_step_begin()
        try:
            exit_ = core.vmrun(self.vmcb_addr, self.regs)
        finally:
            self._single_step_end()
        self.exits += 1
        return exit_

    def run_once(self) -> Exit:
        """One VMRUN and KVM's handling of its exit (a debugger's or a test's single step
        of KVM_RUN's loop); the raw exit is returned."""
        exit_ = self._vmrun()
        self._handle(exit_)
        return exit_

    def _pre_run(self, core: Core) -> None:
        """pre_sev_run / pre_svm_run: all vCPUs of an SEV guest share its ASID, so the TLB
        of that ASID on this core is flushed when another VMCB ran it last or this VMCB
        last ran on another core."""
        key = (core.index, self.asid)
        flush = self.vm.kvm.sev_vmcbs.get(key) != self.vmcb_addr or self._last_core != core.index
        self.vm.kvm.sev_vmcbs[key] = self.vmcb_addr
        self._last_core = core.index
        self.set_vmcb(
            asid=self.asid,
            tlb_control=TLB_CONTROL_FLUSH_ASID if flush else TLB_CONTROL_DO_NOTHING,
        )
        if not self.guest_state_protected:
            self.set_vmcb(rax=self.regs.get("rax", 0))  # svm_vcpu_run: RAX lives in the VMCB
        core.dr[:] = self.eff_db  # the guest's DR0-DR3 are live while it runs

    def _handle(self, e: Exit) -> RunExit | None:
        vm = self.vm
        if e.code != EXIT_INTR:
            self._spins = 0
        if e.code == EXIT_INTR:
            # The host's timer ended the time slice; KVM goes back in. A vCPU that never
            # exits otherwise is stuck: spinning, or executing garbage that loops.
            self._spins += 1
            if self._spins < vm.spin_budget:
                return None
            vm.dead = RunExit("STUCK", f"no exit in {self._spins} time slices: the vCPU spins", e)
            return vm.dead
        if e.code == EXIT_VMGEXIT:
            return vmgexit.handle(self)
        if e.code == EXIT_NPF:
            gpa = e.info2
            self.npfs.append((gpa, e.info1))
            slot = vm.slot_of(gpa)
            if vm.sev_es and e.info1 & NPF_RSVD:
                # An MMIO access that reached KVM instead of the guest's #VC handler (during
                # an event's delivery): KVM cannot emulate an SEV-ES guest's instruction.
                vm.dead = RunExit("INTERNAL_ERROR", f"SEV-ES: MMIO at GPA {gpa:#x} not emulated", e)
                return vm.dead
            if slot is not None and slot.readonly and e.info1 & NPF_WRITE:
                # A write to ROM: KVM exits to the VMM as MMIO, which drops it.
                problem = self._emulate_mmio(gpa, ROM, gpa)
                if problem is None:
                    return None
            elif vm.map_gpa(gpa):
                return None
            elif vm.sev_es:
                # No emulation for an SEV-ES guest: its next access to the page takes a
                # reserved-bit #NPF, which is #VC for the guest to ask over the GHCB.
                vm.map_mmio(gpa)
                return None
            else:
                # The local APIC, or nothing (QEMU's unassigned memory answers).
                problem = self._emulate_mmio(gpa, *self.mmio_device(gpa))
                if problem is None:
                    return None
            vm.dead = RunExit("INTERNAL_ERROR", f"emulation failure: GPA {gpa:#x}: {problem}", e)
            return vm.dead
        if e.code in (EXIT_EXCP_BASE + DB_VECTOR, EXIT_EXCP_BASE + BP_VECTOR):
            # db_interception / bp_interception: KVM_EXIT_DEBUG (kvm_run->debug.arch holds
            # the exception and DR6; the PC is CS.base + RIP).
            vector = e.code - EXIT_EXCP_BASE
            self.debug_exit = (vector, self._vmcb_field("dr6"))
            self.set_vmcb(dr6=0)
            return RunExit("DEBUG", f"#{'DB' if vector == DB_VECTOR else 'BP'}", e)
        if e.code == EXIT_CPUID:
            leaf, subleaf = self.regs.get("rax", 0), self.regs.get("rcx", 0)
            values = self.cpuid(leaf & 0xFFFF_FFFF, subleaf & 0xFFFF_FFFF)
            self.regs.update(zip(("rax", "rbx", "rcx", "rdx"), values, strict=True))
            self._skip(e)
            return None
        if e.code == EXIT_MSR:
            if self._msr(write=bool(e.info1)):
                self._skip(e)
            return None
        if e.code == EXIT_IOIO:
            self._ioio(e.info1)
            self._skip(e)
            return None
        if e.code == EXIT_VMMCALL:
            self._hypercall()
            self._skip(e)
            return None
        if e.code == EXIT_HLT:
            self._skip(e)
            if not self.interrupts_enabled():
                # Halted with interrupts off (the VMCB's saved RFLAGS, which KVM can read
                # for a non-ES guest): nothing modelled (INIT, NMI) can wake it.
                return RunExit("DONE", "halted with interrupts disabled", e)
            self.halted = True
            return RunExit("HLT", "", e)
        if e.code == EXIT_SHUTDOWN:
            vm.dead = RunExit("SHUTDOWN", e.detail.get("reason", "triple fault"), e)
            return vm.dead
        if e.code == EXIT_INVALID:
            vm.dead = RunExit("FAIL_ENTRY", "VMRUN refused the VMCB (VMEXIT_INVALID)", e)
            return vm.dead
        vm.dead = RunExit("INTERNAL_ERROR", f"unhandled exit {e.name}", e)
        return vm.dead

    def mmio_device(self, gpa: int) -> tuple[Any, int]:
        """What answers an MMIO access at a GPA outside guest RAM, and its base address."""
        if 0 <= gpa - lapic.APIC_BASE < lapic.APIC_SIZE:
            return self.apic, lapic.APIC_BASE
        return UNASSIGNED, gpa

    def _emulate_mmio(self, gpa: int, device: Any, base: int) -> str | None:
        """KVM's MMIO emulation of a MOV: the instruction's bytes come from the VMCB (the
        hardware's decode assists; KVM cannot read an SEV guest's code), the address from
        EXITINFO2. Returns what went wrong, or None."""
        v = self.vmcb()
        code = v.insn_bytes[: v.insn_len]
        if not code:
            return "no instruction bytes (decode assists gave none)"
        long_mode = v.efer & 1 << 10 and v.cs_attrib & 0x200
        bitness = 64 if long_mode else (32 if v.cr0 & 1 and v.cs_attrib & 0x400 else 16)
        ins = decode(code, v.rip, bitness)
        if ins.mnemonic not in (Mnemonic.MOV, Mnemonic.MOVZX) or ins.op_count != 2:
            return f"cannot emulate {disassemble(code, v.rip, bitness, 1)[0][2]!r}"
        offset = gpa - base
        if ins.op0_kind == OpKind.REGISTER:  # a load
            value = device.read(offset)
            self._set_register(ins.op0_register, value)
        elif ins.op1_kind == OpKind.REGISTER:  # a store from a register
            device.write(offset, self._register(ins.op1_register))
        else:  # a store of an immediate
            device.write(offset, ins.immediate(1))
        self.set_vmcb(rip=v.rip + ins.len, rax=self.regs.get("rax", v.rax))
        return None

    def _register(self, reg: int) -> int:
        full = RegisterInfo(reg).full_register
        value = self.regs.get(_REG_NAMES[full], 0)
        return value & (1 << 8 * RegisterInfo(reg).size) - 1

    def _set_register(self, reg: int, value: int) -> None:
        name = _REG_NAMES[RegisterInfo(reg).full_register]
        size = RegisterInfo(reg).size
        if size >= 4:
            self.regs[name] = value & (1 << 8 * size) - 1  # a 32-bit write zero-extends
        else:
            mask = (1 << 8 * size) - 1
            self.regs[name] = self.regs.get(name, 0) & ~mask | value & mask

    def _skip(self, e: Exit) -> None:
        """kvm_skip_emulated_instruction: RIP moves to NEXT_RIP (not for SEV-ES: the
        hardware moved it, or the guest's #VC handler does)."""
        if e.next_rip and not self.guest_state_protected:
            self.set_vmcb(rip=e.next_rip)

    # ---- emulation ---------------------------------------------------------------------------
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The CPUID a VMM like QEMU configures for its guest (KVM_SET_CPUID2)."""
        host = self.vm.kernel.core.cpuid
        if leaf == 0x4000_0000:
            ebx, ecx, edx = (crypto.from_le(KVM_SIGNATURE[i : i + 4]) for i in (0, 4, 8))
            return (0x4000_0001, ebx, ecx, edx)
        if 0x4000_0001 <= leaf <= 0x4000_00FF:
            return (0, 0, 0, 0)
        if leaf == 0x1:
            eax, ebx, ecx, edx = host(leaf, subleaf)
            eax = self.vm.cpu_signature or eax  # QEMU's -cpu model, else the host's
            ebx = (ebx & 0x00FF_FFFF) | self.index << 24  # initial APIC id
            return (eax, ebx, ecx | LEAF1_ECX_HYPERVISOR, edx)
        if leaf == 0x8000_001F:
            if not self.vm.sev:
                return (0, 0, 0, 0)
            # QEMU (target/i386/cpu.c): SEV (and SEV-ES), the C-bit and the reduction.
            eax = 1 << 1 | (1 << 3 if self.vm.sev_es else 0)
            return (eax, self.vm.kvm.cbit | self.vm.kvm.reduced_phys_bits << 6, 0, 0)
        if leaf == 0x8000_000A:
            return (0, 0, 0, 0)  # no nested SVM for the guest
        return host(leaf, subleaf)

    def _msr(self, write: bool) -> bool:
        """True if the MSR access was emulated (RIP moves on), False if #GP was injected."""
        index = self.regs.get("rcx", 0) & 0xFFFF_FFFF
        value = (self.regs.get("rdx", 0) & 0xFFFF_FFFF) << 32 | self.regs.get(
            "rax", 0
        ) & 0xFFFF_FFFF
        result = self.emulate_msr(index, value if write else None)
        if result is None:
            # Anything else: #GP into the guest, as KVM does without ignore_msrs.
            self.set_vmcb(event_inj=GP_EVENT)  # error code 0 in bits 63:32
            return False
        if not write:
            self.regs.update(rax=result & 0xFFFF_FFFF, rdx=result >> 32)
        return True

    def emulate_msr(self, index: int, value: int | None) -> int | None:
        """RDMSR (value None) or WRMSR of one MSR: the value read (0 for a write), or None
        when KVM does not know the MSR (the guest gets #GP)."""
        if index == MSR_APIC_BASE and value is None:
            return 0xFEE0_0000 | 1 << 11 | (1 << 8 if self.index == 0 else 0)
        return None

    def _ioio(self, info1: int) -> None:
        self.regs["rax"] = self.port_io(info1, self.regs.get("rax", 0))

    def port_io(self, info1: int, rax: int) -> int:
        """KVM_EXIT_IO: the device on the port handles it; no device reads all ones. Returns
        RAX afterwards."""
        port = info1 >> IOIO_PORT_SHIFT & 0xFFFF
        size = next((n for n, bit in IOIO_SIZE_BITS.items() if info1 & bit), 1)
        device = self.vm.io_ports.get(port)
        if info1 & IOIO_TYPE_IN:
            mask = (1 << 8 * size) - 1
            value = device.io_in(port, size) if device else mask
            # complete_fast_pio_in: IN AL/AX replaces only those bytes; IN EAX zero-extends.
            rest = rax & ~mask if size < 4 else 0
            return rest | value & mask
        if device:
            device.io_out(port, rax, size)
        return rax

    def _hypercall(self) -> None:
        nr = self.regs.get("rax", 0)
        args = tuple(self.regs.get(r, 0) for r in ("rbx", "rcx", "rdx", "rsi"))
        self.regs["rax"] = self.hypercall(nr, args)

    def hypercall(self, nr: int, args: tuple[int, ...]) -> int:
        """kvm_emulate_hypercall: RAX = nr, arguments in RBX, RCX, RDX, RSI; returns RAX."""
        self.vm.hypercalls.append((nr, args))
        if nr == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = args[0], args[1], args[2]
            if not attrs & KVM_MAP_GPA_RANGE_ENCRYPTED:
                self.vm.shared_ranges.append((gpa, npages))
            else:
                self.vm.shared_ranges = [r for r in self.vm.shared_ranges if r[0] != gpa]
            return 0
        return -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF
