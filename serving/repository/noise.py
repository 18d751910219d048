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


def noise_shape(spec: TensorSpec, n: int, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
    """[n, *spec.shape[1:]], with each named axis (``spec.axes``) resized by ``sizes`` if given."""
    shape = [n, *spec.shape[1:]]
    for axis, name in spec.axes.items():
        if sizes and sizes.get(name):
            shape[axis] = int(sizes[name])
    if any(d < 1 for d in shape[1:]):
        raise ValueError(f"noise input {spec.name!r} needs a static shape after the batch axis")
    return tuple(shape)


def draw_noise(specs: list[TensorSpec], n: int, seed: int,
               sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Return {input name: array of shape ``noise_shape(spec, n, sizes)``} for the noise inputs.

    ``sizes`` resizes named axes, e.g. {"importance_samples": 256} or {"length": 100}.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    noise = {}
    for spec in specs:
        if spec.noise is None:
            continue
        shape = noise_shape(spec, n, sizes)
        if spec.noise == "normal":
            values = rng.standard_normal(shape)
        else:
            values = rng.random(shape)
        noise[spec.name] = values.astype(_NUMPY_DTYPES[spec.dtype])
    return noise
