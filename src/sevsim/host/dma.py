"""The host kernel's DMA API under SME (Linux kernel/dma/direct.c, drivers/iommu/dma-iommu.c,
arch/x86/mm/mem_encrypt.c; hardware.md §6.1).

``map_single`` gives a device the bus address of a kernel buffer, in one of three ways:

* **IOMMU**: the device is attached to a protection domain; the buffer's pages are mapped
  at an IOVA below the device's DMA limit, with the C-bit in the leaves. Works for any
  device, the 32-bit ones included.
* **direct**: no IOMMU; the bus address is the physical address with the C-bit
  (``phys_to_dma`` applies the SME mask), so the data is encrypted with the host key on
  its way to DRAM. Only for devices whose DMA mask reaches the C-bit.
* **swiotlb**: no IOMMU and a device whose DMA mask cannot express the C-bit
  (``force_dma_unencrypted``): the data is bounced through a decrypted pool, and the
  device sees plaintext. This is what Linux turns on automatically under SME.

``alloc_coherent`` is the same choice for buffers shared with a device for a long time:
decrypted pages for a device that cannot express the C-bit, encrypted ones otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevsim.host.iommu import PROT_READ, PROT_WRITE, AmdIommuDriver, IommuDomain
from sevsim.host.kernel import HostKernel, cmdline_option
from sevsim.soc.dma import BusMaster
from sevsim.swiotlb import (
    IO_TLB_DEFAULT_SIZE,
    IO_TLB_SIZE,
    Bounce,
    DmaDirection,
    Swiotlb,
    nslabs_option,
)

PAGE = 4096


@dataclass
class Device:
    """The kernel's struct device for a PCI function that does DMA."""

    master: BusMaster
    dma_bits: int  # the DMA mask the driver set (dma_set_mask_and_coherent)
    domain: IommuDomain | None = None

    @property
    def name(self) -> str:
        return self.master.name

    @property
    def dma_mask(self) -> int:
        return (1 << self.dma_bits) - 1


@dataclass
class DmaMapping:
    device: Device
    dma_addr: int
    size: int
    direction: DmaDirection
    kind: str  # "iommu", "direct" or "swiotlb"
    va: int
    bounce: Bounce | None = None


class HostDma:
    def __init__(self, kernel: HostKernel, iommu: AmdIommuDriver | None = None) -> None:
        self.kernel = kernel
        self.iommu = iommu
        self.me_mask = kernel.me_mask
        self._swiotlb: Swiotlb | None = None

    # ---- devices ------------------------------------------------------------------------
    def probe(self, master: BusMaster, dma_bits: int | None = None) -> Device:
        """A driver takes the device and sets its DMA mask (its address lines by default);
        with an IOMMU, the device gets its own domain."""
        bits = master.address_bits if dma_bits is None else dma_bits
        device = Device(master, bits)
        if self.iommu is not None:
            device.domain = self.iommu.attach(master.device_id, bits)
        return device

    def force_dma_unencrypted(self, device: Device) -> bool:
        """Linux's x86 force_dma_unencrypted on an SME host: the device's mask stops below
        the C-bit."""
        if not self.me_mask:
            return False
        return device.dma_mask <= self.me_mask - 1  # DMA_BIT_MASK(C-bit position)

    @property
    def swiotlb(self) -> Swiotlb:
        """The bounce pool: ``swiotlb=<slots>`` on the command line or 64 MiB, decrypted."""
        if self._swiotlb is None:
            option = cmdline_option(self.kernel.cmdline, "swiotlb")
            nslabs = nslabs_option(option) if option else IO_TLB_DEFAULT_SIZE // IO_TLB_SIZE
            npages = nslabs * IO_TLB_SIZE // PAGE
            va = self.kernel.alloc_pages(npages, zero=False)
            pa = self.kernel.pa(va)
            if pa + npages * PAGE > 1 << 32:
                raise MemoryError("no room for the swiotlb pool below 4 GiB")
            self.kernel.set_memory_decrypted(va, npages)
            self._swiotlb = Swiotlb(pa, va, nslabs, self.kernel.copy)
            self.kernel.log.append(
                f"software IO TLB: mapped [mem {pa:#018x}-{pa + npages * PAGE - 1:#018x}] "
                f"({npages * PAGE >> 20}MB)"
            )
        return self._swiotlb

    # ---- streaming mappings --------------------------------------------------------------------
    def map_single(self, device: Device, va: int, size: int, direction: DmaDirection) -> DmaMapping:
        pa = self.kernel.pa(va)
        if device.domain is not None:
            assert self.iommu is not None
            first, last = pa & ~(PAGE - 1), (pa + size + PAGE - 1) & ~(PAGE - 1)
            iova = self.iommu.alloc_iova(device.domain, (last - first) // PAGE)
            self.iommu.map(
                device.domain, iova, first | self.me_mask, last - first, _prot(direction)
            )
            return DmaMapping(device, iova + (pa - first), size, direction, "iommu", va)
        dma_addr = pa | self.me_mask
        if dma_addr + size - 1 <= device.dma_mask:
            return DmaMapping(device, dma_addr, size, direction, "direct", va)
        bounce = self.swiotlb.map(va, size, direction)  # dma_capable() failed: bounce
        return DmaMapping(device, bounce.tlb_pa, size, direction, "swiotlb", va, bounce)

    def unmap_single(self, mapping: DmaMapping) -> None:
        if mapping.kind == "iommu":
            assert self.iommu is not None and mapping.device.domain is not None
            first = mapping.dma_addr & ~(PAGE - 1)
            npages = (mapping.dma_addr + mapping.size + PAGE - 1 - first) // PAGE
            self.iommu.unmap(mapping.device.domain, first, npages * PAGE)
            self.iommu.free_iova(mapping.device.domain, first, npages)
        elif mapping.kind == "swiotlb":
            assert mapping.bounce is not None
            self.swiotlb.unmap(mapping.bounce)

    # ---- coherent buffers -----------------------------------------------------------------------
    def alloc_coherent(self, device: Device, size: int) -> tuple[int, int]:
        """dma_alloc_coherent: (kernel address, bus address) of zeroed pages."""
        npages = -(-size // PAGE)
        va = self.kernel.alloc_pages(npages, zero=False)
        pa = self.kernel.pa(va)
        if device.domain is not None:
            assert self.iommu is not None
            iova = self.iommu.alloc_iova(device.domain, npages)
            self.iommu.map(device.domain, iova, pa | self.me_mask, npages * PAGE, 3)
            dma_addr = iova
        elif self.force_dma_unencrypted(device):
            if pa + npages * PAGE - 1 > device.dma_mask:
                raise MemoryError(f"{device.name}: no memory below its DMA limit")
            self.kernel.set_memory_decrypted(va, npages)
            dma_addr = pa
        else:
            dma_addr = pa | self.me_mask
        self.kernel.write(va, bytes(npages * PAGE))
        return va, dma_addr


def _prot(direction: DmaDirection) -> int:
    """What the device may do with a streaming mapping (Linux's dma_info_to_prot)."""
    return {
        DmaDirection.TO_DEVICE: PROT_READ,
        DmaDirection.FROM_DEVICE: PROT_WRITE,
        DmaDirection.BIDIRECTIONAL: PROT_READ | PROT_WRITE,
    }[direction]
