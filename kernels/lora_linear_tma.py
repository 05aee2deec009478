"""The fused LoRA linear forward on a Hopper-grade main loop (``lora_linear``'s ``path="persistent"``).

Why: at M >= 256 the op is compute bound, and the tiled kernel of ``lora_linear_tiled.py`` (pointer loads, one program
per output tile) ran 1.20-1.38x slower than cuBLAS on an H100 for the plain matmul alone, so its epilogue fusion
lost to ``"composition"`` (cuBLAS ``F.linear``, then ``y.addmm_(u, B^T)``: one more pass over y). This kernel is
the same math on the main loop Hopper wants:

  * a persistent grid: one program per SM walks output tiles ``NUM_SMS`` apart in grouped order (Triton tutorial
    03's L2-friendly ordering); only the K loop is software-pipelined. Flattening the tile loop into it (so the next
    tile's first loads fly during this tile's epilogue) made ptxas serialize every wgmma of the K loop (C7515: the
    epilogue's non-wgmma writes to the accumulator registers fall inside the flattened pipeline stage) in every
    build without STORE_U, the inference forward included (triton 3.6, sm_90);
  * TMA: x, W (and A_cat when the shrink is fused) arrive through host-built tensor descriptors, whole tiles per
    copy, with out-of-range rows and columns zero-filled (odd M, N and K need no masks);
  * the low-rank term in the epilogue (``lora_epilogue._low_rank_epilogue``): ``u`` (BLOCK_M, R) is either
    accumulated in the main loop from the x tiles already in shared memory (``FUSE_SHRINK``: R / BLOCK_N more MMA
    work, no extra bytes) or read from ``x A_cat^T`` computed beforehand by cuBLAS (one more read of x: about
    240 / N of the GEMM's time on an H100, less for wide N). Either way y is written once, rounded once.

  * for a mixed serving batch (``ROW_ADAPTERS``), each row's own adapter only: u by row from the segmented shrink
    (kernels/lora_segmented.py), and per adapter present in the tile one dot of its rows' u, the others masked to 0,
    with its B columns (``lora_epilogue._row_adapter_epilogue``): the segmented path's work with y written once;
  * at few rows, split-K (``TmaTiles.split_k``): each output tile's K range is cut into work units of the same
    persistent grid, so that 256 rows make enough units to fill the GPU; a tile's last unit to finish adds up the
    fp32 partial tiles in split order (``lora_epilogue._split_k_reduce``, shared with the tiled kernel) and runs
    the epilogue.

Against cuBLAS's plain GEMM the floor is the epilogue's (BLOCK_M, R) x (R, BLOCK_N) dot and the u read: a few per
cent at r = 16. Whether this beats ``"composition"`` on a given GPU and shape is measured, not assumed:
``lora_linear``'s ``"auto"`` times both once per shape above ``fused_max_m`` rows
(``lora_linear_dispatch._large_m_choice``) and keeps the faster. Descriptors need 16-byte aligned rows (K a multiple
of 8 in 16-bit types, unit inner strides): :func:`tma_fits` says when this path may run. fp32 inputs stay on cuBLAS
(no silent TF32 here).

Launches are recorded per geometry (``_RECORDED``, ``_backend.launch_recorded``): on a GPU a repeat calls the compiled
kernel of its first launch directly, skipping Triton's per-call binding of its 44 parameters (4 descriptors, 25 other
runtime arguments, 15 constexprs): host time on every large-M call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._backend import INTERPRET, DirectLaunch, cdiv, dot_in_fp32, launch_recorded, launch_signature, next_pow2
from .lora_epilogue import (
    _grouped_tile,
    _low_rank_epilogue,
    _row_adapter_epilogue,
    _split_k_buffers,
    _split_k_reduce,
)


@triton.jit
def _lora_linear_tma_fwd_kernel(
    # TMA descriptors
    x_desc,  # x: (M, K), block (BLOCK_M, BLOCK_K)
    w_desc,  # W_K_MAJOR: weight (N, K), block (BLOCK_N, BLOCK_K); else its transpose (K, N), block (BLOCK_K, BLOCK_N)
    a_desc,  # A_cat: (R, K), block (BLOCK_R, BLOCK_K); read when FUSE_SHRINK
    y_desc,  # y: (M, N), block (BLOCK_M, BLOCK_N // 2); written when Y_TMA, else y goes out through y_ptr
    # pointers
    b_ptr,  # B_cat: (N, R)
    u_in_ptr,  # x A_cat^T precomputed: (M, R), unscaled; read when not FUSE_SHRINK (ROW_ADAPTERS: (M, BLOCK_R))
    bias_ptr,  # bias: (N,)
    ids_ptr,  # adapter id per row: (M,) int32
    rank_adapter_ptr,  # (R,) int32: adapter index of each rank column
    rank_scale_ptr,  # (R,) fp32: scale of each rank column
    rank_off_ptr,  # (n + 1,) int32: adapter a owns rank columns rank_off[a] .. rank_off[a + 1]; read when ROW_ADAPTERS
    y_ptr,  # y: (M, N) output
    u_out_ptr,  # u * C rounded to the input dtype: (M, R) output, written when STORE_U
    ws_ptr,  # SPLIT_K > 1: fp32 partial sums per (tile, split) slot (lora_epilogue._split_k_reduce)
    count_ptr,  # SPLIT_K > 1: (tiles,) int32 zeros: splits done per output tile (its last one resets it to 0)
    # sizes
    M,
    N,
    K,
    R,
    n_adapters,  # read when ROW_ADAPTERS
    # strides
    stride_bn,
    stride_br,
    stride_uim,
    stride_uir,
    stride_ym,
    stride_yn,
    stride_uom,
    stride_uor,
    stride_bias,  # bias: (N,), any stride (0: an expanded bias)
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    W_K_MAJOR: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STORE_U: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter: bf16 arithmetic is wrong there, give tl.dot fp32 operands
    Y_TMA: tl.constexpr,  # y's rows are 16-byte aligned: store the tile by TMA from shared memory
    SPLIT_K: tl.constexpr,  # work units per output tile, each over a slice of K (1: the whole K loop in one)
    ROW_ADAPTERS: tl.constexpr,  # u_in holds each row's own adapter's term, scaled and rounded: lora_epilogue's
    # _row_adapter_epilogue (a mixed batch; needs HAS_IDS, not FUSE_SHRINK, not STORE_U)
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.maximum(tl.cdiv(K, BLOCK_K), 1)
    num_tiles = num_pid_m * num_pid_n
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    # flatten=True: serialized wgmma, see above. A tile's splits are consecutive units, so they run side by side.
    for unit in tl.range(start, num_tiles * SPLIT_K, NUM_SMS, flatten=False):
        tile_id = unit // SPLIT_K
        split = unit % SPLIT_K
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_lo = split * per_split
        k_hi = tl.minimum(k_lo + per_split, k_tiles)
        # At least one step: a split without K steps (the last ones, at small K) runs one past K, where the
        # descriptors zero-fill the whole box (a loop that may run zero times had ptxas serialize the wgmma of the
        # tiled kernel's, see lora_linear_tiled.py)
        for ki in range(k_lo, tl.maximum(k_hi, k_lo + 1)):
            off_k = ki * BLOCK_K
            xt = x_desc.load([off_m, off_k])
            if W_K_MAJOR:
                wt = w_desc.load([off_n, off_k]).T
            else:
                wt = w_desc.load([off_k, off_n])
            if DOT_FP32:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc)
            if FUSE_SHRINK:
                at = a_desc.load([0, off_k]).T
                if DOT_FP32:
                    at = at.to(tl.float32)
                u = tl.dot(xt, at, u)

        finish = True
        if SPLIT_K > 1:  # the tile's last split to finish adds up the partial sums, in split order, and goes on
            acc, u, finish = _split_k_reduce(acc, u, ws_ptr, count_ptr, tile_id, split, num_tiles, SPLIT_K, BLOCK_M,
                                             BLOCK_N, BLOCK_R, FUSE_SHRINK)  # fmt: skip
        if finish:
            _epilogue_and_store(
                acc, u, y_desc, b_ptr, u_in_ptr, bias_ptr, ids_ptr, rank_adapter_ptr, rank_scale_ptr, rank_off_ptr,
                y_ptr, u_out_ptr, pid_m, pid_n, M, N, R, n_adapters, stride_bn, stride_br, stride_uim, stride_uir,
                stride_ym, stride_yn, stride_uom, stride_uor, stride_bias, BLOCK_M, BLOCK_N, BLOCK_R, FUSE_SHRINK,
                HAS_BIAS, HAS_IDS, STORE_U, DOT_FP32, Y_TMA, ROW_ADAPTERS,
            )  # fmt: skip


@triton.jit
def _epilogue_and_store(
    acc, u, y_desc, b_ptr, u_in_ptr, bias_ptr, ids_ptr, rank_adapter_ptr, rank_scale_ptr, rank_off_ptr, y_ptr,
    u_out_ptr, pid_m, pid_n, M, N, R, n_adapters, stride_bn, stride_br, stride_uim, stride_uir, stride_ym, stride_yn,
    stride_uom, stride_uor, stride_bias, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, STORE_U: tl.constexpr,
    DOT_FP32: tl.constexpr, Y_TMA: tl.constexpr, ROW_ADAPTERS: tl.constexpr,
):  # fmt: skip
    """One output tile's low-rank epilogue (``u`` from the main loop, or read from ``u_in`` without FUSE_SHRINK)
    and its store."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROW_ADAPTERS:  # each row's own term, from u by row (rows of id -1 are never read)
        acc = _row_adapter_epilogue(
            acc, u_in_ptr, b_ptr, bias_ptr, ids_ptr, rank_off_ptr, offs_m, offs_n, M, N, n_adapters, stride_uim,
            stride_uir, stride_bn, stride_br, stride_bias, BLOCK_R, HAS_BIAS, DOT_FP32, "tf32",
        )  # fmt: skip
    else:
        if not FUSE_SHRINK:
            offs_r = tl.arange(0, BLOCK_R)
            u_in = u_in_ptr + offs_m[:, None] * stride_uim + offs_r[None, :] * stride_uir
            u = tl.load(u_in, mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
        acc = _low_rank_epilogue(
            acc, u, b_ptr, bias_ptr, ids_ptr, rank_adapter_ptr, rank_scale_ptr, u_out_ptr, offs_m, offs_n, M, N, R,
            pid_n == 0, stride_bn, stride_br, stride_uom, stride_uor, stride_bias,
            BLOCK_R, y_ptr.dtype.element_ty, HAS_BIAS, HAS_IDS, STORE_U, DOT_FP32, "tf32",
        )  # fmt: skip
    if Y_TMA:
        # Tutorial 09's subtiled epilogue: two (BLOCK_M, BLOCK_N / 2) TMA stores straight from the wgmma
        # accumulator layout (stmatrix into shared memory). No layout conversion of the whole tile through shared
        # memory, no per-element masks (TMA clips at M and N), and the copy completes while the next tile's K
        # loop runs instead of holding this program's warps on global stores.
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], halves[0].to(y_desc.dtype))
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], halves[1].to(y_desc.dtype))
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


