"""Chunk math: Gaussian mixture computations on ONE in-memory NumPy chunk.

Everything in this module is pure NumPy/SciPy: no dask, no I/O, no logging,
no hidden randomness. The graph layer (:mod:`dgmm.graph`) maps these functions
over the chunks of a dask array and tree-reduces their results; the estimator
(:mod:`dgmm.estimator`) turns reduced statistics into parameters with
:func:`parameters_from_statistics`.

Coordinates
-----------
Every chunk is first shifted by a *centre* ``c`` (a point close to the data,
for example the weighted mean of the current means) and all products are taken
on ``y = x - c``. The ``full`` covariance type additionally shifts each
component's second moments by that component's current mean, so the
``E[x xᵀ] - μ μᵀ`` cancellation that ruins off-centre data never happens.

=========  =============================  =====================  ==================
type       precisions_cholesky            ``sxx`` statistic       shift of ``sxx``
=========  =============================  =====================  ==================
full       (n_components, d, d)           (n_components, d, d)    component's mean
tied       (d, d)                         (d, d)                  centre
diag       (n_components, d)              (n_components, d)       centre
spherical  (n_components,)                (n_components,)         centre
=========  =============================  =====================  ==================
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Literal, NamedTuple

import numpy as np
from scipy import linalg

from .namespace import array_module, on_device, to_host

CovarianceType = Literal["full", "tied", "diag", "spherical"]
COVARIANCE_TYPES: tuple[str, ...] = ("full", "tied", "diag", "spherical")

PRECISION_ERROR_MESSAGE = (
    "Fitting the mixture model failed because some components have "
    "ill-defined empirical covariance (for instance caused by singleton "
    "or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data."
)
FLOAT32_NOTE = (
    " The numerical accuracy can also be improved by passing float64"
    " data instead of float32."
)
#: Added when a float32 model's covariances are finite in float64 but not once stored in float32.
FLOAT32_OVERFLOW_NOTE = (
    " Some covariances exceed the largest float32 value (3.4e38) that the model's float32"
    " attributes can hold; scale the input data, or pass float64 data."
)
#: Added when a covariance is not finite: the input is finite (checked), so its squares overflowed.
OVERFLOW_NOTE = (
    " Some covariances are not finite: the input's values are too large for float64"
    " second moments (their squares overflow); scale the input data, e.g. with"
    " sklearn.preprocessing.StandardScaler."
)


class NonFiniteInputError(ValueError):
    """X holds NaN or infinity (sklearn's message, and a ValueError, as sklearn raises)."""


class ChunkParams(NamedTuple):
    """Parameters of one mixture as the chunk kernels consume them.

    Attributes
    ----------
    center : ndarray of shape (n_features,)
        Reference point subtracted from every row before any product.
    means : ndarray of shape (n_components, n_features)
        Component means relative to ``center``.
    precisions_cholesky : ndarray
        Cholesky factors of the precisions (shape depends on the type).
    log_weights : ndarray of shape (n_components,)
        Logarithm of the mixing weights.
    covariance_type : str
        One of 'full', 'tied', 'diag', 'spherical'.
    shifts : ndarray of shape (n_components, n_features) or None
        'full' only: the points (relative to ``center``) the statistics'
        second moments are taken about; None (the default): ``means``. The
        E-step (responsibilities, log-likelihood) does not depend on them.
        The EM loop sets them to the new means to redo a pass in which a
        component moved so far that its moments about the old mean lost the
        covariance to rounding.
    """

    center: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    log_weights: np.ndarray
    covariance_type: str
    shifts: np.ndarray | None = None


class SufficientStatistics(NamedTuple):
    """Sufficient statistics of a set of rows for one mixture.

    All fields are float64 (``n_samples`` and ``n_nonfinite`` are integers)
    and merge by plain addition (:func:`merge_statistics`), so any reduction
    tree gives the same result up to floating-point rounding.

    Attributes
    ----------
    nk : ndarray of shape (n_components,)
        Σ r_ik.
    sx : ndarray of shape (n_components, n_features)
        Σ r_ik (y_i - s_k), where ``s_k`` is the shift of component k
        (its current mean for 'full', zero otherwise).
    sxx : ndarray
        Shifted second moments in the covariance type's form.
    sy : ndarray of shape (n_features,)
        Σ y_i over all rows.
    n_samples : int
        Number of rows.
    log_likelihood : float
        Σ log p(x_i) under the parameters used for the E-step (0 for
        statistics computed from given responsibilities).
    n_nonfinite : int
        Number of rows containing NaN or infinity.
    """

    nk: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    sy: np.ndarray
    n_samples: int
    log_likelihood: float
    n_nonfinite: int


class Workspace:
    """Reusable scratch arrays for the row blocks of one chunk.

    Allocating multi-megabyte temporaries for every block costs page faults
    (and distributed workers trim freed memory aggressively); one workspace
    per chunk call reuses them across blocks. NumPy arrays only: for CuPy
    chunks, CuPy's memory pool reuses device memory already (:func:`_scratch`).
    """

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        """A contiguous scratch array of ``shape`` and ``dtype`` (contents undefined)."""
        size = math.prod(shape)
        key = (name, np.dtype(dtype).char)
        array = self._arrays.get(key)
        if array is None or array.size < size:
            array = self._arrays[key] = np.empty(size, dtype=dtype)
        return array[:size].reshape(shape)


_THREAD_LOCAL = threading.local()


def _thread_workspace() -> Workspace:
    """This thread's workspace (scratch memory only: no results are kept in it)."""
    work = getattr(_THREAD_LOCAL, "workspace", None)
    if work is None:
        work = _THREAD_LOCAL.workspace = Workspace()
    return work


def _scratch(work: Workspace | None, name: str, shape, dtype=np.float64, xp=np) -> np.ndarray:
    """Scratch memory in library ``xp``: from ``work`` for NumPy, a fresh (pooled) array otherwise."""
    return work.get(name, shape, dtype) if work is not None and xp is np else xp.empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------
# Merging statistics
# ---------------------------------------------------------------------------


def merge_statistics(a: SufficientStatistics, b: SufficientStatistics) -> SufficientStatistics:
    """Merge the statistics of two disjoint sets of rows (plain addition)."""
    return SufficientStatistics(*(x + y for x, y in zip(a, b)))


#: Restarts whose lower bounds agree within this relative margin count as tied (the first wins).
TIE_RTOL = 1e-10


def best_restart(lower_bounds) -> int:
    """Index of the restart to keep: the largest lower bound, ties going to the first restart.

    Restarts that reach the same optimum tie up to rounding, and rounding depends on the
    chunking: lower bounds within ``TIE_RTOL`` (relative) of the best so far count as equal
    and the earlier restart wins, as it would in exact arithmetic, so the pick does not
    depend on chunking. Used by ``fit`` and by ``partial_fit``'s first batch.
    """
    best, top = 0, -np.inf
    for i, value in enumerate(lower_bounds):
        margin = TIE_RTOL * abs(top) if np.isfinite(top) else 0.0
        if value > top + margin or top == -np.inf:
            top, best = value, i
    return best


def combine_statistics(*parts):
    """Merge any number of per-chunk results.

    Each part is either a :class:`SufficientStatistics` or a tuple of them
    (one per mixture of a batch); tuples are merged element-wise.
    """
    first = parts[0]
    if isinstance(first, SufficientStatistics):
        out = first
        for part in parts[1:]:
            out = merge_statistics(out, part)
        return out
    return tuple(combine_statistics(*column) for column in zip(*parts))


# ---------------------------------------------------------------------------
# Cholesky factors, log-determinants, log-densities
# ---------------------------------------------------------------------------


def compute_precision_cholesky(covariances: np.ndarray, covariance_type: str, float32_note: bool = False) -> np.ndarray:
    """Cholesky factors of the precision matrices from the covariances.

    Parameters
    ----------
    covariances : ndarray
        Covariances in the covariance type's shape.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    float32_note : bool, default=False
        The model is float32: add sklearn's float32 hint to the error message,
        and also require the float32-rounded covariances (the fitted
        ``covariances_``) to be positive definite, as sklearn's float32
        Cholesky does. The statistics of float32 'full' chunks carry float32
        rounding, which can make an exactly singular covariance (collinear
        features with ``reg_covar=0``) barely positive definite in float64
        and singular again once stored.

    Returns
    -------
    precisions_cholesky : ndarray of the same shape as ``covariances``
        Upper-triangular ``U`` with ``U Uᵀ = Σ⁻¹`` (for full and tied).

    Raises
    ------
    ValueError
        If a covariance is not positive definite.
    """
    message = PRECISION_ERROR_MESSAGE + (FLOAT32_NOTE if float32_note else "")
    if not np.all(np.isfinite(covariances)):
        raise ValueError(message + OVERFLOW_NOTE)
    if float32_note:
        with np.errstate(over="ignore"):
            overflows = not np.all(np.isfinite(np.asarray(covariances).astype(np.float32)))
        if overflows:  # finite in float64, beyond float32 (3.4e38) once stored in the model's dtype
            raise ValueError(PRECISION_ERROR_MESSAGE + FLOAT32_OVERFLOW_NOTE)
    if covariance_type in ("full", "tied"):
        stack = covariances[None] if covariance_type == "tied" else covariances
        n_features = stack.shape[-1]
        out = np.empty_like(stack)
        eye = np.eye(n_features, dtype=stack.dtype)
        for k in range(stack.shape[0]):
            try:
                cov_chol = linalg.cholesky(stack[k], lower=True)
                if float32_note:
                    linalg.cholesky(stack[k].astype(np.float32), lower=True)
            except linalg.LinAlgError:
                raise ValueError(message) from None
            out[k] = linalg.solve_triangular(cov_chol, eye, lower=True).T
        return out[0] if covariance_type == "tied" else out
    if np.any(covariances <= 0.0) or (float32_note and np.any(covariances.astype(np.float32) <= 0.0)):
        raise ValueError(message)
    return 1.0 / np.sqrt(covariances)


def precision_cholesky_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    """Cholesky factors ``U`` (upper triangular, ``U Uᵀ = P``) of given precisions."""

    def flip(a):
        return a[::-1, ::-1]

    if covariance_type == "full":
        return np.stack([flip(linalg.cholesky(flip(p), lower=True)) for p in precisions])
    if covariance_type == "tied":
        return flip(linalg.cholesky(flip(precisions), lower=True))
    return np.sqrt(precisions)


def precisions_from_cholesky(precisions_cholesky: np.ndarray, covariance_type: str) -> np.ndarray:
    """Precision matrices ``U Uᵀ`` from their Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", precisions_cholesky, precisions_cholesky)
    if covariance_type == "tied":
        return precisions_cholesky @ precisions_cholesky.T
    return precisions_cholesky**2


def covariances_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances as inverses of the given precisions."""
    if covariance_type == "full":
        return np.stack([linalg.inv(p) for p in precisions])
    if covariance_type == "tied":
        return linalg.inv(precisions)
    return 1.0 / precisions


def log_det_cholesky(precisions_cholesky: np.ndarray, covariance_type: str, n_features: int):
    """log det of the Cholesky factor, i.e. ``-0.5 log det Σ`` per component."""
    if covariance_type == "full":
        return np.log(np.diagonal(precisions_cholesky, axis1=1, axis2=2)).sum(axis=1)
    if covariance_type == "tied":
        return np.log(np.diag(precisions_cholesky)).sum()
    if covariance_type == "diag":
        return np.log(precisions_cholesky).sum(axis=1)
    return n_features * np.log(precisions_cholesky)


#: Arguments below this are flushed to exp = 0 by :func:`exp_inplace` (exp(-707) = 1.0e-307).
EXP_FLUSH_BELOW = -707.0


def exp_inplace(a: np.ndarray, work: Workspace | None = None) -> np.ndarray:
    """``np.exp(a, out=a)`` for arguments <= 0, with results below 1e-307 flushed to 0.

    NumPy's vectorised float64 exp sends every element below about -707.70
    (results under 2x the smallest normal number) to a scalar fallback: 7x
    slower per element for results that are 0, 40x for subnormal ones. In a
    mixture's softmax many entries are that small (log-density gaps to distant
    components): on well-separated data the fallback made the E-step's exp
    3-4x slower. Here arguments below ``EXP_FLUSH_BELOW`` are clamped for the
    vector loop and their results set to 0. Every sum these results enter also
    holds the row's maximum term exp(0) = 1, so the flushed values (< 1e-307)
    do not change any sum, log-likelihood or statistic beyond those of a
    component whose every responsibility is below 1e-307. NaN and inf pass
    through as in ``np.exp``; other dtypes, and CuPy arrays (no slow path on
    the GPU), use ``exp`` unchanged.
    """
    if a.dtype != np.float64 or not isinstance(a, np.ndarray):
        return array_module(a).exp(a, out=a)
    low = np.less(a, EXP_FLUSH_BELOW, out=_scratch(work, "exp_low", a.shape, np.bool_))
    if not low.any():
        return np.exp(a, out=a)
    np.maximum(a, EXP_FLUSH_BELOW, out=a)
    np.exp(a, out=a)
    a *= np.logical_not(low, out=low)  # multiplying by the mask is 7x faster than copyto(where=)
    return a


def logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """Row-wise log Σ exp, safe for rows of -inf (NumPy or CuPy)."""
    xp = array_module(a)
    amax = a.max(axis=1)
    amax = xp.where(xp.isfinite(amax), amax, 0.0)
    with np.errstate(divide="ignore"):
        return xp.log(exp_inplace(a - amax[:, None]).sum(axis=1)) + amax


def center_rows(X: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``X - center`` in float64."""
    return np.asarray(X, dtype=np.float64) - center


def log_prob_resp(X: np.ndarray, params: ChunkParams, threads: int = 1):
    """Per-row log-likelihood and log-responsibilities of one chunk (``threads``: see :func:`block_scale`).

    Returns
    -------
    log_prob_norm : ndarray of shape (n_samples,)
    log_resp : ndarray of shape (n_samples, n_components)
    """
    weighted = weighted_log_prob(X, params, threads)
    log_prob_norm = logsumexp_rows(weighted)
    with np.errstate(under="ignore", invalid="ignore"):
        log_resp = weighted - log_prob_norm[:, None]
    return log_prob_norm, log_resp


class Predictions(NamedTuple):
    """The per-row outputs of one chunk (:func:`predictions`); None for those not asked for.

    ``labels`` int64 (n_samples,), ``probabilities`` float64 (n_samples, n_components)
    and ``log_likelihood`` float64 (n_samples,), in the chunk's library.
    """

    labels: np.ndarray | None
    probabilities: np.ndarray | None
    log_likelihood: np.ndarray | None


def predictions(X: np.ndarray, params: ChunkParams, threads: int = 1, *, labels: bool = True,
                probabilities: bool = False, log_likelihood: bool = False) -> Predictions:
    """Labels, responsibilities and log-likelihood of one chunk from ONE :func:`weighted_log_prob`.

    Each output is computed exactly as on its own: labels as the argmax of the
    weighted log-probabilities, the log-likelihood as their row-wise
    log-sum-exp and the responsibilities as :func:`log_prob_resp`'s
    exponentiated (so equal bit for bit to ``predict``, ``score_samples`` and
    ``predict_proba``). NumPy or CuPy, as the chunk.
    """
    weighted = weighted_log_prob(X, params, threads)
    label = weighted.argmax(axis=1) if labels else None
    log_prob_norm = resp = None
    if probabilities or log_likelihood:
        log_prob_norm = logsumexp_rows(weighted)
    if probabilities:
        with np.errstate(under="ignore", invalid="ignore"):
            log_resp = weighted - log_prob_norm[:, None]
        resp = array_module(log_resp).exp(log_resp)
    return Predictions(label, resp, log_prob_norm if log_likelihood else None)


def weighted_log_prob(X: np.ndarray, params: ChunkParams, threads: int = 1) -> np.ndarray:
    """log N(x | μ_k, Σ_k) + log π_k for one chunk, shape (n_samples, n_components).

    Computed in float64 with the E-step's products (:class:`_BatchPlan`);
    the result is the transpose of a components-major array, so row-wise
    reductions (log-sum-exp, argmax) over it stay fast. A CuPy chunk gives
    a CuPy result (computed on its device).
    """
    xp = array_module(X)
    X = xp.asarray(X)
    n = X.shape[0]
    plan = _plan_for((params,), X.shape[1], np.float64, xp, threads)
    out = xp.empty((plan.n_total, n))
    work = _thread_workspace()
    with np.errstate(under="ignore", invalid="ignore", over="ignore", divide="ignore"):
        for start, stop in plan.blocks(n):
            _log_prob_block(X[start:stop], plan, work, out[:, start:stop])
    return out.T


def nonfinite_row_mask(X: np.ndarray) -> np.ndarray:
    """True for the rows holding NaN or infinity, in X's own library (NumPy or CuPy)."""
    xp = array_module(X)
    if X.dtype.kind != "f":
        return xp.zeros(X.shape[0], dtype=bool)
    return ~xp.isfinite(X).all(axis=1)


def count_nonfinite_rows(X: np.ndarray) -> int:
    """Number of rows holding NaN or infinity (NumPy or CuPy)."""
    if X.dtype.kind != "f":
        return 0
    return int(array_module(X).count_nonzero(nonfinite_row_mask(X)))


def nonfinite_summary(X: np.ndarray) -> tuple[int, int]:
    """(number of rows holding NaN or infinity, index of the first or -1) (NumPy or CuPy)."""
    if X.dtype.kind != "f":
        return 0, -1
    xp = array_module(X)
    mask = nonfinite_row_mask(X)
    count = int(xp.count_nonzero(mask))
    return (count, int(xp.flatnonzero(mask)[0])) if count else (0, -1)


def zero_rows(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """X with the rows where ``mask`` (shape (n,) or (n, 1)) is True set to 0; X itself when there are none."""
    mask = mask.reshape(-1)
    if not mask.any():
        return X
    X = X.copy()
    X[mask] = 0
    return X


# ---------------------------------------------------------------------------
# Sufficient statistics
# ---------------------------------------------------------------------------


def statistics_from_resp(
    y: np.ndarray,
    resp: np.ndarray,
    shifts: np.ndarray,
    covariance_type: str,
    log_likelihood: float = 0.0,
    n_nonfinite: int = 0,
    work: Workspace | None = None,
    sample_weight: np.ndarray | None = None,
) -> SufficientStatistics:
    """Sufficient statistics of centred rows ``y`` given responsibilities.

    Parameters
    ----------
    y : ndarray of shape (n_samples, n_features)
        Rows minus the centre, float64.
    resp : ndarray of shape (n_samples, n_components)
    shifts : ndarray of shape (n_components, n_features)
        Per-component shifts of the second moments (used by 'full' only;
        pass the current relative means).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    sample_weight : ndarray of shape (n_samples,), default=None
        Non-negative row weights: a row of weight w counts as w copies of it
        (``n_samples`` of the result is then the total weight).

    Returns
    -------
    SufficientStatistics
    """
    n_components = resp.shape[1]
    if sample_weight is not None:
        resp = resp * sample_weight[:, None].astype(resp.dtype, copy=False)
    nk = resp.sum(axis=0, dtype=np.float64)
    if covariance_type == "full":
        # Shifted by each component's own mean: d_ki = y_i - s_k, all k at
        # once in (k, n, d) layout so each product is one contiguous GEMM.
        shape = (n_components,) + y.shape
        # d_ki = y_i - s_k; Σ r d by a batched GEMV, then w = sqrt(r) d and
        # Σ_i w_ki w_kiᵀ by a symmetric rank-k update (float32 blocks for
        # float32 input: the products are shifted, the sums across blocks float64).
        resp_t = resp.T.astype(y.dtype, copy=False)
        w = np.subtract(y[None, :, :], shifts.astype(y.dtype)[:, None, :], out=_scratch(work, "d", shape, y.dtype))
        sx = np.stack([np.dot(resp_t[k], w[k]) for k in range(n_components)]).astype(np.float64)
        w *= np.sqrt(resp_t)[:, :, None]
        # One batched GEMM wᵀw per component: NumPy releases the GIL here (scipy's syrk
        # wrapper does not), so dask's worker threads run their chunks in parallel.
        sxx = np.matmul(w.transpose(0, 2, 1), w).astype(np.float64)
    else:
        sx = np.dot(resp.T, y)
        if covariance_type == "tied":
            sxx = np.dot(y.T, y if sample_weight is None else y * sample_weight[:, None])
        elif covariance_type == "diag":
            sxx = np.dot(resp.T, y * y)
        else:
            sxx = np.dot(resp.T, np.einsum("ij,ij->i", y, y))
    return SufficientStatistics(
        nk=nk,
        sx=sx,
        sxx=sxx,
        sy=y.sum(axis=0, dtype=np.float64) if sample_weight is None else np.dot(sample_weight, y.astype(np.float64)),
        n_samples=int(y.shape[0]) if sample_weight is None else float(sample_weight.sum()),
        log_likelihood=float(log_likelihood),
        n_nonfinite=int(n_nonfinite),
    )


#: Rows per cache block inside a chunk: the largest temporary of a block,
#: (rows, Σ n_components × n_features) for 'full' members, stays around 4 MiB
#: of float64 whatever size the dask chunks are (times :func:`block_scale`
#: when many threads of one process run kernels).
BLOCK_ELEMENTS = 2**19


# Products whose result is small (at most 500 elements) but whose inner
# dimension is a whole block of rows -- the moments ``R @ Fᵀ``, ``yᵀ y``, GEMVs
# -- go through ``np.dot``, never ``@``/``np.matmul``: NumPy's matmul keeps the
# GIL for its entire BLAS call when the result has <= 500 elements (its
# small-loop threshold is applied to the output size), which serialises dask's
# worker threads; ``np.dot`` releases the GIL around every BLAS call. Two
# threads ran the diag kernel 1.1x faster than one before, 1.9x after
# (``bench/README.md``, "Where the time goes").


#: Elements of the largest per-block temporary on a GPU (CuPy chunks): 2**27, 1 GiB of float64.
#: GPU kernels need large blocks to amortise their launches; the CPU's cache blocks would be launch-bound.
GPU_BLOCK_ELEMENTS = 2**27


#: The most :func:`block_scale` grows a CPU block (2**22 values, 32 MiB of float64, per thread).
MAX_BLOCK_SCALE = 8


def block_scale(threads: int) -> int:
    """How many times ``BLOCK_ELEMENTS`` a CPU block holds when ``threads`` threads of one process run kernels.

    Threads of one process share the GIL. A block's NumPy calls (about 20-30)
    release it for their loops, but the Python between them holds it, and
    taking it back while another thread holds it costs a hand-off. So every
    block costs a fixed amount of time in which no other thread runs Python,
    and with many threads on cache-sized blocks the threads queue for the GIL
    instead of computing. On 2 cores, 2 threads of 800-row diag blocks ran
    1.5x slower than one; on a 16-core machine, dask's 16 threads ran a
    'full' fit 4x slower than 8 processes of 2 threads, and as slowly in
    float32 as in float64 (``bench/README.md``, "Threads and the GIL").
    Blocks grow with the threads, so that the process's rate of blocks stays
    about where it is with 2 threads: 1x up to 3 threads, ``threads // 2``
    times beyond, at most ``MAX_BLOCK_SCALE`` times. Larger blocks cost each
    core some speed (they fall out of cache: 13-28 % per core here for
    4-8x), far less than the GIL queue costs at 8 or more threads.
    """
    return int(min(MAX_BLOCK_SCALE, max(1, int(threads) // 2)))


def block_rows(n_components: int, n_features: int) -> int:
    """Rows per cache block for a mixture (or a batch) with this many components."""
    return int(max(64, BLOCK_ELEMENTS // max(1, n_components * n_features)))


class _BatchPlan:
    """How one chunk evaluates a batch of mixtures with shared products.

    All members see the rows through one matrix of *features* per row block,
    ``F = [1 | y | y²]`` (held features-major, (width, rows)) with ``y = x - c₀`` (``c₀`` the first member's
    centre; ``y²`` only when a diag or spherical member needs it). Then:

    - diag and spherical members: the log-densities of all their components
      are one GEMM ``F @ W`` (the expanded quadratic form);
    - full members: the whitened residuals ``z_k = (y - s_k) U_k`` of all
      their components are one GEMM ``[1 | y] @ [-s U; U]``; the second
      moments are Σ r z zᵀ per component, back-transformed by ``U⁻¹`` once
      per chunk (shifted: no raw-moment cancellation); a member whose
      ``shifts`` differ from its means adds ``(s - t) U`` to each residual
      after the log-densities, so its moments are about ``t``;
    - tied members: ``y U`` and a small GEMM against ``μ U``;
    - every member's ``nk``, ``Σ r y`` and ``Σ r y²`` come from one GEMM
      ``R @ F`` of the responsibilities of all components;
    - log-probabilities and responsibilities are held components-major,
      ``(Σ n_components, rows)``, so the per-member log-sum-exp reduces
      across contiguous rows (fast) and runs once for the whole batch.

    Statistics relative to ``c₀`` are moved to each member's own centre and
    shifts in float64 at the end of the chunk.

    The plan is built on the host (small parameter arrays, NumPy/SciPy); with
    ``xp`` CuPy the arrays the block kernels read are copied to the device
    once per chunk and blocks are GPU-sized (``GPU_BLOCK_ELEMENTS``).
    """

    def blocks(self, n: int):
        """(start, stop) of the row blocks of an ``n``-row chunk: ``rows`` each, and with sub-blocks
        (``sub_rows``) every block a whole number of sub-blocks or shorter than one."""
        step, sub = self.rows, self.sub_rows
        start = 0
        while start < n:
            stop = min(start + step, n)
            if sub and stop - start > sub and (stop - start) % sub:
                stop = start + (stop - start) // sub * sub
            yield start, stop
            start = stop

    def __init__(self, batch: tuple[ChunkParams, ...], n_features: int, input_dtype, xp=np, threads: int = 1):
        d = n_features
        self.xp = xp
        self.batch = batch
        self.n_features = d
        self.center = np.asarray(batch[0].center, dtype=np.float64)
        kinds = [p.covariance_type for p in batch]
        self.expanded = [m for m, kind in enumerate(kinds) if kind in ("diag", "spherical")]
        self.full = [m for m, kind in enumerate(kinds) if kind == "full"]
        self.tied = [m for m, kind in enumerate(kinds) if kind == "tied"]
        self.width = 2 * d + 1 if self.expanded else d + 1
        sizes = [p.log_weights.shape[0] for p in batch]
        # Rows of the (components, rows) log-probability matrix, grouped by kind.
        order = self.expanded + self.full + self.tied
        self.slices = [None] * len(batch)
        start = 0
        for m in order:
            self.slices[m] = slice(start, start + sizes[m])
            start += sizes[m]
        self.n_total = start
        self.order = order
        # Softmax groups: runs of consecutive members (in ``order``) with equal
        # component counts, each normalised by one set of NumPy calls.
        self.softmax_groups: list[list[int]] = []
        self.softmax_layout: list[tuple[int, int, int]] = []  # (first row, end row, components)
        for m in order:
            if self.softmax_groups and sizes[self.softmax_groups[-1][-1]] == sizes[m]:
                self.softmax_groups[-1].append(m)
                first, _, size = self.softmax_layout[-1]
                self.softmax_layout[-1] = (first, self.slices[m].stop, size)
            else:
                self.softmax_groups.append([m])
                self.softmax_layout.append((self.slices[m].start, self.slices[m].stop, sizes[m]))
        half_log_2pi = 0.5 * d * math.log(2 * math.pi)

        # diag and spherical: log p = F @ W, columns of W per component.
        self.W = None
        if self.expanded:
            columns = []
            for m in self.expanded:
                p = batch[m]
                rel = p.means + (p.center - self.center)  # means relative to c₀
                prec = p.precisions_cholesky**2
                if p.covariance_type == "spherical":
                    prec = np.repeat(prec[:, None], d, axis=1)
                log_det = 0.5 * np.log(prec).sum(axis=1)
                const = p.log_weights + log_det - half_log_2pi - 0.5 * np.sum(rel**2 * prec, axis=1)
                columns.append(np.concatenate([const[:, None], rel * prec, -0.5 * prec], axis=1))
            self.W = np.ascontiguousarray(np.concatenate(columns).T)  # (2d+1, Σk)
            self.expanded_rows = slice(self.slices[self.expanded[0]].start, self.slices[self.expanded[-1]].stop)

        # full: z = [1 | y] @ A, A = [-s U; U] for every component of every full member.
        if self.full:
            # float32 products, except in a pass redone about new shifts (a jump onto an outlier, rare), whose
            # moments float32 residuals could not hold: float64 there
            float32 = np.dtype(input_dtype) == np.float32 and all(batch[m].shifts is None for m in self.full)
            dtype = np.float32 if float32 else np.float64
            # float32 products run relative to a float32-representable centre.
            ref = self.center.astype(np.float32).astype(np.float64) if float32 else self.center
            blocks, consts, prec_used, moment_offsets = [], [], [], []
            for m in self.full:
                p = batch[m]
                U = p.precisions_cholesky.astype(dtype).astype(np.float64)  # the factors the products use
                s = p.means + (p.center - ref)  # shifts relative to the reference centre
                offsets = np.einsum("ki,kij->kj", s, U).astype(dtype).astype(np.float64)
                blocks.append(np.concatenate([-offsets[:, None, :], U], axis=1))  # (k, d+1, d)
                log_det = np.log(np.diagonal(U, axis1=1, axis2=2)).sum(axis=1)
                consts.append(p.log_weights + log_det - half_log_2pi)
                prec_used.append(U)
                if p.shifts is None:
                    moment_offsets.append(offsets)
                else:  # the moments' own shifts t: z + (s - t) U = (y - t) U
                    t = np.asarray(p.shifts, dtype=np.float64) + (p.center - ref)
                    moment_offsets.append(np.einsum("ki,kij->kj", t, U).astype(dtype).astype(np.float64))
            stacked = np.concatenate(blocks)  # (Σk, d+1, d)
            self.A = np.ascontiguousarray(stacked.transpose(1, 0, 2).reshape(d + 1, -1)).astype(dtype)
            self.full_const = np.concatenate(consts)[:, None]
            self.full_dtype = dtype
            self.full_ref = ref
            U_all = np.concatenate(prec_used)
            self.U_inv = _triangular_inverses(U_all)
            moment_offsets = np.concatenate(moment_offsets)  # (Σk, d)
            #: Added to the residuals before their moments (None: every member's moments are about its means).
            self.z_shift = None
            if any(batch[m].shifts is not None for m in self.full):
                self.z_shift = -(stacked[:, 0, :] + moment_offsets).astype(dtype)  # (s - t) U: offsets - moment offsets
            # The shift each z of the moments actually uses (the offsets were rounded): s̃ = offsets U⁻¹.
            self.effective_shift = ref + (moment_offsets[:, None, :] @ self.U_inv)[:, 0, :]
            self.full_rows = slice(self.slices[self.full[0]].start, self.slices[self.full[-1]].stop)
            self.n_full = self.full_rows.stop - self.full_rows.start
        # float32 batches of 'full' members only never build the float64 features: their first moments
        # come from the float32 head [1 | y - c̃] (relative to full_ref; moved to c₀ at the end of the chunk).
        self.head_only = bool(self.full) and not self.expanded and not self.tied and self.full_dtype == np.float32

        # tied: per member, y U and μ U.
        self.tied_terms = []
        for m in self.tied:
            p = batch[m]
            rel = p.means + (p.center - self.center)
            U = p.precisions_cholesky
            mu_u = rel @ U
            log_det = np.log(np.diag(U)).sum()
            const = p.log_weights + log_det - half_log_2pi - 0.5 * np.einsum("ij,ij->i", mu_u, mu_u)
            self.tied_terms.append((m, U, mu_u, const[:, None]))

        largest = max(self.n_total + self.width, (self.n_full * d) if self.full else 0)
        budget = BLOCK_ELEMENTS * block_scale(threads) if xp is np else GPU_BLOCK_ELEMENTS
        self.rows = int(max(64, budget // max(1, largest)))
        #: Layout of the whitened residuals: (rows, Σk, d) on the CPU (one GEMM [1 | y] @ A, then
        #: per-row norms with rows outermost), (sub-blocks, Σk, d, rows of a sub-block) on the GPU (one
        #: batched GEMM Aᵀ [1 | y]ᵀ whose per-component blocks feed the batched GEMM of Σ r z zᵀ without
        #: a transposing copy; one sub-block of all the block's rows for float64).
        self.z_features_major = bool(self.full) and _features_major_z(xp)
        #: float32 products in the GPU layout are summed over sub-blocks of this many rows (a batch
        #: dimension of the GEMMs), the sub-block sums in float64, as the CPU's float32 blocks are.
        self.sub_rows = None
        if self.z_features_major and self.full_dtype == np.float32:
            self.sub_rows = FLOAT32_SUB_BLOCK_ROWS
            self.rows = max(self.sub_rows, self.rows // self.sub_rows * self.sub_rows)

        # What the block kernels read, in the chunk's library (the same objects for NumPy).
        self.center_x = on_device(xp, self.center)
        self.W_x = on_device(xp, self.W)
        if self.full:
            if self.z_features_major:
                self.AT_x = on_device(xp, np.ascontiguousarray(self.A.T))
            self.full_const_x = on_device(xp, self.full_const)
            self.full_ref_x = on_device(xp, self.full_ref)
            self.z_shift_x = None if self.z_shift is None else on_device(xp, self.z_shift)
        self.tied_terms_x = [
            (m, on_device(xp, U), on_device(xp, mu_u), on_device(xp, const)) for m, U, mu_u, const in self.tied_terms
        ]


#: Plans kept per process (:func:`_plan_for`): a pass's chunks share one parameter batch, and a
#: lazy prediction may run beside it. Few, because a plan of a large model is large (its
#: ``A`` and ``U⁻¹`` hold about 2 k d² values: 100 MB at k = 100, d = 256).
PLAN_CACHE_SIZE = 2
_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()


def _plan_for(batch: tuple[ChunkParams, ...], n_features: int, input_dtype, xp=np, threads: int = 1) -> _BatchPlan:
    """The :class:`_BatchPlan` of ``batch``, built once per process for the same parameter objects.

    Every chunk task of a pass receives the same parameter objects (one graph
    key, deserialised once per distributed worker), and building a plan costs
    a chunk some 0.5 ms for 16 'full' components at d = 32 (2 ms for 4
    restarts; per-component triangular inverses), all of it holding the GIL
    (``bench/README.md``, "Threads and the GIL"). Plans are read-only once
    built, so the chunks of a pass share one. Entries hold their parameters,
    so an ``id`` is never reused while its entry lives. NumPy plans only: a
    GPU chunk is large, and its plan holds arrays of one device.
    """
    if xp is not np:
        return _BatchPlan(batch, n_features, input_dtype, xp, threads)
    # Everything the plan reads besides the parameters (the module settings too, which tests and benchmarks change).
    key = (tuple(map(id, batch)), n_features, np.dtype(input_dtype).str, BLOCK_ELEMENTS * block_scale(threads),
           _features_major_z(xp))
    with _PLAN_CACHE_LOCK:
        entry = _PLAN_CACHE.get(key)
        if entry is not None and all(a is b for a, b in zip(entry[0], batch)):
            _PLAN_CACHE.move_to_end(key)
            return entry[1]
    plan = _BatchPlan(batch, n_features, input_dtype, xp, threads)
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE[key] = (batch, plan)
        _PLAN_CACHE.move_to_end(key)
        while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return plan


#: Rows per float32 sum in the GPU layout (:attr:`_BatchPlan.sub_rows`); sums across them are float64.
FLOAT32_SUB_BLOCK_ROWS = 4096


def _features_major_z(xp) -> bool:
    """Whether blocks hold the whitened residuals components-major, (sub-blocks, Σk, d, rows): on GPUs."""
    return xp is not np


def _triangular_inverses(factors: np.ndarray) -> np.ndarray:
    """Inverses of a stack of (upper-triangular) precision Cholesky factors.

    Back-substitution for triangular factors (componentwise accurate, which the
    back-transform of the second moments relies on for ill-conditioned
    components); a general inverse for any other factor.
    """
    eye = np.eye(factors.shape[-1])
    out = np.empty_like(factors)
    for k, U in enumerate(factors):
        if not np.any(np.tril(U, -1)):
            out[k] = linalg.solve_triangular(U, eye, lower=False, check_finite=False)
        elif not np.any(np.triu(U, 1)):
            out[k] = linalg.solve_triangular(U, eye, lower=True, check_finite=False)
        else:
            out[k] = np.linalg.inv(U)
    return out


class _BatchSums:
    """Per-chunk float64 accumulators of a batch, relative to the plan's ``c₀``.

    They live in the chunk's library (on the GPU for CuPy chunks) while blocks
    are added; :meth:`finish` brings them to the host.
    """

    def __init__(self, plan: _BatchPlan):
        d = plan.n_features
        xp = plan.xp
        self.plan = plan
        self.G = xp.zeros((plan.n_total, plan.width))  # Σ r [1, y, y²]
        self.M = xp.zeros((plan.n_full, d, d)) if plan.full else None  # Σ r z zᵀ
        self.yy = xp.zeros((d, d)) if plan.tied else None  # Σ w y yᵀ
        # Σ log p(x) per softmax group (plan.softmax_groups), in the plan's member order.
        self.group_log_likelihood = [xp.zeros(len(members)) for members in plan.softmax_groups]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """After the last block: every member's Σ log p(x) (batch order) and Σ w [1, y].

        Moves the accumulators to the host (float64 NumPy). The column sums are read off G:
        the responsibilities of any one member sum to 1 on every row, so its rows of
        Σ r [1, y] add up to Σ w [1, y].
        """
        plan = self.plan
        if plan.xp is not np:
            self.G = to_host(self.G)
            self.M = None if self.M is None else to_host(self.M)
            self.yy = None if self.yy is None else to_host(self.yy)
            self.group_log_likelihood = [to_host(acc) for acc in self.group_log_likelihood]
        if plan.head_only:  # Σ r (x - c̃) → Σ r (x - c₀)
            self.G[:, 1:] += self.G[:, :1] * (plan.full_ref - plan.center)
        log_likelihood = np.zeros(len(plan.batch))
        for members, sums in zip(plan.softmax_groups, self.group_log_likelihood):
            log_likelihood[members] = sums
        column_sums = self.G[plan.slices[plan.order[0]], : plan.n_features + 1].sum(axis=0)
        return log_likelihood, column_sums


def _softmax_rows(
    L: np.ndarray, plan: _BatchPlan, sums: _BatchSums, sample_weight, work: Workspace, guard: bool = False
) -> None:
    """In place: log-probabilities (components, rows) → responsibilities; adds each member's Σ log p(x).

    Every call costs a handful of NumPy calls per softmax group (each holding
    the GIL briefly); rows whose log-probabilities are all -inf or NaN are
    only handled with ``guard`` (the chunk is redone with it when its
    log-likelihood comes out non-finite).
    """
    xp = plan.xp
    n = L.shape[1]
    for (start, stop, size), acc in zip(plan.softmax_layout, sums.group_log_likelihood):
        L3 = L[start:stop].reshape(-1, size, n)
        amax = L3.max(axis=1, keepdims=True)
        if guard and not bool(xp.isfinite(amax).all()):
            amax = xp.where(xp.isfinite(amax), amax, 0.0)
        L3 -= amax
        exp_inplace(L3, work)
        total = L3.sum(axis=1, keepdims=True)
        L3 *= 1.0 / total
        log_norm = xp.log(total[:, 0, :], out=total[:, 0, :])
        log_norm += amax[:, 0, :]  # (members, rows)
        acc += log_norm.sum(axis=1) if sample_weight is None else xp.dot(log_norm, sample_weight)


def _log_prob_block(X: np.ndarray, plan: _BatchPlan, work: Workspace, L: np.ndarray):
    """Fill ``L`` (components, rows) with log π_k + log N(x | μ_k, Σ_k) of every member's components.

    Returns the block's features ``F`` (features-major: (width, rows)) and,
    for full members, the whitened
    residuals ``z`` (rows, Σ k_full, d) for the statistics.
    """
    xp = plan.xp
    n, d = X.shape
    if plan.head_only:
        F = y = None
    else:
        # Features-major (width, rows): contiguous writes here and contiguous row sums later.
        F = _scratch(work, "features", (plan.width, n), np.float64, xp)
        F[0] = 1.0
        xp.subtract(X.T, plan.center_x[:, None], out=F[1 : d + 1], dtype=np.float64, casting="unsafe")
        y = F[1 : d + 1].T
    if plan.expanded:
        xp.multiply(F[1 : d + 1], F[1 : d + 1], out=F[d + 1 :])
        xp.matmul(plan.W_x.T, F, out=L[plan.expanded_rows])
    z3 = None
    if plan.full and plan.z_features_major:
        if plan.full_dtype == np.float64 and plan.full_ref is plan.center:
            head_t = F[: d + 1]
        else:
            head_t = _scratch(work, "features32", (d + 1, n), plan.full_dtype, xp)
            head_t[0] = 1.0
            xp.subtract(X.T, plan.full_ref_x[:, None], out=head_t[1:], dtype=plan.full_dtype, casting="unsafe")
        head = head_t.T
        # Sub-blocks of m rows: z as (S, Σk, d, m), one batched GEMM Aᵀ [1 | y]ᵀ per sub-block.
        m = plan.sub_rows if plan.sub_rows and n > plan.sub_rows else n
        S = n // m
        z4 = xp.matmul(
            plan.AT_x[None],
            head_t.reshape(d + 1, S, m).transpose(1, 0, 2),
            out=_scratch(work, "z", (S, plan.A.shape[1], m), plan.full_dtype, xp),
        ).reshape(S, plan.n_full, d, m)
        z3 = z4
        out = L[plan.full_rows]
        quad = (z4 * z4).sum(axis=2)  # (S, Σk, m) → (Σk, rows): a small copy; `out` may be a strided view
        xp.multiply(quad.transpose(1, 0, 2).reshape(plan.n_full, n), -0.5, out=out, casting="unsafe")
        out += plan.full_const_x
    elif plan.full:  # the CPU layout (rows, Σk, d): NumPy chunks only (see _BatchPlan.z_features_major)
        if plan.full_dtype == np.float64 and plan.full_ref is plan.center:
            head = F[: d + 1].T
        else:
            head = _scratch(work, "features32", (n, d + 1), plan.full_dtype)
            head[:, 0] = 1.0
            np.subtract(X, plan.full_ref, out=head[:, 1:], dtype=plan.full_dtype, casting="unsafe")
        z = np.matmul(head, plan.A, out=_scratch(work, "z", (n, plan.A.shape[1]), plan.full_dtype))
        z3 = z.reshape(n, plan.n_full, d)
        # Σ_d z² per (row, component) (einsum is fast only with rows outermost), then components-major.
        quad = np.einsum("nkd,nkd->nk", z3, z3, out=_scratch(work, "quad", (n, plan.n_full), plan.full_dtype))
        out = L[plan.full_rows]
        np.multiply(quad.T, -0.5, out=out, casting="unsafe")
        out += plan.full_const
    for m, U, mu_u, const in plan.tied_terms_x:
        t = y @ U
        out = L[plan.slices[m]]
        xp.matmul(mu_u, t.T, out=out)
        out -= 0.5 * xp.einsum("ij,ij->i", t, t)
        out += const
    return (head if plan.head_only else F), z3


def _accumulate_block(
    X: np.ndarray, plan: _BatchPlan, sums: _BatchSums, work: Workspace, sample_weight, guard: bool = False
) -> None:
    xp = plan.xp
    n, d = X.shape
    L = _scratch(work, "log_prob", (plan.n_total, n), np.float64, xp)
    F, z3 = _log_prob_block(X, plan, work, L)
    _softmax_rows(L, plan, sums, sample_weight, work, guard)
    if plan.head_only:
        # float32 'full' batch: F is the float32 head [1 | y - c̃] (rows, d + 1); the block's Σ r [1, y]
        # and the √r scaling come from float32 responsibilities (summed across blocks in float64).
        r = L
        if sample_weight is not None:
            r = xp.multiply(L, sample_weight, out=_scratch(work, "weighted", L.shape, np.float64, xp))
        r32 = _scratch(work, "resp32", L.shape, np.float32, xp)
        xp.copyto(r32, r, casting="same_kind")
        if plan.sub_rows:  # GPU-sized blocks: Σ r [1, y] in float64 (a small GEMM next to the residuals')
            sums.G += xp.dot(r, F.astype(np.float64))
        else:
            sums.G += xp.dot(r32, F)
        scale = xp.sqrt(r32, out=r32)
    else:
        Fw = F
        if sample_weight is not None:
            Fw = xp.multiply(F, sample_weight, out=_scratch(work, "weighted", F.shape, np.float64, xp))
        sums.G += xp.dot(L, Fw.T)  # np.dot, not @: see the note above block_rows
        if plan.tied:
            sums.yy += xp.dot(F[1 : d + 1], Fw[1 : d + 1].T)
        scale = None
        if plan.full:
            r = L[plan.full_rows]
            if sample_weight is not None:
                r = r * sample_weight
            scale = xp.sqrt(r).astype(plan.full_dtype, copy=False)
    if scale is None:
        return
    if plan.z_shift is not None:  # moments about the members' own shifts: (y - t) U = z + (s - t) U
        z3 += plan.z_shift_x[:, :, None] if plan.z_features_major else plan.z_shift_x
    # Σ r z zᵀ of the full members: √r-scaled residuals (scale: (Σk, rows)), one batched GEMM.
    if plan.z_features_major:  # z3: (S, Σk, d, m); Σ over the S sub-blocks in float64
        S, m = z3.shape[0], z3.shape[3]
        z3 *= scale.reshape(plan.n_full, S, m).transpose(1, 0, 2)[:, :, None, :]
        sums.M += xp.matmul(z3, z3.transpose(0, 1, 3, 2)).sum(axis=0, dtype=np.float64)
    else:
        z3 *= scale.T[:, :, None]
        sums.M += xp.matmul(z3.transpose(1, 2, 0), z3.transpose(1, 0, 2))


def _member_statistics(
    plan: _BatchPlan,
    sums: _BatchSums,
    m: int,
    n_samples,
    n_nonfinite: int,
    log_likelihood: np.ndarray,
    column_sums: np.ndarray,
) -> SufficientStatistics:
    """Member ``m``'s statistics in its own coordinates (its centre and shifts), float64."""
    d = plan.n_features
    p = plan.batch[m]
    rows = plan.slices[m]
    G = sums.G[rows]
    nk, s1 = G[:, 0], G[:, 1 : d + 1]  # Σ r, Σ r y (y relative to c₀)
    delta = p.center - plan.center  # y_m = y - delta
    total_weight = column_sums[0]
    sy = column_sums[1:] - total_weight * delta
    kind = p.covariance_type
    if kind == "full":
        k0 = rows.start - plan.full_rows.start
        part = slice(k0, k0 + rows.stop - rows.start)
        target = p.center + (p.means if p.shifts is None else p.shifts)  # absolute shift points
        used = plan.effective_shift[part]  # absolute shifts of the products
        sx_used = s1 - nk[:, None] * (used - plan.center)
        U_inv = plan.U_inv[part]
        sxx = np.swapaxes(U_inv, 1, 2) @ sums.M[part] @ U_inv  # U⁻ᵀ (Σ r z zᵀ) U⁻¹
        e = used - target
        sxx += e[:, :, None] * sx_used[:, None, :] + sx_used[:, :, None] * e[:, None, :]
        sxx += nk[:, None, None] * (e[:, :, None] * e[:, None, :])
        sx = sx_used + nk[:, None] * e
    else:
        sx = s1 - nk[:, None] * delta
        if kind == "tied":
            sxx = sums.yy - np.outer(delta, sy + total_weight * delta) - np.outer(sy, delta)
        else:
            s2 = G[:, d + 1 :]  # Σ r y²
            sxx = s2 - 2.0 * delta * s1 + nk[:, None] * delta**2
            if kind == "spherical":
                sxx = sxx.sum(axis=1)
    return SufficientStatistics(
        nk=nk.copy(),
        sx=sx,
        sxx=sxx,
        sy=sy,
        n_samples=n_samples,
        log_likelihood=float(log_likelihood[m]),
        n_nonfinite=n_nonfinite,
    )


def e_step_statistics(
    X: np.ndarray, batch: tuple[ChunkParams, ...], sample_weight: np.ndarray | None = None, threads: int = 1
) -> tuple[SufficientStatistics, ...]:
    """One chunk's E-step statistics for a batch of mixtures.

    The chunk is read once and evaluated under every parameter set of the
    batch (restarts, model-selection candidates) with shared products (see
    :class:`_BatchPlan`): one feature matrix per row block, one GEMM for the
    log-densities of all diag/spherical components, one for the whitened
    residuals of all full components, one for the first and second moments
    of every component. Large chunks are processed in cache-sized row blocks;
    sums across blocks are float64 (float32 input to 'full' mixtures runs the
    per-block products in float32, shifted).

    A CuPy chunk is computed on its GPU with the same code (the chunk's array
    library, :func:`array_module`, supplies every function); the statistics
    come back as float64 NumPy arrays either way.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        NumPy or CuPy array.
    batch : tuple of ChunkParams
    sample_weight : ndarray of shape (n_samples,), default=None
    threads : int, default=1
        Threads of this process that run kernels at the same time (the
        pass's scheduler knows): CPU row blocks grow with them
        (:func:`block_scale`). The statistics do not depend on it beyond
        the rounding of sums taken in another order.

    Returns
    -------
    tuple of SufficientStatistics, one per parameter set.
    """
    if not batch:
        return ()
    xp = array_module(X)
    X = xp.asarray(X)
    n, d = X.shape
    if sample_weight is not None:
        sample_weight = xp.asarray(sample_weight, dtype=np.float64)
    plan = _plan_for(tuple(batch), d, X.dtype, xp, threads)
    work = _thread_workspace()
    with np.errstate(under="ignore", invalid="ignore", over="ignore", divide="ignore"):
        n_nonfinite = 0
        for guard in (False, True):
            sums = _BatchSums(plan)
            for start, stop in plan.blocks(n):
                weight = None if sample_weight is None else sample_weight[start:stop]
                _accumulate_block(X[start:stop], plan, sums, work, weight, guard)
            log_likelihood, column_sums = sums.finish()
            if np.isfinite(log_likelihood).all():
                break
            # Non-finite rows poison the sums; count them only then (no extra pass otherwise).
            n_nonfinite = count_nonfinite_rows(X)
            if n_nonfinite:
                break
            # Finite rows whose log-densities overflowed: redo the chunk with the guarded softmax.
        n_samples = int(n) if sample_weight is None else float(sample_weight.sum())
        return tuple(
            _member_statistics(plan, sums, m, n_samples, n_nonfinite, log_likelihood, column_sums)
            for m in range(len(plan.batch))
        )


# ---------------------------------------------------------------------------
# Initial responsibilities (explicit seeds, no hidden randomness)
# ---------------------------------------------------------------------------

RANDOM_BLOCK_ROWS = 4096


class InitResp(NamedTuple):
    """How a chunk derives its initial responsibilities.

    kind 'nearest': one-hot on the nearest of ``centers``.
    kind 'rows': one-hot at the global row indices ``rows`` (component j at
    ``rows[j]``), zero elsewhere, as sklearn's 'random_from_data' and
    'k-means++' initialisations.
    kind 'random': uniform random responsibilities, normalised per row,
    drawn in fixed blocks of RANDOM_BLOCK_ROWS rows seeded by
    ``(seed, block index)``, so they depend on the row index only, never
    on the chunking.
    kind 'given': the rows of ``resp`` (n_samples, n_components) at the
    chunk's global row indices (sklearn's own 'random' draws, for data
    seeded in memory).

    ``shifts`` (n_components, n_features), absolute: the points the 'full'
    second moments of the components are taken about (see
    :func:`initial_shifts`); None: the ``centers`` for 'nearest', the
    statistics' centre otherwise. A 'rows' spec takes the values of its rows
    (the driver reads them): a component seeded on a far outlier then keeps
    its covariance, which second moments about a distant point would lose to
    rounding (|x - c|² eps above reg_covar).
    """

    kind: str
    n_components: int
    centers: np.ndarray | None = None
    rows: np.ndarray | None = None
    seed: int = 0
    resp: np.ndarray | None = None
    shifts: np.ndarray | None = None


def initial_shifts(spec: InitResp, center: np.ndarray) -> np.ndarray:
    """Shifts of the 'full' statistics of ``spec`` relative to ``center``, (n_components, n_features).

    ``spec.shifts`` if given, else the 'nearest' centres, else zeros (the
    centre itself); zero for a non-finite point (a seed row holding NaN: the
    fit reports the data's non-finite rows). :func:`init_statistics` takes the
    'full' second moments about them, and :func:`parameters_from_statistics`
    must be given the same.
    """
    center = np.asarray(center, dtype=np.float64)
    points = spec.shifts if spec.shifts is not None else spec.centers if spec.kind == "nearest" else None
    if points is None:
        return np.zeros((spec.n_components, center.shape[0]))
    points = np.asarray(points, dtype=np.float64)
    return np.where(np.isfinite(points).all(axis=1, keepdims=True), points - center, 0.0)


def random_resp(row_start: int, n_rows: int, n_components: int, seed: int) -> np.ndarray:
    """Random responsibilities of rows ``[row_start, row_start + n_rows)``."""
    out = np.empty((n_rows, n_components))
    first = row_start // RANDOM_BLOCK_ROWS
    last = (row_start + n_rows - 1) // RANDOM_BLOCK_ROWS if n_rows else first - 1
    pos = 0
    for block in range(first, last + 1):
        rng = np.random.default_rng([seed, block])
        values = rng.uniform(size=(RANDOM_BLOCK_ROWS, n_components))
        lo = max(row_start, block * RANDOM_BLOCK_ROWS) - block * RANDOM_BLOCK_ROWS
        hi = min(row_start + n_rows, (block + 1) * RANDOM_BLOCK_ROWS) - block * RANDOM_BLOCK_ROWS
        out[pos : pos + hi - lo] = values[lo:hi]
        pos += hi - lo
    out /= out.sum(axis=1, keepdims=True)
    return out


def nearest_center_labels(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean distance) of every row."""
    X = np.asarray(X, dtype=np.float64)
    dist = (
        np.einsum("ij,ij->i", X, X)[:, None]
        - 2.0 * (X @ centers.T)
        + np.einsum("ij,ij->i", centers, centers)[None, :]
    )
    return dist.argmin(axis=1)


def initial_resp(X: np.ndarray, row_start: int, spec: InitResp, center: np.ndarray | None = None) -> np.ndarray:
    """Initial responsibilities (n_samples, n_components) of one chunk.

    ``X`` holds rows relative to ``center`` (None: absolute rows); 'nearest'
    compares them with the centres relative to it, as distances far from
    the origin (‖x‖² ≈ 1e18 for timestamps) lose every digit that tells
    neighbouring centres apart.
    """
    n = X.shape[0]
    resp = np.zeros((n, spec.n_components))
    if spec.kind == "nearest":
        centers = np.asarray(spec.centers, dtype=np.float64)
        labels = nearest_center_labels(X, centers if center is None else centers - center)
        resp[np.arange(n), labels] = 1.0
    elif spec.kind == "rows":
        local = np.asarray(spec.rows) - row_start
        inside = (local >= 0) & (local < n)
        resp[local[inside], np.flatnonzero(inside)] = 1.0
    elif spec.kind == "random":
        resp = random_resp(row_start, n, spec.n_components, spec.seed)
    elif spec.kind == "given":
        resp = np.asarray(spec.resp[row_start : row_start + n], dtype=np.float64)
    else:
        raise ValueError(f"unknown initial responsibility kind {spec.kind!r}")
    return resp


def init_statistics(
    X: np.ndarray,
    row_start: int,
    specs: tuple[InitResp, ...],
    center: np.ndarray,
    covariance_type: str,
    sample_weight: np.ndarray | None = None,
) -> tuple[SufficientStatistics, ...]:
    """Statistics of one chunk under a batch of initial responsibilities (optionally row-weighted).

    'full' second moments are taken about each spec's :func:`initial_shifts`.
    """
    n_nonfinite = count_nonfinite_rows(X)
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
    out = []
    with np.errstate(invalid="ignore" if n_nonfinite else "warn"):
        for spec in specs:
            rows = block_rows(spec.n_components, X.shape[1])
            shifts = initial_shifts(spec, center)
            total = None
            for start in range(0, max(X.shape[0], 1), rows):
                y = center_rows(X[start : start + rows], center)
                resp = initial_resp(y, row_start + start, spec, center)
                weight = None if sample_weight is None else sample_weight[start : start + rows]
                part = statistics_from_resp(y, resp, shifts, covariance_type, sample_weight=weight)
                total = part if total is None else merge_statistics(total, part)
            out.append(total._replace(n_nonfinite=n_nonfinite))
    return tuple(out)


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple[int, ...]:
    """Shape of the covariances (and precision Cholesky factors, and ``sxx``) of a mixture."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def empty_statistics(n_components: int, n_features: int, covariance_type: str) -> SufficientStatistics:
    """Statistics of zero rows (the identity of :func:`merge_statistics`)."""
    sxx_shape = covariance_shape(covariance_type, n_components, n_features)
    return SufficientStatistics(
        np.zeros(n_components),
        np.zeros((n_components, n_features)),
        np.zeros(sxx_shape),
        np.zeros(n_features),
        0,
        0.0,
        0,
    )


# ---------------------------------------------------------------------------
# M-step
# ---------------------------------------------------------------------------


def parameters_from_statistics(
    stats: SufficientStatistics,
    center: np.ndarray,
    shifts: np.ndarray,
    reg_covar: float,
    covariance_type: str,
    *,
    eps: float = float(np.finfo(np.float64).eps),
    initialization: bool = False,
):
    """M-step: weights, means and covariances from reduced statistics.

    Follows :func:`sklearn.mixture._gaussian_mixture._estimate_gaussian_parameters`
    (``nk + 10 eps``, ``reg_covar`` on the diagonal), but on shifted moments.

    Parameters
    ----------
    stats : SufficientStatistics
        Statistics reduced over all rows.
    center : ndarray of shape (n_features,)
        Centre the statistics are relative to.
    shifts : ndarray of shape (n_components, n_features)
        Per-component shifts used for 'full' statistics (relative to ``center``).
    reg_covar : float
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    eps : float
        Machine epsilon of the input dtype (sklearn adds ``10 * eps`` to nk).
    initialization : bool, default=False
        Responsibilities did not come from an E-step: weights are
        ``nk / n_samples`` (not renormalised) and rows' responsibilities may
        not sum to one, as in sklearn's initialisation.

    Returns
    -------
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    covariances : ndarray
    """
    nk_raw = np.asarray(stats.nk, dtype=np.float64)
    nk = nk_raw + 10 * eps
    delta = stats.sx / nk[:, None]
    n_features = delta.shape[1]
    if covariance_type == "full":
        rel_means = shifts + delta
        factor = 2.0 - nk_raw / nk
        covariances = stats.sxx / nk[:, None, None] - factor[:, None, None] * (
            delta[:, :, None] * delta[:, None, :]
        )
        covariances = 0.5 * (covariances + np.swapaxes(covariances, 1, 2))
        covariances[:, np.arange(n_features), np.arange(n_features)] += reg_covar
    else:
        rel_means = delta
        if covariance_type == "tied":
            covariances = stats.sxx - (nk[:, None] * delta).T @ delta
            if initialization:
                # Rows' responsibilities need not sum to one: sklearn's raw
                # formula X'X - Σ nk μμ' then differs from the centred one by
                # terms in the centre, added back here.
                diff = stats.sy - nk @ delta
                covariances = (
                    covariances
                    + np.outer(diff, center)
                    + np.outer(center, diff)
                    + (stats.n_samples - nk.sum()) * np.outer(center, center)
                )
            covariances = covariances / nk.sum()
            covariances = 0.5 * (covariances + covariances.T)
            covariances[np.arange(n_features), np.arange(n_features)] += reg_covar
        else:
            if covariance_type == "diag":
                covariances = stats.sxx / nk[:, None] - delta**2 + reg_covar
            else:
                covariances = (stats.sxx / nk - (delta**2).sum(axis=1)) / n_features + reg_covar
    if initialization:
        weights = nk / stats.n_samples
    else:
        weights = nk / nk.sum()
    means = center + rel_means
    return weights, means, covariances


def smallest_eigenvalues(covariances: np.ndarray) -> np.ndarray:
    """Smallest eigenvalue of each 'full' covariance (NaN where one is not finite), float64."""
    covariances = np.asarray(covariances, dtype=np.float64)
    out = np.full(covariances.shape[0], np.nan)
    finite = np.isfinite(covariances).all(axis=(1, 2))
    if finite.any():
        out[finite] = np.linalg.eigvalsh(covariances[finite])[:, 0]
    return out


def smallest_eigenpairs(covariances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest eigenvalue (n_components,) and its unit eigenvector (n_components, n_features) of each
    'full' covariance, float64; NaN where a covariance is not finite."""
    covariances = np.asarray(covariances, dtype=np.float64)
    values = np.full(covariances.shape[0], np.nan)
    vectors = np.full(covariances.shape[:2], np.nan)
    finite = np.isfinite(covariances).all(axis=(1, 2))
    if finite.any():
        w, v = np.linalg.eigh(covariances[finite])
        values[finite], vectors[finite] = w[:, 0], v[:, :, 0]
    return values, vectors


def shift_precision_lost(stats: SufficientStatistics, smallest: np.ndarray, eps: float,
                         covariances: np.ndarray | None = None) -> np.ndarray:
    """Which 'full' covariances lost most of their digits to the shift of their second moments.

    A covariance is ``sxx / nk - δ δᵀ`` (plus ``reg_covar``), with ``δ = sx / nk``
    the distance from the shift (the previous mean) to the new mean. Both terms
    carry a rounding error of about ``eps |δ_i δ_j|`` in entry (i, j), which
    the difference keeps. Along the smallest eigenvector ``v`` (eigenvalue λ)
    that is at most ``eps (|v|·|δ|)²``: relative to λ, the precision lost
    where the covariance is smallest. (``eps |δ|² / λ`` bounds it, but far too
    loosely when δ lies along a feature of large scale and v along one of small
    scale, e.g. a salary beside a 0/1 column: only the components that bound
    flags get their eigenvector computed, from ``covariances``.) A component
    that jumps onto a far outlier (|δ|² ≈ 3e12 for a row at 1e6, λ =
    reg_covar = 1e-6) loses every digit, and its covariance may not even be
    positive definite. Flagged: an error above ``eps ** 0.25`` relative to λ
    (fewer than a quarter of the digits left: 4 of 16 in float64, 2 of 7 for
    float32 products), or λ <= 0 with a move. A flagged component's statistics
    should be recomputed about its new mean (the same responsibilities, so the
    result is exact).

    Parameters
    ----------
    stats : SufficientStatistics
        'full' statistics, shifted.
    smallest : ndarray of shape (n_components,)
        Smallest eigenvalue of each covariance computed from ``stats``
        (:func:`smallest_eigenvalues`); NaN (not finite) is never flagged.
    eps : float
        Machine epsilon of the products (the input dtype's).
    covariances : ndarray of shape (n_components, n_features, n_features), default=None
        Those covariances: the flags of the loose bound are refined along their eigenvectors.

    Returns
    -------
    ndarray of shape (n_components,), bool
    """
    nk = np.asarray(stats.nk, dtype=np.float64) + 10 * eps
    delta = stats.sx / nk[:, None]
    move = np.einsum("ij,ij->i", delta, delta)
    with np.errstate(invalid="ignore"):
        lost = (move > 0) & ((eps * move > eps**0.25 * smallest) | (smallest <= 0))
    if covariances is not None:
        for k in np.flatnonzero(lost & (smallest > 0)):  # rare: refine along the smallest eigenvector
            values, vectors = smallest_eigenpairs(np.asarray(covariances)[k : k + 1])
            spread = float(np.abs(vectors[0]) @ np.abs(delta[k])) ** 2
            lost[k] = eps * spread > eps**0.25 * values[0]
    return lost


def regularisation_drop_bound(weights, covariances, reg_covar: float, covariance_type: str, n_features: int) -> float:
    """How far the mean log-likelihood may fall in one EM step because the M-step added ``reg_covar``.

    EM never lowers the log-likelihood with the maximising M-step; with
    ``Σ = S + r I`` instead of ``S`` it may, by at most the expected
    complete-data log-likelihood that ``r`` gives up:
    ``½ Σ_k w_k Σ_i [log(1 + r / s_ki) - r / (s_ki + r)]`` per row, ``s_ki`` the
    eigenvalues of component k's ``S`` (for 'tied', one ``S`` of weight 1; for
    'spherical', ``n_features`` equal ones). Negligible where ``r`` is small
    against the variances (about ``(r/s)² / 4`` each), unbounded where a
    variance is about ``r`` or below.

    Parameters
    ----------
    weights : ndarray of shape (n_components,)
    covariances : ndarray
        The regularised covariances the step produced (``S + r I``).
    reg_covar : float
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    n_features : int
    """
    r = float(reg_covar)
    if r <= 0:
        return 0.0
    covariances = np.asarray(covariances, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(covariances)):
        return float("inf")
    if covariance_type == "full":
        eig = np.linalg.eigvalsh(covariances)
    elif covariance_type == "tied":
        eig, weights = np.linalg.eigvalsh(covariances)[None, :], np.ones(1)
    elif covariance_type == "diag":
        eig = covariances
    else:
        eig = np.repeat(covariances[:, None], n_features, axis=1)
    s = np.maximum(eig - r, np.finfo(np.float64).tiny)
    lost = (np.log1p(r / s) - r / (s + r)).sum(axis=1)
    return float(0.5 * weights @ lost)


def mixture_feature_std(weights, means, covariances, covariance_type: str) -> np.ndarray:
    """Standard deviation of each feature under the mixture (the law of total variance), float64."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / max(weights.sum(), np.finfo(np.float64).tiny)
    means = np.asarray(means, dtype=np.float64)
    covariances = np.asarray(covariances, dtype=np.float64)
    n_components, n_features = means.shape
    if covariance_type == "full":
        within = np.diagonal(covariances, axis1=1, axis2=2)
    elif covariance_type == "tied":
        within = np.broadcast_to(np.diagonal(covariances), (n_components, n_features))
    elif covariance_type == "diag":
        within = covariances
    else:
        within = np.broadcast_to(covariances[:, None], (n_components, n_features))
    mean = weights @ means
    return np.sqrt(np.maximum(weights @ (within + (means - mean) ** 2), 0.0))


def chunk_params(weights, means, precisions_cholesky, covariance_type, center=None, input_dtype=None) -> ChunkParams:
    """Build the kernel's :class:`ChunkParams` (float64) from fitted parameters.

    ``center`` defaults to the weighted mean of the means. For float32 input
    to a 'full' mixture (whose chunk products run in float32) the centre and
    the relative means are rounded to float32 values here, so the shifts the
    kernel uses and the ones the M-step adds back are exactly the same.
    """
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    if center is None:
        center = weights @ means / max(weights.sum(), np.finfo(np.float64).tiny)
    center = np.asarray(center, dtype=np.float64)
    relative = means - center
    if input_dtype is not None and np.dtype(input_dtype) == np.float32 and covariance_type == "full":
        center = center.astype(np.float32).astype(np.float64)
        relative = (means - center).astype(np.float32).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    return ChunkParams(
        center=center,
        means=relative,
        precisions_cholesky=np.asarray(precisions_cholesky, dtype=np.float64),
        log_weights=log_weights,
        covariance_type=covariance_type,
    )
