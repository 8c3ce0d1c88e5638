"""Power-on of a whole platform: the silicon, then the PSP and its firmware.

``state_dir`` makes the platform persistent: the chip's fuses and the firmware's SPI flash
live there, so the next power-on is the same chip with the same keys. One process at a
time holds a state directory (``close()`` releases it); many VMs share it through the
platform service.
"""

from __future__ import annotations

from pathlib import Path

from sevsim.amd.fab import manufacture
from sevsim.amd.kds import KeyDistributionService
from sevsim.fsutil import FileLock
from sevsim.paths import data_dir as default_data_dir
from sevsim.profiles import MachineProfile
from sevsim.psp.firmware import SevFirmware
from sevsim.psp.inspect import PspDebugPort
from sevsim.psp.mailbox import Mailbox
from sevsim.psp.persistent import SpiFlash
from sevsim.soc import Machine
from sevsim.soc.engine import EngineMode
from sevsim.soc.psp_port import PspHardware
from sevsim.soc.rng import EntropySource

PROFILE_FILE = "profile"


class PlatformMismatch(ValueError):
    pass


class Platform:
    """A powered-on platform. Host software reaches the firmware only through
    ``mailbox``; the firmware object itself stays here (``psp_debug_port`` is the one
    documented window for inspection tools)."""

    def __init__(
        self,
        profile: MachineProfile,
        engine_mode: EngineMode | None = None,
        state_dir: Path | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.profile = profile
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._lock: FileLock | None = None
        if self.state_dir is not None:
            self._lock = FileLock(self.state_dir / ".lock", what="platform")
            recorded = self.state_dir / PROFILE_FILE
            if recorded.exists() and recorded.read_text().strip() != profile.name:
                self._lock.release()
                raise PlatformMismatch(
                    f"{self.state_dir} holds a {recorded.read_text().strip()} platform, "
                    f"not {profile.name}"
                )
            recorded.write_text(profile.name + "\n")
        self.machine = Machine(profile, engine_mode)
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        fuses = manufacture(profile, self.state_dir, KeyDistributionService(self.data_dir))
        self._firmware = SevFirmware(
            PspHardware(self.machine),
            fuses,
            SpiFlash(self.state_dir),
            profile,
            EntropySource(profile.seed, f"psp/{profile.name}"),
        )
        turns = self.machine.turns

        def dispatch(command: int, address: int) -> int:
            with turns:  # the PSP runs a whole command as one turn on the silicon
                return self._firmware.dispatch(command, address)

        self.mailbox = Mailbox(profile.psp_mailbox, dispatch)

    def psp_debug_port(self) -> PspDebugPort:
        """The PSP's debug port (``sevsim.psp.inspect``): for the fuzzer, the demo's teaching
        views and tests, never for host, guest, owner or attack code."""
        return PspDebugPort(self._firmware)

    def close(self) -> None:
        """Power off: end every guest's execution context and release the state directory."""
        self.machine.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Platform {self.profile.name} state={self.state_dir}>"
