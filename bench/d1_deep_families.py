"""D1 for the deep families — digits density (mean held-out log-likelihood, nats/image): the
autoregressive FVBN (and the VAE when it is registered) beside the classical families.

Protocol (BENCHMARKS.md D1): ``training.datasets.digits()`` — load_digits dequantised
x = (v + u) / 17 with u from default_rng(0), 70/30 stratified split, random_state=0. Every
deep family holds out its own validation rows from the training part (early stopping); nothing
is chosen on the test part.

Rows, each fitted in its own child process (so that its peak memory is its own):

* genserve fvbn — the bench configuration (``FVBN_BENCH``: 16 orderings, 20 Gaussians per
  conditional, 512 hidden units, dropout 0.1) and the registry defaults (what
  ``genserve train fvbn --data digits`` and the demo's ``digits-fvbn`` train).
* in-run references for the FVBN — the same code with one ordering and no logit transform
  (BENCHMARKS.md's "quick MADE with mixture-of-Gaussian conditionals, early-stopped", ≈ 73.7),
  and one ordering with the logit transform: what the transform and the ensemble each add.
* genserve vae — the registry defaults, if ``vae`` is registered; its figure is the served
  score, the importance-weighted estimate of log p(x) (a lower bound in expectation), with
  K = 1000 importance samples (``VAE_D1_K``; the served default is 64); ELBO and other K in
  ``bench/d1_vae_digits.py``.
* the classical families and scikit-learn, read from ``bench/results/d1_digits_density.json``
  (written by ``bench/d1_digits_density.py`` on the same data; not refitted here), with the
  date and commit of that run.

Timings are wall-clock on a 2-core machine shared with other work: noisy; peak memory is the
child process's maximum resident set (torch and the data included).

    python bench/d1_deep_families.py [--quick] [--skip-references]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from typing import Any

from common import RESULTS_DIR, log, machine_info, machine_line, print_table, write_results

FVBN_BENCH = {"n_masks": 16, "n_components": 20, "hidden_units": 512, "dropout": 0.1, "patience": 30,
              "max_epochs": 400}
FVBN_GOAL, VAE_GOAL = 80.0, 65.0
VAE_D1_K = 1000  # importance samples of the VAE's D1 figure (the served default K is 64)
QUOTED = [("full-covariance Gaussian (MLE)", 46.7), ("KernelDensity, gaussian, bandwidth by 3-fold CV", 38.3),
          ("GaussianMixture, chosen on validation (20, diag)", 58.9),
          ("a quick MADE with mixture-of-Gaussian conditionals, early-stopped", 73.7)]


def _fit_row(family: str, params: dict[str, Any], out: Any) -> None:
    """Child process: fit ``family`` on D1's training part, report figures, time and peak memory."""
    import numpy as np

    from training import datasets, registry

    data = datasets.digits()
    estimator = registry.get(family).create(**{**params, "verbose": False})
    started = time.perf_counter()
    estimator.fit_dataset(data)
    fit_s = time.perf_counter() - started
    figures = estimator.evaluate(data)
    if family == "vae":  # D1's VAE figure: the importance-weighted estimate with K = 1000 (seed 0)
        figures[f"test_iwae_{VAE_D1_K}"] = float(np.mean(estimator.score_samples(
            data.X_test, importance_samples=VAE_D1_K, seed=0)))
    row = {"fit_s": fit_s, "figures": figures, "fitted_params": json.loads(json.dumps(
        estimator.fitted_params(), default=str)),
           "train_nats": float(np.mean(estimator.score_samples(data.X_train))),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out.put(row)


def fit_in_child(label: str, family: str, params: dict[str, Any], note: str) -> dict[str, Any]:
    log(f"fitting {label} {params} ...")
    queue: Any = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_fit_row, args=(family, params, queue))
    started = time.perf_counter()
    process.start()
    try:
        result = queue.get(timeout=3600)
    except Exception as error:  # the child died: report it in the table
        process.join(5)
        return {"model": label, "family": family, "params": params, "status": "error",
                "note": f"child failed ({type(error).__name__}, exit code {process.exitcode})"}
    process.join()
    figures = result["figures"]
    row = {"model": label, "family": family, "params": params, "status": "ok", "note": note,
           "test_nats": figures.get(f"test_iwae_{VAE_D1_K}", figures.get("test_log_likelihood")),
           "train_nats": result["train_nats"],
           "validation_nats": figures.get("validation_log_likelihood"),
           "best_epoch": figures.get("best_epoch"), "epochs": figures.get("epochs"),
           "fit_s": result["fit_s"], "wall_s": time.perf_counter() - started,
           "peak_rss_mib": result["peak_rss_mib"], "figures": figures, "fitted_params": result["fitted_params"]}
    log(f"  test {row['test_nats']:.2f} nats/image, fit {row['fit_s']:.0f} s")
    return row


def classical_rows() -> tuple[list[dict[str, Any]], str]:
    path = RESULTS_DIR / "d1_digits_density.json"
    if not path.is_file():
        return [], "bench/results/d1_digits_density.json not found: run bench/d1_digits_density.py for these rows"
    saved = json.loads(path.read_text())
    machine = saved.get("machine", {})
    source = (f"from d1_digits_density.json ({machine.get('date_utc', '?')}, "
              f"commit {str(machine.get('git_commit') or '?')[:10]})")
    rows = []
    for r in saved.get("rows", []):
        if r.get("status") != "ok" or r.get("family") in ("fvbn", "vae"):
            continue
        params = r.get("params", {})
        rows.append({"model": r["model"], "family": r.get("family"), "status": "ok", "source": "d1_digits_density.json",
                     "test_nats": r.get("test_nats"), "train_nats": r.get("train_nats"), "fit_s": r.get("fit_s"),
                     "params": params, "note": r.get("note", "")})
    return rows, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="registry defaults only (no bench config)")
    parser.add_argument("--skip-references", action="store_true", help="no in-run FVBN ablation references")
    parser.add_argument("--name", default="d1_deep_families", help="results file stem")
    args = parser.parse_args()
    info = machine_info()

    from training import registry

    deep: list[dict[str, Any]] = []
    if not args.quick:
        deep.append(fit_in_child("genserve fvbn (bench configuration)", "fvbn", FVBN_BENCH,
                                 "16 orderings, order-agnostic training, logit transform"))
    deep.append(fit_in_child("genserve fvbn (registry defaults = demo digits-fvbn)", "fvbn", {},
                             "8 orderings, order-agnostic training, logit transform"))
    if not args.skip_references:
        deep.append(fit_in_child("reference: one MADE-MoG, no transform (a 'quick MADE')", "fvbn",
                                 {"n_masks": 1, "transform": "affine"},
                                 "same code, one natural ordering, standardised pixels"))
        deep.append(fit_in_child("reference: one MADE-MoG with the logit transform", "fvbn",
                                 {"n_masks": 1, "transform": "logit"}, "same code, one natural ordering"))
    if "vae" in registry.FAMILIES:
        deep.append(fit_in_child("genserve vae (registry defaults)", "vae", {},
                                 f"served score at K={VAE_D1_K}: importance-weighted estimate of log p(x) "
                                 "(a lower bound in expectation); bench/d1_vae_digits.py has ELBO and K=1..1000"))
    else:
        deep.append({"model": "genserve vae", "family": "vae", "status": "missing",
                     "note": "not registered in this checkout"})
    classical, source = classical_rows()

    print(f"## D1 — digits density, deep families (mean test log-likelihood, nats/image; higher is better)"
          f"\n\n{machine_line(info)}\n\nTimings on a shared 2-core machine: noisy.")
    print_table("Deep families, fitted in this run (each in its own process)",
                ["model", "test nats/image", "validation nats", "train nats", "epochs (best)", "fit s",
                 "peak RSS MiB", "note"],
                [[r["model"], r.get("test_nats", r["status"]), r.get("validation_nats"), r.get("train_nats"),
                  f"{r['epochs']:.0f} ({r['best_epoch']:.0f})" if r.get("epochs") else "–", r.get("fit_s"),
                  f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "–", r.get("note", "")] for r in deep])
    if classical:
        print_table(f"Classical families and scikit-learn on the same protocol, {source}",
                    ["model", "chosen hyper-parameters", "test nats/image", "fit s"],
                    [[r["model"], ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "–",
                      r["test_nats"], r["fit_s"]] for r in classical])
    else:
        print(f"\n({source})")
    print_table("Figures quoted in BENCHMARKS.md (scikit-learn 1.9.1, not run here)",
                ["model", "test nats/image"], QUOTED)

    goals = {}
    fvbn = [r for r in deep if r["family"] == "fvbn" and r["status"] == "ok" and not r["model"].startswith("reference")]
    if fvbn:
        best = max(fvbn, key=lambda r: r["test_nats"])
        goals["fvbn"] = {"goal": FVBN_GOAL, "best": best["model"], "test_nats": best["test_nats"],
                         "met": best["test_nats"] >= FVBN_GOAL,
                         "default_met": all(r["test_nats"] >= FVBN_GOAL for r in fvbn)}
    vae = [r for r in deep if r["family"] == "vae" and r["status"] == "ok"]
    if vae:
        goals["vae"] = {"goal": VAE_GOAL, "test_nats": vae[0]["test_nats"], "met": vae[0]["test_nats"] >= VAE_GOAL}
    for family, g in goals.items():
        print(f"\nGoal {family} ≥ {g['goal']:.0f} nats/image: {g['test_nats']:.2f} — {'met' if g['met'] else 'NOT met'}"
              + (" (every FVBN configuration above meets it)" if g.get("default_met") else ""))
    write_results(args.name, {"protocol": "BENCHMARKS.md D1", "deep_rows": deep, "classical_rows": classical,
                              "classical_source": source, "quoted": [dict(model=m, test_nats=v) for m, v in QUOTED],
                              "goals": goals}, info)


if __name__ == "__main__":
    main()
