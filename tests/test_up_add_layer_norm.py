"""up_add_layer_norm (kernels/up_add_layer_norm.py): a stack level's ``c += act @ up`` and the next ``LN(c)`` in one
launch, against its torch twin and the two torch ops it replaces (``c.addmm_(act, up)``, then the LayerNorm)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from adapter_engine.kernels import INTERPRET
from adapter_engine.kernels.up_add_layer_norm import MAX_HIDDEN, up_add_layer_norm, up_add_layer_norm_reference

# c: one rounding of the same fp32 sum, up to the accumulation order (and, in the interpreter's bf16, its truncating
# stores): a unit in the last place of the half dtypes. x: the LN of that c, two more.
TOL_C = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TOL_X = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(m, k, hidden, dtype, strided=False):
    act = torch.randn(m, k + 5 if strided else k).relu().to(dtype)  # a relu's output, as the levels feed it
    act = act[:, 2 : 2 + k] if strided else act
    up = (torch.randn(k, hidden) * k**-0.5).to(dtype)
    c = (torch.randn(m, hidden) * 2 + 0.5).to(dtype)  # the carry r + y: a row mean away from zero
    if strided:
        c = torch.empty(m, hidden + 3, dtype=dtype)[:, :hidden].copy_(c)
    w, bias = 1 + 0.2 * torch.randn(hidden), 0.1 * torch.randn(hidden)
    return act, up, c, w, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, k, hidden", [(37, 56, 40), (1, 8, 769), (5, 1, 1), (33, 17, 64)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_matches_addmm_then_layer_norm(dtype, m, k, hidden, strided):
    """c updated in place as ``c.addmm_(act, up)`` stores it, and x the LayerNorm of that c (LN weight and bias
    rounded to c's dtype); odd sizes, strided act and c."""
    act, up, c, w, bias = _inputs(m, k, hidden, dtype, strided)
    want_c = (c.double() + act.double() @ up.double()).to(dtype)
    x = up_add_layer_norm(act, up, c, w, bias, 1e-5)
    assert x.dtype == dtype and x.shape == (m, hidden) and x.is_contiguous()
    torch.testing.assert_close(c, want_c, rtol=TOL_C[dtype], atol=TOL_C[dtype])
    want_x = F.layer_norm(c, (hidden,), w.to(dtype), bias.to(dtype), 1e-5)  # of the c it stored
    torch.testing.assert_close(x, want_x, rtol=TOL_X[dtype], atol=TOL_X[dtype])


def test_matches_its_torch_twin_and_leaves_the_factors_alone():
    act, up, c, w, bias = _inputs(21, 24, 96, torch.float32)
    act0, up0, c_twin = act.clone(), up.clone(), c.clone()
    x = up_add_layer_norm(act, up, c, w, bias, 1e-6)
    x_twin = up_add_layer_norm_reference(act, up, c_twin, w, bias, 1e-6)
    torch.testing.assert_close(c, c_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_twin, rtol=1e-5, atol=1e-5)
    assert torch.equal(act, act0) and torch.equal(up, up0)


def test_rows_wider_than_the_kernel_take_the_twin(monkeypatch):
    module = importlib.import_module("adapter_engine.kernels.up_add_layer_norm")
    launched = []
    monkeypatch.setattr(module, "up_add_layer_norm_fwd", lambda *a: launched.append(1))
    act, up, c, w, bias = _inputs(3, 4, MAX_HIDDEN + 1, torch.float32)
    want_c = c + act @ up
    x = up_add_layer_norm(act, up, c, w, bias, 1e-5)
    assert not launched and x.shape == c.shape
    torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-5)
    if INTERPRET:
        up_add_layer_norm(*_inputs(3, 4, MAX_HIDDEN, torch.float32), 1e-5)
        assert launched


def test_zero_rows():
    act, up, c, w, bias = _inputs(0, 8, 32, torch.float16)
    assert up_add_layer_norm(act, up, c, w, bias, 1e-5).shape == (0, 32)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: {**t, "up": t["up"].double()}, "one dtype|float32, float16 or bfloat16"),
        (lambda t: {**t, "act": t["act"].half()}, "one dtype"),
        (lambda t: {**t, "up": t["up"][:-1]}, r"act \(M, K\), up \(K, H\)"),
        (lambda t: {**t, "c": t["c"][:-1]}, r"act \(M, K\), up \(K, H\)"),
        (lambda t: {**t, "weight": t["weight"][:-1]}, "LayerNorm weight"),
        (lambda t: {**t, "act": t["act"].int()}, "act must be float32, float16 or bfloat16"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_c_alone(change, match):
    act, up, c, w, bias = _inputs(4, 8, 16, torch.float32)
    args = change({"act": act, "up": up, "c": c, "weight": w, "bias": bias})
    before = args["c"].clone()
    with pytest.raises((TypeError, ValueError), match=match):
        up_add_layer_norm(args["act"], args["up"], args["c"], args["weight"], args["bias"], 1e-5)
    assert torch.equal(args["c"], before)


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 1024])
def test_cuda_bf16_error_no_larger_than_the_torch_ops(hidden):
    """bf16 on the GPU, 4096 rows, rank 56 padded to 64: c and x against fp64, no worse than ``c.addmm_`` followed by
    ``F.layer_norm`` in bf16 (1.02x, for the accumulation order)."""
    act, up, c, w, bias = (t.cuda() for t in _inputs(4096, 64, hidden, torch.bfloat16))
    want_c = c.double() + act.double() @ up.double()
    want_x = F.layer_norm(want_c, (hidden,), w.double(), bias.double(), 1e-12)
    c_torch = c.clone().addmm_(act, up)
    x_torch = F.layer_norm(c_torch, (hidden,), w.to(c.dtype), bias.to(c.dtype), 1e-12)
    x = up_add_layer_norm(act, up, c, w, bias, 1e-12)
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(c, want_c) <= rel(c_torch, want_c) * 1.02 + 1e-6
    assert rel(x, want_x) <= rel(x_torch, want_x) * 1.02 + 1e-6