class TmaTiles(NamedTuple):
    """One launch configuration of the persistent kernel (a candidate ``lora_linear`` times on the GPU)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fuse_shrink: bool
    group_m: int = 8
    split_k: int = 1  # work units per output tile, each over a slice of K, summed by the tile's last one to finish


# The widest stacked rank (BLOCK_R) the kernel takes: its (BLOCK_M, BLOCK_R) fp32 u and the epilogue's B tile share
# the registers of the 128-row accumulator. Wider stacks (several adapters of rank 64 and up) stay on cuBLAS.
TMA_MAX_BLOCK_R = 64


def rank_tile(rank: int) -> int:
    """BLOCK_R for a stacked rank R: the next power of two, at least 16 (the smallest dot the GPU does)."""
    return max(16, next_pow2(rank))


# Above this many rows the 128-row tiles alone are timed; at or below it 64-row tiles join them (see tma_candidates).
FEW_ROWS = 512


def tma_candidates(fusable: bool, block_r: int = 16, rows: int | None = None) -> tuple[TmaTiles, ...]:
    """Tiles to time on an H100-class GPU for a stacked rank tile ``block_r`` (<= ``TMA_MAX_BLOCK_R``): wgmma-sized
    output tiles whose pipelined x and W stages fit the ~227 KB of shared memory (128 x 256 x 64 in 3 stages:
    144 KB, 186 KB with the epilogue's), each with the shrink fused (when the adapter reads x) and from cuBLAS.

    - 128 x 256 and 128 x 128 on 8 warps; 128 x 256 only at rank tile 16: from 32 on (with adapter ids) it spills on
      triton 3.9, as 128 x 128 with 4 warps and 256 x 128 with 8 do at 16.
    - For at most ``FEW_ROWS`` ``rows``, also 64 x 128 on one warpgroup (4 warps, 5 stages). At 256 rows and
      N = 4096 the 128-row tiles make 32 or 64 output tiles: the persistent grid then streams W from at most 64 of
      the H100's 132 SMs, and session 13's H100 chose ``"composition"`` there (1.45x the bare matmul, graphed).
      64 x 128 tiles make 128 programs; 64 rows is the smallest wgmma M. Session 15's H100 took them graphed, at
      1.29x the bare matmul: each program streams all of K, 1.5 MB from L2 at 4096 x 4096.
    - And, for as few rows at rank tile 16, 128 x 128 and 64 x 128 with K split in two (``split_k``): 128 or 256
      work units of half the K range each, whose fp32 partial tiles (9.4 MB at 256 x 4096, L2-resident) the last
      unit of each tile adds up; the likely shape of cuBLAS's own small-M GEMMs. At rank tile 64 (with adapter ids)
      every split build spills (16-56 bytes of stack, triton 3.6 and 3.9).

    tests/test_codegen.py pins these builds to TMA-fed, pipelined wgmma without spills. Under the interpreter: one
    small tile, fused when possible."""
    if INTERPRET:
        return (TmaTiles(32, 32, 32, 4, 1, fusable, 2),)
    shapes = ((128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1)) if block_r <= 16 else ((128, 128, 64, 8, 4, 1),)
    if rows is not None and rows <= FEW_ROWS:
        shapes = (*shapes, (64, 128, 64, 4, 5, 1))
        if block_r <= 16:
            shapes = (*shapes, (128, 128, 64, 8, 4, 2), (64, 128, 64, 4, 5, 2))
    fuse = (True, False) if fusable else (False,)
    return tuple(TmaTiles(*s[:5], f, 8, s[5]) for f in fuse for s in shapes)


def _aligned(t: torch.Tensor) -> bool:
    """A TMA operand: unit inner stride, 16-byte aligned base and row stride."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def tma_fits(x: torch.Tensor, weight: torch.Tensor, rank: int = 16) -> bool:
    """Whether the persistent kernel may run: 16-bit operands on a GPU with TMA (sm_90 and up; any device under the
    interpreter), x (M, K) and the weight (N, K), either way round, with 16-byte aligned rows, and a stacked rank
    ``rank`` (R) whose tile is at most ``TMA_MAX_BLOCK_R``."""
    if rank_tile(rank) > TMA_MAX_BLOCK_R:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if x.is_cuda:
        if _capability(_cuda_index(x.device))[0] < 9:
            return False
    elif not (INTERPRET and x.is_cpu):
        return False
    return _aligned(x) and (_aligned(weight) or _aligned(weight.t()))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def lora_linear_tma_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    bias: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    y: torch.Tensor,
    u_out: torch.Tensor | None,
    tiles: TmaTiles,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the persistent kernel into ``y`` (M, N) (and ``u_out`` (M, R) when given), shapes as
    ``lora_linear.lora_linear_fwd`` (its torch twin, ``lora_linear_fwd_reference``, is this path's too; x_lora: the
    adapter's input under dropout, or None for x). Needs ``tma_fits(x, weight)``; the shrink is fused only when
    ``tiles.fuse_shrink``, the adapter reads x and A_cat's rows are aligned, else ``x_lora A_cat^T`` comes from
    cuBLAS.

    ``rows``: a mixed batch whose rows each get their own adapter's term only, ``(u, rank_off)``: u (M, U) by row
    as ``lora_segmented.lora_shrink(..., by_row=True)`` writes it (scaled, rounded, zeros past each row's rank; U at
    most ``TMA_MAX_BLOCK_R``) and the plan's ``rank_off``; ``adapter_ids`` (M,) int32 says whose B each row reads
    (its twin: ``lora_segmented.lora_segmented_fwd_reference``). lora_A, rank_scale, rank_adapter and x_lora are
    not read then, and u_out must be None."""
    M, K = x.shape
    N, R = lora_B.shape
    if M == 0:
        return
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    if rows is not None:
        u_in, rank_off = rows
        block_r, fuse, n_adapters = u_in.shape[1], False, rank_off.shape[0] - 1
    else:
        block_r, n_adapters, rank_off = rank_tile(R), 0, rank_adapter  # (rank_off: never dereferenced)
        fuse = tiles.fuse_shrink and x_lora is None and _aligned(lora_A)
        u_in = None if fuse else (x if x_lora is None else x_lora) @ lora_A.t()
    k_major = _aligned(weight)
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(*((weight, [bn, bk]) if k_major else (weight.t(), [bk, bn])))
    a_desc = TensorDescriptor.from_tensor(lora_A, [block_r, bk]) if fuse else x_desc
    y_tma = _aligned(y)
    y_desc = TensorDescriptor.from_tensor(y, [bm, bn // 2]) if y_tma else x_desc
    interp = dot_in_fp32(x)
    num_sms = 2 if interp else _num_sms(_cuda_index(x.device))
    units = cdiv(M, bm) * cdiv(N, bn) * tiles.split_k
    dummy = y  # never dereferenced: the matching constexpr switch is off
    u_in_t, u_out_t = (u_in if u_in is not None else dummy), (u_out if u_out is not None else dummy)
    split = dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=tiles.split_k)
    ws, counters = _split_k_buffers(M, N, block_r, [split], y)
    args = (
        x_desc, w_desc, a_desc, y_desc,
        lora_B, u_in_t, bias if bias is not None else dummy,
        adapter_ids if adapter_ids is not None else rank_adapter, rank_adapter, rank_scale, rank_off, y, u_out_t, ws,
        counters,
        M, N, K, R, n_adapters,
        lora_B.stride(0), lora_B.stride(1), u_in_t.stride(0), u_in_t.stride(1), y.stride(0), y.stride(1),
        u_out_t.stride(0), u_out_t.stride(1), 0 if bias is None else bias.stride(0),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=tiles.group_m, NUM_SMS=num_sms,
        W_K_MAJOR=k_major, FUSE_SHRINK=fuse, HAS_BIAS=bias is not None, HAS_IDS=adapter_ids is not None,
        STORE_U=u_out is not None, DOT_FP32=interp, Y_TMA=y_tma, SPLIT_K=tiles.split_k,
        ROW_ADAPTERS=rows is not None, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    grid = (min(num_sms, units),)
    # The key: what Triton specialises the compiled kernel on. The descriptors: each one's dtype and block shape (the
    # constexprs fix every block shape); the pointers and integers: launch_signature. So a repeat calls the compiled
    # kernel of its first launch directly.
    descriptors = tuple(d.base.dtype for d in args[:4])
    key = (x.device, *descriptors, *kwargs.values(), grid, *launch_signature(args[4:], 11))
    launch_recorded(_RECORDED, key, DirectLaunch.plan, (_lora_linear_tma_fwd_kernel, grid, kwargs, len(args)), args)


# The persistent kernel's recorded launches (``_backend.launch_recorded``), by what its compiled form is specialised on:
# on a GPU a repeat skips Triton's per-launch binding of its 44 parameters.
_RECORDED: dict = {}
