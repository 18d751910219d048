"""The Gaussian HMM: forward recursion against brute force, EM's guarantee, parameter recovery,
ONNX graphs at lengths never traced, sampling from noise, and the parameter checks."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from serving.repository.noise import draw_noise
from training import datasets
from training.estimators.hmm import GaussianHMM
from training.estimators.hmm_core import HMMCore, posterior, sample_states
from training.export import export_onnx


def random_model(K: int, D: int, covariance_type: str, seed: int) -> HMMCore:
    rng = np.random.default_rng(seed)
    start = torch.as_tensor(rng.dirichlet(np.ones(K)))
    transmat = torch.as_tensor(rng.dirichlet(np.ones(K), size=K))
    means = torch.as_tensor(rng.normal(scale=2.0, size=(K, D)))
    if covariance_type == "full":
        a = rng.normal(size=(K, D, D))
        covs = torch.as_tensor(a @ a.transpose(0, 2, 1) + 0.3 * np.eye(D))
    else:
        covs = torch.as_tensor(rng.uniform(0.2, 2.0, size=(K, D)))
    return HMMCore(start, transmat, means, covs, covariance_type, default_length=5)


def brute_force(core: HMMCore, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(x) [N] and p(s_t = k | x) [N, T, K] by enumerating all K^T state paths, with scipy's
    Gaussian densities: shares nothing with the recursions under test."""
    K, D = core.n_states, core.n_features
    N, T, _ = x.shape
    covs = core.emissions.chol @ core.emissions.chol.mT if core.covariance_type == "full" \
        else core.emissions.std.square()
    covs = covs.numpy() if core.covariance_type == "full" else np.stack([np.diag(v) for v in covs.numpy()])
    log_b = np.stack([stats.multivariate_normal(core.emissions.means[k].numpy(), covs[k]).logpdf(
        x.reshape(-1, D)).reshape(N, T) for k in range(K)], axis=2)
    log_start, log_A = core.log_start.numpy(), np.log(core.transmat.numpy())
    paths = np.array(list(itertools.product(range(K), repeat=T)))          # [K^T, T]
    log_joint = log_start[paths[:, 0]] + log_A[paths[:, :-1], paths[:, 1:]].sum(axis=1)
    log_joint = log_joint[None, :] + log_b[:, np.arange(T), paths].sum(axis=2)  # [N, K^T]
    log_px = logsumexp(log_joint, axis=1)
    weights = np.exp(log_joint - log_px[:, None])
    marginals = np.stack([np.stack([weights[:, paths[:, t] == k].sum(axis=1) for k in range(K)], axis=1)
                          for t in range(T)], axis=1)
    return log_px, marginals


def sequences(n: int, length: int, seed: int = 0) -> np.ndarray:
    return datasets.sample_regimes(n, length, seed)[0]


@pytest.fixture(scope="module")
def fitted() -> GaussianHMM:
    return GaussianHMM(n_states=3, n_init=1).fit(datasets.load("regimes").X_train)


# ---- the forward recursion and the posteriors ----------------------------------------------

@pytest.mark.parametrize("K, T, covariance_type", [(2, 4, "full"), (3, 5, "full"), (3, 4, "diag"), (2, 1, "diag")])
def test_forward_equals_brute_force_enumeration(K, T, covariance_type):
    core = random_model(K, 2, covariance_type, seed=K * 10 + T)
    x = np.random.default_rng(T).normal(scale=2.0, size=(6, T, 2))
    expected, marginals = brute_force(core, x)
    xt = torch.as_tensor(x)
    np.testing.assert_allclose(core.log_prob(xt).numpy(), expected, rtol=1e-12, atol=1e-10)
    post = posterior(core.log_emission(xt), core.log_start.exp(), core.transmat)
    np.testing.assert_allclose(post.log_likelihood.numpy(), expected, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(post.gamma.numpy(), marginals, atol=1e-10)


def test_forward_is_finite_for_outliers_and_forbidden_transitions():
    # State 1 is unreachable from state 0 (A_01 = 0) and the frames are 1e3 away from every
    # mean: emission log-densities near -1e6 and an impossible best state must not give NaN or
    # -inf where the exact answer is finite.
    start = torch.tensor([1.0, 0.0], dtype=torch.float64)
    transmat = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [900.0, 900.0]], dtype=torch.float64)
    core = HMMCore(start, transmat, means, torch.ones(2, 2, dtype=torch.float64), "diag", 3)
    x = torch.full((1, 3, 2), 1000.0, dtype=torch.float64)
    expected = stats.norm.logpdf(1000.0) * 6  # every step in state 0
    assert core.log_prob(x).item() == pytest.approx(expected, rel=1e-12)
    post = posterior(core.log_emission(x), start, transmat)
    assert torch.isfinite(post.gamma).all() and torch.allclose(post.gamma[0, :, 0], torch.ones(3, dtype=torch.float64))


