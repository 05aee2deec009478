"""In-place weight merging: fold LoRA adapters into base weights with one read and one write (IA3's scaling:
kernels/scale_ia3.py).

    merge_lora_:       W += sum_i s_i * B_i @ A_i        W (out, in), A_i (r_i, in), B_i (out, r_i)
    merge_lora_many_:  the same for many weights (a whole model) in a single launch
    unmerge_lora_:     W -= sum_i s_i * B_i @ A_i

Physical limit: merging is memory bound. The floor is reading and writing every weight once (2 x W bytes at
copy bandwidth); the factors (r x (in + out) elements per weight) are small and stay in L2.

One program owns a column strip of one weight: ROW_TILES tiles of (BLOCK_N, BLOCK_K). It gathers the weight's
adapters onto one rank axis in registers (A_cat columns (R, BLOCK_K), loaded once for all its row tiles; rank
rows are located through a pointer table, so no concatenated copy is ever built), then per row tile loads W, the
matching rows of B_cat, adds one dot over every adapter's ranks (fp32 accumulation) and stores W once. Four
adapters cost one pass over W, like one. Every element is rounded once (PEFT builds ``B @ A`` in the weight dtype
per adapter and rounds twice).

A whole model is one launch per weight shape (three for a Llama layer stack): program (column strip, row group,
g) merges part of weight g, whose address and adapters sit in a small pointer table. The shape and strides stay
kernel arguments, so Triton specialises them and vectorises the loads of W; host-checked alignment hints do the
same for the table addresses (tests/test_codegen.py checks the PTX). On an H100 the Python launch path of a
per-weight launch (~80 us) costs more than the GPU time of a 4096 x 4096 bf16 merge (23 us), which is why
``merge_lora_many_`` batches weights (bench/results/2026-11-26-h100-merge-v1/NOTES.md).

Precision of the low-rank products, on the GPU: when all adapters of a weight share one scale (the usual case),
fp16/bf16 factors go to ``tl.dot`` as they are (products exact in fp32, fp32 accumulation) and the scale
multiplies the fp32 sum. With different scales, the per-rank scale is folded into A in fp32 and split into a
bf16 "hi", "mid" and "lo" part (three dots, 24 significant bits, exact products). fp32 factors,
and fp16 factors with different scales (a scaled fp16 half could overflow), use IEEE fp32 dots. The interpreter
gets fp32 operands and IEEE dots (its bf16 arithmetic is wrong, see NOTES.md).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._backend import (
    INTERPRET,
    cdiv,
    check_float_dtype,
    check_own_memory,
    check_same_device,
    next_pow2,
    use_triton,
)

# ----------------------------------------------------------------------------------------------------- tuning
# Tiles (BLOCK_N, BLOCK_K, ROW_TILES, num_warps, W_STAGES) by the width of a launch's rank axis, from the sweep of
# bench/tune_merge.py on an H100 (bf16, Llama-shaped 4 layers, r=16; bench/results/2026-11-27-h100-session7, after
# the 16-byte B_cat loads found in the sm_90 build): one adapter: 32 x 128 x 1 reached 94.6% of the bandwidth floor
# (98.9% in bench_merge's prepared plan), 64 x 128 x 4 74.9%; four (R=64): 64 x 128 x 4 with W_STAGES=3 reached
# 90.6%, against 82.4% with 0, 84.2% with 2, 89.3% with 8 warps and 64.4% for 32 x 128 x 1 (bench_merge: 85.0%
# with 0). W_STAGES software-pipelines the whole row-tile loop: with 2 or 3 the W tiles of the next row tiles are
# cp.async copies in flight during this tile's dot and store; 0 or 1 leaves the loop to the kernel's num_stages,
# which pipelines only the dot operand (B_cat). The grouped kernel cannot be autotuned by re-running it: it updates
# weights behind pointer tables in place. ``TILE_OVERRIDE`` (a tuple like these) is for sweeps.
SMALL_RANK_TILES, LARGE_RANK_TILES, TILE_OVERRIDE = (32, 128, 1, 4, 0), (64, 128, 4, 4, 3), None

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_FP32_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _store_or_flag(w_ptrs, out, mask, bad_ptr, CHECK_ONLY: tl.constexpr):
    """Write the rounded tile, or (``CHECK_ONLY``, safe mode's first pass) only raise the flag at ``bad_ptr`` if a
    value of it is NaN or infinite."""
    if CHECK_ONLY:
        value = out.to(tl.float32)
        finite = (value == value) & (tl.abs(value) < float("inf"))
        n_bad = tl.sum(tl.sum(tl.where(mask & (~finite), 1, 0), axis=1), axis=0)
        if n_bad > 0:
            tl.store(bad_ptr, 1)
    else:
        tl.store(w_ptrs, out, mask=mask)


@triton.jit
def _w_tile_ptrs(w_ptr, offs_n, offs_k, stride_n, stride_k, BLOCK_K: tl.constexpr, W_ALIGNED: tl.constexpr):
    """Pointers of the (BLOCK_N, BLOCK_K) tile of W at rows ``offs_n``, columns ``offs_k``."""
    if W_ALIGNED:  # unit stride along k and 16-byte aligned rows (checked on the host): vectorised loads
        w_ptrs = w_ptr + offs_n[:, None] * stride_n + offs_k[None, :]
        return tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, BLOCK_K])
    return w_ptr + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k


@triton.jit
def _merge_lora_kernel(
    # pointers
    table,  # int64, three sections (one host-to-device copy per launch):
    #   weights  (n_weights,) at 0: address of each weight; all share the sizes and strides below
    #   adapters (n_weights, MAX_ADAPTERS, 7) at adapter_offset: a_ptr, b_ptr, rank, stride_ar, stride_ak,
    #            stride_bn, stride_br (rank 0 pads weights with fewer adapters)
    #   scales   (n_weights, MAX_ADAPTERS) at scale_offset: fp32 bit patterns
    bad_ptr,  # (1,) int32, set to 1 when a merged value is not finite (CHECK_ONLY)
    # sizes: one launch per weight shape, so these are plain arguments that Triton specialises (stride 1,
    # divisibility by 16); had they come from the table, the loads of W could not be vectorised (measured on an
    # H100: 15x slower, bench/results/2026-11-26-h100-session1/NOTES.md)
    n_rows,
    n_cols,
    adapter_offset,
    scale_offset,
    sign,  # +1.0 merges, -1.0 unmerges
    # strides of every weight in the launch: W (n_rows, n_cols)
    stride_n,
    stride_k,
    # compile-time switches
    W_DTYPE: tl.constexpr,  # element type of every weight in the launch
    F_DTYPE: tl.constexpr,  # element type of every factor in the launch
    F_BYTES: tl.constexpr,  # its size in bytes
    W_ALIGNED: tl.constexpr,  # host-checked: unit stride along k, 16-byte aligned rows of every weight
    F_ALIGNED: tl.constexpr,  # host-checked: unit inner strides, 16-byte aligned rows, ranks % (16 // F_BYTES) == 0
    UNIFORM_SCALE: tl.constexpr,  # every adapter of a weight has the same scale: applied after the dot
    CHECK_ONLY: tl.constexpr,  # compute, flag non-finite results, write nothing
    DOT_FP32: tl.constexpr,  # fp32 dot operands (interpreter, fp32 factors)
    DOT_PRECISION: tl.constexpr,  # input_precision of fp32 dots
    MAX_ADAPTERS: tl.constexpr,  # adapters per weight (rank-0 rows pad the shorter lists)
    BLOCK_R: tl.constexpr,  # power of two >= the largest sum of ranks of a weight
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_TILES: tl.constexpr,  # row tiles per program, sharing one load of the A columns
    W_STAGES: tl.constexpr,  # pipelining depth of the row-tile loop for every load (None: the kernel's num_stages,
    # which pipelines the dot operand B_cat only; see LARGE_RANK_TILES)
):
    col_tile = tl.program_id(0)
    row_group = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)  # which weight of the launch
    w_ptr = tl.load(table + g).to(tl.pointer_type(W_DTYPE))
    offs_k = col_tile.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_cols

    # Gather this weight's adapters onto one rank axis (in registers: no concatenated copy is ever made). Rank
    # row r of A_cat / column r of B_cat lives at an element offset from the first adapter's factor.
    offs_r = tl.arange(0, BLOCK_R)
    meta0 = table + adapter_offset + g * MAX_ADAPTERS * 7
    a0 = tl.load(meta0)
    b0 = tl.load(meta0 + 1)
    a_row = tl.zeros((BLOCK_R,), dtype=tl.int64)
    a_kstride = tl.zeros((BLOCK_R,), dtype=tl.int64)
    b_col = tl.zeros((BLOCK_R,), dtype=tl.int64)
    b_nstride = tl.zeros((BLOCK_R,), dtype=tl.int64)
    r_scale = tl.zeros((BLOCK_R,), dtype=tl.float32)
    start = tl.zeros((), dtype=tl.int64)
    for j in tl.static_range(MAX_ADAPTERS):  # unrolled: every table load is issued at once
        meta = meta0 + j * 7
        rank = tl.load(meta + 2)
        scale = tl.load(table + scale_offset + g * MAX_ADAPTERS + j).to(tl.int32).to(tl.float32, bitcast=True)
        mine = (offs_r >= start) & (offs_r < start + rank)
        local = offs_r - start
        a_row = tl.where(mine, (tl.load(meta) - a0) // F_BYTES + local * tl.load(meta + 3), a_row)
        a_kstride = tl.where(mine, tl.load(meta + 4), a_kstride)
        b_col = tl.where(mine, (tl.load(meta + 1) - b0) // F_BYTES + local * tl.load(meta + 6), b_col)
        b_nstride = tl.where(mine, tl.load(meta + 5), b_nstride)
        r_scale = tl.where(mine, sign * scale, r_scale)
        start += rank
    if F_ALIGNED:  # every rank is a multiple of a 16-byte vector: mask_r is constant over such runs, which lets the
        # rows of B_cat load as 16-byte vectors (without the hint: one 2-byte load per element, 4x the W loads at R=64)
        start = tl.multiple_of(start, 16 // F_BYTES)
    mask_r = offs_r < start
    a_base = a0.to(tl.pointer_type(F_DTYPE))
    b_base = b0.to(tl.pointer_type(F_DTYPE))

    # The A_cat columns of this program's k range, loaded once for all its row tiles.
    if F_ALIGNED:  # unit k stride, rows 16-byte aligned: vectorised loads
        a_ptrs = a_base + a_row[:, None] + offs_k[None, :]
        a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [1, BLOCK_K])
    else:
        a_ptrs = a_base + a_row[:, None] + offs_k[None, :] * a_kstride[:, None]
    a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    if UNIFORM_SCALE:  # one scale per weight: exact products, fp32 sum, one multiply
        weight_scale = tl.max(tl.where(mask_r, r_scale, -float("inf")), axis=0)
        if DOT_FP32:
            a_dot = a.to(tl.float32)
        else:
            a_dot = a
        a_mid = a_dot  # unused
        a_lo = a_dot  # unused
    else:  # per-rank scales folded into A in fp32; 16-bit dots take it as three 16-bit parts (24 bits, exact
        # products in fp32): a two-part split (16 bits) failed the CUDA property test where terms cancel
        weight_scale = 1.0
        a_scaled = a.to(tl.float32) * r_scale[:, None]
        if DOT_FP32:
            a_dot = a_scaled
            a_mid = a_scaled  # unused
            a_lo = a_scaled  # unused
        else:
            a_dot = a_scaled.to(F_DTYPE)
            rest = a_scaled - a_dot.to(tl.float32)  # exact in fp32
            a_mid = rest.to(F_DTYPE)
            a_lo = (rest - a_mid.to(tl.float32)).to(F_DTYPE)

    first_row = row_group.to(tl.int64) * ROW_TILES * BLOCK_N
    for t in tl.range(ROW_TILES, num_stages=W_STAGES):  # rows differ per tile: loads ahead never see a store
        offs_n = first_row + t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        mask = mask_n[:, None] & mask_k[None, :]
        w_ptrs = _w_tile_ptrs(w_ptr, offs_n, offs_k, stride_n, stride_k, BLOCK_K, W_ALIGNED)
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        b_ptrs = b_base + offs_n[:, None] * b_nstride[None, :] + b_col[None, :]
        if F_ALIGNED:  # each row of B_cat: runs of 16 bytes (every rank a multiple of 16 // F_BYTES), aligned
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [1, 16 // F_BYTES])
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if DOT_FP32:
            delta = tl.dot(b.to(tl.float32), a_dot, input_precision=DOT_PRECISION)
        else:
            delta = tl.dot(b, a_dot)
            if not UNIFORM_SCALE:
                delta += tl.dot(b, a_mid)
                delta += tl.dot(b, a_lo)
        out = (w + weight_scale * delta).to(W_DTYPE)  # the single rounding
        _store_or_flag(w_ptrs, out, mask, bad_ptr, CHECK_ONLY)


# ----------------------------------------------------------------------------------------------------- validation
def _as_list(value, name: str) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    raise TypeError(f"{name} must be a tensor/number or a sequence of them, got {type(value).__name__}")


def _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out: bool, where: str = ""):
    """Check one weight's arguments; return (a_list, b_list, scales) with the factors in W's own layout.

    With ``fan_in_fan_out`` W is stored (in, out) and ``W += s * A^T @ B^T``: the roles of A and B swap, so
    the returned "A" is B^T and "B" is A^T, and the kernel streams W in its own memory order.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}weight must be a torch.Tensor, got {type(weight).__name__}")
    check_float_dtype(f"{where}weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{where}weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    check_own_memory(f"{where}weight", weight)
    a_list, b_list, scales = _as_list(lora_A, "lora_A"), _as_list(lora_B, "lora_B"), _as_list(scale, "scale")
    if not (len(a_list) == len(b_list) == len(scales)) or not a_list:
        raise ValueError(
            f"{where}lora_A, lora_B and scale must have the same non-zero length, got {len(a_list)}, "
            f"{len(b_list)}, {len(scales)}"
        )
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    for i, (a, b, s) in enumerate(zip(a_list, b_list, scales)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(f"{where}adapter {i}: lora_A and lora_B must be tensors")
        check_float_dtype(f"{where}lora_A[{i}]", a)
        check_float_dtype(f"{where}lora_B[{i}]", b)
        if a.device != weight.device or b.device != weight.device:
            check_same_device(weight=weight, lora_A=a, lora_B=b)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{where}adapter {i}: expected lora_A (r, {in_f}) and lora_B ({out_f}, r) for weight "
                f"{tuple(weight.shape)}{' (fan_in_fan_out)' if fan_in_fan_out else ''}, got lora_A "
                f"{tuple(a.shape)} and lora_B {tuple(b.shape)}"
            )
        if a.shape[0] == 0:
            raise ValueError(f"{where}adapter {i}: rank must be at least 1, got lora_A {tuple(a.shape)}")
        if isinstance(s, torch.Tensor) and s.dim() == 0 and not s.is_complex():  # as lora_linear takes it
            s = scales[i] = s.item()
        if not isinstance(s, (int, float)) or not math.isfinite(float(s)) or abs(s) > _FP32_MAX:
            raise ValueError(
                f"{where}adapter {i}: scale must be a finite number (or 0-d tensor) within fp32 range, got {s!r}"
            )
    if fan_in_fan_out:
        a_list, b_list = [b.t() for b in b_list], [a.t() for a in a_list]
    return a_list, b_list, [float(s) for s in scales]


# ----------------------------------------------------------------------------------------------------- launchers
class LoraMergePlan:
    """Validated weights and adapters with their pointer tables already on the device, ready to be merged.

    Building the plan costs host time (validation, tables: a few microseconds per weight); ``merge_`` and
    ``unmerge_`` then cost one launch per weight shape. Keep a plan to switch an adapter in and out by merging.
    The plan holds references to every tensor it points to; it is stale if a weight or factor tensor is
    replaced (in-place updates of their values are fine).
    """

    def __init__(self, jobs: list):
        groups: dict[tuple, list] = {}
        # A weight whose factors mix dtypes merges fp32 copies of its 16-bit factors: (copy, factor) pairs, copied
        # again before every merge (made once here, the plan missed the factors' later in-place updates).
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for weight, a_list, b_list, scales in jobs:
            factor_dtype = a_list[0].dtype
            if any(t.dtype != factor_dtype for t in a_list + b_list):  # mixed: compute in fp32
                a_list, b_list, factor_dtype = self._fp32(a_list), self._fp32(b_list), torch.float32
            if weight.numel():
                key = (weight.dtype, factor_dtype, weight.device, tuple(weight.shape), weight.stride())
                groups.setdefault(key, []).append((weight, a_list, b_list, scales))
        self.weights = [job[0] for job in jobs]
        self._launches = [_pack(group, *key) for key, group in groups.items()]

    def _fp32(self, factors: list) -> list:
        copies = [t if t.dtype == torch.float32 else t.detach().float() for t in factors]
        self._copies += [(c, t) for c, t in zip(copies, factors, strict=True) if c is not t]
        return copies

    def merge_(self, safe: bool = False) -> None:
        """Add the adapters to the weights; with ``safe``, check everything first and write nothing on failure."""
        self._apply(1.0, safe)

    def unmerge_(self, safe: bool = False) -> None:
        """Subtract the adapters from the weights (the inverse of :meth:`merge_`)."""
        self._apply(-1.0, safe)

    def _apply(self, sign: float, safe: bool) -> None:
        with torch.no_grad():
            for copy, factor in self._copies:
                copy.copy_(factor)
        if safe and not self._finite(sign):
            shapes = ", ".join(str(tuple(w.shape)) for w in self.weights[:4])
            raise ValueError(
                f"merge would produce non-finite values (weights {shapes}{', ...' if len(self.weights) > 4 else ''}"
                "); every weight was left unchanged"
            )
        for launch in self._launches:
            with _on_device(launch["device"]):
                _run(launch, sign, check_only=False)

    def _finite(self, sign: float) -> bool:
        """Whether every merged value would be finite, writing nothing: the launches of a device raise one shared
        flag there (one device-to-host sync per device). The flag used to live on the first launch's device only,
        and the launches ran on the current device, so a model spread over two GPUs read another GPU's memory."""
        flags: dict[torch.device, torch.Tensor] = {}
        for launch in self._launches:
            device = launch["device"]
            if device not in flags:
                flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
            with _on_device(device):
                _run(launch, sign, check_only=True, bad=flags[device])
        return not any(flag.item() for flag in flags.values())


def _on_device(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device, whatever its arguments' device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _float_bits(value: float) -> int:
    """The fp32 bit pattern of ``value`` as an int (for the int64 table; struct: no tensor per scale)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _pack(jobs, weight_dtype, factor_dtype, device, shape, strides) -> dict:
    """Build the single int64 table of one launch (weights of one shape and layout; see ``_merge_lora_kernel``)."""
    max_adapters = max(len(job[1]) for job in jobs)
    weight_rows, adapter_rows, scale_rows, max_rank = [], [], [], 1
    padding = [0, 0, 0, 0, 0, 0, 0]  # rank 0: contributes no rank rows
    f_bytes = factor_dtype.itemsize
    vec = 16 // f_bytes  # elements per 16-byte vector
    w_aligned = strides[1] == 1 and strides[0] % 16 == 0
    f_aligned, uniform = True, True
    for weight, a_list, b_list, scales in jobs:
        weight_rows.append(weight.data_ptr())
        w_aligned = w_aligned and weight.data_ptr() % 16 == 0
        uniform = uniform and all(s == scales[0] for s in scales)
        for a, b in zip(a_list, b_list):
            adapter_rows += [a.data_ptr(), b.data_ptr(), a.shape[0], *a.stride(), *b.stride()]
            f_aligned = f_aligned and a.stride(1) == 1 and b.stride(1) == 1 and a.shape[0] % vec == 0
            f_aligned = f_aligned and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
            f_aligned = f_aligned and a.stride(0) % 16 == 0 and b.stride(0) % vec == 0
        max_rank = max(max_rank, sum(a.shape[0] for a in a_list))
        adapter_rows += padding * (max_adapters - len(a_list))
        scale_rows += [_float_bits(s) for s in scales] + [0] * (max_adapters - len(scales))
    pin = device.type == "cuda"  # pinned + non_blocking: the copy does not stall the host
    table = torch.tensor(weight_rows + adapter_rows + scale_rows, dtype=torch.int64, pin_memory=pin)
    return {
        "table": table.to(device, non_blocking=True),
        "jobs": jobs,  # keeps every tensor behind the pointers alive
        "n_weights": len(jobs),
        "max_adapters": max_adapters,
        "adapter_offset": len(weight_rows),
        "scale_offset": len(weight_rows) + len(adapter_rows),
        "shape": shape,
        "strides": strides,
        "w_aligned": w_aligned,
        "f_aligned": f_aligned,
        "uniform": uniform,
        "f_bytes": f_bytes,
        "max_rank": max_rank,
        "weight_dtype": weight_dtype,
        "factor_dtype": factor_dtype,
        "device": device,
    }


def _fp32_dots(launch: dict) -> bool:
    """fp32 dot operands: in the interpreter (its bf16 arithmetic is wrong), for fp32 factors, and for fp16
    factors with per-adapter scales (a scaled fp16 part could overflow). Otherwise 16-bit tensor-core dots."""
    if INTERPRET or launch["factor_dtype"] == torch.float32:
        return True
    return launch["factor_dtype"] == torch.float16 and not launch["uniform"]


def _run(launch: dict, sign: float, check_only: bool, bad: torch.Tensor | None = None) -> None:
    """One launch; with ``check_only`` it writes nothing but sets ``bad`` (int32, (1,)) if a value is not finite."""
    bad = bad if check_only else launch["table"]  # never written when not checking
    (n_rows, n_cols), (stride_n, stride_k) = launch["shape"], launch["strides"]
    block_r = max(16, next_pow2(launch["max_rank"]))
    tiles = TILE_OVERRIDE or (SMALL_RANK_TILES if block_r <= 16 else LARGE_RANK_TILES)
    block_n, block_k, row_tiles, num_warps, w_stages = tiles
    block_k = max(16, min(block_k, 8192 // block_r))  # the A_cat tile stays at most 64 x 128 elements
    grid = (cdiv(n_cols, block_k), cdiv(n_rows, block_n * row_tiles), launch["n_weights"])
    _merge_lora_kernel[grid](
        launch["table"],
        bad,
        n_rows,
        n_cols,
        launch["adapter_offset"],
        launch["scale_offset"],
        sign,
        stride_n,
        stride_k,
        W_DTYPE=_TL_DTYPE[launch["weight_dtype"]],
        F_DTYPE=_TL_DTYPE[launch["factor_dtype"]],
        F_BYTES=launch["f_bytes"],
        W_ALIGNED=launch["w_aligned"],
        F_ALIGNED=launch["f_aligned"],
        UNIFORM_SCALE=launch["uniform"],
        CHECK_ONLY=check_only,
        DOT_FP32=_fp32_dots(launch),
        DOT_PRECISION="ieee",  # tf32x3 drops the lo*lo products (~2^-22 relative): above the fp32 rounding bound
        MAX_ADAPTERS=launch["max_adapters"],
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ROW_TILES=row_tiles,
        W_STAGES=int(w_stages) if (row_tiles > 1 and w_stages > 1) else None,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------------------- references
@torch.no_grad()
def merge_lora_reference_(weight, lora_A, lora_B, scale, *, fan_in_fan_out=False, safe=False):
    """Torch twin of :func:`merge_lora_`: fp32 delta, one rounding (builds the full delta: reference only)."""
    a_list, b_list, scales = _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    merged = weight.float()
    for a, b, s in zip(a_list, b_list, scales):
        merged = merged + (b.float() @ a.float()) * s
    out = merged.to(weight.dtype)
    if safe and not torch.isfinite(out).all():
        raise ValueError(
            f"merge would produce non-finite values (weights {tuple(weight.shape)}); every weight was left unchanged"
        )
    weight.copy_(out)
    return weight


@torch.no_grad()
def merge_lora_many_reference_(weights, lora_A, lora_B, scale, *, fan_in_fan_out=False, safe=False):
    """Torch twin of :func:`merge_lora_many_`."""
    jobs = _validate_many(weights, lora_A, lora_B, scale, fan_in_fan_out)
    results = _merged_reference(jobs)
    if safe and not all(torch.isfinite(r).all() for r in results):
        raise ValueError("merge would produce non-finite values; every weight was left unchanged")
    for (weight, *_), result in zip(jobs, results):
        weight.copy_(result)
    return list(weights)


def _merged_reference(jobs: list) -> list[torch.Tensor]:
    """The merged value of each job's weight (computed in fp32, rounded once), nothing written."""
    results = []
    for weight, a_list, b_list, scales in jobs:
        merged = weight.float()
        for a, b, s in zip(a_list, b_list, scales):
            merged = merged + (b.float() @ a.float()) * s
        results.append(merged.to(weight.dtype))
    return results


# ----------------------------------------------------------------------------------------------------- public API
Factors = torch.Tensor | Sequence[torch.Tensor]
Scales = float | Sequence[float]


@torch.no_grad()
def merge_lora_(
    weight: torch.Tensor,
    lora_A: Factors,
    lora_B: Factors,
    scale: Scales,
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
    a_list, b_list, scales = _validate_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    if not use_triton(weight):
        return merge_lora_reference_(weight, lora_A, lora_B, scale, fan_in_fan_out=fan_in_fan_out, safe=safe)
    LoraMergePlan([(weight, a_list, b_list, scales)]).merge_(safe)
    return weight


@torch.no_grad()
def unmerge_lora_(
    weight: torch.Tensor,
    lora_A: Factors,
    lora_B: Factors,
    scale: Scales,
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`merge_lora_`: ``weight -= sum_i scale_i * lora_B_i @ lora_A_i``. Each direction rounds
    once, so the weight comes back within one ulp of the merged value plus one of the original."""
    return merge_lora_(weight, lora_A, lora_B, _negate(scale), fan_in_fan_out=fan_in_fan_out, safe=safe)


def _negate(scale):
    values = _as_list(scale, "scale")
    if not all(isinstance(s, (int, float)) or (isinstance(s, torch.Tensor) and s.dim() == 0) for s in values):
        raise ValueError(f"scale must be a number (or 0-d tensor) or a sequence of them, got {scale!r}")
    return [-s for s in values]  # (a 0-d tensor stays one: _validate_lora reads it)


def _validate_many(weights, lora_A, lora_B, scale, fan_in_fan_out):
    n = len(weights)
    per_weight = [lora_A, lora_B, scale] + ([fan_in_fan_out] if not isinstance(fan_in_fan_out, bool) else [])
    if any(not isinstance(arg, Sequence) or len(arg) != n for arg in per_weight):
        lengths = [len(arg) if isinstance(arg, Sequence) else type(arg).__name__ for arg in per_weight]
        raise ValueError(f"merge_lora_many_ needs one entry per weight ({n} weights), got lengths {lengths}")
    fifo = [fan_in_fan_out] * n if isinstance(fan_in_fan_out, bool) else list(fan_in_fan_out)
    jobs = []
    for i in range(n):
        a_list, b_list, scales = _validate_lora(weights[i], lora_A[i], lora_B[i], scale[i], fifo[i], f"weights[{i}]: ")
        jobs.append((weights[i], a_list, b_list, scales))
    _check_disjoint(weights)
    return jobs


def _check_disjoint(weights) -> None:
    """Weights listed twice, or views that overlap in one storage, would each be merged from the original values
    (the twin keeps the last merge only) or raced on (the kernel): refuse them before anything is written. Byte
    spans [first, last element], sorted: any overlap shows between neighbours. (Interleaved views of one storage,
    such as ``W[:, ::2]`` and ``W[:, 1::2]``, count as overlapping: merge them as one weight.)"""
    spans = []
    for i, w in enumerate(weights):
        if w.numel():
            start = w.data_ptr()
            last = sum((n - 1) * s for n, s in zip(w.shape, w.stride(), strict=True))
            spans.append((w.get_device(), start, start + (last + 1) * w.element_size(), i))
    spans.sort()
    for (dev0, _, end0, i), (dev1, start1, _, j) in zip(spans, spans[1:]):
        if dev0 == dev1 and start1 < end0:
            raise ValueError(
                f"weights[{min(i, j)}] and weights[{max(i, j)}] share memory (the same weight listed twice, or "
                f"overlapping views of one tensor): list each weight once, with all of its adapters"
            )


@torch.no_grad()
def merge_lora_many_(
    weights: Sequence[torch.Tensor],
    lora_A: Sequence[Factors],
    lora_B: Sequence[Factors],
    scale: Sequence[Scales],
    *,
    fan_in_fan_out: bool | Sequence[bool] = False,
    safe: bool = False,
) -> list[torch.Tensor]:
    """:func:`merge_lora_` for many weights at once (a whole model): one launch per weight shape.

    ``lora_A[i]``, ``lora_B[i]`` and ``scale[i]`` describe the adapters of ``weights[i]`` exactly as the
    arguments of :func:`merge_lora_` do. With ``safe``, every weight is checked before any is written, so a
    failure anywhere leaves all of them unchanged.
    """
    jobs = _validate_many(weights, lora_A, lora_B, scale, fan_in_fan_out)
    kernel_jobs = [job for job in jobs if use_triton(job[0])]
    if not kernel_jobs:
        return merge_lora_many_reference_(weights, lora_A, lora_B, scale, fan_in_fan_out=fan_in_fan_out, safe=safe)
    if len(kernel_jobs) == len(jobs):
        LoraMergePlan(jobs).merge_(safe)
        return list(weights)
    # weights on a GPU and on the CPU (a model with offloaded layers): the kernel merges the ones, the twin the
    # others, both checked before either writes (the first weight's device used to choose for all: a CPU weight went
    # to the GPU kernel, failing part way through the model)
    plan, twin_jobs = LoraMergePlan(kernel_jobs), [job for job in jobs if not use_triton(job[0])]
    results = _merged_reference(twin_jobs)
    if safe and not (plan._finite(1.0) and all(torch.isfinite(r).all() for r in results)):
        raise ValueError("merge would produce non-finite values; every weight was left unchanged")
    plan.merge_()
    for (weight, *_), result in zip(twin_jobs, results):
        weight.copy_(result)
    return list(weights)


def prepare_lora_merge(
    weights: Sequence[torch.Tensor],
    lora_A: Sequence[Factors],
    lora_B: Sequence[Factors],
    scale: Sequence[Scales],
    *,
    fan_in_fan_out: bool | Sequence[bool] = False,
) -> LoraMergePlan:
    """Validate once and build a :class:`LoraMergePlan` (arguments as in :func:`merge_lora_many_`); its
    ``merge_()`` / ``unmerge_()`` then cost only the launch. Triton devices only (CUDA, or CPU when interpreting)."""
    jobs = _validate_many(weights, lora_A, lora_B, scale, fan_in_fan_out)
    if jobs and not use_triton(jobs[0][0]):
        raise ValueError(f"prepare_lora_merge needs CUDA tensors (or TRITON_INTERPRET=1), got {jobs[0][0].device}")
    return LoraMergePlan(jobs)


@torch.no_grad()
def unmerge_lora_many_(
    weights: Sequence[torch.Tensor],
    lora_A: Sequence[Factors],
    lora_B: Sequence[Factors],
    scale: Sequence[Scales],
    *,
    fan_in_fan_out: bool | Sequence[bool] = False,
    safe: bool = False,
) -> list[torch.Tensor]:
    """Inverse of :func:`merge_lora_many_`."""
    negated = [_negate(s) for s in scale] if isinstance(scale, Sequence) else scale
    return merge_lora_many_(weights, lora_A, lora_B, negated, fan_in_fan_out=fan_in_fan_out, safe=safe)
