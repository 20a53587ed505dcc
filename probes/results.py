"""Probe results on disk: netCDF files that reopen identically and refuse to mix models."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import xarray as xr
from transformers import PreTrainedModel

from eemllm_models.files import atomic_write

from .runner import model_attrs


class ResultMismatch(ValueError):
    """A probe result was made from another model (or is not a probe result at all)."""


def save_result(result: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a probe result to netCDF (h5netcdf) atomically: a crash never leaves half a file."""
    return atomic_write(path, lambda tmp: result.to_netcdf(tmp, engine="h5netcdf"))


def open_result(path: str | os.PathLike, model: PreTrainedModel | None = None, probe: str | None = None
                ) -> xr.Dataset:
    """Load a probe result written by :func:`save_result`, checking that it fits ``model`` and ``probe``.

    Raises :class:`ResultMismatch` when the file holds another probe's result, or was measured on
    a model with another name or layer count than ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no probe result at {path}; run `eemllm probe` (or save_result) to make it")
    result = xr.load_dataset(path, engine="h5netcdf")
    found = result.attrs.get("probe")
    if found is None:
        raise ResultMismatch(f"{path} is not an eemllm probe result (no 'probe' attribute)")
    if probe is not None and found != probe:
        raise ResultMismatch(f"{path} holds a {found} result, not {probe}; pass the {probe} file")
    if model is not None:
        expected = model_attrs(model)
        for key in ("model", "n_layers"):
            if result.attrs.get(key) != expected[key]:
                raise ResultMismatch(
                    f"{path} was measured on model {result.attrs.get('model')!r} ({result.attrs.get('n_layers')} "
                    f"layers), not on {expected['model']!r} ({expected['n_layers']} layers); probe this model first "
                    "(eemllm probe --model ...)")
    return result


def to_frame(result: xr.Dataset, variable: str) -> pd.DataFrame:
    """One data variable as a tidy frame (one row per value, one column per dim and coordinate), for seaborn."""
    if variable not in result.data_vars:
        raise KeyError(f"no variable {variable!r} in this result; it has {sorted(result.data_vars)}")
    return result[variable].to_dataframe().reset_index()
