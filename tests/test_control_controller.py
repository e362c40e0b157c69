"""BatchSizeController and its policies: rounding, each policy, hysteresis, intervals, files, state."""

import json
import math
import os

import pytest

from hf_gns.control import (
    BatchSizeController,
    ConstantPolicy,
    ControlInputs,
    DoublingPolicy,
    GNSPolicy,
    LinearRampPolicy,
    ScheduleFilePolicy,
    SchedulePolicy,
    read_schedule_file,
    realizable_batch_size,
)


def controller(policy, **kwargs):
    defaults = dict(initial_batch_size=64, world_size=4, micro_batch_size=8)  # unit 32
    defaults.update(kwargs)
    return BatchSizeController(policy, **defaults)


# ---- rounding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, expected",
    [(1, 32), (47.9, 32), (48, 64), (79, 64), (80, 96), (1000, 992), (1008, 1024), (10**6, 1024)],
)
def test_realizable_batch_rounds_to_nearest_multiple_halves_up_within_bounds(target, expected):
    assert realizable_batch_size(target, unit=32, min_batch_size=1, max_batch_size=1024) == expected


def test_realizable_batch_moves_inwards_when_rounding_leaves_the_bounds():
    # 100 clamps to max 100, rounds to 96 (3 × 32): inside. 90 -> 96 > max 95 -> one unit in: 64.
    assert realizable_batch_size(100, unit=32, min_batch_size=1, max_batch_size=100) == 96
    assert realizable_batch_size(90, unit=32, min_batch_size=1, max_batch_size=95) == 64
    # min 40 is not a multiple: the lowest realizable is 64.
    assert realizable_batch_size(1, unit=32, min_batch_size=40, max_batch_size=1000) == 64


def test_units_follow_granularity():
    assert controller(ConstantPolicy(64)).unit == 32  # world 4 × micro-batch 8
    by_example = controller(ConstantPolicy(66), initial_batch_size=66, granularity="example")
    assert by_example.unit == 4 and by_example.batch_size == 68  # 66 / 4 = 16.5 -> 17 (halves up)
    assert by_example.per_device_examples == 17 and by_example.num_micro_batches == 3  # 8 + 8 + 1


def test_bounds_without_a_realizable_batch_are_refused():
    with pytest.raises(ValueError, match="No realizable global batch"):
        controller(ConstantPolicy(64), min_batch_size=40, max_batch_size=60)
    with pytest.raises(ValueError, match="granularity"):
        controller(ConstantPolicy(64), granularity="token")


# ---- policies -------------------------------------------------------------------------------


def test_constant_policy_never_changes():
    c = controller(ConstantPolicy(100), initial_batch_size=100)
    assert c.batch_size == 96
    assert [c.update(step=s, tokens_seen=s * 10**6, gns=1e9) for s in range(5)] == [96] * 5
    assert c.changes == []


def test_linear_policy_follows_the_ramp_in_tokens():
    c = controller(LinearRampPolicy(start=64, end=512, ramp_tokens=1000), initial_batch_size=64)
    for tokens in [0, 100, 250, 500, 999, 1000, 5000]:
        exact = 64 + (512 - 64) * min(tokens / 1000, 1.0)
        assert c.update(step=tokens, tokens_seen=tokens, gns=None) == c.quantize(exact)
    assert c.batch_size == 512
    assert LinearRampPolicy(64, 512, 1000, start_tokens=200).target(ControlInputs(0, 200, None, 64)) == 64


def test_gns_policy_targets_multiplier_times_gns():
    c = controller(GNSPolicy(multiplier=2.0), max_batch_size=4096)
    assert c.update(step=1, tokens_seen=1, gns=100.0) == 192  # 2 × 100 = 200 -> 6 × 32
    assert c.update(step=2, tokens_seen=2, gns=None) == 192  # unknown GNS keeps the batch
    assert c.update(step=3, tokens_seen=3, gns=float("nan")) == 192
    assert c.update(step=4, tokens_seen=4, gns=-5.0) == 192  # a negative estimate is no signal
    assert c.update(step=5, tokens_seen=5, gns=1e9) == 4096  # clamped to the bound
    assert [(ch.step, ch.old_batch_size, ch.new_batch_size) for ch in c.changes] == [
        (1, 64, 192),
        (5, 192, 4096),
    ]


