"""Every public analysis and action fed arguments of the wrong type (issue 25): a MemlocError of one line
or a correct result, never another exception.

The functions are enumerated from the public face (``memloc._FACE``: every name defined in
``memloc.analyses`` or ``memloc.actions``), their arguments from their signatures; each argument in turn
gets values generated from its default (or its base value): floats, bools, negative numbers and text for
whole numbers, text for numbers, numbers and unknown names for names, unknown keys for dictionaries,
None where a value is needed, and numpy / torch / tuple forms of a valid value. A value of the wrong kind
must be refused (one line); an equivalent form must be refused or give the base call's result exactly, and a
number of numpy's (``np.int64(3)``, ``np.int32(3)``, ``np.float64(0.5)``, ``np.bool_(True)``) or a 0-d tensor
where a Python number is valid must give the base call's result (refusing it is a fault: ``refused valid``).
Everything runs at the cheapest settings on a copy of ``tiny_run`` and a random TinyGPT; experiments
that train child runs stop where they would train (their children's configs are compared instead).
``python tests/test_fuzz.py`` prints the table of outcomes.
"""
from __future__ import annotations

import inspect
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

import memloc

pytestmark = pytest.mark.usefixtures("one_thread")    # tiny models: two threads on busy cores spin-wait

INVALID, SAME, OTHER = "invalid", "same", "other"   # must be refused / refused or the base result / no traceback
EQUAL = "equal"                                     # must give the base call's result


class _Trains(Exception):
    """Raised where an experiment would start training its child runs (the fuzz stops there)."""


def public_functions() -> list[str]:
    """The name of every public analysis and action (memloc's public face, not a hand list; nothing imported)."""
    return [name for name, home in memloc._FACE.items() if home.startswith(("memloc.analyses", "memloc.actions"))]


#: the public functions whose cases cost more than ~0.3 CPU-seconds (trainings, searches, scipy's import): slow
HEAVY = {"gradients", "rewind", "retrain", "flip", "importance", "exposure_estimate", "prune", "clean", "unlearn",
         "forgetting_order"}


def memorising_gpt(vocab: list):
    """A one-layer TinyGPT trained until it reproduces two random target sequences (a SequenceSet of 4)."""
    from memloc.core.lm import suffix_measures
    x = torch.from_numpy(np.random.default_rng(0).integers(0, len(vocab), (4, 6)))
    model = memloc.TinyGPT(len(vocab), n_layer=1, n_head=2, d_model=16, d_mlp=16, max_len=8, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):
        loss, _, memorised = suffix_measures(memloc.lm_logits(model, x[:, :-1]), x, 3, 3)
        if memorised[:2].all():
            break
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    target = np.arange(4) < 2
    data = memloc.SequenceSet("random", x, x[:2], np.arange(4), target, np.where(target, "canary", "clean"), 3, 3, vocab)
    return model.eval(), data


