"""GNSEstimator against synthetic gradients with known |G|² and tr(Σ), and against hand-computed EMAs."""

import io
import math

import pytest
import torch

from hf_gns.gns import GNSEstimator, per_example_statistic


def _synthetic_steps(trials, batch, true_grad, noise_std, generator):
    """Per-example gradients g_i = G + ε_i, ε_i ~ N(0, diag(noise_std²)): tr(Σ) = Σ noise_std²."""
    dim = true_grad.numel()
    noise = torch.randn(trials, batch, dim, generator=generator, dtype=torch.float64) * noise_std
    per_example = true_grad + noise  # (trials, B, D)
    contributions = per_example / batch  # c_i: the mean gradient G_B is their sum
    batch_grad = contributions.sum(1)
    example_sq_norm_sum = contributions.square().sum((1, 2))
    return per_example, example_sq_norm_sum, batch_grad.square().sum(1)


@pytest.mark.parametrize("batch", [2, 8])
def test_per_step_estimates_are_unbiased(batch):
    """One estimator group per trial: after one step each group holds that trial's estimates."""
    gen = torch.Generator().manual_seed(0)
    dim, trials = 16, 20000
    true_grad = torch.linspace(-0.5, 0.5, dim, dtype=torch.float64)
    noise_std = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    _, example_sums, batch_sq = _synthetic_steps(trials, batch, true_grad, noise_std, gen)
    est = GNSEstimator([str(t) for t in range(trials)], ema_decay=0.5)
    est.update(per_example_statistic(example_sums, batch), batch_sq, big_batch=batch)
    sq_norm, trace_cov = est.components()
    true_sq, true_trace = true_grad.square().sum().item(), noise_std.square().sum().item()
    for values, truth in ((sq_norm, true_sq), (trace_cov, true_trace)):
        stderr = values.std().item() / math.sqrt(trials)
        assert abs(values.mean().item() - truth) < 4 * stderr, (values.mean().item(), truth, stderr)
    # the biased plug-ins are far off: |G_B|² overestimates |G|² by tr(Σ)/B
    assert batch_sq.mean().item() - true_sq == pytest.approx(true_trace / batch, rel=0.05)


