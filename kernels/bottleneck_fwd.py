"""Forward of the fused bottleneck stack: the ``@triton.jit`` helpers (activations, dots, level input; the backward
reuses them), the row-block kernel and its launchers (:func:`bottleneck_stack_fwd`, ``_launch_fwd``), which run the
path kernels/bottleneck_dispatch.py chooses. Design notes: the docstring of ``kernels/bottleneck.py``.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import bottleneck_dispatch as dispatch
from ._backend import (
    DirectLaunch,
    alignment16,
    capturing,
    cdiv,
    compiled_kernel,
    launch_by_signature,
    next_pow2,
    use_triton,
)
from .bottleneck_gemm import build_level_operands, chains_levels, stack_fwd_levels
from .bottleneck_pack import (
    PackedHost,
    PackedStack,
    StackOptions,
    _activation,
    _dot_mode,
    _flags,
    _forward_candidates,
    _max_rank,
    _tile_path,
    _Tiles,
    _tiles,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- kernel
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
def _up_subtile(a_ptr, wu_ptr, rows, rmask, cols, cmask, lo, hi, j0, acc, stride_am, stride_wuh, stride_wur,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc += a[:, j0:j0+BLOCK_K] @ Wu^T[lo+j0 : lo+j0+BLOCK_K, cols] (activations from the a scratch)."""
    units = lo + j0 + tl.arange(0, BLOCK_K)
    act = tl.load(a_ptr + rows[:, None] * stride_am + (j0 + tl.arange(0, BLOCK_K))[None, :],
                  mask=rmask[:, None], other=0.0)  # fmt: skip
    wut = tl.load(
        wu_ptr + cols[None, :] * stride_wuh + units[:, None] * stride_wur,
        mask=(units < hi)[:, None] & cmask[None, :],
        other=0.0,
    )  # (BLOCK_K, BLOCK_H) = Wu^T slice, contiguous along H (see pack_adapters)
    return _mma(act, wut, acc, DOT_FP32, PRECISION)


