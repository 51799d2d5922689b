"""Initialisation: how each ``init_params`` method seeds the initial responsibilities.

Every method is an entry of :data:`INITIALIZERS`, a function that returns a
:class:`dgmm.chunk.InitResp` describing the initial responsibilities of every
row. All restarts' responsibilities are then turned into statistics in ONE
pass over the data (:meth:`dgmm.passes.DataPasses.init_statistics`).

'kmeans' and 'k-means++' run on a bounded uniform random sample of
``init_sample_size`` rows (default 100,000; all rows when the data is
smaller, in which case they draw exactly the random numbers sklearn draws and
give the same initial parameters). 'random' draws responsibilities from
``(seed, row block)`` so they do not depend on the chunking;
'random_from_data' picks ``n_components`` distinct rows as sklearn does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus

from .chunk import InitResp
from .passes import DataPasses, nonfinite_error


class InitContext:
    """What an initializer may use: the data passes and a lazily drawn sample."""

    def __init__(self, data: DataPasses, n_components: int, sample_size: int):
        self.data = data
        self.n_components = n_components
        self.sample_size = sample_size
        self._sample = None
        self._sample_rows = None

    def sample(self, random_state) -> np.ndarray:
        """The shared bounded sample (drawn once per fit), checked for non-finite values."""
        if self._sample is None:
            sample, self._sample_rows = self.data.sample(self.sample_size, random_state)
            if not np.isfinite(sample).all():
                count, first = self.data.locate_nonfinite()
                raise nonfinite_error(count, first, self.data.n_samples)
            self._sample = sample
        return self._sample

    def global_rows(self, sample_indices) -> np.ndarray:
        """Global row indices of rows of the sample."""
        sample_indices = np.asarray(sample_indices, dtype=np.int64)
        return sample_indices if self._sample_rows is None else self._sample_rows[sample_indices]


def _kmeans(ctx: InitContext, random_state) -> InitResp:
    sample = ctx.sample(random_state)
    km = KMeans(n_clusters=ctx.n_components, n_init=1, random_state=random_state).fit(sample)
    return InitResp("nearest", ctx.n_components, centers=np.asarray(km.cluster_centers_, dtype=np.float64))


def _kmeans_plusplus(ctx: InitContext, random_state) -> InitResp:
    sample = ctx.sample(random_state)
    _, indices = kmeans_plusplus(sample, ctx.n_components, random_state=random_state)
    return InitResp("rows", ctx.n_components, rows=ctx.global_rows(indices))


def _random(ctx: InitContext, random_state) -> InitResp:
    seed = int(random_state.randint(np.iinfo(np.int32).max))
    return InitResp("random", ctx.n_components, seed=seed)


def _random_from_data(ctx: InitContext, random_state) -> InitResp:
    n = ctx.data.n_samples
    if n <= 10_000_000:
        indices = random_state.choice(n, size=ctx.n_components, replace=False)
    else:
        rng = np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
        indices = rng.choice(n, size=ctx.n_components, replace=False)
    return InitResp("rows", ctx.n_components, rows=np.asarray(indices, dtype=np.int64))


#: init_params name -> initializer(ctx, random_state) -> InitResp
INITIALIZERS: dict[str, Callable[[InitContext, np.random.RandomState], InitResp]] = {
    "kmeans": _kmeans,
    "k-means++": _kmeans_plusplus,
    "random": _random,
    "random_from_data": _random_from_data,
}
