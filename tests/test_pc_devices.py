"""The devices of QEMU's pc machine that firmware probes (sevsim.host.pc): PCI
configuration space with the i440FX, PIIX3 and PIIX4 PM functions, the ACPI PM timer,
QEMU's CPU-hotplug registers, the 16550's probe registers and the local APIC timer with its
interrupts. Expected values are QEMU's and Intel's documented ones, and timer readings are
computed here from the rates, not taken from the devices."""

from __future__ import annotations

import pytest

from sevsim.host import lapic, pc
from sevsim.host.acpi_pm import AcpiPm
from sevsim.host.cpuhp import CpuHotplug
from sevsim.host.kvm import COM1, SerialPort
from sevsim.profiles import PROFILES
from sevsim.system import HostSystem

MiB = 1 << 20


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def board(ram: int = 256 * MiB, cpus: int = 1) -> tuple[pc.PcBoard, dict]:
    ports: dict = {}
    return pc.attach(ports, ram, cpus), ports


def io_in(ports: dict, port: int, size: int) -> int:
    device = ports.get(port)
    return device.io_in(port, size) if device else (1 << 8 * size) - 1


def io_out(ports: dict, port: int, value: int, size: int) -> None:
    if port in ports:
        ports[port].io_out(port, value, size)


def config_read(ports: dict, dev: int, fn: int, offset: int, size: int) -> int:
    """What OVMF's PciCf8Lib does: the dword address to 0xCF8, then 0xCFC + offset % 4."""
    io_out(ports, 0xCF8, 0x8000_0000 | dev << 11 | fn << 8 | offset & 0xFC, 4)
    return io_in(ports, 0xCFC + (offset & 3), size)


def config_write(ports: dict, dev: int, fn: int, offset: int, value: int, size: int) -> None:
    io_out(ports, 0xCF8, 0x8000_0000 | dev << 11 | fn << 8 | offset & 0xFC, 4)
    io_out(ports, 0xCFC + (offset & 3), value, size)


# ---- PCI configuration space -----------------------------------------------------------------
def test_the_functions_on_bus_0_have_qemus_ids():
    _, ports = board()
    # (vendor, device, class code, revision, header type), QEMU hw/pci-host/i440fx.c,
    # hw/isa/piix.c, hw/acpi/piix4.c
    expected = {
        (0, 0): (0x8086, 0x1237, 0x060000, 0x02, 0x00),
        (1, 0): (0x8086, 0x7000, 0x060100, 0x00, 0x80),
        (1, 3): (0x8086, 0x7113, 0x068000, 0x03, 0x00),
    }
    for (dev, fn), (vendor, device, class_code, revision, header) in expected.items():
        assert config_read(ports, dev, fn, 0x00, 4) == device << 16 | vendor
        assert config_read(ports, dev, fn, 0x08, 4) == class_code << 8 | revision
        assert config_read(ports, dev, fn, 0x0E, 1) == header
        assert config_read(ports, dev, fn, 0x2C, 4) == 0x1100 << 16 | 0x1AF4  # QEMU subsystem


def test_an_empty_slot_a_disabled_address_and_another_bus_read_all_ones():
    _, ports = board()
    assert config_read(ports, 2, 0, 0x00, 4) == 0xFFFF_FFFF
    assert config_read(ports, 1, 1, 0x00, 2) == 0xFFFF  # no IDE function here
    io_out(ports, 0xCF8, 0x0000_0000, 4)  # enable bit clear
    assert io_in(ports, 0xCFC, 4) == 0xFFFF_FFFF
    io_out(ports, 0xCF8, 0x8001_0000, 4)  # bus 1: no bridge leads there
    assert io_in(ports, 0xCFC, 4) == 0xFFFF_FFFF
    io_out(ports, 0xCF8, 0x8000_0004, 4)
    assert io_in(ports, 0xCF8, 4) == 0x8000_0004  # CONFIG_ADDRESS reads back


