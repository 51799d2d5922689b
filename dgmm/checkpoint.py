"""EM checkpoints: the full state of a fit in a safe, open file (``.npz`` + JSON, never pickle).

A checkpoint holds every restart's parameters in float64, its lower-bound
history, iteration count and convergence flag, which restarts are still
active, and a *fingerprint* of the settings that change the model and of the
data. Writes are atomic (temporary file, fsync, rename), so a crash while
writing leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

FORMAT = "dgmm-checkpoint"
FORMAT_VERSION = 1
_RUN_ARRAYS = ("weights", "means", "covariances", "precisions_cholesky")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupt, from a newer format, or from other data/settings."""


@dataclass
class CheckpointState:
    """What :func:`save_checkpoint` writes and :func:`load_checkpoint` returns."""

    fingerprint: dict
    n_iter: int
    active: list
    runs: list  # list of dicts: arrays + lower_bound, lower_bounds, n_iter, converged


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (same-directory temporary file, fsync, rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
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
    arrays = {"meta": np.array(json.dumps(meta))}
    for i, run in enumerate(state.runs):
        for name in _RUN_ARRAYS:
            arrays[f"run{i}_{name}"] = np.asarray(run[name], dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str) -> CheckpointState:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles).

    Raises
    ------
    CheckpointError
        If the file is not a dgmm checkpoint, is corrupt, or is from a newer format.
    """
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a dgmm checkpoint")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} was written by a newer dgmm (checkpoint format {meta['format_version']}, "
                    f"this dgmm reads up to {FORMAT_VERSION}); upgrade dgmm to resume it"
                )
            runs = []
            for i, run_meta in enumerate(meta["runs"]):
                run = dict(run_meta)
                for name in _RUN_ARRAYS:
                    run[name] = archive[f"run{i}_{name}"]
                runs.append(run)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} is not a readable dgmm checkpoint ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise CheckpointError(f"{path} is not a readable dgmm checkpoint ({type(exc).__name__}: {exc})") from None
    return CheckpointState(
        fingerprint=meta["fingerprint"], n_iter=int(meta["n_iter"]), active=list(meta["active"]), runs=runs
    )


def fingerprint_mismatch(saved: dict, current: dict) -> list[str]:
    """Names of fingerprint entries that differ between a checkpoint and the current fit."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]
