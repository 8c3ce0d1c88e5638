"""Command ids and command-buffer layouts (sev-api.md §1.2, §7.1).

Offsets are the natural-alignment layout of the firmware's structures; sizes are what the
firmware copies in and out (the C ``sizeof``), which for a few commands is larger than
Linux's packed structures: a host must provide a buffer of at least ``layout.size``.
"""

from __future__ import annotations

from enum import IntEnum

from sevsim.api.layout import Layout

SPEC = "sev-api.md §1.2"


class Command(IntEnum):
    INIT = 0x01
    SHUTDOWN = 0x02
    PLATFORM_RESET = 0x03
    PLATFORM_STATUS = 0x04
    PEK_GEN = 0x05
    PEK_CSR = 0x06
    PEK_CERT_IMPORT = 0x07
    PDH_CERT_EXPORT = 0x08
    PDH_GEN = 0x09
    DF_FLUSH = 0x0A
    DOWNLOAD_FIRMWARE = 0x0B
    GET_ID = 0x0C
    INIT_EX = 0x0D
    NOP = 0x0E
    RING_BUFFER = 0x0F
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    DEACTIVATE = 0x22
    GUEST_STATUS = 0x23
    COPY = 0x24
    ACTIVATE_EX = 0x25
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    ATTESTATION = 0x36
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53
    DBG_DECRYPT = 0x60
    DBG_ENCRYPT = 0x61
    SWAP_OUT = 0x70
    SWAP_IN = 0x71
    # SEV-SNP, reserved: this model does not implement SNP.
    SNP_INIT = 0x81
    SNP_SHUTDOWN = 0x82
    SNP_PLATFORM_STATUS = 0x83
    SNP_DF_FLUSH = 0x84
    SNP_INIT_EX = 0x85
    SNP_SHUTDOWN_EX = 0x86
    SNP_DECOMMISSION = 0x90
    SNP_ACTIVATE = 0x91
    SNP_GUEST_STATUS = 0x92
    SNP_GCTX_CREATE = 0x93
    SNP_GUEST_REQUEST = 0x94
    SNP_ACTIVATE_EX = 0x95
    SNP_LAUNCH_START = 0xA0
    SNP_LAUNCH_UPDATE = 0xA1
    SNP_LAUNCH_FINISH = 0xA2
    SNP_DBG_DECRYPT = 0xB0
    SNP_DBG_ENCRYPT = 0xB1
    SNP_SWAP_OUT = 0xC0
    SNP_SWAP_IN = 0xC1
    SNP_PAGE_MOVE = 0xC2
    SNP_MD_INIT = 0xC3
    SNP_PAGE_SET_STATE = 0xC6
    SNP_PAGE_RECLAIM = 0xC7
    SNP_PAGE_UNSMASH = 0xC8
    SNP_CONFIG = 0xC9
    SNP_DOWNLOAD_FIRMWARE_EX = 0xCA
    SNP_COMMIT = 0xCB
    SNP_VLEK_LOAD = 0xCD
    SNP_FEATURE_INFO = 0xCE


def _handle_only(name: str) -> Layout:
    return Layout(name, 4, SPEC, (0x00, "I", "handle"))


INIT = Layout(
    "INIT", 0x18, SPEC, (0x00, "H", "flags"), (0x08, "Q", "tmr_paddr"), (0x10, "I", "tmr_len")
)
INIT_EX = Layout(
    "INIT_EX",
    0x28,
    SPEC,
    (0x00, "I", "length"),
    (0x04, "H", "flags"),
    (0x08, "Q", "tmr_paddr"),
    (0x10, "I", "tmr_len"),
    (0x18, "Q", "nv_paddr"),
    (0x20, "I", "nv_len"),
)
INIT_EX_LENGTH = 0x24  # the value the length field must hold
PLATFORM_STATUS = Layout(
    "PLATFORM_STATUS",
    12,
    "sev-api.md §7.1",
    (0x00, "B", "api_major"),
    (0x01, "B", "api_minor"),
    (0x02, "B", "state"),
    (0x03, "B", "platform_flags"),
    (0x04, "H", "config_flags"),
    (0x07, "B", "build_id"),
    (0x08, "I", "guest_count"),
)
PLATFORM_FLAG_OWNER = 0x01  # externally owned
CONFIG_FLAG_ES = 0x01
PEK_CSR = Layout("PEK_CSR", 0x10, SPEC, (0x00, "Q", "csr_paddr"), (0x08, "I", "csr_len"))
PEK_CERT_IMPORT = Layout(
    "PEK_CERT_IMPORT",
    0x20,
    SPEC,
    (0x00, "Q", "pek_paddr"),
    (0x08, "I", "pek_len"),
    (0x10, "Q", "oca_paddr"),
    (0x18, "I", "oca_len"),
)
PDH_CERT_EXPORT = Layout(
    "PDH_CERT_EXPORT",
    0x20,
    SPEC,
    (0x00, "Q", "pdh_paddr"),
    (0x08, "I", "pdh_len"),
    (0x10, "Q", "chain_paddr"),
    (0x18, "I", "chain_len"),
)
DOWNLOAD_FIRMWARE = Layout(
    "DOWNLOAD_FIRMWARE", 0x10, SPEC, (0x00, "Q", "fw_paddr"), (0x08, "I", "fw_len")
)
GET_ID = Layout("GET_ID", 0x10, SPEC, (0x00, "Q", "id_paddr"), (0x08, "I", "id_len"))
GET_ID_LENGTH = 64  # one socket: X(32) || Y(32) of a secp256k1 point, big-endian

