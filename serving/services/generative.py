"""The ``genserve.v1.GenerativeService`` servicer: decode, call ``serving.models``, encode.

It stays thin on purpose: every RPC goes through ``_call``, which does what all of them share —
refuse while loading or draining, refuse a request whose deadline has already passed, run the
work on the bounded executor (never on the event loop: onnxruntime releases the GIL, so the
loop keeps accepting and answering while sessions run), map errors to status codes, record
metrics. A failing request only ever produces its own error status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc

from serving import models
from serving.api import genserve_pb2 as pb
from serving.api import genserve_pb2_grpc as pb_grpc
from serving.metrics import Metrics
from serving.models.errors import DeadlineExceeded, InvalidArgument, NotFound, ServingError
from serving.models.validation import Limits
from serving.repository.loader import LoadedModel, Repository, UnavailableModel
from serving.runtime.context import RunContext
from serving.services.state import ServingState
from serving.services.status import status_of
from serving.services.tensors import decode, encode, wire_dtype

log = logging.getLogger(__name__)

AVAILABLE, UNAVAILABLE = "AVAILABLE", "UNAVAILABLE"
_DIRECTIONS = {pb.DIRECTION_A2B: "a2b", pb.DIRECTION_B2A: "b2a"}


def summary_of(model: LoadedModel) -> pb.ModelSummary:
    return pb.ModelSummary(name=model.name, version=model.version, family=model.manifest.family,
                           state=AVAILABLE, capabilities=model.capabilities)


def unavailable_summary(bad: UnavailableModel) -> pb.ModelSummary:
    return pb.ModelSummary(name=bad.name, version=bad.version, family=bad.family, state=UNAVAILABLE,
                           reason=bad.reason)


def summaries(repository: Repository) -> list[pb.ModelSummary]:
    """Every model folder of the repository, serving or not, sorted by name."""
    return [summary_of(repository.models[name]) if name in repository.models
            else unavailable_summary(repository.unavailable[name]) for name in repository.names]


class GenerativeServicer(pb_grpc.GenerativeServiceServicer):
    def __init__(self, state: ServingState, executor: ThreadPoolExecutor, metrics: Metrics, limits: Limits):
        self.state = state
        self.executor = executor
        self.metrics = metrics
        self.limits = limits

    # ---- shared request handling ---------------------------------------------------------
    async def _call(self, method: str, model_name: str, context: grpc.aio.ServicerContext,
                    work: Callable[[Repository, RunContext], Any], offload: bool = True) -> Any:
        started = time.monotonic()
        code = "OK"
        failure: tuple[grpc.StatusCode, str] | None = None
        ctx = RunContext.with_timeout(model_name, context.time_remaining(), self.metrics)
        self.state.enter()
        try:
            repository = self.state.ready_repository()
            if ctx.deadline is not None and ctx.deadline <= started:
                raise DeadlineExceeded("deadline exceeded before the request was handled")
            if not offload:
                return work(repository, ctx)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, work, repository, ctx)
        except asyncio.CancelledError:
            # The client went away or its deadline passed: stop the worker between chunks.
            ctx.cancelled.set()
            code = "CANCELLED" if ctx.deadline is None or time.monotonic() < ctx.deadline else "DEADLINE_EXCEEDED"
            raise
        except ServingError as exc:
            failure = status_of(exc)
        except Exception as exc:  # a server bug: report it, keep serving
            log.exception("%s on model %r failed", method, model_name)
            failure = status_of(exc)
        finally:
            self.state.leave()
            if failure is not None:
                code = failure[0].name
            self.metrics.request_done(method, model_name, code, time.monotonic() - started)
        await context.abort(*failure)

    # ---- RPCs ----------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return await self._call("ListModels", "", context,
                                lambda repo, ctx: pb.ListModelsResponse(models=summaries(repo)), offload=False)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        ref = request.model

        def work(repo: Repository, ctx: RunContext) -> pb.GetModelResponse:
            broken = repo.unavailable.get(ref.name)
            if broken is not None:  # describe it, with the reason, rather than fail
                if ref.version not in (0, broken.version):
                    raise NotFound(f"model.version: version {ref.version} of {ref.name!r} is not loaded")
                return pb.GetModelResponse(summary=unavailable_summary(broken))
            model = repo.get(ref.name, ref.version)
            spec = model.manifest.input
            return pb.GetModelResponse(summary=summary_of(model), manifest_json=model.manifest.to_json(),
                                       providers=model.providers, input_shape=spec.shape,
                                       input_dtype=wire_dtype(spec.dtype))

        return await self._call("GetModel", ref.name, context, work, offload=False)

    async def ScoreDensity(self, request: pb.ScoreDensityRequest, context) -> pb.ScoreDensityResponse:
        ref = request.model

        def work(repo: Repository, ctx: RunContext) -> pb.ScoreDensityResponse:
            model = repo.get(ref.name, ref.version)
            x = decode(request.x, "x")
            log_prob = models.score(model, x, limits=self.limits, ctx=ctx,
                                    importance_samples=request.importance_samples, seed=request.seed)
            self.metrics.rows_done("ScoreDensity", model.name, len(log_prob))
            return pb.ScoreDensityResponse(log_prob=encode(log_prob), model_version=model.version)

        return await self._call("ScoreDensity", ref.name, context, work)

    async def DetectAnomalies(self, request: pb.DetectAnomaliesRequest, context) -> pb.DetectAnomaliesResponse:
        ref = request.model
        threshold = request.threshold if request.HasField("threshold") else None
        contamination = request.contamination if request.HasField("contamination") else None

        def work(repo: Repository, ctx: RunContext) -> pb.DetectAnomaliesResponse:
            model = repo.get(ref.name, ref.version)
            x = decode(request.x, "x")
            found = models.detect(model, x, threshold=threshold, contamination=contamination,
                                  limits=self.limits, ctx=ctx)
            self.metrics.rows_done("DetectAnomalies", model.name, len(found.score))
            self.metrics.anomalies_detected(model.name, found.score, found.is_anomaly)
            return pb.DetectAnomaliesResponse(score=encode(found.score), threshold=found.threshold,
                                              is_anomaly=encode(found.is_anomaly), model_version=model.version,
                                              threshold_source=found.source)

        return await self._call("DetectAnomalies", ref.name, context, work)

    async def Sample(self, request: pb.SampleRequest, context) -> pb.SampleResponse:
        ref = request.model
        label = request.label if request.HasField("label") else None

        def work(repo: Repository, ctx: RunContext) -> pb.SampleResponse:
            model = repo.get(ref.name, ref.version)
            samples = models.sample(model, request.n, request.seed, label, limits=self.limits, ctx=ctx,
                                    length=request.length)
            self.metrics.rows_done("Sample", model.name, len(samples))
            return pb.SampleResponse(samples=encode(samples), model_version=model.version)

        return await self._call("Sample", ref.name, context, work)

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        ref = request.model

        def work(repo: Repository, ctx: RunContext) -> pb.TranslateResponse:
            model = repo.get(ref.name, ref.version)
            direction = _DIRECTIONS.get(request.direction)
            if direction is None:
                given = request.direction
                name = pb.Direction.Name(given) if given in pb.Direction.values() else str(given)
                raise InvalidArgument(f"direction: expected DIRECTION_A2B or DIRECTION_B2A, got {name}")
            x = decode(request.x, "x")
            y = models.translate(model, x, direction, limits=self.limits, ctx=ctx)
            self.metrics.rows_done("Translate", model.name, len(y))
            return pb.TranslateResponse(y=encode(y), model_version=model.version)

        return await self._call("Translate", ref.name, context, work)
