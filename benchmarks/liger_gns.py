"""GNS with Liger equals GNS without (same model, data and seed), on a GPU.

Three variants of one Llama-style model train side by side on the same batches, each step
reading hf_gns's statistics (Σ_i |c_i|² and |G_B|² over the norm weights):

    plain          hf_gns.patch(model)
    liger→hf_gns   Liger's full instance patch (RoPE, SwiGLU, fused linear cross-entropy,
                   RMSNorm), then hf_gns.patch: hf_gns takes the norms over
    hf_gns→liger   hf_gns.patch, Liger's patch (what Trainer.train() does after GNSTrainer
                   patched), then hf_gns.patch again, which re-binds the norms

Every step each variant passes `check_step_statistics` (exact per-example statistics),
and the table shows, per variant: the first step's Σ|c_i|² and |G_B|² relative to plain
(same weights, same batch: only kernel rounding differs), the GNS over the run
(EMA-free: mean trΣ / mean |G|² over the steps after warm-up), and step time. The noise
scale of the GNS itself is the plain variant rerun on other batches (`plain, data seed 2`).
PASS when the first-step statistics agree within --stat-rtol and each Liger variant's GNS
is within --gns-rtol of plain's.

Liger is not on the GPU image; copy its wheel over (pure Python, needs only torch and triton):
    pip download liger-kernel==0.8.5 --no-deps -d wheels   # here
    pip install --no-deps wheels/liger_kernel-0.8.5-py3-none-any.whl   # on the GPU machine
    python benchmarks/liger_gns.py --steps 300
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import hf_gns
from hf_gns.patching import check_step_statistics


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )


def markov_batches(args, seed: int):
    """Token sequences from a fixed sparse random bigram chain: learnable, so the GNS is positive."""
    table = torch.Generator().manual_seed(0)
    successors = torch.randint(0, args.vocab, (args.vocab, 4), generator=table)
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.empty(args.batch, args.seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=generator)
        for t in range(1, args.seq):
            choice = torch.randint(0, 4, (args.batch,), generator=generator)
            tokens[:, t] = successors[tokens[:, t - 1], choice]
        yield tokens.cuda()


def apply_liger(model):
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def build(base, variant: str):
    model = copy.deepcopy(base)
    if variant == "liger→hf_gns":
        apply_liger(model)
        report = hf_gns.patch(model)
    elif variant == "hf_gns→liger":
        hf_gns.patch(model)
        apply_liger(model)
        report = hf_gns.patch(model)
        assert all(e.source.startswith("re-bound") for e in report.patched), report
    else:
        report = hf_gns.patch(model)
    assert report.patched and not report.uncovered, report
    return model


def statistics_of_step(model, input_ids) -> tuple[float, float]:
    """One forward/backward; (Σ_i |c_i|², |G_B|²) over the tracked norm weights (one sync)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    check_step_statistics(model, input_ids.shape[0])  # raises unless every norm has B exact values
    norms = hf_gns.per_example_sq_norms(model)
    params = dict(model.named_parameters())
    example = torch.stack([v.sum() for v in norms.values()]).sum()
    batch = torch.stack([params[n].grad.float().square().sum() for n in norms]).sum()
    hf_gns.zero_stats(model)
    return example.item(), batch.item()


def run(model, batches, args) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    small, big, times, first = [], [], [], None
    b = args.batch
    for step in range(args.steps):
        input_ids = next(batches)
        torch.cuda.synchronize()
        start = time.perf_counter()
        example_sum, batch_sq = statistics_of_step(model, input_ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        first = first or (example_sum, batch_sq)
        if step >= args.warmup:
            s = b * example_sum  # small-batch statistic (DESIGN.md section 2)
            small.append((b * batch_sq - s) / (b - 1))  # |G|²
            big.append((s - batch_sq) / (1 - 1 / b))  # tr Σ
    gns = (sum(big) / len(big)) / (sum(small) / len(small))
    return {"first": first, "gns": gns, "ms": 1e3 * sorted(times)[len(times) // 2]}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--stat-rtol", type=float, default=2e-2)
    parser.add_argument("--gns-rtol", type=float, default=0.10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("liger_gns.py: error: needs a CUDA GPU (Liger's kernels are Triton GPU kernels)")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(llama_config(args), attn_implementation="sdpa").cuda().train()
    results = {}
    for variant, seed in (("plain", 1), ("liger→hf_gns", 1), ("hf_gns→liger", 1), ("plain, data seed 2", 2)):
        torch.manual_seed(0)
        results[variant] = run(build(base, variant.split(",")[0]), markov_batches(args, seed), args)

    plain = results["plain"]
    shape = f"{args.layers}×{args.hidden}, B={args.batch}, T={args.seq}"
    print(f"Llama-style {shape}, {args.steps} steps, bf16 autocast; step-0 statistics relative to plain")
    header = ("variant", "Σ|c|² step 0", "|G_B|² step 0", "GNS", "GNS/plain", "ms/step")
    print("{:<20} {:>14} {:>14} {:>10} {:>10} {:>8}".format(*header))
    ok = True
    for variant, r in results.items():
        rel = [r["first"][i] / plain["first"][i] for i in range(2)]
        ratio = r["gns"] / plain["gns"]
        row = f"{variant:<20} {rel[0]:>14.5f} {rel[1]:>14.5f} {r['gns']:>10.1f} {ratio:>10.3f}"
        print(f"{row} {r['ms']:>8.1f}")
        if "liger" in variant:
            ok &= all(abs(x - 1) <= args.stat_rtol for x in rel) and abs(ratio - 1) <= args.gns_rtol
    limits = f"(first-step statistics within {args.stat_rtol}, GNS within {args.gns_rtol})"
    print("PASS" if ok else "FAIL", limits)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
