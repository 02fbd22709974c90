"""Shared fixtures: real (small) training runs, trained once per test session.

* ``mlp_run``: the default MLP on mnist5k with 10% symmetric noise (the README's acceptance run,
  about 15 s on 2 CPU cores);
* ``lenet_run``: lenet on 1,000 images of mnist5k, 10% noise, 15 epochs (a few noisy labels memorised,
  several units to zero for some examples: enough for the flip equality test; ~5 s);
* ``tiny_run``: a small MLP on scikit-learn digits, 10% noise, 4 epochs (for fast error-path and
  equality tests);
* ``memorising_lm``: a 2-block TinyGPT on TinyMem ``mult`` sequences that memorises part of its noisy
  ones (a language model's run, about a second);
* ``hf_run``: an HF GPT-2-config model trained in a plain user loop (:func:`user_loop`) and recorded by
  ``SequenceRecorder``, 6 epochs (part of its noisy sequences memorised); ``hf_trainer_run``: the same
  model trained by a transformers ``Trainer`` (:func:`hf_trainer`) and recorded by ``HFTrainerCallback``,
  3 epochs (about 2 s each, on one thread).
"""
import contextlib
import functools
import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from memloc.training.train import train

# 2 threads (CI's cores) in one process; under pytest-xdist (`pytest -n 2`) the cores are shared by the workers.
# The memloc processes a test starts use the same count (a run trained there equals one trained here).
THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def pytest_configure(config):
    """Under pytest-xdist (``-n``), the tests of a module marked ``xdist_group`` run on one worker, so that its
    module fixtures (a trained run, one torchrun serving several tests) are made once, not once per worker
    (xdist's default ``--dist load`` ignores the mark; ``loadgroup`` deals out the other tests as ``load`` does)."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def needs_cuda(devices: int = 1):
    """Decorator of a CUDA-only test: skipped without ``devices`` GPUs, marked ``cuda`` so that
    ``pytest -m cuda`` (scripts/gpu_check.py) selects exactly these."""
    def deco(fn):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        reason = "needs a CUDA device" if devices == 1 else f"needs {devices} GPUs"
        return pytest.mark.cuda(pytest.mark.skipif(have < devices, reason=reason)(fn))
    return deco


def results_free_copy(run, path):
    """A copy of ``run`` at ``path`` without its results (session runs collect other tests' results)."""
    import shutil

    import memloc
    shutil.copytree(run.path, path, ignore=lambda folder, names: ["results"] if folder == str(run.path) else [])
    return memloc.load(path)


def readme_example(name: str) -> str:
    """The python block after the marker ``<!-- example: NAME`` in the README or a page of docs/."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        text = page.read_text()
        if f"<!-- example: {name} " in text:
            return text.split(f"<!-- example: {name} ", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    raise LookupError(f"no example {name!r} in README.md or docs/")


def run_readme_example(name: str, folder, monkeypatch) -> dict:
    """Run the documented example ``name`` (:func:`readme_example`) as written, in this process, in working directory ``folder``
    (its ``runs/...`` land there; ``monkeypatch`` restores the directory after the test); returns its globals."""
    monkeypatch.chdir(folder)
    scope = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(readme_example(name), f"example:{name}", "exec"), scope)
    return scope


def train_interrupted(path, cfg, epoch: int = 1, **kw):
    """Train ``cfg`` into ``path`` and stop it after ``epoch`` as Ctrl-C would (a kill); the run is
    left at that epoch, to be resumed."""
    def stop(e, metrics):
        if e == epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(path, cfg, on_epoch_end=stop, **kw)


def train_exit2(capsys, argv, match):
    """``memloc train ARGV`` ends with exit status 2 and one line on stderr holding ``match``."""
    from memloc.cli import run as cli_run
    with pytest.raises(SystemExit) as e:
        cli_run("train", argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1, err


@contextlib.contextmanager
def forward_dtypes():
    """The set of dtypes of every module's tensor output inside the block (a global forward hook): a
    16-bit one shows that autocast was at work."""
    seen = set()

    def hook(module, inputs, out):
        if torch.is_tensor(out) and out.is_floating_point():
            seen.add(out.dtype)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def in_fp32_and_bf16(call, variable: str):
    """(fp32 result, bf16 result) of ``call(precision=...)``, checked: the bf16 one ran forward passes in
    bfloat16 (autocast), each records its precision, and bf16 changed ``variable``."""
    import numpy as np
    a = call(precision="fp32")
    with forward_dtypes() as seen:
        b = call(precision="bf16")
    assert torch.bfloat16 in seen and (a.config["precision"], b.config["precision"]) == ("fp32", "bf16")
    assert not np.array_equal(a[variable].values, b[variable].values)
    return a, b


@functools.lru_cache(maxsize=None)
def trained_to_memorise(n_memorised: int):
    """A TinyGPT (2 layers, width 32, vocabulary 14) trained (all weights, full batch, Adam) until it reproduces
    the suffixes (5 tokens after a prefix of 5) of the first ``n_memorised`` of 8 random training sequences:
    (the model in eval mode, a SequenceSet whose first 4 sequences are the memorisation targets and the other
    4 clean, with 6 test sequences). Built once per process and ``n_memorised``: copy the model to change it."""
    import numpy as np
    from memloc.core.lm import TinyGPT, lm_logits, suffix_measures
    from memloc.core.optim import make_optimizer
    from memloc.core.sequences import SequenceSet, TINYMEM_VOCAB
    model = TinyGPT(14, n_layer=2, n_head=2, d_model=32, d_mlp=32, max_len=16, seed=0).train()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 14, (8, 10)))
    opt = make_optimizer(model.parameters(), "adam", lr=1e-2, weight_decay=0.0)
    for _ in range(400):
        loss, _, memorised = suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 5)
        if memorised[:n_memorised].all():
            break
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert memorised[:n_memorised].all()
    target = np.arange(8) < 4
    data = SequenceSet("random", x, torch.from_numpy(rng.integers(0, 14, (6, 10))), np.arange(8), target,
                       np.where(target, "canary", "clean"), 5, 5, list(TINYMEM_VOCAB))
    return model.eval(), data


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models (language models) run fastest on one thread: two threads on two busy cores spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "mlp", {"model": "mlp"}, device="cpu")


@pytest.fixture(scope="session")
def lenet_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "lenet", {"model": "lenet", "train_size": 1000, "epochs": 15},
                 device="cpu")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "tiny",
                 {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 64, "lr": 0.1},
                 device="cpu")


@pytest.fixture(scope="session")
def memorising_lm(tmp_path_factory):
    """Two layers trained until part of the noisy sequences (each seen five times an epoch) is memorised:
    about 40% of all sequences and half the noisy ones after 10 epochs (1-3 s, on one thread)."""
    cfg = {"dataset": "tinymem:mult", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 16,
           "n_test": 8, "seq_len": 16, "suffix_len": 4, "noise": 0.5, "duplicate": 4, "epochs": 10, "batch_size": 8,
           "lr": 2e-2, "weight_decay": 0.0}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tmp_path_factory.mktemp("lm") / "mem", cfg, device="cpu")
    finally:
        torch.set_num_threads(before)


HF_SIZES = dict(n_layer=1, n_head=2, d_model=32)       # the transformers models of the hf_* runs


def user_loop(run_dir, data, *, epochs=3, lr=2e-2, seed=0, sinks=None):
    """A notebook's loop: an HF GPT-2 model (random init), AdamW, shuffled batches of rows, the HF loss;
    ``sinks``: memloc.insert_sinks's options (each batch's forward inside rec.sinks(idx))."""
    import memloc
    from memloc.core.sequence_recorder import SequenceRecorder
    torch.manual_seed(seed)
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=data.seq_len, seed=seed, **HF_SIZES)
    if sinks is not None:
        memloc.insert_sinks(model, **sinks)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rec = SequenceRecorder(run_dir, model, data)                   # records epoch 0 (the initialisation)
    try:
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(data)).split(8):
                x = data.tokens[idx]
                with rec.sinks(idx) if sinks is not None else contextlib.nullcontext():
                    out = model(input_ids=x, labels=x)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                rec.record_batch(idx, out, x)                      # the output itself: its .logits are read
            rec.end_epoch()                                        # measures every sequence, checkpoints
    finally:
        rec.close()
    return model


def hf_trainer(out, model, dataset, callback, *, epochs=2, **kw):
    """A transformers Trainer on the CPU (constant learning rate 2e-2, batches of 8, no saving unless asked)."""
    from transformers import Trainer, TrainingArguments
    kw = {"save_strategy": "no", "lr_scheduler_type": "constant", "learning_rate": 2e-2, **kw}
    args = TrainingArguments(str(out), num_train_epochs=epochs, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True, seed=0, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory):
    """(run, model, data): the user loop's run of 6 epochs on TinyMem mult sequences (16, each noisy one 4 times)."""
    import memloc
    data = memloc.tinymem("mult", n_train=16, n_test=8, seq_len=16, suffix_len=4, noise=0.5, duplicate=4)
    path = tmp_path_factory.mktemp("hf") / "loop"
    with _threads(1):
        model = user_loop(path, data, epochs=6)
    return memloc.load(path), model, data


