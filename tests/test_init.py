"""Out-of-core initialisation: k-means‖ and k-means++ over all rows, restarts sharing passes.

The out-of-core methods run when ``n_samples > init_sample_size``; the tests
force them with a small ``init_sample_size``.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.datasets import load_digits, load_iris, make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dgmm import GaussianMixture, chunk, chunk_kmeans, graph, graph_kmeans, init
from dgmm.passes import DataPasses
from conftest import COVARIANCE_TYPES, make_mixture

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


@pytest.fixture(scope="module")
def blobs():
    X, labels = make_blobs(n_samples=6000, n_features=4, centers=5, cluster_std=1.0, random_state=3)
    return X + np.array([50.0, -20.0, 0.0, 7.0]), labels


def squared_distance_matrix(X, centers):
    return ((X[:, None, :] - centers[None, :, :]) ** 2).sum(axis=-1)


def assert_same_fit(a, b, rtol=1e-9):
    for name in FITTED:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol)
    assert a.n_iter_ == b.n_iter_


# ---------------------------------------------------------------------------
# Chunk math
# ---------------------------------------------------------------------------


def test_row_uniforms_depend_on_the_row_index_only():
    whole = chunk_kmeans.row_uniforms(7, 3, 0, 1000)
    pieces = [chunk_kmeans.row_uniforms(7, 3, start, stop - start) for start, stop in [(0, 37), (37, 38), (38, 1000)]]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert whole.min() > 0.0 and whole.max() <= 1.0
    assert abs(whole.mean() - 0.5) < 0.05
    assert not np.array_equal(whole, chunk_kmeans.row_uniforms(7, 4, 0, 1000))
    assert not np.array_equal(whole, chunk_kmeans.row_uniforms(8, 3, 0, 1000))


def test_nearest_centers_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5000, 3))
    sets = (rng.normal(size=(4, 3)), rng.normal(size=(1, 3)), rng.normal(size=(9, 3)))
    labels, distances = chunk_kmeans.nearest_centers(y, sets)
    for r, centers in enumerate(sets):
        full = squared_distance_matrix(y, centers)
        np.testing.assert_array_equal(labels[:, r], full.argmin(axis=1))
        np.testing.assert_allclose(distances[:, r], full.min(axis=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_hard_assignment_statistics_equal_one_hot_statistics(kind, weighted):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(500, 3)) + 5.0
    labels = rng.integers(0, 4, size=500)
    labels[labels == 2] = 1  # an empty component
    weights = rng.uniform(0.0, 3.0, size=500) if weighted else None
    resp = np.eye(4)[labels]
    ours = chunk_kmeans.hard_assignment_statistics(y, labels, 4, kind, sample_weight=weights)
    reference = chunk.statistics_from_resp(y, resp, np.zeros((4, 3)), kind, sample_weight=weights)
    for a, b, name in zip(ours, reference, chunk.SufficientStatistics._fields):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


def _parallel_round(X, splits, candidates, seeds=(5,), oversampling=4.0, round_index=1):
    args = chunk_kmeans.ParallelRoundArgs(X[0], candidates, seeds, round_index, oversampling)
    bounds = [0, *splits, len(X)]
    parts = [chunk_kmeans.parallel_round_chunk(X[a:b], a, args) for a, b in zip(bounds[:-1], bounds[1:])]
    # a lopsided tree: merge the first two, then the rest
    merged = chunk_kmeans.combine_parallel_rounds(*parts[:2]) if len(parts) > 1 else parts[0]
    return chunk_kmeans.combine_parallel_rounds(merged, *parts[2:])


def test_parallel_round_samples_as_the_paper_whatever_the_split():
    """Rows are sampled iff u(x) < ℓ d²(x, C) / φ, with φ found in the same pass."""
    X = make_mixture(n_samples=3000, n_features=3, seed=2)
    candidates = (X[[0, 10, 20]], X[[5]])
    reference = _parallel_round(X, [], candidates, seeds=(5, 6))
    for r, seed in enumerate((5, 6)):
        d2 = squared_distance_matrix(X, candidates[r]).min(axis=1)
        u = chunk_kmeans.row_uniforms(seed, (chunk_kmeans.STREAM_PARALLEL << 32) | 1, 0, len(X))
        expected = np.flatnonzero(u < 4.0 * d2 / d2.sum())
        np.testing.assert_array_equal(reference[r].sample_index, expected)
        np.testing.assert_allclose(reference[r].cost, d2.sum(), rtol=1e-10)
        np.testing.assert_allclose(reference[r].sum_shifted, (X - X[0]).sum(axis=0), rtol=1e-10)
    for splits in ([37], [37, 74, 1000, 1001, 2999], list(range(100, 3000, 100))):
        split = _parallel_round(X, splits, candidates, seeds=(5, 6))
        for a, b in zip(split, reference):
            np.testing.assert_array_equal(a.sample_index, b.sample_index)
            np.testing.assert_array_equal(a.sample_rows, b.sample_rows)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 599), max_size=8, unique=True), st.integers(2, 5))
def test_round_results_do_not_depend_on_splits_or_tree(cuts, fan_in):
    """Any split of the rows and any reduction tree give the same sample and the same trials."""
    X = make_mixture(n_samples=600, n_features=2, seed=12)
    bounds = [0, *sorted(cuts), len(X)]
    pieces = list(zip(bounds[:-1], bounds[1:]))

    def reduce(parts, combine):
        while len(parts) > 1:
            parts = [combine(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
        return parts[0]

    parallel = chunk_kmeans.ParallelRoundArgs(X[0], (X[[0, 1]],), (3,), 1, 6.0)
    whole = chunk_kmeans.parallel_round_chunk(X, 0, parallel)[0]
    split = reduce([chunk_kmeans.parallel_round_chunk(X[a:b], a, parallel) for a, b in pieces],
                   chunk_kmeans.combine_parallel_rounds)[0]
    np.testing.assert_array_equal(split.sample_index, whole.sample_index)
    plusplus = chunk_kmeans.PlusPlusArgs(X[0], (X[[0]],), (X[[1, 2]],), (3,), 1, 3)
    whole = chunk_kmeans.plusplus_round_chunk(X, 0, plusplus)[0]
    split = reduce([chunk_kmeans.plusplus_round_chunk(X[a:b], a, plusplus) for a, b in pieces],
                   chunk_kmeans.combine_plusplus_rounds)[0]
    np.testing.assert_array_equal(split.index, whole.index)
    np.testing.assert_allclose(split.potentials, whole.potentials, rtol=1e-12)


def test_weighing_pass_counts_and_sums_the_rows_each_candidate_attracts():
    X = make_mixture(n_samples=3000, n_features=3, seed=2)
    candidates = (X[[0, 10, 20, 30]],)
    labels = squared_distance_matrix(X, candidates[0]).argmin(axis=1)
    for splits in ([], [37, 74, 1000, 1001, 2999]):
        (weighed,) = _parallel_round(X, splits, candidates, oversampling=0.0)
        np.testing.assert_array_equal(weighed.counts, np.bincount(labels, minlength=4))
        for j in range(4):
            np.testing.assert_allclose(weighed.sums[j], (X[labels == j] - X[0]).sum(axis=0), rtol=1e-9, atol=1e-9)
        assert len(weighed.sample_index) == 0


def test_plusplus_round_keeps_the_smallest_keys_whatever_the_split():
    X = make_mixture(n_samples=2000, n_features=2, seed=3)
    args = chunk_kmeans.PlusPlusArgs(X[0], (X[[0]],), (X[[5, 6, 7]],), (9,), 2, 4)
    whole = chunk_kmeans.plusplus_round_chunk(X, 0, args)[0]
    parts = [chunk_kmeans.plusplus_round_chunk(X[a : a + 37], a, args) for a in range(0, len(X), 37)]
    split = chunk_kmeans.combine_plusplus_rounds(*parts)[0]
    np.testing.assert_array_equal(split.index, whole.index)
    np.testing.assert_allclose(split.potentials, whole.potentials, rtol=1e-10)
    d2 = np.minimum(squared_distance_matrix(X, X[[0]]), squared_distance_matrix(X, X[[5, 6, 7]]))
    np.testing.assert_allclose(whole.potentials, d2.sum(axis=0), rtol=1e-10)
    exponential = -np.log(chunk_kmeans.row_uniforms(9, (chunk_kmeans.STREAM_PLUSPLUS << 32) | 2, 0, len(X)))
    for t in range(3):
        with np.errstate(divide="ignore"):
            keys = np.where(d2[:, t] > 0, exponential / d2[:, t], np.inf)
        np.testing.assert_array_equal(whole.index[t], np.argsort(keys, kind="stable")[:4])


def _assert_same(a, b, rtol=1e-10):
    """Equal pass results (tuples, NamedTuples, arrays, numbers); ``rtol=0``: bit for bit."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y, rtol)
    elif rtol == 0:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9)


