"""Fit cost: wall time and peak memory to fit each genserve family, and to build the demo
repository (``training.demo.build_demo_repository`` into a temporary folder).

Recipes (``fit_recipes``): the classical density families on digits exactly as in D1 (their own
searches: KDE "cv", kNN k="auto", GMM "auto"); every other family (histogram, hmm, vae, fvbn,
cyclegan, gan) with its demo model's dataset and hyper-parameters (``training.demo.DEMO_MODELS``),
which is what a user's ``make demo`` trains.

Method. Every measurement runs in a fresh child process (this script re-invoked with
``--child-family NAME`` or ``--child-demo DIR``), so one fit's memory cannot hide behind
another's. Inside the child:

* baseline RSS = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after importing torch, scikit-learn
  and genserve's training package and loading the data (the interpreter's own footprint);
* the fit (or the demo build) is timed with ``time.perf_counter`` (wall) and by the child's
  user + system CPU time over the same span (``ru_utime + ru_stime``, all threads), which is
  less sensitive to other processes' load when the machine is shared;
* peak RSS = ``ru_maxrss`` afterwards, the process's high-water mark (Linux: KiB; reported in
  MiB). ``peak - baseline`` is the extra memory the fit needed above what was already resident.

The parent also reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after each child as a
cross-check (it is the largest child so far, so it only ever grows). Fit timings are medians of
``--repeats`` children; peaks are the largest of them. torch uses its default threads (the
neural families cap them to what their steps pay for, as in ``genserve train``).

    python bench/fit_cost.py [--repeats 3] [--families gaussian,kde,vae] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DIGITS_FAMILY_PARAMS, REPO_ROOT, log, machine_info, machine_line, print_table, write_results

MIB_PER_KIB = 1 / 1024


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fit_recipes() -> dict[str, tuple[str, dict[str, Any]]]:
    """family -> (dataset, hyper-parameters): D1's digits recipe, else the family's demo model's."""
    from training import registry
    from training.demo import DEMO_MODELS

    recipes = {name: ("digits", params) for name, params in DIGITS_FAMILY_PARAMS.items() if name != "histogram"}
    for family, data, params in DEMO_MODELS.values():
        recipes.setdefault(family, (data, params))
    return {name: recipes[name] for name in registry.FAMILIES if name in recipes}


