"""Fuzzing the config, model and checkpoint loaders with hypothesis (a bounded number of examples each).

Whatever the input (random YAML values at any key, truncated or random files,
flipped bytes, wrong types, huge values, foreign arrays), a loader either
returns a valid object or raises its own clear error (``ConfigError``,
``ModelFormatError``, ``CheckpointError``); never another exception, and never
slowly (each example has a few seconds at most). A valid config must also
survive what the command does with it: printing it as YAML and JSON and
storing it in model metadata.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgmm import GaussianMixture, load_model, save_model
from dgmm.checkpoint import CheckpointError, load_checkpoint
from dgmm.config import Config, ConfigError, load_config, parse_config
from dgmm.model_io import ModelFormatError, _jsonable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECONDS = 5.0  # per example, generous for a loaded 2-core machine
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: Any value YAML can produce, with extremes: huge ints, inf / nan, odd strings, nested lists and mappings.
yaml_values = st.recursive(
    st.none() | st.booleans()
    | st.integers() | st.sampled_from([0, -1, 2**31, 2**63, 10**100, -(10**100)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["", "full", "tcp://", "1e-3", "s3://b/x.zarr", "${HOME}",
                                               "__import__('os').system('true')", "!!python/object", "\x00"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
SECTIONS = {"input": ["path", "format", "component", "columns", "storage_options", "chunk_rows", "synthetic"],
            "model": ["n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
                      "random_state", "split_every", "init_sample_size"],
            "cluster": ["type", "n_workers", "threads_per_worker", "processes", "memory_limit", "host",
                        "dashboard_address", "address", "timeout", "jobqueue"],
            "output": ["model", "checkpoint", "checkpoint_every", "overwrite", "storage_options"],
            "predict": ["output", "format", "labels", "probabilities", "log_likelihood", "overwrite"]}
VALID = {"input": {"path": "s3://bucket/x.zarr"}, "model": {"n_components": 2},
         "output": {"model": "s3://bucket/m.npz"}}


def damaged(data, payload: bytes, truncate: bool, max_flips: int) -> bytes:
    """``payload`` cut at a drawn length (if ``truncate``), then with up to ``max_flips`` bytes set to drawn values."""
    out = bytearray(payload)
    if truncate:
        out = out[: data.draw(st.integers(0, len(out)))]
    for _ in range(data.draw(st.integers(0, max_flips))):
        if out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


def check_config_outcome(make):
    """``make()`` parses something: it returns a Config or raises ConfigError, in bounded time."""
    started = time.monotonic()
    try:
        config = make()
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).split(": ", 1)[0]
        config = None
    assert time.monotonic() - started < SECONDS
    if config is not None:
        assert isinstance(config, Config)
        data = config.to_dict()
        yaml.safe_dump(data)  # dgmm check prints it
        json.dumps(_jsonable(data))  # dgmm fit stores it in the model's metadata
        GaussianMixture(**config.model.estimator_params())
    return config


@FUZZ
@given(raw=yaml_values)
def test_any_yaml_value_as_the_whole_config(raw):
    check_config_outcome(lambda: parse_config(raw, source="fuzz.yaml"))


@FUZZ
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data(), value=yaml_values)
def test_any_value_at_any_key(section, data, value):
    key = data.draw(st.sampled_from(SECTIONS[section] + ["unknown_key"]))
    raw = json.loads(json.dumps(VALID))
    raw.setdefault(section, {})[key] = value
    if section == "predict":
        raw["predict"].setdefault("output", "s3://bucket/p.zarr")
    check_config_outcome(lambda: parse_config(raw, source="fuzz.yaml", command="fit"))


@FUZZ
@given(overrides=st.lists(st.text(max_size=40) | st.builds(
    lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(sorted(SECTIONS)),
    st.sampled_from(sorted({k for ks in SECTIONS.values() for k in ks})), st.text(max_size=30)), max_size=4))
def test_any_set_overrides(overrides):
    check_config_outcome(lambda: parse_config(VALID, source="fuzz.yaml", overrides=overrides))


EXAMPLES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@FUZZ
@given(data=st.data(), name=st.sampled_from(EXAMPLES))
def test_truncated_or_damaged_config_files(tmp_path_factory, data, name):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(damaged(data, (CONFIGS / name).read_bytes(), truncate=True, max_flips=3))
    check_config_outcome(lambda: load_config(path))


YAML_SNIPPETS = ["2024-01-01", "2024-01-01 10:00:00", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [{a: 1}]",
                 "!!pairs [{a: 1}]", "!!float '1e309'", "!!int '99999999999999999999999'", "!!str 3", "!!null ''",
                 "&a [*a]", "&b {x: *b}", ".nan", "-.inf", "0x1F", "0o17", "1_000", "yes", "on", "~", "'", "[",
                 "!!python/name:os.system", "!!python/object/apply:os.getpid []", "*undefined", "? [a]\n: 1"]


@FUZZ
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data(), snippet=st.sampled_from(YAML_SNIPPETS),
       nested=st.booleans())
def test_yaml_tags_timestamps_and_aliases_at_any_key(tmp_path_factory, section, data, snippet, nested):
    key = data.draw(st.sampled_from(SECTIONS[section]))
    value = f"{{inner: {snippet}}}" if nested else snippet
    lines = ["input: {path: s3://bucket/x.zarr}", "output: {model: s3://bucket/m.npz}"]
    lines = [line for line in lines if not line.startswith(section)] + [f"{section}:", f"  {key}: {value}"]
    path = tmp_path_factory.mktemp("tags") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    check_config_outcome(lambda: load_config(path))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2000))
def test_random_bytes_as_a_config_file(tmp_path_factory, payload):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(payload)
    check_config_outcome(lambda: load_config(path))


# -- model files and checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    X = np.random.default_rng(0).normal(size=(200, 3))
    out = {}
    for kind in ("full", "diag"):
        gm = GaussianMixture(2, covariance_type=kind, random_state=0, max_iter=3, tol=0.0,
                             checkpoint=str(root / f"{kind}.ckpt.npz"))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(X)
        save_model(gm, root / f"{kind}.npz", metadata={"source": {"path": "x.zarr"}})
        out[kind] = ((root / f"{kind}.npz").read_bytes(), (root / f"{kind}.ckpt.npz").read_bytes())
    return out, X


def check_model_outcome(path, X):
    started = time.monotonic()
    try:
        model = load_model(path)
    except ModelFormatError as exc:
        assert str(exc).startswith(str(path))
        model = None
    assert time.monotonic() - started < SECONDS
    if model is not None:  # whatever loads must work
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
            assert np.all(np.isfinite(getattr(model, name)))
        assert np.all(np.isfinite(model.score_samples(X)))


def check_checkpoint_outcome(path):
    started = time.monotonic()
    try:
        state = load_checkpoint(str(path))
    except CheckpointError as exc:
        assert str(path) in str(exc)
        state = None
    assert time.monotonic() - started < SECONDS
    if state is not None:
        for run in state.runs:
            assert all(np.all(np.isfinite(run[name])) for name in ("weights", "means", "covariances"))


@FUZZ
@given(data=st.data(), which=st.sampled_from(["model", "checkpoint"]), kind=st.sampled_from(["full", "diag"]))
def test_truncated_and_flipped_bytes(tmp_path_factory, files, data, which, kind):
    (model_bytes, checkpoint_bytes), X = files[0][kind], files[1]
    payload = model_bytes if which == "model" else checkpoint_bytes
    path = tmp_path_factory.mktemp("bytes") / "f.npz"
    path.write_bytes(damaged(data, payload, truncate=data.draw(st.booleans()), max_flips=8))
    check_model_outcome(path, X) if which == "model" else check_checkpoint_outcome(path)


def rewrite_npz(payload: bytes, edit) -> bytes:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        arrays = dict(f)
    meta = json.loads(str(arrays.pop("meta")))
    meta, arrays = edit(meta, arrays)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta, default=str)), **arrays)
    return buffer.getvalue()


def set_path(tree, path, value):
    node = tree
    for part in path[:-1]:
        if not isinstance(node, dict):
            return tree
        node = node.setdefault(part, {})
    if isinstance(node, dict):
        node[path[-1]] = value
    return tree


MODEL_KEYS = [("format",), ("format_version",), ("covariance_type",), ("n_components",), ("n_features",),
              ("dtype",), ("params",), ("fitted",), ("params", "tol"), ("params", "random_state"),
              ("params", "chunk_size"), ("params", "n_components"), ("fitted", "n_iter"), ("fitted", "converged"),
              ("fitted", "lower_bound"), ("fitted", "lower_bounds"), ("fitted", "feature_names"), ("fit",)]
CHECKPOINT_KEYS = [("format",), ("format_version",), ("fingerprint",), ("n_iter",), ("active",), ("runs",),
                   ("fingerprint", "n_components"), ("fingerprint", "n_features"), ("fingerprint", "covariance_type"),
                   ("runs", 0)]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**30, -1, 0, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["full", "diag"]), value=json_values)
def test_any_metadata_value(tmp_path_factory, files, data, kind, value):
    (model_bytes, checkpoint_bytes), X = files[0][kind], files[1]
    which = data.draw(st.sampled_from(["model", "checkpoint"]))
    key = data.draw(st.sampled_from(MODEL_KEYS if which == "model" else CHECKPOINT_KEYS))

    def edit(meta, arrays):
        if key == ("runs", 0) and isinstance(meta.get("runs"), list):
            meta["runs"][0] = value
            return meta, arrays
        return set_path(meta, key, value), arrays

    path = tmp_path_factory.mktemp("meta") / "f.npz"
    path.write_bytes(rewrite_npz(model_bytes if which == "model" else checkpoint_bytes, edit))
    check_model_outcome(path, X) if which == "model" else check_checkpoint_outcome(path)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["full", "diag"]),
       shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
       dtype=st.sampled_from(["f8", "f4", "i8", "u1", "c16", "?", "U3", "S2", "m8[s]", "f2"]),
       fill=st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, 1e300]))
def test_any_array_in_place_of_a_parameter(tmp_path_factory, files, data, kind, shape, dtype, fill):
    (model_bytes, checkpoint_bytes), X = files[0][kind], files[1]
    which = data.draw(st.sampled_from(["model", "checkpoint"]))
    names = ["weights", "means", "covariances", "precisions_cholesky"]
    name = data.draw(st.sampled_from(names if which == "model" else [f"run0_{n}" for n in names]))
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            replacement = np.full(shape, fill).astype(dtype)
    except (ValueError, TypeError, OverflowError):
        replacement = np.zeros(shape, dtype=dtype)

    def edit(meta, arrays):
        arrays[name] = replacement
        return meta, arrays

    path = tmp_path_factory.mktemp("arrays") / "f.npz"
    path.write_bytes(rewrite_npz(model_bytes if which == "model" else checkpoint_bytes, edit))
    check_model_outcome(path, X) if which == "model" else check_checkpoint_outcome(path)


def test_zip_level_oddities(tmp_path, files):
    """Compressed, duplicated, encrypted-flagged or missing members; a zip bomb of a 'meta' member."""
    (model_bytes, _), X = files[0]["full"], files[1]
    with zipfile.ZipFile(io.BytesIO(model_bytes)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    variants = {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:  # compressed members still load
        for n, d in members.items():
            z.writestr(n, d)
    variants["deflated"] = (buffer.getvalue(), True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:  # 'meta' inflating to 1 GB
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<U268435456", "fortran_order": False, "shape": ()})
        z.writestr("meta.npy", header.getvalue() + b"\0" * (2**30))
        for n, d in members.items():
            if n != "meta.npy":
                z.writestr(n, d)
    variants["meta-bomb"] = (buffer.getvalue(), False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for n, d in members.items():
            if n != "weights.npy":
                z.writestr(n, d)
    variants["missing-member"] = (buffer.getvalue(), False)
    flagged = bytearray(model_bytes)  # set the "encrypted" flag bit of every central directory entry
    at = flagged.find(b"PK\x01\x02")
    while at >= 0:
        flagged[at + 8] |= 1
        at = flagged.find(b"PK\x01\x02", at + 4)
    variants["encrypted-flag"] = (bytes(flagged), False)
    for name, (payload, loads) in variants.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(payload)
        started = time.monotonic()
        if loads:
            check_model_outcome(path, X)
            load_model(path)
        else:
            with pytest.raises(ModelFormatError):
                load_model(path)
        assert time.monotonic() - started < 30, name
