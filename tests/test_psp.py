"""The SEV firmware behind its mailbox: the door, platform commands, statuses, state table."""

from __future__ import annotations

import pytest
from conftest import RawMailbox, make_platform, psp_port
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sevsim.api import commands as c
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.chain import SevChain, decode_platform_certs
from sevsim.certs.sev import CERT_SIZE, Algo, SevCert, Usage, firmware_validate
from sevsim.owner import ca as owner_ca
from sevsim.psp import identity

DATA = RawMailbox.DATA_PA


@pytest.fixture
def mb() -> RawMailbox:
    return RawMailbox(make_platform("milan"))


def status_of(mb: RawMailbox):
    st, out = mb.cmd(Command.PLATFORM_STATUS, bytes(12))
    assert st == Status.SUCCESS
    return c.PLATFORM_STATUS.parse(out)


def ready(mb: RawMailbox) -> RawMailbox:
    assert mb.init() == Status.SUCCESS
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    return mb


# ---- the door --------------------------------------------------------------------------
def test_cmdresp_protocol(mb):
    regs = mb.mailbox.registers
    assert regs["cmdresp"] == 0x10980  # Milan: Linux's sevv2 register set
    assert mb.ring(Command.NOP, 0) == Status.SUCCESS
    reg = mb.mailbox.read32(regs["cmdresp"])
    assert reg == 0x8000_0000 | (Command.NOP << 16)  # RESP, command id, status 0
    assert make_platform("naples").mailbox.registers["cmdresp"] == 0x10580  # sevv1


@pytest.mark.parametrize(
    "command", [0x00, 0x10, 0x1F, 0x26, 0x37, 0x45, 0x62, 0x7F, 0x81, 0xA0, 0xCE, 0x7FF]
)
def test_unknown_and_snp_commands_are_invalid(mb, command):
    assert mb.ring(command, mb.CMD_PA) == Status.INVALID_COMMAND


def test_commands_not_implemented_answer_with_a_status(mb):
    assert mb.cmd(Command.SNP_INIT, bytes(0x40))[0] == Status.INVALID_COMMAND
    assert mb.cmd(0x7F, bytes(0x40))[0] == Status.INVALID_COMMAND  # no such command


@pytest.mark.parametrize(
    "addr",
    [
        (4 << 30) - 8,  # the buffer runs past the end of DRAM
        1 << 45,  # an address bit the SME reduction removed (Milan: bits 43..50)
        (1 << 43) | 0x1000,
        1 << 60,
    ],
)
def test_bad_command_buffer_address_is_invalid_address(mb, addr):
    assert mb.cmd(Command.PLATFORM_STATUS, addr=addr)[0] == Status.INVALID_ADDRESS
    assert mb.cmd(Command.INIT, addr=addr)[0] == Status.INVALID_ADDRESS


def test_command_buffer_with_the_c_bit_is_read_with_the_host_key(mb):
    m = mb.machine
    host = m.memctl.host_key_slot
    buf = c.GET_ID.build(id_paddr=DATA, id_len=64)
    m.cache.write(0x30_0000, buf, host)  # an encrypted buffer, as an SME host writes it
    status, _ = mb.cmd(Command.GET_ID, addr=0x30_0000 | m.cbit_mask)
    assert status == Status.SUCCESS
    assert mb.read(DATA, 64) == identity.chip_id(psp_port(mb).cuk)
    # Without the C-bit the firmware reads the ciphertext: an unknown id_len, a wild address.
    assert mb.cmd(Command.GET_ID, addr=0x30_0000)[0] != Status.SUCCESS


# ---- INIT and the platform state ---------------------------------------------------------
def test_platform_status_layout_and_init(mb):
    st = status_of(mb)
    assert (st.api_major, st.api_minor, st.build_id, st.state) == (1, 51, 3, PlatformState.UNINIT)
    assert mb.init() == Status.SUCCESS
    st = status_of(mb)
    assert (st.state, st.platform_flags, st.config_flags, st.guest_count) == (
        PlatformState.INIT,
        0,
        0,
        0,
    )
    assert mb.init() == Status.INVALID_PLATFORM_STATE
    assert mb.cmd(Command.SHUTDOWN)[0] == Status.SUCCESS
    assert status_of(mb).state == PlatformState.UNINIT


