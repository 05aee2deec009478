"""Launchers of the fused LoRA linear op (``lora_linear_fwd`` / ``lora_linear_bwd``) over its paths, each with its
torch twin (``lora_linear_fwd_reference`` / ``lora_linear_bwd_reference``). Notation: kernels/lora_linear.py; the
choice of ``path="auto"``: kernels/lora_linear_dispatch.py.

Forward paths (``path=``; ``"auto"`` is chosen in kernels/lora_linear_dispatch.py):
  * ``"fused"``: one launch of the tiled kernel; its K loop also accumulates ``x A_cat^T`` (recomputed per N tile:
    cheap while M is small and the op is memory bound). At M <= 64 the autotuner may also pick split-K tiles.
  * ``"epilogue"``: ``u`` from one torch matmul, then the tiled kernel adds ``u B_cat^T`` in its epilogue.
  * ``"addmm"``: the low-rank term (+ bias) is written first, then cuBLAS accumulates ``x W^T`` onto it with
    ``beta=1`` (``y.addmm_``): one pass over ``y`` fewer than ``"composition"``. The low-rank term + bias is
    rounded to the output dtype before the sum, and cuBLAS's ``beta=1`` accumulation appears to add about one
    more rounding: on the H100 its bf16 ``y`` error is 1.02-1.03x PEFT's where a one-rounding-per-GEMM model of
    its order predicts 0.92x (see the CUDA test); the other paths stay at or below PEFT's. Its backward uses the
    ``"composition"`` order for ``dx``.
  * ``"composition"``: ``F.linear`` then ``y.addmm_(u, B^T)``, the best plain-torch order (benchmark provider).
  * ``"persistent"``: the ``"epilogue"`` math on a Hopper-grade main loop (kernels/lora_linear_tma.py: persistent
    grid, TMA descriptors, the shrink fused or from cuBLAS), for 16-bit operands with 16-byte aligned rows on
    sm_90+; elsewhere it falls back to ``"epilogue"``.
  * ``"segmented"`` (mixed batches only: needs ``adapter_ids``): ``F.linear``, then each row's own adapter term
    from kernels/lora_segmented.py (rows grouped by adapter on the device; SGMV shrink and expand). The masked paths
    above do ``M * R * (K + N)`` low-rank work for R = the sum of all resident ranks; this one ``M * r * (K + N)``
    with r = the row's own rank. u is rounded once after its scale (as in the Triton kernel), y once after cuBLAS's
    base (as ``"composition"``); ``u`` is then (M, U) with rows in adapter order (U: the max rank rounded up to a
    power of two >= 16), not (M, R).

The tiled kernel's launches (``"fused"``, ``"epilogue"``) are planned once per geometry of the operands and then
repeated (``lora_linear_tiled.TiledLaunch``): a small-M call is mostly host time, and on a GPU the repeat calls the
compiled kernel directly instead of through Triton's launcher (``_backend.DirectLaunch``).

The torch paths (``"addmm"``, ``"composition"``) are cuBLAS GEMMs and nothing else when every adapter shares one
scale and there are no ``adapter_ids`` (the common case): the scale is the GEMM's ``alpha`` (``u = addmm_(beta=0,
alpha=scale)``: fp32 accumulator scaled, rounded once, as in the kernel; no (M, R) fp32 temporary). Several
scales multiply the rounded ``x A^T`` in place (one more rounding of ``u``, as PEFT's ``* scaling`` rounds);
``adapter_ids`` zero the inactive columns in place. Forward: 3 GEMMs; backward (grads for x, A, B):
``du = dy B * C``, ``dx = dy W`` then ``dx.addmm_(du, A)``, ``dA = du^T x``, ``dB = dy^T u``: 5 GEMMs.
"""

from __future__ import annotations

import torch

from . import lora_linear_dispatch as dispatch
from ._backend import capturing, use_triton
from .lora_linear_tiled import lora_linear_tiled_fwd
from .lora_linear_tma import lora_linear_tma_fwd
from .lora_segmented import (
    SegmentPlan,
    lora_segmented_bwd_reference,
    lora_segmented_fwd_reference,
    segmented_bwd_checked_by_caller,
    segmented_fwd_checked_by_caller,
)


