"""The GAN: its losses against hand-computed values, the stabilisers' layers, ONNX parity of both
graphs, sampling by seed, class-conditional sampling, that training moves samples to the data, and
importance resampling by the per-sample classifier (the choice follows the softmax weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.datasets import Dataset
from training.estimators import gan_losses as losses
from training.estimators import gan_networks as nets
from training.estimators import gan_resampling as resampling
from training.estimators.gan import GANCore, GenerativeAdversarialNetwork
from training.export import export_and_check

torch.set_num_threads(1)


def log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


def log_one_minus_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(v))


# ---- losses -----------------------------------------------------------------------------------

def test_discriminator_bce_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    expected = (-(log_sigmoid(0.0) + log_sigmoid(2.0)) / 2
                - (log_one_minus_sigmoid(-1.0) + log_one_minus_sigmoid(1.0)) / 2)
    # log 2 and log(1 + e^-2) for the real rows; log(1 + e^-1) and log(1 + e) for the fakes
    assert expected == pytest.approx((math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))
                                      + math.log1p(math.e)) / 2)
    assert float(losses.discriminator_loss(real, fake)) == pytest.approx(expected, rel=1e-6)


def test_one_sided_label_smoothing_by_hand():
    real, fake = torch.tensor([1.5]), torch.tensor([-0.5])
    # real target 0.9: -(0.9 log D + 0.1 log(1 - D)); fakes keep target 0
    expected = -(0.9 * log_sigmoid(1.5) + 0.1 * log_one_minus_sigmoid(1.5)) - log_one_minus_sigmoid(-0.5)
    assert float(losses.discriminator_loss(real, fake, real_target=0.9)) == pytest.approx(expected, rel=1e-6)
    # smoothing makes a confident D pay: at l = 10 the smoothed loss is ~ 0.1 * 10, the plain one ~ 0
    confident = torch.tensor([10.0])
    very_fake = torch.tensor([-10.0])
    assert float(losses.discriminator_loss(confident, very_fake, 0.9)) > 0.9
    assert float(losses.discriminator_loss(confident, very_fake, 1.0)) < 1e-3


def test_non_saturating_generator_loss_by_hand():
    fake = torch.tensor([-3.0, 0.0, 4.0])
    expected = -np.mean([log_sigmoid(-3.0), log_sigmoid(0.0), log_sigmoid(4.0)])
    assert float(losses.generator_loss(fake)) == pytest.approx(expected, rel=1e-6)
    # It does not saturate where D rejects the samples: d/dl [-log sigmoid(l)] = -(1 - sigmoid(l)) ~ -1 at l = -10,
    # where the min-max loss log(1 - sigmoid(l)) has gradient -sigmoid(l) ~ -4.5e-5.
    l = torch.tensor([-10.0], requires_grad=True)
    losses.generator_loss(l).backward()
    assert float(l.grad) == pytest.approx(-1 / (1 + math.exp(-10)), rel=1e-6)


def test_feature_matching_by_hand():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
    fake = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])  # mean (1, 1)
    assert float(losses.feature_matching_loss(real, fake)) == pytest.approx(1.0 ** 2 + 2.0 ** 2)


def test_wasserstein_losses_by_hand():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert float(losses.critic_loss(real, fake)) == pytest.approx(-1 / 3 - 2.0)
    assert float(losses.wasserstein_generator_loss(fake)) == pytest.approx(1 / 3)


def test_gradient_penalty_zero_for_unit_norm_linear_critic():
    critic = torch.nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8]]))  # ||w|| = 1: 1-Lipschitz with unit slope everywhere
    real, fake = torch.randn(16, 2), torch.randn(16, 2) * 5
    t = torch.rand(16)
    assert float(losses.gradient_penalty(critic, real, fake, t).detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        critic.weight.mul_(3.0)  # ||grad|| = 3 everywhere: (3 - 1)^2
    assert float(losses.gradient_penalty(critic, real, fake, t).detach()) == pytest.approx(4.0, rel=1e-6)


def test_gradient_penalty_is_taken_at_the_interpolates():
    x_hat = losses.interpolates(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]]), torch.tensor([0.25]))
    assert x_hat.tolist() == [[0.5, 3.0]]

    def critic(x):  # l(x) = ||x||^2 / 2: gradient x, so the penalty is (||x_hat|| - 1)^2
        return 0.5 * x.pow(2).sum(dim=1)

    penalty = losses.gradient_penalty(critic, torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]]),
                                      torch.tensor([0.25]))
    assert float(penalty.detach()) == pytest.approx((math.hypot(0.5, 3.0) - 1.0) ** 2, rel=1e-6)


def test_r1_penalty_by_hand():
    real = torch.randn(8, 2, requires_grad=True)
    logits = real @ torch.tensor([3.0, 4.0])
    assert float(losses.r1_penalty(logits, real).detach()) == pytest.approx(0.5 * 25.0, rel=1e-6)


def test_coverage_loss_by_hand():
    real = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    fake = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], requires_grad=True)
    # squared distances to the nearest fake: row 0 -> (1, 0) at 1; row 1 -> (3, 1) at 1
    loss = losses.coverage_loss(real, fake)
    assert float(loss.detach()) == pytest.approx(1.0)
    # only each real row's nearest fake is pulled, towards that row: d/df (1/2)||x - f||^2 summed
    loss.backward()
    assert fake.grad.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    # conditional: a row's nearest fake among its own class only
    eye = torch.eye(2)
    real_labels, fake_labels = eye[[0, 1]], eye[[1, 0, 0]]
    # row 0 (class 0) -> fakes 1, 2: min(4, 10) = 4; row 1 (class 1) -> fake 0: 4
    assert float(losses.coverage_loss(real, fake.detach(), real_labels, fake_labels)) == pytest.approx(4.0)


def test_coverage_weight_auto_is_on_for_low_dimensional_mlp_rows_only():
    rows = quick(steps=2).fit(np.random.default_rng(0).normal(size=(100, 2)))
    assert rows.fitted_params()["coverage_weight"] == 3.0
    wide = quick(steps=2).fit(np.random.default_rng(0).normal(size=(100, 16)))
    assert wide.fitted_params()["coverage_weight"] == 0.0
    assert quick(steps=2, coverage_weight=0.25).fit(np.zeros((100, 2))).fitted_params()["coverage_weight"] == 0.25


# ---- layers ---------------------------------------------------------------------------------

def test_minibatch_discrimination_shapes_and_batch_dependence():
    torch.manual_seed(0)
    layer = nets.MinibatchDiscrimination(in_features=6, kernels=5, kernel_dim=3)
    f = torch.randn(10, 6)
    out = layer(f)
    assert out.shape == (10, 6 + 5)
    torch.testing.assert_close(out[:, :6], f)  # the features pass through, the closeness is appended
    assert ((out[:, 6:] >= 0) & (out[:, 6:] <= 1)).all()  # a mean of exp(-L1) over the other rows

    changed = f.clone()
    changed[7] += 0.5  # change ONE sample of the batch ...
    out2 = layer(changed)
    assert not torch.allclose(out2[0, 6:], out[0, 6:])  # ... and row 0's output changes
    torch.testing.assert_close(out2[0, :6], out[0, :6])

    # A collapsed batch (all rows equal) has the largest closeness, 1.
    collapsed = layer(f[:1].expand(4, 6))
    torch.testing.assert_close(collapsed[:, 6:], torch.ones(4, 5))

    # Against fixed references, a row's output no longer depends on the rest of the batch.
    reference = torch.randn(12, 6)
    torch.testing.assert_close(layer(f, reference)[:3], layer(f[:3], reference))


def test_packing_concatenates_consecutive_rows():
    x = torch.arange(12.0).reshape(6, 2)
    packed = nets.pack_rows(x, 3)
    assert packed.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    images = torch.randn(4, 1, 8, 8)
    assert nets.pack_rows(images, 2).shape == (2, 2, 8, 8)
    torch.testing.assert_close(nets.pack_rows(images, 2)[1, 1], images[3, 0])
    with pytest.raises(ValueError, match="pack"):
        nets.pack_rows(x, 4)


def test_fourier_features_switch_on_from_coarse_to_fine():
    layer = nets.FourierFeatures(n_features=2, n_frequencies=64, seed=0)
    magnitudes = layer.B.norm(dim=0)
    assert magnitudes.min() >= nets.FOURIER_LOW - 1e-6 and magnitudes.max() <= nets.FOURIER_HIGH + 1e-6
    x = torch.randn(5, 2)
    out = layer(x)
    assert out.shape == (5, 2 + 2 * 64)
    torch.testing.assert_close(out[:, :2], x)  # the coordinates themselves always pass through
    assert (layer.weights() >= 0.5).all()  # level 1 (trained, exported): every frequency on
    layer.level.fill_(0.0)
    assert (layer.weights() == 0).all() and (layer(x)[:, 2:] == 0).all()  # start: coordinates only
    layer.level.fill_(0.3)
    on = layer.weights() > 0
    assert on.any() and not on.all()
    assert magnitudes[on].max() < magnitudes[~on].min()  # the low frequencies come first


# ---- the estimator ------------------------------------------------------------------------------

def blobs(n: int, centres: np.ndarray, seed: int, sd: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), size=n)
    return centres[labels] + sd * rng.standard_normal((n, centres.shape[1])), labels


CENTRES = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])


def toy_dataset(n_train: int = 600) -> Dataset:
    X_train, y_train = blobs(n_train, CENTRES, 0)
    X_test, y_test = blobs(300, CENTRES, 1)
    return Dataset("blobs", X_train, X_test, y_train, y_test)


def quick(**params) -> GenerativeAdversarialNetwork:
    # Small and plain unless a test asks otherwise (independent of the family's default recipe).
    settings = dict(hidden=32, layers=2, latent_dim=4, steps=20, batch_size=32, verbose=False, device="cpu",
                    generator_activation="relu", fourier_features=0, pack=1, r1_weight=0.0, resample=1)
    return GenerativeAdversarialNetwork(**{**settings, **params})


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|: zero exactly when the two distributions are equal."""
    def mean_distance(u, v):
        return float(np.linalg.norm(u[:, None] - v[None], axis=2).mean())
    return 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)


