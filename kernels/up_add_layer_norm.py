"""``c += act @ up`` in place, then ``x = LayerNorm(c)``: a stack level's up projection, residual and the next
LayerNorm in one launch.

Where it runs: the level-by-level cuBLAS path of a bottleneck stack (``bottleneck_gemm.stack_fwd_levels``) for the
seq_bn default of a post-LN sublayer while serving. Each level adds its up projection to the carry ``c = r + y``
(``c.addmm_(act, up)``: read c, write c) and the next level (or the stack's output) starts with ``LN(c)`` (read c,
write x): two launches and four passes over the (tokens, hidden) activation. Fused: one launch, three passes (read
c, write c and x); ``act`` (tokens, rank) and ``up`` (rank, hidden) are small. Offered to the stack tuner as its
own candidate (``bottleneck_fwd.LEVELS_FUSED``), so a GPU on which it is slower keeps the two launches.

Numerics, as ``addmm_`` and then ``layer_norm_with_stats``: ``act @ up + c`` accumulated in fp32 and rounded to c's
dtype once (stored as the new c); mean and variance in fp32 of that rounded row (two passes over registers); the LN
weight and bias rounded to c's dtype; one rounding of x.

One program owns ``ROWS`` whole rows (a ``(ROWS, BLOCK_H)`` accumulator, ``BLOCK_H`` the next power of two of the
hidden size, at most ``MAX_HIDDEN``) and walks the rank in ``BLOCK_K`` steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import cdiv, check_float_dtype, check_same_device, dot_in_fp32, next_pow2, use_triton
from .add_layer_norm import layer_norm_with_stats, normalise_rows, row_block

__all__ = ["up_add_layer_norm", "up_add_layer_norm_reference", "MAX_HIDDEN"]

MAX_HIDDEN = 1024  # the (16, BLOCK_H) fp32 accumulator in registers: 64 values per thread at 8 warps


@triton.jit
def _up_add_layer_norm_kernel(
    act_ptr,  # (M, K)
    up_ptr,  # (K, H)
    c_ptr,  # (M, H): read, then overwritten with c + act @ up
    w_ptr,  # LN weight: (H,)
    bias_ptr,  # LN bias: (H,)
    out_ptr,  # x = LN(c + act @ up): (M, H) contiguous
    M,
    H,
    K,
    eps,
    stride_am, stride_ak, stride_uk, stride_uh, stride_cm, stride_ch,
    DOT_FP32: tl.constexpr,  # the interpreter: fp32 dot operands (its half-precision dots are wrong)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no silent TF32), else ignored
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, mask = row_block(M, H, ROWS, BLOCK_H)
    acc = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
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
    c_offs = rows[:, None] * stride_cm + cols[None, :] * stride_ch
    c = tl.load(c_ptr + c_offs, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    s = (acc + c.to(tl.float32)).to(dtype)  # rounded once, as addmm_ stores it
    tl.store(c_ptr + c_offs, s, mask=mask)
    x = normalise_rows(s.to(tl.float32), mask, cols, cmask, H, eps, w_ptr, bias_ptr, dtype)[0]
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], x.to(dtype), mask=mask)


def up_add_layer_norm_fwd(act, up, c, weight, bias, eps: float) -> torch.Tensor:
    """The launcher (arguments checked by :func:`up_add_layer_norm`)."""
    m, hidden = c.shape
    out = torch.empty((m, hidden), device=c.device, dtype=c.dtype)
    if m == 0:
        return out
    block_h = next_pow2(max(hidden, 16))
    _up_add_layer_norm_kernel[(cdiv(m, 16),)](
        act, up, c, weight, bias, out, m, hidden, act.shape[1], float(eps),
        act.stride(0), act.stride(1), up.stride(0), up.stride(1), c.stride(0), c.stride(1),
        DOT_FP32=dot_in_fp32(c), INPUT_PRECISION="ieee" if c.dtype == torch.float32 or dot_in_fp32(c) else "tf32",
        ROWS=16, BLOCK_H=block_h, BLOCK_K=16, num_warps=4 if block_h <= 256 else 8,
    )  # fmt: skip
    return out


def up_add_layer_norm_reference(act, up, c, weight, bias, eps: float) -> torch.Tensor:
    """The torch twin: ``c`` updated in place with ``act @ up + c`` (fp32 accumulation, one rounding), then
    :func:`layer_norm_with_stats` of it."""
    c.copy_((c.float() + act.float() @ up.float()).to(c.dtype))
    return layer_norm_with_stats(c, weight, bias, eps, None)


def up_add_layer_norm(
    act: torch.Tensor, up: torch.Tensor, c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(c)`` after ``c += act @ up`` in place: act (M, K), up (K, H), c (M, H), all of one float dtype,
    any strides; weight, bias: (H,). Returns x (M, H) contiguous in c's dtype. No autograd (inference only). Triton on
    CUDA tensors and under the interpreter, the torch twin otherwise and for rows wider than ``MAX_HIDDEN``."""
    for name, t in (("act", act), ("up", up), ("c", c)):
        check_float_dtype(name, t)
    check_same_device(act=act, up=up, c=c, weight=weight, bias=bias)
    if act.dtype != c.dtype or up.dtype != c.dtype:
        raise TypeError(f"up_add_layer_norm needs one dtype, got act {act.dtype}, up {up.dtype}, c {c.dtype}")
    if act.dim() != 2 or up.dim() != 2 or c.dim() != 2 or act.shape[1] != up.shape[0] or (
        (act.shape[0], up.shape[1]) != tuple(c.shape)
    ):  # fmt: skip
        raise ValueError(
            f"up_add_layer_norm needs act (M, K), up (K, H) and c (M, H), got {tuple(act.shape)}, "
            f"{tuple(up.shape)} and {tuple(c.shape)}"
        )
    hidden = c.shape[1]
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(
            f"up_add_layer_norm: LayerNorm weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
            f"({hidden},)"
        )
    fwd = up_add_layer_norm_fwd if use_triton(c) and hidden <= MAX_HIDDEN else up_add_layer_norm_reference
    return fwd(act, up, c, weight, bias, eps)
