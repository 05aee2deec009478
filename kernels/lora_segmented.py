"""Segmented LoRA for mixed batches (SGMV, as in Punica and vLLM): each row's low-rank term uses its own adapter only.

``lora_linear`` with ``adapter_ids`` on its dense paths stacks every resident adapter on one rank axis
(``R = sum r_i``) and masks per row, so its low-rank work is ``M * R * (K + N)`` and grows with the number of
resident adapters. Here rows are grouped by adapter on the device (a stable sort of the ids; no host sync) and
every row block of a kernel belongs to one adapter, so the work is ``M * r * (K + N)`` whatever the number of
adapters. The adapters are read in place from the stacked ``A_cat (R, K)`` / ``B_cat (N, R)`` that ``lora_linear``
already builds (adapter ``a`` owns rank rows / columns ``rank_off[a] .. rank_off[a + 1]``; ranks may differ: the
kernels mask rank columns past the adapter's own). Rows whose id is -1 (or outside ``[0, n)``) are skipped.
For this path ``lora_linear`` stacks B_cat rank-major (an (N, R) view of contiguous ``B_cat^T (R, N)``, built once
per set of adapters when serving): each rank row of a B_a^T tile is then contiguous along N, where the mask only
cuts the layer's edge, so the sm_90 build loads it as 16-byte vectors. From a row-major B_cat the tile would run
along the adapter's rank columns, masked at its rank and starting at an unaligned offset: one 2-byte load per
element (tests/test_codegen.py). The backward's expand reads ``A_cat^T``, contiguous along N already.

Notation: ``order`` sorts the rows by id; sorted positions ``starts[a] .. starts[a + 1]`` hold adapter ``a``'s rows;
``s_a`` is its scale; ``u`` is kept in sorted order, ``(M, U)`` with U = max(16, r_max rounded up to a power of
two) (the kernels' rank tile, so its rows are stored as whole vectors), rounded to the input dtype once::

    shrink   u[p, :r_a] = round(s_a * x[order[p]] A_a^T)             (fp32 accumulation, scaled, one rounding)
    expand   y[order[p]] = round(y[order[p]] + u[p, :r_a] B_a^T)     (y from cuBLAS: x W^T + b, rounded once)
    wgrad    G[rank_off[a] + i, j] = sum_{p in a} P[p, i] Q[order[p], j]

Forward (``lora_segmented_fwd``): ``y = F.linear(x, W, b)``, ``u = shrink(x_lora, A_cat)``, ``expand(y, u, B_cat)``:
u rounded as in ``lora_linear``'s Triton kernel (and its torch paths with one shared scale), y as on its
``"composition"`` path (``y.addmm_(u, B^T)`` onto the rounded base), row by row. Backward (``lora_segmented_bwd``), with
``du[p] = round(s_a * dy[order[p]] B_a)`` (the shrink on ``B_cat^T``):
``dx = dy W`` then ``expand(dx, du, A_cat^T)`` (without dropout; with it ``dx_lora = expand(0, du, A_cat^T)``),
``dA_a = du_a^T x_lora_a = wgrad(du, x_lora)``, ``dB_a = dy_a^T u_a = wgrad(u, dy)`` (stored transposed into
``dB_cat``), ``dW = dy^T x``, ``db = sum_m dy``. An adapter without rows gets exact zeros.

Cost of the weight gradient: one program per (adapter, column tile) loops over that adapter's rows, so a batch
whose rows mostly use one adapter runs ``cdiv(K, BLOCK_J)`` busy programs (64 for K = 4096): a fraction of the
GPU, on work a dense GEMM would finish at full width. It stays proportional to ``M * r * K`` (the dense masked
form costs ``M * R * K``); split the row loop with atomics if a GPU profile shows it matters.

Layers: shared ``@triton.jit`` helper and three kernels; their launchers ``lora_shrink``, ``lora_expand_`` and
``lora_wgrad`` with torch twins (per-adapter loops; the path used when Triton cannot run); the op's forward and
backward launchers ``lora_segmented_fwd`` / ``lora_segmented_bwd`` and their twins. The autograd Function, the
torch custom op and the functional API are ``lora_linear``'s (``path="segmented"``, picked by its dispatch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import DirectLaunch, cdiv, device_lru_cache, launch_by_signature, launch_recorded, next_pow2, use_triton


# ----------------------------------------------------------------------------------------------------------------
# Row grouping and adapter tables
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentPlan:
    """Rows grouped by adapter (device tensors, built without a host sync) plus the adapters' rank layout.

    order: (M,) int64, the caller's row at each sorted position. starts: (n + 1,) int32, first sorted position of
    each adapter's rows (``starts[n]`` ends the last segment; positions before ``starts[0]`` hold id -1).
    rank_off: (n + 1,) int32 device copy of ``offsets``. scale: (n,) fp32 device copy of ``scales``.
    ranks, scales: the host values.
    """

    order: torch.Tensor
    starts: torch.Tensor
    rank_off: torch.Tensor
    scale: torch.Tensor
    ranks: tuple[int, ...]
    scales: tuple[float, ...]

    @functools.cached_property  # (read several times by every launch of the plan, as u_width)
    def n(self) -> int:
        return len(self.ranks)

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    @functools.cached_property  # (read by every launch of the plan: host time on the serving path)
    def u_width(self) -> int:
        """Columns of u: the kernels' rank tile, max(16, r_max rounded up to a power of two)."""
        return u_width(self.ranks)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.ranks[:a]) for a in range(self.n + 1))

    def segments(self) -> list[tuple[int, int, int, int, float]]:
        """Host list of (lo, hi, rank offset, rank, scale) per adapter (syncs: for the torch twins only)."""
        starts = self.starts.tolist()
        offs = self.offsets
        return [(starts[a], starts[a + 1], offs[a], self.ranks[a], self.scales[a]) for a in range(self.n)]