# ---- EM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_never_decreases_the_likelihood(covariance_type):
    x = sequences(60, 30, seed=5) / 2.5  # overlapping states, and one state too many: slow climb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tol=0 never "converges"
        model = GaussianHMM(n_states=4, covariance_type=covariance_type, reg_covar=0.0, tol=0.0, n_iter=40,
                            n_init=1, random_state=2).fit(x)
    bounds = np.array(model.lower_bounds_)
    assert len(bounds) == 40 and model.n_reseeds_ == 0
    assert np.diff(bounds).min() >= -1e-9 * abs(bounds).max()
    assert bounds[-1] - bounds[0] > 0.01  # it really climbed, not a flat line
    assert model.score(x) == pytest.approx(bounds[-1], rel=1e-12)  # the last bound is the fitted model's


def test_recovers_the_generating_parameters(fitted):
    order = [int(np.argmin(np.linalg.norm(fitted.means_.numpy() - m, axis=1))) for m in datasets.REGIMES_MEANS]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(fitted.means_.numpy()[order], datasets.REGIMES_MEANS, atol=0.06)
    np.testing.assert_allclose(fitted.covariances_.numpy()[order], datasets.REGIMES_COVARIANCES, atol=0.06)
    np.testing.assert_allclose(fitted.transmat_.numpy()[np.ix_(order, order)], datasets.REGIMES_TRANSMAT, atol=0.02)
    np.testing.assert_allclose(fitted.startprob_.numpy()[order], datasets.REGIMES_START, atol=0.1)
    assert fitted.converged_ and fitted.history_[-1]["log_likelihood"] == fitted.lower_bounds_[-1]
    # The posterior decodes the hidden regimes of unseen sequences almost perfectly.
    x, states = datasets.sample_regimes(20, 50, seed=9)
    decoded = np.asarray(order).argsort()[fitted.predict_proba(x).argmax(axis=2)]
    assert (decoded == states).mean() > 0.97


def test_auto_chooses_the_true_number_of_states_on_held_out_sequences():
    model = GaussianHMM(n_states="auto", candidate_states=(1, 2, 3, 4), n_init=1).fit(sequences(120, 30, seed=3))
    assert model.n_states_ == 3 and model.fitted_params()["n_states"] == 3
    assert [s["n_states"] for s in model.selection_scores_] == [1, 2, 3, 4]


def test_pipeline_hooks(fitted):
    data = datasets.load("regimes")
    assert fitted.input_shape(data) == [-1, 2]
    figures = fitted.evaluate(data)
    assert figures["test_log_likelihood_per_step"] == pytest.approx(figures["test_log_likelihood"] / 50)
    # The true model's held-out per-step log-likelihood is the ceiling; the fit is within 0.02 nats.
    truth = GaussianHMM(n_states=3)  # scored with the generating parameters, through the same core
    truth.core_ = HMMCore(*(torch.as_tensor(a) for a in (datasets.REGIMES_START, datasets.REGIMES_TRANSMAT,
                                                         datasets.REGIMES_MEANS, datasets.REGIMES_COVARIANCES)),
                          "full", 50)
    truth.n_features_in_ = 2
    assert figures["test_log_likelihood_per_step"] > truth.score(data.X_test) / 50 - 0.02


# ---- exported graphs --------------------------------------------------------------------------

def onnx_session(graph, example: dict, tmp_path) -> ort.InferenceSession:
    path = tmp_path / f"{graph.name}.onnx"
    export_onnx(graph, path, example)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_score_graph_is_exact_at_lengths_never_traced(covariance_type, tmp_path):
    x = sequences(80, 50, seed=1)
    model = GaussianHMM(n_states=3, covariance_type=covariance_type, n_init=1).fit(x)
    graph = next(g for g in model.export_graphs() if g.name == "score")
    session = onnx_session(graph, {"x": x[:8].astype(np.float32)}, tmp_path)  # traced at T = 50
    for length in (1, 2, 17, 50, 123):
        rows = sequences(9, length, seed=length).astype(np.float32)
        served = session.run(None, {"x": rows})[0]
        np.testing.assert_allclose(served, model.log_prob(rows.astype(np.float64)).numpy(), rtol=1e-5, atol=1e-4)