@pytest.mark.parametrize(
    ("fields", "raw_patch", "expected"),
    [
        ({"flags": 0x2}, None, Status.INVALID_CONFIG),  # only bit 0 is defined
        ({}, (0x03, 0x01), Status.INVALID_CONFIG),  # reserved bytes 0x02..0x07 must be zero
        ({"flags": 1, "tmr_paddr": 0x50_1000, "tmr_len": 1 << 20}, None, Status.INVALID_ADDRESS),
        ({"flags": 1, "tmr_paddr": 0x50_0000, "tmr_len": 4096}, None, Status.INVALID_LENGTH),
        ({"flags": 1, "tmr_paddr": 0x50_0000, "tmr_len": 1 << 20}, None, Status.SUCCESS),
    ],
)
def test_init_checks(mb, fields, raw_patch, expected):
    raw = bytearray(c.INIT.build(**fields))
    if raw_patch:
        raw[raw_patch[0]] = raw_patch[1]
    assert mb.cmd(Command.INIT, bytes(raw))[0] == expected
    st = status_of(mb)
    assert st.state == (PlatformState.INIT if expected == Status.SUCCESS else PlatformState.UNINIT)
    if expected == Status.SUCCESS:
        assert st.config_flags == c.CONFIG_FLAG_ES
        # The TMR is the firmware's now: a command buffer there is refused.
        assert mb.cmd(Command.PLATFORM_STATUS, addr=0x50_0000)[0] == Status.INVALID_ADDRESS


def test_init_with_sev_es_on_naples_is_invalid_config():
    mb = RawMailbox(make_platform("naples"))
    assert mb.init(flags=1, tmr_paddr=0x50_0000, tmr_len=1 << 20) == Status.INVALID_CONFIG


def test_init_needs_smee():
    mb = RawMailbox(make_platform("milan", smee=False))
    assert mb.init() == Status.HWERROR_PLATFORM


@pytest.mark.parametrize(
    ("command", "state_needed"),
    [
        (Command.PEK_GEN, {PlatformState.INIT}),
        (Command.PDH_GEN, {PlatformState.INIT}),  # WORKING: tests/test_guest_firmware.py
        (Command.PLATFORM_RESET, {PlatformState.UNINIT}),
    ],
)
def test_state_requirements(mb, command, state_needed):
    expected = (
        Status.SUCCESS if PlatformState.UNINIT in state_needed else Status.INVALID_PLATFORM_STATE
    )
    assert mb.cmd(command)[0] == expected
    mb.init()
    expected = (
        Status.SUCCESS if PlatformState.INIT in state_needed else Status.INVALID_PLATFORM_STATE
    )
    assert mb.cmd(command)[0] == expected


# ---- lengths: query, write back -------------------------------------------------------------
def test_pek_csr_length_probe_and_csr(mb):
    ready(mb)
    st, out = mb.cmd(Command.PEK_CSR, c.PEK_CSR.build(csr_paddr=0, csr_len=0))
    assert st == Status.INVALID_LENGTH and c.PEK_CSR.parse(out).csr_len == CERT_SIZE
    st, out = mb.cmd(Command.PEK_CSR, c.PEK_CSR.build(csr_paddr=DATA, csr_len=CERT_SIZE))
    assert st == Status.SUCCESS
    csr = SevCert.parse(mb.read(DATA, CERT_SIZE))
    assert csr.usage == Usage.PEK and csr.signers() == [Usage.INVALID, Usage.INVALID]


def test_pdh_cert_export_writes_both_lengths_back(mb):
    ready(mb)
    st, out = mb.cmd(
        Command.PDH_CERT_EXPORT, c.PDH_CERT_EXPORT.build(pdh_len=CERT_SIZE, chain_len=10)
    )
    r = c.PDH_CERT_EXPORT.parse(out)
    assert st == Status.INVALID_LENGTH and (r.pdh_len, r.chain_len) == (CERT_SIZE, 3 * CERT_SIZE)


