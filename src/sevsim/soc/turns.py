"""Who is running on the silicon: one activity at a time, in arrival order.

On hardware the cores, the Secure Processor and the DMA engines work in parallel. In the
model they share Python objects (the cache, the memory controller, a core's mode and
registers), so they take turns: a turn is a whole VMRUN (up to its #VMEXIT or the end of
its time slice), a whole firmware command, a whole host memory operation or DMA transfer.
Two host threads can therefore never interleave on a core (a guest's nested page fault
cannot surface in another thread's host access), and turns are granted first come, first
served, so a busy guest that asks again at once queues behind the others.

The holder is an *activity*, normally a thread. A vCPU's instruction engine runs on a
thread of its own while the thread that executed VMRUN waits for the exit; it adopts the
VMRUN's activity (``adopt``), since only one of the two ever runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class _Local(threading.local):
    activity: object = None  # a class default: no exception on the hot path


class Turns:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by whoever has the turn
        self._mutex = threading.Lock()  # guards the queue and the hand-over
        self._queue: deque[tuple[object, threading.Lock]] = deque()
        # Read by the hot paths of the units that take turns (``mine``); written only here.
        self.owner: object | None = None
        self._depth = 0
        self.local = _Local()

    def activity(self) -> object:
        """The calling thread's activity: its own, or the one it adopted."""
        return self.local.activity or threading.get_ident()

    def adopt(self, activity: object | None) -> None:
        """Act as ``activity`` from now on (None: as this thread again)."""
        self.local.activity = activity

    def acquire(self) -> None:
        me = self.local.activity or threading.get_ident()
        if self.owner == me:  # only the owner changes the depth while it owns the turn
            self._depth += 1
            return
        self._take(me)

    def _take(self, me: object) -> None:
        if not self._queue and self._lock.acquire(False):  # nobody has it, nobody waits
            self.owner, self._depth = me, 1
            return
        with self._mutex:
            if not self._queue and self._lock.acquire(False):
                self.owner, self._depth = me, 1
                return
            baton = threading.Lock()
            baton.acquire()
            self._queue.append((me, baton))
        baton.acquire()  # released by the holder that hands the turn over to us
        # The turn (and self._lock) was handed over with owner and depth set.

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        with self._mutex:
            if self._queue:  # first come, first served: hand over, the lock stays taken
                activity, baton = self._queue.popleft()
                self.owner, self._depth = activity, 1
                baton.release()
            else:
                self.owner, self._depth = None, 0
                self._lock.release()

    def held(self) -> bool:
        return self.owner == (self.local.activity or threading.get_ident())

    def __enter__(self) -> Turns:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def taking_turns(method: F) -> F:
    """A method of a unit that owns ``self.turns`` runs as one turn on the silicon."""

    get_ident = threading.get_ident

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        turns = self.turns
        me = turns.local.activity or get_ident()
        if turns.owner == me:  # already this activity's turn (the common case inside VMRUN)
            return method(self, *args, **kwargs)
        turns._take(me)
        try:
            return method(self, *args, **kwargs)
        finally:
            turns.release()

    return wrapper  # type: ignore[return-value]
