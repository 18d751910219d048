"""The dynamic batcher alone, on a fake session: merging, splitting, limits, errors, deadlines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pytest
import uvloop

from serving.models.errors import DeadlineExceeded, ResourceExhausted
from serving.runtime.batching import Batcher, BatchPolicy
from serving.runtime.context import RunContext


class FakeSession:
    """y = 2x, summed rows; records the rows of every run; can hold runs until released."""

    def __init__(self, hold: bool = False, fail: bool = False):
        self.runs: list[int] = []
        self.shapes: list[tuple] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, instance: int, feeds: dict) -> list:
        x = feeds["x"]
        self.entered.set()
        self.release.wait(10)
        with self.lock:
            self.runs.append(len(x))
            self.shapes.append(x.shape)
        if self.fail:
            raise RuntimeError("onnxruntime exploded")
        return [2 * x, x.reshape(len(x), -1).sum(axis=1)]


class Observer:
    def __init__(self):
        self.merged_requests: list[int] = []
        self.queued_count = 0

    def queued(self, model, graph, seconds):
        self.queued_count += 1

    def ran(self, model, graph, rows, seconds):
        pass

    def merged(self, model, graph, requests):
        self.merged_requests.append(requests)


def _submit_all(batcher: Batcher, arrays: list[np.ndarray]) -> list:
    return [batcher.submit({"x": a}) for a in arrays]


def test_waiting_requests_are_merged_and_each_gets_its_own_rows():
    session = FakeSession(hold=True)
    observer = Observer()
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=100, runners=1), observer)
    first = batcher.submit({"x": np.zeros((1, 3), np.float32)})
    assert session.entered.wait(5)  # the runner holds the first request
    arrays = [np.full((i + 1, 3), i, np.float32) for i in range(6)]
    futures = _submit_all(batcher, arrays)
    session.release.set()
    first.result(5)
    for a, f in zip(arrays, futures):
        y, s = f.result(5)
        np.testing.assert_array_equal(y, 2 * a)
        np.testing.assert_array_equal(s, a.sum(axis=1))
    assert session.runs == [1, 21]  # the six waiting requests ran as one batch of 1+2+...+6 rows
    assert observer.merged_requests == [1, 6] and observer.queued_count == 7
    stats = batcher.stats.snapshot()
    assert stats["execution_count"] == 2 and stats["inference_count"] == 22 and stats["success"][0] == 7


def test_max_batch_size_bounds_merges_and_splits_large_requests():
    session = FakeSession(hold=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=10, runners=1))
    hold = batcher.submit({"x": np.zeros((1, 2), np.float32)})
    assert session.entered.wait(5)
    big = np.arange(50, dtype=np.float32).reshape(25, 2)
    futures = [batcher.submit({"x": big})] + _submit_all(batcher, [np.ones((4, 2), np.float32)] * 3)
    session.release.set()
    hold.result(5)
    np.testing.assert_array_equal(futures[0].result(5)[0], 2 * big)
    for f in futures[1:]:
        np.testing.assert_array_equal(f.result(5)[0], 2 * np.ones((4, 2)))
    assert max(session.runs) <= 10 and sum(session.runs) == 1 + 25 + 12


def test_requests_with_different_row_shapes_are_never_merged():
    session = FakeSession(hold=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=100, runners=1))
    hold = batcher.submit({"x": np.zeros((1, 5, 2), np.float32)})
    assert session.entered.wait(5)
    futures = _submit_all(batcher, [np.ones((2, 5, 2), np.float32), np.ones((2, 7, 2), np.float32),
                                    np.ones((3, 5, 2), np.float32), np.ones((1, 7, 2), np.float64)])
    session.release.set()
    hold.result(5)
    assert [f.result(5)[0].shape for f in futures] == [(2, 5, 2), (2, 7, 2), (3, 5, 2), (1, 7, 2)]
    assert sorted(session.shapes[1:]) == sorted([(5, 5, 2), (2, 7, 2), (1, 7, 2)])


def test_unbatchable_graphs_run_each_request_alone():
    session = FakeSession(hold=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=2, runners=1, batchable=False))
    hold = batcher.submit({"x": np.zeros((3, 2), np.float32)})
    assert session.entered.wait(5)
    futures = _submit_all(batcher, [np.ones((3, 2), np.float32)] * 2)
    session.release.set()
    hold.result(5)
    [f.result(5) for f in futures]
    assert session.runs == [3, 3, 3]  # never merged, never split below its own size


def test_a_full_queue_refuses_with_resource_exhausted():
    session = FakeSession(hold=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=100, max_queue_size=2, runners=1))
    running = batcher.submit({"x": np.zeros((1, 2), np.float32)})
    assert session.entered.wait(5)
    waiting = _submit_all(batcher, [np.zeros((1, 2), np.float32)] * 2)
    with pytest.raises(ResourceExhausted) as info:
        batcher.submit({"x": np.zeros((1, 2), np.float32)})
    assert "queue of graph 'g' of model 'm' is full" in info.value.message
    session.release.set()
    for f in [running, *waiting]:
        f.result(5)
    batcher.submit({"x": np.zeros((1, 2), np.float32)}).result(5)  # room again


def test_expired_requests_are_dropped_before_running_and_others_are_unaffected():
    session = FakeSession(hold=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=100, runners=1))
    running = batcher.submit({"x": np.zeros((1, 2), np.float32)})
    assert session.entered.wait(5)
    expired = batcher.submit({"x": np.zeros((7, 2), np.float32)}, RunContext.with_timeout("m", 0.05))
    fine = batcher.submit({"x": np.ones((2, 2), np.float32)}, RunContext.with_timeout("m", 30))
    time.sleep(0.1)
    session.release.set()
    running.result(5)
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    np.testing.assert_array_equal(fine.result(5)[0], 2 * np.ones((2, 2)))
    assert 7 not in session.runs and sum(session.runs) == 3


def test_a_failed_run_fails_every_request_of_its_batch_only():
    session = FakeSession(fail=True)
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=100, runners=1))
    with pytest.raises(RuntimeError, match="exploded"):
        batcher.run({"x": np.zeros((1, 2), np.float32)})
    session.fail = False
    np.testing.assert_array_equal(batcher.run({"x": np.ones((1, 2), np.float32)})[0], [[2, 2]])
    stats = batcher.stats.snapshot()
    assert stats["fail"][0] == 1 and stats["success"][0] == 1


def test_expensive_requests_are_split_across_runners_and_cheap_ones_are_not():
    session = FakeSession()
    slow = Batcher("m", "g", session, BatchPolicy(max_batch_size=1000, runners=2), seconds_per_row=1e-3)
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    np.testing.assert_array_equal(slow.run({"x": x})[0], 2 * x)
    assert sorted(session.runs) == [50, 50]
    session.runs.clear()
    cheap = Batcher("m", "g", session, BatchPolicy(max_batch_size=1000, runners=2), seconds_per_row=1e-8)
    cheap.run({"x": x})
    assert session.runs == [100]


def test_concurrent_async_and_blocking_callers_all_get_their_rows():
    import asyncio

    session = FakeSession()
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.005, runners=2))
    arrays = [np.full((1 + i % 3, 4), i, np.float32) for i in range(60)]

    async def many():
        return await asyncio.gather(*(batcher.infer({"x": a}) for a in arrays[:30]))

    with ThreadPoolExecutor(8) as pool:
        blocking = list(pool.map(lambda a: batcher.run({"x": a}), arrays[30:]))
    awaited = asyncio.run(many())
    for a, (y, s) in zip(arrays, [*awaited, *blocking]):
        np.testing.assert_array_equal(y, 2 * a)
    assert len(session.runs) < 60  # merged
    batcher.retire()


def test_cheap_batches_run_on_the_event_loop_merged_per_iteration():
    import asyncio

    session = FakeSession()
    threads: list[str] = []

    def run(instance, feeds):
        threads.append(threading.current_thread().name)
        return session(instance, feeds)

    policy = BatchPolicy(max_batch_size=64, runners=2, inline_budget_s=1e-4)
    batcher = Batcher("m", "g", run, policy, seconds_per_row=1e-7, overhead_s=1e-5)
    arrays = [np.full((1, 3), i, np.float32) for i in range(20)]

    async def many():
        return await asyncio.gather(*(batcher.infer({"x": a}) for a in arrays))

    results = asyncio.run(many())
    for a, (y, _) in zip(arrays, results):
        np.testing.assert_array_equal(y, 2 * a)
    assert session.runs == [20] and threads == ["MainThread"]  # one run, on the loop's thread
    expensive = Batcher("m", "g", run, policy, seconds_per_row=1e-3)  # never on the loop
    asyncio.run(expensive.infer({"x": arrays[0]}))
    assert threads[-1].startswith("genserve-batch")


def test_a_request_joins_the_loop_run_by_the_cost_of_its_rows_not_the_fixed_cost():
    """The run's fixed cost is paid once per batch, so a one-row request of a graph whose fixed
    cost alone exceeds a quarter of the inline budget still runs on the loop; a request whose
    rows alone cost more than that goes to the runner threads."""
    import asyncio

    threads: list[str] = []
    session = FakeSession()

    def run(instance, feeds):
        threads.append(threading.current_thread().name)
        return session(instance, feeds)

    policy = BatchPolicy(max_batch_size=2048, runners=2, inline_budget_s=1e-4)
    # fixed cost 40 us > 100 us / 4; rows 0.1 us each
    batcher = Batcher("m", "g", run, policy, seconds_per_row=1e-7, overhead_s=4e-5)
    asyncio.run(batcher.infer({"x": np.ones((1, 3), np.float32)}))
    assert threads == ["MainThread"]
    asyncio.run(batcher.infer({"x": np.ones((1000, 3), np.float32)}))  # its rows alone: 100 us
    assert threads[-1].startswith("genserve-batch")


def _recording(session: FakeSession, seen: list) -> Callable:
    def run(instance, feeds):
        seen.append((threading.current_thread().name, len(feeds["x"])))
        return session(instance, feeds)
    return run


def test_a_lone_request_too_costly_for_the_loop_is_shared_between_the_loop_and_a_runner():
    """The only request in the server, nothing queued or running and two free run slots: the loop
    computes the larger share (by HANDOVER_S of compute, 100 rows here) while one runner computes
    the rest; the caller gets its rows in order. With other requests in flight, or one free slot
    (``--workers 2`` on 2 cores), the loop computes nothing."""
    import asyncio

    seen: list = []
    session = FakeSession()
    policy = BatchPolicy(max_batch_size=4096, runners=2, inline_budget_s=1e-3)
    x = np.arange(3000, dtype=np.float32).reshape(1000, 3)  # 1 ms at 1 us a row: too much for the loop alone
    shared = Batcher("m", "g", _recording(session, seen), policy, slots=threading.BoundedSemaphore(2),
                     seconds_per_row=1e-6)
    y, total = asyncio.run(shared.infer({"x": x}, RunContext(sole=True)))
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(total, x.sum(axis=1))
    assert sorted(seen) == [("MainThread", 550), ("genserve-batch-m-g-0", 450)]
    assert shared.stats.snapshot()["execution_count"] == 2

    seen.clear()  # other requests in flight (RunContext.sole False): the loop reads those instead
    y, _ = asyncio.run(shared.infer({"x": x}, RunContext()))
    np.testing.assert_array_equal(y, 2 * x)
    assert seen and all(name.startswith("genserve-batch") for name, _ in seen)

    seen.clear()
    one_slot = Batcher("m", "g", _recording(session, seen), policy, slots=threading.BoundedSemaphore(1),
                       seconds_per_row=1e-6)
    y, _ = asyncio.run(one_slot.infer({"x": x}, RunContext(sole=True)))
    np.testing.assert_array_equal(y, 2 * x)
    assert seen and all(name.startswith("genserve-batch") for name, _ in seen)


def test_a_shared_request_that_fails_gets_its_error_once():
    import asyncio

    policy = BatchPolicy(max_batch_size=4096, runners=2, inline_budget_s=1e-3)
    batcher = Batcher("m", "g", FakeSession(fail=True), policy, slots=threading.BoundedSemaphore(2),
                      seconds_per_row=1e-6)
    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(batcher.infer({"x": np.ones((1000, 3), np.float32)}, RunContext(sole=True)))
    assert batcher.stats.snapshot()["fail"][0] == 1 and batcher.stats.snapshot()["execution_count"] == 0


def test_a_sole_request_that_needs_no_merging_runs_inline_without_waiting_for_a_loop_turn():
    """The only request in the server whose run's fixed cost is at most a third of its rows' cost
    (7 rows here) runs within the handler: its coroutine completes at the first step, without
    suspending. A smaller sole request, or one with others in flight, gathers first (its coroutine
    suspends until the loop has run the batch): gRPC may have read requests that could join it. A
    sole request whose deadline already passed gets DEADLINE_EXCEEDED without a run."""
    import asyncio

    session = FakeSession()
    policy = BatchPolicy(max_batch_size=128, runners=2, inline_budget_s=1e-3)
    batcher = Batcher("m", "g", session, policy, seconds_per_row=1e-7, overhead_s=2e-7)
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)

    async def first_step(rows: int, ctx: RunContext):
        coro = batcher.infer({"x": x[:rows]}, ctx)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        return None

    async def main():
        y, total = await first_step(64, RunContext(sole=True))
        np.testing.assert_array_equal(y, 2 * x)
        np.testing.assert_array_equal(total, x.sum(axis=1))
        assert session.runs == [64]
        assert await first_step(2, RunContext(sole=True)) is None  # suspended: it gathers
        assert await first_step(64, RunContext()) is None  # others in flight: it gathers
        await asyncio.sleep(0.01)  # the loop runs that batch (its callers have gone)
        assert session.runs == [64, 66]
        expired = RunContext(sole=True)
        expired.deadline = time.monotonic() - 1.0
        with pytest.raises(DeadlineExceeded):
            await batcher.infer({"x": x}, expired)

    asyncio.run(main())
    assert session.runs == [64, 66]  # the expired request never ran


class CountingObserver:
    def __init__(self):
        self.calls: list[tuple] = []

    def queued(self, model, graph, seconds):
        self.calls.append(("queued", model, graph, seconds >= 0))

    def ran(self, model, graph, rows, seconds):
        self.calls.append(("ran", model, graph, rows, seconds > 0))

    def merged(self, model, graph, requests):
        self.calls.append(("merged", model, graph, requests))


def _counters(batcher: Batcher) -> dict:
    """ModelStatistics counts (the nanosecond totals vary run to run; their presence does not)."""
    s = batcher.stats.snapshot()
    return {"counts": {k: s[k][0] for k in ("success", "fail", "queue", "compute_input", "compute_infer",
                                            "compute_output")},
            "infer_ns": s["compute_infer"][1] > 0, "output_ns": s["compute_output"][1] > 0,
            "inference_count": s["inference_count"],
            "execution_count": s["execution_count"], "batches": {k: v[0] for k, v in s["batches"].items()}}


def test_a_lone_inline_run_records_what_the_general_path_records():
    """A request run alone on the loop (``_run_alone``, the sole-request fast path) answers, counts
    and reports exactly as the general batch path (``_execute``, here: a runner thread) does for
    the same request; a failing run or outputs that do not follow the batch fail the same way."""
    import asyncio

    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    policy = BatchPolicy(max_batch_size=128, runners=2, inline_budget_s=1e-3)
    answers, counters, observed = [], [], []
    for inline in (True, False):
        observer = CountingObserver()
        batcher = Batcher("m", "g", FakeSession(), policy if inline else BatchPolicy(max_batch_size=128, runners=2),
                          observer, seconds_per_row=1e-7, overhead_s=2e-7)
        ctx = RunContext(sole=True, observer=observer)  # the same observer twice: reported once
        answers.append(asyncio.run(batcher.infer({"x": x}, ctx)))
        counters.append(_counters(batcher))
        observed.append(observer.calls)
    for a, b in zip(*answers):
        np.testing.assert_array_equal(a, b)
    assert counters[0] == counters[1]
    assert counters[0]["counts"]["success"] == 1 and counters[0]["batches"] == {64: 1}
    assert observed[0] == observed[1] == [("queued", "m", "g", True), ("ran", "m", "g", 64, True),
                                          ("merged", "m", "g", 1)]

    def not_following(instance, feeds):
        return [feeds["x"][:1]]

    errors, fails, failed_observed = [], [], []
    for run in (FakeSession(fail=True), not_following):
        for inline in (True, False):
            observer = CountingObserver()
            batcher = Batcher("m", "g", run, policy if inline else BatchPolicy(max_batch_size=128, runners=2),
                              observer, seconds_per_row=1e-7, overhead_s=2e-7)
            with pytest.raises(RuntimeError) as info:
                asyncio.run(batcher.infer({"x": x}, RunContext(sole=True)))
            errors.append(str(info.value))
            fails.append(_counters(batcher)["counts"]["fail"])
            failed_observed.append(observer.calls)
    assert errors[0] == errors[1] == "onnxruntime exploded"
    assert errors[2] == errors[3] and "do not follow the batch axis" in errors[2]
    assert fails == [1, 1, 1, 1]
    assert all(calls == [("queued", "m", "g", True)] for calls in failed_observed)  # the wait counts, no run


# The server runs on either loop (Settings.event_loop); uvloop hides its ready queue, so the
# batcher's gathering there counts iterations that bring new requests instead.
LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_inline_batch_gathers_requests_while_the_loop_is_busy(loop):
    """Requests reaching the batcher in different loop iterations share one run while the loop has
    other work ready (gRPC delivers one request per wake-up); an idle loop runs a lone request at once."""
    import asyncio

    session = FakeSession()
    policy = BatchPolicy(max_batch_size=64, runners=2, inline_budget_s=1e-3, inline_gather_s=30.0)
    batcher = Batcher("m", "g", session, policy, seconds_per_row=1e-7, overhead_s=1e-5)

    async def late(i: int):
        for _ in range(i):  # arrive i iterations after the first
            await asyncio.sleep(0)
        return await batcher.infer({"x": np.full((1, 3), i, np.float32)})

    async def busy_then_lone():
        results = await asyncio.gather(*(late(i) for i in range(10)))
        started = time.monotonic()
        await batcher.infer({"x": np.ones((1, 3), np.float32)})
        return results, time.monotonic() - started

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        results, lone_seconds = runner.run(busy_then_lone())
    for i, (y, _) in enumerate(results):
        np.testing.assert_array_equal(y, np.full((1, 3), 2 * i, np.float32))
    assert session.runs == [10, 1]  # without the gathering: ten runs of one row
    assert lone_seconds < 5.0  # nothing else ready: no wait for the 30 s gather limit


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_inline_gathering_stops_at_its_time_limit(loop):
    import asyncio

    session = FakeSession()
    policy = BatchPolicy(max_batch_size=64, runners=2, inline_budget_s=1e-3, inline_gather_s=0.0)
    batcher = Batcher("m", "g", session, policy, seconds_per_row=1e-7, overhead_s=1e-5)

    async def late(i: int):
        for _ in range(i):
            await asyncio.sleep(0)
        return await batcher.infer({"x": np.full((1, 3), i, np.float32)})

    async def spread():
        return await asyncio.gather(*(late(i) for i in range(5)))

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(spread())
    assert session.runs == [1, 1, 1, 1, 1]  # gather limit 0: each runs in the iteration it arrived


def test_cost_correction_follows_the_median_not_an_outlier():
    """One run descheduled for 50x its cost must not push the next estimates off by that much."""
    batcher = Batcher("m", "g", FakeSession(), BatchPolicy(), seconds_per_row=1e-6, overhead_s=1e-5)
    for i in range(400):
        batcher._learn(10, 3 * 2e-5 * (50 if i % 10 == 0 else 1))  # typical run: 3x the model
    assert 2.5 < batcher.estimate(10) / 2e-5 < 3.6


def test_runner_stops_merging_once_the_fixed_cost_is_amortised():
    """Two large requests run separately (each on its own runner), small ones still merge."""
    session = FakeSession(hold=True)
    # overhead 16 us, 0.3 us per row: merging beyond ceil(16 / (0.3 * 0.05)) = 1,067 rows saves < 5 %.
    batcher = Batcher("m", "g", session, BatchPolicy(max_batch_size=4096, runners=1),
                      seconds_per_row=3e-7, overhead_s=1.6e-5)
    assert batcher.merge_limit() == 1067
    blocker = batcher.submit({"x": np.zeros((1, 3), np.float32)})
    assert session.entered.wait(5)  # the runner is busy: what follows queues up
    large = [batcher.submit({"x": np.full((1024, 3), i, np.float32)}) for i in range(2)]
    small = [batcher.submit({"x": np.full((64, 3), i, np.float32)}) for i in range(8)]
    session.release.set()
    for i, future in enumerate(large):
        np.testing.assert_array_equal(future.result(5)[0], np.full((1024, 3), 2 * i, np.float32))
    for future in small:
        future.result(5)
    blocker.result(5)
    # Without the limit: [1, 2560], both large requests and the small ones in one run.
    assert session.runs == [1, 1024, 1024, 8 * 64]
    batcher.retire()
