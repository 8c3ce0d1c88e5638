"""The SEV firmware of the AMD Secure Processor (sev-api.md §1; AMD-ASPFW sev_dispatch.c).

Reached only through the mailbox (``psp.mailbox``): ``dispatch`` copies the command buffer
in from x86 memory, runs the handler, and copies it back as the real dispatcher does —
input-only commands never write back, output-only commands write on success, and the
"output even on error" commands also write back on INVALID_LENGTH so the host learns the
size it must provide. Every handler checks in the firmware's order: platform state, guest
handle, guest state, then the rest. No Python exception leaves ``dispatch``: a failure is a
status code, and an unexpected internal error is reported as HWERROR_PLATFORM.

The handlers live in one module per command family, all sharing one ``FirmwareContext``:
``psp.platform`` (platform and ownership), ``psp.asids`` (ASID management), ``psp.launch``
(launch and attestation), ``psp.migration`` (send and receive), ``psp.debug``. Secrets
(CEK, OCA/PEK/PDH private keys, the guests' keys) live only in that context and, sealed,
in the persistent store. Tools that must look inside use ``psp.inspect``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

from sevsim.api import commands as cmd
from sevsim.api.commands import Command
from sevsim.api.layout import Layout
from sevsim.api.status import PlatformState, Status
from sevsim.psp.asids import AsidCommands
from sevsim.psp.context import FirmwareContext
from sevsim.psp.debug import DebugCommands
from sevsim.psp.launch import LaunchCommands
from sevsim.psp.migration import MigrationCommands
from sevsim.psp.persistent import SpiFlash
from sevsim.psp.platform import PlatformCommands
from sevsim.psp.x86mem import FirmwareError
from sevsim.soc.rng import EntropySource

log = logging.getLogger(__name__)

Handler = Callable[[Any], Status]


class Buffer(Enum):
    """How the dispatcher treats a command's buffer (AMD-ASPFW sev_dispatch.c)."""

    NONE = 0
    IN = 1
    OUT = 2
    IN_OUT = 3
    IN_OUT_ERROR = 4  # written back on success and on INVALID_LENGTH


# Tuples, not sets: an Enum member hashes in Python code, but compares by identity.
_READS = (Buffer.IN, Buffer.IN_OUT, Buffer.IN_OUT_ERROR)
_WRITES = (Buffer.OUT, Buffer.IN_OUT, Buffer.IN_OUT_ERROR)


