"""Generative adversarial network (``gan``): a generator and a discriminator in a min-max game.

The game (Goodfellow et al. 2014): a generator G maps noise z ~ N(0, I) to samples, a
discriminator D(x) = sigmoid(l(x)) tells data from samples, and

    min_G max_D  E_x log D(x) + E_z log(1 - D(G(z))).

For a fixed G the best discriminator is D*(x) = p_data(x) / (p_data(x) + p_G(x)), and against it
the generator minimises 2 JS(p_data || p_G) - log 4, whose minimum is p_G = p_data. In practice
the two players take alternating gradient steps (``gan_training``) with the losses of
``gan_losses``: the non-saturating generator loss, one-sided label smoothing, feature matching,
minibatch discrimination and PacGAN packing (``gan_networks``), or WGAN-GP; and, against mode
dropping, IMLE's coverage term (Li and Malik 2018): every real row of a batch pulls its nearest
fake towards it, so a mode the generator has left still pulls it back (on by default for MLPs
on rows of d <= 3; measured in ``bench/g1_grid25_modes.py``).

What is served:

* ``sample`` — z [N, latent_dim] (noise, drawn by the server from the request's seed) and, when
  ``conditional``, ``label`` int64 [N] -> samples [N, d]. G is deterministic given its inputs.
  With ``resample`` = M > 1 (``gan_resampling``): z [N, M, latent_dim] gives M candidates per
  row, a separate per-sample classifier c(x) ~ log p_data(x) / p_G(x) (trained after the game on
  the frozen G) weighs them, and u [N] (uniform) picks one with probability softmax(c) —
  importance resampling that removes most of the mass G puts where the data has none.
* ``anomaly`` — rows [N, d] -> score [N] = -l(x), the negated discriminator logit (or WGAN
  critic value): higher = more anomalous. Its threshold is a quantile of this score on training
  rows *held out of the fit* (``calibration_fraction``), because the discriminator has seen
  every training row and scores them more favourably than new ones. A packed discriminator
  judges x together with fixed real companion rows (averaged over ``COMPANION_SETS`` sets); a
  minibatch-discriminating one compares x with fixed real reference rows instead of a batch;
  a conditional one scores x under its most favourable class, -max_c l(x, c). So a row's score
  never depends on the other rows of the request.

There is no ``score`` graph: a GAN has no tractable density. The discriminator's score is not
one either (see ``card_limits``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from serving.repository.noise import draw_noise
from training.estimators import gan_networks as nets
from training.estimators import gan_resampling as resampling
from training.estimators.base import ExportGraph, GenerativeEstimator, as_float64
from training.estimators.gan_training import TrainConfig, train_gan
from training.neural import distributed_from_env, pick_device, unwrap

ARCHITECTURES = ("mlp", "conv")
LOSSES = ("nonsaturating", "wgan-gp")
SMOOTHED_REAL_TARGET = 0.9
REFERENCE_PACKS = 32  # real packs standing in for "the batch" when minibatch discrimination scores rows
COMPANION_SETS = 4  # sets of real companion rows a packed discriminator scores a row with
SCORE_CHUNK = 512  # rows per discriminator pass when the estimator scores many rows
COVERAGE_WEIGHT = 3.0  # "auto" coverage weight for MLPs on low-dimensional rows (see _resolve)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Train on one CPU thread: these networks' matrix products are too small to split. Measured on
    the shared 2-core machine, 100 steps of the G1 recipe took 4.5 s on 1 thread and 87 s on 2
    (the threads wait on each other whenever another process holds a core)."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class GANCore(nn.Module):
    """The fitted generator and discriminator in data space: what the two exported graphs run."""

    def __init__(self, generator: nn.Module, discriminator: nets.Discriminator, shift: torch.Tensor,
                 scale: torch.Tensor, row_shape: tuple[int, ...], latent_dim: int, num_classes: int,
                 reference: torch.Tensor, reference_labels: torch.Tensor | None,
                 classifier: nets.Discriminator | None = None, resample: int = 1):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        # The per-sample density-ratio classifier and the candidates per sample (1 = no resampling).
        self.classifier, self.resample = classifier, int(resample) if classifier is not None else 1
        self.row_shape, self.latent_dim, self.num_classes = row_shape, latent_dim, num_classes
        self.pack = discriminator.pack
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.register_buffer("eye", torch.eye(max(num_classes, 1)))
        # Real rows (normalised) for companions and minibatch references, with their labels.
        self.register_buffer("reference", reference)
        self.register_buffer("reference_onehot", None if reference_labels is None else self.eye[reference_labels])

    # ---- sampling ---------------------------------------------------------------------------
    def noise_specs(self) -> list[TensorSpec]:
        """z [N, latent]; with resampling z [N, M, latent] (M fixed at export) and u [N]."""
        if self.resample == 1:
            return [TensorSpec(name="z", shape=[-1, self.latent_dim], noise="normal")]
        return [TensorSpec(name="z", shape=[-1, self.resample, self.latent_dim], noise="normal"),
                TensorSpec(name="u", shape=[-1], noise="uniform")]

    def sample_from_noise(self, z: torch.Tensor, u: torch.Tensor | None = None,
                          label: torch.Tensor | None = None) -> torch.Tensor:
        """z [N, latent] (+ label int64 [N]) -> rows [N, d] in data units; with resampling z
        [N, M, latent] and u [N]: one of each row's M candidates, by the classifier's weights."""
        onehot = self.eye[label] if self.num_classes else None
        if self.resample == 1:
            out = self.generator(z.to(self.shift.dtype), onehot)
            return (self.shift + self.scale * out).flatten(1)
        n, m = z.shape[0], self.resample
        if onehot is not None:  # every candidate of a row has the row's label
            onehot = onehot.unsqueeze(1).expand(n, m, onehot.shape[1]).reshape(n * m, onehot.shape[1])
        candidates = self.generator(z.to(self.shift.dtype).reshape(n * m, self.latent_dim), onehot)
        logits = self.classifier(candidates, onehot).reshape(n, m)
        out = resampling.pick(candidates.reshape(n, m, *self.row_shape), resampling.choose(logits, u))
        return (self.shift + self.scale * out).flatten(1)

    # ---- the discriminator's anomaly score ------------------------------------------------------
    def _references(self) -> torch.Tensor | None:
        """Features of fixed real packs: the "other rows" of minibatch discrimination at scoring time."""
        if self.discriminator.minibatch is None:
            return None
        rows = self.reference[: REFERENCE_PACKS * self.pack]
        onehot = None if self.reference_onehot is None else self.reference_onehot[: len(rows)]
        return self.discriminator.features(rows, onehot)

    def _logit(self, x: torch.Tensor, onehot: torch.Tensor | None, references: torch.Tensor | None) -> torch.Tensor:
        """l(x) [N] for normalised rows x [N, C, ...]: each row packed with real companions, averaged."""
        if self.pack == 1:
            return self.discriminator(x, onehot, references)
        n, m = x.shape[0], self.pack
        total = x.new_zeros(n)
        for s in range(COMPANION_SETS):
            start = (m - 1) * s
            companions = self.reference[start:start + m - 1]
            rows = torch.cat([x.unsqueeze(1), companions.unsqueeze(0).expand(n, *companions.shape)], dim=1)
            labels = None
            if onehot is not None:
                others = self.reference_onehot[start:start + m - 1]
                labels = torch.cat([onehot.unsqueeze(1), others.unsqueeze(0).expand(n, *others.shape)], dim=1)
                labels = labels.reshape(n * m, -1)
            total = total + self.discriminator(rows.reshape(n * m, *x.shape[1:]), labels, references)
        return total / COMPANION_SETS

    def anomaly(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, d] -> -l(x) [N]; conditional: -max_c l(x, c)."""
        x = (rows.to(self.shift.dtype).reshape(-1, *self.row_shape) - self.shift) / self.scale
        references = self._references()
        if not self.num_classes:
            return -self._logit(x, None, references)
        n = x.shape[0]
        per_class = [self._logit(x, self.eye[c].unsqueeze(0).expand(n, self.num_classes), references)
                     for c in range(self.num_classes)]
        return -torch.stack(per_class, dim=1).amax(dim=1)


