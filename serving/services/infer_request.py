"""Parse a large ModelInferRequest without copying its tensors.

protobuf's ``FromString`` copies every ``raw_input_contents`` entry into the message, and reading
``request.raw_input_contents[i]`` copies it again into a new ``bytes``: a 1,024-row GMM request
(256 KiB) is copied twice before NumPy sees it, a batch of images (tens of MiB) likewise. Here
the request's top-level fields are walked once (a handful of tag/length pairs), the raw tensors
become ``memoryview`` slices of the bytes gRPC delivered, and only the rest — names, shapes,
parameters, a few hundred bytes — goes through ``FromString``. A protobuf message is the merge
of its fields in any order, so the rest parses to exactly the request minus its raw contents.

Small requests (a one-row request is ~300 bytes) are cheaper to parse whole: below
``ZERO_COPY_MIN_BYTES`` this is plain ``FromString``. Anything the walk does not expect is left
to ``FromString``, which parses or rejects it exactly as the stock deserializer does: a
truncated field, a wire type protobuf no longer uses (groups), a tag or length encoded in more
than 5 bytes (which upb rejects), and any request with more than ``MAX_FIELDS`` top-level fields
or ``MAX_RAW_ENTRIES`` raw tensors — the walk is Python on the event loop, and a 64-MiB request
made of millions of 2-byte fields would otherwise hold the loop for seconds (a real request has
a few fields and one raw tensor per input).

The tensors are views at whatever offset the sender's header ends on, so an FP32 array may be
unaligned: onnxruntime runs it as fast, NumPy's finite-check sum ~1.4x slower (23 against 17 µs
at 256 KiB), which still costs less than the copy it replaces.
"""

from __future__ import annotations

from typing import Any

from serving.api import grpc_service_pb2 as pb

ZERO_COPY_MIN_BYTES = 64 * 1024
MAX_FIELDS = 1024
MAX_RAW_ENTRIES = 256
MAX_HEADER_VARINT_BYTES = 5  # a tag or a length (both < 2**32): upb rejects longer encodings
RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
LENGTH_DELIMITED, VARINT, FIXED64, FIXED32 = 2, 0, 1, 5


class InferRequestView:
    """A ModelInferRequest whose ``raw_input_contents`` are views on the received bytes.

    Every other attribute is the parsed message's; the views keep the received bytes alive for
    as long as an array made from them (``np.frombuffer``) lives.
    """

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: Any, raw_input_contents: list[memoryview]):
        self.message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        if name in self.__slots__:  # not set yet (copy.copy builds the object without __init__)
            raise AttributeError(name)
        return getattr(self.message, name)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")


def split_raw_contents(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """(the request's bytes without its raw_input_contents, views on those), or None when the
    bytes hold no raw tensor or something this walk leaves to FromString (see the module
    docstring)."""
    view = memoryview(data)
    kept: list[memoryview] = []
    raws: list[memoryview] = []
    pos = start = fields = 0
    size = len(data)
    try:
        while pos < size:
            fields += 1
            if fields > MAX_FIELDS:
                return None
            tag, after_tag = _varint(data, pos)
            if after_tag - pos > MAX_HEADER_VARINT_BYTES:
                return None
            wire_type = tag & 7
            if wire_type == LENGTH_DELIMITED:
                length, body = _varint(data, after_tag)
                end = body + length
                if end > size or body - after_tag > MAX_HEADER_VARINT_BYTES:
                    return None
                if tag >> 3 == RAW_INPUT_CONTENTS:
                    if len(raws) == MAX_RAW_ENTRIES:
                        return None
                    kept.append(view[start:pos])
                    raws.append(view[body:end])
                    start = end
                pos = end
            elif wire_type == VARINT:
                pos = _varint(data, after_tag)[1]
            elif wire_type == FIXED64:
                pos = after_tag + 8
            elif wire_type == FIXED32:
                pos = after_tag + 4
            else:
                return None
    except (IndexError, ValueError):
        return None
    if pos != size or not raws:
        return None
    kept.append(view[start:size])
    return b"".join(kept), raws


def parse_infer_request(data: bytes) -> Any:
    """gRPC's request deserializer for ModelInfer: a message, or a view for large requests."""
    # Views only on immutable bytes (gRPC hands its deserializer a fresh ``bytes`` per message).
    if len(data) >= ZERO_COPY_MIN_BYTES and type(data) is bytes:
        split = split_raw_contents(data)
        if split is not None:
            rest, raws = split
            return InferRequestView(pb.ModelInferRequest.FromString(rest), raws)
    return pb.ModelInferRequest.FromString(data)
