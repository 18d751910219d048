"""The hand-encoded ModelInferResponse equals protobuf's, byte for byte and parsed back."""

from __future__ import annotations

import numpy as np
import pytest

from serving.api import grpc_service_pb2 as pb
from serving.services.infer_response import encode_raw_response, serialize_response

DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
          "UINT8": np.uint8, "BOOL": np.bool_}


def _protobuf(model, version, request_id, outputs):
    message = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, datatype, array in outputs:
        message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        message.raw_output_contents.append(array.tobytes())
    return message


def _random_outputs(rng, count):
    outputs = []
    for i in range(count):
        datatype = list(DTYPES)[rng.integers(len(DTYPES))]
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(rng.choice([0, 1, 3, 127, 128, 300])) for _ in range(ndim))
        if np.prod(shape) > 200_000:
            shape = shape[:1]
        array = (rng.standard_normal(shape) * 100).astype(DTYPES[datatype])
        outputs.append((rng.choice(["log_prob", "anomaly", "sample", "x" * 200, "é"]) + str(i), datatype, array))
    return outputs


@pytest.mark.parametrize("seed", range(60))
def test_equals_protobuf_serialization(seed):
    rng = np.random.default_rng(seed)
    model = rng.choice(["s1-gmm", "", "digits-gmm.sample", "m" * 300])
    version = rng.choice(["1", "", "12345678901"])
    request_id = rng.choice(["", "req-7", "ü" * 70])
    outputs = _random_outputs(rng, int(rng.integers(0, 4)))
    encoded = encode_raw_response(model, version, request_id, outputs)
    expected = _protobuf(model, version, request_id, outputs)
    assert encoded == expected.SerializeToString(deterministic=True)
    parsed = pb.ModelInferResponse.FromString(encoded)
    assert parsed == expected
    for (name, datatype, array), raw, tensor in zip(outputs, parsed.raw_output_contents, parsed.outputs):
        assert tensor.name == name and tensor.datatype == datatype and tuple(tensor.shape) == array.shape
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=array.dtype).reshape(array.shape), array)


def test_a_large_output_is_copied_once_and_exact():
    array = np.arange(4 << 20, dtype=np.float32)  # 16 MiB
    encoded = encode_raw_response("m", "1", "", [("y", "FP32", array)])
    parsed = pb.ModelInferResponse.FromString(encoded)
    assert np.array_equal(np.frombuffer(parsed.raw_output_contents[0], dtype=np.float32), array)


def test_serializer_passes_bytes_and_serializes_messages():
    message = pb.ModelInferResponse(model_name="m", id="7")
    assert serialize_response(message) == message.SerializeToString()
    data = message.SerializeToString()
    assert serialize_response(data) is data


@pytest.mark.parametrize("rows", [3, 40_000])  # below and above the size answered from a memoryview
def test_the_servicer_answers_any_layout_and_byte_order_as_protobuf_does(rows):
    from types import SimpleNamespace

    from serving.services.inference import InferenceServicer

    e = SimpleNamespace(name="m", version="2")
    request = pb.ModelInferRequest(model_name="m", id="r1")
    base = np.random.default_rng(rows).standard_normal((rows, 6)).astype(np.float32)
    results = {"strided": base[:, ::2], "transposed": base.T.copy().T, "big_endian": base.astype(">f4"),
               "flags": base[:, 0] > 0}
    wanted = list(results)
    encoded = InferenceServicer._response(e, request, results, wanted, True, wire=True)
    message = InferenceServicer._response(e, request, results, wanted, True, wire=False)
    assert isinstance(encoded, bytes) and isinstance(message, pb.ModelInferResponse)
    assert encoded == message.SerializeToString(deterministic=True)
    parsed = pb.ModelInferResponse.FromString(encoded)
    for i, name in enumerate(wanted):
        array = np.asarray(results[name])
        got = np.frombuffer(parsed.raw_output_contents[i], dtype=array.dtype.newbyteorder("<")).reshape(array.shape)
        np.testing.assert_array_equal(got, array)
