"""SEV guests on the model: VMRUN and exits, nested translation and the key-selection table
(hardware.md §3.4), forced-private accesses, ASID-tagged TLBs, "security by crash", ASID
recycling by KVM, vCPUs sharing an ASID, and what the host and DRAM hold."""

from __future__ import annotations

import hashlib

import pytest
from conftest import ALL_PROFILES, boot_host

from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.guest import kernel as gk
from sevsim.host.kvm import Kvm, KvmError
from sevsim.soc import msr
from sevsim.soc.faults import GeneralProtection, InvalidOpcode
from sevsim.soc.paging import CR0_PG, CR4_PAE, CR4_PSE, PS, RW, A, D, P
from sevsim.soc.svm import (
    NPF_FINAL_GPA,
    NPF_GUEST_PAGE_TABLE,
    RFLAGS_FIXED,
    RFLAGS_IF,
    SEV_ENABLE,
    register_program,
)

MEM = 4 << 20


@pytest.fixture(scope="module")
def milan():
    host = boot_host("milan")
    yield host, Kvm(host.kernel, host.sev)
    host.close()


def start(kvm: Kvm, name: str, sev: bool = True, smp: int = 1, program=None, **options):
    vm = kvm.create_vm(MEM, vcpus=smp, sev=sev, name=name)
    line = gk.cmdline(MEM, smp=smp, secret=name, **options)
    vm.launch(gk.image(line, program), gk.GUEST_ENTRY)
    return vm


def report(vm, vcpu: int = 0):
    return vm.kernel.core.machine.observe_guest(vm.vcpus[vcpu].vmcb_addr)


def run_guest(kvm: Kvm, name: str, sev: bool = True, smp: int = 1):
    vm = start(kvm, name, sev, smp)
    exits = vm.run()
    assert [e.reason for e in exits] == ["DONE"] * smp, (exits, vm.console_text())
    return vm, report(vm)


def dram(vm, gpa: int, n: int) -> bytes:
    """What a physical attacker reads at the page backing ``gpa`` (after a write-back)."""
    machine = vm.kernel.core.machine
    machine.cache.wbinvd()
    return machine.dram.read(vm.spa(gpa), n)


def engine(vm, gpa: int, n: int, slot: int) -> bytes:
    """The AES engine's view of that memory through one key slot (a test-bench oracle)."""
    machine = vm.kernel.core.machine
    machine.cache.wbinvd()
    return machine.memctl.read(vm.spa(gpa), n, slot)


# ---- a whole guest ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PROFILES)
def test_sev_guest_runs_on_every_generation(name):
    with boot_host(name) as host:
        kvm = Kvm(host.kernel, host.sev)
        vm, rep = run_guest(kvm, "alpha")
        assert rep.sev and rep.sev_status == 1
        assert rep.c_bit == host.machine.profile.cbit
        assert rep.secret.startswith(b"alpha secret ")
        assert (
            rep.published
            == b"alpha: sha256(secret) = " + hashlib.sha256(rep.secret).hexdigest().encode()
        )
        assert "SEV active" in vm.console_text()
        # The hypervisor's own mapping of the private page: ciphertext.
        assert vm.read(rep.secret_gpa, len(rep.secret)) != rep.secret
        # The page the guest shared: readable, as the guest meant it to be.
        assert vm.read(rep.shared_gpa, len(rep.published)) == rep.published
        assert vm.shared_ranges == [(rep.shared_gpa, 1)]
        vm.destroy()


def test_non_sev_guest_sees_no_encryption_and_hides_nothing(milan):
    host, kvm = milan
    vm, rep = run_guest(kvm, "plain", sev=False)
    assert not rep.sev and rep.sev_status == 0 and rep.c_bit is None
    assert vm.asid > host.machine.profile.max_asid  # outside the SEV range
    assert vm.read(rep.secret_gpa, len(rep.secret)) == rep.secret
    assert vm.hypercalls == []  # nothing to share: set_memory_decrypted is a no-op
    vm.destroy()


