"""Fused stacks of bottleneck adapters (AdapterHub ``seq_bn`` / ``double_seq_bn`` / ``par_bn`` and ``Stack``).

Notation per row (one token): ``h`` = the sublayer's projection output (``dense(x)`` after dropout), ``y`` = the
sublayer's residual input, ``LN`` = the model's own LayerNorm of that sublayer (may be absent), adapter ``i`` is
``A_i(v) = s_i * (act_i(v @ Wd_i^T + bd_i) @ Wu_i^T + bu_i)``. With ``r_0 = h`` each active level does
(AdapterHub's ``pre_forward`` / ``Adapter.forward`` / ``post_forward``, adapters 1.3.0)::

    sequential:  t_i = r_(i-1) + y                                      (original_ln_before)
                 x_i = LN(t_i) | t_i (no model LN) | r_(i-1) (not original_ln_before)
                 res_i = r_(i-1) (residual_before_ln=True) | t_i ("post_add") | x_i (False)
                 r_i = res_i + A_i(LNb_i(x_i))            with the adapter's own LNs if configured:
                       LNa_i(res_i + A_i(..)) (adapter_residual_before_ln) or res_i + LNa_i(A_i(..))
    parallel:    r_i = r_(i-1) + LNa_i(A_i(LNb_i(y)))                   (LNs optional)
    output:      LN(r_n + y) | r_n + y (no model LN) | r_n (not original_ln_after)

A level whose route is -1 leaves ``r`` unchanged, so one ``routes`` tensor (rows, levels) of adapter indices
expresses stacks, depths, switched-off levels and a different stack per row. AdapterHub's ``Stack`` of
parallel adapters keeps only the last level's output; here parallel levels add up (identical at depth 1).

Kernel design (one row-block kernel after the projection; the projection itself stays on cuBLAS because a
plain Triton GEMM is 1.20-1.38x slower than cuBLAS at M >= 256 on an H100, which would cost more than the
whole adapter stack; ``bench/bench_bottleneck.py::bench_projection_gemm`` measures the engine's Triton GEMM
against cuBLAS at the stacked sublayers' shapes, beside the most a fused epilogue could save). All adapters of
a launch are packed along the bottleneck axis (``Rt = sum r_a``):
``wd`` (Rt, H), ``wu`` (H, Rt) stored H-contiguous, each unit knowing its owner adapter, activation code and its
adapter's scale. One program owns BLOCK_M rows and, per level, (Z) streams the level input over hidden chunks
into a (BLOCK_M, BLOCK_R) bottleneck tile that covers the rank (one tile when the block's rows share an adapter),
applies the activation and the per-(row, unit) mask ``owner == route``, then (U) streams over hidden chunks
again adding the up-projection and residual and writing the running ``r`` (fp32 scratch) while accumulating the
LayerNorm moments for the next level. The unit loops only span the units of the adapters the block's rows use, so
a uniform stack costs one adapter's FLOPs per level. A block whose units fit one BLOCK_R tile (its rows share an
adapter: every block of a one-stack batch, most blocks of a per-sequence mix) runs straight-line unit tiles: the
activation tile stays in registers as pass U's dot operand (or, for wide ranks, in a scratch read in BLOCK_K
sub-tiles), and every hidden loop holds no inner loop, so all its loads are software-pipelined cp.async copies
issued a step ahead (``LOOP_STAGES``); other blocks loop over unit tiles through the scratch. A row block is
latency bound (at hidden 768 a level was a chain of about 50 dependent memory round trips before the pipelining),
so this matters more than FLOPs. A final pass applies the output LayerNorm and stores once (without an output LN
the last level stores the output directly). The unit tile comes from the ranks (``_tiles``); on a GPU the
forward and the level backward time a few row-block / hidden-chunk / warp candidates once per shape (launches of
at least ``TUNE_MIN_ROWS`` rows) and keep the fastest (``_forward_candidates``, ``_level_candidates``,
``_tuned_tiles``: GPU work timed by CUDA-graph replay and host enqueue time apart, one choice for eager calls and one
for graph captures); tests/test_codegen.py pins every candidate's sm_90 build to no register spills.

One stack on every row with wide weights (2 r H x dtype bytes >= 1 MiB per level: hidden 4096, rank 256) takes
instead a level-by-level path on cuBLAS (``bottleneck_gemm.py``): per level a down GEMM and one addmm that adds
the up-projection, its bias and the residual, each weight read once, where every program of the row-block kernel
streams the level's weights from L2. On the GPU, launches of at least ``TUNE_MIN_ROWS`` rows time that path
against the kernel's tiles (both directions: narrow ranks may find the GEMMs faster too) and keep the faster.
Serving the seq_bn default of a post-LN sublayer at hidden <= 1024 (BERT-base), they also time that path chained:
one ``level_boundary`` launch between two levels (the carry's update, the LayerNorm and the next down projection),
n + 1 launches for n levels. The level path fills the same saved tensors as the kernel, and the backward has the
same choice per level (``bottleneck_gemm.level_bwd_levels``: two GEMMs for dz and dx, the LayerNorm and residual
chain in torch), so either backward runs after either forward; a level that every row skips costs the backward
nothing.

Distance from the physical limit (read h and y once, write out once = 3 x M x H x dtype bytes): HBM sees h, y
and out once each plus the fp32 scratch ``r`` when it spills from L2; the per-level re-reads of a program's
(BLOCK_M, H) slab (2 per level) should hit L2 because each program revisits its own slab within microseconds.
Every program also streams its level's weights from L2 (2 r H x 2 bytes: 4 MB at hidden 4096, rank 256), which
bounds the wide-rank case. The eager baseline moves roughly 8 x M x H elements per adapter through HBM (add,
LN, down, act, up, scale, add, LN). ``bench/bench_bottleneck.py::bench_stack_alone`` reports the measured time
as a multiple of that floor.

Backward (training): the forward also keeps r_1..r_n, the pre-activations and the LayerNorm moments; one
row-block kernel per level (top to bottom) runs the g -> dz -> dx -> LayerNorm-backward chain with the same
streaming structure (and the same one-tile path, keeping dz in registers), and cuBLAS computes the weight
gradients of the adapters that train (see ``_stack_backward``). Forward and backward are registered torch custom
ops (``adapter_engine::bottleneck_stack_*``) so torch.compile keeps each stack as one opaque node; eager training
calls the same launchers through a plain autograd Function (``_StackFunction``: less host time per call). Their
kernel launches (and those of the level path's ``add_layer_norm`` and ``level_boundary``) are recorded per geometry
once the tiles are chosen, keyed by what Triton specialises on (``_backend.launch_signature``), and on a GPU repeat
the compiled kernel of their first launch directly (``_backend.launch_by_signature``): no per-launch binding of their
15 to 39 arguments by Triton's launcher.

Files: this module holds the public API (:func:`bottleneck_stack`, whose ``return_launch`` serving layers repeat
without the checks, and :func:`expand_routes`), its input checks, the
torch reference twin :func:`bottleneck_stack_ref` and the custom-op / autograd layer; ``bottleneck_pack.py`` the
options, the packing and each launch's configuration (``_tiles``, ``_flags``); ``bottleneck_fwd.py`` the forward
kernel, its ``@triton.jit`` helpers and launchers; ``bottleneck_dispatch.py`` the choice between the kernel's tiles and
the level-by-level path (timed, ``STACK_PATH``); ``bottleneck_bwd.py`` the backward kernels and ``_stack_backward``;
``bottleneck_gemm.py`` the level-by-level cuBLAS forward and level backward (with ``add_layer_norm.py``, its fused
add and LayerNorm, and ``level_boundary.py``, its chained form's launch between two levels).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ._backend import check_float_dtype, check_same_device, refuse_create_graph, use_triton
from .bottleneck_bwd import _stack_backward
from .bottleneck_dispatch import levels_may_run, uniform_levels
from .bottleneck_fwd import ForwardLaunch, _launch_fwd, bottleneck_stack_fwd
from .bottleneck_pack import (
    _TORCH_ACTS,
    ACTIVATIONS,
    PackedHost,
    PackedStack,
    StackOptions,
    _flags,
    _max_rank,
    pack_adapters,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "PackedHost",
    "PackedStack",
    "StackOptions",
    "ForwardLaunch",
    "bottleneck_stack",
    "bottleneck_stack_fwd",
    "bottleneck_stack_ref",
    "expand_routes",
    "pack_adapters",
]


# --------------------------------------------------------------------------------------------------- reference
def bottleneck_stack_ref(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions,
) -> torch.Tensor:
    """Torch twin of :func:`bottleneck_stack_fwd` (fp32 math, differentiable), mirroring AdapterHub's order."""
    hidden = h.shape[-1]
    hf = h.reshape(-1, hidden).float()
    yf = y.reshape(-1, hidden).float() if y is not None else None
    has_ln = ln_weight is not None
    flags = _flags(options, has_ln)
    lnw = ln_weight.float() if has_ln else None
    lnb = ln_bias.float() if has_ln else None
    if packed.host is not None:
        offsets, scales = list(packed.host.offsets), list(packed.host.scales)
        codes = [c for c, lo, hi in zip(packed.host.codes, offsets, offsets[1:], strict=False) for _ in range(hi - lo)]
    else:
        offsets, codes, scales = packed.offsets.tolist(), packed.unit_act.tolist(), packed.scale.tolist()

    def model_ln(v):
        return F.layer_norm(v, (hidden,), lnw, lnb, options.eps)

    def own_ln(v, w, b, a):
        return F.layer_norm(v, (hidden,), w[a].float(), b[a].float(), options.adapter_ln_eps)

    def adapter(v, a):  # s_a * (act(v Wd^T + bd) Wu^T + bu)
        lo, hi = offsets[a], offsets[a + 1]
        if options.ln_before:
            v = own_ln(v, packed.lnb_w, packed.lnb_b, a)
        z = v @ packed.wd[lo:hi].float().t() + packed.bd[lo:hi].float()
        up = _TORCH_ACTS[codes[lo]](z) @ packed.wu[:, lo:hi].float().t() + packed.bu[a].float()
        return up * scales[a]

    r = hf
    for lvl in range(routes.shape[1]):
        col = routes[:, lvl]
        new = r
        for a in sorted(set(col.tolist()) - {-1}):
            if a < 0 or a + 1 >= len(offsets):
                raise ValueError(f"route {a} at level {lvl} does not name one of the {len(offsets) - 1} adapters")
            if flags["PARALLEL"]:
                u = adapter(yf, a)
                cand = r + (own_ln(u, packed.lna_w, packed.lna_b, a) if options.ln_after else u)
            else:
                t = r + yf if flags["IN_ADD_Y"] else r
                x = model_ln(t) if flags["IN_LN"] else t
                res = (r, t, x)[flags["RES_MODE"]]
                u = adapter(x, a)
                if options.adapter_residual_before_ln:
                    cand = res + u
                    cand = own_ln(cand, packed.lna_w, packed.lna_b, a) if options.ln_after else cand
                else:
                    cand = res + (own_ln(u, packed.lna_w, packed.lna_b, a) if options.ln_after else u)
            sel = col == a
            new = cand if bool(sel.all()) else torch.where(sel[:, None], cand, new)
        r = new
    if flags["OUT_ADD_Y"]:
        r = r + yf
        if flags["OUT_LN"]:
            r = model_ln(r)
    # (every level off and no output add: r is still fp32 h itself; a new tensor, as the kernels return)
    return r.to(h.dtype, copy=r is hf).reshape(h.shape)


