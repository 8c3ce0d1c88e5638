"""The attack lab: each attack is staged on a fresh machine and reports what it recovered.

An attack uses only what its attacker really has (design.md): the hypervisor — the host
kernel and KVM, with their own mappings (``HostKernel.memremap`` for raw ciphertext), the
NPT and VMCBs they control, the console and the devices it emulates, and the firmware API
through /dev/sev; the physical attacker — a DRAM dump. The victims are the real-code
guest (``sevsim.guest.x86``): its image is the owner's measured firmware, public, so its
fixed addresses (``SYMBOLS``, from ``sevsim-guest.sym.json``) and its code count as the
hypervisor's knowledge; the guest's secrets do not.

Whether an attack *succeeded* is judged from what the victim prints (the SHA-256 of its
secret, what it read back), from DBG_DECRYPT where the victim is debuggable, and for a
NODBG victim whose values are never printed from its memory as it reads it
(``Machine.guest_view``, a debugger inside the guest): the narrator's windows, never an
input to the attack.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import Vm
from sevsim.profiles import MachineProfile
from sevsim.soc.svm import EXIT_INTR
from sevsim.system import HostSystem

SYMBOLS = x86_guest.symbols()  # the victims' fixed addresses: the image is public
SECRET_GPA = SYMBOLS["SECRET_GPA"]
SECRET_MARKER = b"sevsim secret:"  # `secret` keeps it before its 32 random bytes
SECRET_SIZE = len(SECRET_MARKER) + 32
POLICY_DEBUG = 0x0  # the owner allows DBG_DECRYPT
POLICY_NODBG = 0x1


@dataclass
class AttackResult:
    attack: str
    title: str
    explanation: str
    profile: str
    engine: str
    succeeded: bool  # the attacker reached its goal in this configuration
    mitigated_by: str
    steps: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def step(self, text: str) -> None:
        self.steps.append(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "title": self.title,
            "profile": self.profile,
            "engine": self.engine,
            "succeeded": self.succeeded,
            "mitigated_by": self.mitigated_by,
            "explanation": self.explanation,
            "steps": self.steps,
            "figures": self.figures,
        }


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    explanation: str
    mitigation: str
    stage: Callable[[MachineProfile, AttackResult], None]

    def run(self, profile: MachineProfile) -> AttackResult:
        result = AttackResult(
            attack=self.name,
            title=self.title,
            explanation=self.explanation,
            profile=profile.name,
            engine=profile.engine_mode,
            succeeded=False,
            mitigated_by=self.mitigation,
        )
        self.stage(profile, result)
        return result


ATTACKS: dict[str, Attack] = {}


def attack(name: str, title: str, explanation: str, mitigation: str):
    """Register an attack's staging function under its command-line name."""

    def register(stage: Callable[[MachineProfile, AttackResult], None]):
        ATTACKS[name] = Attack(name, title, " ".join(explanation.split()), mitigation, stage)
        return stage

    return register


def start_victim(
    system: HostSystem, name: str, workload: str = "secret", policy: int = POLICY_NODBG
) -> Vm:
    """An SEV guest running the real-code image's ``workload``, launched as KVM does it."""
    return system.start_x86_guest(name, workload, policy=policy)


def vmrun(core, vcpu, regs: dict[str, int]):
    """The attacker's own VMRUN of a VMCB it prepared, resumed after the host timer's exits
    (as KVM goes back in): the first exit that is the guest's."""
    exit_ = core.vmrun(vcpu.vmcb_addr, regs)
    while exit_.code == EXIT_INTR:
        exit_ = core.vmrun(vcpu.vmcb_addr, regs)
    return exit_


def console_value(vm: Vm, prefix: str) -> str:
    """What the guest printed after ``prefix`` on its last such console line."""
    lines = [line for line in vm.console_text().splitlines() if prefix in line]
    return lines[-1].split(prefix, 1)[1] if lines else ""


def published_digest(vm: Vm) -> bytes:
    """The SHA-256 of its secret that a `secret` guest prints (b"" before it has)."""
    found = re.search(r"secret at 0x[0-9a-f]+, sha256 ([0-9a-f]{64})", vm.console_text())
    return bytes.fromhex(found.group(1)) if found else b""


def is_secret(data: bytes, digest: bytes) -> bool:
    """Whether ``data`` is a `secret` guest's secret: the marker, then the 32 bytes whose
    SHA-256 the guest printed."""
    secret = data[len(SECRET_MARKER) : SECRET_SIZE]
    return (
        bool(digest)
        and data.startswith(SECRET_MARKER)
        and hashlib.sha256(secret).digest() == digest
    )


class RawGuestMemory:
    """The hypervisor's raw view of a guest page: a kernel mapping without the C-bit
    (memremap with MEMREMAP_DEC) of the page's system-physical address, so reads and
    writes move the ciphertext as DRAM holds it. WBINVD first and after, so that neither
    the guest's dirty lines nor the host's own are left in between."""

    def __init__(self, system: HostSystem, vm: Vm, gpa: int, n: int = 4096) -> None:
        self.system = system
        self.va = system.kernel.memremap(vm.spa(gpa), n, decrypted=True)

    def read(self, offset: int, n: int) -> bytes:
        self.system.kernel.wbinvd_on_all_cpus()
        return self.system.kernel.read(self.va + offset, n)

    def write(self, offset: int, data: bytes) -> None:
        self.system.kernel.wbinvd_on_all_cpus()
        self.system.kernel.write(self.va + offset, data)
        self.system.kernel.wbinvd_on_all_cpus()
