"""What a malicious host or a physical attacker can do, using only what they really have.

``ATTACKS`` maps each attack's command-line name to it, in the order the tutorial tells
them (``sevsim attack --list``); importing this package registers them all.
"""

from sevsim.attacks import coherence, hypervisor, io, physical, registers  # noqa: F401
from sevsim.attacks.lab import ATTACKS, Attack, AttackResult

ORDER = [
    "host-read",
    "cold-boot",
    "wrong-asid",
    "crossline",
    "cipher-move",
    "replay",
    "register-state",
    "ciphertext-side-channel",
    "io-tamper",
    "cache-alias",
]
ATTACKS = {name: ATTACKS[name] for name in ORDER} | ATTACKS

__all__ = ["ATTACKS", "Attack", "AttackResult"]
