"""The log-sum-exp of a served score graph, with its exponentials in float32.

Why. A mixture's or a kernel density's log-density ends in log sum_j exp(a_ij) over float64
terms, and onnxruntime's float64 ``Exp`` is scalar code: on the S1 graphs it was the largest
node, 111 of ~400 us in a 1,024-row, 16-component GMM run and 3.4 of 7.4 ms in a 64-row run of
the 10,000-point KDE, against 11 us and a few hundred us for the float32 ``Exp`` (vectorised).

The maths. With m = max_j a_ij (float64, exact), every term is exp(d_ij), d_ij = a_ij - m <= 0,
and the largest is exp(0) = 1. Rounding d to float32 moves it by at most |d| * 2^-24, so a term
changes by that relative amount, and the sum s = sum_j exp(d_ij) by at most 2^-24 times the
exp-weighted mean of |d|, which is at most ln(n) + 1 (the terms that are far below the max
weigh almost nothing): for n = 10,000 points, a relative error below 6e-7 in s, i.e. below 6e-7
nats in log p = m + log s, plus float32 ``Exp``'s own ulp or two. The served output is float32,
whose rounding of |log p| ~ 100 (a 64-dimensional density) is 4e-6 nats; and an error of e
nats in log p is a relative error e in the density p itself. The terms are summed in float64
(n float32 roundings of the partial sums would cost up to n * 2^-24 instead).

``d`` is clamped at ``FLOAT32_EXP_FLOOR`` so that no ``Exp`` meets a subnormal result, which
onnxruntime computes slowly (a prototype of the GMM graph above, 3 interleaved rounds: 300-465 us
unclamped, 195-320 us clamped). A clamped term counts as exp(-87) = 1.7e-38 instead of less,
where the sum holds 1, so the clamp changes s by at most n * 1.7e-38 relative. That needs finite
terms: a row of -inf terms (a compact kernel's empty support) would become n * 1.7e-38 instead
of 0, so those kernels keep the float64 tail.

Only the exported score graphs use this; the estimators' own ``log_prob`` (EM, cross-validation,
the comparisons with scikit-learn and scipy at 1e-9) stays float64 throughout.
"""

from __future__ import annotations

import torch

FLOAT32_EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, above float32's smallest normal (1.2e-38)


def log_sum_exp_float32_exp(a: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(a[:, j]) for finite float64 ``a`` [N, n]: float64 [N], float32 exponentials."""
    m = a.amax(dim=1, keepdim=True)
    terms = torch.exp(torch.clamp((a - m).to(torch.float32), min=FLOAT32_EXP_FLOOR))
    return m.squeeze(1) + torch.log(terms.to(torch.float64).sum(dim=1))
