"""Cross-fitted anomaly thresholds flag the intended share of unseen normal rows."""

import numpy as np
import pytest

from training.calibration import calibrate, calibration_from_scores, cross_fitted_scores
from training.estimators.gaussian import GaussianDensity


def test_threshold_flags_about_the_contamination_rate_on_fresh_normal_rows():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    train = rng.multivariate_normal([0, 0], cov, size=4000)
    fresh = rng.multivariate_normal([0, 0], cov, size=20000)
    calibration = calibrate(GaussianDensity, train, contamination=0.05)
    model = GaussianDensity().fit(train)
    flagged = np.mean(-model.score_samples(fresh) > calibration.threshold)
    assert abs(flagged - 0.05) < 0.01


def test_every_row_is_scored_by_a_model_that_did_not_see_it():
    # Ten distinct clusters of two identical points: a model that saw a row's twin but not the row
    # itself still scores it well, yet a row scored by a model fitted on itself would be scored
    # identically to in-sample. Use exact equality to in-sample scores as the witness.
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 3))
    in_sample = -GaussianDensity().fit(X).score_samples(X)
    out_of_fold = cross_fitted_scores(GaussianDensity, X, folds=5)
    assert np.all(out_of_fold != in_sample)
    assert out_of_fold.mean() > in_sample.mean()  # unseen rows look less likely


def test_quantile_table_is_monotone_and_threshold_matches_numpy_quantile():
    scores = np.random.default_rng(3).gamma(2.0, size=5000)
    table = calibration_from_scores(scores, 0.01, "test")
    assert table.threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-3)
    assert table.threshold_at(0.5) == pytest.approx(np.median(scores), rel=1e-3)
    assert np.all(np.diff(table.quantiles) >= 0)


def test_infinite_scores_stay_finite_in_the_table_and_bad_rates_are_refused():
    scores = np.r_[np.zeros(98), np.inf, np.inf]
    table = calibration_from_scores(scores, 0.01, "test")
    assert np.isfinite(table.quantiles).all() and table.threshold > 1e300
    with pytest.raises(ValueError, match="contamination"):
        calibration_from_scores(scores, 1.5, "test")
    with pytest.raises(ValueError, match="folds"):
        cross_fitted_scores(GaussianDensity, np.zeros((3, 1)), folds=5)
