"""SEV-ES on the model's silicon and KVM (hardware.md §8.1-8.3): the VMSA loaded and saved
through the guest's key and checked at VMRUN, #VC instead of exits for intercepted
instructions, VMGEXIT with the GHCB MSR in the VMCB, KVM answering over the MSR protocol
and the GHCB page, MMIO through reserved-bit nested entries, the ES ASID range.

The guest is ``tests/guests/es_vc.S``: a 32-bit guest whose #VC handler asks the hypervisor
for each intercepted instruction by hand. What it learnt is read back with DBG_DECRYPT
(its policy allows debugging); what the hypervisor learnt is what KVM holds."""

from __future__ import annotations

import struct

import pytest
from conftest import boot_host, small_guest

from sevsim.api.vmsa import GHCB, VMSA
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import KvmError
from sevsim.host.vmm import VmConfig, Vmm, VmmError
from sevsim.soc.svm import EXIT_HLT, EXIT_INVALID, GUEST_INTERRUPT_MASK, SEV_ENABLE

MEM = x86_guest.MIN_MEMORY
ES = 0x4  # policy: SEV-ES, debugging allowed
RESULT, VC_LOG, GHCB_GPA = 0x10000, 0x10100, 0x200000
VC = {"CPUID": 0x72, "IOIO": 0x7B, "MSR": 0x7C, "VMMCALL": 0x81, "NPF": 0x400}


@pytest.fixture(scope="module")
def milan():
    host = boot_host("milan")
    yield host
    host.close()


def es_guest(host, vcpus: int = 1):
    image, _ = small_guest("es_vc")
    return host.start_x86_guest("es", memory=MEM, policy=ES, firmware=image, vcpus=vcpus)


def test_every_intercept_becomes_vc_and_the_guest_asks_kvm_itself(milan):
    vm = es_guest(milan)
    vcpu = vm.vcpus[0]
    before = (vcpu.vmcb(), dict(vcpu.regs))
    assert [e.reason for e in vm.run()] == ["DONE"], vm.dead
    assert vm.console_text() == "es ok\n"  # six OUTs, each asked for over the GHCB
    r = struct.unpack("<10I", vm.sev_dbg_decrypt(RESULT, 40))
    cbit = milan.machine.profile.cbit
    # CPUID 0x8000001F through the MSR protocol, then through the GHCB page: SEV and SEV-ES.
    assert r[0] == r[3] == 0b1010 and r[1] & 0x3F == r[4] & 0x3F == cbit
    assert r[2] == 0b11  # SEV_STATUS: SEV and SEV-ES, read without #VC
    assert r[5] == 0  # the APIC ID register, read as MMIO over the GHCB
    assert r[6] | r[7] << 32 == -1000 & (1 << 64) - 1  # VMMCALL 0xFFFF: -KVM_ENOSYS
    assert r[8] & 0xFFFF == 0x0D01  # RDMSR of an unknown MSR: "raise #GP (vector 13)"
    assert r[9] == GHCB_GPA  # the GHCB MSR reads back without #VC
    count, *codes = struct.unpack("<12I", vm.sev_dbg_decrypt(VC_LOG, 48))
    assert codes[:count] == [VC["CPUID"]] + [VC["IOIO"]] * 6 + [
        VC["CPUID"],
        VC["NPF"],
        VC["VMMCALL"],
        VC["MSR"],
    ]
    assert vm.vmgexits == 4 + 6 + 4 and not vm.ghcb_errors
    # KVM never saw a register: the VMCB's save area and its GPRs are as before the launch.
    after = vcpu.vmcb()
    assert (after.rip, after.rsp, after.cs_base, after.cr0, after.cr3) == (
        before[0].rip,
        before[0].rsp,
        before[0].cs_base,
        before[0].cr0,
        before[0].cr3,
    )
    assert vcpu.regs == before[1]
    # What it does know: the exit, the GHCB MSR, and that interrupts are off (INT_STATE).
    assert after.exit_code == EXIT_HLT and after.ghcb_gpa == GHCB_GPA
    assert not after.int_state & GUEST_INTERRUPT_MASK
    # The GHCB is shared: KVM reads its last request in the clear (the RDMSR, exit 0x7C).
    assert GHCB.parse(vm.read(GHCB_GPA, GHCB.size)).sw_exit_code == VC["MSR"]
    vm.destroy()


