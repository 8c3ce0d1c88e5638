"""virtio structures, byte for byte as the virtio 1.x specification lays them out, shared by
the VMM's device and the guest's driver: the split virtqueue (§2.7), the block device's
configuration and requests (§5.2), feature and status bits (§2.1, §6).

The transport is the model's: the register layout of virtio-mmio version 2 (§4.2.2), but
reached with 32-bit port I/O at ``PORT_BASE + offset`` — the model's guests have no MMIO
emulation (KVM would need the instruction bytes of an SEV guest's access). MODEL.
"""

from __future__ import annotations

from sevsim.api.layout import Layout

PORT_BASE = 0xC000
PORT_COUNT = 0x200

# virtio-mmio v2 register offsets
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x7472_6976  # "virt"
TRANSPORT_VERSION = 2
ID_BLOCK = 2
VENDOR_QEMU = 0x554D_4551  # "QEMU"

# Device status (§2.1)
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
S_FAILED = 0x80

# Feature bits
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33  # the device goes through the platform's DMA rules (§6)
BLK_F_SIZE_MAX = 1 << 1
BLK_F_SEG_MAX = 1 << 2
BLK_F_BLK_SIZE = 1 << 6
BLK_F_FLUSH = 1 << 9

# Split virtqueue (§2.7)
DESC = Layout(
    "virtq_desc",
    16,
    "virtio 1.2 §2.7.5",
    (0x00, "Q", "addr"),
    (0x08, "I", "len"),
    (0x0C, "H", "flags"),
    (0x0E, "H", "next"),
)
DESC_F_NEXT = 1
DESC_F_WRITE = 2
USED_ELEM = Layout("virtq_used_elem", 8, "virtio 1.2 §2.7.8", (0x0, "I", "id"), (0x4, "I", "len"))
# The head of both rings (virtq_avail, virtq_used); their entries follow it.
RING_HEADER = Layout(
    "virtq_ring_header", 4, "virtio 1.2 §2.7.6, §2.7.8", (0x0, "H", "flags"), (0x2, "H", "idx")
)


def ring_layout(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the driver (avail) ring and the device (used) ring."""
    return DESC.size * num, 4 + 2 * num + 2, 4 + USED_ELEM.size * num + 2


# Block device (§5.2)
SECTOR_SIZE = 512
# struct virtio_blk_config up to blk_size (what the device offers: SIZE_MAX, SEG_MAX,
# BLK_SIZE); the geometry at 0x10 is not offered and reads as zeros.
BLK_CONFIG = Layout(
    "virtio_blk_config",
    24,
    "virtio 1.2 §5.2.4",
    (0x00, "Q", "capacity"),  # in 512-byte sectors
    (0x08, "I", "size_max"),
    (0x0C, "I", "seg_max"),
    (0x14, "I", "blk_size"),
)
# The request's header (the first, device-readable descriptor); data and status follow.
BLK_REQ = Layout(
    "virtio_blk_req",
    16,
    "virtio 1.2 §5.2.6",
    (0x0, "I", "type"),
    (0x4, "I", "reserved"),
    (0x8, "Q", "sector"),
)
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
BLK_ID_BYTES = 20
