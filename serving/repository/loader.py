"""Scan a model repository and load what can be served; record why the rest cannot.

For each model folder the highest published version is loaded (DESIGN.md §4): its manifest is
validated with the shared pydantic model, every graph file must exist and open in onnxruntime
with the inputs and outputs the manifest declares, and each graph runs once (warm-up). Anything
wrong — unreadable JSON, an invalid manifest, a manifest naming another model or version, a
missing or corrupt ONNX file — marks that one model UNAVAILABLE with the reason, and the scan
goes on: one bad model never keeps the others from serving.

Only the latest version is loaded, to keep memory proportional to the number of models; a
request pinning another version gets NOT_FOUND naming the version that is loaded.

A version folder holding ``model.onnx`` and no manifest is a generic model
(``serving.repository.generic``): one graph, inputs and outputs read from the file.

A ``Repository`` is a snapshot: hot reload builds a new one (``with_model``, ``without``) and the
server swaps the reference, so a request sees one consistent set of models from start to end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from serving.models.errors import NotFound, Unavailable
from serving.repository.generic import GENERIC_FILE, GENERIC_GRAPH, GenericManifest
from serving.repository.layout import model_names, version_numbers
from serving.repository.manifest import MANIFEST_FILE, Manifest
from serving.runtime.session import GraphSession, SessionFactory, graph_spec_from_onnx

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model version that cannot be served; the message is the reason shown to clients."""


@dataclass
class LoadedModel:
    """A model version ready to serve: its manifest and one session per graph."""

    name: str
    version: int
    manifest: Manifest | GenericManifest = field(repr=False)
    graphs: dict[str, GraphSession] = field(repr=False)
    path: Path
    load_seconds: float = 0.0

    @property
    def generic(self) -> bool:
        """A bare ONNX file without a manifest."""
        return isinstance(self.manifest, GenericManifest)

    @property
    def family(self) -> str:
        return self.manifest.family

    def retire(self) -> None:
        """Another version replaced this one (or it was unloaded): let its batchers wind down."""
        for graph in self.graphs.values():
            graph.retire()

    @property
    def providers(self) -> dict[str, str]:
        """Execution provider each graph really runs on."""
        return {name: graph.provider for name, graph in self.graphs.items()}

    @property
    def provider(self) -> str:
        """One label for the model: the provider of its graphs ('+'-joined if they differ)."""
        return "+".join(sorted(set(self.providers.values())))

    @property
    def capabilities(self) -> list[str]:
        return list(self.manifest.capabilities)


@dataclass
class UnavailableModel:
    """A model folder that could not be loaded, and why."""

    name: str
    version: int
    reason: str
    family: str = ""


@dataclass
class Repository:
    """The loaded state of a repository: what serves, what does not, and the lookup rules."""

    path: Path
    models: dict[str, LoadedModel] = field(default_factory=dict)
    unavailable: dict[str, UnavailableModel] = field(default_factory=dict)
    # Derived views computed once per snapshot by whoever needs them (e.g. the OIP model names).
    cache: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return sorted({*self.models, *self.unavailable})

    def with_model(self, model: "LoadedModel | UnavailableModel") -> "Repository":
        """A new snapshot where ``model`` (loaded or not) takes its name's place."""
        models = {k: v for k, v in self.models.items() if k != model.name}
        unavailable = {k: v for k, v in self.unavailable.items() if k != model.name}
        if isinstance(model, LoadedModel):
            models[model.name] = model
        else:
            unavailable[model.name] = model
        return Repository(self.path, models, unavailable)

    def without(self, name: str) -> "Repository":
        """A new snapshot without ``name`` (unloaded, or its folder is gone)."""
        return Repository(self.path, {k: v for k, v in self.models.items() if k != name},
                          {k: v for k, v in self.unavailable.items() if k != name})

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded model ``name``; ``version`` 0 means whichever version is loaded.

        Raises NotFound for an unknown name or a version that is not loaded, Unavailable for a
        model that exists but failed to load.
        """
        if not name:
            raise NotFound("model.name: expected a model name, got an empty string")
        model = self.models.get(name)
        if model is None:
            broken = self.unavailable.get(name)
            if broken is not None:
                raise Unavailable(f"model {name!r} is unavailable: {broken.reason}")
            raise NotFound(f"model.name: unknown model {name!r}; available models: {sorted(self.models)}")
        if version < 0:
            raise NotFound(f"model.version: expected 0 (latest) or a version >= 1, got {version}")
        if version not in (0, model.version):
            raise NotFound(f"model.version: version {version} of {name!r} is not loaded; "
                           f"loaded versions: [{model.version}]")
        return model


def _describe_validation(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "manifest"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def read_manifest(folder: Path) -> Manifest:
    """The validated manifest of one version folder, or ModelLoadError saying what is wrong."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"{MANIFEST_FILE} is missing in {folder}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{MANIFEST_FILE} cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{MANIFEST_FILE} is invalid: {_describe_validation(exc)}") from exc


