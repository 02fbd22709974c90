"""A PyTorch Lightning training recorded by memloc.LightningCallback is a memloc run (issue 26, callbacks):
per-example dynamics equal to a recomputation, a checkpoint per epoch, ids through the batch, and
memloc's analyses run on it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import memloc  # noqa: E402
from conftest import run_readme_example  # noqa: E402
from memloc.analyses.scores.tracin import run_lrs  # noqa: E402
from memloc.core.data import build_data  # noqa: E402
from memloc.core.errors import MemlocError  # noqa: E402
from memloc.core.evaluate import evaluate  # noqa: E402
from memloc.core.inputs import as_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_SPEC = {"dataset": "digits", "noise": 0.2}
EPOCHS = 3


@memloc.register_model("lit_digits")
class LitNet(pl.LightningModule):
    """A user's LightningModule for 8x8 digits; ``training_step`` keeps each example's loss as it computed it."""

    def __init__(self, width: int = 16, return_logits: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
        self.return_logits = return_logits
        self.seen = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        self.seen.update(zip(idx.tolist(), losses.detach().tolist()))
        return {"loss": losses.mean(), "logits": logits} if self.return_logits else losses.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def fit(module, callback, loader, *, epochs=EPOCHS, ckpt_path=None, **kw):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callback if isinstance(callback, list) else [callback],
                         **kw)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def digits():
    return build_data(DATA_SPEC)


def loader(data, **kw):
    return DataLoader(memloc.WithIds(TensorDataset(data.train.x, data.train.y)), batch_size=128, shuffle=True,
                      generator=torch.Generator().manual_seed(0), **kw)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("lit") / "run"
    pl.seed_everything(0, verbose=False)
    module = LitNet()
    cb = memloc.LightningCallback(path, eval_train=TensorDataset(digits.train.x, digits.train.y),
                                  eval_test=TensorDataset(digits.test.x, digits.test.y), label_true=digits.label_true,
                                  data_spec=DATA_SPEC)
    fit(module, cb, loader(digits), enable_checkpointing=False)
    return memloc.load(path), module, cb


def test_lightning_run_records_dynamics_equal_to_a_recomputation(lit_run, digits):
    run, module, cb = lit_run
    assert isinstance(cb, pl.Callback) and isinstance(cb, memloc.LightningCallback)
    assert run.epochs == list(range(EPOCHS + 1)) and run.num_train == len(digits.train.y)
    assert run.info["model"]["spec"] == "lit_digits" and np.array_equal(run.is_noisy, digits.is_noisy)
    batches = as_batches(TensorDataset(digits.train.x, digits.train.y), batch_size=512)
    for epoch in run.epochs:                 # the end-of-epoch rows: eval mode, on the epoch's checkpoint
        ref = evaluate(run.model(epoch), batches.batches(512))
        np.testing.assert_allclose(run.dynamics("loss")[epoch], ref["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(run.dynamics("correct")[epoch], ref["correct"])
    final = run.model()
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), module.state_dict().values()))
    # presentation: the loss training_step computed for each example, the last time it saw it (epoch 3)
    seen = np.array([module.seen[i] for i in range(run.num_train)])
    np.testing.assert_allclose(run.dynamics("loss", "presentation")[EPOCHS], seen, rtol=1e-5, atol=1e-6)
    assert (run.dynamics("correct", "presentation")[0] == -1).all()
    m = run.metrics()
    assert m["train_accuracy"][-1] > 0.5 and [e["test_accuracy"] for e in cb.metrics] == pytest.approx(m["test_accuracy"][1:])
    assert m["clean_accuracy"][-1] > m["noisy_accuracy"][-1]    # the noisy labels are fitted last
    # every step's learning rate (configure_optimizers: SGD at 0.2): TracIn's weights
    weights, source = run_lrs(run, [1, 2, 3])
    assert source == "recorded" and weights.tolist() == pytest.approx([0.2] * 3, rel=1e-14)


def test_analyses_run_on_the_lightning_run(lit_run):
    run = lit_run[0]
    g = memloc.gradients(run, checkpoints="0,final", device="cpu")
    assert g["layer"].values.tolist() == ["net.1", "net.3"] and float(g.sel(subset="noisy")["norm"].max()) > 0
    s = memloc.scores(run, methods="final_loss,forgetting,el2n", device="cpu")
    for name in ("final_loss", "forgetting", "el2n"):
        assert s[name].shape == (run.num_train,)
    loss = s["final_loss"].values
    assert loss[run.is_noisy].mean() > loss[~run.is_noisy].mean()       # the mislabeled examples stand out


def test_logits_returned_by_training_step_and_a_resumed_fit(tmp_path, digits):
    """training_step returning {"loss", "logits"}; eval_train by default the training loader's dataset;
    fit(ckpt_path=) from the epoch-1 checkpoint continues the run."""
    kw = dict(label_true=digits.label_true)
    pl.seed_everything(0, verbose=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    cb = memloc.LightningCallback(tmp_path / "run", **kw)
    fit(LitNet(return_logits=True), [cb, ckpt], loader(digits), epochs=2)
    run = memloc.load(tmp_path / "run")
    assert run.epochs == [0, 1, 2] and (run.dynamics("correct", "presentation")[1:] >= 0).all()
    ref = evaluate(run.model(2), as_batches(TensorDataset(digits.train.x, digits.train.y)).batches(512))
    np.testing.assert_allclose(run.dynamics("loss")[2], ref["loss"], rtol=1e-5, atol=1e-6)
    first = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]               # epoch=0: saved after one epoch
    saved = torch.load(first, weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in run.checkpoint(1).items())   # memloc's epoch 1 = Lightning's
    again = memloc.LightningCallback(tmp_path / "run", **kw)
    fit(LitNet(return_logits=True), again, loader(digits), epochs=3, ckpt_path=str(first), enable_checkpointing=False)
    assert memloc.load(tmp_path / "run").epochs == [0, 1, 2, 3] and len(again.metrics) == 2


class NoForward(LitNet):
    """Logits computed by the inner net, not returned: nothing for the callback to record."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)


