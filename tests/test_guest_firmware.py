"""The firmware's guest commands behind the mailbox: guest handles and states, ASIDs
(ACTIVATE/ACTIVATE_EX/DEACTIVATE/DF_FLUSH/DECOMMISSION/GUEST_STATUS) and the launch
commands, checked against the rules and formulas of sev-api.md §1.4, §2, §5 and §7.3."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from conftest import RawMailbox, make_platform, psp_port
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from sevsim.api import commands as c
from sevsim.api import policy as pol
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.sev import CERT_SIZE, Algo, SevCert, Usage
from sevsim.crypto import kdf

DATA = RawMailbox.DATA_PA
IMAGE_PA = 0x40_0000  # where the tests put "guest" pages
MEASURE_PA = 0x30_0000


@pytest.fixture
def mb() -> RawMailbox:
    # Plain SEV guests on low ASIDs: the BIOS leaves no SEV-ES ASID range (EDX = 1).
    return ready(RawMailbox(make_platform("milan", sev_edx=1)))


def ready(mb: RawMailbox) -> RawMailbox:
    assert mb.init() == Status.SUCCESS
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    return mb


def launch_start(mb, policy=0, handle=0, godh: bytes | None = None, session: bytes | None = None):
    fields = {"handle": handle, "policy": policy}
    if godh is not None:
        mb.write(DATA, godh)
        mb.write(DATA + 0x1000, session)
        fields.update(
            dh_cert_paddr=DATA,
            dh_cert_len=len(godh),
            session_paddr=DATA + 0x1000,
            session_len=len(session),
        )
    status, out = mb.cmd(Command.LAUNCH_START, c.LAUNCH_START.build(**fields))
    return status, c.LAUNCH_START.parse(out).handle


def cmd(mb, command, **fields) -> Status:
    layout = c.BUFFERS.get(command)
    return mb.cmd(command, layout.build(**fields) if layout else None)[0]


def activate(mb, handle, asid) -> Status:
    return cmd(mb, Command.ACTIVATE, handle=handle, asid=asid)


def guest_status(mb, handle):
    status, out = mb.cmd(Command.GUEST_STATUS, c.GUEST_STATUS.build(handle=handle))
    assert status == Status.SUCCESS
    return c.GUEST_STATUS.parse(out)


def platform_state(mb) -> tuple[PlatformState, int]:
    out = c.PLATFORM_STATUS.parse(mb.cmd(Command.PLATFORM_STATUS)[1])
    return PlatformState(out.state), out.guest_count


def measure(mb, handle, length=48) -> tuple[Status, bytes, int]:
    status, out = mb.cmd(
        Command.LAUNCH_MEASURE,
        c.LAUNCH_MEASURE.build(handle=handle, measure_paddr=MEASURE_PA, measure_len=length),
    )
    return status, mb.read(MEASURE_PA, 48), c.LAUNCH_MEASURE.parse(out).measure_len


def pdh_cert(mb) -> SevCert:
    buf = c.PDH_CERT_EXPORT.build(
        pdh_paddr=DATA + 0x8000,
        pdh_len=CERT_SIZE,
        chain_paddr=DATA + 0xA000,
        chain_len=3 * CERT_SIZE,
    )
    assert mb.cmd(Command.PDH_CERT_EXPORT, buf)[0] == Status.SUCCESS
    return SevCert.parse(mb.read(DATA + 0x8000, CERT_SIZE))


def owner_session(pdh: SevCert, policy: int, tek: bytes, tik: bytes, tamper: str = ""):
    """The guest owner's side of LAUNCH_START, computed here from sev-api.md §5.1–5.2
    with OpenSSL directly (the KDF is the one checked against the published vector)."""
    godh_key = ec.generate_private_key(ec.SECP384R1())
    z = godh_key.exchange(ec.ECDH(), pdh.public_key())
    nonce, wrap_iv = os.urandom(16), os.urandom(16)
    master = kdf(z, b"sev-master-secret", nonce, 128)
    kek, kik = kdf(master, b"sev-kek", b"", 128), kdf(master, b"sev-kik", b"", 128)
    enc = Cipher(algorithms.AES(kek), modes.CTR(wrap_iv)).encryptor()
    wrap_tk = enc.update(tek + tik) + enc.finalize()
    wrap_mac = hmac.new(kik, wrap_tk, "sha256").digest()
    policy_mac = hmac.new(tik, policy.to_bytes(4, "little"), "sha256").digest()
    if tamper == "wrap_mac":
        wrap_mac = bytes([wrap_mac[0] ^ 1]) + wrap_mac[1:]
    if tamper == "policy_mac":
        policy_mac = bytes([policy_mac[0] ^ 1]) + policy_mac[1:]
    session = nonce + wrap_tk + wrap_iv + wrap_mac + policy_mac
    assert len(session) == 128
    godh = SevCert.create(Usage.PDH, Algo.ECDH_SHA256, godh_key.public_key(), 0, 0).raw
    return godh, session


def expected_measurement(api, policy: int, digest: bytes, mnonce: bytes, tik: bytes) -> bytes:
    major, minor, build = api
    data = bytes([0x04, major, minor, build]) + policy.to_bytes(4, "little") + digest + mnonce
    return hmac.new(tik, data, "sha256").digest()


# ---- handles, guest status, platform WORKING ------------------------------------------------
def test_launch_start_allocates_the_lowest_free_handle_and_makes_the_platform_working(mb):
    assert platform_state(mb) == (PlatformState.INIT, 0)
    assert launch_start(mb, policy=0x1) == (Status.SUCCESS, 1)
    assert launch_start(mb, policy=0x1) == (Status.SUCCESS, 2)
    assert platform_state(mb) == (PlatformState.WORKING, 2)
    s = guest_status(mb, 1)
    assert (s.state, s.asid, s.policy) == (1, 0, 0x1)  # LUPDATE, no ASID yet
    assert cmd(mb, Command.DECOMMISSION, handle=1) == Status.SUCCESS
    assert launch_start(mb)[1] == 1  # handle 1 is free again
    assert cmd(mb, Command.DECOMMISSION, handle=1) == Status.SUCCESS
    assert cmd(mb, Command.DECOMMISSION, handle=2) == Status.SUCCESS
    assert platform_state(mb) == (PlatformState.INIT, 0)  # the last guest went


def test_a_working_platform_keeps_its_pek_but_may_rotate_its_pdh(mb):
    launch_start(mb)
    assert cmd(mb, Command.PEK_GEN) == Status.INVALID_PLATFORM_STATE
    assert cmd(mb, Command.PEK_CERT_IMPORT) == Status.INVALID_PLATFORM_STATE
    assert cmd(mb, Command.PDH_GEN) == Status.SUCCESS
    assert platform_state(mb) == (PlatformState.WORKING, 1)


def test_guest_status_of_an_unknown_handle_succeeds_with_state_zero(mb):
    for handle in (0, 7, 1025, 0xFFFFFFFF):
        assert guest_status(mb, handle).state == 0
    assert cmd(mb, Command.SHUTDOWN) == Status.SUCCESS
    assert mb.cmd(Command.GUEST_STATUS, c.GUEST_STATUS.build(handle=1))[0] == (
        Status.INVALID_PLATFORM_STATE
    )


@pytest.mark.parametrize(
    "command",
    [Command.ACTIVATE, Command.DEACTIVATE, Command.DECOMMISSION, Command.LAUNCH_FINISH],
)
def test_guest_commands_need_working_then_a_valid_handle(command):
    mb = ready(RawMailbox(make_platform("milan", sev_edx=1)))
    # INIT is not WORKING: the state is checked before the handle.
    assert cmd(mb, command, handle=1) == Status.INVALID_PLATFORM_STATE
    launch_start(mb)
    assert cmd(mb, command, handle=5) == Status.INVALID_GUEST


def test_launch_start_needs_init_or_working():
    mb = RawMailbox(make_platform("milan", sev_edx=1))
    assert launch_start(mb)[0] == Status.INVALID_PLATFORM_STATE


def test_shutdown_discards_every_guest(mb):
    _, h = launch_start(mb)
    assert activate(mb, h, 5) == Status.SUCCESS
    assert cmd(mb, Command.SHUTDOWN) == Status.SUCCESS
    ready(mb)
    assert guest_status(mb, h).state == 0
    assert platform_state(mb) == (PlatformState.INIT, 0)
    assert mb.machine.chip.valid_ccxs(5) == 0


# ---- ACTIVATE / DEACTIVATE / DF_FLUSH / DECOMMISSION (§7.3) -------------------------------
def test_activate_checks_in_firmware_order(mb):
    _, h1 = launch_start(mb)
    _, h2 = launch_start(mb)
    assert activate(mb, h1, 0) == Status.INVALID_ASID
    assert activate(mb, h1, 510) == Status.INVALID_ASID  # Milan: 509 SEV ASIDs
    assert activate(mb, h1, 7) == Status.SUCCESS
    assert activate(mb, h2, 7) == Status.ASID_OWNED  # one ASID, one guest
    assert activate(mb, h1, 8) == Status.ACTIVE  # the guest holds an ASID already
    assert guest_status(mb, h1).asid == 7
    fw = psp_port(mb)
    state = fw.asid_state(7)
    assert state["handle"] == h1 and state["allocated"] == 1 and state["clean"] == 0
    # Not RUNNING yet: the key is installed, the ASID stays disabled until LAUNCH_FINISH.
    assert mb.machine.chip.valid_ccxs(7) == 0


def test_activate_before_df_flush_needs_it():
    mb = RawMailbox(make_platform("milan", sev_edx=1))
    assert mb.init() == Status.SUCCESS  # every ASID dirty after INIT
    _, h = launch_start(mb)
    assert activate(mb, h, 3) == Status.DF_FLUSH_REQUIRED
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    assert activate(mb, h, 3) == Status.SUCCESS


def launched(mb, asid, policy=0, pages=1) -> int:
    """A guest through LAUNCH_FINISH on ``asid``; its image is ``pages`` pages at IMAGE_PA."""
    status, h = launch_start(mb, policy)
    assert status == Status.SUCCESS
    assert activate(mb, h, asid) == Status.SUCCESS
    mb.write(IMAGE_PA, os.urandom(4096 * pages))
    assert (
        cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=4096 * pages)
        == Status.SUCCESS
    )
    assert measure(mb, h)[0] == Status.SUCCESS
    assert cmd(mb, Command.LAUNCH_FINISH, handle=h) == Status.SUCCESS
    return h


def test_asid_reuse_needs_deactivate_wbinvd_and_df_flush(mb):
    m, fw = mb.machine, psp_port(mb)
    h = launched(mb, 9)
    assert m.chip.valid_ccxs(9) == 1  # RUNNING: enabled on the (one) CCX
    assert fw.asid_state(9)["in_use"] == 1
    assert cmd(mb, Command.DECOMMISSION, handle=h) == Status.ACTIVE  # still holds ASID 9
    assert cmd(mb, Command.DEACTIVATE, handle=h) == Status.SUCCESS
    assert cmd(mb, Command.DEACTIVATE, handle=h) == Status.INACTIVE
    assert fw.asid_state(9) == {"handle": 0, "dirty": 1, "clean": 0, "allocated": 0, "in_use": 0}
    assert m.chip.valid_ccxs(9) == 0
    assert cmd(mb, Command.DECOMMISSION, handle=h) == Status.SUCCESS
    _, h2 = launch_start(mb)
    assert activate(mb, h2, 9) == Status.DF_FLUSH_REQUIRED
    # DEACTIVATE cleared the WBINVD-done flags of the cores that ran the guest's ASID.
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    assert fw.asid_state(9)["dirty"] == 1
    for core in m.cores[:-1]:
        core.wbinvd()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED  # one core still owes it
    m.cores[-1].wbinvd()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    assert activate(mb, h2, 9) == Status.SUCCESS


def test_deactivate_before_running_returns_the_asid_clean(mb):
    fw = psp_port(mb)
    _, h = launch_start(mb)
    assert activate(mb, h, 4) == Status.SUCCESS
    assert cmd(mb, Command.DEACTIVATE, handle=h) == Status.SUCCESS
    assert fw.asid_state(4)["clean"] == 1 and fw.asid_state(4)["dirty"] == 0
    _, h2 = launch_start(mb)
    assert activate(mb, h2, 4) == Status.SUCCESS  # never ran: no flush needed


def test_activate_ex_selects_ccxs_by_apic_id():
    mb = ready(RawMailbox(make_platform("rome", cores=8, sev_edx=1)))  # two CCXs of four
    m = mb.machine
    _, h = launch_start(mb)

    def activate_ex(ids, ex_len=c.ACTIVATE_EX.size, asid=6):
        mb.write(DATA, b"".join(i.to_bytes(4, "little") for i in ids))
        return cmd(
            mb,
            Command.ACTIVATE_EX,
            ex_len=ex_len,
            handle=h,
            asid=asid,
            numids=len(ids),
            ids_paddr=DATA,
        )

    assert activate_ex([5], ex_len=0x10) == Status.INVALID_PARAM
    assert activate_ex([]) == Status.INVALID_PARAM
    assert activate_ex([99]) == Status.INVALID_PARAM
    assert activate_ex([5]) == Status.SUCCESS  # core 5: the second CCX
    assert psp_port(mb).asid_state(6)["allocated"] == 0b10
    assert activate_ex([1], asid=7) == Status.ACTIVE  # more CCXs, but only on ASID 6
    assert activate_ex([1]) == Status.SUCCESS
    mb.write(IMAGE_PA, bytes(16))
    cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=16)
    measure(mb, h)
    assert cmd(mb, Command.LAUNCH_FINISH, handle=h) == Status.SUCCESS
    assert m.chip.valid_ccxs(6) == 0b11


def test_sev_es_and_plain_sev_asid_ranges():
    # An SEV-ES capable part whose BIOS reserves ASIDs 1..99 for SEV-ES guests.
    mb = RawMailbox(make_platform("milan", sev_edx=100))
    tmr = 0x100_0000
    assert mb.init(flags=c.CONFIG_FLAG_ES, tmr_paddr=tmr, tmr_len=1 << 20) == Status.SUCCESS
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    _, sev = launch_start(mb, policy=0)
    _, es = launch_start(mb, policy=pol.PolicyFlag.ES)
    assert activate(mb, sev, 50) == Status.INVALID_ASID
    assert activate(mb, es, 100) == Status.INVALID_ASID
    assert activate(mb, sev, 100) == Status.SUCCESS
    assert activate(mb, es, 50) == Status.SUCCESS


def test_sev_es_policy_needs_config_es(mb):
    assert launch_start(mb, policy=pol.PolicyFlag.ES)[0] == Status.UNSUPPORTED


# ---- launch ------------------------------------------------------------------------------------
def test_launch_update_data_encrypts_in_place_and_extends_the_digest(mb):
    m = mb.machine
    _, h = launch_start(mb, policy=0x1)
    image = os.urandom(8192 + 48)
    mb.write(IMAGE_PA, image)
    assert cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=64) == (
        Status.INACTIVE
    )
    assert activate(mb, h, 12) == Status.SUCCESS
    # In pieces, as KVM issues it; the digest covers the plaintext in command order.
    for off, n in ((0, 4096), (4096, 4096), (8192, 48)):
        assert (
            cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA + off, len=n)
            == Status.SUCCESS
        )
    m.cache.wbinvd()
    stored = m.dram.read(IMAGE_PA, len(image))
    assert stored != image
    assert m.memctl.read(IMAGE_PA, len(image), m.memctl.key_slot(True, 12)) == image
    status, blob, _ = measure(mb, h)
    assert status == Status.SUCCESS
    digest = hashlib.sha256(image).digest()
    api = psp_port(mb).api_version
    assert blob[:32] == expected_measurement(api, 0x1, digest, blob[32:], bytes(16))


@pytest.mark.parametrize(
    "paddr, length, expected",
    [
        (IMAGE_PA + 8, 16, Status.INVALID_ADDRESS),
        (IMAGE_PA, 0, Status.INVALID_LENGTH),
        (IMAGE_PA, 24, Status.INVALID_LENGTH),
        (1 << 45, 16, Status.INVALID_ADDRESS),  # an address bit the SME reduction removed
    ],
)
def test_launch_update_data_alignment_and_lengths(mb, paddr, length, expected):
    _, h = launch_start(mb)
    activate(mb, h, 2)
    assert cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=paddr, len=length) == expected


def test_launch_measure_probes_its_length_and_orders_the_launch(mb):
    _, h = launch_start(mb)
    assert cmd(mb, Command.LAUNCH_FINISH, handle=h) == Status.INVALID_GUEST_STATE
    status, _, length = measure(mb, h, length=47)
    assert (status, length) == (Status.INVALID_LENGTH, 48)
    assert measure(mb, h)[0] == Status.SUCCESS
    assert measure(mb, h)[0] == Status.INVALID_GUEST_STATE  # LSECRET now
    activate(mb, h, 2)
    assert cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=16) == (
        Status.INVALID_GUEST_STATE
    )
    assert cmd(mb, Command.LAUNCH_FINISH, handle=h) == Status.SUCCESS
    assert guest_status(mb, h).state == 3  # RUNNING
    assert cmd(mb, Command.LAUNCH_FINISH, handle=h) == Status.INVALID_GUEST_STATE


def test_launch_with_an_owner_session(mb):
    """The GODH/session path: the measurement is keyed with the owner's TIK."""
    policy = pol.make(pol.PolicyFlag.NODBG | pol.PolicyFlag.NOKS, 1, 0)
    tek, tik = os.urandom(16), os.urandom(16)
    godh, session = owner_session(pdh_cert(mb), policy, tek, tik)
    status, h = launch_start(mb, policy, godh=godh, session=session)
    assert status == Status.SUCCESS
    activate(mb, h, 30)
    image = os.urandom(4096)
    mb.write(IMAGE_PA, image)
    cmd(mb, Command.LAUNCH_UPDATE_DATA, handle=h, paddr=IMAGE_PA, len=4096)
    status, blob, _ = measure(mb, h)
    api = psp_port(mb).api_version
    digest = hashlib.sha256(image).digest()
    assert blob[:32] == expected_measurement(api, policy, digest, blob[32:], tik)
    assert blob[:32] != expected_measurement(api, policy, digest, blob[32:], bytes(16))


