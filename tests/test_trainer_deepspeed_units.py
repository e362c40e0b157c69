"""`hf_gns.trainer.deepspeed` pieces that need no DeepSpeed: the gradient sums and the bypass check.

`ZeroGradSums` on a patched tiny GPT-2 with a stand-in for the trainer (one process): the hooked
gradient sums equal `param.grad` over several backward passes, and a norm whose forward is
replaced after patching (its gradient bypasses the fused op) is caught although `param.grad`
is never read: raised with `gns_incomplete="error"`, flagged in the statistics vector with `"warn"`.
"""

import types

import pytest
import torch
from gns_fixtures import FixedTokens, tiny_gpt2

import hf_gns
from hf_gns.gns.groups import clean_name
from hf_gns.patching import IncompleteStatisticsError
from hf_gns.trainer.deepspeed import ZeroGradSums


def stand_in_trainer(model, incomplete="error"):
    names = hf_gns.patching.tracked_parameter_names(model)
    params = dict(model.named_parameters())
    trainer = types.SimpleNamespace(
        _gns_options=types.SimpleNamespace(
            gns_track="norms", gns_log_ddp_estimate=False, gns_incomplete=incomplete
        ),
        _gns_calibrate_every=0,
        _gns_tracked_names=[clean_name(n) for n in names],
        _gns_dropped_here=set(),
        model=model,
    )
    trainer._gns_tracked_parameters = lambda wrapped: (names, [params[n] for n in names])
    return trainer, names


def backward(model, rows):
    tokens = FixedTokens().rows[rows]
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_hooked_sums_equal_the_gradient():
    with hf_gns.use_backend("torch"):
        model = tiny_gpt2()
        hf_gns.patch(model)
        trainer, names = stand_in_trainer(model)
        sums = ZeroGradSums(trainer)
        sums.begin_step(model)
        backward(model, slice(0, 4))
        backward(model, slice(4, 8))
        flat = sums.local_grad_sums(torch.device("cpu"))
        expected = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
        torch.testing.assert_close(flat, expected, rtol=1e-6, atol=0)
        assert sums.local_grad_sums(torch.device("cpu")).abs().sum() == 0  # reset


@pytest.mark.parametrize("incomplete", ["error", "warn"])
def test_a_gradient_that_bypassed_the_patched_forward_is_caught(incomplete):
    with hf_gns.use_backend("torch"):
        model = tiny_gpt2()
        hf_gns.patch(model)
        trainer, names = stand_in_trainer(model, incomplete)
        sums = ZeroGradSums(trainer)
        sums.begin_step(model)
        final_norm = model.transformer.ln_f
        final_norm.forward = types.MethodType(torch.nn.LayerNorm.forward, final_norm)  # after patch
        backward(model, slice(0, 4))
        vector = torch.zeros(3 + len(names))  # [..., one flag per tracked parameter]
        if incomplete == "error":
            with pytest.raises(IncompleteStatisticsError, match="transformer.ln_f.weight"):
                sums.flag_bypassed(model, vector)
            return
        flagged = sums.flag_bypassed(model, vector)
        assert flagged == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
        flags = vector[-len(names) :]
        assert [names[i] for i in flags.nonzero().flatten().tolist()] == flagged
        assert sums.flag_bypassed(model, torch.zeros(3 + len(names))) == []  # dropped: flagged once
