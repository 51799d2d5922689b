"""Fitted models in a safe, open file format, and conversion to and from scikit-learn.

A model file is an ``.npz`` archive (readable with ``numpy.load(path,
allow_pickle=False)``) holding four arrays -- ``weights``, ``means``,
``covariances``, ``precisions_cholesky`` -- and ``meta``, a JSON document
with the format name and version, the dgmm version, the covariance type, the
estimator's parameters, the fitted scalars (``n_iter_``, ``lower_bound_``,
``lower_bounds_``, ``converged_``, feature names) and free-form fit metadata
(data source, timing, ...). Nothing is ever pickled or unpickled.

Writes are atomic: a local file is written to a temporary name, fsynced and
renamed; a remote object (``s3://...``) is written with one PUT, which object
stores commit atomically. Loading checks the format version, every array's
shape and dtype (from the ``.npy`` headers, before reading the data) and that
the covariances are positive definite and consistent with the precisions.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from ._version import __version__
from .checkpoint import check_parameter_values, parameter_shapes, read_npz_header, read_npz_meta
from .chunk import COVARIANCE_TYPES
from .io import _local, is_url, write_bytes

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelFormatError", "from_sklearn", "load_model", "read_model_metadata",
           "save_model", "to_sklearn"]

FORMAT = "dgmm-model"
FORMAT_VERSION = 1
_ARRAYS = ("weights", "means", "covariances", "precisions_cholesky")
#: Estimator parameters stored in the file (JSON scalars only; init arrays, callbacks, checkpoints are not).
_PARAMS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
           "random_state", "chunk_size", "split_every", "init_sample_size")
#: Largest model read: guards against files that claim absurd shapes.
MAX_MODEL_ELEMENTS = 2**28


class ModelFormatError(ValueError):
    """A model file that cannot be loaded: corrupt, inconsistent, or from a newer format."""



def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)  # JSON has no inf/nan; keep them readable
    return value


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def save_model(model, path: str | os.PathLike, *, metadata: dict | None = None,
               storage_options: dict | None = None) -> str:
    """Save a fitted :class:`dgmm.GaussianMixture` (or sklearn's) to ``path``, atomically.

    Parameters
    ----------
    model : dgmm.GaussianMixture or sklearn.mixture.GaussianMixture
        A fitted model.
    path : str or path-like
        A local file (conventionally ``.npz``) or an fsspec URL.
    metadata : dict, default=None
        JSON-serialisable fit metadata stored under ``meta['fit']`` (data
        source, timing, ...). The estimator's own history (``n_iter_``,
        ``lower_bounds_``, ...) is always stored.
    storage_options : dict, default=None
        Passed to fsspec for URLs.

    Returns
    -------
    path : str

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the model is not fitted.

    Examples
    --------
    >>> import numpy as np
    >>> from dgmm import GaussianMixture, save_model, load_model
    >>> gm = GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(100, 2)))
    >>> save_model(gm, "model.npz")  # doctest: +SKIP
    'model.npz'
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(model)
    path = os.fspath(path)
    params = model.get_params()
    kind = params["covariance_type"]
    means = np.asarray(model.means_)
    random_state = params.get("random_state")
    stored_params = {k: params[k] for k in _PARAMS if k in params}
    stored_params["random_state"] = int(random_state) if isinstance(random_state, (int, np.integer)) else None
    feature_names = getattr(model, "feature_names_in_", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dgmm_version": __version__,
        "covariance_type": kind,
        "n_components": int(means.shape[0]),
        "n_features": int(means.shape[1]),
        "dtype": str(means.dtype),
        "params": _jsonable(stored_params),
        "fitted": {
            "converged": bool(getattr(model, "converged_", False)),
            "n_iter": int(getattr(model, "n_iter_", 0)),
            "lower_bound": _jsonable(float(getattr(model, "lower_bound_", float("nan")))),
            "lower_bounds": _jsonable([float(v) for v in getattr(model, "lower_bounds_", [])]),
            "feature_names": None if feature_names is None else [str(v) for v in feature_names],
        },
        "fit": _jsonable(dict(metadata or {})),
    }
    arrays = {name: np.asarray(getattr(model, name + "_")) for name in _ARRAYS}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta, default=str)), **arrays)  # metadata never costs a fit
    write_bytes(path, buffer.getvalue(), storage_options)  # atomically: a renamed file, or one PUT
    return path


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _read_bytes(path: str, storage_options: dict | None) -> bytes:
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    with open(_local(path), "rb") as f:
        return f.read()


def _array_header(archive: zipfile.ZipFile, name: str, path: str):
    try:
        return read_npz_header(archive, name)
    except KeyError:
        raise ModelFormatError(f"{path}: the model file has no '{name}' array") from None
    except Exception as exc:  # a corrupt header or zip entry
        raise ModelFormatError(f"{path}: corrupt '{name}' array ({type(exc).__name__}: {exc})") from None


