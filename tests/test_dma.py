"""DMA on an SME host: the C-bit in the bus address, 32-bit devices, the IOMMU, bounce
buffers, and coherence with the CPU caches (hardware.md §6.1)."""

from __future__ import annotations

import struct

import pytest
from conftest import make_machine

from sevsim.host import HostKernel
from sevsim.host.dma import HostDma
from sevsim.host.iommu import AmdIommuDriver
from sevsim.soc.dma import BusMaster, DmaAbort
from sevsim.swiotlb import DmaDirection, SwiotlbFull

DATA = b"DMA payload: sector 42 of a disk, 64 bytes long, for the test...."[:64]
NIC, DISK32 = 0x0100, 0x0200  # DeviceIDs 0000:01:00.0 and 0000:02:00.0


def sme_host(name: str = "milan", cmdline: str = "mem_encrypt=on swiotlb=1024", **changes):
    machine = make_machine(name, **changes)
    kernel = HostKernel(machine.cores[0], cmdline=cmdline)
    kernel.boot()
    return machine, kernel


def dram(machine, pa: int, n: int) -> bytes:
    """What a physical attacker reads: DRAM after every dirty line went out."""
    machine.cache.wbinvd()
    return machine.dram.read(pa, n)


# ---- the C-bit in the bus address --------------------------------------------------------
def test_dma_with_the_c_bit_is_encrypted_with_the_host_key():
    machine, kernel = sme_host()
    va = kernel.alloc_pages(1)
    pa = kernel.pa(va)
    nic = BusMaster(machine, NIC, address_bits=64)
    nic.write(pa | kernel.me_mask, DATA)
    assert kernel.read(va, 64) == DATA  # the CPU, through its C=1 direct map
    stored = dram(machine, pa, 64)
    assert stored != DATA  # ciphertext in DRAM
    assert nic.read(pa | kernel.me_mask, 64) == DATA
    assert nic.read(pa, 64) == stored  # without the C-bit the device reads ciphertext


def test_dma_without_the_c_bit_is_plaintext():
    machine, kernel = sme_host()
    va = kernel.alloc_pages(1)
    pa = kernel.pa(va)
    nic = BusMaster(machine, NIC)
    nic.write(pa, DATA)
    assert dram(machine, pa, 64) == DATA  # plaintext for anyone with a probe
    assert kernel.read(va, 64) != DATA  # the kernel decrypts it with the host key: garbage
    kernel.write(va, DATA)
    assert nic.read(pa, 64) != DATA


def test_with_sme_disabled_by_the_bios_the_c_bit_is_just_an_address_bit():
    machine, kernel = sme_host(cmdline="mem_encrypt=off", smee=False)
    va = kernel.alloc_pages(1)
    kernel.write(va, DATA)
    nic = BusMaster(machine, NIC)
    assert nic.read(kernel.pa(va), 64) == DATA
    with pytest.raises(DmaAbort, match="master abort"):
        nic.read(kernel.pa(va) | machine.cbit_mask, 64)


# ---- 32-bit devices ----------------------------------------------------------------------
def test_a_32_bit_device_cannot_reach_encrypted_memory_by_itself():
    machine, kernel = sme_host()
    va = kernel.alloc_pages(1)
    pa = kernel.pa(va)
    assert pa < 1 << 32
    disk = BusMaster(machine, DISK32, address_bits=32)
    disk.write(pa | kernel.me_mask, DATA)  # the C-bit is on an address line it lacks
    assert dram(machine, pa, 64) == DATA  # it wrote plaintext
    assert kernel.read(va, 64) != DATA  # which the kernel reads as garbage


def test_the_dma_api_bounces_for_a_32_bit_device_without_an_iommu():
    machine, kernel = sme_host()
    dma = HostDma(kernel)
    disk = BusMaster(machine, DISK32, address_bits=32)
    dev = dma.probe(disk)
    assert dma.force_dma_unencrypted(dev)
    va = kernel.alloc_pages(1)
    kernel.write(va, DATA)
    out = dma.map_single(dev, va, 64, DmaDirection.TO_DEVICE)
    assert out.kind == "swiotlb" and dma.swiotlb.contains(out.dma_addr)
    assert out.dma_addr < 1 << 32
    assert disk.read(out.dma_addr, 64) == DATA  # the device gets the data...
    assert dram(machine, out.dma_addr, 64) == DATA  # ...as plaintext in the shared pool
    dma.unmap_single(out)
    into = dma.map_single(dev, va, 64, DmaDirection.FROM_DEVICE)
    disk.write(into.dma_addr, DATA[::-1])
    dma.unmap_single(into)
    assert kernel.read(va, 64) == DATA[::-1]  # copied back into the encrypted buffer
    assert dma.swiotlb.used == 0
    assert any("software IO TLB" in line for line in kernel.log)


def test_a_64_bit_device_gets_a_direct_c_bit_address():
    machine, kernel = sme_host()
    dma = HostDma(kernel)
    nic = BusMaster(machine, NIC)
    dev = dma.probe(nic)
    assert not dma.force_dma_unencrypted(dev)
    va = kernel.alloc_pages(1)
    m = dma.map_single(dev, va, 64, DmaDirection.FROM_DEVICE)
    assert m.kind == "direct" and m.dma_addr == kernel.pa(va) | kernel.me_mask
    nic.write(m.dma_addr, DATA)
    dma.unmap_single(m)
    assert kernel.read(va, 64) == DATA
    assert dram(machine, kernel.pa(va), 64) != DATA


