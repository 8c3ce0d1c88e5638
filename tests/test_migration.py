"""Migration between two platforms and snapshots (sev-api.md §6): the policy checks, the
commit protocol, and what happens when anything goes wrong — the source guest keeps
running with its memory intact, the destination keeps nothing."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from sevsim.api import policy as pol
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.certs.sev import SevCert
from sevsim.guest import x86 as x86_guest
from sevsim.host import migration
from sevsim.host.migration import TargetChain
from sevsim.host.vmm import VmConfig, Vmm, VmmError
from sevsim.owner import ca as owner_ca
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

FIRMWARE = x86_guest.flash_image(64 << 10)
# A private page that stays the same while the guest counts: its page directory.
STILL = x86_guest.symbols()["PD_GPA"]
MEMORY = 32 << 20
POLICY = 0  # debugging allowed: the tests compare memory with DBG_DECRYPT
NOSEND, DOMAIN, SEV = pol.PolicyFlag.NOSEND, pol.PolicyFlag.DOMAIN, pol.PolicyFlag.SEV


def platform(tmp_path: Path, name: str, seed: int, **changes) -> HostSystem:
    profile = get_profile("milan").with_(seed=seed, dram_size=2 << 30, **changes)
    return HostSystem.start(profile, state_dir=tmp_path / name)


@pytest.fixture
def two(tmp_path):
    a, b = platform(tmp_path, "A", 1), platform(tmp_path, "B", 2)
    yield a, b
    a.close()
    b.close()


def counts(text: str) -> list[int]:
    """The counts a console shows, in complete lines (the guest may be mid-line)."""
    complete = text[: text.rfind("\n") + 1]
    return [int(n) for n in re.findall(r"count (?:at )?(\d+)", complete)]


def source(system: HostSystem, tmp_path: Path, policy: int = POLICY, name: str = "src") -> Vmm:
    """A running guest whose firmware counts in private memory."""
    fw = tmp_path / "fw.fd"
    fw.write_bytes(FIRMWARE)
    vmm = Vmm(
        system,
        VmConfig(
            firmware=fw,
            memory=MEMORY,
            policy=policy,
            console=tmp_path / f"{name}.log",
            fw_cfg_files={"opt/sevsim/workload": b"count"},
        ),
    )
    vmm.start()
    vmm.cont()
    wait_for(lambda: len(counts(vmm.console_text())) >= 2)
    return vmm


def destination(system: HostSystem, tmp_path: Path, memory: int = MEMORY) -> tuple[Vmm, int]:
    vmm = Vmm(system, VmConfig(firmware=None, memory=memory, console=tmp_path / "dst.log"))
    server = vmm.listen_incoming("127.0.0.1:0")
    threading.Thread(target=vmm.serve_incoming, args=(server,), daemon=True).start()
    return vmm, server.getsockname()[1]


def chain_of(system: HostSystem) -> TargetChain:
    return TargetChain.from_chain(system.export_chain(full=True).encode(full=True))


def migrate(src: Vmm, port: int, target: TargetChain) -> dict:
    src.target = target
    src.migrate(f"tcp:127.0.0.1:{port}", wait=True)
    return src.query_migrate()


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def guest_state(vmm: Vmm) -> int:
    with vmm.lock:  # the host must not use a core that is running the guest
        return vmm.vm.sev_guest_status().state


def guest_count(vmm: Vmm) -> int:
    with vmm.lock:
        return vmm.system.sev.platform_status().data["status"].guest_count


def dbg(vmm: Vmm, gpa: int, n: int) -> bytes:
    with vmm.lock:
        return vmm.vm.sev_dbg_decrypt(gpa, n)


def still_counting(src: Vmm) -> None:
    """The source guest carries on from where it was."""
    before = counts(src.console_text())[-1]
    assert src.status == "running" and guest_state(src) == 3  # RUNNING
    wait_for(lambda: counts(src.console_text())[-1] > before)


# ---- migrations that succeed --------------------------------------------------------------------
def test_a_running_guest_moves_and_resumes_its_count(two, tmp_path):
    a, b = two
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    secret = dbg(src, STILL, 64)
    result = migrate(src, port, chain_of(b))
    assert result["status"] == "completed" and result["ram"]["remaining"] == 0
    assert src.status == "postmigrate" and guest_state(src) == 6  # SENT
    last_on_source = counts(src.console_text())[-1]
    wait_for(lambda: len(counts(dst.console_text())) >= 2)  # it goes on after its HLT
    resumed = counts(dst.console_text())
    assert resumed[0] >= last_on_source  # no restart from zero
    assert resumed[-1] > resumed[0]  # and it keeps counting there
    assert guest_state(dst) == 3
    assert dbg(dst, STILL, 64) == secret  # same private memory
    assert dst.vm.asid and dst.vm.handle
    src.quit()
    dst.quit()


@pytest.mark.parametrize("same_owner", [True, False])
def test_domain_policy_needs_the_same_oca(tmp_path, same_owner):
    a, b = platform(tmp_path, "A", 3), platform(tmp_path, "B", 4)
    cert, key = owner_ca.generate(tmp_path / "ca")
    oca, oca_key = SevCert.parse(cert.read_bytes()), owner_ca.load_key(key)
    for system in (a, b) if same_owner else (a,):
        csr = system.sev.pek_csr().data["csr"]
        signed = owner_ca.sign_csr(csr, oca_key, oca)
        assert system.sev.pek_cert_import(signed.raw, oca.raw).ok
    src = source(a, tmp_path, policy=DOMAIN)
    dst, port = destination(b, tmp_path)
    result = migrate(src, port, chain_of(b))
    if same_owner:
        assert result["status"] == "completed"
    else:
        assert result["status"] == "failed" and "POLICY_FAILURE" in result["error-desc"]
        still_counting(src)
        assert guest_count(dst) == 0
    src.quit()
    dst.quit()
    a.close()
    b.close()


def test_sev_policy_checks_the_chain_up_to_the_fused_root(two, tmp_path):
    a, b = two
    target = chain_of(b)
    other_pdh = chain_of(a).pdh  # (taken before A runs a guest on its core)
    src = source(a, tmp_path, policy=SEV)
    dst, port = destination(b, tmp_path)
    # A host that forges the destination's chain (one byte of the ARK's modulus).
    forged_amd = bytearray(target.amd_certs)
    forged_amd[-100] ^= 1
    bad = TargetChain(target.pdh, target.plat_certs, bytes(forged_amd))
    result = migrate(src, port, bad)
    assert result["status"] == "failed" and "INVALID_CERTIFICATE" in result["error-desc"]
    still_counting(src)
    # A substituted PDH: the PEK's signature over it fails.
    result = migrate(src, port, TargetChain(other_pdh, target.plat_certs, target.amd_certs))
    assert result["status"] == "failed" and "BAD_SIGNATURE" in result["error-desc"]
    still_counting(src)
    assert migrate(src, port, target)["status"] == "completed"
    src.quit()
    dst.quit()


def test_sev_policy_refuses_a_receiver_with_older_firmware(two, tmp_path):
    a, b = two
    major, minor, _ = b.sev.api_version
    src = source(a, tmp_path, policy=pol.make(SEV, major, minor + 1))
    dst, port = destination(b, tmp_path)
    result = migrate(src, port, chain_of(b))
    assert result["status"] == "failed" and "POLICY_FAILURE" in result["error-desc"]
    still_counting(src)
    src.quit()
    dst.quit()


def test_nosend_guests_never_leave(two, tmp_path):
    a, b = two
    src = source(a, tmp_path, policy=NOSEND)
    dst, port = destination(b, tmp_path)
    result = migrate(src, port, chain_of(b))
    assert result["status"] == "failed" and "POLICY_FAILURE" in result["error-desc"]
    still_counting(src)
    assert dst.status == "inmigrate" and guest_count(dst) == 0
    src.quit()
    dst.quit()


# ---- failures in flight ---------------------------------------------------------------------
class Proxy:
    """Between sender and receiver: forwards, but may cut the connection after ``cut``
    bytes or flip a bit at ``flip``."""

    def __init__(self, port: int, cut: int | None = None, flip: int | None = None) -> None:
        self.target, self.cut, self.flip = port, cut, flip
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._back, args=(upstream, conn), daemon=True).start()
        seen = 0
        try:
            while True:
                data = bytearray(conn.recv(65536))
                if not data:
                    break
                if self.flip is not None and seen <= self.flip < seen + len(data):
                    data[self.flip - seen] ^= 0x01
                if self.cut is not None and seen + len(data) >= self.cut:
                    upstream.sendall(data[: self.cut - seen])
                    break
                upstream.sendall(data)
                seen += len(data)
        except OSError:
            pass  # the receiver hung up: so does the path
        for sock in (conn, upstream):  # shutdown: a FIN now, even with a reader waiting
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @staticmethod
    def _back(upstream: socket.socket, conn: socket.socket) -> None:
        try:
            while data := upstream.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def _stream(src: Vmm, target: TargetChain) -> bytes:
    """This guest's migration stream (sent to memory, then cancelled: the guest runs on)."""
    import io

    buf = io.BytesIO()
    with src.lock:
        src.pause_vcpus()
        migration.send(src, buf, target)
        src.vm.sev_send_cancel()
        src.resume_vcpus()
    return buf.getvalue()


def _record_starts(data: bytes) -> list[int]:
    """The byte offset where every record of a stream starts."""
    pos, out = len(migration.MAGIC), []
    while pos < len(data):
        out.append(pos)
        _, length = migration.FRAME.unpack_from(data, pos)
        pos += migration.FRAME.size + length
    return out


def _stream_offsets(src: Vmm, target: TargetChain) -> dict[str, int]:
    """Where things are in a stream of this guest."""
    data = _stream(src, target)
    first_page = data.index(bytes([migration.Record.PAGE]), len(migration.MAGIC) + 5)
    return {"total": len(data), "first_page": first_page}


def test_a_broken_connection_at_any_point_leaves_the_source_running(two, tmp_path):
    a, b = two
    target = chain_of(b)
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    offsets = _stream_offsets(src, target)
    still = dbg(src, STILL, 64)
    for cut in (10, offsets["first_page"] + 100, offsets["total"] // 2, offsets["total"] - 10):
        proxy = Proxy(port, cut=cut)
        result = migrate(src, proxy.port, target)
        assert result["status"] == "failed", cut
        still_counting(src)
        wait_for(lambda: guest_count(dst) == 0)  # the destination kept nothing
        assert dbg(src, STILL, 64) == still  # private memory as it was
    assert migrate(src, port, target)["status"] == "completed"  # and can still receive
    src.quit()
    dst.quit()


def test_a_flipped_bit_in_a_packet_is_caught_by_the_receiving_firmware(two, tmp_path):
    a, b = two
    target = chain_of(b)
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    offsets = _stream_offsets(src, target)
    ciphertext = offsets["first_page"] + 5 + 8 + 52 + 100  # frame, GPA, header, then data
    proxy = Proxy(port, flip=ciphertext)
    result = migrate(src, proxy.port, target)
    assert result["status"] == "failed" and "BAD_MEASUREMENT" in result["error-desc"]
    still_counting(src)
    wait_for(lambda: guest_count(dst) == 0)
    src.quit()
    dst.quit()


def test_a_destination_without_a_free_asid_refuses(tmp_path):
    a = platform(tmp_path, "A", 5)
    b = platform(tmp_path, "B", 6, sev_edx=509)  # one plain-SEV ASID on B
    taken = b.kvm.create_vm(MEMORY, sev=True)  # and it is taken
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    result = migrate(src, port, chain_of(b))
    assert result["status"] == "failed" and "ASID" in result["error-desc"]
    still_counting(src)
    src.quit()
    dst.quit()
    taken.destroy()
    a.close()
    b.close()


def test_the_destination_needs_the_same_memory_size(two, tmp_path):
    a, b = two
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path, memory=64 << 20)
    result = migrate(src, port, chain_of(b))
    assert result["status"] == "failed" and "--memory must match" in result["error-desc"]
    still_counting(src)
    src.quit()
    dst.quit()


# ---- snapshots --------------------------------------------------------------------------------
def test_snapshot_round_trip_and_refusals(two, tmp_path):
    a, b = two
    src = source(a, tmp_path)
    snap = tmp_path / "guest.snap"
    src.target = chain_of(b)
    before = counts(src.console_text())[-1]
    src.migrate(f"file:{snap}", wait=True)
    assert src.query_migrate()["status"] == "completed"
    still_counting(src)  # a snapshot does not stop the guest
    # One more line: the snapshot may have cut a "count N" line in two (each console byte is
    # an exit), and then the restored guest's first whole line is the one after N.
    mid = counts(src.console_text())[-1]
    wait_for(lambda: counts(src.console_text())[-1] > mid)
    after = counts(src.console_text())[-1]
    data = snap.read_bytes()
    assert oct(snap.stat().st_mode)[-3:] == "600"
    # One page per SEND_UPDATE_DATA, as KVM allows and QEMU sends (docs/migration.md).
    reader = migration.StreamReader(io.BytesIO(data))
    pages = []
    while (record := reader.record())[0] != migration.Record.END:
        if record[0] == migration.Record.PAGE:
            pages.append(len(record[1]))
    assert pages and set(pages) == {8 + 52 + 4096}

    def restore(payload: bytes) -> Vmm:
        path = tmp_path / "restore.snap"
        path.write_bytes(payload)
        vmm = Vmm(b, VmConfig(firmware=None, memory=MEMORY, console=tmp_path / "r.log"))
        vmm.restore(path)
        return vmm

    def guests_on_b() -> int:  # (no guest runs on B's core here)
        return b.sev.platform_status().data["status"].guest_count

    with pytest.raises(VmmError, match="ended early"):
        restore(data[: len(data) // 2])
    assert guests_on_b() == 0  # nothing half-restored
    tampered = bytearray(data)
    tampered[-200] ^= 1  # in the vCPU state: only the stream digest covers it
    with pytest.raises(VmmError, match="digest|damaged"):
        restore(bytes(tampered))
    assert guests_on_b() == 0
    vmm = restore(data)
    vmm.cont()
    wait_for(lambda: counts(vmm.console_text()))
    assert before <= counts(vmm.console_text())[0] <= after
    src.quit()
    vmm.quit()


def test_the_whole_vcpu_state_survives_a_snapshot(two, tmp_path):
    """Every register of the save area — segments with their hidden parts, GDTR, IDTR,
    control registers, EFER — the GPRs, and an AP still waiting for its STARTUP IPI."""
    a, b = two
    fw = tmp_path / "fw.fd"
    fw.write_bytes(FIRMWARE)
    config = VmConfig(
        firmware=fw,
        memory=MEMORY,
        smp=2,
        policy=POLICY,
        console=tmp_path / "src.log",
        fw_cfg_files={"opt/sevsim/workload": b"count"},
    )
    src = Vmm(a, config)
    src.start()
    src.cont()
    wait_for(lambda: len(counts(src.console_text())) >= 1)
    src.stop()  # paused: the snapshot takes the vCPUs as they are now
    src.target = chain_of(b)
    snap = tmp_path / "guest.snap"
    src.migrate(f"file:{snap}", wait=True)
    assert src.query_migrate()["status"] == "completed"
    dst = Vmm(b, VmConfig(firmware=None, memory=MEMORY, console=tmp_path / "dst.log"))
    dst.restore(snap)

    def state(vcpu) -> dict:
        save = vcpu.vmcb()
        return {name: getattr(save, name) for name in migration.VCPU_FIELDS}

    boot, ap = src.vm.vcpus
    assert [state(v) for v in dst.vm.vcpus] == [state(boot), state(ap)]
    assert [v.regs for v in dst.vm.vcpus] == [boot.regs, ap.regs]
    assert [v.parked for v in dst.vm.vcpus] == [False, True]
    # The BSP runs the image in long mode: what its boot code set up went along.
    symbols = x86_guest.symbols()
    moved = dst.vm.vcpus[0].vmcb()
    assert moved.cs_selector == 0x18 and moved.cs_attrib & 0x200  # CODE64_SEL, L=1
    assert (moved.gdtr_base, moved.idtr_base) == (symbols["gdt"], symbols["idt"])
    assert moved.efer & 1 << 10 and moved.cr0 & 1 << 31  # EFER.LMA, CR0.PG
    assert moved.cr3 & 0xFFFFF000 == symbols["PML4_GPA"]
    dst.cont()
    wait_for(lambda: len(counts(dst.console_text())) >= 1)  # and it goes on from there
    src.quit()
    dst.quit()


# ---- the firmware's rules -----------------------------------------------------------------------
def test_send_commands_follow_the_guest_states(two, tmp_path):
    a, b = two
    src = source(a, tmp_path)
    src.pause_vcpus()
    vm, kvm = src.vm, a.kvm
    target = chain_of(b)
    status, out = kvm.sev_cmd_out(Command.SEND_START, handle=vm.handle, session_len=64)
    assert status == Status.INVALID_LENGTH and out.session_len == 128
    assert kvm.sev_cmd(Command.SEND_FINISH, handle=vm.handle) == Status.INVALID_GUEST_STATE
    vm.sev_send_start(target.pdh, target.plat_certs, target.amd_certs)
    assert guest_state(src) == 4  # SUPDATE
    status, out = kvm.sev_cmd_out(Command.SEND_UPDATE_DATA, handle=vm.handle, hdr_len=8)
    assert status == Status.INVALID_LENGTH and out.hdr_len == 52
    assert kvm.sev_cmd(Command.SEND_START, handle=vm.handle, session_len=128) == (
        Status.INVALID_GUEST_STATE
    )
    vm.sev_send_cancel()
    assert guest_state(src) == 3  # back to RUNNING
    vm.sev_send_start(target.pdh, target.plat_certs, target.amd_certs)
    vm.sev_send_finish()
    assert guest_state(src) == 6  # SENT
    assert kvm.sev_cmd(Command.DEACTIVATE, handle=vm.handle) == Status.SUCCESS
    assert kvm.sev_cmd(Command.ACTIVATE, handle=vm.handle, asid=vm.asid) == (
        Status.INVALID_GUEST_STATE
    )
    src.quit()


def test_a_connection_reset_at_every_record_leaves_one_guest_running(two, tmp_path):
    """Cut before each record and inside it (sampled evenly over the stream): the source
    guest runs on, unchanged, and the destination keeps nothing — never two guests."""
    a, b = two
    target = chain_of(b)
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    starts = _record_starts(_stream(src, target))
    still = dbg(src, STILL, 64)
    points = sorted({starts[i] + d for i in range(0, len(starts), max(1, len(starts) // 12))
                     for d in (0, 7)})  # fmt: skip
    for cut in points:
        result = migrate(src, Proxy(port, cut=cut).port, target)
        assert result["status"] == "failed", cut
        still_counting(src)
        wait_for(lambda: guest_count(dst) == 0)
        assert guest_count(src) == 1  # the source guest, once
    assert dbg(src, STILL, 64) == still
    assert len(points) >= 20
    src.quit()
    dst.quit()


@pytest.mark.parametrize("sender_finished", [True, False])
def test_a_connection_lost_after_ready_keeps_a_paused_copy(two, tmp_path, sender_finished):
    """The one window two parties cannot close: READY was sent, COMMIT never arrives. The
    receiver keeps its copy paused ('unconfirmed'); whoever asks the source decides."""
    a, b = two
    target = chain_of(b)
    src = source(a, tmp_path)
    dst, port = destination(b, tmp_path)
    with src.lock:
        src.pause_vcpus()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            with sock.makefile("rwb", buffering=1 << 20) as stream:
                migration.send(src, stream, target)
                stream.flush()
                assert stream.readline().strip() == b"READY"
                if sender_finished:
                    src.vm.sev_send_finish()  # ... and the COMMIT line is lost
                else:
                    src.vm.sev_send_cancel()  # the sender gave up after all
            sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: dst.query_migrate()["status"] == "unconfirmed")
    assert dst.status == "paused" and guest_count(dst) == 1 and guest_state(dst) == 3
    assert "only if the source reports the migration completed" in dst.query_migrate()["error-desc"]
    if sender_finished:
        assert guest_state(src) == 6  # SENT: the paused copy is the only guest left
        dst.cont()
        wait_for(lambda: len(counts(dst.console_text())) >= 2)
    else:
        src.resume_vcpus()
        still_counting(src)  # the source runs; the copy stays paused until it is dropped
        dst.quit()
        assert guest_count(dst) == 0
    src.quit()
    dst.quit()


def test_a_stream_of_the_old_format_is_refused_with_its_reason():
    """Version 1 carried up to five pages per packet, which KVM's RECEIVE_UPDATE_DATA does
    not take: say so instead of failing on the first packet."""
    with pytest.raises(migration.MigrationError, match="older sevsim"):
        migration.StreamReader(io.BytesIO(b"SEVSIM-MIGRATION 1\n" + bytes(64)))
    with pytest.raises(migration.MigrationError, match="bad magic"):
        migration.StreamReader(io.BytesIO(b"SEVSIM-MIGRATION 9\n" + bytes(64)))
