"""In-place weight merging: fold LoRA (and IA3) adapters into a base weight with one read and one write.

    merge_lora_:   W += sum_i s_i * B_i @ A_i          W (out, in), A_i (r_i, in), B_i (out, r_i)
    unmerge_lora_: W -= sum_i s_i * B_i @ A_i
    scale_ia3_:    W *= l  (per row or per column; ``inverse`` divides)

Physical limit: merging is memory bound. The floor is reading and writing W once (2 x W bytes at copy
bandwidth); the factors (r x (in + out) elements) are small and stay in L2. One program owns one
(BLOCK_N, BLOCK_K) tile of W: it loads the tile, adds the low-rank product of the matching rows of B and columns
of A (all adapters, accumulated in fp32), and stores the tile once. No full-size delta is ever materialised,
whatever the number of adapters, and every element is rounded once (PEFT builds ``B @ A`` in the weight dtype
per adapter and rounds twice).

Precision of the low-rank product on the GPU:
- one adapter with fp16/bf16 factors: ``tl.dot`` on native operands (products exact in fp32, fp32
  accumulation), the scale applied to the fp32 result;
- several adapters: each rank column of B is multiplied by its adapter's scale in fp32 and split into a
  high and a low half-precision part, so two native dots give ~16 (bf16) / ~22 (fp16) significant bits;
- fp32 factors: ``tf32x3`` dots (about fp32 accuracy on tensor cores).
The interpreter gets fp32 operands and ``ieee`` dots (its bf16 arithmetic is wrong, see NOTES.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._backend import INTERPRET, check_float_dtype, check_same_device, use_triton

# --------------------------------------------------------------------------------------------------- tuning
# Each program handles one tile of W and no K loop, so num_stages does not matter; the tile must be large
# enough to stream at full bandwidth and small enough to keep enough programs in flight.


def _merge_configs() -> list[triton.Config]:
    if INTERPRET:  # one large tile: interpreter cost grows with the number of programs
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in [(32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (128, 256, 8)]
    ]


# --------------------------------------------------------------------------------------------------- kernel
@triton.autotune(configs=_merge_configs(), key=["n_rows", "n_cols", "rank", "MODE"], restore_value=["w_ptr"])
@triton.jit
def _merge_fwd_kernel(
    # pointers
    w_ptr,  # W: (n_rows, n_cols), updated in place
    a_ptr,  # A: (rank, n_cols)   all adapters' A stacked along the rank axis
    b_ptr,  # B: (n_rows, rank)   all adapters' B stacked along the rank axis
    rank_scale_ptr,  # (rank,) fp32 scale of each rank column (PER_RANK_SCALE only)
    vec_ptr,  # IA3 scale: (n_rows,) when SCALE_ROWS, (n_cols,) when SCALE_COLS
    bad_ptr,  # (1,) int32 flag set to 1 when a merged value is not finite (CHECK_ONLY)
    # sizes
    n_rows,
    n_cols,
    rank,
    scale,  # fp32 scalar scale of the single adapter (not PER_RANK_SCALE)
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    # compile-time switches
    MODE: tl.constexpr,  # 0: LoRA add, 1: IA3 scale rows, 2: IA3 scale columns
    PER_RANK_SCALE: tl.constexpr,  # several adapters: scale per rank column, split-precision dots
    DIVIDE: tl.constexpr,  # IA3 inverse
    CHECK_ONLY: tl.constexpr,  # compute, flag non-finite results, write nothing
    DOT_FP32: tl.constexpr,  # give tl.dot fp32 operands (interpreter, fp32 factors)
    DOT_PRECISION: tl.constexpr,  # input_precision for fp32 dots
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_k = tl.cdiv(n_cols, BLOCK_K)
    # Row-major tile order: neighbouring programs stream neighbouring memory and share the B rows.
    offs_n = (pid // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_n = offs_n < n_rows
    mask_k = offs_k < n_cols
    mask = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)

    if MODE == 0:
        delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            if PER_RANK_SCALE:
                s = tl.load(rank_scale_ptr + offs_r, mask=mask_r, other=0.0)
                b_scaled = b.to(tl.float32) * s[None, :]
                if DOT_FP32:
                    delta += tl.dot(b_scaled, a.to(tl.float32), input_precision=DOT_PRECISION)
                else:  # hi + lo split: two native dots recover ~2x the mantissa bits of the scaled factor
                    b_hi = b_scaled.to(a.dtype)
                    b_lo = (b_scaled - b_hi.to(tl.float32)).to(a.dtype)
                    delta += tl.dot(b_hi, a)
                    delta += tl.dot(b_lo, a)
            else:
                if DOT_FP32:
                    delta += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision=DOT_PRECISION)
                else:
                    delta += tl.dot(b, a)
        if PER_RANK_SCALE:
            merged = w + delta
        else:
            merged = w + scale * delta
    elif MODE == 1:
        v = tl.load(vec_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)[:, None]
        if DIVIDE:
            merged = w / v
        else:
            merged = w * v
    else:
        v = tl.load(vec_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)[None, :]
        if DIVIDE:
            merged = w / v
        else:
            merged = w * v

    out = merged.to(w_ptr.dtype.element_ty)  # the single rounding
    if CHECK_ONLY:
        finite = (out.to(tl.float32) == out.to(tl.float32)) & (tl.abs(out.to(tl.float32)) < float("inf"))
        n_bad = tl.sum(tl.sum(tl.where(mask & (~finite), 1, 0), axis=1), axis=0)
        if n_bad > 0:
            tl.store(bad_ptr, 1)
    else:
        tl.store(w_ptrs, out, mask=mask)


# --------------------------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class _LoraFactors:
    """The adapters of one merge call, stacked along the rank axis (views when there is one adapter)."""

    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (out, R)
    scale: float  # used when there is one adapter
    rank_scale: torch.Tensor | None  # (R,) fp32 when there are several


def _as_list(value, name: str) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    raise TypeError(f"{name} must be a tensor/number or a sequence of them, got {type(value).__name__}")


def _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out: bool):
    """Check the user's arguments and return (a_list, b_list, scales), with W viewed as (out, in)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    check_float_dtype("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    a_list, b_list, scales = _as_list(lora_A, "lora_A"), _as_list(lora_B, "lora_B"), _as_list(scale, "scale")
    if not (len(a_list) == len(b_list) == len(scales)) or not a_list:
        raise ValueError(
            f"lora_A, lora_B and scale must have the same non-zero length, got {len(a_list)}, {len(b_list)}, "
            f"{len(scales)}"
        )
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    for i, (a, b, s) in enumerate(zip(a_list, b_list, scales)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(f"adapter {i}: lora_A and lora_B must be tensors")
        check_float_dtype(f"lora_A[{i}]", a)
        check_float_dtype(f"lora_B[{i}]", b)
        check_same_device(weight=weight, lora_A=a, lora_B=b)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter {i}: expected lora_A (r, {in_f}) and lora_B ({out_f}, r) for weight "
                f"{tuple(weight.shape)}{' (fan_in_fan_out)' if fan_in_fan_out else ''}, got lora_A "
                f"{tuple(a.shape)} and lora_B {tuple(b.shape)}"
            )
        if a.shape[0] == 0:
            raise ValueError(f"adapter {i}: rank must be at least 1, got lora_A {tuple(a.shape)}")
        if not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise ValueError(f"adapter {i}: scale must be a finite number, got {s!r}")
    return a_list, b_list, [float(s) for s in scales]