@pytest.mark.parametrize(
    "policy, tamper, expected",
    [
        (0, "wrap_mac", Status.BAD_MEASUREMENT),
        (0, "policy_mac", Status.BAD_MEASUREMENT),
        (1 << 6, "", Status.POLICY_FAILURE),  # a reserved bit
        (pol.make(0, 1, 52), "", Status.POLICY_FAILURE),  # needs API 1.52; Milan has 1.51
        (pol.make(0, 2, 0), "", Status.POLICY_FAILURE),
        (pol.make(0, 1, 51), "", Status.SUCCESS),
    ],
)
def test_launch_start_checks_the_session_and_the_policy(mb, policy, tamper, expected):
    godh, session = owner_session(pdh_cert(mb), policy, os.urandom(16), os.urandom(16), tamper)
    assert launch_start(mb, policy, godh=godh, session=session)[0] == expected


def test_launch_start_without_a_dh_cert_does_not_check_the_policy(mb):
    assert launch_start(mb, policy=1 << 6)[0] == Status.SUCCESS


def test_launch_start_session_and_certificate_checks(mb):
    godh, session = owner_session(pdh_cert(mb), 0, bytes(16), bytes(16))
    assert launch_start(mb, godh=godh, session=session[:127])[0] == Status.INVALID_LENGTH
    assert launch_start(mb, godh=godh[:-4], session=session)[0] == Status.INVALID_LENGTH
    pek_usage = bytearray(godh)
    pek_usage[0x0C:0x10] = int(Usage.PEK).to_bytes(4, "little")
    assert launch_start(mb, godh=bytes(pek_usage), session=session)[0] == (
        Status.INVALID_CERTIFICATE
    )
    off_curve = bytearray(godh)
    off_curve[0x18] ^= 1  # the public key's X: no longer on P-384
    assert launch_start(mb, godh=bytes(off_curve), session=session)[0] == (
        Status.INVALID_CERTIFICATE
    )


