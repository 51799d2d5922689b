"""dgmm: Gaussian mixture models fitted by out-of-core EM over Dask arrays.

A drop-in for :class:`sklearn.mixture.GaussianMixture` whose data never has to
fit in memory: every EM iteration is one pass over the chunks of a dask array
(or Zarr array, or dask DataFrame), each chunk yields small sufficient
statistics, and those are tree-reduced into one M-step.
"""

from __future__ import annotations

from ._version import __version__
from .estimator import DegenerateComponentWarning, GaussianMixture, IterationInfo
from .model_io import from_sklearn, load_model, save_model, to_sklearn
from .namespace import to_gpu
from .selection import ModelSelection, select

__all__ = [
    "DegenerateComponentWarning",
    "GaussianMixture",
    "IterationInfo",
    "ModelSelection",
    "__version__",
    "from_sklearn",
    "load_model",
    "save_model",
    "select",
    "to_gpu",
    "to_sklearn",
]
