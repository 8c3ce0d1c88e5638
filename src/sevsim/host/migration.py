"""Moving a running SEV guest to another platform, or into a snapshot file (sev-api.md §6).

**The stream** (documented in docs/migration.md) is a magic line and then framed records,
``u8 type ‖ u32 length (LE) ‖ payload``:

======  =====  ==============================================================================
type    name   payload
======  =====  ==============================================================================
1       SETUP  JSON: memory, vCPUs, policy, memslots (GPA, size, read-only) and the windows
               that show another slot's pages (GPA, size, target GPA), the sender's PDH
               and the SEND_START session blob (base64)
2       PAGE   ``u64 GPA ‖ 52-byte packet header ‖ ciphertext``: one page of private guest
               memory, as SEND_UPDATE_DATA made it (KVM takes at most one page per command)
3       PLAIN  ``u64 GPA ‖ data``: a page the guest shares with the host, as the host reads it
4       VCPU   JSON: one vCPU's state: the whole VMCB save area (segment registers with
               their hidden parts, GDTR/IDTR, control registers, EFER, RFLAGS, RIP, ...),
               the GPRs KVM keeps, and whether it waits for a STARTUP IPI
5       END    SHA-256 of every byte before this record
======  =====  ==============================================================================

Only the packets are protected by the firmware (their MACs, under the TIK). The END digest
catches truncation and corruption in transit or on disk; it is not keyed, so it does not
stop a malicious host from reordering or dropping records — SEV does not protect the
guest's memory layout (SEV-SNP does).

**Over TCP** the receiver answers after END: ``READY`` once RECEIVE_FINISH succeeded, or
``ERROR reason``. Only on READY does the sender issue SEND_FINISH and answer ``COMMIT``;
the receiver runs the guest only on COMMIT. Any failure before that — a broken connection,
a packet the receiving firmware rejects, a refused chain, no free ASID — ends with
SEND_CANCEL on the sender, whose guest carries on with its memory untouched, and with the
receiver discarding what it got (DEACTIVATE, DECOMMISSION). The one window this cannot
close is a connection lost between the sender's COMMIT and its arrival: the sender has
finished and the receiver never starts (never both running; in that case, neither).

**A snapshot** is the same stream in a file, written atomically; the sender then issues
SEND_CANCEL and its guest keeps running. Restoring receives the file exactly as a
connection, and commits only after the END digest has been checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from sevsim.api import commands as cmd
from sevsim.certs.chain import decode_chain
from sevsim.certs.sev import CERT_SIZE, CertError
from sevsim.soc.svm import SAVE, VMCB

MAGIC = b"SEVSIM-MIGRATION 2\n"  # 2: one page per PAGE record (1 had up to five)
OLD_MAGIC = b"SEVSIM-MIGRATION 1\n"
FRAME = struct.Struct("<BI")
GPA = struct.Struct("<Q")
PAGE = 4096
PROGRESS_EVERY = 256  # pages between two progress reports (1 MiB)
MAX_RECORD = 1 << 20
SUPDATE = 4  # the guest state between SEND_START and SEND_FINISH / SEND_CANCEL
# What KVM_GET_SREGS/KVM_GET_REGS and friends give QEMU: every field of the save area.
VCPU_FIELDS = tuple(f.name for f in VMCB.fields if f.offset >= SAVE)

Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)


class Record(IntEnum):
    SETUP = 1
    PAGE = 2
    PLAIN = 3
    VCPU = 4
    END = 5


class MigrationError(RuntimeError):
    """A migration or snapshot failed; the message says where and why."""


@dataclass
class TargetChain:
    """What the sender needs of the receiving platform (QEMU's sev-pdh, sev-plat-cert and
    sev-amd-cert migration parameters)."""

    pdh: bytes
    plat_certs: bytes  # PEK ‖ OCA ‖ CEK
    amd_certs: bytes  # ASK ‖ ARK (may be empty when the policy does not ask for them)

    @classmethod
    def from_chain(cls, data: bytes) -> TargetChain:
        """From a chain export (PDH, PEK, OCA, CEK [, ASK, ARK])."""
        try:
            chain = decode_chain(data)
        except CertError as exc:
            raise MigrationError(f"target chain: {exc}") from None
        amd = chain.ask.raw + chain.ark.raw if chain.ask and chain.ark else b""
        return cls(chain.pdh.raw, chain.pek.raw + chain.oca.raw + chain.cek.raw, amd)

    @classmethod
    def from_base64(cls, pdh: str, plat: str, amd: str) -> TargetChain:
        try:
            parts = [base64.b64decode(x, validate=True) for x in (pdh, plat, amd)]
        except (ValueError, TypeError):
            raise MigrationError("the migration parameters must be base64") from None
        if len(parts[0]) != CERT_SIZE or len(parts[1]) != 3 * CERT_SIZE:
            raise MigrationError("sev-pdh is one SEV certificate, sev-plat-cert three")
        return cls(*parts)


# ---- the stream -----------------------------------------------------------------------------
class StreamWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self._put(MAGIC)

    def _put(self, data: bytes) -> None:
        self.digest.update(data)
        self.out.write(data)

    def record(self, kind: Record, payload: bytes) -> None:
        self._put(FRAME.pack(kind, len(payload)))
        self._put(payload)

    def end(self) -> None:
        self.record(Record.END, self.digest.digest())
        self.out.flush()


class StreamReader:
    def __init__(self, inp: BinaryIO) -> None:
        self.inp = inp
        self.digest = hashlib.sha256()
        magic = self._take(len(MAGIC))
        if magic == OLD_MAGIC:
            raise MigrationError(
                "a stream from an older sevsim, with several pages per packet, which KVM does "
                "not take: make the snapshot again with this version"
            )
        if magic != MAGIC:
            raise MigrationError("not a sevsim migration stream (bad magic)")
        self.digest.update(MAGIC)

    def _take(self, n: int) -> bytes:
        data = self.inp.read(n)
        if data is None or len(data) < n:
            raise MigrationError("the stream ended early (connection lost or file truncated)")
        return data

    def record(self) -> tuple[Record, bytes]:
        head = self._take(FRAME.size)
        kind, length = FRAME.unpack(head)
        if length > MAX_RECORD:
            raise MigrationError(f"a record of {length} bytes: the stream is damaged")
        payload = self._take(length)
        try:
            record = Record(kind)
        except ValueError:
            raise MigrationError(f"unknown record type {kind}: the stream is damaged") from None
        if record == Record.END:  # it carries the digest of everything before it
            if payload != self.digest.digest():
                raise MigrationError("the stream's digest does not match: it was altered")
        else:
            self.digest.update(head)
            self.digest.update(payload)
        return record, payload


# ---- the sending side -------------------------------------------------------------------------
def send(vmm, out: BinaryIO, target: TargetChain, progress: Progress | None = None) -> None:
    """SEND_START and the whole guest into ``out``. The caller then does SEND_FINISH (the
    receiver committed) or SEND_CANCEL (anything else, and snapshots)."""
    vm = vmm.vm
    system = vmm.system
    pdh = system.sev.pdh_cert_export()
    if not pdh.ok:
        raise MigrationError(f"could not export this platform's PDH: {pdh.explain()}")
    session, policy = vm.sev_send_start(target.pdh, target.plat_certs, target.amd_certs)
    shared = _shared_pages(vm)
    pages = [(s, i) for s in vm.slots for i in sorted(s.populated)]
    total = len(pages) * PAGE
    writer = StreamWriter(out)
    setup = {
        "memory": vmm.config.memory,
        "smp": len(vm.vcpus),
        "policy": policy,
        "slots": [[s.gpa, s.size, s.readonly] for s in vm.slots],
        "aliases": [[a.gpa, a.size, _alias_target(vm, a)] for a in vm.aliases],
        "pdh": base64.b64encode(pdh.data["pdh"]).decode(),
        "session": base64.b64encode(session).decode(),
    }
    writer.record(Record.SETUP, json.dumps(setup).encode())
    # Page by page, as QEMU does: KVM rejects a SEND_UPDATE_DATA beyond one page.
    for n, (slot, index) in enumerate(pages, 1):
        gpa = slot.gpa + index * PAGE
        if gpa in shared:
            writer.record(Record.PLAIN, GPA.pack(gpa) + vm.read_stream(gpa, PAGE))
        else:
            header, data = vm.sev_send_update_data(gpa, PAGE)
            writer.record(Record.PAGE, GPA.pack(gpa) + header + data)
        if progress and n % PROGRESS_EVERY == 0:
            progress(n * PAGE, total)
    for vcpu in vm.vcpus:
        state = vcpu.vmcb()
        record = {"index": vcpu.index, "regs": vcpu.regs, "parked": vcpu.parked}
        record |= {name: getattr(state, name) for name in VCPU_FIELDS}
        writer.record(Record.VCPU, json.dumps(record).encode())
    writer.end()
    if progress:
        progress(total, total)


def _alias_target(vm, alias) -> int:
    """The GPA of the slot pages a window shows (QEMU's alias offset)."""
    for slot in vm.slots:
        if slot.hva <= alias.hva < slot.hva + slot.size:
            return slot.gpa + alias.hva - slot.hva
    raise MigrationError(f"the window at {alias.gpa:#x} shows no memslot")


def _shared_pages(vm) -> set[int]:
    pages = set()
    for gpa, npages in vm.shared_ranges:
        pages.update(range(gpa & ~(PAGE - 1), (gpa & ~(PAGE - 1)) + npages * PAGE, PAGE))
    return pages


def snapshot(vmm, path: Path, target: TargetChain, progress: Progress | None = None) -> None:
    """The guest into a file, written atomically; the guest then carries on (SEND_CANCEL)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            send(vmm, out, target, progress)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if vmm.vm.sev_guest_status().state == SUPDATE:
            vmm.vm.sev_send_cancel()


# ---- the receiving side -------------------------------------------------------------------------
def receive(vmm, inp: BinaryIO) -> None:
    """Read a stream into a new guest on ``vmm`` (created by it, left in RUNNING firmware
    state, vCPUs not started). On any error the guest is discarded and MigrationError
    says why."""
    reader = StreamReader(inp)
    kind, payload = reader.record()
    if kind != Record.SETUP:
        raise MigrationError("the stream does not start with its setup")
    try:
        setup = json.loads(payload)
        session = base64.b64decode(setup["session"])
        sender_pdh = base64.b64decode(setup["pdh"])
        memory, smp, policy = int(setup["memory"]), int(setup["smp"]), int(setup["policy"])
        slots = [(int(a), int(b), bool(ro)) for a, b, ro in setup["slots"]]
        aliases = [(int(a), int(b), int(t)) for a, b, t in setup["aliases"]]
    except (ValueError, KeyError, TypeError):
        raise MigrationError("the stream's setup record is damaged") from None
    vmm.create_incoming(memory, smp, slots, aliases)
    vm = vmm.vm
    try:
        vm.sev_receive_start(sender_pdh, session, policy)
        vmm.config.policy = policy
        header_size = cmd.PACKET_HEADER.size
        vcpus: list[bytes] = []
        while True:
            kind, payload = reader.record()
            if kind == Record.PAGE:
                (gpa,) = GPA.unpack_from(payload)
                header = payload[GPA.size : GPA.size + header_size]
                vm.sev_receive_update_data(header, payload[GPA.size + header_size :], gpa)
            elif kind == Record.PLAIN:
                (gpa,) = GPA.unpack_from(payload)
                vm.write_stream(gpa, payload[GPA.size :])
                vm.shared_ranges.append((gpa, 1))  # still shared: sent in the clear next time
            elif kind == Record.VCPU:
                vcpus.append(payload)
            elif kind == Record.END:
                break
            else:
                raise MigrationError(f"unexpected {kind.name} record")
        # The registers only now, with the whole stream checked against its digest.
        for payload in vcpus:
            try:
                _restore_vcpu(vm, json.loads(payload))
            except (ValueError, KeyError, IndexError, TypeError):
                raise MigrationError("the stream is damaged: a bad vCPU record") from None
        vm.sev_receive_finish()
    except Exception as exc:
        vmm.discard()
        if isinstance(exc, MigrationError):
            raise
        raise MigrationError(f"the receiving side failed: {exc}") from None


def _restore_vcpu(vm, record: dict[str, Any]) -> None:
    vcpu = vm.vcpus[int(record["index"])]
    vcpu.set_vmcb(**{name: int(record[name]) for name in VCPU_FIELDS})
    vcpu.regs.clear()
    vcpu.regs.update({k: int(v) for k, v in record["regs"].items()})
    vcpu.parked = bool(record["parked"])
