"""Helpers for tests that run the real ``dgmm`` command in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import yaml


def run_dgmm(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m dgmm.cli ARGS`` (the console script's entry point) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dgmm.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write_config(path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def blobs(n_samples=3000, n_features=3, seed=0):
    """Three well-separated blobs with a little overlap."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0] * n_features, [5.0] + [1.0] * (n_features - 1), [1.0] + [-4.0] * (n_features - 1)])
    labels = rng.integers(0, 3, size=n_samples)
    return centers[labels] + rng.normal(size=(n_samples, n_features)) * np.array([1.0, 0.7, 1.3][:n_features] +
                                                                                  [1.0] * max(n_features - 3, 0))
