"""Crash safety: a fault at every write step leaves the old or the new state, never a mix."""

from __future__ import annotations

import errno
import os
import types

import pytest

from sevsim import fsutil

STEPS = ["open", "write", "fsync", "replace"]


class Killed(BaseException):
    """The process dies here (nothing after this point runs)."""


def faulty_os(kind: str, step: str, short_at: int = 1):
    """``os`` for fsutil, failing at one step: disk full (ENOSPC), killed, or a write
    that stops short and then finds the disk full."""
    calls = {"write": 0}

    def fail(name, real):
        def call(*args, **kwargs):
            if name == "write":
                calls["write"] += 1
                if kind == "short" and calls["write"] == short_at:
                    fd, data = args
                    return real(fd, bytes(data)[: max(1, len(data) // 2)])
            if name == step:
                if kind == "killed":
                    raise Killed(step)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return call

    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for name in STEPS:
        setattr(fake, name, fail(name, getattr(os, name)))
    return fake


@pytest.mark.parametrize("kind", ["disk-full", "killed", "short"])
@pytest.mark.parametrize("step", STEPS)
def test_atomic_write_leaves_the_old_or_the_new_content(tmp_path, monkeypatch, kind, step):
    target = tmp_path / "state.bin"
    old, new = b"old state " * 1000, b"new state " * 2000
    target.write_bytes(old)
    monkeypatch.setattr(fsutil, "os", faulty_os(kind, step))
    try:
        fsutil.atomic_write(target, new)
    except (OSError, Killed):
        pass
    monkeypatch.setattr(fsutil, "os", os)
    assert target.read_bytes() in (old, new)
    if kind != "short" or step == "write":  # a short write alone is finished by the loop
        assert target.read_bytes() == old  # the write never completed
    # A failure cleans its temporary file; a killed process leaves one behind, unused.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.bin"]
    assert leftovers == [] or (kind == "killed" and step in ("write", "fsync", "replace"))


@pytest.mark.parametrize("kind", ["disk-full", "killed"])
@pytest.mark.parametrize("step", STEPS)
def test_the_platform_state_survives_a_fault_while_it_is_saved(tmp_path, monkeypatch, kind, step):
    """PDH_GEN rewrites the sealed platform state in the SPI flash file; a fault at any
    step of that write leaves a platform that starts again with the old or the new PDH."""
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    profile = get_profile("milan").with_(seed=17, dram_size=1 << 30)
    state = tmp_path / "platform"
    with HostSystem.start(profile, state_dir=state) as system:
        old = system.export_chain().pdh.raw
    system = HostSystem.start(profile, state_dir=state)
    try:
        monkeypatch.setattr(fsutil, "os", faulty_os(kind, step))
        try:
            system.sev.pdh_gen()
        except (OSError, Killed):
            pass
        monkeypatch.setattr(fsutil, "os", os)
        new = system.export_chain().pdh.raw
    finally:
        system.close()
    with HostSystem.start(profile, state_dir=state) as again:
        after = again.export_chain().pdh.raw
    assert after in (old, new)


def test_without_a_fault_the_new_platform_state_is_what_comes_back(tmp_path):
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    profile = get_profile("milan").with_(seed=17, dram_size=1 << 30)
    state = tmp_path / "platform"
    with HostSystem.start(profile, state_dir=state) as system:
        old = system.export_chain().pdh.raw
        system.sev.pdh_gen()
        new = system.export_chain().pdh.raw
    with HostSystem.start(profile, state_dir=state) as again:
        assert again.export_chain().pdh.raw == new != old


# ---- snapshots ---------------------------------------------------------------------------------
class FaultyFile:
    """A snapshot file that fails (disk full) or dies (killed) at its n-th write."""

    def __init__(self, real, kind: str, at: int, counter: dict) -> None:
        self._real, self._kind, self._at, self._counter = real, kind, at, counter

    def write(self, data):
        self._counter["writes"] += 1
        if self._counter["writes"] == self._at:
            if self._kind == "killed":
                raise Killed("write")
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)


def test_a_snapshot_that_hits_a_full_disk_leaves_no_file_and_the_guest_running(
    tmp_path, monkeypatch
):
    from test_migration import FIRMWARE, MEMORY, chain_of, counts, guest_state, wait_for

    from sevsim.host import migration
    from sevsim.host.vmm import VmConfig, Vmm
    from sevsim.profiles import get_profile
    from sevsim.system import HostSystem

    system = HostSystem.start(
        get_profile("milan").with_(seed=23, dram_size=2 << 30), state_dir=tmp_path / "p"
    )
    (tmp_path / "fw.fd").write_bytes(FIRMWARE)
    vmm = Vmm(
        system,
        VmConfig(
            firmware=tmp_path / "fw.fd",
            memory=MEMORY,
            policy=0,
            console=tmp_path / "c.log",
            fw_cfg_files={"opt/sevsim/workload": b"count"},
        ),
    )
    try:
        vmm.target = chain_of(system)  # before the guest runs: the host must not share its core
        vmm.start()
        vmm.cont()
        wait_for(lambda: len(counts(vmm.console_text())) >= 2)
        snap = tmp_path / "guest.snap"
        # How many writes a whole snapshot takes, to pick the failure points.
        counter = {"writes": 0}
        real_open = open
        monkeypatch.setattr(
            migration,
            "open",
            lambda *a, **k: FaultyFile(real_open(*a, **k), "none", 0, counter),
            raising=False,
        )
        vmm.migrate(f"file:{tmp_path / 'probe.snap'}", wait=True)
        total = counter["writes"]
        assert vmm.query_migrate()["status"] == "completed" and total > 3
        (tmp_path / "probe.snap").unlink()
        for at in sorted({1, 2, total // 3, total // 2, total - 1, total}):
            counter = {"writes": 0}
            monkeypatch.setattr(
                migration,
                "open",
                lambda *a, _at=at, _c=counter, **k: FaultyFile(
                    real_open(*a, **k), "disk-full", _at, _c
                ),
                raising=False,
            )
            vmm.migrate(f"file:{snap}", wait=True)  # the disk fills up at write ``at``
            assert vmm.query_migrate()["status"] == "failed", at
            assert not snap.exists(), at
            assert vmm.status == "running" and guest_state(vmm) == 3, at
            before = counts(vmm.console_text())[-1]
            wait_for(lambda b=before: counts(vmm.console_text())[-1] > b)  # still counting
        monkeypatch.setattr(migration, "open", real_open, raising=False)
        vmm.migrate(f"file:{snap}", wait=True)
        assert vmm.query_migrate()["status"] == "completed" and snap.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".guest")] == []
    finally:
        vmm.quit()
        system.close()
