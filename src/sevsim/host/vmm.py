"""A VMM in the manner of QEMU: one SEV guest, its firmware, fw_cfg, a console, and the
launch sequence QEMU drives (Linux target/i386/sev.c and hw/i386 in QEMU, read for facts).

The sequence, as QEMU runs it with ``-S``: LAUNCH_START (with the owner's GODH and session
files, base64) and ACTIVATE; the firmware image mapped to end at 4 GiB and encrypted and
measured whole with LAUNCH_UPDATE_DATA; with ``--kernel``, the SEV hashes table written
into the area the firmware's footer table names and measured too; LAUNCH_MEASURE; then
the VM waits, paused, while the owner checks the measurement and injects secrets;
``cont`` does LAUNCH_FINISH and runs the vCPUs.

Everything here is host software: it sees the guest's memory only through its own
mappings, and the guest's secrets never pass through it in the clear.
"""

from __future__ import annotations

import base64
import dataclasses
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevsim.api import fwcfg, guidtable, ovmf
from sevsim.api.policy import PolicyFlag
from sevsim.api.vmsa import vcpu_signature
from sevsim.host import cmos, migration, pc
from sevsim.host.cmos import Cmos
from sevsim.host.debug import SIGABRT, SIGINT, SIGQUIT, SIGTRAP, GuestDebug
from sevsim.host.kvm import (
    COM1,
    MAX_FIRMWARE,
    PC_LOWMEM,
    PC_LOWMEM_LIMIT,
    KvmError,
    RunExit,
    SerialPort,
    Vm,
)
from sevsim.host.monitor import Monitor, MonitorError
from sevsim.host.virtio_blk import DiskError, VirtioBlkDevice
from sevsim.system import HostSystem

MIN_MEMORY = 16 << 20
STEP_SLICES = 20  # a Ctrl-C's step gives up after this many time slices (about 1 s)
TIMER_TICK = 0.001  # how long a halted vCPU waits for its next timer interrupt
SEV_STATES = {
    0: "uninit",
    1: "launch-update",
    2: "launch-secret",
    3: "running",
    4: "send-update",
    5: "receive-update",
}


class VmmError(RuntimeError):
    """A VM could not be set up or a request could not be carried out."""


def set_ap_reset_vectors(vm: Vm, table: dict) -> None:
    """QEMU's sev_es_set_reset_vector: KVM cannot set an SEV-ES AP's registers once its VMSA
    is encrypted, so before the launch each AP is pointed at the firmware's AP reset address
    (the SEV-ES reset block of its OVMF footer table): CS base its high half, IP its low."""
    ap_reset = ovmf.reset_address(table)
    if ap_reset is None:
        raise ValueError(
            "SEV-ES: the firmware has no SEV-ES reset block in its OVMF footer table "
            f"(GUID {ovmf.SEV_ES_RESET_BLOCK_GUID}): its APs would have nowhere to start"
        )
    for vcpu in vm.vcpus[1:]:
        vcpu.set_vmcb(cs_base=ap_reset & 0xFFFF_0000, rip=ap_reset & 0xFFFF)


@dataclass
class VmConfig:
    firmware: Path | None
    memory: int = 512 << 20
    smp: int = 1
    policy: int = 0x1  # QEMU's default: no debugging
    dh_cert_file: Path | None = None
    session_file: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    console: Path | None = None
    fw_cfg_files: dict[str, bytes] = field(default_factory=dict)  # QEMU's -fw_cfg name=…
    sev: bool = True  # False: an ordinary VM (QEMU without a sev-guest object)
    disk: Path | None = None  # a raw image for a virtio block device
    disk_access_platform: bool = True  # offer VIRTIO_F_ACCESS_PLATFORM (QEMU iommu_platform)
    disk_iothread: bool = True  # requests on the device's I/O thread (False: in the exit)
    name: str | None = "vm"  # QEMU's -name guest=NAME; None: the platform service picks one
    cpu: str | None = None  # QEMU's -cpu model (api.vmsa.VCPU_TYPES); None: the host's CPUID

    @property
    def sev_es(self) -> bool:
        """SEV-ES, as QEMU decides it: an SEV guest whose policy has the ES bit."""
        return self.sev and bool(self.policy & PolicyFlag.ES)


