"""Train a GPT-2 with its gradient noise scale tracked and its batch size controlled by it.

    make train                                              # CPU, offline, a few minutes
    python recipes/train_gpt2.py --help                     # every option
    python recipes/train_gpt2.py recipes/configs/tiny_cpu.yaml --max_steps 50   # file, then overrides
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_gpt2.py \
        --model_size cerebras-111m --train_files 'data/**/*.txt' --bf16 true

With no arguments it needs no network: the corpus is this interpreter's standard library,
the tokenizer a byte-level BPE trained on it in a second, the model a tiny GPT-2.

Reads top to bottom: config (dataclasses parsed by HfArgumentParser), data (documents
through `datasets`, tokenized, packed into fixed-length examples), model (a GPT-2 from a
size preset, or a checkpoint), trainer (GNSTrainer: patches the norm layers, estimates the
GNS from their per-example gradient norms, lets the controller set the batch size), train
(resumable), evaluate (perplexity through `evaluate`, from the metric shipped in
hf_gns/metrics), outputs (checkpoints, trainer_state.json, training_curves.csv, PNG plots).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    ProgressCallback,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging as transformers_logging

from hf_gns.data import (
    embedded_corpus_files,
    expand_text_files,
    load_text_files,
    load_tokenizer,
    pack_token_dataset,
    read_corpus,
    read_hub_dataset,
    tokenize_dataset,
    train_byte_level_tokenizer,
)
from hf_gns.logging_outputs import TokenProgressCallback, TrainingCurvesCallback, plot_training_curves
from hf_gns.metrics import load_perplexity_metric, perplexity_compute_metrics, sequence_nll
from hf_gns.trainer import GNSTrainer, GNSTrainingArguments
from hf_gns.trainer.arguments import check_examples_per_step
from hf_gns.trainer.batch_arguments import controller_from_arguments
from hf_gns.trainer.interrupt import SaveOnInterruptCallback
from hf_gns.trainer.resume import (
    RESTART_HINT,
    CheckpointStateError,
    RunArgumentsState,
    changed_arguments,
    derive_progress,
    missing_states,
    read_state_file,
)


class UsageError(ValueError):
    """A bad argument or unusable data: the message says what was wrong and what to do."""


class NothingToTrain(Exception):
    """The checkpoint to resume already reached its budget: said in one line, exit status 0."""


class Interrupted(Exception):
    """Ctrl-C stopped training after saving a checkpoint: said in one line, exit status 130."""


# ---------------------------------------------------------------------------------------
# Config

# GPT-2 shapes by name. `block_size` defaults to the preset's context length.
MODEL_PRESETS = {
    # Trains on a laptop CPU: ~0.1M parameters besides the embeddings.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64),
    # GPT-2 small (Radford et al. 2019): 124M parameters with the 50257-token GPT-2 vocabulary.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    # Cerebras-GPT 111M (Dey et al. 2023), the model of Gray et al. 2024's batch-size schedule
    # experiment: 10 layers, 12 heads, d = 768, FFN 4d, context 2048.
    "cerebras-111m": dict(n_layer=10, n_head=12, n_embd=768, n_positions=2048),
}


def arg(default, description: str, **kwargs):
    """A dataclass field with a `--help` line."""
    return field(default=default, metadata={"help": description, **kwargs})


@dataclass
class ModelArguments:
    model_size: Literal["tiny", "gpt2-124m", "cerebras-111m"] = arg(
        "tiny", f"A new GPT-2 of this shape: {', '.join(MODEL_PRESETS)}."
    )
    n_layer: int | None = arg(None, "Override the preset's number of transformer blocks.")
    n_head: int | None = arg(None, "Override the preset's attention heads.")
    n_embd: int | None = arg(None, "Override the preset's hidden size (a multiple of n_head).")
    model_name_or_path: str | None = arg(
        None, "Start from this checkpoint (local dir, or a hub id: network)."
    )
    tokenizer_name: str | None = arg(None, "Hub id or local dir. Default: the checkpoint's, or train a BPE.")
    vocab_size: int = arg(512, "Vocabulary of the locally trained byte-level BPE (>= 257).")

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        shape = self.gpt2_shape()
        if shape["n_embd"] % shape["n_head"]:
            raise UsageError(f"n_embd={shape['n_embd']} is not a multiple of n_head={shape['n_head']}")

    def gpt2_shape(self) -> dict[str, int]:
        if self.model_size not in MODEL_PRESETS:
            raise UsageError(f"--model_size {self.model_size!r} is not one of {', '.join(MODEL_PRESETS)}")
        shape = dict(MODEL_PRESETS[self.model_size])
        shape.update({k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd") if getattr(self, k)})
        return shape


@dataclass
class DataArguments:
    train_files: list[str] | None = arg(
        None, "Local text or JSON Lines files, globs ('data/**/*.txt') or directories. Default: the stdlib."
    )
    dataset_name: str | None = arg(None, "A `datasets` hub dataset (e.g. wikitext), streamed: needs network.")
    dataset_config_name: str | None = arg(None, "Its configuration, e.g. wikitext-103-raw-v1.")
    dataset_split: str = arg("train", "Split of --dataset_name to read.")
    text_column: str = arg("text", "Field holding the text (hub datasets, JSON files).")
    corpus_max_bytes: int = arg(2_000_000, "Read at most this many bytes of text (<= 0: all).")
    tokenizer_train_bytes: int = arg(1_000_000, "Train the byte-level BPE on the first this-many bytes.")
    block_size: int | None = arg(None, "Tokens per example. Default: the model's context length.")
    eval_fraction: float = arg(
        0.05, "Fraction of the packed examples held out for evaluation (the last ones)."
    )
    max_eval_samples: int = arg(256, "At most this many held-out examples.")
    preprocessing_num_workers: int | None = arg(None, "Processes for tokenizing with `datasets`.")

    def __post_init__(self):
        if self.train_files and self.dataset_name:
            raise UsageError("give --train_files or --dataset_name, not both")
        if not 0 < self.eval_fraction < 1:
            raise UsageError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(
                f"--block_size must be at least 2 (a token and its successor), got {self.block_size}"
            )


@dataclass
class RunArguments:
    overwrite_output_dir: bool = arg(
        False, "Start a new run in an --output_dir that holds another run's checkpoints (deletes them)."
    )
    resume_with_changed_arguments: bool = arg(
        False,
        "On resume, apply arguments that differ from the checkpoint's run (listed) instead of refusing.",
    )


# Recipe defaults for the training arguments; each can be overridden on the command line or in the file.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/train_gpt2",
    # Budget and batch: global tokens, and a global batch (examples) that follows the GNS.
    max_tokens=1_000_000,
    per_device_train_batch_size=4,  # the micro-batch; the controller accumulates micro-batches
    batch_size_policy="gns",  # target = gns_batch_multiplier x GNS, within [batch_size_min, batch_size_max]
    batch_size_max=256,
    lr_schedule="d2z",  # linear warmup, then linear decay to zero, in tokens
    lr_warmup_fraction=0.02,
    learning_rate=3e-3,
    gns_groups=["type", "layer"],  # per-module GNS too: add "module" (one key per norm layer)
    per_device_eval_batch_size=32,
    logging_steps=1,  # one CSV row per optimizer step
    eval_strategy="steps",
    eval_steps=100,
    save_strategy="steps",
    save_steps=200,
    save_total_limit=2,
    report_to="none",
    dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs a GPU (and warns without one)
    # Every GPT-2 parameter gets a gradient: no extra autograd traversal under DDP (and no warning).
    ddp_find_unused_parameters=False,
)
ARGUMENT_CLASSES = (ModelArguments, DataArguments, GNSTrainingArguments, RunArguments)
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def parse_arguments(argv: list[str] | None = None):
    """(model, data, training) arguments from the command line, optionally led by a YAML or JSON file.

    `train_gpt2.py config.yaml --max_steps 10`: the file's values replace the recipe's
    defaults and the flags after it replace the file's. Values in the file are typed as in
    YAML/JSON; strings are parsed like the command line's (so `learning_rate: 3e-4` works).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.set_defaults(**TRAINING_DEFAULTS)
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        parser.set_defaults(**_read_config_file(Path(argv.pop(0)), parser))
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except ValueError as error:  # unknown flags, and TrainingArguments' own checks (hf_gns's among them)
        raise UsageError(_flag_names(str(error))) from error
    except ImportError as error:  # TrainingArguments imports what --deepspeed needs
        if "deepspeed" in str(error).lower():
            raise UsageError(DEEPSPEED_MISSING) from error
        raise


