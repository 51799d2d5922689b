"""Online (stepwise) EM: the mixture follows a stream of batches, one E-step each.

Stepwise EM (Cappé & Moulines, 2009; Liang & Klein, 2009) keeps a running
average ``s`` of *normalised* sufficient statistics (statistics per row) and,
for every batch ``t = 0, 1, 2, ...`` of the stream,

1. computes the batch's E-step statistics ``s_batch`` under the current
   parameters (one pass over the batch, :func:`dgmm.chunk.e_step_statistics`
   on every chunk, tree-reduced as in ``fit``), divided by the batch's rows;
2. blends ``s <- (1 - η_t) s + η_t s_batch`` with the step size
   ``η_t = (t + 2) ** -learning_decay`` (``learning_decay`` in (0.5, 1]:
   Σ η_t diverges and Σ η_t² converges, so on a stationary stream the
   parameters converge to a stationary point of the likelihood);
3. takes the parameters from ``s`` with the M-step of batch EM,
   :func:`dgmm.chunk.parameters_from_statistics`.

``s`` starts at zero (Liang & Klein), so the first batch weighs ``η_0``
against nothing; since the M-step depends only on ratios of the statistics,
this is the same as starting from the first batch's statistics.

Shifted statistics
------------------
The chunk kernels accumulate second moments about a reference point close to
the answer: a centre ``c`` (the weighted mean of the current means) and, for
'full', each component's current mean. Both move after every M-step, so the
running statistics are *re-shifted* exactly (:func:`reshift_statistics`,
plain algebra on the moments, no data) into the reference frame of the
parameters that evaluate the next batch before they are blended with its
statistics. The frames of consecutive steps are close, so the re-shift adds
no cancellation; raw moments about a fixed point would.

This module is a driver, like :mod:`dgmm.init`: one pass over each batch
(through :class:`dgmm.passes.DataPasses`), everything else on small float64
arrays. The estimator's ``partial_fit`` owns validation and the fitted
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError

from . import chunk
from .chunk import SufficientStatistics
from .passes import DataPasses, nonfinite_error

#: Default exponent α of the step size η_t = (t + LEARNING_OFFSET) ** -α.
LEARNING_DECAY = 0.6
#: Offset of the step size (Liang & Klein's t + 2: the first step is 2 ** -α).
LEARNING_OFFSET = 2


class MixtureParameters(NamedTuple):
    """One mixture's parameters in float64 (shapes as the estimator's fitted attributes)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray


def check_learning_decay(learning_decay) -> float:
    """Validate the step-size exponent α, which must lie in (0.5, 1].

    Raises
    ------
    sklearn.utils._param_validation.InvalidParameterError
        A ``ValueError`` with sklearn's phrasing.
    """
    if (
        not isinstance(learning_decay, Real)
        or isinstance(learning_decay, bool)
        or not 0.5 < float(learning_decay) <= 1.0
    ):
        raise InvalidParameterError(
            "The 'learning_decay' parameter of partial_fit must be a float in the range (0.5, 1.0]. "
            f"Got {learning_decay!r} instead."
        )
    return float(learning_decay)


def step_size(n_steps: int, learning_decay: float = LEARNING_DECAY) -> float:
    """Step size ``η_t = (t + 2) ** -learning_decay`` of step ``t = n_steps`` (0-based)."""
    return float((n_steps + LEARNING_OFFSET) ** -learning_decay)


# ---------------------------------------------------------------------------
# Statistics algebra (pure NumPy)
# ---------------------------------------------------------------------------


def reshift_statistics(
    stats: SufficientStatistics,
    center: np.ndarray,
    shifts: np.ndarray,
    new_center: np.ndarray,
    new_shifts: np.ndarray,
    covariance_type: str,
) -> SufficientStatistics:
    """Express statistics about another reference frame, exactly (no data needed).

    Statistics from :func:`dgmm.chunk.statistics_from_resp` are taken on
    ``y = x - center``; for 'full' the per-component moments are further
    shifted by ``shifts[k]`` (relative to ``center``). Rewriting ``x - a`` as
    ``(x - a') + (a' - a)`` turns them into the statistics the same rows and
    responsibilities would give about ``new_center`` / ``new_shifts``.

    Parameters
    ----------
    stats : SufficientStatistics
        Statistics about ``center`` / ``shifts`` (raw sums or any linear
        combination of them, e.g. running averages).
    center, new_center : ndarray of shape (n_features,)
    shifts, new_shifts : ndarray of shape (n_components, n_features)
        Relative to ``center`` and ``new_center`` (used by 'full' only).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    SufficientStatistics
        About ``new_center`` / ``new_shifts``.
    """
    nk = stats.nk
    mass = float(nk.sum())  # Σ_k r_ik = 1 for every row: the (weighted) number of rows
    offset = np.asarray(center, dtype=np.float64) - np.asarray(new_center, dtype=np.float64)
    sy = stats.sy + mass * offset
    if covariance_type == "full":
        # x - a_k with a_k = center + shifts[k]; delta_k = a_k - a'_k.
        delta = offset + (np.asarray(shifts, dtype=np.float64) - np.asarray(new_shifts, dtype=np.float64))
        outer = stats.sx[:, :, None] * delta[:, None, :]
        sxx = stats.sxx + outer + np.swapaxes(outer, 1, 2) + nk[:, None, None] * (delta[:, :, None] * delta[:, None, :])
        sx = stats.sx + nk[:, None] * delta
    else:
        sx = stats.sx + nk[:, None] * offset
        if covariance_type == "tied":
            outer = np.outer(stats.sy, offset)
            sxx = stats.sxx + outer + outer.T + mass * np.outer(offset, offset)
        elif covariance_type == "diag":
            sxx = stats.sxx + 2.0 * stats.sx * offset + nk[:, None] * offset**2
        else:
            sxx = stats.sxx + 2.0 * (stats.sx @ offset) + nk * float(offset @ offset)
    return stats._replace(nk=nk.copy(), sx=sx, sxx=sxx, sy=sy)


