"""Degenerate components during EM, with scikit-learn as the oracle.

Each scenario makes a component lose its mass (initialised far from every row)
or its covariance collapse (onto one row, onto duplicated rows, along a
constant feature), for every covariance type, with ``reg_covar`` 0 and 1e-6.
scikit-learn is fitted from the same initial parameters first:

- where sklearn raises, dgmm raises the same exception with the same message
  (which says what to change: "increase reg_covar" ...), on NumPy input and on
  chunked dask input;
- otherwise dgmm's fit goes on (one exception, ``ROUNDING_SURVIVORS``, where
  sklearn survives an exactly zero variance only by rounding), never produces a NaN or infinite parameter,
  and, for the cases listed in ``expect_warning``, warns with a ``UserWarning``
  (or ``RuntimeWarning``) whose message names the component:
  ``"component <index>"``. The non-degenerate components match sklearn's.
"""

from __future__ import annotations

import re
import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from dgmm import DegenerateComponentWarning, GaussianMixture
from conftest import COVARIANCE_TYPES

RNG = np.random.default_rng(123)
BLOBS = np.vstack([RNG.normal(size=(150, 2)), RNG.normal(size=(150, 2)) * [1.0, 0.5] + [6.0, 6.0]])


def empty_component():
    """Component 2 starts 1000 standard deviations from every row: its responsibilities underflow to 0."""
    return BLOBS, dict(n_components=3, means_init=[[0.0, 0.0], [6.0, 6.0], [1e3, 1e3]])


def singleton():
    """Component 2 starts on a lone outlier and keeps only that row."""
    X = np.vstack([BLOBS, [[40.0, -40.0]]])
    return X, dict(n_components=3, means_init=[[0.0, 0.0], [6.0, 6.0], [40.0, -40.0]])


def duplicated_rows():
    """Component 1 starts on 30 copies of one row and keeps exactly those."""
    X = np.vstack([BLOBS[:150], np.tile([[20.0, 20.0]], (30, 1))])
    return X, dict(n_components=2, means_init=[[0.0, 0.0], [20.0, 20.0]])


def identical_rows():
    """Every row is the same: k-means finds one cluster, component 1 gets no row."""
    return np.tile([[1.0, -2.0]], (120, 1)), dict(n_components=2)


def constant_feature():
    """The second feature is constant: every component's covariance collapses along it."""
    X = BLOBS.copy()
    X[:, 1] = 3.0
    return X, dict(n_components=2)


SCENARIOS = {
    "empty-component": empty_component,
    "singleton": singleton,
    "duplicated-rows": duplicated_rows,
    "identical-rows": identical_rows,
    "constant-feature": constant_feature,
}


def expect_warning(scenario, kind, reg_covar):
    """The component a warning must name when sklearn goes on, or None where nothing is required."""
    if reg_covar == 0:
        return {"empty-component": 2}.get(scenario)  # lost mass shows with any reg_covar (tied goes on)
    return {
        "empty-component": 2,  # lost its mass: every type
        "singleton": None if kind == "tied" else 2,  # a shared covariance does not collapse
        "duplicated-rows": None if kind == "tied" else 1,
        "identical-rows": 1,  # lost its mass
        "constant-feature": None if kind in ("tied", "spherical") else 0,  # spherical averages the features
    }[scenario]


CASES = [(s, k, r) for s in SCENARIOS for k in COVARIANCE_TYPES for r in (0.0, 1e-6)]

#: sklearn goes on only thanks to rounding: its variance of 30 identical rows comes out as 5.7e-14 instead
#: of 0. dgmm's shifted second moments give the exact 0, so with reg_covar=0 dgmm raises sklearn's own
#: error ("... increase reg_covar ..."). Documented here as dgmm's current, deliberate behaviour.
ROUNDING_SURVIVORS = {("duplicated-rows", "diag", 0.0): 1, ("duplicated-rows", "spherical", 0.0): 1}