@pytest.mark.parametrize("params", [
    dict(),
    dict(pack=4, minibatch_discrimination=True, conditional=True),
    dict(loss="wgan-gp", feature_matching=True, d_steps=2),
    dict(generator_activation="tanh", fourier_features=16, r1_weight=0.1, pack=2, label_smoothing=True),
    dict(generator_activation="tanh", fourier_features=16, resample=8, classifier_steps=30),
    dict(pack=2, conditional=True, resample=3, classifier_steps=10),
])
def test_onnx_parity_sample_and_anomaly_mlp(params, tmp_path):
    data = toy_dataset(200)
    model = quick(**params).fit_dataset(data)
    graphs = {g.name: g for g in model.export_graphs()}
    assert set(graphs) == {"sample", "anomaly"}  # no score graph: a GAN has no density
    for name, graph in graphs.items():
        feeds = model.check_feeds(graph, data, 64)
        result = export_and_check(graph, tmp_path, feeds, tolerance=1e-4)
        assert result.max_rel_diff <= 1e-4, name
    # The anomaly graph is the estimator's anomaly score, row by row.
    x = data.X_test[:64].astype(np.float32)
    with torch.no_grad():
        graph_out = graphs["anomaly"].module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(graph_out, model.anomaly_score(x), rtol=1e-5, atol=1e-5)


