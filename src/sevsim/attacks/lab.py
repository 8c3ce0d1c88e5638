"""The attack lab: each attack is staged on a fresh machine and reports what it recovered.

An attack uses only what its attacker really has (design.md): the hypervisor — the host
kernel and KVM, with their own mappings (``HostKernel.memremap`` for raw ciphertext), the
NPT and VMCBs they control, and the firmware API through /dev/sev; the physical attacker —
a DRAM dump. Knowing the layout of the guest kernel it boots (where its first data page
is) counts as the hypervisor's knowledge; the guest's secrets do not.

Whether an attack *succeeded* is judged against the victim's own view (what the guest
program returned, ``Machine.observe_guest``): the narrator's window, never an input to the
attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sevsim.host.kvm import Vm
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

GUEST_MEMORY = 4 << 20


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


def start_guest(system: HostSystem, name: str, workload: str | None = None, **kw: Any) -> Vm:
    """An SEV guest running the guest kernel, launched the way KVM does it."""
    options = {"secret": name} | ({"workload": workload} if workload else {})
    return system.start_guest(name, GUEST_MEMORY, **kw, **options)


def victim_view(system: HostSystem, vm: Vm) -> Any:
    """What the victim's own program returned (the narrator's window, for judging)."""
    return system.machine.observe_guest(vm.vcpus[0].vmcb_addr)


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