# ---- the key-selection table (hardware.md §3.4) ------------------------------------------------
@pytest.mark.parametrize(
    "cmdline, tsme, shared_key",
    [
        ("mem_encrypt=on", False, "host"),  # guest C=0, NPT C=1 -> the host key
        ("mem_encrypt=off", False, "none"),  # guest C=0, NPT C=0 -> plaintext
        ("mem_encrypt=off", True, "tsme"),  # guest C=0, NPT C=0 under TSME -> the TSME key
    ],
)
def test_key_selection_table(cmdline, tsme, shared_key):
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    profile = get_profile("rome").with_(seed=7, dram_size=1 << 30, tsme=tsme)
    with HostSystem.start(profile, cmdline=cmdline) as host:
        kvm = Kvm(host.kernel, host.sev)
        memctl = host.machine.memctl
        vm, rep = run_guest(kvm, "keys")
        guest_slot = memctl.key_slot(True, vm.asid)
        # Guest C=1 (NPT C=1 or 0 alike): the guest's key, chosen by the VMCB's ASID.
        n = len(rep.secret)
        assert dram(vm, rep.secret_gpa, n) != rep.secret
        assert engine(vm, rep.secret_gpa, n, guest_slot) == rep.secret
        assert engine(vm, rep.secret_gpa, n, memctl.host_key_slot) != rep.secret
        # Guest C=0: the NPT leaf's C-bit decides.
        n = len(rep.published)
        stored = dram(vm, rep.shared_gpa, n)
        if shared_key == "none":
            assert stored == rep.published  # a physical attacker reads it as is
        else:
            assert stored != rep.published
            assert engine(vm, rep.shared_gpa, n, memctl.host_key_slot) == rep.published
        assert (host.kernel.me_mask != 0) == (shared_key == "host")
        # Whatever the key, the host reads the shared page in plaintext through its mapping.
        assert vm.read(rep.shared_gpa, n) == rep.published
        vm.destroy()


def test_non_sev_guest_memory_uses_the_npt_c_bit_only(milan):
    host, kvm = milan
    vm, rep = run_guest(kvm, "npt-only", sev=False)
    memctl = host.machine.memctl
    n = len(rep.secret)
    assert dram(vm, rep.secret_gpa, n) != rep.secret  # SME host: NPT C=1
    assert engine(vm, rep.secret_gpa, n, memctl.host_key_slot) == rep.secret
    vm.destroy()


# ---- forced-private accesses -------------------------------------------------------------
def _forced_private_program(vcpu):
    """Page tables whose table pointers (and CR3) carry no C-bit, a leaf for the code page
    with the C-bit cleared: walks and fetches must be private all the same."""
    from sevsim.pagetables import PAGE_KERNEL_EXEC, PageTables

    k = gk.GuestKernel(vcpu)
    k.detect_sev()
    tables = PageTables(gk.VcpuWindow(vcpu), k._pgt_page, me_mask=k.me_mask)
    tables.map_range(0, 0, 2 << 20, PAGE_KERNEL_EXEC, encrypted=True)
    data = 0x18_0000
    vcpu.write(data, b"private before paging")
    k.enter_long_mode(tables.cr3())  # CR3 without the C-bit
    out = {"read": vcpu.read(data, 21)}
    leaf = tables.split(gk.GUEST_ENTRY)
    tables.write_entry(leaf.entry_pa, leaf.entry & ~k.me_mask)  # code page: C=0
    vcpu.invlpg(gk.GUEST_ENTRY)
    out["code_as_data"] = vcpu.read(gk.GUEST_ENTRY, 64)
    vcpu.cpuid(0)  # an exit: the next VMRUN fetches the code through the C=0 mapping
    out["still_running"] = True
    return out


FORCED = register_program("test-forced-private", _forced_private_program)


def test_guest_page_walks_and_fetches_are_always_private(milan):
    host, kvm = milan
    vm = start(kvm, "forced", program=FORCED)
    assert [e.reason for e in vm.run()] == ["DONE"]
    out = report(vm)
    assert out["read"] == b"private before paging"
    assert out["still_running"]
    # A data read through the C=0 mapping uses the host key: not the code image.
    assert out["code_as_data"] != FORCED.code[:64]
    vm.destroy()


