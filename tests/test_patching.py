"""Drop-in patching of Hugging Face models: every registered architecture (tiny random configs), identity with no
adapter, LoRA against PEFT (forward and every adapter gradient), bottleneck adapters fused vs eager, reversibility,
and the HF features that must keep working (save/from_pretrained, generate, gradient checkpointing, .to(dtype),
torch.compile, Trainer), PEFT interop, and API misuse.

Tolerances (fp32): 1e-5 absolute between the fused ops and PEFT / eager modules (hidden 32, values O(1); the
fused kernels sum in another order, a few ulp per op through 2 layers); gradients 1e-4 (sums over the batch of
products of O(1) values). bf16: 0.1 absolute vs the fp32 model (bf16 keeps 8 bits: 2^-8 relative per rounding,
accumulated over ~10 roundings per layer on O(1) values).
"""

import contextlib
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    GemmaConfig,
    GemmaModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

import adapter_engine as ae
from adapter_engine.bottleneck import BottleneckStackLayer
from adapter_engine.lora import LoraLinear

# the fused backward stays covered here: training through the patched models takes it (see conftest.py)
pytestmark = pytest.mark.usefixtures("fused_training")

ATOL, GRAD_ATOL = 1e-5, 1e-4
_LLAMA_KW = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
)
_LLAMA_KW |= dict(vocab_size=64, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_BERT_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT_KW |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BUILD = {
    "bert": lambda: BertModel(BertConfig(**_BERT_KW, max_position_embeddings=32)),
    "roberta": lambda: RobertaModel(RobertaConfig(**_BERT_KW, max_position_embeddings=40, pad_token_id=1)),
    "xlm-roberta": lambda: XLMRobertaModel(XLMRobertaConfig(**_BERT_KW, max_position_embeddings=40, pad_token_id=1)),
    "electra": lambda: ElectraModel(ElectraConfig(**_BERT_KW, embedding_size=16, max_position_embeddings=32)),
    "distilbert": lambda: DistilBertModel(
        DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0
        )
    ),
    "vit": lambda: ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=64,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )  # fmt: skip
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_KW)),
    "mistral": lambda: MistralModel(MistralConfig(**_LLAMA_KW)),
    "qwen2": lambda: Qwen2Model(Qwen2Config(**_LLAMA_KW)),
    "qwen3": lambda: Qwen3Model(Qwen3Config(**_LLAMA_KW, head_dim=8)),
    "gemma": lambda: GemmaModel(GemmaConfig(**_LLAMA_KW, head_dim=8)),
}
ARCHS = tuple(BUILD)


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILD[arch]().eval()


def inputs(arch: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)}
    return {"input_ids": torch.randint(3, 64, (2, 5), generator=gen)}


def out(model: nn.Module, batch: dict) -> torch.Tensor:
    res = model(**batch)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def weighted_sum(y: torch.Tensor) -> torch.Tensor:
    """A loss whose gradients are not rounding noise: the outputs weighed by fixed random weights (the mean square of a
    LayerNormed output, BertModel's, hardly depends on the weights before it)."""
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))).sum()


@torch.no_grad()
def randomise(model: nn.Module, marker: str, std: float = 0.2) -> None:
    for name, p in model.named_parameters():
        if marker in name:
            p.normal_(0.0, std)


def test_registry_covers_the_issue():
    from adapter_engine.archs import REGISTRY

    assert set(ARCHS) <= set(REGISTRY)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_matches_peft_and_unpatch_restores(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model, batch = make(arch), inputs(arch)
    pristine = copy.deepcopy(model)
    ref = out(model, batch)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    originals = dict(model.named_modules())

    ae.patch(model)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(isinstance(originals[n], (nn.Linear, LoraLinear)) or "c_attn" in n for n in wrapped)
    assert torch.equal(out(model, batch), ref), "no active adapter must be bit-identical"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == {k: p for k, (_, p) in before.items()}

    model.add_adapter("a", ae.LoraConfig(r=4, lora_alpha=8))
    randomise(model, "lora_B")
    model.set_adapter("a")  # PEFT's name works too
    y = out(model, batch)
    assert (y - ref).abs().max() > 1e-3

    ae.save_adapter(model, "a", tmp_path)
    pm = peft.PeftModel.from_pretrained(pristine, tmp_path, is_trainable=True).eval()
    y_ref = out(pm, batch)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    (y_ref * weight).sum().backward()
    theirs = {n.replace("base_model.model.", "").replace(".default.", ".a."): p for n, p in pm.named_parameters()}
    ours = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert ours and set(ours) <= set(theirs)
    for n, p in ours.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=GRAD_ATOL, rtol=1e-4, msg=n)

    ae.unpatch(model)
    assert not ae.is_patched(model) and "load_adapter" not in model.__dict__
    assert all(model.get_submodule(n) is originals[n] for n in wrapped)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, (v, _) in before.items())
    assert torch.equal(out(model, batch), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_bottleneck_fused_matches_eager_and_unpatches(arch):
    model, batch = make(arch), inputs(arch)
    ref = out(model, batch)
    keys = list(model.state_dict())
    ae.add_adapter(model, "h", ae.BottleneckConfig.double_seq_bn(reduction_factor=4))  # both placements
    randomise(model, ".adapters.h.")
    layers = [m for m in model.modules() if isinstance(m, BottleneckStackLayer)]
    assert len(layers) == 4  # 2 blocks x (attention, feed-forward)
    assert torch.equal(out(model, batch), ref), "loaded but inactive: bit-identical"
    ae.set_active_adapters(model, "h")
    y = out(model, batch)
    assert (y - ref).abs().max() > 1e-3
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".adapters.h." in n}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    for layer in layers:
        layer.fused = False  # AdapterHub-style eager modules
    y_eager = out(model, batch)
    torch.testing.assert_close(y, y_eager, atol=ATOL, rtol=0)
    (y_eager * weight).sum().backward()
    for n, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, atol=GRAD_ATOL, rtol=1e-4, msg=n)
    ae.unpatch(model)
    assert list(model.state_dict()) == keys and torch.equal(out(model, batch), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_seq_and_parallel_bottlenecks_per_arch(arch):
    """seq_bn and par_bn read the residual y: every layout must capture it (fused == eager, both act)."""
    model, batch = make(arch), inputs(arch)
    ref = out(model, batch)
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "p", ae.BottleneckConfig.par_bn(reduction_factor=4))
    randomise(model, ".adapters.")
    layers = [m for m in model.modules() if isinstance(m, BottleneckStackLayer)]
    for name in ("s", "p"):
        ae.set_active_adapters(model, name)
        for layer in layers:
            layer.fused = True
        y = out(model, batch)
        for layer in layers:
            layer.fused = False
        torch.testing.assert_close(y, out(model, batch), atol=ATOL, rtol=0)
        assert (y - ref).abs().max() > 1e-3
    ae.unpatch(model)
    assert torch.equal(out(model, batch), ref)


