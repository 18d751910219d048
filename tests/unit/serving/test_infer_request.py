"""ModelInfer's request parser: a large request's raw tensors are views on the received bytes,
and everything else parses exactly as protobuf's FromString does."""

from __future__ import annotations

import types

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from serving.api import grpc_service_pb2 as pb
from serving.services.inference import InferenceServicer, add_inference_service, inference_handlers
from serving.services.infer_request import (MAX_FIELDS, MAX_RAW_ENTRIES, ZERO_COPY_MIN_BYTES, InferRequestView,
                                            parse_infer_request)


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


def _deterministic(message: pb.ModelInferRequest) -> bytes:
    """Its bytes with map entries sorted (protobuf's default map order is not specified)."""
    return message.SerializeToString(deterministic=True)


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
    assert _deterministic(parsed.message) == _deterministic(_without_raw(expected))


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = _varint(number << 3 | wire_type)
    return tag + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _assert_parses_as_from_string(wire: bytes) -> None:
    """parse_infer_request gives FromString's message and raw contents, or fails as it does."""
    try:
        expected = pb.ModelInferRequest.FromString(wire)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(wire)
        return
    parsed = parse_infer_request(wire)
    message = parsed.message if isinstance(parsed, InferRequestView) else parsed
    assert [bytes(v) for v in parsed.raw_input_contents] == list(expected.raw_input_contents)
    assert _deterministic(_without_raw(message)) == _deterministic(_without_raw(expected))


def _chunks(rng: np.random.Generator) -> list[bytes]:
    """Top-level fields of every kind: known ones, raw tensors (one large), unknown fields of every
    wire type, and field 7 under the wrong wire types (protobuf keeps those as unknown fields)."""
    known = _request([]).SerializeToString()
    chunks = [known]  # the known fields as protobuf wrote them
    chunks += [_field(7, 2, rng.bytes(ZERO_COPY_MIN_BYTES)), _field(7, 2, b""), _field(7, 2, rng.bytes(17))]
    chunks += [_field(99, 0, _varint(2**63 + 5)), _field(100, 1, rng.bytes(8)), _field(101, 5, rng.bytes(4)),
               _field(102, 2, rng.bytes(9)), _field(7, 0, _varint(3)), _field(7, 1, rng.bytes(8)),
               _field(7, 5, rng.bytes(4)), _field(2**29 - 1, 0, b"\x01"), _field(1, 2, b"other-name")]
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_fields_of_every_wire_type_in_any_order_parse_as_from_string_does(seed):
    rng = np.random.default_rng(seed)
    chunks = _chunks(rng)
    order = rng.permutation(len(chunks))
    wire = b"".join(chunks[i] for i in order)
    assert isinstance(parse_infer_request(wire), InferRequestView)
    _assert_parses_as_from_string(wire)


def test_damaged_bytes_parse_or_fail_as_from_string_does():
    rng = np.random.default_rng(1)
    base = b"".join(_chunks(rng))
    for trial in range(300):
        wire = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            # mostly in the header fields (where framing decides), sometimes anywhere
            at = int(rng.integers(0, 400)) if trial % 4 else int(rng.integers(0, len(wire)))
            wire[at] = int(rng.integers(0, 256))
        _assert_parses_as_from_string(bytes(wire))


@pytest.mark.parametrize("overlong", ["tag", "length", "eleven-byte varint"])
def test_overlong_encodings_are_left_to_from_string(overlong):
    big = bytes(ZERO_COPY_MIN_BYTES)
    if overlong == "tag":  # field 7, wire type 2, padded to 6 bytes
        entry = bytes([0xBA, 0x80, 0x80, 0x80, 0x80, 0x00]) + _varint(len(big)) + big
    elif overlong == "length":
        entry = bytes([0x3A]) + bytes([0x80 | (len(big) & 0x7F), 0x80 | (len(big) >> 7 & 0x7F),
                                       0x80 | (len(big) >> 14), 0x80, 0x80, 0x00]) + big
    else:
        entry = bytes([0x98, 0x06]) + bytes([0xFF] * 10) + bytes([0x01]) + _field(7, 2, big)
    _assert_parses_as_from_string(_request([]).SerializeToString() + entry)


def test_requests_with_very_many_fields_are_left_to_from_string():
    """The walk stops after MAX_FIELDS fields or MAX_RAW_ENTRIES tensors: FromString takes over."""
    big = _field(7, 2, bytes(ZERO_COPY_MIN_BYTES))
    many_unknown = big + bytes([0xF8, 0x07, 0x00]) * MAX_FIELDS  # field 127 = 0, MAX_FIELDS times
    many_raw = big + bytes([0x3A, 0x00]) * MAX_RAW_ENTRIES  # empty tensors
    for wire in (many_unknown, many_raw):
        parsed = parse_infer_request(wire)
        assert type(parsed) is pb.ModelInferRequest
        _assert_parses_as_from_string(wire)


def test_a_view_copies_and_reads_through_to_its_message():
    import copy

    view = parse_infer_request(_request([bytes(ZERO_COPY_MIN_BYTES)]).SerializeToString())
    assert copy.copy(view).model_name == "digits-gmm"
    with pytest.raises(AttributeError):
        view.no_such_field  # noqa: B018


class _RecordingServer:
    def __init__(self) -> None:
        self.generic: list = []
        self.registered: dict = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.registered[service] = handlers


def test_model_infer_is_served_with_the_copy_free_parser_through_the_generic_handler_only():
    servicer = InferenceServicer(None, None, None, None, "test")
    handlers = inference_handlers(servicer)
    assert handlers["ModelInfer"].request_deserializer is parse_infer_request
    assert handlers["ModelStreamInfer"].request_deserializer == pb.ModelInferRequest.FromString
    assert handlers["ModelReady"].request_deserializer == pb.ModelReadyRequest.FromString
    assert len(handlers) == 12
    server = _RecordingServer()
    add_inference_service(servicer, server)
    assert server.registered == {}  # serving/services/generic_only.py: no registered methods
    (generic,) = server.generic
    assert generic.service_name() == "inference.GRPCInferenceService"
    details = types.SimpleNamespace(method="/inference.GRPCInferenceService/ModelInfer")
    assert generic.service(details).request_deserializer is parse_infer_request
    for name in handlers:
        assert generic.service(types.SimpleNamespace(method=f"/inference.GRPCInferenceService/{name}")) is not None
