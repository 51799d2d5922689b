"""Input and parameter validation, with scikit-learn's wording.

NumPy arrays and pandas DataFrames go through :func:`sklearn.utils.validation.validate_data`
unchanged. Dask arrays, dask DataFrames and Zarr arrays stay lazy: only their
metadata (shape, dtype, chunks) is checked here, non-finite values are counted
inside the first pass over the data.
"""

from __future__ import annotations

import numbers

import dask
import dask.array as da
import numpy as np
from sklearn.utils import check_array
from sklearn.utils.validation import validate_data

from .namespace import is_gpu_array

FLOAT_DTYPES = (np.float64, np.float32)


#: A CuPy array given to fit is cut into chunks of about this many elements (256 MiB of float32).
GPU_CHUNK_ELEMENTS = 2**26


def is_lazy_input(X) -> bool:
    """True for inputs dgmm handles as dask arrays: dask arrays/DataFrames, Zarr arrays, CuPy arrays, and
    xarray DataArrays holding a dask array (``xr.open_zarr(...)["x"]``; one holding NumPy is NumPy input)."""
    if isinstance(X, da.Array) or is_gpu_array(X) or _dask_backed_xarray(X):
        return True
    module = type(X).__module__ or ""
    return module.startswith("zarr") or module.startswith("dask.dataframe") or module.startswith("dask_expr")


def _dask_backed_xarray(X) -> bool:
    return (type(X).__module__ or "").startswith("xarray") and isinstance(getattr(X, "data", None), da.Array)


def _to_dask_array(X) -> da.Array:
    module = type(X).__module__ or ""
    if isinstance(X, da.Array):
        return X
    if _dask_backed_xarray(X):
        return X.data
    if is_gpu_array(X):  # GPU-sized chunks of the CuPy array (views: nothing is copied)
        width = int(np.prod(X.shape[1:])) if X.ndim > 1 else 1
        rows = max(1, GPU_CHUNK_ELEMENTS // max(width, 1))
        return da.from_array(X, chunks=(rows, *X.shape[1:]), asarray=False)
    if module.startswith("zarr"):
        return da.from_zarr(X)
    if hasattr(X, "to_dask_array"):
        # Dask DataFrame: partition lengths are needed for row-aligned output.
        frame = _numeric_frame(X)
        try:
            return frame.to_dask_array(lengths=True)
        except ValueError:
            # dask 2026.8: a column projection of read_parquet fuses partitions, and lengths=True then fails
            # ("The number of items in 'lengths' does not match the number of partitions").
            return frame.to_dask_array().compute_chunk_sizes()
    raise TypeError(f"unsupported lazy input type {type(X).__name__}")


def _with_chunk_sizes(X: da.Array) -> da.Array:
    """X with its unknown row chunk sizes computed (a pass over X), leaving the caller's array as it was.

    (``Array.compute_chunk_sizes`` changes the array it is called on.)
    """
    return da.Array(X.dask, X.name, X.chunks, meta=X._meta).compute_chunk_sizes()


def _numeric_frame(frame):
    """A dask DataFrame of numeric columns cast as sklearn's ``check_array`` casts a pandas frame.

    ``to_dask_array`` makes ``object`` arrays of frames with nullable
    (``Float64``, ``Int64``), pyarrow (``double[pyarrow]``) or mixed float and
    bool columns. Such frames are cast to the dtype sklearn gives the same
    pandas frame (missing values become NaN, reported by ``fit``). Frames of
    one NumPy dtype, and frames with a non-numeric column (refused
    afterwards), are returned unchanged.
    """
    import pandas as pd
    from sklearn.utils import check_array

    series = frame.ndim == 1  # a dask Series (sample_weight): one dtype
    dtypes = [frame.dtype] if series else list(frame.dtypes)
    if not all(pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype) for dtype in dtypes):
        return frame
    if all(isinstance(dtype, np.dtype) for dtype in dtypes) and len(set(dtypes)) <= 1:
        return frame
    meta = frame._meta_nonempty.to_frame() if series else frame._meta_nonempty
    target = check_array(meta, dtype=[np.float64, np.float32], ensure_all_finite=False).dtype
    return frame.astype(target)