def test_hysteresis_is_a_relative_dead_band_on_the_rounded_target():
    c = controller(GNSPolicy(), initial_batch_size=320, hysteresis=0.1)
    assert c.update(step=1, tokens_seen=0, gns=352.0) == 320  # 352 is +10%: not more than 10%
    assert c.update(step=2, tokens_seen=0, gns=384.0) == 384  # +20%
    assert c.update(step=3, tokens_seen=0, gns=352.0) == 384  # -8.3%
    assert c.update(step=4, tokens_seen=0, gns=320.0) == 320  # -16.7%


def test_minimum_intervals_in_steps_and_tokens():
    c = controller(GNSPolicy(), min_interval_steps=3, min_interval_tokens=100)
    assert not c.needs_gns(step=2, tokens_seen=1000)  # the trainer skips reading the GNS
    assert c.update(step=2, tokens_seen=1000, gns=500.0) == 64  # 2 steps since start < 3
    assert c.update(step=3, tokens_seen=50, gns=500.0) == 64  # 50 tokens < 100
    assert c.needs_gns(step=3, tokens_seen=100)
    assert c.update(step=3, tokens_seen=100, gns=500.0) == 512
    assert c.update(step=5, tokens_seen=1000, gns=64.0) == 512  # 2 steps since the change
    assert c.update(step=6, tokens_seen=1000, gns=64.0) == 64


def test_monotonic_never_decreases():
    c = controller(GNSPolicy(), monotonic=True)
    assert c.update(step=1, tokens_seen=0, gns=256.0) == 256
    assert c.update(step=2, tokens_seen=0, gns=64.0) == 256


def test_doubling_policy_doubles_when_gns_exceeds_twice_the_batch():
    c = controller(DoublingPolicy(), max_batch_size=512)
    assert c.update(step=1, tokens_seen=0, gns=128.0) == 64  # 128 = 2 × 64, not above
    assert c.update(step=2, tokens_seen=0, gns=129.0) == 128
    assert c.update(step=3, tokens_seen=0, gns=1e6) == 256
    assert c.update(step=4, tokens_seen=0, gns=1e6) == 512
    assert c.update(step=5, tokens_seen=0, gns=1e6) == 512  # at the bound
    assert c.update(step=6, tokens_seen=0, gns=None) == 512
    with pytest.raises(ValueError, match="factor"):
        DoublingPolicy(factor=1.0)


def test_schedule_points_step_and_linear_interpolation():
    points = [(1000, 256), (0, 64), (3000, 128)]  # any order
    step = SchedulePolicy(points)
    linear = SchedulePolicy(points, interpolation="linear")
    at = lambda policy, tokens: policy.target(ControlInputs(0, tokens, None, 64))  # noqa: E731
    assert [at(step, t) for t in (0, 999, 1000, 2000, 3000, 10**9)] == [64, 64, 256, 256, 128, 128]
    assert [at(linear, t) for t in (0, 500, 1000, 2000, 3000, 10**9)] == [64, 160, 256, 192, 128, 128]
    c = controller(SchedulePolicy(points, interpolation="linear"))
    assert c.update(step=1, tokens_seen=500, gns=None) == 160  # schedules are followed exactly:
    assert c.update(step=2, tokens_seen=600, gns=None) == 192  # no hysteresis, no interval
    with pytest.raises(ValueError, match="same token count"):
        SchedulePolicy([(0, 64), (0, 128)])
    with pytest.raises(ValueError, match="batch_size > 0"):
        SchedulePolicy([(0, 0)])


def test_schedule_callable_sees_the_inputs():
    seen = []

    def schedule(inputs):
        seen.append(inputs)
        return 64 if inputs.tokens_seen < 100 else 4 * inputs.batch_size

    c = controller(SchedulePolicy(schedule))
    assert c.update(step=1, tokens_seen=50, gns=3.0) == 64
    assert c.update(step=2, tokens_seen=100, gns=4.0) == 256
    assert seen == [ControlInputs(1, 50, 3.0, 64), ControlInputs(2, 100, 4.0, 64)]


# ---- schedule files -------------------------------------------------------------------------


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def test_schedule_file_formats(tmp_path):
    expected = [(0, 64.0), (1000, 128.0)]
    write(tmp_path / "a.csv", "tokens,batch_size\n# comment\n0,64\n1000, 128\n")
    write(tmp_path / "b.csv", "1000,128\n0,64\n")
    write(tmp_path / "c.json", json.dumps([[0, 64], [1000, 128]]))
    write(
        tmp_path / "d.json",
        json.dumps({"points": [{"tokens": 0, "batch_size": 64}, {"tokens": 1e3, "batch_size": 128}]}),
    )
    for name in ("a.csv", "b.csv", "c.json", "d.json"):
        assert read_schedule_file(tmp_path / name) == expected
    write(tmp_path / "bad.csv", "0,64\nmany,128\n")
    with pytest.raises(ValueError, match="bad schedule line"):
        read_schedule_file(tmp_path / "bad.csv")


