"""Histogram density: unit mass, the n^(-1/3) rule, -inf outside, samples, ONNX parity."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from serving.repository.noise import draw_noise
from training.estimators.histogram import HistogramDensity


def _normal(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d)) * np.arange(1, d + 1)


def _cell_centres(model):
    axes = [model.lower_[j] + (np.arange(b) + 0.5) * model.bin_width_[j] for j, b in enumerate(model.n_bins_)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("bins, alpha", [("auto", 0.0), (1, 0.0), (2, 0.0), (9, 0.0), (9, 0.5)])
def test_mass_over_the_cells_is_exactly_one(d, bins, alpha):
    x = _normal(400, d, seed=d)
    model = HistogramDensity(bins=bins, alpha=alpha).fit(x)
    density = np.exp(model.score_samples(_cell_centres(model)))
    assert density.sum() * np.prod(model.bin_width_) == pytest.approx(1.0, abs=1e-12)
    assert model.counts_.sum() == len(x)
    assert np.isfinite(model.score_samples(x)).all()  # every training point is inside the grid
    if alpha > 0:  # the pseudo-count leaves no cell empty
        assert np.isfinite(density).all()


@pytest.mark.parametrize("d", [1, 2])
def test_integrates_to_one_numerically(d):
    x = _normal(300, d, seed=10 + d)
    model = HistogramDensity().fit(x)
    lo, hi = x.min(axis=0) - 2, x.max(axis=0) + 2
    m = 200_000 if d == 1 else 3000
    axes = [np.linspace(lo[j], hi[j], m + 1) for j in range(d)]
    mids = [(a[:-1] + a[1:]) / 2 for a in axes]
    grid = np.stack(np.meshgrid(*mids, indexing="ij"), axis=-1).reshape(-1, d)
    density = np.exp(model.score_samples(grid))
    cell = np.prod([a[1] - a[0] for a in axes])
    assert density.sum() * cell == pytest.approx(1.0, abs=1e-3)


def test_the_grid_is_padded_by_half_a_cell():
    x = np.array([[0.0], [1.0], [4.0]])
    model = HistogramDensity(bins=5).fit(x)
    assert model.bin_width_[0] == pytest.approx(1.0)  # (4 - 0) / (5 - 1)
    assert model.lower_[0] == pytest.approx(-0.5)
    np.testing.assert_array_equal(model.counts_, [1, 1, 0, 0, 1])
    log_p = model.score_samples([[0.2], [1.3], [2.0], [3.9], [-0.51], [4.51]])
    np.testing.assert_allclose(log_p[:4], [math.log(1 / 3), math.log(1 / 3), -np.inf, math.log(1 / 3)])
    assert np.isneginf(log_p[4:]).all()


def test_auto_width_is_scotts_rule_and_shrinks_like_n_to_the_minus_one_third():
    x = _normal(250, 2, seed=20)
    for reps in (1, 8):
        data = np.tile(x, (reps, 1))  # same spread, 8x the rows
        model = HistogramDensity(bins="auto").fit(data)
        expected = 3.49 * data.std(axis=0, ddof=1) * len(data) ** (-1 / 3)
        np.testing.assert_allclose(model.bin_width_, expected, rtol=1e-12)
        if reps == 1:
            first = model.bin_width_
    # doubling comes from 8^(-1/3) = 1/2; the ddof=1 spread changes by < 0.2%
    np.testing.assert_allclose(model.bin_width_ / first, 0.5, rtol=2e-3)


def test_minus_inf_outside_the_grid_and_in_empty_cells():
    x = np.r_[_normal(100, 2, seed=21), _normal(100, 2, seed=22) + 20.0]
    model = HistogramDensity(bins=12).fit(x)
    far = np.array([[-1e6, 0.0], [0.0, 1e6], [1e300, 1e300], [10.0, 10.0]])  # last: the empty middle
    assert np.isneginf(model.score_samples(far)).all()
    smoothed = HistogramDensity(bins=12, alpha=1.0).fit(x)
    log_p = smoothed.score_samples(far)
    assert np.isneginf(log_p[:3]).all() and np.isfinite(log_p[3])


def test_four_dimensions_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"bins\^d cells.*d <= 3.*kde or gmm"):
        HistogramDensity().fit(_normal(50, 4, seed=0))


def test_constant_feature_gets_one_unit_cell():
    x = np.c_[_normal(50, 1, seed=1), np.full(50, 7.0)]
    model = HistogramDensity(bins=4).fit(x)
    assert model.n_bins_[1] == 1 and model.bin_width_[1] == 1.0
    assert np.isfinite(model.score_samples(x)).all()


def test_samples_land_in_occupied_cells_with_the_cell_frequencies():
    x = np.r_[_normal(150, 2, seed=23), _normal(50, 2, seed=24) + 6.0]
    model = HistogramDensity(bins=10).fit(x)
    s = model.sample(50_000, seed=5).numpy()
    assert np.isfinite(model.score_samples(s)).all()
    cells = np.floor((s - model.lower_) / model.bin_width_).astype(int)
    counts = np.zeros(model.n_bins_, dtype=int)
    np.add.at(counts, tuple(cells.T), 1)
    np.testing.assert_allclose(counts / len(s), model.counts_ / len(x), atol=0.01)
    # uniform within the cell: the fractional position has mean 1/2 and variance 1/12
    frac = (s - model.lower_) / model.bin_width_ - cells
    np.testing.assert_allclose(frac.mean(axis=0), 0.5, atol=0.01)
    np.testing.assert_allclose(frac.var(axis=0), 1 / 12, atol=0.005)
    np.testing.assert_array_equal(model.sample(20, seed=6).numpy(), model.sample(20, seed=6).numpy())


def test_sampling_edge_uniforms_stay_inside_their_cell():
    model = HistogramDensity(bins=3).fit(np.array([[0.0], [1.0], [2.0], [2.0]]))
    pick = torch.tensor([0.0, 1.0], dtype=torch.float32)
    offset = torch.tensor([[0.0], [1.0]], dtype=torch.float32)  # float32 uniforms can round to 1.0
    s = model.core_.sample_from_noise(pick, offset).numpy()
    assert s[0, 0] == pytest.approx(-0.5) and s[1, 0] < 2.5
    assert np.isfinite(model.score_samples(s)).all()


def _export_and_run(graph, feed, path):
    names = [t.name for t in graph.inputs]
    outputs = [t.name for t in graph.outputs]
    example = tuple(torch.from_numpy(feed[name][:3]) for name in names)
    torch.onnx.export(graph.module, example, str(path), dynamo=False, opset_version=17,
                      input_names=names, output_names=outputs,
                      dynamic_axes={name: {0: "batch"} for name in names + outputs})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, feed)[0]
    with torch.no_grad():
        torch_out = graph.module(*(torch.from_numpy(feed[name]) for name in names)).numpy()
    return onnx_out, torch_out


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("d", [1, 3])
def test_onnx_graphs_match_torch_including_minus_inf(d, tmp_path):
    model = HistogramDensity(bins="auto").fit(_normal(300, d, seed=30 + d))
    graphs = {g.name: g for g in model.export_graphs()}
    assert set(graphs) == {"score", "sample"}
    query = {"x": (2.0 * _normal(400, d, seed=40)).astype(np.float32)}
    onnx_score, torch_score = _export_and_run(graphs["score"], query, tmp_path / "score.onnx")
    np.testing.assert_array_equal(np.isneginf(onnx_score), np.isneginf(torch_score))
    finite = np.isfinite(torch_score)
    assert 0 < finite.mean() < 1
    np.testing.assert_allclose(onnx_score[finite], torch_score[finite], rtol=1e-5)

    noise = draw_noise(graphs["sample"].inputs, 500, seed=41)
    onnx_samples, torch_samples = _export_and_run(graphs["sample"], noise, tmp_path / "sample.onnx")
    np.testing.assert_allclose(onnx_samples, torch_samples, rtol=0, atol=1e-5)


@pytest.mark.parametrize("params, name", [
    ({"bins": 0}, "bins"), ({"bins": 2.5}, "bins"), ({"bins": "fd"}, "bins"), ({"bins": True}, "bins"),
    ({"alpha": -0.1}, "alpha"), ({"alpha": float("inf")}, "alpha"), ({"alpha": "1"}, "alpha"),
])
def test_bad_parameters_are_named(params, name):
    with pytest.raises(ValueError, match=f"{name} must be"):
        HistogramDensity(**params).fit(_normal(30, 2, seed=0))


def test_too_many_cells_are_refused():
    with pytest.raises(ValueError, match="cells"):
        HistogramDensity(bins=1000).fit(_normal(30, 3, seed=0))
