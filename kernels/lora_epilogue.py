"""Helpers shared by the LoRA GEMM kernels (``lora_linear.py``'s tiled kernel and the persistent TMA kernel of
``lora_linear_tma.py``): the grouped tile order, and the low-rank epilogue, where one output tile's fp32
accumulator ``acc = x W^T`` receives the adapters' term and the bias while still in fp32, so the tile is rounded
once at its store::

    u   <- (u * C) rounded to the output dtype     C[m, r] = rank_scale[r] where the row's adapter owns column r
    acc <- acc + u B_cat^T + bias

``u`` (BLOCK_M, BLOCK_R) is ``x A_cat^T`` in fp32, accumulated in the main loop or loaded from a precomputed
(M, R) tensor. The rounding of ``u`` before the expand is PEFT's (its ``x A^T`` is a rounded tensor too).
"""

import triton
import triton.language as tl


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile ``tile_id`` in grouped order (Triton tutorial 03): GROUP_M row blocks sweep the N tiles
    together, so the W columns they share stay in L2. Returns (pid_m, pid_n)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _low_rank_epilogue(
    acc,  # (BLOCK_M, BLOCK_N) fp32: x W^T of this tile
    u,  # (BLOCK_M, BLOCK_R) fp32: x A_cat^T, unscaled
    # pointers
    b_ptr,  # B_cat: (N, R)
    bias_ptr,  # bias: (N,)
    ids_ptr,  # adapter id per row: (M,) int32 (HAS_IDS)
    rank_adapter_ptr,  # (R,) int32: adapter index of each rank column
    rank_scale_ptr,  # (R,) fp32: scale of each rank column
    u_out_ptr,  # (M, R): u * C rounded, written when STORE_U and store_u_here
    # the tile
    offs_m,  # (BLOCK_M,) int64 row indices
    offs_n,  # (BLOCK_N,) int64 column indices
    M,
    N,
    R,
    store_u_here,  # this program writes u (one N tile per row block does)
    # strides
    stride_bn,
    stride_br,
    stride_uom,
    stride_uor,
    # meta
    BLOCK_R: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STORE_U: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Returns ``acc + (u * C rounded) B_cat^T + bias`` (fp32) and stores the rounded ``u * C`` when asked."""
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    rank_scale = tl.load(rank_scale_ptr + offs_r, mask=r_mask, other=0.0)
    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
        owner = tl.load(rank_adapter_ptr + offs_r, mask=r_mask, other=-2)
        u = u * tl.where(ids[:, None] == owner[None, :], rank_scale[None, :], 0.0)
    else:
        u = u * rank_scale[None, :]
    u_lo = u.to(OUT_DTYPE)
    if STORE_U:
        if store_u_here:
            u_out = u_out_ptr + offs_m[:, None] * stride_uom + offs_r[None, :] * stride_uor
            tl.store(u_out, u_lo, mask=m_mask[:, None] & r_mask[None, :])
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile (BLOCK_R, BLOCK_N)
    bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    if DOT_FP32:
        acc = tl.dot(u_lo.to(tl.float32), bt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(u_lo, bt, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc
