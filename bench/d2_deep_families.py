"""D2 for the deep families — digits one-class anomaly detection (AUROC per digit): the FVBN (and
the VAE when it is registered) beside the classical families and PyOD.

Protocol (BENCHMARKS.md D2), on the D1 data and split: for each digit c, fit on the training
rows of class c only (about 125 rows); score all 540 test rows; anomalies are the test rows of
the other nine classes; AUROC of the anomaly score. Mean over the ten classes and the worst class.
The per-digit loop, the AUROC and the handling of infinite scores are ``bench/d2_digits_anomaly``'s
own (``run_detector``), so the rows are comparable.

* genserve fvbn: anomaly score -log p(x). Per-class fits must be cheap, so a small net (``FVBN_D2``):
  64 hidden units, 8 orderings, at most 100 epochs; 20 % of the class's rows held out for early
  stopping (about 25 rows: fewer make the stopping epoch a coin toss).
* genserve vae (if registered): its registry defaults except 20 % of the class's rows held out
  (as for the FVBN), anomaly score -score (the served importance-weighted estimate, K = 64).
* Threshold: each deep family calibrates on its own held-out validation rows (it cannot afford
  cross-fitting): ``calibration_scores`` -> the 1 % quantile, applied to the test rows of class c.
  With ~25 held-out rows the 99 % quantile is close to their maximum, so the false-positive rate
  on new normal rows is coarse and tends to sit above 1 %: reported as measured.
* Classical families, scikit-learn and PyOD: read from ``bench/results/d2_digits_anomaly.json``
  (same protocol, not refitted here), with the date and commit of that run.

    python bench/d2_deep_families.py [--families fvbn,vae] [--skip-threshold]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any, Callable

import numpy as np

from common import RESULTS_DIR, log, machine_info, machine_line, print_table, write_results
from d2_digits_anomaly import CONTAMINATION, run_detector
from training import datasets, registry
from training.calibration import calibration_from_scores

FVBN_D2 = {"hidden_units": 64, "n_masks": 8, "n_components": 10, "max_epochs": 100, "patience": 15,
           "validation_fraction": 0.2}
DEEP: dict[str, tuple[str, dict[str, Any], str]] = {
    "fvbn": ("fvbn", FVBN_D2, "MADE-MoG, 8 orderings, 64 hidden units; threshold from ~25 held-out rows"),
    "vae": ("vae", {"validation_fraction": 0.2}, "registry defaults but 20 % held out (~25 rows) for early "
            "stopping and the threshold; score = -(importance-weighted log p estimate, K=64, seed 0)"),
}


def deep_detector(family: str, params: dict[str, Any], data: datasets.Dataset,
                  calibrate_threshold: bool) -> Callable[[np.ndarray, int], dict[str, Any]]:
    spec = registry.get(family)

    def fit_and_score(X_c: np.ndarray, c: int) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part = datasets.Dataset(f"digits-class-{c}", X_c, data.X_test, image_shape=data.image_shape)
            estimator = spec.create(**{**params, "verbose": False}).fit(X_c)
            out: dict[str, Any] = {"scores": -estimator.score_samples(data.X_test)}
            if calibrate_threshold:
                held_out = estimator.calibration_scores(part, folds=5)
                out["threshold"] = float(calibration_from_scores(
                    held_out, CONTAMINATION, estimator.calibration_method(5)).threshold)
            out["chosen"] = {"best_epoch": getattr(estimator, "best_epoch_", None)}
        return out
    return fit_and_score


def classical_rows() -> tuple[list[dict[str, Any]], str]:
    path = RESULTS_DIR / "d2_digits_anomaly.json"
    if not path.is_file():
        return [], "bench/results/d2_digits_anomaly.json not found: run bench/d2_digits_anomaly.py for these rows"
    saved = json.loads(path.read_text())
    machine = saved.get("machine", {})
    source = f"from d2_digits_anomaly.json ({machine.get('date_utc', '?')}, commit {str(machine.get('git_commit') or '?')[:10]})"
    return [r for r in saved.get("rows", []) if "per_class" in r], source


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(DEEP), help=f"comma-separated, from {list(DEEP)}")
    parser.add_argument("--skip-threshold", action="store_true", help="no calibration / FPR")
    parser.add_argument("--name", default="d2_deep_families", help="results file stem")
    args = parser.parse_args()
    info = machine_info()
    data = datasets.digits()

    rows: list[dict[str, Any]] = []
    for label in [f.strip() for f in args.families.split(",") if f.strip()]:
        family, params, note = DEEP[label]
        if family not in registry.FAMILIES:
            rows.append({"detector": f"genserve {label}", "status": "missing", "note": "not registered in this checkout"})
            continue
        log(f"genserve {label} {params} ...")
        started = time.perf_counter()
        try:
            row = run_detector(f"genserve {label}", deep_detector(family, params, data, not args.skip_threshold), data)
            row.update(status="ok", params=params, note=note)
        except Exception as error:  # report, do not hide
            row = {"detector": f"genserve {label}", "status": "error", "note": f"{type(error).__name__}: {error}"}
            log(f"  failed: {row['note']}")
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
    classical, source = classical_rows()

    print(f"## D2 — digits one-class anomaly detection, deep families (AUROC; FPR of the 1 % threshold)"
          f"\n\n{machine_line(info)}\n\nTimings on a shared 2-core machine: noisy.")
    table = [*rows, *classical]
    print_table("Fit on one digit's training rows, score all 540 test rows; mean and worst over the ten digits "
                f"(deep families fitted in this run; the others {source})",
                ["detector", "mean AUROC", "worst class (AUROC)", "FPR at 1 % threshold, pooled",
                 "FPR per class (min–max)", "fit+score s (10 classes)", "note"],
                [[r["detector"], f"{r['mean_auroc']:.4f}" if "mean_auroc" in r else r.get("status"),
                  f"{r['worst_class']} ({r['worst_auroc']:.4f})" if "worst_auroc" in r else "–",
                  pct(r.get("pooled_fpr")),
                  f"{pct(r['min_class_fpr'])} – {pct(r['max_class_fpr'])}" if "min_class_fpr" in r else "–",
                  r.get("seconds"), r.get("note", "")] for r in table])
    ok = [r for r in table if "per_class" in r]
    print_table("AUROC per digit", ["detector", *map(str, range(10))],
                [[r["detector"], *[f"{e['auroc']:.4f}" for e in r["per_class"]]] for r in ok])
    ours = [r for r in rows if "per_class" in r and "pooled_fpr" in r]
    if ours:
        print_table("False positives of the held-out-calibrated 1 % threshold on the test rows of the class",
                    ["detector", *map(str, range(10)), "pooled", "goal 1 % ± 1 point"],
                    [[r["detector"], *[f"{e['false_positives']}/{e['n_normal']}" for e in r["per_class"]],
                      pct(r["pooled_fpr"]), r["fpr_goal_met"]] for r in ours])
    write_results(args.name, {"protocol": "BENCHMARKS.md D2", "contamination": CONTAMINATION, "rows": rows,
                              "classical_rows_source": source,
                              "classical_rows": [{k: v for k, v in r.items() if k != "per_class"} for r in classical]},
                  info)


if __name__ == "__main__":
    main()
