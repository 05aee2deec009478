"""add_layer_norm (kernels/add_layer_norm.py): the fused add + LayerNorm of the level-by-level stack path, against
its torch twin and the two torch ops it replaces."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from adapter_engine.kernels import INTERPRET, use_triton
from adapter_engine.kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference

# Same rounding points as the torch ops (the sum stored in the output dtype, one rounding of the LN output): the
# outputs differ by the fp32 reduction order of the moments, and in the interpreter's bf16 by its truncating
# stores, so by up to 2 ulps of the half dtypes.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _stored_sum(a, b, dtype):
    """a + b as the kernel stores it: the exact fp32 sum rounded to nearest, as torch's add does; the interpreter
    truncates fp32 to bf16 instead (checked on its own stores), so there its bf16 stores are the truncated sum."""
    exact = a.float() + b.float()
    if INTERPRET and dtype == torch.bfloat16:
        return (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return exact.to(dtype)


def _inputs(m, hidden, dtype, strided=False):
    a = torch.randn(m, hidden + 7 if strided else hidden, dtype=dtype)
    b = torch.randn(m, hidden, dtype=dtype) * 2 + 0.5  # a row mean away from zero
    a = a[:, 3 : 3 + hidden] if strided else a
    w = 1 + 0.2 * torch.randn(hidden)
    bias = 0.1 * torch.randn(hidden)
    return a, b, w, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, hidden", [(37, 40), (1, 769), (5, 1), (64, 384)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-a"])
def test_matches_the_torch_ops(dtype, m, hidden, strided):
    a, b, w, bias = _inputs(m, hidden, dtype, strided)
    stats = torch.full((2, m), float("nan"))
    s, x = add_layer_norm(a, b, w, bias, 1e-5, stats=stats)
    assert s.dtype == x.dtype == dtype and s.is_contiguous() and x.is_contiguous()
    assert torch.equal(s, _stored_sum(a, b, dtype))  # one rounding of the exact fp32 sum
    want_x = F.layer_norm(s, (hidden,), w.to(dtype), bias.to(dtype), 1e-5)  # torch's LN of the stored sum
    torch.testing.assert_close(x, want_x, rtol=TOL[dtype], atol=TOL[dtype])
    var, mean = torch.var_mean(s.float(), dim=-1, correction=0)  # the moments of the stored sum
    torch.testing.assert_close(stats[0], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[1], torch.rsqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("write_sum", [True, False])
def test_promotes_mixed_dtypes_and_may_skip_the_sum(write_sum):
    """A bf16 a on an fp32 carry b, summed in fp32 (as ``a.float() + b``); the LN weight rounded to that dtype."""
    a, _, w, bias = _inputs(19, 72, torch.bfloat16)
    b = torch.randn(19, 72)
    s, x = add_layer_norm(a, b, w.to(torch.bfloat16), bias, 1e-12, write_sum=write_sum)
    want_s = a.float() + b
    assert x.dtype == torch.float32
    assert (s is None) != write_sum
    if write_sum:
        torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    want_x = F.layer_norm(want_s, (72,), w.to(torch.bfloat16).float(), bias, 1e-12)
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_three_operands_are_summed_in_fp32_and_rounded_once(dtype):
    """``LN(a + b + c)``: the Houlsby order's residual, up projection and sublayer input (c fp32 here: the result
    dtype follows all three)."""
    a, b, w, bias = _inputs(21, 56, dtype)
    c = torch.randn(21, 56, dtype=dtype)[:, :56]
    s, x = add_layer_norm(a, b, w, bias, 1e-5, c=c)
    exact = a.float() + b.float() + c.float()
    want_s = exact.to(dtype)
    if INTERPRET and dtype == torch.bfloat16:  # (its truncating bf16 conversion, see _stored_sum)
        want_s = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    assert torch.equal(s, want_s)
    torch.testing.assert_close(x, F.layer_norm(s, (56,), w.to(dtype), bias.to(dtype), 1e-5), rtol=TOL[dtype],
                               atol=TOL[dtype])  # fmt: skip
    c32 = torch.randn(21, 56)
    s, _ = add_layer_norm(a, b, w, bias, 1e-5, c=c32)
    assert s.dtype == torch.float32 and torch.equal(s, a.float() + b.float() + c32)


def test_twin_and_kernel_agree_and_empty_batches():
    a, b, w, bias = _inputs(23, 200, torch.float32)
    got = add_layer_norm(a, b, w, bias, 1e-6)
    want = add_layer_norm_reference(a, b, w, bias, 1e-6, torch.float32, True, None)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)
    s, x = add_layer_norm(a[:0], b[:0], w, bias, 1e-6, stats=torch.empty(2, 0))
    assert s.shape == x.shape == (0, 200)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_layer_norm_weight_and_bias_of_any_stride(layout):
    """The LN weight and bias as strided views (every other element) or expanded ones (stride 0, one value each):
    the kernel reads them through their strides."""
    a, b, w, bias = _inputs(11, 40, torch.float32)
    if layout == "strided":
        w, bias = torch.stack([w, w + 5], 1)[:, 0], torch.stack([bias, bias - 5], 1)[:, 0]
    else:
        w, bias = (1 + 0.2 * torch.randn(1)).expand(40), (0.1 * torch.randn(1)).expand(40)
    s, x = add_layer_norm(a, b, w, bias, 1e-5)
    want = F.layer_norm(a + b, (40,), w.contiguous(), bias.contiguous(), 1e-5)
    torch.testing.assert_close(x, want, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_inputs_are_not_written():
    a, b, w, bias = _inputs(9, 48, torch.float16)
    a0, b0 = a.clone(), b.clone()
    add_layer_norm(a, b, w, bias, 1e-5)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_bad_input_names_the_shapes():
    a, b, w, bias = _inputs(4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 16\) and \(4, 15\)"):
        add_layer_norm(a, b[:, :15], w, bias, 1e-5)
    with pytest.raises(ValueError, match=r"\(4, 16\) and \(4, 16\) and \(3, 16\)"):
        add_layer_norm(a, b, w, bias, 1e-5, c=b[:3])
    with pytest.raises(ValueError, match=r"weight \(15,\)"):
        add_layer_norm(a, b, w[:15], bias, 1e-5)
    with pytest.raises(TypeError, match=r"b must be float32, float16 or bfloat16, got torch.int64"):
        add_layer_norm(a, b.long(), w, bias, 1e-5)
    with pytest.raises(ValueError, match=r"stats must be a contiguous fp32 \(2, 4\)"):
        add_layer_norm(a, b, w, bias, 1e-5, stats=torch.empty(2, 5))
    with pytest.raises(TypeError, match="LayerNorm weight and bias as tensors, got NoneType and Tensor"):
        add_layer_norm(a, b, None, bias, 1e-5)
    with pytest.raises(TypeError, match=r"dtype must be float32, float16 or bfloat16 \(or None\), got torch.int32"):
        add_layer_norm(a, b, w, bias, 1e-5, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"a must be float32, float16 or bfloat16, got torch.int32"):
        add_layer_norm(a.int(), b.int(), w, bias, 1e-5)
    with pytest.raises(TypeError, match=r"b must be a float32, float16 or bfloat16 tensor, got list"):
        add_layer_norm(a, b.tolist(), w, bias, 1e-5)


def test_runs_the_kernel_where_triton_runs():
    """Under the interpreter this file checks the Triton kernel itself, not the twin."""
    assert use_triton(torch.randn(2, 8)) == INTERPRET


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 4096])
def test_cuda_bf16_error_no_larger_than_torch_bf16(hidden):
    """4096 rows in bf16: the fused output's error against fp64 is at most plain torch bf16's (add, then LN)."""
    a, b, w, bias = (t.cuda() for t in _inputs(4096, hidden, torch.bfloat16))
    stats = torch.empty(2, 4096, device="cuda")
    s, x = add_layer_norm(a, b, w, bias, 1e-12, stats=stats)
    plain = F.layer_norm(a + b, (hidden,), w.to(torch.bfloat16), bias.to(torch.bfloat16), 1e-12)
    s64 = (a + b).double()  # the rounded sum, as both normalise it
    want = F.layer_norm(s64, (hidden,), w.to(torch.bfloat16).double(), bias.to(torch.bfloat16).double(), 1e-12)
    assert torch.equal(s, a + b)
    assert (x.double() - want).abs().max() <= (plain.double() - want).abs().max() * 1.02 + 1e-6
    torch.testing.assert_close(stats[0], s64.mean(-1).float(), rtol=1e-5, atol=1e-5)


def test_a_recorded_launch_calls_its_compiled_kernel_directly_while_the_tensors_are_aligned_alike(
    monkeypatch, direct_stand_in
):
    """Launches are recorded per geometry (device, constexprs, each tensor's dtype and 16-byte alignment, the
    integer arguments): on a GPU a repeat calls the compiled kernel of the first launch directly, every parameter in
    signature order (here a stand-in binds them back to the parameter names and runs the kernel in the interpreter).
    An a that is 4-byte aligned makes a new key, launched by Triton."""
    aln = importlib.import_module("adapter_engine.kernels.add_layer_norm")  # (the package attribute is the function)
    stand_in, direct = direct_stand_in
    monkeypatch.setattr(aln, "_RECORDED", {})
    a, b, w, bias = _inputs(37, 40, torch.float32)

    def call(a):
        stats = torch.full((2, 37), float("nan"))
        return (*add_layer_norm(a, b, w, bias, 1e-5, stats=stats), stats)

    want = call(a)
    ((key, launch),) = aln._RECORDED.items()
    aln._RECORDED[key] = stand_in(launch, 0)  # (the key holds the alignment: nothing left to check)
    for got, expected in zip(call(a), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert direct == [launch.grid]
    shifted = torch.empty(37 * 40 + 1)[1:].view(37, 40).copy_(a)
    for got, expected in zip(call(shifted), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(direct) == 1 and len(aln._RECORDED) == 2
