"""Initialisation: how each ``init_params`` method seeds the initial parameters.

Every method is an entry of :data:`INITIALIZERS`: a function
``(ctx, random_state, n_init) -> Seeding`` that seeds ALL ``n_init`` restarts
together, so every pass over the data it makes serves every restart. A
:class:`Seeding` describes each restart's initial responsibilities as a
:class:`dgmm.chunk.InitResp`; :func:`initial_statistics` turns them into
sufficient statistics in one more pass, unless the seeding already computed
them on its last pass (the out-of-core 'kmeans' does).

Small data and large data
-------------------------
When ``n_samples <= init_sample_size`` (default 100,000) the data is loaded
once and 'kmeans' and 'k-means++' call scikit-learn's ``KMeans`` and
``kmeans_plusplus`` on it, drawing exactly the random numbers sklearn draws,
so the initial parameters equal sklearn's. Larger data is never loaded: the
methods run out of core, as passes over the chunks:

'kmeans'
    k-means‖ seeding (Bahmani et al., 2012): a first centre drawn uniformly,
    then :data:`KMEANS_PARALLEL_ROUNDS` rounds, each ONE pass that computes
    every row's squared distance d² to the current candidates and samples
    the row independently with probability ``min(1, ℓ d² / φ)`` (ℓ =
    :data:`OVERSAMPLING_FACTOR` × n_components, φ the total cost of the
    round, found in the same pass: each chunk keeps only the rows that can
    still pass the test, and the tree reduction filters again as φ grows).
    One more pass weighs the ~ℓ × rounds candidates by the rows they
    attract (and sums those rows); weighted k-means++ and Lloyd's algorithm
    then recluster the candidates' cell means into ``n_components`` centres
    in memory; finally Lloyd iterations run over the data, one pass each
    (per-chunk counts and sums, tree-reduced), until the centres move by
    less than :data:`LLOYD_TOL` × the mean feature variance (squared, as
    sklearn's ``KMeans``) or :data:`LLOYD_MAX_ITER` passes. Each Lloyd pass
    also yields the statistics of its hard assignment, so the initial
    Gaussian parameters (from the nearest-centre assignment, as sklearn
    initialises from ``KMeans.labels_``) cost no extra pass. Total:
    ``KMEANS_PARALLEL_ROUNDS + 1`` passes plus the Lloyd passes: usually 5 or
    6 passes, at most 9 with the defaults.

'k-means++'
    Greedy k-means++ as sklearn's ``kmeans_plusplus`` (``2 + log k`` trial
    centres per step, the one that lowers the potential most is kept), out
    of core: pass ``j`` evaluates the potentials of step ``j``'s trials and,
    in the same pass, draws the next step's trials for every possible
    outcome, so the cost is ``n_components`` passes plus one for the
    statistics. Trials are drawn ∝ d² by an exponential race on row-indexed
    random numbers (without replacement, where sklearn draws with).

'random'
    Uniform random responsibilities drawn in fixed row blocks seeded by
    ``(seed, block)``: one pass, any size of data.

'random_from_data'
    ``n_components`` distinct rows drawn as sklearn draws them.

Reproducibility
---------------
Every random number of the out-of-core methods belongs to a row (a Philox
counter set to the row's global index, see :mod:`dgmm.chunk_kmeans`) and
every per-chunk result merges associatively, so a given ``random_state``
gives the same initialisation whatever the chunking, ``split_every``,
scheduler or number of workers (up to floating-point rounding of sums).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning

from .chunk import InitResp, SufficientStatistics
from .chunk_kmeans import LloydArgs, ParallelRoundArgs, PlusPlusArgs
from .passes import DataPasses, nonfinite_error

logger = logging.getLogger(__name__)

#: k-means‖ sampling rounds (passes) before the candidates are weighed. Bahmani et
#: al. use 5; with the candidates reclustered by their cell means, 3 reach the same
#: k-means cost on our test data for 2 fewer passes (see bench/README.md).
KMEANS_PARALLEL_ROUNDS = 3
#: ℓ / n_components: expected rows sampled per k-means‖ round, per component.
OVERSAMPLING_FACTOR = 2.0
#: Most Lloyd passes over the data after the candidates are reclustered (the
#: reclustering on cell means leaves little to do: usually 1 or 2 passes).
LLOYD_MAX_ITER = 5
#: Lloyd stops when Σ‖Δcentre‖² <= LLOYD_TOL × mean feature variance (sklearn's rule).
LLOYD_TOL = 1e-4
#: In-memory k-means restarts when reclustering the weighted candidates.
RECLUSTER_N_INIT = 3


class Seeding(NamedTuple):
    """What an initializer returns for all restarts.

    Attributes
    ----------
    specs : tuple of InitResp
        Initial responsibilities of each restart.
    center : ndarray of shape (n_features,) or None
        Centre for the statistics (None: :meth:`InitContext.center`).
    statistics : tuple of SufficientStatistics or None
        The statistics of ``specs``, when the seeding computed them already.
    """

    specs: tuple
    center: np.ndarray | None = None
    statistics: tuple | None = None


class InitContext:
    """What an initializer may use: the data passes, sizes and a lazily loaded in-memory copy.

    Parameters
    ----------
    data : DataPasses
    n_components : int
    sample_size : int
        Largest ``n_samples`` seeded in memory (``init_sample_size``).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        Type of the statistics a seeding may compute.
    """

    def __init__(self, data: DataPasses, n_components: int, sample_size: int, covariance_type: str = "full"):
        self.data = data
        self.n_components = n_components
        self.sample_size = sample_size
        self.covariance_type = covariance_type
        self._sample = None
        self._sample_rows = None

    @property
    def out_of_core(self) -> bool:
        """True when the data has more rows than ``init_sample_size``: seed by passes, never load it."""
        return self.data.n_samples > self.sample_size

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

    def center(self) -> np.ndarray:
        """Centre of the initialisation pass: the mean of the sample, or of the first rows."""
        if self._sample is not None:
            rows = self._sample
        else:
            rows = self.data.head(min(self.data.n_samples, 1024))
        rows = np.asarray(rows, dtype=np.float64)
        finite = np.isfinite(rows).all(axis=1)
        return rows[finite].mean(axis=0) if finite.any() else np.zeros(self.data.n_features)


def initial_statistics(ctx: InitContext, init_params: str, random_state, n_init: int):
    """Seed ``n_init`` restarts with ``init_params`` and return their initial statistics.

    Returns
    -------
    center : ndarray of shape (n_features,)
        Centre the statistics are relative to.
    statistics : tuple of SufficientStatistics
        One per restart, from the initial responsibilities.
    """
    seeding = INITIALIZERS[init_params](ctx, random_state, n_init)
    if seeding.statistics is not None and ctx.data.sample_weight is None:
        # (the seeding's own statistics are unweighted; weighted fits take one more pass)
        return seeding.center, tuple(seeding.statistics)
    center = seeding.center if seeding.center is not None else ctx.center()
    return center, ctx.data.init_statistics(seeding.specs, center, ctx.covariance_type)


def _restart_seeds(random_state, n_init: int) -> tuple[int, ...]:
    return tuple(int(s) for s in random_state.randint(np.iinfo(np.int32).max, size=n_init))


def _raise_if_nonfinite(data: DataPasses, n_nonfinite: int) -> None:
    if n_nonfinite:
        count, first = data.locate_nonfinite()
        raise nonfinite_error(count, first, data.n_samples)


def _first_centers(data: DataPasses, seeds) -> tuple[np.ndarray, np.ndarray]:
    """One uniformly drawn row per restart (indices, rows); reads only the chunks holding them."""
    indices = np.array([np.random.default_rng(seed).integers(data.n_samples) for seed in seeds], dtype=np.int64)
    return indices, np.asarray(data.rows(indices), dtype=np.float64)


# ---------------------------------------------------------------------------
# Out-of-core k-means: k-means‖ seeding, weighted reclustering, Lloyd passes
# ---------------------------------------------------------------------------


class KMeansResult(NamedTuple):
    """Out-of-core k-means of every restart.

    Attributes
    ----------
    centers : list of ndarray of shape (n_components, n_features)
        Final centres: the means of the last assignment (Lloyd's update).
    assigned_centers : list of ndarray of shape (n_components, n_features)
        The centres whose nearest-centre assignment ``statistics`` describe.
    statistics : tuple of SufficientStatistics
        Statistics of that hard assignment, relative to ``center``.
    center : ndarray of shape (n_features,)
        The data mean.
    inertia : list of float
        Σ d²(x, nearest of ``assigned_centers``).
    n_candidates : list of int
        k-means‖ candidates before reclustering.
    n_lloyd : list of int
        Lloyd passes made.
    """

    centers: list
    assigned_centers: list
    statistics: tuple
    center: np.ndarray
    inertia: list
    n_candidates: list
    n_lloyd: list


def _recluster(cell_means: np.ndarray, weights: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Weighted k-means++ and Lloyd on the candidates' cell means (in memory, small)."""
    keep = weights > 0
    cell_means, weights = cell_means[keep], weights[keep]
    if len(cell_means) <= n_components:
        logger.warning(
            "k-means|| found %d distinct candidates for %d components; centres are repeated",
            len(cell_means),
            n_components,
        )
        order = np.argsort(-weights, kind="stable")
        return cell_means[np.resize(order, n_components)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n_components, n_init=RECLUSTER_N_INIT, random_state=seed)
        km.fit(cell_means, sample_weight=weights)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


def kmeans_parallel(
    data: DataPasses,
    n_components: int,
    seeds,
    covariance_type: str = "full",
    *,
    rounds: int | None = None,
    oversampling_factor: float | None = None,
    lloyd_max_iter: int | None = None,
    lloyd_tol: float | None = None,
) -> KMeansResult:
    """Out-of-core k-means of every restart: k-means‖ seeding then Lloyd passes.

    Makes ``rounds + 1`` passes for the seeding and at most ``lloyd_max_iter``
    Lloyd passes, each shared by all restarts (see the module docstring).

    Parameters
    ----------
    data : DataPasses
    n_components : int
    seeds : sequence of int
        One non-negative seed per restart.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        Type of the Gaussian-mixture statistics of the final assignment.
    rounds : int, default=None
        Sampling rounds (None: :data:`KMEANS_PARALLEL_ROUNDS`).
    oversampling_factor : float, default=None
        ℓ / n_components (None: :data:`OVERSAMPLING_FACTOR`).
    lloyd_max_iter : int, default=None
        Most Lloyd passes, at least 1 (None: :data:`LLOYD_MAX_ITER`).
    lloyd_tol : float, default=None
        Relative centre-shift tolerance (None: :data:`LLOYD_TOL`).

    Returns
    -------
    KMeansResult

    Raises
    ------
    ValueError
        If the data holds NaN or infinity.
    """
    seeds = tuple(int(s) for s in seeds)
    n_restarts = len(seeds)
    rounds = KMEANS_PARALLEL_ROUNDS if rounds is None else int(rounds)
    oversampling_factor = OVERSAMPLING_FACTOR if oversampling_factor is None else oversampling_factor
    lloyd_max_iter = LLOYD_MAX_ITER if lloyd_max_iter is None else lloyd_max_iter
    lloyd_tol = LLOYD_TOL if lloyd_tol is None else lloyd_tol
    oversampling = float(oversampling_factor) * n_components
    _, first_rows = _first_centers(data, seeds)
    origin = first_rows[0]
    candidates = [first_rows[r : r + 1] for r in range(n_restarts)]

    center = mean_variance = None
    result = None
    for round_index in range(1, rounds + 2):
        sampling = round_index <= rounds
        args = ParallelRoundArgs(origin, tuple(candidates), seeds, round_index, oversampling if sampling else 0.0)
        result = data.kmeans_parallel_round(args)
        if center is None:
            # First pass: restart 0 has one candidate, the origin, so its cost is Σ ‖x - origin‖².
            _raise_if_nonfinite(data, result[0].n_nonfinite)
            shift = result[0].sum_shifted / data.n_samples
            center = origin + shift
            mean_variance = max(result[0].cost / data.n_samples - float(shift @ shift), 0.0) / data.n_features
        if not sampling:
            break
        for r, part in enumerate(result):
            candidates[r] = np.concatenate([candidates[r], part.sample_rows])
        logger.info(
            "k-means|| round %d/%d: cost %.6g, %s candidates",
            round_index,
            rounds,
            result[0].cost,
            "/".join(str(len(c)) for c in candidates),
        )

    centers = []
    for r, part in enumerate(result):
        counts = part.counts.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cell_means = origin + np.where(counts[:, None] > 0, part.sums / counts[:, None], 0.0)
        centers.append(_recluster(cell_means, counts, n_components, seeds[r]))

    tol = float(lloyd_tol) * mean_variance
    statistics: list[SufficientStatistics | None] = [None] * n_restarts
    assigned = [None] * n_restarts
    inertia = [0.0] * n_restarts
    n_lloyd = [0] * n_restarts
    active = list(range(n_restarts))
    for n_iter in range(1, max(int(lloyd_max_iter), 1) + 1):
        steps = data.lloyd_step(LloydArgs(tuple(centers[r] for r in active), center, covariance_type))
        still_active = []
        for r, step in zip(active, steps):
            nk = step.statistics.nk
            updated = centers[r].copy()
            filled = nk > 0
            updated[filled] = center + step.statistics.sx[filled] / nk[filled, None]
            shift = float(((updated - centers[r]) ** 2).sum())
            statistics[r], assigned[r], inertia[r], n_lloyd[r] = step.statistics, centers[r], step.inertia, n_iter
            centers[r] = updated
            logger.info("Lloyd pass %d, restart %d: inertia %.6g, centre shift %.3g", n_iter, r, step.inertia, shift)
            if shift > tol:
                still_active.append(r)
        active = still_active
        if not active:
            break
    return KMeansResult(
        centers=centers,
        assigned_centers=assigned,
        statistics=tuple(statistics),
        center=center,
        inertia=inertia,
        n_candidates=[len(c) for c in candidates],
        n_lloyd=n_lloyd,
    )


# ---------------------------------------------------------------------------
# Out-of-core greedy k-means++
# ---------------------------------------------------------------------------


def kmeans_plusplus_rows(data: DataPasses, n_components: int, seeds, n_local_trials: int | None = None):
    """Greedy k-means++ of every restart, out of core: the chosen rows' global indices.

    Makes ``n_components`` passes when ``n_components >= 2`` (none for one
    component), each shared by all restarts.

    Parameters
    ----------
    data : DataPasses
    n_components : int
    seeds : sequence of int
    n_local_trials : int or None
        Trials per step (None: ``2 + int(log(n_components))``, as sklearn).

    Returns
    -------
    rows : list of ndarray of shape (n_components,), int64
        Per restart, the chosen rows in the order they were chosen.
    center : ndarray of shape (n_features,) or None
        The data mean (None when no pass was made).
    """
    seeds = tuple(int(s) for s in seeds)
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_components))
    first_index, first_rows = _first_centers(data, seeds)
    origin = first_rows[0]
    n_features = data.n_features
    chosen = [[int(i)] for i in first_index]
    chosen_rows = [[row] for row in first_rows]
    trials = [np.empty((0, n_features)) for _ in seeds]
    trial_index = [np.empty(0, dtype=np.int64) for _ in seeds]
    center = None
    n_passes = n_components if n_components >= 2 else 0
    for step in range(1, n_passes + 1):
        # Pass `step` evaluates the trials drawn by the previous pass (none on the first)
        # and draws the next trials for every outcome (none on the last).
        args = PlusPlusArgs(
            origin,
            tuple(np.asarray(rows) for rows in chosen_rows),
            tuple(trials),
            seeds,
            step,
            int(n_local_trials) if step < n_components else 0,
        )
        result = data.kmeans_plusplus_round(args)
        if step == 1:
            _raise_if_nonfinite(data, result[0].n_nonfinite)
            center = origin + result[0].sum_shifted / data.n_samples
        for r, part in enumerate(result):
            column = 0
            if len(trials[r]):
                column = int(np.argmin(part.potentials))
                chosen[r].append(int(trial_index[r][column]))
                chosen_rows[r].append(trials[r][column])
            trials[r], trial_index[r] = part.rows[column], part.index[column]
    return [np.asarray(c, dtype=np.int64) for c in chosen], center


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def _kmeans_in_memory(ctx: InitContext, random_state) -> InitResp:
    sample = ctx.sample(random_state)
    km = KMeans(n_clusters=ctx.n_components, n_init=1, random_state=random_state).fit(sample)
    return InitResp("nearest", ctx.n_components, centers=np.asarray(km.cluster_centers_, dtype=np.float64))


