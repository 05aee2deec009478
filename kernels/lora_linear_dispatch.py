"""Which path the fused LoRA linear op takes (``path="auto"``): by rows (``LoraLinearDispatch``), timed once per
shape on the GPU where no path wins everywhere. Paths: kernels/lora_linear_launch.py; notation: kernels/lora_linear.py.

Up to ``fused_max_m`` rows ``"auto"`` times ``"fused"``, ``"epilogue"`` and ``"composition"`` once per M bucket and
shape on the GPU and keeps the fastest (``_small_m_choice``; untimed, ``"fused"``). Above, it times ``"composition"``
against the persistent kernel's tiles (``_large_m_choice``; untimed, ``"composition"``). It takes ``"segmented"`` for a
mixed batch of several resident adapters on the Triton backend when the masked paths would do more work
(``LoraLinearDispatch``); torch.compile traces the same choice. Serving such a batch, it times ``"segmented"``
against a GEMM adding each row's own adapter in its epilogue: the tiled kernel up to ``fused_max_m`` rows, the
persistent one above (``_serve_mixed``).

The timings run through ``_backend.fastest`` (GPU time by CUDA-graph replay, and the host's enqueue time): eager calls
take the least of the larger of the two, CUDA-graph captures the least GPU time; nothing is timed inside a capture.
The choosers take a ``launch(candidate)`` from the launcher, so this module launches nothing of the op's own paths
except those of a served mixed batch (``_serve_mixed``), which it runs itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._backend import AUTOTUNE, INTERPRET, capturing, fastest, next_pow2, record, use_triton
from .lora_linear_tiled import lora_linear_tiled_fwd
from .lora_linear_tma import TmaTiles, lora_linear_tma_fwd, rank_tile, tma_candidates, tma_fits
from .lora_segmented import SegmentPlan, lora_segmented_fwd_reference, lora_shrink, segmented_fwd_checked_by_caller

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


def _operands(x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u: bool) -> tuple:
    """The geometry of ``lora_linear_fwd``'s operands (shapes, strides, dtype, device, switches): the key of the small-M
    choice and, with whether the shrink is fused, of the tiled kernel's recorded launch. (The bias: its stride, or
    None without one; the recorded launch passes that stride.)"""
    (M, K), (N, R) = x.shape, lora_B.shape
    return (
        M, N, K, R, x.dtype, x.device, x.stride(), weight.stride(), lora_A.stride(), lora_B.stride(),
        None if bias is None else bias.stride(0), adapter_ids is None, store_u, x_lora is None,
    )  # fmt: skip


def _pick_path(path: str, m: int, fusable: bool) -> str:
    if path == "auto":
        path = "fused" if m <= DISPATCH.fused_max_m else DISPATCH.large_m_path
    if path == "fused" and not fusable:
        path = "epilogue"
    return path


_LARGE_M: dict[tuple, str | TmaTiles] = {}  # timing key -> "composition" or the persistent kernel's fastest tiles
_LARGE_M_GRAPHED: dict[tuple, str | TmaTiles] = {}  # the same, by GPU time alone: for CUDA-graph captures


def _large_m_candidates(path: str, fusable: bool, block_r: int, rows: int) -> tuple[str | TmaTiles, ...]:
    """What ``_large_m_choice`` times: the persistent kernel's tiles, after ``"composition"`` for ``"timed"``
    (only ``"composition"`` under the interpreter, which has no GPU timer)."""
    if path == "persistent":
        return tma_candidates(fusable, block_r, rows)
    return ("composition",) if INTERPRET else ("composition", *tma_candidates(fusable, block_r, rows))


def _large_m_choice(path, x, weight, lora_A, lora_B, bias, adapter_ids, x_lora, store_u, shared_scale, launch):
    """``(path, tiles)`` for ``"timed"`` and ``"persistent"`` (shapes as ``lora_linear_fwd``; ``launch(candidate, y,
    u)`` runs ``"composition"`` or the persistent kernel's tiles into the buffers given): ``("persistent", TmaTiles)``
    when the persistent kernel runs, else ``("composition" | "epilogue", None)``.

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
            timing = fastest(candidates, lambda c: launch(c, y, u), x.device)
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


def _small_m_choice(operands: tuple, x: torch.Tensor, launch) -> tuple[str, str]:
    """The paths of ``"auto"`` at up to ``fused_max_m`` rows, for eager calls and for CUDA-graph captures
    (``x``: (M, K); ``operands``: the geometry of ``lora_linear_fwd``'s operands, its key; ``launch(path)`` runs that
    launcher on them): the tiled kernel with the shrink fused (``"fused"``), the tiled kernel adding a cuBLAS shrink's
    u in its epilogue (``"epilogue"``), or cuBLAS and
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
    M, N, K, R, dtype, device, _, w_strides, a_strides, _, bias_stride, no_ids, store_u, fusable = operands
    path = _pick_path("auto", M, fusable)
    candidates = _small_m_candidates(path)
    key = (next_pow2(M), N, R, K, dtype, device, w_strides[-1] == 1, a_strides[-1] == 1, bias_stride is None, no_ids,
           store_u, fusable)  # fmt: skip
    paths = _SMALL_M.get(key)
    if paths is None:
        if capturing(x):  # nothing is timed or kept inside a capture: the eager call after it times them
            return path, path
        if len(candidates) == 1 or not AUTOTUNE:
            paths = path, path
        else:
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
    if not use_triton(x):  # (a CPU without the interpreter: the torch twin, nothing to time)
        return lora_segmented_fwd_reference(x, weight, lora_A, lora_B, plan, bias, store_u=False)[0]
    choice = "segmented"
    small = M <= DISPATCH.fused_max_m
    if small or tma_fits(x, weight, plan.r_max):
        key = (min(next_pow2(M), 1 << 16), N, x.shape[1], plan.ranks, x.dtype, weight.stride(-1) == 1, bias is None)
        choice = (_MIXED_GRAPHED if capturing(x) else _MIXED).get(key)
        if choice is None:
            choice = "segmented"
            candidates = _mixed_candidates(small, plan.u_width, M)
            if len(candidates) > 1 and AUTOTUNE and not capturing(x):
                choice = _time_mixed(key, candidates, x, weight, lora_A, lora_B, bias, ids, plan)
    if choice == "segmented":
        return segmented_fwd_checked_by_caller(x, weight, lora_A, lora_B, plan, bias, store_u=False)[0]
    y = _alloc((M, N), x)
    _mixed_launch(choice, x, weight, lora_A, lora_B, bias, ids, plan, y)
    return y


def _time_mixed(key: tuple, candidates: tuple, x, weight, lora_A, lora_B, bias, ids, plan: SegmentPlan):
    """Times ``_serve_mixed``'s candidates once for ``key``, keeps both choices and returns the eager one. (A function
    of its own: a closure in ``_serve_mixed`` would turn its arguments into cells, host time on every call.)"""
    y = _alloc((x.shape[0], lora_B.shape[0]), x)
    for c in candidates:  # (the tiled kernel's autotuning and the launches' compiles, before the timing)
        _mixed_launch(c, x, weight, lora_A, lora_B, bias, ids, plan, y)
    timing = fastest(candidates, lambda c: _mixed_launch(c, x, weight, lora_A, lora_B, bias, ids, plan, y), x.device)
    _MIXED[key], _MIXED_GRAPHED[key] = timing.eager, timing.graphed
    logger.info("lora_linear mixed %s: %s, graphed %s (GPU %s ms; host %s ms)", key, timing.eager, timing.graphed,
                ", ".join(f"{t:.4f}" for t in timing.gpu_ms), timing.host_ms)  # fmt: skip
    return timing.eager


def _mixed_launch(choice, x, weight, lora_A, lora_B, bias, ids, plan: SegmentPlan, y: torch.Tensor) -> None:
    """Runs ``_serve_mixed``'s ``choice``: y written (``"segmented"``: a y of its own, for the timing only)."""
    if choice == "segmented":
        segmented_fwd_checked_by_caller(x, weight, lora_A, lora_B, plan, bias, store_u=False)
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
            None if bias is None else bias.stride(0),  # (the recorded launch passes the bias's stride)
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
