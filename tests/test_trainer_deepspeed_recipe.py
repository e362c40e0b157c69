"""`recipes/train_gpt2.py` under DeepSpeed ZeRO-2 and ZeRO-3 logs DDP's GNS.

Two processes on a CPU each way, the same flags, real training (AdamW, learning rate > 0) with
a linear batch ramp (8 -> 24 examples: the accumulated micro-batches change): every logged
`gns`, `gns_sq_norm`, `gns_trace_cov`, `grad_norm`, batch size and loss must agree with the DDP
run's (relative 1e-5). DeepSpeed runs two ways:
- the user's command, `accelerate launch --config_file recipes/accelerate/deepspeed_zero{2,3}.yaml
  recipes/train_gpt2.py ... --ddp_backend gloo` (on GPUs the same without `--ddp_backend`: accelerate
  picks nccl; without a GPU it finds no backend of its own and uses the one given);
- HF's `--deepspeed recipes/accelerate/deepspeed_zero2.json` under torch.distributed.run, which
  needs `tests/deepspeed_recipe.py` on a CPU (see `deepspeed_cpu.py`).
On a GPU (`-m gpu`), the yaml command with one process against `single_gpu.yaml`.
"""

import csv
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
# The DDP reference is a module fixture (30-40 s of CPU): one xdist worker runs every test of this
# file (`make test` uses --dist loadgroup), so it is computed once, not once per worker.
pytestmark = pytest.mark.xdist_group("deepspeed_recipe_ddp_reference")
pytest.importorskip("datasets", reason="the recipe needs the datasets package")
pytest.importorskip("evaluate", reason="the recipe's perplexity goes through evaluate")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
RECIPE = os.path.join(REPO, "recipes", "train_gpt2.py")
CONFIGS = os.path.join(REPO, "recipes", "accelerate")
FLAGS = [
    "--max_tokens", "6144", "--corpus_max_bytes", "100000", "--logging_steps", "1", "--eval_steps", "1000",
    "--save_steps", "1000", "--disable_tqdm", "true", "--batch_size_policy", "linear",
    "--batch_size_start", "8", "--batch_size_end", "24",
]  # fmt: skip
COMPARED = ("gns", "gns_sq_norm", "gns_trace_cov", "grad_norm", "loss")


def run_recipe(output_dir, deepspeed_config=None, accelerate_config=None, gpu=False) -> list[dict]:
    """Two CPU processes: DDP, or DeepSpeed from HF's `--deepspeed` or from an accelerate config;
    with `gpu`, `accelerate launch` of the config on one GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if accelerate_config:  # `accelerate launch`; port 0: a free one (tests run side by side)
        command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
        command += ["--config_file", accelerate_config, "--main_process_port", "0"]
        if gpu:
            command += ["--num_processes", "1", RECIPE]
        else:
            env["DS_ACCELERATOR"] = "cpu"
            env.pop("ACCELERATE_USE_CPU", None)
            command += [RECIPE, "--ddp_backend", "gloo"]
    elif deepspeed_config:
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("ACCELERATE_USE_CPU", None)
        command = [*torchrun, os.path.join(TESTS, "deepspeed_recipe.py"), "--deepspeed", deepspeed_config]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [*torchrun, RECIPE]
    command += ["--output_dir", str(output_dir), *FLAGS]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(os.path.join(output_dir, "training_curves.csv")) as f:
        return [row for row in csv.DictReader(f) if row.get("gns")]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    return run_recipe(tmp_path_factory.mktemp("ddp"))


def assert_same_logs(zero: list[dict], ddp: list[dict]) -> None:
    assert len(zero) == len(ddp) >= 5
    assert int(zero[0]["batch_size"]) < int(zero[-1]["batch_size"])
    for a, b in zip(zero, ddp):
        assert a["batch_size"] == b["batch_size"]
        for key in COMPARED:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), (key, a, b)


def assert_zero_shards(output_dir, ranks: int) -> None:
    """The DeepSpeed engine trained: each rank saved its ZeRO shard of the optimizer state."""
    (last,) = [name for name in os.listdir(output_dir) if name.startswith("checkpoint-")]
    shards = os.listdir(os.path.join(output_dir, last, f"global_step{last.split('-')[1]}"))
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(ranks)} <= set(shards)


def test_recipe_under_zero2_logs_the_ddp_gns(tmp_path, ddp):
    assert_same_logs(run_recipe(tmp_path, os.path.join(CONFIGS, "deepspeed_zero2.json")), ddp)


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_with_the_zero_config_logs_the_ddp_gns(tmp_path, ddp, stage):
    zero = run_recipe(tmp_path, accelerate_config=os.path.join(CONFIGS, f"deepspeed_zero{stage}.yaml"))
    assert_same_logs(zero, ddp)
    assert_zero_shards(tmp_path, ranks=2)


def test_deepspeed_processes_without_a_group_are_told_to_name_gloo(monkeypatch):
    # What the command above gives without --ddp_backend gloo on a CPU (no device backend found).
    spec = importlib.util.spec_from_file_location("train_gpt2_deepspeed_launch", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # dataclasses resolve annotations through it
    spec.loader.exec_module(recipe)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(recipe.UsageError, match="DeepSpeed processes, .* add --ddp_backend gloo$"):
        recipe.check_launch(SimpleNamespace(world_size=1))
    recipe.check_launch(SimpleNamespace(world_size=2))


@pytest.fixture(scope="module")
def single_gpu(tmp_path_factory) -> list[dict]:
    config = os.path.join(CONFIGS, "single_gpu.yaml")
    return run_recipe(tmp_path_factory.mktemp("single_gpu"), accelerate_config=config, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_with_the_zero_config_on_one_gpu_logs_the_single_gpu_gns(
    tmp_path, single_gpu, stage
):
    # The user's command on a GPU (accelerate picks nccl: no --ddp_backend), fp32, one process.
    zero = run_recipe(
        tmp_path, accelerate_config=os.path.join(CONFIGS, f"deepspeed_zero{stage}.yaml"), gpu=True
    )
    assert_same_logs(zero, single_gpu)
    assert_zero_shards(tmp_path, ranks=1)
