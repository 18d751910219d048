"""Tensors on the wire: shape + dtype + raw little-endian bytes <-> NumPy arrays.

Raw bytes rather than repeated numeric fields: encoding and decoding are a memory copy (or
none: decoding is a view on the request's bytes), several times cheaper than protobuf's packed
floats at batch sizes of thousands. Shared by the servicer and the client.
"""

from __future__ import annotations

import math

import numpy as np

from serving.api import genserve_pb2 as pb
from serving.models.errors import InvalidArgument

_TO_NUMPY = {pb.DATA_TYPE_FLOAT32: np.dtype("<f4"), pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
             pb.DATA_TYPE_INT64: np.dtype("<i8"), pb.DATA_TYPE_INT32: np.dtype("<i4"),
             pb.DATA_TYPE_UINT8: np.dtype("u1")}
_FROM_NUMPY = {dt.name: code for code, dt in _TO_NUMPY.items()}
_FROM_NUMPY["bool"] = pb.DATA_TYPE_UINT8
DTYPE_NAMES = {code: dt.name for code, dt in _TO_NUMPY.items()}


def wire_dtype(name: str) -> int:
    """The DataType enum value for a NumPy dtype name ('float32', ...)."""
    try:
        return _FROM_NUMPY[name]
    except KeyError:
        raise InvalidArgument(f"dtype: expected one of {sorted(_FROM_NUMPY)}, got {name}") from None


def decode(tensor: pb.Tensor, field: str = "x") -> np.ndarray:
    """A read-only NumPy view of ``tensor``; InvalidArgument names the field that is wrong."""
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
        expected = ", ".join(pb.DataType.Name(c) for c in _TO_NUMPY)
        raise InvalidArgument(f"{field}.dtype: expected one of {expected}, got {name}")
    shape = [int(d) for d in tensor.shape]
    if not shape:
        raise InvalidArgument(f"{field}.shape: expected [N, ...] with a batch axis, got []")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape: expected non-negative dimensions, got {shape}")
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected_bytes:
        raise InvalidArgument(f"{field}.data: expected {expected_bytes} bytes for shape {shape} of {dtype.name}, "
                              f"got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode(array: np.ndarray) -> pb.Tensor:
    """``array`` as a Tensor message (C order, little-endian; bool travels as uint8)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    code = wire_dtype(array.dtype.name)
    data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return pb.Tensor(shape=list(array.shape), dtype=code, data=data)
