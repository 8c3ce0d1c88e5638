"""The host's AMD IOMMU driver (Linux drivers/iommu/amd): device table, one protection
domain per device with "v1" I/O page tables, and the event log.

Host software: it builds the IOMMU's structures in its own memory through its direct map
(encrypted with the host key under SME) and hands the IOMMU their addresses *with the
C-bit*, as ``iommu_virt_to_phys`` does; it programs the IOMMU only through its MMIO
registers. A leaf it writes for an encrypted page carries the C-bit too, which is how a
device with 32 address lines reaches memory encrypted with the host key.

IOVAs are handed out top-down below the device's DMA limit (Linux's IOVA allocator), a
page at a time; ``unmap`` clears the leaves. MODEL: the IOMMU has no IOTLB, so no
INVALIDATE_IOMMU_PAGES command follows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from sevsim.host.kernel import HostKernel
from sevsim.soc import iommu as hw

DEV_TABLE_PAGES = 16  # 2048 DeviceIDs: buses 0..7
EVENT_LOG_LEN = 9  # 2**9 entries: 8 KiB, as Linux's EVT_BUFFER_SIZE
PAGE_MODE = 3  # three levels: 39-bit IOVAs, enough for any DMA mask the model has
PROT_READ, PROT_WRITE = 1, 2  # Linux's IOMMU_READ / IOMMU_WRITE


@dataclass
class IommuDomain:
    """A protection domain: one device's I/O address space."""

    domain_id: int
    device_id: int
    root_pa: int
    limit: int  # IOVAs stay below this (the device's DMA mask + 1)
    _next_iova: int = 0
    _free: list[int] = field(default_factory=list)
    tables: list[int] = field(default_factory=list)  # table pages (root included)


