"""The GAN published and served over loopback gRPC: Sample (plain and class-conditional) and
DetectAnomalies through the discriminator's ``anomaly`` graph; no ScoreDensity (no density). The
sample graphs resample candidates by the per-sample classifier (``resample``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.client import ClientError
from training.calibration import calibration_from_scores
from training.datasets import Dataset
from training.estimators.gan import GenerativeAdversarialNetwork
from training.pipeline import train_and_publish
from training.publish import publish

torch.set_num_threads(1)
CENTRES = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
FAST = dict(hidden=32, layers=2, latent_dim=4, batch_size=64, learning_rate=2e-3, verbose=False, device="cpu",
            generator_activation="relu", fourier_features=0, r1_weight=0.0, pack=1, resample=1)


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CENTRES), size=n)
    return CENTRES[labels] + 0.1 * rng.standard_normal((n, 2)), labels


def toy() -> Dataset:
    X_train, y_train = blobs(600, 0)
    X_test, y_test = blobs(300, 1)
    return Dataset("blobs", X_train, X_test, y_train, y_test)


def test_gan_sampled_and_scored_like_its_estimator(fresh_server, tmp_path):
    data = toy()
    estimator = GenerativeAdversarialNetwork(steps=150, **{**FAST, "pack": 2, "resample": 8},
                                             minibatch_discrimination=True, classifier_steps=100)
    estimator.fit_dataset(data)
    scores = estimator.calibration_scores(data, 5)
    calibration = calibration_from_scores(scores, 0.05, estimator.calibration_method(5))
    _, manifest = publish(estimator, tmp_path, "blobs-gan", data, calibration=calibration,
                          metrics=estimator.evaluate(data))
    assert manifest.capabilities == ["anomaly", "sample"]  # sample + anomaly, no score graph
    assert set(manifest.graphs) == {"sample", "anomaly"}
    assert [(s.name, s.shape, s.noise) for s in manifest.graphs["sample"].inputs] == [
        ("z", [-1, 8, 4], "normal"), ("u", [-1], "uniform")]  # 8 candidates per sample, one choice
    assert manifest.hyperparameters["resample"] == 8 and "classifier_holdout_accuracy" in manifest.hyperparameters
    card = (tmp_path / "blobs-gan" / "1" / "card.md").read_text()
    assert "not a density" in card and "−log p" not in card

    client = fresh_server(tmp_path).start().client()
    assert {m.name: m.state for m in client.list_models()}["blobs-gan"] == "AVAILABLE"

    a = client.sample("blobs-gan", n=300, seed=11)
    np.testing.assert_array_equal(a, client.sample("blobs-gan", n=300, seed=11))  # same seed, same samples
    assert not np.array_equal(a, client.sample("blobs-gan", n=300, seed=12))
    np.testing.assert_allclose(a, estimator.sample(300, seed=11).numpy(), rtol=1e-4, atol=1e-4)

    x = data.X_test[:200].astype(np.float32)
    found = client.detect("blobs-gan", x)
    np.testing.assert_allclose(found.score, estimator.anomaly_score(x), rtol=1e-4, atol=1e-4)
    assert found.threshold == pytest.approx(calibration.threshold)
    np.testing.assert_array_equal(found.is_anomaly, found.score > found.threshold)

    with pytest.raises(ClientError) as error:  # a GAN has no density to score
        client.score("blobs-gan", x)
    assert error.value.code == "FAILED_PRECONDITION"


def test_conditional_gan_gives_the_requested_class(fresh_server, tmp_path):
    _, manifest = train_and_publish("gan", toy(), tmp_path, "blobs-cgan",
                                    params=dict(conditional=True, steps=300, **{**FAST, "resample": 4},
                                                classifier_steps=100), log=lambda line: None)
    assert "conditional" in manifest.capabilities and manifest.num_classes == 3
    assert [s.name for s in manifest.graphs["sample"].inputs] == ["z", "u", "label"]
    client = fresh_server(tmp_path).start().client()
    for c in range(3):
        samples = client.sample("blobs-cgan", n=200, seed=c, label=c)
        nearest = np.linalg.norm(samples[:, None] - CENTRES[None], axis=2).argmin(axis=1)
        assert (nearest == c).mean() > 0.9, (c, np.bincount(nearest, minlength=3))
    with pytest.raises(ClientError) as error:
        client.sample("blobs-cgan", n=5, seed=0)  # no label for a conditional model
    assert error.value.code == "INVALID_ARGUMENT"