def test_the_vmsa_is_ciphertext_to_the_host_and_plaintext_to_the_guest_key(milan):
    vm = es_guest(milan)
    vm.run()
    vcpu = vm.vcpus[0]
    raw = milan.kernel.read(vcpu.vmsa_va, VMSA.size)  # what the hypervisor reads
    machine = milan.machine  # the observer's window: the page through the guest's key slot
    slot = machine.memctl.key_slot(True, vm.asid)
    state = VMSA.parse(machine.cache.read(vcpu.vmsa_pa, VMSA.size, slot))
    # The guest stopped in its final HLT loop, in protected mode with paging, RAX = the GHCB.
    assert state.cr0 & 0x8000_0001 == 0x8000_0001 and state.rax == GHCB_GPA
    assert 0xF0000 < state.rip < 0x100000  # in the image's alias, past the reset vector
    assert VMSA.parse(raw).rax != GHCB_GPA and raw != VMSA.build(state)
    vm.destroy()


@pytest.mark.parametrize("field", ["rip", "rax"])
def test_a_hypervisor_that_writes_the_vmsa_gets_a_shutdown_not_a_steered_guest(milan, field):
    vm = es_guest(milan)
    vcpu = vm.vcpus[0]
    vcpu.run_once()  # the first exit: the VMSA now holds a running guest's state
    f = VMSA.field(field)
    milan.kernel.write(vcpu.vmsa_va + f.offset, (0x1234).to_bytes(f.size, "little"))
    milan.kernel.wbinvd_on_all_cpus()  # the write reaches DRAM
    exits = vm.run()
    assert exits[0].reason == "SHUTDOWN"
    assert "integrity" in exits[0].detail
    vm.destroy()


def test_es_guests_take_asids_below_the_first_sev_asid(milan):
    min_sev = milan.machine.profile.min_sev_asid
    assert min_sev > 1  # the profile leaves SEV-ES ASIDs
    image, _ = small_guest("es_vc")
    es = milan.start_x86_guest("es", memory=MEM, policy=ES, firmware=image)
    sev = milan.start_x86_guest("sev", memory=MEM, policy=0)
    assert 1 <= es.asid < min_sev <= sev.asid
    es.destroy()
    sev.destroy()


def test_kvm_refuses_sev_es_without_es_asids():
    host = boot_host("milan", sev_edx=1)  # the BIOS left no SEV-ES ASID
    try:
        with pytest.raises(KvmError, match="SEV-ES is not supported"):
            host.kvm.create_vm(MEM, sev=True, sev_es=True)
    finally:
        host.close()


def test_vmrun_refuses_sev_es_without_sev(milan):
    vm = es_guest(milan)
    vcpu = vm.vcpus[0]
    vcpu.set_vmcb(nested_ctl=vcpu.vmcb().nested_ctl & ~SEV_ENABLE)
    assert vcpu.run_once().code == EXIT_INVALID
    vm.destroy()


def test_kvm_cannot_debug_an_es_guest(milan):
    vm = es_guest(milan)
    with pytest.raises(KvmError, match="encrypted"):
        vm.vcpus[0].set_guest_debug(1)
    vm.destroy()


def test_an_es_guest_is_not_migrated(milan, tmp_path):
    image, _ = small_guest("es_vc")
    bios = tmp_path / "es.fd"
    bios.write_bytes(image)
    vmm = Vmm(milan, VmConfig(firmware=bios, memory=MEM, policy=ES))
    vmm.start()
    try:
        assert vmm.query_sev()["policy"] & ES
        with pytest.raises(VmmError, match="SEV-ES: migration is not implemented"):
            vmm.migrate("tcp:127.0.0.1:1")
        assert vmm.migration == {}  # nothing was started
    finally:
        vmm.quit()


def test_an_es_launch_needs_the_firmware_s_reset_block(milan, tmp_path):
    image, _ = small_guest("msr")  # no OVMF footer table
    bios = tmp_path / "plain.fd"
    bios.write_bytes(image)
    vmm = Vmm(milan, VmConfig(firmware=bios, memory=MEM, policy=ES))
    with pytest.raises(VmmError, match="SEV-ES reset block"):
        vmm.start()


