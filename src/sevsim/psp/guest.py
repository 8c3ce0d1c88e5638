"""A guest's context inside the firmware (sev-api.md §1.4; AMD-ASPFW sev_guest.c).

Everything here is firmware-private: the VEK, the transport keys TEK/TIK, the running
launch digest. Host code only ever sees the guest's handle, policy, ASID and state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from sevsim.api.commands import Command

GUEST_COUNT_MAX = 1024  # handles are 1..1024


class GuestState(IntEnum):
    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


# (from, command) -> to; any other pair that needs a transition is INVALID_GUEST_STATE.
TRANSITIONS: dict[tuple[GuestState, Command], GuestState] = {
    (GuestState.UNINIT, Command.LAUNCH_START): GuestState.LUPDATE,
    (GuestState.UNINIT, Command.RECEIVE_START): GuestState.RUPDATE,
    (GuestState.LUPDATE, Command.LAUNCH_MEASURE): GuestState.LSECRET,
    (GuestState.LSECRET, Command.LAUNCH_FINISH): GuestState.RUNNING,
    (GuestState.RUNNING, Command.SEND_START): GuestState.SUPDATE,
    (GuestState.SUPDATE, Command.SEND_FINISH): GuestState.SENT,
    (GuestState.SUPDATE, Command.SEND_CANCEL): GuestState.RUNNING,
    (GuestState.RUPDATE, Command.RECEIVE_FINISH): GuestState.RUNNING,
}


class Activation(Enum):
    INACTIVE = 0  # no ASID
    PENDING = 1  # ACTIVATE done, the ASID is enabled at LAUNCH_FINISH / RECEIVE_FINISH
    ACTIVE = 2  # the ASID is enabled on the guest's CCXs


@dataclass
class Guest:
    handle: int
    policy: int
    vek: bytes = field(repr=False)
    state: GuestState = GuestState.UNINIT
    asid: int = 0
    ccxs: int = 0
    activation: Activation = Activation.INACTIVE
    tek: bytes = field(default=bytes(16), repr=False)
    tik: bytes = field(default=bytes(16), repr=False)
    digest: object = field(default_factory=hashlib.sha256, repr=False)
    launch_digest: bytes = b""
    measurement: bytes = field(default=b"", repr=False)
    vmsa_pages: list[int] = field(default_factory=list)  # VMSAs sealed by LAUNCH_UPDATE_VMSA

    @property
    def is_es(self) -> bool:
        return bool(self.policy & 0x4)

    @property
    def inactive(self) -> bool:
        return self.activation == Activation.INACTIVE

    def close_channel(self) -> None:
        """LAUNCH_FINISH / RECEIVE_FINISH: the transport keys and the measurement are wiped."""
        self.tek = self.tik = bytes(16)
        self.measurement = b""
        self.digest = hashlib.sha256()

    def transition(self, command: Command) -> bool:
        new = TRANSITIONS.get((self.state, command))
        if new is None:
            return False
        self.state = new
        return True
