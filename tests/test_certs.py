"""Certificate formats against the real AMD certificates (tests/testdata), round trips,
tamper rejection and malformed input."""

from __future__ import annotations

import hashlib

import pytest
from conftest import TESTDATA
from hypothesis import given, settings
from hypothesis import strategies as st

from sevsim.api.status import Status
from sevsim.certs import sev
from sevsim.certs.amd import HEADER, AmdCert
from sevsim.certs.chain import (
    SevChain,
    builtin_root,
    decode_chain,
    verify_chain,
)
from sevsim.certs.sev import BODY_SIZE, CertError, SevCert, Usage, firmware_validate

CERTS = TESTDATA / "amd-sev-certs"
PLATFORMS = ["naples", "rome", "milan"]
ALL_GENS = ["naples", "rome", "milan", "genoa", "turin"]


def load_sev(gen: str, name: str) -> SevCert:
    return SevCert.parse((CERTS / gen / f"{name}.cert").read_bytes())


def load_amd(gen: str, name: str) -> AmdCert:
    return AmdCert.parse((CERTS / gen / f"{name}.cert").read_bytes())


def test_the_test_data_is_the_published_files():
    prefixes = {  # sev-api.md §9.5
        "naples/ark.cert": "dedabca561e1dece",
        "rome/ark.cert": "865977b268c16d5b",
        "milan/ark.cert": "1246469862b78a7a",
        "genoa/ark.cert": "8f4e3fd36589c23f",
        "turin/ark.cert": "f6405e5096a6eee1",
        "naples/pek.cert": "31243368c2046fbf",
        "rome/pek.cert": "fd5eb12d0175c91b",
    }
    for name, prefix in prefixes.items():
        assert hashlib.sha256((CERTS / name).read_bytes()).hexdigest().startswith(prefix)


KEY_IDS = {  # sev-api.md §3.2, in file order
    "naples": ("1bb987c359494606b174945601c9ea5b", "e139970cfc464377ae61b289e2f9e96e", 2048),
    "rome": ("e6002122fb58419399d15fee7b131351", "c6cbcf145b3146f498e40ecb4ad4fded", 4096),
    "milan": ("94c38e4177d0479292a7ae671d083fb6", "73478c05cc174bfeb06e718fa75dc3c8", 4096),
    "genoa": ("9f9d4a8fe761456599f6946c4c010f3a", "acbb4ad21acc436fb3e932f812cd01b0", 4096),
    "turin": ("d05c3a8bde484904b49552422ceb3942", "15051693f7304d65a527b4a7f3f7cb77", 4096),
}


@pytest.mark.parametrize("gen", ALL_GENS)
def test_real_ark_is_self_signed_and_signs_the_ask(gen):
    ark, ask = load_amd(gen, "ark"), load_amd(gen, "ask")
    ark_id, ask_id, bits = KEY_IDS[gen]
    assert (ark.key_id.hex(), ask.key_id.hex(), ark.bits, ask.bits) == (ark_id, ask_id, bits, bits)
    assert ark.certifying_id == ark.key_id and ask.certifying_id == ark.key_id
    assert ark.check_signed_by(ark) is None
    assert ask.check_signed_by(ark) is None
    assert ark.check_signed_by(ask) is not None  # the ASK did not sign the ARK
    assert builtin_root(gen).ark == ark  # the package bundles the same public certificates


@pytest.mark.parametrize("gen", PLATFORMS)
def test_real_platform_chain_verifies_link_by_link(gen):
    cek, pek, oca, pdh = (load_sev(gen, n) for n in ("cek", "pek", "oca", "pdh"))
    ask = load_amd(gen, "ask")
    assert firmware_validate(cek, ask.signing_key()) == Status.SUCCESS
    assert firmware_validate(pek, oca.signing_key()) == Status.SUCCESS
    assert firmware_validate(pek, cek.signing_key()) == Status.SUCCESS
    assert firmware_validate(oca, oca.signing_key()) == Status.SUCCESS
    assert firmware_validate(pdh, pek.signing_key()) == Status.SUCCESS
    report = verify_chain(SevChain(pdh, pek, oca, cek), builtin_root(gen))
    assert report.ok, report.first_failure()
    assert pek.signers() == [Usage.OCA, Usage.CEK] and pdh.signers()[0] == Usage.PEK
    expected_cek_algo = sev.Algo.RSA_SHA256 if gen == "naples" else sev.Algo.RSA_SHA384
    assert cek.slots()[0][:2] == (Usage.ASK, expected_cek_algo)


def test_rome_ask_does_not_verify_the_naples_cek():
    """The negative vector of virtee/sev tests/certs.rs."""
    cek = load_sev("naples", "cek")
    assert firmware_validate(cek, load_amd("rome", "ask").signing_key()) != Status.SUCCESS
    report = verify_chain(
        SevChain(*(load_sev("naples", n) for n in ("pdh", "pek", "oca", "cek"))),
        builtin_root("rome"),
    )
    assert not report.ok and report.first_failure().subject == "CEK"


