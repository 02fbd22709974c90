"""scripts/gpu_check.py cannot rot: its dry run (every step on the CPU at toy size) passes here, and
its mistakes are one line with exit status 2."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "gpu_check.md").read_text()
    steps = ["environment", "cuda_tests", "throughput_fp32", "throughput_bf16", "ddp", "flip_resnet9"]
    for step in steps:
        assert f"## {step}: ok" in summary, summary
    assert "Every step passed." in summary
    for precision in ("fp32", "bf16"):       # the benchmark's own tables, with the analyses timed
        table = (tmp_path / f"gpu_throughput_{precision}.md").read_text()
        assert f"precision {precision}" in table and "| mlp | flip |" in table and "| mlp | raw fwd+bwd |" in table
    assert "largest weight difference from the same training without torchrun" in summary
    # the searches ran (examples classified correctly after the toy training) and were extrapolated
    assert "2 searches of 2 examples" in summary and "The paper's 1,000 examples x 30 repeats" in summary


def test_mistakes_are_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    cases = [((), "no CUDA device: the GPU check needs one"),      # CI has no GPU: a real check is refused
             (("--dry-run", "--steps", "ddp,warp"), "--steps: unknown step(s) warp"),
             (("--dry-run", "--data-root", str(tmp_path / "none")), "is not a folder")]
    if torch.cuda.is_available():
        cases = cases[1:]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--out-dir", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], err
    assert not list(tmp_path.iterdir())         # nothing written before the arguments are checked
