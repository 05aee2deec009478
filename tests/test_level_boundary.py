"""level_boundary (kernels/level_boundary.py): between two stack levels, the carry's update, the model LayerNorm and
the next level's down projection and activation in one launch; against its torch twin and the torch ops it replaces
(the add or ``c.addmm_(act, up)``, then ``F.layer_norm``, then the down GEMM and the activation)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from adapter_engine.kernels import INTERPRET
from adapter_engine.kernels.bottleneck_pack import _TORCH_ACTS, ACTIVATIONS
from adapter_engine.kernels.level_boundary import (
    MAX_DOWN_WIDTH,
    MAX_HIDDEN,
    level_boundary,
    level_boundary_reference,
)

# c: one rounding of the same fp32 sum, up to the accumulation order (and, in the interpreter's bf16, its truncating
# stores): a unit in the last place of the half dtypes. x: the LN of that c, two more; the activations: a GEMM of x.
TOL_C = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TOL_X = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TOL_A = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(m, k, hidden, width, dtype, strided=False):
    """h, y, act, up, down_w, down_b, LN weight and bias; with ``strided``, c, y and act are views with padded rows."""

    def rows(t):
        if not strided:
            return t
        return torch.empty(t.shape[0], t.shape[1] + 3, dtype=t.dtype)[:, 1 : 1 + t.shape[1]].copy_(t)

    c = rows((torch.randn(m, hidden) * 2 + 0.5).to(dtype))  # the carry r + y: a row mean away from zero
    y = rows(torch.randn(m, hidden).to(dtype))
    act = rows(torch.randn(m, k).relu().to(dtype))  # a relu's output, as the levels feed it
    up = (torch.randn(k, hidden) * k**-0.5).to(dtype)
    down_w = (torch.randn(width, hidden) * hidden**-0.5).to(dtype)
    down_b = (0.1 * torch.randn(width)).to(dtype)
    w, bias = 1 + 0.2 * torch.randn(hidden), 0.1 * torch.randn(hidden)
    return c, y, act, up, down_w, down_b, w, bias


def _torch_ops(c, y, act, up, down, w, bias, eps):
    """(s, x or the next activations) by the torch ops the launch replaces, s computed in fp64 and rounded once."""
    total = c.double() + (y.double() if y is not None else 0) + (act.double() @ up.double() if act is not None else 0)
    s = total.to(c.dtype)
    x = F.layer_norm(s, s.shape[-1:], w.to(s.dtype), bias.to(s.dtype), eps)  # of the s it stored
    if down is None:
        return s, x
    down_w, down_b, code = down
    return s, _TORCH_ACTS[code](x.double() @ down_w.double().t() + down_b.double()).to(c.dtype)


MODES = {  # which operands a boundary takes: the stack's start (h + y), between two levels, its end
    "start": dict(y=True, up=False, down=True),
    "between": dict(y=False, up=True, down=True),
    "end": dict(y=False, up=True, down=False),
    "add and norm": dict(y=True, up=False, down=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, k, hidden, width", [(37, 56, 40, 24), (1, 8, 769, 17), (5, 1, 1, 1), (33, 17, 64, 72)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_matches_the_torch_ops(dtype, m, k, hidden, width, mode, strided):
    """s stored as the add or ``c.addmm_(act, up)`` stores it (in place into c between levels), out the LayerNorm
    of that s or the activations of its down projection; odd sizes, strided rows, an activation per shape."""
    c, y, act, up, down_w, down_b, w, bias = _inputs(m, k, hidden, width, dtype, strided)
    use = MODES[mode]
    code = [ACTIVATIONS["relu"], ACTIVATIONS["gelu"], ACTIVATIONS["gelu_new"], ACTIVATIONS["swish"]][hidden % 4]
    args = dict(y=y if use["y"] else None, act=act if use["up"] else None, up=up if use["up"] else None)
    down = (down_w, down_b, code) if use["down"] else None
    want_s, want_out = _torch_ops(c, args["y"], args["act"], args["up"], down, w, bias, 1e-5)
    c_before = c.clone()
    s, out = level_boundary(c, w, bias, 1e-5, **args, down=down)
    assert out.dtype == dtype and out.shape == (m, width if down else hidden) and out.is_contiguous()
    torch.testing.assert_close(s, want_s, rtol=TOL_C[dtype], atol=TOL_C[dtype])
    if use["y"]:  # a new carry; h is the caller's
        assert s.data_ptr() != c.data_ptr() and torch.equal(c, c_before)
    else:  # in place
        assert s is c
    tol = TOL_A[dtype] if down else TOL_X[dtype]
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_its_torch_twin_and_leaves_its_inputs_alone(mode):
    c, y, act, up, down_w, down_b, w, bias = _inputs(21, 24, 96, 40, torch.float32)
    use = MODES[mode]
    args = dict(y=y if use["y"] else None, act=act if use["up"] else None, up=up if use["up"] else None,
                down=(down_w, down_b, ACTIVATIONS["tanh"]) if use["down"] else None)  # fmt: skip
    kept = [t.clone() for t in (y, act, up, down_w, down_b)]
    c_twin = c.clone()
    s, out = level_boundary(c, w, bias, 1e-6, **args)
    s_twin, out_twin = level_boundary_reference(c_twin, w, bias, 1e-6, *args.values(), True)
    torch.testing.assert_close(s, s_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, c_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_twin, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip((y, act, up, down_w, down_b), kept, strict=True))


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("mode", ["start", "end"])
def test_layer_norm_weight_and_bias_and_down_bias_of_any_stride(mode, layout):
    """The LN weight and bias and the down bias as strided views (every other element) or expanded ones (stride 0):
    the kernel reads them through their strides (the LN of whole rows, the LN of the down projection's slices)."""
    c, y, act, up, down_w, down_b, w, bias = _inputs(19, 8, 48, 24, torch.float32)
    if layout == "strided":
        view = lambda t: torch.stack([t, torch.full_like(t, 9.0)], 1)[:, 0]  # noqa: E731
    else:
        view = lambda t: t[:1].expand(t.shape[0])  # noqa: E731
    w, bias, down_b = view(w), view(bias), view(down_b)
    use = MODES[mode]
    args = dict(y=y if use["y"] else None, act=act if use["up"] else None, up=up if use["up"] else None)
    down = (down_w, down_b, ACTIVATIONS["gelu"]) if use["down"] else None
    want_s, want_out = _torch_ops(c, args["y"], args["act"], args["up"], down, w, bias, 1e-5)
    s, out = level_boundary(c, w, bias, 1e-5, **args, down=down)
    torch.testing.assert_close(s, want_s, rtol=TOL_C[torch.float32], atol=TOL_C[torch.float32])
    torch.testing.assert_close(out, want_out, rtol=TOL_A[torch.float32], atol=TOL_A[torch.float32])


def test_without_write_c_the_carry_is_left_alone():
    """The stack's last boundary: ``LN(c + act @ up)`` with c unchanged and nothing returned for it."""
    c, _, act, up, _, _, w, bias = _inputs(19, 16, 48, 8, torch.float32)
    before = c.clone()
    s, x = level_boundary(c, w, bias, 1e-5, act=act, up=up, write_c=False)
    assert s is None and torch.equal(c, before)
    torch.testing.assert_close(x, _torch_ops(before, None, act, up, None, w, bias, 1e-5)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("too_wide", ["rows", "down"])
def test_wider_than_the_kernel_takes_the_twin(monkeypatch, too_wide):
    module = importlib.import_module("adapter_engine.kernels.level_boundary")
    launched = []
    monkeypatch.setattr(module, "level_boundary_fwd", lambda *a: launched.append(1))
    hidden, width = (MAX_HIDDEN + 1, 8) if too_wide == "rows" else (16, MAX_DOWN_WIDTH + 1)
    c, _, act, up, down_w, down_b, w, bias = _inputs(3, 4, hidden, width, torch.float32)
    want_s, want_a = _torch_ops(c, None, act, up, (down_w, down_b, 1), w, bias, 1e-5)
    s, a = level_boundary(c, w, bias, 1e-5, act=act, up=up, down=(down_w, down_b, 1))
    assert not launched
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-5)
    if INTERPRET:
        c, _, act, up, down_w, down_b, w, bias = _inputs(3, 4, MAX_HIDDEN, MAX_DOWN_WIDTH, torch.float32)
        level_boundary(c, w, bias, 1e-5, act=act, up=up, down=(down_w, down_b, 1))
        assert launched


def test_zero_rows():
    c, y, _, _, down_w, down_b, w, bias = _inputs(0, 8, 32, 16, torch.float16)
    s, a = level_boundary(c, w, bias, 1e-5, y=y, down=(down_w, down_b, 1))
    assert s.shape == (0, 32) and a.shape == (0, 16)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: {**t, "up": t["up"].double()}, "one dtype|float32, float16 or bfloat16"),
        (lambda t: {**t, "act": t["act"].half()}, "one dtype"),
        (lambda t: {**t, "down": (t["down"][0].half(), *t["down"][1:])}, "one dtype"),
        (lambda t: {**t, "up": t["up"][:-1]}, r"act \(M, K\) and up \(K, H\)"),
        (lambda t: {**t, "act": t["act"][:-1]}, r"act \(M, K\) and up \(K, H\)"),
        (lambda t: {**t, "up": None}, "act and up together"),
        (lambda t: {**t, "y": t["c"][:, :-1]}, "y shaped like c"),
        (lambda t: {**t, "down": (t["down"][0][:, :-1], *t["down"][1:])}, r"down_w \(W, 16\)"),
        (lambda t: {**t, "down": (*t["down"][:2], 9)}, "activation code"),
        (lambda t: {**t, "write_c": False}, "write_c=True"),
        (lambda t: {**t, "weight": t["weight"][:-1]}, "LayerNorm weight"),
        (lambda t: {**t, "act": t["act"].int()}, "act must be float32, float16 or bfloat16"),
        (lambda t: {**t, "bias": None}, "LayerNorm weight and bias as tensors, got Tensor and NoneType"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_c_alone(change, match):
    c, y, act, up, down_w, down_b, w, bias = _inputs(4, 8, 16, 8, torch.float32)
    args = change(dict(c=c, y=None, act=act, up=up, down=(down_w, down_b, 1), write_c=True, weight=w, bias=bias))
    before = args["c"].clone()
    with pytest.raises((TypeError, ValueError), match=match):
        level_boundary(args.pop("c"), args.pop("weight"), args.pop("bias"), 1e-5, **args)
    assert torch.equal(c, before)


def test_a_carry_whose_rows_share_memory_is_refused():
    """c is updated in place (y None, write_c): an expanded c (rows sharing memory) was raced on by the kernel's
    programs, each keeping one row's sum; the twin's copy_ raises. Refused with ValueError, c left alone."""
    c, _, act, up, down_w, down_b, w, bias = _inputs(4, 8, 16, 8, torch.float32)
    row = c[:1].clone()
    with pytest.raises(ValueError, match=r"carry c \(4, 16\) is updated in place but its elements share memory"):
        level_boundary(row.expand(4, 16), w, bias, 1e-5, act=act, up=up, down=(down_w, down_b, 1))
    assert torch.equal(row, c[:1])


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 1024])
@pytest.mark.parametrize("mode", ["start", "between", "end"])
def test_cuda_bf16_error_no_larger_than_the_torch_ops(hidden, mode):
    """bf16 on the GPU, 4096 rows, rank 48 with its bias unit padded to 56 (BERT-base's factor 16): s and the output
    against fp64, no worse than the torch ops in bf16 (the add or ``addmm_``, ``F.layer_norm``, ``F.linear`` and the
    activation; 1.02x, for the accumulation order)."""
    c, y, act, up, down_w, down_b, w, bias = (t.cuda() for t in _inputs(4096, 56, hidden, 56, torch.bfloat16))
    use = MODES[mode]
    y, act, up = (y if use["y"] else None), (act if use["up"] else None), (up if use["up"] else None)
    down = (down_w, down_b, ACTIVATIONS["relu"]) if use["down"] else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want_s = d(c) + (d(y) if y is not None else 0) + (d(act) @ d(up) if act is not None else 0)
    want = F.layer_norm(want_s, (hidden,), d(w), d(bias), 1e-12)
    s_torch = c + y if y is not None else c.clone().addmm_(act, up)
    out_torch = F.layer_norm(s_torch, (hidden,), w.to(c.dtype), bias.to(c.dtype), 1e-12)
    if down is not None:
        want = torch.relu(want @ d(down_w).t() + d(down_b))
        out_torch = torch.relu(F.linear(out_torch, down_w, down_b))
    s, out = level_boundary(c, w, bias, 1e-12, y=y, act=act, up=up, down=down, write_c=down is not None)
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    if s is not None:
        assert rel(s, want_s) <= rel(s_torch, want_s) * 1.02 + 1e-6
    assert rel(out, want) <= rel(out_torch, want) * 1.02 + 1e-6


