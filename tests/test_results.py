"""Result objects and their files; the package's shape (no import cycle, small modules, README schemas)."""
import ast
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

import memloc
from memloc.core.results import Result, load_result
from memloc.core.registry import analyses, markdown
from memloc.core.schemas import SUBSETS

ROOT = Path(__file__).resolve().parents[1]


def _rewind_like(n_ckpt=2):
    return xr.Dataset({"accuracy": (("checkpoint", "layer", "subset"), np.random.default_rng(0).random((n_ckpt, 2, 4))),
                       "baseline": (("subset",), np.arange(4.0))},
                      coords={"checkpoint": np.arange(n_ckpt), "layer": ["fc1", "head"],
                              "layer_kind": ("layer", ["linear", "linear"]),
                              "layer_numel": ("layer", np.array([10, 20])), "subset": list(SUBSETS)})


def test_roundtrip_keeps_values_labels_and_config(tmp_path):
    res = Result("rewind", _rewind_like(), config={"checkpoints": [0, 1], "layers": ["fc1", "head"]})
    path = res.save(tmp_path / "r.h5", argv=["memloc", "rewind", "RUN"])
    back = load_result(path)
    assert back.equals(res) and back.config == {"checkpoints": [0, 1], "layers": ["fc1", "head"]}
    assert back["layer"].values.tolist() == ["fc1", "head"] and back["layer_kind"].values.dtype.kind == "U"
    assert float(back.sel(layer="head", subset="test", checkpoint=1)["accuracy"]) == res.dataset["accuracy"].values[1, 1, 3]
    with h5py.File(path) as f:   # the root attributes of every memloc file, readable without memloc
        assert f.attrs["memloc_schema"] == "memloc.rewind" and json.loads(f.attrs["argv"]) == ["memloc", "rewind", "RUN"]
        assert {"memloc_schema_version", "memloc_version", "created", "config"} <= set(f.attrs)
    plain = xr.open_dataset(path, engine="h5netcdf")
    assert plain["accuracy"].dims == ("checkpoint", "layer", "subset")
    plain.close()


def test_schema_is_enforced(tmp_path):
    ds = _rewind_like()
    with pytest.raises(memloc.MemlocError, match="lacks variable 'baseline'"):
        Result("rewind", ds.drop_vars("baseline"))
    with pytest.raises(memloc.MemlocError, match="outside its schema: extra"):
        Result("rewind", ds.assign(extra=("layer", [1, 2])))
    with pytest.raises(memloc.MemlocError, match="has dims"):
        Result("rewind", ds.assign(baseline=("layer", [1.0, 2.0])))
    with pytest.raises(memloc.MemlocError, match="unknown result 'nope'"):
        Result("nope", ds)


def test_bad_files_are_one_clear_error(tmp_path):
    res = Result("rewind", _rewind_like())
    res.save(tmp_path / "r.h5")
    with pytest.raises(memloc.MemlocError, match="holds a 'rewind' result, not 'flip'"):
        load_result(tmp_path / "r.h5", "flip")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(memloc.MemlocError, match="cannot read result file"):
        load_result(tmp_path / "junk.h5")
    xr.Dataset({"a": ("x", [1])}).to_netcdf(tmp_path / "other.h5", engine="h5netcdf")
    with pytest.raises(memloc.MemlocError, match="not a memloc result"):
        load_result(tmp_path / "other.h5")
    with pytest.raises(memloc.MemlocError, match="no result file"):
        load_result(tmp_path / "missing.h5")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    Result("rewind", _rewind_like(2)).save(path)

    def boom(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(RuntimeError):
        Result("rewind", _rewind_like(3)).save(path)
    monkeypatch.undo()
    assert load_result(path).sizes["checkpoint"] == 2 and [p.name for p in tmp_path.iterdir()] == ["r.h5"]


def test_per_example_dataframe():
    ds = xr.Dataset({"el2n": ("example", [0.1, 0.9, 0.2]), "aum": ("example", [2.0, -1.0, 1.5])},
                    coords={"example": [0, 1, 2]})
    df = Result("scores", ds).to_dataframe()
    assert df.index.name == "example" and list(df.columns) == ["el2n", "aum"] and df.loc[1, "aum"] == -1.0
    with pytest.raises(memloc.MemlocError, match="no dimension 'epoch'"):
        Result("scores", ds).to_dataframe("epoch")


def test_the_results_reference_is_generated_from_the_schemas():
    """docs/reference/results.md holds the placeholder its build hook expands into every schema."""
    import importlib.util
    assert "<!-- memloc:schemas -->" in (ROOT / "docs" / "reference" / "results.md").read_text()
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    section = hooks._expand("schemas", None, "reference/results.md")
    assert section == markdown()
    for name in analyses():
        assert f"`results/{name}.h5`" in section


def _imports(path: Path, package: str) -> set[str]:
    """memloc modules imported by a module at module level (relative or absolute)."""
    tree = ast.parse(path.read_text())   # every import, also inside functions: deferring one hides no cycle
    mod = package + "." + path.stem if path.stem != "__init__" else package
    base = mod.split(".") if path.stem == "__init__" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("memloc"):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("memloc"))
    return out


def test_no_import_cycle_and_small_modules():
    files = sorted((ROOT / "memloc").rglob("*.py"))
    graph = {}
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        package = ".".join(parts[:-1])
        graph[name] = {t for t in _imports(f, package)}
        assert len(f.read_text().splitlines()) <= 400, f"{rel} has more than 400 lines"
    known = set(graph)

    def resolve(t):   # `from .x import y` where y is a module counts as importing x (and the package)
        while t not in known and "." in t:
            t = t.rsplit(".", 1)[0]
        return t

    edges = {m: {resolve(t) for t in ts} - {m} for m, ts in graph.items()}
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}  # parent package init
    state = {}

    def visit(m, stack):
        state[m] = 1
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in edges:
        if m not in state and m != "memloc":
            visit(m, [m])
