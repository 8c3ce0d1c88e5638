"""KVM's core (Linux virt/kvm/kvm_main.c with the x86 MMU): the hypervisor object, VMs
with their memslots and nested page tables, running the vCPUs, IPIs, teardown.

* **Guest memory** is host physical memory (pages from the host kernel), reached by the
  hypervisor through its own direct map — with the host key when the host runs with SME.
* **Nested page tables** are real page-table bytes in host DRAM, built through the direct
  map with the host C-bit on every entry when SME is active (KVM's ``shadow_me_value``),
  filled on demand at #NPF.
* Non-SEV guests get ASIDs above the SEV range (MODEL: one per VM, where KVM hands them
  out per core and generation).

The SEV commands are mixed in from ``sev`` and ``sev_migration``; the vCPU is in ``svm``.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sevsim.host import lapic
from sevsim.host.kernel import PAGE_OFFSET, HostKernel
from sevsim.host.kvm.sev import KvmSev, SevAsids, SevGuest
from sevsim.host.kvm.sev_migration import SevMigration
from sevsim.host.kvm.svm import EFER_SVME, Vcpu
from sevsim.host.kvm.uapi import PARKED, KvmError, RunExit
from sevsim.host.sev import SevDevice
from sevsim.pagetables import LinearWindow, PageTables
from sevsim.soc import msr
from sevsim.soc.core import Core
from sevsim.soc.paging import PAGE_2M, PAGE_4K, RW, US, A, D, P

MAX_FIRMWARE = 16 << 20  # the flash window below 4 GiB that the VMM maps
PC_LOWMEM_LIMIT, PC_LOWMEM = 0xE000_0000, 0xC000_0000  # QEMU pc: RAM below 4 GiB
NPT_TABLE = P | RW | US | A | D  # nested walks are user accesses: every level needs US
NPT_LEAF = P | RW | US | A | D

COM1 = 0x3F8  # the serial console's data port
COM1_LSR = COM1 + 5  # line status: bit 5 = transmitter empty


class Kvm(KvmSev):
    """The hypervisor: one per host kernel (its SEV commands: ``KvmSev``)."""

    def __init__(self, kernel: HostKernel, sev: SevDevice | None = None) -> None:
        self.kernel = kernel
        self.sev = sev
        core = kernel.core
        eax, ebx, ecx, edx = core.cpuid(0x8000_001F)
        self.sev_supported = bool(eax >> 1 & 1) and sev is not None
        # sev_hardware_setup: SEV-ES needs the feature and at least one ES ASID (EDX > 1).
        self.sev_es_supported = self.sev_supported and bool(eax >> 3 & 1) and edx > 1
        self.sme_coherent = bool(eax >> 10 & 1)
        self.cbit = ebx & 0x3F
        self.nasid = core.cpuid(0x8000_000A)[1]
        self.asids = SevAsids(max(edx, 1), ecx, self._flush_asids)
        self.reduced_phys_bits = 1  # what QEMU is usually told (-object sev-guest,...)
        self._next_plain_asid = ecx + 1
        self._svm_on: set[int] = set()
        self.sev_vmcbs: dict[tuple[int, int], int] = {}  # (core, ASID) -> VMCB: sev_vmcbs
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

    def plain_asid(self) -> int:
        asid = self._next_plain_asid
        if asid >= self.nasid:
            raise KvmError("out of non-SEV ASIDs (MODEL: they are not recycled)")
        self._next_plain_asid += 1
        return asid

    # ---- VMs ----------------------------------------------------------------------------
    def create_vm(
        self,
        memory: int,
        vcpus: int = 1,
        sev: bool = False,
        name: str = "",
        sev_es: bool = False,
        cpu_signature: int = 0,
    ) -> Vm:
        """KVM_CREATE_VM + guest memory + KVM_CREATE_VCPU × n (+ KVM_SEV_INIT, or
        KVM_SEV_ES_INIT: an ASID from the SEV-ES range and a VMSA per vCPU). The vCPUs
        execute real machine code from the reset vector (``Vm.load_firmware``);
        ``cpu_signature`` is CPUID 1 EAX of QEMU's -cpu model (0: the host's)."""
        if (sev or sev_es) and not self.sev_supported:
            raise KvmError("SEV is not supported or not initialised", err=errno.ENOTTY)
        if sev_es and not self.sev_es_supported:
            raise KvmError(
                "SEV-ES is not supported: the part has no SEV-ES ASID "
                "(CPUID 0x8000001F EDX, the BIOS's 'SEV-ES ASID space limit', is 1)",
                err=errno.ENOTTY,
            )
        vm = Vm(self, memory, vcpus, sev or sev_es, name or f"vm{len(self.log)}", sev_es)
        vm.cpu_signature = cpu_signature
        return vm


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
    """A 16550 UART as far as a console needs (QEMU's hw/char/serial.c): bytes out of the
    data port; "transmitter empty" in LSR and no interrupt pending in IIR; and the
    registers a driver writes and reads back to find the UART — the divisor latch (LCR
    bit 7, DLAB), IER, LCR, MCR and the scratch register, which OVMF's serial driver
    probes with 0xAA and 0x55 before it trusts the port. Nothing is ever received."""

    LCR_DLAB = 0x80
    MSR_CONNECTED = 0xB0  # DCD, DSR, CTS: a terminal is attached

    def __init__(self, sink: bytearray) -> None:
        self.sink = sink
        self.regs = {"dll": 0x0C, "dlm": 0, "ier": 0, "fcr": 0, "lcr": 0, "mcr": 0, "scr": 0}

    def _dlab(self) -> bool:
        return bool(self.regs["lcr"] & self.LCR_DLAB)

    def io_out(self, port: int, value: int, size: int) -> None:
        offset, value = port - COM1, value & 0xFF
        if offset == 0:
            if self._dlab():
                self.regs["dll"] = value
            else:
                self.sink.append(value)
        elif offset == 1:
            self.regs["dlm" if self._dlab() else "ier"] = value if self._dlab() else value & 0x0F
        elif offset in (2, 3, 4, 7):
            name = {2: "fcr", 3: "lcr", 4: "mcr", 7: "scr"}[offset]
            self.regs[name] = value & 0x1F if name == "mcr" else value

    def io_in(self, port: int, size: int) -> int:
        offset = port - COM1
        if offset == 0:
            return self.regs["dll"] if self._dlab() else 0  # nothing received
        if offset == 1:
            return self.regs["dlm" if self._dlab() else "ier"]
        if offset == 2:
            return 0xC1 if self.regs["fcr"] & 1 else 0x01  # FIFOs on?; no interrupt pending
        if offset == 5:
            return 0x60  # LSR: transmitter empty and idle
        if offset == 6:
            return self.MSR_CONNECTED
        return self.regs[{3: "lcr", 4: "mcr", 7: "scr"}[offset]]


class Vm(SevGuest, SevMigration):
    """A VM: memslots, the nested page table, vCPUs; its KVM_SEV_* commands come from
    ``SevGuest`` (launch, secret, attestation, debug, teardown) and ``SevMigration``."""

    def __init__(
        self, kvm: Kvm, memory: int, nr_vcpus: int, sev: bool, name: str, sev_es: bool = False
    ) -> None:
        if memory <= 0 or memory % PAGE_4K:
            raise ValueError("guest memory must be a positive multiple of 4 KiB")
        if nr_vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        self.kvm = kvm
        self.name = name
        self.kernel = kvm.kernel
        self._populate_lock = threading.Lock()
        self.memory_size = memory
        self.sev = sev
        self.sev_es = sev_es
        self.cpu_signature = 0  # CPUID 1 EAX for the guest (0: the host's)
        self.vmgexits = 0
        self.ghcb_errors: list[str] = []  # requests KVM refused as malformed (for tools)
        self.handle = 0
        self.policy = 0
        self.console = bytearray()
        self.hypercalls: list[tuple[int, tuple[int, ...]]] = []
        self.shared_ranges: list[tuple[int, int]] = []  # (gpa, npages) the guest made shared
        self.dead: RunExit | None = None
        self.destroyed = False
        self.slots: list[MemSlot] = []
        self.aliases: list[MemSlot] = []  # regions that show another slot's pages (isa-bios)
        # A vCPU that runs this many host time slices in a row without any other exit is
        # stuck (spinning, or executing garbage that loops): the VM is stopped.
        self.spin_budget = 200
        self.huge_pages = True  # map 2 MiB frames with one NPT entry where possible
        if memory > PC_LOWMEM_LIMIT:
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
        self.asid = kvm.asids.new(es=sev_es) if sev else kvm.plain_asid()
        self.ipi_source: Vcpu | None = None  # the vCPU whose APIC is sending an IPI
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
        with self._populate_lock:  # the vCPU, the VMM and the disk's I/O thread populate
            return self._populate(slot, gpa, n, first, last, whole_write)

    def _populate(
        self, slot: MemSlot, gpa: int, n: int, first: int, last: int, whole_write: bool
    ) -> int:
        populated = slot.populated
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

    def map_mmio(self, gpa: int) -> None:
        """An MMIO page of an SEV-ES guest: a nested entry with a reserved bit (KVM's MMIO
        SPTE), so that each access raises #VC and the guest asks over its GHCB."""
        self.npt.map(gpa & ~0xFFF, 0, PAGE_4K, NPT_LEAF | self._mmio_reserved_bit())

    def _mmio_reserved_bit(self) -> int:
        """The highest physical-address bit above MAXPHYADDR (as reduced under SME) that is
        not the C-bit: a present entry with it set faults with RSVD."""
        machine = self.kernel.core.machine
        for bit in range(51, machine.phys_bits - 1, -1):
            if 1 << bit != machine.cbit_mask:
                return 1 << bit
        raise KvmError("no reserved physical-address bit for MMIO entries", err=errno.EIO)

    # ---- the firmware (QEMU's -bios) ---------------------------------------------------------
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
        starts a waiting one in real mode at vector << 12 (CS vector << 8, IP 0). An SEV-ES
        vCPU's registers are encrypted: STARTUP only lets it run from its VMSA, which the
        launch set to the firmware's SEV-ES reset block (the vector is ignored)."""
        for vcpu in self.vcpus:
            if target not in (-1, vcpu.index) or (target == -1 and vcpu is self.ipi_source):
                continue
            if mode == lapic.DM_INIT:
                vcpu.reset()
                vcpu.parked = True
            elif mode == lapic.DM_STARTUP and vcpu.parked:
                if not vcpu.guest_state_protected:
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
            self._sev_vm_destroy()
        for vcpu in self.vcpus:
            if vcpu.vmsa_va:  # after the WBINVD: no line of it under the guest's key remains
                self.kernel.free_pages(vcpu.vmsa_va)
        for key in [k for k, v in self.kvm.sev_vmcbs.items() if k[1] == self.asid]:
            del self.kvm.sev_vmcbs[key]
        for slot in self.slots:
            self.kernel.free_pages(slot.hva, slot.size // PAGE_4K)
        self._free_transfer_buffers()
        for pa in self._npt_frames:
            self.kernel.free_pages(self.kernel.va(pa))
        self.destroyed = True


def _runnable(last: RunExit | None) -> bool:
    return last is None or last.reason == "HLT"