@pytest.mark.parametrize("residual_before_ln", [True, False])
def test_distilbert_adapters_read_the_blocks_layer_norm_as_adapterhub(residual_before_ln):
    """DistilBERT is post-LN but adds its residuals in the block, outside the sublayers. AdapterHub hands the block's
    ``sa_layer_norm`` / ``output_layer_norm`` to its adapter layers (``TransformerBlockWithAdapters``), so a seq_bn
    adapter reads ``LN(h + y)`` there as in BERT: ``out = LN(r_1 + y)``, ``r_1 = res + A(LN(h + y))`` with ``res`` =
    h (``residual_before_ln``) or ``LN(h + y)``. Checked here against that formula written out, at both placements."""
    model, batch = make("distilbert").eval(), inputs("distilbert")
    cfg = ae.BottleneckConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=4, residual_before_ln=residual_before_ln
    )
    ae.add_adapter(model, "a", cfg)
    randomise(model, ".adapters.a.")
    ae.set_active_adapters(model, "a")
    params = dict(model.named_parameters())

    def adapter(prefix, v):
        w = {k[len(prefix) :]: p for k, p in params.items() if k.startswith(prefix)}
        down = F.relu(F.linear(v, w["adapter_down.0.weight"], w["adapter_down.0.bias"]))
        return F.linear(down, w["adapter_up.weight"], w["adapter_up.bias"])

    def sublayer(prefix, h, y, ln):
        x = ln(h + y)
        return ln((h if residual_before_ln else x) + adapter(prefix, x) + y)

    def reference(x):
        for i, block in enumerate(model.transformer.layer):
            sa = block.attention._original_forward(x)[0]  # (no padding in the batch: no mask)
            x = sublayer(f"transformer.layer.{i}.attention.adapters.a.", sa, x, block.sa_layer_norm)
            h = block.ffn._original_forward(x)
            x = sublayer(f"transformer.layer.{i}.ffn.adapters.a.", h, x, block.output_layer_norm)
        return x

    with torch.no_grad():
        got = out(model, batch)
        expected = reference(model.embeddings(batch["input_ids"]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def lora_and_stack_active(model: nn.Module) -> None:
    """A LoRA "l" (random B) and a seq_bn "s" (random weights), both active, through the methods patch binds."""
    ae.add_adapter(model, "l", ae.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    randomise(model, ".adapters.s.")
    model.set_active_adapters(["l", "s"])


def test_transformers_adapter_methods_act_on_the_engines_adapters(tmp_path):
    """HF code calling transformers' own adapter methods on a patched model (``disable_adapters``, ``enable_adapters``,
    ``active_adapters``, ``get_adapter_state_dict``) acts on the engine's adapters; they reached transformers' PEFT
    integration before, which raised a misleading "PEFT >= 0.22" error and left the adapters on."""
    from safetensors.torch import load_file

    model, batch = make("bert").eval(), inputs("bert")
    with torch.no_grad():
        base = out(model, batch)
    lora_and_stack_active(model)
    with torch.no_grad():
        adapted = out(model, batch)
        assert model.active_adapters() == ["l", "s"]
        model.disable_adapters()
        assert model.active_adapters() == [] and torch.equal(out(model, batch), base)
        model.enable_adapters()
        assert model.active_adapters() == ["l", "s"] and torch.equal(out(model, batch), adapted)
    saved = load_file(os.path.join(model.save_adapter("l", tmp_path / "l"), "adapter_model.safetensors"))
    state = model.get_adapter_state_dict()  # the first active adapter, "l"; PEFT's keys less "base_model.model."
    state = {f"base_model.model.{k}": v for k, v in state.items()}  # (as transformers' save_pretrained adds it)
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(".adapters.s." in k for k in model.get_adapter_state_dict("s"))
    # transformers' state_dict= (a state dict gathered elsewhere): the same keys, values read from it
    for name in ("l", "s"):
        own = model.get_adapter_state_dict(name)
        given = {k: v.detach() + 1 for k, v in model.state_dict().items()}
        read = model.get_adapter_state_dict(name, state_dict=given)
        assert set(read) == set(own) and all(torch.equal(read[k], own[k] + 1) for k in own), name
    missing = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k}
    with pytest.raises(ValueError, match=r"state_dict has no entry for .*lora_A"):
        model.get_adapter_state_dict("l", state_dict=missing)
    ae.unpatch(model)
    assert "disable_adapters" not in model.__dict__


def test_the_bound_adapter_methods_take_transformers_call_forms(tmp_path):
    """HF code calls ``model.load_adapter(path, adapter_name=...)``, ``model.add_adapter(peft_config,
    adapter_name=...)`` and ``model.delete_adapter([...])`` (``PeftAdapterMixin``'s signatures): on a patched model
    each raised a TypeError or took the config for the name. Both the engine's / AdapterHub's forms and
    transformers' now reach the engine's adapters; a loaded PEFT adapter gives PEFT's outputs."""
    peft = pytest.importorskip("peft")
    batch = inputs("bert")
    pm = peft.get_peft_model(make("bert"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "p")
    model = ae.patch(make("bert"))
    assert model.load_adapter(tmp_path / "p", adapter_name="loaded") == "loaded"
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["key"]), adapter_name="fresh")
    model.add_adapter(peft.IA3Config())  # transformers' default name
    model.add_adapter("s", "seq_bn")
    model.add_adapter("t", config="seq_bn")  # AdapterHub's keyword form
    assert model.list_adapters() == ["loaded", "fresh", "default", "s", "t"]
    model.set_adapter(["loaded"])
    with torch.no_grad():
        torch.testing.assert_close(out(model, batch), out(pm, batch), atol=ATOL, rtol=0)
    model.delete_adapter(["fresh", "default"])
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]"):
        model.delete_adapter(["s", "nope"])  # all checked first: "s" stays
    model.delete_adapter("t")
    assert model.list_adapters() == ["loaded", "s"]
    with pytest.raises(TypeError, match="config is missing"):
        model.add_adapter("u")


