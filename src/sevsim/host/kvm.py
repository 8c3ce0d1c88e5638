"""A VM manager modelled on KVM's AMD SVM and SEV support (Linux arch/x86/kvm/svm/{svm,sev}.c).

What it does, and what it can see, is what KVM does and sees:

* **Guest memory** is host physical memory (pages from the host kernel), reached by the
  hypervisor through its own direct map — with the host key when the host runs with SME.
* **Nested page tables** are real page-table bytes in host DRAM, built through the direct
  map with the host C-bit on every entry when SME is active (KVM's ``shadow_me_value``),
  filled on demand at #NPF.
* **vCPUs** are VMCB pages; VMRUN is issued on a host core. Exits are handled here
  (CPUID, MSR, I/O to a serial console, hypercalls, #NPF) or returned to the caller
  (HLT, SHUTDOWN, a failed entry), as KVM returns to QEMU.
* **SEV**: the guest's firmware context is made with LAUNCH_START and bound to an ASID
  with ACTIVATE; the launch image is encrypted with LAUNCH_UPDATE_DATA; teardown is
  DEACTIVATE then DECOMMISSION. SEV ASIDs come from ``SevAsids``, which recycles lazily
  as KVM does: a freed ASID waits in a reclaim set, and only when the pool is empty does
  KVM run WBINVD on every core and DF_FLUSH, after which the reclaimed ASIDs are free.
* Non-SEV guests get ASIDs above the SEV range (MODEL: one per VM, where KVM hands them
  out per core and generation).

A guest's secrets are not reachable from here: the hypervisor reads guest memory only
through its own mappings, and the firmware answers only with statuses and public data.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sevsim import crypto
from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.host import lapic
from sevsim.host.kernel import PAGE_OFFSET, HostKernel
from sevsim.host.sev import SevDevice
from sevsim.pagetables import LinearWindow, PageTables
from sevsim.soc import msr
from sevsim.soc.core import Core
from sevsim.soc.cpuid import LEAF1_ECX_HYPERVISOR
from sevsim.soc.paging import CR0_PE, PAGE_2M, PAGE_4K, RW, US, A, D, P
from sevsim.soc.svm import (
    EVENTINJ_TYPE_EXCEPTION,
    EVENTINJ_VALID,
    EXIT_CPUID,
    EXIT_HLT,
    EXIT_INTR,
    EXIT_INVALID,
    EXIT_IOIO,
    EXIT_MSR,
    EXIT_NPF,
    EXIT_SHUTDOWN,
    EXIT_VMMCALL,
    INTERCEPT_CPUID,
    INTERCEPT_HLT,
    INTERCEPT_IOIO_PROT,
    INTERCEPT_MSR_PROT,
    INTERCEPT_SHUTDOWN,
    INTERCEPT_VMMCALL,
    INTERCEPT_VMRUN,
    IOIO_PORT_SHIFT,
    IOIO_SIZE_BITS,
    IOIO_TYPE_IN,
    NP_ENABLE,
    SEV_ENABLE,
    TLB_CONTROL_DO_NOTHING,
    TLB_CONTROL_FLUSH_ASID,
    VMCB,
    Exit,
)
from sevsim.soc.x86.decode import (
    GPR_NAMES,
    Mnemonic,
    OpKind,
    Register,
    RegisterInfo,
    decode,
    disassemble,
)

EFER_SVME = 1 << 12
CR0_ET = 1 << 4
DEFAULT_GUEST_PAT = 0x0007_0406_0007_0406  # the PAT's power-on value
MAX_FIRMWARE = 16 << 20  # the flash window below 4 GiB that the VMM maps
PC_LOWMEM_LIMIT, PC_LOWMEM = 0xE000_0000, 0xC000_0000  # QEMU pc: RAM below 4 GiB
RFLAGS_IF = 1 << 9
EFER_SVME = 1 << 12
NPT_TABLE = P | RW | US | A | D  # nested walks are user accesses: every level needs US
NPT_LEAF = P | RW | US | A | D

# Hypercalls (Linux include/uapi/linux/kvm_para.h)
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_ENOSYS = 1000

COM1 = 0x3F8  # the serial console's data port
COM1_LSR = COM1 + 5  # line status: bit 5 = transmitter empty
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
MSR_APIC_BASE = 0x1B
GP_VECTOR = 13
EVENTINJ_ERROR_VALID = 1 << 11  # EV: push the error code in bits 63:32


class KvmError(RuntimeError):
    """An ioctl failed: carries errno and, for SEV commands, the firmware status."""

    def __init__(self, what: str, status: Status | None = None, err: int = errno.EIO) -> None:
        text = what if status is None else f"{what}: firmware status {status.name}"
        super().__init__(text)
        self.status = status
        self.errno = err


@dataclass
class RunExit:
    """Why KVM_RUN returned to the VMM (KVM_EXIT_* in spirit)."""

    reason: str  # "HLT", "DONE", "SHUTDOWN", "FAIL_ENTRY", "INTERNAL_ERROR"
    detail: str = ""
    exit: Exit | None = None


class SevAsids:
    """KVM's SEV ASID bitmaps: in use, and freed-but-not-yet-flushed (the reclaim set)."""

    def __init__(self, min_sev_asid: int, max_sev_asid: int, flush: Callable[[], None]) -> None:
        self.min_sev_asid = min_sev_asid
        self.max_sev_asid = max_sev_asid
        self._flush = flush
        self.used: set[int] = set()
        self.reclaim: set[int] = set()
        self.flushes = 0
        self._lock = threading.Lock()  # sev_bitmap_lock: VMs come and go on many threads

    def range(self, es: bool) -> range:
        if es:
            return range(1, self.min_sev_asid)
        return range(self.min_sev_asid, self.max_sev_asid + 1)

    def new(self, es: bool = False) -> int:
        """sev_asid_new: the lowest free ASID; when none is free, recycle once and retry."""
        with self._lock:
            return self._new(es)

    def _new(self, es: bool) -> int:
        candidates = self.range(es)
        for attempt in range(2):
            asid = next((a for a in candidates if a not in self.used), None)
            if asid is not None:
                self.used.add(asid)
                return asid
            if attempt == 0 and self.reclaim & set(candidates):
                self._recycle()
        kind = "SEV-ES" if es else "SEV"
        raise KvmError(f"no free {kind} ASID ({len(candidates)} in all)", err=errno.EBUSY)

    def _recycle(self) -> None:
        """__sev_recycle_asids: WBINVD on every core and DF_FLUSH, then the reclaimed ASIDs
        are free again (the firmware has moved them from dirty to clean)."""
        self._flush()
        self.flushes += 1
        self.used -= self.reclaim
        self.reclaim.clear()

    def free(self, asid: int) -> None:
        """sev_asid_free: the ASID stays unavailable until the next recycle."""
        with self._lock:
            self.reclaim.add(asid)


