"""The model's guest firmware: an image a VMM loads like OVMF, and the program it holds.

**The image** (``build_image``) is what a guest owner gets from its firmware vendor: a
firmware-sized file (2 MiB by default) mapped so that it ends at 4 GiB. It carries a
firmware volume of data, the code image of the program below, and — in its last page — an
OVMF footer GUID table in OVMF's own format: the entry point (in the SEV-ES reset block
entry), the secret area and the kernel-hashes area in guest RAM, at the addresses OVMF's
AmdSev build uses. QEMU-like VMMs and owner tools read that table as they would OVMF's.

MODEL: the model CPU has no real-mode reset path; a VMM starts every vCPU at the address
in the reset block entry (a real OVMF image's code is not a registered program, so such a
guest stops with #UD/triple fault).

**The program** (``firmware_main``) does what OVMF's AmdSev build does for a measured
direct boot, in miniature: it reads the RAM size from fw_cfg, enters long mode with the
C-bit on its memory, finds its own secret and hashes areas in its flash's footer table,
shares a bounce buffer with ``set_memory_decrypted`` for fw_cfg DMA, verifies the kernel,
initrd and command line the VMM passes against the measured hashes table (and refuses to
boot on a mismatch), and reads the secrets table the owner injected. It never prints a
secret: it prints each entry's GUID, length and SHA-256, and "uses" it by printing
HMAC-SHA256(secret, "sevsim guest ready"), which the owner can check.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from sevsim.api import fwcfg, guidtable, ovmf
from sevsim.api.layout import Layout
from sevsim.guest.kernel import GuestKernel, parse_cmdline
from sevsim.soc.nested import GuestVcpu
from sevsim.soc.paging import CR0_PG, PAGE_4K
from sevsim.soc.svm import register_program

DEFAULT_SIZE = 2 << 20
MIN_SIZE = 16 << 10
SECRET_AREA = (0x0081_0000, 0x0C00)  # base, size: as in OVMF's AmdSev build
HASHES_AREA = (0x0081_0C00, 0x0400)
MEMFD_END = 0x0100_0000  # the firmware's data pages start above its fixed areas
MIN_MEMORY = 32 << 20
BOUNCE_PAGES = 16  # a 64 KiB shared buffer for fw_cfg DMA
READY_MESSAGE = b"sevsim guest ready"
VOLUME_HEADER = b"_FVH sevsim model guest firmware volume 1\n"


def is_model_image(image: bytes) -> bool:
    """An image made by ``build_image``: its code is this Python program's (a VMM runs it
    on the Python guest engine; any other image runs as real code from the reset vector)."""
    size = len(image)
    if size < MIN_SIZE:
        return False
    return image[code_offset(size) : code_offset(size) + PAGE_4K] == PROGRAM.code


def code_offset(size: int) -> int:
    """Where the program's code image sits in an image of ``size`` bytes."""
    return size - 2 * PAGE_4K


def build_image(size: int = DEFAULT_SIZE) -> bytes:
    """A firmware image of ``size`` bytes (a multiple of 4 KiB, at least 16 KiB)."""
    if size < MIN_SIZE or size % PAGE_4K:
        raise ValueError(f"a firmware image is a multiple of 4 KiB of at least {MIN_SIZE}")
    base = ovmf.flash_base(size)
    volume = bytearray(VOLUME_HEADER)
    block = hashlib.sha256(VOLUME_HEADER).digest()
    while len(volume) < code_offset(size):
        block = hashlib.sha256(block).digest()
        volume += block
    table = ovmf.build_table(
        [
            (ovmf.SEV_HASH_TABLE_RV_GUID, _area(HASHES_AREA)),
            (ovmf.SEV_SECRET_GUID, _area(SECRET_AREA)),
            (ovmf.SEV_ES_RESET_BLOCK_GUID, (base + code_offset(size)).to_bytes(4, "little")),
        ]
    )
    # The last 32 bytes stand where the reset vector goes: a jump, then HLTs.
    tail = bytes([0x90, 0x90, 0xE9, 0x00, 0x00]).ljust(ovmf.TAIL, b"\xf4")
    last_page = bytes(PAGE_4K - ovmf.TAIL - len(table)) + table + tail
    return bytes(volume[: code_offset(size)]) + PROGRAM.code + last_page


