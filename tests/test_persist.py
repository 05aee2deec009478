"""Whole-model save/load with adapters (absorbed bottlenecks), written atomically."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

import adapter_engine as ae
from adapter_engine.persist import load_model, save_model

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99)
BATCH = {"input_ids": torch.tensor([[2, 41, 7, 88, 13]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_absorbed_bottleneck_is_saved_with_the_model_and_reloaded(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval()
    ae.add_adapter(model, "domain", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "lora", ae.LoraConfig(r=2, lora_alpha=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_up" in name or "lora_B" in name:
                p.normal_(0, 0.3)
    ae.set_active_adapters(model, ["lora", "domain"])
    ae.merge_adapter(model, "lora")  # LoRA folds into the weights
    ae.merge_adapter(model, "domain", absorb=True)  # the bottleneck stays, as part of the model
    with torch.no_grad():
        expected = model(**BATCH).logits
    save_model(model, tmp_path / "ckpt")
    plain = BertForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()  # plain HF: adapter keys ignored
    with torch.no_grad():
        assert not torch.allclose(plain(**BATCH).logits, expected)
    loaded = load_model(tmp_path / "ckpt").eval()
    assert ae.list_adapters(loaded) == ["domain"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, expected, rtol=0, atol=1e-6)


def _classifier_with_bottleneck(config, seed: int):
    """A tiny BERT classifier with bottleneck adapter "b" of ``config``, random weights, active."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval()
    ae.add_adapter(model, "b", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.b." in name:
                p.normal_(0, 0.3)
    ae.set_active_adapters(model, "b")
    return model


@pytest.mark.parametrize(
    "config",
    [ae.BottleneckConfig.seq_bn(bottleneck_size=8), ae.BottleneckConfig.seq_bn(reduction_factor=4, ln_before=True)],
    ids=["bottleneck_size", "ln_before"],
)
def test_bottleneck_widths_and_layer_norms_round_trip(tmp_path, config):
    """An explicit ``bottleneck_size`` (not an AdapterHub field, which the manifest's config dict dropped: the reload
    built width 32 // 16 = 2 and failed) and an adapter LayerNorm before the down projection (registered twice, as
    AdapterHub's module does: safetensors refused the shared tensors) save and reload with the same outputs."""
    model = _classifier_with_bottleneck(config, seed=0)
    with torch.no_grad():
        expected = model(**BATCH).logits
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, expected, rtol=0, atol=1e-6)


def test_an_ia3_adapter_on_other_layers_than_its_config_selects_reloads_where_it_was(tmp_path):
    """An IA3 adapter loaded with ``config=`` (no targets: the file names the layers) sits on the file's layers, not
    on the config's default targets. ``load_model`` rebuilt it from the config alone, on the default layers, and
    failed ("lacks adapter weights"); it now rebuilds it on the saved layers, feed-forward ones included."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    made = ae.IA3Config(target_modules=["value", "output.dense"], feedforward_modules=["output.dense"])
    ae.add_adapter(model, "i", made)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    ae.save_adapter(model, "i", tmp_path / "ia3")  # PEFT format
    fresh = BertModel(BertConfig(**TINY)).eval()
    fresh.load_state_dict(ae.unpatch(model).state_dict())
    ae.load_adapter(
        fresh, tmp_path / "ia3", "i", config=ae.IA3Config(feedforward_modules=["output.dense"]), set_active=True
    )
    with torch.no_grad():
        expected = fresh(**BATCH).last_hidden_state
    save_model(fresh, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert ae.patching.get_state(loaded).adapters["i"].modules == ae.patching.get_state(fresh).adapters["i"].modules
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).last_hidden_state, expected, rtol=0, atol=1e-6)


def test_load_model_of_a_plain_checkpoint_and_missing_folder(tmp_path):
    model = BertModel(BertConfig(**TINY))
    save_model(model, tmp_path / "plain")
    assert type(load_model(tmp_path / "plain")) is BertModel
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_save_model_of_a_peft_model_is_refused_and_writes_nothing(tmp_path):
    """``save_model`` of a PeftModel wrote what PEFT's ``save_pretrained`` writes, its adapters alone, with an empty
    manifest beside them, and returned as if it had saved the model (``load_model`` then failed: no config.json)."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(BertModel(BertConfig(**TINY)), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match=r"a PeftModel's save_pretrained writes its adapters alone: save model.merge"):
        save_model(pm, tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())
    save_model(pm.merge_and_unload(), tmp_path / "ckpt")
    assert type(load_model(tmp_path / "ckpt")) is BertModel


def test_load_model_of_an_adapter_folder_names_it_as_one(tmp_path):
    """An adapter folder given to ``load_model`` failed inside transformers: "Unrecognized model ... Should have a
    `model_type` key in its config.json", a file the folder does not have."""
    model = BertModel(BertConfig(**TINY))
    ae.add_adapter(model, "lm_lora", ae.LoraConfig(r=2))
    for fmt in ("peft", "adapterhub"):
        folder = ae.save_adapter(model, "lm_lora", tmp_path / fmt, format=fmt)
        with pytest.raises(ValueError, match=r"is an adapter folder .*: load it into its base model with load_adapter"):
            load_model(folder)


