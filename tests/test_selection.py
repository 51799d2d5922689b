"""dgmm.select: a BIC/AIC sweep whose candidates share every pass over the data."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import dgmm
from dgmm import GaussianMixture, select


def known_mixture(n=3000, seed=0):
    """Three well-separated diagonal Gaussians in 3-D: the truth is (3, 'diag') or richer."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 9.0, -3.0]])
    scales = np.array([[1.0, 0.3, 2.0], [0.5, 1.5, 1.0], [2.0, 0.7, 0.4]])
    labels = rng.integers(0, 3, size=n)
    return means[labels] + rng.standard_normal((n, 3)) * scales[labels]


def test_sweep_matches_individual_fits_and_reads_each_chunk_once_per_iteration():
    X = known_mixture(1200, seed=1)
    Xd = da.from_array(X, chunks=(173, 3))
    params = dict(random_state=0, tol=1e-4, max_iter=40)
    sweep = select(Xd, n_components=range(1, 5), covariance_types=("full", "diag"), **params)
    assert len(sweep.results) == 8
    for row, gm in zip(sweep.results, sweep.estimators):
        alone = GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], **params).fit(Xd)
        np.testing.assert_allclose(row["bic"], alone.bic(Xd), rtol=1e-8)
        np.testing.assert_allclose(row["aic"], alone.aic(Xd), rtol=1e-8)
        np.testing.assert_allclose(gm.means_, alone.means_, rtol=1e-8, atol=1e-10)
        assert row["n_iter"] == alone.n_iter_
    # passes: ONE shared initialisation (as long as the longest candidate's alone), then ONE pass per EM
    # iteration for all, then one scoring pass
    longest = max(row["n_iter"] for row in sweep.results)
    init_passes = max(
        GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], **{**params, "max_iter": 0})
        .fit(Xd)
        .n_passes_
        for row in sweep.results
    )
    assert sweep.n_passes == init_passes + longest + 1


def test_sweep_picks_the_true_number_of_components_and_type():
    X = known_mixture(3000, seed=2)
    sweep = select(X, n_components=range(1, 7), covariance_types=("spherical", "diag", "full"), random_state=0)
    best = sweep.results[sweep.best_index]
    assert best["n_components"] == 3
    assert best["covariance_type"] == "diag"
    assert sweep.best_estimator is sweep.estimators[sweep.best_index]
    frame = sweep.to_frame()
    assert list(frame.columns[:4]) == ["n_components", "covariance_type", "bic", "aic"]


