"""Model selection out of core: many candidate mixtures advanced on ONE pass per EM iteration.

:func:`select` fits every (n_components, covariance_type) candidate as
:class:`dgmm.GaussianMixture` would, but batches all of them (and all their
restarts) into each pass over the data, as R's mclust sweeps models in memory.
This module is a driver: it reuses the estimator's initialisation, M-step and
bookkeeping, and the chunk kernels' batch evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.utils import check_random_state

from . import chunk
from .estimator import GaussianMixture
from .init import InitRequest, initial_statistics
from .passes import DataPasses, single_threaded_blas
from .validation import check_input, check_sample_weight

logger = logging.getLogger(__name__)

CRITERIA = ("bic", "aic")


class ModelSelection:
    """Result of :func:`select`.

    Attributes
    ----------
    results : list of dict
        One row per candidate: ``n_components``, ``covariance_type``, ``bic``,
        ``aic``, ``lower_bound``, ``log_likelihood`` (mean per row under the
        final parameters), ``n_parameters``, ``n_iter``, ``converged``.
    estimators : list of GaussianMixture
        The fitted candidates, in the order of ``results``.
    best_estimator : GaussianMixture
        The candidate with the lowest criterion.
    criterion : str
    n_passes : int
        Passes over the data the whole sweep made.
    """

    def __init__(self, results, estimators, criterion, n_passes):
        self.results = results
        self.estimators = estimators
        self.criterion = criterion
        self.n_passes = n_passes
        best = int(np.argmin([row[criterion] for row in results]))
        self.best_index = best
        self.best_estimator = estimators[best]

    def to_frame(self):
        """The results as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.results)

    def plot(self, ax=None, criterion=None):
        """Plot the criterion against n_components, one line per covariance type (needs matplotlib).

        The candidate that criterion ranks best is circled.

        Returns
        -------
        matplotlib.axes.Axes
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("ModelSelection.plot needs matplotlib: pip install 'dgmm[plot]'") from None

        criterion = criterion or self.criterion
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        for kind in dict.fromkeys(row["covariance_type"] for row in self.results):
            rows = [r for r in self.results if r["covariance_type"] == kind]
            ax.plot([r["n_components"] for r in rows], [r[criterion] for r in rows], marker="o", label=kind)
        best = min(self.results, key=lambda row: row[criterion])  # the best by the criterion drawn
        ax.scatter([best["n_components"]], [best[criterion]], s=160, facecolors="none", edgecolors="k", zorder=3)
        ax.set_xlabel("n_components")
        ax.set_ylabel(criterion.upper())
        ax.legend(title="covariance_type")
        return ax


def select(
    X,
    n_components: Iterable[int] = range(1, 11),
    covariance_types: Sequence[str] = ("full", "tied", "diag", "spherical"),
    criterion: str = "bic",
    *,
    sample_weight=None,
    **params,
) -> ModelSelection:
    """Fit a grid of Gaussian mixtures together and pick the best by BIC or AIC.

    Every candidate is fitted exactly as ``GaussianMixture(n_components=k,
    covariance_type=t, **params).fit(X)`` would fit it (same initialisation
    for the same ``random_state``), but all candidates and restarts share
    each pass over the data: an EM iteration of the sweep reads every chunk
    once, and converged candidates stop costing compute. The initialisation
    is shared too: all candidates' seedings advance together (one pass per
    k-means‖ round, Lloyd step or k-means++ step for all of them), candidates
    that differ only in covariance type share one seeding, and its last pass
    yields the initial statistics of every type, so the sweep's
    initialisation makes as many passes as its most demanding candidate
    alone (see :func:`dgmm.init.initial_statistics`). One last shared pass
    scores every candidate's final parameters.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        NumPy array, pandas DataFrame, dask array, dask DataFrame or Zarr array.
    n_components : int or iterable of int, default=range(1, 11)
    covariance_types : str or sequence of {'full', 'tied', 'diag', 'spherical'}
        A value given twice is fitted once.
    criterion : {'bic', 'aic'}, default='bic'
        Lower is better.
    sample_weight : array-like of shape (n_samples,), default=None
    **params
        Any other :class:`GaussianMixture` parameter (``random_state``,
        ``n_init``, ``tol``, ``reg_covar``, ``max_iter``, ``chunk_size``, ...),
        except those that follow one fit (``warm_start``, ``checkpoint``,
        ``callbacks``). ``verbose=1`` prints a line per candidate as it ends,
        ``verbose=2`` also one every ``verbose_interval`` sweep iterations.

    Returns
    -------
    ModelSelection

    Raises
    ------
    ValueError
        For an unknown criterion, an empty grid, or invalid data; for a
        candidate whose covariance cannot be factored, naming the candidate.

    Examples
    --------
    >>> import numpy as np
    >>> from dgmm import select
    >>> X = np.random.default_rng(0).normal(size=(500, 2))
    >>> sweep = select(X, n_components=range(1, 4), covariance_types=("full", "diag"), random_state=0)
    >>> sweep.best_estimator.n_components
    1
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    for key in ("n_components", "covariance_type"):
        if key in params and params[key] is not None:
            raise ValueError(f"select() sets {key!r} itself; pass the grid as n_components/covariance_types")
    for key in ("warm_start", "checkpoint"):
        if key in params and params[key] not in (None, False):
            raise ValueError(f"select() takes no {key} (it follows one fit); a sweep starts every candidate "
                             "afresh")
    if params.get("callbacks") is not None:
        raise ValueError("select() takes no callbacks (they follow one fit); its progress is printed with "
                         "verbose=1 or 2, and logged by the 'dgmm.selection' logger")
    if isinstance(covariance_types, str):  # one type, not its letters
        covariance_types = (covariance_types,)
    if isinstance(n_components, (int, np.integer)):
        n_components = (n_components,)
    n_components = list(n_components)
    for k in n_components:  # sklearn's message for 1.5, '2' or True, before any is rounded
        GaussianMixture(n_components=k)._validate_params()
    # each candidate once, in the order first given
    grid = list(dict.fromkeys((int(k), str(t)) for t in covariance_types for k in n_components))
    if not grid:
        raise ValueError("select() needs at least one n_components and one covariance type")

    template = GaussianMixture(n_components=max(k for k, _ in grid), **params)
    template._validate_params()
    Xv = check_input(template, X, reset=True, ensure_min_samples=2)
    n_samples, n_features = Xv.shape
    sample_weight = check_sample_weight(sample_weight, n_samples, not isinstance(Xv, np.ndarray))
    data = DataPasses(
        Xv, chunk_size=template.chunk_size, split_every=template.split_every, sample_weight=sample_weight
    )
    dtype = np.dtype(Xv.dtype)
    eps = float(np.finfo(dtype).eps)
    float32 = dtype == np.float32

    candidates, requests, inits = [], [], []
    for k, kind in grid:
        gm = GaussianMixture(n_components=k, covariance_type=kind, **params)
        gm._validate_params()
        if n_samples < k:
            raise ValueError(
                "Expected n_samples >= n_components "
                f"but got n_components = {k}, n_samples = {n_samples}"
            )
        for attribute in ("n_features_in_", "feature_names_in_"):
            if hasattr(template, attribute):
                setattr(gm, attribute, getattr(template, attribute))
        gm._dtype = dtype
        gm._degenerate_warned = set()
        gm._fingerprint = gm._data_sum = gm._resumed_data_sum = None
        gm.converged_ = False  # as fit() starts (max_iter=0 keeps the initial parameters, not converged)
        given = gm._check_init_parameters(n_features)
        if any(value is None for value in given):
            # planned in grid order, so a shared RandomState is consumed as by fits one after another
            requests.append(InitRequest(k, kind, gm.n_init, check_random_state(gm.random_state)))
        inits.append(given)
        candidates.append(gm)

    with single_threaded_blas():
        # ONE initialisation for all candidates: shared passes, identical seedings computed once
        center, statistics, shifts = (None, [], [])
        if requests:
            center, statistics, shifts = initial_statistics(
                data, template.init_params, template.init_sample_size, requests
            )
        statistics, shifts = iter(statistics), iter(shifts)
        for i, (gm, given) in enumerate(zip(candidates, inits)):
            initial = (center, next(statistics), next(shifts)) if any(value is None for value in given) else None
            with _naming(gm):
                runs = gm._runs_from_statistics(data, initial, gm.n_init, *given, eps)
            candidates[i] = [gm, runs, list(range(len(runs)))]
        init_passes = data.n_passes
        logger.info("select: %d candidates initialised in %d passes", len(candidates), init_passes)
        output = _SweepOutput(template.verbose, template.verbose_interval)
        output.line(f"Sweep of {_count(len(candidates), 'candidate')}: initialised in "
                    f"{_count(init_passes, 'pass', 'passes')} over the data")

        max_iter = max(c[0].max_iter for c in candidates)
        iter_time = time.perf_counter()
        for n_iter in range(1, max_iter + 1):
            live = [c for c in candidates if c[2] and n_iter <= c[0].max_iter]
            if not live:
                break
            batches = [c[0]._em_batch(c[1], c[2]) for c in live]
            stats = data.e_step(tuple(p for batch in batches for p in batch))
            offset = 0
            for c, batch in zip(live, batches):
                part = stats[offset : offset + len(batch)]
                offset += len(batch)
                with _naming(c[0]):
                    c[2], _ = c[0]._em_update(data, c[1], c[2], batch, part, n_iter, eps, float32, iter_time)
                if not c[2] or n_iter == c[0].max_iter:
                    output.ended(c[0], c[1], n_iter)
            running = sum(bool(c[2]) and n_iter < c[0].max_iter for c in candidates)
            seconds = time.perf_counter() - iter_time
            logger.info("select iteration %d: %d candidates still running (%.2f s)", n_iter, running, seconds)
            output.iteration(n_iter, seconds, running, len(candidates))
            iter_time = time.perf_counter()

        for gm, runs, _ in candidates:
            gm._finish(runs, data)
        # One shared pass: each candidate's log-likelihood under its final parameters.
        final = data.e_step(tuple(gm._chunk_params() for gm, _, _ in candidates))

    total_weight = float(final[0].n_samples)
    results, estimators = [], []
    for (gm, _, _), stats in zip(candidates, final):
        log_likelihood = stats.log_likelihood  # Σ log p(x_i), as score(X) * n_samples
        n_parameters = gm._n_parameters()
        results.append(
            {
                "n_components": gm.n_components,
                "covariance_type": gm.covariance_type,
                "bic": float(-2 * log_likelihood + n_parameters * math.log(total_weight)),
                "aic": float(-2 * log_likelihood + 2 * n_parameters),
                "lower_bound": float(gm.lower_bound_),
                "log_likelihood": float(log_likelihood / total_weight),
                "n_parameters": n_parameters,
                "n_iter": int(gm.n_iter_),
                "converged": bool(gm.converged_),
            }
        )
        estimators.append(gm)
    selection = ModelSelection(results, estimators, criterion, data.n_passes)
    best = results[selection.best_index]
    output.line(f"Best by {criterion.upper()}: n_components={best['n_components']}, covariance_type="
                f"{best['covariance_type']!r} ({criterion.upper()} {best[criterion]:.5f}); "
                f"{_count(data.n_passes, 'pass', 'passes')} over the data")
    return selection


