"""benchmarks/bench_trainer.py reporting: targets, ratios, the graph-break log filter (no training)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trainer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trainer", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_trainer"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _result(model, variant, tokens_per_s, peak):
    return {"model": model, "variant": variant, "title": model, "batch": 2, "seq": 8, "step_ms": 1.0,
            "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak, "wall_s": 1.0}  # fmt: skip


def test_ratios_use_the_baseline_of_the_same_kind_and_targets_pass_or_miss():
    bench = _bench()
    results = [
        _result("gpt2", "trainer", 100.0, 1000),
        _result("gpt2", "gns-norms", 101.0, 1010),
        _result("gpt2", "trainer-compile", 200.0, 1000),
        _result("gpt2", "gns-norms-compile", 150.0, 1100),
        _result("gpt2", "gns-all", 80.0, 1000),
        {
            "model": "gpt2",
            "variant": "gns-norms-liger",
            "skipped": "liger_kernel not importable",
            "wall_s": 1.0,
        },
    ]
    bench.add_ratios(results)
    assert results[1]["ratio"] == 1.01 and results[1]["baseline"] == "trainer"
    assert results[3]["ratio"] == 0.75 and results[3]["baseline"] == "trainer-compile"
    lines = "\n".join(bench.target_lines(results))
    assert "GNS norms eager vs Trainer >= 1.00x: 1.010x PASS" in lines
    assert "gns-norms peak memory <= trainer + 2%: +1.0% PASS" in lines
    assert "GNS norms compiled vs compiled Trainer >= 0.99x: 0.750x MISS" in lines
    assert "gns-norms-compile peak memory <= trainer-compile + 2%: +10.0% MISS" in lines
    assert "gns_track='all' eager vs Trainer >= 0.85x: 0.800x MISS" in lines
    assert "not measured (liger_kernel not importable)" in lines
    assert "gns-norms-liger" in bench.results_table(results)


def test_liger_norm_only_variant_is_compared_with_the_plain_trainer():
    bench = _bench()
    assert "trainer-liger-norm" in bench.VARIANTS and "trainer-liger-norm" not in bench.DEFAULT_VARIANTS
    assert bench.baseline_of("trainer-liger-norm") == "trainer"
    assert bench.baseline_of("gns-norms-liger") == "trainer-liger"


def test_free_norm_bound_makes_every_norm_the_identity_and_compares_with_the_plain_trainer():
    import torch
    from transformers import AutoModelForCausalLM

    bench = _bench()
    assert "trainer-free-norm" in bench.VARIANTS and "trainer-free-norm" not in bench.DEFAULT_VARIANTS
    assert bench.baseline_of("trainer-free-norm") == "trainer"
    for key in ("llama124", "gpt2"):  # tiny: 2 layers, two norms each, and the final norm
        config = bench.model_config(key, tiny=True)
        model = AutoModelForCausalLM.from_config(config)
        assert bench.make_norms_free(model) == 5
        x = torch.randn(2, 3, config.hidden_size)
        norm = next(m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm")))
        assert norm(x) is x


def test_ratios_from_several_runs_never_mix_runs():
    """`--from-json a.json,b.json`: a variant's ratio is to the baseline of its own run, even when
    another file holds the same model's baseline."""
    bench = _bench()
    first = [
        dict(r, run=0)
        for r in (
            _result("gpt2", "trainer-compile", 55.9, 1000),
            _result("gpt2", "gns-norms-compile", 56.4, 1000),
        )
    ]
    second = [
        dict(_result("gpt2", "trainer-compile", 53.2, 1000), run=1),
        dict(_result("gpt2", "gns-all-compile", 80.0, 1000), run=1),
    ]
    results = first + second
    bench.add_ratios(results)
    assert results[1]["ratio"] == results[1]["tokens_per_s"] / first[0]["tokens_per_s"]
    assert results[0]["ratio"] == 1.0 and results[2]["ratio"] == 1.0
    assert results[3]["ratio"] == results[3]["tokens_per_s"] / second[0]["tokens_per_s"]