def test_get_id_works_in_any_state_and_probes_its_length(mb):
    st, out = mb.cmd(Command.GET_ID, c.GET_ID.build(id_paddr=DATA, id_len=10))
    assert st == Status.INVALID_LENGTH and c.GET_ID.parse(out).id_len == 64
    st, out = mb.cmd(Command.GET_ID, c.GET_ID.build(id_paddr=DATA, id_len=200))
    assert st == Status.SUCCESS and c.GET_ID.parse(out).id_len == 64
    chip = mb.read(DATA, 64)
    # An independent computation: Q = CUK·G on secp256k1, X || Y big-endian.
    from cryptography.hazmat.primitives.asymmetric import ec

    cuk = psp_port(mb).cuk
    d = int.from_bytes(cuk, "little") % (identity.SECP256K1_N - 1) + 1
    q = ec.derive_private_key(d, ec.SECP256K1()).public_key().public_numbers()
    assert chip == q.x.to_bytes(32, "big") + q.y.to_bytes(32, "big")


def test_an_input_only_command_never_writes_its_buffer_back(mb):
    before = c.INIT.build(flags=0x8000)
    assert mb.cmd(Command.INIT, before)[0] == Status.INVALID_CONFIG
    assert mb.read(mb.CMD_PA, len(before)) == before


# ---- keys and certificates --------------------------------------------------------------------
def export(mb: RawMailbox) -> SevChain:
    buf = c.PDH_CERT_EXPORT.build(
        pdh_paddr=DATA, pdh_len=CERT_SIZE, chain_paddr=DATA + 0x1000, chain_len=3 * CERT_SIZE
    )
    assert mb.cmd(Command.PDH_CERT_EXPORT, buf)[0] == Status.SUCCESS
    pek, oca, cek = decode_platform_certs(mb.read(DATA + 0x1000, 3 * CERT_SIZE))
    return SevChain(SevCert.parse(mb.read(DATA, CERT_SIZE)), pek, oca, cek)


def test_firmware_keys_and_certificates(mb):
    ready(mb)
    chain = export(mb)
    assert chain.cek.signers() == [Usage.INVALID, Usage.INVALID]  # exported unsigned
    # The CEK is the one derived from the chip-unique key (sev-api.md §4), recomputed here.
    import hashlib

    from sevsim.crypto import kdf

    cuk = psp_port(mb).cuk
    rdata = kdf(hashlib.sha256(cuk).digest(), b"sev-chip-endorsement-key", b"", 448)
    d = int.from_bytes(rdata, "little") % (identity.P384_N - 1) + 1
    assert (
        chain.cek.public_key().public_numbers().x
        == identity.derive_cek(cuk).public_key().public_numbers().x
    )
    from cryptography.hazmat.primitives.asymmetric import ec

    assert (
        chain.cek.public_key().public_numbers()
        == ec.derive_private_key(d, ec.SECP384R1()).public_key().public_numbers()
    )
    for cert, usage, algo in (
        (chain.pdh, Usage.PDH, Algo.ECDH_SHA256),
        (chain.pek, Usage.PEK, Algo.ECDSA_SHA256),
        (chain.oca, Usage.OCA, Algo.ECDSA_SHA256),
    ):
        assert (cert.usage, cert.algo, cert.api_version) == (usage, algo, (1, 51))
    assert firmware_validate(chain.pek, chain.oca.signing_key()) == Status.SUCCESS
    assert firmware_validate(chain.pek, chain.cek.signing_key()) == Status.SUCCESS
    assert firmware_validate(chain.pdh, chain.pek.signing_key()) == Status.SUCCESS
    assert chain.pek.signers() == [Usage.OCA, Usage.CEK]


def test_pdh_gen_and_pek_gen_rotate_the_right_keys(mb):
    ready(mb)
    first = export(mb)
    assert mb.cmd(Command.PDH_GEN)[0] == Status.SUCCESS
    second = export(mb)
    assert second.pdh != first.pdh and second.pek == first.pek and second.oca == first.oca
    assert mb.cmd(Command.PEK_GEN)[0] == Status.SUCCESS
    third = export(mb)
    assert third.pek != second.pek and third.oca != second.oca and third.pdh != second.pdh
    assert third.cek == first.cek  # the chip's identity does not change


