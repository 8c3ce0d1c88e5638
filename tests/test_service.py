"""The platform service: many VM processes on one platform (real processes, real sockets),
and the rule that only one activity at a time runs on the silicon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import sevsim

from sevsim.host.qmp import QmpClient
from sevsim.owner.secret import ready_tag
from sevsim.platform.client import ServiceClient
from sevsim.soc.turns import Turns

SECRET_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"


def _kill_pidfiles(*paths: Path) -> None:
    for pidfile in paths:
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def platform(tmp_path):
    """A platform service on its own state directory, stopped after the test."""
    state = tmp_path / "P"
    sevsim("platform", "serve", "--state", str(state), "--daemonize", cwd=tmp_path)
    yield state
    sevsim("platform", "stop", "--state", str(state), cwd=tmp_path, check=False)
    _kill_pidfiles(*tmp_path.glob("*.pid"), state / "platform.pid")


def service_status(state: Path) -> dict:
    client = ServiceClient.connect(state)
    assert client is not None, "no platform service"
    try:
        return client.request("status")
    finally:
        client.close()


def _wait(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _said(log: Path, text: str) -> str:
    content = log.read_text() if log.exists() else ""
    return content if text in content else ""


def _counting(log: Path) -> int:
    """How many "count N" lines the guest printed."""
    text = log.read_text() if log.exists() else ""
    return len(re.findall(r"^sevsim-guest: count \d+$", text, re.MULTILINE))


def run_vm(d: Path, state: Path, name: str, *extra: str) -> int:
    """A daemonized VM process with QMP on NAME.sock, console NAME.log; returns its pid."""
    sevsim(
        "vm", "run", "--state", str(state), "--bios", "fw.fd", "--memory", "32M",
        "--qmp", f"unix:{d / (name + '.sock')}", "--console", f"{name}.log",
        "--daemonize", "--pidfile", f"{name}.pid", *extra, cwd=d,
    )  # fmt: skip
    return int((d / f"{name}.pid").read_text())


def test_eight_vms_each_with_its_owner_on_one_platform(tmp_path, platform):
    """Eight VM processes on one platform service, each launched with its own owner's
    session, measured, given its own secret, running, and quitting; platform commands
    go through the service meanwhile."""
    d = tmp_path
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    sevsim("platform", "export", "--state", str(platform), "chain.cert", cwd=d)
    pids = []
    for i in range(8):
        sevsim("owner", "session", "--name", f"vm{i}", "chain.cert", "0x1", cwd=d)
        pids.append(
            run_vm(
                d,
                platform,
                f"vm{i}",
                "--sev-policy",
                "0x1",
                "--dh-cert-file",
                f"vm{i}_godh.b64",
                "--session-file",
                f"vm{i}_session.b64",
            )  # fmt: skip
        )
    status = json.loads(
        sevsim("platform", "status", "--state", str(platform), "--json", cwd=d).stdout
    )
    assert status["guest_count"] == 8 and status["state"] == "WORKING"
    again = sevsim("platform", "export", "--state", str(platform), "again.cert", cwd=d)
    assert again.returncode == 0
    assert (d / "again.cert").read_bytes() == (d / "chain.cert").read_bytes()
    asids = set()
    for i in range(8):
        with closing(QmpClient(d / f"vm{i}.sock")) as qmp:
            info = qmp.execute("query-sev")
            assert info["state"] == "launch-secret"
            asids.add(info["handle"])
            blob = qmp.execute("query-sev-launch-measure")["data"]
            check = sevsim(
                "owner", "measure", "--firmware", "fw.fd", "--policy", "0x1",
                "--api-major", str(info["api-major"]), "--api-minor", str(info["api-minor"]),
                "--build-id", str(info["build-id"]), "--tik", f"vm{i}_tik.bin",
                "--measurement", blob, "--json", cwd=d,
            )  # fmt: skip
            assert json.loads(check.stdout)["match"] is True
            (d / f"secret{i}.txt").write_bytes(b"secret of guest %d" % i)
            sevsim(
                "owner", "secret", "--measurement", blob, "--tik", f"vm{i}_tik.bin",
                "--tek", f"vm{i}_tek.bin", "--secret", f"secret{i}.txt", "--guid", SECRET_GUID,
                "--out-header", f"h{i}.b64", "--out-payload", f"p{i}.b64", cwd=d,
            )  # fmt: skip
            qmp.execute(
                "sev-inject-launch-secret",
                **{
                    "packet-header": (d / f"h{i}.b64").read_text(),
                    "secret": (d / f"p{i}.b64").read_text(),
                },
            )
            qmp.execute("cont")
    assert len(asids) == 8  # eight guests, eight firmware handles
    for i in range(8):
        log = _wait(lambda i=i: _said(d / f"vm{i}.log", "firmware done"), f"vm{i} to finish")
        assert ready_tag(b"secret of guest %d" % i) in log  # its own owner's secret
        for j in range(8):
            if j != i:
                assert ready_tag(b"secret of guest %d" % j) not in log
    for i in range(8):
        with closing(QmpClient(d / f"vm{i}.sock")) as qmp:
            qmp.execute("quit")
    for pid in pids:
        _wait(lambda pid=pid: _gone(pid), f"VM process {pid} to exit")
    after = service_status(platform)
    assert after["vms"] == [] and after["asids_in_use"] == []
    assert len(after["asids_to_reclaim"]) == 8  # freed, awaiting WBINVD + DF_FLUSH


def test_a_killed_vm_process_frees_its_asid_and_memory(tmp_path, platform):
    d = tmp_path
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    count = ("--sev-policy", "0", "--fw-cfg", "name=opt/sevsim/workload,string=count")
    pids = [run_vm(d, platform, f"vm{i}", *count) for i in range(3)]
    for i in range(3):
        with closing(QmpClient(d / f"vm{i}.sock")) as qmp:
            qmp.execute("cont")
    for i in range(3):
        _wait(lambda i=i: _counting(d / f"vm{i}.log") >= 2, f"vm{i} to count")
    before = service_status(platform)
    assert len(before["vms"]) == 3 and len(before["asids_in_use"]) == 3
    taken = sevsim(
        "vm", "run", "--state", str(platform), "--bios", "fw.fd", "-m", "32M", "--name", "vm-2",
        cwd=d, check=False,
    )  # fmt: skip
    assert taken.returncode == 1 and taken.stderr.count("\n") == 1
    assert "a VM named 'vm-2' already runs on this platform" in taken.stderr
    os.kill(pids[1], signal.SIGKILL)

    def torn_down() -> dict | None:
        status = service_status(platform)
        return status if len(status["vms"]) == 2 else None

    after = _wait(torn_down, "the service to tear the guest down")
    (victim_asid,) = set(before["asids_in_use"]) - set(after["asids_in_use"])
    assert victim_asid not in after["asids_in_use"] and victim_asid in after["asids_to_reclaim"]
    assert after["host_free_bytes"] - before["host_free_bytes"] >= 32 << 20  # its RAM is back
    counts = [_counting(d / f"vm{i}.log") for i in (0, 2)]
    for i, seen in zip((0, 2), counts, strict=True):  # the others count on
        _wait(lambda i=i, seen=seen: _counting(d / f"vm{i}.log") > seen + 1, f"vm{i} to go on")
        with closing(QmpClient(d / f"vm{i}.sock")) as qmp:
            assert qmp.execute("query-status")["status"] == "running"


def test_the_service_dies_its_vms_say_so_and_a_restart_finds_the_sealed_state(tmp_path):
    d = tmp_path
    state = d / "P"
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    sevsim("platform", "serve", "--state", str(state), "--daemonize", cwd=d)
    refused = sevsim("platform", "serve", "--state", str(state), cwd=d, check=False)
    assert refused.returncode == 1 and "already runs" in refused.stderr
    assert refused.stderr.count("\n") == 1
    sevsim("platform", "export", "--state", str(state), "before.cert", cwd=d)
    vm = subprocess.Popen(
        [
            sys.executable, "-m", "sevsim", "vm", "run", "--state", str(state),
            "--bios", "fw.fd", "--memory", "32M", "--sev-policy", "0",
            "--qmp", f"unix:{d / 'vm.sock'}", "--console", "vm.log",
        ],
        cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        _wait(lambda: (d / "vm.sock").exists(), "the VM's QMP socket")
        service_pid = int((state / "platform.pid").read_text())
        os.kill(service_pid, signal.SIGKILL)
        _, err = vm.communicate(timeout=30)
    finally:
        vm.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert vm.returncode == 1 and "Traceback" not in err
    assert lines[-1] == f"sevsim vm: the platform service of {state} ended; the guest is gone"
    assert not (d / "vm.sock").exists()
    # A new service on the same state directory: the same chip, the same sealed keys.
    sevsim("platform", "serve", "--state", str(state), "--daemonize", cwd=d)
    try:
        sevsim("platform", "export", "--state", str(state), "after.cert", cwd=d)
        assert (d / "after.cert").read_bytes() == (d / "before.cert").read_bytes()
    finally:
        sevsim("platform", "stop", "--state", str(state), cwd=d, check=False)


def test_vm_run_starts_a_service_that_leaves_when_idle(tmp_path):
    """A single `vm run` works as before: it starts a service in the background, which
    ends by itself once no VM is left."""
    d = tmp_path
    sevsim("vm", "firmware", "fw.fd", "--size", "64K", cwd=d)
    out = sevsim(
        "vm", "run", "--state", "P", "--bios", "fw.fd", "-m", "32M", "--sev-policy", "0",
        "--json", cwd=d,
    )  # fmt: skip
    assert "firmware done" in json.loads(out.stdout)["console"]
    gone = ("platform.sock", "platform.pid")  # it cleans up after itself
    _wait(lambda: not any((d / "P" / f).exists() for f in gone), "the idle service to leave", 30)


# ---- one activity at a time on the silicon ----------------------------------------------------
def test_turns_are_granted_in_arrival_order():
    turns, order = Turns(), []
    turns.acquire()
    waiting = []
    for name in "ABC":
        t = threading.Thread(
            target=lambda n=name: (turns.acquire(), order.append(n), turns.release())
        )
        t.start()
        waiting.append(t)
        queued = len(waiting)
        _wait(lambda n=queued: len(turns._queue) == n, "the thread to queue", 5)
    turns.release()
    for t in waiting:
        t.join(5)
    assert order == ["A", "B", "C"]


def test_a_thread_that_asks_again_queues_behind_the_others():
    turns, order = Turns(), []
    turns.acquire()
    other = threading.Thread(
        target=lambda: (turns.acquire(), order.append("other"), turns.release())
    )
    other.start()
    _wait(lambda: len(turns._queue) == 1, "the other thread to queue", 5)
    turns.release()
    turns.acquire()  # asks again at once: the waiting thread goes first
    order.append("me")
    turns.release()
    other.join(5)
    assert order == ["other", "me"]


def test_two_guests_and_the_host_on_many_threads_never_interleave_on_a_core():
    """Two real-code guests driven from two threads of one host, while a third thread
    reads their memory and asks the firmware for its status: every guest runs to its end
    and no guest's fault surfaces in another thread (all run on core 0)."""
    from conftest import boot_host

    errors: list[BaseException] = []
    with boot_host("milan", seed=7, cores=1) as host:
        vms = [host.start_x86_guest(f"g{i}", workload="loads", policy=0) for i in range(2)]
        results = {}

        def drive(vm):
            try:
                results[vm.name] = vm.vcpus[0].run()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        stop = threading.Event()

        def host_work():
            try:
                while not stop.is_set():
                    for vm in vms:
                        vm.read(0x200000, 64)  # the host's own view (ciphertext)
                    assert host.sev.platform_status().ok
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(vm,)) for vm in vms]
        reader = threading.Thread(target=host_work)
        reader.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        reader.join(30)
        assert errors == []
        assert {r.reason for r in results.values()} == {"DONE"}, results


