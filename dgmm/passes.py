"""Passes over the data: where graphs from :mod:`dgmm.graph` are computed.

A :class:`DataPasses` wraps the validated input of one ``fit`` (a NumPy array
or a dask array) and runs each pass over it with a single ``dask.compute`` (or
directly in-process when the data is one chunk, the fast path that avoids any
scheduling overhead for small data). The estimator and the initialisers are
its only callers.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading

import dask
import dask.array as da
import numpy as np

from . import chunk, chunk_kmeans, graph, graph_kmeans
from .namespace import to_host

logger = logging.getLogger(__name__)

#: Target bytes of one float64 chunk when dgmm chunks a NumPy array itself.
AUTO_CHUNK_BYTES = 8 * 2**20
#: Fewest rows in an automatically sized chunk.
AUTO_CHUNK_MIN_ROWS = 1024


def auto_chunk_rows(n_samples: int, n_features: int) -> int:
    """Rows per chunk for in-memory input: about 8 MiB of float64 per chunk."""
    rows = max(AUTO_CHUNK_MIN_ROWS, AUTO_CHUNK_BYTES // (8 * max(n_features, 1)))
    return int(min(rows, max(n_samples, 1)))


def _distributed_client():
    """The active distributed client, if any (without importing distributed for threaded use)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _sent_once(array: da.Array, weights: da.Array | None):
    """In-memory data cut into a dask array: sent to a distributed client's workers once, not with every pass.

    ``da.from_array`` embeds the NumPy chunks in the graph, so each pass's
    graph would carry all the data to the scheduler again. On a distributed
    client the chunks are persisted once (kept on the workers until the
    passes are done with them); on any other scheduler they are returned as
    they are (views of the array in this process).
    """
    if _threaded_scheduler_threads() is not None or dask.config.get("scheduler", None) in _ONE_THREAD_SCHEDULERS:
        return array, weights
    client = _distributed_client()
    if client is None:
        return array, weights
    import warnings

    with warnings.catch_warnings():  # "Sending large graph of size ...": once, deliberately
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return client.persist(array), None if weights is None else client.persist(weights)


_CONTROLLER = None


def _threadpool_controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def single_threaded_blas():
    """Limit BLAS to one thread while chunks are computed in this process.

    The chunk kernels issue many small, skinny GEMMs; multithreaded BLAS on
    those is slower than one thread, and under dask's threaded scheduler each
    worker thread starting its own BLAS threads oversubscribes the cores.
    Distributed worker processes set ``OMP_NUM_THREADS=1`` themselves, so
    nothing is changed when a distributed client is active.
    """
    scheduler = dask.config.get("scheduler", None)
    if _distributed_client() is None or scheduler in ("threads", "threading", "sync", "synchronous", "single-threaded"):
        return _threadpool_controller().limit(limits=1, user_api="blas")
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Read-ahead on dask's threaded scheduler
# ---------------------------------------------------------------------------

_READ_AHEAD_POOLS: dict[tuple[int, int], tuple] = {}
_READ_AHEAD_LOCK = threading.Lock()


def _read_ahead_pools(n_threads: int):
    """The (compute, read) thread pools of ``n_threads`` threads each, shared by all fits.

    Keyed by process id too: a forked child inherits the pool objects but not their threads.
    """
    key = (os.getpid(), n_threads)
    with _READ_AHEAD_LOCK:
        pools = _READ_AHEAD_POOLS.get(key)
        if pools is None:
            try:  # recent dask: propagates contextvars (and so caught warnings) to its threads
                from dask.threaded import ContextAwareThreadPoolExecutor as Executor
            except ImportError:  # older dask, as its own pool there
                from concurrent.futures import ThreadPoolExecutor as Executor

            pools = _READ_AHEAD_POOLS[key] = (
                Executor(n_threads, thread_name_prefix="dgmm-compute"),
                Executor(n_threads, thread_name_prefix="dgmm-read"),
            )
            for pool in pools:
                atexit.register(pool.shutdown, wait=False)
        return pools


