"""Prometheus metrics of one server (DESIGN.md §5), on their own registry and HTTP port.

Why a registry per server and not the global one: several servers in one process (the tests,
an embedding application) would otherwise collide on metric names. Why label values are
bounded: the ``model`` label of a request naming an unknown model is ``_unknown``, so a client
sending random names cannot grow the series without limit; ``method`` is one of the RPC names
and ``code`` a gRPC status code name.

The histograms are ``serving.histograms.FoldingHistogram``: observing one is an append, and the
values are binned when ``/metrics`` is scraped (``prometheus_client.Histogram.observe`` cost
~2 µs each, five times per ModelInfer request). ``genserve_anomaly_score`` takes a whole batch of
rows per observation.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

from serving.histograms import FoldingHistogram

UNKNOWN_MODEL = "_unknown"
METHODS = ("ListModels", "GetModel", "ScoreDensity", "DetectAnomalies", "Sample", "Translate")
OIP_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
               "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
               "RepositoryModelUnload")
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
# -log p in nats: negative for densities above 1 (e.g. scaled images), large for outliers.
SCORE_BUCKETS = (-1000.0, -500.0, -200.0, -100.0, -50.0, -20.0, -10.0, -5.0, -2.0, 0.0, 2.0, 5.0,
                 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: no access log
        pass


class Metrics:
    """The metrics of DESIGN.md §5; also the runtime's ``RunObserver`` (queue and run timings)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("genserve_requests_total", "RPCs handled, by method, model and status code",
                                ["method", "model", "code"], registry=r)
        self.request_duration = FoldingHistogram(
            "genserve_request_duration_seconds", "RPC latency, arrival to answer", ["method", "model"],
            LATENCY_BUCKETS, r)
        self.inference_duration = FoldingHistogram(
            "genserve_inference_duration_seconds", "one onnxruntime session run", ["model", "graph"],
            LATENCY_BUCKETS, r)
        self.queue_duration = FoldingHistogram(
            "genserve_queue_duration_seconds", "time a request waited in a graph's batch queue before its run started",
            ["model", "graph"], LATENCY_BUCKETS, r)
        self.batch_rows = FoldingHistogram("genserve_batch_rows", "rows per session run (a merged batch)",
                                           ["model", "graph"], ROW_BUCKETS, r)
        self.batch_requests = FoldingHistogram("genserve_batch_requests", "requests merged into one session run",
                                               ["model", "graph"], REQUEST_BUCKETS, r)
        self.rows = Counter("genserve_rows_total", "rows scored, detected, sampled or translated",
                            ["method", "model"], registry=r)
        self.anomaly_score = FoldingHistogram("genserve_anomaly_score", "anomaly scores (-log p) of detected rows",
                                              ("model",), SCORE_BUCKETS, r)
        self.anomalies = Counter("genserve_anomalies_total", "rows flagged as anomalies", ["model"], registry=r)
        self.model_info = Gauge("genserve_model_info", "loaded model version, family and execution provider",
                                ["model", "version", "family", "provider"], registry=r)
        self.model_load = Gauge("genserve_model_load_seconds", "time to load and warm up a model", ["model"],
                                registry=r)
        self._known: frozenset[str] = frozenset()
        # Labelled children by (metric, label values): ``labels()`` validates and hashes its
        # arguments under a lock on every call (~10 µs here), several times per request; the
        # label sets are bounded (see model_label), so the children are kept.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._http = None
        self._thread: threading.Thread | None = None

    # ---- label hygiene -------------------------------------------------------------------
    def set_known_models(self, names: Iterable[str]) -> None:
        self._known = frozenset(names)

    def model_label(self, name: str) -> str:
        return name if name in self._known else UNKNOWN_MODEL

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ---- recording -----------------------------------------------------------------------
    def model_loaded(self, name: str, version: int, family: str, provider: str, seconds: float) -> None:
        self.model_info.labels(name, str(version), family, provider).set(1)
        self.model_load.labels(name).set(seconds)

    def model_unloaded(self, name: str, version: int, family: str, provider: str) -> None:
        """A version stopped serving (replaced or unloaded): its info series goes away."""
        try:
            self.model_info.remove(name, str(version), family, provider)
        except KeyError:
            pass

    def request_done(self, method: str, model: str, code: str, seconds: float) -> None:
        label = self.model_label(model) if model else ""
        self._child(self.requests, method, label, code).inc()
        self._child(self.request_duration, method, label).observe(seconds)

    def rows_done(self, method: str, model: str, rows: int) -> None:
        self._child(self.rows, method, self.model_label(model)).inc(rows)

    def anomalies_detected(self, model: str, scores: np.ndarray, flags: np.ndarray) -> None:
        label = self.model_label(model)
        self._child(self.anomaly_score, label).observe_many(scores)
        self._child(self.anomalies, label).inc(int(np.count_nonzero(flags)))

    # RunObserver
    def queued(self, model: str, graph: str, seconds: float) -> None:
        self._child(self.queue_duration, self.model_label(model), graph).observe(seconds)

    def ran(self, model: str, graph: str, rows: int, seconds: float) -> None:
        label = self.model_label(model)
        self._child(self.inference_duration, label, graph).observe(seconds)
        self._child(self.batch_rows, label, graph).observe(rows)

    def merged(self, model: str, graph: str, requests: int) -> None:
        self._child(self.batch_requests, self.model_label(model), graph).observe(requests)

    # ---- exposition ----------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (``/metrics``) in a daemon thread; return the bound port.

        Like ``prometheus_client.start_http_server``, but polling for shutdown every 50 ms
        rather than 500 ms, so that stopping a server (and every test) does not wait half a second.
        """
        server_class = type("MetricsServer", (_MetricsHTTPServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._http = make_server(host.strip("[]"), port, make_wsgi_app(self.registry), server_class,
                                 handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="genserve-metrics", daemon=True)
        self._thread.start()
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
