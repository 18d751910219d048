"""Health, draining, the Prometheus endpoint and message limits, each on a private server."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

from serving.client import ClientError
from serving.server import SERVICE_NAME

G = "grid25-gaussian"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return reply.read().decode()


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_not_serving_until_loaded_then_serving(fresh_server, serving_repo):
    handle = fresh_server().start(load=False)
    client = handle.client()
    assert client.health() == "NOT_SERVING"
    assert client.health(SERVICE_NAME) == "NOT_SERVING"
    with pytest.raises(ClientError) as info:
        client.list_models()
    assert info.value.code == "UNAVAILABLE" and "not loaded yet" in info.value.message
    handle.call(handle.server.load())
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"
    assert {m.name for m in client.list_models() if m.state == "AVAILABLE"} == {
        G, serving_repo.translate, serving_repo.support}


def test_repository_without_an_available_model_stays_not_serving(fresh_server, tmp_path):
    (tmp_path / "only-broken" / "1").mkdir(parents=True)
    (tmp_path / "only-broken" / "1" / "manifest.json").write_text("[]")
    handle = fresh_server(tmp_path).start()
    client = handle.client()
    assert client.health() == "NOT_SERVING"
    [model] = client.list_models()
    assert model.state == "UNAVAILABLE" and "invalid" in model.reason


def test_drain_finishes_in_flight_and_refuses_new(fresh_server, serving_repo, block_graph):
    handle = fresh_server().start()
    client = handle.client()
    assert client.health() == "SERVING"
    x = serving_repo.X_test[:20]
    blocker = block_graph(handle, G, "score")
    in_flight = handle.submit(_score_in_thread(client, x))
    assert blocker.entered.wait(10), "the request never reached the session"

    drained = handle.submit(handle.server.drain(timeout=10))
    deadline = time.monotonic() + 5
    while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.health() == "NOT_SERVING"
    assert client.health(SERVICE_NAME) == "NOT_SERVING"
    with pytest.raises(ClientError) as info:
        client.score(G, x)
    assert info.value.code == "UNAVAILABLE" and "draining" in info.value.message
    assert not drained.done()

    blocker.release.set()
    np.testing.assert_allclose(in_flight.result(10), serving_repo.estimator.log_prob(x.astype(np.float64)).numpy(),
                               rtol=1e-5)
    assert drained.result(10) is True
    assert handle.server.state.in_flight == 0


async def _score_in_thread(client, x):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, client.score, G, x)


def test_connections_reconnect_at_their_maximum_age_and_no_call_fails(fresh_server, serving_repo, block_graph):
    """--max-connection-age: once a connection is that old the server sends GOAWAY; the client opens
    a new connection (hashed afresh over the workers / replicas) and no call fails, the one in
    flight across the GOAWAY included (it finishes within the grace)."""
    import grpc

    handle = fresh_server(max_connection_age_s=0.3, max_connection_age_grace_s=10.0).start()
    client = handle.client()
    states: list = []
    client.channel.subscribe(states.append, try_to_connect=True)
    x = serving_repo.X_test[:20]
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()

    blocker = block_graph(handle, G, "score")
    in_flight = handle.submit(_score_in_thread(client, x))
    assert blocker.entered.wait(10), "the request never reached the session"
    time.sleep(0.8)  # past the age: the GOAWAY reaches the connection while the call is in flight
    blocker.release.set()
    np.testing.assert_allclose(in_flight.result(10), expected, rtol=1e-5)

    deadline = time.monotonic() + 10
    calls = 0
    while states.count(grpc.ChannelConnectivity.READY) < 3 and time.monotonic() < deadline and calls < 200:
        np.testing.assert_allclose(client.score(G, x), expected, rtol=1e-5)  # every call answered
        calls += 1
        time.sleep(0.02)
    assert states.count(grpc.ChannelConnectivity.READY) >= 3, states  # connected, then twice again


def test_drain_gives_up_after_its_timeout(fresh_server, serving_repo, block_graph):
    handle = fresh_server().start()
    blocker = block_graph(handle, G, "score")
    handle.submit(_score_in_thread(handle.client(), serving_repo.X_test[:5]))
    assert blocker.entered.wait(10)
    started = time.monotonic()
    assert handle.call(handle.server.drain(timeout=0.2)) is False
    assert time.monotonic() - started < 2
    blocker.release.set()


def test_metrics_scrape_shows_counters_moving(fresh_server, serving_repo):
    handle = fresh_server().start()
    port = handle.server.metrics_port
    assert port and port != handle.server.port
    before = scrape(port)
    info = sample_value(before, "genserve_model_info", model=G, version="2", family="gaussian",
                        provider="CPUExecutionProvider")
    assert info == 1.0
    assert sample_value(before, "genserve_model_load_seconds", model=G) > 0

    client = handle.client()
    x = np.concatenate([serving_repo.X_test[:98], [[50.0, 50.0], [-50.0, 50.0]]]).astype(np.float32)
    client.score(G, x)
    found = client.detect(G, x)
    client.sample(G, n=10, seed=1)
    with pytest.raises(ClientError):
        client.score(G, np.zeros((2, 3), np.float32))
    with pytest.raises(ClientError):
        client.score("made-up-name-1", x)
    with pytest.raises(ClientError):
        client.score("made-up-name-2", x)

    after = scrape(port)
    assert sample_value(after, "genserve_requests_total", method="ScoreDensity", model=G, code="OK") == 1
    assert sample_value(after, "genserve_requests_total", method="ScoreDensity", model=G,
                        code="INVALID_ARGUMENT") == 1
    # Unknown names share one label value: no unbounded cardinality.
    assert sample_value(after, "genserve_requests_total", method="ScoreDensity", model="_unknown",
                        code="NOT_FOUND") == 2
    assert "made-up-name" not in after
    assert sample_value(after, "genserve_rows_total", method="ScoreDensity", model=G) == 100
    assert sample_value(after, "genserve_rows_total", method="DetectAnomalies", model=G) == 100
    assert sample_value(after, "genserve_rows_total", method="Sample", model=G) == 10
    anomalies = int(found.is_anomaly.sum())
    assert anomalies >= 2
    assert sample_value(after, "genserve_anomalies_total", model=G) == anomalies
    assert sample_value(after, "genserve_anomaly_score_count", model=G) == 100
    assert sample_value(after, "genserve_request_duration_seconds_count", method="DetectAnomalies", model=G) == 1
    assert sample_value(after, "genserve_inference_duration_seconds_count", model=G, graph="score") >= 2
    assert sample_value(after, "genserve_queue_duration_seconds_count", model=G, graph="sample") == 1
    assert sample_value(after, "genserve_batch_rows_sum", model=G, graph="sample") == 10


def test_message_limits_are_resource_exhausted(fresh_server, serving_repo):
    handle = fresh_server(max_message_bytes=1024 * 1024, max_sample_count=1_000_000,
                          max_rows_per_request=1_000_000).start()
    client = handle.client()
    with pytest.raises(ClientError) as info:
        client.score(G, np.zeros((200_000, 2), np.float32))  # 1.6 MB request
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ClientError) as info:
        client.sample(G, n=200_000)  # 1.6 MB answer
    assert info.value.code == "RESOURCE_EXHAUSTED" and "max_message_bytes" in info.value.message
    assert client.sample(G, n=1000).shape == (1000, 2)


def test_cuda_request_reports_the_provider_really_used(fresh_server, serving_repo):
    """Default providers (CUDA first when the build offers it): GetModel tells what the session got."""
    import onnxruntime

    from serving.config import default_providers

    handle = fresh_server(providers=default_providers()).start()
    providers = handle.client().get_model(G).providers
    assert set(providers) == {"score", "sample"}
    for graph in handle.server.repository.models[G].graphs.values():
        assert providers[graph.name] == graph.session.get_providers()[0]
    assert set(providers.values()) <= set(onnxruntime.get_available_providers())
