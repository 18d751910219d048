"""A served model's operations as plain NumPy functions, their validation and typed errors."""

from serving.models.operations import Detection, detect, sample, score, translate
from serving.models.validation import Limits

__all__ = ["Detection", "Limits", "detect", "sample", "score", "translate"]
