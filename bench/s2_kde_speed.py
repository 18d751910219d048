"""S2 — kernel density scoring speed: scikit-learn's exact KernelDensity against genserve's
torch estimator, its exported ONNX graph in onnxruntime in-process, and the same graph served
over gRPC (``ScoreDensity``) by a ``genserve serve`` process on loopback.

Data: 10,000 training points and 10,000 queries in 64 dimensions, standard normal, drawn from
``numpy.random.default_rng(0)`` (training rows first) and rounded to float32, so that every path
— float64 scikit-learn and torch, float32 ONNX inputs — sees the very same numbers. Gaussian
kernel, bandwidth 2.0 by default: at h = 1 the nearest training point carries most of each
query's density (median share 58 %), at h = 2 the median largest share is about 2 % and about
400 points contribute (the script measures and prints this), so the sum is really a sum.

Timed: median of ``--repeats`` interleaved rounds, each running every path once in turn (the
machine may be shared, and interleaving makes a change of background load hit every path
alike), after one warm-up run for all but scikit-learn:
* scikit-learn ``KernelDensity(kernel="gaussian", bandwidth=h, rtol=0).score_samples`` — exact;
* genserve torch estimator ``log_prob`` (float64, torch's default threads), all queries in one
  call (a [10k, 10k] float64 distance matrix) and in chunks of ``--chunk`` rows;
* the published ``score.onnx`` in onnxruntime in-process, CPU provider, intra-op threads 2 and 1,
  all queries in one run and in chunks of ``--chunk`` rows (what the served path sends);
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
import contextlib
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

from common import (REPO_ROOT, exact_gaussian_kde, interleaved_timings, log, machine_info, machine_line,
                    max_rel_diff, print_table, write_results)

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

    estimator = registry.get("kde").create(kernel="gaussian", bandwidth=h).fit(X)
    sk = SkKernelDensity(kernel="gaussian", bandwidth=h, rtol=0.0).fit(X)
    threads = torch.get_num_threads()
    # name -> (label, callable returning log p for all of Q, note)
    paths: dict[str, tuple[str, Callable[[], np.ndarray], str]] = {}
    scale = 1.0
    if args.sklearn_subset and args.sklearn_subset < len(Q):
        sub = Q[:args.sklearn_subset]
        scale = len(Q) / len(sub)
        paths["sklearn"] = ("scikit-learn KernelDensity.score_samples", lambda: sk.score_samples(sub),
                            f"rtol=0, atol=0 (tree); timed on {len(sub)} queries, scaled ×{scale:g}")
    else:
        paths["sklearn"] = ("scikit-learn KernelDensity.score_samples", lambda: sk.score_samples(Q),
                            "rtol=0, atol=0 (tree; checked against brute force)")
    log("scikit-learn reference values ...")
    reference = sk.score_samples(Q)
    exact = exact_gaussian_kde(X, Q[:EXACT_CHECK_QUERIES], h)
    sk_vs_exact = max_rel_diff(reference[:EXACT_CHECK_QUERIES], exact)
    log(f"  scikit-learn vs brute force on {EXACT_CHECK_QUERIES} queries: max rel diff {sk_vs_exact:.1e}")
    paths["torch"] = (f"genserve torch estimator log_prob (float64, {threads} threads)",
                      lambda: estimator.log_prob(Q).numpy(), "all queries in one call")
    paths["torch-chunked"] = (f"genserve torch estimator log_prob (float64, {threads} threads), chunked",
                              lambda: np.concatenate([estimator.log_prob(Q[i:i + args.chunk]).numpy()
                                                      for i in range(0, len(Q), args.chunk)]),
                              f"chunks of {args.chunk} rows")
    extra_info: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="genserve-s2-") as tmp, contextlib.ExitStack() as stack:
        repo = Path(tmp) / "repo"
        data = Dataset("s2-gaussian64", X, Q[:256])
        started = time.perf_counter()
        path, manifest = publish(estimator, repo, "s2-kde", data, calibration=None, metrics={},
                                 description=f"S2 benchmark KDE, gaussian kernel, h={h}")
        publish_s = time.perf_counter() - started
        onnx_path = path / manifest.graphs["score"].file
        log(f"published {path} in {publish_s:.1f} s (export check {manifest.export_check.max_rel_diff})")

        for n_threads in (2, 1):
            options = ort.SessionOptions()
            options.intra_op_num_threads = n_threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            paths[f"ort-{n_threads}"] = (f"onnxruntime in-process, CPU, intra-op {n_threads} thread(s)",
                                         lambda s=session: s.run(["log_prob"], {"x": Q32})[0],
                                         "the published score.onnx, all queries in one run")
            paths[f"ort-{n_threads}-chunked"] = (
                f"onnxruntime in-process, CPU, intra-op {n_threads} thread(s), chunked",
                lambda s=session: np.concatenate([s.run(["log_prob"], {"x": Q32[i:i + args.chunk]})[0]
                                                  for i in range(0, len(Q32), args.chunk)]),
                f"the published score.onnx, chunks of {args.chunk} rows (as the served path)")

        served_configs = [
            ("served-default", "served gRPC ScoreDensity: server defaults (intra-op 1, worker threads = cores), "
                               "2 requests in flight", [], 2),
            ("served-intra2", "served gRPC ScoreDensity: server --intra-op-threads 2 --worker-threads 1, "
                              "1 request in flight", ["--intra-op-threads", "2", "--worker-threads", "1"], 1),
        ]
        if not args.skip_served:
            from serving.client import GenServeClient

            for key, label, extra, in_flight in served_configs:
                server = ServerProcess(repo, extra, Path(tmp) / f"{key}.log")
                stack.callback(server.stop)
                try:
                    client = stack.enter_context(GenServeClient("127.0.0.1", server.port, timeout=600))
                    server.wait_ready(client)
                    details = client.get_model("s2-kde")
                except Exception as error:
                    log(f"  {label} failed to start: {error}")
                    errors.append({"path": label, "status": "error", "note": f"{type(error).__name__}: {error}",
                                   "server_log_tail": (Path(tmp) / f"{key}.log").read_text()[-2000:]})
                    continue
                log(f"{label}: port {server.port}, providers {details.providers}")
                paths[key] = (label, lambda c=client, k=in_flight: score_served(c, "s2-kde", Q32, args.chunk, k),
                              f"chunks of {args.chunk} rows, client in this process")
                extra_info[key] = {"server_command": server.command, "providers": details.providers}

        log(f"timing {len(paths)} paths in {args.repeats} interleaved rounds ...")
        timings, outputs = interleaved_timings({k: v[1] for k, v in paths.items()}, args.repeats,
                                               warmup=[k for k in paths if k != "sklearn"])

    for key, (label, _, note) in paths.items():
        stats = timings[key]
        if key == "sklearn" and scale != 1.0:
            stats = {**stats, "scaled_from_queries": len(Q) / scale,
                     **{k: stats[k] * scale for k in ("median_s", "min_s", "max_s")},
                     "runs_s": [t * scale for t in stats["runs_s"]]}
        out = reference if key == "sklearn" else outputs[key]
        rows.append({"path": label, "key": key, "timing": stats, "max_rel_diff": max_rel_diff(out, reference),
                     "note": note, **extra_info.get(key, {})})
    rows += errors
    sk_s = rows[0]["timing"]["median_s"]

    for r in rows:
        if "timing" in r:
            t = r["timing"]["median_s"]
            r.update(seconds=t, queries_per_s=len(Q) / t, speedup_vs_sklearn=sk_s / t,
                     accuracy_met=r["max_rel_diff"] <= 1e-5)
    served = [r for r in rows if r.get("key", "").startswith("served") and "seconds" in r]
    goal = {"served_speedup_goal": 10.0,
            "best_served_speedup": max((r["speedup_vs_sklearn"] for r in served), default=None)}
    goal["met"] = goal["best_served_speedup"] is not None and goal["best_served_speedup"] >= 10.0

    print(f"## S2 — kernel density scoring speed (CPU)\n\n{machine_line(info)}\n\n"
          f"{len(X):,} training points, {len(Q):,} queries, {d} dimensions, standard normal (seed 0), "
          f"gaussian kernel, bandwidth {h:g}: median largest single-point share of a query's density "
          f"{spread['median_largest_share']:.1%}, median effective number of points "
          f"{spread['median_effective_points']:.0f} (over {spread['queries']} queries). "
          f"scikit-learn's values agree with a brute-force float64 computation to {sk_vs_exact:.1e} relative "
          f"(first {EXACT_CHECK_QUERIES} queries). Timings are medians of {args.repeats} interleaved rounds "
          f"(each round runs every path once; all but scikit-learn warmed up once first). "
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