def _read_config_file(path: Path, parser: HfArgumentParser) -> dict:
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            config = json.loads(text)
        else:
            import yaml  # a dependency of transformers

            config = yaml.safe_load(text)
    except Exception as error:
        raise UsageError(
            f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}"
        ) from error
    if not isinstance(config, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of argument names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        hints = [f"{key!r} (did you mean {', '.join(difflib.get_close_matches(key, known, n=2))}?)"
                 if difflib.get_close_matches(key, known) else repr(key) for key in unknown]  # fmt: skip
        raise UsageError(f"config file {str(path)!r}: unknown argument(s) {', '.join(hints)}")
    return config


# ---------------------------------------------------------------------------------------
# Checks: every argument, the launch, the output folder and the checkpoint are refused here,
# in one line, before any data work (which can take minutes).

DEEPSPEED_MISSING = (
    "--deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' (or use DDP/FSDP: recipes/accelerate/*.yaml)"
)
# Arguments that may differ on resume: where output goes and how often, not what is trained.
RESUME_FREE_ARGUMENTS = {"preprocessing_num_workers", "gns_restart_statistics"} | set(
    f.name for f in fields(RunArguments)
)
# TrainingArguments that shape the run; the batch-control and gns_* ones are compared too.
RESUME_COMPARED_TRAINING_ARGUMENTS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "seed", "data_seed", "per_device_train_batch_size", "fp16", "bf16", "max_steps", "num_train_epochs",
    "warmup_steps", "lr_scheduler_type", "optim",
)  # fmt: skip


