"""Bus masters: devices that read and write memory by DMA (hardware.md §6).

A device drives as many address lines as it has (``address_bits``): a 32-bit device that
is handed a wider address simply loses the upper bits, the C-bit among them. The address
it emits goes to the IOMMU, which may translate it (an IOVA) to a system-physical address
per page; otherwise it *is* the system-physical address.

The memory controller then treats it as it treats the host's own accesses: C-bit set →
the host key, clear → no key (the TSME key under TSME). A DMA never carries an ASID, so no
device can use a guest's key: what it writes into a guest's private page decrypts to
garbage in the guest, and what it reads from one is ciphertext to it.

DMA is cache-coherent as on x86 (through the fabric port): a read first writes back the
dirty CPU lines of the same encryption domain, a write drops them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sevsim.soc.iommu import IommuFault, bdf
from sevsim.soc.turns import taking_turns

if TYPE_CHECKING:
    from sevsim.soc.machine import Machine


class DmaAbort(Exception):
    """The transaction did not complete: no memory there, or the IOMMU blocked it."""


class BusMaster:
    """A PCI function that does DMA, identified by its DeviceID (bus << 8 | dev << 3 | fn)."""

    def __init__(self, machine: Machine, device_id: int, address_bits: int = 64) -> None:
        if not 0 <= device_id <= 0xFFFF:
            raise ValueError("a DeviceID is 16 bits: bus << 8 | device << 3 | function")
        if not 32 <= address_bits <= 64:
            raise ValueError("devices drive 32 to 64 address bits")
        self._machine = machine
        self.turns = machine.turns
        self.device_id = device_id
        self.address_bits = address_bits
        self._address_mask = (1 << address_bits) - 1

    @property
    def name(self) -> str:
        return bdf(self.device_id)

    def __repr__(self) -> str:
        return f"<BusMaster {self.name} {self.address_bits}-bit DMA>"

    @taking_turns
    def read(self, address: int, n: int) -> bytes:
        """A DMA read of n bytes at a bus address: each physically contiguous run of one
        key slot is one bulk fabric read (one snoop, one pass of the memory engine)."""
        fabric = self._machine.fabric
        out = np.empty(n, dtype=np.uint8)
        pos = 0
        for pa, slot, length in self._route(address, n, write=False):
            piece = out[pos : pos + length]
            if (pa | length) % 16:
                piece[:] = np.frombuffer(fabric.read(pa, length, slot), dtype=np.uint8)
            else:
                fabric.read_into(pa, piece, slot)
            pos += length
        return out.tobytes()

    @taking_turns
    def write(self, address: int, data: bytes) -> None:
        """A DMA write at a bus address; nothing is written if any part is refused."""
        pos = 0
        for pa, slot, length in self._route(address, len(data), write=True):
            self._machine.fabric.write(pa, data[pos : pos + length], slot)
            pos += length

    def _route(self, address: int, n: int, write: bool) -> list[tuple[int, int, int]]:
        """(physical address, key slot, length) pieces of a DMA, all checked first."""
        m = self._machine
        iommu = m.iommu
        address &= self._address_mask  # the lines this device does not drive stay low
        pieces: list[tuple[int, int]] = []  # (SPA with C-bit, length)
        pos = 0
        walk: dict[int, int] = {}  # the IOMMU's reads for this transfer (one turn)
        while pos < n:
            try:
                t = iommu.translate(self.device_id, address + pos, write, walk)
            except IommuFault as fault:
                raise DmaAbort(f"{self.name}: the IOMMU refused the DMA: {fault}") from fault
            if t is None:  # passed through: the bus address is the SPA
                pieces.append((address + pos, n - pos))
                break
            length = min(t.length, n - pos)
            if pieces and pieces[-1][0] + pieces[-1][1] == t.spa:  # the next page follows
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + length)
            else:
                pieces.append((t.spa, length))
            pos += length
        out = []
        cbit = m.cbit_mask if m.memctl.smee else 0  # without SME the bit is an address bit
        for spa, length in pieces:
            pa = spa & ~cbit
            if pa + length > m.dram.size:
                raise DmaAbort(
                    f"{self.name}: DMA {'write' if write else 'read'} of {length} bytes at "
                    f"{spa:#x}: no memory there (master abort)"
                )
            out.append((pa, m.memctl.key_slot(bool(spa & cbit), 0), length))
        return out
