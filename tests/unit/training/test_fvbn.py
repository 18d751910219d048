"""The fvbn family: autoregressive masks, exact normalisation, hand-computed losses, transform
Jacobian, training, ONNX parity and seeded sampling, parameter messages, held-out calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from serving.repository.noise import draw_noise
from training.estimators.fvbn import FVBNDensity
from training.estimators.fvbn import mog
from training.estimators.fvbn.cores import LarcCore, MadeCore
from training.estimators.fvbn.larc import LARC
from training.estimators.fvbn.made import MADE
from training.estimators.fvbn.transform import DataTransform
from training.export import export_and_check

TINY = dict(hidden_units=16, n_blocks=1, n_components=3, n_masks=3, max_epochs=3, batch_size=32, verbose=False)


def _perturbed(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (a fresh MADE has zeros in its direct path and tiny block outputs),
    so that a connection the masks allow really carries a derivative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module.eval()


def _random_made(D: int, M: int = 3, K: int = 3, H: int = 12, blocks: int = 2, seed: int = 0,
                 scale: float = 0.3) -> MADE:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the initial weights: whatever ran before, the same net
        return _perturbed(MADE(D, H, blocks, K, M, seed=seed), scale, seed=seed).double()


def _logit_transform(D: int) -> DataTransform:
    x = torch.rand(50, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return DataTransform.fit(x, "logit", 0.05)


# ---- the masks are autoregressive ------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [0, 2])
def test_output_of_each_feature_ignores_itself_and_later_features(blocks):
    D, K = 7, 2
    net = _random_made(D, M=4, K=K, blocks=blocks)
    z = torch.randn(D, dtype=torch.float64)
    for m in range(net.n_masks):
        jac = torch.autograd.functional.jacobian(lambda v: net.conditionals(v.unsqueeze(0), m)[0], z)
        deg = net.deg_in[m]
        for d in range(D):
            allowed = deg < deg[d]                       # features strictly before d in member m's order
            assert torch.all(jac[d][:, ~allowed] == 0), f"member {m}: feature {d} sees itself or a later one"
            if allowed.any():                            # and it does see the earlier ones
                assert torch.all(jac[d][:, allowed].abs().sum(dim=0) > 0)


def test_exported_core_equals_the_trained_net():
    D = 5
    net = _random_made(D, M=3).float()
    transform = _logit_transform(D)
    core = MadeCore(net, transform)
    x = torch.rand(40, D, dtype=torch.float64)
    z, log_det = transform(x)
    with torch.no_grad():
        expected = net.log_prob(z.float()) + log_det
    torch.testing.assert_close(core.log_prob(x), expected, rtol=1e-5, atol=1e-4)


# ---- exact normalisation -------------------------------------------------------------------------
def test_larc_probabilities_sum_to_one_over_all_binary_vectors():
    D = 10
    generator = torch.Generator().manual_seed(0)
    core = LarcCore(torch.randn(D, D, generator=generator), torch.randn(D, generator=generator))
    every = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=torch.float64)
    total = torch.logsumexp(core.log_prob(every), dim=0)
    assert abs(float(total)) < 1e-10


def test_larc_log_prob_by_hand():
    # D = 2: p(x1 = 1) = sigmoid(b1), p(x2 = 1 | x1) = sigmoid(b2 + w x1)
    b1, b2, w = 0.3, -1.2, 2.0
    core = LarcCore(torch.tensor([[0.0, 0.0], [w, 0.0]], dtype=torch.float64), torch.tensor([b1, b2], dtype=torch.float64))
    s = lambda a: 1 / (1 + math.exp(-a))  # noqa: E731
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    expected = [math.log(s(b1) * s(b2 + w)), math.log(s(b1) * (1 - s(b2 + w))),
                math.log((1 - s(b1)) * s(b2)), math.log((1 - s(b1)) * (1 - s(b2))), -math.inf]
    np.testing.assert_allclose(core.log_prob(x).numpy(), expected, rtol=1e-12)
    larc = LARC(2)
    with torch.no_grad():
        larc.weight.copy_(torch.tensor([[0.0, 5.0], [w, 0.0]]))  # the 5 is above the diagonal: masked out
        larc.bias.copy_(torch.tensor([b1, b2]))
    np.testing.assert_allclose(larc(x[:4].float()).detach().numpy(), expected[:4], rtol=1e-6)


def test_mixture_log_density_by_hand():
    # K = 2: weights softmax([0, log 3]) = (1/4, 3/4), means (-1, 2), sigmas (1, e^-1)
    raw = torch.tensor([0.0, math.log(3.0), -1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    z = torch.tensor([0.5, -3.0, 2.2], dtype=torch.float64)
    expected = np.log(0.25 * stats.norm.pdf(z.numpy(), -1.0, 1.0) + 0.75 * stats.norm.pdf(z.numpy(), 2.0, math.exp(-1)))
    got = mog.log_density(raw.expand(3, 6), z, 2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("D, n", [(1, 40_000), (2, 700)])
def test_made_density_integrates_to_one(D, n):
    net = _random_made(D, M=2, K=3, H=8, blocks=1, seed=D, scale=0.2).float()
    transform = _logit_transform(D)
    core = MadeCore(net, transform)
    h = (transform.high - transform.low) / n
    axis = transform.low + h * (torch.arange(n, dtype=torch.float64) + 0.5)  # midpoint rule
    grid = torch.cartesian_prod(*[axis] * D).reshape(-1, D)
    total = float(torch.exp(core.log_prob(grid)).sum()) * h ** D
    assert abs(total - 1.0) < 2e-3


def test_transform_log_det_and_inverse():
    D = 3
    transform = _logit_transform(D)
    x = torch.rand(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z, log_det = transform(x)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: transform(v.unsqueeze(0))[0][0], x[i])
        torch.testing.assert_close(log_det[i], torch.logdet(jac))
    torch.testing.assert_close(transform.inverse(z), x)
    outside = torch.tensor([[0.5, 0.5, 2.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    assert transform.inside(outside).tolist() == [False, True]


# ---- fitting -------------------------------------------------------------------------------------
def _bounded_rows(n: int = 300, D: int = 4, seed: int = 0) -> np.ndarray:
    """Correlated rows in (0, 1): a shared factor through a sigmoid."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 1))
    return 1 / (1 + np.exp(-(f + 0.5 * rng.normal(size=(n, D)))))


