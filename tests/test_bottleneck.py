"""Fused bottleneck adapter stacks (kernels/bottleneck.py, adapter_engine/bottleneck.py).

The oracle is ``ah_stack`` below: a line-by-line port of AdapterHub 1.3.0's ``Adapter.pre_forward`` /
``Adapter.forward`` / ``post_forward`` (and ``ParallelAdapter``) with ``compose_stack``, written independently of
the library, run in any dtype (fp64 for the CUDA tier). Parallel levels add up (the library's documented
generalisation; identical to AdapterHub at depth 1).

Tolerances (CPU tier, vs the library's fp32 reference or the oracle in fp32):
- fp32: 2e-5 absolute/relative. Both sides compute in fp32; they differ in summation order of the matmuls and
  in LayerNorm variance (E[x^2] - mean^2 in the kernel, Welford in torch), a few ulps of O(1-10) values.
- fp16 / bf16 inputs: the kernel computes in fp32 and rounds once at the store, as the reference does, so
  outputs differ by at most one ulp of the output dtype after different fp32 rounding paths: 2e-3 (fp16, ulp
  2^-10 relative) and 1.6e-2 (bf16, ulp 2^-7 relative) relative, with the same absolute floor for values near 0.
- gradients (fp32): 1e-4 relative to the largest gradient entry: the backward re-runs the fp32 reference, the
  oracle differentiates a different but equivalent op order.
"""

import contextlib
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from adapter_engine.bottleneck import OutputWithAdapters, ResidualOutsideWithAdapters, unwrap_sublayer, wrap_sublayer
from adapter_engine.bottleneck_adapter import BottleneckAdapter
from adapter_engine.kernels import INTERPRET, use_triton
from adapter_engine.kernels.bottleneck import (
    StackOptions,
    bottleneck_stack,
    bottleneck_stack_fwd,
    bottleneck_stack_ref,
    expand_routes,
    pack_adapters,
)

# the fused backward stays covered here: training through the patched models takes it (see conftest.py)
pytestmark = pytest.mark.usefixtures("fused_training")

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

SEQ = StackOptions()  # seq_bn (Pfeiffer)
HOULSBY = StackOptions(original_ln_before=False)  # double_seq_bn
PAR = StackOptions(is_parallel=True, original_ln_before=False)  # par_bn
OPTION_GRID = {
    "seq_bn": SEQ,
    "double_seq_bn": HOULSBY,
    "par_bn": PAR,
    "residual_after_ln": StackOptions(residual_before_ln=False),
    "post_add": StackOptions(residual_before_ln="post_add"),
    "no_ln_after": StackOptions(original_ln_after=False),
    "houlsby_residual_after_ln": StackOptions(original_ln_before=False, residual_before_ln=False),
}


# --------------------------------------------------------------------------------------------------- oracle
def _act(name, z):
    return {
        "relu": torch.relu,
        "gelu": F.gelu,
        "gelu_new": lambda v: 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3)))),
        "swish": lambda v: v * torch.sigmoid(v),
        "silu": F.silu,
        "tanh": torch.tanh,
        "identity": lambda v: v,
    }[name](z)


def ah_adapter_forward(p, x, residual_input, o: StackOptions, eps_own=1e-5):
    """AdapterHub Adapter.forward / ParallelAdapter.forward (no gating; dropout at the rate ``p["dropout"]``)."""
    H = x.shape[-1]
    v = F.layer_norm(x, (H,), p["lnb"][0], p["lnb"][1], eps_own) if o.ln_before else x
    down = _act(p["act"], v @ p["wd"].t() + p["bd"])
    up = (down @ p["wu"].t() + p["bu"]) * p["scaling"]
    output = F.dropout(up, p["dropout"]) if p.get("dropout") else up  # its self.dropout(up), before ln_after
    if o.is_parallel:
        return F.layer_norm(output, (H,), p["lna"][0], p["lna"][1], eps_own) if o.ln_after else output
    if o.adapter_residual_before_ln:
        output = output + residual_input
    if o.ln_after:
        output = F.layer_norm(output, (H,), p["lna"][0], p["lna"][1], eps_own)
    if not o.adapter_residual_before_ln:
        output = output + residual_input
    return output


def ah_pre_forward(hidden_states, input_tensor, layer_norm, o: StackOptions):
    """AdapterHub Adapter.pre_forward / ParallelAdapter.pre_forward -> (hidden_states, residual)."""
    if o.is_parallel:
        return input_tensor, input_tensor
    residual = None
    if o.residual_before_ln is True or o.residual_before_ln == "post_add":
        residual = hidden_states
    if o.original_ln_before:
        if layer_norm:
            hidden_states = hidden_states + input_tensor
            if o.residual_before_ln == "post_add":
                residual = hidden_states
            hidden_states = layer_norm(hidden_states)
        else:
            hidden_states = hidden_states + input_tensor
    if not o.residual_before_ln:
        residual = hidden_states
    return hidden_states, residual


def ah_stack(h, y, layer_norm, params, o: StackOptions):
    """bottleneck_layer_forward with a Stack: pre_block + compose_single per adapter, then post_forward."""
    hidden_states, parallel_sum = h, None
    for p in params:
        hs, residual = ah_pre_forward(hidden_states, y, layer_norm, o)
        out = ah_adapter_forward(p, hs, residual, o)
        if o.is_parallel:  # library generalisation: parallel levels add up
            parallel_sum = out if parallel_sum is None else parallel_sum + out
        else:
            hidden_states = out
    if o.is_parallel:
        if parallel_sum is None:
            hidden_states = h
        else:
            hidden_states = parallel_sum + h
    if o.original_ln_after:
        hidden_states = layer_norm(hidden_states + y) if layer_norm else hidden_states + y
    return hidden_states


# --------------------------------------------------------------------------------------------------- helpers
def make_params(hidden, ranks, acts, scalings=None, dtype=torch.float32, device="cpu", own_ln=False):
    out = []
    for i, (r, act) in enumerate(zip(ranks, acts, strict=True)):
        p = {
            "wd": torch.randn(r, hidden, device=device) * (1.0 / math.sqrt(hidden)),
            "bd": torch.randn(r, device=device) * 0.1,
            "wu": torch.randn(hidden, r, device=device) * (1.0 / math.sqrt(r)),
            "bu": torch.randn(hidden, device=device) * 0.1,
            "act": act,
            "scaling": [1.0, 0.5, 2.0, 4.0][i % 4] if scalings is None else scalings[i],
        }
        if own_ln:
            p["lnb"] = (1 + 0.2 * torch.randn(hidden, device=device), 0.1 * torch.randn(hidden, device=device))
            p["lna"] = (1 + 0.2 * torch.randn(hidden, device=device), 0.1 * torch.randn(hidden, device=device))
        for k in ("wd", "bd", "wu", "bu"):
            p[k] = p[k].to(dtype)
        out.append(p)
    return out


def pack(params, own_ln=False):
    return pack_adapters(
        [p["wd"] for p in params],
        [p["bd"] for p in params],
        [p["wu"] for p in params],
        [p["bu"] for p in params],
        [p["act"] for p in params],
        [p["scaling"] for p in params],
        ln_before=[p["lnb"] for p in params] if own_ln else None,
        ln_after=[p["lna"] for p in params] if own_ln else None,
    )


def make_ln(hidden, dtype=torch.float32, device="cpu", eps=1e-12):
    ln = torch.nn.LayerNorm(hidden, eps=eps).to(device)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.2 * torch.randn(hidden))
        ln.bias.copy_(0.1 * torch.randn(hidden))
    return ln.to(dtype)


@pytest.fixture
def poison(monkeypatch):
    """Every float buffer the launcher allocates (output, scratch) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def assert_close(a, b, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def test_cpu_tier_runs_the_triton_kernel():
    assert INTERPRET or torch.cuda.is_available()
    assert use_triton(torch.empty(1))


# --------------------------------------------------------------------------------------------------- op: forward
@pytest.mark.parametrize("name", list(OPTION_GRID))
@pytest.mark.parametrize("with_ln", [True, False])
def test_forward_options_uniform_and_mixed_rows(poison, name, with_ln):
    o = OPTION_GRID[name]
    hidden, rows = 40, 37
    params = make_params(hidden, [8, 16, 1], ["relu", "gelu", "tanh"])
    packed = pack(params)
    h, y = torch.randn(rows, hidden), torch.randn(rows, hidden)
    ln = make_ln(hidden) if with_ln else None
    lw, lb = (ln.weight, ln.bias) if ln is not None else (None, None)
    mixed = torch.randint(-1, 3, (rows, 3))
    mixed[0] = torch.tensor([0, 1, 2])
    for routes in (torch.tensor([0, 1, 2]), mixed):
        r2 = expand_routes(routes, h)
        got = bottleneck_stack_fwd(h, y, lw, lb, packed, r2, o)
        assert torch.isfinite(got).all()
        assert_close(got, bottleneck_stack_ref(h, y, lw, lb, packed, r2, o))
        # the oracle, row by row for the mixed routes
        for row in range(rows) if routes.dim() == 2 else [None]:
            sel = slice(None) if row is None else slice(row, row + 1)
            levels = (routes if row is None else routes[row]).tolist()
            want = ah_stack(h[sel], y[sel], ln, [params[i] for i in levels if i >= 0], o)
            assert_close(got[sel], want)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "swish", "silu", "tanh", "identity"])
def test_forward_activations(poison, act):
    hidden, rows = 24, 19
    params = make_params(hidden, [8], [act], scalings=[1.7])
    ln = make_ln(hidden)
    h, y = torch.randn(rows, hidden) * 2, torch.randn(rows, hidden)
    got = bottleneck_stack(h, y, pack(params), torch.tensor([0]), SEQ, ln.weight, ln.bias)
    assert_close(got, ah_stack(h, y, ln, params, SEQ))


@pytest.mark.parametrize(
    "shape, ranks",
    [
        ((1, 24), [1]),
        ((2, 3, 40), [8, 16, 1]),  # (B, S, H) input
        ((5, 136), [64, 16, 3]),  # two hidden chunks, two unit chunks
        ((70, 64), [8, 8]),  # three row blocks
    ],
)
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_forward_shapes_and_depths(poison, shape, ranks, depth):
    hidden = shape[-1]
    params = make_params(hidden, ranks, ["relu", "swish", "gelu"][: len(ranks)])
    ln = make_ln(hidden)
    h, y = torch.randn(*shape), torch.randn(*shape)
    levels = [i % len(ranks) for i in range(depth)]
    got = bottleneck_stack(h, y, pack(params), torch.tensor(levels, dtype=torch.long), SEQ, ln.weight, ln.bias)
    assert got.shape == h.shape
    assert_close(got, ah_stack(h, y, ln, [params[i] for i in levels], SEQ))


def test_forward_switched_off_levels_and_per_sequence_routes(poison):
    hidden, batch, seq = 40, 3, 5
    params = make_params(hidden, [8, 16, 4], ["relu", "gelu", "tanh"])
    ln = make_ln(hidden)
    h, y = torch.randn(batch, seq, hidden), torch.randn(batch, seq, hidden)
    routes = torch.tensor([[0, -1, 2], [-1, -1, -1], [2, 1, 0]])  # a level off, a row at depth 0, another order
    got = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias)
    for b in range(batch):
        want = ah_stack(h[b], y[b], ln, [params[i] for i in routes[b].tolist() if i >= 0], SEQ)
        assert_close(got[b], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_dtypes(poison, dtype):
    hidden, rows = 64, 33
    params = make_params(hidden, [16, 8], ["gelu", "relu"], dtype=dtype)
    ln = make_ln(hidden, dtype)
    h, y = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    packed, routes = pack(params), expand_routes(torch.tensor([0, 1]), h)
    got = bottleneck_stack_fwd(h, y, ln.weight, ln.bias, packed, routes, SEQ)
    assert got.dtype == dtype
    assert_close(got, bottleneck_stack_ref(h, y, ln.weight, ln.bias, packed, routes, SEQ), dtype)


@pytest.mark.parametrize("adapter_residual_before_ln", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_own_layer_norms_run_on_the_torch_path(adapter_residual_before_ln, parallel):
    o = StackOptions(
        ln_before=True, ln_after=True, adapter_residual_before_ln=adapter_residual_before_ln, is_parallel=parallel
    )
    hidden, rows = 24, 7
    params = make_params(hidden, [8, 4], ["relu", "tanh"], own_ln=True)
    ln = make_ln(hidden)
    h, y = torch.randn(rows, hidden), torch.randn(rows, hidden)
    got = bottleneck_stack(h, y, pack(params, own_ln=True), torch.tensor([0, 1]), o, ln.weight, ln.bias)
    assert_close(got, ah_stack(h, y, ln, params, o))
    with pytest.raises(ValueError, match="torch path"):
        bottleneck_stack_fwd(h, y, ln.weight, ln.bias, pack(params, own_ln=True), expand_routes([0, 1], h), o)


def test_input_validation():
    params = make_params(24, [4], ["relu"])
    h = torch.randn(5, 24)
    with pytest.raises(ValueError, match="residual input"):
        bottleneck_stack(h, None, pack(params), torch.tensor([0]), SEQ)
    with pytest.raises(ValueError, match="hidden 24"):
        bottleneck_stack(torch.randn(5, 32), torch.randn(5, 32), pack(params), torch.tensor([0]), SEQ)
    with pytest.raises(ValueError, match="routes"):
        bottleneck_stack(h, h, pack(params), torch.zeros(4, 1, dtype=torch.long), SEQ)
    with pytest.raises(TypeError, match="float32"):
        bottleneck_stack(h.long(), h.long(), pack(params), torch.tensor([0]), SEQ)
    with pytest.raises(ValueError, match="non_linearity"):
        make = make_params(24, [4], ["relu"])
        make[0]["act"] = "softplus"
        pack(make)
    # a bias of the wrong length would shift the next adapter's biases
    two = make_params(24, [4, 2], ["relu", "relu"])
    two[0]["bd"] = torch.randn(5)
    with pytest.raises(ValueError, match=r"adapter 0: down bias must be \(4,\).*got \(5,\) and \(24,\)"):
        pack(two)
    two[0]["bd"], two[1]["bu"] = torch.randn(4), torch.randn(23)
    with pytest.raises(ValueError, match=r"adapter 1: down bias must be \(2,\) and up bias \(24,\).*\(23,\)"):
        pack(two)
    # non-float operands besides h are named too (an integer adapter weight failed inside the kernels' dot, an
    # integer y or LayerNorm ran, and fp64 weights were computed in fp32)
    int_weights = make_params(24, [4], ["relu"])
    int_weights[0]["wu"] = int_weights[0]["wu"].to(torch.int32)
    with pytest.raises(TypeError, match=r"adapter 0: up weight must be float32, float16 or bfloat16, got torch.int32"):
        pack(int_weights)
    fp64 = make_params(24, [4], ["relu"])
    fp64[0]["wd"] = fp64[0]["wd"].double()
    with pytest.raises(TypeError, match=r"adapter 0: down weight .* got torch.float64"):
        pack(fp64)
    ln = make_ln(24)
    for y, lnw, culprit in ((h.long(), ln.weight, "y"), (h, ln.weight.to(torch.int32), "ln_weight")):
        with pytest.raises(TypeError, match=f"{culprit} must be float32, float16 or bfloat16, got torch.int"):
            bottleneck_stack(h, y, pack(params), torch.tensor([0]), SEQ, lnw, ln.bias)


@pytest.mark.parametrize("part", ["down bias", "model LN"])
def test_strided_down_bias_and_model_layer_norm_with_gradients(poison, part):
    """One packed adapter keeps its down bias uncopied, and the model LN reaches the kernels as given: a strided
    view of either (every other element of a longer tensor) must give the oracle's output and gradients."""
    hidden, rows = 24, 7
    params = make_params(hidden, [6], ["gelu"])
    ln = make_ln(hidden)
    lnw, lnb = ln.weight, ln.bias
    if part == "down bias":
        base = torch.stack([params[0]["bd"], torch.full_like(params[0]["bd"], 50.0)], 1).requires_grad_(True)
        params[0]["bd"] = base[:, 0]
        leaves = [base]
    else:
        wbase = torch.stack([lnw.detach(), torch.full_like(lnw, 7.0)], 1).requires_grad_(True)
        bbase = torch.stack([lnb.detach(), torch.full_like(lnb, 7.0)], 1).requires_grad_(True)
        lnw, lnb = wbase[:, 0], bbase[:, 0]
        leaves = [wbase, bbase]
    h, y = torch.randn(rows, hidden, requires_grad=True), torch.randn(rows, hidden)
    got = bottleneck_stack(h, y, pack(params), [0], SEQ, lnw, lnb)
    oracle_ln = lambda v: F.layer_norm(v, (hidden,), lnw, lnb, 1e-12)  # noqa: E731
    want = ah_stack(h, y, oracle_ln, params, SEQ)
    assert_close(got, want)
    grad_out = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [h, *leaves], grad_out), torch.autograd.grad(want, [h, *leaves], grad_out),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)


