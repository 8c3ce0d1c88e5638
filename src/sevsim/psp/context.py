"""What every command family of the SEV firmware shares (AMD-ASPFW's ``sev_t``).

The hardware the firmware reaches (the PSP's ports, fuses, SPI flash, TRNG, x86 memory),
the platform state and its identity, the ASID table and the guest contexts. Each command
family (``psp.platform``, ``psp.asids``, ``psp.launch``, ``psp.migration``,
``psp.debug``) holds this one object; nothing here is reachable from the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from sevsim.api import commands as cmd
from sevsim.api import policy as sev_policy
from sevsim.api.status import PlatformState, Status
from sevsim.certs.sev import CERT_SIZE
from sevsim.psp.asids import AsidTable
from sevsim.psp.guest import GUEST_COUNT_MAX, Guest, GuestState
from sevsim.psp.persistent import PersistentIdentity, SpiFlash
from sevsim.psp.x86mem import FirmwareError, X86Memory
from sevsim.soc.rng import EntropySource

CHAIN_SIZE = 3 * CERT_SIZE  # PEK || OCA || CEK
SCRATCH_SIZE = 0x5000  # SEV_SCRATCH_BUF_LEN: the largest secret a packet may carry


@dataclass
class Identity:
    """The platform keys while the firmware is initialised."""

    cek: ec.EllipticCurvePrivateKey
    persistent: PersistentIdentity

    def __repr__(self) -> str:
        return "<Identity (keys not shown)>"


class FirmwareContext:
    def __init__(self, hw, fuses, spi: SpiFlash, profile, entropy: EntropySource) -> None:
        self.hw = hw
        self.fuses = fuses
        self.spi = spi
        self.profile = profile
        self.trng = entropy
        self.mem = X86Memory(hw)
        self.api_version = (profile.fw_api_major, profile.fw_api_minor, profile.fw_build)
        self.state = PlatformState.UNINIT
        self.config_flags = 0
        self.guest_count = 0
        self.identity: Identity | None = None
        self.nv_paddr = 0  # 0: the SPI flash; else the INIT_EX NV area in x86 memory
        self.tmr: tuple[int, int] | None = None
        self.asids = AsidTable(hw.max_asid, hw.ccx_count)
        self.guests: dict[int, Guest] = {}  # handle -> guest context
        self.raw_buffer = b""  # the command buffer as read, for must-be-zero checks

    # ---- the checks every handler makes, in the firmware's order ---------------------------
    def require_working(self) -> None:
        if self.state != PlatformState.WORKING:
            raise FirmwareError(Status.INVALID_PLATFORM_STATE)

    def require_identity(self) -> Identity:
        if self.identity is None:  # cannot happen in INIT/WORKING; guard against bugs
            raise FirmwareError(Status.INVALID_PLATFORM_STATE)
        return self.identity

    def guest(self, handle: int) -> Guest:
        guest = self.guests.get(handle)
        if guest is None:
            raise FirmwareError(Status.INVALID_GUEST)
        return guest

    # ---- the guest table -------------------------------------------------------------------
    def new_guest(self, buf, tek: bytes, tik: bytes, state: GuestState) -> Status:
        """The rest of LAUNCH_START and RECEIVE_START: the VEK (fresh, or shared with the
        guest ``buf.handle`` names), a handle, the ES check; the platform is WORKING."""
        if buf.handle == 0:
            vek = self.trng.random_bytes(self.hw.vek_bytes, "vek")
        else:
            shared = self.guest(buf.handle)
            if buf.policy != shared.policy or shared.policy & sev_policy.PolicyFlag.NOKS:
                return Status.POLICY_FAILURE
            vek = shared.vek
        handle = next((h for h in range(1, GUEST_COUNT_MAX + 1) if h not in self.guests), 0)
        if not handle:
            return Status.RESOURCE_LIMIT
        if buf.policy & sev_policy.PolicyFlag.ES and not self.config_flags & cmd.CONFIG_FLAG_ES:
            return Status.UNSUPPORTED
        guest = Guest(handle, buf.policy, vek, tek=tek, tik=tik)
        guest.state = state
        self.guests[handle] = guest
        self.state = PlatformState.WORKING
        self.guest_count += 1
        buf.handle = handle
        return Status.SUCCESS