class FwCfgDevice:
    """QEMU's fw_cfg on its I/O ports: the traditional interface and DMA. DMA descriptors
    and buffers are read and written through the VMM's mapping of guest memory, so an SEV
    guest must put them in pages it has shared."""

    def __init__(self, vm: Vm, items: dict[int, bytes]) -> None:
        self.vm = vm
        self.items = items
        self.selected = 0
        self.offset = 0
        self.dma_high = 0

    def _select(self, key: int) -> None:
        self.selected, self.offset = key, 0

    def _read(self, n: int) -> bytes:
        data = self.items.get(self.selected, b"")[self.offset : self.offset + n]
        self.offset += n
        return data.ljust(n, b"\0")

    def io_out(self, port: int, value: int, size: int) -> None:
        if port == fwcfg.PORT_SELECTOR:
            self._select(value & 0xFFFF)
        elif port == fwcfg.PORT_DMA_HIGH:
            self.dma_high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif port == fwcfg.PORT_DMA_LOW:
            low = int.from_bytes(value.to_bytes(4, "little"), "big")
            self._dma(self.dma_high << 32 | low)

    def io_in(self, port: int, size: int) -> int:
        if port == fwcfg.PORT_DATA:
            return self._read(1)[0]
        return (1 << 8 * size) - 1

    def _dma(self, address: int) -> None:
        vm = self.vm
        try:
            control, length, target = fwcfg.DMA_DESCRIPTOR.unpack(vm.read(address, 16))
            if control & fwcfg.DMA_SELECT:
                self._select(control >> 16)
            if control & fwcfg.DMA_READ:
                vm.write(target, self._read(length))
            elif control & fwcfg.DMA_SKIP:
                self.offset += length
            result = 0
        except ValueError:  # a descriptor or buffer outside guest memory
            result = fwcfg.DMA_ERROR
        try:
            vm.write(address, result.to_bytes(4, "big"))
        except ValueError:
            pass


class ConsoleFile(SerialPort):
    """The serial console, also written line by line to a log file."""

    def __init__(self, sink: bytearray, path: Path | None) -> None:
        super().__init__(sink)
        self.file = None if path is None else open(path, "wb", buffering=0)  # noqa: SIM115

    def io_out(self, port: int, value: int, size: int) -> None:
        before = len(self.sink)
        super().io_out(port, value, size)
        if len(self.sink) > before and self.file is not None and value & 0xFF == ord("\n"):
            line = self.sink[self.sink.rfind(b"\n", 0, len(self.sink) - 1) + 1 :]
            self.file.write(bytes(line))

    def note(self, line: bytes) -> None:
        """A line of the VMM's own (not the guest's) in the console log."""
        if self.file is not None:
            self.file.write(line)

    def close(self) -> None:
        file, self.file = self.file, None  # later lines (a dying vCPU's note) go nowhere
        if file is not None:
            file.close()


