"""Two-process GNSTrainer runs, DeepSpeed ZeRO (stage in argv) or DDP, recording per-step statistics.

Run by `tests/test_trainer_deepspeed.py`: `DS_ACCELERATOR=cpu python -m torch.distributed.run
--nproc_per_node 2 tests/deepspeed_two_processes.py STAGE OUT.json`
(STAGE 0: DDP on gloo, with ACCELERATE_USE_CPU=1); on GPUs, one process per GPU (1 or more).
Every case trains a frozen tiny GPT-2 (learning rate 0, so that both engines see the same
model at every step) on the same data in the same order, and records the global statistics of
each optimizer step (`GNSTrainer.last_step_statistics`) and the logged GNS. The test compares
DeepSpeed's records with DDP's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from deepspeed_cpu import cpu_deepspeed_state, zero_config
from gns_fixtures import FixedTokens, InOrderGNSTrainer, leave_after_checks, make_args, tiny_gpt2

import hf_gns

STEPS = 4
CASES = {
    "accumulation": dict(gradient_accumulation_steps=2),
    "calibration": dict(gradient_accumulation_steps=2, gns_calibrate_every=2),
    "all_layers": dict(gradient_accumulation_steps=1, gns_track="all"),
    "batch_control": dict(
        gradient_accumulation_steps=1, batch_size_policy="linear", batch_size_start=4, batch_size_end=16,
        max_tokens=12 * 40, max_steps=-1, gns_calibrate_every=0,
    ),
}  # fmt: skip


class RecordingTrainer(InOrderGNSTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_statistics: list[dict] = []

    def _read_gns_statistics(self, model):
        pending = self._gns_pending
        super()._read_gns_statistics(model)
        if pending:
            self.step_statistics.append(self.last_step_statistics())


def run_case(stage: int, name: str, output_dir: str) -> dict:
    overrides = dict(
        per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1, max_grad_norm=1.0, gns_ema_decay=0.99
    )
    overrides.update(CASES[name])
    overrides["use_cpu"] = not torch.cuda.is_available()
    if stage:
        overrides.update(use_cpu=False, deepspeed=zero_config(stage))
    args = make_args(output_dir, **overrides)
    # ZeRO-3: one case patches a model built partitioned (zero.Init, as from_pretrained does under a
    # stage-3 config), so that patch() must gather the parameters it probes.
    partitioned = stage == 3 and name == "accumulation"
    model = partitioned_tiny_gpt2() if partitioned else tiny_gpt2()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=FixedTokens())
    world = int(os.environ["WORLD_SIZE"])
    assert dist.get_world_size() == world == args.world_size, "run under torch.distributed.run"
    assert trainer.is_deepspeed_enabled == bool(stage)
    trainer.train()
    if stage:
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
        assert trainer.model_wrapped.zero_optimization_stage() == stage
    saved = unpatched = None
    if stage == 3 and name == "accumulation":
        trainer.save_model(output_dir)  # gathered 16-bit weights (stage3_gather_16bit_weights_on_model_save)
        saved = saved_model_matches(output_dir) if dist.get_rank() == 0 else None  # rank 0 wrote its folder
        unpatched = unpatch_restores(trainer)
    logs = [entry for entry in trainer.state.log_history if "gns" in entry]
    keys = ("gns", "gns_sq_norm", "gns_trace_cov", "batch_size", "gns_calibrated", "gns_calibration_ratio")
    return {
        "statistics": trainer.step_statistics,
        "logs": [{k: entry[k] for k in keys if k in entry} for entry in logs],
        "calibration": trainer.gns_calibration.state_dict() if trainer.gns_calibration.enabled else None,
        "saved_model_matches": saved,
        "unpatch_restores": unpatched,
    }


def partitioned_tiny_gpt2():
    """`tiny_gpt2()` built under `deepspeed.zero.Init` (ZeRO-3 partitions), with the same values."""
    import deepspeed

    reference = tiny_gpt2().state_dict()
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 4}):
        model = type(tiny_gpt2())(tiny_gpt2().config)
    assert model.transformer.ln_f.weight.numel() == 0  # partitioned
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            model.load_state_dict(reference, strict=False)  # the tied lm_head is wte
    return model


def unpatch_restores(trainer) -> bool:
    """`hf_gns.unpatch` on the ZeRO-3 model: no instance forward left, and the engine's forward (which
    gathers the partitions) gives the logits of the patched model and of the plain tiny GPT-2."""
    engine, model = trainer.model_wrapped, trainer.model
    engine.eval()
    tokens = FixedTokens()[0]["input_ids"][None].to(trainer.args.device)
    with torch.no_grad():
        patched = engine(input_ids=tokens).logits
        restored = hf_gns.unpatch(model)
        plain = engine(input_ids=tokens).logits
        reference = tiny_gpt2().to(tokens.device).eval()(input_ids=tokens).logits
    no_trace = not any("forward" in module.__dict__ for module in model.modules())
    close = torch.allclose(plain, patched, atol=1e-5) and torch.allclose(plain, reference, atol=1e-5)
    return restored > 0 and no_trace and close


def saved_model_matches(output_dir: str) -> bool:
    """The saved weights are those of the unpatched model: its keys (the tied head saved once) and its
    initial values (learning rate 0). Read from the file: from_pretrained would build under zero.Init."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(output_dir, "model.safetensors"))
    reference = {k: v for k, v in tiny_gpt2().state_dict().items() if k != "lm_head.weight"}
    return saved.keys() == reference.keys() and all(torch.equal(saved[k], v) for k, v in reference.items())


def main():
    stage, out = int(sys.argv[1]), sys.argv[2]
    if stage and not torch.cuda.is_available():
        cpu_deepspeed_state()
    hf_gns.set_backend("torch")
    results = {}
    only = os.environ.get("HF_GNS_DEEPSPEED_CASES")  # debugging: a comma-separated subset
    for name in only.split(",") if only else CASES:
        with tempfile.TemporaryDirectory() as output_dir:
            results[name] = run_case(stage, name, output_dir)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, default=lambda t: t.tolist() if isinstance(t, torch.Tensor) else str(t))


if __name__ == "__main__":
    main()
    leave_after_checks()