def coefficients(rank_scale: torch.Tensor, rank_adapter: torch.Tensor, adapter_ids: torch.Tensor | None):
    """C: (M, R) fp32 (or (1, R) without ids) = rank_scale where the column's adapter is active for the row."""
    if adapter_ids is None:
        return rank_scale[None, :]
    return torch.where(adapter_ids[:, None] == rank_adapter[None, :], rank_scale[None, :], 0.0)


def _alloc(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Kernel outputs (tests replace this to hand the kernel NaN-poisoned buffers)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    path: str = "auto",
    store_u: bool = True,
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher on 2-D operands (already validated by the functional API).

    x: (M, K); weight: (N, K) any strides; lora_A: (R, K); lora_B: (N, R); rank_scale: (R,) fp32;
    rank_adapter: (R,) int32; bias: (N,); adapter_ids: (M,) int32; x_lora: (M, K) adapter input (dropout) or
    None for x; shared_scale: the one scale of every rank when they share it (a host float, equal to every
    entry of ``rank_scale``), else None. Returns y (M, N) and u = (x_lora A^T) * C (M, R) in x's dtype (None
    unless ``store_u``; the torch paths always return it). Path ``"segmented"``: ``segments`` (from
    ``plan_segments(adapter_ids, ranks, scales)``) replaces the rank tables and u is (M, U), rows in adapter order
    (kernels/lora_segmented.py).
    """
    if path == "segmented":
        fwd = segmented_fwd_checked_by_caller if use_triton(x) else lora_segmented_fwd_reference
        return fwd(x, weight, lora_A, lora_B, _need_plan(segments), bias, x_lora, store_u=store_u)
    if not use_triton(x):
        return lora_linear_fwd_reference(
            x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
            path=path, store_u=store_u, shared_scale=shared_scale,
        )  # fmt: skip
    M, K = x.shape
    N, R = lora_B.shape
    operands = None  # their geometry (shapes, strides, dtype, device, switches): the recorded launches' key
    if path == "auto" and 0 < M <= dispatch.DISPATCH.fused_max_m:  # the tiled kernel or "composition", as timed
        operands = dispatch._operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u)
        paths = dispatch._SMALL_M_PATHS.get(operands)
        if paths is None:
            launch = _path_launch(
                x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, store_u, shared_scale
            )
            paths = dispatch._small_m_choice(operands, x, launch)
        path = paths[0] if paths[0] == paths[1] or not capturing(x) else paths[1]  # (eager, graphed)
    else:
        path = dispatch._pick_path(path, M, fusable=x_lora is None)
    tiles = None
    if path in ("timed", "persistent"):
        args = (x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, shared_scale)
        path, tiles = dispatch._large_m_choice(
            path, x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u, shared_scale, _large_m_launch(*args)
        )
    if path in ("addmm", "composition"):
        return _torch_paths(
            x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path, shared_scale
        )
    if tiles is not None:
        y = _alloc((M, N), x)
        u_out = _alloc((M, R), x) if store_u else None
        lora_linear_tma_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                            tiles)  # fmt: skip
        return y, u_out
    if M == 0:
        return _alloc((M, N), x), (_alloc((M, R), x) if store_u else None)
    if operands is None:
        operands = dispatch._operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u)
    y = _alloc((M, N), x)
    u_out = _alloc((M, R), x) if store_u else None
    lora_linear_tiled_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                          (*operands, path == "fused"))  # fmt: skip
    return y, u_out


# The timed choosers' launches (kernels/lora_linear_dispatch.py), made outside lora_linear_fwd: a closure there would
# turn its arguments into cells, host time on every call.
def _path_launch(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, store_u, shared_scale):
    """``launch(path)`` of ``_small_m_choice``: ``lora_linear_fwd`` on these operands with that path."""
    return lambda c: lora_linear_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
                                     path=c, store_u=store_u, shared_scale=shared_scale)  # fmt: skip


def _large_m_launch(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, shared_scale):
    """``launch(candidate, y, u)`` of ``_large_m_choice``: ``"composition"``, or the persistent kernel's tiles into
    the chooser's y and u."""

    def launch(c, y, u):
        if c == "composition":
            args = (rank_scale, rank_adapter, bias, adapter_ids, x_lora, c, shared_scale)
            _torch_paths(x, weight, lora_A, lora_B, *args)
        else:
            lora_linear_tma_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u, c)

    return launch


