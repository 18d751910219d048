"""``genserve train`` as a user runs it: real subprocesses, real repository on disk."""

import subprocess
import sys

import numpy as np
import pytest

from genserve.cli import main
from serving.repository.layout import version_numbers
from serving.repository.manifest import Manifest


def genserve(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "genserve", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_train_publishes_a_new_version_each_run_and_keeps_the_old_ones(tmp_path):
    for expected in (1, 2):
        result = genserve("train", "gaussian", "--data", "grid25", "--out", tmp_path, "--name", "g")
        assert result.returncode == 0, result.stderr
        assert f"published {tmp_path / 'g' / str(expected)}" in result.stdout
    assert version_numbers(tmp_path / "g") == [1, 2]
    manifest = Manifest.model_validate_json((tmp_path / "g" / "2" / "manifest.json").read_text())
    assert manifest.dataset == "grid25" and manifest.family == "gaussian"


def test_train_reads_csv_rows_and_names_the_model_after_the_file(tmp_path):
    rows = np.random.default_rng(0).normal(size=(120, 3))
    np.savetxt(tmp_path / "sensors.csv", rows, delimiter=",")
    result = genserve("train", "gaussian", "--data", tmp_path / "sensors.csv", "--out", tmp_path / "repo",
                      "--contamination", "0.05")
    assert result.returncode == 0, result.stderr
    manifest = Manifest.model_validate_json((tmp_path / "repo" / "sensors-gaussian" / "1" / "manifest.json").read_text())
    assert manifest.input.shape == [3] and manifest.anomaly.contamination == 0.05


@pytest.mark.parametrize("args, message", [
    (["gmm", "--data", "grid25", "--kernel", "tophat"], "unrecognized arguments: --kernel"),
    (["kde", "--data", "grid25", "--bandwidth", "wide"], "expected FLOAT or scott or silverman or cv"),
    (["kde", "--data", "grid25", "--kernel", "triangle"], "invalid choice: 'triangle'"),
    (["gaussian", "--data", "missing.npy"], "no such file"),
    (["gaussian", "--data", "mnist"], "'mnist': expected one of ['digits'"),
    (["gaussian", "--data", "grid25", "--contamination", "2"], "expected a rate in (0, 1)"),
    (["flow", "--data", "grid25"], "invalid choice: 'flow'"),
])
def test_bad_train_calls_fail_with_a_message_naming_the_problem(tmp_path, capsys, args, message):
    # In-process (the same entry point as the console script) to spare a torch import per case.
    try:
        code = main(["train", *args, "--out", str(tmp_path)])
    except SystemExit as exit_:  # argparse rejects before any work
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written