# What a resume cannot change: restored from the checkpoint's model, tokenizer, optimizer.pt and
# scheduler.pt (whose base learning rates win over the flag), so "applying" them would be a lie.
FIXED_ON_RESUME = {
    "model_size", "n_layer", "n_head", "n_embd", "model_name_or_path", "tokenizer_name", "vocab_size",
    "tokenizer_train_bytes", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "optim",
}  # fmt: skip


def check_launch(training_args: GNSTrainingArguments) -> None:
    """Refuse several processes that did not form one data-parallel group (each would train alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # `accelerate launch` with a DeepSpeed config: without a GPU accelerate finds no device
            # backend and each process counts itself alone; a --ddp_backend given is used as is.
            raise UsageError(
                f"launched as {launched} DeepSpeed processes, but they formed no data-parallel "
                "group: without a GPU add --ddp_backend gloo"
            )
        raise UsageError(
            f"launched as {launched} processes, but they formed no data-parallel group (each would train "
            'alone and print the same lines); on CPU use `make train ACCELERATE_ARGS="--num_processes '
            f'{launched}"` or `ACCELERATE_USE_CPU=1 python3 -m torch.distributed.run --standalone '
            f"--nproc_per_node {launched} recipes/train_gpt2.py`"
        )


def check_training_arguments(training_args: GNSTrainingArguments):
    """One-line refusals of what would fail later or do nothing; returns the batch-size controller."""
    if training_args.per_device_train_batch_size < 1:
        raise UsageError(
            "--per_device_train_batch_size must be at least 1, got "
            f"{training_args.per_device_train_batch_size}"
        )
    if not training_args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be positive, got {training_args.learning_rate}")
    if training_args.fp16 and not torch.cuda.is_available():
        raise UsageError(
            "--fp16 needs a CUDA GPU: on a CPU it changes nothing (training stays fp32); drop the flag"
        )
    try:  # the controller's own checks: bounds that hold no realizable batch, a multiplier of 0, ...
        controller = controller_from_arguments(
            training_args, training_args.world_size, training_args.per_device_train_batch_size
        )
    except ValueError as error:
        raise UsageError(_flag_names(str(error))) from error
    # A GNS needs two examples per optimizer step (the variance of one is undefined): refused at
    # the start rather than a run whose GNS is never measured and whose batch never moves.
    # (GNSTrainingArguments refuses it when parsed; again here for arguments changed since.)
    try:
        check_examples_per_step(training_args)
    except ValueError as error:
        raise UsageError(_flag_names(str(error))) from error
    return controller


_LIBRARY_ARGUMENTS = (
    "batch_size_min", "batch_size_max", "batch_size_start", "min_batch_size", "max_batch_size",
    "per_device_train_batch_size", "gradient_accumulation_steps",
)  # fmt: skip


def _flag_names(message: str) -> str:
    """Library messages name arguments (`batch_size_max`); the command line has flags (`--batch_size_max`)."""
    for name in _LIBRARY_ARGUMENTS:
        flag = f"--{name.replace('min_batch_size', 'batch_size_min')}"
        message = re.sub(rf"(?<![-\w]){name}(?![\w])", flag, message)
    message = message.replace("granularity='example'", "--batch_size_granularity example")
    message = message.replace("multiplier must", "--gns_batch_multiplier must")
    return message.replace("--max_batch_size", "--batch_size_max").rstrip(".")


def hub_is_offline() -> bool:
    from huggingface_hub import constants

    from_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return bool(constants.HF_HUB_OFFLINE) or from_env


def check_pretrained(name: str, flag: str, load_locally) -> None:
    """Fail fast on a missing local directory or an unreachable hub, instead of minutes of retries.

    `load_locally(name)` tries the local files only (a directory, or the hub cache).
    """
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(f"{flag} {name!r}: no such directory")
    try:
        load_locally(name)
        return
    except (OSError, ValueError):
        if os.path.isdir(name):
            raise UsageError(
                f"{flag} {name!r}: not a model/tokenizer directory (save_pretrained output)"
            ) from None
    if hub_is_offline():
        raise UsageError(
            f"{flag} {name!r}: not a local directory nor in the hub cache, and HF_HUB_OFFLINE is set"
        )
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/{name}"
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError as error:
        raise UsageError(f"{flag} {name!r}: not found on {constants.ENDPOINT} (HTTP {error.code})") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UsageError(
            f"{flag} {name!r}: not a local directory and {constants.ENDPOINT} is unreachable ({reason}); "
            "give a local directory (save_pretrained output), or set up network access"
        ) from None


def model_context(model_args: ModelArguments) -> int:
    """The model's context length (positions), from the preset or the checkpoint's config."""
    if not model_args.model_name_or_path:
        return model_args.gpt2_shape()["n_positions"]
    name = model_args.model_name_or_path
    check_pretrained(
        name, "--model_name_or_path", lambda n: AutoConfig.from_pretrained(n, local_files_only=True)
    )
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model_name_or_path {name!r}: {str(error).splitlines()[0]}") from None
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(context) if context else 1024


def check_block_size(block_size: int, context: int, model_args: ModelArguments) -> None:
    if block_size > context:
        where = (
            "the checkpoint's" if model_args.model_name_or_path else f"--model_size {model_args.model_size}'s"
        )
        raise UsageError(
            f"--block_size {block_size} exceeds {where} context length {context}: give --block_size "
            f"{context} or less (or a larger --model_size)"
        )


def resolve_checkpoint(training_args: GNSTrainingArguments) -> str | None:
    resume_from = training_args.resume_from_checkpoint
    if resume_from in ("latest", "last", "true", "True"):
        where = training_args.output_dir
        resume_from = get_last_checkpoint(where) if os.path.isdir(where) else None
        if resume_from is None:
            raise UsageError(
                f"--resume_from_checkpoint latest: no checkpoint-* in {training_args.output_dir!r}"
            )
    elif resume_from is not None and not os.path.isdir(resume_from):
        raise UsageError(f"--resume_from_checkpoint {resume_from!r} is not a directory")
    return resume_from


def check_output_dir(training_args: GNSTrainingArguments, run_args: RunArguments) -> None:
    """A new run never writes into another run's checkpoints (whose rotation would delete them)."""
    out = training_args.output_dir
    old = sorted(Path(out).glob(f"{PREFIX_CHECKPOINT_DIR}-*")) if os.path.isdir(out) else []
    old = [path for path in old if path.is_dir()]
    if not old:
        return
    names = ", ".join(path.name for path in old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
    if not run_args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {out!r} holds another run's checkpoints ({names}): continue it with "
            "--resume_from_checkpoint latest, replace it with --overwrite_output_dir true (deletes them), "
            "or choose another --output_dir"
        )
    if training_args.process_index == 0:
        for path in old:
            shutil.rmtree(path)
        print(f"--overwrite_output_dir: deleted the previous run's {names} in {out}")


