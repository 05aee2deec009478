"""Turn pytest-benchmark JSON files of one GPU session into a table (Markdown + CSV) and a plot.

    python bench/report.py RESULTS.json [MORE.json ...] --out DIR

Ratios are taken between rows of the same file only (one pytest run, one device).
Each benchmark stores ``provider``, ``case`` and ``median_ms`` (device-event median) in ``extra_info``. Rows
with the same benchmark function and case are compared with the ``bare`` provider when present, else with
``peft``; a row naming a ``baseline_case`` is compared with the ``bare`` row of that case instead (several setups
against one bare run; in the benchmark function ``baseline_bench`` where the row names one). ``fraction_of_floor``
is printed where a benchmark records it; a row with ``floor_extra_ms`` (the least time its adapters can add, at the
device's measured ceilings) also gets ``floor_vs_bare``, the ratio to bare that no implementation can beat.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict

# Benchmark-specific figures worth a column of their own in the table.
NOTE_KEYS = (
    "gb_per_s", "peak_growth_vs_largest_tensor", "switch_us", "tokens_per_s", "x_single", "fraction_of_limit",
    "fusion_saving_ms", "host_ms",
)  # fmt: skip


def load_rows(path: str) -> tuple[dict, list[dict]]:
    """Rows of one JSON file, with ``vs_bare`` / ``vs_peft`` computed inside that file."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "median_ms" not in info:
            continue
        rows.append(
            {
                "bench": bench["name"].split("[")[0],
                "case": str(info.get("case", "")),
                "provider": str(info.get("provider", bench.get("param", ""))),
                "median_ms": float(info["median_ms"]),
                "peak_mem_mb": (info.get("peak_mem_bytes") or 0) / 2**20,
                "fraction_of_floor": info.get("fraction_of_floor"),
                "notes": ", ".join(f"{k}={info[k]:.3g}" for k in NOTE_KEYS if isinstance(info.get(k), (int, float))),
                "baseline_case": info.get("baseline_case"),
                "baseline_bench": info.get("baseline_bench"),
                "floor_extra_ms": info.get("floor_extra_ms"),
            }
        )
    groups = defaultdict(dict)
    for row in rows:
        groups[(row["bench"], row["case"])][row["provider"]] = row
    for providers in groups.values():
        for baseline in ("bare", "peft"):
            if baseline in providers:
                for row in providers.values():
                    row[f"vs_{baseline}"] = row["median_ms"] / providers[baseline]["median_ms"]
    for row in rows:
        baseline = (row["baseline_bench"] or row["bench"], row["baseline_case"])
        bare = groups.get(baseline, {}).get("bare") if row["baseline_case"] else None
        if bare is not None:
            row["vs_bare"] = row["median_ms"] / bare["median_ms"]
            if isinstance(row["floor_extra_ms"], (int, float)):
                row["floor_vs_bare"] = 1.0 + row["floor_extra_ms"] / bare["median_ms"]
                row["notes"] = ", ".join(filter(None, [row["notes"], f"floor_vs_bare={row['floor_vs_bare']:.3f}"]))
    return data.get("machine_info", {}), rows


def write_outputs(machine: dict, rows: list[dict], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    columns = [
        "bench",
        "case",
        "provider",
        "median_ms",
        "vs_bare",
        "vs_peft",
        "fraction_of_floor",
        "peak_mem_mb",
        "notes",
    ]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        f"Device: {machine.get('device_name', '?')}; torch {machine.get('torch', '?')}, triton "
        f"{machine.get('triton', '?')}, transformers {machine.get('transformers', '?')}, peft "
        f"{machine.get('peft', '?')}; git {machine.get('git_revision', '?')}",
        "",
        "| bench | case | provider | median ms | vs bare | vs PEFT | of floor | peak MiB | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bench']} | {r['case']} | {r['provider']} | {r['median_ms']:.4f} | {fmt(r.get('vs_bare'), '.3f')} "
            f"| {fmt(r.get('vs_peft'), '.3f')} | {fmt(r.get('fraction_of_floor'), '.1%')} | {r['peak_mem_mb']:.1f} "
            f"| {r['notes']} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    _plot(rows, machine, os.path.join(out_dir, "ratios.png"))
    return table


def _plot(rows: list[dict], machine: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [r for r in rows if r.get("vs_bare") is not None or r.get("vs_peft") is not None]
    if not plotted:
        return
    labels = [f"{r['bench'].removeprefix('bench_')}\n{r['case']}\n{r['provider']}" for r in plotted]
    values = [r.get("vs_bare") if r.get("vs_bare") is not None else r["vs_peft"] for r in plotted]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(plotted)), 4.5))
    ax.bar(
        range(len(values)), values, color=["tab:green" if "engine" in r["provider"] else "tab:gray" for r in plotted]
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("time / baseline (bare, else PEFT)")
    ax.set_title(f"adapter-engine on {machine.get('device_name', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", default=None, help="folder for report.md, results.csv, ratios.png")
    args = parser.parse_args(argv)
    machine, rows = {}, []
    for path in args.results:
        if os.path.getsize(path) == 0:
            continue
        file_machine, file_rows = load_rows(path)
        machine = machine or file_machine
        rows += file_rows
    print(write_outputs(machine, rows, args.out or os.path.dirname(os.path.abspath(args.results[0]))))


if __name__ == "__main__":
    main()
