"""`recipes/train_gpt2.py` under DeepSpeed ZeRO-2 (recipes/accelerate/deepspeed_zero2.json) logs DDP's GNS.

Two processes on a CPU each way, the same flags, real training (AdamW, learning rate > 0) with
a linear batch ramp (8 -> 24 examples: the accumulated micro-batches change): every logged
`gns`, `gns_sq_norm`, batch size and loss must agree with the DDP run's (relative 1e-5). On GPUs
the same run is `accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml
recipes/train_gpt2.py ...` (the CPU needs `tests/deepspeed_recipe.py`: see `deepspeed_cpu.py`).
"""

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FLAGS = [
    "--max_tokens", "6144", "--corpus_max_bytes", "100000", "--logging_steps", "1", "--eval_steps", "1000",
    "--save_steps", "1000", "--disable_tqdm", "true", "--batch_size_policy", "linear",
    "--batch_size_start", "8", "--batch_size_end", "24",
]  # fmt: skip


def run_recipe(output_dir, deepspeed_config=None) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if deepspeed_config:
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("ACCELERATE_USE_CPU", None)
        command += [os.path.join(TESTS, "deepspeed_recipe.py"), "--deepspeed", deepspeed_config]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command += [os.path.join(REPO, "recipes", "train_gpt2.py")]
    command += ["--output_dir", str(output_dir), *FLAGS]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(os.path.join(output_dir, "training_curves.csv")) as f:
        return [row for row in csv.DictReader(f) if row.get("gns")]


def test_recipe_under_zero2_logs_the_ddp_gns(tmp_path):
    ddp = run_recipe(tmp_path / "ddp")
    zero = run_recipe(tmp_path / "zero2", os.path.join(REPO, "recipes", "accelerate", "deepspeed_zero2.json"))
    assert len(zero) == len(ddp) >= 5
    assert int(zero[0]["batch_size"]) < int(zero[-1]["batch_size"])
    for a, b in zip(zero, ddp):
        assert a["batch_size"] == b["batch_size"]
        for key in ("gns", "gns_sq_norm", "gns_trace_cov", "loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), (key, a, b)
