"""What grpc.aio's registered methods cost every call: the bare-grpcio floor of S1 with and without
extra registered methods that are never called, under S1's batch 1 x 64 load (h2load).

Why: grpc.aio 1.85 keeps one pending task per registered method and waits on all of them again
for every call that arrives (``serving/services/generic_only.py``). genserve had 22 methods
registered, so it now registers none; this measures that decision on the server that does nothing
else. Rounds alternate the variants (the machine's speed drifts); the table gives per-variant
medians of requests/s and of server CPU per request, and the per-round pairs.

    python bench/grpc_registered_methods.py [--rounds 12] [--registered 22] [--seconds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import log, machine_info, machine_line, print_table, write_results
from s1_serving import drive_h2load, start_floor, stop_process, wait_ready

MODEL = "s1-gmm"
DIM = 64


def one_cell(workdir: Path, registered: int, seconds: float) -> dict:
    process, target, log_path = start_floor(workdir, 1, registered)
    try:
        wait_ready(target, MODEL, process, log_path, timeout=60)
        cell = {"system": f"floor+{registered}", "target": target, "model": MODEL, "batch": 1, "concurrency": 64}
        [result] = drive_h2load([cell], {cell["system"]: process.pid}, DIM, 1.0, seconds, workdir)
    finally:
        stop_process(process)
    result["registered"] = registered
    result["server_cpu_us_per_request"] = 1e6 * result["server_cpu_s"] / max(result["requests"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--registered", type=int, default=22, help="extra registered methods of the second variant")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per cell (after 1 s of warm-up)")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load is needed (apt-get install nghttp2-client)")
    info = machine_info()
    variants = (0, args.registered)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="grpc-registered-") as tmp:
        for r in range(args.rounds):
            for registered in variants:
                result = one_cell(Path(tmp), registered, args.seconds)
                result["round"] = r
                rounds.append(result)
                log(f"round {r}: {registered:2d} registered: {result['requests_per_s']:,.0f} requests/s, "
                    f"{result['server_cpu_us_per_request']:.0f} us of server CPU per request")
    summary = []
    for registered in variants:
        mine = [x for x in rounds if x["registered"] == registered]
        summary.append({"registered": registered,
                        "requests_per_s": statistics.median(x["requests_per_s"] for x in mine),
                        "server_cpu_us_per_request": statistics.median(x["server_cpu_us_per_request"] for x in mine),
                        "p50_ms": statistics.median(x["p50_ms"] for x in mine)})
    pairs = [(a, b) for a, b in zip(rounds[0::2], rounds[1::2])]
    lower = sum(b["server_cpu_us_per_request"] > a["server_cpu_us_per_request"] for a, b in pairs)
    print(machine_line(info))
    print_table(f"Bare grpc.aio server, batch 1 x 64 (h2load), medians of {args.rounds} interleaved rounds",
                ["registered methods (never called)", "requests/s", "server CPU per request", "p50"],
                [[s["registered"], f"{s['requests_per_s']:,.0f}", f"{s['server_cpu_us_per_request']:.0f} µs",
                  f"{s['p50_ms']:.2f} ms"] for s in summary])
    print(f"\nserver CPU per request higher with {args.registered} registered methods in {lower} of {len(pairs)} rounds; "
          f"per round (none / {args.registered}): "
          + ", ".join(f"{a['server_cpu_us_per_request']:.0f}/{b['server_cpu_us_per_request']:.0f}" for a, b in pairs))
    write_results("grpc_registered_methods", {"summary": summary, "rounds": rounds,
                                              "rounds_with_more_cpu": [lower, len(pairs)]}, info)


if __name__ == "__main__":
    main()
