"""DeepSpeed ZeRO-2/3 under Accelerate gives DDP's GNS statistics on the same data (relative 1e-5).

`deepspeed_two_processes.py` runs the same cases under DDP (gloo) and under DeepSpeed ZeRO
(CPU accelerator, gloo), two processes each: gradient accumulation, calibration steps,
`gns_track="all"` (the engine's global norm) and batch control (the accumulated micro-batches
change from step to step). Every step's Σ_i |c_i|² and |G_B|² per group and every logged GNS
must agree. Under ZeRO-3 one case patches a model built partitioned (`zero.Init`): `save_model`
writes the unpatched model's keys and values, and `unpatch` restores the plain forward.
Needs the `deepspeed` extra (`pip install -e ".[deepspeed]"`); skipped without it.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
# The DDP reference is a module fixture (30-40 s of CPU): one xdist worker runs every test of this
# file (`make test` uses --dist loadgroup), so it is computed once, not once per worker.
pytestmark = pytest.mark.xdist_group("deepspeed_ddp_reference")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def run_two_processes(stage: int, out: str, processes: int = 2, gpu: bool = False) -> dict:
    env = dict(os.environ, HF_GNS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    if not gpu and stage:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    elif not gpu:
        env["ACCELERATE_USE_CPU"] = "1"  # DDP on gloo
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [os.path.join(TESTS, "deepspeed_two_processes.py"), str(stage), out]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_two_processes(0, str(tmp_path_factory.mktemp("ddp") / "ddp.json"))


def assert_close_rel(actual, expected, what, rel=1e-5):
    assert actual == pytest.approx(expected, rel=rel, abs=0), (what, actual, expected)


def assert_same_statistics(zero: dict, ddp: dict, stage: int) -> None:
    assert zero.keys() == ddp.keys()
    for case, expected in ddp.items():
        got = zero[case]
        assert len(got["statistics"]) == len(expected["statistics"]) > 0, case
        for step, (a, b) in enumerate(zip(got["statistics"], expected["statistics"])):
            assert a["batch_size"] == b["batch_size"], (case, step)
            for key in ("example_sq_norm_sum", "batch_sq_norm"):
                if case == "all_layers":  # under DeepSpeed: the total only (the engine's global norm)
                    assert list(a[key]) == ["total"]
                for group, value in a[key].items():
                    assert_close_rel(value, b[key][group], (case, step, key, group))
        assert len(got["logs"]) == len(expected["logs"]), case
        for a, b in zip(got["logs"], expected["logs"]):
            for key, value in b.items():
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(a[key]), (case, key)
                else:
                    assert_close_rel(a[key], value, (case, key))
    if stage == 3:  # patched while partitioned; the saved files are the unpatched model's
        assert zero["accumulation"]["saved_model_matches"] is True
        assert zero["accumulation"]["unpatch_restores"] is True
    sizes = [s["batch_size"] for s in zero["batch_control"]["statistics"]]
    assert sizes[0] < sizes[-1], sizes  # the number of accumulated micro-batches changed
    assert math.isfinite(zero["calibration"]["logs"][-1]["gns_calibrated"])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_gives_the_ddp_statistics(ddp, stage, tmp_path):
    assert_same_statistics(run_two_processes(stage, str(tmp_path / "zero.json")), ddp, stage)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_gives_the_ddp_statistics_on_gpus(stage, tmp_path):
    """The same in fp32 on CUDA (NCCL), one process per GPU up to 2 (one GPU: the plain Trainer)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    processes = min(2, torch.cuda.device_count())
    ddp = run_two_processes(0, str(tmp_path / "ddp.json"), processes, gpu=True)
    zero = run_two_processes(stage, str(tmp_path / "zero.json"), processes, gpu=True)
    assert_same_statistics(zero, ddp, stage)