def test_key_sharing_follows_noks_and_policy_equality(mb):
    m = mb.machine
    h1 = launched(mb, 20, policy=0)
    # Same policy, NOKS clear: the new guest gets guest 1's VEK (same ciphertext).
    status, h2 = launch_start(mb, policy=0, handle=h1)
    assert status == Status.SUCCESS
    assert activate(mb, h2, 21) == Status.SUCCESS
    plain = os.urandom(64)
    m.cache.write(IMAGE_PA, plain, m.memctl.key_slot(True, 20))
    m.cache.wbinvd()
    assert m.memctl.read(IMAGE_PA, 64, m.memctl.key_slot(True, 21)) == plain
    assert launch_start(mb, policy=1, handle=h1)[0] == Status.POLICY_FAILURE
    h3 = launched(mb, 22, policy=pol.PolicyFlag.NOKS)
    assert launch_start(mb, policy=pol.PolicyFlag.NOKS, handle=h3)[0] == Status.POLICY_FAILURE
    assert launch_start(mb, policy=0, handle=999)[0] == Status.INVALID_GUEST


def test_running_out_of_handles_is_resource_limit():
    mb = ready(RawMailbox(make_platform("milan", sev_edx=1)))
    fw = psp_port(mb)
    from sevsim.psp.guest import GUEST_COUNT_MAX

    fw.occupy_handles(GUEST_COUNT_MAX - 1)  # fill the table cheaply
    assert launch_start(mb)[0] == Status.SUCCESS  # the last free handle
    assert launch_start(mb)[0] == Status.RESOURCE_LIMIT