def test_routes_naming_no_adapter_are_refused_on_the_host_and_off_in_the_kernel():
    """Routes seen on the host (a list, CPU tensors) must be -1 or name a packed adapter, as the torch twin requires;
    float routes are a TypeError (not truncated). The kernels, which a GPU's routes reach unchecked, treat routes
    outside [0, A) as off and read no table out of bounds."""
    hidden = 16
    params = make_params(hidden, [4], ["relu"])
    packed, ln = pack(params), make_ln(hidden)
    h, y = torch.randn(5, hidden), torch.randn(5, hidden)
    for routes in ([1], [-2], torch.tensor([[0], [1], [0], [-1], [0]]), torch.tensor([[0, 3]] * 5)):
        with pytest.raises(ValueError, match=r"name one of the 1 packed adapters"):
            bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias)
        with pytest.raises(ValueError, match=r"does not name one of the 1 adapters"):
            bottleneck_stack_ref(h, y, ln.weight, ln.bias, packed, expand_routes(routes, h), SEQ)
    for routes in ([0.0], torch.tensor([[0.9], [1.7], [0.0], [0.0], [0.0]])):
        with pytest.raises(TypeError, match="routes must be an integer tensor"):
            bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias)
    # the launcher itself (no host check): rows routed to adapter 1 or 7 (of 1) or -2 run base only
    with torch.no_grad():
        routes = torch.tensor([[0], [1], [7], [-2], [0]], dtype=torch.int32)
        got = bottleneck_stack_fwd(h, y, ln.weight, ln.bias, packed, routes, SEQ)
        want = bottleneck_stack(h, y, packed, torch.tensor([[0], [-1], [-1], [-1], [0]]), SEQ, ln.weight, ln.bias)
    assert_close(got, want)


def test_the_twin_returns_a_new_tensor_when_every_level_is_off():
    """With every level off and no output add (``original_ln_after=False``), the torch twin returned fp32 ``h``
    itself, where the kernels return a new tensor: writing into the output (a model's in-place residual add) changed
    the sublayer's ``h`` too. Checked through ``bottleneck_stack`` on the twin (a plain CPU's path)."""
    from adapter_engine.kernels._backend import torch_twins_on_cpu

    hidden = 16
    packed = pack(make_params(hidden, [4], ["relu"]))
    h = torch.randn(5, 2, hidden)
    for options, y in ((StackOptions(original_ln_after=False), torch.randn(5, 2, hidden)),
                       (StackOptions(original_ln_before=False, original_ln_after=False), None)):  # fmt: skip
        with torch_twins_on_cpu():
            out = bottleneck_stack(h, y, packed, torch.tensor([-1, -1]), options)
        assert torch.equal(out, h) and out.data_ptr() != h.data_ptr()


def test_pack_adapters_names_a_rank_zero_a_1d_weight_or_a_missing_activation():
    """A rank-0 adapter packed, then the twin failed with IndexError (the kernel ran it); a 1-D down weight failed with
    IndexError and an activation of None with AttributeError. Each is now a ValueError naming the adapter's part."""
    hidden = 16
    parts = lambda r: ([torch.randn(r, hidden)], [torch.randn(r)], [torch.randn(hidden, r)], [torch.randn(hidden)])  # noqa: E731
    with pytest.raises(ValueError, match=r"adapter 0: the bottleneck needs rank >= 1, got down weight \(0, 16\)"):
        pack_adapters(*parts(0), ["relu"], [1.0])
    wd, bd, wu, bu = parts(4)
    with pytest.raises(ValueError, match=r"adapter 0: down weight must be \(r, 16\) .* got \(16,\)"):
        pack_adapters([wd[0][0]], bd, wu, bu, ["relu"], [1.0])
    with pytest.raises(ValueError, match="unsupported non_linearity None"):
        pack_adapters(wd, bd, wu, bu, [None], [1.0])


def test_every_tensor_of_a_stack_call_is_on_one_device():
    """The device check compared h, y, the LN weight and the down weights only: an LN bias, up weight or bias on
    another device reached the kernel as a pointer into that device's memory (the interpreter failed with
    NotImplementedError on meta). Now ValueError naming each tensor's device: the call checks the LN bias, the pack
    each adapter's parts (once, not in every call)."""
    hidden = 16
    packed, ln = pack(make_params(hidden, [4], ["relu"])), make_ln(hidden)
    h, y = torch.randn(5, hidden), torch.randn(5, hidden)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        bottleneck_stack(h, y, packed, torch.tensor([0]), SEQ, ln.weight, ln.bias.to("meta"))
    for part in ("bd", "wu", "bu"):
        for ranks in ([4], [4, 3]):  # (one adapter is packed without a copy)
            params = make_params(hidden, ranks, ["relu"] * len(ranks))
            params[-1][part] = params[-1][part].to("meta")
            with pytest.raises(ValueError, match=f"adapter {len(ranks) - 1}: all tensors must be on one device"):
                pack(params)


def test_the_launcher_refuses_routes_activations_and_residuals_that_do_not_fit():
    """``bottleneck_stack_fwd`` checks shapes as ``bottleneck_stack`` does: routes of another row count, a missing y
    that the options read, or activations of another hidden size were read out of bounds (silent garbage, or a
    crash) instead of raising."""
    hidden = 16
    packed, ln = pack(make_params(hidden, [4], ["relu"])), make_ln(hidden)
    h, y, routes = torch.randn(40, hidden), torch.randn(40, hidden), torch.zeros(40, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"routes must be \(rows=40, levels\), got \(3, 1\)"):
        bottleneck_stack_fwd(h, y, ln.weight, ln.bias, packed, routes[:3], SEQ)
    with pytest.raises(ValueError, match=r"y \(the sublayer's residual input\) is required"):
        bottleneck_stack_fwd(h, None, ln.weight, ln.bias, packed, routes, SEQ)
    with pytest.raises(ValueError, match="adapters built for hidden 16 cannot run on activations of hidden 8"):
        bottleneck_stack_fwd(h[:, :8], y[:, :8], ln.weight[:8], ln.bias[:8], packed, routes, SEQ)


# --------------------------------------------------------------------------------------------------- op: backward
@pytest.mark.parametrize("ln_trains", [False, True], ids=["ln-frozen", "ln-weight-trains"])
@pytest.mark.parametrize("name", list(OPTION_GRID))
def test_gradients_match_the_oracle_and_frozen_levels_get_none(name, ln_trains):
    o = OPTION_GRID[name]
    hidden, rows = 40, 29
    params = make_params(hidden, [8, 16, 1], ["relu", "gelu_new", "swish"])
    trainable = {2}  # train the top adapter of 3 (the benchmark case); the others are frozen
    for i, p in enumerate(params):
        for k in ("wd", "bd", "wu", "bu"):
            p[k].requires_grad_(i in trainable)
    ln = make_ln(hidden)
    ln.weight.requires_grad_(ln_trains)
    ln.bias.requires_grad_(False)
    h = torch.randn(rows, hidden, requires_grad=True)
    y = torch.randn(rows, hidden, requires_grad=True)
    grad_out = torch.randn(rows, hidden)
    packed = pack(params)
    got = bottleneck_stack(h, y, packed, torch.tensor([0, 1, 2]), o, ln.weight, ln.bias)
    want = ah_stack(h, y, ln, params, o)
    assert_close(got, want)
    leaves = [h, y] + [ln.weight] * ln_trains + [params[2][k] for k in ("wd", "bd", "wu", "bu")]
    g_got = torch.autograd.grad(got, leaves, grad_out)
    g_want = torch.autograd.grad(want, leaves, grad_out)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    # frozen adapters and the frozen LN bias receive nothing
    got = bottleneck_stack(h, y, packed, torch.tensor([0, 1, 2]), o, ln.weight, ln.bias)
    got.backward(grad_out)
    assert all(params[i][k].grad is None for i in (0, 1) for k in ("wd", "bd", "wu", "bu"))
    assert ln.bias.grad is None and params[2]["wd"].grad is not None


@pytest.mark.parametrize("name", ["seq_bn", "par_bn", "post_add"])
@pytest.mark.parametrize("with_ln", [True, False], ids=["model-ln", "pre-ln"])
def test_gradients_mixed_rows(name, with_ln):
    """seq_bn's order (with or without the model LN) is where the backward stops accumulating dL/dy (it equals dL/dr
    throughout); the other option sets keep it."""
    hidden, rows = 24, 21
    params = make_params(hidden, [8, 4], ["relu", "tanh"])
    for p in params:
        for k in ("wd", "bd", "wu", "bu"):
            p[k].requires_grad_(True)
    ln = make_ln(hidden) if with_ln else None  # the model LN trains too: its gradients sum over the routed rows only
    lw_lb = (ln.weight, ln.bias) if with_ln else (None, None)
    o = OPTION_GRID[name]
    h = torch.randn(rows, hidden, requires_grad=True)
    y = torch.randn(rows, hidden, requires_grad=True)
    routes = torch.randint(-1, 2, (rows, 2))
    hint = [sorted(set(routes[:, lvl].tolist()) - {-1}) for lvl in range(2)]
    got = bottleneck_stack(h, y, pack(params), routes, o, *lw_lb, level_adapters=hint)
    want = torch.cat(
        [
            ah_stack(h[i : i + 1], y[i : i + 1], ln, [params[j] for j in routes[i].tolist() if j >= 0], o)
            for i in range(rows)
        ]
    )
    grad_out = torch.randn(rows, hidden)
    leaves = [h, y, *lw_lb[: 2 * with_ln]] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    for a, b in zip(
        torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)


def _trainable_stack(hidden, rows, ranks, acts):
    """Adapters whose weights train, a model LN, and h, y that want gradients (for the tile-structure tests)."""
    params = make_params(hidden, ranks, acts)
    for p in params:
        for k in ("wd", "bd", "wu", "bu"):
            p[k].requires_grad_(True)
    h = torch.randn(rows, hidden, requires_grad=True)
    y = torch.randn(rows, hidden, requires_grad=True)
    return params, make_ln(hidden), h, y


def _assert_matches_oracle(got, params, ln, h, y, routes):
    """Forward and every gradient (h, y, LN, all adapter weights) against the oracle run row by row."""
    per_row = expand_routes(routes, h)
    want = torch.cat(
        [
            ah_stack(h[i : i + 1], y[i : i + 1], ln, [params[j] for j in per_row[i].tolist() if j >= 0], SEQ)
            for i in range(h.shape[0])
        ]
    )
    assert_close(got, want)
    grad_out = torch.randn_like(want)
    leaves = [h, y, ln.weight, ln.bias] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    for a, b in zip(
        torch.autograd.grad(got, leaves, grad_out, materialize_grads=True),  # an unused adapter's are zeros
        torch.autograd.grad(want, leaves, grad_out, materialize_grads=True),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)


@pytest.mark.parametrize(
    "tiles",
    [(16, 64, 128, 64, 1), (16, 32, 32, 16, 1), (16, 32, 128, 128, 2)],
    ids=["gpu-wide-rank-tiles", "ranks-above-the-unit-tile", "one-unit-tile-pipelined"],
)
@pytest.mark.parametrize("routing", ["mixed-rows", "one-stack", "one-stack-level-off"])
def test_gpu_tile_structure_in_the_interpreter(monkeypatch, tiles, routing):
    """The CPU tier's own tiles cover whole ranks in one step; this runs the GPU's structure: 16-row blocks, hidden
    chunks that do not divide H, the up projection reading the activation tile in K sub-tiles (BLOCK_K <
    BLOCK_R) or straight from registers (one unit tile), ranks above the unit tile, rows of several adapters in
    one block (blocks that fit one unit tile take the straight-line path, the others loop over tiles, in the same
    launch), one stack on every row (TILE_PATH 1) and the pipelined hidden loops (LOOP_STAGES); forward and every
    gradient."""
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_fwd
    from adapter_engine.kernels.bottleneck_pack import _Tiles

    *shape, loop_stages = tiles
    for launchers in (bottleneck_fwd, bottleneck_bwd):  # each launcher module looks _tiles up in its own globals
        monkeypatch.setattr(
            launchers, "_tiles", lambda *_: _Tiles(*shape, num_warps=4, num_stages=1, LOOP_STAGES=loop_stages)
        )
    params, ln, h, y = _trainable_stack(80, 40, [72, 40, 100], ["relu", "gelu", "swish"])
    routes = {  # (L,) routes reach the kernel with row stride 0: one path for every block (TILE_PATH)
        "mixed-rows": torch.tensor([[0, 1, 2]] * 20 + [[2, -1, 0]] * 7 + [[1, 0, -1]] * 13),
        "one-stack": torch.tensor([0, 1, 2]),
        "one-stack-level-off": torch.tensor([2, -1, 0]),
    }[routing]
    per_row = expand_routes(routes, h)
    hint = [sorted(set(per_row[:, lvl].tolist()) - {-1}) for lvl in range(3)]
    got = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias, level_adapters=hint)
    _assert_matches_oracle(got, params, ln, h, y, routes)


