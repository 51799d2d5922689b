"""YAML configuration of the ``dgmm`` command: parsed, validated, then used.

A config is a mapping of sections (``input``, ``model``, ``cluster``,
``output``, ``predict``), each a frozen dataclass below. :func:`load_config`
checks everything that can be checked without starting a cluster or reading
data: unknown keys, wrong types, missing required keys, impossible values and
local inputs that do not exist. Every error names the file and the key::

    configs/x.yaml: model.n_components: must be an int >= 1, got 0

``--set key.sub=value`` overrides are applied to the parsed YAML before
validation; each value is parsed with :func:`yaml.safe_load` (never ``eval``).
Credentials never belong in a config: remote stores take them from the
environment or the provider chains of fsspec / s3fs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import posixpath
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from .io import _local, format_from_suffix, is_url, location_holds, path_location

__all__ = [
    "ClusterConfig",
    "Config",
    "ConfigError",
    "InputConfig",
    "JobqueueConfig",
    "ModelConfig",
    "OutputConfig",
    "PredictConfig",
    "SyntheticConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
]

REQUIRED: Any = dataclasses.MISSING
#: Most worker processes of an embedded LocalCluster (more is a typo, not a plan), and threads per worker.
MAX_LOCAL_WORKERS = max(64, 4 * (os.cpu_count() or 1))
MAX_THREADS_PER_WORKER = 1024


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Generate a synthetic Zarr data set at ``input.path`` if it is missing (the demo)."""

    n_samples: int = 2_000_000
    n_features: int = 8
    n_components: int = 4
    chunk_rows: int = 250_000
    seed: int = 0

    def _check(self, err):
        for name in ("n_samples", "n_features", "n_components", "chunk_rows"):
            if getattr(self, name) < 1:
                err(name, f"must be an int >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class InputConfig:
    """Where the data is: a Zarr array (v2 or v3), a Parquet file or directory, or a ``.npy`` file.

    ``device: gpu`` moves every chunk to the GPU (CuPy) as it is read: the E-step kernels run there.
    """

    path: str = REQUIRED
    format: Literal["auto", "zarr", "parquet", "npy"] = "auto"
    component: str | None = None
    columns: list[str] | None = None
    storage_options: dict = field(default_factory=dict)
    chunk_rows: int | None = None
    persist: bool | Literal["auto"] = "auto"
    device: Literal["cpu", "gpu"] = "cpu"
    synthetic: SyntheticConfig | None = None

    def _check(self, err):
        if not self.path:
            err("path", "must name a file, directory or URL, got an empty string")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            err("chunk_rows", f"must be an int >= 1, got {self.chunk_rows}")
        if self.columns is not None and not self.columns:
            err("columns", "must list at least one column (or be omitted to use every numeric column)")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            twice = next(c for c in self.columns if self.columns.count(c) > 1)
            err("columns", f"lists the column {twice!r} twice (a feature counted twice)")
        fmt = self.resolved_format()
        if self.columns is not None and fmt not in ("parquet", "auto"):
            err("columns", f"selects Parquet columns, but the input format is {fmt}")
        if self.component is not None and fmt not in ("zarr", "auto"):
            err("component", f"selects an array inside a Zarr group, but the input format is {fmt}")
        if self.synthetic is not None and fmt not in ("zarr", "auto"):
            err("synthetic", "generates a Zarr array; input.path must be a .zarr path")
        if self.synthetic is not None and is_url(self.path):
            err("synthetic", "writes a local Zarr array; input.path must be a local path")
        if self.device == "gpu" and importlib.util.find_spec("cupy") is None:
            err("device", "gpu needs CuPy in this environment: install dgmm[gpu] (or the cupy-cudaXXx wheel "
                          "of your CUDA), or use device: cpu")

    def resolved_format(self) -> str:
        """``format``, or the format implied by the path's suffix ('auto' when there is none)."""
        if self.format != "auto":
            return self.format
        return format_from_suffix(self.path) or "auto"


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of :class:`dgmm.GaussianMixture` (sklearn's names and defaults)."""

    n_components: int = 1
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full"
    tol: float = 1e-3
    reg_covar: float = 1e-6
    max_iter: int = 100
    n_init: int = 1
    init_params: Literal["kmeans", "k-means++", "random", "random_from_data"] = "kmeans"
    random_state: int | None = None
    split_every: int | None = None
    init_sample_size: int = 100_000

    def _check(self, err):
        if self.n_components < 1:
            err("n_components", f"must be an int >= 1, got {self.n_components}")
        if not self.tol >= 0:
            err("tol", f"must be a float >= 0, got {self.tol}")
        if not self.reg_covar >= 0:
            err("reg_covar", f"must be a float >= 0, got {self.reg_covar}")
        if self.max_iter < 0:
            err("max_iter", f"must be an int >= 0, got {self.max_iter}")
        if self.n_init < 1:
            err("n_init", f"must be an int >= 1, got {self.n_init}")
        if self.random_state is not None and not 0 <= self.random_state < 2**32:
            err("random_state", f"must be an int in [0, 2**32) or null, got {self.random_state}")
        if self.split_every is not None and self.split_every < 2:
            err("split_every", f"must be an int >= 2 or null, got {self.split_every}")
        if self.init_sample_size < 1:
            err("init_sample_size", f"must be an int >= 1, got {self.init_sample_size}")

    def estimator_params(self) -> dict:
        """Keyword arguments for :class:`dgmm.GaussianMixture`."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JobqueueConfig:
    """A batch-scheduler cluster through dask-jobqueue (the ``hpc`` extra)."""

    system: Literal["slurm", "pbs", "sge", "lsf"] = REQUIRED
    cores: int = REQUIRED
    memory: str = REQUIRED
    jobs: int = 1
    processes: int | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    interface: str | None = None
    job_extra_directives: list[str] = field(default_factory=list)
    job_script_prologue: list[str] = field(default_factory=list)
    local_directory: str | None = None
    log_directory: str | None = None
    wait_timeout: float = 3600.0

    def _check(self, err):
        if self.cores < 1:
            err("cores", f"must be an int >= 1, got {self.cores}")
        if self.jobs < 1:
            err("jobs", f"must be an int >= 1, got {self.jobs}")
        if self.processes is not None and not 1 <= self.processes <= self.cores:
            err("processes", f"must be an int in [1, cores={self.cores}], got {self.processes}")
        if not _is_memory(self.memory):
            err("memory", f"must be a size such as '16GB' or '4GiB', got {self.memory!r}")
        if self.walltime is not None and not _is_walltime(self.walltime):
            err("walltime", f"must look like 'HH:MM:SS' (or 'MM:SS', 'D-HH:MM:SS'), got {self.walltime!r}")
        if not self.wait_timeout > 0:
            err("wait_timeout", f"must be a number of seconds > 0, got {self.wait_timeout}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the computation runs.

    ``type`` is one of ``local`` (an embedded LocalCluster, the default),
    ``address`` (an existing scheduler), ``jobqueue`` (dask-jobqueue) or
    ``threads`` (dask's threaded scheduler in this process, no cluster).
    Giving ``address`` or a ``jobqueue`` section implies the type. For
    ``local``, ``threads_per_worker`` counts cores (for ``jobqueue``,
    ``cores``), and with ``read_ahead`` (the default) the workers run two
    threads per core, so one reads input chunks while the other computes.
    """

    type: Literal["local", "address", "jobqueue", "threads"] | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    read_ahead: bool = True
    processes: bool = True
    memory_limit: str | None = "auto"
    host: str = "127.0.0.1"
    dashboard_address: str | None = "127.0.0.1:0"
    address: str | None = None
    timeout: float = 30.0
    stall_warning: float | None = 120.0
    jobqueue: JobqueueConfig | None = None

    def _check(self, err):
        kind = self.kind
        if self.address is not None and self.jobqueue is not None:
            err("address", "cannot be combined with a jobqueue section; use one or the other")
        if kind == "address":
            if self.address is None:
                err("address", "is required when cluster.type is 'address' (e.g. tcp://scheduler:8786)")
            elif "://" not in self.address:
                err("address", f"must be a scheduler URL such as tcp://host:8786, got {self.address!r}")
        elif self.address is not None:
            err("address", f"is only used when cluster.type is 'address', not {kind!r}")
        if kind == "jobqueue" and self.jobqueue is None:
            err("jobqueue", "a jobqueue section (system, cores, memory, ...) is required when cluster.type is 'jobqueue'")
        elif kind != "jobqueue" and self.jobqueue is not None:
            err("jobqueue", f"is only used when cluster.type is 'jobqueue', not {kind!r}")
        if not self.read_ahead and kind not in ("local", "jobqueue"):
            err("read_ahead", f"only applies to the workers dgmm starts (cluster.type 'local' or 'jobqueue'), not "
                              f"{kind!r}; the workers of an existing cluster read ahead when started with --nthreads "
                              "twice their cores (docs/scaling.md, 'Read-ahead on distributed workers')")
        if kind != "local":  # the LocalCluster's own settings: silently ignored elsewhere, so refused
            where = {"address": "the existing cluster's workers are its own",
                     "jobqueue": "set the workers in the jobqueue section (jobs, cores, processes, memory)",
                     "threads": "dask's threaded scheduler runs in this process"}[kind]
            for name, default in (("n_workers", None), ("threads_per_worker", None), ("processes", True),
                                  ("memory_limit", "auto"), ("host", "127.0.0.1")):
                if getattr(self, name) != default:
                    err(name, f"only applies to cluster.type 'local' (a LocalCluster), not {kind!r}: {where}")
        if self.n_workers is not None and self.n_workers < 1:
            err("n_workers", f"must be an int >= 1 or null (sized to the machine), got {self.n_workers}")
        if kind == "local" and self.n_workers is not None and self.n_workers > MAX_LOCAL_WORKERS:
            err("n_workers", f"must be at most {MAX_LOCAL_WORKERS} for a LocalCluster on this machine "
                             f"({os.cpu_count()} cores), got {self.n_workers}")
        if self.threads_per_worker is not None and not 1 <= self.threads_per_worker <= MAX_THREADS_PER_WORKER:
            err("threads_per_worker", f"must be an int in [1, {MAX_THREADS_PER_WORKER}] or null, "
                                      f"got {self.threads_per_worker}")
        if self.memory_limit not in (None, "auto") and not _is_memory(self.memory_limit):
            err("memory_limit", f"must be 'auto', null or a size such as '4GB', got {self.memory_limit!r}")
        if not self.timeout > 0:
            err("timeout", f"must be a number of seconds > 0, got {self.timeout}")
        if self.timeout != 30.0 and kind != "address":  # silently ignored elsewhere, so refused
            err("timeout", f"only applies to cluster.type 'address' (connecting to an existing scheduler), not "
                           f"{kind!r}" + ("; use jobqueue.wait_timeout" if kind == "jobqueue" else ""))
        if self.stall_warning is not None and not self.stall_warning > 0:
            err("stall_warning", f"must be a number of seconds > 0, or null for no warning, got {self.stall_warning}")
        if self.stall_warning not in (None, 120.0) and kind == "threads":  # silently ignored there, so refused
            err("stall_warning", "only applies to clusters with workers (local, address, jobqueue), not 'threads'")

    @property
    def kind(self) -> str:
        """The cluster type, with ``address`` and ``jobqueue`` implied by their keys."""
        if self.type is not None:
            return self.type
        if self.address is not None:
            return "address"
        if self.jobqueue is not None:
            return "jobqueue"
        return "local"


@dataclass(frozen=True)
class OutputConfig:
    """Where ``dgmm fit`` writes the model, and its checkpoints."""

    model: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 1
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)

    def _check(self, err):
        if self.checkpoint_every < 0:
            err("checkpoint_every", f"must be an int >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        if self.model is not None and not self.model:
            err("model", "must name a file, got an empty string")
        if self.checkpoint is not None and is_url(self.checkpoint):
            err("checkpoint", "must be a local path (checkpoints are written by the driver process)")

    @property
    def checkpoint_path(self) -> str | None:
        """The checkpoint file: ``checkpoint``, or beside the model; None when disabled."""
        if self.checkpoint_every == 0:
            return None
        if self.checkpoint is not None:
            return self.checkpoint
        if self.model is None or is_url(self.model):
            return None
        stem = self.model[: -len(".npz")] if self.model.endswith(".npz") else self.model
        return stem + ".checkpoint.npz"


@dataclass(frozen=True)
class PredictConfig:
    """What ``dgmm predict`` writes: per-row outputs, row-aligned with the input."""

    output: str = REQUIRED
    format: Literal["auto", "zarr", "parquet"] = "auto"
    labels: bool = True
    probabilities: bool = False
    log_likelihood: bool = False
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)
    #: Zarr outputs only; see :func:`dgmm.io.zarr_compressors`.
    compressor: Literal["default", "blosc-lz4", "blosc-zstd", "zstd", "none"] = "default"
    #: Columns of a Parquet input copied to a Parquet output as they are (ids, keys, timestamps), first.
    keep_columns: list[str] | None = None
    #: Rows holding NaN or infinity: 'error' (as sklearn) or 'missing' (label -1, NaN probabilities).
    nonfinite: Literal["error", "missing"] = "error"

    def _check(self, err):
        if self.keep_columns is not None:
            if not self.keep_columns:
                err("keep_columns", "must list at least one input column (or be omitted)")
            if len(set(self.keep_columns)) != len(self.keep_columns):
                err("keep_columns", f"lists a column twice: {self.keep_columns}")
            clash = [c for c in self.keep_columns if c in ("label", "log_likelihood") or c.startswith("probability_")]
            if clash:
                err("keep_columns", f"{clash[0]!r} is the name of a prediction column; rename it in the input")
            if self.output and self.resolved_format() == "zarr":
                err("keep_columns", "copies Parquet columns to a Parquet output; predict.output is Zarr")
        if not self.output:
            err("output", "must name a Zarr or Parquet path, got an empty string")
        elif self.resolved_format() == "auto":
            err("format", f"cannot be inferred from {self.output!r}: end it in .zarr or .parquet, or set predict.format")
        elif self.resolved_format() == "parquet" and self.compressor != "default":
            err("compressor", f"applies to Zarr outputs; Parquet keeps pyarrow's compression, got {self.compressor!r}")
        if not (self.labels or self.probabilities or self.log_likelihood):
            err("labels", "nothing to write: enable at least one of labels, probabilities, log_likelihood")

    def resolved_format(self) -> str:
        """``format``, or the output format implied by the path's suffix ('auto' when it names none)."""
        if self.format != "auto":
            return self.format
        fmt = format_from_suffix(self.output)
        return fmt if fmt in ("zarr", "parquet") else "auto"


@dataclass(frozen=True)
class Config:
    """A validated config. ``source`` is the file it came from (used in messages)."""

    input: InputConfig = REQUIRED
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    predict: PredictConfig | None = None
    source: str = field(default="<config>", compare=False)

    def _check(self, err):
        pass

    def to_dict(self, redact: bool = True) -> dict:
        """The config as plain data (YAML/JSON-serialisable), without ``source``.

        ``cluster.type`` is written resolved (``address`` and ``jobqueue`` when
        implied by their keys), and ``output.checkpoint`` as the file checkpoints
        go to (beside the model unless set; null when disabled), so the dict
        parses back to the same config.
        With ``redact``, ``storage_options`` entries whose names suggest a
        credential (key, secret, token, password) are replaced by ``'<redacted>'``,
        so they never reach model metadata or logs.
        """
        data = dataclasses.asdict(self)
        data.pop("source")
        data["cluster"]["type"] = self.cluster.kind
        data["output"]["checkpoint"] = self.output.checkpoint_path  # beside the model unless set or disabled
        return _redact(data) if redact else data


_SENSITIVE = ("key", "secret", "token", "password", "credential")


def _redact(value, sensitive: bool = False):
    if isinstance(value, dict):
        return {k: _redact(v, sensitive or any(word in str(k).lower() for word in _SENSITIVE))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, sensitive) for v in value]
    return "<redacted>" if sensitive and value is not None else value


