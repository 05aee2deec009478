"""PEFT's ``modules_to_save`` (the trained classification head of a SEQ_CLS LoRA / IA3 adapter), against peft on a
tiny BertForSequenceClassification in fp32: loading, switching, routing, disabling, merging, saving, training.

PEFT saves a copy under the module's own keys (``base_model.model.classifier.weight``), runs the active adapter's
copy, refuses two active copies of one module, runs ``adapter_names=`` row groups through their copies and puts the
copy in the module's place in ``merge_and_unload``. Tolerance 1e-5: the engine's fused LoRA op and PEFT's separate
matmuls round differently in fp32 (logits are O(1)).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import adapter_engine as ae
from adapter_engine.checkpoint import merge_checkpoint
from adapter_engine.residency import restore_adapter, snapshot_adapter
from adapter_engine.routing import StaticRoute

peft = pytest.importorskip("peft")

CFG = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 num_labels=3)  # fmt: skip
ATOL = 1e-5


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(1)
    return {k: v.clone() for k, v in BertForSequenceClassification(CFG).state_dict().items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(2))


def bert(state) -> BertForSequenceClassification:
    model = BertForSequenceClassification(CFG).eval()
    model.load_state_dict(state)
    return model


def peft_config(kind: str):
    if kind == "ia3":
        return peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "output.dense"],
                              feedforward_modules=["output.dense"])  # fmt: skip
    return peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])


def randomize(pm, name: str, seed: int) -> None:
    """Trained-looking values for adapter ``name``: LoRA B, IA3 vectors and the head copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if f".{name}." in f"{n}." and ("lora_B" in n or "ia3_l" in n or "modules_to_save" in n):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "ia3_l" in n else 0.0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base_state):
    """PEFT adapters saved from a task model: "one" and "two" (LoRA, different heads), "vec" (IA3)."""
    root = tmp_path_factory.mktemp("mts")
    paths = {}
    for name, kind, seed in (("one", "lora", 3), ("two", "lora", 4), ("vec", "ia3", 5)):
        pm = peft.get_peft_model(bert(base_state), peft_config(kind), adapter_name=name)
        randomize(pm, name, seed)
        pm.save_pretrained(root)  # (a non-default adapter goes to root/<name>)
        paths[name] = root / name
    return paths


