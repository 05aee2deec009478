"""In-place merge kernels (kernels/merge.py) against an fp64 reference.

Tolerance: the kernel accumulates in fp32 and rounds once, so every merged element lies within one ulp (of the
weight dtype) of the fp64 result rounded to that dtype, plus the fp32 accumulation error of the sum of
``rank + 1`` terms, bounded by ``(rank + 2) * 2**-24 * (|W| + sum |s| |B| |A|)``. That second term only matters
where the terms cancel (results near zero) or for fp32 weights; PEFT's double rounding in bf16 misses the
one-ulp bound everywhere, not just there.
"""

import pytest
import torch

from adapter_engine.kernels import (
    INTERPRET,
    merge_lora_,
    merge_lora_reference_,
    scale_ia3_,
    unmerge_lora_,
    use_triton,
)

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers around ``values`` (flushed to the smallest normal spacing near zero)."""
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(values.double().abs().clamp_min(finfo.tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def fp64_merge(weight, pairs, fan_in_fan_out=False):
    """The exact merge in fp64 and the bound on fp32 accumulation error (see the module docstring)."""
    merged, magnitude, rank = weight.double(), weight.double().abs(), 0
    for a, b, s in pairs:
        delta = s * (b.double() @ a.double())
        size = abs(s) * (b.double().abs() @ a.double().abs())
        merged += delta.t() if fan_in_fan_out else delta
        magnitude += size.t() if fan_in_fan_out else size
        rank += a.shape[0]
    return merged, (rank + 2) * 2.0**-24 * magnitude


def assert_within_one_ulp(result: torch.Tensor, expected):
    exact64, accumulation_bound = expected if isinstance(expected, tuple) else (expected, 0.0)
    rounded = exact64.to(result.dtype)
    err = (result.double() - rounded.double()).abs()
    bound = ulp(rounded, result.dtype) + accumulation_bound
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error of {worst:.2f} x (1 ulp + fp32 accumulation bound) against the fp64 result"


def make_adapter(out_f, in_f, rank, dtype, device="cpu", magnitude=0.5):
    a = (torch.randn(rank, in_f, device=device) * magnitude).to(dtype)
    b = (torch.randn(out_f, rank, device=device) * magnitude).to(dtype)
    return a, b


def test_cpu_tier_runs_the_triton_kernel():
    # Without the interpreter the CPU tier would compare the reference with itself.
    assert INTERPRET and use_triton(torch.empty(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (61, 97), (130, 67)])
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_merge_one_adapter_is_correctly_rounded(dtype, shape, rank):
    weight = torch.randn(shape).to(dtype)
    a, b = make_adapter(*shape, rank, dtype)
    expected = fp64_merge(weight, [(a, b, 0.75)])
    out = weight.clone()
    assert merge_lora_(out, a, b, 0.75) is out
    assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_several_adapters_in_one_pass(dtype):
    shape = (45, 83)
    adapters = [make_adapter(*shape, r, dtype) for r in (1, 8, 64, 3)]
    scales = [0.5, -1.25, 2.0, 0.125]
    weight = torch.randn(shape).to(dtype)
    expected = fp64_merge(weight, [(a, b, s) for (a, b), s in zip(adapters, scales)])
    out = weight.clone()
    merge_lora_(out, [a for a, _ in adapters], [b for _, b in adapters], scales)
    assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference_twin(dtype):
    weight = torch.randn(33, 70).to(dtype)
    a, b = make_adapter(33, 70, 8, dtype)
    kernel, reference = weight.clone(), weight.clone()
    merge_lora_(kernel, a, b, 2.0)
    merge_lora_reference_(reference, a, b, 2.0)
    _, accumulation_bound = fp64_merge(weight, [(a, b, 2.0)])
    # Both are within (1 ulp + accumulation) of the exact result, hence within twice that of each other.
    assert_within_one_ulp(kernel, (reference.double(), ulp(reference, dtype) + 2 * accumulation_bound))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_restores_within_one_ulp(dtype):
    weight = torch.randn(50, 29).to(dtype)
    adapters = [make_adapter(50, 29, r, dtype) for r in (8, 2)]
    out = weight.clone()
    lora_a, lora_b, scales = [a for a, _ in adapters], [b for _, b in adapters], [0.3, 1.5]
    merge_lora_(out, lora_a, lora_b, scales)
    assert not torch.equal(out, weight)
    merged = out.clone()
    unmerge_lora_(out, lora_a, lora_b, scales)
    # Two roundings (merge, unmerge): one ulp of the merged value plus one of the original, plus accumulation.
    _, accumulation_bound = fp64_merge(weight, [(a, b, s) for a, b, s in zip(lora_a, lora_b, scales)])
    assert_within_one_ulp(out, (weight.double(), ulp(merged, dtype) + 2 * accumulation_bound))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fan_in_fan_out_weight(dtype):
    out_f, in_f = 31, 18
    conv1d_weight = torch.randn(in_f, out_f).to(dtype)  # GPT-2 Conv1D stores (in, out)
    a, b = make_adapter(out_f, in_f, 8, dtype)
    expected = fp64_merge(conv1d_weight, [(a, b, 0.5)], fan_in_fan_out=True)
    out = conv1d_weight.clone()
    merge_lora_(out, a, b, 0.5, fan_in_fan_out=True)
    assert_within_one_ulp(out, expected)


def test_strided_view_is_merged_and_neighbours_untouched():
    storage = torch.randn(40, 90)
    view = storage[3:36:2, 5:80]  # offset, row step 2: not contiguous
    a, b = make_adapter(view.shape[0], view.shape[1], 8, torch.float32)
    expected = fp64_merge(view, [(a, b, 1.0)])
    before = storage.clone()
    merge_lora_(view, a, b, 1.0)
    assert_within_one_ulp(view, expected)
    untouched = torch.ones_like(storage, dtype=torch.bool)
    untouched[3:36:2, 5:80] = False
    assert torch.equal(storage[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_ia3_scaling_and_inverse(dtype, dim):
    weight = torch.randn(23, 41).to(dtype)
    vec = (torch.rand(weight.shape[dim]) + 0.5).to(dtype)
    out = weight.clone()
    scale_ia3_(out, vec, dim=dim)
    shape = (-1, 1) if dim == 0 else (1, -1)
    assert_within_one_ulp(out, weight.double() * vec.double().reshape(shape))
    scale_ia3_(out, vec, dim=dim, inverse=True)
    torch.testing.assert_close(out.float(), weight.float(), rtol=2 * 2.0 ** -MANTISSA_BITS[dtype], atol=0)


@pytest.mark.parametrize("layout", ["strided", "expanded", "column"])
@pytest.mark.parametrize("dim", [0, 1])
def test_ia3_vector_of_any_stride(layout, dim):
    """The IA3 vector may be a strided view, an expanded (stride 0) one, or PEFT's (n, 1) column of a wider
    tensor: the kernel reads it through its stride."""
    weight = torch.randn(19, 37)
    n = weight.shape[dim]
    if layout == "strided":
        vec = (torch.rand(2 * n) + 0.5)[::2]
    elif layout == "expanded":
        vec = (torch.rand(1) + 0.5).expand(n)
    else:
        vec = (torch.rand(n, 3) + 0.5)[:, 1:2]
    out = weight.clone()
    scale_ia3_(out, vec, dim=dim)
    shape = (-1, 1) if dim == 0 else (1, -1)
    assert_within_one_ulp(out, weight.double() * vec.double().reshape(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_safe_merge_refuses_overflow_and_leaves_weight_untouched(dtype):
    weight = torch.randn(20, 30).to(dtype)
    a, b = make_adapter(20, 30, 4, dtype)
    b[3, :] = torch.finfo(dtype).max / 2  # the product overflows
    out = weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora_(out, a, b, 4.0, safe=True)
    assert torch.equal(out, weight)


def test_safe_merge_refuses_nan_adapter_and_ia3():
    weight = torch.randn(9, 11)
    a, b = make_adapter(9, 11, 2, torch.float32)
    a[1, 4] = float("nan")
    out = weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora_(out, a, b, 1.0, safe=True)
    vec = torch.rand(11) + 0.5
    vec[2] = 0.0
    with pytest.raises(ValueError, match="non-finite"):
        scale_ia3_(out, vec, dim=1, inverse=True, safe=True)
    assert torch.equal(out, weight)


def test_unsafe_merge_writes_what_it_computes():
    weight = torch.randn(5, 6)
    a, b = make_adapter(5, 6, 2, torch.float32)
    a[0, 0] = float("inf")
    merge_lora_(weight, a, b, 1.0)
    assert not torch.isfinite(weight).all()


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("in_features", ValueError, r"lora_A \(4, 17\)"),
        ("out_features", ValueError, r"lora_B \(12, 4\)"),
        ("rank", ValueError, r"lora_A \(4, 16\) and lora_B \(10, 3\)"),
        ("lengths", ValueError, "same non-zero length"),
        ("int_weight", TypeError, "torch.int32"),
        ("int_adapter", TypeError, r"lora_A\[0\].*torch.int64"),
        ("device", ValueError, "meta"),
        ("weight_3d", ValueError, r"\(2, 10, 16\)"),
        ("nan_scale", ValueError, "finite"),
        ("huge_scale", ValueError, "within fp32 range"),
        # an expanded weight: the kernel's programs raced on its shared rows (each kept one row's result)
        ("expanded_weight", ValueError, r"weight \(10, 16\) is updated in place but its elements share memory"),
    ],
)
def test_bad_input_is_rejected_and_nothing_written(case, error, message):
    weight = torch.randn(10, 16)
    a, b = make_adapter(10, 16, 4, torch.float32)
    scale = 1.0
    if case == "in_features":
        a = torch.randn(4, 17)
    elif case == "out_features":
        b = torch.randn(12, 4)
    elif case == "rank":
        b = torch.randn(10, 3)
    elif case == "lengths":
        a, b, scale = [a, a], [b], [1.0, 1.0]
    elif case == "int_weight":
        weight = torch.randint(0, 5, (10, 16), dtype=torch.int32)
    elif case == "int_adapter":
        a = torch.randint(0, 5, (4, 16))
    elif case == "device":
        a = a.to("meta")
    elif case == "weight_3d":
        weight = torch.randn(2, 10, 16)
    elif case == "nan_scale":
        scale = float("nan")
    elif case == "huge_scale":
        scale = 1e39  # finite in Python, infinite in the fp32 the kernel computes in
    elif case == "expanded_weight":
        weight = torch.randn(1, 16).expand(10, 16)
    before = weight.clone()
    with pytest.raises(error, match=message):
        merge_lora_(weight, a, b, scale)
    assert torch.equal(weight, before)


def test_ia3_bad_input():
    weight = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"7 elements.*\(6, 8\)"):
        scale_ia3_(weight, torch.rand(7), dim=1)
    with pytest.raises(ValueError, match="dim must be 0"):
        scale_ia3_(weight, torch.rand(6), dim=2)
    row = torch.randn(1, 8)
    before = row.clone()
    with pytest.raises(ValueError, match=r"weight \(6, 8\) is updated in place but its elements share memory"):
        scale_ia3_(row.expand(6, 8), torch.rand(6) + 0.5, dim=0)  # (the kernel scaled the one row by a random l_i)
    assert torch.equal(row, before)


# ----------------------------------------------------------------------------------------------- CUDA tier
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (4099, 1031)])
def test_cuda_bf16_merge_is_correctly_rounded(shape):
    weight = torch.randn(shape, device="cuda").to(torch.bfloat16)
    adapters = [make_adapter(*shape, 16, torch.bfloat16, device="cuda", magnitude=0.05) for _ in range(4)]
    scales = [2.0, 0.5, 1.0, -1.0]
    for n in (1, 4):
        used = adapters[:n]
        expected = fp64_merge(weight, [(a, b, s) for (a, b), s in zip(used, scales)])
        out = weight.clone()
        merge_lora_(out, [a for a, _ in used], [b for _, b in used], scales[:n])
        assert_within_one_ulp(out, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mixed_ranks_and_scales_are_correctly_rounded(dtype):
    """Ranks that break the 16-byte factor layout (1, 7) beside aligned ones, each adapter with its own scale:
    the generic gather and the per-rank scale path (bf16 hi/lo halves, fp16 fp32 dots)."""
    shape = (4096, 1000)
    weight = torch.randn(shape, device="cuda").to(dtype)
    adapters = [make_adapter(*shape, r, dtype, device="cuda", magnitude=0.05) for r in (1, 7, 64, 16)]
    scales = [3.0, -0.75, 0.3, 1.0]
    out = weight.clone()
    merge_lora_(out, [a for a, _ in adapters], [b for _, b in adapters], scales)
    assert_within_one_ulp(out, fp64_merge(weight, [(a, b, s) for (a, b), s in zip(adapters, scales)]))


@pytest.mark.cuda
def test_cuda_fp32_and_fp16_merge_and_safe_mode():
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(2048, 3001, device="cuda").to(dtype)
        a, b = make_adapter(2048, 3001, 64, dtype, device="cuda", magnitude=0.1)
        out = weight.clone()
        merge_lora_(out, a, b, 0.5, safe=True)
        assert_within_one_ulp(out, fp64_merge(weight, [(a, b, 0.5)]))
    b[0, 0] = float("inf")
    before = out.clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora_(out, a, b, 0.5, safe=True)
    assert torch.equal(out, before)


# ----------------------------------------------------------------------------------------------- many weights
def _model_like_weights(dtype=torch.float32):
    shapes = [(24, 40), (40, 24), (1, 33), (67, 130)]
    weights = [torch.randn(s).to(dtype) for s in shapes]
    ranks = [[8], [1, 16], [64, 2, 3], [4]]
    adapters = [[make_adapter(*s, r, dtype) for r in rs] for s, rs in zip(shapes, ranks)]
    scales = [[0.5 * (j + 1) for j in range(len(rs))] for rs in ranks]
    return weights, adapters, scales


def test_merge_many_weights_in_one_call():
    from adapter_engine.kernels import merge_lora_many_

    weights, adapters, scales = _model_like_weights()
    expected = [fp64_merge(w, [(a, b, s) for (a, b), s in zip(ad, sc)]) for w, ad, sc in zip(weights, adapters, scales)]
    outs = [w.clone() for w in weights]
    merge_lora_many_(outs, [[a for a, _ in ad] for ad in adapters], [[b for _, b in ad] for ad in adapters], scales)
    for out, exp in zip(outs, expected):
        assert_within_one_ulp(out, exp)


def test_merge_many_mixed_dtypes_layouts_and_unmerge():
    from adapter_engine.kernels import merge_lora_many_, unmerge_lora_many_

    w16 = torch.randn(30, 20).to(torch.float16)
    conv = torch.randn(20, 30)  # fan_in_fan_out: (in, out)
    (a16, b16), (a32, b32) = make_adapter(30, 20, 8, torch.float16), make_adapter(30, 20, 8, torch.float32)
    outs = [w16.clone(), conv.clone()]
    args = ([a16, a32], [b16, b32], [1.5, -0.5])
    merge_lora_many_(outs, *args, fan_in_fan_out=[False, True])
    assert_within_one_ulp(outs[0], fp64_merge(w16, [(a16, b16, 1.5)]))
    assert_within_one_ulp(outs[1], fp64_merge(conv, [(a32, b32, -0.5)], fan_in_fan_out=True))
    unmerge_lora_many_(outs, *args, fan_in_fan_out=[False, True])
    torch.testing.assert_close(outs[0], w16, rtol=2e-3, atol=2e-3)  # two fp16 roundings
    torch.testing.assert_close(outs[1], conv, rtol=1e-5, atol=1e-5)


def test_safe_merge_many_is_all_or_nothing():
    from adapter_engine.kernels import merge_lora_many_

    weights, adapters, scales = _model_like_weights(torch.float16)
    adapters[-1][0][1][0, 0] = 6e4  # only the last weight overflows
    outs = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="every weight was left unchanged"):
        merge_lora_many_(
            outs,
            [[a for a, _ in ad] for ad in adapters],
            [[b for _, b in ad] for ad in adapters],
            [[s * 100 for s in sc] for sc in scales],
            safe=True,
        )
    for out, weight in zip(outs, weights):
        assert torch.equal(out, weight)


@pytest.mark.parametrize("overflow", [None, "kernel", "twin"])
def test_merge_many_of_weights_on_two_devices_merges_each_where_it_lives(monkeypatch, overflow):
    """A model with offloaded layers gives merge_lora_many_ weights that the kernel takes and weights that only the
    torch twin can (here: the odd ones, by a stand-in for the device test). The first weight's device used to choose
    for all: a CPU weight went to the GPU kernel and failed part way through the model."""
    import adapter_engine.kernels.merge as merge_module

    weights, adapters, scales = _model_like_weights(torch.float16)
    outs = [w.clone() for w in weights]
    on_kernel = {outs[0].data_ptr(), outs[2].data_ptr()}
    monkeypatch.setattr(merge_module, "use_triton", lambda t: t.data_ptr() in on_kernel)
    planned = []
    real_plan = merge_module.LoraMergePlan
    monkeypatch.setattr(
        merge_module, "LoraMergePlan", lambda jobs: planned.extend(j[0] for j in jobs) or real_plan(jobs)
    )
    if overflow is not None:  # one weight of either kind would overflow fp16: nothing is written, anywhere
        adapters[0 if overflow == "kernel" else 1][0][1][0, 0] = 6e4
    args = ([[a for a, _ in ad] for ad in adapters], [[b for _, b in ad] for ad in adapters])
    big = [[s * 100 for s in sc] for sc in scales]
    if overflow is not None:
        with pytest.raises(ValueError, match="every weight was left unchanged"):
            merge_module.merge_lora_many_(outs, *args, big, safe=True)
        assert all(torch.equal(out, weight) for out, weight in zip(outs, weights))
        return
    merge_module.merge_lora_many_(outs, *args, scales, safe=True)
    assert {w.data_ptr() for w in planned} == on_kernel
    for out, weight, ad, sc in zip(outs, weights, adapters, scales):
        assert_within_one_ulp(out, fp64_merge(weight, [(a, b, s) for (a, b), s in zip(ad, sc)]))


def test_merge_many_names_the_bad_weight():
    from adapter_engine.kernels import merge_lora_many_

    weights, adapters, scales = _model_like_weights()
    lora_a = [[a for a, _ in ad] for ad in adapters]
    lora_a[2][1] = torch.randn(2, 34)
    with pytest.raises(ValueError, match=r"weights\[2\]: adapter 1: expected lora_A \(r, 33\)"):
        merge_lora_many_(weights, lora_a, [[b for _, b in ad] for ad in adapters], scales)
    with pytest.raises(ValueError, match="one entry per weight"):
        merge_lora_many_(weights, lora_a[:2], [[b for _, b in ad] for ad in adapters], scales)


@pytest.mark.parametrize("twin", [False, True], ids=["launcher", "torch-twin"])
@pytest.mark.parametrize("alias", ["same tensor", "view", "overlapping rows"])
def test_merge_many_refuses_weights_that_share_memory_and_writes_nothing(alias, twin):
    """A weight listed twice (tied weights) or overlapping views of one storage: the twin would keep the last merge
    only, the kernel would race on a GPU. Refused, naming both indices, before anything is written; disjoint row
    blocks of one tensor (a fused QKV weight split in three) are fine."""
    from adapter_engine.kernels import merge_lora_many_, unmerge_lora_many_
    from adapter_engine.kernels.merge import merge_lora_many_reference_

    merge = merge_lora_many_reference_ if twin else merge_lora_many_
    storage = torch.randn(12, 6)
    first = storage[:8]
    second = {"same tensor": first, "view": first.view(8, 6), "overlapping rows": storage[4:]}[alias]
    other = torch.randn(3, 6)
    weights = [first, other, second]
    ads = [make_adapter(w.shape[0], 6, 2, torch.float32) for w in weights]
    args = ([[a] for a, _ in ads], [[b] for _, b in ads], [[1.0]] * 3)
    before = storage.clone()
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[2\] share memory"):
        merge(weights, *args)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[2\] share memory"):
        unmerge_lora_many_(weights, *args)
    assert torch.equal(storage, before)
    # disjoint row blocks of one storage merge as separate weights
    blocks = [storage[:4], storage[4:8], storage[8:]]
    ads = [make_adapter(4, 6, 2, torch.float32) for _ in blocks]
    merge(blocks, [[a] for a, _ in ads], [[b] for _, b in ads], [[0.5]] * 3)
    for block, start, (a, b) in zip(blocks, (0, 4, 8), ads, strict=True):
        assert_within_one_ulp(block, fp64_merge(before[start : start + 4], [(a, b, 0.5)]))


def test_a_zero_dim_tensor_scale_is_a_number():
    """``lora_linear`` takes a 0-d tensor scale: so do the merges (and unmerges); another tensor is named."""
    weight = torch.randn(7, 9)
    a, b = make_adapter(7, 9, 3, torch.float32)
    out = weight.clone()
    merge_lora_(out, a, b, torch.tensor(0.75))
    assert_within_one_ulp(out, fp64_merge(weight, [(a, b, 0.75)]))
    unmerge_lora_(out, a, b, torch.tensor(0.75))
    torch.testing.assert_close(out, weight, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"scale must be a finite number \(or 0-d tensor\).*got tensor\(\[1., 2.\]\)"):
        merge_lora_(out, a, b, torch.tensor([1.0, 2.0]))


def test_bound_rejects_double_rounding():
    # The one-ulp check can fail: PEFT's order (delta rounded to bf16, then added and rounded) violates it.
    weight = torch.randn(61, 97).to(torch.bfloat16)
    a, b = make_adapter(61, 97, 16, torch.bfloat16)
    twice = (weight.float() + ((b.float() @ a.float()) * 2.0).to(torch.bfloat16).float()).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="fp32 accumulation bound"):
        assert_within_one_ulp(twice, fp64_merge(weight, [(a, b, 2.0)]))


@pytest.mark.cuda
def test_cuda_merge_many_llama_layer():
    from adapter_engine.kernels import merge_lora_many_

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    weights = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    adapters = [[make_adapter(*s, 16, torch.bfloat16, "cuda", 0.05) for _ in range(4)] for s in shapes]
    outs = [w.clone() for w in weights]
    merge_lora_many_(
        outs,
        [[a for a, _ in ad] for ad in adapters],
        [[b for _, b in ad] for ad in adapters],
        [[2.0, 1.0, 0.5, -1.0]] * len(shapes),
        safe=True,
    )
    for out, w, ad in zip(outs, weights, adapters):
        assert_within_one_ulp(out, fp64_merge(w, [(a, b, s) for (a, b), s in zip(ad, [2.0, 1.0, 0.5, -1.0])]))


def test_prepared_plan_merges_and_unmerges_repeatedly():
    from adapter_engine.kernels import prepare_lora_merge

    weights, adapters, scales = _model_like_weights()
    outs = [w.clone() for w in weights]
    lora_a = [[a for a, _ in ad] for ad in adapters]
    lora_b = [[b for _, b in ad] for ad in adapters]
    plan = prepare_lora_merge(outs, lora_a, lora_b, scales)
    for _ in range(3):
        plan.merge_()
        plan.unmerge_()
    for out, weight in zip(outs, weights):
        torch.testing.assert_close(out, weight, rtol=1e-5, atol=1e-5)
    lora_b[0][0].mul_(2)  # the plan points at the factors: in-place updates are seen
    plan.merge_()
    expected = fp64_merge(weights[0], [(lora_a[0][0], lora_b[0][0], scales[0][0])])
    assert_within_one_ulp(outs[0], (expected[0], expected[1] + 4 * ulp(expected[0], torch.float32)))


def test_prepared_plan_sees_in_place_updates_of_factors_of_mixed_dtypes():
    """A weight whose adapters' factors mix dtypes (fp32 masters beside a 16-bit adapter) merges fp32 copies of the
    16-bit ones. The plan made them once, so it merged the 16-bit factors as they were when it was prepared, not as
    updated in place since (the plan's documented contract); it now copies them again before each merge."""
    from adapter_engine.kernels import prepare_lora_merge

    weight = torch.randn(6, 10)
    a32, b32 = torch.randn(2, 10), torch.randn(6, 2)
    a16, b16 = torch.randn(3, 10).half(), torch.randn(6, 3).half()
    out = weight.clone()
    plan = prepare_lora_merge([out], [[a32, a16]], [[b32, b16]], [[1.0, 0.5]])
    a16.mul_(2)
    b32.mul_(3)
    plan.merge_()
    assert_within_one_ulp(out, fp64_merge(weight, [(a32, b32, 1.0), (a16, b16, 0.5)]))
    plan.unmerge_()
    torch.testing.assert_close(out, weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cancel", [False, True], ids=["random", "cancelling"])
def test_per_adapter_scales_with_16_bit_dots(monkeypatch, cancel):
    """The GPU's path for adapters with different scales: each rank row of A scaled in fp32, split into three
    16-bit parts, 16-bit dots (exact products), fp32 sum. The interpreter runs it with fp16 factors (its fp16 dots
    are sound, its bf16 arithmetic is not). ``cancelling``: W is about minus the update, so the result is small
    and only a split carrying all 24 bits of the scaled A stays within the fp32 bound."""
    from adapter_engine.kernels import merge as merge_module

    monkeypatch.setattr(merge_module, "_fp32_dots", lambda launch: False)
    torch.manual_seed(3)
    shape, ranks, scales = (67, 130), (1, 8, 16), [3.0, -0.75, 0.3]
    adapters = [make_adapter(*shape, r, torch.float16) for r in ranks]
    weight = torch.randn(shape).to(torch.float16)
    if cancel:
        update = sum(s * (b.double() @ a.double()) for (a, b), s in zip(adapters, scales))
        weight = (-update * (1 + 2**-9) + torch.randn(shape).double() * 1e-3).to(torch.float16)
    expected = fp64_merge(weight, [(a, b, s) for (a, b), s in zip(adapters, scales)])
    out = weight.clone()
    merge_lora_(out, [a for a, _ in adapters], [b for _, b in adapters], scales)
    assert_within_one_ulp(out, expected)


SWEPT_TILES = [(16, 32, 3, 4, 3), (16, 32, 3, 4, 0), (32, 64, 2, 4, 2)]


@pytest.mark.parametrize("tiles", SWEPT_TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ranks", [(8, 16), (8, 3, 1)], ids=["aligned-ranks", "odd-ranks"])
def test_sweep_tiles_merge_correctly(monkeypatch, tiles, dtype, ranks):
    """The tile variants bench/tune_merge.py sweeps on a GPU, including several row tiles per program with the next
    pipelined row-tile loop (W_STAGES), on shapes whose last row group and column strip are partial; "aligned-ranks"
    takes the vectorised path (F_ALIGNED: every rank a multiple of a 16-byte vector, aligned rows)."""
    from adapter_engine.kernels import merge as merge_module

    monkeypatch.setattr(merge_module, "TILE_OVERRIDE", tiles)
    launches, run = [], merge_module._run
    monkeypatch.setattr(merge_module, "_run", lambda launch, *a, **k: launches.append(launch) or run(launch, *a, **k))
    aligned = ranks == (8, 16)
    shape = (101, 96 if aligned else 97)  # 101 rows: 48- and 64-row groups end part-way; 96 / 97: partial strips
    for scales in ([0.5] * len(ranks), [0.5, -1.25, 2.0][: len(ranks)]):
        adapters = [make_adapter(*shape, r, dtype) for r in ranks]
        weight = torch.randn(shape).to(dtype)
        expected = fp64_merge(weight, [(a, b, s) for (a, b), s in zip(adapters, scales)])
        out = weight.clone()
        merge_lora_(out, [a for a, _ in adapters], [b for _, b in adapters], scales)
        assert_within_one_ulp(out, expected)
    assert {launch["f_aligned"] and launch["w_aligned"] for launch in launches} == {aligned}


@pytest.mark.cuda
@pytest.mark.parametrize("tiles", [(64, 128, 4, 4, 2), (64, 128, 4, 4, 3), (64, 64, 4, 4, 3), (32, 128, 4, 4, 3)])
@pytest.mark.parametrize("uniform", [True, False], ids=["one-scale", "per-adapter-scales"])
def test_cuda_pipelined_tiles_are_correctly_rounded(monkeypatch, tiles, uniform):
    """The W_STAGES candidates of bench/tune_merge.py on the GPU (the row-tile loop software-pipelined: W tiles
    loaded ahead of the tiles being stored): four aligned bf16 adapters (R = 64) on a weight whose row groups end
    part-way, correctly rounded."""
    from adapter_engine.kernels import merge as merge_module

    monkeypatch.setattr(merge_module, "TILE_OVERRIDE", tiles)
    shape, scales = (1000, 512), [0.5] * 4 if uniform else [0.5, -1.25, 2.0, 0.125]
    adapters = [make_adapter(*shape, 16, torch.bfloat16, device="cuda") for _ in range(4)]
    weight = torch.randn(shape, device="cuda").to(torch.bfloat16)
    expected = fp64_merge(weight, [(a, b, s) for (a, b), s in zip(adapters, scales)])
    merge_lora_(weight, [a for a, _ in adapters], [b for _, b in adapters], scales)
    assert_within_one_ulp(weight, expected)
