"""Services reach the gRPC server through their generic handlers only, never as registered methods.

The generated ``add_*Servicer_to_server`` functions (ours, grpc_health's, grpc_reflection's) give the
server every method twice: in a generic handler, and as a *registered method*. grpc.aio (1.85) keeps
one pending ``_request_registered_call`` task per registered method, and for every call that arrives
its main loop waits on all of them again (``asyncio.wait(..., FIRST_COMPLETED)``: a done-callback
added to and removed from each task). This server has 22 methods (OIP 12, the domain API 6, health
3, reflection 1), so every call paid for a wait on 23 tasks.

Measured on the development VM: asyncio.wait over 23 tasks against 2, in-process, 34-39 µs against
19-21 µs per round; ``bench/grpc_registered_methods.py``: S1's bare-grpcio floor at 64 concurrent
one-row requests, 12 interleaved rounds, 5,553 requests/s and 237 µs of server CPU per request with no
registered method against 4,606 and 275 µs with 22 (more CPU in 9 rounds); ``genserve serve --workers 2`` at 64
concurrent one-row GMM requests, 8 interleaved pairs, 5,066 -> 5,766 requests/s (faster in 6) and
360 -> 318 µs of server CPU per request (lower in 7). Without registered methods one task waits, and
a method is found by the generic handlers instead: a dictionary lookup per handler, the OIP's first.
"""
from __future__ import annotations

from typing import Any, Sequence

import grpc


class GenericOnly:
    """What an ``add_*Servicer_to_server`` function is given instead of the server: the generic
    handlers go through, the registered-method copy of the same handlers is dropped."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """The same handlers arrive through ``add_generic_rpc_handlers``; registering them too
        would cost every call a wait on one more task per method (see the module docstring)."""