def child_family(name: str) -> dict[str, Any]:
    import warnings

    import torch
    from training import datasets, registry

    data_name, params = fit_recipes()[name]
    data = datasets.load(data_name)
    spec = registry.get(name)
    estimator = spec.create(**{**params, "verbose": False} if "verbose" in spec.estimator_class().get_params()
                            else params)
    baseline, cpu0 = _rss_kib(), _cpu_s()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.fit_dataset(data)
    except ValueError as refused:
        return {"status": "error", "note": str(refused), "baseline_kib": baseline, "peak_kib": _rss_kib()}
    fit_s = time.perf_counter() - started
    cpu_s = _cpu_s() - cpu0
    chosen = estimator.fitted_params()
    keys = [o.param for o in spec.options]
    shown = {k: chosen[k] for k in keys if k in chosen}
    if "bandwidth_" in chosen:
        shown["bandwidth"] = chosen["bandwidth_"]
    return {"status": "ok", "fit_s": fit_s, "cpu_s": cpu_s, "baseline_kib": baseline, "peak_kib": _rss_kib(),
            "data": data_name, "train_rows": len(data.X_train), "chosen": shown,
            "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def child_demo(folder: str) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the baseline, like the family children)
    from training.demo import DEMO_MODELS, build_demo_repository

    baseline, cpu0 = _rss_kib(), _cpu_s()
    started = time.perf_counter()
    built = build_demo_repository(Path(folder), log=lambda line: print(line, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - started
    cpu_s = _cpu_s() - cpu0
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return {"status": "ok", "build_s": elapsed, "cpu_s": cpu_s, "loadavg": os.getloadavg(),
            "baseline_kib": baseline, "peak_kib": _rss_kib(),
            "models": built, "n_models": len(DEMO_MODELS), "repo_bytes": size}


def run_child(args: list[str]) -> tuple[dict[str, Any], float, int]:
    """Run this script as a child; return its JSON answer, its wall time, RUSAGE_CHILDREN maxrss."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=None, text=True)
    wall = time.perf_counter() - started
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        return {"status": "error", "note": f"child exited with {proc.returncode}"}, wall, children_kib
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, children_kib


def mib(kib: float | None) -> float | None:
    return None if kib is None else kib * MIB_PER_KIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(fit_recipes()),
                        help=f"comma-separated (default: every family, {', '.join(fit_recipes())})")
    parser.add_argument("--repeats", type=int, default=3, help="children per family (median time, max peak)")
    parser.add_argument("--demo-repeats", type=int, default=1, help="demo builds (each from empty)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--name", default="fit_cost", help="results file stem")
    parser.add_argument("--child-family", help=argparse.SUPPRESS)
    parser.add_argument("--child-demo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_family:
        print(json.dumps(child_family(args.child_family)))
        return
    if args.child_demo:
        print(json.dumps(child_demo(args.child_demo)))
        return

    info = machine_info()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(fit_recipes()))
    if unknown:
        parser.error(f"--families: no recipe for {unknown}; expected some of {list(fit_recipes())}")
    skipped = [f for f in fit_recipes() if f not in families]
    rows: list[dict[str, Any]] = []
    for name in families:
        runs = []
        for i in range(args.repeats):
            log(f"fit {name} ({i + 1}/{args.repeats}) ...")
            answer, wall, children_kib = run_child(["--child-family", name])
            answer.update(child_wall_s=wall, rusage_children_kib=children_kib)
            runs.append(answer)
            if answer["status"] != "ok":
                break  # refused or failed: once is enough
        ok = [r for r in runs if r["status"] == "ok"]
        row: dict[str, Any] = {"what": f"fit {name} on {fit_recipes()[name][0]}", "family": name, "runs": runs,
                               "status": runs[-1]["status"]}
        if ok:
            row.update(seconds=statistics.median(r["fit_s"] for r in ok),
                   cpu_seconds=statistics.median(r["cpu_s"] for r in ok),
                       baseline_mib=mib(max(r["baseline_kib"] for r in ok)),
                       peak_mib=mib(max(r["peak_kib"] for r in ok)),
                       extra_mib=mib(max(r["peak_kib"] - r["baseline_kib"] for r in ok)),
                       chosen=ok[-1]["chosen"], repeats=len(ok))
        else:
            row["note"] = runs[-1].get("note", "")
        rows.append(row)

    if not args.skip_demo:
        runs = []
        for i in range(args.demo_repeats):
            with tempfile.TemporaryDirectory(prefix="genserve-demo-") as tmp:
                log(f"build the demo repository ({i + 1}/{args.demo_repeats}) into {tmp} ...")
                answer, wall, children_kib = run_child(["--child-demo", str(Path(tmp) / "repo")])
            answer.update(child_wall_s=wall, rusage_children_kib=children_kib)
            runs.append(answer)
        ok = [r for r in runs if r["status"] == "ok"]
        row = {"what": "build the demo repository", "family": "demo", "runs": runs, "status": runs[-1]["status"]}
        if ok:
            row.update(seconds=statistics.median(r["build_s"] for r in ok),
                       cpu_seconds=statistics.median(r["cpu_s"] for r in ok),
                       baseline_mib=mib(max(r["baseline_kib"] for r in ok)),
                       peak_mib=mib(max(r["peak_kib"] for r in ok)),
                       extra_mib=mib(max(r["peak_kib"] - r["baseline_kib"] for r in ok)),
                       chosen={"models": ok[-1]["n_models"], "repo MiB": round(ok[-1]["repo_bytes"] / 2**20, 1)},
                       repeats=len(ok))
        else:
            row["note"] = runs[-1].get("note", "")
        rows.append(row)

    print(f"## Fit cost — time and peak memory (fresh child process each)\n\n{machine_line(info)}\n\n"
          "Peak = ru_maxrss of the child (RUSAGE_SELF) after the fit; baseline = the same before it, after "
          "imports and data loading; extra = peak − baseline. Time = median over children of the fit "
          "alone (perf_counter), imports excluded; CPU s = user + system time of the child over the same span "
          "(all threads; less sensitive than wall time to other processes' load on a shared machine)."
          + (f"\n\nRegistered families not fitted here: {', '.join(skipped)} (pass --families to include one); "
             "the demo build includes whatever training.demo.DEMO_MODELS lists." if skipped else ""))
    print_table("classical families on digits (1,257 training rows, 64 dimensions) as in D1; the others with "
                "their demo recipe; demo = every model of training.demo.DEMO_MODELS",
                ["what", "chosen", "wall s (median)", "CPU s (median)", "runs", "baseline RSS MiB", "peak RSS MiB",
                 "extra MiB", "note"],
                [[r["what"], ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in r.get("chosen", {}).items()) or "–",
                  f"{r['seconds']:.2f}" if "seconds" in r else r["status"],
                  f"{r['cpu_seconds']:.2f}" if "cpu_seconds" in r else "–", r.get("repeats", "–"),
                  f"{r['baseline_mib']:.0f}" if "baseline_mib" in r else "–",
                  f"{r['peak_mib']:.0f}" if "peak_mib" in r else "–",
                  f"{r['extra_mib']:.0f}" if "extra_mib" in r else "–", r.get("note", "")] for r in rows])
    write_results(args.name, {"method": "fresh child process per measurement; ru_maxrss (RUSAGE_SELF) in the "
                                        "child before and after; RUSAGE_CHILDREN in the parent as cross-check",
                              "families_not_run": skipped, "rows": rows}, info)


if __name__ == "__main__":
    main()
