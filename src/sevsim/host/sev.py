"""The host's SEV driver: Linux's ``/dev/sev`` (drivers/crypto/ccp/sev-dev.c).

It reaches the firmware only as Linux does: command buffers and data buffers are host
kernel pages (encrypted with the host key when SME is active), their physical addresses
go into CmdBufAddr Lo/Hi with the C-bit (Linux's ``__psp_pa``), CmdResp gets
``(command << 16) | IOC``, and the driver waits for RESP and reads the status.

The ioctls are those of include/uapi/linux/psp-sev.h. Each returns an ``IoctlResult``
with ``ret`` (0, or a negative errno as the ioctl returns) and ``error`` (the firmware
status, the ioctl's ``error`` field), like the real interface.

Behaviour taken from Linux: at probe the driver reads the API version and initialises
the platform (INIT, or INIT_EX with an NV file, then WBINVD on all CPUs and DF_FLUSH);
commands that need the INIT state initialise an UNINIT platform first; FACTORY_RESET
refuses a WORKING platform (-EBUSY) and shuts an INIT one down first; with an NV file the
buffer is written back to the file after FACTORY_RESET, INIT_EX, PDH_GEN, PEK_GEN and
PEK_CERT_IMPORT.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.certs.sev import CERT_SIZE
from sevsim.fsutil import atomic_write
from sevsim.host.kernel import HostKernel
from sevsim.psp.mailbox import Mailbox

NV_LENGTH = 32 * 1024
NV_ERASED = 0xFF


class SevIoctl(IntEnum):
    FACTORY_RESET = 0
    PLATFORM_STATUS = 1
    PEK_GEN = 2
    PEK_CSR = 3
    PDH_GEN = 4
    PDH_CERT_EXPORT = 5
    PEK_CERT_IMPORT = 6
    GET_ID = 7  # deprecated
    GET_ID2 = 8


SEV_ES_TMR_SIZE = 1 << 20  # Linux SEV_TMR_SIZE


@dataclass
class IoctlResult:
    ret: int  # 0 or -errno
    error: Status  # the firmware's status
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.ret == 0 and self.error == Status.SUCCESS

    def explain(self) -> str:
        if self.ok:
            return "success"
        if self.ret == -errno.EIO or self.error != Status.SUCCESS:
            return f"firmware error {self.error.describe()}"
        return f"{errno.errorcode.get(-self.ret, self.ret)} ({self.ret})"


@dataclass
class PlatformStatus:
    api_major: int
    api_minor: int
    build: int
    state: PlatformState
    externally_owned: bool
    config_es: bool
    guest_count: int


class SevDevice:
    def __init__(
        self, kernel: HostKernel, mailbox: Mailbox, init_ex_path: Path | None = None
    ) -> None:
        if kernel.tables is None:
            raise RuntimeError("boot the host kernel before probing the SEV device")
        self.kernel = kernel
        self._mb = mailbox
        self._regs = mailbox.registers
        self.init_ex_path = None if init_ex_path is None else Path(init_ex_path)
        self._cmd_buf = kernel.alloc_pages(1)  # Linux: sev->cmd_buf, one page
        self._cmd_buf_pa = self.psp_pa(self._cmd_buf)
        regs = self._regs
        self._lo, self._hi = regs["cmdbuff_addr_lo"], regs["cmdbuff_addr_hi"]
        self._cmdresp = regs["cmdresp"]
        self._nv_buf = kernel.alloc_pages(NV_LENGTH // 4096) if self.init_ex_path else None
        # sev_es_tmr: on a part with SEV-ES the driver gives the firmware a 1 MiB Trusted
        # Memory Region (1 MiB aligned) at INIT, with the SEV-ES flag.
        self._tmr = None
        if kernel.core.cpuid(0x8000_001F)[0] >> 3 & 1:
            self._tmr = kernel.alloc_pages(SEV_ES_TMR_SIZE // 4096, align=SEV_ES_TMR_SIZE)
        self.state = PlatformState.UNINIT
        self.api_version: tuple[int, int, int] | None = None
        self.log: list[str] = []
        self._cmd_mutex = threading.RLock()  # sev_cmd_mutex: one command at a time

    # ---- the mailbox protocol (Linux __sev_do_cmd_locked) --------------------------------------
    def psp_pa(self, va: int) -> int:
        """Linux __psp_pa: the address the PSP is given for a kernel buffer (C-bit included)."""
        return self.kernel.pa(va) | self.kernel.me_mask

    def do_cmd(self, command: Command, buffer: bytes | None = None) -> tuple[int, Status, bytes]:
        """Issue one firmware command. Returns (ret, status, buffer after the command)."""
        with self._cmd_mutex:
            return self._do_cmd_locked(command, buffer)

    def _do_cmd_locked(self, command: Command, buffer: bytes | None) -> tuple[int, Status, bytes]:
        size = _BUFFER_SIZES.get(command, 0)
        if buffer is not None:
            if len(buffer) < size:
                buffer = bytes(buffer).ljust(size, b"\0")
            self.kernel.write(self._cmd_buf, buffer)
        addr = self._cmd_buf_pa if size else 0
        mb = self._mb
        mb.write32(self._lo, addr & 0xFFFF_FFFF)
        mb.write32(self._hi, addr >> 32)
        mb.write32(self._cmdresp, (command << cmd.CMDRESP_CMD_SHIFT) | cmd.CMDRESP_IOC)
        reg = mb.read32(self._cmdresp)
        if not reg & cmd.CMDRESP_RESP:
            return -errno.ETIMEDOUT, Status.SUCCESS, b""
        status = _status(reg & cmd.CMDRESP_STATUS_MASK)
        out = self.kernel.read(self._cmd_buf, size) if size else b""
        if status != Status.SUCCESS:
            return -errno.EIO, status, out
        if self._nv_buf is not None and command in _NV_WRITERS:
            self._write_nv_file()
        return 0, status, out

    def _alloc(self, length: int) -> int:
        return self.kernel.alloc_pages(max(1, -(-length // 4096)))

    def _free(self, va: int, length: int) -> None:
        self.kernel.free_pages(va, max(1, -(-length // 4096)))

    # ---- platform life cycle ------------------------------------------------------------------
    def probe(self) -> IoctlResult:
        """What the driver does when it loads: learn the API version, then initialise."""
        result = self.platform_status()
        if not result.ok:
            return result
        st: PlatformStatus = result.data["status"]
        self.api_version = (st.api_major, st.api_minor, st.build)
        self.log.append(f"SEV API:{st.api_major}.{st.api_minor} build:{st.build}")
        return self.platform_init()

    def platform_init(self) -> IoctlResult:
        """Linux __sev_platform_init_locked: INIT (or INIT_EX), then WBINVD on every CPU and
        DF_FLUSH. An INIT that finds corrupt persistent data is retried once."""
        if self.state != PlatformState.UNINIT:
            return IoctlResult(0, Status.SUCCESS)
        if self._nv_buf is not None:
            self._read_nv_file()  # once: a retry uses the buffer as the firmware left it
        for attempt in (1, 2):
            ret, status = self._init_once()
            if status != Status.SECURE_DATA_INVALID or attempt == 2:
                break
            self.log.append("SEV: retrying INIT command because of SECURE_DATA_INVALID error")
        if ret:
            return IoctlResult(ret, status)
        self.state = PlatformState.INIT
        self.kernel.wbinvd_on_all_cpus()
        ret, status, _ = self.do_cmd(Command.DF_FLUSH)
        if ret:
            return IoctlResult(ret, status)
        self.log.append("SEV firmware initialized")
        return IoctlResult(0, Status.SUCCESS)

    def _init_once(self) -> tuple[int, Status]:
        es = {}
        if self._tmr is not None:
            es = {
                "flags": cmd.CONFIG_FLAG_ES,
                "tmr_paddr": self.psp_pa(self._tmr),
                "tmr_len": SEV_ES_TMR_SIZE,
            }
        if self._nv_buf is None:
            ret, status, _ = self.do_cmd(Command.INIT, cmd.INIT.build(**es))
            return ret, status
        buf = cmd.INIT_EX.build(
            length=cmd.INIT_EX_LENGTH, nv_paddr=self.psp_pa(self._nv_buf), nv_len=NV_LENGTH, **es
        )
        ret, status, _ = self.do_cmd(Command.INIT_EX, buf)
        return ret, status

    def _read_nv_file(self) -> None:
        data = b""
        if self.init_ex_path is not None and self.init_ex_path.exists():
            data = self.init_ex_path.read_bytes()[:NV_LENGTH]
        # A missing or short file: the firmware creates the content (Linux since 6.0).
        self.kernel.write(self._nv_buf, data.ljust(NV_LENGTH, bytes([NV_ERASED])))

    def _write_nv_file(self) -> None:
        assert self.init_ex_path is not None and self._nv_buf is not None
        atomic_write(self.init_ex_path, self.kernel.read(self._nv_buf, NV_LENGTH))

    def shutdown(self) -> IoctlResult:
        if self.state == PlatformState.UNINIT:
            return IoctlResult(0, Status.SUCCESS)
        ret, status, _ = self.do_cmd(Command.SHUTDOWN)
        if ret == 0:
            self.state = PlatformState.UNINIT
        return IoctlResult(ret, status)

    def _ensure_init(self) -> IoctlResult | None:
        if self.state == PlatformState.UNINIT:
            result = self.platform_init()
            if not result.ok:
                return IoctlResult(result.ret, result.error)
        return None

    # ---- ioctls -------------------------------------------------------------------------------
    def ioctl(self, request: SevIoctl, **args: Any) -> IoctlResult:
        handlers = {
            SevIoctl.FACTORY_RESET: self.factory_reset,
            SevIoctl.PLATFORM_STATUS: self.platform_status,
            SevIoctl.PEK_GEN: self.pek_gen,
            SevIoctl.PEK_CSR: self.pek_csr,
            SevIoctl.PDH_GEN: self.pdh_gen,
            SevIoctl.PDH_CERT_EXPORT: self.pdh_cert_export,
            SevIoctl.PEK_CERT_IMPORT: self.pek_cert_import,
            SevIoctl.GET_ID2: self.get_id2,
        }
        handler = handlers.get(request)
        if handler is None:
            return IoctlResult(-errno.EINVAL, Status.SUCCESS)
        return handler(**args)

    def factory_reset(self) -> IoctlResult:
        result = self.platform_status()
        if not result.ok:
            return result
        state = result.data["status"].state
        if state == PlatformState.WORKING:
            return IoctlResult(-errno.EBUSY, Status.SUCCESS)
        self.state = state
        if state == PlatformState.INIT:
            shut = self.shutdown()
            if not shut.ok:
                return shut
        ret, status, _ = self.do_cmd(Command.PLATFORM_RESET)
        return IoctlResult(ret, status)

    def platform_status(self) -> IoctlResult:
        ret, status, out = self.do_cmd(Command.PLATFORM_STATUS, bytes(cmd.PLATFORM_STATUS.size))
        if ret:
            return IoctlResult(ret, status)
        r = cmd.PLATFORM_STATUS.parse(out)
        st = PlatformStatus(
            r.api_major,
            r.api_minor,
            r.build_id,
            _state(r.state),
            bool(r.platform_flags & cmd.PLATFORM_FLAG_OWNER),
            bool(r.config_flags & cmd.CONFIG_FLAG_ES),
            r.guest_count,
        )
        self.state = st.state
        return IoctlResult(0, status, {"status": st})

    def _gen(self, command: Command) -> IoctlResult:
        failed = self._ensure_init()
        if failed:
            return failed
        ret, status, _ = self.do_cmd(command)
        return IoctlResult(ret, status)

    def pek_gen(self) -> IoctlResult:
        return self._gen(Command.PEK_GEN)

    def pdh_gen(self) -> IoctlResult:
        return self._gen(Command.PDH_GEN)

    def pek_csr(self, length: int = CERT_SIZE) -> IoctlResult:
        """length 0 asks the firmware for the size it needs (data['length'])."""
        failed = self._ensure_init()
        if failed:
            return failed
        va = self._alloc(length) if length else 0
        try:
            addr = self.psp_pa(va) if length else 0
            ret, status, out = self.do_cmd(
                Command.PEK_CSR, cmd.PEK_CSR.build(csr_paddr=addr, csr_len=length)
            )
            r = cmd.PEK_CSR.parse(out)
            data: dict[str, Any] = {"length": r.csr_len}
            if ret == 0:
                data["csr"] = self.kernel.read(va, r.csr_len)
            return IoctlResult(ret, status, data)
        finally:
            if va:
                self._free(va, length)

    def pdh_cert_export(
        self, pdh_length: int = CERT_SIZE, chain_length: int = 3 * CERT_SIZE
    ) -> IoctlResult:
        failed = self._ensure_init()
        if failed:
            return failed
        pdh_va = self._alloc(pdh_length) if pdh_length else 0
        chain_va = self._alloc(chain_length) if chain_length else 0
        try:
            buf = cmd.PDH_CERT_EXPORT.build(
                pdh_paddr=self.psp_pa(pdh_va) if pdh_va else 0,
                pdh_len=pdh_length,
                chain_paddr=self.psp_pa(chain_va) if chain_va else 0,
                chain_len=chain_length,
            )
            ret, status, out = self.do_cmd(Command.PDH_CERT_EXPORT, buf)
            r = cmd.PDH_CERT_EXPORT.parse(out)
            data: dict[str, Any] = {"pdh_length": r.pdh_len, "chain_length": r.chain_len}
            if ret == 0:
                data["pdh"] = self.kernel.read(pdh_va, r.pdh_len)
                data["chain"] = self.kernel.read(chain_va, r.chain_len)
            return IoctlResult(ret, status, data)
        finally:
            for va, n in ((pdh_va, pdh_length), (chain_va, chain_length)):
                if va:
                    self._free(va, n)

    def pek_cert_import(self, pek: bytes, oca: bytes) -> IoctlResult:
        failed = self._ensure_init()
        if failed:
            return failed
        pek_va, oca_va = self._alloc(len(pek)), self._alloc(len(oca))
        try:
            self.kernel.write(pek_va, pek)
            self.kernel.write(oca_va, oca)
            buf = cmd.PEK_CERT_IMPORT.build(
                pek_paddr=self.psp_pa(pek_va),
                pek_len=len(pek),
                oca_paddr=self.psp_pa(oca_va),
                oca_len=len(oca),
            )
            ret, status, _ = self.do_cmd(Command.PEK_CERT_IMPORT, buf)
            return IoctlResult(ret, status)
        finally:
            self._free(pek_va, len(pek))
            self._free(oca_va, len(oca))

    def get_id2(self, length: int = cmd.GET_ID_LENGTH) -> IoctlResult:
        va = self._alloc(length) if length else 0
        try:
            buf = cmd.GET_ID.build(id_paddr=self.psp_pa(va) if va else 0, id_len=length)
            ret, status, out = self.do_cmd(Command.GET_ID, buf)
            r = cmd.GET_ID.parse(out)
            data: dict[str, Any] = {"length": r.id_len}
            if ret == 0:
                data["id"] = self.kernel.read(va, r.id_len)
            return IoctlResult(ret, status, data)
        finally:
            if va:
                self._free(va, length)


_NV_WRITERS = {
    Command.PLATFORM_RESET,
    Command.INIT_EX,
    Command.PDH_GEN,
    Command.PEK_CERT_IMPORT,
    Command.PEK_GEN,
}


_STATUSES = {int(s): s for s in Status}
# The bytes the driver copies in and out per command (the firmware's sizeof).
_BUFFER_SIZES = {c: 0 if layout is None else layout.size for c, layout in cmd.BUFFERS.items()}


def _status(value: int) -> Status:
    return _STATUSES.get(value, Status.HWERROR_PLATFORM)


_STATES = {int(s): s for s in PlatformState}


def _state(value: int) -> PlatformState:
    return _STATES.get(value, PlatformState.UNINIT)
