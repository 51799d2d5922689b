"""EM checkpoints: the full state of a fit in a safe, open file (``.npz`` + JSON, never pickle).

A checkpoint holds every restart's parameters in float64, its lower-bound
history, iteration count and convergence flag, which restarts are still
active, and a *fingerprint* of the settings that change the model and of the
data. Writes are atomic (temporary file, fsync, rename), so a crash while
writing leaves the previous checkpoint loadable; the temporary file a killed
writer leaves behind is removed by the next successful write of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import socket
import zipfile
from dataclasses import dataclass

import numpy as np

from .chunk import COVARIANCE_TYPES, covariance_shape

FORMAT = "dgmm-checkpoint"
FORMAT_VERSION = 1
_RUN_ARRAYS = ("weights", "means", "covariances", "precisions_cholesky")
#: Largest JSON metadata member read from a model or checkpoint file (characters).
MAX_META_CHARS = 16 * 2**20
#: Largest parameter array read from a checkpoint: guards against files that claim absurd shapes.
MAX_ARRAY_ELEMENTS = 2**28


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupt, from a newer format, or from other data/settings."""


@dataclass
class CheckpointState:
    """What :func:`save_checkpoint` writes and :func:`load_checkpoint` returns."""

    fingerprint: dict
    n_iter: int
    active: list
    runs: list  # list of dicts: arrays + lower_bound, lower_bounds, n_iter, converged
    #: The last pass's row sums (:func:`data_sum_record`), which the first resumed pass must match.
    data_sum: dict | None = None


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _temporary_name(path: str) -> str:
    """``NAME.HOST.PID.TOKEN.tmp`` beside ``path``: which host and process write it, and a random token."""
    return f"{os.path.basename(path)}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def _is_running(pid: int) -> bool:
    """Whether process ``pid`` of this host may still be writing (when in doubt, it may)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no way to tell
        return True
    try:  # a killed writer not yet reaped by its parent is a zombie: it writes nothing more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def left_by_dead_writers(directory: str, pattern: str) -> list[str]:
    """Names in ``directory`` that match ``pattern`` and were written on this host by a process that no longer runs.

    ``pattern`` (a full match) has the groups ``host`` (:func:`_host_tag`) and
    ``pid``. What other hosts wrote is never listed: their processes cannot be asked.
    """
    host = _host_tag()
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        match = re.fullmatch(pattern, name)
        if match is not None and match["host"] == host and not _is_running(int(match["pid"])):
            found.append(name)
    return found


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files that killed writers of ``path`` left behind; their names.

    Only files named as :func:`atomic_write_bytes` names the temporary files of
    ``path`` are considered, and of those only the ones written on this host by a
    process that no longer runs: a writer that is still at work (in this or another
    process, or on another host sharing the directory) keeps its file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.escape(os.path.basename(path)) + r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[1-9][0-9]*)\.[0-9a-f]{12}\.tmp"
    removed = []
    for name in left_by_dead_writers(directory, pattern):
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:  # another writer removed it first, or it is not ours to remove: harmless
            continue
        removed.append(name)
    return removed


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (same-directory temporary file, fsync, rename).

    The file gets the permissions ``open`` gives a new file (0666 less the
    umask), like files NumPy or joblib write: a model written on a shared
    cluster is readable by whom the user's umask allows.
    The temporary file is ``NAME.HOST.PID.TOKEN.tmp``, unique to this write. After
    the rename, temporary files of ``path`` left by killed writers are removed
    (:func:`remove_stale_temporaries`).
    """
    path = os.fspath(path)
    try:
        _write_through_temporary(path, payload)
    except OSError as exc:  # name the file the user asked for, not the temporary one (a full disk, a read-only
        # mount, a file where a directory is needed); the errno keeps the exception's class
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    remove_stale_temporaries(path)


