"""Chunk math against independent references (scipy, numpy on the whole array, sklearn)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

from dgmm import chunk
from conftest import COVARIANCE_TYPES


def random_covariances(kind, k, d, rng):
    if kind == "full":
        out = []
        for _ in range(k):
            A = rng.normal(size=(d, d))
            out.append(A @ A.T + d * np.eye(d))
        return np.array(out)
    if kind == "tied":
        A = rng.normal(size=(d, d))
        return A @ A.T + d * np.eye(d)
    if kind == "diag":
        return rng.uniform(0.5, 3.0, size=(k, d))
    return rng.uniform(0.5, 3.0, size=k)


def dense_covariance(covariances, kind, j, d):
    if kind == "full":
        return covariances[j]
    if kind == "tied":
        return covariances
    if kind == "diag":
        return np.diag(covariances[j])
    return np.eye(d) * covariances[j]


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_log_gaussian_prob_matches_scipy(kind, offset):
    rng = np.random.default_rng(1)
    k, d = 4, 5
    X = rng.normal(size=(57, d)) * 2 + offset
    means = rng.normal(size=(k, d)) + offset
    cov = random_covariances(kind, k, d, rng)
    prec_chol = chunk.compute_precision_cholesky(cov, kind)
    weights = np.full(k, 1.0 / k)
    params = chunk.chunk_params(weights, means, prec_chol, kind)
    got = chunk.weighted_log_prob(X, params)
    want = np.column_stack(
        [multivariate_normal(means[j], dense_covariance(cov, kind, j, d)).logpdf(X) for j in range(k)]
    ) + np.log(weights)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_predictions_equal_the_separate_outputs_bit_for_bit(kind):
    """chunk.predictions: labels, responsibilities and log-likelihood from one weighted_log_prob, as each alone."""
    rng = np.random.default_rng(2)
    k, d = 4, 3
    X = rng.normal(size=(61, d)) * 3
    params = chunk.chunk_params(rng.dirichlet(np.ones(k)), rng.normal(size=(k, d)),
                                chunk.compute_precision_cholesky(random_covariances(kind, k, d, rng), kind), kind)
    got = chunk.predictions(X, params, labels=True, probabilities=True, log_likelihood=True)
    log_prob_norm, log_resp = chunk.log_prob_resp(X, params)
    np.testing.assert_array_equal(got.labels, chunk.weighted_log_prob(X, params).argmax(axis=1))
    np.testing.assert_array_equal(got.probabilities, np.exp(log_resp))
    np.testing.assert_array_equal(got.log_likelihood, log_prob_norm)
    assert got.labels.dtype == np.int64 and got.probabilities.dtype == got.log_likelihood.dtype == np.float64
    only = chunk.predictions(X, params, labels=False, log_likelihood=True)
    assert only.labels is None and only.probabilities is None
    np.testing.assert_array_equal(only.log_likelihood, log_prob_norm)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_statistics_and_m_step_match_whole_array_numpy(kind):
    rng = np.random.default_rng(2)
    k, d, n = 3, 4, 211
    X = rng.normal(size=(n, d)) * [1, 2, 3, 4] + 7.0
    resp = rng.dirichlet(np.ones(k), size=n)
    center = X[:10].mean(axis=0)
    shifts = rng.normal(size=(k, d))  # any shift gives the same M-step
    stats = chunk.statistics_from_resp(X - center, resp, shifts, kind)
    np.testing.assert_allclose(stats.nk, resp.sum(axis=0), rtol=1e-12)
    _, means, covariances = chunk.parameters_from_statistics(stats, center, shifts, 1e-6, kind)
    # independent reference: weighted means and weighted covariance on the whole array
    nk = resp.sum(axis=0)
    ref_means = resp.T @ X / nk[:, None]
    np.testing.assert_allclose(means, ref_means, rtol=1e-10)
    ref_full = np.array([np.cov(X.T, aweights=resp[:, j], bias=True) for j in range(k)]) + 1e-6 * np.eye(d)
    if kind == "full":
        ref = ref_full
    elif kind == "tied":
        ref = np.einsum("k,kij->ij", nk, ref_full - 1e-6 * np.eye(d)) / n + 1e-6 * np.eye(d)
    elif kind == "diag":
        ref = np.diagonal(ref_full, axis1=1, axis2=2)
    else:
        ref = np.diagonal(ref_full, axis1=1, axis2=2).mean(axis=1)
    np.testing.assert_allclose(covariances, ref, rtol=1e-9)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_initialization_m_step_matches_sklearn_for_unnormalised_resp(kind):
    """sklearn's 'random_from_data' responsibilities are one-hot on k rows only."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 3)) + 5.0
    resp = np.zeros((50, 3))
    resp[[4, 17, 40], [0, 1, 2]] = 1.0
    center = X.mean(axis=0)
    stats = chunk.statistics_from_resp(X - center, resp, np.zeros((3, 3)), kind)
    weights, means, cov = chunk.parameters_from_statistics(
        stats, center, np.zeros((3, 3)), 1e-3, kind, initialization=True
    )
    nk, ref_means, ref_cov = _estimate_gaussian_parameters(X, resp, 1e-3, kind)
    np.testing.assert_allclose(weights, nk / 50, rtol=1e-12)
    np.testing.assert_allclose(means, ref_means, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=96), min_size=0, max_size=6, unique=True),
    kind=st.sampled_from(COVARIANCE_TYPES),
    seed=st.integers(0, 2**16),
)
def test_merge_is_associative_over_any_split(cuts, kind, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(97, 3)) * 3 + 10
    means = rng.normal(size=(2, 3)) + 10
    cov = random_covariances(kind, 2, 3, rng)
    params = chunk.chunk_params(np.array([0.3, 0.7]), means, chunk.compute_precision_cholesky(cov, kind), kind)
    (whole,) = chunk.e_step_statistics(X, (params,))
    pieces = np.split(X, sorted(cuts))
    parts = [chunk.e_step_statistics(p, (params,)) for p in pieces if len(p)]
    rng.shuffle(parts)  # commutative too
    merged = chunk.combine_statistics(*parts)[0]
    for a, b in zip(whole, merged):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9)


