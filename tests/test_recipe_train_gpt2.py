"""recipes/train_gpt2.py: tiny in-process runs (outputs, config files, local data, resume), error messages."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the recipe needs the datasets package")
pytest.importorskip("evaluate", reason="the recipe's perplexity goes through evaluate")
import torch
from transformers import AutoModelForCausalLM

from hf_gns.data import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_gpt2.py"
# A run of seconds: 100 kB of the stdlib corpus, a 300-token BPE, 32-token examples.
TINY = [
    "--corpus_max_bytes", "100000",
    "--tokenizer_train_bytes", "100000",
    "--vocab_size", "300",
    "--block_size", "32",
    "--per_device_train_batch_size", "4",
    "--batch_size_policy", "constant",  # 4 examples = 128 tokens a step
    "--max_eval_samples", "16",
    "--disable_tqdm", "true",
]  # fmt: skip


def _load_recipe():
    spec = importlib.util.spec_from_file_location("train_gpt2", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the recipe's string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_curves_plots_checkpoints_and_a_plain_model(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_tokens", "512", "--eval_steps", "2", "--save_steps", "2"]
    result = recipe.main(argv + TINY)

    rows = _csv_rows(out / "training_curves.csv")
    train_rows = [row for row in rows if row["loss"]]
    assert [int(row["step"]) for row in train_rows] == [1, 2, 3, 4]  # logging_steps=1: one row a step
    for row in train_rows:
        assert math.isfinite(float(row["loss"]))
        assert float(row["gns"]) > 0 and float(row["gns_tokens"]) == pytest.approx(32 * float(row["gns"]))
        assert int(row["batch_size"]) == 4 and int(row["batch_tokens"]) == 4 * 32
    assert [int(row["tokens_seen"]) for row in train_rows] == [128, 256, 384, 512]
    eval_rows = [row for row in rows if row["eval_loss"]]
    assert len(eval_rows) == 3  # steps 2 and 4, and the final evaluation
    # the packaged metric's perplexity is the exp of the Trainer's eval loss (loss_type set: T - 1 targets)
    for row in eval_rows:
        assert float(row["eval_perplexity"]) == pytest.approx(math.exp(float(row["eval_loss"])), rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-4)

    assert result["plot_paths"] == [out / "gns_batch_size.png", out / "loss.png"]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in result["plot_paths"])
    assert (out / "checkpoint-2" / "hf_gns_state.pt").exists() and (out / "checkpoint-4").is_dir()
    assert result["tokens_seen"] == 512 and result["gns"] == pytest.approx(float(train_rows[-1]["gns"]))

    printed = capsys.readouterr().out
    assert str(out / "training_curves.csv") in printed and "tokens/s" in printed and "final GNS" in printed

    # what was saved is plain transformers: no trace of the patch, the tokenizer alongside
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("_hf_gns" in name for module in reloaded.modules() for name in vars(module))
    input_ids = torch.tensor([load_tokenizer(out)("def main():\n    pass\n")["input_ids"]])  # (1, T)
    assert torch.isfinite(reloaded(input_ids=input_ids).logits).all()


def test_the_batch_size_follows_the_gns_within_the_token_budget(recipe, tmp_path):
    # A target of 1000 x GNS exceeds any bound: after the minimum interval the batch goes to its maximum.
    policy = ["--batch_size_policy", "gns", "--gns_batch_multiplier", "1000", "--batch_size_max", "8"]
    policy += ["--batch_size_min_interval_steps", "2", "--max_tokens", "1024"]
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--eval_strategy", "no", "--save_strategy", "no"]
    result = recipe.main(argv + TINY + policy)  # the later --batch_size_policy wins over TINY's
    rows = [row for row in _csv_rows(out / "training_curves.csv") if row["loss"]]
    batches = [int(row["batch_size"]) for row in rows]
    assert batches[0] == 4 and batches[-1] == 8 and batches == sorted(batches) and set(batches) == {4, 8}
    assert [int(row["batch_tokens"]) for row in rows] == [32 * b for b in batches]
    assert result["tokens_seen"] == 1024 == sum(32 * b for b in batches)  # the budget, exactly


def test_resume_continues_the_same_run(recipe, tmp_path, caplog):
    argv = ["--max_tokens", "512", "--save_steps", "2", "--eval_strategy", "no"] + TINY
    straight = recipe.main(["--output_dir", str(tmp_path / "straight")] + argv)

    # An interrupted run: only its checkpoint after step 2 exists.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", interrupted / "checkpoint-2")
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()  # so that caplog sees the Trainer's warnings
    try:
        with caplog.at_level("WARNING"):
            resumed = recipe.main(
                ["--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"] + argv
            )
    finally:
        transformers_logging.disable_propagation()
    # the tied lm_head.weight (saved once, as wte.weight) is not reported as a missing key
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]

    def train_logs(history):
        return [(e["step"], e["loss"], e["gns"], e["tokens_seen"]) for e in history if "loss" in e]

    assert [log[0] for log in train_logs(resumed["log_history"])] == [1, 2, 3, 4]
    for got, want in zip(train_logs(resumed["log_history"]), train_logs(straight["log_history"])):
        assert got[0] == want[0] and got[3] == want[3]
        assert got[1] == pytest.approx(want[1], rel=1e-5) and got[2] == pytest.approx(want[2], rel=1e-5)
    rows = _csv_rows(interrupted / "training_curves.csv")  # steps 1-2 come back from the checkpoint's history
    assert [int(row["step"]) for row in rows if row["loss"]] == [1, 2, 3, 4]


def test_yaml_and_json_config_files_with_command_line_overrides(recipe, tmp_path):
    config = {
        "model_size": "cerebras-111m",
        "train_files": ["data/*.txt", "more/"],
        "learning_rate": "3e-4",  # YAML 1.1 reads this as a string: parsed like the command line
        "bf16": False,
        "gns_groups": ["type"],
        "max_steps": 7,
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    for name in ("run.json", "run.yaml"):
        model_args, data_args, training_args, _ = recipe.parse_arguments(
            [str(tmp_path / name), "--max_steps", "9", "--output_dir", str(tmp_path / "out")]
        )
        assert model_args.gpt2_shape() == {"n_layer": 10, "n_head": 12, "n_embd": 768, "n_positions": 2048}
        assert data_args.train_files == ["data/*.txt", "more/"]
        assert training_args.learning_rate == 3e-4 and training_args.gns_groups == ["type"]
        assert training_args.max_steps == 9  # the flag after the file wins
        assert training_args.per_device_train_batch_size == 4  # the recipe's default, untouched
        assert training_args.max_tokens == 1_000_000 and training_args.batch_size_policy == "gns"
        assert recipe.default_block_size(model_args) == 2048

    (tmp_path / "typo.yaml").write_text("learning_rat: 1e-3\n")
    with pytest.raises(
        recipe.UsageError, match=r"unknown argument\(s\) 'learning_rat' \(did you mean learning_rate"
    ):
        recipe.parse_arguments([str(tmp_path / "typo.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(recipe.UsageError, match="must hold a mapping"):
        recipe.parse_arguments([str(tmp_path / "list.yaml")])
    with pytest.raises(recipe.UsageError, match="does not exist"):
        recipe.parse_arguments([str(tmp_path / "missing.yaml")])


def test_data_from_a_directory_of_text_and_json_files(recipe, tmp_path):
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    source = (Path(json.__file__).parent / "decoder.py").read_text()
    (data / "a.txt").write_text(source)
    (data / "nested" / "b.jsonl").write_text(
        "".join(json.dumps({"text": source[i : i + 2000]}) + "\n" for i in range(0, len(source), 2000))
    )
    (data / "ignored.bin").write_bytes(b"\x00\xff")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--train_files", str(data), "--max_tokens", "256"]
    argv += ["--eval_strategy", "no"]
    result = recipe.main(argv + TINY + ["--save_strategy", "no"])
    assert math.isfinite(result["train_loss"]) and result["tokens_seen"] == 2 * 4 * 32

    documents = recipe.load_documents(recipe.DataArguments(train_files=[str(data)]))
    assert documents["text"][0] == source  # the text file whole, then the JSON records
    assert "".join(documents["text"][1:]) == source


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_embd", "30", "--n_head", "4"], "n_embd=30 is not a multiple of n_head=4"),
        (["--eval_fraction", "1.5"], r"--eval_fraction must be in \(0, 1\)"),
        (["--train_files", "/nonexistent/*.txt"], "unusable data: no file matches '/nonexistent/"),
        (["--train_files", "x.txt", "--dataset_name", "wikitext"], "not both"),
        (["--block_size", "64", "--corpus_max_bytes", "100"], "fewer than block_size=64"),
        (["--vocab_size", "100"], "--vocab_size: vocab_size must be at least 257"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint-\\* in"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "is not a directory"),
        (["--no_such_flag", "3"], "no_such_flag"),
        (["--gns_track", "everything"], "gns_track must be one of"),
        (["--batch_size_policy", "sometimes"], "batch_size_policy must be one of"),
        (["--gradient_accumulation_steps", "2"], "keep --gradient_accumulation_steps=1 .*--batch_size_start"),
    ],
)
def test_bad_arguments_and_data_get_a_clear_message(recipe, tmp_path, argv, message):
    with pytest.raises(recipe.UsageError, match=message):
        recipe.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1"] + argv)


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [
        sys.executable,
        str(RECIPE),
        "--output_dir",
        str(tmp_path),
        "--train_files",
        str(tmp_path / "none"),
    ]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    assert "train_gpt2.py: error: unusable data: no file matches" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_bad_choice_is_refused_by_argparse(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_arguments(["--model_size", "huge"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_files_parse(recipe, path):
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false"]  # bf16 training needs a GPU
    model_args, data_args, training_args, _ = recipe.parse_arguments([str(path)] + cpu)
    assert training_args.max_tokens > 0 and training_args.batch_size_policy is not None
    assert model_args.gpt2_shape()["n_embd"] % model_args.gpt2_shape()["n_head"] == 0


def test_resume_without_gns_state_continues_tokens_data_and_lr_with_fresh_statistics(recipe, tmp_path):
    # Item 1: the checkpoint's hf_gns_state.pt is gone: refused without the flag (see also
    # tests/test_recipe_checks.py); with --gns_restart_statistics the data position, token count,
    # batch and LR continue exactly (trainer_state.json logs every step), only the GNS starts again.
    argv = ["--max_tokens", "512", "--save_steps", "2", "--eval_strategy", "no"] + TINY
    straight = recipe.main(["--output_dir", str(tmp_path / "straight")] + argv)
    restarted = tmp_path / "restarted"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", restarted / "checkpoint-2")
    (restarted / "checkpoint-2" / "hf_gns_state.pt").unlink()
    resume = ["--output_dir", str(restarted), "--resume_from_checkpoint", "latest"]
    with pytest.raises(recipe.UsageError, match="hf_gns_state.pt does not exist"):
        recipe.main(resume + argv)
    resumed = recipe.main(resume + ["--gns_restart_statistics", "true"] + argv)

    def train_logs(history):
        return {e["step"]: e for e in history if "loss" in e}

    got, want = train_logs(resumed["log_history"]), train_logs(straight["log_history"])
    assert sorted(got) == [1, 2, 3, 4] and resumed["tokens_seen"] == 512  # the budget is not restarted
    for step in (3, 4):
        assert got[step]["tokens_seen"] == want[step]["tokens_seen"] and got[step]["batch_size"] == 4
        assert got[step]["learning_rate"] == pytest.approx(want[step]["learning_rate"], rel=1e-6)
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)  # the same examples
    assert got[3]["gns"] != pytest.approx(want[3]["gns"], rel=1e-3)  # a fresh estimate


def test_a_batch_larger_than_the_data_warns(recipe, tmp_path, capsys):
    # Item 6: 4 train examples and a global batch of 16 used to run many epochs per step silently.
    argv = ["--output_dir", str(tmp_path / "run"), "--eval_strategy", "no", "--save_strategy", "no"]
    small = ["--corpus_max_bytes", "600", "--batch_size_start", "16", "--max_eval_samples", "1"]
    recipe.main(argv + TINY + small + ["--max_tokens", "512"])
    printed = capsys.readouterr().out
    assert "warning: the global batch (16 examples) is larger than the training data" in printed
    assert "epochs of it" in printed


def test_only_the_recipes_own_lines_precede_training(tmp_path):
    # Item 12: environment and launch noise before the progress bar. What remains is ours: the data
    # and model lines (and datasets' tokenization bar). DeepSpeed, where installed, used to add
    # "Setting accelerator to CPU ..." on every CPU run (accelerate imports it in every Trainer).
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("DS_ACCELERATOR", None)
    argv = [sys.executable, str(RECIPE), "--output_dir", str(tmp_path / "run"), "--max_tokens", "128"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1"] + TINY
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Setting accelerator" not in run.stdout + run.stderr
    before = (run.stdout.split("{'loss'")[0] + run.stderr.split("{'loss'")[0]).replace("\r", "\n")
    foreign = [
        line
        for line in before.splitlines()
        if line.strip() and not line.startswith(("Map", "data:", "model:"))
    ]
    assert not foreign, foreign


def test_ctrl_c_saves_a_checkpoint_at_the_next_step_and_exits_with_one_line(tmp_path):
    # Item 11: it used to print ~150 lines of tracebacks and save nothing.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    argv = [sys.executable, str(RECIPE), "--output_dir", str(out), "--max_tokens", "10000000"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1"] + TINY
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # --disable_tqdm: the Trainer prints every log
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Map")]
    assert len(lines) <= 4, stderr  # the two lines below, and at most a library warning or two
    assert any(line.startswith("interrupted: saving a checkpoint after this optimizer") for line in lines)
    assert lines[-1].startswith("train_gpt2.py: interrupted at step ")
    assert "--resume_from_checkpoint latest" in lines[-1]
    step = int(lines[-1].split("interrupted at step ")[1].split(":")[0])
    assert (out / f"checkpoint-{step}" / "hf_gns_state.pt").is_file()
    assert not (out / "model.safetensors").exists()  # stopped: no final evaluation or model
