"""sample_weight: integer weights equal row repetition, zero weights equal dropped rows."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture
from conftest import COVARIANCE_TYPES, make_mixture, perturbed_init


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("as_dask", [False, True, "frame"], ids=["numpy", "dask", "dask_frame"])
def test_integer_weights_equal_repeated_rows(kind, as_dask):
    X = make_mixture(n_samples=400, n_features=3, seed=41)
    weights = np.random.default_rng(0).integers(0, 4, size=len(X))
    repeated = np.repeat(X, weights, axis=0)
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=1e-8, max_iter=200)
    reference = GaussianMixture(3, **kwargs).fit(repeated)
    Xin = da.from_array(X, chunks=(37, 3)) if as_dask else X
    win = da.from_array(weights, chunks=53) if as_dask else weights  # misaligned chunks: realigned to X's
    if as_dask == "frame":  # a dask frame's column of nullable integers as the weights of its other columns
        import dask.dataframe as dd
        import pandas as pd

        frame = dd.from_pandas(pd.DataFrame(X, columns=["a", "b", "c"]).assign(w=pd.array(weights, dtype="Int64")),
                               npartitions=4)
        Xin, win = frame[["a", "b", "c"]], frame["w"]
    weighted = GaussianMixture(3, **kwargs).fit(Xin, sample_weight=win)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(weighted, name), getattr(reference, name), rtol=1e-8, err_msg=name)
    np.testing.assert_allclose(weighted.lower_bound_, reference.lower_bound_, rtol=1e-8)
    assert weighted.n_iter_ == reference.n_iter_
    np.testing.assert_allclose(weighted.score(Xin, sample_weight=win), reference.score(repeated), rtol=1e-10)


@pytest.mark.parametrize("init_params", ["random", "kmeans"])
def test_zero_weights_equal_dropped_rows_with_default_init_statistics(init_params):
    X = make_mixture(n_samples=300, n_features=2, seed=42)
    keep = np.ones(len(X), dtype=bool)
    keep[::3] = False
    w, m, p = perturbed_init(X[keep], "full")
    kwargs = dict(weights_init=w, means_init=m, precisions_init=p, tol=1e-8)
    a = GaussianMixture(3, **kwargs).fit(X[keep])
    b = GaussianMixture(3, **kwargs).fit(X, sample_weight=keep.astype(float))
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-8)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-8)
    # default initialisation with weights still gives a sound fit
    gm = GaussianMixture(3, init_params=init_params, random_state=0).fit(X, sample_weight=keep.astype(float))
    assert np.isfinite(gm.lower_bound_)


def test_bad_sample_weights():
    X = make_mixture(n_samples=100, n_features=2)
    with pytest.raises(ValueError, match="Negative values"):
        GaussianMixture(2).fit(X, sample_weight=-np.ones(100))
    with pytest.raises(ValueError, match=r"expected \(100,\)"):
        GaussianMixture(2).fit(X, sample_weight=np.ones(99))
    with pytest.raises(ValueError, match="NaN or infinity"):
        GaussianMixture(2).fit(da.from_array(X, chunks=30), sample_weight=da.from_array(np.full(100, np.nan)))
    with pytest.raises(ValueError, match="Negative values"):
        GaussianMixture(2).fit(da.from_array(X, chunks=30), sample_weight=da.from_array(-np.ones(100), chunks=40))


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_weighted_out_of_core_initialisation_takes_no_extra_pass(init_params):
    """The seeding passes carry the weights: unit weights give the unweighted fit, in as many passes."""
    X = make_mixture(n_samples=2000, n_features=3, seed=43)
    Xd = da.from_array(X, chunks=(211, 3))
    kwargs = dict(init_params=init_params, init_sample_size=300, random_state=0, n_init=2, max_iter=0)
    plain = GaussianMixture(3, **kwargs).fit(Xd)
    for weights in (np.ones(len(X)), da.ones(len(X), chunks=500)):
        ones = GaussianMixture(3, **kwargs).fit(Xd, sample_weight=weights)
        assert ones.n_passes_ == plain.n_passes_
        for name in ("weights_", "means_", "covariances_"):
            np.testing.assert_allclose(getattr(ones, name), getattr(plain, name), rtol=1e-8, err_msg=name)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data"])
@pytest.mark.parametrize("as_dask", [False, True], ids=["numpy", "dask"])
def test_zero_weight_rows_never_seed_a_component(init_params, as_dask):
    """Far outliers of weight zero: no initial mean lands among them, in or out of core."""
    X = make_mixture(n_samples=1800, n_features=2, seed=44)
    X[::9] += 1000.0  # 200 outliers
    weights = np.ones(len(X))
    weights[::9] = 0.0
    Xin = da.from_array(X, chunks=(150, 2)) if as_dask else X
    win = da.from_array(weights, chunks=(150,)) if as_dask else weights
    for init_sample_size in (100_000, 300):
        for seed in range(5):
            gm = GaussianMixture(
                3, init_params=init_params, init_sample_size=init_sample_size, random_state=seed, max_iter=0
            ).fit(Xin, sample_weight=win)
            assert np.all(np.abs(gm.means_) < 100), (init_sample_size, seed, gm.means_)
            assert np.all(gm.weights_ > 1e-6)  # no component seeded on a zero-weight row
    if init_params == "random_from_data":  # drawn among the rows of positive weight; too few of them is an error
        few = np.zeros(len(X))
        few[[5, 700]] = 1.0
        with pytest.raises(ValueError, match="n_components=3 components at a row of positive sample_weight, but "
                                             "only 2 rows have one"):
            GaussianMixture(3, init_params=init_params).fit(Xin, sample_weight=da.from_array(few) if as_dask else few)