def _need_plan(segments: SegmentPlan | None) -> SegmentPlan:
    if segments is None:
        raise ValueError('path "segmented" needs segments=plan_segments(adapter_ids, ranks, scales)')
    return segments


def _shrink(inp, factor, rank_scale, rank_adapter, adapter_ids, shared_scale):
    """``(inp @ factor) * C`` (M, R) in inp's dtype with as few launches as the case allows (torch paths).

    inp: (M, K); factor: (K, R) (``A_cat^T`` forward, ``B_cat`` backward). ``shared_scale`` (every rank's scale,
    known on the host) becomes the GEMM's alpha: fp32 accumulator times scale, rounded once, no temporary. Without
    it the rounded product is scaled in place by ``rank_scale`` (computed in fp32, rounded again). ``adapter_ids``
    then zero the columns of adapters inactive in each row, in place (an exact multiply by 0 or 1).
    """
    if shared_scale is not None:
        u = inp.new_empty((inp.shape[0], factor.shape[1])).addmm_(inp, factor, beta=0, alpha=shared_scale)
        if adapter_ids is not None:
            u.mul_(adapter_ids[:, None] == rank_adapter[None, :])
        return u
    return torch.mm(inp, factor).mul_(coefficients(rank_scale, rank_adapter, adapter_ids))


def _torch_paths(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path, shared_scale):
    """``"addmm"``: y = b + u B^T, then y += x W^T inside cuBLAS (beta=1). ``"composition"``: the reverse."""
    u = _shrink(x if x_lora is None else x_lora, lora_A.t(), rank_scale, rank_adapter, adapter_ids, shared_scale)
    if path == "addmm":
        y = torch.addmm(bias, u, lora_B.t()) if bias is not None else u @ lora_B.t()
        return y.addmm_(x, weight.t()), u
    y = torch.nn.functional.linear(x, weight, bias)
    return y.addmm_(u, lora_B.t()), u