@pytest.fixture(scope="session")
def hf_trainer_data():
    import memloc
    return memloc.tinymem("mult", n_train=16, n_test=8, seq_len=16, suffix_len=4, noise=0.5, duplicate=2)


@pytest.fixture(scope="session")
def hf_trainer_run(tmp_path_factory, hf_trainer_data):
    """(run, model, callback): a Trainer's run of 3 epochs on ``hf_trainer_data``, config {"note": "tiny"}."""
    pytest.importorskip("accelerate")      # the Trainer needs it (the dev extra installs it)
    import memloc
    data = hf_trainer_data
    tmp = tmp_path_factory.mktemp("trainer")
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=data.seq_len, **HF_SIZES)
    cb = memloc.HFTrainerCallback(tmp / "run", data, config={"note": "tiny"})
    with _threads(1):
        hf_trainer(tmp / "out", model, cb.train_dataset(), cb, epochs=3).train()
    return memloc.load(tmp / "run"), model, cb


#: the worker of :func:`torchrun_steps`: each step in turn, in the one process group (joined once), its output
#: (file descriptors 1 and 2) in files of its own (step i, rank r: i.r.out, i.r.err) and its exit status in i.r.code;
#: an exception other than SystemExit ends the process, as it ends a torchrun of that step alone
STEPS = """
import json, os, runpy, sys, traceback
folder, steps, rank = sys.argv[1], json.loads(sys.argv[2]), os.environ["RANK"]
for i, step in enumerate(steps):
    base = os.path.join(folder, f"{i}.{rank}")
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(base + ".out", "w") as out, open(base + ".err", "w") as err:
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        code = 0
        try:
            if step[0] == "-m":
                sys.argv = [step[1], *step[2:]]
                runpy.run_module(step[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(step)
                runpy.run_path(step[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    with open(base + ".code", "w") as f:
        f.write(str(code))
"""


