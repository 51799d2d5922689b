"""Bad configs and bad inputs: a clear message naming the key, a non-zero exit, nothing written."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_helpers import blobs, json_lines, run_dgmm, write_config


@pytest.fixture
def workdir(tmp_path):
    np.save(tmp_path / "x.npy", blobs(300, 2))
    return tmp_path


def listing(path):
    return sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files)


def base(workdir, **sections):
    config = {"input": {"path": str(workdir / "x.npy")}, "model": {"n_components": 2},
              "cluster": {"type": "threads"}, "output": {"model": str(workdir / "out" / "model.npz")}}
    config.update(sections)
    return config


@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        (lambda c: c["model"].update(n_components=0), [], "model.n_components: must be an int >= 1, got 0"),
        (lambda c: c["model"].update(covariance="full"), [], "model.covariance: unknown key (did you mean "
                                                             "'covariance_type'?)"),
        (lambda c: c["input"].update(path="missing.zarr"), [], "input.path: missing.zarr does not exist"),
        (lambda c: None, ["model.max_iter=-1"], "model.max_iter: must be an int >= 0, got -1"),
        # outputs whose folder cannot be made: failed after the cluster started (fit: at the first
        # checkpoint), exit 1, with "[Errno 17] File exists" or the temporary file's name
        (lambda c: c["output"].update(model=c["input"]["path"] + "/sub/model.npz"), [],
         "x.npy is a file, not a directory"),
        (lambda c: c["output"].update(checkpoint=c["input"]["path"] + "/ck.npz"), [],
         "output.checkpoint: cannot write "),
        # the reader's own complaint ("Parquet magic bytes not found", exit 1) used to come first
        (lambda c: c["input"].update(format="parquet"), [],
         "x.npy holds .npy data, not Parquet; set input.format to 'npy' or 'auto'"),
    ],
)  # (every other config error is checked in-process by test_config.py)
def test_bad_configs_exit_2_name_the_key_and_write_nothing(workdir, edit, overrides, message):
    config = base(workdir)
    edit(config)
    path = write_config(workdir / "bad.yaml", config)
    before = listing(workdir)
    result = run_dgmm("fit", path, *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 2
    assert result.stderr.startswith(f"dgmm: error: {path}: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""  # nothing ran: no data or cluster line
    assert listing(workdir) == before


def test_yaml_that_is_not_a_mapping_in_json_log_format(workdir):
    path = workdir / "list.yaml"
    path.write_text("- input\n- model\n")
    result = run_dgmm("fit", path, "--log-format", "json")
    assert result.returncode == 2
    (entry,) = json_lines(result.stderr)
    assert entry["level"] == "error" and entry["event"] == "error" and entry["kind"] == "config"
    assert entry["message"].startswith(f"{path}: the config must be a mapping of sections")


def test_bad_data_exits_1_with_a_clear_message_and_no_model(workdir):
    X = blobs(300, 2)
    X[[17, 200], 1] = np.nan
    table = pa.table({"a": X[:, 0], "b": X[:, 1], "s": ["x"] * 300})
    pq.write_table(table, workdir / "t.parquet", row_group_size=64)
    config = base(workdir, input={"path": str(workdir / "t.parquet"), "columns": ["a", "s"]})
    path = write_config(workdir / "c.yaml", config)
    result = run_dgmm("fit", path)  # the data is fine, the setting is not: a config error naming the key
    assert result.returncode == 2 and result.stdout == ""
    assert f"dgmm: error: {path}: input.columns: {workdir / 't.parquet'}: column 's' has type string" in result.stderr
    missing = run_dgmm("fit", path, "--set", "input.columns=[a, nope]")
    assert missing.returncode == 2 and "input.columns:" in missing.stderr and "column 'nope' not found" in missing.stderr
    result = run_dgmm("fit", path, "--set", "input.columns=[a, b]")
    assert result.returncode == 1
    assert "Input X contains NaN or infinity: 2 of 300 rows have non-finite values (first at row 17)" in result.stderr
    assert not (workdir / "out" / "model.npz").exists()
    assert [f for f in listing(workdir) if f.startswith("out")] == []


def test_predict_with_a_model_of_other_features_is_refused(workdir):
    from dgmm import GaussianMixture, save_model

    save_model(GaussianMixture(2, random_state=0).fit(blobs(200, 3)), workdir / "m3.npz")
    config = base(workdir, predict={"output": str(workdir / "p.zarr")})
    path = write_config(workdir / "c.yaml", config)
    result = run_dgmm("predict", path, "--model", workdir / "m3.npz")
    assert result.returncode == 2  # the config pairs a model with data it does not fit
    assert "input.path:" in result.stderr and "has 2 features, but the model" in result.stderr
    assert "was fitted on 3" in result.stderr
    assert not (workdir / "p.zarr").exists()
    missing = run_dgmm("predict", path)
    assert missing.returncode == 2 and "output.model:" in missing.stderr and "does not exist" in missing.stderr


def test_sample_arguments_that_cannot_work_exit_2(workdir):
    from dgmm import GaussianMixture, save_model

    save_model(GaussianMixture(2, random_state=0).fit(blobs(200, 3)), workdir / "m.npz")
    (workdir / "s.npy").write_bytes(b"keep")
    exists = run_dgmm("sample", workdir / "m.npz", "-n", 5, "-o", workdir / "s.npy")
    assert exists.returncode == 2 and "s.npy exists; pass --overwrite" in exists.stderr
    assert (workdir / "s.npy").read_bytes() == b"keep"
    none = run_dgmm("sample", workdir / "m.npz", "-n", 0)
    assert none.returncode == 2 and "--n-samples: must be >= 1, got 0" in none.stderr and none.stdout == ""
    csv = run_dgmm("sample", workdir / "m.npz", "-n", 5, "-o", workdir / "s.csv")  # refused before sampling
    assert csv.returncode == 2 and "-o: " in csv.stderr and "must end in .npy, .zarr or .parquet" in csv.stderr
    for command in (("info",), ("sample", "-n", 3)):  # a missing model named on the command line, as in a config
        missing = run_dgmm(command[0], workdir / "none.npz", *command[1:])
        assert missing.returncode == 2 and f"{workdir / 'none.npz'}: no such model file" in missing.stderr
        folder = run_dgmm(command[0], workdir, *command[1:])  # not "[Errno 21] Is a directory", exit 1
        assert folder.returncode == 2 and f"{workdir} is a directory, not a model file" in folder.stderr


def test_a_transposed_input_is_refused_before_the_cluster_starts(workdir):
    """20 rows of 100,000 features, 'full': 640 GB of covariances. One line, exit 2, no cluster, nothing written."""
    np.save(workdir / "wide.npy", np.zeros((20, 100_000), dtype=np.float32))
    config = base(workdir, cluster={"n_workers": 1})  # a LocalCluster that must not start
    path = write_config(workdir / "c.yaml", {**config, "input": {"path": str(workdir / "wide.npy")}})
    for command in ("fit", "select"):
        result = run_dgmm(command, path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        key = "model.covariance_type" if command == "fit" else "--n-components/--covariance-types"  # what to change
        assert re.search(re.escape(key) + r": covariance_type='(full|tied)' with \d+ components of 100000 "
                         r"features needs about", line), line
        assert "is it transposed?" in line and "cluster:" not in result.stdout
    assert not (workdir / "out").exists()


def test_storage_option_values_must_be_yaml(workdir):
    from dgmm import GaussianMixture, save_model

    save_model(GaussianMixture(2, random_state=0).fit(blobs(200, 3)), workdir / "m.npz")
    for command in ("info", "sample"):
        bad = run_dgmm(command, workdir / "m.npz", "--storage-option", "anon=[1")
        assert bad.returncode == 2 and "--storage-option: the value of 'anon' is not valid YAML" in bad.stderr
        missing = run_dgmm(command, workdir / "m.npz", "--storage-option", "anon")
        assert missing.returncode == 2 and "expected KEY=VALUE, got 'anon'" in missing.stderr


def test_a_failing_task_on_a_local_cluster_is_one_error_line(workdir):
    """The workers' own "Compute Failed" logs are not printed: the command reports the error once."""
    from dgmm import GaussianMixture, save_model

    X = blobs(300, 2)
    save_model(GaussianMixture(2, random_state=0).fit(X), workdir / "m.npz")
    X[123, 0] = np.nan
    np.save(workdir / "nan.npy", X)
    config = base(workdir, input={"path": str(workdir / "nan.npy")}, cluster={"n_workers": 1},
                  output={"model": str(workdir / "m.npz")}, predict={"output": str(workdir / "p.zarr")})
    result = run_dgmm("predict", write_config(workdir / "c.yaml", config), "--quiet")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("dgmm: error: Input X contains NaN or infinity") and "first at row 123" in line
    assert not (workdir / "p.zarr").exists()