# --------------------------------------------------------------------------------------------------- autograd
@functools.lru_cache(maxsize=1024)
def _encode_host(
    options: StackOptions, host: PackedHost, train_levels: tuple[tuple[int, ...], ...], uniform: tuple[int, ...] | None
) -> str:
    """The host-side facts as one string argument of the custom ops: integer-list arguments (SymInt[]) were
    seen to fail intermittently in torch 2.13's argument parsing ("vector::reserve") before the op ran."""
    res = {True: 0, "post_add": 1, False: 2}[options.residual_before_ln]
    structure = [int(options.is_parallel), int(options.original_ln_before), int(options.original_ln_after), res]
    fields = [
        structure,
        [options.eps],
        list(host.offsets),
        list(host.codes),
        list(host.scales),
        [len(t) for t in train_levels],
        [a for t in train_levels for a in t],
        list(uniform or ()),
    ]
    return ";".join(",".join(repr(v) for v in f) for f in fields)


@functools.lru_cache(maxsize=1024)
def _decode_host(meta: str):
    """(options, offsets, codes, scales, train_levels, uniform levels or None) from :func:`_encode_host`'s string."""
    structure, eps, offsets, codes, scales, counts, flat, uniform = (
        [x for x in field.split(",") if x] for field in meta.split(";")
    )
    par, before, after, res = (int(x) for x in structure)
    residual = {0: True, 1: "post_add", 2: False}[res]
    options = StackOptions(bool(par), bool(before), bool(after), residual, eps=float(eps[0]))
    flat = [int(x) for x in flat]
    train_levels, start = [], 0
    for count in (int(x) for x in counts):
        train_levels.append(flat[start : start + count])
        start += count
    offsets, codes, scales = [int(x) for x in offsets], [int(x) for x in codes], [float(x) for x in scales]
    return options, offsets, codes, scales, train_levels, tuple(int(x) for x in uniform) or None


