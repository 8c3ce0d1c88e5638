"""What KVM's users see of it (Linux include/uapi/linux/kvm.h and kvm_para.h): the error
an ioctl fails with, why KVM_RUN returned, and the paravirtual interface a guest sees."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from sevsim.api.status import Status
from sevsim.soc.svm import Exit

# Hypercalls (Linux include/uapi/linux/kvm_para.h)
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_ENOSYS = 1000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"  # CPUID 0x40000000 EBX, ECX, EDX

PARKED = "waiting for a STARTUP IPI"  # RunExit("WAIT_SIPI") detail


class KvmError(RuntimeError):
    """An ioctl failed: carries errno and, for SEV commands, the firmware status."""

    def __init__(self, what: str, status: Status | None = None, err: int = errno.EIO) -> None:
        text = what if status is None else f"{what}: firmware status {status.name}"
        super().__init__(text)
        self.status = status
        self.errno = err


@dataclass
class RunExit:
    """Why KVM_RUN returned to the VMM (KVM_EXIT_* in spirit)."""

    reason: str  # "HLT", "DONE", "SHUTDOWN", "FAIL_ENTRY", "INTERNAL_ERROR"
    detail: str = ""
    exit: Exit | None = None
