"""SVM: the VMCB, #VMEXIT codes, and how guest code runs in the model (hardware.md §7).

**VMCB.** A 4 KiB page in host memory, declared once with the offsets of AMD's layout
(Linux arch/x86/include/asm/svm.h): the control area (intercepts, ASID, TLB control, exit
code and information, nested-paging and SEV enables, nCR3) and the parts of the save area
at 0x400 that the model uses (CR0/CR3/CR4, EFER, RIP, RSP, RAX, CPL, guest PAT). For a
plain SEV guest the save area is ordinary, unencrypted hypervisor memory: the hypervisor
reads and writes the guest's registers (the weakness SEV-ES removes).

**Guest code** is real x86 machine code, executed by the instruction engine
(``sevsim.soc.x86``) through the model's translation and keys: what a vCPU fetches with
the wrong key (another ASID's, tampered memory) decodes to garbage and runs as such,
until it faults with no usable IDT — #VMEXIT(SHUTDOWN).

**SEV-ES.** With SEV_ES_ENABLE the save area is the VMSA page (its address at 0x108),
loaded and saved through the guest's key (``nested.py``); the VMCB's save area is not used,
and an instruction the VMCB intercepts raises #VC in the guest unless its exit is automatic.

**Exits.** The engine runs on its own thread; the host's VMRUN blocks while the guest runs
and returns the exit when the guest traps (CPUID, MSR, HLT, VMMCALL, IOIO, #NPF, SHUTDOWN)
or its time slice ends. The next VMRUN resumes the guest where it stopped. Only one side
runs at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sevsim.api.layout import Layout
from sevsim.api.vmsa import EXIT_VMGEXIT, VMSA  # SEV-ES: the guest calls the hypervisor

VMCB_SIZE = 4096
SAVE = 0x400  # the save area

VMCB = Layout(
    "VMCB",
    VMCB_SIZE,
    "AMD APM vol. 2 App. B; hardware.md §7.3",
    (0x000, "I", "intercept_cr"),
    (0x004, "I", "intercept_dr"),
    (0x008, "I", "intercept_exceptions"),
    (0x00C, "I", "intercept_misc1"),
    (0x010, "I", "intercept_misc2"),
    (0x040, "Q", "iopm_base_pa"),  # MODEL: KVM's guests intercept every port and MSR
    (0x048, "Q", "msrpm_base_pa"),
    (0x058, "I", "asid"),
    (0x05C, "B", "tlb_control"),
    (0x068, "Q", "int_state"),  # bit 0 interrupt shadow; bit 1 (SEV-ES) the guest's RFLAGS.IF
    (0x070, "Q", "exit_code"),
    (0x078, "Q", "exit_info_1"),
    (0x080, "Q", "exit_info_2"),
    (0x088, "I", "exit_int_info"),
    (0x090, "Q", "nested_ctl"),
    (0x0A0, "Q", "ghcb_gpa"),
    (0x0A8, "Q", "event_inj"),
    (0x0B0, "Q", "ncr3"),
    (0x0C0, "I", "clean"),
    (0x0C8, "Q", "next_rip"),
    (0x0D0, "B", "insn_len"),  # decode assists: the bytes of the instruction that took #NPF
    (0x0D1, "15s", "insn_bytes"),
    (0x108, "Q", "vmsa_pa"),
    (SAVE + 0x000, "H", "es_selector"),
    (SAVE + 0x002, "H", "es_attrib"),
    (SAVE + 0x004, "I", "es_limit"),
    (SAVE + 0x008, "Q", "es_base"),
    (SAVE + 0x010, "H", "cs_selector"),
    (SAVE + 0x012, "H", "cs_attrib"),
    (SAVE + 0x014, "I", "cs_limit"),
    (SAVE + 0x018, "Q", "cs_base"),
    (SAVE + 0x020, "H", "ss_selector"),
    (SAVE + 0x022, "H", "ss_attrib"),
    (SAVE + 0x024, "I", "ss_limit"),
    (SAVE + 0x028, "Q", "ss_base"),
    (SAVE + 0x030, "H", "ds_selector"),
    (SAVE + 0x032, "H", "ds_attrib"),
    (SAVE + 0x034, "I", "ds_limit"),
    (SAVE + 0x038, "Q", "ds_base"),
    (SAVE + 0x040, "H", "fs_selector"),
    (SAVE + 0x042, "H", "fs_attrib"),
    (SAVE + 0x044, "I", "fs_limit"),
    (SAVE + 0x048, "Q", "fs_base"),
    (SAVE + 0x050, "H", "gs_selector"),
    (SAVE + 0x052, "H", "gs_attrib"),
    (SAVE + 0x054, "I", "gs_limit"),
    (SAVE + 0x058, "Q", "gs_base"),
    (SAVE + 0x060, "H", "gdtr_selector"),
    (SAVE + 0x062, "H", "gdtr_attrib"),
    (SAVE + 0x064, "I", "gdtr_limit"),
    (SAVE + 0x068, "Q", "gdtr_base"),
    (SAVE + 0x070, "H", "ldtr_selector"),
    (SAVE + 0x072, "H", "ldtr_attrib"),
    (SAVE + 0x074, "I", "ldtr_limit"),
    (SAVE + 0x078, "Q", "ldtr_base"),
    (SAVE + 0x080, "H", "idtr_selector"),
    (SAVE + 0x082, "H", "idtr_attrib"),
    (SAVE + 0x084, "I", "idtr_limit"),
    (SAVE + 0x088, "Q", "idtr_base"),
    (SAVE + 0x090, "H", "tr_selector"),
    (SAVE + 0x092, "H", "tr_attrib"),
    (SAVE + 0x094, "I", "tr_limit"),
    (SAVE + 0x098, "Q", "tr_base"),
    (SAVE + 0x0CB, "B", "cpl"),
    (SAVE + 0x0D0, "Q", "efer"),
    (SAVE + 0x148, "Q", "cr4"),
    (SAVE + 0x150, "Q", "cr3"),
    (SAVE + 0x158, "Q", "cr0"),
    (SAVE + 0x160, "Q", "dr7"),
    (SAVE + 0x168, "Q", "dr6"),
    (SAVE + 0x170, "Q", "rflags"),
    (SAVE + 0x178, "Q", "rip"),
    (SAVE + 0x1D8, "Q", "rsp"),
    (SAVE + 0x1F8, "Q", "rax"),
    (SAVE + 0x240, "Q", "cr2"),
    (SAVE + 0x268, "Q", "g_pat"),
)

# The save-area fields an SEV-ES VMSA holds at the same offsets as the VMCB's save area
# (segments, control registers, RIP, RSP, RAX, ...): VMRUN takes them from the VMSA instead,
# and KVM's sev_es_sync_vmsa copies them into it.
VMSA_SAVE_FIELDS = tuple(
    f.name for f in VMCB.fields if f.offset >= SAVE and f.name in {g.name for g in VMSA.fields}
)

# nested_ctl bits
NP_ENABLE = 1 << 0
SEV_ENABLE = 1 << 1
SEV_ES_ENABLE = 1 << 2

# INT_STATE (VMCB 0x068): what an SEV-ES guest's hypervisor may know of its interrupt state,
# since it cannot read RFLAGS (APM vol. 2 §15.35.6; Linux SVM_GUEST_INTERRUPT_MASK).
GUEST_INTERRUPT_MASK = 1 << 1

# EVENTINJ (VMCB 0x0A8): bits 7:0 vector, 10:8 type (3 = exception), bit 31 valid.
EVENTINJ_VALID = 1 << 31
EVENTINJ_TYPE_EXCEPTION = 3 << 8
EVENTINJ_ERROR_VALID = 1 << 11  # EV: push the error code in bits 63:32
GP_EVENT = EVENTINJ_VALID | EVENTINJ_ERROR_VALID | EVENTINJ_TYPE_EXCEPTION | 13  # #GP(0)

# RFLAGS (VMCB save area 0x570): bit 1 always reads as one; IF enables interrupts.
RFLAGS_FIXED = 1 << 1
RFLAGS_IF = 1 << 9

# TLB_CONTROL values
TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASIDS = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7

# Intercept bits: misc1 (VMCB 0x00C) and misc2 (0x010).
INTERCEPT_CPUID = 1 << 18
INTERCEPT_HLT = 1 << 24
INTERCEPT_INVLPG = 1 << 25
INTERCEPT_IOIO_PROT = 1 << 27
INTERCEPT_MSR_PROT = 1 << 28
INTERCEPT_SHUTDOWN = 1 << 31
INTERCEPT_VMRUN = 1 << 0  # misc2
INTERCEPT_VMMCALL = 1 << 1  # misc2
INTERCEPT_WBINVD = 1 << 9  # misc2

# Debug registers (APM vol. 2 §13.1): DR7's L0-L3 enable DR0-DR3 (R/W and LEN zero: an
# instruction breakpoint); DR6 says which condition raised #DB.
DR7_L = (1 << 0, 1 << 2, 1 << 4, 1 << 6)
DR7_RW_LEN_SHIFT = 16  # 4 bits per breakpoint: R/W (2), LEN (2)
DR6_B = (1 << 0, 1 << 1, 1 << 2, 1 << 3)
DR6_BS = 1 << 14  # single step (RFLAGS.TF)
DB_VECTOR, BP_VECTOR = 1, 3
RFLAGS_TF = 1 << 8

# #VMEXIT codes (Linux uapi/asm/svm.h)
EXIT_WRITE_CR0 = 0x10  # + n: MOV to CRn
EXIT_EXCP_BASE = 0x40
EXIT_INTR = 0x60  # a physical interrupt: here the host's timer ending the vCPU's time slice
EXIT_INVD = 0x76
EXIT_CPUID = 0x72
EXIT_HLT = 0x78
EXIT_INVLPG = 0x79
EXIT_IOIO = 0x7B
EXIT_MSR = 0x7C
EXIT_SHUTDOWN = 0x7F
EXIT_VMRUN = 0x80
EXIT_VMMCALL = 0x81
EXIT_WBINVD = 0x89
EXIT_NPF = 0x400
EXIT_INVALID = (1 << 64) - 1  # VMEXIT_INVALID (-1): the VMRUN consistency checks failed

EXIT_NAMES = {
    EXIT_INTR: "INTR",
    EXIT_INVD: "INVD",
    EXIT_CPUID: "CPUID",
    EXIT_HLT: "HLT",
    EXIT_INVLPG: "INVLPG",
    EXIT_IOIO: "IOIO",
    EXIT_MSR: "MSR",
    EXIT_SHUTDOWN: "SHUTDOWN",
    EXIT_VMRUN: "VMRUN",
    EXIT_VMMCALL: "VMMCALL",
    EXIT_WBINVD: "WBINVD",
    EXIT_NPF: "NPF",
    EXIT_VMGEXIT: "VMGEXIT",
    EXIT_INVALID: "INVALID",
}

# IOIO EXITINFO1 (APM vol. 2 §15.10.2): bit 0 direction (1 = IN), bits 4/5/6 an 8/16/32-bit
# operand, bits 31:16 the port.
IOIO_TYPE_IN = 1 << 0
IOIO_SZ8 = 1 << 4
IOIO_SZ16 = 1 << 5
IOIO_SZ32 = 1 << 6
IOIO_SIZE_BITS = {1: IOIO_SZ8, 2: IOIO_SZ16, 4: IOIO_SZ32}
IOIO_PORT_SHIFT = 16

# #NPF EXITINFO1 bits above the page-fault error code (hardware.md §8.5)
NPF_FINAL_GPA = 1 << 32  # the fault is on the final guest-physical address
NPF_GUEST_PAGE_TABLE = 1 << 33  # the fault is on a guest page-table access


def exit_name(code: int) -> str:
    if EXIT_WRITE_CR0 <= code < EXIT_WRITE_CR0 + 16:
        return f"CR{code - EXIT_WRITE_CR0}_WRITE"
    if EXIT_EXCP_BASE <= code < EXIT_EXCP_BASE + 32:
        return f"EXCP({code - EXIT_EXCP_BASE})"
    return EXIT_NAMES.get(code, f"{code:#x}")


@dataclass
class Exit:
    """What #VMEXIT reports (also written into the VMCB)."""

    code: int
    info1: int = 0
    info2: int = 0
    # Software-visible extras of the model: what the guest asked for (CPUID leaf, MSR index
    # and value, hypercall number and arguments), as the hypervisor reads them from the
    # guest's registers in a non-ES guest.
    detail: dict[str, Any] = field(default_factory=dict)
    next_rip: int = 0  # the instruction after the intercepted one (NRIPS); 0: not given

    @property
    def name(self) -> str:
        return exit_name(self.code)

    def __repr__(self) -> str:
        return f"<Exit {self.name} info1={self.info1:#x} info2={self.info2:#x}>"