def test_torch_save_and_load_of_a_patched_model():
    """A patched model with adapters pickles whole (``torch.save(model)``), as an unpatched one does; the copy's
    methods act on the copy. (The bound methods ``patch`` put on the model could not be rebuilt while unpickling.)"""
    model, batch = make("bert").eval(), inputs("bert")
    lora_and_stack_active(model)
    with torch.no_grad():
        ref = out(model, batch)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy_ = torch.load(buf, weights_only=False)  # (our own object: trusted)
    with torch.no_grad():
        assert torch.equal(out(copy_, batch), ref)
        copy_.set_active_adapters([])
        assert not torch.equal(out(copy_, batch), ref) and torch.equal(out(model, batch), ref)
    ae.unpatch(copy_)
    assert ae.is_patched(model)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_bottleneck_together_then_delete(lora_first):
    """LoRA on output.dense inside a wrapped BertOutput works whichever was added first."""
    model, batch = make("bert"), inputs("bert")
    ref = out(model, batch)
    adds = [("l", ae.LoraConfig(r=2, target_modules=["query", "value", "output.dense"])), ("s", "seq_bn")]
    for name, cfg in adds if lora_first else adds[::-1]:
        ae.add_adapter(model, name, cfg)
    randomise(model, "lora_B")
    randomise(model, ".adapters.s.")
    lora_only = make("bert")  # the same LoRA in a model that never had a bottleneck wrapper
    ae.add_adapter(lora_only, "l", adds[0][1])
    lora_only.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" in k}, strict=False)
    ae.set_active_adapters(lora_only, "l")
    y_lora = out(lora_only, batch)
    outs = {}
    for active in (["l"], ["s"], ["l", "s"]):
        ae.set_active_adapters(model, active)
        outs[tuple(active)] = out(model, batch)
    assert all((a - ref).abs().max() > 1e-3 for a in outs.values())
    torch.testing.assert_close(outs[("l",)], y_lora, atol=ATOL, rtol=0)
    assert (outs[("l", "s")] - outs[("s",)]).abs().max() > 1e-3 and (outs[("l", "s")] - outs[("l",)]).abs().max() > 1e-3
    ae.delete_adapter(model, "l")
    assert sorted(ae.list_adapters(model)) == ["s"] and not any(".lora_" in k for k in model.state_dict())
    torch.testing.assert_close(out(model, batch), outs[("s",)], atol=0, rtol=0)
    ae.delete_adapter(model, "s")
    assert torch.equal(out(model, batch), ref)


def test_merge_unmerge_lora_and_ia3():
    model, batch = make("bert"), inputs("bert")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ae.add_adapter(model, "l", ae.LoraConfig(r=4, lora_alpha=8))
    ae.add_adapter(model, "i", ae.IA3Config())
    randomise(model, "lora_B")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    ae.set_active_adapters(model, ["l", "i"])
    y = out(model, batch)
    ae.merge_adapter(model)  # folds both, drops them: a plain model again, with the adapted outputs
    assert not ae.is_patched(model) and set(model.state_dict()) == set(weights)
    torch.testing.assert_close(out(model, batch), y, atol=ATOL, rtol=0)
    ae.unmerge_adapter(model)  # the base weights come back (one rounding each way)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-6, msg=k)
    with pytest.raises(ValueError, match="cannot be merged"):
        ae.add_adapter(model, "s", "seq_bn") or ae.merge_adapter(model, ["s"])