@pytest.mark.parametrize("gen", PLATFORMS)
@pytest.mark.parametrize("name", ["cek", "pek", "oca", "pdh"])
def test_sev_cert_round_trip(gen, name):
    raw = (CERTS / gen / f"{name}.cert").read_bytes()
    cert = SevCert.parse(raw)
    assert sev.LAYOUT.build(cert.fields) == raw
    assert sev.encode_public_key(cert.public_key()) == cert.fields.pubkey


@pytest.mark.parametrize("gen", ALL_GENS)
def test_amd_cert_round_trip(gen):
    for name in ("ark", "ask"):
        raw = (CERTS / gen / f"{name}.cert").read_bytes()
        cert = AmdCert.parse(raw)
        assert HEADER.build(cert.header) + raw[0x40:] == raw
        assert cert.signed_bytes + cert.signature[::-1] == raw


@pytest.mark.parametrize("gen", ["naples", "milan"])
@pytest.mark.parametrize(("name", "signer"), [("pdh", "pek"), ("pek", "oca"), ("pek", "cek")])
def test_every_single_byte_change_in_a_signed_body_is_rejected(gen, name, signer):
    raw = (CERTS / gen / f"{name}.cert").read_bytes()
    key = load_sev(gen, signer).signing_key()
    assert firmware_validate(SevCert.parse(raw), key) == Status.SUCCESS
    for i in range(BODY_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x5A
        status = firmware_validate(SevCert.parse(bytes(bad)), key)
        assert status in (Status.BAD_SIGNATURE, Status.INVALID_CERTIFICATE), i


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_every_byte_of_an_ask_signed_body_matters(gen):
    ark, ask = load_amd(gen, "ark"), load_amd(gen, "ask")
    for i in range(0, len(ask.signed_bytes), 7):
        bad = bytearray(ask.raw)
        bad[i] ^= 0x01
        try:
            tampered = AmdCert.parse(bytes(bad))
        except CertError:
            continue  # the change broke the header's sizes: rejected at parse time
        assert tampered.check_signed_by(ark) is not None, i


def test_malformed_certificates_give_clear_errors():
    with pytest.raises(CertError, match="truncated"):
        AmdCert.parse((CERTS / "naples" / "ark-with-trailing-bytes.cert.bad").read_bytes())
    good = (CERTS / "milan" / "ark.cert").read_bytes()
    with pytest.raises(CertError, match="trailing"):
        AmdCert.parse(good + b"\0")
    with pytest.raises(CertError, match="2084"):
        SevCert.parse(load_sev("milan", "pek").raw[:-1])
    with pytest.raises(CertError):
        decode_chain(b"x" * 100)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=12000))
def test_random_input_never_crashes_the_parsers(data):
    for parse in (SevCert.parse, AmdCert.parse, decode_chain):
        try:
            parse(data)
        except CertError:
            pass


@settings(max_examples=100, deadline=None)
@given(
    usage=st.sampled_from(list(Usage)),
    algo=st.sampled_from(list(sev.Algo)),
    major=st.integers(0, 255),
    minor=st.integers(0, 255),
    pubkey=st.binary(min_size=1028, max_size=1028),
)
def test_layout_round_trip(usage, algo, major, minor, pubkey):
    raw = sev.LAYOUT.build(
        version=1,
        api_major=major,
        api_minor=minor,
        pubkey_usage=usage,
        pubkey_algo=algo,
        pubkey=pubkey,
    )
    f = SevCert.parse(raw).fields
    assert (f.pubkey_usage, f.pubkey_algo, f.api_major, f.api_minor, f.pubkey) == (
        usage,
        algo,
        major,
        minor,
        pubkey,
    )


def test_signing_rules():
    from cryptography.hazmat.primitives.asymmetric import ec

    from sevsim.crypto import P384

    key = ec.generate_private_key(P384)
    oca = SevCert.create(Usage.OCA, sev.Algo.ECDSA_SHA256, key.public_key(), 1, 0)
    signed = oca.signed(key, Usage.OCA, sev.Algo.ECDSA_SHA256)
    assert firmware_validate(signed, signed.signing_key()) == Status.SUCCESS
    assert firmware_validate(oca, oca.signing_key()) == Status.INVALID_CERTIFICATE  # unsigned
    half = signed.with_slot(1, Usage.PEK, 0, b"")  # usage set, algorithm INVALID
    assert firmware_validate(half, signed.signing_key()) == Status.BAD_SIGNATURE
    pdh = SevCert.create(Usage.PDH, sev.Algo.ECDH_SHA256, key.public_key(), 1, 0)
    pdh = pdh.signed(key, Usage.OCA, sev.Algo.ECDSA_SHA256)
    assert (
        firmware_validate(pdh, signed.signing_key()) == Status.INVALID_CERTIFICATE
    )  # OCA may not sign a PDH
