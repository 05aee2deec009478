"""PEFT's per-layer LoRA / IA3 config fields (``rank_pattern``, ``alpha_pattern``, ``layers_to_transform``,
``layers_pattern``, ``exclude_modules``) with PEFT 0.21's semantics: an adapter PEFT made with them loads with PEFT's
outputs unmerged and merged, unmerges back to the base, saves so that PEFT loads it with the same outputs, and
``add_adapter`` with the same config adapts the layers PEFT adapts, with PEFT's rank and scaling on each.

Tolerance (fp32): 1e-5 relative to the largest output (the fused and PEFT's eager summation orders differ by a few
ulp per op on O(1)-O(10) hidden states); saved-back outputs are compared exactly (the same tensors, PEFT's forward).
"""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import adapter_engine as ae
from adapter_engine import IA3Config, LoraConfig

peft = pytest.importorskip("peft")


def _bert():
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                                vocab_size=64)).eval()  # fmt: skip


def _llama():
    return LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=48, vocab_size=64)).eval()  # fmt: skip


def _gpt2():
    return GPT2Model(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=16)).eval()


IDS = torch.tensor([[3, 17, 42, 8, 61, 5, 9], [11, 2, 33, 40, 7, 19, 1]])


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def _close(out, ref) -> None:
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (out - ref).abs().max()


def _peft_layers(pm) -> dict[str, tuple[int, float]]:
    """{module name: (r, scaling)} of a PeftModel's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for n, m in pm.named_modules() if isinstance(m, LoraLayer)}  # fmt: skip


CASES = {
    "bert-rank-alpha-patterns": (_bert, dict(
        target_modules=["query", "value", "dense"],
        rank_pattern={"value": 2, r"layer\.1\.attention\.self\.query": 6}, alpha_pattern={"query": 3.0})),
    "bert-layer-int": (_bert, dict(target_modules=["query", "value"], layers_to_transform=1)),
    "bert-layers-list-pattern": (_bert, dict(target_modules=["query", "value"], layers_to_transform=[0, 2],
                                             layers_pattern="layer")),
    "bert-exclude-list": (_bert, dict(target_modules=["query", "value", "dense"], exclude_modules=["output.dense"])),
    "bert-exclude-regex": (_bert, dict(target_modules=["query", "value", "dense"], exclude_modules=r".*layer\.0\..*")),
    "llama-layers-and-patterns": (_llama, dict(
        target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers",
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 5})),
    "llama-all-linear-exclude-rslora": (_llama, dict(target_modules="all-linear", exclude_modules=["o_proj"],
                                                     use_rslora=True, alpha_pattern={"q_proj": 7})),
    "gpt2-conv1d-layers-pattern-list": (_gpt2, dict(
        target_modules=["c_attn", "c_proj"], layers_to_transform=[0, 2], layers_pattern=["h"],
        rank_pattern={"c_proj": 3}, fan_in_fan_out=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_with_per_layer_fields_matches_peft(case, tmp_path):
    make, kwargs = CASES[case]
    base = make()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    layers = _peft_layers(pm)
    pm.save_pretrained(tmp_path / "peft")
    ref = _out(pm)
    name = f"pat_{case.replace('-', '_')}"
    model = copy.deepcopy(base)
    ae.load_adapter(model, tmp_path / "peft", name=name, set_active=True)
    assert sorted(ae.patching.get_state(model).adapters[name].modules) == sorted(layers)
    _close(_out(model), ref)
    ae.save_adapter(model, name, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert _peft_layers(back) == layers
    assert torch.equal(_out(back), ref)
    ae.merge_adapter(model)  # the in-place merge kernel, each layer with its own r and scaling
    _close(_out(model), _out(pm.merge_and_unload()))
    ae.unmerge_adapter(model)
    for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n
    fresh = copy.deepcopy(base)  # add_adapter with the same (peft) config: PEFT's layers, ranks and scalings
    new = f"{name}_new"
    ae.add_adapter(fresh, new, config)
    layer = fresh.get_submodule
    got = {n: (layer(n).lora_A[new].weight.shape[0], layer(n).scaling[new])
           for n in ae.patching.get_state(fresh).adapters[new].modules}  # fmt: skip
    assert got.keys() == layers.keys()
    assert all(got[n][0] == layers[n][0] and got[n][1] == pytest.approx(layers[n][1]) for n in got)


def test_engine_config_with_patterns_saves_for_peft(tmp_path):
    """The engine's own LoraConfig takes the fields too; its saved adapter gives PEFT the same layers and outputs."""
    base = _bert()
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[2],
                     rank_pattern={"value": 2}, alpha_pattern={"query": 16})  # fmt: skip
    ae.add_adapter(model, "pat_engine", cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ae.set_active_adapters(model, "pat_engine")
    assert sorted(ae.patching.get_state(model).adapters["pat_engine"].modules) == [
        "encoder.layer.2.attention.self.query", "encoder.layer.2.attention.self.value"]  # fmt: skip
    ae.save_adapter(model, "pat_engine", tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        saved = json.load(fh)
    assert (saved["layers_to_transform"], saved["rank_pattern"], saved["alpha_pattern"]) == (
        [2], {"value": 2}, {"query": 16})  # fmt: skip
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _peft_layers(back) == {"encoder.layer.2.attention.self.query": (4, 4.0),
                                  "encoder.layer.2.attention.self.value": (2, 4.0)}  # fmt: skip
    _close(_out(model), _out(back))
    assert LoraConfig.from_dict(saved) == cfg


def test_ia3_exclude_modules_matches_peft(tmp_path):
    base = _bert()
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                            exclude_modules=r".*layer\.1\..*", init_ia3_weights=False)  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    ae.load_adapter(model, tmp_path / "peft", name="ia3_excl", set_active=True)
    _close(_out(model), _out(pm))
    ae.save_adapter(model, "ia3_excl", tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert torch.equal(_out(back), _out(pm))
    fresh = copy.deepcopy(base)
    ae.add_adapter(fresh, "ia3_excl_new", config)
    assert not [n for n in ae.patching.get_state(fresh).adapters["ia3_excl_new"].modules if ".layer.1." in n]
    assert IA3Config.from_dict(config.to_dict()).exclude_modules == r".*layer\.1\..*"


def test_weights_of_excluded_layers_or_other_ranks_are_refused(tmp_path):
    """A file whose config excludes layers it has weights for, or whose rank_pattern disagrees with its shapes, is
    refused naming the field; nothing is loaded."""
    base = _bert()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                   init_lora_weights=False))  # fmt: skip
    pm.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        meta = json.load(fh)
    for edit, match in (
        ({"exclude_modules": ["value"]}, r"exclude_modules \['value'\] does not select: \['encoder.layer.0.attention"),
        ({"layers_to_transform": [0]}, r"layers_to_transform \[0\] does not select: \['encoder.layer.1.attention"),
        ({"rank_pattern": {"value": 2}}, r"value': lora_A has shape \(4, 32\) .*r=2 from rank_pattern"),
    ):
        with open(tmp_path / "adapter_config.json", "w") as fh:
            json.dump({**meta, **edit}, fh)
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            ae.load_adapter(model, tmp_path, name="pat_bad")
        assert not ae.is_patched(model) or ae.list_adapters(model) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=".*query", layers_to_transform=[0]), "layers_to_transform cannot be used when"),
        (dict(target_modules=["query"], layers_pattern="layer"), "layers_pattern='layer' needs layers_to_transform"),
        (dict(target_modules=["query"], layers_to_transform=[-1]), "layers_to_transform must be"),
        (dict(rank_pattern={"query": 0}), r"rank_pattern\['query'\] must be a positive int"),
        (dict(alpha_pattern={"query(": 2}), "alpha_pattern key 'query\\(' is not a valid regular expression"),
        (dict(exclude_modules=[""]), "exclude_modules must be a string or a list"),
    ],
)
def test_bad_per_layer_fields_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_a_filter_that_leaves_no_layer_is_refused_by_add_adapter():
    model = _gpt2()  # GPT2Model's blocks are "h.<i>": without layers_pattern PEFT finds no layer index
    with pytest.raises(ValueError, match="layers_to_transform 0 leave none of them"):
        ae.add_adapter(model, "pat_none", LoraConfig(target_modules=["c_attn"], layers_to_transform=0))
    assert ae.list_adapters(model) == []


