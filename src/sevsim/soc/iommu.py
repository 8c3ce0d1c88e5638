"""The AMD IOMMU: per-device translation of DMA addresses (hardware.md §6.1).

Host software programs it through MMIO registers (``mmio_write``) with the physical
addresses of its in-memory structures; Linux gives every one of them *with the C-bit*
(``iommu_virt_to_phys`` applies the SME mask), so the IOMMU reads its device table and
page tables, and writes its event log, through the host key whenever they carry it.

Structures, in the layout of the AMD I/O Virtualization Technology specification (as
Linux's drivers/iommu/amd/amd_iommu_types.h spells it):

* **Device table**: 32 bytes per DeviceID (the PCI bus/device/function). Bit 0 V, bit 1
  TV, bits 11:9 Mode (page-table levels, 0 = no translation), bits 51:12 the page-table
  root, bit 61 IR, bit 62 IW; the domain ID in bits 15:0 of the second quadword.
* **I/O page tables** ("v1" format): 8-byte entries, bit 0 PR, bits 11:9 NextLevel
  (0 = this entry maps a page of its level's size), bits 51:12 the address — where the
  C-bit sits too, so a PTE can point a 32-bit device at encrypted memory — bit 61 IR, bit
  62 IW. Permissions are the AND of every level's and the device table entry's.
* **Event log**: a ring of 16-byte entries. An IO_PAGE_FAULT (event code 2) holds the
  DeviceID, the domain ID, flags (PR: the page was present; RW: a write; I: interrupt
  request; TR: translation request) and the faulting address.

A DMA that faults is logged and *aborted*: nothing is read or written. A device whose
entry is not valid (V=0), or with Mode 0, is passed through untranslated.

MODEL: no IOTLB (a translation is walked on every access, so a forgotten invalidation
goes unnoticed), no command buffer, no interrupt remapping; NextLevel 7 (page sizes
encoded in the address) and level skipping are refused as page faults. With the IOMMU
disabled (CONTROL.IommuEn clear) every device is passed through.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sevsim.api.layout import Layout

if TYPE_CHECKING:
    from sevsim.soc.machine import Machine

# MMIO register offsets and bits
MMIO_DEV_TABLE_BASE = 0x0000  # bits 51:12 base, bits 8:0 size in 4 KiB pages minus 1
MMIO_EVENT_LOG_BASE = 0x0010  # bits 51:12 base, bits 59:56 log2(entries)
MMIO_CONTROL = 0x0018
MMIO_EVENT_HEAD = 0x2010  # byte offsets into the log
MMIO_EVENT_TAIL = 0x2018
MMIO_STATUS = 0x2020
CONTROL_IOMMU_EN = 1 << 0
CONTROL_EVENT_LOG_EN = 1 << 2
STATUS_EVENT_OVERFLOW = 1 << 0
STATUS_EVENT_LOG_INT = 1 << 1
EVENT_LEN_SHIFT = 56

# Device table entry (Linux: struct dev_table_entry, u64 data[4])
DTE = Layout(
    "DTE",
    32,
    "AMD IOMMU spec (48882), Device Table Entry Format; hardware.md §6.1",
    (0x00, "Q", "data0"),  # V, TV, Mode, the page-table root, IR, IW (the DTE_* bits)
    (0x08, "H", "domain_id"),  # data[1] bits 15:0
)
DTE_SIZE = DTE.size
DTE_V = 1 << 0
DTE_TV = 1 << 1
DTE_MODE_SHIFT = 9
DTE_IR = 1 << 61
DTE_IW = 1 << 62

# I/O page-table entries
PTE_PR = 1 << 0
PTE_NEXT_SHIFT = 9
PTE_IR = 1 << 61
PTE_IW = 1 << 62
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12, C-bit included

# Event log
EVENT_SIZE = 16
EVENT_IO_PAGE_FAULT = 0x2
EVENT_FLAG_I = 0x008
EVENT_FLAG_PR = 0x010
EVENT_FLAG_RW = 0x020
EVENT_FLAG_TR = 0x100
EVENT = Layout(
    "EVENT",
    EVENT_SIZE,
    "AMD IOMMU spec (48882), IO_PAGE_FAULT Event; Linux iommu_print_event",
    (0x0, "I", "event0"),  # bits 15:0 DeviceID
    (0x4, "I", "event1"),  # bits 15:0 DomainID, 27:16 flags, 31:28 the event code
    (0x8, "Q", "address"),
)


def bdf(device_id: int) -> str:
    """A DeviceID as Linux prints it: segment:bus:device.function."""
    return f"0000:{device_id >> 8:02x}:{device_id >> 3 & 0x1F:02x}.{device_id & 7}"


class IommuFault(Exception):
    """The IOMMU refused a DMA (it logged an IO_PAGE_FAULT event, if its log is on)."""

    def __init__(self, device_id: int, address: int, write: bool, reason: str) -> None:
        super().__init__(
            f"IO_PAGE_FAULT device={bdf(device_id)} address={address:#x} "
            f"({'write' if write else 'read'}): {reason}"
        )
        self.device_id, self.address, self.write, self.reason = device_id, address, write, reason


@dataclass(frozen=True)
class Translation:
    spa: int  # system-physical address of the first byte, with the C-bit if the PTE has it
    length: int  # bytes up to the end of the page it lies in


class Iommu:
    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._regs = {
            MMIO_DEV_TABLE_BASE: 0,
            MMIO_EVENT_LOG_BASE: 0,
            MMIO_CONTROL: 0,
            MMIO_EVENT_HEAD: 0,
            MMIO_EVENT_TAIL: 0,
            MMIO_STATUS: 0,
        }
        self.faults = 0  # every fault, logged or not

    # ---- MMIO ----------------------------------------------------------------------------
    def mmio_read(self, offset: int) -> int:
        if offset not in self._regs:
            raise ValueError(f"no IOMMU register at MMIO offset {offset:#x}")
        return self._regs[offset]

    def mmio_write(self, offset: int, value: int) -> None:
        if offset not in self._regs:
            raise ValueError(f"no IOMMU register at MMIO offset {offset:#x}")
        if offset == MMIO_STATUS:
            self._regs[offset] &= ~value  # write 1 to clear
        elif offset == MMIO_EVENT_TAIL:
            pass  # the hardware owns the tail
        else:
            self._regs[offset] = value

    @property
    def enabled(self) -> bool:
        return bool(self._regs[MMIO_CONTROL] & CONTROL_IOMMU_EN)

    # ---- memory, as the IOMMU reaches it: the fabric, the host key where the C-bit says ---
    def _read_u64s(self, addr: int, count: int) -> tuple[int, ...]:
        raw = self._fabric_read(addr, 8 * count)
        return struct.unpack(f"<{count}Q", raw)

    def _fabric_read(self, addr: int, n: int) -> bytes:
        m = self._machine
        slot = m.memctl.key_slot(bool(addr & m.cbit_mask), 0)
        return m.fabric.read(addr & ~m.cbit_mask, n, slot)

    def _fabric_write(self, addr: int, data: bytes) -> None:
        m = self._machine
        slot = m.memctl.key_slot(bool(addr & m.cbit_mask), 0)
        m.fabric.write(addr & ~m.cbit_mask, data, slot)

    # ---- translation ---------------------------------------------------------------------
    def translate(
        self, device_id: int, address: int, write: bool, walk: dict[int, int] | None = None
    ) -> Translation | None:
        """Where a DMA by ``device_id`` to ``address`` goes: None to pass it through
        untranslated, else the SPA of the page it hits. Raises IommuFault.

        ``walk`` (a dict the caller keeps for the pages of one DMA transfer) remembers the
        device table entry and the non-leaf entries read for the transfer's earlier pages:
        one transfer is one turn on the silicon, so they cannot change in between, and a
        multi-page transfer reads them once instead of once per page."""
        if not self.enabled:
            return None
        base_reg = self._regs[MMIO_DEV_TABLE_BASE]
        entries = ((base_reg & 0x1FF) + 1) * 4096 // DTE_SIZE
        if device_id >= entries:
            return None  # MODEL: outside the table, treated as an invalid entry
        dte_pa = (base_reg & ADDR_MASK) + device_id * DTE_SIZE
        raw = None if walk is None else walk.get(-1)
        if raw is None:
            raw = self._fabric_read(dte_pa, DTE_SIZE)
            if walk is not None:
                walk[-1] = raw
        dte = DTE.parse(raw)
        dte0 = dte.data0
        if not dte0 & DTE_V or not dte0 & DTE_TV:
            return None
        domain = dte.domain_id
        readable, writable = bool(dte0 & DTE_IR), bool(dte0 & DTE_IW)
        mode = dte0 >> DTE_MODE_SHIFT & 7
        if mode == 0:
            if not (writable if write else readable):
                self._fault(device_id, domain, address, write, True, "access not permitted")
            return None
        if mode > 6 or address >> (12 + 9 * mode):
            self._fault(device_id, domain, address, write, False, "address beyond the domain")
        table = dte0 & ADDR_MASK
        for level in range(mode, 0, -1):
            shift = 12 + 9 * (level - 1)
            entry_pa = table + (address >> shift & 0x1FF) * 8
            pte = None if walk is None or level == 1 else walk.get(entry_pa)
            if pte is None:
                (pte,) = self._read_u64s(entry_pa, 1)
                if walk is not None and level > 1:
                    walk[entry_pa] = pte
            if not pte & PTE_PR:
                self._fault(device_id, domain, address, write, False, "not mapped")
            readable &= bool(pte & PTE_IR)
            writable &= bool(pte & PTE_IW)
            next_level = pte >> PTE_NEXT_SHIFT & 7
            if next_level == 0:
                if not (writable if write else readable):
                    why = "page is read-only" if write and readable else "access not permitted"
                    self._fault(device_id, domain, address, write, True, why)
                size = 1 << shift
                offset = address & (size - 1)
                return Translation((pte & ADDR_MASK & ~(size - 1)) + offset, size - offset)
            if next_level != level - 1:
                self._fault(device_id, domain, address, write, True, "unsupported table layout")
            table = pte & ADDR_MASK
        raise AssertionError("unreachable: a level-1 entry is always a leaf")

    def _fault(
        self, device_id: int, domain: int, address: int, write: bool, present: bool, reason: str
    ) -> None:
        self.faults += 1
        flags = (EVENT_FLAG_PR if present else 0) | (EVENT_FLAG_RW if write else 0)
        self._log_event(
            EVENT.build(
                event0=device_id,
                event1=domain | flags << 16 | EVENT_IO_PAGE_FAULT << 28,
                address=address & (2**64 - 1),
            )
        )
        raise IommuFault(device_id, address, write, reason)

    def _log_event(self, event: bytes) -> None:
        regs = self._regs
        if not regs[MMIO_CONTROL] & CONTROL_EVENT_LOG_EN:
            return
        base = regs[MMIO_EVENT_LOG_BASE]
        size = EVENT_SIZE << (base >> EVENT_LEN_SHIFT & 0xF)
        tail = regs[MMIO_EVENT_TAIL]
        if (tail + EVENT_SIZE) % size == regs[MMIO_EVENT_HEAD] % size:
            regs[MMIO_STATUS] |= STATUS_EVENT_OVERFLOW  # full: the event is lost
            return
        self._fabric_write((base & ADDR_MASK) + tail, event)
        regs[MMIO_EVENT_TAIL] = (tail + EVENT_SIZE) % size
        regs[MMIO_STATUS] |= STATUS_EVENT_LOG_INT
