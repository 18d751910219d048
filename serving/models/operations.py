"""A served model's operations as plain functions over NumPy arrays: score, detect, sample, translate.

These are what the gRPC services call, and what a test or a notebook can call directly with a
``LoadedModel``. Each validates its inputs against the manifest (``validation``), runs the
model's graphs through the runtime, and returns NumPy. They run in an executor thread, never on
the event loop; the optional ``RunContext`` carries the request's deadline and metrics observer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serving.models.errors import FailedPrecondition, InvalidArgument
from serving.models.validation import (Limits, check_count, check_rows, check_sample_count, check_seed,
                                       check_threshold_choice, require)
from serving.repository.noise import draw_noise
from serving.runtime.context import RunContext
from serving.runtime.session import NUMPY_DTYPES, GraphSession

if TYPE_CHECKING:  # the loader imports this package's errors; avoid the import cycle
    from serving.repository.loader import LoadedModel

DIRECTIONS = {"a2b": "translate_a2b", "b2a": "translate_b2a"}
# Bounds on request-sized noise axes: each multiplies the work and memory of one row.
MAX_IMPORTANCE_SAMPLES = 5000
MAX_SEQUENCE_LENGTH = 100_000


@dataclass
class Detection:
    """DetectAnomalies' answer: rows with ``score > threshold`` are anomalies."""

    score: np.ndarray  # float32 [N], -log p(x); +inf where the density is 0
    threshold: float
    is_anomaly: np.ndarray  # bool [N]
    source: str  # "calibrated", "request-threshold" or "request-contamination"


def _chunk(model: LoadedModel, limits: Limits) -> int:
    """Rows per session run: the server's chunk size, lowered by the manifest's batching limit."""
    cap = model.manifest.batching.max_batch_size
    return min(limits.chunk_rows, cap) if cap else limits.chunk_rows


def _run(model: LoadedModel, graph: GraphSession, data: dict[str, np.ndarray], rows: int, seed: int,
         limits: Limits, ctx: RunContext | None, sizes: dict[str, int] | None = None) -> np.ndarray:
    """Run ``graph`` on its data inputs plus noise drawn for all ``rows`` at once; first output.

    The noise is drawn for the whole batch before chunking, so the result does not depend on
    the chunk size. ``sizes`` resizes the noise's named axes (importance samples, length).
    """
    feeds = draw_noise(graph.spec.inputs, rows, seed, sizes)
    feeds.update(data)
    return graph.run_chunked(feeds, _chunk(model, limits), ctx)[0]


def score(model: LoadedModel, x: np.ndarray, *, limits: Limits = Limits(), ctx: RunContext | None = None,
          importance_samples: int = 0, seed: int = 0) -> np.ndarray:
    """log p(x) in nats per row: float32 [N]. -inf where the model gives zero density."""
    require(model.capabilities, "score", model.name, "score densities")
    graph = model.graphs["score"]
    x = check_rows(x, model.manifest.input.shape, model.manifest.input.dtype, limits)
    sizes = None
    if importance_samples:
        resizable = [s for s in graph.spec.noise_inputs if "importance_samples" in s.axes.values()]
        if not resizable:
            raise InvalidArgument(f"importance_samples: expected 0, model {model.name!r} scores exactly "
                                  f"(no importance sampling), got {importance_samples}")
        check_count("importance_samples", importance_samples, MAX_IMPORTANCE_SAMPLES)
        sizes = {"importance_samples": importance_samples}
    check_seed(seed)
    data_name = graph.spec.data_inputs[0].name
    out = _run(model, graph, {data_name: x}, len(x), seed, limits, ctx, sizes)
    return np.asarray(out, dtype=np.float32).reshape(len(x))


def detect(model: LoadedModel, x: np.ndarray, *, threshold: float | None = None,
           contamination: float | None = None, limits: Limits = Limits(),
           ctx: RunContext | None = None) -> Detection:
    """Anomaly score -log p(x) per row and the flags at the calibrated or requested threshold.

    ``contamination`` picks the threshold from the manifest's held-out quantile table
    (``AnomalyCalibration.threshold_at``). A NaN score (a broken model output) is flagged: a row
    the model cannot vouch for is not reported as normal.
    """
    require(model.capabilities, "anomaly" if "anomaly" in model.graphs else "score", model.name,
            "detect anomalies")
    check_threshold_choice(threshold, contamination)
    calibration = model.manifest.anomaly
    if threshold is None and calibration is None:
        raise FailedPrecondition(f"model {model.name!r} has no anomaly calibration in its manifest: "
                                 f"pass threshold explicitly")
    if threshold is not None:
        chosen, source = float(threshold), "request-threshold"
    elif contamination is not None:
        chosen, source = calibration.threshold_at(contamination), "request-contamination"
    else:
        chosen, source = calibration.threshold, "calibrated"
    if "anomaly" in model.graphs:  # e.g. a GAN discriminator's score: no density, a direct score
        graph = model.graphs["anomaly"]
        rows = check_rows(x, model.manifest.input.shape, model.manifest.input.dtype, limits)
        out = _run(model, graph, {graph.spec.data_inputs[0].name: rows}, len(rows), 0, limits, ctx)
        values = np.asarray(out, dtype=np.float32).reshape(len(rows))
    else:
        values = -score(model, x, limits=limits, ctx=ctx)
    return Detection(values, chosen, ~(values <= chosen), source)


