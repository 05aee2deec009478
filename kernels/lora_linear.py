"""Fused LoRA linear: ``y = x W^T + b + sum_i scale_i * (x A_i^T) B_i^T`` with the base matmul and the low-rank
update accumulated in one output tile.

One formulation covers one adapter, several summed adapters (PEFT's multi-adapter semantics) and mixed batches
(``adapter_ids`` per row). The N resident adapters are stacked along the rank axis::

    A_cat (R, K) = cat(A_i)      B_cat (N_out, R) = cat(B_i, dim=1)      R = sum r_i
    rank_scale[r] = scale of the adapter owning rank column r, rank_adapter[r] = its index
    C[m, r] = rank_scale[r] if rank_adapter[r] is active for row m else 0
    u = (x_lora A_cat^T) * C           (M, R)   rounded to the input dtype, as PEFT rounds x A^T
    y = x W^T + b + u B_cat^T          (M, N_out)

Without ``adapter_ids`` every adapter is active for every row; ``adapter_ids[m] == -1`` means base only.

Layers, as everywhere in this package, over three files: the launchers (``lora_linear_fwd`` / ``lora_linear_bwd``,
each with a torch twin of the same signature, kernels/lora_linear_launch.py) over the op's paths, the choice among
those paths (kernels/lora_linear_dispatch.py: ``path="auto"``, timed on the GPU), then here the autograd Function and
a torch custom op (used under ``torch.compile``), the functional API ``lora_linear`` and its twin
``lora_linear_reference``, and the serving form over adapters stacked once (``stack_loras``,
``lora_linear_stacked``). The kernels have files of their own: the tiled kernel (kernels/lora_linear_tiled.py), the
persistent one (kernels/lora_linear_tma.py), the mixed batch's (kernels/lora_segmented.py). The host-side preparation
of the op's inputs (argument checks, per-row ids, rank tables, the stacked ``A_cat`` / ``B_cat`` and their caches, the
rows grouped by adapter) is kernels/lora_inputs.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._backend import refuse_create_graph, use_triton
from .lora_inputs import (
    _adapter_lists,
    _compute_factors,
    _rank_tables,
    _row_ids,
    _segments_cached,
    _stack,
    _stack_cached,
    _validate,
)
from .lora_linear_dispatch import PATHS, _serve_mixed, _wants_segmented
from .lora_linear_launch import lora_linear_bwd, lora_linear_fwd
from .lora_segmented import SegmentPlan, plan_segments, u_width


def _rank_major_b(path: str, t: torch.Tensor) -> bool:
    """Stack B_cat rank-major (``lora_inputs._stack``) for the segmented Triton kernels: the forward's expand then
    loads its B tiles as 16-byte vectors along N, and the backward's shrink of ``dy B_cat`` streams along N too."""
    return path == "segmented" and use_triton(t)


