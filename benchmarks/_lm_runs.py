"""One GPT-2 training run of GNSTrainer on token data, evaluated at fixed token counts; and a launcher.

Shared by `batch_schedule.py` and `validate_calibration.py`. A run is described by a
`RunSpec` (JSON-serializable), trains with batch control (`max_tokens` budget, D2Z LR in
tokens, LR × √(B / B_ref)), evaluates the held-out loss at `n_evals` evenly spaced token
counts (and at step 0), and writes `result.json` into its folder. `launch` runs specs in
this process one after another (`jobs=0`, the CPU smoke path) or as concurrent processes
(`python benchmarks/_lm_runs.py SPEC.json`): several small runs share one GPU; concurrency
changes the wall time, not the results (each run is its own process with its own seeds).

Every run stops at `deadline` (Unix time) at the latest and then says `complete: false`:
a benchmark command never outlives the time it was given.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    # name: (n_layer, n_embd, n_head, block_size)
    "tiny": (2, 32, 2, 32),
    "small": (4, 128, 4, 256),
    "gpt2-124m": (12, 768, 12, 512),
}


@dataclass
class RunSpec:
    """Everything one run needs; `batch_size` is the constant batch, or the start of an adaptive one."""

    name: str
    out_dir: str
    data_dir: str
    shape: str
    policy: str  # "constant" | "linear" | "gns"
    seed: int
    batch_size: int
    micro_batch: int
    max_tokens: int
    learning_rate: float
    lr_reference_batch: int
    batch_size_end: int | None = None  # linear: end of the ramp; gns: the cap
    warmup_fraction: float = 0.02
    gns_multiplier: float = 1.0
    gns_track: str = "norms"
    calibrate_every: int | None = None  # None: GNSTrainingArguments' default
    n_evals: int = 32
    eval_blocks: int = 128
    device: str = "cuda"
    bf16: bool = True
    deadline: float = math.inf
    record_steps: bool = False  # per-step statistics (validation): one host sync per step
    timing_from_step: int | None = None  # time steps from here to the end (throughput)
    extra_args: dict = field(default_factory=dict)


def build_model(shape: str, vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head, block = SHAPES[shape]
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=block, vocab_size=vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def n_parameters(shape: str, vocab_size: int) -> int:
    """Parameters of the model (embeddings included, the tied head counted once)."""
    with torch.device("meta"):
        model = build_model(shape, vocab_size, seed=0)
    return sum(p.numel() for p in model.parameters())


def training_arguments(spec: RunSpec):
    from hf_gns.trainer import GNSTrainingArguments

    adaptive = spec.policy != "constant"
    kwargs = dict(
        output_dir=spec.out_dir,
        per_device_train_batch_size=spec.micro_batch,
        learning_rate=spec.learning_rate,
        lr_schedule="d2z",
        lr_warmup_fraction=spec.warmup_fraction,
        lr_batch_scaling="sqrt",
        lr_reference_batch_size=spec.lr_reference_batch,
        max_tokens=spec.max_tokens,
        batch_size_policy=spec.policy,
        batch_size_start=spec.batch_size,
        # adaptive batches need not be multiples of the micro-batch (the last one is cut)
        batch_size_granularity="example" if adaptive else "micro_batch",
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=spec.bf16,
        use_cpu=spec.device == "cpu",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        dataloader_num_workers=0,
        gns_track=spec.gns_track,
        gns_groups=["type"] if spec.gns_track == "all" else [],
    )
    if spec.policy == "linear":
        kwargs["batch_size_end"] = spec.batch_size_end
    if spec.policy == "gns":
        kwargs.update(
            batch_size_min=spec.batch_size,
            batch_size_max=spec.batch_size_end,
            gns_batch_multiplier=spec.gns_multiplier,
        )
    if spec.calibrate_every is not None:
        kwargs["gns_calibrate_every"] = spec.calibrate_every
    kwargs.update(spec.extra_args)
    return GNSTrainingArguments(**kwargs)


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, bf16: bool, chunk: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the held-out blocks (B, T)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(blocks), chunk):
            rows = blocks[start : start + chunk].to(device)
            total += model(input_ids=rows, labels=rows).loss.float().item() * len(rows)
    model.train(was_training)
    return total / len(blocks)


def _recorder_class():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Evaluates at evenly spaced token counts; optionally records every step's statistics."""

        def __init__(self, trainer, spec: RunSpec, eval_rows: torch.Tensor, result: dict):
            self.trainer, self.spec, self.eval_rows, self.result = trainer, spec, eval_rows, result
            self.points = [spec.max_tokens * (k + 1) / spec.n_evals for k in range(spec.n_evals)]
            self.next_point = 0

        def _evaluate(self, step: int, tokens: int) -> None:
            logs = self.trainer.gns_logs()
            self.result["evals"].append(
                {
                    "step": step,
                    "tokens": tokens,
                    "loss": eval_loss(self.trainer.model, self.eval_rows, self.spec.bf16),
                    "batch_size": logs.get("batch_size"),
                    "gns": logs.get("gns"),
                    "gns_calibrated": logs.get("gns_calibrated"),
                    "gns_calibration_ratio": logs.get("gns_calibration_ratio"),
                    "gns_norm_group": logs.get("gns/type/norm"),  # all-layer runs with gns_groups=["type"]
                    "lr": self.trainer.optimizer.param_groups[0]["lr"] if self.trainer.optimizer else None,
                    "wall_s": time.perf_counter() - self.result["_start"],
                }
            )

        def on_train_begin(self, args, state, control, **kwargs):
            self.result["_start"] = time.perf_counter()
            self._evaluate(0, 0)

        def on_step_end(self, args, state, control, **kwargs):
            tokens = self.trainer.tokens_seen  # one host sync (batch control reads it anyway)
            if self.spec.record_steps:
                stats = self.trainer.last_step_statistics()
                self.result["steps"].append(
                    {
                        "tokens": tokens,
                        "batch_size": stats["batch_size"],
                        "example_sq_norm_sum": stats["example_sq_norm_sum"],
                        "batch_sq_norm": stats["batch_sq_norm"],
                    }
                )
            if self.spec.timing_from_step is not None and state.global_step == self.spec.timing_from_step:
                _synchronize()
                self.result["timing"] = {"start_step": state.global_step, "start": time.perf_counter()}
            late = time.time() > self.spec.deadline
            if late:
                self.result["complete"] = False
                control.should_training_stop = True
            crossed = False
            while self.next_point < len(self.points) and tokens >= self.points[self.next_point]:
                self.next_point += 1
                crossed = True
            if crossed or late or control.should_training_stop:
                if not self.result["evals"] or self.result["evals"][-1]["step"] != state.global_step:
                    self._evaluate(state.global_step, tokens)

        def on_train_end(self, args, state, control, **kwargs):
            timing = self.result.get("timing")
            if timing is not None:
                _synchronize()
                timing["seconds"] = time.perf_counter() - timing["start"]
                timing["steps"] = state.global_step - timing["start_step"]

    return Recorder


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_one(spec: RunSpec) -> dict:
    """Train one run; returns (and writes to `spec.out_dir/result.json`) its record."""
    from _python_corpus import TokenBlocks
    from transformers import default_data_collator

    from hf_gns.trainer import GNSTrainer

    torch.backends.cuda.matmul.allow_tf32 = True
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    meta = json.loads(Path(spec.data_dir, "meta.json").read_text())
    block = SHAPES[spec.shape][3]
    train_ids = np.load(Path(spec.data_dir, "train.npy"), mmap_mode="r")
    eval_ids = np.load(Path(spec.data_dir, "eval.npy"))
    eval_rows = torch.from_numpy(eval_ids[: spec.eval_blocks * block].astype(np.int64)).view(-1, block)
    dataset = TokenBlocks(train_ids, block)
    if len(dataset) * block < spec.max_tokens:
        raise ValueError(
            f"{spec.name}: {len(dataset) * block:,} training tokens < budget {spec.max_tokens:,}"
        )
    model = build_model(spec.shape, meta["vocab_size"], spec.seed)
    result = {"spec": asdict(spec), "evals": [], "steps": [], "complete": True}
    trainer = GNSTrainer(
        model=model, args=training_arguments(spec), train_dataset=dataset, data_collator=default_data_collator
    )
    trainer.add_callback(_recorder_class()(trainer, spec, eval_rows, result))
    start = time.perf_counter()
    trainer.train()
    controller = trainer.batch_size_controller
    result.update(
        wall_s=time.perf_counter() - start,
        optimizer_steps=trainer.state.global_step,
        tokens=trainer.tokens_seen,
        n_parameters=sum(p.numel() for p in model.parameters()),
        batch_changes=[[c.step, c.tokens_seen, c.new_batch_size] for c in controller.changes],
        final_gns=trainer.gns_logs(),
    )
    result.pop("_start", None)
    Path(spec.out_dir, "result.json").write_text(json.dumps(result))
    return result