def test_a_batch_of_seedings_gets_each_seeding_s_own_result_in_one_pass():
    """A batch shares the chunk; each member's result is exactly the one it gets alone, whatever the split."""
    X = make_mixture(n_samples=1500, n_features=3, seed=13)
    rounds = (
        chunk_kmeans.ParallelRoundArgs(X[0], (X[[0]], X[[0, 9]]), (5, 6), 2, 4.0),
        chunk_kmeans.ParallelRoundArgs(X[0], (X[[0, 1, 2]],), (5,), 2, 10.0),
        chunk_kmeans.ParallelRoundArgs(X[0], (X[[3, 4]],), (7,), 2, 0.0),
    )
    plusplus = (
        chunk_kmeans.PlusPlusArgs(X[0], (X[[0]],), (X[[1, 2]],), (3,), 2, 3),
        chunk_kmeans.PlusPlusArgs(X[0], (X[[0, 5]], X[[7]]), (X[[8]], X[[9, 10]]), (3, 4), 2, 0),
    )
    lloyd = (
        chunk_kmeans.LloydArgs((X[:3], X[3:6]), X.mean(axis=0), ("full", "diag")),
        chunk_kmeans.LloydArgs((X[10:15],), X.mean(axis=0), "spherical"),
    )
    passes = [
        (chunk_kmeans.parallel_round_chunk, chunk_kmeans.combine_parallel_rounds, rounds),
        (chunk_kmeans.plusplus_round_chunk, chunk_kmeans.combine_plusplus_rounds, plusplus),
        (chunk_kmeans.lloyd_chunk, chunk_kmeans.combine_lloyd_steps, lloyd),
    ]
    for chunk_fn, combine, batch in passes:
        whole = chunk_fn(X, 0, batch)
        assert len(whole) == len(batch)
        for member, args in zip(whole, batch):
            _assert_same(member, chunk_fn(X, 0, args), rtol=0)
        split = combine(*[chunk_fn(X[a : a + 137], a, batch) for a in range(0, len(X), 137)])
        _assert_same(split, whole)