def test_onnx_parity_conv_on_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(96, 64))
    data = Dataset("noise-images", images[:64], images[64:], rng.integers(0, 3, 64), rng.integers(0, 3, 32),
                   image_shape=(8, 8))
    model = quick(architecture="conv", channels=4, conditional=True, pack=2, resample=3, classifier_steps=5)
    model.fit_dataset(data)
    samples = model.sample(5, seed=0, label=2).numpy()
    assert samples.shape == (5, 64)
    assert samples.min() >= images[:64].min() - 1e-6 and samples.max() <= images[:64].max() + 1e-6
    for graph in model.export_graphs():
        assert export_and_check(graph, tmp_path, model.check_feeds(graph, data, 32)).max_rel_diff <= 1e-4


def test_anomaly_score_of_a_row_does_not_depend_on_the_batch():
    data = toy_dataset(200)
    model = quick(pack=2, minibatch_discrimination=True, conditional=True).fit_dataset(data)
    x = data.X_test[:40]
    np.testing.assert_allclose(model.anomaly_score(x[:7]), model.anomaly_score(x)[:7], rtol=1e-5, atol=1e-6)


def test_sampling_reproducible_by_seed():
    model = quick().fit_dataset(toy_dataset(200))
    a, b = model.sample(50, seed=4), model.sample(50, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, model.sample(50, seed=5))
    torch.testing.assert_close(model.sample(10, seed=4), a[:10])  # noise rows are drawn in order


