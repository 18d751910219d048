"""The torchrun environment helpers the pipeline relies on (the torchrun run itself is
tests/integration/test_torchrun_ddp.py)."""

from __future__ import annotations

import os

from training.neural import distributed_from_env, single_process, torchrun_rank


def test_single_process_hides_the_world_and_restores_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert torchrun_rank() == 2
    with single_process():
        assert os.environ["WORLD_SIZE"] == "1"
        with distributed_from_env("cpu") as dist:  # no process group: nothing to wait for
            assert (dist.rank, dist.world_size, dist.active) == (0, 1, False)
    assert os.environ["WORLD_SIZE"] == "4"
    monkeypatch.delenv("WORLD_SIZE")
    with single_process():
        assert os.environ["WORLD_SIZE"] == "1"
    assert "WORLD_SIZE" not in os.environ


def test_rank_is_zero_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert torchrun_rank() == 0