# ----------------------------------------------------------------------------------------------------------------
# Autograd Function (eager) and torch custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    """Settings of one call: each adapter's rank and scale, the forward path, and for path ``"segmented"`` the
    rows grouped by adapter (``plan_segments``: integer device tensors, never differentiated)."""

    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    path: str = "auto"
    segments: SegmentPlan | None = None


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear on 2-D operands; inputs ``(settings, x, x_lora, weight, bias, adapter_ids, *As, *Bs)``.

    Saved for backward: x (only for dW, or for dA without dropout), x_lora (dropout only), u = (x_lora A^T) * C
    (M, R) for dB (path ``"segmented"``: (M, U), rows in adapter order), references to the weights and
    the stacked A_cat / B_cat (B_cat rank-major on the segmented Triton path, ``_rank_major_b``; for one adapter the
    factors themselves, B copied only for that layout; so the backward does not concatenate again); never an
    (M, N) or (N, K) temporary. Gradients are derived in ``lora_linear_bwd``; each adapter's dA_i / dB_i is a
    slice of dA_cat / dB_cat. Differentiable once: u is saved without its graph (and the kernels' outputs have
    none), so a backward with ``create_graph=True`` raises (``_backend.refuse_create_graph``) instead of giving
    second derivatives that miss terms.
    """

    @staticmethod
    def forward(ctx, settings: LoraSettings, x, x_lora, weight, bias, adapter_ids, *factors):
        n = len(settings.ranks)
        A, B = _stack(factors[:n], factors[n:], _rank_major_b(settings.path, x))
        rank_scale, rank_adapter, shared = _rank_tables(settings.ranks, settings.scales, x.device)
        g = ctx.needs_input_grad
        need_da, need_dbb = any(g[6 : 6 + n]), any(g[6 + n :])
        y, u = lora_linear_fwd(
            x, weight, A, B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
            path=settings.path, store_u=need_dbb, shared_scale=shared, segments=settings.segments,
        )  # fmt: skip
        ctx.needs = (g[1], g[2] and x_lora is not None, g[3], bias is not None and g[4], need_da, need_dbb)
        keep_x = g[3] or (need_da and x_lora is None)
        # x_lora is kept for dA, and for dx too: the launchers read "x_lora is None" as "the adapter read x" and
        # would then add du A_cat to dx, where with dropout that term belongs to dx_lora only.
        keep_xl = x_lora is not None and (need_da or g[1])
        ctx.save_for_backward(x if keep_x else None, x_lora if keep_xl else None, weight, adapter_ids, u, A, B)
        ctx.settings = settings
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_create_graph("lora_linear", "lora_linear_reference")
        x, x_lora, weight, adapter_ids, u, A, B = ctx.saved_tensors
        s: LoraSettings = ctx.settings
        n = len(s.ranks)
        rank_scale, rank_adapter, shared = _rank_tables(s.ranks, s.scales, dy.device)
        dx, dxl, dW, db, dA, dB = lora_linear_bwd(
            dy, x, x_lora, weight, A, B, rank_scale, rank_adapter, adapter_ids, u, ctx.needs,
            path=s.path, shared_scale=shared, segments=s.segments,
        )  # fmt: skip
        if n == 1:  # one adapter: its gradients are dA_cat / dB_cat themselves (no split op)
            return None, dx, dxl, dW, db, None, dA, dB
        dAs = dA.split(list(s.ranks), 0) if dA is not None else (None,) * n
        dBs = dB.split(list(s.ranks), 1) if dB is not None else (None,) * n
        return (None, dx, dxl, dW, db, None, *dAs, *dBs)


