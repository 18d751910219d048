"""Every RPC of genserve.v1.GenerativeService over real gRPC on loopback."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

from serving.repository.manifest import Manifest


def test_list_models_reports_available_and_unavailable(client, serving_repo):
    models = {m.name: m for m in client.list_models()}
    gaussian = models[serving_repo.gaussian]
    assert (gaussian.state, gaussian.version, gaussian.family) == ("AVAILABLE", 2, "gaussian")
    assert set(gaussian.capabilities) == {"score", "anomaly", "sample"}
    assert models[serving_repo.translate].capabilities == ["translate"]
    for name, reason in serving_repo.broken.items():
        assert models[name].state == "UNAVAILABLE", name
        assert reason in models[name].reason, (name, models[name].reason)


def test_get_model_reports_manifest_and_real_provider(client, serving_repo):
    info = client.get_model(serving_repo.gaussian)
    assert info.summary.version == 2
    assert info.input_shape == [2] and info.input_dtype == "float32"
    manifest = Manifest.model_validate(info.manifest)
    assert manifest.name == serving_repo.gaussian and manifest.anomaly is not None
    assert set(info.providers) == {"score", "sample"}
    # The test server asks for CPU only; the provider is what the session really got.
    assert set(info.providers.values()) == {"CPUExecutionProvider"}
    assert all(p in onnxruntime.get_available_providers() for p in info.providers.values())


def test_get_model_pinned_version_and_unavailable_model(client, serving_repo):
    assert client.get_model(serving_repo.gaussian, version=2).summary.version == 2
    broken = client.get_model("broken-json")
    assert broken.summary.state == "UNAVAILABLE" and "JSON" in broken.summary.reason


def test_score_matches_training_estimator(client, serving_repo):
    x = serving_repo.X_test
    served = client.score(serving_repo.gaussian, x)
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    assert served.dtype == np.float32 and served.shape == (len(x),)
    np.testing.assert_allclose(served, expected, rtol=1e-5)


def test_score_accepts_float64_and_large_chunked_batches(client, serving_repo):
    # 5000 rows > the test server's chunk of 256: several session runs, one answer.
    x = np.random.default_rng(3).normal(scale=3.0, size=(5000, 2))
    served = client.score(serving_repo.gaussian, x)
    expected = serving_repo.estimator.log_prob(x.astype(np.float32).astype(np.float64)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5)


def test_detect_calibrated_threshold(client, serving_repo):
    x = np.concatenate([serving_repo.X_test[:50], [[40.0, 40.0], [-30.0, 25.0]]]).astype(np.float32)
    found = client.detect(serving_repo.gaussian, x)
    manifest = client.get_model(serving_repo.gaussian).manifest
    assert found.threshold_source == "calibrated"
    assert found.threshold == pytest.approx(manifest["anomaly"]["threshold"])
    expected = -serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    np.testing.assert_allclose(found.score, expected, rtol=1e-5)
    np.testing.assert_array_equal(found.is_anomaly, found.score > found.threshold)
    assert found.is_anomaly[-2:].all()


def test_detect_threshold_and_contamination_overrides(client, serving_repo):
    x = serving_repo.X_test[:200]
    high = client.detect(serving_repo.gaussian, x, threshold=1e6)
    assert high.threshold_source == "request-threshold" and high.threshold == 1e6 and not high.is_anomaly.any()
    low = client.detect(serving_repo.gaussian, x, threshold=-1e6)
    assert low.is_anomaly.all()
    manifest = Manifest.model_validate(client.get_model(serving_repo.gaussian).manifest)
    half = client.detect(serving_repo.gaussian, x, contamination=0.5)
    assert half.threshold_source == "request-contamination"
    assert half.threshold == pytest.approx(manifest.anomaly.threshold_at(0.5))
    # Half the held-out rows score above the median threshold; the test rows are alike.
    assert 0.3 < half.is_anomaly.mean() < 0.7


def test_detect_zero_density_rows_are_anomalies(client, serving_repo):
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    log_p = client.score(serving_repo.support, x)
    assert log_p[0] == 0.0 and np.isneginf(log_p[1:]).all()
    found = client.detect(serving_repo.support, x)
    assert np.isposinf(found.score[1:]).all()
    np.testing.assert_array_equal(found.is_anomaly, [False, True, True])


def test_sample_is_deterministic_per_seed_and_matches_training(client, serving_repo):
    a = client.sample(serving_repo.gaussian, n=700, seed=11)
    b = client.sample(serving_repo.gaussian, n=700, seed=11)
    c = client.sample(serving_repo.gaussian, n=700, seed=12)
    assert a.shape == (700, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    expected = serving_repo.estimator.sample(700, seed=11).numpy()
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-5)


def test_translate_over_handmade_graphs(client, serving_repo):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = client.translate(serving_repo.translate, x, "a2b")
    np.testing.assert_allclose(y, 2 * x + 1)
    np.testing.assert_allclose(client.translate(serving_repo.translate, y, "b2a"), x)


def test_responses_carry_the_served_version(client, serving_repo):
    from serving.api import genserve_pb2 as pb
    from serving.services.tensors import encode

    reply = client.stub.ScoreDensity(pb.ScoreDensityRequest(
        model=pb.ModelRef(name=serving_repo.gaussian), x=encode(serving_repo.X_test[:3])), timeout=10)
    assert reply.model_version == 2
    assert json.loads(client.stub.GetModel(pb.GetModelRequest(
        model=pb.ModelRef(name=serving_repo.gaussian)), timeout=10).manifest_json)["version"] == 2