def _area(area: tuple[int, int]) -> bytes:
    return ovmf.AREA.build(base=area[0], size=area[1])


WORKLOAD_FILE = "opt/sevsim/workload"  # QEMU-style: -fw_cfg name=opt/sevsim/workload,string=…
RESUME_BLOCK = MEMFD_END - PAGE_4K  # private: what a restored vCPU needs to carry on
RESUME_MAGIC = b"SEVSIMRB"
RESUME = Layout(
    "RESUME_BLOCK",
    32,
    "MODEL: the count workload's own (docs/migration.md)",
    (0x00, "8s", "magic"),
    (0x08, "Q", "counter"),  # GPA of the private counter
    (0x10, "Q", "status"),  # GPA of the shared status page
    (0x18, "Q", "limit"),  # 0: count forever
)
HEARTBEAT = 4096  # increments between HLTs


@dataclass
class FirmwareReport:
    """What the firmware knows (its own view)."""

    cpu: int
    sev: bool = False
    memory: int = 0
    hashes: dict[str, str] = field(default_factory=dict)  # item -> "ok" / "MISMATCH" / ...
    booted: bool = False
    secrets: list[tuple[str, bytes]] = field(default_factory=list)  # (GUID, data)
    count: int = 0


class FwCfg:
    """The guest's fw_cfg driver: the I/O-port interface for small items before paging,
    DMA through a shared bounce buffer after."""

    def __init__(self, vcpu: GuestVcpu) -> None:
        self.vcpu = vcpu
        self.bounce = 0  # GPA of the shared buffer; its first 16 bytes hold the descriptor

    def read_pio(self, key: int, n: int) -> bytes:
        self.vcpu.out(fwcfg.PORT_SELECTOR, key, 2)
        return bytes(self.vcpu.in_(fwcfg.PORT_DATA, 1) for _ in range(n))

    def read_int(self, key: int, n: int) -> int:
        return int.from_bytes(self.read_pio(key, n), "little")

    def read_dma(self, key: int, n: int) -> bytes:
        """``n`` bytes of an item, in chunks through the bounce buffer."""
        vcpu, out = self.vcpu, bytearray()
        room = BOUNCE_PAGES * PAGE_4K - 16
        control = fwcfg.DMA_SELECT | key << 16 | fwcfg.DMA_READ
        while len(out) < n:
            chunk = min(room, n - len(out))
            vcpu.write(self.bounce, fwcfg.DMA_DESCRIPTOR.pack(control, chunk, self.bounce + 16))
            address = self.bounce.to_bytes(8, "big")
            vcpu.out(fwcfg.PORT_DMA_HIGH, int.from_bytes(address[:4], "little"), 4)
            vcpu.out(fwcfg.PORT_DMA_LOW, int.from_bytes(address[4:], "little"), 4)
            status = fwcfg.DMA_DESCRIPTOR.unpack(vcpu.read(self.bounce, 16))[0]
            if status & fwcfg.DMA_ERROR:
                raise OSError(f"fw_cfg DMA of item {key:#x} failed")
            out += vcpu.read(self.bounce + 16, chunk)  # out of the shared buffer, into ours
            control = fwcfg.DMA_READ
        return bytes(out)


