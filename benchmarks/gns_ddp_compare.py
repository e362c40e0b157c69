"""GNS from per-example norms vs. the classic DDP estimate, side by side in one DDP run.

    torchrun --nproc_per_node 2 benchmarks/gns_ddp_compare.py                        # GPUs, small GPT-2
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 benchmarks/gns_ddp_compare.py --preset tiny
    ... --learning_rate 0                 # frozen weights: both must converge to the same value

A GPT-2 trains under `GNSTrainer` (DDP) on the embedded standard-library corpus
(`hf_gns.data`: no network) with `gns_log_ddp_estimate=True`, so two estimates of the same
B_simple = tr(Σ)/|G|² of the norm layers are logged at every logging step:

- `gns`: per-example gradient norms (B_small = 1), every example of every process;
- `gns_ddp`: McCandlish et al. (2018, appendix A) with B_small = one process's batch (B/W)
  and B_big = the global batch B, from each process's local |g_r|² (a DDP comm hook) and
  the synchronized |G_B|².

Both are unbiased per step and averaged the same way (EMAs of the two components, per-example
decay); the classic one is much noisier (two batch sizes only a factor W apart), so compare
trends. Prints one row per logging step and a summary with the mean ratio gns_ddp / gns
over the second half of the run.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator, set_seed
from transformers.utils import logging as hf_logging

import hf_gns
from hf_gns.data import build_lm_dataset, embedded_corpus_files, read_corpus, train_byte_level_tokenizer

PRESETS = {
    # name: (n_layer, n_embd, n_head, block_size, vocab_size, corpus bytes)
    "tiny": (2, 64, 4, 64, 512, 1_000_000),
    "small": (6, 384, 6, 256, 8192, 12_000_000),
    "gpt2": (12, 768, 12, 512, 16384, 12_000_000),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--per_device_batch", type=int, default=16, help="examples per process and micro-batch"
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--logging_steps", type=int, default=20)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--gns_ema_decay", type=float, default=0.999, help="per example")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_data(preset: str):
    """Model config and packed dataset; every process builds the same ones (deterministic)."""
    n_layer, n_embd, n_head, block_size, vocab_size, corpus_bytes = PRESETS[preset]
    texts = read_corpus(embedded_corpus_files(), max_bytes=corpus_bytes)
    tokenizer = train_byte_level_tokenizer(texts, vocab_size=vocab_size)
    dataset = build_lm_dataset(texts, tokenizer, block_size)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=block_size, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return config, dataset


def main():
    args = parse_args()
    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = hf_gns.GNSTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.per_device_batch,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_steps=args.max_steps,
            logging_steps=args.logging_steps,
            learning_rate=args.learning_rate,
            warmup_steps=min(50, args.max_steps // 10),
            weight_decay=0.1,
            bf16=args.bf16,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=args.seed,
            gns_ema_decay=args.gns_ema_decay,
            gns_groups=[],
            gns_log_ddp_estimate=True,
            dataloader_drop_last=True,
        )
        world = training_args.world_size
        if world < 2:
            raise SystemExit(
                "run under torchrun --nproc_per_node 2 (or more): gns_ddp needs several processes"
            )
        config, dataset = build_data(args.preset)
        model = GPT2LMHeadModel(config)
        trainer = hf_gns.GNSTrainer(
            model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator
        )
        start = time.time()
        trainer.train()
        elapsed = time.time() - start
    if dist.get_rank() != 0:
        return
    logs = [entry for entry in trainer.state.log_history if "gns" in entry]
    batch = logs[-1]["batch_size"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{args.preset} GPT-2 ({n_params:.1f}M params), world size {world}, global batch {batch}")
    print(f"(B_small = {batch // world}), block {config.n_positions}, lr {args.learning_rate}")
    print(f"{args.max_steps} steps in {elapsed:.0f} s on {device}")
    header = ("step", "loss", "gns", "gns_ddp", "ratio", "gns_sq_norm", "gns_trace_cov")
    print("{:>6} {:>8} {:>10} {:>10} {:>7} {:>12} {:>14}".format(*header))
    for e in logs:
        ratio = e["gns_ddp"] / e["gns"] if e["gns"] else math.nan
        row = (e["step"], e["loss"], e["gns"], e["gns_ddp"], ratio, e["gns_sq_norm"], e["gns_trace_cov"])
        print("{:>6} {:>8.4f} {:>10.2f} {:>10.2f} {:>7.3f} {:>12.4e} {:>14.4e}".format(*row))
    second_half = [e["gns_ddp"] / e["gns"] for e in logs[len(logs) // 2 :] if e["gns"]]
    if second_half:
        mean = sum(second_half) / len(second_half)
        print(f"mean gns_ddp / gns over the second half: {mean:.3f} ({len(second_half)} logging steps)")
    print(f"tokens seen {trainer.tokens_seen}, skipped steps {logs[-1]['gns_skipped_steps']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
