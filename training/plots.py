"""Pictures saved beside each model for people: what the model learned, at a glance.

* 2-D data: the log-density as a heat map with training points and, where the family samples,
  samples drawn exactly as the server draws them.
* image rows (digits): a grid of samples; for families that cannot sample, the test images the
  model finds most typical and most anomalous instead.
* anything else: the first two features of data and samples.

Families that train by gradient steps also get ``training.png``: their logged losses per epoch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.datasets import Dataset  # noqa: E402
from training.estimators.base import DensityEstimator  # noqa: E402


def save_model_picture(estimator: DensityEstimator, data: Dataset, path: Path, title: str) -> None:
    if data.n_features == 2:
        fig = _density_2d(estimator, data)
    elif data.image_shape is not None:
        fig = _image_grid(estimator, data)
    else:
        fig = _first_two_features(estimator, data)
    fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _density_2d(estimator: DensityEstimator, data: Dataset):
    lo = data.X_train.min(axis=0) - 1.0
    hi = data.X_train.max(axis=0) + 1.0
    xs, ys = np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    logp = estimator.score_samples(grid).reshape(200, 200)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    shown = np.where(np.isfinite(logp), logp, np.nan)
    image = axes[0].imshow(np.clip(shown, np.nanmax(shown) - 20, None), origin="lower",
                           extent=(lo[0], hi[0], lo[1], hi[1]), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=axes[0], label="log p(x)")
    axes[0].set_title("log-density")
    axes[1].scatter(*data.X_train[:1000].T, s=3, alpha=0.5, label="training data")
    if estimator.can_sample:
        samples = estimator.sample(1000, seed=0).numpy()
        axes[1].scatter(*samples.T, s=3, alpha=0.5, label="samples (seed 0)")
    axes[1].legend(loc="upper right")
    axes[1].set_title("data and samples")
    return fig


def _image_grid(estimator: DensityEstimator, data: Dataset):
    h, w = data.image_shape
    if estimator.can_sample:
        panels = [("samples (seed 0)", estimator.sample(64, seed=0).numpy())]
    else:
        order = np.argsort(estimator.score_samples(data.X_test))
        panels = [("most typical test images", data.X_test[order[::-1][:64]]),
                  ("most anomalous test images", data.X_test[order[:64]])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        tiles = np.clip(rows[:64], 0, 1).reshape(8, 8, h, w).transpose(0, 2, 1, 3).reshape(8 * h, 8 * w)
        ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    return fig


def _first_two_features(estimator: DensityEstimator, data: Dataset):
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*data.X_train[:1000, :2].T, s=3, alpha=0.5, label="training data")
    if estimator.can_sample:
        ax.scatter(*estimator.sample(1000, seed=0).numpy()[:, :2].T, s=3, alpha=0.5, label="samples")
    ax.set_xlabel("feature 0")
    ax.set_ylabel("feature 1")
    ax.legend()
    return fig


def save_training_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    """One panel per logged quantity (losses, held-out figures) against the epoch or step."""
    keys = [k for k in history[0] if k not in ("epoch", "step")]
    x_key = "epoch" if "epoch" in history[0] else "step"
    xs = [row.get(x_key, i) for i, row in enumerate(history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(xs, [row.get(key, np.nan) for row in history])
        ax.set_xlabel(x_key)
        ax.set_title(key)
    fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
