"""Online (stepwise) EM: the statistics algebra of dgmm.online and GaussianMixture.partial_fit."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture, chunk
from dgmm.datasets import correlated_mixture
from dgmm.online import blend_statistics, check_learning_decay, reshift_statistics, step_size
from conftest import COVARIANCE_TYPES, make_mixture

N_COMPONENTS, N_FEATURES = 4, 3
TRUE_MEANS = np.random.default_rng(0).normal(scale=4.0, size=(N_COMPONENTS, N_FEATURES))  # correlated_mixture's


def draw(n_samples, rng):
    """Rows from a known mixture: four full-covariance components in 3-D, two of them overlapping."""
    return correlated_mixture(n_samples, rng)


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(2)
    return [draw(2_000, rng) for _ in range(200)]


@pytest.fixture(scope="module")
def held_out():
    return draw(50_000, np.random.default_rng(1))


# ---------------------------------------------------------------------------
# Statistics algebra
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_reshift_equals_statistics_computed_about_the_new_frame(kind):
    X = make_mixture(n_samples=500, n_features=3, offset=1e4, seed=3)
    rng = np.random.default_rng(4)
    resp = rng.dirichlet(np.ones(3), size=X.shape[0])
    center, new_center = X.mean(axis=0) + 0.7, X.mean(axis=0) - 0.4
    shifts, new_shifts = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    old = chunk.statistics_from_resp(X - center, resp, shifts, kind)
    direct = chunk.statistics_from_resp(X - new_center, resp, new_shifts, kind)
    moved = reshift_statistics(old, center, shifts, new_center, new_shifts, kind)
    for name in ("nk", "sx", "sxx", "sy"):
        np.testing.assert_allclose(getattr(moved, name), getattr(direct, name), rtol=1e-9, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_blend_is_the_weighted_average_of_per_row_statistics(kind):
    X = make_mixture(n_samples=300, n_features=2, seed=5)
    resp = np.random.default_rng(6).dirichlet(np.ones(3), size=300)
    shifts = np.zeros((3, 2))
    a = chunk.statistics_from_resp(X[:100], resp[:100], shifts, kind)
    b = chunk.statistics_from_resp(X[100:], resp[100:], shifts, kind)
    zero = chunk.empty_statistics(3, 2, kind)
    blended = blend_statistics(blend_statistics(zero, a, 1.0), b, 0.25)
    for name in ("nk", "sx", "sxx", "sy"):
        expected = 0.75 * getattr(a, name) / 100 + 0.25 * getattr(b, name) / 200
        np.testing.assert_allclose(getattr(blended, name), expected, rtol=1e-12, err_msg=name)
    assert blended.n_samples == 300


def test_step_size_and_learning_decay_validation():
    assert step_size(0, 0.6) == pytest.approx(2**-0.6)
    assert step_size(8, 1.0) == pytest.approx(0.1)
    assert check_learning_decay(1) == 1.0
    for bad in (0.5, 1.01, -1, "0.7", None, True):
        with pytest.raises(ValueError, match=r"The 'learning_decay' parameter of partial_fit must be a float"):
            check_learning_decay(bad)
    with pytest.raises(ValueError, match="learning_decay"):
        GaussianMixture(2).partial_fit(np.zeros((10, 2)), learning_decay=0.3)


# ---------------------------------------------------------------------------
# partial_fit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_stationary_stream_reaches_batch_em_log_likelihood(kind, stream, held_out):
    online = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0)
    for batch in stream:
        online.partial_fit(batch)
    batch_em = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0).fit(np.concatenate(stream))
    online_score, batch_score = online.score(held_out), batch_em.score(held_out)
    assert abs(online_score - batch_score) <= 0.01 * abs(batch_score), (online_score, batch_score)
    assert online.n_iter_ == len(stream)
    assert len(online.lower_bounds_) == len(stream) and online.lower_bound_ == online.lower_bounds_[-1]
    assert not online.converged_
    np.testing.assert_allclose(online.weights_.sum(), 1.0)
    # Later batches score better than the first ones (the model learnt).
    assert np.mean(online.lower_bounds_[-20:]) > np.mean(online.lower_bounds_[:5])


def test_partial_fit_is_deterministic_given_random_state(stream):
    fits = []
    for _ in range(2):
        gm = GaussianMixture(N_COMPONENTS, random_state=7, n_init=2)
        for batch in stream[:30]:
            gm.partial_fit(batch)
        fits.append(gm)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(fits[0], name), getattr(fits[1], name), err_msg=name)
    assert fits[0].lower_bounds_ == fits[1].lower_bounds_


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_dask_batches_give_the_numpy_model_in_one_pass_each(kind, stream):
    batches = stream[:15]
    on_numpy = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0)
    on_dask = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0, split_every=3)
    for batch in batches:
        on_numpy.partial_fit(batch)
        on_dask.partial_fit(da.from_array(batch, chunks=(37, N_FEATURES)))
        assert on_dask.n_passes_ >= 1
    assert on_dask.n_passes_ == 1  # a later batch: one E-step pass over its 55 chunks
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(on_dask, name), getattr(on_numpy, name), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(on_dask.lower_bounds_, on_numpy.lower_bounds_, rtol=1e-10)
    # Mixed: numpy and dask batches in one stream.
    mixed = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0)
    for i, batch in enumerate(batches):
        mixed.partial_fit(batch if i % 2 else da.from_array(batch, chunks=(500, N_FEATURES)))
    np.testing.assert_allclose(mixed.means_, on_numpy.means_, rtol=1e-8)


def test_float32_batches_keep_float32_attributes(stream):
    gm64 = GaussianMixture(N_COMPONENTS, random_state=0)
    gm32 = GaussianMixture(N_COMPONENTS, random_state=0)
    for batch in stream[:20]:
        gm64.partial_fit(batch)
        gm32.partial_fit(batch.astype(np.float32))
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert getattr(gm32, name).dtype == np.float32, name
    np.testing.assert_allclose(gm32.means_, gm64.means_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gm32.covariances_, gm64.covariances_, rtol=1e-3, atol=1e-3)


def test_wrong_number_of_features_on_a_later_batch_raises_and_keeps_the_model(stream):
    gm = GaussianMixture(N_COMPONENTS, random_state=0).partial_fit(stream[0])
    means = gm.means_.copy()
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3 features as input"):
        gm.partial_fit(stream[1][:, :2])
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3 features as input"):
        gm.partial_fit(da.from_array(stream[1][:, :2], chunks=(500, 2)))
    np.testing.assert_array_equal(gm.means_, means)
    assert gm.n_iter_ == 1
    gm.partial_fit(stream[1])
    assert gm.n_iter_ == 2


def test_nonfinite_batch_raises_and_keeps_the_model(stream):
    gm = GaussianMixture(N_COMPONENTS, random_state=0).partial_fit(stream[0])
    means = gm.means_.copy()
    bad = stream[1].copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gm.partial_fit(da.from_array(bad, chunks=(300, N_FEATURES)))
    np.testing.assert_array_equal(gm.means_, means)
    assert gm.n_iter_ == 1


def test_first_batch_needs_n_components_rows():
    with pytest.raises(ValueError, match="Expected n_samples >= n_components"):
        GaussianMixture(5).partial_fit(np.random.default_rng(0).normal(size=(4, 2)))


def test_a_failed_step_keeps_the_history_and_a_failed_first_step_leaves_the_estimator_unfitted(stream):
    from sklearn.exceptions import NotFittedError

    collapsed = np.ones((20, N_FEATURES))  # one point: a singular covariance with reg_covar=0
    gm = GaussianMixture(N_COMPONENTS, random_state=0, reg_covar=0.0).fit(np.concatenate(stream[:4]))
    history = list(gm.lower_bounds_)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        gm.partial_fit(collapsed)
    assert gm.lower_bounds_ == history and len(history) > 1
    fresh = GaussianMixture(2, random_state=0, reg_covar=0.0)
    with pytest.raises(ValueError):
        fresh.partial_fit(collapsed)
    assert not hasattr(fresh, "n_features_in_")
    with pytest.raises(NotFittedError):
        fresh.predict(stream[0])


def test_set_params_between_steps(stream):
    """reg_covar applies from the next step; another n_components or covariance_type is refused (use fit)."""
    gm = GaussianMixture(N_COMPONENTS, random_state=0).partial_fit(stream[0])
    gm.partial_fit(stream[1])
    gm.set_params(reg_covar=10.0).partial_fit(stream[2])
    assert np.all(np.diagonal(gm.covariances_, axis1=1, axis2=2) > 10.0) and gm.n_iter_ == 3
    for change in ({"covariance_type": "diag"}, {"n_components": N_COMPONENTS + 1}):
        with pytest.raises(ValueError, match=r"partial_fit continues the fitted model \(4 components, 'full' "
                                             r"covariances\), but the estimator's parameters are now"):
            GaussianMixture(N_COMPONENTS, random_state=0).partial_fit(stream[0]).set_params(**change).partial_fit(
                stream[1])
    fitted = GaussianMixture(N_COMPONENTS, random_state=0).fit(stream[0])
    with pytest.raises(ValueError, match=r"\(4 components, covariances of shape \(4, 3, 3\)\), .*"
                                         "covariance_type='spherical'"):
        fitted.set_params(covariance_type="spherical").partial_fit(stream[1])


def test_partial_fit_after_fit_continues_from_the_fitted_model(stream):
    gm = GaussianMixture(N_COMPONENTS, random_state=0).fit(np.concatenate(stream[:10]))
    before = gm.score(stream[50])
    gm.partial_fit(stream[10])
    assert gm.n_iter_ == 1 and len(gm.lower_bounds_) == 1
    # The first online step scores its batch under the fitted parameters.
    assert gm.lower_bound_ == pytest.approx(GaussianMixture(N_COMPONENTS, random_state=0).fit(
        np.concatenate(stream[:10])).score(stream[10]), rel=1e-12)
    assert abs(gm.score(stream[50]) - before) < 0.01 * abs(before)


def test_init_arrays_and_callbacks(stream):
    seen = []
    means_init = TRUE_MEANS + 0.5
    gm = GaussianMixture(N_COMPONENTS, means_init=means_init, callbacks=seen.append, random_state=0)
    gm.partial_fit(stream[0]).partial_fit(stream[1])
    assert [info.n_iter for info in seen] == [1, 2]
    assert seen[1].n_samples == 2_000 and not seen[1].converged
    assert seen[1].lower_bound == gm.lower_bound_
    np.testing.assert_allclose(means_init, TRUE_MEANS + 0.5)  # never modified


def _start(kind, X):
    """Fixed starting parameters (no initialisation randomness) for a partial_fit stream."""
    ref = GaussianMixture(N_COMPONENTS, covariance_type=kind, max_iter=2, random_state=0).fit(X)
    return dict(weights_init=ref.weights_, means_init=ref.means_, precisions_init=ref.precisions_)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_partial_fit_integer_weights_equal_repeated_rows_and_zero_weights_dropped_rows(kind):
    rng = np.random.default_rng(7)
    batches = [draw(600, rng) for _ in range(3)]
    start = _start(kind, batches[0])
    weighted = GaussianMixture(N_COMPONENTS, covariance_type=kind, **start)
    repeated = GaussianMixture(N_COMPONENTS, covariance_type=kind, **start)
    for i, X in enumerate(batches):
        w = rng.integers(0, 4, size=len(X))  # zeros drop rows, 2 and 3 repeat them
        Xw = X if i % 2 == 0 else da.from_array(X, chunks=173)  # NumPy and lazy batches
        ww = w if i % 2 == 0 else da.from_array(w, chunks=173)
        weighted.partial_fit(Xw, sample_weight=ww)
        repeated.partial_fit(np.repeat(X, w, axis=0))
        np.testing.assert_allclose(weighted.lower_bound_, repeated.lower_bound_, rtol=1e-8)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(weighted, name), getattr(repeated, name), rtol=1e-8, atol=1e-10)


def test_partial_fit_rejects_bad_sample_weight():
    X = draw(100, np.random.default_rng(8))
    gm = GaussianMixture(N_COMPONENTS, random_state=0)
    with pytest.raises(ValueError, match="expected"):
        gm.partial_fit(X, sample_weight=np.ones(99))
    assert not hasattr(gm, "means_")  # nothing half-done