def test_a_recorded_launch_calls_its_compiled_kernel_directly_while_the_tensors_are_aligned_alike(
    monkeypatch, direct_stand_in
):
    """Launches are recorded per geometry (device, constexprs, each tensor's dtype and 16-byte alignment, the
    integer arguments): on a GPU a repeat calls the compiled kernel of the first launch directly, every parameter in
    signature order (here a stand-in binds them back to the parameter names and runs the kernel in the interpreter).
    A c that is 4-byte aligned makes a new key, launched by Triton."""
    lb = importlib.import_module("adapter_engine.kernels.level_boundary")
    stand_in, direct = direct_stand_in
    monkeypatch.setattr(lb, "_RECORDED", {})
    c, y, _, _, down_w, down_b, w, bias = _inputs(21, 24, 96, 40, torch.float32)

    def call(c):  # the stack's start: s = c + y is a new tensor, c is left alone
        return level_boundary(c, w, bias, 1e-6, y=y, down=(down_w, down_b, ACTIVATIONS["tanh"]))

    want = call(c)
    ((key, launch),) = lb._RECORDED.items()
    lb._RECORDED[key] = stand_in(launch, 0)  # (the key holds the alignment: nothing left to check)
    for got, expected in zip(call(c), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert direct == [launch.grid]
    shifted = torch.empty(21 * 96 + 1)[1:].view(21, 96).copy_(c)
    for got, expected in zip(call(shifted), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(direct) == 1 and len(lb._RECORDED) == 2
