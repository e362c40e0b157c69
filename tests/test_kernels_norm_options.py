"""The dense norm backward's compile-time variants (`norm_triton.BackwardOptions`) against the default.

Each variant must give the default kernel's dx, dγ, dβ and per-example squared norms: bitwise where
it changes only how rows are loaded (prefetch, loop stages, eviction hints), to fp32 rounding where
it changes how a row's two sums are reduced (one_reduction). Shapes are small (interpreter) and
cut the rows into chunks whose last one is ragged: B=2 examples of R=37 rows, D=40 (BLOCK_D 64).
"""

from __future__ import annotations

import pytest
import torch

from hf_gns.kernels import norm_launch, norm_triton
from hf_gns.kernels.norm_reference import norm_backward_reference
from hf_gns.kernels.norm_triton import BackwardOptions
from tests.conftest import triton_runs_here

needs_triton = pytest.mark.skipif(
    not triton_runs_here("cpu"), reason="runs the Triton kernels: needs TRITON_INTERPRET=1"
)

B, R, D, BLOCK_D = 2, 37, 40, 64
KINDS = {  # (rms, has_bias)
    "layernorm": (False, True),
    "layernorm_no_bias": (False, False),
    "rmsnorm": (True, False),
}
VARIANTS = {
    "one_reduction": BackwardOptions(one_reduction=True),
    "prefetch": BackwardOptions(prefetch=True),
    "loop_stages": BackwardOptions(loop_stages=2),
    "evict_first": BackwardOptions(evict_first=True),
    "all": BackwardOptions(one_reduction=True, prefetch=True, evict_first=True),
}


@pytest.fixture
def backward_tile(monkeypatch):
    """`set(tile)` installs BACKWARD_TILES[64] = tile; configs and plans are rebuilt around each test."""

    def set_tile(tile):
        monkeypatch.setitem(norm_triton.BACKWARD_TILES, BLOCK_D, tile)
        norm_triton.backward_config.cache_clear()
        norm_launch.clear_plans()

    yield set_tile
    monkeypatch.undo()
    norm_triton.backward_config.cache_clear()
    norm_launch.clear_plans()


def _inputs(rms, has_bias):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, R, D, generator=gen) * 2 + 0.5
    dy = torch.randn(B, R, D, generator=gen)
    weight = 1 + 0.1 * torch.randn(D, generator=gen)
    bias = 0.1 * torch.randn(D, generator=gen) if has_bias else None
    y, mean, rstd = norm_launch.norm_forward_triton(x, weight, bias, 1e-5, rms, 0.0, False, x.dtype)
    return dy, x, weight, mean, rstd


def _backward(inputs, rms, has_bias, compiled=False):
    dy, x, weight, mean, rstd = inputs
    if compiled:  # the torch.compile path's launcher (wrap_triton), run eagerly
        from hf_gns.kernels.norm_triton_op import norm_backward_traceable

        dx, grads, sq = norm_backward_traceable(dy, x, weight, mean, rstd, has_bias, rms, 0.0, False, True)
        return dx, grads[0], (grads[1] if has_bias else None), sq
    return norm_launch.norm_backward_triton(dy, x, weight, mean, rstd, has_bias, rms, 0.0, False)


def test_backward_config_reads_tiles_with_and_without_options(backward_tile):
    device = torch.device("cpu")
    backward_tile((2, 4, 1))
    block_m, block_d, num_warps, rows_per_chunk, n_chunks, options = norm_triton.backward_config(
        D, B, R, device
    )
    assert (block_m, block_d, num_warps, options) == (2, BLOCK_D, 4, BackwardOptions())
    assert rows_per_chunk == 4 and n_chunks == 10 and R % rows_per_chunk  # ragged last chunk
    backward_tile((2, 4, 1, VARIANTS["all"]))
    assert norm_triton.backward_config(D, B, R, device)[-1] == VARIANTS["all"]
    assert list(VARIANTS["all"].constexprs()) == ["ONE_REDUCTION", "PREFETCH", "LOOP_STAGES", "EVICT_FIRST"]
    with pytest.raises(ValueError):
        BackwardOptions(prefetch=True, loop_stages=2)


_DEFAULTS: dict[str, tuple] = {}  # kind: the default kernel's outputs at tile (2, 4, 1)


@needs_triton
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_gives_the_default_numbers(backward_tile, kind, variant):
    rms, has_bias = KINDS[kind]
    inputs = _inputs(rms, has_bias)
    if kind not in _DEFAULTS:
        backward_tile((2, 4, 1))
        _DEFAULTS[kind] = _backward(inputs, rms, has_bias)
    expected = _DEFAULTS[kind]
    backward_tile((2, 4, 1, VARIANTS[variant]))
    got = _backward(inputs, rms, has_bias)
    bwd = next(iter(norm_launch._FORWARD_PLANS.values())).backward_plans
    constexprs = next(iter(bwd.values())).bwd.constexprs  # the plan launches the variant
    assert {k: constexprs[k] for k in VARIANTS[variant].constexprs()} == VARIANTS[variant].constexprs()
    names = ("dx", "dw", "db", "sq_norms")
    for name, a, b in zip(names, got, expected, strict=True):
        if b is None:
            assert a is None, name
        elif VARIANTS[variant].one_reduction and not rms:  # other sums: fp32 rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name
    # and the reference's numbers (fp64), as the default's tests check them
    dy, x, weight, mean, rstd = inputs
    ref = norm_backward_reference(dy.double(), x.double(), weight.double(), mean.double(), rstd.double(),
                                  has_bias, rms, 0.0, False)  # fmt: skip
    for name, a, b in zip(names, got, ref, strict=True):
        if b is not None:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4, msg=name)