class SevFirmware:
    def __init__(self, hw, fuses, spi: SpiFlash, profile, entropy: EntropySource) -> None:
        self._ctx = ctx = FirmwareContext(hw, fuses, spi, profile, entropy)
        self.internal_errors: list[str] = []
        platform = PlatformCommands(ctx)
        asids = AsidCommands(ctx)
        launch = LaunchCommands(ctx, asids)
        migration = MigrationCommands(ctx, asids)
        debug = DebugCommands(ctx)
        self._asids = asids  # the inspection port registers ACTIVATE watchers here
        handlers: dict[Command, tuple[Handler, Buffer]] = {
            Command.INIT: (platform.init, Buffer.IN),
            Command.INIT_EX: (platform.init_ex, Buffer.IN),
            Command.SHUTDOWN: (platform.shutdown, Buffer.NONE),
            Command.PLATFORM_RESET: (platform.platform_reset, Buffer.NONE),
            Command.PLATFORM_STATUS: (platform.platform_status, Buffer.OUT),
            Command.PEK_GEN: (platform.pek_gen, Buffer.NONE),
            Command.PEK_CSR: (platform.pek_csr, Buffer.IN_OUT_ERROR),
            Command.PEK_CERT_IMPORT: (platform.pek_cert_import, Buffer.IN),
            Command.PDH_CERT_EXPORT: (platform.pdh_cert_export, Buffer.IN_OUT_ERROR),
            Command.PDH_GEN: (platform.pdh_gen, Buffer.NONE),
            Command.DF_FLUSH: (asids.df_flush, Buffer.NONE),
            Command.GET_ID: (platform.get_id, Buffer.IN_OUT_ERROR),
            Command.NOP: (platform.nop, Buffer.NONE),
            Command.DECOMMISSION: (asids.decommission, Buffer.IN),
            Command.ACTIVATE: (asids.activate, Buffer.IN),
            Command.ACTIVATE_EX: (asids.activate_ex, Buffer.IN),
            Command.DEACTIVATE: (asids.deactivate, Buffer.IN),
            Command.GUEST_STATUS: (asids.guest_status, Buffer.IN_OUT),
            Command.LAUNCH_START: (launch.launch_start, Buffer.IN_OUT),
            Command.LAUNCH_UPDATE_DATA: (launch.launch_update_data, Buffer.IN),
            Command.LAUNCH_UPDATE_VMSA: (launch.launch_update_vmsa, Buffer.IN),
            Command.LAUNCH_MEASURE: (launch.launch_measure, Buffer.IN_OUT_ERROR),
            Command.LAUNCH_SECRET: (launch.launch_secret, Buffer.IN),
            Command.LAUNCH_FINISH: (launch.launch_finish, Buffer.IN),
            Command.ATTESTATION: (launch.attestation, Buffer.IN_OUT_ERROR),
            Command.DBG_DECRYPT: (debug.dbg_decrypt, Buffer.IN),
            Command.DBG_ENCRYPT: (debug.dbg_encrypt, Buffer.IN),
            Command.SEND_START: (migration.send_start, Buffer.IN_OUT_ERROR),
            Command.SEND_UPDATE_DATA: (migration.send_update_data, Buffer.IN_OUT_ERROR),
            Command.SEND_FINISH: (migration.send_finish, Buffer.IN),
            Command.SEND_CANCEL: (migration.send_cancel, Buffer.IN),
            Command.RECEIVE_START: (migration.receive_start, Buffer.IN_OUT),
            Command.RECEIVE_UPDATE_DATA: (migration.receive_update_data, Buffer.IN),
            Command.RECEIVE_FINISH: (migration.receive_finish, Buffer.IN),
        }

        # One lookup per command: the handler, how its buffer moves, the buffer's layout.
        self._handlers: dict[int, tuple[Handler, Buffer, Layout | None]] = {
            int(command): (handler, use, cmd.BUFFERS.get(command))
            for command, (handler, use) in handlers.items()
        }

    def __repr__(self) -> str:
        major, minor, build = self.api_version
        return f"<SevFirmware {major}.{minor} build {build} state={self.state.name}>"

    @property
    def api_version(self) -> tuple[int, int, int]:
        return self._ctx.api_version

    @property
    def state(self) -> PlatformState:
        return self._ctx.state

    # ---- the dispatcher ----------------------------------------------------------------
    def dispatch(self, command_id: int, buffer_addr: int) -> Status:
        entry = self._handlers.get(command_id)
        if entry is None:
            return Status.INVALID_COMMAND
        handler, use, layout = entry
        ctx = self._ctx
        try:
            buf = None
            ctx.raw_buffer = b""
            if use in _READS:
                ctx.raw_buffer = ctx.mem.read(buffer_addr, layout.size)
                buf = layout.parse(ctx.raw_buffer)
            elif use == Buffer.OUT:
                buf = layout.new()
            status = handler(buf)
            if use in _WRITES and status == Status.SUCCESS:
                ctx.mem.write(buffer_addr, layout.build(buf))
            elif use == Buffer.IN_OUT_ERROR and status == Status.INVALID_LENGTH:
                try:
                    ctx.mem.write(buffer_addr, layout.build(buf))
                except FirmwareError:
                    pass  # the length status stands (AMD-ASPFW ignores this copy's result)
            return status
        except FirmwareError as exc:
            return exc.status
        except Exception as exc:  # noqa: BLE001 - a firmware bug must not reach the host
            log.exception("internal firmware error in command %#x", command_id)
            self.internal_errors.append(f"{command_id:#x}: {type(exc).__name__}: {exc}")
            return Status.HWERROR_PLATFORM
