"""The VAE: its losses against hand values and Monte Carlo, the bound ordering ELBO <= IWAE_K <= log p(x)
against a numerically integrated marginal, gradients through the reparameterisation, the class
marginalisation, ONNX parity of every graph, reproducible sampling and a training run that learns."""

from __future__ import annotations

import math
import socket

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.multiprocessing as torch_mp
from scipy import stats
from scipy.special import logsumexp

from serving.repository.noise import draw_noise
from training import datasets
from training.estimators.vae import VariationalAutoencoder
from training.estimators.vae_core import VAECore
from training.estimators.vae_losses import (elbo, gaussian_kl, log_mean_exp, mixture_log_prob, posterior_log_prob,
                                            reparameterise, standard_normal_log_prob)
from training.estimators.vae_networks import DataTransform, Decoder, Encoder
from training.export import export_onnx
from vae_ddp_worker import train_rank

TINY = dict(latent_dim=4, hidden_units=32, hidden_layers=1, components=2, max_epochs=3, batch_size=64, kl_warmup=0,
            importance_samples=8, verbose=False)


@pytest.fixture(scope="module")
def digits():
    return datasets.digits()


@pytest.fixture(scope="module")
def tiny_mlp(digits):
    return VariationalAutoencoder(**{**TINY, "max_epochs": 8}).fit(digits.X_train[:300])


@pytest.fixture(scope="module")
def tiny_conv_conditional(digits):
    return VariationalAutoencoder(architecture="conv", conditional=True, sample_mode="draw", **{**TINY, "max_epochs": 2}).fit(
        digits.X_train[:200], digits.y_train[:200], image_shape=(8, 8))


# ---- losses ------------------------------------------------------------------------------

def test_gaussian_kl_matches_the_hand_computed_value():
    # KL = 1/2 sum(mu^2 + s^2 - 1 - log s^2): (1 + 1 - 1 - 0) + (0 + 4 - 1 - log 4), halved.
    kl = gaussian_kl(torch.tensor([1.0, 0.0], dtype=torch.float64),
                     torch.tensor([0.0, math.log(4.0)], dtype=torch.float64))
    assert float(kl) == pytest.approx(0.5 * (1.0 + 3.0 - math.log(4.0)), abs=1e-12)
    assert float(gaussian_kl(torch.zeros(3), torch.zeros(3))) == 0.0


