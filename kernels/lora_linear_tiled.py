"""The tiled LoRA linear kernel (``lora_linear``'s ``"fused"`` and ``"epilogue"`` paths): ``y = x W^T + b + u B_cat^T``
in one launch, one program per output tile (split-K at few rows), its configs and autotuning, and its launches
recorded per geometry.

The math and the notation (``A_cat``, ``B_cat``, ``C``, the rank tables) are kernels/lora_linear.py's. The op's
launcher (kernels/lora_linear_launch.py) allocates the outputs this module's launcher writes; its torch twin is
``lora_linear_launch.lora_linear_fwd_reference``, as for the persistent kernel (kernels/lora_linear_tma.py).

  * ``FUSE_SHRINK`` (``"fused"``): the K loop also accumulates ``x A_cat^T`` (recomputed per N tile: cheap while M is
    small and the op is memory bound). Otherwise (``"epilogue"``) u comes from one torch matmul and the kernel adds
    ``u B_cat^T`` in its epilogue.
  * At M <= 64 the autotuner may pick split-K tiles: wide N tiles whose K range is cut into 4 or 8 slices, one
    program each, so that enough programs stream W while each re-reads less of x and A_cat; a tile's last slice to
    finish adds up the fp32 partial sums (in slice order, so the result does not depend on timing) and runs the
    epilogue (``_split_k_reduce``; no second launch, one zeroed counter per tile, reset by that slice: the counters
    are one buffer per device and stream, no memset per call).
  * ``ROW_ADAPTERS``: a mixed serving batch's rows each get their own adapter's term only, from u by row that the
    segmented shrink writes (``lora_epilogue._row_adapter_epilogue``, as the persistent kernel does).
  * Launches are planned once per geometry of the operands and then repeated (``TiledLaunch``): a small-M call is
    mostly host time, and on a GPU the repeat calls the compiled kernel directly instead of through Triton's
    launcher (``_backend.DirectLaunch``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import AUTOTUNE, INTERPRET, DirectLaunch, capturing, cdiv, graph_time_ms, next_pow2, record
from .lora_epilogue import (
    _grouped_tile,
    _low_rank_epilogue,
    _row_adapter_epilogue,
    _split_k_alloc,
    _split_k_reduce,
    _split_k_sizes,
)
from .lora_linear_tma import rank_tile


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr,  # x: (M, K)
    w_ptr,  # weight: (N, K), any strides (fan_in_fan_out and the backward pass transposed views)
    a_ptr,  # A_cat: (R, K)
    b_ptr,  # B_cat: (N, R)
    u_in_ptr,  # u precomputed (M, R), unscaled; read only when not FUSE_SHRINK (ROW_ADAPTERS: (M, BLOCK_R), by row)
    bias_ptr,  # bias: (N,)
    ids_ptr,  # adapter id per row: (M,) int32
    rank_adapter_ptr,  # (R,) int32: adapter index of each rank column
    rank_scale_ptr,  # (R,) fp32: scale of each rank column
    rank_off_ptr,  # (n + 1,) int32: adapter a owns rank columns rank_off[a] .. rank_off[a + 1]; read when ROW_ADAPTERS
    y_ptr,  # y: (M, N) output
    u_out_ptr,  # u * C rounded to the input dtype: (M, R) output, written when STORE_U
    ws_ptr,  # SPLIT_K > 1: fp32 partial sums, per (tile, split) slot: acc (BLOCK_M, BLOCK_N), then u (BLOCK_M, BLOCK_R)
    count_ptr,  # SPLIT_K > 1: (tiles,) int32 zeros: splits done per output tile (its last one resets it to 0)
    # sizes
    M,
    N,
    K,
    R,
    n_adapters,  # read when ROW_ADAPTERS
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
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
    FUSE_SHRINK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STORE_U: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter: bf16 arithmetic is wrong there, give tl.dot fp32 operands
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs on the GPU (no silent TF32)
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs per output tile, each over a slice of K (1: the whole K loop in one)
    ROW_ADAPTERS: tl.constexpr,  # u_in holds each row's own adapter's term, scaled and rounded: lora_epilogue's
    # _row_adapter_epilogue (a mixed serving batch; needs HAS_IDS, not FUSE_SHRINK, not STORE_U)
):
    tile = tl.program_id(0)
    split = 0
    if SPLIT_K > 1:  # a tile's splits are consecutive programs
        split = tile % SPLIT_K
        tile = tile // SPLIT_K
    pid_m, pid_n = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile (BLOCK_K, BLOCK_N)
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # A^T tile (BLOCK_K, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # K steps [k_lo, k_hi) of this program: all of them, or its split's share (the last splits may get none).
    k_lo = 0
    k_hi = tl.maximum(tl.cdiv(K, BLOCK_K), 1)
    if SPLIT_K > 1:
        per_split = tl.cdiv(k_hi, SPLIT_K)
        k_lo = split * per_split
        k_hi = tl.minimum(k_lo + per_split, k_hi)
        x_ptrs += k_lo * BLOCK_K * stride_xk
        w_ptrs += k_lo * BLOCK_K * stride_wk
        a_ptrs += k_lo * BLOCK_K * stride_ak
    # At least one step (K = 0, or a split without steps, runs one fully masked step): a loop that may run zero
    # times has LLVM set acc's zeros on the skipping edge, between the loop's last wgmma and its wait, and ptxas
    # then serializes every wgmma of the loop (info C7515; triton 3.6, sm_90, e.g. 64 x 256 tiles without STORE_U).
    for k in range(k_lo, tl.maximum(k_hi, k_lo + 1)):
        if SPLIT_K > 1:  # the step past a split without steps loads nothing (row / column masks: still constant
            # along K, so the loads stay 16-byte vectors)
            live = k < k_hi
            m_live = offs_m < tl.where(live, M, 0)
            n_live = offs_n < tl.where(live, N, 0)
            r_live = offs_r < tl.where(live, R, 0)
        else:
            m_live, n_live, r_live = m_mask, n_mask, r_mask
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_live[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=n_live[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=m_live[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_live[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        if FUSE_SHRINK:
            if EVEN_K:
                at = tl.load(a_ptrs, mask=r_live[None, :], other=0.0)
            else:
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_live[None, :], other=0.0)
            if DOT_FP32:
                at = at.to(tl.float32)
            u = tl.dot(xt, at, u, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    finish = True
    if SPLIT_K > 1:  # the tile's last split to finish adds up the partial sums, in split order, and goes on
        acc, u, finish = _split_k_reduce(acc, u, ws_ptr, count_ptr, tile, split, tl.cdiv(M, BLOCK_M) * tl.cdiv(
            N, BLOCK_N), SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_R, FUSE_SHRINK)  # fmt: skip
    if finish:
        # Epilogue: u <- (u * C) rounded like PEFT's x A^T, then acc += u B_cat^T, + bias, one store.
        if ROW_ADAPTERS:  # each row's own term, from u by row (rows of id -1 are never read)
            acc = _row_adapter_epilogue(
                acc, u_in_ptr, b_ptr, bias_ptr, ids_ptr, rank_off_ptr, offs_m, offs_n, M, N, n_adapters, stride_uim,
                stride_uir, stride_bn, stride_br, stride_bias, BLOCK_R, HAS_BIAS, DOT_FP32, INPUT_PRECISION,
            )  # fmt: skip
        else:
            if not FUSE_SHRINK:
                u_in = u_in_ptr + offs_m[:, None] * stride_uim + offs_r[None, :] * stride_uir
                u = tl.load(u_in, mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc = _low_rank_epilogue(
                acc, u, b_ptr, bias_ptr, ids_ptr, rank_adapter_ptr, rank_scale_ptr, u_out_ptr, offs_m, offs_n, M, N,
                R, pid_n == 0, stride_bn, stride_br, stride_uom, stride_uor, stride_bias,
                BLOCK_R, y_ptr.dtype.element_ty, HAS_BIAS, HAS_IDS, STORE_U, DOT_FP32, INPUT_PRECISION,
            )  # fmt: skip
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _even_k_of(K: int, block_k: int) -> bool:
    """Every K step is whole (no masks on K), and there is at least one."""
    return K > 0 and K % block_k == 0


_even_k = triton.heuristics({"EVEN_K": lambda args: _even_k_of(args["K"], args["BLOCK_K"])})
_fwd_kernel_fixed = _even_k(_lora_linear_fwd_kernel)


def _gpu_configs(fp32: bool = False) -> list[triton.Config]:
    """Candidate tiles per M regime for 16-bit operands (tensor cores), or with ``fp32`` for fp32 operands (IEEE
    fp32 ``tl.dot``: FMA, no tensor cores); ``_prune_configs`` keeps those of the call's regime."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1})]
    shapes = _FP32_SHAPES if fp32 else _SHAPES_16_BIT
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": sk}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s, sk in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): three to eight per M regime, to keep the autotuning
# compile time of a whole benchmark run within minutes
_SHAPES_16_BIT = [
    # M <= 16: memory bound, stream W with long K blocks and enough programs to fill 132 SMs. Every program
    # re-reads its K range of x (and of A_cat, with the fused shrink) from L2: at 16-wide N tiles (256
    # programs at N = 4096) that is as many bytes as W itself, twice. Split-K gets the programs from K instead:
    # 128-wide N tiles in 4 or 8 K slices re-read x and A_cat 8x less (graphed on the H100 of session 7, the
    # unsplit tiles took 1.78x the bare matmul at M = 16, 4096 x 4096). Slices of 3 and 6 are for the waves: one
    # such program fills an SM's shared memory, and N = 11008 makes 86 tiles, so 4 or 8 slices make 2.6 or 5.2
    # waves of 132 SMs (the last one 60% or 20% full, while the memory system idles), 3 or 6 slices 1.95 or 3.9
    # (session 15's H100 streamed W at 1.7-1.8 TB/s there against cuBLAS's 2.2, graphed at M = 1 and 16)
    (16, 64, 256, 4, 4, 1), (16, 32, 256, 4, 4, 1), (16, 64, 128, 4, 5, 1), (16, 16, 256, 4, 4, 1),
    (16, 128, 128, 4, 3, 8), (16, 128, 128, 4, 3, 4), (16, 128, 128, 4, 3, 6), (16, 128, 128, 4, 3, 3),
    # M <= 64
    (32, 64, 128, 4, 4, 1), (64, 64, 128, 4, 4, 1), (32, 128, 128, 4, 4, 4), (64, 128, 128, 8, 3, 4),
    (32, 128, 128, 4, 4, 3),
    # M <= 256 and above
    (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 3, 1),
]  # fmt: skip

