"""SEV-ES structures: the VMSA (the encrypted save area) and the GHCB page.

Offsets from AMD APM vol. 2 App. B (Table B-4, the SEV-ES save area) as Linux encodes
them (arch/x86/include/asm/svm.h: ``struct sev_es_save_area``, ``struct ghcb_save_area``,
``struct ghcb``); hardware.md §8.1-8.2, sev-api.md §8.4.

* The VMSA's segment, control-register, RIP, RSP and RAX fields sit at the offsets of the
  VMCB's save area (VMCB + 0x400), so they carry the VMCB's names (``cs_base``, ``rip``).
  The VMSA adds the other general-purpose registers (the hypervisor keeps them for a
  non-ES guest), the exit fields the hardware fills for the guest, SEV_FEATURES, XCR0
  and the start of the x87/SSE area (MXCSR, FCW).
* The GHCB is the page the guest shares (C-bit clear) to talk to the hypervisor: a save
  area image in the same places for the registers it chooses to show, the software exit
  code and information, a valid bitmap (one bit per quadword of the save area), a shared
  buffer, and the protocol version and usage at its end.
"""

from __future__ import annotations

from sevsim.api.layout import Layout

VMSA_SIZE = 4096

_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
SEGMENT_FIELDS = tuple(
    spec
    for i, name in enumerate(_SEGMENTS)
    for spec in (
        (0x10 * i + 0x0, "H", f"{name}_selector"),
        (0x10 * i + 0x2, "H", f"{name}_attrib"),
        (0x10 * i + 0x4, "I", f"{name}_limit"),
        (0x10 * i + 0x8, "Q", f"{name}_base"),
    )
)
# The general-purpose registers a VMSA holds beyond RAX and RSP, at their offsets.
GPR_OFFSETS = {
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    "rbp": 0x328,
    "rsi": 0x330,
    "rdi": 0x338,
    **{f"r{n}": 0x340 + 8 * (n - 8) for n in range(8, 16)},
}

VMSA = Layout(
    "VMSA",
    VMSA_SIZE,
    "APM vol. 2 Table B-4; Linux svm.h struct sev_es_save_area; sev-api.md §8.4",
    *SEGMENT_FIELDS,
    (0x0CB, "B", "cpl"),
    (0x0D0, "Q", "efer"),
    (0x148, "Q", "cr4"),
    (0x150, "Q", "cr3"),
    (0x158, "Q", "cr0"),
    (0x160, "Q", "dr7"),
    (0x168, "Q", "dr6"),
    (0x170, "Q", "rflags"),
    (0x178, "Q", "rip"),
    (0x180, "Q", "dr0"),
    (0x188, "Q", "dr1"),
    (0x190, "Q", "dr2"),
    (0x198, "Q", "dr3"),
    (0x1D8, "Q", "rsp"),
    (0x1F8, "Q", "rax"),
    (0x200, "Q", "star"),
    (0x208, "Q", "lstar"),
    (0x210, "Q", "cstar"),
    (0x218, "Q", "sfmask"),
    (0x220, "Q", "kernel_gs_base"),
    (0x228, "Q", "sysenter_cs"),
    (0x230, "Q", "sysenter_esp"),
    (0x238, "Q", "sysenter_eip"),
    (0x240, "Q", "cr2"),
    (0x268, "Q", "g_pat"),
    *((off, "Q", name) for name, off in GPR_OFFSETS.items()),
    (0x390, "Q", "guest_exit_info_1"),
    (0x398, "Q", "guest_exit_info_2"),
    (0x3A0, "Q", "guest_exit_int_info"),
    (0x3A8, "Q", "guest_nrip"),
    (0x3B0, "Q", "sev_features"),
    (0x3C0, "Q", "guest_exit_code"),
    (0x3E0, "Q", "event_inj"),
    (0x3E8, "Q", "xcr0"),
    (0x408, "I", "mxcsr"),
    (0x410, "H", "x87_fcw"),
)

# --- the GHCB page (GHCB specification; Linux svm.h struct ghcb) ---------------------------
GHCB_SIZE = 4096
GHCB_SHARED_BUFFER = 0x800
GHCB_SHARED_BUFFER_SIZE = 2032
GHCB_VALID_BITMAP = 0x3F0
GHCB_PROTOCOL_VERSION = 1  # MODEL: version 1 of the GHCB specification (SEV-ES, no SNP)
GHCB_USAGE_STANDARD = 0

