"""The estimator contract: inputs, outputs, dtypes, invariance, errors."""

from __future__ import annotations

import copy
import pickle  # only to check the estimator object itself pickles, as sklearn estimators must
import re
import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.estimator_checks import check_estimator

from dgmm import GaussianMixture
from conftest import COVARIANCE_TYPES, make_mixture, perturbed_init


def test_sklearn_check_estimator_passes():
    results = check_estimator(GaussianMixture(), on_fail=None)
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, [(r["check_name"], str(r["exception"])[:200]) for r in failed]
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    # array-API input is only exercised when SCIPY_ARRAY_API is set; nothing else may be skipped
    assert skipped <= {"check_array_api_input"}
    assert len(results) > 30


def test_constructor_matches_sklearn_signature():
    import inspect

    from sklearn.mixture import GaussianMixture as Sk

    ours = inspect.signature(GaussianMixture).parameters
    theirs = inspect.signature(Sk).parameters
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
    assert set(ours) - set(theirs) == {
        "chunk_size", "split_every", "init_sample_size", "callbacks", "checkpoint", "checkpoint_every"
    }


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_model_does_not_depend_on_chunking_or_fan_in(kind):
    X = make_mixture(n_samples=900, n_features=3, seed=11)
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=0, max_iter=15)
    reference = GaussianMixture(3, **kwargs).fit(X)  # one chunk, in-process
    for chunks, split_every in [(37, 2), (37, 3), (37, 8), (300, 2), (899, 4)]:
        gm = GaussianMixture(3, split_every=split_every, **kwargs).fit(da.from_array(X, chunks=(chunks, 3)))
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(gm, name), getattr(reference, name), rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(gm.lower_bounds_, reference.lower_bounds_, rtol=1e-9)
    numpy_chunked = GaussianMixture(3, chunk_size=50, **kwargs).fit(X)
    np.testing.assert_allclose(numpy_chunked.means_, reference.means_, rtol=1e-9)


def test_default_init_does_not_depend_on_chunking():
    X = make_mixture(n_samples=700, n_features=2, seed=12)
    a = GaussianMixture(3, random_state=1).fit(X)
    b = GaussianMixture(3, random_state=1).fit(da.from_array(X, chunks=(37, 2)))
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9)
    for init in ("random", "random_from_data", "k-means++"):
        a = GaussianMixture(3, init_params=init, random_state=2).fit(X)
        b = GaussianMixture(3, init_params=init, random_state=2).fit(da.from_array(X, chunks=(37, 2)))
        np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9, err_msg=init)


