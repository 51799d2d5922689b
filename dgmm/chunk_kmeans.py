"""Initialisation chunk math: seeding rounds, Lloyd steps and initial statistics on ONE NumPy chunk.

Pure NumPy, like :mod:`dgmm.chunk`: no dask, no I/O, no logging. Randomness is
explicit and *counter based*: the uniform number of row ``i`` in a round is
the ``i``-th output of a Philox generator keyed by ``(seed, stream)``, so it
depends on the row's global index only, never on the chunking.

Every pass over the data is a chunk function ``f(X, row_start, args,
sample_weight=None)`` that returns one small result per restart (a tuple, so
all restarts share the pass) and a ``combine_*`` function that merges any
number of such results associatively; :mod:`dgmm.graph_kmeans` maps the former
over the chunks and tree-reduces with the latter.

Passes are batched at two levels. The restarts of one seeding (one
``*Args``) share their distance products. A *batch* of ``*Args`` (a tuple of
them, for example the seedings of every candidate of a model-selection sweep,
each with its own number of components) shares the chunk read and the centred
rows; its result is a tuple with one entry per ``*Args``. Each seeding of a
batch gets exactly the result it would get alone (its distances are still one
product of its own, never mixed with other seedings' columns).

Optional row weights ``sample_weight`` make every pass weighted: a row of
weight w counts as w copies of it in costs, counts, sums, inertia and
statistics, and is sampled with probability proportional to w·d².

=============================  =====================================================
pass                           per-restart result
=============================  =====================================================
:func:`parallel_round_chunk`   k-means‖ round: cost φ, points attracted by each
                               candidate (count, Σ x; weighing pass), rows
                               sampled with probability ℓ·w·d²(x, C)/φ
:func:`plusplus_round_chunk`   greedy k-means++ step: potential of every trial
                               centre, and the next trials sampled ∝ w·d²
:func:`lloyd_chunk`            Lloyd step: inertia and the Gaussian-mixture
                               statistics of the hard assignment, for one or
                               several covariance types (their counts and sums,
                               the k-means update, are shared), and the rows
                               farthest from their centre, where
                               :func:`relocate_empty_clusters` moves empty
                               clusters as sklearn does
:func:`init_statistics_chunk`  statistics of given initial responsibilities
                               (:class:`dgmm.chunk.InitResp`), grouped by
                               covariance type
=============================  =====================================================

Distances are taken on rows shifted by an ``origin`` close to the data (a data
row), so ``‖y‖² − 2 y·c + ‖c‖²`` never cancels catastrophically on data far
from zero.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import sparse

from .chunk import SufficientStatistics, combine_statistics, count_nonfinite_rows, init_statistics
from .namespace import to_host

#: Fewest rows per cache block of the distance kernel.
DISTANCE_BLOCK_ROWS = 4096
#: Values per block row and centre column, ``rows × (n_features + 1 + centres)``: narrow rows (small
#: d, few centres) get longer blocks, so that the NumPy calls per block (each a GIL hand-off for
#: dask's other threads) stay few. At d = 2 and 3 centres, 21,845-row blocks ran 31 % faster than
#: 4,096-row ones on 2 threads (``bench/README.md``, "Threads and the GIL").
DISTANCE_BLOCK_ELEMENTS = 2**17


def distance_block_rows(n_features: int, n_centers: int) -> int:
    """Rows per block of :func:`nearest_centers` for this many features and centres (all sets)."""
    return int(max(DISTANCE_BLOCK_ROWS, DISTANCE_BLOCK_ELEMENTS // (n_features + 1 + n_centers)))

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
    :func:`distance_block_rows` rows.

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
    step = distance_block_rows(n_features, len(stacked))
    block = np.empty((min(step, n), n_features + 1))
    block[:, n_features] = 1.0
    labels = np.empty((n, len(sizes)), dtype=np.int64) if with_labels else None
    min_distances = np.empty((n, len(sizes)))
    for start in range(0, n, step):
        stop = min(start + step, n)
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


def _segments(labels: np.ndarray, n_segments: int):
    """Row order by label, the labels present and where their runs start and stop in that order."""
    order = _label_order(labels, n_segments)
    counts = np.bincount(labels, minlength=n_segments)
    present = np.flatnonzero(counts)
    stops = np.cumsum(counts)[present]
    return order, present, stops - counts[present], stops


def _one_hot(labels: np.ndarray, n_segments: int, sample_weight: np.ndarray | None = None):
    """The (n_segments, n_samples) one-hot matrix of ``labels`` (entries: the row weights), sparse.

    One entry per row in CSC form, so nothing is sorted: its product with the
    rows sums them per label, in row order, ten times faster than sorting the
    rows by label and reducing the runs.
    """
    n_samples = len(labels)
    data = np.ones(n_samples) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return sparse.csc_array((data, labels, np.arange(n_samples + 1)), shape=(n_segments, n_samples))


def _segment_counts(labels: np.ndarray, n_segments: int, sample_weight: np.ndarray | None = None):
    """Rows per label (int64), or Σ w per label (float64) with weights."""
    if sample_weight is None:
        return np.bincount(labels, minlength=n_segments).astype(np.int64)
    return np.bincount(labels, weights=sample_weight, minlength=n_segments).astype(np.float64)


def _segment_sums(values: np.ndarray, labels: np.ndarray, n_segments: int, sample_weight: np.ndarray | None = None):
    """Counts (Σ w with weights) and per-label sums of the rows of ``values`` (weighted, summed in row order)."""
    sums = np.asarray(_one_hot(labels, n_segments, sample_weight) @ values, dtype=np.float64)
    return _segment_counts(labels, n_segments, sample_weight), sums


def _nonfinite_rows(X: np.ndarray, column_sums: np.ndarray) -> int:
    """Rows of X holding NaN or infinity, counted only when the column sums say there may be some."""
    return 0 if np.isfinite(column_sums).all() else count_nonfinite_rows(X)


class _Rows:
    """One chunk as every pass starts: float64 rows, weights, and rows centred on each origin once.

    The initialisation passes run on the host: a CuPy (GPU) chunk is copied back first.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    sample_weight : ndarray of shape (n_samples,) or None
    """

    def __init__(self, X: np.ndarray, sample_weight: np.ndarray | None = None):
        X = to_host(X)
        self._X = X
        self.x = np.asarray(X, dtype=np.float64)
        self.n_samples = int(self.x.shape[0])
        self.weights = None if sample_weight is None else np.asarray(to_host(sample_weight), dtype=np.float64)
        self.total_weight = float(self.n_samples) if self.weights is None else float(self.weights.sum())
        #: Rows holding NaN or infinity (known after the first :meth:`centred`).
        self.n_nonfinite = 0
        self._centred: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def centred(self, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``y = x − origin`` and ``Σ w y`` (computed once per distinct origin)."""
        origin = np.asarray(origin, dtype=np.float64)
        key = origin.tobytes()
        if key not in self._centred:
            y = self.x - origin
            # A GEMV (far faster than a sum over axis 0); np.dot releases the GIL, @ does not for
            # small results (see the note in dgmm.chunk above block_rows).
            column_sums = np.dot(np.ones(self.n_samples), y)
            if not self._centred:
                self.n_nonfinite = _nonfinite_rows(self._X, column_sums)
            self._centred[key] = (y, column_sums if self.weights is None else np.dot(self.weights, y))
        return self._centred[key]

    def weigh(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one row per data row) times the row weights; ``values`` itself when unweighted."""
        if self.weights is None:
            return values
        return values * self.weights.reshape((-1,) + (1,) * (values.ndim - 1))


def _as_batch(args, single: type) -> tuple[bool, tuple]:
    """(whether ``args`` is a batch, the batch): one ``single`` is a batch of one."""
    if isinstance(args, single):
        return False, (args,)
    return True, tuple(args)


def _combine_nested(parts, leaf: type, combine_column):
    """Merge per-chunk results: tuples over restarts, or (batches) tuples of such tuples."""
    first = parts[0]
    if len(first) and not isinstance(first[0], leaf):
        return tuple(_combine_nested(group, leaf, combine_column) for group in zip(*parts))
    return tuple(combine_column(column) for column in zip(*parts))


# ---------------------------------------------------------------------------
# k-means‖ rounds (Bahmani et al., 2012)
# ---------------------------------------------------------------------------


class ParallelRoundArgs(NamedTuple):
    """Inputs of one k-means‖ pass of one seeding, shared by every chunk.

    A tuple of these (one per seeding, each with its own candidates, seeds
    and ℓ) is a batch that shares the pass.

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
        and weighs the candidates instead (weights and sums of the rows each
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
        φ = Σ w d²(x, C) over the rows.
    sum_shifted : ndarray of shape (n_features,)
        Σ w (x − origin) over the rows, for the mean of the data.
    total_weight : float
        Σ w (the number of rows when unweighted).
    counts : ndarray of shape (n_candidates,)
        Weighing pass only (else empty): Σ w over the rows whose nearest
        candidate is each candidate, its weight (int64 counts when unweighted).
    sums : ndarray of shape (n_candidates, n_features)
        Weighing pass only (else empty): Σ w (x − origin) over those rows, so
        their mean is ``origin + sums / counts``.
    n_samples, n_nonfinite : int
        Rows, and rows holding NaN or infinity.
    oversampling : float
        ℓ of the round.
    sample_index : ndarray of shape (n_sampled,), int64
        Global indices of the sampled rows still eligible.
    sample_score : ndarray of shape (n_sampled,)
        w d²(x, C) / u(x); a row is sampled when ``score > φ / ℓ``, i.e. when
        ``u(x) < ℓ w d²(x, C) / φ`` as the paper prescribes.
    sample_rows : ndarray of shape (n_sampled, n_features)
        The rows themselves.
    """

    cost: float
    sum_shifted: np.ndarray
    total_weight: float
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


def parallel_round_chunk(X: np.ndarray, row_start: int, args, sample_weight: np.ndarray | None = None):
    """One chunk's k-means‖ round for every restart of one seeding or of a batch.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
        Global index of the chunk's first row.
    args : ParallelRoundArgs or tuple of ParallelRoundArgs
    sample_weight : ndarray of shape (n_samples,), default=None

    Returns
    -------
    tuple of ParallelRound, one per restart (for a batch: one such tuple per seeding).
    """
    batched, batch = _as_batch(args, ParallelRoundArgs)
    rows = _Rows(X, sample_weight)
    with np.errstate(invalid="ignore", over="ignore"):
        out = tuple(_parallel_round(rows, int(row_start), a) for a in batch)
    return out if batched else out[0]


def _parallel_round(rows: _Rows, row_start: int, args: ParallelRoundArgs) -> tuple[ParallelRound, ...]:
    y, sum_shifted = rows.centred(args.origin)
    shifted = tuple(np.asarray(c, dtype=np.float64) - args.origin for c in args.candidates)
    sampling = args.oversampling > 0
    labels, min_distances = nearest_centers(y, shifted, with_labels=not sampling)
    weighted = rows.weigh(min_distances)
    out = []
    for r, (candidates, seed) in enumerate(zip(shifted, args.seeds)):
        d2 = weighted[:, r]
        cost = float(d2.sum())
        if sampling:
            counts, sums = np.zeros(0, dtype=np.int64), np.zeros((0, y.shape[1]))
            u = row_uniforms(seed, _stream(STREAM_PARALLEL, args.round_index), row_start, len(d2))
            score = d2 / u
            chosen = np.flatnonzero(score > cost / args.oversampling)
        else:
            counts, sums = _segment_sums(y, labels[:, r], len(candidates), rows.weights)
            score, chosen = d2, np.empty(0, dtype=np.int64)
        out.append(
            ParallelRound(
                cost=cost,
                sum_shifted=sum_shifted,
                total_weight=rows.total_weight,
                counts=counts,
                sums=sums,
                n_samples=rows.n_samples,
                n_nonfinite=int(rows.n_nonfinite),
                oversampling=float(args.oversampling),
                sample_index=chosen.astype(np.int64) + row_start,
                sample_score=score[chosen],
                sample_rows=rows.x[chosen],
            )
        )
    return tuple(out)


def _merge_parallel_rounds(column) -> ParallelRound:
    first = column[0]
    merged = ParallelRound(
        cost=float(sum(p.cost for p in column)),
        sum_shifted=sum(p.sum_shifted for p in column[1:]) + first.sum_shifted,
        total_weight=float(sum(p.total_weight for p in column)),
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
    return merged._replace(
        sample_index=merged.sample_index[order],
        sample_score=merged.sample_score[order],
        sample_rows=merged.sample_rows[order],
    )


def combine_parallel_rounds(*parts):
    """Merge per-chunk k-means‖ results (tuples over restarts, or batches of them), associatively.

    Costs, weights, counts and sums add; sampled rows are pooled and those
    that can no longer be sampled are dropped. Pooled rows are sorted by row
    index, so the result does not depend on the order of the parts.
    """
    return _combine_nested(parts, ParallelRound, _merge_parallel_rounds)


# ---------------------------------------------------------------------------
# Greedy k-means++ steps
# ---------------------------------------------------------------------------


class PlusPlusArgs(NamedTuple):
    """Inputs of one greedy k-means++ pass of one seeding, shared by every chunk.

    A tuple of these (one per seeding) is a batch that shares the pass.

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
        Σ w min d²(x, centres ∪ {trial}) over the rows.
    keys : ndarray of shape (n_columns, n_kept)
        Exponential-race keys E(x) / (w d²(x, ·)) of the kept rows, ascending:
        the rows with the smallest keys are a sample drawn ∝ w d² without
        replacement.
    index : ndarray of shape (n_columns, n_kept), int64
        Their global row indices.
    rows : ndarray of shape (n_columns, n_kept, n_features)
        The rows themselves.
    n_samples, n_nonfinite : int
    n_local_trials : int
    """

    potentials: np.ndarray
    keys: np.ndarray
    index: np.ndarray
    rows: np.ndarray
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


def plusplus_round_chunk(X: np.ndarray, row_start: int, args, sample_weight: np.ndarray | None = None):
    """One chunk's greedy k-means++ step for every restart of one seeding or of a batch.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
    args : PlusPlusArgs or tuple of PlusPlusArgs
    sample_weight : ndarray of shape (n_samples,), default=None

    Returns
    -------
    tuple of PlusPlusRound, one per restart (for a batch: one such tuple per seeding).
    """
    batched, batch = _as_batch(args, PlusPlusArgs)
    rows = _Rows(X, sample_weight)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        out = tuple(_plusplus_round(rows, int(row_start), a) for a in batch)
    return out if batched else out[0]


def _plusplus_round(rows: _Rows, row_start: int, args: PlusPlusArgs) -> tuple[PlusPlusRound, ...]:
    y, _ = rows.centred(args.origin)
    n = rows.n_samples
    shifted = tuple(np.asarray(c, dtype=np.float64) - args.origin for c in args.centers)
    _, closest = nearest_centers(y, shifted, with_labels=False)
    out = []
    for r, (trials, seed) in enumerate(zip(args.trials, args.seeds)):
        d2 = closest[:, r : r + 1]
        if len(trials):
            d2 = np.minimum(d2, squared_distances(y, np.asarray(trials, dtype=np.float64) - args.origin))
        d2 = rows.weigh(d2)
        potentials = d2.sum(axis=0)
        size = min(int(args.n_local_trials), n)
        keys = np.empty((d2.shape[1], size))
        index = np.empty((d2.shape[1], size), dtype=np.int64)
        chosen_rows = np.empty((d2.shape[1], size, y.shape[1]))
        if size:
            exponential = -np.log(row_uniforms(seed, _stream(STREAM_PLUSPLUS, args.step), row_start, n))
            global_index = np.arange(row_start, row_start + n, dtype=np.int64)
            for t in range(d2.shape[1]):
                column = np.where(d2[:, t] > 0, exponential / d2[:, t], np.inf)
                column[~np.isfinite(d2[:, t])] = np.inf
                chosen = _smallest(column, global_index, size)
                keys[t], index[t], chosen_rows[t] = column[chosen], global_index[chosen], rows.x[chosen]
        out.append(
            PlusPlusRound(
                potentials=potentials,
                keys=keys,
                index=index,
                rows=chosen_rows,
                n_samples=n,
                n_nonfinite=int(rows.n_nonfinite),
                n_local_trials=int(args.n_local_trials),
            )
        )
    return tuple(out)


def _merge_plusplus_rounds(column) -> PlusPlusRound:
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
    return PlusPlusRound(
        potentials=sum(p.potentials for p in column[1:]) + first.potentials,
        keys=kept_keys,
        index=kept_index,
        rows=kept_rows,
        n_samples=sum(p.n_samples for p in column),
        n_nonfinite=sum(p.n_nonfinite for p in column),
        n_local_trials=first.n_local_trials,
    )


def combine_plusplus_rounds(*parts):
    """Merge per-chunk k-means++ results (tuples over restarts, or batches of them), associatively.

    Potentials add; per column, the ``n_local_trials`` smallest (key, row
    index) pairs of all parts are kept.
    """
    return _combine_nested(parts, PlusPlusRound, _merge_plusplus_rounds)


# ---------------------------------------------------------------------------
# Lloyd steps
# ---------------------------------------------------------------------------


class LloydArgs(NamedTuple):
    """Inputs of one Lloyd pass of one seeding, shared by every chunk.

    A tuple of these (one per seeding, each with its own covariance types)
    is a batch that shares the pass.

    Attributes
    ----------
    centers : tuple of ndarray of shape (n_components, n_features)
        Current k-means centres of each restart.
    center : ndarray of shape (n_features,)
        Centre of the Gaussian-mixture statistics (see :mod:`dgmm.chunk`),
        also the shift for the distances: a point close to the data, such as
        its mean.
    covariance_type : {'full', 'tied', 'diag', 'spherical'} or tuple of them
        Type of the statistics of the hard assignment; a tuple asks for the
        statistics of each type (computed on one nearest-centre assignment).
    """

    centers: tuple
    center: np.ndarray
    covariance_type: str | tuple


class FarthestRows(NamedTuple):
    """The rows farthest from their nearest centre: where empty clusters are relocated.

    At most ``n_components − 1`` rows (at most that many clusters can be empty
    while the rows weigh anything), ordered by decreasing distance, then by
    increasing global row index, so any set of rows keeps the same ones
    whatever its split into chunks. Rows of zero weight are never kept.

    Attributes
    ----------
    distances : ndarray of shape (n_rows,)
        ``((x − c) ** 2).sum()`` for the nearest centre ``c``, computed
        directly as sklearn's ``_relocate_empty_clusters_dense`` computes it
        (unweighted, as there).
    index : ndarray of shape (n_rows,), int64
        Global row indices.
    labels : ndarray of shape (n_rows,), int64
        Nearest centre of each row: the cluster that gives it up.
    weights : ndarray of shape (n_rows,)
        Row weights (ones when unweighted).
    rows : ndarray of shape (n_rows, n_features)
        The rows themselves, float64.
    """

    distances: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    rows: np.ndarray


class LloydStep(NamedTuple):
    """One restart's result of a Lloyd pass over a set of rows.

    Attributes
    ----------
    inertia : float
        Σ w d²(x, nearest centre).
    statistics : SufficientStatistics or tuple of SufficientStatistics
        Statistics of the one-hot responsibilities of the nearest centre (as
        :func:`dgmm.chunk.init_statistics` computes them for a 'nearest'
        :class:`dgmm.chunk.InitResp`: 'full' moments about the centres), one
        per covariance type when several were asked for: ``nk`` are the
        cluster sizes (weights) and ``center + s + sx / nk`` the updated
        centres (``sums``), ``s`` the centres minus ``center`` for 'full' and
        zero for the other types.
    farthest : FarthestRows
        The rows farthest from their nearest centre, for
        :func:`relocate_empty_clusters`.
    sums : ndarray of shape (n_components, n_features)
        Σ w (x - center) per cluster, whatever the types: ``center + sums / nk``
        are the updated centres (the same numbers for every set of types).
    """

    inertia: float
    statistics: SufficientStatistics | tuple
    farthest: FarthestRows
    sums: np.ndarray


def hard_assignment_statistics(
    y: np.ndarray,
    labels: np.ndarray,
    n_components: int,
    covariance_type: str | tuple,
    n_nonfinite: int = 0,
    sample_weight: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
):
    """Gaussian-mixture statistics of one-hot responsibilities.

    Equal to ``chunk.statistics_from_resp(y, one_hot(labels), shifts,
    covariance_type, sample_weight=sample_weight)`` up to rounding. ``sx`` and
    the diag/spherical moments are products of the sparse one-hot
    responsibilities with ``y`` and ``y²`` (:func:`_one_hot`); for 'full' the rows are
    grouped by label, so each row's outer product is formed for its own
    component only, about its component's shift. ``nk`` and ``sy`` do not
    depend on the type, nor does ``sx`` of the types other than 'full' (the
    same arrays for every type asked for).

    Parameters
    ----------
    y : ndarray of shape (n_samples, n_features)
        Rows minus the statistics' centre, float64.
    labels : ndarray of shape (n_samples,), int
    n_components : int
    covariance_type : {'full', 'tied', 'diag', 'spherical'} or tuple of them
    n_nonfinite : int, default=0
    sample_weight : ndarray of shape (n_samples,), default=None
    shifts : ndarray of shape (n_components, n_features), default=None
        Points (relative to the centre, as ``y``) the 'full' first and second
        moments are taken about, such as the cluster centres (None: zero).

    Returns
    -------
    SufficientStatistics, or a tuple of them (one per type) when ``covariance_type`` is a tuple.
    """
    kinds = (covariance_type,) if isinstance(covariance_type, str) else tuple(covariance_type)
    n_samples, n_features = y.shape
    # nk, Σ w y and Σ w y² of every component: products of the one-hot responsibilities, a sparse
    # (components, rows) matrix with one entry per row, with the rows (no transposed copy of y,
    # no dense responsibilities).
    one_hot = _one_hot(labels, n_components, sample_weight)
    nk = _segment_counts(labels, n_components, sample_weight).astype(np.float64)
    sx = np.asarray(one_hot @ y, dtype=np.float64)
    squares = None
    if any(kind in ("diag", "spherical") for kind in kinds):
        squares = np.asarray(one_hot @ np.multiply(y, y), dtype=np.float64)
    if sample_weight is None:
        sy, total = np.dot(np.ones(n_samples), y), int(n_samples)
    else:
        sy, total = np.dot(sample_weight, y), float(sample_weight.sum())
    out = []
    for kind in kinds:
        if kind == "full":
            # Rows grouped by label: each row's outer product is formed for its own component only.
            order, present, starts, stops = _segments(labels, n_components)
            ordered = y[order]
            full_sx = sx
            if shifts is not None:
                # each row about its own cluster's shift: no |y|² - |mean|² cancellation (a far outlier)
                ordered = ordered - np.asarray(shifts, dtype=np.float64)[labels[order]]
                full_sx = sx - nk[:, None] * shifts
            weighted = ordered if sample_weight is None else ordered * sample_weight[order][:, None]
            sxx = np.zeros((n_components, n_features, n_features))
            for k, start, stop in zip(present, starts, stops):
                sxx[k] = np.dot(weighted[start:stop].T, ordered[start:stop])
        elif kind == "tied":
            sxx = np.dot(y.T, y if sample_weight is None else y * sample_weight[:, None])
        elif kind == "diag":
            sxx = squares.copy()
        else:
            sxx = squares.sum(axis=1)
        out.append(
            SufficientStatistics(
                nk=nk,
                sx=full_sx if kind == "full" else sx,
                sxx=sxx,
                sy=sy,
                n_samples=total,
                log_likelihood=0.0,
                n_nonfinite=int(n_nonfinite),
            )
        )
    return out[0] if isinstance(covariance_type, str) else tuple(out)


def lloyd_chunk(X: np.ndarray, row_start: int, args, sample_weight: np.ndarray | None = None):
    """One chunk's Lloyd step for every restart of one seeding or of a batch.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    row_start : int
        Global index of the chunk's first row (it names the farthest rows).
    args : LloydArgs or tuple of LloydArgs
    sample_weight : ndarray of shape (n_samples,), default=None

    Returns
    -------
    tuple of LloydStep, one per restart (for a batch: one such tuple per seeding).
    """
    batched, batch = _as_batch(args, LloydArgs)
    rows = _Rows(X, sample_weight)
    with np.errstate(invalid="ignore", over="ignore"):
        out = tuple(_lloyd_step(rows, int(row_start), a) for a in batch)
    return out if batched else out[0]


def _lloyd_step(rows: _Rows, row_start: int, args: LloydArgs) -> tuple[LloydStep, ...]:
    y, _ = rows.centred(args.center)
    centers = tuple(np.asarray(c, dtype=np.float64) for c in args.centers)
    shifted = tuple(c - args.center for c in centers)
    labels, min_distances = nearest_centers(y, shifted)
    inertia = rows.weigh(min_distances).sum(axis=0)
    return tuple(
        LloydStep(
            inertia=float(inertia[r]),
            statistics=hard_assignment_statistics(
                y, labels[:, r], len(c), args.covariance_type, rows.n_nonfinite, rows.weights, shifted[r]
            ),
            farthest=_farthest_rows(rows, row_start, c, shifted[r], labels[:, r], min_distances[:, r], len(c) - 1),
            sums=np.asarray(_one_hot(labels[:, r], len(c), rows.weights) @ y, dtype=np.float64),
        )
        for r, c in enumerate(centers)
    )


def _no_rows(n_features: int) -> FarthestRows:
    return FarthestRows(
        distances=np.empty(0),
        index=np.empty(0, dtype=np.int64),
        labels=np.empty(0, dtype=np.int64),
        weights=np.empty(0),
        rows=np.empty((0, n_features)),
    )


def _farthest_rows(
    rows: _Rows,
    row_start: int,
    centers: np.ndarray,
    shifted_centers: np.ndarray,
    labels: np.ndarray,
    min_distances: np.ndarray,
    size: int,
) -> FarthestRows:
    """The ``size`` rows of one chunk farthest from their nearest centre (see :class:`FarthestRows`).

    ``min_distances`` (expanded as ‖y‖² − 2 y·c + ‖c‖² by one matrix
    product) may differ from the direct ``((x − c) ** 2).sum()`` by rounding,
    and by a different amount for the same row in another chunk. So the rows
    within a rounding bound of the ``size``-th largest expanded distance are
    taken, their distances computed directly, and the ``size`` largest
    (distance, then lowest row index) kept: exactly the rows the direct
    distances rank first, whatever the chunking.
    """
    n_features = rows.x.shape[1]
    if size <= 0:
        return _no_rows(n_features)
    eligible = np.isfinite(min_distances)
    if rows.weights is not None:
        eligible &= rows.weights > 0
    candidates = np.flatnonzero(eligible)
    if len(candidates) > size:
        distances = min_distances[candidates]
        kth = np.partition(distances, len(distances) - size)[len(distances) - size]
        # Rounding: |expanded − direct| <= s (distance + C), s = 16 (n_features + 4) eps and
        # C = max ‖c − centre‖² (generous: both are sums of n_features terms bounded by
        # ‖y‖² + C <= 2 distance + 3 C). The size-th largest direct distance is then at least
        # kth − s (kth + C), which only rows with expanded distance >= kth − 2 s (kth + C) reach.
        s = 16.0 * (n_features + 4) * np.finfo(np.float64).eps
        spread = float(np.einsum("ij,ij->i", shifted_centers, shifted_centers).max())
        candidates = candidates[distances >= kth - 2.0 * s * (kth + spread)]
    x = rows.x[candidates]
    donors = labels[candidates]
    direct = ((x - centers[donors]) ** 2).sum(axis=1)
    index = candidates.astype(np.int64) + row_start
    keep = np.lexsort((index, -direct))[:size]
    weights = np.ones(len(keep)) if rows.weights is None else rows.weights[candidates[keep]]
    return FarthestRows(
        distances=direct[keep], index=index[keep], labels=donors[keep].astype(np.int64), weights=weights, rows=x[keep]
    )


def _n_components(step: LloydStep) -> int:
    statistics = step.statistics
    return len((statistics if isinstance(statistics, SufficientStatistics) else statistics[0]).nk)


def _merge_farthest_rows(column, size: int) -> FarthestRows:
    merged = FarthestRows(*(np.concatenate(field) for field in zip(*column)))
    keep = np.lexsort((merged.index, -merged.distances))[:size]
    return FarthestRows(*(field[keep] for field in merged))


def _merge_lloyd_steps(column) -> LloydStep:
    sums = column[0].sums
    for p in column[1:]:  # in the order combine_statistics adds the statistics' sx
        sums = sums + p.sums
    return LloydStep(
        inertia=float(sum(p.inertia for p in column)),
        statistics=combine_statistics(*(p.statistics for p in column)),
        farthest=_merge_farthest_rows([p.farthest for p in column], _n_components(column[0]) - 1),
        sums=sums,
    )


def combine_lloyd_steps(*parts):
    """Merge per-chunk Lloyd results (tuples over restarts, or batches of them), associatively.

    Inertia and statistics add; of the farthest rows, the ``n_components − 1``
    with the largest distance (then the lowest row index) are kept, so the
    result does not depend on the order or grouping of the parts.
    """
    return _combine_nested(parts, LloydStep, _merge_lloyd_steps)


def relocate_empty_clusters(
    step: LloydStep, center: np.ndarray, covariance_type: str | tuple, shifts: np.ndarray | None = None
):
    """sklearn's relocation of empty clusters, applied to the statistics of a Lloyd pass.

    As ``sklearn.cluster._k_means_common._relocate_empty_clusters_dense``:
    each cluster of zero weight, in increasing order, receives one of the
    rows farthest from their nearest centre (the farthest first; ties: the
    lowest row index, where sklearn's ``argpartition`` picks any); the row's
    weight, sum and second moment leave the cluster it was nearest to. The
    result describes the nearest-centre assignment with those rows
    reassigned, so ``center + sums / nk`` (and ``center + s + sx / nk`` of
    every type, ``s`` the 'full' shifts, zero for the other types) are
    sklearn's updated centres (a relocated cluster's centre is its row) and
    every covariance type's statistics stay those of one hard assignment
    ('tied' second moments do not depend on it). A
    cluster that receives a row takes that row as its 'full' shift (its
    'full' moments about it are zero), so a far row moved there keeps its
    (zero) spread exactly. Nothing moves when every distance is zero (more
    clusters than distinct rows), as in sklearn. A cluster that gives up all
    its rows is left exactly empty (zero, not a rounding residue). Rows of
    zero weight are never moved (sklearn may pick one, which moves no weight
    and leaves the cluster empty; in dgmm a zero weight means a dropped row).

    Parameters
    ----------
    step : LloydStep
        A whole pass's result (see :func:`combine_lloyd_steps`).
    center : ndarray of shape (n_features,)
        The statistics' centre (``LloydArgs.center``).
    covariance_type : {'full', 'tied', 'diag', 'spherical'} or tuple of them
        The types of ``step.statistics``, as asked for in ``LloydArgs``.
    shifts : ndarray of shape (n_components, n_features), default=None
        The shifts of the 'full' statistics relative to ``center`` (the
        pass's centres minus ``center``; None: zero).

    Returns
    -------
    step : LloydStep
        ``step`` with adjusted statistics (new arrays; ``step`` is not changed).
    relocated : ndarray of shape (n_relocated,), int64
        The clusters that received a row.
    shifts : ndarray of shape (n_components, n_features)
        The 'full' shifts after the relocation (a new array): those given,
        with the relocated clusters' rows (relative to ``center``).
    """
    kinds = (covariance_type,) if isinstance(covariance_type, str) else tuple(covariance_type)
    statistics = (step.statistics,) if isinstance(covariance_type, str) else tuple(step.statistics)
    nk = statistics[0].nk
    center = np.asarray(center, dtype=np.float64)
    shifts = np.zeros((len(nk), len(center))) if shifts is None else np.array(shifts, dtype=np.float64)
    empty = np.flatnonzero(nk == 0)
    far = step.farthest
    n_moved = min(len(empty), len(far.index))
    if n_moved == 0 or far.distances[0] == 0:
        return step, np.empty(0, dtype=np.int64), shifts
    empty, donors = empty[:n_moved], far.labels[:n_moved]
    weights = far.weights[:n_moved]
    y = far.rows[:n_moved] - center
    wy = weights[:, None] * y
    # 'full': each moved row about its donor's shift (the receiver's shift becomes the row)
    d = y - shifts[donors]
    wd = weights[:, None] * d
    # each moved row's second moment in each type's form ('tied' sums over clusters: unchanged)
    moments = {
        "full": wd[:, :, None] * d[:, None, :],
        "diag": wy * y,
        "spherical": np.einsum("ij,ij->i", wy, y),
    }
    out = []
    for kind, part in zip(kinds, statistics):
        nk, sx, sxx = part.nk.copy(), part.sx.copy(), part.sxx.copy()
        before = nk.copy()
        full = kind == "full"
        for i, (k, donor) in enumerate(zip(empty, donors)):
            nk[donor] -= weights[i]
            sx[donor] -= wd[i] if full else wy[i]
            nk[k], sx[k] = weights[i], 0.0 if full else wy[i]
            if kind != "tied":
                sxx[donor] -= moments[kind][i]
                sxx[k] = 0.0 if full else moments[kind][i]
        drained = np.unique(donors[nk[donors] <= 64 * np.finfo(np.float64).eps * before[donors]])
        nk[drained], sx[drained] = 0.0, 0.0
        if kind != "tied":
            sxx[drained] = 0.0
        out.append(part._replace(nk=nk, sx=sx, sxx=sxx))
    shifts[empty] = y
    sums = step.sums.copy()
    for i, (k, donor) in enumerate(zip(empty, donors)):
        sums[donor] -= wy[i]
        sums[k] = wy[i]
    sums[drained] = 0.0
    adjusted = out[0] if isinstance(covariance_type, str) else tuple(out)
    return step._replace(statistics=adjusted, sums=sums), empty.astype(np.int64), shifts


# ---------------------------------------------------------------------------
# Statistics of initial responsibilities, several covariance types in one pass
# ---------------------------------------------------------------------------


class InitStatisticsArgs(NamedTuple):
    """Inputs of one pass of initial statistics, shared by every chunk.

    Attributes
    ----------
    center : ndarray of shape (n_features,)
        Centre of the statistics.
    groups : tuple of (str, tuple of InitResp)
        Per covariance type, the initial responsibilities whose statistics of
        that type are wanted.
    """

    center: np.ndarray
    groups: tuple


def init_statistics_chunk(
    X: np.ndarray, row_start: int, args: InitStatisticsArgs, sample_weight: np.ndarray | None = None
) -> tuple[tuple[SufficientStatistics, ...], ...]:
    """One chunk's statistics under initial responsibilities, per group of ``args``.

    Each group's result is :func:`dgmm.chunk.init_statistics` of its specs and
    type, so a spec gets the same statistics whichever batch it is in.

    Returns
    -------
    tuple (one per group) of tuple (one per spec) of SufficientStatistics
        Merge with :func:`dgmm.chunk.combine_statistics`.
    """
    X = to_host(X)  # initial statistics run on the host (a GPU chunk is copied back)
    sample_weight = None if sample_weight is None else to_host(sample_weight)
    return tuple(
        init_statistics(X, row_start, tuple(specs), args.center, kind, sample_weight) for kind, specs in args.groups
    )
