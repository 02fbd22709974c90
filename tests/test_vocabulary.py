"""One vocabulary for every public function (CONTRIBUTING.md, "One vocabulary").

A ratchet: the deviations still in the library are listed in KNOWN, and the test fails both on a new
deviation and on a listed one that was fixed (remove it from the list then), so the vocabulary can
only converge. Also checked: options are keyword-only, every analysis takes ``device``, and a
function that returns nothing on ranks > 0 says so in its annotation (``Result | None``).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import memloc

#: the public functions that analyse a run or a model (first argument: what is analysed)
ANALYSES = ("gradients", "rewind", "retrain", "flip", "scores", "detect", "find_label_issues", "importance",
            "evaluate_dropout", "score_agreement", "prune", "clean", "jtt", "unlearn", "forgetting_order", "report", "memorisation",
            "localise_neurons", "inj_benchmark", "del_benchmark", "mitigate")
#: a synonym -> the vocabulary's word (the old names keep working: memloc.core.deprecation.renamed).
#: Not synonyms: ``method`` (one method, as ``checkpoint`` is one epoch; ``methods`` selects several),
#: ``seed`` (the one random stream of one computation; ``seeds`` are the repeated runs of an experiment),
#: ``grad_method`` (how per-example gradients are computed, an implementation switch: the result is the same),
#: ``orders`` / ``protect`` (forgetting_order's data splits and protections, named after its result's
#: dimensions ``order`` and ``protect``), ``grand_checkpoint`` (prune's second checkpoint, GraNd's).
SYNONYMS = {"run": "source", "runs": "source", "run_dir": "source", "results": "source",
            "checkpoint_k": "checkpoint", "id_epoch": "checkpoint", "grand_epoch": "checkpoint", "reset_to": "checkpoint",
            "names": "methods", "by": "methods", "resume_dir": "resume"}
#: evaluation passes take eval_batch_size; batch_size is the optimiser's (training) batch
EVAL_BATCH = {"gradients", "scores", "find_label_issues", "importance", "jtt"}
#: analyses that run a model but do not take ``precision`` yet
NO_PRECISION = set()

KNOWN = {(name, "precision") for name in NO_PRECISION}
#: channels_last (memloc.core.precision) is no option: a conv net on CUDA in 16 bits is laid out so by every analysis
#: that runs one (apply_channels_last / laid_out). Not by: the analyses of language models only (no 2-d
#: convolution: the layout never applies, so there is nothing to refuse or record) and those whose passes are
#: another analysis's (prune: scores; the name it calls it by)
LM_ONLY = {"memorisation", "localise_neurons", "inj_benchmark", "del_benchmark", "mitigate"}
DELEGATES = {"prune": ("compute_scores",)}
#: analyses that may run a conv net in ``precision`` but do not lay it out yet
NO_CHANNELS_LAST = set()
#: eval_batch_size's one default: every evaluation pass, language models' included (CONTRIBUTING.md, "One
#: vocabulary"); a language model's forward runs fewer rows where their logits would pass
#: memloc.core.lm.LOGITS_BUDGET, so the default bounds memory by itself
EVAL_BATCH_DEFAULT = 1024
#: the deliberate exceptions, and why: their batches hold a backward pass per row, not only forward outputs
EVAL_BATCH_EXCEPTIONS = {
    "importance": "vectorised per-example gradients: rows x parameters floats (128)",
    **{name: "neuron localisation: masks or attributions learned by backward passes through rows x T x V logits "
             "and every MLP's activations, targets optimised together (64)"
       for name in ("localise_neurons", "neuron_scores", "inj_benchmark", "del_benchmark", "mitigate")}}
#: everything public that takes eval_batch_size: the analyses, the trainer, the recorders and callbacks
EVAL_BATCH_TAKERS = ANALYSES + ("neuron_scores", "exposure", "exposure_estimate", "sequence_log_likelihood", "train",
                                "Recorder", "SequenceRecorder", "HFTrainerCallback", "LightningCallback")


def deviations() -> set[tuple[str, str]]:
    found = set()
    for name in ANALYSES:
        params = inspect.signature(getattr(memloc, name)).parameters
        first = next(iter(params))
        for p in params:
            if p in SYNONYMS and (SYNONYMS[p] != "source" or p == first):
                found.add((name, p))
        if "batch_size" in params and name in EVAL_BATCH:
            found.add((name, "batch_size"))
        if name not in ("detect", "score_agreement", "report") and "precision" not in params:
            found.add((name, "precision"))
    return found


def test_the_vocabulary_only_converges():
    found = deviations()
    new, fixed = sorted(found - KNOWN), sorted(KNOWN - found)
    assert not new, f"new arguments outside the vocabulary (see CONTRIBUTING.md): {new}"
    assert not fixed, f"fixed, remove from KNOWN: {fixed}"


def test_one_and_many_are_told_apart():
    """``seed`` / ``method`` / ``checkpoint`` take one value, ``seeds`` / ``methods`` / ``checkpoints`` several."""
    for name in ANALYSES:
        for p in inspect.signature(getattr(memloc, name)).parameters.values():
            if p.name == "seed":
                assert isinstance(p.default, int), f"{name}: seed is one random stream (an int)"
            if p.name == "seeds":
                assert isinstance(p.default, (tuple, list)), f"{name}: seeds are the repeated runs (a sequence)"
            if p.name == "method":
                assert isinstance(p.default, str), f"{name}: method is one method (a name)"


def test_options_are_keyword_only_and_analyses_take_a_device():
    for name in ANALYSES:
        params = list(inspect.signature(getattr(memloc, name)).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert positional[0] in ("source", *[k for k, v in SYNONYMS.items() if v == "source"]), name
        assert len(positional) <= 2, f"{name}: options must be keyword-only, got positional {positional}"
        if name not in ("detect", "score_agreement", "report"):
            assert "device" in {p.name for p in params}, f"{name} computes but takes no device"


def test_return_annotations_tell_the_truth_under_torchrun():
    for name in ANALYSES:
        fn = inspect.unwrap(getattr(memloc, name))
        body = inspect.getsource(fn)
        if re.search(r"world\(\)\[0\] > 0|rank > 0", body):
            assert "None" in str(inspect.signature(fn).return_annotation), \
                f"{name} returns None on ranks > 0 but is annotated {inspect.signature(fn).return_annotation}"


def test_eval_batch_size_has_one_default_and_listed_exceptions():
    found = {}
    for name in EVAL_BATCH_TAKERS:
        params = inspect.signature(getattr(memloc, name)).parameters
        if "eval_batch_size" in params:
            found[name] = params["eval_batch_size"].default
    assert set(EVAL_BATCH_EXCEPTIONS) <= set(found), "an exception that takes no eval_batch_size: remove it"
    odd = {name: d for name, d in found.items() if (d == EVAL_BATCH_DEFAULT) == (name in EVAL_BATCH_EXCEPTIONS)}
    assert not odd, f"eval_batch_size defaults {EVAL_BATCH_DEFAULT} except in EVAL_BATCH_EXCEPTIONS (listed, justified): {odd}"
    # the commands' flags default as their functions do
    from memloc.core.registry import command
    for name, flag in (("memorisation", "--eval-batch-size"), ("scores", "--batch-size"), ("issues", "--batch-size"),
                       ("gradients", "--batch-size"), ("flip", "--eval-batch-size"), ("train", "--eval-batch-size")):
        parser = __import__("argparse").ArgumentParser()
        command(name).arguments(parser)
        assert parser.get_default(flag.lstrip("-").replace("-", "_")) == EVAL_BATCH_DEFAULT, (name, flag)


def test_a_language_models_evaluation_rows_are_bounded_by_its_logits():
    from memloc.core.lm import LOGITS_BUDGET, build_lm, lm_rows
    small, big = build_lm("gpt", vocab_size=14, d_model=8, n_head=2), build_lm("gpt", vocab_size=50257, d_model=8, n_head=2)
    assert lm_rows(small, EVAL_BATCH_DEFAULT, 63) == EVAL_BATCH_DEFAULT        # TinyMem: the budget never binds
    rows = lm_rows(big, EVAL_BATCH_DEFAULT, 63)                                  # GPT-2's vocabulary at T = 64
    assert rows * 63 * 50257 * 4 <= LOGITS_BUDGET < (rows + 1) * 63 * 50257 * 4 and rows == 84
    assert lm_rows(big, EVAL_BATCH_DEFAULT, 10**9) == 1 and lm_rows(object(), 7, 63) == 7


def _package_source(fn) -> str:
    """The source of ``fn``'s module, or of every module of its package when it is defined in an __init__."""
    path = Path(inspect.getmodule(inspect.unwrap(fn)).__file__)
    return "".join(f.read_text() for f in (sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]))


def test_analyses_that_run_conv_nets_lay_them_out_channels_last():
    missing = set()
    for name in ANALYSES:
        if "precision" not in inspect.signature(getattr(memloc, name)).parameters or name in LM_ONLY | set(DELEGATES):
            continue
        if not re.search(r"\b(apply_channels_last|laid_out)\(", _package_source(getattr(memloc, name))):
            missing.add(name)
    assert missing == NO_CHANNELS_LAST, f"lay conv nets out with memloc.core.precision.laid_out: {missing - NO_CHANNELS_LAST}"
    for name, by in DELEGATES.items():
        assert all(f"{b}(" in _package_source(getattr(memloc, name)) for b in by), name
