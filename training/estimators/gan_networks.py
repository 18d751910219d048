"""The GAN's networks: generators and discriminators for rows (MLP) and small images (DCGAN-style).

Both work in a *normalised* space (the estimator maps data in and samples out; see
``training.estimators.gan``). Shapes: a generator maps z [N, latent_dim] (and, when
conditional, a one-hot label [N, K]) to rows [N, C, *spatial] — [N, d] for the MLP, [N, 1, H, W]
for the convolutional one. A discriminator maps rows of that shape to logits [N / pack].

Packing (PacGAN, Lin et al. 2018). The discriminator judges ``pack`` samples at once: the rows of
a batch [B, C, ...] are grouped in consecutive blocks of ``pack`` and concatenated along the
channel axis, [B / pack, pack·C, ...]. A generator that drops modes produces packs that are too
alike, which a packed discriminator sees and a single-sample one cannot — a cheap, principled
fix for mode collapse (the packed discriminator's loss penalises the collapsed distribution's
*product* with itself, which separates it from the data far more than the distribution alone).

Minibatch discrimination (Salimans et al. 2016). From an intermediate feature f(x_i) in R^A and
a learned tensor T in R^{A x B x C}, M_i = f(x_i) T in R^{B x C}, c_b(x_i, x_j) =
exp(-||M_{i,b} - M_{j,b}||_1), and the layer appends o(x_i)_b = (1/(n-1)) sum_{j != i}
c_b(x_i, x_j) to f(x_i): how close row i is to the other rows of its batch, so a collapsed batch
of fakes is easy to tell from a varied batch of data. The paper sums over all j; we average over
the others (the self term is the constant 1, and the sum grows with the batch size), so that the
feature has the same scale in training batches and against the fixed reference rows that
replace the batch when a single row is scored (``forward(..., reference=...)``).

Fourier features, coarse to fine (for low-dimensional rows). An MLP on raw coordinates learns
fine detail slowly (its "spectral bias", Rahaman et al. 2019; Tancik et al. 2020): to put a
bump of width 0.05 on each of 25 grid modes its first-layer weights must grow to ~1/0.05, which
Adam's steps of ~learning-rate take thousands of iterations to do. Feeding it
[x, sin(x b_k), cos(x b_k)] for fixed random frequencies b_k (random directions, magnitudes
log-uniform over [FOURIER_LOW, FOURIER_HIGH] per standard deviation) lets it resolve that
scale at once. But a discriminator that is sharp from the start leaves no gradient between the
modes, and the generator collapses onto the few modes it starts near; so the frequencies are
switched on from low to high as training proceeds (``level`` goes 0 -> 1; frequency |b| is on
with weight clamp((1.05 level B - |b|) / (0.1 B), 0, 1), B = FOURIER_HIGH), as in the
coarse-to-fine encodings of Park et al. 2021 / Lin et al. 2021 (BARF): coarse structure first
(the generator spreads over every mode), then sharpness (each sample settles on its mode).
"""

from __future__ import annotations

import math

import torch
from torch import nn


FOURIER_LOW, FOURIER_HIGH = 1.0, 30.0


