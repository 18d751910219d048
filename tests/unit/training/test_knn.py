"""kNN density: the textbook formula, its failure to normalise, the choice of k, ONNX parity."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.special import gamma

from training.estimators.knn import KNNDensity


def _normal(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d))


def _brute_force_log_density(train, query, k):
    n, d = train.shape
    dist = np.sqrt(((query[:, None, :] - train[None, :, :]) ** 2).sum(-1))
    d_k = np.sort(dist, axis=1)[:, k - 1]
    v_d = math.pi ** (d / 2) / gamma(d / 2 + 1)
    return np.log(k / (n * v_d * d_k ** d))


@pytest.mark.parametrize("d, k", [(1, 1), (1, 7), (2, 5), (5, 10), (64, 3)])
def test_matches_brute_force(d, k):
    train, query = _normal(120, d, seed=d), 1.5 * _normal(80, d, seed=100 + d)
    ours = KNNDensity(k=k).fit(train).score_samples(query)
    np.testing.assert_allclose(ours, _brute_force_log_density(train, query, k), rtol=1e-9)


def test_query_on_duplicated_points_stays_finite():
    train = np.r_[np.zeros((3, 2)), _normal(20, 2, seed=1)]
    log_p = KNNDensity(k=3).fit(train).score_samples(np.zeros((1, 2)))
    assert np.isfinite(log_p).all() and log_p[0] > 1e2  # d_3 = 0, floored: a huge but finite density


def _integral_1d(model, train, radius):
    """Trapezoid integral over [-R, R]: fine inside the data, geometric in the tails."""
    inner = np.linspace(train.min() - 1, train.max() + 1, 20_001)
    right = train.max() + 1 + np.geomspace(1e-3, radius - train.max() - 1, 4_000)
    left = train.min() - 1 - np.geomspace(1e-3, radius + train.min() - 1, 4_000)
    t = np.unique(np.r_[left, inner, right])
    return np.trapezoid(np.exp(model.score_samples(t[:, None])), t)


def test_does_not_integrate_to_one():
    """In 1-D, p(x) ~ k / (2 n |x|) in the tails, so the mass over [-R, R] grows like (k/n) log R."""
    train = _normal(50, 1, seed=2)
    k, n = 5, len(train)
    model = KNNDensity(k=k).fit(train)
    small, large = _integral_1d(model, train, 1e2), _integral_1d(model, train, 1e4)
    assert small > 1.0
    assert large - small == pytest.approx(k / n * math.log(1e4 / 1e2), rel=0.02)


def test_auto_k_maximises_its_recorded_validation_score():
    train = _normal(200, 2, seed=3)
    model = KNNDensity(k="auto", validation_fraction=0.25, random_state=4).fit(train)
    assert model.k_ == model.k_candidates_[np.argmax(model.validation_scores_)]
    assert 1 <= model.k_ <= 150 and model.k_candidates_.max() == 150
    # the recorded score of one candidate equals the brute-force held-out mean on the same split
    order = np.random.default_rng(4).permutation(200)
    val, fit_rows = train[order[:50]], train[order[50:]]
    j = 3
    expected = _brute_force_log_density(fit_rows, val, int(model.k_candidates_[j])).mean()
    assert model.validation_scores_[j] == pytest.approx(expected, rel=1e-9)
    assert model.core_.points.shape[0] == 200  # refitted on every row
    assert model.fitted_params()["k"] == model.k_ and model.get_params()["k"] == "auto"


def test_auto_k_chunking_does_not_change_the_choice(monkeypatch):
    from training.estimators import knn as knn_module
    train = _normal(120, 3, seed=5)
    whole = KNNDensity(k="auto").fit(train)
    monkeypatch.setattr(knn_module, "_CHUNK_ELEMENTS", 10)
    chunked = KNNDensity(k="auto").fit(train)
    np.testing.assert_allclose(chunked.validation_scores_, whole.validation_scores_, rtol=1e-12)


def test_cannot_sample():
    model = KNNDensity(k=3).fit(_normal(30, 2, seed=6))
    assert not model.can_sample
    assert [g.name for g in model.export_graphs()] == ["score"]
    with pytest.raises(NotImplementedError):
        model.sample(5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("d, k", [(1, 4), (8, 6)])
def test_onnx_score_graph_matches_torch(d, k, tmp_path):
    model = KNNDensity(k=k).fit(_normal(200, d, seed=7))
    (graph,) = model.export_graphs()
    path = tmp_path / "score.onnx"
    torch.onnx.export(graph.module, (torch.zeros(3, d),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["log_prob"],
                      dynamic_axes={"x": {0: "batch"}, "log_prob": {0: "batch"}})
    x = (2.0 * _normal(333, d, seed=8)).astype(np.float32)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        torch_out = graph.module(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == (333,)
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-5)


@pytest.mark.parametrize("params, name", [
    ({"k": 0}, "k"), ({"k": 31}, "k"), ({"k": 2.0}, "k"), ({"k": "sqrt"}, "k"), ({"k": True}, "k"),
    ({"validation_fraction": 0.0}, "validation_fraction"), ({"validation_fraction": 1.0}, "validation_fraction"),
])
def test_bad_parameters_are_named(params, name):
    with pytest.raises(ValueError, match=f"{name} must be") as error:
        KNNDensity(**params).fit(_normal(30, 2, seed=0))
    if name == "k":
        assert "n_samples=30" in str(error.value) and "'auto'" in str(error.value)