def test_batch_evaluates_each_parameter_set_independently():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 2))
    batch = []
    for kind_seed in range(3):
        r = np.random.default_rng(kind_seed)
        batch.append(
            chunk.chunk_params(np.array([0.5, 0.5]), r.normal(size=(2, 2)), np.stack([np.eye(2)] * 2), "full")
        )
    together = chunk.e_step_statistics(X, tuple(batch))
    for params, stats in zip(batch, together):
        (alone,) = chunk.e_step_statistics(X, (params,))
        # The batch shares its products (one GEMM for all members), so it may
        # differ from a lone evaluation only by rounding.
        for a, b in zip(alone, stats):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _reference_statistics(X, params, sample_weight=None):
    """Statistics of one mixture from scipy's log-densities and the plain NumPy formulas."""
    kind = params.covariance_type
    k, d = params.means.shape
    prec_chol = params.precisions_cholesky
    if kind == "full":
        cov = np.linalg.inv(np.einsum("kij,klj->kil", prec_chol, prec_chol))
    elif kind == "tied":
        cov = np.linalg.inv(prec_chol @ prec_chol.T)
    else:
        cov = 1.0 / prec_chol**2
    X64 = np.asarray(X, dtype=np.float64)
    log_prob = np.column_stack(
        [
            multivariate_normal(params.center + params.means[j], dense_covariance(cov, kind, j, d)).logpdf(X64)
            for j in range(k)
        ]
    ) + params.log_weights
    log_norm = np.logaddexp.reduce(log_prob, axis=1)
    resp = np.exp(log_prob - log_norm[:, None])
    ll = log_norm.sum() if sample_weight is None else sample_weight @ log_norm
    shifts = params.means if params.shifts is None else params.shifts
    return chunk.statistics_from_resp(
        X64 - params.center, resp, shifts, kind, log_likelihood=ll, sample_weight=sample_weight
    )


MIXED_BATCH = [("full", 3), ("diag", 2), ("spherical", 4), ("tied", 3), ("full", 1), ("diag", 5)]
FULL_BATCH = [("full", 3), ("full", 1), ("full", 4)]  # float32 input: the all-float32 block path


