"""``genserve train`` under ``torchrun --standalone --nproc_per_node=2`` on CPU (gloo): both ranks
train a tiny minibatch model with DistributedDataParallel (``training.neural.train_data_parallel``),
end with identical parameters, and rank 0 alone evaluates, calibrates and publishes one version.

The family is ``ddp_toy_family.py`` (a diagonal Gaussian learned by Adam), registered by that
script before it hands over to the real command line, so the path under test is the one a user
takes: ``torchrun -m genserve train FAMILY ...`` differs only in where the family comes from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving.repository.layout import version_numbers
from serving.repository.manifest import Manifest

TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = Path(__file__).with_name("ddp_toy_family.py")


def test_two_ranks_train_identical_parameters_and_publish_once(tmp_path):
    markers, repo = tmp_path / "markers", tmp_path / "repo"
    markers.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT),
         "train", "ddp-toy", "--data", "grid25", "--out", str(repo), "--name", "toy",
         "--marker-dir", str(markers), "--epochs", "3"],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    digests = {p.name: p.read_text() for p in markers.glob("rank*.sha256")}
    assert set(digests) == {"rank0.sha256", "rank1.sha256"}         # both ranks trained
    assert digests["rank0.sha256"] == digests["rank1.sha256"]        # and ended identical
    assert sorted(p.name for p in markers.glob("evaluated-*")) == ["evaluated-rank0"]
    assert version_numbers(repo / "toy") == [1]                      # published once
    assert result.stdout.count("published") == 1

    manifest = Manifest.model_validate_json((repo / "toy" / "1" / "manifest.json").read_text())
    assert manifest.anomaly is not None                              # rank 0's refit did not hang
    assert manifest.metrics["last_epoch_loss"] < manifest.metrics["first_epoch_loss"]
