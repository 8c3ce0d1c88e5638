"""SEV guests on the model: VMRUN and exits, nested translation and the key-selection table
(hardware.md §3.4), forced-private accesses, ASID-tagged TLBs, "security by crash", ASID
recycling by KVM, vCPUs sharing an ASID, and what the host and DRAM hold.

The guests run the real-code image (``sevsim.guest.x86``), or for what it never does (odd
page tables, legacy paging, no IDT) a small image assembled from ``tests/guests``. What a
guest knows comes from its console and from its memory read as a debugger reads it
(KVM_SEV_DBG_DECRYPT: these guests' policy allows debugging), never from inside the guest."""

from __future__ import annotations

import hashlib
import re

import pytest
from conftest import ALL_PROFILES, boot_host, small_guest

from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import KvmError
from sevsim.soc.faults import InvalidOpcode
from sevsim.soc.svm import (
    NPF_FINAL_GPA,
    NPF_GUEST_PAGE_TABLE,
    RFLAGS_FIXED,
    RFLAGS_IF,
    SEV_ENABLE,
)

MEM = x86_guest.MIN_MEMORY
SYMS = x86_guest.symbols()
SECRET_GPA, SHARED_GPA = SYMS["SECRET_GPA"], SYMS["SHARED_GPA"]
MARKER = b"sevsim secret:"
SECRET_LEN = len(MARKER) + 32  # the marker, then 32 random bytes
FLASH = range((1 << 32) - len(x86_guest.image()), 1 << 32)


@pytest.fixture(scope="module")
def milan():
    host = boot_host("milan")
    yield host, host.kvm
    host.close()


def start(host, name: str, sev: bool = True, smp: int = 1, workload: str | None = None):
    """The image with ``secret:NAME`` (or ``workload``), launched as KVM does it."""
    work = workload or f"secret:{name}"
    return host.start_x86_guest(name, work, memory=MEM, sev=sev, vcpus=smp)


def run_guest(host, name: str, sev: bool = True, smp: int = 1, workload: str | None = None):
    vm = start(host, name, sev, smp, workload)
    exits = vm.run()
    assert [e.reason for e in exits] == ["DONE"] * smp, (exits, vm.console_text())
    return vm, Secret.of(vm)


class Secret:
    """A guest's secret as it keeps it (read the way a debugger does) and what it told."""

    def __init__(self, vm, kept: bytes, digest: str) -> None:
        self.kept, self.digest = kept, digest
        self.label = vm.name.encode()

    @classmethod
    def of(cls, vm) -> Secret:
        m = re.search(r"secret at 0x200000, sha256 ([0-9a-f]{64})", vm.console_text())
        assert m, vm.console_text()
        read = vm.sev_dbg_decrypt if vm.sev else vm.read
        kept = read(SECRET_GPA, SECRET_LEN)
        return cls(vm, kept, m.group(1))

    @property
    def published(self) -> bytes:
        """The shared page as the guest's `secret:LABEL` writes it: magic, the secret's GPA,
        the digest, the label (README.md)."""
        head = b"SEVSIM-SHARED".ljust(16, b"\0") + SECRET_GPA.to_bytes(8, "little")
        return head + bytes.fromhex(self.digest) + self.label.ljust(64, b"\0")


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
        vm, secret = run_guest(host, "alpha")
        cbit = host.machine.profile.cbit
        assert f"SEV active, C-bit {cbit}, SEV_STATUS 0x1" in vm.console_text()
        # The guest keeps what it says it keeps: the digest it printed is of those bytes.
        assert secret.kept.startswith(MARKER)
        assert hashlib.sha256(secret.kept[len(MARKER) :]).hexdigest() == secret.digest
        # The hypervisor's own mapping of the private page: ciphertext.
        assert vm.read(SECRET_GPA, SECRET_LEN) != secret.kept
        # The page the guest shared: readable, as the guest meant it to be.
        assert vm.read(SHARED_GPA, len(secret.published)) == secret.published
        # fw_cfg's DMA bounce buffer (16 pages, shared at boot), then that page.
        bounce = x86_guest.symbols()["FW_CFG_DMA_GPA"]
        assert vm.shared_ranges == [(bounce + i * 4096, 1) for i in range(16)] + [(SHARED_GPA, 1)]
        vm.destroy()


