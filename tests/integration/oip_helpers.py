"""Helpers for the Open Inference Protocol tests: repositories with generic ONNX models, tritonclient calls."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # tritonclient's generated code is one protobuf major behind: a warning
    warnings.simplefilter("ignore")
    import tritonclient.grpc as triton  # noqa: F401  (re-exported)
    from tritonclient.grpc import service_pb2 as triton_pb  # noqa: F401
    from tritonclient.grpc import service_pb2_grpc as triton_grpc  # noqa: F401
    from tritonclient.utils import InferenceServerException  # noqa: F401

GENERIC = "plain-onnx"
FIXED = "fixed-onnx"


def write_generic_model(repo: Path, name: str = GENERIC) -> Path:
    """model.onnx without a manifest: INPUT0 [batch, 4] -> OUTPUT0 = 2 * INPUT0, OUTPUT1 = row sums [batch]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = repo / name / "1"
    folder.mkdir(parents=True)
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT0"]),
         helper.make_node("ReduceSum", ["INPUT0", "axes"], ["OUTPUT1"], keepdims=0)],
        "plain", [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, ["batch"])], initializer=[two, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def write_fixed_model(repo: Path, name: str = FIXED) -> Path:
    """model.onnx with a fixed shape and an int64 input: A [3, 2] INT64 -> B = A + 1 (no batch axis)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = repo / name / "1"
    folder.mkdir(parents=True)
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    graph = helper.make_graph([helper.make_node("Add", ["A", "one"], ["B"])], "fixed",
                              [helper.make_tensor_value_info("A", TensorProto.INT64, [3, 2])],
                              [helper.make_tensor_value_info("B", TensorProto.INT64, [3, 2])], initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def copy_repo(source: Path, target: Path, names: list[str] | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for folder in sorted(source.iterdir()):
        if names is None or folder.name in names:
            shutil.copytree(folder, target / folder.name)
    return target


def client(port: int) -> "triton.InferenceServerClient":
    return triton.InferenceServerClient(f"127.0.0.1:{port}")


def infer_input(name: str, array: np.ndarray, datatype: str = "FP32") -> "triton.InferInput":
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def code_of(error: Exception) -> str:
    """'NOT_FOUND' from a tritonclient InferenceServerException ('StatusCode.NOT_FOUND')."""
    return str(error.status()).rsplit(".", 1)[-1]
