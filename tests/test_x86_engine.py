"""The vCPU executes real x86 code through the model's encrypted memory path.

The guest is the package's real-code firmware (src/sevsim/guest/x86): it boots from the
reset vector, detects SEV, builds its page tables and shares a page as Linux does. These
tests look at what it prints, what the hypervisor and DRAM hold, and how it dies."""

from __future__ import annotations

import re

import pytest

from sevsim.attacks.physical import ColdBootDump
from sevsim.guest import x86 as x86_guest
from sevsim.profiles import PROFILES
from sevsim.soc.svm import EXIT_INTR
from sevsim.system import HostSystem

SYM = x86_guest.symbols()
MARKER = b"sevsim secret:"


def boot(host: HostSystem, workload: str = "secret", sev: bool = True, name: str = "g", **options):
    vm = host.start_x86_guest(name, workload, sev=sev, **options)
    exits = vm.run(max_rounds=200)
    return vm, exits, vm.console_text()


def spin_until_preempted(vm) -> None:
    """Run the `spin` workload until the host's timer stops it inside its loop."""
    vcpu = vm.vcpus[0]
    for _ in range(2000):  # the boot's exits first: console bytes, fw_cfg, hypercalls
        exit_ = vcpu.run_once()
        if exit_.code == EXIT_INTR and "spinning" in vm.console_text():
            return
    raise AssertionError("the guest never spun")


def published_hash(console: str) -> bytes:
    m = re.search(r"secret at 0x200000, sha256 ([0-9a-f]{64})", console)
    assert m, console
    return bytes.fromhex(m.group(1))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_the_real_code_guest_boots_on_every_profile(profile, sev):
    with HostSystem.start(PROFILES[profile].with_(seed=7)) as host:
        vm, exits, console = boot(host, sev=sev)
        assert exits[0].reason == "DONE", (exits, console)
        assert "sevsim-guest: done" in console
        if sev:
            cbit = PROFILES[profile].cbit
            assert f"SEV active, C-bit {cbit}, SEV_STATUS 0x1" in console
        else:
            assert "SEV not active" in console
        vm.destroy()


def test_private_and_shared_pages_as_guest_hypervisor_and_dram_see_them():
    with HostSystem.start(PROFILES["milan"].with_(seed=3)) as host:
        vm, exits, console = boot(host)
        digest = published_hash(console)
        secret_gpa, shared_gpa = SYM["SECRET_GPA"], SYM["SHARED_GPA"]
        host.kernel.wbinvd_on_all_cpus()
        # The hypervisor's mapping of the private page: ciphertext, no marker.
        private = vm.read(secret_gpa, 64)
        assert MARKER not in private
        # The shared page: what the guest published, in the clear.
        shared = vm.read(shared_gpa, 56)
        assert shared[:13] == b"SEVSIM-SHARED"
        assert int.from_bytes(shared[16:24], "little") == secret_gpa
        assert shared[24:56] == digest
        # The guest told KVM, as Linux does (KVM_HC_MAP_GPA_RANGE, decrypted).
        assert (shared_gpa, 1) in vm.shared_ranges
        # DRAM: the marker nowhere; the published hash is there (shared, host key or clear).
        dump = ColdBootDump(host.machine)
        assert dump.find(MARKER) == []
        # The page tables were written with paging off: forced private, so ciphertext.
        pml4 = vm.read(SYM["PML4_GPA"], 8)
        assert int.from_bytes(pml4, "little") & 0xFFF_FFFF_F000 != SYM["PDPT_GPA"]


def test_an_ordinary_vm_keeps_everything_in_the_clear():
    with HostSystem.start(PROFILES["milan"].with_(seed=3)) as host:
        vm, exits, console = boot(host, sev=False)
        assert vm.read(SYM["SECRET_GPA"], len(MARKER)) == MARKER
        pml4 = int.from_bytes(vm.read(SYM["PML4_GPA"], 8), "little")
        assert pml4 & 0xFFF_FFFF_F000 == SYM["PDPT_GPA"] and pml4 & 1
        assert vm.shared_ranges == []  # no SEV: nothing to tell the hypervisor


