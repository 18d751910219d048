"""Scan a model repository and load what can be served; record why the rest cannot.

For each model folder the highest published version is loaded (DESIGN.md §4): its manifest is
validated with the shared pydantic model, every graph file must exist and open in onnxruntime
with the inputs and outputs the manifest declares, and each graph runs once (warm-up). Anything
wrong — unreadable JSON, an invalid manifest, a manifest naming another model or version, a
missing or corrupt ONNX file — marks that one model UNAVAILABLE with the reason, and the scan
goes on: one bad model never keeps the others from serving.

Only the latest version is loaded, to keep memory proportional to the number of models; a
request pinning another version gets NOT_FOUND naming the version that is loaded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from serving.models.errors import NotFound, Unavailable
from serving.repository.layout import model_names, version_numbers
from serving.repository.manifest import MANIFEST_FILE, Manifest
from serving.runtime.session import GraphSession, SessionFactory

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model version that cannot be served; the message is the reason shown to clients."""


@dataclass
class LoadedModel:
    """A model version ready to serve: its manifest and one session per graph."""

    name: str
    version: int
    manifest: Manifest = field(repr=False)
    graphs: dict[str, GraphSession] = field(repr=False)
    path: Path
    load_seconds: float = 0.0

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

    @property
    def names(self) -> list[str]:
        return sorted({*self.models, *self.unavailable})

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


def load_version(folder: Path, name: str, version: int, factory: SessionFactory) -> LoadedModel:
    """Load ``<repo>/<name>/<version>/``: validate, open every graph, warm each up."""
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
            raise ModelLoadError(f"graph {graph_name!r}: file {spec.file} is missing")
        try:
            graph = GraphSession(graph_name, path, spec, factory)
            graph.warm_up()
        except ValueError as exc:  # signature mismatch
            raise ModelLoadError(str(exc)) from exc
        except Exception as exc:  # onnxruntime raises its own types for corrupt files
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"graph {graph_name!r}: onnxruntime cannot load or run {spec.file}: "
                                 f"{first_line}") from exc
        graphs[graph_name] = graph
    return LoadedModel(name, version, manifest, graphs, folder, time.perf_counter() - started)


def load_repository(path: Path, factory: SessionFactory) -> Repository:
    """Load the highest version of every model folder in ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"repo: {path} is not a directory (expected <repo>/<model>/<version>/)")
    repository = Repository(path)
    for name in model_names(path):
        versions = version_numbers(path / name)
        if not versions:
            repository.unavailable[name] = UnavailableModel(name, 0, "no published version (expected <name>/1/)")
            continue
        version = versions[-1]
        try:
            repository.models[name] = load_version(path / name / str(version), name, version, factory)
        except ModelLoadError as exc:
            family = _family_or_empty(path / name / str(version))
            repository.unavailable[name] = UnavailableModel(name, version, str(exc), family)
            log.debug("model %s version %d is unavailable: %s", name, version, exc)
    return repository


def _family_or_empty(folder: Path) -> str:
    try:
        value = json.loads((folder / MANIFEST_FILE).read_text()).get("family", "")
        return value if isinstance(value, str) else ""
    except Exception:
        return ""