class Kvm:
    """The hypervisor: one per host kernel."""

    def __init__(self, kernel: HostKernel, sev: SevDevice | None = None) -> None:
        self.kernel = kernel
        self.sev = sev
        core = kernel.core
        eax, ebx, ecx, edx = core.cpuid(0x8000_001F)
        self.sev_supported = bool(eax >> 1 & 1) and sev is not None
        self.sme_coherent = bool(eax >> 10 & 1)
        self.cbit = ebx & 0x3F
        self.nasid = core.cpuid(0x8000_000A)[1]
        self.asids = SevAsids(max(edx, 1), ecx, self._flush_asids)
        self.reduced_phys_bits = 1  # what QEMU is usually told (-object sev-guest,...)
        self._next_plain_asid = ecx + 1
        self._svm_on: set[int] = set()
        self._last_vmcb: dict[tuple[int, int], int] = {}  # (core, ASID) -> VMCB: sev_vmcbs
        self.log: list[str] = []

    def __repr__(self) -> str:
        sev = "on" if self.sev_supported else "off"
        return f"<Kvm SEV={sev} SEV ASIDs in use={len(self.asids.used)}>"

    # ---- the host side ------------------------------------------------------------------
    def cpu(self, index: int) -> Core:
        """A host core with SVM enabled (svm_hardware_enable: EFER.SVME, VM_HSAVE_PA)."""
        core = self.kernel.cpu(index)
        if index not in self._svm_on:
            hsave = self.kernel.alloc_pages(1)
            core.wrmsr(msr.VM_HSAVE_PA, self.kernel.pa(hsave))
            core.wrmsr(msr.EFER, core.rdmsr(msr.EFER) | EFER_SVME)
            self._svm_on.add(index)
        return core

    def _flush_asids(self) -> None:
        """sev_flush_asids: WBINVD on every core, then DF_FLUSH."""
        self.kernel.wbinvd_on_all_cpus()
        status = self.sev_cmd(Command.DF_FLUSH)
        self.log.append(f"ASID pool empty: WBINVD on all cores, DF_FLUSH → {status.name}")
        if status != Status.SUCCESS:
            raise KvmError("DF_FLUSH", status)

    def sev_cmd(self, command: Command, **fields: Any) -> Status:
        """sev_issue_cmd: one firmware command; returns its status (fields updated in place
        are read back with ``sev_cmd_out``)."""
        status, _ = self.sev_cmd_out(command, **fields)
        return status

    def sev_cmd_out(self, command: Command, **fields: Any) -> tuple[Status, Any]:
        if self.sev is None:
            raise KvmError("SEV is not available on this host", err=errno.ENODEV)
        layout = cmd.BUFFERS.get(command)
        buffer = layout.build(**fields) if layout is not None else None
        ret, status, out = self.sev.do_cmd(command, buffer)
        if ret == -errno.ETIMEDOUT:
            raise KvmError(f"{command.name}: the PSP did not answer", err=errno.ETIMEDOUT)
        return status, layout.parse(out) if layout is not None and out else None

    def plain_asid(self) -> int:
        asid = self._next_plain_asid
        if asid >= self.nasid:
            raise KvmError("out of non-SEV ASIDs (MODEL: they are not recycled)")
        self._next_plain_asid += 1
        return asid

    # ---- VMs ----------------------------------------------------------------------------
    def create_vm(
        self, memory: int, vcpus: int = 1, sev: bool = False, name: str = "", x86: bool = False
    ) -> Vm:
        """KVM_CREATE_VM + guest memory + KVM_CREATE_VCPU × n (+ KVM_SEV_INIT). ``x86``: the
        vCPUs execute real machine code (else the model's Python guest programs run)."""
        if sev and not self.sev_supported:
            raise KvmError("SEV is not supported or not initialised", err=errno.ENOTTY)
        return Vm(self, memory, vcpus, sev, name or f"vm{len(self.log)}", x86=x86)


