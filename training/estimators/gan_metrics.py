"""Figures for a GAN's samples: it has no likelihood, so it is judged by where its samples fall.

* ``grid25_quality`` — the G1 protocol (VEEGAN/PacGAN): a sample is high-quality if it lies
  within 3 sigma of its nearest grid mean; a mode is captured if at least one high-quality
  sample is nearest to it.
* nearest-neighbour distances between samples and held-out rows, in data units: samples far
  from every test row are poor (``sample_to_test_distance``, a precision proxy); test rows far
  from every sample are missed (``test_to_sample_distance``, a recall proxy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.datasets import GRID25_MEANS, GRID25_SIGMA

FIGURE_SAMPLES = 2500


def grid25_quality(samples: np.ndarray) -> tuple[int, float]:
    """(modes captured of 25, % high-quality samples) for samples [n, 2]."""
    distances = np.linalg.norm(np.asarray(samples, dtype=np.float64)[:, None, :] - GRID25_MEANS[None], axis=2)
    nearest = distances.argmin(axis=1)
    high_quality = distances.min(axis=1) <= 3 * GRID25_SIGMA
    return len(np.unique(nearest[high_quality])), 100.0 * float(high_quality.mean())


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of ``a``, the Euclidean distance to its nearest row of ``b``."""
    ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.cat([torch.cdist(chunk, tb).amin(dim=1) for chunk in ta.split(1024)]).numpy()


def sample_figures(estimator: Any, data: Any, n: int = FIGURE_SAMPLES, seed: int = 0) -> dict[str, float]:
    """Sample figures on the dataset's test part (conditional models sample the test labels)."""
    labels = None
    if estimator.num_classes:
        labels = np.resize(np.asarray(data.y_test, dtype=np.int64), n)
    samples = estimator.sample(n, seed=seed, label=labels).numpy()
    figures = {"sample_to_test_distance": float(nearest_distances(samples, data.X_test).mean()),
               "test_to_sample_distance": float(nearest_distances(data.X_test, samples).mean())}
    if data.name == "grid25" and samples.shape[1] == 2:
        modes, high_quality = grid25_quality(samples)
        figures.update(grid25_modes=float(modes), grid25_high_quality_percent=high_quality)
    return figures
