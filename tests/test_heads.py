"""AdapterHub prediction heads saved beside an adapter (adapter_engine.heads): a head that maps exactly onto the
transformers model's own head loads there, as the adapter's trained copy, with AdapterHub's logits; any other head is
left out with a warning naming the file, its type and the reason (never silently); a loaded head is saved again.

Fixtures: tests/fixtures/adapterhub/heads/, made by adapters 1.3.0 (``make_adapterhub_fixtures.py make-heads``).
Tolerance 1e-5 absolute on logits (fp32, tiny models: values O(1); AdapterHub's eager modules and the engine's fused
ops sum in another order, a few ulp per op).
"""

import json
import logging
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    XLMRobertaForSequenceClassification,
)

import adapter_engine as ae
from adapter_engine.checkpoint import merge_checkpoint
from adapter_engine.residency import restore_adapter, snapshot_adapter
from adapter_engine.saved_modules import ModulesToSaveLayer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub")
HEADS = os.path.join(FIX, "heads")
BASES = {"bert": os.path.join(FIX, "tiny_bert"), "xlmr": os.path.join(FIX, "bert_layout", "xlm-roberta")}
ATOL = 1e-5
# case: (task model class, base, labels)
MAPPED = {
    "bert_cls": (BertForSequenceClassification, "bert", 3),  # flex head: pooler.dense + classifier
    "bert_static": (BertForSequenceClassification, "bert", 3),  # static head: the model's own classifier
    "xlmr_cls": (XLMRobertaForSequenceClassification, "xlmr", 4),  # flex head: classifier.dense / out_proj (LoRA)
}


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(HEADS, "expected.safetensors"))


def build(case: str):
    cls, base, labels = MAPPED[case]
    return cls.from_pretrained(BASES[base], num_labels=labels).eval()


def logits(model, expected, base: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=expected[f"{base}_input_ids"], attention_mask=expected[f"{base}_attention_mask"]).logits


@pytest.mark.parametrize("case", sorted(MAPPED))
def test_a_head_that_maps_onto_the_models_head_loads_there_with_adapterhubs_logits(case, expected):
    """The symptom: the head files were ignored without a word, so the model ran its untrained classifier."""
    model = build(case)
    base = MAPPED[case][1]
    before = logits(model, expected, base)
    name = ae.load_adapter(model, os.path.join(HEADS, case), name=f"{case}_h")
    assert torch.equal(logits(model, expected, base), before)  # inactive: the model's own head (and no adapter)
    with ae.use_adapters([name, None]):  # a per-row route: the head copy for the first row only
        routed = logits(model, expected, base)
    torch.testing.assert_close(routed[0], expected[case][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[1], before[1], atol=ATOL, rtol=0)
    ae.set_active_adapters(model, name)
    torch.testing.assert_close(logits(model, expected, base), expected[case], atol=ATOL, rtol=0)
    assert any(isinstance(m, ModulesToSaveLayer) for m in model.modules())
    if case == "bert_cls":  # the head's label names reach the config
        assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ae.delete_adapter(model, name)
    assert torch.equal(logits(model, expected, base), before)


def test_a_stack_of_adapters_with_adapterhub_heads_is_refused_with_the_way_to_stack_them(expected):
    """AdapterHub runs a ``Stack`` of adapters that were each saved with a head through one head; the engine keeps each
    head as its adapter's trained copy, and only one copy can run. The refusal said only "PEFT refuses this too"
    (found by stacking AdapterHub adapters saved from a task model); it now names the heads and ``head=False``, which
    stacks them. The refused call changes nothing."""
    model = build("bert_static")
    lower = ae.load_adapter(model, os.path.join(HEADS, "bert_static"), name="stk_heads_lower")
    upper = ae.load_adapter(model, os.path.join(HEADS, "bert_static"), name="stk_heads_upper")
    with pytest.raises(ValueError, match=r"hold AdapterHub prediction heads: .*head=False"):
        ae.set_active_adapters(model, ae.Stack(lower, upper))
    assert ae.api.active_adapters(model) == ()
    bare = ae.load_adapter(model, os.path.join(HEADS, "bert_static"), name="stk_heads_bare", head=False)
    ae.set_active_adapters(model, ae.Stack(bare, upper))  # one head: the upper level's
    assert ae.api.active_adapters(model) == (bare, upper)
    assert logits(model, expected, "bert").shape == expected["bert_static"].shape


@pytest.mark.parametrize(
    "case, model_of, reason",
    [
        ("bert_tag", lambda: BertForTokenClassification.from_pretrained(BASES["bert"], num_labels=3), "'tagging'"),
        ("bert_cls", lambda: BertForSequenceClassification.from_pretrained(BASES["bert"]), "3 labels"),
        ("bert_cls", lambda: BertModel.from_pretrained(BASES["bert"]), "no head of that structure"),
        ("bert_static", lambda: BertModel.from_pretrained(BASES["bert"]), "loads into that class only"),
    ],
)
def test_a_head_that_does_not_map_is_left_out_with_a_warning_naming_it(case, model_of, reason, caplog, expected):
    folder = os.path.join(HEADS, case)
    model = model_of().eval()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapter_engine"):
        name = ae.load_adapter(model, folder, name=f"{case}_left")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("adapter_")]
    assert len(warned) == 1 and "pytorch_model_head.bin" in warned[0] and reason in warned[0], warned
    assert not any(isinstance(m, ModulesToSaveLayer) for m in model.modules())
    ae.delete_adapter(model, name)
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())  # nothing else changed
    with pytest.raises(ValueError, match=f"head=True: .*{reason}"):
        ae.load_adapter(model, folder, name=f"{case}_strict", head=True)
    assert not hasattr(model, "_adapter_engine") or ae.list_adapters(model) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapter_engine"):
        ae.load_adapter(model, folder, name=f"{case}_skip", head=False)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("adapter_")]


