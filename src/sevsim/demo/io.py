"""The I/O part of the demo: an SEV guest's disk, its bounce buffers, and DMA.

The guest is the real-code firmware (src/sevsim/guest/x86) with its ``disk`` workload,
run by the QEMU-like VMM with a virtio disk on a real (temporary) file. The hypervisor's
view is what the VMM reads through its own mapping of guest memory; the physical view is
a DRAM dump; the device is a bus master that reaches memory only by DMA. The owner, who
injects the disk key, keeps it in its own directory. What the guest knows comes from its
console; its own view of its buffer is the pattern it wrote there.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path

from sevsim.attacks.physical import ColdBootDump
from sevsim.demo.steps import Step, Story, View, Working
from sevsim.guest import x86 as x86_guest
from sevsim.host.virtio_blk import create_image
from sevsim.host.vmm import VmConfig, Vmm
from sevsim.owner import secret, session
from sevsim.owner.disk import DISK_KEY_GUID, disk_pattern, xts
from sevsim.profiles import MachineProfile
from sevsim.soc.dma import BusMaster
from sevsim.system import HostSystem

MiB = 1 << 20
DISK_MIB = 4
SEED = 2024
GUEST_MEMORY = 160 * MiB
SECRET_MARKER = b"sevsim secret:"  # the guest's secret page starts with it
DEVICE_ID = 0x0300  # 00:00.0 on bus 3: a NIC, say
DEVICE_DATA = b"written by a device's DMA straight into the guest's page.".ljust(64, b".")


def io_story(profile: MachineProfile) -> Story:
    yield Working("an SEV guest writes its disk through bounce buffers")
    system = HostSystem.start(profile)
    try:
        with tempfile.TemporaryDirectory(prefix="sevsim-io-") as tmp:
            work = Path(tmp)
            (work / "OVMF.fd").write_bytes(x86_guest.image())
            yield _disk_step(system, work, encrypted=False)
            yield Working("the same disk, encrypted with a key sent as a launch secret")
            yield _disk_step(system, work, encrypted=True)
            yield Working("a device's DMA at a private page")
            yield _dma_step(system)
    finally:
        system.close()


POOL_LINE = re.compile(r"software IO TLB: mapped \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]")


def _run_disk_guest(system: HostSystem, work: Path, key: bytes | None) -> tuple[Vmm, dict, Path]:
    image = work / ("vdb.img" if key else "vda.img")
    create_image(image, 2 * DISK_MIB * MiB)
    owner = session.start(system.export_chain().pdh, 0x1)
    files = owner.write(work, "owner")
    vmm = Vmm(
        system,
        VmConfig(
            firmware=work / "OVMF.fd",
            memory=GUEST_MEMORY,
            dh_cert_file=files["godh"],
            session_file=files["session"],
            console=work / "console.log",
            fw_cfg_files={"opt/sevsim/workload": f"disk:{DISK_MIB}:{SEED}:write".encode()},
            disk=image,
        ),
    )
    vmm.start()
    if key is not None:  # the owner's disk key, as a launch secret (after checking the launch)
        blob = base64.b64decode(vmm.query_launch_measure()["data"])
        entries = [(DISK_KEY_GUID, key)]
        packet = secret.secrets_table_packet_b64(owner.tek, owner.tik, blob, entries)
        vmm.inject_secret(*packet, None)
    vmm.cont()
    vmm.wait_idle(300)
    # What the guest says: the pool it set up, whether it wrote its disk and how.
    console = vmm.console_text()
    report: dict = {
        "ok": f"disk: wrote {DISK_MIB} MiB to vda" in console,
        "encrypted": "(AES-XTS encrypted)" in console,
        "source_gpa": x86_guest.symbols()["DISK_BUFFER_GPA"],
    }
    pool = POOL_LINE.search(console)
    if pool:
        first, last = int(pool[1], 16), int(pool[2], 16)
        report["swiotlb"] = {"gpa": first, "size": last + 1 - first}
    return vmm, report, image


def _disk_step(system: HostSystem, work: Path, encrypted: bool) -> Step:
    key = os.urandom(64) if encrypted else None
    vmm, report, image = _run_disk_guest(system, work, key)
    data = disk_pattern(DISK_MIB * MiB, SEED)
    marker = data[:24]  # "sevsim guest disk, seed "
    try:
        vm = vmm.vm
        system.kernel.wbinvd_on_all_cpus()  # make DRAM current before the dump is read
        dump = ColdBootDump(system.machine)
        pool = report.get("swiotlb", {})
        pool_view = vm.read_stream(pool["gpa"], pool["size"]) if pool else b""
        found = pool_view.find(marker)
        on_disk = image.read_bytes()
        console = vmm.console_text().rstrip()
        stats = vmm.disk.stats
        if not encrypted:
            s = Step(
                "An SEV guest writes its disk through bounce buffers",
                "No device can use the guest's key, so an SEV guest does every DMA through "
                "pages it shares with the host: its firmware sets aside a swiotlb pool "
                "(6 % of memory, at least 64 MiB), clears the C-bit on it and tells the "
                "hypervisor. For each request the virtio-blk driver copies the private buffer "
                "into a pool slot (a bounce buffer), puts the slot's address in the ring, "
                "and notifies the device — a VM exit. The VMM's device reads the slot "
                "through its own mapping and writes the file. The guest's private buffer "
                "stays ciphertext to the hypervisor; the bounce buffer and the disk file are "
                "plaintext: SEV does not protect I/O.",
                facts=[
                    ("swiotlb pool", f"GPA {pool['gpa']:#x}, {pool['size'] >> 20} MiB, shared"),
                    ("disk", f"{image.name}, {len(on_disk) >> 20} MiB raw file, sparse"),
                    ("device", f"{stats.writes} write requests, {stats.bytes_written} bytes"),
                    ("guest console", console),
                ],
            )
            src = report["source_gpa"]
            s.views.append(
                View(
                    "the guest's data buffer",
                    "guest C=1, private",
                    vm.spa(src),
                    data[:64],  # what the guest wrote there
                    dump.read(vm.spa(src), 64),
                    host_reads=vm.read(src, 64),
                )
            )
            if found >= 0:
                gpa = pool["gpa"] + found
                s.views.append(
                    View(
                        "a bounce buffer, as the hypervisor finds it in the pool",
                        "guest C=0, shared; the host's mapping has its SME C-bit",
                        vm.spa(gpa),
                        pool_view[found : found + 64],
                        dump.read(vm.spa(gpa), 64),
                    )
                )
            s.check("the guest wrote its data and the device took every byte", report.get("ok"))
            s.check(
                "the disk file holds exactly what the guest wrote",
                on_disk[: len(data)] == data,
            )
            s.check("the hypervisor finds the guest's data in the shared pool", found >= 0)
            s.check(
                "the guest's private buffer is ciphertext to the hypervisor",
                vm.read(report["source_gpa"], 64) != data[:64],
            )
            s.check(
                "a DRAM dump shows the pool only under the host's SME key",
                not dump.find(marker),
            )
        else:
            s = Step(
                "A guest that encrypts its disk leaves only ciphertext outside",
                "The owner checks the launch measurement, then sends a 64-byte key as a "
                "launch secret (LAUNCH_SECRET: the host relays it but cannot open it). The "
                "guest encrypts every 4 KiB block with AES-256-XTS before it leaves private "
                "memory — dm-crypt's aes-xts-plain64, the sector number as the tweak — so "
                "the bounce buffers, the device and the disk file see only ciphertext. "
                "The owner, who holds the key, can read the disk; the host cannot.",
                facts=[
                    ("disk", f"{image.name}: {stats.bytes_written} bytes written"),
                    ("first bytes on disk", on_disk[:32].hex()),
                    ("guest console", console),
                ],
            )
            assert key is not None
            s.check("the guest wrote its disk encrypted", report.get("ok") and report["encrypted"])
            s.check("the disk file holds none of the plaintext", marker not in on_disk)
            s.check("the hypervisor finds nothing readable in the pool", found < 0)
            s.check(
                "the owner's key decrypts the disk to what the guest wrote",
                xts(key, on_disk[:8192], 0, encrypt=False) == data[:8192],
            )
            s.check("the key appears nowhere on the console", key.hex() not in console)
    finally:
        vmm.quit()
        image.unlink()
    return s


def _dma_step(system: HostSystem) -> Step:
    # The real-code guest's `dma`: it keeps its secret at SECRET_GPA, then yields while the
    # host may have a device write there. The host knows the layout of the firmware it
    # boots (its symbols are public), not the secret.
    vm = system.start_x86_guest("dma", "secret:dma dma", memory=x86_guest.MIN_MEMORY)
    try:
        first = vm.vcpus[0].run()  # the guest keeps its secret, then waits in HLT
        gpa = x86_guest.symbols()["SECRET_GPA"]
        spa = vm.spa(gpa)
        system.kernel.wbinvd_on_all_cpus()
        dump = ColdBootDump(system.machine)
        device = BusMaster(system.machine, DEVICE_ID)
        cbit = system.kernel.me_mask
        before = dump.read(spa, 64)
        read_plain = device.read(spa, 64)
        read_cbit = device.read(spa | cbit, 64)
        device.write(spa, DEVICE_DATA)  # no C-bit: the bytes land in DRAM as they are
        dram_after = dump.read(spa, 64)
        rest = vm.run()
        # What the guest read, as the owner's debugger sees it (the policy allows DBG).
        after_dma = vm.sev_dbg_decrypt(gpa, 64)
        console = vm.console_text()
        s = Step(
            "A device's DMA aimed at a guest's private page",
            "A DMA carries no ASID, so the memory controller applies the host's rules: "
            "with the C-bit the host key, without it none. A device that reads a guest's "
            "private page gets ciphertext either way, and what it writes there the guest "
            "decrypts with its own key into garbage. That is why the guest bounces.",
            facts=[
                ("device", f"{device.name}, 64-bit DMA, no IOMMU translation"),
                ("guest page", f"GPA {gpa:#x}, system physical {spa:#x}"),
                ("DMA read, no C-bit", read_plain[:32].hex()),
                ("DMA read, with the C-bit", read_cbit[:32].hex()),
                ("DRAM before the write", before[:32].hex()),
            ],
        )
        s.views.append(
            View(
                "the guest's page after the device wrote to it",
                f"guest C=1, ASID {vm.asid}",
                spa,
                after_dma,
                dram_after,
                host_reads=vm.read(gpa, 64),
            )
        )
        s.check("the guest waited in HLT for the device", first.reason == "HLT")
        s.check(
            "the secret was in the page the device hit",
            f"secret at {gpa:#x}" in console,
        )
        s.check(
            "the device reads ciphertext, with or without the C-bit",
            SECRET_MARKER not in read_plain + read_cbit and read_plain == before,
        )
        s.check("DRAM holds the device's bytes as written", dram_after == DEVICE_DATA)
        s.check(
            "the guest reads garbage, not the device's bytes",
            after_dma != DEVICE_DATA
            and f"dma read back: changed, sha256 {hashlib.sha256(after_dma).hexdigest()}"
            in console,
        )
        s.check("the guest then ran to completion", [e.reason for e in rest] == ["DONE"])
    finally:
        vm.destroy()
    return s
