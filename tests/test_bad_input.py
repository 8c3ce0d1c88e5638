"""Bad input at the edges: every command that reads a file gets an empty one, random bytes,
a truncated certificate and a directory. One clear line, exit code 1 or 2, no traceback,
and nothing written."""

from __future__ import annotations

import os

import pytest

from sevsim.cli import main

VARIANTS = ["empty", "random", "truncated", "directory"]


@pytest.fixture(scope="module")
def platform_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plat")
    state = d / "state"
    good = d / "chain.cert"
    with pytest.raises(SystemExit):
        main(["platform", "export", "--state", str(state), "--full", str(good)])
    return state, good.read_bytes()


def _bad(tmp_path, variant: str, good: bytes):
    path = tmp_path / f"bad-{variant}"
    if variant == "empty":
        path.write_bytes(b"")
    elif variant == "random":
        path.write_bytes(os.urandom(3000))
    elif variant == "truncated":
        path.write_bytes(good[:1000])
    else:
        path.mkdir()
    return str(path)


def _commands(bad: str, state: str, out: str) -> dict[str, list[str]]:
    return {
        "verify-chain": ["verify-chain", bad],
        "owner session": ["owner", "session", "--name", out, bad, "0x1"],
        "owner measure (firmware)": [
            "owner", "measure", "--firmware", bad, "--policy", "1", "--api-major", "1",
            "--api-minor", "55", "--build-id", "25", "--tik", bad,
        ],
        "owner secret": [
            "owner", "secret", "--measurement", bad, "--tik", bad, "--tek", bad, "--secret", bad,
            "--out-header", out + ".h", "--out-payload", out + ".p",
        ],
        "owner sign-csr": [
            "owner", "sign-csr", bad, "--ca-cert", bad, "--ca-key", bad, "--out", out,
        ],
        "platform pek-import": ["platform", "pek-import", "--state", state, bad, bad],
        "platform provision": ["platform", "provision", "--state", state, bad, bad],
        "vm run (bios)": ["vm", "run", "--state", state, "--bios", bad, "--console", out],
        "vm run (session)": [
            "vm", "run", "--state", state, "--bios", bad, "--dh-cert-file", bad,
            "--session-file", bad, "--console", out,
        ],
        "vm run (restore)": ["vm", "run", "--state", state, "--restore", bad, "--console", out],
        "vm run (disk)": [
            "vm", "run", "--state", state, "--bios", bad, "--disk", bad, "--console", out,
        ],
    }  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_file_reading_command_refuses_bad_files_in_one_line(
    variant, platform_dir, tmp_path, capsys
):
    state, good = platform_dir
    bad = _bad(tmp_path, variant, good)
    out = str(tmp_path / "out")
    for name, args in _commands(bad, str(state), out).items():
        with pytest.raises(SystemExit) as exc:
            main(args)
        stdout, stderr = capsys.readouterr()
        assert exc.value.code in (1, 2), (name, variant, exc.value.code, stdout, stderr)
        assert "Traceback" not in stdout + stderr, (name, variant)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sevsim"), (name, variant, stderr)
        written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))
        assert written == [], (name, variant, written)


# ---- QMP ----------------------------------------------------------------------------------------
WRONG = [None, 1, -1, 2**80, 1.5, True, "", "!!! not base64 !!!", "A" * 100_000, [], {}, [1, 2]]
HARMFUL_WHEN_VALID = {"quit", "cont", "stop", "migrate", "sev-inject-launch-secret"}


def test_every_qmp_command_refuses_malformed_arguments_and_the_server_lives_on(tmp_path):
    import json
    import socket
    import threading

    from test_vmm import config, owner_files

    from sevsim.host.qmp import ARGUMENTS, QmpClient, QmpError, QmpServer
    from sevsim.host.vmm import Vmm
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    host = HostSystem.start(get_profile("rome").with_(seed=3, dram_size=1 << 30), tmp_path / "s")
    owner_files(host, tmp_path, 0x1)
    vmm = Vmm(host, config(tmp_path))
    vmm.start()
    server = QmpServer(vmm, tmp_path / "qmp.sock")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = QmpClient(tmp_path / "qmp.sock")
    try:
        tried = 0
        for name in sorted(server.commands):
            variants: list = [{"bogus": 1}, [], "text", 7]
            for arg in sorted(ARGUMENTS.get(name, ())):
                variants += [{arg: value} for value in WRONG]
            if name not in HARMFUL_WHEN_VALID:
                variants.append({})
            for arguments in variants:
                tried += 1
                try:
                    client.execute(name, **arguments) if isinstance(arguments, dict) else None
                except QmpError:
                    pass  # a QMP error reply: what we want
                if not isinstance(arguments, dict):  # a non-object "arguments", sent raw
                    raw = {"execute": name, "arguments": arguments}
                    client.sock.sendall(json.dumps(raw).encode() + b"\n")
                    assert "error" in client._next()
            assert client.execute("query-status")["status"] == "prelaunch", name
        # Garbage on the wire: errors, not a dead server.
        for junk in (b'"just a string"\n', b"[1, 2]\n", b'{"no": "execute"}\n'):
            client.sock.sendall(junk)
            assert "error" in client._next()
        assert client.execute("query-status")["status"] == "prelaunch"
        assert thread.is_alive() and tried > 150
    finally:
        client.close()
        server.done.set()
        with socket.socket(socket.AF_UNIX) as poke:  # wake the accept loop
            try:
                poke.connect(str(tmp_path / "qmp.sock"))
            except OSError:
                pass
        thread.join(5)
        vmm.quit()
        host.close()