def test_schedule_file_is_re_read_when_it_changes_and_a_broken_save_is_ignored(tmp_path):
    path = tmp_path / "schedule.csv"
    write(path, "0,64\n")
    policy = ScheduleFilePolicy(path)
    c = controller(policy)
    assert not policy.refresh()  # unchanged
    write(path, "0,64\n100,256\n")
    os.utime(path, ns=(1, 2_000_000_000))  # a distinct modification time, whatever the clock resolution
    assert policy.refresh()
    assert c.update(step=1, tokens_seen=100, gns=None) == 256
    write(path, "0,64\n100,garbage\n")
    os.utime(path, ns=(1, 3_000_000_000))
    assert not policy.refresh()  # keeps the previous points, with a warning
    assert policy.points == [(0, 64.0), (100, 256.0)]
    write(tmp_path / "empty.csv", "")
    with pytest.raises(ValueError, match="at least one"):
        ScheduleFilePolicy(tmp_path / "empty.csv")


# ---- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: GNSPolicy(1.5),
        lambda: DoublingPolicy(),
        lambda: LinearRampPolicy(32, 640, 5000),
        lambda: SchedulePolicy([(0, 32), (2000, 320)], interpolation="linear"),
    ],
)
def test_a_restored_controller_decides_as_the_uninterrupted_one(make_policy):
    inputs = [(s, 137 * s * s, 40.0 * (1 + math.sin(s)) * s) for s in range(40)]
    kwargs = dict(initial_batch_size=32, hysteresis=0.15, min_interval_steps=2, max_batch_size=2048)
    reference = controller(make_policy(), **kwargs)
    decisions = [reference.update(step=s, tokens_seen=t, gns=g) for s, t, g in inputs]
    assert len(set(decisions)) > 2  # the sequence exercises changes
    for cut in (1, 7, 20):
        first = controller(make_policy(), **kwargs)
        for s, t, g in inputs[:cut]:
            first.update(step=s, tokens_seen=t, gns=g)
        state = json.loads(json.dumps(first.state_dict()))  # plain values only
        resumed = controller(make_policy(), **kwargs)
        resumed.load_state_dict(state)
        assert (
            decisions[:cut] + [resumed.update(step=s, tokens_seen=t, gns=g) for s, t, g in inputs[cut:]]
            == decisions
        )
        assert resumed.changes == reference.changes


def test_loading_under_another_unit_re_rounds_the_batch():
    state = controller(ConstantPolicy(96), initial_batch_size=96).state_dict()  # unit 32
    other = BatchSizeController(ConstantPolicy(96), initial_batch_size=64, world_size=8, micro_batch_size=8)
    other.load_state_dict(state)
    assert other.batch_size == 128  # 96 / 64 = 1.5 -> 2 × 64


def test_a_gns_that_is_not_positive_and_finite_holds_the_batch_and_says_so(caplog):
    # Unbiased |G|² and tr(Σ) estimates can be negative over few noisy steps: -23.9 means "not
    # measurable yet", and NaN (None from the trainer after step 0) means no estimate at all.
    c = controller(GNSPolicy(1.0), max_batch_size=1024)
    with caplog.at_level("WARNING", logger="hf_gns.control.controller"):
        assert c.update(step=5, tokens_seen=100, gns=-23.9) == 64
        assert c.update(step=6, tokens_seen=200, gns=math.nan) == 64
        assert c.update(step=7, tokens_seen=300, gns=None) == 64
        assert c.update(step=8, tokens_seen=400, gns=0.0) == 64
    assert c.held_steps == 4 and c.changes == []
    held = [r.getMessage() for r in caplog.records]
    assert len(held) == 1  # once per stretch, not once per step
    assert "GNS is -23.9 at step 5" in held[0] and "holding the global batch at 64" in held[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_gns.control.controller"):
        assert c.update(step=9, tokens_seen=500, gns=300.0) == 288
    assert c.held_steps == 0 and "positive again (300)" in caplog.records[0].getMessage()
    # before the first optimizer step an unknown GNS is expected: nothing to report
    fresh = controller(GNSPolicy(1.0))
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_gns.control.controller"):
        assert fresh.update(step=0, tokens_seen=0, gns=None) == 64
    assert caplog.records == [] and fresh.held_steps == 0
