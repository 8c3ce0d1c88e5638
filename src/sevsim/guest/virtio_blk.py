"""The guest kernel's virtio block driver (Linux drivers/block/virtio_blk.c, in miniature).

Probe: reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK, one queue in
coherent (shared, in SEV) memory, DRIVER_OK. In an SEV guest the driver insists on
``VIRTIO_F_ACCESS_PLATFORM`` (Linux's virtio_features_ok refuses the device otherwise),
because only then do buffers go through the DMA API and its bounce pool.

I/O: a request is a descriptor chain — the header, one to ``seg_max`` data segments, the
status byte — each mapped with ``dma_map_single``, so in an SEV guest all of them are
bounced. A segment is at most ``dma_max_mapping_size`` (256 KiB with swiotlb) and
``size_max``; a request at most 1280 KiB (the block layer's default ``max_sectors_kb``)
and five segments (MODEL: without indirect descriptors a chain takes that many ring
entries). Up to a queue's worth goes out before one notify. When the pool has no room,
the driver completes what it has in flight and tries again; a request that cannot be
mapped even with nothing in flight fails with the pool's message, before anything
reaches the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevsim.api import virtio as v
from sevsim.guest.dma import GuestDma, GuestMapping
from sevsim.guest.kernel import GuestKernel
from sevsim.soc.paging import PAGE_4K
from sevsim.swiotlb import DmaDirection, SwiotlbFull

QUEUE_SIZE = 128
MAX_SECTORS_BYTES = 1280 << 10  # Linux's BLK_DEF_MAX_SECTORS_CAP: max_sectors_kb 1280
MAX_SEGMENTS = 5  # data descriptors per request (MODEL, see above)
WANTED = v.F_VERSION_1 | v.F_ACCESS_PLATFORM | v.BLK_F_SIZE_MAX | v.BLK_F_SEG_MAX | v.BLK_F_FLUSH
REQ_AREA = 32  # private bytes per request: 16-byte header, status byte, padding


class VirtioBlkError(OSError):
    pass


@dataclass
class _Request:
    slot: int  # descriptors 3*slot .. 3*slot+2
    maps: list[GuestMapping]
    status_va: int


class VirtioBlk:
    def __init__(self, kernel: GuestKernel, dma: GuestDma, port: int = v.PORT_BASE) -> None:
        self.kernel = kernel
        self.vcpu = kernel.vcpu
        self.dma = dma
        self.port = port
        self.capacity = 0
        self.features = 0
        self.max_segment = 0
        self.max_request = 0
        self.requests = 0
        self.notifies = 0

    def _r(self, reg: int) -> int:
        return self.vcpu.in_(self.port + reg, 4)

    def _w(self, reg: int, value: int) -> None:
        self.vcpu.out(self.port + reg, value & 0xFFFF_FFFF, 4)

    def _fail(self, message: str) -> VirtioBlkError:
        self._w(v.STATUS, self._r(v.STATUS) | v.S_FAILED)
        self.kernel.printk(f"virtio_blk: {message}")
        return VirtioBlkError(message)

    # ---- probe ---------------------------------------------------------------------------
    def probe(self) -> None:
        if self._r(v.MAGIC_VALUE) != v.MAGIC or self._r(v.DEVICE_ID) != v.ID_BLOCK:
            raise VirtioBlkError(f"no virtio block device at port {self.port:#x}")
        if self._r(v.VERSION) != v.TRANSPORT_VERSION:
            raise VirtioBlkError("unsupported virtio transport version")
        self._w(v.STATUS, 0)
        self._w(v.STATUS, v.S_ACKNOWLEDGE)
        self._w(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER)
        offered = 0
        for sel in (0, 1):
            self._w(v.DEVICE_FEATURES_SEL, sel)
            offered |= self._r(v.DEVICE_FEATURES) << (32 * sel)
        if self.dma.force_dma_unencrypted:  # restricted memory access: SEV
            for bit, name in (
                (v.F_VERSION_1, "VERSION_1"),
                (v.F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
            ):
                if not offered & bit:
                    raise self._fail(f"device must provide VIRTIO_F_{name}")
        self.features = offered & WANTED
        for sel in (0, 1):
            self._w(v.DRIVER_FEATURES_SEL, sel)
            self._w(v.DRIVER_FEATURES, self.features >> (32 * sel))
        self._w(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK)
        if not self._r(v.STATUS) & v.S_FEATURES_OK:
            raise self._fail("the device refused the features")
        self._setup_queue()
        # The fields the driver uses: capacity, size_max and seg_max, the first 16 bytes.
        used = v.BLK_CONFIG.field("seg_max").offset + 4
        raw = bytes(b for off in range(0, used, 4) for b in self._config32(off))
        config = v.BLK_CONFIG.parse(raw.ljust(v.BLK_CONFIG.size, b"\0"))
        self.capacity, size_max, seg_max = config.capacity, config.size_max, config.seg_max
        limit = size_max if self.features & v.BLK_F_SIZE_MAX else 1 << 30
        self.max_segment = min(limit, self.dma.max_mapping_size) & ~(v.SECTOR_SIZE - 1)
        segments = min(MAX_SEGMENTS, seg_max if self.features & v.BLK_F_SEG_MAX else 1)
        self.max_request = min(MAX_SECTORS_BYTES, max(1, segments) * self.max_segment)
        self._w(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK | v.S_DRIVER_OK)
        size = self.capacity * v.SECTOR_SIZE
        self.kernel.printk(
            f"virtio_blk virtio0: [vda] {self.capacity} 512-byte logical blocks "
            f"({size / 1e6:.1f} MB/{size / (1 << 20):.1f} MiB)"
        )

    def _config32(self, off: int) -> bytes:
        return self._r(v.CONFIG + off).to_bytes(4, "little")

    def _setup_queue(self) -> None:
        self._w(v.QUEUE_SEL, 0)
        num = min(QUEUE_SIZE, self._r(v.QUEUE_NUM_MAX))
        if num < 2 + MAX_SEGMENTS:
            raise self._fail("the device's queue is too small")
        desc_len, avail_len, used_len = v.ring_layout(num)
        pages = -(-(desc_len + avail_len) // PAGE_4K) + -(-used_len // PAGE_4K)
        rings = self.dma.alloc_coherent(pages)  # shared in SEV: the device must reach it
        self.num = num
        self.desc = rings
        self.avail = rings + desc_len
        self.used = rings + -(-(desc_len + avail_len) // PAGE_4K) * PAGE_4K
        for low, addr in (
            (v.QUEUE_DESC_LOW, self.desc),
            (v.QUEUE_DRIVER_LOW, self.avail),
            (v.QUEUE_DEVICE_LOW, self.used),
        ):
            self._w(low, addr)
            self._w(low + 4, addr >> 32)
        self._w(v.QUEUE_NUM, num)
        self._w(v.QUEUE_READY, 1)
        self._avail_idx = 0
        self._last_used = 0
        self._per_slot = 2 + MAX_SEGMENTS  # descriptors of one request's chain
        self._slots = num // self._per_slot
        self._free = list(range(self._slots))
        self._in_flight: dict[int, _Request] = {}
        self._req_area = self.kernel.alloc_pages(-(-self._slots * REQ_AREA // PAGE_4K))  # private
        self.ring_gpa = rings

    # ---- I/O -----------------------------------------------------------------------------------
    def write(self, sector: int, va: int, n: int) -> None:
        """Write n bytes from guest memory at va to the disk at ``sector``."""
        self._io(v.BLK_T_OUT, sector, va, n)

    def read(self, sector: int, va: int, n: int) -> None:
        """Read n bytes from the disk at ``sector`` into guest memory at va."""
        self._io(v.BLK_T_IN, sector, va, n)

    def flush(self) -> None:
        self._io(v.BLK_T_FLUSH, 0, 0, 0)

    def _io(self, kind: int, sector: int, va: int, n: int) -> None:
        if n % v.SECTOR_SIZE or sector * v.SECTOR_SIZE + n > self.capacity * v.SECTOR_SIZE:
            raise VirtioBlkError(f"{n} bytes at sector {sector}: beyond the disk or unaligned")
        pieces = [(pos, min(self.max_request, n - pos)) for pos in range(0, n, self.max_request)]
        if kind == v.BLK_T_FLUSH:
            pieces = [(0, 0)]
        errors = []
        for pos, length in pieces:
            while True:
                if not self._free:
                    errors += self._complete()
                    continue
                try:
                    self._submit(kind, sector + pos // v.SECTOR_SIZE, va + pos, length)
                    break
                except SwiotlbFull as exc:
                    if not self._in_flight:
                        errors += self._complete()
                        raise VirtioBlkError(f"I/O error: {exc}") from None
                    errors += self._complete()  # room comes back as requests complete
        errors += self._complete()
        if errors:
            raise VirtioBlkError("I/O error: " + "; ".join(errors))

    def _submit(self, kind: int, sector: int, va: int, length: int) -> None:
        slot = self._free[-1]
        area = self._req_area + slot * REQ_AREA
        vcpu = self.vcpu
        vcpu.write(area, v.BLK_REQ.build(type=kind, sector=sector) + b"\xff")  # status: not yet
        maps = []
        try:
            maps.append(self.dma.map_single(area, v.BLK_REQ.size, DmaDirection.TO_DEVICE))
            direction = DmaDirection.FROM_DEVICE if kind == v.BLK_T_IN else DmaDirection.TO_DEVICE
            for pos in range(0, length, self.max_segment):
                size = min(self.max_segment, length - pos)
                maps.append(self.dma.map_single(va + pos, size, direction))
            status_va = area + v.BLK_REQ.size
            maps.append(self.dma.map_single(status_va, 1, DmaDirection.FROM_DEVICE))
        except SwiotlbFull:
            for m in maps:
                self.dma.unmap_single(m)
            raise
        self._free.pop()
        head = self._per_slot * slot
        chain = b""
        for i, m in enumerate(maps):
            last = i == len(maps) - 1
            flags = 0 if last else v.DESC_F_NEXT
            if last or (kind == v.BLK_T_IN and i > 0):
                flags |= v.DESC_F_WRITE
            chain += v.DESC.build(addr=m.dma_addr, len=m.size, flags=flags, next=head + i + 1)
        vcpu.write(self.desc + v.DESC.size * head, chain)
        vcpu.store(self.avail + 4 + 2 * (self._avail_idx % self.num), 2, head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        vcpu.store(self.avail + 2, 2, self._avail_idx)  # publish after the entry
        self._in_flight[head] = _Request(slot, maps, status_va)
        self.requests += 1

    def _complete(self) -> list[str]:
        """Notify the device, wait for everything in flight, unmap; returns errors."""
        if not self._in_flight:
            return []
        vcpu = self.vcpu
        self._w(v.QUEUE_NOTIFY, 0)
        self.notifies += 1
        errors = []
        while self._in_flight:
            used_idx = vcpu.load(self.used + 2, 2)
            if used_idx == self._last_used:
                if self._r(v.STATUS) & v.S_NEEDS_RESET:
                    raise self._fail("the device needs a reset")
                vcpu.hlt()  # wait for the device (the model's device completes at once)
                continue
            while self._last_used != used_idx:
                entry = self.used + 4 + v.USED_ELEM.size * (self._last_used % self.num)
                head = v.USED_ELEM.parse(vcpu.read(entry, v.USED_ELEM.size)).id
                request = self._in_flight.pop(head)
                for m in request.maps:
                    self.dma.unmap_single(m)  # the data and the status come back here
                status = vcpu.load(request.status_va, 1)
                if status != v.BLK_S_OK:
                    errors.append(f"request {head} failed with status {status}")
                self._free.append(request.slot)
                self._last_used = (self._last_used + 1) & 0xFFFF
        return errors
