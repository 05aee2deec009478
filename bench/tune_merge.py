"""Tile sweep of the grouped merge kernel on the Llama-shaped weights of bench_merge.py (a GPU tuning tool).

    python bench/tune_merge.py OUT.json

Times a prepared ``LoraMergePlan`` (the launches alone) for 1 and 4 adapters under each (BLOCK_N, BLOCK_K,
ROW_TILES, num_warps, W_STAGES) candidate and prints the fraction of the copy-bandwidth floor; the best per rank width
become ``SMALL_RANK_TILES`` / ``LARGE_RANK_TILES`` at the top of kernels/merge.py. On CPU it runs the tiny shapes of
the smoke test, in the interpreter.
"""

import json
import statistics
import sys

import torch
from harness import copy_bandwidth, device, environment_info, on_gpu, pick, time_ms

from adapter_engine.kernels import merge as merge_module
from adapter_engine.kernels import prepare_lora_merge

CANDIDATES = pick(  # (BLOCK_N, BLOCK_K, ROW_TILES, num_warps, W_STAGES)
    # session 2 on an H100: one adapter 32x128x1 w4 95.4%; four adapters 64x128x4 w4 66.7%, every 32-row tile about
    # 50%. Session 3 (no GPU) found in the sm_90 build that B_cat's rows loaded as 2-byte scalars at R=64 (fixed:
    # 16-byte cp.async, pipelined over the row tiles). Session 4 (no GPU): W_STAGES > 1 software-pipelines the
    # row-tile loop, so the next tiles' W loads are cp.async copies in flight (it replaces a hand-written one-tile
    # prefetch). Registers per thread at R=64 (sm_90, triton 3.9), W_STAGES 0 / 2 / 3: 64x128x4 w4 206 / 208 / 248,
    # 64x64x4 w4 128 / 114 / 128, 64x128x4 w8 124 / 112 / 128, 32x128x4 w4 128 / 124 / 126; no spills.
    [(32, 128, 1, 4, 0), (64, 128, 4, 4, 0), (64, 128, 4, 4, 2), (64, 128, 4, 4, 3), (64, 64, 4, 4, 3),
     (64, 128, 4, 8, 3), (32, 128, 4, 4, 3), (128, 64, 2, 8, 0)],
    [(32, 128, 2, 4, 0), (32, 128, 2, 4, 2)],
)  # fmt: skip
SHAPES = pick([(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)], [(64, 64), (96, 64), (64, 96)])
LAYERS, RANK = pick(4, 1), 16


def main(out_path: str) -> None:
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    gen = torch.Generator(device=device()).manual_seed(0)
    weights = [torch.randn(*s, device=device(), generator=gen).to(dtype) for s in SHAPES * LAYERS]
    factors = [
        [
            ((torch.randn(RANK, w.shape[1], device=device(), generator=gen) * 0.01).to(dtype),
             (torch.randn(w.shape[0], RANK, device=device(), generator=gen) * 0.01).to(dtype))
            for _ in range(4)
        ]
        for w in weights
    ]  # fmt: skip
    floor_ms = 2 * sum(w.numel() * w.element_size() for w in weights) / copy_bandwidth() * 1e3
    rows = []
    try:
        for block_n, block_k, row_tiles, warps, w_stages in CANDIDATES:
            merge_module.TILE_OVERRIDE = (block_n, block_k, row_tiles, warps, w_stages)
            for n in (1, 4):
                plan = prepare_lora_merge(
                    weights, [[a for a, _ in f[:n]] for f in factors], [[b for _, b in f[:n]] for f in factors],
                    [[0.5] * n for _ in weights],
                )  # fmt: skip
                for _ in range(pick(3, 1)):
                    plan.merge_()
                ms = statistics.median(time_ms(plan.merge_) for _ in range(pick(20, 2)))
                rows.append({"block_n": block_n, "block_k": block_k, "row_tiles": row_tiles, "num_warps": warps,
                             "w_stages": w_stages, "adapters": n, "ms": ms,
                             "floor_fraction": floor_ms / ms})  # fmt: skip
                name = f"{block_n:4d} x {block_k:4d} x{row_tiles:<2d} w{warps} s{w_stages}"
                print(f"{name}  {n} adapter(s): {ms:7.3f} ms = {floor_ms / ms:6.1%} of floor")
    finally:
        merge_module.TILE_OVERRIDE = None
    with open(out_path, "w") as f:
        json.dump({"environment": environment_info(), "floor_ms": floor_ms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tune_merge.json")