def read_model_metadata(path: str | os.PathLike, *, storage_options: dict | None = None) -> dict:
    """The JSON metadata of a model file, checked for format and version (arrays are not read).

    Raises
    ------
    dgmm.model_io.ModelFormatError
        If the file is not a dgmm model or was written by a newer format version.
    """
    meta, _ = _open_model(os.fspath(path), storage_options)
    return meta


def _open_model(path: str, storage_options: dict | None):
    try:
        payload = _read_bytes(path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        meta = read_npz_meta(archive)  # a 0-d JSON string of bounded size, never unpickled
    except KeyError:
        raise ModelFormatError(f"{path}: not a dgmm model file (no 'meta' entry)") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError, zlib errors, NotImplementedError and friends
        raise ModelFormatError(f"{path}: not a readable dgmm model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not a dgmm model file (format {_get(meta, 'format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFormatError(f"{path}: invalid model format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} was written by a newer dgmm ({meta.get('dgmm_version')!r}, model format {version}); "
            f"this dgmm {__version__} reads up to format {FORMAT_VERSION}: upgrade dgmm to load it"
        )
    return meta, archive


def _get(meta, key):
    return meta.get(key) if isinstance(meta, dict) else None


def load_model(path: str | os.PathLike, *, storage_options: dict | None = None):
    """Load a model saved by :func:`save_model` as a fitted :class:`dgmm.GaussianMixture`.

    Never unpickles. Checks the format version, the shapes and dtypes of
    every array before reading it, finiteness, that the weights sum to one,
    that the covariances are positive definite and that the precision
    Cholesky factors match them.

    Parameters
    ----------
    path : str or path-like
        A local file or an fsspec URL.
    storage_options : dict, default=None
        Passed to fsspec for URLs.

    Returns
    -------
    model : dgmm.GaussianMixture
        Fitted: ``predict``, ``score_samples``, ``sample`` ... work at once.

    Raises
    ------
    dgmm.model_io.ModelFormatError
        If the file is corrupt, inconsistent, or from a newer format version.
    FileNotFoundError
        If there is no such file.
    """
    return load_model_and_metadata(path, storage_options=storage_options)[0]


