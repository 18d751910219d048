"""The Open Inference Protocol, called with the unmodified tritonclient package: every RPC.

One server (module scope) serves a copy of the session repository plus two generic ONNX models
(``model.onnx`` without a manifest). Tests that load, unload or watch health use private servers.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oip_helpers import (FIXED, GENERIC, InferenceServerException, client, code_of, copy_repo, infer_input,
                         triton, triton_grpc, triton_pb, write_fixed_model, write_generic_model)
from serving.client import ClientError, GenServeClient
from serving.repository.noise import draw_noise
from serving.services.infer_request import ZERO_COPY_MIN_BYTES

G = "grid25-gaussian"


@pytest.fixture(scope="module")
def oip(serving_repo, tmp_path_factory):
    from conftest import ServerThread

    repo = copy_repo(serving_repo.path, tmp_path_factory.mktemp("oip") / "repo")
    write_generic_model(repo)
    write_fixed_model(repo)
    handle = ServerThread(repo, reload_interval_s=0).start()
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def tc(oip):
    c = client(oip.server.port)
    yield c
    c.close()


def test_server_live_ready_metadata(tc):
    assert tc.is_server_live() and tc.is_server_ready()
    meta = tc.get_server_metadata()
    assert meta.name == "genserve" and meta.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta.extensions)


def test_repository_index_lists_each_graph_and_the_broken_models(tc, serving_repo):
    index = {m.name: m for m in tc.get_model_repository_index().models}
    assert index[G].state == "READY" and index[G].version == "2"
    assert index[f"{G}.sample"].state == "READY"
    assert index[f"{serving_repo.translate}"].state == "READY"  # its first graph: translate_a2b
    assert index[f"{serving_repo.translate}.translate_b2a"].state == "READY"
    assert index[GENERIC].state == "READY" and index[FIXED].state == "READY"
    for name, phrase in serving_repo.broken.items():
        assert index[name].state == "UNAVAILABLE" and phrase in index[name].reason
    ready = {m.name for m in tc.get_model_repository_index().models if m.state == "READY"}
    assert ready == {m["name"] for m in tc.get_model_repository_index(as_json=True)["models"]
                     if m.get("state") == "READY"}


def test_density_model_metadata_and_config(tc):
    meta = tc.get_model_metadata(G)
    assert meta.name == G and list(meta.versions) == ["2"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 2])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("log_prob", "FP32", [-1]),
                                                                          ("is_anomaly", "BOOL", [-1])]
    config = tc.get_model_config(G).config
    assert config.name == G and config.backend == "onnxruntime" and config.max_batch_size == 256
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [("x", [2], False)]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert config.parameters["genserve.graph"].string_value == "score"
    sample = tc.get_model_config(f"{G}.sample").config
    assert [(i.name, list(i.dims), i.optional) for i in sample.input] == [("z", [2], True)]
    assert [(o.name, list(o.dims)) for o in sample.output] == [("samples", [2])]
    assert tc.is_model_ready(G) and tc.is_model_ready(G, "2") and not tc.is_model_ready(G, "1")
    assert not tc.is_model_ready("no-such-model") and not tc.is_model_ready("broken-json")


def test_infer_raw_matches_the_estimator_and_detect(tc, oip, serving_repo):
    x = serving_repo.X_test[:50]
    x = np.concatenate([x, [[60.0, 60.0]]]).astype(np.float32)
    result = tc.infer(G, [infer_input("x", x)], request_id="r1")
    response = result.get_response()
    assert response.id == "r1" and response.model_version == "2" and len(response.raw_output_contents) == 2
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    np.testing.assert_allclose(result.as_numpy("log_prob"), expected, rtol=1e-5)
    with GenServeClient("127.0.0.1", oip.server.port) as domain:
        found = domain.detect(G, x)
        rate = domain.detect(G, x, contamination=0.3)
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), found.is_anomaly)
    assert result.as_numpy("is_anomaly")[-1]
    only = tc.infer(G, [infer_input("x", x)], outputs=[triton.InferRequestedOutput("is_anomaly")],
                    parameters={"contamination": 0.3})
    assert only.as_numpy("log_prob") is None
    np.testing.assert_array_equal(only.as_numpy("is_anomaly"), rate.is_anomaly)


def test_large_raw_request_parsed_without_copies_gets_the_same_answers_and_checks(tc, serving_repo):
    """Above ZERO_COPY_MIN_BYTES the request's tensor is a view on gRPC's bytes (infer_request.py)."""
    x = np.random.default_rng(5).normal(size=(12_000, 2)).astype(np.float32)
    assert x.nbytes >= ZERO_COPY_MIN_BYTES
    result = tc.infer(G, [infer_input("x", x)])
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    np.testing.assert_allclose(result.as_numpy("log_prob"), expected, rtol=1e-5)
    x[7_777, 1] = np.nan
    with pytest.raises(InferenceServerException) as info:
        tc.infer(G, [infer_input("x", x)])
    assert code_of(info.value) == "INVALID_ARGUMENT" and "row 7777 contains NaN" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        tc.infer(G, [infer_input("x", np.zeros((12_000, 3), np.float32))])
    assert code_of(info.value) == "INVALID_ARGUMENT" and "x.shape" in info.value.message()


def test_infer_typed_contents_gets_typed_outputs(oip, serving_repo):
    x = serving_repo.X_test[:4].astype(np.float32)
    request = triton_pb.ModelInferRequest(model_name=G)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[4, 2])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{oip.server.port}") as channel:
        reply = triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert not reply.raw_output_contents
    log_prob = np.array(reply.outputs[0].contents.fp32_contents, dtype=np.float32)
    np.testing.assert_allclose(log_prob, serving_repo.estimator.log_prob(x.astype(np.float64)).numpy(), rtol=1e-5)
    assert list(reply.outputs[1].contents.bool_contents) == [False] * 4


def test_sample_graph_with_server_noise_equals_the_domain_api(tc, oip, serving_repo):
    result = tc.infer(f"{G}.sample", [], parameters={"n": 40, "seed": 3})
    with GenServeClient("127.0.0.1", oip.server.port) as domain:
        expected = domain.sample(G, n=40, seed=3)
    np.testing.assert_allclose(result.as_numpy("samples"), expected, rtol=1e-6)
    model = oip.server.repository.models[G]
    z = draw_noise(model.graphs["sample"].spec.inputs, 40, 3)["z"]
    own = tc.infer(f"{G}.sample", [infer_input("z", z)])
    np.testing.assert_allclose(own.as_numpy("samples"), expected, rtol=1e-6)
    with pytest.raises(InferenceServerException) as info:
        tc.infer(f"{G}.sample", [])
    assert code_of(info.value) == "INVALID_ARGUMENT" and "parameters.n" in info.value.message()


def test_generic_onnx_models(tc, oip):
    meta = tc.get_model_metadata(GENERIC)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [-1, 4])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("OUTPUT0", [-1, 4]), ("OUTPUT1", [-1])]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = tc.infer(GENERIC, [infer_input("INPUT0", x)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * x)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x.sum(axis=1))
    config = tc.get_model_config(GENERIC).config
    assert config.max_batch_size == 256 and config.parameters["genserve.family"].string_value == "onnx"

    fixed = tc.get_model_config(FIXED).config
    assert fixed.max_batch_size == 0 and [list(i.dims) for i in fixed.input] == [[3, 2]]
    a = np.arange(6, dtype=np.int64).reshape(3, 2)
    np.testing.assert_array_equal(tc.infer(FIXED, [infer_input("A", a, "INT64")]).as_numpy("B"), a + 1)

    with GenServeClient("127.0.0.1", oip.server.port) as domain:
        listed = {m.name: m for m in domain.list_models()}
        assert (listed[GENERIC].family, listed[GENERIC].capabilities) == ("onnx", ["infer"])
        details = domain.get_model(GENERIC)
        assert details.input_shape == [4] and details.manifest["graphs"]["model"]["inputs"][0]["name"] == "INPUT0"
        with pytest.raises(ClientError) as info:
            domain.score(GENERIC, x)
        assert info.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("call, code, phrase", [
    (lambda tc: tc.infer("no-such-model", [infer_input("x", np.zeros((1, 2), np.float32))]), "NOT_FOUND",
     "unknown model"),
    (lambda tc: tc.infer("broken-json", [infer_input("x", np.zeros((1, 2), np.float32))]), "UNAVAILABLE",
     "not valid JSON"),
    (lambda tc: tc.infer(G, [infer_input("x", np.zeros((1, 2), np.float32))], model_version="1"), "NOT_FOUND",
     "version '1'"),
    (lambda tc: tc.infer(G, [infer_input("x", np.zeros((1, 2), np.float64), "FP64")]), "INVALID_ARGUMENT",
     "x.datatype: expected FP32, got FP64"),
    (lambda tc: tc.infer(G, [infer_input("x", np.zeros((1, 3), np.float32))]), "INVALID_ARGUMENT",
     "x.shape: expected [-1, 2]"),
    (lambda tc: tc.infer(G, [infer_input("x", np.array([[np.nan, 0]], np.float32))]), "INVALID_ARGUMENT",
     "row 0 contains NaN"),
    (lambda tc: tc.infer(G, [infer_input("y", np.zeros((1, 2), np.float32))]), "INVALID_ARGUMENT",
     "has no input 'y'"),
    (lambda tc: tc.infer(G, [infer_input("x", np.zeros((1, 2), np.float32))],
                         outputs=[triton.InferRequestedOutput("nope")]), "INVALID_ARGUMENT", "has no output 'nope'"),
    (lambda tc: tc.infer(G, [infer_input("x", np.zeros((30_000, 2), np.float32))]), "RESOURCE_EXHAUSTED",
     "max_rows_per_request"),
    (lambda tc: tc.get_model_metadata("no-such-model"), "NOT_FOUND", "unknown model"),
    (lambda tc: tc.get_model_config("broken-manifest"), "UNAVAILABLE", "invalid"),
])
def test_errors_carry_the_status_code_and_a_message(tc, call, code, phrase):
    with pytest.raises(InferenceServerException) as info:
        call(tc)
    assert code_of(info.value) == code and phrase in info.value.message()


def test_statistics_count_rows_and_runs(tc):
    before = tc.get_inference_statistics(GENERIC).model_stats[0]
    for rows in (1, 5):
        tc.infer(GENERIC, [infer_input("INPUT0", np.ones((rows, 4), np.float32))])
    after = tc.get_inference_statistics(GENERIC).model_stats[0]
    assert after.name == GENERIC and after.version == "1"
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 2
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert {s.batch_size for s in after.batch_stats} >= {1, 5}
    everything = {s.name for s in tc.get_inference_statistics().model_stats}
    assert {G, f"{G}.sample", GENERIC, FIXED} <= everything


def test_stream_infer_answers_every_request(oip, serving_repo):
    answers: queue.Queue = queue.Queue()
    c = client(oip.server.port)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = serving_repo.X_test[:30].astype(np.float32)
        for i in range(3):
            c.async_stream_infer(G, [infer_input("x", x[10 * i:10 * i + 10])], request_id=str(i))
        c.async_stream_infer("no-such-model", [infer_input("x", x[:1])], request_id="bad")
        got = dict()
        for _ in range(4):
            result, error = answers.get(timeout=10)
            if error is not None:
                got["bad"] = error
            else:
                got[result.get_response().id] = result.as_numpy("log_prob")
    finally:
        c.stop_stream()
        c.close()
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    for i in range(3):
        np.testing.assert_allclose(got[str(i)], expected[10 * i:10 * i + 10], rtol=1e-5)
    assert "unknown model" in str(got["bad"])


def _watch(port: int, service: str, seen: list, stop: threading.Event) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=20)
        try:
            for reply in stream:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                if stop.is_set():
                    break
        except grpc.RpcError:
            pass


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_unload_and_load_with_health_per_model(fresh_server, serving_repo, tmp_path):
    repo = copy_repo(serving_repo.path, tmp_path / "repo", [G, serving_repo.support])
    handle = fresh_server(repo, reload_interval_s=0).start()
    c = client(handle.server.port)
    domain = handle.client()
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(handle.server.port, G, seen, stop), daemon=True)
    watcher.start()
    try:
        _wait_for(lambda: seen == ["SERVING"])
        assert domain.health(G) == "SERVING"
        c.unload_model(G)
        assert not c.is_model_ready(G) and not c.is_model_ready(f"{G}.sample")
        index = {m.name: m for m in c.get_model_repository_index().models}
        assert index[G].state == "UNAVAILABLE" and index[G].reason == "unloaded"
        with grpc.insecure_channel(f"127.0.0.1:{handle.server.port}") as channel:
            only_ready = triton_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                triton_pb.RepositoryIndexRequest(ready=True), timeout=10)
        assert {m.name for m in only_ready.models} == {serving_repo.support}
        with pytest.raises(InferenceServerException) as info:
            c.infer(G, [infer_input("x", np.zeros((1, 2), np.float32))])
        assert code_of(info.value) == "NOT_FOUND"
        _wait_for(lambda: seen[-1:] == ["NOT_SERVING"])
        assert domain.health(G) == "NOT_SERVING" and domain.health() == "SERVING"  # the other model serves

        c.load_model(G)
        assert c.is_model_ready(G)
        assert c.infer(G, [infer_input("x", np.zeros((2, 2), np.float32))]).as_numpy("log_prob").shape == (2,)
        _wait_for(lambda: seen[-1:] == ["SERVING"])
        assert seen == ["SERVING", "NOT_SERVING", "SERVING"]
        with pytest.raises(InferenceServerException) as info:
            c.load_model("no-such-folder")
        assert code_of(info.value) == "NOT_FOUND"
    finally:
        stop.set()
        c.close()
