"""The VAE's networks: the data transform, MLP and convolutional encoders and decoders.

The nets work on 2-D batches [rows, features]; ``VAECore`` (``vae_core``) flattens its
samples-by-classes axes into rows before calling them.

Encoder: y [N, D] (+ one-hot class [N, C]) -> (mean [N, L], log_var [N, L]) of q(z|x).
Decoder: z [N, L] (+ one-hot class) -> per feature a mixture of M Gaussians in the transformed
space: (logits, mean, log_scale), each [N, D, M].

The convolutional pair (``architecture="conv"``) sees each row as a one-channel H x W image
(H and W divisible by 4): two stride-2 convolutions down to (H/4) x (W/4), a dense layer to the
latent; the decoder mirrors it with two stride-2 transposed convolutions and a 3x3 convolution
giving the 3M mixture parameters per pixel. The class, when conditional, joins at the dense
layers (after the convolutions of the encoder, before those of the decoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TRANSFORMS = ("logit", "gaussian")
# Smallest log standard deviation of a decoder component (in standardised transformed units):
# keeps a component from collapsing onto one training value and the density from diverging.
LOG_SCALE_MIN = -7.0
LOG_VAR_BOUNDS = (-16.0, 10.0)  # the encoder's log-variance, clamped for numerical safety


class DataTransform(nn.Module):
    """The fixed invertible map x -> y in which the decoder's Gaussians live, with its Jacobian.

    ``kind="logit"`` (data in [0, 1], e.g. dequantised pixels), as in RealNVP:

        s = alpha + (1 - 2 alpha) x,   y = (logit(s) - shift) / scale,
        log|dy/dx| = sum_d [ log(1 - 2 alpha) - log s_d - log(1 - s_d) - log scale_d ],

    a bijection from x_d in (-alpha/(1-2alpha), 1 + alpha/(1-2alpha)) onto R; outside that
    interval the density is 0 (log p = -inf). ``kind="gaussian"`` (any real rows) only
    standardises: y = (x - shift) / scale, log|dy/dx| = -sum_d log scale_d. shift and scale are
    the per-feature mean and standard deviation of the training rows in the pre-standardised
    space, so the nets see standardised inputs.
    """

    def __init__(self, kind: str, alpha: float, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if kind not in TRANSFORMS:
            raise ValueError(f"likelihood must be one of {TRANSFORMS}, got {kind!r}")
        self.kind = kind
        self.alpha = float(alpha)
        self.register_buffer("shift", shift.float())
        self.register_buffer("scale", scale.float())
        pad = self.alpha / (1.0 - 2.0 * self.alpha) if kind == "logit" else math.inf
        self.low, self.high = -pad, 1.0 + pad

    @classmethod
    def fit(cls, x: torch.Tensor, kind: str, alpha: float) -> "DataTransform":
        """Fit shift and scale on training rows ``x`` [n, D] (constant features keep scale 1)."""
        identity = cls(kind, alpha, torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
        y = identity.unstandardised(x.float())
        scale = y.std(dim=0) if x.shape[0] > 1 else torch.ones(x.shape[1])
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        return cls(kind, alpha, y.mean(dim=0), scale)

    def unstandardised(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gaussian":
            return x
        s = self.alpha + (1.0 - 2.0 * self.alpha) * x
        return torch.log(s) - torch.log1p(-s)

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """bool [N]: the row lies in the support (always, for ``gaussian``)."""
        if self.kind == "gaussian":
            return torch.ones_like(x[:, 0], dtype=torch.bool)
        return ((x > self.low) & (x < self.high)).all(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [N, D], log|dy/dx| [N]). Rows outside the support get a finite placeholder, to be
        masked with ``inside`` by the caller."""
        log_scale = torch.log(self.scale).sum()
        if self.kind == "gaussian":
            return (x - self.shift) / self.scale, (-log_scale).expand(x.shape[:-1])
        safe = torch.where((x > self.low) & (x < self.high), x, torch.clamp(x, 0.0, 1.0))
        s = self.alpha + (1.0 - 2.0 * self.alpha) * safe
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        y = (log_s - log_1ms - self.shift) / self.scale
        log_det = (math.log(1.0 - 2.0 * self.alpha) - log_s - log_1ms).sum(dim=-1) - log_scale
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """x from y: the exact inverse of ``forward`` on the support."""
        t = y * self.scale + self.shift
        if self.kind == "gaussian":
            return t
        return (torch.sigmoid(t) - self.alpha) / (1.0 - 2.0 * self.alpha)

    def mean_of(self, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """E[x] for y ~ N(mean, exp(log_scale)^2) per feature ([..., D, M] -> [..., D, M]).

        Exact for ``gaussian``. For ``logit``, E[sigmoid(t)] with t ~ N(m, s^2) has no closed
        form; we use the probit approximation sigmoid(m / sqrt(1 + pi s^2 / 8)) (MacKay 1992).
        """
        m = mean * self.scale.unsqueeze(-1) + self.shift.unsqueeze(-1)
        if self.kind == "gaussian":
            return m
        s = torch.exp(log_scale) * self.scale.unsqueeze(-1)
        p = torch.sigmoid(m * torch.rsqrt(1.0 + (math.pi / 8.0) * s * s))
        return (p - self.alpha) / (1.0 - 2.0 * self.alpha)


def he_init(module: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights for ReLU nets and zero biases, in place.

    The convolutional pair needs it: with PyTorch's default initialisation each of its five
    layers shrinks the signal by about sqrt(6), so at the start the decoder's output hardly
    depends on z and the encoder's mean hardly on x; the KL term then pulls q(z|x) onto the prior
    before the reconstruction term can make z useful (posterior collapse: measured KL ~0.01 nats,
    no active latent dimension). With He initialisation z matters from the first step.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return module


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvFeatures(nn.Module):
    """[N, H*W] -> [N, 64 * H/4 * W/4]: the convolutional encoder's body."""

    def __init__(self, height: int, width: int, channels: int = 16):
        super().__init__()
        self.height, self.width = height, width
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 4, stride=2, padding=1), nn.ReLU())
        self.out_features = 2 * channels * (height // 4) * (width // 4)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y.reshape(-1, 1, self.height, self.width)).flatten(1)


class ConvPixels(nn.Module):
    """[N, 64 * H/4 * W/4] -> [N, H*W, P]: the convolutional decoder's body (P per pixel)."""

    def __init__(self, height: int, width: int, per_pixel: int, channels: int = 16):
        super().__init__()
        self.height, self.width, self.channels = height, width, 2 * channels
        self.in_features = 2 * channels * (height // 4) * (width // 4)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, 2 * channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, per_pixel, 3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.net(F.relu(h).reshape(-1, self.channels, self.height // 4, self.width // 4))
        return out.flatten(2).transpose(1, 2)  # [N, P, H*W] -> [N, H*W, P]


class Encoder(nn.Module):
    """q(z|x): y [N, D] (+ one-hot [N, C]) -> (mean, log_var) [N, L]."""

    def __init__(self, n_features: int, latent_dim: int, hidden: int, layers: int, num_classes: int,
                 image: tuple[int, int] | None = None):
        super().__init__()
        self.body = ConvFeatures(*image) if image else nn.Identity()
        width = self.body.out_features if image else n_features
        self.head = mlp([width + num_classes, *[hidden] * layers, 2 * latent_dim])
        self.latent_dim = latent_dim
        if image:
            he_init(self)

    def forward(self, y: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(y)
        if onehot is not None:
            h = torch.cat([h, onehot], dim=-1)
        out = self.head(h)
        mean, log_var = out[:, :self.latent_dim], out[:, self.latent_dim:]
        return mean, torch.clamp(log_var, *LOG_VAR_BOUNDS)


class Decoder(nn.Module):
    """p(x|z): z [N, L] (+ one-hot [N, C]) -> (logits, mean, log_scale) [N, D, M] in y-space."""

    def __init__(self, n_features: int, latent_dim: int, hidden: int, layers: int, num_classes: int,
                 components: int, image: tuple[int, int] | None = None):
        super().__init__()
        self.n_features, self.components = n_features, components
        per_pixel = 3 * components
        if image:
            self.body: nn.Module = ConvPixels(*image, per_pixel)
            out = self.body.in_features
        else:
            self.body = nn.Identity()
            out = n_features * per_pixel
        self.head = mlp([latent_dim + num_classes, *[hidden] * layers, out])
        if image:
            he_init(self)

    def forward(self, z: torch.Tensor, onehot: torch.Tensor | None = None):
        if onehot is not None:
            z = torch.cat([z, onehot], dim=-1)
        params = self.body(self.head(z)).reshape(-1, self.n_features, 3 * self.components)
        m = self.components
        logits, mean, raw = params[..., :m], params[..., m:2 * m], params[..., 2 * m:]
        log_scale = LOG_SCALE_MIN + F.softplus(raw - LOG_SCALE_MIN)
        return logits, mean, log_scale
