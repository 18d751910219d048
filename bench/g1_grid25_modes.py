"""G1 — GAN mode coverage on the 5x5 grid (the VEEGAN/PacGAN protocol), through the served Sample call.

Protocol (BENCHMARKS.md G1): 25 Gaussians with means {-4,-2,0,2,4}^2 and sigma 0.05, equal
weights. For each training seed 0..4 the GAN is trained with ``genserve``'s pipeline
(``train_and_publish``: fit, evaluate, calibrate, export with the parity check, publish) into a
temporary model repository; a ``GenServeServer`` on a free loopback port then serves that
repository and 2,500 samples per model are drawn with ``GenServeClient.sample`` (request seed 0).
A sample is high-quality if it lies within 3 sigma of its nearest mean; a mode is captured if at
least one high-quality sample is nearest to it. Goal: 25/25 modes with >= 95 % high-quality
samples on every seed.

Recipes (``--recipes``), each a set of ``gan`` hyper-parameters (the registry's defaults otherwise):

* ``default`` — the family's default recipe: tanh MLP generator (z in 2-D), PacGAN4 discriminator
  on coarse-to-fine Fourier features (128 frequencies switched on over the first 75 % of the
  steps), non-saturating loss with R1 = 0.0125, 3,000 steps of 256 rows, Adam 1e-3 (beta1 0.5)
  decaying linearly to 0, and IMLE's coverage term at weight 3 in the generator's loss (each real
  row of a batch pulls its nearest fake); then importance resampling: a per-sample classifier of real rows vs the
  frozen generator's samples (the same Fourier MLP, unpacked, 1,000 steps) weighs 16 candidates
  per served sample, and the sample graph picks one with probability softmax(logits);
* ``no-resample`` — the same game with ``resample=1``: the generator's samples as they come;
* ``no-coverage`` — the default recipe without the coverage term (``coverage_weight=0``);
* ``nonsaturating`` — the plain non-saturating GAN: ReLU generator, plain MLP discriminator, no
  packing, no R1, no coverage term, no resampling; same sizes, steps and optimiser;
* ``wgan-gp`` — the same plain networks with WGAN-GP (lambda = 10, 5 critic steps per generator
  step, Adam betas (0.5, 0.9)).

The references of the literature (plain GAN 17.3 / 94.8 %, WGAN-GP 24.2 / 28.7 %, PacGAN4
24.8 / 93.6 %, ...) are quoted from BENCHMARKS.md; they were measured with other networks and
far longer training, so only the in-run ablations compare like with like. Training data: a
fresh draw of ``--train-rows`` points of the mixture (``sample_grid25(n, seed=0)``; 10 % of them
are held out of the fit to calibrate the anomaly threshold). Fit times are wall-clock on a
shared machine: noisy.

    python bench/g1_grid25_modes.py [--recipes default,no-resample,nonsaturating,wgan-gp] [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import log, machine_info, machine_line, print_table, write_results
from training.datasets import Dataset, sample_grid25
from training.estimators.gan_metrics import grid25_quality
from training.pipeline import train_and_publish

N_SAMPLES = 2500
SAMPLE_SEED = 0
PLAIN = {"generator_activation": "relu", "fourier_features": 0, "pack": 1, "r1_weight": 0.0, "resample": 1,
         "coverage_weight": 0.0}
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "no-resample": {"resample": 1},
    "no-coverage": {"coverage_weight": 0.0},
    "nonsaturating": {**PLAIN},
    "wgan-gp": {**PLAIN, "loss": "wgan-gp"},
}
PUBLISHED = [("plain GAN (PacGAN's setup)", 17.3, 94.8), ("WGAN-GP", 24.2, 28.7), ("VEEGAN", 24.6, 40.0),
             ("GDPP", 24.8, 68.5), ("PacGAN4", 24.8, 93.6)]


def grid25_training_set(rows: int) -> Dataset:
    X_train, y_train = sample_grid25(rows, seed=0)
    X_test, y_test = sample_grid25(1000, seed=1)
    return Dataset("grid25", X_train, X_test, y_train, y_test)


class Server:
    """A GenServeServer on its own event-loop thread, bound to a free 127.0.0.1 port."""

    def __init__(self, repo: Path):
        from serving.config import Settings
        from serving.server import GenServeServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = Settings(repo=repo, host="127.0.0.1", port=0, metrics_port=0,
                            providers=["CPUExecutionProvider"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {list(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds")
    parser.add_argument("--train-rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads outside the fit (a GAN fit always uses one CPU thread)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a gan hyper-parameter in every recipe (trials), e.g. --set steps=500")
    parser.add_argument("--name", default="g1_grid25_modes", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; expected some of {list(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = dict(parse_override(item) for item in args.set)

    info = machine_info()
    log(machine_line(info))
    data = grid25_training_set(args.train_rows)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genserve-g1-") as tmp:
        repo = Path(tmp)
        for recipe in recipes:
            for seed in seeds:
                name = f"g1-{recipe}-seed{seed}"
                params = {**RECIPES[recipe], **overrides, "random_state": seed, "verbose": False}
                log(f"[{name}] training with {params}")
                started = time.perf_counter()
                _, manifest = train_and_publish("gan", data, repo, name, params, log=log)
                runs.append({"recipe": recipe, "seed": seed, "model": name,
                             "fit_seconds": manifest.metrics["fit_seconds"],
                             "pipeline_seconds": time.perf_counter() - started,
                             "hyperparameters": manifest.hyperparameters})
        from serving.client import GenServeClient

        server = Server(repo)
        try:
            with GenServeClient("127.0.0.1", server.port, timeout=120) as client:
                for run in runs:
                    samples = client.sample(run["model"], n=N_SAMPLES, seed=SAMPLE_SEED)
                    run["modes"], run["high_quality_percent"] = grid25_quality(samples)
                    run["goal_met"] = run["modes"] == 25 and run["high_quality_percent"] >= 95.0
        finally:
            server.close()

    summary = {}
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        rows = [[r["seed"], r["modes"], r["high_quality_percent"], r["fit_seconds"], r["goal_met"]] for r in mine]
        mean = {"modes": statistics.mean(r["modes"] for r in mine),
                "high_quality_percent": statistics.mean(r["high_quality_percent"] for r in mine),
                "fit_seconds": statistics.mean(r["fit_seconds"] for r in mine),
                "every_seed_meets_goal": all(r["goal_met"] for r in mine)}
        summary[recipe] = mean
        rows.append(["mean", mean["modes"], mean["high_quality_percent"], mean["fit_seconds"],
                     mean["every_seed_meets_goal"]])
        print_table(f"G1 — `{recipe}`: {mine[0]['hyperparameters']}",
                    ["training seed", "modes (of 25)", "% high-quality", "fit s", "25 and ≥ 95 %"], rows)
    print_table("G1 — summary (mean over seeds; served Sample, 2,500 samples, request seed 0)",
                ["model", "modes", "% high-quality", "every seed meets the goal", "source"],
                [[f"genserve gan `{k}`", v["modes"], v["high_quality_percent"], v["every_seed_meets_goal"],
                  "this run"] for k, v in summary.items()]
                + [[name, modes, hq, "–", "published (BENCHMARKS.md)"] for name, modes, hq in PUBLISHED])
    print(f"\nMachine: {machine_line(info)}")
    write_results(args.name, {"protocol": {"samples": N_SAMPLES, "sample_seed": SAMPLE_SEED,
                                           "train_rows": args.train_rows, "seeds": seeds,
                                           "torch_threads": args.threads},
                              "runs": runs, "summary": summary,
                              "published": [dict(model=n, modes=m, high_quality_percent=h) for n, m, h in PUBLISHED]},
                  info)


def parse_override(item: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed like the constructor default's type (yes/no for switches)."""
    from training.estimators.gan import GenerativeAdversarialNetwork
    from training.registry import switch

    key, _, text = item.partition("=")
    defaults = GenerativeAdversarialNetwork().get_params()
    if key not in defaults:
        raise SystemExit(f"--set {item}: unknown gan parameter; expected one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
        return key, switch(text)
    if isinstance(default, (int, float)):
        return key, type(default)(text)
    if default is None:  # d_steps
        return key, int(text)
    for kind in (int, float):  # "auto"-or-number parameters (latent_dim, coverage_weight, ...)
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


if __name__ == "__main__":
    main()
