"""Every other registered family, published by the training pipeline and served over gRPC.

The served log-density equals the training estimator's, including -inf where a family gives zero
density (histogram cells, a compact kernel's support), which DetectAnomalies flags with score
+inf; the served samples equal ``estimator.sample(n, seed)``. Families whose module does not exist
yet are skipped; a family that exists but fails to publish fails here.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

# Fast settings on grid25: no cross-validated searches.
FAMILY_PARAMS = {
    "histogram": {},
    "knn": {"k": 10},
    "kde": {"bandwidth": 0.1},
    "gmm": {"n_components": 25, "covariance_type": "diag"},
}
OUTSIDE = np.array([[100.0, 100.0], [-80.0, 3.0]], dtype=np.float32)


def _family_exists(name: str) -> bool:
    from training import registry

    if name not in registry.FAMILIES:
        return False
    module = registry.FAMILIES[name].target.split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return False
        raise
    return True


def publish(family: str, repo) -> tuple:
    """Publish ``family`` on grid25 into ``repo``; return its manifest and the refitted estimator."""
    from training import datasets, registry
    from training.pipeline import train_and_publish

    _, manifest = train_and_publish(family, "grid25", repo, f"grid25-{family}", params=FAMILY_PARAMS[family],
                                    calibration_folds=2, log=lambda line: None)
    # Refit with the published hyper-parameters: every family is deterministic given them.
    data = datasets.load("grid25")
    estimator = registry.get(family).create(**manifest.hyperparameters).fit(data.X_train)
    return manifest, estimator, data.X_test[:300].astype(np.float32)


@pytest.mark.parametrize("family", sorted(FAMILY_PARAMS))
def test_family_served_like_its_estimator(family, fresh_server, tmp_path):
    if not _family_exists(family):
        pytest.skip(f"family {family!r} is not implemented yet")
    manifest, estimator, x = publish(family, tmp_path)
    handle = fresh_server(tmp_path).start()
    client = handle.client()
    name = manifest.name
    assert {m.name: m.state for m in client.list_models()}[name] == "AVAILABLE"

    rows = np.concatenate([x, OUTSIDE])
    served = client.score(name, rows)
    expected = estimator.log_prob(rows.astype(np.float64)).numpy()
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(served), finite)
    np.testing.assert_array_equal(served[~finite], expected[~finite])  # -inf where the density is 0
    np.testing.assert_allclose(served[finite], expected[finite], rtol=1e-4, atol=1e-4)

    found = client.detect(name, rows)
    np.testing.assert_array_equal(found.is_anomaly, ~(found.score <= found.threshold))
    assert found.is_anomaly[-len(OUTSIDE):].all()

    if "sample" in manifest.capabilities:
        a = client.sample(name, n=200, seed=3)
        np.testing.assert_array_equal(a, client.sample(name, n=200, seed=3))
        np.testing.assert_allclose(a, estimator.sample(200, seed=3).numpy(), rtol=1e-4, atol=1e-4)