def test_a_loaded_head_is_saved_again_and_loads_back(tmp_path, expected):
    model = build("bert_cls")
    name = ae.load_adapter(model, os.path.join(HEADS, "bert_cls"), name="renamed_cls", set_active=True)
    want = logits(model, expected, "bert")
    ae.save_adapter(model, name, tmp_path / "ah", format="adapterhub")
    meta = json.loads((tmp_path / "ah" / "head_config.json").read_text())
    original = json.loads(open(os.path.join(HEADS, "bert_cls", "head_config.json")).read())
    assert meta == {**original, "name": name}
    saved = torch.load(tmp_path / "ah" / "pytorch_model_head.bin", weights_only=True)
    first = torch.load(os.path.join(HEADS, "bert_cls", "pytorch_model_head.bin"), weights_only=True)
    assert {k.replace("renamed_cls", "bert_cls"): v for k, v in saved.items()}.keys() == first.keys()
    assert all(torch.equal(saved[k.replace("bert_cls", "renamed_cls")], v) for k, v in first.items())
    ae.save_adapter(model, name, tmp_path / "ah_safe", format="adapterhub", safe_serialization=True)
    assert (tmp_path / "ah_safe" / "model_head.safetensors").exists()  # (AdapterHub's name for it)
    for folder in ("ah", "ah_safe"):
        fresh = build("bert_cls")
        ae.load_adapter(fresh, tmp_path / folder, name="back", set_active=True, head=True)
        torch.testing.assert_close(logits(fresh, expected, "bert"), want, atol=ATOL, rtol=0)
    lora = build("xlmr_cls")  # a LoRA with a head saved as PEFT's: the head as modules_to_save copies
    ae.load_adapter(lora, os.path.join(HEADS, "xlmr_cls"), name="lora_cls", set_active=True)
    ae.save_adapter(lora, "lora_cls", tmp_path / "peft", format="peft")
    fresh = build("xlmr_cls")
    with pytest.raises(ValueError, match="head=True, but .* holds no AdapterHub prediction head"):
        ae.load_adapter(fresh, tmp_path / "peft", name="back", head=True)
    ae.load_adapter(fresh, tmp_path / "peft", name="back", set_active=True)
    torch.testing.assert_close(logits(fresh, expected, "xlmr"), expected["xlmr_cls"], atol=ATOL, rtol=0)
    peft_model = PeftModel.from_pretrained(build("xlmr_cls"), tmp_path / "peft").eval()  # PEFT loads it too
    torch.testing.assert_close(logits(peft_model, expected, "xlmr"), expected["xlmr_cls"], atol=ATOL, rtol=0)
    ae.add_adapter(model, "plain", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.save_adapter(model, "plain", tmp_path / "ah", format="adapterhub")  # no head: the old head files go
    assert not (tmp_path / "ah" / "head_config.json").exists()
    assert not (tmp_path / "ah" / "pytorch_model_head.bin").exists()


def test_an_offloaded_or_saved_model_keeps_the_head(tmp_path, expected):
    model = build("bert_cls")
    name = ae.load_adapter(model, os.path.join(HEADS, "bert_cls"), name="kept_cls", set_active=True)
    want = logits(model, expected, "bert")
    snapshot = snapshot_adapter(model, name)
    ae.delete_adapter(model, name)
    restore_adapter(model, name, snapshot)
    ae.set_active_adapters(model, name)
    torch.testing.assert_close(logits(model, expected, "bert"), want, atol=ATOL, rtol=0)
    ae.save_model(model, tmp_path / "model")
    back = ae.load_model(tmp_path / "model").eval()
    torch.testing.assert_close(logits(back, expected, "bert"), want, atol=ATOL, rtol=0)
    ae.save_adapter(back, name, tmp_path / "ah", format="adapterhub")
    assert (tmp_path / "ah" / "head_config.json").exists()


def test_merge_checkpoint_says_it_does_not_merge_the_head(tmp_path, caplog):
    """The streamed merge has no model to map a head onto: it names the head it leaves out."""
    with caplog.at_level(logging.WARNING, logger="adapter_engine"):
        merge_checkpoint(BASES["xlmr"], os.path.join(HEADS, "xlmr_cls"), tmp_path / "merged")
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("adapter_engine")]
    assert any("head" in m and "is not merged" in m and "xlmr_cls" in m for m in warned), warned


