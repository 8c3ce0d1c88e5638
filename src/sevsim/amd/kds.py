"""A simulated AMD key distribution service (KDS).

AMD's KDS serves ``https://kdsintf.amd.com/cek/id/<hex chip id>``: the chip's CEK
certificate signed by the ASK of its generation, because the firmware's PDH_CERT_EXPORT
may hand out the CEK unsigned (sev-api.md §3.1). This one knows the chips sevsim's fab made
(a registry in the data directory) and signs with the simulated ASK: RSA-PSS, SHA-256 for
Naples and SHA-384 for later generations, in signature slot 1, as real KDS CEKs are.
"""

from __future__ import annotations

import json
from pathlib import Path

from sevsim.amd.root import SimulatedRoot, load_or_create, published_root
from sevsim.certs.amd import AmdCert
from sevsim.certs.sev import Algo, SevCert, Usage
from sevsim.fsutil import atomic_write


class UnknownChip(LookupError):
    pass


_ARK_CACHE: dict[tuple[str, str], AmdCert] = {}  # the roots do not change while we run


class KeyDistributionService:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._registry = self.data_dir / "kds"

    def _entry(self, chip_id: bytes) -> Path:
        return self._registry / f"{chip_id.hex()}.json"

    def register(self, chip_id: bytes, generation: str, cek: SevCert) -> None:
        """The fab records a chip's CEK (public key only)."""
        entry = self._entry(chip_id)
        record = {"generation": generation, "cek": cek.without_signatures().raw.hex()}
        if entry.exists() and json.loads(entry.read_text()) == record:
            return
        atomic_write(entry, json.dumps(record).encode(), 0o644)

    def root(self, generation: str) -> SimulatedRoot:
        return load_or_create(generation, self.data_dir)

    def ark(self, generation: str) -> AmdCert:
        """The ARK of a generation (made on first use); public certificates only."""
        key = (generation, str(self.data_dir))
        if key not in _ARK_CACHE:
            published = published_root(generation, self.data_dir)
            _ARK_CACHE[key] = (published or self.root(generation).ca_root).ark
        return _ARK_CACHE[key]

    def generation_of(self, chip_id: bytes) -> str:
        return self._record(chip_id)["generation"]

    def _record(self, chip_id: bytes) -> dict:
        entry = self._entry(chip_id)
        if not entry.exists():
            raise UnknownChip(f"the KDS knows no chip with ID {chip_id.hex()[:16]}...")
        return json.loads(entry.read_text())

    def cek_cert(self, chip_id: bytes) -> SevCert:
        """GET /cek/id/<chip id>: the CEK signed by the generation's ASK. Signed once and
        then served as stored (RSA-PSS signatures are randomised)."""
        signed_path = self._registry / f"{chip_id.hex()}.cek"
        record = self._record(chip_id)
        cek = SevCert.parse(bytes.fromhex(record["cek"]))
        if signed_path.exists():
            signed = SevCert.parse(signed_path.read_bytes())
            if signed.body == cek.body:
                return signed
        root = self.root(record["generation"])
        algo = Algo.RSA_SHA256 if root.ask.bits == 2048 else Algo.RSA_SHA384
        signed = cek.signed(root._ask_key, Usage.ASK, algo, slot=0)
        atomic_write(signed_path, signed.raw, 0o644)
        return signed