def blend_statistics(
    running: SufficientStatistics, batch: SufficientStatistics, step: float
) -> SufficientStatistics:
    """``(1 - step) * running + step * batch / batch.n_samples`` (same reference frame).

    ``batch.n_samples`` is the batch's number of rows (its total weight for
    weighted statistics), so the batch enters as statistics per row.
    ``n_samples`` of the result adds up all rows seen; ``log_likelihood`` is
    the blended mean log-likelihood per row.
    """
    keep = 1.0 - step
    scale = step / batch.n_samples if batch.n_samples > 0 else 0.0
    return running._replace(
        nk=keep * running.nk + scale * batch.nk,
        sx=keep * running.sx + scale * batch.sx,
        sxx=keep * running.sxx + scale * batch.sxx,
        sy=keep * running.sy + scale * batch.sy,
        n_samples=running.n_samples + batch.n_samples,
        log_likelihood=keep * float(running.log_likelihood) + scale * float(batch.log_likelihood),
        n_nonfinite=0,
    )


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


@dataclass
class OnlineEM:
    """State of stepwise EM over a stream, advanced one batch at a time by :meth:`step`.

    Parameters
    ----------
    candidates : list of MixtureParameters
        Starting parameters. With several (``n_init`` initialisations), the
        first batch is evaluated under all of them in its one pass and the
        one with the largest log-likelihood on it is kept.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the model's dtype (the M-step adds ``10 eps`` to nk).
    float32 : bool
        The model's dtype is float32 (the precision error then hints at float64).

    Attributes
    ----------
    stats : SufficientStatistics or None
        Running normalised statistics about ``center`` / ``shifts``
        (None before the first step).
    n_steps : int
        Batches processed.
    n_samples_seen : int
        Rows processed.
    """

    candidates: list
    covariance_type: str
    reg_covar: float
    eps: float
    float32: bool = False
    stats: SufficientStatistics | None = None
    center: np.ndarray | None = None
    shifts: np.ndarray | None = None
    n_steps: int = 0
    n_samples_seen: int = 0

    @property
    def parameters(self) -> MixtureParameters:
        """The current parameters (the first candidate before the first step)."""
        return self.candidates[0]

    def step(self, data: DataPasses, learning_decay: float = LEARNING_DECAY) -> float:
        """Process one batch: one E-step pass, blend, M-step.

        Parameters
        ----------
        data : DataPasses
            The batch (NumPy or dask; a dask batch is one pass over its chunks).
        learning_decay : float, default=0.6
            Exponent α of the step size ``(t + 2) ** -α``.

        Returns
        -------
        float
            Mean log-likelihood of the batch under the parameters *before*
            the update (a prequential score: the batch was not yet seen).

        Raises
        ------
        ValueError
            Non-finite rows in the batch, or a covariance that is not positive
            definite. The state is unchanged then.
        """
        kind = self.covariance_type
        batch = tuple(
            chunk.chunk_params(p.weights, p.means, p.precisions_cholesky, kind) for p in self.candidates
        )
        stats_list = data.e_step(batch)
        if stats_list[0].n_nonfinite:
            count, first = data.locate_nonfinite()
            raise nonfinite_error(count, first, data.n_samples)
        best = chunk.best_restart([s.log_likelihood for s in stats_list])  # fit's tie rule
        params, batch_stats = batch[best], stats_list[best]

        running = self.stats
        if running is None:
            n_components, n_features = params.means.shape
            running = chunk.empty_statistics(n_components, n_features, kind)
        else:
            running = reshift_statistics(running, self.center, self.shifts, params.center, params.means, kind)
        running = blend_statistics(running, batch_stats, step_size(self.n_steps, learning_decay))
        weights, means, covariances = chunk.parameters_from_statistics(
            running, params.center, params.means, self.reg_covar, kind, eps=self.eps
        )
        precisions_cholesky = chunk.compute_precision_cholesky(covariances, kind, self.float32)

        # Commit only once everything succeeded.
        self.candidates = [MixtureParameters(weights, means, covariances, precisions_cholesky)]
        self.stats, self.center, self.shifts = running, params.center, params.means
        self.n_steps += 1
        self.n_samples_seen += int(data.n_samples)
        return float(batch_stats.log_likelihood) / batch_stats.n_samples if batch_stats.n_samples > 0 else 0.0
