"""A mutation fuzzer for the PSP mailbox: the firmware must behave like a hardened product
under anything a hostile host can write (issue "robustness", docs/reliability.md).

The world: a platform that has been initialised, and KVM guests in several states — a
*sentinel* guest that runs and is never named on purpose, a debuggable guest in RUNNING
state, one in LUPDATE, one in LSECRET. The guests are the real-code image (``sevsim.guest.x86``);
only the sentinel executes it, so that it has private pages to watch (its page tables and
its secret); the others need only their firmware state. While it was built, every command
buffer the host driver sent was recorded: that is the corpus.

A case writes one command through the mailbox registers, as the host driver does, with:
a recorded buffer whose fields were mutated (handles, addresses — unmapped, unaligned,
overlapping, inside a guest's private memory — lengths, flags, bytes), random bytes, or
nothing; a command id from the corpus, any valid id, an SNP id, or an unknown one; and the
buffer at the driver's page or at a hostile address.

After every case the checker asserts: the command completed with RESP and a status the
spec defines; no exception reached the firmware's last-chance handler (an internal
error); the platform and every guest are in states of the spec's tables and no two guests
share an ASID; and the sentinel's state, ASID and private pages are unchanged unless the
buffer named its handle or one of its pages. A platform shut down by a case is rebuilt.
"""

from __future__ import annotations

import gc
import hashlib
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.guest import x86 as x86_guest
from sevsim.host.sev import SevDevice
from sevsim.profiles import MachineProfile, get_profile
from sevsim.psp.guest import GuestState
from sevsim.system import HostSystem

GUEST_MEMORY = x86_guest.MIN_MEMORY
SYMBOLS = x86_guest.symbols()
# The sentinel's private pages the checker watches: its page tables (PML4, PDPT, four PDs,
# the split 4 KiB table) and the page of its secret.
SENTINEL_GPAS = [*range(SYMBOLS["PML4_GPA"], SYMBOLS["SPLIT_PT_GPA"] + 4096, 4096)]
SENTINEL_GPAS.append(SYMBOLS["SECRET_GPA"])
DATA_GPA = SYMBOLS["SECRET_GPA"]  # the page the corpus's debug and migration commands name
DEGRADED_CASES = 20  # cases fuzzed after a shutdown before the world is rebuilt
STATUSES = {int(s) for s in Status}
SNP_IDS = [int(c) for c in Command if c.name.startswith("SNP_")]
ALL_IDS = [int(c) for c in Command]
INTERESTING = [0, 1, 2, 0xFF, 0x1000, 0xFFFF, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1]
LENGTHS = [0, 1, 15, 16, 17, 4095, 4096, 4097, 20 << 10, (20 << 10) + 1, 1 << 20, 0xFFFF_FFFF]


@dataclass
class FuzzReport:
    cases: int = 0
    seed: int = 0
    rebuilds: int = 0
    degraded_cases: int = 0  # cases run after a shutdown: UNINIT or INIT, guests gone
    statuses: Counter = field(default_factory=Counter)
    commands: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "seed": self.seed,
            "violations": self.violations,
            "rebuilds": self.rebuilds,
            "cases_without_working_platform": self.degraded_cases,
            "distinct_commands": len(self.commands),
            "statuses": {Status(s).name: n for s, n in sorted(self.statuses.items())},
        }


