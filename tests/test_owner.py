"""The guest owner's formulas against published vectors (sev-api.md §9), and a round trip
with the firmware: session → LAUNCH_START → measure → owner check → secret → LAUNCH_SECRET."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid

import pytest
from conftest import TESTDATA, RawMailbox, make_platform, psp_port
from cryptography.hazmat.primitives import hashes
from test_guest_firmware import IMAGE_PA, MEASURE_PA, activate, cmd, launch_start, pdh_cert, ready

from sevsim import crypto
from sevsim.api import commands as c
from sevsim.api import guidtable, ovmf
from sevsim.api import policy as pol
from sevsim.api.commands import Command
from sevsim.api.status import Status
from sevsim.certs.sev import EC_FIELD, SevCert
from sevsim.owner import measure, secret, session

VECTORS = TESTDATA / "vectors"
SEVCTL = VECTORS / "sevctl"
SSM = VECTORS / "sev-snp-measure"
OVMF_TRIMMED = SEVCTL / "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"
b64 = base64.b64decode


# ---- published vectors -------------------------------------------------------------------------
def test_session_blob_matches_the_virtee_vector():
    blob = c.SESSION.parse(session.session_blob(bytes(16), *[bytes(16)] * 4, policy=0))
    assert blob.wrap_tk.hex() == (
        "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    )
    assert blob.wrap_mac.hex() == (
        "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    )
    assert blob.policy_mac.hex() == (
        "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
    )


def test_measurement_matches_the_virtee_and_amd_tool_vector():
    tik = bytes.fromhex("66320db73158a35a255d051758e95ed4")
    mnonce = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
    out = measure.measurement(tik, 0x00, 0x12, 0x0F, 0, hashlib.sha256(b"").digest(), mnonce)
    assert out.hex() == "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"


SEVCTL_NONCE = b64("wxP6tRHCFrFQWxsuqZA8QA==")


@pytest.mark.parametrize(
    "inputs, expected",
    [
        (
            {"digest": b64("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=")},
            "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA",
        ),
        ({}, "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"),
        (
            {
                "kernel": (SEVCTL / "measurement" / "vmlinuz-fake").read_bytes(),
                "initrd": (SEVCTL / "measurement" / "initrd-fake").read_bytes(),
                "cmdline": "foo bar baz fake kernel=cmdline",
            },
            "h3auYbWQnVW7EGLWN4Hf9SN0oEYMPU2sK4bLnefWPwvDE/q1EcIWsVBbGy6pkDxA",
        ),
    ],
)
def test_measurement_matches_sevctl_measurementbuild(inputs, expected):
    tik = (SEVCTL / "measurement" / "tik1.bin").read_bytes()
    digest = inputs.pop("digest", None) or measure.launch_digest(
        OVMF_TRIMMED.read_bytes(), **inputs
    )
    verdict = measure.check(b64(expected), tik, 1, 40, 40, 3, digest)
    assert verdict.ok and verdict.checklist == []
    wrong = measure.check(b64(expected), tik, 1, 40, 40, 7, digest)  # another policy
    assert not wrong.ok and any("policy" in item for item in wrong.checklist)


@pytest.mark.parametrize(
    "fixture, kernel, initrd, cmdline, expected",
    [
        (
            "ovmf_AmdSev_suffix.bin",
            b"",
            b"",
            "console=ttyS0 loglevel=7",
            "82a3ee5d537c3620628270c292ae30cb40c3c878666a7890ee7ef2a08fb535ff",
        ),
        (
            "ovmf_AmdSev_suffix.bin",
            b"",
            None,
            None,
            "77f613d7bbcdf12a73782ea9e88b0172aeda50d1a54201cb903594ff52846898",
        ),
        (
            "ovmf_OvmfX64_suffix.bin",
            None,
            None,
            None,
            "b4c021e085fb83ceffe6571a3d357b4a98773c83c474e47f76c876708fe316da",
        ),
    ],
)
def test_launch_digest_matches_sev_snp_measure(fixture, kernel, initrd, cmdline, expected):
    firmware = (SSM / fixture).read_bytes()
    assert measure.launch_digest(firmware, kernel, initrd, cmdline).hex() == expected


def test_secret_packet_matches_sevctl_secretbuild():
    table = guidtable.secrets_table(
        [
            (
                uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b"),
                (SEVCTL / "secret" / "secret1.txt").read_bytes(),
            )
        ]
    )
    blob = b64("TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS")
    header, payload = secret.build_packet(
        (SEVCTL / "secret" / "tek1.bin").read_bytes(),
        (SEVCTL / "secret" / "tik1.bin").read_bytes(),
        blob[:32],
        table,
        iv=b64("rFR07U3TLH2YnsUj2SVZ7A=="),
    )
    assert base64.b64encode(header).decode() == (
        "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q=="
    )
    assert base64.b64encode(payload).decode() == (
        "0U3e5PcXv0UW+H4tSBFKOdCYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCCwD/2w5cPA=="
    )


def test_ovmf_footer_table_of_a_real_amdsev_build():
    table = ovmf.parse_table((SSM / "ovmf_AmdSev_suffix.bin").read_bytes())
    assert ovmf.reset_address(table) == 0x0080B004
    assert ovmf.area(table, ovmf.SEV_HASH_TABLE_RV_GUID) == (0x00810C00, 0x400)
    assert ovmf.area(table, ovmf.SEV_SECRET_GUID) == (0x00810000, 0xC00)
    # Our builder writes what the parser (and QEMU) read.
    entries = [(ovmf.SEV_SECRET_GUID, bytes(range(8))), (ovmf.SEV_ES_RESET_BLOCK_GUID, b"\x04")]
    image = bytes(4096 - 32 - len(ovmf.build_table(entries))) + ovmf.build_table(entries)
    assert ovmf.parse_table(image + bytes(32)) == dict(entries)


def test_guid_tables_parse_back():
    secrets = [(uuid.uuid4(), os.urandom(n)) for n in (1, 18, 40)]
    table = guidtable.secrets_table(secrets)
    assert len(table) % 16 == 0
    assert guidtable.parse(table, guidtable.SECRET_TABLE_GUID, 4) == secrets
    hashes = guidtable.sev_hashes_table(b"k", b"i", "c")
    assert len(hashes) == 176
    entries = guidtable.parse(hashes, guidtable.SEV_HASH_TABLE_GUID, 2)
    assert entries[2] == (guidtable.SEV_KERNEL_ENTRY_GUID, hashlib.sha256(b"k").digest())
    with pytest.raises(guidtable.GuidTableError):
        guidtable.parse(table[:30], guidtable.SECRET_TABLE_GUID, 4)


# ---- the owner and the firmware ---------------------------------------------------------------
@pytest.fixture
def mb() -> RawMailbox:
    return ready(RawMailbox(make_platform("milan")))


def launched_with_owner(mb, policy: int, image: bytes):
    """An owner session, LAUNCH_START with it, the image encrypted and measured."""
    owner = session.start(pdh_cert(mb), policy)
    status, handle = launch_start(mb, policy, godh=owner.godh_cert, session=owner.session)
    assert status == Status.SUCCESS
    assert activate(mb, handle, 40) == Status.SUCCESS
    mb.write(IMAGE_PA, image)
    assert (
        cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=handle, paddr=IMAGE_PA, len=len(image))
        == Status.SUCCESS
    )
    buf = c.LAUNCH_MEASURE.build(handle=handle, measure_paddr=MEASURE_PA, measure_len=48)
    assert mb.cmd(Command.LAUNCH_MEASURE, buf)[0] == Status.SUCCESS
    return owner, handle, mb.read(MEASURE_PA, 48)


SECRET_PA = 0x50_0000


def inject(mb, handle, header: bytes, payload: bytes, guest_pa=SECRET_PA, **lengths):
    mb.write(0x60_0000, header)
    mb.write(0x60_1000, payload)
    fields = dict(
        handle=handle,
        hdr_paddr=0x60_0000,
        hdr_len=len(header),
        guest_paddr=guest_pa,
        guest_len=len(payload),
        trans_paddr=0x60_1000,
        trans_len=len(payload),
    )
    fields.update(lengths)
    return cmd(mb, Command.LAUNCH_SECRET, **fields)


def test_owner_round_trip_with_the_firmware(mb):
    m = mb.machine
    policy = pol.make(pol.PolicyFlag.NODBG, 1, 0)
    image = os.urandom(8192)
    owner, handle, blob = launched_with_owner(mb, policy, image)
    major, minor, build = psp_port(mb).api_version
    verdict = measure.check(
        blob, owner.tik, major, minor, build, policy, measure.launch_digest(image)
    )
    assert verdict.ok
    table = guidtable.secrets_table([(uuid.uuid4(), b"disk passphrase: correct horse")])
    header, payload = secret.build_packet(owner.tek, owner.tik, blob[:32], table)
    assert inject(mb, handle, header, payload) == Status.SUCCESS
    # The secret is in guest memory under the guest's key, and nowhere in plaintext.
    m.cache.wbinvd()
    slot = m.memctl.key_slot(True, 40)
    assert m.memctl.read(SECRET_PA, len(table), slot) == table
    assert m.dram.read(SECRET_PA, len(table)) != table
    assert cmd(mb, Command.LAUNCH_FINISH, handle=handle) == Status.SUCCESS
    # After LAUNCH_FINISH the channel is closed: no more secrets.
    assert inject(mb, handle, header, payload) == Status.INVALID_GUEST_STATE


def test_launch_secret_is_bound_to_the_measurement_and_the_keys(mb):
    owner, handle, blob = launched_with_owner(mb, 0, os.urandom(4096))
    table = guidtable.secrets_table([(uuid.uuid4(), b"x" * 20)])
    header, payload = secret.build_packet(owner.tek, owner.tik, blob[:32], table)
    flipped = bytearray(header)
    flipped[4] ^= 1  # one IV bit
    assert inject(mb, handle, bytes(flipped), payload) == Status.BAD_MEASUREMENT
    tampered = bytes([payload[0] ^ 1]) + payload[1:]
    assert inject(mb, handle, header, tampered) == Status.BAD_MEASUREMENT
    other_launch = secret.build_packet(owner.tek, owner.tik, os.urandom(32), table)
    assert inject(mb, handle, *other_launch) == Status.BAD_MEASUREMENT
    wrong_tik = secret.build_packet(owner.tek, os.urandom(16), blob[:32], table)
    assert inject(mb, handle, *wrong_tik) == Status.BAD_MEASUREMENT
    compressed = secret.build_packet(owner.tek, owner.tik, blob[:32], table, flags=1)
    assert inject(mb, handle, *compressed) == Status.UNSUPPORTED  # after the MAC check
    assert inject(mb, handle, header, payload, guest_pa=SECRET_PA + 8) == Status.INVALID_ADDRESS
    assert inject(mb, handle, header, payload, hdr_len=48) == Status.INVALID_LENGTH
    assert inject(mb, handle, header, payload, trans_len=16) == Status.INVALID_LENGTH
    assert inject(mb, handle, header, payload) == Status.SUCCESS


def test_debug_commands_follow_the_policy(mb):
    m = mb.machine
    for policy, expected in ((pol.PolicyFlag.NODBG, Status.POLICY_FAILURE), (0, Status.SUCCESS)):
        status, handle = launch_start(mb, policy)
        asid = 50 + handle
        assert activate(mb, handle, asid) == Status.SUCCESS
        m.cache.write(IMAGE_PA, b"private data, 32 bytes of it...", m.memctl.key_slot(True, asid))
        dbg = dict(handle=handle, src_paddr=IMAGE_PA, dst_paddr=0x70_0000, len=32)
        assert cmd(mb, Command.DBG_DECRYPT, **dbg) == expected
        if expected == Status.SUCCESS:
            assert mb.read(0x70_0000, 31) == b"private data, 32 bytes of it..."
            mb.write(0x70_0000, b"written by the debugger: 32 B.  ")
            back = dict(handle=handle, src_paddr=0x70_0000, dst_paddr=IMAGE_PA + 64, len=32)
            assert cmd(mb, Command.DBG_ENCRYPT, **back) == Status.SUCCESS
            assert m.cache.read(IMAGE_PA + 64, 32, m.memctl.key_slot(True, asid)) == (
                b"written by the debugger: 32 B.  "
            )
        assert cmd(mb, Command.DBG_DECRYPT, **(dbg | {"len": 24})) == Status.INVALID_LENGTH
        assert cmd(mb, Command.DBG_DECRYPT, **(dbg | {"src_paddr": 8})) == Status.INVALID_ADDRESS


def test_attestation_report_is_signed_by_the_pek(mb):
    image = os.urandom(4096)
    owner, handle, blob = launched_with_owner(mb, 0x3, image)
    mnonce = os.urandom(16)
    fields = dict(handle=handle, paddr=0x70_0000, mnonce=mnonce, len=100)
    status, out = mb.cmd(Command.ATTESTATION, c.ATTESTATION.build(**fields))
    assert status == Status.INVALID_LENGTH and c.ATTESTATION.parse(out).len == 0xD0
    fields["len"] = 0xD0
    assert mb.cmd(Command.ATTESTATION, c.ATTESTATION.build(**fields))[0] == Status.SUCCESS
    raw = mb.read(0x70_0000, 0xD0)
    report = c.ATTESTATION_REPORT.parse(raw)
    assert report.mnonce == mnonce and report.policy == 0x3
    assert report.launch_digest == hashlib.sha256(image).digest()
    pek = SevCert.parse(mb.read(0x20_0000 + 0xA000, 2084))  # exported by pdh_cert() above
    r, s_ = crypto.from_le(report.sig_r[:EC_FIELD]), crypto.from_le(report.sig_s[:EC_FIELD])
    assert crypto.ecdsa_verify(pek.public_key(), r, s_, raw[:0x34], hashes.SHA256())
    assert not crypto.ecdsa_verify(pek.public_key(), r, s_, raw[:0x33] + b"\x07", hashes.SHA256())
