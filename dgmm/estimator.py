"""The estimator: :class:`GaussianMixture`, a drop-in for sklearn's, fitted by out-of-core EM.

This module is a driver. It validates, initialises, runs the EM loop (one
pass over the data per iteration for all restarts together, see
:mod:`dgmm.passes`) and keeps the fitted attributes. Chunk math lives in
:mod:`dgmm.chunk`, graph building in :mod:`dgmm.graph`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple
from numbers import Integral, Real

import dask
import dask.array as da
import numpy as np
import sklearn
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import chunk, graph
from ._version import __version__
from .checkpoint import (
    CheckpointError,
    CheckpointState,
    data_sum_mismatch,
    data_sum_record,
    fingerprint_mismatch,
    is_checkpoint_file,
    load_checkpoint,
    save_checkpoint,
)
from .init import InitRequest, initial_statistics
from .namespace import is_gpu_array
from .passes import DataPasses, auto_chunk_rows, kernel_threads, nonfinite_error, single_threaded_blas
from .validation import (
    check_input,
    check_means,
    check_n_samples,
    check_parameter_memory,
    check_precisions,
    check_sample_weight,
    check_weights,
)

logger = logging.getLogger(__name__)


def _like_input(X, result):
    """A lazy per-row ``result`` as the caller expects it: computed (a CuPy array) for a CuPy array X."""
    return result.compute() if is_gpu_array(X) else result


#: A lower bound that falls by more than this, relative to 1 + |previous|, between two EM iterations
#: gets a warning: EM does not lower it beyond rounding and reg_covar's small effect, but a pass over
#: other rows (an input rewritten or replaced during the fit) does.
LOWER_BOUND_DROP = 1e-3
#: How closely a resumed fit's first pass must reproduce the row sums of the pass before its checkpoint,
#: relative to n_samples x each feature's spread (float32 'full' chunks sum their products in float32).
RESUMED_DATA_RTOL = {"float64": 1e-10, "float32": 1e-5}


class DegenerateComponentWarning(UserWarning):
    """A mixture component lost its mass or its covariance collapsed during EM (the fit goes on)."""


class IterationInfo(NamedTuple):
    """What callbacks receive after every EM iteration (one pass over the data).

    ``lower_bound`` and ``change`` are those of the best restart still
    running (or of the only one).
    """

    n_iter: int
    lower_bound: float
    change: float
    seconds: float
    n_samples: int
    rows_per_second: float
    n_active: int
    converged: bool


@dataclass
class _Run:
    """State of one EM run (one restart), all in float64."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray | None
    precisions_cholesky: np.ndarray
    lower_bound: float = -np.inf
    lower_bounds: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    start_time: float = 0.0

    def params(self, covariance_type: str, input_dtype=None) -> chunk.ChunkParams:
        return chunk.chunk_params(
            self.weights, self.means, self.precisions_cholesky, covariance_type, input_dtype=input_dtype
        )


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by out-of-core EM over dask arrays.

    A drop-in for :class:`sklearn.mixture.GaussianMixture`: same parameters,
    defaults, fitted attributes, methods, warnings and error messages. Each EM
    iteration is one pass over the data; every chunk yields small float64
    sufficient statistics that are tree-reduced into one M-step, so no array
    with ``n_samples`` rows is ever held in memory.

    Parameters
    ----------
    n_components : int, default=1
        The number of mixture components.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        The type of covariance parameters.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood lower bound.
    reg_covar : float, default=1e-6
        Non-negative regularization added to the diagonal of covariances.
    max_iter : int, default=100
        The number of EM iterations to perform.
    n_init : int, default=1
        The number of initializations; all advance together, so each EM
        iteration still reads every chunk once.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        The method used to initialize the responsibilities. On data of at
        most ``init_sample_size`` rows, 'kmeans' and 'k-means++' run sklearn's
        ``KMeans`` / ``kmeans_plusplus`` in memory and reproduce sklearn's
        initialisation exactly (float32: same seeds, see the README's "Where
        the numbers differ from sklearn's"). Larger data is seeded out of core over all
        rows: 'kmeans' by k-means‖ then Lloyd passes (usually 4 or 5 passes, at most 8),
        'k-means++' greedily with one pass per component, plus one. All
        restarts share every pass; see :mod:`dgmm.init`.
    weights_init : array-like of shape (n_components,), default=None
    means_init : array-like of shape (n_components, n_features), default=None
    precisions_init : array-like, default=None
        User-provided initial weights, means and precisions (never modified).
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
        If True, the solution of the last fit is used as initialization.
    verbose : int, default=0
        Print progress (1: iterations, 2: also timing and change) as sklearn does.
    verbose_interval : int, default=10
        Number of iterations between progress messages.
    chunk_size : int or 'auto', default='auto'
        Rows per chunk when X is a NumPy array or DataFrame ('auto': about
        8 MiB of float64 per chunk). Dask and Zarr inputs keep their own chunks.
        The full rule: docs/scaling.md, "Chunk size and scheduler: the automatic choice".
    split_every : int or None, default=None
        Fan-in of the reduction tree of the per-chunk statistics (None: 8).
    init_sample_size : int, default=100_000
        Most rows that 'kmeans' and 'k-means++' seed in memory, as sklearn
        does; larger data is seeded out of core (see ``init_params``).
    callbacks : callable or list of callables, default=None
        Called after every EM iteration with an :class:`IterationInfo`
        (``n_iter``, ``lower_bound``, ``change``, ``seconds``,
        ``rows_per_second``, ...).
        A callback may raise to stop the fit; the last checkpoint stays valid.
    checkpoint : str or path-like, default=None
        File to which the full EM state is written atomically every
        ``checkpoint_every`` iterations (an ``.npz`` archive with JSON
        metadata; no pickle). ``fit(X, resume=True)`` continues from it.
    checkpoint_every : int, default=1
        Iterations between checkpoints.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
    precisions_ : ndarray
    precisions_cholesky_ : ndarray
        The shapes depend on ``covariance_type``:

        - 'full': (n_components, n_features, n_features)
        - 'tied': (n_features, n_features)
        - 'diag': (n_components, n_features)
        - 'spherical': (n_components,)
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
    lower_bounds_ : list of float
        Lower bound after each iteration of the best initialization.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.
    n_passes_ : int
        Passes over the data made by the last ``fit``: the initialisation's, and
        one per EM iteration (two in an iteration where a 'full' component
        jumped so far, onto a far outlier, that its statistics are recomputed
        about its new mean).

    Examples
    --------
    >>> import dask.array as da
    >>> from dgmm import GaussianMixture
    >>> X = da.random.default_rng(0).normal(size=(10_000, 2), chunks=(2_500, 2))
    >>> gm = GaussianMixture(n_components=2, random_state=0).fit(X)
    >>> gm.means_.shape
    (2, 2)
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions({"kmeans", "random", "random_from_data", "k-means++"})],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "split_every": [Interval(Integral, 2, None, closed="left"), None],
        "init_sample_size": [Interval(Integral, 1, None, closed="left")],
        "callbacks": [list, tuple, callable, None],
        "checkpoint": [str, os.PathLike, None],
        "checkpoint_every": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        chunk_size="auto",
        split_every=None,
        init_sample_size=100_000,
        callbacks=None,
        checkpoint=None,
        checkpoint_every=1,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size
        self.split_every = split_every
        self.init_sample_size = init_sample_size
        self.callbacks = callbacks
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every

    # ------------------------------------------------------------------
    # Fitting
    # ------------------------------------------------------------------

    def fit(self, X, y=None, sample_weight=None, *, resume=False):
        """Estimate model parameters with the EM algorithm.

        Fits ``n_init`` initializations (advancing together, one pass over the
        data per iteration) and keeps the one with the largest lower bound.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            NumPy array, pandas DataFrame, dask array, dask DataFrame, Zarr
            array, or xarray DataArray of a dask array.
        y : Ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights (NumPy or dask array, or a dask DataFrame
            column, aligned with X's rows). An integer weight w gives the same
            model as repeating the row w times, a zero weight the same as
            dropping it. The EM passes, the initial statistics and the
            seedings all use the weights: a zero-weight row never seeds a
            component.
        resume : bool, default=False
            Continue from ``checkpoint`` if that file exists (the result equals
            an uninterrupted fit). A checkpoint written for other data or for
            settings that change the model is refused.

        Returns
        -------
        self : GaussianMixture

        Raises
        ------
        ValueError
            For invalid parameters or input (NaN/inf, wrong shape, too few samples).
        dgmm.checkpoint.CheckpointError
            When resuming from an unusable checkpoint.
        """
        self._fit(X, sample_weight=sample_weight, resume=resume)
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then predict the most probable component of every row of X.

        Parameters
        ----------
        X, y, sample_weight
            As for :meth:`fit`.

        Returns
        -------
        labels : ndarray of shape (n_samples,), or a lazy dask array for lazy input.
        """
        Xv = self._fit(X, sample_weight=sample_weight)
        return self._predict_validated(Xv)

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit(self, X, sample_weight=None, resume=False):
        if self.checkpoint is not None and "://" in os.fspath(self.checkpoint):
            raise ValueError(
                f"checkpoint must be a local path (checkpoints are written atomically by a rename), got "
                f"{os.fspath(self.checkpoint)!r}; the model itself can go to a URL with dgmm.save_model"
            )
        Xv = check_input(self, X, reset=True, ensure_min_samples=2)
        n_samples, n_features = Xv.shape
        sample_weight = check_sample_weight(sample_weight, n_samples, isinstance(Xv, da.Array))
        if n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components "
                f"but got n_components = {self.n_components}, "
                f"n_samples = {n_samples}"
            )
        check_parameter_memory(self.n_components, n_features, self.covariance_type, self.n_init, n_samples)
        weights_init, means_init, precisions_init = self._check_init_parameters(n_features)
        self._degenerate_warned = set()
        data = DataPasses(Xv, chunk_size=self.chunk_size, split_every=self.split_every, sample_weight=sample_weight)
        self._dtype = np.dtype(Xv.dtype)
        eps = float(np.finfo(self._dtype).eps)

        do_init = not (self.warm_start and hasattr(self, "converged_"))
        if not do_init:  # (sklearn fails in a matmul)
            self._check_continued_model(None, n_features, "warm_start",
                                             "set warm_start=False to fit a new model with them")
        n_init = self.n_init if do_init else 1
        self.converged_ = False
        random_state = check_random_state(self.random_state)
        self._verbose_out = _VerboseOutput(n_init, self.verbose, self.verbose_interval)

        with single_threaded_blas():
            self._fit_passes(
                data, random_state, n_init, do_init, weights_init, means_init, precisions_init, eps, resume
            )
        return Xv

    def _fit_passes(self, data, random_state, n_init, do_init, weights_init, means_init, precisions_init, eps, resume):
        self._fingerprint = None
        self._data_sum = self._resumed_data_sum = None
        restored = None
        if self.checkpoint is not None:
            path = os.fspath(self.checkpoint)
            # (resuming reads it, and says what is wrong with it)
            if os.path.isdir(path) or (not resume and os.path.exists(path) and not is_checkpoint_file(path)):
                raise ValueError(
                    f"checkpoint {path} is {'a directory' if os.path.isdir(path) else 'a file but not a dgmm checkpoint'}"
                    "; name a new file, or a checkpoint of an earlier fit (it is replaced every checkpoint_every "
                    "iterations)"
                )
            self._fingerprint = self._make_fingerprint(data, weights_init, means_init, precisions_init)
        if resume:
            restored = self._restore_checkpoint()
        if restored is not None:
            runs, start_iter, active = restored
            for i, run in enumerate(runs):  # restarts that had ended before the checkpoint: how they ended
                if i not in active:
                    self._verbose_out.end(i, run.lower_bound, run.converged, 0.0)
        elif do_init:
            runs = self._initialize_runs(data, n_init, random_state, weights_init, means_init, precisions_init, eps)
        else:
            runs = [
                _Run(
                    weights=np.asarray(self.weights_, dtype=np.float64),
                    means=np.asarray(self.means_, dtype=np.float64),
                    covariances=np.asarray(self.covariances_, dtype=np.float64),
                    precisions_cholesky=np.asarray(self.precisions_cholesky_, dtype=np.float64),
                    lower_bound=float(self.lower_bound_),
                )
            ]
        if restored is None:
            start_iter, active = 1, list(range(len(runs)))
        self._run_em(data, runs, eps, start_iter, active)
        self._finish(runs, data)

    def _finish(self, runs, data):
        """Keep the best restart as sklearn does (largest lower bound) and set the fitted attributes."""
        max_lower_bound = -np.inf
        best = runs[-1]
        if self.max_iter > 0:
            best = runs[chunk.best_restart([run.lower_bound for run in runs])]
            max_lower_bound = best.lower_bound
            self.converged_ = best.converged
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. "
                "Try different init parameters, or increase max_iter, "
                "tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=_caller_stacklevel(),
            )
        self._set_fitted(best)
        self.n_iter_ = best.n_iter if self.max_iter > 0 else 0
        self.lower_bound_ = np.float64(max_lower_bound)
        self.lower_bounds_ = list(best.lower_bounds) if self.max_iter > 0 else []
        self.n_passes_ = data.n_passes

    def _check_init_parameters(self, n_features):
        weights = means = precisions = None
        if self.weights_init is not None:
            weights = check_weights(self.weights_init, self.n_components)
        if self.means_init is not None:
            means = check_means(self.means_init, self.n_components, n_features)
        if self.precisions_init is not None:
            precisions = check_precisions(self.precisions_init, self.covariance_type, self.n_components, n_features)
        return weights, means, precisions

    def _initialize_runs(self, data, n_init, random_state, weights_init, means_init, precisions_init, eps):
        initial = None
        if weights_init is None or means_init is None or precisions_init is None:
            request = InitRequest(self.n_components, self.covariance_type, n_init, random_state)
            center, (stats_list,), (shifts,) = initial_statistics(
                data, self.init_params, self.init_sample_size, [request]
            )
            initial = (center, stats_list, shifts)
        return self._runs_from_statistics(data, initial, n_init, weights_init, means_init, precisions_init, eps)

    def _runs_from_statistics(self, data, initial, n_init, weights_init, means_init, precisions_init, eps):
        """The restarts' initial runs from ``initial = (center, statistics, shifts)`` (None: all parameters given).

        ``statistics`` and ``shifts`` hold one entry per restart (see :class:`dgmm.init.InitialStatistics`).
        """
        kind = self.covariance_type
        center, stats_list, shifts = initial if initial is not None else (None, None, None)
        if stats_list is not None:
            self._check_finite(stats_list[0], data)
        runs = []
        for i in range(n_init):
            weights = means = covariances = None
            if stats_list is not None:
                weights, means, covariances = chunk.parameters_from_statistics(
                    stats_list[i],
                    center,
                    shifts[i],
                    self.reg_covar,
                    kind,
                    eps=eps,
                    initialization=True,
                )
            if weights_init is not None:
                weights = weights_init
            if means_init is not None:
                means = means_init
            if precisions_init is None:
                prec_chol = chunk.compute_precision_cholesky(covariances, kind, self._dtype == np.float32)
            else:
                precisions = np.asarray(precisions_init, dtype=np.float64)
                prec_chol = chunk.precision_cholesky_from_precisions(precisions, kind)
                covariances = chunk.covariances_from_precisions(precisions, kind)
            runs.append(
                _Run(
                    weights=np.asarray(weights, dtype=np.float64),
                    means=np.asarray(means, dtype=np.float64),
                    covariances=np.asarray(covariances, dtype=np.float64),
                    precisions_cholesky=np.asarray(prec_chol, dtype=np.float64),
                )
            )
        return runs

    @staticmethod
    def _check_finite(stats, data):
        if stats.n_nonfinite:
            count, first = data.locate_nonfinite()
            raise nonfinite_error(count, first, data.n_samples)

    def _run_em(self, data, runs, eps, start_iter=1, active=None):
        kind = self.covariance_type
        float32 = self._dtype == np.float32
        if self.max_iter == 0:
            verbose = getattr(self, "_verbose_out", None)
            if verbose is not None:
                verbose.no_iterations()
            return
        active = list(range(len(runs))) if active is None else list(active)
        callbacks = self._callback_list()
        t0 = time.perf_counter()
        for run in runs:
            run.start_time = t0
        iter_time = t0
        last_done, last_saved = start_iter - 1, start_iter - 1
        try:
            for n_iter in range(start_iter, self.max_iter + 1):
                if not active:
                    break
                active, info = self._em_iteration(data, runs, active, n_iter, eps, kind, float32, iter_time)
                last_done = n_iter
                if self.checkpoint is not None and (n_iter % self.checkpoint_every == 0 or not active):
                    self._save_checkpoint(runs, n_iter, active)
                    last_saved = n_iter
                for callback in callbacks:
                    callback(info)
                iter_time = time.perf_counter()
        except KeyboardInterrupt:
            # Ctrl-C: leave a resumable state of the last completed iteration
            # (an iteration's updates are committed all at once, see _em_iteration).
            if self.checkpoint is not None and last_done > last_saved:
                self._save_checkpoint(runs, last_done, active)
            raise

    def _em_iteration(self, data, runs, active, n_iter, eps, kind, float32, iter_time):
        """One pass over the data for every active restart, then their M-steps.

        All restarts' updates are computed first and committed together, so an
        exception (a degenerate covariance, Ctrl-C) leaves every run at the
        previous completed iteration.
        """
        batch = self._em_batch(runs, active)
        stats_list = data.e_step(batch)
        return self._em_update(data, runs, active, batch, stats_list, n_iter, eps, float32, iter_time)

    def _em_batch(self, runs, active) -> tuple[chunk.ChunkParams, ...]:
        """The parameter sets of the active restarts, as the chunk kernels take them."""
        return tuple(runs[i].params(self.covariance_type, self._dtype) for i in active)

    def _em_update(self, data, runs, active, batch, stats_list, n_iter, eps, float32, iter_time):
        """M-steps of the active restarts from one pass's statistics; convergence bookkeeping."""
        kind = self.covariance_type
        self._check_finite(stats_list[0], data)
        if self._resumed_data_sum is not None:
            self._check_resumed_data(batch[0].center, stats_list[0])
        updates = []
        steps = self._m_steps(data, batch, stats_list, eps)
        for stats, (weights, means, covariances, smallest) in zip(stats_list, steps):
            prec_chol = chunk.compute_precision_cholesky(covariances, kind, float32)
            self._warn_degenerate(stats.nk, covariances, n_iter, stats.n_samples / max(data.n_samples, 1), smallest)
            updates.append((weights, means, covariances, prec_chol, stats.log_likelihood / stats.n_samples))
        now = time.perf_counter()
        seconds = now - iter_time
        if self.checkpoint is not None:
            weights, means, covariances = updates[0][:3]
            std = chunk.mixture_feature_std(weights, means, covariances, kind)
            self._data_sum = data_sum_record(batch[0].center, stats_list[0].sy, stats_list[0].n_samples, std)
        still_active = []
        for i, (weights, means, covariances, prec_chol, lower_bound) in zip(active, updates):
            run = runs[i]
            change = lower_bound - run.lower_bound
            # (a warm start's first bound follows the previous fit's, maybe on other data: nothing to compare;
            # the parameters of this pass came from an M-step with reg_covar, which may lower it so far)
            margin = -LOWER_BOUND_DROP * (1.0 + abs(run.lower_bound))
            if run.lower_bounds and change < margin and change < margin - chunk.regularisation_drop_bound(
                    run.weights, run.covariances, self.reg_covar, kind, data.n_features):
                warnings.warn(
                    f"EM iteration {n_iter}: the lower bound fell from {run.lower_bound:.8g} to {lower_bound:.8g}. "
                    "An EM step does not lower it by so much (reg_covar accounted for): the rows read in this "
                    "pass differ from the last pass's (was the input changed or replaced during the fit?).",
                    RuntimeWarning,
                    stacklevel=_caller_stacklevel(),
                )
            run.weights, run.means, run.covariances, run.precisions_cholesky = weights, means, covariances, prec_chol
            run.lower_bound = lower_bound
            run.lower_bounds.append(np.float64(lower_bound))
            run.n_iter = n_iter
            logger.debug("restart %d iteration %d: lower bound %.10g, change %.3g", i, n_iter, lower_bound, change)
            verbose = getattr(self, "_verbose_out", None)
            if verbose is not None:
                verbose.iteration(i, n_iter, change, seconds)
            if abs(change) < self.tol:
                run.converged = True
            else:
                still_active.append(i)
            if (run.converged or n_iter == self.max_iter) and verbose is not None:
                verbose.end(i, run.lower_bound, run.converged, now - run.start_time)
        best = max(active, key=lambda j: runs[j].lower_bound)
        run = runs[best]
        previous = run.lower_bounds[-2] if len(run.lower_bounds) > 1 else -np.inf
        info = IterationInfo(
            n_iter=n_iter,
            lower_bound=float(run.lower_bound),
            change=float(run.lower_bound - previous),
            seconds=seconds,
            n_samples=data.n_samples,
            rows_per_second=data.n_samples / seconds if seconds > 0 else float("inf"),
            n_active=len(still_active),
            converged=not still_active,
        )
        logger.info(
            "iteration %d: lower bound %.8f, change %.3g, %.2f s, %.3g rows/s",
            info.n_iter,
            info.lower_bound,
            info.change,
            info.seconds,
            info.rows_per_second,
        )
        return still_active, info

    def _m_steps(self, data, batch, stats_list, eps):
        """M-steps of one pass's statistics: per member, weights, means, covariances and (for 'full',
        else None) the covariances' smallest eigenvalues.

        'full' moments are taken about the previous means. A component that moved so far in one step
        that its covariance kept fewer than a quarter of its digits after that shift (it jumped onto a far outlier;
        :func:`dgmm.chunk.shift_precision_lost`) has its member's pass redone with the same parameters
        (the same responsibilities) and its moments about its new mean: exact statistics, for one extra
        pass in such iterations only. The other components' statistics come out the same.
        """
        kind = self.covariance_type
        steps = [
            chunk.parameters_from_statistics(stats, params.center, params.means, self.reg_covar, kind, eps=eps)
            for params, stats in zip(batch, stats_list)
        ]
        if kind != "full":
            return [step + (None,) for step in steps]
        smallest = [chunk.smallest_eigenvalues(step[2]) for step in steps]
        lost = [chunk.shift_precision_lost(stats, values, eps, step[2]) for stats, values, step in
                zip(stats_list, smallest, steps)]
        redo = [m for m, flags in enumerate(lost) if flags.any()]
        if redo:
            again = tuple(
                batch[m]._replace(
                    shifts=np.where(lost[m][:, None], steps[m][1] - batch[m].center, batch[m].means)
                )
                for m in redo
            )
            logger.info(
                "components %s moved too far for moments about their previous means: pass redone about the new means",
                [np.flatnonzero(lost[m]).tolist() for m in redo],
            )
            for m, params, stats in zip(redo, again, data.e_step(again)):
                steps[m] = chunk.parameters_from_statistics(
                    stats, params.center, params.shifts, self.reg_covar, kind, eps=eps
                )
                smallest[m] = chunk.smallest_eigenvalues(steps[m][2])
        return [step + (values,) for step, values in zip(steps, smallest)]

    def _warn_degenerate(self, nk, covariances, n_iter, row_weight=1.0, smallest=None):
        """Warn once per component that lost its mass or whose covariance collapsed to reg_covar.

        ``row_weight``: the mean sample weight of a row (1 unweighted), the unit of "one row" of mass.
        ``smallest``: the 'full' covariances' smallest eigenvalues, when already known.
        """
        warned = self.__dict__.setdefault("_degenerate_warned", set())
        kind = self.covariance_type
        one_row = "1 row" if row_weight == 1.0 else f"one row's mean weight {row_weight:.3g}"
        for k, mass in enumerate(np.asarray(nk)):
            if mass < row_weight and ("mass", k) not in warned:
                warned.add(("mass", k))
                warnings.warn(
                    f"Gaussian mixture component {k} has lost its mass at iteration {n_iter} "
                    f"(responsibility sum {mass:.3g} < {one_row}); its mean and covariance rest on almost no "
                    "data. Reduce n_components or try another initialisation.",
                    DegenerateComponentWarning,
                    stacklevel=_caller_stacklevel(),
                )
        if self.reg_covar <= 0 or kind == "tied":
            return
        if kind == "full":
            smallest = np.linalg.eigvalsh(covariances)[:, 0] if smallest is None else smallest
        elif kind == "diag":
            smallest = covariances.min(axis=1)
        else:
            smallest = np.asarray(covariances)
        for k, value in enumerate(smallest):
            if value <= 1.001 * self.reg_covar and ("collapse", k) not in warned:
                warned.add(("collapse", k))
                warnings.warn(
                    f"Gaussian mixture component {k} has collapsed at iteration {n_iter}: its covariance "
                    f"is down to reg_covar={self.reg_covar:g} in some direction (a singleton, duplicated "
                    "points, or a feature or combination of features that is constant on its points). Increase "
                    "reg_covar, reduce n_components, drop constant or collinear features, or scale the data.",
                    DegenerateComponentWarning,
                    stacklevel=_caller_stacklevel(),
                )

    # ------------------------------------------------------------------
    # Callbacks and checkpoints
    # ------------------------------------------------------------------

    def _callback_list(self):
        if self.callbacks is None:
            return []
        if callable(self.callbacks):
            return [self.callbacks]
        return list(self.callbacks)

    def _settings_fingerprint(self) -> dict:
        """The part of the checkpoint fingerprint that the constructor's parameters alone decide.

        The ``dgmm`` command compares it before it starts a cluster or reads data.
        """
        random_state = self.random_state if isinstance(self.random_state, (int, np.integer)) else None
        return {
            "n_components": int(self.n_components),
            "covariance_type": self.covariance_type,
            "tol": float(self.tol),
            "reg_covar": float(self.reg_covar),
            "n_init": int(self.n_init),
            "init_params": self.init_params,
            "random_state": None if random_state is None else int(random_state),
            "init_sample_size": int(self.init_sample_size),
        }

    def _make_fingerprint(self, data, weights_init, means_init, precisions_init) -> dict:
        """Settings that change the model, and a digest of the data, for checkpoint checks."""

        def digest(a):
            return None if a is None else hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64)).hexdigest()

        rows = min(data.n_samples, 256)
        data_digest = hashlib.sha256()
        data_digest.update(np.ascontiguousarray(data.head(rows), dtype=np.float64).tobytes())
        data_digest.update(np.ascontiguousarray(data.tail(rows), dtype=np.float64).tobytes())
        return {
            **self._settings_fingerprint(),
            "weights_init": digest(weights_init),
            "means_init": digest(means_init),
            "precisions_init": digest(precisions_init),
            "n_samples": int(data.n_samples),
            "n_features": int(data.n_features),
            "dtype": str(data.dtype),
            "data_digest": data_digest.hexdigest(),
            "sample_weight": None if data.sample_weight is None else self._weight_digest(data.sample_weight),
        }

    @staticmethod
    def _weight_digest(sample_weight) -> str:
        rows = 256
        head = np.asarray(sample_weight[:rows], dtype=np.float64)
        tail = np.asarray(sample_weight[-rows:], dtype=np.float64)
        total = sample_weight.sum()
        total = float(total.compute() if hasattr(total, "compute") else total)
        return hashlib.sha256(head.tobytes() + tail.tobytes() + np.float64(total).tobytes()).hexdigest()

    def _check_resumed_data(self, center, stats):
        """Refuse a resumed fit whose first pass read other rows than the checkpoint's last pass."""
        saved, self._resumed_data_sum = self._resumed_data_sum, None
        rtol = RESUMED_DATA_RTOL[np.dtype(self._dtype).name]
        n_differing, feature, difference = data_sum_mismatch(saved, center, stats.sy, stats.n_samples, rtol)
        if n_differing == 0:
            return
        what = (
            f"the total sample weight differs by {difference:.6g}"
            if n_differing < 0
            else f"the rows' sums differ in {n_differing} of {len(saved['sum'])} features "
            f"(feature {feature}: by {difference:.6g} per row)"
        )
        raise CheckpointError(
            f"checkpoint {os.fspath(self.checkpoint)} was written for other data: {what} from the pass "
            "before the checkpoint, although the first and last rows match. The input changed since the "
            "checkpoint was written; remove the checkpoint, or restore the input"
        )

    def _save_checkpoint(self, runs, n_iter, active):
        state = CheckpointState(
            fingerprint=self._fingerprint,
            n_iter=n_iter,
            active=list(active),
            data_sum=self._data_sum,
            runs=[
                {
                    "weights": r.weights,
                    "means": r.means,
                    "covariances": r.covariances,
                    "precisions_cholesky": r.precisions_cholesky,
                    "lower_bound": r.lower_bound,
                    "lower_bounds": r.lower_bounds,
                    "n_iter": r.n_iter,
                    "converged": r.converged,
                }
                for r in runs
            ],
        )
        save_checkpoint(os.fspath(self.checkpoint), state, __version__)
        logger.info("checkpoint written after iteration %d: %s", n_iter, self.checkpoint)

    def _restore_checkpoint(self):
        """Runs, next iteration and active restarts from ``checkpoint``; None if there is none yet."""
        if self.checkpoint is None:
            raise ValueError("resume=True needs the 'checkpoint' parameter to name a checkpoint file")
        path = os.fspath(self.checkpoint)
        if not os.path.exists(path):
            logger.info("no checkpoint at %s yet: starting a new fit", path)
            return None
        state = load_checkpoint(path)
        mismatched = fingerprint_mismatch(state.fingerprint, self._fingerprint)
        if mismatched:
            raise CheckpointError(
                f"checkpoint {path} was written for other data or settings that change the model "
                f"(differs in: {', '.join(mismatched)}); remove it or restore those settings"
            )
        runs = []
        for saved in state.runs:
            runs.append(
                _Run(
                    weights=np.asarray(saved["weights"], dtype=np.float64),
                    means=np.asarray(saved["means"], dtype=np.float64),
                    covariances=np.asarray(saved["covariances"], dtype=np.float64),
                    precisions_cholesky=np.asarray(saved["precisions_cholesky"], dtype=np.float64),
                    lower_bound=float(saved["lower_bound"]),
                    lower_bounds=[np.float64(v) for v in saved["lower_bounds"]],
                    n_iter=int(saved["n_iter"]),
                    converged=bool(saved["converged"]),
                )
            )
        self._resumed_data_sum = state.data_sum
        logger.info("resuming from %s after iteration %d", path, state.n_iter)
        return runs, state.n_iter + 1, state.active

    def _set_fitted(self, run: _Run):
        dtype = self._dtype
        kind = self.covariance_type
        self.weights_ = run.weights.astype(dtype)
        self.means_ = run.means.astype(dtype)
        self.covariances_ = run.covariances.astype(dtype)
        self.precisions_cholesky_ = run.precisions_cholesky.astype(dtype)
        # from the stored factor (as sklearn, and as load_model does): a saved model loads back exactly
        self.precisions_ = chunk.precisions_from_cholesky(self.precisions_cholesky_.astype(np.float64), kind).astype(dtype)

    # ------------------------------------------------------------------
    # Prediction
    # ------------------------------------------------------------------

    def _chunk_params(self) -> chunk.ChunkParams:
        return chunk.chunk_params(self.weights_, self.means_, self.precisions_cholesky_, self.covariance_type)

    def _validated(self, X):
        check_is_fitted(self)
        return check_input(self, X, reset=False)

    def _map_numpy(self, X, fn):
        rows = auto_chunk_rows(X.shape[0], X.shape[1]) if self.chunk_size == "auto" else int(self.chunk_size)
        if X.shape[0] <= rows:
            return fn(X)
        return np.concatenate([fn(X[i : i + rows]) for i in range(0, X.shape[0], rows)])

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None, *, learning_decay=0.6):
        """Update the model with one batch of a stream, by stepwise (online) EM.

        Each call is one step of stepwise EM (Cappé & Moulines, 2009; Liang &
        Klein, 2009; see :mod:`dgmm.online`): one E-step pass over the batch
        under the current parameters, a running average of the per-row
        sufficient statistics ``s <- (1 - η_t) s + η_t s_batch`` with
        ``η_t = (t + 2) ** -learning_decay``, and the usual M-step on ``s``.
        The first call initialises the model from its batch as ``fit`` does
        (``init_params``, ``n_init``, ``random_state`` or the ``*_init``
        arrays; with ``n_init > 1`` the initialisation scoring best on the
        first batch is kept). On an estimator fitted by ``fit`` (or loaded),
        the first call starts a new stream from the fitted parameters.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One batch: NumPy array, pandas DataFrame, dask array, dask
            DataFrame or Zarr array. A lazy batch is one step, computed in one
            pass over its chunks.
        y : Ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights (NumPy or dask, aligned with the batch's
            rows): a row of weight w counts as w copies of it, so the batch
            enters the running average as statistics per unit of weight and
            an integer weight equals repeating the row.
        learning_decay : float, default=0.6
            Exponent α in (0.5, 1] of the step size: larger values average
            over a longer past (1 is the running mean of all batches), smaller
            ones follow the recent batches more closely and forget the start
            sooner.

        Returns
        -------
        self : GaussianMixture
            ``n_iter_`` counts the batches seen, ``lower_bounds_`` holds each
            batch's mean log-likelihood under the parameters before its step
            (scored before the batch was learnt), ``lower_bound_`` the last
            one; ``converged_`` stays False (a stream has no end).

        Raises
        ------
        ValueError
            For invalid parameters or input (NaN/inf, a number of features
            other than the first batch's, too few rows in the first batch), or
            a degenerate covariance; the model is then left as it was.

        Notes
        -----
        Trade-offs against batch EM (``fit``):

        - Cost: each row is read once, one E-step per batch, instead of one
          pass over all the data per iteration; memory is one batch plus
          O(n_components · n_features²) statistics.
        - Accuracy: the estimate carries stochastic-approximation noise of
          order η_t and lands near, not at, batch EM's optimum; on a
          stationary stream of a few hundred batches the held-out mean
          log-likelihood is typically within a fraction of a percent. To
          polish, finish with ``fit`` on stored data (``warm_start=True``).
        - The likelihood is not guaranteed to increase from step to step and
          there is no convergence test: ``tol`` and ``max_iter`` are not used.
        - Results depend on the order and size of the batches; the first
          batch alone seeds the components (a cluster absent from it is hard
          to recover), and small batches make noisier steps. Progress comes
          per step, not per row: many moderate batches beat a few huge ones.
        - A decaying step size assumes a stationary stream; for slow drift use
          a small ``learning_decay`` (close to 0.5).

        Examples
        --------
        >>> import numpy as np
        >>> from dgmm import GaussianMixture
        >>> rng = np.random.default_rng(0)
        >>> gm = GaussianMixture(n_components=2, random_state=0)
        >>> for _ in range(20):
        ...     batch = np.concatenate([rng.normal(-3, 1, (100, 2)), rng.normal(3, 1, (100, 2))])
        ...     gm = gm.partial_fit(batch)
        >>> gm.n_iter_
        20
        """
        from .online import check_learning_decay

        learning_decay = check_learning_decay(learning_decay)
        first = not hasattr(self, "means_")
        Xv = check_input(self, X, reset=first, ensure_min_samples=2 if first else 1)
        try:
            return self._partial_fit_step(Xv, first, sample_weight, learning_decay)
        except BaseException:
            if first:  # as unfitted as before the call (predict says NotFittedError, not AttributeError)
                for name in ("n_features_in_", "feature_names_in_"):
                    self.__dict__.pop(name, None)
            raise

    def _partial_fit_step(self, Xv, first, sample_weight, learning_decay):
        from .online import MixtureParameters, OnlineEM

        n_samples, n_features = Xv.shape
        if first and n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components "
                f"but got n_components = {self.n_components}, "
                f"n_samples = {n_samples}"
            )
        sample_weight = check_sample_weight(sample_weight, n_samples, not isinstance(Xv, np.ndarray))
        data = DataPasses(Xv, chunk_size=self.chunk_size, split_every=self.split_every, sample_weight=sample_weight)
        state, state_means = getattr(self, "_online", (None, None))
        new_stream = first or state is None or state_means is not self.means_
        if not first:
            self._check_continued_model(None if new_stream else state, n_features)
            if not new_stream:
                state.reg_covar = float(self.reg_covar)  # set_params(reg_covar=...) applies from this step
        start = time.perf_counter()
        with single_threaded_blas():
            if new_stream:
                # A new stream: from the first batch, or from parameters set by fit / load_model.
                self._dtype = np.dtype(Xv.dtype if first else self.means_.dtype)
                eps = float(np.finfo(self._dtype).eps)
                if first:
                    init = self._check_init_parameters(n_features)
                    random_state = check_random_state(self.random_state)
                    runs = self._initialize_runs(data, self.n_init, random_state, *init, eps)
                    candidates = [
                        MixtureParameters(r.weights, r.means, r.covariances, r.precisions_cholesky) for r in runs
                    ]
                else:
                    names = ("weights_", "means_", "covariances_", "precisions_cholesky_")
                    candidates = [MixtureParameters(*(np.asarray(getattr(self, n), dtype=np.float64) for n in names))]
                float32 = self._dtype == np.float32
                state = OnlineEM(candidates, self.covariance_type, float(self.reg_covar), eps, float32)
            mean_log_likelihood = state.step(data, learning_decay)
        seconds = time.perf_counter() - start
        self._set_fitted(_Run(*state.parameters))
        if new_stream:  # only now: a step that raised leaves the model, and its history, as they were
            self.lower_bounds_ = []
        previous = self.lower_bounds_[-1] if self.lower_bounds_ else -np.inf
        self.lower_bounds_.append(np.float64(mean_log_likelihood))
        self.lower_bound_ = np.float64(mean_log_likelihood)
        self.n_iter_ = state.n_steps
        self.converged_ = False
        self.n_passes_ = data.n_passes
        self._online = (state, self.means_)
        logger.info(
            "partial_fit step %d: %d rows, mean log-likelihood %.8f", state.n_steps, n_samples, mean_log_likelihood
        )
        info = IterationInfo(
            n_iter=state.n_steps,
            lower_bound=float(mean_log_likelihood),
            change=float(mean_log_likelihood - previous),
            seconds=seconds,
            n_samples=n_samples,
            rows_per_second=n_samples / seconds if seconds > 0 else float("inf"),
            n_active=1,
            converged=False,
        )
        for callback in self._callback_list():
            callback(info)
        return self

    def _check_continued_model(self, state, n_features, how: str = "partial_fit",
                                    fix: str = "call fit to start a new model with them"):
        """A stream (or a warm start) continues one model: n_components and covariance_type changed by
        set_params are refused."""
        expected = chunk.covariance_shape(self.covariance_type, self.n_components, n_features)
        fitted_kind = self.covariance_type if state is None else state.covariance_type
        if np.shape(self.covariances_) != expected or fitted_kind != self.covariance_type:
            fitted = np.shape(self.weights_)[0]
            kind = f"{fitted_kind!r} covariances" if state is not None else \
                f"covariances of shape {np.shape(self.covariances_)}"
            raise ValueError(
                f"{how} continues the fitted model ({fitted} components, {kind!s}), but the estimator's "
                f"parameters are now n_components={self.n_components}, covariance_type={self.covariance_type!r}; "
                f"{fix}, or restore them"
            )

    def _predict_validated(self, Xv):
        params = self._chunk_params()
        if isinstance(Xv, da.Array):
            return graph.predict(Xv, params, kernel_threads())
        return self._map_numpy(Xv, lambda b: chunk.weighted_log_prob(b, params).argmax(axis=1))

    def predict(self, X):
        """Predict the labels for the data samples in X.

        Returns
        -------
        labels : ndarray of shape (n_samples,), or a lazy dask array for lazy input
            (a CuPy array for a CuPy array).
        """
        return _like_input(X, self._predict_validated(self._validated(X)))

    def predict_proba(self, X):
        """Posterior probability of each component given each row.

        Returns
        -------
        resp : ndarray of shape (n_samples, n_components), or a lazy dask array for lazy
            input (a CuPy array for a CuPy array).
        """
        Xv = self._validated(X)
        params = self._chunk_params()
        dtype = self._output_dtype(Xv)
        if isinstance(Xv, da.Array):
            return _like_input(X, graph.predict_proba(Xv, params, dtype, kernel_threads()))
        return self._map_numpy(Xv, lambda b: np.exp(chunk.log_prob_resp(b, params)[1])).astype(dtype, copy=False)

    def _output_dtype(self, Xv):
        """sklearn's dtype for per-row floats: X's and the model's promoted (float32 only when both are)."""
        return np.result_type(Xv.dtype, self.means_.dtype)

    def score_samples(self, X):
        """Log-likelihood of each sample.

        Returns
        -------
        log_prob : ndarray of shape (n_samples,), or a lazy dask array for lazy input
            (a CuPy array for a CuPy array).
        """
        Xv = self._validated(X)
        params = self._chunk_params()
        dtype = self._output_dtype(Xv)
        if isinstance(Xv, da.Array):
            return _like_input(X, graph.score_samples(Xv, params, dtype, kernel_threads()))
        return self._map_numpy(Xv, lambda b: chunk.logsumexp_rows(chunk.weighted_log_prob(b, params))).astype(
            dtype, copy=False
        )

    def _lazy_predictions(self, X, *, labels: bool = True, probabilities: bool = False,
                          log_likelihood: bool = False) -> dict:
        """``predict``, ``predict_proba`` and ``score_samples`` of a lazy X together, lazy, by output name.

        For writers that compute them in one pass (:func:`dgmm.io.write_predictions`):
        each chunk's E-step runs once for all of them (:func:`dgmm.graph.predictions`).
        The arrays are those the three methods return for X (values, dtypes, chunks).
        """
        Xv = self._validated(X)
        if not isinstance(Xv, da.Array):
            raise TypeError(f"expected a lazy (dask) X, got {type(X).__name__}")
        return graph.predictions(Xv, self._chunk_params(), self._output_dtype(Xv), kernel_threads(), labels=labels,
                                 probabilities=probabilities, log_likelihood=log_likelihood)

    def score(self, X, y=None, sample_weight=None):
        """Per-sample average log-likelihood of X (a Python float; computes for lazy input).

        With ``sample_weight``, the weighted average.
        """
        return self._score(self._validated(X), sample_weight)

    def _score(self, Xv, sample_weight=None) -> float:
        lazy = isinstance(Xv, da.Array)
        sample_weight = check_sample_weight(sample_weight, Xv.shape[0], lazy)
        params = self._chunk_params()
        if lazy:
            scores = graph.score_samples(Xv, params, np.float64, kernel_threads())
            if sample_weight is None:
                return float(scores.mean().compute())
            weights = da.asarray(sample_weight).rechunk((scores.chunks[0],))
            total, weight = dask.compute((scores * weights).sum(), weights.sum())
            return float(total / weight)
        scores = self._map_numpy(Xv, lambda b: chunk.logsumexp_rows(chunk.weighted_log_prob(b, params)))
        return float(np.average(scores, weights=sample_weight))

    def _n_parameters(self):
        _, n_features = self.means_.shape
        if self.covariance_type == "full":
            cov_params = self.n_components * n_features * (n_features + 1) / 2.0
        elif self.covariance_type == "diag":
            cov_params = self.n_components * n_features
        elif self.covariance_type == "tied":
            cov_params = n_features * (n_features + 1) / 2.0
        else:
            cov_params = self.n_components
        mean_params = n_features * self.n_components
        return int(cov_params + mean_params + self.n_components - 1)

    def bic(self, X):
        """Bayesian information criterion for the current model on X (lower is better)."""
        Xv = self._validated(X)  # first, as sklearn's; its row count, known even where X's is not (a dask frame)
        n_samples = Xv.shape[0]
        return float(-2 * self._score(Xv) * n_samples + self._n_parameters() * math.log(n_samples))

    def aic(self, X):
        """Akaike information criterion for the current model on X (lower is better)."""
        Xv = self._validated(X)
        n_samples = Xv.shape[0]
        return float(-2 * self._score(Xv) * n_samples + 2 * self._n_parameters())

    def sample(self, n_samples=1):
        """Generate random samples from the fitted mixture (as sklearn does).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        n_samples = check_n_samples(n_samples)
        _, n_features = self.means_.shape
        rng = check_random_state(self.random_state)
        n_samples_comp = rng.multinomial(n_samples, self.weights_)
        if self.covariance_type == "full":
            X = np.vstack(
                [
                    rng.multivariate_normal(mean, covariance, int(sample))
                    for (mean, covariance, sample) in zip(self.means_, self.covariances_, n_samples_comp)
                ]
            )
        elif self.covariance_type == "tied":
            X = np.vstack(
                [
                    rng.multivariate_normal(mean, self.covariances_, int(sample))
                    for (mean, sample) in zip(self.means_, n_samples_comp)
                ]
            )
        else:
            X = np.vstack(
                [
                    mean + rng.standard_normal(size=(sample, n_features)) * np.sqrt(covariance)
                    for (mean, covariance, sample) in zip(self.means_, self.covariances_, n_samples_comp)
                ]
            )
        y = np.concatenate([np.full(int(n), j, dtype=np.int64) for j, n in enumerate(n_samples_comp)])
        return np.asarray(X, dtype=np.float64), y


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKLEARN_DIR = os.path.dirname(os.path.abspath(sklearn.__file__)) + os.sep


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised in dgmm to name the user's line (``gm.fit(X)``, ``select(...)``),
    not dgmm's or sklearn's wrappers: the first frame outside both packages."""
    import sys

    frame, level = sys._getframe(1), 1  # the frame calling warnings.warn is level 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _SKLEARN_DIR)):
        frame, level = frame.f_back, level + 1
    return level