# fp32 operands: an IEEE fp32 tl.dot is FMA work, each thread holding its share of a whole (BLOCK_M, BLOCK_K) x
# (BLOCK_K, BLOCK_N) step in registers, and the rank tile's u and epilogue dots in fp32 too. The 16-bit list's tiles,
# built for fp32 on sm_90 (triton 3.9), spilled 1.5-8 KB of stack per thread from 32 rows up, took 3-6 s each to
# compile (about 1 s in bf16), and three of them needed more than the 227 KB of shared memory, failing only at launch
# after their compile. These (K steps of 32 or 64, 8 warps but for one 32-wide tile) spill nothing at rank tiles
# 16 and 64 and compiled in about a second each (tests/test_codegen.py pins the spills and shared memory). Above 64
# rows "auto" keeps fp32 on cuBLAS (the persistent kernel is 16-bit only): the 64-row tile serves forced paths.
_FP32_SHAPES = [
    (16, 64, 32, 8, 3, 1), (16, 32, 64, 4, 4, 1), (16, 64, 64, 8, 3, 1), (16, 64, 32, 8, 3, 4),  # M <= 16
    (16, 64, 32, 8, 3, 8),
    (32, 32, 32, 8, 3, 1), (64, 64, 32, 8, 3, 1),  # M <= 64; above, the 64-row tile alone
]  # fmt: skip


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs of the call's M regime whose pipelined tiles fit in shared memory (~200 KB on H100). fp32
    operands (``INPUT_PRECISION="ieee"``) take their own list (``_gpu_configs(fp32=True)``), whatever ``configs``
    holds: their tiles are twice the bytes and the 16-bit tiles spill there."""
    get = lambda name, default: kwargs.get(name, named_args.get(name, default))
    m, block_r, fuse = get("M_BUCKET", 16), get("BLOCK_R", 16), get("FUSE_SHRINK", True)
    fp32 = get("INPUT_PRECISION", "tf32") == "ieee"
    if fp32:
        configs = _gpu_configs(fp32=True)
        lo, hi = (16, 16) if m <= 16 else (16, 64) if m <= 64 else (64, 64)
    else:
        lo, hi = (16, 16) if m <= 16 else (16, 64) if m <= 64 else (64, 128) if m <= 256 else (128, 256)

    def smem(c):  # bytes per stage of x, W (and A_cat when fused) tiles, times the stages
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (4 if fp32 else 2) * c.num_stages * bk * (bm + bn + (block_r if fuse else 0))

    keep = [
        c
        for c in configs
        if lo <= c.kwargs["BLOCK_M"] <= hi and smem(c) <= 200_000 and (m <= 64 or c.kwargs["SPLIT_K"] == 1)
    ]  # (split-K: for the few tiles of small M only)
    if keep:
        return keep
    bm = min(max(lo, 16), 64)
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=4, num_stages=2
        )
    ]


def _autotune_bench(kernel_call, quantiles) -> list[float]:
    """``triton.autotune``'s timer for the tiled kernel: each config's GPU work by CUDA-graph replay
    (``_backend.graph_time_ms``), as the engine's own tuners time theirs. ``do_bench``'s event pairs time this host's
    launch wherever a launch takes longer than the kernel runs (small M: an empty 40-argument Triton launch took
    35-52 us of host time on the H100 machines of sessions 13 and 15, the kernels 20-55 us), so its pick among the
    small-M configs followed the host. ``do_bench`` remains the timer where a call cannot be captured."""
    import triton.testing

    try:
        ms = graph_time_ms(kernel_call, torch.device("cuda", torch.cuda.current_device()))
    except RuntimeError:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return [ms] * len(quantiles)


_fwd_kernel_tuned = triton.autotune(
    configs=_gpu_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "FUSE_SHRINK", "HAS_IDS", "ROW_ADAPTERS"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_autotune_bench,
)(_fwd_kernel_fixed)


# ----------------------------------------------------------------------------------------------------------------
# Launcher and its recorded launches
# ----------------------------------------------------------------------------------------------------------------
def lora_linear_tiled_fwd(
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
    geometry: tuple,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Writes ``y`` (M, N) and, unless None, ``u_out`` (M, R) = (x_lora A_cat^T) * C rounded to x's dtype, both
    contiguous (operands as ``lora_linear.lora_linear_fwd``'s, validated there; M >= 1). ``geometry``: the operands'
    shapes, strides, dtype, device and switches as ``lora_linear_fwd`` keys them, ending with whether the shrink is
    fused (``"fused"``; it needs ``x_lora`` None) or comes from cuBLAS (``"epilogue"``): the key of the launch
    recorded for them (``TiledLaunch``).

    ``rows``: a mixed batch whose rows each get their own adapter's term only, ``(u, rank_off)`` as
    ``lora_linear_tma.lora_linear_tma_fwd`` takes them (u (M, U) by row from ``lora_segmented.lora_shrink(...,
    by_row=True)``, contiguous; ``adapter_ids`` required; the shrink not fused, no ``u_out``; lora_A, rank_scale,
    rank_adapter and x_lora unread)."""
    launch = _RECORDED.get(geometry)
    if launch is None:
        _first_tiled_launch(geometry, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
                            y, u_out, rows)  # fmt: skip
        return
    again = launch(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out, rows)
    if again is not launch:  # (its compiled kernel, from a launch through Triton: the first aligned one)
        _RECORDED[geometry] = again


