"""GNSTrainer on a PEFT (LoRA) model: the GNS of the parameters that train, against the per-example oracle.

Under PEFT the norm weights are frozen and the adapters train. `GNSMixin` patches a PEFT model
with `targets="all"`, which only patches modules with trainable parameters: the adapters' Linear
layers (`lora_A`, `lora_B`), and the norms too when they train. The first optimizer step's
Σ_i |c_i|² and |G_B|² per group must equal one-example-at-a-time autograd over those parameters.
"""

import pytest
import torch
from gns_fixtures import FixedTokens, InOrderGNSTrainer, make_args, tiny_llama
from transformers.utils import logging as hf_logging

import hf_gns

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _torch_backend_and_quiet():
    hf_logging.set_verbosity_error()
    with hf_gns.use_backend("torch"):
        yield


def lora_model(train_norms: bool):
    # init_lora_weights=False: lora_B random too (at PEFT's default B = 0, lora_A gets no gradient)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    if train_norms:
        for name, param in model.named_parameters():
            if "norm" in name:
                param.requires_grad_(True)
    return model


@pytest.mark.parametrize("train_norms", [False, True])
def test_lora_step_statistics_equal_the_per_example_oracle(tmp_path, train_norms):
    dataset = FixedTokens()
    args = make_args(tmp_path, max_steps=1, logging_steps=1, gns_groups=["type", "module"])
    trainer = InOrderGNSTrainer(model=lora_model(train_norms), args=args, train_dataset=dataset)
    model = trainer.model
    tracked = hf_gns.patching.tracked_parameter_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(tracked) == sorted(trainable)  # exactly the parameters that train
    assert any(".lora_A." in n for n in tracked) and any(".lora_B." in n for n in tracked)
    assert any("norm" in n for n in tracked) == train_norms
    assert not any("base_layer" in n for n in tracked)

    params = dict(model.named_parameters())
    batch = 8  # 4 per micro-batch × 2 accumulated, read in order
    rows = dataset.rows[:batch]
    num_items = trainer._get_num_items_in_batch([{"input_ids": rows, "labels": rows}], torch.device("cpu"))
    contributions = []  # c_i: example i's share of HF's token-normalized loss
    for i in range(batch):
        ids = rows[i : i + 1]
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=num_items).loss
        contributions.append(dict(zip(tracked, torch.autograd.grad(loss, [params[n] for n in tracked]))))
    trainer.train()  # forgets the oracle's backward passes

    stats = trainer.last_step_statistics()
    assert stats["batch_size"] == batch
    groups = trainer._gns_group_names
    names = trainer._gns_tracked_names
    clean = {hf_gns.gns.groups.clean_name(n): n for n in tracked}
    for g, group in enumerate(groups):
        members = [clean[n] for n, col in zip(names, trainer._gns_membership[g]) if col]
        assert members, group
        example_sum = sum(c[n].double().square().sum() for c in contributions for n in members)
        batch_sq = sum(sum(c[n] for c in contributions).double().square().sum() for n in members)
        assert stats["example_sq_norm_sum"][group] == pytest.approx(example_sum.item(), rel=1e-4), group
        assert stats["batch_sq_norm"][group] == pytest.approx(batch_sq.item(), rel=1e-4), group
    logged = [entry for entry in trainer.state.log_history if "gns" in entry][-1]
    assert logged["gns_skipped_steps"] == 0
