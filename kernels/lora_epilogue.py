"""Helpers shared by the LoRA GEMM kernels (the tiled kernel of ``lora_linear_tiled.py`` and the persistent TMA
kernel of ``lora_linear_tma.py``): the grouped tile order, and the low-rank epilogue, where one output tile's fp32
accumulator ``acc = x W^T`` receives the adapters' term and the bias while still in fp32, so the tile is rounded
once at its store::

    u   <- (u * C) rounded to the output dtype     C[m, r] = rank_scale[r] where the row's adapter owns column r
    acc <- acc + u B_cat^T + bias

``u`` (BLOCK_M, BLOCK_R) is ``x A_cat^T`` in fp32, accumulated in the main loop or loaded from a precomputed
(M, R) tensor. The rounding of ``u`` before the expand is PEFT's (its ``x A^T`` is a rounded tensor too).

Split-K without a second launch, for both kernels: each split's fp32 partial sums go to a workspace slot, and a
tile's last split to finish adds them up in split order and runs the epilogue (``_split_k_reduce``), counting on
one buffer of tile counters per device and stream that every launch leaves zeroed (``_split_k_alloc``).
"""

import torch
import triton
import triton.language as tl

from ._backend import capturing, cdiv, normal_tensors


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
    stride_bias,  # the bias's one stride (any view: strided, or 0 for an expanded one)
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
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_adapter_epilogue(
    acc,  # (BLOCK_M, BLOCK_N) fp32: x W^T of this tile
    # pointers
    u_ptr,  # u by row: (M, BLOCK_R), each row's own adapter's scale * x A_a^T, rounded, zeros past r_a
    b_ptr,  # B_cat: (N, R)
    bias_ptr,  # bias: (N,)
    ids_ptr,  # adapter id per row: (M,) int32, -1 = base only
    rank_off_ptr,  # (n + 1,) int32: adapter a owns rank columns rank_off[a] .. rank_off[a + 1]
    # the tile
    offs_m,  # (BLOCK_M,) int64 row indices
    offs_n,  # (BLOCK_N,) int64 column indices
    M,
    N,
    n_adapters,  # ids outside [0, n_adapters) act as -1 (a GPU does not range-check them)
    # strides
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_bias,  # the bias's one stride (any view: strided, or 0 for an expanded one)
    # meta
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Returns ``acc + u_m B_a(m)^T + bias`` (fp32): a mixed batch's rows, each with its own adapter only, as the
    segmented path computes them (``u`` from its shrink, in row order), but added to the GEMM's accumulator, so y is
    written once. One dot of the rows of adapter ``a`` (the others masked to 0; a row of id -1 gets none) with
    ``B_a`` per adapter between the tile's least and greatest id: consecutive rows of one sequence share an adapter,
    so a tile mostly holds one. A row reads no adapter but its own: non-finite weights of another adapter leave it
    as it is, as on the segmented path (the rows of that adapter get NaN where its B is not finite)."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=m_mask[:, None], other=0.0)
    ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
    valid = (ids >= 0) & (ids < n_adapters)
    lo = tl.min(tl.where(valid, ids, n_adapters), 0)
    hi = tl.max(tl.where(valid, ids, -1), 0)
    for a in range(lo, hi + 1):
        r0 = tl.load(rank_off_ptr + a)
        rank = tl.load(rank_off_ptr + a + 1) - r0
        b_ptrs = b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn  # B_a^T (BLOCK_R, BLOCK_N)
        bt = tl.load(b_ptrs, mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)
        # Rows apart: the dot multiplies the other rows' zeros by B_a too, and 0 * inf or 0 * NaN is NaN. So B_a's
        # non-finite entries are zeroed for the dot, and the columns that held one turn NaN in a's rows alone.
        finite = tl.abs(bt.to(tl.float32)) < float("inf")
        bad = tl.max((finite == 0).to(tl.int32), 0)  # (BLOCK_N,)
        bt = tl.where(finite, bt, 0.0)
        mine = ids == a
        ua = tl.where(mine[:, None], u, 0.0)
        if DOT_FP32:
            acc = tl.dot(ua.to(tl.float32), bt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(ua, bt, acc, input_precision=INPUT_PRECISION)
        acc = tl.where(mine[:, None] & (bad > 0)[None, :], float("nan"), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _split_k_reduce(acc, u, ws_ptr, count_ptr, tile, split, n_tiles, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, FUSE_SHRINK: tl.constexpr):  # fmt: skip
    """Split-K without a second launch: each split stores its fp32 partial ``acc`` (and ``u``) in its own slot of
    the workspace, then counts itself done on the tile's counter (acquire-release, after a barrier: the whole
    program's stores come first). The split that counts last loads every slot (past L1, which other SMs' stores
    do not update) and sums them in split order, so the result does not depend on which split finished when;
    it resets the counter for the next launch. Returns (acc, u, whether this program finishes the tile)."""
    tile_elems = BLOCK_M * BLOCK_N
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    local_u = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    acc_slots = ws_ptr + tile.to(tl.int64) * SPLIT_K * tile_elems
    u_slots = ws_ptr + n_tiles.to(tl.int64) * SPLIT_K * tile_elems + tile.to(tl.int64) * SPLIT_K * BLOCK_M * BLOCK_R
    tl.store(acc_slots + split * tile_elems + local, acc)
    if FUSE_SHRINK:
        tl.store(u_slots + split * BLOCK_M * BLOCK_R + local_u, u)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    finish = done == SPLIT_K - 1
    if finish:  # (a loop, not static_range: unrolled, triton 3.6 moved every partial sum to the MMA layout)
        total = tl.load(acc_slots + local, cache_modifier=".cg")
        for s in range(1, SPLIT_K):
            total += tl.load(acc_slots + s * tile_elems + local, cache_modifier=".cg")
        acc = total
        if FUSE_SHRINK:
            total_u = tl.load(u_slots + local_u, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                total_u += tl.load(u_slots + s * BLOCK_M * BLOCK_R + local_u, cache_modifier=".cg")
            u = total_u
        tl.store(count_ptr + tile, 0)
    return acc, u, finish


def _split_k_buffers(M: int, N: int, block_r: int, configs: list[dict], like: torch.Tensor):
    """(workspace, counters) of the kernel's split-K for the largest need among ``configs``
    (:func:`_split_k_sizes`). Without a split, ``(like, like)``: pointers the kernel never dereferences."""
    return _split_k_alloc(*_split_k_sizes(M, N, block_r, configs), like)


def _split_k_sizes(M: int, N: int, block_r: int, configs: list[dict]) -> tuple[int, int]:
    """(workspace floats, tile counters) of split-K for the largest need among ``configs``: fp32 partial sums,
    ``tiles * SPLIT_K * BLOCK_M * (BLOCK_N + BLOCK_R)``, and one counter per output tile; (0, 0) without a split."""
    ws = count = 0
    for c in configs:
        if c["SPLIT_K"] > 1:
            tiles = cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"])
            ws = max(ws, tiles * c["SPLIT_K"] * c["BLOCK_M"] * (c["BLOCK_N"] + block_r))
            count = max(count, tiles)
    return ws, count


def _split_k_alloc(ws: int, count: int, like: torch.Tensor):
    """(workspace, counters) for :func:`_split_k_sizes`'s answer, or ``(like, like)`` without a split.

    One pair per device and stream, grown to the largest need seen, serves every split-K launch on that stream (a
    stream runs them one after another). The last split of every tile resets its counter (``_split_k_reduce``), so
    the counters stay zeroed between launches: a small-M call launches no memset and allocates nothing, host time
    on the path where host time is most of a call. Made fresh while a CUDA graph is captured (the memset joins the
    graph, and the graph keeps both)."""
    if not count:
        return like, like
    dev = like.device
    if capturing(like):
        return torch.empty(ws, dtype=torch.float32, device=dev), torch.zeros(count, dtype=torch.int32, device=dev)
    key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else None)
    counters, work = _COUNTERS.get(key), _WORKSPACES.get(key)
    if counters is None or work is None or counters.numel() < count or work.numel() < ws:
        with normal_tensors():  # (process-wide buffers: normal tensors whatever the first caller's mode)
            if counters is None or counters.numel() < count:
                counters = _COUNTERS[key] = torch.zeros(max(count, 256), dtype=torch.int32, device=dev)
            if work is None or work.numel() < ws:
                work = _WORKSPACES[key] = torch.empty(ws, dtype=torch.float32, device=dev)
    return work, counters


# (device, stream) -> the split-K launches' int32 tile counters, left zeroed by each launch, and fp32 workspace
_COUNTERS: dict[tuple, torch.Tensor] = {}
_WORKSPACES: dict[tuple, torch.Tensor] = {}
