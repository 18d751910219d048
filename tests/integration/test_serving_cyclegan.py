"""CycleGAN published by the training pipeline and served over loopback gRPC: ``Translate`` in both
directions equals the torch generators, the manifest says ``translate`` (and nothing else),
``genserve client translate`` reads and writes PNG images (torchrun: ``test_torchrun_ddp``)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from serving.cli import main as serving_cli
from serving.client import ClientError
from training import datasets
from training.estimators.cyclegan import CycleGAN
from training.pipeline import train_and_publish

torch.set_num_threads(1)

FAST = dict(width=8, blocks=1, hidden=32, epochs=2, decay_epochs=1, batch_size=64, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Publish a quick digits-bold CycleGAN; return (repo, manifest, the fitted estimator, data)."""
    repo = tmp_path_factory.mktemp("cyclegan-repo")
    fitted: list[CycleGAN] = []
    original = CycleGAN.fit_dataset

    def recording(self, data):
        fitted.append(self)
        return original(self, data)

    CycleGAN.fit_dataset = recording
    try:
        data = datasets.load("digits-bold")
        _, manifest = train_and_publish("cyclegan", data, repo, "digits-cyclegan", params=FAST, log=lambda line: None)
    finally:
        CycleGAN.fit_dataset = original
    return repo, manifest, fitted[0], data


def test_manifest_card_and_pictures(published):
    repo, manifest, estimator, _ = published
    assert manifest.family == "cyclegan"
    assert manifest.capabilities == ["translate"]
    assert set(manifest.graphs) == {"translate_a2b", "translate_b2a"}
    assert manifest.anomaly is None
    assert {"test_cycle_l1_a", "test_cycle_l1_b", "test_mae_a2b", "test_mae_b2a"} <= set(manifest.metrics)
    folder = repo / "digits-cyclegan" / "1"
    assert (folder / "translations.png").is_file() and (folder / "training.png").is_file()
    assert "cyclegan" in (folder / "card.md").read_text()


def test_translate_both_directions_over_grpc_equals_the_generators(published, fresh_server):
    repo, manifest, estimator, data = published
    handle = fresh_server(repo).start()
    client = handle.client()
    assert {m.name: m.state for m in client.list_models()}["digits-cyclegan"] == "AVAILABLE"

    a, b = data.X_test[:200].astype(np.float32), data.X_test_b[:200].astype(np.float32)
    with torch.no_grad():
        expected_a2b = estimator.G_(torch.from_numpy(a)).numpy()
        expected_b2a = estimator.F_(torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(client.translate("digits-cyclegan", a, "a2b"), expected_a2b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(client.translate("digits-cyclegan", b, "b2a"), expected_b2a, rtol=0, atol=1e-5)

    # the model has no density and no sampler: those calls are refused, not guessed
    with pytest.raises(ClientError, match="FAILED_PRECONDITION"):
        client.score("digits-cyclegan", a)
    with pytest.raises(ClientError, match="INVALID_ARGUMENT"):
        client.translate("digits-cyclegan", a[:, :32], "a2b")

    # genserve client translate: a PNG in, a PNG out (and .npy out)
    image = np.rint(data.X_test[0].reshape(8, 8) * 255).astype(np.uint8)
    Image.fromarray(image).save(repo / "digit.png")
    port = str(handle.server.port)
    base = ["client", "translate", "--port", port, "--model", "digits-cyclegan", "--input", str(repo / "digit.png")]
    assert serving_cli([*base, "--output", str(repo / "bold.png")]) == 0
    assert serving_cli([*base, "--direction", "a2b", "--output", str(repo / "bold.npy")]) == 0
    row = (image.astype(np.float32) / 255).reshape(1, 64)
    with torch.no_grad():
        expected = estimator.G_(torch.from_numpy(row)).numpy()
    np.testing.assert_allclose(np.load(repo / "bold.npy"), expected, atol=1e-5)
    written = np.asarray(Image.open(repo / "bold.png"), dtype=np.float64) / 255
    assert written.shape == (8, 8)
    np.testing.assert_allclose(written.ravel(), expected.ravel(), atol=0.5 / 255 + 1e-6)
    assert serving_cli([*base, "--output", str(repo / "bold.txt")]) == 2