def test_graph_break_records_caused_in_hf_gns_are_picked_out():
    bench = _bench()
    head = "V1202 05:43:45.311000 4202 torch/_dynamo/symbolic_convert.py:5127] [1/0] [__graph_breaks]"
    recompile = "V1201 23:40:01.000000 1 torch/_dynamo/g.py:2] [0/2] [__recompiles]"
    stderr = "\n".join(
        [
            # torch 2.11: every line prefixed; GNSTrainer's frames above a break inside the model
            f"{head} Graph break in user code at /site/transformers/masking_utils.py:120",
            f'{head}   File "/repo/hf_gns/trainer/measurement.py", line 372, in training_step',
            f'{head}   File "/site/transformers/masking_utils.py", line 120, in find_packed_sequence_indices',
            # a break whose innermost frame is ours (older format: only the first line prefixed)
            "V1201 23:40:00.000000 1 torch/_dynamo/a.py:1] [0/0] [__graph_breaks] Graph break",
            '  File "/site/transformers/models/gpt2/modeling_gpt2.py", line 40, in forward',
            '  File "/repo/hf_gns/patching/model_hook.py", line 40, in hook',
            "V1201 23:40:01.000000 1 torch/_dynamo/g.py:2] [0/1] [__recompiles] Recompiling function forward",
            "    triggered by the following guard failure(s): tensor 'x' size mismatch",
            f"{recompile} Recompiling function hook in",
            f"{recompile}     /repo/hf_gns/patching/model_hook.py:40",
            "I1201 23:40:02.000000 123 torch/_dynamo/other.py:3] unrelated hf_gns/ record",
            "some trainer output",
        ]
    )
    total, ours = bench.hf_gns_log_records(stderr)
    assert total == 4
    assert len(ours) == 2
    assert 'model_hook.py", line 40, in hook' in ours[0] and "Recompiling function hook" in ours[1]


def test_graph_break_check_keeps_the_compiled_variants_and_their_baseline():
    bench_trainer = _bench()
    args = bench_trainer.parse_args(
        ["--check-graph-breaks", "--variants", "trainer,gns-norms,trainer-compile,gns-norms-compile"]
    )
    assert args.variants == ["trainer-compile", "gns-norms-compile"]
    assert bench_trainer.parse_args(["--check-graph-breaks", "--variants", "trainer"]).variants == [
        "gns-norms-compile"
    ]


def test_compiled_norm_experiments_run_with_their_switch_against_the_compiled_trainer(monkeypatch, tmp_path):
    """`gns-norms-aten-compile` / `-hybrid-` / `-wide-` / `-both-compile`: opt-in variants whose process
    (only) gets the norm op's environment switch, compared with `trainer-compile`, reported as experiments."""
    bench = _bench()
    assert "gns-norms-aten-compile" not in bench.DEFAULT_VARIANTS
    variants = "trainer-compile,gns-norms-aten-compile,gns-norms-hybrid-compile,gns-norms-wide-compile"
    variants += ",gns-norms-both-compile,gns-norms-unfused-compile,gns-norms-residual-compile"
    variants += ",gns-norms-bwdsums-compile,gns-norms-fused-compile,gns-norms-fwdcasts-compile"
    args = bench.parse_args(["--variants", variants])
    switches = ("HF_GNS_COMPILED_TRITON", "HF_GNS_COMPILED_FORWARD", "HF_GNS_COMPILED_NARROW_CASTS")
    switches += ("HF_GNS_COMPILED_RESIDUAL_ADD", "HF_GNS_COMPILED_BACKWARD_SUMS")
    seen = {}

    def fake_run(command, env, **_):
        variant = command[command.index("--variant") + 1]
        seen[variant] = tuple(env.get(k) for k in switches)
        with open(command[command.index("--child-json") + 1], "w") as f:
            json.dump({"model": "gpt2", "variant": variant}, f)
        return bench.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    for switch in switches:
        monkeypatch.delenv(switch, raising=False)
    for variant in args.variants:
        bench.run_variant("gpt2", variant, args)
    assert seen == {
        "trainer-compile": (None, None, None, None, None),
        "gns-norms-aten-compile": ("0", None, None, None, None),
        "gns-norms-hybrid-compile": (None, "inductor", None, None, None),
        "gns-norms-wide-compile": (None, None, "0", "0", "0"),
        "gns-norms-both-compile": (None, None, "both", None, None),
        "gns-norms-fwdcasts-compile": (None, None, "forward", None, None),
        "gns-norms-unfused-compile": (None, None, "forward", "0", "0"),
        "gns-norms-residual-compile": (None, None, "forward", "1", "0"),
        "gns-norms-bwdsums-compile": (None, None, "forward", "0", "1"),
        "gns-norms-fused-compile": (None, None, "forward", "1", "1"),
    }
    results = [
        _result("llama124", "trainer-compile", 100.0, 1000),
        _result("llama124", "gns-norms-aten-compile", 99.5, 1000),
    ]
    bench.add_ratios(results)
    lines = "\n".join(bench.target_lines(results))
    assert "GNS norms compiled (aten experiment) vs compiled Trainer >= 0.99x: 0.995x PASS" in lines


