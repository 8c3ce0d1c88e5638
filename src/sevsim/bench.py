"""``sevsim bench``: speed and memory of the silicon model, as ratios to baselines measured
in the same run (these machines are noisy; absolute numbers are reported too, but the
ratios are what docs/performance.md tracks).

* bulk encrypt/decrypt: 64 MiB of pages written/read through the memory controller in
  ``xex`` mode, against raw AES-128-ECB from ``cryptography`` over the same bytes done the
  fastest way the library allows (one context, ``update_into`` between preallocated
  buffers).
* loads: 8-byte loads at random addresses through a long-mode core whose TLB and cache
  hit, against a bare Python loop of ``struct.unpack_from`` at the same offsets.
* guest code: the real-code guest's register-only loop (``alu_loop``), its loop of 8-byte
  loads and stores over 8 MiB of private memory (``mem_loop``) and its 8-byte loads at
  pseudo-random addresses of 256 KiB (``load_loop``) in an SEV guest —
  every access translated, keyed and cached by the model — against the same functions
  called on the bare engine (Unicorn, flat memory, no model), same run; and the
  instructions per second of each.
* launch: LAUNCH_UPDATE_DATA + LAUNCH_MEASURE of a 64 MiB image through the mailbox (the
  firmware reads the plaintext, hashes it and writes it back under the VEK), against raw
  AES-128-ECB plus SHA-256 of the same bytes.
* command path: the fixed cost of a firmware command (PLATFORM_STATUS from ``/dev/sev`` to
  the firmware and back) and of a one-page SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA beyond
  the raw crypto of that page, in microseconds.
* migrate: a 256 MiB SEV guest that wrote all its RAM moved between two platform
  services in two processes over loopback TCP, page by page (SEND_* and RECEIVE_* through
  both mailboxes, the stream framing, the commit), against the raw crypto both firmwares
  must do on those bytes; and each service's RSS growth during the move, as a multiple of
  the guest size.
* bounce I/O: an SEV guest on an SME host (the real-code guest) writes 64 MiB to its
  virtio disk (a real file) through its swiotlb bounce buffers, timed between its console
  lines, against a plain Python write of the same bytes to a fresh file.
* sparse memory: RSS growth of a fresh process that creates a machine with 1 TiB of DRAM
  and touches 64 MiB of it.
* guest memory: RSS growth of a fresh process in which a 4 GiB SEV guest boots the
  real-code guest, against the memory it touched.
* platform service: ``vm_start_ms``, the time from a client's attach to a running
  platform service to the launch measurement of a 256 MiB SEV guest running the real-code
  guest (create, LAUNCH_START, LAUNCH_UPDATE_DATA of the firmware, LAUNCH_MEASURE), against
  a service round trip (``service_rtt_ms``); and the service's RSS with 8 such guests
  booted and idle, against the DRAM they touched.

Each figure is the median of several rounds; model and baseline alternate within a round.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevsim.profiles import GiB, MiB, TiB, get_profile

# figure -> (comparison, bound); a bound (factor, figure, offset) scales another figure.
Bound = float | tuple[float, str, float]
TARGETS: dict[str, tuple[str, Bound]] = {
    "bulk_encrypt_ratio": (">=", 0.5),
    "bulk_decrypt_ratio": (">=", 0.5),
    "load_ratio": (">=", 0.2),
    "guest_load_ratio": (">=", 0.15),
    "guest_alu_ratio": (">=", 0.5),
    "guest_mem_ratio": (">=", 0.25),
    "launch_ratio": (">=", 0.5),
    "command_us": ("<=", 20),
    "send_page_us": ("<=", 30),
    "migrate_ratio": (">=", 0.2),
    "migrate_rss_growth_ratio": ("<=", 1.5),
    "bounce_io_ratio": (">=", 0.25),
    "sparse_rss_mib": ("<=", (2, "touched_mib", 150)),
    "guest_boot_rss_mib": ("<=", (2, "guest_boot_touched_mib", 150)),
    "service_rss_mib": ("<=", (2, "service_touched_mib", 200)),
}


def target_text(figure: str) -> str:
    op, bound = TARGETS[figure]
    if isinstance(bound, tuple):
        factor, other, offset = bound
        return f"{op} {factor:g} * {other} + {offset:g}"
    return f"{op} {bound:g}"


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    met = {}
    for figure, (op, bound) in TARGETS.items():
        if isinstance(bound, tuple):
            factor, other, offset = bound
            bound = factor * result[other] + offset
        value = result[figure]
        met[figure] = value >= bound if op == ">=" else value <= bound
    return met


Progress = Callable[[str], None]


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_bulk(size: int, rounds: int, progress: Progress) -> dict[str, float]:
    from sevsim.soc import Machine

    machine = Machine(get_profile("milan").with_(dram_size=4 * GiB), engine_mode="xex")
    memctl = machine.memctl
    slot = memctl.host_key_slot
    pa = 1 * GiB
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    out = np.empty(size, dtype=np.uint8)
    key = os.urandom(16)
    raw_enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    raw_dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    raw_in = bytearray(src.tobytes())
    raw_out = bytearray(size + 15)
    # Warm-up: the first write faults in the DRAM pages, which no later round pays again.
    memctl.write_from(pa, src, slot)
    memctl.read_into(pa, out, slot)
    if not np.array_equal(out, src):
        raise AssertionError("bulk round trip through the memory controller failed")
    times: dict[str, list[float]] = {"enc": [], "dec": [], "raw_enc": [], "raw_dec": []}
    for r in range(rounds):
        progress(f"bulk {size >> 20} MiB, round {r + 1}/{rounds}")
        times["raw_enc"].append(_timed(lambda: raw_enc.update_into(raw_in, raw_out)))
        times["enc"].append(_timed(lambda: memctl.write_from(pa, src, slot)))
        times["raw_dec"].append(_timed(lambda: raw_dec.update_into(raw_in, raw_out)))
        times["dec"].append(_timed(lambda: memctl.read_into(pa, out, slot)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bulk_bytes": size,
        "bulk_encrypt_ratio": med["raw_enc"] / med["enc"],
        "bulk_decrypt_ratio": med["raw_dec"] / med["dec"],
        "bulk_encrypt_gbps": size / med["enc"] / 1e9,
        "bulk_decrypt_gbps": size / med["dec"] / 1e9,
        "raw_ecb_encrypt_gbps": size / med["raw_enc"] / 1e9,
        "raw_ecb_decrypt_gbps": size / med["raw_dec"] / 1e9,
    }


def bench_loads(count: int, rounds: int, progress: Progress) -> dict[str, float]:
    from sevsim.host import HostKernel
    from sevsim.soc import Machine

    machine = Machine(get_profile("milan").with_(dram_size=4 * GiB))
    core = machine.cores[0]
    kernel = HostKernel(core)
    kernel.boot()
    span = 256 * 1024  # 64 pages: fits the TLB and the cache, so every load hits
    va = kernel.alloc_pages(span // 4096)
    rng = random.Random(1)
    offsets = [rng.randrange(0, span // 8) * 8 for _ in range(count)]
    addresses = [va + off for off in offsets]
    for a in addresses[:4096]:
        core.load(a, 8)
    for off in range(0, span, 64):
        core.load(va + off, 8)
    buf = bytearray(span)
    unpack = struct.unpack_from
    load = core.load

    def baseline() -> None:
        for off in offsets:
            unpack("<Q", buf, off)

    def model() -> None:
        with machine.turns:  # one host thread that owns the silicon for its loop
            for a in addresses:
                load(a, 8)

    base_t, model_t = [], []
    for r in range(rounds):
        progress(f"loads x{count}, round {r + 1}/{rounds}")
        base_t.append(_timed(baseline))
        model_t.append(_timed(model))
    base, mod = statistics.median(base_t), statistics.median(model_t)
    return {
        "load_count": count,
        "load_ratio": base / mod,
        "loads_per_s": count / mod,
        "baseline_loads_per_s": count / base,
    }


ALU_INSNS = 5  # per iteration of alu_loop (guest/x86/src/workloads.S)
MEM_FILL_INSNS, MEM_INSNS = 4, 7  # per word of mem_loop's fill pass, and of each round
LOAD_INSNS = 14  # per load of load_loop (xorshift step, mask, load and add, loop)
LOADS_BYTES = 256 * 1024  # the guest's load_loop region


def _bare_call(function: str, *args: int) -> float:
    """Call a function of the real-code guest on the bare engine: flat memory, no model."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X

    from sevsim.guest import x86 as x86_guest

    image, sym = x86_guest.image(), x86_guest.symbols()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map((1 << 32) - len(image), len(image))
    uc.mem_write((1 << 32) - len(image), image)
    uc.mem_map(0, 16 * MiB)
    ret = 0x1000
    uc.mem_write(ret, b"\xf4")
    uc.mem_write(0x7FFF8, ret.to_bytes(8, "little"))
    uc.reg_write(X.UC_X86_REG_RSP, 0x7FFF8)
    for reg, value in zip(
        (X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX)[: len(args)], args, strict=True
    ):
        uc.reg_write(reg, value)
    t = time.perf_counter()
    uc.emu_start(sym[function], ret)
    return time.perf_counter() - t


