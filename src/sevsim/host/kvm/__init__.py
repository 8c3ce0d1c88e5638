"""A VM manager modelled on KVM's AMD SVM and SEV support (Linux arch/x86/kvm/svm/{svm,sev}.c).

What it does, and what it can see, is what KVM does and sees:

* **Guest memory** is host physical memory (pages from the host kernel), reached by the
  hypervisor through its own direct map — with the host key when the host runs with SME.
* **Nested page tables** are real page-table bytes in host DRAM, built through the direct
  map with the host C-bit on every entry when SME is active (KVM's ``shadow_me_value``),
  filled on demand at #NPF.
* **vCPUs** are VMCB pages; VMRUN is issued on a host core. Exits are handled here
  (CPUID, MSR, I/O to a serial console, hypercalls, #NPF) or returned to the caller
  (HLT, SHUTDOWN, a failed entry), as KVM returns to QEMU.
* **SEV**: the guest's firmware context is made with LAUNCH_START and bound to an ASID
  with ACTIVATE; the launch image is encrypted with LAUNCH_UPDATE_DATA; teardown is
  DEACTIVATE then DECOMMISSION. SEV ASIDs come from ``SevAsids``, which recycles lazily
  as KVM does: a freed ASID waits in a reclaim set, and only when the pool is empty does
  KVM run WBINVD on every core and DF_FLUSH, after which the reclaimed ASIDs are free.
* Non-SEV guests get ASIDs above the SEV range (MODEL: one per VM, where KVM hands them
  out per core and generation).

A guest's secrets are not reachable from here: the hypervisor reads guest memory only
through its own mappings, and the firmware answers only with statuses and public data.

The modules, as Linux splits the same code:

* ``uapi`` — what KVM's users see (include/uapi/linux/kvm.h, kvm_para.h): ``KvmError``,
  ``RunExit``, the hypercall numbers.
* ``kvm_main`` — ``Kvm`` and the core of ``Vm`` (virt/kvm/kvm_main.c, the x86 MMU):
  memslots, the nested page table and #NPF, running the vCPUs, IPIs, teardown.
* ``sev`` — SEV (arch/x86/kvm/svm/sev.c): ``SevAsids``, firmware commands, and the
  ``SevGuest`` commands of a VM (launch, secret, attestation, debug, teardown).
* ``sev_migration`` — KVM_SEV_SEND_* and KVM_SEV_RECEIVE_* (also sev.c in Linux).
* ``svm`` — the vCPU (arch/x86/kvm/svm/svm.c): its VMCB, VMRUN and exit handling.
"""

from sevsim.host.kvm.kvm_main import (
    COM1,
    COM1_LSR,
    MAX_FIRMWARE,
    NPT_LEAF,
    NPT_TABLE,
    PC_LOWMEM,
    PC_LOWMEM_LIMIT,
    Kvm,
    MemSlot,
    SerialPort,
    Vm,
)
from sevsim.host.kvm.sev import KvmSev, SevAsids, SevGuest
from sevsim.host.kvm.sev_migration import SevMigration
from sevsim.host.kvm.svm import EFER_SVME, RFLAGS_IF, Vcpu
from sevsim.host.kvm.uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PARKED,
    KvmError,
    RunExit,
)

__all__ = [
    "COM1",
    "COM1_LSR",
    "EFER_SVME",
    "KVM_HC_MAP_GPA_RANGE",
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "MAX_FIRMWARE",
    "NPT_LEAF",
    "NPT_TABLE",
    "PARKED",
    "PC_LOWMEM",
    "PC_LOWMEM_LIMIT",
    "RFLAGS_IF",
    "Kvm",
    "KvmError",
    "KvmSev",
    "MemSlot",
    "RunExit",
    "SerialPort",
    "SevAsids",
    "SevGuest",
    "SevMigration",
    "Vcpu",
    "Vm",
]