GHCB = Layout(
    "GHCB",
    GHCB_SIZE,
    "GHCB specification §2.3; Linux svm.h struct ghcb; hardware.md §8.2",
    (0x0CB, "B", "cpl"),
    (0x140, "Q", "xss"),
    (0x160, "Q", "dr7"),
    (0x178, "Q", "rip"),
    (0x1D8, "Q", "rsp"),
    (0x1F8, "Q", "rax"),
    *((off, "Q", name) for name, off in GPR_OFFSETS.items()),
    (0x390, "Q", "sw_exit_code"),
    (0x398, "Q", "sw_exit_info_1"),
    (0x3A0, "Q", "sw_exit_info_2"),
    (0x3A8, "Q", "sw_scratch"),
    (0x3E8, "Q", "xcr0"),
    (GHCB_VALID_BITMAP, "16s", "valid_bitmap"),
    (GHCB_SHARED_BUFFER, f"{GHCB_SHARED_BUFFER_SIZE}s", "shared_buffer"),
    (0xFFA, "H", "protocol_version"),
    (0xFFC, "I", "ghcb_usage"),
)


def ghcb_valid_bit(name: str) -> int:
    """The valid-bitmap bit of a GHCB save-area field: its offset in quadwords."""
    return GHCB.field(name).offset // 8