def _legacy_and_pae_program(vcpu):
    """32-bit paging cannot express a C-bit: every access is private. PAE can."""
    k = gk.GuestKernel(vcpu)
    k.detect_sev()
    cbit = k.me_mask
    out = {}
    # Legacy paging, one 4 MiB page (CR4.PSE) identity-mapping the first 4 MiB.
    pd = 0x1_0000
    vcpu.store(pd, 4, 0 | P | RW | PS | A | D)
    vcpu.write_cr4(vcpu.cr4 | CR4_PSE)
    vcpu.write_cr3(pd)
    vcpu.write_cr0(vcpu.cr0 | CR0_PG)
    vcpu.write(0x20_0000, b"legacy-paging data")
    vcpu.write_cr0(vcpu.cr0 & ~CR0_PG)
    # PAE: the first 2 MiB private, the second 2 MiB with C=0 (shared).
    pdpt, pd = 0x1_1000, 0x1_2000
    vcpu.store(pd, 8, 0 | P | RW | PS | A | D | cbit)
    vcpu.store(pd + 8, 8, (2 << 20) | P | RW | PS | A | D)
    vcpu.store(pdpt, 8, pd | P)
    vcpu.write_cr4(vcpu.cr4 & ~CR4_PSE | CR4_PAE)
    vcpu.write_cr3(pdpt)
    vcpu.write_cr0(vcpu.cr0 | CR0_PG)
    vcpu.write(0x30_0000, b"PAE data with C=0")
    out["pae"] = vcpu.read(0x30_0000, 17)
    return out


LEGACY_PAE = register_program("test-legacy-pae", _legacy_and_pae_program)


def test_data_is_forced_private_outside_long_mode_and_pae(milan):
    host, kvm = milan
    memctl = host.machine.memctl
    vm = start(kvm, "legacy", program=LEGACY_PAE)
    assert [e.reason for e in vm.run()] == ["DONE"], vm.dead
    guest_slot = memctl.key_slot(True, vm.asid)
    assert engine(vm, 0x20_0000, 18, guest_slot) == b"legacy-paging data"
    # Under PAE the C-bit counts: C=0 data goes out with the host key (SME host).
    assert engine(vm, 0x30_0000, 17, memctl.host_key_slot) == b"PAE data with C=0"
    assert vm.read(0x30_0000, 17) == b"PAE data with C=0"
    assert report(vm)["pae"] == b"PAE data with C=0"
    vm.destroy()


# ---- #NPF ------------------------------------------------------------------------------------
def test_nested_page_faults_report_the_gpa_without_the_c_bit(milan):
    host, kvm = milan
    vm = start(kvm, "npf")
    vm.huge_pages = False  # one fault per 4 KiB page
    assert [e.reason for e in vm.run()] == ["DONE"]
    rep = report(vm)
    npfs = vm.vcpus[0].npfs
    assert npfs, "every page is mapped on demand"
    cbit = 1 << host.machine.profile.cbit
    assert all(not gpa & cbit and gpa < MEM for gpa, _ in npfs)
    final = {gpa & ~0xFFF for gpa, code in npfs if code & NPF_FINAL_GPA}
    tables = {gpa & ~0xFFF for gpa, code in npfs if code & NPF_GUEST_PAGE_TABLE}
    # The secret page was first touched in long mode through a C=1 PTE.
    assert rep.secret_gpa in final
    assert gk.BOOT_PARAMS in final
    assert not tables or tables <= set(range(gk.PGT_BASE, gk.DATA_BASE, 4096))
    assert all(code & 1 == 0 for _, code in npfs)  # not-present faults
    vm.destroy()


def test_memory_backed_by_huge_pages_is_mapped_2m_at_a_time(milan):
    host, kvm = milan
    vm, rep = run_guest(kvm, "huge")
    faults = {gpa & ~0x1F_FFFF for gpa, _ in vm.vcpus[0].npfs}
    assert len(vm.vcpus[0].npfs) == len(faults)  # one #NPF per 2 MiB frame
    leaf = vm.npt.leaf(rep.secret_gpa)
    assert leaf.size == 2 << 20
    frame = leaf.entry & 0x000F_FFFF_FFE0_0000 & ~host.kernel.me_mask
    assert frame == vm.spa(rep.secret_gpa) & ~0x1F_FFFF
    vm.destroy()


# ---- TLB tagging ----------------------------------------------------------------------------
def _tlb_probe(vcpu):
    k = gk.GuestKernel(vcpu)
    k.detect_sev()
    k.setup_paging()
    label = k.params["secret"].encode()
    vcpu.write(0x20_0000, label.ljust(16, b"."))
    seen = []
    for _ in range(4):
        vcpu.hlt()  # back to the hypervisor, which runs the other guest meanwhile
        seen.append(vcpu.read(0x20_0000, 16))
    return seen


TLB_PROBE = register_program("test-tlb-probe", _tlb_probe)