def _guest_phase(vm: Any, start: str, end: str) -> float:
    """Wall time from the guest printing ``start`` to it printing ``end`` (host exits
    included: that is the model's cost)."""
    vcpu = vm.vcpus[0]
    while start not in vm.console_text():
        vcpu.run_once()
    t = time.perf_counter()
    while end not in vm.console_text():
        exit_ = vcpu.run_once()
        if vm.dead is not None:
            raise RuntimeError(f"benchmark guest stopped: {vm.dead.reason} {vm.dead.detail}")
        del exit_
    return time.perf_counter() - t


def bench_guest_code(iterations: int, rounds: int, progress: Progress) -> dict[str, float]:
    """``alu_loop``, ``mem_loop`` and ``load_loop`` in an SEV guest against the same
    functions on the bare engine."""
    from sevsim.guest import x86 as x86_guest
    from sevsim.system import HostSystem

    words = 8 * MiB // 8
    loads = iterations
    work = f"alu:{iterations} mem:{rounds} loads:{loads}"
    progress("guest code: the bare engine")
    bare_alu = min(_bare_call("alu_loop", iterations) for _ in range(3))
    bare_mem = min(_bare_call("mem_loop", 0x40_0000, 8 * MiB, rounds) for _ in range(3))
    loads_gpa = x86_guest.symbols()["LOADS_GPA"]
    bare_loads = min(_bare_call("load_loop", loads_gpa, LOADS_BYTES, loads) for _ in range(3))
    progress("guest code: an SEV guest")
    with HostSystem.start(get_profile("milan").with_(dram_size=4 * GiB)) as system:
        vm = system.start_x86_guest("bench", work, memory=32 * MiB)
        vm.spin_budget = 1 << 30
        guest_alu = _guest_phase(vm, f"workload {work}\n", "sevsim-guest: alu")
        guest_mem = _guest_phase(vm, "sevsim-guest: alu ", "sevsim-guest: mem")
        # The loads' phase includes filling the 256 KiB (a few ms): the TLB is then warm.
        guest_loads = _guest_phase(vm, "sevsim-guest: mem ", "sevsim-guest: loads")
        vm.destroy()
    alu_insns = ALU_INSNS * iterations
    mem_insns = MEM_FILL_INSNS * words + MEM_INSNS * words * rounds
    load_insns = LOAD_INSNS * loads
    return {
        "guest_alu_ratio": bare_alu / guest_alu,
        "guest_mem_ratio": bare_mem / guest_mem,
        "guest_load_ratio": bare_loads / guest_loads,
        "guest_loads_per_s": loads / guest_loads,
        "guest_mips": {
            "alu": alu_insns / guest_alu / 1e6,
            "alu_bare": alu_insns / bare_alu / 1e6,
            "mem": mem_insns / guest_mem / 1e6,
            "mem_bare": mem_insns / bare_mem / 1e6,
            "loads": load_insns / guest_loads / 1e6,
            "loads_bare": load_insns / bare_loads / 1e6,
        },
    }


