"""A simulated AMD key distribution service (KDS).

AMD's KDS serves ``https://kdsintf.amd.com/cek/id/<hex chip id>``: the chip's CEK
certificate signed by the ASK of its generation, because the firmware's PDH_CERT_EXPORT
may hand out the CEK unsigned (sev-api.md §3.1). This one knows the chips sevsim's fab made
and signs with the simulated ASK: RSA-PSS, SHA-256 for Naples and SHA-384 for later
generations, in signature slot 1, as real KDS CEKs are.

What it keeps, and where:

* A chip with a state directory (a platform that lasts: ``sevsim platform``, ``vm run``)
  is registered in ``<data>/kds/<chip id>.json`` with its signed CEK in ``<chip id>.cek``
  (signed once: RSA-PSS signatures are randomised, so an export stays byte-identical).
  The entry names the state directory; when that directory (its ``fuses.bin``) is gone,
  the next registration removes the entry. Entries of older sevsim versions, which name
  none, are removed the same way: every chip registers again when it powers on.
* A chip without one (the demo, tests, ``sevsim attack``: fuses from a seed or random, a
  new chip each power-on) is known to this process only, for as long as its fuses exist.
  Nothing of it reaches the disk.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path

from sevsim.amd.root import SimulatedRoot, load_or_create, published_root
from sevsim.certs.amd import AmdCert
from sevsim.certs.sev import Algo, SevCert, Usage
from sevsim.fsutil import atomic_write

FUSES_FILE = "fuses.bin"  # as sevsim.amd.fab writes it: the state directory holds a chip


class UnknownChip(LookupError):
    pass


_ARK_CACHE: dict[tuple[str, str], AmdCert] = {}  # the roots do not change while we run


@dataclass(eq=False)
class Registration:
    """A chip without a state directory, as the KDS knows it. The chip's fuses hold it: when
    they are gone, so is the KDS's entry (a weak reference)."""

    generation: str
    cek: bytes  # without signatures
    signed: SevCert | None = None


_LIVE: weakref.WeakValueDictionary[tuple[str, bytes], Registration] = weakref.WeakValueDictionary()


class KeyDistributionService:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._registry = self.data_dir / "kds"

    def _entry(self, chip_id: bytes) -> Path:
        return self._registry / f"{chip_id.hex()}.json"

    def _signed_path(self, chip_id: bytes) -> Path:
        return self._registry / f"{chip_id.hex()}.cek"

    def register(
        self, chip_id: bytes, generation: str, cek: SevCert, state_dir: Path | None = None
    ) -> Registration | None:
        """The fab records a chip's CEK (public key only). With ``state_dir`` (where the
        chip's fuses live) on disk; without, in this process only: the caller keeps the
        returned registration for as long as the chip exists."""
        raw = cek.without_signatures().raw
        if state_dir is None:
            key = (str(self.data_dir), chip_id)
            live = _LIVE.get(key)
            if live is None or (live.generation, live.cek) != (generation, raw):
                live = _LIVE[key] = Registration(generation, raw)
            return live
        entry = self._entry(chip_id)
        record = {
            "generation": generation,
            "cek": raw.hex(),
            "state_dir": str(Path(state_dir).resolve()),
        }
        if not (entry.exists() and _load(entry) == record):
            atomic_write(entry, json.dumps(record).encode(), 0o644)
        self._forget_gone_platforms(keep=entry)
        return None

    def _forget_gone_platforms(self, keep: Path) -> None:
        """Remove the entries of chips whose state directory no longer holds their fuses
        (temporary platforms), and entries that name no state directory (older versions)."""
        for entry in self._registry.glob("*.json"):
            if entry == keep:
                continue
            record = _load(entry)
            state_dir = record.get("state_dir") if isinstance(record, dict) else None
            if state_dir and (Path(state_dir) / FUSES_FILE).exists():
                continue
            entry.unlink(missing_ok=True)
            entry.with_suffix(".cek").unlink(missing_ok=True)

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
        live = _LIVE.get((str(self.data_dir), chip_id))
        return live.generation if live is not None else self._record(chip_id)["generation"]

    def _record(self, chip_id: bytes) -> dict:
        record = _load(self._entry(chip_id))
        if not isinstance(record, dict):
            raise UnknownChip(f"the KDS knows no chip with ID {chip_id.hex()[:16]}...")
        return record

    def cek_cert(self, chip_id: bytes) -> SevCert:
        """GET /cek/id/<chip id>: the CEK signed by the generation's ASK. Signed once and
        then served as stored (RSA-PSS signatures are randomised)."""
        live = _LIVE.get((str(self.data_dir), chip_id))
        if live is not None:
            if live.signed is None:
                live.signed = self._sign(live.generation, SevCert.parse(live.cek))
            return live.signed
        signed_path = self._signed_path(chip_id)
        record = self._record(chip_id)
        cek = SevCert.parse(bytes.fromhex(record["cek"]))
        if signed_path.exists():
            signed = SevCert.parse(signed_path.read_bytes())
            if signed.body == cek.body:
                return signed
        signed = self._sign(record["generation"], cek)
        atomic_write(signed_path, signed.raw, 0o644)
        return signed

    def _sign(self, generation: str, cek: SevCert) -> SevCert:
        root = self.root(generation)
        algo = Algo.RSA_SHA256 if root.ask.bits == 2048 else Algo.RSA_SHA384
        return cek.signed(root._ask_key, Usage.ASK, algo, slot=0)


def _load(entry: Path) -> object:
    """An entry's record, or None if there is none (or it is not one)."""
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
