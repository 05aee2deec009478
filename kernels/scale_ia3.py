"""IA3 merge in place: ``W *= l`` per row or per column (``inverse`` divides), one read and one write of W.

    scale_ia3_:        W (out, in) *= l[:, None] (``dim=0``, one value per output feature) or l[None, :] (``dim=1``)

A pure stream, memory bound like the LoRA merge (kernels/merge.py), whose non-finite check it shares
(``_store_or_flag``: with ``safe``, a first pass only flags a non-finite result and nothing is written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import cdiv, check_float_dtype, check_own_memory, check_same_device, use_triton
from .merge import _store_or_flag

IA3_BLOCK_N, IA3_BLOCK_K, IA3_NUM_WARPS = 32, 128, 4  # a pure stream: the one-adapter merge tile


@triton.jit
def _scale_ia3_kernel(
    w_ptr,  # W: (n_rows, n_cols), updated in place
    vec_ptr,  # (n_rows,) when SCALE_ROWS else (n_cols,)
    bad_ptr,  # (1,) int32 (CHECK_ONLY)
    n_rows,
    n_cols,
    stride_n,
    stride_k,
    stride_v,  # the vector's one stride (any view: reshape(-1) keeps a strided or expanded one)
    SCALE_ROWS: tl.constexpr,
    DIVIDE: tl.constexpr,
    CHECK_ONLY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_k = tl.cdiv(n_cols, BLOCK_K)
    offs_n = (pid // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < n_rows
    mask_k = offs_k < n_cols
    mask = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if SCALE_ROWS:
        v = tl.load(vec_ptr + offs_n * stride_v, mask=mask_n, other=1.0).to(tl.float32)[:, None]
    else:
        v = tl.load(vec_ptr + offs_k * stride_v, mask=mask_k, other=1.0).to(tl.float32)[None, :]
    if DIVIDE:
        out = (w / v).to(w_ptr.dtype.element_ty)
    else:
        out = (w * v).to(w_ptr.dtype.element_ty)
    _store_or_flag(w_ptrs, out, mask, bad_ptr, CHECK_ONLY)


def _validate_ia3(weight, ia3_scale, dim) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not isinstance(ia3_scale, torch.Tensor):
        raise TypeError("weight and ia3_scale must be tensors")
    check_float_dtype("weight", weight)
    check_float_dtype("ia3_scale", ia3_scale)
    check_same_device(weight=weight, ia3_scale=ia3_scale)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    check_own_memory("weight", weight)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (scale rows) or 1 (scale columns), got {dim!r}")
    vec = ia3_scale.reshape(-1)
    if vec.numel() != weight.shape[dim]:
        raise ValueError(
            f"ia3_scale has {vec.numel()} elements (shape {tuple(ia3_scale.shape)}) but weight "
            f"{tuple(weight.shape)} has {weight.shape[dim]} along dim {dim}"
        )
    return vec


@torch.no_grad()
def scale_ia3_reference_(weight, ia3_scale, *, dim, inverse=False, safe=False):
    """Torch twin of :func:`scale_ia3_`."""
    vec = _validate_ia3(weight, ia3_scale, dim)
    v = vec.float().reshape((-1, 1) if dim == 0 else (1, -1))
    out = (weight.float() / v if inverse else weight.float() * v).to(weight.dtype)
    if safe and not torch.isfinite(out).all():
        raise ValueError(f"IA3 scaling would produce non-finite values in weight {tuple(weight.shape)}; unchanged")
    weight.copy_(out)
    return weight


@torch.no_grad()
def scale_ia3_(
    weight: torch.Tensor, ia3_scale: torch.Tensor, *, dim: int, inverse: bool = False, safe: bool = False
) -> torch.Tensor:
    """IA3 merge in place: multiply the rows (``dim=0``, one value per output feature) or the columns (``dim=1``,
    one value per input feature) of ``weight`` (out, in) by ``ia3_scale``; ``inverse`` divides (unmerge).
    One rounding per element; ``safe`` raises ``ValueError`` and writes nothing if a result is not finite."""
    vec = _validate_ia3(weight, ia3_scale, dim)
    if not use_triton(weight):
        return scale_ia3_reference_(weight, ia3_scale, dim=dim, inverse=inverse, safe=safe)
    if weight.numel() == 0:
        return weight
    grid = (cdiv(weight.shape[0], IA3_BLOCK_N) * cdiv(weight.shape[1], IA3_BLOCK_K),)

    def run(check_only: bool) -> torch.Tensor:
        bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
        _scale_ia3_kernel[grid](
            weight,
            vec,
            bad,
            weight.shape[0],
            weight.shape[1],
            weight.stride(0),
            weight.stride(1),
            vec.stride(0),
            SCALE_ROWS=dim == 0,
            DIVIDE=inverse,
            CHECK_ONLY=check_only,
            BLOCK_N=IA3_BLOCK_N,
            BLOCK_K=IA3_BLOCK_K,
            num_warps=IA3_NUM_WARPS,
        )
        return bad

    if safe and run(check_only=True).item():
        raise ValueError(f"IA3 scaling would produce non-finite values in weight {tuple(weight.shape)}; unchanged")
    run(check_only=False)
    return weight
