"""The exporter writes ONNX that reproduces torch, and refuses graphs that do not."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import ExportGraph
from training.estimators.gaussian import GaussianDensity
from training.export import ExportCheckError, compare, export_and_check, graph_inputs

RNG = np.random.default_rng(0)
X = RNG.normal(size=(300, 4)) @ RNG.normal(size=(4, 4))


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_score_graph_equals_torch_on_new_batch_sizes(tmp_path):
    model = GaussianDensity().fit(X)
    score = model.export_graphs()[0]
    parity = export_and_check(score, tmp_path, X[:50])
    assert parity.max_rel_diff <= 1e-6
    queries = RNG.normal(size=(7, 4)).astype(np.float32)  # a batch size never seen at export
    onnx_out = run_onnx(tmp_path / "score.onnx", {"x": queries})
    np.testing.assert_allclose(onnx_out, model.log_prob(queries.astype(np.float64)).numpy(), rtol=1e-5)


def test_sample_graph_equals_torch_for_the_same_noise(tmp_path):
    model = GaussianDensity().fit(X)
    sample = model.export_graphs()[1]
    export_and_check(sample, tmp_path, X[:20])
    inputs = graph_inputs(sample, np.zeros((33, 4)), seed=7)
    onnx_out = run_onnx(tmp_path / "sample.onnx", inputs)
    np.testing.assert_allclose(onnx_out, model.sample(33, seed=7).numpy(), atol=1e-5)


class _Disagrees(nn.Module):
    """Python state the tracer freezes as a constant: torch's next call differs from the graph by 1."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.sum(dim=1) + float(self.calls)


def test_a_graph_that_differs_from_torch_is_refused_and_not_left_behind(tmp_path):
    graph = ExportGraph("score", _Disagrees(), [TensorSpec(name="x", shape=[-1, 2])],
                        [TensorSpec(name="log_prob", shape=[-1])])
    rows = np.ones((40, 2))
    with pytest.raises(ExportCheckError, match="differs from torch"):
        export_and_check(graph, tmp_path, rows, tolerance=1e-4)
    assert not (tmp_path / "score.onnx").exists()


def test_compare_treats_matching_infinities_as_equal_and_mismatched_as_infinite():
    a = np.array([-np.inf, 1.0, 2.0])
    assert compare(a, np.array([-np.inf, 1.0, 2.0 + 1e-7])).max_rel_diff < 1e-6
    assert compare(a, np.array([0.0, 1.0, 2.0])).max_rel_diff == np.inf
    with pytest.raises(ExportCheckError, match="NaN"):
        compare(a, np.array([np.nan, 1.0, 2.0]))