_SECTIONS = {f.name for f in dataclasses.fields(Config) if f.name != "source"}


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, command: str | None = None) -> Config:
    """Read, override and validate a YAML config file.

    Parameters
    ----------
    path : str or path-like
        The YAML file.
    overrides : sequence of str
        ``"section.key=value"`` strings; each value is parsed with ``yaml.safe_load``.
    command : {'fit', 'predict', 'score'} or None
        Also check what this command needs: ``fit`` a model path that is free
        (or ``output.overwrite``), ``predict`` and ``score`` an existing model,
        ``predict`` a ``predict`` section whose output path is free.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        For an unreadable file, YAML that is not a mapping, an unknown key, a
        wrong type, a missing required key or an impossible value.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        raw = _safe_load_unique(text, source)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: {_TOO_BIG}") from None
    return parse_config(raw, source=source, overrides=overrides, command=command)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping.

    YAML forbids repeated keys; PyYAML keeps the last one silently.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # a key may override what a merge key (<<) brings
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: construct_mapping says so itself
                    break
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _safe_load_unique(text: str, name: str | None = None) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice in one mapping; ``name``: the file, for messages."""
    loader = _UniqueKeyLoader(text)
    if name is not None:
        loader.name = name  # PyYAML's marks say "<unicode string>" for text
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_config(raw: Any, *, source: str = "<config>", overrides: Sequence[str] = (),
                 command: str | None = None) -> Config:
    """Validate already-parsed YAML (a mapping of sections); see :func:`load_config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: the config must be a mapping of sections ({', '.join(sorted(_SECTIONS))}), "
            f"got {_type_name(raw)}"
        )
    _check_size(raw, source)
    raw = apply_overrides(raw, overrides, source=source)
    _check_size(raw, source)
    config = _local_paths(dataclasses.replace(_build(Config, raw, source, ""), source=source))
    if command is not None:
        _check_for_command(config, command)
    return config


def _local_paths(config: Config) -> Config:
    """``file://`` outputs (and a generated input) as the local paths they name: local writes and checks take
    paths, and a ``file:///x`` passed to them was written under ./file:/x."""

    def local(path):
        return _local(path) if isinstance(path, str) else path

    output = dataclasses.replace(config.output, model=local(config.output.model),
                                 checkpoint=local(config.output.checkpoint))
    predict = None if config.predict is None else dataclasses.replace(config.predict, output=local(config.predict.output))
    inp = config.input
    if inp.synthetic is not None:
        inp = dataclasses.replace(inp, path=local(inp.path))
    return dataclasses.replace(config, input=inp, output=output, predict=predict)