def bench_es_exits(count: int, progress: Progress) -> dict[str, float]:
    """es_exit_ratio: one CPUID in an SEV-ES guest (#VC, the handler's GHCB request,
    VMGEXIT, KVM reading and answering the GHCB, back through IRETQ) ÷ one intercepted
    CPUID in a plain SEV guest (an exit, KVM, back). The same image runs ``cpuid:N`` in
    both; the phase is timed from the workload line to its result."""
    from sevsim.api.policy import PolicyFlag
    from sevsim.system import HostSystem

    work = f"cpuid:{count}"
    cost = {}
    with HostSystem.start(get_profile("milan").with_(dram_size=4 * GiB)) as system:
        for label, policy in (("SEV", 0), ("SEV-ES", PolicyFlag.ES)):
            progress(f"{count} CPUIDs in an {label} guest")
            vm = system.start_x86_guest("bench", work, memory=32 * MiB, policy=policy)
            vm.spin_budget = 1 << 30
            cost[label] = _guest_phase(vm, f"workload {work}\n", "sevsim-guest: cpuid") / count
            vm.destroy()
    return {
        "es_exit_ratio": cost["SEV-ES"] / cost["SEV"],
        "sev_cpuid_us": cost["SEV"] * 1e6,
        "es_cpuid_us": cost["SEV-ES"] * 1e6,
    }