_KILL = textwrap.dedent(
    """
    import sys, time
    import torch
    from transformers import BertConfig, BertModel
    from adapter_engine import persist
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                 vocab_size=99))
    real = model.save_pretrained
    def slow(folder, **kw):
        real(folder, **kw)
        print("WRITTEN", flush=True)
        time.sleep(60)
    model.save_pretrained = slow
    persist.save_model(model, sys.argv[1])
    """
)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_model(BertModel(BertConfig(**TINY)), target)
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL, str(target)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="0"))  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = BertModel(BertConfig(**TINY))

    def broken(folder, **kw):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="injected"):
        save_model(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_with_a_layer_norm_saved_once_loads_strictly(tmp_path):
    """An adapter LayerNorm before the down projection is registered under two names and saved under one
    (``save_pretrained`` of a patched model, as ``transformers.Trainer`` writes its checkpoints): a strict
    ``load_state_dict`` of the file used to fail on the other name, and the non-strict one (Trainer's resume and
    best-model loads) reported the adapter's LayerNorm missing, though the shared tensor was loaded."""
    from safetensors.torch import load_file

    config = ae.BottleneckConfig.seq_bn(reduction_factor=4, ln_before=True)

    def model(seed: int):
        return _classifier_with_bottleneck(config, seed)

    saved = model(0)
    saved.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any(".adapters.b.adapter_down.0." in k for k in tensors)  # (saved once, under its first name)
    fresh = model(1)
    fresh.load_state_dict(tensors)  # strict
    with torch.no_grad():
        torch.testing.assert_close(fresh(**BATCH).logits, saved(**BATCH).logits, rtol=0, atol=0)
    assert model(2).load_state_dict(tensors, strict=False).missing_keys == []
    renamed = {k.replace("adapter_norm_before.", "adapter_down.0."): v for k, v in tensors.items()}  # the other name
    other = model(3)
    other.load_state_dict(renamed)
    with torch.no_grad():
        torch.testing.assert_close(other(**BATCH).logits, saved(**BATCH).logits, rtol=0, atol=0)


def test_a_loaded_adapter_whose_config_names_a_data_driven_init_reloads_with_the_model(tmp_path):
    """load_model re-adds each adapter before loading its weights: an adapter whose saved PEFT config names an init
    add_adapter refuses ('eva', 'mica') comes back, config as saved."""
    model = BertModel(BertConfig(**TINY)).eval()
    ae.add_adapter(model, "eva_made", ae.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    ae.patching.get_state(model).adapters["eva_made"].config.init_lora_weights = "eva"  # (as a PEFT file's)
    ae.set_active_adapters(model, "eva_made")
    with torch.no_grad():
        want = model(**BATCH).last_hidden_state
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert ae.patching.get_state(back).adapters["eva_made"].config.init_lora_weights == "eva"
    with torch.no_grad():
        torch.testing.assert_close(back(**BATCH).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_save_pretrained_of_a_patched_model_reloads_its_adapters_with_load_model(tmp_path):
    """``model.save_pretrained`` of a patched model (and so every ``transformers.Trainer`` checkpoint) writes the
    adapters' weights beside the base's; it now writes their manifest too, so that ``load_model`` rebuilds them. It
    used to write no manifest, and ``load_model`` of the folder silently gave the base model without its adapters."""
    model = _classifier_with_bottleneck(ae.BottleneckConfig.seq_bn(reduction_factor=4), seed=0)
    ae.add_adapter(model, "persist_sp_lora", ae.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    ae.set_active_adapters(model, ["persist_sp_lora", "b"])
    with torch.no_grad():
        expected = model(**BATCH).logits
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert ae.list_adapters(loaded) == ["b", "persist_sp_lora"]
    assert loaded.active_adapters() == ["persist_sp_lora", "b"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, expected, rtol=0, atol=1e-6)
    merged = ae.patch(BertModel(BertConfig(**TINY)))  # patched, no adapter: a plain checkpoint, as before
    merged.save_pretrained(tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == ["config.json", "model.safetensors"]


def test_a_vit_saved_under_transformers_older_key_names_reloads_its_adapters(tmp_path):
    """transformers 5 saves a ViT under its checkpoints' older names (``vit.encoder.layer.0.attention.attention.query``
    for the module ``vit.layers.0.attention.q_proj``), the adapter keys beside them too. ``load_model`` reads them
    through the renamings ``from_pretrained`` applied; it looked for the module names and failed with "lacks adapter
    weights" on every ViT saved with adapters."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, num_labels=3)  # fmt: skip
    model = ViTForImageClassification(cfg).eval()
    lora = ae.LoraConfig(r=2, target_modules=["q_proj", "fc2"], init_lora_weights=False, modules_to_save=["classifier"])
    ae.add_adapter(model, "persist_vit_lora", lora)
    ae.add_adapter(model, "persist_vit_bn", "seq_bn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_up" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    ae.set_active_adapters(model, ["persist_vit_lora", "persist_vit_bn"])
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    save_model(model, tmp_path / "vit")
    loaded = load_model(tmp_path / "vit").eval()
    assert ae.list_adapters(loaded) == ["persist_vit_lora", "persist_vit_bn"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, rtol=0, atol=1e-6)


def test_trainer_resumes_a_patched_vit_and_restores_its_best_checkpoint(tmp_path):
    """transformers 5 saves a ViT under older key names, and ``Trainer`` loads a checkpoint (to resume, or the best
    one at the end) with a plain ``model.load_state_dict(strict=False)``: a patched ViT restored none of its adapters,
    so a resumed run went on from fresh ones (its losses and weights differed from the uninterrupted run's from the
    first resumed step), and ``load_best_model_at_end`` kept the last weights. A patched model's ``load_state_dict``
    now reads a key under the name ``from_pretrained`` gives it: the resumed run ends with the uninterrupted run's
    losses and weights bit for bit, and the model ends with the best checkpoint's weights."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    def build():
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, num_labels=3, hidden_dropout_prob=0.1)  # fmt: skip
        model = ViTForImageClassification(cfg)
        lora = ae.LoraConfig(r=2, target_modules=["q_proj", "fc2"], modules_to_save=["classifier"])
        ae.add_adapter(model, "persist_trn_vit_lora", lora)
        ae.add_adapter(model, "persist_trn_vit_bn", "seq_bn")
        ae.set_active_adapters(model, ["persist_trn_vit_lora", "persist_trn_vit_bn"])
        ae.train_adapter(model, "persist_trn_vit_lora")
        return model

    gen = torch.Generator().manual_seed(2)
    data = [{"pixel_values": torch.randn(3, 8, 8, generator=gen), "labels": i % 3} for i in range(8)]

    def args(output_dir=str(tmp_path), **kw):
        return TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
            use_cpu=True, logging_steps=1, disable_tqdm=True, seed=7, data_seed=7, dataloader_num_workers=0, **kw,
        )  # fmt: skip

    # (a constant metric: the first checkpoint stays the best one)
    model = build()
    run = Trainer(model=model, args=args(save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                                         metric_for_best_model="const"),
                  train_dataset=data, eval_dataset=data[:4], compute_metrics=lambda _: {"const": 0.0})  # fmt: skip
    run.train()
    assert run.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = load_model(tmp_path / "checkpoint-1").state_dict()
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())

    def losses(trainer):
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    whole, resumed = build(), build()
    run = Trainer(model=whole, args=args(output_dir=str(tmp_path / "whole"), save_steps=1), train_dataset=data)
    run.train()
    again = Trainer(
        model=resumed, args=args(output_dir=str(tmp_path / "whole"), save_strategy="no"), train_dataset=data
    )
    again.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-1"))
    assert losses(again) == losses(run) and len(losses(run)) == 2
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_paths_starting_with_a_tilde_are_the_home_folder(tmp_path, monkeypatch):
    """``~/...`` is expanded as a shell does, in every saver and loader: ``save_adapter`` / ``save_model`` /
    ``StackedAdapterModel.save`` / ``AdapterStore(create=True)`` made a folder literally named ``~`` below the working
    directory, and the loaders said the path does not exist."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval()
    ae.add_adapter(model, "tl_lora", ae.LoraConfig(r=2, init_lora_weights=False))
    ae.set_active_adapters(model, "tl_lora")
    with torch.no_grad():
        expected = model(**BATCH).logits
    ae.save_adapter(model, "tl_lora", "~/adapters/tl_lora")
    save_model(model, "~/ckpt")
    assert ae.load_adapter(BertForSequenceClassification(model.config), "~/adapters/tl_lora") == "tl_lora"
    with torch.no_grad():
        torch.testing.assert_close(load_model("~/ckpt").eval()(**BATCH).logits, expected, rtol=0, atol=1e-6)
    assert ae.AdapterStore("~/adapters").names() == ["tl_lora"]
    ae.AdapterStore("~/store", create=True)
    sam = ae.StackedAdapterModel(BertForSequenceClassification(model.config), store="~/adapters")
    sam.add_adapter("tl_bn", "seq_bn")
    sam.save("~/stack")
    ae.StackedAdapterModel.load("~/stack", BertForSequenceClassification(model.config))
    BertForSequenceClassification(model.config).save_pretrained(home / "base")
    from adapter_engine.checkpoint import merge_checkpoint
    from adapter_engine.planner import load_config

    assert merge_checkpoint("~/base", "~/adapters/tl_lora", "~/merged")["merged"] > 0
    assert load_config("~/merged").hidden_size == TINY["hidden_size"]
    assert sorted(p.name for p in home.iterdir()) == ["adapters", "base", "ckpt", "merged", "stack", "store"]
    assert not any(cwd.iterdir())