class _VerboseOutput:
    """sklearn's ``verbose`` output: per restart, "Initialization i", its iteration lines, then how it ended.

    sklearn runs restarts one after another; dgmm runs them together, one
    pass per iteration for all. The lines of the first restart still running
    are printed as they come; those of later restarts are held until every
    earlier restart has ended, so the output reads in sklearn's order.
    """

    def __init__(self, n_init: int, verbose: int, interval: int):
        self.verbose, self.interval = verbose, interval
        self.lines = [[f"Initialization {i}"] for i in range(n_init)]
        self.ended = [False] * n_init
        self.printed = 0  # restarts whose lines are all out
        self._flush()

    def iteration(self, i: int, n_iter: int, change: float, seconds: float) -> None:
        if n_iter % self.interval == 0:
            if self.verbose == 1:
                self._add(i, "  Iteration %d" % n_iter)
            elif self.verbose >= 2:
                self._add(i, "  Iteration %d\t time lapse %.5fs\t ll change %.5f" % (n_iter, seconds, change))

    def end(self, i: int, lower_bound: float, converged: bool, seconds: float) -> None:
        msg = "converged" if converged else "did not converge"
        if self.verbose == 1:
            self._add(i, f"Initialization {msg}.")
        elif self.verbose >= 2:
            self._add(i, f"Initialization {msg}. time lapse {seconds:.5f}s\t lower bound {lower_bound:.5f}.")
        self.ended[i] = True
        self._flush()

    def no_iterations(self) -> None:
        """``max_iter=0``: as sklearn, each restart's "Initialization i" line alone."""
        self.ended = [True] * len(self.ended)
        self._flush()

    def _add(self, i: int, line: str) -> None:
        self.lines[i].append(line)
        self._flush()

    def _flush(self) -> None:
        if self.verbose < 1:
            return
        while self.printed < len(self.lines):
            i = self.printed
            for line in self.lines[i]:
                print(line)
            self.lines[i] = []
            if not self.ended[i]:
                return
            self.printed += 1