@torch.library.custom_op("adapter_engine::lora_linear_fwd", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scales: list[float],
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = _stack(lora_As, lora_Bs, _rank_major_b(path, x))
    ranks = tuple(a.shape[0] for a in lora_As)
    rank_scale, rank_adapter, shared = _rank_tables(ranks, tuple(scales), x.device)
    plan = plan_segments(adapter_ids, ranks, scales) if path == "segmented" else None
    return lora_linear_fwd(
        x, weight, A, B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path=path, shared_scale=shared,
        segments=plan,
    )  # fmt: skip


@_lora_linear_op.register_fake
def _(x, x_lora, weight, bias, adapter_ids, lora_As, lora_Bs, scales, path):
    ranks = [a.shape[0] for a in lora_As]
    R = u_width(ranks) if path == "segmented" else sum(ranks)  # u's width (path "segmented": the rank tile)
    return x.new_empty((x.shape[0], lora_Bs[0].shape[0])), x.new_empty((x.shape[0], R))


@torch.library.custom_op("adapter_engine::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scales: list[float],
    path: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    A, B = _stack(lora_As, lora_Bs, _rank_major_b(path, dy))
    ranks = tuple(a.shape[0] for a in lora_As)
    rank_scale, rank_adapter, shared = _rank_tables(ranks, tuple(scales), dy.device)
    plan = plan_segments(adapter_ids, ranks, scales) if path == "segmented" else None  # the forward's grouping
    grads = lora_linear_bwd(
        dy, x, x_lora, weight, A, B, rank_scale, rank_adapter, adapter_ids, u, tuple(needs),
        path=path, shared_scale=shared, segments=plan,
    )  # fmt: skip
    return [g if g is not None else dy.new_empty(0) for g in grads]


@_lora_linear_bwd_op.register_fake
def _(dy, x, x_lora, weight, adapter_ids, u, lora_As, lora_Bs, scales, path, needs):
    M, N = dy.shape
    K, R = weight.shape[1], sum(a.shape[0] for a in lora_As)
    shapes = [(M, K), (M, K), (N, K), (N,), (R, K), (N, R)]
    return [dy.new_empty(s if need else (0,)) for s, need in zip(shapes, needs, strict=True)]


def _op_setup_context(ctx, inputs, output):
    x, x_lora, weight, bias, adapter_ids, lora_As, lora_Bs, scales, path = inputs
    need_da, need_dbb = any(a.requires_grad for a in lora_As), any(b.requires_grad for b in lora_Bs)
    ctx.needs = [
        x.requires_grad,
        x_lora is not None and x_lora.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        need_da,
        need_dbb,
    ]
    keep_x = weight.requires_grad or (need_da and x_lora is None)
    ctx.save_for_backward(x if keep_x else None, x_lora, weight, adapter_ids, output[1], *lora_As, *lora_Bs)
    ctx.n, ctx.scales, ctx.path = len(lora_As), list(scales), path


def _op_backward(ctx, dy, du_unused):
    x, x_lora, weight, adapter_ids, u, *factors = ctx.saved_tensors
    n = ctx.n
    As, Bs = list(factors[:n]), list(factors[n:])
    grads = _lora_linear_bwd_op(dy, x, x_lora, weight, adapter_ids, u, As, Bs, ctx.scales, ctx.path, ctx.needs)
    dx, dxl, dW, db, dA, dB = (g if need else None for g, need in zip(grads, ctx.needs, strict=True))
    ranks = [a.shape[0] for a in As]
    # (a list input takes a list of gradients, None for each frozen factor: a bare None fails autograd's check)
    dAs = list(dA.split(ranks, 0)) if dA is not None else [None] * n
    dBs = list(dB.split(ranks, 1)) if dB is not None else [None] * n
    return dx, dxl, dW, db, None, dAs, dBs, None, None


torch.library.register_autograd("adapter_engine::lora_linear_fwd", _op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    path: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + b + sum_i scale_i * (dropout(x) A_i^T) B_i^T`` with the base and low-rank terms fused.

    x: (..., in). weight: (out, in), or (in, out) with ``fan_in_fan_out=True`` (GPT-2 Conv1D; no copy is made).
    lora_A: (r, in) and lora_B: (out, r) with a float ``scale``, or equal-length sequences of them for several
    adapters (ranks may differ). bias: (out,). adapter_ids: None (every adapter is summed into every row, PEFT's
    multi-adapter semantics) or an integer tensor shaped like ``x.shape[:-1]`` (per token) or ``x.shape[:1]``
    (per sequence): row m gets adapter ``adapter_ids[m]`` only, -1 means base only. dropout (applied when
    ``training``) acts on the adapter input only, one mask shared by the adapters. All tensors share one dtype
    (fp32/fp16/bf16) and device, except that the LoRA factors of an fp16 / bf16 x may be fp32 master weights: they
    are computed in x's dtype, as autocast computes with fp32 weights (outputs bit for bit those of their 16-bit
    casts; gradients arrive in fp32). path: see kernels/lora_linear_launch.py (``"auto"``:
    kernels/lora_linear_dispatch.py). Returns (..., out) in x's dtype.
    """
    try:
        cuda = x.is_cuda
    except AttributeError:
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}") from None
    if torch.is_autocast_enabled("cuda" if cuda else x.device.type):  # (device.type: 250 ns, is_cuda 40)
        return _under_autocast(x, weight, lora_A, lora_B, scale, bias, adapter_ids, dropout, training, fan_in_fan_out,
                               path)  # fmt: skip
    As, Bs, scales = _adapter_lists(lora_A, lora_B, scale)
    if x.dtype is not torch.float32:  # (fp32 master factors of a 16-bit x: computed in x's dtype)
        As, Bs = _compute_factors(x, As, Bs, weight=weight)
    out_f, in_f, ranks = _validate(x, weight, As, Bs, bias, fan_in_fan_out)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    lead = x.shape[:-1]
    w = weight.t() if fan_in_fan_out else weight  # (out, in) view
    x_lora = torch.nn.functional.dropout(x, dropout, True).reshape(-1, in_f) if training and dropout > 0 else None
    flat = x.dim() == 2  # already (M, in): no reshape op (and no view node in the autograd graph) each way
    x2 = x if flat else x.reshape(-1, in_f)
    plan, auto = None, path == "auto"
    if path == "segmented" or _wants_segmented(path, x2.shape[0], ranks, adapter_ids, x):
        if adapter_ids is None:
            raise ValueError('path "segmented" is for mixed batches: it needs adapter_ids')
        path = "segmented"
        if torch.compiler.is_compiling():  # the custom op groups the rows itself
            ids = _row_ids(adapter_ids, x, len(As))
        else:
            ids, plan = _segments_cached(adapter_ids, x, ranks, tuple(scales))
    else:
        ids = _row_ids(adapter_ids, x, len(As))
    if torch.compiler.is_compiling():
        y = _lora_linear_op(x2, x_lora, w, bias, ids, As, Bs, scales, path)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias, *As, *Bs)):
        settings = LoraSettings(ranks, tuple(scales), path, plan)
        y = LoraLinearFunction.apply(settings, x2, x_lora, w, bias, ids, *As, *Bs)
    elif plan is not None and auto and x_lora is None:  # serving a mixed batch
        A, B = _stack_cached(As, Bs, _rank_major_b(path, x))
        y = _serve_mixed(x2, w, A, B, bias, ids, plan)
    else:
        A, B = _stack_cached(As, Bs, _rank_major_b(path, x))
        # (the segmented path reads the plan's tables instead)
        rank_scale, rank_adapter, shared = (
            (None, None, None) if plan is not None else _rank_tables(ranks, tuple(scales), x.device)
        )
        y = lora_linear_fwd(
            x2, w, A, B, rank_scale, rank_adapter, bias, ids, x_lora, path=path, store_u=False, shared_scale=shared,
            segments=plan,
        )[0]  # fmt: skip
    return y if flat else y.reshape(*lead, out_f)


def _under_autocast(x, weight, lora_A, lora_B, scale, bias, adapter_ids, dropout, training, fan_in_fan_out, path):
    """``lora_linear`` as F.linear runs under autocast: in the autocast dtype. The casts are differentiable, so fp32
    master weights get fp32 gradients; inside, autocast is off so the op sees one dtype. (A function of its own: its
    closure in ``lora_linear`` would cost every call two cells.)"""
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    lora_A = cast(lora_A) if isinstance(lora_A, torch.Tensor) else [cast(a) for a in lora_A]
    lora_B = cast(lora_B) if isinstance(lora_B, torch.Tensor) else [cast(b) for b in lora_B]
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear(
            cast(x), cast(weight), lora_A, lora_B, scale, cast(bias), adapter_ids=adapter_ids, dropout=dropout,
            training=training, fan_in_fan_out=fan_in_fan_out, path=path,
        )  # fmt: skip


class StackedLoras(NamedTuple):
    """LoRA factors checked against one base layer and stacked once, for mixed-batch inference (:func:`stack_loras`).

    A serving layer runs every forward over the same resident adapters: checking 16 adapters' 32 factors and looking
    up their stacked copies took about half of a layer call's host time (CPU profile), so a layer keeps this and
    passes it to :func:`lora_linear_stacked` while its factors are unchanged."""

    factors: tuple[torch.Tensor, ...]  # (*lora_As, *lora_Bs): the factors the copies were made from, as given
    scales: tuple[float, ...]
    ranks: tuple[int, ...]
    A: torch.Tensor  # (R, in) stacked lora_As
    B: torch.Tensor  # (out, R) stacked lora_Bs (rank-major for the segmented Triton kernels)
    base: tuple  # (dtype, device, weight shape, fan_in_fan_out, bias shape or None) they were checked against

    @property
    def lora_As(self) -> tuple[torch.Tensor, ...]:
        return self.factors[: len(self.ranks)]

    @property
    def lora_Bs(self) -> tuple[torch.Tensor, ...]:
        return self.factors[len(self.ranks) :]


def stack_loras(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    fan_in_fan_out: bool = False,
) -> StackedLoras:
    """Check ``lora_linear``'s arguments (``x`` stands for the calls to come: its dtype, device and features) and
    stack the factors for :func:`lora_linear_stacked`. The copies are plain tensors made outside autograd."""
    As, Bs, scales = _adapter_lists(list(lora_As), list(lora_Bs), list(scales))
    with torch.no_grad():
        computed = _compute_factors(x, As, Bs, cache=False, weight=weight)  # (fp32 masters: in x's dtype, once)
        ranks = _validate(x, weight, *computed, bias, fan_in_fan_out)[2]
        A, B = _stack(*computed, _rank_major_b("segmented", x))
    base = (x.dtype, x.device, weight.shape, fan_in_fan_out, None if bias is None else bias.shape)
    return StackedLoras((*As, *Bs), tuple(scales), ranks, A, B, base)


def lora_linear_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    stacked: StackedLoras,
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor,
    fan_in_fan_out: bool = False,
    path: str = "segmented",
) -> torch.Tensor:
    """``lora_linear(x, weight, stacked.lora_As, stacked.lora_Bs, stacked.scales, bias, adapter_ids=adapter_ids,
    fan_in_fan_out=fan_in_fan_out, path=path)`` for inference, without checking and stacking the factors again.
    path: ``"segmented"``, or ``"auto"`` for a batch that ``mixed_batch_path`` sends to it: the segmented path, or
    where that timed faster a GEMM adding each row's own adapter in its epilogue (``_serve_mixed``). A call that does
    not fit what ``stacked`` was checked against (or that autograd or autocast would see) takes ``lora_linear``
    itself, which names any problem."""
    dt, dev, w_shape, fifo, b_shape = stacked.base
    fits = (
        x.dtype == dt and x.device == dev and weight.dtype == dt and weight.device == dev and weight.shape == w_shape
        and fan_in_fan_out == fifo and (bias.shape == b_shape and bias.dtype == dt and bias.device == dev
                                        if bias is not None else b_shape is None)
        and x.dim() >= 1 and x.shape[-1] == (w_shape[0] if fifo else w_shape[1])
        and not torch.is_grad_enabled() and not torch.is_autocast_enabled(dev.type)
        and not torch.compiler.is_compiling()
    )  # fmt: skip
    if path not in ("segmented", "auto"):
        raise ValueError(f'lora_linear_stacked serves path "segmented" or "auto", got {path!r}')
    if not fits:
        return lora_linear(
            x, weight, list(stacked.lora_As), list(stacked.lora_Bs), list(stacked.scales), bias,
            adapter_ids=adapter_ids, fan_in_fan_out=fan_in_fan_out, path=path,
        )  # fmt: skip
    in_f = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    ids, plan = _segments_cached(adapter_ids, x, stacked.ranks, stacked.scales)
    w = weight.t() if fan_in_fan_out else weight
    if path == "auto":
        y = _serve_mixed(x2, w, stacked.A, stacked.B, bias, ids, plan)
    else:
        y = lora_linear_fwd(x2, w, stacked.A, stacked.B, None, None, bias, ids, None, path="segmented",
                            store_u=False, segments=plan)[0]  # fmt: skip
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0])


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    path: str = "auto",
) -> torch.Tensor:
    """Pure-torch twin of ``lora_linear`` (PEFT's eager formulation, autograd does the backward; fp32 master factors
    of a 16-bit x are cast to x's dtype first, as the op computes with them).

    Same arguments and result; adapters are added one at a time in order, as PEFT does; a mixed batch masks
    each adapter's term to its rows. ``path`` is accepted for signature parity and ignored.
    """
    del path
    As, Bs, scales = _adapter_lists(lora_A, lora_B, scale)
    As, Bs = _compute_factors(x, As, Bs, cache=False, weight=weight)
    _validate(x, weight, As, Bs, bias, fan_in_fan_out, allow_fp64=True)
    ids = _row_ids(adapter_ids, x, len(As))
    w = weight.t() if fan_in_fan_out else weight
    x_lora = torch.nn.functional.dropout(x, dropout, True) if training and dropout > 0 else x
    y = torch.nn.functional.linear(x, w, bias)
    for i, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
        term = torch.nn.functional.linear(torch.nn.functional.linear(x_lora, a), b) * s
        if ids is not None:
            term = term * (ids == i).reshape(*x.shape[:-1], 1).to(term.dtype)
        y = y + term
    return y
