"""The guest's disk workload: write data to its virtio disk through the bounce pool, read it
back, compare — optionally encrypting the disk the way dm-crypt does.

``disk:<MiB>[:<seed>[:write|:auth]]`` (the fw_cfg workload file): the guest makes
``<MiB>`` MiB of data in private memory — ``disk_pattern`` — writes it to its disk from
sector 0 and, unless ``write`` is given, reads it back into other private memory and
checks it.

**Disk encryption**: when the owner injected a 64-byte secret under ``DISK_KEY_GUID``
(through LAUNCH_SECRET, so the host never sees it), the guest encrypts every 4 KiB block
with AES-256-XTS before it leaves private memory, as dm-crypt's ``aes-xts-plain64`` with
``sector_size:4096``: the tweak is the 512-byte sector number of the block, little-endian,
in 16 bytes. Then the disk file, the bounce pool and the device see only ciphertext.

**Integrity** (``auth``, with the disk key): XTS hides the data but does not notice a
change — a modified block just decrypts to garbage, an old one to old data. With ``auth``
the guest also keeps an HMAC-SHA256 tag per 4 KiB block, over the block's number and its
contents as written, in a tag area right after the data (as dm-integrity keeps tags in
its own metadata), under a key derived from the disk key. On reading back it checks every
block before using it and fails the read if one does not verify.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from typing import Any

from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevsim.api import virtio as v
from sevsim.guest.dma import GuestDma
from sevsim.guest.kernel import GuestKernel
from sevsim.guest.virtio_blk import VirtioBlk, VirtioBlkError
from sevsim.soc.paging import PAGE_4K

# MODEL: the model's own GUID for a disk key in the launch secret table.
DISK_KEY_GUID = uuid.UUID("5e4f6a3c-9b1d-4c2e-8f7a-0d3b2c1e4a5f")
XTS_BLOCK = 4096
CHUNK = 4 << 20  # the workload moves data between Python and guest memory in 4 MiB steps


def disk_pattern(size: int, seed: int) -> bytes:
    """The workload's data: a readable first sector, then random bytes from ``seed``."""
    first = f"sevsim guest disk, seed {seed}: written by the guest through its bounce buffers\n"
    head = first.encode().ljust(v.SECTOR_SIZE, b"\0")[: min(size, v.SECTOR_SIZE)]
    return head + random.Random(seed).randbytes(max(0, size - v.SECTOR_SIZE))


