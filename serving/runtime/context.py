"""What one request carries into the session runs it causes: its clock, deadline and observer.

The gRPC servicer creates a ``RunContext`` when a request arrives and hands it down through the
model operation to every session run. It lets the runtime

* drop the request (or the pieces of it not yet started) from its graph's batch queue once the
  client's deadline has passed or the client has cancelled, so abandoned work is never computed;
* report to the metrics, without the runtime importing Prometheus, the time the request waited
  in the batch queue and each merged run it took part in (rows, requests, seconds) — the
  batcher (``serving.runtime.batching``) calls the observer.

Plain NumPy callers (tests, notebooks) pass no context and get none of this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from serving.models.errors import Cancelled, DeadlineExceeded


class CancelFlag:
    """Set once by the event loop when the client goes away, read by the batch runner threads.

    A plain attribute suffices (a bool store is atomic under the GIL and nobody waits on it);
    ``threading.Event`` would build a Condition and a lock for every request.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class RunObserver(Protocol):
    def queued(self, model: str, graph: str, seconds: float) -> None: ...

    def ran(self, model: str, graph: str, rows: int, seconds: float) -> None: ...


@dataclass
class RunContext:
    model: str = ""
    arrived: float = field(default_factory=time.monotonic)
    # Monotonic time after which the client no longer waits; None = no deadline.
    deadline: float | None = None
    observer: RunObserver | None = None
    cancelled: CancelFlag = field(default_factory=CancelFlag)
    # Set by the servicer when this is the only request the server is handling: the event loop
    # has nothing else to do, so the batcher may run it there at once (Batcher._run_now) or compute
    # a share of it there (Batcher._share_with_loop).
    sole: bool = False
    _queued: set[str] = field(default_factory=set)

    @classmethod
    def with_timeout(cls, model: str, seconds: float | None, observer: RunObserver | None = None) -> "RunContext":
        now = time.monotonic()
        return cls(model=model, arrived=now, deadline=None if seconds is None else now + seconds,
                   observer=observer)

    def check(self) -> None:
        """Raise if the work should stop: the client cancelled or its deadline passed."""
        if self.cancelled.is_set():
            raise Cancelled("the client cancelled the request")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("deadline exceeded before the request finished; "
                                   "send fewer rows or a longer deadline")

    def starting(self, graph: str) -> float:
        """Called just before a session run; returns the start time."""
        self.check()
        now = time.monotonic()
        if graph not in self._queued:
            self._queued.add(graph)
            if self.observer is not None:
                self.observer.queued(self.model, graph, now - self.arrived)
        return now

    def finished(self, graph: str, rows: int, started: float) -> None:
        if self.observer is not None:
            self.observer.ran(self.model, graph, rows, time.monotonic() - started)

