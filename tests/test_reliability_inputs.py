"""A bad-input matrix for the ``dgmm`` command: each case its own clear message, a non-zero exit, no output.

Every case writes real files (Zarr, Parquet, ``.npy``, models, checkpoints,
YAML) and runs the command's entry point (:func:`dgmm.cli.main`, in this
process; the exit status is what ``main`` returns to ``sys.exit``). After
each run nothing that looks like a finished output may exist: no model, no
checkpoint, no prediction directory, no staging or temporary file.

Cases already covered elsewhere and not repeated here: a non-numeric Parquet
column and NaN in Parquet (``test_cli_errors.py``), YAML that is not a mapping
(``test_config.py``, ``test_cli_errors.py``), a scheduler port nobody listens on
(``test_cli_cluster.py``), a checkpoint of other settings (``test_cli_resume.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dgmm import GaussianMixture, save_model
from cli_helpers import blobs, write_config


def files_under(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs) + \
        sorted(os.path.relpath(os.path.join(r, d), path) + "/" for r, ds, _ in os.walk(path) for d in ds)


X = blobs(3000, 3, seed=2)


def zarr_input(tmp_path, data, chunks=(1000, 3), dtype="f8"):
    path = tmp_path / "in.zarr"
    z = zarr.open_array(str(path), mode="w", shape=data.shape, chunks=chunks[: len(data.shape)], dtype=dtype)
    if data.size:
        z[...] = data
    return {"path": str(path)}


def npy_input(tmp_path, data):
    np.save(tmp_path / "in.npy", data)
    return {"path": str(tmp_path / "in.npy")}


def parquet_input(tmp_path, table, **section):
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    return {"path": str(tmp_path / "in.parquet"), **section}


# -- cases: (make(tmp_path) -> (input section, model overrides), expected message) ----------------------------


def nan_and_inf_rows(tmp_path):
    data = X.copy()
    data[[5, 1234, 2999], [0, 2, 1]] = np.nan
    data[400, 1] = -np.inf
    return zarr_input(tmp_path, data), {}


def inf_rows_npy(tmp_path):
    data = X.copy()
    data[[10, 11], 0] = np.inf
    return npy_input(tmp_path, data), {}


def three_dimensional_zarr(tmp_path):
    return zarr_input(tmp_path, X.reshape(1000, 3, 3), chunks=(100, 3, 3)), {}


def one_dimensional_npy(tmp_path):
    return npy_input(tmp_path, X[:, 0]), {}


def missing_parquet_column(tmp_path):
    table = pa.table({"a": X[:, 0], "b": X[:, 1]})
    return parquet_input(tmp_path, table, columns=["a", "nope"]), {}


def parquet_with_nulls(tmp_path):
    mask = np.zeros(len(X), dtype=bool)
    mask[[7, 2500]] = True
    table = pa.table({"a": pa.array(X[:, 0], mask=mask), "b": X[:, 1]})
    return parquet_input(tmp_path, table), {}


def empty_zarr(tmp_path):
    return zarr_input(tmp_path, np.zeros((0, 3))), {}


def empty_parquet(tmp_path):
    return parquet_input(tmp_path, pa.table({"a": pa.array([], pa.float64())})), {}


def empty_npy(tmp_path):
    return npy_input(tmp_path, np.zeros((0, 3))), {}


def fewer_rows_than_components(tmp_path):
    return npy_input(tmp_path, X[:3]), {"n_components": 5}


def constant_feature_without_reg_covar(tmp_path):
    data = X.copy()
    data[:, 1] = 4.2
    return zarr_input(tmp_path, data), {"reg_covar": 0.0}


def identical_rows_without_reg_covar(tmp_path):
    return zarr_input(tmp_path, np.tile([1.0, -2.0, 3.0], (3000, 1))), {"reg_covar": 0.0}


def truncated_zarr_chunk(tmp_path):
    section = zarr_input(tmp_path, X)
    chunk = tmp_path / "in.zarr" / "c" / "1" / "0"  # rows 1000:2000
    chunk.write_bytes(chunk.read_bytes()[:100])
    return section, {}


def garbage_zarr_chunk(tmp_path):
    section = zarr_input(tmp_path, X)
    chunk = tmp_path / "in.zarr" / "c" / "2" / "0"
    chunk.write_bytes(os.urandom(len(chunk.read_bytes())))
    return section, {}


def corrupt_zarr_metadata(tmp_path):
    section = zarr_input(tmp_path, X)
    (tmp_path / "in.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array", ')
    return section, {}


def complex_zarr(tmp_path):
    return zarr_input(tmp_path, X + 1j, dtype="c16"), {}


def truncated_npy(tmp_path):
    section = npy_input(tmp_path, X)
    data = (tmp_path / "in.npy").read_bytes()
    (tmp_path / "in.npy").write_bytes(data[: len(data) // 2])
    return section, {}


def truncated_parquet_footer(tmp_path):
    section = parquet_input(tmp_path, pa.table({"a": X[:, 0], "b": X[:, 1]}))
    data = (tmp_path / "in.parquet").read_bytes()
    (tmp_path / "in.parquet").write_bytes(data[:-10])
    return section, {}


def parquet_files_with_other_columns(tmp_path):
    directory = tmp_path / "in.parquet"
    directory.mkdir()
    pq.write_table(pa.table({"a": X[:1500, 0], "b": X[:1500, 1]}), directory / "part-0.parquet")
    pq.write_table(pa.table({"a": X[1500:, 0], "c": X[1500:, 1]}), directory / "part-1.parquet")
    return {"path": str(directory)}, {}


FIT_CASES = {
    "nan-and-inf-rows": (nan_and_inf_rows, ("Input X contains NaN or infinity: 4 of 3000 rows have non-finite "
                                            "values (first at row 5). Remove or impute them")),
    "inf-rows-npy": (inf_rows_npy, "2 of 3000 rows have non-finite values (first at row 10)"),
    "parquet-nulls": (parquet_with_nulls, ("2 of 3000 rows have non-finite values (first at row 7). Remove or impute "
                                           "them before fitting. In a Parquet input, nulls (missing values) are read "
                                           "as NaN: fill or drop them")),
    "3-d-array": (three_dimensional_zarr, "the Zarr array has shape (1000, 3, 3); dgmm needs a 2-D array"),
    "1-d-array": (one_dimensional_npy, "the array has shape (3000,); dgmm needs a 2-D array"),
    "missing-column": (missing_parquet_column, "column 'nope' not found in"),
    "other-columns-in-a-file": (parquet_files_with_other_columns, "column 'b' not found in"),
    "empty-zarr": (empty_zarr, "Found array with 0 sample(s) (shape=(0, 3)) while a minimum of 2 is required"),
    "empty-parquet": (empty_parquet, "the Parquet data set has no rows"),
    "empty-npy": (empty_npy, "Found array with 0 sample(s)"),
    "n_components>n_samples": (fewer_rows_than_components, ("Expected n_samples >= n_components but got "
                                                            "n_components = 5, n_samples = 3")),
    "constant-feature-reg_covar=0": (constant_feature_without_reg_covar, "ill-defined empirical covariance"),
    "identical-rows-reg_covar=0": (identical_rows_without_reg_covar, "ill-defined empirical covariance"),
    "truncated-zarr-chunk": (truncated_zarr_chunk, "cannot decode rows 1000:2000 of the Zarr array"),
    "garbage-zarr-chunk": (garbage_zarr_chunk, "cannot decode rows 2000:3000 of the Zarr array"),
    "corrupt-zarr-metadata": (corrupt_zarr_metadata, "cannot open as Zarr (JSONDecodeError"),
    "complex-values": (complex_zarr, "Complex data not supported: X has dtype complex128."),
    "truncated-npy": (truncated_npy, "truncated .npy file: its header says 3000 rows x 3 float64"),
    "truncated-parquet": (truncated_parquet_footer, "is not a readable Parquet file"),
}


SELECTION_CASES = {"missing-column", "other-columns-in-a-file"}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_bad_input_to_dgmm_fit(tmp_path, dgmm_cli, case):
    make, message = FIT_CASES[case]
    input_section, model = make(tmp_path)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "input": input_section, "model": {"n_components": 2, "random_state": 0, **model},
        "cluster": {"type": "threads"}, "output": {"model": str(out / "model.npz"), "checkpoint_every": 1},
    })
    status, stdout, stderr = dgmm_cli("fit", config)
    # columns that the data lacks: the setting is what to fix, so a config error naming it (exit 2)
    assert status == (2 if case in SELECTION_CASES else 1), (stdout, stderr)
    assert ("input.columns: " in stderr) == (case in SELECTION_CASES), stderr
    # one error line (warnings, e.g. sklearn's KMeans on identical rows, may come before it when
    # pytest does not capture them: `-p no:warnings`)
    errors = [line for line in stderr.splitlines() if line.startswith("dgmm: error: ")]
    assert len(errors) == 1 and message in stderr[stderr.index("dgmm: error: "):], stderr
    assert "Traceback" not in stderr
    assert ("nulls (missing values) are read as NaN" in stderr) == (case == "parquet-nulls"), stderr
    assert not out.exists() or files_under(out) == [], files_under(out)


# -- model files, checkpoints, predictions --------------------------------------------------------------------


@pytest.fixture
def fitted_setup(tmp_path):
    np.save(tmp_path / "x.npy", X)
    gm = GaussianMixture(2, random_state=0).fit(X)
    save_model(gm, tmp_path / "model.npz")
    config = {"input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 1000}, "model": {"n_components": 2},
              "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "model.npz")},
              "predict": {"output": str(tmp_path / "pred.zarr"), "probabilities": True}}
    return tmp_path, config


def test_model_from_a_newer_format_is_refused_by_every_command(fitted_setup, dgmm_cli):
    tmp_path, config = fitted_setup
    with np.load(tmp_path / "model.npz", allow_pickle=False) as f:
        arrays = dict(f)
    meta = json.loads(str(arrays.pop("meta")))
    meta.update(format_version=meta["format_version"] + 1, dgmm_version="99.0")
    np.savez(tmp_path / "model.npz", meta=np.array(json.dumps(meta)), **arrays)
    path = write_config(tmp_path / "c.yaml", config)
    for args in (("predict", path), ("score", path), ("info", tmp_path / "model.npz"),
                 ("sample", tmp_path / "model.npz", "-n", "5", "-o", tmp_path / "s.npy")):
        status, _, stderr = dgmm_cli(*args)
        assert status == 1, args
        assert "was written by a newer dgmm ('99.0', model format 2)" in stderr and "upgrade dgmm" in stderr
    assert not (tmp_path / "pred.zarr").exists() and not (tmp_path / "s.npy").exists()


def test_checkpoint_from_other_data_is_refused_on_resume(fitted_setup, dgmm_cli):
    tmp_path, config = fitted_setup
    checkpoint = tmp_path / "out.checkpoint.npz"
    GaussianMixture(2, random_state=0, max_iter=2, checkpoint=str(checkpoint)).fit(X[::-1])  # other rows
    before = checkpoint.read_bytes()
    config = {**config, "output": {"model": str(tmp_path / "out.npz"), "checkpoint_every": 1}}
    config["model"] = {"n_components": 2, "random_state": 0}
    status, _, stderr = dgmm_cli("fit", write_config(tmp_path / "c.yaml", config), "--resume")
    assert status == 1
    assert "was written for other data or settings that change the model (differs in: data_digest)" in stderr
    assert not (tmp_path / "out.npz").exists()
    assert checkpoint.read_bytes() == before  # left for the user to inspect, not overwritten


def test_corrupt_checkpoint_is_refused_on_resume(fitted_setup, dgmm_cli):
    tmp_path, config = fitted_setup
    checkpoint = tmp_path / "out.checkpoint.npz"
    GaussianMixture(2, random_state=0, max_iter=2, checkpoint=str(checkpoint)).fit(X)
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    config = {**config, "output": {"model": str(tmp_path / "out.npz"), "checkpoint_every": 1}}
    status, _, stderr = dgmm_cli("fit", write_config(tmp_path / "c.yaml", config), "--resume")
    # a config error (exit 2), before any work: the file is not taken for a checkpoint, nor written over
    assert status == 2 and f"the checkpoint {checkpoint} exists and is not a readable dgmm checkpoint" in stderr
    assert not (tmp_path / "out.npz").exists() and len(checkpoint.read_bytes()) == 300


def test_predict_on_rows_with_nan_writes_nothing(fitted_setup, dgmm_cli):
    tmp_path, config = fitted_setup
    data = X.copy()
    data[2100, 2] = np.nan
    np.save(tmp_path / "x.npy", data)
    status, _, stderr = dgmm_cli("predict", write_config(tmp_path / "c.yaml", config))
    assert status == 1 and "Input X contains NaN or infinity: 1 of the 1000 rows 2000-2999 has non-finite values (first at row 2100)" in stderr
    assert [f for f in os.listdir(tmp_path) if "pred" in f] == []  # neither the output nor its staging


@pytest.mark.parametrize("text, message", [
    ("", "input: is required"),
    ("input: {path: x.npy}\ninput: {path: y.npy}\n", "found the key 'input' twice"),  # not PyYAML's last-wins
    ("input: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("\x00\x01binary", "not valid YAML"),
    ("model: {n_components: 1e400}\n", "model.n_components: must be an int"),
    ("model: {reg_covar: .inf}\n", "model.reg_covar: must be a finite number"),
    ("cluster: {n_workers: 100000000}\n", "cluster.n_workers: must be at most"),
])
def test_odd_yaml_gives_a_config_error(tmp_path, dgmm_cli, text, message):
    np.save(tmp_path / "x.npy", X)
    if "input" not in text and text:
        text += f"input: {{path: {tmp_path / 'x.npy'}}}\n"
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    status, stdout, stderr = dgmm_cli("check", path)
    assert status == 2, (stdout, stderr)
    assert message in stderr and "Traceback" not in stderr


def test_scheduler_that_accepts_but_never_answers_times_out(tmp_path):
    """A TCP port that accepts connections and then says nothing: a timeout, not a hang."""
    np.save(tmp_path / "x.npy", X)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
        port = silent.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", {
            "input": {"path": str(tmp_path / "x.npy")},
            "cluster": {"address": f"tcp://127.0.0.1:{port}", "timeout": 3},
            "output": {"model": str(tmp_path / "model.npz")},
        })
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "dgmm.cli", "fit", config], capture_output=True, text=True,
                                timeout=120, check=False)
        elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"cannot reach the scheduler at tcp://127.0.0.1:{port} within 3 s (connected, but no answer to the " \
           "handshake)" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60, elapsed
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "x.npy"]
