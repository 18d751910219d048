"""The manifest of one model version, validated by the writer (training) and the reader (serving).

It lives in ``serving`` because serving must never import training, while training may import
this module: one pydantic model on both sides means a manifest that was written is one that
loads. Every field a client or the server relies on is declared here with its constraints, so a
hand-edited or truncated manifest is rejected with the field that is wrong.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

Capability = Literal["score", "anomaly", "sample", "conditional", "translate", "encode",
                     "reconstruct", "sequence"]
DType = Literal["float32", "float64", "int64", "int32", "uint8"]
NoiseKind = Literal["normal", "uniform"]
AxisName = Literal["importance_samples", "length"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output. ``shape`` includes the batch axis as -1."""

    name: str = Field(min_length=1)
    shape: list[int]
    dtype: DType = "float32"
    # A noise input is drawn by the server from the request's seed, never sent by the client.
    noise: NoiseKind | None = None
    # Axes (beyond the batch axis) whose size a request may change, by name; ``shape`` holds the
    # default size. E.g. a VAE's score noise [-1, 64, 16] with {1: "importance_samples"}, or an
    # HMM's sample noise [-1, 50] with {1: "length"}. The exported graph keeps them dynamic.
    axes: dict[int, AxisName] = Field(default_factory=dict)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"dimensions must be positive or -1 (dynamic), got {shape}")
        return shape

    @model_validator(mode="after")
    def _axes_inside(self) -> "TensorSpec":
        for axis in self.axes:
            if not 1 <= axis < len(self.shape) or self.shape[axis] < 1:
                raise ValueError(f"axes: axis {axis} of {self.name!r} must be a non-batch axis with a "
                                 f"default size in shape {self.shape}")
        return self


class GraphSpec(_Strict):
    """An ONNX file of this version and the tensors it takes and returns."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    @property
    def noise_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.noise is not None]

    @property
    def data_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.noise is None]


class InputSpec(_Strict):
    """What one row of client data looks like (without the batch axis).

    -1 marks an axis of any size, equal within a request: the time axis of sequences [T, D].
    """

    shape: list[int] = Field(min_length=1)
    dtype: DType = "float32"
    low: float | None = None
    high: float | None = None

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 and d != -1 for d in shape):
            raise ValueError(f"row dimensions must be positive or -1 (any length), got {shape}")
        return shape


class AnomalyCalibration(_Strict):
    """The anomaly threshold and the held-out score quantiles it came from.

    ``quantiles[i]`` is the held-out anomaly score quantile at level ``i / (len - 1)``, so a
    request may ask for another contamination rate without refitting.
    """

    threshold: float
    contamination: float = Field(gt=0.0, lt=1.0)
    method: str
    n_calibration: int = Field(ge=1)
    quantiles: list[float] = Field(min_length=2)

    @field_validator("quantiles")
    @classmethod
    def _sorted_finite(cls, q: list[float]) -> list[float]:
        if any(not math.isfinite(v) for v in q) or any(a > b for a, b in zip(q, q[1:])):
            raise ValueError("quantiles must be finite and non-decreasing")
        return q

    def threshold_at(self, contamination: float) -> float:
        """Score threshold flagging ``contamination`` of held-out normal rows (linear interpolation)."""
        level = (1.0 - contamination) * (len(self.quantiles) - 1)
        lo = math.floor(level)
        hi = min(lo + 1, len(self.quantiles) - 1)
        frac = level - lo
        return self.quantiles[lo] * (1.0 - frac) + self.quantiles[hi] * frac


class ExportCheck(_Strict):
    """The parity check of ONNX against torch, per graph: largest differences on held-out inputs."""

    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]
    tolerance: float = Field(gt=0.0)
    rows: int = Field(ge=1)

    @model_validator(mode="after")
    def _within_tolerance(self) -> "ExportCheck":
        bad = {g: d for g, d in self.max_rel_diff.items() if not d <= self.tolerance}
        if bad:
            raise ValueError(f"export check above tolerance {self.tolerance}: {bad}")
        return self


class Batching(_Strict):
    """Per-model overrides of the server's dynamic batching settings."""

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0.0)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    version: int = Field(ge=1)
    family: str = Field(min_length=1)
    description: str = ""
    input: InputSpec
    capabilities: list[Capability] = Field(min_length=1)
    graphs: dict[str, GraphSpec] = Field(min_length=1)
    anomaly: AnomalyCalibration | None = None
    hyperparameters: dict[str, object] = Field(default_factory=dict)
    # Figures measured at training time, e.g. {"test_log_likelihood": 58.1}.
    metrics: dict[str, float] = Field(default_factory=dict)
    export_check: ExportCheck
    data_fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    dataset: str = ""
    num_classes: int | None = Field(default=None, ge=2)
    batching: Batching = Field(default_factory=Batching)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    genserve_version: str

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        needs = {"score": "score", "sample": "sample", "encode": "encode", "reconstruct": "reconstruct"}
        for capability, graph in needs.items():
            if capability in self.capabilities and graph not in self.graphs:
                raise ValueError(f"capability {capability!r} needs a {graph!r} graph")
        if "anomaly" in self.capabilities and not {"score", "anomaly"} & set(self.graphs):
            raise ValueError("capability 'anomaly' needs a 'score' graph (-log p) or an 'anomaly' graph")
        if "translate" in self.capabilities and not {"translate_a2b", "translate_b2a"} <= set(self.graphs):
            raise ValueError("capability 'translate' needs translate_a2b and translate_b2a graphs")
        if "anomaly" in self.capabilities and self.anomaly is None:
            raise ValueError("capability 'anomaly' needs an 'anomaly' calibration")
        if "conditional" in self.capabilities and self.num_classes is None:
            raise ValueError("capability 'conditional' needs num_classes")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
