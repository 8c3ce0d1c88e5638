"""The platform and its ownership: INIT, INIT_EX, SHUTDOWN, PLATFORM_RESET, PLATFORM_STATUS,
PEK_GEN, PEK_CSR, PEK_CERT_IMPORT, PDH_GEN, PDH_CERT_EXPORT, GET_ID, NOP (sev-api.md §4,
§7.1, §7.2; AMD-ASPFW sev_mcmd.c, sev_plat.c).

The platform keys live here: the CEK derived from the fuses at INIT, and the OCA, PEK and
PDH kept sealed in the persistent store (SPI flash, or the INIT_EX NV area).
"""

from __future__ import annotations

from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto
from sevsim.api import commands as cmd
from sevsim.api.status import PlatformState, Status
from sevsim.certs.sev import CERT_SIZE, Algo, CertError, SevCert, Usage, firmware_validate
from sevsim.psp import identity
from sevsim.psp.context import CHAIN_SIZE, FirmwareContext, Identity
from sevsim.psp.persistent import ERASED, NV_LENGTH, PersistentIdentity, SealError, seal, unseal
from sevsim.psp.x86mem import FirmwareError

TMR_SIZE = 1 << 20
TMR_ALIGN = 1 << 20


class PlatformCommands:
    def __init__(self, ctx: FirmwareContext) -> None:
        self.ctx = ctx

    # ---- keys and certificates ---------------------------------------------------------
    def _new_key(self) -> ec.EllipticCurvePrivateKey:
        rdata = self.ctx.trng.random_bytes(56, "p384-key")
        return crypto.p384_private_from_scalar(identity.scalar_from_random(rdata))

    def _cert(self, usage: Usage, algo: Algo, key: ec.EllipticCurvePrivateKey) -> SevCert:
        major, minor, _ = self.ctx.api_version
        return SevCert.create(usage, algo, key.public_key(), major, minor)

    def _generate_oca(self, p: PersistentIdentity) -> PersistentIdentity:
        key = self._new_key()
        cert = self._cert(Usage.OCA, Algo.ECDSA_SHA256, key).signed(
            key, Usage.OCA, Algo.ECDSA_SHA256
        )
        return replace(p, externally_owned=False, oca_key=_scalar(key), oca_cert=cert.raw.hex())

    def _generate_pek(
        self, p: PersistentIdentity, cek: ec.EllipticCurvePrivateKey
    ) -> PersistentIdentity:
        if p.oca_key is None:
            raise FirmwareError(Status.INVALID_CERTIFICATE)
        key = self._new_key()
        oca = crypto.p384_private_from_scalar(p.oca_key)
        cert = (
            self._cert(Usage.PEK, Algo.ECDSA_SHA256, key)
            .signed(oca, Usage.OCA, Algo.ECDSA_SHA256, slot=0)
            .signed(cek, Usage.CEK, Algo.ECDSA_SHA256, slot=1)
        )
        return replace(p, pek_key=_scalar(key), pek_cert=cert.raw.hex())

    def _generate_pdh(self, p: PersistentIdentity) -> PersistentIdentity:
        if p.pek_key is None:
            raise FirmwareError(Status.INVALID_CERTIFICATE)
        key = self._new_key()
        pek = crypto.p384_private_from_scalar(p.pek_key)
        cert = self._cert(Usage.PDH, Algo.ECDH_SHA256, key).signed(
            pek, Usage.PEK, Algo.ECDSA_SHA256
        )
        return replace(p, pdh_key=_scalar(key), pdh_cert=cert.raw.hex())

    # ---- persistent storage --------------------------------------------------------------
    def _load(self) -> PersistentIdentity | None:
        ctx = self.ctx
        if ctx.nv_paddr:
            blob = ctx.mem.read(ctx.nv_paddr, NV_LENGTH)
        else:
            blob = ctx.spi.read()
        try:
            return unseal(ctx.fuses.cuk, blob or b"")
        except SealError:
            if ctx.nv_paddr:  # the firmware erases a bad NV area before reporting it
                ctx.mem.write(ctx.nv_paddr, bytes([ERASED]) * NV_LENGTH)
            raise FirmwareError(Status.SECURE_DATA_INVALID) from None

    def _save(self, p: PersistentIdentity) -> None:
        ctx = self.ctx
        blob = seal(ctx.fuses.cuk, p, ctx.trng.random_bytes(12, "seal-nonce"))
        if ctx.nv_paddr:
            ctx.mem.write(ctx.nv_paddr, blob.ljust(NV_LENGTH, bytes([ERASED])))
        else:
            ctx.spi.write(blob)

    # ---- INIT / INIT_EX / SHUTDOWN ------------------------------------------------------------
    def init(self, buf) -> Status:
        return self._init_common(buf, ex=False)

    def init_ex(self, buf) -> Status:
        return self._init_common(buf, ex=True)

    def _init_common(self, buf, ex: bool) -> Status:
        if self.ctx.state != PlatformState.UNINIT:
            return Status.INVALID_PLATFORM_STATE
        try:
            status = self._do_init(buf, ex)
        except FirmwareError as exc:
            status = exc.status
        if status != Status.SUCCESS:
            self._clear()
        return status

    def _do_init(self, buf, ex: bool) -> Status:
        ctx, hw = self.ctx, self.ctx.hw
        if not hw.smee_all_cores():
            return Status.HWERROR_PLATFORM  # SME must be enabled (SYSCFG[23]) on every core
        layout = cmd.INIT_EX if ex else cmd.INIT
        if buf.flags & ~cmd.CONFIG_FLAG_ES or not layout.reserved_ok(ctx.raw_buffer):
            return Status.INVALID_CONFIG
        if buf.flags & cmd.CONFIG_FLAG_ES and not hw.sev_es:
            return Status.INVALID_CONFIG  # a part without SEV-ES knows no CONFIG.ES bit
        ctx.nv_paddr = 0
        if ex:
            if buf.length != cmd.INIT_EX_LENGTH:
                return Status.INVALID_LENGTH
            if buf.nv_paddr:
                if buf.nv_paddr % 4096:
                    return Status.INVALID_ADDRESS
                ctx.mem.check(buf.nv_paddr, max(buf.nv_len, 1))
                if buf.nv_len != NV_LENGTH:
                    return Status.INVALID_LENGTH
            ctx.nv_paddr = buf.nv_paddr
        p = self._load() or PersistentIdentity()
        cek = identity.derive_cek(ctx.fuses.cuk)
        changed = False
        if not p.oca_cert:
            p = replace(self._generate_oca(p), pek_key=None, pek_cert="")
            changed = True
        if not p.pek_cert:
            p = replace(self._generate_pek(p, cek), pdh_key=None, pdh_cert="")
            changed = True
        if not p.pdh_cert:
            p = self._generate_pdh(p)
            changed = True
        if changed:
            self._save(p)
        # Every ASID is dirty on every CCX, and every core owes a WBINVD before a DF_FLUSH.
        table = ctx.asids
        for asid in table.asids():
            table.dirty[asid] = table.ccx_all
            table.clean[asid] = table.allocated[asid] = table.in_use[asid] = 0
            hw.disable_asid(asid, table.ccx_all)
        hw.clear_wbinvd_done(range(hw.cores))
        if buf.flags & cmd.CONFIG_FLAG_ES:
            self._reserve_tmr(buf.tmr_paddr, buf.tmr_len)
        ctx.identity = Identity(cek, p)
        ctx.config_flags = buf.flags
        ctx.state = PlatformState.INIT
        return Status.SUCCESS

    def _reserve_tmr(self, paddr: int, length: int) -> None:
        ctx, cbit = self.ctx, self.ctx.hw.cbit_mask
        pa = paddr & ~cbit
        if pa % TMR_ALIGN:
            raise FirmwareError(Status.INVALID_ADDRESS)
        if length != TMR_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        ctx.mem.check(paddr, length)
        if (
            ctx.nv_paddr
            and pa < (ctx.nv_paddr & ~cbit) + NV_LENGTH
            and (ctx.nv_paddr & ~cbit) < pa + length
        ):
            raise FirmwareError(Status.INVALID_ADDRESS)  # the TMR and the NV area overlap
        ctx.tmr = (pa, pa + length)
        ctx.mem.reserved = [ctx.tmr]

    def _clear(self) -> None:
        """Back to the state after reset: no identity, no guests, no TMR."""
        ctx = self.ctx
        for guest in ctx.guests.values():
            if guest.asid:
                ctx.hw.disable_asid(guest.asid, ctx.asids.ccx_all)
        ctx.guests.clear()
        ctx.identity = None
        ctx.state = PlatformState.UNINIT
        ctx.config_flags = 0
        ctx.guest_count = 0
        ctx.tmr = None
        ctx.mem.reserved = []

    def shutdown(self, _buf) -> Status:
        self._clear()
        return Status.SUCCESS

    def platform_reset(self, _buf) -> Status:
        if self.ctx.state != PlatformState.UNINIT:
            return Status.INVALID_PLATFORM_STATE
        self.ctx.spi.erase()  # the SPI flash only (AMD-ASPFW sev_mcmd_platform_reset)
        return Status.SUCCESS

    def platform_status(self, buf) -> Status:
        ctx = self.ctx
        major, minor, build = ctx.api_version
        buf.api_major, buf.api_minor, buf.build_id = major, minor, build
        buf.state = ctx.state
        if ctx.state != PlatformState.UNINIT:
            owned = ctx.require_identity().persistent.externally_owned
            buf.platform_flags = cmd.PLATFORM_FLAG_OWNER if owned else 0
            buf.config_flags = ctx.config_flags
            buf.guest_count = ctx.guest_count
        return Status.SUCCESS

    # ---- platform keys ------------------------------------------------------------------------
    def pek_gen(self, _buf) -> Status:
        if self.ctx.state != PlatformState.INIT:
            return Status.INVALID_PLATFORM_STATE
        ident = self.ctx.require_identity()
        p = self._generate_oca(ident.persistent)
        p = self._generate_pdh(self._generate_pek(p, ident.cek))
        self._save(p)
        ident.persistent = p
        return Status.SUCCESS

    def pdh_gen(self, _buf) -> Status:
        if self.ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        ident = self.ctx.require_identity()
        p = self._generate_pdh(ident.persistent)
        self._save(p)
        ident.persistent = p
        return Status.SUCCESS

    def pek_csr(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.csr_len < CERT_SIZE:
            buf.csr_len = CERT_SIZE
            return Status.INVALID_LENGTH
        pek = SevCert.parse(bytes.fromhex(ctx.require_identity().persistent.pek_cert))
        ctx.mem.write(buf.csr_paddr, pek.without_signatures().raw)
        buf.csr_len = CERT_SIZE
        return Status.SUCCESS

    def pek_cert_import(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state != PlatformState.INIT:
            return Status.INVALID_PLATFORM_STATE
        ident = ctx.require_identity()
        if ident.persistent.externally_owned:
            return Status.ALREADY_OWNED
        if buf.pek_len != CERT_SIZE or buf.oca_len != CERT_SIZE:
            return Status.INVALID_LENGTH
        pek = SevCert.parse(ctx.mem.read(buf.pek_paddr, CERT_SIZE))
        oca = SevCert.parse(ctx.mem.read(buf.oca_paddr, CERT_SIZE))
        try:
            oca_key = oca.signing_key()
        except CertError:
            return Status.INVALID_CERTIFICATE
        for status in (firmware_validate(oca, oca_key), firmware_validate(pek, oca_key)):
            if status != Status.SUCCESS:
                return status
        own = SevCert.parse(bytes.fromhex(ident.persistent.pek_cert))
        if pek.body != own.body:
            return Status.INVALID_CERTIFICATE  # the PEK was altered outside the firmware
        cek_sig = next(((u, a, s) for u, a, s in own.slots() if u == Usage.CEK), None)
        free = [i for i, (u, _, _) in enumerate(pek.slots()) if u == Usage.INVALID]
        if cek_sig is None or not free:
            return Status.INVALID_CERTIFICATE
        pek = pek.with_slot(free[0], *cek_sig)
        p = replace(
            ident.persistent,
            externally_owned=True,
            oca_key=None,
            oca_cert=oca.raw.hex(),
            pek_cert=pek.raw.hex(),
        )
        p = self._generate_pdh(p)
        self._save(p)  # on failure the old identity stays in place
        ident.persistent = p
        return Status.SUCCESS

    def pdh_cert_export(self, buf) -> Status:
        ctx = self.ctx
        if ctx.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.pdh_len < CERT_SIZE or buf.chain_len < CHAIN_SIZE:
            buf.pdh_len, buf.chain_len = CERT_SIZE, CHAIN_SIZE
            return Status.INVALID_LENGTH
        ident = ctx.require_identity()
        p = ident.persistent
        ctx.mem.write(buf.pdh_paddr, bytes.fromhex(p.pdh_cert))
        # The firmware exports the CEK unsigned; AMD's KDS serves the ASK-signed one.
        cek = self._cert(Usage.CEK, Algo.ECDSA_SHA256, ident.cek)
        ctx.mem.write(
            buf.chain_paddr, bytes.fromhex(p.pek_cert) + bytes.fromhex(p.oca_cert) + cek.raw
        )
        buf.pdh_len, buf.chain_len = CERT_SIZE, CHAIN_SIZE
        return Status.SUCCESS

    def get_id(self, buf) -> Status:
        if buf.id_len < cmd.GET_ID_LENGTH:
            buf.id_len = cmd.GET_ID_LENGTH
            return Status.INVALID_LENGTH
        self.ctx.mem.write(buf.id_paddr, identity.chip_id(self.ctx.fuses.cuk))
        buf.id_len = cmd.GET_ID_LENGTH
        return Status.SUCCESS

    def nop(self, _buf) -> Status:
        return Status.SUCCESS


def _scalar(key: ec.EllipticCurvePrivateKey) -> int:
    return key.private_numbers().private_value
