"""S2 — kernel density scoring speed: scikit-learn's exact KernelDensity against genserve's
torch estimator, its exported ONNX graph in onnxruntime in-process, and the same graph served
over gRPC (``ScoreDensity``) by a ``genserve serve`` process on loopback.

Data: 10,000 training points and 10,000 queries in 64 dimensions, standard normal, drawn from
``numpy.random.default_rng(0)`` (training rows first) and rounded to float32, so that every path
— float64 scikit-learn and torch, float32 ONNX inputs — sees the very same numbers. Gaussian
kernel, bandwidth 2.0 by default: at h = 1 the nearest training point carries most of each
query's density (median share 58 %), at h = 2 the median largest share is about 2 % and about
400 points contribute (the script measures and prints this), so the sum is really a sum.

Timed (median of ``--repeats`` runs, after one warm-up run for all but scikit-learn):
* scikit-learn ``KernelDensity(kernel="gaussian", bandwidth=h, rtol=0).score_samples`` — exact;
* genserve torch estimator ``log_prob`` (float64, torch's default threads), all queries in one
  call (a [10k, 10k] float64 distance matrix) and in chunks of ``--chunk`` rows;
* the published ``score.onnx`` in onnxruntime in-process, CPU provider, intra-op threads 2 and 1,
  all queries in one run;
* the served graph: ``python -m genserve serve`` in a separate process on a free 127.0.0.1 port,
  the KDE published into a temporary repository with ``training.publish.publish``; the client
  (``serving.client.GenServeClient``) sends the queries in chunks of ``--chunk`` rows, in two
  server configurations: the defaults (intra-op 1 thread, one worker thread per core) with two
  requests in flight, and intra-op 2 threads with one worker and one request in flight.

Every path's output is compared with scikit-learn's: max |ours - sklearn| / |sklearn|, goal
<= 1e-5. scikit-learn's tree KDE is not exact at small bandwidths (see bench/common.py), so its
values are themselves checked against a brute-force float64 computation on the first 500 queries. Speed goal: >= 10x scikit-learn through the served graph.

    python bench/s2_kde_speed.py [--quick] [--bandwidth 2.0] [--repeats 3] [--chunk 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import (REPO_ROOT, exact_gaussian_kde, log, machine_info, machine_line, max_rel_diff, print_table,
                    time_call, write_results)

EXACT_CHECK_QUERIES = 500


def make_data(n_train: int, n_query: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_train, d)).astype(np.float32).astype(np.float64)
    Q = rng.standard_normal((n_query, d)).astype(np.float32).astype(np.float64)
    return X, Q


def dominance(X: np.ndarray, Q: np.ndarray, h: float, rows: int = 1000) -> dict[str, float]:
    """How many training points a query's density rests on: median largest share and 1/sum w^2."""
    q = Q[:rows]
    d2 = np.maximum((q * q).sum(1)[:, None] + (X * X).sum(1)[None, :] - 2.0 * q @ X.T, 0.0)
    a = -d2 / (2 * h * h)
    w = np.exp(a - a.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return {"queries": len(q), "median_largest_share": float(np.median(w.max(axis=1))),
            "median_effective_points": float(np.median(1.0 / (w * w).sum(axis=1)))}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m genserve serve`` in its own process; stopped with SIGTERM (it drains)."""

    def __init__(self, repo: Path, extra: list[str], log_path: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "genserve", "serve", "--repo", str(repo), "--port", str(self.port),
               "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--log-level", "WARNING", *extra]
        self.command = " ".join(cmd[1:])
        self.log_file = open(log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, client: Any, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_file.name}")
            try:
                if client.health(timeout=2.0) == "SERVING":
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout} s; see {self.log_file.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def score_served(client: Any, model: str, Q32: np.ndarray, chunk: int, in_flight: int) -> np.ndarray:
    parts = [Q32[i:i + chunk] for i in range(0, len(Q32), chunk)]
    if in_flight <= 1:
        return np.concatenate([client.score(model, p, timeout=600) for p in parts])
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        return np.concatenate(list(pool.map(lambda p: client.score(model, p, timeout=600), parts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bandwidth", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    parser.add_argument("--chunk", type=int, default=1000, help="rows per ScoreDensity request")
    parser.add_argument("--sklearn-subset", type=int, default=0,
                        help="time scikit-learn on this many queries only and scale (0 = all; the "
                             "reference values for the accuracy check are always computed on all)")
    parser.add_argument("--skip-served", action="store_true", help="no gRPC server")
    parser.add_argument("--quick", action="store_true", help="2,000 x 2,000 points, 1 repeat")
    parser.add_argument("--name", default="s2_kde_speed", help="results file stem")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_query, args.repeats = 2000, 2000, 1
    info = machine_info()

    import onnxruntime as ort
    import torch
    from sklearn.neighbors import KernelDensity as SkKernelDensity

    from training import registry
    from training.datasets import Dataset
    from training.publish import publish

    info = machine_info()  # again, now that torch is imported (threads)
    h, d = args.bandwidth, args.dim
    X, Q = make_data(args.n_train, args.n_query, d)
    Q32 = Q.astype(np.float32)
    spread = dominance(X, Q, h)
    log(f"S2: {len(X)} training points, {len(Q)} queries, d={d}, h={h}; {spread}")
    rows: list[dict[str, Any]] = []

    # ---- scikit-learn reference ----
    sk = SkKernelDensity(kernel="gaussian", bandwidth=h, rtol=0.0).fit(X)
    log("scikit-learn score_samples (exact, rtol=0) ...")
    if args.sklearn_subset and args.sklearn_subset < len(Q):
        sub = Q[:args.sklearn_subset]
        stats, _ = time_call(lambda: sk.score_samples(sub), args.repeats)
        scale = len(Q) / len(sub)
        for key in ("median_s", "min_s", "max_s"):
            stats[key] *= scale
        stats["runs_s"] = [t * scale for t in stats["runs_s"]]
        stats["scaled_from_queries"] = len(sub)
        reference = sk.score_samples(Q)
        note = f"timed on {len(sub)} queries, scaled ×{scale:g}"
    else:
        stats, reference = time_call(lambda: sk.score_samples(Q), args.repeats)
        note = "rtol=0, atol=0 (tree; checked against brute force)"
    sk_s = stats["median_s"]
    exact = exact_gaussian_kde(X, Q[:EXACT_CHECK_QUERIES], h)
    sk_vs_exact = max_rel_diff(reference[:EXACT_CHECK_QUERIES], exact)
    log(f"  scikit-learn vs brute force on {EXACT_CHECK_QUERIES} queries: max rel diff {sk_vs_exact:.1e}")
    rows.append({"path": "scikit-learn KernelDensity.score_samples", "timing": stats, "max_rel_diff": 0.0,
                 "note": note})
    log(f"  {sk_s:.2f} s")

    # ---- torch estimator ----
    estimator = registry.get("kde").create(kernel="gaussian", bandwidth=h).fit(X)
    log(f"torch estimator log_prob ({torch.get_num_threads()} threads) ...")
    stats, out = time_call(lambda: estimator.log_prob(Q).numpy(), args.repeats, warmup=1)
    rows.append({"path": f"genserve torch estimator log_prob (float64, {torch.get_num_threads()} threads)",
                 "timing": stats, "max_rel_diff": max_rel_diff(out, reference), "note": "all queries at once"})
    log(f"torch estimator log_prob in chunks of {args.chunk} rows ...")
    stats, out = time_call(lambda: np.concatenate([estimator.log_prob(Q[i:i + args.chunk]).numpy()
                                                   for i in range(0, len(Q), args.chunk)]), args.repeats, warmup=1)
    rows.append({"path": f"genserve torch estimator log_prob (float64, {torch.get_num_threads()} threads), chunked",
                 "timing": stats, "max_rel_diff": max_rel_diff(out, reference),
                 "note": f"chunks of {args.chunk} rows"})

    with tempfile.TemporaryDirectory(prefix="genserve-s2-") as tmp:
        repo = Path(tmp) / "repo"
        data = Dataset("s2-gaussian64", X, Q[:256])
        started = time.perf_counter()
        path, manifest = publish(estimator, repo, "s2-kde", data, calibration=None, metrics={},
                                 description=f"S2 benchmark KDE, gaussian kernel, h={h}")
        publish_s = time.perf_counter() - started
        onnx_path = path / manifest.graphs["score"].file
        log(f"published {path} in {publish_s:.1f} s (export check {manifest.export_check.max_rel_diff})")

        # ---- onnxruntime in-process ----
        for threads in (2, 1):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            log(f"onnxruntime in-process, {threads} thread(s) ...")
            stats, out = time_call(lambda: session.run(["log_prob"], {"x": Q32})[0], args.repeats, warmup=1)
            rows.append({"path": f"onnxruntime in-process, CPU, intra-op {threads} thread(s)", "timing": stats,
                         "max_rel_diff": max_rel_diff(out, reference), "note": "all queries in one run"})
            del session

        # ---- served over gRPC ----
        served_configs = [
            ("server defaults (intra-op 1, worker threads = cores), 2 requests in flight", [], 2),
            ("server --intra-op-threads 2 --worker-threads 1, 1 request in flight",
             ["--intra-op-threads", "2", "--worker-threads", "1"], 1),
        ]
        if not args.skip_served:
            from serving.client import GenServeClient

            for label, extra, in_flight in served_configs:
                server = ServerProcess(repo, extra, Path(tmp) / "server.log")
                try:
                    with GenServeClient("127.0.0.1", server.port, timeout=600) as client:
                        server.wait_ready(client)
                        details = client.get_model("s2-kde")
                        log(f"served ({label}) on port {server.port}, providers {details.providers} ...")
                        stats, out = time_call(lambda: score_served(client, "s2-kde", Q32, args.chunk, in_flight),
                                               args.repeats, warmup=1)
                    rows.append({"path": f"served gRPC ScoreDensity: {label}", "timing": stats,
                                 "max_rel_diff": max_rel_diff(out, reference),
                                 "note": f"chunks of {args.chunk} rows, client in this process",
                                 "server_command": server.command, "providers": details.providers})
                except Exception as error:
                    log(f"  failed: {error}")
                    log_text = (Path(tmp) / "server.log").read_text()[-2000:]
                    rows.append({"path": f"served gRPC ScoreDensity: {label}", "status": "error",
                                 "note": f"{type(error).__name__}: {error}", "server_log_tail": log_text})
                finally:
                    server.stop()

    for r in rows:
        if "timing" in r:
            t = r["timing"]["median_s"]
            r.update(seconds=t, queries_per_s=len(Q) / t, speedup_vs_sklearn=sk_s / t,
                     accuracy_met=r["max_rel_diff"] <= 1e-5)
    served = [r for r in rows if r["path"].startswith("served") and "seconds" in r]
    goal = {"served_speedup_goal": 10.0,
            "best_served_speedup": max((r["speedup_vs_sklearn"] for r in served), default=None)}
    goal["met"] = goal["best_served_speedup"] is not None and goal["best_served_speedup"] >= 10.0

    print(f"## S2 — kernel density scoring speed (CPU)\n\n{machine_line(info)}\n\n"
          f"{len(X):,} training points, {len(Q):,} queries, {d} dimensions, standard normal (seed 0), "
          f"gaussian kernel, bandwidth {h:g}: median largest single-point share of a query's density "
          f"{spread['median_largest_share']:.1%}, median effective number of points "
          f"{spread['median_effective_points']:.0f} (over {spread['queries']} queries). "
          f"scikit-learn's values agree with a brute-force float64 computation to {sk_vs_exact:.1e} relative "
          f"(first {EXACT_CHECK_QUERIES} queries). Timings are medians of {args.repeats} runs. "
          "No GPU is lent to this run.")
    print_table("Scoring 10,000 queries" if len(Q) == 10_000 else f"Scoring {len(Q):,} queries",
                ["path", "seconds (median)", "queries/s", "speed-up vs scikit-learn", "max rel diff vs scikit-learn",
                 "≤ 1e-5", "note"],
                [[r["path"], f"{r['seconds']:.3f}" if "seconds" in r else r.get("status"),
                  f"{r['queries_per_s']:,.0f}" if "seconds" in r else "–",
                  f"{r['speedup_vs_sklearn']:.1f}×" if "seconds" in r else "–",
                  f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "–",
                  r.get("accuracy_met", "–"), r.get("note", "")] for r in rows])
    if goal["best_served_speedup"] is not None:
        print(f"\nGoal ≥ 10× scikit-learn through the served graph: best {goal['best_served_speedup']:.1f}× — "
              f"{'met' if goal['met'] else 'NOT met'}.")
    write_results(args.name, {"protocol": "BENCHMARKS.md S2", "n_train": len(X), "n_query": len(Q), "dim": d,
                              "bandwidth": h, "data": "standard normal, default_rng(0), rounded to float32",
                              "density_spread": spread,
                              "sklearn_vs_bruteforce_max_rel_diff": sk_vs_exact,
                              "bruteforce_check_queries": EXACT_CHECK_QUERIES, "publish_seconds": publish_s, "chunk_rows": args.chunk,
                              "rows": rows, "goal": goal, "gpu": "none lent"}, info)


if __name__ == "__main__":
    main()
