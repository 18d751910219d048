"""The tensor wire format and the metrics registry, without a server."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from serving.api import genserve_pb2 as pb
from serving.histograms import FOLD_EVERY, FoldingHistogram
from serving.metrics import UNKNOWN_MODEL, Metrics
from serving.models.errors import InvalidArgument
from serving.services.status import status_of
from serving.services.tensors import decode, encode


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "uint8"])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    message = encode(array)
    assert list(message.shape) == [2, 3, 4] and len(message.data) == array.nbytes
    back = decode(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_big_endian_and_bool_are_normalised():
    array = np.array([1.5, -2.0], dtype=">f4")
    assert encode(array).data == np.array([1.5, -2.0], dtype="<f4").tobytes()
    flags = encode(np.array([True, False]))
    assert flags.dtype == pb.DATA_TYPE_UINT8 and flags.data == b"\x01\x00"


@pytest.mark.parametrize("tensor, phrase", [
    (pb.Tensor(shape=[2], dtype=pb.DATA_TYPE_UNSPECIFIED, data=b""), "x.dtype: expected one of"),
    (pb.Tensor(shape=[2], dtype=99, data=b""), "got 99"),
    (pb.Tensor(shape=[], dtype=pb.DATA_TYPE_FLOAT32, data=b"\0" * 4), "x.shape: expected [N, ...]"),
    (pb.Tensor(shape=[2, -1], dtype=pb.DATA_TYPE_FLOAT32, data=b""), "x.shape: expected non-negative"),
    (pb.Tensor(shape=[2, 2], dtype=pb.DATA_TYPE_FLOAT64, data=b"\0" * 16), "x.data: expected 32 bytes"),
])
def test_decode_errors(tensor, phrase):
    with pytest.raises(InvalidArgument) as info:
        decode(tensor)
    assert phrase in info.value.message


def test_status_mapping():
    import grpc

    assert status_of(InvalidArgument("x: bad")) == (grpc.StatusCode.INVALID_ARGUMENT, "x: bad")
    code, message = status_of(ZeroDivisionError("oops"))
    assert code == grpc.StatusCode.INTERNAL and "ZeroDivisionError: oops" in message


def test_batch_histogram_bins_like_prometheus():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    hist = FoldingHistogram("h", "test", ("model",), [0.0, 1.0, 10.0], registry)
    hist.labels("m").observe_many(np.array([-1.0, 0.0, 0.5, 1.0, 5.0, 50.0, np.inf, np.nan]))
    text = generate_latest(registry).decode()
    assert 'h_bucket{le="0.0",model="m"} 2.0' in text  # -1, 0 (le is inclusive)
    assert 'h_bucket{le="1.0",model="m"} 4.0' in text
    assert 'h_bucket{le="10.0",model="m"} 5.0' in text
    assert 'h_bucket{le="+Inf",model="m"} 7.0' in text  # NaN is dropped, +inf counted
    assert 'h_count{model="m"} 7.0' in text and 'h_sum{model="m"} 55.5' in text


def _samples(registry, name):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith(name) and not s.name.endswith("_created")}


def test_folding_histogram_exposes_what_prometheus_histogram_does():
    from prometheus_client import CollectorRegistry, Histogram

    bounds = [0.001, 0.01, 0.1, 1.0]
    rng = np.random.default_rng(0)
    values = [*rng.exponential(0.05, size=3000), *bounds, 0.0, 7.5]  # bounds themselves: le is inclusive
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    folding = FoldingHistogram("lat", "test", ["method"], bounds, ours)
    reference = Histogram("lat", "test", ["method"], buckets=bounds, registry=theirs)
    for i, v in enumerate(values):
        folding.labels("a" if i % 3 else "b").observe(float(v))
        reference.labels("a" if i % 3 else "b").observe(float(v))
    mine, expected = _samples(ours, "lat"), _samples(theirs, "lat")
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        assert mine[key] == pytest.approx(value, rel=1e-12), key
    folding.labels("a").observe(2.0)  # binned at the next scrape, after the first
    assert _samples(ours, "lat")[("lat_count", (("method", "a"),))] == expected[("lat_count", (("method", "a"),))] + 1


def test_folding_histogram_loses_nothing_to_concurrent_scrapes_and_stays_bounded():
    import threading

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    hist = FoldingHistogram("h", "test", ["model"], [0.5], registry)
    series = hist.labels("m")
    per_thread, threads = 3 * FOLD_EVERY + 17, 4

    def observe():
        for i in range(per_thread):
            series.observe(0.25 if i % 2 else 0.75)

    workers = [threading.Thread(target=observe) for _ in range(threads)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        _samples(registry, "h")  # scrapes fold while the others append
    for w in workers:
        w.join()
    assert len(series._pending) < FOLD_EVERY + threads  # folded as it filled, not kept until a scrape
    got = _samples(registry, "h")
    total = per_thread * threads
    assert got[("h_count", (("model", "m"),))] == total
    small = threads * (per_thread // 2)  # the odd i: 0.25
    assert got[("h_bucket", (("le", "0.5"), ("model", "m")))] == small
    assert got[("h_sum", (("model", "m"),))] == pytest.approx(0.25 * small + 0.75 * (total - small))
    with pytest.raises(ValueError, match="expected labels"):
        hist.labels("m", "extra")


def test_metrics_label_unknown_models_and_serve_over_http():
    metrics = Metrics()
    metrics.set_known_models(["a"])
    assert metrics.model_label("a") == "a" and metrics.model_label("zz") == UNKNOWN_MODEL
    metrics.request_done("ScoreDensity", "zz", "NOT_FOUND", 0.001)
    port = metrics.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert 'genserve_requests_total{code="NOT_FOUND",method="ScoreDensity",model="_unknown"} 1.0' in body
    second = Metrics()  # a second registry in the same process does not collide
    second.request_done("ScoreDensity", "", "OK", 0.001)