def check_lazy_array(estimator, X, *, reset: bool, ensure_min_samples: int = 1) -> da.Array:
    """Validate a lazy input without reading it; return a float dask array.

    The result has one chunk along the feature axis and known row chunks;
    integer and boolean inputs are cast to float64 lazily.
    """
    name = type(estimator).__name__
    # The shape first, as sklearn's check_array: before the feature count is compared with a fitted model's.
    ndim = getattr(X, "ndim", 2)
    if ndim != 2:
        if ndim == 1:
            raise ValueError(
                f"Expected 2D array, got 1D array instead (shape={X.shape}).\n"
                "Reshape your data either using array.reshape(-1, 1) if your data has a "
                "single feature or array.reshape(1, -1) if it contains a single sample."
            )
        raise ValueError(f"Found array with dim {ndim}, while dim <= 2 is required by {name}.")
    # A dask DataFrame's empty pandas meta carries its column names.
    validate_data(estimator, X._meta if hasattr(X, "columns") else X, reset=reset, skip_check_array=True)
    Xd = _to_dask_array(X)
    kind = Xd.dtype.kind
    if kind == "c":  # sklearn's words (without the array it prints)
        raise ValueError(f"Complex data not supported: X has dtype {Xd.dtype}.")
    if kind not in "biuf":
        raise ValueError(
            f"{name} needs numeric input, but X has dtype {Xd.dtype}; "
            "select numeric columns or convert them first."
        )
    if kind != "f" or Xd.dtype not in FLOAT_DTYPES:
        Xd = Xd.astype(np.float64)
    if any(np.isnan(c) for c in Xd.chunks[0]):
        Xd = _with_chunk_sizes(Xd)
    n_samples, n_features = Xd.shape
    if n_samples < ensure_min_samples:
        raise ValueError(
            f"Found array with {n_samples} sample(s) (shape={Xd.shape}) while a minimum "
            f"of {ensure_min_samples} is required by {name}."
        )
    if n_features < 1:
        raise ValueError(
            f"Found array with {n_features} feature(s) (shape={Xd.shape}) while a minimum "
            f"of 1 is required by {name}."
        )
    if Xd.numblocks[1] != 1:
        Xd = Xd.rechunk({1: -1})
    return Xd


def check_input(estimator, X, *, reset: bool, ensure_min_samples: int = 1):
    """Validate X: a float NumPy array, or a float dask array for lazy inputs.

    With ``reset`` (fitting) as sklearn's ``fit``: any dtype that converts to
    float. Otherwise (predicting, scoring) as sklearn's ``predict``: numeric
    input only, so an array of strings is refused with sklearn's message.
    """
    if is_lazy_input(X):
        return check_lazy_array(estimator, X, reset=reset, ensure_min_samples=ensure_min_samples)
    if reset:
        return validate_data(
            estimator, X, reset=True, dtype=[np.float64, np.float32], ensure_min_samples=ensure_min_samples
        )
    Xv = validate_data(estimator, X, reset=False, dtype="numeric", ensure_min_samples=ensure_min_samples)
    return Xv if Xv.dtype in FLOAT_DTYPES else Xv.astype(np.float64)


# ---------------------------------------------------------------------------
# User initial parameters (sklearn's checks and messages)
# ---------------------------------------------------------------------------


def _check_shape(param, param_shape, name):
    if param.shape != param_shape:
        raise ValueError(
            "The parameter '%s' should have the shape of %s, but got %s" % (name, param_shape, param.shape)
        )


def check_weights(weights, n_components):
    """Validate ``weights_init``; returns a new float array (the input is never modified)."""
    weights = np.array(check_array(weights, dtype=[np.float64, np.float32], ensure_2d=False), copy=True)
    _check_shape(weights, (n_components,), "weights")
    if np.any(np.less(weights, 0.0)) or np.any(np.greater(weights, 1.0)):
        raise ValueError(
            "The parameter 'weights' should be in the range "
            "[0, 1], but got max value %.5f, min value %.5f" % (np.min(weights), np.max(weights))
        )
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if not np.allclose(np.abs(1.0 - np.sum(weights)), 0.0, atol=atol):
        raise ValueError(
            "The parameter 'weights' should be normalized, but got sum(weights) = %.5f" % np.sum(weights)
        )
    return weights


def check_means(means, n_components, n_features):
    """Validate ``means_init``; returns a new float array."""
    means = np.array(check_array(means, dtype=[np.float64, np.float32], ensure_2d=False), copy=True)
    _check_shape(means, (n_components, n_features), "means")
    return means


def _check_precision_matrix(precision, covariance_type):
    if not (np.allclose(precision, precision.T) and np.all(np.linalg.eigvalsh(precision) > 0.0)):
        raise ValueError("'%s precision' should be symmetric, positive-definite" % covariance_type)


