"""From a dataset name to a published model: fit, measure, calibrate, export, publish.

This is what ``genserve train`` and the demo run; it reads top to bottom in one screen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from serving.repository.manifest import Manifest
from training import datasets, registry
from training.calibration import calibration_from_scores
from training.datasets import Dataset
from training.neural import single_process, torchrun_rank
from training.publish import publish


def train_and_publish(family: str, data: str | Dataset, repo: Path, name: str,
                      params: dict[str, Any] | None = None, contamination: float = 0.01,
                      calibration_folds: int = 5,
                      log: Callable[[str], None] = print) -> tuple[Path, Manifest] | None:
    """Fit, measure, calibrate, publish; returns the version's path and manifest.

    Under ``torchrun`` every rank fits (data-parallel), and rank 0 alone evaluates, calibrates
    and publishes: the others return None once the fit is done.
    """
    main_process = torchrun_rank() == 0
    if not main_process:
        log = lambda line: None  # noqa: E731 - one log per job, from rank 0
    spec = registry.get(family)
    dataset = datasets.load(data) if isinstance(data, str) else data
    log(f"[{name}] {family} on {dataset.name}: {len(dataset.X_train)} training rows of shape "
        f"{list(dataset.X_train.shape[1:])}")

    estimator = spec.create(**(params or {}))
    started = time.perf_counter()
    estimator.fit_dataset(dataset)
    fit_seconds = time.perf_counter() - started
    log(f"[{name}] fitted in {fit_seconds:.1f} s with {estimator.fitted_params()}")
    if not main_process:
        return None

    with single_process():  # rank 0 goes on alone: a fit in here must not wait for the others
        metrics = {"fit_seconds": fit_seconds, **estimator.evaluate(dataset)}
        log(f"[{name}] " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "fit_seconds"))

        calibration = None
        scores = estimator.calibration_scores(dataset, calibration_folds)
        if scores is not None:
            method = estimator.calibration_method(calibration_folds)
            calibration = calibration_from_scores(scores, contamination, method)
            log(f"[{name}] anomaly threshold {calibration.threshold:.3f} at {contamination:.1%} contamination "
                f"({calibration.method})")

        path, manifest = publish(estimator, repo, name, dataset, calibration=calibration, metrics=metrics,
                                 description=spec.summary)
        log(f"[{name}] published {path} (export check {max(manifest.export_check.max_rel_diff.values()):.2g})")
        return path, manifest
