"""Inputs opened lazily as dask arrays, and per-row outputs written chunk by chunk.

Readers never load the data: they read metadata (Zarr array metadata, Parquet
footers, the ``.npy`` header) and return a dask array whose chunks read the
rows when computed, on whichever worker runs them.

- **Zarr** v3 and v2, by path or fsspec URL; an array inside a group through ``component``.
- **Parquet**, one file or a directory of files; each row group is one chunk
  (or consecutive row groups of a file up to ``chunk_rows``), with the row
  counts taken from the footers, so the array has known chunks without reading
  the data twice; ``columns`` selects columns (default: every numeric one).
- **.npy**, memory-mapped (local files) or read by byte ranges (URLs).

Writers compute, chunk by chunk on the workers, into a staging location next
to the target (``.NAME.dgmm-staging-*``), write a completion marker last and
only then commit: a local directory is renamed into place; on object stores
the staged objects are moved and the marker is written at the target last.
The marker of a Parquet output is a ``_SUCCESS`` file; that of a Zarr output
is the ``dgmm`` entry of the group's attributes, whose metadata document
(``zarr.json``) is written last, so the group holds nothing zarr does not
know. An interrupted write never leaves an output that looks complete. Zarr outputs
are compressed with Blosc and byte shuffle by default (:func:`zarr_compressors`).

``storage_options`` are passed to fsspec; credentials come from the
environment or the provider chains of fsspec / s3fs, never from a config.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import dask
import dask.array as da
import numpy as np

from ._version import __version__
from .checkpoint import _host_tag, _is_running, atomic_write_bytes, left_by_dead_writers
from .namespace import to_host

__all__ = [
    "COMPRESSORS",
    "InputSelectionError",
    "COMMITTING_MARKER",
    "SUCCESS_MARKER",
    "describe_source",
    "format_from_suffix",
    "input_feature_names",
    "input_format",
    "is_complete",
    "MissingExtraError",
    "is_url",
    "open_as",
    "open_input",
    "open_npy",
    "open_parquet",
    "ParquetColumns",
    "parquet_columns",
    "parquet_feature_names",
    "open_zarr",
    "remove_stale_staging",
    "replace_refusal",
    "write_predictions",
    "write_table",
    "zarr_component",
    "zarr_compressors",
]

logger = logging.getLogger(__name__)

#: Written last into every Parquet output (and Zarr outputs of dgmm 0.1); an output without it is not complete.
SUCCESS_MARKER = "_SUCCESS"
#: On object stores, the object a commit writes first into its target and removes last: a target
#: holding it is an output dgmm was committing (incomplete, and dgmm's own to replace).
COMMITTING_MARKER = "_DGMM_COMMITTING"
#: A Zarr group's own metadata documents (v3, then v2); a Zarr output's are committed last.
ZARR_GROUP_METADATA = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")
#: Default target size of an ``.npy`` chunk: the largest, and the smallest a file is cut into
#: (files of less than ``NPY_MIN_CHUNKS`` × that are cut into ``NPY_MIN_CHUNKS`` chunks of at least it).
NPY_CHUNK_BYTES = 64 * 2**20
NPY_MIN_CHUNK_BYTES = 8 * 2**20
#: Chunks a mid-sized ``.npy`` file is cut into at least, so that several workers share its passes.
NPY_MIN_CHUNKS = 16
#: Smallest output chunk written (bytes of its widest array): tiny input chunks are merged up to it.
MIN_OUTPUT_CHUNK_BYTES = 4 * 2**20
#: Zarr chunks (rows × all columns, as stored) smaller than this are read several to a task, up to
#: ``MERGED_ZARR_CHUNK_BYTES`` and as long as the array keeps ``MIN_ZARR_TASKS`` tasks (for the
#: workers to share): a task per tiny chunk costs more than reading it (10-row chunks made an
#: iteration 16× slower than 1,000-row ones).
MIN_ZARR_CHUNK_BYTES = 2**20
MERGED_ZARR_CHUNK_BYTES = 8 * 2**20
MIN_ZARR_TASKS = 64
#: A Parquet chunk (one row group, which is never split) larger than this as an array gets a warning.
LARGE_PARQUET_CHUNK_BYTES = 512 * 2**20
#: Names accepted for the compression of dgmm's Zarr outputs (see :func:`zarr_compressors`).
COMPRESSORS = ("default", "blosc-lz4", "blosc-zstd", "zstd", "none")
#: Parquet footers read at once when a directory is opened (:func:`open_parquet`).
FOOTER_READERS = 16


class InputSelectionError(ValueError):
    """The input exists, but what a setting selects in it does not fit: a column, a Zarr component, the format.

    ``key`` names the setting (``'input.columns'``, ``'input.component'`` or
    ``'input.format'``), so that the ``dgmm`` command reports it as a config error.
    """

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def is_url(path: str) -> bool:
    """True for fsspec URLs with a protocol other than ``file://`` (``s3://``, ``gs://``, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


#: Packages whose exceptions are a storage backend's errors (a network, a credential, a missing bucket),
#: not dgmm's bugs nor the data's: reported as they are, in one line.
STORAGE_ERROR_PACKAGES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "fsspec", "requests",
                          "urllib3", "google")


def is_storage_error(exc: BaseException) -> bool:
    """True when ``exc`` (or a class it derives from) comes from an object-store client library."""
    return any(cls.__module__.split(".")[0] in STORAGE_ERROR_PACKAGES for cls in type(exc).__mro__)


def write_bytes(path: str, payload: bytes, storage_options: Mapping | None = None) -> None:
    """Write ``payload`` to a file atomically: a local file through a renamed temporary file
    (:func:`dgmm.checkpoint.atomic_write_bytes`), an object-store URL in one PUT."""
    if is_url(path):
        fs, root = _filesystem(path, storage_options)
        fs.pipe_file(root, payload)
    else:
        atomic_write_bytes(_local(path), payload)


def missing_bucket(fs, root: str) -> str | None:
    """The bucket of an object-store ``root`` when it does not exist, else None (also when listing buckets is
    not allowed: writing will say whether it may write). fsspec's ``makedirs`` would create it."""
    bucket = root.split("/", 1)[0]
    try:
        return None if fs.exists(bucket) else bucket
    except PermissionError:
        return None


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _filesystem(path: str, storage_options: Mapping | None):
    import fsspec

    return fsspec.core.url_to_fs(path, **dict(storage_options or {}))


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def open_input(path: str, *, format: str = "auto", component: str | None = None,
               columns: Sequence[str] | None = None, storage_options: Mapping | None = None,
               chunk_rows: int | None = None) -> da.Array:
    """Open a Zarr array, Parquet data set or ``.npy`` file as a lazy 2-D dask array.

    Parameters
    ----------
    path : str
        Local path or fsspec URL (``s3://bucket/table.zarr``, ...).
    format : {'auto', 'zarr', 'parquet', 'npy'}, default='auto'
        'auto' goes by the suffix (``.zarr``, ``.parquet``/``.parq``/``.pq``, ``.npy``),
        then by what the location holds (Zarr metadata, Parquet files).
    component : str, default=None
        Zarr only: the array inside a group.
    columns : sequence of str, default=None
        Parquet only: the columns, in order (default: every numeric column).
    storage_options : mapping, default=None
        Passed to fsspec.
    chunk_rows : int, default=None
        ``.npy``: rows per chunk (default: about 64 MiB). Parquet: merge
        consecutive row groups of a file up to this many rows (default: one
        chunk per row group). Zarr: read as many whole stored chunks to a task
        as fit in this many rows (default: the stored chunks, except that
        chunks under :data:`MIN_ZARR_CHUNK_BYTES` are read several to a task).

    Returns
    -------
    dask.array.Array of shape (n_samples, n_features)
        Lazy, with known row chunks.

    Raises
    ------
    ValueError
        If the location is not a supported data set, or holds no usable array.
    FileNotFoundError
        If nothing is there.
    """
    fmt = input_format(path, format=format, storage_options=storage_options)
    return open_as(fmt, path, component=component, columns=columns, storage_options=storage_options,
                   chunk_rows=chunk_rows)


def open_as(fmt: str, path: str, *, component: str | None = None, columns: Sequence[str] | None = None,
            storage_options: Mapping | None = None, chunk_rows: int | None = None) -> da.Array:
    """:func:`open_input` for a format :func:`input_format` has already resolved (and checked): no second look."""
    if fmt == "zarr":
        return open_zarr(path, component=component, storage_options=storage_options, chunk_rows=chunk_rows)
    if fmt == "parquet":
        return open_parquet(path, columns=columns, storage_options=storage_options, chunk_rows=chunk_rows)
    if fmt == "npy":
        return open_npy(path, storage_options=storage_options, chunk_rows=chunk_rows)
    raise ValueError(f"unsupported input format {fmt!r}")


