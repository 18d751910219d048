"""Score graphs with the float64 log-sum-exp tail against the served one (float32 exponentials).

The two S1 graphs, fitted by ``bench/s1_serving.py``'s ``fit_estimators`` (a 16-component diagonal
GMM on scikit-learn's digits; a gaussian KDE on 10,000 standard-normal points in 64-D, h = 2), are
exported twice from the same fitted core: once with the core's float64 ``log_prob`` (what every
score graph computed before ``training/estimators/logsumexp.py``) and once as published
(``ScoreGraph``: the core's ``served_log_prob``). Each graph runs in onnxruntime in-process, CPU
provider, one intra-op thread (what a genserve worker runs), on the S1 request sizes; timed as
the median per-run time of ``--runs`` runs, in ``--rounds`` interleaved rounds (the machine's
speed drifts, so the two versions take turns), the table showing the median over rounds.
Accuracy: max |graph - float64 log_prob| over the rows, in nats and in float32 ulps of the value.

    python bench/served_tail.py [--rounds 5] [--runs 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from common import log, machine_info, machine_line, print_table, time_call, write_results
from s1_serving import fit_estimators
from serving.repository.manifest import TensorSpec
from training.estimators.base import ExportGraph, ScoreGraph
from training.export import export_onnx


class Float64TailScore(torch.nn.Module):
    """The score graph as it was: the core's float64 ``log_prob`` all the way."""

    def __init__(self, core: torch.nn.Module):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.log_prob(x.to(torch.float64)).to(torch.float32)


def request_rows() -> dict[str, np.ndarray]:
    """Rows of each graph's kind, 1,024 of them: the S1 requests' uniform rows for the GMM,
    standard-normal ones like its points for the KDE."""
    rng = np.random.default_rng(1)
    return {"gmm": rng.random((1024, 64), dtype=np.float32),
            "kde": rng.standard_normal((1024, 64)).astype(np.float32)}


def session(module: torch.nn.Module, x: np.ndarray, path: Path) -> ort.InferenceSession:
    graph = ExportGraph("score", module.eval(), [TensorSpec(name="x", shape=[-1, 64])],
                        [TensorSpec(name="log_prob", shape=[-1])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(graph, path, {"x": x})
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=300, help="runs per timing (a tenth for the KDE's 64 rows)")
    args = parser.parse_args()
    info = machine_info()
    cases = {"gmm": [1, 64, 1024], "kde": [1, 64]}
    rows_out, results = [], []
    with tempfile.TemporaryDirectory(prefix="genserve-tail-") as tmp:
        rows_of = request_rows()
        for name, (estimator, _) in fit_estimators(list(cases)).items():
            core, x = estimator.core_, rows_of[name]
            exact = core.log_prob(torch.from_numpy(x).double()).numpy()
            graphs = {"float64 tail": session(Float64TailScore(core), x[:8], Path(tmp) / f"{name}-64.onnx"),
                      "served (float32 exp)": session(ScoreGraph(core), x[:8], Path(tmp) / f"{name}-32.onnx")}
            error = {}
            for label, s in graphs.items():
                diff = np.abs(s.run(None, {"x": x})[0].astype(np.float64) - exact)
                error[label] = (float(diff.max()), float((diff / np.spacing(np.abs(exact).astype(np.float32))).max()))
            for rows in cases[name]:
                feed = {"x": x[:rows]}
                runs = args.runs if name == "gmm" or rows == 1 else max(10, args.runs // 10)
                timings: dict[str, list[float]] = {label: [] for label in graphs}
                for _ in range(args.rounds):
                    for label, s in graphs.items():
                        timings[label].append(time_call(lambda: s.run(None, feed), repeats=runs)[0]["median_s"])
                old, new = (statistics.median(timings[label]) for label in graphs)
                log(f"  {name} {rows} rows: {old * 1e6:.0f} -> {new * 1e6:.0f} us")
                rows_out.append([name, rows, f"{old * 1e6:,.0f}", f"{new * 1e6:,.0f}", f"{old / new:.2f}x",
                                 f"{error['float64 tail'][1]:.2f} / {error['served (float32 exp)'][1]:.2f}"])
                results.append({"graph": name, "rows": rows, "float64_tail_s": timings["float64 tail"],
                                "served_s": timings["served (float32 exp)"], "speedup": old / new,
                                "max_abs_err_nats": {k: v[0] for k, v in error.items()},
                                "max_err_float32_ulps": {k: v[1] for k, v in error.items()}})
    print(f"## Served log-sum-exp tail (onnxruntime in-process, 1 intra-op thread)\n{machine_line(info)}\n"
          f"Median per-run time, median of {args.rounds} interleaved rounds.")
    print_table("float64 tail vs served graph", ["graph", "rows", "float64 tail µs", "served µs", "speed-up",
                                                 "max error, float32 ulps (float64 / served)"], rows_out)
    write_results("served_tail", {"rounds": args.rounds, "runs": args.runs, "cases": results}, info)


if __name__ == "__main__":
    main()
