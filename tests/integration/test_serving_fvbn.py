"""The fvbn family published by the training pipeline and served over loopback gRPC: the served
log-density equals the estimator's (-inf outside the support, flagged by DetectAnomalies), and
served samples follow the seed and equal ``estimator.sample``. MADE through ``train_and_publish``,
LARC through ``genserve train fvbn --variant larc`` on a .npy file of binary rows."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.cli import main
from serving.repository.manifest import Manifest
from training import registry
from training.datasets import Dataset, from_file
from training.demo import DEMO_MODELS
from training.pipeline import train_and_publish

FAST_MADE = {"hidden_units": 16, "n_blocks": 1, "n_components": 3, "n_masks": 3, "max_epochs": 4, "verbose": False}


def _bounded_rows(n: int, D: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1 / (1 + np.exp(-(rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, D)))))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fvbn-repo")
    data = Dataset("toy-bounded", _bounded_rows(400, 6, 0), _bounded_rows(120, 6, 1))
    _, manifest = train_and_publish("fvbn", data, repo, "toy-fvbn", FAST_MADE, log=lambda line: None)
    # Training is deterministic given the seed (single-threaded steps on the CPU): a refit is the published model.
    estimator = registry.get("fvbn").create(**manifest.hyperparameters).fit(data.X_train)
    return repo, manifest, estimator, data


def test_made_manifest(made):
    _, manifest, estimator, data = made
    assert manifest.family == "fvbn" and manifest.capabilities == ["score", "anomaly", "sample"]
    assert [s.name for s in manifest.graphs["sample"].inputs] == ["u_member", "u_component", "e"]
    assert manifest.anomaly.n_calibration == len(estimator.validation_indices_) == 40
    assert manifest.metrics["test_log_likelihood"] == pytest.approx(estimator.score(data.X_test), rel=1e-6)


def test_made_served_like_its_estimator(made, fresh_server):
    repo, manifest, estimator, data = made
    client = fresh_server(repo).start().client()
    outside = np.full((2, 6), 0.5, dtype=np.float32)
    outside[0, 2], outside[1, 0] = 3.0, -1.0  # beyond the logit transform's support: zero density
    rows = np.concatenate([data.X_test.astype(np.float32), outside])
    served = client.score(manifest.name, rows)
    expected = estimator.log_prob(rows.astype(np.float64)).numpy()
    np.testing.assert_array_equal(served[-2:], [-np.inf, -np.inf])
    np.testing.assert_allclose(served[:-2], expected[:-2], rtol=1e-4, atol=1e-4)

    found = client.detect(manifest.name, rows)
    assert found.is_anomaly[-2:].all() and found.is_anomaly[:-2].mean() < 0.1

    a = client.sample(manifest.name, n=200, seed=3)
    np.testing.assert_array_equal(a, client.sample(manifest.name, n=200, seed=3))
    assert not np.array_equal(a, client.sample(manifest.name, n=200, seed=4))
    np.testing.assert_allclose(a, estimator.sample(200, seed=3).numpy(), rtol=1e-5, atol=1e-5)


def test_larc_trained_from_the_command_line_and_served(tmp_path, fresh_server):
    rows = (_bounded_rows(500, 8, 2) > 0.5).astype(np.float64)
    path = tmp_path / "bits.npy"
    np.save(path, rows)
    repo = tmp_path / "repo"
    code = main(["train", "fvbn", "--variant", "larc", "--data", str(path), "--out", str(repo),
                 "--epochs", "10", "--learning-rate", "0.01"])
    assert code == 0
    manifest = Manifest.model_validate_json((repo / "bits-fvbn" / "1" / "manifest.json").read_text())
    assert manifest.hyperparameters["variant"] == "larc" and "sample" in manifest.capabilities
    estimator = registry.get("fvbn").create(**{**manifest.hyperparameters, "verbose": False})
    estimator.fit(from_file(path).X_train)

    client = fresh_server(repo).start().client()
    queries = np.concatenate([rows[:50], np.full((1, 8), 0.5)]).astype(np.float32)  # the last is not binary
    served = client.score("bits-fvbn", queries)
    np.testing.assert_allclose(served[:-1], estimator.log_prob(queries[:-1].astype(np.float64)).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert served[-1] == -np.inf and client.detect("bits-fvbn", queries).is_anomaly[-1]
    samples = client.sample("bits-fvbn", n=100, seed=5)
    assert set(np.unique(samples)) <= {0.0, 1.0}
    np.testing.assert_array_equal(samples, estimator.sample(100, seed=5).numpy())


def test_digits_fvbn_is_a_demo_model():
    family, data, params = DEMO_MODELS["digits-fvbn"]
    assert (family, data) == ("fvbn", "digits")
    registry.get(family).create(**params)  # the demo's parameters are valid
