"""An analysis is declared once, next to its code (memloc.core.registry): a toy analysis defined
here is found by the command line, saved and loaded with its schema, and drawn in the report; every
analysis of the package is found without importing it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import memloc
from memloc.cli import main, run as cli_run
from memloc.core import registry
from memloc.core.errors import MemlocError
from memloc.core.figures import table
from memloc.core.registry import Analysis, Command
from memloc.core.results import Result, load_result
from memloc.core.schemas import Schema, Var

PACKAGE = Path(memloc.__file__).parent


def noisy_share(source, *, device="auto") -> Result:
    """The toy analysis: the share of noisy labels per class of a run."""
    run = memloc.load(source)
    classes = np.unique(run.label_given)
    share = np.array([run.is_noisy[run.label_given == c].mean() for c in classes])
    ds = xr.Dataset({"share": (("class",), share)}, coords={"class": classes})
    return Result("noisy_share", ds, config={"device": device})


def plot_noisy_share(res, out, run=None) -> str:
    return "## Noisy share\n\n" + table(["class", "share"], [[int(c), float(v)] for c, v in
                                                            zip(res["class"].values, res["share"].values)])


TOY = Analysis(
    name="noisy_share", order=999, compute=noisy_share, plot=plot_noisy_share,
    schema=Schema("noisy_share", "share of noisy labels per class (a test's toy analysis)",
                  {"class": Var(("class",), "given label")}, {"share": Var(("class",), "noisy share")}),
    command=Command(name="noisy-share", help="share of noisy labels per class", description="The toy analysis.",
                    arguments=lambda p: None, execute=lambda args: noisy_share(args.run, device=args.device),
                    summary=lambda res, args: f"max share {float(res['share'].max()):.3f}"))


@pytest.fixture
def toy():
    registry.register(TOY)
    try:
        yield TOY
    finally:
        registry.unregister(TOY)


def test_a_toy_analysis_reaches_the_cli_the_result_store_and_the_report(toy, tiny_run, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "noisy-share" in capsys.readouterr().out
    res = cli_run("noisy-share", [str(tiny_run.path), "--device", "cpu"])
    out = capsys.readouterr().out
    saved = tiny_run.results_path("noisy_share")
    assert saved.is_file() and f"wrote {saved}" in out and "max share" in out
    again = load_result(saved, "noisy_share")
    assert again.equals(res) and again.schema is TOY.schema
    expected = [tiny_run.is_noisy[tiny_run.label_given == c].mean() for c in np.unique(tiny_run.label_given)]
    np.testing.assert_allclose(again["share"].values, expected)
    with pytest.raises(SystemExit):        # the result store: an existing result is not silently replaced
        cli_run("noisy-share", [str(tiny_run.path), "--device", "cpu"])
    assert "exists" in capsys.readouterr().err
    md = memloc.report(tiny_run, tmp_path / "report")
    assert "## Noisy share" in md.read_text()
    bad = again.dataset.assign(extra=("class", again["share"].values))
    with pytest.raises(MemlocError, match="outside its schema"):
        Result("noisy_share", bad)
    saved.unlink()


def test_unregistered_names_are_refused_in_one_line(toy):
    registry.unregister(TOY)
    with pytest.raises(MemlocError, match="unknown result 'noisy_share'; valid: gradients, rewind"):
        registry.schema("noisy_share")
    with pytest.raises(MemlocError, match="unknown command"):
        registry.command("noisy-share")


def test_every_declaration_of_the_package_is_discovered_without_importing_it():
    declared = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        declared |= {node.targets[0].id + ":" + str(path) for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.targets[0], ast.Name) and node.targets[0].id in ("ANALYSIS", "COMMAND")}
    found = registry.discover()
    assert len(found) == len(declared) >= 18
    code = ("import sys; from memloc.core import registry; names = registry.commands(); "
            "print(len(names), 'torch' in sys.modules, any(m.startswith('memloc.analyses') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len([f for f in found if f.command])), "False", "False"]
    for f in found:           # what was read from the source is what the module declares
        if f.kind == "analysis":
            a = registry.analysis(f.name)
            assert a.name == f.name and a.schema.name == f.name and (a.command.name if a.command else None) == f.command
            assert a.command is None or (a.command.help == f.help and a.command.result == f.name)
        else:
            c = registry.command(f.name)
            assert (c.name, c.help, c.result) == (f.command, f.help, None)


def test_the_contributors_guide_example_runs_as_written(tiny_run, tmp_path, capsys):
    """CONTRIBUTING.md's worked example, executed as the module it would be, registered, run from the
    command line and checked against the checkpoints' own norms."""
    import importlib.util
    import torch
    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    code = text.split("## Adding an analysis, end to end", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    spec = importlib.util.spec_from_loader("memloc.analyses.weight_norms", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "memloc.analyses"
    exec(compile(code, "CONTRIBUTING.md", "exec"), module.__dict__)
    registry.register(module.ANALYSIS)
    try:
        res = cli_run("weight-norms", [str(tiny_run.path), "--checkpoints", "0,final", "--device", "cpu"])
        assert "final norm" in capsys.readouterr().out
        state = torch.load(tiny_run.path / "checkpoints" / f"epoch_{tiny_run.final_epoch:04d}.pt", weights_only=True)
        first = str(res["layer"].values[0])
        expected = float(sum((v.double() ** 2).sum() for k, v in state.items()
                             if k.startswith(first + ".") and v.dtype.is_floating_point and "running" not in k)) ** 0.5
        assert res["norm"].sel(layer=first).values[-1] == pytest.approx(expected, rel=1e-12)
        assert "## Weight norms" in memloc.report(tiny_run, tmp_path / "report").read_text()
    finally:
        registry.unregister(module.ANALYSIS)
        tiny_run.results_path("weight_norms").unlink(missing_ok=True)
