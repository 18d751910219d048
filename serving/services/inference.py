"""The Open Inference Protocol v2 servicer (``inference.GRPCInferenceService``), Triton's flavour.

It shares everything below the servicer with the domain API: the repository snapshot, the
graphs' sessions and batchers, the limits, the metrics. ModelInfer never leaves the event loop
except for the session run itself, which the graph's batcher performs on its own threads and
merges with concurrent requests (from either API).

How a genserve model appears (one OIP model per graph, as a Triton user expects: fixed inputs
and outputs, the batch axis first as -1):

* ``NAME`` — the model's main graph: ``score`` when it has one (a density model: input ``x``
  [-1, *row shape], output ``log_prob`` FP32 [-1], plus ``is_anomaly`` BOOL [-1] when the
  manifest has an anomaly calibration: -log p above the calibrated threshold, or above the
  request's ``threshold`` / ``contamination`` parameter), otherwise its first graph. A generic
  ONNX model (``model.onnx`` without a manifest) is ``NAME`` with the graph's own signature.
* ``NAME.GRAPH`` — each other graph as exported: ``NAME.sample``, ``NAME.translate_a2b``, ...
  A repository model whose folder really is called ``NAME.GRAPH`` takes precedence.
* Noise inputs (drawn by the server in the domain API) are *optional* inputs here
  (``optional: true`` in ModelConfig): send them to run the graph on your own noise, or leave
  them out and the server draws them from the ``seed`` request parameter (default 0) exactly as
  the domain API does, so ``NAME.sample`` with ``n=100, seed=7`` returns the same samples as
  ``Sample(n=100, seed=7)``. With no input at all, the ``n`` parameter gives the rows.

Tensors: ``raw_input_contents`` or typed ``contents``; the datatype must be the graph's (no
silent casts — the same rule as Triton). Outputs are raw (``raw_output_contents``) when the
request sent raw inputs or sent none, typed otherwise; a requested output's ``binary_data``
parameter overrides. Inputs of manifest models are checked for NaN/Inf like the domain API;
a generic model's are passed on as they are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from serving.api import grpc_service_pb2 as pb
from serving.api import grpc_service_pb2_grpc as pb_grpc
from serving.api import model_config_pb2 as mc
from serving.metrics import Metrics
from serving.models.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServingError, Unavailable
from serving.models.validation import Limits, check_finite, check_sample_count, check_threshold_choice
from serving.repository.loader import LoadedModel, Repository
from serving.repository.noise import draw_noise
from serving.runtime.context import RunContext
from serving.runtime.session import GraphSession
from serving.services.infer_request import parse_infer_request
from serving.services.infer_response import encode_raw_response, serialize_response
from serving.services.reload import ModelManager
from serving.services.state import ServingState
from serving.services.status import status_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy")
ANOMALY_OUTPUT = "is_anomaly"
LITTLE_ENDIAN = sys.byteorder == "little"
CACHE_KEY = "oip-endpoints"

DATATYPE_OF = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
               "bool": "BOOL", "float16": "FP16", "int16": "INT16", "int8": "INT8", "uint16": "UINT16",
               "uint32": "UINT32", "uint64": "UINT64"}
NUMPY_OF = {v: np.dtype(k) for k, v in DATATYPE_OF.items()}
# Wire (little-endian) dtype per datatype, and datatype per NumPy dtype of an output.
WIRE_DTYPE_OF = {v: d.newbyteorder("<") for v, d in NUMPY_OF.items()}
# Either byte order: an output in the non-native one is swapped to the wire's little-endian order.
DATATYPE_OF_DTYPE = {np.dtype(k).newbyteorder(order): v for k, v in DATATYPE_OF.items() for order in "<>"}
CONFIG_TYPE_OF = {"FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64, "INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32,
                  "UINT8": mc.TYPE_UINT8, "BOOL": mc.TYPE_BOOL, "FP16": mc.TYPE_FP16, "INT16": mc.TYPE_INT16,
                  "INT8": mc.TYPE_INT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64}
# Typed contents field per datatype (INT8/16 travel in int_contents, UINT8/16 in uint_contents).
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch axis (-1) first
    optional: bool = False  # a noise input the server draws when it is omitted
    # The non-batch dimensions of the common signature [-1, fixed...] (None otherwise): such an
    # input's shape is checked by one tuple comparison (``_shape_fits``).
    fixed_tail: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tail = self.shape[1:]
        object.__setattr__(self, "fixed_tail", tail if self.shape[:1] == (-1,) and -1 not in tail else None)


@dataclass
class Endpoint:
    """One OIP model: a graph of a loaded model, with the inputs and outputs it shows."""

    name: str
    model: LoadedModel
    graph: GraphSession
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    anomaly: bool  # the extra is_anomaly output of a calibrated score graph
    check_finite: bool

    def __post_init__(self) -> None:
        self.version = str(self.model.version)
        self.by_name = {t.name: t for t in self.inputs}
        self.output_names = [t.name for t in self.outputs]
        self.graph_outputs = [t.name for t in self.graph.spec.outputs]
        self.noise_inputs = [t for t in self.graph.spec.inputs if t.noise is not None]
        self.required = frozenset(t.name for t in self.inputs if not t.optional)


def _primary_graph(model: LoadedModel) -> str:
    return "score" if "score" in model.graphs else next(iter(model.graphs))


def endpoints_of(model: LoadedModel, taken: set[str]) -> list[Endpoint]:
    """The OIP models of one loaded model (see the module docstring for the naming)."""
    found = []
    primary = _primary_graph(model)
    for graph_name, graph in model.graphs.items():
        name = model.name if graph_name == primary else f"{model.name}.{graph_name}"
        if name != model.name and name in taken:
            continue  # a repository model of that name wins
        spec = graph.spec
        inputs = [TensorInfo(t.name, DATATYPE_OF[t.dtype], tuple(t.shape), t.noise is not None) for t in spec.inputs]
        outputs = [TensorInfo(t.name, DATATYPE_OF[t.dtype], tuple(t.shape)) for t in spec.outputs]
        anomaly = graph_name == "score" and graph_name == primary and model.manifest.anomaly is not None
        if anomaly:
            outputs.append(TensorInfo(ANOMALY_OUTPUT, "BOOL", (-1,)))
        found.append(Endpoint(name, model, graph, inputs, outputs, anomaly, check_finite=not model.generic))
    return found


def endpoints(repository: Repository) -> dict[str, Endpoint]:
    """All OIP models of a repository snapshot, computed once per snapshot."""
    cached = repository.cache.get(CACHE_KEY)
    if cached is None:
        taken = set(repository.names)
        cached = {e.name: e for model in repository.models.values() for e in endpoints_of(model, taken)}
        repository.cache[CACHE_KEY] = cached
    return cached  # type: ignore[return-value]


def resolve(repository: Repository, name: str, version: str) -> Endpoint:
    """The endpoint ``name`` at ``version`` ('' = the loaded one); NotFound / Unavailable otherwise."""
    if not name:
        raise InvalidArgument("model_name: expected a model name, got an empty string")
    found = endpoints(repository).get(name)
    if found is None:
        base = name if name in repository.unavailable else name.rsplit(".", 1)[0]
        broken = repository.unavailable.get(base)
        if broken is not None:
            raise Unavailable(f"model {base!r} is unavailable: {broken.reason}")
        raise NotFound(f"model_name: unknown model {name!r}; available models: {sorted(endpoints(repository))}")
    if version not in ("", found.version):
        raise NotFound(f"model_version: version {version!r} of {name!r} is not loaded; loaded versions: "
                       f"[{found.version}]")
    return found


def _param(params: Any, key: str) -> Any:
    """The value of an InferParameter map entry, or None."""
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _int_param(params: Any, key: str) -> int | None:
    value = _param(params, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"parameters.{key}: expected an integer (int64_param), got {value!r}")
    return int(value)


def _float_param(params: Any, key: str) -> float | None:
    value = _param(params, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"parameters.{key}: expected a number (double_param), got {value!r}")
    return float(value)


def _shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _shape_fits(shape: tuple[int, ...], info: TensorInfo) -> bool:
    """Whether a request's shape matches the input's (-1 = any size >= 0)."""
    if len(shape) != len(info.shape):
        return False
    if shape[1:] == info.fixed_tail:  # the common [-1, fixed...] signature
        return shape[0] >= 0
    return all(d >= 0 and e in (-1, d) for e, d in zip(info.shape, shape))


def decode_input(tensor: Any, info: TensorInfo, raw: bytes | memoryview | None) -> np.ndarray:
    """One request input as a NumPy array (a read-only view on raw bytes when given)."""
    name = info.name
    if tensor.datatype != info.datatype:
        raise InvalidArgument(f"{name}.datatype: expected {info.datatype}, got {tensor.datatype or 'nothing'}")
    shape = tuple(tensor.shape)
    if not _shape_fits(shape, info):
        raise InvalidArgument(f"{name}.shape: expected {_shape_text(info.shape)} (-1 = any size), got "
                              f"{_shape_text(shape)}")
    dtype = NUMPY_OF[info.datatype]
    count = math.prod(shape)
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(f"{name}: expected {expected} bytes of raw_input_contents for shape "
                                  f"{_shape_text(shape)} {info.datatype}, got {len(raw)}")
        return np.frombuffer(raw, dtype=WIRE_DTYPE_OF[info.datatype]).reshape(shape)
    field = CONTENTS_FIELD.get(info.datatype)
    if field is None:
        raise InvalidArgument(f"{name}: {info.datatype} travels only as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"{name}.contents.{field}: expected {count} values for shape {_shape_text(shape)}, "
                              f"got {len(values)}")
    return np.asarray(values, dtype=dtype).reshape(shape)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState, metrics: Metrics, limits: Limits, manager: ModelManager,
                 server_version: str):
        self.state = state
        self.metrics = metrics
        self.limits = limits
        self.manager = manager
        self.server_version = server_version

    # ---- shared request handling ---------------------------------------------------------
    async def _call(self, method: str, model_name: str, context: grpc.aio.ServicerContext,
                    work: Callable[[Repository, RunContext], Awaitable[Any]], needs_models: bool = True) -> Any:
        started = time.monotonic()
        code = "OK"
        failure: tuple[grpc.StatusCode, str] | None = None
        ctx = RunContext.with_timeout(model_name, context.time_remaining(), self.metrics)
        ctx.sole = self.state.enter()
        try:
            if needs_models:
                repository = self.state.ready_repository()
            else:
                repository = self.state.repository or Repository(self.manager.path)
            if ctx.deadline is not None and ctx.deadline <= started:
                raise DeadlineExceeded("deadline exceeded before the request was handled")
            return await work(repository, ctx)
        except asyncio.CancelledError:
            ctx.cancelled.set()
            code = "CANCELLED" if ctx.deadline is None or time.monotonic() < ctx.deadline else "DEADLINE_EXCEEDED"
            raise
        except ServingError as exc:
            failure = status_of(exc)
        except Exception as exc:  # a server bug or an onnxruntime failure: report it, keep serving
            log.exception("%s on model %r failed", method, model_name)
            failure = status_of(exc)
        finally:
            self.state.leave()
            if failure is not None:
                code = failure[0].name
            self.metrics.request_done(method, self._label(model_name), code, time.monotonic() - started)
        await context.abort(*failure)

    def _label(self, model_name: str) -> str:
        """Metrics label: the repository model an OIP name belongs to (NAME.sample -> NAME)."""
        if not model_name:
            return ""
        repository = self.state.repository
        if (repository is not None and "." in model_name and model_name not in repository.models
                and model_name not in repository.unavailable):
            return model_name.rsplit(".", 1)[0]
        return model_name

    # ---- server --------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        repository = self.state.repository
        return pb.ServerReadyResponse(ready=bool(repository and repository.models and not self.state.draining))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="genserve", version=self.server_version, extensions=list(EXTENSIONS))

    # ---- model metadata ------------------------------------------------------------------
    async def ModelReady(self, request, context):
        repository = self.state.repository
        if repository is None or self.state.draining:
            return pb.ModelReadyResponse(ready=False)
        try:
            resolve(repository, request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.ModelMetadataResponse:
            e = resolve(repository, request.name, request.version)
            T = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=e.name, versions=[e.version], platform=PLATFORM,
                inputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in e.inputs],
                outputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in e.outputs])

        return await self._call("ModelMetadata", request.name, context, work)

    async def ModelConfig(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.ModelConfigResponse:
            return pb.ModelConfigResponse(config=model_config(resolve(repository, request.name, request.version)))

        return await self._call("ModelConfig", request.name, context, work)

    async def ModelStatistics(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.ModelStatisticsResponse:
            if request.name:
                chosen = [resolve(repository, request.name, request.version)]
            else:
                chosen = [endpoints(repository)[k] for k in sorted(endpoints(repository))]
            return pb.ModelStatisticsResponse(model_stats=[statistics_of(e) for e in chosen])

        return await self._call("ModelStatistics", request.name, context, work)

    # ---- repository ----------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.RepositoryIndexResponse:
            models = []
            for name, version, state, reason in self.manager.index():
                names = [name]
                if state == "READY":
                    names = [e.name for e in endpoints_of(repository.models[name], set(repository.names))]
                for oip_name in names:
                    if request.ready and state != "READY":
                        continue
                    models.append(pb.RepositoryIndexResponse.ModelIndex(
                        name=oip_name, version=str(version) if version else "", state=state, reason=reason))
            return pb.RepositoryIndexResponse(models=models)

        return await self._call("RepositoryIndex", "", context, work, needs_models=False)

    async def RepositoryModelLoad(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.RepositoryModelLoadResponse:
            await self.manager.load(self._folder(repository, request.model_name), reason="RepositoryModelLoad")
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", request.model_name, context, work, needs_models=False)

    async def RepositoryModelUnload(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.RepositoryModelUnloadResponse:
            await self.manager.unload(self._folder(repository, request.model_name))
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", request.model_name, context, work, needs_models=False)

    def _folder(self, repository: Repository, name: str) -> str:
        """The repository model an OIP name refers to (NAME.sample -> NAME)."""
        if not name:
            raise InvalidArgument("model_name: expected a model name, got an empty string")
        if name in repository.names or (self.manager.path / name).is_dir():
            return name
        e = endpoints(repository).get(name)
        return e.model.name if e is not None else name

    # ---- inference -----------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        async def work(repository: Repository, ctx: RunContext) -> pb.ModelInferResponse:
            return await self.infer(repository, request, ctx, wire=True)

        return await self._call("ModelInfer", request.model_name, context, work)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> AsyncIterator:
        """Bidirectional stream: each request answered as soon as it is done (``id`` matches them)."""
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request: Any) -> None:
            started = time.monotonic()
            ctx = RunContext.with_timeout(request.model_name, context.time_remaining(), self.metrics)
            code = "OK"
            ctx.sole = self.state.enter()
            try:
                response = await self.infer(self.state.ready_repository(), request, ctx)
                await responses.put(pb.ModelStreamInferResponse(infer_response=response))
            except ServingError as exc:
                code = exc.code
                await responses.put(_stream_error(request, exc.message))
            except Exception as exc:
                log.exception("ModelStreamInfer on model %r failed", request.model_name)
                code = "INTERNAL"
                await responses.put(_stream_error(request, status_of(exc)[1]))
            finally:
                self.state.leave()
                self.metrics.request_done("ModelStreamInfer", self._label(request.model_name), code,
                                          time.monotonic() - started)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
            await responses.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await responses.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def infer(self, repository: Repository, request: Any, ctx: RunContext,
                    wire: bool = False) -> pb.ModelInferResponse | bytes:
        """One ModelInfer request (shared by the unary and the streaming call); ``wire``: raw
        answers as serialized bytes (the unary call's serializer passes them through)."""
        e = resolve(repository, request.model_name, request.model_version)
        ctx.model = e.model.name
        infos = e.by_name
        inputs = request.inputs
        raw = request.raw_input_contents
        if raw and len(raw) != len(inputs):
            raise InvalidArgument(f"raw_input_contents: expected one entry per input ({len(inputs)}), "
                                  f"got {len(raw)}")
        feeds: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(inputs):
            name = tensor.name
            info = infos.get(name)
            if info is None:
                raise InvalidArgument(f"inputs: model {e.name!r} has no input {name!r}; it takes "
                                      f"{[t.name for t in e.inputs]}")
            if name in feeds:
                raise InvalidArgument(f"inputs: {name!r} is given twice")
            feeds[name] = decode_input(tensor, info, raw[i] if raw else None)
        if not e.required <= feeds.keys():
            missing = [t.name for t in e.inputs if t.name not in feeds and not t.optional]
            raise InvalidArgument(f"inputs: model {e.name!r} needs {missing} (given {sorted(feeds)})")
        rows = self._rows(e, feeds, request)
        if e.check_finite:
            for name, array in feeds.items():
                check_finite(array, name)
        absent_noise = [t for t in e.noise_inputs if t.name not in feeds]
        if absent_noise:
            seed = _int_param(request.parameters, "seed") or 0
            if seed < 0:
                raise InvalidArgument(f"parameters.seed: expected an integer >= 0, got {seed}")
            drawn = draw_noise(e.graph.spec.inputs, rows, seed)
            for t in absent_noise:
                feeds[t.name] = drawn[t.name]
        wanted = self._wanted_outputs(e, request)
        threshold = self._threshold(e, request) if ANOMALY_OUTPUT in wanted else None
        outputs = await e.graph.infer(feeds, ctx)
        results: dict[str, np.ndarray] = dict(zip(e.graph_outputs, outputs))
        if threshold is not None:
            log_prob = np.asarray(results[e.graph.spec.outputs[0].name], dtype=np.float32).reshape(-1)
            score = -log_prob
            flags = ~(score <= threshold)
            results[ANOMALY_OUTPUT] = flags
            self.metrics.anomalies_detected(e.model.name, score, flags)
        self.metrics.rows_done("ModelInfer", e.model.name, rows)
        return self._response(e, request, results, wanted, bool(raw) or not inputs, wire)

    def _rows(self, e: Endpoint, feeds: dict[str, np.ndarray], request: Any) -> int:
        infos = e.by_name
        batched = [(name, a) for name, a in feeds.items() if a.ndim and infos[name].shape[:1] == (-1,)]
        if batched:
            rows = int(batched[0][1].shape[0])
            if any(a.shape[0] != rows for _, a in batched):
                sizes = {name: int(a.shape[0]) for name, a in batched}
                raise InvalidArgument(f"inputs: the batch axis (first dimension) must agree across inputs, got {sizes}")
        elif feeds:
            rows = int(next(iter(feeds.values())).shape[0]) if next(iter(feeds.values())).ndim else 1
        else:
            n = _int_param(request.parameters, "n")
            if n is None:
                raise InvalidArgument(f"parameters.n: model {e.name!r} got no input: pass the number of rows as "
                                      f"parameter n (with an optional seed), or send the inputs "
                                      f"{[t.name for t in e.inputs]}")
            out = e.graph.spec.outputs[0]
            check_sample_count(n, [max(d, 1) for d in out.shape[1:]],
                               NUMPY_OF[DATATYPE_OF[out.dtype]].itemsize, self.limits)
            return n
        if rows == 0:
            raise InvalidArgument(f"inputs: empty batch: expected at least one row for model {e.name!r}")
        if rows > self.limits.max_rows:
            raise ResourceExhausted(f"inputs: {rows} rows exceed the limit of {self.limits.max_rows} rows per request "
                                    f"(max_rows_per_request); send them in smaller batches")
        return rows

    @staticmethod
    def _wanted_outputs(e: Endpoint, request: Any) -> list[str]:
        names = e.output_names
        if not request.outputs:
            return names
        wanted = []
        for out in request.outputs:
            if out.name not in names:
                raise InvalidArgument(f"outputs: model {e.name!r} has no output {out.name!r}; it returns {names}")
            wanted.append(out.name)
        return wanted

    @staticmethod
    def _threshold(e: Endpoint, request: Any) -> float:
        threshold = _float_param(request.parameters, "threshold")
        contamination = _float_param(request.parameters, "contamination")
        check_threshold_choice(threshold, contamination)
        calibration = e.model.manifest.anomaly
        if threshold is not None:
            return threshold
        if contamination is not None:
            return calibration.threshold_at(contamination)
        return calibration.threshold

    @staticmethod
    def _response(e: Endpoint, request: Any, results: dict[str, np.ndarray], wanted: list[str],
                  raw_default: bool, wire: bool = False) -> pb.ModelInferResponse | bytes:
        """The answer: a message, or with ``wire`` and raw outputs its serialized bytes (see
        ``serving.services.infer_response``)."""
        raw = raw_default
        for out in request.outputs:
            choice = _param(out.parameters, "binary_data")
            if isinstance(choice, bool):
                raw = choice
                break
        arrays: list[tuple[str, str, np.ndarray]] = []
        for name in wanted:
            array = np.asarray(results[name])
            datatype = DATATYPE_OF_DTYPE.get(array.dtype)
            if datatype is None:
                raise InvalidArgument(f"output {name!r} has dtype {array.dtype.name}, which OIP cannot carry")
            if raw:
                if array.dtype.byteorder not in "=|<" or not LITTLE_ENDIAN:
                    array = array.astype(array.dtype.newbyteorder("<"))
                if not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array)
            elif CONTENTS_FIELD.get(datatype) is None:
                raise InvalidArgument(f"output {name!r} ({datatype}) travels only as raw_output_contents: "
                                      f"set its binary_data parameter")
            arrays.append((name, datatype, array))
        if raw and wire:
            return encode_raw_response(e.name, e.version, request.id, arrays)
        response = pb.ModelInferResponse(model_name=e.name, model_version=e.version, id=request.id)
        for name, datatype, array in arrays:
            tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if raw:
                response.raw_output_contents.append(array.tobytes())
            else:
                getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
        return response