class World:
    """A platform with guests in several states, and the recorded corpus."""

    def __init__(self, profile: MachineProfile, state_dir: Path) -> None:
        self.corpus: list[tuple[int, bytes]] = []
        original = SevDevice.do_cmd

        def recording(device, command, buffer=None):
            if buffer is not None:
                self.corpus.append((int(command), bytes(buffer)))
            return original(device, command, buffer)

        SevDevice.do_cmd = recording  # type: ignore[method-assign]
        try:
            self.system = HostSystem.start(profile, state_dir=state_dir)
            self._populate()
        finally:
            SevDevice.do_cmd = original  # type: ignore[method-assign]
        self.psp = self.system.inspection_port()  # the checker's window into the firmware
        self.mailbox = self.system.platform.mailbox
        self.regs = self.mailbox.registers
        kernel = self.system.kernel
        self.cmd_page = kernel.alloc_pages(1)
        self.data_pages = kernel.alloc_pages(8)
        self.sentinel_pages = [self.sentinel.spa(gpa) for gpa in SENTINEL_GPAS]
        kernel.wbinvd_on_all_cpus()  # DRAM current: no dirty line of the sentinel is left
        self.sentinel_guest = self.psp.guest(self.sentinel.handle)  # (handles are reused)
        self.sentinel_state = self._sentinel_fingerprint()

    def _guest(self, name: str, policy: int, stage: str):
        """A real-code guest launched as far as ``stage``: "running" (LAUNCH_FINISH done),
        "lsecret" (measured) or "lupdate" (its image encrypted)."""
        if stage == "running":
            return self.system.start_x86_guest(name, memory=GUEST_MEMORY, policy=policy)
        vm = self.system.kvm.create_vm(GUEST_MEMORY, sev=True, name=name)
        image = x86_guest.image()
        base = vm.load_firmware(image)
        vm.sev_launch_start(policy)
        vm.sev_launch_update_data(base, len(image))
        if stage == "lsecret":
            vm.sev_launch_measure()
        return vm

    def _populate(self) -> None:
        from sevsim.host.migration import TargetChain

        sev = self.system.sev
        self.sentinel = self._guest("sentinel", 0x1, "running")
        self.sentinel.run()  # its page tables and secret: private pages to watch
        self.debuggable = self._guest("debuggable", 0x0, "running")
        self.lupdate = self._guest("lupdate", 0x0, "lupdate")
        self.lsecret = self._guest("lsecret", 0x0, "lsecret")
        self.debuggable.sev_dbg_decrypt(DATA_GPA, 64)
        # Guests half-way through a migration to this same platform: SUPDATE, SENT, RUPDATE.
        own = TargetChain.from_chain(self.system.export_chain(full=True).encode(full=True))
        self.supdate = self._guest("supdate", 0x0, "running")
        blob, policy = self.supdate.sev_send_start(own.pdh, own.plat_certs, own.amd_certs)
        header, data = self.supdate.sev_send_update_data(DATA_GPA, 4096)
        self.sent = self._guest("sent", 0x0, "running")
        self.sent.sev_send_start(own.pdh, own.plat_certs, own.amd_certs)
        self.sent.sev_send_finish()
        self.rupdate = self.system.kvm.create_vm(GUEST_MEMORY, sev=True, name="rupdate")
        self.rupdate.sev_receive_start(own.pdh, blob, policy)
        self.rupdate.sev_receive_update_data(header, data, DATA_GPA)
        sev.platform_status()
        sev.pek_csr()
        sev.pdh_cert_export()
        sev.get_id2()
        self.system.export_chain()  # its commands for the corpus (the AMD root is not needed)

    def _sentinel_fingerprint(self) -> tuple:
        g = self.psp.guest(self.sentinel.handle)
        digest = hashlib.sha256()
        for pa in self.sentinel_pages:
            digest.update(self.system.machine.dram.read(pa, 4096))
        return (g.state if g else None, g.asid if g else None, digest.hexdigest())

    def close(self) -> None:
        self.system.close()


