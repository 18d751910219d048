"""``FVBNDensity``: the fully-visible belief net family (``genserve train fvbn``).

A fully-visible belief net writes the joint density with the chain rule,

    p(x) = prod_{d=1}^{D} p(x_d | x_<d),

and models each conditional with a network that sees only the features before d, so the
log-likelihood is exact (a sum of D conditional log-densities) and sampling is D sequential
draws. Two variants:

* ``variant="larc"`` — binary rows: p(x_d = 1 | x_<d) = sigmoid(b_d + sum_{j<d} W_dj x_j) (``larc``).
* ``variant="made"`` — continuous rows: a masked MLP (MADE) whose outputs are each feature's
  mixture of K Gaussians (``made``, ``mog``), on data mapped to R^D by a logit (or affine)
  transform whose log-Jacobian enters the density exactly (``transform``); an ensemble of
  ``n_masks`` orderings trained order-agnostically, scored as log mean_m p_m(x) (``cores``).

Training holds out ``validation_fraction`` of the rows: they choose the epoch (early stopping)
and, never having been fitted, give the anomaly threshold's calibration scores — a neural net
cannot afford the classical families' K refits for cross-fitting.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from training.estimators.base import DensityEstimator
from training.estimators.fvbn.cores import LarcCore, MadeCore
from training.estimators.fvbn.larc import LARC, marginal_logits
from training.estimators.fvbn.made import MADE
from training.estimators.fvbn.train import TrainSettings, train
from training.estimators.fvbn.transform import DataTransform
from training.neural import pick_device

VARIANTS = ("made", "larc")
TRANSFORM_CHOICES = ("auto", "logit", "affine")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


class FVBNDensity(DensityEstimator):
    """Fully-visible belief net: p(x) = prod_d p(x_d | x_<d), an exact autoregressive likelihood.

    LARC (logistic conditionals) for binary rows; MADE with mixture-of-Gaussian conditionals and
    an ensemble of orderings for continuous rows.

    Parameters
    ----------
    variant : {"made", "larc"}, default "made"
        "larc" for rows of 0/1 values, "made" for continuous rows.
    n_components : int, default 10
        Gaussians per conditional (made).
    hidden_units : int, default 128
        Width of the masked hidden layers (made).
    n_blocks : int, default 2
        Residual masked blocks, two masked layers each (made).
    n_masks : int, default 8
        Orderings in the ensemble (made): trained order-agnostically, scored as log mean_m p_m.
        1 is a single MADE in the natural order. Sampling costs n_masks x D net passes.
    dropout : float in [0, 1), default 0.0
        Dropout inside the residual blocks during training (made).
    transform : {"auto", "logit", "affine"}, default "auto"
        Map to R^D before modelling (made): "logit" needs data in [0, 1]; "auto" picks "logit"
        when the training rows lie in [0, 1], else "affine" (standardisation only).
    alpha : float in (0, 0.5), default 0.05
        The logit transform's margin, y = logit(alpha + (1 - 2 alpha) x).
    learning_rate : float > 0, default 1e-3 (AdamW)
    weight_decay : float >= 0, default 1e-4 (AdamW's decoupled decay; LARC's L2 penalty)
    batch_size : int >= 1, default 64 (per process under torchrun)
    max_epochs : int >= 1, default 200
    patience : int >= 1, default 15
        Epochs without a better validation log-likelihood before stopping.
    validation_fraction : float in (0, 0.5], default 0.1
        Training rows held out for early stopping and the anomaly calibration (at least one).
    device : str, default "auto"
        "auto" (the GPU when present), "cpu" or "cuda[:N]".
    random_state : int >= 0, default 0
    verbose : bool, default True
        Show a progress bar over epochs.

    Attributes (after fit)
    ----------------------
    net_ (the trained torch module), core_ (the exported maths), transform_ ("logit",
    "affine" or None for larc), history_ (per epoch: train_nll, val_nll in nats per row),
    best_epoch_, validation_indices_ (rows of X held out), validation_log_likelihood_.
    """

    family = "fvbn"
    card_limits = (
        "The anomaly threshold comes from the -log p of the validation rows held out of training "
        "(never fitted, but they chose the early-stopping epoch, so the threshold may flag a little "
        "fewer new normal rows than the nominal rate). For 'made' the density is exact but lives on "
        "the logit transform's open interval (slightly wider than [0, 1] per feature): rows outside "
        "it score -inf. Sampling is sequential: n_masks x D passes of the net per request. For "
        "'larc', any row that is not all 0/1 has probability 0 (log p = -inf).")

    def __init__(self, variant: str = "made", n_components: int = 10, hidden_units: int = 128,
                 n_blocks: int = 2, n_masks: int = 8, dropout: float = 0.0, transform: str = "auto",
                 alpha: float = 0.05, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 64, max_epochs: int = 200, patience: int = 15,
                 validation_fraction: float = 0.1, device: str = "auto", random_state: int = 0,
                 verbose: bool = True):
        self.variant = variant
        self.n_components = n_components
        self.hidden_units = hidden_units
        self.n_blocks = n_blocks
        self.n_masks = n_masks
        self.dropout = dropout
        self.transform = transform
        self.alpha = alpha
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
    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "variant", "n_components", "hidden_units", "n_blocks", "n_masks", "dropout", "transform",
            "alpha", "learning_rate", "weight_decay", "batch_size", "max_epochs", "patience",
            "validation_fraction", "device", "random_state", "verbose")}

    def fitted_params(self) -> dict[str, Any]:
        """The parameters with transform="auto" replaced by the transform chosen."""
        params = self.get_params()
        if getattr(self, "transform_", None):
            params["transform"] = self.transform_
        return params

    def _validate_params(self, x: torch.Tensor) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("n_components", "hidden_units", "n_blocks", "n_masks", "batch_size", "max_epochs", "patience"):
            value = getattr(self, name)
            low = 0 if name == "n_blocks" else 1
            if not (_is_int(value) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.transform not in TRANSFORM_CHOICES:
            raise ValueError(f"transform must be one of {TRANSFORM_CHOICES}, got {self.transform!r}")
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
        if not isinstance(self.verbose, (bool, np.bool_)):
            raise ValueError(f"verbose must be True or False, got {self.verbose!r}")
        pick_device(self.device)  # raises ValueError naming the allowed values
        if x.shape[0] < 2:
            raise ValueError(f"an FVBN needs at least 2 rows (one to fit, one to validate), got {x.shape[0]}")
        if self.variant == "larc":
            bad = x[(x != 0) & (x != 1)]
            if bad.numel():
                raise ValueError(f"variant='larc' models binary rows: X must contain only 0 and 1, got "
                                 f"{bad.numel()} other values (e.g. {float(bad[0]):g}); use variant='made' "
                                 "for continuous data")
        elif self.transform == "logit" and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"transform='logit' needs data in [0, 1], got values in "
                             f"[{float(x.min()):g}, {float(x.max()):g}]; use transform='affine' or 'auto'")

    # ---- fitting -------------------------------------------------------------------------
    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit rows, validation rows), a seeded permutation of range(n)."""
        order = np.random.default_rng(np.random.SeedSequence([self.random_state, 1])).permutation(n)
        n_val = min(max(1, round(self.validation_fraction * n)), n - 1)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _fit(self, x: torch.Tensor) -> nn.Module:
        """Seeded (initial weights, dropout) without touching the caller's global random state."""
        device = pick_device(self.device)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.random_state)
            return self._fit_seeded(x, device)

    def _fit_seeded(self, x: torch.Tensor, device: torch.device) -> nn.Module:
        fit_rows, val_rows = self._split(x.shape[0])
        self.validation_indices_ = val_rows
        self.n_train_ = x.shape[0]
        if self.variant == "larc":
            self.transform_ = None
            transform = None
            net = LARC(x.shape[1], marginal_logits(x[fit_rows].float()))
        else:
            kind = self.transform if self.transform != "auto" else (
                "logit" if bool(x.min() >= 0) and bool(x.max() <= 1) else "affine")
            self.transform_ = kind
            transform = DataTransform.fit(x[fit_rows], kind, float(self.alpha))
            net = MADE(x.shape[1], int(self.hidden_units), int(self.n_blocks), int(self.n_components),
                       int(self.n_masks), float(self.dropout), seed=int(self.random_state))

        def prepared(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            if transform is None:
                z, log_det = x[rows], torch.zeros(len(rows), dtype=torch.float64)
            else:
                z, log_det = transform(x[rows])
            return z.float().to(device), log_det.float().to(device)

        settings = TrainSettings(float(self.learning_rate), float(self.weight_decay), int(self.batch_size),
                                 int(self.max_epochs), int(self.patience), int(self.random_state),
                                 bool(self.verbose), desc=f"fvbn {self.variant}")
        result = train(net.to(device), prepared(fit_rows), prepared(val_rows), settings, device)
        self.net_ = net.cpu()
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.validation_log_likelihood_ = result.best_val_log_likelihood
        if self.variant == "larc":
            return LarcCore(*net.fitted())
        return MadeCore(net, transform)

    # ---- pipeline hooks --------------------------------------------------------------------
    def evaluate(self, data: Any) -> dict[str, float]:
        figures = super().evaluate(data)
        return {**figures, "validation_log_likelihood": float(self.validation_log_likelihood_),
                "best_epoch": float(self.best_epoch_), "epochs": float(len(self.history_))}

    def calibration_method(self, folds: int) -> str:
        return (f"-log p quantile on {len(self.validation_indices_)} training rows held out of fitting "
                "(the early-stopping validation split)")

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray:
        """-log p of the validation rows held out of training (``folds`` is not used)."""
        self._check_fitted()
        if len(data.X_train) != self.n_train_:
            raise ValueError(f"calibration_scores needs the {self.n_train_} training rows the model was "
                             f"fitted on, got {len(data.X_train)}")
        return -self.score_samples(np.asarray(data.X_train)[self.validation_indices_])
