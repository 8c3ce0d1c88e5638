"""The firmware's end of the trusted channel with a guest owner or another platform
(sev-api.md §5.2, §6.1; AMD-ASPFW sev_channel.c).

ECDH between the platform's PDH and the peer's PDH-format certificate gives the shared
secret Z; LAUNCH_START and RECEIVE_START unwrap the transport keys (TEK, TIK) from the
peer's session blob with it, SEND_START wraps fresh ones for the receiver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sevsim import crypto
from sevsim.api import channel
from sevsim.api import commands as cmd
from sevsim.api import policy as sev_policy
from sevsim.api.status import Status
from sevsim.certs.sev import CERT_SIZE, Algo, CertError, SevCert, Usage, sanity_check
from sevsim.psp.x86mem import FirmwareError

if TYPE_CHECKING:
    from sevsim.psp.context import FirmwareContext


def ecdh(ctx: FirmwareContext, peer: SevCert) -> bytes:
    """Z with a peer's PDH-format certificate (its signatures are not checked here)."""
    if sanity_check(peer, Usage.PDH, Algo.ECDH_SHA256) != Status.SUCCESS:
        raise FirmwareError(Status.INVALID_CERTIFICATE)
    pdh_key = crypto.p384_private_from_scalar(ctx.require_identity().persistent.pdh_key)
    try:
        return crypto.ecdh_z(pdh_key, peer.public_key())
    except (CertError, ValueError):
        raise FirmwareError(Status.INVALID_CERTIFICATE) from None


def open_channel(ctx: FirmwareContext, buf, peer_paddr: int, peer_len: int) -> tuple[bytes, bytes]:
    """The server side of the channel (LAUNCH_START with a GODH certificate,
    RECEIVE_START): (TEK, TIK) from the session blob, after the policy checks."""
    if buf.session_len != cmd.SESSION.size:
        raise FirmwareError(Status.INVALID_LENGTH)
    blob = ctx.mem.read(buf.session_paddr, cmd.SESSION.size)
    if peer_len != CERT_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH)
    z = ecdh(ctx, SevCert.parse(ctx.mem.read(peer_paddr, CERT_SIZE)))
    try:
        tek, tik, policy_mac = channel.unwrap(z, blob)
    except channel.ChannelError:
        raise FirmwareError(Status.BAD_MEASUREMENT) from None
    # sev_guest_verify_policy: MAC, minimum API version, reserved bits.
    if not crypto.equal(channel.policy_mac(tik, buf.policy), policy_mac):
        raise FirmwareError(Status.BAD_MEASUREMENT)
    if sev_policy.api_min(buf.policy) > ctx.api_version[:2]:
        raise FirmwareError(Status.POLICY_FAILURE)
    if buf.policy & sev_policy.RESERVED_MASK:
        raise FirmwareError(Status.POLICY_FAILURE)
    return tek, tik
