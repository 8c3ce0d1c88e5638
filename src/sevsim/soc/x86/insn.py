"""Instructions whose effect belongs to the model (QEMU's misc_helper.c in spirit).

The engine stops before each of them (an SVM intercept, a #UD, or an engine exit
for CLFLUSH, see ``vcpu.py``); here the model decides: a #VMEXIT to the hypervisor when the
*VMCB* intercepts the instruction (exit code, EXITINFO1/2, NEXT_RIP), else it performs
the instruction on the model — CPUID of the core, EFER/PAT writes and SEV_STATUS reads,
MOV to CR0/CR3/CR4 with the model's #GP rules, INVLPG on the model's TLB, WBINVD on the
model's cache, RDRAND from the core's random source, CLFLUSH/CLFLUSHOPT of one line of
the accessing domain — and moves RIP on.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from sevsim.api.vmsa import MSR_GHCB
from sevsim.soc import msr
from sevsim.soc.faults import GeneralProtection, HardwareFault
from sevsim.soc.paging import Access
from sevsim.soc.svm import (
    EXIT_CPUID,
    EXIT_HLT,
    EXIT_INVD,
    EXIT_INVLPG,
    EXIT_IOIO,
    EXIT_MSR,
    EXIT_VMGEXIT,
    EXIT_VMMCALL,
    EXIT_VMRUN,
    EXIT_WBINVD,
    EXIT_WRITE_CR0,
    INTERCEPT_CPUID,
    INTERCEPT_HLT,
    INTERCEPT_INVLPG,
    INTERCEPT_MSR_PROT,
    INTERCEPT_VMMCALL,
    INTERCEPT_WBINVD,
    Exit,
)
from sevsim.soc.x86 import decode as dec

if TYPE_CHECKING:
    from sevsim.soc.x86.vcpu import X86Vcpu


def intercept(cpu: X86Vcpu, code: int, info1: int) -> Exit | None:
    """An SVM intercept the engine took (QEMU unwound to the instruction)."""
    gm, uc, core = cpu.gm, cpu.uc, cpu.core
    misc1, misc2 = gm.intercept_misc1, gm.intercept_misc2
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    if code == EXIT_CPUID:
        leaf, sub = uc.reg_read(X.UC_X86_REG_RAX), uc.reg_read(X.UC_X86_REG_RCX)
        if misc1 & INTERCEPT_CPUID:
            return cpu.vmexit(code, leaf=leaf & 0xFFFF_FFFF)
        values = core.cpuid(leaf & 0xFFFF_FFFF, sub & 0xFFFF_FFFF)
        for reg, value in zip(
            (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX),
            values,
            strict=True,
        ):
            uc.reg_write(reg, value)
        cpu.skip()
        return None
    if code == EXIT_MSR:
        return msr_access(cpu, write=bool(info1))
    if code == EXIT_IOIO:
        return cpu.vc(code, rip)  # only SEV-ES stops IN/OUT before they execute
    if code == EXIT_HLT:
        if misc1 & INTERCEPT_HLT:
            return cpu.vmexit(code)
        cpu.skip()
        return Exit(EXIT_HLT, next_rip=uc.reg_read(X.UC_X86_REG_RIP))
    if code == EXIT_INVLPG:
        ins = cpu.instruction()
        va = cpu.operand_address(ins)
        if misc1 & INTERCEPT_INVLPG:
            if gm.sev_es:
                return cpu.vc(code, rip)
            return Exit(code, va, 0, next_rip=ins.next_ip)
        core.invlpg(va)
        cpu.flush_tlb()
        uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
        return None
    if code in (EXIT_WBINVD, EXIT_INVD):
        if misc2 & INTERCEPT_WBINVD:
            return cpu.vmexit(code)
        core.wbinvd()  # MODEL: INVD writes back too (dropping dirty lines loses data)
        cpu.frames.invalidate()  # the engine's copies are cache lines too: now gone
        cpu.flush_tlb()
        cpu.skip()
        return None
    if EXIT_WRITE_CR0 <= code < EXIT_WRITE_CR0 + 16:
        return write_cr(cpu, code - EXIT_WRITE_CR0)
    if code == EXIT_VMRUN:
        return cpu.vmexit(code)
    return cpu.shutdown(f"unexpected intercept {code:#x} at {rip:#x}")


def write_cr(cpu: X86Vcpu, n: int) -> Exit | None:
    """MOV to CRn, LMSW or CLTS: the model checks and applies it, the engine follows."""
    uc, core = cpu.uc, cpu.core
    ins = cpu.instruction()
    if cpu.gm.vmcb.intercept_cr >> (16 + n) & 1:
        if cpu.gm.sev_es:
            return cpu.vc(EXIT_WRITE_CR0 + n, ins.ip)
        # The VMCB intercepts writes to CRn: EXITINFO1 bit 63 says the GPR number in bits
        # 3:0 is valid (decode assists), for MOV to CRn only.
        info1 = 0
        if ins.mnemonic == dec.Mnemonic.MOV:
            info1 = 1 << 63 | dec.GPR_NAMES.index(dec.full_name(ins.op1_register))
        return Exit(EXIT_WRITE_CR0 + n, info1, next_rip=ins.next_ip)
    if ins.mnemonic == dec.Mnemonic.CLTS:
        value = core.cr0 & ~(1 << 3)
    elif ins.mnemonic == dec.Mnemonic.LMSW:
        src = (
            dec.register_value(uc.reg_read, ins.op0_register)
            if ins.op0_kind == 0
            else struct.unpack("<H", cpu.memory.read(cpu.operand_address(ins), 2))[0]
        )
        value = (core.cr0 & ~0xE) | (src & 0xF) | (core.cr0 & 1)
    else:
        value = dec.register_value(uc.reg_read, ins.op1_register)
    try:
        if n == 0:
            core.write_cr0(value)
            uc.reg_write(X.UC_X86_REG_CR0, core.cr0)
            cpu.set_efer(core.efer)
        elif n == 3:
            core.write_cr3(value)
            uc.reg_write(X.UC_X86_REG_CR3, core.cr3)
        elif n == 4:
            core.write_cr4(value)
            uc.reg_write(X.UC_X86_REG_CR4, core.cr4)
    except GeneralProtection as gp:
        return cpu.deliver_exception(13, 0, ins.ip, str(gp))
    cpu.flush_tlb()
    uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
    return None


def msr_access(cpu: X86Vcpu, write: bool) -> Exit | None:
    """RDMSR/WRMSR: SEV_STATUS from the hardware, EFER and PAT the guest's own, any other
    MSR to the hypervisor (MSR intercepts) or #GP."""
    uc, core, gm = cpu.uc, cpu.core, cpu.gm
    index = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFF_FFFF
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    value = (uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFF_FFFF) << 32 | (
        uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFF_FFFF
    )
    try:
        if index == msr.SEV_STATUS:
            # MODEL: answered by the hardware, never intercepted (docs/model.md).
            if write:
                raise GeneralProtection("SEV_STATUS is read-only")
            result = gm.sev_status
        elif index == MSR_GHCB and gm.sev_es:
            # SEV-ES: the guest's own GHCB MSR; the hardware saves it in the VMCB at #VMEXIT.
            if write:
                gm.ghcb_msr = value
                result = None
            else:
                result = gm.ghcb_msr
        elif index in (msr.EFER, msr.PAT):
            if write:
                core.wrmsr(index, value)
                cpu.set_efer(core.efer)
                cpu.flush_tlb()
                result = None
            else:
                result = core.rdmsr(index)
        elif gm.intercept_misc1 & INTERCEPT_MSR_PROT:
            if gm.sev_es:
                return cpu.vc(EXIT_MSR, rip)
            ins = cpu.instruction()
            return Exit(
                EXIT_MSR,
                int(write),
                0,
                next_rip=ins.next_ip,
                detail={"msr": index, **({"value": value} if write else {})},
            )
        else:
            raise GeneralProtection(f"MSR {index:#x} in a guest without MSR intercepts")
    except GeneralProtection as gp:
        return cpu.deliver_exception(13, 0, rip, str(gp))
    if result is not None:
        uc.reg_write(X.UC_X86_REG_RAX, result & 0xFFFF_FFFF)
        uc.reg_write(X.UC_X86_REG_RDX, result >> 32)
    uc.reg_write(X.UC_X86_REG_RIP, rip + 2)
    return None