def test_lloyd_statistics_of_several_types_share_counts_and_sums():
    """Counts and sums are shared by every type; 'full' moments are about the centres (sx: Σ w (y - s))."""
    X = make_mixture(n_samples=800, n_features=3, seed=14)
    centers, center = X[:4], X.mean(axis=0)
    (step,) = chunk_kmeans.lloyd_chunk(X, 0, chunk_kmeans.LloydArgs((centers,), center, COVARIANCE_TYPES))
    diag = step.statistics[COVARIANCE_TYPES.index("diag")]
    for kind, statistics in zip(COVARIANCE_TYPES, step.statistics):
        (alone,) = chunk_kmeans.lloyd_chunk(X, 0, chunk_kmeans.LloydArgs((centers,), center, kind))
        for name, a, b in zip(chunk.SufficientStatistics._fields, statistics, alone.statistics):
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} {name}")
        np.testing.assert_array_equal(statistics.nk, step.statistics[0].nk)
        if kind == "full":
            np.testing.assert_allclose(statistics.sx + statistics.nk[:, None] * (centers - center), diag.sx,
                                       rtol=1e-12, atol=1e-9)
        else:
            np.testing.assert_array_equal(statistics.sx, diag.sx)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_weighted_passes_equal_repeated_rows(kind):
    """Integer row weights count as copies: costs, weighing, Lloyd statistics and k-means++ potentials."""
    X = make_mixture(n_samples=700, n_features=3, seed=15)
    weights = np.random.default_rng(3).integers(0, 4, size=len(X)).astype(float)
    repeated = np.repeat(X, weights.astype(int), axis=0)
    center = X.mean(axis=0)
    lloyd = chunk_kmeans.LloydArgs((X[:3], X[3:8]), center, (kind,))
    weighted = chunk_kmeans.combine_lloyd_steps(
        *[chunk_kmeans.lloyd_chunk(X[a : a + 97], a, lloyd, weights[a : a + 97]) for a in range(0, len(X), 97)]
    )
    # the farthest rows are not repetition-invariant (one copy is moved, as in sklearn): compare the rest
    _assert_same(
        tuple((s.inertia, s.statistics) for s in weighted),
        tuple((s.inertia, s.statistics) for s in chunk_kmeans.lloyd_chunk(repeated, 0, lloyd)),
    )
    reference = chunk.statistics_from_resp(
        X - center, np.eye(3)[squared_distance_matrix(X, X[:3]).argmin(axis=1)], X[:3] - center, kind,
        sample_weight=weights,
    )
    _assert_same(weighted[0].statistics[0], reference)
    weigh = chunk_kmeans.ParallelRoundArgs(X[0], (X[[0, 10, 20]],), (5,), 4, 0.0)
    ours = chunk_kmeans.parallel_round_chunk(X, 0, weigh, weights)[0]
    theirs = chunk_kmeans.parallel_round_chunk(repeated, 0, weigh)[0]
    for name in ("cost", "sum_shifted", "total_weight", "counts", "sums"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10, err_msg=name)
    plusplus = chunk_kmeans.PlusPlusArgs(X[0], (X[[0]],), (X[[5, 6, 7]],), (9,), 2, 0)
    np.testing.assert_allclose(
        chunk_kmeans.plusplus_round_chunk(X, 0, plusplus, weights)[0].potentials,
        chunk_kmeans.plusplus_round_chunk(repeated, 0, plusplus)[0].potentials,
        rtol=1e-10,
    )


def test_weighted_sampling_is_proportional_to_weight_times_squared_distance():
    """k-means‖ samples a row iff u(x) < ℓ w d² / φ; k-means++ never draws a zero-weight row."""
    X = make_mixture(n_samples=3000, n_features=3, seed=16)
    weights = np.random.default_rng(4).integers(0, 3, size=len(X)).astype(float)
    args = chunk_kmeans.ParallelRoundArgs(X[0], (X[[0, 10]],), (5,), 1, 8.0)
    parts = [
        chunk_kmeans.parallel_round_chunk(X[a : a + 400], a, args, weights[a : a + 400]) for a in range(0, 3000, 400)
    ]
    (result,) = chunk_kmeans.combine_parallel_rounds(*parts)
    wd2 = weights * squared_distance_matrix(X, X[[0, 10]]).min(axis=1)
    u = chunk_kmeans.row_uniforms(5, (chunk_kmeans.STREAM_PARALLEL << 32) | 1, 0, len(X))
    np.testing.assert_array_equal(result.sample_index, np.flatnonzero(u < 8.0 * wd2 / wd2.sum()))
    assert np.all(weights[result.sample_index] > 0)
    plusplus = chunk_kmeans.PlusPlusArgs(X[0], (X[[0]],), (X[[5, 6]],), (9,), 2, 50)
    (trials,) = chunk_kmeans.plusplus_round_chunk(X, 0, plusplus, weights)
    assert np.all(weights[trials.index] > 0)


# ---------------------------------------------------------------------------
# Empty clusters: sklearn's relocation, found in the Lloyd pass itself
# ---------------------------------------------------------------------------