def peft_model(state, saved, *names):
    pm = peft.PeftModel.from_pretrained(bert(state), saved[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(saved[name], adapter_name=name)
    return pm.eval()


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_peft_saves_the_head_under_its_own_keys(saved):
    keys = set(load_file(saved["one"] / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert json.loads((saved["one"] / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]


@pytest.mark.parametrize("name", ["one", "vec"])
def test_loaded_adapter_runs_its_head_copy_as_peft(name, base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved[name], set_active=True)
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base_state, saved, name), ids), atol=ATOL, rtol=0)
    assert torch.equal(model.classifier.weight, base_state["classifier.weight"])  # the model's own head is kept
    assert set(base_state) <= set(model.state_dict())
    assert ae.api._state(model).adapters[name].config.modules_to_save == ["classifier", "score"]


def test_two_adapters_switch_heads_and_two_active_heads_are_refused(base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    ae.load_adapter(model, saved["two"])
    pm = peft_model(base_state, saved, "one", "two")
    for name in ("one", "two", "one"):
        ae.set_active_adapters(model, name)
        pm.set_adapter(name)
        torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"\['one', 'two'\].*'classifier'"):
        ae.set_active_adapters(model, ["one", "two"])
    with pytest.raises(ValueError, match="Only one adapter"):  # PEFT refuses it too
        pm.base_model.set_adapter(["one", "two"])
    assert ae.api.active_adapters(model) == ("one",)  # the refused call changed nothing
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=0)


def test_disabled_adapters_run_the_original_head(base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"], set_active=True)
    model.disable_adapters()
    assert torch.equal(logits(model, ids), logits(bert(base_state), ids))
    pm = peft_model(base_state, saved, "one")
    with pm.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=0)


def test_mixed_route_runs_each_row_group_through_its_copy_as_peft_adapter_names(base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    ae.load_adapter(model, saved["two"])
    pm = peft_model(base_state, saved, "one", "two")
    with ae.use_adapters(["one", "two", None, "one"]):
        ours = logits(model, ids)
    theirs = logits(pm, ids, adapter_names=["one", "two", "__base__", "one"])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    with (
        ae.use_adapters(["one", ae.Stack("one", "two"), None, "two"]),
        pytest.raises(ValueError, match=r"\['one', 'two'\]"),
    ):
        logits(model, ids)


def test_merge_equals_merge_and_unload_and_saves_a_plain_model_with_the_trained_head(base_state, saved, ids, tmp_path):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"], set_active=True)
    ae.merge_adapter(model, "one")
    assert type(model.classifier) is torch.nn.Linear and not ae.is_patched(model)
    merged = peft_model(base_state, saved, "one").merge_and_unload()
    torch.testing.assert_close(logits(model, ids), logits(merged, ids), atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "plain")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    trained = load_file(saved["one"] / "adapter_model.safetensors")["base_model.model.classifier.weight"]
    assert torch.equal(again.classifier.weight, trained)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_unmerge_restores_the_original_head(base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    ae.load_adapter(model, saved["two"])
    ae.merge_adapter(model, "one")  # b stays: the head is merged into the wrapper's (shared) weights
    merged = peft_model(base_state, saved, "one").merge_and_unload()
    torch.testing.assert_close(logits(model, ids), logits(merged, ids), atol=ATOL, rtol=0)
    ae.unmerge_adapter(model, "one")
    assert torch.equal(model.classifier.weight, base_state["classifier.weight"])
    assert torch.equal(model.classifier.bias, base_state["classifier.bias"])
    torch.testing.assert_close(logits(model, ids), logits(bert(base_state), ids), atol=ATOL, rtol=0)


def test_merges_that_cannot_take_a_head_change_nothing(base_state, saved):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    ae.load_adapter(model, saved["two"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['one', 'two'\].*'classifier'"):
        ae.merge_adapter(model, ["one", "two"])
    with pytest.raises(ValueError, match="weight 1.0"):
        ae.merge_adapter(model, ["one"], weights=[0.5])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_adapter_loads_in_peft_with_the_same_outputs(base_state, saved, ids, tmp_path):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"], set_active=True)
    ae.save_adapter(model, "one", tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(
        load_file(saved["one"] / "adapter_model.safetensors")
    )
    pm = peft.PeftModel.from_pretrained(bert(base_state), tmp_path / "out").eval()
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), atol=ATOL, rtol=0)


def test_fresh_adapter_trains_its_head_copy_and_round_trips_through_peft(base_state, ids, tmp_path):
    model = bert(base_state).requires_grad_(False)  # (a frozen base: the copy trains all the same, as in PEFT)
    cfg = ae.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    ae.add_adapter(model, "t", cfg)
    assert all(p.requires_grad for p in model.classifier.modules_to_save["t"].parameters())
    ae.set_active_adapters(model, "t")
    trainable = ae.train_adapter(model, "t")
    assert {"classifier.modules_to_save.t.weight", "classifier.modules_to_save.t.bias"} <= set(trainable)
    assert "classifier.weight" not in trainable
    model.train()
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    copy = model.classifier.modules_to_save["t"]
    assert copy.weight.grad is not None and copy.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None
    with torch.no_grad():
        copy.weight.add_(torch.randn_like(copy.weight))
    model.eval()
    ae.save_adapter(model, "t", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    pm = peft.PeftModel.from_pretrained(bert(base_state), tmp_path / "t").eval()
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), atol=ATOL, rtol=0)
    assert not torch.equal(logits(model, ids), logits(bert(base_state), ids))


def test_snapshot_and_restore_keep_the_head_copy(base_state, saved, ids):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"], set_active=True)
    expected = logits(model, ids)
    snap = snapshot_adapter(model, "one")
    ae.delete_adapter(model, "one")
    restore_adapter(model, "one", snap)
    ae.set_active_adapters(model, "one")
    assert torch.equal(logits(model, ids), expected)


def test_merge_checkpoint_writes_the_trained_head(base_state, saved, ids, tmp_path):
    bert(base_state).save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", saved["one"], tmp_path / "merged", device="cpu", progress=False)
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    reference = peft_model(base_state, saved, "one").merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_copies_the_config_does_not_name_or_of_another_shape_are_refused(base_state, saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved["one"], bad)
    meta = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(meta | {"modules_to_save": None}))
    with pytest.raises(ValueError, match="classifier.weight"):
        ae.load_adapter(bert(base_state), bad)
    other = BertForSequenceClassification(BertConfig(**{**CFG.to_dict(), "id2label": None, "num_labels": 5})).eval()
    with pytest.raises(ValueError, match=r"copy of 'classifier'.* shape \(3,\) .* is \(5,\)"):
        ae.load_adapter(other, saved["one"])
    assert not any(isinstance(m, ae.api.LoraLinear) and m.lora_A for m in other.modules())  # nothing loaded


def test_static_routes_refuse_rows_naming_a_copy(base_state, saved, ids):
    """A captured graph (GraphedServer's static route) cannot regroup rows: a row naming a copy is refused, now or
    when a later fill names it, instead of replaying the captured grouping."""
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    with ae.use_adapters(StaticRoute(rows=[("one",), (), (), ()], depth=1)), pytest.raises(ValueError, match="static"):
        logits(model, ids)
    route = StaticRoute(rows=[(), (), (), ()], depth=1)
    with ae.use_adapters(route):
        assert torch.equal(logits(model, ids), logits(bert(base_state), ids))
    with pytest.raises(ValueError, match="modules_to_save"):
        route.fill([("one",), (), (), ()])


def test_save_model_and_load_model_keep_the_head_copies(base_state, saved, ids, tmp_path):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"])
    ae.load_adapter(model, saved["vec"], set_active=True)
    expected = logits(model, ids)
    ae.save_model(model, tmp_path / "m")
    again = ae.load_model(tmp_path / "m").eval()
    assert torch.equal(logits(again, ids), expected)
    ae.set_active_adapters(again, "one")
    ae.set_active_adapters(model, "one")
    assert torch.equal(logits(again, ids), logits(model, ids))


RCFG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            num_labels=3, max_position_embeddings=40, pad_token_id=1)  # fmt: skip


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(1)
    return RobertaForSequenceClassification(RobertaConfig(**RCFG)).eval()


def test_targets_inside_a_copied_head_are_left_out_as_peft_leaves_them(tmp_path):
    """RoBERTa's head holds Linear layers (dense, out_proj): with target_modules that match them ("dense",
    "all-linear") and modules_to_save=["classifier"], PEFT leaves them out of the LoRA targets (the copy trains
    whole). add_adapter refused the config; it now adapts the same layers as PEFT, whose file it loads."""
    ids = torch.randint(2, 64, (4, 7), generator=torch.Generator().manual_seed(2))
    for targets in (["query", "value", "dense"], "all-linear"):
        pm = peft.get_peft_model(roberta(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=targets))
        peft_layers = {n.split("base_model.model.")[1].rsplit(".lora_A", 1)[0] for n, _ in pm.named_parameters()
                       if ".lora_A." in n}  # fmt: skip
        model = roberta()
        ae.add_adapter(model, "r", ae.LoraConfig(r=4, target_modules=targets, modules_to_save=["classifier"]))
        assert set(ae.api._state(model).adapters["r"].modules) == peft_layers and peft_layers
        assert not any(n.startswith("classifier") for n in peft_layers)
        randomize(pm, "default", 6)
        pm.save_pretrained(tmp_path / str(targets))
        loaded = roberta()
        ae.load_adapter(loaded, tmp_path / str(targets), name="p", set_active=True)
        pm.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_targets_inside_a_copied_block_module_are_left_out_at_load(base_state, ids, tmp_path):
    """modules_to_save=["intermediate"] with target_modules matching its dense layer: PEFT copies each layer's
    intermediate block whole and adapts the other dense layers. The engine's load wanted LoRA weights for the
    layers inside the copies and refused the file ("missing adapter weights"); it now loads it with PEFT's outputs."""
    cfg = peft.LoraConfig(r=4, target_modules=["query", "value", "dense"], modules_to_save=["intermediate"])
    pm = peft.get_peft_model(bert(base_state), cfg)
    randomize(pm, "default", 7)
    pm.save_pretrained(tmp_path / "p")
    model = bert(base_state)
    ae.load_adapter(model, tmp_path / "p", name="p", set_active=True)
    assert ae.api._state(model).adapters["p"].saved == [f"bert.encoder.layer.{i}.intermediate" for i in (0, 1)]
    torch.testing.assert_close(logits(model, ids), logits(pm.eval(), ids), atol=ATOL, rtol=0)


def test_a_layer_norm_inside_a_bottleneck_layer_takes_no_copies(base_state):
    """A bottleneck layer's fused stack reads its LayerNorm's weights directly: a copy of that LayerNorm would have
    been ignored by the fused path (and used by the eager one). It is refused, naming the layer."""
    model = bert(base_state)
    ae.add_adapter(model, "bn", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    with pytest.raises(ValueError, match=r"cannot keep trained copies of .*output.LayerNorm.*inside .*layer.0.output"):
        ae.add_adapter(
            model, "ln", ae.LoraConfig(r=4, target_modules=["query"], modules_to_save=["0.output.LayerNorm"])
        )
    assert "ln" not in ae.api._state(model).adapters


def test_a_memory_manager_and_its_store_take_an_adapter_whose_copied_head_has_no_weight(tmp_path):
    """RoBERTa's head has no weight of its own (its children have): the memory manager's dtype check read
    ``module.weight`` of every layer holding an adapter, so AdapterStore.save raised AttributeError once a manager
    watched the model. Saving, dropping and reloading through the store now keeps each head."""
    from adapter_engine.memory import AdapterMemoryManager
    from adapter_engine.store import AdapterStore

    ids = torch.randint(2, 64, (4, 7), generator=torch.Generator().manual_seed(2))
    model, want = roberta(), {}
    for n, seed in (("ra", 1), ("rb", 2)):
        ae.add_adapter(model, n, ae.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ae.api.adapter_parameters(model, n):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            with ae.use_adapters(n):
                want[n] = model(input_ids=ids).logits
    store = AdapterStore(tmp_path / "store", create=True)
    manager = AdapterMemoryManager(model, store, max_active=1, offload="drop")
    for n in ("ra", "rb"):
        store.save(model, n)
    for n in ("ra", "rb", "ra"):
        with manager.use([n]), torch.no_grad(), ae.use_adapters(n):
            torch.testing.assert_close(model(input_ids=ids).logits, want[n], atol=ATOL, rtol=0)


def test_a_merge_does_not_hold_the_deleted_copys_memory(base_state, saved):
    """The merge record keeps the head's original (for unmerge_adapter), not the copy's tensors: the copy is deleted
    with the adapter, and a copied lm_head would otherwise stay in device memory until an unmerge."""
    from adapter_engine.merging import _records

    model = bert(base_state)
    ae.load_adapter(model, saved["one"], name="one")
    copy_storage = {p.untyped_storage().data_ptr() for p in model.classifier.modules_to_save["one"].parameters()}
    ae.merge_adapter(model, "one")
    held = [
        t for r in _records(model) for layer in r.layers for t in (layer.replacement, layer.weight) if t is not None
    ]
    assert held and not copy_storage & {t.untyped_storage().data_ptr() for t in held}


def test_an_adapterhub_save_of_an_adapter_with_copies_is_refused(base_state, saved, tmp_path):
    model = bert(base_state)
    ae.load_adapter(model, saved["one"], name="one")
    with pytest.raises(ValueError, match=r"trained copies of \['classifier'\].*format='peft'"):
        ae.save_adapter(model, "one", tmp_path / "ah", format="adapterhub")
    assert not (tmp_path / "ah").exists()


def test_a_head_loaded_with_assign_is_the_one_new_copies_start_from_and_unpatch_returns(base_state):
    """``load_state_dict(..., assign=True)`` puts new tensors in the wrapper: a later adapter's copy started from the
    wrapped module's old tensors, and ``unpatch`` handed the old ones back."""
    model = bert(base_state)
    ae.add_adapter(model, "a", ae.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    ae.add_adapter(model, "b", ae.LoraConfig(r=4, target_modules=["value"], modules_to_save=["classifier"]))
    assert torch.equal(model.classifier.modules_to_save["b"].weight, new["classifier.weight"])
    ae.unpatch(model)
    assert torch.equal(model.classifier.weight, new["classifier.weight"])
    assert torch.equal(model.classifier.bias, new["classifier.bias"])


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (
            dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
            r"\['embed_tokens', 'model.embed_tokens'\]",
        ),
        (dict(target_modules=["q_proj", "lm_head"]), r"\['model.embed_tokens'\]"),  # (PEFT adds the embeddings)
    ],
)
def test_peft_ensure_weight_tying_on_tied_embeddings_is_refused_naming_the_field(kwargs, named, tmp_path):
    """PEFT's ensure_weight_tying ties the lm_head's copy (or LoRA) to the input embedding's on a tied model. Loading
    such an adapter failed with 'unexpected weights ... lm_head.weight ... modules_to_save does not name' (a module the
    user never named) or with an embedding-LoRA refusal when only lm_head was targeted; add_adapter silently left
    the output embeddings untied from the trained copy. Both now name ensure_weight_tying; without it they load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    base = LlamaForCausalLM(LlamaConfig(**sizes, intermediate_size=24, tie_word_embeddings=True)).eval()
    config = peft.LoraConfig(r=2, ensure_weight_tying=True, **kwargs)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    for call in (lambda m: ae.load_adapter(m, tmp_path, name="tying"), lambda m: ae.add_adapter(m, "tying", config)):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=rf"'ensure_weight_tying'=True with the embedding layers {named}"):
            call(model)
        assert not ae.is_patched(model) or ae.list_adapters(model) == []
    plain = peft.LoraConfig(r=2, target_modules=["q_proj"], ensure_weight_tying=True)  # ties nothing: accepted
    ae.add_adapter(copy.deepcopy(base), "tying_none", plain)