def test_save_pretrained_from_pretrained_of_a_patched_model(tmp_path):
    for arch in ("bert", "gpt2"):
        model, batch = make(arch), inputs(arch)
        ref = out(model, batch)
        ae.patch(model)
        model.save_pretrained(tmp_path / arch)
        loaded, info = type(model).from_pretrained(tmp_path / arch, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(out(loaded.eval(), batch), ref)
        ae.patch(loaded)  # and a patched model loads a checkpoint into the shared Parameters
        assert torch.equal(out(loaded, batch), ref)


def test_save_pretrained_of_a_patched_model_with_an_adapter_layer_norm_before(tmp_path):
    """An adapter with ``ln_before`` registers its LayerNorm twice (as AdapterHub's module does): ``save_pretrained``
    of the patched model raised safetensors' RuntimeError about shared tensors. It saves each tensor once (every
    parameter, adapters included, as for other adapters); a plain ``from_pretrained`` loads the base."""
    from safetensors.torch import load_file

    model, batch = make("bert"), inputs("bert")
    ref = out(model, batch)
    ae.add_adapter(model, "n", ae.BottleneckConfig(reduction_factor=4, ln_before=True))
    randomise(model, ".adapters.n.")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    params = dict(model.named_parameters())  # (one name per tensor)
    assert set(params) <= set(saved) and all(torch.equal(saved[k], p) for k, p in params.items())
    loaded, info = BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(out(loaded.eval(), batch), ref)
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())  # (as transformers.Trainer saves)
    assert set(load_file(tmp_path / "given" / "model.safetensors")) == set(saved)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model, batch = make(arch), inputs(arch)
    pristine = copy.deepcopy(model)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(**batch, **kw)
    ae.patch(model)
    assert torch.equal(model.generate(**batch, **kw), ref)
    model.add_adapter("g", ae.LoraConfig(r=4, lora_alpha=32))
    randomise(model, "lora_B", std=1.0)
    model.set_active_adapters("g")
    ours = model.generate(**batch, **kw)
    model.save_adapter("g", tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval().generate(**batch, **kw)
    assert torch.equal(ours, theirs)


def test_gradient_checkpointing_and_train_mode():
    model, batch = make("bert"), inputs("bert")
    ae.add_adapter(model, "a", ae.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    randomise(model, "lora_B")
    ae.set_active_adapters(model, ["a", "s"])
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        weighted_sum(out(model, batch)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any(".lora_A." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_to_dtype_keeps_parameters_shared():
    model, batch = make("bert"), inputs("bert")
    ae.add_adapter(model, "a", ae.LoraConfig(r=4, lora_alpha=8))
    randomise(model, "lora_B", std=1.0)  # the adapter moves the output by about 0.5: 5x the bf16 tolerance below
    ae.set_active_adapters(model, "a")
    y32 = out(model, batch)
    model.to(torch.bfloat16)
    wrapper = model.encoder.layer[0].attention.self.query
    assert wrapper.weight is model.get_parameter("encoder.layer.0.attention.self.query.weight")
    assert wrapper.weight.dtype == wrapper.lora_A["a"].weight.dtype == torch.bfloat16
    y16 = out(model, batch)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0)
    ae.unpatch(model)
    assert model.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_torch_compile_lora():
    model, batch = make("bert"), inputs("bert")
    ae.add_adapter(model, "a", ae.LoraConfig(r=4, lora_alpha=8))
    ae.add_adapter(model, "b", ae.LoraConfig(r=2, lora_alpha=8, target_modules=["key"]))
    randomise(model, "lora_B")
    ae.set_active_adapters(model, ["a", "b"])
    y = out(model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(out(compiled, batch), y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_torch_compile_follows_use_adapters_routes(arch):
    """A compiled model called inside ``use_adapters`` runs the route (its routed layers outside the graph), not the
    model's active adapters, which it used to run silently; outside a block it keeps its graph. (Llama: a wrapper
    running eagerly reads the residual its block captured eagerly too.)"""
    model, batch = make(arch).eval(), inputs(arch)
    ae.add_adapter(model, "l", ae.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    randomise(model, ".adapters.s.")
    ae.set_active_adapters(model, [])
    routes = [["l", "s"], "l", "s"]
    with torch.no_grad():
        base = out(model, batch)
        expected = {}
        for route in routes:
            with ae.use_adapters(route):
                expected[str(route)] = out(model, batch)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(out(compiled, batch), base, atol=ATOL, rtol=0)
        for route in routes:
            with ae.use_adapters(route):
                got = out(compiled, batch)
            torch.testing.assert_close(got, expected[str(route)], atol=ATOL, rtol=0, msg=str(route))
            assert (got - base).abs().max() > 1e-3
        torch.testing.assert_close(out(compiled, batch), base, atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", ["rows", "levels"])
def test_torch_compile_bottleneck(monkeypatch, path):
    """One graph for the model, the stack an opaque custom op, on the row-block kernel or the cuBLAS level path (its
    per-level adapters reach the op from the modules' host hint, with no device read while tracing)."""
    from adapter_engine.kernels import bottleneck_dispatch

    monkeypatch.setattr(bottleneck_dispatch, "STACK_PATH", path)
    model, batch = make("bert"), inputs("bert")
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.set_active_adapters(model, "s")
    y = out(model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(out(compiled, batch), y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_torch_compile_bottleneck_inference_is_one_graph(arch):
    """Serving without autograd compiles to one graph that follows updates in place: the pack cache's key (the
    weights' versions) failed ``fullgraph=True`` under ``no_grad``, and a residual-outside layer's (Llama's)
    per-thread capture broke the graph twice per layer."""
    model, batch = make(arch), inputs(arch)
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    randomise(model, ".adapters.s.")
    ae.set_active_adapters(model, "s")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(out(compiled, batch), out(model, batch), atol=ATOL, rtol=0)
        randomise(model, ".adapters.s.adapter_up.")
        torch.testing.assert_close(out(compiled, batch), out(model, batch), atol=ATOL, rtol=0)


def test_functional_call_runs_the_given_adapter_weights():
    """``torch.func.functional_call`` swaps tensors through the modules' ``_parameters``, which no registration hook
    sees: the bottleneck layers' cached pack of the model's own weights used to run instead of the given ones."""
    from torch.func import functional_call

    def build():
        model = make("bert")
        ae.add_adapter(model, "l", ae.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
        ae.set_active_adapters(model, ["l", "s"])
        return model

    model, other, batch = build(), build(), inputs("bert")
    given = {n: p.detach() + 0.2 * torch.randn_like(p) for n, p in model.named_parameters() if ".adapters." in n}
    other.load_state_dict(given, strict=False)
    with torch.no_grad():
        mine = out(model, batch)
        for route in (None, "s"):
            with ae.use_adapters(route) if route else contextlib.nullcontext():
                out(model, batch)  # (the model's own weights packed first)
                got = functional_call(model, given, (), batch).last_hidden_state
                torch.testing.assert_close(got, out(other, batch), atol=ATOL, rtol=0, msg=str(route))
        torch.testing.assert_close(out(model, batch), mine, atol=0, rtol=0)  # and its own weights again after


def test_resize_token_embeddings_is_refused_while_the_embeddings_carry_adapter_layers():
    """transformers resized the input embeddings, then failed on a wrapped ``lm_head`` (a TypeError), which left the
    vocabularies of the two apart; a patched model refuses before anything changes, and resizes when they are not
    wrapped."""
    model = make("llama")
    ae.add_adapter(model, "l", ae.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="output embeddings 'lm_head' carry adapter layers"):
        model.resize_token_embeddings(80)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 64
    ae.unpatch(model)
    model = ae.patch(make("llama"))
    model.resize_token_embeddings(80)
    assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == 80


def test_adapters_added_or_loaded_inside_inference_mode_serve_and_train(tmp_path):
    """An adapter added or loaded inside ``torch.inference_mode`` (a serving loop) is made of normal tensors: its
    inference tensors failed the first forward (the bottleneck pack cache reads versions) and could not train."""
    source = make("bert")
    ae.add_adapter(source, "l", ae.LoraConfig(r=4, init_lora_weights=False))
    ae.save_adapter(source, "l", tmp_path / "l")
    model, batch = make("bert"), inputs("bert")
    with torch.inference_mode():
        ae.load_adapter(model, tmp_path / "l", "l")
        ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
        ae.set_active_adapters(model, ["l", "s"])
        out(model, batch)
    assert not any(p.is_inference() for p in model.parameters())
    ae.train_adapter(model, "s")
    weighted_sum(out(model, batch)).backward()
    assert all(p.grad is not None for p in ae.api.adapter_parameters(model, "s"))


def test_trainer_trains_only_the_adapter(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**_BERT_KW, max_position_embeddings=32, num_labels=2))
    ae.add_adapter(model, "t", ae.LoraConfig(r=4, lora_alpha=8))
    ae.set_active_adapters(model, "t")
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.clone() for n, p in model.named_parameters() if ".lora_B." in n}
    gen = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(3, 64, (6,), generator=gen), "labels": i % 2} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(model.get_parameter(n), v) for n, v in lora_b.items())


def test_patch_peft_model_runs_fused_with_same_outputs_and_grads():
    peft = pytest.importorskip("peft")
    for arch, targets in (("bert", ["query", "value", "dense"]), ("gpt2", ["c_attn", "c_fc"])):
        batch = inputs(arch)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                              fan_in_fan_out=arch == "gpt2")  # fmt: skip
        pm = peft.get_peft_model(make(arch), cfg).eval()
        y_ref = out(pm, batch)
        w = torch.randn_like(y_ref)
        (y_ref * w).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad()
        ae.patch(pm)
        layers = [m for m in pm.modules() if "forward" in m.__dict__]
        assert layers and all(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in layers)
        assert not hasattr(pm, "save_adapter") or "save_adapter" not in pm.__dict__  # PEFT keeps its own API
        y = out(pm, batch)
        torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
        (y * w).sum().backward()
        for n, g in ref_grads.items():
            torch.testing.assert_close(pm.get_parameter(n).grad, g, atol=GRAD_ATOL, rtol=1e-4, msg=n)
        with pm.disable_adapter():  # PEFT's own switches still work through the override
            assert torch.equal(out(pm, batch), out(ae.unpatch(copy.deepcopy(pm)).get_base_model(), batch))
        ae.unpatch(pm)
        assert not any("forward" in m.__dict__ for m in pm.modules())
        assert torch.equal(out(pm, batch), y_ref)


def test_patched_peft_layers_fall_back_to_peft_where_the_fused_op_does_not_apply(monkeypatch):
    """The plain case runs the fused op; DoRA, a merged adapter, disabled adapters and weights of another dtype than
    the input run PEFT's own forward, with PEFT's outputs."""
    peft = pytest.importorskip("peft")
    import adapter_engine.lora as lora_mod

    calls = []
    real = lora_mod.lora_linear
    monkeypatch.setattr(lora_mod, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = inputs("bert")

    def case(use_dora=False, change=None):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False, use_dora=use_dora)
        pm = peft.get_peft_model(make("bert"), cfg).eval()
        if change is not None:
            change(pm)
        want = out(pm, batch)
        calls.clear()
        ae.patch(pm)
        got = out(pm, batch)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        return len(calls)

    assert case() > 0  # the plain case: fused
    assert case(use_dora=True) == 0
    assert case(change=lambda pm: pm.merge_adapter()) == 0
    assert case(change=lambda pm: pm.base_model.disable_adapter_layers()) == 0

    def fp64_factors(pm):
        for m in pm.modules():
            if hasattr(m, "lora_A"):
                m.lora_A.double(), m.lora_B.double()

    assert case(change=fp64_factors) == 0


def test_a_route_naming_a_patched_peft_models_adapters_is_refused_not_ignored():
    """PEFT layers do not follow ``use_adapters``: a route naming their adapters ran the active adapter for every
    row, silently. It is refused, naming PEFT's adapter_names=; a route naming none of them (meant for another model
    in the same block) leaves PEFT's forward alone, and PEFT's own mixed batch still works through the override."""
    peft = pytest.importorskip("peft")
    batch = inputs("bert")
    pm = peft.get_peft_model(make("bert"), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=3, target_modules=["query"], init_lora_weights=False))
    pm.eval()
    mixed = pm(**batch, adapter_names=["b", "__base__"]).last_hidden_state
    active = out(pm, batch)
    ae.patch(pm)
    for spec in (["b", None], "default", ae.Stack("b", "default")):
        with ae.use_adapters(spec), pytest.raises(ValueError, match="does not follow routes.*adapter_names="):
            out(pm, batch)
    with ae.use_adapters(["other", None]):  # another model's adapters
        torch.testing.assert_close(out(pm, batch), active, atol=ATOL, rtol=0)
    torch.testing.assert_close(pm(**batch, adapter_names=["b", "__base__"]).last_hidden_state, mixed, atol=ATOL, rtol=0)


def test_unregistered_model_needs_explicit_targets():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    model, x = Tiny(), torch.randn(3, 8)
    ref = model(x)
    with pytest.raises(ValueError, match="pass target_modules"):
        ae.patch(model)
    ae.patch(model, target_modules=["fc1", "fc2"])
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="matches 'act', a ReLU"):
        ae.add_adapter(model, "bad", ae.LoraConfig(target_modules=["act"]))
    with pytest.raises(ValueError, match="'nope' matches no module"):
        ae.add_adapter(model, "bad", ae.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="need a registered architecture"):
        ae.add_adapter(model, "bn", "seq_bn")
    model.add_adapter("x", ae.LoraConfig(r=2, lora_alpha=2, target_modules=["fc2"]))
    randomise(model, "lora_B")
    model.set_active_adapters("x")
    fc2 = model.fc2
    torch.testing.assert_close(
        model(x), ref + fc2.lora_B["x"](fc2.lora_A["x"](model.act(model.fc1(x)))), atol=1e-6, rtol=0
    )
    assert ae.list_adapters(model) == ["x"] and ae.unpatch(model) is model and isinstance(model.fc2, nn.Linear)


def test_api_functions_patch_an_unregistered_model_for_an_adapter_that_names_its_layers(tmp_path):
    """An unregistered architecture (OPT) takes PEFT LoRA / IA3 adapters through ``load_adapter`` and ``add_adapter``
    without a ``patch(model, target_modules=...)`` first: the adapter's config names its layers. Both used to fail
    with "pass target_modules" (the API patched the model with default targets it does not have). Outputs match
    PEFT's; a bare ``patch`` still asks for the targets."""
    peft = pytest.importorskip("peft")
    from transformers import OPTConfig, OPTForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4)
    config = OPTConfig(**sizes, max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    base, batch = OPTForCausalLM(config).eval(), inputs("llama")
    with pytest.raises(ValueError, match="pass target_modules"):
        ae.patch(copy.deepcopy(base))
    configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], init_lora_weights=False),
        "ia3": peft.IA3Config(target_modules=["v_proj", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False),
    }
    for kind, cfg in configs.items():
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        pm.save_pretrained(tmp_path / kind)
        model = copy.deepcopy(base)
        ae.load_adapter(model, tmp_path / kind, name=kind, set_active=True)
        with torch.no_grad():
            y, y_ref, y_base = out(model, batch), out(pm, batch), out(base, batch)
        assert (y_ref - y_base).abs().max() > 1e-3
        torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0, msg=kind)
        ae.unpatch(model)
        assert torch.equal(out(model, batch), y_base)
    model = copy.deepcopy(base)
    ae.add_adapter(model, "fresh", ae.LoraConfig(r=2, target_modules=["k_proj"]))
    assert [n for n, m in model.named_modules() if isinstance(m, LoraLinear)] == [
        f"model.decoder.layers.{i}.self_attn.k_proj" for i in range(2)
    ]
    with pytest.raises(ValueError, match="set target_modules in the config"):
        ae.add_adapter(model, "no_targets", ae.LoraConfig(r=2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, p: ae.add_adapter(m, "bad", ae.LoraConfig(r=2, target_modules=["nope"])), "matches no module"),
        (lambda m, p: ae.load_adapter(m, p / "missing"), "does not exist"),
        # (a name of another type: a TypeError inside the file reader)
        (lambda m, p: ae.load_adapter(m, p, name=3), "adapter name must be a non-empty string"),
        (lambda m, p: ae.set_active_adapters(m, "never_added"), "unknown adapters"),
        (lambda m, p: ae.save_adapter(m, "never_saved", p), "no adapter named"),
    ],
)
def test_a_refused_call_leaves_an_unpatched_model_unpatched(call, match, tmp_path):
    """An API function called on an unpatched model patches it first; when the call is refused (a target typo, a
    wrong path, an unknown name) the model is left as it was: not patched, its own modules and methods. It used to
    stay patched, its default targets wrapped in LoraLinear layers and the adapter methods bound over transformers'
    own, so that a later ``peft.get_peft_model`` of it failed ("Target module LoraLinear ... is not supported")."""
    peft = pytest.importorskip("peft")
    model, batch = make("bert"), inputs("bert")
    modules = dict(model.named_modules())
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        call(model, tmp_path)
    assert not ae.is_patched(model) and "add_adapter" not in model.__dict__
    assert dict(model.named_modules()) == modules
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)).eval()
    assert (out(pm, batch) - out(make("bert"), batch)).abs().max() > 1e-4
    patched = ae.patch(make("bert"))  # a model patched before the refused call stays patched
    with pytest.raises(ValueError, match="unknown adapters"):
        ae.set_active_adapters(patched, "never_added")
    assert ae.is_patched(patched)


