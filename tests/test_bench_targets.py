"""bench/targets.py reads the issues' performance targets off a session's benchmark JSON. Checked on the committed
H100 results of session 2, whose figures its NOTES.md states."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "results" / "2026-11-26-h100-session2"


@pytest.fixture(scope="module")
def targets():
    spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "bench" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_session_2_figures(targets):
    paths = [str(p) for run in sorted(RUNS.iterdir()) if run.is_dir() for p in sorted(run.glob("bench_*.json"))]
    got = {r["what"]: r for r in targets.evaluate(paths)}  # runs in order: the last run of a bench counts
    merge1 = got["merge, 1 adapter: fraction of the bandwidth floor"]
    assert merge1["measured"] == pytest.approx(0.910, abs=1e-3) and merge1["met"] is True  # run 3 (NOTES: 91.0%)
    merge4 = got["merge, 4 adapters in one pass: fraction of the floor"]
    assert merge4["measured"] == pytest.approx(0.519, abs=1e-3) and merge4["met"] is False  # NOTES: 51.9%
    mixed = got["whole model, 4 adapters mixed: engine / bare"]
    assert mixed["measured"] == pytest.approx(1.22, abs=5e-3) and mixed["met"] is False  # NOTES: 1.22x
    assert got["whole-model merge: PEFT / engine (speed-up)"]["measured"] == pytest.approx(3.5, abs=0.01)
    switch = got["switching among resident adapters (us)"]
    assert switch["measured"] == pytest.approx(10.3, abs=0.05) and switch["met"] is True
    assert got["16 LoRA adapters mixed: throughput / one adapter"]["measured"] == pytest.approx(0.37, abs=5e-3)
    bert = got["BERT-base, 1 adapter: fused / bare"]  # the rows the old report merged, told apart by setup_name
    assert bert["measured"] == pytest.approx(9.545 / 4.867, abs=1e-3) and bert["where"] == "bert-base, stack1"
    # bare forward + dx alone took 0.744x PEFT's LoRA fwd+bwd there: no cuBLAS-based LoRA reaches 0.7x
    feasible = got["LoRA forward+backward, feasibility: bare / PEFT (worst; the target needs < 0.7)"]
    assert feasible["measured"] == pytest.approx(0.744, abs=1e-3) and feasible["met"] is False
    table = targets.format_table(list(got.values()))
    assert "| < 0.7 | 0.744 | **unreachable** |" in table
    assert table.startswith("Targets on NVIDIA H100") and table.count("\n| ") == len(targets.TARGETS) + 1


def test_missing_rows_are_not_measured_not_met(targets, tmp_path):
    empty = tmp_path / "bench_merge.json"
    empty.write_text('{"machine_info": {}, "benchmarks": []}')
    results = targets.evaluate([str(empty)])
    assert all(r["measured"] is None and r["met"] is None for r in results)
    assert "| - |" in targets.format_table(results)


def test_session_13_figures(targets):
    """Session 13's H100 files (bench/results/2026-11-27-h100-session13/NOTES.md): the Llama-shaped 3-stack target
    of 1.02 sits just above the adapters' compute floor (1.018: 0.272 ms of FLOPs on a 15.33 ms graphed bare
    forward), and issue 7's mixed-batch rows."""
    runs = ROOT / "bench" / "results" / "2026-11-27-h100-session13"
    got = {r["what"]: r for r in targets.evaluate([str(p) for p in sorted(runs.glob("*/bench_*.json"))])}
    floor = next(r for what, r in got.items() if what.startswith("Llama-shaped, 3 stacked, feasibility"))
    assert floor["measured"] == pytest.approx(1 + 0.2724 / 15.3264, abs=1e-4) and floor["met"] is True
    assert got["Llama-shaped, 3 stacked, CUDA-graphed (GPU work alone): fused / bare"]["measured"] == pytest.approx(
        16.5252 / 15.3264, abs=1e-3
    )
    assert got["16 seq_bn stacks mixed, CUDA-graphed (GPU work alone): throughput / one"]["measured"] == pytest.approx(
        0.998, abs=1e-3
    )
    assert got["switching among resident adapters (us)"]["measured"] == pytest.approx(12.4, abs=0.05)
    assert "| < 1.02 | 1.018 | reachable |" in targets.format_table(list(got.values()))


def test_paired_rounds_set_the_eager_stack_targets(targets, tmp_path):
    """Where the files hold bench_model_forward_paired rows, the eager whole-model stack targets read their paired
    ratio (bare and fused timed back to back), not the ratio of two rows timed minutes apart."""
    import json

    def row(name, **info):
        return {"name": name, "extra_info": info}

    rows = [
        row("bench_model_forward[bare-fused-bert-base]", case="bert-base forward", setup_name="bare", median_ms=9.0),
        row("bench_model_forward[stack1-fused-bert-base]", case="bert-base forward, stack1", setup_name="stack1",
            provider="fused", median_ms=15.4),
        row("bench_model_forward[stack3-fused-bert-base]", case="bert-base forward, stack3", setup_name="stack3",
            provider="fused", median_ms=8.0),
        row("bench_model_forward_paired[stack1-bert-base]", case="bert-base forward paired, stack1",
            setup_name="stack1", provider="fused paired", median_ms=5.8, paired_ratio=1.071),
    ]  # fmt: skip
    path = tmp_path / "bench_bottleneck.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": rows}))
    got = {r["what"]: r for r in targets.evaluate([str(path)])}
    one = got["BERT-base, 1 adapter: fused / bare"]
    assert one["measured"] == pytest.approx(1.071) and one["where"] == "bert-base, stack1, paired rounds"
    three = got["BERT-base, 3 stacked: fused / bare"]  # no paired row: the two rows' medians
    assert three["measured"] == pytest.approx(8.0 / 9.0) and three["where"] == "bert-base, stack3"


def test_training_rows_before_session_24_ran_the_default_dispatch(targets, tmp_path):
    """Session 23's H200 file: its "fused" training rows ran the engine's default dispatch (the eager modules, as
    ``TRAIN_FUSED`` is off), so they count for the default-dispatch target (worst 0.994, Llama-shaped) and leave
    the fused backward's diagnostic unmeasured; a row marked ``train_fused`` counts for that one only."""
    import json

    run = ROOT / "bench" / "results" / "2026-11-28-h200-session23" / "1-tests-benches" / "b" / "bench_bottleneck.json"
    got = {r["what"]: r for r in targets.evaluate([str(run)])}
    auto = got["training the top of 3: engine (default dispatch) / eager (worst)"]
    assert auto["measured"] == pytest.approx(31.913 / 32.098, abs=1e-3) and auto["where"].startswith("llama")
    fused_what = "training the top of 3, fused kernels forward and backward: fused / eager (worst)"
    assert got[fused_what]["measured"] is None
    data = json.loads(run.read_text())
    for b in data["benchmarks"]:
        if b["name"].startswith("bench_train_top_of_three[fused"):
            b["extra_info"]["train_fused"] = True
    marked = tmp_path / "bench_bottleneck.json"
    marked.write_text(json.dumps(data))
    got = {r["what"]: r for r in targets.evaluate([str(marked)])}
    assert got[fused_what]["measured"] == pytest.approx(31.913 / 32.098, abs=1e-3)
    assert got["training the top of 3: engine (default dispatch) / eager (worst)"]["measured"] is None
