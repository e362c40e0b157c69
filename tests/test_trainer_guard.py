"""The guard in the trainer: no GNS from incomplete per-example statistics, and Liger in either order.

A norm module whose forward is replaced after patching (what Liger's instance patching does when
the Trainer applies it after hf_gns patched) still gets a gradient but no per-example values:
`gns_incomplete="error"` stops training with the module's name, `"warn"` drops its parameters for
the rest of the run (that step skipped, the count logged). With `use_liger_kernel=True` the
Trainer applies Liger inside `train()`; `GNSMixin` patches again at the start of the training loop,
so the measured GNS is exactly the one without Liger.
"""

import math
import types

import pytest
from gns_fixtures import FixedTokens, make_args, tiny_gpt2, tiny_llama
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

import hf_gns
from hf_gns.patching import IncompleteStatisticsError


@pytest.fixture(autouse=True)
def _torch_backend_and_quiet():
    hf_logging.set_verbosity_error()
    with hf_gns.use_backend("torch"):
        yield


class ReplaceForwardAtStart(TrainerCallback):
    """Rebinds `transformer.ln_f.forward` to the class's own once training has started (after patching)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        ln_f = model.transformer.ln_f
        ln_f.forward = types.MethodType(type(ln_f).forward, ln_f)


def test_a_forward_replaced_after_patching_is_an_error_naming_the_module(tmp_path):
    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path, max_steps=2), train_dataset=FixedTokens(),
        callbacks=[ReplaceForwardAtStart()],
    )  # fmt: skip
    with pytest.raises(IncompleteStatisticsError, match=r"transformer\.ln_f.*forward was replaced"):
        trainer.train()
    assert trainer.gns_estimator.steps == 0


def test_warn_drops_the_parameters_and_skips_that_step(tmp_path):
    args = make_args(tmp_path, max_steps=3, logging_steps=1, gns_incomplete="warn", gns_groups=["module"])
    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=args, train_dataset=FixedTokens(), callbacks=[ReplaceForwardAtStart()]
    )
    with pytest.warns(UserWarning, match="dropping 2 tracked parameters"):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "gns_skipped_steps" in entry]
    assert [entry["gns_skipped_steps"] for entry in logs] == [1, 1, 1]  # the first step, not used
    assert [entry["gns_dropped_parameters"] for entry in logs] == [2, 2, 2]  # ln_f weight and bias
    assert math.isnan(logs[0]["gns"]) and math.isfinite(logs[2]["gns"])
    stats = trainer.last_step_statistics()
    assert stats["example_sq_norm_sum"]["module/transformer.ln_f"] == 0.0
    assert stats["batch_sq_norm"]["module/transformer.ln_f"] == 0.0
    others = [v for k, v in stats["example_sq_norm_sum"].items() if k.startswith("module/")]
    assert stats["example_sq_norm_sum"]["total"] == pytest.approx(sum(others), rel=1e-6)


@pytest.fixture
def restore_llama_module():
    """Liger also swaps classes in `transformers.models.llama.modeling_llama` (process-wide): undo it,
    or every later Llama of this process would be built with Liger's RMSNorm."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in list(vars(modeling_llama).items()):
        if name not in saved:
            delattr(modeling_llama, name)
        elif saved[name] is not value:
            setattr(modeling_llama, name, saved[name])


def test_liger_applied_by_the_trainer_gives_the_same_gns(tmp_path, restore_llama_module):
    pytest.importorskip("liger_kernel")
    # Liger's norms only: its other kernels have nothing to do with the norms' statistics
    config = dict(rms_norm=True, rope=False, swiglu=False, cross_entropy=False)
    config["fused_linear_cross_entropy"] = False
    logs = []
    for liger in (False, True):
        args = make_args(
            tmp_path / str(liger), max_steps=4, logging_steps=4, use_liger_kernel=liger,
            liger_kernel_config=config if liger else None,
        )  # fmt: skip
        trainer = hf_gns.GNSTrainer(model=tiny_llama(), args=args, train_dataset=FixedTokens())
        trainer.train()
        if liger:  # Liger did rebind the norms' forward, and hf_gns took them over again
            norm = trainer.model.model.norm
            assert "forward" in norm.__dict__ and "liger" not in norm.forward.__func__.__module__
        logs.append([entry for entry in trainer.state.log_history if "gns" in entry][-1])
    for key in ("gns", "gns_sq_norm", "gns_trace_cov", "loss"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-6), key
