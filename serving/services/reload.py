"""Hot reload: new versions swapped in without dropping a request; load and unload on demand.

The served models are one immutable ``Repository`` snapshot in ``ServingState``. A change builds
the next snapshot and swaps the reference on the event loop, so a request sees one consistent
set of models from start to end:

* **Polling** (``reload_interval_s``, default 5 s; 0 = off): the highest version folder of every
  model is compared with the version last tried. A new model folder, a new version, or a
  removed highest version (a rollback) loads that version; a model folder that disappeared is
  unloaded. Publishing renames a complete folder into place (``repository.layout``), so a poll
  never sees half a version.
* **On demand** through the Open Inference Protocol: ``RepositoryModelLoad`` (re)loads the
  highest version now, ``RepositoryModelUnload`` stops serving the model. An unloaded model stays
  unloaded — polling leaves it alone — until it is loaded again.

Loading (validation, sessions, warm-up) happens on a dedicated thread, one model at a time,
while the old version keeps serving. Then the swap: new requests resolve the new version; the
old version's requests, already queued or running, finish on its batchers, which are retired
(their threads end once idle; the sessions are freed when the last request lets go). If the new
version fails to load, the old one keeps serving and the failure is logged and kept as the
model's ``last_error``; a model that was not serving becomes UNAVAILABLE with the reason.

Every swap updates the per-model health services (``grpc.health.v1``: the model's name is a
service name, SERVING while it serves), the server's own health and the metrics' known models.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable

from serving.metrics import Metrics
from serving.models.errors import FailedPrecondition, NotFound, ServingError
from serving.repository.layout import model_names
from serving.repository.loader import (LoadedModel, Repository, UnavailableModel, latest_versions, load_model,
                                       load_repository)
from serving.runtime.session import SessionFactory
from serving.services.state import ServingState

log = logging.getLogger("genserve.reload")

HealthSetter = Callable[[str, bool], Awaitable[None]]


class ModelManager:
    """Owns loading: the first load, polling, and OIP load/unload; publishes snapshots to ``state``."""

    def __init__(self, path: Path, factory: SessionFactory, state: ServingState, metrics: Metrics,
                 set_health: HealthSetter):
        self.path = Path(path)
        self.factory = factory
        self.state = state
        self.metrics = metrics
        self._set_health = set_health
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genserve-load")
        self._lock = asyncio.Lock()
        self.unloaded: set[str] = set()
        self.tried: dict[str, int] = {}  # model -> version last loaded or attempted
        self.last_error: dict[str, str] = {}
        self._poller: asyncio.Task | None = None
        self.reloads = 0  # successful swaps after the first load

    # ---- the first load -------------------------------------------------------------------
    async def load_all(self) -> Repository:
        loop = asyncio.get_running_loop()
        async with self._lock:
            repository = await loop.run_in_executor(self._executor, load_repository, self.path, self.factory)
            for name in repository.models:
                self.tried[name] = repository.models[name].version
            for name, bad in repository.unavailable.items():
                self.tried[name] = bad.version
            await self._publish(repository, previous=None)
            return repository

    # ---- polling --------------------------------------------------------------------------
    def start_polling(self, interval: float) -> None:
        if interval > 0 and self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever(interval))

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.state.draining:
                return
            try:
                await self.poll_once()
            except Exception:  # a poll must never take the server down
                log.exception("repository poll failed")

    async def poll_once(self) -> list[str]:
        """Apply what changed on disk since the last poll; returns the model names touched."""
        if self.state.repository is None:
            return []
        loop = asyncio.get_running_loop()
        on_disk = await loop.run_in_executor(self._executor, latest_versions, self.path)
        touched = []
        for name, version in sorted(on_disk.items()):
            if name in self.unloaded:
                continue
            if self.tried.get(name) != version:
                touched.append(name)
                try:
                    await self.load(name, reason=f"version {version} found on disk")
                except ServingError:  # logged and kept as last_error; the poll goes on
                    pass
        current = self.state.repository
        for name in current.names:
            if name not in on_disk:
                touched.append(name)
                await self.remove(name, reason="its folder is gone from the repository")
                self.tried.pop(name, None)
        return touched

    # ---- load / unload --------------------------------------------------------------------
    async def load(self, name: str, reason: str = "load requested") -> LoadedModel | UnavailableModel:
        """Load the highest version of ``name`` and swap it in; the old version serves meanwhile."""
        if not (self.path / name).is_dir() or name.startswith("."):
            raise NotFound(f"model_name: no model folder {name!r} in the repository {self.path}; "
                           f"models there: {model_names(self.path)}")
        loop = asyncio.get_running_loop()
        async with self._lock:
            self.unloaded.discard(name)
            result = await loop.run_in_executor(self._executor, load_model, self.path, name, self.factory)
            self.tried[name] = result.version
            current = self.state.repository or Repository(self.path)
            old = current.models.get(name)
            if isinstance(result, UnavailableModel):
                self.last_error[name] = result.reason
                if old is not None:
                    log.error("model %s: version %d failed to load (%s); version %d keeps serving",
                              name, result.version, result.reason, old.version)
                    raise FailedPrecondition(f"model {name!r}: version {result.version} failed to load, version "
                                             f"{old.version} keeps serving: {result.reason}")
                log.warning("model unavailable: %s v%d: %s", name, result.version, result.reason)
                await self._publish(current.with_model(result), previous=current)
                raise FailedPrecondition(f"model {name!r} failed to load: {result.reason}")
            self.last_error.pop(name, None)
            await self._publish(current.with_model(result), previous=current)
            if old is not None:
                self.reloads += 1
                log.info("model %s: version %d replaced version %d (%s; loaded in %.2f s)", name, result.version,
                         old.version, reason, result.load_seconds)
            else:
                log.info("model %s: version %d loaded (%s; %.2f s)", name, result.version, reason,
                         result.load_seconds)
            return result

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` until it is loaded again (polling leaves it alone)."""
        current = self.state.repository
        if current is None or (name not in current.names and not (self.path / name).is_dir()):
            raise NotFound(f"model_name: unknown model {name!r}")
        self.unloaded.add(name)
        await self.remove(name, reason="unload requested")

    async def remove(self, name: str, reason: str) -> None:
        async with self._lock:
            current = self.state.repository
            if current is None or name not in current.names:
                return
            await self._publish(current.without(name), previous=current)
            log.info("model %s unloaded (%s)", name, reason)

    # ---- publishing a snapshot ------------------------------------------------------------
    async def _publish(self, repository: Repository, previous: Repository | None) -> None:
        self.metrics.set_known_models(set(repository.names) | set(previous.names if previous else ()))
        for model in repository.models.values():
            old = previous.models.get(model.name) if previous else None
            if old is not model:
                if old is not None:
                    self.metrics.model_unloaded(old.name, old.version, old.family, old.provider)
                self.metrics.model_loaded(model.name, model.version, model.family, model.provider,
                                          model.load_seconds)
        self.state.repository = repository  # the swap: new requests see the new snapshot
        if previous is not None:
            for name, old in previous.models.items():
                if repository.models.get(name) is not old:
                    if name not in repository.models:
                        self.metrics.model_unloaded(old.name, old.version, old.family, old.provider)
                    old.retire()  # its queued and running requests still finish
        names = set(repository.names) | set(previous.names if previous else ())
        for name in sorted(names):
            await self._set_health(name, name in repository.models)

    def index(self) -> list[tuple[str, int, str, str]]:
        """(name, version, state, reason) of every model folder and every known model, sorted."""
        current = self.state.repository or Repository(self.path)
        rows = {}
        for name in model_names(self.path):
            rows[name] = (name, 0, "UNAVAILABLE",
                          "unloaded" if name in self.unloaded else "not loaded yet (next repository poll)")
        for name, bad in current.unavailable.items():
            rows[name] = (name, bad.version, "UNAVAILABLE", bad.reason)
        for name, model in current.models.items():
            rows[name] = (name, model.version, "READY", "")
        return [rows[k] for k in sorted(rows)]

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
            self._poller = None
        self._executor.shutdown(wait=False, cancel_futures=True)
