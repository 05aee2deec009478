"""Fused stacks of bottleneck adapters (AdapterHub ``seq_bn`` / ``double_seq_bn`` / ``par_bn`` and ``Stack``).

Notation per row (one token): ``h`` = the sublayer's projection output (``dense(x)`` after dropout), ``y`` = the
sublayer's residual input, ``LN`` = the model's own LayerNorm of that sublayer (may be absent), adapter ``i`` is
``A_i(v) = s_i * (act_i(v @ Wd_i^T + bd_i) @ Wu_i^T + bu_i)``. With ``r_0 = h`` each active level does
(AdapterHub's ``pre_forward`` / ``Adapter.forward`` / ``post_forward``, adapters 1.3.0)::

    sequential:  t_i = r_(i-1) + y                                      (original_ln_before)
                 x_i = LN(t_i) | t_i (no model LN) | r_(i-1) (not original_ln_before)
                 res_i = r_(i-1) (residual_before_ln=True) | t_i ("post_add") | x_i (False)
                 r_i = res_i + A_i(LNb_i(x_i))            with the adapter's own LNs if configured:
                       LNa_i(res_i + A_i(..)) (adapter_residual_before_ln) or res_i + LNa_i(A_i(..))
    parallel:    r_i = r_(i-1) + LNa_i(A_i(LNb_i(y)))                   (LNs optional)
    output:      LN(r_n + y) | r_n + y (no model LN) | r_n (not original_ln_after)

A level whose route is -1 leaves ``r`` unchanged, so one ``routes`` tensor (rows, levels) of adapter indices
expresses stacks, depths, switched-off levels and a different stack per row. AdapterHub's ``Stack`` of
parallel adapters keeps only the last level's output; here parallel levels add up (identical at depth 1).

Kernel design (one row-block kernel after the projection; the projection itself stays on cuBLAS because a
plain Triton GEMM is 1.20-1.38x slower than cuBLAS at M >= 256 on an H100, which would cost more than the
whole adapter stack). All adapters of a launch are packed along the bottleneck axis (``Rt = sum r_a``):
``wd`` (Rt, H), ``wu`` (H, Rt) stored H-contiguous, each unit knowing its owner adapter, activation code and its
adapter's scale. One program owns BLOCK_M rows and, per level, (Z) streams the level input over hidden chunks
into a (BLOCK_M, BLOCK_R) bottleneck tile that covers the rank (one tile when the block's rows share an adapter),
applies the activation and the per-(row, unit) mask ``owner == route``, parks the tiny activation in a scratch
in the dot operand dtype, then (U) streams over hidden chunks again adding the up-projection (K sub-tiles of
BLOCK_K units) and residual and writing the running ``r`` (fp32 scratch) while accumulating the LayerNorm
moments for the next level. The unit loops only span the units of the adapters the block's rows use, so a
uniform stack costs one adapter's FLOPs per level. A final pass applies the output LayerNorm and stores once
(without an output LN the last level stores the output directly). Tiles come from the ranks (``_tiles``), not
from autotuning; tests/test_codegen.py pins their sm_90 builds to no register spills and vector weight loads.

Distance from the physical limit (read h and y once, write out once = 3 x M x H x dtype bytes): HBM sees h, y
and out once each plus the fp32 scratch ``r`` when it spills from L2; the per-level re-reads of a program's
(BLOCK_M, H) slab (2 per level) should hit L2 because each program revisits its own slab within microseconds.
Every program also streams its level's weights from L2 (2 r H x 2 bytes: 4 MB at hidden 4096, rank 256), which
bounds the wide-rank case. The eager baseline moves roughly 8 x M x H elements per adapter through HBM (add,
LN, down, act, up, scale, add, LN). ``bench/bench_bottleneck.py::bench_stack_alone`` reports the measured time
as a multiple of that floor.

Backward (training): the forward also keeps r_1..r_n, the pre-activations and the LayerNorm moments; one
row-block kernel per level (top to bottom) runs the g -> dz -> dx -> LayerNorm-backward chain with the same
streaming structure, and cuBLAS computes the weight gradients of the adapters that train (see
``_stack_backward``). Forward and backward are registered torch custom ops (``adapter_engine::bottleneck_stack_*``)
so torch.compile keeps each stack as one opaque node.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import INTERPRET, check_float_dtype, check_same_device, dot_in_fp32, use_triton

logger = logging.getLogger(__name__)

# Activation names (AdapterHub ``non_linearity``, transformers ACT2FN names) -> kernel codes.
ACTIVATIONS = {
    "identity": 0, "linear": 0, "none": 0,
    "relu": 1,
    "gelu": 2,  # erf form (transformers GELUActivation)
    "gelu_new": 3, "gelu_pytorch_tanh": 3,  # tanh form (NewGELUActivation)
    "swish": 4, "silu": 4,
    "tanh": 5,
}  # fmt: skip


@dataclass(frozen=True)
class StackOptions:
    """Structural options shared by every adapter of one launch (AdapterHub ``BnConfig`` field names)."""

    is_parallel: bool = False
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True  # True | False | "post_add"
    adapter_residual_before_ln: bool = False
    ln_before: bool = False  # the adapter's own LayerNorm on its input (torch path only)
    ln_after: bool = False  # the adapter's own LayerNorm on its output (torch path only)
    eps: float = 1e-12  # the model LayerNorm's eps
    adapter_ln_eps: float = 1e-5  # nn.LayerNorm default, as AdapterHub builds its own LNs

    def __post_init__(self):
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")


class PackedStack(NamedTuple):
    """All adapters of one launch packed along the bottleneck axis (Rt = sum of ranks, A = adapters)."""

    wd: torch.Tensor  # (Rt, H) down weights
    bd: torch.Tensor  # (Rt,) down biases
    wu: torch.Tensor  # (H, Rt) up weights, stored H-contiguous (an (Rt, H) buffer, transposed)
    bu: torch.Tensor  # (A, H) up biases
    unit_owner: torch.Tensor  # (Rt,) int32 adapter index of each unit
    unit_act: torch.Tensor  # (Rt,) int32 activation code of each unit
    scale: torch.Tensor  # (A,) fp32 scaling of each adapter
    offsets: torch.Tensor  # (A+1,) int32 first unit of each adapter
    lnb_w: torch.Tensor | None = None  # (A, H) own ln_before weights
    lnb_b: torch.Tensor | None = None
    lna_w: torch.Tensor | None = None  # (A, H) own ln_after weights
    lna_b: torch.Tensor | None = None
    host: PackedHost | None = None  # the same facts on the host (no device sync to read them)


class PackedHost(NamedTuple):
    offsets: tuple[int, ...]  # (A+1,) first unit of each adapter
    codes: tuple[int, ...]  # (A,) activation code of each adapter
    scales: tuple[float, ...]  # (A,)
    trainable: tuple[bool, ...]  # (A,) any of the adapter's weights requires grad


def pack_adapters(
    down_weights: list[torch.Tensor],
    down_biases: list[torch.Tensor],
    up_weights: list[torch.Tensor],
    up_biases: list[torch.Tensor],
    activations: list[str],
    scalings: list[float],
    ln_before: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ln_after: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PackedStack:
    """Concatenate adapters (down (r_a, H), up (H, r_a), biases (r_a,), (H,)) into a differentiable PackedStack."""
    n = len(down_weights)
    if not (n == len(down_biases) == len(up_weights) == len(up_biases) == len(activations) == len(scalings)) or n == 0:
        raise ValueError(f"pack_adapters needs the same non-zero number of each part, got {n} down weights")
    hidden = down_weights[0].shape[1]
    for i, (wd, wu) in enumerate(zip(down_weights, up_weights, strict=True)):
        if wd.dim() != 2 or wu.dim() != 2 or wd.shape[1] != hidden or wu.shape != (hidden, wd.shape[0]):
            raise ValueError(
                f"adapter {i}: down weight must be (r, {hidden}) and up weight ({hidden}, r), "
                f"got {tuple(wd.shape)} and {tuple(wu.shape)}"
            )
    codes = []
    for a in activations:
        if a.lower() not in ACTIVATIONS:
            raise ValueError(f"unsupported non_linearity {a!r}; supported: {sorted(ACTIVATIONS)}")
        codes.append(ACTIVATIONS[a.lower()])
    dev = down_weights[0].device
    ranks = tuple(w.shape[0] for w in down_weights)
    scales = tuple(float(x) for x in scalings)
    offsets_host = [0]
    for r in ranks:
        offsets_host.append(offsets_host[-1] + r)
    offsets, owner, unit_act, scale = _unit_tables(ranks, tuple(codes), scales, dev)
    trainable = tuple(
        any(t.requires_grad for t in parts)
        for parts in zip(down_weights, down_biases, up_weights, up_biases, strict=True)
    )

    def stack(pairs, k):
        return None if pairs is None else torch.stack([p[k] for p in pairs])

    one = n == 1  # a single adapter needs no copy (the up weight is re-laid out, see _h_contiguous_up)
    return PackedStack(
        wd=down_weights[0] if one else torch.cat(down_weights, 0),
        bd=down_biases[0] if one else torch.cat(down_biases, 0),
        wu=_h_contiguous_up(up_weights),
        bu=up_biases[0].unsqueeze(0) if one else torch.stack(up_biases, 0),
        unit_owner=owner,
        unit_act=unit_act,
        scale=scale,
        offsets=offsets,
        lnb_w=stack(ln_before, 0),
        lnb_b=stack(ln_before, 1),
        lna_w=stack(ln_after, 0),
        lna_b=stack(ln_after, 1),
        host=PackedHost(tuple(offsets_host), tuple(codes), scales, trainable),
    )


def _h_contiguous_up(up_weights: list[torch.Tensor]) -> torch.Tensor:
    """The up weights as one (H, Rt) view of an (Rt, H)-contiguous copy: the kernels read Wu tiles along H, in
    aligned 16-byte vectors (along the unit axis a tile starts at an adapter's offset, of unknown alignment)."""
    if len(up_weights) == 1:
        return up_weights[0].t().contiguous().t()
    return torch.cat([w.t() for w in up_weights], 0).t()


def _build_unit_tables(ranks: tuple[int, ...], codes: tuple[int, ...], scales: tuple[float, ...], device):
    """Device tables (offsets, unit owner, unit activation, scale) from host lists (constants under dynamo)."""
    offsets, owner, unit_act = [0], [], []
    for a, (r, c) in enumerate(zip(ranks, codes, strict=True)):
        offsets.append(offsets[-1] + r)
        owner += [a] * r
        unit_act += [c] * r
    return (
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(owner, dtype=torch.int32, device=device),
        torch.tensor(unit_act, dtype=torch.int32, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
    )


_cached_unit_tables = functools.lru_cache(maxsize=256)(_build_unit_tables)


def _unit_tables(ranks: tuple[int, ...], codes: tuple[int, ...], scales: tuple[float, ...], device: torch.device):
    """Cached outside torch.compile: a host-to-device copy syncs the stream, and training re-packs every step."""
    if torch.compiler.is_compiling():
        return _build_unit_tables(ranks, codes, scales, device)
    return _cached_unit_tables(ranks, codes, scales, device)


# --------------------------------------------------------------------------------------------------- tuning
class _Tiles(NamedTuple):
    """Launch shape of the forward and level-backward kernels, chosen per call from the ranks (no autotuning)."""

    BLOCK_M: int  # rows per program
    BLOCK_H: int  # hidden chunk: K of the down-projection dot, N of the up-projection dot
    BLOCK_R: int  # unit tile of the down projection, >= the largest rank (up to 256): a block whose rows share
    # one adapter reads its level input once per level
    BLOCK_K: int  # unit sub-tile: K of the up-projection and dx dots
    num_warps: int
    num_stages: int

    def launch(self) -> dict:
        """Keyword arguments of a kernel launch (the GPU build may use up to 255 registers per thread)."""
        return _launch_kwargs(self)


@functools.lru_cache(maxsize=64)
def _launch_kwargs(tiles: _Tiles) -> dict:
    return {**tiles._asdict(), **({} if INTERPRET else {"maxnreg": 255})}


@functools.lru_cache(maxsize=64)
def _tiles(max_rank: int, big_inference: bool = False) -> _Tiles:
    """Tiles from the largest rank of a launch; ``big_inference``: a forward that saves nothing for the backward,
    over at least 4096 rows. The sm_90 builds' resource usage is pinned by tests/test_codegen.py (triton 3.9's
    ptxas, offline); nothing here was timed. Why these:

    - The dots run as mma.sync, where every warp holds the whole (BLOCK_M, K) A operand in registers: K (BLOCK_H,
      BLOCK_K) stays at 64. A 16x256 A operand alone costs 64 registers per thread; BLOCK_H 128 spilled.
    - BLOCK_R covers the rank, so the level input is read once per level, not once per 64 units (rank 256 read it
      4 times and ran 4x as many loop steps: 2.77 ms vs eager 0.61 ms at 4096 x 4096 on the first H100 run).
    - Every program streams all weights of its level from L2 (4 MB per level at hidden 4096, rank 256), so at wide
      ranks 32-row blocks halve that traffic; 4096 rows are then 128 programs, one wave at one program per SM.
      The saving forward and the backward keep 16 rows: at 32 they spill 32-80 bytes.
    - num_stages=2 lets Triton prefetch the tiles that feed the dots (cp.async) one loop step ahead.
    - ``maxnreg=255`` (see launch): left alone, ptxas capped some builds at 128 registers and spilled 16-96 bytes.
      Narrow ranks run 4 warps at <= 255 registers, two programs per SM, so 4096 rows (256 programs) fit in one
      wave on 132 SMs.
    """
    block_r = min(max(16, triton.next_power_of_2(max_rank)), 256)
    if INTERPRET:  # few programs, few loop steps: the interpreter's cost is per step, not per FLOP
        return _Tiles(32, 128, block_r, block_r, 4, 1)
    if block_r > 64:  # wide unit tiles: 8 warps split the (BLOCK_H, BLOCK_R) weight tile and the z accumulator
        return _Tiles(32 if big_inference else 16, 64, block_r, 64, 8, 2)
    return _Tiles(16, 64, block_r, block_r, 4, 2)


# --------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _tanh(x):
    # tanh via exp (libdevice tanh fails in the interpreter); exp of a non-positive number never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _activation(z, code):
    """Per-unit activation of the fp32 tile ``z`` (BLOCK_M, BLOCK_R); ``code`` (1, BLOCK_R) from ACTIVATIONS."""
    out = z
    out = tl.where(code == 1, tl.maximum(z, 0.0), out)
    out = tl.where(code == 2, 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), out)
    out = tl.where(code == 3, 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))), out)
    out = tl.where(code == 4, z * tl.sigmoid(z), out)
    out = tl.where(code == 5, _tanh(z), out)
    return out


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b: fp32 operands (bf16 in the interpreter, fp32 weights) or a cast to the weights' half dtype
    ``b.dtype`` (tensor cores; products exact in fp32, fp32 accumulation)."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a.to(b.dtype), b, acc)
    return out