def lora_linear_fwd_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    path: str = "auto",
    store_u: bool = True,
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch twin of ``lora_linear_fwd``: fp32 accumulation, u rounded to the input dtype, y rounded once."""
    if path == "segmented":  # its u has another layout: (M, U), rows in adapter order
        return lora_segmented_fwd_reference(
            x, weight, lora_A, lora_B, _need_plan(segments), bias, x_lora, store_u=store_u
        )
    del path, shared_scale  # one torch formulation serves every path; rank_scale holds the scales
    if x.dtype == torch.float32 or x.device.type == "cuda":
        u = (x if x_lora is None else x_lora) @ lora_A.t()
        u = (u.float() * coefficients(rank_scale, rank_adapter, adapter_ids)).to(x.dtype)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        return y.addmm_(u, lora_B.t()), (u if store_u else None)
    f = lambda t: None if t is None else t.float()  # CPU half matmuls: upcast, round once
    u = f(x if x_lora is None else x_lora) @ f(lora_A).t()
    u = (u * coefficients(rank_scale, rank_adapter, adapter_ids)).to(x.dtype)
    y = torch.addmm(f(bias), f(x), f(weight).t()) if bias is not None else f(x) @ f(weight).t()
    return y.addmm_(u.float(), f(lora_B).t()).to(x.dtype), (u if store_u else None)


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    *,
    path: str = "auto",
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward launcher. ``needs`` = which of (dx, dx_lora, dweight, dbias, dA_cat, dB_cat) to compute.

    dy: (M, N); x, x_lora: (M, K) (x_lora None: the adapter read x); u: (M, R), the forward's ``u * C``.
    With ``du = (dy B_cat) * C`` (M, R): ``dB_cat = dy^T u``, ``dA_cat = du^T x_lora``, ``dx = dy W + du A_cat``
    (without dropout; with it ``dx = dy W`` and ``dx_lora = du A_cat``), ``dW = dy^T x``, ``db = sum_m dy``.
    ``dx`` has the forward's form on transposed views (x' = dy, W' = W^T, A' = B_cat^T, B' = A_cat^T), so the
    fused forward kernel computes it, writing ``du`` as its ``u``, when ``path`` picks a Triton path for dy's rows.
    On the torch paths cuBLAS does it directly: ``du`` as in the forward (``_shrink``), ``dx = dy W`` and then
    ``dx.addmm_(du, A_cat)`` (``"addmm"`` too: the low-rank term is summed in fp32, not rounded first). Returns the
    six gradients (None if unneeded). ``shared_scale``, ``segments``: as in ``lora_linear_fwd``; path
    ``"segmented"`` (u in its layout) runs ``lora_segmented_bwd``.
    """
    if path == "segmented":
        bwd = segmented_bwd_checked_by_caller if use_triton(dy) else lora_segmented_bwd_reference
        return bwd(dy, x, x_lora, weight, lora_A, lora_B, _need_plan(segments), u, needs)
    if not use_triton(dy):
        return lora_linear_bwd_reference(
            dy, x, x_lora, weight, lora_A, lora_B, rank_scale, rank_adapter, adapter_ids, u, needs,
            path=path, shared_scale=shared_scale,
        )  # fmt: skip
    need_dx, need_dxl, need_dw, need_db, need_da, need_dbb = needs
    dx = dxl = du = None
    dx_path = dispatch._pick_path(path, dy.shape[0], fusable=True)
    triton_dx = need_dx and x_lora is None and dx_path in ("fused", "epilogue", "persistent", "timed")
    if triton_dx:
        dx, du = lora_linear_fwd(
            dy, weight.t(), lora_B.t(), lora_A.t(), rank_scale, rank_adapter, None, adapter_ids,
            path=path, shared_scale=shared_scale,
        )  # fmt: skip
    elif need_dx:
        dx = torch.mm(dy, weight)
    if du is None and ((need_dx and x_lora is None) or need_da or need_dxl):
        du = _shrink(dy, lora_B, rank_scale, rank_adapter, adapter_ids, shared_scale)
    if need_dx and not triton_dx and x_lora is None:
        dx.addmm_(du, lora_A)
    if need_dxl:
        dxl = du @ lora_A
    dA = du.t() @ (x if x_lora is None else x_lora) if need_da else None
    dB = dy.t() @ u if need_dbb else None
    dW = dy.t() @ x if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dxl, dW, db, dA, dB


def lora_linear_bwd_reference(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    *,
    path: str = "auto",
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Torch twin of ``lora_linear_bwd`` (same formulas; CPU half precision upcast to fp32, rounded once)."""
    if path == "segmented":
        return lora_segmented_bwd_reference(dy, x, x_lora, weight, lora_A, lora_B, _need_plan(segments), u, needs)
    del path, shared_scale
    need_dx, need_dxl, need_dw, need_db, need_da, need_dbb = needs
    dt = dy.dtype
    up = (lambda t: t) if (dt == torch.float32 or dy.device.type == "cuda") else (lambda t: t.float())
    out = lambda t: None if t is None else t.to(dt)
    dyf, Af, Bf = up(dy), up(lora_A), up(lora_B)
    du = None
    if need_dx or need_dxl or need_da:
        du = ((dyf @ Bf).float() * coefficients(rank_scale, rank_adapter, adapter_ids)).to(dt)
    dx = dxl = None
    if need_dx:
        dx = dyf @ up(weight)
        if x_lora is None:
            dx = dx.addmm_(up(du), Af)
    if need_dxl:
        dxl = up(du) @ Af
    dA = up(du).t() @ up(x if x_lora is None else x_lora) if need_da else None
    dB = dyf.t() @ up(u) if need_dbb else None
    dW = dyf.t() @ up(x) if need_dw else None
    db = dyf.sum(0) if need_db else None
    return out(dx), out(dxl), out(dW), out(db), out(dA), out(dB)