def test_fit_is_deterministic_given_random_state():
    data = toy_dataset(200)
    a = quick(random_state=3).fit_dataset(data).sample(20, seed=0)
    b = quick(random_state=3).fit_dataset(data).sample(20, seed=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_moves_samples_toward_the_data():
    data = toy_dataset()
    untrained = quick(steps=1, learning_rate=1e-6).fit_dataset(data)
    trained = quick(steps=300, learning_rate=2e-3, batch_size=64).fit_dataset(data)
    before = energy_distance(untrained.sample(400, seed=0).numpy(), data.X_test)
    after = energy_distance(trained.sample(400, seed=0).numpy(), data.X_test)
    assert after < 0.5 * before, (before, after)
    assert len(trained.history_) >= 10 and {"step", "d_loss", "g_loss", "d_real", "d_fake"} <= set(trained.history_[0])


def test_conditional_sampling_honours_the_label():
    data = toy_dataset()
    model = quick(conditional=True, steps=300, learning_rate=2e-3, batch_size=64).fit_dataset(data)
    assert model.num_classes == 3
    for c in range(3):
        samples = model.sample(200, seed=c, label=c).numpy()
        nearest = np.linalg.norm(samples[:, None] - CENTRES[None], axis=2).argmin(axis=1)
        assert (nearest == c).mean() > 0.9, (c, np.bincount(nearest, minlength=3))
    with pytest.raises(ValueError, match="label"):
        model.sample(3, seed=0)


def test_calibration_uses_rows_held_out_of_the_fit():
    data = toy_dataset(200)
    model = quick(calibration_fraction=0.2).fit_dataset(data)
    assert len(model.calibration_rows_) == 40
    held_out = {tuple(r) for r in model.calibration_rows_}
    assert len(held_out & {tuple(r) for r in model.core_.reference.numpy()}) == 0
    scores = model.calibration_scores(data, folds=5)
    assert scores.shape == (40,) and np.all(np.isfinite(scores))
    assert quick(calibration_fraction=0.0).fit_dataset(data).calibration_scores(data, 5) is None


@pytest.mark.parametrize("params, message", [
    (dict(architecture="resnet"), "architecture: expected one of"),
    (dict(loss="hinge"), "loss: expected one of"),
    (dict(pack=3, batch_size=32), "batch_size: expected a multiple of pack=3"),
    (dict(label_smoothing=True, loss="wgan-gp"), "label_smoothing: only with"),
    (dict(steps=0), "steps: expected a positive integer"),
    (dict(learning_rate=2.0), "learning_rate"),
    (dict(calibration_fraction=0.7), "calibration_fraction"),
    (dict(conditional=True), "conditional=True needs class labels"),
    (dict(architecture="conv"), "not a square image"),
    (dict(resample=0), "resample: expected a positive integer"),
    (dict(classifier_steps=0), "classifier_steps: expected a positive integer"),
    (dict(coverage_weight=-1.0), "coverage_weight: expected auto or a finite number >= 0"),
    (dict(coverage_weight="most"), "coverage_weight: expected auto or a finite number >= 0"),
])
def test_parameters_are_validated(params, message):
    x = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(ValueError, match=message):
        quick(**params).fit(x)


# ---- importance resampling ----------------------------------------------------------------------

def test_resampling_choice_is_the_inverse_cdf_of_the_softmax():
    u = torch.linspace(0.0005, 0.9995, 1000)
    # One candidate with an overwhelming logit is always picked, wherever it sits.
    for winner in (0, 3, 7):
        logits = torch.zeros(1000, 8)
        logits[:, winner] = 60.0
        assert (resampling.choose(logits, u) == winner).all()
    # Equal logits: uniform over the candidates (u evenly spread: exactly equal counts) ...
    counts = torch.bincount(resampling.choose(torch.zeros(1000, 4), u), minlength=4)
    assert counts.tolist() == [250, 250, 250, 250]
    # ... and with random uniforms, within a tolerance; logits (0, log 3) pick the second 3/4 of the time.
    draws = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(resampling.choose(torch.zeros(20000, 5), draws), minlength=5) / 20000
    assert (frequencies - 0.2).abs().max() < 0.015, frequencies
    weighted = resampling.choose(torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2), draws)
    assert float(weighted.float().mean()) == pytest.approx(0.75, abs=0.015)
    # u at the very top never indexes past the last candidate (the cumulative sum may end below 1).
    assert int(resampling.choose(torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([1.0]))) == 2
    # pick returns the chosen candidate of each row.
    candidates = torch.arange(24.0).reshape(3, 4, 2)
    assert resampling.pick(candidates, torch.tensor([2, 0, 3])).tolist() == [[4, 5], [8, 9], [22, 23]]


