"""Dynamic batching per graph: concurrent requests merged into one session run, results split back.

Triton's dynamic batcher is the model. Every served graph owns one ``Batcher``; whoever runs the
graph — the domain API's operations (blocking, from a request thread) or the Open Inference
Protocol servicer (``await``, from the event loop) — submits its feeds here and gets its own
rows back. The batcher sits *below* the model operations, so they stay plain functions.

Policy
    * A request is a dict of input arrays sharing the batch axis 0. Requests are merged only when
      every input has the same name, dtype and non-batch shape (a sequence graph's [N, T, D] with
      a different T, or an image of another size, is never merged); the run's outputs are sliced
      back by row offsets. Graphs that do not batch (a generic ONNX graph without a dynamic
      first axis on every input and output, or whose outputs do not follow the batch at warm-up)
      run each request on its own, unsplit.
    * A runner thread takes the oldest waiting request and every compatible waiting request
      behind it, up to ``max_batch_size`` rows — or fewer, once the run's fixed cost (from the
      cost model) is under 5 % of the batch: merging further saves nothing and costs a copy and
      the other runners' parallelism (``merge_limit``). With ``max_queue_delay`` > 0 it first waits up to
      that long after the oldest request arrived for the batch to fill (Triton's
      ``max_queue_delay_microseconds``); with 0 it runs what is there as soon as it is free, so a
      lone request pays no delay and under load batches grow on their own while the previous
      run computes.
    * A request larger than ``max_batch_size`` rows is split into pieces that run separately (and
      in parallel on several runners). When the graph is expensive per row (the cost is learnt
      from warm-up and from every run) and nothing else waits, a large request is also split
      across the free runners, so one 1,024-row kernel density request uses both cores instead
      of one; under load the runners are busy anyway and requests stay whole.
    * At most ``max_queue_size`` requests wait; one more is refused at once with
      RESOURCE_EXHAUSTED (``ResourceExhausted``) rather than queueing without limit.
    * A request whose deadline passed or whose client cancelled while it waited is dropped before
      it runs (DEADLINE_EXCEEDED / CANCELLED); its batch-mates are unaffected.
    * Runs happen on the batcher's own threads (never on the event loop; onnxruntime releases the
      GIL), each holding one of the server-wide run slots (``worker_threads``), so several busy
      graphs do not oversubscribe the cores. Runner ``i`` uses session ``i % instances``.
    * Cheap graphs run on the event loop, deliberately. Handing a request to a runner thread and
      its result back costs two thread switches (and, on a busy machine, two waits in the OS run
      queue) — more than a session run of a few rows of a cheap graph. So when the batcher's cost
      model (overhead + per-row time, measured at warm-up and corrected by every run) says a
      merged batch costs at most ``inline_budget`` (default 500 µs, 4 ms with one runner per process:
      there a hand-over buys no parallelism; a request joins only if it alone
      costs at most a quarter of that) and the graph is cheap per row,
      the requests that reached the batcher are merged and run right there, in one run. The loop
      is then blocked for at most the budget (500 µs is what decoding a large request takes; with
      one runner the core is busy with the run either way); anything costlier (the DESIGN rule:
      never a long run on the loop) goes to the runner threads.
    * A lone request too costly for the loop alone (a 1,024-row GMM request, ~0.5 ms) is shared:
      when it is the only request in the server, nothing else is queued or running here and two
      run slots are free, the loop computes the larger share itself (within the budget) while one
      runner computes the rest. Two runners would cost two wake-ups of sleeping threads (to the
      runner, ~60 µs, and back to the loop, 100-190 µs); sharing costs one, overlapped with the
      loop's own share (measured in the server, 1,024-row GMM requests one at a time: handler p50
      -6 to -10 %). A lone request cheap enough for the loop whose rows amortise the run's fixed
      cost runs at once, without gathering (``_run_now``).
    * That inline run waits while the event loop still has other callbacks ready, up to
      ``inline_gather`` (default 2 ms) after its oldest request arrived: gRPC hands the loop one
      request per wake-up, so "the requests of this iteration" is nearly always one, and a loop
      busy with 64 concurrent clients ran 64 one-row runs where one would do (measured on one
      core: 8,160 runs for 8,779 requests, 1,650 requests/s; gathering: ~10 requests per run,
      3,280 requests/s, and a lower p99 at 8 concurrent). An idle loop runs the batch at once, so
      a lone request pays nothing; only a loop that is busy anyway makes its requests wait.
      uvloop does not show its ready queue: there "busy" means a new request reached the batcher
      within the last few loop iterations.
    * Runner threads start on demand and end after being idle; a retired batcher (its model
      version was replaced or unloaded) still serves whatever reaches it, so a request that
      resolved the old version just before a swap completes instead of failing.

Measured, per graph: the time each request waited (``queued``), each run's rows, requests and
compute time (``ran``, ``merged``), and the OIP ModelStatistics counters (``GraphStats``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from serving.models.errors import Cancelled, DeadlineExceeded, ResourceExhausted, ServingError
from serving.runtime.context import RunContext

log = logging.getLogger(__name__)

IDLE_EXIT_SECONDS = 30.0
# Split a request across idle runners only when each piece would compute at least this long:
# below it the hand-over between threads costs more than the parallelism brings. Measured on 2
# cores: a lone 1,024-row GMM request (~0.9 ms of compute) split in two answers ~20 % sooner.
SPLIT_MIN_SECONDS = 0.0003
# One request's rows may cost at most this share of the inline budget for it to be run on the
# event loop, so that several merge into one inline run, and a large request of a cheap graph
# (1,024 GMM rows, ~1 ms under load) goes to the runners, which overlap it with the loop's I/O and
# split it across cores, instead of blocking the loop. The run's fixed cost does not count here:
# the batch pays it once. (Counting it flipped one-row GMM requests to the runners whenever the
# correction rose past ~6 under load: ~1,600 instead of ~3,000 requests/s on one core.)
INLINE_REQUEST_SHARE = 0.25
# A runner's batch stops growing when a run's fixed cost is below this share of it (merge_limit).
MERGE_OVERHEAD_SHARE = 0.05
# On a loop that hides its ready queue (uvloop), an inline batch gathers until this many loop
# iterations in a row brought no new request (_busy). 4 still ran ~6 requests per run at 1 x 64
# on one core; 6 and 10 gathered as asyncio's rule does; a lone request's p50 at 1 x 1 moved by
# < 0.02 ms (an idle iteration costs a few µs).
QUIET_ITERATIONS = 8
# When a lone request is shared between the event loop and a runner (``_share_with_loop``), the
# loop's share is larger by this much compute: the runner starts this much later (measured on 2
# cores: ~60 µs from the queue to its start) and should end first, or the loop waits for a wake-up.
HANDOVER_S = 0.0001
# A lone request runs on the loop at once, without gathering, when the run's fixed cost is at most
# this share of its rows' cost (``Batcher._run_now``): merging it would save little. GMM: ~250 rows.
SOLO_FIXED_SHARE = 1 / 3
# Relative step of the cost model's correction per run (see ``Batcher._learn``).
CORRECTION_STEP = 1.05


class BatchObserver(Protocol):
    def queued(self, model: str, graph: str, seconds: float) -> None: ...

    def ran(self, model: str, graph: str, rows: int, seconds: float) -> None: ...

    def merged(self, model: str, graph: str, requests: int) -> None: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 4096
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    runners: int = 1
    batchable: bool = True
    inline_budget_s: float = 0.0  # 0 = never run on the event loop
    inline_gather_s: float = 0.002  # an inline batch waits this long at most for a busy loop's requests


@dataclass
class GraphStats:
    """Counters behind OIP ModelStatistics (Triton's meaning: counts and total nanoseconds)."""

    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_input: list[int] = field(default_factory=lambda: [0, 0])
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])
    compute_output: list[int] = field(default_factory=lambda: [0, 0])
    inference_count: int = 0  # rows
    execution_count: int = 0  # session runs
    last_inference_ms: int = 0
    # batch size (rows) -> [runs, compute_input ns, compute_infer ns, compute_output ns]
    batches: dict[int, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_run(self, rows: int, ns: tuple[int, int, int], waits_ns: Sequence[int]) -> None:
        """One session run of ``rows`` rows (input, infer, output ns); ``waits_ns``: the queue time of
        each request that started in it (counted once per request, as Triton counts them)."""
        with self.lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            entry = self.batches.setdefault(rows, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += ns[0]
            entry[2] += ns[1]
            entry[3] += ns[2]
            for waited in waits_ns:
                self.queue[0] += 1
                self.queue[1] += max(waited, 0)
                for slot, value in ((self.compute_input, ns[0]), (self.compute_infer, ns[1]),
                                    (self.compute_output, ns[2])):
                    slot[0] += 1
                    slot[1] += value

    def record_success(self, requests: int, total_ns: int) -> None:
        with self.lock:
            self.success[0] += requests
            self.success[1] += total_ns

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"success": tuple(self.success), "fail": tuple(self.fail), "queue": tuple(self.queue),
                    "compute_input": tuple(self.compute_input), "compute_infer": tuple(self.compute_infer),
                    "compute_output": tuple(self.compute_output), "inference_count": self.inference_count,
                    "execution_count": self.execution_count, "last_inference_ms": self.last_inference_ms,
                    "batches": {k: tuple(v) for k, v in sorted(self.batches.items())}}


class _Request:
    __slots__ = ("feeds", "rows", "ctx", "submitted", "untaken", "pending", "parts", "done", "queued_seen",
                 "future", "loop", "afuture", "run_started", "max_rows")

    def __init__(self, feeds: dict[str, np.ndarray], rows: int, ctx: RunContext | None, max_rows: int = 0):
        self.feeds = feeds
        self.rows = rows
        self.ctx = ctx
        self.max_rows = max_rows
        self.submitted = time.monotonic()
        self.untaken = 0  # pieces still in the queue
        self.pending = 0  # pieces not finished
        self.parts: list[list[np.ndarray] | None] = []
        self.done = False
        self.queued_seen = False
        self.run_started = 0.0
        self.future: Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.afuture: asyncio.Future | None = None


class _Piece:
    __slots__ = ("request", "index", "start", "stop", "key")

    def __init__(self, request: _Request, index: int, start: int, stop: int, key: object):
        self.request, self.index, self.start, self.stop, self.key = request, index, start, stop, key

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def feeds(self) -> dict[str, np.ndarray]:
        r = self.request
        if self.start == 0 and self.stop == r.rows:
            return r.feeds
        return {k: v[self.start:self.stop] for k, v in r.feeds.items()}


RunFn = Callable[[int, dict[str, np.ndarray]], list[np.ndarray]]


def _deliver_async(results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():  # the caller was cancelled meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class Batcher:
    """The queue and runner threads of one graph; see the module docstring for the policy.

    ``run(instance, feeds)`` performs one session run on session ``instance`` and returns the
    outputs in order; ``slots`` bounds session runs across the whole server.
    """

    def __init__(self, model: str, graph: str, run: RunFn, policy: BatchPolicy,
                 observer: BatchObserver | None = None, slots: threading.Semaphore | None = None,
                 seconds_per_row: float = 0.0, overhead_s: float = 0.0):
        self.model, self.graph = model, graph
        self.policy = policy
        self.stats = GraphStats()
        self._run = run
        self._observer = observer
        self._slots = slots
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Piece] = deque()
        self._waiting = 0  # requests with a piece still queued
        self._runners = 0
        self._idle = 0
        self._next_runner = 0
        self._retired = False
        # Cost model of one run: overhead + rows * per_row, times a correction learnt from runs.
        self._per_row = seconds_per_row
        self._overhead = overhead_s
        self._correction = 1.0
        self._inline: list[_Request] = []
        self._inline_rows = 0
        self._inline_scheduled = False
        self._inline_seen = self._inline_quiet = 0  # uvloop's gathering (_busy)

    # ---- submitting ------------------------------------------------------------------------
    def _key(self, feeds: dict[str, np.ndarray]) -> object:
        if not self.policy.batchable:
            return object()  # never equal to another request's key: never merged
        if len(feeds) == 1:  # the common case, once per request: no sort, no generator
            ((name, a),) = feeds.items()
            return ((name, a.dtype.str, a.shape[1:]),)
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))

    def _pieces(self, request: _Request, key: object) -> list[_Piece]:
        rows, policy = request.rows, self.policy
        if not policy.batchable or rows <= 1:
            return [_Piece(request, 0, 0, rows, key)]
        size = min(rows, policy.max_batch_size, request.max_rows or rows)
        # Spread an expensive request over the runners that are free when nothing else waits and
        # each share is worth a thread. Under load every runner has work already: splitting would
        # only add hand-overs (measured: -15 % rows/s at 1,024 rows x 8 concurrent requests).
        # (Read without the lock: a stale count only makes the split a little better or worse.)
        free = self._idle + policy.runners - self._runners
        if free > 1 and self._waiting == 0 and self._per_row > 0:
            share = math.ceil(rows / min(free, policy.runners))
            if self.estimate(share) >= SPLIT_MIN_SECONDS:
                size = min(size, share)
        return [_Piece(request, i, start, min(start + size, rows), key)
                for i, start in enumerate(range(0, rows, size))]

    def _enqueue(self, request: _Request) -> None:
        if request.rows < 1:
            raise ValueError("a batch needs at least one row")
        key = self._key(request.feeds)
        pieces = self._pieces(request, key)
        request.untaken = request.pending = len(pieces)
        request.parts = [None] * len(pieces)
        self._queue_pieces(pieces)

    def _queue_pieces(self, pieces: list[_Piece]) -> None:
        """Queue the pieces of one request for the runners, waking idle ones and starting more."""
        with self._cond:
            if self._waiting >= self.policy.max_queue_size:
                raise ResourceExhausted(
                    f"the queue of graph {self.graph!r} of model {self.model!r} is full ({self._waiting} requests "
                    f"waiting, max_queue_size {self.policy.max_queue_size}); retry shortly or add replicas")
            self._waiting += 1
            self._queue.extend(pieces)
            idle = self._idle
            if idle:
                self._cond.notify(min(idle, len(pieces)))
            for _ in range(min(len(pieces) - idle, self.policy.runners - self._runners)):
                self._start_runner()

    def submit(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None, max_rows: int = 0) -> Future:
        """Queue ``feeds``; the Future gives this request's outputs (or raises its error).

        ``max_rows`` > 0 caps the rows of this request's pieces (the operations' chunk size); the
        pieces of one request never share a run.
        """
        request = _Request(feeds, _rows(feeds), ctx, max_rows)
        request.future = Future()
        self._enqueue(request)
        return request.future

    def run(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None) -> list[np.ndarray]:
        """Blocking: queue ``feeds`` and wait for this request's outputs."""
        return self.submit(feeds, ctx).result()

    async def infer(self, feeds: dict[str, np.ndarray], ctx: RunContext | None = None) -> list[np.ndarray]:
        """From the event loop: queue ``feeds`` and await this request's outputs."""
        loop = asyncio.get_running_loop()
        request = _Request(feeds, _rows(feeds), ctx)
        request.loop = loop
        request.afuture = loop.create_future()
        if self._inline_ok(request.rows):
            if (request.ctx is not None and request.ctx.sole and not self._inline
                    and request.rows >= (self._amortising_rows(SOLO_FIXED_SHARE) or 0)):
                self._run_now(request)  # sets the future: the await below returns without a loop turn
            else:
                self._inline.append(request)
                self._inline_rows += request.rows
                if not self._inline_scheduled:
                    self._inline_scheduled = True
                    self._inline_seen = self._inline_quiet = 0
                    loop.call_soon(self._drain_inline, loop)
        elif not self._share_with_loop(request):
            self._enqueue(request)
        return await request.afuture

    # ---- the cost model and the event-loop path ------------------------------------------------
    def estimate(self, rows: int) -> float:
        """Estimated seconds of one run of ``rows`` rows (0 when nothing is known yet)."""
        return self._correction * (self._overhead + self._per_row * rows)

    def _inline_ok(self, rows: int) -> bool:
        budget = self.policy.inline_budget_s
        return (budget > 0 and self.policy.batchable and self._per_row > 0 and rows <= self.policy.max_batch_size
                and self._per_row * 16 <= budget / 2
                and self.seconds_per_row * rows <= budget * INLINE_REQUEST_SHARE)

    def _fits_inline(self, rows: int) -> bool:
        """Whether one inline run may hold ``rows`` rows: within max_batch_size and the budget."""
        return rows <= self.policy.max_batch_size and self.estimate(rows) <= self.policy.inline_budget_s

    def _share_with_loop(self, request: _Request) -> bool:
        """Run a lone request too costly for the event loop alone on the loop *and* a runner.

        When the request is the only one in the server (``ctx.sole``: under load the loop's time
        belongs to reading the next requests), nothing else is queued or running here and two run
        slots are free, the loop computes the first rows itself while one runner computes the rest
        on the other core: the request pays one hand-over, which overlaps the loop's own share,
        instead of two (to a runner and back, each a wake-up of a sleeping thread; measured on 2
        cores for a lone 1,024-row GMM request: 60 µs from the queue to the runner's start,
        100-190 µs from its end to the loop).
        The loop's share is the larger by ``HANDOVER_S`` of compute, so the runner usually ends
        first and the loop answers as soon as its own share is done; the share must fit the inline
        budget, which bounds how long the loop is blocked, as for any inline run.
        """
        policy, rows = self.policy, request.rows
        per_row = self.seconds_per_row
        if (request.ctx is None or not request.ctx.sole or policy.inline_budget_s <= 0 or not policy.batchable
                or policy.runners < 2 or per_row <= 0 or rows < 2 or rows > policy.max_batch_size
                or self._waiting or self._inline or self._idle < self._runners):
            return False
        own = min(rows - 1, max(math.ceil(rows / 2), math.ceil((rows + HANDOVER_S / per_row) / 2)))
        if self.estimate(own) > policy.inline_budget_s:
            return False
        slots = self._slots
        if slots is not None:
            if not slots.acquire(blocking=False):
                return False
            if not slots.acquire(blocking=False):  # the runner's share needs a free slot too
                slots.release()
                return False
            slots.release()  # the runner takes it again in a moment
        try:
            key = self._key(request.feeds)
            mine, theirs = _Piece(request, 0, 0, own, key), _Piece(request, 1, own, rows, key)
            request.untaken, request.pending, request.parts = 1, 2, [None, None]
            self._queue_pieces([theirs])
            self._execute(0, [mine], holding_slot=True, on_loop=True)
        finally:
            if slots is not None:
                slots.release()
        return True

    def _busy(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether more requests may be on their way here: the loop has other callbacks ready.

        asyncio's loops show them (``_ready``). uvloop hides its queue, so there the loop counts
        as busy until ``QUIET_ITERATIONS`` iterations in a row brought no new request (a request
        takes several iterations, gRPC's reads and hand-overs, to get from the socket to here).
        """
        ready = getattr(loop, "_ready", None)
        if ready is not None:
            return bool(ready)
        if len(self._inline) > self._inline_seen:
            self._inline_seen = len(self._inline)
            self._inline_quiet = 0
        else:
            self._inline_quiet += 1
        return self._inline_quiet < QUIET_ITERATIONS

    def _drain_inline(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: merge and run the inline requests.

        While the loop is busy it gathers first, until one more row would no longer fit one run
        (gathering beyond that only delays: the batch is cut into runs of the budget anyway).
        """
        if (self._inline and self._busy(loop) and self._fits_inline(self._inline_rows + 1)
                and time.monotonic() - self._inline[0].submitted < self.policy.inline_gather_s):
            loop.call_soon(self._drain_inline, loop)  # behind what is ready now: its requests join
            return
        self._inline_scheduled = False
        pending, self._inline = self._inline, []
        self._inline_rows = 0
        now = time.monotonic()
        groups: dict[object, list[_Request]] = {}
        for request in pending:
            if self._dropped(request, now):
                continue
            groups.setdefault(self._key(request.feeds), []).append(request)
        for requests in groups.values():
            batch: list[_Request] = []
            rows = 0
            for request in requests:
                if batch and not self._fits_inline(rows + request.rows):
                    self._run_inline(batch)
                    batch, rows = [], 0
                batch.append(request)
                rows += request.rows
            if batch:
                self._run_inline(batch)

    def _run_now(self, request: _Request) -> None:
        """Run a lone request that needs no merging on the event loop at once, within the handler.

        Gathering (``_drain_inline``) waits for requests that could join the batch: a scheduled
        callback, then loop iterations until they bring nothing new (``QUIET_ITERATIONS`` on
        uvloop), then another turn to resume the handler (in-process, a lone 1,024-row GMM request:
        ~90 µs). The caller (``infer``) skips that only for the only request in the server whose
        run's fixed cost is at most ``SOLO_FIXED_SHARE`` of its rows' cost: "only request in flight"
        is no promise that none is coming, as gRPC may have read several whose handlers have not
        started yet, and one-row requests run each alone would pay the fixed cost each instead of
        once per batch; a large request saves little by merging. (With the path toggled every 200
        requests in one ``--workers 2`` server, 1 x 8 one-row handler times did not move.)
        """
        if not self._dropped(request, time.monotonic()):
            self._run_inline([request])

    def _dropped(self, request: _Request, now: float) -> bool:
        """Answer a request whose client has gone or whose deadline has passed with its error."""
        error = _stop_reason(request.ctx, now)
        if error is None:
            return False
        request.done = True
        self._deliver_error(request, error)
        return True

    def _run_inline(self, requests: list[_Request]) -> None:
        if self._slots is not None and not self._slots.acquire(blocking=False):
            for request in requests:  # every run slot is busy: the runner threads take them
                try:
                    self._enqueue(request)
                except ServingError as exc:
                    request.done = True
                    self._deliver_error(request, exc)
            return
        try:
            if len(requests) == 1:  # inline requests come from ``infer``: each has its asyncio future
                self._run_alone(requests[0])
                return
            pieces = []
            for request in requests:
                request.untaken = request.pending = 1
                request.parts = [None]
                pieces.append(_Piece(request, 0, 0, request.rows, None))
            self._execute(0, pieces, holding_slot=True, on_loop=True)
        finally:
            if self._slots is not None:
                self._slots.release()

    def _run_alone(self, request: _Request) -> None:
        """On the event loop, holding a run slot: run one request by itself.

        The commonest inline run (a lone large request; under load, a request nothing merged
        with). ``_execute`` would build a piece, merge, split and deliver per batch: ~50 µs of
        Python in-process, twice that in the server, where caches are cold after the request's
        bytes and the run (measured, 1,024-row GMM requests one at a time: the batcher's share of
        the handler was 134 µs beside a 376-µs run). This records the same statistics and
        metrics, and answers errors the same way, with one run's and one request's bookkeeping.
        """
        rows = request.rows
        started = time.monotonic()
        waited = started - request.submitted
        observers = self._observers((request,))
        for observer in observers:  # before the run, as _execute: a failed run's wait counts too
            observer.queued(self.model, self.graph, waited)
        try:
            computed_start = time.monotonic()
            outputs = self._run(0, request.feeds)
            computed = time.monotonic()
            self._check_outputs(outputs, rows)
            outputs = list(outputs)
        except Exception as exc:
            self._fail([_Piece(request, 0, 0, rows, None)], exc)
            return
        infer_s = computed - computed_start
        self._learn(rows, infer_s)
        self._observe_run(observers, rows, 1, infer_s)
        finished = time.monotonic()
        ns = (int((computed_start - started) * 1e9), int(infer_s * 1e9), int((finished - computed) * 1e9))
        self.stats.record_run(rows, ns, (int(waited * 1e9),))
        request.done = True
        self.stats.record_success(1, int((finished - request.submitted) * 1e9))
        if not request.afuture.done():  # the caller was cancelled meanwhile
            request.afuture.set_result(outputs)

    # ---- lifecycle -------------------------------------------------------------------------
    def retire(self) -> None:
        """Let the runner threads end once the queue is empty (a later submit restarts one)."""
        with self._cond:
            self._retired = True
            self._cond.notify_all()

    @property
    def queued_requests(self) -> int:
        return self._waiting

    @property
    def seconds_per_row(self) -> float:
        return self._per_row * self._correction

    def _start_runner(self) -> None:
        index = self._next_runner
        self._next_runner += 1
        self._runners += 1
        thread = threading.Thread(target=self._runner, args=(index,), daemon=True,
                                  name=f"genserve-batch-{self.model}-{self.graph}-{index}")
        thread.start()

    # ---- the runner ------------------------------------------------------------------------
    def _runner(self, index: int) -> None:
        try:
            while True:
                with self._cond:
                    taken = self._take()
                    if taken is None:
                        self._runners -= 1
                        return
                batch, dropped = taken
                for request, error in dropped:
                    self._deliver_error(request, error)
                if batch:
                    self._execute(index, batch)
        except BaseException:  # pragma: no cover - a bug in the batcher itself
            log.exception("batch runner of %s/%s failed", self.model, self.graph)
            with self._cond:
                self._runners -= 1
            raise

    def _take(self) -> tuple[list[_Piece], list[tuple[_Request, ServingError]]] | None:
        """Under the lock: wait for work and take one batch (None: this runner should exit)."""
        policy = self.policy
        idle_until = time.monotonic() + IDLE_EXIT_SECONDS
        while True:
            if self._queue:
                if policy.max_queue_delay_s > 0 and policy.batchable:
                    head = self._queue[0]
                    ready_at = head.request.submitted + policy.max_queue_delay_s
                    now = time.monotonic()
                    if now < ready_at and self._compatible_rows(head) < self.merge_limit():
                        self._idle += 1
                        self._cond.wait(ready_at - now)
                        self._idle -= 1
                        continue
                break
            if self._retired:
                return None
            remaining = idle_until - time.monotonic()
            if remaining <= 0:
                return None
            self._idle += 1
            self._cond.wait(remaining)
            self._idle -= 1
        return self._form_batch()

    def _compatible_rows(self, head: _Piece) -> int:
        return sum(p.rows for p in self._queue if p.key == head.key)

    def merge_limit(self) -> int:
        """Rows beyond which a runner stops merging requests into its batch.

        ``max_batch_size``, or fewer: once a run's fixed cost is below ``MERGE_OVERHEAD_SHARE`` of
        the batch's estimated cost, merging more saves almost nothing, yet it costs a copy of every
        input and leaves the other runners idle (measured: 1,024-row GMM requests merged four at a
        time ran on one runner while the second waited).
        """
        rows = self._amortising_rows(MERGE_OVERHEAD_SHARE)
        return min(self.policy.max_batch_size, rows) if rows else self.policy.max_batch_size

    def _amortising_rows(self, share: float) -> int | None:
        """Rows from which a run's fixed cost is at most ``share`` of their cost (None: no cost known)."""
        if self._per_row <= 0:
            return None
        return math.ceil(self._overhead / (self._per_row * share))

    def _form_batch(self) -> tuple[list[_Piece], list[tuple[_Request, ServingError]]]:
        limit = self.merge_limit()
        batch: list[_Piece] = []
        dropped: list[tuple[_Request, ServingError]] = []
        keep: deque[_Piece] = deque()
        rows = 0
        key = None
        members: set[int] = set()
        now = time.monotonic()
        for piece in self._queue:
            request = piece.request
            if request.done:  # failed already (another piece was dropped)
                self._taken(request)
                continue
            error = _stop_reason(request.ctx, now)
            if error is not None:
                request.done = True
                self._taken(request)
                dropped.append((request, error))
                continue
            if key is None:
                key = piece.key
            if (piece.key == key and rows + piece.rows <= limit and id(request) not in members) or not batch:
                batch.append(piece)
                rows += piece.rows
                if piece.rows != request.rows:
                    members.add(id(request))  # two pieces of one request run in parallel, not together
                self._taken(request)
            else:
                keep.append(piece)
        self._queue = keep
        if keep and self._idle:
            self._cond.notify()
        return batch, dropped

    def _taken(self, request: _Request) -> None:
        request.untaken -= 1
        if request.untaken == 0:
            self._waiting -= 1

    def _execute(self, index: int, batch: list[_Piece], holding_slot: bool = False, on_loop: bool = False) -> None:
        started = time.monotonic()
        observers = self._observers(p.request for p in batch)
        for piece in batch:
            request = piece.request
            if not request.queued_seen:
                request.queued_seen = True
                request.run_started = started
                for observer in observers:
                    observer.queued(self.model, self.graph, started - request.submitted)
        rows = sum(p.rows for p in batch)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds()
            else:
                parts = [p.feeds() for p in batch]
                feeds = {name: np.concatenate([f[name] for f in parts], axis=0) for name in parts[0]}
            merged = time.monotonic()
            if self._slots is not None and not holding_slot:
                with self._slots:
                    computed_start = time.monotonic()
                    outputs = self._run(index, feeds)
            else:
                computed_start = merged
                outputs = self._run(index, feeds)
            computed = time.monotonic()
            self._check_outputs(outputs, rows)
        except Exception as exc:  # every request of the batch gets the error
            self._fail(batch, exc)
            return
        infer_s = computed - computed_start
        self._learn(rows, infer_s)
        offset = 0
        for piece in batch:
            if self.policy.batchable and len(batch) > 1:
                piece.request.parts[piece.index] = [out[offset:offset + piece.rows] for out in outputs]
            else:
                piece.request.parts[piece.index] = list(outputs)
            offset += piece.rows
        answered: list[_Request] = []  # complete now, and not answered already (dropped, failed)
        with self._cond:  # one lock for the batch, not one per request
            for piece in batch:
                request = piece.request
                request.pending -= 1
                if request.pending == 0 and not request.done:
                    request.done = True
                    answered.append(request)
        split_done = time.monotonic()
        self._record(batch, rows, merged - started, infer_s, split_done - computed, observers)
        async_results: dict[asyncio.AbstractEventLoop, list] = {}
        self._count_success(answered)
        for request in answered:
            parts = request.parts
            if len(parts) == 1:
                result = parts[0]
            else:
                result = [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]
            if request.future is not None:
                request.future.set_result(result)
            elif request.loop is not None:
                async_results.setdefault(request.loop, []).append((request.afuture, result, None))
        for loop, results in async_results.items():
            if on_loop:
                _deliver_async(results)
            else:
                _call_soon(loop, results)

    def _learn(self, rows: int, seconds: float) -> None:
        base = self._overhead + self._per_row * rows
        if base <= 0:
            self._per_row = seconds / max(rows, 1)
            return
        # Track the *median* ratio of measured to modelled time (a step towards each observation):
        # one run descheduled by the OS must not make every later estimate ten times too long.
        # Under load the median itself is several times the warm-up figure (measured on a busy
        # loop: a few-row GMM run takes ~100 µs of CPU against 16 µs at warm-up, caches being
        # cold), and the estimates follow it.
        ratio = seconds / base
        step = CORRECTION_STEP if ratio > self._correction else 1.0 / CORRECTION_STEP
        self._correction = min(max(self._correction * step, 0.1), 10.0)

    def _observers(self, requests: Iterable[_Request]) -> list[Any]:
        """The batcher's observer and those the requests' contexts carry, each once."""
        found: dict[int, Any] = {}
        if self._observer is not None:
            found[id(self._observer)] = self._observer
        for request in requests:
            ctx = request.ctx
            if ctx is not None and ctx.observer is not None:
                found.setdefault(id(ctx.observer), ctx.observer)
        return list(found.values())

    def _check_outputs(self, outputs: list[np.ndarray], rows: int) -> None:
        if self.policy.batchable:
            for out in outputs:
                if np.ndim(out) == 0 or len(out) != rows:
                    raise RuntimeError(f"graph {self.graph!r} returned {np.shape(out)} for a batch of {rows} "
                                       f"rows; its outputs do not follow the batch axis")

    def _record(self, batch: Sequence[_Piece], rows: int, input_s: float, infer_s: float, output_s: float,
                observers: list[Any]) -> None:
        self._observe_run(observers, rows, len({id(p.request) for p in batch}), infer_s)
        self.stats.record_run(rows, (int(input_s * 1e9), int(infer_s * 1e9), int(output_s * 1e9)),
                              [int((p.request.run_started - p.request.submitted) * 1e9)
                               for p in batch if p.index == 0])

    def _observe_run(self, observers: list[Any], rows: int, requests: int, infer_s: float) -> None:
        for observer in observers:
            observer.ran(self.model, self.graph, rows, infer_s)
            merged = getattr(observer, "merged", None)
            if merged is not None:
                merged(self.model, self.graph, requests)

    def _count_success(self, requests: list[_Request]) -> None:
        now = time.monotonic()
        self.stats.record_success(len(requests), int(sum(now - r.submitted for r in requests) * 1e9))

    def _fail(self, batch: Sequence[_Piece], error: Exception) -> None:
        for piece in batch:
            request = piece.request
            with self._cond:
                if request.done:  # answered already (another piece failed first, or it was dropped)
                    continue
                request.done = True
            s = self.stats
            with s.lock:
                s.fail[0] += 1
                s.fail[1] += int((time.monotonic() - request.submitted) * 1e9)
            self._deliver_error(request, error)

    @staticmethod
    def _deliver_error(request: _Request, error: BaseException) -> None:
        if request.future is not None:
            if not request.future.done():
                request.future.set_exception(error)
        elif request.loop is not None:
            _call_soon(request.loop, [(request.afuture, None, error)])


def _call_soon(loop: asyncio.AbstractEventLoop, results: list) -> None:
    try:
        loop.call_soon_threadsafe(_deliver_async, results)
    except RuntimeError:  # the loop closed (server stopped): nobody waits any more
        pass


def _rows(feeds: dict[str, np.ndarray]) -> int:
    if not feeds:
        raise ValueError("a session run needs at least one input")
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if np.ndim(first) else 1


def _stop_reason(ctx: RunContext | None, now: float) -> ServingError | None:
    if ctx is None:
        return None
    if ctx.cancelled.is_set():
        return Cancelled("the client cancelled the request")
    if ctx.deadline is not None and now >= ctx.deadline:
        return DeadlineExceeded("deadline exceeded while the request waited for a batch; "
                                "send fewer rows, use a longer deadline or add replicas")
    return None
