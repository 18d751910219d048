"""The serving command line as real subprocesses: ``serve`` with SIGTERM, and ``client`` calls."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.client import GenServeClient

ROOT = Path(__file__).resolve().parents[2]
G = "grid25-gaussian"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


class StderrReader:
    """Reads a child's unbuffered stderr with a deadline (no blocking read, no hidden buffer)."""

    def __init__(self, process: subprocess.Popen):
        self.fd = process.stderr.fileno()
        self.text = ""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def until(self, pattern: str, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text)
            if match or time.monotonic() >= deadline:
                return match
            if self.selector.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return re.search(pattern, self.text)
                self.text += chunk.decode(errors="replace")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_serve_subprocess_answers_health_and_exits_cleanly_on_sigterm(serving_repo, loop):
    """Both event loops serve the domain API and the OIP (whose small requests take the batcher's
    event-loop path, the one that differs between them) and drain on SIGTERM."""
    import tritonclient.grpc as triton

    # The asyncio run also leaves glibc's malloc as it is (GENSERVE_MALLOC_KEEP_MB=0).
    keep = "64" if loop == "uvloop" else "0"
    env = {**os.environ, "GENSERVE_LOG_LEVEL": "INFO", "GENSERVE_MALLOC_KEEP_MB": keep}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--repo", str(serving_repo.path), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--drain-seconds", "5",
         "--event-loop", loop],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0, cwd=ROOT, env=env)
    stderr = StderrReader(process)
    try:
        match = stderr.until(r"gRPC on 127\.0\.0\.1:(\d+).*; (\w+) event loop", timeout=30)
        assert match, f"no startup line; stderr:\n{stderr.text}"
        port = int(match.group(1))
        assert match.group(2) == loop
        assert ("malloc keeps up to 64 MiB" in stderr.text) == (keep == "64"), stderr.text
        with GenServeClient("127.0.0.1", port, timeout=5) as client:
            deadline = time.monotonic() + 30
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.health() == "SERVING"
            scores = client.score(G, serving_repo.X_test[:3])
        x = triton.InferInput("x", [3, 2], "FP32")
        x.set_data_from_numpy(serving_repo.X_test[:3].astype(np.float32))
        oip = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            answers = [oip.infer(G, [x]).as_numpy("log_prob") for _ in range(3)]
        finally:
            oip.close()
        for answer in answers:
            np.testing.assert_allclose(answer, scores, rtol=1e-6)
        assert stderr.until(r"models available: .*grid25-gaussian v2", timeout=5), stderr.text
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert stderr.until(r"SIGTERM(.|\n)*stopped", timeout=5), stderr.text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_serve_rejects_bad_settings():
    result = cli("serve", "--repo", "/nonexistent/repo", "--port", "0")
    assert result.returncode == 2 and "--repo /nonexistent/repo is not a directory" in result.stderr
    result = cli("serve", "--repo", ".", "--port", "70000")
    assert result.returncode == 2 and "port" in result.stderr and "70000" in result.stderr
    result = cli("serve", "--repo", ".", "--port", "0", "--event-loop", "tornado")
    assert result.returncode == 2 and "event_loop" in result.stderr and "uvloop" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def port(server) -> str:
    return str(server.server.port)


def test_client_score_writes_npy(port, serving_repo, tmp_path):
    x = serving_repo.X_test[:40]
    np.save(tmp_path / "in.npy", x)
    result = cli("client", "score", "--port", port, "--model", G, "--input", str(tmp_path / "in.npy"),
                 "--output", str(tmp_path / "out.npy"))
    assert result.returncode == 0, result.stderr
    assert "scored 40 rows" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               serving_repo.estimator.log_prob(x.astype(np.float64)).numpy(), rtol=1e-5)


def test_client_bad_call_prints_status_and_exits_non_zero(port, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3), np.float32))
    result = cli("client", "score", "--port", port, "--model", G, "--input", str(tmp_path / "bad.npy"))
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "x: expected shape [N, 2], got [4, 3]" in result.stderr
    result = cli("client", "info", "--port", port, "--model", "nope")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr
    result = cli("client", "score", "--port", port, "--model", G, "--input", str(tmp_path / "missing.npy"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_client_list_info_detect_sample_translate(port, serving_repo, tmp_path):
    listed = cli("client", "list", "--port", port)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"grid25-gaussian\s+2\s+gaussian\s+AVAILABLE", listed.stdout)
    assert re.search(r"broken-json\s+1\s+-\s+UNAVAILABLE\s+manifest.json is not valid JSON", listed.stdout)

    info = cli("client", "info", "--port", port, "--model", G)
    assert info.returncode == 0 and "CPUExecutionProvider" in info.stdout and "anomaly threshold" in info.stdout

    np.savetxt(tmp_path / "in.csv", np.array([[0.0, 0.0], [40.0, 40.0]]), delimiter=",")
    detect = cli("client", "detect", "--port", port, "--model", G, "--input", str(tmp_path / "in.csv"),
                 "--contamination", "0.05", "--output", str(tmp_path / "flags.csv"))
    assert detect.returncode == 0, detect.stderr
    assert "request-contamination" in detect.stdout
    table = np.loadtxt(tmp_path / "flags.csv", delimiter=",", skiprows=1)
    assert table.shape == (2, 2) and table[1, 1] == 1.0

    sample = cli("client", "sample", "--port", port, "--model", G, "--n", "25", "--seed", "4",
                 "--output", str(tmp_path / "s.npy"))
    assert sample.returncode == 0, sample.stderr
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), serving_repo.estimator.sample(25, seed=4).numpy(),
                               rtol=1e-5, atol=1e-5)

    np.save(tmp_path / "t.npy", np.ones((2, 3), np.float32))
    translate = cli("client", "translate", "--port", port, "--model", serving_repo.translate, "--input",
                    str(tmp_path / "t.npy"), "--direction", "a2b", "--output", str(tmp_path / "y.npy"))
    assert translate.returncode == 0, translate.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.full((2, 3), 3.0))


def test_top_level_genserve_entry_runs_the_serving_commands(port):
    """``genserve client ...`` through genserve/cli.py, which calls ``serving.cli.register``."""
    pytest.importorskip("genserve.cli")
    result = subprocess.run([sys.executable, "-m", "genserve", "client", "list", "--port", port],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert re.search(r"grid25-gaussian\s+2\s+gaussian\s+AVAILABLE", result.stdout)
