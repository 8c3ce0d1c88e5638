"""Launching a guest: LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_SECRET,
LAUNCH_FINISH, and the legacy ATTESTATION report (sev-api.md §5; AMD-ASPFW sev_mcmd.c).

The guest's initial memory is encrypted in place under its VEK and measured; the owner
checks the measurement and sends secrets over the channel the session opened.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes

from sevsim import crypto
from sevsim.api import channel
from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.api.vmsa import VMSA_SIZE
from sevsim.certs.sev import EC_FIELD, Algo, Usage
from sevsim.psp.asids import AsidCommands
from sevsim.psp.context import SCRATCH_SIZE, FirmwareContext
from sevsim.psp.guest import Activation, Guest, GuestState
from sevsim.psp.key_agreement import open_channel
from sevsim.psp.x86mem import FirmwareError

SCRATCH_CHUNK = 1 << 20  # MODEL: bulk copies go through a 1 MiB work buffer


class LaunchCommands:
    def __init__(self, ctx: FirmwareContext, asids: AsidCommands) -> None:
        self.ctx = ctx
        self.asids = asids  # LAUNCH_FINISH enables a pending ASID
        self._scratch = np.empty(SCRATCH_CHUNK, dtype=np.uint8)  # the firmware's work buffer

    def launch_start(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        tek = tik = bytes(16)  # no DH certificate: no channel, zero keys, policy unchecked
        if buf.dh_cert_paddr:
            tek, tik = open_channel(ctx, buf, buf.dh_cert_paddr, buf.dh_cert_len)
        return ctx.new_guest(buf, tek, tik, GuestState.LUPDATE)

    def _launch_guest(self, handle: int, state: GuestState) -> Guest:
        self.ctx.require_working()
        guest = self.ctx.guest(handle)
        if guest.state != state:
            raise FirmwareError(Status.INVALID_GUEST_STATE)
        return guest

    def launch_update_data(self, buf) -> Status:
        return self._launch_update(buf, vmsa=False)

    def launch_update_vmsa(self, buf) -> Status:
        """An SEV-ES vCPU's initial save area: measured as supplied, encrypted in place like
        LAUNCH_UPDATE_DATA, and its integrity value handed to the hardware, which VMRUN
        checks. The length is checked before anything else (AMD-ASPFW)."""
        if buf.len != VMSA_SIZE:
            return Status.INVALID_LENGTH
        return self._launch_update(buf, vmsa=True)

    def _launch_update(self, buf, vmsa: bool) -> Status:
        guest = self._launch_guest(buf.handle, GuestState.LUPDATE)
        if vmsa and not guest.is_es:
            return Status.UNSUPPORTED
        if guest.inactive:
            return Status.INACTIVE
        if buf.paddr % 16:
            return Status.INVALID_ADDRESS
        if buf.len % 16 or buf.len == 0:
            return Status.INVALID_LENGTH
        # Read with rd_sz_wbinvd: the host's cached lines of the plaintext are written back
        # and dropped, then the page is rewritten under the VEK in place.
        mem, scratch = self.ctx.mem, self._scratch
        for off in range(0, buf.len, len(scratch)):
            chunk = scratch[: min(len(scratch), buf.len - off)]
            mem.read_into(buf.paddr + off, chunk, flush=True)
            guest.digest.update(chunk)
            if vmsa:
                # MODEL: AMD-ASPFW writes a CRC block address into the VMSA (0x388) after
                # measuring it and keeps the CRC in the SEV-ES TMR; here the chip keeps the
                # page's integrity value itself, and the measured bytes are the same.
                spa = mem.check(buf.paddr, buf.len)
                self.ctx.hw.seal_vmsa(spa, chunk.tobytes())
                guest.vmsa_pages.append(spa)
            mem.write_guest_from(buf.paddr + off, chunk, guest.asid)
        return Status.SUCCESS

    def launch_measure(self, buf) -> Status:
        ctx = self.ctx
        guest = self._launch_guest(buf.handle, GuestState.LUPDATE)
        if buf.measure_len < cmd.MEASUREMENT.size:
            buf.measure_len = cmd.MEASUREMENT.size
            return Status.INVALID_LENGTH
        launch_digest = guest.digest.digest()
        mnonce = ctx.trng.random_bytes(16, "mnonce")
        major, minor, build = ctx.api_version
        measure = crypto.hmac_sha256(
            guest.tik,
            bytes([channel.CTX_MEASURE, major, minor, build])
            + crypto.le(guest.policy, 4)
            + launch_digest
            + mnonce,
        )
        ctx.mem.write(buf.measure_paddr, cmd.MEASUREMENT.build(measure=measure, mnonce=mnonce))
        guest.measurement, guest.launch_digest = measure, launch_digest
        guest.transition(Command.LAUNCH_MEASURE)
        return Status.SUCCESS

    def launch_secret(self, buf) -> Status:
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if buf.guest_paddr % 16:
            return Status.INVALID_ADDRESS
        if (
            buf.hdr_len != cmd.PACKET_HEADER.size
            or buf.guest_len % 16
            or buf.guest_len == 0
            or buf.guest_len > SCRATCH_SIZE
            or buf.guest_len != buf.trans_len
        ):
            return Status.INVALID_LENGTH
        if guest.state != GuestState.LSECRET:
            return Status.INVALID_GUEST_STATE
        if guest.inactive:
            return Status.INACTIVE
        header = cmd.PACKET_HEADER.parse(ctx.mem.read(buf.hdr_paddr, cmd.PACKET_HEADER.size))
        # Write back and drop whatever the caches hold of the target, in both host domains
        # (rd_sz_wbinvd and two dummy reads, AMD-ASPFW), before it is rewritten.
        cbit = ctx.hw.cbit_mask
        ctx.mem.read(buf.guest_paddr | cbit, buf.trans_len, flush=True)
        ctx.mem.read(buf.guest_paddr & ~cbit, buf.trans_len, flush=True)
        ciphertext = ctx.mem.read(buf.trans_paddr, buf.trans_len)
        expected = channel.packet_mac(
            guest.tik,
            channel.CTX_SECRET,
            header.flags,
            header.iv,
            buf.guest_len,
            buf.trans_len,
            ciphertext,
            guest.measurement,
        )
        if not crypto.equal(expected, header.mac):
            return Status.BAD_MEASUREMENT
        if header.flags & cmd.PACKET_FLAG_COMPRESSED:
            return Status.UNSUPPORTED
        secret = crypto.aes128_ctr(guest.tek, header.iv, ciphertext)
        ctx.mem.write_guest(buf.guest_paddr, secret, guest.asid)
        return Status.SUCCESS

    def launch_finish(self, buf) -> Status:
        guest = self._launch_guest(buf.handle, GuestState.LSECRET)
        if guest.activation == Activation.PENDING:
            self.asids.enable(guest)
        guest.close_channel()
        guest.transition(Command.LAUNCH_FINISH)
        return Status.SUCCESS

    def attestation(self, buf) -> Status:
        """The legacy SEV attestation report (sev-api.md §5.7), signed by the PEK."""
        ctx = self.ctx
        ctx.require_working()
        guest = ctx.guest(buf.handle)
        if guest.state not in (
            GuestState.LSECRET,
            GuestState.RUNNING,
            GuestState.SUPDATE,
            GuestState.SENT,
        ):
            return Status.INVALID_GUEST_STATE
        if buf.len < cmd.ATTESTATION_REPORT.size:
            buf.len = cmd.ATTESTATION_REPORT.size
            return Status.INVALID_LENGTH
        report = cmd.ATTESTATION_REPORT.new(
            mnonce=buf.mnonce,
            launch_digest=guest.launch_digest,
            policy=guest.policy,
            sig_usage=Usage.PEK,
            sig_algo=Algo.ECDSA_SHA256,
        )
        signed = cmd.ATTESTATION_REPORT.build(report)[: cmd.ATTESTATION_SIGNED_SIZE]
        pek = crypto.p384_private_from_scalar(ctx.require_identity().persistent.pek_key)
        r, s_ = crypto.ecdsa_sign(pek, signed, hashes.SHA256())
        report.sig_r, report.sig_s = crypto.le(r, EC_FIELD), crypto.le(s_, EC_FIELD)
        ctx.mem.write(buf.paddr, cmd.ATTESTATION_REPORT.build(report))
        buf.len = cmd.ATTESTATION_REPORT.size
        return Status.SUCCESS