def bench_launch(size: int, rounds: int, progress: Progress) -> dict[str, float]:
    """LAUNCH_UPDATE_DATA + LAUNCH_MEASURE of a ``size``-byte image, through the mailbox,
    against raw AES-128-ECB (``update_into``, no copies) plus SHA-256 of the same bytes."""
    import hashlib

    from sevsim.api import commands as cmd
    from sevsim.api.commands import Command
    from sevsim.api.status import Status
    from sevsim.system import HostSystem

    progress("launch: starting a platform")
    with HostSystem.start(get_profile("milan").with_(dram_size=4 * GiB)) as system:
        sev, memctl = system.sev, system.machine.memctl
        image_pa = 2 * GiB  # memory the host kernel has not handed out
        paddr = image_pa | system.kernel.me_mask
        data = np.frombuffer(os.urandom(size), dtype=np.uint8)
        raw = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()
        raw_in, raw_out = bytearray(data.tobytes()), bytearray(size + 15)
        measure_pa = sev.psp_pa(system.kernel.alloc_pages(1))

        def call(command: Command, **fields: int) -> Any:
            _, status, out = sev.do_cmd(command, cmd.BUFFERS[command].build(**fields))
            if status != Status.SUCCESS:
                raise RuntimeError(f"{command.name}: {status.name}")
            return cmd.BUFFERS[command].parse(out)

        def baseline() -> None:
            raw.update_into(raw_in, raw_out)
            hashlib.sha256(raw_in).digest()

        def launch(handle: int) -> None:
            call(Command.LAUNCH_UPDATE_DATA, handle=handle, paddr=paddr, len=size)
            call(Command.LAUNCH_MEASURE, handle=handle, measure_paddr=measure_pa, measure_len=48)

        base_t, model_t = [], []
        for r in range(rounds):
            progress(f"launch {size >> 20} MiB, round {r + 1}/{rounds}")
            memctl.write_from(image_pa, data, memctl.host_key_slot)  # a fresh plaintext image
            handle = call(Command.LAUNCH_START, policy=0).handle
            call(Command.ACTIVATE, handle=handle, asid=system.machine.profile.min_sev_asid)
            base_t.append(_timed(baseline))
            model_t.append(_timed(lambda h=handle: launch(h)))
            call(Command.DEACTIVATE, handle=handle)
            call(Command.DECOMMISSION, handle=handle)
    base, mod = statistics.median(base_t), statistics.median(model_t)
    return {
        "launch_bytes": size,
        "launch_ratio": base / mod,
        "launch_gbps": size / mod / 1e9,
        "raw_ecb_sha256_gbps": size / base / 1e9,
    }


