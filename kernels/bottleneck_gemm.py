"""The bottleneck stack level by level on cuBLAS GEMMs, for one stack shared by every row (wide ranks).

Why: the row-block kernel (``bottleneck_fwd.py``) has every program stream its level's weights from L2, 2 r H
elements per level per row block: 4 MB per level per program at hidden 4096, rank 256 (Llama-shaped), 16 to 32
rows at a time, so there it is bound by L2 bandwidth (the first H100 run: 2.77 ms for three levels over 4096 x 4096
against 0.61 ms eager); its fp32 running ``r`` (4 bytes per element, 64 MB at 4096 x 4096) no longer fits L2
either. When every row runs the same adapter at a level, the level is instead two GEMMs over all rows, each weight
read once (operands from :func:`_level_operands`, the rank padded with one bias unit)::

    a_i = act(x_i [Wd; 0]^T + [bd; 1; 0]) = [act(z_i), k, 0]    F.linear and the activation, or one cuBLASLt call
                                                                with the bias and ReLU in its epilogue
    res_i + u_i = res_i + a_i [s Wu^T; s bu / k; 0]             one addmm: the residual is its C operand

so a level costs two or three launches, whatever the activation, scale and biases. Where a sum feeds a model LN
(``c_1 = h + y`` and the first level's input LN(c_1); ``LN(r_n + y)`` at the end of Houlsby placement or a saving
forward) one launch of ``add_layer_norm`` makes both: one launch and one pass over the activation fewer.

AdapterHub's default ``seq_bn`` order (residual r_(i-1), level input t_i = r_(i-1) + y, LayerNormed by the model
LN where it has one) lets the path carry ``c_i = r_(i-1) + y`` instead of r: ``c_(i+1) = c_i + u_i`` is the same
addmm, the level input is c_i (or LN(c_i)) and the output r_n + y is c_(n+1). A level then moves 3 activations
through HBM (read c in the down GEMM, read c and write c + u in the addmm, which accumulates into c in place; plus
LN's read and write with a model LN), the fewest two dependent GEMMs allow, against the row-block kernel's 2-byte
h, y and out plus 12 bytes of fp32 scratch per element and level once that spills from L2. The activations between
levels are rounded to h's dtype, as the eager modules do (the row-block kernel keeps them in fp32).

Chained (:func:`_stack_fwd_chained`, serving that default at hidden <= 1024; the tuner times it as its own
candidate): each boundary between levels is one ``level_boundary`` launch (kernels/level_boundary.py) that updates
the carry, normalises it and runs the next level's down projection and activation, so a level moves 2 activations
through HBM (read c, write c) and takes one launch. A stack of n levels then moves 2n + 3 passes (the start reads h
and y and writes c; the end reads c and writes LN(c)) in n + 1 launches, where the sublayer alone (the add and its
LayerNorm) moves 5 in two: one adapter costs no pass more than the sublayer, each further one two.

It fills the same saved tensors as the kernel (r_i, the fp32 pre-activations, the LN moments the backward reads),
so the backward does not depend on which forward ran. A saving forward carries r itself, not c, so that the
saved r_i and LN moments are exactly what the levels used (with c, r_i = c - y would be rounded once more; on CPU
the bf16 gradients of a few weights came out worse than plain torch's that way, better without).
``bottleneck_fwd._launch_fwd`` offers this path as one more candidate to time on the GPU and takes it untimed for
wide weights (:func:`prefer_levels`).

The backward has the same choice per level (:func:`level_bwd_levels`, offered by ``bottleneck_bwd._stack_backward``):
``dz = s (g Wu) * act'(z)`` and ``dx = dz Wd`` as two GEMMs over all rows, then the model LN's backward and the
residual paths in torch on the kernel's fp32 ``g`` and ``dy``. That moves more bytes than the level kernel's fused
passes (each torch op reads and writes its (M, H) operands), which pays only where the kernel's weight stream is
the larger cost.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._backend import capturing, kept, normal_tensors, use_triton
from .add_layer_norm import add_layer_norm
from .add_layer_norm import layer_norm_with_stats as _layer_norm
from .bottleneck_pack import _TORCH_ACT_GRADS, _TORCH_ACTS, ACTIVATIONS, PackedStack
from .level_boundary import MAX_DOWN_WIDTH, level_boundary_fwd, level_boundary_reference
from .level_boundary import MAX_HIDDEN as _MAX_CHAINED_HIDDEN

# A level's weights (2 r H elements) at or above this many bytes make the row-block kernel's per-program weight
# stream the larger traffic: 1 MiB is rank 128 at hidden 2048 in bf16; BERT-base's rank 48 at 768 is 147 KB.
LEVEL_WEIGHT_BYTES = 1 << 20


def prefer_levels(hidden: int, max_rank: int, weight_dtype: torch.dtype) -> bool:
    """Whether the untimed choice for one stack on every row is this path rather than the row-block kernel."""
    return 2 * max_rank * hidden * weight_dtype.itemsize >= LEVEL_WEIGHT_BYTES


# (packed weights' ids, adapter, dtype) -> (their versions, _level_operands' tensors); an entry goes when its packed up
# weights are freed. So this holds one more copy of the weights of the stacks that the modules keep packed (one per
# wrapped sublayer), outside the AdapterMemoryManager's byte count. Packs that train count too (a pack of one adapter
# is its parameters themselves): the operands are built without autograd, and an optimizer step is a new version.
_OPERANDS: dict[tuple, tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _level_operands(packed: PackedStack, adapter: int, lo: int, hi: int, code: int, scale: float, dtype):
    """One adapter's GEMM operands, its rank padded with one bias unit and zeros to a multiple of 8 (16-byte rows):

        down weight [Wd; 0] (w, H), down bias [bd; 1; 0] (w,), so act([z, 1, 0]) = [act(z), k, 0] with k = act(1)
        up [s Wu^T; s bu / k; 0] (w, H), so that act(...) @ up = s (act(z) Wu^T + bu)

    Every supported activation maps 0 to 0 and 1 to a non-zero k (relu and identity: exactly 1), so one down GEMM
    and one elementwise activation (or one cuBLASLt call with its ReLU epilogue) give the up GEMM's whole left
    operand, and the adapter's scale and up bias ride in its right operand."""
    key = (id(packed.wd), id(packed.bd), id(packed.wu), id(packed.bu), adapter, lo, hi, code, scale, dtype)
    # an in-place update of the packed weights rebuilds them (inference tensors have no version counter: packed
    # under torch.inference_mode, they are taken as unchanged while they live)
    versions = tuple(-1 if t.is_inference() else t._version for t in packed[:4])
    dev = packed.wd.device
    hit = _OPERANDS.get(key)
    if hit is not None and hit[0] == versions:  # also while a CUDA graph is captured: it reads the kept copies
        return kept(hit[1])
    cacheable = not capturing(packed.wd)  # (never store tensors a capture made)
    rank, hidden = hi - lo, packed.wd.shape[1]
    width = _width(rank)
    with normal_tensors(), torch.no_grad():  # (normal tensors, cached: a later recorded call may save them)
        down_w = torch.zeros((width, hidden), device=dev, dtype=dtype)
        down_w[:rank] = packed.wd[lo:hi]
        down_b = torch.zeros(width, device=dev, dtype=dtype)
        down_b[:rank] = packed.bd[lo:hi]
        down_b[rank].fill_(1.0)  # (a kernel: assigning a Python number copies from the host, which no capture takes)
        k = _TORCH_ACTS[code](torch.ones((), device=dev, dtype=dtype)).float()  # act(1) as the GEMM operand holds it
        up = torch.zeros((width, hidden), device=dev, dtype=dtype)
        up[:rank] = packed.wu[:, lo:hi].t().float() * scale
        up[rank] = packed.bu[adapter].float() * (scale / k)
    ops = (down_w, down_b, up)
    if cacheable:
        if key not in _OPERANDS:
            weakref.finalize(packed.wu, _OPERANDS.pop, key, None)
        _OPERANDS[key] = (versions, ops)
    return ops


