"""ASID management: ACTIVATE, ACTIVATE_EX, DEACTIVATE, DF_FLUSH, DECOMMISSION, GUEST_STATUS
(sev-api.md §7.3; AMD-ASPFW sev_mcmd.c, sev_guest.c, sev_es.c).

The firmware keeps, per ASID, a bitmask of CCXs in each of four states: *dirty* (the ASID
ran there and the caches may still hold its lines), *clean* (WBINVD and DF_FLUSH since),
*allocated* (ACTIVATE done, not yet running) and *in use* (enabled in the hardware). An
ASID may be given to a new guest only when it is clean on every CCX, so that no cached
line of the previous guest survives under the new key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sevsim import crypto
from sevsim.api import commands as cmd
from sevsim.api.status import PlatformState, Status
from sevsim.psp.guest import Activation, Guest, GuestState

if TYPE_CHECKING:
    from sevsim.psp.context import FirmwareContext

APIC_ID_SIZE = 4

# An observer of ACTIVATE's last step: (ASID, dirty before, status). Only the inspection
# port (psp.inspect) registers one; the firmware's behaviour does not depend on it.
ActivationWatcher = Callable[[int, bool, Status], None]


class AsidTable:
    """Per ASID (1..max_asid), the CCX bitmask of each firmware state."""

    def __init__(self, max_asid: int, ccx_count: int) -> None:
        self.ccx_all = (1 << ccx_count) - 1
        n = max_asid + 1
        self.dirty = [0] * n
        self.clean = [0] * n
        self.allocated = [0] * n
        self.in_use = [0] * n

    def asids(self) -> range:
        return range(1, len(self.dirty))


class AsidCommands:
    def __init__(self, ctx: FirmwareContext) -> None:
        self.ctx = ctx
        self.watchers: list[ActivationWatcher] = []

    def activate(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        asid = buf.asid
        if asid == 0 or asid > ctx.hw.max_asid:
            return Status.INVALID_ASID
        if ctx.asids.in_use[asid] or ctx.asids.allocated[asid]:
            return Status.ASID_OWNED
        if not guest.inactive:
            return Status.ACTIVE
        return self._activate_common(guest, asid, ctx.asids.ccx_all)

    def activate_ex(self, buf) -> Status:
        ctx, hw = self.ctx, self.ctx.hw
        ctx.require_working()
        if buf.ex_len != cmd.ACTIVATE_EX.size:
            return Status.INVALID_PARAM
        guest = ctx.guest(buf.handle)
        asid = buf.asid
        if asid == 0 or asid > hw.max_asid:
            return Status.INVALID_ASID
        if buf.numids == 0 or buf.numids > hw.cores:
            return Status.INVALID_PARAM
        raw = ctx.mem.read(buf.ids_paddr, buf.numids * APIC_ID_SIZE)
        ccxs = 0
        for i in range(buf.numids):
            ccx = hw.ccx_of_apic_id(crypto.from_le(raw[i * 4 : i * 4 + 4]))
            if ccx is None:
                return Status.INVALID_PARAM  # MODEL: an APIC id of no present core
            ccxs |= 1 << ccx
        return self._activate_common(guest, asid, ccxs)

    def _activate_common(self, guest: Guest, asid: int, ccxs: int) -> Status:
        dirty = bool(self.ctx.asids.dirty[asid])
        status = self._activate_on(guest, asid, ccxs)
        for watch in self.watchers:
            watch(asid, dirty, status)
        return status

    def _activate_on(self, guest: Guest, asid: int, ccxs: int) -> Status:
        table, hw = self.ctx.asids, self.ctx.hw
        if guest.state == GuestState.SENT:
            return Status.INVALID_GUEST_STATE
        if not guest.asid:
            # First activation: the ASID must be clean everywhere (DEACTIVATE, WBINVD, DF_FLUSH).
            if table.dirty[asid]:
                return Status.DF_FLUSH_REQUIRED
            if table.clean[asid] != table.ccx_all:
                return Status.ASID_OWNED
        elif asid != guest.asid:
            return Status.ACTIVE  # later ACTIVATE_EX calls may only add CCXs to the same ASID
        # sev_es_validate_asid: SEV-ES guests below the min SEV ASID, plain SEV at or above it.
        if guest.is_es != (asid < hw.min_sev_asid):
            return Status.INVALID_ASID
        if table.dirty[asid] & ccxs:
            return Status.DF_FLUSH_REQUIRED
        if not guest.asid:
            hw.key_port.load(asid, guest.vek)  # into the ASID's slot in every UMC
            guest.asid = asid
        guest.ccxs |= ccxs
        if guest.state in (GuestState.RUNNING, GuestState.SUPDATE):
            self.enable(guest)
        else:
            guest.activation = Activation.PENDING
            table.allocated[asid] |= ccxs
            table.clean[asid] &= ~ccxs
        return Status.SUCCESS

    def enable(self, guest: Guest) -> None:
        """The guest runs: its ASID is valid on its CCXs, and in use there (at ACTIVATE of
        a running guest, LAUNCH_FINISH and RECEIVE_FINISH)."""
        table = self.ctx.asids
        asid, ccxs = guest.asid, guest.ccxs
        self.ctx.hw.enable_asid(asid, ccxs)
        guest.activation = Activation.ACTIVE
        table.in_use[asid] |= ccxs
        table.allocated[asid] &= ~ccxs
        table.clean[asid] &= ~ccxs

    def deactivate(self, buf) -> Status:
        ctx, hw, table = self.ctx, self.ctx.hw, self.ctx.asids
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if guest.inactive:
            return Status.INACTIVE
        asid, ccxs = guest.asid, guest.ccxs
        in_use = table.in_use[asid]
        if in_use:
            # The ASID is invalid again on those CCXs, and each of their cores owes a WBINVD.
            hw.disable_asid(asid, in_use)
            hw.clear_wbinvd_done(
                core
                for ccx in range(hw.ccx_count)
                if in_use >> ccx & 1
                for core in hw.cores_of_ccx(ccx)
            )
        never_ran = table.allocated[asid] & ccxs
        table.allocated[asid] &= ~never_ran
        table.clean[asid] |= never_ran
        ran = table.in_use[asid] & ccxs
        table.in_use[asid] &= ~ran
        table.dirty[asid] |= ran
        guest.asid = guest.ccxs = 0
        guest.activation = Activation.INACTIVE
        return Status.SUCCESS

    def df_flush(self, _buf) -> Status:
        hw, table = self.ctx.hw, self.ctx.asids
        done = hw.wbinvd_done()
        ccx_done = 0
        for ccx in range(hw.ccx_count):
            if all(done[c] for c in hw.cores_of_ccx(ccx)):
                ccx_done |= 1 << ccx
        for asid in table.asids():
            moved = table.dirty[asid] & ccx_done
            if moved:
                table.dirty[asid] &= ~moved
                table.clean[asid] |= moved
        if ccx_done != table.ccx_all:
            return Status.WBINVD_REQUIRED
        return Status.SUCCESS

    def decommission(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if guest.asid:
            return Status.ACTIVE
        for spa in guest.vmsa_pages:  # its VMSAs' integrity values go with it
            ctx.hw.forget_vmsa(spa)
        del ctx.guests[guest.handle]
        ctx.guest_count -= 1
        if ctx.guest_count == 0:
            ctx.state = PlatformState.INIT
        return Status.SUCCESS

    def guest_status(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        guest = ctx.guests.get(buf.handle)
        if guest is None:
            buf.state = GuestState.UNINIT
            return Status.SUCCESS
        buf.state, buf.asid, buf.policy = guest.state, guest.asid, guest.policy
        return Status.SUCCESS
