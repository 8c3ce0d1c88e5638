"""DBG_DECRYPT and DBG_ENCRYPT (sev-api.md §7.4; AMD-ASPFW sev_mcmd.c): the host copies
between a guest's memory and its own, only for guests whose owner allowed debugging."""

from __future__ import annotations

from sevsim.api import policy as sev_policy
from sevsim.api.status import Status
from sevsim.psp.context import FirmwareContext


class DebugCommands:
    def __init__(self, ctx: FirmwareContext) -> None:
        self.ctx = ctx

    def dbg_decrypt(self, buf) -> Status:
        return self._dbg(buf, decrypt=True)

    def dbg_encrypt(self, buf) -> Status:
        return self._dbg(buf, decrypt=False)

    def _dbg(self, buf, decrypt: bool) -> Status:
        ctx = self.ctx
        ctx.require_working()
        if buf.src_paddr % 16 or buf.dst_paddr % 16:
            return Status.INVALID_ADDRESS
        if buf.len % 16:
            return Status.INVALID_LENGTH
        guest = ctx.guest(buf.handle)
        if guest.policy & sev_policy.PolicyFlag.NODBG:
            return Status.POLICY_FAILURE
        if guest.inactive:
            return Status.INACTIVE
        if not buf.len:
            return Status.SUCCESS
        if decrypt:
            data = ctx.mem.read_guest(buf.src_paddr, buf.len, guest.asid)
            ctx.mem.write(buf.dst_paddr, data)
        else:
            data = ctx.mem.read(buf.src_paddr, buf.len)
            ctx.mem.write_guest(buf.dst_paddr, data, guest.asid)
        return Status.SUCCESS
