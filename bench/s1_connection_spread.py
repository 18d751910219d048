"""How evenly a few long-lived client connections spread over ``--workers`` processes.

SO_REUSEPORT hashes each new connection to one worker and it stays there, so with few clients
(each gRPC channel keeps one HTTP/2 connection) one worker may serve most of them while the other
idles — S1's 1 × 64 cell with four h2load connections had one round at ~105 % server CPU instead of
~185 %. ``--max-connection-age`` makes gRPC ask each connection to go after that many seconds; the
clients reconnect and are hashed afresh, so over a run the load evens out.

Each round starts ``genserve serve --workers 2`` on the S1 GMM graph, runs ``--clients`` client
threads (each with its own channel and connection) calling ModelInfer with one row for
``--seconds``, and reads how many requests each worker answered from its own metrics endpoint
(``metrics_port + i``). Reported per setting: the busier worker's share of the requests in each
round (0.5 = even, 1.0 = one worker did everything) and the failed calls (must be 0: a GOAWAY
must not fail a call).

    .venv/bin/python bench/s1_connection_spread.py --rounds 6 --seconds 8
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from common import write_results
from s1_serving import CACHE, build_graphs, free_port, infer_request, start_genserve, stop_process, wait_ready
from serving.api import grpc_service_pb2_grpc as pb_grpc

WORKERS = 2


def worker_requests(metrics_port: int, model: str) -> float:
    """ModelInfer requests answered OK by the worker whose metrics endpoint this is."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {"method": "ModelInfer", "model": model, "code": "OK"}
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "genserve_requests_total" and wanted.items() <= sample.labels.items())


def drive(target: str, request, seconds: float, counts: list, failures: list, index: int) -> None:
    """One client: its own channel (a local subchannel pool, so its own TCP connection)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                stub.ModelInfer(request, timeout=10)
                counts[index] += 1
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")


def one_round(repo: Path, workdir: Path, model: str, clients: int, seconds: float, age: float) -> dict:
    metrics_port = free_port()  # worker i serves its metrics on metrics_port + i
    server, target, log_path = start_genserve(repo, workdir, ["--workers", str(WORKERS), "--max-connection-age",
                                                              str(age)], metrics_port=metrics_port)
    try:
        wait_ready(target, model, server, log_path)
        request = infer_request(model, 1, 64)
        counts, failures = [0] * clients, []
        threads = [threading.Thread(target=drive, args=(target, request, seconds, counts, failures, i))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = [worker_requests(metrics_port + i, model) for i in range(WORKERS)]
    finally:
        stop_process(server)
    total = sum(served)
    return {"age_s": age, "per_worker": served, "busier_share": max(served) / total if total else None,
            "calls": sum(counts), "failed": len(failures), "failures": failures[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--ages", default="0,2", help="comma-separated --max-connection-age values to compare")
    parser.add_argument("--name", default="s1_connection_spread")
    args = parser.parse_args()
    repo, workdir = CACHE / "spread-repo", CACHE / "spread-logs"
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_graphs(repo, ["gmm"])["gmm"]["model"]
    ages = [float(a) for a in args.ages.split(",")]
    rounds = []
    for r in range(args.rounds):
        for age in ages:  # interleaved, so a slow spell of the machine hits both
            result = one_round(repo, workdir, model, args.clients, args.seconds, age)
            rounds.append(result)
            print(f"round {r + 1} age {age:g} s: per worker {result['per_worker']}, busier share "
                  f"{result['busier_share']:.2f}, failed {result['failed']}", flush=True)
    print(f"\n{args.clients} clients (one connection each), --workers {WORKERS}, {args.seconds:g} s per round\n")
    print("| --max-connection-age | rounds | busier worker's share, median | worst | calls/s, median | failed calls |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = []
    for age in ages:
        mine = [r for r in rounds if r["age_s"] == age]
        shares = [r["busier_share"] for r in mine]
        rates = [r["calls"] / args.seconds for r in mine]
        row = {"age_s": age, "rounds": len(mine), "busier_share_median": statistics.median(shares),
               "busier_share_worst": max(shares), "calls_per_s_median": statistics.median(rates),
               "failed": sum(r["failed"] for r in mine)}
        summary.append(row)
        print(f"| {age:g} s{' (off)' if age == 0 else ''} | {row['rounds']} | {row['busier_share_median']:.2f} | "
              f"{row['busier_share_worst']:.2f} | {row['calls_per_s_median']:,.0f} | {row['failed']} |")
    write_results(args.name, {"clients": args.clients, "workers": WORKERS, "seconds": args.seconds,
                              "summary": summary, "rounds": rounds})


if __name__ == "__main__":
    main()