def test_forward_tile_tuner_times_each_candidate_once_per_key(monkeypatch):
    """On a GPU the forward times its candidate tiles once per tuning key and keeps the fastest; a candidate that
    does not fit the GPU counts as infinitely slow; the caller's snapshot is taken before timing and restored after;
    with autotuning off the first candidate runs untimed. The times are kept for the benchmarks to report."""
    import triton

    from adapter_engine.kernels import bottleneck_dispatch
    from adapter_engine.kernels.bottleneck_pack import _Tiles

    candidates = (_Tiles(16, 64, 64, 64, 4, 2, 2), _Tiles(16, 128, 64, 64, 8, 2, 2), _Tiles(32, 128, 64, 64, 8, 2, 2))
    cost = {candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: None}
    launched = []

    def fake_do_bench(fn, warmup, rep):
        fn()
        if cost[launched[-1]] is None:
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        return cost[launched[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED", {})
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED_GRAPHED", {})
    monkeypatch.setattr(bottleneck_dispatch, "TUNING_TIMES", {})
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    events = []

    def snapshot():
        events.append(("snapshot", len(launched)))
        return lambda: events.append(("restore", len(launched)))

    assert bottleneck_dispatch._tuned_tiles("key", candidates, launched.append, snapshot) == candidates[1]
    assert launched == list(candidates)
    assert events == [("snapshot", 0), ("restore", 3)]  # what the timing runs wrote is undone before the real launch
    # what the benches report
    assert bottleneck_dispatch.TUNING_TIMES == {"key": (candidates, [3.0, 1.0, float("inf")])}
    assert bottleneck_dispatch._tuned_tiles("key", candidates, launched.append) == candidates[1]  # cached: not re-timed
    assert len(launched) == 3
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", False)
    assert bottleneck_dispatch._tuned_tiles("another key", candidates, launched.append) == candidates[0]
    assert len(launched) == 3


def test_tuner_times_gpu_and_host_and_falls_back_to_do_bench(monkeypatch):
    """On a CUDA device each candidate's GPU work is timed by CUDA-graph replay and its host enqueue time apart: a
    graph capture gets the least GPU time, eager calls the least of the larger side (a path of fifteen launches that
    a slow host enqueues in more time than the GPU runs it loses there). When one candidate cannot be captured, all
    are timed again by do_bench, so the times compare like with like; a candidate that does not fit the GPU counts
    as infinitely slow either way; CPU launches take do_bench. The tuner keeps both choices per key."""
    import triton

    from adapter_engine.kernels import _backend, bottleneck_dispatch

    gpu = {"one launch": 2.0, "fifteen launches": 1.0, "too big": None}  # GPU time
    host = {"one launch": 0.5, "fifteen launches": 3.0, "too big": None}  # the host's enqueue time
    host_bound = {"one launch": 2.0, "fifteen launches": 3.0, "too big": None}  # what event pairs see
    uncapturable = set()
    timers = []

    def run(c, costs):
        if costs[c] is None:
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        return costs[c]

    def fake_graph_time(fn, device):
        timers.append(("graph", device.type))
        c = fn()
        if c in uncapturable:
            raise RuntimeError("operation not permitted when stream is capturing")
        return run(c, gpu)

    def fake_host_time(fn, device, calls, summary):
        timers.append("host")
        assert calls > 1 and summary([3.0, 1.0, 2.0]) == 1.0  # the least of several enqueues
        return run(fn(), host)

    def fake_do_bench(fn, warmup, rep):
        timers.append("do_bench")
        return run(fn(), host_bound)

    monkeypatch.setattr(_backend, "graph_time_ms", fake_graph_time)
    monkeypatch.setattr(_backend, "host_time_ms", fake_host_time)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    candidates, inf = tuple(gpu), float("inf")
    cuda = torch.device("cuda")
    timing = _backend.fastest(candidates, lambda c: c, cuda)
    assert timing == ("one launch", "fifteen launches", [2.0, 1.0, inf], [0.5, 3.0, inf])
    assert timers == [("graph", "cuda")] * 3 + ["host"] * 3
    timers.clear()
    assert _backend.fastest(candidates, lambda c: c, torch.device("cpu")) == (
        "one launch", "one launch", [2.0, 3.0, inf], None
    )  # fmt: skip
    assert timers == ["do_bench"] * 3
    timers.clear()
    uncapturable.add("fifteen launches")
    assert _backend.fastest(candidates, lambda c: c, cuda) == ("one launch", "one launch", [2.0, 3.0, inf], None)
    assert timers == [("graph", "cuda")] * 2 + ["do_bench"] * 3

    # the tuner: the eager choice for eager calls, the graphed one inside a capture
    uncapturable.clear()
    for name, value in [("_TUNED", {}), ("_TUNED_GRAPHED", {}), ("TUNING_TIMES", {}), ("TUNING_HOST_MS", {})]:
        monkeypatch.setattr(bottleneck_dispatch, name, value)
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    assert bottleneck_dispatch._tuned_tiles("key", candidates, lambda c: c, device=cuda) == "one launch"
    assert bottleneck_dispatch.TUNING_HOST_MS == {"key": [0.5, 3.0, inf]}
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert bottleneck_dispatch._tuned_tiles("key", candidates, lambda c: c, device=cuda) == "fifteen launches"
    assert bottleneck_dispatch._tuned_tiles("untimed key", candidates, lambda c: c, device=cuda) == "one launch"
    capturing[0] = False
    assert bottleneck_dispatch._tuned_tiles("key", candidates, lambda c: c, device=cuda) == "one launch"


def test_graph_timer_captures_repeated_calls_and_divides_by_them(monkeypatch):
    """graph_time_ms' own logic with torch.cuda's stream, event and graph objects replaced by recording stand-ins
    (no GPU here; the CUDA tier times real work): a warm-up call and one timed call outside the capture, as many
    repeats inside it as fit ``rep_ms`` by that call's time, the per-call median of the replays, garbage collection
    off only during the capture, the capture thread-local on the timing stream."""
    import gc

    from adapter_engine.kernels import _backend

    log = []

    class Event:
        clock = [0.0]

        def __init__(self, enable_timing):
            self.at = None

        def record(self, stream=None):
            self.at = Event.clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            log.append("wait")

    class Graph:
        def replay(self):
            log.append("replay")
            Event.clock[0] += 2.0 * captured[0]  # 2 ms per captured call

    captured = [0]

    @contextlib.contextmanager
    def graph(g, stream=None, capture_error_mode="global"):
        log.append(("capture", capture_error_mode, gc.isenabled()))
        yield

    def fn():
        log.append("call")
        if log.count(("capture", "thread_local", False)) == 1 and "replay" not in log:
            captured[0] += 1
        else:
            Event.clock[0] += 2.5  # an eager call: 2.5 ms between its events (host time included)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    _backend._timing_stream.cache_clear()
    try:
        ms = _backend.graph_time_ms(fn, torch.device("cuda"), rep_ms=10.0, replays=3)
    finally:
        _backend._timing_stream.cache_clear()
    assert gc.isenabled()
    assert ms == 2.0  # per call, not per replay of the 4 repeats
    assert captured[0] == 4  # int(10 ms / 2.5 ms) repeats in the graph
    calls_before_capture = log.index(("capture", "thread_local", False))
    assert log[:calls_before_capture].count("call") == 2
    assert log.count("replay") == 1 + 3  # one upload replay, then the timed ones


def test_host_timer_summarises_idle_start_enqueues(monkeypatch):
    """host_time_ms: each call timed from an idle GPU (a synchronise before each and one after), the median by default
    and the least where :func:`fastest` asks (a host's hiccups only add time)."""
    from adapter_engine.kernels import _backend

    syncs, clock, costs = [], [0.0], iter([0.004, 0.001, 0.009, 0.002, 0.003])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(_backend.time, "perf_counter", lambda: clock[0])

    def enqueue():
        clock[0] += next(costs)

    cuda = torch.device("cuda")
    assert _backend.host_time_ms(enqueue, cuda, calls=5) == pytest.approx(3.0)
    assert syncs == [cuda] * 6
    costs = iter([0.004, 0.001, 0.009])
    assert _backend.host_time_ms(enqueue, cuda, calls=3, summary=min) == pytest.approx(1.0)


@pytest.mark.parametrize("routing", ["one-stack", "mixed-rows"])
def test_forward_tuning_end_to_end_in_the_interpreter(monkeypatch, routing):
    """The GPU's tuning path run for real in the interpreter, forward and level backward: two candidate tiles each
    launched and timed (a CPU timer in place of do_bench), what the timing runs wrote undone (the saved
    pre-activations; the in-place gradients and partial sums), the chosen one launched; forward and every gradient
    match the oracle, and the second call reuses the choices without timing."""
    import time

    import triton

    from adapter_engine.kernels import bottleneck_bwd, bottleneck_dispatch, bottleneck_fwd

    timed = []

    def cpu_bench(fn, warmup, rep):
        start = time.perf_counter()
        fn()
        timed.append(1)
        return time.perf_counter() - start

    monkeypatch.setattr(triton.testing, "do_bench", cpu_bench)
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED", {})
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED_GRAPHED", {})
    monkeypatch.setattr(bottleneck_dispatch, "TUNE_MIN_ROWS", 16)
    monkeypatch.setattr(
        bottleneck_fwd,
        "_forward_candidates",
        lambda first, save: (first, first._replace(BLOCK_M=16, BLOCK_H=32, LOOP_STAGES=2)),
    )
    monkeypatch.setattr(
        bottleneck_bwd,
        "_level_candidates",
        lambda first: (first, first._replace(BLOCK_M=16, BLOCK_H=32, LOOP_STAGES=2)),
    )
    params, ln, h, y = _trainable_stack(48, 40, [12, 20, 16], ["relu", "gelu", "tanh"])
    routes = torch.tensor([0, 1, 2]) if routing == "one-stack" else torch.tensor([[0, 1, 2]] * 24 + [[2, 0, -1]] * 16)
    monkeypatch.setattr(bottleneck_fwd, "_RECORDED", {})
    monkeypatch.setattr(bottleneck_bwd, "_RECORDED", {})
    for call in range(2):
        got = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias)
        assert len(timed) == (2 if call == 0 else 4)  # the saving forward's two candidates, at the first call only
        _assert_matches_oracle(got, params, ln, h, y, routes)  # the backward's gradients after its own timing
        assert len(timed) == 4  # the level backward's two candidates: one key for the three levels, timed once
    # the launches recorded for direct calls have the chosen tiles only (the timing runs launch through Triton)
    tuned = {key[0]: (t.BLOCK_M, t.BLOCK_H) for key, t in bottleneck_dispatch._TUNED.items()}
    level_bwd = bottleneck_bwd._bottleneck_level_bwd_kernel
    assert [(d.kwargs["BLOCK_M"], d.kwargs["BLOCK_H"]) for d in bottleneck_fwd._RECORDED.values()] == [tuned["forward"]]
    recorded = [
        (d.kwargs["BLOCK_M"], d.kwargs["BLOCK_H"]) for d in bottleneck_bwd._RECORDED.values() if d.kernel is level_bwd
    ]
    assert set(recorded) == {tuned["level backward"]}  # (levels whose views are aligned alike share one)


# --------------------------------------------------------------------------------------------------- levels on cuBLAS
@pytest.fixture(params=["levels", "levels fused"])
def levels_path(monkeypatch, request):
    """Every forward of one stack on every row takes the level-by-level GEMM path (kernels/bottleneck_gemm.py), as
    it is or as n + 1 ``level_boundary`` launches where that applies (``"levels fused"``); the row-block forward
    kernel fails if it is launched."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_fwd

    class NoKernel:
        arg_names = bottleneck_fwd._bottleneck_stack_fwd_kernel.arg_names

        def __getitem__(self, grid):
            raise AssertionError("the row-block forward kernel ran")

    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", request.param)
    monkeypatch.setattr(bottleneck_fwd, "_bottleneck_stack_fwd_kernel", NoKernel())
    monkeypatch.setattr(bottleneck_fwd, "_RECORDED", {})  # (launches recorded before hold the kernel itself)


@pytest.mark.parametrize("name", list(OPTION_GRID))
@pytest.mark.parametrize("with_ln", [True, False])
def test_levels_path_matches_the_oracle(poison, levels_path, name, with_ln):
    """Every option set, with and without the model LN, a level switched off, odd sizes, 3-D input."""
    o = OPTION_GRID[name]
    hidden = 40
    params = make_params(hidden, [8, 16, 1], ["relu", "gelu", "tanh"])
    ln = make_ln(hidden) if with_ln else None
    lw, lb = (ln.weight, ln.bias) if ln is not None else (None, None)
    h, y = torch.randn(3, 7, hidden), torch.randn(3, 7, hidden)
    h0, y0 = h.clone(), y.clone()
    for levels in ([0, 1, 2], [2, -1, 0], [1], [-1, -1]):
        got = bottleneck_stack(h, y, pack(params), torch.tensor(levels), o, lw, lb)
        assert torch.equal(h, h0) and torch.equal(y, y0)  # (the up GEMMs accumulate in place into the path's own r)
        assert_close(got, ah_stack(h, y, ln, [params[i] for i in levels if i >= 0], o))
        assert got.untyped_storage().data_ptr() not in (h.untyped_storage().data_ptr(), y.untyped_storage().data_ptr())


@pytest.mark.parametrize("name, calls", [
    ("seq_bn", [("h + y", True, False)]),  # the carry and the first level's input; LN(c) at the end
    ("double_seq_bn", [("res + u + y", False, True)]),  # Houlsby: the output LN of the last level's sum
    ("post_add", [("r + y", True, False), ("r + y", True, False), ("res + u + y", False, True)]),
])  # fmt: skip
def test_levels_path_fuses_its_sums_into_the_layer_norms(levels_path, monkeypatch, name, calls):
    """The level path's additions that feed the model LN run inside ``add_layer_norm`` launches (with the sum
    written only where a level reads it; a chained seq_bn stack makes its carry in ``level_boundary`` instead), and
    the output matches the oracle."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_gemm

    seen = []
    real = bottleneck_gemm.add_layer_norm

    def spy(a, b, *args, write_sum=True, stats=None, c=None):
        what = "res + u + y" if c is not None else ("h + y" if not seen and name == "seq_bn" else "r + y")
        seen.append((what, write_sum, c is not None))
        return real(a, b, *args, write_sum=write_sum, stats=stats, c=c)

    monkeypatch.setattr(bottleneck_gemm, "add_layer_norm", spy)
    o = OPTION_GRID[name]
    params = make_params(40, [8, 16], ["relu", "swish"])
    ln = make_ln(40)
    h, y = torch.randn(11, 40), torch.randn(11, 40)
    levels = [0, 1] if name == "post_add" else [1]
    with torch.no_grad():
        got = bottleneck_stack(h, y, pack(params), torch.tensor(levels), o, ln.weight, ln.bias)
    chained = bottleneck_dispatch.STACK_PATH == "levels fused" and name == "seq_bn"
    assert seen == ([] if chained else calls)
    assert_close(got, ah_stack(h, y, ln, [params[i] for i in levels], o))