def _forward_with(facts, save, h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes):
    """The forward launch of the custom op and of ``_StackFunction``; ``facts`` as :func:`_decode_host` returns them.
    Returns (out, saved or None)."""
    options, host_offsets, codes, scales, _, uniform = facts
    packed = PackedStack(wd, bd, wu, bu, owner, act, scale, offsets)
    return _launch_fwd(h, y, lnw, lnb, packed, routes, options, save, _max_rank(host_offsets), uniform,
                       (host_offsets, codes, scales))  # fmt: skip


def _backward_with(facts, needs, grad_out, h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, rs, zs,
                   stats):  # fmt: skip
    """The backward of the custom op and of ``_StackFunction`` (``needs``: h, y, lnw, lnb, wd, bd, wu, bu)."""
    options, host_offsets, codes, scales, train_levels, uniform = facts
    return _stack_backward(grad_out, h, y, lnw, lnb, wd, bd, wu, bu, (owner, act, scale, offsets), routes, rs, zs,
                           stats, options, host_offsets, codes, scales, train_levels, needs, uniform)  # fmt: skip


# Registered torch custom ops (torch.compile sees one opaque node per stack, forward and backward):
#   adapter_engine::bottleneck_stack_fwd -> (out, rs, zs, stats); rs/zs/stats are empty unless ``save``
#   adapter_engine::bottleneck_stack_bwd -> [dh, dy, dln_w, dln_b, dwd, dbd, dwu, dbu]; empty where not needed
# The host-side facts the backward needs (structure, unit offsets, activation codes, scales, trainable adapters
# per level) travel as one string so that nothing syncs with the device (see _encode_host).
@torch.library.custom_op("adapter_engine::bottleneck_stack_fwd", mutates_args=())
def _stack_fwd_op(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    unit_owner: torch.Tensor,
    unit_act: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    routes: torch.Tensor,
    meta: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, saved = _forward_with(_decode_host(meta), save, h, y, ln_weight, ln_bias, wd, bd, wu, bu, unit_owner,
                               unit_act, scale, offsets, routes)  # fmt: skip
    if not save:
        return out, h.new_empty(0), h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float32)
    return out, saved.rs, saved.zs, saved.stats


