"""The Kubernetes manifests under k8s/: schema-valid, renderable, and consistent with each other.

Schemas come from kubernetes-validate's bundled JSON schemas (no network), in strict mode, for the
oldest Kubernetes we support and for the newest the installed package knows. There is no kustomize
binary here, so the overlays are rendered by `render` below, which implements exactly the
kustomization features the manifests use (`resources` and JSON 6902 `patches` with a `target`)
and refuses anything else, so an overlay can never silently render differently than kustomize.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "training"]
SERVING = ["base", "overlays/cpu", "overlays/gpu"]
# The oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27), and the
# newest whose schemas the installed kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.30.0", kv.latest_version()]
SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}
SUPPORTED_TARGET_KEYS = {"group", "version", "kind", "name"}


# ------------------------------------------------------------------------------------------
# A minimal kustomize: resources + JSON 6902 patches.

def _load_all(path: Path) -> list:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def apply_json6902(doc: dict, ops: list) -> None:
    """Apply RFC 6902 add/replace/remove operations in place; anything else is an error."""
    assert isinstance(ops, list), "a JSON 6902 patch file is a list of operations"
    for op in ops:
        kind, parts = op["op"], _pointer(op["path"])
        if kind not in ("add", "replace", "remove"):
            raise ValueError(f"unsupported JSON 6902 op {kind!r} (add, replace, remove only)")
        parent = doc
        for depth, part in enumerate(parts[:-1]):
            try:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            except (KeyError, IndexError, ValueError):
                missing = "/" + "/".join(parts[:depth + 1])
                raise KeyError(f"{op['path']}: {missing} does not exist") from None
        key = parts[-1]
        if isinstance(parent, list):
            if kind == "add":
                parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
                continue
            key = int(key)
            if not 0 <= key < len(parent):
                raise KeyError(f"{op['path']}: index out of range")
        elif kind != "add" and key not in parent:
            raise KeyError(f"{op['path']}: {kind} of a missing member")
        if kind == "remove":
            del parent[key]
        else:
            parent[key] = copy.deepcopy(op["value"])


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
            and target.get("group", "") == group and target.get("version", version) == version)


def render(directory: Path) -> list[dict]:
    """The documents `kustomize build directory` produces, for the features used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KUSTOMIZATION_KEYS
    assert not unknown, (f"{directory}: kustomization fields {sorted(unknown)} are not rendered by "
                         "this test; extend render() or use JSON 6902 patches")
    assert kustomization["kind"] == "Kustomization"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else _load_all(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: patches need exactly path and target"
        unknown = set(patch["target"]) - SUPPORTED_TARGET_KEYS
        assert not unknown, f"{directory}: patch target selectors {sorted(unknown)} not supported"
        targets = [doc for doc in docs if _matches(doc, patch["target"])]
        assert len(targets) == 1, f"{directory}: patch {patch['path']} matches {len(targets)} resources"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        apply_json6902(targets[0], ops)
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), f"{directory}: duplicate resources {names}"
    return docs


def kustomize_files() -> dict[Path, str]:
    """Every file a kustomization names, as 'kustomization', 'resource' or 'patch'."""
    roles: dict[Path, str] = {}
    for name in KUSTOMIZATIONS:
        directory = K8S / name
        roles[directory / "kustomization.yaml"] = "kustomization"
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kustomization.get("resources", []):
            path = (directory / entry).resolve()
            if not path.is_dir():
                roles[path] = "resource"
        for patch in kustomization.get("patches", []):
            roles[(directory / patch["path"]).resolve()] = "patch"
    return roles


def validate_strict(doc: dict, version: str, where: str) -> None:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                    f"{version} at {path}: {error.message}")
    except kv.SchemaNotFoundError as error:
        pytest.fail(f"{where}: {error.message}. kubernetes-validate knows only built-in kinds: a CRD "
                    "(e.g. monitoring.coreos.com/v1 ServiceMonitor) needs its own structural check "
                    "in this file instead of schema validation")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    matches = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container named {name!r}"
    return matches[0]


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@functools.cache
def _render_cached(name: str) -> list[dict]:
    return render(K8S / name)