def _centers_with_empty_clusters(X, n_far=2):
    """Four data rows, then ``n_far`` centres far from every row (their clusters are empty)."""
    far = X.mean(axis=0) + 100.0 * np.arange(1, n_far + 1)[:, None] * np.eye(X.shape[1])[:n_far]
    return np.vstack([X[[0, 100, 200, 300]], far])


def _lloyd_pass(X, args, weights=None, chunk_rows=None, fan_in=8):
    """A Lloyd pass over ``X`` cut into ``chunk_rows``-row chunks and merged by a tree of fan-in ``fan_in``."""
    chunk_rows = len(X) if chunk_rows is None else chunk_rows
    starts = range(0, len(X), chunk_rows)
    if weights is None:
        parts = [chunk_kmeans.lloyd_chunk(X[a : a + chunk_rows], a, args) for a in starts]
    else:
        parts = [chunk_kmeans.lloyd_chunk(X[a : a + chunk_rows], a, args, weights[a : a + chunk_rows]) for a in starts]
    while len(parts) > 1:
        parts = [chunk_kmeans.combine_lloyd_steps(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return chunk_kmeans.combine_lloyd_steps(parts[0])


def _sklearn_update(X, weights, centers):
    """sklearn's Lloyd update with ``_relocate_empty_clusters_dense``: labels, weight per cluster, sums, new centres."""
    from sklearn.cluster._k_means_common import _relocate_empty_clusters_dense

    labels = squared_distance_matrix(X, centers).argmin(axis=1).astype(np.int32)
    weight_in_clusters = np.bincount(labels, weights=weights, minlength=len(centers))
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, weights[:, None] * X)
    _relocate_empty_clusters_dense(
        np.ascontiguousarray(X), weights, np.ascontiguousarray(centers), sums, weight_in_clusters, labels
    )
    with np.errstate(invalid="ignore", divide="ignore"):  # clusters still empty
        return labels, weight_in_clusters, sums, sums / weight_in_clusters[:, None]


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_pass_relocates_empty_clusters_as_sklearn(weighted):
    """Each empty cluster takes a farthest row, as sklearn's relocation does; its donor gives it up."""
    X = make_mixture(n_samples=700, n_features=3, seed=17)
    weights = np.random.default_rng(5).uniform(0.5, 3.0, size=len(X)) if weighted else None
    centers, center = _centers_with_empty_clusters(X), X.mean(axis=0)
    args = chunk_kmeans.LloydArgs((centers,), center, COVARIANCE_TYPES)
    (step,) = _lloyd_pass(X, args, weights)
    assert np.count_nonzero(step.statistics[0].nk == 0) == 2
    step, relocated, shifts = chunk_kmeans.relocate_empty_clusters(step, center, COVARIANCE_TYPES, centers - center)
    np.testing.assert_array_equal(relocated, [4, 5])

    w = np.ones(len(X)) if weights is None else weights
    labels, weight_in_clusters, _, updated = _sklearn_update(X, w, centers)
    distances = ((X - centers[labels]) ** 2).sum(axis=1)
    farthest = np.argsort(-distances, kind="stable")[:2]
    np.testing.assert_array_equal(step.farthest.index[:2], farthest)
    np.testing.assert_allclose(step.statistics[0].nk, weight_in_clusters, rtol=1e-12)
    full = step.statistics[0]  # COVARIANCE_TYPES[0]: 'full', about the shifts
    np.testing.assert_allclose(center + shifts + full.sx / full.nk[:, None], updated, rtol=1e-10)
    diag = step.statistics[COVARIANCE_TYPES.index("diag")]
    np.testing.assert_allclose(center + diag.sx / diag.nk[:, None], updated, rtol=1e-10)
    np.testing.assert_allclose(updated[[4, 5]], X[farthest], rtol=1e-12)
    # 'full' moments about the centres, and about their row for the relocated clusters
    np.testing.assert_array_equal(shifts[:4], (centers - center)[:4])
    np.testing.assert_array_equal(shifts[[4, 5]], X[farthest] - center)
    # every type's statistics are those of the relocated hard assignment
    moved = labels.copy()
    moved[farthest] = [4, 5]
    for kind, ours in zip(COVARIANCE_TYPES, step.statistics):
        reference = chunk.statistics_from_resp(X - center, np.eye(6)[moved], shifts, kind, sample_weight=w)
        for a, b, name in zip(ours, reference, chunk.SufficientStatistics._fields):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9, err_msg=f"{kind} {name}")


def test_farthest_rows_do_not_depend_on_chunks_or_fan_in():
    """The kept rows are the largest (distance, then lowest row index), bit for bit, whatever the split."""
    X = make_mixture(n_samples=900, n_features=3, seed=18)
    X[[50, 400, 899]] = X[600] + 30.0  # three equally far rows: ties broken by the row index
    weights = np.random.default_rng(6).integers(1, 4, size=len(X)).astype(float)
    args = (
        chunk_kmeans.LloydArgs((_centers_with_empty_clusters(X, 3), X[:2]), X.mean(axis=0), "diag"),
        chunk_kmeans.LloydArgs((_centers_with_empty_clusters(X, 1),), X.mean(axis=0), ("full", "tied")),
    )
    for w in (None, weights):
        whole = _lloyd_pass(X, args, w)
        assert len(whole[0][0].farthest.index) == 6 and len(whole[0][1].farthest.index) == 1
        np.testing.assert_array_equal(whole[0][0].farthest.index[:3], [50, 400, 899])
        for chunk_rows, fan_in in [(37, 2), (37, 3), (100, 8), (899, 2)]:
            split = _lloyd_pass(X, args, w, chunk_rows, fan_in)
            for a, b in zip(split, whole):
                for sa, sb in zip(a, b):
                    _assert_same(sa.farthest, sb.farthest, rtol=0)