def test_the_migration_walkthrough_runs_as_written(tmp_path):
    """docs/migration.md's "By hand" commands, run one after another as a user would (only
    the TCP port is swapped for a free one): the last step restores a snapshot on platform
    B while B's migrated guest still runs — two VMs on one platform."""
    import re
    import shlex
    import socket

    d = tmp_path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    block = re.search(r"## By hand\n\n```sh\n(.*?)```", doc, re.S).group(1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines = block.replace("\\\n", " ").replace("4444", str(port)).splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    commands = [c for c in commands if c]
    assert len(commands) == 8 and all(c[0] == "sevsim" for c in commands)
    try:
        for command in commands:
            sevsim(*command[1:], cwd=d)
            if command[1:3] == ["vm", "qmp"]:  # the guest counts on A before it moves
                _wait(lambda: _counting(d / "A" / "vm-console.log") >= 2, "A to count")
        with closing(QmpClient(d / "b.sock")) as b:
            assert b.execute("query-status")["status"] == "running"
        with closing(QmpClient(d / "c.sock")) as c:
            assert c.execute("query-status")["status"] == "running"
        assert len(service_status(d / "B")["vms"]) == 2  # the migrated and the restored guest
        with closing(QmpClient(d / "a.sock")) as a:
            assert a.execute("query-status")["status"] == "postmigrate"
    finally:
        for name in ("a", "b", "c"):
            try:
                with closing(QmpClient(d / f"{name}.sock")) as qmp:
                    qmp.execute("quit")
            except OSError:
                pass
        for state in ("A", "B"):
            sevsim("platform", "stop", "--state", state, cwd=d, check=False)


def test_the_readme_two_vm_example_runs_as_written(tmp_path):
    import re
    import shlex

    d = tmp_path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"Two VMs on one platform:\n\n```sh\n(.*?)```", readme, re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    try:
        for words in filter(None, lines):
            for command in _split_and(words):
                out = sevsim(*command[1:], cwd=d)
                if command[1:3] == ["platform", "status"]:
                    assert "guests" in out.stdout and "2 VMs" in out.stdout
    finally:
        sevsim("platform", "stop", "--state", "P", cwd=d, check=False)
    assert "SEV active" in (d / "P" / "vm-2-console.log").read_text()
    assert "count" in (d / "P" / "vm-console.log").read_text()


def _split_and(words: list[str]) -> list[list[str]]:
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]
