"""ModelInfer's request parser: a large request's raw tensors are views on the received bytes,
and everything else parses exactly as protobuf's FromString does."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from serving.api import grpc_service_pb2 as pb
from serving.services.infer_request import ZERO_COPY_MIN_BYTES, InferRequestView, parse_infer_request


def _request(raw: list[bytes]) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="digits-gmm", model_version="3", id="req-7")
    r.parameters["seed"].int64_param = 11
    r.parameters["contamination"].double_param = 0.25
    r.parameters["tag"].string_param = "x" * 40
    for i, contents in enumerate(raw):
        r.inputs.add(name=f"in{i}", datatype="UINT8", shape=[1, len(contents)])
    typed = r.inputs.add(name="typed", datatype="FP32", shape=[3])
    typed.contents.fp32_contents.extend([1.5, -2.0, 3.25])
    out = r.outputs.add(name="log_prob")
    out.parameters["binary_data"].bool_param = True
    r.raw_input_contents.extend(raw)
    return r


def _without_raw(message: pb.ModelInferRequest) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(message)
    del copy.raw_input_contents[:]
    return copy


def test_large_request_parses_to_the_same_fields_and_views_on_the_received_bytes():
    rng = np.random.default_rng(0)
    raw = [rng.bytes(ZERO_COPY_MIN_BYTES + 123), b"", rng.bytes(13), rng.bytes(300_000)]
    wire = _request(raw).SerializeToString()
    parsed = parse_infer_request(wire)
    assert isinstance(parsed, InferRequestView)
    assert parsed.message == _without_raw(pb.ModelInferRequest.FromString(wire))
    assert [bytes(v) for v in parsed.raw_input_contents] == raw
    assert all(v.obj is wire for v in parsed.raw_input_contents)  # no copy: slices of gRPC's bytes
    # The servicer reads the message's fields through the view.
    assert (parsed.model_name, parsed.id, len(parsed.inputs)) == ("digits-gmm", "req-7", 5)
    assert parsed.parameters["seed"].int64_param == 11
    array = np.frombuffer(parsed.raw_input_contents[3], dtype=np.uint8)
    assert array.base is not None and not array.flags.writeable and bytes(array) == raw[3]


def test_fields_in_any_order_and_unknown_fields_parse_as_from_string_does():
    big = bytes(range(256)) * 400
    # raw contents first, then the rest; then an unknown field of every wire type (99, 100, ...).
    wire = (pb.ModelInferRequest(raw_input_contents=[big]).SerializeToString()
            + _request([]).SerializeToString()
            + bytes([0x98, 0x06, 0x96, 0x01])  # field 99, varint 150
            + bytes([0xA1, 0x06]) + bytes(8)  # field 100, fixed64
            + bytes([0xAD, 0x06]) + bytes(4)  # field 101, fixed32
            + bytes([0xB2, 0x06, 0x03]) + b"abc")  # field 102, length-delimited
    parsed = parse_infer_request(wire)
    expected = pb.ModelInferRequest.FromString(wire)
    assert isinstance(parsed, InferRequestView)
    assert [bytes(v) for v in parsed.raw_input_contents] == list(expected.raw_input_contents) == [big]
    assert parsed.message.SerializeToString() == _without_raw(expected).SerializeToString()


def test_small_requests_and_requests_without_raw_contents_are_plain_messages():
    small = _request([b"\x01\x02\x03\x04"]).SerializeToString()
    assert len(small) < ZERO_COPY_MIN_BYTES
    assert type(parse_infer_request(small)) is pb.ModelInferRequest
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[20_000]).contents.fp32_contents.extend([0.5] * 20_000)
    wire = typed.SerializeToString()
    assert len(wire) >= ZERO_COPY_MIN_BYTES
    parsed = parse_infer_request(wire)
    assert type(parsed) is pb.ModelInferRequest and parsed == typed


@pytest.mark.parametrize("damage", ["truncated", "length past the end", "group wire type"])
def test_malformed_large_bytes_fail_as_from_string_fails(damage):
    wire = _request([bytes(ZERO_COPY_MIN_BYTES * 2)]).SerializeToString()
    if damage == "truncated":
        wire = wire[:-10]
    elif damage == "length past the end":
        wire = wire + bytes([0x3A, 0xFF, 0xFF, 0x03]) + b"short"  # field 7 claiming 65,535 bytes
    else:
        wire = bytes([0x0B]) + wire  # field 1 as a start-group tag
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(wire)
    with pytest.raises(DecodeError):
        parse_infer_request(wire)
