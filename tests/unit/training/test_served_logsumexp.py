"""The served log-sum-exp (float32 exponentials): its error bound, and the score graphs that use it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy.special import logsumexp

from training.estimators.gmm import GaussianMixtureDensity
from training.estimators.kde import KernelDensity
from training.estimators.logsumexp import EXP_FLOORS, finite_log_sum_exp
from training.export import export_onnx

EPS32 = 2.0 ** -24


def _terms(rows: int, n: int, seed: int) -> torch.Tensor:
    """Finite float64 terms: offsets up to 1e4, spreads from 1 to 3,000 below each row's max."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(0.0, 3.5, size=(rows, 1))
    a = rng.uniform(0.0, 1.0, size=(rows, n)) * -spread + rng.uniform(-1e4, 1e4, size=(rows, 1))
    a[0, :] = -5.0  # every term the same
    return torch.from_numpy(a)


@pytest.mark.parametrize("n", [16, 10_000])
def test_error_is_within_the_documented_bound(n):
    """|error| <= (ln n + 1) 2^-24 for the rounding of a - max, plus 4 ulps for Exp and the log."""
    a = _terms(200, n, seed=n)
    ours = finite_log_sum_exp(a, torch.float32).numpy()
    exact = logsumexp(a.numpy(), axis=1)
    bound = (math.log(n) + 1.0) * EPS32 + 4 * EPS32 + 1e-15 * np.abs(exact)
    assert ours.dtype == np.float64
    assert np.all(np.abs(ours - exact) <= bound), np.max(np.abs(ours - exact) - bound)
    assert ((a - a.amax(dim=1, keepdim=True)) < EXP_FLOORS[torch.float32]).float().mean() > 0.2  # the clamp is exercised


def _exp_input_types(path) -> list[int]:
    """The element type of every Exp node's input in an ONNX file (after shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    return [types[node.input[0]] for node in model.graph.node if node.op_type == "Exp"]


def _served(estimator, x: np.ndarray, path) -> np.ndarray:
    score = next(g for g in estimator.export_graphs() if g.name == "score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(score, path, {"x": x})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _fit(family: str, kernel: str = "gaussian"):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0]
    if family == "gmm":
        return GaussianMixtureDensity(n_components=4, covariance_type="diag").fit(x), rng
    return KernelDensity(kernel=kernel, bandwidth=0.7).fit(x), rng


@pytest.mark.parametrize("family", ["gmm", "kde"])
def test_score_graph_takes_float32_exponentials_and_keeps_float32_accuracy(family, tmp_path):
    """The exported graph's Exp runs in float32, and its output is the float64 log-density to
    within the float32 output's own rounding (plus the bound above)."""
    estimator, rng = _fit(family)
    x = np.concatenate([rng.standard_normal((300, 5)) * 2.0, [[30.0, -30.0, 5.0, 0.0, 9.0]]]).astype(np.float32)
    served = _served(estimator, x, tmp_path / "score.onnx").astype(np.float64)
    exact = estimator.log_prob(x.astype(np.float64)).numpy()
    assert _exp_input_types(tmp_path / "score.onnx") == [onnx.TensorProto.FLOAT]
    tolerance = 2 * np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64) + 1e-6
    assert np.all(np.abs(served - exact) <= tolerance)


def test_compact_kernels_keep_the_float64_tail(tmp_path):
    """A compact kernel's terms are -inf outside its support: clamping them would turn an empty
    row's -inf into a finite value, so its graph keeps float64 exponentials and serves -inf."""
    estimator, rng = _fit("kde", kernel="tophat")
    x = np.concatenate([rng.standard_normal((50, 5)), [[30.0, -30.0, 5.0, 0.0, 9.0]]]).astype(np.float32)
    served = _served(estimator, x, tmp_path / "score.onnx")
    assert _exp_input_types(tmp_path / "score.onnx") == [onnx.TensorProto.DOUBLE]
    assert np.isneginf(served[-1])
    np.testing.assert_array_equal(np.isneginf(served), np.isneginf(estimator.log_prob(x.astype(np.float64)).numpy()))
