"""dgmm follows sklearn's EM trajectory given identical initial parameters."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from dgmm import GaussianMixture
from conftest import COVARIANCE_TYPES, make_mixture, perturbed_init

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")


def assert_same_model(a, b, rtol, atol=0.0):
    for name in FITTED:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, err_msg=name)
    np.testing.assert_allclose(a.lower_bound_, b.lower_bound_, rtol=rtol)
    assert a.n_iter_ == b.n_iter_
    assert a.converged_ == b.converged_


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("offset_sigmas", [0.0, 50.0])
@pytest.mark.parametrize("as_dask", [False, True], ids=["numpy", "dask37"])
def test_same_trajectory_as_sklearn(kind, offset_sigmas, as_dask):
    X = make_mixture(n_samples=600, n_features=3)
    X = X + offset_sigmas * X.std()
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=1e-6, max_iter=500)
    sk = SkGaussianMixture(3, **kwargs).fit(X)
    Xin = da.from_array(X, chunks=(37, 3)) if as_dask else X
    gm = GaussianMixture(3, **kwargs).fit(Xin)
    assert sk.n_iter_ > 3  # a real trajectory, not a one-step fit
    assert_same_model(gm, sk, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gm.lower_bounds_, sk.lower_bounds_, rtol=1e-6)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_far_offset_stays_accurate_against_centred_reference(kind):
    """At 1e7 standard deviations from the origin sklearn's raw moments lose digits; dgmm must not."""
    X0 = make_mixture(n_samples=600, n_features=3, seed=5)
    offset = np.array([1e7, -3e7, 2e7])
    X = X0 + offset
    Xc = X - offset  # the centred reference sees the same float64 rows, shifted back exactly
    w, m, p = perturbed_init(Xc, kind)
    common = dict(covariance_type=kind, weights_init=w, precisions_init=p, tol=1e-6, max_iter=500)
    ref = SkGaussianMixture(3, means_init=m, **common).fit(Xc)
    gm = GaussianMixture(3, means_init=m + offset, **common).fit(da.from_array(X, chunks=(37, 3)))
    np.testing.assert_allclose(gm.means_ - offset, ref.means_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gm.covariances_, ref.covariances_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gm.weights_, ref.weights_, rtol=1e-6)
    assert gm.n_iter_ == ref.n_iter_


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("kind", ["full", "tied"])
def test_same_initialisation_as_sklearn_on_small_data(init_params, kind):
    X = make_mixture(n_samples=400, n_features=2, seed=7)
    kwargs = dict(covariance_type=kind, init_params=init_params, random_state=3, n_init=2, tol=1e-5, max_iter=300)
    sk = SkGaussianMixture(3, **kwargs).fit(X)
    gm = GaussianMixture(3, **kwargs).fit(X)
    assert_same_model(gm, sk, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("as_dask", [False, True], ids=["numpy", "dask"])
def test_random_init_draws_sklearns_responsibilities(kind, as_dask):
    """'random' on data seeded in memory: sklearn's uniform draws, so the same EM path, and the
    shared random state left where sklearn leaves it."""
    X = make_mixture(n_samples=900, n_features=3, seed=21)
    ours, theirs = np.random.RandomState(5), np.random.RandomState(5)
    # tol 1e-5: at 1e-8 both restarts reach one optimum, tied within chunk.TIE_RTOL, and the tie goes to the first
    kwargs = dict(covariance_type=kind, init_params="random", n_init=2, tol=1e-5, max_iter=500)
    sk = SkGaussianMixture(3, random_state=theirs, **kwargs).fit(X)
    data = da.from_array(X, chunks=(128, 3)) if as_dask else X
    gm = GaussianMixture(3, random_state=ours, **kwargs).fit(data)
    assert gm.n_iter_ == sk.n_iter_
    assert_same_model(gm, sk, rtol=1e-10, atol=1e-12)
    assert ours.randint(2**31) == theirs.randint(2**31)


def test_warm_start_continues_like_sklearn(recwarn):
    X = make_mixture(n_samples=500, n_features=2, seed=8)
    w, m, p = perturbed_init(X, "full")
    kwargs = dict(weights_init=w, means_init=m, precisions_init=p, max_iter=2, warm_start=True, tol=0.0)
    sk = SkGaussianMixture(3, **kwargs)
    gm = GaussianMixture(3, **kwargs)
    for _ in range(3):
        sk.fit(X)
        gm.fit(da.from_array(X, chunks=(91, 2)))
        assert_same_model(gm, sk, rtol=1e-6, atol=1e-9)


def test_max_iter_zero_returns_initial_parameters():
    X = make_mixture(n_samples=300, n_features=2)
    w, m, p = perturbed_init(X, "diag")
    gm = GaussianMixture(3, covariance_type="diag", weights_init=w, means_init=m, precisions_init=p, max_iter=0)
    gm.fit(X)
    np.testing.assert_allclose(gm.means_, m)
    np.testing.assert_allclose(gm.precisions_, p)
    assert gm.n_iter_ == 0 and gm.lower_bounds_ == []


def test_scores_and_criteria_match_sklearn():
    X = make_mixture(n_samples=500, n_features=3, seed=9)
    sk = SkGaussianMixture(3, random_state=0).fit(X)
    gm = GaussianMixture(3, random_state=0).fit(X)
    Xd = da.from_array(X, chunks=(37, 3))
    np.testing.assert_allclose(gm.score_samples(X), sk.score_samples(X), rtol=1e-8)
    np.testing.assert_allclose(gm.predict_proba(Xd).compute(), sk.predict_proba(X), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(gm.predict(Xd).compute(), sk.predict(X))
    for method in ("score", "bic", "aic"):
        value = getattr(gm, method)(Xd)
        assert isinstance(value, float)
        np.testing.assert_allclose(value, getattr(sk, method)(X), rtol=1e-9)
    Xs, ys = gm.sample(50)
    Xk, yk = sk.sample(50)
    np.testing.assert_allclose(Xs, Xk, rtol=1e-8)
    np.testing.assert_array_equal(ys, yk)


def test_sample_refuses_counts_that_are_not_positive_ints():
    """sklearn's ValueError below one sample (naming the count asked for, where sklearn names
    n_components); a count that is not an int is a TypeError saying so (it read "Invalid value
    for 'n_samples': 3 ." for the string '3')."""
    gm = GaussianMixture(3, random_state=0).fit(make_mixture(n_samples=300, n_features=2, seed=1))
    for n in (0, -1):
        with pytest.raises(ValueError, match=rf"Invalid value for 'n_samples': {n} \. The sampling requires at least"):
            gm.sample(n)
    for n in ("3", 2.5, True, None):
        with pytest.raises(TypeError, match=rf"n_samples must be an int, got {re.escape(repr(n))}"):
            gm.sample(n)
    assert gm.sample(np.int64(4))[0].shape == (4, 2)


def test_complex_dask_input_gets_sklearns_message():
    X = make_mixture(n_samples=200, n_features=2, seed=1).astype(np.complex128)
    with pytest.raises(ValueError, match="Complex data not supported"):
        SkGaussianMixture(2).fit(X)
    for method in ("fit", "score"):
        gm = GaussianMixture(2).fit(X.real) if method == "score" else GaussianMixture(2)
        with pytest.raises(ValueError, match=r"^Complex data not supported: X has dtype complex128\.$"):
            getattr(gm, method)(da.from_array(X, chunks=50))


def test_nonfinite_row_in_lazy_predictions_is_named_in_one_sentence():
    """A one-row chunk reads 'row 5 has', not '1 of the 1 rows 5-5 have'."""
    X = make_mixture(n_samples=300, n_features=2, seed=1)
    gm = GaussianMixture(2, random_state=0).fit(X)
    X[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"Input X contains NaN or infinity: row 5 has non-finite values\. Remove "):
        gm.predict(da.from_array(X, chunks=1)).compute()
    with pytest.raises(ValueError, match=r"contains NaN or infinity: 1 of the 10 rows 0-9 has non-finite values "
                                         r"\(first at row 5\)\. Remove or impute them, or write predictions"):
        gm.score_samples(da.from_array(X, chunks=10)).compute()


@pytest.mark.parametrize("verbose", [1, 2])
def test_verbose_output_without_iterations_reads_as_sklearns(capsys, verbose):
    """max_iter=0: each restart's "Initialization i" line (dgmm printed the first one only)."""
    X = make_mixture(n_samples=300, n_features=2, seed=23)
    for cls in (SkGaussianMixture, GaussianMixture):
        cls(2, n_init=3, max_iter=0, verbose=verbose, random_state=0).fit(X)
    sklearn_out, dgmm_out = capsys.readouterr().out.split("Initialization 0\n")[1:]
    assert "Initialization 0\n" + dgmm_out == "Initialization 0\n" + sklearn_out == \
        "Initialization 0\nInitialization 1\nInitialization 2\n"


@pytest.mark.parametrize("n_init, verbose, interval", [(1, 1, 3), (1, 2, 2), (3, 2, 2), (3, 1, 1)])
def test_verbose_output_reads_as_sklearns(capsys, n_init, verbose, interval):
    """The same lines in the same order: restarts that run together are printed one after another, as sklearn's."""
    import re
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X = make_mixture(n_samples=900, n_features=3, seed=22)
    kwargs = dict(n_init=n_init, verbose=verbose, verbose_interval=interval, init_params="random_from_data",
                  max_iter=7, random_state=0)
    printed = []
    for cls in (SkGaussianMixture, GaussianMixture):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            cls(3, **kwargs).fit(X)
        printed.append(capsys.readouterr().out)
    number = r"-?\d+\.\d+"
    skeletons = [re.sub(number, "N", re.sub(r"time lapse \S+s", "time lapse Ts", out)) for out in printed]
    assert skeletons[1] == skeletons[0] and skeletons[0].count("Initialization ") == 2 * n_init
    values = [np.array(re.findall(number, re.sub(r"time lapse \S+s", "", out)), dtype=float) for out in printed]
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6, atol=1e-5)
