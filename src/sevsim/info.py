"""What ``sevsim info`` reports: a profile, and what its CPUID and MSRs say on a booted core.

The values are read the way software reads them — CPUID and RDMSR on core 0 of a freshly
powered-on machine — and decoded with the field layouts of hardware.md §1–2.
"""

from __future__ import annotations

from typing import Any

from sevsim.profiles import SEV_FEATURE_BITS, MachineProfile
from sevsim.soc import Machine, msr


def _hex(value: int) -> str:
    return f"{value:#010x}"


def describe(profile: MachineProfile) -> dict[str, Any]:
    machine = Machine(profile)
    core = machine.cores[0]
    eax, ebx, ecx, edx = core.cpuid(0x8000_001F)
    ext8 = core.cpuid(0x8000_0008)[0]
    nasid = core.cpuid(0x8000_000A)[1]
    syscfg = core.rdmsr(msr.SYSCFG)
    hwcr = core.rdmsr(msr.HWCR)
    smee = bool(syscfg & msr.SYSCFG_MEM_ENCRYPT)
    maxphy = ext8 & 0xFF
    cbit = ebx & 0x3F
    reduction = (ebx >> 6) & 0x3F
    pa_bits = maxphy - reduction if smee else maxphy
    reserved = [b for b in range(pa_bits, 52) if not (smee and b == cbit)]
    return {
        "profile": {
            "name": profile.name,
            "part": profile.part,
            "generation": profile.generation,
            "family": f"{profile.family:#x}",
            "model": f"{profile.model:#x}",
            "stepping": profile.stepping,
            "cores_simulated": profile.cores,
            "dram_bytes": profile.dram_size,
            "cache": {
                "size_bytes": profile.cache.size,
                "ways": profile.cache.ways,
                "line_bytes": profile.cache.line,
                "sets": profile.cache.sets,
            },
            "engine": {
                "mode": machine.memctl.engine_mode,
                "aes_key_bits": profile.engine_key_bits,
                "host_key_slot": profile.host_key_slot,
            },
            "firmware": {
                "api_major": profile.fw_api_major,
                "api_minor": profile.fw_api_minor,
                "build": profile.fw_build,
            },
            "seed": profile.seed,
            "bios": {"smee": profile.smee, "tsme": profile.tsme, "smmlock": profile.smmlock},
        },
        "cpuid": {
            "0x8000001f": {
                "eax": _hex(eax),
                "ebx": _hex(ebx),
                "ecx": _hex(ecx),
                "edx": _hex(edx),
                "features": [name for bit, name in SEV_FEATURE_BITS.items() if eax >> bit & 1],
                "hw_enforced_cache_coherency": bool(eax >> 10 & 1),
                "c_bit": cbit,
                "phys_addr_reduction": reduction,
                "num_vmpl": (ebx >> 12) & 0xF,
                "max_encrypted_asid": ecx,
                "min_sev_asid": edx,
            },
            "0x80000008": {
                "eax": _hex(ext8),
                "maxphyaddr": maxphy,
                "linear_bits": ext8 >> 8 & 0xFF,
            },
            "0x8000000a": {"nasid": nasid},
        },
        "msr": {
            "SYSCFG": {
                "value": _hex(syscfg),
                "bits": msr.set_bits(syscfg, msr.SYSCFG_BITS),
                "mem_encryption_mod_en": smee,
            },
            "HWCR": {"value": _hex(hwcr), "smmlock": bool(hwcr & msr.HWCR_SMMLOCK)},
            "SEV_STATUS": {"value": _hex(core.rdmsr(msr.SEV_STATUS)), "note": "0 on a host"},
            "PAT": {"value": f"{core.rdmsr(msr.PAT):#018x}"},
        },
        "derived": {
            "effective_phys_bits": pa_bits,
            "reserved_pte_address_bits": [reserved[0], reserved[-1]] if reserved else [],
            "asid_ranges": {
                "sev_es_and_snp": [1, edx - 1] if edx > 1 else [],
                "sev": [edx, ecx],
                "unencrypted_guests": [ecx + 1, nasid - 1],
            },
            "tsme": profile.tsme,
        },
        "provenance": dict(profile.provenance),
    }
