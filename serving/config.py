"""Server settings: one pydantic-settings model read from ``GENSERVE_*`` variables and CLI flags.

Why one model: the CLI, ``genserve demo``, the tests and a Kubernetes ConfigMap all configure
the server the same way, and a bad value fails at start-up with the field name and what was
expected instead of surfacing as a confusing runtime error. Explicit keyword arguments (the CLI
flags) take precedence over the environment, which takes precedence over the defaults.

Thread defaults, and why. A request runs its graphs on one of ``worker_threads`` executor
threads; each onnxruntime session may use ``intra_op_threads`` threads inside one run. Their
product is the number of CPU threads computing at once, so it should not exceed the cores:
oversubscribed onnxruntime pools spin-wait against each other and throughput drops. The graphs
served here are small (a matrix product, a distance matrix) and requests are many, so
parallelism *across* requests wins: ``intra_op_threads=1`` (no per-session pool at all, which
also matters because every graph of every model owns a session) and ``worker_threads`` = the
number of cores. A deployment serving few large requests (a kernel density on many rows) may
prefer ``worker_threads=1, intra_op_threads=<cores>``. On GPU the CUDA provider does the work
and these matter little.

Since the dynamic batcher (``serving.runtime.batching``), ``worker_threads`` is both the number
of runner threads per graph and the number of session runs at once across the server;
``request_threads`` only decode, validate and wait for their batch (domain API; the Open
Inference Protocol path waits on the event loop and needs none), so there may be many of them.
``chunk_rows`` is the default ``max_batch_size`` of every graph's batcher (a manifest's
``batching`` overrides it per model). ``workers`` > 1 runs that many server processes sharing
the gRPC port (SO_REUSEPORT): one Python event loop tops out near a few thousand requests/s. The
workers then share the cores: ``worker_threads`` defaults to cores / workers in each (at least 1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERRED_PROVIDERS = (CUDA, CPU)
MIB = 1024 * 1024


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (not proof that a GPU is present)."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def nvidia_device_present() -> bool:
    """True when the kernel exposes an NVIDIA device (bare metal, or a container given a GPU)."""
    return os.path.exists("/dev/nvidiactl") or any(os.path.exists(f"/dev/nvidia{i}") for i in range(16))


def default_providers() -> list[str]:
    """CUDA then CPU, keeping those the build offers — CUDA only where a GPU is present.

    onnxruntime-gpu offers CUDA even on a machine without a GPU; asking for it there makes
    onnxruntime print a library-load error at every start before falling back to CPU, which
    alarms users for nothing. An explicit GENSERVE_PROVIDERS still asks for whatever it names, and
    the runtime always reports the provider a session really got (``session.get_providers()``).
    """
    offered = set(available_providers())
    if not nvidia_device_present():
        offered.discard(CUDA)
    return [p for p in PREFERRED_PROVIDERS if p in offered] or [CPU]


SINGLE_RUNNER_INLINE_BUDGET_US = 4000.0


def _cores() -> int:
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Everything the server needs; see the module docstring for the thread defaults."""

    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="forbid", validate_default=True)

    repo: Path = Field(default=Path("model-repo"), description="model repository: <repo>/<name>/<version>/")
    host: str = Field(default="127.0.0.1", min_length=1, description="address the gRPC server binds")
    port: int = Field(default=8500, ge=0, le=65535, description="gRPC port; 0 picks a free port")
    metrics_host: str | None = Field(default=None, description="address of the metrics endpoint; default: host")
    metrics_port: int = Field(default=9100, ge=0, le=65535, description="Prometheus port; 0 picks a free port")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=default_providers,
        description="onnxruntime execution providers in order of preference (comma-separated in the env)")
    cuda_device_id: int = Field(default=0, ge=0, description="GPU used by the CUDA provider")
    intra_op_threads: int = Field(default=1, ge=0, description="threads inside one session run; 0 = onnxruntime's default")
    inter_op_threads: int = Field(default=1, ge=0, description="threads across independent graph nodes; 0 = default")
    worker_threads: int = Field(default_factory=_cores, ge=1,
                                description="session runs at once per server process; default: the cores, "
                                            "shared among the workers")
    max_concurrent_rpcs: int = Field(default=1024, ge=1,
                                     description="RPCs accepted at once; more are refused with RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB, le=2**31 - 1,
                                   description="largest gRPC message sent or received")
    max_rows_per_request: int = Field(default=1_000_000, ge=1, description="rows in one request's tensor")
    max_sample_count: int = Field(default=100_000, ge=1, description="largest n of one Sample request")
    chunk_rows: int = Field(default=4096, ge=1,
                            description="rows per session run; bounds e.g. a kernel density's N x n distance matrix")
    drain_seconds: float = Field(default=20.0, ge=0.0, description="grace for in-flight requests on SIGTERM")
    # ---- dynamic batching, execution, reload, processes (serving engine) ----
    request_threads: int = Field(default=64, ge=1,
                                 description="threads preparing domain-API requests and waiting for their batch")
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0,
                                      description="longest wait for a batch to fill after its oldest request "
                                                  "arrived; 0 = run what is queued as soon as a runner is free")
    max_queue_size: int = Field(default=1024, ge=1,
                                description="requests waiting per graph; more get RESOURCE_EXHAUSTED")
    inline_budget_us: float = Field(default=500.0, ge=0.0, le=10_000.0,
                                    description="a merged batch estimated to run within this many microseconds, "
                                                "of a graph cheap per row, runs on the event loop (no thread "
                                                "hand-over); 0 = always on the runner threads; default 500, or "
                                                f"{SINGLE_RUNNER_INLINE_BUDGET_US:g} with one runner per process")
    inline_gather_us: float = Field(default=2000.0, ge=0.0, le=100_000.0,
                                    description="such a batch waits while the event loop is busy with other work "
                                                "(more requests on their way), at most this many microseconds "
                                                "after its oldest request; an idle loop runs it at once")
    graph_instances: int = Field(default=1, ge=1, description="onnxruntime sessions per graph (e.g. 2 on a GPU)")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="onnxruntime graph optimisation level")
    cpu_mem_arena: bool = Field(default=True, description="onnxruntime CPU memory arena")
    mem_pattern: bool = Field(default=True, description="onnxruntime memory pattern optimisation")
    cuda_mem_limit: int = Field(default=0, ge=0, description="CUDA arena limit in bytes; 0 = no limit")
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        default="kSameAsRequested", description="how the CUDA arena grows")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        default="EXHAUSTIVE", description="cuDNN convolution algorithm search")
    io_binding: bool = Field(default=True, description="IO binding for sessions that run on CUDA or TensorRT")
    trt_fp16: bool = Field(default=False, description="TensorRT provider: allow FP16 kernels")
    trt_engine_cache_dir: Path | None = Field(default=None, description="TensorRT provider: engine cache folder")
    warm_up: bool = Field(default=True, description="run each graph at load so the first request is not slow")
    reload_interval_s: float = Field(default=5.0, ge=0.0,
                                     description="poll the repository for new versions this often; 0 = never")
    switch_interval_ms: float = Field(default=0.0, ge=0.0, le=100.0,
                                      description="Python GIL switch interval for the server process (0 = keep "
                                                  "Python's 5 ms): lower cuts the wait of a ready thread")
    malloc_keep_mb: int = Field(default=64, ge=0, le=1024,
                                description="freed heap memory each server process keeps for the next requests "
                                            "instead of returning it to the kernel (glibc only; 0 = glibc's defaults)")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="the server's event loop: uvloop (auto: when installed) costs less per "
                                    "request than asyncio's own")
    workers: int = Field(default=1, ge=1, le=64,
                         description="server processes sharing the gRPC port (SO_REUSEPORT); metrics port + i each")
    max_connection_age_s: float = Field(
        default=0.0, ge=0.0, le=86_400.0,
        description="ask each client connection to go (HTTP/2 GOAWAY) after this many seconds, so that clients "
                    "reconnect and spread again over the workers and the replicas; 0 = never")
    max_connection_age_grace_s: float = Field(
        default=30.0, ge=0.0, le=3_600.0,
        description="after that GOAWAY, how long the connection's RPCs in flight may still take")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one execution provider, e.g. CPUExecutionProvider")
        offered = available_providers()
        unknown = [p for p in value if p not in offered]
        if unknown:
            raise ValueError(f"{unknown} not offered by this onnxruntime build; expected some of {offered}")
        if len(set(value)) != len(value):
            raise ValueError(f"expected each provider once, got {value}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _share_cores(self) -> "Settings":
        # Each worker process runs its own runners: cores runners in each would put workers x
        # cores session runs on the cores at once (measured, 2 workers on 2 cores, 1,024 rows x 8
        # concurrent: one runner each gave a median +18 % requests/s over two each, 5 paired runs).
        if self.workers > 1 and "worker_threads" not in self.model_fields_set:
            self.worker_threads = max(1, _cores() // self.workers)
        # With one runner the loop and the runner only take turns on one core: the hand-over costs
        # two thread switches and buys no parallelism, so runs up to a few ms stay on the loop
        # (measured, 2 workers on 2 cores, 1,024-row GMM requests, 5 / 3 paired runs: +6 % requests/s
        # at 8 concurrent, +21 % at 1; one-row requests at 64 concurrent unchanged).
        if self.worker_threads == 1 and "inline_budget_us" not in self.model_fields_set:
            self.inline_budget_us = SINGLE_RUNNER_INLINE_BUDGET_US
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> "Settings":
        if self.port and self.port == self.metrics_port and (self.metrics_host or self.host) == self.host:
            raise ValueError(f"port and metrics_port must differ, both are {self.port}")
        return self

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or self.host

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel options shared by the server and the client: message size limits both ways."""
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]

    def server_grpc_options(self) -> list[tuple[str, int]]:
        """The server's channel options: the shared ones, the port sharing, the connection age.

        A client keeps its HTTP/2 connection, and SO_REUSEPORT hashes each connection to one worker
        for good, so a few long-lived clients can all land on one worker (S1's four connections on
        two workers: one of them idle in one round of three) — or, behind a Kubernetes Service, on
        one replica. A maximum connection age makes gRPC send GOAWAY; clients that follow the
        protocol (grpcio, tritonclient, grpc-go) open a new connection, which is hashed afresh,
        and finish the old one's RPCs in flight within the grace. Off by default: a load tool that
        does not reconnect (h2load) stops at the first GOAWAY.
        """
        # so_reuseport off for one process: a port already in use must fail loudly, not be shared
        # silently. Several worker processes share it on purpose.
        options = [*self.grpc_options(), ("grpc.so_reuseport", 1 if self.workers > 1 else 0)]
        if self.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", max(1, round(self.max_connection_age_s * 1000))),
                        ("grpc.max_connection_age_grace_ms", round(self.max_connection_age_grace_s * 1000))]
        return options