def run_dgmm_without_pyarrow(*args, cwd):
    """``dgmm ARGS`` in a process where pyarrow cannot be imported (as after ``pip install dgmm``)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['pyarrow'] = None\n"  # import pyarrow raises, find_spec says None
            "from dgmm.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def test_parquet_without_the_parquet_extra_is_a_clear_error_before_any_work(workdir):
    """A plain install has no pyarrow: fit, predict and sample with Parquet ended in a
    ModuleNotFoundError traceback (fit after `dgmm check` had said the config was fine)."""
    X = blobs(300, 2)
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1]}), workdir / "t.parquet")
    os.rename(workdir / "t.parquet", workdir / "table")  # found by its contents, not a suffix
    config = write_config(workdir / "p.yaml", base(workdir, input={"path": str(workdir / "table")}))
    hint = "needs pyarrow, which is not installed: pip install 'dgmm[parquet]'"
    for command in (("fit", config), ("check", config, "--for", "fit"), ("select", config)):
        result = run_dgmm_without_pyarrow(*command, cwd=workdir)
        assert result.returncode == 2, result.stderr
        assert f"dgmm: error: {config}: input.path: {workdir / 'table'}: reading Parquet {hint}" in result.stderr
        assert "Traceback" not in result.stderr
    config = write_config(workdir / "n.yaml", base(workdir, predict={"output": str(workdir / "pred.parquet")}))
    assert run_dgmm("fit", config).returncode == 0
    before = listing(workdir)
    result = run_dgmm_without_pyarrow("predict", config, cwd=workdir)
    assert result.returncode == 2 and f"predict.output: writing Parquet {hint}" in result.stderr, result.stderr
    result = run_dgmm_without_pyarrow("sample", workdir / "out" / "model.npz", "-o", workdir / "s.parquet", cwd=workdir)
    assert result.returncode == 2 and f"dgmm: error: writing Parquet {hint}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and listing(workdir) == before