def base_calls(run_path) -> dict:
    """name -> a function returning (positional args, keyword args): the cheapest valid call of each
    public function (what several share is built once, when first needed)."""
    from functools import lru_cache

    @lru_cache(None)
    def scored():
        return memloc.scores(run, methods=["el2n", "final_loss"], device="cpu")

    @lru_cache(None)
    def etd():
        model = memloc.load(run).model()
        memloc.insert_example_tied_dropout(model, ["fc1"], p_gen=0.5, p_mem=0.2)
        return model, memloc.load(run).data()

    seq = memloc.tinymem("increment", n_train=6, n_test=4, seq_len=12, prefix_len=7, max_start=50, seed=0)
    gpt = memloc.TinyGPT(seq.vocab_size, n_layer=1, n_head=2, d_model=16, d_mlp=16, max_len=16, seed=0).eval()
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probs = rng.dirichlet(np.ones(3), size=8)
    logits = torch.from_numpy(rng.normal(size=(4, 11, seq.vocab_size))).float()
    tokens = seq.tokens[:4]
    run, cheap = str(run_path), {"device": "cpu"}
    space = memloc.digit_space(1)
    prefix, secret = torch.tensor([1, 2, 3]), torch.tensor([4])
    lm = {"methods": ("random",), "eval_batch_size": 8, "seed": 0, "device": "cpu"}
    return {
        "gradients": ((run,), {"checkpoints": [4], "layers": ["fc1"], **cheap}),
        "rewind": ((run,), {"checkpoints": [4], "layers": ["fc1"], **cheap}),
        "retrain": ((run,), {"layers": ["fc1"], "epochs": 1, **cheap}),
        "flip": ((run,), {"examples": {"noisy": 2, "clean": 2}, "max_units": 2, "resume": None, **cheap}),
        "scores": ((run,), {"methods": ["el2n"], **cheap}),
        "score_agreement": lambda: (([scored(), scored()],), {"methods": ["el2n", "final_loss"]}),
        "detect": lambda: ((scored(),), {"methods": ["final_loss"], "is_noisy": memloc.load(run).is_noisy}),
        "find_label_issues": ((run,), {"method": "final_loss", **cheap}),
        "importance": ((run,), {"subsets": ("noisy",), "eval_batch_size": 64, **cheap}),
        "evaluate_dropout": lambda: (etd(), {"modes": ("train", "drop"), "eval_batch_size": 512, **cheap}),
        "estimate_joint": ((labels, probs), {}),
        "estimate_noise_rate": ((labels, probs), {}),
        "rank_label_issues": ((labels, probs), {}),
        "find_label_issues_in_arrays": ((labels, probs), {}),
        "scores_from_arrays": ((), {"logits": probs, "labels": labels}),
        "memorisation": ((gpt, seq), {"eval_batch_size": 8, "device": "cpu"}),
        "memorisation_from_logits": ((logits, tokens, 7, 5), {}),
        "exposure": ((gpt, prefix, secret, space), {"device": "cpu"}),
        "exposure_estimate": ((gpt, prefix, secret, space), {"samples": 5, "device": "cpu"}),
        "sequence_log_likelihood": ((gpt, prefix, torch.tensor([[4], [5]])), {"device": "cpu"}),
        "CandidateSpace": ((((1, 2), (3, 4)),), {}),
        "digit_space": ((2,), {}),
        "localise_neurons": ((gpt, seq), {"examples": [0, 1], "ref_batch_size": 2, **lm}),
        "neuron_scores": ((gpt, tokens[:2], 7, 5), {"methods": ("random",), "eval_batch_size": 8}),
        "inj_benchmark": ((gpt, seq), {"n_sequences": 2, "n_injected": 4, "max_steps": 100, "lr": 0.3, "prefix_len": 3, "suffix_len": 1, "ref_batch_size": 2, **lm}),
        "del_benchmark": lambda: (memorising_gpt(seq.vocab), {"examples": [0, 1], "fractions": (0.1,), "ref_batch_size": 2, **lm}),
        "mitigate": lambda: (memorising_gpt(seq.vocab), {"fractions": (0.5,), "ref_batch_size": 2, **lm}),
        "prune": ((run,), {"methods": ["el2n"], "keep": [0.5], "seeds": [0], **cheap}),
        "clean": ((run,), {"method": "final_loss", "seeds": [0], "baseline": False, **cheap}),
        "jtt": ((run,), {"seeds": [0], **cheap}),
        "unlearn": ((run,), {"methods": ["ascent"], "seeds": [0], "epochs": 1, "batch_size": 256, **cheap}),
        "forgetting_order": ((run,), {"orders": ["random"], "protect": ["none"], "epochs": 1, "batch_size": 256, **cheap}),
    }


# ----------------------------------------------------------------------------- the wrong values
NUMBER_WORDS = ("batch_size", "epochs", "steps", "samples", "units", "size", "jobs", "folds", "len", "n_",
                "lr", "mb", "momentum", "decay", "seed", "checkpoint", "rate", "upweight", "offset", "noise",
                "ratio", "repeats", "keep", "fractions", "lam")


def _kind_of(param: inspect.Parameter, value):
    """What an argument holds: 'bool', 'int', 'float', 'str', 'seq', 'dict', 'array', 'tensor' or None (unknown)."""
    note = str(param.annotation)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)) and note.startswith(("int", "float")):
        return note[:note.index("t") + 1] if note.startswith("int") else "float"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, np.ndarray):
        return "array"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple, range)):
        return "seq"
    if isinstance(value, str):
        return "str"
    for kind in ("int", "float", "dict", "str"):
        if note.startswith(kind):
            return kind
    return None


