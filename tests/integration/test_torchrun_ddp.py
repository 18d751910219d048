"""``genserve train FAMILY`` under ``torchrun --standalone --nproc_per_node=2`` on CPU (gloo), for
every family trained by minibatches (vae, fvbn, gan, cyclegan): both ranks train a tiny model
with DistributedDataParallel, each on its own shard, and end with identical networks (DDP
averaged every gradient); rank 0 alone evaluates, calibrates and publishes one version.

torchrun runs ``ddp_record.py`` in place of ``-m genserve``: the same ``genserve.cli.main``, with
the family's ``fit_dataset``/``evaluate`` wrapped to leave per-rank markers (a checksum of the
fitted networks, an evaluation mark).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.repository.layout import version_numbers
from serving.repository.manifest import Manifest

TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = Path(__file__).with_name("ddp_record.py")
TINY = {
    "vae": ["--data", "digits", "--hidden", "16", "--layers", "1", "--latent-dim", "2", "--components", "1",
            "--epochs", "2", "--importance-samples", "4"],
    "fvbn": ["--data", "digits", "--hidden", "16", "--blocks", "1", "--components", "2", "--masks", "2",
             "--epochs", "2"],
    "gan": ["--data", "grid25", "--hidden", "16", "--layers", "1", "--steps", "30", "--batch-size", "32",
            "--resample", "1"],
    "cyclegan": ["--data", "digits-bold", "--width", "8", "--hidden", "32", "--epochs", "2", "--decay-epochs", "1",
                 "--batch-size", "64"],
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_two_ranks_train_identical_networks_and_publish_once(family, tmp_path):
    markers, repo = tmp_path / "markers", tmp_path / "repo"
    markers.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSERVE_TEST_MARKERS": str(markers),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT),
         "train", family, "--out", str(repo), "--name", "tiny", "--device", "cpu", *TINY[family]],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    digests = {p.name: p.read_text() for p in markers.glob("rank*.sha256")}
    assert set(digests) == {"rank0.sha256", "rank1.sha256"}         # both ranks trained
    assert digests["rank0.sha256"] == digests["rank1.sha256"]        # and ended identical
    assert sorted(p.name for p in markers.glob("evaluated-*")) == ["evaluated-rank0"]
    assert version_numbers(repo / "tiny") == [1]                     # published once
    assert result.stdout.count("published") == 1 and result.stdout.count("fitted in") == 1

    manifest = Manifest.model_validate_json((repo / "tiny" / "1" / "manifest.json").read_text())
    assert manifest.family == family