class AmdIommuDriver:
    def __init__(self, kernel: HostKernel) -> None:
        self.kernel = kernel
        self.iommu = kernel.core.machine.iommu
        self.me_mask = kernel.me_mask
        self.domains: dict[int, IommuDomain] = {}
        self.log: list[str] = []
        self._dev_table = kernel.alloc_pages(DEV_TABLE_PAGES)
        self._event_log = kernel.alloc_pages((hw.EVENT_SIZE << EVENT_LOG_LEN) // 4096)
        self._event_head = 0
        mmio = self.iommu.mmio_write
        mmio(hw.MMIO_DEV_TABLE_BASE, self._phys(self._dev_table) | (DEV_TABLE_PAGES - 1))
        mmio(hw.MMIO_EVENT_LOG_BASE, self._phys(self._event_log) | EVENT_LOG_LEN << 56)
        mmio(hw.MMIO_EVENT_HEAD, 0)
        mmio(hw.MMIO_CONTROL, hw.CONTROL_IOMMU_EN | hw.CONTROL_EVENT_LOG_EN)
        self._print("AMD-Vi: IOMMU enabled; device table, event log and page tables with the C-bit")

    def _phys(self, va: int) -> int:
        """iommu_virt_to_phys: the physical address with the SME mask."""
        return self.kernel.pa(va) | self.me_mask

    def _print(self, message: str) -> None:
        self.log.append(message)
        self.kernel.log.append(message)

    # ---- domains -------------------------------------------------------------------------
    def attach(self, device_id: int, dma_bits: int) -> IommuDomain:
        """A new domain for the device, with translation on (DTE V, TV, Mode 3, IR, IW)."""
        if device_id in self.domains:
            return self.domains[device_id]
        if device_id >= DEV_TABLE_PAGES * 4096 // hw.DTE_SIZE:
            raise ValueError(f"DeviceID {device_id:#x} is beyond the device table")
        root = self.kernel.alloc_pages(1)
        limit = min(1 << dma_bits, 1 << (12 + 9 * PAGE_MODE))
        domain = IommuDomain(len(self.domains) + 1, device_id, self.kernel.pa(root), limit)
        domain._next_iova = limit
        domain.tables.append(domain.root_pa)
        self.domains[device_id] = domain
        dte0 = (
            hw.DTE_V
            | hw.DTE_TV
            | PAGE_MODE << hw.DTE_MODE_SHIFT
            | (domain.root_pa | self.me_mask)
            | hw.DTE_IR
            | hw.DTE_IW
        )
        entry = hw.DTE.build(data0=dte0, domain_id=domain.domain_id)
        self.kernel.write(self._dev_table + device_id * hw.DTE_SIZE, entry)
        self._print(f"AMD-Vi: {hw.bdf(device_id)} attached to domain {domain.domain_id}")
        return domain

    def alloc_iova(self, domain: IommuDomain, npages: int) -> int:
        if npages == 1 and domain._free:
            return domain._free.pop()
        iova = domain._next_iova - npages * 4096
        if iova < 4096:
            raise MemoryError(f"{hw.bdf(domain.device_id)}: out of IOVA space")
        domain._next_iova = iova
        return iova

    def free_iova(self, domain: IommuDomain, iova: int, npages: int) -> None:
        domain._free.extend(range(iova, iova + npages * 4096, 4096))

    # ---- page tables -----------------------------------------------------------------------
    def map(self, domain: IommuDomain, iova: int, pa: int, size: int, prot: int) -> None:
        """Map [iova, iova+size) to [pa, pa+size) (4 KiB pages); ``pa`` carries the C-bit
        when the memory is encrypted."""
        perms = (hw.PTE_IR if prot & PROT_READ else 0) | (hw.PTE_IW if prot & PROT_WRITE else 0)
        for off in range(0, size, 4096):
            entry_va = self._leaf_entry(domain, iova + off, create=True)
            self.kernel.write(entry_va, struct.pack("<Q", (pa + off) | perms | hw.PTE_PR))

    def unmap(self, domain: IommuDomain, iova: int, size: int) -> None:
        for off in range(0, size, 4096):
            entry_va = self._leaf_entry(domain, iova + off, create=False)
            if entry_va is not None:
                self.kernel.write(entry_va, bytes(8))

    def _leaf_entry(self, domain: IommuDomain, iova: int, create: bool) -> int | None:
        """Direct-map address of the level-1 entry for iova, making tables as needed."""
        kernel = self.kernel
        table = domain.root_pa
        for level in range(PAGE_MODE, 1, -1):
            entry_va = kernel.va(table) + (iova >> (12 + 9 * (level - 1)) & 0x1FF) * 8
            (pde,) = struct.unpack("<Q", kernel.read(entry_va, 8))
            if pde & hw.PTE_PR:
                table = pde & hw.ADDR_MASK & ~self.me_mask
                continue
            if not create:
                return None
            child = kernel.pa(kernel.alloc_pages(1))
            domain.tables.append(child)
            pde = (
                (child | self.me_mask)
                | (level - 1) << hw.PTE_NEXT_SHIFT
                | hw.PTE_PR
                | hw.PTE_IR
                | hw.PTE_IW
            )
            kernel.write(entry_va, struct.pack("<Q", pde))
            table = child
        return kernel.va(table) + (iova >> 12 & 0x1FF) * 8

    # ---- events ------------------------------------------------------------------------------
    def poll_events(self) -> list[str]:
        """Read new entries from the event log (the driver's interrupt handler), print
        them as Linux does, and move the head."""
        tail = self.iommu.mmio_read(hw.MMIO_EVENT_TAIL)
        size = hw.EVENT_SIZE << EVENT_LOG_LEN
        messages = []
        while self._event_head != tail:
            raw = self.kernel.read(self._event_log + self._event_head, hw.EVENT_SIZE)
            messages.append(decode_event(raw))
            self._event_head = (self._event_head + hw.EVENT_SIZE) % size
        self.iommu.mmio_write(hw.MMIO_EVENT_HEAD, self._event_head)
        status = self.iommu.mmio_read(hw.MMIO_STATUS)
        if status & hw.STATUS_EVENT_OVERFLOW:
            messages.append("AMD-Vi: IOMMU event log overflow")
        self.iommu.mmio_write(hw.MMIO_STATUS, status)
        for message in messages:
            self._print(message)
        return messages


def decode_event(raw: bytes) -> str:
    """One event-log entry, in the words of Linux's iommu_print_event."""
    event = hw.EVENT.parse(raw)
    word0, word1, address = event.event0, event.event1, event.address
    code = word1 >> 28
    device = hw.bdf(word0 & 0xFFFF)
    if code != hw.EVENT_IO_PAGE_FAULT:
        return f"AMD-Vi: Event logged [UNKNOWN event[0]={word0:#010x} event[1]={word1:#010x}]"
    return (
        f"AMD-Vi: Event logged [IO_PAGE_FAULT device={device} domain={word1 & 0xFFFF:#06x} "
        f"address={address:#x} flags={word1 >> 16 & 0xFFF:#06x}]"
    )