class TiledLaunch(NamedTuple):
    """A launch of the tiled kernel planned for one geometry (``_RECORDED``: shapes, strides, dtype, device and
    switches of ``lora_linear_fwd``'s operands), repeated for new tensors of it without planning again: its config
    chosen, its integer arguments fixed, its compiled kernel called directly on a GPU (``DirectLaunch``)."""

    sizes_strides: tuple
    split: tuple[int, int]  # (workspace floats, tile counters) of split-K: (0, 0) without a split
    direct: DirectLaunch

    def arguments(self, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                  rows=None):  # fmt: skip
        """The kernel's runtime arguments in signature order for the operands and outputs of one call."""
        fused = self.direct.kwargs["FUSE_SHRINK"]
        if rows is not None:
            u_in, rank_off = rows
        else:
            u_in = None if fused else (x if x_lora is None else x_lora) @ lora_A.t()  # (M, R), contiguous
            rank_off = rank_adapter  # (never dereferenced)
        dummy = y  # never dereferenced: the matching constexpr switch is off
        pointers = (
            x, weight, lora_A, lora_B, dummy if u_in is None else u_in, dummy if bias is None else bias,
            rank_adapter if adapter_ids is None else adapter_ids, rank_adapter, rank_scale, rank_off, y,
            dummy if u_out is None else u_out, *_split_k_alloc(*self.split, y),
        )  # fmt: skip
        return (*pointers, *self.sizes_strides)

    def __call__(self, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                 rows=None):  # fmt: skip
        """Launches; returns the launch to repeat (``DirectLaunch``: with the compiled kernel of a first launch)."""
        args = self.arguments(
            x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out, rows
        )
        direct = self.direct(args, (x, weight, lora_A, lora_B, bias, adapter_ids, None if rows is None else rows[0]))
        return self if direct is self.direct else self._replace(direct=direct)