def test_word_and_byte_accesses_pick_their_part_of_the_dword():
    _, ports = board()
    assert config_read(ports, 0, 0, 0x02, 2) == 0x1237
    assert config_read(ports, 0, 0, 0x03, 1) == 0x12
    assert config_read(ports, 0, 0, 0x01, 1) == 0x80


def test_only_writable_bits_change():
    _, ports = board()
    config_write(ports, 0, 0, 0x00, 0xFFFF_FFFF, 4)  # IDs are read-only
    assert config_read(ports, 0, 0, 0x00, 4) == 0x1237_8086
    # Command: IO, memory, bus master, SERR, INTx disable (QEMU's pci_init_wmask)
    config_write(ports, 0, 0, 0x04, 0xFFFF, 2)
    assert config_read(ports, 0, 0, 0x04, 2) == 0x0001 | 0x0002 | 0x0004 | 0x0100 | 0x0400
    config_write(ports, 0, 0, 0x3C, 0x0B, 1)  # interrupt line
    assert config_read(ports, 0, 0, 0x3C, 1) == 0x0B


def test_the_pm_functions_status_error_bits_are_write_one_to_clear():
    b, ports = board()
    b.pm_function.config[0x07] |= 0x80  # as if it had detected a parity error
    assert config_read(ports, 1, 3, 0x06, 2) == 0x8280
    config_write(ports, 1, 3, 0x06, 0x8000, 2)
    assert config_read(ports, 1, 3, 0x06, 2) == 0x0280  # DEVSEL and fast b2b stay


def test_the_i440fx_has_qemus_smram_and_ram_size_registers():
    b, ports = board(ram=512 * MiB)
    assert config_read(ports, 0, 0, 0x72, 1) == 0x02  # SMRAM: C_BASE_SEG
    assert config_read(ports, 0, 0, 0x57, 1) == 512 // 8  # RAM in 8 MiB units
    assert board(ram=4096 * MiB)[0].host_bridge.config[0x57] == 255
    config_write(ports, 0, 0, 0x59, 0x30, 1)  # PAM0: what software writes stays
    assert config_read(ports, 0, 0, 0x59, 1) == 0x30


def test_the_piix3_pirq_routing_starts_unrouted():
    b, ports = board()
    assert [config_read(ports, 1, 0, 0x60 + i, 1) for i in range(4)] == [0x80] * 4
    assert b.isa_bridge.pirq_route(0) is None
    config_write(ports, 1, 0, 0x60, 0x0B0B_0A0A, 4)  # PIRQA, B to IRQ 10; C, D to IRQ 11
    assert [b.isa_bridge.pirq_route(i) for i in range(4)] == [10, 10, 11, 11]


# ---- the PIIX4 PM function and the ACPI PM registers ------------------------------------------
def test_the_pm_block_appears_where_ovmf_puts_it_and_only_when_enabled():
    b, ports = board()
    assert config_read(ports, 1, 3, 0x40, 4) == 0x01  # PMBA: an I/O base, not set
    assert config_read(ports, 1, 3, 0x80, 1) == 0x00  # PMIOSE clear
    # OVMF's PlatformMiscInitialization: PMBA = 0xB000, then the command's IO bit, PMIOSE
    pmba = config_read(ports, 1, 3, 0x40, 4)
    config_write(ports, 1, 3, 0x40, pmba & ~0xFFC0 | 0xB000, 4)
    assert 0xB008 not in ports  # not decoded before PMIOSE
    config_write(ports, 1, 3, 0x04, config_read(ports, 1, 3, 0x04, 1) | 1, 1)
    config_write(ports, 1, 3, 0x80, config_read(ports, 1, 3, 0x80, 1) | 1, 1)
    assert ports[0xB008] is b.pm and ports[0xB000 + 63] is b.pm and 0xB040 not in ports
    config_write(ports, 1, 3, 0x40, 0x0601, 4)  # moved: the old ports are gone
    assert 0xB008 not in ports and ports[0x608] is b.pm
    config_write(ports, 1, 3, 0x80, 0, 1)  # PMIOSE off: nothing decodes
    assert not any(device is b.pm for device in ports.values())


