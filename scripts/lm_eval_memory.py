"""Peak memory of a language model's evaluation pass (``memloc.memorisation``) against ``eval_batch_size``.

A GPT-2-config model (``transformers``, random init; 2 blocks of width 64: the logits dominate) with
GPT-2's 50,257-token vocabulary on sequences of T = 64 tokens (prefix 32, suffix 32). Each setting
runs in a fresh process; the table gives the growth of its resident memory during the pass (peak RSS
minus RSS before it) beside the float32 logits of one forward (rows x 63 positions x V x 4 bytes).
"without budget" sets ``memloc.core.lm.LOGITS_BUDGET`` out of reach (the code before it); 256 and 1024 rows
without it are predicted from the measured growth per row, not run (3.2 and 13 GB of logits alone: more than
this shared machine can spare).

    python scripts/lm_eval_memory.py --markdown artifacts/lm_eval_memory.md
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, invocation, machine  # noqa: E402

VOCAB, T, PREFIX, N = 50257, 64, 32, 256


def one(batch: int, budget: bool) -> dict:
    import resource

    import numpy as np
    import torch

    import memloc
    from memloc.core import lm
    from memloc.core.sequences import SequenceSet
    torch.manual_seed(0)
    model = lm.hf_causal_lm("gpt2", vocab_size=VOCAB, n_layer=2, n_head=2, d_model=64, max_len=T).eval()
    tokens = torch.randint(0, VOCAB, (N, T))
    data = SequenceSet("random", tokens, tokens[:2], np.arange(N), np.zeros(N, bool), np.array(["clean"] * N),
                       PREFIX, T - PREFIX, [str(i) for i in range(VOCAB)])
    if not budget:
        lm.LOGITS_BUDGET = 1 << 62
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    before, start = rss(), time.perf_counter()
    res = memloc.memorisation(model, data, eval_batch_size=batch, device="cpu")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = lm.lm_rows(model, batch, T - 1)
    return {"rows": rows, "growth": peak - before, "seconds": seconds,
            "loss": float(res["suffix_loss"].mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        batch, budget = json.loads(args.child)
        print(json.dumps(one(batch, budget)))
        return
    started = time.time()
    settings = [(64, False), (128, False), (256, True), (1024, True)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = [f"# Peak memory of memorisation's pass against eval_batch_size\n",
             f"Command: `{invocation(__file__)}`  ", f"Machine: {machine('cpu')}; load average "
             f"{os.getloadavg()[0]:.1f} at the start; one torch thread per setting.\n",
             f"GPT-2 config (transformers, random init, 2 blocks, d_model 64), vocabulary {VOCAB}, {N} sequences of "
             f"T = {T} tokens (prefix {PREFIX}); logits per row: {(T - 1) * VOCAB * 4 / 1e6:.1f} MB.\n",
             "| eval_batch_size | logits budget (1 GiB) | rows per forward | logits of one forward | "
             "memory growth (peak RSS) | seconds | mean suffix loss |", "|---|---|---|---|---|---|---|"]
    losses, per_row = set(), []
    for batch, budget in settings:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps([batch, budget])], env=env,
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        losses.add(round(r["loss"], 6))
        per_row += [] if budget else [r["growth"] / batch]
        lines.append(f"| {batch} | {'yes' if budget else 'no'} | {r['rows']} | "
                     f"{r['rows'] * (T - 1) * VOCAB * 4 / 2**30:.2f} GiB | {r['growth'] / 2**30:.2f} GiB | "
                     f"{r['seconds']:.1f} | {r['loss']:.6f} |")
    for batch in (256, 1024):
        lines.append(f"| {batch} | no | {batch} | {batch * (T - 1) * VOCAB * 4 / 2**30:.2f} GiB | predicted: "
                     f"{batch * max(per_row) / 2**30:.1f} GiB (not run) | | |")
    lines.append(f"\nThe mean suffix loss is the same in every setting ({len(losses)} distinct value(s) to 6 "
                 "decimals): the budget changes how many rows a forward holds, not the result.")
    finish(lines, started, args.markdown)


if __name__ == "__main__":
    main()