def test_rows_of_zero_weight_are_never_relocated():
    """A zero weight drops the row: relocation equals sklearn's on the data without it."""
    X = make_mixture(n_samples=700, n_features=3, seed=19)
    centers, center = _centers_with_empty_clusters(X), X.mean(axis=0)
    labels = squared_distance_matrix(X, centers).argmin(axis=1)
    distances = ((X - centers[labels]) ** 2).sum(axis=1)
    weights = np.ones(len(X))
    weights[np.argsort(-distances)[:3]] = 0.0  # the three farthest rows
    args = chunk_kmeans.LloydArgs((centers,), center, "full")
    (step,) = _lloyd_pass(X, args, weights, chunk_rows=37)
    assert np.all(weights[step.farthest.index] > 0)
    step, _, shifts = chunk_kmeans.relocate_empty_clusters(step, center, "full", centers - center)
    kept = weights > 0
    _, weight_in_clusters, _, updated = _sklearn_update(X[kept], weights[kept], centers)
    np.testing.assert_allclose(step.statistics.nk, weight_in_clusters, rtol=1e-12)
    np.testing.assert_allclose(center + shifts + step.statistics.sx / step.statistics.nk[:, None], updated, rtol=1e-10)


def test_nothing_is_relocated_when_every_row_sits_on_a_centre():
    """More clusters than distinct rows: sklearn leaves them empty (every distance is zero)."""
    X = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]]), 50, axis=0)
    centers = np.array([[0.0, 1.0], [2.0, 3.0], [9.0, 9.0]])
    args = chunk_kmeans.LloydArgs((centers,), X.mean(axis=0), "diag")
    (step,) = _lloyd_pass(X, args, chunk_rows=37)
    adjusted, relocated, _ = chunk_kmeans.relocate_empty_clusters(step, X.mean(axis=0), "diag")
    assert len(relocated) == 0
    _assert_same(adjusted, step, rtol=0)


def test_a_cluster_that_gives_up_all_its_rows_is_left_exactly_empty():
    """Two outliers, alone in their cluster, are the farthest rows: both move, and their cluster is empty."""
    X = make_mixture(n_samples=500, n_features=3, seed=22)
    X[[10, 20]] = [[60.0, 0.0, 0.0], [60.0, 0.3, 0.0]]
    centers = np.vstack([X[[0, 100, 200]], [[45.0, 0.0, 0.0]], _centers_with_empty_clusters(X, 2)[4:]])
    weights = np.random.default_rng(8).uniform(0.1, 3.0, size=len(X))
    args = chunk_kmeans.LloydArgs((centers,), X.mean(axis=0), ("full", "tied", "diag", "spherical"))
    (step,) = _lloyd_pass(X, args, weights, chunk_rows=37)
    step, relocated, shifts = chunk_kmeans.relocate_empty_clusters(
        step, X.mean(axis=0), args.covariance_type, centers - X.mean(axis=0)
    )
    np.testing.assert_array_equal(relocated, [4, 5])
    np.testing.assert_array_equal(np.sort(step.farthest.index[:2]), [10, 20])
    _, weight_in_clusters, sums, _ = _sklearn_update(X, weights, centers)
    for kind, part in zip(args.covariance_type, step.statistics):
        assert part.nk[3] == 0 and np.all(part.sx[3] == 0), kind
        if kind != "tied":
            assert np.all(part.sxx[3] == 0), kind
        np.testing.assert_allclose(part.nk, weight_in_clusters, rtol=1e-12, atol=1e-12)
        shift = shifts if kind == "full" else 0.0
        np.testing.assert_allclose(part.sx + part.nk[:, None] * (X.mean(axis=0) + shift), sums, rtol=1e-10, atol=1e-9)