def _width(rank: int) -> int:
    """A level's GEMM operand width (:func:`_level_operands`): the rank and its bias unit, padded to 8."""
    return -(-(rank + 1) // 8) * 8


def chains_levels(flags: dict, hidden: int, max_rank: int, *dtypes: torch.dtype) -> bool:
    """Whether :func:`stack_fwd_levels` with ``chain`` runs the stack as n + 1 ``level_boundary`` launches
    (:func:`_stack_fwd_chained`): the carried seq_bn default (``c = r + y``, level input ``LN(c)``) of a forward that
    saves nothing, rows of at most its ``MAX_HIDDEN``, operand widths of at most its ``MAX_DOWN_WIDTH``, and one
    dtype for h, y and the weights (the carry is then in the GEMM operands' dtype)."""
    return (
        flags["IN_LN"] and flags["IN_ADD_Y"] and flags["OUT_ADD_Y"] and flags["RES_MODE"] == 0
        and not flags["PARALLEL"] and hidden <= _MAX_CHAINED_HIDDEN and _width(max_rank) <= MAX_DOWN_WIDTH
        and len(set(dtypes)) == 1
    )  # fmt: skip


def build_level_operands(packed: PackedStack, level_adapters, host) -> None:
    """Build and cache the GEMM operands of every active level, outside any capture: for a key whose eager calls
    take the row kernel while CUDA-graph captures take this path (``bottleneck_dispatch._tuned_tiles``), so a capture
    finds them cached instead of recording their build into the graph."""
    offsets, codes, scales = host
    for a in level_adapters:
        if 0 <= a < len(codes):
            _level_operands(packed, a, offsets[a], offsets[a + 1], codes[a], scales[a], packed.wd.dtype)


def stack_fwd_levels(
    h2, y2, ln_weight, ln_bias, packed: PackedStack, level_adapters, host, flags: dict, eps: float, saved=None,
    chain: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The stack's output (M, H) for ``h2`` / ``y2`` (M, H), level by level on cuBLAS, in h's dtype.

    ``level_adapters``: per level, the adapter every row runs (-1: the level is off); ``host`` = (offsets, codes,
    scales) of the packed adapters; ``flags``: ``bottleneck_pack._flags``; ``saved``: the kernel's (rs, zs, stats)
    to fill for the backward (zs zero-initialised), or None; ``chain``: the stack as n + 1 ``level_boundary``
    launches (:func:`_stack_fwd_chained`), which the caller asks for only where :func:`chains_levels` holds for the
    pack (so for its active levels) and nothing is saved."""
    offsets, codes, scales = host
    if any(a >= len(codes) for a in level_adapters):
        raise ValueError(f"routes {list(level_adapters)} name an adapter beyond the {len(codes)} packed ones")
    if chain:
        return _stack_fwd_chained(h2, y2, ln_weight, ln_bias, packed, level_adapters, host, flags["OUT_LN"], eps)
    par, in_add_y, in_ln = flags["PARALLEL"], flags["IN_ADD_Y"], flags["IN_LN"]
    res_mode, out_add_y, out_ln = flags["RES_MODE"], flags["OUT_ADD_Y"], flags["OUT_LN"]
    # carry c = r + y before an output r_n + y: the seq_bn default (residual r_(i-1), input r_(i-1) + y) and
    # parallel levels; not when saving for the backward (see the module docstring)
    carry_y = out_add_y and ((in_add_y and res_mode == 0) or par) and saved is None
    wdt = packed.wd.dtype
    # r (or c) in the widest of h's, y's and the weights' dtypes, as the eager modules' type promotion keeps it
    cdt = torch.promote_types(torch.promote_types(h2.dtype, y2.dtype), wdt)
    # dtypes as the row-block kernel takes them, whatever autocast region the op is called from
    with torch.no_grad(), torch.autocast(h2.device.type, enabled=False):
        # the first active level's input LN(c), made with the carry c = h + y by one launch
        next_x = None
        if carry_y and in_ln and not par and level_adapters and level_adapters[0] >= 0:
            c, next_x = add_layer_norm(h2, y2, ln_weight, ln_bias, eps, cdt)
        else:
            c = h2.to(cdt) + y2 if carry_y else h2.to(cdt)  # r_0 (+ y)
        own_c = c.data_ptr() != h2.data_ptr()  # c is this call's own: the up GEMM may accumulate into it in place
        # the output LN(res + u + y) of the last active level in one launch, where the residual is not carried:
        # its up GEMM writes u alone (as addmm it would first copy res), and no r_n + y is formed
        fold_last = saved is None and out_add_y and out_ln and not carry_y
        last = max((lvl for lvl, a in enumerate(level_adapters) if a >= 0), default=-1)
        folded = None
        for lvl, a in enumerate(level_adapters):
            t = x = None
            if not par and (a >= 0 or (in_ln and saved is not None)):
                stats = saved.stats[lvl] if saved is not None else None
                if next_x is not None:
                    t, x, next_x = c, next_x, None
                elif in_ln and in_add_y and not carry_y:  # t = r + y and LN(t) in one launch (t kept if it is res)
                    t, x = add_layer_norm(c, y2, ln_weight, ln_bias, eps, cdt, write_sum=res_mode == 1, stats=stats)
                else:
                    t = c if (carry_y or not in_add_y) else c + y2
                    x = _layer_norm(t, ln_weight, ln_bias, eps, stats) if in_ln else t
            if a >= 0:
                lo, hi = offsets[a], offsets[a + 1]
                down_w, down_b, up = _level_operands(packed, a, lo, hi, codes[a], scales[a], wdt)
                v = (y2 if par else x).to(wdt)
                if saved is None and codes[a] == ACTIVATIONS["relu"]:  # cuBLASLt: bias and ReLU in the epilogue
                    act = torch._addmm_activation(down_b, v, down_w.t())
                else:
                    z = F.linear(v, down_w, down_b)  # [z, 1, 0...]
                    act = _TORCH_ACTS[codes[a]](z)
                res = c if (par or res_mode == 0) else (t, x)[res_mode - 1]
                if fold_last and lvl == last and res.dtype == wdt:
                    folded = res, act @ up
                elif res.dtype != wdt:
                    c = res + (act @ up).to(res.dtype)
                elif saved is not None and saved.rs.dtype == res.dtype:  # r_i straight into the saved buffer
                    c = torch.addmm(res, act, up, out=saved.rs[lvl])
                elif res is c and own_c:  # (out of place, addmm first copies res into its output: one more pass)
                    c = c.addmm_(act, up)
                else:
                    c = torch.addmm(res, act, up)
                own_c = saved is None
                if saved is not None:
                    saved.zs[lvl][:, lo:hi] = z[:, : hi - lo]
            if saved is not None and c.data_ptr() != saved.rs[lvl].data_ptr():
                saved.rs[lvl].copy_(c)  # (a saving forward carries r itself)
        if out_add_y:
            stats = saved.stats[-1] if saved is not None else None
            if folded is not None:
                out = add_layer_norm(*folded, ln_weight, ln_bias, eps, cdt, write_sum=False, c=y2)[1]
            elif out_ln and not carry_y:  # LN(r_n + y) in one launch
                out = add_layer_norm(c, y2, ln_weight, ln_bias, eps, cdt, write_sum=False, stats=stats)[1]
            else:
                v = c if carry_y else c + y2
                out = _layer_norm(v, ln_weight, ln_bias, eps, stats) if out_ln else v
        else:
            out = c
        inputs = (h2, y2) if saved is None else (h2, y2, saved.rs)  # the output must not alias them (custom op)
        if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.contiguous()  # (M, H) row-major, as the kernel's output and the custom op's fake
    return out


def _stack_fwd_chained(h2, y2, ln_weight, ln_bias, packed: PackedStack, level_adapters, host, out_ln: bool, eps):
    """:func:`stack_fwd_levels` for :func:`chains_levels`: n active levels as n + 1 ``level_boundary`` launches, each
    taking the carry ``c = r + y`` from one level to the next (kernels/level_boundary.py)::

        c = h + y,      a_1 = act(LN(c) [Wd_1; 0]^T + [bd_1; 1; 0])
        c += a_i up_i,  a_(i+1) = act(LN(c) [Wd_(i+1); 0]^T + ...)
        out = LN(c + a_n up_n)       (c + a_n up_n without the output LN: one addmm_)
    """
    offsets, codes, scales = host
    wdt = packed.wd.dtype
    with torch.no_grad(), torch.autocast(h2.device.type, enabled=False):
        active = [a for a in level_adapters if a >= 0]
        if not active:  # the sublayer's own output: LN(h + y)
            return add_layer_norm(h2, y2, ln_weight, ln_bias, eps, wdt, write_sum=False)[1] if out_ln else h2 + y2
        ops = [_level_operands(packed, a, offsets[a], offsets[a + 1], codes[a], scales[a], wdt) for a in active]
        # the launcher (or its twin) itself: chains_levels and the operands' build stand for level_boundary's checks,
        # about 10 us of host time per launch on this project's CPU
        boundary = level_boundary_fwd if use_triton(h2) else level_boundary_reference
        ln = (ln_weight, ln_bias, eps)
        c, act = boundary(h2, *ln, y2, None, None, (*ops[0][:2], codes[active[0]]), True)
        for i in range(1, len(active)):
            act = boundary(c, *ln, None, act, ops[i - 1][2], (*ops[i][:2], codes[active[i]]), True)[1]
        up = ops[-1][2]
        if not out_ln:
            return c.addmm_(act, up)
        return boundary(c, *ln, None, act, up, None, False)[1]


def level_bwd_levels(
    g, dy, rp, y2, z, dz, x_out, wd, wu, ln_weight, ln_bias, stats, pw, pb, adapter: int, host, flags: dict,
    half: torch.dtype, keep_dy: bool = True,
):  # fmt: skip
    """One level of the backward (``bottleneck_bwd._stack_backward``) for one adapter on every row, on cuBLAS: what
    the level kernel does, in the same buffers. ``g`` (in: dL/dr_i, out: dL/dr_(i-1)) and ``dy`` are (M, H) fp32,
    updated in place; ``rp`` = r_(i-1); ``z`` (M, Rt) the saved pre-activations; ``dz`` (M, Rt) receives dL/dz over
    the adapter's units; ``x_out`` (M, H) the level input for the weight gradient, or None; ``pw``/``pb`` row 0
    the model LN's gradient sums over the rows (None when not wanted); ``stats`` (2, M) this level's LN moments;
    ``half`` the GEMM operand dtype; ``keep_dy`` False: ``dy`` is left alone (where it equals ``g``, see
    ``_stack_backward``)::

        dz = s (g Wu) * act'(z),  dx = dz Wd (+ g when the residual is x),  then the input LN and residuals
    """
    par, in_add_y, in_ln, res_mode = flags["PARALLEL"], flags["IN_ADD_Y"], flags["IN_LN"], flags["RES_MODE"]
    offsets, codes, scales = host
    lo, hi = offsets[adapter], offsets[adapter + 1]
    if g.shape[0] == 0:  # no rows: nothing to add (the LN sums stay zero)
        return
    with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
        da = g.to(half) @ wu[:, lo:hi].to(half)  # (M, r)
        dza = da.float() * scales[adapter] * _TORCH_ACT_GRADS[codes[adapter]](z[:, lo:hi])
        dz[:, lo:hi] = dza
        dx = dza.to(half) @ wd[lo:hi].to(half)  # (M, H)
        if par:
            if keep_dy:
                dy.add_(dx)
            x = y2
        else:
            if res_mode == 2:
                dx = dx + g
            if in_add_y and in_ln:
                t = rp.float() + y2.float()
                that = (t - stats[0][:, None]) * stats[1][:, None]
                dw = dx * ln_weight.float()
                hidden = g.shape[1]
                s1 = dw.sum(1, keepdim=True) / hidden
                s2 = (dw * that).sum(1, keepdim=True) / hidden
                dt = stats[1][:, None] * (dw - s1 - that * s2)
                if pw is not None:
                    pw[0] = (dx * that).sum(0)
                    pb[0] = dx.float().sum(0)
                x = that * ln_weight.float() + ln_bias.float() if x_out is not None else None
            else:
                dt = dx
                x = (rp.float() + y2.float() if in_add_y else rp) if x_out is not None else None
            if in_add_y:
                if res_mode == 1:
                    dt = dt + g
                if keep_dy:
                    dy.add_(dt)
            if res_mode == 0:
                g.add_(dt)
            else:
                g.copy_(dt)
        if x_out is not None:
            x_out.copy_(x)