class _HandlerCapture:
    """Stands in for the server while the generated code builds the service's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def inference_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The OIP service's method handlers as the generated code builds them, except ModelInfer's,
    whose requests ``parse_infer_request`` parses (raw tensors of large requests are not copied) and
    whose raw answers arrive encoded already (``serialize_response`` passes bytes through)."""
    capture = _HandlerCapture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=parse_infer_request, response_serializer=serialize_response)
    return handlers


def add_inference_service(servicer: InferenceServicer, server: Any) -> None:
    """Add the OIP service to ``server`` as a generic handler of ``inference_handlers`` (no
    registered methods: ``serving.services.generic_only`` says why)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, inference_handlers(servicer)),))


def _stream_error(request: Any, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id))


def model_config(e: Endpoint) -> mc.ModelConfig:
    """Triton's ModelConfig for an endpoint: what tritonclient and Triton's tools read."""
    graph = e.graph
    policy = graph.batcher.policy
    batching = graph.batchable
    config = mc.ModelConfig(name=e.name, platform=PLATFORM, backend=BACKEND,
                            max_batch_size=policy.max_batch_size if batching else 0,
                            default_model_filename=graph.path.name)
    config.version_policy.latest.num_versions = 1
    for t in e.inputs:
        config.input.add(name=t.name, data_type=CONFIG_TYPE_OF[t.datatype],
                         dims=list(t.shape[1:] if batching else t.shape), optional=t.optional)
    for t in e.outputs:
        config.output.add(name=t.name, data_type=CONFIG_TYPE_OF[t.datatype],
                          dims=list(t.shape[1:] if batching else t.shape))
    if batching:
        config.dynamic_batching.max_queue_delay_microseconds = int(round(policy.max_queue_delay_s * 1e6))
        config.dynamic_batching.default_queue_policy.max_queue_size = policy.max_queue_size
    gpu = graph.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    config.instance_group.add(name=f"{e.name}_0", count=len(graph.sessions),
                              kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
    for key, value in (("genserve.model", e.model.name), ("genserve.graph", graph.name),
                       ("genserve.family", e.model.family), ("genserve.provider", graph.provider),
                       ("genserve.runners", str(policy.runners))):
        config.parameters[key].string_value = value
    return config


def statistics_of(e: Endpoint) -> pb.ModelStatistics:
    """ModelStatistics of an endpoint: its graph's batcher counters (requests from either API)."""
    s = e.graph.batcher.stats.snapshot()
    D = pb.StatisticDuration
    stats = pb.ModelStatistics(name=e.name, version=e.version, last_inference=s["last_inference_ms"],
                               inference_count=s["inference_count"], execution_count=s["execution_count"])
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        count, ns = s[key]
        getattr(stats.inference_stats, key).CopyFrom(D(count=count, ns=ns))
    for size, (runs, input_ns, infer_ns, output_ns) in s["batches"].items():
        stats.batch_stats.add(batch_size=size, compute_input=D(count=runs, ns=input_ns),
                              compute_infer=D(count=runs, ns=infer_ns), compute_output=D(count=runs, ns=output_ns))
    return stats
