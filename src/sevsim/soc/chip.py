"""Chip state that both the cores and the AMD Secure Processor touch.

Two things, both per-core or per-CCX latches in the hardware: the WBINVD-done flag of each
core (set by WBINVD/WBNOINVD, cleared by the firmware's ACTIVATE and checked at DF_FLUSH),
and per ASID the CCXs on which the firmware has made the ASID valid (VMRUN refuses an SEV
ASID that is not valid on the core's CCX). One small object, so that neither the cores
nor the PSP's port reach into the other's fields.
"""

from __future__ import annotations

from collections.abc import Iterable


class ChipState:
    def __init__(self, cores: int, cores_per_ccx: int) -> None:
        self._cores_per_ccx = cores_per_ccx
        self._wbinvd_done = [False] * cores
        self._asid_valid: dict[int, int] = {}  # ASID -> bitmap of CCXs

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
