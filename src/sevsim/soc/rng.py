"""Where the machine's random values come from.

Real parts draw keys from the AMD-SP's NIST SP 800-90 DRBG. A profile without a seed does
the same with ``os.urandom``. A profile with a seed derives every value from the seed and a
label (HKDF-SHA256 from ``cryptography``), so a test or a demo can boot the same machine
twice; such a machine's keys are of course no secret to whoever knows the seed.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class EntropySource:
    """Random bytes, fresh per call; reproducible per (seed, label, counter) when seeded."""

    def __init__(self, seed: int | None, domain: str) -> None:
        self._seed = None if seed is None else (seed % (1 << 256)).to_bytes(32, "little")
        self._domain = domain
        self._counter = 0

    @property
    def deterministic(self) -> bool:
        return self._seed is not None

    def random_bytes(self, n: int, label: str) -> bytes:
        if self._seed is None:
            return os.urandom(n)
        self._counter += 1
        info = f"sevsim/{self._domain}/{label}/{self._counter}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(self._seed)


def fixed_bytes(n: int, label: str) -> bytes:
    """Bytes fixed forever by their label: for values that are constant in the silicon."""
    info = f"sevsim/fixed/{label}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(b"\0" * 32)