def ghcb_is_valid(bitmap: bytes, name: str) -> bool:
    bit = ghcb_valid_bit(name)
    return bool(bitmap[bit // 8] >> (bit % 8) & 1)


def ghcb_set_valid(bitmap: bytearray, name: str) -> None:
    bit = ghcb_valid_bit(name)
    bitmap[bit // 8] |= 1 << (bit % 8)


# --- VMGEXIT: exit codes and the GHCB MSR protocol (GHCB specification; Linux sev-common.h) -
MSR_GHCB = 0xC001_0130
EXIT_VMGEXIT = 0x403
VC_VECTOR = 29

# Software exit codes (sw_exit_code) beyond the SVM exit codes of the instruction.
SVM_VMGEXIT_MMIO_READ = 0x8000_0001
SVM_VMGEXIT_MMIO_WRITE = 0x8000_0002
SVM_VMGEXIT_NMI_COMPLETE = 0x8000_0003
SVM_VMGEXIT_AP_HLT_LOOP = 0x8000_0004
SVM_VMGEXIT_AP_JUMP_TABLE = 0x8000_0005
SVM_VMGEXIT_HV_FEATURES = 0x8000_FFFD
SVM_VMGEXIT_TERM_REQUEST = 0x8000_FFFE
SVM_VMGEXIT_UNSUPPORTED_EVENT = 0x8000_FFFF

# GHCB MSR protocol: request/response codes in bits 11:0, data in 63:12.
GHCB_MSR_INFO_MASK = 0xFFF
GHCB_MSR_SEV_INFO_RESP = 0x001
GHCB_MSR_SEV_INFO_REQ = 0x002
GHCB_MSR_CPUID_REQ = 0x004
GHCB_MSR_CPUID_RESP = 0x005
GHCB_MSR_AP_RESET_HOLD_REQ = 0x006
GHCB_MSR_AP_RESET_HOLD_RESP = 0x007
GHCB_MSR_HV_FT_REQ = 0x080
GHCB_MSR_HV_FT_RESP = 0x081
GHCB_MSR_TERM_REQ = 0x100
GHCB_PROTOCOL_MIN = 1
GHCB_PROTOCOL_MAX = 1  # MODEL: the SEV-ES protocol only (version 2 adds SNP's events)


def sev_info_response(cbit: int) -> int:
    """The SEV information response: max and min protocol versions and the C-bit."""
    return GHCB_PROTOCOL_MAX << 48 | GHCB_PROTOCOL_MIN << 32 | cbit << 24 | GHCB_MSR_SEV_INFO_RESP


# --- vCPU types: the processor signature QEMU puts in RDX at reset (sev-api.md §8.4) -------
# (family, model, stepping) of QEMU's named CPU models, as sev-snp-measure's vcpu_types.py
# lists them; the signature is what CPUID 1 EAX reports.
VCPU_TYPES: dict[str, tuple[int, int, int]] = {
    "EPYC": (23, 1, 2),
    "EPYC-v1": (23, 1, 2),
    "EPYC-v2": (23, 1, 2),
    "EPYC-v3": (23, 1, 2),
    "EPYC-v4": (23, 1, 2),
    "EPYC-Rome": (23, 49, 0),
    "EPYC-Milan": (25, 1, 1),
    "EPYC-Genoa": (25, 17, 0),
}


def cpu_signature(family: int, model: int, stepping: int) -> int:
    """CPUID 1 EAX: extended family and model above the base nibbles."""
    fam_lo, fam_hi = min(family, 0xF), max(family - 0xF, 0)
    return fam_hi << 20 | (model >> 4) << 16 | fam_lo << 8 | (model & 0xF) << 4 | stepping


def vcpu_signature(cpu: str) -> int:
    """The signature of a named vCPU type; ValueError names the known ones."""
    try:
        return cpu_signature(*VCPU_TYPES[cpu])
    except KeyError:
        known = ", ".join(VCPU_TYPES)
        raise ValueError(f"unknown vCPU type {cpu!r} (known: {known})") from None


# --- the initial VMSA of a vCPU at launch (sev-api.md §8.4) --------------------------------
# What QEMU's reset state becomes once KVM's sev_es_sync_vmsa has copied it into the VMSA,
# as sev-snp-measure's vmsa.py rebuilds it. The values are x86's INIT state with what KVM
# adds (EFER.SVME, CR4.MCE from the host, the power-on PAT, CR0 with CD/NW cleared).
RESET_CS_SELECTOR = 0xF000
RESET_CS_BASE = 0xFFFF_0000
RESET_RIP = 0xFFF0
RESET_SEGMENT_ATTRIB = 0x93  # present, data, writable, accessed
RESET_CS_ATTRIB = 0x9B  # present, code, readable, accessed
RESET_LDTR_ATTRIB = 0x82  # present, LDT
RESET_TR_ATTRIB = 0x8B  # present, busy 32-bit TSS (QEMU's reset value)
RESET_EFER = 0x1000  # EFER.SVME: KVM sets it in every SVM guest's save area
RESET_CR4 = 0x40  # CR4.MCE: KVM keeps the host's machine-check enable
RESET_CR0 = 0x10  # CR0.ET; KVM clears CD/NW (its CD_NW_CLEARED quirk)
RESET_DR7 = 0x400
RESET_DR6 = 0xFFFF_0FF0
RESET_RFLAGS = 0x2
RESET_G_PAT = 0x0007_0406_0007_0406
RESET_XCR0 = 0x1  # x87 only
RESET_MXCSR = 0x1F80  # all SSE exceptions masked
RESET_X87_FCW = 0x037F  # all x87 exceptions masked, extended precision


def initial_vmsa(ap_eip: int | None, signature: int, fpu_state: bool = True) -> bytes:
    """The 4096 plaintext bytes of a vCPU's VMSA at LAUNCH_UPDATE_VMSA.

    ``ap_eip`` None: the boot processor, starting at the reset vector (CS base 0xFFFF0000,
    RIP 0xFFF0). Otherwise an AP starting at the firmware's SEV-ES reset block address,
    split into CS base (high 16 bits) and RIP (low 16 bits) as QEMU does. ``signature``:
    RDX, the vCPU's CPUID 1 EAX. ``fpu_state``: MXCSR and the x87 control word at their
    reset values, as Linux ≥ 6.10 writes them for a VM made with KVM_SEV_INIT2; False
    gives the older KVM_SEV_ES_INIT layout, where those stay zero."""
    values = {
        f"{seg}_{f}": v
        for seg in ("es", "ss", "ds", "fs", "gs")
        for f, v in (("attrib", RESET_SEGMENT_ATTRIB), ("limit", 0xFFFF))
    }
    cs_base, rip = RESET_CS_BASE, RESET_RIP
    if ap_eip is not None:
        cs_base, rip = ap_eip & 0xFFFF_0000, ap_eip & 0xFFFF
    values.update(
        cs_selector=RESET_CS_SELECTOR,
        cs_attrib=RESET_CS_ATTRIB,
        cs_limit=0xFFFF,
        cs_base=cs_base,
        gdtr_limit=0xFFFF,
        ldtr_attrib=RESET_LDTR_ATTRIB,
        ldtr_limit=0xFFFF,
        idtr_limit=0xFFFF,
        tr_attrib=RESET_TR_ATTRIB,
        tr_limit=0xFFFF,
        efer=RESET_EFER,
        cr4=RESET_CR4,
        cr0=RESET_CR0,
        dr7=RESET_DR7,
        dr6=RESET_DR6,
        rflags=RESET_RFLAGS,
        rip=rip,
        g_pat=RESET_G_PAT,
        rdx=signature,
        sev_features=0,  # plain SEV-ES: no SNP features
        xcr0=RESET_XCR0,
    )
    if fpu_state:
        values.update(mxcsr=RESET_MXCSR, x87_fcw=RESET_X87_FCW)
    return VMSA.build(**values)