def test_user_mistakes(tmp_path, digits):
    train = TensorDataset(digits.train.x, digits.train.y)
    plain = DataLoader(train, batch_size=128, shuffle=True)
    with pytest.raises(MemlocError, match="carry no example ids"):
        fit(LitNet(), memloc.LightningCallback(tmp_path / "a", eval_train=train), plain, epochs=1,
            enable_checkpointing=False)
    with pytest.raises(MemlocError, match="found no logits"):
        fit(NoForward(), memloc.LightningCallback(tmp_path / "b", eval_train=train), loader(digits), epochs=1,
            enable_checkpointing=False)
    with pytest.raises(MemlocError, match="same length"):
        fit(LitNet(), memloc.LightningCallback(tmp_path / "c", eval_train=train, label_true=digits.label_true[:10]),
            loader(digits), epochs=1, enable_checkpointing=False)
    small = TensorDataset(digits.train.x[:100], digits.train.y[:100])        # ids beyond the examples recorded
    with pytest.raises(MemlocError, match="one example id in 0..99"):
        fit(LitNet(), memloc.LightningCallback(tmp_path / "d", eval_train=small), loader(digits), epochs=1,
            enable_checkpointing=False)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    out = run_readme_example("lightning", tmp_path, monkeypatch)
    run, g, sc = out["run"], out["g"], out["sc"]
    assert run.epochs == list(range(6)) and run.is_noisy.sum() == 180
    assert g["checkpoint"].values.tolist() == [0, 5] and len(sc["final_loss"]) == len(out["y"])


def test_without_lightning_the_callback_is_one_clear_error(tmp_path, monkeypatch):
    from memloc.training import lightning_callback
    lightning_callback._subclass.cache_clear()
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)         # import fails as if not installed
    try:
        with pytest.raises(MemlocError, match="needs lightning"):
            memloc.LightningCallback(tmp_path / "x")
    finally:
        lightning_callback._subclass.cache_clear()
