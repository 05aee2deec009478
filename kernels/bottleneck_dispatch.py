"""Which path runs a bottleneck stack launch (forward and level backward): the row-block kernel's tiles or, for one
stack on every row, the level-by-level cuBLAS path (kernels/bottleneck_gemm.py), timed once per shape on the GPU
(``_tuned_tiles``) and forced by ``STACK_PATH``. The launchers (kernels/bottleneck_fwd.py, kernels/bottleneck_bwd.py)
build the candidates and pass a ``launch(candidate)``; this module keeps the choices. Design notes: the docstring of
``kernels/bottleneck.py``.
"""

from __future__ import annotations

import logging

import torch

from ._backend import AUTOTUNE, INTERPRET, capturing, capturing_on, fastest
from .bottleneck_gemm import prefer_levels
from .bottleneck_pack import _Tiles

logger = logging.getLogger(__name__)

_TUNED: dict[tuple, _Tiles | str] = {}  # tuning key -> the fastest candidate for eager calls (forward, level backward)
_TUNED_GRAPHED: dict[tuple, _Tiles | str] = {}  # tuning key -> the fastest for a CUDA-graph capture (GPU time)
# tuning key -> (candidates, their GPU times in ms from _backend.fastest): what the benchmarks report beside rows
TUNING_TIMES: dict[tuple, tuple[tuple, list[float]]] = {}
TUNING_HOST_MS: dict[tuple, list[float]] = {}  # tuning key -> the candidates' host enqueue times (ms), on a GPU
# Smaller launches take _tiles' choice untimed: timing compiles every candidate (seconds per shape), which a short
# job (the demo's 1,024-row batches) would not win back.
TUNE_MIN_ROWS = 2048
# The candidate that runs one stack on every row level by level on cuBLAS (bottleneck_gemm.py) instead of the kernel.
LEVELS = "levels on cuBLAS"
# The same as n + 1 launches for n levels, each running one boundary between levels (the carry's update, the LayerNorm
# and the next down projection: kernels/level_boundary.py), timed beside it where that applies (serving a seq_bn
# stack of a post-LN sublayer: bottleneck_gemm.chains_levels).
LEVELS_FUSED = "levels, boundaries fused"
LEVEL_PATHS = (LEVELS, LEVELS_FUSED)
# What runs one stack on every row, forward and level backward: "auto" (the untimed choice is prefer_levels';
# launches of at least TUNE_MIN_ROWS rows time both), or "rows" / "levels" to force the row-block kernels or the
# cuBLAS path (benchmarks, tests); "levels fused": the cuBLAS path with LEVELS_FUSED's launches where they apply.
STACK_PATH = "auto"
_FORCED_LEVELS = ("levels", "levels fused")  # the STACK_PATH values that force the cuBLAS path


def _tuned_tiles(
    key: tuple, candidates: tuple[_Tiles | str, ...], launch, snapshot=None, device: torch.device | None = None
) -> _Tiles | str:
    """The fastest candidate for ``key`` (forward and level-backward launches), timed once per key on the GPU.
    ``snapshot()``, called before timing, returns what undoes the timing runs' writes (the forward's saved
    pre-activations outside each block's units; the backward's in-place gradients and partial sums). The unit tile
    comes from the ranks and sizes the scratch, so the candidates only vary the row block, the hidden chunk, warps
    and pipelining; ``triton.autotune`` would need every tile field in its configs. The forward's candidates may
    include ``LEVELS``, its cuBLAS path for one stack on every row.

    Two choices per key (``_backend.fastest``): eager calls take the least of each candidate's larger side, host
    enqueue or GPU time; a CUDA-graph capture takes the least GPU time (a graph replays no host work), so a
    multi-launch path that a slow host cannot enqueue fast enough for eager calls may still serve a graphed model.
    The first candidate (the untimed choice) runs untimed under the interpreter, with ``ADAPTER_ENGINE_AUTOTUNE=0``
    and in a capture of a key no eager call has timed."""
    if capturing_on(device):  # (or a CPU stand-in for a capture)
        return _TUNED_GRAPHED.get(key, candidates[0])
    tiles = _TUNED.get(key)
    if tiles is not None:
        return tiles
    if len(candidates) == 1 or not AUTOTUNE:
        return candidates[0]
    restore = snapshot() if snapshot is not None else None
    timing = fastest(candidates, launch, device)
    if restore is not None:
        restore()
    tiles = _TUNED[key] = timing.eager
    _TUNED_GRAPHED[key] = timing.graphed
    TUNING_TIMES[key] = (candidates, timing.gpu_ms)
    if timing.host_ms is not None:
        TUNING_HOST_MS[key] = timing.host_ms
    logger.info("bottleneck %s: tiles %s, graphed %s (GPU %s ms; host %s ms)", key, tiles, timing.graphed,
                ", ".join(f"{x:.4f}" for x in timing.gpu_ms), timing.host_ms)  # fmt: skip
    return tiles


def _with_levels(candidates: tuple, rows: int, hidden: int, max_rank: int, weight_dtype, one_stack: bool) -> tuple:
    """The kernel-tile ``candidates`` of a forward or level-backward launch, with ``LEVELS`` (the cuBLAS path) where
    it applies (``one_stack``: one adapter per level on every row, known on the host): first, and alone when
    nothing is timed, for wide weights (:func:`prefer_levels`); last, to be timed, otherwise. ``STACK_PATH`` forces
    either."""
    if not one_stack or STACK_PATH == "rows":
        if STACK_PATH in _FORCED_LEVELS:
            raise ValueError("the level-by-level path needs one stack on every row, known on the host (level_adapters)")
        return candidates
    if STACK_PATH in _FORCED_LEVELS:
        return (LEVELS,)
    timed = rows >= TUNE_MIN_ROWS and not INTERPRET  # the interpreter times nothing (one tile per launch)
    if prefer_levels(hidden, max_rank, weight_dtype):
        return (LEVELS, *candidates) if timed else (LEVELS,)
    return (*candidates, LEVELS) if timed else candidates


def levels_may_run(hidden: int, max_rank: int, weight_dtype: torch.dtype) -> bool:
    """Whether :func:`_launch_fwd` may take the level-by-level path for one stack on every row (worth a device sync
    to learn the routes when no host hint came)."""
    if STACK_PATH != "auto":
        return STACK_PATH in _FORCED_LEVELS
    # narrow weights: offered for timing only with the modules' host hint, not worth a sync on every call
    return prefer_levels(hidden, max_rank, weight_dtype)


def uniform_levels(routes: torch.Tensor, level_adapters=None, may_read: bool = True) -> tuple[int, ...] | None:
    """Per level, the adapter every row runs (-1: off), when the routes give one stack to every row (expanded from
    one (L,) list: row stride 0, or a single row), else None. From the host hint ``level_adapters`` (per level,
    the adapters the rows use) when given; otherwise read from the device (one sync) if ``may_read``
    (:func:`levels_may_run`), never while a CUDA graph is being captured or torch.compile traces."""
    if routes.shape[0] > 1 and routes.stride(0) != 0:
        return None
    if level_adapters is not None:
        if any(len(used) > 1 for used in level_adapters):
            return None
        return tuple(int(used[0]) if len(used) else -1 for used in level_adapters)
    if not may_read or torch.compiler.is_compiling():
        return None
    if capturing(routes):
        return None
    return tuple(int(a) if a >= 0 else -1 for a in routes[0].tolist()) if routes.shape[0] else None
