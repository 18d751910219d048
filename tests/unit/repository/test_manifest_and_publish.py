"""The manifest rejects what the server could not serve; publishing is atomic and never overwrites."""

import json
import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from serving.repository.layout import publish_version, version_numbers
from serving.repository.manifest import Manifest
from training.datasets import grid25
from training.estimators.gaussian import GaussianDensity
from training.export import ExportCheckError
from training.pipeline import train_and_publish
from training.publish import publish


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    path, manifest = train_and_publish("gaussian", "grid25", repo, "grid25-gaussian", log=lambda _: None)
    return repo, path, manifest


def test_a_published_version_has_every_file_and_a_manifest_that_round_trips(published):
    repo, path, manifest = published
    assert path == repo / "grid25-gaussian" / "1"
    assert {p.name for p in path.iterdir()} == {"manifest.json", "score.onnx", "sample.onnx", "card.md", "samples.png"}
    loaded = Manifest.model_validate_json((path / "manifest.json").read_text())
    assert loaded == manifest
    assert loaded.capabilities == ["score", "anomaly", "sample"]
    assert loaded.graphs["sample"].inputs[0].noise == "normal"
    assert loaded.anomaly.threshold == pytest.approx(loaded.anomaly.threshold_at(0.01))
    assert loaded.metrics["test_log_likelihood"] < 0 and loaded.data_fingerprint.startswith("sha256:")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(capabilities=["sample"], graphs={}), "graphs"),
    (lambda m: m.update(capabilities=["score", "sample"], graphs={"score": m["graphs"]["score"]}), "sample"),
    (lambda m: m.update(anomaly=None), "anomaly"),
    (lambda m: m["input"].update(shape=[0]), "positive"),
    (lambda m: m.update(name="Bad Name"), "name"),
    (lambda m: m.update(surprise=1), "surprise"),
    (lambda m: m["export_check"]["max_rel_diff"].update(score=1.0), "tolerance"),
])
def test_invalid_manifests_are_rejected_naming_the_problem(published, edit, message):
    raw = json.loads((published[1] / "manifest.json").read_text())
    edit(raw)
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(raw)


def test_versions_increase_and_a_failed_write_leaves_the_repository_as_it_was(published, tmp_path):
    repo = tmp_path
    publish_version(repo, "m", lambda folder, v: (folder / "a").write_text(str(v)))

    def broken(folder, version):
        (folder / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_version(repo, "m", broken)
    assert [p.name for p in (repo / "m").iterdir()] == ["1"]  # no temporary folder left behind
    with pytest.raises(FileExistsError):
        publish_version(repo, "m", lambda folder, v: None, version=1)
    assert (repo / "m" / "1" / "a").read_text() == "1"


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    def write(folder, version):
        (folder / "v").write_text(str(version))

    threads = [threading.Thread(target=publish_version, args=(tmp_path, "m", write)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert version_numbers(tmp_path / "m") == list(range(1, 9))
    assert all((tmp_path / "m" / str(v) / "v").read_text() == str(v) for v in range(1, 9))


class _Drifting(torch.nn.Module):
    """Wraps a graph with Python state the tracer freezes: ONNX and torch then differ by 1."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) + float(self.calls)


class _BadExportGaussian(GaussianDensity):
    def export_graphs(self):
        graphs = super().export_graphs()
        graphs[1].module = _Drifting(graphs[1].module)  # the sample graph: written after score
        return graphs


def test_an_export_that_fails_its_check_publishes_nothing(tmp_path):
    data = grid25(n_train=200, n_test=50)
    model = _BadExportGaussian().fit(data.X_train)
    with pytest.raises(ExportCheckError, match="sample"):
        publish(model, tmp_path, "g", data, calibration=None, metrics={})
    assert version_numbers(tmp_path / "g") == []
    assert list((tmp_path / "g").iterdir()) == []


def test_data_fingerprint_identifies_the_training_rows(tmp_path):
    data = grid25(n_train=200, n_test=50)
    model = GaussianDensity().fit(data.X_train)
    _, first = publish(model, tmp_path, "g", data, calibration=None, metrics={})
    data.X_train = data.X_train + np.float64(1e-9)
    _, second = publish(model, tmp_path, "g", data, calibration=None, metrics={})
    assert first.data_fingerprint != second.data_fingerprint and second.version == 2
