"""Exception and interrupt delivery through the guest's IVT or IDT (QEMU's seg_helper.c
in spirit; AMD APM vol. 2 §8.7, §8.9).

The engine reports an exception; the model delivers it: it reads the gate from the
guest's own tables and pushes the frame on the guest's own stack, through the guest's
translation and key (``GuestMemory``). A fault while delivering is a double fault (#DF);
a fault while delivering #DF is a triple fault, which is a #VMEXIT(SHUTDOWN). In an SEV
guest whose tables decrypt to garbage (the wrong key), delivery itself fails: that is how
"security by crash" ends.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from sevsim.api.layout import Layout
from sevsim.soc.faults import HardwareFault, NestedPageFault
from sevsim.soc.paging import Access
from sevsim.soc.x86.hidden import CS, SS, Segment

if TYPE_CHECKING:
    from sevsim.soc.x86.vcpu import X86Vcpu

DF = 8
PF = 14
# Vectors that push an error code (protected and long mode).
HAS_ERROR_CODE = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
NAMES = {
    0: "#DE",
    1: "#DB",
    2: "NMI",
    3: "#BP",
    4: "#OF",
    5: "#BR",
    6: "#UD",
    7: "#NM",
    8: "#DF",
    10: "#TS",
    11: "#NP",
    12: "#SS",
    13: "#GP",
    14: "#PF",
    16: "#MF",
    17: "#AC",
    18: "#MC",
    19: "#XM",
    29: "#VC",
    30: "#SX",
}
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = (
    1 << 8,
    1 << 9,
    1 << 14,
    1 << 16,
    1 << 17,
    1 << 18,
)

# The guest's tables, as the CPU reads them.
IVT_ENTRY = Layout(
    "IVT_ENTRY",
    4,
    "AMD APM vol. 2, Real-Mode Interrupt Control Transfers",
    (0, "H", "ip"),
    (2, "H", "cs"),
)
_GATE_FIELDS = (
    (0x0, "H", "offset_low"),
    (0x2, "H", "selector"),
    (0x4, "B", "ist"),  # bits 2:0, long mode only
    (0x5, "B", "attributes"),  # bits 4:0 type (S=0), 6:5 DPL, 7 P
    (0x6, "H", "offset_mid"),
)
IDT_GATE = Layout("IDT_GATE", 8, "AMD APM vol. 2, Gate Descriptors", *_GATE_FIELDS)
IDT_GATE64 = Layout(
    "IDT_GATE64",
    16,
    "AMD APM vol. 2, Interrupt-Gate and Trap-Gate Descriptors—Long Mode",
    *_GATE_FIELDS,
    (0x8, "I", "offset_high"),
)
TSS64 = Layout(
    "TSS64",
    104,
    "AMD APM vol. 2, 64-Bit Task State Segment",
    *((0x04 + 8 * n, "Q", f"rsp{n}") for n in range(3)),
    *((0x24 + 8 * (n - 1), "Q", f"ist{n}") for n in range(1, 8)),
    (0x66, "H", "iopb_base"),
)


class DeliveryFault(Exception):
    """The gate, the code segment or the stack could not be used (reason for #DF)."""


class TripleFault(Exception):
    """Delivering #DF failed: the CPU shuts down."""


def vector_name(vector: int) -> str:
    return NAMES.get(vector, f"vector {vector}")


def deliver(
    cpu: X86Vcpu, vector: int, error_code: int | None, return_rip: int, reason: str
) -> None:
    """Deliver one exception (or injected event); escalate to #DF and triple fault.
    A nested page fault during delivery is not the guest's: it goes to the hypervisor."""
    try:
        _deliver_once(cpu, vector, error_code, return_rip)
        return
    except NestedPageFault:
        raise
    except (HardwareFault, DeliveryFault) as first:
        if vector == DF:
            raise TripleFault(f"{reason}; delivering #DF failed: {first}") from None
        cpu.note(f"{vector_name(vector)} could not be delivered ({first}): #DF")
        try:
            _deliver_once(cpu, DF, 0, return_rip)
        except NestedPageFault:
            raise
        except (HardwareFault, DeliveryFault) as second:
            raise TripleFault(
                f"{reason}; delivering it failed ({first}), then #DF failed ({second})"
            ) from None


def _deliver_once(cpu: X86Vcpu, vector: int, error_code: int | None, return_rip: int) -> None:
    core = cpu.core
    mem = cpu.memory
    if not core.cr0 & 1:
        _real_mode(cpu, vector, return_rip)
        return
    idtr = cpu.table_register(X.UC_X86_REG_IDTR)
    long_mode = bool(core.efer & (1 << 10))
    layout = IDT_GATE64 if long_mode else IDT_GATE
    size = layout.size
    if vector * size + size - 1 > idtr[1]:
        raise DeliveryFault(f"vector {vector} is beyond the IDT limit {idtr[1]:#x}")
    gate = layout.parse(mem.read(idtr[0] + vector * size, size, Access.READ))
    offset = gate.offset_low | gate.offset_mid << 16
    selector = gate.selector
    gate_type = gate.attributes & 0x1F
    present = gate.attributes >> 7
    ist = gate.ist & 7
    if long_mode:
        offset |= gate.offset_high << 32
        if gate_type not in (0xE, 0xF):
            raise DeliveryFault(f"IDT entry {vector} is not a 64-bit gate (type {gate_type:#x})")
    elif gate_type not in (0x6, 0x7, 0xE, 0xF):
        raise DeliveryFault(f"IDT entry {vector} has unsupported type {gate_type:#x}")
    if not present:
        raise DeliveryFault(f"IDT entry {vector} is not present")
    cs = cpu.descriptor(selector)
    if not cs.flags & (1 << 15) or not cs.flags & (1 << 11):
        raise DeliveryFault(f"gate {vector} selector {selector:#x} is not a present code segment")
    cpl = cpu.cpl
    dpl = (cs.flags >> 13) & 3
    if dpl > cpl:
        raise DeliveryFault(f"gate {vector}: code segment DPL {dpl} above CPL {cpl}")
    rflags = cpu.reg(X.UC_X86_REG_RFLAGS)
    old_cs = cpu.segment(CS).selector
    old_ss = cpu.segment(SS).selector
    rsp = cpu.reg(X.UC_X86_REG_RSP)
    new_ss = None
    if long_mode:
        if ist or dpl < cpl:
            tss = cpu.table_register(X.UC_X86_REG_TR)[0]
            slot = TSS64.field(f"ist{ist}" if ist else f"rsp{dpl}")
            rsp = int.from_bytes(mem.read(tss + slot.offset, slot.size, Access.READ), "little")
            if dpl < cpl:
                new_ss = Segment(dpl, 0, 0, (dpl << 13))
        frame = [old_ss, cpu.reg(X.UC_X86_REG_RSP), rflags, old_cs, return_rip]
        if vector in HAS_ERROR_CODE and error_code is not None:
            frame.append(error_code)
        rsp &= ~0xF
        data = b"".join(struct.pack("<Q", v) for v in reversed(frame))
        rsp = (rsp - len(data)) & (1 << 64) - 1
        mem.write(rsp, data)
    else:
        if dpl < cpl:
            raise DeliveryFault("a privilege change through a 32-bit gate is not modelled")
        width = 4 if gate_type in (0xE, 0xF) else 2
        frame = [rflags, old_cs, return_rip]
        if vector in HAS_ERROR_CODE and error_code is not None:
            frame.append(error_code)
        fmt = "<I" if width == 4 else "<H"
        data = b"".join(struct.pack(fmt, v & ((1 << 8 * width) - 1)) for v in reversed(frame))
        ss = cpu.segment(SS)
        esp = (rsp - len(data)) & (0xFFFF_FFFF if ss.flags & (1 << 22) else 0xFFFF)
        mem.write(ss.base + esp, data)
        rsp = (rsp & ~(0xFFFF_FFFF if ss.flags & (1 << 22) else 0xFFFF)) | esp
    # Commit: only now does any register change (a failed delivery left none changed).
    clear = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM
    if gate_type in (0x6, 0xE):
        clear |= RFLAGS_IF  # interrupt gate
    cpu.load_segment(CS, Segment(selector & ~3 | dpl, cs.base, cs.limit, cs.flags))
    if new_ss is not None:
        cpu.load_segment(SS, new_ss)
    cpu.set_reg(X.UC_X86_REG_RSP, rsp)
    cpu.set_reg(X.UC_X86_REG_RFLAGS, rflags & ~clear)
    cpu.set_reg(X.UC_X86_REG_RIP, offset)


def _real_mode(cpu: X86Vcpu, vector: int, return_rip: int) -> None:
    """The interrupt vector table: IP and CS at IDTR.base + 4 * vector; push FLAGS, CS, IP."""
    mem = cpu.memory
    idtr = cpu.table_register(X.UC_X86_REG_IDTR)
    if vector * IVT_ENTRY.size + IVT_ENTRY.size - 1 > idtr[1]:
        raise DeliveryFault(f"vector {vector} is beyond the IVT limit")
    entry = IVT_ENTRY.parse(
        mem.read(idtr[0] + vector * IVT_ENTRY.size, IVT_ENTRY.size, Access.READ)
    )
    ip, cs = entry.ip, entry.cs
    ss = cpu.segment(SS)
    sp = cpu.reg(X.UC_X86_REG_RSP) & 0xFFFF
    flags = cpu.reg(X.UC_X86_REG_RFLAGS)
    old_cs = cpu.segment(CS).selector
    data = struct.pack("<HHH", return_rip & 0xFFFF, old_cs, flags & 0xFFFF)
    sp = (sp - 6) & 0xFFFF
    mem.write(ss.base + sp, data)
    cpu.set_reg(X.UC_X86_REG_RSP, sp)
    cpu.set_reg(X.UC_X86_REG_RFLAGS, flags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC))
    cpu.set_reg(X.UC_X86_REG_CS, cs)
    cpu.set_reg(X.UC_X86_REG_RIP, ip)