class ReadAheadPool:
    """A ``pool`` for ``dask.threaded.get`` that reads chunks on threads of their own.

    Under dask's threaded scheduler each of its ``num_workers`` threads reads a
    chunk and then computes it, so while it waits for the disk (or a
    decompressor) its core is idle, and nothing is read while all threads
    compute. This pool keeps the same number of compute threads and adds as
    many reading threads: the tasks that produce the input's row blocks
    (``read_keys``: :attr:`dgmm.graph.RowBlocks.read_keys`, the blocks and
    every task upstream of them) run on the reading threads, everything else
    (the chunk kernels, the reduction) on the compute threads. The scheduler
    keeps up to twice ``n_threads`` tasks in flight, so at most about that many
    chunks are in memory, and reading overlaps computing.

    Parameters
    ----------
    read_keys : frozenset
        Keys of the tasks that produce input blocks.
    n_threads : int
        Compute threads, and reading threads.
    """

    def __init__(self, read_keys: frozenset, n_threads: int):
        self.read_keys = read_keys
        self.compute_pool, self.read_pool = _read_ahead_pools(n_threads)
        #: Tasks in flight at once (``dask.threaded.get`` reads this attribute).
        self._max_workers = 2 * n_threads

    def _reads(self, batch) -> bool:
        # dask.local submits batch_execute_tasks(args) with one (key, task, ...) tuple per task;
        # anything else goes to the compute threads.
        try:
            return bool(batch) and all(entry[0] in self.read_keys for entry in batch)
        except (TypeError, IndexError, KeyError):
            return False

    def submit(self, fn, *args, **kwargs):
        pool = self.read_pool if args and self._reads(args[0]) else self.compute_pool
        return pool.submit(fn, *args, **kwargs)


def _threaded_scheduler_threads() -> int | None:
    """dask's ``num_workers`` (default: one per core) when a pass would run on its threaded scheduler, else None.

    None when a distributed client is active (and the ``scheduler`` config does
    not ask for threads) or when the ``scheduler`` config names another scheduler.
    """
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("threads", "threading") or (scheduler is None and _distributed_client() is None):
        from dask.system import CPU_COUNT

        return int(dask.config.get("num_workers", None) or CPU_COUNT)
    return None


def read_ahead_pool(read_keys: frozenset) -> ReadAheadPool | None:
    """A :class:`ReadAheadPool` when a pass would run on dask's threaded scheduler, else None.

    None on any other scheduler, and when the ``pool`` config gives dask a pool
    of the user's. The compute threads are dask's ``num_workers``.
    """
    threads = _threaded_scheduler_threads()
    if threads is None or dask.config.get("pool", None) is not None:
        return None
    return ReadAheadPool(read_keys, threads)


#: Schedulers that run one task per process at a time.
_ONE_THREAD_SCHEDULERS = ("sync", "synchronous", "single-threaded", "processes", "multiprocessing")


def kernel_threads() -> int:
    """How many threads of one process will run chunk kernels at once in a pass (:func:`dgmm.chunk.block_scale`).

    dask's threaded scheduler: its compute threads (``num_workers``, or the
    size of a pool given in the ``pool`` config); a distributed client: the
    most threads of any of its workers (1 when it has none yet, or when they
    cannot be asked); the synchronous and multiprocessing schedulers: 1.
    """
    threads = _threaded_scheduler_threads()
    if threads is not None:
        pool = dask.config.get("pool", None)
        return int(getattr(pool, "_max_workers", None) or threads) if pool is not None else threads
    if dask.config.get("scheduler", None) in _ONE_THREAD_SCHEDULERS:
        return 1
    client = _distributed_client()
    if client is None:
        return 1
    try:
        return max([int(n) for n in client.nthreads().values()], default=1)
    except (OSError, TimeoutError, RuntimeError):  # a hint only: closed comms get one-thread blocks
        logger.debug("could not ask the scheduler for its workers' threads", exc_info=True)
        return 1