def test_adapterhub_format_refuses_layers_with_their_own_rank_or_alpha(tmp_path):
    """AdapterHub's LoRA has one r and alpha: an adapter whose rank_pattern / alpha_pattern give layers their own is
    refused for it (the file would have held other shapes than its r, or the wrong scaling); layers_to_transform
    alone saves, as AdapterHub's leave_out."""
    model = _bert()
    ae.add_adapter(model, "pat_ah_rank", LoraConfig(r=4, target_modules=["query", "value"], rank_pattern={"value": 2}))
    ae.add_adapter(model, "pat_ah_alpha", LoraConfig(r=4, target_modules=["query"], alpha_pattern={"query": 2}))
    for name in ("pat_ah_rank", "pat_ah_alpha"):
        with pytest.raises(ValueError, match="an r or lora_alpha of their own .* format='peft'"):
            ae.save_adapter(model, name, tmp_path / name, format="adapterhub")
    ae.add_adapter(model, "pat_ah_layers", LoraConfig(r=4, target_modules=["query", "value"], layers_to_transform=1))
    ae.save_adapter(model, "pat_ah_layers", tmp_path / "layers", format="adapterhub")
    with open(tmp_path / "layers" / "adapter_config.json") as fh:
        assert json.load(fh)["config"]["leave_out"] == [0, 2]