def _sklearn_lloyd(X, weights, centers, n_passes):
    """sklearn's own Lloyd iterations (``lloyd_iter_chunked_dense``, relocation included) from ``centers``."""
    from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense

    centers = np.ascontiguousarray(centers, dtype=np.float64)
    labels = np.zeros(len(X), dtype=np.int32)
    for _ in range(n_passes):
        new = np.zeros_like(centers)
        weight_in_clusters = np.zeros(len(centers))
        shift = np.zeros(len(centers))
        lloyd_iter_chunked_dense(np.ascontiguousarray(X), weights, centers, new, weight_in_clusters, labels, shift, 1)
        centers = new
    return centers


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_passes_relocate_each_seeding_of_a_batch_as_sklearn(monkeypatch, weighted):
    """Driver: every restart of every seeding of a batch follows sklearn's Lloyd, whatever the chunking."""
    X = make_mixture(n_samples=1100, n_features=3, seed=20)
    weights = np.random.default_rng(7).uniform(0.5, 2.0, size=len(X)) if weighted else None
    given = {  # per restart seed, the reclustered centres
        1: _centers_with_empty_clusters(X, 1),  # one empty cluster
        2: X[[0, 1, 2, 3, 4]],  # none
        3: _centers_with_empty_clusters(X, 2),  # two
    }
    monkeypatch.setattr(init, "_recluster", lambda cell_means, counts, n_components, seed: given[seed].copy())
    jobs = [init.KMeansJob(5, (1, 2), ("full", "diag")), init.KMeansJob(6, (3,), ("spherical",))]
    options = dict(lloyd_max_iter=3, lloyd_tol=0.0)
    reference = init.kmeans_parallel_batch(DataPasses(X, sample_weight=weights), jobs, **options)
    w = np.ones(len(X)) if weights is None else weights
    for job, result in zip(jobs, reference):
        for seed, centers, n_lloyd in zip(job.seeds, result.centers, result.n_lloyd):
            np.testing.assert_allclose(centers, _sklearn_lloyd(X, w, given[seed], n_lloyd), rtol=1e-9, atol=1e-9)
        for kind, statistics in result.statistics.items():
            for centers, part, full_shifts in zip(result.centers, statistics, result.shifts):
                assert np.all(part.nk > 0)  # the relocated clusters hold their rows
                shifts = full_shifts if kind == "full" else 0.0
                np.testing.assert_allclose(result.center + shifts + part.sx / part.nk[:, None], centers, rtol=1e-9,
                                           atol=1e-9)
    for chunks, split_every in [(37, 2), (250, 3)]:
        data = DataPasses(da.from_array(X, chunks=(chunks, 3)), split_every=split_every, sample_weight=weights)
        for ours, theirs in zip(init.kmeans_parallel_batch(data, jobs, **options), reference):
            assert ours.n_lloyd == theirs.n_lloyd
            for a, b in zip(ours.centers, theirs.centers):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_a_relocation_on_the_last_pass_keeps_the_statistics_consistent(monkeypatch):
    """One Lloyd pass: the initial statistics are those of the relocated assignment, their means the centres."""
    X = make_mixture(n_samples=800, n_features=3, seed=21)
    centers = _centers_with_empty_clusters(X, 2)
    monkeypatch.setattr(init, "_recluster", lambda cell_means, counts, n_components, seed: centers.copy())
    data = DataPasses(da.from_array(X, chunks=(37, 3)), split_every=3)
    result = init.kmeans_parallel(data, 6, seeds=(4,), covariance_type="full", lloyd_max_iter=1)
    assert result.n_lloyd == [1]
    labels = squared_distance_matrix(X, centers).argmin(axis=1)
    farthest = np.argsort(-((X - centers[labels]) ** 2).sum(axis=1), kind="stable")[:2]
    labels[farthest] = [4, 5]
    np.testing.assert_array_equal(result.shifts[0][[4, 5]], X[farthest] - result.center)  # about their rows
    reference = chunk.statistics_from_resp(X - result.center, np.eye(6)[labels], result.shifts[0], "full")
    for a, b, name in zip(result.statistics["full"][0], reference, chunk.SufficientStatistics._fields):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(result.centers[0][[4, 5]], X[farthest], rtol=1e-12)


# ---------------------------------------------------------------------------
# Graph builders
# ---------------------------------------------------------------------------


def test_graph_builders_do_not_compute():
    def refuse(*args, **kwargs):
        raise AssertionError("a graph builder computed")

    X = da.from_array(make_mixture(n_samples=500, n_features=2), chunks=(37, 2))
    blocks = graph.RowBlocks(X)
    with dask.config.set(scheduler=refuse):
        origin = np.zeros(2)
        graph_kmeans.parallel_round(blocks, chunk_kmeans.ParallelRoundArgs(origin, (origin[None],), (1,), 1, 2.0), 3)
        graph_kmeans.plusplus_round(blocks, chunk_kmeans.PlusPlusArgs(origin, (origin[None],), (origin[:0, None].T,), (1,), 1, 3))
        graph_kmeans.lloyd_step(blocks, chunk_kmeans.LloydArgs((np.eye(2),), origin, "full"), 2)
        weighted = graph.RowBlocks(X, da.ones(500, chunks=100))
        lloyd = chunk_kmeans.LloydArgs((np.eye(2),), origin, ("full", "diag"))
        graph_kmeans.lloyd_step(weighted, (lloyd, lloyd), 2)
        specs = (chunk.InitResp("random", 2, seed=1),)
        graph_kmeans.init_statistics(weighted, chunk_kmeans.InitStatisticsArgs(origin, (("full", specs),)), 2)


# ---------------------------------------------------------------------------
# Drivers: quality against sklearn
# ---------------------------------------------------------------------------


