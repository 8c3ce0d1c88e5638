"""The SEV-ES step of the demo: the same firmware and workload as an SEV guest and as an
SEV-ES guest, and what the hypervisor reads of their registers at an exit."""

from __future__ import annotations

from sevsim.api.policy import PolicyFlag
from sevsim.api.vmsa import GHCB, VMSA, ghcb_is_valid
from sevsim.demo.steps import Step, Story, Table, View, Working
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

POLICY = PolicyFlag.NODBG
REGISTERS = ("rip", "rsp", "cr3", "rflags", "rax", "rbx", "rcx", "rsi", "rdi", "r12")
EXPLANATION = (
    "Two guests run the same real-code firmware and the same workload (a secret in private "
    "memory, its SHA-256 printed). One is SEV, the other SEV-ES (policy bit 2). After each "
    "has halted, the hypervisor reads their registers where KVM keeps them: the VMCB's save "
    "area and its copy of the GPRs. For the SEV guest that is the guest's real state. The "
    "SEV-ES guest's state is in its VMSA page, encrypted with its key since "
    "LAUNCH_UPDATE_VMSA: KVM still holds the reset state it had before the launch, and "
    "learns only what the guest writes into its shared GHCB for each #VC it handles."
)


def es_story(profile: MachineProfile) -> Story:
    yield Working("starting an SEV guest and an SEV-ES guest with the same firmware")
    with HostSystem.start(profile) as system:
        s = Step("SEV-ES: the registers are encrypted too", EXPLANATION)
        if not system.kvm.sev_es_supported:
            s.facts.append(("SEV-ES", f"{profile.name} has no SEV-ES ASIDs: nothing to show"))
            yield s
            return
        sev = system.start_x86_guest("sev", "secret", policy=POLICY)
        es = system.start_x86_guest("sev-es", "secret", policy=POLICY | PolicyFlag.ES)
        for vm in (sev, es):
            vm.run()
        machine = system.machine
        vcpu = es.vcpus[0]
        slot = machine.memctl.key_slot(True, es.asid)
        vmsa_plain = machine.cache.read(vcpu.vmsa_pa, VMSA.size, slot)  # the observer's window
        vmsa = VMSA.parse(vmsa_plain)

        def hypervisor(vm, name: str) -> int:
            v = vm.vcpus[0].vmcb()
            return getattr(v, name) if hasattr(v, name) else vm.vcpus[0].regs.get(name, 0)

        rows = [
            [name.upper(), f"{hypervisor(sev, name):#x}", f"{hypervisor(es, name):#x}"]
            + [f"{getattr(vmsa, name):#x}"]
            for name in REGISTERS
        ]
        s.tables.append(
            Table(
                "what the hypervisor reads at the guests' last exit (and what the VMSA holds)",
                ["register", "SEV guest", "SEV-ES guest", "SEV-ES VMSA, under its key"],
                rows,
            )
        )
        rip = VMSA.field("rflags").offset  # RFLAGS and RIP: 16 bytes
        s.views.append(
            View(
                "the SEV-ES guest's VMSA: RFLAGS and RIP",
                "VMSA page (VMCB 0x108), guest key",
                vcpu.vmsa_pa + rip,
                vmsa_plain[rip : rip + 16],
                machine.dram.read(vcpu.vmsa_pa + rip, 16),
                system.kernel.read(vcpu.vmsa_va + rip, 16),
            )
        )
        ghcb_gpa = vcpu.vmcb().ghcb_gpa
        ghcb = GHCB.parse(es.read(ghcb_gpa, GHCB.size))
        s.facts += [
            ("SEV guest", f"ASID {sev.asid}, policy {POLICY:#x}"),
            (
                "SEV-ES guest",
                f"ASID {es.asid} (below {profile.min_sev_asid}), policy "
                f"{POLICY | PolicyFlag.ES:#x}, {es.vmgexits} VMGEXITs",
            ),
            (
                "its GHCB",
                f"GPA {ghcb_gpa:#x}, shared; last request exit code "
                f"{ghcb.sw_exit_code:#x}, RAX valid: {ghcb_is_valid(ghcb.valid_bitmap, 'rax')}",
            ),
        ]
        sev_v, es_v = sev.vcpus[0].vmcb(), vcpu.vmcb()
        both_ran = all("sha256" in vm.console_text() for vm in (sev, es))
        s.check("both guests ran the workload and printed their secret's digest", both_ran)
        s.check(
            "the SEV-ES guest knows it is one (SEV_STATUS bit 1)", "(SEV-ES)" in es.console_text()
        )
        s.check(
            "SEV: the hypervisor reads the guest's CR3 and RIP",
            sev_v.cr3 != 0 and sev_v.rip > 0xFFFF,
        )
        s.check(
            "SEV-ES: KVM holds only the state before the launch (RIP 0xFFF0, CR3 0)",
            (es_v.rip, es_v.cr3) == (0xFFF0, 0),
        )
        s.check("SEV-ES: the real state is in the VMSA (long mode, CR3 set)", vmsa.cr3 != 0)
        s.check(
            "SEV-ES: DRAM and the host's mapping hold the VMSA as ciphertext",
            s.views[0].dram_holds != s.views[0].cpu_reads
            and s.views[0].host_reads != s.views[0].cpu_reads,
        )
        s.check("SEV-ES: the guest asked KVM over its GHCB (VMGEXIT)", es.vmgexits > 0)
        s.facts.append(("command", "sevsim attack register-state (steering, and VMSA tampering)"))
        sev.destroy()
        es.destroy()
        yield s
