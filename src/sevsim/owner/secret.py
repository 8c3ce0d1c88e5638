"""A LAUNCH_SECRET packet from the guest owner (sev-api.md §5.5; sevctl ``secret build``;
QEMU's sev-inject-launch-secret takes the header and the payload in base64).

The payload is AES-128-CTR(TEK, IV, secret); the header is flags ‖ IV ‖ MAC with
MAC = HMAC-SHA256(TIK, 0x01 ‖ LE32 flags ‖ IV ‖ LE32 len ‖ LE32 len ‖ payload ‖ MEASURE),
which binds the packet to the launch whose measurement the owner verified.
"""

from __future__ import annotations

import base64
import hmac
import os
import uuid

from sevsim import crypto
from sevsim.api import channel, guidtable
from sevsim.api import commands as cmd

READY_MESSAGE = b"sevsim guest ready"  # what the guest MACs with each secret (launch.c)


def build_packet(
    tek: bytes, tik: bytes, measure: bytes, secret: bytes, iv: bytes | None = None, flags: int = 0
) -> tuple[bytes, bytes]:
    """(52-byte header, payload). The secret must be a non-empty multiple of 16 bytes, as
    the firmware requires (a secrets table is padded to that)."""
    if not secret or len(secret) % 16:
        raise ValueError(f"a secret is a non-empty multiple of 16 bytes, not {len(secret)}")
    if len(measure) != 32:
        raise ValueError("MEASURE is the first 32 bytes of the launch measurement")
    iv = os.urandom(16) if iv is None else iv
    payload = crypto.aes128_ctr(tek, iv, secret)
    n = len(secret)
    mac = channel.packet_mac(tik, channel.CTX_SECRET, flags, iv, n, n, payload, measure)
    return cmd.PACKET_HEADER.build(flags=flags, iv=iv, mac=mac), payload


def secrets_table_packet_b64(
    tek: bytes, tik: bytes, measurement: bytes, entries: list[tuple[uuid.UUID, bytes]]
) -> tuple[str, str]:
    """A packet carrying an OVMF secrets table, for the launch whose measurement (MEASURE ‖
    MNONCE, as query-sev-launch-measure gives it) the owner verified: (packet-header,
    secret) in base64, as QEMU's sev-inject-launch-secret takes them."""
    header, payload = build_packet(tek, tik, measurement[:32], guidtable.secrets_table(entries))
    return base64.b64encode(header).decode(), base64.b64encode(payload).decode()


def ready_tag(secret: bytes) -> str:
    """What the sevsim guest prints to prove it holds ``secret`` without showing it:
    HMAC-SHA256(secret, "sevsim guest ready") in hex (the guest image's launch.c)."""
    return hmac.new(secret, READY_MESSAGE, "sha256").hexdigest()