def test_vmrun_refuses_an_es_guest_downgraded_to_plain_sev_on_its_asid(milan):
    """A hypervisor that clears SEV_ES_ENABLE would get the registers in the VMCB again: the
    hardware refuses a plain SEV guest on an SEV-ES ASID (below CPUID 0x8000001F EDX)."""
    from sevsim.soc.svm import SEV_ES_ENABLE

    vm = es_guest(milan)
    vcpu = vm.vcpus[0]
    vcpu.set_vmcb(nested_ctl=vcpu.vmcb().nested_ctl & ~SEV_ES_ENABLE)
    assert vcpu.run_once().code == EXIT_INVALID
    vm.destroy()


@pytest.mark.parametrize(
    "request_, reason",
    [
        ({"sw_exit_code": 0x72, "rax": 0, "rcx": 0, "ghcb_usage": 1}, 2),  # INVALID_USAGE
        ({"sw_exit_code": 0x72, "rax": 0, "rcx": 0, "without": "sw_exit_info_2"}, 4),
        ({"sw_exit_code": 0x72, "rax": 0}, 4),  # MISSING_INPUT: no RCX
        ({"sw_exit_code": 0x7B, "sw_exit_info_1": 0x3F8 << 16}, 5),  # INVALID_INPUT: no size
        ({"sw_exit_code": 0x7B, "sw_exit_info_1": 0x3F8 << 16 | 1 << 4 | 1 << 2}, 5),  # INS
        ({"sw_exit_code": 0x7C, "rcx": 0x1B, "sw_exit_info_1": 1, "rax": 0}, 4),  # no RDX
        ({"sw_exit_code": 0x1234}, 6),  # INVALID_EVENT
        (
            {
                "sw_exit_code": 0x8000_0001,
                "sw_exit_info_1": 0xFEE0_0020,
                "sw_exit_info_2": 4,
                "sw_scratch": 0x10_0000,  # not in the GHCB's shared buffer
            },
            3,  # INVALID_SCRATCH_AREA
        ),
    ],
)
def test_kvm_answers_a_malformed_ghcb_request_with_the_specs_reason(milan, request_, reason):
    """A GHCB written by hand, as a buggy or hostile guest would: KVM answers sw_exit_info_1 =
    2 (malformed input) with the GHCB specification's reason in sw_exit_info_2 (Linux
    sev-common.h GHCB_ERR_*), and goes on; it never takes the request."""
    from sevsim.api.vmsa import GHCB, ghcb_set_valid
    from sevsim.host.kvm import vmgexit

    vm = es_guest(milan)
    vm.run()
    vcpu = vm.vcpus[0]
    fields = {"sw_exit_info_1": 0, "sw_exit_info_2": 0} | dict(request_)
    without = fields.pop("without", None)
    usage = fields.pop("ghcb_usage", 0)
    bitmap = bytearray(16)
    for name in fields:
        if name != without:
            ghcb_set_valid(bitmap, name)
    vm.write(GHCB_GPA, GHCB.build(**fields, valid_bitmap=bytes(bitmap), ghcb_usage=usage))
    vcpu.set_vmcb(ghcb_gpa=GHCB_GPA)
    console = vm.console_text()
    assert vmgexit.handle(vcpu) is None and vm.dead is None
    answer = GHCB.parse(vm.read(GHCB_GPA, GHCB.size))
    assert (answer.sw_exit_info_1, answer.sw_exit_info_2) == (2, reason)
    assert vm.ghcb_errors and vm.console_text() == console  # no I/O was done
    vm.destroy()


def test_a_hypercall_from_user_mode_gets_eperm(milan):
    from sevsim.api.vmsa import GHCB, ghcb_set_valid
    from sevsim.host.kvm import vmgexit

    vm = es_guest(milan)
    vm.run()
    bitmap = bytearray(16)
    fields = {"sw_exit_code": 0x81, "sw_exit_info_1": 0, "sw_exit_info_2": 0, "rax": 12}
    for name in (*fields, "cpl"):
        ghcb_set_valid(bitmap, name)
    vm.write(GHCB_GPA, GHCB.build(**fields, cpl=3, valid_bitmap=bytes(bitmap)))
    vm.vcpus[0].set_vmcb(ghcb_gpa=GHCB_GPA)
    calls = len(vm.hypercalls)
    vmgexit.handle(vm.vcpus[0])
    assert GHCB.parse(vm.read(GHCB_GPA, GHCB.size)).rax == -1 & (1 << 64) - 1  # -KVM_EPERM
    assert len(vm.hypercalls) == calls  # not made
    vm.destroy()
