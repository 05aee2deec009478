"""Strategy 1, Merge and FFT (adapter_engine.merging): merge, weighted and TIES/DARE merges, unmerge, exact
restore, atomic failure, and the real all-MiniLM-L6-v2 chain (PEFT LoRA -> merge -> plain checkpoint -> FFT)."""

import pytest
import torch
from transformers import BertConfig, BertModel

import adapter_engine as ae
from adapter_engine.merging import merged_adapters

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99)


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


def with_loras(n=2, r=4):
    model = tiny_bert()
    for i in range(n):
        ae.add_adapter(model, f"l{i}", ae.LoraConfig(r=r, lora_alpha=2 * r))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def lora_terms(model, names):
    """{weight name: [(A, B, scaling)]} read from the patched modules before a merge."""
    terms = {}
    for path, module in model.named_modules():
        if isinstance(module, ae.lora.LoraLinear):
            terms[f"{path}.weight"] = [
                (module.lora_A[n].weight.detach().clone(), module.lora_B[n].weight.detach().clone(), module.scaling[n])
                for n in names
                if n in module.lora_A
            ]
    return terms


BATCH = {"input_ids": torch.tensor([[2, 41, 7, 88, 13]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def hidden(model):
    with torch.no_grad():
        return model(**BATCH).last_hidden_state


def test_weighted_merge_of_two_adapters_in_one_pass():
    model = with_loras()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    terms = lora_terms(model, ["l0", "l1"])
    ae.merge_adapter(model, ["l0", "l1"], weights=[0.5, 2.0])
    assert not ae.is_patched(model) and merged_adapters(model) == ["l0", "l1"]
    state = model.state_dict()
    assert set(state) == set(before)  # a plain model: no adapter keys left
    for key, pairs in terms.items():
        expected = before[key].double()
        for (a, b, s), w in zip(pairs, [0.5, 2.0]):
            expected += w * s * (b.double() @ a.double())
        torch.testing.assert_close(state[key].double(), expected, rtol=0, atol=1e-6)


def test_merged_outputs_equal_the_active_adapters_and_unmerge_restores():
    model = with_loras()
    ae.set_active_adapters(model, ["l0", "l1"])
    adapted = hidden(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    ae.merge_adapter(model)  # default: the active adapters
    torch.testing.assert_close(hidden(model), adapted, rtol=0, atol=1e-5)
    ae.unmerge_adapter(model, "l1")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=1e-6)  # one rounding each way
    with pytest.raises(ValueError, match="no merged adapter"):
        ae.unmerge_adapter(model)


def test_exact_merge_restores_bit_for_bit_and_in_order():
    model = with_loras(3)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    plain = tiny_bert()
    with pytest.raises(ValueError, match="no merged adapter"):
        ae.unmerge_adapter(plain)
    assert vars(plain).keys() == vars(tiny_bert()).keys()  # a refused unmerge leaves nothing on the model
    ae.set_active_adapters(model, ["l0", "l1", "l2"])
    adapted = hidden(model)
    ae.merge_adapter(model, "l0", exact=True)
    ae.merge_adapter(model, ["l1", "l2"], exact=True)
    torch.testing.assert_close(hidden(model), adapted, rtol=0, atol=2e-5)  # (the merges wrote: a no-op restores too)
    with pytest.raises(ValueError, match="unmerge .* first"):
        ae.unmerge_adapter(model, "l0")
    ae.unmerge_adapter(model, "l2")
    ae.unmerge_adapter(model, "l0")
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert vars(model).keys() == vars(tiny_bert()).keys()  # every merge undone: no merge records left behind


def test_unmerge_by_name_undoes_the_latest_merge_of_that_name():
    """An adapter name merged, then reused for a new adapter merged too: ``unmerge_adapter(model, name)`` picked the
    oldest merge of the name and, both being bit-exact, refused ('unmerge ['again'] first'), naming the very adapter
    asked for. It now undoes the latest, and a second call the earlier one: every weight bit for bit."""
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in (1, 2):
        ae.add_adapter(model, "again", ae.LoraConfig(r=4, lora_alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        previous = model.get_parameter("encoder.layer.0.attention.self.query.weight").clone()
        ae.merge_adapter(model, "again", exact=True)
        assert not torch.equal(model.get_parameter("encoder.layer.0.attention.self.query.weight"), previous)
    assert merged_adapters(model) == ["again", "again"]
    ae.unmerge_adapter(model, "again")
    ae.unmerge_adapter(model, "again")
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_follow_peft(method):
    from peft.utils import merge_utils

    model = with_loras()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    terms = lora_terms(model, ["l0", "l1"])
    ae.merge_adapter(
        model, ["l0", "l1"], weights=[0.7, 0.3], combination=method, density=0.5 if method == "ties" else 1.0
    )
    for key, pairs in terms.items():
        deltas = [s * (b.float() @ a.float()) for a, b, s in pairs]
        # DARE at density 1 keeps everything: it must reduce to PEFT's task arithmetic / TIES without trimming.
        reference = {
            "ties": merge_utils.ties,
            "dare_linear": merge_utils.dare_linear,
            "dare_ties": merge_utils.dare_ties,
        }
        expected = reference[method](deltas, torch.tensor([0.7, 0.3]), density=0.5 if method == "ties" else 1.0)
        torch.testing.assert_close(model.state_dict()[key], before[key] + expected, rtol=0, atol=1e-6)
    ae.unmerge_adapter(model)  # TIES / DARE keep the originals: bit-exact
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dare_drops_about_one_minus_density_and_is_seeded():
    a, b = with_loras(), with_loras()
    base = a.encoder.layer[0].attention.self.query.weight.detach().clone()
    ae.merge_adapter(a, ["l0", "l1"], combination="dare_linear", density=0.3, seed=7)
    ae.merge_adapter(b, ["l0", "l1"], combination="dare_linear", density=0.3, seed=7)
    wa, wb = a.encoder.layer[0].attention.self.query.weight, b.encoder.layer[0].attention.self.query.weight
    assert torch.equal(wa, wb)
    other = with_loras()
    ae.merge_adapter(other, ["l0", "l1"], combination="dare_linear", density=0.3, seed=8)
    assert not torch.equal(other.encoder.layer[0].attention.self.query.weight, wa)  # another seed, other drops
    changed = (wa != base).float().mean().item()
    assert 0.35 < changed < 0.65  # ~1 - 0.7^2 of the elements get at least one of the two kept entries
    # each kept entry is rescaled by 1 / density (test_ties_and_dare_follow_peft runs at density 1, where it is 1)
    one = with_loras()
    key = "encoder.layer.0.attention.self.query.weight"
    (lora_a, lora_b, scale), before = lora_terms(one, ["l0"])[key][0], one.state_dict()[key].clone()
    ae.merge_adapter(one, ["l0"], combination="dare_linear", density=0.3, seed=7)
    got, delta = one.state_dict()[key] - before, scale * (lora_b @ lora_a)
    kept = got != 0
    assert 0.2 < kept.float().mean().item() < 0.4
    torch.testing.assert_close(got[kept], delta[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_failed_merge_leaves_every_weight_bit_identical():
    model = with_loras()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # only the last layer's value projection overflows
        model.encoder.layer[1].attention.self.value.lora_B["l1"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        ae.merge_adapter(model, ["l0", "l1"])
    state = model.state_dict()
    for k, v in before.items():
        if "lora_B.l1" not in k:
            assert torch.equal(state[k], v), k
    assert ae.is_patched(model) and set(ae.list_adapters(model)) == {"l0", "l1"}  # nothing dropped either


@pytest.mark.parametrize("case", ["lora_then_ia3", "ia3_bias"])
def test_an_ia3_scale_that_overflows_fails_the_whole_merge(case):
    """fp16: a LoRA term and an IA3 scale on one weight, each finite alone, whose product overflows (the scale must
    be checked after the LoRA term); and an output IA3 that overflows the bias it also scales. Either way: a
    ValueError naming the layer, every weight and bias bit-identical, no adapter dropped (LoRA-only layers too)."""
    model = with_loras(1) if case == "lora_then_ia3" else tiny_bert()
    model.half()
    ae.add_adapter(model, "s", ae.IA3Config(target_modules=["query"], feedforward_modules=[]))
    query = model.encoder.layer[1].attention.self.query
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.fill_(1.0)
        query.ia3_l["s"][0] = 3.0
        if case == "lora_then_ia3":
            query.lora_A["l0"].weight.zero_()
            query.lora_A["l0"].weight[0, 0] = 1.0
            query.lora_B["l0"].weight.zero_()
            query.lora_B["l0"].weight[0, 0] = 30000.0 / query.scaling["l0"]
        else:
            query.bias[0] = 40000.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["l0", "s"] if case == "lora_then_ia3" else ["s"]
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.query.*non-finite"):
        ae.merge_adapter(model, names)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ae.is_patched(model) and set(ae.list_adapters(model)) == {*names}
    assert merged_adapters(model) == []


@pytest.mark.parametrize("act", ["identity", "linear", "none"])  # ("none" was refused as not the identity)
def test_identity_bottleneck_folds_exactly_into_the_projection_before_it(act):
    """Houlsby placement with an identity activation: r = h + s (W_u (W_d h + b_d) + b_u) is linear in h = W x + b,
    so merge_adapter folds it (after a LoRA on the same projection) and the plain model gives the same outputs."""
    model = with_loras(1)
    ae.add_adapter(model, "bn", ae.BottleneckConfig.double_seq_bn(non_linearity=act, reduction_factor=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters.bn" in name:
                p.normal_(0, 0.2)
    plain_keys = {k for k in model.state_dict() if "lora" not in k and "adapters" not in k}
    before = {k: v.clone() for k, v in model.state_dict().items() if k in plain_keys}
    ae.set_active_adapters(model, ["l0", "bn"])
    adapted = hidden(model)
    ae.merge_adapter(model, ["l0", "bn"])
    assert not ae.is_patched(model) and set(model.state_dict()) == plain_keys
    torch.testing.assert_close(hidden(model), adapted, rtol=0, atol=2e-5)
    ae.unmerge_adapter(model)  # folds keep the originals: bit-exact
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "config, reason",
    [
        (ae.BottleneckConfig.seq_bn(), "activation 'relu' is not the identity"),
        (ae.BottleneckConfig.seq_bn(non_linearity="identity"), "LayerNorm sits between"),
        (ae.BottleneckConfig.par_bn(non_linearity="identity"), "parallel"),
    ],
)
def test_bottlenecks_that_do_not_fold_are_refused_with_the_reason(config, reason):
    model = tiny_bert()
    ae.add_adapter(model, "bn", config)
    with pytest.raises(ValueError, match=reason):
        ae.merge_adapter(model, "bn")


def test_bottleneck_adapters_are_refused_with_the_reason_or_absorbed():
    model = tiny_bert()
    ae.add_adapter(model, "bn", "seq_bn")
    with pytest.raises(ValueError, match="not linear in its input.*absorb=True"):
        ae.merge_adapter(model, "bn")
    ae.merge_adapter(model, "bn", absorb=True)
    assert ae.is_patched(model) and ae.list_adapters(model) == ["bn"]  # stays, as part of the model
    assert all(p.requires_grad for n, p in model.named_parameters() if "adapters.bn" in n)


@pytest.mark.parametrize("tied", [True, False])
def test_a_merge_into_tied_embeddings_is_refused_and_changes_nothing(tied):
    """GPT-2's LM head shares its weight with the token embeddings: merging a LoRA on ``lm_head`` also changed the
    embedding lookup, so the merged model's logits were far from the adapted model's (5.5 here), silently. Refused
    now, naming both weights, nothing changed; an untied model merges to the adapted outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config).eval()
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    ae.add_adapter(model, "h", ae.LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
    ae.set_active_adapters(model, "h")
    ids = torch.tensor([[5, 17, 3, 60, 22]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        with pytest.raises(ValueError, match=r"lm_head: its weight is shared by \['transformer.wte.weight', 'lm_head"):
            ae.merge_adapter(model, "h")
        assert ae.list_adapters(model) == ["h"] and ae.merged_adapters(model) == []
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    else:
        ae.merge_adapter(model, "h")
        assert not ae.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


def test_merge_bad_arguments():
    model = with_loras()
    with pytest.raises(ValueError, match="no adapter named"):
        ae.merge_adapter(model, "nope")
    with pytest.raises(ValueError, match="weights has 1 entries for 2 adapters"):
        ae.merge_adapter(model, ["l0", "l1"], weights=[1.0])
    with pytest.raises(ValueError, match="unknown combination"):
        ae.merge_adapter(model, "l0", combination="svd")
    with pytest.raises(ValueError, match="no active LoRA/IA3 adapter"):
        ae.merge_adapter(model)


def test_merge_refuses_an_empty_name_list_and_a_bare_number_as_weights():
    """``names=[]`` merged nothing and said nothing (a caller's empty selection looked like a merge), and
    ``weights=0.5`` failed with "'float' object is not iterable": both are refused by name, the model unchanged; a
    tensor of weights still merges."""
    model = with_loras()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no adapter named to merge .*empty"):
        ae.merge_adapter(model, [])
    with pytest.raises(TypeError, match=r"weights must be a sequence of numbers, one per adapter in \['l0'\]; got 0.5"):
        ae.merge_adapter(model, "l0", 0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert merged_adapters(model) == [] and set(ae.list_adapters(model)) == {"l0", "l1"}
    ae.merge_adapter(model, ["l0", "l1"], torch.tensor([0.5, 2.0]))
    assert merged_adapters(model) == ["l0", "l1"]


def test_merge_refuses_a_repeated_name_before_changing_anything():
    model = with_loras()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapters \['l0'\] appear more than once"):
        ae.merge_adapter(model, ["l0", "l1", "l0"])
    assert ae.list_adapters(model) == ["l0", "l1"] and merged_adapters(model) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_deleting_a_merged_adapter_says_it_is_merged_and_how_to_take_it_out():
    """``delete_adapter``'s docstring promised to unmerge a merged adapter first; it answered "no adapter named 'l0'"
    (a merge drops the adapter). The docstring now says so, and the refusal names the merge and ``unmerge_adapter``;
    so do the other calls that name a merged adapter (merging it again, saving it, activating it)."""
    model = with_loras()
    ae.merge_adapter(model, "l0")
    merged = hidden(model)
    for call in (
        lambda: ae.delete_adapter(model, "l0"),
        lambda: ae.merge_adapter(model, "l0"),
        lambda: ae.save_adapter(model, "l0", "unused"),
        lambda: ae.set_active_adapters(model, ["l1", "l0"]),
    ):
        with pytest.raises(ValueError, match=r"'l0' is merged into the weights: unmerge_adapter\(model, 'l0'\)"):
            call()
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; this model has \['l1'\]$"):
        ae.delete_adapter(model, "nope")
    assert torch.equal(hidden(model), merged) and merged_adapters(model) == ["l0"]
    assert "unmerge_adapter" in ae.delete_adapter.__doc__


def test_unpatch_keeps_the_merged_weights_and_unmerge_still_takes_them_out():
    """``unpatch``'s docstring said it undoes merges; it drops the unmerged adapters and keeps the merged weights (a
    merge that leaves no adapter unpatches the model itself), and ``unmerge_adapter`` still works after it."""
    model = with_loras()
    before = hidden(model)
    ae.merge_adapter(model, "l0")
    merged = hidden(model)
    ae.unpatch(model)
    assert not ae.is_patched(model) and torch.equal(hidden(model), merged) and merged_adapters(model) == ["l0"]
    ae.unmerge_adapter(model, "l0")
    torch.testing.assert_close(hidden(model), before, rtol=0, atol=1e-5)
    assert "merges undone" not in ae.unpatch.__doc__


def test_unmerge_out_of_order_refuses_where_lora_and_ia3_do_not_commute():
    """LoRA then IA3 on the same weight: W1 = (W + d) * l; undoing the LoRA first gives W * l + d (l - 1), neither
    W * l nor W. Refused, naming the later merge; LoRA-after-LoRA (additions commute) stays allowed."""
    model = with_loras(2)
    ae.add_adapter(model, "s", ae.IA3Config(target_modules=["value"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k and "ia3" not in k}
    ae.merge_adapter(model, "l0")
    ae.merge_adapter(model, "l1")
    ae.merge_adapter(model, "s")
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("l0", "l1"):
        with pytest.raises(ValueError, match=r"unmerge \['s'\] first: .*value"):
            ae.unmerge_adapter(model, name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    ae.unmerge_adapter(model, "s")
    ae.unmerge_adapter(model, "l0")  # before l1: LoRA additions commute
    ae.unmerge_adapter(model, "l1")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=1e-5)


def test_an_ia3_scale_that_cannot_be_divided_out_is_unmerged_from_a_kept_copy():
    """fp16: an IA3 scale of 0 (on an output feature: the bias is scaled too) and one of 1e-4 (an fp16 weight of
    0.02 times 1e-4 keeps about two bits). The unmerge divided the scales out: the first gave NaN weight and bias rows
    (0 / 0), the second rows off by up to the weights' size. Such a weight now keeps its original (the others do not):
    the unmerge restores it and its bias bit for bit, the others within one ulp. A later IA3 merge into a kept weight
    must be undone first (restoring the copy would drop its scale)."""
    model = tiny_bert().half()
    ae.add_adapter(model, "zero_or_tiny", ae.IA3Config(target_modules=["query", "key"], feedforward_modules=[]))
    ae.add_adapter(model, "after_tiny", ae.IA3Config(target_modules=["key"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(0.7 + 0.3 * torch.rand_like(p))  # (scaled subnormal weights stay within one ulp)
        model.encoder.layer[0].attention.self.query.ia3_l["zero_or_tiny"][3] = 0.0
        model.encoder.layer[1].attention.self.query.ia3_l["zero_or_tiny"][5] = 1e-4
    base = {k: v.clone() for k, v in model.state_dict().items() if "ia3" not in k}
    ae.merge_adapter(model, "zero_or_tiny")
    record = model._adapter_engine_merges[-1]
    ae.unmerge_adapter(model, "zero_or_tiny")
    for k, v in model.state_dict().items():
        if "ia3" in k:
            continue
        if ".query." in k:
            assert torch.equal(v, base[k]), k
        else:  # divided out: within one ulp
            torch.testing.assert_close(v, base[k], rtol=2**-10, atol=2**-24)
    kept = sorted(layer.path for layer in record.layers if layer.original is not None)
    assert kept == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    model = tiny_bert().half()  # a later merge into a kept weight: undone first
    ae.add_adapter(model, "zero", ae.IA3Config(target_modules=["key"], feedforward_modules=[]))
    ae.add_adapter(model, "later", ae.IA3Config(target_modules=["key"], feedforward_modules=[]))
    with torch.no_grad():
        model.encoder.layer[0].attention.self.key.ia3_l["zero"][0] = 0.0
    ae.merge_adapter(model, "zero")
    ae.merge_adapter(model, "later")
    with pytest.raises(ValueError, match=r"unmerge \['later'\] first"):
        ae.unmerge_adapter(model, "zero")


@pytest.mark.slow
def test_minilm_peft_lora_merge_plain_checkpoint_then_fft_improves_bbc_news(tmp_path):
    """Issue 6's chain on the real model and data: a PEFT LoRA is merged; the checkpoint reloads in plain
    transformers with equal outputs; a short full fine-tune on BBC News improves accuracy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapter_engine.data import EncodedDataset, load_bbc_news
    from adapter_engine.demo import minilm_path
    from adapter_engine.finetune import full_finetune

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    peft_dir = tmp_path / "peft_lora"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(peft_dir)  # a LoRA made and saved by PEFT
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    model.classifier.load_state_dict(base.classifier.state_dict())  # the same (random) task head
    peft_reference = peft_model.merge_and_unload().eval()
    name = ae.load_adapter(model, peft_dir, set_active=True)
    val = load_bbc_news("validation", limit=96)
    val_ds = EncodedDataset(val.texts, val.labels, tokenizer, max_length=64)
    batch = {"input_ids": val_ds.input_ids[:4], "attention_mask": val_ds.attention_mask[:4]}
    ae.merge_adapter(model, name)
    assert not ae.is_patched(model)
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, peft_reference(**batch).logits, rtol=1e-5, atol=1e-5)
        before = plain(**{k: val_ds[:][k] for k in ("input_ids", "attention_mask")}).logits.argmax(-1) == val_ds.labels
    train = load_bbc_news("train", limit=256)
    metrics = full_finetune(
        plain, EncodedDataset(train.texts, train.labels, tokenizer, max_length=64), val_ds,
        args={"output_dir": str(tmp_path / "fft"), "num_train_epochs": 2, "learning_rate": 2e-4},
    )  # fmt: skip
    assert metrics["eval_accuracy"] > before.float().mean().item() + 0.3, metrics


def test_cli_merge_writes_a_plain_checkpoint(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from adapter_engine.cli import main

    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    expected = {}
    for i, targets in enumerate((["query"], ["value", "key"])):
        pm = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"a{i}")
        expected[i] = pm
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a0"), "--adapter",
            str(tmp_path / "a1"), "--weight", "1.0", "--weight", "0.5", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    assert "merged 2 adapter(s)" in capsys.readouterr().out
    merged = BertModel.from_pretrained(tmp_path / "out").eval()
    layer = merged.encoder.layer[0].attention.self
    a0 = expected[0].base_model.model.encoder.layer[0].attention.self.query
    w = a0.base_layer.weight + 2.0 * a0.lora_B["default"].weight @ a0.lora_A["default"].weight
    torch.testing.assert_close(layer.query.weight, w, rtol=0, atol=1e-6)
    a1 = expected[1].base_model.model.encoder.layer[0].attention.self.value
    w = a1.base_layer.weight + 0.5 * 2.0 * a1.lora_B["default"].weight @ a1.lora_A["default"].weight
    torch.testing.assert_close(layer.value.weight, w, rtol=0, atol=1e-6)


def test_cli_merge_refuses_an_existing_out_unless_overwrite(tmp_path, capsys):
    """Like merge-checkpoint: an existing --out (even --model itself) is not overwritten without --overwrite;
    with it, --out is replaced atomically, so merging into the --model folder itself works."""
    from peft import LoraConfig, get_peft_model

    from adapter_engine.cli import main

    tiny_bert().save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    (tmp_path / "base" / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    for out in ("out", "base"):
        args = [
            "merge",
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "a"),
            "--out",
            str(tmp_path / out),
        ]
        with pytest.raises(SystemExit) as exc:  # a usage error: one line, exit code 2
            main(args)
        assert exc.value.code == 2
        assert ("pass --overwrite" if out == "out" else "it is the --model folder") in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before
    assert main(args + ["--overwrite"]) == 0  # --out is --model
    merged = BertModel.from_pretrained(tmp_path / "base").eval()
    assert (tmp_path / "base" / "vocab.txt").read_text() == "[PAD]\n"
    with torch.no_grad():
        torch.testing.assert_close(hidden(merged), pm.eval()(**BATCH).last_hidden_state, rtol=1e-5, atol=1e-5)


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=99, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_a_peft_lora_on_lm_head_merges_as_peft_merges_it(tmp_path, tied):
    """PEFT saves a targeted lm_head's own weight beside its factors (``lm_head.base_layer.weight``); that file
    loaded and merged like any LoRA (it was refused as "unexpected weights"); the saved checkpoint gives PEFT's
    merged logits. Tied to the input embeddings, the merge would change both (PEFT merges and warns), so the merged
    model would not compute the adapted one: refused, naming the tied weights, the model untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    _llama(tied).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.weight" in load_adapter_file(tmp_path / "adapter")
    ids = torch.tensor([[3, 17, 42, 8, 91, 5]])
    with torch.no_grad():
        expected = peft_model.merge_and_unload().eval()(ids).logits
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    name = ae.load_adapter(model, tmp_path / "adapter")
    if tied:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"lm_head.* shared by .*embed_tokens"):
            ae.merge_adapter(model, name)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    ae.merge_adapter(model, name)
    model.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_peft_lm_head_copy_that_differs_from_the_model_or_an_embedding_lora_is_refused(tmp_path):
    """A saved lm_head copy other than the model's (another base, a resized vocabulary), a LoRA of an nn.Embedding
    (lora_embedding_A/B) and PEFT's copies of layers it does not adapt are refused with their reason, the model
    untouched."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    get_peft_model(_llama(False), lora).save_pretrained(tmp_path / "adapter")
    tensors = load_adapter_file(tmp_path / "adapter")
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.01
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    model = _llama(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"own copy of lm_head\.weight .* differs from the model's weight"):
        ae.load_adapter(model, tmp_path / "adapter")
    torch.manual_seed(1)
    embedding = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    get_peft_model(_llama(False), embedding).save_pretrained(tmp_path / "embedding")
    with pytest.raises(ValueError, match=r"embedding layers \['model\.embed_tokens'\].*not supported"):
        ae.load_adapter(model, tmp_path / "embedding")
    torch.manual_seed(1)  # PEFT's copies of layers it does not adapt (saved for a resized vocabulary): named so
    get_peft_model(_llama(False), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "resized", save_embedding_layers=True
    )
    with pytest.raises(ValueError, match=r"embed_tokens\.weight'\]: whole weights of base layers.*resized vocab"):
        ae.load_adapter(model, tmp_path / "resized")
    assert not ae.list_adapters(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def load_adapter_file(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("combination", ["linear", "dare_linear"])
def test_adapters_on_two_layers_sharing_one_weight_are_refused_by_name(combination):
    """Two layers tied to one weight, each with LoRA terms: a merge cannot keep either layer's adapted output. It was
    refused as "weights[0] and weights[1] share memory" (linear) or silently kept one layer's delta (DARE / TIES
    wrote each layer's W + d from the same original); now refused naming both layers, nothing changed."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight

    torch.manual_seed(0)
    model = ae.patch(Tied(), target_modules=["a", "b"])
    for name in ("x", "y"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="a and b share one weight tensor"):
        ae.merge_adapter(model, ["x", "y"], combination=combination, density=1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(ae.list_adapters(model)) == {"x", "y"} and merged_adapters(model) == []


def test_cli_merge_keeps_the_absorbed_adapters_of_a_save_model_checkpoint(tmp_path, capsys):
    """A checkpoint written by save_model with a bottleneck adapter absorbed: ``adapter-engine merge`` loaded it
    with plain from_pretrained, which drops the adapter's weights, and copied its manifest, so load_model of the
    output failed ("lacks adapter weights"). It now loads with load_model and saves the adapter with its manifest:
    the output runs the LoRA merged under the absorbed adapter."""
    from peft import LoraConfig, get_peft_model

    from adapter_engine.cli import main

    model = with_loras(1)  # a LoRA l0 (random B) to absorb beside the bottleneck
    ae.add_adapter(model, "bn", "seq_bn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_up" in name:
                p.normal_(0, 0.2)
    ae.set_active_adapters(model, ["l0", "bn"])
    ae.merge_adapter(model, ["l0", "bn"], absorb=True)
    ae.save_model(model, tmp_path / "absorbed")
    torch.manual_seed(1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False)
    get_peft_model(tiny_bert(), lora).save_pretrained(tmp_path / "lora")
    reference = ae.load_model(tmp_path / "absorbed").eval()
    ae.load_adapter(reference, tmp_path / "lora", name="l")
    ae.set_active_adapters(reference, ["l", "bn"])
    expected = hidden(reference)
    assert main(["merge", "--model", str(tmp_path / "absorbed"), "--adapter", str(tmp_path / "lora"), "--out",
                 str(tmp_path / "out")]) == 0  # fmt: skip
    merged = ae.load_model(tmp_path / "out").eval()
    assert ae.list_adapters(merged) == ["bn"]
    torch.testing.assert_close(hidden(merged), expected, rtol=0, atol=1e-5)


def test_cli_merge_absorbs_a_bottleneck_adapter_when_asked(tmp_path, capsys):
    """``adapter-engine merge`` of a nonlinear bottleneck adapter told the user to 'pass absorb=True', which the
    command had no way to take. ``--absorb`` keeps it, active, beside the merged LoRA: ``load_model`` of the output
    computes the adapted model; without it the refusal names the flag and nothing is written."""
    from peft import LoraConfig, get_peft_model

    from adapter_engine.cli import main

    tiny_bert().save_pretrained(tmp_path / "base")
    model = tiny_bert()
    ae.add_adapter(model, "bn", "seq_bn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_up" in name:
                p.normal_(0, 0.2)
    ae.save_adapter(model, "bn", tmp_path / "bn", format="adapterhub")
    torch.manual_seed(1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False)
    get_peft_model(tiny_bert(), lora).save_pretrained(tmp_path / "lora")
    reference = tiny_bert()
    ae.set_active_adapters(reference, [ae.load_adapter(reference, tmp_path / p) for p in ("lora", "bn")])
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "lora"), "--adapter",
            str(tmp_path / "bn"), "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "adapter-engine merge --absorb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--absorb"]) == 0
    merged = ae.load_model(tmp_path / "out").eval()
    assert ae.list_adapters(merged) == ["bn"]  # (its folder's name)
    torch.testing.assert_close(hidden(merged), hidden(reference), rtol=0, atol=1e-5)


def test_weighted_ia3_merges_multiply_the_vectors_raised_to_their_weights():
    """The documented semantics of ``weights`` for IA3 (not PEFT's ``add_weighted_adapter``, which sums ``w_i l_i``):
    the base weight is scaled by ``prod_i l_i ** w_i`` per feature; at weights 1 the merged model computes what the
    two adapters run together, and weight 0 leaves the weight alone."""

    def two_ia3():
        model = tiny_bert()
        for name in ("wia_a", "wia_b"):
            ae.add_adapter(model, name, ae.IA3Config(target_modules=["query"], feedforward_modules=[]))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "ia3_l" in key:
                    p.uniform_(0.5, 1.5)
        return model

    model = two_ia3()
    query = model.encoder.layer[0].attention.self.query
    la, lb = query.ia3_l["wia_a"].detach().clone(), query.ia3_l["wia_b"].detach().clone()
    weight, bias = query.weight.detach().clone(), query.bias.detach().clone()
    ae.merge_adapter(model, ["wia_a", "wia_b"], weights=[0.5, 2.0])
    scale = (la.double() ** 0.5 * lb.double() ** 2.0).reshape(-1, 1)
    merged = model.encoder.layer[0].attention.self.query
    torch.testing.assert_close(merged.weight.double(), weight.double() * scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged.bias.double(), bias.double() * scale[:, 0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(merged.weight, weight * (0.5 * la + 2.0 * lb).reshape(-1, 1))  # not PEFT's sum

    model = two_ia3()
    ae.set_active_adapters(model, ["wia_a", "wia_b"])
    together = hidden(model)
    ae.merge_adapter(model, ["wia_a", "wia_b"], weights=[1.0, 1.0])
    torch.testing.assert_close(hidden(model), together, rtol=1e-5, atol=1e-5)

    model = two_ia3()
    query = model.encoder.layer[0].attention.self.query
    weight, lb = query.weight.detach().clone(), query.ia3_l["wia_b"].detach().clone()
    ae.merge_adapter(model, ["wia_a", "wia_b"], weights=[0.0, 1.0])
    torch.testing.assert_close(model.encoder.layer[0].attention.self.query.weight, weight * lb.reshape(-1, 1))


@pytest.mark.parametrize("entry, weight", [(-0.5, 0.5), (0.0, -1.0)])
def test_an_ia3_merge_weight_with_no_real_power_is_refused_by_name(entry, weight):
    """A fractional weight of an IA3 vector with a negative entry (or a negative weight of a zero entry) has no finite
    power: refused naming the adapter, the layer and the weight, changing nothing, even with ``safe=False`` (it
    wrote NaN / infinity into the weight, or with ``safe=True`` was refused as a non-finite weight without the
    cause)."""
    model = tiny_bert()
    ae.add_adapter(model, "nrp_ia3", ae.IA3Config(target_modules=["query"], feedforward_modules=[]))
    with torch.no_grad():
        model.encoder.layer[1].attention.self.query.ia3_l["nrp_ia3"][2] = entry
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for safe in (True, False):
        with pytest.raises(ValueError, match=r"'nrp_ia3' has .* in encoder\.layer\.1\.attention\.self\.query: its"):
            ae.merge_adapter(model, ["nrp_ia3"], weights=[weight], safe=safe)
        assert ae.list_adapters(model) == ["nrp_ia3"]
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
