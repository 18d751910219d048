"""What every RPC checks first: are models loaded, is the server draining, how many are in flight.

The server owns one ``ServingState`` and the servicers share it. Draining is a flag rather than
``grpc.aio.Server.stop``: while it is set the server still accepts connections, so new requests
get a clear UNAVAILABLE "server is draining" (and the health service says NOT_SERVING) instead
of a connection error, and the in-flight count tells the drain when it may stop the server.
"""

from __future__ import annotations

import asyncio

from serving.models.errors import Unavailable
from serving.repository.loader import Repository


class ServingState:
    def __init__(self) -> None:
        self.repository: Repository | None = None
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        """Count a request in; True when it is the only one in flight (the event loop is free)."""
        self.in_flight += 1
        self._idle.clear()
        return self.in_flight == 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def ready_repository(self) -> Repository:
        """The loaded repository, or Unavailable while loading or draining."""
        if self.draining:
            raise Unavailable("server is draining (shutting down): retry on another replica")
        if self.repository is None:
            raise Unavailable("server is starting: models are not loaded yet")
        return self.repository

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
