"""onnxruntime sessions per graph, the options every session is created with, and the batcher.

Why sessions per graph (not per model, not shared): a session holds one graph; on GPU each has
its own CUDA stream, and concurrent runs on one session serialise, so separate graphs must not
share one, and a hot graph may get several (``graph_instances``). Sessions are thread-safe for
``run``; on CPU the batcher's runner threads share one session unless more are configured.

Every request reaches a graph through its ``Batcher`` (``serving.runtime.batching``): the
operations call ``GraphSession.run``/``run_chunked`` (blocking) and the Open Inference Protocol
servicer ``await GraphSession.infer``; concurrent requests are merged into one session run.

At load each graph is warmed up on every session (1 row, then 16 rows or more): the second run also
tells whether the graph really batches (its outputs follow the batch axis) and what one row
costs, which the batcher uses to decide when splitting a large request across runners pays.

On GPU (CUDA provider really in use) runs go through IO binding when ``io_binding`` is set:
inputs are bound from host memory and outputs allocated by onnxruntime and copied back once,
instead of ``run``'s extra staging copies.

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

from serving.repository.manifest import Batching, GraphSpec, TensorSpec
from serving.repository.noise import draw_noise
from serving.runtime.batching import Batcher, BatchObserver, BatchPolicy
from serving.runtime.context import RunContext

log = logging.getLogger(__name__)

NUMPY_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float64": np.float64,
                                             "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


OPTIMIZATION_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8"}
PROBE_ROWS = 16  # the warm-up's first many-row run; it grows (x4) while they cost < 4 one-row runs
PROBE_SLOPE_FACTOR = 4.0
PROBE_MAX_ROWS = 1024
PROBE_MAX_SECONDS = 0.005


@dataclass(frozen=True)
class RuntimeOptions:
    """The session and batching settings taken from ``serving.config.Settings``."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cuda_device_id: int = 0
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    cuda_mem_limit: int = 0
    cuda_arena_extend_strategy: str = "kSameAsRequested"
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    io_binding: bool = True
    trt_fp16: bool = False
    trt_engine_cache_dir: str | None = None
    graph_instances: int = 1
    # Dynamic batching defaults (a manifest's ``batching`` overrides the first two per model).
    max_batch_size: int = 4096
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    runners: int = 1  # runner threads per graph
    run_slots: int = 0  # session runs at once across the server; 0 = unbounded
    inline_budget_us: float = 0.0  # cheapest merged runs happen on the event loop (see batching)
    inline_gather_us: float = 2000.0  # ... after gathering a busy loop's requests this long at most
    warm_up: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> "RuntimeOptions":
        cache = settings.trt_engine_cache_dir
        return cls(tuple(settings.providers), settings.cuda_device_id,
                   settings.intra_op_threads, settings.inter_op_threads,
                   graph_optimization_level=settings.graph_optimization_level,
                   cpu_mem_arena=settings.cpu_mem_arena, mem_pattern=settings.mem_pattern,
                   cuda_mem_limit=settings.cuda_mem_limit,
                   cuda_arena_extend_strategy=settings.cuda_arena_extend_strategy,
                   cudnn_conv_algo_search=settings.cudnn_conv_algo_search, io_binding=settings.io_binding,
                   trt_fp16=settings.trt_fp16, trt_engine_cache_dir=None if cache is None else str(cache),
                   graph_instances=settings.graph_instances, max_batch_size=settings.chunk_rows,
                   max_queue_delay_ms=settings.max_queue_delay_ms, max_queue_size=settings.max_queue_size,
                   runners=settings.worker_threads, run_slots=settings.worker_threads, warm_up=settings.warm_up,
                   inline_budget_us=settings.inline_budget_us, inline_gather_us=settings.inline_gather_us)


