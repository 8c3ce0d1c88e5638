"""CPUID as a host core of a profile reports it.

Only the leaves that memory encryption and paging software reads are modelled; any other
leaf returns zeros. The SEV leaf 0x8000001F is the profile's registers verbatim.
"""

from __future__ import annotations

from sevsim.profiles import MachineProfile

Regs = tuple[int, int, int, int]

# Leaf 1 EDX: FPU, PSE, TSC, MSR, PAE, CX8, APIC, PGE, PAT, PSE-36, CLFSH, MMX, FXSR, SSE, SSE2.
_LEAF1_EDX = sum(1 << b for b in (0, 3, 4, 5, 6, 8, 9, 13, 16, 17, 19, 23, 24, 25, 26))
# Leaf 1 ECX: SSE3, SSSE3, CMPXCHG16B, SSE4.1, SSE4.2, POPCNT, AES, RDRAND (every EPYC has
# them, and the instruction engine executes them).
_LEAF1_ECX = sum(1 << b for b in (0, 9, 13, 19, 20, 23, 25, 30))
LEAF1_ECX_HYPERVISOR = 1 << 31
_EXT1_EDX = (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)  # NX, Page1GB, RDTSCP, LM
_EXT1_ECX = (1 << 0) | (1 << 2)  # LahfSahf, SVM
_SVM_EDX = (1 << 0) | (1 << 3) | (1 << 6)  # NP, NRIPS, FlushByAsid
LEAF7_EBX_SMEP = 1 << 7
LEAF7_ECX_LA57 = 1 << 16
MAX_EXTENDED_LEAF = 0x8000001F


def _signature(family: int, model: int, stepping: int) -> int:
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family > 0xF else 0
    return (
        (ext_family << 20)
        | ((model >> 4) << 16)
        | (base_family << 8)
        | ((model & 0xF) << 4)
        | stepping
    )


def host_cpuid(profile: MachineProfile, leaf: int, subleaf: int = 0, core_index: int = 0) -> Regs:
    """(EAX, EBX, ECX, EDX) for CPUID(leaf, subleaf) on a host (not virtualised) core."""
    if leaf == 0:
        vendor = b"AuthenticAMD"
        return (0x10, *(int.from_bytes(vendor[i : i + 4], "little") for i in (0, 8, 4)))
    if leaf == 1:
        ebx = (core_index << 24) | (profile.cores << 16) | (8 << 8)  # CLFLUSH size 8 x 8 bytes
        return (
            _signature(profile.family, profile.model, profile.stepping),
            ebx,
            _LEAF1_ECX,
            _LEAF1_EDX,
        )
    if leaf == 7 and subleaf == 0:
        return (0, LEAF7_EBX_SMEP, LEAF7_ECX_LA57 if profile.la57 else 0, 0)
    if leaf == 0x8000_0000:
        vendor = b"AuthenticAMD"
        return (
            MAX_EXTENDED_LEAF,
            *(int.from_bytes(vendor[i : i + 4], "little") for i in (0, 8, 4)),
        )
    if leaf == 0x8000_0001:
        return (
            _signature(profile.family, profile.model, profile.stepping),
            0,
            _EXT1_ECX,
            _EXT1_EDX,
        )
    if leaf == 0x8000_0008:
        return ((profile.maxlinaddr << 8) | profile.maxphyaddr, 0, profile.cores - 1, 0)
    if leaf == 0x8000_000A:
        return (1, profile.nasid, 0, _SVM_EDX)
    if leaf == 0x8000_001F:
        return (profile.sev_eax, profile.sev_ebx, profile.sev_ecx, profile.sev_edx)
    return (0, 0, 0, 0)