def load_model_and_metadata(path: str | os.PathLike, *, storage_options: dict | None = None):
    """:func:`load_model` and :func:`read_model_metadata` from ONE read of the file (one request for a URL).

    Returns
    -------
    model : dgmm.GaussianMixture
    meta : dict
    """
    from .estimator import GaussianMixture

    path = os.fspath(path)
    meta, archive = _open_model(path, storage_options)

    def bad(message):
        return ModelFormatError(f"{path}: {message}")

    kind = meta.get("covariance_type")
    if kind not in COVARIANCE_TYPES:
        raise bad(f"invalid covariance_type {kind!r}")
    n_components, n_features = meta.get("n_components"), meta.get("n_features")
    for name, value in (("n_components", n_components), ("n_features", n_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"invalid {name} {value!r}")
    shapes = parameter_shapes(kind, n_components, n_features)
    if sum(int(np.prod(s)) for s in shapes.values()) > MAX_MODEL_ELEMENTS:
        raise bad(f"implausibly large model ({n_components} components x {n_features} features)")
    dtype = None
    for name, expected in shapes.items():
        shape, array_dtype = _array_header(archive, name, path)
        if tuple(shape) != expected:
            raise bad(f"'{name}' has shape {tuple(shape)}, expected {expected} for {kind!r} covariances")
        if array_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise bad(f"'{name}' has dtype {array_dtype}, expected float32 or float64")
        dtype = array_dtype if dtype is None else np.promote_types(dtype, array_dtype)
    try:
        arrays = {}
        for name in shapes:
            with archive.open(name + ".npy") as f:
                arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, zipfile.BadZipFile (CRC), zlib errors
        raise bad(f"corrupt array data ({type(exc).__name__}: {exc})") from None
    _check_parameters(arrays, kind, bad)

    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    fitted = meta.get("fitted") if isinstance(meta.get("fitted"), dict) else {}
    _check_fitted_scalars(fitted, bad)
    kwargs = {k: params[k] for k in _PARAMS if k in params}
    kwargs["n_components"], kwargs["covariance_type"] = n_components, kind
    model = GaussianMixture()
    try:
        model.set_params(**kwargs)
        model._validate_params()
    except (ValueError, TypeError) as exc:
        raise bad(f"invalid stored parameters ({exc})") from None
    _set_fitted_attributes(model, arrays, kind, dtype)
    model.converged_ = bool(fitted.get("converged", False))
    model.n_iter_ = int(fitted.get("n_iter", 0))
    model.lower_bound_ = np.float64(_to_float(fitted.get("lower_bound", "nan")))
    model.lower_bounds_ = [np.float64(_to_float(v)) for v in fitted.get("lower_bounds", [])]
    model.n_features_in_ = n_features
    names = fitted.get("feature_names")
    if names is not None:
        if not (isinstance(names, list) and len(names) == n_features and all(isinstance(v, str) for v in names)):
            raise bad(f"invalid feature_names: expected {n_features} strings")
        model.feature_names_in_ = np.asarray(names, dtype=object)
    return model, meta


def _check_fitted_scalars(fitted: dict, bad) -> None:
    def number(value):  # JSON numbers, or the strings save_model writes for inf / nan
        if isinstance(value, str):
            return value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan")
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    n_iter = fitted.get("n_iter", 0)
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0:
        raise bad(f"invalid n_iter {n_iter!r}: expected an int >= 0")
    if not isinstance(fitted.get("converged", False), bool):
        raise bad(f"invalid converged {fitted.get('converged')!r}: expected true or false")
    if not number(fitted.get("lower_bound", "nan")):
        raise bad(f"invalid lower_bound {fitted.get('lower_bound')!r}: expected a number")
    lower_bounds = fitted.get("lower_bounds", [])
    if not isinstance(lower_bounds, list) or not all(number(v) for v in lower_bounds):
        raise bad("invalid lower_bounds: expected a list of numbers")


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _check_parameters(arrays: dict, kind: str, bad) -> None:
    check_parameter_values(arrays, kind, bad)
    covariances = arrays["covariances"].astype(np.float64)
    prec_chol = arrays["precisions_cholesky"].astype(np.float64)
    tol = 1e-2 if arrays["covariances"].dtype == np.float32 else 1e-4
    if kind in ("full", "tied"):
        cov_stack = covariances[None] if kind == "tied" else covariances
        chol_stack = prec_chol[None] if kind == "tied" else prec_chol
        eye = np.eye(cov_stack.shape[-1])
        for k, (cov, chol) in enumerate(zip(cov_stack, chol_stack)):
            where = "" if kind == "tied" else f" of component {k}"
            if not np.allclose(cov @ (chol @ chol.T), eye, rtol=0, atol=tol):
                raise bad(f"the precision Cholesky factor{where} does not match the covariance")
    elif not np.allclose(covariances * prec_chol**2, 1.0, rtol=0, atol=tol):
        raise bad("the precision Cholesky factors do not match the covariances")


def _set_fitted_attributes(model, arrays: dict, kind: str, dtype) -> None:
    from .chunk import precisions_from_cholesky

    model.weights_ = arrays["weights"].astype(dtype, copy=False)
    model.means_ = arrays["means"].astype(dtype, copy=False)
    model.covariances_ = arrays["covariances"].astype(dtype, copy=False)
    model.precisions_cholesky_ = arrays["precisions_cholesky"].astype(dtype, copy=False)
    model.precisions_ = precisions_from_cholesky(
        arrays["precisions_cholesky"].astype(np.float64), kind).astype(dtype)


# ---------------------------------------------------------------------------
# scikit-learn
# ---------------------------------------------------------------------------

_SKLEARN_PARAMS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
                   "random_state")
_FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_", "converged_", "n_iter_",
           "lower_bound_", "lower_bounds_", "n_features_in_", "feature_names_in_")


def _converted(model, cls):
    """A ``cls`` instance with the sklearn-compatible parameters and copies of the fitted attributes of ``model``."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(model)
    params = model.get_params()
    target = cls(**{k: params[k] for k in _SKLEARN_PARAMS})
    for name in _FITTED:
        if hasattr(model, name):
            value = getattr(model, name)
            setattr(target, name, value.copy() if isinstance(value, (np.ndarray, list)) else value)
    return target


def to_sklearn(model: Any):
    """A fitted :class:`sklearn.mixture.GaussianMixture` with the parameters of a fitted dgmm model.

    Fit big, serve small: the result predicts, scores and samples in memory
    exactly as the dgmm model does on NumPy input.

    Parameters
    ----------
    model : dgmm.GaussianMixture
        A fitted model.

    Returns
    -------
    sklearn.mixture.GaussianMixture

    Examples
    --------
    >>> import numpy as np
    >>> from dgmm import GaussianMixture, to_sklearn
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> sk = to_sklearn(GaussianMixture(2, random_state=0).fit(X))
    >>> sk.predict(X[:3]).shape
    (3,)
    """
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    return _converted(model, SkGaussianMixture)


def from_sklearn(model: Any):
    """A fitted :class:`dgmm.GaussianMixture` with the parameters of a fitted sklearn model.

    Parameters
    ----------
    model : sklearn.mixture.GaussianMixture
        A fitted model.

    Returns
    -------
    dgmm.GaussianMixture

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.mixture import GaussianMixture as SkGaussianMixture
    >>> from dgmm import from_sklearn
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> gm = from_sklearn(SkGaussianMixture(2, random_state=0).fit(X))
    >>> gm.predict(X[:3]).shape
    (3,)
    """
    from .estimator import GaussianMixture

    gm = _converted(model, GaussianMixture)
    if not hasattr(gm, "lower_bounds_"):
        gm.lower_bounds_ = []
    return gm