def sklearn_outcome(X, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return SkGaussianMixture(**params).fit(X), None
        except Exception as exc:  # the oracle's behaviour, whatever it is
            return None, exc


@pytest.mark.parametrize("scenario, kind, reg_covar", CASES, ids=[f"{s}-{k}-reg{r:g}" for s, k, r in CASES])
def test_degenerate_component_matches_sklearn(scenario, kind, reg_covar):
    X, params = SCENARIOS[scenario]()
    params = dict(params, covariance_type=kind, reg_covar=reg_covar, random_state=0, max_iter=20, tol=1e-6)
    sk, sk_error = sklearn_outcome(X, params)
    survivor = ROUNDING_SURVIVORS.get((scenario, kind, reg_covar))
    if survivor is not None:
        assert sk_error is None and 0 < np.min(sk.covariances_[survivor]) < 1e-12  # sklearn's rounding residue
    for data in (X, da.from_array(X, chunks=(37, X.shape[1]))):
        where = type(data).__name__
        if survivor is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(ValueError, match="ill-defined empirical covariance.*increase reg_covar"):
                    GaussianMixture(**params).fit(data)
            continue
        if sk_error is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(type(sk_error), match=re.escape(str(sk_error))):
                    GaussianMixture(**params).fit(data)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = GaussianMixture(**params).fit(data)
        for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
            assert np.all(np.isfinite(getattr(gm, name))), f"{where}: {name} not finite"
        assert np.isfinite(gm.lower_bound_) and np.all(np.isfinite(gm.lower_bounds_))
        np.testing.assert_allclose(gm.weights_, sk.weights_, atol=1e-8, err_msg=where)
        kept = sk.weights_ > 1e-3  # components sklearn keeps alive agree
        np.testing.assert_allclose(gm.means_[kept], sk.means_[kept], rtol=1e-6, atol=1e-8, err_msg=where)
        component = expect_warning(scenario, kind, reg_covar)
        if component is not None:
            named = [str(w.message) for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))
                     and re.search(rf"\bcomponent {component}\b", str(w.message))]
            assert named, f"{where}: no warning names component {component}: {[str(w.message) for w in caught]}"
        # dgmm's warnings point at the line that called fit (here), not inside dgmm or sklearn's wrapper
        ours = [w for w in caught if issubclass(w.category, DegenerateComponentWarning)
                or (issubclass(w.category, ConvergenceWarning) and "Best performing" in str(w.message))]
        assert {w.filename for w in ours} <= {__file__}, [(w.filename, w.lineno) for w in ours]


