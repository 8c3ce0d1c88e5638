"""Migration: SEND_START, SEND_UPDATE_DATA, SEND_FINISH, SEND_CANCEL, RECEIVE_START,
RECEIVE_UPDATE_DATA, RECEIVE_FINISH (sev-api.md §6; AMD-ASPFW sev_mcmd_send_*,
sev_mcmd_receive_*).

The sender checks the receiver's certificate chain against the policy (SEV: back to the
fused ARK; DOMAIN: the same owner), then re-encrypts guest pages from the VEK to the
transport keys; the receiver decrypts them under a new VEK.
"""

from __future__ import annotations

from sevsim import crypto
from sevsim.api import channel
from sevsim.api import commands as cmd
from sevsim.api import policy as sev_policy
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.amd import AmdCert
from sevsim.certs.sev import CERT_SIZE, CertError, SevCert, Usage, firmware_validate
from sevsim.psp.asids import AsidCommands
from sevsim.psp.context import CHAIN_SIZE, SCRATCH_SIZE, FirmwareContext
from sevsim.psp.guest import Activation, GuestState
from sevsim.psp.key_agreement import ecdh, open_channel
from sevsim.psp.x86mem import FirmwareError

AMD_CHAIN_MAX = 2 * (0x40 + 3 * 512)  # ASK ‖ ARK, RSA-4096 at most


