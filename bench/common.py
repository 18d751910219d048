"""Shared helpers for the benchmark scripts: machine info, Markdown tables, JSON results, timing.

Imported by every ``bench/<name>.py`` (run as ``python bench/<name>.py`` from the repository
root, which puts ``bench/`` on ``sys.path``). Running this file itself does nothing but print
the machine description, so ``make bench`` (which runs every ``bench/*.py``) is unaffected.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

_PACKAGES = ("numpy", "scipy", "torch", "onnxruntime-gpu", "onnxruntime", "onnx", "scikit-learn", "pyod",
             "grpcio", "protobuf", "genserve")


# ---- what the digits benchmarks fit -------------------------------------------------------------
# Parameters each registry family is created with on digits (D1, fit cost): the families' own
# searches, all on the training rows only ("cv" bandwidth, "auto" k, "auto" components).
DIGITS_FAMILY_PARAMS: dict[str, dict[str, Any]] = {
    "gaussian": {},
    "histogram": {"bins": "auto"},
    "kde": {"kernel": "gaussian", "bandwidth": "cv"},
    "knn": {"k": "auto"},
    "gmm": {"n_components": "auto", "covariance_type": "auto"},
}
HISTOGRAM_NA = "n/a — histograms are for d ≤ 3"


def other_families() -> list[str]:
    """Registered families the digits scripts do not run by default (neural, sequence, ...)."""
    from training import registry

    return [name for name in registry.FAMILIES if name not in DIGITS_FAMILY_PARAMS]


# ---- an exact, independent kernel density reference ------------------------------------------------
# scikit-learn's tree-based KernelDensity is *not* exact at small bandwidths even with
# rtol=atol=0 (scikit-learn issues #25799 and #27186: the node bounds go wrong once kernel values
# underflow); on digits at h ~ 0.1 it overstates the test log-likelihood by ~11 nats/image. So the
# benchmarks also compare against this brute-force float64 computation: explicit differences
# (no ||x||^2 + ||y||^2 - 2 x.y expansion, unlike genserve's graph) and scipy's logsumexp.
def exact_sq_distances(train: np.ndarray, queries: np.ndarray, max_elements: int = 1 << 25) -> np.ndarray:
    """[len(queries), len(train)] squared Euclidean distances from explicit differences."""
    train = np.asarray(train, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    out = np.empty((len(queries), len(train)))
    rows = max(1, max_elements // (train.shape[0] * train.shape[1]))
    for start in range(0, len(queries), rows):
        diff = queries[start:start + rows, None, :] - train[None, :, :]
        out[start:start + rows] = np.einsum("ijk,ijk->ij", diff, diff)
    return out


def exact_gaussian_kde_from_sq(sq: np.ndarray, d: int, h: float) -> np.ndarray:
    """log p of each query row for squared distances ``sq`` [queries, n_train], bandwidth h."""
    from scipy.special import logsumexp

    n = sq.shape[1]
    return logsumexp(-sq / (2.0 * h * h), axis=1) - math.log(n) - 0.5 * d * math.log(2 * math.pi) - d * math.log(h)


def exact_gaussian_kde(train: np.ndarray, queries: np.ndarray, h: float) -> np.ndarray:
    return exact_gaussian_kde_from_sq(exact_sq_distances(train, queries), np.shape(train)[1], h)


def max_rel_diff(values: np.ndarray, reference: np.ndarray) -> float:
    """max |values - reference| / |reference| (the S2 / D1 identity criterion)."""
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-300)))


# ---- machine and software ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured: CPU, cores, memory, versions, date, commit."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # The machine may be shared: other processes' load inflates wall-clock timings.
        "loadavg_1_5_15_at_start": load_average(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    v = info["versions"]
    ort = v.get("onnxruntime-gpu") or v.get("onnxruntime")
    return (f"{info['cpu_model']}, {info['cpus_usable'] or info['cpu_count']} cores, {info['memory_gib']} GiB; "
            f"python {info['python']}, torch {v.get('torch')}, onnxruntime {ort}, "
            f"scikit-learn {v.get('scikit-learn')}, pyod {v.get('pyod')}; {info['date_utc']}; "
            f"commit {(info['git_commit'] or '?')[:10]}{' (dirty)' if info['git_dirty'] else ''}; "
            f"load average at start {info['loadavg_1_5_15_at_start']} (1/5/15 min)")


# ---- tables --------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats to ``digits`` decimals, infinities spelled out, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "+inf" if value > 0 else "−inf"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_sci(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells that are not strings go through ``fmt``."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n### {title}\n")
    print(markdown_table(headers, rows))
    sys.stdout.flush()


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


# ---- results -------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan: "inf", "-inf", "nan"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(name: str, results: dict[str, Any], info: dict[str, Any] | None = None) -> Path:
    """Write ``bench/results/<name>.json`` atomically, with the machine description."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    info = dict(info or machine_info())
    info["loadavg_1_5_15_at_end"] = load_average()
    payload = {"benchmark": name, "machine": info, **results}
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"\nLoad average at end {info['loadavg_1_5_15_at_end']} (1/5/15 min) on {info['cpus_usable']} cores. "
          f"Results written to {path.relative_to(REPO_ROOT)}")
    return path


# ---- timing --------------------------------------------------------------------------------------
def _stats(times: list[float], repeats: int, warmup: int) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs_s": times, "repeats": repeats, "warmup": warmup}


def interleaved_timings(fns: dict[str, Callable[[], Any]], repeats: int = 3,
                        warmup: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Time several alternatives in rounds (each round runs every one once, in order), so that a
    change in the machine's background load hits all of them alike; ``warmup`` names run once
    untimed first. Returns timing stats per name and each one's last result."""
    last: dict[str, Any] = {}
    for name in warmup:
        last[name] = fns[name]()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            last[name] = fn()
            runs[name].append(time.perf_counter() - started)
        log(f"  round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1]:.2f} s" for n in fns))
    return {n: _stats(runs[n], repeats, int(n in warmup)) for n in fns}, last


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> tuple[dict[str, Any], Any]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; return timing stats (seconds) and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return _stats(times, repeats, warmup), result


if __name__ == "__main__":
    print(machine_line())