def test_the_smbus_and_smm_registers_hold_qemus_values():
    _, ports = board()
    assert config_read(ports, 1, 3, 0x90, 4) == 0xB101  # SMBBA: 0xB100, I/O
    assert config_read(ports, 1, 3, 0xD2, 1) == 0x09
    assert config_read(ports, 1, 3, 0x5B, 1) == 0x02  # SMM "already initialised"
    assert config_read(ports, 1, 3, 0x3D, 1) == 1  # INTA#


@pytest.mark.parametrize("seconds", [0.0, 0.001, 1.0, 2.5, 10.0])
def test_the_pm_timer_counts_at_3_579545_mhz_in_24_bits(seconds):
    now = [1_000_000_000]  # ns; the timer counts from the VM's start
    pm = AcpiPm(clock_ns=lambda: now[0])
    pm.base = 0xB000
    now[0] += int(seconds * 1e9)
    expected = int(seconds * 1e9) * 3579545 // 10**9 % (1 << 24)
    assert pm.io_in(0xB008, 4) == expected
    assert pm.io_in(0xB008, 4) < 1 << 24


def test_the_pm_timer_can_be_32_bits_wide():
    now = [0]
    pm = AcpiPm(clock_ns=lambda: now[0], bits=32)
    now[0] = 10 * 10**9
    assert pm.io_in(0x8, 4) == 35_795_450  # above 2**24


def test_tmr_sts_is_set_when_bit_23_flips_and_cleared_by_writing_one():
    now = [0]
    pm = AcpiPm(clock_ns=lambda: now[0])
    assert pm.io_in(0x0, 2) & 1 == 0
    now[0] = (1 << 23) * 10**9 // 3579545 + 1000  # just past 2**23 ticks (2.34 s)
    assert pm.io_in(0x0, 2) & 1 == 1
    pm.io_out(0x0, 1, 2)
    assert pm.io_in(0x0, 2) & 1 == 0


def test_pm1_cnt_keeps_sci_en_and_reports_a_sleep_request():
    pm = AcpiPm()
    pm.io_out(0x4, 0x0001, 2)  # SCI_EN (OVMF's PciAcpiInitialization)
    assert pm.io_in(0x4, 2) == 0x0001 and pm.sleep_request is None
    pm.io_out(0x4, 0x0001 | 0 << 10 | 1 << 13, 2)  # SLP_TYP 0 (QEMU's S5) with SLP_EN
    assert pm.sleep_request == 0
    assert pm.io_in(0x4, 2) & 1 << 13 == 0  # SLP_EN reads as zero
    pm.io_out(0x2, 0x0120, 2)
    assert pm.io_in(0x2, 2) == 0x0120  # PM1_EN


# ---- QEMU's CPU hotplug registers -------------------------------------------------------------
def ovmf_counts_cpus(hp: CpuHotplug) -> tuple[int, int, int]:
    """OVMF's PlatformMaxCpuCountInitialization, step by step."""
    base = 0xAF00
    hp.io_out(base, 0, 4)  # switch to modern, select CPU 0
    hp.io_out(base, 0, 4)
    hp.io_out(base + 5, 0, 1)  # CPHP_GET_NEXT_CPU_WITH_EVENT
    data2 = hp.io_in(base, 4)
    present = possible = 0
    hp.io_out(base, possible, 4)
    while True:
        if hp.io_in(base + 4, 1) & 1:
            present += 1
        possible += 1
        hp.io_out(base, possible, 4)
        if hp.io_in(base + 8, 4) == 0:
            return data2, present, possible


@pytest.mark.parametrize("cpus", [1, 4])
def test_ovmf_counts_the_cpus_through_the_modern_interface(cpus):
    assert ovmf_counts_cpus(CpuHotplug(cpus)) == (0, cpus, cpus)