def _write_through_temporary(path: str, payload: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:  # a file where a directory of the path should be: say that, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
    tmp = os.path.join(directory, _temporary_name(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class OutputBusyError(OSError):
    """Another process is writing the same model or checkpoint (it holds :func:`exclusive_writer`'s lock)."""


@contextlib.contextmanager
def exclusive_writer(path: str, what: str = "dgmm fit"):
    """Hold an exclusive lock on the local file ``path`` for as long as this process writes it.

    Two fits writing the same checkpoint or model would interleave: each
    replaces the other's checkpoint, the last to finish wins, and the other's
    checkpoint is deleted under it. The lock is ``flock`` on a hidden
    ``.NAME.dgmm-lock`` beside ``path``: the system releases it when the
    process ends, however it ends (a file a killed process leaves is taken
    over); the file is removed on leaving. Where the filesystem has no locks,
    nothing is locked.

    Raises
    ------
    OutputBusyError
        If another process holds the lock; the message names it (host, pid).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    lock_path = os.path.join(directory, f".{name}.dgmm-lock")
    os.makedirs(directory, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = f" (host {holder.get('host')}, process {holder.get('pid')})" if holder.get("pid") else ""
            raise OutputBusyError(f"another {holder.get('what', what)}{who} is writing {path}; wait for it to "
                                  "end, or write elsewhere") from None
        except OSError:  # no locks on this filesystem (some network filesystems): go on unlocked
            os.close(fd)
            yield
            return
        try:  # the file locked is still the one at lock_path (not one a finishing writer just removed)
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": what}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def save_checkpoint(path: str, state: CheckpointState, dgmm_version: str) -> None:
    """Write ``state`` to ``path`` atomically as an ``.npz`` archive without pickles."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dgmm_version": dgmm_version,
        "fingerprint": state.fingerprint,
        "n_iter": int(state.n_iter),
        "active": [int(i) for i in state.active],
        "runs": [
            {
                "lower_bound": float(run["lower_bound"]),
                "lower_bounds": [float(v) for v in run["lower_bounds"]],
                "n_iter": int(run["n_iter"]),
                "converged": bool(run["converged"]),
            }
            for run in state.runs
        ],
    }
    if state.data_sum is not None:
        meta["data_sum"] = state.data_sum
    arrays = {"meta": np.array(json.dumps(meta))}
    for i, run in enumerate(state.runs):
        for name in _RUN_ARRAYS:
            arrays[f"run{i}_{name}"] = np.asarray(run[name], dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_npz_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of the array ``name`` of an ``.npz`` archive, from its header alone.

    Raises
    ------
    KeyError
        If the archive has no such array.
    ValueError
        If the header is malformed or of an unsupported version.
    """
    with archive.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version} of '{name}'")
    return tuple(shape), dtype


def read_npz_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """The array ``name`` of an ``.npz`` archive (never unpickles; check its header first)."""
    with archive.open(name + ".npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_npz_meta(archive: zipfile.ZipFile):
    """The JSON document stored as the 0-d string array ``meta`` (size checked before reading).

    Raises
    ------
    KeyError
        If there is no ``meta`` array.
    ValueError
        If ``meta`` is not a 0-d string of at most ``MAX_META_CHARS`` characters holding JSON.
    """
    shape, dtype = read_npz_header(archive, "meta")
    if shape != () or dtype.kind != "U" or dtype.itemsize // 4 > MAX_META_CHARS:
        raise ValueError(f"'meta' must be a JSON string, got an array of shape {shape} and dtype {dtype}")
    return json.loads(str(read_npz_array(archive, "meta")[()]))


def not_a_checkpoint(path: str) -> str | None:
    """Why the file ``path`` is not one :func:`save_checkpoint` wrote (None when its metadata says it is).

    What replaces a checkpoint, and removes it once a fit ends, must never take
    another file for one: a model, an input or a config named as the checkpoint.
    Only the metadata is read.
    """
    try:
        with zipfile.ZipFile(os.fspath(path)) as archive:
            meta = read_npz_meta(archive)
    except Exception as exc:  # noqa: BLE001 (not a zip, no 'meta', not JSON, unreadable)
        return f"is not a readable dgmm checkpoint ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "is not a dgmm checkpoint (its metadata names another format)"
    return None


def is_checkpoint_file(path: str) -> bool:
    """Whether ``path`` is a file that :func:`save_checkpoint` wrote (see :func:`not_a_checkpoint`)."""
    return not_a_checkpoint(path) is None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parameter_shapes(covariance_type: str, n_components: int, n_features: int) -> dict[str, tuple]:
    """Shapes of weights, means, covariances and precision Cholesky factors of a model."""
    cov = covariance_shape(covariance_type, n_components, n_features)
    return {"weights": (n_components,), "means": (n_components, n_features), "covariances": cov,
            "precisions_cholesky": cov}


def check_parameter_values(arrays: dict, covariance_type: str, bad) -> None:
    """Finite values, weights on the simplex, positive-definite covariances, valid precision factors.

    ``bad(message)`` returns the exception to raise.
    """
    for name, array in arrays.items():
        if not np.all(np.isfinite(array)):
            raise bad(f"'{name}' holds NaN or infinity")
    weights = arrays["weights"]
    atol = 1e-4 if weights.dtype == np.float32 else 1e-8
    if np.any(weights < 0) or abs(float(weights.sum(dtype=np.float64)) - 1.0) > atol:
        raise bad("'weights' must be non-negative and sum to 1")
    covariances = arrays["covariances"].astype(np.float64)
    prec_chol = arrays["precisions_cholesky"].astype(np.float64)
    if covariance_type in ("full", "tied"):
        cov_stack = covariances[None] if covariance_type == "tied" else covariances
        chol_stack = prec_chol[None] if covariance_type == "tied" else prec_chol
        for k, (cov, chol) in enumerate(zip(cov_stack, chol_stack)):
            where = "" if covariance_type == "tied" else f" of component {k}"
            if not np.allclose(cov, cov.T, rtol=1e-6, atol=0):
                raise bad(f"the covariance{where} is not symmetric")
            try:
                np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                raise bad(f"the covariance{where} is not positive definite") from None
            if np.any(np.tril(chol, -1) != 0) or np.any(np.diag(chol) <= 0):
                raise bad(f"the precision Cholesky factor{where} is not upper triangular with a positive diagonal")
    elif np.any(covariances <= 0) or np.any(prec_chol <= 0):
        raise bad("covariances and precision Cholesky factors must be positive")


def load_checkpoint(path: str) -> CheckpointState:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles).

    Validates the metadata's structure, every array's shape and dtype (from
    the ``.npy`` headers, before reading the data) against the checkpoint's
    own fingerprint, finiteness, and that covariances are positive definite.

    Raises
    ------
    CheckpointError
        If the file is not a dgmm checkpoint, is corrupt or inconsistent, or is from a newer format.
    FileNotFoundError
        If there is no such file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            meta = read_npz_meta(archive)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a dgmm checkpoint")
            version = meta.get("format_version")
            if not _is_int(version) or version < 1:
                raise CheckpointError(f"{path}: invalid checkpoint format_version {version!r}")
            if version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} was written by a newer dgmm (checkpoint format {meta['format_version']}, "
                    f"this dgmm reads up to {FORMAT_VERSION}); upgrade dgmm to resume it"
                )
            return _read_state(meta, archive, path)
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, KeyError, ValueError, zlib errors and friends
        raise CheckpointError(f"{path} is not a readable dgmm checkpoint ({type(exc).__name__}: {exc})") from None


def _read_state(meta: dict, archive: zipfile.ZipFile, path: str) -> CheckpointState:
    def bad(message):
        return CheckpointError(f"{path}: inconsistent checkpoint: {message}")

    fingerprint, n_iter, active, runs_meta = (meta.get(k) for k in ("fingerprint", "n_iter", "active", "runs"))
    if not isinstance(fingerprint, dict):
        raise bad(f"'fingerprint' must be a mapping, got {type(fingerprint).__name__}")
    kind = fingerprint.get("covariance_type")
    n_components, n_features = fingerprint.get("n_components"), fingerprint.get("n_features")
    if kind not in COVARIANCE_TYPES:
        raise bad(f"invalid covariance_type {kind!r}")
    for name, value in (("n_components", n_components), ("n_features", n_features)):
        if not _is_int(value) or value < 1:
            raise bad(f"invalid {name} {value!r}")
    if not _is_int(n_iter) or n_iter < 0:
        raise bad(f"invalid n_iter {n_iter!r}")
    if not isinstance(runs_meta, list) or not runs_meta or not all(isinstance(r, dict) for r in runs_meta):
        raise bad("'runs' must be a non-empty list of mappings")
    if (not isinstance(active, list) or not all(_is_int(i) and 0 <= i < len(runs_meta) for i in active)
            or len(set(active)) != len(active)):
        raise bad(f"'active' must list distinct restarts in [0, {len(runs_meta)}), got {active!r}")
    shapes = parameter_shapes(kind, n_components, n_features)
    if sum(int(np.prod(s)) for s in shapes.values()) > MAX_ARRAY_ELEMENTS:
        raise bad(f"implausibly large model ({n_components} components x {n_features} features)")
    runs = []
    for i, run_meta in enumerate(runs_meta):
        lower_bound, lower_bounds = run_meta.get("lower_bound"), run_meta.get("lower_bounds")
        if not _is_number(lower_bound) or not isinstance(lower_bounds, list) or \
                not all(_is_number(v) for v in lower_bounds):
            raise bad(f"restart {i}: 'lower_bound' must be a number and 'lower_bounds' a list of numbers")
        if not _is_int(run_meta.get("n_iter")) or not 0 <= run_meta["n_iter"] <= n_iter:
            raise bad(f"restart {i}: invalid n_iter {run_meta.get('n_iter')!r}")
        if not isinstance(run_meta.get("converged"), bool):
            raise bad(f"restart {i}: 'converged' must be true or false")
        arrays = {}
        for name, expected in shapes.items():
            member = f"run{i}_{name}"
            shape, dtype = read_npz_header(archive, member)
            if shape != expected:
                raise bad(f"'{member}' has shape {shape}, expected {expected} for {kind!r} covariances")
            if dtype != np.dtype(np.float64):
                raise bad(f"'{member}' has dtype {dtype}, expected float64")
            arrays[name] = read_npz_array(archive, member)
        check_parameter_values(arrays, kind, lambda message, i=i: bad(f"restart {i}: {message}"))
        runs.append({**run_meta, **arrays})
    data_sum = meta.get("data_sum")
    if data_sum is not None and not _valid_data_sum(data_sum, n_features):
        raise bad("'data_sum' must hold 'center', 'sum' and 'std' lists of n_features numbers and a 'weight' >= 0")
    return CheckpointState(fingerprint=fingerprint, n_iter=n_iter, active=list(active), runs=runs, data_sum=data_sum)


def fingerprint_mismatch(saved: dict, current: dict) -> list[str]:
    """Names of fingerprint entries that differ between a checkpoint and the current fit."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------
# The data check of a resumed fit
# ---------------------------------------------------------------------------


def data_sum_record(center, row_sum, weight, std) -> dict:
    """What a checkpoint keeps of the pass that led to it: Σ w (x - center) per feature, Σ w, and a scale.

    ``center`` is the centre the pass's statistics are relative to, ``row_sum``
    their ``sy``, ``weight`` the total row weight and ``std`` each feature's
    standard deviation under the fitted mixture (the scale of the tolerance).
    JSON floats round-trip float64 exactly.
    """
    return {
        "center": [float(v) for v in np.asarray(center, dtype=np.float64)],
        "sum": [float(v) for v in np.asarray(row_sum, dtype=np.float64)],
        "weight": float(weight),
        "std": [float(v) for v in np.asarray(std, dtype=np.float64)],
    }


def _valid_data_sum(record, n_features: int) -> bool:
    if not isinstance(record, dict) or not _is_number(record.get("weight")) or not record["weight"] >= 0:
        return False
    return all(
        isinstance(record.get(key), list) and len(record[key]) == n_features and all(_is_number(v) for v in record[key])
        for key in ("center", "sum", "std")
    )


def data_sum_mismatch(saved: dict, center, row_sum, weight, rtol: float) -> tuple[int, int, float]:
    """Whether a pass read the rows that a checkpoint's pass read, from their sums per feature.

    Σ w (x - c) of the same rows relative to two centres differ by exactly
    Σ w · (c' - c), so the two passes agree up to rounding however the rows are
    chunked, ordered or distributed. A feature differs when the gap exceeds
    ``rtol`` times Σ w · (its standard deviation + the centre's move), plus the
    rounding of the centres themselves.

    Returns
    -------
    n_differing : int
        Features whose sums differ (0: the rows agree); -1 when the total weight differs.
    feature : int
        The feature that differs most (relative to its tolerance).
    difference : float
        Its mean difference per unit of weight, in the feature's units.
    """
    saved_center = np.asarray(saved["center"], dtype=np.float64)
    center = np.asarray(center, dtype=np.float64)
    shift = center - saved_center
    weight = float(weight)
    if abs(weight - saved["weight"]) > rtol * max(weight, saved["weight"]):
        return -1, 0, weight - saved["weight"]
    difference = np.asarray(row_sum, dtype=np.float64) - np.asarray(saved["sum"], dtype=np.float64) + weight * shift
    scale = np.asarray(saved["std"], dtype=np.float64) + np.abs(shift)
    offset = np.maximum(np.abs(center), np.abs(saved_center))
    tolerance = weight * (rtol * scale + 64 * np.finfo(np.float64).eps * offset) + np.finfo(np.float64).tiny
    ratio = np.abs(difference) / tolerance
    worst = int(np.argmax(ratio))
    return int(np.count_nonzero(ratio > 1.0)), worst, float(difference[worst] / max(weight, np.finfo(np.float64).tiny))