def u_width(ranks: Sequence[int]) -> int:
    return max(16, next_pow2(max(ranks)))


@device_lru_cache(maxsize=256)
def _tables(ranks: tuple[int, ...], scales: tuple[float, ...], device: torch.device):
    """(rank_off (n + 1,) int32, scale (n,) fp32, bounds (n + 1,) int32 = 0..n) on ``device``, made once."""
    offs = [sum(ranks[:a]) for a in range(len(ranks) + 1)]
    return (
        torch.tensor(offs, dtype=torch.int32, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
        torch.arange(len(ranks) + 1, dtype=torch.int32, device=device),
    )


def _integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool)


def plan_segments(
    adapter_ids: torch.Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
    grouping: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SegmentPlan:
    """Group rows by adapter: adapter_ids (M,) integer (-1 = base only); 2 small launches, no host sync.

    A stable sort keeps each adapter's rows in their original order; ``searchsorted`` of 0..n in the sorted ids
    gives each segment's start, so ids below 0 sort before ``starts[0]`` and ids >= n after ``starts[n]`` (on
    CUDA, where ids are not range-checked, out-of-range ids act as -1). ``grouping``: (order, starts) of the same
    ids from an earlier plan with the same number of adapters (only the rank tables are then looked up).
    """
    ranks, scales = tuple(int(r) for r in ranks), tuple(float(s) for s in scales)
    if len(ranks) != len(scales) or not ranks or min(ranks) < 1:
        raise ValueError(f"plan_segments needs one rank (>= 1) and one scale per adapter, got {ranks} and {scales}")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dim() != 1 or not _integer(adapter_ids):
        tensor = isinstance(adapter_ids, torch.Tensor)
        got = f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}" if tensor else repr(adapter_ids)
        raise TypeError(f"adapter_ids must be a 1-D integer tensor, got {got}")
    rank_off, scale, bounds = _tables(ranks, scales, adapter_ids.device)
    if grouping is None:
        sorted_ids, order = torch.sort(adapter_ids.to(torch.int32), stable=True)
        grouping = order, torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return SegmentPlan(*grouping, rank_off, scale, ranks, scales)


