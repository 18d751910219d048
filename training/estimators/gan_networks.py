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
"""

from __future__ import annotations

import math

import torch
from torch import nn


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

    def __init__(self, body: nn.Module, features: int, pack: int, minibatch: bool):
        super().__init__()
        self.body, self.pack = body, pack
        self.minibatch = MinibatchDiscrimination(features) if minibatch else None
        self.head = nn.Linear(features + (self.minibatch.out_extra if minibatch else 0), 1)

    def features(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """The intermediate layer f used by feature matching and minibatch discrimination: [B / pack, A]."""
        return self.body(pack_rows(with_label(x, onehot), self.pack))

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


class MLPGenerator(nn.Module):
    """[z, onehot] -> ReLU hidden layers -> linear rows [N, d]."""

    def __init__(self, latent_dim: int, n_features: int, hidden: int, layers: int, num_classes: int = 0):
        super().__init__()
        self.net = _mlp([latent_dim + num_classes, *[hidden] * layers, n_features], nn.ReLU, final_activation=False)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z if onehot is None else torch.cat([z, onehot.to(z.dtype)], dim=1))


def mlp_discriminator(n_features: int, hidden: int, layers: int, num_classes: int = 0, pack: int = 1,
                      minibatch: bool = False) -> Discriminator:
    """pack * (d + K) inputs -> LeakyReLU(0.2) hidden layers (the features) -> logit."""
    body = _mlp([pack * (n_features + num_classes), *[hidden] * layers], _LeakyReLU, final_activation=True)
    return Discriminator(body, hidden, pack, minibatch)


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
