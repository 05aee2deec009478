"""Fused LoRA linear: ``y = x W^T + b + sum_i scale_i * (x A_i^T) B_i^T`` with the base matmul and the low-rank
update accumulated in one output tile.

One formulation covers one adapter, several summed adapters (PEFT's multi-adapter semantics) and mixed batches
(``adapter_ids`` per row). The N resident adapters are stacked along the rank axis::

    A_cat (R, K) = cat(A_i)      B_cat (N_out, R) = cat(B_i, dim=1)      R = sum r_i
    rank_scale[r] = scale of the adapter owning rank column r, rank_adapter[r] = its index
    C[m, r] = rank_scale[r] if rank_adapter[r] is active for row m else 0
    u = (x_lora A_cat^T) * C           (M, R)   rounded to the input dtype, as PEFT rounds x A^T
    y = x W^T + b + u B_cat^T          (M, N_out)

Without ``adapter_ids`` every adapter is active for every row; ``adapter_ids[m] == -1`` means base only.

Layers, as everywhere in this package: the launchers (``lora_linear_fwd`` / ``lora_linear_bwd``, each with a torch
twin of the same signature) of the op's kernels, then the autograd Function and a torch custom op (used under
``torch.compile``), then the functional API ``lora_linear`` and its twin ``lora_linear_reference``. The kernels have
files of their own: the tiled kernel (kernels/lora_linear_tiled.py), the persistent one (kernels/lora_linear_tma.py),
the mixed batch's (kernels/lora_segmented.py). The host-side preparation of the op's inputs (argument checks, per-row
ids, rank tables, the stacked ``A_cat`` / ``B_cat`` and their caches, the rows grouped by adapter) is
kernels/lora_inputs.py.

Forward paths (``path=``; ``"auto"`` picks by M, see ``DISPATCH``):
  * ``"fused"``: one launch of the tiled kernel; its K loop also accumulates ``x A_cat^T`` (recomputed per N tile:
    cheap while M is small and the op is memory bound). At M <= 64 the autotuner may also pick split-K tiles.
  * ``"epilogue"``: ``u`` from one torch matmul, then the tiled kernel adds ``u B_cat^T`` in its epilogue.
  * ``"addmm"``: the low-rank term (+ bias) is written first, then cuBLAS accumulates ``x W^T`` onto it with
    ``beta=1`` (``y.addmm_``): one pass over ``y`` fewer than ``"composition"``. The low-rank term + bias is
    rounded to the output dtype before the sum, and cuBLAS's ``beta=1`` accumulation appears to add about one
    more rounding: on the H100 its bf16 ``y`` error is 1.02-1.03x PEFT's where a one-rounding-per-GEMM model of
    its order predicts 0.92x (see the CUDA test); the other paths stay at or below PEFT's. Its backward uses the
    ``"composition"`` order for ``dx``.
  * ``"composition"``: ``F.linear`` then ``y.addmm_(u, B^T)``, the best plain-torch order (benchmark provider).
  * ``"persistent"``: the ``"epilogue"`` math on a Hopper-grade main loop (kernels/lora_linear_tma.py: persistent
    grid, TMA descriptors, the shrink fused or from cuBLAS), for 16-bit operands with 16-byte aligned rows on
    sm_90+; elsewhere it falls back to ``"epilogue"``.
  * ``"segmented"`` (mixed batches only: needs ``adapter_ids``): ``F.linear``, then each row's own adapter term
    from kernels/lora_segmented.py (rows grouped by adapter on the device; SGMV shrink and expand). The masked paths
    above do ``M * R * (K + N)`` low-rank work for R = the sum of all resident ranks; this one ``M * r * (K + N)``
    with r = the row's own rank. u is rounded once after its scale (as in the Triton kernel), y once after cuBLAS's
    base (as ``"composition"``); ``u`` is then (M, U) with rows in adapter order (U: the max rank rounded up to a
    power of two >= 16), not (M, R).

Up to ``fused_max_m`` rows ``"auto"`` times ``"fused"``, ``"epilogue"`` and ``"composition"`` once per M bucket and
shape on the GPU and keeps the fastest (``_small_m_choice``; untimed, ``"fused"``). Above, it times ``"composition"``
against the persistent kernel's tiles (``_large_m_choice``; untimed, ``"composition"``). It takes ``"segmented"`` for a
mixed batch of several resident adapters on the Triton backend when the masked paths would do more work
(``LoraLinearDispatch``); torch.compile traces the same choice. Serving such a batch, it times ``"segmented"``
against a GEMM adding each row's own adapter in its epilogue: the tiled kernel up to ``fused_max_m`` rows, the
persistent one above (``_serve_mixed``).

The tiled kernel's launches (``"fused"``, ``"epilogue"``) are planned once per geometry of the operands and then
repeated (``lora_linear_tiled.TiledLaunch``): a small-M call is mostly host time, and on a GPU the repeat calls the
compiled kernel directly instead of through Triton's launcher (``_backend.DirectLaunch``).

The torch paths (``"addmm"``, ``"composition"``) are cuBLAS GEMMs and nothing else when every adapter shares one
scale and there are no ``adapter_ids`` (the common case): the scale is the GEMM's ``alpha`` (``u = addmm_(beta=0,
alpha=scale)``: fp32 accumulator scaled, rounded once, as in the kernel; no (M, R) fp32 temporary). Several
scales multiply the rounded ``x A^T`` in place (one more rounding of ``u``, as PEFT's ``* scaling`` rounds);
``adapter_ids`` zero the inactive columns in place. Forward: 3 GEMMs; backward (grads for x, A, B):
``du = dy B * C``, ``dx = dy W`` then ``dx.addmm_(du, A)``, ``dA = du^T x``, ``dB = dy^T u``: 5 GEMMs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._backend import AUTOTUNE, INTERPRET, capturing, fastest, next_pow2, record, use_triton
from .lora_inputs import _adapter_lists, _rank_tables, _row_ids, _segments_cached, _stack, _stack_cached, _validate
from .lora_linear_tiled import lora_linear_tiled_fwd
from .lora_linear_tma import TmaTiles, lora_linear_tma_fwd, rank_tile, tma_candidates, tma_fits
from .lora_segmented import (
    SegmentPlan,
    lora_segmented_bwd,
    lora_segmented_bwd_reference,
    lora_segmented_fwd,
    lora_segmented_fwd_reference,
    lora_shrink,
    plan_segments,
    u_width,
)

logger = logging.getLogger(__name__)

PATHS = ("auto", "fused", "epilogue", "addmm", "composition", "persistent", "segmented")


@dataclass
class LoraLinearDispatch:
    """Shape dispatch of ``path="auto"`` (tune on the GPU from ``bench/bench_lora_linear.py``).

    fused_max_m: rows up to which the tiled kernel's single launch is used: its fused-shrink form, its cuBLAS-shrink
    form or ``"composition"``, whichever timed fastest for the M bucket and shape (``_small_m_choice``).
    large_m_path: the path used above ``fused_max_m``: ``"timed"`` (``"composition"`` or ``"persistent"``, whichever
    measured faster for the shape on this GPU), or one of ``"addmm"``, ``"epilogue"``, ``"composition"``,
    ``"persistent"``.
    segmented_min_adapters / segmented_max_fused_rank: a mixed batch (``adapter_ids``) with at least
    ``segmented_min_adapters`` resident adapters takes ``"segmented"`` on the Triton backend, except at
    ``M <= fused_max_m`` while the stacked rank R is at most ``segmented_max_fused_rank``.

    Why (no GPU measurement yet; retune from bench/bench_lora_linear.py's mixed rows): above ``fused_max_m`` the
    masked path costs 5 launches (GEMM, shrink, id mask, mask multiply, expand) and ``M * R * (K + N)`` low-rank
    FLOPs; the segmented path 3 launches (GEMM, shrink, expand; the row grouping is cached per ids tensor) and
    ``M * r * (K + N)``, reading x and y as often, so it is not worse from 2 adapters on and its advantage grows
    with R. At small M the one fused launch wins on launch count while its (BLOCK_M, R) accumulator and R-wide
    A_cat tiles stay small: up to R = 64 (4 adapters of rank 16), as tuned for one adapter of rank <= 64.
    """

    fused_max_m: int = 64
    # H100, bf16, r=16 (bench/results/2026-11-26-h100-session1): above 64 rows "composition" beat "addmm" in 5 of
    # 6 shape/M cases (e.g. 0.26 vs 0.43 ms at 4096x4096, M=4096), and the CUDA tier flagged "addmm" at M >= 256;
    # "epilogue" (pointer loads, 1.20-1.38x cuBLAS for the plain matmul) lost too. "persistent" is not measured yet,
    # so it is timed against "composition", the untimed choice.
    large_m_path: str = "timed"
    segmented_min_adapters: int = 2
    segmented_max_fused_rank: int = 64


DISPATCH = LoraLinearDispatch()


# ----------------------------------------------------------------------------------------------------------------
# Launchers and their torch twins
# ----------------------------------------------------------------------------------------------------------------
def coefficients(rank_scale: torch.Tensor, rank_adapter: torch.Tensor, adapter_ids: torch.Tensor | None):
    """C: (M, R) fp32 (or (1, R) without ids) = rank_scale where the column's adapter is active for the row."""
    if adapter_ids is None:
        return rank_scale[None, :]
    return torch.where(adapter_ids[:, None] == rank_adapter[None, :], rank_scale[None, :], 0.0)


def _alloc(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Kernel outputs (tests replace this to hand the kernel NaN-poisoned buffers)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _wants_segmented(path: str, m: int, ranks: Sequence[int], ids: torch.Tensor | None, x: torch.Tensor) -> bool:
    """``path="auto"`` on a mixed batch: the segmented path when it needs less work (``mixed_batch_path``)."""
    return path == "auto" and ids is not None and mixed_batch_path(m, ranks, x) == "segmented"


def mixed_batch_path(rows: int, ranks: Sequence[int], like: torch.Tensor) -> str:
    """The path ``path="auto"`` takes for a mixed batch (``adapter_ids``) of ``rows`` rows over resident adapters of
    ``ranks``, on ``like``'s device (``LoraLinearDispatch``): ``"segmented"`` (each row computes its own adapter's
    term only) or ``"masked"`` (every adapter's rank columns for every row, inactive ones zeroed: a non-finite weight
    of one adapter reaches every row of the launch)."""
    d = DISPATCH
    segmented = (
        len(ranks) >= d.segmented_min_adapters
        and use_triton(like)
        and (rows > d.fused_max_m or sum(ranks) > d.segmented_max_fused_rank)
    )
    return "segmented" if segmented else "masked"


def _rank_major_b(path: str, t: torch.Tensor) -> bool:
    """Stack B_cat rank-major (``lora_inputs._stack``) for the segmented Triton kernels: the forward's expand then
    loads its B tiles as 16-byte vectors along N, and the backward's shrink of ``dy B_cat`` streams along N too."""
    return path == "segmented" and use_triton(t)


def _operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u: bool) -> tuple:
    """The geometry of ``lora_linear_fwd``'s operands (shapes, strides, dtype, device, switches): the key of the small-M
    choice and, with whether the shrink is fused, of the tiled kernel's recorded launch."""
    (M, K), (N, R) = x.shape, lora_B.shape
    return (
        M, N, K, R, x.dtype, x.device, x.stride(), weight.stride(), lora_A.stride(), lora_B.stride(), bias is None,
        adapter_ids is None, store_u, x_lora is None,
    )  # fmt: skip


def _pick_path(path: str, m: int, fusable: bool) -> str:
    if path == "auto":
        path = "fused" if m <= DISPATCH.fused_max_m else DISPATCH.large_m_path
    if path == "fused" and not fusable:
        path = "epilogue"
    return path


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    path: str = "auto",
    store_u: bool = True,
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher on 2-D operands (already validated by the functional API).

    x: (M, K); weight: (N, K) any strides; lora_A: (R, K); lora_B: (N, R); rank_scale: (R,) fp32;
    rank_adapter: (R,) int32; bias: (N,); adapter_ids: (M,) int32; x_lora: (M, K) adapter input (dropout) or
    None for x; shared_scale: the one scale of every rank when they share it (a host float, equal to every
    entry of ``rank_scale``), else None. Returns y (M, N) and u = (x_lora A^T) * C (M, R) in x's dtype (None
    unless ``store_u``; the torch paths always return it). Path ``"segmented"``: ``segments`` (from
    ``plan_segments(adapter_ids, ranks, scales)``) replaces the rank tables and u is (M, U), rows in adapter order
    (kernels/lora_segmented.py).
    """
    if path == "segmented":
        fwd = lora_segmented_fwd if use_triton(x) else lora_segmented_fwd_reference
        return fwd(x, weight, lora_A, lora_B, _need_plan(segments), bias, x_lora, store_u=store_u)
    if not use_triton(x):
        return lora_linear_fwd_reference(
            x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
            path=path, store_u=store_u, shared_scale=shared_scale,
        )  # fmt: skip
    M, K = x.shape
    N, R = lora_B.shape
    operands = None  # their geometry (shapes, strides, dtype, device, switches): the recorded launches' key
    if path == "auto" and 0 < M <= DISPATCH.fused_max_m:  # the tiled kernel or "composition", as timed
        operands = _operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u)
        paths = _SMALL_M_PATHS.get(operands)
        if paths is None:
            paths = _small_m_choice(
                operands, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, shared_scale
            )  # fmt: skip
        path = paths[0] if paths[0] == paths[1] or not capturing(x) else paths[1]  # (eager, graphed)
    else:
        path = _pick_path(path, M, fusable=x_lora is None)
    tiles = None
    if path in ("timed", "persistent"):
        path, tiles = _large_m_choice(
            path, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, store_u, shared_scale
        )
    if path in ("addmm", "composition"):
        return _torch_paths(
            x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path, shared_scale
        )
    if tiles is not None:
        y = _alloc((M, N), x)
        u_out = _alloc((M, R), x) if store_u else None
        lora_linear_tma_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                            tiles)  # fmt: skip
        return y, u_out
    if M == 0:
        return _alloc((M, N), x), (_alloc((M, R), x) if store_u else None)
    if operands is None:
        operands = _operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u)
    y = _alloc((M, N), x)
    u_out = _alloc((M, R), x) if store_u else None
    lora_linear_tiled_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u_out,
                          (*operands, path == "fused"))  # fmt: skip
    return y, u_out


_LARGE_M: dict[tuple, str | TmaTiles] = {}  # timing key -> "composition" or the persistent kernel's fastest tiles
_LARGE_M_GRAPHED: dict[tuple, str | TmaTiles] = {}  # the same, by GPU time alone: for CUDA-graph captures


def _large_m_candidates(path: str, fusable: bool, block_r: int, rows: int) -> tuple[str | TmaTiles, ...]:
    """What ``_large_m_choice`` times: the persistent kernel's tiles, after ``"composition"`` for ``"timed"``
    (only ``"composition"`` under the interpreter, which has no GPU timer)."""
    if path == "persistent":
        return tma_candidates(fusable, block_r, rows)
    return ("composition",) if INTERPRET else ("composition", *tma_candidates(fusable, block_r, rows))


def _large_m_choice(
    path, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, store_u, shared_scale
):
    """``(path, tiles)`` for ``"timed"`` and ``"persistent"`` (shapes as ``lora_linear_fwd``): ``("persistent",
    TmaTiles)`` when the persistent kernel runs, else ``("composition" | "epilogue", None)``.

    ``"timed"`` measures ``"composition"`` (the untimed choice) against the persistent kernel's tiles once per shape
    and keeps the faster; forced ``"persistent"`` times its own tiles. ``_backend.fastest`` times GPU work by
    CUDA-graph replay and the host's enqueue time: eager calls take the least of the larger of the two, a CUDA-graph
    capture the least GPU time. Timing runs on the GPU (any device when a test hands ``do_bench`` a CPU timer) with
    ``ADAPTER_ENGINE_AUTOTUNE`` on and never during a capture; otherwise the first candidate runs. The kernel is only
    offered where :func:`tma_fits` (aligned 16-bit rows, a stacked rank tile of at most 64); forced ``"persistent"``
    falls back to ``"epilogue"`` (the same math on pointer loads) elsewhere."""
    M = x.shape[0]
    N, R = lora_B.shape
    if not tma_fits(x, weight, R):
        return ("epilogue" if path == "persistent" else "composition"), None
    fusable = x_lora is None
    key = (
        path, min(next_pow2(M), 1 << 16), N, x.shape[1], R, x.dtype, weight.stride(-1) == 1, lora_A.stride(-1) == 1,
        bias is not None, adapter_ids is not None, fusable, store_u, shared_scale is None,
    )  # fmt: skip
    choice = (_LARGE_M_GRAPHED if capturing(x) else _LARGE_M).get(key)
    if choice is None:
        candidates = _large_m_candidates(path, fusable, rank_tile(R), M)
        if len(candidates) == 1 or not AUTOTUNE or capturing(x):
            choice = candidates[0]
        else:
            y = _alloc((M, N), x)
            u = _alloc((M, R), x) if store_u else None

            def launch(c):
                if c == "composition":
                    args = (rank_scale, rank_adapter, bias, adapter_ids, x_lora, c, shared_scale)
                    _torch_paths(x, weight, lora_A, lora_B, *args)
                else:
                    args = (rank_scale, rank_adapter, bias, adapter_ids, x_lora, y, u, c)
                    lora_linear_tma_fwd(x, weight, lora_A, lora_B, *args)

            timing = fastest(candidates, launch, x.device)
            choice, graphed = timing.eager, timing.graphed
            if min(timing.gpu_ms) == float("inf"):  # no tile builds on this GPU: the same math on pointer loads
                choice = graphed = "epilogue"
            _LARGE_M[key], _LARGE_M_GRAPHED[key] = choice, graphed
            logger.info("lora_linear %s: %s, graphed %s (GPU %s ms; host %s ms)", key, choice, graphed,
                        ", ".join(f"{t:.4f}" for t in timing.gpu_ms), timing.host_ms)  # fmt: skip
    return (choice, None) if isinstance(choice, str) else ("persistent", choice)


# up to fused_max_m rows (_small_m_choice): timing key -> (the path of eager calls, the path of graph captures)
_SMALL_M: dict[tuple, tuple[str, str]] = {}
_SMALL_M_PATHS: dict[tuple, tuple[str, str]] = {}  # the operands' geometry -> the same pair (one lookup per call)


def _small_m_candidates(path: str) -> tuple[str, ...]:
    """What ``_small_m_choice`` times: ``path`` (``"fused"``, or ``"epilogue"`` where a dropout input cannot fuse the
    shrink) first, then the other tiled-kernel path and ``"composition"`` (only ``path`` under the interpreter, which
    has no GPU timer)."""
    if INTERPRET:
        return (path,)
    return ("fused", "epilogue", "composition") if path == "fused" else ("epilogue", "composition")


def _small_m_choice(
    operands, x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, shared_scale
) -> tuple[str, str]:
    """The paths of ``"auto"`` at up to ``fused_max_m`` rows, for eager calls and for CUDA-graph captures (shapes as
    ``lora_linear_fwd``; ``operands``: their geometry, ``lora_linear_fwd``'s key): the tiled kernel with the shrink
    fused (``"fused"``), the tiled kernel adding a cuBLAS shrink's u in its epilogue (``"epilogue"``), or cuBLAS and
    ``addmm_`` (``"composition"``), timed once per M bucket (powers of two) and shape by ``_backend.fastest`` as
    ``_large_m_choice`` times its candidates: eager calls take the least of the larger of host and GPU time, a
    capture the least GPU time. Each new geometry looks its bucket's pair up once (``_SMALL_M_PATHS``).

    Why (session 15's H100, 4096 x 4096 and 4096 x 11008, bf16, r = 16, graphed): no path won every row. At M = 1
    ``"composition"`` took 0.995x the bare matmul at 4096 x 4096 where the fused launch took 1.218x, and
    ``"epilogue"`` 1.170x at 4096 x 11008 against 1.291x; at M = 16 the fused launch won at 4096 x 4096 (0.879x)
    and ``"epilogue"`` at 4096 x 11008. Eager calls at these sizes are host time on that machine's host (a bare
    ``F.linear`` enqueued in 20 us, the engine's call in 125 us), where three cuBLAS launches may cost less than
    one Triton launch. Untimed (interpreter, timing off, inside a capture of an untimed shape, where nothing is
    kept): the fused launch, or ``"epilogue"`` for a dropout input."""
    path = _pick_path("auto", x.shape[0], fusable=x_lora is None)
    candidates = _small_m_candidates(path)
    M, N, K, R, dtype, device, _, w_strides, a_strides, _, no_bias, no_ids, store_u, fusable = operands
    key = (next_pow2(M), N, R, K, dtype, device, w_strides[-1] == 1, a_strides[-1] == 1, no_bias, no_ids, store_u,
           fusable)  # fmt: skip
    paths = _SMALL_M.get(key)
    if paths is None:
        if capturing(x):  # nothing is timed or kept inside a capture: the eager call after it times them
            return path, path
        if len(candidates) == 1 or not AUTOTUNE:
            paths = path, path
        else:

            def launch(c):
                lora_linear_fwd(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
                                path=c, store_u=store_u, shared_scale=shared_scale)  # fmt: skip

            for c in candidates:  # the tiled paths' autotuning and recorded launches happen here, outside the timing
                launch(c)
            timing = fastest(candidates, launch, x.device)
            paths = _SMALL_M[key] = timing.eager, timing.graphed
            logger.info("lora_linear small M %s: %s, graphed %s (GPU %s ms; host %s ms)", key, *paths,
                        ", ".join(f"{t:.4f}" for t in timing.gpu_ms), timing.host_ms)  # fmt: skip
    record(_SMALL_M_PATHS, operands, paths)
    return paths


class RowAdapterTiles(NamedTuple):
    """A candidate of ``_serve_mixed``: the persistent kernel's ``tiles`` adding each row's own adapter's term in its
    epilogue, from u by row that the segmented shrink writes (``lora_linear_tma_fwd(rows=...)``)."""

    tiles: TmaTiles


# The candidate of ``_serve_mixed`` at up to ``fused_max_m`` rows: the tiled kernel (its autotuned tile) adding each
# row's own adapter's term in its epilogue, from u by row (``lora_linear_tiled_fwd(rows=...)``).
TILED_ROW_ADAPTERS = "tiled row adapters"

_MIXED: dict[tuple, str | RowAdapterTiles] = {}  # timing key -> the choice of _serve_mixed
_MIXED_GRAPHED: dict[tuple, str | RowAdapterTiles] = {}  # the same, by GPU time alone: for CUDA-graph captures


def _serve_mixed(x, weight, lora_A, lora_B, bias, ids, plan: SegmentPlan) -> torch.Tensor:
    """y for inference on a mixed batch that ``"auto"`` sends to the segmented path (operands as ``lora_linear_fwd``'s
    with ``segments=plan``, ``ids`` (M,) int32), timed once per shape, as ``_large_m_choice`` times its candidates:
    ``"segmented"`` (a cuBLAS GEMM, the shrink, and an expand that reads and writes y once more) against a GEMM that
    adds each row's own adapter's term in its epilogue, from u by row that the segmented shrink writes (two launches,
    and no second pass over y: 2 of the about 17 bytes per output element that a 4096-row layer of 4 rank-16 adapters
    moves). Up to ``fused_max_m`` rows that GEMM is the tiled kernel (``TILED_ROW_ADAPTERS``); above, the persistent
    one (``RowAdapterTiles``), where the widest adapter's rank fits its rank tile (:func:`tma_fits`). Both read no
    adapter but the row's own (a serving layer fuses every resident adapter, used or not). The fastest is kept.
    Untimed (interpreter, timing off, inside a CUDA-graph capture of an untimed shape): ``"segmented"``.

    What to expect (session 15's H100): at rank tile 16 the persistent kernel's 128 x 256 tiles with the low-rank
    term in the epilogue beat cuBLAS's GEMM alone at every shape of the Llama-shaped model by about 10% (4096 rows);
    at 16 rows the tiled kernel took 0.88x cuBLAS's time (graphed, 4096 x 4096, one adapter). The persistent kernel
    with every resident adapter's rank columns masked per row (session 17's candidate) is not offered: it does more
    work, and a non-finite weight of an unused adapter reached every row of its tiles."""
    M, N = x.shape[0], lora_B.shape[0]
    choice = "segmented"
    small = M <= DISPATCH.fused_max_m
    if small or tma_fits(x, weight, plan.r_max):
        key = (min(next_pow2(M), 1 << 16), N, x.shape[1], plan.ranks, x.dtype, weight.stride(-1) == 1, bias is None)
        choice = (_MIXED_GRAPHED if capturing(x) else _MIXED).get(key)
        if choice is None:
            choice = "segmented"
            candidates = _mixed_candidates(small, plan.u_width, M)
            if len(candidates) > 1 and AUTOTUNE and not capturing(x):
                y = _alloc((M, N), x)
                for c in candidates:  # (the tiled kernel's autotuning and the launches' compiles, before the timing)
                    _mixed_launch(c, x, weight, lora_A, lora_B, bias, ids, plan, y)
                timing = fastest(candidates, lambda c: _mixed_launch(c, x, weight, lora_A, lora_B, bias, ids, plan, y),
                                 x.device)  # fmt: skip
                choice, _MIXED_GRAPHED[key] = timing.eager, timing.graphed
                _MIXED[key] = choice
                logger.info("lora_linear mixed %s: %s, graphed %s (GPU %s ms; host %s ms)", key, choice,
                            timing.graphed, ", ".join(f"{t:.4f}" for t in timing.gpu_ms), timing.host_ms)  # fmt: skip
    if choice == "segmented":
        return lora_linear_fwd(
            x, weight, lora_A, lora_B, None, None, bias, ids, None, path="segmented", store_u=False, segments=plan
        )[0]
    y = _alloc((M, N), x)
    _mixed_launch(choice, x, weight, lora_A, lora_B, bias, ids, plan, y)
    return y


def _mixed_launch(choice, x, weight, lora_A, lora_B, bias, ids, plan: SegmentPlan, y: torch.Tensor) -> None:
    """Runs ``_serve_mixed``'s ``choice``: y written (``"segmented"``: a y of its own, for the timing only)."""
    if choice == "segmented":
        lora_segmented_fwd(x, weight, lora_A, lora_B, plan, bias, store_u=False)
        return
    u = lora_shrink(x, lora_A, plan, by_row=True)
    if choice == TILED_ROW_ADAPTERS:
        geometry = (
            "row adapters",
            *x.shape,
            lora_B.shape,
            plan.u_width,
            plan.n,
            x.dtype,
            x.device,
            x.stride(),
            weight.stride(),
            lora_B.stride(),
            bias is None,
            False,
        )  # fmt: skip  (last: the shrink is not fused)
        lora_linear_tiled_fwd(x, weight, lora_A, lora_B, plan.scale, plan.rank_off, bias, ids, None, y, None,
                              geometry, rows=(u, plan.rank_off))  # fmt: skip
    else:
        lora_linear_tma_fwd(x, weight, lora_A, lora_B, plan.scale, plan.rank_off, bias, ids, None, y, None,
                            choice.tiles, rows=(u, plan.rank_off))  # fmt: skip


def _mixed_candidates(small: bool, u_width: int, rows: int) -> tuple:
    """What ``_serve_mixed`` times: ``"segmented"``, then a GEMM with each row's own adapter in its epilogue: the
    tiled kernel up to ``fused_max_m`` rows (``small``), the persistent kernel's tiles at rank tile ``u_width``
    above. Only ``"segmented"`` under the interpreter, which has no GPU timer."""
    if INTERPRET:
        return ("segmented",)
    if small:
        return ("segmented", TILED_ROW_ADAPTERS)
    return ("segmented", *(RowAdapterTiles(t) for t in tma_candidates(False, u_width, rows)))


def _need_plan(segments: SegmentPlan | None) -> SegmentPlan:
    if segments is None:
        raise ValueError('path "segmented" needs segments=plan_segments(adapter_ids, ranks, scales)')
    return segments


def _shrink(inp, factor, rank_scale, rank_adapter, adapter_ids, shared_scale):
    """``(inp @ factor) * C`` (M, R) in inp's dtype with as few launches as the case allows (torch paths).

    inp: (M, K); factor: (K, R) (``A_cat^T`` forward, ``B_cat`` backward). ``shared_scale`` (every rank's scale,
    known on the host) becomes the GEMM's alpha: fp32 accumulator times scale, rounded once, no temporary. Without
    it the rounded product is scaled in place by ``rank_scale`` (computed in fp32, rounded again). ``adapter_ids``
    then zero the columns of adapters inactive in each row, in place (an exact multiply by 0 or 1).
    """
    if shared_scale is not None:
        u = inp.new_empty((inp.shape[0], factor.shape[1])).addmm_(inp, factor, beta=0, alpha=shared_scale)
        if adapter_ids is not None:
            u.mul_(adapter_ids[:, None] == rank_adapter[None, :])
        return u
    return torch.mm(inp, factor).mul_(coefficients(rank_scale, rank_adapter, adapter_ids))


def _torch_paths(x, weight, lora_A, lora_B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path, shared_scale):
    """``"addmm"``: y = b + u B^T, then y += x W^T inside cuBLAS (beta=1). ``"composition"``: the reverse."""
    u = _shrink(x if x_lora is None else x_lora, lora_A.t(), rank_scale, rank_adapter, adapter_ids, shared_scale)
    if path == "addmm":
        y = torch.addmm(bias, u, lora_B.t()) if bias is not None else u @ lora_B.t()
        return y.addmm_(x, weight.t()), u
    y = torch.nn.functional.linear(x, weight, bias)
    return y.addmm_(u, lora_B.t()), u


def lora_linear_fwd_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    *,
    path: str = "auto",
    store_u: bool = True,
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch twin of ``lora_linear_fwd``: fp32 accumulation, u rounded to the input dtype, y rounded once."""
    if path == "segmented":  # its u has another layout: (M, U), rows in adapter order
        return lora_segmented_fwd_reference(
            x, weight, lora_A, lora_B, _need_plan(segments), bias, x_lora, store_u=store_u
        )
    del path, shared_scale  # one torch formulation serves every path; rank_scale holds the scales
    if x.dtype == torch.float32 or x.device.type == "cuda":
        u = (x if x_lora is None else x_lora) @ lora_A.t()
        u = (u.float() * coefficients(rank_scale, rank_adapter, adapter_ids)).to(x.dtype)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        return y.addmm_(u, lora_B.t()), (u if store_u else None)
    f = lambda t: None if t is None else t.float()  # CPU half matmuls: upcast, round once
    u = f(x if x_lora is None else x_lora) @ f(lora_A).t()
    u = (u * coefficients(rank_scale, rank_adapter, adapter_ids)).to(x.dtype)
    y = torch.addmm(f(bias), f(x), f(weight).t()) if bias is not None else f(x) @ f(weight).t()
    return y.addmm_(u.float(), f(lora_B).t()).to(x.dtype), (u if store_u else None)


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    *,
    path: str = "auto",
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward launcher. ``needs`` = which of (dx, dx_lora, dweight, dbias, dA_cat, dB_cat) to compute.

    dy: (M, N); x, x_lora: (M, K) (x_lora None: the adapter read x); u: (M, R), the forward's ``u * C``.
    With ``du = (dy B_cat) * C`` (M, R): ``dB_cat = dy^T u``, ``dA_cat = du^T x_lora``, ``dx = dy W + du A_cat``
    (without dropout; with it ``dx = dy W`` and ``dx_lora = du A_cat``), ``dW = dy^T x``, ``db = sum_m dy``.
    ``dx`` has the forward's form on transposed views (x' = dy, W' = W^T, A' = B_cat^T, B' = A_cat^T), so the
    fused forward kernel computes it, writing ``du`` as its ``u``, when ``path`` picks a Triton path for dy's rows.
    On the torch paths cuBLAS does it directly: ``du`` as in the forward (``_shrink``), ``dx = dy W`` and then
    ``dx.addmm_(du, A_cat)`` (``"addmm"`` too: the low-rank term is summed in fp32, not rounded first). Returns the
    six gradients (None if unneeded). ``shared_scale``, ``segments``: as in ``lora_linear_fwd``; path
    ``"segmented"`` (u in its layout) runs ``lora_segmented_bwd``.
    """
    if path == "segmented":
        bwd = lora_segmented_bwd if use_triton(dy) else lora_segmented_bwd_reference
        return bwd(dy, x, x_lora, weight, lora_A, lora_B, _need_plan(segments), u, needs)
    if not use_triton(dy):
        return lora_linear_bwd_reference(
            dy, x, x_lora, weight, lora_A, lora_B, rank_scale, rank_adapter, adapter_ids, u, needs,
            path=path, shared_scale=shared_scale,
        )  # fmt: skip
    need_dx, need_dxl, need_dw, need_db, need_da, need_dbb = needs
    dx = dxl = du = None
    dx_path = _pick_path(path, dy.shape[0], fusable=True)
    triton_dx = need_dx and x_lora is None and dx_path in ("fused", "epilogue", "persistent", "timed")
    if triton_dx:
        dx, du = lora_linear_fwd(
            dy, weight.t(), lora_B.t(), lora_A.t(), rank_scale, rank_adapter, None, adapter_ids,
            path=path, shared_scale=shared_scale,
        )  # fmt: skip
    elif need_dx:
        dx = torch.mm(dy, weight)
    if du is None and ((need_dx and x_lora is None) or need_da or need_dxl):
        du = _shrink(dy, lora_B, rank_scale, rank_adapter, adapter_ids, shared_scale)
    if need_dx and not triton_dx and x_lora is None:
        dx.addmm_(du, lora_A)
    if need_dxl:
        dxl = du @ lora_A
    dA = du.t() @ (x if x_lora is None else x_lora) if need_da else None
    dB = dy.t() @ u if need_dbb else None
    dW = dy.t() @ x if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dxl, dW, db, dA, dB


def lora_linear_bwd_reference(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: torch.Tensor,
    rank_adapter: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    *,
    path: str = "auto",
    shared_scale: float | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Torch twin of ``lora_linear_bwd`` (same formulas; CPU half precision upcast to fp32, rounded once)."""
    if path == "segmented":
        return lora_segmented_bwd_reference(dy, x, x_lora, weight, lora_A, lora_B, _need_plan(segments), u, needs)
    del path, shared_scale
    need_dx, need_dxl, need_dw, need_db, need_da, need_dbb = needs
    dt = dy.dtype
    up = (lambda t: t) if (dt == torch.float32 or dy.device.type == "cuda") else (lambda t: t.float())
    out = lambda t: None if t is None else t.to(dt)
    dyf, Af, Bf = up(dy), up(lora_A), up(lora_B)
    du = None
    if need_dx or need_dxl or need_da:
        du = ((dyf @ Bf).float() * coefficients(rank_scale, rank_adapter, adapter_ids)).to(dt)
    dx = dxl = None
    if need_dx:
        dx = dyf @ up(weight)
        if x_lora is None:
            dx = dx.addmm_(up(du), Af)
    if need_dxl:
        dxl = up(du) @ Af
    dA = up(du).t() @ up(x if x_lora is None else x_lora) if need_da else None
    dB = dyf.t() @ up(u) if need_dbb else None
    dW = dyf.t() @ up(x) if need_dw else None
    db = dyf.sum(0) if need_db else None
    return out(dx), out(dxl), out(dW), out(db), out(dA), out(dB)


# ----------------------------------------------------------------------------------------------------------------
# Autograd Function (eager) and torch custom ops (torch.compile)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    """Settings of one call: each adapter's rank and scale, the forward path, and for path ``"segmented"`` the
    rows grouped by adapter (``plan_segments``: integer device tensors, never differentiated)."""

    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    path: str = "auto"
    segments: SegmentPlan | None = None


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear on 2-D operands; inputs ``(settings, x, x_lora, weight, bias, adapter_ids, *As, *Bs)``.

    Saved for backward: x (only for dW, or for dA without dropout), x_lora (dropout only), u = (x_lora A^T) * C
    (M, R) for dB (path ``"segmented"``: (M, U), rows in adapter order), references to the weights and
    the stacked A_cat / B_cat (B_cat rank-major on the segmented Triton path, ``_rank_major_b``; for one adapter the
    factors themselves, B copied only for that layout; so the backward does not concatenate again); never an
    (M, N) or (N, K) temporary. Gradients are derived in ``lora_linear_bwd``; each adapter's dA_i / dB_i is a
    slice of dA_cat / dB_cat.
    """

    @staticmethod
    def forward(ctx, settings: LoraSettings, x, x_lora, weight, bias, adapter_ids, *factors):
        n = len(settings.ranks)
        A, B = _stack(factors[:n], factors[n:], _rank_major_b(settings.path, x))
        rank_scale, rank_adapter, shared = _rank_tables(settings.ranks, settings.scales, x.device)
        g = ctx.needs_input_grad
        need_da, need_dbb = any(g[6 : 6 + n]), any(g[6 + n :])
        y, u = lora_linear_fwd(
            x, weight, A, B, rank_scale, rank_adapter, bias, adapter_ids, x_lora,
            path=settings.path, store_u=need_dbb, shared_scale=shared, segments=settings.segments,
        )  # fmt: skip
        ctx.needs = (g[1], g[2] and x_lora is not None, g[3], bias is not None and g[4], need_da, need_dbb)
        keep_x = g[3] or (need_da and x_lora is None)
        ctx.save_for_backward(x if keep_x else None, x_lora if need_da else None, weight, adapter_ids, u, A, B)
        ctx.settings = settings
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, weight, adapter_ids, u, A, B = ctx.saved_tensors
        s: LoraSettings = ctx.settings
        n = len(s.ranks)
        rank_scale, rank_adapter, shared = _rank_tables(s.ranks, s.scales, dy.device)
        dx, dxl, dW, db, dA, dB = lora_linear_bwd(
            dy, x, x_lora, weight, A, B, rank_scale, rank_adapter, adapter_ids, u, ctx.needs,
            path=s.path, shared_scale=shared, segments=s.segments,
        )  # fmt: skip
        if n == 1:  # one adapter: its gradients are dA_cat / dB_cat themselves (no split op)
            return None, dx, dxl, dW, db, None, dA, dB
        dAs = dA.split(list(s.ranks), 0) if dA is not None else (None,) * n
        dBs = dB.split(list(s.ranks), 1) if dB is not None else (None,) * n
        return (None, dx, dxl, dW, db, None, *dAs, *dBs)


@torch.library.custom_op("adapter_engine::lora_linear_fwd", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scales: list[float],
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = _stack(lora_As, lora_Bs, _rank_major_b(path, x))
    ranks = tuple(a.shape[0] for a in lora_As)
    rank_scale, rank_adapter, shared = _rank_tables(ranks, tuple(scales), x.device)
    plan = plan_segments(adapter_ids, ranks, scales) if path == "segmented" else None
    return lora_linear_fwd(
        x, weight, A, B, rank_scale, rank_adapter, bias, adapter_ids, x_lora, path=path, shared_scale=shared,
        segments=plan,
    )  # fmt: skip


@_lora_linear_op.register_fake
def _(x, x_lora, weight, bias, adapter_ids, lora_As, lora_Bs, scales, path):
    ranks = [a.shape[0] for a in lora_As]
    R = u_width(ranks) if path == "segmented" else sum(ranks)  # u's width (path "segmented": the rank tile)
    return x.new_empty((x.shape[0], lora_Bs[0].shape[0])), x.new_empty((x.shape[0], R))


@torch.library.custom_op("adapter_engine::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    u: torch.Tensor,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scales: list[float],
    path: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    A, B = _stack(lora_As, lora_Bs, _rank_major_b(path, dy))
    ranks = tuple(a.shape[0] for a in lora_As)
    rank_scale, rank_adapter, shared = _rank_tables(ranks, tuple(scales), dy.device)
    plan = plan_segments(adapter_ids, ranks, scales) if path == "segmented" else None  # the forward's grouping
    grads = lora_linear_bwd(
        dy, x, x_lora, weight, A, B, rank_scale, rank_adapter, adapter_ids, u, tuple(needs),
        path=path, shared_scale=shared, segments=plan,
    )  # fmt: skip
    return [g if g is not None else dy.new_empty(0) for g in grads]


@_lora_linear_bwd_op.register_fake
def _(dy, x, x_lora, weight, adapter_ids, u, lora_As, lora_Bs, scales, path, needs):
    M, N = dy.shape
    K, R = weight.shape[1], sum(a.shape[0] for a in lora_As)
    shapes = [(M, K), (M, K), (N, K), (N,), (R, K), (N, R)]
    return [dy.new_empty(s if need else (0,)) for s, need in zip(shapes, needs, strict=True)]


def _op_setup_context(ctx, inputs, output):
    x, x_lora, weight, bias, adapter_ids, lora_As, lora_Bs, scales, path = inputs
    need_da, need_dbb = any(a.requires_grad for a in lora_As), any(b.requires_grad for b in lora_Bs)
    ctx.needs = [
        x.requires_grad,
        x_lora is not None and x_lora.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        need_da,
        need_dbb,
    ]
    keep_x = weight.requires_grad or (need_da and x_lora is None)
    ctx.save_for_backward(x if keep_x else None, x_lora, weight, adapter_ids, output[1], *lora_As, *lora_Bs)
    ctx.n, ctx.scales, ctx.path = len(lora_As), list(scales), path


def _op_backward(ctx, dy, du_unused):
    x, x_lora, weight, adapter_ids, u, *factors = ctx.saved_tensors
    n = ctx.n
    As, Bs = list(factors[:n]), list(factors[n:])
    grads = _lora_linear_bwd_op(dy, x, x_lora, weight, adapter_ids, u, As, Bs, ctx.scales, ctx.path, ctx.needs)
    dx, dxl, dW, db, dA, dB = (g if need else None for g, need in zip(grads, ctx.needs, strict=True))
    ranks = [a.shape[0] for a in As]
    dAs = list(dA.split(ranks, 0)) if dA is not None else None
    dBs = list(dB.split(ranks, 1)) if dB is not None else None
    return dx, dxl, dW, db, None, dAs, dBs, None, None


torch.library.register_autograd("adapter_engine::lora_linear_fwd", _op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    path: str = "auto",
) -> torch.Tensor:
    """``y = x W^T + b + sum_i scale_i * (dropout(x) A_i^T) B_i^T`` with the base and low-rank terms fused.

    x: (..., in). weight: (out, in), or (in, out) with ``fan_in_fan_out=True`` (GPT-2 Conv1D; no copy is made).
    lora_A: (r, in) and lora_B: (out, r) with a float ``scale``, or equal-length sequences of them for several
    adapters (ranks may differ). bias: (out,). adapter_ids: None (every adapter is summed into every row, PEFT's
    multi-adapter semantics) or an integer tensor shaped like ``x.shape[:-1]`` (per token) or ``x.shape[:1]``
    (per sequence): row m gets adapter ``adapter_ids[m]`` only, -1 means base only. dropout (applied when
    ``training``) acts on the adapter input only, one mask shared by the adapters. All tensors share one dtype
    (fp32/fp16/bf16) and device. path: see the module docstring. Returns (..., out) in x's dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: compute in the autocast dtype. The casts are differentiable, so fp32 master
        # weights get fp32 gradients; inside, autocast is off so the op sees one dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        lora_A = cast(lora_A) if isinstance(lora_A, torch.Tensor) else [cast(a) for a in lora_A]
        lora_B = cast(lora_B) if isinstance(lora_B, torch.Tensor) else [cast(b) for b in lora_B]
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(
                cast(x), cast(weight), lora_A, lora_B, scale, cast(bias), adapter_ids=adapter_ids, dropout=dropout,
                training=training, fan_in_fan_out=fan_in_fan_out, path=path,
            )  # fmt: skip
    As, Bs, scales = _adapter_lists(lora_A, lora_B, scale)
    out_f, in_f, ranks = _validate(x, weight, As, Bs, bias, fan_in_fan_out)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    lead = x.shape[:-1]
    w = weight.t() if fan_in_fan_out else weight  # (out, in) view
    x_lora = torch.nn.functional.dropout(x, dropout, True).reshape(-1, in_f) if training and dropout > 0 else None
    flat = x.dim() == 2  # already (M, in): no reshape op (and no view node in the autograd graph) each way
    x2 = x if flat else x.reshape(-1, in_f)
    plan, auto = None, path == "auto"
    if path == "segmented" or _wants_segmented(path, x2.shape[0], ranks, adapter_ids, x):
        if adapter_ids is None:
            raise ValueError('path "segmented" is for mixed batches: it needs adapter_ids')
        path = "segmented"
        if torch.compiler.is_compiling():  # the custom op groups the rows itself
            ids = _row_ids(adapter_ids, x, len(As))
        else:
            ids, plan = _segments_cached(adapter_ids, x, ranks, tuple(scales))
    else:
        ids = _row_ids(adapter_ids, x, len(As))
    if torch.compiler.is_compiling():
        y = _lora_linear_op(x2, x_lora, w, bias, ids, As, Bs, scales, path)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias, *As, *Bs)):
        settings = LoraSettings(ranks, tuple(scales), path, plan)
        y = LoraLinearFunction.apply(settings, x2, x_lora, w, bias, ids, *As, *Bs)
    elif plan is not None and auto and x_lora is None:  # serving a mixed batch
        A, B = _stack_cached(As, Bs, _rank_major_b(path, x))
        y = _serve_mixed(x2, w, A, B, bias, ids, plan)
    else:
        A, B = _stack_cached(As, Bs, _rank_major_b(path, x))
        # (the segmented path reads the plan's tables instead)
        rank_scale, rank_adapter, shared = (
            (None, None, None) if plan is not None else _rank_tables(ranks, tuple(scales), x.device)
        )
        y = lora_linear_fwd(
            x2, w, A, B, rank_scale, rank_adapter, bias, ids, x_lora, path=path, store_u=False, shared_scale=shared,
            segments=plan,
        )[0]  # fmt: skip
    return y if flat else y.reshape(*lead, out_f)


class StackedLoras(NamedTuple):
    """LoRA factors checked against one base layer and stacked once, for mixed-batch inference (:func:`stack_loras`).

    A serving layer runs every forward over the same resident adapters: checking 16 adapters' 32 factors and looking
    up their stacked copies took about half of a layer call's host time (CPU profile), so a layer keeps this and
    passes it to :func:`lora_linear_stacked` while its factors are unchanged."""

    factors: tuple[torch.Tensor, ...]  # (*lora_As, *lora_Bs): the factors the copies were made from, as given
    scales: tuple[float, ...]
    ranks: tuple[int, ...]
    A: torch.Tensor  # (R, in) stacked lora_As
    B: torch.Tensor  # (out, R) stacked lora_Bs (rank-major for the segmented Triton kernels)
    base: tuple  # (dtype, device, weight shape, fan_in_fan_out, bias shape or None) they were checked against

    @property
    def lora_As(self) -> tuple[torch.Tensor, ...]:
        return self.factors[: len(self.ranks)]

    @property
    def lora_Bs(self) -> tuple[torch.Tensor, ...]:
        return self.factors[len(self.ranks) :]


def stack_loras(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    fan_in_fan_out: bool = False,
) -> StackedLoras:
    """Check ``lora_linear``'s arguments (``x`` stands for the calls to come: its dtype, device and features) and
    stack the factors for :func:`lora_linear_stacked`. The copies are plain tensors made outside autograd."""
    As, Bs, scales = _adapter_lists(list(lora_As), list(lora_Bs), list(scales))
    ranks = _validate(x, weight, As, Bs, bias, fan_in_fan_out)[2]
    with torch.no_grad():
        A, B = _stack(As, Bs, _rank_major_b("segmented", x))
    base = (x.dtype, x.device, weight.shape, fan_in_fan_out, None if bias is None else bias.shape)
    return StackedLoras((*As, *Bs), tuple(scales), ranks, A, B, base)


def lora_linear_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    stacked: StackedLoras,
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor,
    fan_in_fan_out: bool = False,
    path: str = "segmented",
) -> torch.Tensor:
    """``lora_linear(x, weight, stacked.lora_As, stacked.lora_Bs, stacked.scales, bias, adapter_ids=adapter_ids,
    fan_in_fan_out=fan_in_fan_out, path=path)`` for inference, without checking and stacking the factors again.
    path: ``"segmented"``, or ``"auto"`` for a batch that ``mixed_batch_path`` sends to it: the segmented path, or
    where that timed faster a GEMM adding each row's own adapter in its epilogue (``_serve_mixed``). A call that does
    not fit what ``stacked`` was checked against (or that autograd or autocast would see) takes ``lora_linear``
    itself, which names any problem."""
    dt, dev, w_shape, fifo, b_shape = stacked.base
    fits = (
        x.dtype == dt and x.device == dev and weight.dtype == dt and weight.device == dev and weight.shape == w_shape
        and fan_in_fan_out == fifo and (bias.shape == b_shape and bias.dtype == dt and bias.device == dev
                                        if bias is not None else b_shape is None)
        and x.dim() >= 1 and x.shape[-1] == (w_shape[0] if fifo else w_shape[1])
        and not torch.is_grad_enabled() and not torch.is_autocast_enabled(dev.type)
        and not torch.compiler.is_compiling()
    )  # fmt: skip
    if path not in ("segmented", "auto"):
        raise ValueError(f'lora_linear_stacked serves path "segmented" or "auto", got {path!r}')
    if not fits:
        return lora_linear(
            x, weight, list(stacked.lora_As), list(stacked.lora_Bs), list(stacked.scales), bias,
            adapter_ids=adapter_ids, fan_in_fan_out=fan_in_fan_out, path=path,
        )  # fmt: skip
    in_f = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    ids, plan = _segments_cached(adapter_ids, x, stacked.ranks, stacked.scales)
    w = weight.t() if fan_in_fan_out else weight
    if path == "auto":
        y = _serve_mixed(x2, w, stacked.A, stacked.B, bias, ids, plan)
    else:
        y = lora_linear_fwd(x2, w, stacked.A, stacked.B, None, None, bias, ids, None, path="segmented",
                            store_u=False, segments=plan)[0]  # fmt: skip
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0])


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor | Sequence[torch.Tensor],
    lora_B: torch.Tensor | Sequence[torch.Tensor],
    scale: float | Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    adapter_ids: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    path: str = "auto",
) -> torch.Tensor:
    """Pure-torch twin of ``lora_linear`` (PEFT's eager formulation, autograd does the backward).

    Same arguments and result; adapters are added one at a time in order, as PEFT does; a mixed batch masks
    each adapter's term to its rows. ``path`` is accepted for signature parity and ignored.
    """
    del path
    As, Bs, scales = _adapter_lists(lora_A, lora_B, scale)
    _validate(x, weight, As, Bs, bias, fan_in_fan_out, allow_fp64=True)
    ids = _row_ids(adapter_ids, x, len(As))
    w = weight.t() if fan_in_fan_out else weight
    x_lora = torch.nn.functional.dropout(x, dropout, True) if training and dropout > 0 else x
    y = torch.nn.functional.linear(x, w, bias)
    for i, (a, b, s) in enumerate(zip(As, Bs, scales, strict=True)):
        term = torch.nn.functional.linear(torch.nn.functional.linear(x_lora, a), b) * s
        if ids is not None:
            term = term * (ids == i).reshape(*x.shape[:-1], 1).to(term.dtype)
        y = y + term
    return y