def test_classic_two_batch_sizes_are_unbiased():
    """B_small > 1 (the DDP estimate): small = mean |G_small,k|² over the chunks of the batch."""
    gen = torch.Generator().manual_seed(1)
    dim, trials, batch, chunks = 8, 20000, 8, 4
    true_grad = torch.full((dim,), 0.3, dtype=torch.float64)
    noise_std = torch.full((dim,), 1.5, dtype=torch.float64)
    per_example, _, batch_sq = _synthetic_steps(trials, batch, true_grad, noise_std, gen)
    chunk_grads = per_example.reshape(trials, chunks, batch // chunks, dim).mean(2)
    small = chunk_grads.square().sum(2).mean(1)
    est = GNSEstimator([str(t) for t in range(trials)], ema_decay=0.5)
    est.update(small, batch_sq, big_batch=batch, small_batch=batch // chunks)
    sq_norm, trace_cov = est.components()
    assert sq_norm.mean().item() == pytest.approx(
        dim * 0.09, abs=4 * sq_norm.std().item() / math.sqrt(trials)
    )
    assert trace_cov.mean().item() == pytest.approx(
        dim * 2.25, abs=4 * trace_cov.std().item() / math.sqrt(trials)
    )


def _reference_ema(steps, decay):
    """Bias-corrected EMA with per-step weight decay**B, written out plainly."""
    num_sq = num_tr = den = 0.0
    for small, big, b in steps:
        sq = (b * big - small) / (b - 1)
        tr = (small - big) / (1 - 1 / b)
        keep = decay**b
        num_sq, num_tr, den = (
            keep * num_sq + (1 - keep) * sq,
            keep * num_tr + (1 - keep) * tr,
            keep * den + 1 - keep,
        )
    return num_sq / den, num_tr / den


def test_ema_with_varying_batch_matches_reference_and_is_ratio_of_averages():
    steps = [(5.0, 1.0, 4), (9.0, 2.5, 16), (3.0, 0.2, 8), (7.0, 1.1, 32)]
    decay = 0.97
    est = GNSEstimator(["total"], ema_decay=decay)
    for small, big, b in steps:
        est.update(torch.tensor([small], dtype=torch.float64), torch.tensor([big], dtype=torch.float64), b)
    sq_norm, trace_cov = (t.item() for t in est.components())
    ref_sq, ref_tr = _reference_ema(steps, decay)
    assert sq_norm == pytest.approx(ref_sq, rel=1e-12)
    assert trace_cov == pytest.approx(ref_tr, rel=1e-12)
    assert est.gns()["total"] == pytest.approx(ref_tr / ref_sq, rel=1e-12)
    # ... which is not the EMA of the per-step ratios
    ratios = [((s - g) / (1 - 1 / b)) / ((b * g - s) / (b - 1)) for s, g, b in steps]
    assert abs(est.gns()["total"] - sum(ratios) / len(ratios)) > 0.1 * abs(est.gns()["total"])
    assert est.steps == 4 and est.skipped_steps == 0


def test_per_example_decay_counts_a_double_batch_twice():
    """One step of 2B examples weighs the past like two steps of B: decay**(2B)."""
    a = GNSEstimator(["total"], ema_decay=0.9)
    a.update(torch.tensor([4.0]), torch.tensor([1.0]), big_batch=4)
    a.update(torch.tensor([6.0]), torch.tensor([2.0]), big_batch=8)
    weight_of_first = 0.9**8 * (1 - 0.9**4) / (0.9**8 * (1 - 0.9**4) + 1 - 0.9**8)
    first = ((4 * 1.0 - 4.0) / 3, (4.0 - 1.0) / 0.75)
    second = ((8 * 2.0 - 6.0) / 7, (6.0 - 2.0) / (1 - 1 / 8))
    sq_norm, trace_cov = (t.item() for t in a.components())
    assert sq_norm == pytest.approx(weight_of_first * first[0] + (1 - weight_of_first) * second[0])
    assert trace_cov == pytest.approx(weight_of_first * first[1] + (1 - weight_of_first) * second[1])


def test_constant_inputs_are_recovered_from_the_first_step():
    """Bias correction: no warm-up toward zero."""
    est = GNSEstimator(["a", "b"], ema_decay=0.9999)
    for _ in range(3):
        est.update(torch.tensor([3.0, 10.0]), torch.tensor([1.0, 2.0]), big_batch=5)
        sq_norm, trace_cov = est.components()
        torch.testing.assert_close(sq_norm, torch.tensor([0.5, 0.0], dtype=torch.float64))
        torch.testing.assert_close(trace_cov, torch.tensor([2.5, 10.0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_steps_are_skipped_and_counted(bad):
    est = GNSEstimator(["total", "g"], ema_decay=0.9)
    est.update(torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]), big_batch=4)
    before = [t.clone() for t in est.components()]
    est.update(torch.tensor([3.0, bad]), torch.tensor([1.0, 1.0]), big_batch=4)
    est.update(torch.tensor([3.0, 3.0]), torch.tensor([bad, 1.0]), big_batch=4)
    for new, old in zip(est.components(), before):
        torch.testing.assert_close(new, old)
    assert est.skipped_steps == 2 and est.steps == 1


def test_before_any_step_values_are_nan():
    est = GNSEstimator(["total"])
    assert math.isnan(est.gns()["total"])
    est.update(torch.tensor([2.0]), torch.tensor([1.0]), big_batch=1)  # B = 1: no noise information
    assert math.isnan(est.gns()["total"]) and est.skipped_steps == 1


def test_state_dict_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    inputs = [
        (torch.rand(3, generator=gen) * 5 + 1, torch.rand(3, generator=gen), 4 + 4 * k) for k in range(6)
    ]
    full = GNSEstimator(["total", "x", "y"], ema_decay=0.99)
    for small, big, b in inputs:
        full.update(small, big, big_batch=b)
    first = GNSEstimator(["total", "x", "y"], ema_decay=0.99)
    for small, big, b in inputs[:3]:
        first.update(small, big, big_batch=b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = GNSEstimator(["total", "x", "y"], ema_decay=0.5)  # the decay comes from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for small, big, b in inputs[3:]:
        resumed.update(small, big, big_batch=b)
    for a, b in zip(resumed.components(), full.components()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.steps == full.steps == 6


def test_load_state_dict_refuses_other_groups():
    state = GNSEstimator(["total", "x"]).state_dict()
    with pytest.raises(ValueError, match="groups differ"):
        GNSEstimator(["total", "y"]).load_state_dict(state)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="per example"):
        GNSEstimator(["total"], ema_decay=decay)


def test_wrong_number_of_values_is_refused():
    est = GNSEstimator(["total", "x"])
    with pytest.raises(ValueError, match="one value per group"):
        est.update(torch.tensor([1.0]), torch.tensor([1.0, 2.0]), big_batch=4)


def _fold_step_oracle(state, small, big, b_big, b_small, weight, log_decay):
    """`fold_step` written plainly (its form before the increment became one where and one product)."""
    n = small.numel()
    diff = b_big - b_small
    scale = b_big * b_small / diff if isinstance(diff, torch.Tensor) or diff != 0 else math.inf
    trace_cov = (small - big) * scale
    estimates = torch.cat([big - trace_cov / b_big, trace_cov])
    ok = (estimates - estimates == 0).all()
    ok = ok & (diff > 0) if isinstance(diff, torch.Tensor) else (ok if diff > 0 else torch.zeros_like(ok))
    if isinstance(weight, torch.Tensor):
        step_keep = torch.exp(weight * log_decay)
    else:
        step_keep = torch.full((), math.exp(weight * log_decay), dtype=torch.float64)
    keep = torch.where(ok, step_keep, 1.0)
    gain, counted = 1.0 - keep, ok.to(torch.float64)
    decay = torch.cat([keep.expand(2 * n + 1), torch.ones(3, dtype=torch.float64)])
    tail = torch.stack([gain, counted, 1.0 - counted, counted * b_big])
    return torch.addcmul(torch.cat([torch.where(ok, estimates, 0.0) * gain, tail]), decay, state)


def test_fold_step_is_bitwise_its_plain_form():
    """The fused increment gives the plain form's exact bits, counted or skipped (NaN, inf, B_big <= B_small),
    batch sizes as numbers or tensors."""
    from hf_gns.gns.estimator import fold_step

    generator = torch.Generator().manual_seed(0)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, 1e300]
    as_tensor = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    for case in range(240):
        n = 1 + case % 3
        state = torch.rand(2 * n + 4, dtype=torch.float64, generator=generator) * (case % 4)
        small = torch.rand(n, dtype=torch.float64, generator=generator) * 10
        big = torch.rand(n, dtype=torch.float64, generator=generator)
        if case % 5 == 1:
            small[case % n] = specials[case % len(specials)]
        if case % 7 == 2:
            big[case % n] = specials[(case // 7) % len(specials)]
        b_big = (1, 2, 8, 16.0, 0.5, 0)[case % 6]
        b_small = (1, 1, 4, 0.5)[(case // 6) % 4]
        if case % 2:
            b_big = as_tensor(b_big)
        if (case // 2) % 3 == 0:
            b_small = as_tensor(b_small)
        weight = b_big if case % 3 else 7.5
        args = (state, small, big, b_big, b_small, weight, math.log(0.999))
        expected, got = _fold_step_oracle(*args), fold_step(*args)
        assert torch.equal(got.view(torch.int64), expected.view(torch.int64)), (case, got, expected)
