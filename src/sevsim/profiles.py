"""Machine profiles: the CPUID values, geometry and BIOS options of one EPYC generation.

A profile is plain data. Everything the silicon model needs to differ between parts lives
here, so a value the spec marks UNCONFIRMED (../shared/spec/hardware.md §1.3, §10) is a
parameter a user can change with ``profile.with_(...)`` rather than a constant in the code.
``provenance`` says where each value comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

EngineMode = Literal["xe", "xex"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# CPUID Fn8000_001F EAX feature bits (hardware.md §1.1).
SEV_FEATURE_BITS: dict[int, str] = {
    0: "SME",
    1: "SEV",
    2: "VmPgFlush",
    3: "SEV-ES",
    4: "SEV-SNP",
    5: "VMPL",
    6: "RMPQUERY",
    7: "VmplSSS",
    8: "SecureTsc",
    9: "TscAuxVirtualization",
    10: "HwEnforcedCacheCoh",
    11: "64BitHost",
    12: "RestrictedInjection",
    13: "AlternateInjection",
    14: "DebugSwap",
    15: "PreventHostIbs",
    16: "VTE",
    17: "VmgexitParameter",
    18: "VirtualTomMsr",
    19: "IbsVirtGuestCtl",
    21: "RMPREAD",
    23: "SegmentedRmp",
    24: "VmsaRegProt",
    25: "SmtProtection",
    27: "AllowedSevFeatures",
    28: "SvsmCommPageMsr",
    29: "NestedVirtSnpMsr",
    30: "HvInUseWrAllowed",
    31: "IbpbOnEntry",
}


@dataclass(frozen=True)
class CacheGeometry:
    """The last-level cache the model simulates: write-back, set-associative."""

    size: int
    ways: int
    line: int = 64

    @property
    def sets(self) -> int:
        return self.size // (self.ways * self.line)


@dataclass(frozen=True)
class MachineProfile:
    """One EPYC part as the simulator sees it. Frozen: derive variants with ``with_``."""

    name: str
    part: str
    generation: str
    family: int
    model: int
    stepping: int
    # CPUID Fn8000_001F, exactly as the part reports it (decoded by the properties below).
    sev_eax: int
    sev_ebx: int
    sev_ecx: int
    sev_edx: int
    maxphyaddr: int  # CPUID 0x80000008 EAX[7:0], before the SME reduction
    maxlinaddr: int  # CPUID 0x80000008 EAX[15:8]; 57 means LA57 (5-level paging) is supported
    nasid: int  # CPUID 0x8000000A EBX: number of SVM ASIDs
    cache: CacheGeometry
    engine_mode: EngineMode
    engine_key_bits: int = 128
    # xe only: tweak constants that are zero, as SEVurity saw t8 = t9 = 0 on a Ryzen 1950X
    # before a BIOS update — a weak tweak (MODEL; e.g. (8, 9) for the pictures).
    xe_zero_tweak_bits: tuple[int, ...] = ()
    # xex only: Zen 1 parts that used XEX (EPYC 7401P) kept fixed tweak constants, which
    # SEVurity recovered once per machine by search; Zen 2+ draws them at each boot. True
    # gives the fixed (xe-style) constants to xex (MODEL).
    xex_fixed_tweak: bool = False
    # Key slot of the host (SME/TSME) key in the memory controller. 1023 is Genoa's
    # (ASPFW sev_plat.h); other generations are UNCONFIRMED and use the same number.
    host_key_slot: int = 1023
    cores: int = 4
    cores_per_ccx: int = 4  # cores sharing an L3 (a CCX); the firmware tracks ASIDs per CCX
    dram_size: int = 8 * GiB
    # The SEV firmware the part runs: API version and build (PLATFORM_STATUS, §7.1).
    fw_api_major: int = 1
    fw_api_minor: int = 55
    fw_build: int = 25
    # Mailbox register offsets of the PSP's PCI BAR (Linux sp-pci.c sev_vdata): "sevv1" is
    # C2PMSG_32/56/57 at 0x10580/0x105e0/0x105e4, "sevv2" the same registers at 0x109xx.
    psp_mailbox: str = "sevv2"
    # None: keys and xex tweaks are fresh random values at each boot (os.urandom), as on
    # real parts. An integer makes every boot of this profile reproducible (tests, demos).
    seed: int | None = None
    # BIOS setup options.
    smee: bool = True  # SYSCFG[23] MemEncryptionModEn
    tsme: bool = False  # Transparent SME: every DRAM access encrypted with the host key
    smmlock: bool = True  # HWCR[0]
    # SYSCFG bits the BIOS sets besides SMEE (MtrrFixDramEn, MtrrVarDramEn, MtrrTom2En,
    # Tom2ForceMemTypeWB): the Rome sample value 0x740000 of hardware.md §2.1.
    syscfg_bios: int = 0x740000
    provenance: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    # ---- decoded CPUID Fn8000_001F -------------------------------------------------
    @property
    def cbit(self) -> int:
        """Page-table bit that marks a page encrypted (EBX[5:0])."""
        return self.sev_ebx & 0x3F

    @property
    def phys_reduction(self) -> int:
        """Physical-address bits lost when memory encryption is enabled (EBX[11:6])."""
        return (self.sev_ebx >> 6) & 0x3F

    @property
    def num_vmpl(self) -> int:
        return (self.sev_ebx >> 12) & 0xF

    @property
    def max_asid(self) -> int:
        """Highest ASID usable by an encrypted guest (ECX)."""
        return self.sev_ecx

    @property
    def min_sev_asid(self) -> int:
        """Lowest ASID for a plain SEV guest; 1 .. EDX-1 are for SEV-ES/SNP (EDX)."""
        return self.sev_edx

    @property
    def sme_coherent(self) -> bool:
        """EAX[10] HwEnforcedCacheCoh: hardware keeps encryption domains coherent."""
        return bool(self.sev_eax >> 10 & 1)

    @property
    def sev_es(self) -> bool:
        """EAX[3]: SEV-ES. ASIDs below EDX are then SEV-ES ASIDs."""
        return bool(self.sev_eax >> 3 & 1)

    @property
    def vm_page_flush(self) -> bool:
        return bool(self.sev_eax >> 2 & 1)

    @property
    def la57(self) -> bool:
        return self.maxlinaddr >= 57

    @property
    def ccx_count(self) -> int:
        return -(-self.cores // self.cores_per_ccx)

    @property
    def effective_phys_bits(self) -> int:
        """Usable physical-address width: MAXPHYADDR minus the reduction when SMEE is on."""
        return self.maxphyaddr - (self.phys_reduction if self.smee else 0)

    def features(self) -> list[str]:
        return [name for bit, name in SEV_FEATURE_BITS.items() if self.sev_eax >> bit & 1]

    def with_(self, **changes: object) -> MachineProfile:
        """A copy with some fields changed (e.g. ``milan.with_(tsme=True, seed=1)``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _ebx(cbit: int, reduction: int, vmpls: int) -> int:
    return (vmpls << 12) | (reduction << 6) | cbit


_COMMON_UNCONFIRMED = {
    "host_key_slot": "1023 on Genoa (ASPFW sev_plat.h); assumed for other generations",
    "nasid": "UNCONFIRMED: 32768, the usual EPYC value; no dump in the sources",
    "cores": "MODEL: the number of simulated cores, not the part's core count",
    "cache": "MODEL: one shared last-level cache with the geometry of one CCX/CCD L3",
    "psp_mailbox": "Linux sp-pci.c: sevv1 for the Zen 1 PSP (0x1456), sevv2 for later PSPs",
}

NAPLES = MachineProfile(
    name="naples",
    part="AMD EPYC 7001 series (Naples)",
    generation="Zen 1",
    family=0x17,
    model=0x01,
    stepping=2,
    sev_eax=0x00000003,
    sev_ebx=_ebx(47, 5, 0),
    sev_ecx=15,
    sev_edx=1,
    maxphyaddr=48,
    maxlinaddr=48,
    nasid=32768,
    cache=CacheGeometry(size=8 * MiB, ways=16),
    engine_mode="xe",
    fw_api_major=0,
    fw_api_minor=17,
    fw_build=48,
    psp_mailbox="sevv1",
    provenance={
        **_COMMON_UNCONFIRMED,
        "sev_eax": "UNCONFIRMED: SME and SEV only (no SEV-ES on Zen 1); no full dump",
        "sev_ebx": "C-bit 47 (AMD whitepaper; AMDESE/AMDSEV #23), reduction 5 as the "
        "Zen 1 EPYC Embedded 3151 (virtee/sevctl #203)",
        "sev_ecx": "15 SEV ASIDs (AMDESE/AMDSEV #23)",
        "sev_edx": "UNCONFIRMED: 1 (no SEV-ES, so every ASID is an SEV ASID)",
        "maxphyaddr": "UNCONFIRMED: 48",
        "engine_mode": "xe as measured on the EPYC 7251 by SEVurity (the 7401P used xex)",
        "fw_api": "UNCONFIRMED: 0.17 build 48 (public Naples certificates carry API 0.14-0.16)",
    },
)

# The BIOS option "SEV-ES ASID space limit" sets CPUID 0x8000001F EDX on parts with SEV-ES:
# ASIDs 1 .. limit-1 are for SEV-ES guests. Boxes ship with 1 (no SEV-ES guest can run), 9,
# 128 or 510; sevsim's default leaves eight SEV-ES ASIDs (change it with Profile.with_).
SEV_ES_ASID_LIMIT = 9


ROME = MachineProfile(
    name="rome",
    part="AMD EPYC 7002 series (Rome)",
    generation="Zen 2",
    family=0x17,
    model=0x31,
    stepping=0,
    sev_eax=0x0001000F,
    sev_ebx=_ebx(47, 5, 0),
    sev_ecx=509,
    sev_edx=SEV_ES_ASID_LIMIT,
    maxphyaddr=48,
    maxlinaddr=48,
    nasid=32768,
    cache=CacheGeometry(size=16 * MiB, ways=16),
    engine_mode="xex",
    fw_api_major=0,
    fw_api_minor=24,
    fw_build=15,
    provenance={
        **_COMMON_UNCONFIRMED,
        "sev_eax": "0x0001000F (SME, SEV, VmPgFlush, SEV-ES, VTE) from an EPYC edge box "
        "that is probably Zen 2; HwEnforcedCacheCoh clear; generation UNCONFIRMED",
        "sev_ebx": "0x16F: C-bit 47, reduction 5 (same edge box; C = 47 on Rome per enarx "
        "sevctl #84/#85)",
        "sev_ecx": "509 (enarx sevctl #84/#85)",
        "sev_edx": "MODEL: 9, the BIOS 'SEV-ES ASID space limit' (1 on the edge box)",
        "maxphyaddr": "UNCONFIRMED: 48",
        "engine_mode": "xex with per-boot random tweaks (AMD to the SEVurity authors); "
        "exact Zen 2 tweak function UNCONFIRMED",
        "fw_api": "UNCONFIRMED: 0.24 build 15 (a public Rome PEK carries API 0.22)",
    },
)

MILAN = MachineProfile(
    name="milan",
    part="AMD EPYC 7003 series (Milan)",
    generation="Zen 3",
    family=0x19,
    model=0x01,
    stepping=1,
    sev_eax=0x0101FD3F,
    sev_ebx=0x4173,
    sev_ecx=509,
    sev_edx=SEV_ES_ASID_LIMIT,
    maxphyaddr=48,
    maxlinaddr=48,
    nasid=32768,
    cache=CacheGeometry(size=32 * MiB, ways=16),
    engine_mode="xex",
    cores_per_ccx=8,
    fw_api_major=1,
    fw_api_minor=51,
    fw_build=3,
    provenance={
        **_COMMON_UNCONFIRMED,
        "fw_api": "UNCONFIRMED: 1.51 build 3, a common Milan firmware",
        "sev_eax": "0x0101FD3F from three Milan dumps (oxidecomputer/omicron, "
        "firecracker T2A fixture, EPYC 7713P lab notes); HwEnforcedCacheCoh set",
        "sev_ebx": "0x4173: C-bit 51, reduction 5, 4 VMPLs (same dumps)",
        "sev_ecx": "509 (same dumps)",
        "sev_edx": "MODEL: 9, the BIOS 'SEV-ES ASID space limit' (1 in the dumps; 9, 128 "
        "and 510 also seen)",
        "maxphyaddr": "48 (two Milan guest-visible dumps, EAX 0x3030)",
        "engine_mode": "xex with per-boot random tweaks; exact function UNCONFIRMED",
    },
)

GENOA = MachineProfile(
    name="genoa",
    part="AMD EPYC 9004 series (Genoa)",
    generation="Zen 4",
    family=0x19,
    model=0x11,
    stepping=1,
    sev_eax=0x0101FD3F,
    sev_ebx=_ebx(51, 4, 4),
    sev_ecx=1006,
    sev_edx=SEV_ES_ASID_LIMIT,
    maxphyaddr=52,
    maxlinaddr=57,
    nasid=32768,
    cache=CacheGeometry(size=32 * MiB, ways=16),
    engine_mode="xex",
    cores_per_ccx=8,
    provenance={
        **_COMMON_UNCONFIRMED,
        "fw_api": "1.55 build 25: AMD's published Genoa SEV firmware (ASPFW README)",
        "sev_eax": "UNCONFIRMED: no full Genoa dump; Milan's feature bits assumed",
        "sev_ebx": "C-bit 51 and 4 VMPLs (ASPFW); reduction 4 is our reading of the "
        "firmware's 'MemWidth=4' comment, UNCONFIRMED",
        "sev_ecx": "1006 (ASPFW MAX_SEV_ASIDS)",
        "sev_edx": "MODEL: 9, the BIOS 'SEV-ES ASID space limit'",
        "maxphyaddr": "UNCONFIRMED: 52 (Zen 4 supports 52-bit physical and 57-bit linear "
        "addresses)",
        "engine_mode": "xex, AES-128: Genoa's cipher (AES-128/256, XEX/XTS) is UNCONFIRMED; "
        "engine_key_bits is a parameter",
    },
)

PROFILES: dict[str, MachineProfile] = {p.name: p for p in (NAPLES, ROME, MILAN, GENOA)}


def get_profile(name: str) -> MachineProfile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