def test_page_faults_and_general_protection_go_through_the_guest_idt():
    with HostSystem.start(PROFILES["rome"].with_(seed=1)) as host:
        vm, exits, console = boot(host, "pf gp")
        assert exits[0].reason == "DONE", console
        assert re.search(
            r"exception page-fault \(#14\) at rip=0x[0-9a-f]+ error=0x0 "
            r"cr2=0x100000000",
            console,
        ), console
        assert "exception general-protection (#13)" in console
        assert "pf ok" in console and "gp ok" in console


def test_self_modifying_code_runs_its_new_bytes():
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm, exits, console = boot(host, "selfmod")
        assert "sevsim-guest: selfmod 1 2" in console


def test_a_spinning_guest_is_preempted_and_stopped():
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("spinner", "spin")
        vm.spin_budget = 4
        exits = vm.run(max_rounds=50)
        assert exits[0].reason == "STUCK"
        assert exits[0].exit.code == EXIT_INTR
        assert "spinning" in vm.console_text()


def test_hypervisor_changes_to_code_are_fetched_at_the_next_vmrun():
    """An ordinary VM spins in `jmp .`; the hypervisor rewrites those bytes in guest memory
    between two VMRUNs: the next run executes the new instruction (no stale translation)."""
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("spinner", "spin", sev=False)
        vcpu = vm.vcpus[0]
        spin_until_preempted(vm)
        rip = vcpu.vmcb().rip  # linear = GPA here: long mode, identity map
        assert vm.read(rip, 2) == b"\xeb\xfe"
        vm.write(rip, b"\xf4")  # HLT
        exits = vm.run(max_rounds=50)
        assert exits[0].reason == "DONE"


def test_sev_ciphertext_rewritten_by_the_hypervisor_decodes_to_garbage():
    """The same in an SEV guest: the hypervisor cannot write code, only ciphertext; the
    guest fetches it fresh and it decodes to garbage — the guest crashes, it does not spin."""
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("spinner", "spin")
        vm.spin_budget = 20
        vcpu = vm.vcpus[0]
        spin_until_preempted(vm)
        rip = vcpu.vmcb().rip
        page = rip & ~0xFFF
        vm.write(page, bytes(range(256)) * 16)  # through the host's mapping: not the guest key
        exits = vm.run(max_rounds=50)
        # A crash, whichever the garbage makes it (the image's layout decides): a triple
        # fault, an access to a GPA with nothing behind it that KVM cannot emulate, or a
        # halt with interrupts off (a HLT among the garbage, or the guest's exception
        # handler, when the garbage leaves its page intact). Not a spin (STUCK).
        assert exits[0].reason in ("SHUTDOWN", "INTERNAL_ERROR", "DONE"), exits
        assert vm.console_text().endswith("sevsim-guest: spinning\n") or (
            "sevsim-guest: exception " in vm.console_text()
        )


def test_a_firmware_whose_idt_is_unusable_triple_faults():
    """A real-mode image: LIDT with limit 0, then UD2 — #UD cannot be delivered, nor #DF."""
    code = bytes.fromhex("2e0f011ef8ff0f0b") + bytes.fromhex("000000000000")
    image = b"\xf4" * (0x1_0000 - 16) + code.ljust(16, b"\xf4")
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        for sev in (False, True):
            vm = host.start_x86_guest(f"bad{sev}", sev=sev, firmware=image)
            exits = vm.run(max_rounds=10)
            assert exits[0].reason == "SHUTDOWN"
            assert "triple fault" in exits[0].detail
            vm.destroy()


def test_wrong_asid_decodes_garbage_and_shuts_down_without_leaking():
    with HostSystem.start(PROFILES["milan"].with_(seed=5)) as host:
        alpha, _, _ = boot(host, name="alpha")
        beta, _, _ = boot(host, name="beta")
        alpha.vcpus[0].asid, beta.vcpus[0].asid = beta.asid, alpha.asid
        for vm in (alpha, beta):
            vm.spin_budget = 20
            exits = vm.run(max_rounds=50)
            assert exits[0].reason == "SHUTDOWN", exits
            seen = bytes(vm.console) + str(exits[0].detail).encode()
            seen += b"".join(v.to_bytes(8, "little") for v in vm.vcpus[0].regs.values())
            assert MARKER not in seen


