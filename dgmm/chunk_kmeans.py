"""k-means chunk math: seeding rounds and Lloyd steps on ONE in-memory NumPy chunk.

Pure NumPy, like :mod:`dgmm.chunk`: no dask, no I/O, no logging. Randomness is
explicit and *counter based*: the uniform number of row ``i`` in a round is
the ``i``-th output of a Philox generator keyed by ``(seed, stream)``, so it
depends on the row's global index only, never on the chunking.

Every pass over the data is a chunk function ``f(X, row_start, args)`` that
returns one small result per restart (a tuple, so all restarts share the
pass) and a ``combine_*`` function that merges any number of such results
associatively; :mod:`dgmm.graph_kmeans` maps the former over the chunks and
tree-reduces with the latter.

============================  =====================================================
pass                          per-restart result
============================  =====================================================
:func:`parallel_round_chunk`  k-means‖ round: cost φ, points attracted by each
                              candidate (count, Σ x; weighing pass), rows
                              sampled with probability ℓ·d²(x, C)/φ
:func:`plusplus_round_chunk`  greedy k-means++ step: potential of every trial
                              centre, and the next trials sampled ∝ d²
:func:`lloyd_chunk`           Lloyd step: inertia and the Gaussian-mixture
                              statistics of the hard assignment (whose counts and
                              sums are the k-means update)
============================  =====================================================

Distances are taken on rows shifted by an ``origin`` close to the data (a data
row), so ``‖y‖² − 2 y·c + ‖c‖²`` never cancels catastrophically on data far
from zero.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .chunk import SufficientStatistics, count_nonfinite_rows, merge_statistics

#: Rows per cache block of the distance kernel.
DISTANCE_BLOCK_ROWS = 4096

#: Philox stream tags, so the rounds of different seedings never share numbers.
STREAM_PARALLEL = 1
STREAM_PLUSPLUS = 2


# ---------------------------------------------------------------------------
# Row-indexed random numbers
# ---------------------------------------------------------------------------


def row_uniforms(seed: int, stream: int, row_start: int, n_rows: int) -> np.ndarray:
    """Uniform numbers in (0, 1] of rows ``[row_start, row_start + n_rows)``.

    Row ``i`` gets the ``i``-th 64-bit output of ``Philox(key=(seed, stream))``
    (the counter is set to the row's block of four outputs), so a row's number
    does not depend on where chunks start.

    Parameters
    ----------
    seed : int
        Non-negative seed of the restart.
    stream : int
        Non-negative tag of the round (each round draws fresh numbers).
    row_start : int
        Global index of the first row.
    n_rows : int

    Returns
    -------
    ndarray of shape (n_rows,)
    """
    bit_generator = np.random.Philox(counter=[row_start // 4, 0, 0, 0], key=[int(seed), int(stream)])
    skip = row_start % 4
    raw = bit_generator.random_raw(n_rows + skip)[skip:]
    return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 2**53)


def _stream(tag: int, step: int) -> int:
    return (int(tag) << 32) | int(step)


# ---------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------


def nearest_centers(y: np.ndarray, center_sets: tuple[np.ndarray, ...], with_labels: bool = True):
    """Nearest centre of every row within each of several sets of centres.

    All sets are evaluated with one matrix product per block of
    :data:`DISTANCE_BLOCK_ROWS` rows.

    Parameters
    ----------
    y : ndarray of shape (n_samples, n_features)
        Rows minus the origin, float64.
    center_sets : tuple of ndarray of shape (n_centers_r, n_features)
        Centres minus the origin; every set must be non-empty.
    with_labels : bool, default=True
        Also return which centre is nearest (False: distances only).

    Returns
    -------
    labels : ndarray of shape (n_samples, n_sets), int64, or None
        Index of the nearest centre within each set (the first on ties).
    min_distances : ndarray of shape (n_samples, n_sets)
        Squared Euclidean distance to it (clipped at zero).
    """
    n, n_features = y.shape
    sizes = [len(c) for c in center_sets]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    stacked = np.vstack(center_sets) if center_sets else np.empty((0, n_features))
    # ‖y‖² - 2 y·c + ‖c‖²: the last two terms as ONE product of [y, 1] and [-2 cᵀ; ‖c‖²]
    factor = np.empty((n_features + 1, len(stacked)))
    factor[:n_features] = -2.0 * stacked.T
    factor[n_features] = np.einsum("ij,ij->i", stacked, stacked)
    block = np.empty((min(DISTANCE_BLOCK_ROWS, n), n_features + 1))
    block[:, n_features] = 1.0
    labels = np.empty((n, len(sizes)), dtype=np.int64) if with_labels else None
    min_distances = np.empty((n, len(sizes)))
    for start in range(0, n, DISTANCE_BLOCK_ROWS):
        stop = min(start + DISTANCE_BLOCK_ROWS, n)
        rows = stop - start
        block[:rows, :n_features] = y[start:stop]
        partial = block[:rows] @ factor
        for r in range(len(sizes)):
            segment = partial[:, bounds[r] : bounds[r + 1]]
            best = segment.argmin(axis=1)  # argmin then take: faster than min along a short axis
            min_distances[start:stop, r] = np.take_along_axis(segment, best[:, None], axis=1)[:, 0]
            if with_labels:
                labels[start:stop, r] = best
    min_distances += np.einsum("ij,ij->i", y, y)[:, None]
    np.maximum(min_distances, 0.0, out=min_distances)
    return labels, min_distances


def squared_distances(y: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n_samples, n_centers) of shifted rows to shifted centres."""
    out = y @ (-2.0 * centers.T)
    out += np.einsum("ij,ij->i", centers, centers)
    out += np.einsum("ij,ij->i", y, y)[:, None]
    return np.maximum(out, 0.0, out=out)


def _label_order(labels: np.ndarray, n_segments: int) -> np.ndarray:
    """Stable order of rows by label (a radix sort when labels fit 16 bits)."""
    small = labels.astype(np.uint16) if n_segments <= np.iinfo(np.uint16).max else labels
    return np.argsort(small, kind="stable")


def _segment_sums(values: np.ndarray, labels: np.ndarray, n_segments: int):
    """Counts and per-label sums of the rows of ``values`` (summed in row order)."""
    counts = np.bincount(labels, minlength=n_segments).astype(np.int64)
    sums = np.zeros((n_segments,) + values.shape[1:])
    if len(labels):
        present = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[present]
        sums[present] = np.add.reduceat(values[_label_order(labels, n_segments)], starts, axis=0)
    return counts, sums


def _as_float64(X: np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


def _nonfinite_rows(X: np.ndarray, column_sums: np.ndarray) -> int:
    """Rows of X holding NaN or infinity, counted only when the column sums say there may be some."""
    return 0 if np.isfinite(column_sums).all() else count_nonfinite_rows(X)


# ---------------------------------------------------------------------------
# k-means‖ rounds (Bahmani et al., 2012)
# ---------------------------------------------------------------------------


class ParallelRoundArgs(NamedTuple):
    """Inputs of one k-means‖ pass, shared by every chunk.

    Attributes
    ----------
    origin : ndarray of shape (n_features,)
        Shift applied to rows and candidates before distances.
    candidates : tuple of ndarray of shape (n_candidates_r, n_features)
        The current candidate centres of each restart.
    seeds : tuple of int
        Seed of each restart.
    round_index : int
        Round number (selects fresh random numbers).
    oversampling : float
        ℓ, the expected number of rows sampled per round; 0 samples nothing
        and weighs the candidates instead (counts and sums of the rows each
        one attracts).
    """

    origin: np.ndarray
    candidates: tuple
    seeds: tuple
    round_index: int
    oversampling: float


class ParallelRound(NamedTuple):
    """One restart's result of a k-means‖ pass over a set of rows.

    Attributes
    ----------
    cost : float
        φ = Σ d²(x, C) over the rows.
    sum_shifted : ndarray of shape (n_features,)
        Σ (x − origin) over the rows, for the mean of the data.
    counts : ndarray of shape (n_candidates,), int64
        Weighing pass only (else empty): rows whose nearest candidate is each
        candidate, its weight.
    sums : ndarray of shape (n_candidates, n_features)
        Weighing pass only (else empty): Σ (x − origin) over those rows, so
        their mean is ``origin + sums / counts``.
    n_samples, n_nonfinite : int
        Rows, and rows holding NaN or infinity.
    oversampling : float
        ℓ of the round.
    sample_index : ndarray of shape (n_sampled,), int64
        Global indices of the sampled rows still eligible.
    sample_score : ndarray of shape (n_sampled,)
        d²(x, C) / u(x); a row is sampled when ``score > φ / ℓ``, i.e. when
        ``u(x) < ℓ d²(x, C) / φ`` as the paper prescribes.
    sample_rows : ndarray of shape (n_sampled, n_features)
        The rows themselves.
    """

    cost: float
    sum_shifted: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    n_samples: int
    n_nonfinite: int
    oversampling: float
    sample_index: np.ndarray
    sample_score: np.ndarray
    sample_rows: np.ndarray


def _keep_eligible(part: ParallelRound) -> ParallelRound:
    """Drop sampled rows that can no longer pass ``score > φ / ℓ``.

    φ only grows as parts merge, so a row dropped here would also fail the
    final test: filtering on the way keeps every part about ℓ rows large
    without changing the result of any reduction tree.
    """
    if part.oversampling <= 0:
        keep = np.zeros(len(part.sample_index), dtype=bool)
    else:
        keep = part.sample_score > part.cost / part.oversampling
    if keep.all():
        return part
    return part._replace(
        sample_index=part.sample_index[keep],
        sample_score=part.sample_score[keep],
        sample_rows=part.sample_rows[keep],
    )


def parallel_round_chunk(X: np.ndarray, row_start: int, args: ParallelRoundArgs) -> tuple[ParallelRound, ...]:
    """One chunk's k-means‖ round for every restart.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
        Global index of the chunk's first row.
    args : ParallelRoundArgs

    Returns
    -------
    tuple of ParallelRound, one per restart.
    """
    x = _as_float64(X)
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        y = x - args.origin
        sum_shifted = y.sum(axis=0)
        n_nonfinite = _nonfinite_rows(X, sum_shifted)
        shifted = tuple(np.asarray(c, dtype=np.float64) - args.origin for c in args.candidates)
        sampling = args.oversampling > 0
        labels, min_distances = nearest_centers(y, shifted, with_labels=not sampling)
        for r, (candidates, seed) in enumerate(zip(shifted, args.seeds)):
            d2 = min_distances[:, r]
            cost = float(d2.sum())
            if sampling:
                counts, sums = np.zeros(0, dtype=np.int64), np.zeros((0, x.shape[1]))
                u = row_uniforms(seed, _stream(STREAM_PARALLEL, args.round_index), row_start, len(d2))
                score = d2 / u
                rows = np.flatnonzero(score > cost / args.oversampling)
            else:
                counts, sums = _segment_sums(y, labels[:, r], len(candidates))
                score, rows = d2, np.empty(0, dtype=np.int64)
            out.append(
                ParallelRound(
                    cost=cost,
                    sum_shifted=sum_shifted,
                    counts=counts,
                    sums=sums,
                    n_samples=int(x.shape[0]),
                    n_nonfinite=int(n_nonfinite),
                    oversampling=float(args.oversampling),
                    sample_index=rows.astype(np.int64) + int(row_start),
                    sample_score=score[rows],
                    sample_rows=x[rows],
                )
            )
    return tuple(out)


def combine_parallel_rounds(*parts) -> tuple[ParallelRound, ...]:
    """Merge per-chunk k-means‖ results (tuples over restarts), associatively.

    Costs, counts and sums add; sampled rows are pooled and those that can no
    longer be sampled are dropped. Pooled rows are sorted by row index, so the
    result does not depend on the order of the parts.
    """
    out = []
    for column in zip(*parts):
        first = column[0]
        merged = ParallelRound(
            cost=float(sum(p.cost for p in column)),
            sum_shifted=sum(p.sum_shifted for p in column[1:]) + first.sum_shifted,
            counts=sum(p.counts for p in column[1:]) + first.counts,
            sums=sum(p.sums for p in column[1:]) + first.sums,
            n_samples=sum(p.n_samples for p in column),
            n_nonfinite=sum(p.n_nonfinite for p in column),
            oversampling=first.oversampling,
            sample_index=np.concatenate([p.sample_index for p in column]),
            sample_score=np.concatenate([p.sample_score for p in column]),
            sample_rows=np.concatenate([p.sample_rows for p in column]),
        )
        merged = _keep_eligible(merged)
        order = np.argsort(merged.sample_index, kind="stable")
        out.append(
            merged._replace(
                sample_index=merged.sample_index[order],
                sample_score=merged.sample_score[order],
                sample_rows=merged.sample_rows[order],
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------
# Greedy k-means++ steps
# ---------------------------------------------------------------------------


class PlusPlusArgs(NamedTuple):
    """Inputs of one greedy k-means++ pass, shared by every chunk.

    Attributes
    ----------
    origin : ndarray of shape (n_features,)
    centers : tuple of ndarray of shape (n_chosen, n_features)
        Centres chosen so far, per restart.
    trials : tuple of ndarray of shape (n_trials, n_features)
        Candidates for the next centre, per restart (may have no rows).
    seeds : tuple of int
    step : int
        Index of the pass (selects fresh random numbers).
    n_local_trials : int
        Rows to sample as the next step's trials, per current trial; 0 samples
        nothing (the last step).
    """

    origin: np.ndarray
    centers: tuple
    trials: tuple
    seeds: tuple
    step: int
    n_local_trials: int


class PlusPlusRound(NamedTuple):
    """One restart's result of a greedy k-means++ pass over a set of rows.

    Column ``t`` refers to "the chosen centres plus trial ``t``" (a single
    column, the chosen centres alone, when there are no trials).

    Attributes
    ----------
    potentials : ndarray of shape (n_columns,)
        Σ min d²(x, centres ∪ {trial}) over the rows.
    keys : ndarray of shape (n_columns, n_kept)
        Exponential-race keys E(x) / d²(x, ·) of the kept rows, ascending:
        the rows with the smallest keys are a sample drawn ∝ d² without
        replacement.
    index : ndarray of shape (n_columns, n_kept), int64
        Their global row indices.
    rows : ndarray of shape (n_columns, n_kept, n_features)
        The rows themselves.
    sum_shifted : ndarray of shape (n_features,)
        Σ (x − origin), for the mean of the data.
    n_samples, n_nonfinite : int
    n_local_trials : int
    """

    potentials: np.ndarray
    keys: np.ndarray
    index: np.ndarray
    rows: np.ndarray
    sum_shifted: np.ndarray
    n_samples: int
    n_nonfinite: int
    n_local_trials: int


def _smallest(keys: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """Positions of the ``size`` smallest (key, index) pairs, in that order."""
    if len(keys) > size:
        kth = np.partition(keys, size - 1)[size - 1]
        below = np.flatnonzero(keys < kth)
        tied = np.flatnonzero(keys == kth)
        tied = tied[np.argsort(index[tied], kind="stable")][: size - len(below)]
        positions = np.concatenate([below, tied])
    else:
        positions = np.arange(len(keys))
    return positions[np.lexsort((index[positions], keys[positions]))]


def plusplus_round_chunk(X: np.ndarray, row_start: int, args: PlusPlusArgs) -> tuple[PlusPlusRound, ...]:
    """One chunk's greedy k-means++ step for every restart.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
    args : PlusPlusArgs

    Returns
    -------
    tuple of PlusPlusRound, one per restart.
    """
    x = _as_float64(X)
    n = x.shape[0]
    out = []
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y = x - args.origin
        sum_shifted = y.sum(axis=0)
        n_nonfinite = _nonfinite_rows(X, sum_shifted)
        shifted = tuple(np.asarray(c, dtype=np.float64) - args.origin for c in args.centers)
        _, closest = nearest_centers(y, shifted)
        for r, (trials, seed) in enumerate(zip(args.trials, args.seeds)):
            d2 = closest[:, r : r + 1]
            if len(trials):
                d2 = np.minimum(d2, squared_distances(y, np.asarray(trials, dtype=np.float64) - args.origin))
            potentials = d2.sum(axis=0)
            size = min(int(args.n_local_trials), n)
            keys = np.empty((d2.shape[1], size))
            index = np.empty((d2.shape[1], size), dtype=np.int64)
            rows = np.empty((d2.shape[1], size, x.shape[1]))
            if size:
                exponential = -np.log(row_uniforms(seed, _stream(STREAM_PLUSPLUS, args.step), row_start, n))
                global_index = np.arange(row_start, row_start + n, dtype=np.int64)
                for t in range(d2.shape[1]):
                    column = np.where(d2[:, t] > 0, exponential / d2[:, t], np.inf)
                    column[~np.isfinite(d2[:, t])] = np.inf
                    chosen = _smallest(column, global_index, size)
                    keys[t], index[t], rows[t] = column[chosen], global_index[chosen], x[chosen]
            out.append(
                PlusPlusRound(
                    potentials=potentials,
                    keys=keys,
                    index=index,
                    rows=rows,
                    sum_shifted=sum_shifted,
                    n_samples=int(n),
                    n_nonfinite=int(n_nonfinite),
                    n_local_trials=int(args.n_local_trials),
                )
            )
    return tuple(out)


def combine_plusplus_rounds(*parts) -> tuple[PlusPlusRound, ...]:
    """Merge per-chunk k-means++ results (tuples over restarts), associatively.

    Potentials add; per column, the ``n_local_trials`` smallest (key, row
    index) pairs of all parts are kept.
    """
    out = []
    for column in zip(*parts):
        first = column[0]
        keys = np.concatenate([p.keys for p in column], axis=1)
        index = np.concatenate([p.index for p in column], axis=1)
        rows = np.concatenate([p.rows for p in column], axis=1)
        size = min(first.n_local_trials, keys.shape[1])
        kept_keys = np.empty((keys.shape[0], size))
        kept_index = np.empty((keys.shape[0], size), dtype=np.int64)
        kept_rows = np.empty((keys.shape[0], size, rows.shape[2]))
        for t in range(keys.shape[0]):
            chosen = _smallest(keys[t], index[t], size)
            kept_keys[t], kept_index[t], kept_rows[t] = keys[t, chosen], index[t, chosen], rows[t, chosen]
        out.append(
            PlusPlusRound(
                potentials=sum(p.potentials for p in column[1:]) + first.potentials,
                keys=kept_keys,
                index=kept_index,
                rows=kept_rows,
                sum_shifted=sum(p.sum_shifted for p in column[1:]) + first.sum_shifted,
                n_samples=sum(p.n_samples for p in column),
                n_nonfinite=sum(p.n_nonfinite for p in column),
                n_local_trials=first.n_local_trials,
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------
# Lloyd steps
# ---------------------------------------------------------------------------


class LloydArgs(NamedTuple):
    """Inputs of one Lloyd pass, shared by every chunk.

    Attributes
    ----------
    centers : tuple of ndarray of shape (n_components, n_features)
        Current k-means centres of each restart.
    center : ndarray of shape (n_features,)
        Centre of the Gaussian-mixture statistics (see :mod:`dgmm.chunk`),
        also the shift for the distances: a point close to the data, such as
        its mean.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    """

    centers: tuple
    center: np.ndarray
    covariance_type: str


class LloydStep(NamedTuple):
    """One restart's result of a Lloyd pass over a set of rows.

    Attributes
    ----------
    inertia : float
        Σ d²(x, nearest centre).
    statistics : SufficientStatistics
        Statistics of the one-hot responsibilities of the nearest centre (as
        :func:`dgmm.chunk.init_statistics` computes them for an 'nearest'
        :class:`dgmm.chunk.InitResp`): ``nk`` are the cluster sizes and
        ``center + sx / nk`` the updated centres.
    """

    inertia: float
    statistics: SufficientStatistics


def hard_assignment_statistics(
    y: np.ndarray, labels: np.ndarray, n_components: int, covariance_type: str, n_nonfinite: int = 0
) -> SufficientStatistics:
    """Gaussian-mixture statistics of one-hot responsibilities.

    Equal to ``chunk.statistics_from_resp(y, one_hot(labels), zeros, covariance_type)``
    up to rounding. 'full' groups the rows by label so each row's outer
    product is formed for its own component only; the other types use
    one-hot products over cache-sized row blocks.

    Parameters
    ----------
    y : ndarray of shape (n_samples, n_features)
        Rows minus the statistics' centre, float64.
    labels : ndarray of shape (n_samples,), int
    n_components : int
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    n_nonfinite : int, default=0

    Returns
    -------
    SufficientStatistics
    """
    n_samples, n_features = y.shape
    counts = np.bincount(labels, minlength=n_components)
    sx = np.zeros((n_components, n_features))
    if covariance_type == "full":
        sxx = np.zeros((n_components, n_features, n_features))
        ordered = y[_label_order(labels, n_components)]
        stops = np.cumsum(counts)
        for k in np.flatnonzero(counts):
            block = ordered[stops[k] - counts[k] : stops[k]]
            sx[k] = block.sum(axis=0)
            sxx[k] = block.T @ block
    else:
        if covariance_type == "tied":
            sxx = y.T @ y
        elif covariance_type == "diag":
            sxx = np.zeros((n_components, n_features))
        else:
            sxx = np.zeros(n_components)
        rows = max(64, DISTANCE_BLOCK_ROWS * 16 // max(n_components, 16))  # one-hot blocks of <= 64k values
        resp = np.zeros((min(rows, n_samples), n_components))
        for start in range(0, n_samples, rows):
            block = y[start : start + rows]
            onehot = resp[: len(block)]
            onehot[np.arange(len(block)), labels[start : start + rows]] = 1.0
            sx += onehot.T @ block
            if covariance_type == "diag":
                sxx += onehot.T @ (block * block)
            elif covariance_type == "spherical":
                sxx += onehot.T @ np.einsum("ij,ij->i", block, block)
            onehot[np.arange(len(block)), labels[start : start + rows]] = 0.0
    return SufficientStatistics(
        nk=counts.astype(np.float64),
        sx=sx,
        sxx=sxx,
        sy=y.sum(axis=0),
        n_samples=int(n_samples),
        log_likelihood=0.0,
        n_nonfinite=int(n_nonfinite),
    )


def lloyd_chunk(X: np.ndarray, row_start: int, args: LloydArgs) -> tuple[LloydStep, ...]:
    """One chunk's Lloyd step for every restart.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
        Unused (the step has no randomness); kept for the common signature.
    args : LloydArgs

    Returns
    -------
    tuple of LloydStep, one per restart.
    """
    x = _as_float64(X)
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        y = x - args.center
        n_nonfinite = _nonfinite_rows(X, y.sum(axis=0))
        shifted = tuple(np.asarray(c, dtype=np.float64) - args.center for c in args.centers)
        labels, min_distances = nearest_centers(y, shifted)
        for r, centers in enumerate(shifted):
            statistics = hard_assignment_statistics(
                y, labels[:, r], len(centers), args.covariance_type, n_nonfinite
            )
            out.append(LloydStep(inertia=float(min_distances[:, r].sum()), statistics=statistics))
    return tuple(out)


def combine_lloyd_steps(*parts) -> tuple[LloydStep, ...]:
    """Merge per-chunk Lloyd results (tuples over restarts) by addition."""
    out = []
    for column in zip(*parts):
        statistics = column[0].statistics
        for p in column[1:]:
            statistics = merge_statistics(statistics, p.statistics)
        out.append(LloydStep(inertia=float(sum(p.inertia for p in column)), statistics=statistics))
    return tuple(out)
