"""The physical attacker: reads DRAM below the memory controller (cold boot, bus probe).

It sees the bytes as stored — ciphertext wherever a key was used — and nothing else: no
cache contents, no keys.
"""

from __future__ import annotations

from sevsim.attacks.lab import (
    SECRET_MARKER,
    SECRET_SIZE,
    AttackResult,
    attack,
    is_secret,
    published_digest,
    start_victim,
)
from sevsim.profiles import MachineProfile
from sevsim.soc import Machine
from sevsim.soc.dram import PAGE_SIZE
from sevsim.system import HostSystem


class ColdBootDump:
    def __init__(self, machine: Machine) -> None:
        self._dram = machine.dram

    def read(self, pa: int, n: int) -> bytes:
        return self._dram.read(pa, n)

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of the contiguous runs of ever-written memory; the rest of DRAM
        is still the zeros it powered on with."""
        runs: list[tuple[int, int]] = []
        for page in self._dram.written_pages():
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
            else:
                runs.append((page, PAGE_SIZE))
        return runs

    def find(self, needle: bytes) -> list[int]:
        """Every physical address where the dump contains needle."""
        hits = []
        for start, length in self.runs():
            data = self._dram.read(start, length)
            pos = data.find(needle)
            while pos >= 0:
                hits.append(start + pos)
                pos = data.find(needle, pos + 1)
        return hits


def guest_secret_in(dump: ColdBootDump, vm) -> bool:
    """Whether the dump holds a `secret` guest's secret: its marker, followed by the 32
    bytes whose SHA-256 the guest printed (which tells a real find from a chance match)."""
    digest = published_digest(vm)
    return any(is_secret(dump.read(pa, SECRET_SIZE), digest) for pa in dump.find(SECRET_MARKER))


# ---- the cold-boot attack ------------------------------------------------------------------
HOST_SECRET = b"host secret: the database master password is hunter2"


@attack(
    "cold-boot",
    "A DRAM dump: what a physical attacker reads",
    """The attacker freezes the DIMMs and reads them elsewhere (or probes the bus): every
    byte as stored, no caches, no keys. Four machines, each holding a host secret in kernel
    memory and, where there is one, an SEV guest's secret: no memory encryption; SME (the
    host kernel encrypts its memory with the C-bit); TSME (the BIOS encrypts all memory,
    the OS knows nothing); SME with an SEV guest. The dump is searched for every secret.""",
    "SME, TSME or SEV: with any of them DRAM holds only ciphertext",
)
def cold_boot(profile: MachineProfile, r: AttackResult) -> None:
    cases = [
        ("no encryption", profile.with_(tsme=False), "mem_encrypt=off", False),
        ("SME", profile.with_(tsme=False), "mem_encrypt=on", False),
        ("TSME", profile.with_(tsme=True), "mem_encrypt=off", False),
        ("SME + SEV guest", profile.with_(tsme=False), "mem_encrypt=on", True),
    ]
    found: dict[str, dict[str, bool]] = {}
    for label, case_profile, cmdline, guest in cases:
        with HostSystem.start(case_profile, cmdline=cmdline) as system:
            va = system.kernel.alloc_pages(1)
            system.kernel.write(va, HOST_SECRET)
            vm = start_victim(system, "guest") if guest else None
            if vm is not None:
                vm.run()
            system.kernel.wbinvd_on_all_cpus()  # what is still in the caches is lost anyway
            dump = ColdBootDump(system.machine)
            found[label] = {"host": bool(dump.find(HOST_SECRET))}
            if vm is not None:
                found[label]["guest"] = guest_secret_in(dump, vm)
        readable = [who for who, hit in found[label].items() if hit] or ["nothing"]
        r.step(f"{label}: the dump shows {', '.join(readable)}")
    r.figures = {"found": found}
    # The goal: a secret out of a machine that uses memory encryption.
    encrypted = [hits for label, hits in found.items() if label != "no encryption"]
    r.succeeded = any(any(hits.values()) for hits in encrypted)
