"""Publish a fitted estimator as a new version in a model repository.

Everything for one version is written into a temporary folder — the ONNX graphs (each checked
against torch first), the validated manifest, the model card and the picture — and the folder is
renamed into place only when all of it succeeded (``serving.repository.layout``). A failed
export or an invalid manifest leaves the repository exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serving.repository.layout import fingerprint, publish_version
from serving.repository.manifest import MANIFEST_FILE, AnomalyCalibration, ExportCheck, GraphSpec, InputSpec, Manifest
from training.datasets import Dataset
from training.estimators.base import GenerativeEstimator
from training.export import DEFAULT_TOLERANCE, export_and_check

import genserve

CHECK_ROWS = 256


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def capabilities_of(graphs: dict[str, GraphSpec], calibrated: bool, conditional: bool) -> list[str]:
    """Capabilities follow from the graphs published (and the calibration), never from the family."""
    found = [c for c in ("score", "sample", "encode", "reconstruct") if c in graphs]
    if calibrated:
        found.insert(1 if "score" in found else 0, "anomaly")
    if conditional:
        found.append("conditional")
    if {"translate_a2b", "translate_b2a"} <= set(graphs):
        found.append("translate")
    return found


def publish(estimator: GenerativeEstimator, repo: Path, name: str, data: Dataset, *,
            calibration: AnomalyCalibration | None, metrics: dict[str, float],
            description: str = "", tolerance: float = DEFAULT_TOLERANCE) -> tuple[Path, Manifest]:
    """Write ``<repo>/<name>/<next version>/`` and return its path and manifest."""
    written: dict[str, Manifest] = {}

    def write(folder: Path, version: int) -> None:
        graphs, abs_diff, rel_diff = {}, {}, {}
        for graph in estimator.export_graphs():
            feeds = estimator.check_feeds(graph, data, CHECK_ROWS)
            parity = export_and_check(graph, folder, feeds, tolerance)
            graphs[graph.name] = GraphSpec(file=f"{graph.name}.onnx", inputs=graph.inputs, outputs=graph.outputs)
            abs_diff[graph.name], rel_diff[graph.name] = parity.max_abs_diff, parity.max_rel_diff
        manifest = Manifest(
            name=name, version=version, family=estimator.family, description=description,
            input=InputSpec(shape=estimator.input_shape(data), low=float(data.X_train.min()),
                            high=float(data.X_train.max())),
            capabilities=capabilities_of(graphs, calibration is not None, bool(estimator.num_classes)),
            graphs=graphs, anomaly=calibration, num_classes=estimator.num_classes,
            hyperparameters=_jsonable(estimator.fitted_params()), metrics=metrics,
            export_check=ExportCheck(max_abs_diff=abs_diff, max_rel_diff=rel_diff, tolerance=tolerance,
                                     rows=min(CHECK_ROWS, len(data.X_test))),
            data_fingerprint=fingerprint(data.X_train), dataset=data.name,
            genserve_version=genserve.__version__)
        (folder / MANIFEST_FILE).write_text(manifest.to_json())
        (folder / "card.md").write_text(model_card(manifest, estimator, data))
        estimator.save_pictures(data, folder, f"{name} v{version} ({estimator.family})")
        written["manifest"] = manifest

    path = publish_version(Path(repo), name, write)
    return path, written["manifest"]


def model_card(manifest: Manifest, estimator: GenerativeEstimator, data: Dataset) -> str:
    """A short human-readable card: what was trained on what, with which figures and limits."""
    doc = (type(estimator).__doc__ or "").strip().splitlines()
    lines = [
        f"# {manifest.name} — version {manifest.version}",
        "",
        f"**Family:** `{manifest.family}` — {doc[0] if doc else ''}",
        f"**Data:** `{data.name}`: {len(data.X_train)} training rows, {len(data.X_test)} test rows, "
        f"rows of shape {manifest.input.shape} (fingerprint `{manifest.data_fingerprint[:19]}…`).",
        f"**Capabilities:** {', '.join(manifest.capabilities)}",
        "",
        "## Hyper-parameters",
        "",
        *[f"- `{k}`: `{v}`" for k, v in manifest.hyperparameters.items()],
        "",
        "## Figures (measured at training time)",
        "",
        "| figure | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" for k, v in manifest.metrics.items()],
        "",
    ]
    if manifest.anomaly:
        a = manifest.anomaly
        # A model without a density (a GAN's discriminator) scores anomalies with its own graph.
        score = ("the `anomaly` graph's score (higher = more anomalous; see Limits)" if "anomaly" in manifest.graphs
                 else "−log p(x)")
        lines += ["## Anomaly threshold", "",
                  f"Score = {score}; rows scoring above **{a.threshold:.4g}** are flagged. "
                  f"Chosen as the {1 - a.contamination:.1%} quantile of {a.n_calibration} held-out "
                  f"scores ({a.method}), i.e. about {a.contamination:.1%} of normal rows are flagged.", ""]
    lines += ["## Export check", "",
              f"ONNX against torch on {manifest.export_check.rows} held-out rows, largest "
              f"difference relative to max(1, |value|): "
              + ", ".join(f"`{g}` {d:.2g}" for g, d in manifest.export_check.max_rel_diff.items())
              + f" (tolerance {manifest.export_check.tolerance:g}).", ""]
    if estimator.card_limits:
        lines += ["## Limits", "", estimator.card_limits, ""]
    return "\n".join(lines)
