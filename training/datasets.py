"""Datasets by name, split as BENCHMARKS.md prescribes.

* ``digits`` — the D1 protocol: scikit-learn's 8x8 digits (shipped with the package, nothing is
  downloaded), dequantised with ``x = (v + u) / 17``, ``u ~ U(0, 1)`` from
  ``default_rng(0)``, split 70/30 stratified with ``random_state=0``.
* ``digits-bold`` — the C1 protocol for unpaired translation: domain A is digits / 16 as 8x8
  images, domain B their grey dilation (2x2); the D1 split on indices, A from the even-positioned
  training indices and B from the odd-positioned ones, so no pair is ever seen in training. The
  test part is paired (``X_test_b`` is the dilation of ``X_test``) for measuring translations.
* ``grid25`` — 25 Gaussians at {-4,-2,0,2,4}^2 with sigma 0.05 (the G1 protocol), generated.
* ``regimes`` — 400 sequences [T=50, D=2] from a known 3-state Gaussian HMM (``REGIMES_*``),
  generated with ``default_rng(0)``, split 70/30 with ``random_state=0``: ``X_train`` is 3-D.
* a path to a ``.npy`` or ``.csv`` file of rows (a ``.npy`` may also hold sequences
  [N, T, D]), split 70/30 with ``random_state=0``.
* a folder of PNG images for translation, with ``A/`` and ``B/`` (or ``trainA/``, ``trainB/``
  and optionally ``testA/``, ``testB/``) subfolders: ``training.images``.

Hyper-parameters are never chosen on ``X_test``: estimators that select (KDE ``cv``, GMM
``auto``) split their own validation part off the training rows they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

GRID25_MEANS = np.array([(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)], dtype=float)
GRID25_SIGMA = 0.05


@dataclass
class Dataset:
    name: str
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # Shape of one row as an image, for the sample grid of the model card; None for plain rows.
    image_shape: tuple[int, int] | None = None
    # The second domain of an unpaired translation dataset (digits-bold); None otherwise.
    X_train_b: np.ndarray | None = None
    X_test_b: np.ndarray | None = None
    y_train_b: np.ndarray | None = None
    # True when row i of X_test_b is the counterpart of row i of X_test (digits-bold's dilations).
    paired_test: bool = False

    @property
    def n_features(self) -> int:
        return self.X_train.shape[-1]  # rows [N, D] or sequences [N, T, D]


def digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    u = np.random.default_rng(0).uniform(size=bunch.data.shape)
    x = (bunch.data + u) / 17.0
    X_train, X_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.3, stratify=bunch.target, random_state=0)
    return Dataset("digits", X_train, X_test, y_train, y_test, image_shape=(8, 8))


def digits_bold() -> Dataset:
    from scipy.ndimage import grey_dilation
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images / 16.0
    bold = np.stack([grey_dilation(image, size=(2, 2)) for image in images])
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.3, stratify=bunch.target,
                                           random_state=0)
    a_idx, b_idx = train_idx[0::2], train_idx[1::2]
    return Dataset("digits-bold", images[a_idx].reshape(-1, 64), images[test_idx].reshape(-1, 64),
                   bunch.target[a_idx], bunch.target[test_idx], image_shape=(8, 8),
                   X_train_b=bold[b_idx].reshape(-1, 64), X_test_b=bold[test_idx].reshape(-1, 64),
                   y_train_b=bunch.target[b_idx], paired_test=True)


def sample_grid25(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of the 5x5 grid mixture and the index of the mode each came from."""
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, len(GRID25_MEANS), size=n)
    return GRID25_MEANS[modes] + GRID25_SIGMA * rng.standard_normal((n, 2)), modes


def grid25(n_train: int = 2000, n_test: int = 1000) -> Dataset:
    X_train, y_train = sample_grid25(n_train, seed=0)
    X_test, y_test = sample_grid25(n_test, seed=1)
    return Dataset("grid25", X_train, X_test, y_train, y_test)


# The regimes HMM: sticky transitions between three 2-D Gaussian emission states.
REGIMES_START = np.array([0.5, 0.3, 0.2])
REGIMES_TRANSMAT = np.array([[0.90, 0.07, 0.03], [0.05, 0.90, 0.05], [0.04, 0.06, 0.90]])
REGIMES_MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
REGIMES_COVARIANCES = np.array([[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]], [[0.8, 0.0], [0.0, 0.2]]])


def sample_regimes(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences [n, length, 2] of the regimes HMM and their hidden states [n, length]."""
    rng = np.random.default_rng(seed)
    states = np.empty((n, length), dtype=np.int64)
    states[:, 0] = rng.choice(3, size=n, p=REGIMES_START)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        states[:, t] = np.minimum((np.cumsum(REGIMES_TRANSMAT[states[:, t - 1]], axis=1) < u).sum(axis=1), 2)
    chol = np.linalg.cholesky(REGIMES_COVARIANCES)
    z = rng.standard_normal((n, length, 2))
    return REGIMES_MEANS[states] + np.einsum("ntij,ntj->nti", chol[states], z), states


def regimes(n: int = 400, length: int = 50) -> Dataset:
    X, _ = sample_regimes(n, length, seed=0)
    X_train, X_test = train_test_split(X, test_size=0.3, random_state=0)
    return Dataset("regimes", X_train, X_test)


def from_file(path: Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file (expected 'digits', 'grid25', or a .npy/.csv file)")
    if path.suffix == ".npy":
        X = np.load(path, allow_pickle=False)
    elif path.suffix == ".csv":
        X = np.loadtxt(path, delimiter=",", ndmin=2)
    else:
        raise ValueError(f"--data {path}: expected a .npy or .csv file, got {path.suffix or 'no suffix'!r}")
    dims = (2, 3) if path.suffix == ".npy" else (2,)  # .npy may hold sequences [N, T, D]
    if X.ndim not in dims or len(X) < 10 or 0 in X.shape:
        expected = "a 2-D array of rows or a 3-D array of sequences [N, T, D]" if len(dims) > 1 else "a 2-D array"
        raise ValueError(f"--data {path}: expected {expected} with at least 10 rows, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or not np.all(np.isfinite(X)):
        raise ValueError(f"--data {path}: rows must be finite numbers")
    X_train, X_test = train_test_split(X.astype(np.float64), test_size=0.3, random_state=0)
    return Dataset(path.stem, X_train, X_test)


NAMED = {"digits": digits, "grid25": grid25, "digits-bold": digits_bold, "regimes": regimes}


def load(name_or_path: str) -> Dataset:
    """A named dataset, a file of rows, or a folder of PNG images for translation."""
    if name_or_path in NAMED:
        return NAMED[name_or_path]()
    if Path(name_or_path).is_dir():
        from training.images import load_translation_folder

        return load_translation_folder(Path(name_or_path))
    if name_or_path.endswith((".npy", ".csv")) or Path(name_or_path).exists():
        return from_file(Path(name_or_path))
    raise ValueError(f"--data {name_or_path!r}: expected one of {sorted(NAMED)}, a path to a .npy/.csv file, "
                     "or a folder of PNG images with A/ and B/ subfolders")