def xts(key: bytes, data: bytes, first_sector: int, encrypt: bool) -> bytes:
    """AES-XTS over whole 4 KiB blocks, plain64 tweaks (512-byte sector numbers)."""
    out = bytearray()
    for off in range(0, len(data), XTS_BLOCK):
        tweak = (first_sector + off // v.SECTOR_SIZE).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        op = cipher.encryptor() if encrypt else cipher.decryptor()
        out += op.update(data[off : off + XTS_BLOCK]) + op.finalize()
    return bytes(out)


def parse_workload(text: str) -> tuple[int, int, str]:
    """(size, seed, mode): mode is "", "write" (no read-back) or "auth" (integrity tags)."""
    parts = text.split(":")
    usage = f"expected disk:<MiB>[:<seed>[:write|:auth]], not {text!r}"
    if parts[0] != "disk" or not 2 <= len(parts) <= 4 or not parts[1].isdigit():
        raise ValueError(usage)
    seed = int(parts[2]) if len(parts) > 2 and parts[2] else 1
    mode = parts[3] if len(parts) == 4 else ""
    if mode not in ("", "write", "auth"):
        raise ValueError(usage)
    return int(parts[1]) << 20, seed, mode


def tag(mac_key: bytes, block: int, data: bytes) -> bytes:
    """The integrity tag of one 4 KiB block as written (its number binds it to its place)."""
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(block.to_bytes(8, "little") + data)
    return mac.finalize()


def mac_key_of(disk_key: bytes) -> bytes:
    mac = hmac.HMAC(disk_key, hashes.SHA256())
    mac.update(b"sevsim disk integrity")
    return mac.finalize()


def run(kernel: GuestKernel, workload: str, secrets: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The workload; returns what the guest knows about it (also printed on its console)."""
    report: dict[str, Any] = {"workload": workload, "ok": False}
    try:
        size, seed, mode = parse_workload(workload)
    except ValueError as exc:
        kernel.printk(f"disk: {exc}")
        report["error"] = str(exc)
        return report
    key = next((data for guid, data in secrets if guid == str(DISK_KEY_GUID)), None)
    if key is not None and len(key) != 64:
        kernel.printk(f"disk: the disk key must be 64 bytes (AES-256-XTS), not {len(key)}")
        report["error"] = "bad disk key"
        return report
    if mode == "auth" and key is None:
        kernel.printk("disk: integrity tags need the disk key (a launch secret)")
        report["error"] = "no disk key"
        return report
    report.update(size=size, seed=seed, encrypted=key is not None, authenticated=mode == "auth")
    try:
        dma = GuestDma(kernel)
        blk = VirtioBlk(kernel, dma)
        blk.probe()
        report["ring_gpa"] = blk.ring_gpa
        if dma.swiotlb is not None:
            report["swiotlb"] = {"gpa": dma.swiotlb.pool_pa, "size": dma.swiotlb.size}
        npages = -(-size // PAGE_4K)
        source = kernel.alloc_pages(npages)
        _fill(kernel, source, disk_pattern(size, seed), key)
        report["source_gpa"] = source
        report["source_head"] = kernel.vcpu.read(source, 64)  # the guest's own view
        start = time.perf_counter()
        blk.write(0, source, size)
        report["write_seconds"] = time.perf_counter() - start
        if mode == "auth":
            assert key is not None
            tags = _tags(kernel, source, size, mac_key_of(key))
            tag_area = kernel.alloc_pages(-(-len(tags) // PAGE_4K))
            kernel.vcpu.write(tag_area, tags)
            blk.write(size // v.SECTOR_SIZE, tag_area, _sectors(len(tags)))
        how = "AES-XTS encrypted" if key else "in the clear"
        if mode == "auth":
            how += ", with integrity tags"
        kernel.printk(
            f"disk: wrote {size >> 20} MiB to vda ({how}) in {report['write_seconds']:.2f} s "
            f"with {blk.requests} requests, {blk.notifies} notifies"
        )
        if mode != "write":
            target = kernel.alloc_pages(npages)
            start = time.perf_counter()
            blk.read(0, target, size)
            report["read_seconds"] = time.perf_counter() - start
            if mode == "auth":
                assert key is not None
                blk.read(size // v.SECTOR_SIZE, tag_area, _sectors(len(tags)))
                stored = kernel.vcpu.read(tag_area, len(tags))
                bad = _bad_blocks(stored, _tags(kernel, target, size, mac_key_of(key)))
                report["bad_blocks"] = bad
                if bad:
                    raise VirtioBlkError(
                        f"integrity check failed for {len(bad)} block(s), first at sector "
                        f"{bad[0] * XTS_BLOCK // v.SECTOR_SIZE}: the data is refused"
                    )
            digest = _digest(kernel, target, size, key)
            report["sha256"] = digest
            report["match"] = digest == hashlib.sha256(disk_pattern(size, seed)).hexdigest()
            kernel.printk(
                f"disk: read {size >> 20} MiB back, sha256 {digest[:16]}..., "
                + ("matches what was written" if report["match"] else "DOES NOT MATCH")
            )
        if dma.swiotlb is not None:
            report["swiotlb"]["peak_slots"] = dma.swiotlb.peak
        report["ok"] = report.get("match", True)
    except (VirtioBlkError, MemoryError) as exc:
        kernel.printk(f"disk: {exc}")
        report["error"] = str(exc)
    return report


def _fill(kernel: GuestKernel, va: int, data: bytes, key: bytes | None) -> None:
    """Put the data into private memory (encrypted for the disk when there is a key)."""
    for off in range(0, len(data), CHUNK):
        chunk = data[off : off + CHUNK]
        if key is not None:
            chunk = xts(key, chunk, off // v.SECTOR_SIZE, encrypt=True)
        kernel.vcpu.write_stream(va + off, chunk)


def _digest(kernel: GuestKernel, va: int, size: int, key: bytes | None) -> str:
    digest = hashlib.sha256()
    for off in range(0, size, CHUNK):
        chunk = kernel.vcpu.read_stream(va + off, min(CHUNK, size - off))
        if key is not None:
            chunk = xts(key, chunk, off // v.SECTOR_SIZE, encrypt=False)
        digest.update(chunk)
    return digest.hexdigest()


def _tags(kernel: GuestKernel, va: int, size: int, mac_key: bytes) -> bytes:
    """The tag of every 4 KiB block of [va, va+size) as it goes to (or came from) disk."""
    out = bytearray()
    for off in range(0, size, CHUNK):
        chunk = kernel.vcpu.read_stream(va + off, min(CHUNK, size - off))
        for pos in range(0, len(chunk), XTS_BLOCK):
            out += tag(mac_key, (off + pos) // XTS_BLOCK, chunk[pos : pos + XTS_BLOCK])
    return bytes(out)


def _bad_blocks(stored: bytes, computed: bytes) -> list[int]:
    size = hashes.SHA256.digest_size
    return [
        i // size
        for i in range(0, len(computed), size)
        if not constant_time.bytes_eq(stored[i : i + size], computed[i : i + size])
    ]


def _sectors(n: int) -> int:
    """n bytes rounded up to whole sectors."""
    return -(-n // v.SECTOR_SIZE) * v.SECTOR_SIZE
