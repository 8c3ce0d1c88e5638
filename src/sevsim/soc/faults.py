"""Hardware faults, named as the x86 architecture names them.

They are exceptions because that is what they are to the software that caused them: the
access did not happen. The firmware never raises these into the host (it returns status
codes); the silicon does.
"""

from __future__ import annotations

# #PF error-code bits (AMD APM vol. 2 §8.4.2; hardware.md §3.2).
PF_P = 1 << 0  # 0: page not present; 1: protection violation
PF_W = 1 << 1  # the access was a write
PF_U = 1 << 2  # the access was made at CPL 3
PF_RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry
PF_ID = 1 << 4  # the access was an instruction fetch


class HardwareFault(Exception):
    """Base of every architectural fault the silicon raises."""

    vector: int = -1
    mnemonic: str = "#?"


class PageFault(HardwareFault):
    """#PF (vector 14): CR2 holds the linear address, ``error_code`` the reason."""

    vector = 14
    mnemonic = "#PF"

    def __init__(self, address: int, error_code: int, reason: str = "") -> None:
        self.address = address  # what CR2 receives
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"#PF at {address:#x}, error code {error_code:#x} ({self.describe()})")

    def describe(self) -> str:
        e = self.error_code
        parts = [
            "protection" if e & PF_P else "not-present",
            "write" if e & PF_W else "read",
            "user" if e & PF_U else "supervisor",
        ]
        if e & PF_RSVD:
            parts.append("reserved bit")
        if e & PF_ID:
            parts.append("instruction fetch")
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)


class GeneralProtection(HardwareFault):
    """#GP (vector 13), e.g. a non-canonical address or a bad MSR / control-register write."""

    vector = 13
    mnemonic = "#GP"

    def __init__(self, reason: str, error_code: int = 0) -> None:
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"#GP({error_code}): {reason}")


class MachineCheck(HardwareFault):
    """#MC (vector 18): the memory system could not complete the access (no DRAM there)."""

    vector = 18
    mnemonic = "#MC"

    def __init__(self, address: int, reason: str) -> None:
        self.address = address
        super().__init__(f"#MC at physical address {address:#x}: {reason}")


class NestedPageFault(HardwareFault):
    """A nested-paging fault: the hypervisor's tables do not allow a guest-physical access.
    It is not delivered to the guest: it is a #VMEXIT(NPF) with the error code in EXITINFO1
    and the guest-physical address, without the C-bit, in EXITINFO2."""

    vector = -1
    mnemonic = "#NPF"

    def __init__(self, gpa: int, error_code: int, reason: str = "") -> None:
        self.gpa = gpa
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"#NPF at GPA {gpa:#x}, EXITINFO1 {error_code:#x} {reason}".rstrip())


class InvalidOpcode(HardwareFault):
    """#UD (vector 6)."""

    vector = 6
    mnemonic = "#UD"
