"""One onnxruntime InferenceSession per graph, and the options every session is created with.

Why one session per graph (not per model, not shared): a session holds one graph; on GPU each
has its own CUDA stream, and concurrent runs on one session serialise, so separate graphs must
not share one. Sessions are thread-safe for ``run``, so the executor's threads share them.

The provider a session *really* runs on is read back with ``session.get_providers()``:
onnxruntime-gpu offers CUDA even without a GPU or CUDA libraries and silently falls back to CPU,
so the requested list proves nothing. When that fallback happens the factory logs it once and
stops asking for the failed provider, so the remaining sessions load quietly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.repository.manifest import GraphSpec
from serving.repository.noise import draw_noise
from serving.runtime.context import RunContext

log = logging.getLogger(__name__)

NUMPY_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float64": np.float64,
                                             "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


@dataclass(frozen=True)
class RuntimeOptions:
    """The session settings taken from ``serving.config.Settings``."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cuda_device_id: int = 0
    intra_op_threads: int = 1
    inter_op_threads: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> "RuntimeOptions":
        return cls(tuple(settings.providers), settings.cuda_device_id,
                   settings.intra_op_threads, settings.inter_op_threads)


@dataclass
class SessionFactory:
    """Creates sessions with the configured options; remembers providers that failed to start."""

    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    _failed: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.intra_op_threads != 1:
            # Spinning pool threads burn the cores the other workers' sessions need.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3  # errors only; we report the provider outcome ourselves
        return so

    def requested_providers(self) -> list[Any]:
        with self._lock:
            names = [p for p in self.options.providers if p not in self._failed] or ["CPUExecutionProvider"]
        providers: list[Any] = []
        for name in names:
            if name == "CUDAExecutionProvider":
                providers.append((name, {"device_id": str(self.options.cuda_device_id),
                                         "arena_extend_strategy": "kSameAsRequested"}))
            else:
                providers.append(name)
        return providers

    def create(self, path: Path) -> ort.InferenceSession:
        requested = self.requested_providers()
        session = ort.InferenceSession(str(path), sess_options=self.session_options(), providers=requested)
        got = session.get_providers()
        names = [p[0] if isinstance(p, tuple) else p for p in requested]
        missing = [p for p in names if p not in got]
        if missing:
            with self._lock:
                new = [p for p in missing if p not in self._failed]
                self._failed.update(missing)
            if new:
                log.warning("execution provider(s) %s requested but unavailable here (no GPU or missing "
                            "CUDA/cuDNN libraries); sessions run on %s", new, got[0])
        return session


class GraphSession:
    """A loaded graph: its manifest spec, its session and the provider it really runs on."""

    def __init__(self, name: str, path: Path, spec: GraphSpec, factory: SessionFactory):
        self.name = name
        self.spec = spec
        self.session = factory.create(path)
        self.provider = self.session.get_providers()[0]
        self._check_signature()
        self._outputs = [t.name for t in spec.outputs]

    def _check_signature(self) -> None:
        """The ONNX file must take exactly the manifest's inputs and return its outputs."""
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        declared = {t.name for t in self.spec.inputs}
        if onnx_inputs != declared:
            raise ValueError(f"graph {self.name!r}: the ONNX file takes inputs {sorted(onnx_inputs)}, "
                             f"the manifest declares {sorted(declared)}")
        absent = [t.name for t in self.spec.outputs if t.name not in onnx_outputs]
        if absent:
            raise ValueError(f"graph {self.name!r}: outputs {absent} declared in the manifest are not in "
                             f"the ONNX file (it has {sorted(onnx_outputs)})")

    def warm_up(self) -> None:
        """Run one row so that the first request does not pay for lazy initialisation."""
        feeds = draw_noise(self.spec.inputs, 1, 0)
        for t in self.spec.data_inputs:
            shape = [1 if d == -1 else d for d in t.shape]
            feeds[t.name] = np.zeros(shape, dtype=NUMPY_DTYPES[t.dtype])
        self.run(feeds)

    def run(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None) -> list[np.ndarray]:
        """One session run; outputs in the manifest's order."""
        rows = len(next(iter(feeds.values()))) if feeds else 0
        started = ctx.starting(self.name) if ctx is not None else time.monotonic()
        outputs = self.session.run(self._outputs, feeds)
        if ctx is not None:
            ctx.finished(self.name, rows, started)
        return outputs

    def run_chunked(self, feeds: dict[str, np.ndarray], chunk_rows: int,
                    ctx: RunContext | None = None) -> list[np.ndarray]:
        """Run ``feeds`` (all with the same batch axis 0) in slices of ``chunk_rows`` rows.

        Graphs here are row-wise independent, so slicing is exact; it bounds per-run memory
        (a kernel density builds an N x n_train matrix) and lets a passed deadline stop the work
        between slices.
        """
        rows = len(next(iter(feeds.values())))
        if rows <= chunk_rows:
            return self.run(feeds, ctx)
        parts: list[list[np.ndarray]] = []
        for start in range(0, rows, chunk_rows):
            parts.append(self.run({k: v[start:start + chunk_rows] for k, v in feeds.items()}, ctx))
        return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(self._outputs))]