def firmware_main(vcpu: GuestVcpu) -> FirmwareReport:
    if vcpu.cr0 & CR0_PG:
        # Entered with paging on: this vCPU's state was restored (migration, snapshot);
        # everything the firmware needs is in its memory.
        return _resume(vcpu)
    cfg = FwCfg(vcpu)
    memory = cfg.read_int(fwcfg.RAM_SIZE, 8)
    kernel = GuestKernel(vcpu, params={"mem": str(memory)}, data_base=MEMFD_END)
    report = FirmwareReport(cpu=kernel.cpu, memory=memory)
    if kernel.cpu != 0:
        return report  # APs are parked (cli; hlt) until an OS wakes them
    kernel.printk(f"sevsim guest firmware: {memory >> 20} MiB of RAM")
    if memory < MIN_MEMORY:
        kernel.printk(f"need at least {MIN_MEMORY >> 20} MiB; halting")
        return report
    kernel.detect_sev()
    report.sev = kernel.sev_active
    kernel.printk("SEV active" if kernel.sev_active else "SEV NOT active: nothing is protected")
    flash_top = ovmf.FOUR_GB - PAGE_4K
    table = ovmf.parse_table(vcpu.read(flash_top, PAGE_4K))  # our own last page
    kernel.setup_paging(extra=((ovmf.FOUR_GB - (2 << 20), 2 << 20),))
    cfg.bounce = kernel.alloc_page()
    for _ in range(BOUNCE_PAGES - 1):
        kernel.alloc_page()
    kernel.set_memory_decrypted(cfg.bounce, BOUNCE_PAGES)
    report.booted = _check_kernel_hashes(kernel, cfg, table, report)
    _read_secrets(kernel, table, report)
    kernel.printk("firmware done" + ("" if report.booted else "; the kernel was NOT booted"))
    cmdline_size = cfg.read_int(fwcfg.CMDLINE_SIZE, 4)
    if report.booted and cmdline_size:  # the verified command line configures the kernel
        text = cfg.read_dma(fwcfg.CMDLINE_DATA, cmdline_size).split(b"\0", 1)[0]
        kernel.params.update(parse_cmdline(text.decode("ascii", "replace")))
    workload = _named_file(cfg, WORKLOAD_FILE)
    if report.booted and workload is not None:
        text = workload.decode("ascii", "replace").strip()
        _start_counting(kernel, text, report)  # `disk` is the real-code guest's (disk.c)
    return report


# ---- a workload that lives in memory: it survives migration and snapshots ------------------
def _named_file(cfg: FwCfg, name: str) -> bytes | None:
    """A fw_cfg named file (QEMU's -fw_cfg name=...), read by DMA."""
    count = int.from_bytes(cfg.read_dma(fwcfg.FILE_DIR, 4), "big")
    directory = cfg.read_dma(fwcfg.FILE_DIR, 4 + count * fwcfg.FILE_ENTRY.size)
    entry = fwcfg.parse_file_directory(directory).get(name)
    return None if entry is None else cfg.read_dma(entry[0], entry[1])


def _start_counting(kernel: GuestKernel, workload: str, report: FirmwareReport) -> None:
    """``count`` (forever) or ``count:N``: a counter in private memory, its value published
    in a shared status page, a HLT every HEARTBEAT increments to let the host in."""
    kind, _, limit = workload.partition(":")
    if kind != "count" or (limit and not limit.isdigit()):
        kernel.printk(f"unknown workload {workload!r}")
        return
    counter, status = kernel.alloc_page(), kernel.alloc_page()
    kernel.vcpu.store(counter, 8, 0)
    kernel.set_memory_decrypted(status, 1)
    block = RESUME.build(magic=RESUME_MAGIC, counter=counter, status=status, limit=int(limit or 0))
    kernel.vcpu.write(RESUME_BLOCK, block)
    kernel.printk(f"counting in private memory at {counter:#x}; status in shared page {status:#x}")
    report.count = _count(kernel, counter, status, int(limit or 0))


def _resume(vcpu: GuestVcpu) -> FirmwareReport:
    kernel = GuestKernel(vcpu, params={"mem": "0"})
    report = FirmwareReport(cpu=kernel.cpu)
    kernel.detect_sev()
    report.sev = kernel.sev_active
    block = RESUME.parse(vcpu.read(RESUME_BLOCK, RESUME.size))
    if block.magic != RESUME_MAGIC:
        kernel.printk("resumed, but there is no resume block: halting")
        return report
    counter, status, limit = block.counter, block.status, block.limit
    value = vcpu.load(counter, 8)
    kernel.printk(f"resumed with the count at {value} (SEV {'on' if report.sev else 'off'})")
    report.count = _count(kernel, counter, status, limit)
    return report


