"""transformers' own adapter methods (``PeftAdapterMixin``) on a patched model, against what transformers + PEFT do:
the active set, which parameters train, outputs, state-dict keys and the errors of each call form.

Tiny random models (BERT with a classification head, GPT-2 and Llama with LM heads), fp32 on the CPU. Outputs of a
loaded PEFT adapter are compared with PEFT's at 1e-5 absolute (hidden 32, values O(1): the fused op sums in another
order, a few ulp per op through 2 layers).
"""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import adapter_engine as ae

peft = pytest.importorskip("peft")

ATOL = 1e-5
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
_LLAMA |= dict(vocab_size=64, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
_GPT2 |= dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BUILD = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**_BERT)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**_GPT2)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA)),
}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def make(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILD[arch]().eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(ids()).logits


def lora(arch: str, **kw) -> "peft.LoraConfig":
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False, **kw)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", sorted(BUILD))
def test_add_adapter_in_transformers_form_activates_it_and_trains_it_alone(arch):
    """transformers' ``model.add_adapter(peft_config)`` activates the new adapter alone and leaves only its weights
    trainable (PEFT freezes the base and the other adapters). On a patched model it used to add the adapter inactive
    and freeze nothing: outputs stayed the base model's, and a ``Trainer`` fine-tuned the whole base, not the LoRA.
    The engine / AdapterHub form ``add_adapter(name, config)`` still only adds."""
    model = ae.patch(make(arch).train())
    base = logits(model)
    model.add_adapter("hfm_add_kept", lora(arch))  # the engine's form: added, inactive, nothing frozen
    assert model.active_adapters() == [] and trainable(model) == {n for n, _ in model.named_parameters()}
    model.add_adapter(lora(arch), adapter_name="hfm_add_a")
    assert model.active_adapters() == ["hfm_add_a"] and model.training
    own = {n for n, _ in model.named_parameters() if ".hfm_add_a." in n}
    assert own and trainable(model) == own
    first = logits(model)
    assert not torch.allclose(first, base)
    model.add_adapter(lora(arch))  # transformers' default name; the previous one is switched off and frozen
    assert model.active_adapters() == ["default"]
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".default." in n}
    model.set_adapter("hfm_add_a")
    torch.testing.assert_close(logits(model), first, atol=0, rtol=0)


def saved_peft(arch: str, folder, seed: int = 0) -> torch.Tensor:
    """Save a PEFT LoRA of ``arch`` (random factors) to ``folder``; returns PEFT's logits with it."""
    pm = peft.get_peft_model(make(arch), lora(arch))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(folder)
    return logits(pm)


