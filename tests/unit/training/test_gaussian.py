"""The Gaussian MLE: sample mean, biased covariance, scipy's log-density, unit mass."""

import numpy as np
import pytest
from scipy import integrate, stats

from training.estimators.gaussian import GaussianDensity


def _data(d, n=200, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ a + rng.normal(size=d)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_mle_is_sample_mean_and_biased_covariance(d):
    x = _data(d)
    model = GaussianDensity(reg_covar=0.0).fit(x)
    np.testing.assert_allclose(model.mean_.numpy(), x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.covariance_.numpy(), np.atleast_2d(np.cov(x.T, bias=True)),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_log_prob_equals_scipy(d):
    x = _data(d, seed=1)
    model = GaussianDensity(reg_covar=0.0).fit(x)
    query = _data(d, n=50, seed=2)
    reference = stats.multivariate_normal(x.mean(axis=0), np.cov(x.T, bias=True)).logpdf(query)
    np.testing.assert_allclose(model.score_samples(query), reference, rtol=1e-10)


def test_integrates_to_one_in_1d():
    x = _data(1, seed=3)
    model = GaussianDensity(reg_covar=0.0).fit(x)
    mu, sd = model.mean_[0].item(), model.covariance_[0, 0].item() ** 0.5
    mass, _ = integrate.quad(lambda t: np.exp(model.score_samples([[t]])[0]), mu - 12 * sd, mu + 12 * sd)
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_integrates_to_one_in_2d():
    x = _data(2, seed=4)
    model = GaussianDensity(reg_covar=0.0).fit(x)
    mu, sd = model.mean_.numpy(), np.sqrt(np.diag(model.covariance_.numpy()))
    g0 = np.linspace(mu[0] - 9 * sd[0], mu[0] + 9 * sd[0], 601)
    g1 = np.linspace(mu[1] - 9 * sd[1], mu[1] + 9 * sd[1], 601)
    grid = np.stack(np.meshgrid(g0, g1, indexing="ij"), axis=-1).reshape(-1, 2)
    density = np.exp(model.score_samples(grid)).reshape(601, 601)
    mass = integrate.trapezoid(integrate.trapezoid(density, g1, axis=1), g0)
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_samples_have_the_fitted_moments():
    x = _data(3, seed=5)
    model = GaussianDensity().fit(x)
    s = model.sample(40_000, seed=0).numpy()
    np.testing.assert_allclose(s.mean(axis=0), model.mean_.numpy(), atol=0.05 * x.std())
    np.testing.assert_allclose(np.cov(s.T), model.covariance_.numpy(), atol=0.05 * x.var(axis=0).max())
    np.testing.assert_array_equal(model.sample(10, seed=7).numpy(), model.sample(10, seed=7).numpy())


@pytest.mark.parametrize("reg_covar", [-1.0, "big", None])
def test_bad_reg_covar_is_rejected(reg_covar):
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianDensity(reg_covar=reg_covar).fit(_data(2))


def test_singular_covariance_without_regularisation_is_explained():
    x = np.c_[_data(1), np.ones(200)]
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianDensity(reg_covar=0.0).fit(x)
    assert np.isfinite(GaussianDensity(reg_covar=1e-6).fit(x).score_samples(x)).all()
