"""Translation datasets from folders of PNG images (read with Pillow).

Two layouts of one folder ``DIR``, the first as in pytorch-CycleGAN-and-pix2pix:

* ``DIR/trainA``, ``DIR/trainB`` and optionally ``DIR/testA``, ``DIR/testB`` — used as given
  (without test folders, 30% of each training folder is held out, ``random_state=0``);
* ``DIR/A``, ``DIR/B`` — each domain split 70/30 with ``random_state=0``.

Every image of both domains must have the same height and width. Images are grayscale (one
channel) unless any image of the pair has colour, in which case all are read as RGB. A row is
the image flattened in C, H, W order (channel-major, as torch's convolutions take it) and scaled
to [0, 1]. The test parts count as *paired* (``Dataset.paired_test``) only in the first layout
when ``testA`` and ``testB`` hold the same file names: row i of each is then the same scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from training.datasets import Dataset

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
LAYOUTS = (("trainA", "trainB", "testA", "testB"), ("A", "B", None, None))


def png_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".png")


def is_translation_folder(path: Path) -> bool:
    path = Path(path)
    return any((path / a).is_dir() and (path / b).is_dir() for a, b, _, _ in LAYOUTS)


def read_pngs(files: list[Path], rgb: bool, size: tuple[int, int], where: str) -> np.ndarray:
    """Rows [n, C·H·W] in [0, 1] (C = 3 if ``rgb`` else 1); every image must be ``size`` (W, H)."""
    rows = []
    for file in files:
        with Image.open(file) as image:
            if image.size != size:
                raise ValueError(f"--data {where}: {file.name} is {image.size[0]}x{image.size[1]}, the other images "
                                 f"are {size[0]}x{size[1]}; every image must have the same size")
            pixels = np.asarray(image.convert("RGB" if rgb else "L"), dtype=np.float64) / 255.0
        rows.append(pixels.transpose(2, 0, 1).ravel() if rgb else pixels.ravel())
    return np.stack(rows)


def load_translation_folder(path: Path) -> Dataset:
    """A two-domain dataset from ``path`` (see the module docstring for the layouts)."""
    path = Path(path)
    for train_a, train_b, test_a, test_b in LAYOUTS:
        if (path / train_a).is_dir() and (path / train_b).is_dir():
            break
    else:
        raise ValueError(f"--data {path}: a folder of PNG images for translation must hold trainA/ and trainB/ "
                         "(optionally testA/ and testB/) or A/ and B/")
    folders = {k: path / v for k, v in (("train_a", train_a), ("train_b", train_b), ("test_a", test_a),
                                         ("test_b", test_b)) if v is not None and (path / v).is_dir()}
    files = {k: png_files(folder) for k, folder in folders.items()}
    for key, found in files.items():
        if len(found) < (1 if key.startswith("test") else 2):
            raise ValueError(f"--data {path}: {folders[key].name}/ holds {len(found)} PNG images; expected at least "
                             f"{1 if key.startswith('test') else 2}")
    with Image.open(files["train_a"][0]) as first:
        size = first.size
    rgb = False
    for found in files.values():
        for file in found:
            with Image.open(file) as image:
                rgb = rgb or image.mode not in GRAY_MODES
    rows = {k: read_pngs(found, rgb, size, str(path)) for k, found in files.items()}

    paired = False
    if "test_a" in rows and "test_b" in rows:
        a_train, a_test, b_train, b_test = rows["train_a"], rows["test_a"], rows["train_b"], rows["test_b"]
        paired = [f.name for f in files["test_a"]] == [f.name for f in files["test_b"]]
    else:
        a_train, a_test = train_test_split(rows["train_a"], test_size=0.3, random_state=0)
        b_train, b_test = train_test_split(rows["train_b"], test_size=0.3, random_state=0)
    return Dataset(path.name, a_train, a_test, image_shape=(size[1], size[0]), X_train_b=b_train, X_test_b=b_test,
                   paired_test=paired)
