"""The SEV transport channel's formulas (sev-api.md §5.1–5.5, §6; AMD-ASPFW sev_channel.c).

Pure functions over bytes, shared by the firmware (the server at LAUNCH_START and
RECEIVE_START, the client at SEND_START) and the guest owner (a client). No key is kept
here: callers pass and receive them.
"""

from __future__ import annotations

from sevsim import crypto
from sevsim.api import commands as cmd

# The context byte that starts every MAC (SEV_CHANNEL_CTX_*).
CTX_SECRET = 0x01
CTX_DATA = 0x02  # SEND/RECEIVE_UPDATE_DATA (and, in this firmware, _VMSA)
CTX_MEASURE = 0x04


class ChannelError(ValueError):
    """The session blob does not open: its wrap MAC fails (a different PDH or tampering)."""


def _kek_kik(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    master = crypto.kdf(z, b"sev-master-secret", nonce, 128)
    return crypto.kdf(master, b"sev-kek", b"", 128), crypto.kdf(master, b"sev-kik", b"", 128)


def wrap(z: bytes, nonce: bytes, wrap_iv: bytes, tek: bytes, tik: bytes, policy: int) -> bytes:
    """The client side: the 128-byte session blob that carries TEK ‖ TIK to the server."""
    kek, kik = _kek_kik(z, nonce)
    wrap_tk = crypto.aes128_ctr(kek, wrap_iv, tek + tik)
    return cmd.SESSION.build(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=crypto.hmac_sha256(kik, wrap_tk),
        policy_mac=policy_mac(tik, policy),
    )


def unwrap(z: bytes, blob: bytes) -> tuple[bytes, bytes, bytes]:
    """The server side: (TEK, TIK, policy MAC) from a session blob, or ChannelError."""
    session = cmd.SESSION.parse(blob)
    kek, kik = _kek_kik(z, session.nonce)
    if not crypto.equal(crypto.hmac_sha256(kik, session.wrap_tk), session.wrap_mac):
        raise ChannelError("the session's wrap MAC does not verify")
    keys = crypto.aes128_ctr(kek, session.wrap_iv, session.wrap_tk)
    return keys[:16], keys[16:], session.policy_mac


def policy_mac(tik: bytes, policy: int) -> bytes:
    return crypto.hmac_sha256(tik, crypto.le(policy, 4))


def packet_mac(
    tik: bytes,
    context: int,
    flags: int,
    iv: bytes,
    guest_len: int,
    trans_len: int,
    ciphertext: bytes,
    measure: bytes = b"",
) -> bytes:
    """HMAC-SHA256(TIK, ctx ‖ LE32 flags ‖ IV ‖ LE32 guest_len ‖ LE32 trans_len ‖
    ciphertext [‖ MEASURE]) — the MAC of a secret (with the launch MEASURE) or of a
    migration packet (without)."""
    head = bytes([context]) + crypto.le(flags, 4) + iv
    head += crypto.le(guest_len, 4) + crypto.le(trans_len, 4)
    return crypto.hmac_sha256(tik, head + ciphertext + measure)