def test_float32_stays_float32_and_close_to_float64():
    X = make_mixture(n_samples=800, n_features=3, seed=13)
    a = GaussianMixture(3, random_state=0).fit(X)
    b = GaussianMixture(3, random_state=0).fit(da.from_array(X.astype(np.float32), chunks=(100, 3)))
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert isinstance(getattr(b, name), np.ndarray)
        assert getattr(b, name).dtype == np.float32, name
        assert getattr(a, name).dtype == np.float64, name
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.lower_bound_, a.lower_bound_, rtol=1e-5)
    assert b.predict_proba(X.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("model_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lazy", [False, True])
def test_per_row_outputs_have_sklearns_dtype(model_dtype, input_dtype, lazy):
    """X's and the model's dtypes promoted, as sklearn's float64-means-times-float32-X products give."""
    from dgmm import to_sklearn

    X = make_mixture(n_samples=400, n_features=3, seed=15)
    gm = GaussianMixture(3, random_state=0).fit(X.astype(model_dtype))
    reference = to_sklearn(gm)
    Xi = X.astype(input_dtype)
    data = da.from_array(Xi, chunks=(100, 3)) if lazy else Xi
    for method in ("predict_proba", "score_samples"):
        ours, theirs = getattr(gm, method)(data), getattr(reference, method)(Xi)
        assert ours.dtype == theirs.dtype == np.result_type(model_dtype, input_dtype), method
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_float32_input_to_float64_model_is_evaluated_in_float64(covariance_type):
    """The E-step kernel works in float64: float32 rows score exactly as their float64 values do.

    sklearn's own float32 path squares X in float32 and is off by up to 1e-4
    here (data far from the origin); the reference is sklearn on the same
    values widened to float64.
    """
    from dgmm import to_sklearn

    X = make_mixture(n_samples=2000, n_features=5, seed=16) * 3 + 100
    gm = GaussianMixture(4, covariance_type=covariance_type, random_state=0).fit(X)
    X32 = X.astype(np.float32)
    exact = to_sklearn(gm).score_samples(X32.astype(np.float64))
    for data in (X32, da.from_array(X32, chunks=(300, 5))):
        np.testing.assert_allclose(np.asarray(gm.score_samples(data)), exact, rtol=1e-12, atol=1e-10)


def test_lazy_outputs_for_dask_input_with_input_chunks():
    X = make_mixture(n_samples=500, n_features=3, seed=14)
    Xd = da.from_array(X, chunks=(37, 3))
    gm = GaussianMixture(3, random_state=0).fit(Xd)
    for method, ndim in (("predict", 1), ("predict_proba", 2), ("score_samples", 1)):
        lazy = getattr(gm, method)(Xd)
        assert isinstance(lazy, da.Array), method
        assert lazy.chunks[0] == Xd.chunks[0]
        np.testing.assert_allclose(lazy.compute(), getattr(gm, method)(X), rtol=1e-12)
    labels = gm.fit_predict(Xd)
    assert isinstance(labels, da.Array)
    np.testing.assert_array_equal(labels.compute(), gm.predict(X))
    assert isinstance(gm.fit_predict(X), np.ndarray)


def test_pandas_dask_dataframe_and_zarr_inputs(tmp_path):
    X = make_mixture(n_samples=400, n_features=3, seed=15)
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    reference = GaussianMixture(3, random_state=0).fit(X)

    gm = GaussianMixture(3, random_state=0).fit(df)
    np.testing.assert_array_equal(gm.feature_names_in_, ["a", "b", "c"])
    np.testing.assert_allclose(gm.means_, reference.means_, rtol=1e-9)

    ddf = dd.from_pandas(df, npartitions=3)
    gm = GaussianMixture(3, random_state=0).fit(ddf)
    np.testing.assert_array_equal(gm.feature_names_in_, ["a", "b", "c"])
    np.testing.assert_allclose(gm.means_, reference.means_, rtol=1e-9)
    assert isinstance(gm.predict(ddf), da.Array)
    with pytest.raises(ValueError, match="feature names"):
        gm.predict(ddf[["c", "b", "a"]])

    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(37, 3), dtype="f8")
    z[:] = X
    gm = GaussianMixture(3, random_state=0).fit(zarr.open_array(str(tmp_path / "x.zarr"), mode="r"))
    np.testing.assert_allclose(gm.means_, reference.means_, rtol=1e-9)
    assert isinstance(gm.predict(zarr.open_array(str(tmp_path / "x.zarr"), mode="r")), da.Array)


def test_a_dask_backed_xarray_dataarray_stays_lazy(tmp_path):
    """xr.open_zarr gives DataArrays of dask arrays: fitted and predicted as dask input, never loaded whole."""
    import xarray as xr

    X = make_mixture(n_samples=900, n_features=3, seed=20)
    xr.Dataset({"x": (("row", "feature"), X)}).chunk({"row": 200, "feature": 1}).to_zarr(tmp_path / "x.zarr",
                                                                                         consolidated=False)
    lazy = xr.open_zarr(tmp_path / "x.zarr", consolidated=False)["x"]
    assert isinstance(lazy.data, da.Array)
    reference = GaussianMixture(3, random_state=0).fit(X)
    gm = GaussianMixture(3, random_state=0).fit(lazy, sample_weight=xr.DataArray(da.ones(900, chunks=300)))
    np.testing.assert_allclose(gm.means_, reference.means_, rtol=1e-10)
    labels = gm.predict(lazy)
    assert isinstance(labels, da.Array) and labels.chunks[0] == (200,) * 4 + (100,)
    np.testing.assert_array_equal(labels.compute(), reference.predict(X))
    assert gm.score(lazy) == pytest.approx(reference.score(X), rel=1e-12)
    in_memory = gm.predict(xr.DataArray(X))  # a DataArray of NumPy data is NumPy input, as in sklearn
    assert type(in_memory) is np.ndarray