def test_gaussian_kl_matches_a_monte_carlo_estimate():
    mean = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64)
    log_var = torch.tensor([-0.5, 0.8, -2.0], dtype=torch.float64)
    eps = torch.randn(400_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = reparameterise(mean, log_var, eps)
    log_q = stats.norm(mean.numpy(), np.exp(0.5 * log_var.numpy())).logpdf(z.numpy()).sum(axis=1)
    log_p = stats.norm().logpdf(z.numpy()).sum(axis=1)
    np.testing.assert_allclose(posterior_log_prob(eps, log_var).numpy(), log_q, rtol=1e-10)
    np.testing.assert_allclose(standard_normal_log_prob(z).numpy(), log_p, rtol=1e-10)
    terms = log_q - log_p
    stderr = terms.std() / math.sqrt(len(terms))
    assert abs(terms.mean() - float(gaussian_kl(mean, log_var))) < 4 * stderr


def test_mixture_log_prob_matches_scipy():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(5, 3))
    logits, mean, log_scale = rng.normal(size=(3, 5, 3, 2))
    expected = np.zeros(5)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for d in range(3):
        dens = sum(weights[:, d, m] * stats.norm(mean[:, d, m], np.exp(log_scale[:, d, m])).pdf(y[:, d])
                   for m in range(2))
        expected += np.log(dens)
    got = mixture_log_prob(*(torch.from_numpy(a) for a in (y, logits, mean, log_scale)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_log_mean_exp_is_stable_and_reads_k_from_the_tensor():
    log_w = torch.tensor([[1000.0, 1000.0, 1000.0 + math.log(4.0)]], dtype=torch.float64)
    assert float(log_mean_exp(log_w, dim=-1)) == pytest.approx(1000.0 + math.log(2.0), abs=1e-9)


def test_logit_transform_is_a_proper_density_change():
    x = torch.tensor([[0.001, 0.5, 0.97]], dtype=torch.float32, requires_grad=True)
    transform = DataTransform("logit", 1e-6, torch.tensor([0.3, -0.2, 1.0]), torch.tensor([2.0, 0.5, 1.5]))
    y, log_det = transform(x)
    jac = torch.stack([torch.autograd.grad(y[0, i], x, retain_graph=True)[0][0, i] for i in range(3)])
    assert float(log_det.detach()) == pytest.approx(float(torch.log(jac).sum()), rel=1e-5)
    np.testing.assert_allclose(transform.inverse(y).detach().numpy(), x.detach().numpy(), rtol=1e-5)
    # a standard normal on y integrates to 1 over x's support
    grid = torch.linspace(transform.low, transform.high, 2_000_001, dtype=torch.float64)[1:-1, None]
    t64 = DataTransform("logit", 1e-6, torch.zeros(1), torch.ones(1)).double()
    y, log_det = t64(grid)
    density = torch.exp(standard_normal_log_prob(y) + log_det)
    assert float(torch.trapezoid(density, grid[:, 0])) == pytest.approx(1.0, abs=2e-3)


# ---- the bounds against the exact marginal -----------------------------------------------------

def _tiny_core(seed: int = 0) -> VAECore:
    torch.manual_seed(seed)
    transform = DataTransform("gaussian", 1e-6, torch.zeros(2), torch.ones(2))
    core = VAECore(transform, Encoder(2, 1, 8, 1, 0), Decoder(2, 1, 8, 1, 0, components=2)).double()
    return core.eval()


def _exact_log_prob(core: VAECore, x: torch.Tensor) -> np.ndarray:
    """log int p(x|z) N(z; 0, 1) dz on a fine grid (1-D latent)."""
    z = torch.linspace(-12.0, 12.0, 24_001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits, mean, log_scale = core.decoder(z)
        y, log_det = core.transform(x)
        log_px = mixture_log_prob(y[:, None, :], logits, mean, log_scale) + log_det[:, None]  # [N, grid]
        joint = log_px + standard_normal_log_prob(z)[None, :]
    return logsumexp(joint.numpy(), axis=1) + math.log(24.0 / 24_000)


def test_elbo_below_iwae_below_the_exact_log_likelihood_and_iwae_rises_with_k():
    core = _tiny_core()
    x = torch.tensor([[0.3, -1.0], [1.5, 0.2], [-2.0, 2.5]], dtype=torch.float64)
    exact = _exact_log_prob(core, x)
    gen = torch.Generator().manual_seed(0)
    reps = 4000
    with torch.no_grad():
        xs = x.repeat_interleave(reps, dim=0)
        bound = core.training_objective(xs, torch.randn(len(xs), 1, dtype=torch.float64, generator=gen))
        bound = bound.reshape(3, reps).mean(dim=1).numpy()
        iwae = {}
        for k in (1, 4, 16, 64):
            est = core.log_prob(xs, torch.randn(len(xs), k, 1, dtype=torch.float64, generator=gen)).reshape(3, reps)
            iwae[k] = (est.mean(dim=1).numpy(), est.std(dim=1).numpy() / math.sqrt(reps))
        large = core.log_prob(x, torch.randn(3, 200_000, 1, dtype=torch.float64, generator=gen)).numpy()
    # E[IWAE_1] is the ELBO (MC KL instead of the closed form): equal within the noise
    np.testing.assert_allclose(iwae[1][0], bound, atol=4 * iwae[1][1].max() + 0.02)
    for small, big in ((1, 4), (4, 16), (16, 64)):
        assert np.all(iwae[small][0] < iwae[big][0] + 3 * (iwae[small][1] + iwae[big][1]))
    assert np.all(bound < iwae[64][0]) and (iwae[64][0] - bound).max() > 0.5  # a random encoder is poor
    assert np.all(iwae[64][0] < exact + 3 * iwae[64][1])
    np.testing.assert_allclose(large, exact, atol=0.02)  # IWAE_K -> log p(x)


def test_conv_nets_start_sensitive_to_their_inputs():
    """He initialisation: at the start the conv decoder's output moves with z and the encoder's
    mean with x about as much as the MLP's (PyTorch's default init leaves the conv pair ~50x
    flatter, and the VAE then collapses onto the prior)."""
    torch.manual_seed(0)
    for image in (None, (8, 8)):
        with torch.no_grad():
            _, mean, _ = Decoder(64, 16, 256, 2, 0, 3, image=image)(torch.randn(8, 16))
            z_mean, _ = Encoder(64, 16, 256, 2, 0, image=image)(torch.randn(8, 64))
        assert float(mean.std(dim=0).mean()) > 0.05 and float(z_mean.std(dim=0).mean()) > 0.05, image


def test_kl_warmup_weight_scales_only_the_kl():
    log_px, mean, log_var = torch.tensor([-3.0]), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]])
    assert float(elbo(log_px, mean, log_var, kl_weight=0.0)) == -3.0
    half = float(elbo(log_px, mean, log_var, kl_weight=0.5))
    assert half == pytest.approx(-3.0 - 0.5 * float(gaussian_kl(mean, log_var)), abs=1e-6)