def test_the_legacy_interface_is_a_bitmap_of_present_cpus_until_switched():
    hp = CpuHotplug(3)
    assert hp.io_in(0xAF00, 1) == 0b111 and hp.io_in(0xAF01, 1) == 0
    hp.io_out(0xAF00, 5, 4)  # not 0: stays legacy
    assert hp.io_in(0xAF00, 1) == 0b111
    hp.io_out(0xAF00, 0, 4)
    assert hp.modern and hp.io_in(0xAF00, 4) == 0  # command data 2
    assert hp.io_in(0xAF0C, 1) == 0xFF  # beyond the 12 modern bytes
    hp.io_out(0xAF00, 7, 4)  # no such CPU: every register reads 0
    assert hp.io_in(0xAF04, 1) == 0 and hp.io_in(0xAF08, 4) == 0


# ---- the serial port's probe registers ------------------------------------------------------
def test_the_uart_passes_the_scratch_and_divisor_probes_and_prints_only_data():
    sink = bytearray()
    uart = SerialPort(sink)
    for value in (0xAA, 0x55):  # PciSioSerialDxe's SerialPresent
        uart.io_out(COM1 + 7, value, 1)
        assert uart.io_in(COM1 + 7, 1) == value
    uart.io_out(COM1 + 3, 0x80, 1)  # DLAB: the divisor latch, 115200 baud
    uart.io_out(COM1, 0x01, 1)
    uart.io_out(COM1 + 1, 0x00, 1)
    assert uart.io_in(COM1, 1) == 0x01
    uart.io_out(COM1 + 3, 0x03, 1)  # 8N1
    uart.io_out(COM1, ord("x"), 1)
    assert bytes(sink) == b"x"  # the divisor did not reach the console
    assert uart.io_in(COM1 + 5, 1) & 0x60 == 0x60 and uart.io_in(COM1 + 2, 1) & 1


# ---- the local APIC timer --------------------------------------------------------------------
def apic(clock: Clock) -> lapic.LocalApic:
    a = lapic.LocalApic(0, lambda *_: None, clock=clock)
    a.write(lapic.SVR, 0x1FF)
    return a


@pytest.mark.parametrize(
    ("code", "divisor"),
    [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)],
)
def test_the_divide_configuration_follows_the_sdm_table(code, divisor):
    clock = Clock()
    a = apic(clock)
    a.write(lapic.TIMER_DIVIDE, code)
    a.write(lapic.TIMER_INITIAL, 1_000_000)
    clock.now += 0.0001  # 100 us of a 1 GHz bus clock: 100,000 cycles
    assert a.read(lapic.TIMER_CURRENT) == 1_000_000 - 100_000 // divisor


def test_a_periodic_timer_requests_its_vector_each_period_and_eoi_ends_it():
    clock = Clock()
    a = apic(clock)
    a.write(lapic.TIMER_DIVIDE, 0xB)
    a.write(lapic.LVT_TIMER, lapic.TIMER_PERIODIC | 0x30)
    a.write(lapic.TIMER_INITIAL, 1_000_000)  # 1 ms
    clock.now += 0.0005
    assert a.pending() is None and a.read(lapic.TIMER_CURRENT) == 500_000
    clock.now += 0.0006
    assert a.pending() == 0x30
    assert a.read(lapic.IRR + 0x10) == 1 << 16  # vector 0x30: IRR bits 63:32, bit 16
    a.acknowledge(0x30)
    assert a.read(lapic.ISR + 0x10) == 1 << 16 and a.read(lapic.PPR) == 0x30
    clock.now += 0.001
    assert a.pending() is None  # requested again, but the same class is in service
    a.write(lapic.EOI, 0)
    assert a.read(lapic.ISR + 0x10) == 0 and a.pending() == 0x30
    assert a.next_expiry() == pytest.approx(0.003)


def test_a_one_shot_timer_fires_once_and_a_masked_one_never():
    clock = Clock()
    a = apic(clock)
    a.write(lapic.TIMER_DIVIDE, 0xB)
    a.write(lapic.LVT_TIMER, 0x40)
    a.write(lapic.TIMER_INITIAL, 1000)
    clock.now += 0.001
    assert a.pending() == 0x40 and a.read(lapic.TIMER_CURRENT) == 0
    a.acknowledge(0x40)
    a.write(lapic.EOI, 0)
    clock.now += 0.01
    assert a.pending() is None and a.next_expiry() is None
    a.write(lapic.LVT_TIMER, lapic.LVT_MASKED | lapic.TIMER_PERIODIC | 0x40)
    a.write(lapic.TIMER_INITIAL, 1000)
    clock.now += 0.01
    assert a.pending() is None and a.next_expiry() is None