def _check_for_command(config: Config, command: str) -> None:
    source, output, predict = config.source, config.output, config.predict

    def fail(key, message):
        raise ConfigError(f"{source}: {key}: {message}")

    if command not in ("fit", "predict", "score"):
        raise ValueError(f"unknown command {command!r}")
    inp = config.input
    if inp.synthetic is None and not is_url(inp.path) and inp.path and not os.path.exists(_local(inp.path)):
        fail("input.path", f"{inp.path} does not exist")
    if config.cluster.kind == "jobqueue":
        import importlib.util

        if importlib.util.find_spec("dask_jobqueue") is None:
            fail("cluster.jobqueue", "needs dask-jobqueue, which is not installed: pip install 'dgmm[hpc]'")
    from .io import has_pyarrow, pyarrow_missing

    if not has_pyarrow():  # look at the input's contents only then
        if _input_is_parquet(inp):
            fail("input.path", f"{inp.path}: {pyarrow_missing('reading Parquet')}")
        if command == "predict" and predict is not None and predict.resolved_format() == "parquet":
            fail("predict.output", pyarrow_missing("writing Parquet"))
    if output.model is None:
        fail("output.model", f"is required by 'dgmm {command}' (the model file, e.g. results/model.npz)")
    local_model = not is_url(output.model)
    kept = _kept_paths(config)
    if command == "fit":
        if local_model:
            _check_local_output_place(fail, "output.model", output.model)
        if output.checkpoint_path is not None:
            _check_local_output_place(fail, "output.checkpoint" if output.checkpoint else "output.model",
                                      output.checkpoint_path)
        if local_model and os.path.isdir(output.model):
            fail("output.model", f"{output.model} is a directory; name the model file, e.g. "
                                 f"{os.path.join(output.model, 'model.npz')}")
        _check_not_over(fail, "output.model", output.model, kept)
        _check_checkpoint_place(fail, output, kept)
        if _exists(fail, "output.model", output.model, output.storage_options) and not output.overwrite:
            fail("output.model", f"{output.model} exists; set output.overwrite: true or choose another path")
        if not local_model:  # after _exists, which says when the store cannot be reached at all
            _check_url_output(fail, "output.model", output.model, output.storage_options, file=True)
        return
    if not _exists(fail, "output.model", output.model, output.storage_options):
        fail("output.model", f"{output.model} does not exist; run 'dgmm fit' first")
    if local_model and os.path.isdir(output.model):
        fail("output.model", f"{output.model} is a directory, not a model file")
    if command == "predict":
        if predict is None:
            fail("predict", "a predict section (output, labels, probabilities, log_likelihood) is required")
        if predict.keep_columns and config.input.resolved_format() not in ("parquet", "auto"):
            fail("predict.keep_columns", f"copies Parquet columns, but the input format is "
                                         f"{config.input.resolved_format()}")
        model = (f"the model (output.model: {output.model})", path_location(output.model), False)
        _check_not_over(fail, "predict.output", predict.output, [*kept, model])
        if _exists(fail, "predict.output", predict.output, predict.storage_options):
            if not predict.overwrite:
                fail("predict.output", f"{predict.output} exists; set predict.overwrite: true or choose another path")
            from .io import replace_refusal

            refusal = replace_refusal(predict.output, storage_options=predict.storage_options)
            if refusal:
                fail("predict.output", f"{refusal}; dgmm replaces only its own outputs: remove it yourself or "
                                       "choose another path")
        if not is_url(predict.output):
            _check_local_output_place(fail, "predict.output", predict.output)
        if is_url(predict.output):
            suffix = {"zarr": ".zarr", "parquet": ".parquet"}.get(predict.resolved_format(), "")
            _check_url_output(fail, "predict.output", predict.output, predict.storage_options, file=False,
                              suffix=suffix)


