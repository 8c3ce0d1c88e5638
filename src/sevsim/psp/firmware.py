"""The SEV firmware of the AMD Secure Processor (sev-api.md §1, §3, §4, §7; AMD-ASPFW).

Reached only through the mailbox (``psp.mailbox``): ``dispatch`` copies the command buffer
in from x86 memory, runs the handler, and copies it back as the real dispatcher does —
input-only commands never write back, output-only commands write on success, and the
"output even on error" commands also write back on INVALID_LENGTH so the host learns the
size it must provide. Every handler checks in the firmware's order: platform state, guest
handle, guest state, then the rest. No Python exception leaves ``dispatch``: a failure is a
status code, and an unexpected internal error is reported as HWERROR_PLATFORM.

Secrets (CEK, OCA/PEK/PDH private keys, and later the guests' keys) live only in this
object's private attributes and, sealed, in the persistent store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sevsim import crypto
from sevsim.api import channel
from sevsim.api import commands as cmd
from sevsim.api import policy as sev_policy
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.amd import AmdCert
from sevsim.certs.sev import (
    CERT_SIZE,
    EC_FIELD,
    Algo,
    CertError,
    SevCert,
    Usage,
    firmware_validate,
    sanity_check,
)
from sevsim.psp import identity
from sevsim.psp.guest import GUEST_COUNT_MAX, Activation, Guest, GuestState
from sevsim.psp.persistent import (
    ERASED,
    NV_LENGTH,
    PersistentIdentity,
    SealError,
    SpiFlash,
    seal,
    unseal,
)
from sevsim.psp.x86mem import FirmwareError, X86Memory
from sevsim.soc.rng import EntropySource

log = logging.getLogger(__name__)

CHAIN_SIZE = 3 * CERT_SIZE  # PEK || OCA || CEK
MEASUREMENT_SIZE = 48  # MEASURE 32 | MNONCE 16
AMD_CHAIN_MAX = 2 * (0x40 + 3 * 512)  # ASK ‖ ARK, RSA-4096 at most
SCRATCH_SIZE = 0x5000  # SEV_SCRATCH_BUF_LEN: the largest secret a packet may carry
SCRATCH_CHUNK = 1 << 20  # MODEL: bulk copies go through a 1 MiB work buffer
APIC_ID_SIZE = 4
TMR_SIZE = 1 << 20
TMR_ALIGN = 1 << 20


class Buffer(Enum):
    """How the dispatcher treats a command's buffer (AMD-ASPFW sev_dispatch.c)."""

    NONE = 0
    IN = 1
    OUT = 2
    IN_OUT = 3
    IN_OUT_ERROR = 4  # written back on success and on INVALID_LENGTH


@dataclass
class Identity:
    """The platform keys while the firmware is initialised."""

    cek: ec.EllipticCurvePrivateKey
    persistent: PersistentIdentity

    def __repr__(self) -> str:
        return "<Identity (keys not shown)>"


