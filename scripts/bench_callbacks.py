"""What recording costs: a Hugging Face ``Trainer`` and a Lightning ``fit`` with and without memloc's callback.

    python scripts/bench_callbacks.py [--repeats 3] [--markdown artifacts/bench_callbacks.md]

Each row is the median wall time of ``repeats`` trainings of the same model from the same seed (the
two variants alternate within each repeat, so a busy machine slows them alike), and the ratio with /
without. The callbacks' work: epoch 0 (one pass over the data), a forward hook measuring every training
forward, one evaluation pass over the training (and held-out) examples and a checkpoint per epoch.

* HF: GPT-2 config (2 layers, width 64, 4 heads) on ``tinymem:mult`` (512 training and 64 held-out
  sequences of 32 tokens), 3 epochs of batches of 32, ``use_cpu=True``;
* Lightning: an MLP (64-128-10) on scikit-learn's digits (1437 training images, 20% wrong labels),
  5 epochs of batches of 64 on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, machine  # noqa: E402

import memloc  # noqa: E402


def hf(folder: Path, record: bool) -> float:
    from transformers import Trainer, TrainingArguments
    data = memloc.tinymem("mult", n_train=512, n_test=64, seq_len=32, noise=0.1)
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, n_layer=2, d_model=64, n_head=4, max_len=32)
    cb = memloc.HFTrainerCallback(folder / "run", data, overwrite=True)
    args = TrainingArguments(str(folder / "out"), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=cb.train_dataset(), callbacks=[cb] if record else [])
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def lightning(folder: Path, record: bool) -> float:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from memloc.core.data import build_data

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                           torch.nn.Linear(128, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    d = build_data({"dataset": "digits", "noise": 0.2})
    train = TensorDataset(d.train.x, d.train.y)
    pl.seed_everything(0, verbose=False)
    cb = memloc.LightningCallback(folder / "run", eval_train=train, label_true=d.label_true, overwrite=True)
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb] if record else [])
    loader = DataLoader(memloc.WithIds(train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    trainer.fit(Net(), loader)
    return time.perf_counter() - start


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    started = time.time()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    lines = [f"# Callbacks: what recording costs (`python scripts/bench_callbacks.py --repeats {args.repeats}`)", "",
             f"Median of {args.repeats} trainings per cell (seconds; with and without alternate).", "",
             f"Machine: {machine('cpu')}; load average {os.getloadavg()[0]:.1f} at the start.", "",
             "| training | without callback | with callback | ratio |", "|---|---|---|---|"]
    for name, fn in (("HF Trainer, GPT-2 config, 512 sequences, 3 epochs", hf),
                     ("Lightning, MLP on digits, 1437 images, 5 epochs", lightning)):
        times = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for record in (False, True):
                    times[record].append(fn(Path(tmp), record))
        plain, rec = statistics.median(times[False]), statistics.median(times[True])
        lines.append(f"| {name} | {plain:.2f} | {rec:.2f} | {rec / plain:.2f}x |")
    return finish(lines, started, args.markdown)


if __name__ == "__main__":
    main()