def _stack_factors(a_list, b_list, scales, fan_in_fan_out: bool) -> _LoraFactors:
    dtype = a_list[0].dtype
    if any(t.dtype != dtype for t in a_list + b_list):  # mixed factor dtypes: compute in the widest one
        dtype = torch.float32
    if fan_in_fan_out:  # W is (in, out): W += s * A^T @ B^T, i.e. the roles of A and B swap
        a_list, b_list = [b.t() for b in b_list], [a.t() for a in a_list]
    if len(a_list) == 1:
        return _LoraFactors(a_list[0].to(dtype), b_list[0].to(dtype), scales[0], None)
    a = torch.cat([t.to(dtype) for t in a_list], dim=0)
    b = torch.cat([t.to(dtype) for t in b_list], dim=1)
    device = a.device  # torch.full on the device: no host-to-device copy, so no stream synchronisation
    rank_scale = torch.cat(
        [torch.full((t.shape[0],), s, dtype=torch.float32, device=device) for t, s in zip(a_list, scales)]
    )
    return _LoraFactors(a, b, 1.0, rank_scale)


def _launch(w, a, b, rank_scale, vec, scale, rank, mode, divide, check_only) -> bool:
    """Run the kernel over W (a 2-D view with any strides); return True if a value was not finite."""
    dot_fp32 = INTERPRET or a is None or a.dtype == torch.float32
    bad = torch.zeros(1, dtype=torch.int32, device=w.device) if check_only else w
    dummy = w
    block_r = min(64, max(16, triton.next_power_of_2(max(rank, 1))))
    grid = lambda meta: (triton.cdiv(w.shape[0], meta["BLOCK_N"]) * triton.cdiv(w.shape[1], meta["BLOCK_K"]),)
    _merge_fwd_kernel[grid](
        w,
        a if a is not None else dummy,
        b if b is not None else dummy,
        rank_scale if rank_scale is not None else dummy,
        vec if vec is not None else dummy,
        bad,
        w.shape[0],
        w.shape[1],
        rank,
        scale,
        w.stride(0),
        w.stride(1),
        a.stride(0) if a is not None else 0,
        a.stride(1) if a is not None else 0,
        b.stride(0) if b is not None else 0,
        b.stride(1) if b is not None else 0,
        MODE=mode,
        PER_RANK_SCALE=rank_scale is not None,
        DIVIDE=divide,
        CHECK_ONLY=check_only,
        DOT_FP32=dot_fp32,
        DOT_PRECISION="ieee" if INTERPRET else "tf32x3",
        BLOCK_R=block_r,
    )
    return bool(bad.item()) if check_only else False


