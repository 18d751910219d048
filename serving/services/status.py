"""From typed request errors to gRPC status codes (DESIGN.md §5).

One table, so every servicer maps errors the same way: a ``ServingError`` carries the code
name; anything else is a bug in the server and becomes INTERNAL (logged with its traceback,
reported to the client without internals beyond its type and message).
"""

from __future__ import annotations

import grpc

from serving.models.errors import ServingError


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised while serving."""
    if isinstance(exc, ServingError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), exc.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