def check_precisions(precisions, covariance_type, n_components, n_features):
    """Validate ``precisions_init``; returns a new float array."""
    precisions = np.array(
        check_array(
            precisions,
            dtype=[np.float64, np.float32],
            ensure_2d=False,
            allow_nd=covariance_type == "full",
        ),
        copy=True,
    )
    shapes = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }
    _check_shape(precisions, shapes[covariance_type], "%s precision" % covariance_type)
    if covariance_type == "full":
        for k in range(precisions.shape[0]):
            _check_precision_matrix(precisions[k], covariance_type)
    elif covariance_type == "tied":
        _check_precision_matrix(precisions, covariance_type)
    elif np.any(np.less_equal(precisions, 0.0)):
        raise ValueError("'%s precision' should be positive" % covariance_type)
    return precisions


def check_n_samples(n_samples: int) -> int:
    if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool):
        raise TypeError(f"n_samples must be an int, got {n_samples!r} ({type(n_samples).__name__})")
    if n_samples < 1:
        raise ValueError(
            "Invalid value for 'n_samples': %s . The sampling requires at least one sample." % (n_samples,)
        )
    return int(n_samples)


def check_sample_weight(sample_weight, n_samples: int, lazy: bool):
    """Validate ``sample_weight``: None, or non-negative finite weights aligned with X's rows.

    NumPy weights are checked eagerly; dask weights are checked with one cheap
    pass over the weights alone (never over X). Returns float64 NumPy weights
    or a float64 dask array.
    """
    if sample_weight is None:
        return None
    if isinstance(sample_weight, da.Array) or is_lazy_input(sample_weight):
        w = sample_weight if isinstance(sample_weight, da.Array) else _to_dask_array(sample_weight)
        if w.ndim == 2 and w.shape[1] == 1:
            w = w[:, 0]
        if w.ndim != 1:
            raise ValueError(f"Sample weights must be 1D array or scalar, got an array of shape {w.shape}.")
        if w.dtype.kind not in "biuf":
            raise ValueError(f"sample_weight must be numeric, got dtype {w.dtype}.")
        w = w.astype(np.float64)
        if any(np.isnan(c) for c in w.chunks[0]):
            w = _with_chunk_sizes(w)
        if w.shape[0] != n_samples:
            raise ValueError(f"sample_weight.shape == ({w.shape[0]},), expected ({n_samples},)!")
        low, total, finite = dask.compute(w.min(), w.sum(), da.isfinite(w).all())
        _check_weight_values(bool(finite), float(low), float(total))
        return w
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        w = np.full(n_samples, float(w))
    if w.ndim != 1:
        raise ValueError(f"Sample weights must be 1D array or scalar, got an array of shape {w.shape}.")
    if w.shape[0] != n_samples:
        raise ValueError(f"sample_weight.shape == ({w.shape[0]},), expected ({n_samples},)!")
    _check_weight_values(bool(np.isfinite(w).all()), float(w.min()), float(w.sum()))
    return w


def _check_weight_values(finite: bool, low: float, total: float) -> None:
    if not finite:
        raise ValueError("sample_weight contains NaN or infinity.")
    if low < 0:
        raise ValueError("Negative values in data passed to `sample_weight`")
    if total <= 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")


#: Copies of the (n_components, n_features, n_features) parameters a fit holds at once, per restart:
#: covariances, precisions, their Cholesky factors, and the second-moment statistics being merged.
PARAMETER_COPIES = 4


def check_parameter_memory(n_components: int, n_features: int, covariance_type: str, n_init: int,
                           n_samples: int, available: int | None = None) -> None:
    """Refuse a fit whose parameters alone cannot fit in memory, before anything is allocated.

    'full' holds ``n_components × n_features²`` floats per copy and 'tied'
    ``n_features²``; a (features, samples) array read the wrong way round asks
    for terabytes. ``available``: bytes of memory available (default: psutil's).
    """
    per_copy = {"full": n_components * n_features**2, "tied": n_features**2}.get(covariance_type, 0) * 8
    needed = PARAMETER_COPIES * per_copy * max(n_init, 1)
    if needed == 0:
        return
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if needed <= available:
        return
    shape = f"{n_components} × {n_features}²" if covariance_type == "full" else f"{n_features}²"
    hint = (f" X has more features ({n_features}) than rows ({n_samples}): is it transposed?"
            if n_features > n_samples else "")
    raise MemoryError(
        f"covariance_type={covariance_type!r} with {n_components} components of {n_features} features needs about "
        f"{needed / 1e9:.1f} GB for its parameters ({PARAMETER_COPIES} copies of {shape} float64 per restart, "
        f"n_init={n_init}), more than the {available / 1e9:.1f} GB of memory available; use covariance_type='diag' "
        f"or 'spherical', fewer features or fewer restarts.{hint}"
    )
