"""Backward of the fused bottleneck stack: the output-LayerNorm and per-level ``@triton.jit`` kernels and their
launcher ``_stack_backward`` (its docstring derives every gradient; weight gradients run on cuBLAS). Design notes:
the docstring of ``kernels/bottleneck.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import bottleneck_dispatch
from ._backend import INTERPRET, DirectLaunch, cdiv, launch_by_signature, next_pow2
from .bottleneck_fwd import _level_input, _load_ln, _mma
from .bottleneck_gemm import level_bwd_levels
from .bottleneck_pack import (
    _TORCH_ACTS,
    StackOptions,
    _dot_mode,
    _flags,
    _level_candidates,
    _max_rank,
    _tanh,
    _tile_path,
    _tiles,
)


# --------------------------------------------------------------------------------------------------- kernel
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
    LOOP_STAGES: tl.constexpr,  # software-pipelining depth of the hidden-chunk loops (1: none)
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
        for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
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
    for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
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
    M, H, Rt, n_adapters,  # routes outside [0, n_adapters) are off, as in the forward
    stride_rpm, stride_rph, stride_ym, stride_yh,
    stride_wdr, stride_wdh, stride_wuh, stride_wur, stride_rtm,
    PARALLEL: tl.constexpr,
    IN_ADD_Y: tl.constexpr,
    IN_LN: tl.constexpr,
    RES_MODE: tl.constexpr,
    NEED_X: tl.constexpr,
    LN_GRAD: tl.constexpr,  # the model LN's weight/bias want gradients
    KEEP_DY: tl.constexpr,  # accumulate dL/dy (off where it provably equals g: see _stack_backward)
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,  # unit tile of pass 1 (see _tiles)
    BLOCK_K: tl.constexpr,  # unit sub-tile of the dx dots
    LOOP_STAGES: tl.constexpr,  # software-pipelining depth of passes 2 and 3 (1: none)
    TILE_PATH: tl.constexpr,  # as the forward: 1: every block's units fit one BLOCK_R tile; 2: none is known to;
    # 0: decided per block
):  # fmt: skip
    """One level backward (see _stack_backward): dz = s g Wu * act'(z); dx = dz Wd (+ g if res = x);
    through the input LN; g_(i-1) = g (res = r) + dt; dy += dt. Rows whose level is off pass g through."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    aid = tl.load(route_ptr + rows * stride_rtm, mask=rmask, other=-1)
    aid = tl.where(aid < n_adapters, aid, -1)  # (never an adapter's table read out of bounds)
    on = aid >= 0
    aid_safe = tl.where(on, aid, 0)
    lo = tl.min(tl.load(off_ptr + aid_safe, mask=on, other=1 << 30), 0)
    hi = tl.max(tl.load(off_ptr + aid_safe + 1, mask=on, other=0), 0)
    lo = tl.minimum(lo, hi)  # no row of the block takes the level: an empty unit range at 0
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IN_LN:
        mean = tl.load(st_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(st_ptr + M + rows, mask=rmask, other=0.0)
    if TILE_PATH == 0:
        one_tile = hi - lo <= BLOCK_R  # decided per block: both paths are compiled
    else:
        one_tile = TILE_PATH == 1  # a compile-time constant: one path is compiled
    if one_tile:
        _level_bwd(g_ptr, dy_ptr, rp_ptr, y_ptr, z_ptr, dz_ptr, x_ptr, wd_ptr, wu_ptr, owner_ptr, code_ptr, scale_ptr,
                   lnw_ptr, lnb_ptr, pw_ptr, pb_ptr, pid, rows, rmask, aid, on, lo, hi, mean, rstd, H, Rt,
                   stride_rpm, stride_rph, stride_ym, stride_yh, stride_wdr, stride_wdh, stride_wuh, stride_wur,
                   PARALLEL, IN_ADD_Y, IN_LN, RES_MODE, NEED_X, LN_GRAD, KEEP_DY, DOT_FP32, PRECISION,
                   BLOCK_M, BLOCK_H, BLOCK_R, BLOCK_K, True, LOOP_STAGES)  # fmt: skip
    else:
        _level_bwd(g_ptr, dy_ptr, rp_ptr, y_ptr, z_ptr, dz_ptr, x_ptr, wd_ptr, wu_ptr, owner_ptr, code_ptr, scale_ptr,
                   lnw_ptr, lnb_ptr, pw_ptr, pb_ptr, pid, rows, rmask, aid, on, lo, hi, mean, rstd, H, Rt,
                   stride_rpm, stride_rph, stride_ym, stride_yh, stride_wdr, stride_wdh, stride_wuh, stride_wur,
                   PARALLEL, IN_ADD_Y, IN_LN, RES_MODE, NEED_X, LN_GRAD, KEEP_DY, DOT_FP32, PRECISION,
                   BLOCK_M, BLOCK_H, BLOCK_R, BLOCK_K, False, 1)  # fmt: skip


@triton.jit
def _level_bwd(
    g_ptr, dy_ptr, rp_ptr, y_ptr, z_ptr, dz_ptr, x_ptr, wd_ptr, wu_ptr, owner_ptr, code_ptr, scale_ptr,
    lnw_ptr, lnb_ptr, pw_ptr, pb_ptr, pid, rows, rmask, aid, on, lo, hi, mean, rstd, H, Rt,
    stride_rpm, stride_rph, stride_ym, stride_yh, stride_wdr, stride_wdh, stride_wuh, stride_wur,
    PARALLEL: tl.constexpr, IN_ADD_Y: tl.constexpr, IN_LN: tl.constexpr, RES_MODE: tl.constexpr,
    NEED_X: tl.constexpr, LN_GRAD: tl.constexpr, KEEP_DY: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    """Passes 1-3 of one level for one row block (see the kernel). ONE_TILE: the block's units [lo, hi) fit one
    BLOCK_R tile (straight-line tiles, pipelined hidden loops); else loops over unit tiles."""
    # ---- pass 1: dz over the units this block's rows use (one tile, kept in registers as the dx dots' operand,
    # when they share an adapter that fits it)
    if ONE_TILE:
        dz_tile = _level_dz(g_ptr, z_ptr, dz_ptr, wu_ptr, code_ptr, owner_ptr, scale_ptr, rows, rmask, aid, lo, hi, H,
                            Rt, stride_wuh, stride_wur, DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R)  # fmt: skip
    else:
        dz_tile = 0  # unused: the dx passes read dz back in unit tiles
        for u0 in range(lo, hi, BLOCK_R):
            _level_dz(g_ptr, z_ptr, dz_ptr, wu_ptr, code_ptr, owner_ptr, scale_ptr, rows, rmask, aid, u0, hi, H, Rt,
                      stride_wuh, stride_wur, DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_R)  # fmt: skip
    tl.debug_barrier()
    # ---- pass 2: row moments of the gradient entering the input LayerNorm
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IN_LN and not PARALLEL:
        for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            dx = _level_dx(dz_tile, dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
                           DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_K, BLOCK_R, ONE_TILE)  # fmt: skip
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
    for k0 in tl.range(0, H, BLOCK_H, num_stages=LOOP_STAGES):
        cols = k0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
        dx = _level_dx(dz_tile, dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
                       DOT_FP32, PRECISION, BLOCK_M, BLOCK_H, BLOCK_K, BLOCK_R, ONE_TILE)  # fmt: skip
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
            if KEEP_DY:
                dy_old = tl.load(dy_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
                dy_new = dy_old + tl.where(on[:, None], dy_add, 0.0)
                tl.store(dy_ptr + rows[:, None] * H + cols[None, :], dy_new, mask=m2)
        if NEED_X:
            tl.store(x_ptr + rows[:, None] * H + cols[None, :], x.to(x_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _level_dz(g_ptr, z_ptr, dz_ptr, wu_ptr, code_ptr, owner_ptr, scale_ptr, rows, rmask, aid, u0, hi, H, Rt,
              stride_wuh, stride_wur, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """dz = s (g Wu) * act'(z) over the units [u0, min(u0 + BLOCK_R, hi)), zero where the unit's adapter is not the
    row's; stored to dz and returned ((BLOCK_M, BLOCK_R) fp32)."""
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
    return dz


@triton.jit
def _level_dx(dz_tile, dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo, hi, Rt, stride_wdr, stride_wdh,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ONE_TILE: tl.constexpr):  # fmt: skip
    """dx[:, cols] = dz @ Wd[:, cols] over the units [lo, hi): (BLOCK_M, BLOCK_H) fp32. ONE_TILE: from pass 1's
    (BLOCK_M, BLOCK_R) tile in registers when one dot takes it (BLOCK_K == BLOCK_R), else unrolled over its
    BLOCK_K sub-tiles of the stored dz; otherwise a loop over the stored dz."""
    dx = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    if ONE_TILE and BLOCK_K == BLOCK_R:
        dx = _mma(dz_tile, _wd_tile(wd_ptr, lo + tl.arange(0, BLOCK_R), hi, cols, cmask, stride_wdr, stride_wdh), dx,
                  DOT_FP32, PRECISION)  # fmt: skip
    elif ONE_TILE:
        for j0 in tl.static_range(0, BLOCK_R, BLOCK_K):
            dx = _dx_subtile(dz_ptr, wd_ptr, rows, rmask, cols, cmask, lo + j0, hi, Rt, stride_wdr, stride_wdh, dx,
                             DOT_FP32, PRECISION, BLOCK_K)  # fmt: skip
    else:
        for u0 in range(lo, hi, BLOCK_K):
            dx = _dx_subtile(dz_ptr, wd_ptr, rows, rmask, cols, cmask, u0, hi, Rt, stride_wdr, stride_wdh, dx,
                             DOT_FP32, PRECISION, BLOCK_K)  # fmt: skip
    return dx


@triton.jit
def _dx_subtile(dz_ptr, wd_ptr, rows, rmask, cols, cmask, u0, hi, Rt, stride_wdr, stride_wdh, dx,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    units = u0 + tl.arange(0, BLOCK_K)
    dz = tl.load(dz_ptr + rows[:, None] * Rt + units[None, :], mask=rmask[:, None] & (units < hi)[None, :], other=0.0)
    return _mma(dz, _wd_tile(wd_ptr, units, hi, cols, cmask, stride_wdr, stride_wdh), dx, DOT_FP32, PRECISION)


@triton.jit
def _wd_tile(wd_ptr, units, hi, cols, cmask, stride_wdr, stride_wdh):
    """The (units, cols) tile of Wd, zero for units at or past ``hi``."""
    return tl.load(
        wd_ptr + units[:, None] * stride_wdr + cols[None, :] * stride_wdh,
        mask=(units < hi)[:, None] & cmask[None, :],
        other=0.0,
    )


# --------------------------------------------------------------------------------------------------- launcher
@functools.lru_cache(maxsize=256)
def _level_switches(options: StackOptions, has_ln: bool, need_x: bool, ln_grad: bool, keep_dy: bool, dot_fp32: bool,
                    precision: str, tile_path: int) -> dict:  # fmt: skip
    """The level-backward kernel's compile-time switches (a shared dict: read, never changed)."""
    flags = _flags(options, has_ln)
    return dict(
        PARALLEL=flags["PARALLEL"], IN_ADD_Y=flags["IN_ADD_Y"], IN_LN=flags["IN_LN"], RES_MODE=flags["RES_MODE"],
        NEED_X=need_x, LN_GRAD=ln_grad, KEEP_DY=keep_dy, DOT_FP32=dot_fp32, PRECISION=precision, TILE_PATH=tile_path,
    )  # fmt: skip


# The backward kernels' launches, their tiles chosen: (device, the output kernel's constexprs or the level kernel's
# tuning key and tiles, launch_signature of the arguments) -> its DirectLaunch (on a GPU: its compiled kernel, called
# directly).
_RECORDED: dict[tuple, DirectLaunch] = {}


def _add_grad(slot: torch.Tensor, a: torch.Tensor, b, once: bool) -> None:
    """slot (+)= a @ b for a matrix ``b``, a * b for a float: written once in the slot's dtype (``once``), else
    accumulated into an fp32 slot."""
    if once and isinstance(b, torch.Tensor):
        torch.mm(a, b, out=slot)
    elif once:
        torch.mul(a, b, out=slot)
    else:
        slot += (a @ b).float() if isinstance(b, torch.Tensor) else a * b


def _stack_backward(
    grad_out, h, y, lnw, lnb, wd, bd, wu, bu, tables, routes, rs, zs, stats, options: StackOptions,
    host_offsets, host_codes, host_scales, train_levels, needs, uniform=None,
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
    input over the routed rows) come from per-program partial column sums written by the kernels. ``uniform``: per
    level, the adapter every row runs (-1: off), or None; then a level that is off is skipped, and a level may run
    on cuBLAS instead (``bottleneck_gemm.level_bwd_levels``: untimed for wide weights, timed against the kernel's
    tiles on launches of ``TUNE_MIN_ROWS`` rows or more, as the forward does)."""
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
    parts = cdiv(m, 16) if ln_grad else 1
    pw = (torch.zeros if ln_grad else torch.empty)((parts, hidden if ln_grad else 1), device=dev, dtype=torch.float32)
    pb = torch.zeros_like(pw) if ln_grad else pw
    dln_w = torch.zeros(hidden, device=dev, dtype=torch.float32) if ln_grad else None
    dln_b = torch.zeros_like(dln_w) if ln_grad else None
    out_args = (
        dout, rn, y2, g, dy, lnw if lnw is not None else h2, stats[levels], pw, pb,
        m, hidden, *dout.stride(), *rn.stride(), *y2.stride(),
    )  # fmt: skip
    out_kwargs = dict(
        OUT_ADD_Y=flags["OUT_ADD_Y"], OUT_LN=flags["OUT_LN"], LN_GRAD=ln_grad and flags["OUT_LN"],
        BLOCK_M=block_m, BLOCK_H=block_h, LOOP_STAGES=1 if INTERPRET else 2, num_warps=warps,
    )  # fmt: skip
    launch_by_signature(_RECORDED, ("out backward", dev, *out_kwargs.values()), _bottleneck_out_bwd_kernel,
                        (cdiv(m, block_m),), out_kwargs, out_args, 9)  # fmt: skip
    if ln_grad and flags["OUT_LN"]:
        dln_w += pw.sum(0)
        dln_b += pb.sum(0)
    # seq_bn's order (level input r + y, with or without the model LN; residual r; output r_n + y): g and dy start
    # equal (the out kernel writes the gradient of r_n + y into both) and every level adds the same dt to both (rows
    # whose level is off: nothing), so dy is g throughout and the levels need not read and write it.
    dy_is_g = flags["IN_ADD_Y"] and flags["RES_MODE"] == 0 and flags["OUT_ADD_Y"]
    # Nothing below the lowest level whose adapters train is needed when neither h, y nor the model LN want a
    # gradient (the first layer's stack in adapter training): those levels would only carry g down to h.
    inputs_need = any(needs[:4])
    lowest = 0 if inputs_need else min([lvl for lvl in range(levels) if train_levels[lvl]] or [levels])
    weights = {"wd": wd, "bd": bd, "wu": wu, "bu": bu}
    # An adapter that trains at one level only (the usual case) gets its weight gradients written once, straight
    # into buffers of the weights' dtype (a GEMM's own output, no fp32 copy to add and convert); one that several
    # levels use accumulates them in fp32.
    trained = [a for lvl in range(lowest, levels) for a in train_levels[lvl]]
    half = wd.dtype if (wd.dtype != torch.float32 and dev.type == "cuda") else torch.float32
    once = len(trained) == len(set(trained)) and half == wd.dtype  # (on a CPU, half weights take fp32 GEMMs)
    grads = {k: torch.zeros(t.shape, device=dev, dtype=t.dtype if once else torch.float32) if need else None
             for (k, t), need in zip(weights.items(), needs[4:], strict=True)}  # fmt: skip
    uniform_rows = routes.stride(0) == 0
    dot_fp32, precision = _dot_mode(h, wd)
    off = host_offsets
    max_rank = _max_rank(off)
    tiles = _tiles(max_rank)
    path = _tile_path(m, uniform_rows, max_rank, tiles)
    # per-level views made in one op each, and one dz buffer and dummy x shared by the levels that train nothing
    zs_l, stats_l, rs_l, routes_l = zs.unbind(0), stats.unbind(0), rs.unbind(0), routes.unbind(1)
    dz_any, x_none = None, None
    # what every level's launch shares: the tensors, sizes and strides that do not change between levels (the views
    # of rs and routes have one layout), the model LN's gradient switch and the path candidates (the level's adapter
    # is known on the host for all levels or none)
    lnw_arg, lnb_arg = (lnw, lnb) if lnw is not None else (h2, h2)
    sizes = (m, hidden, rt, scale.shape[0])
    rp_strides = {0: h2.stride(), 1: rs.stride()[1:]}
    fixed_strides = (*y2.stride(), *wd.stride(), *wu.stride(), routes.stride(0))
    level_ln_grad = ln_grad and flags["IN_LN"]
    candidates = bottleneck_dispatch._with_levels(
        _level_candidates(tiles) if m >= bottleneck_dispatch.TUNE_MIN_ROWS else (tiles,), m, hidden, max_rank,
        wd.dtype, uniform is not None,
    )  # fmt: skip
    key_head = ("level backward", min(next_pow2(m), 1 << 16), hidden, tiles.BLOCK_R, h.dtype, wd.dtype)
    key_tail = (candidates[0] == bottleneck_dispatch.LEVELS, len(candidates))
    for lvl in reversed(range(lowest, levels)):
        level_adapter = uniform[lvl] if uniform is not None else None
        if level_adapter is not None and level_adapter < 0:
            continue  # every row skips this level: g and dy pass through unchanged
        train = train_levels[lvl]
        route = routes_l[lvl]
        masks = {a: None if uniform_rows else (route == a).unsqueeze(1) for a in train}
        if train and (grads["wu"] is not None or grads["bu"] is not None):
            gw = g.to(half)
            for a in train:  # dWu = s g^T act(z), dbu = s sum(g) over the rows routed to a
                if grads["wu"] is not None:
                    act = _TORCH_ACTS[host_codes[a]](zs_l[lvl][:, off[a] : off[a + 1]])
                    act = (act * host_scales[a] if masks[a] is None else act * (masks[a] * host_scales[a])).to(half)
                    _add_grad(grads["wu"][:, off[a] : off[a + 1]], gw.t(), act, once)
                if grads["bu"] is not None:
                    ga = g if masks[a] is None else g * masks[a]
                    _add_grad(grads["bu"][a], ga.sum(0), host_scales[a], once)
        need_x = bool(train) and grads["wd"] is not None
        # torch reads dz (zero outside each block's units) only for the weight gradients; the kernel reads back
        # just what it wrote
        need_dz = bool(train) and (grads["wd"] is not None or grads["bd"] is not None)
        if need_dz:
            dz = torch.zeros((m, rt), device=dev, dtype=torch.float32)
        else:
            dz = dz_any = torch.empty((m, rt), device=dev, dtype=torch.float32) if dz_any is None else dz_any
        if need_x:
            x = torch.empty((m, hidden), device=dev, dtype=half)
        else:
            x = x_none = torch.empty((1, 1), device=dev, dtype=half) if x_none is None else x_none
        rp = h2 if lvl == 0 else rs_l[lvl - 1]

        if level_ln_grad:
            pw.zero_()
            pb.zero_()
        z, st = zs_l[lvl], stats_l[lvl]
        args = (
            g, dy, rp, y2, z, dz, x, wd, wu,
            unit_owner, unit_act, scale, offsets, route,
            lnw_arg, lnb_arg, st, pw, pb,
            *sizes, *rp_strides[min(lvl, 1)], *fixed_strides,
        )  # fmt: skip
        switches = _level_switches(options, lnw is not None, need_x, level_ln_grad, not dy_is_g, dot_fp32, precision,
                                   path)  # fmt: skip

        key = (*key_head, tuple(switches.values()), *key_tail)

        def launch(t, direct=False, args=args, switches=switches, key=key,
                   level=(rp, z, dz, x if need_x else None, st, level_adapter)):  # fmt: skip
            if t == bottleneck_dispatch.LEVELS:
                rp, z, dz, x, st, level_adapter = level
                level_bwd_levels(g, dy, rp, y2, z, dz, x, wd, wu, lnw, lnb, st, pw if level_ln_grad else None,
                                 pb if level_ln_grad else None, level_adapter, (host_offsets, host_codes, host_scales),
                                 flags, half, not dy_is_g)  # fmt: skip
            elif direct:  # the chosen tiles' launch, recorded per geometry (the levels' views differ in alignment)
                launch_by_signature(_RECORDED, (dev, key, t), _bottleneck_level_bwd_kernel, (cdiv(m, t.BLOCK_M),),
                                    {**switches, **t.launch()}, args, 19)  # fmt: skip
            else:
                _bottleneck_level_bwd_kernel[(cdiv(m, t.BLOCK_M),)](*args, **switches, **t.launch())

        def snapshot():  # timing runs update g and dy in place and write partial sums
            g0, dy0 = g.clone(), dy.clone()

            def restore():
                g.copy_(g0)
                dy.copy_(dy0)
                pw.zero_()
                pb.zero_()

            return restore

        launch(bottleneck_dispatch._tuned_tiles(key, candidates, launch, snapshot, dev), direct=True)
        if level_ln_grad:
            dln_w += pw.sum(0)
            dln_b += pb.sum(0)
        for a in train:  # dWd = dz^T x, dbd = sum(dz) (dz is zero on rows not routed to a)
            dza = dz[:, off[a] : off[a + 1]]
            if grads["wd"] is not None:
                _add_grad(grads["wd"][off[a] : off[a + 1]], dza.to(half).t(), x, once)
            if grads["bd"] is not None:
                _add_grad(grads["bd"][off[a] : off[a + 1]], dza.sum(0), 1.0, once)
    dh = g.to(h.dtype).reshape(h.shape) if needs[0] else None
    # (a copy when taken from g: dh may be g itself, and the op's outputs must not alias)
    dyo = (g if dy_is_g else dy).to(y.dtype, copy=dy_is_g).reshape(y.shape) if (y is not None and needs[1]) else None
    dlw = dln_w.to(lnw.dtype) if (ln_grad and needs[2]) else None
    dlb = dln_b.to(lnb.dtype) if (ln_grad and needs[3]) else None
    return [dh, dyo, dlw, dlb] + [grads[k].to(weights[k].dtype) if grads[k] is not None else None for k in weights]