def test_sample_graph_follows_the_requested_length_and_seed(fitted, tmp_path):
    graph = next(g for g in fitted.export_graphs() if g.name == "sample")
    assert [(s.name, s.shape, s.axes) for s in graph.inputs] == [("u", [-1, 50], {1: "length"}),
                                                                ("z", [-1, 50, 2], {1: "length"})]
    session = onnx_session(graph, draw_noise(graph.inputs, 4, seed=0), tmp_path)
    for length in (50, 1, 9, 200):
        noise = draw_noise(graph.inputs, 6, seed=7, sizes={"length": length})
        served = session.run(None, noise)[0]
        assert served.shape == (6, length, 2)
        np.testing.assert_allclose(served, fitted.sample(6, seed=7, length=length).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fitted.sample(5, seed=3).numpy(), fitted.sample(5, seed=3).numpy())
    assert not np.array_equal(fitted.sample(5, seed=3).numpy(), fitted.sample(5, seed=4).numpy())


def test_sampled_chains_have_the_model_transition_frequencies():
    start = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    transmat = torch.as_tensor(datasets.REGIMES_TRANSMAT)
    u = torch.as_tensor(np.random.default_rng(0).random((4000, 40)))
    states = sample_states(u, torch.cumsum(start, 0), torch.cumsum(transmat, 1)).numpy()
    np.testing.assert_allclose(np.bincount(states[:, 0], minlength=3) / 4000, start.numpy(), atol=0.03)
    pairs = np.bincount((states[:, :-1] * 3 + states[:, 1:]).ravel(), minlength=9).reshape(3, 3)
    np.testing.assert_allclose(pairs / pairs.sum(axis=1, keepdims=True), transmat.numpy(), atol=0.01)


# ---- parameters and inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"n_states": 0}, "n_states must be an int >= 1 or 'auto'"),
    ({"covariance_type": "spherical"}, "covariance_type must be one of 'full', 'diag'"),
    ({"n_iter": 0}, "n_iter must be an int >= 1"),
    ({"tol": -1.0}, "tol must be a float >= 0"),
    ({"n_init": 2.5}, "n_init must be an int >= 1"),
    ({"reg_covar": float("nan")}, "reg_covar must be a float >= 0"),
    ({"random_state": -1}, "random_state must be an int >= 0"),
    ({"candidate_states": []}, "candidate_states must be a non-empty sequence"),
    ({"verbose": "yes"}, "verbose must be True or False"),
    ({"n_states": 500}, "n_states must be <= the number of frames"),
])
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GaussianHMM(**{"n_states": 2, **params}).fit(sequences(6, 20))


def test_bad_inputs_are_named(fitted):
    with pytest.raises(ValueError, match=r"3-D \[n_sequences, length, n_features\].*pass X\[None\]"):
        GaussianHMM(n_states=2).fit(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianHMM(n_states=2).fit(np.full((5, 4, 2), np.nan))
    with pytest.raises(ValueError, match="3 features per step, the model was fitted on 2"):
        fitted.log_prob(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="n_states='auto' .* needs at least 5"):
        GaussianHMM().fit(sequences(4, 10))
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianHMM().log_prob(np.zeros((1, 2, 2)))


def test_sequence_files_load_as_three_dimensional_datasets(tmp_path):
    np.save(tmp_path / "seqs.npy", sequences(20, 7))
    data = datasets.load(str(tmp_path / "seqs.npy"))
    assert data.X_train.shape == (14, 7, 2) and data.X_test.shape == (6, 7, 2) and data.n_features == 2
    np.savetxt(tmp_path / "rows.csv", np.zeros((12, 3)), delimiter=",")
    assert datasets.load(str(tmp_path / "rows.csv")).X_train.ndim == 2
    np.save(tmp_path / "bad.npy", np.zeros((12, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"3-D array of sequences \[N, T, D\]"):
        datasets.load(str(tmp_path / "bad.npy"))