def test_criteria_and_scores_of_lazy_inputs_whose_row_count_is_unknown():
    """A dask DataFrame's len is lazy and a filtered array's chunks are NaN: bic/aic count the validated rows."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    X = np.round(make_mixture(n_samples=600, n_features=3, seed=18) * 100)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    sk = SkGaussianMixture(3, random_state=0).fit(X)
    named, unnamed = GaussianMixture(3, random_state=0).fit(frame), GaussianMixture(3, random_state=0).fit(X)
    floats = da.from_array(X, chunks=(150, 3))
    integers = floats.astype(np.int64)
    inputs = {"dask frame": dd.from_pandas(frame, npartitions=3),
              "filtered floats": floats[floats[:, 0] > -1e9], "filtered integers": integers[integers[:, 0] > -10**9]}
    for name, lazy in inputs.items():
        gm = named if name == "dask frame" else unnamed
        for method in ("bic", "aic", "score"):
            np.testing.assert_allclose(getattr(gm, method)(lazy), getattr(sk, method)(X), rtol=1e-10,
                                       err_msg=f"{method} of {name}")
        if name != "dask frame":
            assert np.isnan(lazy.chunks[0][0]), name  # the caller's array is left as it was


@pytest.mark.parametrize("dtypes", ["double[pyarrow]", "float[pyarrow]", "Float64", "Int64", "float32", "with bool"])
def test_dask_dataframes_of_extension_dtypes_are_cast_as_sklearn_casts_pandas(dtypes):
    """Nullable, pyarrow and float-with-bool frames: to_dask_array gives object arrays; sklearn casts them."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    X = np.round(make_mixture(n_samples=600, n_features=3, seed=17) * 100)
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df = df.assign(d=df["a"] > 0) if dtypes == "with bool" else df.astype(dtypes)
    sk = SkGaussianMixture(3, random_state=0).fit(df)
    gm = GaussianMixture(3, random_state=0).fit(dd.from_pandas(df, npartitions=3))
    assert gm.means_.dtype == sk.means_.dtype
    np.testing.assert_allclose(gm.means_, sk.means_, rtol=1e-5 if sk.means_.dtype == np.float32 else 1e-10, atol=1e-12)
    np.testing.assert_array_equal(gm.feature_names_in_, sk.feature_names_in_)
    labels = gm.predict(dd.from_pandas(df, npartitions=2))
    np.testing.assert_array_equal(labels.compute(), sk.predict(df))
    if dtypes in ("Float64", "double[pyarrow]"):  # a missing value is a NaN row, reported as such
        df.iloc[5, 1] = None
        with pytest.raises(ValueError, match=r"1 of 600 rows .*first at row 5"):
            GaussianMixture(3, random_state=0).fit(dd.from_pandas(df, npartitions=3))


def test_dask_dataframe_read_from_parquet_with_a_column_projection(tmp_path):
    """dd.read_parquet(columns=...) fuses partitions, and to_dask_array(lengths=True) fails on it (dask 2026.8)."""
    X = make_mixture(n_samples=1200, n_features=3, seed=19)
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(tag="t")
    dd.from_pandas(frame, npartitions=12, sort=False).to_parquet(tmp_path / "t.parquet")
    ddf = dd.read_parquet(tmp_path / "t.parquet", columns=["a", "b", "c"])
    reference = GaussianMixture(3, random_state=0).fit(frame[["a", "b", "c"]])
    gm = GaussianMixture(3, random_state=0).fit(ddf)
    np.testing.assert_allclose(gm.means_, reference.means_, rtol=1e-10)
    labels = gm.predict(ddf)
    assert isinstance(labels, da.Array) and not np.isnan(labels.shape[0])
    np.testing.assert_array_equal(labels.compute(), reference.predict(ddf.compute()))


