"""Initialisation: how each ``init_params`` method seeds the initial parameters.

Every method is an entry of :data:`INITIALIZERS`, in two steps. ``plan``
draws what the method needs from the random state of one mixture (per-restart
seeds, or the in-memory seeding itself) and returns a :class:`Seeding`;
``run`` then seeds a whole list of seedings together, each with the
covariance types its statistics are wanted for, so every pass over the data
serves every seeding and every restart. :func:`initial_statistics` drives
both for a list of :class:`InitRequest` (one fit's mixture, or every
candidate of a model-selection sweep) and returns each request's initial
sufficient statistics, all relative to ONE centre, with the per-component
shifts of their 'full' second moments: each component's seed (its k-means
centre, or its seed row), so that a component seeded on a far outlier keeps
its covariance (second moments about a distant point lose it to rounding).

Requests that would seed identically (the same number of components and
restarts, and a random state in the same state, so the same draws: a sweep's
candidates that differ only in covariance type) share one seeding, computed
once; its last pass yields the statistics of every covariance type asked
for. A sweep's initialisation therefore makes as many passes as the
candidate that needs the most, and each request's statistics equal those of
a fit initialised alone (:meth:`dgmm.GaussianMixture.fit` is a batch of one).

Small data and large data
-------------------------
When ``n_samples <= init_sample_size`` (default 100,000) the data is loaded
once and 'kmeans' and 'k-means++' call scikit-learn's ``KMeans`` and
``kmeans_plusplus`` on it, drawing exactly the random numbers sklearn draws,
so the initial parameters equal sklearn's; one pass then computes the
statistics of every seeding. 'random' then draws sklearn's uniform
responsibilities, ``(n_samples, n_components)`` from the random state
(without loading the data), and 'random_from_data' sklearn's rows, so every
method starts where sklearn's does. Larger data is never loaded: the methods
run out of core, as passes over the chunks:

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
    sklearn's ``KMeans``) or :data:`LLOYD_MAX_ITER` passes. As in sklearn's
    Lloyd, a cluster left empty takes one of the rows farthest from their
    nearest centre (each chunk reports its farthest rows in the same pass).
    Each Lloyd pass also yields the statistics of its hard assignment (with
    those rows moved), so the initial Gaussian parameters (from the
    nearest-centre assignment, as sklearn initialises from
    ``KMeans.labels_``) cost no extra pass. Total:
    ``KMEANS_PARALLEL_ROUNDS + 1`` passes plus the Lloyd passes: usually 4 or
    5 passes, at most 8 with the defaults. Seedings of different
    ``n_components`` share every pass (each with its own ℓ); a batch makes
    as many Lloyd passes as its slowest seeding.

'k-means++'
    Greedy k-means++ as sklearn's ``kmeans_plusplus`` (``2 + log k`` trial
    centres per step, the one that lowers the potential most is kept), out
    of core: pass ``j`` evaluates the potentials of step ``j``'s trials and,
    in the same pass, draws the next step's trials for every possible
    outcome, so the cost is ``n_components`` passes plus one for the
    statistics (a batch: its largest ``n_components``, plus one). Trials are
    drawn ∝ d² by an exponential race on row-indexed random numbers (without
    replacement, where sklearn draws with).

'random'
    Uniform random responsibilities drawn in fixed row blocks seeded by
    ``(seed, block)``: one pass, any size of data, no array of one value
    per row and component (sklearn's draws would be one, made in order).

'random_from_data'
    ``n_components`` distinct rows drawn as sklearn draws them; with
    ``sample_weight``, drawn among the rows of positive weight (one pass over
    the weights counts them), so a zero-weight row never seeds a component.

The centre of the statistics is the data mean found by the first k-means‖
pass for out-of-core 'kmeans', and otherwise the mean of the in-memory data
(in-memory 'kmeans' and 'k-means++') or of the first rows
(:meth:`InitContext.center`): never a quantity of one seeding, so all the
requests of a batch share it.

Sample weights
--------------
With ``sample_weight`` every seeding pass is weighted: the first centres are
drawn ∝ w (reading the weights, not X), k-means‖ samples rows with
probability ∝ w·d², k-means++ draws trials ∝ w·d², Lloyd's counts, sums and
inertia are weighted, and so are the statistics (the in-memory methods pass
the weights to sklearn). Weighted fits take no extra pass. As the random
numbers belong to rows, integer weights give the same statistics as
repeated rows for given centres, but not the same random draws.

Reproducibility
---------------
Every random number of the out-of-core methods belongs to a row (a Philox
counter set to the row's global index, see :mod:`dgmm.chunk_kmeans`) and
every per-chunk result merges associatively, so a given ``random_state``
gives the same initialisation whatever the chunking, ``split_every``,
scheduler or number of workers (up to floating-point rounding of sums).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning

from . import chunk
from .chunk import InitResp
from .chunk_kmeans import LloydArgs, ParallelRoundArgs, PlusPlusArgs, relocate_empty_clusters
from .passes import DataPasses, nonfinite_error

logger = logging.getLogger(__name__)

#: k-means‖ sampling rounds (passes) before the candidates are weighed. Bahmani et
#: al. use 5; Spark MLlib's k-means|| defaults to 2 (``initSteps``). With the
#: candidates reclustered by their cell means, 2 rounds reach a k-means cost at
#: least as low as sklearn's ``KMeans(n_init=1)`` on our test data (within 0.2 % of
#: 3 rounds) for one pass less (see bench/README.md, "Rounds").
KMEANS_PARALLEL_ROUNDS = 2
#: ℓ / n_components: expected rows sampled per k-means‖ round, per component.
OVERSAMPLING_FACTOR = 2.0
#: Most Lloyd passes over the data after the candidates are reclustered (the
#: reclustering on cell means leaves little to do: usually 1 or 2 passes).
LLOYD_MAX_ITER = 5
#: Lloyd stops when Σ‖Δcentre‖² <= LLOYD_TOL × mean feature variance (sklearn's rule).
LLOYD_TOL = 1e-4
#: In-memory k-means restarts when reclustering the weighted candidates.
RECLUSTER_N_INIT = 3


class InitRequest(NamedTuple):
    """One mixture to initialise.

    Attributes
    ----------
    n_components : int
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
        Type of the initial statistics.
    n_init : int
        Restarts, each seeded separately.
    random_state : numpy.random.RandomState
        Consumed as a fit initialised alone would consume it.
    """

    n_components: int
    covariance_type: str
    n_init: int
    random_state: np.random.RandomState


class Seeding(NamedTuple):
    """One planned seeding of all restarts of a mixture (before any pass).

    Attributes
    ----------
    n_components : int
    seeds : tuple of int
        Per-restart seeds, for the out-of-core methods.
    specs : tuple of InitResp or None
        Initial responsibilities of each restart, when planning found them.
    """

    n_components: int
    seeds: tuple = ()
    specs: tuple | None = None


class InitContext:
    """What an initializer may use: the data passes, the sample size and a lazily loaded in-memory copy.

    Parameters
    ----------
    data : DataPasses
    sample_size : int
        Largest ``n_samples`` seeded in memory (``init_sample_size``).
    """

    def __init__(self, data: DataPasses, sample_size: int):
        self.data = data
        self.sample_size = sample_size
        self._sample = None
        self._sample_rows = None
        self._weights = None

    @property
    def out_of_core(self) -> bool:
        """True when the data has more rows than ``init_sample_size``: seed by passes, never load it."""
        return self.data.n_samples > self.sample_size

    def sample(self, random_state) -> np.ndarray:
        """The shared bounded sample (drawn once), checked for non-finite values."""
        if self._sample is None:
            sample, self._sample_rows = self.data.sample(self.sample_size, random_state)
            if not np.isfinite(sample).all():
                count, first = self.data.locate_nonfinite()
                raise nonfinite_error(count, first, self.data.n_samples)
            self._sample = sample
        return self._sample

    def sample_weight(self) -> np.ndarray | None:
        """Row weights of the sample drawn by :meth:`sample` (None when the fit is unweighted)."""
        weights = self.data.sample_weight
        if weights is None:
            return None
        if self._weights is None:
            self._weights = np.asarray(weights if isinstance(weights, np.ndarray) else weights.compute(), np.float64)
        return self._weights if self._sample_rows is None else self._weights[self._sample_rows]

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


class InitialStatistics(NamedTuple):
    """Initial statistics and where their 'full' second moments were taken.

    Attributes
    ----------
    center : ndarray of shape (n_features,)
        Centre every statistic is relative to.
    statistics : list
        Per request (:func:`initial_statistics`) a tuple of
        SufficientStatistics, one per restart; per seeding (an
        initializer's ``run``) a dict of such tuples by covariance type.
    shifts : list of tuple of ndarray of shape (n_components, n_features)
        Likewise per request or seeding, per restart: the points, relative to
        ``center``, the 'full' statistics are taken about (the other types
        ignore them); pass them to :func:`dgmm.chunk.parameters_from_statistics`.
    """

    center: np.ndarray
    statistics: list
    shifts: list


class Initializer(NamedTuple):
    """One ``init_params`` method.

    Attributes
    ----------
    plan : callable
        ``plan(ctx, n_components, random_state, n_init) -> Seeding``: draws
        from ``random_state`` (no pass over the data).
    run : callable
        ``run(ctx, seedings, covariance_types) -> InitialStatistics``:
        seeds all ``seedings`` together; ``covariance_types[j]`` lists the
        types wanted for seeding ``j``, ``statistics[j]`` maps each of them
        to a tuple of SufficientStatistics, one per restart, relative to
        ``center``, and ``shifts[j]`` holds the restarts' 'full' shifts.
    """

    plan: Callable
    run: Callable


def initial_statistics(
    data: DataPasses, init_params: str, sample_size: int, requests: Sequence[InitRequest]
) -> InitialStatistics:
    """Seed every request's restarts with ``init_params`` and return their initial statistics.

    Requests are planned in order (each consumes its random state as a fit
    initialised alone would); requests with the same number of components
    and restarts whose random states are in the same state share one
    seeding. All seedings then run together: their passes are shared.

    Parameters
    ----------
    data : DataPasses
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}
    sample_size : int
        ``init_sample_size``: largest ``n_samples`` seeded in memory.
    requests : sequence of InitRequest

    Returns
    -------
    InitialStatistics
        ``center``, and per request ``statistics`` (one per restart, of its
        covariance type) and ``shifts`` (one per restart).
    """
    ctx = InitContext(data, sample_size)
    initializer = INITIALIZERS[init_params]
    seedings: list[Seeding] = []
    kinds: list[list[str]] = []
    planned: dict[tuple, tuple[int, object]] = {}
    job_of = []
    for request in requests:
        key = (int(request.n_components), int(request.n_init), _state_key(request.random_state))
        if key in planned:
            job, state_after = planned[key]
            request.random_state.set_state(state_after)
        else:
            seeding = initializer.plan(ctx, int(request.n_components), request.random_state, int(request.n_init))
            job = len(seedings)
            seedings.append(seeding)
            kinds.append([])
            planned[key] = (job, request.random_state.get_state())
        if request.covariance_type not in kinds[job]:
            kinds[job].append(request.covariance_type)
        job_of.append(job)
    logger.info(
        "%r seeding of %d mixture%s (%d distinct seeding%s)%s", init_params, len(job_of),
        "" if len(job_of) == 1 else "s", len(seedings), "" if len(seedings) == 1 else "s",
        ", out of core" if ctx.out_of_core else "",
    )
    center, statistics, shifts = initializer.run(ctx, seedings, [tuple(k) for k in kinds])
    return InitialStatistics(
        center,
        [statistics[job][request.covariance_type] for job, request in zip(job_of, requests)],
        [shifts[job] for job in job_of],
    )


def _state_key(random_state: np.random.RandomState) -> tuple:
    """A hashable copy of the random state's state: equal keys draw equal numbers."""
    return _freeze(random_state.get_state(legacy=False))


