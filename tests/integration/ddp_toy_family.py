"""A tiny minibatch-trained family, run by ``test_torchrun_ddp`` as ``torchrun ... this_file.py
train ddp-toy ...``: it registers itself and hands over to the real ``genserve`` command line.

The model is a diagonal Gaussian whose mean and log-scale are learned by Adam on the negative
log-likelihood through ``training.neural.train_data_parallel``. Each rank starts from its own
random parameters (seeded by its rank), so identical parameters after training show that DDP
broadcast rank 0's and averaged every gradient. Every rank writes the sha256 of its
state_dict, and every call of ``evaluate`` leaves a marker, into ``--marker-dir``.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import ExportGraph, GenerativeEstimator, ScoreGraph
from training.neural import torchrun_rank, train_data_parallel


class DiagonalGaussian(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mean = nn.Parameter(torch.randn(d, dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) * torch.exp(-self.log_scale)
        return (-0.5 * z * z - self.log_scale - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def negative_log_likelihood(log_p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -log_p.mean()


class ToyEstimator(GenerativeEstimator):
    family = "ddp-toy"

    def __init__(self, marker_dir: str = ".", epochs: int = 3, batch_size: int = 50, lr: float = 0.05):
        self.marker_dir, self.epochs, self.batch_size, self.lr = marker_dir, epochs, batch_size, lr

    def get_params(self) -> dict[str, Any]:
        return {"marker_dir": self.marker_dir, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}

    def _train(self, X: np.ndarray) -> DiagonalGaussian:
        torch.manual_seed(torchrun_rank())  # a different start on every rank
        net = DiagonalGaussian(X.shape[1])
        self.history_ = train_data_parallel(net, negative_log_likelihood, torch.as_tensor(X, dtype=torch.float64),
                                            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, device="cpu")
        return net

    def fit(self, X: Any, y: Any = None) -> "ToyEstimator":
        self.net_ = self._train(np.asarray(X))
        state = b"".join(t.detach().numpy().tobytes() for t in self.net_.state_dict().values())
        (Path(self.marker_dir) / f"rank{torchrun_rank()}.sha256").write_text(hashlib.sha256(state).hexdigest())
        return self

    def evaluate(self, data: Any) -> dict[str, float]:
        (Path(self.marker_dir) / f"evaluated-rank{torchrun_rank()}").touch()
        with torch.no_grad():
            return {"test_log_likelihood": float(self.net_.log_prob(torch.as_tensor(data.X_test)).mean()),
                    "first_epoch_loss": self.history_[0]["loss"], "last_epoch_loss": self.history_[-1]["loss"]}

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray:
        # A refit on half the rows (scored on the other half): rank 0 trains alone here, after
        # the other rank has left, which hangs unless the pipeline runs it as a single process.
        half = len(data.X_train) // 2
        net = self._train(data.X_train[:half])
        with torch.no_grad():
            return -net.log_prob(torch.as_tensor(data.X_train[half:])).numpy()

    def export_graphs(self) -> list[ExportGraph]:
        d = self.net_.mean.shape[0]
        return [ExportGraph("score", ScoreGraph(self.net_).eval(), [TensorSpec(name="x", shape=[-1, d])],
                            [TensorSpec(name="log_prob", shape=[-1])])]

    def save_pictures(self, data: Any, folder: Any, title: str) -> None:
        pass  # no matplotlib import: the test is about processes, not pictures


if __name__ == "__main__":
    from genserve.cli import main
    from training import registry

    registry.FAMILIES["ddp-toy"] = registry.Family(
        "ddp-toy", "__main__:ToyEstimator", "diagonal Gaussian by minibatch Adam (torchrun test)",
        (registry.Option("--marker-dir", "marker_dir", str, "where each rank writes its markers"),
         registry.Option("--epochs", "epochs", int, "epochs")))
    sys.exit(main(sys.argv[1:]))
