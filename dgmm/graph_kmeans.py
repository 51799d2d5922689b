"""Graph builders for the k-means seeding passes: lazy map + tree reduction over row blocks.

Nothing here calls ``compute``. Each builder maps a chunk function of
:mod:`dgmm.chunk_kmeans` over the row blocks of a :class:`dgmm.graph.RowBlocks`
(with each block's global first row, which the row-indexed random numbers
need, and its row weights when the blocks have some) and tree-reduces the
per-chunk results with the matching ``combine_*`` function and fan-in
``split_every`` (:func:`dgmm.graph.tree_reduce`), so the result does not
depend on the chunking or on the shape of the tree. Every builder takes one
``*Args`` or a batch (tuple) of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
from dask.delayed import Delayed

from . import chunk, chunk_kmeans
from .graph import RowBlocks, tree_reduce


def map_reduce_rows(
    blocks: RowBlocks,
    chunk_fn: Callable[[Any, int, Any], Any],
    args: Any,
    combine: Callable[..., Any],
    split_every: int | None = None,
) -> Delayed:
    """Lazy ``combine`` of ``chunk_fn(block, row_start, args[, weights])`` over all row blocks.

    ``args`` enters the graph once, as one key every chunk task depends on,
    so a distributed scheduler ships it once per worker. When ``blocks`` has
    row weights, each block's weights are passed as a fourth argument.

    Parameters
    ----------
    blocks : RowBlocks
    chunk_fn : callable
        ``chunk_fn(X_block, row_start, args, sample_weight=None)`` returning a mergeable result.
    args : object
        Shared inputs of the pass.
    combine : callable
        Associative merge of any number of results.
    split_every : int or None
        Fan-in of the reduction tree (None: 8).

    Returns
    -------
    Delayed
    """
    shared = dask.delayed(args, pure=True)
    fn = dask.delayed(chunk_fn, pure=True)
    if blocks.weight_blocks is None:
        parts = [fn(block, int(start), shared) for block, start in zip(blocks.blocks, blocks.row_starts)]
    else:
        parts = [
            fn(block, int(start), shared, weights)
            for block, start, weights in zip(blocks.blocks, blocks.row_starts, blocks.weight_blocks)
        ]
    return tree_reduce(parts, combine, split_every)


def parallel_round(blocks: RowBlocks, args, split_every=None) -> Delayed:
    """Lazy k-means‖ round of one ParallelRoundArgs or a batch: tuples of :class:`dgmm.chunk_kmeans.ParallelRound`."""
    return map_reduce_rows(
        blocks, chunk_kmeans.parallel_round_chunk, args, chunk_kmeans.combine_parallel_rounds, split_every
    )


def plusplus_round(blocks: RowBlocks, args, split_every=None) -> Delayed:
    """Lazy greedy k-means++ step of one PlusPlusArgs or a batch: tuples of :class:`dgmm.chunk_kmeans.PlusPlusRound`."""
    return map_reduce_rows(
        blocks, chunk_kmeans.plusplus_round_chunk, args, chunk_kmeans.combine_plusplus_rounds, split_every
    )


def lloyd_step(blocks: RowBlocks, args, split_every=None) -> Delayed:
    """Lazy Lloyd step (``args``: a LloydArgs or a batch): tuples of :class:`dgmm.chunk_kmeans.LloydStep`."""
    return map_reduce_rows(blocks, chunk_kmeans.lloyd_chunk, args, chunk_kmeans.combine_lloyd_steps, split_every)


def init_statistics(blocks: RowBlocks, args: chunk_kmeans.InitStatisticsArgs, split_every=None) -> Delayed:
    """Lazy statistics of initial responsibilities, grouped by covariance type.

    Evaluates to one tuple of :class:`dgmm.chunk.SufficientStatistics` per group of ``args``.
    """
    return map_reduce_rows(blocks, chunk_kmeans.init_statistics_chunk, args, chunk.combine_statistics, split_every)
