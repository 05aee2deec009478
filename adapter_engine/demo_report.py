"""The demo's outputs: the side-by-side table, ``report.md``, ``demo.png`` and ``results.json`` from the results dict
that :func:`adapter_engine.demo.run_demo` returns."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The side-by-side comparison: (what, Merge and FFT, Stack and Adapt)."""
    fft, stack = r["fft"], r["stack"]
    l1, l2 = stack["levels"]
    return [
        ("test accuracy", f"{fft['accuracy']:.3f}", f"{stack['accuracy']:.3f} (depth 2)"),
        ("trainable parameters", f"{fft['trainable']:,}", f"{l1['trainable']:,} + {l2['trainable']:,} (2 levels)"),
        ("training time (s)", f"{fft['seconds']:.1f} ({fft['steps']} steps)",
         f"{l1['seconds'] + l2['seconds']:.1f} ({l1['steps']} + {l2['steps']} steps)"),
        ("time per step (ms)", f"{fft['step_s'] * 1e3:.0f}", f"{l1['step_s'] * 1e3:.0f} / {l2['step_s'] * 1e3:.0f}"),
        ("peak memory added by training (MiB)", f"{fft['peak_added_mib']:.0f}",
         f"{max(l1['peak_added_mib'], l2['peak_added_mib']):.0f}"),
        ("latency, 1 request (ms)", f"{fft['latency_ms']:.1f}", f"{stack['latency_ms']:.1f}"),
    ]  # fmt: skip


def format_table(r: dict[str, Any]) -> str:
    rows = table_rows(r)
    width = max(len(a) for a, _, _ in rows)
    lines = [f"| {'':{width}s} | Merge and FFT | Stack and Adapt |", f"|{'-' * (width + 2)}|---:|---:|"]
    lines += [f"| {a:{width}s} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def format_report(r: dict[str, Any]) -> str:
    env, m, st = r["environment"], r["merge"], r["stack"]
    d = r["data"]
    depth = ", ".join(f"depth {k}: {v:.3f}" for k, v in st["depth_accuracy"].items())
    fused = st["fused_check"]
    fused_line = (f"max |fused - torch twin| {fused['max_diff']:.2e} on {fused['rows']} routed requests of "
                  f"{fused['tokens']} tokens" if fused["ran"] else f"not run: {fused['why']}")  # fmt: skip
    plan = "\n".join(
        f"| {row['what']} | {row['estimated']:,.1f} | {row['measured']:,.1f} | {row['error']:+.0%} |"
        for row in r["planner"]["rows"]
    )
    a = r.get("assets")
    assets = "" if a is None else (
        f"\nModel `{a['model_dir']}` (weights stored {a['model_stored_dtype']}, parameters {a['compute_dtype']}"
        f"{', bf16 autocast in training' if r['device'] == 'cuda' else ''}); corpus `{a['bbc_dir']}`.")  # fmt: skip
    total = f"Total {r['seconds']:.0f} s.{assets}"
    return f"""# adapter-engine demo: Merge and FFT vs Stack and Adapt

all-MiniLM-L6-v2 on BBC News ({len(d["classes"])} classes), size `{r["size"]}`, {r["max_length"]} tokens per document,
on {env["device_name"]} (torch {env["torch"]}, transformers {env["transformers"]}); adapter ops: {r["kernels"]}.
Training documents: {d["task_docs"]} (both strategies, same batches and Trainer schedule), domain LoRA
{d["lora_docs"]}, sibling {d["sibling_docs"]}; accuracy on {d["test_docs"]} test documents. {total}

{format_table(r)}

Memory is what training adds on top of the loaded model ({
        "CUDA max_memory_allocated"
        if r["device"] == "cuda"
        else "resident-set high-water mark minus the resident set before training"
    }); latency is the median of single
requests; time per step is the median step (the first excluded).

## Merge and FFT
- domain LoRA (r=8, query/value) trained {r["lora"]["steps"]} steps, saved in PEFT format, loaded and merged in
  {m["ms"]:.1f} ms ({m["backend"]}); merged vs unmerged logits: max diff {m["merged_vs_unmerged_max_diff"]:.2e}
- parameters: {m["params_before"]:,} before the merge, {m["params_after"]:,} in the saved plain checkpoint, planner
  {m["planner_params"]:,}; plain `transformers` reload bit-identical: {m["plain_reload_bit_identical"]}
- accuracy before fine-tuning {m["accuracy_before_training"]:.3f}, after {r["fft"]["accuracy"]:.3f}

## Stack and Adapt
- level 1 `news` (seq_bn, with the head), level 2 `news_fine` (seq_bn) on top; test accuracy {depth}
- sibling `news_alt` of level 2 (trained on {d["sibling_docs"]} other documents): {st["sibling"]["accuracy"]:.3f}
- one mixed batch routed per row {st["routing"]["routes"]}: max diff vs each request alone
  {st["routing"]["max_diff_vs_alone"]:.2e}
- fused kernels: {fused_line}

## Planner estimates vs measurements
Throughput measured here: {r["planner"]["tflops"] * 1e3:.0f} GFLOP/s matmul, {r["planner"]["bandwidth_gbs"]:.0f} GB/s
copy; precision {r["planner"]["precision"]}, batch x tokens as above.

| quantity | planner | measured | error |
|---|---:|---:|---:|
{plan}
"""


def _plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fft, st = r["fft"], r["stack"]
    l1, l2 = st["levels"]
    panels = [
        ("test accuracy", fft["accuracy"], st["accuracy"]),
        ("trainable parameters (M)", fft["trainable"] / 1e6, (l1["trainable"] + l2["trainable"]) / 1e6),
        ("training time (s)", fft["seconds"], l1["seconds"] + l2["seconds"]),
        ("peak training memory (MiB)", fft["peak_added_mib"], max(l1["peak_added_mib"], l2["peak_added_mib"])),
        ("latency, 1 request (ms)", fft["latency_ms"], st["latency_ms"]),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(17, 3.2))
    for ax, (title, a, b) in zip(axes, panels):
        ax.bar(["Merge\n+FFT", "Stack\n+Adapt"], [a, b], color=["#4c72b0", "#dd8452"])
        ax.set_title(title, fontsize=9)
    depths = st["depth_accuracy"]
    axes[-1].plot(list(depths), list(depths.values()), marker="o", color="#dd8452")
    axes[-1].set_xticks(list(depths))
    axes[-1].set_title("stack: accuracy per depth", fontsize=9)
    fig.suptitle(f"all-MiniLM-L6-v2 on BBC News, {r['environment']['device_name']}, size {r['size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(r: dict[str, Any], out_dir: str) -> None:
    report = format_report(r)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(r, fh, indent=2, default=str)
    _plot(r, os.path.join(out_dir, "demo.png"))
    log.info("written: %s/report.md, demo.png, results.json", out_dir)
