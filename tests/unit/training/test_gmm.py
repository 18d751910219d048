"""The Gaussian mixture: EM's guarantees, the exported maths, sampling and model choice."""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from serving.repository.noise import draw_noise
from training.estimators.base import SampleGraph, ScoreGraph
from training.estimators.gmm import GaussianMixtureDensity

ROT = np.array([[np.cos(0.6), -np.sin(0.6)], [np.sin(0.6), np.cos(0.6)]])
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_MEANS = np.array([[-6.0, 0.0], [4.0, 5.0], [5.0, -5.0]])
TRUE_COVS = np.array([ROT @ np.diag([2.0, 0.2]) @ ROT.T,
                      np.array([[0.5, 0.0], [0.0, 1.5]]),
                      ROT.T @ np.diag([1.0, 0.1]) @ ROT])


def mixture_rows(n: int, seed: int = 0, weights=TRUE_WEIGHTS, means=TRUE_MEANS, covs=TRUE_COVS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, weights)
    rows = [rng.multivariate_normal(m, c, size=k) for m, c, k in zip(means, covs, counts)]
    return rng.permutation(np.concatenate(rows))


def full_covariances(model: GaussianMixtureDensity) -> np.ndarray:
    covs = model.covariances_.numpy()
    return covs if model.covariance_type_ == "full" else np.stack([np.diag(v) for v in covs])


