"""Graph builders for the k-means seeding passes: lazy map + tree reduction over row blocks.

Nothing here calls ``compute``. Each builder maps a chunk function of
:mod:`dgmm.chunk_kmeans` over the row blocks of a :class:`dgmm.graph.RowBlocks`
(with each block's global first row, which the row-indexed random numbers
need) and tree-reduces the per-chunk results with the matching ``combine_*``
function and fan-in ``split_every`` (:func:`dgmm.graph.tree_reduce`), so the
result does not depend on the chunking or on the shape of the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
from dask.delayed import Delayed

from . import chunk_kmeans
from .graph import RowBlocks, tree_reduce


def map_reduce_rows(
    blocks: RowBlocks,
    chunk_fn: Callable[[Any, int, Any], Any],
    args: Any,
    combine: Callable[..., Any],
    split_every: int | None = None,
) -> Delayed:
    """Lazy ``combine`` of ``chunk_fn(block, row_start, args)`` over all row blocks.

    ``args`` enters the graph once, as one key every chunk task depends on,
    so a distributed scheduler ships it once per worker.

    Parameters
    ----------
    blocks : RowBlocks
    chunk_fn : callable
        ``chunk_fn(X_block, row_start, args)`` returning a mergeable result.
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
    parts = [fn(block, int(start), shared) for block, start in zip(blocks.blocks, blocks.row_starts)]
    return tree_reduce(parts, combine, split_every)


def parallel_round(blocks: RowBlocks, args: chunk_kmeans.ParallelRoundArgs, split_every=None) -> Delayed:
    """Lazy k-means‖ round: evaluates to a tuple of :class:`dgmm.chunk_kmeans.ParallelRound`."""
    return map_reduce_rows(
        blocks, chunk_kmeans.parallel_round_chunk, args, chunk_kmeans.combine_parallel_rounds, split_every
    )


def plusplus_round(blocks: RowBlocks, args: chunk_kmeans.PlusPlusArgs, split_every=None) -> Delayed:
    """Lazy greedy k-means++ step: evaluates to a tuple of :class:`dgmm.chunk_kmeans.PlusPlusRound`."""
    return map_reduce_rows(
        blocks, chunk_kmeans.plusplus_round_chunk, args, chunk_kmeans.combine_plusplus_rounds, split_every
    )


def lloyd_step(blocks: RowBlocks, args: chunk_kmeans.LloydArgs, split_every=None) -> Delayed:
    """Lazy Lloyd step: evaluates to a tuple of :class:`dgmm.chunk_kmeans.LloydStep`."""
    return map_reduce_rows(blocks, chunk_kmeans.lloyd_chunk, args, chunk_kmeans.combine_lloyd_steps, split_every)
