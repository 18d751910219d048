"""``VariationalAutoencoder``: the VAE family (``genserve train vae``).

A latent-variable model p(x) = int p(x | z) p(z) dz with p(z) = N(0, I), trained by maximising
the ELBO with the reparameterisation trick and the closed-form Gaussian KL (``vae_losses``),
scored by the importance-weighted estimate of log p(x) (``vae_core``), early-stopped on held-out
rows (``vae_training``). MLP nets for rows, convolutional nets for images (``vae_networks``).

Why this decoder likelihood. The served score must be a density of x in nats, comparable with
the exact log-likelihoods of the other families (D1). A Bernoulli decoder on pixels in [0, 1] is a
probability mass on {0, 1}, not a density of continuous x; the continuous Bernoulli is a density
only with its normaliser C(lambda) included, and is a poor model of dequantised pixels anyway.
So p(x | z) is, per feature, a *mixture of M Gaussians on a transformed axis* y = T(x), with the
exact change of variables:

    log p(x | z) = sum_d log sum_m pi_dm(z) N(y_d; mu_dm(z), sigma_dm(z)^2) + log|dy/dx|.

For data in [0, 1] (dequantised digits) T is a logit with a margin alpha, standardised
(``likelihood="logit"``); the density is then zero outside a slightly widened [0, 1]. For any real
rows T only standardises (``likelihood="gaussian"``). M > 1 lets one pixel be "background or
ink" given z; M = 1 is the textbook Gaussian decoder with learned per-feature variance. The
logit's Jacobian does much of the work on digits, whose pixels crowd near 0: a single
full-covariance Gaussian on that axis already scores ~77 nats/image (49.6 in x space); the VAE's
own gain is measured against that reference in ``bench/d1_vae_digits.py``.

Training: minibatch Adam on the negative ELBO (KL weight warmed up from 0 over ``kl_warmup``
epochs against posterior collapse), early stopping on the importance-weighted estimate of the
held-out rows, DistributedDataParallel under torchrun (``training.neural``).

What is served (graphs): ``score`` x [N, D] + eps [N, K, L] -> IWAE_K estimate of log p(x), with
eps drawn by the server from the request's seed and K resizable per request (manifest default
``importance_samples``); ``sample`` z [N, L] (+ label) -> the decoder's mean E[x | z] (or, with
``sample_mode="draw"``, a draw from p(x | z) with two more noise inputs); ``encode`` x -> the
mean and log-variance of q(z | x); ``reconstruct`` x -> E[x' | z = mean of q(z | x)]. The anomaly
score is -score.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from serving.repository.manifest import TensorSpec
from serving.repository.noise import draw_noise
from training.estimators.base import ExportGraph, GenerativeEstimator, as_float64
from training.estimators.vae_core import EncodeGraph, ReconstructGraph, SampleGraph, ScoreGraph, VAECore
from training.estimators.vae_networks import DataTransform, Decoder, Encoder
from training.estimators.vae_training import TrainSettings, train
from training.neural import capped_threads, pick_device

ARCHITECTURES = ("mlp", "conv")
LIKELIHOODS = ("auto", "logit", "gaussian")
SAMPLE_MODES = ("mean", "draw")
# Rows x importance samples per forward pass when scoring in torch (bounds the memory).
SAMPLES_PER_CHUNK = 8192


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


class VariationalAutoencoder(GenerativeEstimator):
    """Variational autoencoder scored by its importance-weighted log-likelihood (ELBO training).

    Gaussian encoder q(z|x), per-feature mixture-of-Gaussians decoder on a (logit-)transformed
    axis with the exact Jacobian, standard normal prior.

    Parameters
    ----------
    architecture : {"mlp", "conv"}, default "mlp"
        "conv" treats each row as a one-channel image (the dataset's image shape, else a square
        one); height and width must be multiples of 4 (digits: 8 x 8).
    latent_dim : int >= 1, default 16
    hidden_units : int >= 1, default 256
        Width of the dense hidden layers of encoder and decoder.
    hidden_layers : int >= 1, default 2
        Dense hidden layers in the encoder head and the decoder head.
    likelihood : {"auto", "logit", "gaussian"}, default "auto"
        The decoder's axis: "logit" needs data in [0, 1]; "auto" picks "logit" when the training
        rows lie in [0, 1], else "gaussian" (standardised data space).
    components : int >= 1, default 3
        Gaussians per feature in p(x | z).
    alpha : float in (0, 0.5), default 1e-6
        The logit's margin: y = logit(alpha + (1 - 2 alpha) x).
    conditional : bool, default False
        Learn p(x | c) from labels (``fit(X, y)``): the one-hot class enters encoder and decoder;
        the sample graph takes a ``label``; the score marginalises over the classes with their
        training frequencies.
    train_samples : int >= 1, default 1
        1 trains the ELBO (closed-form KL); k > 1 trains the importance-weighted bound IWAE_k.
    kl_warmup : int >= 0, default 10
        Epochs over which the KL weight of the ELBO rises linearly from 0 to 1 (0: none), so the
        decoder learns to use z before the KL can pull q(z|x) onto the prior. Without it (and
        without He initialisation) the convolutional VAE collapses on digits (KL ~0.01 nats, test
        ~70 nats instead of ~81 after 30 epochs); the MLP does not need it (+0.3 nats with it).
    importance_samples : int >= 1, default 64
        K of the served score when a request does not set it (and of ``evaluate``).
    sample_mode : {"mean", "draw"}, default "mean"
        What the sample graph returns for z ~ p(z): the decoder's mean E[x | z] (the usual choice
        for images: a clean picture per latent), or a draw x ~ p(x | z) (a true sample of the
        model's density, pixel noise included).
    learning_rate : float > 0, default 1e-3 (Adam)
    weight_decay : float >= 0, default 0.0
    batch_size : int >= 1, default 64 (per process under torchrun)
    max_epochs : int >= 1, default 300
    patience : int >= 1, default 30
        Epochs without a better validation log-likelihood before stopping.
    validation_fraction : float in (0, 0.5], default 0.1
        Training rows held out for early stopping and the anomaly threshold (at least one).
    device : str, default "auto" ("auto" takes the GPU when present, "cpu", "cuda[:N]")
    random_state : int >= 0, default 0
    verbose : bool, default True (a progress bar over epochs)

    Attributes (after fit)
    ----------------------
    core_ (the fitted maths), likelihood_ ("logit" or "gaussian"), image_shape_ (conv),
    num_classes (conditional), history_ (per epoch: loss = -bound per row, val_elbo,
    val_log_likelihood — of log p(x | c) at the true class if conditional), best_epoch_, validation_indices_, validation_log_likelihood_.
    """

    family = "vae"
    card_limits = (
        "The score is the importance-weighted estimate log (1/K) sum_k p(x, z_k) / q(z_k | x): a "
        "stochastic lower bound of log p(x) whose expectation rises with K (request "
        "importance_samples for a tighter, costlier figure; the seed makes it reproducible). The "
        "anomaly threshold is the quantile of -score on the validation rows held out of training "
        "(never fitted, but they chose the early-stopping epoch). With the logit likelihood the "
        "density is zero outside a slightly widened [0, 1] per feature (score -inf); rows with many "
        "exact 0s or 1s (not dequantised) make it spike there. A conditional model's score "
        "marginalises over the classes (C times the work); its samples need a label.")

    def __init__(self, architecture: str = "mlp", latent_dim: int = 16, hidden_units: int = 256,
                 hidden_layers: int = 2, likelihood: str = "auto", components: int = 3, alpha: float = 1e-6,
                 conditional: bool = False, train_samples: int = 1, kl_warmup: int = 10, importance_samples: int = 64,
                 sample_mode: str = "mean", learning_rate: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 64, max_epochs: int = 300, patience: int = 30,
                 validation_fraction: float = 0.1, device: str = "auto", random_state: int = 0,
                 verbose: bool = True):
        self.architecture = architecture
        self.latent_dim = latent_dim
        self.hidden_units = hidden_units
        self.hidden_layers = hidden_layers
        self.likelihood = likelihood
        self.components = components
        self.alpha = alpha
        self.conditional = conditional
        self.train_samples = train_samples
        self.kl_warmup = kl_warmup
        self.importance_samples = importance_samples
        self.sample_mode = sample_mode
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ---- parameters ----------------------------------------------------------------------
    _PARAMS = ("architecture", "latent_dim", "hidden_units", "hidden_layers", "likelihood", "components", "alpha",
               "conditional", "train_samples", "kl_warmup", "importance_samples", "sample_mode", "learning_rate",
               "weight_decay", "batch_size", "max_epochs", "patience", "validation_fraction", "device",
               "random_state", "verbose")

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._PARAMS}

    def fitted_params(self) -> dict[str, Any]:
        """The parameters with likelihood="auto" replaced by the likelihood chosen."""
        params = self.get_params()
        if hasattr(self, "likelihood_"):
            params["likelihood"] = self.likelihood_
        return params

    def _validate_params(self) -> None:
        choices = {"architecture": ARCHITECTURES, "likelihood": LIKELIHOODS, "sample_mode": SAMPLE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("latent_dim", "hidden_units", "hidden_layers", "components", "train_samples",
                     "importance_samples", "batch_size", "max_epochs", "patience"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (_is_int(self.kl_warmup) and self.kl_warmup >= 0):
            raise ValueError(f"kl_warmup must be an int >= 0, got {self.kl_warmup!r}")
        if not (_is_number(self.alpha) and 0.0 < self.alpha < 0.5):
            raise ValueError(f"alpha must be a float in (0, 0.5), got {self.alpha!r}")
        if not (_is_number(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a float > 0, got {self.learning_rate!r}")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a float >= 0, got {self.weight_decay!r}")
        if not (_is_number(self.validation_fraction) and 0.0 < self.validation_fraction <= 0.5):
            raise ValueError(f"validation_fraction must be a float in (0, 0.5], got {self.validation_fraction!r}")
        if not (_is_int(self.random_state) and self.random_state >= 0):
            raise ValueError(f"random_state must be an int >= 0, got {self.random_state!r}")
        for name in ("conditional", "verbose"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        pick_device(self.device)  # raises ValueError naming the allowed values

    # ---- fitting -------------------------------------------------------------------------
    def fit_dataset(self, data: Any) -> "VariationalAutoencoder":
        return self.fit(data.X_train, data.y_train if self.conditional else None, image_shape=data.image_shape)

    def _image_shape(self, n_features: int, hint: tuple[int, int] | None) -> tuple[int, int] | None:
        if self.architecture != "conv":
            return None
        if hint is not None and hint[0] * hint[1] == n_features:
            shape = (int(hint[0]), int(hint[1]))
        else:
            side = math.isqrt(n_features)
            shape = (side, side)
            if side * side != n_features:
                raise ValueError(f"architecture='conv' needs image rows: {n_features} features are not a "
                                 f"square image (e.g. 8 x 8 = 64); use architecture='mlp'")
        if shape[0] % 4 or shape[1] % 4:
            raise ValueError(f"architecture='conv' needs image sides that are multiples of 4, got "
                             f"{shape[0]} x {shape[1]}; use architecture='mlp'")
        return shape

    def _labels(self, y: Any, n: int) -> tuple[np.ndarray, int]:
        if y is None:
            raise ValueError("conditional=True needs class labels: call fit(X, y) (the dataset must have labels)")
        labels = np.asarray(y)
        if labels.shape != (n,):
            raise ValueError(f"y must have one label per row, shape ({n},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
                raise ValueError(f"y must hold integer class labels 0..C-1, got dtype {labels.dtype}")
            labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise ValueError(f"y must hold class labels 0..C-1, got {int(labels.min())}")
        classes = int(labels.max()) + 1
        if classes < 2:
            raise ValueError("conditional=True needs at least 2 classes in y")
        return labels.astype(np.int64), classes

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit rows, validation rows), a seeded permutation of range(n)."""
        order = np.random.default_rng(np.random.SeedSequence([self.random_state, 1])).permutation(n)
        n_val = min(max(1, round(self.validation_fraction * n)), n - 1)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def fit(self, X: Any, y: Any = None, image_shape: tuple[int, int] | None = None) -> "VariationalAutoencoder":
        """Fit on rows ``X`` [n, D]; ``y`` [n] class labels 0..C-1 when ``conditional``."""
        self._validate_params()
        x64 = as_float64(X)
        n, d = x64.shape
        if n < 2:
            raise ValueError(f"a VAE needs at least 2 rows (one to fit, one to validate), got {n}")
        low, high = float(x64.min()), float(x64.max())
        if self.likelihood == "logit" and (low < 0 or high > 1):
            raise ValueError(f"likelihood='logit' needs data in [0, 1], got values in [{low:g}, {high:g}]; "
                             "use likelihood='gaussian' or 'auto'")
        self.likelihood_ = self.likelihood if self.likelihood != "auto" else (
            "logit" if low >= 0 and high <= 1 else "gaussian")
        self.image_shape_ = self._image_shape(d, image_shape)
        labels, classes = self._labels(y, n) if self.conditional else (None, 0)
        self.num_classes = classes or None
        self.n_features_in_, self.n_train_ = d, n

        device = pick_device(self.device)
        x = x64.float()
        fit_rows, val_rows = self._split(n)
        self.validation_indices_ = val_rows
        transform = DataTransform.fit(x[fit_rows], self.likelihood_, float(self.alpha))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            args = (d, int(self.latent_dim), int(self.hidden_units), int(self.hidden_layers), classes)
            encoder = Encoder(*args, image=self.image_shape_)
            decoder = Decoder(*args, int(self.components), image=self.image_shape_)
        log_prior = None
        if classes:
            counts = np.bincount(labels, minlength=classes).astype(np.float64)
            log_prior = torch.as_tensor(np.log(np.maximum(counts, 1e-12) / counts.sum()))
        core = VAECore(transform, encoder, decoder, classes, log_prior).to(device)

        def part(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
            onehot = core.onehot(torch.as_tensor(labels[rows], device=device)) if classes else None
            return x[rows].to(device), onehot

        settings = TrainSettings(float(self.learning_rate), float(self.weight_decay), int(self.batch_size),
                                 int(self.max_epochs), int(self.patience), int(self.train_samples),
                                 int(self.kl_warmup), int(self.random_state), bool(self.verbose))
        result = train(core, part(fit_rows), part(val_rows), settings, device)
        self.core_ = core.cpu().eval()
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.validation_log_likelihood_ = result.best_val_log_likelihood
        return self

    # ---- using the fitted model ----------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "core_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def _rows(self, X: Any) -> torch.Tensor:
        self._check_fitted()
        x = as_float64(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, the model was fitted on {self.n_features_in_}")
        return x.float()

    def _label_tensor(self, label: Any, n: int) -> torch.Tensor:
        """Labels for ``n`` rows: None cycles 0..C-1; an int repeats; an array is checked."""
        if label is None:
            return torch.arange(n) % self.num_classes
        labels = np.broadcast_to(np.asarray(label), (n,)).astype(np.int64)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"label: expected classes in [0, {self.num_classes - 1}], got {label!r}")
        return torch.as_tensor(labels)

    def _labels_for(self, y: Any, n: int, what: str) -> list[torch.Tensor]:
        """[label tensor] for a conditional model (labels required), [] otherwise."""
        if not self.num_classes:
            return []
        if y is None:
            raise ValueError(f"y: this VAE is conditional, {what} needs the class label of every row")
        return [self._label_tensor(np.asarray(y), n)]

    def score_noise_spec(self) -> TensorSpec:
        return TensorSpec(name="eps", shape=[-1, int(self.importance_samples), int(self.latent_dim)],
                          noise="normal", axes={1: "importance_samples"})

    @torch.no_grad()
    def log_prob(self, X: Any, importance_samples: int | None = None, seed: int = 0) -> torch.Tensor:
        """float64 [N]: the importance-weighted estimate of log p(x), with the noise the server
        draws for a request of these rows with this seed and ``importance_samples``."""
        x = self._rows(X)
        k = int(importance_samples or self.importance_samples)
        eps = torch.from_numpy(draw_noise([self.score_noise_spec()], len(x), seed,
                                          {"importance_samples": k})["eps"])
        rows = max(1, SAMPLES_PER_CHUNK // (k * (self.num_classes or 1)))
        widest = self.n_features_in_ * 3 * int(self.components)
        with capped_threads(min(len(x), rows) * k * (self.num_classes or 1) * widest):
            return torch.cat([self.core_.log_prob(x[i:i + rows], eps[i:i + rows])
                              for i in range(0, len(x), rows)]).double()

    def score_samples(self, X: Any, importance_samples: int | None = None, seed: int = 0) -> np.ndarray:
        return self.log_prob(X, importance_samples, seed).numpy()

    def score(self, X: Any) -> float:
        return float(self.log_prob(X).mean())

    @torch.no_grad()
    def elbo(self, X: Any, y: Any = None, seed: int = 0) -> np.ndarray:
        """Per-row ELBO (one reparameterised sample, closed-form KL): a bound on log p(x), or on
        log p(x | y) for a conditional model (labels ``y`` required)."""
        x = self._rows(X)
        labels = self._labels_for(y, len(x), "the ELBO (a bound on log p(x | y))")
        onehot = self.core_.onehot(labels[0]) if labels else None
        eps = torch.randn(len(x), int(self.latent_dim), generator=torch.Generator().manual_seed(seed))
        return self.core_.training_objective(x, eps, onehot).double().numpy()

    @property
    def can_sample(self) -> bool:
        return True

    def sample_noise_specs(self) -> list[TensorSpec]:
        specs = [TensorSpec(name="z", shape=[-1, int(self.latent_dim)], noise="normal")]
        if self.sample_mode == "draw":
            d = self.n_features_in_
            specs += [TensorSpec(name="u", shape=[-1, d], noise="uniform"),
                      TensorSpec(name="e", shape=[-1, d], noise="normal")]
        return specs

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, label: Any = None) -> torch.Tensor:
        """``n`` samples float64 [n, D] from noise drawn as the server draws it for ``seed``.

        Conditional models take ``label`` (an int, or one per row); None cycles the classes.
        """
        self._check_fitted()
        specs = self.sample_noise_specs()
        noise = draw_noise(specs, n, seed)
        args = [torch.from_numpy(noise[s.name]) for s in specs]
        if self.num_classes:
            args.append(self._label_tensor(label, n))
        elif label is not None:
            raise ValueError("label: this VAE is not conditional (fit with conditional=True and labels)")
        return SampleGraph(self.core_, self.sample_mode == "draw")(*args).double()

    @torch.no_grad()
    def encode(self, X: Any, y: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, log_var) [N, L] of q(z | x[, y])."""
        x = self._rows(X)
        mean, log_var = EncodeGraph(self.core_)(x, *self._labels_for(y, len(x), "encode"))
        return mean.numpy(), log_var.numpy()

    @torch.no_grad()
    def reconstruct(self, X: Any, y: Any = None) -> np.ndarray:
        """E[x' | z = mean of q(z | x[, y])] [N, D]: the deterministic reconstruction."""
        x = self._rows(X)
        return ReconstructGraph(self.core_)(x, *self._labels_for(y, len(x), "reconstruct")).numpy()

    # ---- pipeline hooks --------------------------------------------------------------------
    def evaluate(self, data: Any) -> dict[str, float]:
        """Test-split figures: the served score's mean (IWAE_K, K = importance_samples, seed 0) and
        the ELBO (of log p(x | y) for a conditional model), plus the training log's summary."""
        k = int(self.importance_samples)
        y_test = data.y_test if self.num_classes else None
        elbo_key = "test_elbo_given_label" if self.num_classes else "test_elbo"
        test = float(np.mean(self.score_samples(data.X_test)))
        return {"test_log_likelihood": test, f"test_iwae_{k}": test,
                elbo_key: float(np.mean(self.elbo(data.X_test, y_test))),
                "validation_log_likelihood": float(self.validation_log_likelihood_),
                "best_epoch": float(self.best_epoch_), "epochs": float(len(self.history_))}

    def calibration_method(self, folds: int) -> str:
        return (f"-score quantile (K={self.importance_samples}, seed 0) on {len(self.validation_indices_)} "
                "training rows held out of fitting (the early-stopping validation split)")

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray:
        """-score of the validation rows held out of training (``folds`` is not used)."""
        self._check_fitted()
        if len(data.X_train) != self.n_train_:
            raise ValueError(f"calibration_scores needs the {self.n_train_} training rows the model was "
                             f"fitted on, got {len(data.X_train)}")
        return -self.score_samples(np.asarray(data.X_train)[self.validation_indices_])

    def export_graphs(self) -> list[ExportGraph]:
        self._check_fitted()
        d, latent = self.n_features_in_, int(self.latent_dim)
        x = TensorSpec(name="x", shape=[-1, d])
        label = [TensorSpec(name="label", shape=[-1], dtype="int64")] if self.num_classes else []
        core = self.core_
        return [
            ExportGraph("score", ScoreGraph(core).eval(), [x, self.score_noise_spec()],
                        [TensorSpec(name="log_prob", shape=[-1])]),
            ExportGraph("sample", SampleGraph(core, self.sample_mode == "draw").eval(),
                        [*self.sample_noise_specs(), *label], [TensorSpec(name="samples", shape=[-1, d])]),
            ExportGraph("encode", EncodeGraph(core).eval(), [x, *label],
                        [TensorSpec(name="z_mean", shape=[-1, latent]),
                         TensorSpec(name="z_log_var", shape=[-1, latent])]),
            ExportGraph("reconstruct", ReconstructGraph(core).eval(), [x, *label],
                        [TensorSpec(name="reconstruction", shape=[-1, d])]),
        ]

    def save_pictures(self, data: Any, folder: Any, title: str) -> None:
        from training.estimators.vae_pictures import save_vae_pictures

        save_vae_pictures(self, data, folder, title)