def test_sklearn_raises_where_we_expect_it_to():
    """The oracle itself: reg_covar=0 with a collapsed or empty component is sklearn's ValueError."""
    for scenario in ("empty-component", "singleton", "duplicated-rows", "identical-rows", "constant-feature"):
        X, params = SCENARIOS[scenario]()
        _, error = sklearn_outcome(X, dict(params, covariance_type="full", reg_covar=0.0, random_state=0,
                                           max_iter=20))
        assert isinstance(error, ValueError) and "increase reg_covar" in str(error), scenario


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float32_covariances_beyond_float32_get_an_error_that_says_so(kind):
    """float32 data near 1e20: the float64 covariances (1e40) are finite, the model's float32 ones are not. 'diag'
    fitted "successfully" with inf covariances_ (and sample() gave inf); 'full' failed with scipy's bare message."""
    rng = np.random.default_rng(0)
    X = (np.concatenate([rng.normal(-3, 1, (300, 2)), rng.normal(3, 1, (300, 2))]) * 1e20).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn's in-memory k-means overflows in float32 too
        with pytest.raises(ValueError, match=r"increase reg_covar.* Some covariances exceed the largest float32 "
                                             r"value \(3\.4e38\).*scale the input data, or pass float64 data"):
            GaussianMixture(2, covariance_type=kind, random_state=0).fit(X)
    fitted = GaussianMixture(2, covariance_type=kind, random_state=0).fit(X.astype(np.float64))
    assert np.all(np.isfinite(fitted.covariances_)) and fitted.covariances_.max() > 1e38


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_input_whose_squares_overflow_gets_an_error_that_says_so(kind):
    """Finite input above ~1e154. sklearn fails inside scipy for full and tied ("array must not
    contain infs or NaNs", about an input that has none) and returns NaN covariances for diag and
    spherical; dgmm raises sklearn's covariance error with the cause and the fix, for all four."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3000, 3)) * 1e160
    assert np.all(np.isfinite(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in ("full", "tied"):
            with pytest.raises(ValueError, match="must not contain infs or NaNs"):
                SkGaussianMixture(3, covariance_type=kind, random_state=0).fit(X)
        else:
            assert np.all(np.isnan(SkGaussianMixture(3, covariance_type=kind, random_state=0).fit(X).covariances_))
        for data, kwargs in ((X, {}), (da.from_array(X, chunks=(700, 3)), {"init_sample_size": 1000})):
            with pytest.raises(ValueError, match="ill-defined empirical covariance.*squares overflow.*StandardScaler"):
                GaussianMixture(3, covariance_type=kind, random_state=0, **kwargs).fit(data)
    # just below the overflow the fit works and matches sklearn, scaled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = GaussianMixture(3, covariance_type=kind, random_state=0).fit(X * 1e-10)
    assert np.all(np.isfinite(small.covariances_))


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float32_collinear_features_without_reg_covar_fail_as_in_sklearn(kind):
    """Exactly collinear float32 features and reg_covar=0: the covariance is singular. sklearn's float32
    Cholesky fails ('... passing float64 data instead of float32') for full and tied. dgmm's float32
    'full' chunk statistics carry float32 rounding, which made the float64 covariance barely positive
    definite: the fit ran 100 non-monotone iterations and returned a singular float32 ``covariances_``
    with precisions near 1e13. diag and spherical have positive variances and fit in both."""
    X = np.c_[np.arange(40.0), 2 * np.arange(40.0)].astype(np.float32)
    params = dict(n_components=1, covariance_type=kind, reg_covar=0.0)
    sk, sk_error = sklearn_outcome(X, params)
    for data in (X, da.from_array(X, chunks=(15, 2))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if sk_error is not None:
                assert kind in ("full", "tied")
                with pytest.raises(ValueError, match=re.escape(str(sk_error))):
                    GaussianMixture(**params).fit(data)
                continue
            gm = GaussianMixture(**params).fit(data)
        assert gm.covariances_.dtype == np.float32
        np.testing.assert_allclose(gm.covariances_, sk.covariances_, rtol=1e-5)
        np.testing.assert_allclose(gm.lower_bound_, sk.lower_bound_, rtol=1e-5)


def test_input_rewritten_during_a_fit_is_named_when_the_lower_bound_falls():
    """A Zarr array replaced at iteration 10 went on silently (the lower bound fell from -14.6 to -46.2, then
    "converged", exit 0). Here the rows behind a dask array are rewritten in place after iteration 3."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(3000, 2)), rng.normal(size=(3000, 2)) + 6.0])
    params = dict(n_components=2, random_state=0, tol=0.0, max_iter=8, init_params="random")
    with warnings.catch_warnings():  # the fit as it is: no such warning on any iteration
        warnings.simplefilter("error", RuntimeWarning)
        GaussianMixture(**params).fit(da.from_array(X.copy(), chunks=(1000, 2)))
    rows = X.copy()

    def rewrite(info):
        if info.n_iter == 3:
            rows[:] = rng.normal(size=rows.shape) * 30.0

    def read(block_id=None):  # a store whose contents change: each pass reads the rows as they are then
        return rows[1000 * block_id[0]:1000 * (block_id[0] + 1)].copy()

    lazy = da.map_blocks(read, chunks=((1000,) * 6, (2,)), dtype=np.float64)
    with pytest.warns(RuntimeWarning, match=r"EM iteration 4: the lower bound fell from -[0-9.]+ to -[0-9.]+\. An EM "
                                            r"step does not lower it by so much \(reg_covar accounted for\): the rows "
                                            r"read in this pass differ"):
        GaussianMixture(**params, callbacks=rewrite).fit(lazy)