def _open_graph(graph_name: str, path: Path, spec, factory: SessionFactory, model: str, batching) -> GraphSession:
    try:
        graph = GraphSession(graph_name, path, spec, factory, model=model, batching=batching)
        if factory.options.warm_up:
            graph.warm_up()
        return graph
    except ValueError as exc:  # signature mismatch
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:  # onnxruntime raises its own types for corrupt files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"graph {graph_name!r}: onnxruntime cannot load or run {path.name}: "
                             f"{first_line}") from exc


def load_generic(folder: Path, name: str, version: int, factory: SessionFactory) -> LoadedModel:
    """Load ``<repo>/<name>/<version>/model.onnx`` without a manifest (a generic model)."""
    started = time.perf_counter()
    path = folder / GENERIC_FILE
    try:
        spec = graph_spec_from_onnx(path, factory)
    except ValueError as exc:
        raise ModelLoadError(f"{GENERIC_FILE}: {exc}") from exc
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load {GENERIC_FILE}: {first_line}") from exc
    manifest = GenericManifest(name=name, version=version, graphs={GENERIC_GRAPH: spec})
    graph = _open_graph(GENERIC_GRAPH, path, spec, factory, name, None)
    return LoadedModel(name, version, manifest, {GENERIC_GRAPH: graph}, folder, time.perf_counter() - started)


def load_version(folder: Path, name: str, version: int, factory: SessionFactory) -> LoadedModel:
    """Load ``<repo>/<name>/<version>/``: validate, open every graph, warm each up."""
    if not (folder / MANIFEST_FILE).exists() and (folder / GENERIC_FILE).is_file():
        return load_generic(folder, name, version, factory)
    started = time.perf_counter()
    manifest = read_manifest(folder)
    if manifest.name != name:
        raise ModelLoadError(f"manifest name {manifest.name!r} does not match the folder name {name!r}")
    if manifest.version != version:
        raise ModelLoadError(f"manifest version {manifest.version} does not match the folder {version}")
    graphs: dict[str, GraphSession] = {}
    for graph_name, spec in manifest.graphs.items():
        path = folder / spec.file
        if not path.is_file():
            for graph in graphs.values():
                graph.retire()
            raise ModelLoadError(f"graph {graph_name!r}: file {spec.file} is missing")
        try:
            graphs[graph_name] = _open_graph(graph_name, path, spec, factory, name, manifest.batching)
        except ModelLoadError:
            for graph in graphs.values():
                graph.retire()
            raise
    return LoadedModel(name, version, manifest, graphs, folder, time.perf_counter() - started)


def load_repository(path: Path, factory: SessionFactory) -> Repository:
    """Load the highest version of every model folder in ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"repo: {path} is not a directory (expected <repo>/<model>/<version>/)")
    repository = Repository(path)
    for name in model_names(path):
        model = load_model(path, name, factory)
        if isinstance(model, LoadedModel):
            repository.models[name] = model
        else:
            repository.unavailable[name] = model
    return repository


def latest_versions(path: Path) -> dict[str, int]:
    """The highest published version of every model folder (0 when it has none): what a reload compares."""
    return {name: (version_numbers(path / name) or [0])[-1] for name in model_names(Path(path))}


def load_model(path: Path, name: str, factory: SessionFactory) -> LoadedModel | UnavailableModel:
    """Load the highest version of ``<path>/<name>``, or say why it cannot serve."""
    versions = version_numbers(Path(path) / name)
    if not versions:
        return UnavailableModel(name, 0, "no published version (expected <name>/1/)")
    version = versions[-1]
    try:
        return load_version(Path(path) / name / str(version), name, version, factory)
    except ModelLoadError as exc:
        log.debug("model %s version %d is unavailable: %s", name, version, exc)
        return UnavailableModel(name, version, str(exc), _family_or_empty(Path(path) / name / str(version)))


def _family_or_empty(folder: Path) -> str:
    try:
        value = json.loads((folder / MANIFEST_FILE).read_text()).get("family", "")
        return value if isinstance(value, str) else ""
    except Exception:
        return ""
