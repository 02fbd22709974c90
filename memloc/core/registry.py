"""Analyses and commands declared once, next to their code (in the style of timm's ``@register_model``).

An analysis module ends with one declaration::

    ANALYSIS = Analysis(
        name="rewind", order=30,                      # result RUN/results/rewind.h5, its place in reports
        schema=Schema(...),                           # what the result holds (checked on save and load)
        plot=plot_rewind,                             # its report section (optional)
        command=Command(name="rewind", help="...",    # its command line (optional)
                        group="localisation", example="memloc rewind RUN --checkpoints 0,final",
                        description="...", arguments=..., execute=..., summary=..., sharded=True),
    )

and a command that is not an analysis (train, status, report, demo) declares ``COMMAND = Command(...)``.
There is no central table: :func:`discover` finds the declarations by reading the modules of the
layer packages *without importing them* (their literal ``name`` / ``help`` / ``order`` / ``group`` /
``example``; so that
``memloc --help`` lists every command in a fraction of a second), and :func:`analysis` /
:func:`command` import the one module asked for. Code outside the package (a test, a plug-in)
adds its own with :func:`register`.
"""
from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import MemlocError
from .schemas import Schema

__all__ = ["Command", "Analysis", "register", "unregister", "discover", "analysis", "command", "analyses", "commands",
           "examples", "grouped", "schema", "markdown", "PACKAGES", "GROUPS"]

#: the layer packages whose modules may declare analyses or commands
PACKAGES = ("training", "analyses", "actions", "reporting", "cli")

#: a command's ``group`` -> what its commands are for (``memloc --help``'s headings, in the order of work)
GROUPS = {
    "runs": "train a run, see what it holds",
    "localisation": "where in the network memorisation lives",
    "finding": "which examples are memorised or mislabelled",
    "acting": "remove them, retrain without them, unlearn them",
    "reporting": "figures and findings",
    "other": "more commands (registered)",
}


@dataclass(frozen=True)
class Command:
    """One command of ``memloc <name>``: its options, the library call and its summary.

    ``arguments(parser)`` adds its options; ``execute(args)`` calls the library and returns a
    :class:`memloc.Result` (saved to ``RUN/results/<analysis>.h5`` by the runner), a run or a path;
    ``summary(result, args)`` returns the text printed after it. ``takes_run``: the first argument is
    a run directory; ``device``: offer ``--device`` / ``--stream`` / ``--workers``; ``sharded``: splits
    its work under torchrun; ``overwrite``: offer ``--overwrite`` even without a result file;
    ``flags``: library argument -> flag where a message names an argument that is no option of the
    parser. ``already_done(args, run)`` / ``resumable(args, run)``: whether an existing result is
    complete for these settings / an interrupted one may be continued; ``after_save(result, args)``:
    extra outputs written once the result is safe. ``group``: its place in the order of work, a key of
    :data:`GROUPS` (``memloc --help`` lists the commands under these headings); ``example``: one command
    line (``memloc NAME RUN ...``) that ``memloc --help`` and ``memloc NAME --help`` show. ``unsplit``: why
    a command that does not split its work cannot (its refusal under torchrun says it).
    """

    name: str
    help: str
    description: str
    arguments: Callable
    execute: Callable
    summary: Callable
    takes_run: bool = True
    device: bool = True
    sharded: bool = False
    overwrite: bool = False
    overwrite_help: str | None = None
    interrupted: str = "nothing was written"
    flags: dict = field(default_factory=dict)
    already_done: Callable | None = None
    resumable: Callable | None = None
    after_save: Callable | None = None
    order: int = 1000
    group: str = "other"
    example: str | None = None
    result: str | None = None       # set from the analysis it belongs to
    unsplit: str | None = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise MemlocError(f"command {self.name!r}: unknown group {self.group!r}; valid: {', '.join(GROUPS)}")


@dataclass(frozen=True)
class Analysis:
    """An analysis: its result ``name`` and ``schema``, its ``compute`` function, its report
    section ``plot(result, out, run) -> markdown`` and its ``command`` (each optional but the schema)."""

    name: str
    schema: Schema
    compute: Callable | None = None
    plot: Callable | None = None
    command: Command | None = None
    order: int = 1000

    def __post_init__(self):
        if self.schema.name != self.name:
            raise MemlocError(f"analysis {self.name!r} declares the schema of {self.schema.name!r}")
        if self.command is not None and self.command.result != self.name:   # the command saves this result
            object.__setattr__(self, "command", replace(self.command, result=self.name))


_REGISTERED: dict[str, Analysis] = {}
_REGISTERED_COMMANDS: dict[str, Command] = {}


def register(item: Analysis | Command) -> Analysis | Command:
    """Add an analysis (with its command, if any) or a lone command declared outside the package."""
    if isinstance(item, Analysis):
        _REGISTERED[item.name] = item
        if item.command is not None:
            _REGISTERED_COMMANDS[item.command.name] = item.command
    elif isinstance(item, Command):
        _REGISTERED_COMMANDS[item.name] = item
    else:
        raise MemlocError(f"register() takes an Analysis or a Command, got {type(item).__name__}")
    return item


