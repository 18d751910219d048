"""CycleGAN: unpaired translation between two domains A and B (Zhu, Park, Isola & Efros, 2017).

Two generators, G: A→B and F: B→A, and two discriminators, D_B (real B vs G(a)) and D_A (real
A vs F(b)). No pair (a, b) is ever seen; what ties a translation to its input is the cycle:

    generators:      min  L_adv(G, D_B) + L_adv(F, D_A) + λ·L_cyc + λ_id·L_id
    discriminators:  min  L_D(D_B) + L_D(D_A)

with the least-squares adversarial losses, L_cyc = ‖F(G(a)) − a‖₁ + ‖G(F(b)) − b‖₁ and
L_id = ‖G(b) − b‖₁ + ‖F(a) − a‖₁ (``cyclegan_losses`` has the formulas and why). One step
updates both generators on a minibatch of A and one of B (Adam, β1 = 0.5 as in the paper: a
shorter memory of gradients, which GAN games prefer), then both discriminators on the same real
minibatches against fakes drawn from a pool of past fakes. The learning rate is constant, then
decays linearly to zero over the last ``decay_epochs`` epochs (the paper's schedule).

Served as two graphs, ``translate_a2b`` (G) and ``translate_b2a`` (F), each x [N, D] → y [N, D]
in float32; they are deterministic (no noise inputs), so the manifest's capability is
``translate``. There is no density, so no ``score``, ``sample`` or anomaly threshold.

Data: ``fit_dataset`` takes a translation dataset (``X_train`` = domain A, ``X_train_b`` =
domain B, e.g. ``digits-bold`` or a folder with ``A/`` and ``B/`` PNG subfolders). Images (rows
with a known ``image_shape``) get convolutional networks, other rows MLPs (``cyclegan_nets``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import ExportGraph, GenerativeEstimator, as_float64
from training.estimators.cyclegan_nets import (NORMS, ConvDiscriminator, ConvGenerator, Discriminators, Generators,
                                               MLPDiscriminator, MLPGenerator)
from training.estimators.cyclegan_training import TrainConfig, train
from training.neural import capped_threads, distributed_from_env, pick_device

ARCHITECTURES = ("auto", "conv", "mlp")
DISCRIMINATORS = ("global", "patch")
_INTEGERS = {"width": 1, "blocks": 0, "downsamplings": 0, "hidden": 1, "epochs": 1, "decay_epochs": 0,
             "batch_size": 1, "pool_size": 0, "random_state": 0}


class CycleGAN(GenerativeEstimator):
    """CycleGAN: two generators and two least-squares discriminators, cycle and identity L1 losses.

    The defaults are the C1 recipe for 8×8 digits (``bench/c1_digits_bold.py``): small
    convolutional generators (48 channels, one residual block) without downsampling (a 2×2
    dilation is a local map; full resolution keeps it exact), a *global* discriminator, λ = 10,
    λ_id = 1, Adam at 2e-3 with batches of 32 for 60 epochs (~1,200 steps). Why global: on 8×8
    images the translation's direction (a stroke grows up-left, not down-right) shows only in
    where the ink sits in the whole image, which a PatchGAN's local patches cannot see; with one
    it learned inversions or misplaced strokes. Why λ_id = 1
    rather than the paper's 0.5·λ: the identity term pulls G(b) towards b, but thickening a bold
    digit should make it bolder, so a strong identity term fights the translation; a weak one
    still rules out the inverted-intensity solution that λ_id = 0 falls into here.

    Parameters
    ----------
    architecture : "auto", "conv" or "mlp" — "auto" takes "conv" for images, "mlp" for rows.
    width : channels of the convolutional generators (doubled at each downsampling).
    blocks : residual blocks in each convolutional generator.
    downsamplings : stride-2 stages of the convolutional nets; image sides must divide by 2**n.
    norm : "none" or "instance" (the paper's) normalisation in the convolutional nets.
    discriminator : "global" (an MLP on the whole row) or "patch" (a PatchGAN) for images;
        rows always get the MLP.
    hidden : hidden units of the MLP networks (the global discriminator, and the MLP generators).
    lambda_cycle : λ, weight of the cycle loss (the paper's 10).
    lambda_identity : λ_id, weight of the identity loss (0 turns it off).
    epochs : passes over the larger domain; the last ``decay_epochs`` decay the learning rate to 0.
    batch_size : rows of each domain per step (per process under torchrun).
    learning_rate, beta1, beta2 : Adam's step size and moment decays, for both players.
    pool_size : past fakes kept for the discriminators (0: show only the newest fakes).
    random_state : seed of the initial weights, the minibatch order and the pool's choices.
    device : "auto" (the GPU when present), "cpu" or "cuda[:N]".
    verbose : show a progress bar.
    """

    family = "cyclegan"
    card_limits = (
        "A translation is only as faithful as the cycle makes it: nothing pairs an input with its output "
        "in training, so G may change what the cycle loss cannot see (a systematic shift that F undoes). "
        "There is no density: no score, sample or anomaly detection. Rows should come from the training "
        "domain (images in [0, 1]); the figures are on the dataset's test part.")

    def __init__(self, architecture: str = "auto", width: int = 48, blocks: int = 1, downsamplings: int = 0,
                 norm: str = "none", discriminator: str = "global", hidden: int = 128, lambda_cycle: float = 10.0,
                 lambda_identity: float = 1.0, epochs: int = 60, decay_epochs: int = 30, batch_size: int = 32,
                 learning_rate: float = 2e-3, beta1: float = 0.5, beta2: float = 0.999, pool_size: int = 50,
                 random_state: int = 0, device: str = "auto", verbose: bool = True):
        self.architecture = architecture
        self.width = width
        self.blocks = blocks
        self.downsamplings = downsamplings
        self.norm = norm
        self.discriminator = discriminator
        self.hidden = hidden
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.epochs = epochs
        self.decay_epochs = decay_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.pool_size = pool_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "architecture", "width", "blocks", "downsamplings", "norm", "discriminator", "hidden", "lambda_cycle",
            "lambda_identity", "epochs", "decay_epochs", "batch_size", "learning_rate", "beta1", "beta2", "pool_size",
            "random_state", "device", "verbose")}

    # ---- validation ------------------------------------------------------------------------
    def _validate_params(self) -> None:
        for name, allowed in (("architecture", ARCHITECTURES), ("norm", NORMS), ("discriminator", DISCRIMINATORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        for name, low in _INTEGERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.decay_epochs > self.epochs:
            raise ValueError(f"decay_epochs: expected an integer <= epochs ({self.epochs}), got {self.decay_epochs}")
        for name in ("lambda_cycle", "lambda_identity"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        rate = self.learning_rate
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"learning_rate: expected a finite number > 0, got {rate!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
        pick_device(self.device)

    @staticmethod
    def _image_shape(features: int, image_shape: Any) -> tuple[int, int, int] | None:
        """(C, H, W) from a dataset's (H, W) and the row length (C = D / (H·W)); None for rows."""
        if image_shape is None:
            return None
        h, w = (int(s) for s in image_shape)
        if features % (h * w):
            raise ValueError(f"image_shape {tuple(image_shape)} does not divide rows of {features} features")
        return features // (h * w), h, w

    def _build(self, features: int, shape: tuple[int, int, int] | None,
               bounded: bool) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """G, F, D_A, D_B, initialised from ``random_state`` without touching torch's global generator."""
        architecture = self.architecture
        if architecture == "auto":
            architecture = "conv" if shape is not None else "mlp"
        if architecture == "conv":
            if shape is None:
                raise ValueError("architecture: 'conv' needs images (a dataset with an image_shape); "
                                 "use 'mlp' or 'auto' for plain rows")
            step = 2 ** self.downsamplings
            if shape[1] % step or shape[2] % step:
                raise ValueError(f"downsamplings: images of {shape[1]}x{shape[2]} must divide by 2**downsamplings "
                                 f"= {step}; use fewer")
        self.architecture_ = architecture

        def generator() -> nn.Module:
            if architecture == "conv":
                return ConvGenerator(shape, self.width, self.blocks, self.downsamplings, bounded, self.norm)
            return MLPGenerator(features, self.hidden, bounded)

        def discriminator() -> nn.Module:
            if architecture == "conv" and self.discriminator == "patch":
                return ConvDiscriminator(shape, self.width, self.downsamplings, self.norm)
            return MLPDiscriminator(features, self.hidden)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            return generator(), generator(), discriminator(), discriminator()

    # ---- fitting ---------------------------------------------------------------------------
    def fit_dataset(self, data: Any) -> "CycleGAN":
        """Fit on a translation dataset: domain A ``X_train``, domain B ``X_train_b``."""
        if getattr(data, "X_train_b", None) is None:
            raise ValueError(f"--data {data.name}: cyclegan needs two domains (a translation dataset such as "
                             "'digits-bold' or a folder with A/ and B/ subfolders of PNG images)")
        return self.fit(data.X_train, data.X_train_b, image_shape=data.image_shape)

    def fit(self, X: Any, X_b: Any = None, image_shape: tuple[int, int] | None = None) -> "CycleGAN":
        """Learn G: A→B and F: B→A from unpaired rows ``X`` [n_a, D] of A and ``X_b`` [n_b, D] of B.

        ``image_shape`` (H, W) marks the rows as images (C·H·W features, channel-major) for the
        convolutional networks.
        """
        if X_b is None:
            raise ValueError("X_b: cyclegan needs the rows of domain B as well as X (domain A)")
        self._validate_params()
        a, b = as_float64(X, "X").float(), as_float64(X_b, "X_b").float()
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"X_b has {b.shape[1]} features, X has {a.shape[1]}: both domains must have the same "
                             "row shape")
        features = a.shape[1]
        shape = self._image_shape(features, image_shape)
        bounded = bool(min(a.min(), b.min()) >= 0.0 and max(a.max(), b.max()) <= 1.0)
        self.n_features_in_, self.image_shape_, self.bounded_ = features, shape, bounded
        G, F, D_A, D_B = self._build(features, shape, bounded)
        config = TrainConfig(self.epochs, self.decay_epochs, self.batch_size, self.learning_rate, self.beta1,
                             self.beta2, self.lambda_cycle, self.lambda_identity, self.pool_size)
        device = pick_device(self.device)
        # Activations per step (rows x features x channels); 2M of them pay for one more CPU thread:
        # 8x8 digits train on one (on 2 busy cores the demo recipe took 43 CPU-s on 1 thread, 377 on 2).
        activations = self.batch_size * features * (self.width if self.architecture_ == "conv" else self.hidden)
        with capped_threads(activations, device, per_thread=1 << 21), distributed_from_env(device) as dist:
            self.history_ = train(Generators(G, F), Discriminators(D_A, D_B), a, b, config, dist, device,
                                  self.random_state, self.verbose)
        self.G_, self.F_ = G.cpu().eval(), F.cpu().eval()
        self.D_A_, self.D_B_ = D_A.cpu().eval(), D_B.cpu().eval()
        return self

    # ---- using the fitted model ------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "G_"):
            raise RuntimeError("this CycleGAN is not fitted yet: call fit first")

    @torch.no_grad()
    def translate(self, X: Any, direction: str = "a2b") -> np.ndarray:
        """G(X) for "a2b", F(X) for "b2a": float32 rows [N, D], as the served graphs compute them."""
        self._check_fitted()
        nets = {"a2b": self.G_, "b2a": self.F_}
        if direction not in nets:
            raise ValueError(f"direction: expected 'a2b' or 'b2a', got {direction!r}")
        x = as_float64(X).float()
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, the model was fitted on {self.n_features_in_}")
        return nets[direction](x).numpy()

    def export_graphs(self) -> list[ExportGraph]:
        """``translate_a2b`` (G) and ``translate_b2a`` (F): x float32 [N, D] -> y float32 [N, D]."""
        self._check_fitted()
        d = self.n_features_in_
        return [ExportGraph(name, net, [TensorSpec(name="x", shape=[-1, d])], [TensorSpec(name="y", shape=[-1, d])])
                for name, net in (("translate_a2b", self.G_), ("translate_b2a", self.F_))]

    # ---- pipeline hooks --------------------------------------------------------------------
    def check_feeds(self, graph: ExportGraph, data: Any, rows: int) -> dict[str, np.ndarray]:
        """Held-out rows of the graph's own input domain: A for a2b, B for b2a."""
        source = data.X_test_b if graph.name == "translate_b2a" else data.X_test
        return {"x": np.ascontiguousarray(source[:rows], dtype=np.float32)}

    def evaluate(self, data: Any) -> dict[str, float]:
        """Held-out cycle L1 per direction; with a paired test part (``digits-bold``), the MAE of
        each translation against the true counterpart and of the untranslated input (reference)."""
        test_a, test_b = data.X_test, data.X_test_b
        g_a, f_b = self.translate(test_a, "a2b"), self.translate(test_b, "b2a")
        figures = {"test_cycle_l1_a": float(np.mean(np.abs(self.translate(g_a, "b2a") - test_a))),
                   "test_cycle_l1_b": float(np.mean(np.abs(self.translate(f_b, "a2b") - test_b)))}
        if getattr(data, "paired_test", False):
            figures.update({"test_mae_a2b": float(np.mean(np.abs(g_a - test_b))),
                            "test_mae_b2a": float(np.mean(np.abs(f_b - test_a))),
                            "test_mae_untranslated": float(np.mean(np.abs(test_a - test_b)))})
        return figures

    def input_shape(self, data: Any) -> list[int]:
        return [self.n_features_in_]

    def save_pictures(self, data: Any, folder: Path, title: str) -> None:
        """translations.png (A, G(A), F(G(A)) and B, F(B), G(F(B)) on test rows) and training.png."""
        from training.estimators.cyclegan_plots import save_translation_pairs
        from training.plots import save_training_curve

        save_translation_pairs(self, data, Path(folder) / "translations.png", title)
        if self.history_:
            save_training_curve(self.history_, Path(folder) / "training.png", title)