class _SampleGraph(nn.Module):
    def __init__(self, core: GANCore):
        super().__init__()
        self.core = core

    def forward(self, z: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """Inputs in the manifest's order: z, [u (resampling)], [label (conditional)]."""
        u = rest[0] if self.core.resample > 1 else None
        label = rest[-1] if self.core.num_classes else None
        return self.core.sample_from_noise(z, u, label).to(torch.float32)


class _AnomalyGraph(nn.Module):
    def __init__(self, core: GANCore):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.anomaly(x).to(torch.float32)


class GenerativeAdversarialNetwork(GenerativeEstimator):
    """Generative adversarial network: a generator trained against a discriminator (samples; discriminator anomaly score)."""

    family = "gan"
    card_limits = (
        "A GAN has **no density**: there is no log-likelihood and no `score` graph. The anomaly score "
        "is the negated discriminator logit -l(x) (the critic's value for WGAN-GP). A discriminator is "
        "not a density: it was trained to separate the data from *the generator of the moment*, so its "
        "score ranks rows by how data-like they look *compared with that generator's samples*, drifts "
        "from one training run (or step) to the next, and is poorly calibrated far from the data, where "
        "it saw neither data nor samples and its value is an extrapolation (it may even call a far-away "
        "row typical). The threshold is a quantile of the score on training rows held out of the fit; "
        "treat flags as a screening signal, not as probabilities. Samples may miss modes of the data "
        "(mode collapse) without any figure of the fit saying so: check the sample picture. With "
        "`resample` > 1 each sample is one of that many generator candidates, picked with probability "
        "softmax of a per-sample classifier's logits (an estimate of log p_data/p_G): this removes most "
        "samples that fall where the data has none, but cannot restore a mode the generator never "
        "reaches, and the classifier's estimate is only as good as its held-out accuracy suggests.")

    def __init__(self, architecture: str = "mlp", loss: str = "nonsaturating", latent_dim: int | str = "auto",
                 hidden: int = 256, layers: int = 3, channels: int = 32, generator_activation: str = "tanh",
                 fourier_features: int | str = "auto", fourier_anneal: float = 0.75, pack: int = 4,
                 label_smoothing: bool = False, feature_matching: bool = False,
                 minibatch_discrimination: bool = False, gp_weight: float = 10.0, r1_weight: float = 0.0125,
                 steps: int = 3000, batch_size: int = 256, d_steps: int | None = None,
                 learning_rate: float = 1e-3, generator_ema: float = 0.0, coverage_weight: float | str = "auto",
                 resample: int = 16, classifier_steps: int = 1000, conditional: bool = False,
                 calibration_fraction: float = 0.1, device: str = "auto", random_state: int = 0,
                 verbose: bool = True):
        self.architecture = architecture
        self.loss = loss
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.layers = layers
        self.channels = channels
        self.generator_activation = generator_activation
        self.fourier_features = fourier_features
        self.fourier_anneal = fourier_anneal
        self.pack = pack
        self.label_smoothing = label_smoothing
        self.feature_matching = feature_matching
        self.minibatch_discrimination = minibatch_discrimination
        self.gp_weight = gp_weight
        self.r1_weight = r1_weight
        self.steps = steps
        self.batch_size = batch_size
        self.d_steps = d_steps
        self.learning_rate = learning_rate
        self.generator_ema = generator_ema
        self.coverage_weight = coverage_weight
        self.resample = resample
        self.classifier_steps = classifier_steps
        self.conditional = conditional
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.image_shape: tuple[int, int] | None = None

    # ---- parameters ---------------------------------------------------------------------------
    _PARAMS = ("architecture", "loss", "latent_dim", "hidden", "layers", "channels", "generator_activation",
               "fourier_features", "fourier_anneal", "pack", "label_smoothing", "feature_matching",
               "minibatch_discrimination", "gp_weight", "r1_weight", "steps", "batch_size", "d_steps",
               "learning_rate", "generator_ema", "coverage_weight", "resample", "classifier_steps", "conditional",
               "calibration_fraction", "device", "random_state", "verbose")

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAMS}

    def fitted_params(self) -> dict[str, Any]:
        chosen = {**self.get_params(), "d_steps": self._d_steps()}
        if hasattr(self, "latent_dim_"):
            chosen.update(latent_dim=self.latent_dim_, fourier_features=self.fourier_features_,
                          coverage_weight=self.coverage_weight_)
        if getattr(self, "classifier_holdout_", None):
            # the resampling classifier on held-out real rows against fresh samples (BCE; log 2 = chance)
            chosen.update(classifier_holdout_loss=round(self.classifier_holdout_["loss"], 4),
                          classifier_holdout_accuracy=round(self.classifier_holdout_["accuracy"], 4))
        return chosen

    def _resolve(self, d: int) -> None:
        """"auto": z has the data's dimension (at least 2, at most 32); for MLPs on low-dimensional
        rows (d <= 3), Fourier features (128 frequencies), where fine detail is hard to learn, and
        the coverage term at weight 3, where a batch of fakes covers the space densely enough for
        "the nearest fake" to mean "the fake of this mode" (in pixel space it would mean "the
        least unlike image" and pull samples towards blurred averages)."""
        self.latent_dim_ = min(max(d, 2), 32) if self.latent_dim == "auto" else self.latent_dim
        low_dimensional_rows = self.architecture == "mlp" and d <= 3
        if self.fourier_features == "auto":
            self.fourier_features_ = 128 if low_dimensional_rows else 0
        else:
            self.fourier_features_ = self.fourier_features
        if self.coverage_weight == "auto":
            # 3: on grid25 (bench/g1_grid25_modes.py) weight 1 still let one seed of ten drop two
            # modes; 3 and 10 kept all 25 on twenty seeds (10 at a slightly lower share on the modes)
            self.coverage_weight_ = COVERAGE_WEIGHT if low_dimensional_rows else 0.0
        else:
            self.coverage_weight_ = float(self.coverage_weight)

    def _d_steps(self) -> int:
        """WGAN-GP's critic takes 5 steps per generator step (Gulrajani et al.); the BCE game takes 1."""
        if self.d_steps is not None:
            return self.d_steps
        return 5 if self.loss == "wgan-gp" else 1

    def _validate_params(self) -> None:
        _check(self.architecture in ARCHITECTURES,
               f"architecture: expected one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        _check(self.loss in LOSSES, f"loss: expected one of {list(LOSSES)}, got {self.loss!r}")
        for name in ("latent_dim", "hidden", "layers", "channels", "pack", "steps", "batch_size", "resample",
                     "classifier_steps"):
            value = getattr(self, name)
            if name == "latent_dim" and value == "auto":
                continue
            _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
                   f"{name}: expected a positive integer, got {value!r}")
        _check(self.generator_activation in nets.GENERATOR_ACTIVATIONS,
               f"generator_activation: expected one of {list(nets.GENERATOR_ACTIVATIONS)}, "
               f"got {self.generator_activation!r}")
        _check(self.fourier_features == "auto" or (isinstance(self.fourier_features, (int, np.integer))
                                                   and not isinstance(self.fourier_features, bool)
                                                   and self.fourier_features >= 0),
               f"fourier_features: expected 'auto' or an integer >= 0 (0 = off), got {self.fourier_features!r}")
        _check(self.fourier_features in ("auto", 0) or self.architecture == "mlp",
               "fourier_features: only with architecture='mlp' (they encode low-dimensional coordinates)")
        _check(isinstance(self.fourier_anneal, (int, float)) and 0 <= self.fourier_anneal <= 1,
               f"fourier_anneal: expected a share of the steps in [0, 1], got {self.fourier_anneal!r}")
        _check(self.d_steps is None or (isinstance(self.d_steps, int) and self.d_steps >= 1),
               f"d_steps: expected a positive integer or None (1, or 5 for wgan-gp), got {self.d_steps!r}")
        _check(self.batch_size % self.pack == 0,
               f"batch_size: expected a multiple of pack={self.pack}, got {self.batch_size}")
        for name in ("label_smoothing", "feature_matching", "minibatch_discrimination", "conditional", "verbose"):
            _check(isinstance(getattr(self, name), (bool, np.bool_)),
                   f"{name}: expected True or False, got {getattr(self, name)!r}")
        _check(not (self.label_smoothing and self.loss == "wgan-gp"),
               "label_smoothing: only with loss='nonsaturating' (a WGAN critic has no targets to smooth)")
        for name in ("gp_weight", "r1_weight", "coverage_weight"):
            value = getattr(self, name)
            _check((name == "coverage_weight" and value == "auto")
                   or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                       and value >= 0),
                   f"{name}: expected {'auto or ' if name == 'coverage_weight' else ''}a finite number >= 0, "
                   f"got {value!r}")
        _check(isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1,
               f"learning_rate: expected a number in (0, 1), got {self.learning_rate!r}")
        _check(isinstance(self.generator_ema, (int, float)) and 0 <= self.generator_ema < 1,
               f"generator_ema: expected a decay in [0, 1) (0 = off), got {self.generator_ema!r}")
        _check(isinstance(self.calibration_fraction, (int, float)) and 0 <= self.calibration_fraction < 0.5,
               f"calibration_fraction: expected a share in [0, 0.5), got {self.calibration_fraction!r}")
        pick_device(self.device)

    # ---- fitting ------------------------------------------------------------------------------
    def fit_dataset(self, data: Any) -> "GenerativeAdversarialNetwork":
        self.image_shape = data.image_shape
        return self.fit(data.X_train, data.y_train if self.uses_labels else None)

    def _row_shape(self, d: int) -> tuple[int, ...]:
        if self.architecture == "mlp":
            return (d,)
        shape = self.image_shape
        if shape is None:  # rows of a square image, e.g. 64 -> 8x8
            side = math.isqrt(d)
            _check(side * side == d, f"architecture='conv' needs image rows; {d} features are not a square image")
            shape = (side, side)
        _check(shape[0] * shape[1] == d, f"image_shape {shape} does not match {d} features")
        nets.check_image_shape(shape)
        return (1, *shape)

    def _labels(self, y: Any, n: int) -> np.ndarray | None:
        if not self.conditional:
            return None
        _check(y is not None, "conditional=True needs class labels y")
        labels = np.asarray(y)
        _check(labels.shape == (n,), f"y: expected {n} labels, got shape {labels.shape}")
        _check(np.issubdtype(labels.dtype, np.integer) or np.all(np.mod(labels, 1) == 0),
               "y: expected integer class labels 0..K-1")
        labels = labels.astype(np.int64)
        _check(labels.min() >= 0 and labels.max() >= 1,
               f"y: expected class labels 0..K-1 with K >= 2, got values in [{labels.min()}, {labels.max()}]")
        return labels

    def _networks(self, d: int, row_shape: tuple[int, ...], k: int) -> tuple[nn.Module, nets.Discriminator]:
        if self.architecture == "mlp":
            return (nets.MLPGenerator(self.latent_dim_, d, self.hidden, self.layers, k, self.generator_activation),
                    nets.mlp_discriminator(d, self.hidden, self.layers, k, self.pack, self.minibatch_discrimination,
                                           self.fourier_features_, seed=self.random_state))
        image = tuple(row_shape[1:])
        return (nets.ConvGenerator(self.latent_dim_, image, self.channels, k),
                nets.conv_discriminator(image, self.channels, k, self.pack, self.minibatch_discrimination))

    def _normaliser(self, x: torch.Tensor, row_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP: per-feature standardisation. Conv: one affine map of the data range onto [0, 1]
        (the generator ends in a sigmoid, so its images stay inside the data's range)."""
        if self.architecture == "mlp":
            shift, scale = x.mean(dim=0), x.std(dim=0)
            scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
        else:
            lo, hi = x.min(), x.max()
            shift, scale = lo.expand(row_shape), (hi - lo if hi > lo else torch.ones_like(hi)).expand(row_shape)
        return shift.reshape(row_shape).float().clone(), scale.reshape(row_shape).float().clone()

    def fit(self, X: Any, y: Any = None) -> "GenerativeAdversarialNetwork":
        """Train on rows ``X`` [n, d] (and integer labels ``y`` [n] when ``conditional``)."""
        self._validate_params()
        x = as_float64(X)
        n, d = x.shape
        labels = self._labels(y, n)
        row_shape = self._row_shape(d)
        self._resolve(d)
        self.n_features_in_ = d
        self.num_classes = int(labels.max()) + 1 if labels is not None else None
        k = self.num_classes or 0

        # Hold rows out of the fit to calibrate the anomaly threshold on (see the module docstring).
        order = np.random.default_rng(self.random_state).permutation(n)
        n_cal = int(round(self.calibration_fraction * n))
        _check(n - n_cal >= self.pack * 4, f"X: {n} rows are too few to train on (after {n_cal} held out)")
        cal, fit_rows = order[:n_cal], order[n_cal:]
        self.calibration_rows_ = x[cal].numpy()
        shift, scale = self._normaliser(x[fit_rows], row_shape)
        train_x = ((x[fit_rows].float().reshape(-1, *row_shape)) - shift) / scale
        train_y = torch.from_numpy(labels[fit_rows]) if labels is not None else None

        torch.manual_seed(self.random_state)
        generator, discriminator = self._networks(d, row_shape, k)
        device = pick_device(self.device)
        config = TrainConfig(loss=self.loss, steps=self.steps, batch_size=self.batch_size,
                             learning_rate=self.learning_rate, d_steps=self._d_steps(),
                             real_target=SMOOTHED_REAL_TARGET if self.label_smoothing else 1.0,
                             feature_matching=self.feature_matching,
                             gp_weight=self.gp_weight if self.loss == "wgan-gp" else 0.0,
                             r1_weight=self.r1_weight, latent_dim=self.latent_dim_, num_classes=k,
                             betas=(0.5, 0.9) if self.loss == "wgan-gp" else (0.5, 0.999),
                             fourier_anneal=self.fourier_anneal if self.fourier_features_ else 0.0,
                             ema=float(self.generator_ema), coverage_weight=self.coverage_weight_)
        with distributed_from_env(device) as dist, _one_cpu_thread(device):
            g = dist.wrap(generator.to(device).train(), device)
            dsc = dist.wrap(discriminator.to(device).train(), device)
            self.history_, average = train_gan(g, dsc, train_x.to(device),
                                               None if train_y is None else train_y.to(device),
                                               config, dist, self.random_state, self.verbose)
        generator = (average if average is not None else unwrap(g)).eval()
        discriminator = unwrap(dsc).cpu().eval()
        for p in generator.parameters():
            p.requires_grad_(False)
        classifier, self.classifier_holdout_ = None, None
        if self.resample > 1:
            with _one_cpu_thread(device):
                classifier = self._fit_classifier(generator, d, row_shape, k, train_x, train_y, x[cal], labels,
                                                  cal, shift, scale, device)
        generator = generator.cpu()

        # Fixed real rows for scoring single rows (companions of packs, minibatch references).
        picked = np.random.default_rng(self.random_state + 1).permutation(len(fit_rows))
        picked = picked[: max(REFERENCE_PACKS, COMPANION_SETS) * self.pack]
        reference = train_x[picked]
        reference_labels = train_y[picked] if train_y is not None else None
        self.core_ = GANCore(generator, discriminator, shift, scale, row_shape, self.latent_dim_, k,
                             reference, reference_labels, classifier, self.resample).eval()
        for p in self.core_.parameters():
            p.requires_grad_(False)
        return self

    def _fit_classifier(self, generator: nn.Module, d: int, row_shape: tuple[int, ...], k: int,
                        train_x: torch.Tensor, train_y: torch.Tensor | None, held_out: torch.Tensor,
                        labels: np.ndarray | None, cal: np.ndarray, shift: torch.Tensor, scale: torch.Tensor,
                        device: torch.device) -> nets.Discriminator:
        """The per-sample density-ratio classifier for resampling (``gan_resampling``): the
        discriminator's architecture without packing or minibatch features (Fourier features all
        on), trained on the frozen generator; evaluated on the rows held out of the fit."""
        torch.manual_seed(self.random_state + 1)
        if self.architecture == "mlp":
            classifier = nets.mlp_discriminator(d, self.hidden, self.layers, k, 1, False, self.fourier_features_,
                                                seed=self.random_state)
        else:
            classifier = nets.conv_discriminator(tuple(row_shape[1:]), self.channels, k, 1, False)
        classifier = classifier.to(device)
        self.classifier_history_ = resampling.train_classifier(
            classifier, generator, train_x.to(device), None if train_y is None else train_y.to(device),
            self.latent_dim_, k, self.classifier_steps, self.batch_size, self.learning_rate, self.random_state)
        self.classifier_holdout_ = None
        if len(cal):
            rows = ((held_out.float().reshape(-1, *row_shape)) - shift) / scale
            held_labels = torch.from_numpy(labels[cal]).to(device) if labels is not None else None
            self.classifier_holdout_ = resampling.evaluate_classifier(
                classifier, generator, rows.to(device), held_labels, self.latent_dim_, k, self.random_state)
        for p in classifier.parameters():
            p.requires_grad_(False)
        return classifier.cpu().eval()

    # ---- using the fitted model ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "core_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def noise_specs(self) -> list[TensorSpec]:
        self._check_fitted()
        return self.core_.noise_specs()

    def _label_array(self, n: int, label: Any) -> torch.Tensor | None:
        if not self.num_classes:
            _check(label is None, "label: this GAN is not conditional")
            return None
        _check(label is not None, f"label: this GAN is conditional: give a class in [0, {self.num_classes - 1}]")
        labels = np.broadcast_to(np.asarray(label, dtype=np.int64), (n,))
        _check(bool(np.all((labels >= 0) & (labels < self.num_classes))),
               f"label: expected classes in [0, {self.num_classes - 1}]")
        return torch.from_numpy(labels.copy())

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, label: Any = None) -> torch.Tensor:
        """``n`` rows [n, d] from z drawn as the server draws it for ``seed`` (float32 maths, float64 out)."""
        self._check_fitted()
        noise = {k: torch.from_numpy(v) for k, v in draw_noise(self.noise_specs(), n, seed).items()}
        return self.core_.sample_from_noise(noise["z"], noise.get("u"), self._label_array(n, label)).double()

    @torch.no_grad()
    def anomaly_score(self, X: Any) -> np.ndarray:
        """-l(x) per row (higher = more anomalous), as the ``anomaly`` graph computes it."""
        self._check_fitted()
        x = as_float64(X)
        _check(x.shape[1] == self.n_features_in_,
               f"X has {x.shape[1]} features, the model was fitted on {self.n_features_in_}")
        # In chunks: minibatch discrimination compares every row with every reference pack.
        return torch.cat([self.core_.anomaly(chunk) for chunk in x.float().split(SCORE_CHUNK)]).double().numpy()

    def export_graphs(self) -> list[ExportGraph]:
        self._check_fitted()
        d = self.n_features_in_
        sample_inputs = list(self.noise_specs())
        if self.num_classes:
            sample_inputs.append(TensorSpec(name="label", shape=[-1], dtype="int64"))
        return [ExportGraph("sample", _SampleGraph(self.core_).eval(), sample_inputs,
                            [TensorSpec(name="samples", shape=[-1, d])]),
                ExportGraph("anomaly", _AnomalyGraph(self.core_).eval(), [TensorSpec(name="x", shape=[-1, d])],
                            [TensorSpec(name="score", shape=[-1])])]

    # ---- pipeline hooks ---------------------------------------------------------------------------
    def check_feeds(self, graph: ExportGraph, data: Any, rows: int) -> dict[str, np.ndarray]:
        return super().check_feeds(graph, data, min(rows, len(data.X_test)))

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray | None:
        """The anomaly score of the training rows held out of the fit (``calibration_fraction``)."""
        self._check_fitted()
        if len(self.calibration_rows_) == 0:
            return None
        return self.anomaly_score(self.calibration_rows_)

    def calibration_method(self, folds: int) -> str:
        return (f"quantile of -logit D(x) on {len(self.calibration_rows_)} training rows held out of "
                f"the GAN's fit")

    def evaluate(self, data: Any) -> dict[str, float]:
        from training.estimators.gan_metrics import sample_figures

        return sample_figures(self, data)

    def save_pictures(self, data: Any, folder: Any, title: str) -> None:
        from training.estimators.gan_pictures import save_gan_pictures

        save_gan_pictures(self, data, folder, title)