class MigrationCommands:
    def __init__(self, ctx: FirmwareContext, asids: AsidCommands) -> None:
        self.ctx = ctx
        self.asids = asids  # RECEIVE_FINISH enables a pending ASID

    # ---- the sender --------------------------------------------------------------------------
    def send_start(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if buf.session_len != cmd.SESSION.size:
            buf.session_len = cmd.SESSION.size
            return Status.INVALID_LENGTH
        if guest.state != GuestState.RUNNING:
            return Status.INVALID_GUEST_STATE
        if guest.policy & sev_policy.PolicyFlag.NOSEND:
            return Status.POLICY_FAILURE
        chain: tuple[SevCert, SevCert, SevCert] | None = None  # PEK, OCA, CEK
        if guest.policy & sev_policy.PolicyFlag.SEV:
            chain, pdh = self._validate_platform(buf)
            pek = chain[0]
            if pek.api_version < sev_policy.api_min(guest.policy):
                return Status.POLICY_FAILURE
        if guest.policy & sev_policy.PolicyFlag.DOMAIN:
            if chain is None:
                chain, pdh = self._receiver_certs(buf)
            pek, oca, _ = chain
            oca_key = oca.signing_key()
            for cert, key in ((oca, oca_key), (pek, oca_key), (pdh, pek.signing_key())):
                status = firmware_validate(cert, key)
                if status != Status.SUCCESS:
                    return status
            if oca.raw != bytes.fromhex(ctx.require_identity().persistent.oca_cert):
                return Status.POLICY_FAILURE
        if chain is None:
            if buf.pdh_len != CERT_SIZE:
                return Status.INVALID_LENGTH
            pdh = SevCert.parse(ctx.mem.read(buf.pdh_paddr, CERT_SIZE))
        # The client side of the channel: new transport keys wrapped for the receiver.
        z = ecdh(ctx, pdh)
        tek, tik = ctx.trng.random_bytes(16, "tek"), ctx.trng.random_bytes(16, "tik")
        nonce, wrap_iv = ctx.trng.random_bytes(16, "nonce"), ctx.trng.random_bytes(16, "iv")
        ctx.mem.write(buf.session_paddr, channel.wrap(z, nonce, wrap_iv, tek, tik, guest.policy))
        buf.policy = guest.policy
        guest.transition(Command.SEND_START)
        guest.tek, guest.tik = tek, tik
        return Status.SUCCESS

    def _receiver_certs(self, buf) -> tuple[tuple[SevCert, SevCert, SevCert], SevCert]:
        mem = self.ctx.mem
        if buf.plat_certs_len != CHAIN_SIZE or buf.pdh_len != CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        raw = mem.read(buf.plat_certs_paddr, CHAIN_SIZE)
        certs = tuple(
            SevCert.parse(raw[i : i + CERT_SIZE]) for i in range(0, CHAIN_SIZE, CERT_SIZE)
        )
        pdh = SevCert.parse(mem.read(buf.pdh_paddr, CERT_SIZE))
        return certs, pdh  # type: ignore[return-value]

    def _validate_platform(self, buf) -> tuple[tuple[SevCert, SevCert, SevCert], SevCert]:
        """The receiver's ARK -> ASK -> CEK -> PEK -> PDH, the ARK being the fused root."""
        if buf.plat_certs_len != CHAIN_SIZE or buf.pdh_len != CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        if not 0 < buf.amd_certs_len <= AMD_CHAIN_MAX:
            raise FirmwareError(Status.INVALID_LENGTH)
        chain, pdh = self._receiver_certs(buf)
        amd = self.ctx.mem.read(buf.amd_certs_paddr, buf.amd_certs_len)
        try:
            ask_len = AmdCert.size_of(amd)
            ask, ark = AmdCert.parse(amd[:ask_len]), AmdCert.parse(amd[ask_len:])
        except CertError:
            raise FirmwareError(Status.INVALID_CERTIFICATE) from None
        fuses = self.ctx.fuses
        if (
            ark.check_signed_by(ark) is not None
            or ark.usage != Usage.ARK
            or ark.key_id != fuses.ark_key_id
            or ark.public_key_hash() != fuses.ark_hash
            or ask.check_signed_by(ark) is not None
            or ask.usage != Usage.ASK
        ):
            raise FirmwareError(Status.INVALID_CERTIFICATE)
        pek, _oca, cek = chain
        for cert, key in (
            (cek, ask.signing_key()),
            (pek, cek.signing_key()),
            (pdh, pek.signing_key()),
        ):
            status = firmware_validate(cert, key)
            if status != Status.SUCCESS:
                raise FirmwareError(status)
        return chain, pdh

    def send_update_data(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        if buf.hdr_len < cmd.PACKET_HEADER.size:
            buf.hdr_len = cmd.PACKET_HEADER.size
            return Status.INVALID_LENGTH
        guest = ctx.guest(buf.handle)
        if guest.state != GuestState.SUPDATE:
            return Status.INVALID_GUEST_STATE
        if not guest.asid or not ctx.asids.in_use[guest.asid]:
            return Status.INACTIVE
        if (
            buf.guest_len == 0
            or buf.guest_len > SCRATCH_SIZE
            or buf.guest_len % 16
            or buf.trans_len < buf.guest_len
        ):
            return Status.INVALID_LENGTH
        if buf.guest_paddr % 16:
            return Status.INVALID_ADDRESS
        # Guest memory is under the VEK; the C-bit of the address does not matter here.
        plaintext = ctx.mem.read_guest(buf.guest_paddr, buf.guest_len, guest.asid)
        iv = ctx.trng.random_bytes(16, "packet-iv")
        ciphertext = crypto.aes128_ctr(guest.tek, iv, plaintext)
        n = buf.guest_len
        mac = channel.packet_mac(guest.tik, channel.CTX_DATA, 0, iv, n, n, ciphertext)
        ctx.mem.write(buf.trans_paddr, ciphertext)
        ctx.mem.write(buf.hdr_paddr, cmd.PACKET_HEADER.build(flags=0, iv=iv, mac=mac))
        buf.hdr_len = cmd.PACKET_HEADER.size
        return Status.SUCCESS

    def send_finish(self, buf) -> Status:
        return self._send_end(buf, Command.SEND_FINISH)

    def send_cancel(self, buf) -> Status:
        return self._send_end(buf, Command.SEND_CANCEL)

    def _send_end(self, buf, command: Command) -> Status:
        self.ctx.require_working()
        guest = self.ctx.guest(buf.handle)
        if guest.state != GuestState.SUPDATE:
            return Status.INVALID_GUEST_STATE
        guest.close_channel()
        guest.transition(command)
        return Status.SUCCESS

    # ---- the receiver ------------------------------------------------------------------------
    def receive_start(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.session_len != cmd.SESSION.size or buf.pdh_len != CERT_SIZE:
            return Status.INVALID_LENGTH
        tek, tik = open_channel(ctx, buf, buf.pdh_paddr, buf.pdh_len)  # the sender's PDH
        return ctx.new_guest(buf, tek, tik, GuestState.RUPDATE)

    def receive_update_data(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if guest.state != GuestState.RUPDATE:
            return Status.INVALID_GUEST_STATE
        if guest.inactive:
            return Status.INACTIVE
        if (
            buf.trans_len == 0
            or buf.trans_len > SCRATCH_SIZE
            or buf.guest_len != buf.trans_len
            or buf.trans_len % 16
            or buf.hdr_len < cmd.PACKET_HEADER.size
        ):
            return Status.INVALID_LENGTH
        if buf.guest_paddr % 16:
            return Status.INVALID_ADDRESS
        header = cmd.PACKET_HEADER.parse(ctx.mem.read(buf.hdr_paddr, cmd.PACKET_HEADER.size))
        if header.flags & cmd.PACKET_FLAG_COMPRESSED:
            return Status.UNSUPPORTED
        ciphertext = ctx.mem.read(buf.trans_paddr, buf.trans_len)
        n = buf.trans_len
        expected = channel.packet_mac(
            guest.tik, channel.CTX_DATA, header.flags, header.iv, n, n, ciphertext
        )
        if not crypto.equal(expected, header.mac):
            return Status.BAD_MEASUREMENT
        plaintext = crypto.aes128_ctr(guest.tek, header.iv, ciphertext)
        ctx.mem.write_guest(buf.guest_paddr, plaintext, guest.asid)
        return Status.SUCCESS

    def receive_finish(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if guest.state != GuestState.RUPDATE:
            return Status.INVALID_GUEST_STATE
        if guest.activation == Activation.PENDING:
            self.asids.enable(guest)
        guest.close_channel()
        guest.launch_digest = bytes(32)  # a received guest was never measured here
        guest.transition(Command.RECEIVE_FINISH)
        return Status.SUCCESS