@pytest.mark.parametrize("members", [MIXED_BATCH, FULL_BATCH], ids=["mixed", "full-only"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mixed_batch_matches_independent_reference(offset, weighted, dtype, members):
    """All four covariance types, different sizes and centres, in one batch: each member's
    statistics equal scipy log-densities + NumPy sums in that member's own coordinates."""
    rng = np.random.default_rng(5)
    n, d = 3001, 4  # more rows than one cache block of this batch
    X = (rng.normal(size=(n, d)) * [1.0, 2.0, 0.5, 3.0] + offset).astype(dtype)
    weight = rng.integers(0, 4, size=n).astype(np.float64) if weighted else None
    batch = []
    for j, (kind, k) in enumerate(members):
        means = rng.normal(size=(k, d)) * 2 + offset
        cov = random_covariances(kind, k, d, rng)
        weights = rng.dirichlet(np.ones(k))
        center = X[: 50 * (j + 1)].astype(np.float64).mean(axis=0)  # every member its own centre
        params = chunk.chunk_params(
            weights, means, chunk.compute_precision_cholesky(cov, kind), kind, center=center, input_dtype=dtype
        )
        batch.append(params)
    got = chunk.e_step_statistics(X, tuple(batch), weight)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for params, stats in zip(batch, got):
        want = _reference_statistics(X, params, weight)
        for field in ("nk", "sx", "sxx", "sy"):
            a, b = getattr(stats, field), getattr(want, field)
            scale = np.abs(b).max()
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=f"{params.covariance_type} {field}")
        assert stats.n_samples == want.n_samples
        np.testing.assert_allclose(stats.log_likelihood, want.log_likelihood, rtol=rtol)
        assert stats.n_nonfinite == 0


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_full_moments_about_given_shifts(offset, dtype, monkeypatch):
    """'full' members with ``shifts``: the same responsibilities and log-likelihood, the moments about the
    shifts (a member's own means as shifts change nothing, bit for bit), whatever the split into chunks,
    in the CPU's and in the GPU's layout (run here with NumPy). float32 data: a batch with shifts (a redone
    pass) runs its 'full' products in float64, so it agrees with the float32 products to their rounding."""
    rng = np.random.default_rng(6)
    n, d = 9001, 3  # float32 in the GPU layout: sub-blocks of 4096 rows
    X = (rng.normal(size=(n, d)) * [1.0, 2.0, 0.5] + offset).astype(dtype)
    batch = []
    for kind, k in MIXED_BATCH:
        params = chunk.chunk_params(rng.dirichlet(np.ones(k)), rng.normal(size=(k, d)) * 2 + offset,
                                    chunk.compute_precision_cholesky(random_covariances(kind, k, d, rng), kind),
                                    kind, input_dtype=dtype)
        batch.append(params)
    plain = chunk.e_step_statistics(X, tuple(batch))
    same = chunk.e_step_statistics(X, tuple(p._replace(shifts=p.means) if p.covariance_type == "full" else p
                                            for p in batch))
    exact = dtype == np.float64
    for a, b in zip(plain, same):
        for field in ("nk", "sx", "sxx", "sy", "log_likelihood"):
            if exact:
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            else:
                np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=2e-4,
                                           atol=2e-4 * np.abs(getattr(b, field)).max())
    shifted = tuple(p._replace(shifts=p.means + rng.normal(size=p.means.shape) * 50) if p.covariance_type == "full"
                    else p for p in batch)
    got = chunk.e_step_statistics(X, shifted)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for params, stats, before in zip(shifted, got, plain):
        want = _reference_statistics(X, params)
        for field in ("nk", "sx", "sxx", "sy"):
            a, b = getattr(stats, field), getattr(want, field)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=field)
        assert stats.log_likelihood == (before.log_likelihood if exact else pytest.approx(before.log_likelihood,
                                                                                         rel=1e-6))
    parts = [chunk.e_step_statistics(X[a : a + 37], shifted) for a in range(0, n, 37)]
    for whole, split in zip(got, chunk.combine_statistics(*parts)):
        for field in ("nk", "sx", "sxx"):
            a, b = getattr(split, field), getattr(whole, field)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=field)
    monkeypatch.setattr(chunk, "BLOCK_ELEMENTS", chunk.GPU_BLOCK_ELEMENTS)
    monkeypatch.setattr(chunk, "_features_major_z", lambda xp: True)
    assert chunk._BatchPlan(shifted, d, X.dtype).z_features_major
    for whole, gpu in zip(got, chunk.e_step_statistics(X, shifted)):
        for field in ("nk", "sx", "sxx"):
            a, b = getattr(gpu, field), getattr(whole, field)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=field)