class DataPasses:
    """Runs passes over one validated input.

    Parameters
    ----------
    X : ndarray or dask.array.Array of shape (n_samples, n_features)
        Float32 or float64; a dask array must have one chunk along features
        and known row chunks.
    chunk_size : int or 'auto'
        Rows per chunk when X is a NumPy array.
    split_every : int or None
        Fan-in of the reduction tree.
    sample_weight : ndarray or dask.array.Array of shape (n_samples,), optional
        Validated non-negative row weights.
    """

    def __init__(self, X, chunk_size="auto", split_every=None, sample_weight=None):
        self.n_samples, self.n_features = (int(s) for s in X.shape)
        self.dtype = X.dtype
        self.split_every = split_every
        self.n_passes = 0
        self.sample_weight = sample_weight
        weight_array = None
        if isinstance(X, da.Array):
            self.numpy = None
            self.array = X
            if sample_weight is not None:
                weight_array = da.asarray(sample_weight)
        else:
            rows = auto_chunk_rows(self.n_samples, self.n_features) if chunk_size == "auto" else int(chunk_size)
            self.numpy = X
            self.array = None if self.n_samples <= rows else da.from_array(X, chunks=(rows, self.n_features))
            if sample_weight is not None:
                sample_weight = np.asarray(sample_weight, dtype=np.float64)
                self.sample_weight = sample_weight
                if self.array is not None:
                    weight_array = da.from_array(sample_weight, chunks=(rows,))
            if self.array is not None:
                self.array, weight_array = _sent_once(self.array, weight_array)
        self.blocks = graph.RowBlocks(self.array, weight_array) if self.array is not None else None

    @property
    def in_process(self) -> bool:
        """True when the whole input is one in-memory chunk (no scheduler involved)."""
        return self.blocks is None

    @property
    def n_chunks(self) -> int:
        return 1 if self.blocks is None else len(self.blocks)

    def _compute(self, lazy):
        self.n_passes += 1
        pool = read_ahead_pool(self.blocks.read_keys)
        (result,) = dask.compute(lazy) if pool is None else dask.compute(lazy, pool=pool)
        return result

    def e_step(self, batch: tuple[chunk.ChunkParams, ...]) -> tuple[chunk.SufficientStatistics, ...]:
        """One pass: E-step statistics of every parameter set of ``batch``."""
        if self.in_process:
            self.n_passes += 1
            return chunk.e_step_statistics(self.numpy, batch, self.sample_weight)
        return self._compute(graph.e_step_statistics(self.blocks, batch, self.split_every, kernel_threads()))

    def init_statistics(self, specs, center, covariance_type) -> tuple[chunk.SufficientStatistics, ...]:
        """One pass: statistics of one covariance type under initial responsibilities."""
        return self.init_statistics_groups(((covariance_type, tuple(specs)),), center)[0]

    def init_statistics_groups(self, groups, center) -> tuple[tuple[chunk.SufficientStatistics, ...], ...]:
        """One pass: statistics under initial responsibilities, for groups of (covariance type, specs).

        Returns one tuple of statistics (one per spec) per group.
        """
        args = chunk_kmeans.InitStatisticsArgs(np.asarray(center, dtype=np.float64), tuple(groups))
        if self.in_process:
            self.n_passes += 1
            return chunk_kmeans.init_statistics_chunk(self.numpy, 0, args, self.sample_weight)
        return self._compute(graph_kmeans.init_statistics(self.blocks, args, self.split_every))

    def _reduce_rows(self, chunk_fn, args, combine):
        """One pass: ``chunk_fn(block, row_start, args, weights)`` of every chunk, tree-reduced by ``combine``."""
        if self.in_process:
            self.n_passes += 1
            return combine(chunk_fn(self.numpy, 0, args, self.sample_weight))
        return self._compute(graph_kmeans.map_reduce_rows(self.blocks, chunk_fn, args, combine, self.split_every))

    def kmeans_parallel_round(self, args):
        """One pass: a k-means‖ round (costs, candidate weights, sampled rows) for every restart.

        ``args`` is a :class:`dgmm.chunk_kmeans.ParallelRoundArgs` (result: a
        tuple of ParallelRound, one per restart) or a batch of them (one such
        tuple per seeding).
        """
        return self._reduce_rows(chunk_kmeans.parallel_round_chunk, args, chunk_kmeans.combine_parallel_rounds)

    def kmeans_plusplus_round(self, args):
        """One pass: a greedy k-means++ step (trial potentials, next trials) for every restart (or batch)."""
        return self._reduce_rows(chunk_kmeans.plusplus_round_chunk, args, chunk_kmeans.combine_plusplus_rounds)

    def lloyd_step(self, args):
        """One pass: a Lloyd step (inertia, hard-assignment statistics, farthest rows) of every restart (or batch)."""
        return self._reduce_rows(chunk_kmeans.lloyd_chunk, args, chunk_kmeans.combine_lloyd_steps)

    def head(self, n_rows: int) -> np.ndarray:
        """The first ``n_rows`` rows as a NumPy array (reads the first chunks only)."""
        if self.numpy is not None:
            return np.asarray(self.numpy[:n_rows])
        return self._sorted_rows(np.arange(min(n_rows, self.n_samples)))

    def tail(self, n_rows: int) -> np.ndarray:
        """The last ``n_rows`` rows as a NumPy array (reads the last chunks only)."""
        start = max(self.n_samples - n_rows, 0)
        if self.numpy is not None:
            return np.asarray(self.numpy[start:])
        return self._sorted_rows(np.arange(start, self.n_samples))

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global ``indices`` (any order, repeats allowed) as a NumPy array."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.numpy is not None:
            return np.asarray(self.numpy[indices])
        unique, inverse = np.unique(indices, return_inverse=True)
        return self._sorted_rows(unique)[inverse.reshape(-1)]

    def _sorted_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted distinct global ``indices``, read through the passes' own block tasks."""
        if len(indices) == 0:
            return np.empty((0, self.n_features), dtype=self.dtype)
        parts = dask.compute(*graph.take_rows(self.blocks, indices))
        return np.concatenate([to_host(part) for part in parts])

    def weighted_rows(self, fractions) -> np.ndarray:
        """Rows drawn with probability ∝ weight, one per fraction in [0, 1) (uniformly when unweighted).

        Row ``i`` is returned for a fraction ``f`` when the running weight
        before it is ``<= f × Σw`` and after it ``> f × Σw``. Reads the
        weights only (per-block totals, then the blocks holding the rows),
        never X.
        """
        fractions = np.asarray(fractions, dtype=np.float64)
        weights = self.sample_weight
        if weights is None:
            return np.minimum((fractions * self.n_samples).astype(np.int64), self.n_samples - 1)
        if isinstance(weights, np.ndarray):
            running = np.cumsum(weights)
            return np.minimum(np.searchsorted(running, fractions * running[-1], side="right"), self.n_samples - 1)
        # dask weights come with dask X only, so the passes' own weight tasks hold them
        blocks, starts = self.blocks.weight_blocks, self.blocks.row_starts
        totals = np.cumsum(np.asarray(dask.compute(*[block.sum() for block in blocks]), dtype=np.float64))
        targets = fractions * totals[-1]
        holding = [min(int(np.searchsorted(totals, target, side="right")), len(blocks) - 1) for target in targets]
        needed = sorted(set(holding))  # each block holding a row is read once, all in one compute
        loaded = dask.compute(*[blocks[j] for j in needed])
        running = {j: np.cumsum(np.asarray(w, dtype=np.float64)) for j, w in zip(needed, loaded)}
        out = np.empty(len(fractions), dtype=np.int64)
        for i, (target, j) in enumerate(zip(targets, holding)):
            local = target - (totals[j - 1] if j else 0.0)
            out[i] = starts[j] + min(int(np.searchsorted(running[j], local, side="right")), len(running[j]) - 1)
        return out

    def sample(self, size: int, random_state: np.random.RandomState):
        """A uniform random sample of ``size`` rows (all rows, in order, if ``size >= n_samples``).

        Returns the rows and their sorted global indices (None for all rows).

        Consumes ``random_state`` only when it actually subsamples, so small
        inputs follow exactly the same random stream as sklearn.
        """
        if size >= self.n_samples:
            return (self.numpy if self.numpy is not None else self._sorted_rows(np.arange(self.n_samples))), None
        rng = np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
        indices = np.sort(rng.choice(self.n_samples, size=size, replace=False))
        return self.rows(indices), indices

    def locate_nonfinite(self) -> tuple[int, int]:
        """Count rows with NaN/inf and the index of the first (an extra pass, error path only)."""
        if self.numpy is not None:
            return chunk.nonfinite_summary(self.numpy)
        found = dask.compute(*graph.nonfinite_rows(self.blocks))
        count = sum(n for n, _ in found)
        first = next((int(start) + j for (n, j), start in zip(found, self.blocks.row_starts) if n), -1)
        return int(count), first


def nonfinite_error(count: int, first: int, n_samples: int) -> ValueError:
    """The error for inputs holding NaN or infinity."""
    return chunk.NonFiniteInputError(
        f"Input X contains NaN or infinity: {count} of {n_samples} rows {'has' if count == 1 else 'have'} "
        f"non-finite values (first at row {first}). Remove or impute them before fitting."
    )

