"""The local APIC a VMM gives each vCPU, in xAPIC mode (MMIO at 0xFEE00000): what firmware
reads and programs early — ID, version, the spurious-vector and LVT registers, the timer
(for delays) — and the interrupt command register, through which the bootstrap processor
starts the others with INIT and STARTUP IPIs (Intel SDM vol. 3 §10, AMD APM vol. 2 §16).

MODEL: no interrupt is delivered to a vCPU yet (the timer counts, but does not fire);
IPIs other than INIT and STARTUP are accepted and dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

APIC_BASE = 0xFEE0_0000
APIC_SIZE = 0x1000
BUS_HZ = 1_000_000_000  # the timer's clock (KVM's: 1 ns per bus cycle)

ID, VERSION, TPR, APR, PPR, EOI, LDR, DFR, SVR = (
    0x020,
    0x030,
    0x080,
    0x090,
    0x0A0,
    0x0B0,
    0x0D0,
    0x0E0,
    0x0F0,
)
ESR, ICR_LOW, ICR_HIGH = 0x280, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x320,
    0x330,
    0x340,
    0x350,
    0x360,
    0x370,
)
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
LVT_MASKED = 1 << 16
TIMER_PERIODIC = 1 << 17
VERSION_VALUE = 0x0005_0014  # version 0x14 (integrated APIC), 6 LVT entries

# ICR: delivery mode (bits 10:8), destination shorthand (bits 19:18)
DM_INIT, DM_STARTUP = 5, 6
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3


class LocalApic:
    def __init__(self, apic_id: int, send_ipi: Callable[[int, int, int], None]) -> None:
        self.apic_id = apic_id
        self._send_ipi = send_ipi  # (mode, vector, destination APIC id or -1 for others)
        self.regs: dict[int, int] = {
            TPR: 0,
            LDR: 0,
            DFR: 0xFFFF_FFFF,
            SVR: 0xFF,
            ESR: 0,
            ICR_LOW: 0,
            ICR_HIGH: 0,
            LVT_TIMER: LVT_MASKED,
            LVT_THERMAL: LVT_MASKED,
            LVT_PERF: LVT_MASKED,
            LVT_LINT0: LVT_MASKED,
            LVT_LINT1: LVT_MASKED,
            LVT_ERROR: LVT_MASKED,
            TIMER_INITIAL: 0,
            TIMER_DIVIDE: 0,
        }
        self._timer_start = 0.0

    # ---- the timer ---------------------------------------------------------------------
    def _divisor(self) -> int:
        d = self.regs[TIMER_DIVIDE]
        code = (d & 3) | (d >> 1 & 4)
        return 1 if code == 7 else 2 << code

    def _current_count(self) -> int:
        initial = self.regs[TIMER_INITIAL]
        if not initial:
            return 0
        ticks = int((time.monotonic() - self._timer_start) * BUS_HZ) // self._divisor()
        if self.regs[LVT_TIMER] & TIMER_PERIODIC:
            return initial - ticks % initial
        return max(0, initial - ticks)

    # ---- MMIO ----------------------------------------------------------------------------
    def read(self, offset: int) -> int:
        """A 32-bit read of the register at ``offset`` (16-byte aligned)."""
        reg = offset & 0xFF0
        if reg == ID:
            return self.apic_id << 24
        if reg == VERSION:
            return VERSION_VALUE
        if reg in (APR, PPR) or 0x100 <= reg < 0x280:  # ISR, TMR, IRR: nothing pending
            return 0
        if reg == TIMER_CURRENT:
            return self._current_count()
        return self.regs.get(reg, 0)

    def write(self, offset: int, value: int) -> None:
        reg = offset & 0xFF0
        value &= 0xFFFF_FFFF
        if reg == EOI or reg not in self.regs:
            return
        self.regs[reg] = value
        if reg == TIMER_INITIAL:
            self._timer_start = time.monotonic()
        elif reg == ICR_LOW:
            self._ipi(value)

    def _ipi(self, icr: int) -> None:
        mode = icr >> 8 & 7
        if mode not in (DM_INIT, DM_STARTUP):
            return
        shorthand = icr >> 18 & 3
        if shorthand == SH_NONE:
            target = self.regs[ICR_HIGH] >> 24
        elif shorthand in (SH_ALL, SH_OTHERS):
            target = -1  # every other processor (INIT/SIPI never go to oneself)
        else:
            return
        self._send_ipi(mode, icr & 0xFF, target)
