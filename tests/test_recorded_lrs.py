"""The learning rate each epoch trained with, recorded in run.h5 (/optimizer/lr) by a Recorder given the
loop's optimiser or told each step's rate, and TracIn's weights read from it (memloc.core.learning_rates)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import memloc
from memloc.analyses.scores.tracin import run_lrs
from memloc.core.errors import MemlocError
from memloc.core.learning_rates import LR_ATTRS, recorded_lrs
from memloc.core.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _epoch(model, opt, sched, x, y, rec, used):
    for rows in torch.arange(len(y)).split(10):
        logits = model(x[rows])
        opt.zero_grad()
        nn.functional.cross_entropy(logits, y[rows]).backward()
        used.append(opt.param_groups[0]["lr"])          # the rate this step uses, read by hand
        opt.step()
        sched.step()
        rec.record_batch(rows, logits.detach(), y[rows])
    rec.end_epoch()


def test_a_recorder_given_the_optimizer_records_each_epochs_mean_rate(tmp_path):
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = make_optimizer(model.parameters(), "sgd", lr=0.3)      # torch.optim.SGD without its torch._dynamo import
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)       # 4 steps an epoch, 3 epochs
    rec = memloc.Recorder(tmp_path / "r", model, eval_train=(x, y), optimizer=opt)
    used = []
    try:
        for _ in range(3):
            _epoch(model, opt, sched, x, y, rec, used)
    finally:
        rec.close()
    assert not opt._optimizer_step_pre_hooks                 # the recorder's hook left with it
    want = np.array(used).reshape(3, 4).mean(1)
    assert len(set(want)) == 3
    run = memloc.load(tmp_path / "r")
    weights, source = run_lrs(run, [1, 2, 3])
    assert source == "recorded"
    np.testing.assert_allclose(weights, want, rtol=1e-15)
    with h5py.File(tmp_path / "r" / "run.h5") as f:
        ds = f["optimizer/lr"]
        assert np.isnan(ds[0]) and list(ds.attrs["dims"]) == ["epoch"] and ds.attrs["units"] == LR_ATTRS["units"]
    # reopened: rewound to epoch 1 (the rows after it forgotten), then rates told one step at a time
    rec = memloc.Recorder(tmp_path / "r", model, eval_train=(x, y), resume=True)
    try:
        rec.rewind_to(1)
        for lr in (0.1, 0.3):
            rec.record_lr(torch.tensor(lr, dtype=torch.float64))               # a tensor rate is a number too
        rec.end_epoch()
        rec.end_epoch()                                   # an epoch without a recorded step: NaN
        for bad in ("fast", -1.0, float("nan")):
            with pytest.raises(MemlocError, match="record_lr: lr must be"):
                rec.record_lr(bad)
    finally:
        rec.close()
    np.testing.assert_allclose(recorded_lrs(run, [1, 2]), [want[0], 0.2], rtol=1e-15)
    assert recorded_lrs(run, [1, 3]) is None and recorded_lrs(run, [4]) is None
    with pytest.warns(UserWarning, match="weights every checkpoint 1"):   # not recorded for every epoch: the config's
        assert run_lrs(run, [1, 2, 3])[1] == "none: 1"


def test_an_optimizer_that_is_not_a_torch_optimizer_is_refused_before_any_file(tmp_path):
    x, y = _data(8)
    with pytest.raises(MemlocError, match="optimizer must be a torch.optim.Optimizer") as e:
        memloc.Recorder(tmp_path / "r", nn.Linear(5, 3), eval_train=(x, y), optimizer=object())
    assert e.value.argument == "optimizer" and not (tmp_path / "r").exists()