@contextlib.contextmanager
def _naming(gm: GaussianMixture):
    """A candidate's failure (a covariance that cannot be factored) names the candidate."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"select(): candidate n_components={gm.n_components}, covariance_type="
                         f"{gm.covariance_type!r}: {exc}") from exc


class _SweepOutput:
    """``verbose`` output of a sweep (printed, as sklearn's estimators print theirs): with 1, a line per
    candidate as it ends; with 2, also a line every ``verbose_interval`` sweep iterations."""

    def __init__(self, verbose: int, interval: int):
        self.verbose, self.interval = verbose, interval

    def line(self, text: str) -> None:
        if self.verbose >= 1:
            print(text)

    def iteration(self, n_iter: int, seconds: float, running: int, total: int) -> None:
        if self.verbose >= 2 and n_iter % self.interval == 0:
            print("  Iteration %d\t time lapse %.5fs\t %d of %d candidates running" % (n_iter, seconds, running, total))

    def ended(self, gm: GaussianMixture, runs, n_iter: int) -> None:
        if self.verbose < 1:
            return
        best = runs[chunk.best_restart([run.lower_bound for run in runs])]  # the restart the candidate keeps
        state = "converged" if best.converged else "did not converge"
        self.line(f"Candidate n_components={gm.n_components}, covariance_type={gm.covariance_type!r}: {state} "
                  f"after {_count(n_iter, 'iteration')}, lower bound {best.lower_bound:.5f}")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