def _saved_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float32 if (h.device.type == "cpu" and h.dtype != torch.float32) else h.dtype


@_stack_fwd_op.register_fake
def _(h, y, ln_weight, ln_bias, wd, bd, wu, bu, unit_owner, unit_act, scale, offsets, routes, meta, save):
    m, levels, rt = h.numel() // h.shape[-1], routes.shape[1], wd.shape[0]
    if not save:
        return (
            h.new_empty(h.shape),
            h.new_empty(0),
            h.new_empty(0, dtype=torch.float32),
            h.new_empty(0, dtype=torch.float32),
        )
    return (
        h.new_empty(h.shape),
        h.new_empty((levels, m, h.shape[-1]), dtype=_saved_dtype(h)),
        h.new_empty((levels, m, rt), dtype=torch.float32),
        h.new_empty((levels + 1, 2, m), dtype=torch.float32),
    )


@torch.library.custom_op("adapter_engine::bottleneck_stack_bwd", mutates_args=())
def _stack_bwd_op(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    unit_owner: torch.Tensor,
    unit_act: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    routes: torch.Tensor,
    rs: torch.Tensor,
    zs: torch.Tensor,
    stats: torch.Tensor,
    meta: str,
    needs: str,
) -> list[torch.Tensor]:
    grads = _backward_with(_decode_host(meta), [c == "1" for c in needs], grad_out, h, y, ln_weight, ln_bias, wd, bd,
                           wu, bu, unit_owner, unit_act, scale, offsets, routes, rs, zs, stats)  # fmt: skip
    return [g if g is not None else h.new_empty(0) for g in grads]


