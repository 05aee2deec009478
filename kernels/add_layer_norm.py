"""``x = LayerNorm(a + b [+ c])`` in one pass over the rows, optionally also writing the sum ``s``.

Where it runs: the level-by-level cuBLAS path of a bottleneck stack (``bottleneck_gemm.stack_fwd_levels``). A
post-LN sublayer with a seq_bn stack starts with ``c = h + y`` and the first level's input ``LN(c)``; a saving
forward ends with ``LN(r_n + y)``, Houlsby placement (and the other orders whose residual is not carried) with
``LN(res + u + y)``, the last level's residual, up projection and the sublayer input. As torch ops those are two
or three launches and five to eight passes over the (tokens, hidden) activation (each add reads two and writes one,
the LN reads one and writes one; Houlsby's residual as addmm's C operand is first copied); fused, one launch and
one pass per operand (read a, b and c, write s and x). The physical limit is those passes at copy bandwidth:
``bench/bench_bottleneck.py::bench_add_layer_norm`` reports the kernel against it and against the torch ops.

Numerics: the sum is formed in fp32 and rounded to ``dtype`` once (for two operands exactly what torch's add
stores; three are rounded once where torch would round twice) and normalised from that rounded value; the LN
weight and bias are rounded to ``dtype`` (as :func:`layer_norm_with_stats` casts them); mean and variance in fp32
from the whole row held in registers (two passes over registers, no Welford); one rounding of the output.
``stats`` (2, M) receives the fp32 mean and 1 / sqrt(var + eps), the moments the stack's backward reads.

One program normalises ``ROWS`` whole rows (a ``(ROWS, BLOCK_H)`` tile, ``BLOCK_H`` the next power of two of the
hidden size): a row is read once from memory, and rows wider than ``MAX_HIDDEN`` take the torch twin.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import (
    FLOAT_DTYPES,
    DirectLaunch,
    cdiv,
    check_float_dtype,
    check_same_device,
    launch_by_signature,
    next_pow2,
    use_triton,
)

__all__ = ["add_layer_norm", "add_layer_norm_reference", "layer_norm_with_stats", "MAX_HIDDEN"]

MAX_HIDDEN = 16384  # the whole row in one program's registers (64 fp32 values per thread at 16 warps)


@triton.jit
def row_block(M, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's ``ROWS`` rows (int64) and ``BLOCK_H`` columns, their masks and the tile's mask. Shared with
    kernels/level_boundary.py."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < M
    cmask = cols < H
    return rows, cols, rmask, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def normalise_rows(v, mask, cols, cmask, H, eps, w_ptr, bias_ptr, stride_w, stride_bias, dtype: tl.constexpr):
    """The LayerNorm of the fp32 rows ``v`` (ROWS, BLOCK_H) over their ``H`` valid columns (``mask``): (x in fp32,
    mean, rstd), moments by two passes over the registers, the LN weight and bias (any strides: a view, or 0 for an
    expanded one) rounded to ``dtype`` first (as :func:`layer_norm_with_stats` casts them). Shared with
    kernels/level_boundary.py."""
    mean = tl.sum(v, 1) / H
    centred = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
    w = tl.load(w_ptr + cols * stride_w, mask=cmask, other=0.0).to(dtype).to(tl.float32)
    bias = tl.load(bias_ptr + cols * stride_bias, mask=cmask, other=0.0).to(dtype).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + bias[None, :], mean, rstd


@triton.jit
def _add_layer_norm_fwd_kernel(
    # pointers
    a_ptr,  # a: (M, H)
    b_ptr,  # b: (M, H)
    c_ptr,  # c: (M, H), read when HAS_C
    w_ptr,  # LN weight: (H,)
    bias_ptr,  # LN bias: (H,)
    sum_ptr,  # s = a + b (+ c): (M, H) contiguous, in out's dtype (written when WRITE_SUM)
    out_ptr,  # x = LN(s): (M, H) contiguous
    stats_ptr,  # (2, M) contiguous fp32: mean, rstd (written when SAVE_STATS)
    # sizes
    M,
    H,
    eps,
    # strides
    stride_am, stride_ah, stride_bm, stride_bh, stride_cm, stride_ch, stride_w, stride_bias,
    # compile-time switches
    HAS_C: tl.constexpr,
    WRITE_SUM: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, mask = row_block(M, H, ROWS, BLOCK_H)
    a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_ah, mask=mask, other=0.0)
    b = tl.load(b_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bh, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    s = a.to(tl.float32) + b.to(tl.float32)
    if HAS_C:
        c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_ch, mask=mask, other=0.0)
        s += c.to(tl.float32)
    s = s.to(dtype)  # rounded once (as torch's add of two operands stores it)
    offs = rows[:, None] * H + cols[None, :]
    if WRITE_SUM:
        tl.store(sum_ptr + offs, s, mask=mask)
    x, mean, rstd = normalise_rows(
        s.to(tl.float32), mask, cols, cmask, H, eps, w_ptr, bias_ptr, stride_w, stride_bias, dtype
    )
    tl.store(out_ptr + offs, x.to(dtype), mask=mask)
    if SAVE_STATS:
        tl.store(stats_ptr + rows, mean, mask=rmask)
        tl.store(stats_ptr + M + rows, rstd, mask=rmask)


def _tile(hidden: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_H, num_warps): about 4096 values per program, 8 to 64 per thread."""
    block_h = next_pow2(max(hidden, 16))
    rows = max(1, min(16, 4096 // block_h))
    return rows, block_h, min(16, max(4, block_h // 512))


_RECORDED: dict[tuple, DirectLaunch] = {}  # (device, constexprs, launch_signature of the arguments) -> its launch


def add_layer_norm_fwd(a, b, weight, bias, eps: float, dtype: torch.dtype, write_sum: bool, stats, c=None):
    """The launcher, on 2-D ``a``, ``b`` (and ``c``) (M, H) of any strides (checked by :func:`add_layer_norm`)."""
    m, hidden = a.shape
    out = torch.empty((m, hidden), device=a.device, dtype=dtype)
    s = torch.empty((m, hidden), device=a.device, dtype=dtype) if write_sum else None
    if m == 0:
        return s, out
    rows, block_h, warps = _tile(hidden)
    c_t = c if c is not None else a  # (never read without HAS_C)
    args = (
        a, b, c_t, weight, bias, s if write_sum else out, out, stats if stats is not None else out,
        m, hidden, float(eps),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_t.stride(0), c_t.stride(1), weight.stride(0),
        bias.stride(0),
    )  # fmt: skip
    kwargs = dict(HAS_C=c is not None, WRITE_SUM=write_sum, SAVE_STATS=stats is not None, ROWS=rows, BLOCK_H=block_h,
                  num_warps=warps)  # fmt: skip
    launch_by_signature(_RECORDED, (a.device, *kwargs.values()), _add_layer_norm_fwd_kernel, (cdiv(m, rows),), kwargs,
                        args, 8)  # fmt: skip
    return s, out


def layer_norm_with_stats(v: torch.Tensor, weight, bias, eps: float, stats: torch.Tensor | None) -> torch.Tensor:
    """``F.layer_norm`` of v with the LN weight and bias cast to v's dtype; with ``stats`` (2, M), also its fp32 mean
    and 1 / sqrt(var + eps) there (the stack backward's moments)."""
    weight, bias = weight.to(v.dtype), bias.to(v.dtype)  # (a bf16 model LN on an fp32 carry)
    if stats is None:
        return F.layer_norm(v, v.shape[-1:], weight, bias, eps)
    out, mean, rstd = torch.native_layer_norm(v, v.shape[-1:], weight, bias, eps)
    if mean.dtype != torch.float32:  # moments kept in a half dtype (CPU): recompute them in fp32
        var, mean = torch.var_mean(v.float(), dim=-1, correction=0)
        rstd = torch.rsqrt(var + eps)
    stats[0].copy_(mean.reshape(-1))
    stats[1].copy_(rstd.reshape(-1))
    return out


def add_layer_norm_reference(a, b, weight, bias, eps: float, dtype: torch.dtype, write_sum: bool, stats, c=None):
    """The torch twin of :func:`add_layer_norm_fwd`: the sum in fp32 rounded once, then
    :func:`layer_norm_with_stats`."""
    s = a.float() + b.float()
    s = (s if c is None else s + c.float()).to(dtype)
    return (s if write_sum else None), layer_norm_with_stats(s, weight, bias, eps, stats)


def add_layer_norm(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dtype: torch.dtype | None = None,
    write_sum: bool = True,
    stats: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(s, LayerNorm(s))`` with ``s = a + b (+ c)`` in ``dtype`` (default: the operands' promoted dtype), summed in
    fp32 and rounded once; ``s`` is None unless ``write_sum``.

    a, b (and c): (M, H) with the same shape, any strides; weight, bias: (H,); stats: None or a contiguous fp32 (2, M)
    tensor that receives the rows' mean and 1 / sqrt(var + eps). No autograd: inference and the stack's own
    backward (which reads ``stats``) only. Triton on CUDA tensors and under the interpreter, the torch twin
    otherwise and for rows wider than ``MAX_HIDDEN``."""
    operands = (a, b) if c is None else (a, b, c)
    for name, t in zip("abc", operands):
        check_float_dtype(name, t)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):  # (both required: see the docstring)
        raise TypeError(
            f"add_layer_norm needs the LayerNorm weight and bias as tensors, got {type(weight).__name__} and "
            f"{type(bias).__name__}"
        )
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"add_layer_norm: dtype must be float32, float16 or bfloat16 (or None), got {dtype}")
    check_same_device(a=a, b=b, c=c, weight=weight, bias=bias, stats=stats)
    if a.dim() != 2 or any(t.shape != a.shape for t in operands):
        shapes = " and ".join(str(tuple(t.shape)) for t in operands)
        raise ValueError(f"add_layer_norm needs 2-D tensors of one shape, got {shapes}")
    hidden = a.shape[1]
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(
            f"add_layer_norm: LayerNorm weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be ({hidden},)"
        )
    dtype = dtype or functools.reduce(torch.promote_types, (t.dtype for t in operands))
    if stats is not None and (
        stats.shape != (2, a.shape[0]) or stats.dtype != torch.float32 or not stats.is_contiguous()
    ):
        raise ValueError(f"add_layer_norm: stats must be a contiguous fp32 (2, {a.shape[0]}) tensor, got "
                         f"{tuple(stats.shape)} {stats.dtype}")  # fmt: skip
    fwd = add_layer_norm_fwd if use_triton(a) and hidden <= MAX_HIDDEN else add_layer_norm_reference
    return fwd(a, b, weight, bias, eps, dtype, write_sum, stats, c)