def recipe_arguments(model_args, data_args, training_args) -> dict:
    """The arguments that shape a run (compared on resume): model, data, batch control, GNS, optimizer."""
    arguments = {**asdict(model_args), **asdict(data_args)}
    for name in RESUME_COMPARED_TRAINING_ARGUMENTS:
        arguments[name] = getattr(training_args, name)
    for f in fields(training_args):
        if f.name.startswith(("gns_", "batch_size_", "lr_")) or f.name in (
            "max_tokens",
            "doubling_threshold",
        ):
            arguments[f.name] = getattr(training_args, f.name)
    return {name: value for name, value in arguments.items() if name not in RESUME_FREE_ARGUMENTS}


def check_checkpoint(checkpoint: str, arguments: dict, training_args, run_args: RunArguments) -> None:
    """Refuse a checkpoint that cannot continue this run: unreadable GNS state, changed flags, finished."""
    restart = bool(getattr(training_args, "gns_restart_statistics", False))
    required = ["gns_estimator", "gns_counters"] + (
        ["batch_control"] if training_args.batch_control_enabled else []
    )
    try:
        saved = read_state_file(checkpoint)
        lacking = missing_states(saved, required)
        if lacking:
            raise CheckpointStateError(f"{checkpoint}/hf_gns_state.pt has no state for {', '.join(lacking)}")
        tokens_seen = int(saved["gns_counters"]["tokens_seen"])
    except CheckpointStateError as error:
        if not restart:
            raise UsageError(f"{error}; {RESTART_HINT}") from None
        try:
            progress = derive_progress(checkpoint)
        except CheckpointStateError as derive_error:
            raise UsageError(f"{error}, and {derive_error}") from None
        if training_args.process_index == 0:
            print(
                f"{error}; --gns_restart_statistics: fresh GNS statistics, continuing from "
                f"{progress.summary()}"
            )
        saved, tokens_seen = {}, progress.tokens_seen

    if "recipe_arguments" in saved:
        changes = changed_arguments(saved["recipe_arguments"], arguments)
        fixed = [change for change in changes if change.split()[0][2:] in FIXED_ON_RESUME]
        if fixed:
            raise UsageError(
                f"{checkpoint} cannot continue with {'; '.join(fixed)}: the checkpoint's model, tokenizer, "
                "optimizer and LR scheduler state hold these; start a new run to change them"
            )
        if changes and not run_args.resume_with_changed_arguments:
            raise UsageError(
                f"{checkpoint} was trained with other arguments ({'; '.join(changes)}): resume with the same "
                "ones, or pass --resume_with_changed_arguments true to apply these from now on"
            )
        if changes and training_args.process_index == 0:
            print(f"--resume_with_changed_arguments: applying from now on: {'; '.join(changes)}")
    max_tokens = training_args.max_tokens
    if max_tokens is not None and tokens_seen >= max_tokens:
        raise NothingToTrain(
            f"{checkpoint} has finished: it trained {tokens_seen:,} tokens of --max_tokens {max_tokens:,}, "
            "nothing to resume (to train further: a larger --max_tokens and --resume_with_changed_arguments "
            "true)"
        )


