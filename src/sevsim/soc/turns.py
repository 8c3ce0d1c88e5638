"""Who is running on the silicon: one activity at a time, in arrival order.

On hardware the cores, the Secure Processor and the DMA engines work in parallel. In the
model they share Python objects (the cache, the memory controller, a core's mode and
registers), so they take turns: a turn is a whole VMRUN (up to its #VMEXIT or the end of
its time slice), a whole firmware command, a whole host memory operation or DMA transfer.
Two host threads can therefore never interleave on a core (a guest's nested page fault
cannot surface in another thread's host access), and turns are granted first come, first
served, so a busy guest that asks again at once queues behind the others.

The holder is an *activity*, normally a thread. The model's Python guest programs run on a
thread of their own while the thread that executed VMRUN waits for the exit; they adopt
the VMRUN's activity (``adopt``), since only one of the two ever runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Turns:
    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._owner: object | None = None
        self._depth = 0
        self._queue: deque[object] = deque()
        self._local = threading.local()

    def activity(self) -> object:
        """The calling thread's activity: its own, or the one it adopted."""
        return getattr(self._local, "activity", None) or threading.get_ident()

    def adopt(self, activity: object | None) -> None:
        """Act as ``activity`` from now on (None: as this thread again)."""
        self._local.activity = activity

    def acquire(self) -> None:
        me = self.activity()
        if self._owner == me:  # only the owner changes the depth while it owns the turn
            self._depth += 1
            return
        with self._cv:
            self._queue.append(me)
            while self._owner is not None or self._queue[0] != me:
                self._cv.wait()
            self._queue.popleft()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        with self._cv:
            self._depth, self._owner = 0, None
            self._cv.notify_all()

    def held(self) -> bool:
        return self._owner == self.activity()

    def __enter__(self) -> Turns:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def taking_turns(method: F) -> F:
    """A method of a unit that owns ``self.turns`` runs as one turn on the silicon."""

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.turns:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