def describe_source(path: str, *, format: str = "auto", component: str | None = None,
                    columns: Sequence[str] | None = None, feature_names: Sequence[str] | None = None) -> dict:
    """A JSON-serialisable description of an input, for model metadata.

    ``columns`` is the selection as given; ``feature_names`` the names of the
    columns read (:func:`input_feature_names`), None where the format has none.
    """
    return {"path": path, "format": format, "component": component,
            "columns": None if columns is None else list(columns),
            "feature_names": None if feature_names is None else [str(name) for name in feature_names]}


def input_format(path: str, *, format: str = "auto", storage_options: Mapping | None = None) -> str:
    """The format :func:`open_input` reads ``path`` as: ``format``, or for 'auto' the one the path's suffix
    or contents tell ('zarr', 'parquet' or 'npy').

    Raises :class:`InputSelectionError` (key ``input.format``) when a given
    ``format`` is not what the path holds (Zarr metadata, Parquet or ``.npy``
    magic bytes), so the error names the setting, not a reader's complaint.
    """
    if format == "auto":
        return _detect_format(path, storage_options)
    if format in _FORMAT_NAMES:
        fs, root = _filesystem(path, storage_options)
        found = _format_by_contents(fs, root, expect=format)
        if found == "zip":
            raise _zip_error(path)
        if found is None and format == "npy" and fs.isdir(root):
            raise InputSelectionError(f"{path} is a directory, not a .npy file; set input.format to what it "
                                      "holds, or 'auto'", "input.format")
        if found is not None and found != format:
            raise InputSelectionError(
                f"{path} holds {_FORMAT_NAMES[found]} data, not {_FORMAT_NAMES[format]}; set input.format to "
                f"{found!r} or 'auto'", "input.format")
    return format


def input_feature_names(path: str, *, format: str = "auto", columns: Sequence[str] | None = None,
                        storage_options: Mapping | None = None) -> list[str] | None:
    """The names of the columns :func:`open_input` reads, or None for Zarr and ``.npy`` inputs (unnamed).

    Parquet: ``columns`` when given, else the numeric columns of the first
    file's schema (one footer read; :func:`open_parquet` requires every file
    to have them).
    """
    if input_format(path, format=format, storage_options=storage_options) != "parquet":
        return None
    return parquet_feature_names(path, columns=columns, storage_options=storage_options)


def parquet_feature_names(path: str, *, columns: Sequence[str] | None = None,
                          storage_options: Mapping | None = None) -> list[str] | None:
    """:func:`input_feature_names` of a path known to be Parquet (no format check)."""
    if columns is not None:
        return [str(name) for name in columns]
    fs, root = _filesystem(path, storage_options)
    files = list(_parquet_files(fs, root)) if fs.isdir(root) else [root]
    if not files:
        return None
    # The first file with rows, as the reader skips files without any (an empty part.0 written by a
    # DataFrame with no columns, or with other ones): one footer, then FOOTER_READERS at a time.
    first, start, batch = None, 0, 1
    while start < len(files):
        for meta in _parquet_footers(fs, path, files[start : start + batch]):
            first = first or meta
            if meta.num_rows > 0:
                return _numeric_columns(meta.schema.to_arrow_schema())
        start, batch = start + batch, FOOTER_READERS
    return _numeric_columns(first.schema.to_arrow_schema())


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")  # dask's and Spark's
_SUFFIXES = (((".zarr",), "zarr"), (PARQUET_SUFFIXES, "parquet"), ((".npy",), "npy"))


def format_from_suffix(path: str) -> str | None:
    """The format a path's suffix names: 'zarr', 'parquet' (.parquet, .parq or .pq), 'npy', or None for another suffix."""
    stem = path.rstrip("/").lower()
    for suffixes, fmt in _SUFFIXES:
        if stem.endswith(suffixes):
            return fmt
    return None


_FORMAT_NAMES = {"zarr": "Zarr", "parquet": "Parquet", "npy": ".npy"}


def _format_by_contents(fs, root: str, expect: str | None = None) -> str | None:
    """'zarr', 'parquet' or 'npy' by what ``root`` holds (metadata files, magic bytes), None if unknown or absent.

    ``expect='parquet'`` skips listing a directory that holds no Zarr metadata
    (the reader lists it anyway): only a contradiction is looked for.
    """
    if not fs.exists(root):
        return None
    if fs.isdir(root):
        if any(fs.exists(posixpath.join(root, name)) for name in ("zarr.json", ".zarray", ".zgroup")):
            return "zarr"
        return "parquet" if expect != "parquet" and _parquet_files(fs, root) else None
    with fs.open(root, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    return "parquet" if head[:4] == b"PAR1" else None


def _zip_error(path: str) -> InputSelectionError:
    """A zip file given as the input: a .npz archive, or (perhaps) a zipped Zarr store."""
    if path.lower().endswith(".npz"):
        return InputSelectionError(f"{path} is a .npz archive, which dgmm does not read: save the array with "
                                   "numpy.save (a .npy file) or to Zarr", "input.path")
    return InputSelectionError(f"{path} is a zip file; a zipped Zarr store opens through fsspec's zip "
                               "filesystem: input.path: zip://::file:///absolute/path/to/store.zip", "input.path")


def _detect_format(path: str, storage_options: Mapping | None) -> str:
    fmt = format_from_suffix(path)
    if fmt is not None:
        return fmt
    fs, root = _filesystem(path, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path}: no such file or directory")
    fmt = _format_by_contents(fs, root)
    if fmt == "zip":
        raise _zip_error(path)
    if fmt is not None:
        return fmt
    raise InputSelectionError(f"{path}: cannot tell the format (neither Zarr, Parquet nor .npy); set input.format",
                              "input.format")


# -- Zarr ---------------------------------------------------------------------


def open_zarr(path: str, *, component: str | None = None, storage_options: Mapping | None = None,
              chunk_rows: int | None = None) -> da.Array:
    """Open a Zarr (v3 or v2) array, or an array inside a group, as a lazy dask array.

    An array packed by xarray (``scale_factor``, ``add_offset``, ``_FillValue``,
    ``missing_value``, ``_Unsigned``) is decoded as ``xr.open_zarr`` decodes
    it: float64 (float32 kept when only masked), fill values as NaN. Chunks under
    :data:`MIN_ZARR_CHUNK_BYTES` are read several to a task; ``chunk_rows``
    reads as many whole stored chunks to a task as fit in that many rows.

    Raises
    ------
    ValueError
        If ``path`` holds a group and ``component`` does not name one of its arrays.
    FileNotFoundError
        If there is no Zarr node at ``path`` (and ``component``).
    """
    return open_zarr_component(path, component=component, storage_options=storage_options, chunk_rows=chunk_rows)[0]


def open_zarr_component(path: str, *, component: str | None = None, storage_options: Mapping | None = None,
                        chunk_rows: int | None = None) -> tuple[da.Array, str | None]:
    """:func:`open_zarr`, and the array it picked (:func:`zarr_component`) from the same look at the store."""
    node, picked = _zarr_array(path, component, storage_options)
    _warn_missing_chunks(path, node)
    options = dict(storage_options or {})
    chunks = _zarr_task_chunks(node, chunk_rows)
    name = "from-zarr-" + dask.base.tokenize(node, component, options, chunks)
    array = da.from_array(node, chunks, name=name, getitem=_read_zarr_block)
    decoding = _cf_decoding(node)
    if decoding is None:  # in this machine's byte order: '>f4' (a v2 array) is float32 to the model, as '<f4' is
        return (array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))), picked
    logger.info("%s: decoding the array's CF attributes as xarray does (%s)", path,
                ", ".join(f"{k}={v!r}" for k, v in decoding.items() if v is not None and v != []))
    dtype = np.dtype(np.float64)
    if node.dtype.newbyteorder("=") == np.float32 and decoding["scale_factor"] is None and \
            decoding["add_offset"] is None:
        dtype = np.dtype(np.float32)  # only masked: float32 stays, as in xarray
    return array.map_blocks(_cf_decode_block, dtype=dtype, out_dtype=dtype, **decoding), picked


#: Zarr arrays of at most this many chunks are checked for missing chunks (one listing of the array's keys;
#: on an object store a listing request returns 1,000 keys, hence the lower bound there).
MISSING_CHUNKS_CHECKED_UP_TO = 200_000
MISSING_CHUNKS_CHECKED_UP_TO_REMOTE = 20_000