def test_no_false_alarms_for_a_warm_start_on_new_data_or_normalised_weights():
    """A warm start's first lower bound follows the previous fit's, on other data: no "input changed" warning.
    Weights that sum to 1 (probabilities): a component of half the mass has not "lost its mass" (< 1 row)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (300, 2)), rng.normal(3, 1, (300, 2))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = GaussianMixture(2, random_state=0, warm_start=True).fit(X)
        gm.fit(X * 3)  # the lower bound falls from about -3.5 to about -5.7: another data set, as warm_start allows
        weighted = GaussianMixture(2, random_state=0).fit(X, sample_weight=np.full(len(X), 1 / len(X)))
    np.testing.assert_allclose(weighted.means_, GaussianMixture(2, random_state=0).fit(X).means_, rtol=1e-10)
    far = np.full(len(X), 1 / len(X))
    with pytest.warns(DegenerateComponentWarning, match=r"component 2 has lost its mass at iteration 1 \(responsibility "
                                                        r"sum [0-9.e-]+ < one row's mean weight 0\.00167\)"):
        GaussianMixture(3, random_state=0, means_init=[[-3, -3], [3, 3], [90, 90]], max_iter=1).fit(
            X, sample_weight=far)
# ---------------------------------------------------------------------------
# A far outlier: its own component, of covariance reg_covar·I (as in sklearn)
# ---------------------------------------------------------------------------


def with_outlier(big):
    """Two blobs of 300 rows at ±5 and one row at (big, -big, big)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-5, 1, (300, 3)), rng.normal(5, 1, (300, 3))])
    X[17] = [big, -big, big]
    return X


RAGGED = ((37,) * 16 + (8,), 3)


