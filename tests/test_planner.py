"""The planner (adapter_engine.planner): parameter counts from configs are exact for every registered family and
task head (checked against the models transformers builds, on the meta device); bottleneck counts match the
adapters the engine adds; memory and time estimates move the right way; recommendations follow their reasons;
the ``plan`` command. The estimates' error against measured runs is checked by tests/test_demo.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    ViTConfig,
    XLMRobertaConfig,
)

import adapter_engine as ae
from adapter_engine import planner as pl

SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80, vocab_size=101)
DECODER = dict(SMALL, num_key_value_heads=2)
CONFIGS = {
    "bert": lambda: BertConfig(**SMALL, num_labels=3),
    "roberta": lambda: RobertaConfig(**SMALL, num_labels=4),
    "distilbert": lambda: DistilBertConfig(dim=48, n_layers=3, n_heads=4, hidden_dim=80, vocab_size=101),
    "gpt2": lambda: GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=101, n_positions=64, n_inner=80),
    "llama": lambda: LlamaConfig(**DECODER),
    "llama-tied": lambda: LlamaConfig(**DECODER, tie_word_embeddings=True),
    "llama-attention-bias": lambda: LlamaConfig(**DECODER, attention_bias=True),
    "llama-mlp-bias": lambda: LlamaConfig(**DECODER, mlp_bias=True),
    "mistral": lambda: MistralConfig(**DECODER),
    "qwen2": lambda: Qwen2Config(**DECODER),
    "xlm-roberta": lambda: XLMRobertaConfig(**SMALL, num_labels=5),
    "electra": lambda: ElectraConfig(**SMALL, embedding_size=24, num_labels=3),  # embeddings projected 24 -> 48
    "electra-same-width": lambda: ElectraConfig(**SMALL, embedding_size=48),  # no projection
    "qwen3": lambda: Qwen3Config(**DECODER, head_dim=16),  # head_dim apart from hidden / heads, q/k norms
    "qwen3-attention-bias": lambda: Qwen3Config(**DECODER, attention_bias=True),
    "gemma": lambda: GemmaConfig(**DECODER, head_dim=16),  # tied embeddings by default
    "gemma-untied-attention-bias": lambda: GemmaConfig(**DECODER, tie_word_embeddings=False, attention_bias=True),
    "vit": lambda: ViTConfig(**{k: v for k, v in SMALL.items() if k != "vocab_size"}, image_size=40, patch_size=8),
    "vit-no-qkv-bias": lambda: ViTConfig(
        **{k: v for k, v in SMALL.items() if k != "vocab_size"}, image_size=40, patch_size=8, qkv_bias=False
    ),
}
AUTO = {
    "none": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}


def heads_for(kind: str) -> list[str]:
    if kind.startswith("vit"):
        return ["none", "image-classification"]
    decoder = kind.startswith(("gpt2", "llama", "mistral", "qwen", "gemma"))
    return ["none", "sequence-classification", "token-classification"] + (["causal-lm"] if decoder else [])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_parameter_counts_are_exact_for_every_family_and_head(kind):
    config = CONFIGS[kind]()
    shape = pl.model_shape(config)
    for head in heads_for(kind):
        with torch.device("meta"):
            model = getattr(transformers, AUTO[head]).from_config(config)
        real = sum(p.numel() for p in model.parameters())
        assert pl.count_parameters(shape, head) == real, (kind, head)


def test_minilm_count_and_bottleneck_count_match_the_engine():
    from adapter_engine.demo import minilm_path

    shape = pl.model_shape(pl.load_config(minilm_path()))
    assert pl.count_parameters(shape) == 22_713_216  # all-MiniLM-L6-v2's BertModel
    model = transformers.BertModel(BertConfig(**SMALL))
    before = model.num_parameters()
    ae.add_adapter(model, "bn", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    assert model.num_parameters() - before == pl.bottleneck_parameters(pl.model_shape(model.config), 4)


def test_config_file_and_folder_load(tmp_path):
    config = CONFIGS["llama"]()
    config.save_pretrained(tmp_path)
    a = pl.model_shape(pl.load_config(tmp_path))
    b = pl.model_shape(pl.load_config(tmp_path / "config.json"))
    assert a == b and a.kv_heads == 2 and a.gated_mlp
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        pl.load_config(tmp_path / "missing")


def test_estimates_move_the_right_way():
    shape = pl.model_shape(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      intermediate_size=3072))  # fmt: skip
    hw = pl.hardware("h100")
    small = pl.estimate(shape, hw, "fft", batch=8, seq_len=128)
    large = pl.estimate(shape, hw, "fft", batch=32, seq_len=128)
    stack = pl.estimate(shape, hw, "stack", batch=8, seq_len=128)
    assert large.activations_bytes == 4 * small.activations_bytes  # linear in tokens
    assert large.step_time_s > small.step_time_s and large.step_flops == pytest.approx(4 * small.step_flops, rel=0.01)
    assert stack.trainable_parameters < small.trainable_parameters / 100
    assert stack.optimizer_bytes < small.optimizer_bytes / 100 and stack.activations_bytes < small.activations_bytes
    assert stack.step_time_s < small.step_time_s
    assert small.optimizer_bytes == small.trainable_parameters * 12  # bf16-mixed: two moments + master weights
    fp32 = pl.estimate(shape, hw, "fft", batch=8, seq_len=128, precision="fp32")
    assert (
        fp32.optimizer_bytes == fp32.trainable_parameters * 8 and fp32.activations_bytes == 2 * small.activations_bytes
    )


def test_recommendations_follow_resources_domains_and_updates():
    shape = pl.model_shape(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256))  # fmt: skip
    p = pl.plan(shape, pl.hardware(memory="24GB"), batch=1, seq_len=512)
    assert p.recommendation == "Stack and Adapt" and not p.fft.fits and p.stack.fits
    assert p.fft.total_parameters == pl.count_parameters(shape, "sequence-classification")
    assert "memory" in p.reasons[0] and "more than" in p.reasons[0]
    small = pl.model_shape(BertConfig(**SMALL))
    assert pl.plan(small, pl.hardware("h100"), domains=1, updates="rarely").recommendation == "Merge and FFT"
    assert pl.plan(small, pl.hardware("h100"), domains=5, updates="monthly").recommendation == "Stack and Adapt"
    assert pl.plan(small, pl.hardware("h100"), domains=1, updates="daily").recommendation == "Stack and Adapt"
    assert "fits" in pl.format_plan(p) and "recommendation: Stack and Adapt" in pl.format_plan(p)


def test_bad_inputs_are_refused():
    assert pl.parse_bytes("24GB") == 24 * 2**30 and pl.parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        pl.parse_bytes("lots")
    with pytest.raises(ValueError, match="unknown device"):
        pl.hardware("tpu")
    shape = pl.model_shape(BertConfig(**SMALL))
    with pytest.raises(ValueError, match="updates must be"):
        pl.plan(shape, pl.hardware(), updates="hourly")
    with pytest.raises(ValueError, match="strategy must be"):
        pl.estimate(shape, pl.hardware(), "lora")
    with pytest.raises(ValueError, match="decoders only"):
        pl.count_parameters(shape, "causal-lm")
    with pytest.raises(ValueError, match="not one the planner knows"):
        pl.model_shape(transformers.T5Config())


@pytest.mark.parametrize("tflops", [float("nan"), float("inf"), -float("inf"), 0.0, -5.0])
def test_non_finite_or_non_positive_throughput_is_refused(tflops):
    """NaN passed ``tflops <= 0`` and gave NaN step times (inf: zero); both are refused, naming the option."""
    with pytest.raises(ValueError, match="tflops must be a positive finite number"):
        pl.hardware(tflops=tflops)
    with pytest.raises(ValueError, match="tflops must be a positive finite number"):
        pl.Hardware("mine", 2**30, tflops, 100.0)
    with pytest.raises(ValueError, match="memory must be positive"):
        pl.hardware(memory="0MB")


def test_the_header_shows_memory_below_10_gib_with_decimals():
    shape = pl.model_shape(BertConfig(**SMALL))
    for memory, shown in (("512MB", "0.50 GiB"), ("1.5GB", "1.50 GiB"), ("24GB", "24 GiB")):
        header = pl.format_plan(pl.plan(shape, pl.hardware(memory=memory), batch=2, seq_len=8)).splitlines()[0]
        assert f"(memory set to {shown}), {shown}," in header, header


def test_plan_command(tmp_path, capsys):
    from adapter_engine.cli import main

    CONFIGS["qwen2"]().save_pretrained(tmp_path)
    assert (
        main(["plan", "--model", str(tmp_path), "--gpu-memory", "24GB", "--domains", "3", "--updates", "weekly"]) == 0
    )
    out = capsys.readouterr().out
    assert "recommendation: Stack and Adapt" in out and "24 GiB" in out
    assert main(["plan", "--model", "all-MiniLM-L6-v2", "--gpu", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fft"]["total_parameters"] == 22_713_216 + 384 * 2 + 2  # BertForSequenceClassification, 2 labels
    assert data["recommendation"] in ("Merge and FFT", "Stack and Adapt")