def test_rounds_take_ratios_within_each_round_and_targets_on_their_median():
    """`--rounds 3`: each round's gns-norms is divided by that round's Trainer (never another
    round's), and the target line judges the median of the three ratios."""
    bench = _bench()
    results = []
    for round_index, (trainer, gns) in enumerate([(100.0, 110.0), (90.0, 99.9), (110.0, 118.8)]):
        results.append(dict(_result("llama124", "trainer", trainer, 1000), round=round_index))
        results.append(
            dict(_result("llama124", "gns-norms", gns, 1000 + 10 * round_index), round=round_index)
        )
    bench.add_ratios(results)
    assert [round(r["ratio"], 6) for r in results[1::2]] == [1.1, 1.11, 1.08]
    merged = {r["variant"]: r for r in bench.across_rounds(results)}
    assert merged["gns-norms"]["ratio"] == 1.1 and merged["gns-norms"]["round_ratios"] == [1.1, 1.11, 1.08]
    assert merged["gns-norms"]["memory_ratio"] == 1.02  # the worst round's peak memory
    assert merged["trainer"]["ratio"] == 1.0
    lines = "\n".join(bench.target_lines(list(merged.values())))
    assert "Llama-style 124M: GNS norms eager vs Trainer >= 1.12x: 1.100x MISS" in lines
    assert bench.across_rounds(results[:2]) == results[:2]  # one round: unchanged


def test_trace_needs_profile():
    import pytest

    with pytest.raises(SystemExit):
        _bench().parse_args(["--trace", "traces"])
    assert _bench().parse_args(["--trace", "traces", "--profile"]).trace == "traces"


def test_cpus_pin_every_variant_process_to_the_same_cores(monkeypatch):
    """`--cpus 0` reaches each child's command line; ranges parse as taskset's do; a malformed list
    or a CPU this process may not use is refused before anything runs."""
    import os

    import pytest

    bench = _bench()
    assert bench.parse_cpus("2-4,7") == {2, 3, 4, 7} and bench.parse_cpus("0") == {0}
    with pytest.raises(ValueError, match="ids and ranges"):
        bench.parse_cpus("two")
    for bad in ("x-3", "1,,2", "99999"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--cpus", bad])
    first = min(os.sched_getaffinity(0))
    args = bench.parse_args(["--cpus", str(first), "--models", "gpt2", "--variants", "trainer"])
    commands = []

    def fake_run(command, env, **_):
        commands.append(command)
        with open(command[command.index("--child-json") + 1], "w") as f:
            json.dump({"model": "gpt2", "variant": "trainer"}, f)
        return bench.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.run_variant("gpt2", "trainer", args)
    assert commands[0][commands[0].index("--cpus") + 1] == str(first)


def test_host_probe_times_a_fixed_host_workload():
    import torch

    probe = _bench().host_probe_us(torch.device("cpu"), repeats=3, calls=50)
    assert 0.1 < probe < 10_000  # µs for one allocation and one launch of a 64-element add


def test_thread_cpu_reads_names_with_parentheses_and_sums_other_threads_by_name():
    _bench()  # puts benchmarks/ on sys.path
    import _thread_cpu

    tick = _thread_cpu._TICK_MS
    line = "123 (pt (main) x) S " + " ".join(str(i) for i in range(4, 14)) + " 7 3 " + "0 " * 30
    assert _thread_cpu.parse_stat(line) == ("pt (main) x", 10 * tick)
    before = {1: ("python", 100.0), 2: ("pt_autograd_0", 50.0), 3: ("worker", 0.0)}
    after = {1: ("python", 300.0), 2: ("pt_autograd_0", 90.0), 3: ("worker", 20.0), 4: ("worker", 20.0)}
    summary = _thread_cpu.cpu_per_step(before, after, steps=10, main_tid=1)
    assert summary == {"main_ms": 20.0, "others_ms": {"pt_autograd_0": 4.0, "worker": 4.0}, "threads": 4}
    assert _thread_cpu.format_cpu(summary) == (
        "thread CPU ms/step: main 20.0; others pt_autograd_0 4.0, worker 4.0 (4 threads)"
    )


def test_thread_cpu_snapshot_lists_this_thread():
    _bench()
    import _thread_cpu

    snapshot = _thread_cpu.thread_cpu_ms()
    if snapshot:  # Linux
        assert _thread_cpu.main_thread_id() in snapshot
        assert all(ms >= 0 for _, ms in snapshot.values())


def test_fresh_compile_cache_gives_each_process_an_empty_inductor_cache_removed_after(monkeypatch):
    import os

    bench = _bench()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    dirs = []

    def fake_run(command, env, **_):
        cache = env.get("TORCHINDUCTOR_CACHE_DIR")
        dirs.append((cache, cache is not None and os.path.isdir(cache) and not os.listdir(cache)))
        with open(command[command.index("--child-json") + 1], "w") as f:
            json.dump({"model": "gpt2", "variant": "trainer-compile"}, f)
        return bench.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    for flags in (["--fresh-compile-cache"], ["--fresh-compile-cache"], []):
        args = bench.parse_args(flags + ["--variants", "trainer-compile"])
        bench.run_variant("gpt2", "trainer-compile", args)
    (first, first_empty), (second, second_empty), (third, _) = dirs
    assert first_empty and second_empty and first != second and third is None
    assert not os.path.exists(first) and not os.path.exists(second)
