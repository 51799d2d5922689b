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
from typing import Literal, NamedTuple

import numpy as np
from scipy import linalg

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
    """

    center: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    log_weights: np.ndarray
    covariance_type: str


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
    per chunk call reuses them across blocks.
    """

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        """A contiguous scratch array of ``shape`` and ``dtype`` (contents undefined)."""
        size = int(np.prod(shape))
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


def _scratch(work: Workspace | None, name: str, shape, dtype=np.float64) -> np.ndarray:
    return np.empty(shape, dtype=dtype) if work is None else work.get(name, shape, dtype)


# ---------------------------------------------------------------------------
# Merging statistics
# ---------------------------------------------------------------------------


def merge_statistics(a: SufficientStatistics, b: SufficientStatistics) -> SufficientStatistics:
    """Merge the statistics of two disjoint sets of rows (plain addition)."""
    return SufficientStatistics(*(x + y for x, y in zip(a, b)))


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
        Add sklearn's float32 hint to the error message.

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
    if covariance_type in ("full", "tied"):
        stack = covariances[None] if covariance_type == "tied" else covariances
        n_features = stack.shape[-1]
        out = np.empty_like(stack)
        eye = np.eye(n_features, dtype=stack.dtype)
        for k in range(stack.shape[0]):
            try:
                cov_chol = linalg.cholesky(stack[k], lower=True)
            except linalg.LinAlgError:
                raise ValueError(message) from None
            out[k] = linalg.solve_triangular(cov_chol, eye, lower=True).T
        return out[0] if covariance_type == "tied" else out
    if np.any(covariances <= 0.0) or not np.all(np.isfinite(covariances)):
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


def _quadratic_form(y: np.ndarray, params: ChunkParams, work: Workspace | None = None) -> np.ndarray:
    """Mahalanobis distances (n, n_components) of centred rows ``y``."""
    means, prec_chol, kind = params.means, params.precisions_cholesky, params.covariance_type
    n, n_features = y.shape
    n_components = means.shape[0]
    if kind == "full":
        # All components in one GEMM: y @ [U_1 ... U_k] - [μ_1 U_1 ... μ_k U_k].
        stacked = np.ascontiguousarray(prec_chol.transpose(1, 0, 2)).reshape(n_features, n_components * n_features)
        offsets = np.einsum("ki,kij->kj", means, prec_chol).reshape(-1).astype(y.dtype, copy=False)
        stacked = stacked.astype(y.dtype, copy=False)
        z = np.matmul(y, stacked, out=_scratch(work, "z", (n, n_components * n_features), y.dtype))
        z -= offsets
        z *= z
        return np.einsum("nkd->nk", z.reshape(n, n_components, n_features))
    if kind == "tied":
        z = (y @ prec_chol)[:, None, :] - (means @ prec_chol)[None, :, :]
        z *= z
        return np.einsum("nkd->nk", z)
    if kind == "diag":
        precisions = prec_chol**2
        return (
            np.sum(means**2 * precisions, axis=1)
            - 2.0 * (y @ (means * precisions).T)
            + (y**2) @ precisions.T
        )
    precisions = prec_chol**2
    return (
        np.sum(means**2, axis=1) * precisions
        - 2.0 * (y @ means.T) * precisions
        + np.outer(np.einsum("ij,ij->i", y, y), precisions)
    )


def estimate_log_gaussian_prob(y: np.ndarray, params: ChunkParams, work: Workspace | None = None) -> np.ndarray:
    """log N(x_i | μ_k, Σ_k) for centred rows ``y = x - params.center``.

    Returns
    -------
    log_prob : ndarray of shape (n_samples, n_components)
    """
    n_features = y.shape[1]
    log_det = log_det_cholesky(params.precisions_cholesky, params.covariance_type, n_features)
    quad = _quadratic_form(y, params, work)
    return -0.5 * (n_features * math.log(2 * math.pi) + quad) + log_det.astype(y.dtype, copy=False)


def logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """Row-wise log Σ exp, safe for rows of -inf."""
    amax = a.max(axis=1)
    amax = np.where(np.isfinite(amax), amax, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - amax[:, None]).sum(axis=1)) + amax


def center_rows(X: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``X - center`` in float64."""
    return np.asarray(X, dtype=np.float64) - center


def log_prob_resp(X: np.ndarray, params: ChunkParams):
    """Per-row log-likelihood and log-responsibilities of one chunk.

    Returns
    -------
    log_prob_norm : ndarray of shape (n_samples,)
    log_resp : ndarray of shape (n_samples, n_components)
    """
    y = center_rows(X, params.center)
    weighted = estimate_log_gaussian_prob(y, params) + params.log_weights
    log_prob_norm = logsumexp_rows(weighted)
    with np.errstate(under="ignore", invalid="ignore"):
        log_resp = weighted - log_prob_norm[:, None]
    return log_prob_norm, log_resp


def weighted_log_prob(X: np.ndarray, params: ChunkParams) -> np.ndarray:
    """log N(x | μ_k, Σ_k) + log π_k for one chunk, shape (n_samples, n_components)."""
    return estimate_log_gaussian_prob(center_rows(X, params.center), params) + params.log_weights


def count_nonfinite_rows(X: np.ndarray) -> int:
    """Number of rows holding NaN or infinity."""
    if X.dtype.kind != "f":
        return 0
    return int(X.shape[0] - np.count_nonzero(np.isfinite(X).all(axis=1)))


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
        sx = np.matmul(resp_t[:, None, :], w)[:, 0, :].astype(np.float64)
        w *= np.sqrt(resp_t)[:, :, None]
        # One batched GEMM wᵀw per component: NumPy releases the GIL here (scipy's syrk
        # wrapper does not), so dask's worker threads run their chunks in parallel.
        sxx = np.matmul(w.transpose(0, 2, 1), w).astype(np.float64)
    else:
        sx = resp.T @ y
        if covariance_type == "tied":
            sxx = y.T @ y if sample_weight is None else (y * sample_weight[:, None]).T @ y
        elif covariance_type == "diag":
            sxx = resp.T @ (y * y)
        else:
            sxx = resp.T @ np.einsum("ij,ij->i", y, y)
    return SufficientStatistics(
        nk=nk,
        sx=sx,
        sxx=sxx,
        sy=y.sum(axis=0, dtype=np.float64) if sample_weight is None else sample_weight @ y.astype(np.float64),
        n_samples=int(y.shape[0]) if sample_weight is None else float(sample_weight.sum()),
        log_likelihood=float(log_likelihood),
        n_nonfinite=int(n_nonfinite),
    )


#: Rows per cache block inside a chunk: temporaries of (rows, n_components,
#: n_features) float64 stay around 4 MiB whatever size the dask chunks are.
BLOCK_ELEMENTS = 2**19


def block_rows(n_components: int, n_features: int) -> int:
    """Rows per cache block for a mixture of this size."""
    return int(max(64, BLOCK_ELEMENTS // max(1, n_components * n_features)))


def e_step_statistics(
    X: np.ndarray, batch: tuple[ChunkParams, ...], sample_weight: np.ndarray | None = None
) -> tuple[SufficientStatistics, ...]:
    """One chunk's E-step statistics for a batch of mixtures.

    The chunk is read once and evaluated under every parameter set of the
    batch (restarts, model-selection candidates). Large chunks are processed
    in cache-sized row blocks; the per-block statistics are summed in float64.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    batch : tuple of ChunkParams
    sample_weight : ndarray of shape (n_samples,), default=None

    Returns
    -------
    tuple of SufficientStatistics, one per parameter set.
    """
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
    out = []
    work = _thread_workspace()
    for params in batch:
        if X.dtype == np.float32 and params.covariance_type == "full":
            params = cast_params(params, np.float32)
        rows = block_rows(params.means.shape[0], X.shape[1])
        total = None
        for start in range(0, max(X.shape[0], 1), rows):
            weight = None if sample_weight is None else sample_weight[start : start + rows]
            part = _e_step_block(X[start : start + rows], params, work, weight)
            total = part if total is None else merge_statistics(total, part)
        out.append(total)
    return tuple(out)


def _e_step_block(
    X: np.ndarray, params: ChunkParams, work: Workspace | None = None, sample_weight: np.ndarray | None = None
) -> SufficientStatistics:
    dtype = params.center.dtype  # float32 only for float32 input to a 'full' mixture
    y = np.subtract(X, params.center, out=_scratch(work, "y", X.shape, dtype), dtype=dtype)
    with np.errstate(under="ignore", invalid="ignore", over="ignore"):
        weighted = estimate_log_gaussian_prob(y, params, work)
        weighted += params.log_weights
        log_prob_norm = logsumexp_rows(weighted)
        weighted -= log_prob_norm[:, None]
        resp = np.exp(weighted, out=weighted)
        log_prob_norm = log_prob_norm.astype(np.float64, copy=False)
        log_likelihood = log_prob_norm.sum() if sample_weight is None else sample_weight @ log_prob_norm
        # Non-finite rows poison the sum; count them only then (no extra pass otherwise).
        n_nonfinite = count_nonfinite_rows(X) if not np.isfinite(log_likelihood) else 0
        return statistics_from_resp(
            y,
            resp,
            params.means,
            params.covariance_type,
            log_likelihood=log_likelihood,
            n_nonfinite=n_nonfinite,
            work=work,
            sample_weight=sample_weight,
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
    """

    kind: str
    n_components: int
    centers: np.ndarray | None = None
    rows: np.ndarray | None = None
    seed: int = 0


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


def initial_resp(X: np.ndarray, row_start: int, spec: InitResp) -> np.ndarray:
    """Initial responsibilities (n_samples, n_components) of one chunk."""
    n = X.shape[0]
    resp = np.zeros((n, spec.n_components))
    if spec.kind == "nearest":
        labels = nearest_center_labels(X, spec.centers)
        resp[np.arange(n), labels] = 1.0
    elif spec.kind == "rows":
        local = np.asarray(spec.rows) - row_start
        inside = (local >= 0) & (local < n)
        resp[local[inside], np.flatnonzero(inside)] = 1.0
    elif spec.kind == "random":
        resp = random_resp(row_start, n, spec.n_components, spec.seed)
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
    """Statistics of one chunk under a batch of initial responsibilities (optionally row-weighted)."""
    n_nonfinite = count_nonfinite_rows(X)
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
    out = []
    with np.errstate(invalid="ignore" if n_nonfinite else "warn"):
        for spec in specs:
            rows = block_rows(spec.n_components, X.shape[1])
            shifts = np.zeros((spec.n_components, X.shape[1]))
            total = None
            for start in range(0, max(X.shape[0], 1), rows):
                block = X[start : start + rows]
                resp = initial_resp(block, row_start + start, spec)
                weight = None if sample_weight is None else sample_weight[start : start + rows]
                part = statistics_from_resp(
                    center_rows(block, center), resp, shifts, covariance_type, sample_weight=weight
                )
                total = part if total is None else merge_statistics(total, part)
            out.append(total._replace(n_nonfinite=n_nonfinite))
    return tuple(out)


def empty_statistics(n_components: int, n_features: int, covariance_type: str) -> SufficientStatistics:
    """Statistics of zero rows (the identity of :func:`merge_statistics`)."""
    sxx_shape = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]
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


def cast_params(params: ChunkParams, dtype) -> ChunkParams:
    """The same parameters with arrays in ``dtype`` (for float32 chunk products)."""
    return ChunkParams(
        center=params.center.astype(dtype),
        means=params.means.astype(dtype),
        precisions_cholesky=params.precisions_cholesky.astype(dtype),
        log_weights=params.log_weights.astype(dtype),
        covariance_type=params.covariance_type,
    )


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