def _import(
    mb: RawMailbox, pek: bytes, oca: bytes, pek_len: int = CERT_SIZE, oca_len: int = CERT_SIZE
):
    mb.write(DATA + 0x4000, pek)
    mb.write(DATA + 0x5000, oca)
    buf = c.PEK_CERT_IMPORT.build(
        pek_paddr=DATA + 0x4000, pek_len=pek_len, oca_paddr=DATA + 0x5000, oca_len=oca_len
    )
    return mb.cmd(Command.PEK_CERT_IMPORT, buf)[0]


def _csr(mb: RawMailbox) -> bytes:
    assert (
        mb.cmd(Command.PEK_CSR, c.PEK_CSR.build(csr_paddr=DATA, csr_len=CERT_SIZE))[0]
        == Status.SUCCESS
    )
    return mb.read(DATA, CERT_SIZE)


def test_external_ownership(mb, tmp_path):
    ready(mb)
    cert_path, key_path = owner_ca.generate(tmp_path)
    oca = SevCert.parse(cert_path.read_bytes())
    key = owner_ca.load_key(key_path)
    signed = owner_ca.sign_csr(_csr(mb), key, oca)
    assert _import(mb, signed.raw, oca.raw, pek_len=100) == Status.INVALID_LENGTH
    assert _import(mb, signed.raw, oca.raw) == Status.SUCCESS
    assert status_of(mb).platform_flags == c.PLATFORM_FLAG_OWNER
    chain = export(mb)
    assert chain.oca == oca
    assert chain.pek.signers() == [Usage.OCA, Usage.CEK]  # the firmware added its CEK signature
    assert firmware_validate(chain.pek, oca.signing_key()) == Status.SUCCESS
    assert firmware_validate(chain.pek, chain.cek.signing_key()) == Status.SUCCESS
    assert firmware_validate(chain.pdh, chain.pek.signing_key()) == Status.SUCCESS  # a new PDH
    assert _import(mb, signed.raw, oca.raw) == Status.ALREADY_OWNED
    assert mb.cmd(Command.PEK_GEN)[0] == Status.SUCCESS
    assert status_of(mb).platform_flags == 0  # self-owned again


def test_bad_imports_are_refused_and_change_nothing(mb, tmp_path):
    ready(mb)
    before = export(mb)
    cert_path, key_path = owner_ca.generate(tmp_path)
    oca = SevCert.parse(cert_path.read_bytes())
    key = owner_ca.load_key(key_path)
    signed = owner_ca.sign_csr(_csr(mb), key, oca)
    other_cert, _ = owner_ca.generate(tmp_path / "other")
    # Another OCA: the slot has its usage and algorithm, so the signature is checked and fails.
    assert _import(mb, signed.raw, other_cert.read_bytes()) == Status.BAD_SIGNATURE
    bad = bytearray(signed.raw)
    bad[0x414 + 8 + 5] ^= 1  # a bit of the OCA signature
    assert _import(mb, bytes(bad), oca.raw) == Status.BAD_SIGNATURE
    foreign = RawMailbox(make_platform("milan", seed=99))
    ready(foreign)
    foreign_pek = owner_ca.sign_csr(_csr(foreign), key, oca)
    assert _import(mb, foreign_pek.raw, oca.raw) == Status.INVALID_CERTIFICATE  # not our PEK
    assert status_of(mb).platform_flags == 0
    assert export(mb) == before


# ---- DF_FLUSH and WBINVD ---------------------------------------------------------------------
def test_df_flush_needs_wbinvd_on_every_core(mb):
    assert mb.init() == Status.SUCCESS
    fw = psp_port(mb)
    assert fw.asid_state(5)["dirty"] == 1  # every ASID is dirty after INIT
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    mb.machine.cores[0].wbinvd()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    mb.wbinvd_all()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    assert fw.asid_state(5) == {"handle": 0, "dirty": 0, "clean": 1, "allocated": 0, "in_use": 0}


def test_df_flush_cleans_asids_per_ccx():
    mb = RawMailbox(make_platform("rome", cores=8))  # two CCXs of four cores
    fw = psp_port(mb)
    assert mb.init() == Status.SUCCESS
    for core in mb.machine.cores[:4]:
        core.wbinvd()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    assert fw.asid_state(9)["dirty"] == 0b10 and fw.asid_state(9)["clean"] == 0b01
    for core in mb.machine.cores[4:]:
        core.wbinvd()
    assert mb.cmd(Command.DF_FLUSH)[0] == Status.SUCCESS
    assert fw.asid_state(9)["clean"] == 0b11


