"""A virtio block device in the VMM, backed by a raw disk image file (QEMU's
``-drive file=PATH,format=raw,if=virtio``).

The device is VMM software: it reaches the guest's rings and buffers only through the
VMM's mapping of guest memory (``Vm.read``/``write``), with the host's key. So it can
serve an SEV guest only from pages the guest has shared; a descriptor that points at a
private page gets ciphertext-garbage out and puts garbage in, which is why an SEV guest
bounces every buffer through its swiotlb pool (``VIRTIO_F_ACCESS_PLATFORM``).

Whatever the guest writes lands in the file as it is: the disk is outside SEV's
protection unless the guest encrypts what it writes.

Requests are carried out on the device's I/O thread, as QEMU's iothreads (or its main
loop) do: the driver's notify (a port write: a VM exit) only kicks that thread and the
guest runs on at once; the thread reads the rings and buffers, writes the file, and
publishes each completion on the used ring (the model has no interrupts: the driver polls
it). The thread takes the machine's turns for each access to guest memory, like any host
thread. With ``iothread=False`` the requests are carried out during the notify's exit,
before the guest runs again (deterministic: what a test that counts on the order uses).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sevsim.api import virtio as v
from sevsim.host.kvm import Vm

QUEUE_NUM_MAX = 256
SIZE_MAX = 1 << 20  # largest data descriptor the device takes
SEG_MAX = 126
SERIAL = b"sevsim-disk"


class DiskError(OSError):
    pass


@dataclass
class BlkStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: list[str] = field(default_factory=list)


class VirtioBlkDevice:
    def __init__(
        self, vm: Vm, path: Path, access_platform: bool = True, iothread: bool = True
    ) -> None:
        self.vm = vm
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise DiskError(f"cannot open the disk image {path}: {exc.strerror}") from None
        size = os.fstat(self._fd).st_size
        if size == 0 or size % v.SECTOR_SIZE:
            os.close(self._fd)
            raise DiskError(f"{path}: a disk image is a non-zero multiple of 512 bytes")
        self.capacity = size // v.SECTOR_SIZE
        self.features = (
            v.F_VERSION_1 | v.BLK_F_SIZE_MAX | v.BLK_F_SEG_MAX | v.BLK_F_BLK_SIZE | v.BLK_F_FLUSH
        )
        if access_platform:
            self.features |= v.F_ACCESS_PLATFORM
        self.stats = BlkStats()
        self._buffer = np.empty(0, dtype=np.uint8)  # the device's own DMA buffer, reused
        # The queue's state is the I/O thread's while it serves the ring; a register
        # access from a vCPU waits for it (QEMU's AioContext lock).
        self._lock = threading.RLock()
        self._kick = threading.Condition(self._lock)
        self._kicks = 0  # notifies not yet served
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.reset()
        if iothread:
            self._thread = threading.Thread(target=self._iothread, name="virtio-blk", daemon=True)
            self._thread.start()

    @property
    def iothread(self) -> bool:
        return self._thread is not None

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._kicks = 0  # a reset forgets the notifies not yet served
        self.status = 0
        self.driver_features = 0
        self._device_sel = 0
        self._driver_sel = 0
        self.queue_num = 0
        self.queue_ready = 0
        self.desc = self.avail = self.used = 0
        self._last_avail = 0
        self._used_idx = 0
        self.interrupt_status = 0

    def close(self) -> None:
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._paused = False
                self._kick.notify_all()
            self._thread.join(timeout=30)  # (a thread stuck on a turn must not hang quit)
            self._thread = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- the I/O thread -----------------------------------------------------------------
    def _iothread(self) -> None:
        with self._lock:
            while True:
                while not self._stopping and (self._paused or not self._kicks):
                    self._kick.wait()
                if self._stopping:
                    return
                self._kicks = 0  # one pass serves every chain made available so far
                try:
                    self._serve()
                except Exception as exc:  # noqa: BLE001 - the VM went away under it, say
                    self.stats.errors.append(f"I/O thread: {exc}")
                    self.status |= v.S_NEEDS_RESET
                self._kick.notify_all()  # for drain()

    def pause(self) -> None:
        """Hold the I/O thread before its next pass over the ring (what a test, or a
        debugger, uses to see the guest run on while its requests wait)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._kick.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every notify so far has been served (QEMU's blk_drain); False if the
        I/O thread is paused or did not finish in time."""
        with self._lock:
            return self._kick.wait_for(lambda: not self._kicks or self._paused, timeout) and (
                not self._kicks
            )

    def attach(self) -> None:
        """Put the device on the VM's I/O ports."""
        for port in range(v.PORT_BASE, v.PORT_BASE + v.PORT_COUNT):
            self.vm.io_ports[port] = self

    # ---- registers ------------------------------------------------------------------------
    def _config(self) -> bytes:
        return v.BLK_CONFIG.build(
            capacity=self.capacity, size_max=SIZE_MAX, seg_max=SEG_MAX, blk_size=v.SECTOR_SIZE
        )

    def io_in(self, port: int, size: int) -> int:
        with self._lock:
            return self._io_in(port, size)

    def _io_in(self, port: int, size: int) -> int:
        reg = port - v.PORT_BASE
        if reg >= v.CONFIG:
            off = reg - v.CONFIG
            return int.from_bytes(self._config()[off : off + size].ljust(size, b"\0"), "little")
        values = {
            v.MAGIC_VALUE: v.MAGIC,
            v.VERSION: v.TRANSPORT_VERSION,
            v.DEVICE_ID: v.ID_BLOCK,
            v.VENDOR_ID: v.VENDOR_QEMU,
            v.DEVICE_FEATURES: self.features >> (32 * self._device_sel) & 0xFFFF_FFFF,
            v.QUEUE_NUM_MAX: QUEUE_NUM_MAX,
            v.QUEUE_READY: self.queue_ready,
            v.INTERRUPT_STATUS: self.interrupt_status,
            v.STATUS: self.status,
            v.CONFIG_GENERATION: 0,
        }
        return values.get(reg, 0)

    def io_out(self, port: int, value: int, size: int) -> None:
        if port - v.PORT_BASE == v.QUEUE_NOTIFY and self._thread is not None:
            with self._lock:  # ioeventfd: the notify only kicks the I/O thread
                self._kicks += 1
                self._kick.notify_all()
            return
        with self._lock:
            self._io_out(port, value, size)

    def _io_out(self, port: int, value: int, size: int) -> None:
        reg = port - v.PORT_BASE
        value &= 0xFFFF_FFFF
        if reg == v.DEVICE_FEATURES_SEL:
            self._device_sel = value & 1
        elif reg == v.DRIVER_FEATURES_SEL:
            self._driver_sel = value & 1
        elif reg == v.DRIVER_FEATURES:
            shift = 32 * self._driver_sel
            self.driver_features = self.driver_features & ~(0xFFFF_FFFF << shift) | value << shift
        elif reg == v.STATUS:
            self._set_status(value)
        elif reg == v.QUEUE_SEL:
            pass  # one queue
        elif reg == v.QUEUE_NUM:
            self.queue_num = value if 0 < value <= QUEUE_NUM_MAX else 0
        elif reg in (v.QUEUE_DESC_LOW, v.QUEUE_DRIVER_LOW, v.QUEUE_DEVICE_LOW):
            name = {v.QUEUE_DESC_LOW: "desc", v.QUEUE_DRIVER_LOW: "avail"}.get(reg, "used")
            setattr(self, name, getattr(self, name) & ~0xFFFF_FFFF | value)
        elif reg in (v.QUEUE_DESC_HIGH, v.QUEUE_DRIVER_HIGH, v.QUEUE_DEVICE_HIGH):
            name = {v.QUEUE_DESC_HIGH: "desc", v.QUEUE_DRIVER_HIGH: "avail"}.get(reg, "used")
            setattr(self, name, getattr(self, name) & 0xFFFF_FFFF | value << 32)
        elif reg == v.QUEUE_READY:
            self.queue_ready = value & 1
        elif reg == v.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif reg == v.QUEUE_NOTIFY:
            self._serve()

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & v.S_FEATURES_OK and not self.status & v.S_FEATURES_OK:
            # Refuse features the device did not offer, and a driver without VERSION_1.
            if self.driver_features & ~self.features or not self.driver_features & v.F_VERSION_1:
                value &= ~v.S_FEATURES_OK
        self.status = value

    # ---- the queue ----------------------------------------------------------------------------
    def _serve(self) -> None:
        """Carry out every request the driver has made available, in ring order."""
        if not (self.status & v.S_DRIVER_OK and self.queue_ready and self.queue_num):
            return
        vm, num = self.vm, self.queue_num
        try:
            # The avail ring and the descriptor table, each read once per notify: the driver
            # does not touch a chain it has made available until the device returns it.
            avail = vm.read(self.avail, 4 + 2 * num)
            table = vm.read(self.desc, v.DESC.size * num)
            avail_idx = v.RING_HEADER.parse(avail).idx
            while self._last_avail != avail_idx:
                slot = 4 + 2 * (self._last_avail % num)
                head = int.from_bytes(avail[slot : slot + 2], "little")
                written = self._request(head, table)
                self._push_used(head, written)
                self._last_avail = (self._last_avail + 1) & 0xFFFF
        except (ValueError, DiskError) as exc:  # a ring outside guest memory: broken device
            self.stats.errors.append(str(exc))
            self.status |= v.S_NEEDS_RESET
        self.interrupt_status |= 1

    def _push_used(self, head: int, written: int) -> None:
        entry = self.used + 4 + v.USED_ELEM.size * (self._used_idx % self.queue_num)
        self.vm.write(entry, v.USED_ELEM.build(id=head, len=written))
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        self.vm.write(self.used + 2, self._used_idx.to_bytes(2, "little"))  # after the entry

    def _chain(self, head: int, table: bytes) -> list[tuple[int, int, int]]:
        chain, index = [], head
        for _ in range(self.queue_num):
            d = v.DESC.parse(table[v.DESC.size * index : v.DESC.size * (index + 1)])
            chain.append((d.addr, d.len, d.flags))
            if not d.flags & v.DESC_F_NEXT:
                return chain
            index = d.next % self.queue_num
        raise DiskError(f"descriptor chain from {head} loops")

    def _request(self, head: int, table: bytes) -> int:
        """Carry out one request; returns the bytes written into guest buffers."""
        vm = self.vm
        chain = self._chain(head % self.queue_num, table)
        if len(chain) < 2 or chain[0][2] & v.DESC_F_WRITE or chain[0][1] < v.BLK_REQ.size:
            raise DiskError("malformed virtio-blk request")
        status_addr, status_len, status_flags = chain[-1]
        if not status_flags & v.DESC_F_WRITE or status_len < 1:
            raise DiskError("virtio-blk request without a status byte")
        req = v.BLK_REQ.parse(vm.read(chain[0][0], v.BLK_REQ.size))
        kind, sector = req.type, req.sector
        data = chain[1:-1]
        written = 0
        status = v.BLK_S_OK
        try:
            if kind == v.BLK_T_IN:
                written = self._read(sector, data)
            elif kind == v.BLK_T_OUT:
                self._write(sector, data)
            elif kind == v.BLK_T_FLUSH:
                os.fsync(self._fd)
                self.stats.flushes += 1
            elif kind == v.BLK_T_GET_ID:
                for addr, length, _ in data:
                    vm.write(addr, SERIAL.ljust(v.BLK_ID_BYTES, b"\0")[:length])
                    written += min(length, v.BLK_ID_BYTES)
            else:
                status = v.BLK_S_UNSUPP
        except (OSError, ValueError) as exc:
            self.stats.errors.append(f"request at sector {sector}: {exc}")
            status = v.BLK_S_IOERR
        vm.write(status_addr, bytes([status]))
        return written + 1

    def _check(self, sector: int, n: int) -> int:
        if n % v.SECTOR_SIZE or sector + n // v.SECTOR_SIZE > self.capacity:
            raise DiskError(f"{n} bytes at sector {sector} are beyond the disk")
        return sector * v.SECTOR_SIZE

    def _read(self, sector: int, data: list[tuple[int, int, int]]) -> int:
        total = sum(length for _, length, _ in data)
        offset = self._check(sector, total)
        content = os.pread(self._fd, total, offset)
        pos = 0
        for addr, length, flags in data:
            if not flags & v.DESC_F_WRITE:
                raise DiskError("a read request with a read-only buffer")
            self.vm.write_stream(addr, content[pos : pos + length])
            pos += length
        self.stats.reads += 1
        self.stats.bytes_read += total
        return total

    def _write(self, sector: int, data: list[tuple[int, int, int]]) -> None:
        total = sum(length for _, length, _ in data)
        offset = self._check(sector, total)
        if len(self._buffer) < total:
            self._buffer = np.empty(total, dtype=np.uint8)
        buffer, pos = self._buffer[:total], 0
        for addr, length, _ in data:
            self.vm.read_stream_into(addr, buffer[pos : pos + length])
            pos += length
        os.pwrite(self._fd, buffer, offset)
        self.stats.writes += 1
        self.stats.bytes_written += total


def create_image(path: Path, size: int) -> None:
    """A sparse raw disk image (``qemu-img create -f raw``)."""
    if size <= 0 or size % v.SECTOR_SIZE:
        raise DiskError("a disk image is a non-zero multiple of 512 bytes")
    with open(path, "xb") as f:
        f.truncate(size)
