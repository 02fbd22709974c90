"""Old vs new code on one run: every analysis computed by two checkouts of memloc must be array-equal.

    git worktree add /tmp/memloc-old <commit>
    python scripts/compare_versions.py --old /tmp/memloc-old --new . --out /tmp/compare

Each checkout runs in its own process (``PYTHONPATH`` = the checkout, one torch thread): it trains
the demo's run (MNIST-5k, MLP, 10% symmetric noise; fewer epochs than the demo) and computes, from
its own run, gradients, rewind, retrain, flip at the unit and the weight site, scores, label issues
and Fisher importance through the public functions both versions have (``memloc.<name>``). The
results are saved as HDF5 and compared variable by variable (``xarray.Dataset.equals``: values,
dims, coordinates; NaN equal to NaN) and by their configs (up to the runs' folders and to options
added since, :data:`LATER_DEFAULTS`, at their default), together with every array of the run's
``run.h5`` and its final weights. Exit status 1 on any difference. Use it before and after a restructuring that must not change results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

COMPUTE = r"""
import sys, torch, numpy as np, h5py
torch.set_num_threads(1)
import memloc
out = sys.argv[1]
run = memloc.train(out + "/run", {"dataset": "mnist5k", "model": "mlp", "noise": 0.1, "epochs": 6}, device="cpu")
results = {
    "gradients": memloc.gradients(run, checkpoints="0-6:3", device="cpu"),
    "rewind": memloc.rewind(run, checkpoints="0-6:3", device="cpu"),
    "retrain": memloc.retrain(run, epochs=2, device="cpu"),
    # resume_dir: the old spelling of resume, so that this runs on the old code too
    "flip_unit": memloc.flip(run, examples="noisy:6,clean:6", device="cpu", resume_dir=None),
    "flip_weight": memloc.flip(run, examples="noisy:3,clean:3", site="weight", max_units=30, device="cpu",
                               resume_dir=None),
    "scores": memloc.scores(run, device="cpu"),
    "issues": memloc.find_label_issues(run, device="cpu"),
    "importance": memloc.importance(run, device="cpu"),
}
for name, res in results.items():
    res.save(f"{out}/{name}.h5")
arrays = {}
with h5py.File(run.path / "run.h5") as f:       # every dataset: examples, test, dynamics, metrics
    f.visititems(lambda n, o: arrays.__setitem__(n.replace("/", "."), o[()]) if isinstance(o, h5py.Dataset) else None)
np.savez(f"{out}/dynamics.npz", **arrays)
torch.save(torch.load(run.path / "checkpoints" / "epoch_0006.pt", weights_only=True), f"{out}/final.pt")
print("computed", ", ".join(results))
"""


#: options a result's config records since some version, at the value that is the older code's computation:
#: a config without the key equals one holding that value
LATER_DEFAULTS = {"precision": "fp32", "optimizer": "sgd", "units": "outputs"}   # retrain's optimizer, flip's units

#: config keys that say how a result was computed, not what it is, and are compared through its values:
#: facts recorded since (flip's weight-site path, why importance has no flip overlap) and scores' batch,
#: whose default went 256 -> 1024 (one eval_batch_size default for every evaluation pass)
NOT_COMPARED = {"weight_site_path", "weight_site_fallback", "flip_overlap_missing", "batch_size"}

#: results whose summation order changed on purpose, with the relative tolerance float32 rounding explains:
#: importance of a model made only of nn.Linear layers takes the outer-product path ((g^2)^T (a^2), 1037d8e)
#: where the old code summed per-example gradients from torch.func; forced onto torch.func, the new code
#: gives the old values exactly
ROUNDING = {"importance": 1e-6}


def config(ds, folder: Path) -> dict:
    """A result's config, its run's folder written as ``<out>``, :data:`LATER_DEFAULTS` at their default and
    :data:`NOT_COMPARED` dropped."""
    cfg = json.loads(str(ds.attrs.get("config", "{}")).replace(str(folder), "<out>"))
    return {k: v for k, v in cfg.items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k]) and k not in NOT_COMPARED}


def compute(checkout: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", COMPUTE, str(out)], env=env, check=True, cwd=out)


def _close(a, b, rtol: float) -> bool:
    """Same variables and coordinates, float values within ``rtol``, the rest equal."""
    import numpy as np
    if set(a.data_vars) != set(b.data_vars) or not a.coords.equals(b.coords):
        return False
    return all(np.allclose(a[k].values, b[k].values, rtol=rtol, atol=0, equal_nan=True)
               if a[k].dtype.kind == "f" else a[k].equals(b[k]) for k in a.data_vars)


def compare(old: Path, new: Path) -> list[str]:
    import numpy as np
    import torch
    import xarray as xr
    differ = []
    for f in sorted(old.glob("*.h5")):
        a = xr.load_dataset(f, engine="h5netcdf")
        b = xr.load_dataset(new / f.name, engine="h5netcdf")
        ca, cb = config(a, old), config(b, new)
        close = not a.equals(b) and f.stem in ROUNDING and _close(a, b, ROUNDING[f.stem])
        why = (["values"] if not (a.equals(b) or close) else []) + [f"config {k}" for k in sorted(set(ca) | set(cb))
                                                                  if ca.get(k) != cb.get(k)]
        same = not why
        said = f"equal to rtol {ROUNDING[f.stem]:g} (see ROUNDING)" if same and close else "equal"
        print(f"{f.stem:<12} {said if same else 'DIFFERENT (' + ', '.join(why) + ')'} ({len(a.data_vars)} variables)")
        if not same:
            differ.append(f.stem)
    da, db = np.load(old / "dynamics.npz"), np.load(new / "dynamics.npz")
    same = sorted(da) == sorted(db) and all(np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f")
                                            for k in da)
    print(f"{'run.h5':<12} {'equal' if same else 'DIFFERENT'} ({len(da)} arrays)")
    wa, wb = torch.load(old / "final.pt"), torch.load(new / "final.pt")
    same_w = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"{'weights':<12} {'equal' if same_w else 'DIFFERENT'} ({len(wa)} tensors)")
    return differ + ([] if same else ["run.h5"]) + ([] if same_w else ["weights"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="checkout of the old code (a folder holding memloc/)")
    p.add_argument("--new", default=".", help="checkout of the new code")
    p.add_argument("--out", default="/tmp/memloc-compare", help="where both versions write their runs and results")
    args = p.parse_args(argv)
    out = Path(args.out)
    for name, checkout in (("old", args.old), ("new", args.new)):
        if not (Path(checkout) / "memloc" / "__init__.py").is_file():
            p.error(f"--{name} {checkout!r} holds no memloc/ package")
        compute(Path(checkout), out / name)
    differ = compare(out / "old", out / "new")
    print("all equal" if not differ else f"different: {', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
