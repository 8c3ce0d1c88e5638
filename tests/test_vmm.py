"""The QEMU-like VMM and its QMP server, in one process: launch paused, measured direct
boot, secret injection, tampering, and the protocol itself."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto
from sevsim.api import guidtable, ovmf
from sevsim.api import policy as pol
from sevsim.api.status import Status
from sevsim.certs.sev import Algo, SevCert, Usage
from sevsim.guest import x86 as x86_guest
from sevsim.host.kvm import KvmError
from sevsim.host.qmp import (
    QmpAddress,
    QmpAddressError,
    QmpClient,
    QmpError,
    QmpServer,
    parse_qmp_address,
)
from sevsim.host.vmm import FwCfgDevice, VmConfig, Vmm, VmmError
from sevsim.owner import measure, secret, session
from sevsim.profiles import get_profile
from sevsim.system import HostSystem

SECRET_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
FIRMWARE = x86_guest.flash_image(64 << 10)  # small: these tests are about the flow


@pytest.fixture
def host(tmp_path):
    system = HostSystem.start(get_profile("rome").with_(seed=11, dram_size=2 << 30), tmp_path / "s")
    yield system
    system.close()


def owner_files(host: HostSystem, directory: Path, policy: int) -> session.OwnerSession:
    pdh = SevCert.parse(host.sev.pdh_cert_export().data["pdh"])
    owner = session.start(pdh, policy)
    owner.write(directory, "vm")
    return owner


def config(directory: Path, policy: int = 0x1, **changes) -> VmConfig:
    fw = directory / "fw.fd"
    if not fw.exists():
        fw.write_bytes(FIRMWARE)
    values = dict(
        firmware=fw,
        memory=32 << 20,
        policy=policy,
        dh_cert_file=directory / "vm_godh.b64",
        session_file=directory / "vm_session.b64",
        console=directory / "console.log",
    )
    values.update(changes)
    return VmConfig(**values)


def expected_digest(cfg: VmConfig) -> bytes:
    kernel = cfg.kernel.read_bytes() if cfg.kernel else None
    initrd = cfg.initrd.read_bytes() if cfg.initrd else None
    return measure.launch_digest(cfg.firmware.read_bytes(), kernel, initrd, cfg.append)


def packet(owner, measurement: bytes, data: bytes, **kw) -> tuple[str, str]:
    table = guidtable.secrets_table([(SECRET_GUID, data)])
    header, payload = secret.build_packet(owner.tek, owner.tik, measurement[:32], table, **kw)
    return base64.b64encode(header).decode(), base64.b64encode(payload).decode()


def test_measured_direct_boot_with_a_secret(host, tmp_path):
    owner = owner_files(host, tmp_path, 0x1)
    (tmp_path / "vmlinuz").write_bytes(os.urandom(3000))
    (tmp_path / "initrd").write_bytes(os.urandom(5000))
    cfg = config(
        tmp_path,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        append="root=/dev/vda console=ttyS0",
    )
    vmm = Vmm(host, cfg)
    vmm.start()
    assert vmm.query_sev()["state"] == "launch-secret" and vmm.status == "prelaunch"
    major, minor, build = host.sev.api_version
    verdict = measure.check(
        vmm.measurement, owner.tik, major, minor, build, 0x1, expected_digest(cfg)
    )
    assert verdict.ok
    vmm.inject_secret(*packet(owner, vmm.measurement, b"luks passphrase"), gpa=None)
    vmm.cont()
    assert vmm.wait_idle(30)
    log = cfg.console.read_text()
    assert "kernel hashes: cmdline ok, initrd ok, kernel ok" in log
    assert secret.ready_tag(b"luks passphrase") in log
    assert "luks passphrase" not in log  # the guest proves it has the secret, never shows it
    assert vmm.query_sev()["state"] == "running"
    vmm.quit()


def test_a_vmm_that_swaps_the_kernel_is_caught_by_the_guest(host, tmp_path):
    owner_files(host, tmp_path, 0x1)
    (tmp_path / "vmlinuz").write_bytes(b"the kernel the owner measured")
    cfg = config(tmp_path, kernel=tmp_path / "vmlinuz", append="quiet")
    vmm = Vmm(host, cfg)
    vmm.start()
    device = vmm.vm.io_ports[0x510]
    assert isinstance(device, FwCfgDevice)
    device.items[0x11] = b"a kernel with a backdoor!!!!!"  # same size, other bytes
    vmm.cont()
    assert vmm.wait_idle(30)
    log = cfg.console.read_text()
    assert "kernel MISMATCH" in log and "refusing to boot" in log
    assert "cmdline ok, initrd ok" in log  # only the kernel was swapped
    assert "workload" not in log  # nothing ran
    vmm.quit()


def test_a_kernel_without_its_measured_hashes_is_refused(host, tmp_path):
    """A VMM that passes a kernel but overwrites the measured hashes table after the
    launch (what the guest then reads is not the table): the guest boots nothing. The
    host flushes the caches around its write, so that the guest's cached lines of the
    table go and its own write reaches DRAM."""
    owner_files(host, tmp_path, 0x1)
    (tmp_path / "vmlinuz").write_bytes(b"a kernel")
    cfg = config(tmp_path, kernel=tmp_path / "vmlinuz")
    vmm = Vmm(host, cfg)
    vmm.start()
    base, size = ovmf.area(vmm.table, ovmf.SEV_HASH_TABLE_RV_GUID)
    assert (base, size) == (0x81_0C00, 0x400)  # OVMF AmdSev's hashes area
    host.kernel.wbinvd_on_all_cpus()
    vmm.vm.write(base, bytes(size))
    host.kernel.wbinvd_on_all_cpus()
    vmm.cont()
    assert vmm.wait_idle(30)
    log = cfg.console.read_text()
    assert "a kernel was passed but no measured hashes table exists: refusing it" in log
    assert "firmware done; the kernel was NOT booted" in log and "workload" not in log
    vmm.quit()


def test_wrong_policy_fails_launch_start(host, tmp_path):
    owner_files(host, tmp_path, 0x1)  # the owner MACed policy 0x1
    vmm = Vmm(host, config(tmp_path, policy=0x3))
    with pytest.raises(VmmError, match="BAD_MEASUREMENT"):
        vmm.start()
    vmm.quit()
    too_new = pol.make(0, 9, 0)  # needs firmware API 9.0
    owner_files(host, tmp_path, too_new)
    vmm = Vmm(host, config(tmp_path, policy=too_new))
    with pytest.raises(VmmError, match="POLICY_FAILURE"):
        vmm.start()
    vmm.quit()


def test_the_owner_catches_an_altered_firmware_image(host, tmp_path):
    owner = owner_files(host, tmp_path, 0x1)
    altered = bytearray(FIRMWARE)
    altered[100] ^= 1
    (tmp_path / "altered.fd").write_bytes(bytes(altered))
    vmm = Vmm(host, config(tmp_path, firmware=tmp_path / "altered.fd"))
    vmm.start()
    major, minor, build = host.sev.api_version
    honest = measure.launch_digest(FIRMWARE)
    verdict = measure.check(vmm.measurement, owner.tik, major, minor, build, 0x1, honest)
    assert not verdict.ok and any("firmware" in item for item in verdict.checklist)
    vmm.quit()


def test_secret_injection_errors(host, tmp_path):
    owner = owner_files(host, tmp_path, 0x1)
    vmm = Vmm(host, config(tmp_path))
    vmm.start()
    header, payload = packet(owner, vmm.measurement, b"s")
    raw = bytearray(base64.b64decode(header))
    raw[10] ^= 0x01  # a bit of the IV
    with pytest.raises(VmmError, match="BAD_MEASUREMENT"):
        vmm.inject_secret(base64.b64encode(bytes(raw)).decode(), payload, None)
    with pytest.raises(VmmError, match="base64"):
        vmm.inject_secret("not base64!", payload, None)
    vmm.inject_secret(header, payload, None)
    vmm.cont()
    with pytest.raises(VmmError, match="Not in correct state"):
        vmm.inject_secret(header, payload, None)
    vmm.quit()


def test_debugging_follows_the_policy(host, tmp_path):
    owner_files(host, tmp_path, pol.PolicyFlag.NODBG)
    vmm = Vmm(host, config(tmp_path, policy=pol.PolicyFlag.NODBG))
    vmm.start()
    with pytest.raises(KvmError) as err:
        vmm.vm.sev_dbg_decrypt(0x81_0000, 64)
    assert err.value.status == Status.POLICY_FAILURE
    vmm.quit()
    owner_files(host, tmp_path, 0)
    vmm = Vmm(host, config(tmp_path, policy=0))
    vmm.start()
    flash_code = x86_guest.symbols()["entry32"]  # the image's first code
    code = FIRMWARE[flash_code - ((1 << 32) - len(FIRMWARE)) :][:32]
    assert vmm.vm.sev_dbg_decrypt(flash_code, 32) == code
    assert vmm.vm.read(flash_code, 32) != code  # the host's own view: ciphertext
    vmm.quit()


def test_attestation_report_over_qmp(host, tmp_path):
    owner_files(host, tmp_path, 0x1)
    vmm = Vmm(host, config(tmp_path))
    vmm.start()
    mnonce = os.urandom(16)
    report = base64.b64decode(vmm.attestation_report(base64.b64encode(mnonce).decode())["data"])
    assert report[:16] == mnonce and report[0x10:0x30] == expected_digest(vmm.config)
    vmm.quit()


# ---- the QMP protocol --------------------------------------------------------------------------
def serve(host, directory: Path) -> tuple[QmpServer, threading.Thread, QmpClient]:
    """A VM launched from the owner files in ``directory``, its QMP server, a client."""
    vmm = Vmm(host, config(directory))
    vmm.start()
    server = QmpServer(vmm, directory / "qmp.sock")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, QmpClient(directory / "qmp.sock")


@pytest.fixture
def qmp(host, tmp_path):
    owner = owner_files(host, tmp_path, 0x1)
    server, thread, client = serve(host, tmp_path)
    yield client, owner, server
    client.close()
    server.done.set()
    thread.join(5)
    server.vmm.quit()


def test_qmp_greeting_and_sev_queries(qmp):
    client, owner, _ = qmp
    assert client.greeting["QMP"]["version"]["qemu"]["major"] >= 6
    info = client.execute("query-sev")
    assert info["enabled"] and info["state"] == "launch-secret" and info["policy"] == 1
    assert set(info) >= {"api-major", "api-minor", "build-id", "handle", "sev-type"}
    measured = base64.b64decode(client.execute("query-sev-launch-measure")["data"])
    assert len(measured) == 48
    caps = client.execute("query-sev-capabilities")
    assert len(base64.b64decode(caps["pdh"])) == 2084
    assert len(base64.b64decode(caps["cert-chain"])) == 3 * 2084
    assert len(base64.b64decode(caps["cpu0-id"])) == 64
    assert caps["cbitpos"] == 47  # Rome
    assert client.execute("query-status") == {
        "running": False,
        "singlestep": False,
        "status": "prelaunch",
    }


def test_qmp_secret_cont_and_events(qmp, tmp_path):
    client, owner, server = qmp
    measured = base64.b64decode(client.execute("query-sev-launch-measure")["data"])
    header, payload = packet(owner, measured, b"hunter2")
    bad = bytearray(base64.b64decode(header))
    bad[20] ^= 0x80  # a MAC bit
    with pytest.raises(QmpError, match="BAD_MEASUREMENT") as err:
        client.execute(
            "sev-inject-launch-secret",
            **{"packet-header": base64.b64encode(bytes(bad)).decode(), "secret": payload},
        )
    assert err.value.error_class == "GenericError"
    assert (
        client.execute("sev-inject-launch-secret", **{"packet-header": header, "secret": payload})
        == {}
    )
    assert client.execute("cont") == {}
    server.vmm.wait_idle(30)
    assert client.execute("query-status")["status"] == "running"
    assert [e["event"] for e in client.events] == ["RESUME"]  # sent before cont's return
    assert secret.ready_tag(b"hunter2") in (tmp_path / "console.log").read_text()


def test_qmp_errors_are_qmp_errors(qmp):
    client, _, _ = qmp
    with pytest.raises(QmpError) as err:
        client.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"
    with pytest.raises(QmpError, match="Parameter 'secret' is missing"):
        client.execute("sev-inject-launch-secret", **{"packet-header": "AAAA"})
    with pytest.raises(QmpError, match="unexpected"):
        client.execute("query-sev", verbose=True)
    with pytest.raises(QmpError, match="expected: integer"):
        client.execute(
            "sev-inject-launch-secret", **{"packet-header": "", "secret": "", "gpa": "x"}
        )


def test_qmp_needs_negotiation_first(qmp, tmp_path):
    _, _, server = qmp
    import json
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    # The server takes one client at a time: hand it over.
    qmp[0].close()
    sock.connect(str(tmp_path / "qmp.sock"))
    reader = sock.makefile("r")
    assert "QMP" in json.loads(reader.readline())
    sock.sendall(b'{"execute": "query-sev", "id": 7}')
    reply = json.loads(reader.readline())
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 7
    sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
    assert json.loads(reader.readline()) == {"return": {}}
    assert json.loads(reader.readline())["return"]["status"] == "prelaunch"
    sock.close()


# ---- QMP addresses: QEMU's -qmp socket syntax ---------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unix:/run/q.sock", QmpAddress(path=Path("/run/q.sock"))),
        ("q.sock", QmpAddress(path=Path("q.sock"))),  # a bare path, as sevsim always took it
        ("dir/x:y.sock", QmpAddress(path=Path("dir/x:y.sock"))),
        ("unix:q.sock,server=on,wait=off", QmpAddress(path=Path("q.sock"))),
        ("unix:q.sock,server", QmpAddress(path=Path("q.sock"), wait=True)),  # QEMU's default
        ("unix:q.sock,server,nowait", QmpAddress(path=Path("q.sock"))),  # legacy short forms
        ("unix:a,,b.sock,server=yes,wait=n", QmpAddress(path=Path("a,b.sock"))),
        ("tcp:127.0.0.1:4444", QmpAddress(host="127.0.0.1", port=4444)),
        ("tcp:localhost:0,server=on,wait=off", QmpAddress(host="localhost", port=0)),
        ("tcp::4444,server=on", QmpAddress(host="", port=4444, wait=True)),
        ("tcp:[::1]:4444", QmpAddress(host="::1", port=4444)),
    ],
)
def test_qmp_address_syntax(spec, expected):
    address = parse_qmp_address(spec)
    assert address == expected
    assert parse_qmp_address(str(address)).path == address.path  # str() parses back
    assert parse_qmp_address(str(address)).port == address.port


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("tcp:127.0.0.1", "needs a port"),
        ("tcp:127.0.0.1:", "needs a port"),
        ("tcp:host:65536", "not 0..65535"),
        ("tcp:host:http", "not 0..65535"),
        ("tcp:::1:4444", "brackets"),
        ("telnet:127.0.0.1:4444", "'telnet:' is not offered"),
        ("foo:bar", "'foo:' is not offered"),
        ("unix:", "needs a path"),
        ("unix:q.sock,server=off", "always a listening server"),
        ("tcp:127.0.0.1:4444,noserver", "always a listening server"),
        ("unix:q.sock,server=maybe", "expected on or off"),
        ("unix:q.sock,nodelay=on", "'nodelay=on' is not offered"),
        ("unix:q.sock,", "'' is not offered"),
    ],
)
def test_qmp_address_errors_are_one_line(spec, message):
    with pytest.raises(QmpAddressError, match=message) as err:
        parse_qmp_address(spec)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_qmp_over_tcp_on_a_port_the_kernel_picks(host, tmp_path):
    owner_files(host, tmp_path, 0x1)
    vmm = Vmm(host, config(tmp_path))
    vmm.start()
    before = set(tmp_path.iterdir())
    server = QmpServer(vmm, "tcp:127.0.0.1:0,server=on,wait=off")
    assert server.address.host == "127.0.0.1" and server.address.port > 0
    assert server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.raises(QmpAddressError, match="port 0"):
        QmpClient("tcp:127.0.0.1:0")
    client = QmpClient(str(server.address))
    assert client.execute("query-status")["status"] == "prelaunch"
    client.execute("quit")
    client.close()
    thread.join(5)
    assert not thread.is_alive() and server.sock.fileno() == -1
    assert set(tmp_path.iterdir()) == before  # no socket file, whatever the address said
    # SO_REUSEADDR: the same port can be listened on again at once, even while the
    # connection that just closed may linger in TIME_WAIT.
    again = QmpServer(vmm, f"tcp:127.0.0.1:{server.address.port}")
    again.sock.close()


def test_qmp_wait_on_takes_the_first_client_before_going_on(host, tmp_path):
    """QEMU's server=on without wait=off: nothing goes on until a client is there."""
    owner_files(host, tmp_path, 0x1)
    vmm = Vmm(host, config(tmp_path))
    vmm.start()
    path = tmp_path / "qmp.sock"
    waiting, made = threading.Event(), []

    def run() -> None:
        server = QmpServer(vmm, f"unix:{path},server=on", on_wait=lambda a: waiting.set())
        made.append(server)
        server.serve_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert waiting.wait(10)
    time.sleep(0.2)
    assert not made  # still waiting for its client
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = QmpClient(path)  # the one the server waited for: greeted once it goes on
    assert made and made[0].address.wait
    assert client.execute("query-status")["status"] == "prelaunch"
    client.execute("quit")
    client.close()
    thread.join(5)
    assert not path.exists()  # removed on exit, as before


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_the_same_tcp_address_drives_qemu(tmp_path):
    """QmpClient speaks to a real QEMU over TCP with the very --qmp string given to it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"tcp:127.0.0.1:{port},server=on,wait=off"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S"]
        + ["-qmp", spec],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = QmpClient(spec, timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and qemu.poll() is None
                time.sleep(0.1)
        assert client.greeting["QMP"]["version"]["qemu"]["major"] >= 6
        assert client.execute("query-status")["status"] == "prelaunch"
        client.execute("quit")
        client.close()
        assert qemu.wait(10) == 0
    finally:
        qemu.kill()
        qemu.wait()


# ---- nothing secret leaves the firmware ---------------------------------------------------
def test_no_launch_key_reaches_host_memory_qmp_or_logs(host, tmp_path):
    """TEK, TIK, KEK, KIK and the VEK never appear in DRAM (raw or through the host key),
    in the QMP traffic or in any file but the owner's own key files."""
    pdh = SevCert.parse(host.sev.pdh_cert_export().data["pdh"])
    godh_key = ec.generate_private_key(ec.SECP384R1())
    z = crypto.ecdh_z(godh_key, pdh.public_key())
    nonce, iv, tek, tik = (os.urandom(16) for _ in range(4))
    master = crypto.kdf(z, b"sev-master-secret", nonce, 128)
    kek, kik = crypto.kdf(master, b"sev-kek", b"", 128), crypto.kdf(master, b"sev-kik", b"", 128)
    godh = SevCert.create(Usage.PDH, Algo.ECDH_SHA256, godh_key.public_key(), 0, 0)
    owner = session.OwnerSession(
        0x1, godh.raw, session.session_blob(z, nonce, iv, tek, tik, 1), tek, tik
    )
    owner.write(tmp_path, "vm")
    server, thread, client = serve(host, tmp_path)
    vmm = server.vmm
    measured = base64.b64decode(client.execute("query-sev-launch-measure")["data"])
    header, payload = packet(owner, measured, b"the owner's secret")
    client.execute("sev-inject-launch-secret", **{"packet-header": header, "secret": payload})
    client.execute("query-sev-capabilities")
    client.execute("cont")
    vmm.wait_idle(30)
    vek = host.inspection_port().guest(vmm.vm.handle).vek  # (the test peeks, to know what to seek)
    keys = {"TEK": tek, "TIK": tik, "KEK": kek, "KIK": kik, "VEK": vek}
    client.execute("quit")
    thread.join(5)
    machine = host.machine
    machine.cache.wbinvd()
    memctl = machine.memctl
    assert (tmp_path / "vm_tek.bin").read_bytes() == tek  # the scan looks for real keys
    for name, key in keys.items():
        for start, length in _written_runs(machine):
            assert key not in machine.dram.read(start, length), f"{name} in DRAM"
            host_view = memctl.read(start, length, memctl.host_key_slot)
            assert key not in host_view, f"{name} in host memory"
        traffic = b"".join(server.transcript) + "".join(client.received).encode()
        assert key not in traffic and base64.b64encode(key) not in traffic, f"{name} in QMP"
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.name not in ("vm_tek.bin", "vm_tik.bin"):
                data = path.read_bytes()
                assert key not in data and base64.b64encode(key)[:20] not in data, (name, path)
    client.close()


def _written_runs(machine):
    from sevsim.attacks.physical import ColdBootDump

    return ColdBootDump(machine).runs()
