"""The warm-up's cost probe: the per-row estimate the batcher starts from is the graph's real slope."""

from __future__ import annotations

from dataclasses import replace

import pytest

from serving.repository.loader import load_repository
from serving.runtime.session import PROBE_ROWS, RuntimeOptions, SessionFactory


@pytest.fixture()
def graph(serving_repo):
    repository = load_repository(serving_repo.path, SessionFactory(RuntimeOptions(("CPUExecutionProvider",))))
    return repository.models[serving_repo.gaussian].graphs["score"]


def simulate(graph, fixed_s: float, per_row_s: float, free_rows: int = 0) -> list[int]:
    """Time the graph's runs as ``fixed + per_row * (rows - free_rows)`` (the real outputs): the
    first rows cost nothing extra, as on real cheap graphs (GMM: 1 row 22 us, 16 rows 25 us, 256
    rows 99 us, 1,024 rows 343 us). Return the rows probed."""
    probed = []

    def timed_outputs(feeds):
        rows = len(next(iter(feeds.values())))
        probed.append(rows)
        return fixed_s + per_row_s * max(rows - free_rows, 0), graph._run_instance(0, feeds)

    graph._timed_outputs = timed_outputs
    return probed


def test_a_cheap_graph_is_probed_with_enough_rows_to_see_its_slope(graph):
    # 20 us + 0.3 us per row beyond the 12th: 16 rows cost 1.06 one-row runs (and 16 rows alone
    # made it 0.08 us per row); the probe grows to 256 rows (93 us >= 4 x 20 us).
    probed = simulate(graph, 20e-6, 0.3e-6, free_rows=12)
    graph.warm_up()
    assert max(probed) == 256 and graph.batchable
    assert graph.batcher.seconds_per_row == pytest.approx(0.3e-6, rel=0.05)
    assert graph.batcher.estimate(1024) == pytest.approx(20e-6 + 1012 * 0.3e-6, rel=0.05)


def test_an_expensive_graph_keeps_the_first_probe(graph):
    probed = simulate(graph, 50e-6, 100e-6)  # a kernel density on many training rows
    graph.warm_up()
    assert max(probed) == PROBE_ROWS
    assert graph.batcher.seconds_per_row == pytest.approx(100e-6, rel=1e-6)


def test_the_probe_stops_at_max_batch_size_its_row_limit_and_its_time_limit(graph):
    graph.batcher.policy = replace(graph.batcher.policy, max_batch_size=64)
    probed = simulate(graph, 20e-6, 1e-9)  # no measurable slope: up to the batch limit, no further
    graph.warm_up()
    assert max(probed) == 64
    probed = simulate(graph, 2e-3, 1e-6)  # 1,024 rows still cost < 4 one-row runs: stop there
    graph.warm_up()
    assert max(probed) == 1024 and graph.batcher.seconds_per_row == pytest.approx(1e-6, rel=1e-6)
    probed = simulate(graph, 4.99e-3, 1e-6)  # 16 rows already take the probe's 5 ms
    graph.warm_up()
    assert max(probed) == PROBE_ROWS


def test_a_larger_probe_that_fails_keeps_what_the_smaller_one_measured(graph):
    simulate(graph, 20e-6, 0.3e-6, free_rows=12)
    timed = graph._timed_outputs

    def out_of_memory_past_64_rows(feeds):
        if len(next(iter(feeds.values()))) > 64:
            raise RuntimeError("Failed to allocate memory")
        return timed(feeds)

    graph._timed_outputs = out_of_memory_past_64_rows
    graph.warm_up()
    assert graph.batchable  # 16 and 64 rows ran and followed the batch axis
    assert graph.batcher.seconds_per_row == pytest.approx(0.3e-6 * 52 / 63, rel=1e-6)
