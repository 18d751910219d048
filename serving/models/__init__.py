"""A served model's operations as plain NumPy functions, their validation and typed errors.

The operations are imported lazily, so that importing ``serving.models.errors`` (the client and
the wire codec do) does not load onnxruntime.
"""

from typing import Any

__all__ = ["Detection", "Limits", "detect", "sample", "score", "translate"]


def __getattr__(name: str) -> Any:
    if name == "Limits":
        from serving.models.validation import Limits

        return Limits
    if name in __all__:
        from serving.models import operations

        return getattr(operations, name)
    raise AttributeError(f"module 'serving.models' has no attribute {name!r}")