def test_integer_dask_input_is_cast_to_float64():
    X = np.round(make_mixture(n_samples=300, n_features=2, seed=16) * 10).astype(np.int64)
    a = GaussianMixture(2, random_state=0, reg_covar=1e-3).fit(X)
    b = GaussianMixture(2, random_state=0, reg_covar=1e-3).fit(da.from_array(X, chunks=50))
    assert b.means_.dtype == np.float64
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9)


def test_init_arrays_are_not_modified():
    X = make_mixture(n_samples=300, n_features=2)
    w, m, p = perturbed_init(X, "full")
    w32 = w.astype(np.float32)
    copies = [a.copy() for a in (w32, m, p)]
    gm = GaussianMixture(3, weights_init=w32, means_init=m, precisions_init=p).fit(X)
    for original, kept in zip((w32, m, p), copies):
        np.testing.assert_array_equal(original, kept)
    assert gm.weights_init is w32 and gm.means_init is m and gm.precisions_init is p


def test_clone_deepcopy_get_set_params_and_pickle():
    gm = GaussianMixture(4, covariance_type="diag", split_every=3)
    assert clone(gm).get_params() == gm.get_params()
    assert gm.set_params(n_components=2).n_components == 2
    X = make_mixture(n_samples=200, n_features=2)
    fitted = gm.fit(X)
    for twin in (copy.deepcopy(fitted), pickle.loads(pickle.dumps(fitted))):
        np.testing.assert_array_equal(twin.predict(X), fitted.predict(X))


def test_not_fitted_and_convergence_warning():
    with pytest.raises(NotFittedError):
        GaussianMixture().predict(np.zeros((3, 2)))
    X = make_mixture(n_samples=300, n_features=2)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixture(3, max_iter=1, random_state=0).fit(X)


def test_n_init_picks_the_best_restart_and_reads_data_once_per_iteration():
    X = make_mixture(n_samples=600, n_features=2, seed=17)
    single = [GaussianMixture(3, init_params="random", random_state=s, tol=1e-4).fit(X) for s in range(1)]
    gm = GaussianMixture(3, init_params="random", n_init=4, random_state=0, tol=1e-4)
    gm.fit(da.from_array(X, chunks=(101, 2)))
    # one initialisation pass + one pass per EM iteration of the longest restart
    assert gm.n_passes_ <= 1 + 1 + gm.max_iter
    assert gm.lower_bound_ >= single[0].lower_bound_ - 1e-12
    assert gm.lower_bounds_[-1] == gm.lower_bound_


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_dask_input_raises_in_the_first_pass(bad):
    X = make_mixture(n_samples=300, n_features=2)
    X[[41, 250], 1] = bad
    Xd = da.from_array(X, chunks=(37, 2))
    with pytest.raises(ValueError, match=r"NaN or infinity: 2 of 300 rows .*first at row 41"):
        GaussianMixture(2, init_params="random", random_state=0).fit(Xd)
    with pytest.raises(ValueError, match=r"NaN or infinity: 2 of 300 rows"):
        GaussianMixture(2, random_state=0).fit(Xd)  # kmeans: found in the sample
    with pytest.raises(ValueError, match="contains NaN|contains infinity"):
        GaussianMixture(2).fit(X)  # numpy input: sklearn's own message


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score_samples"])
def test_lazy_prediction_on_nonfinite_rows_names_the_global_row(method):
    X = make_mixture(n_samples=300, n_features=2)
    gm = GaussianMixture(2, random_state=0).fit(X)
    bad = X.copy()
    bad[[230, 260], 0] = [np.nan, np.inf]
    lazy = getattr(gm, method)(da.from_array(bad, chunks=(111, 2)))  # building the graph reads nothing
    with pytest.raises(ValueError, match=r"NaN or infinity: 2 of the 78 rows 222-299 .*first at row 230"):
        lazy.compute()


