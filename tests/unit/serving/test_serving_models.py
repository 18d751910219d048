"""The model operations as plain NumPy functions, without gRPC: results, chunking, validation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving import models
from serving.models.errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                   ResourceExhausted)
from serving.models.validation import Limits
from serving.repository.loader import load_repository
from serving.runtime.context import RunContext
from serving.runtime.session import RuntimeOptions, SessionFactory


@pytest.fixture(scope="module")
def repository(serving_repo):
    return load_repository(serving_repo.path, SessionFactory(RuntimeOptions(("CPUExecutionProvider",))))


@pytest.fixture(scope="module")
def gaussian(repository, serving_repo):
    return repository.models[serving_repo.gaussian]


def test_score_matches_estimator_and_chunking_is_exact(gaussian, serving_repo):
    x = serving_repo.X_test
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    whole = models.score(gaussian, x)
    chunked = models.score(gaussian, x, limits=Limits(chunk_rows=7))
    assert whole.dtype == np.float32 and whole.shape == (len(x),)
    np.testing.assert_allclose(whole, expected, rtol=1e-5)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


def test_chunks_are_observed_and_bounded(gaussian, serving_repo):
    seen = []

    class Observer:
        def queued(self, model, graph, seconds):
            seen.append(("queued", model, graph))

        def ran(self, model, graph, rows, seconds):
            seen.append(("ran", graph, rows))

    ctx = RunContext(model=gaussian.name, observer=Observer())
    models.score(gaussian, serving_repo.X_test[:25], limits=Limits(chunk_rows=10), ctx=ctx)
    assert seen == [("queued", gaussian.name, "score"), ("ran", "score", 10), ("ran", "score", 10),
                    ("ran", "score", 5)]


def test_sample_matches_estimator_regardless_of_chunking(gaussian, serving_repo):
    a = models.sample(gaussian, 300, seed=5)
    b = models.sample(gaussian, 300, seed=5, limits=Limits(chunk_rows=16))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, serving_repo.estimator.sample(300, seed=5).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, models.sample(gaussian, 300, seed=6))


def test_detect_threshold_sources(gaussian, serving_repo):
    x = serving_repo.X_test[:100]
    calibrated = models.detect(gaussian, x)
    assert calibrated.source == "calibrated" and calibrated.threshold == gaussian.manifest.anomaly.threshold
    np.testing.assert_array_equal(calibrated.is_anomaly, calibrated.score > calibrated.threshold)
    rate = models.detect(gaussian, x, contamination=0.2)
    assert rate.source == "request-contamination"
    assert rate.threshold == gaussian.manifest.anomaly.threshold_at(0.2)
    fixed = models.detect(gaussian, x, threshold=4.5)
    assert (fixed.source, fixed.threshold) == ("request-threshold", 4.5)


def test_detect_without_calibration_needs_a_threshold(gaussian, serving_repo):
    from dataclasses import replace

    manifest = gaussian.manifest.model_copy(update={"anomaly": None, "capabilities": ["score", "sample"]})
    uncalibrated = replace(gaussian, manifest=manifest)
    with pytest.raises(FailedPrecondition, match="no anomaly calibration.*pass threshold"):
        models.detect(uncalibrated, serving_repo.X_test[:3])
    assert models.detect(uncalibrated, serving_repo.X_test[:3], threshold=0.0).is_anomaly.all()


def test_translate_generic_graphs(repository, serving_repo):
    model = repository.models[serving_repo.translate]
    x = np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(models.translate(model, x, "a2b"), 2 * x + 1)
    np.testing.assert_allclose(models.translate(model, models.translate(model, x, "a2b"), "b2a"), x, atol=1e-6)
    with pytest.raises(InvalidArgument, match="direction: expected one of"):
        models.translate(model, x, "sideways")


@pytest.mark.parametrize("call, error, phrase", [
    (lambda m: models.score(m, np.zeros((2, 2, 1), np.float32)), InvalidArgument, r"x: expected shape \[N, 2\]"),
    (lambda m: models.score(m, np.zeros((2, 2), np.int32)), InvalidArgument, "x.dtype: expected float32 or float64"),
    (lambda m: models.score(m, [[1.0, 2.0]]), InvalidArgument, "expected a NumPy array"),
    (lambda m: models.score(m, np.full((3, 2), np.nan, np.float32)), InvalidArgument, "3 of 3 rows"),
    (lambda m: models.score(m, np.zeros((11, 2), np.float32), limits=Limits(max_rows=10)), ResourceExhausted,
     "11 rows exceed the limit of 10"),
    (lambda m: models.sample(m, 10, limits=Limits(max_sample_count=9)), ResourceExhausted, "max_sample_count"),
    (lambda m: models.sample(m, 10, seed=-3), InvalidArgument, "seed: expected an integer >= 0, got -3"),
    (lambda m: models.detect(m, np.zeros((1, 2), np.float32), contamination=-0.1), InvalidArgument,
     "contamination"),
])
def test_validation_errors(gaussian, call, error, phrase):
    with pytest.raises(error, match=phrase):
        call(gaussian)


def test_float64_is_cast_and_integer_is_rejected(gaussian):
    x = np.array([[0.1, 0.2]])
    np.testing.assert_array_equal(models.score(gaussian, x), models.score(gaussian, x.astype(np.float32)))


def test_passed_deadline_and_cancellation_stop_the_work(gaussian, serving_repo):
    expired = RunContext(model=gaussian.name, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded, match="deadline exceeded"):
        models.score(gaussian, serving_repo.X_test, ctx=expired)
    cancelled = RunContext(model=gaussian.name)
    cancelled.cancelled.set()
    with pytest.raises(Cancelled):
        models.sample(gaussian, 10, ctx=cancelled)
