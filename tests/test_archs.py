"""Architectures beyond the registry (tiny random models from configs, transformers 5): a PEFT LoRA adapter on every
linear layer loads, runs and merges with PEFT's outputs and saves back to PEFT's file, and bottleneck adapters are
refused at add time naming the ``model_type`` (the model left as it was); ``generate`` of the registered decoders
with each bottleneck preset active (KV cache against a full recompute, beam search, unpatch); and the model types
registered on a known layout (XLM-RoBERTa, ELECTRA: BERT's; Qwen3, Gemma: Llama's) stacking levels of each preset.

Tolerance: 1e-5 absolute against PEFT in fp32 (hidden 32, O(1) values; the fused op sums in another order), compared
on the tokens the attention mask keeps (padded positions are ill-conditioned, see the README's notes).
"""

import copy

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import adapter_engine as ae

ATOL = 1e-5
_SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT = dict(_SIZES, max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DECODER = dict(_SIZES, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SEQ2SEQ = dict(vocab_size=64, d_model=32, dropout=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=1)
_ENC_DEC = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
_ENC_DEC |= dict(encoder_ffn_dim=64, decoder_ffn_dim=64, attention_dropout=0.0)
# model_type -> a tiny model with a layout the registry does not know: relative attention (DeBERTa-v2), a fused qkv
# projection (GPT-NeoX), sandwich norms (Gemma2), encoder-decoders (T5 without biases, Whisper's convolutional input).
# The probes also passed Falcon, BLOOM, Phi-3 and BART; they are left out for time.
UNREGISTERED = {
    "deberta-v2": lambda: tf.DebertaV2Model(
        tf.DebertaV2Config(**_BERT, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])
    ),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_DECODER, num_key_value_heads=2)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_DECODER, num_key_value_heads=2, head_dim=8)),
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(**_SEQ2SEQ, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    ),
    "whisper": lambda: tf.WhisperForConditionalGeneration(
        tf.WhisperConfig(**_SEQ2SEQ, **_ENC_DEC, num_mel_bins=8, max_source_positions=16, max_target_positions=32)
    ),
}


def make(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNREGISTERED[arch]().eval()


def inputs(arch: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    if arch == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=gen), "decoder_input_ids": ids}
    if arch == "t5":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids, "attention_mask": mask}


def kept(y: torch.Tensor, batch: dict) -> torch.Tensor:
    """The outputs at the positions the attention mask keeps (all of them where it does not cover the output)."""
    mask = batch.get("attention_mask")
    return y[mask.bool()] if mask is not None and y.shape[:2] == mask.shape else y


def out(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    res = model(**batch)
    return res.logits if getattr(res, "logits", None) is not None else res.last_hidden_state


@pytest.mark.parametrize("arch", sorted(UNREGISTERED))
@torch.no_grad()
def test_peft_lora_on_every_linear_layer_of_an_unregistered_architecture(arch, tmp_path):
    peft = pytest.importorskip("peft")
    base, batch = make(arch), inputs(arch)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    theirs, plain = kept(out(pm, batch), batch), kept(out(base, batch), batch)
    assert (theirs - plain).abs().max() > 1e-3

    refused = copy.deepcopy(base)  # bottleneck adapters need the registry's placements: refused, model as it was
    with pytest.raises(ValueError, match=f"need a registered architecture; model_type '{arch}'"):
        ae.add_adapter(refused, f"{arch}_bn", "seq_bn")
    assert not ae.is_patched(refused)

    model = copy.deepcopy(base)
    name = ae.load_adapter(model, tmp_path / "peft", f"{arch}_lora", set_active=True)
    torch.testing.assert_close(kept(out(model, batch), batch), theirs, atol=ATOL, rtol=0)
    ae.save_adapter(model, name, tmp_path / "back")
    saved, back = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "back"))
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)
    ae.merge_adapter(model, name)
    assert not ae.is_patched(model)
    torch.testing.assert_close(kept(out(model, batch), batch), theirs, atol=ATOL, rtol=0)


_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2)
_GPT2 |= dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
DECODERS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**_GPT2)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=8)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_DECODER, num_key_value_heads=2, head_dim=8)),
}


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("arch", sorted(DECODERS))
@torch.no_grad()
def test_generate_with_a_bottleneck_active_reads_the_kv_cache_as_a_full_recompute(arch, preset):
    """The residual a pre-LN block's adapter reads is captured per call: with a KV cache each step sees only the new
    token, and the tokens must be those of a full recompute (``use_cache=False``), greedy and with beams."""
    torch.manual_seed(0)
    model, batch = DECODERS[arch]().eval(), inputs("llama")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref = model.generate(**batch, **kw)
    name = f"gen_{arch}_{preset}"
    ae.add_adapter(model, name, preset)
    for n, p in model.named_parameters():
        if f".adapters.{name}." in n:
            p.normal_(0.0, 0.3)
    ae.set_active_adapters(model, name)
    cached = model.generate(**batch, **kw)
    assert not torch.equal(cached, ref)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kw))
    if preset == "double_seq_bn":  # (the attention wrapper sees the cache reordered between steps)
        beams = model.generate(**batch, num_beams=2, **kw)
        assert torch.equal(beams, model.generate(**batch, num_beams=2, use_cache=False, **kw))
    ae.unpatch(model)
    assert torch.equal(model.generate(**batch, **kw), ref)


_CLS = dict(_SIZES, num_labels=3, pad_token_id=0)
_ENCODER = dict(_BERT, num_labels=3)
# model_type -> a task model of an architecture registered on another's layout
ON_KNOWN_LAYOUTS = {
    "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**_ENCODER, pad_token_id=1)),
    "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(**_ENCODER, embedding_size=16)),
    "qwen3": lambda: tf.Qwen3ForSequenceClassification(tf.Qwen3Config(**_CLS, num_key_value_heads=2, head_dim=8)),
    "gemma": lambda: tf.GemmaForSequenceClassification(tf.GemmaConfig(**_CLS, num_key_value_heads=2, head_dim=8)),
}


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("arch", sorted(ON_KNOWN_LAYOUTS))
@torch.no_grad()
def test_a_stack_of_levels_on_a_model_type_registered_on_a_known_layout(arch, preset):
    """A StackedAdapterModel of two levels: depth 0 is the unpatched model bit for bit, each depth acts and its fused
    output equals the eager modules', and unpatch restores the model bit for bit."""
    from adapter_engine.bottleneck import BottleneckStackLayer

    torch.manual_seed(0)
    base = ON_KNOWN_LAYOUTS[arch]().eval()
    batch = {"input_ids": torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(1))}
    ref = base(**batch).logits
    sam = ae.StackedAdapterModel(base)
    for level in range(2):
        name = f"known_{arch}_{preset}_{level}"
        sam.add_adapter(name, preset)
        for n, p in base.named_parameters():
            if f".adapters.{name}." in n:
                p.normal_(0.0, 0.3)
    layers = [m for m in base.modules() if isinstance(m, BottleneckStackLayer)]
    assert len(layers) == (4 if preset == "double_seq_bn" else 2)  # 2 blocks x their places
    sam.set_depth(0)
    assert torch.equal(sam(**batch).logits, ref)
    for depth in (1, 2):
        sam.set_depth(depth)
        fused = sam(**batch).logits
        for layer in layers:
            layer.fused = False
        eager = sam(**batch).logits
        for layer in layers:
            layer.fused = True
        assert (fused - ref).abs().max() > 1e-3
        torch.testing.assert_close(fused, eager, atol=ATOL, rtol=0)
    ae.unpatch(base)
    assert torch.equal(base(**batch).logits, ref)
