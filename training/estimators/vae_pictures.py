"""The VAE's pictures for the model card: samples (one row per class if conditional) and
reconstructions of test images for image data; the shared 2-D / feature plots otherwise; and
the training curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _tiles(rows: np.ndarray, shape: tuple[int, int], columns: int) -> np.ndarray:
    h, w = shape
    count = len(rows) // columns
    return np.clip(rows[:count * columns], 0, 1).reshape(count, columns, h, w).transpose(0, 2, 1, 3) \
        .reshape(count * h, columns * w)


def save_vae_pictures(estimator: Any, data: Any, folder: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.plots import save_model_picture, save_training_curve

    folder = Path(folder)
    if getattr(estimator, "history_", None):
        save_training_curve(estimator.history_, folder / "training.png", title)
    if data.image_shape is None:
        save_model_picture(estimator, data, folder / "samples.png", title)
        return
    classes = estimator.num_classes
    if classes:
        labels = np.repeat(np.arange(classes), 8)
        samples = estimator.sample(len(labels), seed=0, label=labels).numpy()
        sample_title = "samples (seed 0), one row per class"
    else:
        samples = estimator.sample(64, seed=0).numpy()
        sample_title = "samples (seed 0)"
    x = data.X_test[:32]
    y = data.y_test[:32] if classes else None
    pairs = np.stack([x, estimator.reconstruct(x, y)], axis=1).reshape(-1, x.shape[1])  # image, reconstruction
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5))
    axes[0].imshow(_tiles(samples, data.image_shape, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title(sample_title)
    axes[1].imshow(_tiles(pairs, data.image_shape, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[1].set_title("test images and their reconstructions")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(folder / "samples.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
