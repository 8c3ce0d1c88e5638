"""The hypervisor and the guest's I/O: it runs the disk device, so it sees and can change
everything that crosses it."""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path
from typing import Any

from sevsim.attacks.lab import AttackResult, attack
from sevsim.guest import x86 as x86_guest
from sevsim.host.virtio_blk import VirtioBlkDevice, create_image
from sevsim.host.vmm import VmConfig, Vmm
from sevsim.owner import secret, session
from sevsim.owner.disk import DISK_KEY_GUID, disk_pattern
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

MiB = 1 << 20
SEED = 77
TAMPER_OFFSET = 4096 + 100  # a byte in the second 4 KiB block of the disk


class TamperingDisk(VirtioBlkDevice):
    """The VMM's own virtio-blk device, changed by the hypervisor: it keeps what the guest
    writes, and before the guest reads its data back it flips one byte in the image."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.first_write = b""
        self.tampered = False

    def _write(self, sector, data) -> None:
        if sector == 0 and not self.first_write:
            addr, length, _ = data[0]
            self.first_write = self.vm.read_stream(addr, min(length, 64))
        super()._write(sector, data)

    def _read(self, sector, data) -> int:
        if sector == 0 and not self.tampered:
            byte = os.pread(self._fd, 1, TAMPER_OFFSET)
            os.pwrite(self._fd, bytes([byte[0] ^ 0xFF]), TAMPER_OFFSET)
            self.tampered = True
        return super()._read(sector, data)


@attack(
    "io-tamper",
    "The hypervisor reads and rewrites a guest's disk I/O",
    """SEV protects memory, not I/O: the guest's data leaves private memory through bounce
    buffers the host can read, to a device and a disk file the host runs. The hypervisor
    watches the first sector the guest writes, then flips one byte of the image before
    the guest reads its data back — three times: a guest that writes in the clear, one
    that encrypts its disk with AES-XTS (a key sent as a launch secret), and one that also
    keeps an HMAC tag per block. XTS hides the data but a changed block decrypts to
    garbage without complaint; the tags catch the change and the read is refused.""",
    "the guest's own authenticated disk encryption (dm-crypt with dm-integrity, or a "
    "filesystem with checksums keyed by a secret the host never sees)",
)
def io_tamper(profile: MachineProfile, r: AttackResult) -> None:
    cases = {"clear": (False, ""), "xts": (True, ""), "xts+hmac": (True, ":auth")}
    with HostSystem.start(profile) as system, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "fw.fd").write_bytes(x86_guest.image())
        for label, (encrypted, mode) in cases.items():
            outcome = _run_case(system, work, label, encrypted, mode)
            r.figures[label] = outcome
            seen = "plaintext" if outcome["host_saw_plaintext"] else "ciphertext only"
            if outcome["detected"]:
                verdict = f"the guest refused it: {outcome['guest_error']}"
            elif outcome["guest_read_altered_data"]:
                verdict = "the guest read the altered data and did not notice"
            else:
                verdict = "the guest read its data unchanged"
            r.step(f"{label}: the host saw {seen}; after the flip, {verdict}")
    clear = r.figures["clear"]
    r.succeeded = clear["host_saw_plaintext"] and clear["guest_read_altered_data"]


def _run_case(system: HostSystem, work: Path, label: str, encrypted: bool, mode: str) -> dict:
    image = work / f"{label}.img"
    create_image(image, 4 * MiB)
    owner = session.start(system.export_chain().pdh, 0x1)
    files = owner.write(work, label)
    vmm = Vmm(
        system,
        VmConfig(
            firmware=work / "fw.fd",
            memory=96 * MiB,
            dh_cert_file=files["godh"],
            session_file=files["session"],
            console=work / f"{label}.log",
            fw_cfg_files={"opt/sevsim/workload": f"disk:1:{SEED}{mode}".encode()},
            disk=image,
        ),
    )
    try:
        vmm.start()
        device = TamperingDisk(vmm.vm, image)  # the hypervisor swaps in its own device
        vmm.disk.close()
        vmm.disk = device
        device.attach()
        if encrypted:
            key = os.urandom(64)
            blob = base64.b64decode(vmm.query_launch_measure()["data"])
            entries = [(DISK_KEY_GUID, key)]
            packet = secret.secrets_table_packet_b64(owner.tek, owner.tik, blob, entries)
            vmm.inject_secret(*packet, None)
        vmm.cont()
        vmm.wait_idle(300)
        # What the guest says about its read-back (guest/x86/src/disk.c).
        lines = vmm.console_text().splitlines()
        refused = [ln for ln in lines if "disk: integrity check failed" in ln]
        marker = disk_pattern(64, SEED)[:24]
        return {
            "host_saw_plaintext": device.first_write.startswith(marker),
            "tampered": device.tampered,
            "guest_read_altered_data": any("DOES NOT MATCH" in ln for ln in lines),
            "detected": bool(refused),
            "guest_error": refused[0].split("disk: ", 1)[1] if refused else "",
        }
    finally:
        vmm.quit()