def rendered(name: str) -> list[dict]:
    """`kustomize build k8s/NAME`, rendered once per test session (a deep copy each call)."""
    return copy.deepcopy(_render_cached(name))


# ------------------------------------------------------------------------------------------
# The renderer itself (it is test code that other tests trust).

def test_json6902_add_replace_remove_and_refusals():
    doc = {"spec": {"containers": [{"name": "a", "resources": {"limits": {}}}]}, "data": {"X": "1"}}
    apply_json6902(doc, [
        {"op": "add", "path": "/spec/containers/0/resources/limits/nvidia.com~1gpu", "value": "1"},
        {"op": "add", "path": "/spec/tolerations", "value": [{"key": "k"}]},
        {"op": "add", "path": "/spec/tolerations/-", "value": {"key": "j"}},
        {"op": "replace", "path": "/data/X", "value": "2"},
        {"op": "remove", "path": "/spec/tolerations/0"},
    ])
    assert doc["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert doc["spec"]["tolerations"] == [{"key": "j"}]
    assert doc["data"] == {"X": "2"}
    with pytest.raises(KeyError):
        apply_json6902(doc, [{"op": "replace", "path": "/data/MISSING", "value": "x"}])
    with pytest.raises(ValueError):
        apply_json6902(doc, [{"op": "move", "path": "/data/X", "from": "/data/Y"}])


# ------------------------------------------------------------------------------------------
# Every file is reachable and valid.

def test_every_yaml_file_under_k8s_belongs_to_a_kustomization():
    on_disk = {p.resolve() for p in K8S.rglob("*.y*ml")}
    orphans = sorted(str(p.relative_to(K8S)) for p in on_disk - set(kustomize_files()))
    assert not orphans, f"YAML files no kustomization names (never applied, never tested): {orphans}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_file_validates_strictly(version):
    resources = [p for p, role in kustomize_files().items() if role == "resource"]
    assert len(resources) >= 7
    for path in resources:
        docs = _load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            validate_strict(doc, version, str(path.relative_to(ROOT)))


def test_patch_files_are_json6902_operation_lists():
    for path, role in kustomize_files().items():
        if role == "patch":
            ops = yaml.safe_load(path.read_text())
            assert isinstance(ops, list) and ops, f"{path}: expected a list of JSON 6902 operations"
            for op in ops:
                assert op.get("op") in {"add", "replace", "remove"} and "path" in op, f"{path}: {op}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_kustomization_validates_strictly(name, version):
    for doc in rendered(name):
        validate_strict(doc, version, f"kustomize build k8s/{name}")


def test_overlays_really_change_the_base():
    base = one(rendered("base"), "Deployment")
    for overlay in ("overlays/cpu", "overlays/gpu"):
        assert one(rendered(overlay), "Deployment") != base, f"{overlay} patches nothing"
    # Rendering an overlay must not leak its patches into the base.
    assert render(K8S / "base") == rendered("base")


# ------------------------------------------------------------------------------------------
# The serving Deployment, as each overlay renders it.

def _serving(name: str):
    """(name, docs, Deployment, pod spec, the genserve container, ConfigMap data) of a rendering."""
    docs = rendered(name)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    return name, docs, deployment, pod, container(pod, "genserve"), one(docs, "ConfigMap")["data"]


@pytest.fixture(params=SERVING)
def serving(request):
    return _serving(request.param)


def test_grpc_liveness_and_readiness_probes_on_8500(serving):
    _, _, _, _, main, config = serving
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert main[probe].get("grpc", {}).get("port") == 8500, f"{probe} must be a native gRPC probe on 8500"
        # Service "" is the server's overall status; any other name would be NOT_FOUND.
        assert main[probe]["grpc"].get("service", "") == ""
    assert int(config["GENSERVE_PORT"]) == 8500


def test_container_ports_match_service_and_config(serving):
    _, docs, _, _, main, config = serving
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": int(config["GENSERVE_PORT"]), "metrics": int(config["GENSERVE_METRICS_PORT"])}
    assert ports == {"grpc": 8500, "metrics": 9100}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert "genserve" in services
    for service in services.values():
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (target in ports) if isinstance(target, str) else (target in ports.values()), \
                f"Service {service['metadata']['name']} port {port['name']} targets {target!r}"
            assert ports[port["name"]] == (ports[target] if isinstance(target, str) else target)
            assert port["port"] == ports[port["name"]]
    main_ports = {p["name"]: p for p in services["genserve"]["spec"]["ports"]}
    assert main_ports["grpc"]["port"] == 8500 and main_ports["grpc"]["appProtocol"] == "grpc"
    assert main_ports["metrics"]["port"] == 9100


def test_selectors_reach_the_pods(serving):
    _, docs, deployment, _, _, _ = serving
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    for service in by_kind(docs, "Service"):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        assert service["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; applying one would reset it"
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_hpa_scales_on_cpu_that_the_container_requests(serving):
    _, docs, _, _, main, _ = serving
    metrics = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    assert cpu_cores(main["resources"]["requests"]["cpu"]) > 0, "CPU utilisation needs a CPU request"


def test_termination_grace_outlasts_prestop_and_drain(serving):
    _, _, _, pod, main, config = serving
    drain = float(config["GENSERVE_DRAIN_SECONDS"])
    assert drain > 0
    prestop = main.get("lifecycle", {}).get("preStop", {})
    command = prestop.get("exec", {}).get("command", [])
    sleep = float(command[1]) if command[:1] == ["sleep"] else float(prestop.get("sleep", {}).get("seconds", 0))
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain, "terminationGracePeriodSeconds must exceed GENSERVE_DRAIN_SECONDS"
    assert grace >= sleep + drain + 5, f"grace {grace}s < preStop {sleep}s + drain {drain}s + 5s to exit"
    # The health service reports NOT_SERVING while draining: liveness must not kill a drain.
    liveness = main["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


def test_model_repository_is_a_read_only_pvc_at_the_configured_path(serving):
    _, docs, _, pod, main, config = serving
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert config["GENSERVE_REPO"] == "/models"
    mount = mounts[config["GENSERVE_REPO"]]
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]
    assert claim.get("readOnly") is True
    assert claim["claimName"] in {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}


def test_settings_come_from_the_configmap(serving):
    _, docs, _, pod, main, config = serving
    refs = [e["configMapRef"]["name"] for e in main.get("envFrom", []) if "configMapRef" in e]
    assert refs == [one(docs, "ConfigMap")["metadata"]["name"]]
    required = {"GENSERVE_REPO", "GENSERVE_HOST", "GENSERVE_PORT", "GENSERVE_METRICS_PORT",
                "GENSERVE_PROVIDERS", "GENSERVE_INTRA_OP_THREADS", "GENSERVE_WORKER_THREADS", "GENSERVE_MAX_MESSAGE_BYTES",
                "GENSERVE_DRAIN_SECONDS"}
    assert required <= set(config), f"missing {sorted(required - set(config))}"
    assert all(key.startswith("GENSERVE_") for key in config)
    assert all(isinstance(value, str) for value in config.values())
    assert int(config["GENSERVE_MAX_MESSAGE_BYTES"]) >= 16 * 2**20, "room for image batches"
    # A Service named genserve would inject GENSERVE_PORT=tcp://... into the pod otherwise.
    assert pod["enableServiceLinks"] is False


def test_configmap_is_read_by_the_server_settings(serving, monkeypatch):
    """Every key is a field of serving.config.Settings and parses there, as the pod will."""
    if not (ROOT / "serving" / "config.py").exists():
        pytest.skip("serving/config.py is not written yet")
    import serving.config as config_module

    _, _, _, _, _, config = serving
    fields = config_module.Settings.model_fields
    unknown = [k for k in config if k.removeprefix("GENSERVE_").lower() not in fields]
    assert not unknown, f"not settings (ignored by the server): {unknown}"
    for key in [k for k in os.environ if k.startswith("GENSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = config_module.Settings()
    assert str(settings.repo) == config["GENSERVE_REPO"]
    assert (settings.port, settings.metrics_port) == (8500, 9100)
    assert settings.providers == config["GENSERVE_PROVIDERS"].split(",")
    assert settings.drain_seconds == float(config["GENSERVE_DRAIN_SECONDS"])


def test_onnxruntime_threads_fit_the_cpu_limit(serving):
    # serving/config.py: worker_threads sessions run at once, each with intra_op_threads threads.
    # Unset, worker_threads is os.cpu_count(): the node's cores, not the container's limit.
    _, _, _, _, main, config = serving
    limit = cpu_cores(main["resources"]["limits"]["cpu"])
    workers, intra = int(config["GENSERVE_WORKER_THREADS"]), int(config["GENSERVE_INTRA_OP_THREADS"])
    assert workers >= 1 and intra >= 1, "0 means onnxruntime's default: one thread per node core"
    assert workers * intra <= math.ceil(limit), \
        f"{workers} workers x {intra} intra-op threads oversubscribe a {limit}-CPU limit"


def test_runs_as_non_root(serving):
    _, _, _, pod, main, _ = serving
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert main["securityContext"].get("privileged", False) is False


def test_image_user_matches_run_as_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, re.MULTILINE)
    assert users, "the Dockerfile's USER should be numeric so runAsNonRoot can verify it"
    for name in KUSTOMIZATIONS:
        for doc in rendered(name):
            if doc["kind"] in ("Deployment", "Job"):
                security = doc["spec"]["template"]["spec"]["securityContext"]
                assert {(str(security["runAsUser"]), str(security["runAsGroup"]))} == set(users)


def test_gpu_overlay_requests_a_gpu_and_cuda_first():
    _, _, deployment, pod, main, config = _serving("overlays/gpu")
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert main["resources"].get("requests", {}).get("nvidia.com/gpu", "1") == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert config["GENSERVE_PROVIDERS"].split(",") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("name", ["base", "overlays/cpu"])
def test_cpu_renderings_ask_for_no_gpu(name):
    _, _, _, pod, main, config = _serving(name)
    for section in ("limits", "requests"):
        assert "nvidia.com/gpu" not in main["resources"].get(section, {})
    assert config["GENSERVE_PROVIDERS"] == "CPUExecutionProvider"
    assert "tolerations" not in pod


# ------------------------------------------------------------------------------------------
# The training Job.

def test_training_job_runs_torchrun_with_one_process_per_gpu():
    job = one(rendered("training"), "Job")
    pod = job["spec"]["template"]["spec"]
    train = container(pod, "train")
    assert train["command"] == ["torchrun"]
    args = train["args"]
    nproc = [a.split("=", 1)[1] for a in args if a.startswith("--nproc_per_node=")]
    assert nproc == [train["resources"]["limits"]["nvidia.com/gpu"]]
    # torchrun -m genserve train FAMILY --data ... --out /models: the `genserve train` command.
    module = args.index("-m")
    assert args[module + 1:module + 3] == ["genserve", "train"]
    out = args[args.index("--out") + 1]
    mount = next(m for m in train["volumeMounts"] if m["mountPath"] == out)
    assert not mount.get("readOnly", False), "training publishes into the repository"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    serving_claim = next(v for v in _serving("base")[3]["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"]["claimName"] == serving_claim["persistentVolumeClaim"]["claimName"]
    assert any(m["mountPath"] == "/dev/shm" for m in train["volumeMounts"]), "NCCL needs shared memory"
    assert train["image"] != container(_serving("base")[3], "genserve")["image"], \
        "training needs the training image (torch); the serving image has none"
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