# ---------------------------------------------------------------------------------------
# Data: documents -> tokenizer -> packed examples of block_size tokens


def load_documents(data_args: DataArguments):
    """A `datasets.Dataset` with one column, `text`: a hub dataset, local files, or the stdlib corpus."""
    from datasets import Dataset

    max_bytes = data_args.corpus_max_bytes if data_args.corpus_max_bytes > 0 else None
    try:
        if data_args.dataset_name:  # never on the default path: needs network
            texts = read_hub_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                split=data_args.dataset_split,
                text_column=data_args.text_column,
                max_bytes=max_bytes,
            )
            if not texts:
                raise ValueError(
                    f"dataset {data_args.dataset_name!r} has no non-empty {data_args.text_column!r}"
                )
            return Dataset.from_dict({"text": texts})
        if data_args.train_files:
            files = expand_text_files(data_args.train_files)
            return load_text_files(files, text_column=data_args.text_column, max_bytes=max_bytes)
        return Dataset.from_dict({"text": read_corpus(embedded_corpus_files(), max_bytes=max_bytes)})
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise UsageError(f"unusable data: {error}") from error


def named_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase | None:
    """The tokenizer that --tokenizer_name (or the checkpoint) names, loaded before any data work."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if not name:
        return None
    from transformers import AutoTokenizer

    check_pretrained(
        name, "--tokenizer_name", lambda n: AutoTokenizer.from_pretrained(n, local_files_only=True)
    )
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"--tokenizer_name {name!r}: {str(error).splitlines()[0]}") from None


def train_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, documents
) -> PreTrainedTokenizerBase:
    try:  # deterministic: every process trains the same one
        return train_byte_level_tokenizer(
            documents["text"], model_args.vocab_size, data_args.tokenizer_train_bytes
        )
    except ValueError as error:
        raise UsageError(f"--vocab_size: {error}") from error


def build_examples(documents, tokenizer, data_args: DataArguments, block_size: int):
    """Train and eval splits of packed examples (`input_ids`, `labels`: `(block_size,)` each)."""
    tokenized = tokenize_dataset(documents, tokenizer, num_proc=data_args.preprocessing_num_workers)
    try:
        examples = pack_token_dataset(tokenized, block_size)
    except ValueError as error:
        raise UsageError(f"unusable data: {error}") from error
    if len(examples) < 2:
        raise UsageError(
            f"the data packs into {len(examples)} example(s) of {block_size} tokens; training and evaluation "
            "need at least 2: give more text (--corpus_max_bytes, more files) or a smaller --block_size"
        )
    n_eval = min(data_args.max_eval_samples, max(1, int(len(examples) * data_args.eval_fraction)))
    return examples.train_test_split(test_size=n_eval, shuffle=False)  # held out: the last n_eval examples


# ---------------------------------------------------------------------------------------
# Model


def build_model(model_args: ModelArguments, tokenizer, block_size: int) -> torch.nn.Module:
    if model_args.model_name_or_path:  # its context was checked against block_size (check_block_size)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        shape = model_args.gpt2_shape()
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=shape.pop("n_positions"),
            **shape,  # n_layer, n_head, n_embd; the FFN is 4 · n_embd
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    if getattr(model, "loss_type", None) is None:
        # transformers 5 infers the loss from the class name, and "GPT2LMHeadModel" names none; the
        # Trainer then counts T label tokens per row instead of the T - 1 a causal LM predicts, and
        # every loss it reports (train and eval) comes out (T - 1) / T too small.
        model.loss_type = "ForCausalLM"
    return model


def default_block_size(model_args: ModelArguments, context: int | None = None) -> int:
    """The model's context: the preset's, or the checkpoint's (`context`, from its config)."""
    if model_args.model_name_or_path:
        return min(context or 1024, 1024)
    return MODEL_PRESETS[model_args.model_size]["n_positions"]


