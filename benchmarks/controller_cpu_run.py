"""A real CPU run of the GNS batch-size policy: the global batch follows the measured GNS.

    python benchmarks/controller_cpu_run.py                     # ~1.5M tokens; minutes on 2 idle CPU cores
    python benchmarks/controller_cpu_run.py --max_tokens 2000000 --gns_batch_multiplier 0.5

A tiny GPT-2 trains on the embedded standard-library corpus (`hf_gns.data`) with
`GNSTrainer`, batch_size_policy="gns": before each optimizer step the global batch becomes
multiplier × GNS (examples; the calibrated GNS, `gns_calibrated`, by default), rounded to a
multiple of the per-device micro-batch, within
[min, max], with hysteresis and a minimum interval. The budget is in tokens and the LR
decays linearly to zero over it (D2Z). Prints one row per logging step: step, tokens seen,
the GNS (examples, EMA over the norm layers' per-example gradients), the batch used by the
last step and the LR; then the batch changes the controller made.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator, set_seed

from hf_gns.data import build_lm_dataset, embedded_corpus_files, read_corpus, train_byte_level_tokenizer
from hf_gns.kernels.norm_op import get_backend
from hf_gns.trainer import GNSTrainer, GNSTrainingArguments


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max_tokens", type=int, default=1_500_000, help="budget, global tokens")
    parser.add_argument("--block_size", type=int, default=64, help="tokens per example")
    parser.add_argument("--micro_batch", type=int, default=8, help="per-device micro-batch (examples)")
    parser.add_argument("--batch_size_start", type=int, default=8)
    parser.add_argument("--batch_size_max", type=int, default=256)
    parser.add_argument("--gns_batch_multiplier", type=float, default=1.0)
    parser.add_argument("--gns_ema_decay", type=float, default=0.998, help="per example")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--corpus_max_bytes", type=int, default=3_000_000)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--output_dir", default="outputs/controller_cpu_run")
    return parser.parse_args()


def main() -> None:
    options = parse_args()
    set_seed(0)
    texts = read_corpus(embedded_corpus_files(), max_bytes=options.corpus_max_bytes)
    tokenizer = train_byte_level_tokenizer(texts[: len(texts) // 3], vocab_size=512)
    dataset = build_lm_dataset(texts, tokenizer, block_size=options.block_size)  # input_ids, labels: (T,)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=len(tokenizer),
        n_positions=options.block_size,
        bos_token_id=0,
    )
    config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    args = GNSTrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.micro_batch,
        learning_rate=options.learning_rate,
        weight_decay=0.0,
        max_tokens=options.max_tokens,
        batch_size_policy="gns",
        batch_size_start=options.batch_size_start,
        batch_size_min=options.micro_batch,
        batch_size_max=options.batch_size_max,
        gns_batch_multiplier=options.gns_batch_multiplier,
        batch_size_hysteresis=0.2,
        batch_size_min_interval_steps=20,
        lr_schedule="d2z",
        lr_warmup_fraction=0.02,
        gns_ema_decay=options.gns_ema_decay,
        gns_groups=[],
        logging_steps=options.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = GNSTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{len(dataset)} examples of {options.block_size} tokens, GPT-2 of {parameters} parameters, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, norm backend {get_backend()}"
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start

    # `gns`: the norm layers' GNS; `gns_calibrated`: scaled to every layer's by the calibration steps
    # (gns_calibrate_every, 10 by default under the gns policy): the value the controller acts on.
    print("\n| step | tokens seen | gns (examples) | gns_calibrated | batch (examples) | lr | loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for h in trainer.state.log_history:
        if "loss" in h:
            gns, calibrated = (f"{h[k]:.1f}" if k in h else "-" for k in ("gns", "gns_calibrated"))
            step, tokens, batch, lr, loss = (
                h[k] for k in ("step", "tokens_seen", "batch_size", "learning_rate", "loss")
            )
            print(f"| {step} | {tokens:,} | {gns} | {calibrated} | {batch} | {lr:.2e} | {loss:.3f} |")
    print("\nbatch changes (before step, tokens seen, GNS the controller read, old -> new):")
    for change in trainer.batch_size_controller.changes:
        gns = f"{change.gns:.1f}" if change.gns is not None else "-"
        print(
            f"  step {change.step + 1}: {change.tokens_seen:,} tokens, gns {gns}: "
            f"{change.old_batch_size} -> {change.new_batch_size}"
        )
    print(
        f"\n{trainer.state.global_step} steps, {trainer.tokens_seen:,} tokens "
        f"(budget {options.max_tokens:,}) in {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