def test_tlb_entries_are_tagged_by_asid(milan):
    host, kvm = milan
    a = start(kvm, "guest-a", program=TLB_PROBE)
    b = start(kvm, "guest-b", program=TLB_PROBE)
    core = host.machine.cores[0]
    for _ in range(5):
        a.vcpus[0].run()
        b.vcpus[0].run()
    assert report(a) == [b"guest-a" + b"." * 9] * 4
    assert report(b) == [b"guest-b" + b"." * 9] * 4
    vpn = 0x20_0000 >> 12
    assert core._tlbs[a.asid][vpn].page_pa == a.spa(0x20_0000)
    assert core._tlbs[b.asid][vpn].page_pa == b.spa(0x20_0000)
    a.destroy()
    b.destroy()


# ---- the wrong ASID: security by crash -----------------------------------------------------
def test_running_a_guest_with_another_guests_asid_crashes_without_disclosure(milan):
    host, kvm = milan
    a = start(kvm, "victim-a", program=TLB_PROBE)
    b = start(kvm, "victim-b", program=TLB_PROBE)
    a.vcpus[0].run()
    b.vcpus[0].run()  # both paused in HLT, mid-program, secrets in private memory
    a.vcpus[0].asid, b.vcpus[0].asid = b.asid, a.asid  # the hypervisor swaps them
    for vm, other in ((a, b"victim-b"), (b, b"victim-a")):
        exit_ = vm.vcpus[0].run()
        assert exit_.reason in ("SHUTDOWN", "INTERNAL_ERROR"), exit_
        assert other not in vm.console
        assert all(other not in str(v).encode() for v in vm.vcpus[0].regs.values())
        assert report(vm) is None  # the program never got to run again
    assert a.dead and b.dead
    a.destroy()
    b.destroy()


def test_guest_fault_without_a_handler_is_a_shutdown(milan):
    host, kvm = milan

    def bad(vcpu):
        k = gk.GuestKernel(vcpu)
        k.detect_sev()
        k.setup_paging()
        vcpu.load(0x8000_0000_0000_0000, 8)  # non-canonical: #GP, and no IDT to deliver it

    prog = register_program("test-bad-access", bad)
    vm = start(kvm, "bad", program=prog)
    exit_ = vm.vcpus[0].run()
    assert exit_.reason == "SHUTDOWN" and "unhandled" in exit_.detail
    vm.destroy()


def test_injected_gp_reaches_the_guest_handler(milan):
    host, kvm = milan

    def probe(vcpu):
        try:
            vcpu.rdmsr(0xC000_1234)  # KVM knows no such MSR: #GP injected
        except GeneralProtection:
            return "handled #GP"
        return "no fault"

    prog = register_program("test-msr-gp", probe)
    vm = start(kvm, "msr", program=prog)
    assert vm.vcpus[0].run().reason == "DONE"
    assert report(vm) == "handled #GP"
    vm.destroy()


def test_kvm_tells_a_finished_vcpu_from_the_saved_rflags(milan):
    """A HLT with IF=1 sleeps; the program's end is `cli; hlt`: IF=0 in the VMCB's save
    area, which is all KVM looks at to call the vCPU done."""
    host, kvm = milan

    def nap(vcpu):
        vcpu.hlt()
        return "woke"

    vm = start(kvm, "nap", program=register_program("test-hlt-if", nap))
    v = vm.vcpus[0]
    first = v.run()
    assert first.reason == "HLT" and v.vmcb().rflags == RFLAGS_FIXED | RFLAGS_IF
    assert first.exit.detail == {}
    last = v.run()
    assert last.reason == "DONE" and v.vmcb().rflags == RFLAGS_FIXED
    assert last.exit.detail == {}  # nothing but the exit code and the VMCB
    assert report(vm) == "woke"
    vm.destroy()


# ---- VMRUN checks --------------------------------------------------------------------------
def test_vmrun_consistency_checks(milan):
    host, kvm = milan
    vm = start(kvm, "checks")
    v = vm.vcpus[0]
    v.asid = 0
    assert v.run().reason == "FAIL_ENTRY"
    vm.dead = None
    v.asid = vm.asid
    nested = v.vmcb().nested_ctl
    v.set_vmcb(nested_ctl=SEV_ENABLE)  # SEV without nested paging
    assert v.run().reason == "FAIL_ENTRY"
    vm.dead = None
    v.set_vmcb(nested_ctl=nested)
    v.asid = vm.asid + 1  # an SEV ASID no guest was activated on: still invalid on the CCX
    assert v.run().reason == "FAIL_ENTRY"
    vm.dead = None
    v.asid = vm.asid
    assert v.run().reason == "DONE"
    vm.destroy()
    core = host.machine.cores[3]
    with pytest.raises(InvalidOpcode):  # SVM not enabled on that core (EFER.SVME clear)
        core.vmrun(0, {})


