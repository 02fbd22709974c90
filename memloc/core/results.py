"""Result objects: an ``xarray.Dataset`` with a named schema, saved as HDF5 through h5netcdf.

Every analysis returns a :class:`Result`. Its data are labelled (``res.sel(layer="fc1",
subset="noisy")``, ``res["accuracy"]``); every attribute of the dataset is reachable on the result
(``res.coords``, ``res.to_dataframe()``). ``res.save(path)`` writes one HDF5 file atomically
(``PATH.tmpPID`` then ``os.replace``) whose root attributes are ``memloc_schema``,
``memloc_schema_version``, ``memloc_version``, ``created``, ``argv`` and ``config`` (JSON), and for a
result computed from a run, ``run`` (its path) and ``run_fingerprint`` (:attr:`memloc.core.run.Run.fingerprint`,
checked by :meth:`memloc.core.run.Run.result`); dims
and coordinates are HDF5 dimension scales, so the file is also a netCDF-4 file that any xarray
(``xr.open_dataset(path, engine="h5netcdf")``) reads. :func:`load_result` reads it back and
checks it against the schema in :mod:`memloc.core.schemas`.
"""
from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import MemlocError
from .runtime import atomic_path, partial_folder
from . import registry
from .schemas import SCHEMA_VERSION, Schema

__all__ = ["Result", "load_result", "atomic_path"]


def _plain(value):
    """A config value json cannot write: a numpy / torch scalar as its Python value (``np.int64(4)`` is
    ``4``, as the same setting given as ``4``), an array as a list, anything else as its text."""
    if hasattr(value, "tolist") and np.ndim(value) <= 1:
        return value.tolist()
    return str(value)


class Result:
    """A labelled result of one analysis (``name``: a declared analysis, :mod:`memloc.core.registry`).

    ``dataset`` is checked against the schema; ``config`` (JSON-able dict) records the options that
    produced it. Attribute access falls through to the dataset.
    """

    def __init__(self, name: str, dataset: xr.Dataset, *, config: dict | None = None):
        self.name = name
        self._schema = registry.schema(name)   # an unknown name is a MemlocError listing the valid ones
        self.dataset = dataset
        if config is not None:
            self.dataset.attrs["config"] = json.dumps(config, sort_keys=True, default=_plain)
        self.dataset.attrs.setdefault("config", "{}")
        self.schema.check(self.dataset)

    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def config(self) -> dict:
        return json.loads(self.dataset.attrs.get("config", "{}"))

    def __getattr__(self, attr):
        if attr.startswith("__") or attr in ("dataset", "name", "_schema"):
            raise AttributeError(attr)
        return getattr(self.dataset, attr)

    def __getitem__(self, key):
        return self.dataset[key]

    def __contains__(self, key) -> bool:
        return key in self.dataset

    def __repr__(self) -> str:
        return f"<memloc.Result {self.name!r}>\n{self.dataset!r}"

    def equals(self, other: "Result") -> bool:
        """Same schema, same values, dims and coordinates (attributes other than config ignored)."""
        return (isinstance(other, Result) and self.name == other.name and self.config == other.config
                and self.dataset.equals(other.dataset))

    def to_dataframe(self, dim: str = "example"):
        """The variables whose only dimension is ``dim`` as a pandas DataFrame indexed by it."""
        names = [k for k, v in self.dataset.data_vars.items() if v.dims == (dim,)]
        if dim not in self.dataset.dims:
            raise MemlocError(f"result {self.name!r} has no dimension {dim!r}; dims: {', '.join(map(str, self.dataset.dims))}")
        return self.dataset[names].to_dataframe()

    def save(self, path, *, argv=None, run=None) -> Path:
        """Write the result to ``path`` (HDF5 / netCDF-4) atomically; returns the path. ``run``: the run it
        was computed from, whose path and fingerprint it records. The work in progress beside it
        (``<stem>.partial``, the resumable parts of ``RUN/results/<name>.h5``: :mod:`memloc.core.store`)
        is deleted once the result is safe; parts in a folder of your own choosing (``resume=``)
        are yours to delete."""
        from . import __version__
        ds = self.dataset.copy()
        ds.attrs.update(memloc_schema=f"memloc.{self.name}", memloc_schema_version=SCHEMA_VERSION,
                        memloc_version=__version__,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        argv=json.dumps(list(sys.argv if argv is None else argv)))
        if run is not None:
            ds.attrs.update(run=str(Path(run.path).resolve()), run_fingerprint=run.fingerprint)
        encoding = {k: {"zlib": True, "complevel": 4} for k, v in ds.variables.items()
                    if v.size >= 1024 and v.dtype.kind in "biuf"}
        with atomic_path(path) as tmp:
            ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
        self.dataset.attrs.update({k: ds.attrs[k] for k in ("memloc_schema", "created", "argv", "run",
                                                             "run_fingerprint") if k in ds.attrs})
        partial = partial_folder(path)
        if partial.is_dir():
            shutil.rmtree(partial)
        return Path(path)


def load_result(path, name: str | None = None) -> Result:
    """Read a result file written by :meth:`Result.save` (``name``: the expected schema)."""
    path = Path(path)
    if not path.is_file():
        raise MemlocError(f"no result file {str(path)!r}")
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception as e:  # h5py / netCDF raise many types for a damaged file
        raise MemlocError(f"cannot read result file {str(path)!r} ({type(e).__name__}: {e})") from None
    stored = str(ds.attrs.get("memloc_schema", ""))
    found = stored.removeprefix("memloc.")
    if found not in registry.analyses():
        raise MemlocError(f"{str(path)!r} is not a memloc result (schema attribute {stored!r})")
    if name is not None and found != name:
        raise MemlocError(f"{str(path)!r} holds a {found!r} result, not {name!r}")
    version = int(ds.attrs.get("memloc_schema_version", -1))
    if version != SCHEMA_VERSION:
        raise MemlocError(f"{str(path)!r} has schema version {version}; this memloc reads version "
                          f"{SCHEMA_VERSION} (recompute it)")
    for k, v in list(ds.variables.items()):   # netCDF has no bool; xarray restores it, keep strings plain
        if v.dtype == object:
            ds[k] = v.astype(str)
    try:
        return Result(found, ds)
    except MemlocError as e:
        raise MemlocError(f"{str(path)!r}: {e}") from None


def example_coords(ids) -> dict:
    """The ``example`` coordinate of per-example results (training example ids)."""
    return {"example": np.asarray(ids, dtype=np.int64)}
