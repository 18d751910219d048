"""ModelInfer on the wire: protobuf against genserve's copy-free request parser and response encoder.

What the servicer does with a request before any check: turn gRPC's bytes into a message and its
``raw_input_contents[0]`` into a NumPy array. ``FromString`` copies the raw tensor into the
message and reading the field copies it again; ``serving.services.infer_request.parse_infer_request``
(requests of 64 KiB and more) walks the top-level fields and hands out views on the received bytes.
Requests as S1 sends them (one FP32 input of 64 columns) at 1, 1,024, 16,384 and 65,536 rows; each
way timed as the median per-call time of ``--calls`` calls (fewer for the large sizes), in
``--rounds`` interleaved rounds, with the server's malloc settings (``keep_freed_memory``, 64 MiB)
so that large blocks are not faulted in afresh on every call. The arrays are checked equal.

The answer going back: a message with one raw FP32 output, built and serialized by protobuf
(``tobytes``, ``raw_output_contents.append``, ``SerializeToString``: three copies), against
``serving.services.infer_response.encode_raw_response`` (the header encoded, the array's bytes
joined once), for a score of 1 and 1,024 rows and for samples of 16,384 and 65,536 rows x 64. The
encoded bytes are checked equal to protobuf's.

    python bench/infer_wire.py [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import log, machine_info, machine_line, print_table, write_results
from serving.api import grpc_service_pb2 as pb
from serving.runtime.memory import keep_freed_memory
from serving.services.infer_request import parse_infer_request
from serving.services.infer_response import encode_raw_response

ROWS = (1, 1024, 16_384, 65_536)
# Outputs answered: (rows, columns): one log-density per row, or a batch of 64-column samples.
OUTPUTS = ((1, 1), (1024, 1), (16_384, 64), (65_536, 64))


def request_bytes(rows: int) -> bytes:
    request = pb.ModelInferRequest(model_name="s1-gmm", id="bench")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 64])
    rng = np.random.default_rng(rows)
    request.raw_input_contents.append(rng.random((rows, 64), dtype=np.float32).tobytes())
    return request.SerializeToString()


def from_string(wire: bytes) -> np.ndarray:
    return np.frombuffer(pb.ModelInferRequest.FromString(wire).raw_input_contents[0], dtype="<f4")


def copy_free(wire: bytes) -> np.ndarray:
    return np.frombuffer(parse_infer_request(wire).raw_input_contents[0], dtype="<f4")


def output_array(rows: int, columns: int) -> np.ndarray:
    array = np.random.default_rng(rows).random((rows, columns), dtype=np.float32)
    return array[:, 0].copy() if columns == 1 else array


def protobuf_response(array: np.ndarray) -> bytes:
    response = pb.ModelInferResponse(model_name="s1-gmm", model_version="1", id="bench")
    response.outputs.add(name="y", datatype="FP32", shape=array.shape)
    response.raw_output_contents.append(array.tobytes())
    return response.SerializeToString()


def encoded_response(array: np.ndarray) -> bytes:
    return encode_raw_response("s1-gmm", "1", "bench", [("y", "FP32", array)])


def per_call_seconds(fn, wire, calls: int) -> float:
    fn(wire)
    started = time.perf_counter()
    for _ in range(calls):
        fn(wire)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing at 1,024 rows and fewer")
    args = parser.parse_args()
    print(machine_line())
    keep_freed_memory(64 << 20)
    results = []
    for rows in ROWS:
        wire = request_bytes(rows)
        np.testing.assert_array_equal(from_string(wire), copy_free(wire))
        calls = args.calls if rows <= 1024 else max(args.calls // 50, 10)
        times: dict[str, list[float]] = {"from_string": [], "copy_free": []}
        for _ in range(args.rounds):
            times["from_string"].append(per_call_seconds(from_string, wire, calls))
            times["copy_free"].append(per_call_seconds(copy_free, wire, calls))
        old, new = (statistics.median(times[k]) for k in ("from_string", "copy_free"))
        log(f"  {rows} rows ({len(wire):,} bytes): {old * 1e6:.1f} -> {new * 1e6:.1f} us")
        results.append({"rows": rows, "bytes": len(wire), "calls": calls, "from_string_s": old,
                        "copy_free_s": new, "speed_up": old / new, "rounds_s": times})
    answers = []
    for rows, columns in OUTPUTS:
        array = output_array(rows, columns)
        assert protobuf_response(array) == encoded_response(array)
        calls = args.calls if array.size <= 1024 else max(args.calls // 50, 10)
        times = {"protobuf": [], "encoded": []}
        for _ in range(args.rounds):
            times["protobuf"].append(per_call_seconds(protobuf_response, array, calls))
            times["encoded"].append(per_call_seconds(encoded_response, array, calls))
        old, new = (statistics.median(times[k]) for k in ("protobuf", "encoded"))
        log(f"  answer {list(array.shape)} ({array.nbytes:,} bytes): {old * 1e6:.1f} -> {new * 1e6:.1f} us")
        answers.append({"shape": list(array.shape), "bytes": array.nbytes, "calls": calls, "protobuf_s": old,
                        "encoded_s": new, "speed_up": old / new, "rounds_s": times})
    print_table("ModelInfer request parse + raw tensor as an array (median per call over rounds)",
                ["rows", "request bytes", "FromString µs", "copy-free µs", "speed-up"],
                [[r["rows"], f"{r['bytes']:,}", f"{r['from_string_s'] * 1e6:,.1f}", f"{r['copy_free_s'] * 1e6:,.1f}",
                  f"{r['speed_up']:.2f}x"] for r in results])
    print_table("ModelInferResponse with one raw FP32 output, built and serialized (median per call over rounds)",
                ["output shape", "output bytes", "protobuf µs", "encoded µs", "speed-up"],
                [[" × ".join(map(str, a["shape"])), f"{a['bytes']:,}", f"{a['protobuf_s'] * 1e6:,.1f}",
                  f"{a['encoded_s'] * 1e6:,.1f}", f"{a['speed_up']:.2f}x"] for a in answers])
    write_results("infer_wire", {"rounds": args.rounds, "requests": results, "responses": answers}, machine_info())


if __name__ == "__main__":
    main()