def wrong_values(param: inspect.Parameter, value) -> list[tuple[str, object, str]]:
    """(label, value, expectation) for one argument whose valid value is ``value``."""
    name, kind = param.name, _kind_of(param, value)
    same = OTHER if value is None else SAME         # the base call left it at None: nothing to compare with
    equal = OTHER if value is None else EQUAL
    if name in ("source", "model"):
        return [("a numpy array", np.zeros(3), INVALID), ("a missing path", "/no/such/run", INVALID),
                ("an int", 5, INVALID), ("None", None, INVALID)]
    if name == "device":
        return [("an unknown device", "gpu", INVALID), ("an int", 5, INVALID),
                ("a torch.device", torch.device("cpu"), SAME)]
    if name in ("resume", "log", "out", "data"):
        return [("an int", 5, OTHER), ("a list", ["x"], OTHER)]
    out = []
    if kind == "bool":
        out += [("a str", "yes", INVALID), ("an int", 2, INVALID), ("None", None, OTHER),
                ("numpy's bool", np.bool_(value), EQUAL)]
    elif kind == "int":
        v = 1 if value is None else value
        out += [("a float", v + 0.5, INVALID), ("a bool", True, INVALID), ("negative", -1, INVALID),
                ("a str", "abc", INVALID), ("a list", [v], INVALID), ("numpy's int", np.int64(v), equal),
                ("numpy's int32", np.int32(v), equal), ("a 0-d tensor", torch.tensor(v), equal)]
        if value is not None:
            out += [("None", None, OTHER)]
    elif kind == "float":
        v = 0.5 if value is None else value
        out += [("a str", "abc", INVALID), ("a bool", True, INVALID), ("negative", -1.0, INVALID),
                ("nan", math.nan, INVALID), ("a list", [v], INVALID), ("numpy's float", np.float64(v), equal)]
        if value is not None:
            out += [("None", None, OTHER)]
    elif kind == "str":
        v = value
        out += [("an int", 5, INVALID), ("an unknown name", "no_such", INVALID), ("a list of unknown", ["no_such"], INVALID)]
        if v is not None:
            out += [("numpy's str", np.str_(v), SAME), ("None", None, OTHER)]
    elif kind == "seq":
        items = list(value)
        out += [("an unknown name", "no_such", INVALID), ("a float", 1.5, INVALID), ("[None]", [None], INVALID),
                ("a dict of unknown", {"no_such": 1}, INVALID), ("a tuple", tuple(items), SAME)]
        if items and all(isinstance(i, (int, float, str)) and not isinstance(i, bool) for i in items):
            out += [("a numpy array", np.array(items), SAME)]
        if items and all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in items):
            out += [("negative", [-1], INVALID), ("a tensor", torch.tensor(items, dtype=torch.float64 if any(
                isinstance(i, float) for i in items) else torch.int64), SAME)]
    elif kind == "dict":
        out += [("an unknown key", {"no_such": 1}, INVALID), ("a str", "abc", INVALID), ("a list", [1], OTHER)]
    elif kind in ("array", "tensor"):
        a = value.numpy() if kind == "tensor" else value
        other = torch.from_numpy(a) if kind == "array" else a
        out += [("the other array type" if kind == "array" else "a numpy array", other, SAME),
                ("a list", a.tolist(), SAME if a.dtype.kind in "biu" or a.dtype == np.float64 else OTHER), ("a str", "abc", INVALID), ("None", None, INVALID),
                ("a scalar", 3, OTHER), ("one row short", value[:-1], OTHER)]
        if a.dtype == bool:
            out += [("halves", np.full(a.shape, 0.5), INVALID)]
        elif np.issubdtype(a.dtype, np.integer):
            out += [("floats", a + 0.5, INVALID), ("negative", -a - 1, INVALID)]
        else:
            out += [("nan", np.full_like(a, np.nan), INVALID)]
    elif value is None:      # an optional argument of unknown type
        out += [("a float", 1.5, OTHER), ("negative", -1, OTHER), ("an unknown name", "no_such", OTHER),
                ("a dict of unknown", {"no_such": 1}, INVALID), ("a bool", True, OTHER)]
    return out


# ----------------------------------------------------------------------------- running the cases
def _same(a, b) -> bool:
    """Equal results: Results (their data but timings, and their recorded config), arrays, dicts of
    arrays, numbers, recorded child configs."""
    if isinstance(a, memloc.Result) or isinstance(b, memloc.Result):
        if not (isinstance(a, memloc.Result) and isinstance(b, memloc.Result)) or a.config != b.config:
            return False
        a, b = (r.dataset.drop_vars([k for k in r.dataset.data_vars if "seconds" in k]) for r in (a, b))
        return a.equals(b)
    if hasattr(a, "to_numpy") and hasattr(b, "to_numpy"):      # pandas
        return a.equals(b)
    if isinstance(a, dict) and isinstance(b, dict):      # (timings aside)
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k != "seconds")
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, torch.Tensor, float, int, np.generic)):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    return a == b


def _call(fn, args, kwargs, trained: list):
    trained.clear()
    try:
        out = fn(*args, **kwargs)
    except _Trains:
        return "trains", list(trained)
    return "returned", out


