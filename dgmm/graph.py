"""Graph builders: lazy dask graphs over the chunks of a dask array.

Nothing here calls ``compute``. The statistics builders map a chunk function
from :mod:`dgmm.chunk` over the row blocks of an array and tree-reduce the
results with fan-in ``split_every``; the prediction builders return lazy dask
arrays with the input's row chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.delayed import Delayed

from . import chunk
from .namespace import array_module

DEFAULT_SPLIT_EVERY = 8


class RowBlocks:
    """The row blocks of a 2-D dask array, prepared once per fit (lazy).

    Holds one ``Delayed`` per row block (the graph of the array is optimised
    once, here, instead of once per EM iteration) and the global index of
    each block's first row.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
        Must have a single chunk along the feature axis and known row chunks.
    sample_weight : dask.array.Array of shape (n_samples,), optional
        Row weights, rechunked here to X's row chunks.
    """

    def __init__(self, X: da.Array, sample_weight: da.Array | None = None):
        if X.numblocks[1] != 1:
            raise ValueError("X must have a single chunk along the feature axis")
        # The arrays are kept: a persisted array's futures live as long as the array, not its blocks' Delayed.
        self.array = X
        self.blocks: list[Delayed] = list(X.to_delayed(optimize_graph=True).ravel())
        #: The row weights in X's row chunks, or None.
        self.sample_weight: da.Array | None = None
        #: One Delayed per row block of the row weights (aligned with ``blocks``), or None.
        self.weight_blocks: list[Delayed] | None = None
        if sample_weight is not None:
            self.sample_weight = sample_weight.rechunk((X.chunks[0],))
            self.weight_blocks = list(self.sample_weight.to_delayed(optimize_graph=True).ravel())
        #: Keys of the tasks that produce the blocks and their weights from the source: the
        #: blocks' own and every task upstream of them (the graphs the blocks were cut from).
        self.read_keys: frozenset = _graph_keys(self.blocks + (self.weight_blocks or []))
        sizes = np.asarray(X.chunks[0], dtype=np.int64)
        self.row_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.n_samples = int(sizes.sum())

    def __len__(self) -> int:
        return len(self.blocks)


def _graph_keys(delayed: list[Delayed]) -> frozenset:
    """Every key of the graphs behind ``delayed`` (blocks cut from one array share one graph)."""
    keys: set = set()
    seen: set[int] = set()
    for item in delayed:
        graph = item.__dask_graph__()
        if id(graph) not in seen:
            seen.add(id(graph))
            keys.update(graph.keys())
    return frozenset(keys)


def _take(block, rows):
    return block[rows]


def take_rows(blocks: RowBlocks, indices: np.ndarray) -> list[Delayed]:
    """The rows at sorted, distinct global ``indices``: one Delayed array per block holding some, in order (lazy).

    Built on the blocks' own tasks (:attr:`RowBlocks.blocks`), never on a
    fresh slice of the array: a distributed scheduler that still holds a key
    of the passes' graph must not receive the same key with another
    definition ("Detected different run_spec ... can cause failures and
    deadlocks"). Each block is read once and only its rows travel.
    """
    indices = np.asarray(indices, dtype=np.int64)
    ids = np.searchsorted(blocks.row_starts, indices, side="right") - 1
    take = dask.delayed(_take, pure=True)
    parts = []
    for b in np.unique(ids):
        local = indices[ids == b] - blocks.row_starts[b]
        contiguous = local[-1] - local[0] == len(local) - 1
        parts.append(take(blocks.blocks[b], slice(int(local[0]), int(local[-1]) + 1) if contiguous else local))
    return parts


def nonfinite_rows(blocks: RowBlocks) -> list[Delayed]:
    """(count, first local index or -1) of the rows holding NaN or infinity, per block (lazy)."""
    find = dask.delayed(chunk.nonfinite_summary, pure=True)
    return [find(block) for block in blocks.blocks]


def nonfinite_rows_zeroed(X: da.Array) -> tuple[da.Array, da.Array]:
    """(X with its rows holding NaN or infinity set to 0, the mask of those rows), lazy, with X's row chunks.

    Each chunk's mask is found once and used for both; rows are copied only
    in chunks that have such rows.
    """
    X = X.rechunk({1: -1})
    mask = X.map_blocks(chunk.nonfinite_row_mask, drop_axis=1, dtype=bool, meta=meta_from_array(X, 1, bool))
    zeroed = da.map_blocks(chunk.zero_rows, X, mask[:, None], dtype=X.dtype, meta=X._meta)
    return zeroed, mask


def tree_reduce(parts: Sequence[Any], combine: Callable, split_every: int | None = None):
    """Reduce delayed ``parts`` with ``combine`` in a tree of fan-in ``split_every`` (lazy)."""
    split_every = int(split_every or DEFAULT_SPLIT_EVERY)
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    level = list(parts)
    combine_d = dask.delayed(combine, pure=True)
    while len(level) > 1:
        level = [
            combine_d(*level[i : i + split_every], dask_key_name=None)
            if len(level[i : i + split_every]) > 1
            else level[i]
            for i in range(0, len(level), split_every)
        ]
    return level[0]


def e_step_statistics(
    blocks: RowBlocks, batch: tuple[chunk.ChunkParams, ...], split_every=None, threads: int = 1
) -> Delayed:
    """Lazy E-step statistics of a whole array for a batch of parameter sets.

    The parameters enter the graph once, as one key that every chunk task
    depends on, so a distributed scheduler ships them once per worker, not
    once per task. ``threads``: the threads of one process that will run the
    chunk tasks at once (:func:`dgmm.chunk.block_scale`).

    Returns
    -------
    Delayed
        Evaluates to a tuple of :class:`dgmm.chunk.SufficientStatistics`.
    """
    params = dask.delayed(batch, pure=True)
    fn = dask.delayed(chunk.e_step_statistics, pure=True)
    if blocks.weight_blocks is None:
        parts = [fn(block, params, None, threads) for block in blocks.blocks]
    else:
        parts = [fn(block, params, weight, threads) for block, weight in zip(blocks.blocks, blocks.weight_blocks)]
    return tree_reduce(parts, chunk.combine_statistics, split_every)


# ---------------------------------------------------------------------------
# Lazy per-row outputs
# ---------------------------------------------------------------------------


def _checked(X, block_info=None):
    """The chunk, or a ValueError naming its non-finite rows by their global index."""
    bad, first = chunk.nonfinite_summary(X)
    if bad:
        start = block_info[0]["array-location"][0][0] if block_info and 0 in block_info else 0
        first += start
        rows = f"row {start} has" if X.shape[0] == 1 else (
            f"{bad} of the {X.shape[0]} rows {start}-{start + X.shape[0] - 1} {'has' if bad == 1 else 'have'}")
        where = "" if X.shape[0] == 1 else f" (first at row {first})"
        raise chunk.NonFiniteInputError(
            f"Input X contains NaN or infinity: {rows} non-finite values{where}. Remove or impute them, "
            "or write predictions with such rows as missing: dgmm.io.write_predictions(..., nonfinite="
            "'missing'), or predict.nonfinite: missing in a dgmm config."
        )
    return X


def _score_samples_chunk(X, params, threads=1, block_info=None):
    return chunk.logsumexp_rows(chunk.weighted_log_prob(_checked(X, block_info), params, threads))


def _predict_chunk(X, params, threads=1, block_info=None):
    return chunk.weighted_log_prob(_checked(X, block_info), params, threads).argmax(axis=1)


def _predict_proba_chunk(X, params, threads=1, block_info=None):
    _, log_resp = chunk.log_prob_resp(_checked(X, block_info), params, threads)
    return array_module(log_resp).exp(log_resp)


def _shared(params):
    """Parameters as ONE graph key that every block task depends on (never copied into each task)."""
    return dask.delayed(params, pure=True)


def score_samples(X: da.Array, params: chunk.ChunkParams, dtype, threads: int = 1) -> da.Array:
    """Lazy per-row log-likelihood, a dask array with X's row chunks (and chunk library).

    ``threads`` (here and below): the threads of one process expected to compute the blocks at
    once (:func:`dgmm.chunk.block_scale`); only the block sizes depend on it.
    """
    out = X.map_blocks(
        _score_samples_chunk, _shared(params), threads, drop_axis=1, dtype=np.float64,
        meta=meta_from_array(X, 1, np.float64),
    )
    return out.astype(dtype)


def predict(X: da.Array, params: chunk.ChunkParams, threads: int = 1) -> da.Array:
    """Lazy labels, a dask array of int64 with X's row chunks (and chunk library)."""
    return X.map_blocks(
        _predict_chunk, _shared(params), threads, drop_axis=1, dtype=np.int64, meta=meta_from_array(X, 1, np.int64)
    )


def predict_proba(X: da.Array, params: chunk.ChunkParams, dtype, threads: int = 1) -> da.Array:
    """Lazy responsibilities, a dask array (n_samples, n_components) with X's row chunks (and chunk library)."""
    k = params.means.shape[0]
    out = X.map_blocks(
        _predict_proba_chunk,
        _shared(params),
        threads,
        chunks=(X.chunks[0], (k,)),
        dtype=np.float64,
        meta=meta_from_array(X, 2, np.float64),
    )
    return out.astype(dtype)


#: The outputs :func:`predictions` builds, in the order of :class:`dgmm.chunk.Predictions`.
PREDICTION_OUTPUTS = ("labels", "probabilities", "log_likelihood")


def _predictions_chunk(X, params, threads, outputs, block_info=None):
    return chunk.predictions(_checked(X, block_info), params, threads, **{name: True for name in outputs})


def _pick(predictions: chunk.Predictions, name: str):
    return getattr(predictions, name)


def predictions(X: da.Array, params: chunk.ChunkParams, dtype, threads: int = 1, *, labels: bool = True,
                probabilities: bool = False, log_likelihood: bool = False) -> dict[str, da.Array]:
    """Lazy labels, responsibilities and log-likelihood, from ONE E-step task per row chunk.

    Each chunk's weighted log-probabilities are computed once
    (:func:`dgmm.chunk.predictions`) and every output asked for is cut from
    that task's result, so computing the outputs together (in ONE compute)
    costs one E-step, not one per output. A single output is :func:`predict`,
    :func:`predict_proba` or :func:`score_samples` itself.

    Returns
    -------
    dict of str to dask.array.Array
        The outputs asked for, by name ('labels', 'probabilities',
        'log_likelihood'), with X's row chunks (and chunk library), as
        :func:`predict`, :func:`predict_proba` and :func:`score_samples` return them.
    """
    asked = dict(zip(PREDICTION_OUTPUTS, (labels, probabilities, log_likelihood)))
    outputs = tuple(name for name, wanted in asked.items() if wanted)
    if outputs == ("labels",):
        return {"labels": predict(X, params, threads)}
    if outputs == ("probabilities",):
        return {"probabilities": predict_proba(X, params, dtype, threads)}
    if outputs == ("log_likelihood",):
        return {"log_likelihood": score_samples(X, params, dtype, threads)}
    if not outputs:
        return {}
    k = params.means.shape[0]
    # One task per chunk whose result (a chunk.Predictions) the outputs below pick from.
    combined = X.map_blocks(_predictions_chunk, _shared(params), threads, outputs, drop_axis=1, dtype=object,
                            meta=np.empty((0,), dtype=object))
    out = {}
    if labels:
        out["labels"] = combined.map_blocks(_pick, "labels", dtype=np.int64, meta=meta_from_array(X, 1, np.int64))
    if probabilities:
        out["probabilities"] = combined.map_blocks(
            _pick, "probabilities", new_axis=1, chunks=(X.chunks[0], (k,)), dtype=np.float64,
            meta=meta_from_array(X, 2, np.float64),
        ).astype(dtype)
    if log_likelihood:
        out["log_likelihood"] = combined.map_blocks(
            _pick, "log_likelihood", dtype=np.float64, meta=meta_from_array(X, 1, np.float64)
        ).astype(dtype)
    return out