@pytest.mark.parametrize("name", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("levels", [[0, -1, 1, 2], [2], [-1, -1]], ids=str)
def test_levels_path_chains_its_levels_through_level_boundary_launches(levels_path, monkeypatch, name, levels):
    """``"levels fused"``: serving a seq_bn stack of n active levels takes n + 1 ``level_boundary`` launches (the
    carry and the first down projection; each up projection with the next LayerNorm and down projection; the last
    up projection with the output LayerNorm) and no GEMM, LayerNorm or add of its own; where the structure does not
    carry ``r + y`` (Houlsby), nothing is chained. Either way the output matches the oracle."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_gemm

    chained, torch_ops = [], []

    def spy(module, attr, calls):
        real = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, **k: calls.append(attr) or real(*a, **k))

    spy(bottleneck_gemm, "level_boundary_fwd", chained)
    for module, attr in ((bottleneck_gemm, "_layer_norm"), (F, "linear"), (torch, "_addmm_activation")):
        spy(module, attr, torch_ops)  # the unchained path's LayerNorms and down GEMMs
    o = OPTION_GRID[name]
    params = make_params(40, [8, 16, 4], ["relu", "swish", "gelu"])
    ln = make_ln(40)
    h, y = torch.randn(11, 40), torch.randn(11, 40)
    with torch.no_grad():
        got = bottleneck_stack(h, y, pack(params), torch.tensor(levels), o, ln.weight, ln.bias)
    active = sum(a >= 0 for a in levels)
    on = bottleneck_dispatch.STACK_PATH == "levels fused" and name == "seq_bn"
    assert len(chained) == (active + 1 if on and active else 0)
    if active:  # (no active level: the sublayer's own LN(h + y) either way)
        assert bool(torch_ops) != on, torch_ops
    assert_close(got, ah_stack(h, y, ln, [params[i] for i in levels if i >= 0], o))


def test_the_tuner_times_the_fused_levels_where_they_apply(monkeypatch):
    """The forward tuner offers ``LEVELS_FUSED`` beside ``LEVELS`` for a serving seq_bn stack, not for Houlsby
    placement (nothing to fuse) nor for a forward that saves for the backward."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_fwd
    from adapter_engine.kernels._backend import Timing

    offered = []

    def tuner(candidates, launch, device):
        offered.append(candidates)
        return Timing(candidates[0], candidates[0], [1.0] * len(candidates), None)

    monkeypatch.setattr(bottleneck_dispatch, "fastest", tuner)
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    monkeypatch.setattr(bottleneck_dispatch, "INTERPRET", False)
    monkeypatch.setattr(bottleneck_dispatch, "TUNE_MIN_ROWS", 16)
    monkeypatch.setattr(bottleneck_fwd, "_forward_candidates", lambda first, save: (first,))
    params, ln = make_params(40, [8, 16], ["relu", "gelu"]), make_ln(40)
    h, y = torch.randn(32, 40), torch.randn(32, 40)
    for name, grad in (("seq_bn", False), ("double_seq_bn", False), ("seq_bn", True)):
        monkeypatch.setattr(bottleneck_dispatch, "_TUNED", {})
        for p in params:
            p["wd"].requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            bottleneck_stack(h, y, pack(params), torch.tensor([0, 1]), OPTION_GRID[name], ln.weight, ln.bias,
                             level_adapters=[[0], [1]])  # fmt: skip
    assert [bottleneck_dispatch.LEVELS_FUSED in c for c in offered] == [True, False, False]
    assert all(bottleneck_dispatch.LEVELS in c for c in offered)


@pytest.mark.parametrize("name", list(OPTION_GRID))
@pytest.mark.parametrize(
    "forward, backward", [("levels", "rows"), ("levels", "levels"), ("rows", "levels")], ids=lambda p: p
)
@pytest.mark.parametrize("with_ln", [True, False], ids=["model-ln", "pre-ln"])
def test_levels_path_training(monkeypatch, name, forward, backward, with_ln):
    """Training one stack on every row, each direction on either path: the kernel backward reads what the cuBLAS
    forward saved, and the cuBLAS level backward (bottleneck_gemm.level_bwd_levels) reads what either forward saved;
    the model LN (when there is one) trains too, a level is off (skipped by the backward), and every gradient
    matches the oracle's."""
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_dispatch, bottleneck_fwd

    o = OPTION_GRID[name]
    ran = []
    fwd_levels, bwd_levels = bottleneck_fwd.stack_fwd_levels, bottleneck_bwd.level_bwd_levels
    monkeypatch.setattr(
        bottleneck_fwd, "stack_fwd_levels", lambda *a, **k: ran.append("forward") or fwd_levels(*a, **k)
    )
    monkeypatch.setattr(bottleneck_bwd, "level_bwd_levels", lambda *a: ran.append("backward") or bwd_levels(*a))
    params, ln, h, y = _trainable_stack(48, 21, [12, 20, 16], ["relu", "gelu", "swish"])
    ln_leaves = [ln.weight, ln.bias] if with_ln else [None, None]
    ln = ln if with_ln else None
    leaves = [h, y, *ln_leaves[: 2 * with_ln]] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", forward)
    got = bottleneck_stack(h, y, pack(params), torch.tensor([0, -1, 2]), o, *ln_leaves)
    want = ah_stack(h, y, ln, [params[0], params[2]], o)
    assert_close(got, want)
    grad_out = torch.randn_like(want)
    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", backward)
    for a, b in zip(
        torch.autograd.grad(got, leaves, grad_out, materialize_grads=True),
        torch.autograd.grad(want, leaves, grad_out, materialize_grads=True),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)
    assert ran == ["forward"] * (forward == "levels") + ["backward"] * 2 * (backward == "levels")


@pytest.mark.parametrize("name", ["seq_bn", "par_bn", "double_seq_bn"])
def test_levels_path_mixed_dtypes(levels_path, name):
    """bf16 h with fp32 residual, weights and LN (what the modules see under bf16 autocast): the path carries r in
    fp32 as the eager modules' type promotion does, so forward and gradients match the fp32 reference's to within
    one rounding of the bf16 output."""
    o = OPTION_GRID[name]
    params, ln, h, y = _trainable_stack(40, 13, [8, 16], ["relu", "gelu"])
    h = h.detach().bfloat16().requires_grad_()
    leaves = [h, y] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    got = bottleneck_stack(h, y, pack(params), [0, 1], o, ln.weight, ln.bias)
    want = bottleneck_stack_ref(h, y, ln.weight, ln.bias, pack(params), expand_routes(torch.tensor([0, 1]), h), o)
    assert got.dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16)
    grad_out = torch.randn(13, 40).bfloat16()
    for a, b in zip(
        torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out), strict=True
    ):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)


def test_levels_path_edge_cases(levels_path):
    """What a review found on the first version of the path: it takes the kernel's dtypes inside an autocast region,
    a bf16 model LN over an fp32 carry, stacks packed under torch.inference_mode (no version counters), an empty
    batch whose model LN trains, and transposed inputs (the output is row-major, as the kernel's)."""
    params, ln, h, y = _trainable_stack(40, 6, [8, 16], ["gelu", "relu"])
    leaves = [h, y, ln.weight, ln.bias] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    want = ah_stack(h.bfloat16().float(), y, ln, params, SEQ)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bottleneck_stack(h.bfloat16(), y, pack(params), [0, 1], SEQ, ln.weight, ln.bias)
        grads = torch.autograd.grad(got, leaves[1:], torch.ones_like(got))
    assert_close(got, want, torch.bfloat16)
    for a, b in zip(grads, torch.autograd.grad(want, leaves[1:], torch.ones_like(want)), strict=True):
        torch.testing.assert_close(a.float(), b, atol=2e-2 * max(b.abs().max().item(), 1e-3), rtol=2e-2)

    ln16 = make_ln(40, torch.bfloat16)
    h16, y16 = torch.randn(5, 40).bfloat16(), torch.randn(5, 40).bfloat16()
    got = bottleneck_stack(h16, y16, pack(params), [0, 1], SEQ, ln16.weight, ln16.bias)  # fp32 adapters
    assert_close(got, bottleneck_stack_ref(h16, y16, ln16.weight, ln16.bias, pack(params),
                                           expand_routes(torch.tensor([0, 1]), h16), SEQ), torch.bfloat16)  # fmt: skip

    with torch.inference_mode():
        packed = pack(params)
        got = bottleneck_stack(h.detach(), y.detach(), packed, [0, 1], SEQ, ln.weight, ln.bias)
    assert_close(got, ah_stack(h, y, ln, params, SEQ).detach())

    empty = [torch.randn(0, 40, requires_grad=True) for _ in range(2)]
    out = bottleneck_stack(*empty, pack(params), [0, 1], SEQ, ln.weight, ln.bias)
    grads = torch.autograd.grad(out, [*empty, ln.weight, ln.bias], torch.randn(0, 40))
    assert [tuple(g.shape) for g in grads] == [(0, 40), (0, 40), (40,), (40,)]
    assert all(not g.any() for g in grads[2:])

    ht, yt = torch.randn(40, 6).t(), torch.randn(40, 6).t()
    with torch.no_grad():
        for o, levels in ((SEQ, [0, 1]), (SEQ, [-1]), (StackOptions(original_ln_after=False), [-1])):
            got = bottleneck_stack(ht, yt, pack(params), levels, o, ln.weight, ln.bias)
            assert got.is_contiguous()
            assert_close(got, ah_stack(ht, yt, ln, [params[i] for i in levels if i >= 0], o))


def test_torch_compile_with_routes_on_the_host():
    """Routes as a host list or a CPU tensor trace without a graph break (their values are data while tracing:
    the path then runs without the host's per-level view)."""
    import torch._dynamo

    params = make_params(40, [8, 16], ["relu", "gelu"])
    ln = make_ln(40)
    h, y = torch.randn(6, 40), torch.randn(6, 40)
    for routes in ([0, 1], torch.tensor([0, 1])):
        torch._dynamo.reset()
        fn = torch.compile(lambda h, y, r: bottleneck_stack(h, y, pack(params), r, SEQ, ln.weight, ln.bias),
                           fullgraph=True, backend="eager")  # fmt: skip
        assert_close(fn(h, y, routes), ah_stack(h, y, ln, params, SEQ))


def test_eager_training_calls_the_launchers_directly_and_compile_keeps_the_ops(monkeypatch):
    """Eager training runs an autograd Function that calls the launchers itself (the custom-op dispatcher was about
    a third of a fused training step's host time), with the reference's gradients, also for an adapter trained at
    two levels (its gradients add up in fp32); torch.compile traces the registered ops (one node per stack)."""
    import torch._dynamo

    import adapter_engine.kernels.bottleneck as kb

    params = make_params(40, [8, 16], ["gelu", "relu"])
    for p in params:
        for k in ("wd", "bd", "wu", "bu"):
            p[k].requires_grad_(True)
    ln = make_ln(40)
    h, y = torch.randn(9, 40, requires_grad=True), torch.randn(9, 40, requires_grad=True)
    leaves = [h, y] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    grad_out = torch.randn(9, 40)
    calls = []
    real = kb._stack_fwd_op
    monkeypatch.setattr(kb, "_stack_fwd_op", lambda *a: calls.append(1) or real(*a))
    stack = lambda h, y: bottleneck_stack(h, y, pack(params), [0, 1, 0], SEQ, ln.weight, ln.bias)  # noqa: E731
    got = torch.autograd.grad(stack(h, y), leaves, grad_out)
    want = torch.autograd.grad(ah_stack(h, y, ln, [params[0], params[1], params[0]], SEQ), leaves, grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    assert calls == []
    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    again = torch.autograd.grad(compiled(h, y), leaves, grad_out)
    assert calls  # traced through the custom op
    for a, b in zip(again, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)


def test_create_graph_raises_instead_of_wrong_second_derivatives():
    """The fused backward's gradients come from kernels (no graph), so a gradient penalty built on them dropped out
    of the second backward silently. A backward with create_graph=True raises; the reference twin (plain autograd)
    gives higher-order gradients."""
    if not use_triton(torch.empty(0)):
        pytest.skip("the fused backward runs in the interpreter here")
    params = make_params(40, [8], ["tanh"])
    params[0]["wd"].requires_grad_(True)
    ln = make_ln(40)
    h, y = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40)
    out = bottleneck_stack(h, y, pack(params), [0], SEQ, ln.weight, ln.bias)
    with pytest.raises(RuntimeError, match="create_graph=True.*bottleneck_stack_ref"):
        torch.autograd.grad(out.square().sum(), params[0]["wd"], create_graph=True)
    torch.autograd.grad(out.square().sum(), params[0]["wd"])  # (a first derivative as usual)


def test_one_adapter_packed_before_it_trains_gets_its_gradients():
    """A one-adapter pack holds the adapter's own weights (no copy): ``requires_grad_()`` after packing reaches them,
    but the pack's host facts said the adapter did not train, so its weight gradients came back as zeros."""
    params = make_params(40, [8], ["gelu"])
    ln = make_ln(40)
    packed = pack(params)
    for k in ("wd", "bd"):  # (the up weight is a copy, the up bias a view made before: they follow the pack)
        params[0][k].requires_grad_(True)
    h, y = torch.randn(6, 40), torch.randn(6, 40)
    grad_out = torch.randn(6, 40)
    leaves = [params[0][k] for k in ("wd", "bd")]
    got = torch.autograd.grad(bottleneck_stack(h, y, packed, [0], SEQ, ln.weight, ln.bias), leaves, grad_out)
    want = torch.autograd.grad(ah_stack(h, y, ln, params, SEQ), leaves, grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)


def _two_levels_case():
    """(params, model LN, h, y, packed) of two adapters (ranks 8 and 16) at hidden 40, 9 rows."""
    params = make_params(40, [8, 16], ["gelu", "relu"])
    return params, make_ln(40), torch.randn(9, 40), torch.randn(9, 40), pack(params)


def test_levels_path_operands_follow_the_weights(levels_path):
    """The per-adapter GEMM operands are kept between inference calls: an in-place update of the packed weights
    rebuilds them, and they go when the packed stack is freed."""
    import gc

    from adapter_engine.kernels import bottleneck_gemm

    params, ln, h, y, packed = _two_levels_case()
    with torch.no_grad():
        first = bottleneck_stack(h, y, packed, [0, 1], SEQ, ln.weight, ln.bias)
        assert len(bottleneck_gemm._OPERANDS) >= 2
        packed.wu.mul_(2.0)
        packed.bd.add_(0.5)
        for p in params:
            p["wu"] = p["wu"] * 2.0
            p["bd"] = p["bd"] + 0.5
        second = bottleneck_stack(h, y, packed, [0, 1], SEQ, ln.weight, ln.bias)
    assert not torch.allclose(first, second)
    assert_close(second, ah_stack(h, y, ln, params, SEQ))
    keys = [k for k in bottleneck_gemm._OPERANDS if k[2] == id(packed.wu)]
    assert len(keys) == 2
    del packed
    gc.collect()
    assert not any(k in bottleneck_gemm._OPERANDS for k in keys)


