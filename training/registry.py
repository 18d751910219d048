"""One registry from family name to estimator class, default hyper-parameters and CLI options.

The command line, the demo repository and the benchmarks all create estimators through here,
so adding a family is one entry, never another ``if family == ...`` branch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from training.estimators.base import DensityEstimator


def _number_or(kind: type, *words: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            allowed = " or ".join([kind.__name__.upper(), *words])
            raise ValueError(f"expected {allowed}, got {text!r}") from None
    parse.__name__ = f"{kind.__name__} or {'/'.join(words)}" if words else kind.__name__
    return parse


def switch(text: str) -> bool:
    """An on/off option: yes/no (true/false, on/off, 1/0); given bare (``--conditional``) it is on."""
    word = text.strip().lower()
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


switch.__name__ = "yes/no"


@dataclass(frozen=True)
class Option:
    """A command-line flag mapped onto one constructor parameter."""

    flag: str
    param: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    target: str  # "module:Class", imported on first use so the registry loads without every family
    summary: str
    options: tuple[Option, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def estimator_class(self) -> type[DensityEstimator]:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def create(self, **params: Any) -> DensityEstimator:
        """An unfitted estimator with the defaults overridden by ``params`` (None = default)."""
        merged = {**self.defaults, **{k: v for k, v in params.items() if v is not None}}
        return self.estimator_class(**merged)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gaussian", "training.estimators.gaussian:GaussianDensity",
           "full-covariance Gaussian, maximum likelihood",
           (Option("--reg-covar", "reg_covar", float, "added to the covariance diagonal"),)),
    Family("histogram", "training.estimators.histogram:HistogramDensity",
           "regular-grid histogram for 1 to 3 dimensions",
           (Option("--bins", "bins", _number_or(int, "auto"), "bins per dimension, or auto (h ∝ n^(-1/3))"),)),
    Family("kde", "training.estimators.kde:KernelDensity",
           "kernel density estimate",
           (Option("--kernel", "kernel", str, "kernel shape",
                   ("gaussian", "tophat", "linear", "epanechnikov")),
            Option("--bandwidth", "bandwidth", _number_or(float, "scott", "silverman", "cv"),
                   "FLOAT, scott, silverman or cv (k-fold cross-validated)")),
           {"bandwidth": "cv"}),
    Family("knn", "training.estimators.knn:KNNDensity",
           "k-nearest-neighbour density k / (n V_d d_k^d) (not normalised)",
           (Option("--k", "k", _number_or(int, "auto"), "neighbours, or auto (validation)"),)),
    Family("gmm", "training.estimators.gmm:GaussianMixtureDensity",
           "Gaussian mixture fitted by EM",
           (Option("--components", "n_components", _number_or(int, "auto"),
                   "INT or auto (chosen on a validation split)"),
            Option("--covariance", "covariance_type", str, "covariance structure",
                   ("full", "diag", "auto")),
            Option("--reg-covar", "reg_covar", float,
                   "ridge added to each covariance's diagonal (default 1e-6; 1e-2 suits one-class "
                   "detection on small classes)")),
           {"n_components": "auto", "covariance_type": "auto"}),
    Family("hmm", "training.estimators.hmm:GaussianHMM",
           "Gaussian hidden Markov model fitted by Baum-Welch EM, for sequences [N, T, D]",
           (Option("--states", "n_states", _number_or(int, "auto"),
                   "INT or auto (chosen on held-out sequences)"),
            Option("--covariance", "covariance_type", str, "emission covariance structure", ("full", "diag")),
            Option("--iterations", "n_iter", int, "EM iterations per run"),
            Option("--restarts", "n_init", int, "EM runs from different k-means++ starts")),
           {"n_states": "auto", "verbose": True}),
    Family("gan", "training.estimators.gan:GenerativeAdversarialNetwork",
           "generative adversarial network: samples, and a discriminator anomaly score (no density)",
           (Option("--architecture", "architecture", str, "mlp (rows, 2-D) or conv (DCGAN-style, square images)",
                   ("mlp", "conv")),
            Option("--loss", "loss", str, "non-saturating BCE game or WGAN with gradient penalty",
                   ("nonsaturating", "wgan-gp")),
            Option("--latent-dim", "latent_dim", _number_or(int, "auto"),
                   "dimension of the generator's noise z, or auto (the data's, within 2..32)"),
            Option("--hidden", "hidden", int, "units per hidden layer (mlp)"),
            Option("--layers", "layers", int, "hidden layers (mlp)"),
            Option("--channels", "channels", int, "base channels (conv)"),
            Option("--generator-activation", "generator_activation", str, "hidden units of the MLP generator",
                   ("tanh", "relu")),
            Option("--fourier-features", "fourier_features", _number_or(int, "auto"),
                   "coarse-to-fine Fourier features of the MLP discriminator's input (0 = off; auto: 128 if d <= 3)"),
            Option("--fourier-anneal", "fourier_anneal", float,
                   "share of the steps over which the Fourier frequencies switch on, low to high"),
            Option("--pack", "pack", int, "PacGAN: the discriminator judges this many samples at once"),
            Option("--label-smoothing", "label_smoothing", switch, "one-sided: real targets 0.9"),
            Option("--feature-matching", "feature_matching", switch,
                   "generator matches the mean of a discriminator layer"),
            Option("--minibatch-discrimination", "minibatch_discrimination", switch,
                   "Salimans et al. minibatch layer in the discriminator"),
            Option("--gp-weight", "gp_weight", float, "lambda of the WGAN-GP gradient penalty"),
            Option("--r1-weight", "r1_weight", float, "gamma of the R1 penalty on real rows (0 = off)"),
            Option("--coverage-weight", "coverage_weight", _number_or(float, "auto"),
                   "weight of the IMLE coverage term in the generator's loss: each real row pulls its "
                   "nearest fake (0 = off; auto: 3 for mlp on rows with d <= 3)"),
            Option("--steps", "steps", int, "generator updates"),
            Option("--batch-size", "batch_size", int, "rows per step (per process under torchrun)"),
            Option("--d-steps", "d_steps", int, "discriminator steps per generator step (default 1; 5 for wgan-gp)"),
            Option("--learning-rate", "learning_rate", float, "Adam learning rate (decays linearly to 0)"),
            Option("--generator-ema", "generator_ema", float,
                   "serve the moving average of the generator's weights with this decay (0 = off)"),
            Option("--resample", "resample", int,
                   "importance resampling: candidates per sample, weighted by a per-sample real-vs-G "
                   "classifier trained after the game (1 = off: plain G(z))"),
            Option("--classifier-steps", "classifier_steps", int,
                   "training steps of the resampling classifier (frozen generator)"),
            Option("--conditional", "conditional", switch, "class-conditional: train with labels, sample a class"),
            Option("--calibration-fraction", "calibration_fraction", float,
                   "share of training rows held out to calibrate the anomaly threshold"),
            Option("--device", "device", str, "auto, cpu or cuda[:N]"),
            Option("--seed", "random_state", int, "training seed")),
           {"verbose": True}),
    Family("fvbn", "training.estimators.fvbn:FVBNDensity",
           "fully-visible belief net: exact autoregressive log-likelihood (MADE with mixture-of-Gaussian "
           "conditionals, or LARC for binary rows)",
           (Option("--variant", "variant", str, "made (continuous rows) or larc (binary rows)", ("made", "larc")),
            Option("--components", "n_components", int, "Gaussians per conditional (made)"),
            Option("--hidden", "hidden_units", int, "units per masked hidden layer (made)"),
            Option("--blocks", "n_blocks", int, "residual masked blocks (made)"),
            Option("--masks", "n_masks", int, "orderings in the order-agnostic ensemble (made)"),
            Option("--dropout", "dropout", float, "dropout in the residual blocks (made)"),
            Option("--transform", "transform", str, "map to R^D before modelling (made)",
                   ("auto", "logit", "affine")),
            Option("--epochs", "max_epochs", int, "most epochs (early stopping on held-out rows)"),
            Option("--patience", "patience", int, "epochs without improvement before stopping"),
            Option("--learning-rate", "learning_rate", float, "AdamW learning rate"),
            Option("--weight-decay", "weight_decay", float, "AdamW weight decay"),
            Option("--batch-size", "batch_size", int, "rows per step (per process under torchrun)"),
            Option("--validation-fraction", "validation_fraction", float,
                   "share of training rows held out for early stopping and the anomaly threshold"),
            Option("--device", "device", str, "auto, cpu or cuda[:N]"),
            Option("--seed", "random_state", int, "training seed"))),
    Family("vae", "training.estimators.vae:VariationalAutoencoder",
           "variational autoencoder: ELBO training, importance-weighted log-likelihood, samples, encode, "
           "reconstruct",
           (Option("--architecture", "architecture", str, "mlp (rows) or conv (square images, sides multiple of 4)",
                   ("mlp", "conv")),
            Option("--conditional", "conditional", switch, "class-conditional: train with labels, sample a class"),
            Option("--latent-dim", "latent_dim", int, "dimension of the latent z"),
            Option("--hidden", "hidden_units", int, "units per dense hidden layer"),
            Option("--layers", "hidden_layers", int, "dense hidden layers in encoder and decoder"),
            Option("--likelihood", "likelihood", str, "decoder axis: logit (data in [0, 1]) or gaussian",
                   ("auto", "logit", "gaussian")),
            Option("--components", "components", int, "Gaussians per feature in p(x|z)"),
            Option("--train-samples", "train_samples", int, "1 = ELBO; k > 1 = IWAE_k training bound"),
            Option("--kl-warmup", "kl_warmup", int, "epochs over which the KL weight rises from 0 to 1"),
            Option("--importance-samples", "importance_samples", int, "default K of the served score"),
            Option("--sample-mode", "sample_mode", str, "sample graph returns E[x|z] or a draw from p(x|z)",
                   ("mean", "draw")),
            Option("--epochs", "max_epochs", int, "most epochs (early stopping on held-out rows)"),
            Option("--patience", "patience", int, "epochs without improvement before stopping"),
            Option("--learning-rate", "learning_rate", float, "Adam learning rate"),
            Option("--batch-size", "batch_size", int, "rows per step (per process under torchrun)"),
            Option("--validation-fraction", "validation_fraction", float,
                   "share of training rows held out for early stopping and the anomaly threshold"),
            Option("--device", "device", str, "auto, cpu or cuda[:N]"),
            Option("--seed", "random_state", int, "training seed"))),
    Family("cyclegan", "training.estimators.cyclegan:CycleGAN",
           "CycleGAN: unpaired translation between two domains (digits-bold, or a folder with A/ and B/ PNG "
           "subfolders), served by Translate a2b/b2a",
           (Option("--architecture", "architecture", str, "auto (conv for images, mlp for rows), conv or mlp",
                   ("auto", "conv", "mlp")),
            Option("--width", "width", int, "channels of the convolutional generators"),
            Option("--blocks", "blocks", int, "residual blocks per convolutional generator"),
            Option("--downsamplings", "downsamplings", int, "stride-2 stages (image sides must divide by 2^n)"),
            Option("--norm", "norm", str, "normalisation in the convolutional nets", ("none", "instance")),
            Option("--discriminator", "discriminator", str,
                   "global (MLP on the whole image) or patch (PatchGAN) for images", ("global", "patch")),
            Option("--hidden", "hidden", int, "units per hidden layer of the MLP nets"),
            Option("--lambda-cycle", "lambda_cycle", float, "weight of the cycle L1 loss"),
            Option("--lambda-identity", "lambda_identity", float, "weight of the identity L1 loss (0 = off)"),
            Option("--epochs", "epochs", int, "passes over the larger domain"),
            Option("--decay-epochs", "decay_epochs", int, "last epochs over which the learning rate falls to 0"),
            Option("--batch-size", "batch_size", int, "rows of each domain per step (per process under torchrun)"),
            Option("--learning-rate", "learning_rate", float, "Adam learning rate (beta1 = 0.5)"),
            Option("--pool-size", "pool_size", int, "past fakes shown to the discriminators (0 = off)"),
            Option("--device", "device", str, "auto, cpu or cuda[:N]"),
            Option("--seed", "random_state", int, "training seed"))),
)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}") from None
