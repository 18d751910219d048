"""A bare ONNX file served without a manifest: ``<repo>/<name>/<version>/model.onnx`` (as Triton does).

Such a model has one graph, named ``model``, whose inputs and outputs are read from the ONNX file
(symbolic dimensions become -1). It is served through the Open Inference Protocol's ModelInfer
as it is; the domain API lists it with family ``onnx`` and the single capability ``infer``, and
its score/detect/sample/translate calls answer FAILED_PRECONDITION, because nothing says what
the graph computes. ``GenericManifest`` offers the few manifest fields the servicers read, so
the rest of the server treats both kinds of model alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from serving.repository.manifest import Batching, GraphSpec

GENERIC_FILE = "model.onnx"
GENERIC_GRAPH = "model"
GENERIC_FAMILY = "onnx"
GENERIC_CAPABILITIES = ("infer",)


@dataclass(frozen=True)
class GenericInput:
    """The row shape (without the batch axis; -1 = any size) and dtype of the graph's first input."""

    shape: list[int]
    dtype: str


@dataclass
class GenericManifest:
    name: str
    version: int
    graphs: dict[str, GraphSpec]
    family: str = GENERIC_FAMILY
    description: str = "ONNX model without a manifest: inputs and outputs read from the graph"
    capabilities: list[str] = field(default_factory=lambda: list(GENERIC_CAPABILITIES))
    batching: Batching = field(default_factory=Batching)
    anomaly: None = None
    num_classes: None = None

    @property
    def input(self) -> GenericInput:
        first = self.graphs[GENERIC_GRAPH].inputs[0]
        return GenericInput(shape=list(first.shape[1:]), dtype=first.dtype)

    def to_json(self) -> str:
        graphs = {name: spec.model_dump(exclude_none=True) for name, spec in self.graphs.items()}
        return json.dumps({"name": self.name, "version": self.version, "family": self.family,
                           "description": self.description, "capabilities": self.capabilities,
                           "graphs": graphs}, indent=2)