def test_a_graph_capture_reads_the_cached_operands_and_stores_none(levels_path):
    """While a CUDA graph is captured (here the CPU stand-in's flag), the level path reads the operands an earlier
    call cached and hands them to the capture to keep alive, instead of rebuilding them in the graph (on every
    replay); operands it has to build there are never stored (their memory is the graph's)."""
    from adapter_engine.kernels import _backend, bottleneck_gemm

    params, ln, h, y, packed = _two_levels_case()
    with torch.no_grad():
        want = bottleneck_stack(h, y, packed, [0, 1], SEQ, ln.weight, ln.bias)
        cached = [v[1] for k, v in bottleneck_gemm._OPERANDS.items() if k[2] == id(packed.wu)]
        assert len(cached) == 2
        with _backend.capture_on_cpu(), _backend.keeping_alive() as kept:
            got = bottleneck_stack(h, y, packed, [0, 1], SEQ, ln.weight, ln.bias)
        assert all(any(ops is k for k in kept) for ops in cached)
        fresh = pack(params)
        with _backend.capture_on_cpu():
            again = bottleneck_stack(h, y, fresh, [0, 1], SEQ, ln.weight, ln.bias)
        assert not any(k[2] == id(fresh.wu) for k in bottleneck_gemm._OPERANDS)
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("path", ["rows", "levels"])
@pytest.mark.parametrize("training", [(2,), (1,)], ids=["top-trains", "middle-trains"])
def test_backward_stops_below_the_lowest_training_level(monkeypatch, path, training):
    """When neither h, y nor the model LN want a gradient (the first layer's stack in adapter training), the levels
    below the lowest one that trains are not run; the adapters' gradients still match the oracle's."""
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_dispatch

    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", path)
    levels_run = []
    kernel = bottleneck_bwd._bottleneck_level_bwd_kernel
    real_levels = bottleneck_bwd.level_bwd_levels

    class CountingKernel:
        arg_names = kernel.arg_names  # (planned as the kernel's DirectLaunch, which launches it through Triton here)

        def __getitem__(self, grid):
            levels_run.append("kernel")
            return kernel[grid]

    monkeypatch.setattr(bottleneck_bwd, "_bottleneck_level_bwd_kernel", CountingKernel())
    monkeypatch.setattr(bottleneck_bwd, "_RECORDED", {})  # (launches recorded with the kernel itself)
    monkeypatch.setattr(bottleneck_bwd, "level_bwd_levels", lambda *a: levels_run.append("levels") or real_levels(*a))
    params = make_params(40, [8, 16, 12], ["relu", "gelu", "tanh"])
    for i in training:
        for k in ("wd", "bd", "wu", "bu"):
            params[i][k].requires_grad_(True)
    ln = make_ln(40).requires_grad_(False)
    h, y = torch.randn(11, 40), torch.randn(11, 40)
    leaves = [params[i][k] for i in training for k in ("wd", "bd", "wu", "bu")]
    got = torch.autograd.grad(bottleneck_stack(h, y, pack(params), [0, 1, 2], SEQ, ln.weight, ln.bias), leaves,
                              torch.ones(11, 40))  # fmt: skip
    want = torch.autograd.grad(ah_stack(h, y, ln, params, SEQ), leaves, torch.ones(11, 40))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1e-3), rtol=1e-4)
    assert levels_run == [path.replace("rows", "kernel")] * (3 - min(training))


def test_torch_activation_derivatives_match_autograd():
    """The cuBLAS level backward's derivatives (twins of the kernel's _activation_grad) against autograd."""
    from adapter_engine.kernels.bottleneck_pack import _TORCH_ACT_GRADS, _TORCH_ACTS

    z = torch.cat([torch.randn(500, dtype=torch.float64) * 3, torch.tensor([0.0, 1e-3, -1e-3], dtype=torch.float64)])
    for code, act in _TORCH_ACTS.items():
        zz = z.clone().requires_grad_()
        (want,) = torch.autograd.grad(act(zz).sum(), zz)
        torch.testing.assert_close(_TORCH_ACT_GRADS[code](z), want, rtol=1e-6, atol=1e-6, msg=f"code {code}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_levels_path_half_error_no_larger_than_torch(levels_path, dtype):
    """In half precision the path rounds between levels as the eager modules do: its error against fp64 stays
    within plain torch's in that dtype (the CUDA tier's rule)."""
    hidden, rows = 64, 50
    params = make_params(hidden, [16, 8, 24], ["gelu", "relu", "swish"], dtype=dtype)
    ln = make_ln(hidden, dtype)
    h, y = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    got = bottleneck_stack(h, y, pack(params), torch.tensor([0, 1, 2]), SEQ, ln.weight, ln.bias)
    assert got.dtype == dtype
    p64 = [{k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()} for p in params]
    ln64 = make_ln(hidden, torch.float64)
    ln64.load_state_dict(ln.state_dict())
    fp64 = ah_stack(h.double(), y.double(), ln64, p64, SEQ)
    e_got, e_plain = _errors(got, fp64, ah_stack(h, y, ln, params, SEQ))
    assert e_got.max() <= 1.5 * e_plain.max(), (e_got.max().item(), e_plain.max().item())
    assert e_got.mean() <= 1.5 * e_plain.mean(), (e_got.mean().item(), e_plain.mean().item())


def test_forward_path_choice(monkeypatch):
    """Wide weights send one stack on every row to the GEMM path untimed; narrow ones and mixed rows to the kernel;
    forcing the GEMM path on mixed rows is an error; the routes' per-level adapters come from the host hint (inside a
    CUDA-graph capture from it alone: no device read)."""
    from adapter_engine.kernels import _backend, bottleneck_dispatch, bottleneck_fwd, bottleneck_gemm

    assert bottleneck_gemm.prefer_levels(4096, 256, torch.bfloat16)  # Llama-shaped: 4 MB per level
    assert not bottleneck_gemm.prefer_levels(768, 48, torch.bfloat16)  # BERT-base: 147 KB
    assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, -1, 2]]).expand(5, 3)) == (0, -1, 2)
    assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, 1]] * 4), [[0], [1]]) is None  # rows may differ
    assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, 1]]).expand(4, 2), [[0], []]) == (0, -1)
    assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, 1]]).expand(4, 2), [[0, 1], [1]]) is None
    with _backend.capture_on_cpu():  # a capture reads no routes from the device (a sync); the host hint serves
        assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, -1, 2]]).expand(5, 3)) is None
        assert bottleneck_dispatch.uniform_levels(torch.tensor([[0, 1]]).expand(4, 2), [[0], []]) == (0, -1)

    ran = []
    gemm = bottleneck_fwd.stack_fwd_levels
    monkeypatch.setattr(bottleneck_fwd, "stack_fwd_levels", lambda *a, **k: ran.append("levels") or gemm(*a, **k))
    params = make_params(40, [8, 16], ["relu", "gelu"])
    ln = make_ln(40)
    h, y = torch.randn(9, 40), torch.randn(9, 40)
    mixed = torch.tensor([[0, 1]] * 5 + [[1, -1]] * 4)
    with torch.no_grad():
        bottleneck_stack(h, y, pack(params), torch.tensor([0, 1]), SEQ, ln.weight, ln.bias)
        assert ran == []  # narrow: the row-block kernel
        monkeypatch.setattr(bottleneck_gemm, "LEVEL_WEIGHT_BYTES", 1)
        got = bottleneck_stack(h, y, pack(params), torch.tensor([0, 1]), SEQ, ln.weight, ln.bias)
        assert ran == ["levels"]
        assert_close(got, ah_stack(h, y, ln, params, SEQ))
        bottleneck_stack(h, y, pack(params), mixed, SEQ, ln.weight, ln.bias)
        assert ran == ["levels"]  # mixed rows: the kernel
        monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", "levels")
        with pytest.raises(ValueError, match="one stack on every row"):
            bottleneck_stack(h, y, pack(params), mixed, SEQ, ln.weight, ln.bias)
        with pytest.raises(ValueError, match="name one of the 2 packed adapters"):  # (checked before any path)
            bottleneck_stack(h, y, pack(params), [0, 5], SEQ, ln.weight, ln.bias)


def test_forward_tuning_times_the_levels_path_against_the_kernel(monkeypatch):
    """On a GPU, one stack over enough rows times the GEMM path beside the kernel's tiles and keeps the faster (run
    here with a CPU timer, the interpreter switch off for the launcher): both ran, the saved pre-activations were
    reset after timing, and forward and gradients match the oracle whichever won."""
    import time

    import triton

    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_fwd

    kinds = []

    def cpu_bench(fn, warmup, rep):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    real_gemm = bottleneck_fwd.stack_fwd_levels
    monkeypatch.setattr(triton.testing, "do_bench", cpu_bench)
    monkeypatch.setattr(
        bottleneck_fwd, "stack_fwd_levels", lambda *a, **k: kinds.append("levels") or real_gemm(*a, **k)
    )
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    monkeypatch.setattr(bottleneck_dispatch, "INTERPRET", False)
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED", {})
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED_GRAPHED", {})
    monkeypatch.setattr(bottleneck_dispatch, "TUNE_MIN_ROWS", 16)
    monkeypatch.setattr(bottleneck_fwd, "_forward_candidates", lambda first, save: (first,))
    params, ln, h, y = _trainable_stack(48, 40, [12, 20, 16], ["relu", "gelu", "tanh"])
    got = bottleneck_stack(h, y, pack(params), torch.tensor([0, 1, 2]), SEQ, ln.weight, ln.bias)
    key, choice = next(iter(bottleneck_dispatch._TUNED.items()))
    assert key[0] == "forward" and len(bottleneck_dispatch._TUNED) == 1
    assert kinds.count("levels") == (2 if choice == bottleneck_dispatch.LEVELS else 1)  # timed, then run if it won
    _assert_matches_oracle(got, params, ln, h, y, torch.tensor([0, 1, 2]))


def _split_tuner(monkeypatch, graphed: str | None = None) -> list:
    """The forward tuner, without timing anything, keeps the row kernel for eager calls and the level path (or the
    ``graphed`` one of its forms, where offered) for CUDA-graph captures, in fresh tables (and a fresh operand cache)
    from 16 rows on; returns the list that each run of the level path appends to."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_fwd, bottleneck_gemm
    from adapter_engine.kernels._backend import Timing

    def tuner(candidates, launch, device):
        tile = next(c for c in candidates if c not in bottleneck_dispatch.LEVEL_PATHS)
        choice = graphed if graphed in candidates else bottleneck_dispatch.LEVELS
        return Timing(tile, choice, [1.0] * len(candidates), None)

    levels_runs = []
    real_levels = bottleneck_fwd.stack_fwd_levels
    monkeypatch.setattr(
        bottleneck_fwd, "stack_fwd_levels", lambda *a, **k: levels_runs.append(1) or real_levels(*a, **k)
    )
    monkeypatch.setattr(bottleneck_dispatch, "fastest", tuner)
    monkeypatch.setattr(bottleneck_dispatch, "AUTOTUNE", True)
    monkeypatch.setattr(bottleneck_dispatch, "INTERPRET", False)
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED", {})
    monkeypatch.setattr(bottleneck_dispatch, "_TUNED_GRAPHED", {})
    monkeypatch.setattr(bottleneck_dispatch, "TUNE_MIN_ROWS", 16)
    monkeypatch.setattr(bottleneck_gemm, "_OPERANDS", {})
    return levels_runs


def test_eager_calls_build_the_level_operands_a_capture_will_take(monkeypatch):
    """A key whose eager calls take the row kernel while CUDA-graph captures take the level path: each eager call
    builds (once) and caches the level path's GEMM operands for its pack, so a capture of a later call finds them
    instead of building them inside the graph (session 15's H100 run: an uncached build there failed the capture,
    and would otherwise replay its copies every time). The eager call itself runs the row kernel alone."""
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_gemm

    levels_runs = _split_tuner(monkeypatch)
    params, ln = make_params(40, [12, 20, 16], ["relu", "gelu", "tanh"]), make_ln(40)
    with torch.no_grad():
        packed = pack(params)
    h, y, routes = torch.randn(48, 40), torch.randn(48, 40), torch.tensor([0, 1, 2])

    def call():
        with torch.no_grad():
            return bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias, level_adapters=[[0], [1], [2]])

    got = call()
    assert list(bottleneck_dispatch._TUNED_GRAPHED.values()) == [bottleneck_dispatch.LEVELS] and not levels_runs
    cached = {k[4]: v[1] for k, v in bottleneck_gemm._OPERANDS.items() if k[0] == id(packed.wd)}
    assert sorted(cached) == [0, 1, 2]
    call()
    again = {k[4]: v[1] for k, v in bottleneck_gemm._OPERANDS.items() if k[0] == id(packed.wd)}
    assert all(again[a] is cached[a] for a in cached)  # built once
    with torch.no_grad():
        want = bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("graphed", ["levels on cuBLAS", "levels, boundaries fused"])
@pytest.mark.parametrize("routed", [False, True])
def test_a_captured_model_forward_takes_the_graphed_choice_on_cached_operands(monkeypatch, routed, graphed):
    """A whole model (BERT, a stack of three seq_bn adapters per layer, set active or routed): where the tuner keeps
    the row kernel for eager calls and the level path (as it is, or chained) for CUDA-graph captures, eager forwards
    run the kernel, and a forward captured (here its CPU stand-in) runs the level path in every layer, on the GEMM
    operands the eager calls cached: it builds none. Its output matches the eager forward's."""
    from transformers import BertConfig, BertModel

    import adapter_engine as ae
    from adapter_engine.kernels import bottleneck_dispatch, bottleneck_fwd, bottleneck_gemm
    from adapter_engine.kernels._backend import capture_on_cpu

    assert graphed in bottleneck_dispatch.LEVEL_PATHS
    levels_runs, builds = _split_tuner(monkeypatch, graphed), []
    monkeypatch.setattr(bottleneck_fwd, "_forward_candidates", lambda first, save: (first,))
    chained = []
    real_boundary = bottleneck_gemm.level_boundary_fwd
    monkeypatch.setattr(bottleneck_gemm, "level_boundary_fwd", lambda *a: chained.append(1) or real_boundary(*a))
    real_operands = bottleneck_gemm._level_operands

    def operands(packed, *args):
        before = len(bottleneck_gemm._OPERANDS)
        got = real_operands(packed, *args)
        if not any(got is v[1] for v in bottleneck_gemm._OPERANDS.values()) or len(bottleneck_gemm._OPERANDS) > before:
            builds.append(args[0])
        return got

    monkeypatch.setattr(bottleneck_gemm, "_level_operands", operands)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    for name in ("a", "b", "c"):
        ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.normal_(0.0, 0.3)
    stack = ae.Stack("a", "b", "c")
    if not routed:
        ae.set_active_adapters(model, stack)
    batch = torch.randint(0, 64, (4, 8))  # 32 rows

    def forward():
        with torch.no_grad(), ae.use_adapters(stack) if routed else contextlib.nullcontext():
            return model(input_ids=batch).last_hidden_state

    eager = forward()
    forward()
    assert not levels_runs and set(bottleneck_dispatch._TUNED_GRAPHED.values()) == {graphed}
    built = len(builds)
    assert built == 3 * 2  # each layer's three adapters, once
    with capture_on_cpu():
        captured = forward()
    assert len(levels_runs) == 2 and len(builds) == built
    # three levels: four boundaries
    assert len(chained) == (2 * 4 if graphed == bottleneck_dispatch.LEVELS_FUSED else 0)
    torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-4)