@dataclass
class SegmentedTiles:
    """GPU tile sizes of the three kernels: the one place to tune them (bench/bench_lora_linear.py mixed rows).

    A row block holds one adapter's rows, so each adapter's last block is partly empty (at most n * (BLOCK_M - 1)
    masked rows: idle lanes, no memory traffic). The shrink has no other parallel axis, so its row blocks are small
    enough to give an H100's 132 SMs about two waves at M = 4096 (256 + n programs); the expand also splits N, and
    taller blocks there re-read each adapter's B tile less often.
    Registers per thread of the sm_90 builds (bf16, strides divisible by 16; ``cuobjdump --dump-resource-usage``;
    tests/test_lora_segmented.py checks them), rank tile 16 / 64: shrink at 16/32/64 rows 40/40/66 and 72/80/99;
    expand (rank-major B, whole u rows) 38/58/108 and 56/76/104; wgrad 48 and 64; no spills.
    """

    shrink_block_k: int = 128
    expand_block_n: int = 128
    wgrad_block_m: int = 64
    wgrad_block_j: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # fp32 operands (IEEE dots: FMA, each thread holding its share of a tile step in registers): at these tiles the
    # sm_90 builds of the expand spilled 4-12 KB of stack per thread (rank tile 64, or 64-row blocks) and the shrink
    # 176 bytes (64-row blocks, rank tile 64); 32-row blocks and 32-wide expand tiles spill nothing
    # (tests/test_lora_segmented.py::test_sm90_fp32_builds_do_not_spill)
    fp32_max_block_m: int = 32
    fp32_expand_block_n: int = 32

    def shrink_block_m(self, m: int, fp32: bool = False) -> int:
        block = 16 if m <= 4096 else 32 if m <= 16384 else 64
        return min(block, self.fp32_max_block_m) if fp32 else block

    def expand_block_m(self, m: int, fp32: bool = False) -> int:
        block = 16 if m <= 256 else 32 if m <= 1024 else 64
        return min(block, self.fp32_max_block_m) if fp32 else block


TILES = SegmentedTiles()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_block(pid, starts_ptr, n_adapters, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr):
    """The row block of program ``pid``: (adapter, first sorted position, end of that adapter's segment).

    Adapter ``a`` has ``cdiv(starts[a + 1] - starts[a], BLOCK_M)`` blocks, numbered consecutively in adapter order;
    the adapter of block ``pid`` is the number of adapters whose blocks all come before it. Programs past the last
    block get ``adapter == n_adapters`` (the grid is an upper bound, ``cdiv(M, BLOCK_M) + n``): they must return.
    """
    offs_a = tl.arange(0, BLOCK_A)
    a_mask = offs_a < n_adapters
    lo = tl.load(starts_ptr + offs_a, mask=a_mask, other=0)
    hi = tl.load(starts_ptr + offs_a + 1, mask=a_mask, other=0)
    n_blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(n_blocks, 0)
    adapter = tl.sum((ends <= pid).to(tl.int32), 0)
    sel = offs_a == adapter
    first_block = tl.sum(tl.where(sel, ends - n_blocks, 0), 0)
    seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
    seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
    return adapter, seg_lo + (pid - first_block) * BLOCK_M, seg_hi


@triton.jit
def _lora_segmented_shrink_kernel(
    # pointers
    x_ptr,  # x: (M, K), rows in the caller's order
    a_ptr,  # A_cat: (R, K); adapter a owns rows rank_off[a] .. rank_off[a + 1]
    order_ptr,  # (M,) int64: the caller's row at each sorted position
    starts_ptr,  # (n + 1,) int32: first sorted position of each adapter's rows
    rank_off_ptr,  # (n + 1,) int32
    scale_ptr,  # (n,) fp32
    u_ptr,  # u: (M, BLOCK_R) output, sorted order (BY_ROW: the caller's row order, rows of id -1 unwritten)
    # sizes
    n_adapters,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_um,
    stride_ur,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_A: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter: bf16 arithmetic is wrong there, give tl.dot fp32 operands
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs on the GPU (no silent TF32)
    EVEN_K: tl.constexpr,
    BY_ROW: tl.constexpr,  # write u's rows where x's are (for a GEMM epilogue that reads them by row)
):
    adapter, pos0, seg_end = _segment_block(tl.program_id(0), starts_ptr, n_adapters, BLOCK_M, BLOCK_A)
    if adapter >= n_adapters:
        return
    r0 = tl.load(rank_off_ptr + adapter)
    rank = tl.load(rank_off_ptr + adapter + 1) - r0
    pos = (pos0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    p_mask = pos < seg_end
    rows = tl.load(order_ptr + pos, mask=p_mask, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K), gathered rows
    a_ptrs = a_ptr + (r0 + offs_r)[None, :] * stride_ar + offs_k[:, None] * stride_ak  # A_a^T (BLOCK_K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=p_mask[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc = acc * tl.load(scale_ptr + adapter)  # fp32 accumulator scaled, then one rounding (as lora_linear's kernel)
    out_rows = rows if BY_ROW else pos
    u_ptrs = u_ptr + out_rows[:, None] * stride_um + offs_r[None, :] * stride_ur  # whole rows: zeros past the rank
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=p_mask[:, None])