def test_a_bare_name_given_as_a_string_target_names_peft_s_regex_rule():
    """``LoraConfig(target_modules="query")``: a string is one regex that must match a whole module name (PEFT's
    rule), so it matched nothing, and the error said only that; it now says so and what the list form selects. A
    regex that matches nothing, as a suffix too, keeps the short message."""
    model = make("bert")
    with pytest.raises(
        ValueError,
        match=r"'query' matches no module .*a string is a regex that must match a whole "
        r"module name .*\['query'\] selects \['encoder.layer.0.attention.self.query'",
    ):
        ae.add_adapter(model, "str_target", ae.LoraConfig(r=2, target_modules="query"))
    with pytest.raises(ValueError, match=r"'nope' matches no module of BertModel$"):
        ae.add_adapter(model, "str_target", ae.LoraConfig(r=2, target_modules="nope"))
    assert not ae.is_patched(model)


def test_asking_an_unpatched_model_for_its_adapters_leaves_it_unpatched():
    """``list_adapters`` / ``active_adapters`` of a plain model (say, to check that a merge left none) patched it:
    its default targets were wrapped and the adapter methods bound, so that a later ``peft.get_peft_model`` failed
    ("Target module LoraLinear ... is not supported"). They answer that it has none and leave it as it was; a
    PeftModel is refused as before, unpatched."""
    peft = pytest.importorskip("peft")
    model = make("bert")
    modules = dict(model.named_modules())
    assert ae.list_adapters(model) == [] and ae.api.active_adapters(model) == ()
    assert not ae.is_patched(model) and "add_adapter" not in model.__dict__ and dict(model.named_modules()) == modules
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query"]))
    for ask in (ae.list_adapters, ae.api.active_adapters):
        with pytest.raises(ValueError, match="keep using PEFT's own adapter API"):
            ask(pm)
        assert not ae.is_patched(pm)


@pytest.mark.parametrize("kind", ["lora", "seq_bn"])
def test_a_model_on_the_meta_device_is_refused_at_load_and_merge(kind, tmp_path):
    """A model built without its weights (under ``torch.device("meta")``, as accelerate's ``init_empty_weights``
    builds one): ``load_adapter`` copied the adapter's weights onto meta, so they were lost without a word (a later
    ``to_empty`` gave them garbage), and ``merge_adapter`` of an adapter added there said every targeted layer shared
    one weight (all meta tensors sit at address 0). Both are refused naming the meta device; the load leaves the model
    unpatched."""
    donor = make("bert")
    ae.add_adapter(donor, "meta_src", ae.LoraConfig(r=2, init_lora_weights=False) if kind == "lora" else kind)
    folder = ae.save_adapter(donor, "meta_src", tmp_path / kind, format="peft" if kind == "lora" else "adapterhub")
    with torch.device("meta"):
        model = make("bert")
    with pytest.raises(ValueError, match=r"cannot load adapter 'meta_ld'.* parameters on the meta device"):
        ae.load_adapter(model, folder, name="meta_ld")
    assert not ae.is_patched(model)
    ae.add_adapter(model, "meta_new", ae.LoraConfig(r=2))  # (a fresh adapter on meta is as empty as the model)
    with pytest.raises(ValueError, match=r"cannot merge \['meta_new'\].* parameters on the meta device"):
        ae.merge_adapter(model, "meta_new")
    assert ae.list_adapters(model) == ["meta_new"]