def test_gradients_fp16_native_operands():
    """fp16 weights take the GPU's native-operand dots in the interpreter too (its fp16 dot is exact in fp32).
    Tolerance: operands rounded to fp16 (2^-11 relative) before each dot, results rounded once: 5e-3 of the
    largest gradient."""
    hidden, rows = 40, 33
    params = make_params(hidden, [8, 16], ["gelu", "swish"], dtype=torch.float16)
    for k in ("wd", "bd", "wu", "bu"):
        params[1][k].requires_grad_(True)
    ln = make_ln(hidden, torch.float16).requires_grad_(False)
    h = torch.randn(rows, hidden).half().requires_grad_()
    y = torch.randn(rows, hidden).half().requires_grad_()
    grad_out = torch.randn(rows, hidden).half()
    leaves = [h, y] + [params[1][k] for k in ("wd", "bd", "wu", "bu")]
    got = torch.autograd.grad(bottleneck_stack(h, y, pack(params), torch.tensor([0, 1]), SEQ, ln.weight, ln.bias),
                              leaves, grad_out)  # fmt: skip
    p32 = [{k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in p.items()}
           for p in params]  # fmt: skip
    ln32 = make_ln(hidden).requires_grad_(False)
    ln32.load_state_dict(ln.state_dict())
    h32, y32 = h.detach().float().requires_grad_(), y.detach().float().requires_grad_()
    leaves32 = [h32, y32] + [p32[1][k] for k in ("wd", "bd", "wu", "bu")]
    want = torch.autograd.grad(ah_stack(h32, y32, ln32, p32, SEQ), leaves32, grad_out.float())
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b, atol=5e-3 * b.abs().max().item(), rtol=5e-3)


# --------------------------------------------------------------------------------------------------- modules
def _adapter_params(adapter: BottleneckAdapter) -> dict:
    p = {
        "wd": adapter.down.weight,
        "bd": adapter.down.bias,
        "wu": adapter.adapter_up.weight,
        "bu": adapter.adapter_up.bias,
        "act": adapter.non_linearity,
        "scaling": adapter.scaling,
        "dropout": adapter.dropout.p if adapter.training else 0.0,
    }
    if adapter.options.ln_before:
        p["lnb"] = (adapter.adapter_norm_before.weight, adapter.adapter_norm_before.bias)
    if adapter.options.ln_after:
        p["lna"] = (adapter.adapter_norm_after.weight, adapter.adapter_norm_after.bias)
    return p


class _OracleBertOutput(torch.nn.Module):
    """Hand-written AdapterHub-style BertOutput: dense, dropout, then ah_stack with the model LayerNorm."""

    def __init__(self, original, adapters, options):
        super().__init__()
        self.original, self.adapters, self.options = original, adapters, options

    def forward(self, hidden_states, input_tensor):
        h = self.original.dropout(self.original.dense(hidden_states))
        params = [_adapter_params(a) for a in self.adapters]
        return ah_stack(h, input_tensor, self.original.LayerNorm, params, self.options)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval()


def _bert_adapters(hidden, names, options: StackOptions, acts=("relu", "gelu", "tanh")):
    kw = {
        k: getattr(options, k) for k in ("is_parallel", "original_ln_before", "original_ln_after", "residual_before_ln")
    }
    out = {}
    for i, n in enumerate(names):
        a = BottleneckAdapter(hidden, [6, 12, 3][i % 3], acts[i % len(acts)], [1.0, 0.5, 2.0][i % 3], **kw)
        with torch.no_grad():  # "bert" init is near zero: make the adapters matter
            for prm in a.parameters():
                prm.normal_(0.0, 0.3)
        out[n] = a
    return out


def _sublayers(model, houlsby):
    for layer in model.encoder.layer:
        yield layer, "output"
        if houlsby:
            yield layer.attention, "output"


@pytest.mark.parametrize("name", ["seq_bn", "par_bn", "own_layer_norms"])
def test_adapter_dropout_in_training_sits_where_adapterhubs_does(monkeypatch, name):
    """AdapterHub's BnConfig ``dropout``: in training mode a mask on the scaled up-projection, before the adapter's own
    LayerNorm and the residual; identity in eval mode. A stack with it runs the eager modules in training mode even
    where the fused op would run (TRAIN_FUSED, on in this file; or no autograd): the fused op has no dropout. Such
    adapters used to be refused ("only 0.0"). Checked bit for bit against adapters 1.3.0 in training mode (same seed)
    on BERT, RoBERTa, DistilBERT, GPT-2, Llama and ViT (tests/fixtures/adapterhub/dropout for BERT)."""
    import adapter_engine.bottleneck as bn

    options = {"seq_bn": SEQ, "par_bn": PAR, "own_layer_norms": StackOptions(ln_before=True, ln_after=True)}[name]
    calls = []
    real = bn.bottleneck_stack
    monkeypatch.setattr(bn, "bottleneck_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tiny_bert()
    w = wrap_sublayer(model.encoder.layer[0], "output")
    kw = {k: getattr(options, k) for k in ("is_parallel", "original_ln_before", "ln_before", "ln_after")}
    for i, rate in enumerate([0.3, 0.0, 0.5]):
        a = BottleneckAdapter(48, [6, 12, 3][i], ["relu", "gelu", "tanh"][i], [1.0, 0.5, 2.0][i], dropout=rate, **kw)
        with torch.no_grad():
            for prm in a.parameters():
                prm.normal_(0.0, 0.3)
        w.add_adapter(f"drop{i}", a)
    names = ["drop0", "drop1", "drop2"]
    w.set_active_stack(names)
    oracle = _OracleBertOutput(w.original, [w.adapters[n] for n in names], options)
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 48)
    with torch.no_grad():
        w.eval()
        served = w(x, y)  # eval: no dropout, the fused op
        assert calls == [1]
        assert_close(served, oracle(x, y))
    w.train()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.manual_seed(7)
            got = w(x, y)
            torch.manual_seed(7)
            want = oracle(x, y)
        assert calls == [1]  # training mode with dropout: the eager modules, with autograd or without
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # the same masks, drawn in the same order
        assert (got - served).abs().max() > 1e-2  # the masks really drop
    torch.manual_seed(7)
    w(x, y).sum().backward()
    assert all(w.adapters[n].adapter_up.weight.grad is not None for n in names)
    w.adapters["drop0"].dropout.p = w.adapters["drop2"].dropout.p = 0.0  # no rate left: the fused op trains again
    w(x, y).sum().backward()
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="dropout must be a number in"):
        BottleneckAdapter(48, 6, dropout=1.5)


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
def test_bert_model_matches_adapterhub_style_eager(config):
    options = {"seq_bn": SEQ, "double_seq_bn": HOULSBY, "par_bn": PAR}[config]
    model = _tiny_bert()
    ids = torch.randint(0, 99, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keys_before = set(model.state_dict())
    names = ["general", "cardio", "paed"]
    stacks = {}
    for parent, attr in _sublayers(model, houlsby=config == "double_seq_bn"):
        wrapper = wrap_sublayer(parent, attr, OutputWithAdapters)
        for n, a in _bert_adapters(48, names, options).items():
            wrapper.add_adapter(n, a)
        wrapper.set_active_stack(names)
        stacks[(id(parent), attr)] = wrapper
    # base keys unchanged, adapters under AdapterHub's keys
    keys = set(model.state_dict())
    assert keys_before <= keys
    assert "encoder.layer.0.output.adapters.cardio.adapter_down.0.weight" in keys
    assert "encoder.layer.1.output.adapters.paed.adapter_up.bias" in keys
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for w in stacks.values():
            w.fused = False
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for w in stacks.values():
            w.fused = True
    # the oracle: swap in hand-written AdapterHub-style modules
    for parent, attr in _sublayers(model, houlsby=config == "double_seq_bn"):
        w = getattr(parent, attr)
        setattr(parent, attr, _OracleBertOutput(w.original, [w.adapters[n] for n in names], options))
    with torch.no_grad():
        oracle = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for (pid, attr), w in stacks.items():
        parent = next(p for p, a in _sublayers(model, True) if id(p) == pid and a == attr)
        setattr(parent, attr, w)
    valid = mask.bool()
    assert (fused - bare)[valid].abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(fused[valid], oracle[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eager[valid], oracle[valid], atol=1e-4, rtol=1e-4)
    # depth 0 is the unpatched model, bit for bit; depth control needs no rebuild
    for w in stacks.values():
        w.set_depth(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, bare)
    # unwrapping restores the original modules and keys
    for parent, attr in _sublayers(model, houlsby=config == "double_seq_bn"):
        unwrap_sublayer(parent, attr)
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, bare)


def test_a_wrapper_runs_adapter_weights_given_to_functional_call():
    """``torch.func.functional_call`` swaps the adapters' tensors through their modules' ``_parameters`` (no
    registration hook sees it): a plain wrapper's pack memo ran the pack of its own weights instead."""
    from torch.func import functional_call

    wrapper = wrap_sublayer(_tiny_bert().encoder.layer[0], "output")
    for n, a in _bert_adapters(48, ["a"], SEQ).items():
        wrapper.add_adapter(n, a)
    wrapper.set_active_stack(["a"])
    given = {f"adapters.{n}": p.detach() + 0.2 * torch.randn_like(p) for n, p in wrapper.adapters.named_parameters()}
    h, y = torch.randn(2, 7, 64), torch.randn(2, 7, 48)
    other = copy.deepcopy(wrapper)
    other.load_state_dict(given, strict=False)
    with torch.no_grad():
        own = wrapper(h, y)
        for _ in range(2):
            torch.testing.assert_close(functional_call(wrapper, given, (h, y)), other(h, y), atol=1e-5, rtol=0)
            torch.testing.assert_close(wrapper(h, y), own, atol=0, rtol=0)


def test_stack_controls_depth_levels_and_row_stacks():
    model = _tiny_bert()
    ids = torch.randint(0, 99, (3, 9))
    names = ["a", "b", "c"]
    wrappers = []
    for layer in model.encoder.layer:
        w = wrap_sublayer(layer, "output")
        for n, a in _bert_adapters(48, names, SEQ).items():
            w.add_adapter(n, a)
        wrappers.append(w)

    def run(stack, depth=None, off=()):
        for w in wrappers:
            w.set_active_stack(stack)
            w.set_depth(depth)
            for lvl in range(3):
                w.set_level_enabled(lvl, lvl not in off)
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state

    full, depth2, two = run(names), run(names, depth=2), run(["a", "b"])
    torch.testing.assert_close(depth2, two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(names, off=(1,)), run(["a", "c"]), atol=1e-5, rtol=1e-5)
    assert (full - two).abs().max() > 1e-2
    # a different stack per row in one batch equals running each row with its own stack
    rows = [["a", "b", "c"], ["c"], [None, "b"]]
    for w in wrappers:
        w.set_active_stack(names)
        w.set_depth(None)
        w.set_row_stacks(rows)
    with torch.no_grad():
        mixed = model(input_ids=ids).last_hidden_state
    for w in wrappers:
        w.set_row_stacks(None)
    for i, stack in enumerate([["a", "b", "c"], ["c"], ["b"]]):
        torch.testing.assert_close(mixed[i], run(stack)[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown adapters"):
        wrappers[0].set_active_stack(["nope"])
    wrappers[0].add_adapter("houlsby", BottleneckAdapter(48, 3, original_ln_before=False))
    wrappers[0].set_active_stack(["a", "houlsby"])
    with pytest.raises(ValueError, match="structural options"):
        with torch.no_grad():
            model(input_ids=ids)


def test_training_the_top_adapter_matches_eager_gradients():
    model = _tiny_bert()
    for prm in model.parameters():
        prm.requires_grad_(False)
    ids = torch.randint(0, 99, (2, 7))
    names = ["a", "b", "c"]
    wrappers = []
    for layer in model.encoder.layer:
        w = wrap_sublayer(layer, "output")
        for n, a in _bert_adapters(48, names, SEQ).items():
            a.requires_grad_(n == "c")
            w.add_adapter(n, a)
        w.set_active_stack(names)
        wrappers.append(w)
    grads = {}
    for fused in (True, False):
        for w in wrappers:
            w.fused = fused
            w.zero_grad(set_to_none=True)
        y = model(input_ids=ids).last_hidden_state  # (weighted: the mean square of a LayerNormed output is flat)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert all(".adapters.c." in n for n in grads[fused])
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 8
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4)


def test_the_prepared_plan_follows_every_setter():
    """A layer reuses its prepared plan (names, routes, options) between calls; each setter, adding and deleting
    adapters change what the next call runs, fused and eager alike."""
    model = _tiny_bert()
    w = wrap_sublayer(model.encoder.layer[0], "output")
    for n, a in _bert_adapters(48, ["a", "b", "c"], SEQ).items():
        w.add_adapter(n, a)
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 48)

    def both():
        with torch.no_grad():
            w.fused = True
            fused = w(x, y)
            w.fused = False
            eager = w(x, y)
        assert_close(fused, eager)
        return fused

    w.set_active_stack(["a", "b", "c"])
    before = both()
    steps = [
        lambda: w.set_active_stack(["b", "a", "c"]),
        lambda: w.set_depth(1),
        lambda: w.set_depth(None),
        lambda: w.set_level_enabled(0, False),
        lambda: w.set_level_enabled(0, True),
        lambda: w.set_row_stacks([["c"], ["a", "b"]]),
        lambda: w.add_adapter("c", _bert_adapters(48, ["x"], SEQ)["x"]),
        lambda: w.set_row_stacks(None),
        lambda: w.delete_adapter("c"),
    ]
    for i, step in enumerate(steps):
        step()
        out = both()
        assert not torch.equal(out, before), i
        before = out


def test_default_dispatch_trains_through_the_eager_modules(monkeypatch):
    """``TRAIN_FUSED`` off (the default: the fused backward measured slower on an H100): a stack that autograd
    records runs the eager modules, inference (no_grad, or nothing requiring grad) the fused op; and a frozen stack
    whose input needs a gradient (a LoRA training below it) counts as training."""
    import adapter_engine.bottleneck as bn

    monkeypatch.setattr(bn, "TRAIN_FUSED", False)
    calls = []
    real = bn.bottleneck_stack
    monkeypatch.setattr(bn, "bottleneck_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tiny_bert()
    for prm in model.parameters():
        prm.requires_grad_(False)
    w = wrap_sublayer(model.encoder.layer[0], "output")
    for n, a in _bert_adapters(48, ["a", "b"], SEQ).items():
        a.requires_grad_(n == "b")
        w.add_adapter(n, a)
    w.set_active_stack(["a", "b"])
    ids = torch.randint(0, 99, (2, 7))
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert calls == [] and w.adapters["b"].adapter_up.weight.grad is not None  # trained, through the eager modules
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == [1]
    w.adapters["b"].requires_grad_(False)
    model(input_ids=ids)  # nothing requires grad: inference
    assert calls == [1, 1]
    x = torch.randn(2, 7, 64, requires_grad=True)
    w(x, torch.randn(2, 7, 48)).sum().backward()  # the input trains: eager
    assert calls == [1, 1] and x.grad is not None


def test_a_layer_serving_stacks_in_turn_packs_each_once(monkeypatch):
    """Stacks served in turn are packed once each, and what the layer keeps is bounded: the packs other than the most
    recently used one add up to at most the largest pack's bytes. An update in place packs again; every call matches
    the eager modules."""
    import adapter_engine.bottleneck as bn

    packs = []
    real = bn.pack_modules
    monkeypatch.setattr(bn, "pack_modules", lambda adapters, *a: packs.append(len(adapters)) or real(adapters, *a))
    model = _tiny_bert()
    w = wrap_sublayer(model.encoder.layer[0], "output")
    for n in "abc":  # one rank: a pack's bytes grow with its adapters
        w.add_adapter(n, BottleneckAdapter(48, 6, "relu"))
        with torch.no_grad():
            for prm in w.adapters[n].parameters():
                prm.normal_(0.0, 0.3)
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 48)

    def serve(*names):
        w.set_active_stack(list(names))
        with torch.no_grad():
            got = w(x, y)
            w.fused = False
            eager = w(x, y)
            w.fused = True
        assert_close(got, eager)

    def kept():
        return [k[1] for k in w._cache if k[0] == "packed"]  # least recent first

    for _ in range(3):
        serve("a")
        serve("b")
    assert packs == [1, 1] and kept() == [("a",), ("b",)]
    serve("a", "b", "c")  # a and b together are smaller than the three
    assert packs == [1, 1, 3] and kept() == [("a",), ("b",), ("a", "b", "c")]
    serve("a")  # kept: now the most recent, and the three's pack fills the rest of the budget, so b's goes
    assert packs == [1, 1, 3] and kept() == [("a", "b", "c"), ("a",)]
    serve("c")
    assert packs == [1, 1, 3, 1] and kept() == [("a",), ("c",)]
    with torch.no_grad():
        w.adapters["a"].adapter_up.weight.mul_(2.0)  # (its version moves: packed again)
    serve("a")
    assert packs == [1, 1, 3, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_serving_layer_repeats_its_planned_launch_until_something_it_read_changes(monkeypatch, dtype):
    """Without autograd a wrapped sublayer plans its launch (``bottleneck_stack(return_launch=True)``: the op's
    checks, the routes, the tiles) once and repeats it. Each change below plans again, and every call matches the eager
    modules: another batch shape, other strides, an update in place, a replaced weight, another stack, another
    LayerNorm weight, another forced path. A geometry seen a few calls before keeps its launch."""
    import adapter_engine.bottleneck as bn
    from adapter_engine.kernels import bottleneck_dispatch

    if not use_triton(torch.empty(1)):
        pytest.skip("the prepared launch is the Triton path's (CUDA or the interpreter)")
    plans = []
    real = bn.bottleneck_stack
    monkeypatch.setattr(
        bn, "bottleneck_stack", lambda *a, **k: plans.extend([1] * k.get("return_launch", 0)) or real(*a, **k)
    )
    model = _tiny_bert()
    w = wrap_sublayer(model.encoder.layer[0], "output")
    for n, a in _bert_adapters(48, ["a", "b"], SEQ).items():
        w.add_adapter(n, a)
    w.set_active_stack(["a", "b"])
    w.to(dtype)  # (half: the interpreter's launch writes fp32 that torch rounds once)
    gen = torch.Generator().manual_seed(0)

    def call(shape=(2, 7), y_transposed=False, expect=None):
        x = torch.randn(*shape, 64, generator=gen).to(dtype)
        y = torch.randn(*shape, 48, generator=gen).to(dtype)
        if y_transposed:  # the same values, other strides
            y = y.transpose(0, 1).contiguous().transpose(0, 1)
        with torch.no_grad():
            got = w(x, y)
            w.fused = False
            eager = w(x, y)
            w.fused = True
        tol = TOL[dtype] if dtype == torch.float32 else (1e-2, 1e-2)  # (eager half rounds every step; stale: O(0.1))
        torch.testing.assert_close(got, eager, rtol=tol[0], atol=tol[1])
        assert len(plans) == expect

    call(expect=1)
    call(expect=1)  # repeated
    call(shape=(3, 5), expect=2)
    call(shape=(3, 5), expect=2)
    call(shape=(2, 5), expect=3)  # the same strides, fewer rows
    call(shape=(2, 5), y_transposed=True, expect=4)
    call(expect=4)  # the first geometry again: its launch was kept
    with torch.no_grad():
        w.adapters["b"].adapter_up.weight.mul_(-2.0)  # a new pack: planned again
    call(shape=(2, 5), y_transposed=True, expect=5)
    w.adapters["a"].adapter_down[0].weight = torch.nn.Parameter(torch.randn(6, 48, generator=gen).to(dtype))
    call(shape=(2, 5), y_transposed=True, expect=6)
    w.set_active_stack(["b"])
    call(shape=(2, 5), y_transposed=True, expect=7)
    w.LayerNorm.weight = torch.nn.Parameter((torch.rand(48, generator=gen) + 0.5).to(dtype))  # another LN weight
    call(shape=(2, 5), y_transposed=True, expect=8)
    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", "levels")  # the cuBLAS path: planned on every call
    call(shape=(2, 5), y_transposed=True, expect=9)
    call(shape=(2, 5), y_transposed=True, expect=9)


@pytest.mark.parametrize("routing", ["one-stack", "mixed-rows"])
def test_a_recorded_launch_runs_its_compiled_kernel_directly_while_the_tensors_are_aligned_alike(
    direct_stand_in, routing
):
    """On a GPU a ``ForwardLaunch`` keeps the compiled kernel of its first launch and repeats it directly: every
    parameter in signature order, the constexprs after the 38 runtime arguments (here a stand-in for the compiled
    kernel runs it in the interpreter). A call whose h is not 16-byte aligned like the recorded one (a Triton
    specialisation) takes Triton's own launch instead."""
    stand_in, direct = direct_stand_in
    params = make_params(40, [12, 20, 16], ["relu", "gelu", "tanh"])
    ln, packed = make_ln(40), pack(params)
    routes = torch.tensor([0, 1, 2]) if routing == "one-stack" else torch.tensor([[0, 1, 2]] * 6 + [[2, 0, -1]] * 5)
    h, y = torch.randn(11, 40), torch.randn(11, 40)
    with torch.no_grad():
        want, launch = bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias, return_launch=True)
    assert launch is not None and launch.direct.compiled is None  # the interpreter's launch returns no compiled one
    repeat = launch._replace(direct=stand_in(launch.direct, 3))
    expanded = expand_routes(routes, h).to(torch.int32)
    h2, y2 = torch.randn(11, 40), torch.randn(11, 40)
    with torch.no_grad():
        torch.testing.assert_close(repeat(h, y, expanded), want, rtol=0, atol=0)
        want2 = bottleneck_stack(h2, y2, packed, routes, SEQ, ln.weight, ln.bias)
        torch.testing.assert_close(repeat(h2, y2, expanded), want2, rtol=0, atol=0)
        assert direct == [launch.direct.grid] * 2
        shifted = torch.empty(11 * 40 + 1)[1:].view(11, 40).copy_(h2)  # 4-byte aligned: Triton's launch
        torch.testing.assert_close(repeat(shifted, y2, expanded), want2, rtol=0, atol=0)
    assert len(direct) == 2


def test_a_launch_recorded_with_its_compiled_kernel_repeats_it_directly_for_operands_aligned_alike(
    monkeypatch, compiled_stand_in
):
    """On a GPU the recorded call's launch returns its compiled kernel (``compiled_kernel``): ``ForwardLaunch.of``
    keeps it with the alignment of h, y and the routes, the operands each repeat checks, so that a repeat with them
    aligned alike (here a y 4-byte aligned both times) calls it directly; alignments of other operands would not
    match. A stand-in for the compiled kernel runs the kernel in the interpreter by its parameter names."""
    from adapter_engine.kernels import bottleneck_fwd

    make, direct = compiled_stand_in
    stand_in = make(bottleneck_fwd._bottleneck_stack_fwd_kernel)
    monkeypatch.setattr(bottleneck_fwd, "compiled_kernel", lambda launched: stand_in)
    params = make_params(40, [12, 20], ["relu", "gelu"])
    ln, packed, routes = make_ln(40), pack(params), torch.tensor([[0, 1]] * 6 + [[1, -1]] * 5)
    shifted = lambda: torch.randn(11 * 40 + 1)[1:].view(11, 40)  # noqa: E731  (4-byte aligned)
    h, y = torch.randn(11, 40), shifted()
    with torch.no_grad():
        want, launch = bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias, return_launch=True)
        assert launch.direct.compiled is stand_in and not direct
        h2, y2 = torch.randn(11, 40), shifted()
        want2 = bottleneck_stack(h2, y2, packed, routes, SEQ, ln.weight, ln.bias)
        torch.testing.assert_close(launch(h2, y2, expand_routes(routes, h2)), want2, rtol=0, atol=0)
    assert len(direct) == 1