_RECORDED: dict[tuple, TiledLaunch] = {}  # geometry -> its planned launch (lora_linear_tiled_fwd)
_TUNED: dict[tuple, dict] = {}  # tuning key -> the autotuner's choice (all launch kwargs)
INTERPRET_SPLIT_K = 3  # the interpreter's split of small-M launches: 3 leaves some splits without K steps


def _first_tiled_launch(
    geometry, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out, rows
):  # fmt: skip
    """``lora_linear_tiled_fwd`` for a geometry without a recorded launch: choose the config (the autotuner's, once
    per tuning key), launch, and record the launch once the config is settled (not the untimed first config taken
    inside a CUDA-graph capture, which a later eager call times)."""
    M, K = x.shape
    N, R = lora_B.shape
    fuse, store_u = geometry[-1] and rows is None, u_out is not None
    interp = x.device.type != "cuda"
    meta = dict(
        BLOCK_R=rank_tile(R) if rows is None else rows[0].shape[1],
        FUSE_SHRINK=fuse,
        HAS_BIAS=bias is not None,
        HAS_IDS=adapter_ids is not None,
        STORE_U=store_u,
        DOT_FP32=interp,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ROW_ADAPTERS=rows is not None,
    )
    # (1 to 16 rows run the same 16-row tiles, as much work each: one tuning serves them. Tuned apart on session 15's
    # H100, the 1-row launch took 28.8 us against 20.2 us for 16 rows, graphed at 4096 x 4096.)
    m_bucket = min(max(next_pow2(M), 16), 4096)
    settled = True
    if interp:  # one config under the interpreter: large blocks, few programs; split-K where the GPU may take it
        config = dict(BLOCK_M=min(64, max(16, next_pow2(M))), BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
        config["SPLIT_K"] = INTERPRET_SPLIT_K if M <= 16 else 1
    else:
        # The autotuner picks a config once per tuning key; the launches after it repeat the recorded launch.
        tuning_key = (m_bucket, N, K, x.dtype, tuple(sorted(meta.items())))
        config = _TUNED.get(tuning_key)
        named = {"M_BUCKET": m_bucket, "BLOCK_R": meta["BLOCK_R"], "FUSE_SHRINK": fuse}
        if config is None and (not AUTOTUNE or capturing(x)):  # untimed: the first config (inside a CUDA-graph
            config = _prune_configs(_gpu_configs(), named, **meta)[0].all_kwargs()  # capture, where nothing is
            settled = not AUTOTUNE  # timed, for it only)
            if settled:
                _TUNED[tuning_key] = config
        if config is None:  # every candidate runs on the same buffers: sized for the largest split-K need
            _autotune(tuning_key, named, meta, m_bucket, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias,
                      adapter_ids, x_lora, y, u_out, rows)  # fmt: skip
            return
    launch = _plan_tiled(M, N, R, m_bucket, dict(meta, **config), x, weight, lora_A, lora_B, bias, store_u, rows)
    launch = launch(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out, rows)
    if settled:
        record(_RECORDED, geometry, launch)


def _plan_tiled(M, N, R, m_bucket, kwargs, x, weight, lora_A, lora_B, bias, store_u, rows) -> TiledLaunch:
    """The launch of ``kwargs`` (a config and its switches) for the geometry of these operands: grid, integer
    arguments (y, u and the u input are contiguous (M, N) / (M, R) tensors; u by row (M, BLOCK_R)), constexprs (with
    ``EVEN_K``, which the untuned kernel takes as an argument) and split-K sizes."""
    kwargs = dict(kwargs, EVEN_K=_even_k_of(x.shape[1], kwargs["BLOCK_K"]))
    y_strides, u_strides = (N, 1), (R, 1)
    u_in_strides = y_strides if kwargs["FUSE_SHRINK"] else u_strides if rows is None else (kwargs["BLOCK_R"], 1)
    n_adapters = 0 if rows is None else rows[1].shape[0] - 1
    sizes_strides = (
        M, N, x.shape[1], R, n_adapters, m_bucket, *x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(),
        *u_in_strides, *y_strides, *(u_strides if store_u else y_strides), 0 if bias is None else bias.stride(0),
    )  # fmt: skip
    grid = (cdiv(M, kwargs["BLOCK_M"]) * cdiv(N, kwargs["BLOCK_N"]) * kwargs["SPLIT_K"],)
    direct = DirectLaunch.plan(_lora_linear_fwd_kernel, grid, kwargs, 14 + len(sizes_strides))  # (14 pointers)
    return TiledLaunch(sizes_strides, _split_k_sizes(M, N, kwargs["BLOCK_R"], [kwargs]), direct)


def _autotune(tuning_key, named, meta, m_bucket, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias,
              adapter_ids, x_lora, y, u_out, rows):  # fmt: skip
    """The autotuner's first launch for ``tuning_key``: every config of the M regime timed on the same buffers
    (sized for the largest split-K need); the fastest is kept in ``_TUNED``."""
    M, N, R = x.shape[0], lora_B.shape[0], lora_B.shape[1]
    configs = [c.all_kwargs() for c in _prune_configs(_gpu_configs(), named, **meta)]  # (as the autotuner prunes)
    probe = _plan_tiled(M, N, R, m_bucket, dict(meta, **configs[0]), x, weight, lora_A, lora_B, bias,
                        u_out is not None, rows)  # fmt: skip
    probe = probe._replace(split=_split_k_sizes(M, N, meta["BLOCK_R"], configs))
    args = probe.arguments(
        x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out, rows
    )
    grid = lambda c: (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]) * c["SPLIT_K"],)
    _fwd_kernel_tuned[grid](*args, **meta)
    _TUNED[tuning_key] = _fwd_kernel_tuned.best_config.all_kwargs()