@triton.jit
def _lora_segmented_expand_kernel(
    # pointers
    u_ptr,  # u: (M, >= BLOCK_R), sorted order, zeros past each row's rank (as lora_shrink writes it)
    b_ptr,  # B_cat: (N, R); adapter a owns columns rank_off[a] .. rank_off[a + 1]; unit stride along N: vector loads
    order_ptr,  # (M,) int64
    starts_ptr,  # (n + 1,) int32
    rank_off_ptr,  # (n + 1,) int32
    y_ptr,  # y: (M, N), the caller's order, updated in place (rows outside every segment untouched)
    # sizes
    n_adapters,
    N,
    # strides
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_A: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    adapter, pos0, seg_end = _segment_block(tl.program_id(0), starts_ptr, n_adapters, BLOCK_M, BLOCK_A)
    if adapter >= n_adapters:
        return
    r0 = tl.load(rank_off_ptr + adapter)
    rank = tl.load(rank_off_ptr + adapter + 1) - r0
    pos = (pos0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    p_mask = pos < seg_end
    rows = tl.load(order_ptr + pos, mask=p_mask, other=0)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < rank

    # whole rows of u: the shrink wrote zeros past the rank, so no rank mask (which would make every load 2 bytes)
    ut = tl.load(u_ptr + pos[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=p_mask[:, None], other=0.0)
    b_ptrs = b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn  # B_a^T (BLOCK_R, BLOCK_N)
    bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = p_mask[:, None] & n_mask[None, :]
    acc = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    if DOT_FP32:
        acc = tl.dot(ut.to(tl.float32), bt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(ut, bt, acc, input_precision=INPUT_PRECISION)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _lora_segmented_wgrad_kernel(
    # pointers
    p_ptr,  # P: (M, >= BLOCK_R), sorted order (u or du), zeros past each row's rank
    q_ptr,  # Q: (M, J), the caller's order (dy or x_lora)
    order_ptr,  # (M,) int64
    starts_ptr,  # (n + 1,) int32
    rank_off_ptr,  # (n + 1,) int32
    out_ptr,  # G: (R, J) through strides (dA_cat, or dB_cat (N, R) transposed)
    # sizes
    J,
    # strides
    stride_pm,
    stride_pr,
    stride_qm,
    stride_qj,
    stride_or,
    stride_oj,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    adapter = tl.program_id(0)
    offs_j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    j_mask = offs_j < J
    seg_lo = tl.load(starts_ptr + adapter)
    seg_hi = tl.load(starts_ptr + adapter + 1)
    r0 = tl.load(rank_off_ptr + adapter)
    r_mask = offs_r < tl.load(rank_off_ptr + adapter + 1) - r0

    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
    for p0 in range(seg_lo, seg_hi, BLOCK_M):  # this adapter's rows only (none: G_a = 0)
        pos = (p0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        p_mask = pos < seg_hi
        rows = tl.load(order_ptr + pos, mask=p_mask, other=0)
        pt = tl.load(p_ptr + pos[None, :] * stride_pm + offs_r[:, None] * stride_pr,
                     mask=p_mask[None, :], other=0.0)  # P_a^T (BLOCK_R, BLOCK_M), whole rows  # fmt: skip
        qt = tl.load(q_ptr + rows[:, None] * stride_qm + offs_j[None, :] * stride_qj,
                     mask=p_mask[:, None] & j_mask[None, :], other=0.0)  # Q rows (BLOCK_M, BLOCK_J)  # fmt: skip
        if DOT_FP32:
            pt = pt.to(tl.float32)
            qt = qt.to(tl.float32)
        acc = tl.dot(pt, qt, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + (r0 + offs_r)[:, None] * stride_or + offs_j[None, :] * stride_oj
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & j_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers and their torch twins
# ----------------------------------------------------------------------------------------------------------------
def _alloc(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Kernel outputs (tests replace this to hand the kernels NaN-poisoned buffers)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _meta(t: torch.Tensor, plan: SegmentPlan) -> dict:
    interp = t.device.type != "cuda"
    return dict(
        BLOCK_R=plan.u_width,
        DOT_FP32=interp,
        INPUT_PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
    )


def _launch(t: torch.Tensor) -> dict:
    return {} if t.device.type != "cuda" else {"num_warps": TILES.num_warps, "num_stages": TILES.num_stages}


def _row_blocks(m: int, plan: SegmentPlan, interp: bool, gpu_block_m, fp32: bool) -> tuple[int, int]:
    """(BLOCK_M, grid size along rows: an upper bound on the number of one-adapter row blocks)."""
    block_m = min(64, max(16, next_pow2(m))) if interp else gpu_block_m(m, fp32)
    return block_m, cdiv(m, block_m) + plan.n


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, plan: SegmentPlan, by_row: bool = False) -> torch.Tensor:
    """u (M, U) in sorted order: ``u[p, :r_a] = round(s_a * x[order[p]] A_a^T)``, zeros in ``r_a .. U``; ``by_row``:
    in x's row order instead, ``u[order[p]]`` (the persistent GEMM's per-row epilogue reads it so).

    x: (M, K) any strides; lora_A: (R, K) any strides (``B_cat^T`` in the backward). Rows at sorted positions
    outside every segment (id -1) are not written.
    """
    if not use_triton(x):
        return lora_shrink_reference(x, lora_A, plan, by_row)
    M, K = x.shape
    u = _alloc((M, plan.u_width), x)
    if M == 0:
        return u
    args = (
        x, lora_A, plan.order, plan.starts, plan.rank_off, plan.scale, u, plan.n, K,
        *x.stride(), *lora_A.stride(), *u.stride(),
    )  # fmt: skip
    geometry = ("shrink", M, K, x.stride(), lora_A.stride(), plan.n, plan.u_width, x.dtype, x.device, by_row)
    launch_recorded(_RECORDED, geometry, _plan_shrink, (x, plan, len(args), by_row), args, (x, lora_A))
    return u


def _plan_shrink(x: torch.Tensor, plan: SegmentPlan, runtime_args: int, by_row: bool = False) -> DirectLaunch:
    M, K = x.shape
    interp = x.device.type != "cuda"
    block_m, grid_m = _row_blocks(M, plan, interp, TILES.shrink_block_m, x.dtype == torch.float32)
    block_k = 64 if interp else TILES.shrink_block_k
    kwargs = dict(
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_A=max(2, next_pow2(plan.n)), EVEN_K=K % block_k == 0, BY_ROW=by_row,
        **_meta(x, plan), **_launch(x),
    )  # fmt: skip
    return DirectLaunch.plan(_lora_segmented_shrink_kernel, (grid_m,), kwargs, runtime_args)


def lora_shrink_reference(
    x: torch.Tensor, lora_A: torch.Tensor, plan: SegmentPlan, by_row: bool = False
) -> torch.Tensor:
    """Torch twin of ``lora_shrink`` (one adapter at a time, fp32 products, one rounding; other rows zero)."""
    u = x.new_zeros((x.shape[0], plan.u_width))
    for lo, hi, r0, r, s in plan.segments():
        rows = plan.order[lo:hi]
        u[rows if by_row else slice(lo, hi), :r] = (s * (x[rows].float() @ lora_A[r0 : r0 + r].float().t())).to(x.dtype)
    return u


def lora_expand_(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """In place: ``y[order[p]] = round(y[order[p]] + u[p, :r_a] B_a^T)`` for the rows of every segment; returns y.

    y: (M, N) any strides; u: (M, U) sorted order, as ``lora_shrink`` writes it (zeros past each row's rank: the
    kernel reads whole rows); lora_B: (N, R) any strides, fastest with
    a unit stride along N (B_cat rank-major, as ``lora_linear`` stacks it; ``A_cat^T`` in the backward): its tiles
    then load as 16-byte vectors. Rows of id -1 keep their value.
    """
    if not use_triton(y):
        return lora_expand_reference_(y, u, lora_B, plan)
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    args = (
        u, lora_B, plan.order, plan.starts, plan.rank_off, y, plan.n, N, *u.stride(), *lora_B.stride(), *y.stride(),
    )  # fmt: skip
    geometry = ("expand", M, N, u.stride(), lora_B.stride(), y.stride(), plan.n, plan.u_width, y.dtype, y.device)
    launch_recorded(_RECORDED, geometry, _plan_expand, (y, plan, len(args)), args, (u, lora_B, y))
    return y


def _plan_expand(y: torch.Tensor, plan: SegmentPlan, runtime_args: int) -> DirectLaunch:
    M, N = y.shape
    interp = y.device.type != "cuda"
    fp32 = y.dtype == torch.float32
    block_m, grid_m = _row_blocks(M, plan, interp, TILES.expand_block_m, fp32)
    block_n = 64 if interp else TILES.fp32_expand_block_n if fp32 else TILES.expand_block_n
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_A=max(2, next_pow2(plan.n)), **_meta(y, plan), **_launch(y))
    return DirectLaunch.plan(_lora_segmented_expand_kernel, (grid_m, cdiv(N, block_n)), kwargs, runtime_args)


# (kernel, geometry: sizes, strides, adapter count, rank tile, dtype, device) -> its planned launch. A serving layer
# calls the shrink and the expand with the same geometry on every batch of a size; the plan's device tensors are
# fresh allocations (aligned), so only the caller's operands are checked against the recorded alignment. A training
# step's weight gradients (``lora_wgrad``) are keyed by their launch_signature instead.
_RECORDED: dict[tuple, DirectLaunch] = {}


def lora_expand_reference_(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Torch twin of ``lora_expand_`` (fp32 sum, one rounding per element)."""
    for lo, hi, r0, r, _ in plan.segments():
        rows = plan.order[lo:hi]
        y[rows] = (y[rows].float() + u[lo:hi, :r].float() @ lora_B[:, r0 : r0 + r].float().t()).to(y.dtype)
    return y


def lora_wgrad(p: torch.Tensor, q: torch.Tensor, plan: SegmentPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-adapter weight gradient ``G[rank_off[a] + i, j] = sum_{p in segment a} P[p, i] Q[order[p], j]``.

    p: (M, U) sorted order (u or du, as ``lora_shrink`` writes them: zeros past each row's rank); q: (M, J) the
    caller's order (dy or x_lora); out: (R, J) view to fill (``dB_cat.t()`` writes dB_cat (N, R) in place) or None
    to allocate one. Every entry is written (zeros for an adapter without rows).
    """
    if out is None:
        out = _alloc((sum(plan.ranks), q.shape[1]), q)
    if not use_triton(q):
        return lora_wgrad_reference(p, q, plan, out)
    J = q.shape[1]
    if J == 0:
        return out
    interp = q.device.type != "cuda"
    block_j = 64 if interp else TILES.wgrad_block_j
    args = (
        p, q, plan.order, plan.starts, plan.rank_off, out,
        J,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    kwargs = dict(BLOCK_M=64 if interp else TILES.wgrad_block_m, BLOCK_J=block_j, **_meta(q, plan), **_launch(q))
    launch_by_signature(_RECORDED, ("wgrad", q.device, plan.n, *kwargs.values()), _lora_segmented_wgrad_kernel,
                        (plan.n, cdiv(J, block_j)), kwargs, args, 6)  # fmt: skip
    return out


def lora_wgrad_reference(
    p: torch.Tensor, q: torch.Tensor, plan: SegmentPlan, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch twin of ``lora_wgrad`` (one GEMM per adapter, fp32, one rounding)."""
    if out is None:
        out = q.new_empty((sum(plan.ranks), q.shape[1]))
    for lo, hi, r0, r, _ in plan.segments():
        out[r0 : r0 + r] = (p[lo:hi, :r].float().t() @ q[plan.order[lo:hi]].float()).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The op: forward and backward launchers (lora_linear's Function calls these on path "segmented")
# ----------------------------------------------------------------------------------------------------------------
def _check_operands(op: str, plan: SegmentPlan, weight, lora_A, lora_B, **rows) -> None:
    """Refuse operands that do not fit ``plan`` or each other: the kernels reach rows through ``plan.order`` and
    ranks through ``plan.rank_off`` unchecked, so a plan made for another batch or other adapters read and wrote
    out of bounds. ``rows``: name -> (tensor or None, its expected width); each must be (M, width), M the plan's
    row count. Every tensor shares ``weight``'s dtype and device (the plan's tables its device)."""
    n_out, k = weight.shape
    r, m = plan.offsets[-1], plan.order.shape[0]
    dt, dev = weight.dtype, weight.device
    if (
        lora_A.shape == (r, k) and lora_B.shape == (n_out, r) and lora_A.dtype == dt and lora_B.dtype == dt
        and lora_A.device == dev and lora_B.device == dev and plan.order.device == dev
        and all(t is None or (t.shape == (m, w) and t.dtype == dt and t.device == dev) for t, w in rows.values())
    ):  # fmt: skip
        return  # (host time: the checks below name the culprit)
    tensors = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, **{n: t for n, (t, _) in rows.items()}}
    shapes_fit = (
        tuple(lora_A.shape) == (r, k)
        and tuple(lora_B.shape) == (n_out, r)
        and all(t is None or tuple(t.shape) == (m, width) for t, width in rows.values())
    )
    if not shapes_fit:
        listing = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items() if t is not None)
        raise ValueError(
            f"{op}: the plan groups {m} rows for ranks {plan.ranks} (R = {r}); with weight (N, K) = {(n_out, k)} it "
            f"needs lora_A (R, K), lora_B (N, R) and (M, ...) rows, got {listing}"
        )
    given = {n: t for n, t in tensors.items() if t is not None}
    if any(t.dtype != weight.dtype for t in given.values()):
        raise TypeError(f"{op} needs one dtype, got " + ", ".join(f"{n} {t.dtype}" for n, t in given.items()))
    if any(t.device != weight.device for t in (*given.values(), plan.order)):
        listing = ", ".join(f"{n} on {t.device}" for n, t in given.items())
        raise ValueError(f"{op} needs one device, got {listing} and the plan on {plan.order.device}")


def lora_segmented_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    plan: SegmentPlan,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    store_u: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (M, N) = x W^T + b (cuBLAS) + each row's own adapter term; u (M, U) sorted order (None unless store_u).

    x: (M, K); weight: (N, K) any strides; lora_A: (R, K) = A_cat; lora_B: (N, R) = B_cat, any strides (rank-major,
    strides (1, N), for vector loads in the expand: ``lora_expand_``); x_lora: (M, K) the adapter input (dropout) or
    None for x. Launches: 1 GEMM, 1 shrink, 1 expand.
    """
    _check_operands("lora_segmented_fwd", plan, weight, lora_A, lora_B, x=(x, weight.shape[1]),
                    x_lora=(x_lora, weight.shape[1]))  # fmt: skip
    return segmented_fwd_checked_by_caller(x, weight, lora_A, lora_B, plan, bias, x_lora, store_u=store_u)


def segmented_fwd_checked_by_caller(x, weight, lora_A, lora_B, plan, bias=None, x_lora=None, *, store_u=True):
    """:func:`lora_segmented_fwd` without its operand checks (host time), for ``lora_linear``, which validated its
    operands and made ``plan`` from their ids."""
    y = F.linear(x, weight, bias)
    u = lora_shrink(x if x_lora is None else x_lora, lora_A, plan)
    lora_expand_(y, u, lora_B, plan)
    return y, (u if store_u else None)


def lora_segmented_fwd_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    plan: SegmentPlan,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    store_u: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch twin of ``lora_segmented_fwd``: base in fp32 rounded once, then the twins of shrink and expand."""
    _check_operands("lora_segmented_fwd_reference", plan, weight, lora_A, lora_B, x=(x, weight.shape[1]),
                    x_lora=(x_lora, weight.shape[1]))  # fmt: skip
    f = lambda t: None if t is None else t.float()
    y = F.linear(f(x), f(weight), f(bias)).to(x.dtype)
    u = lora_shrink_reference(x if x_lora is None else x_lora, lora_A, plan)
    lora_expand_reference_(y, u, lora_B, plan)
    return y, (u if store_u else None)


def _backward(dy, x, x_lora, weight, lora_A, lora_B, plan, u, needs, ops):
    shrink, expand_, wgrad, mm = ops
    need_dx, need_dxl, need_dw, need_db, need_da, need_dbb = needs
    du = shrink(dy, lora_B.t(), plan) if ((need_dx and x_lora is None) or need_dxl or need_da) else None
    dx = dxl = None
    if need_dx:
        dx = mm(dy, weight)
        if x_lora is None:
            expand_(dx, du, lora_A.t(), plan)
    if need_dxl:
        dxl = expand_(dy.new_zeros((dy.shape[0], weight.shape[1])), du, lora_A.t(), plan)
    dA = wgrad(du, x if x_lora is None else x_lora, plan) if need_da else None
    dB = None
    if need_dbb:
        dB = _alloc((dy.shape[1], sum(plan.ranks)), dy)
        wgrad(u, dy, plan, dB.t())
    dW = mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dxl, dW, db, dA, dB


def _check_bwd(op, dy, x, x_lora, weight, lora_A, lora_B, plan, u) -> None:
    n_out, k = weight.shape
    _check_operands(op, plan, weight, lora_A, lora_B, dy=(dy, n_out), x=(x, k), x_lora=(x_lora, k),
                    u=(u, plan.u_width))  # fmt: skip


_KERNEL_OPS = (lora_shrink, lora_expand_, lora_wgrad, torch.mm)
_TWIN_OPS = (
    lora_shrink_reference,
    lora_expand_reference_,
    lora_wgrad_reference,
    lambda a, b: (a.float() @ b.float()).to(a.dtype),  # CPU half GEMMs: fp32, rounded once
)


def lora_segmented_bwd(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    plan: SegmentPlan,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dx_lora, dW, db, dA_cat, dB_cat), None where ``needs`` says so (module docstring).

    dy: (M, N); x, x_lora: (M, K) (x needed for dW, or for dA without dropout; x_lora None: no dropout); u: the
    forward's (M, U) (needed for dB). Launches for grads of x, A, B: 1 GEMM, 1 shrink, 1 expand, 2 wgrad.
    """
    _check_bwd("lora_segmented_bwd", dy, x, x_lora, weight, lora_A, lora_B, plan, u)
    return _backward(dy, x, x_lora, weight, lora_A, lora_B, plan, u, needs, _KERNEL_OPS)


def segmented_bwd_checked_by_caller(dy, x, x_lora, weight, lora_A, lora_B, plan, u, needs):
    """:func:`lora_segmented_bwd` without its operand checks, for ``lora_linear``'s backward (its forward's own)."""
    return _backward(dy, x, x_lora, weight, lora_A, lora_B, plan, u, needs, _KERNEL_OPS)


def lora_segmented_bwd_reference(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    plan: SegmentPlan,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Torch twin of ``lora_segmented_bwd``: the same formulas on the twins (every product in fp32, one rounding)."""
    _check_bwd("lora_segmented_bwd_reference", dy, x, x_lora, weight, lora_A, lora_B, plan, u)
    return _backward(dy, x, x_lora, weight, lora_A, lora_B, plan, u, needs, _TWIN_OPS)