def _warn_missing_chunks(path: str, node) -> None:
    """Warn when chunks of ``node`` are not in its store: Zarr reads them as the fill value.

    Zarr writes no chunk that holds only the fill value, so a gap can be deliberate;
    but it is also what an interrupted copy or upload leaves, whose rows would be
    fitted as that value without any error.
    """
    if node.nchunks > (MISSING_CHUNKS_CHECKED_UP_TO_REMOTE if is_url(path) else MISSING_CHUNKS_CHECKED_UP_TO):
        return
    try:
        missing = node.nchunks - node.nchunks_initialized
    except Exception:  # a hint only: a store that cannot list
        logger.debug("could not count the stored chunks of %s", path, exc_info=True)
        return
    if missing:
        logger.warning("%s: %d of %d chunks are not in the store and are read as the fill value %r; an interrupted "
                       "copy or upload leaves such gaps, whose rows would be fitted as that value (Zarr also omits "
                       "chunks that hold only the fill value: then the gap is deliberate)", path, missing,
                       node.nchunks, _python_scalar(node.fill_value))


def _python_scalar(value):
    """A NumPy scalar (a Zarr fill value) as the Python number it holds."""
    return value.item() if hasattr(value, "item") else value


def _zarr_task_chunks(node, chunk_rows: int | None = None) -> tuple:
    """Dask chunks of a Zarr array: its own, with tiny row chunks merged (:data:`MIN_ZARR_CHUNK_BYTES`,
    :data:`MERGED_ZARR_CHUNK_BYTES`, :data:`MIN_ZARR_TASKS`); with ``chunk_rows``, as many whole stored
    chunks as fit in that many rows (at least one: a stored chunk is never read in parts)."""
    rows = node.chunks[0]
    if chunk_rows is not None:
        return (rows * max(1, int(chunk_rows) // rows), node.chunks[1])
    chunk_bytes = rows * int(node.shape[1]) * node.dtype.itemsize
    if chunk_bytes >= MIN_ZARR_CHUNK_BYTES:
        return node.chunks
    n_chunks = -(-int(node.shape[0]) // rows)
    factor = min(MERGED_ZARR_CHUNK_BYTES // max(chunk_bytes, 1), n_chunks // MIN_ZARR_TASKS)
    return node.chunks if factor <= 1 else (rows * factor, node.chunks[1])


def _cf_decoding(node) -> dict | None:
    """The CF encoding xarray would undo on reading ``node`` (``scale_factor``, ``add_offset``, fill
    values, ``_Unsigned``), as keyword arguments of :func:`_cf_decode_block`; None when there is none.

    A Zarr v2 array that xarray wrote (``_ARRAY_DIMENSIONS``) keeps its ``_FillValue`` as the array's
    fill value, which xarray then masks; arrays that other tools wrote are read as they are.
    """
    attrs = dict(node.attrs)
    scale, offset = attrs.get("scale_factor"), attrs.get("add_offset")
    fills = []
    for key in ("_FillValue", "missing_value"):
        value = attrs.get(key)
        if value is not None:
            fills.extend(np.atleast_1d(value).tolist())
    if ("_FillValue" not in attrs and "_ARRAY_DIMENSIONS" in attrs and node.metadata.zarr_format == 2
            and node.fill_value is not None):
        fills.append(_python_scalar(node.fill_value))
    unsigned = str(attrs.get("_Unsigned", "")).lower() == "true" and node.dtype.kind == "i"
    fills = [f for f in fills if not (isinstance(f, float) and np.isnan(f))]  # NaN stays NaN as it is
    if scale is None and offset is None and not fills and not unsigned:
        return None
    return {"scale_factor": scale, "add_offset": offset, "fill_values": fills, "unsigned": unsigned}


def _cf_decode_block(block, out_dtype, scale_factor=None, add_offset=None, fill_values=(), unsigned=False):
    """One block decoded as xarray decodes it: fill values to NaN, then ``raw * scale_factor + add_offset``."""
    if unsigned:
        block = block.view(block.dtype.str.replace("i", "u"))
    missing = np.isin(block, fill_values) if len(fill_values) else None
    out = block.astype(out_dtype)
    if scale_factor is not None:
        out *= scale_factor
    if add_offset is not None:
        out += add_offset
    if missing is not None:
        out[missing] = np.nan
    return out


def zarr_component(path: str, *, component: str | None = None, storage_options: Mapping | None = None) -> str | None:
    """The array of a Zarr store :func:`open_zarr` reads: ``component``, or the one 2-D array of a group it picks
    when none is given (None for a store that is an array). Reads metadata only."""
    return _zarr_array(path, component, storage_options)[1]


def _zarr_array(path: str, component: str | None, storage_options: Mapping | None):
    """(the zarr.Array to read, its path in the store or None): ``component``, or a group's one 2-D array."""
    import zarr

    options = dict(storage_options or {})
    # A local path is made absolute here: the array (and its store) travel to workers that may run in
    # other directories, where a relative path names another place or nothing.
    store = path if is_url(path) else os.path.abspath(_local(path))
    kwargs = {"storage_options": options} if is_url(path) else {}

    def arrays_of(group) -> str:
        names = sorted(n for n, m in group.members(max_depth=None) if isinstance(m, zarr.Array) and m.ndim == 2)
        return ", ".join(repr(n) for n in names) or "none"

    try:
        node = zarr.open(store=store, mode="r", path=component, **kwargs)
    except (FileNotFoundError, KeyError):  # zarr's NodeNotFoundError is a FileNotFoundError
        root = None
        if component:
            with contextlib.suppress(Exception):
                root = zarr.open(store=store, mode="r", **kwargs)
        if isinstance(root, zarr.Group):  # the data is there; the setting names nothing in it
            raise InputSelectionError(f"{path}: no array {component!r} in the Zarr group; set input.component to "
                                      f"one of its 2-D arrays ({arrays_of(root)})", "input.component") from None
        where = f"{path} (component {component!r})" if component else path
        raise FileNotFoundError(f"{where}: no Zarr array or group there") from None
    except Exception as exc:
        raise ValueError(f"{path}: cannot open as Zarr ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Group):
        arrays = {name: member for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array)}
        matrices = sorted(name for name, member in arrays.items() if member.ndim == 2)
        if len(matrices) == 1 and component is None:
            logger.info("%s is a group holding one 2-D array, %r: using it", path, matrices[0])
            node, component = arrays[matrices[0]], matrices[0]
        else:
            listing = ", ".join(repr(a) for a in sorted(arrays)) or "none"
            where = f"{path}/{component}" if component else path
            raise InputSelectionError(f"{where} is a Zarr group, not an array; set input.component to one of its "
                                      f"arrays ({listing})", "input.component")
    if node.ndim != 2:
        if component:  # the setting picked an array that is not a table
            root = zarr.open(store=store, mode="r", **kwargs)
            raise InputSelectionError(f"{path}: the array {component!r} has shape {node.shape}, not (n_samples, "
                                      f"n_features); set input.component to one of the group's 2-D arrays "
                                      f"({arrays_of(root)})", "input.component")
        raise ValueError(f"{path}: the Zarr array has shape {node.shape}; dgmm needs a 2-D array "
                         "(n_samples, n_features)")
    return node, component


#: Zarr arrays whose metadata this process has found in their store (see _check_zarr_store_readable).
_READABLE_ZARR_STORES: set = set()


def _check_zarr_store_readable(array) -> None:
    """Raise FileNotFoundError when this process cannot see ``array``'s store at all (once per process and array).

    A missing chunk reads as the fill value, so a worker that sees no store
    (input.path not on its file system, another mount, no credentials to
    list) would otherwise read every block as zeros and fit them without an error.
    """
    store_path = getattr(array, "store_path", None)
    if store_path is None:
        return
    key = str(store_path)
    if key in _READABLE_ZARR_STORES:
        return
    import zarr

    try:
        zarr.open_array(store=store_path, mode="r")
        found = True
    except FileNotFoundError:
        found = False
    if not found:  # raised outside the except block: zarr's error, as the context, would not unpickle on a client
        import socket

        raise FileNotFoundError(f"{key}: the Zarr array cannot be read on {socket.gethostname()} (no array "
                                "metadata there); every worker must see input.path at the same path, on a "
                                "shared file system or an object store")
    _READABLE_ZARR_STORES.add(key)


def _read_zarr_block(array, index, asarray=True, lock=None):
    """Dask's getter for one block of a Zarr array; an undecodable chunk becomes a ValueError naming it.

    (A chunk that is missing altogether reads as the array's fill value: that is Zarr's
    meaning of a missing chunk, not an error.)
    """
    from dask.array.core import getter

    _check_zarr_store_readable(array)
    try:
        return getter(array, index, asarray=asarray, lock=lock)
    except (MemoryError, OSError):
        raise  # not the data's fault (OSError: a vanished file, a network error)
    except Exception as exc:
        if is_storage_error(exc):
            raise  # the store's client failed (EndpointConnectionError, ...): not a corrupt chunk
        rows = index[0] if isinstance(index, tuple) and index else index
        where = f"rows {rows.start}:{rows.stop}" if isinstance(rows, slice) else f"block {index}"
        store = getattr(array, "store_path", None) or getattr(array, "store", array)
        raise ValueError(f"{store}: cannot decode {where} of the Zarr array ({type(exc).__name__}: {exc}); "
                         "a chunk is corrupt or truncated: rewrite the data or restore that chunk") from None


# -- Parquet ------------------------------------------------------------------


def _parquet_files(fs, root: str) -> dict[str, dict]:
    """The data files of a Parquet directory, with the file details of the one listing that found them.

    In dask's order (``dask.utils.natural_sort_key``: ``part.2`` before
    ``part.10``), so rows line up with ``dask.dataframe.read_parquet`` of the
    same directory; zero-padded names (Spark, pyarrow) sort the same either way.
    """
    from dask.utils import natural_sort_key

    listing = fs.find(root, detail=True)
    files = [f for f in sorted(listing, key=natural_sort_key) if not any(part.startswith(("_", "."))
                                                   for part in posixpath.relpath(f, root).split("/"))]
    parquet = [f for f in files if f.lower().endswith(PARQUET_SUFFIXES)]
    return {f: listing[f] for f in parquet or [f for f in files if posixpath.splitext(f)[1] == ""]}


def parquet_order_differs(path: str, storage_options: Mapping | None = None) -> tuple[str, str] | None:
    """Where a Parquet directory's file order (dask's, :func:`_parquet_files`) differs from the plain
    lexicographic order of ``pandas.read_parquet`` and ``pyarrow.dataset``: the first two files (relative
    paths) in dask's order that the other reverses; None when the orders agree or ``path`` is a file."""
    fs, root = _filesystem(path, storage_options)
    if not fs.isdir(root):
        return None
    files = list(_parquet_files(fs, root))
    for i, (ours, theirs) in enumerate(zip(files, sorted(files))):
        if ours != theirs:
            later = files.index(theirs)
            return posixpath.relpath(files[i], root), posixpath.relpath(files[later], root)
    return None


def _file_version(info: Mapping) -> str:
    """What changes when a file is rewritten, from its fsspec details."""
    return str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("size"))


def _parquet_footers(fs, path: str, files: Sequence[str]) -> list:
    """The footers (``FileMetaData``) of ``files``, read ``FOOTER_READERS`` at a time.

    A data lake on an object store holds thousands of files, and each footer
    costs a few round trips of tens of milliseconds; read one after another
    they took minutes before the first chunk could be read. The first
    unreadable file, in the files' order, raises.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def footer(file):
        with fs.open(file, "rb") as f:
            try:
                return pq.ParquetFile(f).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(f"{path}: {file} is not a readable Parquet file ({exc})") from None

    if len(files) == 1:
        return [footer(files[0])]
    with ThreadPoolExecutor(min(FOOTER_READERS, len(files)), thread_name_prefix="dgmm-footers") as pool:
        return list(pool.map(footer, files))


def _is_numeric(arrow_type) -> bool:
    import pyarrow as pa

    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)
            or pa.types.is_decimal(arrow_type))


def _numeric_columns(schema) -> list[str]:
    """The columns of an Arrow schema that dgmm reads by default: every numeric (or boolean) one, in order.

    A pandas index written as a column (``__index_level_0__``, dask's
    ``__null_dask_index__``, a named index), listed in the schema's pandas
    metadata, is not data: pandas and dask read it back as the index.
    """
    index = {name for name in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(name, str)}
    return [field.name for field in schema if _is_numeric(field.type) and field.name not in index]


def open_parquet(path: str, *, columns: Sequence[str] | None = None, storage_options: Mapping | None = None,
                 chunk_rows: int | None = None) -> da.Array:
    """Open a Parquet file or directory as a lazy float dask array.

    Only the footers are read: every row group (or run of consecutive row
    groups up to ``chunk_rows`` rows) becomes one chunk of known size.

    Raises
    ------
    ValueError
        For a missing or non-numeric column, files with different columns, or no rows.
    """
    require_pyarrow("reading Parquet")
    plan = _parquet_plan(path, columns, storage_options, chunk_rows, numeric=True, key="input.columns")
    selected, dtype = plan.columns, plan.dtype
    where = [(file, groups) for file, groups, _ in plan.pieces]
    name = "read-parquet-" + dask.base.tokenize(path, plan.files, selected, dtype, where, plan.versions)
    graph = {(name, i, 0): (_read_parquet_rows, plan.fs, file, groups, tuple(selected), dtype)
             for i, (file, groups) in enumerate(where)}
    chunks = tuple(rows for _, _, rows in plan.pieces)
    _warn_large_row_groups(path, plan)
    return da.Array(graph, name, (chunks, (len(selected),)), dtype=dtype)


def _warn_large_row_groups(path, plan: _ParquetPlan) -> None:
    """Warn when a single row group is a chunk too large to hold per worker thread (row groups are never split)."""
    row_bytes = len(plan.columns) * np.dtype(plan.dtype).itemsize
    file, groups, rows = max(plan.pieces, key=lambda piece: piece[2])
    if len(groups) > 1 or rows * row_bytes <= LARGE_PARQUET_CHUNK_BYTES:
        return  # input.chunk_rows merged several row groups: the user chose the size
    from dask.utils import format_bytes

    suggested = max(1, LARGE_PARQUET_CHUNK_BYTES // 4 // row_bytes)
    logger.warning("%s: row group %d of %s has %s rows (%s as %s), read as one chunk; every worker thread holds "
                   "a chunk in memory, and Parquet row groups are not split: rewrite the data with smaller row "
                   "groups (e.g. pyarrow.parquet.write_table(..., row_group_size=%s))", path, groups[0], file,
                   f"{rows:,}", format_bytes(rows * row_bytes), np.dtype(plan.dtype).name, f"{suggested:,}")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``dgmm[...]`` extra to install."""


def has_pyarrow() -> bool:
    """Whether pyarrow (the ``parquet`` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def pyarrow_missing(what: str) -> str:
    """The message for ``what`` (e.g. 'reading Parquet') without pyarrow."""
    return f"{what} needs pyarrow, which is not installed: pip install 'dgmm[parquet]'"


def require_pyarrow(what: str) -> None:
    """Raise :class:`MissingExtraError` when pyarrow (``dgmm[parquet]``) is missing."""
    if not has_pyarrow():
        raise MissingExtraError(pyarrow_missing(what))


def parquet_columns(path: str, columns: Sequence[str], *, storage_options: Mapping | None = None,
                    chunk_rows: int | None = None, key: str = "columns") -> ParquetColumns:
    """Columns of a Parquet data set to copy, as they are, beside per-row outputs (keys to join by).

    Only the footers are read now. The returned :class:`ParquetColumns`
    reads any range of rows later, on the worker that writes it, with the
    columns' Arrow types (unified across files): strings, int64 ids with
    nulls, time zones, decimals and dictionaries come through unchanged.

    Raises
    ------
    InputSelectionError
        For a column missing from a file (``key`` names the setting in the message).
    """
    plan = _parquet_plan(path, columns, storage_options, chunk_rows, numeric=False, key=key)
    return ParquetColumns(path, plan.fs, plan.schema, plan.pieces, plan.versions)


class ParquetColumns:
    """Columns of a Parquet data set, read by global row range (:func:`parquet_columns`).

    Attributes
    ----------
    schema : pyarrow.Schema
        The columns and their types.
    n_rows : int
    """

    def __init__(self, path, fs, schema, pieces, versions):
        self.path, self.fs, self.schema, self.pieces, self.versions = path, fs, schema, pieces, versions
        self.n_rows = sum(n for _, _, n in pieces)

    def __dask_tokenize__(self):
        return ("dgmm-parquet-columns", self.path, self.schema.names, self.pieces, self.versions)

    def read(self, start: int, stop: int):
        """Rows ``[start, stop)`` as a ``pyarrow.Table`` of :attr:`schema` (reads the row groups holding them)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts, offset = [], 0
        for file, groups, rows in self.pieces:
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                with self.fs.open(file, "rb") as f:
                    table = pq.ParquetFile(f).read_row_groups(groups, columns=self.schema.names)
                parts.append(table.slice(lo - offset, hi - lo).cast(self.schema))
            offset += rows
            if offset >= stop:
                break
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables(parts)


class _ParquetPlan(NamedTuple):
    fs: object
    files: list
    versions: list
    columns: list        # the columns read
    schema: object       # their Arrow schema, unified across files
    dtype: object        # the float dtype of the numeric columns (numeric plans)
    pieces: list         # (file, row groups, rows): one chunk each


def _parquet_plan(path, columns, storage_options, chunk_rows, *, numeric: bool, key: str) -> _ParquetPlan:
    """Files, columns and row groups (one chunk per piece) of a Parquet data set, from its footers only."""
    import pyarrow as pa

    fs, root = _filesystem(path, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path}: no such file or directory")
    infos = _parquet_files(fs, root) if fs.isdir(root) else {root: fs.info(root)}
    if not infos:
        raise ValueError(f"{path}: the directory holds no Parquet files")
    files = list(infos)
    selected = None if columns is None else list(columns)
    pieces, schemas = [], []
    dtype = None
    for file, meta in zip(files, _parquet_footers(fs, path, files)):
        if meta.num_rows == 0:  # no rows to read: its schema (pandas writes an empty frame with none) is moot
            continue
        schema = meta.schema.to_arrow_schema()
        if selected is None:
            selected = _numeric_columns(schema)
            if not selected:
                raise InputSelectionError(f"{path}: no numeric columns (columns: {', '.join(schema.names)})", key)
        file_dtype = np.dtype(np.float32)
        file_types = []
        for name in selected:
            index = schema.get_field_index(name)
            if index < 0:
                hive = f"; {name!r} is a Hive partition key (in the directory names, not in the files), which " \
                       "dgmm does not read" if f"/{name}=" in file else ""
                raise InputSelectionError(f"{path}: column {name!r} not found in {file} (columns: "
                                          f"{', '.join(schema.names)}){hive}", key)
            arrow_type = schema.field(index).type
            file_types.append(arrow_type)
            if numeric and not _is_numeric(arrow_type):
                raise InputSelectionError(f"{path}: column {name!r} has type {arrow_type}, not a number; "
                                          "choose numeric columns with input.columns", key)
            if not pa.types.is_float32(arrow_type):
                file_dtype = np.dtype(np.float64)
        schemas.append(pa.schema([pa.field(name, t) for name, t in zip(selected, file_types)]))
        dtype = file_dtype if dtype is None else np.promote_types(dtype, file_dtype)
        groups, rows = [], 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if n == 0:
                continue
            if groups and (chunk_rows is None or rows + n > chunk_rows):
                pieces.append((file, groups, rows))
                groups, rows = [], 0
            groups.append(i)
            rows += n
        if groups:
            pieces.append((file, groups, rows))
    if not pieces:
        raise ValueError(f"{path}: the Parquet data set has no rows")
    versions = [_file_version(infos[file]) for file in files]
    try:  # the numeric columns are read as floats whatever their types
        schema = None if numeric else pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"{path}: the files' columns {', '.join(selected)} have types that do not agree ({exc})") \
            from None
    return _ParquetPlan(fs, files, versions, selected, schema, dtype, pieces)


def _read_parquet_rows(fs, file: str, row_groups: list[int], columns: tuple[str, ...], dtype) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with fs.open(file, "rb") as f:
        table = pq.ParquetFile(f).read_row_groups(row_groups, columns=list(columns))
    target = pa.float32() if dtype == np.float32 else pa.float64()
    out = np.empty((table.num_rows, len(columns)), dtype=dtype)
    for j, name in enumerate(columns):
        # unsafe: int64 beyond 2**53 rounds as NumPy's astype does (and as pandas input is fitted);
        # nulls become NaN (fit reports them)
        column = pc.cast(table.column(name), target, safe=False)
        out[:, j] = column.to_numpy(zero_copy_only=False)
    return out


# -- .npy ---------------------------------------------------------------------


def open_npy(path: str, *, storage_options: Mapping | None = None, chunk_rows: int | None = None) -> da.Array:
    """Open a 2-D ``.npy`` file as a lazy dask array (memory-mapped locally, byte ranges remotely).

    Raises
    ------
    ValueError
        If the file is not a 2-D numeric ``.npy`` array.
    """
    fs, file = _filesystem(path, storage_options)
    try:
        with fs.open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a .npy file ({exc})") from None
    if len(shape) != 2:
        raise ValueError(f"{path}: the array has shape {shape}; dgmm needs a 2-D array (n_samples, n_features)")
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError(f"{path}: the array has dtype {dtype}, not a number")
    local = type(fs).__name__ == "LocalFileSystem"
    if fortran_order and not local:
        raise ValueError(f"{path}: Fortran-ordered .npy files can only be read from local disks")
    n_samples, n_features = shape
    expected, size = offset + n_samples * n_features * dtype.itemsize, fs.size(file)
    if size is not None and size < expected:
        raise ValueError(f"{path}: truncated .npy file: its header says {n_samples} rows x {n_features} {dtype} "
                         f"({expected} bytes with the header), but the file holds {size} bytes")
    row_bytes = max(dtype.itemsize * n_features, 1)
    target = min(NPY_CHUNK_BYTES, max(NPY_MIN_CHUNK_BYTES, n_samples * row_bytes // NPY_MIN_CHUNKS))
    rows = int(chunk_rows or max(1, target // row_bytes))
    starts = list(range(0, n_samples, rows)) or [0]
    name = "read-npy-" + dask.base.tokenize(path, shape, dtype, rows, fs.info(file).get("mtime"))
    graph = {(name, i, 0): (_read_npy_rows, fs, file, local, offset, start, min(start + rows, n_samples), shape,
                            dtype, fortran_order)
             for i, start in enumerate(starts)}
    chunks = (tuple(min(start + rows, n_samples) - start for start in starts), (n_features,))
    # chunks in this machine's byte order: '>f4' is float32 to NumPy's arithmetic, not to sklearn's dtype checks
    return da.Array(graph, name, chunks, dtype=dtype.newbyteorder("="))


def _read_npy_rows(fs, file, local, offset, start, stop, shape, dtype, fortran_order) -> np.ndarray:
    native = dtype.newbyteorder("=")
    if local:
        mm = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape,
                       order="F" if fortran_order else "C")
        return np.array(mm[start:stop], dtype=native)
    row_bytes = dtype.itemsize * shape[1]
    with fs.open(file, "rb") as f:
        f.seek(offset + start * row_bytes)
        payload = f.read((stop - start) * row_bytes)
    return np.frombuffer(payload, dtype=dtype).reshape(stop - start, shape[1]).astype(native)


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def path_location(path: str) -> tuple[str, str]:
    """Where ``path`` is, comparably: ('local', its real path) or (protocol, the path after '://', no end slash)."""
    if is_url(path):
        protocol, rest = os.fspath(path).split("://", 1)
        return protocol, rest.rstrip("/")
    return "local", os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def location_holds(outer: tuple[str, str], inner: tuple[str, str]) -> bool:
    """True when the location ``outer`` (:func:`path_location`) is ``inner`` or a directory (prefix folder) above it."""
    (kind, a), (other, b) = outer, inner
    if kind != other:
        return False
    if kind != "local":
        return b == a or b.startswith(a + "/")
    try:
        return os.path.commonpath([a, b]) == a
    except ValueError:  # different drives
        return False


def replace_refusal(path: str, *, storage_options: Mapping | None = None) -> str | None:
    """Why an output must not replace what is at ``path``, or None when it may.

    dgmm replaces only what it wrote itself: a directory with its
    ``_SUCCESS`` marker (or an empty one, or nothing). Never a plain file, a
    directory of someone else's files, or the current working directory or a
    directory above it: an ``overwrite`` flag is not a licence to delete
    those.
    """
    fs, root = _filesystem(path, storage_options)
    if not is_url(path) and location_holds(path_location(root), path_location(os.getcwd())):
        return f"{path} is the current directory or holds it"
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        return f"{path} is a file, not an output dgmm wrote"
    if _committed(fs, root) or not fs.ls(root) or fs.exists(posixpath.join(root, COMMITTING_MARKER)):
        return None  # dgmm's output, complete or cut short while it was committed to an object store
    return f"{path} is not an output dgmm wrote (it has no dgmm completion marker)"


def is_complete(path: str, *, storage_options: Mapping | None = None) -> bool:
    """True when an output written by dgmm at ``path`` was committed (its completion marker exists).

    The marker is a ``_SUCCESS`` file (Parquet outputs, and Zarr outputs of
    dgmm 0.1) or, in a Zarr group, the ``dgmm`` entry of its attributes.
    """
    fs, root = _filesystem(path, storage_options)
    return _committed(fs, root)


def _committed(fs, root: str) -> bool:
    if fs.exists(posixpath.join(root, SUCCESS_MARKER)):
        return True
    for name in ("zarr.json", ".zattrs"):
        try:
            document = json.loads(fs.cat_file(posixpath.join(root, name)))
        except (OSError, ValueError):  # absent, unreadable or not JSON: not a dgmm Zarr output
            continue
        attributes = document.get("attributes", {}) if name == "zarr.json" else document
        if isinstance(attributes, dict) and isinstance(attributes.get("dgmm"), dict):
            return True
    return False


def _regular_rows(array: da.Array, rows: int) -> da.Array:
    chunks = array.chunks[0]
    if all(c == rows for c in chunks[:-1]) and chunks[-1] <= rows:
        return array
    return array.rechunk({0: rows})


def _host_chunks(array: da.Array) -> da.Array:
    """``array`` with NumPy chunks (GPU-backed arrays' chunks are copied to the host as they are written)."""
    if isinstance(array._meta, np.ndarray):
        return array
    return array.map_blocks(to_host, dtype=array.dtype, meta=np.empty((0,) * array.ndim, array.dtype))


def write_table(arrays: Mapping[str, da.Array], path: str, *, format: str,
                column_names: Mapping[str, Sequence[str]] | None = None, storage_options: Mapping | None = None,
                overwrite: bool = False, attributes: Mapping | None = None, compressor: str = "default",
                dimension_names: Mapping[str, Sequence[str]] | None = None,
                keep: ParquetColumns | None = None) -> dict:
    """Write row-aligned 1-D / 2-D dask arrays to a Zarr group or a Parquet directory, chunk by chunk.

    Every chunk is computed and written by the worker that computes it (no
    array is gathered); all chunks are written by one ``dask.compute``. The
    output is staged beside ``path`` and committed only when complete.

    Parameters
    ----------
    arrays : mapping of str to dask.array.Array
        Arrays with the same number of rows. In Zarr each becomes an array of
        the group; in Parquet a 1-D array becomes one column and a 2-D array
        one column per column, named ``column_names[name]`` or ``NAME_j``.
    path : str
        Local path or fsspec URL of the output (a directory).
    format : {'zarr', 'parquet'}
    column_names : mapping, default=None
        Parquet column names per array.
    storage_options : mapping, default=None
        Passed to fsspec.
    overwrite : bool, default=False
        Replace an existing output at ``path`` (only once the new one is
        complete). Only an output dgmm wrote is replaced (:func:`replace_refusal`).
    attributes : mapping, default=None
        JSON metadata stored in the Zarr group's attributes and in the marker.
    compressor : {'default', 'blosc-lz4', 'blosc-zstd', 'zstd', 'none'}, default='default'
        How Zarr arrays are compressed (:func:`zarr_compressors`; the group's
        format is zarr's ``default_zarr_format``). Parquet files keep pyarrow's
        own compression, so for Parquet only 'default' is accepted.
    dimension_names : mapping, default=None
        Zarr only: the dimension names of each array (``dimension_names`` in
        Zarr v3, ``_ARRAY_DIMENSIONS`` in v2, as xarray reads them); default
        ``('sample',)`` for a 1-D array and ``('sample', NAME + '_column')``
        for a 2-D one. The group's metadata is consolidated, so
        ``xarray.open_zarr`` opens the output as a Dataset.
    keep : ParquetColumns, default=None
        Parquet only: columns of the input copied first into every part, as
        they are (:func:`parquet_columns`; read by the worker writing the part).

    Rows are written in chunks of the input's rows, except that chunks
    smaller than :data:`MIN_OUTPUT_CHUNK_BYTES` are merged up to it (an
    input of tiny chunks would otherwise give as many tiny files).

    Returns
    -------
    dict
        The marker's content: rows, arrays, format, timing.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False, or it holds something
        dgmm did not write (:func:`replace_refusal`).
    """
    if format not in ("zarr", "parquet"):
        raise ValueError(f"unsupported output format {format!r}: use 'zarr' or 'parquet'")
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}: use one of {', '.join(COMPRESSORS)}")
    if format == "parquet" and compressor != "default":
        raise ValueError(f"compressor {compressor!r} applies to Zarr outputs; Parquet keeps pyarrow's compression")
    if format == "parquet":
        require_pyarrow("writing Parquet")
    if not arrays:
        raise ValueError("nothing to write")
    n_rows = {int(a.shape[0]) for a in arrays.values()}
    if len(n_rows) != 1:
        raise ValueError(f"arrays to write must have the same number of rows, got {sorted(n_rows)}")
    (n_samples,) = n_rows
    if keep is not None and format != "parquet":
        raise ValueError("keep copies Parquet columns to a Parquet output; the format is " + format)
    if keep is not None and keep.n_rows != n_samples:
        raise ValueError(f"keep has {keep.n_rows} rows, the arrays {n_samples}")
    arrays = _merge_small_chunks({name: _host_chunks(array) for name, array in arrays.items()})
    fs, root = _filesystem(path, storage_options)
    if fs.exists(root):
        if not overwrite:
            raise FileExistsError(f"{path} exists; allow overwriting or choose another path")
        refusal = replace_refusal(path, storage_options=storage_options)
        if refusal:
            raise FileExistsError(f"{refusal}; dgmm replaces only its own outputs: remove it yourself or choose "
                                  "another path")
    parent, name = posixpath.split(root.rstrip("/"))
    staging = posixpath.join(parent, _staging_name(name))
    staging_url = staging if not is_url(path) else f"{path.split('://', 1)[0]}://{staging}"
    started = time.perf_counter()
    marker = {
        "dgmm_version": __version__,
        "format": format,
        "n_rows": n_samples,
        "arrays": {k: list(map(int, a.shape)) for k, a in arrays.items()},
        "attributes": dict(attributes or {}),
    }
    if is_url(path):
        _check_bucket(fs, path, root)
    else:
        fs.makedirs(parent, exist_ok=True)
        # before the write too: a write that failed (a full disk) may have left chunks its tasks wrote
        # after the staging was removed, and the next attempt must not fail for the space they hold
        remove_stale_staging(root)
    try:
        if format == "zarr":
            group = _write_zarr(arrays, staging_url, storage_options, compressor, dimension_names or {})
        else:
            _write_parquet(arrays, fs, staging, column_names or {}, n_samples, keep)
        marker["seconds"] = round(time.perf_counter() - started, 3)
        if format == "zarr":
            _mark_zarr(group, marker)
    except BaseException:
        _remove_staging(fs, staging)
        raise
    try:
        _commit(fs, staging, root, None if format == "zarr" else json.dumps(marker, indent=1),
                local=not is_url(path), overwrite=overwrite)
    except BaseException:
        # The staged output is complete: keep it rather than lose both it and what the commit removed.
        if fs.exists(staging):
            logger.warning("%s: the output was not committed; the complete new output is left at %s",
                           path, staging_url)
        raise
    if not is_url(path):
        remove_stale_staging(root)
    return marker


def _staging_name(name: str) -> str:
    """``.NAME.dgmm-staging-HOST.PID.TOKEN``: hidden, beside the target, and saying who writes it."""
    return f".{name}.dgmm-staging-{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def remove_stale_staging(path: str) -> list[str]:
    """Remove what killed writers of the local output ``path`` left beside it; the names removed.

    A ``dgmm predict`` killed while writing leaves its hidden staging directory
    (as large as the output) beside the target. Before and after each write the
    staging directories of the same target that were written on this host by a
    process that no longer runs are removed, with the ``.old`` copy of a
    replaced output whose writer was killed after the swap. Writers still at
    work, on this host or another sharing the directory, keep theirs. Object
    stores are not swept (their writers' processes cannot be asked).
    """
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    pattern = (re.escape(f".{name}.dgmm-staging-") + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[1-9][0-9]*)\.[0-9a-f]{12}"
               r"(\.old)?")
    removed = []
    for entry in left_by_dead_writers(parent, pattern):
        _remove_path(os.path.join(parent, entry))
        removed.append(entry)
    if removed:
        logger.info("removed %d staging folder(s) that killed writers of %s left: %s", len(removed), path,
                    ", ".join(removed))
    return removed


def _remove_path(path: str) -> None:
    """Remove a file, a directory tree, or a symbolic link (not what it points to); errors are ignored.

    An output replaced where a symbolic link stood leaves the link in its place: ``shutil.rmtree``
    refuses links, and one was left behind for good.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def zarr_compressors(dtype, compressor: str = "default", zarr_format: int = 3) -> tuple:
    """The ``compressors`` of a Zarr array of ``dtype`` written by dgmm.

    Every EM iteration decodes the whole input again, and on a CPU-bound host
    decoding competes with the E-step; Blosc with byte shuffle decodes several
    times faster than zarr's default zstd and compresses as well or better
    (``bench/README.md``, "I/O overlap and codecs").

    Parameters
    ----------
    dtype : dtype-like
        The array's dtype.
    compressor : {'default', 'blosc-lz4', 'blosc-zstd', 'zstd', 'none'}, default='default'
        'default' is 'blosc-lz4' (LZ4 level 5 with byte shuffle) for floating-point
        arrays and 'blosc-zstd' (zstd level 3 with byte shuffle) for integer ones;
        'zstd' is zarr's own default (zstd level 3 without shuffle); 'none' stores
        chunks uncompressed.
    zarr_format : {2, 3}, default=3
        The format of the array: v3 takes ``zarr.codecs`` codecs, v2 numcodecs ones.

    Returns
    -------
    tuple
        The codecs (empty for 'none'), for ``compressors=`` of zarr's array creation.

    Examples
    --------
    >>> zarr_compressors("float64")
    (BloscCodec(...cname=<BloscCname.lz4: 'lz4'>, clevel=5, shuffle=<BloscShuffle.shuffle: 'shuffle'>...),)
    """
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}: use one of {', '.join(COMPRESSORS)}")
    if zarr_format not in (2, 3):
        raise ValueError(f"unsupported Zarr format {zarr_format!r}: use 2 or 3")
    if compressor == "default":
        compressor = "blosc-zstd" if np.dtype(dtype).kind in "iub" else "blosc-lz4"
    if compressor == "none":
        return ()
    if zarr_format == 3:
        from zarr.codecs import BloscCodec, ZstdCodec

        if compressor == "zstd":
            return (ZstdCodec(level=0),)  # zstd's level 0 is its default level, 3
        cname, clevel = ("lz4", 5) if compressor == "blosc-lz4" else ("zstd", 3)
        return (BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle"),)
    import numcodecs

    if compressor == "zstd":
        return (numcodecs.Zstd(level=0),)
    cname, clevel = ("lz4", 5) if compressor == "blosc-lz4" else ("zstd", 3)
    return (numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=numcodecs.Blosc.SHUFFLE),)


def _remove_staging(fs, staging: str) -> None:
    """Remove the staging output of a failed write (never raises: the write's own error matters).

    When one chunk's task fails, ``dask.compute`` raises at once while other writer
    tasks may still be running and (re)creating files under ``staging``; so remove,
    wait a little, and look again until it stays gone (about 13 s at most).
    """
    delay = 0.05
    for _ in range(8):
        try:
            fs.invalidate_cache()
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except Exception:  # a writer raced the removal; try again
            pass
        time.sleep(delay)
        try:
            fs.invalidate_cache()
            if not fs.exists(staging):
                return
        except Exception:
            pass
        delay *= 2
    where = staging if type(fs).__name__ == "LocalFileSystem" else fs.unstrip_protocol(staging)
    logger.warning("could not remove the staging output %s; remove it yourself", where)


def _merge_small_chunks(arrays: dict[str, da.Array]) -> dict[str, da.Array]:
    """``arrays`` with row chunks of at least :data:`MIN_OUTPUT_CHUNK_BYTES` (of the widest), when theirs are smaller."""
    first = next(iter(arrays.values()))
    if not first.chunks[0] or not first.shape[0]:
        return arrays
    row_bytes = max(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in arrays.values())
    rows = min(-(-MIN_OUTPUT_CHUNK_BYTES // max(row_bytes, 1)), first.shape[0])
    if max(first.chunks[0]) >= rows:
        return arrays
    return {name: array.rechunk({0: rows}) for name, array in arrays.items()}


def _dimension_names(name: str, ndim: int, given: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    names = tuple(given.get(name, ("sample", f"{name}_column")[:ndim]))
    if len(names) != ndim:
        raise ValueError(f"dimension_names[{name!r}] has {len(names)} names for a {ndim}-D array")
    return names


def _write_zarr(arrays, staging_url, storage_options, compressor, dimension_names):
    import zarr

    options = dict(storage_options or {}) if is_url(staging_url) else None
    store = staging_url if options is None else zarr.storage.FsspecStore.from_url(
        staging_url, storage_options=options, read_only=False)
    group = zarr.open_group(store=store, mode="w")
    zarr_format = group.metadata.zarr_format
    first = next(iter(arrays.values()))
    rows = max(max(first.chunks[0]), 1)
    sources, targets = [], []
    for name, array in arrays.items():
        array = _regular_rows(array.rechunk({i: -1 for i in range(1, array.ndim)}), rows)
        dims = _dimension_names(name, array.ndim, dimension_names)
        target = group.create_array(name, shape=array.shape, chunks=(rows, *array.shape[1:]), dtype=array.dtype,
                                    compressors=zarr_compressors(array.dtype, compressor, zarr_format),
                                    # v2: no fill value, which xarray would read as a missing-value mark (label 0)
                                    **({"dimension_names": dims} if zarr_format == 3 else {"fill_value": None}))
        if zarr_format == 2:
            target.attrs["_ARRAY_DIMENSIONS"] = list(dims)
        sources.append(array)
        targets.append(target)
    # one store, whose sources are optimised as one graph: a task the arrays share (a chunk's E-step, for
    # its labels AND its probabilities) stays one (some dask versions optimise each store call apart)
    dask.compute(da.store(sources, targets, lock=False, compute=False))
    return group


def _mark_zarr(group, marker: dict) -> None:
    """The completion marker of a Zarr output: the group's ``dgmm`` attribute, written after every chunk,
    with the members' metadata consolidated into the group's (one read for xarray and zarr)."""
    import warnings

    import zarr

    group.attrs["dgmm"] = {k: v for k, v in marker.items() if k != "arrays"}
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": zarr and xarray read it
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(group.store, zarr_format=group.metadata.zarr_format)


def _write_parquet(arrays, fs, staging, column_names, n_samples, keep=None) -> None:
    names, blocks = [], []
    for name, array in arrays.items():
        array = array.rechunk({i: -1 for i in range(1, array.ndim)})
        if array.ndim == 1:
            cols = list(column_names.get(name, [name]))
        else:
            cols = list(column_names.get(name, [f"{name}_{j}" for j in range(array.shape[1])]))
        names.append(cols)
        blocks.append(array)
    first = blocks[0]
    blocks = [b.rechunk({0: first.chunks[0]}) for b in blocks]
    fs.makedirs(staging, exist_ok=True)
    delayed_blocks = _delayed_blocks(blocks)
    width = max(5, len(str(len(first.chunks[0]))))
    starts = np.concatenate([[0], np.cumsum(first.chunks[0])]).astype(int).tolist()
    shared = None if keep is None else dask.delayed(keep, pure=True)  # one key: shipped once per worker
    writes = [
        dask.delayed(_write_parquet_part, pure=False)(
            fs, posixpath.join(staging, f"part-{i:0{width}d}.parquet"), names, [d[i] for d in delayed_blocks],
            shared, starts[i], starts[i + 1])
        for i in range(len(first.chunks[0]))
    ]
    written = sum(dask.compute(*writes))
    if written != n_samples:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"wrote {written} rows, expected {n_samples}")


def _delayed_blocks(arrays: Sequence[da.Array]) -> list[list]:
    """One Delayed per row block of each array (of one column chunk), cut from ONE graph optimised for all.

    ``Array.to_delayed`` optimises each array's graph on its own, which fuses a
    copy of a task the arrays share (a chunk's E-step, for its labels AND its
    probabilities) into each; optimised together, as ``dask.compute`` would,
    the shared task stays one.
    """
    from dask.core import flatten
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    keys = [list(flatten(array.__dask_keys__())) for array in arrays]
    graph = HighLevelGraph.merge(*(array.__dask_graph__() for array in arrays))
    graph = da.Array.__dask_optimize__(graph, [key for block_keys in keys for key in block_keys])
    layer = "delayed-" + dask.base.tokenize(*(array.name for array in arrays))
    graph = HighLevelGraph.from_collections(layer, graph, dependencies=())
    return [[Delayed(key, graph, layer=layer) for key in block_keys] for block_keys in keys]


def _write_parquet_part(fs, file: str, names: list[list[str]], blocks: list[np.ndarray], keep=None, start=0,
                        stop=0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns, fields = [], []
    if keep is not None:
        kept = keep.read(start, stop)
        columns.extend(kept.columns)
        fields.extend(kept.schema)
    for cols, block in zip(names, blocks):
        block = np.asarray(block)
        if block.ndim == 1:
            block = block[:, None]
        for j, col in enumerate(cols):
            columns.append(pa.array(block[:, j]))
            fields.append(pa.field(col, columns[-1].type))
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    with fs.open(file, "wb") as f:
        pq.write_table(table, f)
    return table.num_rows


def rename_exchange(source: str, target: str) -> bool:
    """Swap two existing paths of one filesystem atomically; False where the system cannot (nothing changed).

    Linux's ``renameat2(..., RENAME_EXCHANGE)`` (3.15+, glibc 2.28+): at no moment
    is ``target`` missing, as it is between the two renames of a plain swap.
    Filesystems without it (some network and FUSE filesystems), other systems
    and other errors leave both paths as they were and return False.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    return renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_exchange_flag) == 0


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _commit(fs, staging: str, root: str, marker: str | None, *, local: bool, overwrite: bool) -> None:
    """Move a complete staged output into place; ``marker``: the ``_SUCCESS`` file's text, None for Zarr.

    A Zarr output carries its marker in the group's metadata document, which
    on object stores is copied after every other object.
    """
    if local:
        if marker is None:
            for name in ZARR_GROUP_METADATA:
                with contextlib.suppress(FileNotFoundError), open(os.path.join(staging, name), "rb+") as f:
                    os.fsync(f.fileno())
        else:
            with open(os.path.join(staging, SUCCESS_MARKER), "w", encoding="utf-8") as f:
                f.write(marker)
                f.flush()
                os.fsync(f.fileno())
        if os.path.exists(root):
            if not overwrite:
                raise FileExistsError(f"{root} appeared while writing; the new output is left at {staging}")
            if rename_exchange(staging, root):  # one step: root is the old output, then the new one
                old = staging
            else:  # a moment without root, which remove_stale_staging knows how to finish
                old = f"{staging}.old"
                os.replace(root, old)
                os.replace(staging, root)
            _remove_path(old)
        else:
            os.replace(staging, root)
        return
    # Object stores have no rename. The target first gets COMMITTING_MARKER, so that a commit cut short
    # leaves an output dgmm recognises as its own and incomplete (replaceable, never complete); then the
    # old output's completion marker goes first and the rest of it after; then the objects are copied,
    # the completion marker (Zarr: the group's metadata) last; then the staging copies, and last of all
    # COMMITTING_MARKER. The marker names this commit's staging output and those of earlier commits cut
    # short (removed once this one is complete), and says who commits: a live commit of another process
    # is never interleaved with.
    fs.invalidate_cache()
    committing = posixpath.join(root, COMMITTING_MARKER)
    if fs.exists(root) and not overwrite:  # someone else's objects appeared while writing: never delete them
        raise FileExistsError(f"{root} appeared while writing; the new output is left at {staging}")
    leftovers: list[str] = []
    if fs.exists(committing):
        previous = _read_commit_record(fs, committing)
        if _commit_is_live(previous):
            raise FileExistsError(f"{root}: another dgmm write (host {previous.get('host')}, process "
                                  f"{previous.get('pid')}) is committing its output there now; the new output is "
                                  f"left at {staging}")
        leftovers = [p for p in [*previous.get("leftovers", []), previous.get("staging")]
                     if isinstance(p, str) and p != staging and posixpath.dirname(p) == posixpath.dirname(staging)]
    record = {"staging": staging, "leftovers": leftovers, "host": _host_tag(), "pid": os.getpid(), "time": time.time()}
    fs.pipe_file(committing, json.dumps(record).encode())
    if _read_commit_record(fs, committing).get("staging") != staging:  # another writer's marker won the race
        raise FileExistsError(f"{root}: another dgmm write started committing its output there at the same "
                              f"time; the new output is left at {staging}")
    old = [path for path in fs.find(root) if posixpath.basename(path) != COMMITTING_MARKER]
    completion = {posixpath.join(root, name) for name in (SUCCESS_MARKER, *ZARR_GROUP_METADATA)}
    for group in ([p for p in old if p in completion], [p for p in old if p not in completion]):
        if group:
            fs.rm(group)
    fs.invalidate_cache()
    sources = [posixpath.relpath(source, staging) for source in fs.find(staging)]
    last = [name for name in sources if marker is None and name in ZARR_GROUP_METADATA]
    refreshed = time.monotonic()
    for name in [name for name in sources if name not in last] + last:
        fs.copy(posixpath.join(staging, name), posixpath.join(root, name))
        if time.monotonic() - refreshed > COMMIT_LEASE_SECONDS / 5:  # still alive: keep the lease
            record["time"], refreshed = time.time(), time.monotonic()
            fs.pipe_file(committing, json.dumps(record).encode())
    if marker is not None:
        fs.pipe_file(posixpath.join(root, SUCCESS_MARKER), marker.encode())
    for copy in [staging, *leftovers]:  # the copies are no longer needed: this output replaced them
        with contextlib.suppress(OSError):
            fs.rm(copy, recursive=True)
    fs.rm(committing)


#: A commit marker of another host not refreshed for this long belongs to a commit that was cut short.
COMMIT_LEASE_SECONDS = 300.0


def _read_commit_record(fs, committing: str) -> dict:
    try:
        record = json.loads(fs.cat_file(committing))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _commit_is_live(record: dict) -> bool:
    """Whether the commit that wrote ``record`` may still be running: its process is alive (this host), or
    (another host) it refreshed the record within :data:`COMMIT_LEASE_SECONDS`."""
    pid, host, written = record.get("pid"), record.get("host"), record.get("time")
    if host == _host_tag() and isinstance(pid, int):
        return pid != os.getpid() and _is_running(pid)  # this process's own commit was cut short: not live
    return isinstance(written, (int, float)) and time.time() - written < COMMIT_LEASE_SECONDS


def _check_bucket(fs, path: str, root: str) -> None:
    """Refuse an object-store output whose bucket does not exist (s3fs's makedirs would create it)."""
    bucket = missing_bucket(fs, root)
    if bucket is not None:
        raise FileNotFoundError(f"{path}: the bucket {bucket!r} does not exist (dgmm does not create buckets); "
                                "check the URL")


def write_predictions(model, X: da.Array, path: str, *, format: str, labels: bool = True,
                      probabilities: bool = False, log_likelihood: bool = False,
                      storage_options: Mapping | None = None, overwrite: bool = False,
                      attributes: Mapping | None = None, compressor: str = "default",
                      keep: ParquetColumns | None = None, nonfinite: str = "error") -> dict:
    """Write a fitted model's per-row predictions for ``X``, row-aligned, chunk by chunk.

    Zarr: a group with arrays ``labels`` (n_samples,), ``probabilities``
    (n_samples, n_components) and ``log_likelihood`` (n_samples,). Parquet: a
    directory of ``part-*.parquet`` files in row order with columns
    ``label``, ``probability_0`` ... ``probability_{k-1}``, ``log_likelihood``.
    Zarr arrays are compressed as ``compressor`` says (:func:`zarr_compressors`):
    by default, labels with Blosc-zstd and the float arrays with Blosc-LZ4, both
    with byte shuffle. ``keep``: columns of a Parquet input written first,
    as they are (keys to join the predictions back by; :func:`parquet_columns`
    of the input X was opened from, Parquet outputs only). ``nonfinite``: 'error'
    (default, as sklearn: a row holding NaN or infinity fails the write) or
    'missing' (such a row gets label -1 and NaN probabilities and
    log-likelihood; the other rows are predicted as usual). The other
    parameters are those of :func:`write_table`.

    Returns
    -------
    dict
        The completion marker's content (the ``_SUCCESS`` file of Parquet, the ``dgmm`` attribute of Zarr).
    """
    if nonfinite not in ("error", "missing"):
        raise ValueError(f"nonfinite must be 'error' or 'missing', got {nonfinite!r}")
    missing = None
    if nonfinite == "missing" and X.dtype.kind == "f":
        from .graph import nonfinite_rows_zeroed

        X, missing = nonfinite_rows_zeroed(X)
    asked = {"labels": labels, "probabilities": probabilities, "log_likelihood": log_likelihood}
    if hasattr(model, "_lazy_predictions") and isinstance(X, da.Array):
        # one E-step per chunk for all the outputs (written together, by one compute)
        arrays = model._lazy_predictions(X, **asked)
    else:
        methods = {"labels": "predict", "probabilities": "predict_proba", "log_likelihood": "score_samples"}
        arrays = {name: getattr(model, methods[name])(X) for name, wanted in asked.items() if wanted}
    names = {"labels": ["label"], "probabilities": [f"probability_{j}" for j in range(model.n_components)],
             "log_likelihood": ["log_likelihood"]}
    names = {name: names[name] for name in arrays}
    if missing is not None:
        for name in ("labels", "probabilities", "log_likelihood"):
            if name in arrays:
                mask = missing if arrays[name].ndim == 1 else missing[:, None]
                arrays[name] = da.where(mask, -1 if name == "labels" else np.nan, arrays[name])
    return write_table(arrays, path, format=format, column_names=names, storage_options=storage_options,
                       overwrite=overwrite, attributes=attributes, compressor=compressor,
                       dimension_names={"probabilities": ("sample", "component")}, keep=keep)
