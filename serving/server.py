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
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api import genserve_pb2 as pb
from serving.api import genserve_pb2_grpc as pb_grpc
from serving.config import Settings
from serving.metrics import Metrics
from serving.models.validation import Limits
from serving.repository.loader import Repository, load_repository
from serving.runtime.session import RuntimeOptions, SessionFactory
from serving.services.generative import GenerativeServicer
from serving.services.state import ServingState

log = logging.getLogger("genserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerativeService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GenServeServer:
    """One server: gRPC (domain API, health, reflection), its executor, metrics and models."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = ServingState()
        self.metrics = Metrics()
        self.factory = SessionFactory(RuntimeOptions.from_settings(settings))
        self.executor = ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix="genserve-run")
        self.health = health.aio.HealthServicer()
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
        # so_reuseport off: a port already in use must fail loudly, not be shared silently.
        options = [*s.grpc_options(), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        servicer = GenerativeServicer(self.state, self.executor, self.metrics, Limits.from_settings(s))
        pb_grpc.add_GenerativeServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
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
                 "x %d intra-op threads; loading %s", s.host, self.port, s.metrics_address, self.metrics_port,
                 s.providers, s.worker_threads, s.intra_op_threads, s.repo)
        if load:
            await self.load()

    async def load(self) -> Repository:
        """Load the repository off the event loop, publish its metrics, and turn health SERVING."""
        loop = asyncio.get_running_loop()
        repository = await loop.run_in_executor(self.executor, load_repository, self.settings.repo, self.factory)
        self.metrics.set_known_models(repository.names)
        for model in repository.models.values():
            self.metrics.model_loaded(model.name, model.version, model.manifest.family, model.provider,
                                      model.load_seconds)
        self.state.repository = repository
        self._log_models(repository)
        if repository.models and not self.state.draining:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, SERVING)
        elif not repository.models:
            log.error("no model of %s is available: health stays NOT_SERVING", self.settings.repo)
        return repository

    def _log_models(self, repository: Repository) -> None:
        available = ", ".join(f"{m.name} v{m.version} ({m.manifest.family}, {m.provider})"
                              for m in repository.models.values()) or "none"
        log.info("models available: %s", available)
        for bad in repository.unavailable.values():
            log.warning("model unavailable: %s v%d: %s", bad.name, bad.version, bad.reason)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking new work and wait for in-flight requests; True if they all finished."""
        timeout = self.settings.drain_seconds if timeout is None else timeout
        self.state.draining = True
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
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()


async def _serve(settings: Settings) -> int:
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


def serve_forever(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT, drain, stop; return the process exit code."""
    configure_logging(settings)
    return asyncio.run(_serve(settings))
