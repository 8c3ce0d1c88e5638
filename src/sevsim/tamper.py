"""Single-bit tampering of every structure that crosses the untrusted host (issue
"robustness", docs/reliability.md): each flip must be refused with the right status or a
clear error, and must not change the guest it was aimed at.

* ``session`` — the owner's LAUNCH_START session blob (every bit);
* ``godh`` — the owner's Diffie-Hellman certificate (every bit, or a sample);
* ``secret-header``, ``secret-payload`` — a LAUNCH_SECRET packet (every bit): the guest in
  LSECRET must stay there with its memory unchanged;
* ``packet-header``, ``packet-payload`` — a migration packet from SEND_UPDATE_DATA
  offered to RECEIVE_UPDATE_DATA (every header bit, a sample of the 4 KiB payload): the
  receiving guest must stay in RUPDATE and its page untouched; the unmodified packet is
  accepted afterwards;
* ``chain`` — a platform's full certificate chain file (a sample): `verify-chain` must fail;
* ``snapshot`` — a snapshot file (a sample) given to `vm run --restore`: refused, and no
  guest is left behind on the platform.

Flips the firmware or the verifier accept are reported with their byte offsets: where a
format leaves bytes unused (an unused signature slot, reserved fields), a flip there
changes nothing — as on the real parts — and the report says which bytes those are.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sevsim.api import guidtable
from sevsim.certs.chain import decode_chain, verify_chain
from sevsim.certs.sev import CertError
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import KvmError, Vm
from sevsim.host.migration import TargetChain
from sevsim.host.vmm import MIN_MEMORY as VMM_MIN_MEMORY
from sevsim.owner import secret, session
from sevsim.owner.trust import choose_root
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

# The guests are the real-code image (sevsim.guest.x86), with the RAM both it and the VMM need.
GUEST_MEMORY = max(x86_guest.MIN_MEMORY, VMM_MIN_MEMORY)
SNAPSHOT_SAMPLE = 2000  # each flip is a whole restore attempt
SECRET_GPA = 0x810000  # where the owner's launch secret goes: OVMF's SEV secret area (AmdSev)
PAGE_GPA = x86_guest.symbols()["SECRET_GPA"]  # the migration packet carries the guest's secret


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


class Tally:
    def __init__(self, name: str, bits: int) -> None:
        self.name, self.bits = name, bits
        self.tried = 0
        self.statuses: Counter = Counter()
        self.accepted: list[int] = []  # bit positions
        self.violations: list[str] = []

    def to_json(self) -> dict[str, Any]:
        offsets = sorted({b // 8 for b in self.accepted})
        return {
            "bits": self.bits,
            "tried": self.tried,
            "rejected": self.tried - len(self.accepted),
            "accepted": len(self.accepted),
            "accepted_byte_ranges": _ranges(offsets),
            "statuses": dict(self.statuses.most_common()),
            "violations": self.violations,
        }


def _ranges(offsets: list[int]) -> list[str]:
    out: list[list[int]] = []
    for o in offsets:
        if out and out[-1][1] == o - 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return [f"{a:#x}-{b:#x}" if a != b else f"{a:#x}" for a, b in out]


def _bits(total: int, sample: int, rng: random.Random) -> list[int]:
    return list(range(total)) if sample >= total else sorted(rng.sample(range(total), sample))


def campaign(
    sample: int = 10_000,
    seed: int = 0,
    only: set[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Every structure of the module docstring (``only``: some of them); structures larger
    than ``sample`` bits are sampled. Returns a tally per structure."""
    rng = random.Random(seed)
    tallies: list[Tally] = []
    profile = get_profile("milan").with_(seed=seed, dram_size=1 << 30)

    def want(name: str) -> bool:
        return only is None or name in only

    def tick(t: Tally) -> None:
        if progress is not None:
            progress(t.name, t.tried, t.bits)

    with tempfile.TemporaryDirectory(prefix="sevsim-tamper-") as tmp:
        work = Path(tmp)
        a = HostSystem.start(profile, state_dir=work / "A")
        b = HostSystem.start(profile.with_(seed=seed + 1), state_dir=work / "B")
        try:
            owner = session.start(a.export_chain().pdh, 0x0)
            for name, original in (("session", owner.session), ("godh", owner.godh_cert)):
                if want(name):
                    total = len(original) * 8
                    bits = list(range(total)) if name == "session" else _bits(total, sample, rng)
                    tallies.append(_launch_start(a, owner, name, original, bits, tick))
            if want("secret-header") or want("secret-payload"):
                tallies += _secrets(a, owner, want, tick)
            if want("packet-header") or want("packet-payload"):
                tallies += _packets(a, b, sample, rng, want, tick)
            if want("chain"):
                tallies.append(_chain(a, sample, rng, tick))
            if want("snapshot"):
                tallies.append(_snapshot(a, work, min(sample, SNAPSHOT_SAMPLE), rng, tick))
        finally:
            a.close()
            b.close()
    return {t.name: t.to_json() for t in tallies}


