"""Segmented LoRA for mixed batches (kernels/lora_segmented.py): each row's term with its own adapter only.

CPU tier: the three kernels (shrink, expand, weight gradient) in the interpreter against their torch twins, then
``lora_linear(path="segmented")`` (forward and every gradient) against the fp64 oracle (``lora_linear_reference``,
the masked PEFT formulation), the dispatch rule, and the per-row routing path. fp32/fp16 only here: the
interpreter's bf16 arithmetic is wrong. CUDA tier: bf16 at Llama-like sizes against torch bf16's error.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from test_lora_linear import TOL, _assert_bf16_no_worse_than_torch, _check, _make, _rel_err, _run

from adapter_engine.kernels import lora_linear, lora_linear_reference

ll = importlib.import_module("adapter_engine.kernels.lora_linear")
ld = importlib.import_module("adapter_engine.kernels.lora_linear_dispatch")  # the choice of path="auto"
lk = importlib.import_module("adapter_engine.kernels.lora_linear_launch")  # the launchers
li = importlib.import_module("adapter_engine.kernels.lora_inputs")
ls = importlib.import_module("adapter_engine.kernels.lora_segmented")
lt = importlib.import_module("adapter_engine.kernels.lora_linear_tiled")

RANKS = [8, 1, 4, 16]  # ranks that differ (1: the narrowest tile column; 16: the widest)
SCALES = [0.5, 2.0, 1.5, -0.25]


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs of both modules start as NaN: an element no kernel writes shows up in the comparison."""

    def alloc(shape, like):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype)

    for module in (lk, ld, ls):
        monkeypatch.setattr(module, "_alloc", alloc)


def _launch_device() -> str:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not ls.use_triton(torch.empty(0, device=dev)):
        pytest.skip("the launchers run their torch twins here (CPU without the Triton interpreter)")
    return dev


def _ids(kind: str, m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 31 + n)
    if kind == "mixed":  # -1 repeated, adapter 2 absent, the others in no particular order
        ids = torch.randint(-1, n, (m,), generator=g)
        return torch.where(ids == 2, -1, ids)
    if kind == "one":  # every row the same adapter
        return torch.full((m,), n - 1)
    if kind == "each":  # every row a different adapter (m <= n), the first row base only
        return torch.randperm(n, generator=g)[:m].masked_fill(torch.arange(m) == 0, -1)
    if kind == "none":
        return torch.full((m,), -1)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------ kernels vs twins
