"""What the VMM does for a debugger attached to its guest (the target side of QEMU's
gdbstub with KVM: gdbstub/system.c, target/i386/kvm/kvm.c, accel/kvm's guest debug).

Everything goes the way a hypervisor on a real SEV host could go:

* **Registers** are the VMCB save area and KVM's copy of the GPRs: a plain SEV guest does
  not hide them (SEV-ES would). The x87/SSE state is not reported (the model's KVM does not
  keep it), so the debugger shows those registers as unavailable.
* **Memory** is read as the guest sees it: the linear address goes through the guest's own
  page tables (paging off: linear = physical), which are read with the guest's key; the
  leaf's C-bit says whether the page is private (read and written by the firmware with
  DBG_DECRYPT / DBG_ENCRYPT, as QEMU's SEV debug hooks do) or shared (read plainly through
  the VMM's mapping). A guest whose policy has NODBG gets neither: the firmware refuses
  with POLICY_FAILURE, and nothing of its private memory (page tables included) can be seen.
* **Breakpoints**: software breakpoints are INT3 bytes written into the guest's code the
  same way (DBG_ENCRYPT), with KVM intercepting #BP; hardware breakpoints are DR0-DR3
  with DR7 and a #DB intercept (KVM_SET_GUEST_DEBUG), which the engine checks as it
  reaches each instruction. Single steps are RFLAGS.TF with the #DB intercept.
* **Run control** is all-stop, as QEMU's: a debug exit of one vCPU stops them all.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Any

from sevsim.api.status import Status
from sevsim.host import guest_walk
from sevsim.host.kvm import KvmError
from sevsim.host.kvm.svm import (
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
)
from sevsim.soc.svm import BP_VECTOR, DR6_BS

if TYPE_CHECKING:
    from sevsim.host.kvm import Vcpu
    from sevsim.host.vmm import Vmm

# GDB's signal numbers (gdb/signals.def), as QEMU's gdbstub reports stops.
SIGINT, SIGQUIT, SIGTRAP, SIGABRT = 2, 3, 5, 6
INT3 = 0xCC
CR0_PG = 1 << 31
EFER_LMA = 1 << 10
GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
# What a debugger may change: KVM_SET_REGS (GPRs, RIP, RFLAGS). Segments and control
# registers would need KVM_SET_SREGS with whole descriptors; they are read-only here.
WRITABLE = frozenset(GPRS) | {"rip", "eflags"}
NODBG_REASON = (
    "the guest's SEV policy forbids debugging (NODBG): the firmware refuses "
    "DBG_DECRYPT/DBG_ENCRYPT with POLICY_FAILURE"
)


class DebugError(RuntimeError):
    """A debugger request the VMM cannot carry out; one line saying why."""


class GuestDebug:
    """The debugger's view of one VMM's guest. Its methods run with the guest stopped."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.sw_breakpoints: dict[int, tuple[int, bool, int]] = {}  # addr -> (GPA, private, byte)
        self.hw_breakpoints: list[int] = []
        self._stop: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self.stop_requested = False  # Ctrl-C: the runner stops at its next chance
        self._noted: set[str] = set()

    @property
    def vm(self):
        vm = self.vmm.vm
        if vm is None or vm.destroyed:
            raise DebugError("the guest is gone")
        return vm

    def vcpu(self, index: int) -> Vcpu:
        vcpus = self.vm.vcpus
        if not 0 <= index < len(vcpus):
            raise DebugError(f"no vCPU {index}")
        return vcpus[index]

    # ---- stops -------------------------------------------------------------------------------
    def record(self, stop: dict[str, Any]) -> dict[str, Any]:
        """A stop for the debugger to collect with ``wait``."""
        with self._changed:
            self._stop = stop
            self._changed.notify_all()
        return stop

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """The next stop (and forget it), or None after ``timeout`` seconds."""
        with self._changed:
            if self._stop is None:
                self._changed.wait(timeout)
            stop, self._stop = self._stop, None
        return stop

    def forget_stop(self) -> None:
        with self._changed:
            self._stop = None

    @staticmethod
    def describe(vcpu: Vcpu) -> dict[str, Any]:
        """A KVM_EXIT_DEBUG: which kind of breakpoint, or a finished step."""
        vector, dr6 = vcpu.debug_exit
        if vector == BP_VECTOR:
            reason = "swbreak"
        else:
            reason = "step" if dr6 & DR6_BS else "hwbreak"
        return {"cpu": vcpu.index, "signal": SIGTRAP, "reason": reason}

    # ---- KVM_SET_GUEST_DEBUG -----------------------------------------------------------------
    def apply(self, step: Vcpu | None = None) -> None:
        """Every vCPU gets the breakpoints; ``step`` also gets the single-step flag."""
        control = KVM_GUESTDBG_ENABLE
        if self.sw_breakpoints:
            control |= KVM_GUESTDBG_USE_SW_BP
        if self.hw_breakpoints:
            control |= KVM_GUESTDBG_USE_HW_BP
        for vcpu in self.vm.vcpus:
            single = KVM_GUESTDBG_SINGLESTEP if vcpu is step else 0
            vcpu.set_guest_debug(control | single, self.hw_breakpoints)

    # ---- registers ---------------------------------------------------------------------------
    def registers(self, index: int) -> dict[str, int]:
        vcpu = self.vcpu(index)
        v = vcpu.vmcb()
        regs = {name: vcpu.regs.get(name, 0) for name in GPRS}
        regs.update(rax=v.rax, rsp=v.rsp, rip=v.rip, eflags=v.rflags & 0xFFFF_FFFF)
        regs.update({seg: getattr(v, f"{seg}_selector") for seg in SEGMENTS})
        regs.update(fs_base=v.fs_base, gs_base=v.gs_base)
        regs.update(cr0=v.cr0, cr2=v.cr2, cr3=v.cr3, cr4=v.cr4, efer=v.efer)
        return regs

    def set_registers(self, index: int, values: dict[str, int]) -> None:
        vcpu = self.vcpu(index)
        current = self.registers(index)
        fixed = [n for n, value in values.items() if n not in WRITABLE and current.get(n) != value]
        if fixed:
            raise DebugError(f"cannot change {', '.join(fixed)} (only GPRs, RIP and EFLAGS)")
        vmcb = {}
        for name, value in values.items():
            if name in ("rax", "rsp", "rip"):
                vmcb[name] = value
            elif name == "eflags":
                vmcb["rflags"] = value | 2
            if name in GPRS:
                vcpu.regs[name] = value  # KVM's copy (RAX is also loaded from it at VMRUN)
        vcpu.set_vmcb(**vmcb)

    # ---- memory ------------------------------------------------------------------------------
    def _refused(self, exc: KvmError) -> DebugError:
        if exc.status == Status.POLICY_FAILURE:
            self._note(NODBG_REASON)
            return DebugError(NODBG_REASON)
        return DebugError(str(exc))

    def _note(self, line: str) -> None:
        """Once per reason, a line in the console log (QEMU's log), so it is on record."""
        console = self.vmm.console
        if line not in self._noted and console is not None:
            self._noted.add(line)
            console.note(f"sevsim: debugger: {line}\n".encode())

    def _read_physical(self, gpa: int, n: int, private: bool) -> bytes:
        vm = self.vm
        try:
            if private:
                return vm.sev_dbg_decrypt(gpa, n)
            return vm.read(gpa, n)
        except KvmError as exc:
            raise self._refused(exc) from None
        except ValueError:
            raise DebugError(f"Cannot access memory at {gpa:#x}: no RAM there") from None

    def _write_physical(self, gpa: int, data: bytes, private: bool) -> None:
        vm = self.vm
        try:
            if private:
                vm.sev_dbg_encrypt(gpa, data)
            else:
                vm.write(gpa, data)
        except KvmError as exc:
            raise self._refused(exc) from None
        except ValueError:
            raise DebugError(f"Cannot access memory at {gpa:#x}: no RAM there") from None

    def translate(self, index: int, va: int) -> tuple[int, bool]:
        """The guest-physical address of a linear address and whether the guest reaches
        it privately (with its key): the guest's own 4-level walk, its tables read with
        the guest's key (an SEV guest's page-table accesses are always private)."""
        vcpu = self.vcpu(index)
        v = vcpu.vmcb()
        sev = self.vm.sev
        if not v.cr0 & CR0_PG:
            return va & 0xFFFF_FFFF, sev  # paging off: every access of an SEV guest is private
        if not v.efer & EFER_LMA:
            raise DebugError("the guest uses 32-bit paging, which this debugger does not walk")
        me_mask = 1 << (vcpu.cpuid(0x8000_001F)[1] & 0x3F) if sev else 0

        def read_entry(gpa: int) -> int:
            return struct.unpack("<Q", self._read_physical(gpa, 8, sev))[0]

        try:
            return guest_walk.walk(read_entry, v.cr3, va, me_mask)
        except guest_walk.NotMapped:
            raise DebugError(f"Cannot access memory at {va:#x}: not mapped") from None

    def _pieces(self, index: int, va: int, n: int):
        pos, end = va, va + n
        while pos < end:
            length = min(end, (pos | 0xFFF) + 1) - pos
            gpa, private = self.translate(index, pos)
            yield pos, gpa, private, length
            pos += length

    def read(self, index: int, va: int, n: int) -> bytes:
        out = bytearray()
        for _, gpa, private, length in self._pieces(index, va, n):
            out += self._read_physical(gpa, length, private)
        for addr, (_, _, byte) in self.sw_breakpoints.items():  # show the code, not INT3
            if va <= addr < va + n:
                out[addr - va] = byte
        return bytes(out)

    def write(self, index: int, va: int, data: bytes) -> None:
        pieces = list(self._pieces(index, va, len(data)))  # every page mapped, first
        for pos, gpa, private, length in pieces:
            self._write_physical(gpa, data[pos - va : pos - va + length], private)

    # ---- breakpoints -------------------------------------------------------------------------
    def insert_breakpoint(self, kind: str, index: int, addr: int) -> None:
        if kind == "sw":
            if addr not in self.sw_breakpoints:
                gpa, private = self.translate(index, addr)
                byte = self._read_physical(gpa, 1, private)[0]
                self._write_physical(gpa, bytes([INT3]), private)
                self.sw_breakpoints[addr] = (gpa, private, byte)
        elif addr not in self.hw_breakpoints:
            if len(self.hw_breakpoints) == 4:
                raise DebugError("all four hardware breakpoints (DR0-DR3) are in use")
            self.hw_breakpoints.append(addr)
        self.apply()

    def remove_breakpoint(self, kind: str, addr: int) -> None:
        if kind == "sw":
            entry = self.sw_breakpoints.pop(addr, None)
            if entry is not None:
                gpa, private, byte = entry
                self._write_physical(gpa, bytes([byte]), private)
        elif addr in self.hw_breakpoints:
            self.hw_breakpoints.remove(addr)
        self.apply()

    def remove_all(self) -> None:
        for addr in list(self.sw_breakpoints):
            self.remove_breakpoint("sw", addr)
        self.hw_breakpoints.clear()
        self.apply()
