"""``training.neural.train_data_parallel`` in one process (the torchrun case is
tests/integration/test_torchrun_ddp.py), and the torchrun environment helpers."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from training.neural import single_process, torchrun_rank, train_data_parallel


class Residual(nn.Module):
    """Every tensor of the batch reaches the model (as labels reach a conditional model)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x).squeeze(1)
        return out if y is None else out - y


def test_minibatch_training_lowers_the_loss_and_logs_each_epoch():
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    model = Residual()
    history = train_data_parallel(model, lambda residual, xb, yb: (residual ** 2).mean(), (x, y),
                                  epochs=30, batch_size=32, lr=0.05, device="cpu")
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert history[-1]["loss"] < 0.01 * history[0]["loss"]
    assert not model.training  # handed back in eval mode
    torch.testing.assert_close(model.linear.weight.detach(), torch.tensor([[1.0, -2.0, 0.5]]), atol=0.05, rtol=0)


@pytest.mark.parametrize("kwargs, message", [({"epochs": 0}, "epochs must be an int >= 1"),
                                             ({"batch_size": 0}, "batch_size must be an int >= 1")])
def test_bad_loop_settings_are_named(kwargs, message):
    settings = {"epochs": 1, "batch_size": 8, "lr": 0.1, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        train_data_parallel(Residual(), lambda out, xb: out.mean(), torch.zeros(4, 3), **settings)


def test_single_process_hides_the_world_and_restores_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert torchrun_rank() == 2
    with single_process():
        assert os.environ["WORLD_SIZE"] == "1"
    assert os.environ["WORLD_SIZE"] == "4"
    monkeypatch.delenv("WORLD_SIZE")
    with single_process():
        assert os.environ["WORLD_SIZE"] == "1"
    assert "WORLD_SIZE" not in os.environ