def test_short_training_lowers_the_loss_and_logs_epochs():
    x = _bounded_rows()
    est = FVBNDensity(**{**TINY, "max_epochs": 8, "patience": 8}).fit(x)
    history = est.history_
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert history[-1]["train_nll"] < history[0]["train_nll"]
    assert min(row["val_nll"] for row in history) < history[0]["val_nll"]
    assert est.validation_log_likelihood_ == pytest.approx(-min(row["val_nll"] for row in history))
    assert est.transform_ == "logit"


def test_larc_fits_a_chain_it_can_represent():
    rng = np.random.default_rng(0)
    x1 = rng.random(10_000) < 0.5
    x2 = np.where(rng.random(10_000) < 0.9, x1, ~x1)  # x2 copies x1 with probability 0.9
    x = np.stack([x1, x2], axis=1).astype(float)
    est = FVBNDensity(variant="larc", max_epochs=30, learning_rate=0.05, weight_decay=0.0, patience=30,
                      batch_size=500, verbose=False).fit(x)
    p = np.exp(est.score_samples(np.array([[1.0, 1.0], [1.0, 0.0]])))
    np.testing.assert_allclose(p, [0.45, 0.05], atol=0.02)


def test_calibration_scores_come_from_the_held_out_rows():
    x = _bounded_rows(200)
    est = FVBNDensity(**TINY).fit(x)
    assert len(est.validation_indices_) == 20
    data = type("Data", (), {"X_train": x})()
    scores = est.calibration_scores(data, folds=5)
    np.testing.assert_allclose(scores, -est.score_samples(x[est.validation_indices_]))
    assert "20 training rows held out" in est.calibration_method(5)


# ---- export and sampling -------------------------------------------------------------------------
def _parity(est: FVBNDensity, rows: np.ndarray, tmp_path) -> dict[str, float]:
    out = {}
    for graph in est.export_graphs():
        feeds = draw_noise(graph.inputs, len(rows), seed=0)
        if graph.name == "score":
            feeds["x"] = rows.astype(np.float32)
        out[graph.name] = export_and_check(graph, tmp_path, feeds).max_rel_diff
    return out


def test_made_graphs_match_torch_and_sampling_follows_the_seed(tmp_path):
    x = _bounded_rows()
    est = FVBNDensity(**TINY).fit(x)
    rows = np.concatenate([x[:60], [[0.5, 0.5, 0.5, 3.0]]])  # the last row is outside the support
    diffs = _parity(est, rows, tmp_path)
    assert diffs["score"] <= 1e-4 and diffs["sample"] <= 1e-6
    assert est.score_samples(rows)[-1] == -np.inf
    a, b = est.sample(50, seed=7), est.sample(50, seed=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, est.sample(50, seed=8))
    assert a.shape == (50, 4) and bool(torch.isfinite(a).all())


