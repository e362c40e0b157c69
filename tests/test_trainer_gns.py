"""GNSTrainer end to end on CPU: the logged GNS against a micro-batch oracle, logging, checkpoints, resume.

The oracle. With the learning rate at 0 the parameters never move, so every step samples a
batch from one fixed distribution: the N examples of the data set, drawn without
replacement (the Trainer's RandomSampler) in batches of B. Under that sampling the
per-step estimates are unbiased for the data set's own unbiased estimates, those of one
"batch" of all N examples:

    tr(Σ) = (s_N − |Ḡ|²) / (1 − 1/N),   |G|² = (N |Ḡ|² − s_N) / (N − 1),   s_N = mean_i |g_i|²

with g_i the gradient of example i's mean token loss, computed here one example at a time
with ordinary autograd (all sequences have the same length, so HF's token-normalized loss
makes B·c_i = g_i). The exact GNS of the data set is their ratio.
"""

import math
import os

import pytest
import torch
from gns_fixtures import N_EXAMPLES, SEQ, VOCAB, FixedTokens, make_args, tiny_gpt2
from transformers.utils import logging as hf_logging

import hf_gns
from hf_gns.trainer import STATE_FILE


@pytest.fixture(autouse=True)
def _torch_backend_and_quiet():
    hf_logging.set_verbosity_error()
    with hf_gns.use_backend("torch"):
        yield


def oracle_gns(model, dataset, names) -> float:
    """Exact GNS of the data set from per-example gradients of the parameters `names`."""
    params = dict(model.named_parameters())
    grads = []
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"][None]
        loss = model(input_ids=ids, labels=ids).loss  # example i's mean token loss
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in names])]))
    g = torch.stack(grads).double()  # (N, P)
    n = g.shape[0]
    mean_sq = g.square().sum(1).mean()
    full_sq = g.mean(0).square().sum()
    sq_norm = (n * full_sq - mean_sq) / (n - 1)
    trace_cov = (mean_sq - full_sq) / (1 - 1 / n)
    return (trace_cov / sq_norm).item()


def gns_logs(trainer):
    return [entry for entry in trainer.state.log_history if "gns" in entry]


def test_logged_gns_converges_to_the_exact_gns_of_the_data_set(tmp_path):
    dataset = FixedTokens()
    model = tiny_gpt2()
    trainer = hf_gns.GNSTrainer(model=model, args=make_args(tmp_path), train_dataset=dataset)
    tracked = list(hf_gns.per_example_sq_norms(model))
    assert all(".ln_" in n for n in tracked) and len(tracked) == 10  # 5 LayerNorms, weight and bias
    expected = oracle_gns(model, dataset, tracked)
    trainer.train()

    logs = gns_logs(trainer)
    last = logs[-1]
    assert last["step"] == 64 and last["gns_skipped_steps"] == 0
    print(f"logged GNS {last['gns']:.4f}, exact GNS of the data set {expected:.4f}")
    assert last["gns"] == pytest.approx(expected, rel=0.05), (last["gns"], expected)
    assert trainer.current_gns() == pytest.approx(last["gns"])
    assert last["gns/type/norm"] == pytest.approx(last["gns"])  # norms only: the same parameters
    assert last["gns"] == pytest.approx(last["gns_trace_cov"] / last["gns_sq_norm"])
    # batch accounting: B = 4 × 2 accumulated, no attention mask -> every position is a token
    assert last["batch_size"] == 8 and last["batch_tokens"] == 8 * SEQ
    assert last["gns_tokens"] == pytest.approx(last["gns"] * SEQ)
    assert last["tokens_seen"] == trainer.tokens_seen == 64 * 8 * SEQ
    assert [entry["tokens_seen"] for entry in logs] == [8 * k * 8 * SEQ for k in range(1, 9)]
    assert {
        "gns/layer/0",
        "gns/layer/1",
        "gns/module/transformer.ln_f",
        "gns/module/transformer.h.1.ln_2",
    } <= set(last)


def test_gns_is_read_before_clipping_without_clipping_too(tmp_path):
    """max_grad_norm = 0 takes the Trainer's other path (_get_grad_norm only): same statistics."""
    dataset = FixedTokens()
    runs = []
    for max_grad_norm in (1e-4, 0.0):
        trainer = hf_gns.GNSTrainer(
            model=tiny_gpt2(),
            args=make_args(tmp_path / str(max_grad_norm), max_grad_norm=max_grad_norm, max_steps=8),
            train_dataset=dataset,
        )
        trainer.train()
        runs.append(gns_logs(trainer)[-1])
    for key in ("gns", "gns_sq_norm", "gns_trace_cov"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-6)


