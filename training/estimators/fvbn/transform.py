"""The fixed, invertible map from data space to the space the autoregressive net models.

Bounded data (digits lie in (0, 1) after dequantisation) is a poor fit for Gaussian mixtures,
whose tails spill mass outside the box. So, as in RealNVP (Dinh et al. 2017), the net models

    s = alpha + (1 - 2 alpha) x,     y = logit(s) = log s - log(1 - s),     z = (y - m) / c

(``m`` and ``c`` the per-feature mean and standard deviation of y on the training rows, so the
net sees standardised inputs). The map is a bijection from the open interval

    x in ( -alpha / (1 - 2 alpha),  1 + alpha / (1 - 2 alpha) )  — slightly wider than [0, 1] —

onto R^d, and the change of variables gives the exact data-space density

    log p_x(x) = log p_z(z) + sum_d log |dz_d / dx_d|,
    log |dz_d / dx_d| = log(1 - 2 alpha) - log s_d - log(1 - s_d) - log c_d.

Outside that interval the density is zero (log p = -inf). ``alpha`` keeps s away from 0 and 1,
where the logit's slope is unbounded. With ``kind="affine"`` (unbounded data) only the
standardisation is applied: z = (x - m) / c, log-det = -sum log c.

Everything here runs in float64: log s and log(1 - s) of values near 0 or 1 lose precision in
float32, and the log-determinant is summed over every feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TRANSFORMS = ("logit", "affine")


class DataTransform(nn.Module):
    """x float64 [N, d] <-> z [N, d], with the log-determinant of dz/dx."""

    def __init__(self, kind: str, alpha: float, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if kind not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {kind!r}")
        self.kind = kind
        self.alpha = float(alpha)
        self.register_buffer("shift", shift.to(torch.float64))
        self.register_buffer("scale", scale.to(torch.float64))
        # The open interval of x the map is defined on (the model's support per feature).
        pad = self.alpha / (1.0 - 2.0 * self.alpha) if kind == "logit" else math.inf
        self.low, self.high = -pad, 1.0 + pad

    @classmethod
    def fit(cls, x: torch.Tensor, kind: str, alpha: float) -> "DataTransform":
        """The transform whose standardisation is fitted to training rows ``x`` float64 [n, d]."""
        identity = cls(kind, alpha, torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
        y = identity.pre_standardise(x)
        scale = y.std(dim=0) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=x.dtype)
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))  # constant feature: leave it
        return cls(kind, alpha, y.mean(dim=0), scale)

    def pre_standardise(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "affine":
            return x
        s = self.alpha + (1.0 - 2.0 * self.alpha) * x
        return torch.log(s) - torch.log1p(-s)

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """bool [N]: every feature of the row inside the support."""
        if self.kind == "affine":
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return ((x > self.low) & (x < self.high)).all(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [N, d], log|det dz/dx| [N]) for rows inside the support; a row outside gets a
        finite placeholder z (so the net's arithmetic stays finite) and must be masked by
        ``inside`` — the caller sets its log-density to -inf."""
        log_scale = torch.log(self.scale).sum()
        if self.kind == "affine":
            return (x - self.shift) / self.scale, (-log_scale).expand(x.shape[0])
        safe = torch.clamp(x, 0.0, 1.0)  # placeholder for rows outside the support
        x = torch.where((x > self.low) & (x < self.high), x, safe)
        s = self.alpha + (1.0 - 2.0 * self.alpha) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        z = (log_s - log_1ms - self.shift) / self.scale
        log_det = (math.log(1.0 - 2.0 * self.alpha) - log_s - log_1ms).sum(dim=1) - log_scale
        return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """x from z (float64), the exact inverse of ``forward`` on the support."""
        y = z.to(torch.float64) * self.scale + self.shift
        if self.kind == "affine":
            return y
        return (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)