@pytest.mark.parametrize("arch", sorted(BUILD))
def test_load_adapter_in_transformers_form_runs_the_adapter_alone_and_frozen(arch, tmp_path):
    """transformers' ``model.load_adapter(path, adapter_name=...)`` makes the loaded adapter the only active one and
    freezes the model (the adapter too unless ``is_trainable=True``), in eval mode. On a patched model it used to load
    the adapter inactive: the outputs stayed the base model's, not PEFT's."""
    first, second = saved_peft(arch, tmp_path / "one"), saved_peft(arch, tmp_path / "two", seed=1)
    model = ae.patch(make(arch).train())
    model.load_adapter(tmp_path / "one", adapter_name="hfm_load_one")
    assert model.active_adapters() == ["hfm_load_one"] and not model.training and not trainable(model)
    torch.testing.assert_close(logits(model), first, atol=ATOL, rtol=0)
    model.load_adapter(peft_model_id=tmp_path / "two", adapter_name="hfm_load_two", is_trainable=True)
    assert model.active_adapters() == ["hfm_load_two"]
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".hfm_load_two." in n}
    torch.testing.assert_close(logits(model), second, atol=ATOL, rtol=0)
    model.load_adapter(tmp_path / "one", "hfm_load_kept", set_active=False)  # the engine's form: only loaded
    assert model.active_adapters() == ["hfm_load_two"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_get_adapter_state_dict_has_transformers_keys_and_loads_into_peft(arch):
    """``get_adapter_state_dict`` gives transformers' keys (PEFT's less ``base_model.model.``, which transformers'
    ``save_pretrained`` adds): the engine's used to carry the prefix already, so code adding it (as transformers does)
    wrote keys PEFT does not find. The state dict loads into a PEFT-injected model with the engine's outputs."""
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    model = ae.patch(make(arch))
    model.add_adapter(lora(arch, **extra), adapter_name="hfm_sd")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hfm_sd." in name:
                p.normal_(0.0, 0.2)
    ref = peft.inject_adapter_in_model(lora(arch, **extra), make(arch), adapter_name="hfm_sd")
    theirs = peft.get_peft_model_state_dict(ref, adapter_name="hfm_sd")  # what transformers' method returns
    ours = model.get_adapter_state_dict()
    assert set(ours) == set(theirs)
    result = peft.set_peft_model_state_dict(ref, ours, "hfm_sd")
    assert not [k for k in result.missing_keys if "hfm_sd" in k] and not result.unexpected_keys
    torch.testing.assert_close(logits(ref), logits(model), atol=ATOL, rtol=0)


def test_load_adapter_takes_transformers_options_and_refuses_hub_downloads_clearly(tmp_path):
    """transformers' ``load_adapter`` options: ``low_cpu_mem_usage``, ``local_files_only`` and ``hotswap="auto"``
    load as usual, ``adapter_kwargs={"subfolder": ...}`` finds the adapter below the folder; download options with a
    value (``token``, ``revision``, ...) and Hub ids are refused naming the reason (they raised a bare "unexpected
    keyword argument" TypeError), as is ``hotswap=True``; nothing is loaded by a refused call."""
    saved_peft("bert", tmp_path / "sub" / "one")
    model = ae.patch(make("bert"))
    model.load_adapter(tmp_path / "sub" / "one", adapter_name="hfm_opt_a", low_cpu_mem_usage=True, hotswap="auto")
    model.load_adapter(tmp_path / "sub", adapter_name="hfm_opt_b", adapter_kwargs={"subfolder": "one"})
    model.load_adapter(tmp_path / "sub" / "one", adapter_name="hfm_opt_c", local_files_only=True, revision=None)
    refused = [
        (dict(token="hf_secret"), ValueError, r"local adapter folders only .* so token cannot apply"),
        (dict(adapter_kwargs={"revision": "v2"}), ValueError, r"so revision='v2' cannot apply.*snapshot_download"),
        (dict(hotswap=True), ValueError, r"hotswap=True .* not supported"),
        (dict(device_map="auto"), TypeError, r"unexpected keyword arguments \['device_map'\]"),
    ]
    for kwargs, error, match in refused:
        with pytest.raises(error, match=match):
            model.load_adapter(tmp_path / "sub" / "one", adapter_name="hfm_opt_no", **kwargs)
    with pytest.raises(FileNotFoundError, match=r"'someone/some-lora' does not exist: .* local folders only"):
        model.load_adapter("someone/some-lora", adapter_name="hfm_opt_no")
    assert model.list_adapters() == ["hfm_opt_a", "hfm_opt_b", "hfm_opt_c"]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_load_adapter_from_a_state_dict_and_config(arch, tmp_path):
    """transformers' ``load_adapter(adapter_state_dict=..., peft_config=...)``: an adapter given as tensors (keyed as
    ``get_adapter_state_dict`` gives them, or as PEFT saves them) loads as from its folder, active, named "default"
    unless named. It was refused with "unexpected keyword argument 'adapter_state_dict'"."""
    expected = saved_peft(arch, tmp_path / "one")
    donor = ae.patch(make(arch))
    donor.load_adapter(tmp_path / "one", adapter_name="hfm_sdl_donor")
    given = donor.get_adapter_state_dict()
    model = ae.patch(make(arch))
    model.load_adapter(adapter_state_dict=given, peft_config=lora(arch))
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    prefixed = {f"base_model.model.{k}": v for k, v in given.items()}
    model.load_adapter(adapter_state_dict=prefixed, peft_config=lora(arch), adapter_name="hfm_sdl_b")
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="needs the adapter's config: pass peft_config"):
        model.load_adapter(adapter_state_dict=given, adapter_name="hfm_sdl_no")
    with pytest.raises(TypeError, match="not both"):
        model.load_adapter(tmp_path / "one", adapter_state_dict=given, adapter_name="hfm_sdl_no")
    assert model.list_adapters() == ["default", "hfm_sdl_b"]