class StepCounter:
    """A registered checkpoint state, as the batch-size controller registers its own."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_resume_continues_the_same_gns_trajectory(tmp_path):
    dataset = FixedTokens()
    args = dict(max_steps=12, logging_steps=1, save_strategy="steps", save_steps=6, gns_ema_decay=0.99)

    full = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path / "full", **args), train_dataset=dataset
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert os.path.isfile(checkpoint / STATE_FILE)

    counter = StepCounter()
    resumed = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path / "resumed", **args), train_dataset=dataset
    )
    resumed.register_checkpoint_state("counter", counter)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    state["counter"] = {"count": 6}  # what the registered object would have saved at step 6
    torch.save(state, checkpoint / STATE_FILE)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert counter.count == 6
    full_logs = {entry["step"]: entry for entry in gns_logs(full)}
    resumed_logs = [entry for entry in gns_logs(resumed) if entry["step"] > 6]  # 1-6 come from the checkpoint
    assert [entry["step"] for entry in resumed_logs] == list(range(7, 13))
    for entry in resumed_logs:
        reference = full_logs[entry["step"]]
        for key in ("gns", "gns_sq_norm", "gns_trace_cov", "gns/layer/0", "tokens_seen"):
            assert entry[key] == pytest.approx(reference[key], rel=1e-9, abs=0), (entry["step"], key)
    # without the restored state the trajectory would restart: step 7 would be a single step's estimate
    assert resumed.gns_estimator.steps == 12


def test_checkpoint_holds_estimator_counters_and_registered_states(tmp_path):
    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(),
        args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=FixedTokens(),
    )
    trainer.register_checkpoint_state("counter", StepCounter())
    with pytest.raises(ValueError, match="already registered"):
        trainer.register_checkpoint_state("counter", StepCounter())
    with pytest.raises(TypeError, match="state_dict"):
        trainer.register_checkpoint_state("bad", object())
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert set(state) == {"gns_estimator", "gns_counters", "counter"}
    assert int(state["gns_estimator"]["steps"]) == 2
    assert int(state["gns_counters"]["tokens_seen"]) == 2 * 8 * SEQ


def test_attention_mask_counts_tokens(tmp_path):
    class Padded(FixedTokens):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            mask = torch.ones(SEQ, dtype=torch.long)
            mask[SEQ - 1 - i % 4 :] = 0  # 1 to 4 padded positions
            return {**item, "attention_mask": mask}

    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path, max_steps=4, logging_steps=4), train_dataset=Padded()
    )
    trainer.train()
    expected = sum(SEQ - 1 - i % 4 for i in range(N_EXAMPLES))  # one epoch of 4 steps × 8 examples
    assert trainer.tokens_seen == expected
    assert gns_logs(trainer)[-1]["tokens_seen"] == expected


def test_plain_training_arguments_and_bad_options(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = hf_gns.GNSTrainer(model=tiny_gpt2(), args=args, train_dataset=FixedTokens())
    trainer.train()
    assert trainer.gns_estimator.ema_decay == 0.9999 and trainer.gns_estimator.steps == 2
    with pytest.raises(ValueError, match="gns_track"):
        make_args(tmp_path, gns_track="linear")
    with pytest.raises(ValueError, match="per example"):
        make_args(tmp_path, gns_ema_decay=1.0)
    with pytest.raises(ValueError, match="gns_groups"):
        make_args(tmp_path, gns_groups=["type", "heads"])
    assert make_args(tmp_path, gns_groups="type,layer").gns_groups == ["type", "layer"]


def test_non_finite_statistics_are_skipped(tmp_path, monkeypatch):
    """A step whose statistics overflow (as fp16 steps that GradScaler skips do) leaves the GNS as it was."""
    import hf_gns.trainer.measurement as trainer_module

    reads = []

    def overflowing(model, names):
        reads.append(1)
        sums = hf_gns.patching.example_sq_norm_sums(model, names)
        return sums * float("inf") if len(reads) == 2 else sums

    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path, max_steps=3, logging_steps=1), train_dataset=FixedTokens()
    )
    monkeypatch.setattr(trainer_module, "example_sq_norm_sums", overflowing)
    trainer.train()
    logs = gns_logs(trainer)
    assert [entry["gns_skipped_steps"] for entry in logs] == [0, 1, 1]
    assert (
        logs[1]["gns"] == logs[0]["gns"]
        and math.isfinite(logs[2]["gns"])
        and logs[2]["gns"] != logs[0]["gns"]
    )
    assert trainer.gns_estimator.steps == 2


def test_loss_scale_is_divided_out(tmp_path):
    """fp16's GradScaler (CPU has no fp16 Trainer path, so one is attached by hand): the gradients read
    before clipping carry the scale (grad_norm below is 1024× larger), the GNS statistics do not."""
    logs = []
    for scale in (None, 2.0**10):
        trainer = hf_gns.GNSTrainer(
            model=tiny_gpt2(), args=make_args(tmp_path / str(scale), max_steps=4, logging_steps=4),
            train_dataset=FixedTokens(),
        )  # fmt: skip
        if scale is not None:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.train()
        logs.append(gns_logs(trainer)[-1])
    assert logs[1]["grad_norm"] == pytest.approx(1024 * logs[0]["grad_norm"], rel=1e-5)
    for key in ("gns", "gns_sq_norm", "gns_trace_cov", "gns/layer/1"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key


def test_bf16_autocast_matches_fp32(tmp_path):
    logs = []
    for bf16 in (False, True):
        trainer = hf_gns.GNSTrainer(
            model=tiny_gpt2(), args=make_args(tmp_path / str(bf16), max_steps=8, logging_steps=8, bf16=bf16),
            train_dataset=FixedTokens(),
        )  # fmt: skip
        trainer.train()
        logs.append(gns_logs(trainer)[-1])
    assert logs[1]["gns"] == pytest.approx(logs[0]["gns"], rel=0.05)


@pytest.mark.parametrize("track", ["norms", "all"])
def test_one_step_statistics_equal_the_per_example_oracle(tmp_path, track):
    """The first optimizer step's Σ_i |c_i|² and |G_B|² per group, against one-example-at-a-time autograd."""
    from gns_fixtures import InOrderGNSTrainer

    dataset = FixedTokens()
    trainer = InOrderGNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path, max_steps=1, logging_steps=1, gns_track=track),
        train_dataset=dataset,
    )  # fmt: skip
    model = trainer.model
    tracked = list(hf_gns.per_example_sq_norms(model))
    if track == "all":
        assert any(".attn.c_attn." in n for n in tracked) and any(".mlp.c_fc." in n for n in tracked)
    else:
        assert all(".ln_" in n for n in tracked)
    params = dict(model.named_parameters())
    batch = 8  # 4 per micro-batch × 2 accumulated, read in order
    # c_i: example i's share of HF's token-normalized loss Σ token losses / num_items_in_batch
    rows = dataset.rows[:batch]
    num_items = trainer._get_num_items_in_batch([{"input_ids": rows, "labels": rows}], torch.device("cpu"))
    contributions = []
    for i in range(batch):
        ids = rows[i : i + 1]
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=num_items).loss
        grads = torch.autograd.grad(loss, [params[n] for n in tracked])
        contributions.append(dict(zip(tracked, grads)))
    # the oracle's backward passes were collected too: train() must forget them
    trainer.train()
    stats = trainer.last_step_statistics()
    assert stats["batch_size"] == batch
    groups = trainer._gns_group_names
    assert ("type/attention" in groups) == (track == "all")
    for group in groups:
        members = [
            n
            for n, col in zip(trainer._gns_tracked_names, trainer._gns_membership[groups.index(group)])
            if col
        ]
        example_sum = sum(c[n].double().square().sum() for c in contributions for n in members)
        batch_sq = sum(sum(c[n] for c in contributions).double().square().sum() for n in members)
        assert stats["example_sq_norm_sum"][group] == pytest.approx(example_sum.item(), rel=1e-4), group
        assert stats["batch_sq_norm"][group] == pytest.approx(batch_sq.item(), rel=1e-4), group


def test_a_compiled_model_whose_routed_experts_are_tracked_is_warned_about_once(tmp_path, caplog):
    """Routed experts break a compiled graph at every call (`compiled_breaks.py`): GNSTrainer names
    them once when it finds the model compiled; with gns_track="norms" nothing is said."""
    import logging

    import transformers

    def mixtral():
        config = transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=SEQ,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(config)

    for track in ("all", "norms"):
        trainer = hf_gns.GNSTrainer(
            model=mixtral(), args=make_args(tmp_path / track, gns_track=track), train_dataset=FixedTokens()
        )
        compiled = torch.compile(trainer.model)  # never run: only recognised as compiled
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_gns.trainer.measurement"):
            assert trainer._gns_is_compiled(compiled) and trainer._gns_is_compiled(compiled)
            assert not trainer._gns_is_compiled(trainer.model)  # eager: nothing to say
        warned = [r.getMessage() for r in caplog.records if "break the compiled graph" in r.getMessage()]
        if track == "all":
            assert len(warned) == 1, warned
            assert "2 patched MoE experts" in warned[0] and "(model.layers.0.mlp.experts, " in warned[0]
            assert "gns_track='norms' keeps the graph whole" in warned[0]
        else:
            assert warned == []
