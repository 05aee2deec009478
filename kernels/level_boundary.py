"""What happens between two levels of a bottleneck stack, in one launch: the carry's update, the model's LayerNorm,
and the next level's down projection and activation.

Where it runs: the level-by-level cuBLAS path of a bottleneck stack (``bottleneck_gemm.stack_fwd_levels``) for the
seq_bn default of a post-LN sublayer while serving (AdapterHub's order: each level's input is ``LN(c)`` of the carry
``c = r + y``, and its output is added to the carry). Level by level, a stack of n adapters is n + 1 launches::

    c = h + y;       a_1 = act(LN(c) Wd_1^T + bd_1)          start  (y given)
    c += a_i up_i;   a_(i+1) = act(LN(c) Wd_(i+1)^T + ...)   between levels i and i + 1  (act, up given)
    out = LN(c + a_n up_n)                                   end  (no down projection; c need not be stored)

(``a``, ``up`` and the down weight are ``bottleneck_gemm._level_operands``: the adapter's scale and up bias ride in
them). As torch ops each boundary is a LayerNorm, an ``addmm_`` and the down GEMM: two launches more per level and
five passes over the (tokens, hidden) activation (read c, write c; read c, write x; read x) where this makes two (read
c, write c) or, at the start, three (read h and y, write c). The rank-wide tensors ``a`` (tokens, rank) and the
weights are small. Offered to the stack tuner as its own candidate (``bottleneck_dispatch.LEVELS_FUSED``), so a GPU on
which it is slower keeps the torch ops.

Numerics, as the torch ops store them: ``c (+ y) (+ a @ up)`` accumulated in fp32 and rounded to c's dtype once (the
new c); mean and variance in fp32 of that rounded row (two passes over registers); the LN weight and bias rounded to
c's dtype; x = LN(c) rounded once; then ``x Wd^T`` accumulated in fp32 on the tensor cores, plus the down bias, the
activation in fp32 and one rounding (where torch would round z before the activation too).

One program owns ``ROWS`` whole rows: a ``(ROWS, BLOCK_H)`` fp32 accumulator (``BLOCK_H`` the next power of two of
the hidden size, at most ``MAX_HIDDEN``) walks the rank in ``BLOCK_K`` steps. The down projection needs x in
``CHUNK``-column slices, which registers cannot give: the program stores the new c, waits at a barrier for its own
stores, and reads them back slice by slice (from the L1/L2 it just wrote) to normalise and multiply them. So the
down projection needs the new c stored. Every program also streams the up and down weights from L2 (2 W H elements:
172 KB at BERT-base's rank 48, against its 48 KB of rows), so at 4096 rows the launch moves about 44 MB through L2
for 13-19 MB through HBM. The physical limit is the HBM passes at copy bandwidth:
``bench/bench_bottleneck.py::bench_level_boundary`` reports each boundary against it and against the torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import (
    DirectLaunch,
    cdiv,
    check_float_dtype,
    check_own_memory,
    check_same_device,
    dot_in_fp32,
    launch_by_signature,
    next_pow2,
    use_triton,
)
from .add_layer_norm import layer_norm_with_stats, normalise_rows, row_block
from .bottleneck_pack import _TORCH_ACTS, _activation

__all__ = ["level_boundary", "level_boundary_reference", "MAX_HIDDEN", "MAX_DOWN_WIDTH"]

MAX_HIDDEN = 1024  # the (16, BLOCK_H) fp32 accumulator in registers: 64 values per thread at 8 warps
MAX_DOWN_WIDTH = 512  # the down projection's (16, BLOCK_W) fp32 accumulator and (CHUNK, BLOCK_W) weight slice


@triton.jit
def _level_boundary_kernel(
    c_ptr,  # (M, H): the carry (or the sublayer output h at the start)
    y_ptr,  # (M, H): added when HAS_Y
    act_ptr,  # (M, K): the level's activations, when HAS_UP
    up_ptr,  # (K, H)
    s_ptr,  # (M, H): the new carry s = c (+ y) (+ act @ up), written when WRITE_S (may be c itself: in place)
    w_ptr,  # LN weight: (H,)
    bias_ptr,  # LN bias: (H,)
    out_ptr,  # DOWN: (M, W) contiguous, act(LN(s) @ down_w^T + down_b); else (M, H) contiguous, LN(s)
    dw_ptr,  # down weight (W, H), when DOWN
    db_ptr,  # down bias (W,)
    M,
    H,
    K,
    W,
    eps,
    stride_cm, stride_ch, stride_ym, stride_yh, stride_am, stride_ak, stride_uk, stride_uh, stride_sm, stride_sh,
    stride_dw, stride_dh, stride_w, stride_bias, stride_db,  # (LN weight, LN bias, down bias: any stride, 0 expanded)
    HAS_Y: tl.constexpr,
    HAS_UP: tl.constexpr,
    WRITE_S: tl.constexpr,
    DOWN: tl.constexpr,
    ACT: tl.constexpr,  # the activation's code (bottleneck_pack.ACTIVATIONS)
    DOT_FP32: tl.constexpr,  # the interpreter: fp32 dot operands (its half-precision dots are wrong)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no silent TF32), else ignored
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, mask = row_block(M, H, ROWS, BLOCK_H)
    acc = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    if HAS_UP:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(act_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            u = tl.load(up_ptr + ks[:, None] * stride_uk + cols[None, :] * stride_uh,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            if DOT_FP32:
                a, u = a.to(tl.float32), u.to(tl.float32)
            acc = tl.dot(a, u, acc, input_precision=INPUT_PRECISION)
    c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_ch, mask=mask, other=0.0)
    dtype = c_ptr.dtype.element_ty
    acc += c.to(tl.float32)
    if HAS_Y:
        acc += tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=mask, other=0.0).to(
            tl.float32
        )
    s = acc.to(dtype)  # rounded once, as addmm_ (or torch's add of two operands) stores it
    if WRITE_S:
        tl.store(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sh, s, mask=mask)
    x, mean, rstd = normalise_rows(
        s.to(tl.float32), mask, cols, cmask, H, eps, w_ptr, bias_ptr, stride_w, stride_bias, dtype
    )
    if DOWN:
        # x @ down_w^T over CHUNK-column slices of x, each normalised again from the stored s (the whole-row x above
        # cannot be sliced): the barrier (bar.sync: CTA-scope ordering of the program's memory accesses) makes every
        # thread's stores of s visible to the whole program, whatever L1 held of c before (one SM, one L1; the CUDA
        # tests check the in-place case against fp64). On sm_90 the slices arrive by the K loop's cp.async pipeline.
        tl.debug_barrier()
        units = tl.arange(0, BLOCK_W)
        umask = units < W
        z = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
        for h0 in range(0, H, CHUNK):
            hs = h0 + tl.arange(0, CHUNK)
            hmask = hs < H
            tile = rmask[:, None] & hmask[None, :]
            sc = tl.load(s_ptr + rows[:, None] * stride_sm + hs[None, :] * stride_sh, mask=tile, other=0.0)
            wc = tl.load(w_ptr + hs * stride_w, mask=hmask, other=0.0).to(dtype).to(tl.float32)
            bc = tl.load(bias_ptr + hs * stride_bias, mask=hmask, other=0.0).to(dtype).to(tl.float32)
            xc = (sc.to(tl.float32) - mean[:, None]) * rstd[:, None] * wc[None, :] + bc[None, :]
            xc = tl.where(tile, xc, 0.0).to(dtype)  # rounded as the LayerNorm's output is stored
            d = tl.load(dw_ptr + units[None, :] * stride_dw + hs[:, None] * stride_dh,
                        mask=hmask[:, None] & umask[None, :], other=0.0)  # fmt: skip
            if DOT_FP32:
                xc, d = xc.to(tl.float32), d.to(tl.float32)
            z = tl.dot(xc, d, z, input_precision=INPUT_PRECISION)
        z += tl.load(db_ptr + units * stride_db, mask=umask, other=0.0).to(tl.float32)[None, :]
        a_next = _activation(z, tl.full((1, BLOCK_W), ACT, tl.int32))
        tl.store(out_ptr + rows[:, None] * W + units[None, :], a_next.to(dtype), mask=rmask[:, None] & umask[None, :])
    else:
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], x.to(dtype), mask=mask)


def _tiles(hidden: int, width: int) -> dict:
    """Launch meta-parameters: 16 rows, the rank in 16-wide steps, down-weight slices of about 4096 elements."""
    block_h, block_w = next_pow2(max(hidden, 16)), next_pow2(max(width, 16))
    chunk = max(16, min(block_h, 4096 // block_w))
    return dict(ROWS=16, BLOCK_H=block_h, BLOCK_K=16, BLOCK_W=block_w, CHUNK=chunk,
                num_warps=4 if block_h <= 256 else 8)  # fmt: skip


_RECORDED: dict[tuple, DirectLaunch] = {}  # (device, constexprs, launch_signature of the arguments) -> its launch


def level_boundary_fwd(c, weight, bias, eps: float, y, act, up, down, write_c: bool):
    """The launcher (arguments checked by :func:`level_boundary`); returns ``(s, out)`` as it does."""
    m, hidden = c.shape
    dev, dtype = c.device, c.dtype
    s = c if y is None else torch.empty((m, hidden), device=dev, dtype=dtype)
    width = down[0].shape[0] if down is not None else 0
    out = torch.empty((m, width if down is not None else hidden), device=dev, dtype=dtype)
    if m == 0:
        return (s if write_c else None), out
    dw, db = (down[0], down[1]) if down is not None else (c, c)
    act_t, up_t, y_t = (act if act is not None else c), (up if up is not None else c), (y if y is not None else c)
    fp32_dots = dot_in_fp32(c)
    args = (
        c, y_t, act_t, up_t, s, weight, bias, out, dw, db,
        m, hidden, act_t.shape[1] if act is not None else 0, width, float(eps),
        c.stride(0), c.stride(1), y_t.stride(0), y_t.stride(1), act_t.stride(0), act_t.stride(1),
        up_t.stride(0), up_t.stride(1), s.stride(0), s.stride(1), dw.stride(0), dw.stride(-1), weight.stride(0),
        bias.stride(0), db.stride(-1),
    )  # fmt: skip
    kwargs = dict(
        HAS_Y=y is not None, HAS_UP=act is not None, WRITE_S=write_c, DOWN=down is not None,
        ACT=down[2] if down is not None else 0, DOT_FP32=fp32_dots,
        INPUT_PRECISION="ieee" if dtype == torch.float32 or fp32_dots else "tf32", **_tiles(hidden, width),
    )  # fmt: skip
    launch_by_signature(_RECORDED, (dev, *kwargs.values()), _level_boundary_kernel, (cdiv(m, 16),), kwargs, args, 10)
    return (s if write_c else None), out


def level_boundary_reference(c, weight, bias, eps: float, y, act, up, down, write_c: bool):
    """The torch twin: s = c (+ y) (+ act @ up) in fp32, rounded once (into c itself without y), then
    :func:`layer_norm_with_stats` of it, then the activation of its down projection in fp32, rounded once."""
    total = c.float()
    if y is not None:
        total = total + y.float()
    if act is not None:
        total = total + act.float() @ up.float()
    if y is None:
        s = c.copy_(total.to(c.dtype)) if write_c else total.to(c.dtype)
    else:
        s = total.to(c.dtype)
    x = layer_norm_with_stats(s, weight, bias, eps, None)
    if down is not None:
        down_w, down_b, code = down
        x = _TORCH_ACTS[code](x.float() @ down_w.float().t() + down_b.float()).to(c.dtype)
    return (s if write_c else None), x


def level_boundary(
    c: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    y: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    down: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    write_c: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(s, out)``: the new carry ``s = c (+ y) (+ act @ up)`` and ``out = LayerNorm(s)``, or with ``down = (down_w,
    down_b, code)`` the next level's activations ``act(LayerNorm(s) @ down_w^T + down_b)`` instead.

    c (M, H): the carry, updated in place to s when ``y`` is None (else s is a new tensor and c is left alone);
    y (M, H); act (M, K) with up (K, H); down_w (W, H), down_b (W,), code an activation code
    (``bottleneck_pack.ACTIVATIONS``). Every tensor but the LN weight and bias (H,) shares c's float dtype; any
    strides. ``write_c=False``: s is not stored (None is returned; c is left alone), for the stack's last boundary;
    the down projection reads s back, so it needs s stored. Returns out contiguous in c's dtype.
    No autograd (inference only). Triton on CUDA tensors and under the interpreter, the torch twin otherwise and for
    rows wider than ``MAX_HIDDEN`` or down projections wider than ``MAX_DOWN_WIDTH``."""
    operands = {"c": c, "y": y, "act": act, "up": up}
    if down is not None:
        if len(down) != 3 or down[2] not in _TORCH_ACTS:
            raise ValueError(f"down must be (down_w, down_b, activation code in {sorted(_TORCH_ACTS)}), got {down!r}")
        operands.update(down_w=down[0], down_b=down[1])
    operands = {name: t for name, t in operands.items() if t is not None}
    for name, t in operands.items():
        check_float_dtype(name, t)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
        raise TypeError(
            f"level_boundary needs the LayerNorm weight and bias as tensors, got {type(weight).__name__} and "
            f"{type(bias).__name__}"
        )
    check_same_device(**operands, weight=weight, bias=bias)
    if any(t.dtype != c.dtype for t in operands.values()):
        listing = ", ".join(f"{name} {t.dtype}" for name, t in operands.items())
        raise TypeError(f"level_boundary needs one dtype, got {listing}")
    if c.dim() != 2:
        raise ValueError(f"level_boundary needs c (M, H), got {tuple(c.shape)}")
    if y is None and write_c:  # (c is updated in place)
        check_own_memory("level_boundary's carry c", c)
    m, hidden = c.shape
    if (act is None) != (up is None):
        raise ValueError("level_boundary needs act and up together")
    if y is not None and tuple(y.shape) != (m, hidden):
        raise ValueError(f"level_boundary needs y shaped like c {(m, hidden)}, got {tuple(y.shape)}")
    if act is not None and (
        act.dim() != 2 or up.dim() != 2 or act.shape[0] != m or act.shape[1] != up.shape[0] or up.shape[1] != hidden
    ):
        raise ValueError(
            f"level_boundary needs act (M, K) and up (K, H) for c (M, H), got {tuple(act.shape)}, {tuple(up.shape)} "
            f"and {tuple(c.shape)}"
        )
    if down is not None:
        down_w, down_b = down[0], down[1]
        if down_w.dim() != 2 or down_w.shape[1] != hidden or tuple(down_b.shape) != (down_w.shape[0],):
            raise ValueError(
                f"level_boundary needs down_w (W, {hidden}) and down_b (W,), got {tuple(down_w.shape)} and "
                f"{tuple(down_b.shape)}"
            )
        if not write_c:
            raise ValueError("level_boundary's down projection reads the stored carry: it needs write_c=True")
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(
            f"level_boundary: LayerNorm weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be ({hidden},)"
        )
    fits = hidden <= MAX_HIDDEN and (down is None or down[0].shape[0] <= MAX_DOWN_WIDTH)
    fwd = level_boundary_fwd if use_triton(c) and fits else level_boundary_reference
    return fwd(c, weight, bias, eps, y, act, up, down, write_c)
