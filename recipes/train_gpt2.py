"""Train a small GPT-2 with hf_gns patched in, logging the per-example gradient norms its norm layers yield.

    make train                                   # defaults: under a minute on 2 CPU cores, offline
    make train TRAIN_ARGS="--max_steps 1000"
    accelerate launch --num_processes 8 recipes/train_gpt2.py --per_device_train_batch_size 16 \
        --tokenizer_name gpt2 --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \
        --corpus_max_bytes 100000000 --n_layer 12 --n_embd 768 --n_head 12 --block_size 1024 \
        --max_steps 2000 --learning_rate 6e-4 --bf16

Defaults need no network: the corpus is this interpreter's standard library and the
tokenizer is a byte-level BPE trained on it in a second. `--text_files`, `--dataset_name`,
`--tokenizer_name` and `--model_name_or_path` switch to your own files, hub datasets,
tokenizers and checkpoints.

Reads top to bottom: config, data, model, `hf_gns.patch`, a callback that logs the
per-example statistics, train, perplexity, save, reload in plain transformers. This is
the first version of the recipe: it logs raw statistics; the GNS estimator and the
batch-size controller come later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_gns
from hf_gns.data import (
    build_lm_dataset,
    embedded_corpus_files,
    expand_text_files,
    load_tokenizer,
    read_corpus,
    read_hub_dataset,
    train_byte_level_tokenizer,
)

# ---------------------------------------------------------------------------------------
# Config


def arg(default, description: str):
    """A dataclass field with a `--help` line."""
    return field(default=default, metadata={"help": description})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = arg(None, "Start from this checkpoint (hub id or local dir).")
    tokenizer_name: str | None = arg(None, "Hub id or local dir. Default: the checkpoint's, or train one.")
    n_layer: int = arg(2, "New GPT-2: transformer blocks.")
    n_embd: int = arg(64, "New GPT-2: hidden size.")
    n_head: int = arg(4, "New GPT-2: attention heads.")
    vocab_size: int = arg(512, "Trained byte-level BPE: vocabulary size.")


@dataclass
class DataArguments:
    text_files: list[str] | None = arg(None, "Local text files or globs ('data/**/*.txt'). Default: stdlib.")
    dataset_name: str | None = arg(None, "A `datasets` dataset (e.g. wikitext), streamed; needs network.")
    dataset_config_name: str | None = arg(None, "e.g. wikitext-103-raw-v1")
    dataset_split: str = arg("train", "Split of --dataset_name to read.")
    text_column: str = arg("text", "Column of --dataset_name holding the text.")
    corpus_max_bytes: int = arg(2_000_000, "Read at most this many bytes of text (<= 0: all).")
    tokenizer_train_bytes: int = arg(1_000_000, "Train the byte-level BPE on the first this-many bytes.")
    block_size: int = arg(64, "Tokens per training example.")
    eval_fraction: float = arg(0.05, "Fraction of blocks held out for evaluation (the last ones).")
    max_eval_samples: int = arg(256, "At most this many held-out blocks.")


# Recipe defaults for `TrainingArguments`; any of them can be overridden on the command line.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/train_gpt2",
    max_steps=200,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=32,
    gradient_accumulation_steps=2,
    learning_rate=3e-3,
    warmup_steps=4,
    logging_steps=5,
    save_strategy="no",  # the model is saved once, at the end
    report_to="none",
    dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs a GPU (and warns without one)
)


# ---------------------------------------------------------------------------------------
# Per-example gradient-norm statistics, logged next to the loss


class NormStatsCallback(TrainerCallback):
    """Reads the per-example squared norms once per optimizer step and logs their window means.

    Logged under `norm_stats/` for this process (no cross-process reduction):
    - `examples`: examples whose backward passes fed this step (B · accumulation steps);
    - `mean_sq_norm`: mean over those examples of Σ_params |c_b|², c_b being example b's
      contribution to the tracked norm parameters' `.grad` (so the Trainer's loss
      normalisation is inside; units are `hf_gns.per_example_sq_norms`'s);
    - `grad_sq_norm`: |Σ_b c_b|², the squared norm of the accumulated `.grad` of the same
      parameters (under DDP: averaged over processes).
    Turning these into a GNS estimate (B-scaling, DDP, loss scale) is the estimator's job.
    """

    def __init__(self, model: torch.nn.Module, tracked_parameters: list[str]):
        self.model = model
        named = dict(model.named_parameters())
        self.tracked = {name: named[name] for name in tracked_parameters}
        # Per optimizer step since the last log: (examples, mean_sq_norm, grad_sq_norm).
        self.window: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        hf_gns.zero_stats(self.model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Fires after every micro-batch's backward and AFTER gradient clipping: `.grad` is
        # clipped (max_grad_norm) while the per-example norms are not. The estimator issue
        # moves this read before clipping.
        per_param = hf_gns.per_example_sq_norms(self.model)  # {name: (N,)}, N = B · accumulation steps
        per_example = torch.stack(list(per_param.values())).sum(0)  # (P, N) -> (N,)
        grads = [self.tracked[name].grad for name in per_param if self.tracked[name].grad is not None]
        grad_sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()  # ()
        self.window.append((per_example.numel(), per_example.mean(), grad_sq))  # no sync: tensors stay put
        hf_gns.zero_stats(self.model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.window or logs is None or "loss" not in logs:  # training-step logs only
            return
        examples = sum(n for n, _, _ in self.window) / len(self.window)
        means = torch.stack([torch.stack([m, g]) for _, m, g in self.window]).mean(0)  # (steps, 2) -> (2,)
        mean_sq_norm, grad_sq_norm = means.tolist()  # host-device sync, once per log
        stats = {
            "norm_stats/examples": examples,
            "norm_stats/mean_sq_norm": mean_sq_norm,
            "norm_stats/grad_sq_norm": grad_sq_norm,
        }
        logs.update(stats)  # printed by the progress callback, which runs after this one
        # Trainer.log stored a copy of `logs` in the history before calling on_log.
        state.log_history[-1].update(stats)
        self.window.clear()


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    is_main = training_args.process_index == 0
    set_seed(training_args.seed)

    # Data: every process builds the same dataset (deterministic, in memory, seconds).
    if data_args.dataset_name:
        texts = read_hub_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            split=data_args.dataset_split,
            text_column=data_args.text_column,
            max_bytes=data_args.corpus_max_bytes,
        )
    else:
        files = expand_text_files(data_args.text_files) if data_args.text_files else embedded_corpus_files()
        texts = read_corpus(files, max_bytes=data_args.corpus_max_bytes)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_name:
        tokenizer = load_tokenizer(tokenizer_name)
    else:
        tokenizer = train_byte_level_tokenizer(texts, model_args.vocab_size, data_args.tokenizer_train_bytes)
    blocks = build_lm_dataset(texts, tokenizer, data_args.block_size)  # rows: input_ids, labels (T,)
    n_eval = min(data_args.max_eval_samples, max(1, int(len(blocks) * data_args.eval_fraction)))
    split = blocks.train_test_split(test_size=n_eval, shuffle=False)  # held out: the last n_eval blocks
    if is_main:
        print(
            f"corpus: {len(texts)} texts, {sum(map(len, texts)):,} characters -> {len(blocks):,} blocks "
            f"of {data_args.block_size} tokens ({len(split['train']):,} train, {n_eval} eval); "
            f"vocab {len(tokenizer)}"
        )

    # Model: a new GPT-2 from a config, or a checkpoint.
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=data_args.block_size,
            n_embd=model_args.n_embd,
            n_layer=model_args.n_layer,
            n_head=model_args.n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)

    # hf_gns: every LayerNorm now runs the fused op that also yields per-example |dγ_b|², |dβ_b|².
    report = hf_gns.patch(model)
    if not report.tracked_parameters:
        raise RuntimeError(f"hf_gns tracks no norm parameter of this model, nothing to log:\n{report}")
    if is_main:
        print(report)
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        data_collator=default_data_collator,  # fixed-length blocks: stacking is all it takes
        callbacks=[NormStatsCallback(model, report.tracked_parameters)],
    )
    train_result = trainer.train()

    eval_metrics = trainer.evaluate()
    perplexity = math.exp(eval_metrics["eval_loss"])
    eval_metrics["perplexity"] = perplexity
    trainer.log_metrics("eval", eval_metrics)

    trainer.save_model()  # patched norms keep their parameters and state_dict keys
    trainer.save_state()  # trainer_state.json, with the norm_stats/ log entries

    # The saved model is plain transformers: it reloads and gives the same logits unpatched.
    max_logit_diff = None
    if trainer.is_world_process_zero():
        reloaded = AutoModelForCausalLM.from_pretrained(training_args.output_dir).to(model.device).eval()
        input_ids = torch.tensor(split["test"][:4]["input_ids"], device=model.device)  # (4, T)
        model.eval()
        with torch.no_grad():
            diff = model(input_ids=input_ids).logits - reloaded(input_ids=input_ids).logits  # (4, T, V)
        max_logit_diff = diff.abs().max().item()  # host-device sync
        print(f"reloaded {training_args.output_dir} unpatched: max |Δlogits| = {max_logit_diff:.2e}")
        if not max_logit_diff < 1e-3:
            raise RuntimeError(f"the saved model's logits differ from the trained one's by {max_logit_diff}")
        print(f"eval perplexity: {perplexity:.2f}")

    return {
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": perplexity,
        "log_history": trainer.state.log_history,
        "max_logit_diff": max_logit_diff,
    }


if __name__ == "__main__":
    main()
