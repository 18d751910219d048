"""``genserve serve`` and ``genserve client ...``: the serving side of the command line.

``register(subparsers)`` adds both commands to the top-level ``genserve`` parser (genserve/cli.py);
each parsed command carries ``func(args) -> exit code``. ``python -m serving.cli`` runs them
without the top-level entry point.

Flags of ``serve`` override ``GENSERVE_*`` environment variables, which override the defaults
(``serving.config.Settings``). Exit codes of ``client``: 0 success, 1 the server refused or failed
the call (the gRPC status code name and the server's message go to stderr), 2 a bad command line
or an unreadable input file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2

# Settings field -> (flag, type, help). Defaults stay None so only given flags override.
_SERVE_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("repo", "--repo", Path, "model repository <repo>/<name>/<version>/ (env GENSERVE_REPO)"),
    ("host", "--host", str, "address to bind, default 127.0.0.1; 0.0.0.0 in a container"),
    ("port", "--port", int, "gRPC port, default 8500; 0 picks a free one"),
    ("metrics_host", "--metrics-host", str, "address of the metrics endpoint, default: --host"),
    ("metrics_port", "--metrics-port", int, "Prometheus port, default 9100; 0 picks a free one"),
    ("providers", "--providers", str, "comma-separated onnxruntime providers, default CUDA then CPU"),
    ("cuda_device_id", "--cuda-device-id", int, "GPU for the CUDA provider, default 0"),
    ("intra_op_threads", "--intra-op-threads", int, "threads inside one session run, default 1 (0 = ORT default)"),
    ("inter_op_threads", "--inter-op-threads", int, "threads across graph nodes, default 1"),
    ("worker_threads", "--worker-threads", int, "session runs at once, default: CPU cores"),
    ("max_concurrent_rpcs", "--max-concurrent-rpcs", int, "RPCs accepted at once, default 1024"),
    ("max_message_bytes", "--max-message-bytes", int, "largest gRPC message, default 64 MiB"),
    ("max_rows_per_request", "--max-rows", int, "rows per request, default 1000000"),
    ("max_sample_count", "--max-samples", int, "samples per request, default 100000"),
    ("chunk_rows", "--chunk-rows", int, "rows per session run, default 4096"),
    ("drain_seconds", "--drain-seconds", float, "grace for in-flight requests on SIGTERM, default 20"),
    ("workers", "--workers", int, "server processes sharing the port (SO_REUSEPORT), default 1"),
    ("max_connection_age_s", "--max-connection-age", float,
     "seconds before each client connection is asked to reconnect (spreads clients over workers), default 0 = never"),
    ("max_connection_age_grace_s", "--max-connection-age-grace", float,
     "seconds the RPCs in flight on such a connection may still take, default 30"),
    ("event_loop", "--event-loop", str, "auto (uvloop when installed, the default), uvloop or asyncio"),
    ("request_threads", "--request-threads", int, "threads preparing domain-API requests, default 64"),
    ("max_queue_delay_ms", "--max-queue-delay-ms", float,
     "dynamic batching: longest wait for a batch to fill, default 0 (run what is queued at once)"),
    ("max_queue_size", "--max-queue-size", int, "requests waiting per graph before RESOURCE_EXHAUSTED, default 1024"),
    ("graph_instances", "--graph-instances", int, "onnxruntime sessions per graph, default 1"),
    ("inline_budget_us", "--inline-budget-us", float,
     "cheap merged runs up to this many microseconds run on the event loop, default 500; 0 = never"),
    ("inline_gather_us", "--inline-gather-us", float,
     "such a run waits for a busy event loop's other requests up to this many microseconds, default 2000"),
    ("graph_optimization_level", "--graph-optimization-level", str, "disable, basic, extended or all (default)"),
    ("reload_interval_s", "--reload-interval", float, "seconds between repository polls for new versions, "
                                                      "default 5; 0 = never"),
    ("log_level", "--log-level", str, "DEBUG, INFO, WARNING or ERROR"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``client`` to a top-level parser's subparsers."""
    serve = subparsers.add_parser("serve", help="serve a model repository over gRPC",
                                  description="Serve a model repository over gRPC (genserve.v1 and the Open "
                                              "Inference Protocol v2 on one port, health, reflection) with "
                                              "Prometheus metrics; new versions are picked up while serving; "
                                              "SIGTERM drains.")
    for field, flag, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=text)
    serve.set_defaults(func=run_serve)

    client = subparsers.add_parser("client", help="call a running server",
                                   description="Call a running genserve server. Exit codes: 0 success, "
                                               "1 the server refused the call, 2 bad command line or file.")
    commands = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--host", default="127.0.0.1", help="server address, default 127.0.0.1")
    conn.add_argument("--port", type=int, default=8500, help="server gRPC port, default 8500")
    conn.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, help="model name")
    model.add_argument("--version", type=int, default=0, help="model version, default: the loaded one")
    rows = argparse.ArgumentParser(add_help=False)
    rows.add_argument("--input", required=True, type=Path, help="rows to send: .npy, .csv, or a .png image (one row)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--output", type=Path, help="where to write the result: .npy or .csv")

    p = commands.add_parser("list", parents=[conn], help="models and their state")
    p.set_defaults(func=client_list)
    p = commands.add_parser("info", parents=[conn, model], help="one model's details")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p.set_defaults(func=client_info)
    p = commands.add_parser("score", parents=[conn, model, rows, output], help="log-density per row")
    p.set_defaults(func=client_score)
    p = commands.add_parser("detect", parents=[conn, model, rows, output],
                            help="anomaly score and flag per row (output columns: score, is_anomaly)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, help="flag rows whose score exceeds this")
    choice.add_argument("--contamination", type=float, help="flag this held-out rate, in (0, 1)")
    p.set_defaults(func=client_detect)
    p = commands.add_parser("sample", parents=[conn, model, output], help="draw samples")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the server's noise, default 0")
    p.add_argument("--label", type=int, help="class label for class-conditional models")
    p.add_argument("--length", type=int, default=0,
                   help="sequence length for sequence models (default: the model's own)")
    p.set_defaults(func=client_sample)
    p = commands.add_parser("translate", parents=[conn, model, rows, output],
                            help="map rows to the other domain (--output .png writes the images side by side)")
    p.add_argument("--direction", choices=("a2b", "b2a"), default="a2b", help="default a2b")
    p.set_defaults(func=client_translate)


# ---- serve ---------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serving.config import Settings
    from serving.server import serve_forever

    overrides = {field: getattr(args, field) for field, *_ in _SERVE_FLAGS if getattr(args, field, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e['input']!r})" for e in exc.errors()]
        print("genserve serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return EXIT_USAGE
    if not settings.repo.is_dir():
        print(f"genserve serve: --repo {settings.repo} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    return serve_forever(settings)


# ---- client --------------------------------------------------------------------------------
class UsageError(Exception):
    """A local problem (file missing, unknown extension): exit code 2."""


def read_rows(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".csv":
            return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float32)
        if path.suffix == ".png":
            return read_png(path)[0]
    except ValueError as exc:
        raise UsageError(f"--input {path}: cannot read it: {exc}") from exc
    raise UsageError(f"--input {path}: expected a .npy, .csv or .png file")


def read_png(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """One image as one row [1, C·H·W] in [0, 1] (channel-major, as genserve's image models take
    it), and its shape (H, W) or (H, W, 3). Grayscale stays one channel; anything else is RGB."""
    from PIL import Image

    if not path.is_file():
        raise UsageError(f"--input {path}: no such file")
    try:
        with Image.open(path) as image:
            rgb = image.mode not in ("1", "L", "LA", "I", "I;16", "F")
            pixels = np.asarray(image.convert("RGB" if rgb else "L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise UsageError(f"--input {path}: cannot read it as an image: {exc}") from exc
    return (pixels.transpose(2, 0, 1) if rgb else pixels).reshape(1, -1), pixels.shape


def write_png(path: Path, rows: np.ndarray, shape: tuple[int, ...] | None) -> str:
    """Rows [N, C·H·W] in [0, 1] as one PNG, the N images side by side; ``shape`` as read_png
    returns it, or None for square images (grayscale, or RGB when D / 3 is a square)."""
    from math import isqrt

    from PIL import Image

    d = rows.shape[1] if rows.ndim == 2 else 0
    if shape is None:
        side, side3 = isqrt(d), isqrt(d // 3)
        shape = (side, side) if side * side == d else (side3, side3, 3) if 3 * side3 * side3 == d else None
    if shape is None or d != int(np.prod(shape)):
        raise UsageError(f"--output {path}: cannot lay out rows of shape {list(rows.shape[1:])} as images; "
                         "give a .png --input of the same size, or write .npy")
    h, w, c = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
    images = np.clip(rows.reshape(len(rows), c, h, w), 0.0, 1.0)
    strip = np.rint(images.transpose(2, 0, 3, 1).reshape(h, len(rows) * w, c) * 255).astype(np.uint8)
    Image.fromarray(strip[..., 0] if c == 1 else strip).save(path)
    return f" -> {path}"


def write_array(path: Path | None, array: np.ndarray, header: str = "") -> str:
    """Write ``array`` to ``path`` (.npy as is; .csv one row per line) and return ' -> path'."""
    if path is None:
        return ""
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".csv":
        flat = array.reshape(len(array), -1) if array.ndim != 1 else array
        np.savetxt(path, flat, delimiter=",", fmt="%.9g", header=header, comments="")
    else:
        raise UsageError(f"--output {path}: expected a .npy or .csv file")
    return f" -> {path}"


def _with_client(action: Callable[[Any, argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    """Run ``action(client, args)``, print its summary; map errors to messages and exit codes."""

    def run(args: argparse.Namespace) -> int:
        from serving.client import ClientError, GenServeClient

        allowed = (".npy", ".csv", ".png") if hasattr(args, "direction") else (".npy", ".csv")
        if getattr(args, "output", None) is not None and args.output.suffix not in allowed:
            print(f"error: --output {args.output}: expected a {', '.join(allowed[:-1])} or {allowed[-1]} file",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            with GenServeClient(args.host, args.port, timeout=args.timeout) as client:
                print(action(client, args))
            return 0
        except ClientError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return EXIT_RPC_ERROR
        except (UsageError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    run.__name__ = action.__name__
    return run


@_with_client
def client_list(client: Any, args: argparse.Namespace) -> str:
    models = client.list_models()
    header = ("NAME", "VERSION", "FAMILY", "STATE", "CAPABILITIES / REASON")
    rows = [(m.name, str(m.version), m.family or "-", m.state,
             ", ".join(m.capabilities) if m.state == "AVAILABLE" else m.reason) for m in models]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in [header, *rows]]
    return "\n".join(lines) if rows else "no models in the repository"


@_with_client
def client_info(client: Any, args: argparse.Namespace) -> str:
    import json

    info = client.get_model(args.model, args.version)
    s = info.summary
    if args.json:
        return json.dumps(info.manifest, indent=2)
    lines = [f"{s.name} v{s.version} ({s.family or '-'}): {s.state}"]
    if s.reason:
        lines.append(f"  reason: {s.reason}")
    if s.state == "AVAILABLE":
        lines += [f"  capabilities: {', '.join(s.capabilities)}",
                  f"  input: [N, {', '.join(map(str, info.input_shape))}] {info.input_dtype}",
                  "  providers: " + ", ".join(f"{g}={p}" for g, p in sorted(info.providers.items()))]
        anomaly = info.manifest.get("anomaly")
        if anomaly:
            lines.append(f"  anomaly threshold: {anomaly['threshold']:.6g} at contamination "
                         f"{anomaly['contamination']:g} ({anomaly['method']})")
        for key, value in sorted(info.manifest.get("metrics", {}).items()):
            lines.append(f"  {key}: {value:.6g}")
    return "\n".join(lines)


@_with_client
def client_score(client: Any, args: argparse.Namespace) -> str:
    log_p = client.score(args.model, read_rows(args.input), args.version)
    where = write_array(args.output, log_p, "log_prob")
    finite = log_p[np.isfinite(log_p)]
    stats = (f"mean {finite.mean():.4f}, min {log_p.min():.4f}, max {log_p.max():.4f}" if len(finite)
             else "no finite value")
    return f"scored {len(log_p)} rows with {args.model}: log p {stats}{where}"


@_with_client
def client_detect(client: Any, args: argparse.Namespace) -> str:
    found = client.detect(args.model, read_rows(args.input), args.threshold, args.contamination, args.version)
    table = np.column_stack([found.score.astype(np.float64), found.is_anomaly.astype(np.float64)])
    where = write_array(args.output, table, "score,is_anomaly")
    count = int(found.is_anomaly.sum())
    return (f"{count} of {len(found.score)} rows are anomalies ({count / len(found.score):.1%}) at threshold "
            f"{found.threshold:.6g} ({found.threshold_source}){where}")


@_with_client
def client_sample(client: Any, args: argparse.Namespace) -> str:
    samples = client.sample(args.model, args.n, args.seed, args.label, args.version, length=args.length)
    where = write_array(args.output, samples)
    text = f"drew {len(samples)} samples of shape {list(samples.shape[1:])} from {args.model} (seed {args.seed}){where}"
    if args.output is None:
        text += "\n" + np.array2string(samples[:5], precision=4)
    return text


@_with_client
def client_translate(client: Any, args: argparse.Namespace) -> str:
    x, shape = read_png(args.input) if args.input.suffix == ".png" else (read_rows(args.input), None)
    y = client.translate(args.model, x, args.direction, args.version)
    png = args.output is not None and args.output.suffix == ".png"
    where = write_png(args.output, y, shape) if png else write_array(args.output, y)
    return f"translated {len(y)} rows {args.direction} with {args.model} to shape {list(y.shape[1:])}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.cli", description="genserve serving commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
