"""translations.png: what a CycleGAN does to held-out rows, at a glance.

Images: six rows of the same test columns — A, G(A), F(G(A)), then B, F(B), G(F(B)) — so one
sees the translation and whether the cycle brings it back (drawn as one mosaic image). Plain
rows: the first two features of A, G(A), B and F(B) as scatter plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLUMNS = 10


def _as_image(row: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    image = np.clip(row, 0.0, 1.0).reshape(c, h, w)
    return image[0] if c == 1 else image.transpose(1, 2, 0)


def save_translation_pairs(estimator: Any, data: Any, path: Path, title: str) -> None:
    a, b = data.X_test[:COLUMNS], data.X_test_b[:COLUMNS]
    g_a, f_b = estimator.translate(a, "a2b"), estimator.translate(b, "b2a")
    panels = [("A", a), ("G(A)", g_a), ("F(G(A))", estimator.translate(g_a, "b2a")),
              ("B", b), ("F(B)", f_b), ("G(F(B))", estimator.translate(f_b, "a2b"))]
    shape = estimator.image_shape_
    if shape is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
        for ax, (source, target) in zip(axes, ((0, 1), (3, 4))):
            for label, rows in (panels[source], panels[target]):
                ax.scatter(*np.asarray(rows)[:, :2].T, s=6, label=label)
            ax.set_xlabel("feature 0")
            ax.set_ylabel("feature 1")
            ax.legend()
    else:
        # One mosaic (a row of tiles per panel, one pixel of white between tiles) in one axes:
        # far quicker to draw than an axes per tile.
        c, h, w = shape
        columns = min(len(a), len(b))
        mosaic = np.ones(((h + 1) * len(panels) - 1, (w + 1) * columns - 1) + ((3,) if c == 3 else ()))
        blank = 0.0 if c == 1 else 1.0  # grayscale is drawn inverted (ink dark), so 0 is white
        mosaic *= blank
        for r, (_, rows) in enumerate(panels):
            for col in range(columns):
                mosaic[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = _as_image(rows[col], shape)
        fig, ax = plt.subplots(figsize=(0.6 * columns + 1.2, 0.6 * len(panels) + 0.6))
        ax.imshow(mosaic, cmap="gray_r" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(len(panels))], [label for label, _ in panels])
        ax.set_xticks([])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
