"""The inspection port: a debugger's view of the PSP's SEV firmware.

Real parts have no such thing — the PSP's memory and the firmware's state are out of reach
of everything on the x86 side, and that is the point of SEV. The model needs a window
anyway, for the tools that check the firmware from outside and for teaching: the mailbox
fuzzer (guest contexts, ASIDs, internal errors after every case), the ASID-load checker
(every ACTIVATE), the demo's narration (the firmware's ASID table) and tests.

Who may use it: ``sevsim.fuzz``, ``sevsim.tamper``, ``sevsim.demo`` and tests, through
``HostSystem.inspection_port()`` (or ``PspDebugPort(firmware)`` on a bare machine). Host,
guest, owner and attack code (``sevsim.host|guest|owner|attacks``) never do: an attack
that needs this port is not an attack. What the port shows includes secrets (a guest's
VEK, the platform's private keys), exactly as a hardware debugger on the PSP would.

This module is the one place outside the firmware's own modules that touches its
internals; when they change, only this file follows.
"""

from __future__ import annotations

from collections.abc import Callable

from sevsim.api.commands import Command
from sevsim.api.status import PlatformState, Status
from sevsim.psp.asids import ActivationWatcher
from sevsim.psp.firmware import SevFirmware
from sevsim.psp.guest import Guest


class PspDebugPort:
    def __init__(self, firmware: SevFirmware) -> None:
        self._fw = firmware
        self._ctx = firmware._ctx  # the state every command family shares

    def __repr__(self) -> str:
        return f"<PspDebugPort {self._fw!r}>"

    # ---- the platform ---------------------------------------------------------------------
    @property
    def platform_state(self) -> PlatformState:
        return self._fw.state

    @property
    def api_version(self) -> tuple[int, int, int]:
        return self._fw.api_version

    @property
    def internal_errors(self) -> list[str]:
        """Exceptions the dispatcher caught (each reported to the host as HWERROR_PLATFORM)."""
        return list(self._fw.internal_errors)

    @property
    def cuk(self) -> bytes:
        """The chip-unique key from the fuses (GET_ID and the CEK derive from it)."""
        return self._ctx.fuses.cuk

    def platform_keys(self) -> dict[str, int | None]:
        """The private scalars of the CEK, OCA (None when externally owned), PEK and PDH;
        empty while the platform is UNINIT."""
        ident = self._ctx.identity
        if ident is None:
            return {}
        p = ident.persistent
        cek = ident.cek.private_numbers().private_value
        return {"cek": cek, "oca": p.oca_key, "pek": p.pek_key, "pdh": p.pdh_key}

    def wbinvd_done(self) -> list[bool]:
        """The per-core WBINVD-done flags, as DF_FLUSH reads them."""
        return self._ctx.hw.wbinvd_done()

    # ---- guests and ASIDs ---------------------------------------------------------------------
    def guest(self, handle: int) -> Guest | None:
        """The firmware's context of a guest (the live object), or None."""
        return self._ctx.guests.get(handle)

    def guests(self) -> list[Guest]:
        return list(self._ctx.guests.values())

    def asid_state(self, asid: int) -> dict[str, int]:
        """Per-CCX bitmasks of the ASID's firmware state, and the handle holding it (0: none)."""
        table = self._ctx.asids
        holder = next((g.handle for g in self._ctx.guests.values() if g.asid == asid), 0)
        return {
            "handle": holder,
            "dirty": table.dirty[asid],
            "clean": table.clean[asid],
            "allocated": table.allocated[asid],
            "in_use": table.in_use[asid],
        }

    # ---- memory ---------------------------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        """x86 memory as the firmware reads an address the host gives (C-bit: the host key);
        raises ``FirmwareError`` for an address the firmware would refuse."""
        return self._ctx.mem.read(addr, size)

    # ---- hooks for checkers and fault injection ---------------------------------------------
    def watch_activations(self, watcher: ActivationWatcher) -> None:
        """Call ``watcher(asid, dirty_before, status)`` after the last step of every ACTIVATE
        and ACTIVATE_EX that got past the handle and ASID-ownership checks."""
        self._fw._asids.watchers.append(watcher)

    def replace_handler(self, command: Command, handler: Callable[[object], Status]) -> None:
        """Run ``handler(buffer record)`` for ``command`` instead of the firmware's own: a
        simulated firmware bug, to test the tools that must catch one."""
        _, use, layout = self._fw._handlers[int(command)]
        self._fw._handlers[int(command)] = (handler, use, layout)

    def occupy_handles(self, count: int) -> None:
        """Take the ``count`` lowest free guest handles with placeholder contexts, so that
        a test reaches RESOURCE_LIMIT without launching a thousand guests."""
        guests = self._ctx.guests
        for _ in range(count):
            guests[next(h for h in range(1, len(guests) + 2) if h not in guests)] = object()