DECOMMISSION = _handle_only("DECOMMISSION")
ACTIVATE = Layout("ACTIVATE", 8, SPEC, (0x00, "I", "handle"), (0x04, "I", "asid"))
DEACTIVATE = _handle_only("DEACTIVATE")
GUEST_STATUS = Layout(
    "GUEST_STATUS",
    0x10,
    SPEC,
    (0x00, "I", "handle"),
    (0x04, "I", "policy"),
    (0x08, "I", "asid"),
    (0x0C, "B", "state"),
)
COPY = Layout(
    "COPY",
    0x18,
    SPEC,
    (0x00, "I", "handle"),
    (0x04, "I", "length"),
    (0x08, "Q", "src_paddr"),
    (0x10, "Q", "dst_paddr"),
)
ACTIVATE_EX = Layout(
    "ACTIVATE_EX",
    0x18,
    SPEC,
    (0x00, "I", "ex_len"),
    (0x04, "I", "handle"),
    (0x08, "I", "asid"),
    (0x0C, "I", "numids"),
    (0x10, "Q", "ids_paddr"),
)
LAUNCH_START = Layout(
    "LAUNCH_START",
    0x28,
    SPEC,
    (0x00, "I", "handle"),
    (0x04, "I", "policy"),
    (0x08, "Q", "dh_cert_paddr"),
    (0x10, "I", "dh_cert_len"),
    (0x18, "Q", "session_paddr"),
    (0x20, "I", "session_len"),
)
# The session blob the guest owner sends with LAUNCH_START (sev-api.md §5.1).
SESSION = Layout(
    "SESSION",
    0x80,
    "sev-api.md §5.1",
    (0x00, "16s", "nonce"),
    (0x10, "32s", "wrap_tk"),
    (0x30, "16s", "wrap_iv"),
    (0x40, "32s", "wrap_mac"),
    (0x60, "32s", "policy_mac"),
)
LAUNCH_UPDATE = Layout(
    "LAUNCH_UPDATE", 0x18, SPEC, (0x00, "I", "handle"), (0x08, "Q", "paddr"), (0x10, "I", "len")
)
LAUNCH_MEASURE = Layout(
    "LAUNCH_MEASURE",
    0x18,
    SPEC,
    (0x00, "I", "handle"),
    (0x08, "Q", "measure_paddr"),
    (0x10, "I", "measure_len"),
)
MEASUREMENT = Layout(  # what LAUNCH_MEASURE writes at measure_paddr
    "MEASUREMENT", 48, "sev-api.md §5.4", (0x00, "32s", "measure"), (0x20, "16s", "mnonce")
)
TRANSPORT = Layout(
    "TRANSPORT",
    0x38,
    SPEC,
    (0x00, "I", "handle"),
    (0x08, "Q", "hdr_paddr"),
    (0x10, "I", "hdr_len"),
    (0x18, "Q", "guest_paddr"),
    (0x20, "I", "guest_len"),
    (0x28, "Q", "trans_paddr"),
    (0x30, "I", "trans_len"),
)
# The header of a LAUNCH_SECRET (and migration) packet (sev-api.md §5.5).
PACKET_HEADER = Layout(
    "PACKET_HEADER",
    52,
    "sev-api.md §5.5",
    (0x00, "I", "flags"),
    (0x04, "16s", "iv"),
    (0x14, "32s", "mac"),
)
PACKET_FLAG_COMPRESSED = 1 << 0
LAUNCH_FINISH = _handle_only("LAUNCH_FINISH")
ATTESTATION = Layout(
    "ATTESTATION",
    0x28,
    SPEC,
    (0x00, "I", "handle"),
    (0x08, "Q", "paddr"),
    (0x10, "16s", "mnonce"),
    (0x20, "I", "len"),
)
# The legacy attestation report (0xD0 bytes); the PEK signs bytes [0x00, 0x34).
ATTESTATION_REPORT = Layout(
    "ATTESTATION_REPORT",
    0xD0,
    "sev-api.md §5.7",
    (0x00, "16s", "mnonce"),
    (0x10, "32s", "launch_digest"),
    (0x30, "I", "policy"),
    (0x34, "I", "sig_usage"),
    (0x38, "I", "sig_algo"),
    (0x40, "72s", "sig_r"),
    (0x88, "72s", "sig_s"),
)
ATTESTATION_SIGNED_SIZE = 0x34
SEND_START = Layout(
    "SEND_START",
    0x48,
    SPEC,
    (0x00, "I", "handle"),
    (0x04, "I", "policy"),
    (0x08, "Q", "pdh_paddr"),
    (0x10, "I", "pdh_len"),
    (0x18, "Q", "plat_certs_paddr"),
    (0x20, "I", "plat_certs_len"),
    (0x28, "Q", "amd_certs_paddr"),
    (0x30, "I", "amd_certs_len"),
    (0x38, "Q", "session_paddr"),
    (0x40, "I", "session_len"),
)
SEND_FINISH = _handle_only("SEND_FINISH")
SEND_CANCEL = _handle_only("SEND_CANCEL")
RECEIVE_START = Layout(
    "RECEIVE_START",
    0x28,
    SPEC,
    (0x00, "I", "handle"),
    (0x04, "I", "policy"),
    (0x08, "Q", "pdh_paddr"),
    (0x10, "I", "pdh_len"),
    (0x18, "Q", "session_paddr"),
    (0x20, "I", "session_len"),
)
RECEIVE_FINISH = _handle_only("RECEIVE_FINISH")
DEBUG = Layout(
    "DEBUG",
    0x20,
    SPEC,
    (0x00, "I", "handle"),
    (0x08, "Q", "src_paddr"),
    (0x10, "Q", "dst_paddr"),
    (0x18, "I", "len"),
)

