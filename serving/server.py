"""The gRPC server: bind, load the repository, serve, drain on SIGTERM.

Lifecycle, as Kubernetes sees it:

1. ``start`` binds the port with the health service saying NOT_SERVING, so a readiness probe
   keeps traffic away while models load (``load``, off the event loop).
2. After loading, health says SERVING if at least one model is available. A repository where
   nothing loads stays NOT_SERVING: a pod that can only answer UNAVAILABLE should not get
   traffic (the log says why each model failed).
3. ``drain`` (on SIGTERM/SIGINT in ``serve_forever``): health turns NOT_SERVING, new domain
   RPCs get UNAVAILABLE "server is draining", requests in flight finish — up to
   ``drain_seconds``; a second signal cuts the wait short. ``stop`` then closes the server.

``GenServeServer`` is the async object the tests drive; ``serve_forever`` is the blocking entry
the CLI and ``genserve demo`` call.

One port carries the domain API (``genserve.v1.GenerativeService``), the Open Inference
Protocol (``inference.GRPCInferenceService``, ``serving.services.inference``), health and
reflection. Health has a service name per model (the model's name: SERVING while it serves) as
well as the server's (``""``) and each API's. After the first load the repository is polled for
new versions (``serving.services.reload``). With ``workers`` > 1, ``serve_forever`` starts that
many server processes sharing the port through SO_REUSEPORT (the kernel spreads connections),
each with its own metrics port (``metrics_port + i``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from serving.api import genserve_pb2 as pb
from serving.api import genserve_pb2_grpc as pb_grpc
from serving.api import grpc_service_pb2, model_config_pb2
from serving.config import Settings
from serving.metrics import Metrics
from serving.models.validation import Limits
from serving.repository.loader import Repository
from serving.runtime.memory import keep_freed_memory
from serving.runtime.session import RuntimeOptions, SessionFactory
from serving.services.generative import GenerativeServicer
from serving.services.generic_only import GenericOnly
from serving.services.inference import SERVICE_NAME as OIP_SERVICE_NAME
from serving.services.inference import InferenceServicer, add_inference_service
from serving.services.reload import ModelManager
from serving.services.state import ServingState

log = logging.getLogger("genserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerativeService"].full_name
SERVER_SERVICES = ("", SERVICE_NAME, OIP_SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("genserve")
    except Exception:
        return "0"


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool with every service this server offers, for reflection.

    The OIP messages live in a private pool (protos/generate.py explains why), so reflection gets
    its own pool holding both APIs, health and reflection itself.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (pb, health_pb2, reflection_pb2, model_config_pb2, grpc_service_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class GenServeServer:
    """One server: gRPC (domain API, health, reflection), its executor, metrics and models."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = ServingState()
        self.metrics = Metrics()
        self.factory = SessionFactory(RuntimeOptions.from_settings(settings), observer=self.metrics)
        # Domain-API requests decode, validate and wait for their batch here; sessions run on the
        # graphs' batcher threads.
        self.executor = ThreadPoolExecutor(max_workers=settings.request_threads, thread_name_prefix="genserve-req")
        self.health = health.aio.HealthServicer()
        self.manager = ModelManager(settings.repo, self.factory, self.state, self.metrics, self._set_model_health)
        self._server: grpc.aio.Server | None = None
        self._abort_drain = asyncio.Event()
        self.port = 0
        self.metrics_port = 0

    @property
    def repository(self) -> Repository | None:
        return self.state.repository

    async def start(self, load: bool = True) -> None:
        """Bind and start (health NOT_SERVING), start the metrics endpoint, then load if asked."""
        s = self.settings
        if not s.repo.is_dir():
            raise FileNotFoundError(f"repo: {s.repo} is not a directory (expected <repo>/<model>/<version>/)")
        server = grpc.aio.server(options=s.server_grpc_options(), maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        limits = Limits.from_settings(s)
        servicer = GenerativeServicer(self.state, self.executor, self.metrics, limits)
        services = GenericOnly(server)  # no registered methods: see serving/services/generic_only.py
        self.inference = InferenceServicer(self.state, self.metrics, limits, self.manager, _version())
        add_inference_service(self.inference, services)  # first: the generic handlers are tried in order
        pb_grpc.add_GenerativeServiceServicer_to_server(servicer, services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        for service in SERVER_SERVICES:
            await self.health.set(service, NOT_SERVING)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # enable_server_reflection, for grpc.aio
            reflection.aio.ReflectionServicer(
                (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                pool=reflection_pool()),
            services)
        try:
            self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {s.host}:{s.port}: {exc}") from exc
        if not self.port:
            raise OSError(f"cannot bind gRPC to {s.host}:{s.port} (in use?)")
        await server.start()
        self._server = server
        try:
            self.metrics_port = self.metrics.serve(s.metrics_address, s.metrics_port)
        except OSError as exc:
            await server.stop(0)
            raise OSError(f"cannot bind metrics to {s.metrics_address}:{s.metrics_port}: {exc}") from exc
        log.info("genserve: gRPC on %s:%d, metrics on http://%s:%d/metrics; providers %s; %d worker threads "
                 "x %d intra-op threads; %s event loop; loading %s", s.host, self.port, s.metrics_address,
                 self.metrics_port, s.providers, s.worker_threads, s.intra_op_threads,
                 type(asyncio.get_running_loop()).__module__.split(".")[0], s.repo)
        if load:
            await self.load()

    async def load(self) -> Repository:
        """Load the repository off the event loop, publish its metrics, turn health SERVING, start polling."""
        repository = await self.manager.load_all()
        self._log_models(repository)
        if not repository.models:
            log.error("no model of %s is available: health stays NOT_SERVING", self.settings.repo)
        if not self.state.draining:
            self.manager.start_polling(self.settings.reload_interval_s)
        return repository

    async def _set_model_health(self, name: str, serving: bool) -> None:
        """Called on every snapshot swap: the model's own health, and the server's."""
        if self.state.draining:
            return
        await self.health.set(name, SERVING if serving else NOT_SERVING)
        repository = self.state.repository
        status = SERVING if repository is not None and repository.models else NOT_SERVING
        for service in SERVER_SERVICES:
            await self.health.set(service, status)

    def _log_models(self, repository: Repository) -> None:
        available = ", ".join(f"{m.name} v{m.version} ({m.family}, {m.provider})"
                              for m in repository.models.values()) or "none"
        log.info("models available: %s", available)
        for bad in repository.unavailable.values():
            log.warning("model unavailable: %s v%d: %s", bad.name, bad.version, bad.reason)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking new work and wait for in-flight requests; True if they all finished."""
        timeout = self.settings.drain_seconds if timeout is None else timeout
        self.state.draining = True
        await self.manager.close()  # no more reloads
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        log.info("draining: %d request(s) in flight, waiting up to %.1f s", self.state.in_flight, timeout)
        idle = asyncio.ensure_future(self.state.wait_idle(timeout))
        aborted = asyncio.ensure_future(self._abort_drain.wait())
        await asyncio.wait({idle, aborted}, return_when=asyncio.FIRST_COMPLETED)
        aborted.cancel()
        finished = idle.done() and idle.result()
        idle.cancel()
        if not finished:
            log.warning("drain ended with %d request(s) still in flight", self.state.in_flight)
        return finished

    def abort_drain(self) -> None:
        """Cut a drain short (a second SIGTERM/SIGINT)."""
        self._abort_drain.set()

    async def stop(self, grace: float = 0.0) -> None:
        """Close the server (in-flight RPCs get ``grace`` seconds), the executor and the metrics."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.manager.close()
        repository = self.state.repository
        if repository is not None:
            for model in repository.models.values():
                model.retire()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()


async def _serve(settings: Settings) -> int:
    if settings.switch_interval_ms:
        # The event loop and the batch runners share the GIL; Python's default 5 ms switch interval
        # lets a thread that is ready wait that long, which shows in p99 latency.
        sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
    if keep_freed_memory(settings.malloc_keep_mb << 20):
        log.info("malloc keeps up to %d MiB of freed memory (malloc_keep_mb)", settings.malloc_keep_mb)
    server = GenServeServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        log.info("received %s%s", signal.Signals(signum).name,
                 ": draining" if len(received) == 1 else " again: stopping now")
        if len(received) == 1:
            stop.set()
        else:
            server.abort_drain()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start(load=False)
    except OSError as exc:
        log.error("%s", exc)
        server.executor.shutdown(wait=False)
        server.metrics.close()
        return 2
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("loading the repository failed: %s", loading.exception())
        stopping.cancel()
        await server.stop()
        return 1
    await stopping
    if not loading.done():
        loading.cancel()
    await server.drain()
    await server.stop()
    log.info("stopped")
    return 0


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level_number,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level_number)


def event_loop_factory(choice: str):
    """The loop factory for ``Settings.event_loop``: uvloop's, or None for asyncio's own.

    uvloop runs grpc.aio's callbacks in compiled code: measured on one core at 64 concurrent
    one-row requests, ~15 % more requests/s than asyncio's loop (the batcher gathers on both).
    ``auto`` falls back to asyncio where uvloop is not installed; ``uvloop`` then is an error.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("event_loop: uvloop is not installed (pip install uvloop), "
                               "expected auto or asyncio") from None
        return None
    return uvloop.new_event_loop


def _run(settings: Settings) -> int:
    """Serve on the event loop the settings choose; exit code 2 if that loop is unavailable."""
    try:
        factory = event_loop_factory(settings.event_loop)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(settings))


def _worker(settings_json: str, index: int) -> None:
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings)
    logging.getLogger().name = f"worker-{index}"
    raise SystemExit(_run(settings))


def serve_forever(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT, drain, stop; return the process exit code.

    With ``workers`` > 1: that many processes, each a full server (models, batchers, metrics on
    ``metrics_port + i``) on the shared gRPC port; a signal to this parent is passed on to each.
    Hot reload runs in every worker (each polls the repository); an OIP load/unload reaches only
    the worker whose connection carried it, so with several workers rely on polling.
    """
    configure_logging(settings)
    if settings.workers <= 1:
        return _run(settings)
    if settings.port == 0:
        log.error("--workers %d needs a fixed --port (the workers must share one)", settings.workers)
        return 2
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(settings.workers):
        metrics_port = settings.metrics_port + index if settings.metrics_port else 0
        worker = settings.model_copy(update={"metrics_port": metrics_port})
        process = context.Process(target=_worker, args=(worker.model_dump_json(), index), name=f"genserve-{index}")
        process.start()
        processes.append(process)
    log.info("started %d worker processes on port %d (SO_REUSEPORT): pids %s", settings.workers, settings.port,
             [p.pid for p in processes])

    def forward(signum: int, frame: object) -> None:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for process in processes:
        process.join()
        codes.append(process.exitcode or 0)
    return max(codes)
