"""The factory: a chip's fuses (its chip-unique key) and its registration with AMD's KDS.

A platform with a state directory keeps its fuses there (``fuses.bin``), so the same chip
comes back in every process; PLATFORM_RESET does not touch them (fuses are not flash).
Without a state directory the fuses derive from the profile seed, or are random, and the
KDS knows the chip only while its fuses exist (``sevsim.amd.kds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sevsim.amd.kds import FUSES_FILE, KeyDistributionService, Registration
from sevsim.certs.sev import Algo, SevCert, Usage
from sevsim.fsutil import atomic_write
from sevsim.profiles import MachineProfile
from sevsim.psp import identity
from sevsim.soc.rng import EntropySource


@dataclass(frozen=True)
class ChipFuses:
    generation: str
    cuk: bytes = field(repr=False)
    # The AMD root the firmware trusts when it checks another platform's chain (SEND_START):
    # its key id and public-key hash. MODEL: simulated chips are fused with the simulator's
    # root of their generation, so they accept simulated platforms and refuse real ones.
    ark_key_id: bytes = b""
    ark_hash: bytes = b""
    # A chip without a state directory: the KDS's entry for it lives as long as this does.
    kds_registration: Registration | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<ChipFuses {self.generation} (chip-unique key not shown)>"


def manufacture(
    profile: MachineProfile, state_dir: Path | None, kds: KeyDistributionService | None
) -> ChipFuses:
    generation = profile.name  # the profiles are named after their generation
    cuk = None
    if state_dir is not None and (Path(state_dir) / FUSES_FILE).exists():
        cuk = (Path(state_dir) / FUSES_FILE).read_bytes()
        if len(cuk) != 32:
            raise ValueError(f"{Path(state_dir) / FUSES_FILE} is damaged ({len(cuk)} bytes)")
    if cuk is None:
        cuk = EntropySource(profile.seed, f"fab/{profile.name}").random_bytes(32, "cuk")
        if state_dir is not None:
            atomic_write(Path(state_dir) / FUSES_FILE, cuk)
    fuses = ChipFuses(generation, cuk)
    if kds is not None:
        ark = kds.ark(generation)
        cek = SevCert.create(
            Usage.CEK,
            Algo.ECDSA_SHA256,
            identity.derive_cek(cuk).public_key(),
            profile.fw_api_major,
            profile.fw_api_minor,
        )
        registration = kds.register(identity.chip_id(cuk), generation, cek, state_dir)
        fuses = ChipFuses(generation, cuk, ark.key_id, ark.public_key_hash(), registration)
    return fuses