def test_bad_shapes_and_dtypes():
    gm = GaussianMixture(2)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        gm.fit(da.zeros(10, chunks=5))
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        gm.fit(np.zeros(10))
    with pytest.raises(ValueError, match="numeric"):
        gm.fit(da.from_array(np.array([["a", "b"], ["c", "d"], ["e", "f"]])))
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        gm.fit(da.zeros((0, 3), chunks=1))
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        gm.fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="Expected n_samples >= n_components but got n_components = 5, n_samples = 3"):
        GaussianMixture(5).fit(da.from_array(np.random.rand(3, 2)))
    fitted = GaussianMixture(2, random_state=0).fit(make_mixture(n_samples=100, n_features=3))
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3 features"):
        fitted.predict(da.zeros((10, 2), chunks=5))
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3 features"):
        fitted.predict(np.zeros((10, 2)))
    for method in ("predict", "predict_proba", "score_samples", "score"):  # the shape before the feature count
        for one_d in (da.zeros(10, chunks=5), np.zeros(10)):
            with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
                getattr(fitted, method)(one_d)
    with pytest.raises(ValueError, match="numeric input, but X has dtype <U1; select numeric columns or convert "
                                         "them first"):
        fitted.predict(da.from_array(np.array([["a", "b", "c"]] * 3)))


def test_prediction_input_is_checked_as_sklearns_predict_checks_it():
    """Numeric input only (strings refused as sklearn refuses them), validated before anything else;
    integer, boolean and float16 rows scored exactly (against scipy; sklearn 1.9's own values are off)."""
    from scipy.stats import multivariate_normal
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    X = make_mixture(n_samples=200, n_features=2, seed=18) * 3
    gm = GaussianMixture(2, random_state=0).fit(X)
    sk = SkGaussianMixture(2, random_state=0).fit(X)
    for method in ("predict", "predict_proba", "score_samples", "score", "bic", "aic"):
        for bad, error in ((X.astype(str), "dtype='numeric' is not compatible with arrays of bytes/strings"),
                           (1.0, "Expected 2D array, got scalar array instead")):
            with pytest.raises(ValueError, match=re.escape(error)):
                getattr(sk, method)(bad)
            with pytest.raises(ValueError, match=re.escape(error)):
                getattr(gm, method)(bad)
    assert GaussianMixture(2, random_state=0).fit(X.astype(str)).n_iter_ == sk.n_iter_  # fit converts, as sklearn's
    for rows in (X.astype(np.int64), X.astype(bool), X.astype(np.float16)):
        exact = np.log(sum(w * multivariate_normal(m, c).pdf(rows.astype(np.float64))
                           for w, m, c in zip(gm.weights_, gm.means_, gm.covariances_)))
        np.testing.assert_allclose(gm.score_samples(rows), exact, rtol=1e-12, err_msg=str(rows.dtype))


def test_bad_parameters_use_sklearn_wording():
    X = make_mixture(n_samples=100, n_features=2)
    with pytest.raises(ValueError, match=r"The 'n_components' parameter of GaussianMixture must be an int in the range \[1, inf\)\. Got 0 instead"):
        GaussianMixture(0).fit(X)
    with pytest.raises(ValueError, match="'covariance_type' parameter of GaussianMixture must be a str among"):
        GaussianMixture(covariance_type="banana").fit(X)
    with pytest.raises(ValueError, match="The parameter 'weights' should be normalized"):
        GaussianMixture(2, weights_init=[0.2, 0.2]).fit(X)
    with pytest.raises(ValueError, match=r"The parameter 'means' should have the shape of \(2, 2\)"):
        GaussianMixture(2, means_init=np.zeros((3, 2))).fit(X)
    with pytest.raises(ValueError, match="'full precision' should be symmetric, positive-definite"):
        GaussianMixture(2, precisions_init=-np.stack([np.eye(2)] * 2)).fit(X)
    with pytest.raises(ValueError, match="'spherical precision' should be positive"):
        GaussianMixture(2, covariance_type="spherical", precisions_init=[1.0, -1.0]).fit(X)