class MailboxFuzzer:
    def __init__(self, seed: int = 0, profile: MachineProfile | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = (profile or get_profile("milan")).with_(seed=seed, dram_size=1 << 30)
        self._tmp = tempfile.TemporaryDirectory(prefix="sevsim-fuzz-")
        self.report = FuzzReport(seed=seed)
        self._degraded: int | None = None
        self.world = World(self.profile, Path(self._tmp.name) / "state")

    def close(self) -> None:
        self.world.close()
        self._tmp.cleanup()

    # ---- case generation --------------------------------------------------------------------
    def _addresses(self) -> list[int]:
        w, k = self.world, self.world.system.kernel
        cbit = k.me_mask
        data = k.pa(w.data_pages) | cbit
        dram = w.system.machine.dram.size
        return [
            data,
            data + 0x1000,
            data + self.rng.randrange(1, 16),  # unaligned
            data + 0x8000 - self.rng.choice([8, 16, 64]),  # running off the end
            dram + self.rng.randrange(0, 1 << 30) & ~0xF,  # no memory there
            dram - 16,  # the last bytes of DRAM
            (1 << 52) - 4096,
            self.rng.choice(w.sentinel_pages) | cbit,  # a guest's private page
            k.pa(w.cmd_page) | cbit,  # the command buffer itself (overlap)
            0,
        ]

    def _mutate(self, command: int, buffer: bytes) -> bytes:
        """A recorded buffer with some fields (or bits) changed."""
        rng, w = self.rng, self.world
        layout = cmd.BUFFERS.get(cmd.command_of(command))
        data = bytearray(buffer)
        if layout is not None and layout.fields and rng.random() < 0.8:
            record = layout.parse(bytes(data).ljust(layout.size, b"\0"))
            for f in rng.sample(layout.fields, k=min(len(layout.fields), rng.randint(1, 3))):
                if f.is_bytes:
                    value = bytearray(getattr(record, f.name))
                    for _ in range(rng.randint(1, 4)):
                        value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
                    setattr(record, f.name, bytes(value))
                    continue
                if "paddr" in f.name or "address" in f.name:
                    pool = self._addresses()
                elif "len" in f.name or "size" in f.name:
                    pool = LENGTHS
                elif f.name == "handle":
                    others = (w.debuggable, w.lupdate, w.lsecret, w.supdate, w.sent, w.rupdate)
                    pool = [g.handle for g in others] + [0, 999]
                    if rng.random() < 0.05:
                        pool = [w.sentinel.handle]
                else:
                    pool = INTERESTING + [rng.getrandbits(64)]
                value = rng.choice(pool) & ((1 << (8 * f.size)) - 1)
                setattr(record, f.name, value)
            data = bytearray(layout.build(record))
        else:
            for _ in range(rng.randint(1, 8)):
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)

    def _covers(self, layout, record) -> bool:
        """Whether a range the buffer names — an address with any of its lengths — holds a
        sentinel page: SEV firmware writes wherever the host points it (there is no page
        ownership before SNP), so such a case may change the sentinel's memory."""
        mask = ~self.world.system.kernel.me_mask
        values = {f.name: getattr(record, f.name) for f in layout.fields if not f.is_bytes}
        span = max([v for k, v in values.items() if "len" in k] + [4096])
        starts = [v & mask for k, v in values.items() if "paddr" in k or "address" in k]
        pages = self.world.sentinel_pages
        return any(a <= p + 4095 and p < a + span for a in starts for p in pages)

    def _case(self) -> tuple[int, bytes, int, bool]:
        """(command id, buffer, buffer address, names the sentinel)."""
        rng, w = self.rng, self.world
        kernel = w.system.kernel
        roll = rng.random()
        if roll < 0.6:
            command, buffer = rng.choice(w.corpus)
            buffer = self._mutate(command, buffer)
        elif roll < 0.8:
            command = rng.choice(ALL_IDS)
            layout = cmd.BUFFERS.get(Command(command))
            buffer = rng.randbytes(layout.size if layout else 64)
        elif roll < 0.9:
            command, buffer = rng.choice(SNP_IDS), rng.randbytes(128)
        else:
            command, buffer = rng.randrange(0, 1 << 11), rng.randbytes(rng.choice([0, 16, 64]))
        address = kernel.pa(w.cmd_page) | kernel.me_mask
        if rng.random() < 0.15:
            address = rng.choice(self._addresses())
        return command, buffer, address, self._aimed(command, buffer, address)

    def _aimed(self, command: int, buffer: bytes, address: int) -> bool:
        """Whether the case names the sentinel: its handle, or a range holding its pages,
        in the buffer the firmware will read (at a hostile address: whatever is there)."""
        w, kernel = self.world, self.world.system.kernel
        aimed = (address & ~kernel.me_mask & ~0xFFF) in w.sentinel_pages
        layout = cmd.BUFFERS.get(cmd.command_of(command))
        if layout is None or not layout.fields:
            return aimed
        if address != kernel.pa(w.cmd_page) | kernel.me_mask:
            try:
                buffer = w.psp.read(address, layout.size)
            except Exception:  # noqa: BLE001 - the firmware will refuse this address too
                return aimed
        record = layout.parse(buffer.ljust(layout.size, b"\0"))
        aimed |= getattr(record, "handle", None) == w.sentinel.handle
        return aimed or self._covers(layout, record)

    # ---- one case, and the checks -------------------------------------------------------------
    def run(self, cases: int, progress: Callable[[int], None] | None = None) -> FuzzReport:
        for i in range(cases):
            self.one()
            if progress is not None and (i + 1) % 256 == 0:
                progress(i + 1)
        return self.report

    def one(self) -> None:
        w, r = self.world, self.report
        command, buffer, address, aimed = self._case()
        kernel = w.system.kernel
        kernel.write(w.cmd_page, buffer.ljust(4096, b"\0")[:4096])
        errors_before = len(w.psp.internal_errors)
        w.mailbox.write32(w.regs["cmdbuff_addr_lo"], address & 0xFFFF_FFFF)
        w.mailbox.write32(w.regs["cmdbuff_addr_hi"], (address >> 32) & 0xFFFF_FFFF)
        w.mailbox.write32(w.regs["cmdresp"], (command & 0x7FF) << cmd.CMDRESP_CMD_SHIFT)
        reg = w.mailbox.read32(w.regs["cmdresp"])
        r.cases += 1
        r.commands[command & 0x7FF] += 1
        where = f"case {r.cases} (seed {self.seed}): command {command & 0x7FF:#x}"
        status = reg & cmd.CMDRESP_STATUS_MASK
        r.statuses[status] += 1
        if not reg & cmd.CMDRESP_RESP or (reg & cmd.CMDRESP_CMD_MASK) >> 16 != command & 0x7FF:
            r.violations.append(f"{where}: CmdResp {reg:#x} does not complete the command")
        if status not in STATUSES:
            r.violations.append(f"{where}: status {status:#x} is not one the spec defines")
        errors = w.psp.internal_errors
        if len(errors) != errors_before:
            r.violations.append(f"{where}: internal error {errors[-1]}")
        if w.psp.platform_state not in tuple(PlatformState):
            r.violations.append(f"{where}: platform state {w.psp.platform_state!r}")
        guests = w.psp.guests()
        asids = [g.asid for g in guests if g.asid]
        if len(asids) != len(set(asids)):
            r.violations.append(f"{where}: two guests share an ASID {asids}")
        for g in guests:
            if g.state not in tuple(GuestState):
                r.violations.append(f"{where}: guest {g.handle} in state {g.state!r}")
        alive = w.psp.guest(w.sentinel.handle) is w.sentinel_guest
        if w.psp.platform_state != PlatformState.WORKING or not alive or self._degraded is not None:
            # The platform was shut down or reset, or the sentinel decommissioned: fuzz this
            # state (UNINIT, INIT, guests gone) for a while, then build a fresh world.
            if self._degraded is None:
                self._degraded = DEGRADED_CASES
            self._degraded -= 1
            r.degraded_cases += 1
            if self._degraded <= 0:
                self._degraded = None
                self._rebuild()
            return
        now = w._sentinel_fingerprint()
        if not aimed and now != w.sentinel_state:
            r.violations.append(f"{where}: the sentinel guest changed")
        w.sentinel_state = now  # a case that named it may change it: the new baseline

    def _rebuild(self) -> None:
        """A case shut the platform down (or removed the sentinel): start a fresh world."""
        self.report.rebuilds += 1
        self.world.close()
        state = Path(self._tmp.name) / f"state{self.report.rebuilds}"
        self.world = World(self.profile, state)


