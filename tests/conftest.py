"""Shared fixtures: a model repository built once per test session.

``serving_repo`` holds real models published by the training pipeline (so serving is tested
against what training really writes), hand-made ONNX models for what no family has yet
(translation, zero densities), and deliberately broken models (the loader must report them and
keep serving the rest). Tests may import training and torch; serving code may not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

BROKEN_REASONS = {
    "broken-json": "not valid JSON",
    "broken-manifest": "manifest.json is invalid",
    "broken-missing-onnx": "file score.onnx is missing",
    "broken-corrupt-onnx": "onnxruntime cannot load",
    "broken-name": "does not match the folder name",
    "broken-signature": "the manifest declares",
    "broken-empty": "no published version",
}


def _manifest(name: str, *, input_shape: list[int], capabilities: list[str], graphs: dict, anomaly=None):
    from serving.repository.manifest import ExportCheck, GraphSpec, InputSpec, Manifest

    return Manifest(name=name, version=1, family="handmade", input=InputSpec(shape=input_shape),
                    capabilities=capabilities, graphs={k: GraphSpec(**v) for k, v in graphs.items()},
                    anomaly=anomaly,
                    export_check=ExportCheck(max_abs_diff={}, max_rel_diff={}, tolerance=1e-4, rows=1),
                    data_fingerprint="sha256:" + "0" * 64, genserve_version="0.1.0")


def _save_onnx(path: Path, nodes, inputs, outputs, initializers=()) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_translate_model(repo: Path, name: str = "affine-translate", dim: int = 3) -> Path:
    """a2b: y = 2x + 1; b2a: x = (y - 1) / 2, on rows of ``dim`` floats. No score, no sample."""
    from onnx import TensorProto, helper, numpy_helper

    folder = repo / name / "1"
    folder.mkdir(parents=True)
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])
    _save_onnx(folder / "translate_a2b.onnx",
               [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
               [x], [y], [two, one])
    _save_onnx(folder / "translate_b2a.onnx",
               [helper.make_node("Sub", ["x", "one"], ["t"]), helper.make_node("Div", ["t", "two"], ["y"])],
               [x], [y], [two, one])
    spec = {"inputs": [{"name": "x", "shape": [-1, dim]}], "outputs": [{"name": "y", "shape": [-1, dim]}]}
    manifest = _manifest(name, input_shape=[dim], capabilities=["translate"],
                         graphs={"translate_a2b": {"file": "translate_a2b.onnx", **spec},
                                 "translate_b2a": {"file": "translate_b2a.onnx", **spec}})
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


def write_support_model(repo: Path, name: str = "halfplane-support") -> Path:
    """log p(x) = log(max(x0, 0)): -inf (zero density) wherever x0 <= 0, like a histogram's empty cells."""
    from onnx import TensorProto, helper, numpy_helper

    from serving.repository.manifest import AnomalyCalibration

    folder = repo / name / "1"
    folder.mkdir(parents=True)
    index = numpy_helper.from_array(np.array(0, dtype=np.int64), "col")
    _save_onnx(folder / "score.onnx",
               [helper.make_node("Gather", ["x", "col"], ["x0"], axis=1),
                helper.make_node("Relu", ["x0"], ["r"]), helper.make_node("Log", ["r"], ["log_prob"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
               [helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, ["batch"])], [index])
    calibration = AnomalyCalibration(threshold=2.0, contamination=0.05, method="hand-made",
                                     n_calibration=3, quantiles=[-1.0, 0.0, 1.0, 2.0, 3.0])
    manifest = _manifest(name, input_shape=[2], capabilities=["score", "anomaly"],
                         graphs={"score": {"file": "score.onnx", "inputs": [{"name": "x", "shape": [-1, 2]}],
                                           "outputs": [{"name": "log_prob", "shape": [-1]}]}},
                         anomaly=calibration)
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


def write_broken_models(repo: Path, good: Path) -> None:
    """One broken model per failure the loader must report; ``good`` is a valid version folder."""
    def copy(name: str) -> Path:
        target = repo / name / "1"
        shutil.copytree(good, target)
        data = json.loads((target / "manifest.json").read_text())
        data["name"] = name
        (target / "manifest.json").write_text(json.dumps(data))
        return target

    (copy("broken-json") / "manifest.json").write_text('{"name": "broken-json", ')
    target = copy("broken-manifest")
    data = json.loads((target / "manifest.json").read_text())
    del data["capabilities"]
    (target / "manifest.json").write_text(json.dumps(data))
    (copy("broken-missing-onnx") / "score.onnx").unlink()
    (copy("broken-corrupt-onnx") / "score.onnx").write_bytes(b"this is not an ONNX protobuf")
    target = copy("broken-name")
    data = json.loads((target / "manifest.json").read_text())
    data["name"] = "someone-else"
    (target / "manifest.json").write_text(json.dumps(data))
    target = copy("broken-signature")
    data = json.loads((target / "manifest.json").read_text())
    data["graphs"]["score"]["inputs"][0]["name"] = "rows"
    (target / "manifest.json").write_text(json.dumps(data))
    (repo / "broken-empty").mkdir()


@dataclass
class ServingRepo:
    path: Path
    gaussian: str  # name of the grid25 Gaussian, published twice (versions 1 and 2)
    estimator: object  # the training estimator the served Gaussian was exported from
    X_test: np.ndarray
    translate: str
    support: str
    broken: dict[str, str]  # broken model name -> a phrase its UNAVAILABLE reason contains


@pytest.fixture(scope="session")
def serving_repo(tmp_path_factory: pytest.TempPathFactory) -> ServingRepo:
    from training import datasets, registry
    from training.pipeline import train_and_publish

    repo = tmp_path_factory.mktemp("repo")
    name = "grid25-gaussian"
    train_and_publish("gaussian", "grid25", repo, name, log=lambda line: None)
    v2 = repo / name / "2"
    shutil.copytree(repo / name / "1", v2)
    data = json.loads((v2 / "manifest.json").read_text())
    data["version"] = 2
    (v2 / "manifest.json").write_text(json.dumps(data))
    data = datasets.load("grid25")
    # The Gaussian MLE is deterministic: refitting gives the estimator that was published.
    estimator = registry.get("gaussian").create().fit(data.X_train)
    write_translate_model(repo)
    write_support_model(repo)
    write_broken_models(repo, repo / name / "1")
    return ServingRepo(repo, name, estimator, data.X_test.astype(np.float32), "affine-translate",
                       "halfplane-support", dict(BROKEN_REASONS))
