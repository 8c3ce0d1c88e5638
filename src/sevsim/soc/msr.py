"""MSR numbers and bits the model implements (hardware.md §2)."""

from __future__ import annotations

EFER = 0xC000_0080
PAT = 0x0000_0277
SYSCFG = 0xC001_0010
HWCR = 0xC001_0015
VM_HSAVE_PA = 0xC001_0117
VM_PAGE_FLUSH = 0xC001_011E
SEV_STATUS = 0xC001_0131

SYSCFG_MEM_ENCRYPT = 1 << 23  # MemEncryptionModEn (SMEE)
SYSCFG_SNP_EN = 1 << 24
SYSCFG_VMPL_EN = 1 << 25
HWCR_SMMLOCK = 1 << 0

SYSCFG_BITS = {
    18: "MtrrFixDramEn",
    19: "MtrrFixDramModEn",
    20: "MtrrVarDramEn",
    21: "MtrrTom2En",
    22: "Tom2ForceMemTypeWB",
    23: "MemEncryptionModEn",
    24: "SecureNestedPagingEn",
    25: "VMPLEn",
}

SEV_STATUS_BITS = {0: "SEV", 1: "SEV-ES", 2: "SEV-SNP"}

NAMES = {
    EFER: "EFER",
    PAT: "PAT",
    SYSCFG: "SYSCFG",
    HWCR: "HWCR",
    VM_HSAVE_PA: "VM_HSAVE_PA",
    VM_PAGE_FLUSH: "VM_PAGE_FLUSH",
    SEV_STATUS: "SEV_STATUS",
}


def set_bits(value: int, names: dict[int, str]) -> list[str]:
    return [name for bit, name in names.items() if value >> bit & 1]
