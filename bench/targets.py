"""The issues' performance targets against one GPU session's benchmark JSON: what was measured, met or not.

    python bench/targets.py OUTDIR/bench_*.json [--out OUTDIR/targets.md]

Each target reads the rows of one benchmark file (ratios within that file only, as ``report.py``); a target whose
rows are missing (a part not run, a CPU smoke run) says so instead of passing. Where a target spans several shapes
or sizes, the worst row decides and is named.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    limit: float
    at_most: bool  # True: measured <= limit passes; False: measured >= limit passes
    measure: Callable[[list[dict]], tuple[float, str] | None]  # rows -> (worst value, where) or None if absent
    unit: str = "x"
    strict: bool = False  # the limit itself fails ("faster than": < 1, not <= 1)
    feasibility: bool = False  # not a target: whether the target above it can be met at all (reachable or not)


def _rows(benchmarks: Iterable[dict], bench: str) -> list[dict]:
    """extra_info of every row of benchmark function ``bench``."""
    return [b.get("extra_info", {}) for b in benchmarks if b["name"].split("[")[0] == bench]


def _one(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def _merge_floor(adapters: int):
    def measure(benchmarks):
        row = _one(_rows(benchmarks, "bench_merge"), provider="engine_plan", case=f"{adapters} adapter(s)")
        return (row["fraction_of_floor"], "prepared plan") if row and "fraction_of_floor" in row else None

    return measure


def _worst_ratio(bench: str, provider: str, against: str, keep: Callable[[dict], bool] = lambda row: True):
    """The largest ``provider`` / ``against`` time over the cases of ``bench`` (the rows ``keep`` accepts)."""

    def measure(benchmarks):
        rows = _rows(benchmarks, bench)
        pairs = [
            (row["median_ms"] / other["median_ms"], row["case"])
            for row in rows
            if row.get("provider") == provider
            and keep(row)
            and (other := _one(rows, provider=against, case=row["case"]))
        ]
        return max(pairs, key=lambda p: p[0]) if pairs else None

    return measure


def _lora_forward(rows_of: Callable[[int], bool], against: str = "bare"):
    """Worst engine / ``against`` over the forward rows whose M passes ``rows_of``."""
    return _worst_ratio("bench_lora_linear_forward", "engine", against, lambda row: rows_of(row.get("M", 0)))


def _ratio(bench: str, num: dict, den: dict, where: str = ""):
    def measure(benchmarks):
        rows = _rows(benchmarks, bench)
        a, b = _one(rows, **num), _one(rows, **den)
        return (a["median_ms"] / b["median_ms"], where or a.get("case", "")) if a and b else None

    return measure


def _train_top_of_three(provider: str):
    """Worst ``provider`` / eager of ``bench_train_top_of_three``: "auto" (the engine's default dispatch) or "fused"
    (the fused kernels' backward). Rows before session 24 carry no ``train_fused``: their "fused" provider ran the
    default dispatch (the eager modules, ``adapter_engine.bottleneck.TRAIN_FUSED`` off), so they count as "auto"."""

    def kind(row: dict) -> str | None:
        if "train_fused" not in row:
            return "auto" if row.get("provider") == "fused" else row.get("provider")
        return row.get("provider")

    def measure(benchmarks):
        rows = _rows(benchmarks, "bench_train_top_of_three")
        eager = {row["case"]: row for row in rows if row.get("provider") == "eager"}
        pairs = [
            (row["median_ms"] / eager[row["case"]]["median_ms"], row["case"])
            for row in rows
            if kind(row) == provider and row.get("case") in eager
        ]
        return max(pairs, key=lambda p: p[0]) if pairs else None

    return measure


def _model_rows(benchmarks, bench: str, model: str) -> list[dict]:
    """The rows of ``bench`` whose case names ``model`` first (the whole-model bottleneck benches)."""
    return [r for r in _rows(benchmarks, bench) if str(r.get("case", "")).startswith(model)]


def _stack_ratio(model: str, setup: str, bench: str = "bench_model_forward"):
    """fused / bare of a whole-model forward (rows told apart by ``setup_name``, in every version of the bench). For
    the eager forward, the paired rounds' ratio where the files have it (``bench_model_forward_paired``: bare and
    fused timed back to back, robust to a host whose speed drifts), else the ratio of the two rows' medians."""

    def measure(benchmarks):
        if bench == "bench_model_forward":
            paired = _one(_model_rows(benchmarks, "bench_model_forward_paired", model), setup_name=setup)
            if paired and "paired_ratio" in paired:
                return paired["paired_ratio"], f"{model}, {setup}, paired rounds"
        rows = _model_rows(benchmarks, bench, model)
        fused, bare = _one(rows, setup_name=setup, provider="fused"), _one(rows, setup_name="bare")
        return (fused["median_ms"] / bare["median_ms"], f"{model}, {setup}") if fused and bare else None

    return measure


def _stack_floor(model: str, setup: str):
    """(graphed bare + the adapters' compute floor) / graphed bare: the least fused / bare any implementation of the
    stacks can reach, their FLOPs at the dense-GEMM rate of the same run (``floor_extra_ms`` of the eager rows) and
    nothing else (no memory traffic, no launch)."""

    def measure(benchmarks):
        floor = _one(_model_rows(benchmarks, "bench_model_forward", model), setup_name=setup, provider="fused")
        bare = _one(_model_rows(benchmarks, "bench_model_forward_graphed", model), setup_name="bare")
        if not (floor and bare and "floor_extra_ms" in floor):
            return None
        return 1 + floor["floor_extra_ms"] / bare["median_ms"], f"{model}, {setup}, graphed bare"

    return measure


def _switch(benchmarks):
    row = _one(_rows(benchmarks, "bench_switch"), provider="route")
    return (row["switch_us"], row["case"]) if row and "switch_us" in row else None


def _mixed(kind: str, k: int, bench: str = "bench_mixed", provider: str = "engine"):
    def measure(benchmarks):
        for row in _rows(benchmarks, bench):
            case = str(row.get("case", ""))
            if row.get("provider") == provider and case.startswith(f"{kind}, {k} different") and row.get("x_single"):
                return row["x_single"], case
        return None

    return measure


TARGETS = [
    Target(2, "merge, 1 adapter: fraction of the bandwidth floor", 0.90, False, _merge_floor(1), "of floor"),
    Target(2, "merge, 4 adapters in one pass: fraction of the floor", 0.85, False, _merge_floor(4), "of floor"),
    Target(3, "LoRA forward, M <= 256: engine / bare (worst)", 1.10, True, _lora_forward(lambda m: m <= 256)),
    Target(  # the same with the host launch path out: session 7's eager small-M rows were host bound
        3,
        "LoRA forward, M <= 256, CUDA-graphed (GPU work alone): engine / bare (worst)",
        1.10,
        True,
        _worst_ratio("bench_lora_linear_forward_graphed", "engine", "bare", lambda row: row.get("M", 0) <= 256),
    ),
    Target(3, "LoRA forward, M >= 4096: engine / bare (worst)", 1.15, True, _lora_forward(lambda m: m >= 4096)),
    Target(
        3,
        "LoRA forward, every M: engine / composition (must be < 1)",
        1.0,
        True,
        _lora_forward(lambda m: True, against="composition"),
        strict=True,
    ),
    Target(
        3,
        "LoRA forward+backward: engine / PEFT (worst)",
        0.70,
        True,
        _worst_ratio("bench_lora_linear_train", "engine", "peft"),
    ),
    Target(  # not a target of its own: whether the one above can be met on cuBLAS base GEMMs (bare forward + dx)
        3,
        "LoRA forward+backward, feasibility: bare / PEFT (worst; the target needs < 0.7)",
        0.70,
        True,
        _worst_ratio("bench_lora_linear_train", "bare", "peft"),
        strict=True,
        feasibility=True,
    ),
    Target(  # the same with fp32 adapter weights on the bf16 base, what PEFT's get_peft_model gives by default (PEFT
        # computes their low-rank term in fp32, the engine in bf16 as autocast does: each library's own precision)
        3,
        "LoRA forward+backward, fp32 adapters (PEFT's default): engine / PEFT (worst)",
        0.70,
        True,
        _worst_ratio("bench_lora_linear_train", "engine_fp32", "peft_fp32"),
    ),
    Target(
        3,
        "LoRA forward+backward, fp32 adapters, feasibility: bare / PEFT (worst; the target needs < 0.7)",
        0.70,
        True,
        _worst_ratio("bench_lora_linear_train", "bare", "peft_fp32"),
        strict=True,
        feasibility=True,
    ),
    Target(
        3,
        "whole model, 4 adapters mixed: engine / bare",
        1.10,
        True,
        _ratio("bench_lora_model_mixed_batch", {"provider": "engine_mixed"}, {"provider": "bare"}),
    ),
    Target(4, "BERT-base, 1 adapter: fused / bare", 1.04, True, _stack_ratio("bert-base", "stack1")),
    Target(4, "BERT-base, 3 stacked: fused / bare", 1.10, True, _stack_ratio("bert-base", "stack3")),
    Target(4, "Llama-shaped, 3 stacked: fused / bare", 1.02, True, _stack_ratio("llama-4096x4", "stack3")),
    *(  # diagnostic, not targets of their own: the same ratios with every provider replayed from a CUDA graph
        Target(4, f"{what}, CUDA-graphed (GPU work alone): fused / bare", limit, True, _stack_ratio(m, s, graphed))
        for what, limit, m, s, graphed in (
            ("BERT-base, 1 adapter", 1.04, "bert-base", "stack1", "bench_model_forward_graphed"),
            ("BERT-base, 3 stacked", 1.10, "bert-base", "stack3", "bench_model_forward_graphed"),
            ("Llama-shaped, 3 stacked", 1.02, "llama-4096x4", "stack3", "bench_model_forward_graphed"),
        )
    ),
    Target(  # not a target of its own: whether the Llama-shaped one can be met at all (the adapters' FLOPs)
        4,
        "Llama-shaped, 3 stacked, feasibility: (graphed bare + the adapters' FLOPs at GEMM peak) / graphed bare",
        1.02,
        True,
        _stack_floor("llama-4096x4", "stack3"),
        strict=True,
        feasibility=True,
    ),
    Target(
        4,
        "training the top of 3: engine (default dispatch) / eager (worst)",
        0.70,
        True,
        _train_top_of_three("auto"),
    ),
    Target(  # diagnostic, not a target of its own: the fused backward, which the default dispatch does not take
        4,
        "training the top of 3, fused kernels forward and backward: fused / eager (worst)",
        0.70,
        True,
        _train_top_of_three("fused"),
    ),
    Target(  # not a target of its own: whether the one above can be met at all (the base's share of the step)
        4,
        "training the top of 3, feasibility: bare base / eager (worst; the target needs < 0.7)",
        0.70,
        True,
        _worst_ratio("bench_train_top_of_three", "bare", "eager"),
        strict=True,
        feasibility=True,
    ),
    Target(
        6,
        "whole-model merge: PEFT / engine (speed-up)",
        3.0,
        False,
        _ratio(
            "bench_merge_whole_model", {"provider": "peft"}, {"provider": "engine"}, "merge_adapter vs merge_and_unload"
        ),
    ),
    Target(7, "switching among resident adapters (us)", 50.0, True, _switch, "us"),
    Target(7, "16 LoRA adapters mixed: throughput / one adapter", 0.85, False, _mixed("lora", 16)),
    Target(7, "16 seq_bn stacks mixed: throughput / one stack", 0.85, False, _mixed("seq_bn stacks", 16)),
    *(  # diagnostic, not targets of their own: the same ratios with every provider replayed from a CUDA graph
        Target(7, f"16 {what} mixed, CUDA-graphed (GPU work alone): throughput / one", 0.85, False, measure)
        for what, measure in (
            ("LoRA adapters", _mixed("lora", 16, "bench_mixed_graphed")),
            ("seq_bn stacks", _mixed("seq_bn stacks", 16, "bench_mixed_graphed")),
        )
    ),
    *(  # the same through adapter_engine.serving.GraphedServer: a new route per call, refills and copies included
        Target(7, f"16 {what} mixed, GraphedServer: throughput / one", 0.85, False, measure)
        for what, measure in (
            ("LoRA adapters", _mixed("lora", 16, "bench_served", "mixed")),
            ("seq_bn stacks", _mixed("seq_bn stacks", 16, "bench_served", "mixed")),
        )
    ),
]


def evaluate(paths: list[str]) -> list[dict]:
    """One dict per target: issue, what, target, measured, where, met (None when not measured). Each target is
    measured within one file; given several runs of a benchmark, the last file that has its rows counts."""
    files, device = [], None
    for path in paths:
        if os.path.getsize(path) == 0:
            continue
        with open(path) as f:
            data = json.load(f)
        files.append(data.get("benchmarks", []))
        device = device or data.get("machine_info", {}).get("device_name")
    out = []
    for t in TARGETS:
        got = None
        for benchmarks in files:
            got = t.measure(benchmarks) or got
        value, where = got if got else (None, "not measured in these files")
        met = None
        if value is not None:
            met = (value < t.limit or (value == t.limit and not t.strict)) if t.at_most else value >= t.limit
        relation = ("<" if t.strict else "<=") if t.at_most else (">" if t.strict else ">=")
        out.append({"issue": t.issue, "what": t.what, "target": f"{relation} {t.limit:g}", "measured": value,
                    "unit": t.unit, "where": where, "met": met, "device": device,
                    "feasibility": t.feasibility})  # fmt: skip
    return out


def format_table(results: list[dict]) -> str:
    device = next((r["device"] for r in results if r["device"]), "?")
    lines = [f"Targets on {device}", "", "| issue | target | limit | measured | met | worst case |"]
    lines.append("|---|---|---|---:|---|---|")
    for r in results:
        value = "" if r["measured"] is None else f"{r['measured']:.3f}"
        met = {None: "-", True: "yes", False: "**no**"}[r["met"]]
        if r.get("feasibility") and r["met"] is not None:  # a check of the target above, not a target
            met = "reachable" if r["met"] else "**unreachable**"
        lines.append(f"| {r['issue']} | {r['what']} | {r['target']} | {value} | {met} | {r['where']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files of one session")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    table = format_table(evaluate(args.results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