# ---------------------------------------------------------------------------------------
# Console: a progress bar over the token budget (its postfix shows the GNS and the batch) and one
# training log in PRINT_EVERY; every log still reaches trainer_state.json and training_curves.csv.

PRINT_EVERY = 50


def quiet_library_output() -> None:
    """Ours to silence: transformers' "Writing model shards" bar at every checkpoint (warnings stay),
    and, where DeepSpeed is installed but there is no CUDA device, its "Setting accelerator to CPU. If
    you have GPU or other accelerator, we were unable to detect it." (accelerate imports DeepSpeed in
    every Trainer; `DS_ACCELERATOR=cpu` is what it detects anyway, said in advance)."""
    transformers_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args, run_args = parse_arguments(argv)
    quiet_library_output()
    # Checks first: everything refusable is refused before the data work (minutes on a large corpus).
    check_launch(training_args)
    controller = check_training_arguments(training_args)
    is_main = training_args.process_index == 0
    context = model_context(model_args)
    block_size = data_args.block_size or default_block_size(model_args, context)
    check_block_size(block_size, context, model_args)
    arguments = recipe_arguments(model_args, data_args, training_args)
    resume_from = resolve_checkpoint(training_args)
    if resume_from:
        check_checkpoint(resume_from, arguments, training_args, run_args)
    else:
        check_output_dir(training_args, run_args)
    if resume_from and (Path(resume_from) / "tokenizer.json").exists():
        tokenizer = load_tokenizer(resume_from)  # the run's own, whatever the flags say now
    else:
        tokenizer = named_tokenizer(model_args)  # None: trained on the documents below
    set_seed(training_args.seed)

    # Data: every process builds the same examples (deterministic); the main process first,
    # so `datasets`' caches of local files are written once.
    with training_args.main_process_first(desc="data"):
        documents = load_documents(data_args)
        if tokenizer is None:
            tokenizer = train_tokenizer(model_args, data_args, documents)
        splits = build_examples(documents, tokenizer, data_args, block_size)
    n_train = len(splits["train"])
    if is_main:
        budget = training_args.max_tokens
        epochs = f"; the budget is {budget / (n_train * block_size):.2f} epochs of it" if budget else ""
        print(
            f"data: {len(documents):,} documents, {sum(map(len, documents['text'])):,} characters -> "
            f"{n_train:,} train + {len(splits['test'])} eval examples of {block_size} tokens; "
            f"vocab {len(tokenizer)}{epochs}"
        )
        if controller.batch_size > n_train:
            print(
                f"warning: the global batch ({controller.batch_size} examples) is larger than the training "
                f"data ({n_train} examples): every optimizer step sees each example about "
                f"{controller.batch_size / n_train:.1f} times; give more data or a smaller batch"
            )

    model = build_model(model_args, tokenizer, block_size)
    if is_main:
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    curves = TrainingCurvesCallback(plot=False)  # plotted below, after the final evaluation
    interrupt = SaveOnInterruptCallback()
    trainer = GNSTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        processing_class=tokenizer,  # saved with every checkpoint
        data_collator=default_data_collator,  # fixed-length examples: stacking is all it takes
        compute_metrics=perplexity_compute_metrics(load_perplexity_metric()),
        preprocess_logits_for_metrics=sequence_nll,  # (B, T, V) logits -> (B, 2) [nll sum, tokens]
        callbacks=[curves, interrupt],
    )
    trainer.register_checkpoint_state("recipe_arguments", RunArgumentsState(arguments))  # compared on resume
    if not training_args.disable_tqdm:  # with it disabled, the Trainer prints every log (PrinterCallback)
        # Under batch control the step count depends on batches the GNS has yet to ask for: the
        # bar counts tokens against the fixed budget instead (steps when there is no token budget).
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokenProgressCallback(training_args.max_tokens, every=PRINT_EVERY))

    start = time.perf_counter()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    except CheckpointStateError as error:  # checked above; changed on disk since
        raise UsageError(str(error)) from None
    train_seconds = time.perf_counter() - start
    if interrupt.interrupted:
        step = trainer.state.global_step
        raise Interrupted(
            f"interrupted at step {step}: checkpoint saved in "
            f"{Path(training_args.output_dir) / f'{PREFIX_CHECKPOINT_DIR}-{step}'}; continue with "
            "--resume_from_checkpoint latest"
        )
    eval_metrics = trainer.evaluate()  # logged: eval_loss, eval_perplexity (a CSV row)
    trainer.save_model()  # model + tokenizer, plain transformers files
    trainer.save_state()  # trainer_state.json, every logged GNS value in log_history

    tokens_seen = trainer.tokens_seen  # global, cumulative (a resumed run counts from the start)
    gns = trainer.current_gns()  # examples; None before the first optimizer step
    # Throughput between logs, median: leaves out start-up, evaluation pauses and the resumed past.
    rates = sorted(row["tokens_per_second"] for row in curves.rows if "tokens_per_second" in row)
    tokens_per_second = rates[len(rates) // 2] if rates else math.nan
    plot_paths = plot_training_curves(curves.csv_path) if is_main else []
    if is_main:
        out = Path(training_args.output_dir)
        gns_text = "n/a" if gns is None else f"{gns:.1f} examples = {gns * block_size:,.0f} tokens"
        if gns is not None and getattr(trainer, "gns_calibration", None) is not None:
            if trainer.gns_calibration.enabled:  # current_gns() is what the batch follows: the calibrated one
                measured = trainer.gns_estimator.gns_tensor()[0].item()  # one sync
                gns_text += f" (calibrated to every layer; norm layers: {measured:.1f})"
        rate_text = "n/a" if math.isnan(tokens_per_second) else f"{tokens_per_second:,.0f} tokens/s"
        print(
            f"\ntrained {trainer.state.global_step} steps, {tokens_seen:,} tokens in {train_seconds:.1f} s; "
            f"throughput {rate_text} (median between logs); final GNS: {gns_text}; "
            f"eval loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f}\n"
            f"outputs in {out}/:\n"
            f"  model, tokenizer     {out}/ (config.json, model.safetensors, tokenizer.json)\n"
            f"  trainer log          {out}/trainer_state.json (log_history: every logged value)\n"
            f"  checkpoints          {out}/checkpoint-*/ (resume: --resume_from_checkpoint latest)\n"
            f"  per-step curves      {curves.csv_path}\n"
            f"  plots                {', '.join(map(str, plot_paths)) or '(none: see above)'}"
        )

    return {
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": eval_metrics["eval_perplexity"],
        "log_history": trainer.state.log_history,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_per_second,
        "train_seconds": train_seconds,
        "gns": gns,
        "csv_path": curves.csv_path,
        "plot_paths": plot_paths,
        "trainer": trainer,
    }


def run() -> int:
    """The command line: one line, not a traceback, for every way the run can stop early."""
    try:
        main()
    except UsageError as error:
        # one write of the whole line: the processes of a launch share stderr, and a line written in
        # two pieces (text, then newline) can get another process's output in between
        sys.stderr.write(f"train_gpt2.py: error: {error}\n")
        sys.stderr.flush()
        return 1
    except NothingToTrain as message:
        if int(os.environ.get("RANK", "0")) == 0:  # every process stops; one says why
            print(f"train_gpt2.py: {message}")
        return 0
    except Interrupted as message:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_gpt2.py: {message}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training, or a second Ctrl-C during it
        print("\ntrain_gpt2.py: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