@dataclass
class MemSlot:
    """A range of guest-physical memory backed by host pages (KVM_SET_USER_MEMORY_REGION).

    Pages are populated on first use, like anonymous memory: zeroed through the host's
    mapping the first time the guest faults on them or the VMM reads or partly writes
    them (a page the VMM writes whole needs no zeroing)."""

    gpa: int
    size: int
    hva: int
    populated: set[int] = field(default_factory=set)  # page indexes
    readonly: bool = False  # KVM_MEM_READONLY: ROM; the guest's writes exit as MMIO

    def __contains__(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


class SerialPort:
    """A 16550 UART as far as a console needs: bytes out of the data port, "idle" in LSR."""

    def __init__(self, sink: bytearray) -> None:
        self.sink = sink

    def io_out(self, port: int, value: int, size: int) -> None:
        if port == COM1:
            self.sink.append(value & 0xFF)

    def io_in(self, port: int, size: int) -> int:
        return 0x60 if port == COM1_LSR else 0  # LSR: transmitter empty and idle


class Vm:
    def __init__(
        self, kvm: Kvm, memory: int, nr_vcpus: int, sev: bool, name: str, x86: bool = False
    ) -> None:
        if memory <= 0 or memory % PAGE_4K:
            raise ValueError("guest memory must be a positive multiple of 4 KiB")
        if nr_vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        self.kvm = kvm
        self.name = name
        self.kernel = kvm.kernel
        self.memory_size = memory
        self.sev = sev
        self.handle = 0
        self.policy = 0
        self.console = bytearray()
        self.hypercalls: list[tuple[int, tuple[int, ...]]] = []
        self.shared_ranges: list[tuple[int, int]] = []  # (gpa, npages) the guest made shared
        self.dead: RunExit | None = None
        self.destroyed = False
        self.slots: list[MemSlot] = []
        self.aliases: list[MemSlot] = []  # regions that show another slot's pages (isa-bios)
        self.x86 = x86
        # A vCPU that runs this many host time slices in a row without any other exit is
        # stuck (spinning, or executing garbage that loops): the VM is stopped.
        self.spin_budget = 200
        self.huge_pages = True  # map 2 MiB frames with one NPT entry where possible
        if x86 and memory > PC_LOWMEM_LIMIT:
            # QEMU's pc machine: RAM stops at 3 GiB below the 4 GiB line (the hole holds the
            # flash, the APIC and PCI); the rest is above 4 GiB.
            self.add_memory(0, PC_LOWMEM)
            self.add_memory(1 << 32, memory - PC_LOWMEM)
        else:
            self.add_memory(0, memory)
        # Devices the VMM puts on I/O ports (KVM_EXIT_IO goes to them); the console is COM1.
        serial = SerialPort(self.console)
        self.io_ports: dict[int, Any] = dict.fromkeys(range(COM1, COM1 + 8), serial)
        self._npt_frames: list[int] = []
        me_mask = self.kernel.me_mask
        self.npt = PageTables(
            LinearWindow(self.kernel.core, PAGE_OFFSET),
            self._npt_frame,
            me_mask=me_mask,
            encrypted_tables=True,
            table_flags=NPT_TABLE,
        )
        self.asid = kvm.asids.new() if sev else kvm.plain_asid()
        self._ipi_source: Vcpu | None = None  # the vCPU whose APIC is sending an IPI
        self.vcpus = [Vcpu(self, i) for i in range(nr_vcpus)]

    def __repr__(self) -> str:
        kind = f"SEV handle {self.handle}" if self.sev else "non-SEV"
        return f"<Vm {self.name} {kind} ASID {self.asid} {self.memory_size >> 20} MiB>"

    def _npt_frame(self) -> int:
        pa = self.kernel.alloc_frame()
        self._npt_frames.append(pa)
        return pa

    # ---- guest memory: slots of host pages, seen through the host's own mapping -----------
    def add_memory(self, gpa: int, size: int, readonly: bool = False) -> MemSlot:
        """A new memslot of ``size`` bytes at ``gpa`` (physically contiguous host pages)."""
        if gpa % PAGE_4K or size <= 0 or size % PAGE_4K:
            raise ValueError("memslots are whole 4 KiB pages")
        if any(gpa < s.gpa + s.size and s.gpa < gpa + size for s in self.slots):
            raise ValueError(f"memslot at {gpa:#x} overlaps another")
        # 2 MiB-aligned backing, as QEMU asks for (MADV_HUGEPAGE): lets #NPF map huge pages.
        hva = self.kernel.alloc_pages(size // PAGE_4K, zero=False, align=PAGE_2M)
        slot = MemSlot(gpa, size, hva, readonly=readonly)
        self.slots.append(slot)
        return slot

    def add_alias(self, gpa: int, size: int, target_gpa: int) -> MemSlot:
        """Guest-physical [gpa, gpa+size) shows the pages of [target_gpa, ...) (QEMU's alias
        regions, e.g. the isa-bios window below 1 MiB); it hides whatever slot is below."""
        target = self.slot_of(target_gpa, size)
        if target is None:
            raise ValueError(f"alias target {target_gpa:#x} is not in one memslot")
        alias = MemSlot(gpa, size, target.hva + target_gpa - target.gpa, readonly=target.readonly)
        alias.populated.update(range(size // PAGE_4K))  # the target is written already
        self.aliases.append(alias)
        return alias

    def slot_of(self, gpa: int, n: int = 1) -> MemSlot | None:
        for slot in self.aliases:
            if gpa in slot:
                return slot if gpa + n <= slot.gpa + slot.size else None
        for slot in self.slots:
            if gpa in slot:
                return slot if gpa + n <= slot.gpa + slot.size else None
        return None

    def _hva_of(self, gpa: int, n: int, whole_write: bool = False) -> int:
        """The host address of [gpa, gpa+n), populating its pages (zeroing those that are
        not about to be overwritten whole)."""
        slot = self.slot_of(gpa, max(n, 1))
        if slot is None:
            raise ValueError(f"GPA range {gpa:#x}+{n:#x} is outside guest memory")
        first = (gpa - slot.gpa) // PAGE_4K
        last = (gpa - slot.gpa + max(n, 1) - 1) // PAGE_4K
        populated = slot.populated
        if first in populated and last in populated and last - first < 2:
            return slot.hva + (gpa - slot.gpa)
        run: list[int] = []  # consecutive pages to clear in one go
        for index in range(first, last + 1):
            if index in populated:
                continue
            page_gpa = slot.gpa + index * PAGE_4K
            covered = whole_write and gpa <= page_gpa and page_gpa + PAGE_4K <= gpa + n
            if not covered:  # clear_page; MODEL: with streaming stores
                if run and run[-1] + 1 != index:
                    self._clear_pages(slot, run)
                    run = []
                run.append(index)
            populated.add(index)
        if run:
            self._clear_pages(slot, run)
        return slot.hva + (gpa - slot.gpa)

    def _clear_pages(self, slot: MemSlot, run: list[int]) -> None:
        self.kernel.write_stream(slot.hva + run[0] * PAGE_4K, bytes(len(run) * PAGE_4K))

    def read(self, gpa: int, n: int) -> bytes:
        return self.kernel.read(self._hva_of(gpa, n), n)

    def write(self, gpa: int, data: bytes) -> None:
        self.kernel.write(self._hva_of(gpa, len(data), whole_write=True), data)

    def read_stream(self, gpa: int, n: int) -> bytes:
        """A bulk copy out of guest memory with non-temporal loads."""
        return self.kernel.read_stream(self._hva_of(gpa, n), n)

    def read_stream_into(self, gpa: int, out: np.ndarray) -> None:
        """``read_stream`` into a uint8 buffer of the caller's (no intermediate copy)."""
        self.kernel.read_stream_into(self._hva_of(gpa, len(out)), out)

    def write_stream(self, gpa: int, data: bytes) -> None:
        """A bulk copy into guest memory with non-temporal stores."""
        self.kernel.write_stream(self._hva_of(gpa, len(data), whole_write=True), data)

    def spa(self, gpa: int) -> int:
        """The system-physical address backing a GPA."""
        slot = self.slot_of(gpa)
        if slot is None:
            raise ValueError(f"GPA {gpa:#x} is outside guest memory")
        return self.kernel.pa(slot.hva) + gpa - slot.gpa

    def map_gpa(self, gpa: int) -> bool:
        """The #NPF handler: back the faulting guest page and map it in the nested page
        table — with one 2 MiB page when its whole 2 MiB frame is in one memslot (host huge
        page, as KVM maps THP-backed memory), else with a 4 KiB page. False when no memslot
        holds the GPA (MMIO, for a VMM to emulate)."""
        encrypted = self.kernel.sme_active
        slot = self.slot_of(gpa)
        leaf = NPT_LEAF & ~RW if slot is not None and slot.readonly else NPT_LEAF
        huge = gpa & ~(PAGE_2M - 1)
        under_alias = any(a.gpa < huge + PAGE_2M and huge < a.gpa + a.size for a in self.aliases)
        if self.huge_pages and not under_alias and self.slot_of(huge, PAGE_2M) is not None:
            self._hva_of(huge, PAGE_2M)
            self.npt.map(huge, self.spa(huge), PAGE_2M, leaf, encrypted=encrypted)
            return True
        page = gpa & ~0xFFF
        if self.slot_of(page) is None:
            return False
        self._hva_of(page, PAGE_4K)
        self.npt.map(page, self.spa(page), PAGE_4K, leaf, encrypted=encrypted)
        return True

    # ---- SEV launch (KVM_SEV_* ioctls) -------------------------------------------------------
    def sev_launch_start(
        self, policy: int, godh_cert: bytes | None = None, session: bytes | None = None
    ) -> int:
        """KVM_SEV_LAUNCH_START: LAUNCH_START, then ACTIVATE with the VM's ASID (sev_bind_asid)."""
        if not self.sev:
            raise KvmError("not an SEV guest", err=errno.ENOTTY)
        kernel, sev = self.kernel, self.kvm.sev
        assert sev is not None
        bufs = []
        fields = {"handle": 0, "policy": policy}
        if godh_cert is not None:
            for name, data in (("dh_cert", godh_cert), ("session", session or b"")):
                va = kernel.alloc_pages(max(1, -(-len(data) // PAGE_4K)))
                kernel.write(va, data)
                bufs.append((va, len(data)))
                fields[f"{name}_paddr"] = sev.psp_pa(va)
                fields[f"{name}_len"] = len(data)
        try:
            status, out = self.kvm.sev_cmd_out(Command.LAUNCH_START, **fields)
        finally:
            for va, n in bufs:
                kernel.free_pages(va, max(1, -(-n // PAGE_4K)))
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_START", status)
        self.handle, self.policy = out.handle, policy
        self._bind_asid()
        return self.handle

    def _bind_asid(self) -> None:
        """sev_bind_asid: ACTIVATE the new guest on the VM's ASID (or give the handle up)."""
        status = self.kvm.sev_cmd(Command.ACTIVATE, handle=self.handle, asid=self.asid)
        if status != Status.SUCCESS:
            self.kvm.sev_cmd(Command.DECOMMISSION, handle=self.handle)
            self.handle = 0
            raise KvmError(f"ACTIVATE of ASID {self.asid}", status)

    def sev_launch_update_data(self, gpa: int, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA: flush the pages (unless the part keeps the caches
        coherent across keys), then LAUNCH_UPDATE_DATA page by page."""
        hva = self._hva_of(gpa, length)  # pinned: contiguous host pages, one command
        if not self.kvm.sme_coherent:
            for line in range(hva & ~63, hva + length, 64):
                self.kernel.core.clflush(line)
        status = self.kvm.sev_cmd(
            Command.LAUNCH_UPDATE_DATA,
            handle=self.handle,
            paddr=self.spa(gpa) | self.kernel.me_mask,
            len=length,
        )
        if status != Status.SUCCESS:
            raise KvmError(f"LAUNCH_UPDATE_DATA at GPA {gpa:#x}", status)

    def sev_launch_measure(self) -> bytes:
        """KVM_SEV_LAUNCH_MEASURE: MEASURE(32) || MNONCE(16)."""
        kernel = self.kernel
        va = kernel.alloc_pages(1)
        try:
            status, _ = self.kvm.sev_cmd_out(
                Command.LAUNCH_MEASURE,
                handle=self.handle,
                measure_paddr=self.kvm.sev.psp_pa(va),
                measure_len=48,
            )
            if status != Status.SUCCESS:
                raise KvmError("LAUNCH_MEASURE", status)
            return kernel.read(va, 48)
        finally:
            kernel.free_pages(va)

    def _kernel_buffer(self, data: bytes) -> tuple[int, int]:
        """Copy ioctl data into a kernel buffer (psp_copy_user_blob): (va, pages)."""
        pages = max(1, -(-len(data) // PAGE_4K))
        va = self.kernel.alloc_pages(pages)
        self.kernel.write(va, data)
        return va, pages

    def sev_launch_secret(self, header: bytes, payload: bytes, gpa: int) -> None:
        """KVM_SEV_LAUNCH_SECRET: the packet goes to the firmware from kernel buffers; the
        target is the guest page's host address with the C-bit (sev_me_mask)."""
        hva = self._hva_of(gpa, len(payload))  # pins (populates) the guest pages
        if not self.kvm.sme_coherent:
            for line in range(hva & ~63, hva + len(payload), 64):
                self.kernel.core.clflush(line)
        buffers = [self._kernel_buffer(header), self._kernel_buffer(payload)]
        psp_pa = self.kvm.sev.psp_pa
        try:
            status = self.kvm.sev_cmd(
                Command.LAUNCH_SECRET,
                handle=self.handle,
                hdr_paddr=psp_pa(buffers[0][0]),
                hdr_len=len(header),
                guest_paddr=self.spa(gpa) | self.kernel.me_mask,
                guest_len=len(payload),
                trans_paddr=psp_pa(buffers[1][0]),
                trans_len=len(payload),
            )
        finally:
            for va, pages in buffers:
                self.kernel.free_pages(va, pages)
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_SECRET", status)

    def sev_attestation_report(self, mnonce: bytes) -> bytes:
        """KVM_SEV_GET_ATTESTATION_REPORT: the PEK-signed report (0xD0 bytes)."""
        va = self.kernel.alloc_pages(1)
        try:
            status, _ = self.kvm.sev_cmd_out(
                Command.ATTESTATION,
                handle=self.handle,
                paddr=self.kvm.sev.psp_pa(va),
                mnonce=mnonce,
                len=cmd.ATTESTATION_REPORT.size,
            )
            if status != Status.SUCCESS:
                raise KvmError("ATTESTATION", status)
            return self.kernel.read(va, cmd.ATTESTATION_REPORT.size)
        finally:
            self.kernel.free_pages(va)

    def sev_dbg_decrypt(self, gpa: int, length: int) -> bytes:
        """KVM_SEV_DBG_DECRYPT (what a debugger attached to the VMM uses): in 16-byte
        granules, through a kernel bounce page."""
        start, end = gpa & ~15, (gpa + length + 15) & ~15
        va = self.kernel.alloc_pages(max(1, -(-(end - start) // PAGE_4K)))
        try:
            self._hva_of(start, end - start)
            status = self.kvm.sev_cmd(
                Command.DBG_DECRYPT,
                handle=self.handle,
                src_paddr=self.spa(start) | self.kernel.me_mask,
                dst_paddr=self.kvm.sev.psp_pa(va),
                len=end - start,
            )
            if status != Status.SUCCESS:
                raise KvmError("DBG_DECRYPT", status)
            return self.kernel.read(va + gpa - start, length)
        finally:
            self.kernel.free_pages(va, max(1, -(-(end - start) // PAGE_4K)))

    # ---- SEV migration (KVM_SEV_SEND_* / KVM_SEV_RECEIVE_*) -------------------------------------
    def sev_send_start(self, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> tuple[bytes, int]:
        """KVM_SEV_SEND_START: (the session blob for the receiver, the guest's policy)."""
        buffers = [self._kernel_buffer(x) for x in (pdh, plat_certs, amd_certs or b"\0")]
        session_va, session_pages = self._kernel_buffer(bytes(cmd.SESSION.size))
        psp_pa = self.kvm.sev.psp_pa
        try:
            status, out = self.kvm.sev_cmd_out(
                Command.SEND_START,
                handle=self.handle,
                pdh_paddr=psp_pa(buffers[0][0]),
                pdh_len=len(pdh),
                plat_certs_paddr=psp_pa(buffers[1][0]),
                plat_certs_len=len(plat_certs),
                amd_certs_paddr=psp_pa(buffers[2][0]),
                amd_certs_len=len(amd_certs),
                session_paddr=psp_pa(session_va),
                session_len=cmd.SESSION.size,
            )
            if status != Status.SUCCESS:
                raise KvmError("SEND_START", status)
            return self.kernel.read(session_va, cmd.SESSION.size), out.policy
        finally:
            for va, pages in [*buffers, (session_va, session_pages)]:
                self.kernel.free_pages(va, pages)

    def sev_send_update_data(self, gpa: int, length: int) -> tuple[bytes, bytes]:
        """KVM_SEV_SEND_UPDATE_DATA: one packet (header, ciphertext) of guest memory."""
        self._hva_of(gpa, length)
        hdr_va = self._transfer_buffer(0, cmd.PACKET_HEADER.size)
        trans_va = self._transfer_buffer(1, length)
        psp_pa = self.kvm.sev.psp_pa
        status = self.kvm.sev_cmd(
            Command.SEND_UPDATE_DATA,
            handle=self.handle,
            hdr_paddr=psp_pa(hdr_va),
            hdr_len=cmd.PACKET_HEADER.size,
            guest_paddr=self.spa(gpa) | self.kernel.me_mask,
            guest_len=length,
            trans_paddr=psp_pa(trans_va),
            trans_len=length,
        )
        if status != Status.SUCCESS:
            raise KvmError(f"SEND_UPDATE_DATA at GPA {gpa:#x}", status)
        header = self.kernel.read_stream(hdr_va, cmd.PACKET_HEADER.size)
        return header, self.kernel.read_stream(trans_va, length)

    def sev_send_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.SEND_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("SEND_FINISH", status)

    def sev_send_cancel(self) -> None:
        status = self.kvm.sev_cmd(Command.SEND_CANCEL, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("SEND_CANCEL", status)

    def sev_receive_start(self, pdh: bytes, session: bytes, policy: int) -> int:
        """KVM_SEV_RECEIVE_START with the sending platform's PDH, then ACTIVATE."""
        if not self.sev:
            raise KvmError("not an SEV guest", err=errno.ENOTTY)
        buffers = [self._kernel_buffer(pdh), self._kernel_buffer(session)]
        psp_pa = self.kvm.sev.psp_pa
        try:
            status, out = self.kvm.sev_cmd_out(
                Command.RECEIVE_START,
                handle=0,
                policy=policy,
                pdh_paddr=psp_pa(buffers[0][0]),
                pdh_len=len(pdh),
                session_paddr=psp_pa(buffers[1][0]),
                session_len=len(session),
            )
        finally:
            for va, pages in buffers:
                self.kernel.free_pages(va, pages)
        if status != Status.SUCCESS:
            raise KvmError("RECEIVE_START", status)
        self.handle, self.policy = out.handle, policy
        self._bind_asid()
        return self.handle

    def sev_receive_update_data(self, header: bytes, data: bytes, gpa: int) -> None:
        """KVM_SEV_RECEIVE_UPDATE_DATA: one packet into guest memory at ``gpa``."""
        self._hva_of(gpa, len(data), whole_write=True)  # pinned; the firmware fills it
        hdr_va = self._transfer_buffer(0, len(header))
        trans_va = self._transfer_buffer(1, len(data))
        self.kernel.write_stream(hdr_va, header)
        self.kernel.write_stream(trans_va, data)
        psp_pa = self.kvm.sev.psp_pa
        status = self.kvm.sev_cmd(
            Command.RECEIVE_UPDATE_DATA,
            handle=self.handle,
            hdr_paddr=psp_pa(hdr_va),
            hdr_len=len(header),
            guest_paddr=self.spa(gpa) | self.kernel.me_mask,
            guest_len=len(data),
            trans_paddr=psp_pa(trans_va),
            trans_len=len(data),
        )
        if status != Status.SUCCESS:
            raise KvmError(f"RECEIVE_UPDATE_DATA at GPA {gpa:#x}", status)

    def sev_receive_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.RECEIVE_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("RECEIVE_FINISH", status)

    def _transfer_buffer(self, index: int, length: int) -> int:
        """Kernel buffers reused across packets (KVM allocates one per ioctl; reusing them
        changes nothing the firmware or the guest can see)."""
        pages = max(1, -(-length // PAGE_4K))
        buffers = self.__dict__.setdefault("_transfer", {})
        va, have = buffers.get(index, (0, 0))
        if have < pages:
            if va:
                self.kernel.free_pages(va, have)
            va = self.kernel.alloc_pages(pages)
            buffers[index] = (va, pages)
        return va

    def sev_launch_finish(self) -> None:
        status = self.kvm.sev_cmd(Command.LAUNCH_FINISH, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("LAUNCH_FINISH", status)

    def sev_guest_status(self) -> Any:
        status, out = self.kvm.sev_cmd_out(Command.GUEST_STATUS, handle=self.handle)
        if status != Status.SUCCESS:
            raise KvmError("GUEST_STATUS", status)
        return out

    def launch(self, image: list[tuple[int, bytes]], entry: int, policy: int = 0) -> bytes | None:
        """What a VMM does to start a guest: copy the image into guest memory, point every
        vCPU at ``entry`` and, for an SEV guest, LAUNCH_START (no owner session), encrypt
        and measure the image, LAUNCH_FINISH. Returns the measurement (SEV) or None."""
        for gpa, data in image:
            self.write(gpa, data)
        for vcpu in self.vcpus:
            vcpu.set_vmcb(rip=entry)
        if not self.sev:
            return None
        self.sev_launch_start(policy)
        for gpa, data in image:
            self.sev_launch_update_data(gpa, len(data))
        measurement = self.sev_launch_measure()
        self.sev_launch_finish()
        return measurement

    def load_firmware(self, image: bytes) -> int:
        """QEMU's -bios: the image ends at 4 GiB, and its last 128 KiB (at most) also show
        below 1 MiB (isa-bios); every vCPU is reset to fetch at 0xFFFFFFF0. Returns the
        image's base GPA (what an SEV launch encrypts and measures)."""
        if not image or len(image) % 0x1_0000 or len(image) > MAX_FIRMWARE:
            raise ValueError(
                f"a firmware image must be a non-zero multiple of 64 KiB up to "
                f"{MAX_FIRMWARE >> 20} MiB ({len(image)} bytes)"
            )
        base = (1 << 32) - len(image)
        self.add_memory(base, len(image), readonly=True)  # ROM, as QEMU maps -bios
        self.write(base, image)
        isa = min(len(image), 0x2_0000)
        self.add_alias(0x10_0000 - isa, isa, base + len(image) - isa)
        for vcpu in self.vcpus:
            vcpu.reset()
        return base

    # ---- running ----------------------------------------------------------------------------
    def run(self, max_rounds: int = 10_000) -> list[RunExit]:
        """Run every vCPU round-robin until each is done or the VM died; a vCPU that halts
        yields to the others (a timer wakes it in the next round)."""
        last: list[RunExit | None] = [None] * len(self.vcpus)
        for _ in range(max_rounds):
            runnable = [v for v in self.vcpus if not v.parked and _runnable(last[v.index])]
            if not runnable or self.dead:
                break
            for vcpu in runnable:
                last[vcpu.index] = vcpu.run()
                if self.dead:
                    break
        else:
            raise KvmError(f"{self.name}: the vCPUs did not finish in {max_rounds} rounds")
        return [
            self.dead or e or (RunExit("WAIT_SIPI", PARKED) if v.parked else RunExit("HLT"))
            for v, e in zip(self.vcpus, last, strict=True)
        ]

    def send_ipi(self, mode: int, vector: int, target: int) -> None:
        """An INIT or STARTUP IPI from a vCPU's local APIC (target: an APIC ID, or -1 for
        all the others): INIT puts the target back in reset, waiting for STARTUP; STARTUP
        starts a waiting one in real mode at vector << 12 (CS vector << 8, IP 0)."""
        for vcpu in self.vcpus:
            if target not in (-1, vcpu.index) or (target == -1 and vcpu is self._ipi_source):
                continue
            if mode == lapic.DM_INIT:
                vcpu.reset()
                vcpu.parked = True
            elif mode == lapic.DM_STARTUP and vcpu.parked:
                vcpu.set_vmcb(cs_selector=vector << 8, cs_base=vector << 12, rip=0)
                vcpu.parked = False

    def console_text(self) -> str:
        return self.console.decode("utf-8", "replace")

    # ---- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        """KVM_DESTROY_VM: vCPUs go, then (SEV) WBINVD so no guest-tagged line outlives the
        pages, DEACTIVATE, DECOMMISSION, the ASID to the reclaim set; memory back to the host."""
        if self.destroyed:
            return
        machine = self.kernel.core.machine
        for vcpu in self.vcpus:
            machine.forget_vmcb(vcpu.vmcb_addr)  # model plumbing: the vCPU's context ends
            self.kernel.free_pages(vcpu.vmcb_va)
        if self.sev:
            self.kernel.wbinvd_on_all_cpus()  # sev_vm_destroy: CLFLUSH cannot do this
            if self.handle:
                status = self.kvm.sev_cmd(Command.DEACTIVATE, handle=self.handle)
                if status not in (Status.SUCCESS, Status.INACTIVE):
                    raise KvmError("DEACTIVATE", status)
                status = self.kvm.sev_cmd(Command.DECOMMISSION, handle=self.handle)
                if status != Status.SUCCESS:
                    raise KvmError("DECOMMISSION", status)
            self.kvm.asids.free(self.asid)
        for key in [k for k, v in self.kvm._last_vmcb.items() if k[1] == self.asid]:
            del self.kvm._last_vmcb[key]
        for slot in self.slots:
            self.kernel.free_pages(slot.hva, slot.size // PAGE_4K)
        for va, pages in self.__dict__.get("_transfer", {}).values():
            self.kernel.free_pages(va, pages)
        for pa in self._npt_frames:
            self.kernel.free_pages(self.kernel.va(pa))
        self.destroyed = True


PARKED = "waiting for a STARTUP IPI"
NPF_WRITE = 1 << 1  # #NPF EXITINFO1: the access was a write


class _Rom:
    """What stands behind a read-only memslot for a guest's write: nothing."""

    def read(self, offset: int) -> int:
        return 0

    def write(self, offset: int, value: int) -> None:
        pass


class _Unassigned(_Rom):
    """No device at all: reads give all ones, writes vanish (QEMU's unassigned memory)."""

    def read(self, offset: int) -> int:
        return (1 << 64) - 1


ROM, UNASSIGNED = _Rom(), _Unassigned()
_REG_NAMES = {getattr(Register, name.upper()): name for name in GPR_NAMES}


def _runnable(last: RunExit | None) -> bool:
    return last is None or last.reason == "HLT"


@dataclass
class Vcpu:
    vm: Vm
    index: int
    regs: dict[str, int] = field(default_factory=dict)
    exits: int = 0
    npfs: list[tuple[int, int]] = field(default_factory=list)  # (GPA, error code) per #NPF

    def __post_init__(self) -> None:
        kernel = self.vm.kernel
        self.vmcb_va = kernel.alloc_pages(1)
        self.vmcb_addr = kernel.pa(self.vmcb_va) | kernel.me_mask  # __sme_set(vmcb page)
        self.core_index = self.index % len(kernel.core.machine.cores)
        self.asid = self.vm.asid  # what pre_run puts into the VMCB (svm->asid)
        self._last_core: int | None = None
        self.set_vmcb(
            intercept_misc1=INTERCEPT_CPUID
            | INTERCEPT_HLT
            | INTERCEPT_IOIO_PROT
            | INTERCEPT_MSR_PROT
            | INTERCEPT_SHUTDOWN,
            intercept_misc2=INTERCEPT_VMRUN | INTERCEPT_VMMCALL,
            asid=self.vm.asid,
            nested_ctl=NP_ENABLE | (SEV_ENABLE if self.vm.sev else 0),
            ncr3=self.vm.npt.cr3(),
            cr0=CR0_PE | CR0_ET,  # MODEL: entered in protected mode, paging off
            rip=0,
            g_pat=DEFAULT_GUEST_PAT,
        )
        # Real-code vCPUs have a local APIC; the others (APs) wait for a STARTUP IPI.
        self.apic = lapic.LocalApic(self.index, self._send_ipi) if self.vm.x86 else None
        self.parked = self.vm.x86 and self.index > 0
        self.kick = threading.Event()  # set by the VMM to get the vCPU out of KVM_RUN
        if self.vm.x86:
            kernel.core.machine.use_x86(self.vmcb_addr)
            self.reset()
        self._spins = 0

    def __repr__(self) -> str:
        return f"<Vcpu {self.vm.name}#{self.index} core {self.core_index}>"

    def _send_ipi(self, mode: int, vector: int, target: int) -> None:
        self.vm._ipi_source = self
        try:
            self.vm.send_ipi(mode, vector, target)
        finally:
            self.vm._ipi_source = None

    def reset(self) -> None:
        """The architectural reset state (KVM/QEMU's vCPU reset): real mode, CS selector
        0xF000 with base 0xFFFF0000 and RIP 0xFFF0, so the first fetch is at 0xFFFFFFF0;
        RDX holds the processor signature (CPUID 1 EAX)."""
        data = {
            f"{seg}_{f}": 0 for seg in ("es", "ss", "ds", "fs", "gs") for f in ("selector", "base")
        }
        data.update({f"{seg}_limit": 0xFFFF for seg in ("es", "ss", "ds", "fs", "gs", "cs")})
        data.update({f"{seg}_attrib": 0x93 for seg in ("es", "ss", "ds", "fs", "gs")})
        self.set_vmcb(
            **data,
            cs_selector=0xF000,
            cs_base=0xFFFF_0000,
            cs_attrib=0x9B,
            gdtr_base=0,
            gdtr_limit=0xFFFF,
            idtr_base=0,
            idtr_limit=0xFFFF,
            ldtr_selector=0,
            ldtr_base=0,
            ldtr_limit=0xFFFF,
            ldtr_attrib=0x82,
            tr_selector=0,
            tr_base=0,
            tr_limit=0xFFFF,
            tr_attrib=0x8B,
            rip=0xFFF0,
            rsp=0,
            rax=0,
            rflags=2,
            cr0=0x6000_0010,
            cr3=0,
            cr4=0,
            cr2=0,
            efer=EFER_SVME,
            cpl=0,
        )
        self.regs.clear()
        self.regs["rdx"] = self.vm.kernel.core.cpuid(1)[0]

    # ---- the VMCB, in host memory ------------------------------------------------------------
    def vmcb(self) -> Any:
        return VMCB.parse(self.vm.kernel.read(self.vmcb_va, VMCB.size))

    def set_vmcb(self, **values: int) -> None:
        kernel = self.vm.kernel
        for name, value in values.items():
            f = VMCB.field(name)
            kernel.write(self.vmcb_va + f.offset, value.to_bytes(f.size, "little"))

    # ---- KVM_RUN -----------------------------------------------------------------------------
    def run(self) -> RunExit:
        """Enter the guest until an exit the VMM must see."""
        vm = self.vm
        while True:
            if vm.dead is not None:
                return vm.dead
            if self.parked:
                return RunExit("WAIT_SIPI", PARKED)
            if self.kick.is_set():  # a signal for the vCPU thread: KVM_RUN returns -EINTR
                self.kick.clear()
                return RunExit("INTR", "interrupted by the VMM")
            result = self._handle(self._vmrun())
            if result is not None:
                return result

    def _vmrun(self) -> Exit:
        core = self.vm.kvm.cpu(self.core_index)
        self._pre_run(core)
        exit_ = core.vmrun(self.vmcb_addr, self.regs)
        self.exits += 1
        return exit_

    def run_once(self) -> Exit:
        """One VMRUN and KVM's handling of its exit (a debugger's or a test's single step
        of KVM_RUN's loop); the raw exit is returned."""
        exit_ = self._vmrun()
        self._handle(exit_)
        return exit_

    def _pre_run(self, core: Core) -> None:
        """pre_sev_run / pre_svm_run: all vCPUs of an SEV guest share its ASID, so the TLB
        of that ASID on this core is flushed when another VMCB ran it last or this VMCB
        last ran on another core."""
        key = (core.index, self.asid)
        flush = self.vm.kvm._last_vmcb.get(key) != self.vmcb_addr or self._last_core != core.index
        self.vm.kvm._last_vmcb[key] = self.vmcb_addr
        self._last_core = core.index
        self.set_vmcb(
            asid=self.asid,
            tlb_control=TLB_CONTROL_FLUSH_ASID if flush else TLB_CONTROL_DO_NOTHING,
            rax=self.regs.get("rax", 0),  # svm_vcpu_run: RAX lives in the VMCB
        )

    def _handle(self, e: Exit) -> RunExit | None:
        vm = self.vm
        if e.code != EXIT_INTR:
            self._spins = 0
        if e.code == EXIT_INTR:
            # The host's timer ended the time slice; KVM goes back in. A vCPU that never
            # exits otherwise is stuck: spinning, or executing garbage that loops.
            self._spins += 1
            if self._spins < vm.spin_budget:
                return None
            vm.dead = RunExit("STUCK", f"no exit in {self._spins} time slices: the vCPU spins", e)
            return vm.dead
        if e.code == EXIT_NPF:
            gpa = e.info2
            self.npfs.append((gpa, e.info1))
            slot = vm.slot_of(gpa)
            if slot is not None and slot.readonly and e.info1 & NPF_WRITE:
                # A write to ROM: KVM exits to the VMM as MMIO, which drops it.
                problem = self._emulate_mmio(gpa, ROM, gpa)
                if problem is None:
                    return None
            elif vm.map_gpa(gpa):
                return None
            elif self.apic is not None and 0 <= gpa - lapic.APIC_BASE < lapic.APIC_SIZE:
                problem = self._emulate_mmio(gpa, self.apic, lapic.APIC_BASE)
                if problem is None:
                    return None
            elif vm.x86:
                # Nothing there: the VMM answers as QEMU's unassigned memory does.
                problem = self._emulate_mmio(gpa, UNASSIGNED, gpa)
                if problem is None:
                    return None
            else:
                problem = "no memory or device there"
            vm.dead = RunExit("INTERNAL_ERROR", f"emulation failure: GPA {gpa:#x}: {problem}", e)
            return vm.dead
        if e.code == EXIT_CPUID:
            leaf, subleaf = self.regs.get("rax", 0), self.regs.get("rcx", 0)
            values = self.cpuid(leaf & 0xFFFF_FFFF, subleaf & 0xFFFF_FFFF)
            self.regs.update(zip(("rax", "rbx", "rcx", "rdx"), values, strict=True))
            self._skip(e)
            return None
        if e.code == EXIT_MSR:
            if self._msr(write=bool(e.info1)):
                self._skip(e)
            return None
        if e.code == EXIT_IOIO:
            self._ioio(e.info1)
            self._skip(e)
            return None
        if e.code == EXIT_VMMCALL:
            self._hypercall()
            self._skip(e)
            return None
        if e.code == EXIT_HLT:
            self._skip(e)
            if e.next_rip and not self.vmcb().rflags & RFLAGS_IF:
                # Halted with interrupts off: nothing modelled (INIT, NMI) can wake it.
                return RunExit("DONE", "halted with interrupts disabled", e)
            return RunExit("DONE" if e.detail.get("finished") else "HLT", "", e)
        if e.code == EXIT_SHUTDOWN:
            vm.dead = RunExit("SHUTDOWN", e.detail.get("reason", "triple fault"), e)
            return vm.dead
        if e.code == EXIT_INVALID:
            vm.dead = RunExit("FAIL_ENTRY", "VMRUN refused the VMCB (VMEXIT_INVALID)", e)
            return vm.dead
        vm.dead = RunExit("INTERNAL_ERROR", f"unhandled exit {e.name}", e)
        return vm.dead

    def _emulate_mmio(self, gpa: int, device: Any, base: int) -> str | None:
        """KVM's MMIO emulation of a MOV: the instruction's bytes come from the VMCB (the
        hardware's decode assists; KVM cannot read an SEV guest's code), the address from
        EXITINFO2. Returns what went wrong, or None."""
        v = self.vmcb()
        code = v.insn_bytes[: v.insn_len]
        if not code:
            return "no instruction bytes (decode assists gave none)"
        long_mode = v.efer & 1 << 10 and v.cs_attrib & 0x200
        bitness = 64 if long_mode else (32 if v.cr0 & 1 and v.cs_attrib & 0x400 else 16)
        ins = decode(code, v.rip, bitness)
        if ins.mnemonic not in (Mnemonic.MOV, Mnemonic.MOVZX) or ins.op_count != 2:
            return f"cannot emulate {disassemble(code, v.rip, bitness, 1)[0][2]!r}"
        offset = gpa - base
        if ins.op0_kind == OpKind.REGISTER:  # a load
            value = device.read(offset)
            self._set_register(ins.op0_register, value)
        elif ins.op1_kind == OpKind.REGISTER:  # a store from a register
            device.write(offset, self._register(ins.op1_register))
        else:  # a store of an immediate
            device.write(offset, ins.immediate(1))
        self.set_vmcb(rip=v.rip + ins.len, rax=self.regs.get("rax", v.rax))
        return None

    def _register(self, reg: int) -> int:
        full = RegisterInfo(reg).full_register
        value = self.regs.get(_REG_NAMES[full], 0)
        return value & (1 << 8 * RegisterInfo(reg).size) - 1

    def _set_register(self, reg: int, value: int) -> None:
        name = _REG_NAMES[RegisterInfo(reg).full_register]
        size = RegisterInfo(reg).size
        if size >= 4:
            self.regs[name] = value & (1 << 8 * size) - 1  # a 32-bit write zero-extends
        else:
            mask = (1 << 8 * size) - 1
            self.regs[name] = self.regs.get(name, 0) & ~mask | value & mask

    def _skip(self, e: Exit) -> None:
        """kvm_skip_emulated_instruction: RIP moves to NEXT_RIP (real-code vCPUs)."""
        if e.next_rip:
            self.set_vmcb(rip=e.next_rip)

    # ---- emulation ---------------------------------------------------------------------------
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The CPUID a VMM like QEMU configures for its guest (KVM_SET_CPUID2)."""
        host = self.vm.kernel.core.cpuid
        if leaf == 0x4000_0000:
            ebx, ecx, edx = (crypto.from_le(KVM_SIGNATURE[i : i + 4]) for i in (0, 4, 8))
            return (0x4000_0001, ebx, ecx, edx)
        if 0x4000_0001 <= leaf <= 0x4000_00FF:
            return (0, 0, 0, 0)
        if leaf == 0x1:
            eax, ebx, ecx, edx = host(leaf, subleaf)
            ebx = (ebx & 0x00FF_FFFF) | self.index << 24  # initial APIC id
            return (eax, ebx, ecx | LEAF1_ECX_HYPERVISOR, edx)
        if leaf == 0x8000_001F:
            if not self.vm.sev:
                return (0, 0, 0, 0)
            # QEMU (target/i386/cpu.c): SEV only, the C-bit and the reduction it was given.
            return (1 << 1, self.vm.kvm.cbit | self.vm.kvm.reduced_phys_bits << 6, 0, 0)
        if leaf == 0x8000_000A:
            return (0, 0, 0, 0)  # no nested SVM for the guest
        return host(leaf, subleaf)

    def _msr(self, write: bool) -> bool:
        """True if the MSR access was emulated (RIP moves on), False if #GP was injected."""
        index = self.regs.get("rcx", 0) & 0xFFFF_FFFF
        if index == MSR_APIC_BASE and not write:
            value = 0xFEE0_0000 | 1 << 11 | (1 << 8 if self.index == 0 else 0)
            self.regs.update(rax=value & 0xFFFF_FFFF, rdx=value >> 32)
            return True
        # Anything else: #GP into the guest, as KVM does without ignore_msrs.
        self.set_vmcb(
            event_inj=EVENTINJ_VALID | EVENTINJ_ERROR_VALID | EVENTINJ_TYPE_EXCEPTION | GP_VECTOR
        )  # error code 0 in bits 63:32
        return False

    def _ioio(self, info1: int) -> None:
        """KVM_EXIT_IO: the device on the port handles it; no device reads all ones."""
        port = info1 >> IOIO_PORT_SHIFT & 0xFFFF
        size = next(n for n, bit in IOIO_SIZE_BITS.items() if info1 & bit)
        device = self.vm.io_ports.get(port)
        if info1 & IOIO_TYPE_IN:
            value = device.io_in(port, size) if device else (1 << 8 * size) - 1
            self.regs["rax"] = value
        elif device:
            device.io_out(port, self.regs.get("rax", 0), size)

    def _hypercall(self) -> None:
        nr = self.regs.get("rax", 0)
        args = tuple(self.regs.get(r, 0) for r in ("rbx", "rcx", "rdx", "rsi"))
        self.vm.hypercalls.append((nr, args))
        if nr == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = args[0], args[1], args[2]
            if not attrs & KVM_MAP_GPA_RANGE_ENCRYPTED:
                self.vm.shared_ranges.append((gpa, npages))
            else:
                self.vm.shared_ranges = [r for r in self.vm.shared_ranges if r[0] != gpa]
            self.regs["rax"] = 0
        else:
            self.regs["rax"] = -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF
