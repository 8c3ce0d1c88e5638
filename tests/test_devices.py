"""Devices and SEV guests: the guest's bounce pool, its virtio disk on a real file, disk
encryption with a key from the launch secret, and DMA aimed at private memory. The guest is
the real-code image (src/sevsim/guest/x86: swiotlb.c, virtio_blk.c, xts.c, disk.c)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import uuid

import pytest
from conftest import COHERENT, NON_COHERENT, make_machine
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevsim.api import guidtable
from sevsim.api import virtio as v
from sevsim.certs.sev import SevCert
from sevsim.guest import x86 as x86_guest
from sevsim.host.virtio_blk import DiskError, create_image
from sevsim.host.vmm import VmConfig, Vmm, VmmError
from sevsim.owner import secret, session
from sevsim.profiles import get_profile
from sevsim.soc.dma import BusMaster
from sevsim.soc.x86.frames import FrameCache
from sevsim.system import HostSystem

FIRMWARE = x86_guest.image()
MiB = 1 << 20
DISK_KEY_GUID = uuid.UUID("5e4f6a3c-9b1d-4c2e-8f7a-0d3b2c1e4a5f")  # docs/devices.md
POOL_LINE = re.compile(
    r"software IO TLB: mapped \[mem (0x[0-9a-f]{16})-(0x[0-9a-f]{16})\] \((\d+)MB\)"
)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    system = HostSystem.start(
        get_profile("milan").with_(seed=21, dram_size=2 << 30), tmp_path_factory.mktemp("s")
    )
    yield system
    system.close()


def expected_data(size: int, seed: int) -> bytes:
    """The workload's data, from its documented recipe (disk.c, docs/devices.md)."""
    line = f"sevsim guest disk, seed {seed}: written by the guest through its bounce buffers\n"
    return line.encode().ljust(512, b"\0") + random.Random(seed).randbytes(size - 512)


def boot(
    host,
    tmp_path,
    workload: str,
    disk_size: int = 32 * MiB,
    key: bytes | None = None,
    memory: int = 192 * MiB,
    append: str | None = None,
    **changes,
):
    """Launch the real-code guest with a disk and a workload; returns (vmm, console, disk)."""
    fw = tmp_path / "fw.fd"
    fw.write_bytes(FIRMWARE)
    image = tmp_path / "disk.img"
    if not image.exists():
        create_image(image, disk_size)
    pdh = SevCert.parse(host.sev.pdh_cert_export().data["pdh"])
    owner = session.start(pdh, 0x1)
    owner.write(tmp_path, "vm")
    kernel = None
    if append is not None:
        kernel = tmp_path / "vmlinuz"
        kernel.write_bytes(b"a kernel")
    cfg = VmConfig(
        firmware=fw,
        memory=memory,
        dh_cert_file=tmp_path / "vm_godh.b64",
        session_file=tmp_path / "vm_session.b64",
        console=tmp_path / "console.log",
        fw_cfg_files={"opt/sevsim/workload": workload.encode()},
        disk=image,
        kernel=kernel,
        append=append,
        **changes,
    )
    vmm = Vmm(host, cfg)
    vmm.start()
    if key is not None:
        table = guidtable.secrets_table([(DISK_KEY_GUID, key)])
        header, payload = secret.build_packet(owner.tek, owner.tik, vmm.measurement[:32], table)
        vmm.inject_secret(
            base64.b64encode(header).decode(), base64.b64encode(payload).decode(), None
        )
    vmm.cont()
    assert vmm.wait_idle(300), vmm.console_text()
    console = vmm.console_text()
    assert "sevsim-guest: done" in console, console
    return vmm, console, image


@pytest.mark.parametrize("iothread", [True, False], ids=["iothread", "in-exit"])
def test_a_16_mib_file_round_trips_through_the_bounce_pool(host, tmp_path, iothread):
    vmm, log, image = boot(host, tmp_path, "disk:16:7", disk_iothread=iothread)
    assert vmm.disk.iothread == iothread
    assert "disk: read 16 MiB back, matches what was written" in log, log
    want = expected_data(16 * MiB, 7)
    # I/O is outside SEV's protection: the file holds exactly what the guest wrote.
    content = image.read_bytes()
    assert content[: 16 * MiB] == want
    assert content[16 * MiB :] == bytes(16 * MiB)  # and nothing else
    # The Linux pool size for 192 MiB: 6 % is below the 64 MiB floor; 2 MiB-aligned.
    first, last, mb = POOL_LINE.search(log).groups()
    pool, end = int(first, 16), int(last, 16) + 1
    assert mb == "64" and end - pool == 64 * MiB and pool % (2 * MiB) == 0
    assert end <= 192 * MiB
    assert "[vda] 65536 512-byte logical blocks (33.6 MB/32.0 MiB)" in log
    assert vmm.disk.stats.bytes_written == vmm.disk.stats.bytes_read == 16 * MiB
    # The guest told the hypervisor (KVM_HC_MAP_GPA_RANGE) that the pool and the
    # virtqueue's rings at 0x230000 are shared.
    assert (pool, 64 * MiB // 4096) in vmm.vm.shared_ranges
    assert (0x230000, 2) in vmm.vm.shared_ranges
    # Every buffer the device was given lay in the shared pool: the host reads the last
    # chunk the guest read back there in the clear, and its private buffer as ciphertext.
    pool_view = vmm.vm.read_stream(pool, 64 * MiB)
    assert want[-4096:] in pool_view
    private = vmm.vm.read(x86_guest.symbols()["DISK_BUFFER_GPA"], 4096)
    assert private not in want
    vmm.quit()


def test_a_guest_that_encrypts_its_disk_leaves_only_ciphertext(host, tmp_path):
    key = bytes(range(64))
    vmm, log, image = boot(host, tmp_path, "disk:2:9", key=key)
    assert "disk: wrote 2 MiB to vda (AES-XTS encrypted)" in log, log
    assert "disk: read 2 MiB back, matches what was written" in log
    want = expected_data(2 * MiB, 9)
    content = image.read_bytes()[: 2 * MiB]
    assert b"sevsim guest disk" not in content
    # The file is AES-XTS of the data, block by block, computed here independently.
    for block in (0, 1, 255, 511):
        tweak = (block * 8).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        plain = want[block * 4096 : (block + 1) * 4096]
        assert content[block * 4096 : (block + 1) * 4096] == enc.update(plain) + enc.finalize()
    assert key.hex() not in log
    vmm.quit()


def test_integrity_tags_round_trip_when_nobody_tampers(host, tmp_path):
    key = bytes(range(64, 128))
    vmm, log, image = boot(host, tmp_path, "disk:1:5:auth", key=key)
    assert "AES-XTS encrypted, with integrity tags" in log, log
    assert "disk: read 1 MiB back, matches what was written" in log
    # The tag area follows the data: HMAC-SHA256 over (block number, block as written).
    content = image.read_bytes()
    derive = hmac.HMAC(key, hashes.SHA256())  # the documented derivation (disk.c)
    derive.update(b"sevsim disk integrity")
    mac_key = derive.finalize()
    for block in (0, 255):
        stored = content[1 * MiB + 32 * block : 1 * MiB + 32 * block + 32]
        mac = hmac.HMAC(mac_key, hashes.SHA256())
        mac.update(block.to_bytes(8, "little") + content[block * 4096 : (block + 1) * 4096])
        assert stored == mac.finalize()
    vmm.quit()


def test_an_exhausted_pool_fails_the_io_cleanly(host, tmp_path):
    # One 256 KiB segment: the header takes a slot, so a full-size data buffer never fits.
    vmm, log, image = boot(host, tmp_path, "disk:1:3", append="swiotlb=128")
    first, last, mb = POOL_LINE.search(log).groups()  # 256 KiB, printed as Linux does
    assert int(last, 16) + 1 - int(first, 16) == 256 << 10 and mb == "0"
    want = "virtio_blk: I/O error: swiotlb buffer is full (sz: 262144 bytes), total 128 (slots)"
    assert want in log, log
    assert "disk: writing vda failed" in log
    assert image.read_bytes() == bytes(32 * MiB)  # nothing half-written
    assert vmm.disk.stats.writes == 0
    vmm.quit()


def test_an_sev_guest_refuses_a_device_without_access_platform(host, tmp_path):
    vmm, log, image = boot(host, tmp_path, "disk:1", disk_access_platform=False)
    assert "virtio_blk: device must provide VIRTIO_F_ACCESS_PLATFORM" in log
    assert "disk: writing" not in log
    assert vmm.disk.status & v.S_FAILED
    assert image.read_bytes() == bytes(32 * MiB)
    vmm.quit()


def test_a_bad_disk_word_or_a_bad_key_is_one_console_line(host, tmp_path):
    vmm, log, _ = boot(host, tmp_path, "disk:x disk:1:2:auth", key=bytes(32))
    assert "disk: expected disk:<MiB>[:<seed>[:write|:auth]], not disk:x" in log
    assert "disk: the disk key must be 64 bytes (AES-256-XTS), not 32" in log
    assert vmm.disk.stats.writes == 0
    vmm.quit()


def test_the_vmm_reports_a_bad_disk_image(host, tmp_path):
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    cfg = VmConfig(firmware=None, memory=32 * MiB, disk=tmp_path / "odd.img")
    vmm = Vmm(host, cfg)
    with pytest.raises(VmmError, match="multiple of 512"):
        vmm._create(32 * MiB, 1)
    with pytest.raises(DiskError, match="multiple of 512"):
        create_image(tmp_path / "new.img", 1000)


# ---- the I/O thread ---------------------------------------------------------------------------
RING, AVAIL, USED, HEADER, DATA, STATUS = 0x300000, 0x300080, 0x301000, 0x302000, 0x303000, 0x305000


def _write_request(vm, sector: int, data: bytes) -> None:
    """A driver's one write request on a queue of 8: header, data, status byte."""
    chain = [
        (HEADER, v.BLK_REQ.size, v.DESC_F_NEXT, 1),
        (DATA, len(data), v.DESC_F_NEXT, 2),
        (STATUS, 1, v.DESC_F_WRITE, 0),
    ]
    for i, (addr, length, flags, nxt) in enumerate(chain):
        vm.write(RING + 16 * i, v.DESC.build(addr=addr, len=length, flags=flags, next=nxt))
    vm.write(HEADER, v.BLK_REQ.build(type=v.BLK_T_OUT, reserved=0, sector=sector))
    vm.write(DATA, data)
    vm.write(STATUS, b"\xff")
    vm.write(AVAIL + 4, (0).to_bytes(2, "little"))  # ring[0] = head 0
    vm.write(AVAIL, v.RING_HEADER.build(flags=0, idx=1))


@pytest.mark.parametrize("iothread", [True, False], ids=["iothread", "in-exit"])
def test_a_notify_returns_before_the_io_thread_serves_the_request(host, tmp_path, iothread):
    """The driver's side of the registers, as the guest's virtio_blk.c does it, from the
    test: with an I/O thread held before its pass, QUEUE_NOTIFY returns with the used ring
    untouched and nothing in the file; released, the thread completes the request. Without
    one, the request is complete when the notify returns."""
    image = tmp_path / "disk.img"
    create_image(image, 64 * 1024)
    fw = tmp_path / "fw.fd"
    fw.write_bytes(FIRMWARE)
    cfg = VmConfig(
        firmware=fw, memory=64 * MiB, sev=False, policy=0, disk=image, disk_iothread=iothread
    )
    vmm = Vmm(host, cfg)
    vmm.start()
    dev, vm = vmm.disk, vmm.vm
    try:
        assert dev.iothread == iothread

        def out(reg: int, value: int) -> None:
            dev.io_out(v.PORT_BASE + reg, value, 4)

        out(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER)
        out(v.DRIVER_FEATURES_SEL, 1)
        out(v.DRIVER_FEATURES, v.F_VERSION_1 >> 32)
        out(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK)
        out(v.QUEUE_NUM, 8)
        for reg, addr in ((v.QUEUE_DESC_LOW, RING), (v.QUEUE_DRIVER_LOW, AVAIL)):
            out(reg, addr)
        out(v.QUEUE_DEVICE_LOW, USED)
        out(v.QUEUE_READY, 1)
        out(v.STATUS, v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK | v.S_DRIVER_OK)
        data = random.Random(5).randbytes(4096)
        _write_request(vm, 8, data)
        if iothread:
            dev.pause()
        out(v.QUEUE_NOTIFY, 0)
        used_idx = v.RING_HEADER.parse(vm.read(USED, 4)).idx
        if iothread:
            # The notify came back; the request waits on the ring, the file is untouched.
            assert used_idx == 0 and vm.read(STATUS, 1) == b"\xff"
            assert image.read_bytes() == bytes(64 * 1024)
            assert not dev.drain(0.05)  # a held thread does not finish
            dev.resume()
            assert dev.drain(30)
            used_idx = v.RING_HEADER.parse(vm.read(USED, 4)).idx
        assert used_idx == 1 and vm.read(STATUS, 1) == bytes([v.BLK_S_OK])
        assert v.USED_ELEM.parse(vm.read(USED + 4, 8)).id == 0
        content = image.read_bytes()
        assert content[8 * 512 : 8 * 512 + 4096] == data
        assert content[: 8 * 512] == bytes(8 * 512) and content[8 * 512 + 4096 :].count(0) == (
            64 * 1024 - 8 * 512 - 4096
        )
        assert dev.stats.writes == 1 and dev.stats.bytes_written == 4096
    finally:
        vmm.quit()


# ---- DMA aimed at private memory ------------------------------------------------------------
PATTERN = b"the guest's private record, 64 bytes, never to be seen by a device"[:64]


@pytest.mark.parametrize("with_cbit", [True, False], ids=["host-key", "no-key"])
def test_dma_into_private_guest_memory_is_garbage_both_ways(host, with_cbit):
    """The real-code guest's ``secret dma``: it keeps its secret at SECRET_GPA and yields
    while the host has a device write there — with the C-bit (the host key) or without (no
    key) — then hashes what it reads back."""
    vm = host.start_x86_guest("dma", "secret:dma dma", memory=x86_guest.MIN_MEMORY)
    vcpu = vm.vcpus[0]
    assert vcpu.run().reason == "HLT"
    secret_gpa = x86_guest.symbols()["SECRET_GPA"]
    spa = vm.spa(secret_gpa)
    host.kernel.wbinvd_on_all_cpus()
    device = BusMaster(host.machine, 0x0400)
    cbit = host.kernel.me_mask
    # Out of the guest: a device gets ciphertext, with or without the C-bit.
    marker = b"sevsim secret:"
    assert marker not in device.read(spa, 64) and marker not in device.read(spa | cbit, 64)
    # Into the guest: the guest decrypts whatever a device writes with its own key.
    device.write(spa | cbit if with_cbit else spa, PATTERN)
    in_dram = host.machine.dram.read(spa, 64)
    assert (in_dram != PATTERN) == with_cbit  # the host key encrypted it, or nothing did
    assert vcpu.run().reason == "DONE"
    read = vm.sev_dbg_decrypt(secret_gpa, 64)  # what the guest read (a debuggable guest)
    assert read != PATTERN and not read.startswith(marker)
    line = f"dma read back: changed, sha256 {hashlib.sha256(read).hexdigest()}"
    assert line in vm.console_text()
    vm.destroy()


# ---- the command line -------------------------------------------------------------------------
def test_vm_run_with_a_disk_from_the_command_line(tmp_path, capsys):
    from sevsim.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    image = tmp_path / "vda.img"
    state = str(tmp_path / "state")
    assert run("vm", "disk", str(image), "--size", "16M", "--json")[0] == 0
    assert image.stat().st_size == 16 * MiB and image.stat().st_blocks == 0  # sparse
    code, _, err = run("vm", "disk", str(image), "--size", "16M")
    assert code == 1 and "exists" in err and err.count("\n") == 1
    code, _, err = run("vm", "disk", str(tmp_path / "odd.img"), "--size", "1000")
    assert code == 1 and "multiple of 512" in err
    (tmp_path / "fw.fd").write_bytes(FIRMWARE)
    common = ["vm", "run", "--state", state, "--bios", str(tmp_path / "fw.fd")]
    common += ["--memory", "160M", "--disk", str(image), "--json"]
    common += ["--fw-cfg", "name=opt/sevsim/workload,string=disk:2:4"]
    code, out, _ = run(*common)
    assert code == 0
    result = json.loads(out)
    assert "matches what was written" in result["console"]
    assert result["disk"]["bytes_written"] == result["disk"]["bytes_read"] == 2 * MiB
    assert image.read_bytes()[: 2 * MiB] == expected_data(2 * MiB, 4)
    code, out, _ = run(*common, "--no-access-platform")
    assert "device must provide VIRTIO_F_ACCESS_PLATFORM" in json.loads(out)["console"]
    code, _, err = run(*common[:-5], "--disk", str(tmp_path / "missing.img"))
    assert code == 1 and "cannot open the disk image" in err and "Traceback" not in err


# ---- a device snooping the instruction engine's frames ------------------------------------------
@pytest.mark.parametrize("coherent", [True, False], ids=["coherent", "non-coherent"])
def test_a_dma_read_takes_only_its_own_lines_of_an_engine_frame_to_dram(coherent):
    """The engine changed two lines of a page (no key: DRAM holds plaintext, so what it
    holds can be read directly). A device reads the first line: that line is in DRAM,
    what the device got is the engine's data, and the other line is a dirty cache line,
    not in DRAM, until a WBINVD writes it back."""
    machine = make_machine(COHERENT[0] if coherent else NON_COHERENT[0], dram_size=64 * MiB)
    page = 0x200000
    frames = FrameCache(lambda addr, buf: None, machine.cache, lambda: None, lambda: None)
    frame = frames.frame(0, page)
    frames.mark_written(frame)
    first, other = bytes(range(64)), bytes(range(64, 128))
    frame.view[0:64] = list(first)
    frame.view[640:704] = list(other)
    frames.end_run()  # back to the host: the page is registered with the cache
    assert BusMaster(machine, 0x0400).read(page, 64) == first
    assert machine.dram.read(page, 64) == first
    assert machine.dram.read(page + 640, 64) == bytes(64)
    assert machine.cache.resident(page + 640) == [(0, True)]
    assert (0, True) not in machine.cache.resident(page)
    machine.cores[0].wbinvd()
    assert machine.dram.read(page + 640, 64) == other


@pytest.mark.parametrize("how", ["two-page read", "frames outgrow their bound"])
def test_written_through_engine_lines_replace_the_cached_lines_of_every_page(how):
    """The host wrote one line of the second of two pages (a dirty cache line); the engine
    then rewrote both pages. Whether a two-page fabric read or the frames' shrink takes the
    engine's lines to DRAM in one bulk write, the host's older line must not survive it."""
    machine = make_machine("milan")
    host = machine.memctl.host_key_slot
    p1, p2 = 0x40000, 0x41000
    machine.cache.write(p2 + 64, b"O" * 64, host)
    frames = FrameCache(lambda addr, buf: None, machine.cache, lambda: None, lambda: None)
    for page in (p1, p2):
        frame = frames.frame(host, page)
        frame.view[:] = ord("N")
        frames.mark_written(frame)
    frames.end_run()
    if how == "two-page read":
        assert machine.fabric.read(p1, 8192, host) == b"N" * 8192
    else:
        frames.max_frames = 1
        assert frames.shrink_if_full()
    machine.cache.wbinvd()
    assert machine.memctl.read(p2 + 64, 64, host) == b"N" * 64


def test_shrinking_frames_keeps_the_newer_write_of_a_non_coherent_alias():
    """Without HwEnforcedCacheCoh, an older dirty C=0 line of a page and the engine's newer
    C=1 write of it: as lines evicted oldest first, the newer data ends in DRAM (§4.1), also
    when the frames outgrow their bound and go to DRAM in bulk."""
    machine = make_machine(NON_COHERENT[0])
    host = machine.memctl.host_key_slot
    page = 0x40000
    frames = FrameCache(lambda addr, buf: None, machine.cache, lambda: None, lambda: None)
    frame = frames.frame(host, page)
    machine.cache.write(page, b"Y" * 64, 0)  # the older alias, dirty
    frame.view[:64] = ord("X")
    frames.mark_written(frame)
    frames.end_run()
    frames.max_frames = 0
    assert frames.shrink_if_full()
    machine.cache.wbinvd()
    assert machine.memctl.read(page, 64, host) == b"X" * 64
