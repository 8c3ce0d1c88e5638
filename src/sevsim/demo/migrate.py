"""The migration part of the demo: an SEV guest moves to another platform and goes on.

Two platforms (two chip identities, the same simulated AMD root) in this process, two
QEMU-like VMMs, loopback TCP between them. The guest is the real-code guest firmware
counting in private memory (its ``count`` workload). Judging uses the consoles, the
firmware's guest states and DRAM dumps.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from pathlib import Path

from sevsim.attacks.physical import ColdBootDump
from sevsim.demo.steps import Step, Story, Working
from sevsim.guest import x86 as x86_guest
from sevsim.host.migration import TargetChain
from sevsim.host.vmm import VmConfig, Vmm
from sevsim.profiles import MachineProfile
from sevsim.system import HostSystem

MEMORY = 32 << 20
# A private page that does not change while the guest counts: its page directory.
STILL_PAGE = x86_guest.symbols()["PD_GPA"]
RUNNING, SENT = 3, 6  # guest states (GUEST_STATUS)


def _counts(text: str) -> list[int]:
    complete = text[: text.rfind("\n") + 1]
    return [int(n) for n in re.findall(r"count (?:at )?(\d+)", complete)]


def _wait(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def migrate_story(profile: MachineProfile) -> Story:
    yield Working("migrating a counting guest to another platform")
    with tempfile.TemporaryDirectory(prefix="sevsim-migrate-") as tmp:
        work = Path(tmp)
        # Two throwaway platforms (no state directories): nothing of them outlives the demo.
        a = HostSystem.start(profile)
        other = None if profile.seed is None else profile.seed + 1  # another chip
        b = HostSystem.start(profile.with_(seed=other))
        try:
            s = _story(a, b, work)
        finally:
            a.close()
            b.close()
    yield s


def _story(a: HostSystem, b: HostSystem, work: Path) -> Step:
    (work / "fw.fd").write_bytes(x86_guest.image())
    src = Vmm(
        a,
        VmConfig(
            firmware=work / "fw.fd",
            memory=MEMORY,
            policy=0,
            console=work / "src.log",
            fw_cfg_files={"opt/sevsim/workload": b"count"},
        ),
    )
    dst = Vmm(b, VmConfig(firmware=None, memory=MEMORY, console=work / "dst.log"))
    try:
        src.start()
        src.cont()
        _wait(lambda: len(_counts(src.console_text())) >= 2)
        server = dst.listen_incoming("127.0.0.1:0")
        port = server.getsockname()[1]
        threading.Thread(target=dst.serve_incoming, args=(server,), daemon=True).start()
        chain = b.export_chain(full=True)
        src.target = TargetChain.from_chain(chain.encode(full=True))
        with src.lock:
            a.kernel.wbinvd_on_all_cpus()
            before = ColdBootDump(a.machine).read(src.vm.spa(STILL_PAGE), 32)
        src.migrate(f"tcp:127.0.0.1:{port}", wait=True)
        result = src.query_migrate()
        last_on_a = _counts(src.console_text())[-1]
        # The vCPU goes on after the HLT it left from: the count, not a restart, says so.
        resumed = _wait(lambda: len(_counts(dst.console_text())) >= 2)
        on_b = _counts(dst.console_text())
        with src.lock:
            state_a = src.vm.sev_guest_status().state
        with dst.lock:
            state_b = dst.vm.sev_guest_status().state
            b.kernel.wbinvd_on_all_cpus()
            after = ColdBootDump(b.machine).read(dst.vm.spa(STILL_PAGE), 32)
        s = Step(
            "The guest moves to another platform and counts on",
            "The owner's policy allows sending the guest to a platform whose chain leads to "
            "AMD's root. The source VMM hands the firmware the target's PDH, PEK, OCA and CEK "
            "and AMD's ASK and ARK; SEND_START checks them all, then negotiates transport "
            "keys with the target's PDH. Every private page leaves re-encrypted under those "
            "keys (SEND_UPDATE_DATA) and is written under a new VEK by the receiving "
            "firmware (RECEIVE_UPDATE_DATA). The target says READY; only then does the "
            "source finish (SEND_FINISH: its guest can never run again) and the target run "
            "its copy.",
            facts=[
                ("target chain", "PDH ← PEK ← CEK ← ASK ← ARK (and the OCA), checked by A"),
                ("transferred", f"{result.get('ram', {}).get('transferred', 0)} bytes"),
                ("source console (last)", src.console_text().rstrip().splitlines()[-1]),
                ("target console", dst.console_text().rstrip()),
                ("a private page (page directory) in A's DRAM", before.hex()),
                ("the same page in B's DRAM", after.hex()),
            ],
        )
        s.check("the migration completed", result["status"] == "completed")
        s.check(
            "the source's guest is SENT and its VMM postmigrate",
            state_a == SENT and src.status == "postmigrate",
        )
        s.check("the target's guest is RUNNING", state_b == RUNNING)
        s.check("it resumed where it was (no restart from zero)", resumed and on_b[0] >= last_on_a)
        s.check("and keeps counting on the new platform", resumed and on_b[-1] > on_b[0])
        s.check("the same private memory is different ciphertext on B (a new VEK)", before != after)
        return s
    finally:
        src.quit()
        dst.quit()