def test_a_jump_onto_far_rows_is_recomputed_exactly_about_the_new_mean():
    """A component that moves from near the data onto five rows at 1e6 (spread 1e-3) in one step: its
    moments about the old mean lose the covariance to rounding, which ``shift_precision_lost`` flags;
    about the new mean (the same responsibilities) the covariance is exact."""
    rng = np.random.default_rng(0)
    far = 1e6 * np.array([1.0, -1.0, 1.0]) + rng.normal(size=(5, 3)) * 1e-3
    X = np.concatenate([rng.normal(-5, 1, (300, 3)), rng.normal(5, 1, (300, 3)), far])
    covariances = np.stack([np.eye(3), np.eye(3), 1e12 * np.eye(3)])
    params = chunk.chunk_params(np.array([0.45, 0.45, 0.1]), np.array([[-5.0] * 3, [5.0] * 3, [20.0] * 3]),
                                chunk.compute_precision_cholesky(covariances, "full"), "full")
    eps = np.finfo(np.float64).eps
    (stats,) = chunk.e_step_statistics(X, (params,))
    _, means, covariances = chunk.parameters_from_statistics(stats, params.center, params.means, 1e-6, "full")
    smallest = chunk.smallest_eigenvalues(covariances)
    _, log_resp = chunk.log_prob_resp(X, params)
    _, _, reference = _estimate_gaussian_parameters(X, np.exp(log_resp), 1e-6, "full")  # two-pass, exact
    expected = reference[2]
    assert np.abs(covariances[2] - expected).max() > 1e-5  # lost: about 1e-4 off
    np.testing.assert_array_equal(chunk.shift_precision_lost(stats, smallest, eps), [False, False, True])
    again = params._replace(shifts=means - params.center)
    (exact,) = chunk.e_step_statistics(X, (again,))
    assert exact.log_likelihood == stats.log_likelihood
    _, means2, covariances2 = chunk.parameters_from_statistics(exact, again.center, again.shifts, 1e-6, "full")
    np.testing.assert_allclose(means2[2], far.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(covariances2[2], expected, rtol=1e-9)
    np.testing.assert_allclose(means2[:2], means[:2], rtol=1e-13)
    assert not chunk.shift_precision_lost(exact, chunk.smallest_eigenvalues(covariances2), eps).any()


def test_init_statistics_take_full_moments_about_each_seed():
    """'rows' specs about their rows, 'nearest' about the centres: a component seeded on a far row is
    reg_covar exactly (about the data's centre its second moment, 3e10, rounds to more than reg_covar)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-5, 1, (300, 3)), rng.normal(5, 1, (300, 3))])
    X[17] = [1e5, -1e5, 1e5]
    center = X.mean(axis=0)
    specs = (chunk.InitResp("rows", 3, rows=np.array([3, 400, 17]), shifts=X[[3, 400, 17]]),
             chunk.InitResp("nearest", 3, centers=X[[3, 400, 17]]))
    for spec in specs:
        shifts = chunk.initial_shifts(spec, center)
        np.testing.assert_array_equal(shifts, X[[3, 400, 17]] - center)
        parts = [chunk.init_statistics(X[a : a + 37], a, (spec,), center, "full")[0] for a in range(0, len(X), 37)]
        stats = chunk.combine_statistics(*parts)
        weights, means, covariances = chunk.parameters_from_statistics(
            stats, center, shifts, 1e-6, "full", initialization=True)
        np.testing.assert_allclose(means[2], X[17], rtol=1e-15)
        np.testing.assert_allclose(covariances[2], 1e-6 * np.eye(3), rtol=0, atol=1e-15)
        chunk.compute_precision_cholesky(covariances, "full")
    assert not chunk.initial_shifts(chunk.InitResp("random", 2, seed=1), center).any()


def test_nonfinite_rows_are_counted_in_the_pass():
    X = np.ones((10, 2))
    X[3, 1] = np.nan
    X[7, 0] = np.inf
    params = chunk.chunk_params(np.array([1.0]), np.zeros((1, 2)), np.eye(2)[None], "full")
    (stats,) = chunk.e_step_statistics(X, (params,))
    assert stats.n_nonfinite == 2


def test_precision_cholesky_error_names_the_fix():
    cov = np.zeros((1, 2, 2))
    with pytest.raises(ValueError, match="increase reg_covar"):
        chunk.compute_precision_cholesky(cov, "full")
    with pytest.raises(ValueError, match="float64 data instead of float32"):
        chunk.compute_precision_cholesky(np.zeros(2), "spherical", float32_note=True)


def test_random_resp_does_not_depend_on_chunking():
    whole = chunk.random_resp(0, 10_000, 3, seed=42)
    pieces = np.vstack([chunk.random_resp(a, b - a, 3, 42) for a, b in [(0, 37), (37, 4100), (4100, 10_000)]])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0)


def test_exp_inplace_equals_numpy_above_the_flush_and_zero_below():
    """exp_inplace is np.exp bit for bit wherever exp(x) >= 1e-307; below, 0; NaN/inf as np.exp."""
    rng = np.random.default_rng(5)
    values = np.concatenate([
        -np.abs(rng.normal(size=5000)) * 1000,  # many below the flush point, as in a softmax
        np.linspace(-750.0, -690.0, 4001),  # around the flush point and the subnormal range
        [0.0, -0.0, -np.inf, np.nan, np.inf, 3.5, chunk.EXP_FLUSH_BELOW, np.nextafter(chunk.EXP_FLUSH_BELOW, 0)],
    ])
    for layout in (values.copy(), values.reshape(-1, 7)[:, ::-1].copy(), values.reshape(-1, 7).T):
        got = chunk.exp_inplace(np.array(layout, copy=True)).ravel()
        with np.errstate(all="ignore"):
            want = np.exp(np.asarray(layout)).ravel()
        kept = np.asarray(layout).ravel() >= chunk.EXP_FLUSH_BELOW
        np.testing.assert_array_equal(got[kept], want[kept])  # NaN == NaN here, inf == inf
        nan = np.isnan(np.asarray(layout).ravel())
        assert np.isnan(got[nan]).all() and np.all(got[~kept & ~nan] == 0.0)
        assert np.all(want[~kept & np.isfinite(want)] < 1.01e-307)  # only such tiny values are flushed
    assert chunk.exp_inplace(np.array([-800.0, -1.0])).tolist() == [0.0, np.exp(-1.0)]
    float32 = np.array([-100.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(chunk.exp_inplace(float32.copy()), np.exp(float32))


def test_flushing_tiny_responsibilities_leaves_well_separated_statistics_unchanged():
    """On well-separated data most log-responsibilities are below -707: same statistics as the exact softmax."""
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(6, 4)) * 60
    X = np.concatenate([c + rng.normal(size=(400, 4)) for c in centers])
    resp = np.zeros((len(X), 6))
    resp[np.arange(len(X)), np.repeat(np.arange(6), 400)] = 1.0
    _, means, covariances = _estimate_gaussian_parameters(X, resp, 1e-6, "diag")
    params = chunk.chunk_params(np.full(6, 1 / 6), means, 1 / np.sqrt(covariances), "diag")
    weighted = chunk.weighted_log_prob(X, params)
    gaps = weighted - weighted.max(axis=1, keepdims=True)
    assert (gaps < chunk.EXP_FLUSH_BELOW).mean() > 0.5  # the flushed path is really taken
    with np.errstate(under="ignore"):
        exact = np.exp(gaps)
    exact /= exact.sum(axis=1, keepdims=True)
    (stats,) = chunk.e_step_statistics(X, (params,))
    np.testing.assert_allclose(stats.nk, exact.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sx, exact.T @ (X - params.center), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(stats.log_likelihood, np.sum(np.log(np.exp(gaps).sum(axis=1)) + weighted.max(axis=1)),
                               rtol=1e-12)


def test_block_scale_grows_with_threads_and_is_capped():
    assert [chunk.block_scale(t) for t in (0, 1, 2, 3, 4, 8, 15, 16, 64)] == [1, 1, 1, 1, 2, 4, 7, 8, 8]
    assert chunk.MAX_BLOCK_SCALE == 8


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("members", [MIXED_BATCH, FULL_BATCH], ids=["mixed", "full-only"])
def test_thread_sized_blocks_give_the_same_statistics(members, dtype, monkeypatch):
    """Blocks sized for 16 threads (8x the rows) change only the order of the float64 sums across blocks."""
    monkeypatch.setattr(chunk, "BLOCK_ELEMENTS", 2**12)  # blocks of some 100 rows: many of them in a chunk
    rng = np.random.default_rng(6)
    n, d = 5_000, 4
    X = (rng.normal(size=(n, d)) * [1.0, 2.0, 0.5, 3.0]).astype(dtype)
    batch = tuple(
        chunk.chunk_params(rng.dirichlet(np.ones(k)), rng.normal(size=(k, d)),
                           chunk.compute_precision_cholesky(random_covariances(kind, k, d, rng), kind), kind,
                           input_dtype=dtype)
        for kind, k in members
    )
    small = chunk._BatchPlan(batch, d, X.dtype)
    large = chunk._BatchPlan(batch, d, X.dtype, threads=16)
    assert 8 * small.rows <= large.rows < 8 * (small.rows + 1)
    assert len(list(small.blocks(n))) > len(list(large.blocks(n))) > 1
    one = chunk.e_step_statistics(X, batch)
    many = chunk.e_step_statistics(X, batch, threads=16)
    # float32 'full' blocks sum in float32 within a block, so their rounding follows the block size
    rtol = 1e-10 if dtype == np.float64 else 1e-6
    for a, b in zip(one, many):
        for field in ("nk", "sx", "sxx", "sy"):
            x, y = getattr(a, field), getattr(b, field)
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(x).max(), err_msg=field)
        np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=rtol)


def test_a_pass_builds_one_plan_per_parameter_batch(monkeypatch):
    """Chunks sharing the parameter objects share the plan; anything the plan depends on makes a new one."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(500, 3))
    batch = tuple(chunk.chunk_params(np.full(2, 0.5), rng.normal(size=(2, 3)), np.stack([np.eye(3)] * 2), "full")
                  for _ in range(2))
    plan = chunk._plan_for(batch, 3, X.dtype)
    assert chunk._plan_for(batch, 3, X.dtype) is plan
    assert chunk._plan_for(tuple(batch), 3, X.dtype) is plan  # a new tuple of the same parameter objects
    assert chunk._plan_for(batch, 3, np.float32) is not plan
    assert chunk._plan_for(batch, 3, X.dtype, threads=8) is not plan
    copies = tuple(chunk.ChunkParams(*(np.copy(f) if isinstance(f, np.ndarray) else f for f in p)) for p in batch)
    assert chunk._plan_for(copies, 3, X.dtype) is not plan
    monkeypatch.setattr(chunk, "BLOCK_ELEMENTS", 2**10)
    small = chunk._plan_for(batch, 3, X.dtype)
    assert small is not plan and small.rows < plan.rows
    for _ in range(2 * chunk.PLAN_CACHE_SIZE):
        fresh = tuple(chunk.ChunkParams(*(np.copy(f) if isinstance(f, np.ndarray) else f for f in p)) for p in batch)
        chunk._plan_for(fresh, 3, X.dtype)
    assert len(chunk._PLAN_CACHE) <= chunk.PLAN_CACHE_SIZE
    # The cached plan gives the statistics of a fresh one, bit for bit.
    first = chunk.e_step_statistics(X, batch)
    chunk._PLAN_CACHE.clear()
    again = chunk.e_step_statistics(X, batch)
    for a, b in zip(first, again):
        for field in ("nk", "sx", "sxx", "sy"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