def test_collapsed_component_error_says_what_to_change():
    X = np.vstack([np.zeros((50, 2)), np.ones((50, 2))])
    with pytest.raises(ValueError, match="increase reg_covar"):
        GaussianMixture(2, reg_covar=0, random_state=0).fit(da.from_array(X, chunks=30))


def test_graph_building_never_computes():
    from dgmm import chunk, graph

    X = da.from_array(make_mixture(n_samples=200, n_features=2), chunks=(37, 2))
    params = chunk.chunk_params(np.array([0.5, 0.5]), np.zeros((2, 2)), np.stack([np.eye(2)] * 2), "full")

    def forbidden(*args, **kwargs):
        raise AssertionError("graph building computed something")

    with dask.config.set(scheduler=forbidden):
        blocks = graph.RowBlocks(X)
        graph.e_step_statistics(blocks, (params,), split_every=3)
        graph.predict(X, params)
        graph.predict_proba(X, params, np.float64)
        graph.score_samples(X, params, np.float64)


def test_one_iteration_holds_no_array_with_n_samples_rows():
    """Every task result of an EM pass is either a chunk (<= 37 rows) or small statistics."""
    from dask.callbacks import Callback

    from dgmm import chunk, graph

    n = 1000
    X = da.from_array(make_mixture(n_samples=n, n_features=3), chunks=(37, 3))
    params = chunk.chunk_params(np.full(3, 1 / 3), np.zeros((3, 3)), np.stack([np.eye(3)] * 3), "full")
    largest = []

    def leaves(obj):
        if isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                yield from leaves(item)

    class Record(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            largest.extend(a.shape[0] for a in leaves(result) if a.ndim)

    with Record():
        (stats,) = graph.e_step_statistics(graph.RowBlocks(X), (params,), split_every=4).compute(scheduler="threads")
    assert stats.n_samples == n
    assert largest and max(largest) <= 37


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_full_runs_shifted_float32_products_close_to_float64(offset):
    """float32 'full' chunks compute in float32 (shifted); sums are float64: lower bound within 1e-4."""
    rng = np.random.default_rng(51)
    d = 32
    centers = rng.normal(size=(4, d)) * 4
    X = (centers[rng.integers(0, 4, size=6000)] + rng.normal(size=(6000, d)) + offset).astype(np.float32)
    X64 = X.astype(np.float64)
    kwargs = dict(n_components=4, covariance_type="full", random_state=0, tol=0, max_iter=15)
    a = GaussianMixture(**kwargs).fit(da.from_array(X64, chunks=(1000, d)))
    b = GaussianMixture(**kwargs).fit(da.from_array(X, chunks=(1000, d)))
    assert b.means_.dtype == np.float32
    np.testing.assert_allclose(b.lower_bound_, a.lower_bound_, rtol=1e-4)
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-3, atol=1e-3)


