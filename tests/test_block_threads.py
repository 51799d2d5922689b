"""Row blocks sized for the threads that share one process's GIL (``dgmm.chunk.block_scale``).

Each pass asks its scheduler how many threads of one process will run chunk kernels at once
(``dgmm.passes.kernel_threads``) and the kernels size their row blocks for it. The model must
not change beyond the rounding of sums taken in another order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dgmm import GaussianMixture, chunk, passes
from conftest import assert_same_model, make_mixture, perturbed_init


@pytest.fixture
def plan_rows(monkeypatch):
    """Small cache blocks (so that a 2,000-row chunk holds several), and the block rows of every plan built."""
    monkeypatch.setattr(chunk, "BLOCK_ELEMENTS", 2**14)
    seen: list[int] = []

    class RecordingPlan(chunk._BatchPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.rows)

    monkeypatch.setattr(chunk, "_BatchPlan", RecordingPlan)
    return seen


def _fit(Xd, kind):
    w, m, p = perturbed_init(np.asarray(Xd), kind)
    return GaussianMixture(3, covariance_type=kind, weights_init=w, means_init=m, precisions_init=p,
                           tol=0, max_iter=5).fit(Xd)


def test_kernel_threads_follows_the_scheduler():
    with dask.config.set(scheduler="threads", num_workers=12):
        assert passes.kernel_threads() == 12
    with dask.config.set(scheduler="sync"):
        assert passes.kernel_threads() == 1
    with ThreadPoolExecutor(5) as pool, dask.config.set(scheduler="threads", pool=pool):
        assert passes.kernel_threads() == 5


def _recorded(plan_rows, run):
    """``run()``'s result and the one block size of the plans it built (every chunk the same)."""
    plan_rows.clear()
    result = run()
    rows = set(plan_rows)
    assert len(rows) == 1, rows
    return result, rows.pop()


def _sync_fit_and_rows(plan_rows, Xd, kind):
    with dask.config.set(scheduler="sync"):
        one, a = _recorded(plan_rows, lambda: _fit(Xd, kind))
    assert a < 2000  # several blocks per 2,000-row chunk
    return one, a


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_threaded_scheduler_with_many_threads_uses_larger_blocks_and_the_same_model(plan_rows, kind):
    Xd = da.from_array(make_mixture(n_samples=6000, n_features=8, seed=31), chunks=(2000, 8))
    one, a = _sync_fit_and_rows(plan_rows, Xd, kind)
    with dask.config.set(scheduler="threads", num_workers=8):
        many, b = _recorded(plan_rows, lambda: _fit(Xd, kind))
    assert 4 * a <= b < 4 * (a + 1)  # 8 threads: 4x the rows (block_scale)
    assert_same_model(one, many)


def test_distributed_workers_threads_size_the_blocks(plan_rows):
    Xd = da.from_array(make_mixture(n_samples=6000, n_features=8, seed=32), chunks=(2000, 8))
    one, a = _sync_fit_and_rows(plan_rows, Xd, "full")
    # Thread workers in this process, so that the recording plan class is the one the tasks use.
    with LocalCluster(n_workers=1, threads_per_worker=6, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        assert passes.kernel_threads() == 6
        on_cluster, b = _recorded(plan_rows, lambda: _fit(Xd, "full"))
    assert 3 * a <= b < 3 * (a + 1)  # 6 threads: 3x the rows
    assert_same_model(one, on_cluster)


def test_lazy_predictions_use_the_blocks_of_the_scheduler_they_are_built_under(plan_rows):
    X = make_mixture(n_samples=6000, n_features=8, seed=33)
    Xd = da.from_array(X, chunks=(2000, 8))
    gm, _ = _sync_fit_and_rows(plan_rows, Xd, "full")

    def predictions():
        return dask.compute(gm.predict(Xd), gm.predict_proba(Xd), gm.score_samples(Xd))

    with dask.config.set(scheduler="sync"):
        (labels, proba, scores), a = _recorded(plan_rows, predictions)
    with dask.config.set(scheduler="threads", num_workers=8):
        (labels8, proba8, scores8), b = _recorded(plan_rows, predictions)
    assert a < 2000 and 4 * a <= b < 4 * (a + 1)
    np.testing.assert_array_equal(labels8, labels)
    np.testing.assert_allclose(proba8, proba, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(scores8, scores, rtol=1e-12)
    np.testing.assert_array_equal(labels, gm.predict(X))  # and the NumPy path's labels
