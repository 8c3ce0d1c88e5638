"""The building blocks of the demo: steps with facts, views, tables and checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Check:
    what: str
    ok: bool


@dataclass
class View:
    """One buffer, as the CPU reads it and as DRAM stores it (and, for guest memory, as the
    hypervisor reads it through its own mapping)."""

    label: str
    mapping: str
    physical_address: int
    cpu_reads: bytes
    dram_holds: bytes
    host_reads: bytes | None = None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Step:
    title: str
    explanation: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append(Check(what, bool(ok)))
        return bool(ok)


@dataclass(frozen=True)
class Working:
    """Yielded by a story before a step's work begins: what is being done, for a progress
    line. It is not part of the result."""

    what: str


Story = Iterator[Step | Working]  # a part of the demo: its steps, each yielded once complete