def _header_and_payload(
    names: tuple[str, str],
    header: bytes,
    payload: bytes,
    bits_of: Callable[[str, int], Any],
    offer: Callable[[bytes, bytes], None],
    fingerprint: Callable[[], tuple],
    want: Callable[[str], bool],
    tick: Callable[[Tally], None],
) -> list[Tally]:
    """Flip bits of a (header, payload) pair one at a time and offer each to the firmware
    (``offer`` raises KvmError on refusal); the target's fingerprint must not change."""
    before = fingerprint()
    tallies = []
    for name, original in zip(names, (header, payload), strict=True):
        if not want(name):
            continue
        t = Tally(name, len(original) * 8)
        for bit in bits_of(name, t.bits):
            flipped = _flip(original, bit)
            t.tried += 1
            try:
                offer(flipped, payload) if original is header else offer(header, flipped)
            except KvmError as exc:
                t.statuses[exc.status.name if exc.status else str(exc)] += 1
            else:
                t.accepted.append(bit)
                t.statuses["SUCCESS"] += 1
            if fingerprint() != before:
                t.violations.append(f"bit {bit}: the target guest's state or memory changed")
                before = fingerprint()
            if t.tried % 256 == 0:
                tick(t)
        tallies.append(t)
    return tallies


def _new_vm(system: HostSystem) -> Vm:
    return system.kvm.create_vm(GUEST_MEMORY, sev=True, name="target")


def _launch_start(system, owner, name, original, bits, tick) -> Tally:
    """LAUNCH_START with one flipped bit in the session blob or the GODH certificate."""
    t = Tally(name, len(original) * 8)
    vm = _new_vm(system)
    for bit in bits:
        flipped = _flip(original, bit)
        godh, blob = (flipped, owner.session) if name == "godh" else (owner.godh_cert, flipped)
        t.tried += 1
        try:
            vm.sev_launch_start(owner.policy, godh, blob)
        except KvmError as exc:
            t.statuses[exc.status.name if exc.status else str(exc)] += 1
        else:
            t.accepted.append(bit)
            t.statuses["SUCCESS"] += 1
            vm.destroy()  # the guest was created: tear it down, start over
            vm = _new_vm(system)
        if t.tried % 256 == 0:
            tick(t)
    vm.destroy()
    return t


def _secrets(system, owner, want, tick) -> list[Tally]:
    """LAUNCH_SECRET with one flipped bit; the guest must stay in LSECRET, unchanged."""
    vm = system.kvm.create_vm(GUEST_MEMORY, sev=True, name="target")
    image = x86_guest.image()
    base = vm.load_firmware(image)
    vm.sev_launch_start(owner.policy, owner.godh_cert, owner.session)
    vm.sev_launch_update_data(base, len(image))
    measurement = vm.sev_launch_measure()
    table = guidtable.secrets_table([(uuid.UUID(int=7), bytes(range(64)))])
    header, payload = secret.build_packet(owner.tek, owner.tik, measurement[:32], table)
    spa = vm.spa(SECRET_GPA)

    def fingerprint() -> tuple:
        system.kernel.wbinvd_on_all_cpus()
        page = system.machine.dram.read(spa, 4096)
        return vm.sev_guest_status().state, hashlib.sha256(page).hexdigest()

    try:  # KVM pins (and so first populates) the target page on the first call
        vm.sev_launch_secret(_flip(header, 0), payload, SECRET_GPA)
    except KvmError:
        pass
    tallies = _header_and_payload(
        ("secret-header", "secret-payload"),
        header,
        payload,
        lambda name, total: range(total),
        lambda h, p: vm.sev_launch_secret(h, p, SECRET_GPA),
        fingerprint,
        want,
        tick,
    )
    vm.destroy()
    return tallies