def test_gradients_flow_through_the_reparameterised_sample():
    core = _tiny_core().train()
    x = torch.tensor([[0.3, -1.0], [1.5, 0.2]], dtype=torch.float64)
    loss = -core.training_objective(x, torch.randn(2, 1, dtype=torch.float64)).mean()
    loss.backward()
    for name, p in core.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    encoder_grads = [p.grad.abs().sum() for p in core.encoder.parameters()]
    assert sum(encoder_grads) > 0  # the encoder learns only through z = mu + sigma * eps


def test_conditional_score_marginalises_over_the_classes(tiny_conv_conditional, digits):
    est = tiny_conv_conditional
    core, x = est.core_, torch.tensor(digits.X_test[:5], dtype=torch.float32)
    eps = torch.randn(5, 6, est.latent_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, log_det = core.transform(x)
        per_class = torch.stack([log_mean_exp(core.log_weights(y, eps, core.onehot(torch.full((5,), c))), -1)
                                 for c in range(10)], dim=1)
        expected = torch.logsumexp(per_class + core.class_log_prior, dim=1) + log_det
        np.testing.assert_allclose(core.log_prob(x, eps).numpy(), expected.numpy(), rtol=1e-5)
    counts = np.bincount(digits.y_train[:200], minlength=10)
    np.testing.assert_allclose(core.class_log_prior.exp().numpy(), counts / counts.sum(), rtol=1e-5)


# ---- the estimator -------------------------------------------------------------------------

def test_short_training_lowers_the_loss(tiny_mlp):
    losses = [h["loss"] for h in tiny_mlp.history_]
    assert losses[-1] < losses[0] - 1.0 and len(losses) == 8
    assert tiny_mlp.history_[-1]["val_log_likelihood"] > tiny_mlp.history_[0]["val_log_likelihood"]


def test_scores_and_samples_are_reproducible_by_seed(tiny_mlp, digits):
    x = digits.X_test[:20]
    a = tiny_mlp.score_samples(x, seed=3)
    np.testing.assert_array_equal(a, tiny_mlp.score_samples(x, seed=3))
    assert not np.array_equal(a, tiny_mlp.score_samples(x, seed=4))
    np.testing.assert_array_equal(tiny_mlp.sample(10, seed=5).numpy(), tiny_mlp.sample(10, seed=5).numpy())
    assert not np.array_equal(tiny_mlp.sample(10, seed=5).numpy(), tiny_mlp.sample(10, seed=6).numpy())


def test_rows_outside_the_logit_support_score_minus_infinity(tiny_mlp, digits):
    x = digits.X_test[:3].copy()
    x[1, 5], x[2, 0] = 1.5, -0.2
    scores = tiny_mlp.score_samples(x)
    assert np.isfinite(scores[0]) and np.all(scores[1:] == -np.inf)


def _onnx_run(graph, folder, feeds_at_export, feeds):
    path = folder / f"{graph.name}.onnx"
    export_onnx(graph, path, feeds_at_export)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, feeds)
    with torch.no_grad():
        torch_out = graph.module(*(torch.from_numpy(feeds[s.name]) for s in graph.inputs))
    return onnx_out, torch_out if isinstance(torch_out, tuple) else (torch_out,)


