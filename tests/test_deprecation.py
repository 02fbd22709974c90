"""Renamed arguments (memloc.core.deprecation.renamed): the old keyword keeps working with one
DeprecationWarning, both spellings at once are refused, the signature shows the new name; memloc's
own code, scripts and README never use an old name."""
import ast
import inspect
import re
import warnings
from pathlib import Path

import pytest

import memloc
from memloc.core.deprecation import renamed
from memloc.core.store import stored

ROOT = Path(__file__).resolve().parents[1]


def _deprecations(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args, **kwargs)
    return value, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_an_old_name_works_and_warns_once_per_function_and_name():
    @renamed(runs="source", by="methods")
    def f(source, *, methods="all"):
        return source, methods

    assert str(inspect.signature(f)) == "(source, *, methods='all')"
    value, caught = _deprecations(f, runs=1, by="x")
    assert value == (1, "x") and len(caught) == 2
    assert "f(): runs= is deprecated, use source=" in str(caught[0].message)
    assert caught[0].filename == __file__                   # points at the caller
    assert _deprecations(f, runs=2, by="y") == ((2, "y"), [])  # once per function and name
    assert _deprecations(f, 3, methods="z") == ((3, "z"), [])


def test_both_names_at_once_is_an_error():
    @renamed(resume_dir="resume")
    def f(source, *, resume=None):
        return resume

    with pytest.raises(TypeError, match=r"^f\(\) got both resume_dir= and resume=; resume_dir is the old name of resume$"):
        f(0, resume_dir="a", resume="b")
    with pytest.raises(TypeError, match="renamed: .* has no argument 'missing'"):
        renamed(old="missing")(f)


def test_above_stored_the_signature_and_save_keep_working(tmp_path):
    @renamed(resume_dir="resume")
    @stored("toy")
    def toy(source, *, resume=None):
        return resume

    params = inspect.signature(toy).parameters
    assert list(params) == ["source", "resume", "save", "overwrite"]
    assert _deprecations(toy, 0, resume_dir="auto")[0] == "auto"


def test_the_public_functions_show_the_new_names_and_take_the_old_ones(tiny_run):
    assert "resume" in inspect.signature(memloc.rewind).parameters
    assert "resume_dir" not in inspect.signature(memloc.rewind).parameters
    sc = memloc.scores(tiny_run, methods="el2n,aum", device="cpu")
    old, caught = _deprecations(memloc.scores, tiny_run, names="el2n,aum", checkpoint_k=None, device="cpu")
    assert old.dataset.equals(sc.dataset)
    assert {str(w.message).split("(): ")[1].split("=")[0] for w in caught} <= {"names", "checkpoint_k"}
    new = memloc.detect(sc, methods="el2n", is_noisy=tiny_run.is_noisy)
    assert _deprecations(memloc.detect, sc, names="el2n", is_noisy=tiny_run.is_noisy)[0].dataset.equals(new.dataset)


def _renames() -> dict[str, set[str]]:
    """public function name -> its old keyword names (from its @renamed decorator)."""
    out = {}
    for name in ("gradients", "rewind", "retrain", "flip", "scores", "detect", "find_label_issues", "importance",
                 "score_agreement", "prune", "clean", "jtt", "unlearn", "forgetting_order"):
        source = inspect.getsource(inspect.getmodule(inspect.unwrap(getattr(memloc, name))))
        found = re.search(rf"@renamed\(([^)]*)\)\s*\n(?:@stored\([^)]*\)\s*\n)?def {name}\(", source)
        out[name] = set(re.findall(r"(\w+)=", found.group(1))) if found else set()
    return out


def _calls(tree: ast.AST, renames: dict[str, set[str]]):
    aliases = {a.asname: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for a in node.names if a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            name = aliases.get(name, name)
            for kw in node.keywords:
                if kw.arg in renames.get(name, ()):
                    yield node.lineno, f"{name}({kw.arg}=...)"


def test_memloc_never_calls_a_public_function_by_an_old_name():
    """Every call in memloc/, scripts/, tests/ (but this file) and the Python examples of the README,
    CONTRIBUTING and docs/ uses the new names, so memloc itself never triggers the warning."""
    renames = _renames()
    assert renames["rewind"] == {"resume_dir"} and renames["prune"] >= {"by", "checkpoint_k"}
    bad = []
    files = [p for d in ("memloc", "scripts", "tests") for p in (ROOT / d).rglob("*.py") if p.name != Path(__file__).name]
    for path in files:
        bad += [f"{path.relative_to(ROOT)}:{line}: {call}" for line, call in _calls(ast.parse(path.read_text()), renames)]
    for doc in ("README.md", "CONTRIBUTING.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")))):
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            bad += [f"{doc}: {call}" for _, call in _calls(ast.parse(block), renames)]
        bad += [f"{doc}: {m}" for m in re.findall(r"`memloc\.(\w+)\(([^`]*)`", text)
                if set(re.findall(r"(\w+)=", m[1])) & renames.get(m[0], set())]
    assert not bad, "old argument names still used:\n" + "\n".join(bad)


def test_the_commands_call_the_library_by_the_new_names(tiny_run, tmp_path, monkeypatch, capsys):
    """A command that calls other analyses inside (issues: scores) and its own function, with every
    DeprecationWarning memloc raises turned into an error (and none remembered as already given)."""
    import shutil
    from memloc.cli import run as cli_run
    from memloc.core import deprecation
    shutil.copytree(tiny_run.path, tmp_path / "run")
    monkeypatch.setattr(deprecation, "_warned", set())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, message=r".*\(\): \w+= is deprecated")
        run = str(tmp_path / "run")
        for command, args in (("issues", [run, "--checkpoint-k", "1", "--device", "cpu"]),
                              ("scores", [run, "--scores", "el2n,aum", "--device", "cpu"]), ("detect", [run])):
            cli_run(command, args)
    assert "deprecated" not in capsys.readouterr().err