class FourierFeatures(nn.Module):
    """x [N, d] -> [x, w * sin(x B), w * cos(x B)] [N, d + 2F], w the coarse-to-fine weights (see above)."""

    def __init__(self, n_features: int, n_frequencies: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_features, n_frequencies, generator=generator)
        magnitudes = torch.empty(n_frequencies).uniform_(math.log(FOURIER_LOW), math.log(FOURIER_HIGH),
                                                         generator=generator).exp()
        self.register_buffer("B", directions / directions.norm(dim=0, keepdim=True) * magnitudes)
        self.register_buffer("level", torch.ones(()))  # 1 = every frequency on (what is exported)
        self.out_features = n_features + 2 * n_frequencies

    def weights(self) -> torch.Tensor:
        magnitude = self.B.norm(dim=0)
        return ((1.05 * self.level * FOURIER_HIGH - magnitude) / (0.1 * FOURIER_HIGH)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = x @ self.B
        w = self.weights()
        return torch.cat([x, w * torch.sin(projected), w * torch.cos(projected)], dim=1)


def pack_rows(x: torch.Tensor, pack: int) -> torch.Tensor:
    """[B, C, ...] -> [B / pack, pack * C, ...]: consecutive rows side by side along the channels."""
    if x.shape[0] % pack:
        raise ValueError(f"pack: a batch of {x.shape[0]} rows does not split into packs of {pack}")
    return x.reshape(x.shape[0] // pack, pack * x.shape[1], *x.shape[2:])


def with_label(x: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
    """Append a one-hot label to each row's channels (broadcast over the spatial axes of images)."""
    if onehot is None:
        return x
    spatial = x.shape[2:]
    label = onehot.reshape(*onehot.shape, *([1] * len(spatial))).expand(-1, -1, *spatial)
    return torch.cat([x, label.to(x.dtype)], dim=1)


class MinibatchDiscrimination(nn.Module):
    """f [N, A] -> [f, o] [N, A + B] (see the module docstring); ``reference`` replaces the batch."""

    def __init__(self, in_features: int, kernels: int = 32, kernel_dim: int = 8):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) / math.sqrt(in_features))

    def forward(self, f: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        m = (f @ self.T).reshape(-1, self.kernels, self.kernel_dim)
        if reference is None:
            others = m
        else:
            others = (reference @ self.T).reshape(-1, self.kernels, self.kernel_dim)
        l1 = (m.unsqueeze(1) - others.unsqueeze(0)).abs().sum(dim=3)  # [N, R, B]
        c = torch.exp(-l1)
        if reference is None:  # within the batch: leave each row's own (constant 1) term out
            o = (c.sum(dim=1) - 1.0) / max(m.shape[0] - 1, 1)
        else:
            o = c.mean(dim=1)
        return torch.cat([f, o], dim=1)

    @property
    def out_extra(self) -> int:
        return self.kernels


class Discriminator(nn.Module):
    """label-append -> pack -> body (features) -> [minibatch discrimination] -> linear head -> logit."""

    def __init__(self, body: nn.Module, features: int, pack: int, minibatch: bool,
                 embed: nn.Module | None = None):
        super().__init__()
        self.body, self.pack, self.embed = body, pack, embed
        self.minibatch = MinibatchDiscrimination(features) if minibatch else None
        self.head = nn.Linear(features + (self.minibatch.out_extra if minibatch else 0), 1)

    def features(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """The intermediate layer f used by feature matching and minibatch discrimination: [B / pack, A]."""
        if self.embed is not None:
            x = self.embed(x)
        return self.body(pack_rows(with_label(x, onehot), self.pack))

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] (coarse-to-fine Fourier features follow it)."""
        if isinstance(self.embed, FourierFeatures):
            self.embed.level.fill_(fraction)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None = None,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B / pack]. ``reference`` = features of fixed real packs for minibatch discrimination."""
        return self.head_from_features(self.features(x, onehot), reference)

    def head_from_features(self, f: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        if self.minibatch is not None:
            f = self.minibatch(f, reference)
        return self.head(f).squeeze(1)


# ---- rows: multi-layer perceptrons ------------------------------------------------------------

def _mlp(sizes: list[int], activation: type[nn.Module], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class _LeakyReLU(nn.LeakyReLU):
    def __init__(self) -> None:
        super().__init__(0.2)


GENERATOR_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLPGenerator(nn.Module):
    """[z, onehot] -> ReLU or tanh hidden layers -> linear rows [N, d].

    tanh suits multi-modal data: saturated units map whole regions of z to (nearly) one point,
    so tight, separate clusters need no large weights, where a ReLU net must build each sharp
    transition out of large slopes.
    """

    def __init__(self, latent_dim: int, n_features: int, hidden: int, layers: int, num_classes: int = 0,
                 activation: str = "relu"):
        super().__init__()
        self.net = _mlp([latent_dim + num_classes, *[hidden] * layers, n_features], GENERATOR_ACTIVATIONS[activation],
                        final_activation=False)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z if onehot is None else torch.cat([z, onehot.to(z.dtype)], dim=1))


def mlp_discriminator(n_features: int, hidden: int, layers: int, num_classes: int = 0, pack: int = 1,
                      minibatch: bool = False, fourier_features: int = 0, seed: int = 0) -> Discriminator:
    """[Fourier features] -> pack * (d' + K) inputs -> LeakyReLU(0.2) hidden layers (the features) -> logit."""
    embed = FourierFeatures(n_features, fourier_features, seed) if fourier_features else None
    width = embed.out_features if embed is not None else n_features
    body = _mlp([pack * (width + num_classes), *[hidden] * layers], _LeakyReLU, final_activation=True)
    return Discriminator(body, hidden, pack, minibatch, embed)


# ---- images: DCGAN-style convolutions ------------------------------------------------------------

def check_image_shape(image_shape: tuple[int, int]) -> None:
    h, w = image_shape
    if h % 4 or w % 4 or h < 4 or w < 4:
        raise ValueError(f"architecture='conv' needs image sides divisible by 4 (two stride-2 layers), "
                         f"got {h}x{w}")


class ConvGenerator(nn.Module):
    """DCGAN: [z, onehot] -> linear -> [4c, H/4, W/4] -> 2 x (BN, ReLU, ConvT stride 2) -> sigmoid [N, 1, H, W].

    Batch normalisation is used as in DCGAN (Radford et al. 2016); the exported graph runs it in
    evaluation mode with its running statistics, so one sample never depends on the others.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int], channels: int, num_classes: int = 0):
        super().__init__()
        check_image_shape(image_shape)
        self.h, self.w = image_shape[0] // 4, image_shape[1] // 4
        self.c = 4 * channels
        self.project = nn.Linear(latent_dim + num_classes, self.c * self.h * self.w)
        self.net = nn.Sequential(
            nn.BatchNorm2d(self.c), nn.ReLU(),
            nn.ConvTranspose2d(self.c, 2 * channels, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.ConvTranspose2d(2 * channels, 1, 4, stride=2, padding=1),
            nn.Sigmoid())

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(z if onehot is None else torch.cat([z, onehot.to(z.dtype)], dim=1))
        return self.net(h.reshape(-1, self.c, self.h, self.w))


def conv_discriminator(image_shape: tuple[int, int], channels: int, num_classes: int = 0, pack: int = 1,
                       minibatch: bool = False) -> Discriminator:
    """DCGAN: [pack(1 + K), H, W] -> 2 x (conv stride 2, LeakyReLU 0.2) -> flattened features -> logit.

    No batch normalisation in the discriminator: it would couple the rows of a batch (which the
    gradient penalty's per-row gradient and the single-row anomaly score must not see).
    """
    check_image_shape(image_shape)
    features = 2 * channels * (image_shape[0] // 4) * (image_shape[1] // 4)
    body = nn.Sequential(
        nn.Conv2d(pack * (1 + num_classes), channels, 4, stride=2, padding=1), _LeakyReLU(),
        nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), _LeakyReLU(),
        nn.Flatten())
    return Discriminator(body, features, pack, minibatch)
