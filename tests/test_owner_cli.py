"""The owner's and the VMM's command lines: published vectors through the CLI, exit codes,
refusals, and a guest run to completion without QMP."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import TESTDATA

from sevsim.api import ovmf
from sevsim.certs.chain import decode_chain
from sevsim.cli import main
from sevsim.guest import x86 as x86_guest

SEVCTL = TESTDATA / "vectors" / "sevctl"
OVMF = SEVCTL / "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"
MEASURED = "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"


def run(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


MEASURE_ARGS = [
    "owner",
    "measure",
    "--firmware",
    str(OVMF),
    "--api-major",
    "1",
    "--api-minor",
    "40",
    "--build-id",
    "40",
    "--tik",
    str(SEVCTL / "measurement" / "tik1.bin"),
]


def test_measure_prints_the_sevctl_vector_and_checks_it(capsys):
    code, out, _ = run(
        [*MEASURE_ARGS, "--policy", "3", "--nonce", "wxP6tRHCFrFQWxsuqZA8QA=="], capsys
    )
    assert code == 0 and out.strip() == MEASURED
    code, out, _ = run([*MEASURE_ARGS, "--policy", "0x3", "--measurement", MEASURED], capsys)
    assert code == 0 and out.startswith("match")
    code, out, _ = run([*MEASURE_ARGS, "--policy", "2", "--measurement", MEASURED], capsys)
    assert code == 1 and "MISMATCH" in out and "the policy" in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--policy", "3"],  # neither --nonce nor --measurement
        ["--policy", "three", "--nonce", "AAAA"],
        ["--policy", "3", "--measurement", "AAAA"],  # 3 bytes, not 48
        ["--policy", "3", "--nonce", "AAAA", "--cmdline", "x"],  # --cmdline without --kernel
    ],
)
def test_measure_bad_input_is_exit_2(extra, capsys):
    code, out, err = run([*MEASURE_ARGS, *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_secret_matches_the_sevctl_vector(tmp_path, capsys):
    code, _, _ = run(
        [
            "owner",
            "secret",
            "--measurement",
            "TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS",
            "--tik",
            str(SEVCTL / "secret" / "tik1.bin"),
            "--tek",
            str(SEVCTL / "secret" / "tek1.bin"),
            "--secret",
            str(SEVCTL / "secret" / "secret1.txt"),
            "--guid",
            "736869e5-84f0-4973-92ec-06879ce3da0b",
            "--iv",
            "rFR07U3TLH2YnsUj2SVZ7A==",
            "--out-header",
            str(tmp_path / "h.b64"),
            "--out-payload",
            str(tmp_path / "p.b64"),
        ],
        capsys,
    )
    assert code == 0
    assert (tmp_path / "h.b64").read_text() == (
        "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q=="
    )
    assert (tmp_path / "p.b64").read_text().startswith("0U3e5PcXv0UW+H4tSBFKOdCYfKE1")


def test_session_refuses_a_chain_that_does_not_verify(tmp_path, capsys):
    state = tmp_path / "p"
    assert (
        run(["platform", "export", "--state", str(state), str(tmp_path / "c.cert")], capsys)[0] == 0
    )
    good = (tmp_path / "c.cert").read_bytes()
    code, out, _ = run(
        ["owner", "session", "--dir", str(tmp_path), "--json", str(tmp_path / "c.cert"), "1"],
        capsys,
    )
    result = json.loads(out)
    assert code == 0 and result["chain_verified_against"].startswith("simulated")
    godh = base64.b64decode((tmp_path / "vm_godh.b64").read_text())
    assert len(godh) == 2084 and len((tmp_path / "vm_tik.bin").read_bytes()) == 16
    assert (tmp_path / "vm_tek.bin").stat().st_mode & 0o077 == 0  # the owner's eyes only
    # A host that substitutes its own PDH: one byte of the key changed.
    forged = bytearray(good)
    forged[0x20] ^= 1
    (tmp_path / "forged.cert").write_bytes(bytes(forged))
    out_dir = tmp_path / "forged"
    code, _, err = run(
        ["owner", "session", "--dir", str(out_dir), str(tmp_path / "forged.cert"), "1"], capsys
    )
    assert code == 1 and "does not verify" in err and not out_dir.exists()
    # A bare PDH (as sevctl takes it) is accepted as it is.
    (tmp_path / "pdh.cert").write_bytes(decode_chain(good).pdh.raw)
    assert (
        run(
            [
                "owner",
                "session",
                "--dir",
                str(tmp_path / "bare"),
                str(tmp_path / "pdh.cert"),
                "0x5",
            ],
            capsys,
        )[0]
        == 0
    )


def test_vm_runs_to_completion_without_qmp(tmp_path, capsys):
    fw = tmp_path / "fw.fd"
    assert run(["vm", "firmware", str(fw), "--size", "64K"], capsys)[0] == 0
    code, out, err = run(
        ["vm", "run", "--state", str(tmp_path / "p"), "--bios", str(fw), "-m", "32M", "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert "SEV active" in result["console"] and "no secret was injected" in result["console"]
    assert len(base64.b64decode(result["measurement"])) == 48
    assert [e["reason"] for e in result["exits"]] == ["DONE"]


def test_vm_firmware_pads_the_guest_image_to_a_flash_size(tmp_path, capsys):
    fw = tmp_path / "fw.fd"
    assert run(["vm", "firmware", str(fw)], capsys)[0] == 0
    image, guest = fw.read_bytes(), x86_guest.image()
    assert len(image) == 2 << 20  # OVMF's size by default
    assert image.endswith(guest) and image[: -len(guest)] == b"\xff" * (len(image) - len(guest))
    table = ovmf.parse_table(image)  # where the VMM and `owner measure` look
    assert ovmf.area(table, ovmf.SEV_SECRET_GUID) == (0x81_0000, 0xC00)
    assert ovmf.area(table, ovmf.SEV_HASH_TABLE_RV_GUID) == (0x81_0C00, 0x400)
    code, _, err = run(["vm", "firmware", str(fw), "--size", "100K"], capsys)
    assert code == 2 and "multiple of 64 KiB" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "lots"], "not a size"),
        (["--daemonize"], "needs --qmp"),
        (["--append", "x"], "go with --kernel"),
        (["--sev-policy", "zero"], "'zero' is not a number (decimal or 0x...)"),
    ],
)
def test_vm_run_bad_input(tmp_path, capsys, args, message):
    fw = tmp_path / "fw.fd"
    run(["vm", "firmware", str(fw), "--size", "64K"], capsys)
    code, _, err = run(
        ["vm", "run", "--state", str(tmp_path / "p"), "--bios", str(fw), *args], capsys
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_vm_run_runs_any_firmware_image_from_the_reset_vector(tmp_path, capsys):
    """No footer table needed, as with QEMU's -bios: 64 KiB of HLT is a firmware that
    halts at its first instruction (the CPU comes out of reset with interrupts off)."""
    fw = tmp_path / "halt.fd"
    fw.write_bytes(b"\xf4" * (64 << 10))
    code, out, err = run(["vm", "run", "--state", str(tmp_path / "p"), "--bios", str(fw)], capsys)
    assert code == 0 and out.startswith("launch measurement: ") and "vCPU stopped" not in out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tcp:127.0.0.1", "tcp:HOST:PORT needs a port"),
        ("tcp:127.0.0.1:99999", "not 0..65535"),
        ("udp:127.0.0.1:4444", "'udp:' is not offered"),
        ("unix:qmp.sock,server=off", "always a listening server"),
        ("unix:qmp.sock,reconnect=1", "'reconnect=1' is not offered"),
    ],
)
def test_bad_qmp_addresses_are_usage_errors_and_create_nothing(
    tmp_path, capsys, monkeypatch, spec, message
):
    """Every command that takes a QMP address: one line, exit 2, no file (until now a
    tcp: address quietly became a Unix socket file called 'tcp:...')."""
    monkeypatch.chdir(tmp_path)
    run(["vm", "firmware", "fw.fd", "--size", "64K"], capsys)
    run(["platform", "export", "--state", "p", "--full", "p.cert"], capsys)
    before = sorted(tmp_path.rglob("*"))
    for args in (
        ["vm", "run", "--state", "q", "--bios", "fw.fd", "--qmp", spec],
        ["vm", "qmp", spec, "query-status"],
        ["vm", "snapshot", "--qmp", spec, "--target-chain", "p.cert", "--out", "s.snap"],
        ["migrate", "--from", spec, "--to", "tcp:127.0.0.1:4444", "--target-chain", "p.cert"],
    ):
        code, out, err = run(args, capsys)
        (line,) = err.strip().splitlines()
        assert code == 2 and message in line and spec in line, (args, err)
        assert "Traceback" not in err and out == ""
        assert sorted(tmp_path.rglob("*")) == before, args