@pytest.mark.parametrize("which", ["tiny_mlp", "tiny_conv_conditional"])
def test_onnx_parity_of_every_graph_at_other_batch_and_importance_sizes(which, request, digits, tmp_path):
    est = request.getfixturevalue(which)
    graphs = {g.name: g for g in est.export_graphs()}
    assert set(graphs) == {"score", "sample", "encode", "reconstruct"}
    score_noise = graphs["score"].inputs[1]
    assert score_noise.noise == "normal" and score_noise.axes == {1: "importance_samples"}
    assert score_noise.shape == [-1, est.importance_samples, est.latent_dim]
    for name, graph in graphs.items():
        feeds = est.check_feeds(graph, digits, 16)
        later = est.check_feeds(graph, digits, 5)
        if name == "score":
            later.update(draw_noise(graph.inputs, 5, seed=9, sizes={"importance_samples": 33}))
        onnx_out, torch_out = _onnx_run(graph, tmp_path, feeds, later)
        assert len(onnx_out) == len(graph.outputs)
        for a, b in zip(onnx_out, torch_out):
            assert a.shape == tuple(b.shape) and a.shape[0] == 5
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the served score graph is the estimator's score
        x = digits.X_test[:5]
        eps = draw_noise([score_noise], 5, seed=9, sizes={"importance_samples": 33})["eps"]
        graph_out = graphs["score"].module(torch.tensor(x, dtype=torch.float32), torch.from_numpy(eps))
    np.testing.assert_allclose(est.score_samples(x, importance_samples=33, seed=9), graph_out.numpy(), rtol=1e-6)


def test_conditional_sampling_takes_a_label(tiny_conv_conditional, digits):
    est = tiny_conv_conditional
    assert est.num_classes == 10
    graph = {g.name: g for g in est.export_graphs()}["sample"]
    assert [(s.name, s.noise, s.dtype) for s in graph.inputs] == [
        ("z", "normal", "float32"), ("u", "uniform", "float32"), ("e", "normal", "float32"), ("label", None, "int64")]
    sevens, threes = est.sample(6, seed=1, label=7), est.sample(6, seed=1, label=3)
    assert sevens.shape == (6, 64) and not torch.equal(sevens, threes)
    with pytest.raises(ValueError, match="label"):
        est.sample(2, label=10)
    with pytest.raises(ValueError, match="y: this VAE is conditional"):
        est.encode(digits.X_test[:2])
    assert est.reconstruct(digits.X_test[:2], digits.y_test[:2]).shape == (2, 64)


def test_encode_and_reconstruct_shapes(tiny_mlp, digits):
    mean, log_var = tiny_mlp.encode(digits.X_test[:7])
    assert mean.shape == log_var.shape == (7, 4)
    assert tiny_mlp.reconstruct(digits.X_test[:7]).shape == (7, 64)


@pytest.mark.parametrize("params, message", [
    ({"architecture": "resnet"}, "architecture must be one of"),
    ({"likelihood": "bernoulli"}, "likelihood must be one of"),
    ({"latent_dim": 0}, "latent_dim must be an int >= 1"),
    ({"components": 1.5}, "components must be an int >= 1"),
    ({"sample_mode": "median"}, "sample_mode must be one of"),
    ({"alpha": 0.5}, "alpha must be a float in"),
    ({"validation_fraction": 0.0}, "validation_fraction must be"),
    ({"conditional": "yes"}, "conditional must be True or False"),
    ({"device": "tpu"}, "device"),
])
def test_bad_parameters_name_the_parameter(params, message):
    with pytest.raises(ValueError, match=message):
        VariationalAutoencoder(**params).fit(np.random.default_rng(0).uniform(size=(20, 4)))


def test_bad_data_for_the_options_is_explained():
    rows = np.random.default_rng(0).uniform(size=(20, 63))
    with pytest.raises(ValueError, match="not a square image"):
        VariationalAutoencoder(architecture="conv").fit(rows)
    with pytest.raises(ValueError, match="multiples of 4"):
        VariationalAutoencoder(architecture="conv").fit(rows[:, :36])
    with pytest.raises(ValueError, match="needs class labels"):
        VariationalAutoencoder(conditional=True).fit(rows)
    with pytest.raises(ValueError, match=r"likelihood='logit' needs data in \[0, 1\]"):
        VariationalAutoencoder(likelihood="logit").fit(rows * 3)


def test_auto_likelihood_follows_the_data_range():
    rows = np.random.default_rng(0).normal(size=(40, 3))
    est = VariationalAutoencoder(**{**TINY, "max_epochs": 1}).fit(rows)
    assert est.likelihood_ == "gaussian" and est.fitted_params()["likelihood"] == "gaussian"
    assert np.all(np.isfinite(est.score_samples(rows * 100)))


# ---- data-parallel training ----------------------------------------------------------------

def test_two_gloo_processes_train_identical_weights(tmp_path):
    """Both ranks start from the same seed but see different shards: only DDP's gradient
    averaging keeps their weights identical after training."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch_mp.spawn(train_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    first, second = ((tmp_path / f"rank{r}").read_text().split() for r in (0, 1))
    assert first == second and first[1] == "3"