def test_with_the_iommu_a_32_bit_device_reaches_encrypted_memory():
    machine, kernel = sme_host()
    dma = HostDma(kernel, AmdIommuDriver(kernel))
    disk = BusMaster(machine, DISK32, address_bits=32)
    dev = dma.probe(disk)
    va = kernel.alloc_pages(2)
    pa = kernel.pa(va)
    kernel.write(va, DATA)
    m = dma.map_single(dev, va, 8192, DmaDirection.BIDIRECTIONAL)
    assert m.kind == "iommu" and m.dma_addr < 1 << 32 and m.dma_addr != pa
    assert disk.read(m.dma_addr, 64) == DATA
    disk.write(m.dma_addr + 4096 - 32, DATA)  # across the page boundary
    assert kernel.read(va + 4096 - 32, 64) == DATA
    assert dram(machine, pa, 64) != DATA  # nothing in plaintext: it stayed encrypted
    # The IOMMU's own structures are encrypted with the host key too.
    (dte0,) = struct.unpack("<Q", kernel.read(dma.iommu._dev_table + DISK32 * 32, 8))
    assert dte0 & kernel.me_mask
    assert dram(machine, kernel.pa(dma.iommu._dev_table) + DISK32 * 32, 8) != dte0.to_bytes(
        8, "little"
    )
    dma.unmap_single(m)
    with pytest.raises(DmaAbort, match="IO_PAGE_FAULT"):
        disk.read(m.dma_addr, 64)  # gone with the mapping


# ---- IOMMU faults ------------------------------------------------------------------------
def _event(kernel, driver, index: int) -> tuple[int, int, int, int]:
    raw = kernel.read(driver._event_log + 16 * index, 16)
    word0, word1, address = struct.unpack("<IIQ", raw)
    return word0 & 0xFFFF, word1 >> 28, word1 >> 16 & 0xFFF, address


def test_iommu_faults_are_logged_and_nothing_moves():
    machine, kernel = sme_host()
    driver = AmdIommuDriver(kernel)
    dma = HostDma(kernel, driver)
    disk = BusMaster(machine, DISK32, address_bits=32)
    dev = dma.probe(disk)
    va = kernel.alloc_pages(1)
    kernel.write(va, DATA)
    m = dma.map_single(dev, va, 64, DmaDirection.TO_DEVICE)  # the device may only read
    with pytest.raises(DmaAbort, match="read-only"):
        disk.write(m.dma_addr, b"\xff" * 64)
    assert kernel.read(va, 64) == DATA  # not a silent write
    unmapped = 0x1234_5000
    with pytest.raises(DmaAbort, match="not mapped"):
        disk.read(unmapped, 16)
    # The event log, decoded here from the specification's layout.
    assert _event(kernel, driver, 0) == (DISK32, 0x2, 0x010 | 0x020, m.dma_addr)  # PR, RW
    assert _event(kernel, driver, 1) == (DISK32, 0x2, 0x000, unmapped)
    messages = driver.poll_events()
    assert messages == [
        f"AMD-Vi: Event logged [IO_PAGE_FAULT device=0000:02:00.0 domain=0x0001 "
        f"address={m.dma_addr:#x} flags=0x0030]",
        "AMD-Vi: Event logged [IO_PAGE_FAULT device=0000:02:00.0 domain=0x0001 "
        "address=0x12345000 flags=0x0000]",
    ]
    assert driver.poll_events() == []  # the head moved on
    assert messages[0] in kernel.log


def test_a_device_without_a_domain_is_passed_through():
    machine, kernel = sme_host()
    AmdIommuDriver(kernel)
    other = BusMaster(machine, 0x0300)  # no driver attached it
    va = kernel.alloc_pages(1)
    kernel.write(va, DATA)
    assert other.read(kernel.pa(va) | kernel.me_mask, 64) == DATA


# ---- bounce pool -------------------------------------------------------------------------
def test_an_exhausted_bounce_pool_refuses_and_keeps_what_it_has():
    machine, kernel = sme_host(cmdline="mem_encrypt=on swiotlb=128")  # one segment: 256 KiB
    dma = HostDma(kernel)
    dev = dma.probe(BusMaster(machine, DISK32, address_bits=32))
    va = kernel.alloc_pages(64)
    kernel.write(va, DATA)
    first = dma.map_single(dev, va, 128 * 1024, DmaDirection.TO_DEVICE)
    with pytest.raises(SwiotlbFull, match=r"swiotlb buffer is full \(sz: 262144 bytes\), "):
        dma.map_single(dev, va, 256 * 1024, DmaDirection.TO_DEVICE)
    assert dev.master.read(first.dma_addr, 64) == DATA  # the live mapping is untouched
    dma.unmap_single(first)
    second = dma.map_single(dev, va, 256 * 1024, DmaDirection.TO_DEVICE)
    assert dev.master.read(second.dma_addr, 64) == DATA


# ---- coherence ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["naples", "milan"])
def test_dma_is_coherent_with_the_cpu_caches(name):
    machine, kernel = sme_host(name)
    nic = BusMaster(machine, NIC)
    va = kernel.alloc_pages(1)
    pa = kernel.pa(va)
    kernel.write(va, DATA)  # a dirty line, not yet in DRAM
    assert any(dirty for _, dirty in machine.cache.resident(pa))
    assert nic.read(pa | kernel.me_mask, 64) == DATA  # the read snooped it
    assert kernel.read(va, 64) == DATA  # a clean copy stays cached
    nic.write(pa | kernel.me_mask, DATA[::-1])
    assert machine.cache.resident(pa) == []  # the write invalidated it
    assert kernel.read(va, 64) == DATA[::-1]
