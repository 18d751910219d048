"""The fitted cores: the maths the exported ``score`` and ``sample`` graphs are made of.

``MadeCore`` holds the MADE ensemble's weights already multiplied by each member's masks,
stacked [M, in, out], so one batched product evaluates every member (no mask is recomputed in
the graph, and each weight is stored once in the ONNX file however often the graph uses it).

* Score: z, log|det| = transform(x); members' log p_m(z) [M, N] from one pass; the ensemble's
  log p(x) = logsumexp_m log p_m(z) - log M + log|det dz/dx|, and -inf outside the support.
  The net runs in float32 (a neural net's own precision); the transform, the per-row sums and the
  log-mean-exp over members in float64.
* Sample: a uniform picks the member m of each row (m = floor(M u), clamped); then D steps, one
  per position in the ordering: every member's net runs on the partial z (all members at once,
  as in scoring), each row keeps its own member's parameters for the feature that member samples
  at this step, draws it (``mog.sample``: a uniform picks the component, a normal scales it) and
  writes it in place. After D steps z is complete and x = transform.inverse(z). Computed in
  float64 so that torch and onnxruntime agree to rounding: a component chosen by comparing a
  uniform with cumulative weights would otherwise flip, now and then, on a float32 difference.
  The cost is M x D passes of the net per batch of samples, the price of an exact autoregressive
  sampler with an ensemble.

``LarcCore`` is the logistic autoregressive net for binary rows:
p(x_d = 1 | x_<d) = sigmoid(b_d + sum_{j<d} W_dj x_j), with log p(x) = sum_d x_d a_d - softplus(a_d)
(a = b + W x); rows that are not binary have probability 0 (log p = -inf). Sampling thresholds a
uniform against sigmoid(a_d), one feature after the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.fvbn import mog
from training.estimators.fvbn.made import MADE
from training.estimators.fvbn.masks import ordering_of
from training.estimators.fvbn.transform import DataTransform


class MadeCore(nn.Module):
    def __init__(self, net: MADE, transform: DataTransform):
        super().__init__()
        self.transform = transform
        self.n_masks, self.n_features, self.n_components = net.n_masks, net.n_features, net.n_components
        layers = net.masked_layers()
        self.n_blocks = len(net.blocks)
        K3 = 3 * self.n_components
        for name, (weight, bias) in layers.items():
            w = weight.transpose(1, 2).contiguous()  # [M, in, out]
            self.register_buffer(f"{name}_w", w.float())
            if bias is not None:
                self.register_buffer(f"{name}_b", bias.float())
        # Sampling, float64: the hidden layers as they are; the output and direct layers joined
        # ([relu(h), z] @ [W_out; W_dir]) and rearranged by step: step_w[t] [M, H + D, 3K] holds
        # the columns of the feature that member m samples at step t, step_b[t] [M, 1, 3K].
        order = ordering_of(net.deg_in)  # [M, D]
        self.register_buffer("order", order)
        for name, (weight, bias) in layers.items():
            if name not in ("out", "direct"):
                self.register_buffer(f"{name}_w64", weight.transpose(1, 2).to(torch.float64).contiguous())
                self.register_buffer(f"{name}_b64", bias.to(torch.float64))
        M, D = self.n_masks, self.n_features
        joined = torch.cat([layers["out"][0], layers["direct"][0]], dim=2).to(torch.float64)  # [M, D*3K, H+D]
        joined = joined.reshape(M, D, K3, -1)
        members = torch.arange(M)
        self.register_buffer("step_w", torch.stack(
            [joined[members, order[:, t]].transpose(1, 2) for t in range(D)]).contiguous())  # [D, M, H+D, 3K]
        out_bias = layers["out"][1].to(torch.float64).reshape(D, K3)
        self.register_buffer("step_b", out_bias[order.T].unsqueeze(2).contiguous())  # [D, M, 1, 3K]
        # step_onehot[t, m, 0, d] = 1 where member m samples feature d at step t
        self.register_buffer("step_onehot", nn.functional.one_hot(order.T, D).to(torch.float64).unsqueeze(2))
        self.register_buffer("components", torch.arange(self.n_components, dtype=torch.float64))
        self.register_buffer("zero_chains", torch.zeros(M, 1, D, dtype=torch.float64))
        self.register_buffer("member_ids", torch.arange(M, dtype=torch.float64).reshape(M, 1, 1))

    # ---- the net: every member at once ---------------------------------------------------------
    def _hidden(self, z: torch.Tensor, suffix: str) -> torch.Tensor:
        """Last hidden layer of every member, [M, N, H], for z [N, D] (or [M, N, D])."""
        def layer(name: str, inputs: torch.Tensor) -> torch.Tensor:
            return torch.matmul(inputs, getattr(self, f"{name}_w{suffix}")) + getattr(self, f"{name}_b{suffix}")

        h = layer("inp", z)
        for i in range(self.n_blocks):
            h = h + layer(f"block{i}b", torch.relu(layer(f"block{i}a", torch.relu(h))))
        return torch.relu(h)

    def member_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """log p_m(z) [M, N], float64, for z float32 [N, D]."""
        out = torch.matmul(self._hidden(z, ""), self.out_w) + self.out_b + torch.matmul(z, self.direct_w)
        raw = out.reshape(self.n_masks, z.shape[0], self.n_features, 3 * self.n_components)
        return mog.log_density(raw, z, self.n_components).to(torch.float64).sum(dim=2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det = self.transform(x)
        members = self.member_log_probs(z.to(torch.float32))
        log_p = mog.log_sum_exp(members, dim=0) - math.log(self.n_masks) + log_det
        return torch.where(self.transform.inside(x), log_p, torch.full_like(log_p, -math.inf))

    # ---- sampling --------------------------------------------------------------------------------
    def noise_specs(self) -> list[TensorSpec]:
        D = self.n_features
        return [TensorSpec(name="u_member", shape=[-1], noise="uniform"),
                TensorSpec(name="u_component", shape=[-1, D], noise="uniform"),
                TensorSpec(name="e", shape=[-1, D], noise="normal")]

    def sample_from_noise(self, u_member: torch.Tensor, u_component: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Every member samples its own chain [M, N, D] in its own order, sharing the noise; each
        row then keeps the chain of its member m = floor(M u_member): a draw from the ensemble."""
        M, D = self.n_masks, self.n_features
        u_steps = u_component.to(torch.float64).split(1, dim=1)  # D x [N, 1]
        e_steps = e.to(torch.float64).split(1, dim=1)
        # [M, N, D] zeros built by broadcasting (not from a computed shape), so that onnxruntime's
        # shape inference keeps the batch axis symbolic and can reuse buffers across the D steps.
        z = (e_steps[0] * 0.0).unsqueeze(0) + self.zero_chains
        for t in range(D):
            features = torch.cat([self._hidden(z, "64"), z], dim=2)               # [M, N, H + D]
            raw = torch.matmul(features, self.step_w[t]) + self.step_b[t]          # [M, N, 3K]
            value = mog.sample(raw, u_steps[t], e_steps[t], self.components)      # [M, N, 1]
            z = z + self.step_onehot[t] * value
        member = torch.clamp(torch.floor(u_member.to(torch.float64) * M), max=M - 1)
        pick = (member.reshape(1, -1, 1) == self.member_ids).to(torch.float64)    # [M, N, 1]
        return self.transform.inverse((pick * z).sum(dim=0))


class LarcCore(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.n_features = bias.shape[0]
        self.register_buffer("weight", torch.tril(weight.to(torch.float64), diagonal=-1))  # [D, D], W_dj, j < d
        self.register_buffer("bias", bias.to(torch.float64))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + x @ self.weight.T

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        a = self.logits(x)
        softplus = torch.relu(a) + torch.log1p(torch.exp(-torch.abs(a)))
        log_p = (x * a - softplus).sum(dim=1)
        binary = ((x == 0) | (x == 1)).all(dim=1)
        return torch.where(binary, log_p, torch.full_like(log_p, -math.inf))

    def noise_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name="u", shape=[-1, self.n_features], noise="uniform")]

    def sample_from_noise(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(torch.float64)
        columns = [(u[:, 0] < torch.sigmoid(self.bias[0])).to(torch.float64)]
        for d in range(1, self.n_features):
            a = self.bias[d] + torch.stack(columns, dim=1) @ self.weight[d, :d]
            columns.append((u[:, d] < torch.sigmoid(a)).to(torch.float64))
        return torch.stack(columns, dim=1)