# ---- vCPUs share the ASID --------------------------------------------------------------------
def test_vcpus_of_a_guest_share_its_asid_across_cores(milan):
    host, kvm = milan
    vm, rep = run_guest(kvm, "smp", smp=2)
    v0, v1 = vm.vcpus
    assert v0.core_index != v1.core_index
    assert v0.vmcb().asid == v1.vmcb().asid == vm.asid
    # The AP read the BSP's private secret: same ASID, same key.
    assert rep.ap_digests == [hashlib.sha256(rep.secret).hexdigest()]
    assert report(vm, 1).ap_digests == rep.ap_digests
    vm.destroy()


# ---- ASID recycling ---------------------------------------------------------------------------
def two_asid_host():
    """A Milan whose BIOS reserves ASIDs 1..507 for SEV-ES: two plain SEV ASIDs, 508 and 509."""
    host = boot_host("milan", sev_edx=508)
    return host, Kvm(host.kernel, host.sev)


def test_kvm_recycles_asids_only_after_wbinvd_and_df_flush():
    host, kvm = two_asid_host()
    with host:
        fw = host.inspection_port()
        a, _ = run_guest(kvm, "a")
        b, _ = run_guest(kvm, "b")
        assert (a.asid, b.asid) == (508, 509)
        with pytest.raises(KvmError, match="no free SEV ASID"):
            kvm.create_vm(MEM, sev=True)
        a.destroy()
        assert kvm.asids.reclaim == {508}
        assert fw.asid_state(508)["dirty"] == 1  # DEACTIVATE after the guest ran
        c, rep = run_guest(kvm, "c")  # pool empty: WBINVD on all cores, DF_FLUSH, reuse
        assert c.asid == 508 and kvm.asids.flushes == 1
        assert fw.asid_state(508)["handle"] == c.handle
        assert rep.secret.startswith(b"c secret")
        b.destroy()
        c.destroy()


def test_firmware_refuses_reuse_when_kvm_skips_a_step():
    host, kvm = two_asid_host()
    with host:
        a, _ = run_guest(kvm, "a")
        run_guest(kvm, "b")
        a.destroy()
        # A buggy KVM that forgets WBINVD: DF_FLUSH is refused.
        kvm.kernel.wbinvd_on_all_cpus = lambda: None
        with pytest.raises(KvmError) as err:
            kvm.create_vm(MEM, sev=True)
        assert err.value.status == Status.WBINVD_REQUIRED
        # One that skips the flush entirely: ACTIVATE of the dirty ASID is refused.
        kvm.asids.reclaim = {508}
        kvm.asids._flush = lambda: None
        vm = kvm.create_vm(MEM, sev=True)
        with pytest.raises(KvmError) as err:
            vm.launch(gk.image(gk.cmdline(MEM)), gk.GUEST_ENTRY)
        assert err.value.status == Status.DF_FLUSH_REQUIRED


def test_destroy_tears_down_in_kvm_order(milan):
    host, kvm = milan
    vm, _ = run_guest(kvm, "teardown")
    handle, asid = vm.handle, vm.asid
    commands = []
    do_cmd = host.sev.do_cmd

    def spy(command, buffer=None):
        commands.append(command)
        return do_cmd(command, buffer)

    host.sev.do_cmd = spy
    try:
        vm.destroy()
    finally:
        host.sev.do_cmd = do_cmd
    assert commands == [Command.DEACTIVATE, Command.DECOMMISSION]
    assert asid in kvm.asids.reclaim
    assert host.inspection_port().asid_state(asid)["handle"] == 0
    assert all(
        (v.vmcb_addr & ~host.machine.cbit_mask) not in host.machine.guest_threads for v in vm.vcpus
    )
    assert guest_status_state(kvm, handle) == 0  # the handle is free again


def guest_status_state(kvm: Kvm, handle: int) -> int:
    status, out = kvm.sev_cmd_out(Command.GUEST_STATUS, handle=handle)
    assert status == Status.SUCCESS
    return out.state


def test_guest_sev_status_msr_is_read_only(milan):
    host, kvm = milan

    def write_it(vcpu):
        try:
            vcpu.wrmsr(msr.SEV_STATUS, 0)
        except GeneralProtection:
            return vcpu.rdmsr(msr.SEV_STATUS)

    prog = register_program("test-sev-status", write_it)
    vm = start(kvm, "msr-ro", program=prog)
    assert vm.vcpus[0].run().reason == "DONE"
    assert report(vm) == 1
    vm.destroy()