def test_the_tpr_holds_back_lower_classes():
    clock = Clock()
    a = apic(clock)
    a.write(lapic.TIMER_DIVIDE, 0xB)
    a.write(lapic.LVT_TIMER, 0x35)
    a.write(lapic.TIMER_INITIAL, 10)
    a.write(lapic.TPR, 0x30)
    clock.now += 0.001
    assert a.pending() is None
    a.write(lapic.TPR, 0x20)
    assert a.pending() == 0x35


# A 64 KiB firmware (GNU as source, assembled with `as --32` and linked at 0): 32-bit flat
# protected mode; IDT[0x30] -> handler; SVR 0x1FF, timer divide by 1, LVT periodic vector
# 0x30, initial count 1,000,000 (1 ms); `1: sti; hlt; cmpl $3, 0x2000; jb 1b`, then mask
# the timer, print 'T' and `cli; hlt`. The handler: `incl 0x2000`, print 'i', EOI, iret.
#   start16 (0xF000): cli; lgdtl %cs:gdt_desc; CR0.PE; ljmpl $0x08, $start32
#   gdt (0xF0C0): null, flat code 0x08, flat data 0x10; idt_desc: limit 0x187, base 0x1000
#   reset vector (0xFFF0): jmp start16
TIMER_PIECES = {
    0xF000: "fa2e660f0116d8f00f20c00c010f22c066ea18f0ffff080066b810008ed88ec08ed0bc0070000"
    "0c7050020000000000000b8a4f0ffff66a38011000066c70582110000080066c70584110000008ec1e810"
    "66a3861100000f011ddef0ffffc705f000e0feff010000c705e003e0fe0b000000c7052003e0fe300002"
    "00c7058003e0fe40420f00fbf4833d002000000372f5fac7052003e0fe0000010066baf803b054eef4ff"
    "0500200000505266baf803b069eec705b000e0fe000000005a58cf0000000000000000ffff0000009bcf"
    "00ffff00000093cf001700c0f0ffff87010010",
    0xFFF0: "e90df0",
}


@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_the_apic_timer_interrupts_a_halted_guest_through_its_idt(sev):
    image = bytearray(0x1_0000)
    for offset, code in TIMER_PIECES.items():
        image[offset : offset + len(bytes.fromhex(code))] = bytes.fromhex(code)
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("timer", sev=sev, firmware=bytes(image))
        exits = vm.run(max_rounds=5000)
        assert exits[0].reason == "DONE", (exits, bytes(vm.console))
        # Three interrupts, each handled by the guest's own handler (read through its IDT
        # with its key), each ended with an EOI; then the loop saw the count.
        assert bytes(vm.console) == b"iiiT"
        apic_ = vm.vcpus[0].apic
        assert apic_.isr == 0 and apic_.regs[lapic.LVT_TIMER] & lapic.LVT_MASKED


# Real mode: `mov $0x4100, %ax; mov $0x80, %dx; in %dx, %al; mov %ah, %al;` print AL on
# COM1; `cli; hlt`. Port 0x80 has no device: AL reads 0xFF, and AH must still be 'A'.
IN_AL_PIECES = {0xFF00: "b80041ba8000ec88e0baf803eefaf4", 0xFFF0: "e90dff"}


@pytest.mark.parametrize("sev", [True, False], ids=["sev", "plain"])
def test_in_al_replaces_only_al(sev):
    image = bytearray(0x1_0000)
    for offset, code in IN_AL_PIECES.items():
        image[offset : offset + len(bytes.fromhex(code))] = bytes.fromhex(code)
    with HostSystem.start(PROFILES["milan"].with_(seed=1)) as host:
        vm = host.start_x86_guest("in-al", sev=sev, firmware=bytes(image))
        assert vm.run(max_rounds=20)[0].reason == "DONE"
        assert bytes(vm.console) == b"A"