@_stack_bwd_op.register_fake
def _(grad_out, h, y, ln_weight, ln_bias, wd, bd, wu, bu, unit_owner, unit_act, scale, offsets, routes, rs, zs,
      stats, meta, needs):  # fmt: skip
    needs = [c == "1" for c in needs]
    like = [h, y if y is not None else h, ln_weight, ln_bias, wd, bd, wu, bu]
    return [
        t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0)
        for t, need in zip(like, needs, strict=True)
    ]


def _setup_context(ctx, inputs, output):
    h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, meta, save = inputs
    _, rs, zs, stats = output
    ctx.save_for_backward(h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, rs, zs, stats)
    ctx.meta = meta
    ctx.needs = [t is not None and t.requires_grad for t in (h, y, lnw, lnb, wd, bd, wu, bu)]


def _backward(ctx, grad_out, _grs, _gzs, _gstats):
    needs = "".join("1" if n else "0" for n in ctx.needs)
    grads = _stack_bwd_op(grad_out, *ctx.saved_tensors, ctx.meta, needs)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True)) + (None,) * 7


torch.library.register_autograd("adapter_engine::bottleneck_stack_fwd", _backward, setup_context=_setup_context)


class _StackFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager training: a plain autograd Function calls the
    launchers directly, without the custom-op dispatcher (its Python argument handling and autograd wrapper were
    about a third of a fused training step's host time on the CPU profile) and without the host facts' string
    round trip. torch.compile keeps the registered ops (one opaque node per stack). Differentiable once: the
    kernels' gradients have no graph, so a backward with ``create_graph=True`` raises."""

    @staticmethod
    def forward(ctx, h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, facts):
        out, saved = _forward_with(facts, True, h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes)
        ctx.save_for_backward(h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, *saved)
        ctx.facts = facts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_create_graph("bottleneck_stack", "bottleneck_stack_ref")
        grads = _backward_with(ctx.facts, ctx.needs_input_grad[:8], grad_out, *ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------- functional
def _needs_y(options: StackOptions) -> bool:
    return options.is_parallel or options.original_ln_before or options.original_ln_after


def _check(h, y, ln_weight, ln_bias, packed: PackedStack, routes, options: StackOptions) -> None:
    for name, t in (("h", h), ("y", y), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None or name == "h":
            check_float_dtype(name, t)
    hidden = h.shape[-1]
    if y is None and _needs_y(options):
        raise ValueError(f"y (the sublayer's residual input) is required by these options: {options}")
    if y is not None and y.shape != h.shape:
        raise ValueError(f"y must have h's shape {tuple(h.shape)}, got {tuple(y.shape)}")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("pass both the model LayerNorm's weight and bias, or neither")
    if ln_weight is not None and (ln_weight.shape != (hidden,) or ln_bias.shape != (hidden,)):
        raise ValueError(
            f"LayerNorm weight/bias must be ({hidden},), got {tuple(ln_weight.shape)}/{tuple(ln_bias.shape)}"
        )
    if packed.wd.shape[1] != hidden or packed.wu.shape[0] != hidden or packed.bu.shape[1] != hidden:
        raise ValueError(
            f"adapters built for hidden {packed.wd.shape[1]} cannot run on activations of hidden {hidden} "
            f"(h {tuple(h.shape)})"
        )
    if routes.dim() != 2 or routes.shape[0] != h.numel() // hidden:
        raise ValueError(f"routes must be (rows={h.numel() // hidden}, levels), got {tuple(routes.shape)}")
    if routes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routes must be an integer tensor, got {routes.dtype}")
    if options.ln_before != (packed.lnb_w is not None) or options.ln_after != (packed.lna_w is not None):
        raise ValueError("options.ln_before/ln_after must match the packed adapters' own LayerNorm parameters")
    # (the packed parts share wd's device: pack_adapters checks them once, not in every call)
    check_same_device(h=h, y=y, ln_weight=ln_weight, ln_bias=ln_bias, wd=packed.wd, routes=routes)


def _host_levels(routes) -> tuple[int, ...] | None:
    """The per-level adapters of routes given on the host as one (L,) list or CPU tensor, else None (also for a
    tensor while torch.compile traces: its values are data there)."""
    if isinstance(routes, (list, tuple)) and all(isinstance(a, int) for a in routes):
        return tuple(routes)
    if isinstance(routes, torch.Tensor) and routes.device.type == "cpu" and routes.dim() == 1:
        return None if torch.compiler.is_compiling() else tuple(routes.tolist())
    return None


_ROUTE_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def expand_routes(routes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Routes as (rows, L) int32: (L,) is shared by all rows, (B, L) with h (B, S, H) is per sequence."""
    rows = h.numel() // h.shape[-1]
    if not (isinstance(routes, torch.Tensor) and routes.device == h.device):
        routes = torch.as_tensor(routes, device=h.device)
    if routes.dtype not in _ROUTE_DTYPES:  # (before the cast to int32, which would truncate 1.7 to 1)
        raise TypeError(f"routes must be an integer tensor (adapter indices, -1 = off), got {routes.dtype}")
    if routes.dim() == 1:
        return (routes if routes.dtype == torch.int32 else routes.to(torch.int32)).reshape(1, -1).expand(rows, -1)
    if routes.dim() == 2 and routes.shape[0] == rows:
        return routes.to(torch.int32)
    if routes.dim() == 2 and h.dim() >= 3 and routes.shape[0] == h.shape[0]:
        per_seq = rows // h.shape[0]
        return routes.to(torch.int32).repeat_interleave(per_seq, dim=0)
    raise ValueError(
        f"routes must be (levels,), (rows={rows}, levels) or (batch={h.shape[0]}, levels) for h {tuple(h.shape)}, "
        f"got {tuple(routes.shape)}"
    )


def _routes_and_hint(h: torch.Tensor, routes, level_adapters, n_adapters: int):
    """(routes expanded to (rows, L) int32, the per-level hint: the caller's, or one stack given on the host).

    Routes the host sees without a device sync (a list, CPU tensors: the interpreter's) must lie in
    [-1, n_adapters), as the torch twin requires; on a GPU the kernels treat routes outside [0, n_adapters) as off
    (a range check would sync the stream)."""
    host_levels = _host_levels(routes)
    expanded = expand_routes(routes, h)
    if host_levels is not None:  # one stack given on the host: no sync
        if level_adapters is None:
            level_adapters = [[a] if a >= 0 else [] for a in host_levels]
        lo, hi = min(host_levels, default=-1), max(host_levels, default=-1)
    elif expanded.device.type == "cpu" and expanded.numel() and not torch.compiler.is_compiling():
        lo, hi = map(int, torch.aminmax(expanded[:1] if expanded.stride(0) == 0 else expanded))
    else:
        return expanded, level_adapters
    if lo < -1 or hi >= n_adapters:
        raise ValueError(
            f"routes must be -1 (level off) or name one of the {n_adapters} packed adapters, got values in [{lo}, {hi}]"
        )
    return expanded, level_adapters


def _launch_facts(h: torch.Tensor, packed: PackedStack, routes: torch.Tensor, level_adapters):
    """(the pack's host facts, its largest rank, per level the adapter every row runs or None: ``uniform_levels``)."""
    host = packed.host
    if host is None:
        raise ValueError("packed adapters need their host facts: build them with pack_adapters")
    max_rank = _max_rank(host.offsets)
    uniform = uniform_levels(routes, level_adapters, may_read=levels_may_run(h.shape[-1], max_rank, packed.wd.dtype))
    return host, max_rank, uniform


def _trainable(packed: PackedStack, host: PackedHost) -> tuple[bool, ...]:
    """Per adapter, whether its weight gradients are computed. ``host.trainable`` is read at packing time; a
    one-adapter pack holds the adapter's own tensors (no copy), so ``requires_grad_()`` called after packing reaches
    them: read it again there, or their gradients would come back as zeros. (Several adapters are concatenated
    copies: those follow only what required grad when they were made.)"""
    if len(host.trainable) == 1:
        return (any(t.requires_grad for t in packed[:4]),)
    return host.trainable


def bottleneck_stack(
    h: torch.Tensor,
    y: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions = StackOptions(),  # noqa: B008 (a frozen dataclass: an immutable default)
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    level_adapters: list[list[int]] | None = None,
    *,
    return_launch: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ForwardLaunch | None]:
    """Apply a stack of bottleneck adapters to a sublayer output.

    Args:
        h: (..., H) the sublayer's projection output (after dropout), r_0.
        y: (..., H) the sublayer's residual input, or None when no option reads it.
        packed: the adapters, from :func:`pack_adapters` (A adapters, Rt units).
        routes: adapter index (into ``packed``) per level, -1 = level off: (L,) for all rows, (rows, L) per
            token or (B, L) per sequence when h is (B, S, H).
        options: structural options shared by all adapters (AdapterHub field names).
        ln_weight, ln_bias: (H,) the model LayerNorm of this sublayer, or None (pre-LN models).
        level_adapters: optional host-side hint, exactly the adapter indices each level's routes use (a wrong
            hint gives wrong results); saves a device sync when adapter weights train, and when one stack on every
            row may take the level-by-level GEMM path (wide weights; see ``bottleneck_gemm.py``). A level may also
            list -1 (rows with the level off): a static route lists every adapter and -1 at each level, which keeps
            the launch on the mixed-row path whatever its routes hold.
        return_launch: inference only (no autograd): also return how to repeat this call, (output, launch).
            ``launch(h, y, expand_routes(routes, h))`` runs the same kernel launch for new activations without the
            checks and planning (a serving layer's host time per call), valid while everything it was made from
            stays as it was: the shapes, strides, dtypes and device of h, y and the expanded routes, ``packed``,
            ``options``, the LayerNorm tensors and the kind of hint (one stack on every row or not). None when the
            call took another path (the torch reference, the level-by-level cuBLAS path, an empty batch).

    Returns:
        (..., H) in h's dtype. Triton on CUDA / under the interpreter (a registered custom op with a Triton
        backward); the torch reference (plain autograd) on other CPUs or when the adapters carry their own
        LayerNorms.
    """
    if return_launch and (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        raise RuntimeError("return_launch serves without autograd: call bottleneck_stack under torch.no_grad()")
    routes, level_adapters = _routes_and_hint(h, routes, level_adapters, packed.scale.shape[0])
    _check(h, y, ln_weight, ln_bias, packed, routes, options)
    if not use_triton(h) or options.ln_before or options.ln_after:
        out = bottleneck_stack_ref(h, y, ln_weight, ln_bias, packed, routes, options)
        return (out, None) if return_launch else out
    if ln_weight is not None and not (ln_weight.is_contiguous() and ln_bias.is_contiguous()):
        # the row-block kernels read the model LN with unit stride: a strided or expanded view is copied
        # (differentiably: its gradient reaches the view); nn.LayerNorm's parameters are contiguous, so no copy
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    host, max_rank, uniform = _launch_facts(h, packed, routes, level_adapters)
    if return_launch:
        record = []
        out = _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, False, max_rank, uniform, host[:3],
                          record)[0]  # fmt: skip
        return out, (record[0] if record else None)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, y, ln_weight, ln_bias, *packed[:4])
    )
    if not save and not torch.compiler.is_compiling():  # nothing to differentiate: skip the op dispatcher
        return _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, False, max_rank, uniform, host[:3])[0]
    train_levels = [[] for _ in range(routes.shape[1])]
    if save and any(t.requires_grad for t in packed[:4]):
        if level_adapters is None:  # one device sync; the modules pass this hint from the host
            level_adapters = [sorted(set(routes[:, lvl].tolist()) - {-1}) for lvl in range(routes.shape[1])]
        trainable = _trainable(packed, host)
        train_levels = [[int(a) for a in used if a >= 0 and trainable[a]] for used in level_adapters]
    if save and not torch.compiler.is_compiling():  # (the facts as _decode_host returns them)
        facts = (options, host.offsets, host.codes, host.scales, train_levels, uniform)
        return _StackFunction.apply(h, y, ln_weight, ln_bias, *packed[:8], routes, facts)
    return _stack_fwd_op(
        h, y, ln_weight, ln_bias, packed.wd, packed.bd, packed.wu, packed.bu,
        packed.unit_owner, packed.unit_act, packed.scale, packed.offsets, routes,
        _encode_host(options, host, tuple(map(tuple, train_levels)), uniform), save,
    )[0]  # fmt: skip