def scipy_log_prob(model: GaussianMixtureDensity, x: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; mu_k, Sigma_k), term by term with scipy.stats."""
    terms = [np.log(w) + stats.multivariate_normal(m, c).logpdf(x)
             for w, m, c in zip(model.weights_.numpy(), model.means_.numpy(), full_covariances(model))]
    return logsumexp(np.stack(terms, axis=1), axis=1)


def quiet_fit(model: GaussianMixtureDensity, x: np.ndarray) -> GaussianMixtureDensity:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tol=0 runs never "converge"
        return model.fit(x)


# ---- EM ----------------------------------------------------------------------------------

@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_never_lowers_the_likelihood(covariance_type):
    # Four components for three overlapping clusters: EM keeps moving slowly for many steps.
    x = mixture_rows(800, seed=1, means=TRUE_MEANS / 3)
    model = quiet_fit(GaussianMixtureDensity(n_components=4, covariance_type=covariance_type, reg_covar=0.0,
                                             tol=0.0, max_iter=150, n_init=1, random_state=3), x)
    bounds = np.array(model.lower_bounds_)
    assert model.n_iter_ == len(bounds) == 150 and not model.converged_
    assert model.n_reseeds_ == 0  # reseeding is the one step allowed to lower the likelihood
    assert np.diff(bounds).min() >= -1e-10
    assert bounds[-1] - bounds[0] > 1e-3  # it really climbed, not a flat line
    # The last bound is the fitted model's own mean log-likelihood on its training rows.
    assert model.score(x) == pytest.approx(bounds[-1], abs=1e-12)


def test_converges_and_stops_at_tol():
    x = mixture_rows(600, seed=2, means=TRUE_MEANS / 3)  # overlapping: a few iterations, not one
    model = GaussianMixtureDensity(n_components=3, covariance_type="full", tol=1e-4, n_init=1).fit(x)
    assert model.converged_ and 2 <= model.n_iter_ < 200
    assert abs(model.lower_bounds_[-1] - model.lower_bounds_[-2]) < 1e-4


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_log_prob_matches_scipy(covariance_type):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(300, 3)), rng.normal(loc=4.0, size=(300, 3)) @ rng.normal(size=(3, 3))])
    model = GaussianMixtureDensity(n_components=3, covariance_type=covariance_type, random_state=1).fit(x)
    queries = np.concatenate([x[:50], rng.normal(scale=6.0, size=(50, 3)),
                              np.full((1, 3), 40.0)])  # far out: every component's density underflows
    ours = model.score_samples(queries)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, scipy_log_prob(model, queries), rtol=1e-9, atol=1e-9)


def test_one_dimensional_mixture_integrates_to_one():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-3, 0.4, 300), rng.normal(0, 1.0, 300), rng.normal(5, 0.2, 200)])[:, None]
    model = GaussianMixtureDensity(n_components=3, covariance_type="full").fit(x)
    grid = np.linspace(-15, 15, 30001)
    density = np.exp(model.score_samples(grid[:, None]))
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_two_dimensional_mixture_integrates_to_one(covariance_type):
    model = GaussianMixtureDensity(n_components=3, covariance_type=covariance_type).fit(mixture_rows(900, seed=6))
    axis = np.linspace(-16, 16, 641)
    gx, gy = np.meshgrid(axis, axis, indexing="ij")
    density = np.exp(model.score_samples(np.column_stack([gx.ravel(), gy.ravel()]))).reshape(gx.shape)
    total = np.trapezoid(np.trapezoid(density, axis, axis=1), axis)
    assert total == pytest.approx(1.0, abs=1e-3)


def test_recovers_well_separated_parameters():
    model = GaussianMixtureDensity(n_components=3, covariance_type="full").fit(mixture_rows(9000, seed=7))
    # Match fitted components to true ones by nearest mean.
    order = [int(np.argmin(np.linalg.norm(model.means_.numpy() - m, axis=1))) for m in TRUE_MEANS]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(model.weights_.numpy()[order], TRUE_WEIGHTS, atol=0.02)
    np.testing.assert_allclose(model.means_.numpy()[order], TRUE_MEANS, atol=0.1)
    np.testing.assert_allclose(model.covariances_.numpy()[order], TRUE_COVS, atol=0.12)


def test_collapsing_components_stay_finite():
    # Ten copies of three points and five components: clusters empty and shrink onto points.
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 2.0], [5.0, -1.0]]), 10, axis=0)
    model = GaussianMixtureDensity(n_components=5, covariance_type="full", n_init=2).fit(x)
    assert model.converged_ and 1 <= model.n_reseeds_ <= 5  # reseeded once, then frozen
    for value in (model.weights_, model.means_, model.covariances_):
        assert torch.isfinite(value).all()
    assert model.weights_.sum().item() == pytest.approx(1.0)
    assert np.isfinite(model.score_samples(x)).all()
    assert np.isfinite(model.sample(50, seed=0).numpy()).all()


def test_singular_covariance_without_reg_is_a_clear_error():
    x = np.column_stack([np.arange(20.0), np.full(20, 3.0)])  # a constant feature
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixtureDensity(n_components=1, covariance_type="full", reg_covar=0.0).fit(x)
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixtureDensity(n_components=1, covariance_type="diag", reg_covar=0.0).fit(x)


# ---- digits (D1 protocol) -------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data, target = load_digits(return_X_y=True)
    x = (data + np.random.default_rng(0).uniform(size=data.shape)) / 17
    x_train, x_test, _, _ = train_test_split(x, target, test_size=0.3, stratify=target, random_state=0)
    return x_train, x_test


@pytest.mark.slow
def test_digits_matches_sklearn_twenty_diag_components(digits_split):
    from sklearn.mixture import GaussianMixture
    x_train, x_test = digits_split
    reference = GaussianMixture(n_components=20, covariance_type="diag", random_state=0).fit(x_train)
    started = time.perf_counter()
    ours = GaussianMixtureDensity(n_components=20, covariance_type="diag", random_state=0).fit(x_train)
    assert time.perf_counter() - started < 30
    assert ours.score(x_test) >= reference.score(x_test) - 1.0


# ---- model choice --------------------------------------------------------------------

def test_validation_selection_finds_three_correlated_clusters():
    x = mixture_rows(1500, seed=8)
    model = GaussianMixtureDensity(n_components="auto", covariance_type="auto",
                                   candidate_components=(1, 2, 3, 5, 8)).fit(x)
    assert model.chosen_ == {"n_components": 3, "covariance_type": "full"}
    assert len(model.selection_scores_) == 10
    best = max(model.selection_scores_, key=lambda s: s["score"])
    assert (best["n_components"], best["covariance_type"]) == (3, "full")
    assert model.fitted_params()["n_components"] == 3 and model.get_params()["n_components"] == "auto"
    # The chosen parameters refit the very same model without searching.
    refit = GaussianMixtureDensity(**model.fitted_params()).fit(x)
    assert torch.equal(refit.means_, model.means_)


def test_bic_prefers_diagonal_for_axis_aligned_clusters():
    covs = np.array([np.diag([1.0, 0.3]), np.diag([0.2, 1.0]), np.diag([0.5, 0.5])])
    x = mixture_rows(1500, seed=9, covs=covs)
    model = GaussianMixtureDensity(selection="bic", candidate_components=(1, 2, 3, 5, 8)).fit(x)
    assert model.chosen_ == {"n_components": 3, "covariance_type": "diag"}
    best = min(model.selection_scores_, key=lambda s: s["score"])
    assert best["metric"] == "bic" and (best["n_components"], best["covariance_type"]) == (3, "diag")


def test_candidates_are_capped_by_the_rows():
    x = mixture_rows(20, seed=10)
    model = GaussianMixtureDensity(covariance_type="diag", candidate_components=(1, 2, 30)).fit(x)
    assert [s["n_components"] for s in model.selection_scores_] == [1, 2]


# ---- ONNX parity and sampling ---------------------------------------------------------

def export(module: torch.nn.Module, args: tuple, names: list[str], output: str, path) -> ort.InferenceSession:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=[output],
                          dynamic_axes={n: {0: "batch"} for n in [*names, output]},
                          opset_version=17, dynamo=False)
    # A tracer warning would mean data-dependent Python control flow baked into the graph.
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_clamped_log_sum_exp_equals_the_plain_one_to_the_last_bit():
    """Exp's argument is clamped at EXP_FLOOR (for onnxruntime's speed): terms that far below the
    largest cannot change the sum, so the result must be bit-identical to the unclamped formula,
    including rows where most terms underflow (anomalies far from every component)."""
    from training.estimators.logsumexp import EXP_FLOORS, finite_log_sum_exp

    EXP_FLOOR = EXP_FLOORS[torch.float64]

    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.uniform(-6000.0, 0.0, size=(500, 64)) + rng.uniform(-1e4, 1e4, size=(500, 1)))
    a[:, :3] = a[:, 3:4] + torch.from_numpy(rng.uniform(-40.0, 0.0, size=(500, 3)))  # a few terms near the max
    a[0, :] = -5.0  # every term the same
    m = a.amax(dim=1, keepdim=True)
    plain = m.squeeze(1) + torch.log(torch.exp(a - m).sum(dim=1))
    assert ((a - m) < EXP_FLOOR).float().mean() > 0.8  # most terms are clamped
    assert torch.equal(finite_log_sum_exp(a), plain)
    np.testing.assert_allclose(finite_log_sum_exp(a).numpy(), logsumexp(a.numpy(), axis=1), rtol=1e-15)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_onnx_graphs_match_torch(covariance_type, tmp_path):
    x = mixture_rows(900, seed=11)
    model = GaussianMixtureDensity(n_components=3, covariance_type=covariance_type).fit(x)
    core = model.core_
    queries = np.concatenate([x[:400], [[40.0, -40.0]]]).astype(np.float32)

    score = export(ScoreGraph(core).eval(), (torch.from_numpy(queries[:7]),), ["x"], "log_prob",
                   tmp_path / "score.onnx")
    expected = ScoreGraph(core)(torch.from_numpy(queries)).numpy()
    got = score.run(None, {"x": queries})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    specs = core.noise_specs()
    noise = draw_noise(specs, 500, seed=12)
    tensors = [torch.from_numpy(noise[s.name]) for s in specs]
    small = [t[:5] for t in tensors]
    sample = export(SampleGraph(core).eval(), tuple(small), [s.name for s in specs], "samples",
                    tmp_path / "sample.onnx")
    expected = SampleGraph(core)(*tensors).numpy()
    got = sample.run(None, noise)[0]
    assert got.shape == (500, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_uniform_picks_components_through_cumulative_weights():
    model = GaussianMixtureDensity(n_components=3, covariance_type="diag").fit(mixture_rows(900, seed=13))
    core = model.core_
    cum = core.cum_weights
    u = torch.tensor([0.0, float(cum[0]) - 1e-9, float(cum[0]) + 1e-9, float(cum[1]) + 1e-9, 1.0, 1.5],
                     dtype=torch.float64)
    assert core.component_index(u).tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_samples_are_seeded_and_follow_the_mixture(covariance_type):
    model = GaussianMixtureDensity(n_components=3, covariance_type=covariance_type).fit(mixture_rows(3000, seed=14))
    first, again, other = model.sample(200_000, seed=3), model.sample(200_000, seed=3), model.sample(10, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first[:10], other)

    w, mu, covs = model.weights_.numpy(), model.means_.numpy(), full_covariances(model)
    mean = w @ mu
    cov = np.einsum("k,kij->ij", w, covs + np.einsum("ki,kj->kij", mu, mu)) - np.outer(mean, mean)
    samples = first.numpy()
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(samples, rowvar=False), cov, atol=0.15, rtol=0.02)
    # Each sample lands by its own component: the fractions nearest each mean follow the weights.
    nearest = np.argmin(((samples[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=3) / len(samples), w, atol=0.01)


def test_same_seed_same_fit():
    x = mixture_rows(600, seed=15)
    a = GaussianMixtureDensity(n_components=4, covariance_type="full", random_state=7).fit(x)
    b = GaussianMixtureDensity(n_components=4, covariance_type="full", random_state=7).fit(x)
    assert torch.equal(a.means_, b.means_) and a.lower_bounds_ == b.lower_bounds_
    assert torch.equal(a.sample(100, seed=1), b.sample(100, seed=1))


# ---- parameters and progress -----------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("n_components", 0), ("n_components", "many"), ("n_components", 2.5), ("n_components", True),
    ("n_components", 1000),  # more components than rows
    ("covariance_type", "spherical"), ("tol", -1.0), ("max_iter", 0), ("n_init", 0),
    ("reg_covar", -1e-3), ("reg_covar", float("nan")), ("init", "random"), ("random_state", None),
    ("random_state", -1), ("selection", "aic"), ("candidate_components", ()),
    ("candidate_components", (1, 0)), ("candidate_components", "1,2"), ("verbose", "yes"),
])
def test_bad_parameters_name_themselves(name, value):
    with pytest.raises(ValueError, match=name):
        GaussianMixtureDensity(**{name: value}).fit(mixture_rows(100))


def test_progress_bar_only_when_verbose(capsys):
    x = mixture_rows(200, seed=16)
    GaussianMixtureDensity(candidate_components=(1, 2)).fit(x)
    assert capsys.readouterr().err == ""
    GaussianMixtureDensity(candidate_components=(1, 2), verbose=True).fit(x)
    assert "gmm" in capsys.readouterr().err
