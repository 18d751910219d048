"""log sum_j exp(a_ij) over finite float64 terms, as max + log(sum(exp(a - max))), with the
exponentials in float64 (fitting, ``log_prob``) or float32 (the served score graphs).

Spelled out rather than ``torch.logsumexp`` so that the exporter emits plain ReduceMax / Exp /
ReduceSum / Log. The terms must be finite (a mixture's log weights plus Gaussian log-densities, a
gaussian kernel's exponents); a compact kernel's -inf terms use ``kde.logsumexp_rows``.

The clamp. ``Exp``'s argument d = a - max <= 0 is clamped at ``EXP_FLOORS[dtype]``, because
onnxruntime's ``Exp`` is slow on results that underflow (float64) or are subnormal (float32):
* float64, at -700: a term below exp(-700) cannot change a sum that holds exp(0) = 1 (float64's
  epsilon is 2e-16), so the result is unchanged to the last bit; a 1,024-row, 16-component GMM run
  on S1's rows took 768 us unclamped, 252 us clamped, with identical outputs (252 us on zeros).
* float32, at -87: exp(-87) = 1.6e-38 is above float32's smallest normal (1.2e-38). A clamped term
  counts as 1.6e-38 instead of less, where the sum holds 1, so the clamp changes s by at most
  n * 1.6e-38 relative (a prototype of the GMM graph, 3 interleaved rounds: 300-465 us unclamped,
  195-320 us clamped).

Why float32 exponentials for serving. onnxruntime's float64 ``Exp`` is scalar code: on the S1
graphs it was the largest node, 111 of ~400 us in a 1,024-row, 16-component GMM run and 3.4 of
7.4 ms in a 64-row run of the 10,000-point KDE, against 11 us and a few hundred us for the float32
``Exp`` (vectorised). The error: with m = max_j a_ij (float64, exact), every term is exp(d_ij)
and the largest is exp(0) = 1. Rounding d to float32 moves it by at most |d| * 2^-24, so a term
changes by that relative amount, and the sum s = sum_j exp(d_ij) by at most 2^-24 times the
exp-weighted mean of |d|, which is at most ln(n) + 1 (the terms far below the max weigh almost
nothing): for n = 10,000 points, a relative error below 6e-7 in s, i.e. below 6e-7 nats in
log p = m + log s, plus float32 ``Exp``'s own ulp or two. The served output is float32, whose
rounding of |log p| ~ 100 (a 64-dimensional density) is 4e-6 nats; and an error of e nats in
log p is a relative error e in the density p itself. The terms are summed in float64 (n float32
roundings of the partial sums would cost up to n * 2^-24 instead).

Only the exported score graphs take float32 exponentials; the estimators' own ``log_prob`` (EM,
cross-validation, the comparisons with scikit-learn and scipy at 1e-9) stays float64 throughout.
"""

from __future__ import annotations

import torch

EXP_FLOORS = {torch.float64: -700.0, torch.float32: -87.0}


def finite_log_sum_exp(a: torch.Tensor, exp_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """log sum_j exp(a[:, j]) for finite float64 ``a`` [N, n]: float64 [N], exponentials in ``exp_dtype``."""
    m = a.amax(dim=1, keepdim=True)
    terms = torch.exp(torch.clamp((a - m).to(exp_dtype), min=EXP_FLOORS[exp_dtype]))
    return m.squeeze(1) + torch.log(terms.to(torch.float64).sum(dim=1))