@dataclass
class SessionFactory:
    """Creates sessions with the configured options; remembers providers that failed to start.

    It also carries what every graph's batcher shares: the metrics observer and the server-wide
    run slots.
    """

    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    observer: BatchObserver | None = None
    _failed: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: threading.BoundedSemaphore | None = None

    def __post_init__(self) -> None:
        if self.options.run_slots > 0:
            self._slots = threading.BoundedSemaphore(self.options.run_slots)

    @property
    def slots(self) -> threading.BoundedSemaphore | None:
        return self._slots

    def batch_policy(self, batching: Batching | None, batchable: bool) -> BatchPolicy:
        o = self.options
        max_rows = o.max_batch_size
        delay_ms = o.max_queue_delay_ms
        if batching is not None:
            if batching.max_batch_size:
                max_rows = batching.max_batch_size
            if batching.max_queue_delay_ms is not None:
                delay_ms = batching.max_queue_delay_ms
        return BatchPolicy(max_batch_size=max_rows, max_queue_delay_s=delay_ms / 1000.0,
                           max_queue_size=o.max_queue_size, runners=max(o.runners, o.graph_instances),
                           batchable=batchable, inline_budget_s=o.inline_budget_us / 1e6 if delay_ms == 0 else 0.0,
                           inline_gather_s=o.inline_gather_us / 1e6)

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = OPTIMIZATION_LEVELS[self.options.graph_optimization_level]
        so.enable_cpu_mem_arena = self.options.cpu_mem_arena
        so.enable_mem_pattern = self.options.mem_pattern
        if self.options.intra_op_threads != 1:
            # Spinning pool threads burn the cores the other workers' sessions need.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3  # errors only; we report the provider outcome ourselves
        return so

    def requested_providers(self) -> list[Any]:
        with self._lock:
            names = [p for p in self.options.providers if p not in self._failed] or ["CPUExecutionProvider"]
        o = self.options
        providers: list[Any] = []
        for name in names:
            if name == "CUDAExecutionProvider":
                cuda = {"device_id": str(o.cuda_device_id), "arena_extend_strategy": o.cuda_arena_extend_strategy,
                        "cudnn_conv_algo_search": o.cudnn_conv_algo_search}
                if o.cuda_mem_limit:
                    cuda["gpu_mem_limit"] = str(o.cuda_mem_limit)
                providers.append((name, cuda))
            elif name == "TensorrtExecutionProvider":
                trt = {"device_id": str(o.cuda_device_id), "trt_fp16_enable": str(o.trt_fp16)}
                if o.trt_engine_cache_dir:
                    trt.update(trt_engine_cache_enable="True", trt_engine_cache_path=o.trt_engine_cache_dir)
                providers.append((name, trt))
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


def graph_spec_from_onnx(path: Path, factory: SessionFactory) -> GraphSpec:
    """The inputs and outputs of an ONNX file without a manifest (a generic model, as Triton reads them).

    Symbolic or unknown dimensions become -1. Element types outside float32/64, int32/64 and
    uint8 are refused with the tensor named.
    """
    session = ort.InferenceSession(str(path), sess_options=factory.session_options(),
                                   providers=["CPUExecutionProvider"])

    def tensors(items: list[Any], kind: str) -> list[TensorSpec]:
        specs = []
        for item in items:
            dtype = ONNX_DTYPES.get(item.type)
            if dtype is None:
                raise ValueError(f"{kind} {item.name!r} has type {item.type}; genserve serves "
                                 f"{sorted(ONNX_DTYPES)}")
            shape = [d if isinstance(d, int) and d > 0 else -1 for d in (item.shape or [])]
            specs.append(TensorSpec(name=item.name, shape=shape, dtype=dtype))
        return specs

    return GraphSpec(file=path.name, inputs=tensors(session.get_inputs(), "input"),
                     outputs=tensors(session.get_outputs(), "output"))


