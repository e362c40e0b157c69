"""Token-denominated LR schedules, batch scaling of the LR, and the TokenLRScheduler."""

import io
import math

import pytest
import torch

from hf_gns.control import BatchLRScaling, TokenLRSchedule, TokenLRScheduler, cosine, d2z, linear_to_fraction


def test_d2z_warms_up_then_decays_linearly_to_zero():
    schedule = d2z(total_tokens=1000, warmup_tokens=100)
    tokens = [0, 50, 100, 550, 1000, 2000]
    assert [schedule(t) for t in tokens] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0], abs=1e-15)


def test_linear_to_fraction():
    schedule = linear_to_fraction(total_tokens=1000, fraction=0.1)
    assert [schedule(t) for t in (0, 500, 1000, 5000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_cosine_matches_the_closed_form():
    schedule = cosine(total_tokens=1100, warmup_tokens=100, final_fraction=0.2)
    for t in (100, 350, 600, 850, 1100, 9999):
        p = min((t - 100) / 1000, 1.0)
        assert schedule(t) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)))
    assert schedule(600) == pytest.approx(0.6)  # halfway: the mean of 1 and 0.2


def test_constant_after_warmup():
    schedule = TokenLRSchedule(1000, 200, "constant")
    assert [schedule(t) for t in (0, 100, 200, 999, 5000)] == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="warmup_tokens"):
        TokenLRSchedule(100, 200)
    with pytest.raises(ValueError, match="decay"):
        TokenLRSchedule(100, 0, "exponential")
    with pytest.raises(ValueError, match="final_fraction"):
        TokenLRSchedule(100, 0, "linear", 1.5)


def test_batch_scaling_rules():
    assert BatchLRScaling("none", 64)(256) == 1.0
    assert BatchLRScaling("sqrt", 64)(256) == pytest.approx(2.0)
    assert BatchLRScaling("linear", 64)(256) == pytest.approx(4.0)
    assert BatchLRScaling("sqrt", 64)(16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rule"):
        BatchLRScaling("cubic", 64)


def make_scheduler(**kwargs):
    weight = torch.nn.Parameter(torch.zeros(3))
    bias = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-3}, {"params": [bias], "lr": 2e-3}])
    return optimizer, TokenLRScheduler(optimizer, **kwargs)


def test_scheduler_sets_base_lr_times_schedule_times_batch_factor():
    optimizer, scheduler = make_scheduler(schedule=d2z(1000, 100), batch_scaling=BatchLRScaling("sqrt", 64))
    scheduler.set_position(tokens_seen=550, batch_size=256)  # schedule 0.5, batch factor 2
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 2e-3])
    assert scheduler.get_last_lr() == pytest.approx([1e-3, 2e-3])
    optimizer.step()
    scheduler.step()  # what the HF Trainer calls after each optimizer step: the position stays
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 2e-3])
    scheduler.set_position(tokens_seen=50, batch_size=64)  # warmup 0.5, factor 1
    assert scheduler.get_last_lr() == pytest.approx([0.5e-3, 1e-3])


def test_scheduler_state_round_trips_through_a_weights_only_load():
    optimizer, scheduler = make_scheduler(
        schedule=cosine(1000, 0, 0.1), batch_scaling=BatchLRScaling("linear", 32)
    )
    scheduler.set_position(tokens_seen=321, batch_size=96)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)  # HF writes scheduler.pt ...
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # ... and reads it back like this
    optimizer2, scheduler2 = make_scheduler(
        schedule=cosine(1000, 0, 0.1), batch_scaling=BatchLRScaling("linear", 32)
    )
    scheduler2.load_state_dict(state)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