def test_larc_graphs_match_torch_and_samples_are_binary(tmp_path):
    x = (_bounded_rows(300, 6) > 0.5).astype(float)
    est = FVBNDensity(variant="larc", max_epochs=5, verbose=False).fit(x)
    diffs = _parity(est, np.concatenate([x[:50], np.full((1, 6), 0.5)]), tmp_path)
    assert diffs["score"] <= 1e-6 and diffs["sample"] == 0.0
    samples = est.sample(100, seed=1).numpy()
    assert set(np.unique(samples)) <= {0.0, 1.0}
    np.testing.assert_array_equal(samples, est.sample(100, seed=1).numpy())


def test_larc_samples_follow_its_probabilities():
    D = 3
    generator = torch.Generator().manual_seed(3)
    core = LarcCore(torch.randn(D, D, generator=generator), torch.randn(D, generator=generator))
    n = 20_000
    samples = core.sample_from_noise(torch.from_numpy(draw_noise(core.noise_specs(), n, seed=0)["u"]))
    every = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=torch.float64)
    expected = torch.exp(core.log_prob(every)).numpy() * n
    observed = [(samples == row).all(dim=1).sum().item() for row in every]
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_ensemble_samples_follow_its_density():
    """A 2-D ensemble of 3 orderings: the sampled 2-D histogram against the density's cell masses."""
    D = 2
    core = MadeCore(_random_made(D, M=3, K=3, H=8, blocks=1, seed=5, scale=0.2).float(), _logit_transform(D))
    n = 8000
    noise = draw_noise(core.noise_specs(), n, seed=4)
    samples = core.sample_from_noise(*(torch.from_numpy(noise[s.name]) for s in core.noise_specs())).numpy()
    edges = np.linspace(core.transform.low, core.transform.high, 7)
    observed = np.histogram2d(samples[:, 0], samples[:, 1], bins=[edges, edges])[0].ravel()
    fine = 300
    h = (core.transform.high - core.transform.low) / fine
    axis = core.transform.low + h * (torch.arange(fine, dtype=torch.float64) + 0.5)
    grid = torch.cartesian_prod(axis, axis)
    mass = (torch.exp(core.log_prob(grid)) * h * h).reshape(6, fine // 6, 6, fine // 6).sum(dim=(1, 3))
    expected = mass.numpy().ravel() * n
    keep = expected > 5
    assert stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def test_one_feature_works_end_to_end(tmp_path):
    x = _bounded_rows(120, 1)
    est = FVBNDensity(**TINY).fit(x)
    diffs = _parity(est, x[:20], tmp_path)
    assert max(diffs.values()) <= 1e-4
    assert est.sample(5, seed=0).shape == (5, 1)


# ---- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"variant": "nade"}, "variant must be one of"),
    ({"n_components": 0}, "n_components must be an int >= 1"),
    ({"n_masks": 1.5}, "n_masks must be an int >= 1"),
    ({"n_blocks": -1}, "n_blocks must be an int >= 0"),
    ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
    ({"transform": "probit"}, "transform must be one of"),
    ({"alpha": 0.5}, r"alpha must be a float in \(0, 0.5\)"),
    ({"learning_rate": 0}, "learning_rate must be a float > 0"),
    ({"validation_fraction": 0.0}, r"validation_fraction must be a float in \(0, 0.5\]"),
    ({"device": "tpu"}, "device"),
    ({"verbose": "yes"}, "verbose must be True or False"),
])
def test_bad_parameters_are_refused_with_the_allowed_values(params, message):
    with pytest.raises(ValueError, match=message):
        FVBNDensity(**{**TINY, **params}).fit(_bounded_rows(50))


def test_larc_refuses_non_binary_rows_and_logit_refuses_unbounded_rows():
    with pytest.raises(ValueError, match="variant='larc' models binary rows: X must contain only 0 and 1"):
        FVBNDensity(variant="larc", verbose=False).fit(_bounded_rows(50))
    with pytest.raises(ValueError, match=r"transform='logit' needs data in \[0, 1\]"):
        FVBNDensity(**{**TINY, "transform": "logit"}).fit(_bounded_rows(50) * 3)
    est = FVBNDensity(**TINY).fit(_bounded_rows(80) * 3 - 1)  # "auto" falls back to the affine map
    assert est.transform_ == "affine" and est.fitted_params()["transform"] == "affine"
