"""Simulated AMD root keys: an ARK (self-signed) and an ASK (signed by the ARK) per
generation, RSA-2048 for Naples and RSA-4096 for the others, as the real ones.

Generated once per data directory and cached there (``<data>/amd-sim-root/<gen>/``). Their
key ids spell ``SEVSIM-SIM-ARK-x`` / ``SEVSIM-SIM-ASK-x`` so nobody mistakes them for AMD's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sevsim.certs.amd import AmdCert
from sevsim.certs.chain import CaRoot
from sevsim.certs.sev import Usage
from sevsim.fsutil import FileLock, atomic_write

KEY_BITS = {"naples": 2048, "rome": 4096, "milan": 4096, "genoa": 4096, "turin": 4096}


def sim_key_id(kind: str, generation: str) -> bytes:
    return f"SEVSIM-SIM-{kind}-{generation[0].upper()}".encode()


@dataclass
class SimulatedRoot:
    generation: str
    ark: AmdCert
    ask: AmdCert
    _ask_key: rsa.RSAPrivateKey

    @property
    def ca_root(self) -> CaRoot:
        return CaRoot(f"simulated AMD {self.generation}", self.ark, self.ask)

    def __repr__(self) -> str:
        return f"<SimulatedRoot {self.generation}: {self.ark!r}, {self.ask!r}>"


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def published_root(generation: str, data_dir: Path) -> CaRoot | None:
    """The simulated ARK and ASK certificates (public) of a generation, if they exist."""
    base = Path(data_dir) / "amd-sim-root" / generation
    if not ((base / "ark.cert").exists() and (base / "ask.cert").exists()):
        return None
    ark = AmdCert.parse((base / "ark.cert").read_bytes())
    ask = AmdCert.parse((base / "ask.cert").read_bytes())
    return CaRoot(f"simulated AMD {generation}", ark, ask)


def load_or_create(generation: str, data_dir: Path) -> SimulatedRoot:
    if generation not in KEY_BITS:
        raise ValueError(f"no simulated root for {generation!r}")
    base = Path(data_dir) / "amd-sim-root" / generation
    lock = FileLock(base / ".lock", what="simulated AMD root")
    try:
        files = [base / n for n in ("ark.key", "ark.cert", "ask.key", "ask.cert")]
        if not all(f.exists() for f in files):
            bits = KEY_BITS[generation]
            ark_key = rsa.generate_private_key(65537, bits)
            ask_key = rsa.generate_private_key(65537, bits)
            ark_id, ask_id = sim_key_id("ARK", generation), sim_key_id("ASK", generation)
            ark = AmdCert.create(ark_key.public_key(), ark_id, ark_id, Usage.ARK, ark_key)
            ask = AmdCert.create(ask_key.public_key(), ask_id, ark_id, Usage.ASK, ark_key)
            atomic_write(
                base / "README", b"Simulated AMD root keys made by sevsim. NOT AMD's.\n", 0o644
            )
            atomic_write(base / "ark.key", _pem(ark_key))
            atomic_write(base / "ask.key", _pem(ask_key))
            atomic_write(base / "ark.cert", ark.raw, 0o644)
            atomic_write(base / "ask.cert", ask.raw, 0o644)
        ask_key = serialization.load_pem_private_key((base / "ask.key").read_bytes(), None)
        ark = AmdCert.parse((base / "ark.cert").read_bytes())
        ask = AmdCert.parse((base / "ask.cert").read_bytes())
    finally:
        lock.release()
    assert isinstance(ask_key, rsa.RSAPrivateKey)
    return SimulatedRoot(generation, ark, ask, ask_key)
