"""The SEV part of the demo: two SEV guests and an ordinary VM on one host.

The guests are real x86 code (``sevsim.guest.x86``): they boot from the reset vector,
detect SEV, build page tables with the C-bit, keep a random secret in a private page and
publish its hash in a shared one. The hypervisor (``sevsim.host.kvm``) does only what KVM
can: it runs the guests, reads their memory through its own mappings, and talks to the
firmware through /dev/sev. The guests' own view (what a debugger inside the guest would
read, ``Machine.guest_view``) and the ASID table (the firmware's per-ASID bookkeeping) are
the observer's windows a teaching tool needs; neither is reachable from host code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.attacks.physical import ColdBootDump
from sevsim.demo.steps import Step, Story, Table, View, Working
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import RunExit, Vm
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

GUEST_MEMORY = 32 << 20
SECRET_GPA = x86_guest.symbols()["SECRET_GPA"]
SHARED_GPA = x86_guest.symbols()["SHARED_GPA"]
MARKER = b"sevsim secret:"  # the guest keeps it before its 32 random bytes
SWAPPED_BUDGET = 20  # time slices a vCPU run with the wrong key may spin before it is stopped


@dataclass
class GuestReport:
    """What a guest itself sees: its console, and its memory read as it reads it."""

    sev: bool
    c_bit: int | None
    secret: bytes  # the marker and the 32 random bytes, from its private page
    secret_gpa: int
    shared_gpa: int
    published: bytes  # its shared page: magic, the secret's GPA, SHA-256 of the secret


ASID_COLUMNS = ["moment", "ASID", "guest", "key slot holds", "firmware", "KVM"]


def two_sev_asids(profile: MachineProfile) -> MachineProfile:
    """The BIOS setting that leaves two ASIDs for plain SEV guests, so that the demo runs
    out of them: the "SEV-ES ASID space limit" where SEV-ES exists, else the divider of
    the SEV ASIDs (Naples)."""
    if profile.sev_es:
        return profile.with_(sev_edx=profile.max_asid - 1)
    return profile.with_(sev_ecx=profile.min_sev_asid + 1)


class _Story:
    def __init__(self, system: HostSystem) -> None:
        self.system = system
        self.machine = system.machine
        self.kvm = system.kvm
        self.dump = ColdBootDump(self.machine)
        self.vms: dict[str, Vm] = {}
        self.key_of: dict[int, str] = {}  # ASID -> whose VEK the slot holds (narration)

    def start(self, name: str, sev: bool = True) -> Vm:
        vm = self.system.start_x86_guest(name, "secret", memory=GUEST_MEMORY, sev=sev)
        if sev:
            self.key_of[vm.asid] = f"{name}'s VEK"
        self.vms[name] = vm
        return vm

    def report(self, vm: Vm) -> GuestReport:
        """The guest's own view (observer's window): its console and its memory."""
        console = vm.console_text()
        found = re.search(r"SEV active, C-bit (\d+)", console)
        view = self.machine.guest_view
        vmcb = vm.vcpus[0].vmcb_addr
        return GuestReport(
            sev=found is not None,
            c_bit=int(found.group(1)) if found else None,
            secret=view(vmcb, SECRET_GPA, len(MARKER) + 32),
            secret_gpa=SECRET_GPA,
            shared_gpa=SHARED_GPA,
            published=view(vmcb, SHARED_GPA, 56),
        )

    def asid_rows(self, moment: str) -> list[list[str]]:
        psp = self.system.inspection_port()  # the firmware's bookkeeping, shown for teaching
        names = {vm.handle: name for name, vm in self.vms.items() if vm.sev and not vm.destroyed}
        rows = []
        for asid in self.kvm.asids.range(es=False):
            state = psp.asid_state(asid)
            firmware = ", ".join(
                label
                for key, label in (
                    ("in_use", "in use"),
                    ("allocated", "allocated"),
                    ("dirty", "dirty"),
                    ("clean", "clean"),
                )
                if state[key]
            )
            if asid in self.kvm.asids.reclaim:
                kvm_state = "freed, waiting for a flush"
            elif asid in self.kvm.asids.used:
                kvm_state = "in use"
            else:
                kvm_state = "free"
            rows.append(
                [
                    moment if not rows else "",
                    str(asid),
                    names.get(state["handle"], "—"),
                    self.key_of.get(asid, "no key loaded yet"),
                    firmware,
                    kvm_state,
                ]
            )
        for name, vm in self.vms.items():
            if not vm.sev and not vm.destroyed:
                rows.append(["", str(vm.asid), name, "none: not an SEV ASID", "—", "in use"])
        return rows

    def view(self, label: str, vm: Vm, gpa: int, guest_reads: bytes, mapping: str) -> View:
        n = len(guest_reads)
        return View(
            label,
            mapping,
            vm.spa(gpa),
            guest_reads,
            self.dump.read(vm.spa(gpa), n),
            host_reads=vm.read(gpa, n),
        )


def sev_story(profile: MachineProfile) -> Story:
    profile = two_sev_asids(profile)
    yield Working("booting two SEV guests and an ordinary VM")
    system = HostSystem.start(profile)
    try:
        story = _Story(system)
        yield _launch_step(story)
        yield Working("reading each guest's secret as the guest, the hypervisor and DRAM")
        yield _views_step(story)
        yield Working("swapping the guests' ASIDs")
        yield _swap_step(story)
        yield Working("tearing guests down and recycling ASIDs")
        yield _recycle_step(story)
        for vm in story.vms.values():
            vm.destroy()
    finally:
        system.close()


def _launch_step(story: _Story) -> Step:
    kvm = story.kvm
    asids = kvm.asids.range(es=False)
    results: dict[str, list[RunExit]] = {}
    for name, sev in (("alpha", True), ("beta", True), ("plain", False)):
        results[name] = story.start(name, sev).run()
    s = Step(
        "Start two SEV guests and an ordinary VM",
        f"The BIOS leaves two ASIDs for plain SEV guests ({asids.start} and {asids.stop - 1}),"
        " so that this story runs out of them. For each SEV guest the hypervisor (modelled on "
        "KVM) takes an ASID, has the firmware create the guest (LAUNCH_START) and load a fresh "
        "VEK into that ASID's key slot (ACTIVATE), encrypt and measure the launch image in "
        "place (LAUNCH_UPDATE_DATA, LAUNCH_MEASURE) and let it run (LAUNCH_FINISH). The "
        "ordinary VM gets an ASID above the SEV range and no key. Each guest is real x86 "
        "code that starts at the reset vector: in real and protected mode every access of "
        "an SEV guest is private; it detects SEV (CPUID 0x8000001F and the SEV_STATUS MSR), "
        "builds its page tables with the C-bit, enters long mode, keeps a random secret in "
        "a private page and publishes its hash in a page it shares with the host "
        "(set_memory_decrypted: flush, clear the C-bit, INVLPG, tell KVM).",
    )
    for name, vm in story.vms.items():
        kind = f"SEV, handle {vm.handle}" if vm.sev else "no SEV"
        s.facts.append((f"{name}", f"ASID {vm.asid} ({kind}), {vm.vcpus[0].exits} exits"))
        s.facts.append((f"{name} console", vm.console_text().rstrip()))
    s.tables.append(Table("ASID table", ASID_COLUMNS, story.asid_rows("all three running")))
    for name, vm in story.vms.items():
        rep = story.report(vm)
        s.check(f"{name} ran to completion", [e.reason for e in results[name]] == ["DONE"])
        if vm.sev:
            s.check(
                f"{name} sees SEV active with C-bit {story.machine.profile.cbit}",
                rep.sev and rep.c_bit == story.machine.profile.cbit,
            )
        else:
            s.check(f"{name} sees no memory encryption", not rep.sev)
    alpha, beta = story.vms["alpha"], story.vms["beta"]
    s.check("the SEV guests got the two SEV ASIDs", {alpha.asid, beta.asid} == set(asids))
    return s


def _views_step(story: _Story) -> Step:
    story.system.kernel.wbinvd_on_all_cpus()  # make DRAM current before the dump is read
    s = Step(
        "The same secret, seen by the guest, by the hypervisor and in DRAM",
        "Each guest reads its secret in plaintext. The hypervisor maps all guest memory and "
        "reads it with its own key: for an SEV guest's private page that is ciphertext "
        "under the guest's VEK, decrypted with the wrong key — garbage. The ordinary VM has "
        "no key, so the hypervisor reads its secret as the guest does; in DRAM it is "
        "encrypted only with the host key (SME), which stops a physical attacker but not the "
        "host. A page an SEV guest shares (C=0) is the host's to read, as meant.",
    )
    dump = story.dump
    for name in ("alpha", "beta", "plain"):
        vm = story.vms[name]
        rep = story.report(vm)
        mapping = f"guest C=1, ASID {vm.asid}" if vm.sev else f"no SEV, ASID {vm.asid}"
        view = story.view(f"{name}'s secret", vm, rep.secret_gpa, rep.secret, mapping)
        s.views.append(view)
        digest = hashlib.sha256(rep.secret[len(MARKER) :]).digest()
        s.check(
            f"{name} reads its secret (its published hash matches)",
            rep.secret.startswith(MARKER) and rep.published[24:56] == digest,
        )
        if vm.sev:
            s.check(
                f"the hypervisor reads only garbage for {name}'s secret",
                view.host_reads != rep.secret,
            )
        else:
            s.check(
                f"the hypervisor reads {name}'s secret in plaintext", view.host_reads == rep.secret
            )
        s.check(f"DRAM holds {name}'s secret only as ciphertext", view.dram_holds != rep.secret)
        s.check(
            f"a search of the whole DRAM dump does not find {name}'s secret",
            not dump.find(rep.secret),
        )
    alpha = story.vms["alpha"]
    rep = story.report(alpha)
    shared = story.view("alpha's shared page", alpha, rep.shared_gpa, rep.published, "guest C=0")
    s.views.append(shared)
    s.check("the hypervisor reads alpha's shared page", shared.host_reads == rep.published)
    s.check(
        "in DRAM the shared page is under the host key, not plaintext",
        shared.dram_holds != rep.published,
    )
    return s


def _swap_step(story: _Story) -> Step:
    alpha, beta = story.vms["alpha"], story.vms["beta"]
    secrets = {vm.name: story.report(vm).secret for vm in (alpha, beta)}
    alpha.vcpus[0].asid, beta.vcpus[0].asid = beta.asid, alpha.asid
    for vm in (alpha, beta):
        vm.spin_budget = SWAPPED_BUDGET  # garbage may loop: the host timer stops it
    exits = {vm.name: vm.vcpus[0].run() for vm in (alpha, beta)}
    s = Step(
        "The hypervisor swaps the two guests' ASIDs",
        "The hardware only checks that the ASID in a VMCB is a valid, enabled SEV ASID; it "
        "does not know which guest owns it. Run with beta's ASID, alpha's page-table walk "
        "and instruction fetch use beta's key: alpha's own code decrypts to garbage, which "
        "the core executes until an instruction faults; the fault cannot be delivered (the "
        'IDT decrypts to garbage too), and the guest shuts down — "security by crash". '
        "(CrossLine showed that the accesses made before the crash can still leak.)",
        facts=[
            (f"{name} with the other's ASID", f"{e.reason}: {e.detail}")
            for name, e in exits.items()
        ],
    )
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        vm = story.vms[name]
        s.check(
            f"{name} run with {other}'s ASID crashes",
            exits[name].reason in ("SHUTDOWN", "INTERNAL_ERROR", "STUCK"),
        )
        leaked = secrets[other] in bytes(vm.console) or any(
            secrets[other] in str(v).encode() for v in vm.vcpus[0].regs.values()
        )
        s.check(f"nothing of {other}'s secret reaches the hypervisor through {name}", not leaked)
    return s


def _recycle_step(story: _Story) -> Step:
    kvm = story.kvm
    rows = []
    for name in ("alpha", "beta"):
        story.vms[name].destroy()
    rows += story.asid_rows("alpha and beta destroyed")
    psp = story.system.inspection_port()
    dirty = all(psp.asid_state(a)["dirty"] for a in kvm.asids.range(es=False))
    hasty = kvm.sev_cmd(Command.DF_FLUSH)
    rows += story.asid_rows(f"DF_FLUSH without WBINVD: {hasty.name}")
    gamma = story.start("gamma")
    gamma_exits = gamma.run()
    rows += story.asid_rows("gamma started (KVM: WBINVD on all cores, DF_FLUSH, reuse)")
    rep = story.report(gamma)
    s = Step(
        "Guests go, ASIDs come back: DEACTIVATE → WBINVD → DF_FLUSH → reuse",
        "KVM tears a guest down with WBINVD, DEACTIVATE and DECOMMISSION. The ASID is "
        "dirty now: caches may still hold lines tagged with it, and its key slot still "
        "holds the old VEK. The firmware refuses DF_FLUSH until every core has run WBINVD "
        "since, and ACTIVATE of a dirty ASID until DF_FLUSH. KVM recycles lazily: freed "
        "ASIDs wait until the pool is empty; then it runs WBINVD on every core and DF_FLUSH, "
        "and the next guest gets the lowest free ASID, with a new VEK.",
        facts=[
            ("KVM log", "; ".join(kvm.log)),
            ("gamma", f"ASID {gamma.asid}, handle {gamma.handle}"),
        ],
        tables=[Table("ASID table", ASID_COLUMNS, rows)],
    )
    s.check("DEACTIVATE left both ASIDs dirty", dirty)
    s.check(
        "the firmware refuses DF_FLUSH before WBINVD (WBINVD_REQUIRED)",
        hasty == Status.WBINVD_REQUIRED,
    )
    s.check("KVM recycled the ASIDs with one WBINVD + DF_FLUSH", kvm.asids.flushes == 1)
    s.check("gamma reuses alpha's old ASID", gamma.asid == kvm.asids.range(es=False).start)
    s.check("gamma runs with its own key", [e.reason for e in gamma_exits] == ["DONE"] and rep.sev)
    s.check(
        "the hypervisor reads only garbage for gamma's secret",
        gamma.read(rep.secret_gpa, len(rep.secret)) != rep.secret,
    )
    return s
