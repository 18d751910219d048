"""Servers for the integration tests: a real ``GenServeServer`` on a loopback port.

The server runs on its own event loop in a background thread, exactly as in production (grpc.aio
on uvloop, or asyncio's loop with ``event_loop="asyncio"``, plus an executor), while the tests call
it through the blocking ``GenServeClient`` over real gRPC. Every server binds 127.0.0.1 with port 0
(a free port) and is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from serving.client import GenServeClient
from serving.config import Settings
from serving.server import GenServeServer, event_loop_factory

TEST_LIMITS = dict(max_rows_per_request=20_000, max_sample_count=5_000, chunk_rows=256)


class ServerThread:
    """A GenServeServer on a private event loop thread; ``call`` runs a coroutine there."""

    def __init__(self, repo: Path, **overrides: Any):
        settings = dict(repo=repo, host="127.0.0.1", port=0, metrics_port=0,
                        providers=["CPUExecutionProvider"], worker_threads=2, drain_seconds=5.0, **TEST_LIMITS)
        settings.update(overrides)
        self.settings = Settings(**settings)
        # The loop production would run (uvloop by default), so the tests exercise it.
        self.loop = (event_loop_factory(self.settings.event_loop) or asyncio.new_event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, name="genserve-test-loop", daemon=True)
        self.thread.start()
        self.server = self.call(self._create())
        self._clients: list[GenServeClient] = []

    async def _create(self) -> GenServeServer:
        return GenServeServer(self.settings)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        """Schedule ``coro`` on the server's loop without waiting; returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, load: bool = True) -> "ServerThread":
        self.call(self.server.start(load=load))
        return self

    def client(self, timeout: float = 10.0) -> GenServeClient:
        client = GenServeClient("127.0.0.1", self.server.port, timeout=timeout)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        try:
            self.call(self.server.stop(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="session")
def server(serving_repo) -> Iterator[ServerThread]:
    """One shared server on the session repository (tests must not drain or stop it)."""
    handle = ServerThread(serving_repo.path).start()
    yield handle
    handle.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[GenServeClient]:
    with GenServeClient("127.0.0.1", server.server.port, timeout=10.0) as c:
        yield c


@pytest.fixture
def fresh_server(serving_repo) -> Iterator[Any]:
    """A factory of private servers (for draining, stopping, other settings); all closed after."""
    made: list[ServerThread] = []

    def make(repo: Path | None = None, **overrides: Any) -> ServerThread:
        handle = ServerThread(repo or serving_repo.path, **overrides)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.close()


class GraphBlocker:
    """Holds the first session run of one graph until released: an in-flight request on demand."""

    def __init__(self, graph: Any):
        self.entered = threading.Event()
        self.release = threading.Event()
        self._original = graph.run
        self._used = False
        self._lock = threading.Lock()

    def run(self, feeds: Any, ctx: Any = None) -> Any:
        with self._lock:
            first, self._used = not self._used, True
        if first:
            self.entered.set()
            self.release.wait(20)
        return self._original(feeds, ctx)


@pytest.fixture
def block_graph(monkeypatch) -> Iterator[Any]:
    """``block_graph(server_thread, model, graph)`` -> GraphBlocker; always released at teardown."""
    blockers: list[GraphBlocker] = []

    def make(handle: ServerThread, model: str, graph: str) -> GraphBlocker:
        session = handle.server.repository.models[model].graphs[graph]
        blocker = GraphBlocker(session)
        monkeypatch.setattr(session, "run", blocker.run)
        blockers.append(blocker)
        return blocker

    yield make
    for blocker in blockers:
        blocker.release.set()
