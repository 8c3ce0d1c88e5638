"""The platform, owner and verify-chain commands, as a platform owner and a guest owner use them."""

from __future__ import annotations

import json

import pytest

from sevsim.certs.chain import decode_chain
from sevsim.certs.sev import CERT_SIZE, SevCert, Usage
from sevsim.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEVSIM_STATE", str(tmp_path / "platform"))
    monkeypatch.setenv("SEVSIM_PROFILE", "rome")
    return tmp_path


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def run_json(args, capsys):
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_status_get_id_and_export(env, capsys):
    st = run_json(["platform", "status"], capsys)
    assert st["profile"] == "rome" and st["state"] == "INIT" and st["owner"] == "self"
    assert (st["api_major"], st["api_minor"], st["build"]) == (0, 24, 15)
    chip = run_json(["platform", "get-id"], capsys)["chip_id"]
    assert chip == st["chip_id"] and len(bytes.fromhex(chip)) == 64
    r = run_json(["platform", "export", str(env / "chain.cert")], capsys)
    assert r["bytes"] == 4 * CERT_SIZE
    chain = decode_chain((env / "chain.cert").read_bytes())
    assert chain.cek.signers()[0] == Usage.ASK  # the KDS-signed CEK, as sevctl exports
    r = run_json(["platform", "export", "--full", str(env / "full.cert")], capsys)
    assert r["bytes"] == 4 * CERT_SIZE + 2 * 1600
    code, out, _ = run(["verify-chain", str(env / "full.cert")], capsys)
    assert code == 0 and "The chain verifies" in out
    v = run_json(["verify-chain", str(env / "chain.cert"), "--root", "sim:rome"], capsys)
    assert v["ok"] and len(v["links"]) == 7


def test_verify_chain_reports_the_broken_link_and_exit_codes(env, capsys):
    run_json(["platform", "export", str(env / "chain.cert")], capsys)
    data = bytearray((env / "chain.cert").read_bytes())
    data[3 * CERT_SIZE + 0x30] ^= 1  # a byte of the CEK's key
    (env / "bad.cert").write_bytes(bytes(data))
    code, out, _ = run(["verify-chain", str(env / "bad.cert"), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    failed = [(link["subject"], link["check"]) for link in report["links"] if not link["ok"]]
    assert ("CEK", "signed by the ASK") in failed
    code, _, err = run(["verify-chain", str(env / "chain.cert"), "--root", "milan"], capsys)
    assert code == 1  # a simulated Rome chip does not chain to AMD's real Milan root
    (env / "short.cert").write_bytes(b"\0" * 100)
    code, _, err = run(["verify-chain", str(env / "short.cert")], capsys)
    assert code == 2 and err.count("\n") == 1 and "8336 bytes" in err


def test_real_amd_chain_verifies_from_the_command_line(tmp_path, capsys):
    from conftest import TESTDATA

    d = TESTDATA / "amd-sev-certs" / "milan"
    chain = b"".join((d / f"{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek"))
    (tmp_path / "milan.cert").write_bytes(chain)
    code, out, _ = run(["verify-chain", str(tmp_path / "milan.cert"), "--root", "milan"], capsys)
    assert code == 0 and out.count("✔") == 7


def test_take_ownership_with_provision(env, capsys):
    ca = run_json(["platform", "ca", "--out", str(env / "ca")], capsys)
    assert (env / "ca" / "oca.key").stat().st_mode & 0o777 == 0o600
    run_json(["platform", "provision", ca["oca_cert"], ca["oca_key"]], capsys)
    assert run_json(["platform", "status"], capsys)["owner"] == "external"
    run_json(["platform", "export", str(env / "owned.cert")], capsys)
    chain = decode_chain((env / "owned.cert").read_bytes())
    assert chain.oca == SevCert.parse((env / "ca" / "oca.cert").read_bytes())
    code, out, _ = run(["verify-chain", str(env / "owned.cert")], capsys)
    assert code == 0
    code, _, err = run(["platform", "provision", ca["oca_cert"], ca["oca_key"]], capsys)
    assert code == 1 and "ALREADY_OWNED" in err and "pek-gen" in err
    run_json(["platform", "pek-gen"], capsys)
    assert run_json(["platform", "status"], capsys)["owner"] == "self"


def test_take_ownership_step_by_step(env, capsys):
    ca = run_json(["platform", "ca", "--out", str(env / "ca")], capsys)
    run_json(["platform", "pek-csr", str(env / "pek.csr")], capsys)
    code, out, err = run(
        [
            "owner",
            "sign-csr",
            str(env / "pek.csr"),
            "--ca-cert",
            ca["oca_cert"],
            "--ca-key",
            ca["oca_key"],
            "--out",
            str(env / "pek.cert"),
        ],
        capsys,
    )
    assert code == 0, err
    run_json(["platform", "pek-import", str(env / "pek.cert"), ca["oca_cert"]], capsys)
    assert run_json(["platform", "status"], capsys)["owner"] == "external"


def test_rotation_and_reset(env, capsys):
    run_json(["platform", "export", str(env / "a.cert")], capsys)
    r = run_json(["platform", "pdh-gen"], capsys)
    run_json(["platform", "export", str(env / "b.cert")], capsys)
    a, b = (decode_chain((env / n).read_bytes()) for n in ("a.cert", "b.cert"))
    assert a.pdh != b.pdh and a.pek == b.pek and r["pdh_fingerprint"]
    run_json(["platform", "reset"], capsys)
    run_json(["platform", "export", str(env / "c.cert")], capsys)
    c = decode_chain((env / "c.cert").read_bytes())
    assert c.pek != b.pek and c.cek == b.cek


def test_reset_with_an_nv_file_explains_what_it_keeps(env, capsys):
    nv = env / "nv.bin"
    code, out, _ = run(["platform", "reset", "--nv-file", str(nv)], capsys)
    assert code == 0 and "NV file" in out


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["platform", "status", "--profile", "zen7"], 2),
        (["platform", "pek-import", "/nonexistent", "/nonexistent"], 2),
        (["platform", "frob"], 2),
        (["owner", "sign-csr", "/nonexistent"], 2),
    ],
)
def test_bad_arguments(env, capsys, args, code):
    got, out, err = run(args, capsys)
    assert got == code and err.count("\n") == 1 and "Traceback" not in err