@triton.jit
def _load_ln(lnw_ptr, lnb_ptr, cols, cmask, IN_LN: tl.constexpr):
    """The model LN's weight and bias over ``cols`` in fp32 (zeros when the level input is not LayerNormed)."""
    if IN_LN:
        lnw = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        lnw = tl.zeros(cols.shape, dtype=tl.float32)
        lnb = tl.zeros(cols.shape, dtype=tl.float32)
    return lnw, lnb


@triton.jit
def _level_input(r, y, mean, rstd, lnw, lnb, IN_ADD_Y: tl.constexpr, IN_LN: tl.constexpr):
    """The adapter input x_i (fp32 tile) from r_(i-1) and y; returns (x, t) where t = r + y when IN_ADD_Y."""
    if IN_ADD_Y:
        t = r + y
        if IN_LN:
            x = (t - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
        else:
            x = t
    else:
        t = r
        x = r
    return x, t


@triton.jit
def _down_tile(
    src_ptr, y_ptr, wd_ptr, lnw_ptr, lnb_ptr,
    rows, rmask, units, umask, mean, rstd, H,
    stride_sm, stride_sh, stride_ym, stride_yh, stride_wdr, stride_wdh,
    PARALLEL: tl.constexpr, IN_ADD_Y: tl.constexpr, IN_LN: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """z = x_i @ Wd[units]^T, (BLOCK_M, BLOCK_R) fp32, streaming the level input over hidden chunks; ``src``
    holds r_(i-1) (h, or the fp32 scratch)."""
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        cols = k0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        if PARALLEL:
            x = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0)
            x = x.to(tl.float32)
        else:
            r = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sh, mask=m2, other=0.0)
            r = r.to(tl.float32)
            if IN_ADD_Y:
                y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0)
                y = y.to(tl.float32)
            else:
                y = r
            lnw, lnb = _load_ln(lnw_ptr, lnb_ptr, cols, cmask, IN_LN)
            x, t = _level_input(r, y, mean, rstd, lnw, lnb, IN_ADD_Y, IN_LN)
            x = tl.where(m2, x, 0.0)
        wdt = tl.load(
            wd_ptr + units[None, :] * stride_wdr + cols[:, None] * stride_wdh,
            mask=umask[None, :] & cmask[:, None],
            other=0.0,
        )  # (BLOCK_H, BLOCK_R) = Wd^T slice
        z = _mma(x, wdt, z, DOT_FP32, PRECISION)
    return z


