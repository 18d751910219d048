"""The tensor wire format and the metrics registry, without a server."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from serving.api import genserve_pb2 as pb
from serving.metrics import UNKNOWN_MODEL, BatchHistogram, Metrics
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
    hist = BatchHistogram("h", "test", ("model",), [0.0, 1.0, 10.0], registry)
    hist.observe(("m",), np.array([-1.0, 0.0, 0.5, 1.0, 5.0, 50.0, np.inf, np.nan]))
    text = generate_latest(registry).decode()
    assert 'h_bucket{le="0.0",model="m"} 2.0' in text  # -1, 0 (le is inclusive)
    assert 'h_bucket{le="1.0",model="m"} 4.0' in text
    assert 'h_bucket{le="10.0",model="m"} 5.0' in text
    assert 'h_bucket{le="+Inf",model="m"} 7.0' in text  # NaN is dropped, +inf counted
    assert 'h_count{model="m"} 7.0' in text and 'h_sum{model="m"} 55.5' in text


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