def test_tied_restarts_pick_the_first_whatever_the_chunking():
    """Two restarts that reach the same optimum (components in another order) tie up to rounding,
    which depends on the chunking: the first must win for every chunking (it once flipped)."""
    from cli_helpers import blobs

    X = blobs(12_000, 3, seed=17)
    kwargs = dict(covariance_type="full", random_state=7, tol=0.0, max_iter=30, n_init=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = [GaussianMixture(3, **kwargs).fit(da.from_array(X, chunks=(rows, 3))) for rows in (1000, 337, 4000)]
    for other in fits[1:]:
        np.testing.assert_allclose(other.means_, fits[0].means_, rtol=1e-9)
        np.testing.assert_allclose(other.weights_, fits[0].weights_, rtol=1e-9)


def test_best_restart_rule():
    """The restart rule of fit and partial_fit: the largest lower bound, ties within TIE_RTOL
    (relative) to the earlier restart, -inf never preferred to a finite bound."""
    from dgmm.chunk import best_restart

    assert best_restart([-5.0, -5.0 * (1 - 1e-12), -6.0]) == 0  # a rounding-level "improvement" is a tie
    assert best_restart([-5.0, -5.0 * (1 - 1e-8)]) == 1  # a real improvement wins
    assert best_restart([-np.inf, -3.0, -3.0]) == 1
    assert best_restart([2.0, 1.0, 2.0 + 1e-6]) == 2
    assert best_restart([-1.0]) == 0


def test_partial_fit_first_batch_uses_the_tie_rule():
    """partial_fit's first batch picks among the n_init candidates by fit's rule: a later
    candidate better only at the level of rounding (where np.argmax would take it) loses."""
    from dgmm import chunk
    from dgmm.online import MixtureParameters, OnlineEM
    from dgmm.passes import DataPasses

    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 6])
    gm = GaussianMixture(2, random_state=0).fit(X)

    def candidate(shift, order):
        return MixtureParameters(gm.weights_[order], gm.means_[order] + shift, gm.covariances_[order],
                                 gm.precisions_cholesky_[order])

    first = candidate(0.1, [0, 1])
    second = candidate(0.1 - 1e-9, [1, 0])  # the same mixture, components swapped, a hair nearer the optimum
    lls = [
        chunk.e_step_statistics(X, (chunk.chunk_params(p.weights, p.means, p.precisions_cholesky, "full"),))[0]
        .log_likelihood for p in (first, second)
    ]
    gain = (lls[1] - lls[0]) / abs(lls[0])
    assert 0 < gain < chunk.TIE_RTOL, gain  # the setup: argmax would take the second candidate
    state = OnlineEM([first, second], "full", reg_covar=1e-6, eps=np.finfo(np.float64).eps)
    state.step(DataPasses(X), 0.6)
    picked = state.parameters.means  # after one step, in the picked candidate's component order
    assert np.linalg.norm(picked[0] - gm.means_[0]) < np.linalg.norm(picked[0] - gm.means_[1])


def test_parameters_that_cannot_fit_in_memory_are_refused_before_any_pass():
    """A (features, samples) array read the wrong way round: 3 rows of 200,000 features want 3.8 TB of covariances."""
    from dgmm.validation import check_parameter_memory

    reads = []
    X = da.random.random((3, 200_000), chunks=(3, 200_000)).map_blocks(lambda b: reads.append(1) or b,
                                                                      meta=np.empty((0, 0)))
    with pytest.raises(MemoryError, match=r"needs about 3840\.0 GB .* X has more features \(200000\) than rows \(3\): "
                                          r"is it transposed\?"):
        GaussianMixture(3).fit(X)
    assert reads == []
    GaussianMixture(2, covariance_type="diag", max_iter=1).fit(da.random.random((3, 2000), chunks=(3, 2000)))
    check_parameter_memory(16, 64, "full", 2, 10, available=4 * 16 * 64**2 * 8 * 2)  # exactly fits
    with pytest.raises(MemoryError, match="n_init=2"):
        check_parameter_memory(16, 64, "full", 2, 10, available=4 * 16 * 64**2 * 8 * 2 - 1)
    check_parameter_memory(16, 10**6, "spherical", 1, 10, available=0)  # no d² parameters


def test_a_warm_start_with_another_covariance_type_or_n_components_says_so():
    """warm_start continues the fitted parameters: after set_params(covariance_type=...) the fit crashed in a matmul
    (as sklearn's does); it now says what to change."""
    X = np.random.default_rng(0).normal(size=(300, 3))
    for change in ({"covariance_type": "diag"}, {"n_components": 3}):
        gm = GaussianMixture(2, warm_start=True, random_state=0).fit(X)
        with pytest.raises(ValueError, match=r"warm_start continues the fitted model \(2 components, covariances of "
                                             r"shape \(2, 3, 3\)\), .*set warm_start=False"):
            gm.set_params(**change).fit(X)