@triton.jit
def _act_tile(
    z, bd_ptr, code_ptr, owner_ptr, scale_ptr, zs_ptr, rows, rmask, units, umask, aid, Rt, SAVE: tl.constexpr
):
    """Bias, saved pre-activation, activation, scale and the per-(row, unit) mask ``owner == route`` of one tile."""
    z += tl.load(bd_ptr + units, mask=umask, other=0.0).to(tl.float32)[None, :]
    if SAVE:
        tl.store(zs_ptr + rows[:, None] * Rt + units[None, :], z, mask=rmask[:, None] & umask[None, :])
    code = tl.load(code_ptr + units, mask=umask, other=0)
    owner = tl.load(owner_ptr + units, mask=umask, other=-2)
    sc = tl.load(scale_ptr + owner, mask=umask, other=0.0)
    act = _activation(z, code[None, :]) * sc[None, :]
    return tl.where(owner[None, :] == aid[:, None], act, 0.0)


@triton.jit
def _bottleneck_stack_fwd_kernel(
    # pointers
    h_ptr,  # h: (M, H) sublayer projection output = r_0
    y_ptr,  # y: (M, H) sublayer residual input (unused when no option reads it)
    out_ptr,  # out: (M, H)
    r_ptr,  # scratch: (M, H) fp32 running r, contiguous
    a_ptr,  # scratch: (M, Rt rounded up to BLOCK_R) masked, scaled activations of one level in the dot operand
    # dtype; column j = unit lo + j of the row's block (aligned, contiguous vectors)
    wd_ptr,  # wd: (Rt, H)
    bd_ptr,  # bd: (Rt,)
    wu_ptr,  # wu: (H, Rt)
    bu_ptr,  # bu: (A, H)
    owner_ptr,  # (Rt,) int32 adapter of each unit
    code_ptr,  # (Rt,) int32 activation code of each unit
    scale_ptr,  # (A,) fp32 scaling of each adapter
    off_ptr,  # (A+1,) int32 first unit of each adapter
    routes_ptr,  # routes: (M, NUM_LEVELS) int32 adapter index per row and level, -1 = off
    lnw_ptr,  # model LN weight (H,)
    lnb_ptr,  # model LN bias (H,)
    rs_ptr,  # saved for backward (SAVE): (NUM_LEVELS, M, H) r_1..r_n in h's dtype, contiguous
    zs_ptr,  # saved (SAVE): (NUM_LEVELS, M, Rt) fp32 pre-activations, zero-initialised, contiguous
    st_ptr,  # saved (SAVE): (NUM_LEVELS + 1, 2, M) fp32 mean and rstd of r_i + y, contiguous
    # sizes
    M,
    H,
    Rt,
    eps,
    # strides
    stride_hm, stride_hh, stride_ym, stride_yh, stride_om, stride_oh,
    stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_bua, stride_buh,
    stride_rtm, stride_rtl, stride_am,
    # compile-time switches
    NUM_LEVELS: tl.constexpr,
    PARALLEL: tl.constexpr,  # par_bn: every level reads y
    IN_ADD_Y: tl.constexpr,  # original_ln_before: level input is r + y
    IN_LN: tl.constexpr,  # ... LayerNormed with the model LN
    RES_MODE: tl.constexpr,  # 0: residual r_(i-1), 1: t_i (post_add), 2: x_i (residual_before_ln=False)
    OUT_ADD_Y: tl.constexpr,  # original_ln_after: output r_n + y
    OUT_LN: tl.constexpr,  # ... LayerNormed with the model LN
    SAVE: tl.constexpr,  # keep r_i, z_i and the LN moments for the backward kernel
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # unit tile of pass Z, >= the largest rank (see _tiles): one tile per shared adapter
    BLOCK_K: tl.constexpr,  # unit sub-tile of pass U
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # moments of r_0 + y when the first level's input or a depth-0 output is LayerNormed
    if IN_LN or (OUT_LN and NUM_LEVELS == 0):
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            m2 = rmask[:, None] & (cols < H)[None, :]
            t = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hh, mask=m2, other=0.0).to(
                tl.float32
            ) + tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0).to(
                tl.float32
            )
            s1 += tl.sum(t, 1)
            s2 += tl.sum(t * t, 1)
        mean = s1 / H
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / H - mean * mean, 0.0) + eps)
        if SAVE:
            tl.store(st_ptr + rows, mean, mask=rmask)
            tl.store(st_ptr + M + rows, rstd, mask=rmask)

    for lvl in tl.static_range(NUM_LEVELS):
        aid = tl.load(routes_ptr + rows * stride_rtm + lvl * stride_rtl, mask=rmask, other=-1)
        on = aid >= 0
        aid_safe = tl.where(on, aid, 0)
        lo = tl.min(tl.load(off_ptr + aid_safe, mask=on, other=1 << 30), 0)
        hi = tl.max(tl.load(off_ptr + aid_safe + 1, mask=on, other=0), 0)
        # the level input r_(i-1): h at the first level, then the fp32 scratch
        if lvl == 0:
            src_ptr, stride_sm, stride_sh = h_ptr, stride_hm, stride_hh
        else:
            src_ptr, stride_sm, stride_sh = r_ptr, H, 1
        # ---- pass Z: bottleneck activations of the units this block's rows use (one BLOCK_R tile when they
        # share one adapter), parked in the a scratch
        for j0 in range(0, hi - lo, BLOCK_R):  # j: unit index relative to lo (aligned scratch columns)
            units = lo + j0 + tl.arange(0, BLOCK_R)
            umask = units < hi
            z = _down_tile(src_ptr, y_ptr, wd_ptr, lnw_ptr, lnb_ptr, rows, rmask, units, umask, mean, rstd, H,
                           stride_sm, stride_sh, stride_ym, stride_yh, stride_wdr, stride_wdh,
                           PARALLEL, IN_ADD_Y, IN_LN, DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R)  # fmt: skip
            act = _act_tile(z, bd_ptr, code_ptr, owner_ptr, scale_ptr, zs_ptr + lvl * M * Rt, rows, rmask, units,
                            umask, aid, Rt, SAVE)  # fmt: skip
            # whole tiles (units past hi hold exact zeros), so pass U's loads need no per-unit mask
            a_offs = rows[:, None] * stride_am + (j0 + tl.arange(0, BLOCK_R))[None, :]
            tl.store(a_ptr + a_offs, act.to(a_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.debug_barrier()
        # ---- pass U: up-projection (K sub-tiles of BLOCK_K units: a wide A operand would sit in every warp's
        # registers), residual, new r (or the output), moments of r_i + y
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sc_row = tl.load(scale_ptr + aid_safe, mask=on, other=0.0)
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, hi - lo, BLOCK_K):
                units = lo + j0 + tl.arange(0, BLOCK_K)
                umask = units < hi
                act = tl.load(a_ptr + rows[:, None] * stride_am + (j0 + tl.arange(0, BLOCK_K))[None, :],
                              mask=rmask[:, None], other=0.0)  # fmt: skip
                wut = tl.load(
                    wu_ptr + cols[None, :] * stride_wuh + units[:, None] * stride_wur,
                    mask=umask[:, None] & cmask[None, :],
                    other=0.0,
                )  # (BLOCK_K, BLOCK_H) = Wu^T slice, contiguous along H (see pack_adapters)
                acc = _mma(act, wut, acc, DOT_FP32, PRECISION)
            bu = tl.load(
                bu_ptr + aid_safe[:, None] * stride_bua + cols[None, :] * stride_buh, mask=on[:, None] & m2, other=0.0
            )
            u = acc + bu.to(tl.float32) * sc_row[:, None]
            r = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sh, mask=m2, other=0.0)
            r = r.to(tl.float32)
            if (PARALLEL or IN_ADD_Y) or OUT_ADD_Y:  # pairs: older Triton rejects chained boolean operators
                y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0)
                y = y.to(tl.float32)
            else:
                y = r
            if PARALLEL:
                new = r + u
            elif RES_MODE == 0:
                new = r + u
            else:
                lnw, lnb = _load_ln(lnw_ptr, lnb_ptr, cols, cmask, IN_LN)
                x, t = _level_input(r, y, mean, rstd, lnw, lnb, IN_ADD_Y, IN_LN)
                if RES_MODE == 1:
                    new = t + u
                else:
                    new = x + u
            new = tl.where(on[:, None], new, r)
            if SAVE:
                rs_offs = lvl * M * H + rows[:, None] * H + cols[None, :]
                tl.store(rs_ptr + rs_offs, new.to(rs_ptr.dtype.element_ty), mask=m2)
            if (lvl == NUM_LEVELS - 1) and not OUT_LN:  # last level writes the output directly
                if OUT_ADD_Y:
                    new = new + y
                tl.store(
                    out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oh,
                    new.to(out_ptr.dtype.element_ty),
                    mask=m2,
                )
            else:
                tl.store(r_ptr + rows[:, None] * H + cols[None, :], new, mask=m2)
                if IN_LN or OUT_LN:
                    t = tl.where(m2, new + y, 0.0)
                    s1 += tl.sum(t, 1)
                    s2 += tl.sum(t * t, 1)
        tl.debug_barrier()
        if IN_LN or OUT_LN:
            mean = s1 / H
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / H - mean * mean, 0.0) + eps)
            if SAVE:
                tl.store(st_ptr + (lvl + 1) * 2 * M + rows, mean, mask=rmask)
                tl.store(st_ptr + (lvl + 1) * 2 * M + M + rows, rstd, mask=rmask)

    # ---- final pass: output LayerNorm (or depth 0), one store
    if OUT_LN or NUM_LEVELS == 0:
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            if NUM_LEVELS == 0:
                r = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hh, mask=m2, other=0.0)
            else:
                r = tl.load(r_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
            v = r.to(tl.float32)
            if OUT_ADD_Y:
                v += tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0).to(
                    tl.float32
                )
                if OUT_LN:
                    lnw = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    lnb = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    v = (v - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
            tl.store(
                out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oh, v.to(out_ptr.dtype.element_ty), mask=m2
            )


@triton.jit
def _activation_grad(z, code):
    """d act / d z per unit (codes as :func:`_activation`); relu' = 1 where z > 0, as torch."""
    d = tl.full(z.shape, 1.0, tl.float32)
    d = tl.where(code == 1, tl.where(z > 0, 1.0, 0.0), d)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    d = tl.where(code == 2, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327, d)
    th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    dnew = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    d = tl.where(code == 3, dnew, d)
    sg = tl.sigmoid(z)
    d = tl.where(code == 4, sg + z * sg * (1.0 - sg), d)
    tz = _tanh(z)
    d = tl.where(code == 5, 1.0 - tz * tz, d)
    return d


@triton.jit
def _bottleneck_out_bwd_kernel(
    dout_ptr,  # dL/dout: (M, H)
    rn_ptr,  # r_n: (M, H)
    y_ptr,  # y: (M, H)
    g_ptr,  # out: dL/dr_n (M, H) fp32, contiguous
    dy_ptr,  # out: dL/dy so far (M, H) fp32, contiguous
    lnw_ptr,  # model LN weight (H,)
    st_ptr,  # (2, M) fp32 mean, rstd of r_n + y
    pw_ptr,  # out (LN_GRAD): (programs, H) fp32 per-program partial sums of dout * vhat
    pb_ptr,  # out (LN_GRAD): (programs, H) fp32 per-program partial sums of dout
    M, H,
    stride_dm, stride_dh, stride_rm, stride_rh, stride_ym, stride_yh,
    OUT_ADD_Y: tl.constexpr,
    OUT_LN: tl.constexpr,
    LN_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Through the output: out = LN(v), v = r_n + y: dv = rstd * (d*w - mean(d*w) - vhat * mean(d*w*vhat))."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if OUT_LN:
        mean = tl.load(st_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(st_ptr + M + rows, mask=rmask, other=0.0)
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            d = tl.load(dout_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dh, mask=m2, other=0.0)
            v = tl.load(rn_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rh, mask=m2, other=0.0)
            v = v.to(tl.float32) + tl.load(
                y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0
            ).to(tl.float32)
            dw = d.to(tl.float32) * tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            s1 += tl.sum(dw, 1)
            s2 += tl.sum(dw * (v - mean[:, None]) * rstd[:, None], 1)
    for k0 in range(0, H, BLOCK_H):
        cols = k0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        d = tl.load(dout_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dh, mask=m2, other=0.0)
        d = d.to(tl.float32)
        if OUT_LN:
            v = tl.load(rn_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rh, mask=m2, other=0.0)
            v = v.to(tl.float32) + tl.load(
                y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0
            ).to(tl.float32)
            vhat = (v - mean[:, None]) * rstd[:, None]
            if LN_GRAD:
                tl.store(pw_ptr + pid * H + cols, tl.sum(tl.where(m2, d * vhat, 0.0), 0), mask=cmask)
                tl.store(pb_ptr + pid * H + cols, tl.sum(d, 0), mask=cmask)
            dw = d * tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            d = rstd[:, None] * (dw - s1[:, None] / H - vhat * s2[:, None] / H)
        tl.store(g_ptr + rows[:, None] * H + cols[None, :], d, mask=m2)
        if OUT_ADD_Y:
            tl.store(dy_ptr + rows[:, None] * H + cols[None, :], d, mask=m2)
        else:
            tl.store(dy_ptr + rows[:, None] * H + cols[None, :], tl.zeros_like(d), mask=m2)


@triton.jit
def _bottleneck_level_bwd_kernel(
    g_ptr,  # in: dL/dr_i, out: dL/dr_(i-1); (M, H) fp32, contiguous
    dy_ptr,  # dL/dy, accumulated: (M, H) fp32, contiguous
    rp_ptr,  # r_(i-1): (M, H)
    y_ptr,  # y: (M, H)
    z_ptr,  # z_i: (M, Rt) fp32, contiguous
    dz_ptr,  # out: dL/dz_i (M, Rt) fp32, contiguous, zero-initialised (units outside a block's range stay 0)
    x_ptr,  # out (NEED_X): the level input x_i (M, H), contiguous
    wd_ptr,  # wd: (Rt, H)
    wu_ptr,  # wu: (H, Rt)
    owner_ptr, code_ptr, scale_ptr, off_ptr,  # (Rt,), (Rt,), (A,), (A+1,)
    route_ptr,  # this level's column of routes: (M,) int32 with stride stride_rtm
    lnw_ptr, lnb_ptr,  # model LN (H,)
    st_ptr,  # (2, M) fp32 mean, rstd of t_i = r_(i-1) + y
    pw_ptr,  # out (LN_GRAD): (programs, H) fp32 per-program partial sums of dx * that over routed rows
    pb_ptr,  # out (LN_GRAD): (programs, H) fp32 per-program partial sums of dx over routed rows
    M, H, Rt,
    stride_rpm, stride_rph, stride_ym, stride_yh,
    stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_rtm,
    PARALLEL: tl.constexpr,
    IN_ADD_Y: tl.constexpr,
    IN_LN: tl.constexpr,
    RES_MODE: tl.constexpr,
    NEED_X: tl.constexpr,
    LN_GRAD: tl.constexpr,  # the model LN's weight/bias want gradients
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # unit tile of pass 1 (see _tiles)
    BLOCK_K: tl.constexpr,  # unit sub-tile of the dx dots
):  # fmt: skip
    """One level backward (see _stack_backward): dz = s g Wu * act'(z); dx = dz Wd (+ g if res = x);
    through the input LN; g_(i-1) = g (res = r) + dt; dy += dt. Rows whose level is off pass g through."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    aid = tl.load(route_ptr + rows * stride_rtm, mask=rmask, other=-1)
    on = aid >= 0
    aid_safe = tl.where(on, aid, 0)
    lo = tl.min(tl.load(off_ptr + aid_safe, mask=on, other=1 << 30), 0)
    hi = tl.max(tl.load(off_ptr + aid_safe + 1, mask=on, other=0), 0)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IN_LN:
        mean = tl.load(st_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(st_ptr + M + rows, mask=rmask, other=0.0)
    # ---- pass 1: dz over the units this block's rows use
    for u0 in range(lo, hi, BLOCK_R):
        units = u0 + tl.arange(0, BLOCK_R)
        umask = units < hi
        da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            g = tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            wut = tl.load(
                wu_ptr + cols[:, None] * stride_wuh + units[None, :] * stride_wur,
                mask=cmask[:, None] & umask[None, :],
                other=0.0,
            )  # (BLOCK_H, BLOCK_R) slice of Wu
            da = _mma(g, wut, da, DOT_FP32, PRECISION)
        zmask = rmask[:, None] & umask[None, :]
        z = tl.load(z_ptr + rows[:, None] * Rt + units[None, :], mask=zmask, other=0.0)
        code = tl.load(code_ptr + units, mask=umask, other=0)
        owner = tl.load(owner_ptr + units, mask=umask, other=-2)
        sc = tl.load(scale_ptr + owner, mask=umask, other=0.0)
        dz = da * sc[None, :] * _activation_grad(z, code[None, :])
        dz = tl.where(owner[None, :] == aid[:, None], dz, 0.0)
        tl.store(dz_ptr + rows[:, None] * Rt + units[None, :], dz, mask=zmask)
    tl.debug_barrier()
    # ---- pass 2: row moments of the gradient entering the input LayerNorm
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IN_LN and not PARALLEL:
        for k0 in range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            dx = _level_dx(dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
                           DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_K)  # fmt: skip
            if RES_MODE == 2:
                dx += tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
            t = tl.load(rp_ptr + rows[:, None] * stride_rpm + cols[None, :] * stride_rph, mask=m2, other=0.0)
            t = t.to(tl.float32) + tl.load(
                y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0
            ).to(tl.float32)
            dw = dx * tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            s1 += tl.sum(dw, 1)
            s2 += tl.sum(tl.where(m2, dw * (t - mean[:, None]) * rstd[:, None], 0.0), 1)
        tl.debug_barrier()  # pass 3 overwrites g, which pass 2 read
    # ---- pass 3: dL/dr_(i-1), dL/dy, and x_i for the weight gradients
    for k0 in range(0, H, BLOCK_H):
        cols = k0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
        dx = _level_dx(dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
                       DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_K)  # fmt: skip
        r = tl.load(rp_ptr + rows[:, None] * stride_rpm + cols[None, :] * stride_rph, mask=m2, other=0.0)
        r = r.to(tl.float32)
        if PARALLEL or IN_ADD_Y:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=m2, other=0.0)
            y = y.to(tl.float32)
        else:
            y = r
        lnw, lnb = _load_ln(lnw_ptr, lnb_ptr, cols, cmask, IN_LN)
        if PARALLEL:
            gp = g
            dy_add = dx
            x = y
        else:
            if RES_MODE == 2:
                dx += g
            x, t = _level_input(r, y, mean, rstd, lnw, lnb, IN_ADD_Y, IN_LN)
            if IN_ADD_Y:
                if IN_LN:
                    that = (t - mean[:, None]) * rstd[:, None]
                    dt = rstd[:, None] * (dx * lnw[None, :] - s1[:, None] / H - that * s2[:, None] / H)
                    if LN_GRAD:
                        routed = on[:, None] & m2
                        tl.store(pw_ptr + pid * H + cols, tl.sum(tl.where(routed, dx * that, 0.0), 0), mask=cmask)
                        tl.store(pb_ptr + pid * H + cols, tl.sum(tl.where(routed, dx, 0.0), 0), mask=cmask)
                else:
                    dt = dx
                if RES_MODE == 1:
                    dt += g
                if RES_MODE == 0:
                    gp = dt + g
                else:
                    gp = dt
                dy_add = dt
            else:
                if RES_MODE == 0:
                    gp = dx + g
                else:
                    gp = dx
                dy_add = tl.zeros_like(dx)
        gp = tl.where(on[:, None], gp, g)
        tl.store(g_ptr + rows[:, None] * H + cols[None, :], gp, mask=m2)
        if PARALLEL or IN_ADD_Y:
            dy_old = tl.load(dy_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
            tl.store(dy_ptr + rows[:, None] * H + cols[None, :], dy_old + tl.where(on[:, None], dy_add, 0.0), mask=m2)
        if NEED_X:
            tl.store(x_ptr + rows[:, None] * H + cols[None, :], x.to(x_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _level_dx(dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """dx[:, cols] = dz @ Wd[:, cols] over the units [lo, hi): (BLOCK_M, BLOCK_H) fp32."""
    dx = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for u0 in range(lo, hi, BLOCK_R):
        units = u0 + tl.arange(0, BLOCK_R)
        umask = units < hi
        dz = tl.load(dz_ptr + rows[:, None] * Rt + units[None, :], mask=rmask[:, None] & umask[None, :], other=0.0)
        wd = tl.load(
            wd_ptr + units[:, None] * stride_wdr + cols[None, :] * stride_wdh,
            mask=umask[:, None] & cmask[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_H)
        dx = _mma(dz, wd, dx, DOT_FP32, PRECISION)
    return dx


# --------------------------------------------------------------------------------------------------- launcher
@functools.lru_cache(maxsize=256)
def _flags(options: StackOptions, has_ln: bool) -> dict:
    """Compile-time switches of the kernel from the structural options (see the module docstring)."""
    in_add_y = options.original_ln_before and not options.is_parallel
    in_ln = in_add_y and has_ln
    if options.is_parallel or options.residual_before_ln is True:
        res_mode = 0
    elif options.residual_before_ln == "post_add":
        res_mode = 1 if in_ln else 0  # AdapterHub only re-points the residual when the model LN runs
    else:
        res_mode = 2
    out_add_y = options.original_ln_after
    return {
        "PARALLEL": options.is_parallel,
        "IN_ADD_Y": in_add_y,
        "IN_LN": in_ln,
        "RES_MODE": res_mode,
        "OUT_ADD_Y": out_add_y,
        "OUT_LN": out_add_y and has_ln,
    }


def _needs_y(options: StackOptions) -> bool:
    return options.is_parallel or options.original_ln_before or options.original_ln_after


def _check(h, y, ln_weight, ln_bias, packed: PackedStack, routes, options: StackOptions) -> None:
    check_float_dtype("h", h)
    hidden = h.shape[-1]
    if y is None and _needs_y(options):
        raise ValueError(f"y (the sublayer's residual input) is required by these options: {options}")
    if y is not None and y.shape != h.shape:
        raise ValueError(f"y must have h's shape {tuple(h.shape)}, got {tuple(y.shape)}")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("pass both the model LayerNorm's weight and bias, or neither")
    if ln_weight is not None and (ln_weight.shape != (hidden,) or ln_bias.shape != (hidden,)):
        raise ValueError(
            f"LayerNorm weight/bias must be ({hidden},), got {tuple(ln_weight.shape)}/{tuple(ln_bias.shape)}"
        )
    if packed.wd.shape[1] != hidden or packed.wu.shape[0] != hidden or packed.bu.shape[1] != hidden:
        raise ValueError(
            f"adapters built for hidden {packed.wd.shape[1]} cannot run on activations of hidden {hidden} "
            f"(h {tuple(h.shape)})"
        )
    if routes.dim() != 2 or routes.shape[0] != h.numel() // hidden:
        raise ValueError(f"routes must be (rows={h.numel() // hidden}, levels), got {tuple(routes.shape)}")
    if routes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routes must be an integer tensor, got {routes.dtype}")
    if options.ln_before != (packed.lnb_w is not None) or options.ln_after != (packed.lna_w is not None):
        raise ValueError("options.ln_before/ln_after must match the packed adapters' own LayerNorm parameters")
    check_same_device(h=h, y=y, ln_weight=ln_weight, wd=packed.wd, routes=routes)


class _Saved(NamedTuple):
    rs: torch.Tensor  # (L, M, H) r_1..r_n in h's dtype
    zs: torch.Tensor  # (L, M, Rt) fp32 pre-activations (zero outside each row block's units)
    stats: torch.Tensor  # (L + 1, 2, M) fp32 mean, rstd of r_i + y (when a model LN runs)


def _max_rank(offsets) -> int:
    return max((b - a for a, b in zip(offsets, offsets[1:])), default=1)


def _launch_fwd(
    h, y, ln_weight, ln_bias, packed: PackedStack, routes, options: StackOptions, save: bool, max_rank: int
):  # fmt: skip
    """One kernel launch (plus the zeroed z buffer when saving for the backward); ``max_rank`` picks the tiles."""
    hidden = h.shape[-1]
    h2 = h.reshape(-1, hidden)
    y2 = y.reshape(-1, hidden) if y is not None else h2
    m, levels = h2.shape[0], routes.shape[1]
    dev = h.device
    # The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even): there, store fp32 and
    # let torch round once.
    round_in_torch = dev.type == "cpu" and h.dtype != torch.float32
    out = torch.empty(h2.shape, device=dev, dtype=torch.float32 if round_in_torch else h.dtype)
    rt = packed.wd.shape[0]
    flags = _flags(options, ln_weight is not None)
    dot_fp32, precision = _dot_mode(h, packed.wd)
    tiles = _tiles(max_rank, not save and m >= 4096)
    scratch_r = torch.empty((m, hidden) if levels > 0 else (1, 1), device=dev, dtype=torch.float32)
    # activations in the dot operand dtype (the dot rounds them to it anyway), in whole unit tiles
    a_cols = -(-rt // tiles.BLOCK_R) * tiles.BLOCK_R
    scratch_a = torch.empty((m, a_cols) if levels > 0 else (1, 16), device=dev,
                            dtype=torch.float32 if dot_fp32 else packed.wu.dtype)  # fmt: skip
    if save:
        saved = _Saved(
            torch.empty((levels, m, hidden), device=dev, dtype=torch.float32 if round_in_torch else h.dtype),
            torch.zeros((levels, m, rt), device=dev, dtype=torch.float32),
            torch.empty((levels + 1, 2, m), device=dev, dtype=torch.float32),
        )
    else:
        saved = _Saved(scratch_r, scratch_r, scratch_r)  # dummy pointers, never touched without SAVE
    if routes.dtype != torch.int32:
        routes = routes.to(torch.int32)
    lnw = ln_weight if ln_weight is not None else h2  # dummy pointers, never read without IN_LN/OUT_LN
    lnb = ln_bias if ln_bias is not None else h2
    if m == 0:
        return out.to(h.dtype).reshape(h.shape), saved
    _bottleneck_stack_fwd_kernel[(-(-m // tiles.BLOCK_M),)](
        h2, y2, out, scratch_r, scratch_a,
        packed.wd, packed.bd, packed.wu, packed.bu,
        packed.unit_owner, packed.unit_act, packed.scale, packed.offsets,
        routes, lnw, lnb, saved.rs, saved.zs, saved.stats,
        m, hidden, rt, float(options.eps),
        h2.stride(0), h2.stride(1), y2.stride(0), y2.stride(1), out.stride(0), out.stride(1),
        packed.wd.stride(0), packed.wd.stride(1), packed.wu.stride(0), packed.wu.stride(1),
        packed.bu.stride(0), packed.bu.stride(1),
        routes.stride(0), routes.stride(1), scratch_a.stride(0),
        NUM_LEVELS=levels, SAVE=save, DOT_FP32=dot_fp32, PRECISION=precision, **flags, **tiles.launch(),
    )  # fmt: skip
    return (out.to(h.dtype) if round_in_torch else out).reshape(h.shape), saved


def _dot_mode(h: torch.Tensor, w: torch.Tensor) -> tuple[bool, str]:
    """(fp32 operands?, input_precision). Native half operands on the GPU; the interpreter's bf16 dot is wrong
    (fp32 there) but its fp16 dot is right, so fp16 weights exercise the native-operand path in the CPU tier."""
    dot_fp32 = w.dtype == torch.float32 or (dot_in_fp32(h) and w.dtype == torch.bfloat16)
    precision = "tf32x3" if (h.device.type == "cuda" and w.dtype == torch.float32) else "ieee"
    return dot_fp32, precision


def bottleneck_stack_fwd(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions,
) -> torch.Tensor:
    """Triton forward. h, y: (..., H); routes: (rows, L) int, -1 = level off; returns (..., H) in h's dtype."""
    if options.ln_before or options.ln_after:
        raise ValueError("the adapters' own ln_before/ln_after run on the torch path (bottleneck_stack_ref)")
    offsets = packed.host.offsets if packed.host is not None else packed.offsets.tolist()
    return _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, save=False, max_rank=_max_rank(offsets))[0]


# --------------------------------------------------------------------------------------------------- reference
_TORCH_ACTS = {
    0: lambda z: z,
    1: torch.relu,
    2: F.gelu,
    3: lambda z: F.gelu(z, approximate="tanh"),
    4: F.silu,
    5: torch.tanh,
}


def bottleneck_stack_ref(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions,
) -> torch.Tensor:
    """Torch twin of :func:`bottleneck_stack_fwd` (fp32 math, differentiable), mirroring AdapterHub's order."""
    hidden = h.shape[-1]
    hf = h.reshape(-1, hidden).float()
    yf = y.reshape(-1, hidden).float() if y is not None else None
    has_ln = ln_weight is not None
    flags = _flags(options, has_ln)
    lnw = ln_weight.float() if has_ln else None
    lnb = ln_bias.float() if has_ln else None
    if packed.host is not None:
        offsets, scales = list(packed.host.offsets), list(packed.host.scales)
        codes = [c for c, lo, hi in zip(packed.host.codes, offsets, offsets[1:], strict=False) for _ in range(hi - lo)]
    else:
        offsets, codes, scales = packed.offsets.tolist(), packed.unit_act.tolist(), packed.scale.tolist()

    def model_ln(v):
        return F.layer_norm(v, (hidden,), lnw, lnb, options.eps)

    def own_ln(v, w, b, a):
        return F.layer_norm(v, (hidden,), w[a].float(), b[a].float(), options.adapter_ln_eps)

    def adapter(v, a):  # s_a * (act(v Wd^T + bd) Wu^T + bu)
        lo, hi = offsets[a], offsets[a + 1]
        if options.ln_before:
            v = own_ln(v, packed.lnb_w, packed.lnb_b, a)
        z = v @ packed.wd[lo:hi].float().t() + packed.bd[lo:hi].float()
        up = _TORCH_ACTS[codes[lo]](z) @ packed.wu[:, lo:hi].float().t() + packed.bu[a].float()
        return up * scales[a]

    r = hf
    for lvl in range(routes.shape[1]):
        col = routes[:, lvl]
        new = r
        for a in sorted(set(col.tolist()) - {-1}):
            if a < 0 or a + 1 >= len(offsets):
                raise ValueError(f"route {a} at level {lvl} does not name one of the {len(offsets) - 1} adapters")
            if flags["PARALLEL"]:
                u = adapter(yf, a)
                cand = r + (own_ln(u, packed.lna_w, packed.lna_b, a) if options.ln_after else u)
            else:
                t = r + yf if flags["IN_ADD_Y"] else r
                x = model_ln(t) if flags["IN_LN"] else t
                res = (r, t, x)[flags["RES_MODE"]]
                u = adapter(x, a)
                if options.adapter_residual_before_ln:
                    cand = res + u
                    cand = own_ln(cand, packed.lna_w, packed.lna_b, a) if options.ln_after else cand
                else:
                    cand = res + (own_ln(u, packed.lna_w, packed.lna_b, a) if options.ln_after else u)
            sel = col == a
            new = cand if bool(sel.all()) else torch.where(sel[:, None], cand, new)
        r = new
    if flags["OUT_ADD_Y"]:
        r = r + yf
        if flags["OUT_LN"]:
            r = model_ln(r)
    return r.to(h.dtype).reshape(h.shape)


# --------------------------------------------------------------------------------------------------- autograd
@functools.lru_cache(maxsize=1024)
def _encode_host(options: StackOptions, host: PackedHost, train_levels: tuple[tuple[int, ...], ...]) -> str:
    """The host-side facts as one string argument of the custom ops: integer-list arguments (SymInt[]) were
    seen to fail intermittently in torch 2.13's argument parsing ("vector::reserve") before the op ran."""
    res = {True: 0, "post_add": 1, False: 2}[options.residual_before_ln]
    structure = [int(options.is_parallel), int(options.original_ln_before), int(options.original_ln_after), res]
    fields = [
        structure,
        [options.eps],
        list(host.offsets),
        list(host.codes),
        list(host.scales),
        [len(t) for t in train_levels],
        [a for t in train_levels for a in t],
    ]
    return ";".join(",".join(repr(v) for v in f) for f in fields)


@functools.lru_cache(maxsize=1024)
def _decode_host(meta: str):
    """(options, offsets, codes, scales, train_levels) from :func:`_encode_host`'s string."""
    structure, eps, offsets, codes, scales, counts, flat = (
        [x for x in field.split(",") if x] for field in meta.split(";")
    )
    par, before, after, res = (int(x) for x in structure)
    residual = {0: True, 1: "post_add", 2: False}[res]
    options = StackOptions(bool(par), bool(before), bool(after), residual, eps=float(eps[0]))
    flat = [int(x) for x in flat]
    train_levels, start = [], 0
    for count in (int(x) for x in counts):
        train_levels.append(flat[start : start + count])
        start += count
    return options, [int(x) for x in offsets], [int(x) for x in codes], [float(x) for x in scales], train_levels


def _stack_backward(
    grad_out, h, y, lnw, lnb, wd, bd, wu, bu, tables, routes, rs, zs, stats, options: StackOptions,
    host_offsets, host_codes, host_scales, train_levels, needs,
):  # fmt: skip
    """Gradients with one out-LN kernel and one kernel per level (top to bottom), weight gradients by cuBLAS.

    With ``g_i = dL/dr_i`` per row (the forward kept r_1..r_n, the pre-activations z_i and the LN moments)::

        out = LN(v), v = r_n + y:   g_n = rstd (d w - mean(d w) - vhat mean(d w vhat)),  dy = g_n
        u_i = s (act(z_i) Wu^T + bu), z_i = x_i Wd^T + bd:
            dWu += s g_i^T act(z_i),  dbu += s sum_rows g_i,  dz_i = s (g_i Wu) * act'(z_i)
            dWd += dz_i^T x_i,  dbd += sum_rows dz_i,  dx_i = dz_i Wd (+ g_i when the residual is x_i)
        x_i = LN(t_i), t_i = r_(i-1) + y:  dt_i = rstd (dx w - mean(dx w) - that mean(dx w that)) (+ g_i when
            the residual is t_i);  g_(i-1) = g_i (residual r_(i-1)) + dt_i;  dy += dt_i
        parallel: x_i = y:  g_(i-1) = g_i,  dy += dx_i;   rows whose level is off: g_(i-1) = g_i

    Weight sums run over the rows routed to each adapter (the kernel masks dz per row, ``act`` is masked here).
    One row-block kernel per level does the g/dz/dx/LN chain; the weight gradients are cuBLAS GEMMs over
    (M, r) x (M, H) for the adapters that train only, so frozen levels cost no weight-gradient work.
    ``tables`` = (unit_owner, unit_act, scale, offsets) on the device; ``train_levels[lvl]`` = indices of the
    adapters used at that level whose weights train; ``needs`` = (h, y, ln_weight, ln_bias, wd, bd, wu, bu). The
    model LN's gradients (dw = sum dout * vhat, db = sum dout at the output; sum dx * that, sum dx at each level
    input over the routed rows) come from per-program partial column sums written by the kernels."""
    unit_owner, unit_act, scale, offsets = tables
    hidden = h.shape[-1]
    h2 = h.reshape(-1, hidden)
    y2 = y.reshape(-1, hidden) if y is not None else h2
    m, levels, rt = h2.shape[0], routes.shape[1], wd.shape[0]
    flags = _flags(options, lnw is not None)
    dev = h.device
    g = torch.empty((m, hidden), device=dev, dtype=torch.float32)
    dy = torch.empty_like(g)
    dout = grad_out.reshape(-1, hidden).contiguous()
    rn = rs[levels - 1] if levels > 0 else h2
    # no dot: 8 warps stream (16, 256) chunks on the GPU (108 registers on sm_90, no spills)
    block_m, block_h, warps = (32, 128, 4) if INTERPRET else (16, 256, 8)
    # the model LN's gradients: per-program partial column sums (every config has BLOCK_M >= 16), summed here
    ln_grad = lnw is not None and (needs[2] or needs[3])
    parts = triton.cdiv(m, 16) if ln_grad else 1
    pw = (torch.zeros if ln_grad else torch.empty)((parts, hidden if ln_grad else 1), device=dev, dtype=torch.float32)
    pb = torch.zeros_like(pw) if ln_grad else pw
    dln_w = torch.zeros(hidden, device=dev, dtype=torch.float32) if ln_grad else None
    dln_b = torch.zeros_like(dln_w) if ln_grad else None
    _bottleneck_out_bwd_kernel[(triton.cdiv(m, block_m),)](
        dout, rn, y2, g, dy, lnw if lnw is not None else h2, stats[levels], pw, pb,
        m, hidden,
        dout.stride(0), dout.stride(1), rn.stride(0), rn.stride(1), y2.stride(0), y2.stride(1),
        OUT_ADD_Y=flags["OUT_ADD_Y"], OUT_LN=flags["OUT_LN"], LN_GRAD=ln_grad and flags["OUT_LN"],
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    if ln_grad and flags["OUT_LN"]:
        dln_w += pw.sum(0)
        dln_b += pb.sum(0)
    weights = {"wd": wd, "bd": bd, "wu": wu, "bu": bu}
    grads = {k: torch.zeros(t.shape, device=dev, dtype=torch.float32) if need else None
             for (k, t), need in zip(weights.items(), needs[4:], strict=True)}  # fmt: skip
    uniform_rows = routes.stride(0) == 0
    half = wd.dtype if (wd.dtype != torch.float32 and dev.type == "cuda") else torch.float32
    dot_fp32, precision = _dot_mode(h, wd)
    off = host_offsets
    tiles = _tiles(_max_rank(off))
    for lvl in reversed(range(levels)):
        train = train_levels[lvl]
        route = routes[:, lvl]
        masks = {a: None if uniform_rows else (route == a).unsqueeze(1) for a in train}
        if train and (grads["wu"] is not None or grads["bu"] is not None):
            gw = g.to(half)
            for a in train:  # dWu = s g^T act(z), dbu = s sum(g) over the rows routed to a
                act = _TORCH_ACTS[host_codes[a]](zs[lvl][:, off[a] : off[a + 1]])
                ga = g if masks[a] is None else g * masks[a]
                if masks[a] is not None:
                    act = act * masks[a]
                if grads["wu"] is not None:
                    grads["wu"][:, off[a] : off[a + 1]] += host_scales[a] * (gw.t() @ act.to(half)).float()
                if grads["bu"] is not None:
                    grads["bu"][a] += host_scales[a] * ga.sum(0)
        need_x = bool(train) and grads["wd"] is not None
        # torch reads dz (zero outside each block's units) only for the weight gradients; the kernel reads back
        # just what it wrote
        need_dz = bool(train) and (grads["wd"] is not None or grads["bd"] is not None)
        dz = (torch.zeros if need_dz else torch.empty)((m, rt), device=dev, dtype=torch.float32)
        x = torch.empty((m, hidden) if need_x else (1, 1), device=dev, dtype=half)
        rp = h2 if lvl == 0 else rs[lvl - 1]

        level_ln_grad = ln_grad and flags["IN_LN"]
        if level_ln_grad:
            pw.zero_()
            pb.zero_()
        _bottleneck_level_bwd_kernel[(triton.cdiv(m, tiles.BLOCK_M),)](
            g, dy, rp, y2, zs[lvl], dz, x, wd, wu,
            unit_owner, unit_act, scale, offsets, route,
            lnw if lnw is not None else h2, lnb if lnb is not None else h2, stats[lvl], pw, pb,
            m, hidden, rt,
            rp.stride(0), rp.stride(1), y2.stride(0), y2.stride(1),
            wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1), route.stride(0),
            PARALLEL=flags["PARALLEL"], IN_ADD_Y=flags["IN_ADD_Y"], IN_LN=flags["IN_LN"], RES_MODE=flags["RES_MODE"],
            NEED_X=need_x, LN_GRAD=level_ln_grad, DOT_FP32=dot_fp32, PRECISION=precision, **tiles.launch(),
        )  # fmt: skip
        if level_ln_grad:
            dln_w += pw.sum(0)
            dln_b += pb.sum(0)
        for a in train:  # dWd = dz^T x, dbd = sum(dz) (dz is zero on rows not routed to a)
            dza = dz[:, off[a] : off[a + 1]]
            if grads["wd"] is not None:
                grads["wd"][off[a] : off[a + 1]] += (dza.to(half).t() @ x).float()
            if grads["bd"] is not None:
                grads["bd"][off[a] : off[a + 1]] += dza.sum(0)
    dh = g.to(h.dtype).reshape(h.shape) if needs[0] else None
    dyo = dy.to(y.dtype).reshape(y.shape) if (y is not None and needs[1]) else None
    dlw = dln_w.to(lnw.dtype) if (ln_grad and needs[2]) else None
    dlb = dln_b.to(lnb.dtype) if (ln_grad and needs[3]) else None
    return [dh, dyo, dlw, dlb] + [grads[k].to(weights[k].dtype) if grads[k] is not None else None for k in weights]


# Registered torch custom ops (torch.compile sees one opaque node per stack, forward and backward):
#   adapter_engine::bottleneck_stack_fwd -> (out, rs, zs, stats); rs/zs/stats are empty unless ``save``
#   adapter_engine::bottleneck_stack_bwd -> [dh, dy, dln_w, dln_b, dwd, dbd, dwu, dbu]; empty where not needed
# The host-side facts the backward needs (structure, unit offsets, activation codes, scales, trainable adapters
# per level) travel as one string so that nothing syncs with the device (see _encode_host).
@torch.library.custom_op("adapter_engine::bottleneck_stack_fwd", mutates_args=())
def _stack_fwd_op(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    unit_owner: torch.Tensor,
    unit_act: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    routes: torch.Tensor,
    meta: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = PackedStack(wd, bd, wu, bu, unit_owner, unit_act, scale, offsets)
    options, offsets = _decode_host(meta)[:2]
    out, saved = _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, save=save, max_rank=_max_rank(offsets))
    if not save:
        return out, h.new_empty(0), h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float32)
    return out, saved.rs, saved.zs, saved.stats


def _saved_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float32 if (h.device.type == "cpu" and h.dtype != torch.float32) else h.dtype


@_stack_fwd_op.register_fake
def _(h, y, ln_weight, ln_bias, wd, bd, wu, bu, unit_owner, unit_act, scale, offsets, routes, meta, save):
    m, levels, rt = h.numel() // h.shape[-1], routes.shape[1], wd.shape[0]
    if not save:
        return (
            h.new_empty(h.shape),
            h.new_empty(0),
            h.new_empty(0, dtype=torch.float32),
            h.new_empty(0, dtype=torch.float32),
        )
    return (
        h.new_empty(h.shape),
        h.new_empty((levels, m, h.shape[-1]), dtype=_saved_dtype(h)),
        h.new_empty((levels, m, rt), dtype=torch.float32),
        h.new_empty((levels + 1, 2, m), dtype=torch.float32),
    )


@torch.library.custom_op("adapter_engine::bottleneck_stack_bwd", mutates_args=())
def _stack_bwd_op(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    unit_owner: torch.Tensor,
    unit_act: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    routes: torch.Tensor,
    rs: torch.Tensor,
    zs: torch.Tensor,
    stats: torch.Tensor,
    meta: str,
    needs: str,
) -> list[torch.Tensor]:
    options, host_offsets, host_codes, host_scales, train_levels = _decode_host(meta)
    grads = _stack_backward(
        grad_out, h, y, ln_weight, ln_bias, wd, bd, wu, bu, (unit_owner, unit_act, scale, offsets), routes, rs, zs,
        stats, options, host_offsets, host_codes, host_scales, train_levels, [c == "1" for c in needs],
    )  # fmt: skip
    return [g if g is not None else h.new_empty(0) for g in grads]


@_stack_bwd_op.register_fake
def _(grad_out, h, y, ln_weight, ln_bias, wd, bd, wu, bu, unit_owner, unit_act, scale, offsets, routes, rs, zs,
      stats, meta, needs):  # fmt: skip
    needs = [c == "1" for c in needs]
    like = [h, y if y is not None else h, ln_weight, ln_bias, wd, bd, wu, bu]
    return [
        t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0)
        for t, need in zip(like, needs, strict=True)
    ]


