"""A class-conditional VAE on digits, published and served over loopback gRPC.

ScoreDensity is the estimator's importance-weighted estimate for the same seed and K (the server
draws the noise), reproducible by seed, resizable per request (another K changes it only a
little); DetectAnomalies flags noise images; Sample with label=7 gives images that a classifier
trained on real digits mostly calls 7, reproducibly by seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.client import ClientError

PARAMS = dict(conditional=True, latent_dim=8, hidden_units=128, hidden_layers=2, components=2,
              importance_samples=16, max_epochs=40, patience=40, verbose=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from training import datasets
    from training.calibration import calibration_from_scores
    from training.estimators.vae import VariationalAutoencoder
    from training.publish import publish

    data = datasets.digits()
    estimator = VariationalAutoencoder(**PARAMS).fit_dataset(data)
    scores = estimator.calibration_scores(data, 5)
    calibration = calibration_from_scores(scores, 0.01, estimator.calibration_method(5))
    repo = tmp_path_factory.mktemp("vae-repo")
    _, manifest = publish(estimator, repo, "digits-vae", data, calibration=calibration,
                          metrics=estimator.evaluate(data))
    return repo, manifest, estimator, data


def test_manifest_declares_the_vae_capabilities(published):
    _, manifest, estimator, _ = published
    assert manifest.capabilities == ["score", "anomaly", "sample", "encode", "reconstruct", "conditional"]
    assert manifest.num_classes == 10
    eps = manifest.graphs["score"].inputs[1]
    assert (eps.name, eps.shape, eps.noise, eps.axes) == ("eps", [-1, 16, 8], "normal", {1: "importance_samples"})
    assert [s.name for s in manifest.graphs["sample"].data_inputs] == ["label"]
    assert manifest.metrics["test_log_likelihood"] > 60.0


def test_served_vae_scores_samples_and_detects(published, fresh_server):
    repo, manifest, estimator, data = published
    client = fresh_server(repo).start().client(timeout=30.0)
    name = manifest.name
    x = data.X_test[:60].astype(np.float32)

    served = client.score(name, x, seed=5)
    np.testing.assert_array_equal(served, client.score(name, x, seed=5))
    np.testing.assert_allclose(served, estimator.score_samples(x, seed=5), rtol=1e-4, atol=1e-3)
    other_seed = client.score(name, x, seed=6)
    assert not np.array_equal(served, other_seed)
    k64, k256 = (client.score(name, x, seed=5, importance_samples=k) for k in (64, 256))
    np.testing.assert_allclose(k256, estimator.score_samples(x, importance_samples=256, seed=5), rtol=1e-4, atol=1e-3)
    assert 0.0 < np.mean(np.abs(k256 - k64)) < 2.0  # another K: a slightly different estimate (~1 nat of ~90)
    assert np.mean(k256) > np.mean(k64) - 0.1        # ... and on average no looser

    noise = np.random.default_rng(0).uniform(size=(5, 64)).astype(np.float32)
    found = client.detect(name, np.concatenate([x[:20], noise]))
    assert found.is_anomaly[-5:].all() and found.is_anomaly[:20].mean() <= 0.2

    sevens = client.sample(name, n=60, seed=3, label=7)
    np.testing.assert_array_equal(sevens, client.sample(name, n=60, seed=3, label=7))
    np.testing.assert_allclose(sevens, estimator.sample(60, seed=3, label=7).numpy(), rtol=1e-4, atol=1e-5)
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000).fit(data.X_train, data.y_train)
    assert np.mean(classifier.predict(sevens) == 7) >= 0.6  # chance is 0.1
    with pytest.raises(ClientError, match="INVALID_ARGUMENT"):
        client.sample(name, n=2, seed=0)  # a conditional model needs the label