def _kmeans(ctx: InitContext, random_state, n_init: int) -> Seeding:
    if not ctx.out_of_core:
        return Seeding(tuple(_kmeans_in_memory(ctx, random_state) for _ in range(n_init)))
    result = kmeans_parallel(ctx.data, ctx.n_components, _restart_seeds(random_state, n_init), ctx.covariance_type)
    specs = tuple(InitResp("nearest", ctx.n_components, centers=c) for c in result.assigned_centers)
    return Seeding(specs, result.center, result.statistics)


def _kmeans_plusplus_in_memory(ctx: InitContext, random_state) -> InitResp:
    sample = ctx.sample(random_state)
    _, indices = kmeans_plusplus(sample, ctx.n_components, random_state=random_state)
    return InitResp("rows", ctx.n_components, rows=ctx.global_rows(indices))


def _kmeans_plusplus(ctx: InitContext, random_state, n_init: int) -> Seeding:
    if not ctx.out_of_core:
        return Seeding(tuple(_kmeans_plusplus_in_memory(ctx, random_state) for _ in range(n_init)))
    rows, center = kmeans_plusplus_rows(ctx.data, ctx.n_components, _restart_seeds(random_state, n_init))
    return Seeding(tuple(InitResp("rows", ctx.n_components, rows=r) for r in rows), center)


def _random(ctx: InitContext, random_state, n_init: int) -> Seeding:
    specs = []
    for _ in range(n_init):
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        specs.append(InitResp("random", ctx.n_components, seed=seed))
    return Seeding(tuple(specs))


def _random_from_data(ctx: InitContext, random_state, n_init: int) -> Seeding:
    n = ctx.data.n_samples
    specs = []
    for _ in range(n_init):
        if n <= 10_000_000:
            indices = random_state.choice(n, size=ctx.n_components, replace=False)
        else:
            rng = np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
            indices = rng.choice(n, size=ctx.n_components, replace=False)
        specs.append(InitResp("rows", ctx.n_components, rows=np.asarray(indices, dtype=np.int64)))
    return Seeding(tuple(specs))


#: init_params name -> initializer(ctx, random_state, n_init) -> Seeding
INITIALIZERS: dict[str, Callable[[InitContext, np.random.RandomState, int], Seeding]] = {
    "kmeans": _kmeans,
    "k-means++": _kmeans_plusplus,
    "random": _random,
    "random_from_data": _random_from_data,
}
