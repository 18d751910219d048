"""Typed request errors, one class per gRPC status code of DESIGN.md §5.

The models and the validation raise these; ``serving.services.status`` maps them onto gRPC
status codes. Keeping the classes free of grpc means the model operations are plain NumPy
functions, testable without a server, while every failure still carries the code it maps to
and a message that names the field and what was expected.
"""

from __future__ import annotations


class ServingError(Exception):
    """A request the server refuses; ``code`` is the gRPC status code name."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """Wrong shape, dtype, byte length, NaN/Inf, empty batch, out-of-range parameter."""

    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    """Unknown model name or a version that is not loaded."""

    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    """The model lacks the capability the request needs (sampling a GAN-less scorer, ...)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    """More rows, samples or bytes than the configured limits."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    """The server is draining, or the model is known but failed to load."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ServingError):
    """The client's deadline passed before the work was done; the rest of it is skipped."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ServingError):
    """The client went away; the rest of the work is skipped."""

    code = "CANCELLED"
