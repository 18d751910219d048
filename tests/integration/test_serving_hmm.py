"""The Gaussian HMM published by the training pipeline and served over loopback gRPC: sequences
[N, T, D] of any length score like the estimator, anomalies are flagged, and samples follow the
seed and the requested length. Also ``genserve train hmm`` on a .npy file of sequences."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.cli import main
from serving.client import ClientError
from serving.repository.manifest import Manifest
from training import datasets, registry
from training.demo import DEMO_MODELS
from training.pipeline import train_and_publish

FAST = {"n_states": 3, "n_init": 1, "verbose": False}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    repo = tmp_path_factory.mktemp("hmm-repo")
    _, manifest = train_and_publish("hmm", "regimes", repo, "regimes-hmm", FAST, calibration_folds=2,
                                    log=lambda line: None)
    data = datasets.load("regimes")
    # EM is deterministic given its hyper-parameters: refitting gives the published model.
    estimator = registry.get("hmm").create(**manifest.hyperparameters).fit(data.X_train)
    return repo, manifest, estimator, data


def test_manifest_declares_sequences_and_a_resizable_length(published):
    _, manifest, _, _ = published
    assert manifest.family == "hmm" and manifest.input.shape == [-1, 2]
    assert manifest.capabilities == ["score", "anomaly", "sample"]
    assert manifest.graphs["score"].inputs[0].shape == [-1, -1, 2]
    assert {s.name: s.axes for s in manifest.graphs["sample"].inputs} == {"u": {1: "length"}, "z": {1: "length"}}
    assert manifest.metrics["test_log_likelihood_per_step"] > -2.4  # the true model gets about -2.34


def test_hmm_served_like_its_estimator(published, fresh_server, tmp_path):
    repo, manifest, estimator, data = published
    handle = fresh_server(repo).start()
    client = handle.client()
    name = manifest.name
    for length in (50, 13, 1):  # the training length, and lengths the graph was never traced at
        x = np.ascontiguousarray(data.X_test[:40, :length], dtype=np.float32)
        np.testing.assert_allclose(client.score(name, x), estimator.log_prob(x.astype(np.float64)).numpy(),
                                   rtol=1e-5, atol=1e-4)

    with pytest.raises(ClientError) as empty:  # "any length" means at least one step
        client.score(name, np.zeros((2, 0, 2), np.float32))
    assert empty.value.code == "INVALID_ARGUMENT" and "x" in empty.value.message

    shifted = data.X_test[:3] + np.array([6.0, -6.0])  # regimes the model has never seen
    rows = np.concatenate([data.X_test, shifted]).astype(np.float32)
    found = client.detect(name, rows)
    assert found.is_anomaly[-3:].all() and found.is_anomaly[:-3].mean() < 0.05

    a = client.sample(name, n=5, seed=3)
    assert a.shape == (5, 50, 2)
    np.testing.assert_array_equal(a, client.sample(name, n=5, seed=3))
    np.testing.assert_allclose(a, estimator.sample(5, seed=3).numpy(), rtol=1e-5, atol=1e-5)
    b = client.sample(name, n=4, seed=3, length=120)
    assert b.shape == (4, 120, 2)
    np.testing.assert_allclose(b, estimator.sample(4, seed=3, length=120).numpy(), rtol=1e-5, atol=1e-5)
    assert main(["client", "sample", "--port", str(handle.server.port), "--model", name, "--n", "4", "--seed", "3",
                 "--length", "120", "--output", str(tmp_path / "s.npy")]) == 0  # the command line's --length
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), b)


def test_genserve_train_hmm_on_a_file_of_sequences(tmp_path):
    np.save(tmp_path / "sensors.npy", datasets.sample_regimes(40, 20, seed=4)[0][:, :, :1])  # D = 1
    code = main(["train", "hmm", "--data", str(tmp_path / "sensors.npy"), "--out", str(tmp_path / "repo"),
                 "--states", "2", "--covariance", "diag", "--restarts", "1", "--calibration-folds", "2"])
    assert code == 0
    manifest = Manifest.model_validate_json((tmp_path / "repo" / "sensors-hmm" / "1" / "manifest.json").read_text())
    assert manifest.input.shape == [-1, 1] and manifest.hyperparameters["n_states"] == 2
    assert (tmp_path / "repo" / "sensors-hmm" / "1" / "training.png").is_file()


def test_demo_builds_an_hmm():
    family, data, params = DEMO_MODELS["regimes-hmm"]
    assert (family, data) == ("hmm", "regimes") and registry.get(family).create(**params).n_states == "auto"