def _count(kernel: GuestKernel, counter: int, status: int, limit: int) -> int:
    vcpu = kernel.vcpu
    load, store = vcpu.load, vcpu.store
    while True:
        value = load(counter, 8) + 1
        store(counter, 8, value)
        if value % HEARTBEAT == 0 or value == limit:
            vcpu.write(status, f"count {value}".encode().ljust(32, b"\0"))
            if value % (HEARTBEAT * 16) == 0 or value == limit:
                kernel.printk(f"count {value}")
            if value == limit:
                return value
            vcpu.hlt()  # the host may run something else, stop us, or migrate us


def _check_kernel_hashes(kernel: GuestKernel, cfg: FwCfg, table, report) -> bool:
    """OVMF's measured direct boot: what the VMM passes must match the measured table."""
    sizes = {
        "kernel": cfg.read_int(fwcfg.KERNEL_SIZE, 4),
        "initrd": cfg.read_int(fwcfg.INITRD_SIZE, 4),
        "cmdline": cfg.read_int(fwcfg.CMDLINE_SIZE, 4),
    }
    area = ovmf.area(table, ovmf.SEV_HASH_TABLE_RV_GUID)
    entries = {}
    if area is not None:
        try:
            raw = kernel.vcpu.read(area[0], area[1])
            entries = dict(guidtable.parse(raw, guidtable.SEV_HASH_TABLE_GUID, 2))
        except guidtable.GuidTableError:
            entries = {}
    if not sizes["kernel"]:
        kernel.printk("no kernel from the VMM: nothing to verify")
        return True
    if not entries:
        kernel.printk("a kernel was passed but no measured hashes table exists: refusing it")
        return False
    items = (
        ("cmdline", fwcfg.CMDLINE_DATA, guidtable.SEV_CMDLINE_ENTRY_GUID),
        ("initrd", fwcfg.INITRD_DATA, guidtable.SEV_INITRD_ENTRY_GUID),
        ("kernel", fwcfg.KERNEL_DATA, guidtable.SEV_KERNEL_ENTRY_GUID),
    )
    ok = True
    for name, key, guid in items:
        data = cfg.read_dma(key, sizes[name]) if sizes[name] else b""
        if name == "cmdline" and not data:
            data = b"\0"  # an empty command line is measured as its NUL
        match = hmac.compare_digest(hashlib.sha256(data).digest(), entries.get(guid, b""))
        report.hashes[name] = "ok" if match else "MISMATCH"
        ok &= match
    kernel.printk(
        "kernel hashes: "
        + ", ".join(f"{k} {v}" for k, v in report.hashes.items())
        + ("" if ok else " — refusing to boot this kernel")
    )
    return ok


def _read_secrets(kernel: GuestKernel, table, report: FirmwareReport) -> None:
    area = ovmf.area(table, ovmf.SEV_SECRET_GUID)
    if area is None:
        kernel.printk("no secret area in this firmware")
        return
    raw = kernel.vcpu.read(area[0], area[1])
    try:
        secrets = guidtable.parse(raw, guidtable.SECRET_TABLE_GUID, 4)
    except guidtable.GuidTableError:
        kernel.printk("no secret was injected")
        return
    for guid, data in secrets:
        report.secrets.append((str(guid), data))
        digest = hashlib.sha256(data).hexdigest()[:16]
        kernel.printk(
            f"secret {guid}: {len(data)} bytes, sha256 {digest}..., "
            f"HMAC(secret, {READY_MESSAGE.decode()!r}) = {ready_tag(data)}"
        )


def ready_tag(secret: bytes) -> str:
    """What the guest prints to prove it holds ``secret`` (the owner recomputes it)."""
    return hmac.new(secret, READY_MESSAGE, "sha256").hexdigest()


PROGRAM = register_program("sevsim-guest-firmware", firmware_main)
