"""A small guest kernel, written against its vCPU only (sevsim.soc.nested.GuestVcpu).

It does what a Linux SEV guest does at boot, in miniature:

1. **Detect SEV** the way Linux's ``sme_enable`` does in a guest: CPUID 0x8000001F (as
   the hypervisor presents it) for the SEV bit and the C-bit position, then the SEV_STATUS
   MSR (0xC0010131), which the hardware provides and the hypervisor cannot fake.
2. **Build its page tables** in its own memory — a 4-level identity map of guest memory,
   2 MiB pages, the C-bit set on every entry when SEV is active — while paging is off
   (every access is then private anyway), and switch to long mode.
3. **Share chosen pages** with ``set_memory_decrypted`` (hardware.md §4.3): flush the
   cache lines, split the large page, clear the C-bit in the PTE, flush the TLB entry,
   and tell the hypervisor with the KVM_HC_MAP_GPA_RANGE hypercall.
4. **Run workloads** chosen on its command line: keep a secret in private memory,
   compute on it, publish a result in a shared page (``workload=dma``: then wait in HLT
   while the host has a device DMA at it, and read it again); a timed load loop
   (benchmark); or the attack lab's victims (``balance``, ``flags``, ``inbox``).

Secondary vCPUs (APs) wait with HLT until the boot vCPU has published its page tables in
a private mailbox page, then join in long mode, read the secret and report its digest —
private memory is shared by every vCPU of a guest, because they share its ASID.

Its console is the serial port (COM1), one OUT per byte: whatever it prints, the
hypervisor sees. What it returns from ``main`` is its own view of things (the model hands
it to whoever observes the guest, e.g. the demo); it never crosses to the hypervisor.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sevsim.guest.picture import padlock
from sevsim.pagetables import PAGE_KERNEL_EXEC, PageTables
from sevsim.soc import msr
from sevsim.soc.faults import GeneralProtection
from sevsim.soc.nested import GuestVcpu
from sevsim.soc.paging import (
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LME,
    EFER_NXE,
    PAGE_2M,
    PAGE_4K,
)
from sevsim.soc.svm import GuestProgram, register_program

PROGRAM_NAME = "sevsim-guest-kernel"
GUEST_ENTRY = 0x1000  # GPA of the code image; the vCPUs start here (RIP)
BOOT_PARAMS = 0x2000  # the command line, NUL-terminated (part of the measured image)
AP_MAILBOX = 0x3000  # private page: boot vCPU -> APs
PGT_BASE = 0x1_0000  # page-table pages are taken from here up to DATA_BASE
DATA_BASE = 0x10_0000  # data pages are taken from here

COM1 = 0x3F8
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_DECRYPTED = 0
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
SEV_BIT = 1 << 1  # CPUID 0x8000001F EAX
SME_BIT = 1 << 0
SME_COHERENT_BIT = 1 << 10

# AP mailbox layout (u64 each)
MB_READY, MB_CR3, MB_SECRET_GPA, MB_SECRET_LEN, MB_DONE = 0x00, 0x08, 0x10, 0x18, 0x20
MB_AP_DIGESTS = 0x100  # 32 bytes per AP


class VcpuWindow:
    """The page-table builder's view of memory: the vCPU's linear addresses, which are
    guest-physical ones (paging off, or the identity map)."""

    def __init__(self, vcpu: GuestVcpu) -> None:
        self.vcpu = vcpu

    def read(self, pa: int, n: int) -> bytes:
        return self.vcpu.read(pa, n)

    def write(self, pa: int, data: bytes) -> None:
        self.vcpu.write(pa, data)


@dataclass
class GuestReport:
    """What the guest knows about itself (its own view)."""

    cpu: int
    sev: bool = False
    sev_status: int = 0
    c_bit: int | None = None
    secret: bytes = b""
    secret_gpa: int = 0
    shared_gpa: int = 0
    published: bytes = b""
    ap_digests: list[str] = field(default_factory=list)
    loads: dict[str, Any] = field(default_factory=dict)
    after_dma: bytes = b""  # workload=dma: the secret page as read back after the HLT
    steps: list[bytes] = field(default_factory=list)  # workload=balance/flags: what it read
    tables: dict[int, bytes] = field(default_factory=dict)  # its page-table pages, by GPA


class GuestKernel:
    def __init__(
        self, vcpu: GuestVcpu, params: dict[str, str] | None = None, data_base: int = DATA_BASE
    ) -> None:
        """``params``: the configuration, when it does not come from the boot-params page."""
        self.vcpu = vcpu
        self.cpu = vcpu.cpuid(1)[1] >> 24  # initial APIC id
        self.params = parse_cmdline(self._read_cmdline()) if params is None else params
        self.memory_size = int(self.params.get("mem", 4 << 20))
        self.me_mask = 0
        self.sev_status = 0
        self.coherent = False
        self.tables: PageTables | None = None
        self._next_pgt = PGT_BASE
        self._next_data = data_base

    def _read_cmdline(self) -> str:
        raw = self.vcpu.read(BOOT_PARAMS, PAGE_4K)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    # ---- console ----------------------------------------------------------------------
    def printk(self, text: str) -> None:
        for byte in f"[cpu{self.cpu}] {text}\n".encode():
            self.vcpu.outb(COM1, byte)

    # ---- memory encryption ---------------------------------------------------------------
    def detect_sev(self) -> None:
        """Linux sme_enable(), guest path."""
        vcpu = self.vcpu
        if vcpu.cpuid(0x8000_0000)[0] < 0x8000_001F:
            return
        eax, ebx, _, _ = vcpu.cpuid(0x8000_001F)
        if not eax & (SEV_BIT | SME_BIT):
            return
        try:
            status = vcpu.rdmsr(msr.SEV_STATUS)
        except GeneralProtection:
            return
        if status & 1:  # MSR_AMD64_SEV_ENABLED
            self.sev_status = status
            self.me_mask = 1 << (ebx & 0x3F)
            self.coherent = bool(eax & SME_COHERENT_BIT)

    @property
    def sev_active(self) -> bool:
        return bool(self.me_mask)

    def _pgt_page(self) -> int:
        if self._next_pgt >= DATA_BASE:
            raise MemoryError("out of page-table pages")
        pa, self._next_pgt = self._next_pgt, self._next_pgt + PAGE_4K
        return pa

    def alloc_page(self) -> int:
        return self.alloc_pages(1)

    def alloc_pages(self, npages: int, align: int = PAGE_4K) -> int:
        """Contiguous guest-physical pages (identity-mapped: the address is also the VA)."""
        start = -(-self._next_data // align) * align
        if start + npages * PAGE_4K > self.memory_size:
            raise MemoryError(f"guest out of memory ({npages} pages wanted)")
        self._next_data = start + npages * PAGE_4K
        return start

    @property
    def free_memory(self) -> int:
        return self.memory_size - self._next_data

    def setup_paging(self, extra: tuple[tuple[int, int], ...] = ()) -> None:
        """Identity-map guest memory and the ``extra`` (base, size) ranges (C-bit on
        everything when SEV is active), and enter long mode."""
        vcpu = self.vcpu
        tables = PageTables(
            VcpuWindow(vcpu), self._pgt_page, me_mask=self.me_mask, encrypted_tables=True
        )
        size = -(-self.memory_size // PAGE_2M) * PAGE_2M
        for base, length in ((0, size), *extra):
            tables.map_range(base, base, length, PAGE_KERNEL_EXEC, encrypted=self.sev_active)
        self.enter_long_mode(tables.cr3())
        self.tables = tables

    def enter_long_mode(self, cr3: int) -> None:
        vcpu = self.vcpu
        vcpu.write_cr4(vcpu.cr4 | CR4_PAE)
        vcpu.wrmsr(msr.EFER, vcpu.rdmsr(msr.EFER) | EFER_LME | EFER_NXE)
        vcpu.write_cr3(cr3)
        vcpu.write_cr0(vcpu.cr0 | CR0_PG | CR0_WP)

    def set_memory_decrypted(self, va: int, npages: int) -> None:
        self._set_memory_enc(va, npages, encrypt=False)

    def set_memory_encrypted(self, va: int, npages: int) -> None:
        self._set_memory_enc(va, npages, encrypt=True)

    def _set_memory_enc(self, va: int, npages: int, encrypt: bool) -> None:
        """Linux __set_memory_enc_pgtable in an SEV guest. The contents are not converted:
        the caller rewrites the pages afterwards."""
        if not self.sev_active:
            return
        assert self.tables is not None
        vcpu = self.vcpu
        end = va + npages * PAGE_4K
        if not self.coherent:  # write the old-key lines out before the key changes
            vcpu.clflush_range(va, end - va)
        pos = va
        while pos < end:  # large pages that are converted whole stay large
            leaf = self.tables.leaf_within(pos, end)
            entry = leaf.entry & ~self.me_mask | (self.me_mask if encrypt else 0)
            self.tables.write_entry(leaf.entry_pa, entry)
            pos += leaf.size
        if npages > 32:
            vcpu.write_cr3(vcpu.cr3)  # a full flush (CR4.PGE is off: nothing is global)
        else:
            for page in range(va, end, PAGE_4K):
                vcpu.invlpg(page)
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if encrypt else KVM_MAP_GPA_RANGE_DECRYPTED
        vcpu.vmmcall(KVM_HC_MAP_GPA_RANGE, va, npages, attrs)  # identity map: va == gpa

    # ---- workloads ---------------------------------------------------------------------------
    def keep_secret(self, report: GuestReport) -> None:
        """Make a secret, keep it in private memory, compute on it, publish the result."""
        vcpu = self.vcpu
        label = self.params.get("secret", "guest")
        value = b"".join(vcpu.rdrand64().to_bytes(8, "little") for _ in range(2))
        secret = f"{label} secret {value.hex()}".encode()
        gpa = self.alloc_page()
        vcpu.write(gpa, secret)
        # Compute on what memory holds, not on the Python value.
        digest = hashlib.sha256(vcpu.read(gpa, len(secret))).hexdigest()
        shared = self.alloc_page()
        self.set_memory_decrypted(shared, 1)
        published = f"{label}: sha256(secret) = {digest}".encode()
        vcpu.write(shared, published.ljust(128, b"\0"))
        report.secret, report.secret_gpa = secret, gpa
        report.shared_gpa, report.published = shared, published
        self.printk(f"secret kept at GPA {gpa:#x}; result published in shared page {shared:#x}")

    def balance(self, report: GuestReport) -> None:
        """``workload=balance``: a private account balance, 100 then 40 after a payment,
        with a HLT after each write (the host runs in between); then read it back."""
        vcpu = self.vcpu
        gpa = self.alloc_page()
        for amount in (100, 40):
            vcpu.write(gpa, f"balance: {amount:3d} EUR".encode().ljust(16))
            vcpu.hlt()
        report.secret_gpa = gpa
        report.steps.append(vcpu.read(gpa, 16))
        self.printk(f"balance read back: {report.steps[-1].decode(errors='replace').strip()}")

    def flags(self, report: GuestReport) -> None:
        """``workload=flags``: walk the 16 bits of a random private key, storing each bit's
        branch flag in the same private variable, with a HLT after each store — a
        key-dependent value the host can watch but not decrypt."""
        vcpu = self.vcpu
        key = vcpu.rdrand64() & 0xFFFF
        gpa = self.alloc_page()
        for i in range(16):
            flag = b"flag: 1" if key >> (15 - i) & 1 else b"flag: 0"
            vcpu.write(gpa, flag.ljust(16))
            vcpu.hlt()
            report.steps.append(vcpu.read(gpa, 16))
        report.secret, report.secret_gpa = f"{key:016b}".encode(), gpa
        self.printk("walked the key's bits")

    def inbox(self, report: GuestReport) -> None:
        """``workload=inbox``: a private setting (``role: user``) in its second data page; a
        message the host delivers in a shared page is copied into a private buffer (its
        first data page) — as a network driver copies a received packet out of its bounce
        buffer; HLTs let the host deliver and then act; finally it reads the setting."""
        vcpu = self.vcpu
        buffer, setting = self.alloc_page(), self.alloc_page()
        vcpu.write(setting, b"role: user".ljust(16))
        shared = self.alloc_page()
        self.set_memory_decrypted(shared, 1)
        vcpu.hlt()  # the host delivers a message into the shared page
        vcpu.write(buffer, vcpu.read(shared, 64))
        vcpu.hlt()
        report.secret_gpa, report.shared_gpa = setting, shared
        report.steps.append(vcpu.read(setting, 16))
        self.printk(f"setting: {report.steps[-1].decode(errors='replace').strip()}")

    def picture(self, report: GuestReport) -> None:
        """``workload=picture``: keep the padlock bitmap in 16 private pages and read it back
        (the pictures show it in DRAM under each engine)."""
        image = padlock()
        va = self.alloc_pages(len(image) // PAGE_4K)
        self.vcpu.write_stream(va, image)
        report.secret_gpa = va
        report.steps.append(self.vcpu.read_stream(va, len(image)))
        self.printk(f"keeping a {len(image) >> 10} KiB picture at GPA {va:#x}")

    def wake_aps(self, report: GuestReport) -> None:
        """Publish the page tables and the secret's place to the APs; wait for their digests."""
        vcpu = self.vcpu
        nr_cpus = int(self.params.get("smp", 1))
        if nr_cpus < 2:
            return
        assert self.tables is not None
        vcpu.store(AP_MAILBOX + MB_CR3, 8, self.tables.cr3())
        vcpu.store(AP_MAILBOX + MB_SECRET_GPA, 8, report.secret_gpa)
        vcpu.store(AP_MAILBOX + MB_SECRET_LEN, 8, len(report.secret))
        vcpu.store(AP_MAILBOX + MB_DONE, 8, 0)
        vcpu.store(AP_MAILBOX + MB_READY, 8, 1)
        while vcpu.load(AP_MAILBOX + MB_DONE, 8) < nr_cpus - 1:
            vcpu.hlt()  # let the APs run
        for ap in range(1, nr_cpus):
            raw = vcpu.read(AP_MAILBOX + MB_AP_DIGESTS + 32 * (ap - 1), 32)
            report.ap_digests.append(raw.hex())

    def ap_main(self, report: GuestReport) -> None:
        vcpu = self.vcpu
        while not vcpu.load(AP_MAILBOX + MB_READY, 8):
            vcpu.hlt()
        self.enter_long_mode(vcpu.load(AP_MAILBOX + MB_CR3, 8))
        gpa = vcpu.load(AP_MAILBOX + MB_SECRET_GPA, 8)
        secret = vcpu.read(gpa, vcpu.load(AP_MAILBOX + MB_SECRET_LEN, 8))
        digest = hashlib.sha256(secret).digest()
        vcpu.write(AP_MAILBOX + MB_AP_DIGESTS + 32 * (self.cpu - 1), digest)
        vcpu.store(AP_MAILBOX + MB_DONE, 8, vcpu.load(AP_MAILBOX + MB_DONE, 8) + 1)
        report.ap_digests.append(digest.hex())
        self.printk("AP online: read the secret through the shared ASID")

    def load_loop(self, count: int, rounds: int) -> dict[str, Any]:
        """The benchmark workload: ``count`` random 8-byte loads over 256 KiB of private
        memory (TLB and cache hits after a warm-up), timed inside the guest; a HLT after
        each round lets the host time its baseline in between."""
        vcpu = self.vcpu
        span = 256 * 1024
        base = self._next_data
        self._next_data += span
        rng = random.Random(1)
        addresses = [base + rng.randrange(0, span // 8) * 8 for _ in range(count)]
        for off in range(0, span, 64):
            vcpu.load(base + off, 8)
        load = vcpu.load
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for a in addresses:
                load(a, 8)
            times.append(time.perf_counter() - start)
            vcpu.hlt()  # the host times its baseline round meanwhile
        return {"count": count, "times": times}


def parse_cmdline(text: str) -> dict[str, str]:
    out = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


def cmdline(memory: int, smp: int = 1, **options: object) -> str:
    words = [f"mem={memory}", f"smp={smp}"] + [f"{k}={v}" for k, v in options.items()]
    return " ".join(words)


def image(command_line: str, program: GuestProgram | None = None) -> list[tuple[int, bytes]]:
    """The launch image a VMM loads and (for SEV) has measured: the code and boot params."""
    params = command_line.encode("ascii") + b"\0"
    if len(params) > PAGE_4K:
        raise ValueError("command line too long")
    code = (program or PROGRAM).code
    return [(GUEST_ENTRY, code), (BOOT_PARAMS, params.ljust(PAGE_4K, b"\0"))]


def main(vcpu: GuestVcpu) -> GuestReport:
    kernel = GuestKernel(vcpu)
    report = GuestReport(cpu=kernel.cpu)
    kernel.detect_sev()
    report.sev, report.sev_status = kernel.sev_active, kernel.sev_status
    report.c_bit = kernel.me_mask.bit_length() - 1 if kernel.sev_active else None
    if kernel.cpu != 0:
        kernel.ap_main(report)
        return report
    if kernel.sev_active:
        kernel.printk(f"SEV active (SEV_STATUS {kernel.sev_status:#x}), C-bit {report.c_bit}")
    else:
        kernel.printk("no memory encryption")
    kernel.setup_paging()
    workload = kernel.params.get("workload", "secret")
    if workload.startswith("loads:"):
        _, count, rounds = workload.split(":")
        report.loads = kernel.load_loop(int(count), int(rounds))
        return report
    if workload in ("balance", "flags", "inbox", "picture"):  # attack lab and pictures
        getattr(kernel, workload)(report)
        return report
    kernel.keep_secret(report)
    # Its own page tables as it reads them (the attack lab checks CrossLine against them).
    for gpa in range(PGT_BASE, kernel._next_pgt, PAGE_4K):
        report.tables[gpa] = vcpu.read(gpa, PAGE_4K)
    if workload == "dma":
        # Wait in HLT while the host lets a device DMA at the secret's page, then look again.
        kernel.vcpu.hlt()
        report.after_dma = kernel.vcpu.read(report.secret_gpa, 64)
        kernel.printk("read the secret's page again after the device's DMA")
    kernel.wake_aps(report)
    kernel.printk("done")
    return report


PROGRAM = register_program(PROGRAM_NAME, main)