def test_kmeans_parallel_matches_sklearn_kmeans_on_blobs(blobs):
    X, _ = blobs
    reference = KMeans(5, n_init=10, random_state=0).fit(X)
    data = DataPasses(da.from_array(X, chunks=(437, 4)), split_every=3)
    result = init.kmeans_parallel(data, 5, seeds=(11, 12, 13))
    assert data.n_passes == init.KMEANS_PARALLEL_ROUNDS + 1 + max(result.n_lloyd)
    for centers, inertia in zip(result.centers, result.inertia):
        distances = squared_distance_matrix(X, centers)
        assert adjusted_rand_score(reference.labels_, distances.argmin(axis=1)) >= 0.99
        assert distances.min(axis=1).sum() <= 1.02 * reference.inertia_
        assert inertia <= 1.02 * reference.inertia_


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_initial_means_are_the_kmeans_partition(blobs, kind):
    """max_iter=0 keeps the initial parameters: the means of the k-means partition."""
    X, _ = blobs
    reference = KMeans(5, n_init=10, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(5, covariance_type=kind, max_iter=0, init_sample_size=500, random_state=4)
        gm.fit(da.from_array(X, chunks=(600, 4)))
    labels = squared_distance_matrix(X, gm.means_).argmin(axis=1)
    assert adjusted_rand_score(reference.labels_, labels) >= 0.99
    assert squared_distance_matrix(X, gm.means_).min(axis=1).sum() <= 1.02 * reference.inertia_
    np.testing.assert_allclose(gm.weights_, np.bincount(labels, minlength=5) / len(X), atol=1e-3)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_fused_lloyd_statistics_equal_a_nearest_pass(kind):
    """The last Lloyd pass's statistics are those of the 'nearest' initial responsibilities."""
    X = make_mixture(n_samples=1500, n_features=3, seed=4)
    data = DataPasses(da.from_array(X, chunks=(137, 3)))
    result = init.kmeans_parallel(data, 3, seeds=(1, 2), covariance_type=kind)
    specs = [chunk.InitResp("nearest", 3, centers=c) for c in result.assigned_centers]
    reference = data.init_statistics(specs, result.center, kind)
    for ours, theirs in zip(result.statistics[kind], reference):
        for a, b, name in zip(ours, theirs, chunk.SufficientStatistics._fields):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(result.center, X.mean(axis=0), rtol=1e-12)


def test_kmeans_plusplus_out_of_core_seeds_every_blob(blobs):
    X, labels = blobs
    data = DataPasses(da.from_array(X, chunks=(437, 4)))
    rows = init.kmeans_plusplus_rows(data, 5, seeds=(3, 4, 5))
    assert data.n_passes == 5
    _, sklearn_rows = kmeans_plusplus(X, 5, random_state=0)
    sklearn_potential = squared_distance_matrix(X, X[sklearn_rows]).min(axis=1).sum()
    for chosen in rows:
        assert len(set(labels[chosen])) == 5  # one seed in every well-separated blob
        assert squared_distance_matrix(X, X[chosen]).min(axis=1).sum() <= 2 * sklearn_potential


# ---------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_same_model_whatever_the_chunking_and_fan_in(init_params):
    X = make_mixture(n_samples=1200, n_features=3, seed=6)
    kwargs = dict(init_params=init_params, init_sample_size=100, random_state=8, n_init=2, tol=1e-8, max_iter=30)
    reference = GaussianMixture(3, **kwargs).fit(X)  # one chunk, in-process
    for chunks, split_every in [(37, 2), (250, 3), (1199, 8)]:
        gm = GaussianMixture(3, split_every=split_every, **kwargs).fit(da.from_array(X, chunks=(chunks, 3)))
        assert_same_fit(gm, reference)


@pytest.fixture(scope="module")
def cluster_fits():
    """The same fits on a LocalCluster of worker processes, with one worker and then two."""
    from distributed import Client, LocalCluster

    X = make_mixture(n_samples=2000, n_features=3, seed=7)
    fits = {}
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster, Client(cluster) as client:
        for n_workers in (1, 2):
            cluster.scale(n_workers)
            client.wait_for_workers(n_workers)
            assert len(client.scheduler_info()["workers"]) == n_workers
            for init_params in ("kmeans", "k-means++"):
                gm = GaussianMixture(3, init_params=init_params, init_sample_size=200, random_state=5, n_init=2, max_iter=4)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    fits[n_workers, init_params] = gm.fit(da.from_array(X, chunks=(173, 3)))
    return X, fits


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++"])
def test_same_model_on_threads_and_on_process_clusters(cluster_fits, init_params):
    X, fits = cluster_fits
    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        threaded = GaussianMixture(3, init_params=init_params, init_sample_size=200, random_state=5, n_init=2, max_iter=4)
        threaded.fit(da.from_array(X, chunks=(400, 3)))
    assert_same_fit(fits[1, init_params], threaded)
    assert_same_fit(fits[2, init_params], threaded)


# ---------------------------------------------------------------------------
# Restarts share every pass
# ---------------------------------------------------------------------------


class CountingStore(zarr.storage.WrapperStore):
    """A Zarr store that counts reads of every chunk key."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = Counter()
        self._lock = threading.Lock()

    def _with_store(self, store):  # zarr re-wraps the store read-only: share the counter
        wrapped = super()._with_store(store)
        wrapped.reads, wrapped._lock = self.reads, self._lock
        return wrapped

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in f"/{key}":
            with self._lock:
                self.reads[key] += 1
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("init_params", ["kmeans", "random"])
def test_restarts_read_each_chunk_once_per_pass(tmp_path, init_params):
    X = make_mixture(n_samples=3000, n_features=3, seed=9)
    zarr.create_array(str(tmp_path / "x.zarr"), data=X, chunks=(250, 3))
    n_chunks = 12
    for n_init in (1, 4):
        store = CountingStore(zarr.storage.LocalStore(str(tmp_path / "x.zarr")))
        Xd = da.from_zarr(zarr.open_array(store, mode="r"))
        with warnings.catch_warnings(), dask.config.set(scheduler="threads"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(
                3, n_init=n_init, init_params=init_params, init_sample_size=100, tol=0, max_iter=6, random_state=1
            ).fit(Xd)
        assert len(store.reads) == n_chunks
        per_chunk = sorted(store.reads.values())
        # every pass reads every chunk once; the first centres (or the centre rows) read a few chunks once more
        assert per_chunk[0] == gm.n_passes_
        assert per_chunk[-1] <= gm.n_passes_ + n_init
        if init_params == "random":
            assert gm.n_passes_ == 1 + 6  # the statistics pass, then one per EM iteration for all restarts
        else:  # rounds, weighing, Lloyd passes (restarts may stop at different ones), EM iterations
            assert gm.n_passes_ <= init.KMEANS_PARALLEL_ROUNDS + 1 + init.LLOYD_MAX_ITER + 6


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_requests_differing_only_in_covariance_type_share_one_seeding(monkeypatch, init_params):
    X = make_mixture(n_samples=1500, n_features=3, seed=11)
    planned = []
    original = init.INITIALIZERS[init_params]

    def plan(ctx, n_components, random_state, n_init):
        planned.append(n_components)
        return original.plan(ctx, n_components, random_state, n_init)

    monkeypatch.setitem(init.INITIALIZERS, init_params, original._replace(plan=plan))
    requests = [
        init.InitRequest(k, kind, 2, np.random.RandomState(4)) for kind in COVARIANCE_TYPES for k in (1, 2, 3)
    ]
    data = DataPasses(da.from_array(X, chunks=(211, 3)))
    center, statistics, shifts = init.initial_statistics(data, init_params, 300, requests)
    assert planned == [1, 2, 3]
    for request, stats, stats_shifts in zip(requests, statistics, shifts):
        assert len(stats) == 2 and len(stats_shifts) == 2
        alone = DataPasses(da.from_array(X, chunks=(211, 3)))
        request = request._replace(random_state=np.random.RandomState(4))
        their_center, (theirs,), (their_shifts,) = init.initial_statistics(alone, init_params, 300, [request])
        np.testing.assert_array_equal(center, their_center)
        _assert_same(stats, theirs, rtol=0)
        _assert_same(stats_shifts, their_shifts, rtol=0)
        assert data.n_passes == max(data.n_passes, alone.n_passes)


# ---------------------------------------------------------------------------
# Real data shipped with scikit-learn
# ---------------------------------------------------------------------------


def _mean_score(cls, X, seeds, **kwargs):
    scores = []
    # one BLAS thread: on a busy machine sklearn's threaded BLAS is several times slower
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        # standardised constant pixels: components flat at reg_covar along them, by design
        warnings.filterwarnings("ignore", message="Gaussian mixture component .* has collapsed")
        for seed in seeds:
            scores.append(cls(random_state=seed, **kwargs).fit(X).score(X))
    return float(np.mean(scores))


@pytest.mark.parametrize(
    "dataset, kind",
    [("iris", "diag"), ("iris", "full"), ("digits", "diag"), ("digits", "full")],
)
def test_log_likelihood_on_real_data_is_as_good_as_sklearn(dataset, kind):
    """Mean training log-likelihood over 5 seeds, out-of-core 'kmeans' against sklearn's.

    Best of 2 restarts on both sides: a single restart's optimum varies by
    about 1 nat per sample between seeds on digits, which would make a
    5-seed mean a lottery rather than a test of the initialisation.
    """
    if dataset == "iris":
        X, n_components, sample_size = load_iris().data, 3, 50
    else:
        X, n_components, sample_size = load_digits().data, 10, 500
    X = StandardScaler().fit_transform(X)  # constant pixels become 0; reg_covar keeps them well-posed
    kwargs = dict(n_components=n_components, covariance_type=kind, reg_covar=0.1, n_init=2, init_params="kmeans")
    seeds = range(5)
    theirs = _mean_score(SkGaussianMixture, X, seeds, **kwargs)
    ours = _mean_score(GaussianMixture, X, seeds, init_sample_size=sample_size, **kwargs)
    assert ours >= theirs - max(0.01 * abs(theirs), 0.05), (ours, theirs)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++"])
def test_nonfinite_rows_are_reported_after_the_first_pass(init_params):
    X = make_mixture(n_samples=800, n_features=2, seed=10)
    X[[17, 400]] = np.nan
    with pytest.raises(ValueError, match=r"2 of 800 rows have non-finite values \(first at row 17\)"):
        GaussianMixture(3, init_params=init_params, init_sample_size=100).fit(da.from_array(X, chunks=(97, 2)))


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_in_memory_kmeans_labels_rows_far_from_the_origin_as_sklearn(offset):
    """Rows near 1e9 (timestamps): the nearest-centre labels of the seeding statistics are taken relative to the
    data's centre; on the raw rows ‖x‖² ≈ 2e18 rounded away the distances and labelled half the rows wrongly."""
    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(-3, 1, (3000, 2)), rng.normal(3, 0.5, (3000, 2))]) + offset
    ours = GaussianMixture(2, random_state=0, max_iter=0).fit(X)
    theirs = SkGaussianMixture(2, random_state=0, max_iter=0).fit(X)
    np.testing.assert_allclose(ours.means_ - offset, theirs.means_ - offset, atol=1e-4)
    np.testing.assert_allclose(ours.covariances_, GaussianMixture(2, random_state=0, max_iter=0).fit(
        X - offset).covariances_, rtol=1e-6)
