"""A GAN's pictures for its model card: samples, the discriminator's anomaly score, the training curve.

* 2-D data: the anomaly score -l(x) as a heat map with the training rows (where the
  discriminator thinks data is, and how it extrapolates away from it), and data beside samples.
* images: a grid of samples (one row per class when conditional).
* other rows: the first two features of data and samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.plots import save_training_curve  # noqa: E402


def _labels(estimator: Any, n: int) -> np.ndarray | None:
    return np.arange(n) % estimator.num_classes if estimator.num_classes else None


def _scatter_2d(estimator: Any, data: Any):
    lo = data.X_train.min(axis=0) - 1.0
    hi = data.X_train.max(axis=0) + 1.0
    xs, ys = np.linspace(lo[0], hi[0], 100), np.linspace(lo[1], hi[1], 100)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    score = estimator.anomaly_score(grid).reshape(100, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    image = axes[0].imshow(score, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="magma_r", aspect="auto")
    fig.colorbar(image, ax=axes[0], label="anomaly score -logit D(x)")
    axes[0].scatter(*data.X_train[:500].T, s=1, c="cyan", alpha=0.5)
    axes[0].set_title("discriminator's anomaly score")
    samples = estimator.sample(1000, seed=0, label=_labels(estimator, 1000)).numpy()
    axes[1].scatter(*data.X_train[:1000].T, s=3, alpha=0.5, label="training data")
    axes[1].scatter(*samples.T, s=3, alpha=0.5, label="samples (seed 0)")
    axes[1].legend(loc="upper right")
    axes[1].set_title("data and samples")
    return fig


def _image_grid(estimator: Any, data: Any):
    h, w = data.image_shape
    rows = estimator.num_classes or 8
    samples = estimator.sample(rows * 8, seed=0, label=np.repeat(np.arange(rows), 8) if estimator.num_classes
                               else None).numpy()
    lo, hi = float(data.X_train.min()), float(data.X_train.max())
    tiles = ((samples - lo) / max(hi - lo, 1e-12)).clip(0, 1).reshape(rows, 8, h, w)
    fig, ax = plt.subplots(figsize=(5, 5 * rows / 8))
    ax.imshow(tiles.transpose(0, 2, 1, 3).reshape(rows * h, 8 * w), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("samples (seed 0)" + (", one row per class" if estimator.num_classes else ""))
    ax.axis("off")
    return fig


def _first_two_features(estimator: Any, data: Any):
    fig, ax = plt.subplots(figsize=(5, 5))
    samples = estimator.sample(1000, seed=0, label=_labels(estimator, 1000)).numpy()
    ax.scatter(*data.X_train[:1000, :2].T, s=3, alpha=0.5, label="training data")
    ax.scatter(*samples[:, :2].T, s=3, alpha=0.5, label="samples")
    ax.set_xlabel("feature 0")
    ax.set_ylabel("feature 1")
    ax.legend()
    return fig


def save_gan_pictures(estimator: Any, data: Any, folder: Path, title: str) -> None:
    if data.n_features == 2:
        fig = _scatter_2d(estimator, data)
    elif data.image_shape is not None:
        fig = _image_grid(estimator, data)
    else:
        fig = _first_two_features(estimator, data)
    fig.suptitle(title)
    fig.savefig(Path(folder) / "samples.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    if getattr(estimator, "history_", None):
        save_training_curve(estimator.history_, Path(folder) / "training.png", title)
