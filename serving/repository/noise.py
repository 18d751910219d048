"""Drawing a sampling graph's noise inputs from a seed.

Randomness enters every sampling graph as inputs, and this one function draws them, for the
server and for training-time sampling alike: the same seed gives the same samples from torch,
from onnxruntime on CPU and from onnxruntime on GPU. Inputs are drawn in the graph's declared
order from one ``numpy.random.default_rng(seed)``, so adding a family never changes another's
samples.
"""

from __future__ import annotations

import numpy as np

from serving.repository.manifest import TensorSpec

_NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64}


def draw_noise(specs: list[TensorSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """Return {input name: array of shape [n, *spec.shape[1:]]} for the noise inputs in ``specs``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    noise = {}
    for spec in specs:
        if spec.noise is None:
            continue
        if any(d < 1 for d in spec.shape[1:]):
            raise ValueError(f"noise input {spec.name!r} needs a static shape after the batch axis")
        shape = (n, *spec.shape[1:])
        if spec.noise == "normal":
            values = rng.standard_normal(shape)
        else:
            values = rng.random(shape)
        noise[spec.name] = values.astype(_NUMPY_DTYPES[spec.dtype])
    return noise
