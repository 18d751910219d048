"""C1 — CycleGAN on digits thin <-> bold (unpaired), translated through the served Translate call.

Protocol (BENCHMARKS.md C1): domain A is digits / 16 as 8x8 images in [0, 1], domain B their
``grey_dilation(a, size=(2, 2))``; the D1 split on indices, A from the even-positioned training
indices and B from the odd-positioned ones, so no pair is ever seen (``training.datasets``'s
``digits-bold``). For each recipe and training seed the ``cyclegan`` family is trained through
genserve's pipeline (``train_and_publish``: fit, evaluate, export with the parity check,
publish) into a temporary repository; a ``GenServeServer`` on a free loopback port serves it and
every translation below comes from ``GenServeClient.translate``:

* a2b — accuracy of a digit classifier trained on real B training images (scikit-learn
  ``MLPClassifier((128,), max_iter=800, random_state=0)``) on G(A_test); MAE of G(A_test)
  against the true dilation B_test;
* b2a — accuracy of the same classifier trained on real A training images on F(B_test); MAE of
  F(B_test) against A_test;
* held-out cycle L1 — mean |F(G(a)) - a| over A_test and |G(F(b)) - b| over B_test (served twice).

References, in the same run and on the same split: each classifier on the real test images of
its domain (ceiling) and on the untranslated images of the other domain (floor); the MAE of the
untranslated images; and, for b2a, a hand-made inverse that knows the protocol —
``grey_erosion(b, size=(2, 2))`` — which a learned F should match without being told.

Recipes: ``default`` (the family's defaults, the C1 recipe) and ``demo`` (the lighter
``digits-cyclegan`` model of ``genserve demo``). Goal: accuracy >= 0.92 and MAE <= 0.06, both
directions. Fit times are wall-clock on a shared 2-core machine (noisy); CPU seconds of the
training process are given beside them, closer to what a quiet machine takes.

    python bench/c1_digits_bold.py [--recipes default,demo] [--seeds 0,1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import log, machine_info, machine_line, print_table, write_results
from training.datasets import Dataset, digits_bold
from training.demo import DEMO_MODELS
from training.pipeline import train_and_publish

ACCURACY_GOAL, MAE_GOAL = 0.92, 0.06
RECIPES: dict[str, dict[str, Any]] = {"default": {}, "demo": DEMO_MODELS["digits-cyclegan"][2]}


class Server:
    """A GenServeServer on its own event-loop thread, bound to a free 127.0.0.1 port."""

    def __init__(self, repo: Path):
        from serving.config import Settings

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = Settings(repo=repo, host="127.0.0.1", port=0, metrics_port=0, providers=["CPUExecutionProvider"])
        self.server = self._call(self._create(settings))
        self._call(self.server.start(load=True))

    @staticmethod
    async def _create(settings: Any) -> Any:
        from serving.server import GenServeServer

        return GenServeServer(settings)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    @property
    def port(self) -> int:
        return self.server.port

    def close(self) -> None:
        try:
            self._call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def classifier(X: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MLPClassifier((128,), max_iter=800, random_state=0).fit(X, y)


def mae(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


def references(data: Dataset, on_b: Any, on_a: Any) -> list[dict[str, Any]]:
    from scipy.ndimage import grey_erosion

    eroded = np.stack([grey_erosion(b.reshape(8, 8), size=(2, 2)).ravel() for b in data.X_test_b])
    return [
        {"model": "real B_test (a2b ceiling)", "direction": "a2b", "accuracy": on_b.score(data.X_test_b, data.y_test),
         "mae": 0.0},
        {"model": "untranslated A_test (a2b floor)", "direction": "a2b",
         "accuracy": on_b.score(data.X_test, data.y_test), "mae": mae(data.X_test, data.X_test_b)},
        {"model": "real A_test (b2a ceiling)", "direction": "b2a", "accuracy": on_a.score(data.X_test, data.y_test),
         "mae": 0.0},
        {"model": "untranslated B_test (b2a floor)", "direction": "b2a",
         "accuracy": on_a.score(data.X_test_b, data.y_test), "mae": mae(data.X_test_b, data.X_test)},
        {"model": "grey_erosion(B_test, 2x2) (hand-made b2a)", "direction": "b2a",
         "accuracy": on_a.score(eroded, data.y_test), "mae": mae(eroded, data.X_test)},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {list(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--name", default="c1_digits_bold", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(recipes) - set(RECIPES):
        parser.error(f"--recipes: unknown {sorted(set(recipes) - set(RECIPES))}; expected some of {list(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    info = machine_info()
    log(machine_line(info))
    data = digits_bold()
    log("reference classifiers ...")
    on_b, on_a = classifier(data.X_train_b, data.y_train_b), classifier(data.X_train, data.y_train)
    refs = references(data, on_b, on_a)

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genserve-c1-") as tmp:
        repo = Path(tmp)
        for recipe in recipes:
            for seed in seeds:
                name = f"c1-{recipe}-seed{seed}"
                params = {**RECIPES[recipe], "random_state": seed, "verbose": False}
                log(f"[{name}] training with {params}")
                wall, cpu = time.perf_counter(), time.process_time()
                _, manifest = train_and_publish("cyclegan", data, repo, name, params, log=log)
                runs.append({"recipe": recipe, "seed": seed, "model": name,
                             "fit_seconds": manifest.metrics["fit_seconds"],
                             "pipeline_seconds": time.perf_counter() - wall,
                             "pipeline_cpu_seconds": time.process_time() - cpu,
                             "export_max_abs_diff": max(manifest.export_check.max_abs_diff.values()),
                             "hyperparameters": manifest.hyperparameters})
        from serving.client import GenServeClient

        server = Server(repo)
        try:
            with GenServeClient("127.0.0.1", server.port, timeout=120) as client:
                a, b = data.X_test.astype(np.float32), data.X_test_b.astype(np.float32)
                for run in runs:
                    g_a, f_b = client.translate(run["model"], a, "a2b"), client.translate(run["model"], b, "b2a")
                    run.update({
                        "accuracy_a2b": on_b.score(g_a, data.y_test), "mae_a2b": mae(g_a, data.X_test_b),
                        "accuracy_b2a": on_a.score(f_b, data.y_test), "mae_b2a": mae(f_b, data.X_test),
                        "cycle_l1_a": mae(client.translate(run["model"], g_a, "b2a"), data.X_test),
                        "cycle_l1_b": mae(client.translate(run["model"], f_b, "a2b"), data.X_test_b)})
                    run["goal_met"] = (run["accuracy_a2b"] >= ACCURACY_GOAL and run["mae_a2b"] <= MAE_GOAL
                                       and run["accuracy_b2a"] >= ACCURACY_GOAL and run["mae_b2a"] <= MAE_GOAL)
        finally:
            server.close()

    keys = ("accuracy_a2b", "mae_a2b", "accuracy_b2a", "mae_b2a", "cycle_l1_a", "cycle_l1_b", "fit_seconds",
            "pipeline_cpu_seconds")
    summary = {}
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        rows = [[r["seed"], *(r[k] for k in keys), r["goal_met"]] for r in mine]
        mean = {k: statistics.mean(r[k] for r in mine) for k in keys}
        mean["every_seed_meets_goal"] = all(r["goal_met"] for r in mine)
        summary[recipe] = mean
        rows.append(["mean", *(mean[k] for k in keys), mean["every_seed_meets_goal"]])
        print_table(f"C1 — `{recipe}` recipe, served Translate: {mine[0]['hyperparameters']}",
                    ["seed", "acc G(A)", "MAE G(A)", "acc F(B)", "MAE F(B)", "cycle A", "cycle B", "fit s (wall)",
                     "CPU s", "goal both ways"], [[_fmt(v) for v in row] for row in rows])
    print_table("C1 — summary (mean over seeds) and references, same split, same classifiers",
                ["model", "direction", "accuracy", "MAE"],
                [[f"genserve cyclegan `{k}`", d, _fmt(v[f"accuracy_{d}"]), _fmt(v[f"mae_{d}"])]
                 for k, v in summary.items() for d in ("a2b", "b2a")]
                + [[r["model"], r["direction"], _fmt(r["accuracy"]), _fmt(r["mae"])] for r in refs])
    print(f"\nGoal: accuracy ≥ {ACCURACY_GOAL} and MAE ≤ {MAE_GOAL} in both directions — "
          + ", ".join(f"`{k}`: {'met on every seed' if v['every_seed_meets_goal'] else 'NOT met on every seed'}"
                      for k, v in summary.items()))
    print(f"\nMachine: {machine_line(info)}")
    write_results(args.name, {"protocol": {"seeds": seeds, "torch_threads": args.threads,
                                           "accuracy_goal": ACCURACY_GOAL, "mae_goal": MAE_GOAL,
                                           "train_rows_a": len(data.X_train), "train_rows_b": len(data.X_train_b),
                                           "test_rows": len(data.X_test)},
                              "runs": runs, "summary": summary, "references": refs}, info)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return value


if __name__ == "__main__":
    main()
