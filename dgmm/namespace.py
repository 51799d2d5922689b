"""Array libraries of chunks: NumPy on the host, CuPy on a GPU.

The chunk kernels (:mod:`dgmm.chunk`) are written once, against the library
of their input (:func:`array_module`); everything else in dgmm handles host
NumPy arrays, and :func:`to_host` brings small results (and, where a step
runs on the host, whole chunks) back. :func:`to_gpu` makes a dask array whose
chunks move to the GPU as they are read. CuPy is optional (``dgmm[gpu]``):
nothing here imports it unless a CuPy array is met or asked for.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

__all__ = ["array_module", "is_gpu_array", "on_device", "to_gpu", "to_host"]


def array_module(x):
    """The array library of ``x`` whose functions the chunk kernels call: NumPy, or CuPy for GPU arrays.

    The library is recognised with :mod:`array_api_compat` and returned itself,
    not its strict array-API wrapper: the kernels write into preallocated
    buffers (``out=``, ``einsum``, ``matmul``), which NumPy and CuPy share but
    the array API standard leaves out. Anything that is not an array of another
    library (lists, memory maps, NumPy scalars) counts as NumPy. Statistics
    always come back as float64 NumPy arrays (:func:`to_host`).

    Raises
    ------
    TypeError
        For arrays of other libraries (PyTorch, JAX, dask, sparse).
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return np
    if is_gpu_array(x):
        import cupy

        return cupy
    other = (
        array_api_compat.is_torch_array,
        array_api_compat.is_jax_array,
        array_api_compat.is_dask_array,
        array_api_compat.is_pydata_sparse_array,
    )
    if not any(test(x) for test in other):
        return np
    raise TypeError(
        "dgmm's chunk kernels run on NumPy or CuPy arrays; got a chunk of type "
        f"{type(x).__module__}.{type(x).__name__}."
        " Convert the chunks with X.map_blocks(numpy.asarray) or X.map_blocks(cupy.asarray)."
    )


def is_gpu_array(x) -> bool:
    """True for CuPy arrays (held in GPU memory); never imports CuPy."""
    return array_api_compat.is_cupy_array(x)


def to_host(x) -> np.ndarray:
    """``x`` as a NumPy array (a copy from the device for CuPy arrays; NumPy arrays unchanged)."""
    if isinstance(x, np.ndarray):
        return x
    if is_gpu_array(x):
        return x.get()
    return np.asarray(x)


def on_device(xp, x):
    """Host array ``x`` in library ``xp`` (the same object for NumPy)."""
    return x if xp is np or x is None else xp.asarray(x)


def _import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise ImportError(
            "device 'gpu' needs CuPy: install dgmm[gpu] (or a cupy-cudaXXx wheel matching your CUDA)."
        ) from error
    return cupy


def to_gpu(X):
    """A lazy dask array whose chunks are CuPy arrays, copied to the GPU as they are read.

    Parameters
    ----------
    X : dask.array.Array, Zarr array or ndarray of shape (n_samples, n_features)
        NumPy-backed input (a Zarr array is opened lazily, chunk by chunk).

    Returns
    -------
    dask.array.Array
        The same rows and chunks, CuPy-backed: :class:`dgmm.GaussianMixture`
        runs its E-step kernels on the GPU for it; fitted attributes stay NumPy.

    Raises
    ------
    ImportError
        If CuPy is not installed.

    Examples
    --------
    >>> import dask.array as da  # doctest: +SKIP
    >>> from dgmm import GaussianMixture, to_gpu  # doctest: +SKIP
    >>> X = to_gpu(da.from_zarr("data.zarr"))  # doctest: +SKIP
    >>> GaussianMixture(16).fit(X)  # doctest: +SKIP
    """
    import dask.array as da

    cupy = _import_cupy()
    if not isinstance(X, da.Array):
        X = da.from_zarr(X) if (type(X).__module__ or "").startswith("zarr") else da.asarray(X)
    return X.map_blocks(cupy.asarray, dtype=X.dtype, meta=cupy.empty((0,) * X.ndim, dtype=X.dtype))