def sample(model: LoadedModel, n: int, seed: int = 0, label: int | None = None, *,
           limits: Limits = Limits(), ctx: RunContext | None = None, length: int = 0) -> np.ndarray:
    """``n`` samples [n, *input_shape] from noise drawn with ``draw_noise(inputs, n, seed)``.

    A class-conditional model's sample graph takes the label as its one data input (one value
    per row); giving a label to an unconditional model is FAILED_PRECONDITION, because it asks
    for a capability ("conditional") the model lacks.
    """
    require(model.capabilities, "sample", model.name, "sample")
    graph = model.graphs["sample"]
    out_spec = graph.spec.outputs[0]
    sizes = None
    row_shape = list(model.manifest.input.shape)
    if length:
        if not any("length" in s.axes.values() for s in graph.spec.noise_inputs):
            raise InvalidArgument(f"length: expected 0, model {model.name!r} does not sample sequences, "
                                  f"got {length}")
        check_count("length", length, MAX_SEQUENCE_LENGTH)
        sizes = {"length": length}
    if -1 in row_shape:  # sequences: the sampled length, requested or the graph's default
        default = next((s.shape[a] for s in graph.spec.noise_inputs for a, v in s.axes.items() if v == "length"), 1)
        row_shape = [length or default if d == -1 else d for d in row_shape]
    check_sample_count(n, row_shape, np.dtype(NUMPY_DTYPES[out_spec.dtype]).itemsize, limits)
    check_seed(seed)
    data: dict[str, np.ndarray] = {}
    conditional = "conditional" in model.capabilities
    if label is not None and not conditional:
        require(model.capabilities, "conditional", model.name, "sample a class label")
    if conditional:
        classes = model.manifest.num_classes or 0
        if label is None:
            raise InvalidArgument(f"label: model {model.name!r} is class-conditional: expected a label in "
                                  f"[0, {classes - 1}]")
        if not 0 <= label < classes:
            raise InvalidArgument(f"label: expected a class in [0, {classes - 1}], got {label}")
        for spec in graph.spec.data_inputs:
            shape = [n, *[1 if d == -1 else d for d in spec.shape[1:]]]
            data[spec.name] = np.full(shape, label, dtype=NUMPY_DTYPES[spec.dtype])
    elif graph.spec.data_inputs:
        names = [s.name for s in graph.spec.data_inputs]
        raise FailedPrecondition(f"model {model.name!r}: its sample graph takes data inputs {names} "
                                 f"but the model is not declared 'conditional'")
    out = _run(model, graph, data, n, seed, limits, ctx, sizes)
    return np.ascontiguousarray(out)


def translate(model: LoadedModel, x: np.ndarray, direction: str, *, limits: Limits = Limits(),
              ctx: RunContext | None = None) -> np.ndarray:
    """Map rows from one domain to the other with the ``translate_a2b`` or ``translate_b2a`` graph.

    The rows are checked against that graph's data input (shape without the batch axis, -1 =
    any size; dtype), since the two domains need not share the manifest's input shape.
    """
    require(model.capabilities, "translate", model.name, "translate")
    if direction not in DIRECTIONS:
        raise InvalidArgument(f"direction: expected one of {sorted(DIRECTIONS)}, got {direction!r}")
    graph = model.graphs[DIRECTIONS[direction]]
    inputs = graph.spec.data_inputs
    if len(inputs) != 1:
        raise FailedPrecondition(f"model {model.name!r}: graph {graph.name!r} must take exactly one data "
                                 f"input to translate, it takes {[s.name for s in inputs]}")
    x = check_rows(x, inputs[0].shape[1:], inputs[0].dtype, limits)
    out = _run(model, graph, {inputs[0].name: x}, len(x), 0, limits, ctx)
    return np.ascontiguousarray(out)
