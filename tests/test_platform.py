"""The platform as a host uses it: /dev/sev, persistent state across processes, INIT_EX with
an NV file, crash safety, and which secrets the host can and cannot reach."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from conftest import RawMailbox, boot_host, make_platform

import sevsim.fsutil as fsutil_module
from sevsim.api import commands as c
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.chain import verify_chain
from sevsim.fsutil import LockBusy
from sevsim.host.sev import SevIoctl
from sevsim.owner.trust import choose_root
from sevsim.paths import data_dir
from sevsim.platform import PlatformMismatch
from sevsim.psp.persistent import NV_LENGTH


def test_probe_initialises_like_linux():
    with boot_host("milan") as system:
        st = system.sev.platform_status().data["status"]
        assert st.state == PlatformState.INIT and (st.api_major, st.api_minor) == (1, 51)
        assert system.sev.log == ["SEV API:1.51 build:3", "SEV firmware initialized"]
        # The driver's buffers are kernel memory: the mailbox was given C-bit addresses.
        assert system.platform.mailbox.read32(
            system.platform.mailbox.registers["cmdbuff_addr_hi"]
        ) & (system.kernel.me_mask >> 32)


def test_ioctls_return_status_like_the_real_error_field():
    with boot_host("rome") as system:
        dev = system.sev
        assert dev.ioctl(SevIoctl.PEK_CSR, length=0).error == Status.INVALID_LENGTH
        r = dev.ioctl(SevIoctl.PEK_CSR, length=0)
        assert r.ret == -errno.EIO and r.data["length"] == 2084
        assert dev.ioctl(SevIoctl.GET_ID2).data["length"] == 64
        assert dev.ioctl(SevIoctl.GET_ID).ret == -errno.EINVAL  # the deprecated one
        assert dev.pdh_cert_export(pdh_length=0, chain_length=0).data == {
            "pdh_length": 2084,
            "chain_length": 6252,
        }
        assert dev.ioctl(SevIoctl.PDH_GEN).ok
        reset = dev.ioctl(SevIoctl.FACTORY_RESET)  # INIT: the driver shuts down first
        assert reset.ok and dev.platform_status().data["status"].state == PlatformState.UNINIT
        assert dev.ioctl(SevIoctl.PEK_GEN).ok  # UNINIT: the driver initialises first
        assert dev.state == PlatformState.INIT


def test_exported_chain_verifies_for_every_generation():
    for name in ("naples", "rome", "milan", "genoa"):
        with boot_host(name) as system:
            chain = system.export_chain(full=True)
            report = verify_chain(chain, choose_root(chain, "sim", data_dir()))
            assert report.ok, (name, report.first_failure())
            assert report.root == f"simulated AMD {name}"
            assert chain.ark.bits == (2048 if name == "naples" else 4096)


def test_state_directory_keeps_the_identity_and_reset_changes_it(tmp_path):
    state = tmp_path / "plat"
    with boot_host("milan", seed=None, state_dir=state) as system:
        first = system.export_chain()
        chip = system.chip_id()
    with boot_host("milan", seed=None, state_dir=state) as system:
        assert system.export_chain() == first and system.chip_id() == chip
        assert system.sev.factory_reset().ok
    with boot_host("milan", seed=None, state_dir=state) as system:
        after = system.export_chain()
        assert system.chip_id() == chip and after.cek == first.cek  # same chip
        assert after.pek != first.pek and after.pdh != first.pdh  # new OCA, PEK, PDH


def test_a_state_directory_serves_one_process_and_one_profile(tmp_path):
    state = tmp_path / "plat"
    holder = make_platform("milan", state_dir=state)
    with pytest.raises(LockBusy):
        fsutil_module.FileLock(state / ".lock", timeout=0.2, what="platform")
    holder.close()
    with pytest.raises(PlatformMismatch):
        make_platform("rome", state_dir=state)


def test_identity_persists_across_processes(tmp_path):
    env = dict(os.environ, SEVSIM_STATE=str(tmp_path / "plat"), SEVSIM_PROFILE="rome")
    run = [sys.executable, "-m", "sevsim", "platform"]
    out = [tmp_path / "a.cert", tmp_path / "b.cert"]
    for path in out:
        subprocess.run([*run, "export", str(path)], env=env, check=True, capture_output=True)
    assert out[0].read_bytes() == out[1].read_bytes()
    status = subprocess.run(
        [*run, "status", "--json"], env=env, check=True, capture_output=True, text=True
    )
    assert json.loads(status.stdout)["owner"] == "self"


def test_crash_between_write_and_rename_keeps_the_old_state(tmp_path, monkeypatch):
    state = tmp_path / "plat"
    with boot_host("milan", seed=None, state_dir=state) as system:
        before = system.export_chain()

    def crash(*_args):
        raise OSError("power lost before the rename")

    with boot_host("milan", seed=None, state_dir=state) as system:
        monkeypatch.setattr(fsutil_module.os, "replace", crash)
        result = system.sev.pdh_gen()
        monkeypatch.undo()
        assert result.error == Status.HWERROR_PLATFORM  # the flash write failed
        assert system.export_chain().pdh == before.pdh  # the firmware kept the old PDH
    assert not [p for p in state.iterdir() if ".tmp." in p.name]
    with boot_host("milan", seed=None, state_dir=state) as system:
        assert system.export_chain() == before  # the old state is intact and readable


def test_corrupt_flash_gives_secure_data_invalid(tmp_path):
    state = tmp_path / "plat"
    with boot_host("milan", seed=None, state_dir=state):
        pass
    blob = bytearray((state / "spi.bin").read_bytes())
    blob[40] ^= 1
    (state / "spi.bin").write_bytes(bytes(blob))
    platform = make_platform("milan", seed=None, state_dir=state)
    mb = RawMailbox(platform)
    assert mb.init() == Status.SECURE_DATA_INVALID
    platform.close()


def test_init_ex_keeps_the_identity_in_the_nv_file(tmp_path):
    nv = tmp_path / "sev_init_ex.bin"
    with boot_host("genoa", nv_file=nv) as system:
        first = system.export_chain()
    data = nv.read_bytes()
    assert len(data) == NV_LENGTH and data.startswith(b"SEVSIMNV")
    assert first.pdh.raw not in data  # sealed: the host keeps it but cannot read it
    with boot_host("genoa", nv_file=nv) as system:
        assert system.export_chain() == first
        assert system.sev.pdh_gen().ok  # the driver writes the buffer back to the file
    with boot_host("genoa", nv_file=nv) as system:
        assert system.export_chain().pdh != first.pdh
    with boot_host("genoa") as system:  # the SPI flash of a fresh chip knows nothing of it
        assert system.export_chain().pek != first.pek


def test_corrupt_nv_file_is_erased_and_init_retried(tmp_path):
    nv = tmp_path / "nv.bin"
    with boot_host("genoa", nv_file=nv) as system:
        first = system.export_chain()
    blob = bytearray(nv.read_bytes())
    blob[100] ^= 0xFF
    nv.write_bytes(bytes(blob))
    with boot_host("genoa", nv_file=nv) as system:
        assert any("SECURE_DATA_INVALID" in line for line in system.sev.log)
        assert system.export_chain().pek != first.pek  # a new identity after the erase


def test_init_ex_field_checks():
    mb = RawMailbox(make_platform("genoa"))

    def init_ex(**fields):
        return mb.cmd(Command.INIT_EX, c.INIT_EX.build(**fields))[0]

    assert init_ex(length=0x28) == Status.INVALID_LENGTH
    assert init_ex(length=0x24, nv_paddr=0x40_0800, nv_len=NV_LENGTH) == Status.INVALID_ADDRESS
    assert init_ex(length=0x24, nv_paddr=0x40_0000, nv_len=4096) == Status.INVALID_LENGTH
    assert init_ex(length=0x24, nv_paddr=1 << 49, nv_len=NV_LENGTH) == Status.INVALID_ADDRESS
    overlap = {"flags": 1, "tmr_paddr": 0x40_0000, "tmr_len": 1 << 20}
    assert (
        init_ex(length=0x24, nv_paddr=0x40_0000, nv_len=NV_LENGTH, **overlap)
        == Status.INVALID_ADDRESS
    )
    assert init_ex(length=0x24, nv_paddr=0x40_0000, nv_len=NV_LENGTH) == Status.SUCCESS


def test_no_firmware_private_key_is_reachable_from_host_or_owner(tmp_path):
    """Record every private key the firmware makes (through the inspection port); then
    search everything the host, the owner and the CLI can see for them."""
    from test_memctl import _contains_secret, _reachable

    state = tmp_path / "plat"
    with boot_host("milan", seed=None, state_dir=state) as system:
        psp = system.inspection_port()
        scalars = [v for v in psp.platform_keys().values() if v is not None]  # CEK, OCA, PEK, PDH
        system.export_chain(full=True)
        system.sev.pek_gen()  # a new OCA, PEK and PDH; the old ones must not leak either
        scalars += [v for k, v in psp.platform_keys().items() if k != "cek" and v is not None]
        secrets = [v.to_bytes(48, order) for v in scalars for order in ("little", "big")]
        assert len(scalars) >= 7
        leaks = [type(o).__name__ for o in _reachable(system) if _contains_secret(o, secrets)]
        assert not leaks
        system.kernel.wbinvd_on_all_cpus()
        dram = b"".join(
            system.machine.dram.read(pa, 4096) for pa in system.machine.dram.written_pages()
        )
        assert not any(s in dram for s in secrets)
    files = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    assert not any(s in files or s.hex().encode() in files for s in secrets)
    cli = subprocess.run(
        [sys.executable, "-m", "sevsim", "platform", "status", "--json"],
        env=dict(os.environ, SEVSIM_STATE=str(state)),
        capture_output=True,
        check=True,
    ).stdout
    assert not any(s.hex().encode() in cli for s in secrets)
