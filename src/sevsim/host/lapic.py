"""The local APIC a VMM gives each vCPU, in xAPIC mode (MMIO at 0xFEE00000): what firmware
reads and programs — ID, version, the spurious-vector and LVT registers, the timer — and
the interrupt command register, through which the bootstrap processor starts the others
with INIT and STARTUP IPIs (Intel SDM vol. 3 §10, AMD APM vol. 2 §16).

The timer (KVM's: a 1 GHz bus clock, divided by the divide configuration register) counts
down from the initial count, once (one-shot) or over and over (periodic). When it reaches
zero and its LVT entry is not masked, the LVT's vector becomes pending in the IRR; the
hypervisor injects the highest pending vector whose priority class is above the TPR's and
the one in service (PPR) when the guest can take it (RFLAGS.IF), moving it to the ISR; an
EOI ends the one in service. This is what OVMF's LocalApicTimerDxe runs its DXE timer on.

MODEL: edge-triggered, fixed delivery only (no TMR, no NMI/SMI/ExtINT); periods that
elapse while a vector is still pending merge into one interrupt, as on hardware; the
TSC-deadline mode is not modelled. IPIs other than INIT and STARTUP are dropped.
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
ISR, TMR, IRR = 0x100, 0x180, 0x200  # 8 registers of 32 bits each, every 0x10
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
LVT_MASKED = 1 << 16
TIMER_PERIODIC = 1 << 17
SVR_ENABLE = 1 << 8  # APIC software enable: clear, every LVT entry is masked
VERSION_VALUE = 0x0005_0014  # version 0x14 (integrated APIC), 6 LVT entries

# ICR: delivery mode (bits 10:8), destination shorthand (bits 19:18)
DM_INIT, DM_STARTUP = 5, 6
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3


class LocalApic:
    def __init__(
        self,
        apic_id: int,
        send_ipi: Callable[[int, int, int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apic_id = apic_id
        self._send_ipi = send_ipi  # (mode, vector, destination APIC id or -1 for others)
        self.clock = clock
        self.irr = 0  # 256-bit bitmaps: requested, and in service
        self.isr = 0
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
        self._timer_fired = 0  # expiries already turned into interrupt requests

    # ---- the timer ---------------------------------------------------------------------
    def _divisor(self) -> int:
        d = self.regs[TIMER_DIVIDE]
        code = (d & 3) | (d >> 1 & 4)
        return 1 if code == 7 else 2 << code

    def _ticks(self) -> int:
        """Timer clock ticks since the initial count was written."""
        return int((self.clock() - self._timer_start) * BUS_HZ) // self._divisor()

    def _expiries(self) -> int:
        """How often the count has reached zero since the initial count was written."""
        initial = self.regs[TIMER_INITIAL]
        if not initial:
            return 0
        passed = self._ticks() // initial
        return passed if self.regs[LVT_TIMER] & TIMER_PERIODIC else min(passed, 1)

    def _current_count(self) -> int:
        initial = self.regs[TIMER_INITIAL]
        if not initial:
            return 0
        ticks = self._ticks()
        if self.regs[LVT_TIMER] & TIMER_PERIODIC:
            return initial - ticks % initial
        return max(0, initial - ticks)

    def next_expiry(self) -> float | None:
        """When (on ``clock``) the timer next reaches zero, or None if it will not."""
        initial = self.regs[TIMER_INITIAL]
        if not initial or self.regs[LVT_TIMER] & LVT_MASKED:
            return None
        fired = self._expiries()
        if fired and not self.regs[LVT_TIMER] & TIMER_PERIODIC:
            return None
        period = initial * self._divisor() / BUS_HZ
        return self._timer_start + (fired + 1) * period

    # ---- interrupts ------------------------------------------------------------------------
    def _update_timer(self) -> None:
        """A count that reached zero requests the LVT timer's vector (unless masked)."""
        fired = self._expiries()
        if fired > self._timer_fired:
            self._timer_fired = fired
            lvt = self.regs[LVT_TIMER]
            if not lvt & LVT_MASKED and self.regs[SVR] & SVR_ENABLE:
                self.irr |= 1 << (lvt & 0xFF)

    def _ppr(self) -> int:
        """The processor priority: the higher class of TPR and of the vector in service."""
        tpr = self.regs[TPR] & 0xFF
        in_service = self.isr.bit_length() - 1 if self.isr else 0
        return tpr if tpr >> 4 >= in_service >> 4 else in_service & 0xF0

    def pending(self) -> int | None:
        """The vector the processor would take now (IRR above PPR), if any."""
        self._update_timer()
        if not self.irr:
            return None
        vector = self.irr.bit_length() - 1
        return vector if vector >> 4 > self._ppr() >> 4 else None

    def acknowledge(self, vector: int) -> None:
        """The processor took ``vector``: from requested to in service."""
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector

    def _eoi(self) -> None:
        if self.isr:
            self.isr &= ~(1 << self.isr.bit_length() - 1)

    # ---- MMIO ----------------------------------------------------------------------------
    def read(self, offset: int) -> int:
        """A 32-bit read of the register at ``offset`` (16-byte aligned)."""
        reg = offset & 0xFF0
        if reg == ID:
            return self.apic_id << 24
        if reg == VERSION:
            return VERSION_VALUE
        if reg == PPR:
            return self._ppr()
        if ISR <= reg < ESR:
            self._update_timer()
            base = reg & ~0x7F
            bitmap = {ISR: self.isr, TMR: 0, IRR: self.irr}[base]
            return bitmap >> 32 * ((reg - base) >> 4) & 0xFFFF_FFFF
        if reg == APR:
            return 0
        if reg == TIMER_CURRENT:
            return self._current_count()
        return self.regs.get(reg, 0)

    def write(self, offset: int, value: int) -> None:
        reg = offset & 0xFF0
        value &= 0xFFFF_FFFF
        if reg == EOI:
            self._eoi()
            return
        if reg not in self.regs:
            return
        if reg == LVT_TIMER:
            self._update_timer()  # an expiry before the change counts as it was
        self.regs[reg] = value
        if reg == TIMER_INITIAL:
            self._timer_start = self.clock()  # writing the initial count (re)starts it
            self._timer_fired = 0
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