def _packets(a, b, sample, rng, want, tick) -> list[Tally]:
    """RECEIVE_UPDATE_DATA of a flipped migration packet; the receiver stays in RUPDATE."""
    src = a.start_x86_guest("source", memory=GUEST_MEMORY)
    src.run()  # its secret in private memory: the page the packet carries
    target = TargetChain.from_chain(b.export_chain(full=True).encode(full=True))
    blob, policy = src.sev_send_start(target.pdh, target.plat_certs, target.amd_certs)
    header, data = src.sev_send_update_data(PAGE_GPA, 4096)
    dst = _new_vm(b)
    dst.sev_receive_start(a.export_chain().pdh.raw, blob, policy)
    spa = dst.spa(PAGE_GPA)

    def fingerprint() -> tuple:
        b.kernel.wbinvd_on_all_cpus()
        return dst.sev_guest_status().state, hashlib.sha256(
            b.machine.dram.read(spa, 4096)
        ).hexdigest()

    tallies = _header_and_payload(
        ("packet-header", "packet-payload"),
        header,
        data,
        lambda name, total: range(total) if name == "packet-header" else _bits(total, sample, rng),
        lambda h, d: dst.sev_receive_update_data(h, d, PAGE_GPA),
        fingerprint,
        want,
        tick,
    )
    try:  # the control: the packet as sent is accepted
        dst.sev_receive_update_data(header, data, PAGE_GPA)
    except KvmError as exc:
        tallies[-1].violations.append(f"the unmodified packet was refused: {exc}")
    src.sev_send_cancel()
    src.destroy()
    dst.destroy()
    return tallies


def _chain(system, sample, rng, tick) -> Tally:
    """`verify-chain` of a full chain file with one flipped bit."""
    raw = system.export_chain(full=True).encode(full=True)
    root = choose_root(decode_chain(raw), "sim", system.data_dir)
    t = Tally("chain", len(raw) * 8)
    for bit in _bits(t.bits, sample, rng):
        t.tried += 1
        try:
            ok = verify_chain(decode_chain(_flip(raw, bit)), root).ok
            label = "verifies" if ok else "a link does not verify"
        except (CertError, ValueError) as exc:
            ok, label = False, f"refused as malformed ({type(exc).__name__})"
        t.statuses[label] += 1
        if ok:
            t.accepted.append(bit)
        if t.tried % 256 == 0:
            tick(t)
    return t


def _snapshot(system, work: Path, sample, rng, tick) -> Tally:
    """`vm run --restore` of a snapshot file with one flipped bit: refused, no guest left."""
    from sevsim.host import migration
    from sevsim.host.vmm import VmConfig, Vmm, VmmError

    firmware = work / "guest.fd"
    firmware.write_bytes(x86_guest.image())
    src = Vmm(system, VmConfig(firmware=firmware, memory=GUEST_MEMORY, name="snapshot-source"))
    src.start()
    src.cont()
    if not src.wait_idle(60):
        raise RuntimeError("the snapshot's source guest did not finish")
    target = TargetChain.from_chain(system.export_chain(full=True).encode(full=True))
    good = work / "guest.snap"
    migration.snapshot(src, good, target)
    raw = good.read_bytes()
    guests = system.sev.platform_status().data["status"].guest_count
    t = Tally("snapshot", len(raw) * 8)
    bad = work / "flipped.snap"
    for bit in _bits(t.bits, sample, rng):
        bad.write_bytes(_flip(raw, bit))
        dst = Vmm(system, VmConfig(firmware=None, memory=GUEST_MEMORY))
        t.tried += 1
        try:
            dst.restore(bad)
        except VmmError as exc:
            reason = str(exc).split("refused: ")[-1]
            t.statuses[reason.split(" at GPA")[0][:70]] += 1
        else:
            t.accepted.append(bit)
            t.statuses["restored"] += 1
        dst.quit()
        if system.sev.platform_status().data["status"].guest_count != guests:
            t.violations.append(f"bit {bit}: a guest was left behind")
        if t.tried % 64 == 0:
            tick(t)
    control = Vmm(system, VmConfig(firmware=None, memory=GUEST_MEMORY))
    try:
        control.restore(good)  # the file as written restores
    except VmmError as exc:
        t.violations.append(f"the unmodified snapshot was refused: {exc}")
    control.quit()
    src.quit()
    return t
