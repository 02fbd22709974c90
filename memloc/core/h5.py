"""HDF5 writing for ``run.h5`` (appended to every epoch, so plain h5py rather than a result file).

* root attrs ``memloc_schema``, ``memloc_schema_version``, ``memloc_version``, ``created``,
  ``argv``, ``config`` (JSON string);
* every dataset carries a ``dims`` attribute naming its axes;
* arrays are gzip(4)+shuffle compressed and chunked along their first (example) axis.
"""
from __future__ import annotations

import datetime
import json
import sys
from typing import Sequence

import h5py
import numpy as np

__all__ = ["write_root_attrs", "put", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def write_root_attrs(f: h5py.File, schema: str, config: dict, argv: Sequence[str] | None = None) -> None:
    """Write memloc's root attributes (schema name/version, versions, time, argv, config JSON)."""
    from . import __version__
    f.attrs["memloc_schema"] = schema
    f.attrs["memloc_schema_version"] = SCHEMA_VERSION
    f.attrs["memloc_version"] = __version__
    f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    f.attrs["argv"] = json.dumps(list(sys.argv if argv is None else argv))
    f.attrs["config"] = json.dumps(config, sort_keys=True, default=str)


def put(group: h5py.Group, name: str, data, dims: Sequence[str] | None = None,
        maxshape: tuple | None = None, **attrs) -> h5py.Dataset:
    """Create dataset ``name`` (compressed, chunked along axis 0) with a ``dims`` attribute.

    Strings (or lists of strings) are stored as variable-length UTF-8.
    """
    arr = np.asarray(data)
    if arr.dtype.kind in "UO":
        ds = group.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype())
    elif arr.ndim == 0:
        ds = group.create_dataset(name, data=arr)
    else:
        chunks = None
        if arr.size > 0 or maxshape is not None:
            chunks = tuple(max(1, min(s, 4096)) if i == 0 else max(1, s) for i, s in enumerate(arr.shape))
            if maxshape is not None:
                chunks = (1,) + chunks[1:] if maxshape[0] is None else chunks
        ds = group.create_dataset(name, data=arr, maxshape=maxshape, chunks=chunks,
                                  compression="gzip" if chunks else None,
                                  compression_opts=4 if chunks else None, shuffle=bool(chunks))
    if dims is not None:
        if len(dims) != arr.ndim:
            raise ValueError(f"dims {dims} do not match the {arr.ndim}-d array {name!r}")
        ds.attrs["dims"] = np.array(list(dims), dtype=h5py.string_dtype())
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds
