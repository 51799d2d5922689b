"""Config files: validated before anything runs; every error names the file and the key."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from dgmm.cli import DEMO_CONFIG
from dgmm.config import ConfigError, _safe_load_unique, apply_overrides, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REMOTE = {"path": "s3://bucket/x.zarr"}  # not checked for existence


def parse(raw, **kwargs):
    return parse_config(raw, source="x.yaml", **kwargs)


def test_defaults_follow_sklearn_and_cluster_is_local_on_loopback():
    config = parse({"input": REMOTE})
    assert config.model.n_components == 1 and config.model.covariance_type == "full"
    assert config.model.tol == 1e-3 and config.model.max_iter == 100 and config.model.init_params == "kmeans"
    assert config.cluster.kind == "local" and config.cluster.host == "127.0.0.1"
    assert config.cluster.dashboard_address.startswith("127.0.0.1:")
    assert config.output.checkpoint_every == 1


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"input": REMOTE, "model": {"n_components": 0}}, "x.yaml: model.n_components: must be an int >= 1, got 0"),
        ({"input": {"path": "s3://b/t.parquet", "columns": ["x0", "x1", "x0"]}},
         "x.yaml: input.columns: lists the column 'x0' twice"),
        ({"input": REMOTE, "model": {"n_component": 3}}, "x.yaml: model.n_component: unknown key (did you mean "
                                                         "'n_components'?)"),
        ({"input": REMOTE, "modle": {}}, "x.yaml: modle: unknown key (did you mean 'model'?)"),
        ({"input": REMOTE, "model": {"n_components": "four"}}, "x.yaml: model.n_components: must be an int, got a "
                                                              "string ('four')"),
        ({"input": REMOTE, "model": {"n_components": True}}, "model.n_components: must be an int, got a bool"),
        ({"input": REMOTE, "model": {"covariance_type": "ful"}}, "model.covariance_type: must be one of 'full'"),
        ({"input": REMOTE, "model": {"tol": -1}}, "model.tol: must be a float >= 0, got -1.0"),
        ({"input": REMOTE, "model": {"tol": "small"}}, "model.tol: must be a number"),
        ({"input": REMOTE, "model": {"reg_covar": float("nan")}}, "model.reg_covar: must be a finite number"),
        ({"input": REMOTE, "model": {"max_iter": 1.5}}, "model.max_iter: must be an int, got float 1.5"),
        ({"input": REMOTE, "model": {"random_state": -3}}, "model.random_state: must be an int in [0, 2**32)"),
        ({"input": REMOTE, "model": [1, 2]}, "x.yaml: model: must be a mapping, got a list"),
        ({"model": {}}, "x.yaml: input: is required"),
        ({"input": {"format": "zarr"}}, "x.yaml: input.path: is required"),
        ({"input": {**REMOTE, "columns": ["a"]}}, "input.columns: selects Parquet columns, but the input format is "
                                                  "zarr"),
        ({"input": {**REMOTE, "storage_options": [1]}}, "input.storage_options: must be a mapping"),
        ({"input": REMOTE, "cluster": {"type": "address"}}, "cluster.address: is required when cluster.type is "
                                                             "'address'"),
        ({"input": REMOTE, "cluster": {"address": "localhost:8786"}}, "cluster.address: must be a scheduler URL"),
        ({"input": REMOTE, "cluster": {"n_workers": 0}}, "cluster.n_workers: must be an int >= 1 or null"),
        ({"input": REMOTE, "cluster": {"timeout": 0}}, "cluster.timeout: must be a number of seconds > 0"),
        ({"input": REMOTE, "cluster": {"timeout": 5}}, "cluster.timeout: only applies to cluster.type 'address' "
                                                       "(connecting to an existing scheduler), not 'local'"),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "slurm", "cores": 4, "memory": "8GB"}, "timeout": 5}},
         "cluster.timeout: only applies to cluster.type 'address' (connecting to an existing scheduler), not "
         "'jobqueue'; use jobqueue.wait_timeout"),
        ({"input": REMOTE, "cluster": {"stall_warning": 0}}, "cluster.stall_warning: must be a number of seconds > 0, "
                                                             "or null for no warning, got 0"),
        ({"input": REMOTE, "cluster": {"type": "threads", "stall_warning": 5}},
         "cluster.stall_warning: only applies to clusters with workers (local, address, jobqueue), not 'threads'"),
        ({"input": REMOTE, "cluster": {"memory_limit": "lots"}}, "cluster.memory_limit: must be 'auto', null or a "
                                                                 "size"),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "slurm", "cores": 4}}},
         "cluster.jobqueue.memory: is required"),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "torque", "cores": 4, "memory": "8GB"}}},
         "cluster.jobqueue.system: must be one of 'slurm', 'pbs', 'sge', 'lsf'"),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "pbs", "cores": 4, "memory": "8GB", "walltime": "2h"}}},
         "cluster.jobqueue.walltime: must look like 'HH:MM:SS'"),
        ({"input": REMOTE, "cluster": {"address": "tcp://a:1", "n_workers": 4}},
         "cluster.n_workers: only applies to cluster.type 'local' (a LocalCluster), not 'address': the existing "
         "cluster's workers are its own"),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "slurm", "cores": 1, "memory": "1GB"},
                                       "memory_limit": "1GB"}},
         "cluster.memory_limit: only applies to cluster.type 'local' (a LocalCluster), not 'jobqueue': set the "
         "workers in the jobqueue section"),
        ({"input": REMOTE, "cluster": {"type": "threads", "host": "10.0.0.1"}},
         "cluster.host: only applies to cluster.type 'local'"),
        (yaml.safe_load("input: {path: s3://b/x.zarr}\ncluster: {jobqueue: {system: slurm, cores: 1, memory: 1GB, "
                        "walltime: 12:00:00}}"),  # YAML 1.1: a sexagesimal int
         'cluster.jobqueue.walltime: must be a string, got int 43200 (YAML reads an unquoted time such as 12:00:00 '
         'as a number: quote it, walltime: "12:00:00")'),
        ({"input": REMOTE, "cluster": {"jobqueue": {"system": "pbs", "cores": 4, "memory": "8GB", "processes": 8}}},
         "cluster.jobqueue.processes: must be an int in [1, cores=4], got 8"),
        ({"input": REMOTE, "cluster": {"address": "tcp://a:1", "jobqueue": {"system": "pbs", "cores": 1,
                                                                             "memory": "1GB"}}},
         "cluster.address: cannot be combined with a jobqueue section"),
        ({"input": REMOTE, "output": {"checkpoint_every": -1}}, "output.checkpoint_every: must be an int >= 0"),
        ({"input": REMOTE, "predict": {"output": "out.csv"}}, "predict.format: cannot be inferred from 'out.csv'"),
        ({"input": REMOTE, "predict": {"output": "o.zarr", "labels": False}}, "predict.labels: nothing to write"),
        ({"input": REMOTE, "predict": {"labels": True}}, "predict.output: is required"),
        ({"input": REMOTE, "predict": {"output": "o.zarr", "compressor": "gzip"}},
         "predict.compressor: must be one of 'default', 'blosc-lz4', 'blosc-zstd', 'zstd', 'none'"),
        ({"input": REMOTE, "predict": {"output": "o.parquet", "compressor": "none"}},
         "predict.compressor: applies to Zarr outputs; Parquet keeps pyarrow's compression, got 'none'"),
        ({"input": REMOTE, 3: 4}, "x.yaml: 3: unknown key"),
    ],
)
def test_bad_configs_name_the_file_and_key(raw, message):
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert message in str(info.value)


def test_a_missing_input_is_an_error_of_the_commands_not_of_the_config():
    """Plain ``dgmm check`` validates a config for another machine; fit, predict and score need the data here."""
    for path in ("no/such/file.zarr", "file:///no/such/file.zarr"):
        raw = {"input": {"path": path}, "output": {"model": "m.npz"}, "predict": {"output": "p.zarr"}}
        assert parse(raw).input.path == path
        for command in ("fit", "predict", "score"):
            with pytest.raises(ConfigError, match=f"^x.yaml: input.path: {path} does not exist$"):
                parse_config(raw, source="x.yaml", command=command)


def test_yaml_that_is_not_a_mapping(tmp_path):
    for text, kind in (("- a\n- b\n", "a list"), ("just a string\n", "a string")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path}: the config must be a mapping of sections .* got {kind}"):
            load_config(path)
    path.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_an_error_but_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x.npy}\nmodel:\n  n_components: 4\n  tol: 0.01\n  n_components: 5\n")
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*found the key 'n_components' twice \(first on line 3\)"
                                          r".*line 5"):
        load_config(path)
    path.write_text("input: {path: x.npy}\ninput: {path: y.npy}\n")
    with pytest.raises(ConfigError, match="found the key 'input' twice"):
        load_config(path)
    path.write_text("defaults: &d {n_components: 4, tol: 0.01}\nmodel:\n  <<: *d\n  n_components: 5\n")
    with pytest.raises(ConfigError, match="defaults: unknown key"):  # the merge itself was accepted
        load_config(path)
    path.write_text("x-defaults: &d {n_components: 4, tol: 0.01}\n")
    assert _safe_load_unique(path.read_text() + "m:\n  <<: *d\n  n_components: 5\n")["m"] == {
        "n_components": 5, "tol": 0.01}


def test_set_overrides_are_parsed_as_yaml_never_evaluated():
    raw = {"input": dict(REMOTE), "model": {"n_components": 2}}
    config = parse(raw, overrides=["model.n_components=5", "model.tol=1e-4", "model.random_state=null",
                                   "cluster.n_workers=3", "input.columns=[a, b]", "input.format=parquet"])
    assert config.model.n_components == 5 and config.model.tol == 1e-4 and config.model.random_state is None
    assert config.cluster.n_workers == 3 and config.input.columns == ["a", "b"]
    assert raw["model"]["n_components"] == 2  # the parsed YAML is not modified
    # a Python expression is just a string, and then the wrong type
    with pytest.raises(ConfigError, match="model.n_components: must be an int, got a string"):
        parse(raw, overrides=["model.n_components=__import__('os').getpid()"])
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        parse(raw, overrides=["model.n_components"])
    with pytest.raises(ConfigError, match="input.path is a string"):
        apply_overrides(raw, ["input.path.deeper=1"], source="x.yaml")
    with pytest.raises(ConfigError, match="model.n_componets: unknown key"):
        parse(raw, overrides=["model.n_componets=3"])


def test_yaml_1_1_exponent_without_dot_is_a_number():
    config = parse(yaml.safe_load("input: {path: s3://b/x.zarr}\nmodel: {tol: 1e-3, reg_covar: 1e-6}\n"))
    assert config.model.tol == 1e-3 and config.model.reg_covar == 1e-6


def test_command_checks(tmp_path):
    model = tmp_path / "m.npz"
    base = {"input": REMOTE, "output": {"model": str(model)}}
    with pytest.raises(ConfigError, match="output.model: is required by 'dgmm fit'"):
        parse({"input": REMOTE}, command="fit")
    with pytest.raises(ConfigError, match=f"output.model: {model} does not exist; run 'dgmm fit' first"):
        parse(base, command="score")
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"output.model: {model} exists; set output.overwrite: true"):
        parse(base, command="fit")
    parse(base, overrides=["output.overwrite=true"], command="fit")
    with pytest.raises(ConfigError, match="predict: a predict section"):
        parse(base, command="predict")
    (tmp_path / "p.zarr").mkdir()
    with pytest.raises(ConfigError, match="predict.output: .*p.zarr exists"):
        parse({**base, "predict": {"output": str(tmp_path / "p.zarr")}}, command="predict")


def test_checkpoint_lives_beside_the_model():
    config = parse({"input": REMOTE, "output": {"model": "results/m.npz"}})
    assert config.output.checkpoint_path == "results/m.checkpoint.npz"
    assert parse({"input": REMOTE, "output": {"model": "m.npz", "checkpoint_every": 0}}).output.checkpoint_path is None


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_example_configs_are_valid(name, tmp_path):
    data = tmp_path / ("data.parquet" if "parquet" in name else "data.zarr")
    data.mkdir()
    overrides = [f"input.path={data}"] if "s3" not in name else []
    if name == "gpu.yaml" and importlib.util.find_spec("cupy") is None:
        with pytest.raises(ConfigError, match=r"input\.device: gpu needs CuPy .*dgmm\[gpu\]"):
            load_config(CONFIGS / name, overrides)
        overrides.append("input.device=cpu")  # the rest of the file must be valid all the same
    config = load_config(CONFIGS / name, overrides)
    assert config.source.endswith(name)
    if name == "slurm.yaml":
        assert config.cluster.kind == "jobqueue" and config.cluster.jobqueue.system == "slurm"
    if name == "scheduler.yaml":
        assert config.cluster.kind == "address"
    printed = config.to_dict(redact=False)  # what `dgmm check` prints: the type resolved, parsing back the same
    assert printed["cluster"]["type"] == config.cluster.kind
    assert printed["output"]["checkpoint"] == config.output.checkpoint_path  # where checkpoints go, not null
    assert parse_config(yaml.safe_load(yaml.safe_dump(printed)), source=name).to_dict(redact=False) == printed
    text = (CONFIGS / name).read_text().lower()
    assert "secret" not in text.replace("aws_secret_access_key", "") and "password" not in text


def test_demo_config_file_is_what_dgmm_demo_runs():
    assert yaml.safe_load((CONFIGS / "demo.yaml").read_text()) == DEMO_CONFIG
    config = parse_config(DEMO_CONFIG, source="demo")
    assert config.input.synthetic.n_samples == 2_000_000 and not os.path.isabs(config.input.path)


def test_an_empty_storage_options_section_is_no_options():
    """With its one entry commented out, `storage_options:` is null in YAML: no options, not an error."""
    raw = yaml.safe_load("input:\n  path: s3://b/x.zarr\n  storage_options:\n    # anon: true\n")
    assert raw["input"]["storage_options"] is None
    assert parse(raw).input.storage_options == {}


def test_credentials_are_redacted_from_the_printed_config():
    config = parse({"input": {**REMOTE, "storage_options": {"key": "AKIA", "secret": "s3cr3t", "anon": False,
                                                             "client_kwargs": {"aws_session_token": "t"}}}})
    options = config.to_dict()["input"]["storage_options"]
    assert options == {"key": "<redacted>", "secret": "<redacted>", "anon": False,
                       "client_kwargs": {"aws_session_token": "<redacted>"}}
    assert config.input.storage_options["secret"] == "s3cr3t"  # still used to read the data


def test_predict_compressor_choices_are_the_writers():
    import typing

    from dgmm.config import PredictConfig
    from dgmm.io import COMPRESSORS

    assert typing.get_args(typing.get_type_hints(PredictConfig)["compressor"]) == COMPRESSORS


def test_a_file_url_input_is_a_local_path(tmp_path):
    """``file:///abs/x.zarr`` names the local file: it exists for the config check as it does for the readers."""
    import numpy as np
    import zarr

    from dgmm.io import open_input

    zarr.create_array(str(tmp_path / "x.zarr"), data=np.arange(12.0).reshape(6, 2), chunks=(3, 2))
    url = (tmp_path / "x.zarr").as_uri()
    config = parse_config({"input": {"path": url}}, source="x.yaml")
    np.testing.assert_array_equal(open_input(config.input.path).compute(), np.arange(12.0).reshape(6, 2))