class _FavourFar(torch.nn.Module):
    """A hand-set classifier: logit = weight where the first coordinate exceeds 5, else 0."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x, onehot=None):
        return self.weight * (x[:, 0] > 5).to(x.dtype)


def test_resampled_graph_follows_a_hand_set_classifier(tmp_path):
    model = quick().fit_dataset(toy_dataset(200))
    base = model.core_
    n, m = 4000, 6

    def core(weight):
        return GANCore(base.generator, base.discriminator, torch.zeros(2), torch.ones(2), (2,), 4, 0,
                       base.reference, None, _FavourFar(weight), m).eval()

    class Identity(torch.nn.Module):
        def forward(self, z, onehot=None):
            return z[:, :2]

    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.standard_normal((n, m, 4)).astype(np.float32))
    u = torch.from_numpy(rng.random(n).astype(np.float32))
    winner = torch.from_numpy(rng.integers(0, m, n))
    far = z.clone()
    far[torch.arange(n), winner, 0] = 10.0  # one candidate per row with an overwhelming logit (50 vs 0)
    with torch.no_grad():
        overwhelming = core(50.0)
        overwhelming.generator = Identity()
        out = overwhelming.sample_from_noise(far, u)
        torch.testing.assert_close(out, far[torch.arange(n), winner, :2], rtol=0, atol=0)  # picked every time
        flat = core(0.0)
        flat.generator = Identity()
        chosen = (flat.sample_from_noise(z, u)[:, None, :] == z[:, :, :2]).all(dim=2).float().argmax(dim=1)
    frequencies = torch.bincount(chosen, minlength=m) / n
    assert (frequencies - 1 / m).abs().max() < 0.03, frequencies  # equal logits: uniform choice


def test_resampling_noise_inputs_and_reproducibility_by_seed():
    data = toy_dataset(200)
    plain = quick().fit_dataset(data)
    assert [(s.name, s.shape) for s in plain.export_graphs()[0].inputs] == [("z", [-1, 4])]  # unchanged graph
    assert plain.core_.classifier is None and "classifier_holdout_loss" not in plain.fitted_params()
    model = quick(resample=5, classifier_steps=20).fit_dataset(data)
    specs = model.export_graphs()[0].inputs
    assert [(s.name, s.shape, s.noise) for s in specs] == [("z", [-1, 5, 4], "normal"), ("u", [-1], "uniform")]
    a = model.sample(50, seed=4)
    torch.testing.assert_close(a, model.sample(50, seed=4), rtol=0, atol=0)
    assert not torch.allclose(a, model.sample(50, seed=5))
    params = model.fitted_params()
    assert params["resample"] == 5 and params["classifier_steps"] == 20
    assert 0 <= params["classifier_holdout_accuracy"] <= 1 and params["classifier_holdout_loss"] > 0


def test_classifier_training_lowers_its_held_out_loss():
    data = toy_dataset(400)
    model = quick(steps=5).fit_dataset(data)  # a poor generator: easy to tell from the data
    core = model.core_
    torch.manual_seed(0)
    classifier = nets.mlp_discriminator(2, 32, 2)
    held_out = (torch.from_numpy(data.X_test).float() - core.shift) / core.scale
    before = resampling.evaluate_classifier(classifier, core.generator, held_out, None, 4, 0, seed=0)
    train = (torch.from_numpy(data.X_train).float() - core.shift) / core.scale
    history = resampling.train_classifier(classifier, core.generator, train, None, 4, 0, steps=200,
                                          batch_size=64, learning_rate=3e-3, seed=0)
    after = resampling.evaluate_classifier(classifier, core.generator, held_out, None, 4, 0, seed=0)
    assert after["loss"] < 0.5 * before["loss"] and after["loss"] < math.log(2), (before, after)
    assert after["accuracy"] > 0.9, after
    assert len(history) == 10 and history[-1]["loss"] < history[0]["loss"]