# ---- the state table, as a state machine ---------------------------------------------------------
class PlatformStates(RuleBasedStateMachine):
    """Any sequence of platform commands keeps the firmware in a state the spec allows, and
    every status is the one the spec gives for that state (sev-api.md §1.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.mb = RawMailbox(make_platform("rome", dram_size=1 << 30))
        self.state = PlatformState.UNINIT
        self.flushed = False

    def expect(self, command, allowed, buffer=None, ok=Status.SUCCESS, to=None):
        status, _ = self.mb.cmd(command, buffer)
        if self.state in allowed:
            assert status == ok, (command.name, self.state.name, status)
            if to is not None:
                self.state = to
        else:
            assert status == Status.INVALID_PLATFORM_STATE, (command.name, self.state.name, status)

    @rule()
    def init(self):
        self.expect(Command.INIT, {PlatformState.UNINIT}, c.INIT.build(), to=PlatformState.INIT)

    @rule()
    def init_ex_in_spi_mode(self):
        buf = c.INIT_EX.build(length=c.INIT_EX_LENGTH)
        self.expect(Command.INIT_EX, {PlatformState.UNINIT}, buf, to=PlatformState.INIT)

    @rule()
    def shutdown(self):
        assert self.mb.cmd(Command.SHUTDOWN)[0] == Status.SUCCESS
        self.state = PlatformState.UNINIT

    @rule()
    def platform_reset(self):
        self.expect(Command.PLATFORM_RESET, {PlatformState.UNINIT})

    @rule()
    def pek_gen(self):
        self.expect(Command.PEK_GEN, {PlatformState.INIT})

    @rule()
    def pdh_gen(self):
        self.expect(Command.PDH_GEN, {PlatformState.INIT, PlatformState.WORKING})

    @rule(length=st.sampled_from([0, CERT_SIZE]))
    def pek_csr(self, length):
        ok = Status.SUCCESS if length else Status.INVALID_LENGTH
        buf = c.PEK_CSR.build(csr_paddr=DATA, csr_len=length)
        self.expect(Command.PEK_CSR, {PlatformState.INIT, PlatformState.WORKING}, buf, ok=ok)

    @rule()
    def pdh_cert_export(self):
        buf = c.PDH_CERT_EXPORT.build(
            pdh_paddr=DATA, pdh_len=CERT_SIZE, chain_paddr=DATA + 0x1000, chain_len=3 * CERT_SIZE
        )
        self.expect(Command.PDH_CERT_EXPORT, {PlatformState.INIT, PlatformState.WORKING}, buf)

    @rule(cores=st.sets(st.integers(0, 3)))
    def wbinvd_then_df_flush(self, cores):
        for i in cores:
            self.mb.machine.cores[i].wbinvd()
        status, _ = self.mb.cmd(Command.DF_FLUSH)
        done = psp_port(self.mb).wbinvd_done()
        assert status == (Status.SUCCESS if all(done) else Status.WBINVD_REQUIRED)

    @rule()
    def nop_and_get_id(self):
        assert self.mb.cmd(Command.NOP)[0] == Status.SUCCESS
        assert (
            self.mb.cmd(Command.GET_ID, c.GET_ID.build(id_paddr=DATA, id_len=64))[0]
            == Status.SUCCESS
        )

    @invariant()
    def status_reports_the_state(self):
        st = status_of(self.mb)
        assert st.state == self.state
        if self.state == PlatformState.UNINIT:
            assert (st.platform_flags, st.config_flags, st.guest_count) == (0, 0, 0)
        assert not psp_port(self.mb).internal_errors


TestPlatformStates = PlatformStates.TestCase
TestPlatformStates.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_host_guest_owner_and_attack_code_never_use_the_inspection_port():
    """The port is a debugger's view (docs/firmware.md): none of the code that stands for
    a real party may reach for it, nor for the firmware object behind it."""
    from pathlib import Path

    import sevsim

    root = Path(sevsim.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for part in ("host", "guest", "owner", "attacks")
        for path in (root / part).rglob("*.py")
        if any(s in path.read_text() for s in ("psp.inspect", "inspection_port", "._psp"))
    ]
    assert offenders == []