@pytest.mark.parametrize("case", sorted(MAPPED))
def test_a_trained_head_is_saved_with_its_new_values(case, expected, tmp_path):
    """The copy's trained values, not the loaded ones, are saved (and load back). With ADAPTER_ENGINE_EXPORT_DIR set
    the folders go there for ``make_adapterhub_fixtures.py check-heads`` (AdapterHub loads them: README there)."""
    base = MAPPED[case][1]
    model = build(case)
    name = ae.load_adapter(model, os.path.join(HEADS, case), name=f"{case}_trained", set_active=True)
    with torch.no_grad():  # (a training step's stand-in)
        for module in model.modules():
            if isinstance(module, ModulesToSaveLayer):
                for p in module.modules_to_save[name].parameters():
                    p.add_(0.1)
    out = logits(model, expected, base)
    assert (out - expected[case]).abs().max() > 1e-2
    ae.save_adapter(model, name, tmp_path / case, format="adapterhub")
    fresh = build(case)
    ae.load_adapter(fresh, tmp_path / case, set_active=True, head=True)
    torch.testing.assert_close(logits(fresh, expected, base), out, atol=ATOL, rtol=0)
    export = os.environ.get("ADAPTER_ENGINE_EXPORT_DIR")
    if export:
        shutil.copytree(tmp_path / case, os.path.join(export, "heads", case), dirs_exist_ok=True)
        save_file({"logits": out}, os.path.join(export, "heads", case, "engine_logits.safetensors"))


def test_a_merged_adapter_leaves_its_head_in_a_plain_checkpoint(expected, tmp_path):
    """Merge and FFT: the LoRA and its head merge into the model, which plain transformers loads with AdapterHub's
    logits."""
    model = build("xlmr_cls")
    ae.merge_adapter(model, ae.load_adapter(model, os.path.join(HEADS, "xlmr_cls")))
    model.save_pretrained(tmp_path)
    plain = XLMRobertaForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, expected, "xlmr"), expected["xlmr_cls"], atol=ATOL, rtol=0)
