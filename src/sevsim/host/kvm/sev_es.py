"""KVM's sev_es_sync_vmsa (Linux arch/x86/kvm/svm/sev.c): the initial VMSA of an SEV-ES
vCPU, built from what KVM holds for it just before LAUNCH_UPDATE_VMSA encrypts it.

KVM copies the VMCB's save area (segments, control registers, RIP, RSP, EFER, PAT ...) into
the VMSA page, then the general-purpose registers it keeps outside the VMCB, then a few
registers the VMCB does not hold: XCR0, DR6, SEV_FEATURES and — Linux 6.10 and later, for
a VM created with KVM_SEV_INIT2 — the x87/SSE reset state (MXCSR 0x1F80, FCW 0x037F).
Older kernels (KVM_SEV_ES_INIT) leave those two zero, so the same VM measures differently
on them (sev-api.md §8.4). Afterwards KVM no longer sees the vCPU's registers.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from sevsim.api import vmsa as sev_vmsa
from sevsim.api.vmsa import GPR_OFFSETS, VMSA
from sevsim.host.kvm.uapi import KvmError
from sevsim.soc.svm import VMSA_SAVE_FIELDS

if TYPE_CHECKING:
    from sevsim.host.kvm.svm import Vcpu

GPRS = ("rax", *GPR_OFFSETS)  # what KVM keeps outside the VMCB (RAX: both)

CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR4_MCE = 1 << 6
DR7_FIXED_1 = 0x400
DR6_ACTIVE_LOW = 0xFFFF_0FF0  # KVM's vcpu->arch.dr6 after reset


def build_vmsa(vcpu: Vcpu, fpu_state: bool = True) -> bytes:
    """The plaintext VMSA of ``vcpu`` (4096 bytes). KvmError if the vCPU is being debugged
    from the host: its breakpoints would be sealed into the guest's state (KVM: -EINVAL)."""
    vmcb = vcpu.vmcb()
    if vcpu.guest_debug or vmcb.dr7 & ~DR7_FIXED_1:
        raise KvmError(
            f"vCPU {vcpu.index}: host debugging is on; an SEV-ES VMSA cannot hold it",
            err=errno.EINVAL,
        )
    values = {name: getattr(vmcb, name) for name in VMSA_SAVE_FIELDS}  # the memcpy
    regs = vcpu.regs
    values.update({name: regs.get(name, 0) for name in GPRS})
    values["rax"] = regs.get("rax", vmcb.rax)
    values.update(
        # KVM's CD_NW_CLEARED quirk: the hardware CR0 of a reset vCPU has caching on.
        cr0=vmcb.cr0 & ~(CR0_CD | CR0_NW),
        # svm_set_cr4 keeps the host's machine-check enable in the hardware CR4.
        # MODEL: the host kernel runs with CR4.MCE set, as Linux does.
        cr4=vmcb.cr4 | CR4_MCE,
        # MODEL: this VMCB leaves DR7 zero at reset where KVM's holds the fixed bit 10.
        dr7=vmcb.dr7 | DR7_FIXED_1,
        dr6=DR6_ACTIVE_LOW,
        xcr0=sev_vmsa.RESET_XCR0,
        sev_features=0,  # no VMSA features (DebugSwap etc.) requested
    )
    if fpu_state:
        values.update(mxcsr=sev_vmsa.RESET_MXCSR, x87_fcw=sev_vmsa.RESET_X87_FCW)
    return VMSA.build(**values)


def sev_es_sync_vmsa(vcpu: Vcpu, fpu_state: bool = True) -> bytes:
    """Write the vCPU's plaintext VMSA into its VMSA page (``vcpu.vmsa_va``); returns it."""
    if vcpu.guest_state_protected:
        raise KvmError(f"vCPU {vcpu.index}: its state is already encrypted", err=errno.EINVAL)
    page = build_vmsa(vcpu, fpu_state)
    vcpu.vm.kernel.write(vcpu.vmsa_va, page)
    return page
