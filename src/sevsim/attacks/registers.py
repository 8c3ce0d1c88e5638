"""The hypervisor and a guest's registers: SEV leaves them in the VMCB, SEV-ES encrypts them
in the VMSA (hardware.md §7.3, §8.1)."""

from __future__ import annotations

from sevsim.api.policy import PolicyFlag
from sevsim.api.vmsa import GHCB, VMSA, ghcb_is_valid
from sevsim.attacks.lab import (
    POLICY_NODBG,
    SECRET_GPA,
    SECRET_SIZE,
    SYMBOLS,
    AttackResult,
    attack,
    is_secret,
    published_digest,
    start_victim,
    vmrun,
)
from sevsim.guest import x86 as x86_guest
from sevsim.profiles import MachineProfile
from sevsim.soc.svm import DB_VECTOR, EXIT_EXCP_BASE, RFLAGS_FIXED, RFLAGS_TF
from sevsim.soc.x86.decode import disassemble
from sevsim.system import HostSystem

POLICY_ES = PolicyFlag.ES
# What the GHCB could show: the registers and the software exit fields.
GHCB_FIELDS = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "cpl",
    "sw_exit_code",
    "sw_exit_info_1",
    "sw_exit_info_2",
)


def load_gadget() -> int:
    """The guest's own one-byte load in probe_read8 (`movzbl (%rdi),%eax`), found in the
    public firmware image as an attacker would."""
    image = x86_guest.image()
    base = (1 << 32) - len(image)
    start = SYMBOLS["probe_read8"]
    return next(
        ip
        for ip, _, text in disassemble(image[start - base :], start, 64, 8)
        if text.startswith("movzbl (%rdi),%eax")
    )


def _steer(system, vcpu, gadget: int, r: AttackResult, label: str) -> bytes:
    """Single-step the guest's load once per byte of its secret: RIP at the load, RDI at the
    byte, RFLAGS.TF set and #DB intercepted; after one instruction RAX holds the byte."""
    core = system.kvm.cpu(vcpu.core_index)
    leaked = b""
    for i in range(SECRET_SIZE):
        vcpu.set_vmcb(
            rip=gadget,
            rflags=RFLAGS_FIXED | RFLAGS_TF,
            intercept_exceptions=1 << DB_VECTOR,
            event_inj=0,
        )
        exit_ = vmrun(core, vcpu, dict(vcpu.regs, rdi=SECRET_GPA + i))
        after = vcpu.vmcb()
        if exit_.code != EXIT_EXCP_BASE + DB_VECTOR:
            r.step(
                f"{label}: VMRUN with RIP={gadget:#x}, RDI={SECRET_GPA + i:#x}, TF set → "
                f"{exit_.name}, not the #DB of one step; RAX in the VMCB is {after.rax:#x}"
            )
            break
        leaked += bytes([after.rax & 0xFF])
    else:
        r.step(
            f"{label}: {SECRET_SIZE} VMRUNs, each with RIP at the guest's load ({gadget:#x}), "
            f"RDI at the next byte and RFLAGS.TF: each stops after one instruction (#DB) with "
            f"the byte in RAX → {leaked[:14]!r}…"
        )
    return leaked


@attack(
    "register-state",
    "The hypervisor reads and steers a guest's registers at an exit",
    """Two guests run the same real-code firmware and the same secret, one SEV, one SEV-ES.
    Each has booted, printed the SHA-256 of its secret and halted. At that exit the
    hypervisor reads the guest's registers where it keeps them: RIP, RSP, CR3 and RFLAGS in
    the VMCB's save area, the other GPRs in KVM's copy. Then it steers the guest: RIP at a
    one-byte load in the guest's public firmware, RDI at the secret, RFLAGS.TF set and #DB
    intercepted, so that each VMRUN runs exactly that load and stops with the byte in RAX.
    Under SEV that reads the whole secret through the guest's own key. Under SEV-ES the
    VMCB's save area is not the guest's state: VMRUN loads the encrypted VMSA, the guest
    goes on with its own RIP, and after the exit the hypervisor sees only what the guest
    put in its shared GHCB. Writing the VMSA's ciphertext instead changes the decryption
    the integrity check sees: VMRUN shuts the guest down rather than run it steered.""",
    "SEV-ES: the registers live in the VMSA, encrypted with the guest's key and checked at "
    "VMRUN; the hypervisor sees only the GHCB's fields",
)
def register_state(profile: MachineProfile, r: AttackResult) -> None:
    gadget = load_gadget()
    figures: dict[str, dict] = {}
    with HostSystem.start(profile) as system:
        kinds = [("SEV", POLICY_NODBG)]
        if system.kvm.sev_es_supported:
            kinds.append(("SEV-ES", POLICY_NODBG | POLICY_ES))
        else:
            r.step(f"{profile.name} has no SEV-ES: only the SEV guest is staged")
        for label, policy in kinds:
            victim = start_victim(system, label.lower(), policy=policy)
            victim.run()
            digest = published_digest(victim)
            vcpu = victim.vcpus[0]
            v = vcpu.vmcb()
            seen = {name: value for name, value in sorted(vcpu.regs.items()) if value}
            r.step(
                f"{label} guest (ASID {victim.asid}) halted; the hypervisor reads RIP={v.rip:#x} "
                f"RSP={v.rsp:#x} CR3={v.cr3:#x} RFLAGS={v.rflags:#x} in its VMCB and "
                f"{len(seen)} non-zero GPRs in KVM ({', '.join(seen) or 'none'})"
            )
            leaked = _steer(system, vcpu, gadget, r, label)
            f = {
                "vmcb_rip": f"{v.rip:#x}",
                "vmcb_cr3": f"{v.cr3:#x}",
                "gprs_seen": len(seen),
                "bytes_recovered": len(leaked),
                "secret_recovered": is_secret(leaked, digest),
            }
            if policy & POLICY_ES:
                f.update(_what_es_shows(system, victim, vcpu, gadget, r))
            figures[label] = f
            victim.destroy()
    r.figures = figures
    r.succeeded = figures["SEV"]["secret_recovered"]


def _what_es_shows(system, victim, vcpu, gadget: int, r: AttackResult) -> dict:
    """The GHCB's fields, then a write into the VMSA's ciphertext."""
    ghcb_gpa = vcpu.vmcb().ghcb_gpa
    ghcb = GHCB.parse(victim.read(ghcb_gpa, GHCB.size))
    shown = [name for name in GHCB_FIELDS if ghcb_is_valid(ghcb.valid_bitmap, name)]
    r.step(
        f"SEV-ES: all it has is the guest's shared GHCB (GPA {ghcb_gpa:#x}, from the GHCB MSR "
        f"in the VMCB): the last request the guest chose to show — exit code "
        f"{ghcb.sw_exit_code:#x}, EXITINFO1 {ghcb.sw_exit_info_1:#x}, RAX {ghcb.rax:#x} — and "
        f"KVM's answer (valid now: {', '.join(shown) or 'none'})"
    )
    rip = VMSA.field("rip")
    system.kernel.write(vcpu.vmsa_va + rip.offset, gadget.to_bytes(rip.size, "little"))
    system.kernel.wbinvd_on_all_cpus()  # the write reaches DRAM
    exit_ = vmrun(system.kvm.cpu(vcpu.core_index), vcpu, dict(vcpu.regs))
    r.step(
        f"SEV-ES: the hypervisor writes RIP={gadget:#x} into the VMSA page through its own "
        f"mapping; VMRUN → {exit_.name}: {exit_.detail.get('reason', '')}"
    )
    return {"ghcb_fields": shown, "tampered_vmsa_exit": exit_.name}
