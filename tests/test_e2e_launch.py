"""Launch attestation across processes, as it happens for real: a platform, a VM daemon
driven over QMP, and a guest owner who only ever handles files and base64 strings."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import sevsim

from sevsim.host.qmp import QmpClient, QmpError
from sevsim.owner.secret import ready_tag

SECRET = b"correct horse battery staple"
SECRET_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"


def prepare(d: Path, firmware: str, *firmware_args: str) -> str:
    """The firmware image, the platform's chain, and the owner's session for policy 0x1."""
    state = str(d / "platform")
    sevsim("vm", "firmware", firmware, *firmware_args, cwd=d)
    sevsim("platform", "export", "--state", state, "chain.cert", cwd=d)
    sevsim("owner", "session", "--name", "vm", "chain.cert", "0x1", cwd=d)
    return state


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    for pidfile in tmp_path.glob("*.pid"):  # daemons left behind by a failed test
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_launch_attestation_end_to_end(workdir):
    d = workdir
    state = prepare(d, "OVMF.fd")  # 2 MiB
    assert (d / "OVMF.fd").stat().st_size == 2 << 20
    run = sevsim(
        "vm",
        "run",
        "--state",
        state,
        "--bios",
        "OVMF.fd",
        "--memory",
        "64M",
        "--smp",
        "2",
        "--sev-policy",
        "0x1",
        "--dh-cert-file",
        "vm_godh.b64",
        "--session-file",
        "vm_session.b64",
        "--qmp",
        f"unix:{d / 'qmp.sock'}",
        "--console",
        "console.log",
        "--daemonize",
        "--pidfile",
        "vm.pid",
        cwd=d,
    )
    assert run.returncode == 0  # the parent returned once the VM was ready
    pid = int((d / "vm.pid").read_text())
    client = QmpClient(d / "qmp.sock")
    try:
        info = client.execute("query-sev")
        assert info["state"] == "launch-secret"
        assert client.execute("query-status")["status"] == "prelaunch"
        blob = client.execute("query-sev-launch-measure")["data"]
        check = sevsim(
            "owner",
            "measure",
            "--firmware",
            "OVMF.fd",
            "--policy",
            "0x1",
            "--api-major",
            str(info["api-major"]),
            "--api-minor",
            str(info["api-minor"]),
            "--build-id",
            str(info["build-id"]),
            "--tik",
            "vm_tik.bin",
            "--measurement",
            blob,
            "--json",
            cwd=d,
        )
        assert json.loads(check.stdout)["match"] is True
        (d / "secret.txt").write_bytes(SECRET)
        sevsim(
            "owner",
            "secret",
            "--measurement",
            blob,
            "--tik",
            "vm_tik.bin",
            "--tek",
            "vm_tek.bin",
            "--secret",
            "secret.txt",
            "--guid",
            SECRET_GUID,
            "--out-header",
            "header.b64",
            "--out-payload",
            "payload.b64",
            cwd=d,
        )
        header = (d / "header.b64").read_text()
        payload = (d / "payload.b64").read_text()
        bad = bytearray(base64.b64decode(header))
        bad[30] ^= 1
        with pytest.raises(QmpError, match="BAD_MEASUREMENT"):
            client.execute(
                "sev-inject-launch-secret",
                **{"packet-header": base64.b64encode(bytes(bad)).decode(), "secret": payload},
            )
        client.execute("sev-inject-launch-secret", **{"packet-header": header, "secret": payload})
        client.execute("cont")
        log = _wait_for(d / "console.log", "firmware done")
        assert f"secret {SECRET_GUID}" in log
        assert ready_tag(SECRET) in log  # the guest holds the owner's secret
        assert SECRET.decode() not in log
        assert client.execute("query-sev")["state"] == "running"
        client.execute("quit")
    finally:
        client.close()
    _wait_gone(pid)
    # The owner's TEK and TIK appear nowhere but in their own files.
    keys = [(d / "vm_tek.bin").read_bytes(), (d / "vm_tik.bin").read_bytes()]
    traffic = "".join(client.received).encode()
    for key in keys:
        assert key not in traffic and base64.b64encode(key) not in traffic
        for path in d.rglob("*"):
            if path.is_file() and path.name not in ("vm_tek.bin", "vm_tik.bin"):
                assert key not in path.read_bytes(), path


def test_a_wrong_policy_stops_the_launch(workdir):
    d = workdir
    state = prepare(d, "fw.fd", "--size", "64K")
    run = sevsim(
        "vm",
        "run",
        "--state",
        state,
        "--bios",
        "fw.fd",
        "-m",
        "32M",
        "--sev-policy",
        "0x3",
        "--dh-cert-file",
        "vm_godh.b64",
        "--session-file",
        "vm_session.b64",
        cwd=d,
        check=False,
    )
    assert run.returncode == 1
    assert "LAUNCH_START" in run.stderr and "BAD_MEASUREMENT" in run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def _wait_for(path: Path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise AssertionError(f"{path} never said {text!r}")


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the VM process {pid} did not exit after quit")


def _counts(path: Path) -> list[int]:
    text = path.read_text() if path.exists() else ""
    text = text[: text.rfind("\n") + 1]
    return [int(n) for n in re.findall(r"count (?:at )?(\d+)", text)]


def _wait_counts(path: Path, minimum: int = 1, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := _counts(path)) >= minimum:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{path} shows no counting")


def test_migration_and_snapshot_between_two_platform_processes(workdir):
    """Platform A runs a counting guest; it migrates to platform B (another process, over
    loopback TCP); B snapshots it for itself and a third process restores the snapshot."""
    d = workdir
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    sevsim("platform", "export", "--state", "B", "--full", "b.cert", cwd=d)
    common = ["--memory", "32M", "--sev-policy", "0", "--daemonize"]
    sevsim(
        "vm", "run", "--state", "A", "--bios", "fw.fd", *common,
        "--fw-cfg", "name=opt/sevsim/workload,string=count",
        "--qmp", f"unix:{d / 'a.sock'}", "--console", "a.log", "--pidfile", "a.pid", cwd=d,
    )  # fmt: skip
    pids = [int((d / "a.pid").read_text())]
    with closing(QmpClient(d / "a.sock")) as a:  # one QMP client at a time, as in QEMU
        a.execute("cont")
    _wait_counts(d / "a.log")
    with socket.socket() as probe:  # a free port for B
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sevsim(
        "vm", "run", "--state", "B", "--incoming", f"tcp:127.0.0.1:{port}", *common,
        "--qmp", f"unix:{d / 'b.sock'}", "--console", "b.log", "--pidfile", "b.pid", cwd=d,
    )  # fmt: skip
    pids.append(int((d / "b.pid").read_text()))
    moved = sevsim(
        "migrate", "--from", str(d / "a.sock"), "--to", f"tcp:127.0.0.1:{port}",
        "--target-chain", "b.cert", "--json", cwd=d,
    )  # fmt: skip
    assert json.loads(moved.stdout)["status"] == "completed"
    last_on_a = _counts(d / "a.log")[-1]
    on_b = _wait_counts(d / "b.log", minimum=2)
    assert on_b[0] >= last_on_a and on_b[-1] > on_b[0]  # resumed, and counting on B
    with closing(QmpClient(d / "a.sock")) as a:
        assert a.execute("query-status")["status"] == "postmigrate"
        a.execute("quit")
    # A snapshot of the guest on B, for B; B keeps running it.
    snap = sevsim(
        "vm", "snapshot", "--qmp", str(d / "b.sock"), "--target-chain", "b.cert",
        "--out", "guest.snap", "--json", cwd=d,
    )  # fmt: skip
    assert json.loads(snap.stdout)["status"] == "completed"
    with closing(QmpClient(d / "b.sock")) as b:
        assert b.execute("query-status")["status"] == "running"
        b.execute("quit")
    for pid in pids:
        _wait_gone(pid)
    # A tampered snapshot is refused; the real one restores and counts on.
    data = bytearray((d / "guest.snap").read_bytes())
    data[len(data) // 2] ^= 1
    (d / "bad.snap").write_bytes(bytes(data))
    bad = sevsim("vm", "run", "--state", "B", "--restore", "bad.snap", "-m", "32M", cwd=d,
                 check=False)  # fmt: skip
    assert bad.returncode == 1 and "refused" in bad.stderr and "Traceback" not in bad.stderr
    sevsim(
        "vm", "run", "--state", "B", "--restore", "guest.snap", *common,
        "--qmp", f"unix:{d / 'c.sock'}", "--console", "c.log", "--pidfile", "c.pid", cwd=d,
    )  # fmt: skip
    pid_c = int((d / "c.pid").read_text())  # before quit: the VM removes its pidfile
    restored = _wait_counts(d / "c.log", minimum=2)
    assert restored[0] >= on_b[0]
    with closing(QmpClient(d / "c.sock")) as c:
        c.execute("quit")
    _wait_gone(pid_c)


def test_a_vm_driven_over_qmp_on_tcp(workdir):
    """`vm run --qmp tcp:127.0.0.1:0` takes a free port and says which; `vm qmp` and
    `vm snapshot` reach it there, from other processes."""
    d = workdir
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    sevsim("platform", "export", "--state", "P", "--full", "p.cert", cwd=d)
    vm = subprocess.Popen(
        [sys.executable, "-m", "sevsim", "vm", "run", "--state", "P", "--bios", "fw.fd"]
        + ["--memory", "32M", "--sev-policy", "0", "--console", "c.log", "--pidfile", "vm.pid"]
        + ["--fw-cfg", "name=opt/sevsim/workload,string=count"]
        + ["--qmp", "tcp:127.0.0.1:0,server=on,wait=off"],
        cwd=d,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = vm.stderr.readline()
        found = re.search(r"QMP on (tcp:127\.0\.0\.1:(\d+))$", line.strip())
        assert found and int(found[2]) != 0, line
        address = found[1]
        status = sevsim("vm", "qmp", address, "query-status", cwd=d)
        assert json.loads(status.stdout)["status"] == "prelaunch"
        sevsim("vm", "qmp", address, "cont", cwd=d)
        _wait_counts(d / "c.log")
        snap = sevsim(
            "vm", "snapshot", "--qmp", address, "--target-chain", "p.cert",
            "--out", "guest.snap", "--json", cwd=d,
        )  # fmt: skip
        assert json.loads(snap.stdout)["status"] == "completed"
        status = sevsim("vm", "qmp", address, "query-status", cwd=d)
        assert json.loads(status.stdout)["status"] == "running"  # a snapshot leaves it running
        sevsim("vm", "qmp", address, "quit", cwd=d)
        assert vm.wait(30) == 0
        assert not any(p.name.startswith("tcp:") for p in d.iterdir())
    finally:
        vm.kill()
        vm.wait()
        vm.stderr.close()
