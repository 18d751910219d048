"""Hot reload: a new version published while clients call the model is swapped in with no failed request."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from oip_helpers import client, copy_repo, infer_input
from serving.repository.layout import publish_version

G = "grid25-gaussian"


def _publish_copy(repo, source_version: int) -> None:
    """Publish the next version of G atomically (a copy of ``source_version`` with its number changed)."""
    source = repo / G / str(source_version)

    def write(folder, version):
        for path in source.iterdir():
            shutil.copy2(path, folder / path.name)
        data = json.loads((folder / "manifest.json").read_text())
        data["version"] = version
        (folder / "manifest.json").write_text(json.dumps(data))

    publish_version(repo, G, write)


def test_new_version_swaps_in_under_load_without_a_failed_request(fresh_server, serving_repo, tmp_path):
    repo = tmp_path / "repo"
    (repo / G).mkdir(parents=True)
    shutil.copytree(serving_repo.path / G / "1", repo / G / "1")
    handle = fresh_server(repo, reload_interval_s=0.1).start()
    port = handle.server.port
    x = serving_repo.X_test[:8].astype(np.float32)
    expected = serving_repo.estimator.log_prob(x.astype(np.float64)).numpy()
    seen: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> int:
        c = client(port)
        domain = handle.client()
        calls = 0
        try:
            while not stop.is_set() and calls < 2000:  # bounded in count and (below) in time
                try:
                    if worker % 2:
                        result = c.infer(G, [infer_input("x", x)], client_timeout=10)
                        version, got = result.get_response().model_version, result.as_numpy("log_prob")
                    else:
                        got, version = domain.score(G, x), "?"
                    np.testing.assert_allclose(got, expected, rtol=1e-5)
                    with lock:
                        seen[version] = seen.get(version, 0) + 1
                except Exception as exc:  # every failure is recorded, none may happen
                    errors.append(f"{type(exc).__name__}: {exc}")
                calls += 1
        finally:
            c.close()
        return calls

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, i) for i in range(4)]
        time.sleep(0.5)
        _publish_copy(repo, 1)
        c = client(port)
        deadline = time.monotonic() + 20
        while not c.is_model_ready(G, "2") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # keep calling the new version a little
        stop.set()
        calls = sum(w.result(30) for w in workers)
    assert not errors, errors[:5]
    assert calls > 20
    assert seen.get("1", 0) > 0 and seen.get("2", 0) > 0, seen
    assert c.is_model_ready(G, "2") and not c.is_model_ready(G, "1")
    assert handle.server.manager.reloads == 1
    # A rollback: removing the highest version serves the previous one again.
    shutil.rmtree(repo / G / "2")
    deadline = time.monotonic() + 20
    while not c.is_model_ready(G, "1") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.is_model_ready(G, "1")
    c.close()


def test_a_broken_new_version_keeps_the_old_one_serving(fresh_server, serving_repo, tmp_path):
    repo = copy_repo(serving_repo.path, tmp_path / "repo", [G])  # versions 1 and 2
    handle = fresh_server(repo, reload_interval_s=0).start()
    (repo / G / "3").mkdir()
    (repo / G / "3" / "manifest.json").write_text("{")
    touched = handle.call(handle.server.manager.poll_once())
    assert touched == [G]
    c = client(handle.server.port)
    assert c.is_model_ready(G, "2")
    assert "not valid JSON" in handle.server.manager.last_error[G]
    assert c.infer(G, [infer_input("x", np.zeros((1, 2), np.float32))]).get_response().model_version == "2"
    assert handle.call(handle.server.manager.poll_once()) == []  # tried once, not on every poll
    c.close()