def _lora_fwd(weight, factors: _LoraFactors, safe: bool) -> None:
    # With fan_in_fan_out the factors were already swapped, so W is used in its own (coalesced) layout.
    args = (weight, factors.a, factors.b, factors.rank_scale, None, factors.scale, factors.a.shape[0], 0, False)
    if safe and _launch(*args, check_only=True):
        raise ValueError(
            f"merge would produce non-finite values in weight {tuple(weight.shape)} ({weight.dtype}); "
            "the weight was left unchanged"
        )
    _launch(*args, check_only=False)


# --------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def merge_lora_reference_(weight, lora_A, lora_B, scale, *, fan_in_fan_out=False, safe=False):
    """Torch twin of :func:`merge_lora_`: fp32 delta, one rounding (builds the full delta: reference only)."""
    a_list, b_list, scales = _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    merged = weight.float()
    for a, b, s in zip(a_list, b_list, scales):
        delta = (b.float() @ a.float()) * s
        merged = merged + (delta.t() if fan_in_fan_out else delta)
    out = merged.to(weight.dtype)
    if safe and not torch.isfinite(out).all():
        raise ValueError(
            f"merge would produce non-finite values in weight {tuple(weight.shape)} ({weight.dtype}); "
            "the weight was left unchanged"
        )
    weight.copy_(out)
    return weight


@torch.no_grad()
def scale_ia3_reference_(weight, ia3_scale, *, dim, inverse=False, safe=False):
    """Torch twin of :func:`scale_ia3_`."""
    vec = _validate_ia3(weight, ia3_scale, dim)
    shape = (-1, 1) if dim == 0 else (1, -1)
    v = vec.float().reshape(shape)
    out = (weight.float() / v if inverse else weight.float() * v).to(weight.dtype)
    if safe and not torch.isfinite(out).all():
        raise ValueError(f"IA3 scaling would produce non-finite values in weight {tuple(weight.shape)}; unchanged")
    weight.copy_(out)
    return weight


# --------------------------------------------------------------------------------------------------- public API
def merge_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> torch.Tensor:
    """Fold LoRA adapters into ``weight`` in place: ``weight += sum_i scale_i * lora_B_i @ lora_A_i``.

    Args:
        weight: (out, in) base weight, fp32/fp16/bf16; (in, out) with ``fan_in_fan_out`` (GPT-2 Conv1D).
        lora_A: (r, in) or a sequence of (r_i, in), one per adapter; ranks may differ.
        lora_B: (out, r) or a sequence of (out, r_i).
        scale: ``lora_alpha / r`` per adapter (a number or a sequence).
        safe: check first (one extra read of W) and raise ``ValueError`` without writing anything if a merged
            value would be NaN or infinite.

    The result is computed in fp32 and rounded once to ``weight.dtype``; W is read and written once whatever
    the number of adapters. Returns ``weight``.
    """
    return _merge_lora(weight, lora_A, lora_B, scale, fan_in_fan_out, safe, sign=1.0)


def unmerge_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`merge_lora_`: ``weight -= sum_i scale_i * lora_B_i @ lora_A_i`` (within 1 ulp of the
    weight before the merge: each direction rounds once)."""
    return _merge_lora(weight, lora_A, lora_B, scale, fan_in_fan_out, safe, sign=-1.0)


@torch.no_grad()
def _merge_lora(weight, lora_A, lora_B, scale, fan_in_fan_out: bool, safe: bool, sign: float) -> torch.Tensor:
    a_list, b_list, scales = _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    scales = [sign * s for s in scales]
    if not use_triton(weight):
        return merge_lora_reference_(weight, a_list, b_list, scales, fan_in_fan_out=fan_in_fan_out, safe=safe)
    if weight.numel() == 0:
        return weight
    _lora_fwd(weight, _stack_factors(a_list, b_list, scales, fan_in_fan_out), safe)
    return weight


def _validate_ia3(weight, ia3_scale, dim) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not isinstance(ia3_scale, torch.Tensor):
        raise TypeError("weight and ia3_scale must be tensors")
    check_float_dtype("weight", weight)
    check_float_dtype("ia3_scale", ia3_scale)
    check_same_device(weight=weight, ia3_scale=ia3_scale)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
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
    args = (weight, None, None, None, vec, 1.0, 0, 1 if dim == 0 else 2, inverse)
    if safe and _launch(*args, check_only=True):
        raise ValueError(f"IA3 scaling would produce non-finite values in weight {tuple(weight.shape)}; unchanged")
    _launch(*args, check_only=False)
    return weight