# ---- ASID load -------------------------------------------------------------------------------
def asid_load(
    cycles: int,
    alive: int = 4,
    asids: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``cycles`` real-code guests launched, run and torn down on milan, ``alive`` at a
    time, with the BIOS leaving ``asids`` ASIDs for plain SEV guests so that KVM keeps
    exhausting and recycling them. The checker watches every ACTIVATE the firmware accepts
    (never onto a dirty ASID) and every recycle (WBINVD on all cores, then DF_FLUSH), and the
    RSS (after 100 cycles, or half of a shorter run, and at the end)."""
    from collections import deque

    from sevsim.bench import rss_bytes

    profile = get_profile("milan")
    profile = profile.with_(seed=seed, dram_size=1 << 30, sev_edx=profile.max_asid - asids)
    violations: list[str] = []
    activations = dirty_refused = 0
    rss: list[int] = []

    with tempfile.TemporaryDirectory(prefix="sevsim-load-") as tmp:
        system = HostSystem.start(profile, state_dir=Path(tmp) / "state")
        try:
            kvm = system.kvm

            def watch(asid: int, dirty: bool, status: Status) -> None:
                nonlocal activations, dirty_refused
                if status == Status.SUCCESS:
                    activations += 1
                    if dirty:
                        violations.append(f"ACTIVATE accepted dirty ASID {asid}")
                elif dirty:
                    dirty_refused += 1

            system.inspection_port().watch_activations(watch)
            running: deque = deque()
            for cycle in range(cycles):
                if len(running) == alive:
                    running.popleft().destroy()
                vm = system.start_x86_guest(f"g{cycle}", memory=GUEST_MEMORY)
                exits = vm.run()
                if [e.reason for e in exits] != ["DONE"]:
                    violations.append(f"cycle {cycle}: the guest ended with {exits}")
                running.append(vm)
                if cycle == min(100, cycles // 2):
                    gc.collect()  # a torn-down engine is cyclic garbage: count only what lives
                    rss.append(rss_bytes())  # after the warm-up
                if progress is not None and (cycle + 1) % 50 == 0:
                    progress(cycle + 1)
            gc.collect()
            rss.append(rss_bytes())
            recycles = [entry for entry in kvm.log if entry.startswith("ASID pool empty")]
            bad = [entry for entry in recycles if not entry.endswith("SUCCESS")]
            violations += [f"recycle failed: {entry}" for entry in bad]
            while running:
                running.popleft().destroy()
        finally:
            system.close()
    return {
        "cycles": cycles,
        "alive": alive,
        "sev_asids": asids,
        "activations": activations,
        "recycles": len(recycles),
        "dirty_asid_activations_refused": dirty_refused,
        "rss_mib_after_warmup": round(rss[0] / (1 << 20), 1),
        "rss_mib_at_end": round(rss[-1] / (1 << 20), 1),
        "violations": violations,
    }
