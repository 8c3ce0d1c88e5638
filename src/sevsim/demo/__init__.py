"""The main job, ``sevsim demo``: the whole story, step by step, with every claim checked.

Each step says what happens, shows what the CPU sees next to what DRAM holds (the view of a
physical attacker with a cold-boot dump) and, for guests, what the hypervisor reads; and it
checks that the machine behaved as the architecture says. The CLI renders the steps as
each completes (``demo_steps`` yields them, with ``Working`` notes of what comes next); this
package only runs them: ``sme`` (SME, TSME, the platform's identity), ``attest`` (launch
attestation with a remote owner), ``sev`` (guests side by side, then SEV against SEV-ES:
the registers), ``migrate``
(a guest moving to another platform), ``io`` (an SEV guest's
disk, its bounce buffers, DMA) and ``attacks`` (the attack lab, staged and checked).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sevsim.demo.attacks import attack_story
from sevsim.demo.attest import attest_story
from sevsim.demo.es import es_story
from sevsim.demo.io import io_story
from sevsim.demo.migrate import migrate_story
from sevsim.demo.sev import sev_story
from sevsim.demo.sme import sme_story, tsme_story
from sevsim.demo.steps import Check, Step, Table, View, Working
from sevsim.profiles import MachineProfile

__all__ = ["Check", "DemoResult", "Step", "Table", "View", "Working", "demo_steps", "run_demo"]


@dataclass
class DemoResult:
    profile: str
    steps: list[Step]

    @property
    def ok(self) -> bool:
        return all(c.ok for s in self.steps for c in s.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "ok": self.ok,
            "steps": [
                {
                    "title": s.title,
                    "facts": dict(s.facts),
                    "views": [
                        {
                            "label": v.label,
                            "mapping": v.mapping,
                            "physical_address": f"{v.physical_address:#x}",
                            "cpu_reads": v.cpu_reads.hex(),
                            "dram_holds": v.dram_holds.hex(),
                        }
                        | ({} if v.host_reads is None else {"host_reads": v.host_reads.hex()})
                        for v in s.views
                    ],
                    "tables": [
                        {"title": t.title, "rows": [_row(t, r) for r in t.rows]} for t in s.tables
                    ],
                    "checks": [{"what": c.what, "ok": c.ok} for c in s.checks],
                }
                for s in self.steps
            ],
        }


def demo_steps(
    profile: MachineProfile,
    sme: bool = True,
    attest: bool = True,
    sev: bool = True,
    io: bool = True,
    tsme: bool = True,
    attacks: bool = True,
    migrate: bool = True,
) -> Iterator[Step | Working]:
    """The SME story (without TSME), launch attestation, SEV guests side by side, a
    migration, an SEV guest's disk and DMA, SME again with TSME, then the attacks; any of
    them may be left out. Each step is yielded as soon as it is complete, after a
    ``Working`` note of what is being done for it."""
    plain, with_tsme = profile.with_(tsme=False), profile.with_(tsme=True)
    parts = [
        (sme, sme_story, plain),
        (attest, attest_story, plain),
        (sev, sev_story, plain),
        (sev, es_story, plain),
        (migrate, migrate_story, plain),
        (io, io_story, plain),
        (tsme, tsme_story, with_tsme),
        (attacks, attack_story, plain),
    ]
    for wanted, story, story_profile in parts:
        if wanted:
            yield from story(story_profile)


def run_demo(profile: MachineProfile, **parts: bool) -> DemoResult:
    """All of ``demo_steps`` (the same keyword arguments), collected."""
    steps = [s for s in demo_steps(profile, **parts) if isinstance(s, Step)]
    return DemoResult(profile.name, steps)


def _row(table: Table, row: list[str]) -> dict[str, str]:
    return dict(zip(table.columns, row, strict=True))
