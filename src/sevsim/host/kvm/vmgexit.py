"""KVM's side of VMGEXIT for SEV-ES guests (Linux arch/x86/kvm/svm/sev.c:
``sev_handle_vmgexit``, ``sev_handle_vmgexit_msr_protocol``, ``sev_es_validate_vmgexit``).

An SEV-ES guest's registers are encrypted, so it shows the hypervisor what a request needs
itself, and VMGEXIT exits with the guest's GHCB MSR in the VMCB (hardware.md §8.1-8.3):

* **MSR protocol** (the MSR's low 12 bits are a request code): SEV information, one CPUID
  register, hypervisor features, termination. The answer goes back in the same MSR, which
  the hardware loads from the VMCB at the next VMRUN; an unknown request is left as it is.
* **GHCB page** (the MSR holds a page-aligned GPA): the guest's shared page, read through
  the host's mapping. KVM reads only the fields whose valid bits are set, refuses a request
  that is not standard usage, misses a field it needs or names something it cannot do
  (sw_exit_info_1 = 2, malformed input, with the GHCB specification's reason in
  sw_exit_info_2), and writes back the answer's registers with their valid bits. An MMIO
  request names a data buffer that must lie inside the GHCB's shared buffer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sevsim.api.vmsa import (
    GHCB,
    GHCB_MSR_CPUID_REQ,
    GHCB_MSR_CPUID_RESP,
    GHCB_MSR_HV_FT_REQ,
    GHCB_MSR_HV_FT_RESP,
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_SEV_INFO_REQ,
    GHCB_MSR_TERM_REQ,
    GHCB_SHARED_BUFFER,
    GHCB_SHARED_BUFFER_SIZE,
    GHCB_SIZE,
    GHCB_USAGE_STANDARD,
    GHCB_VALID_BITMAP,
    SVM_VMGEXIT_MMIO_READ,
    SVM_VMGEXIT_MMIO_WRITE,
    SVM_VMGEXIT_TERM_REQUEST,
    ghcb_is_valid,
    ghcb_set_valid,
    sev_info_response,
)
from sevsim.host.kvm.uapi import RunExit
from sevsim.soc.svm import EXIT_CPUID, EXIT_IOIO, EXIT_MSR, EXIT_VMMCALL, GP_EVENT, exit_name

if TYPE_CHECKING:
    from sevsim.host.kvm.svm import Vcpu

# sw_exit_info_1 bits 31:0 in the answer (GHCB specification §4.1.3)
GHCB_HV_RESP_NO_ACTION = 0
GHCB_HV_RESP_ISSUE_EXCEPTION = 1  # sw_exit_info_2 holds the event to inject
GHCB_HV_RESP_MALFORMED_INPUT = 2
# sw_exit_info_2 reasons with a malformed-input answer (Linux sev-common.h GHCB_ERR_*)
GHCB_ERR_NOT_REGISTERED = 1
GHCB_ERR_INVALID_USAGE = 2
GHCB_ERR_INVALID_SCRATCH_AREA = 3
GHCB_ERR_MISSING_INPUT = 4
GHCB_ERR_INVALID_INPUT = 5
GHCB_ERR_INVALID_EVENT = 6
KVM_EPERM = 1  # a hypercall from CPL > 0 gets -KVM_EPERM

# The fields each request needs (sev_es_validate_vmgexit).
REQUIRED = {
    EXIT_CPUID: ("rax", "rcx"),
    EXIT_IOIO: ("sw_exit_info_1",),
    EXIT_MSR: ("rcx",),
    EXIT_VMMCALL: ("rax", "cpl"),
    SVM_VMGEXIT_MMIO_READ: ("sw_exit_info_1", "sw_exit_info_2", "sw_scratch"),
    SVM_VMGEXIT_MMIO_WRITE: ("sw_exit_info_1", "sw_exit_info_2", "sw_scratch"),
    SVM_VMGEXIT_TERM_REQUEST: (),
}
IOIO_TYPE_IN, IOIO_STR, IOIO_REP = 1 << 0, 1 << 2, 1 << 3
IOIO_SIZES = (1 << 4, 1 << 5, 1 << 6)  # SZ8, SZ16, SZ32: exactly one is set
SAVE_AREA_END = GHCB_VALID_BITMAP + 16  # the save-area image and its valid bitmap
VERSION_START = GHCB.field("protocol_version").offset


def handle(vcpu: Vcpu) -> RunExit | None:
    """A VMGEXIT: answer it and go back in (None), or end the VM (its RunExit)."""
    vcpu.vm.vmgexits += 1
    msr = vcpu._vmcb_field("ghcb_gpa")
    if msr & GHCB_MSR_INFO_MASK:
        return _msr_protocol(vcpu, msr)
    return _ghcb_page(vcpu, msr)


def _die(vcpu: Vcpu, reason: str, detail: str) -> RunExit:
    vcpu.vm.dead = RunExit(reason, detail)
    return vcpu.vm.dead


def _msr_protocol(vcpu: Vcpu, msr: int) -> RunExit | None:
    code = msr & GHCB_MSR_INFO_MASK
    if code == GHCB_MSR_SEV_INFO_REQ:
        answer = sev_info_response(vcpu.vm.kvm.cbit)
    elif code == GHCB_MSR_CPUID_REQ:
        function, register = msr >> 32, msr >> 30 & 3
        value = vcpu.cpuid(function, 0)[register]
        answer = value << 32 | register << 30 | GHCB_MSR_CPUID_RESP  # the register echoed
    elif code == GHCB_MSR_HV_FT_REQ:
        answer = GHCB_MSR_HV_FT_RESP  # no SNP features
    elif code == GHCB_MSR_TERM_REQ:
        reason_set, reason = msr >> 12 & 0xF, msr >> 16 & 0xFF
        return _die(
            vcpu,
            "SYSTEM_EVENT",
            f"SEV-ES termination request: reason set {reason_set}, code {reason:#x}",
        )
    else:
        # sev_handle_vmgexit_msr_protocol: an unknown request is left unanswered, the MSR as
        # the guest wrote it.
        vcpu.vm.ghcb_errors.append(f"GHCB MSR protocol: unknown request {code:#x}")
        return None
    vcpu.set_vmcb(ghcb_gpa=answer)
    return None


def _ghcb_page(vcpu: Vcpu, gpa: int) -> RunExit | None:
    vm = vcpu.vm
    if not gpa or vm.slot_of(gpa, GHCB_SIZE) is None:
        return _die(vcpu, "INTERNAL_ERROR", f"vmgexit: GHCB GPA {gpa:#x} is not guest memory")
    # The save area with its valid bitmap, the shared buffer and the version fields, each
    # read as KVM's mapping of the page would touch them (not the whole page).
    answer = bytearray(GHCB_SIZE)
    answer[:SAVE_AREA_END] = vm.read(gpa, SAVE_AREA_END)
    answer[VERSION_START:] = vm.read(gpa + VERSION_START, GHCB_SIZE - VERSION_START)
    ghcb = GHCB.parse(bytes(answer))
    valid = ghcb.valid_bitmap

    def given(name: str) -> int:
        return getattr(ghcb, name) if ghcb_is_valid(valid, name) else 0

    bitmap = bytearray(16)

    def reply(**values: int) -> None:
        for name, value in values.items():
            f = GHCB.field(name)
            answer[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
            ghcb_set_valid(bitmap, name)

    def refuse(reason: int, why: str) -> None:
        reply(sw_exit_info_1=GHCB_HV_RESP_MALFORMED_INPUT, sw_exit_info_2=reason)
        vm.ghcb_errors.append(why)

    code = given("sw_exit_code")
    needed = REQUIRED.get(code)
    info1 = given("sw_exit_info_1")
    basics = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
    if ghcb.ghcb_usage != GHCB_USAGE_STANDARD:
        refuse(GHCB_ERR_INVALID_USAGE, f"GHCB usage {ghcb.ghcb_usage} is not the standard one")
    elif not all(ghcb_is_valid(valid, name) for name in basics):
        refuse(GHCB_ERR_MISSING_INPUT, "the exit code and information are not all valid")
    elif needed is None:
        refuse(GHCB_ERR_INVALID_EVENT, f"exit code {code:#x} is not supported")
    elif not all(ghcb_is_valid(valid, name) for name in needed):
        missing = [n for n in needed if not ghcb_is_valid(valid, n)]
        refuse(GHCB_ERR_MISSING_INPUT, f"{exit_name(code)}: missing {', '.join(missing)}")
    elif code == EXIT_CPUID:
        eax, ebx, ecx, edx = vcpu.cpuid(given("rax") & 0xFFFF_FFFF, given("rcx") & 0xFFFF_FFFF)
        reply(rax=eax, rbx=ebx, rcx=ecx, rdx=edx, sw_exit_info_1=GHCB_HV_RESP_NO_ACTION)
    elif code == EXIT_IOIO:
        if info1 & (IOIO_STR | IOIO_REP):
            refuse(GHCB_ERR_INVALID_INPUT, "IOIO: string I/O is not supported")
        elif sum(bool(info1 & bit) for bit in IOIO_SIZES) != 1:
            refuse(GHCB_ERR_INVALID_INPUT, f"IOIO: EXITINFO1 {info1:#x} names no single size")
        elif not info1 & IOIO_TYPE_IN and not ghcb_is_valid(valid, "rax"):
            refuse(GHCB_ERR_MISSING_INPUT, "IOIO: OUT without rax")
        else:
            rax = vcpu.port_io(info1, given("rax"))
            reply(sw_exit_info_1=GHCB_HV_RESP_NO_ACTION)
            if info1 & IOIO_TYPE_IN:
                reply(rax=rax)
    elif (
        code == EXIT_MSR
        and info1 & 1
        and not (ghcb_is_valid(valid, "rax") and ghcb_is_valid(valid, "rdx"))
    ):
        refuse(GHCB_ERR_MISSING_INPUT, "MSR: WRMSR without rax and rdx")
    elif code == EXIT_MSR:
        index = given("rcx") & 0xFFFF_FFFF
        write = bool(info1 & 1)
        value = (given("rdx") & 0xFFFF_FFFF) << 32 | given("rax") & 0xFFFF_FFFF
        result = vcpu.emulate_msr(index, value if write else None)
        if result is None:
            # svm_complete_emulated_msr: the guest is told to raise #GP itself.
            reply(sw_exit_info_1=GHCB_HV_RESP_ISSUE_EXCEPTION, sw_exit_info_2=GP_EVENT)
        elif write:
            reply(sw_exit_info_1=GHCB_HV_RESP_NO_ACTION)
        else:
            reply(rax=result & 0xFFFF_FFFF, rdx=result >> 32, sw_exit_info_1=0)
    elif code == EXIT_VMMCALL:
        if given("cpl") & 3:  # kvm_emulate_hypercall: only the guest's kernel may call
            rax = -KVM_EPERM & (1 << 64) - 1
        else:
            rax = vcpu.hypercall(
                given("rax"), tuple(given(r) for r in ("rbx", "rcx", "rdx", "rsi"))
            )
        reply(rax=rax, sw_exit_info_1=GHCB_HV_RESP_NO_ACTION)
    elif code in (SVM_VMGEXIT_MMIO_READ, SVM_VMGEXIT_MMIO_WRITE):
        problem = _mmio(vcpu, gpa, ghcb, code == SVM_VMGEXIT_MMIO_WRITE)
        if problem:
            refuse(*problem)
        else:
            reply(sw_exit_info_1=GHCB_HV_RESP_NO_ACTION)
    else:  # SVM_VMGEXIT_TERM_REQUEST
        return _die(vcpu, "SYSTEM_EVENT", "SEV-ES termination request (GHCB)")
    f = GHCB.field("valid_bitmap")
    answer[f.offset : f.offset + f.size] = bytes(bitmap)
    vm.write(gpa, bytes(answer[:SAVE_AREA_END]))  # the answer's registers and bitmap
    return None


def _mmio(vcpu: Vcpu, ghcb_gpa: int, ghcb, write: bool) -> tuple[int, str] | None:
    """An MMIO read or write the guest emulates for itself: GPA in sw_exit_info_1, length in
    sw_exit_info_2, the data in the GHCB's shared buffer at sw_scratch."""
    target, length, scratch = ghcb.sw_exit_info_1, ghcb.sw_exit_info_2, ghcb.sw_scratch
    start = ghcb_gpa + GHCB_SHARED_BUFFER
    if length not in (1, 2, 4, 8):
        return GHCB_ERR_INVALID_INPUT, f"MMIO: length {length} is not 1, 2, 4 or 8"
    if not start <= scratch <= start + GHCB_SHARED_BUFFER_SIZE - length:
        return (
            GHCB_ERR_INVALID_SCRATCH_AREA,
            f"MMIO: scratch area {scratch:#x} is outside the GHCB's shared buffer",
        )
    device, base = vcpu.mmio_device(target)
    if write:
        value = int.from_bytes(vcpu.vm.read(scratch, length), "little")
        device.write(target - base, value)
    else:
        value = device.read(target - base) & ((1 << 8 * length) - 1)
        vcpu.vm.write(scratch, value.to_bytes(length, "little"))
    return None
