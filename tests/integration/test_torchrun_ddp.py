"""``genserve train vae`` under ``torchrun --standalone --nproc_per_node=2`` on CPU (gloo): both
ranks train a tiny VAE with DistributedDataParallel, each on its own shard, and end with
identical parameters (DDP averaged every gradient); rank 0 alone evaluates, calibrates and
publishes one version.

torchrun runs ``ddp_record.py`` in place of ``-m genserve``: the same ``genserve.cli.main``, with
the VAE's ``fit_dataset``/``evaluate`` wrapped to leave per-rank markers (a parameter checksum,
an evaluation mark).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving.repository.layout import version_numbers
from serving.repository.manifest import Manifest

TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = Path(__file__).with_name("ddp_record.py")
TINY_VAE = ["--hidden", "16", "--layers", "1", "--latent-dim", "2", "--components", "1", "--epochs", "2",
            "--importance-samples", "4", "--device", "cpu"]


def test_two_ranks_train_identical_parameters_and_publish_once(tmp_path):
    markers, repo = tmp_path / "markers", tmp_path / "repo"
    markers.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSERVE_TEST_MARKERS": str(markers),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT),
         "train", "vae", "--data", "digits", "--out", str(repo), "--name", "tiny", *TINY_VAE],
        capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    digests = {p.name: p.read_text() for p in markers.glob("rank*.sha256")}
    assert set(digests) == {"rank0.sha256", "rank1.sha256"}         # both ranks trained
    assert digests["rank0.sha256"] == digests["rank1.sha256"]        # and ended identical
    assert sorted(p.name for p in markers.glob("evaluated-*")) == ["evaluated-rank0"]
    assert version_numbers(repo / "tiny") == [1]                     # published once
    assert result.stdout.count("published") == 1 and result.stdout.count("fitted in") == 1

    manifest = Manifest.model_validate_json((repo / "tiny" / "1" / "manifest.json").read_text())
    assert manifest.family == "vae" and manifest.anomaly is not None
