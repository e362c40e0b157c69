"""Does mixed precision change the measured GNS? GNSTrainer and the plain HF Trainer, fp32 / bf16 / fp16.

A tiny GPT-2 (2 layers, d = 64) trains for a few hundred steps on synthetic tokens (Zipf unigrams
with a learnable bigram rule) under each precision, twice: under `hf_gns.GNSTrainer` (which logs
the GNS) and under the plain `transformers.Trainer` with the same seed (losses only). The table
shows, per logging step, the loss of both trainers and the GNS per precision, so one can tell a
GNS difference caused by hf_gns (GNSTrainer's loss departs from the plain Trainer's, or the GNS
departs while the losses agree) from a real difference in training (both trainers' losses move
together).

    python benchmarks/mixed_precision_gns.py                                 # GPU: fp32, bf16, fp16
    python benchmarks/mixed_precision_gns.py --learning_rate 3e-3 --steps 400
    python benchmarks/mixed_precision_gns.py --precisions fp32 --cpu         # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_gns import GNSTrainer, GNSTrainingArguments

VOCAB, SEQ, EXAMPLES = 512, 64, 4096


def synthetic_tokens(seed: int = 0) -> torch.Tensor:
    """(EXAMPLES, SEQ) token ids: Zipf unigrams, half of them replaced by a function of the previous token."""
    generator = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float32)
    tokens = torch.multinomial(zipf, EXAMPLES * SEQ, replacement=True, generator=generator)
    tokens = tokens.view(EXAMPLES, SEQ)
    follows_rule = torch.rand(EXAMPLES, SEQ, generator=generator) < 0.5
    return torch.where(follows_rule, (tokens.roll(1, dims=1) * 7 + 3) % VOCAB, tokens)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=SEQ, vocab_size=VOCAB))
    model.loss_type = "ForCausalLM"  # a config-built GPT-2 has none; HF would count T labels, not T - 1
    return model


def run(trainer_class, arguments_class, precision: str, options: argparse.Namespace, dataset) -> list[dict]:
    with tempfile.TemporaryDirectory() as output_dir:
        args = arguments_class(
            output_dir,
            per_device_train_batch_size=options.batch_size,
            max_steps=options.steps,
            learning_rate=options.learning_rate,
            logging_steps=options.logging_steps,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=options.cpu,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        )
        trainer = trainer_class(model=tiny_gpt2(), args=args, train_dataset=dataset)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32 and bf16 only)")
    options = parser.parse_args()
    if not options.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU: pass --cpu for a smoke run")
    precisions = [p.strip() for p in options.precisions.split(",") if p.strip()]
    unknown = set(precisions) - {"fp32", "bf16", "fp16"}
    if unknown:
        parser.error(f"unknown precision(s) {sorted(unknown)}: choose from fp32, bf16, fp16")

    dataset = TokenRows(synthetic_tokens())
    rows = {}
    for precision in precisions:
        measured = run(GNSTrainer, GNSTrainingArguments, precision, options, dataset)
        plain = run(Trainer, TrainingArguments, precision, options, dataset)
        rows[precision] = list(zip(measured, plain))

    device = "CPU" if options.cpu else torch.cuda.get_device_name()
    print(f"\ntiny GPT-2, batch {options.batch_size} x {SEQ} tokens, lr {options.learning_rate}, on {device}")
    columns = (f"  {p + ' loss (GNSTrainer / plain)':>30}  {p + ' gns':>9}" for p in precisions)
    header = f"{'step':>6}" + "".join(columns)
    print(header)
    for index in range(len(rows[precisions[0]])):
        line = f"{rows[precisions[0]][index][0]['step']:>6}"
        for precision in precisions:
            measured, plain = rows[precision][index]
            losses = f"{measured['loss']:.4f} / {plain['loss']:.4f}"
            line += f"  {losses:>30}  {measured['gns']:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