@triton.jit
def _level(
    src_ptr, y_ptr, out_ptr, r_ptr, a_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
    owner_ptr, code_ptr, scale_ptr, lnw_ptr, lnb_ptr, rs_ptr, zs_ptr,
    rows, rmask, aid, lo, hi, mean, rstd, M, H, Rt,
    stride_sm, stride_sh, stride_ym, stride_yh, stride_om, stride_oh,
    stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_bua, stride_buh, stride_am,
    LVL: tl.constexpr, NUM_LEVELS: tl.constexpr, PARALLEL: tl.constexpr, IN_ADD_Y: tl.constexpr,
    IN_LN: tl.constexpr, RES_MODE: tl.constexpr, OUT_ADD_Y: tl.constexpr, OUT_LN: tl.constexpr, SAVE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    """One level of the stack for one row block: passes Z and U (see the kernel); returns the moments (sum, sum of
    squares) of r_i + y per row. ONE_TILE: the block's units [lo, hi) fit one BLOCK_R tile."""
    on = aid >= 0
    aid_safe = tl.where(on, aid, 0)
    # ---- pass Z: bottleneck activations of the units this block's rows use (one BLOCK_R tile when they
    # share one adapter); kept in registers as pass U's dot operand when one unit tile covers them, else
    # parked in the a scratch for pass U's BLOCK_K sub-tiles
    if ONE_TILE:
        units = lo + tl.arange(0, BLOCK_R)
        umask = units < hi
        z = _down_tile(src_ptr, y_ptr, wd_ptr, lnw_ptr, lnb_ptr, rows, rmask, units, umask, mean, rstd, H,
                       stride_sm, stride_sh, stride_ym, stride_yh, stride_wdr, stride_wdh,
                       PARALLEL, IN_ADD_Y, IN_LN, DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R)  # fmt: skip
        act_tile = _act_tile(z, bd_ptr, code_ptr, owner_ptr, scale_ptr, zs_ptr + LVL * M * Rt, rows, rmask, units,
                             umask, aid, Rt, SAVE)  # fmt: skip
        if BLOCK_K != BLOCK_R:
            a_offs = rows[:, None] * stride_am + tl.arange(0, BLOCK_R)[None, :]
            tl.store(a_ptr + a_offs, act_tile.to(a_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        for j0 in range(0, hi - lo, BLOCK_R):  # j: unit index relative to lo (aligned scratch columns)
            units = lo + j0 + tl.arange(0, BLOCK_R)
            umask = units < hi
            z = _down_tile(src_ptr, y_ptr, wd_ptr, lnw_ptr, lnb_ptr, rows, rmask, units, umask, mean, rstd, H,
                           stride_sm, stride_sh, stride_ym, stride_yh, stride_wdr, stride_wdh,
                           PARALLEL, IN_ADD_Y, IN_LN, DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R)  # fmt: skip
            act = _act_tile(z, bd_ptr, code_ptr, owner_ptr, scale_ptr, zs_ptr + LVL * M * Rt, rows, rmask,
                            units, umask, aid, Rt, SAVE)  # fmt: skip
            # whole tiles (units past hi hold exact zeros), so pass U's loads need no per-unit mask
            a_offs = rows[:, None] * stride_am + (j0 + tl.arange(0, BLOCK_R))[None, :]
            tl.store(a_ptr + a_offs, act.to(a_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.debug_barrier()
    # ---- pass U: up-projection (K sub-tiles of BLOCK_K units: a wide A operand would sit in every warp's
    # registers), residual, new r (or the output), moments of r_i + y
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sc_row = tl.load(scale_ptr + aid_safe, mask=on, other=0.0)
    for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
        cols = k0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        if ONE_TILE:
            if BLOCK_K == BLOCK_R:
                units = lo + tl.arange(0, BLOCK_R)
                wut = tl.load(
                    wu_ptr + cols[None, :] * stride_wuh + units[:, None] * stride_wur,
                    mask=(units < hi)[:, None] & cmask[None, :],
                    other=0.0,
                )  # (BLOCK_R, BLOCK_H) = Wu^T slice, contiguous along H (see pack_adapters)
                acc = _mma(act_tile, wut, acc, DOT_FP32, PRECISION)
            else:
                for j0 in tl.static_range(0, BLOCK_R, BLOCK_K):
                    acc = _up_subtile(a_ptr, wu_ptr, rows, rmask, cols, cmask, lo, hi, j0, acc, stride_am,
                                      stride_wuh, stride_wur, DOT_FP32, PRECISION, BLOCK_K)  # fmt: skip
        else:
            for j0 in range(0, hi - lo, BLOCK_K):
                acc = _up_subtile(a_ptr, wu_ptr, rows, rmask, cols, cmask, lo, hi, j0, acc, stride_am,
                                  stride_wuh, stride_wur, DOT_FP32, PRECISION, BLOCK_K)  # fmt: skip
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
            rs_offs = LVL * M * H + rows[:, None] * H + cols[None, :]
            tl.store(rs_ptr + rs_offs, new.to(rs_ptr.dtype.element_ty), mask=m2)
        if (LVL == NUM_LEVELS - 1) and not OUT_LN:  # last level writes the output directly
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
    return s1, s2


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
    n_adapters,  # A: routes outside [0, A) are off (a GPU does not range-check them; the host does where it sees them)
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
    LOOP_STAGES: tl.constexpr,  # software-pipelining depth of the hidden-chunk loops without a dot (1: none)
    TILE_PATH: tl.constexpr,  # 1: every block's units fit one BLOCK_R tile; 2: none is known to; 0: per block
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
        for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
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
        aid = tl.where(aid < n_adapters, aid, -1)  # (never an adapter's table read out of bounds)
        on = aid >= 0
        aid_safe = tl.where(on, aid, 0)
        lo = tl.min(tl.load(off_ptr + aid_safe, mask=on, other=1 << 30), 0)
        hi = tl.max(tl.load(off_ptr + aid_safe + 1, mask=on, other=0), 0)
        lo = tl.minimum(lo, hi)  # a level no row of the block takes: an empty unit range at 0
        # the level input r_(i-1): h at the first level, then the fp32 scratch
        if lvl == 0:
            src_ptr, stride_sm, stride_sh = h_ptr, stride_hm, stride_hh
        else:
            src_ptr, stride_sm, stride_sh = r_ptr, H, 1
        # A block whose rows' adapters fit one unit tile (rows that share an adapter, or none) takes straight-line
        # unit tiles, with hidden loops that hold no inner loop and so are pipelined; other blocks loop over tiles.
        # TILE_PATH (host-side) compiles only the path every block takes when the routes tell (one stack).
        if TILE_PATH == 0:
            one_tile = hi - lo <= BLOCK_R  # decided per block: both paths are compiled
        else:
            one_tile = TILE_PATH == 1  # a compile-time constant: one path is compiled
        if one_tile:
            s1, s2 = _level(src_ptr, y_ptr, out_ptr, r_ptr, a_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
                            owner_ptr, code_ptr, scale_ptr, lnw_ptr, lnb_ptr, rs_ptr, zs_ptr,
                            rows, rmask, aid, lo, hi, mean, rstd, M, H, Rt,
                            stride_sm, stride_sh, stride_ym, stride_yh, stride_om, stride_oh,
                            stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_bua, stride_buh, stride_am,
                            lvl, NUM_LEVELS, PARALLEL, IN_ADD_Y, IN_LN, RES_MODE, OUT_ADD_Y, OUT_LN, SAVE,
                            DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R, BLOCK_K, True, LOOP_STAGES)  # fmt: skip
        else:
            s1, s2 = _level(src_ptr, y_ptr, out_ptr, r_ptr, a_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
                            owner_ptr, code_ptr, scale_ptr, lnw_ptr, lnb_ptr, rs_ptr, zs_ptr,
                            rows, rmask, aid, lo, hi, mean, rstd, M, H, Rt,
                            stride_sm, stride_sh, stride_ym, stride_yh, stride_om, stride_oh,
                            stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_bua, stride_buh, stride_am,
                            lvl, NUM_LEVELS, PARALLEL, IN_ADD_Y, IN_LN, RES_MODE, OUT_ADD_Y, OUT_LN, SAVE,
                            DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R, BLOCK_K, False, 1)  # fmt: skip
        tl.debug_barrier()
        if IN_LN or OUT_LN:
            mean = s1 / H
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / H - mean * mean, 0.0) + eps)
            if SAVE:
                tl.store(st_ptr + (lvl + 1) * 2 * M + rows, mean, mask=rmask)
                tl.store(st_ptr + (lvl + 1) * 2 * M + M + rows, rstd, mask=rmask)

    # ---- final pass: output LayerNorm (or depth 0), one store
    if OUT_LN or NUM_LEVELS == 0:
        for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
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


# --------------------------------------------------------------------------------------------------- launcher
class _Saved(NamedTuple):
    rs: torch.Tensor  # (L, M, H) r_1..r_n in h's dtype
    zs: torch.Tensor  # (L, M, Rt) fp32 pre-activations (zero outside each row block's units)
    stats: torch.Tensor  # (L + 1, 2, M) fp32 mean, rstd of r_i + y (when a model LN runs)


def _launch_fwd(
    h, y, ln_weight, ln_bias, packed: PackedStack, routes, options: StackOptions, save: bool, max_rank: int,
    level_adapters: tuple[int, ...] | None = None, host: tuple | None = None, record: list | None = None,
):  # fmt: skip
    """The forward: one row-block kernel launch (plus the zeroed z buffer when saving for the backward), or, for
    one stack on every row, the level-by-level GEMM path (``bottleneck_gemm``) where it is preferred or timed
    faster. ``max_rank`` picks the tiles; ``level_adapters``: per level, the adapter every row runs (-1: off), or
    None when rows differ or it is not known on the host; ``host`` = (offsets, codes, scales) of the packed
    adapters (needed with ``level_adapters``). ``record``: a list that receives the :class:`ForwardLaunch` of a
    launch that saved nothing and ran the kernel (nothing for the GEMM path)."""
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
    if routes.dtype != torch.int32:
        routes = routes.to(torch.int32)
    dot_fp32, precision = _dot_mode(h, packed.wd)
    timed = m >= dispatch.TUNE_MIN_ROWS
    tiles, switches, switch_values = _fwd_plan(
        m == 1, m >= 4096, levels, max_rank, options, ln_weight is not None, save, dot_fp32, precision,
        routes.stride(0) == 0,
    )  # fmt: skip
    candidates = _forward_candidates(tiles, save) if timed else (tiles,)
    flags = _flags(options, ln_weight is not None)
    if levels > 0:  # (depth 0: the kernel's copy or output LN, whatever dispatch.STACK_PATH says)
        candidates = dispatch._with_levels(candidates, m, hidden, max_rank, packed.wd.dtype, level_adapters is not None)
        if (
            dispatch.LEVELS in candidates
            and not save
            and chains_levels(flags, hidden, max_rank, h.dtype, y2.dtype, packed.wd.dtype)
        ):
            if dispatch.STACK_PATH == "levels fused":
                candidates = (dispatch.LEVELS_FUSED,)
            elif len(candidates) > 1:  # timed: beside the other candidates
                candidates = (*candidates, dispatch.LEVELS_FUSED)
    key = ("forward", min(next_pow2(m), 1 << 16), hidden, tiles.BLOCK_R, h.dtype, packed.wu.dtype, switch_values,
           candidates[0] == dispatch.LEVELS, len(candidates))  # fmt: skip
    if save:
        saved = _Saved(
            torch.empty((levels, m, hidden), device=dev, dtype=torch.float32 if round_in_torch else h.dtype),
            torch.zeros((levels, m, rt), device=dev, dtype=torch.float32),
            torch.empty((levels + 1, 2, m), device=dev, dtype=torch.float32),
        )
    else:
        saved = None
    if m == 0:
        return out.to(h.dtype).reshape(h.shape), saved
    kernel_args = []  # built on the first kernel launch: the scratch buffers are not needed by the GEMM path
    result = [out, None]  # the output of the last launch (the kernel writes ``out``, the GEMM path returns its
    # own) and what the kernel launch returned (the compiled kernel on a GPU)

    def launch(t: _Tiles | str, direct: bool = False) -> None:
        if t in dispatch.LEVEL_PATHS:
            result[0] = stack_fwd_levels(h2, y2, ln_weight, ln_bias, packed, level_adapters, host, flags,
                                         float(options.eps), saved, chain=t == dispatch.LEVELS_FUSED)  # fmt: skip
            return
        if not kernel_args:
            kernel_args.extend(_kernel_args(h2, y2, out, ln_weight, ln_bias, packed, routes, saved, options, tiles))
        grid = (cdiv(m, t.BLOCK_M),)
        if direct:  # the chosen tiles' launch, recorded per geometry: on a GPU its compiled kernel, called directly
            launch_by_signature(_RECORDED, (dev, switch_values, t), _bottleneck_stack_fwd_kernel, grid,
                                {**switches, **t.launch()}, kernel_args, _POINTERS)  # fmt: skip
        else:
            result[1] = _bottleneck_stack_fwd_kernel[grid](*kernel_args, **switches, **t.launch())
        result[0] = out

    chosen = dispatch._tuned_tiles(key, candidates, launch, (lambda: saved.zs.zero_) if save else None, dev)
    on_levels = chosen in dispatch.LEVEL_PATHS
    recording = record is not None and not on_levels and not save  # a ForwardLaunch: it keeps its own DirectLaunch
    if (
        not on_levels
        and dispatch._TUNED_GRAPHED.get(key) in dispatch.LEVEL_PATHS
        and level_adapters is not None
        and not capturing(h2)
    ):
        build_level_operands(packed, level_adapters, host)  # for a later capture of this call (the graphed choice)
    launch(chosen, direct=not recording)
    if recording:
        views = h2.data_ptr() == h.data_ptr() and (y is None or y2.data_ptr() == y.data_ptr())  # (not copies)
        record.append(ForwardLaunch.of(kernel_args, (cdiv(m, chosen.BLOCK_M),), {**switches, **chosen.launch()},
                                       ln_weight is not None, result[1], views))  # fmt: skip
    y_out = result[0] if result[0].dtype == h.dtype else result[0].to(h.dtype)
    return (y_out if h.dim() == 2 else y_out.reshape(h.shape)), saved


class ForwardLaunch(NamedTuple):
    """A row-block launch that saved nothing, as :func:`_launch_fwd` made it: what repeats it for new activations
    of the same geometry (shapes, strides, dtypes, device; the same packed adapters, routes layout, options and
    LayerNorm) without the checks and planning around it, a good part of a serving call's host time
    (``kernels.bottleneck.bottleneck_stack``'s ``return_launch``). Holds no per-call tensor: ``args`` has None in
    their slots."""

    args: tuple
    out_dtype: torch.dtype  # fp32 for half inputs under the interpreter (torch rounds once)
    scratch: tuple[tuple[int, int], tuple[int, int], torch.dtype]  # (r's shape, a's shape, a's dtype)
    has_ln: bool
    # The launch itself: on a GPU it calls the compiled kernel of the recorded launch directly while h, y and routes
    # are 16-byte aligned as then (``DirectLaunch``; the integer sizes and strides are the geometry's), skipping
    # Triton's per-launch binding of the 38 arguments.
    direct: DirectLaunch
    views: bool = True  # h and y reached the kernel as (rows, H) views of themselves: in their own shapes they read
    # the same (else, rows of uneven strides, they are flattened by a copy on every call, as at the recorded one)

    # kernel argument slots filled on each call: h, y, out, the r and a scratch, routes; the LayerNorm's weight
    # and bias (dummies without one); the saved tensors (dummies: nothing is saved)
    _H, _Y, _OUT, _R, _A, _ROUTES, _LNW, _LNB, _SAVED = 0, 1, 2, 3, 4, 13, 14, 15, slice(16, 19)

    @classmethod
    def of(
        cls, args: list, grid: tuple[int, ...], kwargs: dict, has_ln: bool, compiled=None, views: bool = True
    ) -> ForwardLaunch:
        scratch = (tuple(args[cls._R].shape), tuple(args[cls._A].shape), args[cls._A].dtype)
        out_dtype = args[cls._OUT].dtype
        template = list(args)
        for slot in (cls._H, cls._Y, cls._OUT, cls._R, cls._A, cls._ROUTES):
            template[slot] = None
        template[cls._SAVED] = (None, None, None)
        if not has_ln:
            template[cls._LNW] = template[cls._LNB] = None
        direct = DirectLaunch.plan(_bottleneck_stack_fwd_kernel, grid, kwargs, len(args))
        compiled = compiled_kernel(compiled)
        if compiled is not None:
            direct = direct._replace(compiled=compiled, alignment=alignment16(args[cls._H], args[cls._Y],
                                                                             args[cls._ROUTES]))  # fmt: skip
        return cls(tuple(template), out_dtype, scratch, has_ln, direct, views)

    def __call__(self, h: torch.Tensor, y: torch.Tensor | None, routes: torch.Tensor) -> torch.Tensor:
        """The stack's output for h, y (or None) and routes (rows, L) int32, laid out as at the recorded call. The
        kernel reads tensors through their data pointers and the recorded strides, so h, y and the output go to it
        in their own (..., H) shapes, with no reshape either way."""
        if not self.views:
            hidden = h.shape[-1]
            y2 = y.reshape(-1, hidden) if y is not None else None
            return self._run(h.reshape(-1, hidden), y2, routes).reshape(h.shape)
        return self._run(h, y, routes)

    def _run(self, h: torch.Tensor, y: torch.Tensor | None, routes: torch.Tensor) -> torch.Tensor:
        dev = h.device
        out = torch.empty(h.shape, device=dev, dtype=self.out_dtype)
        r_shape, a_shape, a_dtype = self.scratch
        scratch_r = torch.empty(r_shape, device=dev, dtype=torch.float32)
        args = list(self.args)
        y = h if y is None else y
        args[: self._A + 1] = h, y, out, scratch_r, torch.empty(a_shape, device=dev, dtype=a_dtype)
        args[self._ROUTES] = routes
        if not self.has_ln:
            args[self._LNW] = args[self._LNB] = h
        args[self._SAVED] = scratch_r, scratch_r, scratch_r
        self.direct(tuple(args), (h, y, routes))
        return out if out.dtype == h.dtype else out.to(h.dtype)


@functools.lru_cache(maxsize=1024)
def _fwd_plan(
    one_row: bool, big: bool, levels: int, max_rank: int, options: StackOptions, has_ln: bool, save: bool,
    dot_fp32: bool, precision: str, uniform_rows: bool,
):  # fmt: skip
    """(tiles, the kernel's switches, the switches' values) of a forward launch over one row, at least 4096 rows
    (``big``) or others: host work that only depends on these facts (and reads no module setting a test may
    change), made once per set of them."""
    tiles = _tiles(max_rank, not save and big)
    path = _tile_path(1 if one_row else 2, uniform_rows, max_rank, tiles)
    switches = dict(NUM_LEVELS=levels, SAVE=save, DOT_FP32=dot_fp32, PRECISION=precision, TILE_PATH=path,
                    **_flags(options, has_ln))  # fmt: skip
    return tiles, switches, tuple(switches.values())


# The row-block kernel's launches outside serving (training, and calls that record no ForwardLaunch), once their tiles
# are chosen: (device, switches, tiles, launch_signature of the arguments) -> its DirectLaunch.
_RECORDED: dict[tuple, DirectLaunch] = {}
_POINTERS = 19  # the kernel's pointer arguments, first in its signature


def _kernel_args(h2, y2, out, ln_weight, ln_bias, packed: PackedStack, routes, saved, options, tiles: _Tiles):
    """The row-block kernel's arguments, with its scratch: the fp32 running r and the activations of one level."""
    m, hidden = h2.shape
    levels, rt, dev = routes.shape[1], packed.wd.shape[0], h2.device
    dot_fp32 = _dot_mode(h2, packed.wd)[0]
    scratch_r = torch.empty((m, hidden) if levels > 0 else (1, 1), device=dev, dtype=torch.float32)
    # activations in the dot operand dtype (the dot rounds them to it anyway), in whole unit tiles
    a_cols = -(-rt // tiles.BLOCK_R) * tiles.BLOCK_R
    scratch_a = torch.empty((m, a_cols) if levels > 0 else (1, 16), device=dev,
                            dtype=torch.float32 if dot_fp32 else packed.wu.dtype)  # fmt: skip
    if saved is None:
        saved = _Saved(scratch_r, scratch_r, scratch_r)  # dummy pointers, never touched without SAVE
    lnw = ln_weight if ln_weight is not None else h2  # dummy pointers, never read without IN_LN/OUT_LN
    lnb = ln_bias if ln_bias is not None else h2
    return (
        h2, y2, out, scratch_r, scratch_a,
        packed.wd, packed.bd, packed.wu, packed.bu,
        packed.unit_owner, packed.unit_act, packed.scale, packed.offsets,
        routes, lnw, lnb, saved.rs, saved.zs, saved.stats,
        m, hidden, rt, packed.scale.shape[0], float(options.eps),
        h2.stride(0), h2.stride(1), y2.stride(0), y2.stride(1), out.stride(0), out.stride(1),
        packed.wd.stride(0), packed.wd.stride(1), packed.wu.stride(0), packed.wu.stride(1),
        packed.bu.stride(0), packed.bu.stride(1),
        routes.stride(0), routes.stride(1), scratch_a.stride(0),
    )  # fmt: skip


def bottleneck_stack_fwd(
    h: torch.Tensor,
    y: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    packed: PackedStack,
    routes: torch.Tensor,
    options: StackOptions,
) -> torch.Tensor:
    """Triton forward. h, y: (..., H); routes: (rows, L) int, -1 = level off; returns (..., H) in h's dtype. A CPU
    tensor outside the interpreter takes the torch twin, ``bottleneck_stack_ref``. Shapes, dtypes and devices are
    checked as :func:`bottleneck_stack` checks them (routes of another row count, a missing y or activations of
    another hidden size were read out of bounds); route values are not (the kernel runs rows routed outside
    ``[0, A)`` base only, as on a GPU)."""
    from .bottleneck import _check, bottleneck_stack_ref  # (bottleneck.py imports this module)

    if options.ln_before or options.ln_after:
        raise ValueError("the adapters' own ln_before/ln_after run on the torch path (bottleneck_stack_ref)")
    _check(h, y, ln_weight, ln_bias, packed, routes, options)
    if not use_triton(h):
        return bottleneck_stack_ref(h, y, ln_weight, ln_bias, packed, routes, options)
    host = packed.host if packed.host is not None else PackedHost(packed.offsets.tolist(), packed.unit_act[
        packed.offsets[:-1]].tolist(), packed.scale.tolist(), ())  # fmt: skip
    max_rank = _max_rank(host.offsets)
    uniform = dispatch.uniform_levels(routes, may_read=dispatch.levels_may_run(h.shape[-1], max_rank, packed.wd.dtype))
    return _launch_fwd(h, y, ln_weight, ln_bias, packed, routes, options, False, max_rank, uniform, host[:3])[0]