def invalid_opcode(cpu: X86Vcpu, rip: int) -> Exit | None:
    """#UD from the engine: VMMCALL, RDRAND and CLFLUSHOPT are the model's to perform;
    anything else is the guest's #UD."""
    uc = cpu.uc
    try:
        ins = cpu.instruction(rip)
    except HardwareFault as fault:
        return cpu.deliver_exception(
            6, None, rip, f"#UD, and the instruction is unreadable ({fault})"
        )
    mnemonic = ins.mnemonic
    if mnemonic == dec.Mnemonic.VMGEXIT and cpu.gm.sev_es:
        # An automatic exit that ends the instruction: the guest resumes after it.
        uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
        return Exit(EXIT_VMGEXIT)
    if mnemonic in (dec.Mnemonic.VMMCALL, dec.Mnemonic.VMGEXIT):  # REP is ignored outside ES
        if cpu.gm.intercept_misc2 & INTERCEPT_VMMCALL:
            if cpu.gm.sev_es:
                return cpu.vc(EXIT_VMMCALL, rip)
            nr = uc.reg_read(X.UC_X86_REG_RAX)
            return Exit(EXIT_VMMCALL, next_rip=ins.next_ip, detail={"nr": nr})
    elif mnemonic == dec.Mnemonic.RDRAND and ins.op_count == 1:
        size = dec.iced.RegisterInfo(ins.op0_register).size
        value = int.from_bytes(cpu.machine.rdrand.random_bytes(size, "rdrand"), "little")
        full = dec.uc_register(ins.op0_register)
        uc.reg_write(
            full, value if size >= 4 else (uc.reg_read(full) & ~((1 << 8 * size) - 1)) | value
        )
        flags = uc.reg_read(X.UC_X86_REG_RFLAGS) & ~0x8D5
        uc.reg_write(X.UC_X86_REG_RFLAGS, flags | 1)  # CF = 1: a value is ready
        uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
        return None
    elif mnemonic == dec.Mnemonic.CLFLUSHOPT:
        va = cpu.operand_address(ins)
        try:
            clflush(cpu, va)
        except HardwareFault as fault:
            return cpu.model_fault(fault, rip, va)
        uc.reg_write(X.UC_X86_REG_RIP, ins.next_ip)
        return None
    return cpu.deliver_exception(6, None, rip, f"#UD at {rip:#x}: {ins}")


def clflush(cpu: X86Vcpu, va: int) -> None:
    """CLFLUSH: the line of va's translation, in its domain — the engine's copy first."""
    core = cpu.core
    t = core.translation(va, Access.READ)
    slot = core._slot(t, Access.READ)
    line = t.page_pa | (va & 0xFC0)
    cpu.frames.write_back_line(slot, line)
    core._cache.clflush(line, slot)