# ---- usage errors at the edges: one line, the option named, nothing started -------------------
def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize(
    "value, why",
    [
        ("banana", "is not a number (decimal or 0x...)"),
        ("0x1zz", "is not a number (decimal or 0x...)"),
        ("0x100000000", "is not a 32-bit policy"),
    ],
)
def test_every_policy_option_refuses_a_bad_policy_in_one_line(value, why, tmp_path, capsys):
    fw = tmp_path / "fw.fd"
    fw.write_bytes(bytes(64 << 10))
    state, out = tmp_path / "state", tmp_path / "out"
    commands = {
        "--sev-policy": [
            "vm", "run", "--state", str(state), "--bios", str(fw), "--sev-policy", value,
        ],
        "POLICY": ["owner", "session", "--dir", str(out), str(fw), value],
        "--policy": [
            "owner", "measure", "--firmware", str(fw), "--policy", value, "--api-major", "1",
            "--api-minor", "55", "--build-id", "25", "--tik", str(fw), "--nonce", "A" * 22 + "==",
        ],
    }  # fmt: skip
    for name, args in commands.items():
        code, stdout, err = _run(args, capsys)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("sevsim "), (name, err)
        assert f"Invalid value for '{name}': '{value}' {why}" in err, (name, err)
        assert "invalid literal" not in err and "Traceback" not in stdout + err
    assert not state.exists() and not out.exists()


def test_the_policy_type_takes_decimal_and_hex():
    from sevsim.cli.options import POLICY

    given = ("0x1", "5", "0X3", " 0x0005 ", 7, "0xffffffff")
    assert [POLICY.convert(v, None, None) for v in given] == [1, 5, 3, 5, 7, 0xFFFF_FFFF]


def test_vm_run_takes_dh_cert_and_session_together_or_not_at_all(tmp_path, capsys):
    fw = tmp_path / "fw.fd"
    fw.write_bytes(bytes(64 << 10))
    godh = tmp_path / "vm_godh.b64"
    godh.write_text("AAAA\n")
    state = tmp_path / "state"
    for flag in ("--dh-cert-file", "--session-file"):
        args = ["vm", "run", "--state", str(state), "--bios", str(fw), flag, str(godh)]
        code, out, err = _run(args, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("sevsim vm run: error: --dh-cert-file and --session-file go together")
    assert not state.exists()  # refused before any platform was started


def test_the_vmm_keeps_its_own_check_of_the_session_files(tmp_path):
    from test_vmm import config

    from sevsim.host.vmm import Vmm, VmmError
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    with HostSystem.start(get_profile("rome").with_(seed=3, dram_size=1 << 30)) as host:
        vmm = Vmm(host, config(tmp_path, session_file=None))
        with pytest.raises(VmmError, match="go together"):
            vmm.start()
        vmm.quit()


@pytest.mark.parametrize("spec", ["nope.sock", "unix:nope.sock", "unix:nope.sock,server=on"])
def test_vm_qmp_names_the_socket_it_cannot_reach(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["vm", "qmp", spec, "query-status"], capsys)
    assert code == 1 and out == ""
    assert (
        err == "sevsim: error: cannot connect to QMP socket nope.sock: No such file or directory\n"
    )
    (tmp_path / "nope.sock").write_text("")  # a path, but nobody listening
    code, out, err = _run(["vm", "qmp", spec, "query-status"], capsys)
    assert code == 1 and err.startswith("sevsim: error: cannot connect to QMP socket nope.sock: ")
    assert err.count("\n") == 1


def test_verify_chain_says_first_what_is_wrong_with_the_input(platform_dir, tmp_path, capsys):
    from sevsim.certs.sev import CERT_SIZE

    _, good = platform_dir  # a full chain: PDH, PEK, OCA, CEK, ASK, ARK
    pdh, pek = good[:CERT_SIZE], good[CERT_SIZE : 2 * CERT_SIZE]
    files = {
        "random, a chain's size": (os.urandom(4 * CERT_SIZE), "first certificate is not an SEV"),
        "random, longer": (os.urandom(12000), "first certificate is not an SEV certificate"),
        "zeros": (bytes(4 * CERT_SIZE), "first certificate is not an SEV certificate (version 0"),
        "PEK first": (pek + pdh + good[2 * CERT_SIZE :], "first certificate is not a PDH (its"),
        "short": (good[:100], "too short for a chain"),
    }
    for name, (data, says) in files.items():
        path = tmp_path / "chain.cert"
        path.write_bytes(data)
        with pytest.raises(SystemExit) as exc:
            main(["verify-chain", str(path)])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and out == "", (name, out)
        assert err.count("\n") == 1 and says in err, (name, err)
        assert "AMD" not in err and "✘" not in err, (name, err)  # no root was guessed
