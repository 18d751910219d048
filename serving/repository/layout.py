"""Where things live in a model repository, and how a version is published atomically.

``<repo>/<name>/<version>/`` with integer versions. A version is written under a hidden
temporary name inside the model folder and renamed into place, so a reader (the server's scan,
or a hot reload) never sees half a model, and an existing version is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

TMP_PREFIX = ".tmp-"


def version_numbers(model_dir: Path) -> list[int]:
    """Published versions of one model, ascending; temporary and non-numeric folders are ignored."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and int(p.name) >= 1)


def model_names(repo: Path) -> list[str]:
    """Model folders of the repository (hidden folders excluded), sorted."""
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def publish_version(repo: Path, name: str, write: Callable[[Path, int], None],
                    version: int | None = None) -> Path:
    """Write a new version of ``name`` with ``write(tmp_dir, version)`` and rename it into place.

    ``version`` defaults to one above the highest published. If another writer publishes the same
    number first, the rename fails (a non-empty target is never replaced) and the next number is
    tried, unless the caller pinned ``version``, in which case FileExistsError is raised.
    """
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    pinned = version is not None
    for _ in range(100):
        number = version if pinned else max(version_numbers(model_dir), default=0) + 1
        target = model_dir / str(number)
        if target.exists():
            if pinned:
                raise FileExistsError(f"{target} already exists; versions are never overwritten")
            continue
        tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp, number)
            _fsync_tree(tmp)
            os.rename(tmp, target)  # fails if target appeared meanwhile: nothing is replaced
            return target
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if pinned or not target.exists():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    raise RuntimeError(f"could not publish a version of {name} after 100 attempts")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes: identifies the training data in a manifest."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()