def unregister(item: Analysis | Command) -> None:
    """Remove what :func:`register` added (declarations in the package cannot be removed)."""
    if isinstance(item, Analysis):
        _REGISTERED.pop(item.name, None)
        item = item.command
    if item is not None:
        _REGISTERED_COMMANDS.pop(item.name, None)


def _literal(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key:
            try:
                return ast.literal_eval(kw.value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class Found:
    """What :func:`discover` read from a declaration without importing it."""

    kind: str            # "analysis" or "command"
    name: str            # analysis: result name; command: command name
    module: str
    order: int
    command: str | None  # the command's name
    help: str
    group: str = "other"  # the command's group (GROUPS)
    example: str | None = None


@functools.lru_cache(maxsize=1)
def discover() -> tuple[Found, ...]:
    """Every declaration in the layer packages, read from the source (nothing is imported), by order."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            if "ANALYSIS = Analysis(" not in text and "COMMAND = Command(" not in text:
                continue
            rel = path.relative_to(root.parent).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            # the declaration closes its module: parse from there on (a module's whole text when it does not)
            start = max(text.rfind("\nANALYSIS = Analysis("), text.rfind("\nCOMMAND = Command("))
            try:
                tree = ast.parse(text[start + 1:], str(path))
            except SyntaxError:
                tree = ast.parse(text, str(path))
            for node in tree.body:
                if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                        and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    continue
                target, call = node.targets[0].id, node.value
                if target == "ANALYSIS":
                    cmd = next((kw.value for kw in call.keywords if kw.arg == "command"), None)
                    cmd = cmd if isinstance(cmd, ast.Call) else None
                    found.append(Found("analysis", _literal(call, "name"), module, _literal(call, "order") or 1000,
                                       _literal(cmd, "name") if cmd else None, _literal(cmd, "help") if cmd else "",
                                       (_literal(cmd, "group") if cmd else None) or "other",
                                       _literal(cmd, "example") if cmd else None))
                elif target == "COMMAND":
                    found.append(Found("command", _literal(call, "name"), module, _literal(call, "order") or 1000,
                                       _literal(call, "name"), _literal(call, "help") or "",
                                       _literal(call, "group") or "other", _literal(call, "example")))
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))


def analyses() -> list[str]:
    """The names of every analysis, declared in the package (by order) or registered."""
    declared = [f.name for f in discover() if f.kind == "analysis"]
    return declared + [n for n in _REGISTERED if n not in declared]


def commands() -> dict[str, str]:
    """Every command name -> its one-line help (nothing imported)."""
    out = {f.command: f.help for f in discover() if f.command}
    out.update({name: cmd.help for name, cmd in _REGISTERED_COMMANDS.items()})
    return out


def examples() -> dict[str, str | None]:
    """Every command name -> its example command line, None where it declares none (nothing imported)."""
    out = {f.command: f.example for f in discover() if f.command}
    out.update({name: cmd.example for name, cmd in _REGISTERED_COMMANDS.items()})
    return out


def grouped() -> dict[str, dict[str, str]]:
    """Every command by group, in the order of :data:`GROUPS` (empty groups left out): group -> {name: help}
    (nothing imported)."""
    out = {group: {} for group in GROUPS}
    for f in discover():
        if f.command and f.command not in _REGISTERED_COMMANDS:
            out[f.group if f.group in GROUPS else "other"][f.command] = f.help
    for name, cmd in _REGISTERED_COMMANDS.items():
        out[cmd.group][name] = cmd.help
    return {group: names for group, names in out.items() if names}


def analysis(name: str) -> Analysis:
    """The declaration of analysis ``name`` (imports its module)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    for f in discover():
        if f.kind == "analysis" and f.name == name:
            return importlib.import_module(f.module).ANALYSIS
    raise MemlocError(f"unknown result {name!r}; valid: {', '.join(analyses())}")


def schema(name: str) -> Schema:
    """The schema of result ``name``."""
    return analysis(name).schema


def command(name: str) -> Command:
    """The declaration of command ``name`` (imports its module)."""
    if name in _REGISTERED_COMMANDS:
        return _REGISTERED_COMMANDS[name]
    for f in discover():
        if f.command == name:
            declared = importlib.import_module(f.module)
            return declared.ANALYSIS.command if f.kind == "analysis" else declared.COMMAND
    raise MemlocError(f"unknown command {name!r}; valid: {', '.join(commands())}")


def markdown() -> str:
    """Every result file described (Markdown), generated from the declared schemas: the docs' results
    reference (docs/reference/results.md, expanded by docs/hooks.py when the site is built)."""
    out = []
    for s in map(schema, analyses()):
        out.append(f"#### `results/{s.name}.h5`: {s.doc}\n")
        out.append("| variable | dims | meaning |\n|---|---|---|")
        for key, var in {**s.coords, **s.variables}.items():
            kind = "coord" if key in s.coords else ("optional" if var.optional else "")
            out.append(f"| `{key}`{' (' + kind + ')' if kind else ''} | ({', '.join(var.dims)}) | {var.doc} |")
        for key, doc in s.attrs.items():
            out.append(f"| attribute `{key}` | | {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
