"""Repository loading: highest version, broken models reported and skipped, lookup rules."""

from __future__ import annotations

import pytest

from serving.models.errors import NotFound, Unavailable
from serving.repository.loader import load_repository
from serving.runtime.session import RuntimeOptions, SessionFactory


@pytest.fixture(scope="module")
def repository(serving_repo):
    return load_repository(serving_repo.path, SessionFactory(RuntimeOptions(("CPUExecutionProvider",))))


def test_available_models_at_their_highest_version(repository, serving_repo):
    assert sorted(repository.models) == sorted([serving_repo.gaussian, serving_repo.translate, serving_repo.support])
    model = repository.models[serving_repo.gaussian]
    assert model.version == 2 and model.path.name == "2"
    assert model.providers == {"score": "CPUExecutionProvider", "sample": "CPUExecutionProvider"}
    assert model.provider == "CPUExecutionProvider" and model.load_seconds > 0


def test_broken_models_are_unavailable_with_their_reason(repository, serving_repo):
    assert sorted(repository.unavailable) == sorted(serving_repo.broken)
    for name, phrase in serving_repo.broken.items():
        assert phrase in repository.unavailable[name].reason, (name, repository.unavailable[name].reason)
    assert repository.unavailable["broken-missing-onnx"].family == "gaussian"
    assert repository.unavailable["broken-empty"].version == 0


def test_lookup_rules(repository, serving_repo):
    assert repository.get(serving_repo.gaussian).version == 2
    assert repository.get(serving_repo.gaussian, 2).version == 2
    with pytest.raises(NotFound, match=r"model.version: version 1 .* loaded versions: \[2\]"):
        repository.get(serving_repo.gaussian, 1)
    with pytest.raises(NotFound, match=r"model.name: unknown model 'nope'; available models"):
        repository.get("nope")
    with pytest.raises(Unavailable, match="broken-json"):
        repository.get("broken-json")


def test_missing_repository_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_repository(tmp_path / "absent", SessionFactory())


def test_requested_cuda_falls_back_and_reports_the_real_provider(serving_repo):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    factory = SessionFactory(RuntimeOptions(("CUDAExecutionProvider", "CPUExecutionProvider")))
    model = load_repository(serving_repo.path, factory).models[serving_repo.gaussian]
    for graph in model.graphs.values():
        assert graph.provider == graph.session.get_providers()[0]
    if model.provider == "CPUExecutionProvider":  # no usable GPU here: asked once, then not again
        assert "CUDAExecutionProvider" in factory._failed
        assert factory.requested_providers() == ["CPUExecutionProvider"]
