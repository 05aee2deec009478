"""bench/report.py turns one run's pytest-benchmark JSON into the results table: ratios within a case, against the
bare row of a named ``baseline_case``, and the compute floor of whole-model adapter rows."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name, case, provider, ms, **extra):
    return {"name": f"{name}[{provider}]", "extra_info": {"case": case, "provider": provider, "median_ms": ms, **extra}}


def test_ratios_within_a_case_and_against_a_baseline_case(report, tmp_path):
    rows = [
        _bench("bench_lora", "fwd M=1", "bare", 2.0),
        _bench("bench_lora", "fwd M=1", "engine", 3.0),
        _bench("bench_lora", "fwd M=1", "peft", 6.0),
        _bench("bench_model", "bert", "bare", 10.0, baseline_case="bert"),
        _bench("bench_model", "bert, stack1", "fused", 11.0, baseline_case="bert", floor_extra_ms=0.5),
        _bench("bench_model", "bert, stack3", "fused", 12.5, baseline_case="bert", floor_extra_ms=1.5),
        _bench("bench_model", "bert, stack3", "eager", 15.0, baseline_case="bert"),
        _bench("bench_other", "no baseline", "engine", 1.0),
        _bench(
            "bench_model_path", "bert, stack3", "fused rows", 13.0, baseline_case="bert", baseline_bench="bench_model"
        ),
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": {"device_name": "test"}, "benchmarks": rows}))
    _, loaded = report.load_rows(str(path))
    got = {(r["case"], r["provider"]): r for r in loaded}
    assert got[("fwd M=1", "engine")]["vs_bare"] == 1.5 and got[("fwd M=1", "engine")]["vs_peft"] == 0.5
    # every setup of a model against the one bare run, not only the last row per provider
    assert got[("bert, stack1", "fused")]["vs_bare"] == pytest.approx(1.1)
    assert got[("bert, stack3", "fused")]["vs_bare"] == pytest.approx(1.25)
    assert got[("bert, stack3", "eager")]["vs_bare"] == pytest.approx(1.5)
    assert got[("bert, stack3", "fused")]["floor_vs_bare"] == pytest.approx(1.15)
    assert "floor_vs_bare=1.150" in got[("bert, stack3", "fused")]["notes"]
    assert "vs_bare" not in got[("no baseline", "engine")]
    assert got[("bert, stack3", "fused rows")]["vs_bare"] == pytest.approx(1.3)  # another function's bare row
    table = report.write_outputs({"device_name": "test"}, loaded, str(tmp_path / "out"))
    assert "| bench_model | bert, stack3 | fused | 12.5000 | 1.250 |" in table


def test_profile_gaps_smoke(tmp_path, monkeypatch):
    """bench/profile_gaps.py (run by gpu_check.sh) profiles its cases and writes its tables (CPU sizes); named cases
    alone when asked."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import profile_gaps

    # the bench modules keep their models in module-level caches: fresh ones here, dropped after the test
    monkeypatch.setattr(profile_gaps.bench_serving, "_STATE", {})
    monkeypatch.setattr(profile_gaps.bench_bottleneck, "_MODELS", {})
    import bench_lora_model

    monkeypatch.setattr(bench_lora_model, "_MODELS", {})
    profile_gaps.main(str(tmp_path), [])
    summary = json.loads((tmp_path / "profile.json").read_text())
    cases = {"lora_single", "lora_mixed16", "bert_stack1", "bert_stack3", "stack3_train_eager", "stack3_train_fused",
             "lora_model_one", "lora_train_engine", "lora_train_composition", "lora_train_peft"}  # fmt: skip
    assert set(summary) == {"device", *cases}
    assert all(summary[c]["wall_ms"] > 0 for c in summary if c != "device")
    assert "Self CPU" in (tmp_path / "profile_lora_mixed16.txt").read_text()
    assert "function calls" in (tmp_path / "profile_lora_model_one.txt").read_text().split("cProfile")[1]
    profile_gaps.main(str(tmp_path / "some"), ["lora_train_engine"])
    assert set(json.loads((tmp_path / "some" / "profile.json").read_text())) == {"device", "lora_train_engine"}