def run_cases(run_path, monkeypatch, names=None, calls=None) -> list[dict]:
    """Every case of the public functions ``names`` (default all): {function, argument, label, expect,
    outcome ('error', 'correct', 'accepted', 'traceback', 'silent wrong', 'refused valid'), detail}."""
    from memloc.actions import children
    trained = []

    def stop(jobs_list, **kw):
        trained.append(sorted(json_cfg(cfg) for _, cfg, *rest in jobs_list))
        raise _Trains

    monkeypatch.setattr(children, "train_runs", stop)
    calls, cases = calls or base_calls(run_path), []
    for name in names or public_functions():
        assert name in calls, f"public function {name} has no base call in tests/test_fuzz.py"
        fn = getattr(memloc, name)
        args, kwargs = calls[name]() if callable(calls[name]) else calls[name]
        torch.manual_seed(0)
        try:
            base = _call(fn, args, kwargs, trained)
        except Exception as e:
            raise AssertionError(f"the base call of {name} fails: {type(e).__name__}: {e}") from e
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for param in params:
            if param.name in ("save", "overwrite"):      # True would write into the run: the store's tests
                continue
            at = positional.index(param) if param in positional and positional.index(param) < len(args) else None
            value = args[at] if at is not None else kwargs.get(param.name, param.default)
            if value is inspect.Parameter.empty:
                continue
            for label, wrong, expect in wrong_values(param, value):
                a, k = list(args), dict(kwargs)
                if at is not None:
                    a[at] = wrong
                else:
                    k[param.name] = wrong
                torch.manual_seed(0)
                case = {"function": name, "argument": param.name, "label": label, "expect": expect}
                try:
                    got = _call(fn, a, k, trained)
                except memloc.MemlocError as e:
                    one_line = "\n" not in str(e).strip()
                    case.update(outcome=("refused valid" if expect == EQUAL else "error") if one_line else "traceback",
                                detail=str(e))
                except Exception as e:      # noqa: BLE001 (what the fuzz looks for)
                    case.update(outcome="traceback", detail=f"{type(e).__name__}: {e}"[:300])
                else:
                    if expect == INVALID:
                        case.update(outcome="silent wrong", detail="accepted")
                    elif expect in (SAME, EQUAL):
                        ok = got[0] == base[0] and _same(got[1], base[1])
                        case.update(outcome="correct" if ok else "silent wrong",
                                    detail="" if ok else "differs from the base call's result")
                    else:
                        case.update(outcome="accepted", detail="")
                cases.append(case)
    return cases


def json_cfg(cfg: dict) -> str:
    import json
    return json.dumps(cfg, sort_keys=True, default=str)


def table(cases: list[dict]) -> str:
    count = Counter(c["outcome"] for c in cases)
    cols = ("error", "correct", "accepted", "traceback", "silent wrong", "refused valid")
    return ("| tried | clean errors | correct results | accepted (no traceback) | tracebacks | silent wrong | refused valid |\n"
            "|---|---|---|---|---|---|---|\n| " + " | ".join(str(v) for v in (len(cases), *(count[c] for c in cols))) + " |")


@pytest.fixture(scope="module")
def fuzz_run(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(tiny_run.path, path, ignore=shutil.ignore_patterns("results", "report", "children"))
    return path


@pytest.fixture(scope="module")
def calls(fuzz_run):
    return base_calls(fuzz_run)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in public_functions()])
def test_wrong_types_are_refused_in_one_line_or_compute_the_same(name, fuzz_run, calls, monkeypatch):
    cases = run_cases(fuzz_run, monkeypatch, [name], calls)
    bad = [c for c in cases if c["outcome"] in ("traceback", "silent wrong", "refused valid")]
    assert not bad, table(cases) + "\n" + "\n".join(
        f"{c['function']}({c['argument']}={c['label']}): {c['outcome']}: {c['detail']}" for c in bad)
    assert len(cases) >= 5 and any(c["outcome"] == "error" for c in cases)


def test_every_public_function_has_a_base_call(tmp_path):
    assert sorted(base_calls(tmp_path)) == sorted(public_functions())


if __name__ == "__main__":      # the table, on a run trained here
    import sys
    import tempfile
    from pathlib import Path
    from memloc.training.train import train
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    if not (folder / "run").exists():
        train(folder / "run", {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 64, "lr": 0.1},
              device="cpu")
    mp = pytest.MonkeyPatch()
    found = run_cases(folder / "run", mp)
    mp.undo()
    print(table(found))
    for c in found:
        if c["outcome"] in ("traceback", "silent wrong", "refused valid"):
            print(f"{c['function']}({c['argument']}={c['label']}): {c['outcome']}: {c['detail']}")
