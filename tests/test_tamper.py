"""Single-bit tampering of what crosses the host: refused, and the guest unchanged."""

from __future__ import annotations

import pytest

from sevsim import tamper


@pytest.fixture(scope="module")
def result():
    return tamper.campaign(sample=400, seed=4)


def _offsets(ranges: list[str]) -> list[int]:
    out = []
    for r in ranges:
        a, _, b = r.partition("-")
        out += range(int(a, 16), int(b or a, 16) + 1)
    return out


@pytest.mark.parametrize(
    "name", ["session", "secret-header", "secret-payload", "packet-header", "packet-payload"]
)
def test_every_flip_of_a_protected_structure_is_refused(result, name):
    t = result[name]
    assert t["accepted"] == 0 and t["rejected"] == t["tried"] > 0
    assert t["violations"] == []  # the targeted guest kept its state and memory
    assert set(t["statuses"]) <= {"BAD_MEASUREMENT", "UNSUPPORTED"}


def test_small_structures_are_flipped_exhaustively(result):
    for name, bits in (("session", 1024), ("secret-header", 416), ("packet-header", 416)):
        assert result[name]["tried"] == result[name]["bits"] == bits


def test_godh_flips_are_refused_wherever_the_firmware_reads(result):
    t = result["godh"]
    accepted = _offsets(t["accepted_byte_ranges"])
    # version, usage, algorithm, curve, Qx and Qy: every flip there is refused
    assert not [o for o in accepted if o < 0x4 or 0x8 <= o < 0xA4]
    assert t["statuses"].get("INVALID_CERTIFICATE", 0) + t["statuses"].get("BAD_MEASUREMENT", 0) > 0


def test_chain_flips_verify_only_in_unused_signature_bytes(result):
    t = result["chain"]
    for offset in _offsets(t["accepted_byte_ranges"]):
        cert, inside = divmod(offset, 0x824)
        assert cert < 4, "a flip in the ASK or the ARK verified"
        assert inside >= 0x4AC, f"a flip in a used part of SEV cert {cert} verified ({inside:#x})"
    assert t["rejected"] > t["accepted"]


def test_snapshot_flips_are_refused_and_leave_no_guest(result):
    t = result["snapshot"]
    assert t["tried"] == 400 and t["accepted"] == 0 and t["violations"] == []