def bench_migrate(size: int, progress: Progress) -> dict[str, float]:
    """Two platform services in two processes (two hosts): a ``size``-byte SEV guest of the
    real-code image fills its RAM (workload ``fill``) on the first, then migrates over
    loopback TCP to the second as QEMU does it (migrate-set-parameters with the target's
    chain, ``migrate tcp:…`` on the source, ``-incoming`` on the destination), page by
    page, timed from the migrate request to the destination's commit. Against the raw
    crypto both firmwares must do on the bytes sent (each: ECB for its memory engine, CTR
    and HMAC for the transport); and each service's RSS growth during the move, as a
    multiple of the guest size."""
    import base64
    import tempfile
    import threading

    from cryptography.hazmat.primitives import hashes, hmac

    from sevsim.guest import x86 as x86_guest
    from sevsim.host.vmm import VmConfig
    from sevsim.platform.client import RemoteSystem, RemoteVmm, attach

    profile = get_profile("milan")
    with tempfile.TemporaryDirectory(prefix="sevsim-bench-") as tmp:
        work = Path(tmp)
        firmware = work / "guest.fd"
        firmware.write_bytes(x86_guest.image())
        states = [work / "host-a", work / "host-b"]
        clients = []
        try:
            progress("migrate: starting two platform services")
            for state in states:
                _serve(state)
            a, b = (attach(state, profile) for state in states)
            clients += [a, b]

            def config(workload: bytes) -> VmConfig:
                return VmConfig(
                    firmware=firmware, memory=size, policy=0, name=None,
                    fw_cfg_files={x86_guest.WORKLOAD_FILE: workload},
                )  # fmt: skip

            progress(f"migrate: a {size >> 20} MiB guest fills its memory")
            a.request("vm.create", config(b"fill"))
            src = RemoteVmm(a)
            src.start()
            src.cont()
            src.wait_idle()
            if "filled" not in src.console_text():
                raise RuntimeError("the benchmark guest did not fill its memory")
            chain = RemoteSystem(b).export_chain(full=True)
            certs = [chain.pdh.raw, chain.pek.raw + chain.oca.raw + chain.cek.raw]
            certs.append(chain.ask.raw + chain.ark.raw)
            src.set_migration_parameters(*(base64.b64encode(c).decode() for c in certs))
            b.request("vm.create", config(b"secret"))
            dst = RemoteVmm(b)
            host, port = dst.listen_incoming("127.0.0.1:0")
            pids = [client.hello["pid"] for client in clients]
            rss = [_rss_of(pid) for pid in pids]
            peak, done = list(rss), threading.Event()

            def sample() -> None:
                while not done.wait(0.01):
                    for i, pid in enumerate(pids):
                        peak[i] = max(peak[i], _rss_of(pid))

            threading.Thread(target=sample, daemon=True).start()
            incoming = threading.Thread(target=dst.serve_incoming, daemon=True)
            progress(f"migrate {size >> 20} MiB over loopback between the two services")
            cpu = [_cpu_seconds(pid) for pid in pids]
            t = time.perf_counter()
            incoming.start()
            src.migrate(f"tcp:{host}:{port}")
            incoming.join()  # the destination committed: its guest runs
            elapsed = time.perf_counter() - t
            busy = [_cpu_seconds(pid) - c for pid, c in zip(pids, cpu, strict=True)]
            done.set()
            result = src.query_migrate()
            if result["status"] != "completed":
                raise RuntimeError(f"the benchmark migration failed: {result}")
            sent = result["ram"]["total"]
            src.quit()
            dst.quit()
        finally:
            for client in clients:
                client.close()
            for state in states:
                _stop(state)
    data = bytearray(os.urandom(sent))
    out = bytearray(sent + 15)
    key = os.urandom(16)

    def raw() -> None:
        for _ in range(2):  # the sender's firmware and the receiver's
            Cipher(algorithms.AES(key), modes.ECB()).encryptor().update_into(data, out)
            Cipher(algorithms.AES(key), modes.CTR(key)).encryptor().update_into(data, out)
            mac = hmac.HMAC(key, hashes.SHA256())
            mac.update(data)
            mac.finalize()

    base = statistics.median(_timed(raw) for _ in range(3))
    growth = [(p - r) / size for p, r in zip(peak, rss, strict=True)]
    return {
        "migrate_bytes": sent,
        "migrate_ratio": base / elapsed,
        "migrate_mbps": sent / elapsed / 1e6,
        "migrate_seconds": elapsed,
        # Both services' CPU time over the wall time: above 1 only if they overlapped.
        "migrate_overlap": sum(busy) / elapsed,
        "migrate_rss_growth_ratio": max(growth),
        "migrate_rss_growth_source": growth[0],
        "migrate_rss_growth_destination": growth[1],
    }


