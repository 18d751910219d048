"""The error table of DESIGN.md §5 over real gRPC: status code, a message naming the field, and
the server unharmed afterwards."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import pytest

from serving.api import genserve_pb2 as pb
from serving.client import ClientError
from serving.services.tensors import encode

G = "grid25-gaussian"  # the session repository's Gaussian (versions 1 and 2; 2 is loaded)
T = "affine-translate"
X = np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=np.float32)


def raw_tensor(shape, dtype=pb.DATA_TYPE_FLOAT32, data=None):
    if data is None:
        data = np.zeros(int(np.prod(shape)) if shape else 0, dtype=np.float32).tobytes()
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def with_nan(row, value):
    x = X.copy()
    x[row, 1] = value
    return x


# (id, call(client), status code, phrases the message must contain)
CASES = [
    ("unknown-model", lambda c: c.score("no-such-model", X), "NOT_FOUND", ["model.name", "no-such-model"]),
    ("empty-model-name", lambda c: c.score("", X), "NOT_FOUND", ["model.name"]),
    ("version-not-loaded", lambda c: c.score(G, X, version=1), "NOT_FOUND",
     ["model.version", "version 1", "loaded versions: [2]"]),
    ("version-unknown-getmodel", lambda c: c.get_model(G, version=7), "NOT_FOUND", ["model.version"]),
    ("wrong-row-shape", lambda c: c.score(G, np.zeros((3, 3), np.float32)), "INVALID_ARGUMENT",
     ["x: expected shape [N, 2], got [3, 3]"]),
    ("wrong-rank", lambda c: c.score(G, np.zeros(6, np.float32)), "INVALID_ARGUMENT",
     ["x: expected shape [N, 2], got [6]"]),
    ("wrong-dtype", lambda c: c.score(G, X.astype(np.int64)), "INVALID_ARGUMENT",
     ["x.dtype", "float32 or float64", "int64"]),
    ("unspecified-dtype", lambda c: c.stub.ScoreDensity(pb.ScoreDensityRequest(
        model=pb.ModelRef(name=G), x=raw_tensor([3, 2], pb.DATA_TYPE_UNSPECIFIED)), timeout=10),
     "INVALID_ARGUMENT", ["x.dtype", "DATA_TYPE_UNSPECIFIED"]),
    ("byte-length", lambda c: c.stub.ScoreDensity(pb.ScoreDensityRequest(
        model=pb.ModelRef(name=G), x=raw_tensor([3, 2], data=b"\0" * 20)), timeout=10),
     "INVALID_ARGUMENT", ["x.data", "expected 24 bytes", "got 20"]),
    ("negative-dimension", lambda c: c.stub.ScoreDensity(pb.ScoreDensityRequest(
        model=pb.ModelRef(name=G), x=raw_tensor([-3, 2], data=b"")), timeout=10),
     "INVALID_ARGUMENT", ["x.shape", "non-negative"]),
    ("nan", lambda c: c.score(G, with_nan(1, np.nan)), "INVALID_ARGUMENT", ["x: row 1 contains NaN"]),
    ("inf", lambda c: c.detect(G, with_nan(2, np.inf)), "INVALID_ARGUMENT", ["x: row 2 contains Inf"]),
    ("float64-overflow", lambda c: c.score(G, np.array([[1e300, 0.0]])), "INVALID_ARGUMENT",
     ["x: row 0 contains Inf", "float64"]),
    ("empty-batch", lambda c: c.score(G, np.zeros((0, 2), np.float32)), "INVALID_ARGUMENT",
     ["x: empty batch", "[0, 2]"]),
    ("too-many-rows", lambda c: c.score(G, np.zeros((20_001, 2), np.float32)), "RESOURCE_EXHAUSTED",
     ["x: 20001 rows", "20000", "max_rows_per_request"]),
    ("sample-n-zero", lambda c: c.sample(G, n=0), "INVALID_ARGUMENT", ["n: expected", ">= 1", "got 0"]),
    ("sample-n-negative", lambda c: c.sample(G, n=-5), "INVALID_ARGUMENT", ["n: expected", "got -5"]),
    ("sample-too-many", lambda c: c.sample(G, n=5_001), "RESOURCE_EXHAUSTED", ["n: 5001", "max_sample_count"]),
    ("sample-negative-seed", lambda c: c.sample(G, n=3, seed=-1), "INVALID_ARGUMENT", ["seed: expected", ">= 0"]),
    ("label-unconditional", lambda c: c.sample(G, n=3, label=1), "FAILED_PRECONDITION", ["'conditional'", G]),
    ("sample-capability", lambda c: c.sample(T, n=3), "FAILED_PRECONDITION", ["'sample' capability", T]),
    ("score-capability", lambda c: c.score(T, np.zeros((2, 3), np.float32)), "FAILED_PRECONDITION",
     ["'score' capability"]),
    ("detect-capability", lambda c: c.detect(T, np.zeros((2, 3), np.float32)), "FAILED_PRECONDITION",
     ["'score' capability"]),
    ("translate-capability", lambda c: c.translate(G, X), "FAILED_PRECONDITION", ["'translate' capability"]),
    ("translate-shape", lambda c: c.translate(T, X), "INVALID_ARGUMENT", ["x: expected shape [N, 3], got [3, 2]"]),
    ("translate-direction", lambda c: c.stub.Translate(pb.TranslateRequest(
        model=pb.ModelRef(name=T), x=encode(np.zeros((2, 3), np.float32))), timeout=10),
     "INVALID_ARGUMENT", ["direction", "DIRECTION_A2B", "DIRECTION_UNSPECIFIED"]),
    ("threshold-and-contamination", lambda c: c.detect(G, X, threshold=1.0, contamination=0.1),
     "INVALID_ARGUMENT", ["threshold, contamination", "at most one"]),
    ("contamination-zero", lambda c: c.detect(G, X, contamination=0.0), "INVALID_ARGUMENT",
     ["contamination: expected a rate in (0, 1)", "got 0.0"]),
    ("contamination-one", lambda c: c.detect(G, X, contamination=1.0), "INVALID_ARGUMENT", ["contamination"]),
    ("threshold-nan", lambda c: c.detect(G, X, threshold=float("nan")), "INVALID_ARGUMENT", ["threshold: expected"]),
    ("importance-samples-exact", lambda c: c.stub.ScoreDensity(pb.ScoreDensityRequest(
        model=pb.ModelRef(name=G), x=encode(X), importance_samples=8), timeout=10),
     "INVALID_ARGUMENT", ["importance_samples"]),
    ("broken-model", lambda c: c.score("broken-missing-onnx", X), "UNAVAILABLE",
     ["broken-missing-onnx", "unavailable", "score.onnx is missing"]),
    ("tiny-deadline", lambda c: c.score(G, np.zeros((20_000, 2), np.float32), timeout=1e-4),
     "DEADLINE_EXCEEDED", []),
]


def _code_and_message(call, client):
    try:
        call(client)
    except ClientError as exc:
        return exc.code, exc.message
    except grpc.RpcError as exc:  # raw stub calls
        return exc.code().name, exc.details()
    pytest.fail("the call succeeded; expected an error")


@pytest.mark.parametrize("call, code, phrases", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_case(client, serving_repo, call, code, phrases):
    got_code, message = _code_and_message(call, client)
    assert got_code == code, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    # The server is unharmed: the next request is answered correctly.
    expected = serving_repo.estimator.log_prob(X.astype(np.float64)).numpy()
    np.testing.assert_allclose(client.score(G, X), expected, rtol=1e-5)


def test_bad_requests_never_affect_concurrent_good_ones(server, serving_repo):
    """Good and bad requests interleaved from many threads: every good one gets its right answer."""
    x = serving_repo.X_test[:300]
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    bad_calls = [c[1] for c in CASES if c[0] not in ("tiny-deadline",)]

    def good(client):
        np.testing.assert_allclose(client.score(G, x), expected, rtol=1e-5)
        return "ok"

    def bad(client, call):
        return _code_and_message(call, client)[0]

    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, client) for _ in range(24)]
        bads = [pool.submit(bad, client, call) for call in bad_calls]
        assert [f.result(30) for f in goods] == ["ok"] * 24
        assert all(f.result(30) != "OK" for f in bads)


def test_deadline_passing_while_running_returns_deadline_exceeded(server, serving_repo, block_graph):
    """The session is held past the client's deadline: DEADLINE_EXCEEDED, and the server goes on."""
    blocker = block_graph(server, G, "score")
    client = server.client(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.score(G, serving_repo.X_test[:10])
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 5
    assert blocker.entered.is_set()
    blocker.release.set()
    x = serving_repo.X_test[:10]
    np.testing.assert_allclose(server.client().score(G, x),
                               serving_repo.estimator.log_prob(x.astype(np.float64)).numpy(), rtol=1e-5)