def test_plan_groups_rows_stably_and_skips_ids_outside_the_adapters():
    ids = torch.tensor([2, -1, 0, 2, 5, 0, -3, 1, 2])  # 5 and -3: outside [-1, 3), grouped with nothing
    plan = ls.plan_segments(ids, [4, 2, 8], [1.0, 2.0, 3.0])
    assert plan.order.tolist() == [6, 1, 2, 5, 7, 0, 3, 8, 4]  # stable: equal ids keep their order
    assert plan.starts.tolist() == [2, 4, 5, 8]
    assert plan.rank_off.tolist() == [0, 4, 6, 14] and plan.r_max == 8
    assert [s[:2] for s in plan.segments()] == [(2, 4), (4, 5), (5, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind, M", [("mixed", 70), ("one", 33), ("each", 4), ("none", 5)])
def test_kernels_match_their_twins(poison, kind, M, dtype):
    """Shrink (x strided, A_cat), shrink on transposed factors (the backward's dy B_cat), expand, weight gradient
    (into a transposed view, as dB_cat): the kernels against the per-adapter torch loops, on every row they own."""
    dev = _launch_device()
    K, N = 45, 37  # K not a multiple of the interpreter's BLOCK_K (64): the masked K tail
    ids = _ids(kind, M, len(RANKS)).to(dev)
    plan = ls.plan_segments(ids, RANKS, SCALES)
    R = sum(RANKS)
    x = torch.randn(M, 2 * K, device=dev).to(dtype)[:, ::2]  # stride 2 along features
    A = (torch.randn(R, K, device=dev) * K**-0.5).to(dtype)
    B = (torch.randn(N, R, device=dev) * 0.3).to(dtype)
    dy = torch.randn(M, N, device=dev).to(dtype)
    lo, hi = int(plan.starts[0]), int(plan.starts[-1])
    valid = slice(lo, hi)  # sorted positions that belong to an adapter

    u = ls.lora_shrink(x, A, plan)
    u_ref = ls.lora_shrink_reference(x, A, plan)
    torch.testing.assert_close(u[valid], u_ref[valid], rtol=TOL[dtype], atol=TOL[dtype])
    du = ls.lora_shrink(dy, B.t(), plan)  # (R, N) view with strides (1, R)
    torch.testing.assert_close(du[valid], ls.lora_shrink_reference(dy, B.t(), plan)[valid], rtol=1e-3, atol=1e-3)
    by_row = plan.order[valid]  # x's rows that belong to an adapter: u by row has them where x has them
    u_rows = ls.lora_shrink(x, A, plan, by_row=True)
    torch.testing.assert_close(u_rows[by_row], u_ref[valid], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ls.lora_shrink_reference(x, A, plan, by_row=True)[by_row], u_ref[valid])

    y0 = torch.randn(M, N, device=dev).to(dtype)
    y = ls.lora_expand_(y0.clone(), u_ref, B, plan)
    y_ref = ls.lora_expand_reference_(y0.clone(), u_ref, B, plan)
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    untouched = plan.order[:lo].tolist() + plan.order[hi:].tolist()  # rows of id -1 keep their value exactly
    assert torch.equal(y[untouched], y0[untouched])

    dB = torch.full((N, R), float("nan"), device=dev, dtype=dtype)
    ls.lora_wgrad(u_ref, dy, plan, dB.t())
    dB_ref = ls.lora_wgrad_reference(u_ref, dy, plan, torch.empty(N, R, device=dev, dtype=dtype).t()).t()
    torch.testing.assert_close(dB, dB_ref, rtol=2 * TOL[dtype], atol=2 * TOL[dtype])
    dA = ls.lora_wgrad(u_ref, x, plan)
    torch.testing.assert_close(dA, ls.lora_wgrad_reference(u_ref, x, plan), rtol=2 * TOL[dtype], atol=2 * TOL[dtype])
    present = set(ids.tolist())
    for a, (r0, r) in enumerate(zip(plan.offsets, RANKS, strict=False)):
        if a not in present:  # an adapter without rows: exact zeros, not stale memory
            assert torch.count_nonzero(dA[r0 : r0 + r]) == 0 and torch.count_nonzero(dB[:, r0 : r0 + r]) == 0


def test_shrink_pads_each_row_past_its_own_rank_with_zeros(poison):
    dev = _launch_device()
    ids = torch.tensor([1, 3, 0, 1, 2, 3], device=dev)
    plan = ls.plan_segments(ids, RANKS, SCALES)
    u = ls.lora_shrink(torch.randn(6, 20, device=dev), torch.randn(sum(RANKS), 20, device=dev), plan)
    for lo, hi, _, r, _ in plan.segments():
        assert torch.count_nonzero(u[lo:hi, r:]) == 0 and torch.count_nonzero(u[lo:hi, :r]) == (hi - lo) * r


# ------------------------------------------------------------------------------------- lora_linear(path="segmented")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["mixed", "one", "none"])
def test_segmented_forward_and_gradients_against_fp64(poison, kind, dtype):
    """M = 2 x 35 = 70 rows: not a multiple of any row block; all five gradients (x, W, b, each A_i, each B_i)."""
    x, w, b, As, Bs = _make((2, 35), 40, 29, RANKS, dtype)
    ids = _ids(kind, 70, len(RANKS)).reshape(2, 35)
    _, grads = _check(x, w, b, As, Bs, SCALES, dtype, adapter_ids=ids, path="segmented")
    n = len(RANKS)
    for i in range(n):  # adapters without rows get exact zeros
        if not (ids == i).any():
            assert torch.count_nonzero(grads[3 + i]) == 0 and torch.count_nonzero(grads[3 + n + i]) == 0


def test_segmented_every_row_its_own_adapter(poison):
    """Decode-like: 6 rows, 8 resident adapters, each row a different one (one-row segments), one base row."""
    ranks = [4, 8, 2, 16, 8, 1, 4, 8]
    x, w, b, As, Bs = _make((6,), 24, 31, ranks, torch.float32)
    ids = torch.tensor([5, -1, 0, 7, 3, 1])
    _check(x, w, b, As, Bs, [0.5 + i for i in range(8)], torch.float32, adapter_ids=ids, path="segmented")


def test_segmented_per_sequence_ids_fan_in_fan_out_and_gradient_subsets(poison):
    x, w, b, As, Bs = _make((3, 5), 24, 18, [8, 4], torch.float32, fifo=True)
    _check(x, w, b, As, Bs, [1.0, 3.0], torch.float32, adapter_ids=torch.tensor([1, -1, 0]), path="segmented",
           fan_in_fan_out=True)  # fmt: skip
    for trainable in ("x", "A", "B"):  # frozen base; du is needed for x alone too, and not at all for B alone
        x, w, b, As, Bs = _make((9,), 30, 26, [8, 16], torch.float32)
        for name, t in (("x", x), ("w", w), ("b", b), ("A", As[0]), ("A", As[1]), ("B", Bs[0]), ("B", Bs[1])):
            t.requires_grad_(name == trainable)
        ids = torch.tensor([0, 1, 1, -1, 0, 1, 0, 0, -1])
        _check(x, w, b, As, Bs, [0.75, 2.0], torch.float32, adapter_ids=ids, path="segmented")


def test_segmented_dropout_same_mask_as_reference():
    """Dropout: the adapter reads dropout(x); dx = dy W and dx_lora = expand(0, du, A_cat^T) (zero on base rows)."""
    x, w, b, As, Bs = _make((4, 6), 28, 20, [8, 4], torch.float32)
    ids = torch.tensor([[0, -1, 1, 1, 0, -1], [1, 1, 0, -1, 0, 1], [-1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]])
    dy = torch.randn(4, 6, 20, dtype=torch.float64)
    kw = dict(dropout=0.3, training=True, adapter_ids=ids)
    torch.manual_seed(123)
    y, grads = _run(lora_linear, x, w, b, As, Bs, [1.0, 0.5], dy, path="segmented", **kw)
    torch.manual_seed(123)
    y_ref, grads_ref = _run(lora_linear_reference, x, w, b, As, Bs, [1.0, 0.5], dy, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_segmented_launchers_match_their_twins(poison):
    """``lora_segmented_fwd`` / ``_bwd`` against their twins with the same plan (u and every gradient)."""
    dev = _launch_device()
    M, K, N = 37, 33, 21
    x, w, b, As, Bs = _make((M,), K, N, RANKS, torch.float32)
    A, B = torch.cat(As).detach(), torch.cat(Bs, 1).detach()
    plan = ls.plan_segments(_ids("mixed", M, 4), RANKS, SCALES)
    args = (x.detach().to(dev), w.detach().to(dev), A.to(dev), B.to(dev), plan)
    y, u = ls.lora_segmented_fwd(*args, b.detach())
    y_ref, u_ref = ls.lora_segmented_fwd_reference(*args, b.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    valid = slice(int(plan.starts[0]), M)
    torch.testing.assert_close(u[valid], u_ref[valid], rtol=1e-5, atol=1e-5)
    dy = torch.randn(M, N)
    needs = (True, False, True, True, True, True)
    got = ls.lora_segmented_bwd(dy, args[0], None, args[1], args[2], args[3], plan, u, needs)
    want = ls.lora_segmented_bwd_reference(dy, args[0], None, args[1], args[2], args[3], plan, u_ref, needs)
    for g, g_ref in zip(got, want, strict=True):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_segmented_launchers_refuse_a_plan_or_operands_that_do_not_fit():
    """The launchers reach rows through ``plan.order`` and ranks through its tables unchecked: a plan made for another
    batch (8 rows for 5), for other ranks, or operands of another dtype read and wrote out of bounds (a heap crash
    in the interpreter). Each is refused, by the kernels and by their twins, naming the shapes or dtypes."""
    M, K, N = 5, 16, 12
    x, w, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(12, K), torch.randn(N, 12)
    fits = ls.plan_segments(torch.tensor([0, 1, -1, 1, 0]), [4, 8], [1.0, 0.5])
    other_rows = ls.plan_segments(torch.tensor([0, 1, -1, 1, 0, 1, 1, 0]), [4, 8], [1.0, 0.5])
    other_ranks = ls.plan_segments(torch.tensor([0, 1, -1, 1, 0]), [4, 16], [1.0, 0.5])
    needs = (True, False, True, False, True, True)
    for fwd, bwd in ((ls.lora_segmented_fwd, ls.lora_segmented_bwd),
                     (ls.lora_segmented_fwd_reference, ls.lora_segmented_bwd_reference)):  # fmt: skip
        for plan, shown in ((other_rows, "groups 8 rows"), (other_ranks, r"R = 20")):
            with pytest.raises(ValueError, match=shown):
                fwd(x, w, A, B, plan)
        u = fwd(x, w, A, B, fits)[1]
        with pytest.raises(ValueError, match="groups 8 rows"):
            bwd(torch.randn(M, N), x, None, w, A, B, other_rows, u, needs)
        with pytest.raises(ValueError, match=r"u \(5, 8\)"):  # u narrower than the plan's rank tile
            bwd(torch.randn(M, N), x, None, w, A, B, fits, u[:, :8], needs)
        with pytest.raises(TypeError, match="lora_A torch.float16"):
            fwd(x, w, A.half(), B, fits)
    with pytest.raises(ValueError, match="one rank .* and one scale per adapter"):
        ls.plan_segments(torch.tensor([0, 1]), [4, 8], [1.0])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        ls.plan_segments(torch.tensor([0.0, 1.0]), [4, 8], [1.0, 0.5])


def test_shrink_and_expand_launches_are_recorded_per_geometry_and_their_compiled_kernels_called_directly(
    monkeypatch, direct_stand_in
):
    """A mixed batch's shrink and expand are planned once per geometry (``launch_recorded``) and repeated for new
    rows, ids and factors: on a GPU by calling the compiled kernels of their first launches directly (here stand-ins
    that run them in the interpreter), in signature order, while the caller's operands are aligned alike."""
    stand_in, direct = direct_stand_in
    monkeypatch.setattr(ls, "_RECORDED", {})
    M, K, N = 37, 33, 21

    def call():
        x, w, b, As, Bs = _make((M,), K, N, RANKS, torch.float32)
        ids = _ids("mixed", M, 4)
        with torch.no_grad():
            got = lora_linear(x, w, As, Bs, SCALES, b, adapter_ids=ids, path="segmented")
        want = lora_linear_reference(x, w, As, Bs, SCALES, b, adapter_ids=ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    call()
    assert sorted(key[0] for key in ls._RECORDED) == ["expand", "shrink"]
    for key, launch in list(ls._RECORDED.items()):
        ls._RECORDED[key] = stand_in(launch, {"shrink": 2, "expand": 3}[key[0]])
    call()
    call()
    assert len(direct) == 4 and len(ls._RECORDED) == 2


def test_weight_gradient_launches_are_recorded_and_their_compiled_kernels_called_directly(monkeypatch, direct_stand_in):
    """A mixed batch's training step launches the weight-gradient kernel twice (dA_cat from du and x, dB_cat from u and
    dy, written through a transposed view): each is recorded by its launch signature and repeated for new rows, ids
    and factors by calling the compiled kernel of its first launch directly (here a stand-in that binds the flat
    arguments back to the kernel's parameters and runs it in the interpreter)."""
    stand_in, direct = direct_stand_in
    monkeypatch.setattr(ls, "_RECORDED", {})
    M, K, N = 37, 33, 21

    def step():
        x, w, b, As, Bs = _make((M,), K, N, RANKS, torch.float32)
        ids = _ids("mixed", M, 4)
        dy = torch.randn(M, N)
        got = torch.autograd.grad(lora_linear(x, w, As, Bs, SCALES, b, adapter_ids=ids, path="segmented"), As + Bs, dy)
        want = torch.autograd.grad(lora_linear_reference(x, w, As, Bs, SCALES, b, adapter_ids=ids), As + Bs, dy)
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)

    step()
    wgrads = [key for key in ls._RECORDED if key[0] == "wgrad"]
    assert len(wgrads) == 2  # dA_cat and dB_cat (J = K and N)
    for key in wgrads:
        ls._RECORDED[key] = stand_in(ls._RECORDED[key], 0)  # (the key holds the alignments)
    step()
    assert sorted(direct) == sorted(ls._RECORDED[key].grid for key in wgrads)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 64])
def test_cuda_recorded_launches_call_compiled_kernels_that_match_tritons_launch_bit_for_bit(monkeypatch, M):
    """On the GPU the recorded launches (the tiled kernel of one adapter, the shrink and expand of a mixed batch)
    hold the compiled kernels of their first launches and call them directly from the third call on (the first
    one tunes): their outputs equal those of the same launches through Triton's launcher bit for bit, for new
    operands each call."""
    monkeypatch.setattr(lt, "_RECORDED", {})
    monkeypatch.setattr(ls, "_RECORDED", {})
    dev, dt, K, N = "cuda", torch.bfloat16, 4096, 4096
    ranks, scales = [16, 8, 32, 8], [2.0, 0.5, 0.25, 1.0]
    _, w, b, As, Bs = _make((M,), K, N, ranks, dt)
    w, b = w.detach().to(dev), b.detach().to(dev)
    As, Bs = [a.detach().to(dev) for a in As], [b_.detach().to(dev) for b_ in Bs]
    ids = torch.randint(-1, len(ranks), (M,), device=dev)
    calls = {
        "tiled": (lt, lambda x: lora_linear(x, w, As[0], Bs[0], 2.0, b)),
        "segmented": (ls, lambda x: lora_linear(x, w, As, Bs, scales, b, adapter_ids=ids, path="segmented")),
    }
    reference = {
        "tiled": lambda x: lora_linear_reference(x, w, As[0], Bs[0], 2.0, b),
        "segmented": lambda x: lora_linear_reference(x, w, As, Bs, scales, b, adapter_ids=ids),
    }
    for name, (module, call) in calls.items():
        with torch.no_grad():
            for _ in range(3):
                call(torch.randn(M, K, device=dev, dtype=dt))
            recorded = dict(module._RECORDED)
            assert recorded and all(_compiled(r) is not None for r in recorded.values()), name
            x = torch.randn(M, K, device=dev, dtype=dt)
            direct = call(x)
            for key, r in recorded.items():  # the same launches through Triton's launcher
                module._RECORDED[key] = _without_compiled(r)
            through_triton = call(x)
            want = reference[name](x)
        assert torch.equal(direct, through_triton), name
        assert _rel_err(direct, want.double()) < 1e-2, name


@pytest.mark.cuda
def test_cuda_recorded_weight_gradient_launches_match_tritons_launch_bit_for_bit(monkeypatch):
    """On the GPU a mixed batch's weight-gradient launches, recorded at the first training step, call their compiled
    kernels directly: the adapters' gradients equal those of the same launches through Triton's launcher bit for
    bit."""
    monkeypatch.setattr(ls, "_RECORDED", {})
    dev, dt, M, K, N = "cuda", torch.bfloat16, 4096, 4096, 4096
    _, w, b, As, Bs = _make((M,), K, N, [16, 8, 32, 8], dt, grad=False)
    w, b = w.to(dev), b.to(dev)
    As, Bs = [a.to(dev).requires_grad_() for a in As], [b_.to(dev).requires_grad_() for b_ in Bs]
    ids = torch.randint(-1, 4, (M,), device=dev)
    x, dy = torch.randn(M, K, device=dev, dtype=dt), torch.randn(M, N, device=dev, dtype=dt)
    step = lambda: torch.autograd.grad(  # noqa: E731
        lora_linear(x, w, As, Bs, [2.0, 0.5, 0.25, 1.0], b, adapter_ids=ids, path="segmented"), As + Bs, dy
    )
    step()
    wgrads = {key: r for key, r in ls._RECORDED.items() if key[0] == "wgrad"}
    assert len(wgrads) == 2 and all(r.compiled is not None for r in wgrads.values())
    direct = step()
    for key, r in wgrads.items():
        ls._RECORDED[key] = r._replace(compiled=None)
    through_triton = step()
    assert all(torch.equal(d, t) for d, t in zip(direct, through_triton, strict=True))


def _compiled(recorded) -> object | None:
    """The compiled kernel of a recorded launch: a ``TiledLaunch``'s (``lora_linear_tiled``) or a ``DirectLaunch``'s."""
    return (recorded.direct if hasattr(recorded, "direct") else recorded).compiled


def _without_compiled(recorded):
    if hasattr(recorded, "direct"):
        return recorded._replace(direct=recorded.direct._replace(compiled=None))
    return recorded._replace(compiled=None)


def test_segmented_empty_batch_and_missing_ids():
    x, w, b, As, Bs = _make((0,), 19, 23, [8, 4], torch.float32)
    y = lora_linear(x, w, As, Bs, [2.0, 1.0], b, adapter_ids=torch.zeros(0, dtype=torch.long), path="segmented")
    assert y.shape == (0, 23)
    y.sum().backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in (*As, *Bs))
    with pytest.raises(ValueError, match="adapter_ids"):
        lora_linear(x, w, As, Bs, [2.0, 1.0], b, path="segmented")


def test_torch_compile_fullgraph_segmented():
    x, w, b, As, Bs = _make((2, 5), 24, 20, [8, 4], torch.float32)
    ids = torch.tensor([[0, 1, -1, 1, 0], [1, 1, 0, -1, -1]])

    def f(x, w, b, a0, a1, b0, b1):
        return lora_linear(x, w, [a0, a1], [b0, b1], [2.0, 0.5], b, adapter_ids=ids, path="segmented").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (x, w, b, *As, *Bs)
    loss, loss_c = f(*args), compiled(*args)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for g, g_c in zip(torch.autograd.grad(loss, args), torch.autograd.grad(compiled(*args), args), strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ dispatch
@pytest.fixture
def spy(monkeypatch):
    """Counts the segmented forward launcher's calls (eager and inference branches of ``lora_linear``)."""
    calls = []
    real = ls.segmented_fwd_checked_by_caller

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    for module in (lk, ld):  # (the launcher's path "segmented"; a served mixed batch's)
        monkeypatch.setattr(module, "segmented_fwd_checked_by_caller", counting)
    return calls


def test_auto_dispatch_rule(monkeypatch):
    monkeypatch.setattr(ld, "DISPATCH", ld.LoraLinearDispatch(fused_max_m=64))
    x = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
    if not ll.use_triton(x):
        pytest.skip("the segmented path is for the Triton backend")
    ids = torch.zeros(1, dtype=torch.int32)
    want = ld._wants_segmented
    assert want("auto", 65, [16, 16], ids, x)  # above fused_max_m: 3 launches instead of 5, r instead of R
    assert not want("auto", 64, [16, 16], ids, x)  # one fused launch with R = 32
    assert want("auto", 16, [16] * 5, ids, x)  # R = 80 > 64: the fused kernel's rank tile would be 128 wide
    assert not want("auto", 4096, [16], ids, x)  # one adapter: nothing to segment
    assert not want("auto", 4096, [16, 16], None, x)  # no ids: every adapter is summed into every row
    assert not want("composition", 4096, [16, 16], ids, x)  # an explicit path is kept
    monkeypatch.setattr(ld, "DISPATCH", ld.LoraLinearDispatch(segmented_min_adapters=99))
    assert not want("auto", 4096, [16] * 16, ids, x)  # a GPU session can retune (or switch off) the rule


def test_auto_takes_the_segmented_path_and_per_row_routing_reaches_it(poison, spy):
    """``lora_linear(path="auto")`` on a mixed batch of 2 x 40 rows and the per-row route of a ``LoraLinear``
    (adapter_engine's serving path) both run the segmented launcher, and agree with the reference."""
    _launch_device()
    x, w, b, As, Bs = _make((2, 40), 32, 24, [8, 4, 8], torch.float32)
    ids = torch.tensor([2, -1])  # per sequence
    _check(x, w, b, As, Bs, [1.0, 2.0, 0.5], torch.float32, adapter_ids=ids)
    assert spy == [80]

    from adapter_engine.lora import LoraLinear
    from adapter_engine.routing import use_adapters

    spy.clear()
    layer = LoraLinear(torch.nn.Linear(32, 24))
    for i in range(3):
        layer.add_lora(f"l{i}", 8, 2.0, init=False)
    rows = ["l2", None, "l0", "l2"]
    xs = torch.randn(4, 20, 32)
    with torch.no_grad(), use_adapters(rows):
        y = layer(xs)
        layer(xs)  # a second call reuses the route's plan and the ids' row grouping
    assert spy == [80, 80]
    for i, name in enumerate(rows):
        with torch.no_grad(), use_adapters(name):
            torch.testing.assert_close(y[i], layer(xs[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def test_row_grouping_is_reused_only_while_the_ids_are_unchanged(poison, spy, monkeypatch):
    _launch_device()
    sorts = []
    real_plan = li.plan_segments

    def counting(ids, ranks, scales, grouping=None):
        sorts.append(grouping is None)
        return real_plan(ids, ranks, scales, grouping)

    monkeypatch.setattr(li, "plan_segments", counting)  # where the row-grouping cache (_segments_cached) looks it up
    x, w, b, As, Bs = _make((70,), 20, 12, [4, 8], torch.float32)
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    ids = torch.randint(-1, 2, (70,))
    with torch.no_grad():
        first = lora_linear(x, w, As, Bs, [1.0, 0.5], b, adapter_ids=ids)
        again = lora_linear(x, w, As, Bs, [1.0, 0.5], b, adapter_ids=ids)
        assert sorts == [True] and torch.equal(again, first)
        lora_linear(x, w, As[::-1], Bs[::-1], [0.5, 1.0], b, adapter_ids=ids)  # other adapters, same rows
        assert sorts == [True, False]
        ids.fill_(1)  # in place: the cached grouping must not be served
        changed = lora_linear(x, w, As, Bs, [1.0, 0.5], b, adapter_ids=ids)
        assert sorts == [True, False, True]
        want = lora_linear_reference(x, w, As, Bs, [1.0, 0.5], b, adapter_ids=ids)
        torch.testing.assert_close(changed, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks, scales", [([4, 8], [1.0, 0.5]), ([8], [2.0])], ids=["two", "one"])
def test_inference_builds_the_rank_major_B_cat_once_and_never_serves_it_stale(poison, ranks, scales):
    """The segmented path stacks B_cat rank-major (strides (1, N): the expand's 16-byte loads) once per set of
    adapters while serving; an in-place update or a new tensor is seen at once, for one adapter (a copy of its B)
    as for several, and the cache keeps no factor alive."""
    _launch_device()
    x, w, b, As, Bs = _make((9,), 20, 24, ranks, torch.float32)
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    ids = torch.tensor([0, -1, 1, 1, 0, -1, 1, 0, 0]).clamp(max=len(ranks) - 1)
    run = lambda As, Bs: lora_linear(x, w, As, Bs, scales, b, adapter_ids=ids, path="segmented")
    earlier = set(li._STACKS)  # entries of models that other tests keep alive (e.g. the demo's)
    with torch.no_grad():
        first = run(As, Bs)
        B_cat = li._stack_cached(As, Bs, True)[1]
        assert B_cat.stride() == (1, 24) and li._stack_cached(As, Bs, True)[1] is B_cat  # built once
        torch.testing.assert_close(run(As, Bs), first, rtol=0, atol=0)
        Bs[-1].mul_(3.0)  # in place: new version, the rank-major copy must not be served
        changed = run(As, Bs)
        want = lora_linear_reference(x, w, As, Bs, scales, b, adapter_ids=ids)
        torch.testing.assert_close(changed, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, first)
        Bs = [b_.clone() for b_ in Bs]  # new objects
        torch.testing.assert_close(run(As, Bs), want, rtol=1e-5, atol=1e-5)
    refs = [weakref.ref(t) for t in (*As, *Bs)]
    copies = [weakref.ref(entry[1][1]) for key, entry in li._STACKS.items() if key not in earlier]  # this test's
    del As, Bs, B_cat
    gc.collect()
    assert all(ref() is None for ref in refs)
    # freed factors take their entries, and so their device copies, with them (an evicted adapter leaves nothing)
    assert all(ref() is None for ref in copies) and copies


def test_the_stacked_factors_cache_keeps_one_entry_per_adapter_set_and_sees_conversions():
    """An evaluation after each optimizer step (new versions) replaces the set's entry instead of adding one per
    step (each holds device copies of every factor); a conversion in place (``p.data = p.data.half()``, what
    ``module.half()`` does; the version stays) is seen through the data address."""
    _launch_device()
    params = [torch.nn.Parameter(torch.randn(r, 8)) for r in (2, 3)] + [torch.nn.Parameter(torch.randn(5, r))
                                                                       for r in (2, 3)]  # fmt: skip
    As, Bs = params[:2], params[2:]
    mine = lambda: [e for e in li._STACKS.values() if all(r() is t for r, t in zip(e[0], params))]  # noqa: E731
    for _step in range(3):
        with torch.no_grad():
            A_cat, B_cat = li._stack_cached(As, Bs, True)
            torch.testing.assert_close(A_cat, torch.cat(As), rtol=0, atol=0)
            for p in params:
                p.mul_(1.5)  # (an optimizer step)
    assert len(mine()) == 1
    for p in params:
        p.data = p.data.half()
    with torch.no_grad():
        A_cat, B_cat = li._stack_cached(As, Bs, True)
    assert A_cat.dtype == B_cat.dtype == torch.float16
    torch.testing.assert_close(B_cat, torch.cat(Bs, 1), rtol=0, atol=0)
    assert len(mine()) == 1


# ------------------------------------------------------------------------------------------- sm_90 code, no GPU
_COMPILE = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile
    from collections import Counter
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels import lora_segmented as ls

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    TABLES = {"order_ptr": "*i64", "starts_ptr": "*i32", "rank_off_ptr": "*i32"}
    DT = sys.argv[1]  # the operands' dtype: bf16, or fp32 (IEEE dots, FMA; the launchers' fp32 tiles)
    FP32 = DT == "fp32"

    def build(fn, ptrs, ints, consts, ones):
        # Triton's launcher specialises unit strides to 1 and marks pointers and sizes / strides divisible by 16
        types = {**ptrs, **TABLES, **dict.fromkeys(ints, "i32"), **dict.fromkeys(consts, "constexpr")}
        sig = {name: types[name] for name in fn.arg_names}  # in the kernel's parameter order
        names = list(sig)
        constexprs = {(names.index(n),): v for n, v in consts.items()}
        constexprs.update({(names.index(n),): 1 for n in ones})
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in [*ptrs, *ints] if n not in ones}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        use = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        field = lambda name: int(re.search(name + r":(\\d+)", use).group(1))
        return {"reg": field("REG"), "stack": field("STACK"),
                "mem": Counter(re.findall(r"(?:ld|st)\\.global[.\\w]*", c.asm["ptx"]))}

    T, out = ls.TILES, {}
    for br in (16, 64):
        common = {"BLOCK_R": br, "DOT_FP32": False, "INPUT_PRECISION": "ieee" if FP32 else "tf32"}
        for m in (16, 1024, 4096, 32768):  # every row-block size the launchers pick
            for by_row in (False, True) if m == 4096 else (False,):  # (u by row: for the persistent GEMM's epilogue)
                out[f"shrink m={m} r={br}{' by row' if by_row else ''}"] = build(
                    ls._lora_segmented_shrink_kernel,
                    {"x_ptr": "*" + DT, "a_ptr": "*" + DT, "scale_ptr": "*fp32", "u_ptr": "*" + DT},
                    ["n_adapters", "K", "stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_um", "stride_ur"],
                    {"BLOCK_M": T.shrink_block_m(m, FP32), "BLOCK_K": T.shrink_block_k, "BLOCK_A": 16, **common,
                     "EVEN_K": True, "BY_ROW": by_row},
                    ("stride_xk", "stride_ak", "stride_ur"))
            out[f"expand m={m} r={br}"] = build(
                ls._lora_segmented_expand_kernel,
                {"u_ptr": "*" + DT, "b_ptr": "*" + DT, "y_ptr": "*" + DT},
                ["n_adapters", "N", "stride_um", "stride_ur", "stride_bn", "stride_br", "stride_ym", "stride_yn"],
                {"BLOCK_M": T.expand_block_m(m, FP32), "BLOCK_N": T.fp32_expand_block_n if FP32 else T.expand_block_n,
                 "BLOCK_A": 16, **common},
                ("stride_ur", "stride_bn", "stride_yn"))  # B_cat rank-major (forward), A_cat^T (backward)
        out[f"wgrad r={br}"] = build(
            ls._lora_segmented_wgrad_kernel,
            {"p_ptr": "*" + DT, "q_ptr": "*" + DT, "out_ptr": "*" + DT},
            ["J", "stride_pm", "stride_pr", "stride_qm", "stride_qj", "stride_or", "stride_oj"],
            {"BLOCK_M": T.wgrad_block_m, "BLOCK_J": T.wgrad_block_j, **common},
            ("stride_pr", "stride_qj", "stride_oj"))
    print(json.dumps(out))
    """
)


def test_sm90_builds_fit_in_registers_and_stream_y_in_16_byte_vectors():
    """What the H100 compiler makes of the kernels at the launchers' GPU tiles (bf16, rank tiles 16 and 64),
    compiled here without a GPU, for a 4096-wide layer with R a multiple of 16 (strides divisible by 16, as Triton
    specialises them): at most 128 registers per thread and no more than 8 B of stack (no spills), and the expand,
    which reads and writes y (the bulk of its traffic), moves y with 16-byte vector accesses only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _COMPILE, "bf16"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    builds = json.loads(out.stdout.strip().splitlines()[-1])
    for name, b in builds.items():
        assert b["reg"] <= 128 and b["stack"] <= 8, (name, b)
        if name.startswith("expand"):
            stores = {op: n for op, n in b["mem"].items() if op.startswith("st.")}
            assert set(stores) == {"st.global.v4.b32"} and b["mem"].get("ld.global.v4.b32", 0) >= stores[
                "st.global.v4.b32"], (name, b["mem"])  # fmt: skip


def test_sm90_fp32_builds_do_not_spill():
    """fp32 operands (IEEE dots: FMA, each thread holding its share of a tile step in registers) at the launchers'
    fp32 tiles, rank tiles 16 and 64, every row-block size: no stack (at the 16-bit tiles the expand spilled 4-12 KB
    per thread at rank tile 64 or 64-row blocks, and the shrink 176 bytes at 64-row blocks and rank tile 64)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _COMPILE, "fp32"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    builds = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(builds) == 2 * (5 + 4 + 1), builds
    for name, b in builds.items():
        assert b["stack"] == 0, (name, b)


# ------------------------------------------------------------------------------------------------------ CUDA tier
@pytest.mark.cuda
@pytest.mark.parametrize("M", [16, 256, 4096])
@pytest.mark.parametrize("layout", ["uniform", "skewed"])
def test_cuda_bf16_segmented_no_worse_than_torch(M, layout):
    """bf16, 4096 -> 4096, 16 resident adapters (ranks 8/16/64) with ids incl. -1, uniform or one adapter on 90% of
    the rows: the segmented op's relative error against fp64 (forward and every gradient) is at most plain torch
    bf16's (``lora_linear_reference``, PEFT's order) plus 2%. Modelled: it rounds as ``"composition"`` does, u once
    after its scale (PEFT twice with separate scales), so it should sit at or below torch's error."""
    skew = (lambda ids: torch.where(torch.rand(M, device=ids.device) < 0.9, 3, ids)) if layout == "skewed" else None
    _assert_bf16_no_worse_than_torch(M, [16, 8, 64, 16] * 4, [2.0, 0.5, 0.25, 1.0] * 4, "segmented", skew)


@pytest.mark.cuda
def test_cuda_segmented_equals_the_masked_path_and_survives_graph_capture():
    """Same rounding as ``"composition"`` (up to summation order: its error against fp64 is at most 1.02x
    composition's), and a CUDA graph captured with one ids buffer follows new ids copied into it (the row grouping
    is captured, not served from the cache: stale groups would put whole rows off by O(1))."""
    dev, dt, M, K, N = "cuda", torch.bfloat16, 512, 1024, 768
    x, w, b, As, Bs = _make((M,), K, N, [16] * 8, dt)
    x, w, b = x.detach().to(dev), w.detach().to(dev), b.detach().to(dev)
    As, Bs = [a.detach().to(dev) for a in As], [b_.detach().to(dev) for b_ in Bs]
    ids = torch.randint(-1, 8, (M,), device=dev)
    up = lambda ts: [t.double() for t in ts]
    oracle = lambda: lora_linear_reference(
        x.double(), w.double(), up(As), up(Bs), [2.0] * 8, b.double(), adapter_ids=ids
    )  # fmt: skip

    def assert_as_close_as_composition(got):
        want, dense = oracle(), lora_linear(x, w, As, Bs, [2.0] * 8, b, adapter_ids=ids, path="composition")
        e, e_dense = _rel_err(got, want), _rel_err(dense, want)
        assert e <= 1.02 * e_dense + 1e-6, f"segmented error {e:.3g} > 1.02 x composition's {e_dense:.3g}"

    with torch.no_grad():
        assert_as_close_as_composition(lora_linear(x, w, As, Bs, [2.0] * 8, b, adapter_ids=ids, path="segmented"))
        fn = lambda: lora_linear(x, w, As, Bs, [2.0] * 8, b, adapter_ids=ids)
        fn()  # warm: compiles, and fills the grouping cache (which capture must bypass)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        ids.copy_(torch.randint(-1, 8, (M,), device=dev))
        graph.replay()
        assert_as_close_as_composition(out)