@needs_triton
@pytest.mark.parametrize("block_m", [1, 4])
def test_prefetch_across_tiles_and_a_ragged_tile(backward_tile, block_m):
    """BLOCK_M = 1 (a chunk of 3 rows, the last of 1) and 4 (chunks of 8 rows, the last ending mid-tile)."""
    rms, has_bias = KINDS["layernorm"]
    inputs = _inputs(rms, has_bias)
    backward_tile((block_m, 4, 1))
    expected = _backward(inputs, rms, has_bias)
    backward_tile((block_m, 4, 1, BackwardOptions(prefetch=True, evict_first=True)))
    for a, b in zip(_backward(inputs, rms, has_bias), expected, strict=True):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_compiled_path_launches_the_variant(backward_tile, kind):
    """`norm_triton_op`'s launcher (what torch.compile runs) reads the same options as the eager one."""
    rms, has_bias = KINDS[kind]
    inputs = _inputs(rms, has_bias)
    backward_tile((2, 4, 1, VARIANTS["all"]))
    eager = _backward(inputs, rms, has_bias)
    compiled = _backward(inputs, rms, has_bias, compiled=True)
    for a, b in zip(compiled, eager, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "options",
    [*VARIANTS.values(), BackwardOptions(loop_stages=3), BackwardOptions(one_reduction=True, loop_stages=3)],
    ids=[*VARIANTS, "loop_stages_3", "one_reduction_loop_stages_3"],
)
@pytest.mark.parametrize("width", [768, 4096])
def test_gpu_variant_gives_the_default_numbers(backward_tile, monkeypatch, kind, options, width):
    """On the GPU (Triton's pipeliner, cp.async, eviction hints compiled for real): the default's
    numbers, bitwise unless one_reduction; and the same bits twice (deterministic)."""
    rms, has_bias = KINDS[kind]
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(4, 301, width, device="cuda", generator=gen, dtype=torch.bfloat16)
    dy = torch.randn(4, 301, width, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(width, device="cuda", generator=gen)).bfloat16()
    bias = 0.1 * torch.randn(width, device="cuda", generator=gen).bfloat16() if has_bias else None
    _, mean, rstd = norm_launch.norm_forward_triton(x, weight, bias, 1e-5, rms, 0.0, False, x.dtype)
    block_d = norm_triton.triton.next_power_of_2(width)

    def run(tile):
        monkeypatch.setitem(norm_triton.BACKWARD_TILES, block_d, tile)
        norm_triton.backward_config.cache_clear()
        norm_launch.clear_plans()
        return norm_launch.norm_backward_triton(dy, x, weight, mean, rstd, has_bias, rms, 0.0, False)

    block_m = 2 if width <= 1024 else 1
    expected = run((block_m, 4, 2))
    got, again = run((block_m, 4, 2, options)), run((block_m, 4, 2, options))
    for a, b, c in zip(got, expected, again, strict=True):
        if b is None:
            continue
        assert torch.equal(a, c)  # deterministic
        if options.one_reduction and not rms:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(a, b)


class _Properties:
    def __init__(self, optin: int):
        self.shared_memory_per_block_optin = optin
        self.multi_processor_count = 132


@pytest.mark.parametrize(("optin_kb", "tuned"), [(227, True), (163, False), (99, False)])
def test_tuned_backward_tiles_apply_only_with_the_tuning_gpus_shared_memory(monkeypatch, optin_kb, tuned):
    """BACKWARD_TILES (tuned on an H200: up to 3 stages of x and dy rows in shared memory) apply on a
    GPU with the H200's shared memory a block; elsewhere the rules, without loop stages."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _Properties(optin_kb * 1024))
    monkeypatch.setattr(norm_triton, "_multiprocessor_count", lambda index: 132)
    norm_triton.backward_config.cache_clear()
    try:
        config = norm_triton.backward_config(4096, 8, 2048, torch.device("cuda", 0))
    finally:
        norm_triton.backward_config.cache_clear()
    tile = norm_triton.BACKWARD_TILES[4096]
    if tuned:
        assert (config[0], config[2], config[5]) == (tile[0], tile[1], tile[3])
        assert config[5].loop_stages == 3
    else:
        assert config[5] == norm_triton.DEFAULT_BACKWARD_OPTIONS
        assert (config[0], config[2]) == (1, 8)  # the rules: 4096 // 4096 rows, 1 * 4096 // 512 warps
