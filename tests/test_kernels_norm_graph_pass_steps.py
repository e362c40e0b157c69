"""Compiled training steps of tiny HF models with hf_gns's post-grad pass at its defaults against the
same steps without it, on CPU (`norm_graph_pass.py`).

The steps go through Inductor's own graph passes, the pass among them, and run their Triton launches
interpreted (`inductor_interpreted.py`); the GPU tests of `test_kernels_norm_graph_pass.py` run the
same comparison through Inductor's generated code. The pass computes the same fp32 operations in
the same order as the graph it rewrites, so under fp16 autocast (which the interpreter rounds as
torch does) loss, gradients and per-example norms must be equal to the bit, and it must rewrite
what it rewrites on the GPU: these counts are pinned per architecture. A kernel fed the wrong
tensor (the residual, a dy, the addend) fails here; the order of the fp32 adds mostly does not (fp32
sums of fp16 gradients of similar size are exact), which the graph tests check node by node.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torch._inductor.custom_graph_pass")

from ttir_cuda_target import run_without_interpreter  # noqa: E402

from hf_gns.kernels import norm_graph_pass  # noqa: E402

SWITCHES = ("HF_GNS_COMPILED_NARROW_CASTS", "HF_GNS_COMPILED_RESIDUAL_ADD", "HF_GNS_COMPILED_BACKWARD_SUMS")


def test_steps_run_outside_the_interpreter():
    """CI runs under TRITON_INTERPRET=1: these tests run in a process without it (see the helper)."""
    run_without_interpreter(__file__, passed=len(ARCHITECTURES) + (1 if ARCHITECTURES is IN_CI else 2))


def _step(arch, monkeypatch, pass_on, dropout=0.0):
    """Loss, gradients and per-example norms of one compiled fp16-autocast step, and what the pass
    rewrote in it."""
    import patching_tiny_models
    from inductor_interpreted import compile_interpreted
    from ttir_cuda_target import cuda_target_active

    import hf_gns
    from hf_gns.kernels.norm_op import use_backend

    for name in SWITCHES:
        if pass_on:
            monkeypatch.delenv(name, raising=False)  # the defaults
        else:
            monkeypatch.setenv(name, "0")
    monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass", None)
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's dropout masks
    config = patching_tiny_models.tiny_config(arch)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, dropout)
    torch.manual_seed(0)
    model = patching_tiny_models.transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager"
    ).train()
    hf_gns.patch(model)
    call, input_ids = compile_interpreted(model, monkeypatch), patching_tiny_models.tiny_batch()
    before = norm_graph_pass.REWRITTEN.copy()
    torch.manual_seed(1)
    with use_backend("triton"), cuda_target_active(), torch.autocast("cpu", torch.float16):
        loss = call(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return (loss.detach(), grads, hf_gns.per_example_sq_norms(model)), norm_graph_pass.REWRITTEN - before


# what the pass rewrites in each tiny model (2 layers): forward outputs narrowed to the fp16 its
# users cast them to, residual adds moved into the norm's forward kernel, backward dys summed and
# residual gradients added in the fused backward kernel, backward inputs read in fp16 where one
# Linear's widened gradient is the dy (Llama: the last norm)
LLAMA = {
    "forward outputs": 5, "residual adds": 4, "backward dy sums": 4, "backward residual adds": 4,
    "backward inputs": 1,
}  # fmt: skip
EXPECTED = {
    # every norm writes fp16; every norm's input but the first is a residual add; every norm but the
    # last feeds q/k/v or gate/up, and its dx meets the residual gradient (the GPU test's counts)
    "llama": LLAMA,
    # each norm feeds one Conv1D (no dy sum); ln_f's output is also a graph output (stays fp32);
    # the residual adds take the dropout's output (0.1, as GPT-2's config has it); the backward reads
    # the bf16 gradient of each Conv1D's input (ln_f's is summed with the output's gradient first)
    "gpt2": {"forward outputs": 4, "residual adds": 4, "backward residual adds": 4, "backward inputs": 4},
    # parallel attention and MLP read one norm: its dy sums the two branches' gradients
    "falcon": {
        "forward outputs": 3,
        "residual adds": 2,
        "backward dy sums": 2,
        "backward residual adds": 2,
        "backward inputs": 1,
    },
    # sandwich norms: the post-norms' outputs meet the fp32 residual stream (no cast, no rewrite)
    "gemma2": LLAMA,
    # the rest of the tiny models (CI runs IN_CI below; HF_GNS_STEP_ARCHITECTURES=all runs all 17)
    # q/k norms over the head dim feed the fp32 rotary embedding (no cast, no rewrite)
    "qwen3": LLAMA,
    "gpt_neox": {"forward outputs": 5, "residual adds": 2, "backward residual adds": 4, "backward inputs": 5},
    "opt": {
        "forward outputs": 5,
        "residual adds": 5,
        "backward dy sums": 2,
        "backward residual adds": 2,
        "backward inputs": 3,
    },
    "bloom": {"forward outputs": 5, "residual adds": 4, "backward residual adds": 4, "backward inputs": 5},
    "phi": {"forward outputs": 3, "residual adds": 2, "backward residual adds": 2, "backward inputs": 1},
    "stablelm": LLAMA,
    # parallel attention and MLP read one norm: its dy sums five gradients (q/k/v, gate/up), more
    # than the fused kernel reads (three); the q/k norms run the per-example call
    "cohere": {"forward outputs": 3, "residual adds": 2, "backward residual adds": 2, "backward inputs": 1},
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gemma": LLAMA,
    "gemma3": LLAMA,
    "olmo2": {
        "forward outputs": 1,
        "residual adds": 1,
        "backward inputs": 1,
    },  # post-norms: only the final norm is read by a cast
    "granite": LLAMA,
}
IN_CI = ("llama", "gpt2")  # CI time; the others with HF_GNS_STEP_ARCHITECTURES=all
ARCHITECTURES = list(EXPECTED) if os.environ.get("HF_GNS_STEP_ARCHITECTURES") == "all" else IN_CI


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs without the interpreter (above)")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_default_pass_gives_the_step_without_it_bit_for_bit(arch, monkeypatch):
    dropout = 0.1 if arch == "gpt2" else 0.0
    reference, rewritten = _step(arch, monkeypatch, pass_on=False, dropout=dropout)
    assert not rewritten
    fused, rewritten = _step(arch, monkeypatch, pass_on=True, dropout=dropout)
    assert dict(rewritten) == EXPECTED[arch]
    assert torch.equal(fused[0], reference[0])
    for wanted, got in zip(reference[1:], fused[1:], strict=True):
        assert wanted.keys() == got.keys() and wanted
        assert [name for name in wanted if not torch.equal(got[name], wanted[name])] == []


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs without the interpreter (above)")
@pytest.mark.parametrize("arch", ["gpt2", "llama"][: 2 if ARCHITECTURES is not IN_CI else 1])
def test_compiled_kernels_with_the_pass_give_the_eager_step(arch, monkeypatch):
    """fp32, the pass at its defaults (the residual adds fuse; no casts to narrow): two compiled steps
    running the Triton kernels give eager hf_gns's loss, gradients and per-example norms (the PyTorch
    reference norms) to fp32 rounding."""
    from inductor_interpreted import compile_interpreted
    from patching_tiny_models import loss_of, tiny_batch, tiny_model
    from ttir_cuda_target import cuda_target_active

    import hf_gns
    from hf_gns.kernels.norm_op import use_backend

    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass", None)
    eager, compiled = tiny_model(arch), tiny_model(arch)
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    call = compile_interpreted(compiled, monkeypatch)
    before = norm_graph_pass.REWRITTEN.copy()
    for seed in (1, 2):
        input_ids = tiny_batch(seed=seed)
        steps = []
        for model, forward in ((eager, None), (compiled, call)):
            model.zero_grad(set_to_none=True)
            hf_gns.zero_stats(model)
            if forward is None:
                loss = loss_of(model, input_ids)
                loss.backward()
            else:
                with use_backend("triton"), cuda_target_active():
                    loss = forward(input_ids=input_ids, labels=input_ids).loss
                    loss.backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            steps.append((loss.detach(), grads, dict(hf_gns.per_example_sq_norms(model))))
        (expected, actual) = steps
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
        for wanted, got in zip(expected[1:], actual[1:], strict=True):
            assert wanted.keys() == got.keys() and wanted
            for name in wanted:
                torch.testing.assert_close(got[name], wanted[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (norm_graph_pass.REWRITTEN - before)["residual adds"] == EXPECTED[arch]["residual adds"]