@pytest.mark.filterwarnings("ignore::dgmm.DegenerateComponentWarning")  # the outlier collapses, by design
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++"])
@pytest.mark.parametrize("big", [1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 1e7])
def test_a_component_seeded_on_a_far_outlier_fits_as_in_sklearn(init_params, big):
    """The seeding gives the outlier its own component. Its initial 'full' second moments were taken about
    the data's centre: |x - c|² eps (7e-6 at 1e5) rounded the covariance past reg_covar, and the fit raised
    "ill-defined empirical covariance" at 1e5, 3e5 and 1e7. They are taken about each component's seed (its
    k-means centre, its seed row): the fit is sklearn's, the outlier's covariance reg_covar·I, and no extra
    pass is made."""
    X = with_outlier(big)
    sk = SkGaussianMixture(3, random_state=0, init_params=init_params).fit(X)
    outlier = int(np.argmax(np.abs(sk.means_).max(axis=1)))
    for data in (X, da.from_array(X, chunks=RAGGED)):
        where = type(data).__name__
        gm = GaussianMixture(3, random_state=0, init_params=init_params).fit(data)
        np.testing.assert_allclose(gm.weights_, sk.weights_, rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(gm.means_, sk.means_, rtol=1e-12, atol=1e-9, err_msg=where)
        np.testing.assert_allclose(gm.covariances_, sk.covariances_, rtol=1e-9, atol=1e-12, err_msg=where)
        np.testing.assert_allclose(gm.covariances_[outlier], 1e-6 * np.eye(3), rtol=0, atol=1e-15, err_msg=where)
        np.testing.assert_allclose(gm.means_[outlier], X[17], rtol=1e-15, err_msg=where)
        assert gm.n_iter_ == sk.n_iter_ and gm.n_passes_ == 1 + gm.n_iter_, where


@pytest.mark.filterwarnings("ignore::dgmm.DegenerateComponentWarning")  # the outlier collapses, by design
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++"])
@pytest.mark.parametrize("big", [1e5, 1e7])
def test_a_far_outlier_seeded_out_of_core_gets_its_own_component(init_params, big):
    """Out-of-core seeding (k-means‖ and Lloyd passes, greedy k-means++): the Lloyd passes take each
    cluster's 'full' moments about its centre, k-means++ about its seed row; the outlier's component is
    reg_covar·I and the blobs' components are sklearn's."""
    X = with_outlier(big)
    sk = SkGaussianMixture(3, random_state=0, init_params=init_params).fit(X)
    order = np.argsort(sk.means_[:, 0])
    gm = GaussianMixture(3, random_state=0, init_params=init_params, init_sample_size=100)
    gm.fit(da.from_array(X, chunks=RAGGED))
    ours = np.argsort(gm.means_[:, 0])
    np.testing.assert_allclose(gm.means_[ours], sk.means_[order], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gm.covariances_[ours], sk.covariances_[order], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(gm.covariances_[ours[-1]], 1e-6 * np.eye(3), rtol=0, atol=1e-15)


def jumping_component(big):
    """Component 2 starts broad (precision 1e-12) at 20: the first E-step hands it the outlier."""
    return with_outlier(big), dict(
        n_components=3,
        weights_init=[0.45, 0.45, 0.1],
        means_init=[[-5.0] * 3, [5.0] * 3, [20.0] * 3],
        precisions_init=[np.eye(3), np.eye(3), 1e-12 * np.eye(3)],
    )


def random_from_data_jump(big):
    """random_from_data seeds no component on the outlier; EM moves one there in its second step."""
    return with_outlier(big), dict(n_components=3, init_params="random_from_data", random_state=1)


@pytest.mark.filterwarnings("ignore::dgmm.DegenerateComponentWarning")  # the outlier collapses, by design
@pytest.mark.parametrize("scenario, big, extra_passes", [
    (jumping_component, 1e3, 1), (jumping_component, 1e5, 1), (jumping_component, 1e7, 1),
    (random_from_data_jump, 1e6, 2), (random_from_data_jump, 1e7, 2),
])
def test_a_component_that_jumps_onto_a_far_outlier_fits_as_in_sklearn(scenario, big, extra_passes):
    """EM takes 'full' moments about the previous means: a component that jumps onto the outlier in one
    step lost its covariance to that shift (the fits raised at 1e5 and 1e6). The pass of such a step is
    redone with the same parameters and the moments about the new means (an extra pass in those steps
    only), and the fit is sklearn's."""
    X, params = scenario(big)
    sk = SkGaussianMixture(**params).fit(X)
    outlier = int(np.argmax(np.abs(sk.means_).max(axis=1)))
    for data in (X, da.from_array(X, chunks=RAGGED)):
        where = type(data).__name__
        gm = GaussianMixture(**params).fit(data)
        assert gm.n_iter_ == sk.n_iter_, where
        np.testing.assert_allclose(gm.weights_, sk.weights_, rtol=1e-9, err_msg=where)
        np.testing.assert_allclose(gm.means_, sk.means_, rtol=1e-12, atol=1e-9, err_msg=where)
        np.testing.assert_allclose(gm.covariances_, sk.covariances_, rtol=1e-9, atol=1e-12, err_msg=where)
        np.testing.assert_allclose(gm.covariances_[outlier], 1e-6 * np.eye(3), rtol=0, atol=1e-15, err_msg=where)
        np.testing.assert_allclose(gm.lower_bound_, sk.lower_bound_, rtol=1e-12, err_msg=where)
        initial_pass = 0 if "means_init" in params else 1
        assert gm.n_passes_ == initial_pass + gm.n_iter_ + extra_passes, where


def test_a_constant_feature_is_named_among_the_causes_of_a_collapse():
    """A constant column collapses every component in its direction; the hint said "a singleton or duplicated
    points" only, which sent users looking for duplicates."""
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=500), np.full(500, 3.0)])
    with pytest.warns(DegenerateComponentWarning, match=r"collapsed at iteration 1: .*a feature or combination of "
                                                        r"features that is constant on its points\)\..*drop constant "
                                                        r"or collinear features"):
        GaussianMixture(2, random_state=0, max_iter=2).fit(X)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("data", ["scales 1e5, 1, 1e-3", "salary beside a 0/1 column"])