# ---- a state machine over guest commands ------------------------------------------------------
GUEST_COMMANDS = [
    Command.LAUNCH_UPDATE_DATA,
    Command.LAUNCH_MEASURE,
    Command.LAUNCH_FINISH,
    Command.ACTIVATE,
    Command.DEACTIVATE,
    Command.DECOMMISSION,
]


class GuestLifecycle(RuleBasedStateMachine):
    """Random sequences of guest commands on a few handles: every status is the one the
    spec's tables give for the model's expected state (sev-api.md §1.4, §7.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.mb = ready(RawMailbox(make_platform("rome", dram_size=1 << 30, sev_edx=1)))
        self.guests: dict[int, dict] = {}  # handle -> {"state", "asid"}
        self.asid_owner: dict[int, int] = {}
        self.dirty: set[int] = set()

    @rule(policy=st.sampled_from([0, 1, 3]))
    def start(self, policy):
        status, h = launch_start(self.mb, policy)
        assert status == Status.SUCCESS
        self.guests[h] = {"state": 1, "asid": 0}

    @rule(data=st.data(), command=st.sampled_from(GUEST_COMMANDS), asid=st.integers(1, 4))
    def guest_command(self, data, command, asid):
        if not self.guests:
            return
        h = data.draw(st.sampled_from(sorted(self.guests)))
        g = self.guests[h]
        mb = self.mb
        if command == Command.LAUNCH_UPDATE_DATA:
            status = cmd(mb, command, handle=h, paddr=IMAGE_PA, len=16)
            want = (
                Status.INVALID_GUEST_STATE
                if g["state"] != 1
                else Status.INACTIVE
                if not g["asid"]
                else Status.SUCCESS
            )
        elif command == Command.LAUNCH_MEASURE:
            status = measure(mb, h)[0]
            want = Status.SUCCESS if g["state"] == 1 else Status.INVALID_GUEST_STATE
            if status == Status.SUCCESS:
                g["state"] = 2
        elif command == Command.LAUNCH_FINISH:
            status = cmd(mb, command, handle=h)
            want = Status.SUCCESS if g["state"] == 2 else Status.INVALID_GUEST_STATE
            if status == Status.SUCCESS:
                g["state"] = 3
        elif command == Command.ACTIVATE:
            status = activate(mb, h, asid)
            if asid in self.asid_owner:
                want = Status.ASID_OWNED
            elif g["asid"]:
                want = Status.ACTIVE
            elif asid in self.dirty:
                want = Status.DF_FLUSH_REQUIRED
            else:
                want = Status.SUCCESS
                g["asid"] = asid
                self.asid_owner[asid] = h
        elif command == Command.DEACTIVATE:
            status = cmd(mb, command, handle=h)
            want = Status.SUCCESS if g["asid"] else Status.INACTIVE
            if g["asid"]:
                if g["state"] == 3:
                    self.dirty.add(g["asid"])
                del self.asid_owner[g["asid"]]
                g["asid"] = 0
        else:
            status = cmd(mb, command, handle=h)
            want = Status.ACTIVE if g["asid"] else Status.SUCCESS
            if not g["asid"]:
                del self.guests[h]
        assert status == want, (command.name, g, status)
        assert guest_status(mb, h).state == (self.guests[h]["state"] if h in self.guests else 0)

    @rule()
    def flush(self):
        self.mb.wbinvd_all()
        assert self.mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
        self.dirty.clear()


TestGuestLifecycle = GuestLifecycle.TestCase
TestGuestLifecycle.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