def test_a_busy_platform_is_a_clear_error(env, capsys):
    from sevsim.paths import default_state_dir
    from sevsim.platform import Platform
    from sevsim.profiles import ROME

    holder = Platform(ROME, state_dir=default_state_dir("rome"))
    try:
        code, _, err = run(["platform", "status"], capsys)
    finally:
        holder.close()
    assert code == 1 and "in use by another process" in err


def test_the_kds_keeps_only_the_chips_that_still_exist(tmp_path):
    """A platform with a state directory is registered on disk until that directory is
    gone; a platform without one is known to the process while it exists, never on disk."""
    import gc
    import shutil

    from sevsim.amd.kds import KeyDistributionService, UnknownChip
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    data, kds = tmp_path / "data", tmp_path / "data" / "kds"
    profile = get_profile("naples").with_(dram_size=1 << 30)  # RSA-2048 roots: quick to make

    def cached() -> set[str]:
        return {p.stem for p in kds.glob("*.json")}

    with HostSystem.start(profile, state_dir=tmp_path / "one", data_dir=data) as one:
        first = one.export_chain()
        one_id = one.chip_id().hex()
        assert one.export_chain().encode() == first.encode()  # signed once, then served
    assert cached() == {one_id} and (kds / f"{one_id}.cek").exists()
    (kds / "0123abcd.json").write_text('{"generation": "naples", "cek": "00"}')  # older sevsim
    shutil.rmtree(tmp_path / "one")  # a temporary platform, gone
    with HostSystem.start(profile, state_dir=tmp_path / "two", data_dir=data) as two:
        two_id = two.chip_id().hex()
    assert cached() == {two_id} and sorted(p.name for p in kds.iterdir()) == [f"{two_id}.json"]
    with HostSystem.start(profile.with_(seed=11), data_dir=data) as throwaway:
        chip = throwaway.chip_id()
        chain = throwaway.export_chain(full=True)
        assert chain.cek.signers()[0] == Usage.ASK
        assert throwaway.export_chain().cek == chain.cek
    assert cached() == {two_id}  # nothing of the throwaway chip on disk
    del throwaway
    gc.collect()
    with pytest.raises(UnknownChip):  # and, once it is gone, nothing in memory either
        KeyDistributionService(data).cek_cert(chip)