def bench_command_path(rounds: int, progress: Progress) -> dict[str, float]:
    """The fixed cost of a firmware command and of one page of migration, in µs (medians).

    * ``command_us``: PLATFORM_STATUS through ``/dev/sev`` (``SevDevice.platform_status``,
      as ``sevctl`` uses it) to the firmware and back.
    * ``send_page_total_us`` / ``receive_page_total_us``: one KVM_SEV_SEND_UPDATE_DATA of
      one 4 KiB page of a launched SEV guest in SUPDATE, and one RECEIVE_UPDATE_DATA of
      that packet into a guest in RUPDATE (same platform), through KVM and the mailbox.
    * ``page_crypto_us``: the raw crypto one such page needs, with ``cryptography`` alone:
      one AES-ECB of 4 KiB on a kept context (the memory engine; its tweak XORs are not
      counted), AES-128-CTR of 4 KiB on a fresh context (a new IV per packet) and
      HMAC-SHA256 over the 4 KiB (the transport).
    * ``send_page_us`` / ``receive_page_us``: the totals minus ``page_crypto_us``: what the
      command path costs beyond its crypto.

    Each figure is timed over short batches of calls (one call is too short for one clock
    read each; a short batch is rarely cut by another process on a shared machine), the
    four cases interleaved; the median over all batches of a case is reported."""
    from cryptography.hazmat.primitives import hashes, hmac

    from sevsim.host.migration import TargetChain
    from sevsim.system import HostSystem

    batch, batches, page, gpa = 10, 10, 4096, 0x10000
    progress("command path: starting a platform")
    with HostSystem.start(get_profile("milan").with_(dram_size=1 * GiB)) as system:
        own = TargetChain.from_chain(system.export_chain(full=True).encode(full=True))
        src = system.kvm.create_vm(4 * MiB, sev=True, name="send")
        src.write_stream(0, os.urandom(4 * MiB))
        src.sev_launch_start(0)
        src.sev_launch_update_data(0, 4 * MiB)
        src.sev_launch_measure()
        src.sev_launch_finish()
        session, policy = src.sev_send_start(own.pdh, own.plat_certs, own.amd_certs)
        dst = system.kvm.create_vm(4 * MiB, sev=True, name="receive")
        dst.sev_receive_start(own.pdh, session, policy)
        header, data = src.sev_send_update_data(gpa, page)
        dst.sev_receive_update_data(header, data, gpa)  # warm: buffers, populated page
        sev = system.sev

        key, iv = os.urandom(16), os.urandom(16)
        ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        plain = os.urandom(page)

        def crypto() -> None:
            ecb.update(plain)
            ctr = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
            mac = hmac.HMAC(key, hashes.SHA256())
            mac.update(ctr.update(plain) + ctr.finalize())
            mac.finalize()

        def status() -> None:
            if not sev.platform_status().ok:
                raise RuntimeError("PLATFORM_STATUS failed")

        cases = {
            "command": status,
            "send": lambda: src.sev_send_update_data(gpa, page),
            "receive": lambda: dst.sev_receive_update_data(header, data, gpa),
            "crypto": crypto,
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(rounds):
            progress(f"command path, round {r + 1}/{rounds}")
            for _ in range(batches):
                for name, fn in cases.items():
                    t = time.perf_counter()
                    for _ in range(batch):
                        fn()
                    times[name].append((time.perf_counter() - t) / batch * 1e6)
        src.sev_send_cancel()
        src.destroy()
        dst.destroy()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "command_us": med["command"],
        "send_page_us": med["send"] - med["crypto"],
        "send_page_total_us": med["send"],
        "receive_page_us": med["receive"] - med["crypto"],
        "receive_page_total_us": med["receive"],
        "page_crypto_us": med["crypto"],
    }


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_of(pid: int | str) -> int:
    """A process's resident set size in bytes (Linux)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(state: Path) -> None:
    """A platform service of its own, in the background (``sevsim platform serve``)."""
    command = [sys.executable, "-m", "sevsim", "platform", "serve", "--daemonize"]
    subprocess.run([*command, "--state", str(state)], check=True, capture_output=True)


def _stop(state: Path) -> None:
    command = [sys.executable, "-m", "sevsim", "platform", "stop", "--state", str(state)]
    subprocess.run(command, capture_output=True, check=False)


def bench_bounce_io(size: int, rounds: int, progress: Progress) -> dict[str, Any]:
    """An SEV guest on an SME host — the real-code guest's ``disk:<MiB>:<seed>:write``
    workload — writes ``size`` bytes to its virtio disk through its swiotlb bounce pool
    (per 4 MiB chunk: the guest makes the pattern in private memory, copies it into pool
    slots, the device reads the slots with the host key and writes the file); the wall time
    from the guest's ``disk: writing`` line to its ``disk: wrote`` line (host exits
    included: that is the model's cost), against a plain Python write of the same bytes to a
    new file (open, write, close). Both files are new and both writes follow a fresh release
    of page cache, so both allocate from warm pages; each round runs on a fresh platform;
    the best round of each side is compared."""
    import tempfile

    from sevsim.guest import x86 as x86_guest
    from sevsim.host.virtio_blk import create_image
    from sevsim.host.vmm import VmConfig, Vmm
    from sevsim.owner.disk import disk_pattern
    from sevsim.system import HostSystem

    progress("bounce I/O: starting a platform")
    seed = 11
    data = disk_pattern(size, seed)
    mib = size >> 20
    base_t, model_t = [], []
    with tempfile.TemporaryDirectory(prefix="sevsim-bench-") as tmp:
        work = Path(tmp)
        (work / "fw.fd").write_bytes(x86_guest.image())
        profile = get_profile("milan").with_(dram_size=2 * GiB)
        for r in range(rounds):
            progress(f"bounce I/O: {mib} MiB to a guest's disk, round {r + 1}/{rounds}")
            image, plain = work / "vda.img", work / "plain.bin"
            create_image(image, size)

            def baseline(path: Path = plain) -> None:
                with open(path, "wb") as f:
                    f.write(data)

            if r % 2 == 0:
                _recycle_page_cache(work, 2 * size)
                base_t.append(_timed(baseline))
            # A fresh platform per round: the host kernel hands out guest memory from new
            # frames, and a long-lived machine would touch ever more of its DRAM.
            with HostSystem.start(profile, work / "state") as system:
                if not system.kernel.me_mask:
                    raise RuntimeError("the bounce-I/O benchmark needs a host with SME on")
                vmm = Vmm(
                    system,
                    VmConfig(
                        firmware=work / "fw.fd",
                        memory=192 * MiB,  # the guest's buffers and a 64 MiB pool
                        console=work / "console.log",
                        disk=image,
                        fw_cfg_files={"opt/sevsim/workload": f"disk:{mib}:{seed}:write".encode()},
                    ),
                )
                try:
                    vmm.start()
                    _recycle_page_cache(work, 2 * size)
                    vmm.cont()
                    seconds = _console_phase(vmm, "disk: writing", "disk: wrote", 600)
                    written = vmm.disk.stats.bytes_written
                finally:
                    vmm.quit()
            if written != size:
                raise RuntimeError(f"the device wrote {written} bytes, not {size}")
            if image.read_bytes() != data:
                raise RuntimeError("the disk does not hold what the guest wrote")
            model_t.append(seconds)
            if r % 2 == 1:
                _recycle_page_cache(work, 2 * size)
                base_t.append(_timed(baseline))
            image.unlink()
            plain.unlink()
    # The best round of each side: whether a write meets warm or cold page cache is
    # bimodal here (see _recycle_page_cache), and a median flips between the two modes.
    base, mod = min(base_t), min(model_t)
    return {
        "bounce_io_bytes": size,
        "bounce_io_ratio": base / mod,
        "bounce_io_mbps": size / mod / 1e6,
        "plain_write_mbps": size / base / 1e6,
        "bounce_io_rounds_ms": {
            "guest": [round(t * 1e3, 1) for t in model_t],
            "plain_write": [round(t * 1e3, 1) for t in base_t],
        },
    }


def _console_phase(vmm: Any, start: str, end: str, timeout: float) -> float:
    """Wall time from a console line containing ``start`` to one containing ``end``, polled
    every millisecond while the VMM runs the guest."""
    deadline = time.perf_counter() + timeout
    t = None
    while time.perf_counter() < deadline:
        text = vmm.console_text()
        if t is None and start in text:
            t = time.perf_counter()
        if t is not None and end in text:
            return time.perf_counter() - t
        if vmm.guest_died is not None or (vmm.wait_idle(0) and start not in text):
            break
        time.sleep(0.001)
    raise RuntimeError(f"the bounce-I/O guest did not finish: {vmm.console_text()[-300:]}")


def _recycle_page_cache(work: Any, size: int) -> None:
    """Write and delete a scratch file, so that the next timed write finds freshly freed
    pages. Virtual machines that hand idle free memory back to their host make a first
    touch of such memory several times slower than the copy itself, and whether a write
    meets it depends on what ran before; this puts both sides of a ratio on equal terms."""
    scratch = work / "page-cache.tmp"
    with open(scratch, "wb") as f:
        f.write(bytes(size))
    scratch.unlink()


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux)."""
    return _rss_of("self")