@pytest.mark.parametrize("routing", ["one-stack", "mixed-rows"])
def test_training_launches_are_recorded_and_call_their_compiled_kernels_directly_for_tensors_aligned_alike(
    monkeypatch, direct_stand_in, routing
):
    """A training step's kernel launches (the saving forward, the output backward, one level backward per level) are
    recorded per geometry once their tiles are chosen, keyed by what Triton specialises on (each tensor's dtype and
    16-byte alignment, the integer arguments) with the device and constexprs. On a GPU a repeat calls the compiled
    kernel of the first launch directly: every parameter in signature order (here stand-ins for the compiled kernels
    bind the flat arguments back to the parameter names and run them in the interpreter), the output and every
    gradient as through Triton's launch. A tensor aligned otherwise (h 4-byte aligned: the forward and the lowest
    level read it) or of another dtype makes a new key, launched by Triton."""
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_fwd

    stand_in, direct = direct_stand_in
    monkeypatch.setattr(bottleneck_fwd, "_RECORDED", {})
    monkeypatch.setattr(bottleneck_bwd, "_RECORDED", {})
    caches = (bottleneck_fwd._RECORDED, bottleneck_bwd._RECORDED)
    params, ln, h, y = _trainable_stack(40, 11, [12, 20, 16], ["relu", "gelu", "tanh"])
    routes = torch.tensor([0, 1, 2]) if routing == "one-stack" else torch.tensor([[0, 1, 2]] * 6 + [[2, 0, -1]] * 5)
    leaves = [h, y, ln.weight, ln.bias] + [p[k] for p in params for k in ("wd", "bd", "wu", "bu")]
    grad_out = torch.randn(11, 40)

    def step(h):
        out = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias)
        return [out.detach(), *torch.autograd.grad(out, [h, *leaves[1:]], grad_out)]

    want = step(h)  # through Triton's launch: the interpreter's returns no compiled kernel
    # one launch each; the levels' views of the saved tensors and routes are aligned differently here: one key each
    kernels = [launch.kernel.__name__ for cache in caches for launch in cache.values()]
    assert (
        kernels == ["_bottleneck_stack_fwd_kernel", "_bottleneck_out_bwd_kernel"] + ["_bottleneck_level_bwd_kernel"] * 3
    )
    assert all(launch.compiled is None for cache in caches for launch in cache.values())
    for cache in caches:
        for key, launch in cache.items():
            cache[key] = stand_in(launch, 0)  # (the key holds the alignment: nothing left to check)
    grids = sorted(launch.grid for cache in caches for launch in cache.values())
    for got, w in zip(step(h), want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert sorted(direct) == grids
    shifted = torch.empty(11 * 40 + 1)[1:].view(11, 40).copy_(h.detach()).requires_grad_()  # 4-byte aligned
    for got, w in zip(step(shifted), want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert len(direct) == 5 + 3  # the output backward and the two upper levels: the forward and level 0 read h
    assert [len(cache) for cache in caches] == [2, 5]
    half_params = [
        {**p, **{k: p[k].detach().half().requires_grad_() for k in ("wd", "bd", "wu", "bu")}} for p in params
    ]
    out = bottleneck_stack(h.detach().half(), y.detach().half(), pack(half_params), routes, SEQ, ln.weight, ln.bias)
    out.float().sum().backward()
    assert len(direct) == 8 and [len(cache) for cache in caches] == [3, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_recorded_launch_takes_activations_in_their_own_shapes_and_copies_rows_of_uneven_strides(dtype):
    """A repeated launch hands (B, S, H) activations and output to the kernel as they are (their data pointers and
    the recorded strides), with no reshape: for activations whose rows flatten to a view. Rows of uneven strides (a
    slice of longer sequences) were flattened by a copy at the recorded call: the repeat copies them too, and both
    match the op."""
    if not INTERPRET:
        pytest.skip("the recorded launch is the Triton path's")
    params = make_params(40, [12, 20], ["relu", "gelu"])
    for p in params:
        for k in ("wd", "bd", "wu", "bu"):
            p[k] = p[k].to(dtype)
    ln, packed, routes = make_ln(40).to(dtype), pack(params), torch.tensor([0, 1])

    def activations(uneven):
        full = torch.randn(2, 6 if uneven else 5, 40).to(dtype)
        return full[:, :5] if uneven else full

    for uneven in (False, True):
        h, y = activations(uneven), activations(uneven)
        with torch.no_grad():
            _, launch = bottleneck_stack(h, y, packed, routes, SEQ, ln.weight, ln.bias, return_launch=True)
            assert launch.views is not uneven
            h2, y2 = activations(uneven), activations(uneven)
            got = launch(h2, y2, expand_routes(routes, h2))
            want = bottleneck_stack(h2, y2, packed, routes, SEQ, ln.weight, ln.bias)
        assert got.shape == h2.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("parallel", [False, True])
def test_llama_pre_ln_mlp_matches_adapterhub_llama(parallel):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        bare = model(input_ids=ids).last_hidden_state
    options = PAR if parallel else SEQ
    adapters = []
    for layer in model.layers:
        w = wrap_sublayer(layer, "mlp", ResidualOutsideWithAdapters, residual_from=layer.post_attention_layernorm)
        stack = _bert_adapters(32, ["x", "y"], options)
        for n, a in stack.items():
            w.add_adapter(n, a)
        w.set_active_stack(["x", "y"])
        adapters.append([stack["x"], stack["y"]])
    with torch.no_grad():
        fused = model(input_ids=ids).last_hidden_state
        for layer in model.layers:
            layer.mlp.set_depth(0)
        assert torch.equal(model(input_ids=ids).last_hidden_state, bare)  # depth 0: the unpatched model, bit for bit

    # AdapterHub's LlamaDecoderLayerWithAdapters: hidden = output_adapters(mlp(ln(residual)), residual, None)
    for layer, stack in zip(model.layers, adapters, strict=True):
        assert unwrap_sublayer(layer, "mlp") is layer.mlp
        layer._oracle_stack = stack

    def oracle_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                             use_cache=False, position_embeddings=None, **kwargs):  # fmt: skip
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            position_embeddings=position_embeddings, **kwargs,
        )  # fmt: skip
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        params = [_adapter_params(a) for a in self._oracle_stack]
        return ah_stack(hidden_states, residual, None, params, options)

    for layer in model.layers:
        layer.forward = types.MethodType(oracle_layer_forward, layer)
    with torch.no_grad():
        oracle = model(input_ids=ids).last_hidden_state
    assert (fused - bare).abs().max() > 1e-2
    torch.testing.assert_close(fused, oracle, atol=1e-4, rtol=1e-4)


def test_wrapper_follows_replaced_children_and_training_mode():
    model = _tiny_bert()
    ids = torch.randint(0, 99, (2, 6))
    layer = model.encoder.layer[0]
    w = wrap_sublayer(layer, "output")
    assert w.dense is layer.output.dense and w.LayerNorm.eps == 1e-12
    assert w.original.dense is w.dense  # children shared with the original module
    new_dense = torch.nn.Linear(64, 48)
    w.dense = new_dense  # what a LoRA patch of the inner projection does
    with torch.no_grad():
        x, res = torch.randn(2, 6, 64), torch.randn(2, 6, 48)
        torch.testing.assert_close(w(x, res), w.LayerNorm(new_dense(x) + res), atol=0, rtol=0)
    model.train()
    assert w.training and w.dropout.training
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert unwrap_sublayer(layer, "output") is layer.output


def test_adapter_module_names_and_init():
    a = BottleneckAdapter(48, 3, "swish", ln_before=True, ln_after=True, init_weights="houlsby")
    assert set(a.state_dict()) == {
        "adapter_norm_before.weight", "adapter_norm_before.bias", "adapter_down.0.weight", "adapter_down.0.bias",
        "adapter_down.1.weight", "adapter_down.1.bias", "adapter_up.weight", "adapter_up.bias",
        "adapter_norm_after.weight", "adapter_norm_after.bias",
    }  # fmt: skip
    assert a.down.weight.abs().max() <= 2e-2 and a.adapter_up.bias.abs().max() == 0
    b = BottleneckAdapter(48, 3, "relu", init_weights="mam_adapter")
    assert set(b.state_dict()) == {
        "adapter_down.0.weight",
        "adapter_down.0.bias",
        "adapter_up.weight",
        "adapter_up.bias",
    }
    assert b.adapter_up.weight.abs().max() == 0
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckAdapter(48, 3, "softplus")
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(48, 3, init_weights="xavier")
    # the pack caches key on packed_tensors(): it must be every parameter, whatever the options
    for adapter in (a, b, BottleneckAdapter(48, 3, ln_after=True), BottleneckAdapter(48, 3, ln_before=True)):
        assert sorted(map(id, adapter.packed_tensors())) == sorted(map(id, adapter.parameters()))


# --------------------------------------------------------------------------------------------------- CUDA tier
def _errors(got, fp64, plain):
    return (got.double() - fp64).abs(), (plain.double() - fp64).abs()


@pytest.mark.cuda
def test_cuda_graph_timer_measures_gpu_work_per_call():
    """The tuner's timer: a call of two matmuls takes about twice one, and many tiny launches take their GPU time,
    not the host's enqueue time of the same launches timed one call at a time by events."""
    from adapter_engine.kernels._backend import graph_time_ms

    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    one = graph_time_ms(lambda: torch.mm(a, a, out=out), dev)
    two = graph_time_ms(lambda: (torch.mm(a, a, out=out), torch.mm(out, a, out=out)), dev)
    assert one > 0 and 1.6 < two / one < 2.4, (one, two)
    tiny = torch.zeros(1, device=dev)

    def many():
        for _ in range(64):
            tiny.add_(1.0)

    graphed = graph_time_ms(many, dev)
    many()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    many()
    end.record()
    end.synchronize()
    assert graphed < start.elapsed_time(end), (graphed, start.elapsed_time(end))


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 4096])
@pytest.mark.parametrize("name", ["seq_bn", "double_seq_bn", "par_bn"])
def test_cuda_bf16_error_no_larger_than_torch_bf16(name, hidden):
    """Fused error vs an fp64 oracle must not exceed plain torch bf16's (AdapterHub-style eager in bf16)."""
    o = OPTION_GRID[name]
    dev, dt = "cuda", torch.bfloat16
    rows = 4096
    params = make_params(hidden, [hidden // 16] * 3, ["relu", "gelu", "swish"], dtype=dt, device=dev)
    ln = make_ln(hidden, dt, dev)
    h, y = torch.randn(rows, hidden, device=dev).to(dt), torch.randn(rows, hidden, device=dev).to(dt)
    # three row groups with different stacks and depths in one launch
    groups = [[0, 1, 2], [2, 0], [1]]
    routes = torch.full((rows, 3), -1, dtype=torch.long, device=dev)
    bounds = [0, 1365, 2730, rows]
    for g, stack in enumerate(groups):
        routes[bounds[g] : bounds[g + 1], : len(stack)] = torch.tensor(stack, device=dev)
    got = bottleneck_stack(h, y, pack(params), routes, o, ln.weight, ln.bias)
    p64 = [{k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()} for p in params]
    ln64 = make_ln(hidden, torch.float64, dev)
    ln64.load_state_dict(ln.state_dict())
    for g, stack in enumerate(groups):
        sl = slice(bounds[g], bounds[g + 1])
        fp64 = ah_stack(h[sl].double(), y[sl].double(), ln64, [p64[i] for i in stack], o)
        plain = ah_stack(h[sl], y[sl], ln, [params[i] for i in stack], o)
        e_fused, e_plain = _errors(got[sl], fp64, plain)
        slack = 1e-3 * fp64.abs().max().item()
        assert e_fused.max() <= e_plain.max() + slack, (e_fused.max().item(), e_plain.max().item())
        assert e_fused.mean() <= e_plain.mean() + slack / 10, (e_fused.mean().item(), e_plain.mean().item())


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 4096])
@pytest.mark.parametrize("save", [False, True], ids=["inference", "saving"])
def test_cuda_every_forward_candidate_tile_is_correct(monkeypatch, hidden, save):
    """Each tile the forward may pick after timing (``_forward_candidates``), for one stack on every row (the
    TILE_PATH 1) and for mixed rows (TILE_PATH 0), stays within plain torch bf16's error against fp64."""
    from adapter_engine.kernels import bottleneck_dispatch
    from adapter_engine.kernels.bottleneck_pack import _forward_candidates, _tiles

    dev, dt, rows = "cuda", torch.bfloat16, 4096
    params = make_params(hidden, [hidden // 16] * 3, ["relu", "gelu", "swish"], dtype=dt, device=dev)
    if save:
        for p in params:
            p["wu"].requires_grad_(True)
    ln = make_ln(hidden, dt, dev)
    h, y = torch.randn(rows, hidden, device=dev).to(dt), torch.randn(rows, hidden, device=dev).to(dt)
    p64 = [{k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()} for p in params]
    ln64 = make_ln(hidden, torch.float64, dev)
    ln64.load_state_dict(ln.state_dict())
    mixed = torch.tensor([[0, 1, 2]] * 2048 + [[2, 0, 1]] * 2048, device=dev)
    candidates = _forward_candidates(_tiles(hidden // 16, not save), save)
    for tiles in candidates:
        monkeypatch.setattr(bottleneck_dispatch, "_tuned_tiles", lambda *args, t=tiles: t)
        for routes, groups in ((torch.tensor([0, 1, 2], device=dev), [(0, rows, [0, 1, 2])]),
                               (mixed, [(0, 2048, [0, 1, 2]), (2048, rows, [2, 0, 1])])):  # fmt: skip
            with torch.no_grad() if not save else contextlib.nullcontext():
                got = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias)
            for lo, hi, stack in groups:
                fp64 = ah_stack(h[lo:hi].double(), y[lo:hi].double(), ln64, [p64[i] for i in stack], SEQ)
                plain = ah_stack(h[lo:hi], y[lo:hi], ln, [params[i] for i in stack], SEQ)
                e_fused, e_plain = _errors(got[lo:hi].detach(), fp64, plain.detach())
                slack = 1e-3 * fp64.abs().max().item()
                assert e_fused.max() <= e_plain.max() + slack, (tiles, e_fused.max().item(), e_plain.max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 4096])
@pytest.mark.parametrize("name", ["seq_bn", "double_seq_bn", "par_bn"])
def test_cuda_levels_path_bf16_error_no_larger_than_torch_bf16(levels_path, name, hidden):
    """The level-by-level cuBLAS path, one stack of three on every row: its output, and the gradients of h, y and
    the top adapter when the kernel backward runs from what it saved, stay within plain torch bf16's error."""
    o, dev, dt, rows = OPTION_GRID[name], "cuda", torch.bfloat16, 4096
    params = make_params(hidden, [hidden // 16] * 3, ["relu", "gelu", "swish"], dtype=dt, device=dev)
    for k in ("wd", "bd", "wu", "bu"):
        params[2][k].requires_grad_(True)
    ln = make_ln(hidden, dt, dev).requires_grad_(False)
    h = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    y = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    g = torch.randn(rows, hidden, device=dev).to(dt)
    leaves = [h, y] + [params[2][k] for k in ("wd", "bd", "wu", "bu")]
    p64 = [
        {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in p.items()}
        for p in params
    ]
    ln64 = make_ln(hidden, torch.float64, dev).requires_grad_(False)
    ln64.load_state_dict(ln.state_dict())
    h64, y64 = h.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    fp64 = ah_stack(h64, y64, ln64, p64, o)
    plain = ah_stack(h, y, ln, params, o)
    with torch.no_grad():
        got = bottleneck_stack(h, y, pack(params), torch.tensor([0, 1, 2]), o, ln.weight, ln.bias)
    e_got, e_plain = _errors(got, fp64.detach(), plain.detach())
    slack = 1e-3 * fp64.abs().max().item()
    assert e_got.max() <= e_plain.max() + slack, (e_got.max().item(), e_plain.max().item())
    assert e_got.mean() <= e_plain.mean() + slack / 10, (e_got.mean().item(), e_plain.mean().item())
    got_grads = torch.autograd.grad(
        bottleneck_stack(h, y, pack(params), torch.tensor([0, 1, 2]), o, ln.weight, ln.bias), leaves, g
    )
    plain_grads = torch.autograd.grad(plain, leaves, g)
    fp64_grads = torch.autograd.grad(fp64, [h64, y64] + [p64[2][k] for k in ("wd", "bd", "wu", "bu")], g.double())
    for a, b, ref in zip(got_grads, plain_grads, fp64_grads, strict=True):
        e_got, e_plain = _errors(a, ref, b)
        assert e_got.max() <= e_plain.max() + 1e-3 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("with_ln", [True, False], ids=["model-ln", "pre-ln"])
def test_cuda_bf16_gradients_training_top_of_three(monkeypatch, with_ln):
    """The row-block kernels' backward (forced: a timed choice could take the cuBLAS path); seq_bn does not keep
    dL/dy per level (KEEP_DY off: it equals dL/dr there)."""
    from adapter_engine.kernels import bottleneck_dispatch

    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", "rows")
    dev, dt, hidden, rows = "cuda", torch.bfloat16, 768, 4096
    params = make_params(hidden, [48, 48, 48], ["relu", "relu", "relu"], dtype=dt, device=dev)
    for k in ("wd", "bd", "wu", "bu"):
        params[2][k].requires_grad_(True)
    ln = make_ln(hidden, dt, dev).requires_grad_(False) if with_ln else None  # frozen model LN: the kernel backward
    lw_lb = (ln.weight, ln.bias) if with_ln else (None, None)
    h = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    y = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    g = torch.randn(rows, hidden, device=dev).to(dt)
    leaves = [h, y] + [params[2][k] for k in ("wd", "bd", "wu", "bu")]
    got = torch.autograd.grad(bottleneck_stack(h, y, pack(params), torch.tensor([0, 1, 2]), SEQ, *lw_lb), leaves, g)
    plain = torch.autograd.grad(ah_stack(h, y, ln, params, SEQ), leaves, g)
    p64 = [
        {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in p.items()}
        for p in params
    ]
    ln64 = None
    if with_ln:
        ln64 = make_ln(hidden, torch.float64, dev)
        ln64.load_state_dict(ln.state_dict())
    h64, y64 = h.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    leaves64 = [h64, y64] + [p64[2][k] for k in ("wd", "bd", "wu", "bu")]
    fp64 = torch.autograd.grad(ah_stack(h64, y64, ln64, p64, SEQ), leaves64, g.double())
    for a, b, ref in zip(got, plain, fp64, strict=True):
        e_fused, e_plain = _errors(a, ref, b)
        assert e_fused.max() <= e_plain.max() + 1e-3 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("routing", ["one-stack", "mixed-rows"])
def test_cuda_training_launches_call_compiled_kernels_that_match_tritons_launch_bit_for_bit(monkeypatch, routing):
    """On the GPU a training step's recorded launches (forward, output backward, level backwards) hold the compiled
    kernels of their first launches and call them directly from the second step on: the output and every gradient
    equal those of the same launches through Triton's launcher bit for bit."""
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_dispatch, bottleneck_fwd

    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", "rows")
    monkeypatch.setattr(bottleneck_fwd, "_RECORDED", {})
    monkeypatch.setattr(bottleneck_bwd, "_RECORDED", {})
    caches = (bottleneck_fwd._RECORDED, bottleneck_bwd._RECORDED)
    dev, dt, hidden, rows = "cuda", torch.bfloat16, 768, 512
    params = make_params(hidden, [48, 64, 32], ["relu", "gelu", "tanh"], dtype=dt, device=dev)
    weights = [p[k].requires_grad_(True) for p in params for k in ("wd", "bd", "wu", "bu")]
    ln = make_ln(hidden, dt, dev)
    routes = torch.tensor([0, 1, 2]) if routing == "one-stack" else torch.tensor([[0, 1, 2]] * 300 + [[2, 0, -1]] * 212)
    h = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    y = torch.randn(rows, hidden, device=dev).to(dt).requires_grad_()
    g = torch.randn(rows, hidden, device=dev).to(dt)

    def step():
        out = bottleneck_stack(h, y, pack(params), routes, SEQ, ln.weight, ln.bias)
        return [out, *torch.autograd.grad(out, [h, y, ln.weight, ln.bias, *weights], g)]

    step()
    kernels = {launch.kernel for cache in caches for launch in cache.values()}
    assert kernels == {bottleneck_fwd._bottleneck_stack_fwd_kernel, bottleneck_bwd._bottleneck_out_bwd_kernel,
                       bottleneck_bwd._bottleneck_level_bwd_kernel}  # fmt: skip
    assert all(launch.compiled is not None for cache in caches for launch in cache.values())
    direct = step()
    for cache in caches:
        for key, launch in cache.items():
            cache[key] = launch._replace(compiled=None)
    through_triton = step()
    for a, b in zip(direct, through_triton, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_fp32_matches_fp64():
    dev, hidden, rows = "cuda", 1024, 2048
    params = make_params(hidden, [64, 64], ["gelu", "tanh"], device=dev)
    ln = make_ln(hidden, torch.float32, dev)
    h, y = torch.randn(rows, hidden, device=dev), torch.randn(rows, hidden, device=dev)
    got = bottleneck_stack(h, y, pack(params), torch.tensor([0, 1]), SEQ, ln.weight, ln.bias)
    p64 = [{k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()} for p in params]
    ln64 = make_ln(hidden, torch.float64, dev)
    ln64.load_state_dict(ln.state_dict())
    fp64 = ah_stack(h.double(), y.double(), ln64, p64, SEQ)
    torch.testing.assert_close(got.double(), fp64, atol=1e-4, rtol=1e-4)
