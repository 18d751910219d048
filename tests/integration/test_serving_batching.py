"""Dynamic batching through the server: merges across both APIs, queue limits, deadlines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from oip_helpers import InferenceServerException, client, code_of, infer_input
from test_serving_lifecycle import sample_value, scrape

G = "grid25-gaussian"


class RunBlocker:
    """Holds the session runs of one graph's batcher until released."""

    def __init__(self, graph):
        self.entered = threading.Event()
        self.release = threading.Event()
        self._original = graph.batcher._run
        graph.batcher._run = self.run

    def run(self, instance, feeds):
        self.entered.set()
        self.release.wait(20)
        return self._original(instance, feeds)


def test_concurrent_requests_from_both_apis_are_merged_and_answered_row_by_row(fresh_server, serving_repo):
    handle = fresh_server(max_queue_delay_ms=150, worker_threads=1).start()
    port = handle.server.port
    x = serving_repo.X_test[:64].astype(np.float32)
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    parts = [x[4 * i:4 * i + 1 + i % 4] for i in range(16)]  # 16 requests of 1-4 rows each
    c = client(port)
    domain = handle.client()
    start = threading.Barrier(16)

    def call(i: int) -> np.ndarray:
        start.wait()
        if i % 4 == 3:
            return domain.score(G, parts[i])
        return c.infer(G, [infer_input("x", parts[i])]).as_numpy("log_prob")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, expected[4 * i:4 * i + 1 + i % 4], rtol=1e-5)
    text = scrape(handle.server.metrics_port)
    runs = sample_value(text, "genserve_batch_requests_count", model=G, graph="score")
    merged = sample_value(text, "genserve_batch_requests_sum", model=G, graph="score")
    rows = sample_value(text, "genserve_batch_rows_sum", model=G, graph="score")
    assert merged == 16 and rows == sum(len(p) for p in parts)
    assert runs < 16, f"16 concurrent requests ran in {runs} session runs: nothing was merged"
    assert sample_value(text, "genserve_queue_duration_seconds_count", model=G, graph="score") == 16
    assert sample_value(text, "genserve_requests_total", method="ModelInfer", model=G, code="OK") == 12
    c.close()


def test_a_full_queue_answers_resource_exhausted(fresh_server, serving_repo):
    handle = fresh_server(max_queue_size=2, worker_threads=1, inline_budget_us=0).start()
    blocker = RunBlocker(handle.server.repository.models[G].graphs["score"])
    c = client(handle.server.port)
    x = serving_repo.X_test[:3].astype(np.float32)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(c.infer, G, [infer_input("x", x)])
        assert blocker.entered.wait(10)
        waiting = [pool.submit(c.infer, G, [infer_input("x", x)]) for _ in range(2)]
        graph = handle.server.repository.models[G].graphs["score"]
        deadline = time.monotonic() + 10
        while graph.batcher.queued_requests < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(InferenceServerException) as info:
            c.infer(G, [infer_input("x", x)])
        assert code_of(info.value) == "RESOURCE_EXHAUSTED" and "max_queue_size 2" in info.value.message()
        blocker.release.set()
        for future in [running, *waiting]:
            assert future.result(10).as_numpy("log_prob").shape == (3,)
    assert c.infer(G, [infer_input("x", x)]).as_numpy("log_prob").shape == (3,)
    c.close()


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(fresh_server, serving_repo):
    handle = fresh_server(worker_threads=1, inline_budget_us=0).start()
    blocker = RunBlocker(handle.server.repository.models[G].graphs["score"])
    c = client(handle.server.port)
    x = serving_repo.X_test[:3].astype(np.float32)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(c.infer, G, [infer_input("x", x)])
        assert blocker.entered.wait(10)
        with pytest.raises(InferenceServerException) as info:
            c.infer(G, [infer_input("x", np.zeros((7, 2), np.float32))], client_timeout=0.3)
        assert code_of(info.value) == "DEADLINE_EXCEEDED"
        blocker.release.set()
        assert running.result(10).as_numpy("log_prob").shape == (3,)
    time.sleep(0.1)
    stats = c.get_inference_statistics(G).model_stats[0]
    assert stats.inference_count == 3  # the 7 expired rows were dropped, not computed
    assert c.infer(G, [infer_input("x", x)]).as_numpy("log_prob").shape == (3,)
    c.close()