def _check_checkpoint_place(fail, output: OutputConfig, kept) -> None:
    """The checkpoint file is replaced every few iterations and removed when the fit ends: it must not be
    the model, the input or the config, a directory, or a file that is not a dgmm checkpoint."""
    path = output.checkpoint_path
    if path is None:
        return
    key = "output.checkpoint" if output.checkpoint else "output.model"
    model = (f"the model (output.model: {output.model})", path_location(output.model), False)
    _check_not_over(fail, key, path, [*kept, model])
    if os.path.isdir(path):
        fail(key, f"the checkpoint {path} is a directory; name the checkpoint file, e.g. "
                  f"{os.path.join(path, 'fit.checkpoint.npz')}")
    from .checkpoint import not_a_checkpoint

    refusal = not_a_checkpoint(path) if os.path.exists(path) else None
    if refusal:
        fail(key, f"the checkpoint {path} exists and {refusal}; dgmm replaces its checkpoint while fitting and "
                  "removes it at the end: move that file or choose another path")


def _check_local_output_place(fail, key: str, path: str) -> None:
    """Fail unless the directory that will hold the local output ``path`` can be created and written in:
    its nearest existing ancestor must be a directory this process may write in (a read-only mount,
    a file where a folder is needed, or permissions fail here, not after the fit)."""
    place = os.path.dirname(os.path.abspath(_local(path)))
    while not os.path.exists(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        fail(key, f"cannot write {path}: {place} is a file, not a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        fail(key, f"cannot write {path}: {place} is {'on a read-only file system' if read_only else 'not writable'}")
    # os.access says yes to root everywhere: try it (an empty hidden file, removed at once)
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=place, prefix=".dgmm-write-probe-"):
            pass
    except OSError as exc:
        fail(key, f"cannot write {path}: {place} refuses new files ({exc.strerror or exc})")


def _input_is_parquet(inp: InputConfig) -> bool:
    """Whether the input is Parquet by its format setting, its suffix or (a local path) its contents."""
    fmt = inp.resolved_format()
    if fmt != "auto" or inp.synthetic is not None or is_url(inp.path) or not inp.path:
        return fmt == "parquet"
    from .io import input_format

    try:
        return input_format(inp.path) == "parquet"
    except (OSError, ValueError):  # the reader reports it
        return False


def check_extra_output(config: Config, name: str, path: str) -> str:
    """Refuse, as a config error, an output given outside the config (``name``, e.g. ``--table``) that would
    replace the input, the config file, the model or the current directory, lie inside the input, be a
    directory or an existing file (without ``output.overwrite``), or be written where writes fail. Returns
    the local path to write (``file://`` stripped)."""

    def fail(key, message):
        raise ConfigError(f"{config.source}: {key}: {message}")

    if is_url(path):
        fail(name, f"must be a local path, got {path}")
    path = _local(path)
    kept = _kept_paths(config)
    if config.output.model:
        model = config.output.model
        kept.append((f"the model (output.model: {model})", path_location(model), False))
    if os.path.isdir(path):  # the input itself, or a folder (which may hold the config or the model: not the point)
        _check_not_over(fail, name, path, [k for k in kept if k[1] == path_location(path)])
        fail(name, f"{path} is a directory; name a file")
    _check_not_over(fail, name, path, kept)
    if os.path.exists(path) and not config.output.overwrite:
        fail(name, f"{path} exists; set output.overwrite: true (--set output.overwrite=true) or choose another path")
    _check_local_output_place(fail, name, path)
    return path


def _exists(fail, key: str, path: str, storage_options) -> bool:
    """Whether something is at ``path`` (a local path, or a URL asked through fsspec); an unreachable store fails."""
    if not is_url(path):
        return os.path.exists(path)
    from .io import _filesystem

    try:
        fs, root = _filesystem(path, storage_options)
        return bool(fs.exists(root))
    except Exception as exc:  # noqa: BLE001 (botocore, aiohttp, ...: the store's own errors, reported as they are)
        fail(key, f"cannot reach {path} ({type(exc).__name__}: {exc}); check the URL and its storage_options")
        raise  # not reached: fail raises


def _check_url_output(fail, key: str, path: str, storage_options, *, file: bool, suffix: str = "") -> None:
    """Before any work: an object-store output must name a key inside an existing bucket that these
    credentials may write (a probe object written and removed beside it); a model file must not be a folder."""
    import uuid

    from .io import _filesystem, missing_bucket

    try:
        fs, root = _filesystem(path, storage_options)
        root = root.rstrip("/")
        if "/" not in root:
            example = "model.npz" if file else "predictions" + (suffix or ".zarr")
            fail(key, f"{path} names a bucket, not an object in it; e.g. {path.rstrip('/')}/{example}")
        bucket = missing_bucket(fs, root)
        if bucket is not None:
            fail(key, f"{path}: the bucket {bucket!r} does not exist (dgmm does not create buckets); check the URL")
        if file and fs.isdir(root):
            fail(key, f"{path} is a folder of objects; name the model file, e.g. {path.rstrip('/')}/model.npz")
        probe = f"{posixpath.dirname(root)}/.dgmm-write-probe-{uuid.uuid4().hex[:12]}"
        fs.pipe_file(probe, b"")
        try:
            fs.rm(probe)
        except PermissionError as exc:  # dgmm's commits delete what they staged: writing alone is not enough
            fail(key, f"may write to {path} but not delete there ({exc}); dgmm removes its staged copies and the "
                      f"outputs it replaces: allow deleting, and remove the probe object {probe}")
    except ConfigError:
        raise
    except PermissionError as exc:
        fail(key, f"cannot write to {path} ({exc}); check the credentials and their permissions")
    except Exception as exc:  # noqa: BLE001 (the store's own errors, reported as they are)
        fail(key, f"cannot write to {path} ({type(exc).__name__}: {exc}); check the URL and its storage_options")


def _kept_paths(config: Config) -> list[tuple[str, tuple[str, str], bool]]:
    """What no output of a command may replace: (description, location, whether outputs may not go inside it)."""
    kept = [("the current directory", path_location(os.getcwd()), False)]
    if os.path.isfile(config.source):
        kept.append((f"the config file {config.source}", path_location(config.source), False))
    kept.append((f"the input (input.path: {config.input.path})", path_location(config.input.path), True))
    return kept


def _check_not_over(fail, key: str, path: str, kept) -> None:
    """Fail when the output ``path`` is, or holds, something in ``kept``, or lies inside the input."""
    target = path_location(path)
    for what, where, nothing_inside in kept:
        if location_holds(target, where):
            fail(key, f"{path} would replace {what}; choose another path")
        if nothing_inside and location_holds(where, target):
            fail(key, f"{path} lies inside {what}; write outputs elsewhere")


def apply_overrides(raw: Mapping, overrides: Sequence[str], *, source: str = "<config>") -> dict:
    """A deep copy of ``raw`` with ``"a.b.c=value"`` overrides applied (values parsed as YAML)."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: --set {item!r}: expected KEY.SUB=VALUE, e.g. model.n_components=4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: --set {key}: the value is not valid YAML ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{source}: --set {key}: {_TOO_BIG}") from None
        _check_size(value, f"{source}: --set {key}")
        parts = key.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"{source}: --set {key}: {where} is {_type_name(child)}, not a section")
            node = child
        node[parts[-1]] = value
    return result


#: Most values (counting every use of a YAML alias) and deepest nesting a config may have.
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 10_000, 32
_TOO_BIG = (f"the config is too large or nested too deeply (at most {MAX_CONFIG_VALUES} values and "
            f"{MAX_CONFIG_DEPTH} levels, YAML aliases counted where they are used); a dgmm config is a few "
            "dozen keys")


def _check_size(raw, source: str) -> None:
    """Refuse YAML whose expanded size is absurd (alias bombs, deep nesting) before anything walks it."""
    stack, seen = [(raw, 1)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: {_TOO_BIG}")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _deep_copy(value):
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# A small schema checker driven by the dataclass annotations
# ---------------------------------------------------------------------------


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} {value!r}"


def _build(cls, raw, source: str, prefix: str):
    def fail(key, message):
        raise ConfigError(f"{source}: {prefix}{key}: {message}")

    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: {where}: must be a mapping, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(key, f"unknown key{hint}; allowed: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], source, f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(name, "is required")
    obj = cls(**values)
    obj._check(fail)
    return obj


def _convert(value, annotation, source: str, key: str):
    def fail(expected):
        hint = ""
        if key.endswith("walltime") and isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 12:00:00 as a sexagesimal number (43200)
            hint = ' (YAML reads an unquoted time such as 12:00:00 as a number: quote it, walltime: "12:00:00")'
        raise ConfigError(f"{source}: {key}: must be {expected}, got {_type_name(value)}{hint}")

    if value is None and key.endswith("storage_options"):
        return {}  # an empty section (its entries commented out) reads as null in YAML
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
        non_null = [a for a in options if a is not type(None)]
        if len(non_null) == 1:
            if value is None:
                fail(_describe(non_null[0]))
            return _convert(value, non_null[0], source, key)
        for option in non_null:  # e.g. bool | Literal["auto"]: the first that takes the value
            try:
                return _convert(value, option, source, key)
            except ConfigError:
                continue
        fail(" or ".join(_describe(a) for a in options))
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or isinstance(value, bool):
            fail("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            plural = {str: "strings", int: "ints", float: "numbers", bool: "booleans"}.get(item)
            fail(f"a list of {plural}" if plural else f"a list, each {_describe(item)}")
        return [_convert(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            fail("a mapping with string keys")
        odd = _first_non_plain(value)
        if odd is not None:
            raise ConfigError(f"{source}: {key}{odd[0]}: must be a plain value (a string, number, boolean, null, "
                              f"list or mapping), got {type(odd[1]).__name__} {odd[1]!r}; quote it")
        return _deep_copy(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, source, key + ".")
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an int")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it means.
            try:
                number = float(value)
            except ValueError:
                fail("a number")
            value = number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module


def _first_non_plain(value, where=""):
    """(key path, value) of the first value YAML made into something JSON cannot hold (a date, bytes, a set)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _first_non_plain(v, f"{where}.{k}")
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_non_plain(v, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    return where, value


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "a list"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string", dict: "a mapping",
            type(None): "null"}.get(annotation, str(annotation))


def _is_memory(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    if not isinstance(value, str):
        return False
    try:
        from dask.utils import parse_bytes

        return parse_bytes(value) > 0
    except (ValueError, TypeError):
        return False


def _is_walltime(value: str) -> bool:
    days, _, clock = value.rpartition("-")
    parts = clock.split(":")
    if days and not days.isdigit():
        return False
    return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)
