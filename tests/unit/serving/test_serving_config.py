"""Settings: defaults, environment and explicit overrides, validation messages."""

from __future__ import annotations

import onnxruntime
import pytest
from pydantic import ValidationError

from serving.config import CPU, SINGLE_RUNNER_INLINE_BUDGET_US, Settings, default_providers


def test_defaults(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("GENSERVE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 8500, 9100)
    assert s.max_message_bytes == 64 * 1024 * 1024
    assert s.intra_op_threads == 1 and s.worker_threads >= 1
    assert s.providers == default_providers()
    assert s.providers[-1] == CPU and set(s.providers) <= set(onnxruntime.get_available_providers())
    assert s.metrics_address == s.host
    assert ("grpc.max_receive_message_length", s.max_message_bytes) in s.grpc_options()


def test_environment_then_explicit_values(monkeypatch, tmp_path):
    monkeypatch.setenv("GENSERVE_REPO", str(tmp_path))
    monkeypatch.setenv("GENSERVE_PORT", "1234")
    monkeypatch.setenv("GENSERVE_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("GENSERVE_LOG_LEVEL", "debug")
    s = Settings()
    assert (s.repo, s.port, s.providers, s.log_level) == (tmp_path, 1234, [CPU], "DEBUG")
    assert Settings(port=4321).port == 4321  # a CLI flag beats the environment


@pytest.mark.parametrize("overrides, field, phrase", [
    ({"providers": "NoSuchExecutionProvider"}, "providers", "not offered by this onnxruntime build"),
    ({"providers": ""}, "providers", "at least one execution provider"),
    ({"providers": "CPUExecutionProvider,CPUExecutionProvider"}, "providers", "each provider once"),
    ({"port": 70000}, "port", "less than or equal to 65535"),
    ({"metrics_port": -1}, "metrics_port", "greater than or equal to 0"),
    ({"port": 9000, "metrics_port": 9000}, "", "port and metrics_port must differ"),
    ({"log_level": "LOUD"}, "log_level", "expected DEBUG, INFO"),
    ({"max_rows_per_request": 0}, "max_rows_per_request", "greater than or equal to 1"),
    ({"max_message_bytes": 10}, "max_message_bytes", "greater than or equal to"),
    ({"drain_seconds": -1}, "drain_seconds", "greater than or equal to 0"),
    ({"max_connection_age_s": -1}, "max_connection_age_s", "greater than or equal to 0"),
    ({"no_such_setting": 1}, "no_such_setting", "Extra inputs are not permitted"),
])
def test_invalid_settings_name_the_field(overrides, field, phrase):
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)
    text = str(info.value)
    assert field in text and phrase in text, text


def test_default_providers_ask_for_cuda_only_where_a_gpu_is_present(monkeypatch):
    from serving import config

    monkeypatch.setattr(config, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(config, "nvidia_device_present", lambda: False)
    assert config.default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(config, "nvidia_device_present", lambda: True)
    assert config.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_event_loop_choice(monkeypatch):
    """auto takes uvloop where it is installed and asyncio's loop where not; asking for uvloop
    without it is an error naming the setting, not a silent fallback."""
    import sys

    import uvloop

    from serving.server import event_loop_factory

    assert Settings().event_loop == "auto"
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop_factory("auto") is None
    with pytest.raises(RuntimeError, match="event_loop: uvloop is not installed"):
        event_loop_factory("uvloop")


def test_workers_share_the_cores_unless_worker_threads_is_given(monkeypatch):
    monkeypatch.delenv("GENSERVE_WORKER_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Settings().worker_threads == 8
    assert Settings(workers=2).worker_threads == 4
    assert Settings(workers=3).worker_threads == 2
    assert Settings(workers=16).worker_threads == 1
    assert Settings(workers=2, worker_threads=8).worker_threads == 8  # explicit wins
    monkeypatch.setenv("GENSERVE_WORKER_THREADS", "6")
    assert Settings(workers=2).worker_threads == 6
    # A worker process gets its settings as JSON (serve_forever): an explicit value survives that.
    monkeypatch.delenv("GENSERVE_WORKER_THREADS")
    assert Settings.model_validate_json(Settings(workers=2, worker_threads=8).model_dump_json()).worker_threads == 8


def test_one_runner_per_process_keeps_runs_of_a_few_ms_on_the_event_loop(monkeypatch):
    monkeypatch.delenv("GENSERVE_WORKER_THREADS", raising=False)
    monkeypatch.delenv("GENSERVE_INLINE_BUDGET_US", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert Settings().inline_budget_us == 500.0  # two runners: a run may overlap the loop's work
    assert Settings(workers=2).inline_budget_us == SINGLE_RUNNER_INLINE_BUDGET_US
    assert Settings(worker_threads=1).inline_budget_us == SINGLE_RUNNER_INLINE_BUDGET_US
    assert Settings(workers=2, inline_budget_us=300).inline_budget_us == 300.0  # explicit wins


def test_server_options_ask_old_connections_to_go_only_when_an_age_is_set(tmp_path):
    """gRPC's own channel arguments (milliseconds), so that grpc core sends the GOAWAY itself."""
    plain = dict(Settings(repo=tmp_path).server_grpc_options())
    assert plain["grpc.so_reuseport"] == 0 and "grpc.max_connection_age_ms" not in plain
    aged = dict(Settings(repo=tmp_path, workers=2, max_connection_age_s=30.0,
                         max_connection_age_grace_s=2.5).server_grpc_options())
    assert aged["grpc.so_reuseport"] == 1
    assert (aged["grpc.max_connection_age_ms"], aged["grpc.max_connection_age_grace_ms"]) == (30_000, 2_500)
    assert aged["grpc.max_receive_message_length"] == 64 * 1024 * 1024
