"""The package's architecture, checked: layers whose imports only run downwards, no module that
a public function shadows, small modules, and a face that imports nothing heavy."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import memloc

PACKAGE = Path(memloc.__file__).parent
#: lowest first; a module may import its own layer and the ones before it, never a later one
LAYERS = ("core", "scale", "training", "analyses", "actions", "reporting", "cli")
FACE = len(LAYERS)       # memloc/__init__.py, __main__.py and the python -m entry files
MAX_LINES = 400


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return FACE


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """Every memloc module ``module`` imports, at module or function level: (line, absolute name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "memloc"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "memloc":
                continue
            # ``from memloc.x import y`` may name a submodule y: count the deepest module it names
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


MODULES = modules()


def test_every_module_lives_in_a_layer_or_is_an_entry():
    top = sorted(m for m in MODULES if m.count(".") == 1 and layer_of(m) == FACE)
    for m in top:
        path = MODULES[m]
        if path.name in ("__init__.py", "__main__.py"):
            continue
        text = path.read_text()
        # an entry file: only ``python -m memloc.<name>`` -> the command, nothing to import
        assert 'if __name__ == "__main__":' in text and len(text.splitlines()) <= 10, m


def test_imports_only_run_downwards():
    climbs = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for line, target in imports_of(module, path):
            if target == "memloc":
                if module != "memloc":
                    climbs.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the package face")
                continue
            if layer_of(target) > mine:
                climbs.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[mine] if mine < FACE else 'face'}) "
                              f"imports {target} ({LAYERS[layer_of(target)] if layer_of(target) < FACE else 'face'})")
    assert not climbs, "imports that climb a layer:\n" + "\n".join(climbs)


def test_entry_files_are_never_imported():
    entries = {m for m in MODULES if m.count(".") == 1 and layer_of(m) == FACE and not m.endswith("__main__")}
    users = [(module, line, target) for module, path in MODULES.items() for line, target in imports_of(module, path)
             if target in entries]
    assert not users, users


def test_no_module_over_the_size_limit():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_public_function_is_shadowed_by_a_module():
    for m in MODULES:          # every module of every layer loaded (entry files are for python -m only)
        if layer_of(m) < FACE:
            importlib.import_module(m)
    for name in memloc.__all__:
        value = getattr(memloc, name)
        assert not isinstance(value, type(memloc)) or name == "__version__", f"memloc.{name} is a module"
    # and no layer package re-exports a name that one of its own submodules has
    for m in MODULES:
        if MODULES[m].name != "__init__.py" or layer_of(m) == FACE:
            continue
        mod = importlib.import_module(m)
        subs = {info.name for info in pkgutil.iter_modules(mod.__path__)}
        for sub in subs:
            assert isinstance(getattr(mod, sub, None), (type(memloc), type(None))), f"{m}.{sub} is not the module"


def test_import_memloc_loads_nothing_heavy():
    code = ("import sys, memloc; heavy = [m for m in ('torch', 'numpy', 'xarray', 'matplotlib', 'scipy', 'h5py', "
            "'pandas', 'cleanlab', 'memloc.core.run') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import memloc loaded {out.stdout.strip()}"


@pytest.mark.parametrize("name", ["train", "rewind", "flip", "scores", "report", "dropout"])
def test_python_dash_m_entry_points_work_without_warnings(name):
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", f"memloc.{name}", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"memloc {name}" in out.stdout and not out.stderr