def test_load_adapter_of_a_save_pretrained_folder_says_how_to_load_it(tmp_path):
    """transformers' ``save_pretrained`` of a model with adapters writes the adapter alone, which ``load_adapter``
    loads; a patched model's writes the whole model (adapters beside the base's weights). ``load_adapter`` of that
    folder said only that no adapter file was found; it now names the folder a model checkpoint and the ways to load
    or write it, and loads nothing. ``save_adapter`` then ``load_adapter`` round-trips."""
    model = ae.patch(make("bert"))
    model.add_adapter(lora("bert"), adapter_name="hfm_sp")
    expected = logits(model)
    model.save_pretrained(tmp_path / "model")
    other = ae.patch(make("bert"))
    with pytest.raises(ValueError, match=r"model folder \(config.json\).*load_model.*save_adapter"):
        other.load_adapter(tmp_path / "model", adapter_name="hfm_sp")
    assert other.list_adapters() == []
    other.load_adapter(model.save_adapter("hfm_sp", tmp_path / "adapter"), adapter_name="hfm_sp")
    torch.testing.assert_close(logits(other), expected, atol=ATOL, rtol=0)


def test_set_adapter_trains_the_adapters_it_activates():
    """transformers' ``set_adapter`` makes the adapters it activates trainable and the others frozen (PEFT's layers
    do). After two ``add_adapter`` calls (each freezes the rest), ``set_adapter(first)`` ran the first one frozen on
    a patched model, and a training step changed nothing. ``set_active_adapters`` (the engine's name) still only
    switches which adapters run."""
    model = ae.patch(make("bert").train())
    for name in ("hfm_set_a", "hfm_set_b"):
        model.add_adapter(peft.LoraConfig(r=4, target_modules=["query", "value"]), adapter_name=name)
    model.set_adapter("hfm_set_a")
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".hfm_set_a." in n}
    model(ids(), labels=torch.tensor([0, 1])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B.hfm_set_a." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.set_adapter(["hfm_set_a", "hfm_set_b"])
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".hfm_set_" in n}
    model.set_active_adapters("hfm_set_b")
    assert trainable(model) == {n for n, _ in model.named_parameters() if ".hfm_set_" in n}


def test_the_methods_take_transformers_keyword_names():
    """transformers' keywords: ``add_adapter(adapter_config=...)``, ``set_adapter(adapter_name=...)``,
    ``delete_adapter(adapter_names=...)``; the first and last raised "unexpected keyword argument"."""
    model = ae.patch(make("bert"))
    model.add_adapter(adapter_config=lora("bert"), adapter_name="hfm_kw_a")
    model.add_adapter("hfm_kw_b", adapter_config=lora("bert"))  # (name, config): the engine's form
    model.set_adapter(adapter_name=["hfm_kw_a", "hfm_kw_b"])
    assert model.active_adapters() == ["hfm_kw_a", "hfm_kw_b"]
    with pytest.raises(TypeError, match="config twice"):
        model.add_adapter(lora("bert"), adapter_config=lora("bert"), adapter_name="hfm_kw_no")
    model.delete_adapter(adapter_names=["hfm_kw_a"])
    model.delete_adapter(adapter_names="hfm_kw_b")
    assert model.list_adapters() == []
    with pytest.raises(TypeError, match="name\\(s\\) once"):
        model.delete_adapter("x", adapter_names="x")
