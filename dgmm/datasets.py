"""Synthetic data sets written chunk by chunk (never held whole in memory)."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np


def blob_parameters(n_components: int, n_features: int, seed: int = 0, spread: float = 8.0):
    """Means and per-component scales of a well-separated synthetic mixture."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-spread, spread, size=(n_components, n_features))
    scales = rng.uniform(0.5, 1.5, size=(n_components, n_features))
    weights = rng.dirichlet(np.full(n_components, 5.0))
    return weights, means, scales


def correlated_mixture(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of a fixed mixture with correlated components: weights 0.4, 0.3, 0.2, 0.1; four
    full-covariance components in 3-D, two of them overlapping (the stream of the online-EM tests
    and ``bench/bench_online.py``)."""
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    params = np.random.default_rng(0)
    means = params.normal(scale=4.0, size=(4, 3))
    covariances = []
    for _ in range(4):
        A = params.normal(size=(3, 3))
        covariances.append(A @ A.T + 0.3 * np.eye(3))
    labels = rng.choice(4, size=n_samples, p=weights)
    X = np.empty((n_samples, 3))
    for k in range(4):
        rows = labels == k
        X[rows] = rng.multivariate_normal(means[k], covariances[k], size=int(rows.sum()))
    return X


def _blob_chunk(block_id, rows, n_features, weights, means, scales, seed, dtype):
    rng = np.random.default_rng([seed, block_id])
    labels = rng.choice(len(weights), size=rows, p=weights)
    X = means[labels] + rng.standard_normal((rows, n_features)) * scales[labels]
    return X.astype(dtype)


def blobs(
    n_samples: int,
    n_features: int = 8,
    n_components: int = 4,
    chunk_rows: int = 100_000,
    seed: int = 0,
    dtype="float64",
) -> da.Array:
    """A lazy dask array of rows drawn from a diagonal Gaussian mixture.

    Each chunk is generated from ``(seed, chunk index)``, so the array is
    reproducible and never materialised as a whole.
    """
    weights, means, scales = blob_parameters(n_components, n_features, seed)
    chunks = [chunk_rows] * (n_samples // chunk_rows)
    if n_samples % chunk_rows:
        chunks.append(n_samples % chunk_rows)
    blocks = [
        da.from_delayed(
            _delayed_chunk(i, rows, n_features, weights, means, scales, seed, np.dtype(dtype)),
            shape=(rows, n_features),
            dtype=dtype,
        )
        for i, rows in enumerate(chunks)
    ]
    return da.concatenate(blocks, axis=0)


def _delayed_chunk(*args):
    import dask

    return dask.delayed(_blob_chunk, pure=True)(*args)


def write_blobs_zarr(path: str | os.PathLike, n_samples: int, n_features: int = 8, n_components: int = 4,
                     chunk_rows: int = 100_000, seed: int = 0, dtype="float64", overwrite: bool = False,
                     compressor: str = "default", zarr_format: int = 3) -> str:
    """Write :func:`blobs` to a Zarr array at ``path``, chunk by chunk.

    The array is written to ``path + '.tmp'`` and renamed when complete, so an
    interrupted write never leaves a data set that looks finished. It is
    compressed with Blosc-LZ4 and byte shuffle unless ``compressor`` says
    otherwise (:func:`dgmm.io.zarr_compressors`: 'default', 'blosc-lz4',
    'blosc-zstd', 'zstd' or 'none'); ``zarr_format`` is 3 (default) or 2.
    """
    import shutil

    from .io import zarr_compressors

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        return path
    compressors = zarr_compressors(dtype, compressor, zarr_format)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    X = blobs(n_samples, n_features, n_components, chunk_rows, seed, dtype)
    X.to_zarr(tmp, overwrite=True, zarr_format=zarr_format, compressors=compressors)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