def test_features_of_very_different_scales_take_no_extra_pass(dtype, data):
    """The redo check measured the shift's rounding as eps |δ|² against the smallest eigenvalue: with δ along a
    feature of large scale and that eigenvalue along a small one it redid 25-90 % of the passes (float32: nearly
    all) for nothing. The rounding along the smallest eigenvector v, eps (|v|·|δ|)², flags none here."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, 3000)
    if data.startswith("scales"):
        X = (rng.normal(size=(3000, 3)) + 4.0 * groups[:, None]) * [1e5, 1.0, 1e-3]
    else:
        X = np.column_stack([rng.normal(3e4 + 2e4 * groups, 1e4), (groups == 1).astype(float),
                             rng.normal(40 + 5 * groups, 8)])
    X = X.astype(dtype)
    for init_params in ("kmeans", "random_from_data"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = GaussianMixture(3, random_state=0, tol=1e-8, init_params=init_params).fit(X)
        assert gm.n_passes_ == 1 + gm.n_iter_, (init_params, gm.n_passes_, gm.n_iter_)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("scale, reg_covar", [(3e-4, 1e-6), (1.0, 10.0)])
def test_reg_covar_comparable_to_the_variances_lowers_the_bound_without_an_alarm(kind, scale, reg_covar):
    """EM with reg_covar is not monotone: where reg_covar is comparable to the variances (data of scale 3e-4 with
    the default 1e-6, or reg_covar=10 on unit data) the bound falls by up to 0.12 per row, as in sklearn, and the
    "input changed" warning fired on an input that never changed. The drop regularisation can cause is allowed."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 1, (500, 2)) for c in (-6, -2, 2, 6)]) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gm = GaussianMixture(4, covariance_type=kind, random_state=0, reg_covar=reg_covar).fit(X)
    sk = SkGaussianMixture(4, covariance_type=kind, random_state=0, reg_covar=reg_covar).fit(X)
    assert gm.n_iter_ == sk.n_iter_ and gm.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-6)
    if kind in ("diag", "spherical"):
        assert np.diff(gm.lower_bounds_).min() < -0.05  # it does fall, by more than the warning's 1e-3 margin


@pytest.mark.filterwarnings("ignore::dgmm.DegenerateComponentWarning")  # the outlier collapses, by design
@pytest.mark.parametrize("big", [1e3, 1e4])
def test_a_float32_component_that_jumps_onto_a_far_outlier_fits_as_sklearn_does(big):
    """float32: the redone pass took its moments from float32 residuals plus a float64 offset, which kept float32
    rounding of |t - s| (a jump of 1e4 raised). The redone pass runs its products in float64. (The iterations after
    it keep float32 products relative to one centre: their residuals of a row 1e4 away carry about 6e-4 of rounding,
    so the outlier's covariance is reg_covar within a few 1e-7; at 1e5 that exceeds reg_covar and the fit raises,
    with the hint to pass float64 data.)"""
    X, params = jumping_component(big)
    X = X.astype(np.float32)
    params = {**params, **{k: np.asarray(v, dtype=np.float32) for k, v in params.items() if k.endswith("_init")}}
    sk = SkGaussianMixture(**params).fit(X)
    gm = GaussianMixture(**params).fit(X)
    outlier = int(np.argmax(np.abs(sk.means_).max(axis=1)))
    assert gm.n_iter_ == sk.n_iter_ and gm.means_.dtype == np.float32
    np.testing.assert_allclose(gm.means_, sk.means_, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(gm.covariances_[outlier], 1e-6 * np.eye(3), rtol=0, atol=5e-7)