def launch(specs: list[RunSpec], jobs: int, grace_s: float = 60.0) -> list[dict]:
    """Run `specs`: in this process one by one (`jobs=0`), or at most `jobs` processes at a time.

    Returns the results in the order of `specs`. A process still running `grace_s` after its
    spec's deadline is killed and reported as failed.
    """
    if jobs == 0:
        return [train_one(spec) for spec in specs]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # many processes on one host: no thread oversubscription
    # smallest batches first: they take the most steps, so the slowest runs start first
    pending, running, results = sorted(specs, key=lambda spec: spec.batch_size), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
            spec_path = Path(spec.out_dir, "spec.json")
            spec_path.write_text(json.dumps(asdict(spec)))
            log = open(Path(spec.out_dir, "log.txt"), "w")
            command = [sys.executable, str(Path(__file__).resolve()), str(spec_path)]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((spec, process, log))
        time.sleep(0.5)
        for entry in list(running):
            spec, process, log = entry
            overdue = time.time() > spec.deadline + grace_s
            if process.poll() is None and not overdue:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
            running.remove(entry)
            path = Path(spec.out_dir, "result.json")
            if process.returncode == 0 and path.is_file():
                results[spec.name] = json.loads(path.read_text())
            else:
                tail = Path(spec.out_dir, "log.txt").read_text()[-2000:]
                results[spec.name] = {"spec": asdict(spec), "failed": True, "log_tail": tail, "evals": []}
    return [results[spec.name] for spec in specs]


if __name__ == "__main__":
    train_one(RunSpec(**json.loads(Path(sys.argv[1]).read_text())))