class SevFirmware:
    def __init__(self, hw, fuses, spi: SpiFlash, profile, entropy: EntropySource) -> None:
        self._hw = hw
        self._fuses = fuses
        self._spi = spi
        self._profile = profile
        self._trng = entropy
        self._mem = X86Memory(hw)
        self.api_version = (profile.fw_api_major, profile.fw_api_minor, profile.fw_build)
        self.state = PlatformState.UNINIT
        self.config_flags = 0
        self.guest_count = 0
        self._identity: Identity | None = None
        self._nv_paddr = 0  # 0: the SPI flash; else the INIT_EX NV area in x86 memory
        self._tmr: tuple[int, int] | None = None
        # Per ASID, a bitmask of CCXs in each firmware state (sev-api.md §7.3).
        self._ccx_all = (1 << hw.ccx_count) - 1
        n = hw.max_asid + 1
        self._asid_dirty = [0] * n
        self._asid_clean = [0] * n
        self._asid_allocated = [0] * n
        self._asid_in_use = [0] * n
        self.internal_errors: list[str] = []
        self._raw_buffer = b""  # the command buffer as read, for must-be-zero checks
        self._handlers: dict[int, tuple[Callable[[Any], Status], Buffer]] = {
            Command.INIT: (self._init, Buffer.IN),
            Command.INIT_EX: (self._init_ex, Buffer.IN),
            Command.SHUTDOWN: (self._shutdown, Buffer.NONE),
            Command.PLATFORM_RESET: (self._platform_reset, Buffer.NONE),
            Command.PLATFORM_STATUS: (self._platform_status, Buffer.OUT),
            Command.PEK_GEN: (self._pek_gen, Buffer.NONE),
            Command.PEK_CSR: (self._pek_csr, Buffer.IN_OUT_ERROR),
            Command.PEK_CERT_IMPORT: (self._pek_cert_import, Buffer.IN),
            Command.PDH_CERT_EXPORT: (self._pdh_cert_export, Buffer.IN_OUT_ERROR),
            Command.PDH_GEN: (self._pdh_gen, Buffer.NONE),
            Command.DF_FLUSH: (self._df_flush, Buffer.NONE),
            Command.GET_ID: (self._get_id, Buffer.IN_OUT_ERROR),
            Command.NOP: (self._nop, Buffer.NONE),
            Command.DECOMMISSION: (self._decommission, Buffer.IN),
            Command.ACTIVATE: (self._activate, Buffer.IN),
            Command.ACTIVATE_EX: (self._activate_ex, Buffer.IN),
            Command.DEACTIVATE: (self._deactivate, Buffer.IN),
            Command.GUEST_STATUS: (self._guest_status, Buffer.IN_OUT),
            Command.LAUNCH_START: (self._launch_start, Buffer.IN_OUT),
            Command.LAUNCH_UPDATE_DATA: (self._launch_update_data, Buffer.IN),
            Command.LAUNCH_MEASURE: (self._launch_measure, Buffer.IN_OUT_ERROR),
            Command.LAUNCH_SECRET: (self._launch_secret, Buffer.IN),
            Command.LAUNCH_FINISH: (self._launch_finish, Buffer.IN),
            Command.ATTESTATION: (self._attestation, Buffer.IN_OUT_ERROR),
            Command.DBG_DECRYPT: (self._dbg_decrypt, Buffer.IN),
            Command.DBG_ENCRYPT: (self._dbg_encrypt, Buffer.IN),
            Command.SEND_START: (self._send_start, Buffer.IN_OUT_ERROR),
            Command.SEND_UPDATE_DATA: (self._send_update_data, Buffer.IN_OUT_ERROR),
            Command.SEND_FINISH: (self._send_finish, Buffer.IN),
            Command.SEND_CANCEL: (self._send_cancel, Buffer.IN),
            Command.RECEIVE_START: (self._receive_start, Buffer.IN_OUT),
            Command.RECEIVE_UPDATE_DATA: (self._receive_update_data, Buffer.IN),
            Command.RECEIVE_FINISH: (self._receive_finish, Buffer.IN),
        }
        self._scratch = np.empty(SCRATCH_CHUNK, dtype=np.uint8)  # the firmware's work buffer
        self._guests: dict[int, Guest] = {}  # handle -> guest context

    def __repr__(self) -> str:
        major, minor, build = self.api_version
        return f"<SevFirmware {major}.{minor} build {build} state={self.state.name}>"

    # ---- the dispatcher ----------------------------------------------------------------
    def dispatch(self, command_id: int, buffer_addr: int) -> Status:
        entry = self._handlers.get(command_id)
        layout = cmd.BUFFERS.get(cmd.command_of(command_id))
        if entry is None:
            return Status.INVALID_COMMAND
        handler, use = entry
        try:
            buf = None
            self._raw_buffer = b""
            if use in (Buffer.IN, Buffer.IN_OUT, Buffer.IN_OUT_ERROR):
                self._raw_buffer = self._mem.read(buffer_addr, layout.size)
                buf = layout.parse(self._raw_buffer)
            elif use == Buffer.OUT:
                buf = layout.new()
            status = handler(buf)
            if use in (Buffer.OUT, Buffer.IN_OUT, Buffer.IN_OUT_ERROR) and status == Status.SUCCESS:
                self._mem.write(buffer_addr, layout.build(buf))
            elif use == Buffer.IN_OUT_ERROR and status == Status.INVALID_LENGTH:
                try:
                    self._mem.write(buffer_addr, layout.build(buf))
                except FirmwareError:
                    pass  # the length status stands (AMD-ASPFW ignores this copy's result)
            return status
        except FirmwareError as exc:
            return exc.status
        except Exception as exc:  # noqa: BLE001 - a firmware bug must not reach the host
            log.exception("internal firmware error in command %#x", command_id)
            self.internal_errors.append(f"{command_id:#x}: {type(exc).__name__}: {exc}")
            return Status.HWERROR_PLATFORM

    # ---- keys and certificates ---------------------------------------------------------
    def _new_key(self) -> ec.EllipticCurvePrivateKey:
        rdata = self._trng.random_bytes(56, "p384-key")
        return crypto.p384_private_from_scalar(identity.scalar_from_random(rdata))

    def _cert(self, usage: Usage, algo: Algo, key: ec.EllipticCurvePrivateKey) -> SevCert:
        major, minor, _ = self.api_version
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

    def _require_identity(self) -> Identity:
        if self._identity is None:  # cannot happen in INIT/WORKING; guard against bugs
            raise FirmwareError(Status.INVALID_PLATFORM_STATE)
        return self._identity

    # ---- persistent storage --------------------------------------------------------------
    def _load(self) -> PersistentIdentity | None:
        if self._nv_paddr:
            blob = self._mem.read(self._nv_paddr, NV_LENGTH)
        else:
            blob = self._spi.read()
        try:
            return unseal(self._fuses.cuk, blob or b"")
        except SealError:
            if self._nv_paddr:  # the firmware erases a bad NV area before reporting it
                self._mem.write(self._nv_paddr, bytes([ERASED]) * NV_LENGTH)
            raise FirmwareError(Status.SECURE_DATA_INVALID) from None

    def _save(self, p: PersistentIdentity) -> None:
        blob = seal(self._fuses.cuk, p, self._trng.random_bytes(12, "seal-nonce"))
        if self._nv_paddr:
            self._mem.write(self._nv_paddr, blob.ljust(NV_LENGTH, bytes([ERASED])))
        else:
            self._spi.write(blob)

    # ---- INIT / INIT_EX / SHUTDOWN ------------------------------------------------------------
    def _init(self, buf) -> Status:
        return self._init_common(buf, ex=False)

    def _init_ex(self, buf) -> Status:
        return self._init_common(buf, ex=True)

    def _init_common(self, buf, ex: bool) -> Status:
        if self.state != PlatformState.UNINIT:
            return Status.INVALID_PLATFORM_STATE
        try:
            status = self._do_init(buf, ex)
        except FirmwareError as exc:
            status = exc.status
        if status != Status.SUCCESS:
            self._clear()
        return status

    def _do_init(self, buf, ex: bool) -> Status:
        if not self._hw.smee_all_cores():
            return Status.HWERROR_PLATFORM  # SME must be enabled (SYSCFG[23]) on every core
        layout = cmd.INIT_EX if ex else cmd.INIT
        if buf.flags & ~cmd.CONFIG_FLAG_ES or not layout.reserved_ok(self._raw_buffer):
            return Status.INVALID_CONFIG
        if buf.flags & cmd.CONFIG_FLAG_ES and not self._hw.sev_es:
            return Status.INVALID_CONFIG  # a part without SEV-ES knows no CONFIG.ES bit
        self._nv_paddr = 0
        if ex:
            if buf.length != cmd.INIT_EX_LENGTH:
                return Status.INVALID_LENGTH
            if buf.nv_paddr:
                if buf.nv_paddr % 4096:
                    return Status.INVALID_ADDRESS
                self._mem.check(buf.nv_paddr, max(buf.nv_len, 1))
                if buf.nv_len != NV_LENGTH:
                    return Status.INVALID_LENGTH
            self._nv_paddr = buf.nv_paddr
        p = self._load() or PersistentIdentity()
        cek = identity.derive_cek(self._fuses.cuk)
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
        for asid in range(1, len(self._asid_dirty)):
            self._asid_dirty[asid] = self._ccx_all
            self._asid_clean[asid] = self._asid_allocated[asid] = self._asid_in_use[asid] = 0
            self._hw.disable_asid(asid, self._ccx_all)
        self._hw.clear_wbinvd_done(range(self._hw.cores))
        if buf.flags & cmd.CONFIG_FLAG_ES:
            self._reserve_tmr(buf.tmr_paddr, buf.tmr_len)
        self._identity = Identity(cek, p)
        self.config_flags = buf.flags
        self.state = PlatformState.INIT
        return Status.SUCCESS

    def _reserve_tmr(self, paddr: int, length: int) -> None:
        pa = paddr & ~self._hw.cbit_mask
        if pa % TMR_ALIGN:
            raise FirmwareError(Status.INVALID_ADDRESS)
        if length != TMR_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        self._mem.check(paddr, length)
        if (
            self._nv_paddr
            and pa < (self._nv_paddr & ~self._hw.cbit_mask) + NV_LENGTH
            and (self._nv_paddr & ~self._hw.cbit_mask) < pa + length
        ):
            raise FirmwareError(Status.INVALID_ADDRESS)  # the TMR and the NV area overlap
        self._tmr = (pa, pa + length)
        self._mem.reserved = [self._tmr]

    def _clear(self) -> None:
        """Back to the state after reset: no identity, no guests, no TMR."""
        for guest in self._guests.values():
            if guest.asid:
                self._hw.disable_asid(guest.asid, self._ccx_all)
        self._guests.clear()
        self._identity = None
        self.state = PlatformState.UNINIT
        self.config_flags = 0
        self.guest_count = 0
        self._tmr = None
        self._mem.reserved = []

    def _shutdown(self, _buf) -> Status:
        self._clear()
        return Status.SUCCESS

    def _platform_reset(self, _buf) -> Status:
        if self.state != PlatformState.UNINIT:
            return Status.INVALID_PLATFORM_STATE
        self._spi.erase()  # the SPI flash only (AMD-ASPFW sev_mcmd_platform_reset)
        return Status.SUCCESS

    def _platform_status(self, buf) -> Status:
        major, minor, build = self.api_version
        buf.api_major, buf.api_minor, buf.build_id = major, minor, build
        buf.state = self.state
        if self.state != PlatformState.UNINIT:
            owned = self._require_identity().persistent.externally_owned
            buf.platform_flags = cmd.PLATFORM_FLAG_OWNER if owned else 0
            buf.config_flags = self.config_flags
            buf.guest_count = self.guest_count
        return Status.SUCCESS

    # ---- platform keys ------------------------------------------------------------------------
    def _pek_gen(self, _buf) -> Status:
        if self.state != PlatformState.INIT:
            return Status.INVALID_PLATFORM_STATE
        ident = self._require_identity()
        p = self._generate_oca(ident.persistent)
        p = self._generate_pdh(self._generate_pek(p, ident.cek))
        self._save(p)
        ident.persistent = p
        return Status.SUCCESS

    def _pdh_gen(self, _buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        ident = self._require_identity()
        p = self._generate_pdh(ident.persistent)
        self._save(p)
        ident.persistent = p
        return Status.SUCCESS

    def _pek_csr(self, buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.csr_len < CERT_SIZE:
            buf.csr_len = CERT_SIZE
            return Status.INVALID_LENGTH
        pek = SevCert.parse(bytes.fromhex(self._require_identity().persistent.pek_cert))
        self._mem.write(buf.csr_paddr, pek.without_signatures().raw)
        buf.csr_len = CERT_SIZE
        return Status.SUCCESS

    def _pek_cert_import(self, buf) -> Status:
        if self.state != PlatformState.INIT:
            return Status.INVALID_PLATFORM_STATE
        ident = self._require_identity()
        if ident.persistent.externally_owned:
            return Status.ALREADY_OWNED
        if buf.pek_len != CERT_SIZE or buf.oca_len != CERT_SIZE:
            return Status.INVALID_LENGTH
        pek = SevCert.parse(self._mem.read(buf.pek_paddr, CERT_SIZE))
        oca = SevCert.parse(self._mem.read(buf.oca_paddr, CERT_SIZE))
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

    def _pdh_cert_export(self, buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.pdh_len < CERT_SIZE or buf.chain_len < CHAIN_SIZE:
            buf.pdh_len, buf.chain_len = CERT_SIZE, CHAIN_SIZE
            return Status.INVALID_LENGTH
        ident = self._require_identity()
        p = ident.persistent
        self._mem.write(buf.pdh_paddr, bytes.fromhex(p.pdh_cert))
        # The firmware exports the CEK unsigned; AMD's KDS serves the ASK-signed one.
        cek = self._cert(Usage.CEK, Algo.ECDSA_SHA256, ident.cek)
        self._mem.write(
            buf.chain_paddr, bytes.fromhex(p.pek_cert) + bytes.fromhex(p.oca_cert) + cek.raw
        )
        buf.pdh_len, buf.chain_len = CERT_SIZE, CHAIN_SIZE
        return Status.SUCCESS

    def _get_id(self, buf) -> Status:
        if buf.id_len < cmd.GET_ID_LENGTH:
            buf.id_len = cmd.GET_ID_LENGTH
            return Status.INVALID_LENGTH
        self._mem.write(buf.id_paddr, identity.chip_id(self._fuses.cuk))
        buf.id_len = cmd.GET_ID_LENGTH
        return Status.SUCCESS

    # ---- cache and fabric -----------------------------------------------------------------------
    def _df_flush(self, _buf) -> Status:
        done = self._hw.wbinvd_done()
        ccx_done = 0
        for ccx in range(self._hw.ccx_count):
            if all(done[c] for c in self._hw.cores_of_ccx(ccx)):
                ccx_done |= 1 << ccx
        for asid in range(1, len(self._asid_dirty)):
            moved = self._asid_dirty[asid] & ccx_done
            if moved:
                self._asid_dirty[asid] &= ~moved
                self._asid_clean[asid] |= moved
        if ccx_done != self._ccx_all:
            return Status.WBINVD_REQUIRED
        return Status.SUCCESS

    def _nop(self, _buf) -> Status:
        return Status.SUCCESS

    # ---- guests: handles, ASIDs, keys (sev-api.md §1.4, §7.3; AMD-ASPFW sev_mcmd.c) ----------
    def _guest(self, handle: int) -> Guest:
        guest = self._guests.get(handle)
        if guest is None:
            raise FirmwareError(Status.INVALID_GUEST)
        return guest

    def _require_working(self) -> None:
        if self.state != PlatformState.WORKING:
            raise FirmwareError(Status.INVALID_PLATFORM_STATE)

    def _activate(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
        asid = buf.asid
        if asid == 0 or asid > self._hw.max_asid:
            return Status.INVALID_ASID
        if self._asid_in_use[asid] or self._asid_allocated[asid]:
            return Status.ASID_OWNED
        if not guest.inactive:
            return Status.ACTIVE
        return self._activate_common(guest, asid, self._ccx_all)

    def _activate_ex(self, buf) -> Status:
        self._require_working()
        if buf.ex_len != cmd.ACTIVATE_EX.size:
            return Status.INVALID_PARAM
        guest = self._guest(buf.handle)
        asid = buf.asid
        if asid == 0 or asid > self._hw.max_asid:
            return Status.INVALID_ASID
        if buf.numids == 0 or buf.numids > self._hw.cores:
            return Status.INVALID_PARAM
        raw = self._mem.read(buf.ids_paddr, buf.numids * APIC_ID_SIZE)
        ccxs = 0
        for i in range(buf.numids):
            ccx = self._hw.ccx_of_apic_id(crypto.from_le(raw[i * 4 : i * 4 + 4]))
            if ccx is None:
                return Status.INVALID_PARAM  # MODEL: an APIC id of no present core
            ccxs |= 1 << ccx
        return self._activate_common(guest, asid, ccxs)

    def _activate_common(self, guest: Guest, asid: int, ccxs: int) -> Status:
        if guest.state == GuestState.SENT:
            return Status.INVALID_GUEST_STATE
        if not guest.asid:
            # First activation: the ASID must be clean everywhere (DEACTIVATE, WBINVD, DF_FLUSH).
            if self._asid_dirty[asid]:
                return Status.DF_FLUSH_REQUIRED
            if self._asid_clean[asid] != self._ccx_all:
                return Status.ASID_OWNED
        elif asid != guest.asid:
            return Status.ACTIVE  # later ACTIVATE_EX calls may only add CCXs to the same ASID
        # sev_es_validate_asid: SEV-ES guests below the min SEV ASID, plain SEV at or above it.
        if guest.is_es != (asid < self._hw.min_sev_asid):
            return Status.INVALID_ASID
        if self._asid_dirty[asid] & ccxs:
            return Status.DF_FLUSH_REQUIRED
        if not guest.asid:
            self._hw.key_port.load(asid, guest.vek)  # into the ASID's slot in every UMC
            guest.asid = asid
        guest.ccxs |= ccxs
        if guest.state in (GuestState.RUNNING, GuestState.SUPDATE):
            self._enable(guest)
        else:
            guest.activation = Activation.PENDING
            self._asid_allocated[asid] |= ccxs
            self._asid_clean[asid] &= ~ccxs
        return Status.SUCCESS

    def _enable(self, guest: Guest) -> None:
        """The guest runs: its ASID is valid on its CCXs, and in use there."""
        asid, ccxs = guest.asid, guest.ccxs
        self._hw.enable_asid(asid, ccxs)
        guest.activation = Activation.ACTIVE
        self._asid_in_use[asid] |= ccxs
        self._asid_allocated[asid] &= ~ccxs
        self._asid_clean[asid] &= ~ccxs

    def _deactivate(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
        if guest.inactive:
            return Status.INACTIVE
        asid, ccxs = guest.asid, guest.ccxs
        in_use = self._asid_in_use[asid]
        if in_use:
            # The ASID is invalid again on those CCXs, and each of their cores owes a WBINVD.
            self._hw.disable_asid(asid, in_use)
            self._hw.clear_wbinvd_done(
                core
                for ccx in range(self._hw.ccx_count)
                if in_use >> ccx & 1
                for core in self._hw.cores_of_ccx(ccx)
            )
        never_ran = self._asid_allocated[asid] & ccxs
        self._asid_allocated[asid] &= ~never_ran
        self._asid_clean[asid] |= never_ran
        ran = self._asid_in_use[asid] & ccxs
        self._asid_in_use[asid] &= ~ran
        self._asid_dirty[asid] |= ran
        guest.asid = guest.ccxs = 0
        guest.activation = Activation.INACTIVE
        return Status.SUCCESS

    def _decommission(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
        if guest.asid:
            return Status.ACTIVE
        del self._guests[guest.handle]
        self.guest_count -= 1
        if self.guest_count == 0:
            self.state = PlatformState.INIT
        return Status.SUCCESS

    def _guest_status(self, buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        guest = self._guests.get(buf.handle)
        if guest is None:
            buf.state = GuestState.UNINIT
            return Status.SUCCESS
        buf.state, buf.asid, buf.policy = guest.state, guest.asid, guest.policy
        return Status.SUCCESS

    # ---- launch (sev-api.md §5) ---------------------------------------------------------------
    def _open_channel(self, buf, peer_paddr: int, peer_len: int) -> tuple[bytes, bytes]:
        """The server side of the trusted channel (LAUNCH_START with a GODH certificate,
        RECEIVE_START): (TEK, TIK) from the session blob, after the policy checks."""
        if buf.session_len != cmd.SESSION.size:
            raise FirmwareError(Status.INVALID_LENGTH)
        blob = self._mem.read(buf.session_paddr, cmd.SESSION.size)
        if peer_len != CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        z = self._ecdh(SevCert.parse(self._mem.read(peer_paddr, CERT_SIZE)))
        try:
            tek, tik, policy_mac = channel.unwrap(z, blob)
        except channel.ChannelError:
            raise FirmwareError(Status.BAD_MEASUREMENT) from None
        # sev_guest_verify_policy: MAC, minimum API version, reserved bits.
        if not crypto.equal(channel.policy_mac(tik, buf.policy), policy_mac):
            raise FirmwareError(Status.BAD_MEASUREMENT)
        if sev_policy.api_min(buf.policy) > self.api_version[:2]:
            raise FirmwareError(Status.POLICY_FAILURE)
        if buf.policy & sev_policy.RESERVED_MASK:
            raise FirmwareError(Status.POLICY_FAILURE)
        return tek, tik

    def _ecdh(self, peer: SevCert) -> bytes:
        """Z with a peer's PDH-format certificate (its signatures are not checked here)."""
        if sanity_check(peer, Usage.PDH, Algo.ECDH_SHA256) != Status.SUCCESS:
            raise FirmwareError(Status.INVALID_CERTIFICATE)
        pdh_key = crypto.p384_private_from_scalar(self._require_identity().persistent.pdh_key)
        try:
            return crypto.ecdh_z(pdh_key, peer.public_key())
        except (CertError, ValueError):
            raise FirmwareError(Status.INVALID_CERTIFICATE) from None

    def _launch_start(self, buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        tek = tik = bytes(16)  # no DH certificate: no channel, zero keys, policy unchecked
        if buf.dh_cert_paddr:
            tek, tik = self._open_channel(buf, buf.dh_cert_paddr, buf.dh_cert_len)
        return self._new_guest(buf, tek, tik, GuestState.LUPDATE)

    def _new_guest(self, buf, tek: bytes, tik: bytes, state: GuestState) -> Status:
        """The rest of LAUNCH_START and RECEIVE_START: the VEK (fresh, or shared with the
        guest ``buf.handle`` names), a handle, the ES check; the platform is WORKING."""
        if buf.handle == 0:
            vek = self._trng.random_bytes(self._hw.vek_bytes, "vek")
        else:
            shared = self._guest(buf.handle)
            if buf.policy != shared.policy or shared.policy & sev_policy.PolicyFlag.NOKS:
                return Status.POLICY_FAILURE
            vek = shared.vek
        handle = next((h for h in range(1, GUEST_COUNT_MAX + 1) if h not in self._guests), 0)
        if not handle:
            return Status.RESOURCE_LIMIT
        if buf.policy & sev_policy.PolicyFlag.ES and not self.config_flags & cmd.CONFIG_FLAG_ES:
            return Status.UNSUPPORTED
        guest = Guest(handle, buf.policy, vek, tek=tek, tik=tik)
        guest.state = state
        self._guests[handle] = guest
        self.state = PlatformState.WORKING
        self.guest_count += 1
        buf.handle = handle
        return Status.SUCCESS

    def _launch_guest(self, handle: int, state: GuestState) -> Guest:
        self._require_working()
        guest = self._guest(handle)
        if guest.state != state:
            raise FirmwareError(Status.INVALID_GUEST_STATE)
        return guest

    def _launch_update_data(self, buf) -> Status:
        guest = self._launch_guest(buf.handle, GuestState.LUPDATE)
        if guest.inactive:
            return Status.INACTIVE
        if buf.paddr % 16:
            return Status.INVALID_ADDRESS
        if buf.len % 16 or buf.len == 0:
            return Status.INVALID_LENGTH
        # Read with rd_sz_wbinvd: the host's cached lines of the plaintext are written back
        # and dropped, then the page is rewritten under the VEK in place.
        scratch = self._scratch
        for off in range(0, buf.len, len(scratch)):
            chunk = scratch[: min(len(scratch), buf.len - off)]
            self._mem.read_into(buf.paddr + off, chunk, flush=True)
            guest.digest.update(chunk)
            self._mem.write_guest_from(buf.paddr + off, chunk, guest.asid)
        return Status.SUCCESS

    def _launch_measure(self, buf) -> Status:
        guest = self._launch_guest(buf.handle, GuestState.LUPDATE)
        if buf.measure_len < MEASUREMENT_SIZE:
            buf.measure_len = MEASUREMENT_SIZE
            return Status.INVALID_LENGTH
        launch_digest = guest.digest.digest()
        mnonce = self._trng.random_bytes(16, "mnonce")
        major, minor, build = self.api_version
        measure = crypto.hmac_sha256(
            guest.tik,
            bytes([channel.CTX_MEASURE, major, minor, build])
            + crypto.le(guest.policy, 4)
            + launch_digest
            + mnonce,
        )
        self._mem.write(buf.measure_paddr, measure + mnonce)
        guest.measurement, guest.launch_digest = measure, launch_digest
        guest.transition(Command.LAUNCH_MEASURE)
        return Status.SUCCESS

    def _launch_secret(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
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
        header = cmd.PACKET_HEADER.parse(self._mem.read(buf.hdr_paddr, cmd.PACKET_HEADER.size))
        # Write back and drop whatever the caches hold of the target, in both host domains
        # (rd_sz_wbinvd and two dummy reads, AMD-ASPFW), before it is rewritten.
        cbit = self._hw.cbit_mask
        self._mem.read(buf.guest_paddr | cbit, buf.trans_len, flush=True)
        self._mem.read(buf.guest_paddr & ~cbit, buf.trans_len, flush=True)
        ciphertext = self._mem.read(buf.trans_paddr, buf.trans_len)
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
        self._mem.write_guest(buf.guest_paddr, secret, guest.asid)
        return Status.SUCCESS

    def _launch_finish(self, buf) -> Status:
        guest = self._launch_guest(buf.handle, GuestState.LSECRET)
        if guest.activation == Activation.PENDING:
            self._enable(guest)
        guest.close_channel()
        guest.transition(Command.LAUNCH_FINISH)
        return Status.SUCCESS

    # ---- migration (sev-api.md §6; AMD-ASPFW sev_mcmd_send_*, sev_mcmd_receive_*) ---------
    def _send_start(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
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
            if oca.raw != bytes.fromhex(self._require_identity().persistent.oca_cert):
                return Status.POLICY_FAILURE
        if chain is None:
            if buf.pdh_len != CERT_SIZE:
                return Status.INVALID_LENGTH
            pdh = SevCert.parse(self._mem.read(buf.pdh_paddr, CERT_SIZE))
        # The client side of the channel: new transport keys wrapped for the receiver.
        z = self._ecdh(pdh)
        tek, tik = self._trng.random_bytes(16, "tek"), self._trng.random_bytes(16, "tik")
        nonce, wrap_iv = self._trng.random_bytes(16, "nonce"), self._trng.random_bytes(16, "iv")
        self._mem.write(buf.session_paddr, channel.wrap(z, nonce, wrap_iv, tek, tik, guest.policy))
        buf.policy = guest.policy
        guest.transition(Command.SEND_START)
        guest.tek, guest.tik = tek, tik
        return Status.SUCCESS

    def _receiver_certs(self, buf) -> tuple[tuple[SevCert, SevCert, SevCert], SevCert]:
        if buf.plat_certs_len != CHAIN_SIZE or buf.pdh_len != CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        raw = self._mem.read(buf.plat_certs_paddr, CHAIN_SIZE)
        certs = tuple(
            SevCert.parse(raw[i : i + CERT_SIZE]) for i in range(0, CHAIN_SIZE, CERT_SIZE)
        )
        pdh = SevCert.parse(self._mem.read(buf.pdh_paddr, CERT_SIZE))
        return certs, pdh  # type: ignore[return-value]

    def _validate_platform(self, buf) -> tuple[tuple[SevCert, SevCert, SevCert], SevCert]:
        """The receiver's ARK -> ASK -> CEK -> PEK -> PDH, the ARK being the fused root."""
        if buf.plat_certs_len != CHAIN_SIZE or buf.pdh_len != CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH)
        if not 0 < buf.amd_certs_len <= AMD_CHAIN_MAX:
            raise FirmwareError(Status.INVALID_LENGTH)
        chain, pdh = self._receiver_certs(buf)
        amd = self._mem.read(buf.amd_certs_paddr, buf.amd_certs_len)
        try:
            ask_len = AmdCert.size_of(amd)
            ask, ark = AmdCert.parse(amd[:ask_len]), AmdCert.parse(amd[ask_len:])
        except CertError:
            raise FirmwareError(Status.INVALID_CERTIFICATE) from None
        fuses = self._fuses
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

    def _send_update_data(self, buf) -> Status:
        self._require_working()
        if buf.hdr_len < cmd.PACKET_HEADER.size:
            buf.hdr_len = cmd.PACKET_HEADER.size
            return Status.INVALID_LENGTH
        guest = self._guest(buf.handle)
        if guest.state != GuestState.SUPDATE:
            return Status.INVALID_GUEST_STATE
        if not guest.asid or not self._asid_in_use[guest.asid]:
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
        plaintext = self._mem.read_guest(buf.guest_paddr, buf.guest_len, guest.asid)
        iv = self._trng.random_bytes(16, "packet-iv")
        ciphertext = crypto.aes128_ctr(guest.tek, iv, plaintext)
        n = buf.guest_len
        mac = channel.packet_mac(guest.tik, channel.CTX_DATA, 0, iv, n, n, ciphertext)
        self._mem.write(buf.trans_paddr, ciphertext)
        self._mem.write(buf.hdr_paddr, cmd.PACKET_HEADER.build(flags=0, iv=iv, mac=mac))
        buf.hdr_len = cmd.PACKET_HEADER.size
        return Status.SUCCESS

    def _send_finish(self, buf) -> Status:
        return self._send_end(buf, Command.SEND_FINISH)

    def _send_cancel(self, buf) -> Status:
        return self._send_end(buf, Command.SEND_CANCEL)

    def _send_end(self, buf, command: Command) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
        if guest.state != GuestState.SUPDATE:
            return Status.INVALID_GUEST_STATE
        guest.close_channel()
        guest.transition(command)
        return Status.SUCCESS

    def _receive_start(self, buf) -> Status:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return Status.INVALID_PLATFORM_STATE
        if buf.session_len != cmd.SESSION.size or buf.pdh_len != CERT_SIZE:
            return Status.INVALID_LENGTH
        tek, tik = self._open_channel(buf, buf.pdh_paddr, buf.pdh_len)  # the sender's PDH
        return self._new_guest(buf, tek, tik, GuestState.RUPDATE)

    def _receive_update_data(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
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
        header = cmd.PACKET_HEADER.parse(self._mem.read(buf.hdr_paddr, cmd.PACKET_HEADER.size))
        if header.flags & cmd.PACKET_FLAG_COMPRESSED:
            return Status.UNSUPPORTED
        ciphertext = self._mem.read(buf.trans_paddr, buf.trans_len)
        n = buf.trans_len
        expected = channel.packet_mac(
            guest.tik, channel.CTX_DATA, header.flags, header.iv, n, n, ciphertext
        )
        if not crypto.equal(expected, header.mac):
            return Status.BAD_MEASUREMENT
        plaintext = crypto.aes128_ctr(guest.tek, header.iv, ciphertext)
        self._mem.write_guest(buf.guest_paddr, plaintext, guest.asid)
        return Status.SUCCESS

    def _receive_finish(self, buf) -> Status:
        self._require_working()
        guest = self._guest(buf.handle)
        if guest.state != GuestState.RUPDATE:
            return Status.INVALID_GUEST_STATE
        if guest.activation == Activation.PENDING:
            self._enable(guest)
        guest.close_channel()
        guest.launch_digest = bytes(32)  # a received guest was never measured here
        guest.transition(Command.RECEIVE_FINISH)
        return Status.SUCCESS

    # ---- debugging and attestation -------------------------------------------------------------
    def _dbg_decrypt(self, buf) -> Status:
        return self._dbg(buf, decrypt=True)

    def _dbg_encrypt(self, buf) -> Status:
        return self._dbg(buf, decrypt=False)

    def _dbg(self, buf, decrypt: bool) -> Status:
        """DBG_DECRYPT / DBG_ENCRYPT (sev-api.md §7.4): only for guests whose owner allowed it."""
        self._require_working()
        if buf.src_paddr % 16 or buf.dst_paddr % 16:
            return Status.INVALID_ADDRESS
        if buf.len % 16:
            return Status.INVALID_LENGTH
        guest = self._guest(buf.handle)
        if guest.policy & sev_policy.PolicyFlag.NODBG:
            return Status.POLICY_FAILURE
        if guest.inactive:
            return Status.INACTIVE
        if not buf.len:
            return Status.SUCCESS
        if decrypt:
            data = self._mem.read_guest(buf.src_paddr, buf.len, guest.asid)
            self._mem.write(buf.dst_paddr, data)
        else:
            data = self._mem.read(buf.src_paddr, buf.len)
            self._mem.write_guest(buf.dst_paddr, data, guest.asid)
        return Status.SUCCESS

    def _attestation(self, buf) -> Status:
        """The legacy SEV attestation report (sev-api.md §5.7), signed by the PEK."""
        self._require_working()
        guest = self._guest(buf.handle)
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
        pek = crypto.p384_private_from_scalar(self._require_identity().persistent.pek_key)
        r, s_ = crypto.ecdsa_sign(pek, signed, hashes.SHA256())
        report.sig_r, report.sig_s = crypto.le(r, EC_FIELD), crypto.le(s_, EC_FIELD)
        self._mem.write(buf.paddr, cmd.ATTESTATION_REPORT.build(report))
        buf.len = cmd.ATTESTATION_REPORT.size
        return Status.SUCCESS


def _scalar(key: ec.EllipticCurvePrivateKey) -> int:
    return key.private_numbers().private_value