def _freeze(value):
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _restart_seeds(random_state, n_init: int) -> tuple[int, ...]:
    return tuple(int(s) for s in random_state.randint(np.iinfo(np.int32).max, size=n_init))


def _raise_if_nonfinite(data: DataPasses, n_nonfinite: int) -> None:
    if n_nonfinite:
        count, first = data.locate_nonfinite()
        raise nonfinite_error(count, first, data.n_samples)


def _first_centers(data: DataPasses, seeds) -> tuple[np.ndarray, np.ndarray]:
    """One row per restart, drawn uniformly (∝ weight with weights): indices and rows.

    Reads only the chunks holding them (and, with weights, the weights).
    """
    indices = data.weighted_rows([np.random.default_rng(seed).random() for seed in seeds])
    return indices, np.asarray(data.rows(indices), dtype=np.float64)


def _split(flat: Sequence, sizes: Sequence[int]) -> list[list]:
    """``flat`` cut into consecutive lists of ``sizes``."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [list(flat[a:b]) for a, b in itertools.pairwise(bounds)]


def _with_seed_rows(data: DataPasses, seedings: Sequence[Seeding]) -> list[Seeding]:
    """The seedings with every 'rows' spec's ``shifts`` set to its rows' values (one read of those rows)."""
    missing = [s.rows for seeding in seedings for s in seeding.specs if s.kind == "rows" and s.shifts is None]
    if not missing:
        return list(seedings)
    values = np.asarray(data.rows(np.concatenate(missing)), dtype=np.float64)
    values = iter(np.split(values, np.cumsum([len(rows) for rows in missing])[:-1]))
    return [
        seeding._replace(
            specs=tuple(
                s._replace(shifts=next(values)) if s.kind == "rows" and s.shifts is None else s for s in seeding.specs
            )
        )
        for seeding in seedings
    ]


def _statistics_of_specs(ctx: InitContext, seedings: Sequence[Seeding], covariance_types, center=None):
    """ONE pass: the statistics of every seeding's ``specs``, of each of its covariance types.

    A 'rows' spec's 'full' moments are taken about its rows (read first, without a pass).
    """
    center = ctx.center() if center is None else center
    seedings = _with_seed_rows(ctx.data, seedings)
    members: dict[str, list[int]] = {}
    for j, kinds in enumerate(covariance_types):
        for kind in kinds:
            members.setdefault(kind, []).append(j)
    groups = tuple((kind, tuple(s for j in jobs for s in seedings[j].specs)) for kind, jobs in members.items())
    results = ctx.data.init_statistics_groups(groups, center)
    statistics: list[dict] = [{} for _ in seedings]
    for (kind, jobs), stats in zip(members.items(), results):
        for j, part in zip(jobs, _split(stats, [len(seedings[j].specs) for j in jobs])):
            statistics[j][kind] = tuple(part)
    shifts = [tuple(chunk.initial_shifts(s, center) for s in seeding.specs) for seeding in seedings]
    return InitialStatistics(center, statistics, shifts)


# ---------------------------------------------------------------------------
# Out-of-core k-means: k-means‖ seeding, weighted reclustering, Lloyd passes
# ---------------------------------------------------------------------------


class KMeansJob(NamedTuple):
    """One seeding of :func:`kmeans_parallel_batch`.

    Attributes
    ----------
    n_components : int
    seeds : tuple of int
        One non-negative seed per restart.
    covariance_types : tuple of str
        Types of the Gaussian-mixture statistics wanted of the final assignment.
    """

    n_components: int
    seeds: tuple
    covariance_types: tuple = ("full",)


class KMeansResult(NamedTuple):
    """Out-of-core k-means of every restart of one seeding.

    Attributes
    ----------
    centers : list of ndarray of shape (n_components, n_features)
        Final centres: the means of the last assignment (Lloyd's update).
    assigned_centers : list of ndarray of shape (n_components, n_features)
        The centres whose nearest-centre assignment ``statistics`` describe
        (with the rows moved into empty clusters, see
        :func:`dgmm.chunk_kmeans.relocate_empty_clusters`).
    statistics : dict of str to tuple of SufficientStatistics
        Per covariance type asked for, the statistics of that hard
        assignment (one per restart), relative to ``center``; their means
        are ``centers``.
    shifts : list of ndarray of shape (n_components, n_features)
        Per restart, the points the 'full' statistics are taken about,
        relative to ``center``: the ``assigned_centers``, and a relocated
        cluster's row (:func:`dgmm.chunk_kmeans.relocate_empty_clusters`).
    center : ndarray of shape (n_features,)
        The (weighted) data mean.
    inertia : list of float
        Σ w d²(x, nearest of ``assigned_centers``).
    n_candidates : list of int
        k-means‖ candidates before reclustering.
    n_lloyd : list of int
        Lloyd passes made.
    """

    centers: list
    assigned_centers: list
    statistics: dict
    shifts: list
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
    **options,
) -> KMeansResult:
    """Out-of-core k-means of every restart: k-means‖ seeding then Lloyd passes.

    One seeding of :func:`kmeans_parallel_batch` (which see for ``options``).

    Parameters
    ----------
    data : DataPasses
    n_components : int
    seeds : sequence of int
        One non-negative seed per restart.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        Type of the Gaussian-mixture statistics of the final assignment.

    Returns
    -------
    KMeansResult
    """
    job = KMeansJob(n_components, tuple(seeds), (covariance_type,))
    return kmeans_parallel_batch(data, [job], **options)[0]


def kmeans_parallel_batch(
    data: DataPasses,
    jobs: Sequence[KMeansJob],
    *,
    rounds: int | None = None,
    oversampling_factor: float | None = None,
    lloyd_max_iter: int | None = None,
    lloyd_tol: float | None = None,
) -> list[KMeansResult]:
    """Out-of-core k-means of several seedings together: k-means‖ seeding then Lloyd passes.

    Makes ``rounds + 1`` passes for the seeding and at most ``lloyd_max_iter``
    Lloyd passes, each shared by every restart of every seeding (see the
    module docstring). All seedings measure distances from the first
    seeding's first centre and share its centre (the data mean), so each
    gets the result it would get alone when the first centres coincide
    (the same seeds).

    Parameters
    ----------
    data : DataPasses
    jobs : sequence of KMeansJob
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
    list of KMeansResult
        One per job.

    Raises
    ------
    ValueError
        If the data holds NaN or infinity.
    """
    jobs = [KMeansJob(int(j.n_components), tuple(int(s) for s in j.seeds), tuple(j.covariance_types)) for j in jobs]
    sizes = [len(job.seeds) for job in jobs]
    rounds = KMEANS_PARALLEL_ROUNDS if rounds is None else int(rounds)
    oversampling_factor = OVERSAMPLING_FACTOR if oversampling_factor is None else float(oversampling_factor)
    lloyd_max_iter = LLOYD_MAX_ITER if lloyd_max_iter is None else lloyd_max_iter
    lloyd_tol = LLOYD_TOL if lloyd_tol is None else lloyd_tol
    _, first_rows = _first_centers(data, [s for job in jobs for s in job.seeds])
    origin = first_rows[0]
    candidates = _split([first_rows[i : i + 1] for i in range(len(first_rows))], sizes)

    center = mean_variance = None
    result = None
    for round_index in range(1, rounds + 2):
        sampling = round_index <= rounds
        batch = tuple(
            ParallelRoundArgs(
                origin,
                tuple(candidates[j]),
                job.seeds,
                round_index,
                oversampling_factor * job.n_components if sampling else 0.0,
            )
            for j, job in enumerate(jobs)
        )
        result = data.kmeans_parallel_round(batch)
        if center is None:
            # First pass: the first restart has one candidate, the origin, so its cost is Σ w ‖x - origin‖².
            first = result[0][0]
            _raise_if_nonfinite(data, first.n_nonfinite)
            shift = first.sum_shifted / first.total_weight
            center = origin + shift
            mean_variance = max(first.cost / first.total_weight - float(shift @ shift), 0.0) / data.n_features
        if not sampling:
            break
        for j, parts in enumerate(result):
            for r, part in enumerate(parts):
                candidates[j][r] = np.concatenate([candidates[j][r], part.sample_rows])
        logger.info(
            "k-means|| round %d/%d: cost %.6g, %s candidates",
            round_index,
            rounds,
            result[0][0].cost,
            "/".join(str(len(c)) for job_candidates in candidates for c in job_candidates),
        )

    centers = [[None] * n for n in sizes]
    for j, parts in enumerate(result):
        for r, part in enumerate(parts):
            counts = part.counts.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                cell_means = origin + np.where(counts[:, None] > 0, part.sums / counts[:, None], 0.0)
            centers[j][r] = _recluster(cell_means, counts, jobs[j].n_components, jobs[j].seeds[r])

    tol = float(lloyd_tol) * mean_variance
    statistics = [[None] * n for n in sizes]
    shifts = [[None] * n for n in sizes]
    assigned = [[None] * n for n in sizes]
    inertia = [[0.0] * n for n in sizes]
    n_lloyd = [[0] * n for n in sizes]
    active = [list(range(n)) for n in sizes]
    for n_iter in range(1, max(int(lloyd_max_iter), 1) + 1):
        live = [j for j in range(len(jobs)) if active[j]]
        batch = tuple(
            LloydArgs(tuple(centers[j][r] for r in active[j]), center, jobs[j].covariance_types) for j in live
        )
        steps = data.lloyd_step(batch)
        for j, job_steps in zip(live, steps):
            still_active = []
            for r, step in zip(active[j], job_steps):
                # sklearn's Lloyd update: empty clusters take the farthest rows (found in this
                # pass), which leave their clusters. The statistics are adjusted too (their
                # means are the updated centres), also on the last pass, so the initial
                # statistics always describe one hard assignment: no extra pass is needed.
                kinds = jobs[j].covariance_types
                # the pass took the 'full' moments about the centres (lloyd_chunk's shifts)
                step, relocated, full_shifts = relocate_empty_clusters(step, center, kinds, centers[j][r] - center)
                nk, sums = step.statistics[0].nk, step.sums  # the same for every type
                updated = centers[j][r].copy()
                # A cluster still empty (every distance zero, or it gave up all its rows) keeps
                # its centre, where sklearn's _average_centers moves it onto the largest cluster's.
                filled = nk > 0
                updated[filled] = center + sums[filled] / nk[filled, None]
                shift = float(((updated - centers[j][r]) ** 2).sum())
                statistics[j][r], assigned[j][r] = step.statistics, centers[j][r]
                shifts[j][r] = full_shifts
                inertia[j][r], n_lloyd[j][r] = step.inertia, n_iter
                centers[j][r] = updated
                logger.debug(
                    "Lloyd pass %d, seeding %d restart %d: inertia %.6g, centre shift %.3g, %d clusters relocated",
                    n_iter,
                    j,
                    r,
                    step.inertia,
                    shift,
                    len(relocated),
                )
                if shift > tol:
                    still_active.append(r)
            active[j] = still_active
        running, total = sum(len(a) for a in active), sum(sizes)
        logger.info(
            "Lloyd pass %d of at most %d: %s", n_iter, max(int(lloyd_max_iter), 1),
            "the centres have settled" if not running else
            f"{running} of {total} k-means restarts still moving" if total > 1 else "the centres still move",
        )
        if not any(active):
            break
    return [
        KMeansResult(
            centers=centers[j],
            assigned_centers=assigned[j],
            statistics={
                kind: tuple(per_type[t] for per_type in statistics[j]) for t, kind in enumerate(job.covariance_types)
            },
            shifts=shifts[j],
            center=center,
            inertia=inertia[j],
            n_candidates=[len(c) for c in candidates[j]],
            n_lloyd=n_lloyd[j],
        )
        for j, job in enumerate(jobs)
    ]


# ---------------------------------------------------------------------------
# Out-of-core greedy k-means++
# ---------------------------------------------------------------------------


def kmeans_plusplus_rows(data: DataPasses, n_components: int, seeds, n_local_trials: int | None = None):
    """Greedy k-means++ of every restart, out of core: the chosen rows' global indices.

    One seeding of :func:`kmeans_plusplus_batch`: makes ``n_components``
    passes when ``n_components >= 2`` (none for one component), each shared
    by all restarts.

    Parameters
    ----------
    data : DataPasses
    n_components : int
    seeds : sequence of int
    n_local_trials : int or None
        Trials per step (None: ``2 + int(log(n_components))``, as sklearn).

    Returns
    -------
    list of ndarray of shape (n_components,), int64
        Per restart, the chosen rows in the order they were chosen.
    """
    return kmeans_plusplus_batch(data, [(n_components, seeds)], n_local_trials)[0]


def kmeans_plusplus_batch(data: DataPasses, jobs, n_local_trials: int | None = None) -> list[list[np.ndarray]]:
    """Greedy k-means++ of several seedings together, out of core.

    Makes ``max(n_components)`` passes (none if every seeding has one
    component), each shared by every restart of every seeding; a seeding of
    ``k`` components takes part in the first ``k`` of them. All seedings
    measure distances from the first seeding's first centre.

    Parameters
    ----------
    data : DataPasses
    jobs : sequence of (n_components, seeds)
    n_local_trials : int or None
        Trials per step (None: ``2 + int(log(n_components))`` of each seeding, as sklearn).

    Returns
    -------
    list (one per job) of list (one per restart) of ndarray of shape (n_components,), int64
        The chosen rows in the order they were chosen.
    """
    jobs = [(int(k), tuple(int(s) for s in seeds)) for k, seeds in jobs]
    sizes = [len(seeds) for _, seeds in jobs]
    trials_per_step = [2 + int(math.log(k)) if n_local_trials is None else int(n_local_trials) for k, _ in jobs]
    first_index, first_rows = _first_centers(data, [s for _, seeds in jobs for s in seeds])
    origin = first_rows[0]
    n_features = data.n_features
    chosen = _split([[int(i)] for i in first_index], sizes)
    chosen_rows = _split([[row] for row in first_rows], sizes)
    trials = [[np.empty((0, n_features)) for _ in range(n)] for n in sizes]
    trial_index = [[np.empty(0, dtype=np.int64) for _ in range(n)] for n in sizes]
    n_passes = [k if k >= 2 else 0 for k, _ in jobs]
    for step in range(1, max(n_passes, default=0) + 1):
        # Pass `step` evaluates the trials drawn by the previous pass (none on the first)
        # and draws the next trials for every outcome (none on a seeding's last).
        live = [j for j in range(len(jobs)) if step <= n_passes[j]]
        batch = tuple(
            PlusPlusArgs(
                origin,
                tuple(np.asarray(rows) for rows in chosen_rows[j]),
                tuple(trials[j]),
                jobs[j][1],
                step,
                trials_per_step[j] if step < jobs[j][0] else 0,
            )
            for j in live
        )
        result = data.kmeans_plusplus_round(batch)
        logger.info("k-means++ pass %d of %d", step, max(n_passes, default=0))
        if step == 1:
            _raise_if_nonfinite(data, result[0][0].n_nonfinite)
        for j, parts in zip(live, result):
            for r, part in enumerate(parts):
                column = 0
                if len(trials[j][r]):
                    column = int(np.argmin(part.potentials))
                    chosen[j][r].append(int(trial_index[j][r][column]))
                    chosen_rows[j][r].append(trials[j][r][column])
                trials[j][r], trial_index[j][r] = part.rows[column], part.index[column]
    return [[np.asarray(c, dtype=np.int64) for c in job_chosen] for job_chosen in chosen]


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def _plan_kmeans(ctx: InitContext, n_components: int, random_state, n_init: int) -> Seeding:
    if ctx.out_of_core:
        return Seeding(n_components, seeds=_restart_seeds(random_state, n_init))
    sample = ctx.sample(random_state)
    weights = ctx.sample_weight()
    specs = []
    for _ in range(n_init):
        km = KMeans(n_clusters=n_components, n_init=1, random_state=random_state).fit(sample, sample_weight=weights)
        specs.append(InitResp("nearest", n_components, centers=np.asarray(km.cluster_centers_, dtype=np.float64)))
    return Seeding(n_components, specs=tuple(specs))


def _run_kmeans(ctx: InitContext, seedings, covariance_types):
    if not ctx.out_of_core:
        return _statistics_of_specs(ctx, seedings, covariance_types)
    jobs = [KMeansJob(s.n_components, s.seeds, kinds) for s, kinds in zip(seedings, covariance_types)]
    results = kmeans_parallel_batch(ctx.data, jobs)
    return InitialStatistics(
        results[0].center, [result.statistics for result in results], [tuple(result.shifts) for result in results]
    )


def _plan_kmeans_plusplus(ctx: InitContext, n_components: int, random_state, n_init: int) -> Seeding:
    if ctx.out_of_core:
        return Seeding(n_components, seeds=_restart_seeds(random_state, n_init))
    sample = ctx.sample(random_state)
    weights = ctx.sample_weight()
    specs = []
    for _ in range(n_init):
        seeds, indices = kmeans_plusplus(sample, n_components, sample_weight=weights, random_state=random_state)
        rows = ctx.global_rows(indices)
        specs.append(InitResp("rows", n_components, rows=rows, shifts=np.asarray(seeds, dtype=np.float64)))
    return Seeding(n_components, specs=tuple(specs))


def _run_kmeans_plusplus(ctx: InitContext, seedings, covariance_types):
    if ctx.out_of_core:
        rows = kmeans_plusplus_batch(ctx.data, [(s.n_components, s.seeds) for s in seedings])
        seedings = [
            s._replace(specs=tuple(InitResp("rows", s.n_components, rows=r) for r in job_rows))
            for s, job_rows in zip(seedings, rows)
        ]
    return _statistics_of_specs(ctx, seedings, covariance_types)


def _plan_random(ctx: InitContext, n_components: int, random_state, n_init: int) -> Seeding:
    specs = []
    for _ in range(n_init):
        if ctx.out_of_core:
            seed = int(random_state.randint(np.iinfo(np.int32).max))
            specs.append(InitResp("random", n_components, seed=seed))
        else:  # sklearn's draws: one uniform row of responsibilities per sample, normalised
            resp = random_state.uniform(size=(ctx.data.n_samples, n_components))
            resp /= resp.sum(axis=1)[:, np.newaxis]
            specs.append(InitResp("given", n_components, resp=resp))
    return Seeding(n_components, specs=tuple(specs))


def _plan_random_from_data(ctx: InitContext, n_components: int, random_state, n_init: int) -> Seeding:
    n = ctx.data.n_samples
    positive = None if ctx.data.sample_weight is None else _PositiveRows(ctx.data.sample_weight)
    if positive is not None and positive.count < n_components:
        raise ValueError(
            f"init_params='random_from_data' seeds each of the n_components={n_components} components at a row "
            f"of positive sample_weight, but only {positive.count} rows have one"
        )
    specs = []
    for _ in range(n_init):
        m = n if positive is None else positive.count  # drawn among the rows that may seed: w > 0
        if n <= 10_000_000:
            indices = random_state.choice(m, size=n_components, replace=False)
        else:
            rng = np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
            indices = rng.choice(m, size=n_components, replace=False)
        if positive is not None:
            indices = positive.rows(indices)
        specs.append(InitResp("rows", n_components, rows=np.asarray(indices, dtype=np.int64)))
    return Seeding(n_components, specs=tuple(specs))


class _PositiveRows:
    """The rows of positive weight, numbered in row order, without a list of them all.

    One pass over the weights counts them per chunk; :meth:`rows` then reads
    only the chunks holding the asked-for ranks. With every weight positive the
    ranks are the rows, so unweighted and positively weighted data draw alike.
    """

    def __init__(self, sample_weight):
        import dask
        import dask.array as da

        self._weights = sample_weight if isinstance(sample_weight, da.Array) else da.from_array(
            np.asarray(sample_weight), chunks=max(len(sample_weight), 1))
        counts = self._weights.map_blocks(lambda w: np.array([np.count_nonzero(w > 0)]), chunks=(1,), dtype=np.int64)
        (counts,) = dask.compute(counts)
        self._ends = np.cumsum(counts)
        self._starts = np.cumsum((0,) + self._weights.chunks[0])
        self.count = int(self._ends[-1]) if len(self._ends) else 0

    def rows(self, ranks) -> np.ndarray:
        import dask

        ranks = np.asarray(ranks, dtype=np.int64)
        blocks = np.searchsorted(self._ends, ranks, side="right")
        wanted = sorted(set(blocks.tolist()))
        found = dask.compute(*(self._weights.blocks[b] for b in wanted))
        positive = {b: self._starts[b] + np.flatnonzero(np.asarray(w) > 0) for b, w in zip(wanted, found)}
        before = np.concatenate(([0], self._ends))
        return np.array([positive[b][r - before[b]] for b, r in zip(blocks, ranks)], dtype=np.int64)


#: init_params name -> Initializer(plan, run)
INITIALIZERS: dict[str, Initializer] = {
    "kmeans": Initializer(_plan_kmeans, _run_kmeans),
    "k-means++": Initializer(_plan_kmeans_plusplus, _run_kmeans_plusplus),
    "random": Initializer(_plan_random, _statistics_of_specs),
    "random_from_data": Initializer(_plan_random_from_data, _statistics_of_specs),
}