def test_non_sev_guest_sees_no_encryption_and_hides_nothing(milan):
    host, kvm = milan
    vm, secret = run_guest(host, "plain", sev=False)
    assert "SEV not active" in vm.console_text()
    assert vm.asid > host.machine.profile.max_asid  # outside the SEV range
    assert hashlib.sha256(secret.kept[len(MARKER) :]).hexdigest() == secret.digest
    assert vm.hypercalls == []  # nothing to tell KVM: the page is shared by default
    vm.destroy()


def test_fill_writes_every_page_above_the_io_area_privately(milan):
    """``fill`` (the migration benchmark's guest): q[i] = i over the RAM above the I/O area."""
    host, kvm = milan
    base, memory = x86_guest.symbols()["IO_AREA_END"], MEM + (8 << 20)
    vm = host.start_x86_guest("fill", "fill", memory=memory, sev=True)
    assert [e.reason for e in vm.run()] == ["DONE"]
    assert f"filled {(memory - base) >> 20} MiB" in vm.console_text()
    ram = next(s for s in vm.slots if s.gpa == 0)
    assert all((gpa >> 12) in ram.populated for gpa in range(base, memory, 4096))
    slot = host.machine.memctl.key_slot(True, vm.asid)
    for gpa in (base, base + (3 << 20) + 8, memory - 8):
        word = ((gpa - base) // 8).to_bytes(8, "little")
        assert engine(vm, gpa, 8, slot) == word  # through the guest's key
        assert dram(vm, gpa, 8) != word  # ciphertext in DRAM
    vm.destroy()


# ---- a device's DMA at a private page ----------------------------------------------------------
def test_dma_at_the_secret_gives_the_guest_garbage(milan):
    """`dma`: the guest keeps its secret and yields while the host has a device write at it.
    A DMA carries no ASID: the bytes land in DRAM as written, and the guest, reading them
    with its key, gets neither the device's bytes nor its secret."""
    from sevsim.soc.dma import BusMaster

    host, kvm = milan
    vm = start(host, "dma", workload="secret:dma dma")
    v = vm.vcpus[0]
    assert v.run().reason == "HLT"  # the yield: the secret is kept, its page hashed
    secret = Secret.of(vm)
    assert "dma: waiting while a device may write at 0x200000" in vm.console_text()
    spa = vm.spa(SECRET_GPA)
    host.kernel.wbinvd_on_all_cpus()
    device = BusMaster(host.machine, 0x0100)
    assert secret.kept[:16] not in device.read(spa, 64)  # ciphertext
    data = bytes(range(64))
    device.write(spa, data)
    assert v.run().reason == "DONE"
    assert dram(vm, SECRET_GPA, 64) == data
    reads = vm.sev_dbg_decrypt(SECRET_GPA, 64)  # what the guest read: the garbage
    assert reads != data and not reads.startswith(MARKER)
    line = f"dma read back: changed, sha256 {hashlib.sha256(reads).hexdigest()}"
    assert line in vm.console_text()
    vm.destroy()


def test_dma_without_a_device_leaves_the_secret_intact(milan):
    host, kvm = milan
    vm, secret = run_guest(host, "nodma", workload="secret:nodma dma")
    page = secret.kept.ljust(64, b"\0")  # the marker, 32 bytes, the rest of the page zero
    line = f"dma read back: intact, sha256 {hashlib.sha256(page).hexdigest()}"
    assert line in vm.console_text()
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
        memctl = host.machine.memctl
        vm, secret = run_guest(host, "keys")
        guest_slot = memctl.key_slot(True, vm.asid)
        # Guest C=1 (NPT C=1 or 0 alike): the guest's key, chosen by the VMCB's ASID.
        n = SECRET_LEN
        assert hashlib.sha256(secret.kept[len(MARKER) :]).hexdigest() == secret.digest
        assert dram(vm, SECRET_GPA, n) != secret.kept
        assert engine(vm, SECRET_GPA, n, guest_slot) == secret.kept
        assert engine(vm, SECRET_GPA, n, memctl.host_key_slot) != secret.kept
        # Guest C=0: the NPT leaf's C-bit decides.
        published = secret.published
        n = len(published)
        stored = dram(vm, SHARED_GPA, n)
        if shared_key == "none":
            assert stored == published  # a physical attacker reads it as is
        else:
            assert stored != published
            assert engine(vm, SHARED_GPA, n, memctl.host_key_slot) == published
        assert (host.kernel.me_mask != 0) == (shared_key == "host")
        # Whatever the key, the host reads the shared page in plaintext through its mapping.
        assert vm.read(SHARED_GPA, n) == published
        vm.destroy()


def test_non_sev_guest_memory_uses_the_npt_c_bit_only(milan):
    host, kvm = milan
    vm, secret = run_guest(host, "npt-only", sev=False)
    memctl = host.machine.memctl
    n = SECRET_LEN
    assert dram(vm, SECRET_GPA, n) != secret.kept  # SME host: NPT C=1
    assert engine(vm, SECRET_GPA, n, memctl.host_key_slot) == secret.kept
    vm.destroy()


# ---- forced-private accesses (small guests of their own: tests/guests/*.S) --------------------
def run_small_guest(host, name: str, sev: bool = True):
    image, symbols = small_guest(name)
    vm = host.start_x86_guest(name, memory=MEM, sev=sev, firmware=image)
    return vm, vm.run(max_rounds=100), symbols


def test_guest_page_walks_and_fetches_are_always_private(milan):
    """forced_private.S: CR3 and the table pointers without the C-bit, the code page
    mapped with C=0: the walks and the fetches are private all the same."""
    host, kvm = milan
    vm, exits, sym = run_small_guest(host, "forced_private")
    assert [e.reason for e in exits] == ["DONE"], (exits, vm.console_text())
    cbit = 1 << host.machine.profile.cbit
    # The guest's tables as it wrote them: no C-bit in CR3 or in the PML4 entry.
    assert not vm.vcpus[0].vmcb().cr3 & cbit
    pml4e = int.from_bytes(vm.sev_dbg_decrypt(sym["PML4_GPA"], 8), "little")
    assert pml4e & ~0xFFF == sym["PDPT_GPA"]
    # It ran on from the C=0 code page, across an I/O exit per byte of this line.
    assert vm.console_text() == "running from a C=0 code page\n"
    result = sym["RESULT_GPA"]
    assert vm.sev_dbg_decrypt(result, 21) == b"private before paging"
    # Its own code read as data through the C=0 mapping: the host key's view (SME host:
    # the NPT leaf has C=1), not the code it executed.
    code = sym["code64"]
    seen = vm.sev_dbg_decrypt(result + 64, 64)
    offset = code - sym["image_start"]
    assert seen != small_guest("forced_private")[0][offset : offset + 64]
    assert seen == engine(vm, code, 64, host.machine.memctl.host_key_slot)
    vm.destroy()


def test_data_is_forced_private_outside_long_mode_and_pae(milan):
    """paging32.S: legacy paging has no C-bit, so its write is private; under PAE the C=0
    write goes out with the host key (SME host)."""
    host, kvm = milan
    memctl = host.machine.memctl
    vm, exits, sym = run_small_guest(host, "paging32")
    assert [e.reason for e in exits] == ["DONE"], (exits, vm.console_text())
    assert vm.console_text() == "paging32 done\n"
    guest_slot = memctl.key_slot(True, vm.asid)
    legacy, pae = sym["LEGACY_GPA"], sym["PAE_GPA"]
    assert engine(vm, legacy, 18, guest_slot) == b"legacy-paging data"
    assert dram(vm, legacy, 18) != b"legacy-paging data"
    assert engine(vm, pae, 17, memctl.host_key_slot) == b"PAE data with C=0"
    assert vm.read(pae, 17) == b"PAE data with C=0"
    # What the guest read back through its C=0 mapping.
    assert vm.sev_dbg_decrypt(sym["RESULT_GPA"], 17) == b"PAE data with C=0"
    vm.destroy()


# ---- #NPF ------------------------------------------------------------------------------------
def test_nested_page_faults_report_the_gpa_without_the_c_bit(milan):
    host, kvm = milan
    vm = start(host, "npf")
    vm.huge_pages = False  # one fault per 4 KiB page
    assert [e.reason for e in vm.run()] == ["DONE"]
    npfs = vm.vcpus[0].npfs
    assert npfs, "every page is mapped on demand"
    cbit = 1 << host.machine.profile.cbit
    assert all(not gpa & cbit and (gpa < MEM or gpa in FLASH) for gpa, _ in npfs)
    final = {gpa & ~0xFFF for gpa, code in npfs if code & NPF_FINAL_GPA}
    tables = {gpa & ~0xFFF for gpa, code in npfs if code & NPF_GUEST_PAGE_TABLE}
    # The first fetch (the reset vector), the boot-info block written with paging off,
    # the secret page first touched in long mode through a C=1 PTE.
    assert {(1 << 32) - 4096, SYMS["BOOT_INFO_GPA"], SECRET_GPA} <= final
    # The guest writes its page tables before paging is on: a walk never faults on them.
    assert not tables or tables <= set(range(SYMS["PML4_GPA"], SYMS["IDT_GPA"], 4096))
    assert all(code & 1 == 0 for _, code in npfs)  # not-present faults
    vm.destroy()


def test_memory_backed_by_huge_pages_is_mapped_2m_at_a_time(milan):
    host, kvm = milan
    vm, _ = run_guest(host, "huge")
    # Above the first 2 MiB (which holds the isa-bios alias of the flash, mapped 4 KiB at
    # a time) and below the flash: one #NPF per 2 MiB frame.
    ram = [gpa for gpa, _ in vm.vcpus[0].npfs if 2 << 20 <= gpa < MEM]
    assert ram and len(ram) == len({gpa & ~0x1F_FFFF for gpa in ram})
    leaf = vm.npt.leaf(SECRET_GPA)
    assert leaf.size == 2 << 20
    frame = leaf.entry & 0x000F_FFFF_FFE0_0000 & ~host.kernel.me_mask
    assert frame == vm.spa(SECRET_GPA) & ~0x1F_FFFF
    vm.destroy()


# ---- TLB tagging ----------------------------------------------------------------------------
BALANCE_GPA = SYMS["BALANCE_GPA"]
BALANCE_LINE = "sevsim-guest: balance read back: balance:  40 EUR"


def test_tlb_entries_are_tagged_by_asid(milan):
    """Two guests on one core, the same guest-virtual page, their turns interleaved: each
    reads back its own data, and the core's TLB holds one translation per ASID."""
    host, kvm = milan
    a = start(host, "guest-a", workload="balance")
    b = start(host, "guest-b", workload="balance")
    assert a.vcpus[0].core_index == b.vcpus[0].core_index == 0
    reasons = []
    for _ in range(3):  # two yields, then the end
        reasons += [a.vcpus[0].run().reason, b.vcpus[0].run().reason]
    assert reasons == ["HLT", "HLT", "HLT", "HLT", "DONE", "DONE"]
    assert BALANCE_LINE in a.console_text() and BALANCE_LINE in b.console_text()
    core = host.machine.cores[0]
    vpn = BALANCE_GPA >> 12
    assert core._tlbs[a.asid][vpn].page_pa == a.spa(BALANCE_GPA)
    assert core._tlbs[b.asid][vpn].page_pa == b.spa(BALANCE_GPA)
    a.destroy()
    b.destroy()


# ---- the wrong ASID: security by crash -----------------------------------------------------
def test_running_a_guest_with_another_guests_asid_crashes_without_disclosure(milan):
    host, kvm = milan
    a = start(host, "victim-a", workload="secret:victim-a balance")
    b = start(host, "victim-b", workload="secret:victim-b balance")
    a.vcpus[0].run()
    b.vcpus[0].run()  # both paused in a yield, mid-program, secrets in private memory
    consoles = {a: bytes(a.console), b: bytes(b.console)}
    a.vcpus[0].asid, b.vcpus[0].asid = b.asid, a.asid  # the hypervisor swaps them
    for vm in (a, b):
        exit_ = vm.vcpus[0].run()
        # Its stack, code and IDT decrypt to garbage with the other key.
        assert exit_.reason in ("SHUTDOWN", "INTERNAL_ERROR"), exit_
        assert bytes(vm.console) == consoles[vm]  # it never ran far enough to say a word
    assert a.dead and b.dead
    a.destroy()
    b.destroy()


def test_guest_fault_without_a_handler_is_a_shutdown(milan):
    """no_idt.S: a page fault with an empty IDT: #PF, #DF, triple fault."""
    host, kvm = milan
    vm, exits, _ = run_small_guest(host, "no_idt")
    assert exits[0].reason == "SHUTDOWN" and "triple fault" in exits[0].detail, exits
    assert "#PF at 0x40000000" in exits[0].detail
    assert vm.console_text() == "reading an unmapped page with no IDT\n"  # and no more
    assert vm.dead
    vm.destroy()


def test_injected_gp_reaches_the_guest_handler(milan):
    """msr.S: KVM knows no MSR 0xC0001234 and injects #GP; the guest's handler runs."""
    host, kvm = milan
    vm, exits, _ = run_small_guest(host, "msr")
    assert [e.reason for e in exits] == ["DONE"], (exits, vm.console_text())
    assert vm.console_text().startswith("rdmsr 0xc0001234\n#GP\nwrmsr SEV_STATUS\n")
    vm.destroy()


def test_kvm_tells_a_finished_vcpu_from_the_saved_rflags(milan):
    """A HLT with IF=1 sleeps (yield_to_host: `sti; hlt` with RFLAGS otherwise clear); the
    program's end is `cli; hlt`: IF=0 in the VMCB's save area, which is all KVM looks at
    to call the vCPU done."""
    host, kvm = milan
    vm = start(host, "nap", workload="balance")
    v = vm.vcpus[0]
    for _ in range(2):
        nap = v.run()
        assert nap.reason == "HLT" and v.vmcb().rflags == RFLAGS_FIXED | RFLAGS_IF
        assert nap.exit.detail == {}
    last = v.run()
    assert last.reason == "DONE" and not v.vmcb().rflags & RFLAGS_IF
    assert last.exit.detail == {}  # nothing but the exit code and the VMCB
    assert BALANCE_LINE in vm.console_text()
    vm.destroy()


# ---- VMRUN checks --------------------------------------------------------------------------
def test_vmrun_consistency_checks(milan):
    host, kvm = milan
    vm = start(host, "checks")
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
    """The BSP starts the AP with INIT and STARTUP IPIs; the AP climbs from real mode to
    long mode on the BSP's page tables and hashes the BSP's private secret."""
    host, kvm = milan
    vm, secret = run_guest(host, "smp", smp=2, workload="secret:smp aps")
    v0, v1 = vm.vcpus
    assert v0.core_index != v1.core_index
    assert v0.vmcb().asid == v1.vmcb().asid == vm.asid
    # The AP read the BSP's private secret: same ASID, same key.
    assert f"cpu 1 read the secret, sha256 {secret.digest}" in vm.console_text()
    assert hashlib.sha256(secret.kept[len(MARKER) :]).hexdigest() == secret.digest
    # The trampoline the BSP copied to 0x8000 (SIPI vector 0x08) for the AP is private.
    trampoline = SYMS["trampoline_start"] - FLASH.start
    code = x86_guest.image()[trampoline : trampoline + 16]
    tr_gpa = SYMS["TRAMPOLINE_GPA"]
    assert vm.sev_dbg_decrypt(tr_gpa, 16) == code != vm.read(tr_gpa, 16)
    vm.destroy()


def test_an_sev_guest_starts_three_aps_and_each_reads_the_secret():
    with boot_host("milan") as host:
        vm, secret = run_guest(host, "smp4", smp=4, workload="aps")
        lines = [
            f"sevsim-guest: cpu {n} read the secret, sha256 {secret.digest}" for n in (1, 2, 3)
        ]
        assert all(line in vm.console_text() for line in lines)
        assert "sevsim-guest: aps: 4 CPUs online" in vm.console_text()
        assert len({v.core_index for v in vm.vcpus}) == 4
        vm.destroy()


# ---- ASID recycling ---------------------------------------------------------------------------
def two_asid_host():
    """A Milan whose BIOS reserves ASIDs 1..507 for SEV-ES: two plain SEV ASIDs, 508 and 509."""
    host = boot_host("milan", sev_edx=508)
    return host, host.kvm


def test_kvm_recycles_asids_only_after_wbinvd_and_df_flush():
    host, kvm = two_asid_host()
    with host:
        fw = host.inspection_port()
        a, _ = run_guest(host, "a")
        b, _ = run_guest(host, "b")
        assert (a.asid, b.asid) == (508, 509)
        with pytest.raises(KvmError, match="no free SEV ASID"):
            kvm.create_vm(MEM, sev=True)
        a.destroy()
        assert kvm.asids.reclaim == {508}
        assert fw.asid_state(508)["dirty"] == 1  # DEACTIVATE after the guest ran
        c, secret = run_guest(host, "c")  # pool empty: WBINVD on all cores, DF_FLUSH, reuse
        assert c.asid == 508 and kvm.asids.flushes == 1
        assert fw.asid_state(508)["handle"] == c.handle
        assert hashlib.sha256(secret.kept[len(MARKER) :]).hexdigest() == secret.digest
        b.destroy()
        c.destroy()


def test_firmware_refuses_reuse_when_kvm_skips_a_step():
    host, kvm = two_asid_host()
    with host:
        a, _ = run_guest(host, "a")
        run_guest(host, "b")
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
            vm.sev_launch_start(0)
        assert err.value.status == Status.DF_FLUSH_REQUIRED


def test_destroy_tears_down_in_kvm_order(milan):
    host, kvm = milan
    vm, _ = run_guest(host, "teardown")
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
        host.machine.x86_vcpu(v.vmcb_addr & ~host.machine.cbit_mask) is None for v in vm.vcpus
    )
    assert guest_status_state(kvm, handle) == 0  # the handle is free again


def guest_status_state(kvm, handle: int) -> int:
    status, out = kvm.sev_cmd_out(Command.GUEST_STATUS, handle=handle)
    assert status == Status.SUCCESS
    return out.state


def test_guest_sev_status_msr_is_read_only(milan):
    """msr.S: WRMSR to SEV_STATUS raises #GP in the guest; the MSR still reads 1 (SEV)."""
    host, kvm = milan
    vm, exits, _ = run_small_guest(host, "msr")
    assert [e.reason for e in exits] == ["DONE"], (exits, vm.console_text())
    assert vm.console_text().endswith("wrmsr SEV_STATUS\n#GP\nSEV_STATUS 0x00000001\n")
    vm.destroy()