# The command buffer each command takes (None: the command takes no buffer).


def command_of(command_id: int) -> Command | None:
    """The Command with this id, or None for an id the API does not define."""
    try:
        return Command(command_id)
    except ValueError:
        return None


BUFFERS: dict[Command, Layout | None] = {
    Command.INIT: INIT,
    Command.SHUTDOWN: None,
    Command.PLATFORM_RESET: None,
    Command.PLATFORM_STATUS: PLATFORM_STATUS,
    Command.PEK_GEN: None,
    Command.PEK_CSR: PEK_CSR,
    Command.PEK_CERT_IMPORT: PEK_CERT_IMPORT,
    Command.PDH_CERT_EXPORT: PDH_CERT_EXPORT,
    Command.PDH_GEN: None,
    Command.DF_FLUSH: None,
    Command.DOWNLOAD_FIRMWARE: DOWNLOAD_FIRMWARE,
    Command.GET_ID: GET_ID,
    Command.INIT_EX: INIT_EX,
    Command.NOP: None,
    Command.DECOMMISSION: DECOMMISSION,
    Command.ACTIVATE: ACTIVATE,
    Command.DEACTIVATE: DEACTIVATE,
    Command.GUEST_STATUS: GUEST_STATUS,
    Command.COPY: COPY,
    Command.ACTIVATE_EX: ACTIVATE_EX,
    Command.LAUNCH_START: LAUNCH_START,
    Command.LAUNCH_UPDATE_DATA: LAUNCH_UPDATE,
    Command.LAUNCH_UPDATE_VMSA: LAUNCH_UPDATE,
    Command.LAUNCH_MEASURE: LAUNCH_MEASURE,
    Command.LAUNCH_SECRET: TRANSPORT,
    Command.LAUNCH_FINISH: LAUNCH_FINISH,
    Command.ATTESTATION: ATTESTATION,
    Command.SEND_START: SEND_START,
    Command.SEND_UPDATE_DATA: TRANSPORT,
    Command.SEND_UPDATE_VMSA: TRANSPORT,
    Command.SEND_FINISH: SEND_FINISH,
    Command.SEND_CANCEL: SEND_CANCEL,
    Command.RECEIVE_START: RECEIVE_START,
    Command.RECEIVE_UPDATE_DATA: TRANSPORT,
    Command.RECEIVE_UPDATE_VMSA: TRANSPORT,
    Command.RECEIVE_FINISH: RECEIVE_FINISH,
    Command.DBG_DECRYPT: DEBUG,
    Command.DBG_ENCRYPT: DEBUG,
}

# Mailbox register fields (Linux include/linux/psp.h, sev-dev.h).
CMDRESP_RESP = 1 << 31  # set by the firmware when the command is complete
CMDRESP_IOC = 1 << 0  # interrupt on completion
CMDRESP_CMD_SHIFT = 16
CMDRESP_CMD_MASK = 0x7FF << 16  # bits 26:16
CMDRESP_STATUS_MASK = 0xFFFF