class GraphSession:
    """A loaded graph: its spec, its sessions (instances), the provider they really run on, its batcher."""

    def __init__(self, name: str, path: Path, spec: GraphSpec, factory: SessionFactory, model: str = "",
                 batching: Batching | None = None):
        self.name = name
        self.model = model
        self.spec = spec
        self.path = path
        self.sessions = [factory.create(path) for _ in range(max(1, factory.options.graph_instances))]
        self.session = self.sessions[0]
        self.provider = self.session.get_providers()[0]
        self._check_signature()
        self._outputs = [t.name for t in spec.outputs]
        self._io_binding = factory.options.io_binding and self.provider in (
            "CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._factory = factory
        self._batching = batching
        # Until warm_up() has probed it: batch only if every input and output has a dynamic batch axis.
        self.batchable = self._declares_batch_axis()
        self.batcher = Batcher(model, name, self._run_instance, factory.batch_policy(batching, self.batchable),
                               factory.observer, factory.slots)

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

    def _declares_batch_axis(self) -> bool:
        tensors = [*self.spec.inputs, *self.spec.outputs]
        return all(t.shape and t.shape[0] == -1 for t in tensors)

    def _feeds(self, rows: int) -> dict[str, np.ndarray]:
        feeds = draw_noise(self.spec.inputs, rows, 0)
        for t in self.spec.data_inputs:
            shape = [rows if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(t.shape)]
            feeds[t.name] = np.zeros(shape, dtype=NUMPY_DTYPES[t.dtype])
        return feeds

    def warm_up(self) -> None:
        """Run every session once on one row, then probe the batch axis and the cost of a row.

        The first run pays onnxruntime's lazy initialisation so the first request does not. If
        the graph declares a batch axis, a run on a few rows must return outputs with that many
        rows, or the graph is served unbatched (each request its own run); the extra time of the
        many-row run over the one-row run, per row, seeds the batcher's cost estimate (the probe
        grows until that extra time is well above the noise, see the loop).
        """
        for instance in range(len(self.sessions)):
            self._run_instance(instance, self._feeds(1))
        if not self.batchable:
            return
        limit = self.batcher.policy.max_batch_size
        rows = min(PROBE_ROWS, limit)
        if rows < 2:
            return
        measured: tuple[int, float] | None = None  # the largest probe that ran: rows, seconds
        try:
            t_one = min(self._timed(self._feeds(1)) for _ in range(3))
            while True:
                feeds = self._feeds(rows)
                self._run_instance(0, feeds)
                times, outputs = zip(*(self._timed_outputs(feeds) for _ in range(3)))
                follows = all(np.ndim(o) >= 1 and len(o) == rows for o in outputs[0])
                if not follows:
                    break
                measured = (rows, min(times))
                # Grow the probe until its rows cost several times a one-row run: on a cheap graph
                # 16 rows cost about what one does, and their difference, noise, made the per-row
                # estimate 2-4 x too small or nothing at all (GMM: 16 rows 0.17 us/row, 256 rows
                # 0.30, 1,024 rows 0.31), which put 1,024-row requests on the event loop.
                grown = min(rows * 4, limit, PROBE_MAX_ROWS)
                if measured[1] >= PROBE_SLOPE_FACTOR * t_one or measured[1] >= PROBE_MAX_SECONDS or grown == rows:
                    break
                rows = grown
        except Exception as exc:  # a graph that declares -1 but cannot take several (or this many) rows
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if measured is None:
                log.info("graph %s of %s does not take %d rows (%s): served unbatched", self.name, self.model,
                         rows, reason)
                follows = False
            else:
                log.info("graph %s of %s failed a warm-up run of %d rows (%s); its cost comes from %d rows",
                         self.name, self.model, rows, reason, measured[0])
        if not follows:
            self.batchable = False
            per_row = overhead = 0.0
        else:
            rows, t_many = measured
            per_row = max((t_many - t_one) / (rows - 1), 1e-9)
            overhead = max(t_one - per_row, 0.0)
        self.batcher = Batcher(self.model, self.name, self._run_instance,
                               self._factory.batch_policy(self._batching, self.batchable), self._factory.observer,
                               self._factory.slots, seconds_per_row=per_row, overhead_s=overhead)

    def _timed(self, feeds: dict[str, np.ndarray]) -> float:
        return self._timed_outputs(feeds)[0]

    def _timed_outputs(self, feeds: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
        started = time.perf_counter()
        outputs = self._run_instance(0, feeds)
        return time.perf_counter() - started, outputs

    def _run_instance(self, instance: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One session run on session ``instance``; outputs in the spec's order."""
        session = self.sessions[instance % len(self.sessions)]
        if self._io_binding:
            try:
                binding = session.io_binding()
                for name, value in feeds.items():
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                for name in self._outputs:
                    binding.bind_output(name, "cpu")
                session.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()
            except Exception as exc:  # pragma: no cover - GPU only
                log.warning("IO binding failed on graph %s of %s (%s): using plain runs", self.name, self.model, exc)
                self._io_binding = False
        return session.run(self._outputs, feeds)

    def run(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None) -> list[np.ndarray]:
        """Blocking: run ``feeds`` through the batcher (merged with concurrent requests); outputs in order."""
        return self.batcher.run(feeds, ctx)

    async def infer(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None) -> list[np.ndarray]:
        """From the event loop: the same, awaited."""
        return await self.batcher.infer(feeds, ctx)

    def run_chunked(self, feeds: dict[str, np.ndarray], chunk_rows: int,
                    ctx: RunContext | None = None) -> list[np.ndarray]:
        """Run ``feeds`` (all with the same batch axis 0) in runs of at most ``chunk_rows`` rows.

        Graphs here are row-wise independent, so slicing is exact; it bounds per-run memory
        (a kernel density builds an N x n_train matrix). The slices are queued together as one
        request, so the batcher may run them in parallel on several runners (never in one run);
        a passed deadline drops the request's slices that have not started.
        """
        rows = len(next(iter(feeds.values())))
        if rows <= chunk_rows or not self.batchable:
            return self.run(feeds, ctx)
        return self.batcher.submit(feeds, ctx, max_rows=chunk_rows).result()

    def retire(self) -> None:
        """This graph is no longer the served one: let its runner threads end once idle."""
        self.batcher.retire()
