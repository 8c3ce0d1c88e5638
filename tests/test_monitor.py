"""QEMU's human monitor on a real-code guest: what the hypervisor sees of its registers
and memory."""

from __future__ import annotations

import re

import pytest

from sevsim.guest import x86 as x86_guest
from sevsim.host.monitor import Monitor, MonitorError
from sevsim.profiles import PROFILES
from sevsim.system import HostSystem

SYM = x86_guest.symbols()
NODBG = 0x1


@pytest.fixture(scope="module")
def host():
    with HostSystem.start(PROFILES["milan"].with_(seed=11)) as system:
        yield system


def booted(host, name, sev=True, policy=NODBG):
    vm = host.start_x86_guest(name, "secret", sev=sev, policy=policy)
    assert vm.run()[0].reason == "DONE"
    return vm, Monitor(vm)


def test_info_registers_shows_the_vmcb_and_kvm_s_registers(host):
    vm, mon = booted(host, "regs")
    text = mon.execute("info registers")
    v = vm.vcpus[0].vmcb()
    assert f"RIP={v.rip:016x}" in text
    assert f"CR3={v.cr3:016x}" in text and v.cr3 >> 51 & 1  # the guest's C-bit, in the clear
    assert "CS =0018 0000000000000000 ffffffff 00a09b00" in text  # 64-bit code segment
    assert "EFER=0000000000001d00" in text  # LME, LMA, NXE, and SVME (KVM sets it)
    vm.destroy()


def test_a_nodbg_sev_guest_shows_ciphertext_and_no_page_walk(host):
    vm, mon = booted(host, "nodbg")
    raw = mon.execute(f"xp /16c {SYM['SECRET_GPA']:#x}")
    assert "s e v s i m" not in raw
    assert "Cannot access memory" in mon.execute(f"x /2xg {SYM['SECRET_GPA']:#x}")
    vm.destroy()


def test_a_debuggable_sev_guest_is_decrypted_by_the_firmware(host):
    vm, mon = booted(host, "dbg", policy=0)
    assert "s e v s i m   s" in mon.execute(f"x /8c {SYM['SECRET_GPA']:#x}")
    vm.destroy()


def test_an_ordinary_vm_shows_everything(host):
    vm, mon = booted(host, "plain", sev=False)
    assert "s e v s i m   s" in mon.execute(f"xp /8c {SYM['SECRET_GPA']:#x}")
    line = mon.execute(f"x /2xg {SYM['SHARED_GPA']:#x}")
    assert line.startswith(f"{SYM['SHARED_GPA']:016x}: 0x")
    assert "movabs $0x123456789ABCDEF,%rax" in mon.execute(f"x /2i {SYM['alu_loop']:#x}")
    assert mon.execute("info mem").startswith("0000000000000000-0000000100000000 ")
    vm.destroy()


def test_watching_a_guest_boot(host):
    """Step through the boot: the registers change, private memory stays ciphertext."""
    vm = host.start_x86_guest("watch", "secret", policy=NODBG)
    mon = Monitor(vm)
    vcpu = vm.vcpus[0]
    rips, modes = set(), set()
    while "secret at" not in vm.console_text():
        vcpu.run_once()
        text = mon.execute("info registers")
        rips.add(re.search(r"RIP=([0-9a-f]+)", text).group(1))
        modes.add(re.search(r"CR0=([0-9a-f]+)", text).group(1))
        assert "s e v s i m" not in mon.execute(f"xp /16c {SYM['SECRET_GPA']:#x}")
    assert len(rips) > 10 and {"00000011", "80010011"} <= modes  # protected, then paging
    vm.destroy()


def test_bad_monitor_commands_are_one_line(host):
    vm, mon = booted(host, "bad")
    for line in ("x /4q 0x1000", "info nothing", "frobnicate", "x /4xg nowhere"):
        with pytest.raises(MonitorError):
            mon.execute(line)
    vm.destroy()
