"""Calibration under FSDP2 (`fully_shard`, gloo on CPU or NCCL on GPUs): the all-layer steps.

Run by `tests/test_gns_calibration.py` under `torch.distributed.run --nproc_per_node 2`.
A tiny GPT-2 patched with `targets="all"` (as GNSTrainer patches it when calibrating), its
blocks and root `fully_shard`ed, runs three steps on its half of each batch with the layer
reductions on, off, on (`set_layer_tracking`: calibration steps 0 and 2). On every step the
all-reduced statistics of the two calibration groups (every tracked parameter; the norm
layers), Σ|c_i^local|²/W² and Σ_ranks of each rank's shard share of |G_B|², must equal one
unsharded process on the whole batch; on the off step only the norm layers report. Asserts,
then exits 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from gns_fixtures import FixedTokens, leave_after_checks, tiny_gpt2
from torch.distributed.fsdp import fully_shard

import hf_gns
from hf_gns import distributed
from hf_gns.gns import clean_name, to_synced_units
from hf_gns.patching.layers import set_layer_tracking


def patched_tiny_gpt2():
    model = tiny_gpt2()
    hf_gns.patch(model, targets="all")
    return model


def group_statistics(norms: dict, grads: dict, norm_names: set, sharded: bool) -> torch.Tensor:
    """[Σ_i |c_i|² of (all, norms), |G_B|² of (all, norms)] over the parameters in `norms`:
    sharded, this rank's shares of |G_B|² (as GNSTrainer computes them); else |G_B|² itself."""
    names = sorted(norms)
    examples = torch.stack([norms[n].sum() for n in names])
    if sharded:
        batch = distributed.grad_sq_norm_shares([grads[n] for n in names], sharded=True)
    else:
        batch = torch.stack([grads[n].square().sum() for n in names])
    is_norm = torch.tensor([n in norm_names for n in names], dtype=examples.dtype)
    return torch.stack([examples.sum(), (examples * is_norm).sum(), batch.sum(), (batch * is_norm).sum()])


def main():
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run under torch.distributed.run --nproc_per_node 2, got world size {world}"
    hf_gns.set_backend("torch")
    rows = FixedTokens().rows  # every row has the same number of tokens
    reference, model = patched_tiny_gpt2(), patched_tiny_gpt2()
    set_layer_tracking(reference, False)  # as GNSTrainer finds the norm layers' parameters
    norm_names = {clean_name(n) for n in hf_gns.per_example_sq_norms(reference)}
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    for step, calibrating in enumerate([True, False, True]):
        ids = rows[4 * step : 4 * step + 2 * world]  # (4, T): the global batch of this step
        mine = ids[2 * rank : 2 * rank + 2]
        for m in (reference, model):
            set_layer_tracking(m, calibrating)
            hf_gns.zero_stats(m)
            m.zero_grad(set_to_none=True)
        reference(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=mine, labels=mine).loss.backward()
        expected_norms = {clean_name(k): v for k, v in hf_gns.per_example_sq_norms(reference).items()}
        got_norms = {clean_name(k): v for k, v in hf_gns.per_example_sq_norms(model).items()}
        assert got_norms.keys() == expected_norms.keys(), (step, set(got_norms) ^ set(expected_norms))
        if calibrating:
            assert set(got_norms) > norm_names, step  # the linear and embedding layers report too
        else:
            assert set(got_norms) == norm_names, step
        params = {clean_name(k): p for k, p in model.named_parameters()}
        grads = {n: params[n].grad for n in got_norms}
        assert all(type(g).__name__ == "DTensor" for g in grads.values()), [type(g) for g in grads.values()]
        vector = group_statistics(got_norms, grads, norm_names, sharded=True)
        distributed.all_reduce_sum(vector)
        stats = to_synced_units(vector[:2], vector[2:], world_size=world)
        ref_params = dict(reference.named_parameters())
        expected = group_statistics(
            expected_norms, {n: ref_params[n].grad for n in expected_norms}, norm_names, sharded=False
        )
        for got, want in zip(torch.cat([stats.example_sq_norm_sum, stats.batch_sq_norm]), expected):
            assert abs(got.item() - want.item()) <= 1e-5 * want.item(), (step, got.item(), want.item())


if __name__ == "__main__":
    main()
    leave_after_checks()
