"""Chip state that both the cores and the AMD Secure Processor touch.

Per-core or per-CCX latches in the hardware: the WBINVD-done flag of each core (set by
WBINVD/WBNOINVD, cleared by the firmware's ACTIVATE and checked at DF_FLUSH), and per ASID
the CCXs on which the firmware has made the ASID valid (VMRUN refuses an SEV ASID that is
not valid on the core's CCX). Also the integrity values of SEV-ES VMSAs. One small
object, so that neither the cores nor the PSP's port reach into the other's fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


class ChipState:
    def __init__(self, cores: int, cores_per_ccx: int) -> None:
        self._cores_per_ccx = cores_per_ccx
        self._wbinvd_done = [False] * cores
        self._asid_valid: dict[int, int] = {}  # ASID -> bitmap of CCXs
        # The integrity values of SEV-ES VMSAs, by system-physical address (hardware.md §8.1).
        # MODEL: real parts keep a CRC of each VMSA in the firmware's TMR; here the chip keeps
        # a SHA-256 of the plaintext where neither host nor guest can reach it.
        self._vmsa_checks: dict[int, bytes] = {}

    def ccx_of(self, core_index: int) -> int:
        return core_index // self._cores_per_ccx

    # ---- WBINVD-done flags ------------------------------------------------------------------
    def note_wbinvd(self, core_index: int) -> None:
        self._wbinvd_done[core_index] = True

    def wbinvd_done(self) -> list[bool]:
        return list(self._wbinvd_done)

    def clear_wbinvd_done(self, cores: Iterable[int]) -> None:
        for c in cores:
            self._wbinvd_done[c] = False

    # ---- ASID validity per CCX --------------------------------------------------------------
    def enable_asid(self, asid: int, ccxs: int) -> None:
        self._asid_valid[asid] = self._asid_valid.get(asid, 0) | ccxs

    def disable_asid(self, asid: int, ccxs: int) -> None:
        self._asid_valid[asid] = self._asid_valid.get(asid, 0) & ~ccxs

    def valid_ccxs(self, asid: int) -> int:
        """The bitmap of CCXs on which this ASID is valid."""
        return self._asid_valid.get(asid, 0)

    def asid_valid_on(self, asid: int, core_index: int) -> bool:
        return bool(self._asid_valid.get(asid, 0) >> self.ccx_of(core_index) & 1)

    # ---- SEV-ES VMSA integrity ----------------------------------------------------------------
    @staticmethod
    def vmsa_check(plaintext: bytes) -> bytes:
        return hashlib.sha256(plaintext).digest()

    def seal_vmsa(self, spa: int, plaintext: bytes) -> None:
        """Record the integrity value of the VMSA page at ``spa`` (LAUNCH_UPDATE_VMSA, and
        every #VMEXIT that saves into it)."""
        self._vmsa_checks[spa] = self.vmsa_check(plaintext)

    def vmsa_intact(self, spa: int, plaintext: bytes) -> bool:
        """VMRUN's check: the VMSA decrypts to what was last saved into it."""
        expected = self._vmsa_checks.get(spa)
        return expected is not None and expected == self.vmsa_check(plaintext)

    def forget_vmsa(self, spa: int) -> None:
        self._vmsa_checks.pop(spa, None)