def _setup_context(ctx, inputs, output):
    h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, meta, save = inputs
    _, rs, zs, stats = output
    ctx.save_for_backward(h, y, lnw, lnb, wd, bd, wu, bu, owner, act, scale, offsets, routes, rs, zs, stats)
    ctx.meta = meta
    ctx.needs = [t is not None and t.requires_grad for t in (h, y, lnw, lnb, wd, bd, wu, bu)]


def _backward(ctx, grad_out, _grs, _gzs, _gstats):
    needs = "".join("1" if n else "0" for n in ctx.needs)
    grads = _stack_bwd_op(grad_out, *ctx.saved_tensors, ctx.meta, needs)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs, strict=True)) + (None,) * 7


torch.library.register_autograd("adapter_engine::bottleneck_stack_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------- functional
def expand_routes(routes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Routes as (rows, L) int32: (L,) is shared by all rows, (B, L) with h (B, S, H) is per sequence."""
    rows = h.numel() // h.shape[-1]
    if not (isinstance(routes, torch.Tensor) and routes.device == h.device):
        routes = torch.as_tensor(routes, device=h.device)
    if routes.dim() == 1:
        return (routes if routes.dtype == torch.int32 else routes.to(torch.int32)).reshape(1, -1).expand(rows, -1)
    if routes.dim() == 2 and routes.shape[0] == rows:
        return routes.to(torch.int32)
    if routes.dim() == 2 and h.dim() >= 3 and routes.shape[0] == h.shape[0]:
        per_seq = rows // h.shape[0]
        return routes.to(torch.int32).repeat_interleave(per_seq, dim=0)
    raise ValueError(
        f"routes must be (levels,), (rows={rows}, levels) or (batch={h.shape[0]}, levels) for h {tuple(h.shape)}, "
        f"got {tuple(routes.shape)}"
    )


def bottleneck_stack(
    h: torch.Tensor,
    y: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions = StackOptions(),
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    level_adapters: list[list[int]] | None = None,
) -> torch.Tensor:
    """Apply a stack of bottleneck adapters to a sublayer output.

    Args:
        h: (..., H) the sublayer's projection output (after dropout), r_0.
        y: (..., H) the sublayer's residual input, or None when no option reads it.
        packed: the adapters, from :func:`pack_adapters` (A adapters, Rt units).
        routes: adapter index (into ``packed``) per level, -1 = level off: (L,) for all rows, (rows, L) per
            token or (B, L) per sequence when h is (B, S, H).
        options: structural options shared by all adapters (AdapterHub field names).
        ln_weight, ln_bias: (H,) the model LayerNorm of this sublayer, or None (pre-LN models).
        level_adapters: optional host-side hint, the adapter indices each level's routes use; saves the backward
            one device sync when adapter weights train.

    Returns:
        (..., H) in h's dtype. Triton on CUDA / under the interpreter (a registered custom op with a Triton
        backward); the torch reference (plain autograd) on other CPUs or when the adapters carry their own
        LayerNorms.
    """
    routes = expand_routes(routes, h)
    _check(h, y, ln_weight, ln_bias, packed, routes, options)
    if not use_triton(h) or options.ln_before or options.ln_after:
        return bottleneck_stack_ref(h, y, ln_weight, ln_bias, packed, routes, options)
    host = packed.host
    if host is None:
        raise ValueError("packed adapters need their host facts: build them with pack_adapters")
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, y, ln_weight, ln_bias, *packed[:4])
    )
    if not save and not torch.compiler.is_compiling():  # nothing to differentiate: skip the op dispatcher
        return _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, False, _max_rank(host.offsets))[0]
    train_levels = [[] for _ in range(routes.shape[1])]
    if save and any(t.requires_grad for t in packed[:4]):
        if level_adapters is None:  # one device sync; the modules pass this hint from the host
            level_adapters = [sorted(set(routes[:, lvl].tolist()) - {-1}) for lvl in range(routes.shape[1])]
        train_levels = [[int(a) for a in used if host.trainable[a]] for used in level_adapters]
    return _stack_fwd_op(
        h, y, ln_weight, ln_bias, packed.wd, packed.bd, packed.wu, packed.bu,
        packed.unit_owner, packed.unit_act, packed.scale, packed.offsets, routes,
        _encode_host(options, host, tuple(map(tuple, train_levels))), save,
    )[0]  # fmt: skip