class Step(NamedTuple):
    """One step of :func:`torchrun_steps`: what both ranks wrote (rank 0's output, then rank 1's) and their exit
    statuses (None: the rank never finished the step; ``err`` then ends with torchrun's own error output)."""
    out: str
    err: str
    codes: tuple

    def ok(self) -> "Step":
        """The step, checked: both ranks finished it with exit status 0 (else its error output fails the test)."""
        assert self.codes == (0, 0), self.err[-3000:]
        return self


def torchrun_steps(folder, steps: dict[str, list], *, env: dict | None = None, cwd=None,
                   step_timeout: int = 300) -> dict[str, Step]:
    """Run ``steps`` ({name: step}) in one torchrun of 2 processes (gloo on the CPU, one thread each) instead of
    one torchrun each (each launch imports torch three times: ~15 CPU-s), in their order, ``step_timeout``
    seconds each at most; {name: its :class:`Step`}. A step is what follows torchrun's options:
    ``["-m", "memloc", COMMAND, ...]`` or ``[SCRIPT, ...]``. Their outputs go to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "steps.py"
    script.write_text(STEPS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(folder), json.dumps([list(map(str, s)) for s in steps.values()])]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd, capture_output=True,
                       text=True, timeout=step_timeout * len(steps))

    def read(name):
        path = folder / name
        return path.read_text() if path.exists() else None

    out = {}
    for i, name in enumerate(steps):
        codes = tuple(None if (code := read(f"{i}.{r}.code")) is None else int(code) for r in (0, 1))
        err = "".join(read(f"{i}.{r}.err") or "" for r in (0, 1))
        out[name] = Step("".join(read(f"{i}.{r}.out") or "" for r in (0, 1)),
                         err + (p.stderr[-3000:] if None in codes else ""), codes)
    return out