def test_firmware_images_must_be_64_kib_multiples():
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.kvm.create_vm(16 << 20)
        with pytest.raises(ValueError, match="multiple of 64 KiB"):
            vm.load_firmware(b"\x90" * 1000)
        vm.destroy()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_aliasing_lesson_with_real_code(profile):
    """Guest code flips a page's C-bit without flushing its dirty C=1 lines, writes new data
    through C=0, flushes it to DRAM and runs WBINVD: without HwEnforcedCacheCoh the stale
    lines land on top. With the flush first (Linux's order) nothing is lost anywhere."""
    with HostSystem.start(PROFILES[profile].with_(seed=2)) as host:
        vm, exits, console = boot(host, "alias alias-flush")
        lost = 0 if PROFILES[profile].sme_coherent else 64
        assert f"alias {lost} of 64 lines lost" in console, console
        assert "alias-flush 0 of 64 lines lost" in console, console


# ---- vm run --bios: any image, as QEMU's -bios ---------------------------------------------
def vm_run(args: list[str], tmp_path, capsys) -> tuple[int, str, str]:
    from sevsim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["vm", "run", "--state", str(tmp_path / "state"), "--memory", "32M", *args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def guest_image_file(tmp_path) -> str:
    path = tmp_path / "guest.fd"
    path.write_bytes(x86_guest.image())
    return str(path)


def test_vm_run_boots_any_firmware_image_in_sev_and_ordinary_vms(tmp_path, capsys):
    image = guest_image_file(tmp_path)
    work = "name=opt/sevsim/workload,string=secret gp"
    code, out, _ = vm_run(["--bios", image, "--fw-cfg", work], tmp_path, capsys)
    assert code == 0
    assert out.startswith("launch measurement: ")
    assert "SEV active" in out and "gp ok" in out and "sevsim-guest: done" in out
    code, out, _ = vm_run(["--bios", image, "--no-sev"], tmp_path, capsys)
    assert code == 0
    assert "launch measurement" not in out and "SEV not active" in out


def test_vm_run_refuses_an_image_of_another_size_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.fd"
    bad.write_bytes(b"\x90" * 70_000)
    code, out, err = vm_run(["--bios", str(bad)], tmp_path, capsys)
    assert code != 0
    assert "multiple of 64 KiB" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state" / "vm-console.log").exists()


def test_a_guest_that_dies_ends_vm_run_with_its_reason(tmp_path, capsys):
    code_ = bytes.fromhex("2e0f011ef8ff0f0b") + bytes(6)
    bad = tmp_path / "triple.fd"
    bad.write_bytes(b"\xf4" * (0x1_0000 - 16) + code_.ljust(16, b"\xf4"))
    code, out, _ = vm_run(["--bios", str(bad)], tmp_path, capsys)
    assert code == 1
    assert "vCPU stopped: SHUTDOWN" in out and "triple fault" in out
    log = (tmp_path / "state" / "vm-console.log").read_text()
    assert "sevsim: vCPU 0 stopped: SHUTDOWN" in log


# ---- the local APIC: MMIO emulation with decode assists, INIT/SIPI --------------------------
# A 64 KiB firmware (GNU as source below, linked at 0 and padded with zeros): the BSP goes to
# 32-bit protected mode, reads the APIC version register through MMIO, prints its 4 bytes on
# COM1, sends INIT and STARTUP (vector 0xFF) to APIC 1, and halts; the AP starts at
# FF00:0000 (0xFF000, the image's alias below 1 MiB), prints 'A' and halts.
#   ap_start (at 0xf000): mov $0x3f8,%dx; mov $'A',%al; out %al,%dx; cli; 1: hlt; jmp 1b
#   gdt (at 0xfe00): null, flat 32-bit code (0x08), flat data (0x10); start16: cli;
#   lgdtl %cs:gdt_desc; set CR0.PE; ljmpl $0x08,$start32; start32: load DS/SS;
#   mov 0xfee00030,%eax; out each byte of EAX to 0x3f8; movl $0x01000000,0xfee00310;
#   movl $0x4500,0xfee00300 (INIT); movl $0x46ff,0xfee00300 (STARTUP); cli; hlt
#   reset vector (at 0xfff0): jmp start16
APIC_PIECES = {
    0xF000: "baf803b041eefaf4ebfd",
    0xFE00: "0000000000000000ffff0000009bcf00ffff00000093cf00170000fefffffa2e660f011618fe0f20"
    "c00c010f22c066ea36feffff080066b810008ed88ed0a13000e0fe66baf803b904000000eec1e808e2fac7"
    "051003e0fe00000001c7050003e0fe00450000c7050003e0feff460000faf4ebfd",
    0xFFF0: "e92bfe",
}


def apic_image() -> bytes:
    return pieces_image(APIC_PIECES)


@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_the_local_apic_over_mmio_and_an_ap_started_by_init_sipi(sev):
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("apic", sev=sev, firmware=apic_image(), vcpus=2)
        assert vm.vcpus[1].parked  # an AP waits for STARTUP
        exits = vm.run(max_rounds=50)
        # 0x00050014: version 0x14, 6 LVT entries — read by KVM's MMIO emulation from the
        # instruction bytes the decode assists put in the VMCB (an SEV guest's code is
        # encrypted: KVM could not read it).
        assert bytes(vm.console) == bytes.fromhex("14000500") + b"A"
        assert [e.reason for e in exits] == ["DONE", "DONE"]
        npf = [gpa for gpa, _ in vm.vcpus[0].npfs if gpa >> 12 == 0xFEE00]
        assert 0xFEE00030 in npf and 0xFEE00300 in npf  # exact GPAs in EXITINFO2


def test_an_ap_without_a_startup_ipi_never_runs():
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("bsp-only", vcpus=2)
        exits = vm.run(max_rounds=200)
        assert exits[0].reason == "DONE" and exits[1].reason == "WAIT_SIPI"
        assert vm.vcpus[1].exits == 0


# Real mode: IVT[13] -> a handler that prints 'G'; then RDMSR of an MSR KVM does not know.
#   start: cli; xor %ax,%ax; mov %ax,%ds; mov %ax,%ss; mov $0x7000,%sp;
#   movw $handler,13*4; movw $0xf000,13*4+2; mov $0x12345678,%ecx; rdmsr;
#   mov $'X',%al; jmp out; handler: mov $'G',%al; out: mov $0x3f8,%dx; out %al,%dx; cli; hlt
GP_PIECES = {
    0xFF00: "fa31c08ed88ed0bc0070c706340022ffc706360000f066b9785634120f32b058eb02b047baf803ee"
    "faf4ebfd",
    0xFFF0: "e90dff",
}


def pieces_image(pieces: dict[int, str]) -> bytes:
    image = bytearray(0x1_0000)
    for offset, code in pieces.items():
        piece = bytes.fromhex(code)
        image[offset : offset + len(piece)] = piece
    return bytes(image)


@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_an_injected_gp_goes_through_the_real_mode_ivt(sev):
    """KVM answers an unknown MSR with #GP through EVENTINJ; the engine delivers it at the
    next VMRUN through the guest's interrupt vector table, read with the guest's key."""
    with HostSystem.start(PROFILES["rome"].with_(seed=1)) as host:
        vm = host.start_x86_guest("gp", sev=sev, firmware=pieces_image(GP_PIECES))
        exits = vm.run(max_rounds=20)
        assert exits[0].reason == "DONE" and bytes(vm.console) == b"G"


def test_query_status_shows_a_guest_that_died(tmp_path):
    from sevsim.host.vmm import VmConfig, Vmm

    firmware = tmp_path / "triple.fd"
    code = bytes.fromhex("2e0f011ef8ff0f0b") + bytes(6)
    firmware.write_bytes(b"\xf4" * (0x1_0000 - 16) + code.ljust(16, b"\xf4"))
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        config = VmConfig(firmware=firmware, memory=32 << 20, console=tmp_path / "console.log")
        vmm = Vmm(host, config)
        events = []
        vmm.on_event = lambda name, data: events.append(name)
        vmm.start()
        vmm.cont()
        assert vmm.wait_idle(timeout=30)
        assert vmm.status == "shutdown" and "SHUTDOWN" in events
        assert "triple fault" in (tmp_path / "console.log").read_text()
        vmm.quit()


def test_a_vmcb_that_intercepts_cr3_writes_gets_them_as_exits():
    """KVM does not intercept CR writes of an NPT guest; a hypervisor that does sees each
    MOV to CR3 as #VMEXIT(CR3_WRITE) with the source GPR in EXITINFO1 (decode assists)."""
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("cr", sev=False)
        vcpu = vm.vcpus[0]
        vcpu.set_vmcb(intercept_cr=1 << (16 + 3))
        for _ in range(200):
            exit_ = vcpu._vmrun()
            if exit_.code == 0x13:
                break
            vcpu._handle(exit_)
        assert exit_.code == 0x13 and exit_.info1 >> 63 and exit_.next_rip


def test_the_engines_frames_stay_bounded_and_the_data_survives():
    """mem:2 writes and reads 8 MiB (2,048 pages) twice; with room for 256 frames the
    engine starts over at VMRUNs, writing everything back — the checksum is still right."""
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("mem", "mem:2")
        engine = host.machine.x86_vcpu(vm.vcpus[0].vmcb_addr & ~host.machine.cbit_mask)
        engine.frames.max_frames = 256
        vm.spin_budget = 10_000
        assert vm.run(max_rounds=100)[0].reason == "DONE"
        n, rounds = (8 << 20) // 8, 2
        expected = (rounds * n * (n - 1) // 2 + n * rounds * (rounds - 1) // 2) % (1 << 64)
        assert f"sevsim-guest: mem {expected:x}" in vm.console_text()
        assert engine.frames.stats["shrinks"] > 0


# Real mode: write 'W' over a byte of its own image (ROM: dropped), print that byte ('R'),
# then read an address with nothing behind it (QEMU's unassigned memory: all ones).
ROM_PIECES = {
    0xFF00: "b800f08ed8c60680ff57a080ffbaf803ee66bbffffff00678a03eefaf4ebfd",
    0xFF80: "52",
    0xFFF0: "e90dff",
}


@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_the_firmware_is_rom_and_unassigned_memory_reads_all_ones(sev):
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        # 16 MiB of RAM: the byte read at 0xFFFFFF is the first with nothing behind it.
        vm = host.start_x86_guest(
            "rom", sev=sev, firmware=pieces_image(ROM_PIECES), memory=16 << 20
        )
        assert vm.run(max_rounds=20)[0].reason == "DONE"
        assert bytes(vm.console) == b"R\xff"


def test_the_cmos_holds_the_memory_sizes_qemu_stores_there():
    from sevsim.host.cmos import Cmos

    rtc = Cmos(below_4g=0xC000_0000, above_4g=1 << 30, cpus=4)

    def read(index: int) -> int:
        rtc.io_out(0x70, index, 1)
        return rtc.io_in(0x71, 1)

    assert read(0x15) | read(0x16) << 8 == 640  # KiB of base memory
    assert read(0x34) | read(0x35) << 8 == (0xC000_0000 - (16 << 20)) >> 16
    assert read(0x5B) | read(0x5C) << 8 | read(0x5D) << 16 == (1 << 30) >> 16
    assert read(0x5F) == 3 and read(0x0D) == 0x80
    seconds = read(0x00)
    assert seconds >> 4 < 6 and seconds & 0xF < 10  # BCD


def test_time_slice_stops_never_split_an_instruction():
    """A stop from another thread (the host's time slice) lands only where a translated
    block starts: an `inc [mem]` loop stopped and restarted hundreds of times counts
    exactly. (Unicorn 2.1.4 alone leaves RIP at an RMW instruction whose store is done,
    so about every stop would count twice.)"""
    import threading
    import time

    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X

    from sevsim.soc.x86.hidden import stop_only_between_blocks

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    stop_only_between_blocks(uc)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_map(0x10000, 0x1000)
    # 1: inc qword [rbx]; dec rcx; jnz 1b; hlt
    uc.mem_write(0x1000, bytes.fromhex("48ff0348ffc975f8f4"))
    end, n = 0x1008, 3_000_000
    uc.reg_write(X.UC_X86_REG_RBX, 0x10000)
    uc.reg_write(X.UC_X86_REG_RCX, n)
    running = True

    def time_slices():
        while running:
            time.sleep(0.0002)
            uc.emu_stop()

    threading.Thread(target=time_slices, daemon=True).start()
    rip, stops = 0x1000, 0
    try:
        while rip != end:
            uc.emu_start(rip, end)
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            stops += rip != end
    finally:
        running = False
    assert stops >= 20
    assert int.from_bytes(uc.mem_read(0x10000, 8), "little") == n