def sparse_child(touch: int) -> dict[str, float]:
    """Run in a fresh process: RSS growth for a 1 TiB machine with ``touch`` bytes used."""
    from sevsim.soc import Machine

    before = rss_bytes()
    machine = Machine(get_profile("milan").with_(dram_size=1 * TiB))
    chunk = 1 * MiB
    data = np.frombuffer(os.urandom(chunk), dtype=np.uint8)
    rng = random.Random(7)
    # 1 MiB pieces scattered over the whole terabyte.
    starts = sorted(rng.sample(range(0, TiB // chunk), touch // chunk))
    for index in starts:
        machine.memctl.write_from(index * chunk, data, machine.memctl.host_key_slot)
    after = rss_bytes()
    return {
        "sparse_dram_bytes": machine.dram.size,
        "touched_mib": touch / MiB,
        "written_mib": machine.dram.written_bytes / MiB,
        "sparse_rss_mib": (after - before) / MiB,
    }


def guest_memory_child(memory: int) -> dict[str, float]:
    """Run in a fresh process: RSS growth for an SEV guest of ``memory`` bytes booted with
    the real-code guest, against what it touched (DRAM pages written)."""
    from sevsim.system import HostSystem

    with HostSystem.start(get_profile("milan").with_(dram_size=memory + 4 * GiB)) as system:
        written = system.machine.dram.written_bytes
        before = rss_bytes()
        vm = system.start_x86_guest("big", "secret", memory=memory)
        if vm.run()[0].reason != "DONE":
            raise RuntimeError(f"the guest did not boot: {vm.console_text()[-200:]}")
        after = rss_bytes()
        touched = system.machine.dram.written_bytes - written
    return {
        "guest_boot_memory_gib": memory / GiB,
        "guest_boot_touched_mib": touched / MiB,
        "guest_boot_rss_mib": (after - before) / MiB,
    }


def _child(call: str) -> dict[str, Any]:
    code = f"import json; from sevsim.bench import *; print(json.dumps({call}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{call} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def bench_guest_memory(memory: int, progress: Progress) -> dict[str, float]:
    progress(f"guest memory: a {memory >> 30} GiB SEV guest boots (child process)")
    return _child(f"guest_memory_child({memory})")


def bench_sparse(touch: int, progress: Progress) -> dict[str, float]:
    progress(f"sparse memory: 1 TiB machine, {touch >> 20} MiB touched (child process)")
    return _child(f"sparse_child({touch})")


def bench_service(vms: int, rounds: int, progress: Progress) -> dict[str, float]:
    """A platform service in its own process; this process is its VM processes' client."""
    import tempfile

    from sevsim.guest import x86 as x86_guest
    from sevsim.host.vmm import VmConfig
    from sevsim.platform.client import RemoteVmm, ServiceClient, attach

    profile = get_profile("milan")
    memory = 256 * MiB
    with tempfile.TemporaryDirectory(prefix="sevsim-bench-") as work:
        state = Path(work) / "state"
        firmware = Path(work) / "guest.fd"
        firmware.write_bytes(x86_guest.image())
        _serve(state)
        clients: list[ServiceClient] = []
        try:

            def start_vm() -> tuple[ServiceClient, RemoteVmm]:
                client = attach(state, profile)
                config = VmConfig(
                    firmware=firmware, memory=memory, policy=0, name=None,
                    fw_cfg_files={x86_guest.WORKLOAD_FILE: b"secret"},
                )  # fmt: skip
                client.request("vm.create", config)
                vmm = RemoteVmm(client)
                vmm.start()
                vmm.query_launch_measure()
                return client, vmm

            probe = attach(state, profile)
            clients.append(probe)
            rtts, starts = [], []
            progress(f"platform service: {rounds} VM starts of {memory >> 20} MiB")
            for _ in range(rounds):
                rtts.append(_timed(lambda: probe.request("hello")))
                t = time.perf_counter()
                client, vmm = start_vm()
                starts.append(time.perf_counter() - t)
                vmm.quit()
                client.close()
            progress(f"platform service: {vms} idle {memory >> 20} MiB guests")
            before = probe.request("status")["dram_written_bytes"]
            for _ in range(vms):
                client, vmm = start_vm()
                clients.append(client)
                vmm.cont()
                vmm.wait_idle()
            status = probe.request("status")
            pid = probe.hello["pid"]
            rss = _rss_of(pid)
        finally:
            for client in clients:
                client.close()
            _stop(state)
    return {
        "vm_start_ms": statistics.median(starts) * 1000,
        "service_rtt_ms": statistics.median(rtts) * 1000,
        "service_vms": vms,
        "service_vm_mib": memory / MiB,
        "service_touched_mib": status["dram_written_bytes"] / MiB,
        "service_guest_touched_mib": (status["dram_written_bytes"] - before) / MiB,
        "service_rss_mib": rss / MiB,
    }


def environment() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", "unknown", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("aes", "vaes", "avx2", "avx512f") if f in have]
                    break
    except OSError:
        pass
    import cryptography

    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
    }


def run_bench(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or (lambda _msg: None)
    size = 8 * MiB if quick else 64 * MiB
    rounds = 3 if quick else 7
    result: dict[str, Any] = {"quick": quick}
    result.update(bench_bulk(size, rounds, progress))
    result.update(bench_loads(20_000 if quick else 200_000, rounds, progress))
    result.update(
        bench_guest_code(20_000_000 if quick else 200_000_000, 4 if quick else 16, progress)
    )
    result.update(bench_launch(size, rounds, progress))
    result.update(bench_es_exits(200 if quick else 2000, progress))
    result.update(bench_command_path(2 if quick else rounds, progress))
    result.update(bench_migrate(64 * MiB if quick else 256 * MiB, progress))
    result.update(bench_bounce_io(4 * MiB if quick else 64 * MiB, 2 if quick else rounds, progress))
    result.update(bench_sparse(8 * MiB if quick else 64 * MiB, progress))
    result.update(bench_guest_memory(4 * GiB, progress))
    result.update(bench_service(4 if quick else 8, 3 if quick else 7, progress))
    result["targets"] = {figure: target_text(figure) for figure in TARGETS}
    result["targets_met"] = targets_met(result)
    result["environment"] = environment()
    return result