@dataclass
class Vmm:
    system: HostSystem
    config: VmConfig
    status: str = "prelaunch"  # QMP's RunState: prelaunch, running, paused, shutdown
    measurement: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    exits: list[RunExit] = field(default_factory=list)
    on_event: Callable[[str, dict[str, Any]], None] | None = None  # e.g. the QMP server
    migration: dict[str, Any] = field(default_factory=dict)
    target: migration.TargetChain | None = None

    def __post_init__(self) -> None:
        self.lock = threading.RLock()  # one actor on the machine at a time
        self._runner: threading.Thread | None = None
        self._running = threading.Event()  # clear while paused
        self._parked = threading.Event()  # set while the runner waits outside the guest
        self.firmware = Path(self.config.firmware).read_bytes() if self.config.firmware else b""
        self.table = ovmf.parse_table(self.firmware)
        self.kvm = self.system.kvm
        self.vm: Vm | None = None
        self.console: ConsoleFile | None = None
        self.disk: VirtioBlkDevice | None = None
        self._finished: set[int] = set()  # vCPUs that ran to their end (or died)
        self.debug = GuestDebug(self)

    # ---- start, paused (QEMU -S) ---------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        if cfg.memory < MIN_MEMORY or cfg.memory % 4096:
            raise VmmError(f"--memory must be a multiple of 4 KiB of at least {MIN_MEMORY >> 20}M")
        size = len(self.firmware)
        if not size or size % 0x1_0000:
            raise VmmError(
                f"could not load PC BIOS {str(cfg.firmware)!r}: the image must be a non-empty "
                f"multiple of 64 KiB, as QEMU's -bios requires ({size} bytes)"
            )
        if size > MAX_FIRMWARE:
            raise VmmError(
                f"a flash image larger than {MAX_FIRMWARE >> 20} MiB does not fit below 4 GiB here"
            )
        if (cfg.dh_cert_file is None) != (cfg.session_file is None):
            raise VmmError("dh-cert-file and session-file go together")
        if not cfg.sev and (cfg.dh_cert_file or cfg.policy):
            raise VmmError("--no-sev: an ordinary VM has no launch session and no SEV policy")
        vm = self._create(cfg.memory, cfg.smp)
        flash = vm.load_firmware(self.firmware)  # every vCPU starts at the reset vector
        if cfg.sev_es:
            try:
                set_ap_reset_vectors(vm, self.table)
            except ValueError as exc:
                raise VmmError(str(exc)) from None
        if not cfg.sev:
            if cfg.kernel is not None:
                self._load_kernel_hashes(vm, measure=False)
            return
        godh = session = None
        if cfg.dh_cert_file is not None:
            godh = _read_base64(cfg.dh_cert_file, "dh-cert-file")
            session = _read_base64(cfg.session_file, "session-file")
        try:
            vm.sev_launch_start(cfg.policy, godh, session)
            vm.sev_launch_update_data(flash, size)
            if cfg.kernel is not None:
                self._load_kernel_hashes(vm, measure=True)
            if cfg.sev_es:
                vm.sev_launch_update_vmsa()  # every vCPU's VMSA, encrypted and measured
            self.measurement = vm.sev_launch_measure()
        except KvmError as exc:
            raise VmmError(f"sev_launch: {exc}") from None

    def _create(self, memory: int, smp: int) -> Vm:
        """The guest (SEV unless --no-sev) with its RAM, its console and fw_cfg; its vCPUs
        execute real x86 code."""
        cfg = self.config
        kind = "SEV-ES guest" if cfg.sev_es else "SEV guest" if cfg.sev else "VM"
        try:
            signature = vcpu_signature(cfg.cpu) if cfg.cpu else 0
        except ValueError as exc:
            raise VmmError(str(exc)) from None
        try:
            vm = self.vm = self.kvm.create_vm(
                memory,
                vcpus=smp,
                sev=cfg.sev,
                name=cfg.name,
                sev_es=cfg.sev_es,
                cpu_signature=signature,
            )
        except KvmError as exc:
            raise VmmError(f"cannot create the {kind}: {exc}") from None
        self.console = ConsoleFile(vm.console, self.config.console)
        for port in range(COM1, COM1 + 8):
            vm.io_ports[port] = self.console
        below = min(memory, PC_LOWMEM) if memory > PC_LOWMEM_LIMIT else memory
        rtc = Cmos(below_4g=below, above_4g=memory - below, cpus=smp)
        vm.io_ports.update({cmos.PORT_INDEX: rtc, cmos.PORT_DATA: rtc})
        self.board = pc.attach(vm.io_ports, memory, smp)  # PCI, ACPI PM, CPU hotplug
        device = FwCfgDevice(vm, self._fw_cfg_items())
        for port in (fwcfg.PORT_SELECTOR, fwcfg.PORT_DATA, fwcfg.PORT_DMA_HIGH, fwcfg.PORT_DMA_LOW):
            vm.io_ports[port] = device
        if self.config.disk is not None:
            try:
                self.disk = VirtioBlkDevice(
                    vm,
                    self.config.disk,
                    self.config.disk_access_platform,
                    self.config.disk_iothread,
                )
            except DiskError as exc:
                vm.destroy()
                self.vm = None
                raise VmmError(str(exc)) from None
            self.disk.attach()
        return vm

    def create_incoming(
        self,
        memory: int,
        smp: int,
        slots: list[tuple[int, int, bool]],
        aliases: list[tuple[int, int, int]] = (),
    ) -> None:
        """An empty SEV guest shaped like the one a migration stream describes: its RAM,
        its flash (read-only slots) and the windows that show another slot's pages
        (gpa, size, target gpa), as QEMU rebuilds the machine before the state comes."""
        if memory != self.config.memory:
            raise migration.MigrationError(
                f"the incoming guest has {memory >> 20} MiB of RAM; this VM was given "
                f"{self.config.memory >> 20} MiB (--memory must match)"
            )
        self.config.smp = smp
        try:
            vm = self._create(memory, smp)
            have = {(s.gpa, s.size) for s in vm.slots}  # the RAM every VM of this size has
            for gpa, size, readonly in slots:
                if (gpa, size) not in have:
                    vm.add_memory(gpa, size, readonly=readonly)
            for gpa, size, target in aliases:
                vm.add_alias(gpa, size, target)
        except (VmmError, ValueError) as exc:
            self.discard()
            raise migration.MigrationError(str(exc)) from None

    def discard(self) -> None:
        """Tear down the guest (a failed incoming migration): DEACTIVATE, DECOMMISSION."""
        with self.lock:
            self._close_disk()  # its I/O thread first: it must not touch freed guest memory
            if self.vm is not None and not self.vm.destroyed:
                self.vm.destroy()
            self.vm = None
            if self.console is not None:
                self.console.close()
                self.console = None

    def _close_disk(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    def _fw_cfg_items(self) -> dict[int, bytes]:
        cfg = self.config
        kernel = Path(cfg.kernel).read_bytes() if cfg.kernel else b""
        initrd = Path(cfg.initrd).read_bytes() if cfg.initrd else b""
        cmdline = (cfg.append or "").encode() + b"\0" if cfg.kernel else b""
        directory, files = fwcfg.file_directory(cfg.fw_cfg_files)
        return files | {
            fwcfg.FILE_DIR: directory,
            fwcfg.SIGNATURE: b"QEMU",
            fwcfg.ID: (fwcfg.FEATURE_TRADITIONAL | fwcfg.FEATURE_DMA).to_bytes(4, "little"),
            fwcfg.RAM_SIZE: cfg.memory.to_bytes(8, "little"),
            fwcfg.NB_CPUS: cfg.smp.to_bytes(2, "little"),
            fwcfg.KERNEL_SIZE: len(kernel).to_bytes(4, "little"),
            fwcfg.KERNEL_DATA: kernel,
            fwcfg.INITRD_SIZE: len(initrd).to_bytes(4, "little"),
            fwcfg.INITRD_DATA: initrd,
            fwcfg.CMDLINE_SIZE: len(cmdline).to_bytes(4, "little"),
            fwcfg.CMDLINE_DATA: cmdline,
        }

    def _load_kernel_hashes(self, vm: Vm, measure: bool) -> None:
        """QEMU's kernel-hashes: the padded SEV hashes table, written into the firmware's
        hashes area and (SEV) measured with LAUNCH_UPDATE_DATA."""
        area = ovmf.area(self.table, ovmf.SEV_HASH_TABLE_RV_GUID)
        if area is None:
            if not measure:
                return  # QEMU adds the table only for SEV guests
            raise VmmError("SEV: kernel specified but the guest firmware has no hashes table GUID")
        cfg = self.config
        table = guidtable.sev_hashes_table(
            Path(cfg.kernel).read_bytes(),
            Path(cfg.initrd).read_bytes() if cfg.initrd else b"",
            cfg.append or "",
        )
        if len(table) > area[1]:
            raise VmmError("SEV: the hashes table does not fit the firmware's hashes area")
        vm.write(area[0], table)
        if measure:
            vm.sev_launch_update_data(area[0], len(table))

    # ---- what QMP asks ---------------------------------------------------------------------
    def guest_state(self) -> str:
        with self.lock:
            status = self.vm.sev_guest_status() if self.vm and self.vm.handle else None
        return SEV_STATES.get(status.state if status else 0, "uninit")

    def query_sev(self) -> dict[str, Any]:
        if not self.config.sev:
            raise VmmError("SEV feature is not available")  # QEMU, without a sev-guest object
        major, minor, build = self.system.sev.api_version or (0, 0, 0)
        return {
            "enabled": True,
            "api-major": major,
            "api-minor": minor,
            "build-id": build,
            "policy": self.config.policy,
            "state": self.guest_state(),
            "handle": self.vm.handle if self.vm else 0,
            "sev-type": "sev",  # QEMU: "a legacy SEV or SEV-ES guest"; ES is policy bit 2
        }

    def query_launch_measure(self) -> dict[str, str]:
        if not self.measurement:
            raise VmmError("SEV launch measurement is not available")
        return {"data": base64.b64encode(self.measurement).decode()}

    def query_capabilities(self) -> dict[str, Any]:
        with self.lock:
            result = self.system.sev.pdh_cert_export()
            chip = self.system.sev.get_id2()
        if not result.ok or not chip.ok:
            raise VmmError(f"SEV: could not read the platform's certificates: {result.explain()}")
        ebx = self.system.kernel.core.cpuid(0x8000_001F)[1]
        return {
            "pdh": base64.b64encode(result.data["pdh"]).decode(),
            "cert-chain": base64.b64encode(result.data["chain"]).decode(),
            "cpu0-id": base64.b64encode(chip.data["id"]).decode(),
            "cbitpos": ebx & 0x3F,
            "reduced-phys-bits": ebx >> 6 & 0x3F,
        }

    def inject_secret(self, header_b64: str, secret_b64: str, gpa: int | None) -> None:
        header = _decode("packet-header", header_b64)
        payload = _decode("secret", secret_b64)
        if self.guest_state() != "launch-secret":
            raise VmmError("SEV: Not in correct state")
        if gpa is None:
            area = ovmf.area(self.table, ovmf.SEV_SECRET_GUID)
            if area is None:
                raise VmmError("SEV: no secret area found in OVMF, gpa must be specified.")
            gpa = area[0]
        with self.lock:
            try:
                self.vm.sev_launch_secret(header, payload, gpa)
            except (KvmError, ValueError) as exc:
                raise VmmError(f"SEV: failed to inject secret: {exc}") from None

    def attestation_report(self, mnonce_b64: str) -> dict[str, str]:
        mnonce = _decode("mnonce", mnonce_b64)
        if len(mnonce) != 16:
            raise VmmError("SEV: mnonce must be 16 bytes")
        with self.lock:
            try:
                report = self.vm.sev_attestation_report(mnonce)
            except KvmError as exc:
                raise VmmError(f"SEV: failed to get the attestation report: {exc}") from None
        return {"data": base64.b64encode(report).decode()}

    def human_monitor_command(self, line: str, cpu_index: int | None = None) -> str:
        """QMP human-monitor-command: HMP's info registers, x, xp, info tlb, info mem."""
        with self.lock:
            if self.vm is None or self.vm.destroyed:
                raise VmmError("no guest")
            monitor = Monitor(self.vm)
            try:
                if cpu_index is not None:
                    monitor.execute(f"cpu {cpu_index}")
                return monitor.execute(line)
            except MonitorError as exc:
                return f"{exc}\n"  # HMP prints its errors as output

    # ---- run state -------------------------------------------------------------------------
    def cont(self) -> None:
        with self.lock:
            if self.status == "shutdown":
                raise VmmError("the guest has shut down")
            if self.status == "prelaunch" and self.config.sev:
                try:
                    self.vm.sev_launch_finish()  # QEMU: when the VM first runs
                except KvmError as exc:
                    raise VmmError(f"sev_launch_finish: {exc}") from None
            if self.status == "running":
                return
            self.status = "running"
            self._running.set()
        self._emit("RESUME", {})
        if self._runner is None:
            self._runner = threading.Thread(target=self._run_vcpus, name="vcpus", daemon=True)
            self._runner.start()

    def stop(self) -> None:
        self._running.clear()  # before the lock: the runner must not go back in
        self._kick_vcpus()
        with self.lock:
            if self.status == "running":
                self.status = "paused"
        self._emit("STOP", {})

    def _kick_vcpus(self) -> None:
        """Get every vCPU out of KVM_RUN at its next exit (QEMU signals the vCPU threads)."""
        if self.vm is not None:
            for vcpu in self.vm.vcpus:
                vcpu.kick.set()

    def _run_vcpus(self) -> None:
        vm = self.vm
        done = self._finished
        # Until every vCPU has finished, or all that have not wait for a STARTUP IPI (which
        # only a running vCPU could send).
        while any(v.index not in done and not v.parked for v in vm.vcpus):
            halted = True
            for vcpu in vm.vcpus:
                if vcpu.index in done or vcpu.parked:
                    continue
                if not self._running.is_set():
                    self._parked.set()  # a migration (or 'stop') waits for this
                    self._running.wait()
                    self._parked.clear()
                with self.lock:
                    if self.status == "shutdown":
                        return
                    exit_ = vcpu.run()
                    if self.debug.stop_requested and exit_.reason == "INTR":
                        # To the next instruction boundary; a step that does not end within
                        # a few time slices (a vCPU kicked inside an IN/OUT runs on to the
                        # end of its translated block, whose chained successors never look
                        # at TF again) stops where the slice left it, between two blocks.
                        exit_ = self._step(vcpu, max_slices=STEP_SLICES)
                    if exit_.reason == "DEBUG" or (
                        self.debug.stop_requested and exit_.reason in ("HLT", "INTR")
                    ):
                        self._debug_stopped(vcpu, exit_)
                        halted = False
                        continue
                if exit_.reason == "INTR":
                    halted = False  # the VMM asked: look at the state again, then go on
                elif exit_.reason != "HLT":
                    halted = False
                    done.add(vcpu.index)
                    self.exits.append(exit_)
                if vm.dead is not None:
                    self._guest_died(vcpu.index, vm.dead)
                    return
            if halted:
                time.sleep(TIMER_TICK)  # every vCPU waits in HLT: until the next timer tick
        self._parked.set()
        self.debug.stop_requested = False
        self.debug.record({"cpu": 0, "signal": SIGTRAP, "reason": "finished"})

    def _guest_died(self, index: int, dead: RunExit) -> None:
        """The guest cannot go on: a triple fault (QEMU with -no-reboot: 'shutdown'), or a
        vCPU KVM cannot run (stuck, internal error: 'internal-error'). The reason goes to
        the console log, as QEMU writes it to its log."""
        status = "shutdown" if dead.reason == "SHUTDOWN" else "internal-error"
        line = f"sevsim: vCPU {index} stopped: {dead.reason}: {dead.detail}\n"
        with self.lock:
            if self.status == "shutdown":
                return  # 'quit' tore the guest down: that is not the guest dying
            if self.console is not None:
                self.console.note(line.encode())
            self.status = status
        # QEMU's gdbstub: SIGQUIT for a shutdown, SIGABRT for an internal error.
        signal = SIGQUIT if status == "shutdown" else SIGABRT
        self.debug.record({"cpu": index, "signal": signal, "reason": "died"})
        if status == "shutdown":
            self._emit("SHUTDOWN", {"guest": True, "reason": "guest-reset"})
        else:
            self._emit("GUEST_PANICKED", {"action": "pause", "info": {"type": dead.reason}})

    # ---- a debugger (vm run --gdb: host/gdbstub.py speaks GDB's protocol, host/debug.py) -----
    def _stopped(self) -> bool:
        runner = self._runner
        return runner is None or not runner.is_alive() or not self._running.is_set()

    def _step(self, vcpu, max_slices: int | None = None) -> RunExit:
        """One instruction of one vCPU (KVM_GUESTDBG_SINGLESTEP); the lock is held. With
        ``max_slices``, give up after that many host time slices (the INTR exit)."""
        self.debug.apply(step=vcpu)
        slices = 0
        try:
            vcpu.kick.clear()
            while (exit_ := vcpu.run()).reason == "INTR":
                slices += 1
                if max_slices is not None and slices >= max_slices:
                    break
                vcpu.kick.clear()
        finally:
            self.debug.apply()
        return exit_

    def _debug_stopped(self, vcpu, exit_: RunExit) -> None:
        """All-stop: one vCPU's debug exit (or an interrupt) stops every vCPU."""
        self._running.clear()
        if exit_.reason == "DEBUG" and not self.debug.stop_requested:
            stop = self.debug.describe(vcpu)
        else:
            stop = {"cpu": vcpu.index, "signal": SIGINT, "reason": "interrupt"}
        self.debug.stop_requested = False
        self.status = "debug"  # QEMU's RunState while a debugger holds the guest
        self.debug.record(stop)
        self._emit("STOP", {})

    def debug_vcpus(self) -> int:
        return len(self.vm.vcpus) if self.vm is not None else 0

    def debug_interrupt(self) -> None:
        """Ctrl-C in the debugger: stop at the next instruction boundary; the stop comes
        through debug_wait."""
        if self._stopped():
            self.debug.record({"cpu": 0, "signal": SIGINT, "reason": "interrupt"})
            return
        self.debug.stop_requested = True
        self._kick_vcpus()

    def debug_serve(self) -> None:
        """A debugger may attach at any time (vm run --gdb): a vCPU that runs without exits
        is waiting for it, not stuck — QEMU never stops a spinning guest, and the model's KVM
        (``spin_budget``) must not either while a gdb server is up."""
        if self.vm is not None:
            self.vm.spin_budget = 1 << 62

    def debug_attach(self, timeout: float = 30.0) -> dict[str, Any]:
        """A debugger connects: the guest stops (QEMU stops the VM), breakpoints reset."""
        self.debug.forget_stop()
        if not self._stopped():
            self.debug_interrupt()
            stop = self.debug.wait(timeout)
            if stop is not None:
                return stop
        return {"cpu": 0, "signal": SIGTRAP, "reason": "attach"}

    def debug_wait(self, timeout: float) -> dict[str, Any] | None:
        return self.debug.wait(timeout)

    def debug_cont(self) -> None:
        if not self._stopped():
            return  # it runs already (the runner holds the lock while a vCPU runs)
        self.debug.forget_stop()
        died = self.guest_died
        if died is not None:
            signal = SIGQUIT if died.reason == "SHUTDOWN" else SIGABRT
            self.debug.record({"cpu": 0, "signal": signal, "reason": "died"})
            return
        if self._runner is not None and not self._runner.is_alive():
            self.debug.record({"cpu": 0, "signal": SIGTRAP, "reason": "finished"})
            return
        with self.lock:
            self.debug.apply()
        self.cont()

    def debug_step(self, cpu: int) -> dict[str, Any]:
        """One instruction of vCPU ``cpu``, the others staying stopped."""
        if not self._stopped():
            self.debug_attach()
        with self.lock:
            vcpu = self.debug.vcpu(cpu)
            if self.vm.dead is not None or cpu in self._finished or vcpu.parked:
                return {"cpu": cpu, "signal": SIGTRAP, "reason": "step"}  # it cannot move
            if self.status == "prelaunch" and self.config.sev:
                try:
                    self.vm.sev_launch_finish()  # QEMU: when the VM first runs
                except KvmError as exc:
                    raise VmmError(f"sev_launch_finish: {exc}") from None
            self.status = "debug"
            exit_ = self._step(vcpu)
            if exit_.reason == "DEBUG":
                return self.debug.describe(vcpu)
            if exit_.reason not in ("HLT", "WAIT_SIPI"):
                self._finished.add(cpu)
                self.exits.append(exit_)
        if self.vm.dead is not None:
            self._guest_died(cpu, self.vm.dead)
            return self.debug.wait(0) or {"cpu": cpu, "signal": SIGABRT, "reason": "died"}
        return {"cpu": cpu, "signal": SIGTRAP, "reason": "step"}

    def debug_registers(self, cpu: int) -> dict[str, int]:
        with self.lock:
            return self.debug.registers(cpu)

    def debug_set_registers(self, cpu: int, values: dict[str, int]) -> None:
        with self.lock:
            self.debug.set_registers(cpu, values)

    def debug_read(self, cpu: int, addr: int, n: int) -> bytes:
        with self.lock:
            return self.debug.read(cpu, addr, n)

    def debug_write(self, cpu: int, addr: int, data: bytes) -> None:
        with self.lock:
            self.debug.write(cpu, addr, data)

    def debug_breakpoint(self, kind: str, cpu: int, addr: int, insert: bool) -> None:
        with self.lock:
            if insert:
                self.debug.insert_breakpoint(kind, cpu, addr)
            else:
                self.debug.remove_breakpoint(kind, addr)

    def debug_detach(self) -> None:
        """The debugger leaves: its breakpoints go, and the guest runs on (QEMU's 'D')."""
        with self.lock:
            if self.vm is not None and not self.vm.destroyed:
                self.debug.remove_all()
                for vcpu in self.vm.vcpus:
                    vcpu.set_guest_debug(0)
        if self.status in ("debug", "prelaunch", "paused") and self.guest_died is None:
            self.debug_cont()

    @property
    def guest_died(self) -> RunExit | None:
        return None if self.vm is None else self.vm.dead

    def pause_vcpus(self, timeout: float = 30.0) -> None:
        """Stop the vCPUs at their next exit and wait until none is inside the guest, and the
        disk's requests in flight to complete (as QEMU's vm_stop drains block devices)."""
        self._running.clear()
        self._kick_vcpus()
        if self._runner is not None and self._runner.is_alive():
            self._parked.wait(timeout)
        if self.disk is not None:
            self.disk.drain(timeout)

    def resume_vcpus(self) -> None:
        self._running.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every vCPU has finished or the guest died (True), or the timeout."""
        if self._runner is None:
            return False
        self._runner.join(timeout)
        return not self._runner.is_alive()

    def quit(self) -> None:
        self.status = "shutdown"  # the runner sees it before its next KVM_RUN
        self._running.set()  # a paused runner wakes and sees it too
        self._kick_vcpus()
        with self.lock:
            self._close_disk()  # its I/O thread first: it must not touch freed guest memory
            if self.vm is not None and not self.vm.destroyed:
                self.vm.destroy()
            if self.console is not None:
                self.console.close()

    # ---- migration and snapshots (docs/migration.md) ----------------------------------------
    def set_migration_parameters(self, pdh: str, plat_cert: str, amd_cert: str = "") -> None:
        """QMP migrate-set-parameters: the receiving platform's certificates (base64)."""
        try:
            self.target = migration.TargetChain.from_base64(pdh, plat_cert, amd_cert)
        except migration.MigrationError as exc:
            raise VmmError(str(exc)) from None

    def migrate(self, uri: str, wait: bool = False) -> None:
        """QMP migrate: ``tcp:HOST:PORT`` to another platform, ``file:PATH`` for a snapshot.
        Runs in the background; query_migrate reports it."""
        if self.config.sev_es:
            # QEMU's migration blocker: the SEND_UPDATE_VMSA path is not implemented by KVM's
            # KVM_SEV_SEND_* API, so an SEV-ES guest is refused before anything is sent.
            raise VmmError("SEV-ES: migration is not implemented (the guest keeps running here)")
        if self.target is None:
            raise VmmError("SEV: set the target's sev-pdh and sev-plat-cert first")
        if self.status not in ("running", "paused"):
            raise VmmError(f"cannot migrate a guest in state {self.status}")
        if self.migration.get("status") in ("setup", "active"):
            raise VmmError("a migration is already in progress")
        kind, _, where = uri.partition(":")
        if kind not in ("tcp", "file") or not where:
            raise VmmError(f"unsupported migration URI {uri!r} (tcp:HOST:PORT or file:PATH)")
        self.migration = {"status": "setup", "transferred": 0, "total": 0}
        worker = threading.Thread(target=self._migrate, args=(kind, where), daemon=True)
        worker.start()
        if wait:
            worker.join()

    def _progress(self, done: int, total: int) -> None:
        self.migration.update(status="active", transferred=done, total=total)

    def _migrate(self, kind: str, where: str) -> None:
        before = self.status
        self.pause_vcpus()
        self.status = "finish-migrate"
        self._emit("MIGRATION", {"status": "setup"})
        try:
            if self.disk is not None and not self.disk.drain(30):
                raise migration.MigrationError("the disk's requests in flight did not complete")
            with self.lock:
                if kind == "file":
                    migration.snapshot(self, Path(where), self.target, self._progress)
                else:
                    self._migrate_tcp(where)
        except Exception as exc:  # noqa: BLE001 - every failure ends the same way
            with self.lock:
                if self.vm.sev_guest_status().state == migration.SUPDATE:
                    self.vm.sev_send_cancel()  # the guest stays, RUNNING, intact
            # The run state first: whoever sees "failed" must find the guest running.
            self.status = before
            if before == "running":
                self.resume_vcpus()
            self.migration.update(status="failed", error=str(exc))
            self._emit("MIGRATION", {"status": "failed"})
            return
        if kind == "file":  # a snapshot: the guest carries on
            self.status = before
            if before == "running":
                self.resume_vcpus()
        else:
            self.status = "postmigrate"
        self.migration["status"] = "completed"
        self._emit("MIGRATION", {"status": "completed"})

    def _migrate_tcp(self, where: str) -> None:
        host, _, port = where.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=60)
        except (OSError, ValueError) as exc:
            raise migration.MigrationError(f"cannot connect to {where}: {exc}") from None
        with sock, sock.makefile("rwb", buffering=1 << 20) as stream:

            def progress(done: int, total: int) -> None:
                self._progress(done, total)
                # The destination speaks before the end only to refuse: stop sending then.
                if select.select([sock], [], [], 0)[0]:
                    reply = stream.readline().decode("utf-8", "replace").strip()
                    raise migration.MigrationError(f"the destination refused: {reply or 'EOF'}")

            migration.send(self, stream, self.target, progress)
            reply = stream.readline().decode("utf-8", "replace").strip()
            if reply != "READY":
                raise migration.MigrationError(f"the destination refused: {reply or 'EOF'}")
            self.vm.sev_send_finish()
            stream.write(b"COMMIT\n")
            stream.flush()

    def query_migrate(self) -> dict[str, Any]:
        m = self.migration
        out: dict[str, Any] = {"status": m.get("status", "none")}
        if "total" in m:
            total, done = m["total"], m["transferred"]
            out["ram"] = {"transferred": done, "total": total, "remaining": max(0, total - done)}
        if "error" in m:
            out["error-desc"] = m["error"]
        return out

    def listen_incoming(self, where: str) -> socket.socket:
        """Bind ``HOST:PORT`` for an incoming migration (before the VMM says it is ready)."""
        host, _, port = where.rpartition(":")
        try:
            server = socket.create_server((host, int(port)))
        except (OSError, ValueError) as exc:
            raise VmmError(f"cannot listen on {where}: {exc}") from None
        self.status = "inmigrate"
        return server

    def serve_incoming(self, server: socket.socket) -> None:
        """Accept senders until one commits; a failed attempt is discarded and the next
        may come. Then the guest runs."""
        with server:
            while self.status == "inmigrate":
                server.settimeout(0.5)
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn, conn.makefile("rwb", buffering=1 << 20) as stream:
                    conn.settimeout(60)
                    if self._receive_one(stream):
                        return

    def _receive_one(self, stream) -> bool:
        try:
            with self.lock:
                migration.receive(self, stream)
        except (migration.MigrationError, OSError) as exc:
            self.migration = {"status": "failed", "error": str(exc)}
            try:
                stream.write(f"ERROR {exc}\n".encode())
                stream.flush()
                # Read on until the sender hangs up, so the refusal reaches it (closing with
                # unread data would reset the connection and could lose the line).
                while stream.read1(1 << 16):
                    pass
            except OSError:
                pass
            return False
        try:
            stream.write(b"READY\n")
            stream.flush()
            reply = stream.readline().strip()
        except OSError:
            reply = b""
        if reply == b"":
            # The connection died after READY: the sender may have finished (its guest is
            # gone, this copy is the only one) or not (its guest runs on). Discarding
            # could lose the guest and running could duplicate it, so keep the copy
            # paused for whoever can ask the source (its query-migrate says which).
            self.migration = {
                "status": "unconfirmed",
                "error": "the connection was lost before COMMIT: this copy is kept paused; "
                "'cont' it only if the source reports the migration completed",
            }
            self.status = "paused"
            self._emit("MIGRATION", {"status": "unconfirmed"})
            return True
        if reply != b"COMMIT":
            self.migration = {"status": "failed", "error": "the sender did not commit"}
            self.discard()
            return False
        self.migration = {"status": "completed"}
        self.status = "paused"
        self.cont()
        return True

    def restore(self, path: Path) -> None:
        """Receive a snapshot file; the guest is left paused."""
        try:
            with open(path, "rb") as stream, self.lock:
                migration.receive(self, stream)
        except OSError as exc:
            raise VmmError(f"cannot read the snapshot: {exc}") from None
        except migration.MigrationError as exc:
            raise VmmError(f"the snapshot was refused: {exc}") from None
        self.status = "paused"

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self.events.append({"event": event, "data": data})
        if self.on_event is not None:
            self.on_event(event, data)

    def summary(self) -> dict[str, Any]:
        """What a VM that ran to completion leaves: its measurement, how each vCPU stopped,
        its console and its disk's counters."""
        out: dict[str, Any] = {
            "measurement": self.query_launch_measure()["data"] if self.measurement else "",
            "exits": [{"reason": e.reason, "detail": e.detail} for e in self.exits],
            "console": self.console_text(),
        }
        if self.disk is not None:
            out["disk"] = dataclasses.asdict(self.disk.stats)
        return out

    def console_text(self) -> str:
        return self.vm.console_text() if self.vm else ""


def _decode(what: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise VmmError(f"{what}: not valid base64") from None


def _read_base64(path: Path, what: str) -> bytes:
    try:
        return _decode(what, Path(path).read_text().strip())
    except OSError as exc:
        raise VmmError(f"{what}: {exc}") from None
