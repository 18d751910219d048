"""Encode a ModelInferResponse with raw output contents straight to its wire bytes.

Building the response through protobuf costs a message, one ``InferOutputTensor`` per output,
``array.tobytes()`` (a copy) and ``raw_output_contents.append`` (a second copy), then
``SerializeToString`` (a third). The wire format of this message is a few length-delimited
fields, so it is written here directly: the header fields (names, version, datatypes and shapes
repeat from request to request, so they are encoded once and kept), then each output's bytes,
joined once. The fields come in field-number order, as protobuf writes them, so the bytes equal
``SerializeToString`` of the same message (the tests check both that and the parse-back).
``python bench/infer_wire.py``: a one-value or a 1,024-value answer in about half protobuf's
time, a 16-MiB batch of samples in under a quarter (1.8 against 8.3 ms of the event loop).

Only what the servicer sends is encoded: names, the version, the request id, and for each
output its name, datatype, shape and raw bytes. Anything else (typed contents, parameters) is
built as a message.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from serving.api import grpc_service_pb2 as pb

_RESPONSE = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
_OUTPUT = pb.ModelInferResponse.InferOutputTensor.DESCRIPTOR.fields_by_name
_LENGTH_DELIMITED = 2
_ONE_BYTE = [bytes((v,)) for v in range(0x80)]
# Below this size an output's bytes are copied with ``tobytes`` (cheaper than a memoryview's cast).
_VIEW_MIN_BYTES = 64 * 1024


def _key(number: int) -> bytes:
    return _uvarint((number << 3) | _LENGTH_DELIMITED)


def _uvarint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int64(value: int) -> bytes:
    """An int64 varint: negative values as their 64-bit two's complement (10 bytes)."""
    return _uvarint(value & 0xFFFFFFFFFFFFFFFF)


MODEL_NAME, MODEL_VERSION, ID, OUTPUTS, RAW_OUTPUT_CONTENTS = (
    _key(_RESPONSE[n].number) for n in ("model_name", "model_version", "id", "outputs", "raw_output_contents"))
OUT_NAME, OUT_DATATYPE, OUT_SHAPE = (_key(_OUTPUT[n].number) for n in ("name", "datatype", "shape"))


def _string(key: bytes, text: str) -> bytes:
    """A proto3 string field: absent when empty, as protobuf omits defaults."""
    if not text:
        return b""
    data = text.encode()
    return key + _uvarint(len(data)) + data


@lru_cache(maxsize=1024)
def _header(model_name: str, model_version: str) -> bytes:
    return _string(MODEL_NAME, model_name) + _string(MODEL_VERSION, model_version)


@lru_cache(maxsize=1024)
def _tensor(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One ``outputs`` entry (a request's batch size repeats, so these repeat too)."""
    tensor = _string(OUT_NAME, name) + _string(OUT_DATATYPE, datatype)
    if shape:  # a packed repeated field: absent when empty
        packed = b"".join([_int64(d) for d in shape])
        tensor += OUT_SHAPE + _uvarint(len(packed)) + packed
    return OUTPUTS + _uvarint(len(tensor)) + tensor


def encode_raw_response(model_name: str, model_version: str, request_id: str,
                        outputs: Sequence[tuple[str, str, np.ndarray]]) -> bytes:
    """The serialized ModelInferResponse answering with ``(name, datatype, array)`` as raw contents.

    Each array must already be C-contiguous in its little-endian wire dtype. The fields that
    repeat from request to request (names, version, datatypes, shapes) are encoded once and kept.
    """
    parts: list[bytes | memoryview] = [_header(model_name, model_version)]
    if request_id:
        parts.append(_string(ID, request_id))
    for name, datatype, array in outputs:
        parts.append(_tensor(name, datatype, array.shape))
    for _, _, array in outputs:
        size = array.nbytes
        parts.append(RAW_OUTPUT_CONTENTS + _uvarint(size))
        if size >= _VIEW_MIN_BYTES:
            parts.append(memoryview(array).cast("B"))
        elif size:
            parts.append(array.tobytes())
    return b"".join(parts)


def serialize_response(response: "pb.ModelInferResponse | bytes") -> bytes:
    """gRPC's response serializer for ModelInfer: encoded bytes pass through, messages serialize."""
    if type(response) is bytes:
        return response
    return response.SerializeToString()