def test_a_bottleneck_refused_on_an_unregistered_model_or_a_peft_model_leaves_it_as_it_was():
    """Bottleneck adapters on an architecture without registered placements (Gemma2 here, Llama-like with extra norms
    around each sublayer; this test used Qwen3 before it was registered) are refused at add time naming its
    model_type; the model stays unpatched (it kept the adapter methods bound over transformers' own). A PeftModel,
    whose adapters the engine leaves to PEFT, keeps PEFT's own layer forwards (they stayed switched to the fused op)."""
    peft = pytest.importorskip("peft")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**_LLAMA_KW, head_dim=8)).eval()
    with pytest.raises(ValueError, match="need a registered architecture; model_type 'gemma2'"):
        ae.add_adapter(model, "gemma2_bn", "seq_bn")
    assert not ae.is_patched(model) and "add_adapter" not in model.__dict__
    pm = peft.get_peft_model(make("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="keep using PEFT's own adapter API"):
        ae.add_adapter(pm, "on_peft", "seq_bn")
    layers = [m for m in pm.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert layers and not ae.is_patched(pm) and all("forward" not in m.__dict__ for m in layers)


def test_a_peft_ia3_adapter_with_regex_targets_loads_into_the_task_model(tmp_path):
    """A PEFT IA3 adapter saved from a BertModel with regex ``target_modules`` / ``feedforward_modules`` (written
    against BertModel's names) loads into a BertForSequenceClassification, as a LoRA adapter does: the feed-forward
    regex was matched against the task model's names only and failed with "matches no module". Outputs equal
    PEFT's in both models."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    task = BertForSequenceClassification(BertConfig(**_BERT_KW, max_position_embeddings=32, num_labels=3)).eval()
    batch = inputs("bert")
    cfg = peft.IA3Config(
        target_modules=r"encoder\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
        feedforward_modules=r"encoder\.layer\.\d+\.output\.dense",
        init_ia3_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(task.bert), cfg).eval()
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        y_ref, y_base = out(pm, batch), out(task.bert, batch)
    assert (y_ref - y_base).abs().max() > 1e-3
    for model in (copy.deepcopy(task), copy.deepcopy(task.bert)):
        ae.load_adapter(model, tmp_path, name="i", set_active=True)
        bert = model.bert if hasattr(model, "bert") else model
        assert sum(bert.get_submodule(f"encoder.layer.{i}.output.dense").ia3_feedforward["i"] for i in range(2)) == 2
        with torch.no_grad():
            torch.testing.assert_close(out(bert, batch), y_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "arch", ["bert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "xlm-roberta", "electra"]
)
def test_default_targets_are_peft_defaults(arch):
    """With no ``target_modules`` the engine adapts the layers PEFT adapts for that ``model_type`` (LoRA, IA3 and
    IA3's feed-forward layers). Qwen2's IA3 used Llama's ``k_proj`` where PEFT scales ``q_proj`` (as for Qwen3 and
    Gemma). Where PEFT has no IA3 defaults (XLM-RoBERTa, ELECTRA) both refuse an IA3Config without
    ``target_modules``."""
    peft = pytest.importorskip("peft")
    for kind, ours_cfg, peft_cfg in (
        ("lora", ae.LoraConfig(r=2), peft.LoraConfig(r=2)),
        ("ia3", ae.IA3Config(), peft.IA3Config()),
    ):
        model = make(arch)
        try:
            pm = peft.get_peft_model(make(arch), peft_cfg)
        except ValueError:
            assert kind == "ia3" and arch in ("xlm-roberta", "electra")
            with pytest.raises(ValueError, match=f"model_type '{arch}' has no default IA3 target_modules"):
                ae.add_adapter(model, f"ia3_{arch}", ours_cfg)
            assert not ae.is_patched(model)
            continue
        ae.add_adapter(model, "x", ours_cfg)
        theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "base_layer")}
        ours = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.has_adapter("x")}
        assert set(ours) == set(theirs), kind
        if kind == "ia3":
            assert {n for n, m in ours.items() if m.ia3_feedforward["x"]} == {
                n for n, m in theirs.items() if m.is_feedforward
            }


def test_targets_never_select_the_adapters_own_layers():
    """A regex (or ``"all-linear"``) over a patched model selects the model's layers, never an adapter's own: a LoRA's
    ``lora_A`` / ``lora_B`` factors and a bottleneck adapter's projections were wrapped in LoRA layers of their own
    (PEFT never targets its tuner layers' insides). ``"all-linear"`` selects PEFT's layers (all but the LM head);
    it used to match nothing."""
    peft = pytest.importorskip("peft")
    model, batch = make("bert"), inputs("bert")
    ae.add_adapter(model, "a", ae.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    ae.add_adapter(model, "s", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "q", ae.LoraConfig(r=2, target_modules=r".*query.*", init_lora_weights=False))
    ae.add_adapter(model, "o", ae.LoraConfig(r=2, target_modules=r".*\.output\..*", init_lora_weights=False))
    modules = ae.patching.get_state(model).adapters
    assert modules["q"].modules == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert modules["o"].modules == [
        f"encoder.layer.{i}.{sub}" for i in range(2) for sub in ("attention.output.dense", "output.dense")
    ]
    assert not any(isinstance(m, LoraLinear) for n, m in model.named_modules() if ".lora_" in n or ".adapters." in n)
    ae.set_active_adapters(model, ["a", "q", "o"])
    out(model, batch)
    for arch in ("bert", "gpt2", "llama"):
        model = make(arch)
        ae.add_adapter(model, "all", ae.LoraConfig(r=2, target_modules="all-linear"))
        pm = peft.get_peft_model(make(arch), peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "base_layer")}
        assert set(ae.patching.get_state(model).adapters["all"].modules) == theirs, arch


def test_api_misuse():
    model = make("bert")
    ae.add_adapter(model, "s", "seq_bn")
    ae.add_adapter(model, "p", "par_bn")
    with pytest.raises(ValueError, match="already taken"):
        ae.add_adapter(model, "s", "lora")
    with pytest.raises(ValueError, match=r"unknown adapters \['zzz'\]"):
        ae.set_active_adapters(model, ["s", "zzz"])
    with pytest.raises(ValueError, match="cannot run as one stack"):
        ae.set_active_adapters(model, ae.Stack("s", "p"))
    with pytest.raises(TypeError, match="active adapters must be"):
        ae.set_active_adapters(model, 3)
    with pytest.raises(ValueError, match="no adapter named 'q'"):
        ae.delete_adapter(model, "q")
    with pytest.raises(ValueError, match="without '.'"):
        ae.add_adapter(model, "a.b", "lora")
    ae.patch(model)  # patching twice is a no-op
    assert ae.list_adapters(model) == ["s", "p"]
    # IA3 feed-forward layers outside target_modules (PEFT refuses them; they were silently left unadapted)
    with pytest.raises(ValueError, match=r"feedforward_modules \[.output.dense.\] must be a subset of target_modules"):
        ae.add_adapter(model, "i", ae.IA3Config(target_modules=["key"], feedforward_modules=["output.dense"]))
    assert ae.list_adapters(model) == ["s", "p"]
    assert not any(isinstance(m, LoraLinear) and m.ia3_l for m in model.modules())


def test_a_bottleneck_left_out_of_every_layer_is_refused(tmp_path):
    """leave_out covering every layer would give an adapter with no modules: refused, the model untouched."""
    model = make("bert")  # 2 layers
    keys = set(model.state_dict())
    everywhere = ae.BottleneckConfig.seq_bn(reduction_factor=4, leave_out=[0, 1])
    with pytest.raises(ValueError, match=r"leave_out=\[0, 1\] skips all 2 layers"):
        ae.add_adapter(model, "none", everywhere)
    assert ae.list_adapters(model) == [] and set(model.state_dict()) == keys
    ae.add_adapter(model, "one", ae.BottleneckConfig.seq_bn(reduction_factor=4, leave_out=[0]))
    ae.save_adapter(model, "one", tmp_path / "one", format="adapterhub")
    with pytest.raises(ValueError, match="skips all 2 layers"):
        ae.load_adapter(make("bert"), tmp_path / "one", name="none", config=everywhere)


@pytest.mark.parametrize("rates", [(0.5,), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5)], ids=str)
def test_patch_peft_model_in_training_with_dropout(rates):
    """PEFT's training mode (lora_dropout > 0): the fused op draws the same dropout mask from the same RNG state
    (one F.dropout of x per layer and adapter, in PEFT's order), so patched training matches PEFT's step for step,
    gradients included. Two active adapters with one rate draw two masks, as PEFT does (they used to share one), and
    an adapter without dropout beside one with it reads x undropped."""
    peft = pytest.importorskip("peft")
    batch = inputs("bert")

    def config(rate):
        return peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=rate, init_lora_weights=False
        )

    pm = peft.get_peft_model(make("bert"), config(rates[0])).train()
    if len(rates) == 2:
        pm.add_adapter("second", config(rates[1]))
        pm.base_model.set_adapter(["default", "second"])
        pm.train()
    (y_ref, g_ref), (y, g) = _peft_then_patched(pm, batch)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    assert set(g) == set(g_ref) and any("lora_A" in n for n in g)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=GRAD_ATOL, rtol=1e-4, msg=n)
    ae.unpatch(pm)


def _peft_then_patched(pm, batch) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(output, gradients by name) of one training step of the PEFT model ``pm``, then of it patched: the same
    seed, so PEFT's dropout masks and the fused op's are drawn alike. The loss is :func:`weighted_sum` (a mean
    square gave gradients of rounding noise, about 1e-11, that the two runs matched or not by luck)."""
    results = []
    for patched in (False, True):
        if patched:
            ae.patch(pm)
        pm.zero_grad()
        torch.manual_seed(3)
        y = out(pm, batch)
        weighted_sum(y).backward()
        results.append((y, {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}))
    return results


def test_patch_peft_model_training_with_dropout_and_frozen_lora_A():
    """LoRA-FA (lora_A frozen, lora_B trains) with dropout: the second layer's input requires grad while no A does,
    and the fused backward used to add the low-rank term to dx a second time, without the mask (9% off PEFT)."""
    peft = pytest.importorskip("peft")
    batch = inputs("bert")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.5,
                             init_lora_weights=False)  # fmt: skip
    pm = peft.get_peft_model(make("bert"), config).train()
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_B" in n)
    (_, g_ref), (_, g) = _peft_then_patched(pm, batch)
    assert set(g) == set(g_ref) and any("layer.0." in n for n in g)
    for n in g_ref:  # (relative to each gradient's size: these are small, about 1e-3)
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-4 * g_ref[n].abs().max().item(), rtol=1e-4, msg=n)
    ae.unpatch(pm)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lora", "seq_bn"])
def test_cuda_bf16_patched_model_error_within_torch_bf16(kind, tmp_path):
    """bf16 on the GPU: the patched (fused) model's error vs an fp64 reference must not exceed the error of the
    same model run eagerly in bf16 (PEFT for LoRA, AdapterHub-style eager modules for bottlenecks) + 10% slack."""
    peft = pytest.importorskip("peft")
    kw = dict(_BERT_KW, hidden_size=256, num_attention_heads=8, intermediate_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    base = BertModel(BertConfig(**kw)).eval()
    batch = {"input_ids": torch.randint(3, 64, (8, 128), device="cuda")}
    model = copy.deepcopy(base).to("cuda")
    if kind == "lora":
        ae.add_adapter(model, "a", ae.LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value", "dense"]))
        randomise(model, "lora_B", std=0.05)
        ae.save_adapter(model, "a", tmp_path)
        ref64 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).to("cuda", torch.float64).eval()
        eager16 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).to("cuda", torch.bfloat16).eval()
    else:
        ae.add_adapter(model, "a", ae.BottleneckConfig.seq_bn(reduction_factor=16))
        randomise(model, ".adapters.a.", std=0.05)
        eager16 = copy.deepcopy(model).to(torch.bfloat16)
        for layer in eager16.modules():
            if isinstance(layer, BottleneckStackLayer):
                layer.fused = False
        ref64 = copy.deepcopy(eager16).to(torch.float64)
        ae.set_active_adapters(eager16, "a")
        ae.set_active_adapters(ref64, "a")
    ae.set_active_adapters(model, "a")
    model.to(torch.bfloat16)
    with torch.no_grad():
        ref = out(ref64, batch)
        err_fused = (out(model, batch).double() - ref).abs().max().item()
        err_eager = (out(eager16, batch).double() - ref).abs().max().item()
    assert err_fused <= 1.1 * err_eager + 1e-3, (err_fused, err_eager)


def test_lora_layers_read_factor_weights_as_module_attributes_would():
    """The LoRA layers collect their factors from the module dicts directly (a host-time shortcut on every
    forward): the same parameter objects as ``lora_A[name].weight``, in the order asked, and a parametrized weight
    (computed on access, not a plain parameter) read the usual way."""
    from torch.nn.utils import parametrize

    from adapter_engine.lora import _weights

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    factors = nn.ModuleDict({"a": nn.Linear(4, 2, bias=False), "b": nn.Linear(4, 2, bias=False)})
    parametrize.register_parametrization(factors["b"], "weight", Doubled())
    got = _weights(factors._modules, ["b", "a"])
    assert got[1] is factors["a"].weight
    assert torch.equal(got[0], 2 * factors["b"].parametrizations.weight.original)


def test_a_linear_subclass_with_its_own_forward_is_not_wrapped():
    """An nn.Linear subclass that overrides forward (a router's softmax, a decoupled or quantized linear) was wrapped
    like any Linear: the fused op computed x W^T + b and dropped what its forward did, silently. Named targets now
    refuse it with the reason and change nothing; a regex and "all-linear" pass over it. FalconLinear, whose forward
    is a matmul and a bias add, still wraps."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from adapter_engine.lora import LoraLinear

    class Router(torch.nn.Linear):
        def forward(self, x):
            return torch.softmax(super().forward(x), -1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.proj, self.falcon = Router(8, 4), torch.nn.Linear(8, 8), FalconLinear(8, 8)

        def forward(self, x):
            return self.proj(x) + self.router(x).sum(-1, keepdim=True) + self.falcon(x)

    torch.manual_seed(0)
    model, x = Model(), torch.randn(3, 8)
    expected = model(x)
    with pytest.raises(ValueError, match="'router', a Router: an nn.Linear subclass with a forward of its own"):
        ae.add_adapter(model, "a", ae.LoraConfig(r=2, target_modules=["router", "proj"]))
    assert type(model.router) is Router and type(model.proj) is torch.nn.Linear
    for i, targets in enumerate((".*", "all-linear")):
        ae.add_adapter(model, f"b{i}", ae.LoraConfig(r=2, target_modules=targets))
        assert type(model.router) is Router
        assert isinstance(model.proj, LoraLinear) and isinstance(model.falcon, LoraLinear)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # (new LoRAs start at B = 0)


def test_patching_again_with_target_modules_wraps_them_too():
    """``patch(model, target_modules=...)`` on a patched model ignored the targets, silently: a later add_adapter
    naming no targets of its own then left those layers unadapted. They are wrapped now (all checked first), and
    ``unpatch`` restores every wrapped layer."""
    from adapter_engine.lora import LoraLinear

    model = make("bert")
    batch = inputs("bert")
    with torch.no_grad():
        expected = out(model, batch)
    ae.patch(model)  # BERT's defaults: query, value
    key = model.encoder.layer[0].attention.self.key
    with pytest.raises(ValueError, match="matches no module"):
        ae.patch(model, target_modules=["key", "nothing_here"])
    assert model.encoder.layer[0].attention.self.key is key
    ae.patch(model, target_modules=["key"])
    assert isinstance(model.encoder.layer[0].attention.self.key, LoraLinear)
    with torch.no_grad():
        assert torch.equal(out(model, batch), expected)
    ae.unpatch(model)
    assert model.encoder.layer[0].attention.self.key is key
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
