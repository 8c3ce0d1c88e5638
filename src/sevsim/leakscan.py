"""Secret-leak scan (docs/reliability.md): record every key the firmware and the memory
controller create while scenarios run, then look for them in everything the host can see.

Recorded (by instrumenting where keys are born): every key loaded into a memory-controller
slot (the host key, each VEK, the random contents of never-loaded slots), every output of
the SP 800-108 KDF (master secrets, KEKs, KIKs), every TEK and TIK the firmware unwraps,
every ECDH shared secret, every P-384 private scalar the firmware derives (chip, PEK, PDH).

Scanned, per machine when it powers off: DRAM as stored (written pages) and the same pages
as the host reads them with its key; and for the whole run: everything the scenarios
printed, every log record, every file sevsim wrote (atomic writes), every migration or
snapshot stream. A hit is a recorded key, as bytes, found in any of these.

The owner's own key files (TEK/TIK, which the owner creates) are not host-visible and are
not scanned; DBG_DECRYPT output is plaintext the policy allows, not a key.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScanReport:
    keys: dict[str, int] = field(default_factory=dict)  # label -> how many recorded
    machines: int = 0
    dram_bytes: int = 0
    other_bytes: int = 0
    hits: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "keys_recorded": self.keys,
            "machines_scanned": self.machines,
            "dram_bytes_scanned": self.dram_bytes,
            "other_bytes_scanned": self.other_bytes,
            "hits": self.hits,
        }


class LeakScan:
    def __init__(self) -> None:
        self.keys: dict[bytes, str] = {}
        self.report = ScanReport()
        self.captured: list[tuple[str, bytes]] = []  # (where, bytes) the host could see

    def _key(self, label: str, value: bytes) -> None:
        if len(value) >= 16 and value.strip(b"\0") and value not in self.keys:
            self.keys[value] = label
            self.report.keys[label] = self.report.keys.get(label, 0) + 1

    def _find(self, where: str, data: bytes) -> None:
        for key, label in self.keys.items():
            if key in data:
                self.report.hits.append(f"{label} found in {where}")

    @contextlib.contextmanager
    def recording(self) -> Iterator[LeakScan]:
        from sevsim import crypto, fsutil
        from sevsim.api import channel
        from sevsim.host import migration
        from sevsim.soc import engine
        from sevsim.soc.machine import Machine

        patches: list[tuple[Any, str, Any]] = []

        def patch(obj: Any, name: str, make: Callable[[Any], Any]) -> None:
            original = getattr(obj, name)
            patches.append((obj, name, original))
            setattr(obj, name, make(original))

        def slot_init(original):
            def init(self, key):
                scan._key("memory-controller key", bytes(key))
                return original(self, key)

            return init

        def kdf(original):
            def call(key, label, context, bits):
                out = original(key, label, context, bits)
                scan._key(f"KDF output ({label.decode(errors='replace')})", out)
                return out

            return call

        def unwrap(original):
            def call(z, blob):
                tek, tik, mac = original(z, blob)
                scan._key("TEK", tek)
                scan._key("TIK", tik)
                return tek, tik, mac

            return call

        def ecdh(original):
            def call(private, peer):
                z = original(private, peer)
                scan._key("ECDH shared secret", z)
                return z

            return call

        def scalar(original):
            def call(d):
                scan._key("P-384 private scalar", d.to_bytes(48, "big"))
                scan._key("P-384 private scalar", d.to_bytes(48, "little"))
                return original(d)

            return call

        def machine_close(original):
            def close(self):
                scan.scan_machine(self)
                return original(self)

            return close

        def atomic(original):
            def write(path, data, mode=0o600):
                scan.captured.append((f"file {path}", bytes(data)))
                return original(path, data, mode)

            return write

        def put(original):
            def call(self, data):
                scan.captured.append(("a migration stream", bytes(data)))
                return original(self, data)

            return call

        scan = self
        patch(engine.SlotCipher, "__init__", slot_init)
        patch(crypto, "kdf", kdf)
        patch(channel, "unwrap", unwrap)
        patch(crypto, "ecdh_z", ecdh)
        patch(crypto, "p384_private_from_scalar", scalar)
        patch(Machine, "close", machine_close)
        patch(fsutil, "atomic_write", atomic)
        patch(migration.StreamWriter, "_put", put)
        logs = io.StringIO()
        handler = logging.StreamHandler(logs)
        logging.getLogger().addHandler(handler)
        try:
            yield self
        finally:
            logging.getLogger().removeHandler(handler)
            for obj, name, original in reversed(patches):
                setattr(obj, name, original)
            self.captured.append(("the log", logs.getvalue().encode()))

    def scan_machine(self, machine) -> None:
        """DRAM as stored, and as the host reads it (the host key), written pages only."""
        from sevsim.attacks.physical import ColdBootDump

        machine.cache.wbinvd()
        memctl = machine.memctl
        for start, length in ColdBootDump(machine).runs():
            stored = machine.dram.read(start, length)
            self._find(f"DRAM at {start:#x}", stored)
            host = memctl.read(start, length, memctl.host_key_slot)
            self._find(f"host memory at {start:#x}", host)
            self.report.dram_bytes += 2 * length
        self.report.machines += 1

    def add_output(self, where: str, data: bytes | str) -> None:
        self.captured.append((where, data.encode() if isinstance(data, str) else data))

    def finish(self) -> ScanReport:
        """Scan what the run showed the host (outputs, logs, files, streams)."""
        import base64

        # Keys as they would be printed: base64 (a prefix, whatever the alignment) and hex.
        encoded = [
            (label, base64.b64encode(key)[:20], key.hex().encode())
            for key, label in self.keys.items()
        ]
        for where, data in self.captured:
            self._find(where, data)
            self.report.other_bytes += len(data)
            for label, b64, hexed in encoded:
                if b64 in data or hexed in data:
                    self.report.hits.append(f"{label} (encoded) found in {where}")
        return self.report


OWNER_KEY_FILES = ("_tek.bin", "_tik.bin")  # the owner's own files, never on the host


def _qmp_scenario(scan: LeakScan, seed: int) -> None:
    """A VM driven over QMP as a cloud would: launch, the owner's secret injected, cont, a
    snapshot for this platform through migrate file:, and a restore from it."""
    import base64
    import tempfile
    import threading
    import time
    import uuid
    from pathlib import Path

    from sevsim.guest import x86 as x86_guest
    from sevsim.host.qmp import QmpClient, QmpServer
    from sevsim.host.vmm import VmConfig, Vmm
    from sevsim.owner import secret, session
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    with tempfile.TemporaryDirectory(prefix="sevsim-leaks-") as tmp:
        work = Path(tmp)
        system = HostSystem.start(
            get_profile("milan").with_(seed=seed, dram_size=1 << 30), state_dir=work / "p"
        )
        try:
            (work / "fw.fd").write_bytes(x86_guest.image())
            chain = system.export_chain(full=True)
            owner = session.start(chain.pdh, 0x0)
            files = owner.write(work, "vm")
            config = VmConfig(
                firmware=work / "fw.fd",
                memory=32 << 20,
                policy=0,
                dh_cert_file=files["godh"],
                session_file=files["session"],
                console=work / "console.log",
                fw_cfg_files={"opt/sevsim/workload": b"count"},
            )
            vmm = Vmm(system, config)
            vmm.start()
            server = QmpServer(vmm, work / "qmp.sock")
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            client = QmpClient(work / "qmp.sock")
            blob = base64.b64decode(client.execute("query-sev-launch-measure")["data"])
            entries = [(uuid.UUID(int=42), b"the owner's disk passphrase, 32b")]
            scan._key("the owner's secret (guest data)", entries[0][1])
            header, payload = secret.secrets_table_packet_b64(owner.tek, owner.tik, blob, entries)
            client.execute(
                "sev-inject-launch-secret", **{"packet-header": header, "secret": payload}
            )
            client.execute("cont")
            time.sleep(0.3)
            certs = chain.pek.raw + chain.oca.raw + chain.cek.raw
            client.execute(
                "migrate-set-parameters",
                **{
                    "sev-pdh": base64.b64encode(chain.pdh.raw).decode(),
                    "sev-plat-cert": base64.b64encode(certs).decode(),
                    "sev-amd-cert": base64.b64encode(chain.ask.raw + chain.ark.raw).decode(),
                },
            )
            client.execute("migrate", uri=f"file:{work / 'guest.snap'}")
            while client.execute("query-migrate")["status"] not in ("completed", "failed"):
                time.sleep(0.05)
            client.execute("quit")
            thread.join(5)
            client.close()
            transcript = b"".join(server.transcript) + "".join(client.received).encode()
            scan.add_output("the QMP traffic", transcript)
            scan.add_output("the VM's console", (work / "console.log").read_bytes())
            vmm.quit()
            restored = Vmm(system, VmConfig(firmware=None, memory=32 << 20))
            restored.restore(work / "guest.snap")
            restored.quit()
        finally:
            system.close()


def scan_scenarios(
    parts: tuple[str, ...] = ("demo", "attacks", "tamper", "qmp"), seed: int = 5
) -> ScanReport:
    """Run the scenarios under the recorder and scan: ``demo`` (every part of `sevsim
    demo`: SME, attestation with a secret, SEV guests, migration, I/O, TSME, attacks),
    ``attacks`` (every attack of the lab, JSON output), ``tamper`` (a small tamper
    campaign: sessions, secret packets, migration packets, chains, snapshots), ``qmp`` (a
    VM driven over QMP: secret injection, a snapshot, a restore)."""
    import json

    from sevsim import tamper
    from sevsim.attacks import ATTACKS
    from sevsim.demo import run_demo
    from sevsim.profiles import get_profile

    scan = LeakScan()
    profile = get_profile("milan").with_(seed=seed)
    with scan.recording():
        if "demo" in parts:
            scan.add_output("the demo's JSON", json.dumps(run_demo(profile).to_json()))
        if "attacks" in parts:
            for name, attack in ATTACKS.items():
                scan.add_output(f"attack {name}", json.dumps(attack.run(profile).to_json()))
        if "tamper" in parts:
            scan.add_output("the tamper report", json.dumps(tamper.campaign(sample=20, seed=seed)))
        if "qmp" in parts:
            _qmp_scenario(scan, seed)
    scan.captured = [(w, d) for w, d in scan.captured if not w.endswith(OWNER_KEY_FILES)]
    return scan.finish()