def test_plot_and_bad_arguments(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    X = known_mixture(300, seed=3)
    sweep = select(X, n_components=[1, 2, 3], covariance_types=("diag",), criterion="aic", random_state=0)
    ax = sweep.plot()
    assert len(ax.lines) == 1
    ax.figure.savefig(tmp_path / "bic.png")
    assert (tmp_path / "bic.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="criterion"):
        select(X, criterion="likelihood")
    with pytest.raises(ValueError, match="sets 'covariance_type' itself"):
        select(X, covariance_type="full")
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        select(X[:5], n_components=[2, 8])
    for bad in ([1.5, 2], ["2"]):  # refused as GaussianMixture refuses them, not rounded
        with pytest.raises(ValueError, match=r"'n_components' parameter of GaussianMixture must be an int"):
            select(X, n_components=bad)
    with pytest.raises(ValueError, match="select\\(\\) takes no callbacks"):
        select(X, n_components=[1, 2], callbacks=print)
    for key, value in (("checkpoint", "x.npz"), ("warm_start", True)):  # it read "select() sets 'checkpoint' itself"
        with pytest.raises(ValueError, match=rf"^select\(\) takes no {key} \(it follows one fit\)"):
            select(X, n_components=[1, 2], **{key: value})
    # a candidate whose covariance cannot be factored is named
    collapsed = np.vstack([np.random.default_rng(0).normal(size=(300, 2)), np.tile([[10.0, 10.0]], (40, 1))])
    with pytest.raises(ValueError, match=r"candidate n_components=\d, covariance_type='(full|diag)': Fitting the "
                                         r"mixture model failed because some components have ill-defined"):
        select(collapsed, n_components=[1, 2, 3], covariance_types=("full", "diag"), reg_covar=0.0, random_state=0)
    # the circled candidate is the best by the criterion plotted
    import matplotlib.pyplot as plt

    for criterion in ("aic", "bic"):
        ax = sweep.plot(criterion=criterion)
        best = min(sweep.results, key=lambda row: row[criterion])
        np.testing.assert_allclose(ax.collections[0].get_offsets()[0], [best["n_components"], best[criterion]])
        plt.close(ax.figure)
    assert dgmm.select is select


def test_verbose_sweep_prints_each_candidate_and_iteration(capsys):
    X = known_mixture(600, seed=4)
    sweep = select(X, n_components=[1, 2, 3], covariance_types=("full", "diag"), random_state=0, verbose=2,
                   verbose_interval=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Sweep of 6 candidates: initialised in ")
    for row in sweep.results:
        state = "converged" if row["converged"] else "did not converge"
        assert (f"Candidate n_components={row['n_components']}, covariance_type='{row['covariance_type']}': {state} "
                f"after {row['n_iter']} iteration{'s' if row['n_iter'] > 1 else ''}, lower bound "
                f"{row['lower_bound']:.5f}") in lines
    longest = max(row["n_iter"] for row in sweep.results)
    assert sum(line.startswith("  Iteration ") for line in lines) == longest
    assert lines[-1].startswith(f"Best by BIC: n_components={sweep.results[sweep.best_index]['n_components']}, ")
    select(X, n_components=[1, 2], random_state=0)  # quiet by default
    assert capsys.readouterr().out == ""


def test_verbose_says_how_the_kept_restart_ended(capsys):
    """A candidate whose kept restart (the largest lower bound) did not converge is not "converged", even when
    another of its restarts did."""
    import warnings

    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(-3, 1, (300, 2)), rng.normal(3, 1, (300, 2)), rng.normal(0, 3, (300, 2))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sweep = select(X, n_components=[3], covariance_types=["full"], random_state=5, n_init=4, max_iter=8,
                       init_params="random", verbose=1)
    assert sweep.results[0]["converged"] is False
    assert "Candidate n_components=3, covariance_type='full': did not converge after 8 iterations" in \
        capsys.readouterr().out


def test_a_single_type_or_k_and_repeated_values_give_each_candidate_once():
    X = known_mixture(300, seed=3)
    one = select(X, n_components=2, covariance_types="full", random_state=0)  # not 'f', 'u', 'l', 'l'
    assert [(r["n_components"], r["covariance_type"]) for r in one.results] == [(2, "full")]
    twice = select(X, n_components=[2, 1, 2], covariance_types=["diag", "full", "diag"], random_state=0)
    assert [(r["n_components"], r["covariance_type"]) for r in twice.results] == [(2, "diag"), (1, "diag"),
                                                                                 (2, "full"), (1, "full")]
    reference = select(X, n_components=[2, 1], covariance_types=["diag", "full"], random_state=0)
    assert [r["bic"] for r in twice.results] == [r["bic"] for r in reference.results]
    assert reference.results[2]["covariance_type"] == "full" and reference.results[2]["n_components"] == 2
    np.testing.assert_allclose(one.best_estimator.means_, reference.estimators[2].means_, rtol=1e-10)


INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def initial_sweep(X, n_components, covariance_types, **params):
    """The sweep stopped before its first EM iteration: every candidate keeps its initial parameters."""
    return select(X, n_components=n_components, covariance_types=covariance_types, max_iter=0, **params)


@pytest.mark.parametrize("init_params", INIT_PARAMS)
@pytest.mark.parametrize("init_sample_size", [100_000, 300], ids=["in_memory", "out_of_core"])
def test_sweep_initial_parameters_equal_individual_fits(init_params, init_sample_size):
    X = known_mixture(1500, seed=4)
    Xd = da.from_array(X, chunks=(173, 3))
    params = dict(random_state=7, n_init=2, init_params=init_params, init_sample_size=init_sample_size)
    sweep = initial_sweep(Xd, (1, 2, 4), ("full", "tied", "diag", "spherical"), **params)
    for row, gm in zip(sweep.results, sweep.estimators):
        alone = GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], max_iter=0, **params)
        alone.fit(Xd)
        for name in FITTED:
            np.testing.assert_allclose(getattr(gm, name), getattr(alone, name), rtol=1e-10, atol=0, err_msg=name)


def test_sweep_consumes_a_shared_random_state_as_fits_one_after_another():
    X = known_mixture(600, seed=5)
    grid = [(k, kind) for kind in ("full", "diag") for k in (2, 3)]
    sweep = initial_sweep(X, (2, 3), ("full", "diag"), init_params="random", random_state=np.random.RandomState(3))
    shared = np.random.RandomState(3)
    for (k, kind), gm in zip(grid, sweep.estimators):
        alone = GaussianMixture(k, covariance_type=kind, init_params="random", max_iter=0, random_state=shared).fit(X)
        for name in FITTED:
            np.testing.assert_allclose(getattr(gm, name), getattr(alone, name), rtol=1e-10, atol=0, err_msg=name)


@pytest.mark.parametrize("init_params", INIT_PARAMS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_sweep_initialises_in_as_many_passes_as_its_longest_candidate(tmp_path, init_params, weighted):
    """Every chunk is read once per shared initialisation pass, not once per candidate."""
    from test_init import CountingStore

    X = known_mixture(2400, seed=6)
    weights = np.random.default_rng(1).integers(0, 4, size=len(X)).astype(float) if weighted else None
    zarr.create_array(str(tmp_path / "x.zarr"), data=X, chunks=(200, 3))
    params = dict(random_state=2, n_init=2, init_params=init_params, init_sample_size=500)
    grid = (1, 3, 6), ("full", "diag")
    alone = [
        GaussianMixture(k, covariance_type=kind, max_iter=0, **params).fit(X, sample_weight=weights).n_passes_
        for kind in grid[1]
        for k in grid[0]
    ]
    expected = {
        "kmeans": max(alone),  # k-means‖ rounds, weighing, the slowest seeding's Lloyd passes
        "k-means++": max(grid[0]) + 1,  # one pass per step of the largest k, one for the statistics
        "random": 1,
        "random_from_data": 1,
    }[init_params]
    assert max(alone) == expected
    store = CountingStore(zarr.storage.LocalStore(str(tmp_path / "x.zarr")))
    Xd = da.from_zarr(zarr.open_array(store, mode="r"))
    with dask.config.set(scheduler="threads"):
        sweep = initial_sweep(Xd, *grid, sample_weight=weights, **params)
    assert sweep.n_passes == expected + 1  # and the scoring pass
    per_chunk = sorted(store.reads.values())
    assert len(per_chunk) == 12 and per_chunk[0] == sweep.n_passes
    assert per_chunk[-1] <= sweep.n_passes + 2 * params["n_init"]  # the first centres' chunks (or head rows)


def test_weighted_sweep_equals_weighted_individual_fits():
    X = known_mixture(1500, seed=8)
    weights = np.random.default_rng(2).integers(0, 4, size=len(X)).astype(float)
    Xd, wd = da.from_array(X, chunks=(173, 3)), da.from_array(weights, chunks=(173,))
    params = dict(random_state=0, init_sample_size=300, tol=1e-4, max_iter=30)
    sweep = select(Xd, n_components=(2, 3), covariance_types=("full", "spherical"), sample_weight=wd, **params)
    for row, gm in zip(sweep.results, sweep.estimators):
        alone = GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], **params)
        alone.fit(Xd, sample_weight=wd)
        for name in FITTED:
            np.testing.assert_allclose(getattr(gm, name), getattr(alone, name), rtol=1e-8, atol=1e-12, err_msg=name)
        assert row["n_iter"] == alone.n_iter_
