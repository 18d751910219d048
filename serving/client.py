"""A Python client for ``genserve.v1.GenerativeService`` that takes and returns NumPy arrays.

Arrays are sent as they are (float32 or float64; the server casts float64 and rejects other
dtypes with a message), so the server's validation stays the single source of truth. A failed
call raises ``ClientError`` with the gRPC status code name and the server's message.

    with GenServeClient("127.0.0.1", 8500) as client:
        log_p = client.score("grid25-gaussian", x)
        samples = client.sample("grid25-gaussian", n=100, seed=0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import genserve_pb2 as pb
from serving.api import genserve_pb2_grpc as pb_grpc
from serving.models.errors import ServingError
from serving.services.tensors import DTYPE_NAMES, decode, encode

DEFAULT_MESSAGE_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """A call the server refused or that failed: ``code`` is e.g. "INVALID_ARGUMENT"."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class ModelSummary:
    name: str
    version: int
    family: str
    state: str
    reason: str
    capabilities: list[str]


@dataclass
class ModelDetails:
    summary: ModelSummary
    manifest: dict[str, Any]
    providers: dict[str, str]
    input_shape: list[int]
    input_dtype: str


@dataclass
class Detection:
    score: np.ndarray  # float32 [N]
    threshold: float
    is_anomaly: np.ndarray  # bool [N]
    threshold_source: str
    model_version: int = 0


def _tensor(x: np.ndarray) -> pb.Tensor:
    """Encode ``x``; a dtype the wire cannot carry (complex, object, ...) is a local ValueError."""
    try:
        return encode(np.asarray(x))
    except ServingError as exc:
        raise ValueError(f"x: {exc.message}") from None


def _summary(m: pb.ModelSummary) -> ModelSummary:
    return ModelSummary(m.name, m.version, m.family, m.state, m.reason, list(m.capabilities))


class GenServeClient:
    """Blocking client; ``timeout`` (seconds) is the deadline of every call, None for none."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, timeout: float | None = 30.0,
                 max_message_bytes: int = DEFAULT_MESSAGE_BYTES):
        self.target = f"{host}:{port}"
        self.timeout = timeout
        self.channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = pb_grpc.GenerativeServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "GenServeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _invoke(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ClientError(code.name, details or "") from None

    # ---- RPCs ----------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name: "SERVING", "NOT_SERVING", ..."""
        reply = self._invoke(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def list_models(self) -> list[ModelSummary]:
        return [_summary(m) for m in self._invoke(self.stub.ListModels, pb.ListModelsRequest()).models]

    def get_model(self, name: str, version: int = 0) -> ModelDetails:
        reply = self._invoke(self.stub.GetModel, pb.GetModelRequest(model=pb.ModelRef(name=name, version=version)))
        manifest = json.loads(reply.manifest_json) if reply.manifest_json else {}
        return ModelDetails(_summary(reply.summary), manifest, dict(reply.providers), list(reply.input_shape),
                            DTYPE_NAMES.get(reply.input_dtype, ""))

    def score(self, name: str, x: np.ndarray, version: int = 0, timeout: float | None = None,
              importance_samples: int = 0, seed: int = 0) -> np.ndarray:
        """log p(x) per row, float32 [N]; ``importance_samples``/``seed`` for estimated scores (VAE)."""
        request = pb.ScoreDensityRequest(model=pb.ModelRef(name=name, version=version), x=_tensor(x),
                                         importance_samples=importance_samples, seed=seed)
        return decode(self._invoke(self.stub.ScoreDensity, request, timeout).log_prob, "log_prob").copy()

    def detect(self, name: str, x: np.ndarray, threshold: float | None = None,
               contamination: float | None = None, version: int = 0) -> Detection:
        request = pb.DetectAnomaliesRequest(model=pb.ModelRef(name=name, version=version), x=_tensor(x))
        if threshold is not None:
            request.threshold = threshold
        if contamination is not None:
            request.contamination = contamination
        reply = self._invoke(self.stub.DetectAnomalies, request)
        return Detection(decode(reply.score, "score").copy(), reply.threshold,
                         decode(reply.is_anomaly, "is_anomaly").astype(bool), reply.threshold_source,
                         reply.model_version)

    def sample(self, name: str, n: int, seed: int = 0, label: int | None = None, version: int = 0,
               length: int = 0) -> np.ndarray:
        """``n`` samples; ``label`` for class-conditional models, ``length`` for sequence models."""
        request = pb.SampleRequest(model=pb.ModelRef(name=name, version=version), n=n, seed=seed,
                                   length=length)
        if label is not None:
            request.label = label
        return decode(self._invoke(self.stub.Sample, request).samples, "samples").copy()

    def translate(self, name: str, x: np.ndarray, direction: str = "a2b", version: int = 0) -> np.ndarray:
        directions = {"a2b": pb.DIRECTION_A2B, "b2a": pb.DIRECTION_B2A}
        if direction not in directions:
            raise ValueError(f"direction: expected 'a2b' or 'b2a', got {direction!r}")
        request = pb.TranslateRequest(model=pb.ModelRef(name=name, version=version), x=_tensor(x),
                                      direction=directions[direction])
        return decode(self._invoke(self.stub.Translate, request).y, "y").copy()
