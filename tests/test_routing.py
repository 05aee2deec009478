"""Per-call and per-row adapter routing (issue 7): a route equals the same adapters activated globally, a mixed
batch equals each row run alone (forward and adapter gradients), depth 0 stays bit-identical to the base, and
threads with different routes on one shared model give the single-threaded results.

Tolerances (fp32, tiny models with hidden 32 and O(1) values): 1e-5 absolute between a mixed-batch launch and
per-row launches (the same fused kernels; only the set of adapters packed together and the row blocking differ,
a few ulp per op through 2 layers); gradients 1e-4 (sums over the batch of products of O(1) values, summed in
another order). bf16 on the GPU: within plain torch bf16's own error against fp64 plus 10% slack.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import adapter_engine as ae
from adapter_engine.bottleneck import BottleneckStackLayer
from adapter_engine.kernels import _backend
from adapter_engine.routing import StaticRoute, make_route, use_adapters

# the fused backward stays covered here: training through the patched models takes it (see conftest.py)
pytestmark = pytest.mark.usefixtures("fused_training")

ATOL, GRAD_ATOL = 1e-5, 1e-4
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_LLAMA |= dict(intermediate_size=64, vocab_size=64, max_position_embeddings=32, pad_token_id=0)


def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**_BERT)).eval()


def ids(batch: int, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(model: torch.nn.Module, std: float = 0.2) -> None:
    """Random adapter weights (LoRA B and bottleneck weights start near zero): every adapter must change rows."""
    for name, p in model.named_parameters():
        if "lora_" in name or ".adapters." in name:
            p.normal_(0.0, std)
        elif "ia3_l" in name:
            p.uniform_(0.5, 1.5)


def run(model, batch, spec):
    with use_adapters(spec), torch.no_grad():
        return model(input_ids=batch).last_hidden_state


@torch.no_grad()
def run_active(model, batch):
    return model(input_ids=batch).last_hidden_state


def adapted_bert() -> BertModel:
    """Two seq_bn adapters, one Houlsby-free par_bn-free structure, two LoRAs on query/value, one IA3."""
    model = bert()
    for name in ("a", "b", "c"):
        ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "l", ae.LoraConfig(r=2, lora_alpha=4))
    ae.add_adapter(model, "m", ae.LoraConfig(r=3, lora_alpha=3, target_modules=["query", "key"]))
    ae.add_adapter(model, "i", ae.IA3Config())
    randomise(model)
    return model


@pytest.fixture(scope="module")
def model_and_base():
    base = bert()
    model = adapted_bert()
    return model, base


def test_no_route_and_empty_route_are_bit_identical_to_the_base(model_and_base):
    model, base = model_and_base
    batch = ids(3)
    with torch.no_grad():
        expected = base(input_ids=batch).last_hidden_state
        assert torch.equal(model(input_ids=batch).last_hidden_state, expected)  # nothing active
    assert torch.equal(run(model, batch, None), expected)
    assert torch.equal(run(model, batch, [None, None, None]), expected)  # per-row, every row base only


@pytest.mark.parametrize("spec", ["a", ae.Stack("a", "b"), "l", ae.Stack("l", "m"), ae.Stack("a", "l", "i")])
def test_a_route_equals_activating_the_same_stack(model_and_base, spec):
    model, _ = model_and_base
    batch = ids(2)
    routed = run(model, batch, spec)
    ae.set_active_adapters(model, spec)
    try:
        with torch.no_grad():
            expected = model(input_ids=batch).last_hidden_state
    finally:
        ae.set_active_adapters(model, None)
    assert torch.equal(routed, expected)


def test_route_overrides_the_active_adapters_and_nests(model_and_base):
    model, base = model_and_base
    batch = ids(2)
    ae.set_active_adapters(model, "a")
    try:
        with torch.no_grad():
            base_out = base(input_ids=batch).last_hidden_state
        with use_adapters("b"):
            inner_b = run(model, batch, "b")
            with use_adapters(None):
                with torch.no_grad():
                    assert torch.equal(model(input_ids=batch).last_hidden_state, base_out)
            with torch.no_grad():
                assert torch.equal(model(input_ids=batch).last_hidden_state, inner_b)
        with torch.no_grad():
            assert torch.equal(model(input_ids=batch).last_hidden_state, run(model, batch, "a"))
    finally:
        ae.set_active_adapters(model, None)


MIXED = ["a", None, ae.Stack("a", "b"), "l", ae.Stack("l", "m"), ae.Stack("c", "l", "i"), "i"]


def test_mixed_batch_equals_each_row_alone(model_and_base):
    model, _ = model_and_base
    batch = ids(len(MIXED), seq=4)
    mixed = run(model, batch, MIXED)
    for row, spec in enumerate(MIXED):
        alone = run(model, batch[row : row + 1], spec)
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=0)
    # rows really differ by adapter: the same tokens under different stacks give different outputs
    same = ids(1, seq=4).expand(len(MIXED), -1)
    out = run(model, same, MIXED)
    assert all(not torch.allclose(out[0], out[r], atol=1e-3) for r in range(1, len(MIXED)))


def test_rows_without_an_adapter_keep_the_sublayer_output_without_original_ln_after():
    """seq_bn with ``original_ln_after=False`` (the levels add the residual and LN themselves): in a per-row batch a
    row routed to no adapter gets the sublayer's own LN(h + y), as the unpatched model (it came out as the bare
    projection, in the fused kernel and the eager modules alike); routed rows equal themselves run alone."""
    base = bert()
    model = bert()
    config = ae.BottleneckConfig.seq_bn(reduction_factor=4, adapter_residual_before_ln=True, original_ln_after=False)
    for name in ("na", "nb"):
        ae.add_adapter(model, name, config)
    randomise(model)
    batch = ids(4)
    plain = run_active(base, batch)
    routes = [None, "na", ae.Stack("na", "nb"), None]
    layers = [m for m in model.modules() if isinstance(m, BottleneckStackLayer)]
    for fused in (True, False):
        for layer in layers:
            layer.fused = fused
        mixed = run(model, batch, routes)
        for i, route in enumerate(routes):
            alone = run(model, batch[i : i + 1], route)
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-4)
            if route is None:
                torch.testing.assert_close(mixed[i : i + 1], plain[i : i + 1], rtol=1e-4, atol=1e-4)


def _add(a, b):
    return a if b is None else (b if a is None else a + b)


def test_mixed_batch_gradients_equal_per_row_gradients():
    model = adapted_bert()
    trainable = [p for n, p in model.named_parameters() if "lora_" in n or ".adapters." in n or "ia3_l" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    batch = ids(len(MIXED), seq=4, seed=3)
    weights = torch.randn(len(MIXED), 4, 32, generator=torch.Generator().manual_seed(4))

    def grads(loss):
        return torch.autograd.grad(loss, trainable, allow_unused=True)

    with use_adapters(MIXED):
        mixed = grads((model(input_ids=batch).last_hidden_state * weights).sum())
    per_row = None
    for row, spec in enumerate(MIXED):
        if spec is None:
            continue  # base only: no adapter parameter in its graph
        with use_adapters(spec):
            loss = (model(input_ids=batch[row : row + 1]).last_hidden_state * weights[row : row + 1]).sum()
        g = grads(loss)
        per_row = g if per_row is None else [_add(a, b) for a, b in zip(per_row, g, strict=True)]
    checked = 0
    for gm, gr in zip(mixed, per_row, strict=True):
        if gr is None:
            assert gm is None or torch.count_nonzero(gm) == 0
            continue
        torch.testing.assert_close(gm, gr, atol=GRAD_ATOL, rtol=1e-4)
        checked += 1
    assert checked >= 20  # LoRA A/B, IA3 vectors and bottleneck weights of several adapters all got gradients


def test_tables_first_cached_under_inference_mode_serve_a_later_backward():
    """The kernels' cached device tables and the layers' cached packs of frozen adapters outlive a call: one first
    built during a ``torch.inference_mode`` call (serving) must still work in a later call that autograd records
    (here training the LoRAs, so the bottleneck layers' inputs need gradients and their frozen packs are saved)."""
    from adapter_engine.kernels import bottleneck_pack, lora_inputs, lora_segmented

    for cache in (bottleneck_pack._cached_unit_tables, lora_segmented._tables, lora_inputs._rank_tables):
        cache.cache_clear()
    model = adapted_bert()
    batch = ids(len(MIXED), seq=4, seed=3)
    with use_adapters(MIXED), torch.inference_mode():
        model(input_ids=batch)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with use_adapters(MIXED):
        loss = model(input_ids=batch).last_hidden_state.square().sum()
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 8  # A and B of l and m, 2 layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_routes_on_a_pre_ln_model_capture_the_residual(arch):
    """Llama's / GPT-2's MLP adapters read the residual captured by a hook (per thread), GPT-2's LoRA sits on a
    Conv1D (fan_in_fan_out); mixed == alone."""
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaModel(LlamaConfig(**_LLAMA)).eval()
    else:
        model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)).eval()  # fmt: skip
    for name in ("p", "q"):
        ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "l", ae.LoraConfig(r=2))
    randomise(model)
    spec = ["p", ae.Stack("p", "q"), None, ae.Stack("l", "q")]
    batch = ids(len(spec), seq=4)
    mixed = run(model, batch, spec)
    for row, entry in enumerate(spec):
        torch.testing.assert_close(mixed[row : row + 1], run(model, batch[row : row + 1], entry), atol=ATOL, rtol=0)


def test_route_errors():
    model = adapted_bert()
    with pytest.raises(ValueError, match="row stacks but"):
        run(model, ids(3), ["a", "b"])
    with pytest.raises(TypeError, match="route entry"):
        make_route([3])
    for entry in (["a", "l"], {"a"}):  # a row's stack given as a list or set: named, not "unhashable type"
        with pytest.raises(TypeError, match="route entry must be .* takes a Stack"):
            make_route(["b", entry])
    with pytest.raises(TypeError, match="adapter routing takes"):
        make_route(3.5)
    with pytest.raises(ValueError, match="structures differ|mix structural"):
        ae.add_adapter(model, "par", ae.BottleneckConfig.par_bn(reduction_factor=4))
        run(model, ids(2), ["a", "par"])


def deberta_v3_like():
    """A DeBERTa-v2 with relative attention (DeBERTa-v3's configuration): its relative position embeddings, a batch
    of one, go through query_proj / key_proj too."""
    from transformers import DebertaV2Config, DebertaV2Model

    relative = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=4)
    torch.manual_seed(0)
    return DebertaV2Model(DebertaV2Config(**_BERT, **relative)).eval()


def test_a_layer_fed_relative_position_embeddings_refuses_a_per_row_route_with_the_reason():
    """A per-row route through DeBERTa-v2's query_proj is refused naming such layers: it named only the row counts,
    which read as a route of the wrong length."""
    model = deberta_v3_like()
    ae.add_adapter(model, "q", ae.LoraConfig(r=2, target_modules=["query_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="3 row stacks but .* batch of 1 rows: .*relative position embeddings"):
        run(model, ids(3), ["q", None, "q"])


def test_a_per_row_route_that_leaves_out_a_layers_adapters_runs_it_as_the_base_layer():
    """A layer that sees another batch than the input rows (DeBERTa-v2's query_proj, fed the relative position
    embeddings too) runs its base computation under a per-row route that uses none of its adapters: such a route
    was refused there with the row counts, although it uses only adapters of other layers (value_proj)."""
    model = deberta_v3_like()
    ae.add_adapter(model, "q", ae.LoraConfig(r=2, target_modules=["query_proj"], init_lora_weights=False))
    ae.add_adapter(model, "v", ae.LoraConfig(r=2, target_modules=["value_proj"], init_lora_weights=False))
    ae.add_adapter(model, "i", ae.IA3Config(target_modules=["key_proj"], feedforward_modules=[]))
    randomise(model)
    batch, spec = ids(3), ["v", None, "v"]
    mixed = run(model, batch, spec)
    for row, entry in enumerate(spec):
        torch.testing.assert_close(mixed[row : row + 1], run(model, batch[row : row + 1], entry), atol=ATOL, rtol=0)
    assert (mixed[0] - run(model, batch, None)[0]).abs().max() > 1e-3  # the adapter acts


def test_a_route_that_names_an_adapter_twice_is_refused_like_set_active_adapters():
    model = adapted_bert()
    with pytest.raises(ValueError, match="appears twice"):
        ae.set_active_adapters(model, ["a", "a"])
    for spec in (ae.Stack("a", "a"), ["b", ae.Stack("a", "l", "a")]):
        with pytest.raises(ValueError, match="names an adapter twice"):
            run(model, ids(2), spec)
    with pytest.raises(ValueError, match="names an adapter twice"):
        StaticRoute([("a",), ("b", "b")], depth=2)
    static = StaticRoute([("a",), ("b",)], depth=2)
    with pytest.raises(ValueError, match="names an adapter twice"):
        static.fill([("a", "a"), ("b",)])
    assert static.rows == (("a",), ("b",))


def test_a_layers_level_switches_apply_to_every_row_of_a_routed_call():
    """set_level_enabled / set_depth of a bottleneck layer are documented "for every row": a routed call follows
    them as the active stack does (level i: the i-th of a row's adapters the layer holds)."""
    model = adapted_bert()
    layers = [m for m in model.modules() if isinstance(m, BottleneckStackLayer)]
    batch = ids(3)
    rows = [ae.Stack("a", "b"), ae.Stack("c", "l", "a"), None]
    level0_off = run(model, batch, [ae.Stack("b"), ae.Stack("a", "l"), None])
    depth1 = run(model, batch, [ae.Stack("a"), ae.Stack("c", "l"), None])
    full = run(model, batch, rows)
    for layer in layers:
        layer.set_level_enabled(0, False)
    torch.testing.assert_close(run(model, batch, rows), level0_off, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model, batch, ae.Stack("a", "b"))[:1], level0_off[:1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="static route"), torch.no_grad():
        with use_adapters(StaticRoute([("a",), ("b",), ()], depth=2)):
            model(input_ids=batch)
    for layer in layers:
        layer.set_level_enabled(0, True)
        layer.set_depth(1)
    torch.testing.assert_close(run(model, batch, rows), depth1, atol=ATOL, rtol=0)
    for layer in layers:
        layer.set_depth(None)
    assert torch.equal(run(model, batch, rows), full)
    assert (full - level0_off)[:2].abs().max() > 1e-3 and (full - depth1)[:2].abs().max() > 1e-3


def test_a_linear_without_adapters_runs_its_base_layer_under_any_route(monkeypatch):
    """A patched linear that holds no adapter (``StackedAdapterModel`` patches the LoRA targets before any LoRA is
    added) returns its base layer's output bit for bit under every route, without planning rows for a mixed one."""
    from adapter_engine.lora import LoraLinear

    def planned(*args):
        pytest.fail("rows planned for a layer without adapters")

    monkeypatch.setattr(LoraLinear, "_per_row_forward", planned)
    base = torch.nn.Linear(8, 6)
    layer = LoraLinear(base).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        for spec in (None, "a", ["a", None, "b"]):
            with use_adapters(spec):
                assert torch.equal(layer(x), base(x))
        layer.add_lora("a", 2, 1.0, init=False)
        with use_adapters(["a", None, "b"]), pytest.raises(pytest.fail.Exception, match="rows planned"):
            layer(x)  # with an adapter, the mixed route plans its rows


def _thread_check(model, specs, batches, expected, n_threads: int, calls: int, atol: float = 0.0) -> None:
    """Every call's output equals the single-threaded one (exactly on CPU; ``atol`` where libraries may pick
    per-thread GEMM algorithms): a route leaking between threads changes outputs by O(0.1)."""
    errors: list[BaseException] = []
    mismatches: list[tuple] = []
    start = threading.Barrier(n_threads)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(calls):
                k = rng.randrange(len(specs))
                out = run(model, batches[k], specs[k])
                if not torch.allclose(out, expected[k], atol=atol, rtol=0):
                    mismatches.append((seed, k, (out - expected[k]).abs().max().item()))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]


SPECS = ["a", "b", ae.Stack("a", "b"), ae.Stack("a", "b", "c"), "l", "m", ae.Stack("l", "m", "i"), None,
         ["a", None, "l", ae.Stack("b", "c")], ["m", "c", ae.Stack("a", "l"), None]]  # fmt: skip


def test_threads_with_different_routes_match_a_single_thread_run_reference_ops(monkeypatch):
    """10,000 calls: 8 threads x 1,250 mixed calls on one shared tiny BERT, every op on its torch reference twin
    (the interpreter would take hours); the fused-kernel path runs the same test with fewer calls below."""
    monkeypatch.setattr(_backend, "INTERPRET", False)
    model = adapted_bert()
    batches = [ids(len(s) if isinstance(s, list) else 2, seq=3, seed=10 + i) for i, s in enumerate(SPECS)]
    expected = [run(model, b, s) for b, s in zip(batches, SPECS)]
    _thread_check(model, SPECS, batches, expected, n_threads=8, calls=1250)


@pytest.mark.cuda
def test_threads_with_different_routes_match_a_single_thread_run_fused_kernels():
    """The same on the GPU with the compiled fused kernels (the CPU interpreter is not thread-safe: it patches
    ``triton.language`` globally while a kernel runs, so concurrent interpreted launches fail)."""
    model = adapted_bert().cuda()
    batches = [ids(len(s) if isinstance(s, list) else 2, seq=3, seed=10 + i).cuda() for i, s in enumerate(SPECS)]
    expected = [run(model, b, s) for b, s in zip(batches, SPECS)]
    _thread_check(model, SPECS, batches, expected, n_threads=8, calls=250, atol=1e-5)


def test_route_tensors_are_built_once_per_call(model_and_base):
    """Every layer of one call reuses the route's cached device tensors (no per-layer host-to-device copies, and no
    per-layer expansion of the per-sequence tables to one entry per row)."""
    model, _ = model_and_base
    with use_adapters(["a", "l", ae.Stack("a", "b")]) as route, torch.no_grad():
        model(input_ids=ids(3))
        tensors = [key for key, value in route._cache.items() if isinstance(value, torch.Tensor)]
    # bottleneck routes and LoRA ids for query and value (the same table: one entry), each also per row
    assert collections.Counter(key[0] for key in tensors) == {
        "bn_routes": 1, "bn_routes_per_row": 1, "lora_ids": 1, "lora_ids_per_row": 1
    }  # fmt: skip
    # (the other entries are host plans, one per layout: LoRA rows, and the bottleneck layers' shared plan; the
    # check of the route's names, once; and the set of names the rows use, which LoRA layers test theirs against)
    assert len(route._cache) - len(tensors) == 4 and {"names_known", "names_used"} <= set(route._cache)


def test_a_route_naming_an_unknown_adapter_is_refused(model_and_base):
    """A misspelled name in a route ran the base model for its rows, silently; it is refused (as by
    set_active_adapters and PEFT's adapter_names=), LoRA and bottleneck names alike, and before any layer runs it."""
    model, _ = model_and_base
    for spec in (["a", "medicl", None], "medicl", ae.Stack("a", "bb")):
        with use_adapters(spec), torch.no_grad(), pytest.raises(ValueError, match="unknown adapters"):
            model(input_ids=ids(3 if isinstance(spec, list) else 2))


def test_a_reused_route_checks_its_names_again_after_an_adapter_is_deleted():
    """A Route object kept and used again (``use_adapters(route)``) checked its names once: after an adapter it names
    was deleted, its rows ran the base model, silently. The check is redone after any adapter change."""
    model = bert()
    for name in ("kept", "gone"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2, lora_alpha=4))
    randomise(model)
    route = make_route(["kept", "gone"])
    batch = ids(2)
    run(model, batch, route)
    ae.delete_adapter(model, "gone")
    with pytest.raises(ValueError, match=r"unknown adapters \['gone'\]"):
        run(model, batch, route)


def test_a_route_naming_another_models_adapter_is_refused_in_this_model():
    """With two patched models in the process, a route naming an adapter only the other model holds (or one evicted
    from this model, as a memory manager does) passed the check, which read every live model's adapters: this model
    ran the base for those rows, silently. Each model checks against its own adapters (LoRA and bottleneck layers)."""
    first, second = bert(), bert()
    for model, tag in ((first, "first"), (second, "second")):
        ae.add_adapter(model, f"xm_lora_{tag}", ae.LoraConfig(r=2, lora_alpha=4))
        ae.add_adapter(model, f"xm_bn_{tag}", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    randomise(first)
    randomise(second)
    batch = ids(2)
    for spec in ("xm_lora_second", "xm_bn_second", ["xm_lora_first", "xm_bn_second"]):
        with pytest.raises(ValueError, match=r"unknown adapters \['xm_(lora|bn)_second'\]"):
            run(first, batch, spec)
    route = make_route(["xm_lora_first", "xm_bn_first"])  # one route object used with both models, checked by each
    run(first, batch, route)
    with pytest.raises(ValueError, match=r"unknown adapters \['xm_bn_first', 'xm_lora_first'\]"):
        run(second, batch, route)
    run(first, batch, route)
    ae.delete_adapter(first, "xm_lora_first")  # gone from this model, still a name the other could hold
    ae.add_adapter(second, "xm_lora_first", ae.LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(ValueError, match=r"unknown adapters \['xm_lora_first'\]"):
        run(first, batch, route)


@pytest.mark.parametrize(
    "spec, tables", [(["l", "m", None], 3), (["a", ae.Stack("a", "b"), None], 1), (["l", ae.Stack("c", "b"), "m"], 4)]
)
def test_per_sequence_routes_are_expanded_once_per_call(model_and_base, spec, tables):
    """A route gives one stack per sequence; the kernels read one entry per row. The expansion (a copy) is made once
    per call for each table, kept on the route, not in every layer call: LoRA ids for query (both LoRAs), key and
    value (one each), 6 layer calls; bottleneck routes, one table for both layers. (The interpreter copies with
    ``copy_``.) A first routed call makes the layers' serving caches (the stacked factors of the segmented path);
    the counted call copies only what each call must."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
                Copies.count += 1
            return func(*args, **(kwargs or {}))

    model, _ = model_and_base
    run(model, ids(3), spec)
    counts = {}
    for routed in (None, spec):
        Copies.count = 0
        with use_adapters(routed), torch.no_grad(), Copies():
            model(input_ids=ids(3))
        counts[routed is None] = Copies.count
    assert counts[False] - counts[True] == tables, counts


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_rows_are_grouped_by_adapter_once_per_call(monkeypatch, mode):
    """A mixed LoRA batch on the segmented path sorts its rows once per call, not once per layer, also under
    ``torch.inference_mode`` (where the route's ids tensor, made as an inference tensor, had no version counter
    and could not be remembered: every layer grouped the rows again). The pooler's ``dense`` reads one row per
    sequence: a table of its own, grouped once too."""
    from adapter_engine.kernels import lora_inputs

    model = bert()
    for name in ("p", "q", "r"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"]))
    randomise(model)
    calls = []
    plan = lora_inputs.plan_segments
    monkeypatch.setattr(lora_inputs, "plan_segments", lambda ids, *a: calls.append(ids.numel()) or plan(ids, *a))
    batch, spec = ids(4, seq=20), ["p", "q", "r", "p"]  # 80 rows (and the pooler's 4): "segmented"
    with use_adapters(spec), mode():
        mixed = model(input_ids=batch).last_hidden_state
    assert sorted(calls) == [4, 80]
    with torch.no_grad():
        alone = torch.cat([run(model, batch[i : i + 1], spec[i]) for i in range(4)])
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)


def test_a_rows_second_lora_in_a_layer_reaches_that_row_only():
    """A row whose stack holds two LoRAs of one layer gets the second one's term after the fused launch: on its own
    rows only. Computed for every row and masked by a multiply, a non-finite weight of that adapter gave every row
    of the batch NaN (0 * NaN), on the segmented path, where rows are otherwise kept apart (as PEFT's mixed batch and
    per-row calls keep them)."""
    model = bert()
    for name in ("p", "q", "s"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2 + len(name), lora_alpha=4))
    randomise(model)
    batch, spec = ids(4, seq=20), [ae.Stack("p", "s"), "q", None, "p"]  # 80 rows: the segmented path
    stacked = run(model, batch, spec)
    torch.testing.assert_close(stacked[:1], run(model, batch[:1], spec[0]), rtol=0, atol=ATOL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.s." in name:
                p[0, 0] = float("nan")
    broken = run(model, batch, spec)
    assert not torch.isfinite(broken[0]).all()
    torch.testing.assert_close(broken[1:], stacked[1:], rtol=0, atol=0)  # the other rows: as before, finite


def test_serving_fuses_every_resident_lora_once_per_layer():
    """Serving (no autograd) on the segmented path fuses every resident LoRA of a layer: batches with different
    sets of adapters share one stacked copy of each layer's factors (the layer's ``_stacked``, where fusing only
    the used adapters made one per new set); each row still gets its own adapter, and no row reads an adapter it
    does not use. Under autograd only the used adapters take part: the others get no gradient at all."""
    from adapter_engine.lora import LoraLinear

    model = bert()
    names = ("p", "q", "r", "s")
    for name in names:
        ae.add_adapter(model, name, ae.LoraConfig(r=2 + names.index(name), lora_alpha=4))  # query and value
    randomise(model)
    batch = ids(4, seq=20)  # 80 rows: "segmented"
    specs = (["p", "q", "p", "q"], ["r", "s", "r", None], ["s", "p", "q", "r"], ["q", "q", "q", "s"])
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    mixed = [run(model, batch, specs[0])]
    stacks = [layer._stacked[0] for layer in layers]
    mixed += [run(model, batch, spec) for spec in specs[1:]]
    assert len(layers) == 4 and all(layer._stacked[0] is s for layer, s in zip(layers, stacks, strict=True))
    assert all(s.ranks == (2, 3, 4, 5) for s in stacks)  # whatever the mix
    for spec, out in zip(specs, mixed, strict=True):
        alone = torch.cat([run(model, batch[i : i + 1], spec[i]) for i in range(4)])
        torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)

    # rows stay apart from an adapter they do not use, even a broken one: the masked path of small batches (where
    # every adapter's columns meet every row) fuses only the used adapters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.s." in name:
                p.fill_(float("nan"))
    for rows in (batch, batch[:, :3]):  # 80 rows (segmented), 12 rows (masked)
        assert torch.isfinite(run(model, rows, ["p", "q", "r", None])).all()

    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    with use_adapters(specs[0]):
        loss = model(input_ids=batch).last_hidden_state.square().sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    assert all((g is None) == (".r." in n or ".s." in n) for n, g in grads.items())  # r and s: not in this batch


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_a_small_served_batch_keeps_its_rows_from_another_rows_broken_adapter(factor):
    """A served batch small enough for the masked path (12 rows over two rank-2/3 adapters): a NaN in the adapter
    of one row leaves the other rows, on another adapter or on the base, as each alone (PEFT's sub-batches keep
    rows apart too). On the masked path every row met every fused adapter's columns, and 0 * NaN reached all."""
    model = bert()
    for name, r in (("p", 2), ("q", 3)):
        ae.add_adapter(model, name, ae.LoraConfig(r=r, lora_alpha=4))
    randomise(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{factor}.q." in name:
                p[0, 0] = float("nan")
    batch = ids(3, seq=4)
    out = run(model, batch, ["p", "q", None])
    assert not torch.isfinite(out[1]).all()
    for i, spec in ((0, "p"), (2, None)):
        torch.testing.assert_close(out[i : i + 1], run(model, batch[i : i + 1], spec), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(run(model, batch, ["p", "p", "p"])).all()  # one adapter for every row: the masked path


@pytest.mark.parametrize("round_trip", [False, True], ids=["half", "half-then-float"])
def test_a_model_converted_in_place_is_served_from_its_new_weights(round_trip):
    """``model.half()`` / ``.to(device)`` keep every parameter's object and in-place version, which the caches of
    stacked LoRA factors and bottleneck packs are keyed on: a model served before its conversion must give what a
    model converted before any call gives, bit for bit (a stale fp32 pack or stack would still be read, or, after
    a move to the GPU, host memory). The round trip (``.half().float()``, no call between) may even bring the old
    data address back."""
    served, fresh = adapted_bert(), adapted_bert()
    batch = ids(4, seq=20)  # 80 rows: the LoRA mix runs segmented, over stacked factors
    specs = (["a", "l", ae.Stack("b", "c"), "m"], "a", "l", ["l", "m", "l", None])
    for spec in specs:
        run(served, batch, spec)
    from adapter_engine.kernels import lora_inputs
    from adapter_engine.lora import LoraLinear

    small = ids(4, seq=3)  # 12 rows: a stack on every row takes the masked path, over lora_linear's own cache
    small_specs = (*specs, ae.Stack("l", "m"))  # of stacked factors (rows that differ take the segmented one)
    for spec in small_specs:
        run(served, small, spec)
    params = {id(p) for p in served.parameters()}
    layers = [m for m in served.modules() if isinstance(m, LoraLinear)]
    assert any(params.intersection(key[1]) for key in lora_inputs._STACKS)
    assert any(layer._stacked is not None for layer in layers)  # (the segmented path's, kept by each layer)
    for model in (served, fresh):
        model.half()
        if round_trip:
            model.float()
    # the engine's LoRA layers drop their stacked copies when converted: a round trip that lands on the old data
    # addresses (the CUDA caching allocator's likely choice) would otherwise hit them
    assert not any(params.intersection(key[1]) for key in lora_inputs._STACKS)
    assert all(layer._stacked is None for layer in layers)
    for rows, row_specs in ((batch, specs), (small, small_specs)):
        for spec in row_specs:
            torch.testing.assert_close(run(served, rows, spec), run(fresh, rows, spec), rtol=0, atol=0)


def test_an_adapter_evicted_during_a_call_that_does_not_hold_it(monkeypatch):
    """Serving fuses every resident LoRA, also those the call does not hold, which another thread may evict while
    the call runs: the call reads the layer's adapters from one snapshot taken when it reached the layer (here the
    eviction is injected right after the first layer has planned its launch)."""
    from adapter_engine.lora import LoraLinear

    model = bert()
    for name in ("p", "q", "r"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2, lora_alpha=4))
    randomise(model)
    batch, spec = ids(4, seq=20), ["p", "r", "p", None]  # 80 rows: segmented, every resident LoRA fused
    with torch.no_grad():
        want = run(model, batch, spec)
    plan = LoraLinear._row_plan
    evicted = []

    def plan_then_evict(self, *args, **kwargs):
        out = plan(self, *args, **kwargs)
        if not evicted:
            evicted.append(True)
            ae.delete_adapter(model, "q")  # what another thread's memory manager may do meanwhile
        return out

    monkeypatch.setattr(LoraLinear, "_row_plan", plan_then_evict)
    with torch.no_grad():
        got = run(model, batch, spec)
    assert evicted and "q" not in ae.list_adapters(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_deepcopy_of_a_routed_model():
    model = adapted_bert()
    clone = copy.deepcopy(model)
    batch = ids(2)
    assert torch.equal(run(clone, batch, ["a", "l"]), run(model, batch, ["a", "l"]))


# ------------------------------------------------------------------------------------------------- CUDA tier
@pytest.mark.cuda
def test_mixed_batch_bf16_error_within_torch_bf16_error():
    """16 stacks in one bf16 batch on BERT-base-like sizes: the fused mixed batch's error against an fp64 run of
    each row's stack must not exceed plain torch bf16 (the same model run with eager adapters) + 10% slack."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                     vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertModel(cfg).eval()
    names = [f"s{i}" for i in range(16)]
    for n in names:
        ae.add_adapter(model, n, ae.BottleneckConfig.seq_bn(reduction_factor=16))
    randomise(model, std=0.05)
    ref64 = copy.deepcopy(model).double().cuda()
    fused = copy.deepcopy(model).to(torch.bfloat16).cuda()
    eager = copy.deepcopy(fused)
    for m in [*eager.modules(), *ref64.modules()]:
        if hasattr(m, "fused"):
            m.fused = False  # AdapterHub-style eager modules: plain torch in bf16 / fp64
    batch = torch.randint(3, 1000, (16, 64), device="cuda")
    with use_adapters(names), torch.no_grad():
        got = fused(input_ids=batch).last_hidden_state.double()
        base16 = eager(input_ids=batch).last_hidden_state.double()
    with torch.no_grad():
        exact = torch.cat([run(ref64, batch[i : i + 1], n) for i, n in enumerate(names)]).double()
    err, torch_err = (got - exact).abs().max().item(), (base16 - exact).abs().max().item()
    assert err <= torch_err * 1.1 + 1e-3, (err, torch_err)


def test_switching_routes_reuses_one_pack_per_layer():
    """Switching among resident adapters changes only the small routes tensor: every bottleneck layer keeps one
    packed copy of its resident adapters (no repacking, and on the GPU no new kernel specialisation: the
    launch's packed sizes do not change)."""
    from adapter_engine.routing import RoutedStackMixin

    model = adapted_bert()
    layers = [m for m in model.modules() if isinstance(m, RoutedStackMixin)]
    for spec in ["a", "b", ae.Stack("c", "a"), ["b", None, "c"], "a"]:
        run(model, ids(3), spec)
    assert layers and all(len(layer._packs) == 1 for layer in layers)
    packs = [next(iter(layer._packs.values())) for layer in layers]
    assert all(p.wd.shape[0] == 3 * 8 for p in packs)  # a, b and c (hidden 32 // 4 = 8 units each)


def test_a_serving_layer_stacks_its_resident_loras_once_and_sees_every_change(monkeypatch):
    """Serving a mixed batch, a LoRA layer checks and stacks its resident adapters once (``_stacked_for``), then
    reuses them until a factor is updated in place, replaced or converted, a scaling changes or an adapter goes;
    every output equals the reference over the layer's current weights."""
    from adapter_engine import lora_rows
    from adapter_engine.kernels import lora_linear_reference
    from adapter_engine.lora import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(12, 10)).eval()
    for i, r in enumerate((2, 3, 4)):
        layer.add_lora(f"l{i}", r, scaling=0.5 + i, init=False)
    builds = []
    made = lora_rows.stack_loras
    monkeypatch.setattr(lora_rows, "stack_loras", lambda *a, **k: builds.append(1) or made(*a, **k))
    x = torch.randn(8, 10, 12)  # 80 rows: the segmented path, every resident LoRA fused
    rows = ["l0", "l1", None, "l2", "l1", "l0", "l2", "l2"]

    def check(dtype=torch.float32):
        with use_adapters(rows), torch.no_grad():
            got = layer(x.to(dtype))
        names = list(layer.lora_A)
        ids = torch.tensor([names.index(n) if n in names else -1 for n in rows])
        want = lora_linear_reference(
            x.double(), layer.weight.double(), [layer.lora_A[n].weight.double() for n in names],
            [layer.lora_B[n].weight.double() for n in names], [layer.scaling[n] for n in names],
            layer.bias.double(), adapter_ids=ids,
        )  # fmt: skip
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)

    check()
    check()
    assert len(builds) == 1  # the second call reused the stack
    torch.nn.ModuleList([layer])  # registered under a new name, as Llama's ``self.layers[:n]`` does per forward
    check()
    assert len(builds) == 1
    with torch.no_grad():
        layer.lora_B["l1"].weight.mul_(-2.0)  # in place: a new version
    check()
    layer.lora_A["l2"].weight = torch.nn.Parameter(torch.randn(4, 12))  # another tensor
    check()
    layer.lora_B["l0"] = torch.nn.Linear(2, 10, bias=False)  # another module
    check()
    layer.scaling["l0"] = 3.0
    check()
    assert len(builds) == 5
    layer.half()  # conversion in place: same parameter objects and versions
    check(torch.float16)
    assert len(builds) == 6
    layer.float()
    check()
    assert len(builds) == 7 and layer._stacked is not None
    layer.delete_adapter("l1")  # the stacked copies go with the adapter, not at the next call
    assert layer._stacked is None and layer._snapshot_memo is None
    check()
    assert len(builds) == 8


def test_a_model_that_slices_its_layers_per_forward_keeps_its_serving_caches(monkeypatch):
    """Llama's forward iterates ``self.layers[: n]``: a new ``ModuleList`` per call, which registers every decoder
    layer under a new name. Such registrations leave the caches valid (only one that replaces a module or parameter
    counts), so a mixed batch's LoRA layers stack their adapters at the first forward only. Counted, they made every
    layer stack again at every forward (a copy of its adapters' factors per layer call) and took the host time of a
    4-adapter Llama forward from 4.2 to 6.9 ms (CPU, kernels stubbed)."""
    from adapter_engine import lora_rows

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)  # fmt: skip
    model = LlamaModel(config).eval()
    for name in ("a", "b"):
        ae.add_adapter(model, name, ae.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    builds = []
    made = lora_rows.stack_loras
    monkeypatch.setattr(lora_rows, "stack_loras", lambda *a, **k: builds.append(1) or made(*a, **k))
    batch = ids(4, seq=20)  # 80 rows: the segmented path
    outputs = [run(model, batch, ["a", "b", None, "a"]) for _ in range(3)]
    assert len(builds) == 2 * 2  # q_proj and v_proj of both layers, once
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)
    layer = model.layers[1].self_attn.q_proj
    layer.lora_A["b"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["b"].weight))  # a replacement
    changed = run(model, batch, ["a", "b", None, "a"])
    assert len(builds) == 2 * 2 + 4  # counted: every layer's stack is made again
    assert not torch.equal(changed, outputs[0])


@pytest.mark.parametrize("routed", [True, False])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_a_layers_pack_is_a_normal_tensor_in_the_callers_grad_mode(mode, routed):
    """Caches hold normal tensors (``_backend.normal_tensors``), made in the caller's grad mode: under
    ``torch.inference_mode`` they are not inference tensors (which have no version counter), and under
    ``torch.no_grad`` they do not require grad. ``torch.inference_mode(False)`` alone turns grad mode on: a serving
    layer's pack then required grad, and the level path's operand cache skipped it, so every served call and every
    CUDA-graph replay built the operands again (session 15's H100: bert-base with 3 stacked adapters, 1.29x bare)."""
    from adapter_engine.bottleneck import BottleneckStackLayer, wrap_sublayer
    from adapter_engine.bottleneck_adapter import BottleneckAdapter
    from adapter_engine.kernels._backend import normal_tensors

    model = bert()
    if routed:  # (the API's layers: routed_bottleneck.RoutedStackMixin packs)
        for name in ("a", "b"):
            ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4))
        layer = next(m for m in model.modules() if isinstance(m, BottleneckStackLayer))
    else:  # a plain wrapper (BottleneckStackLayer packs)
        layer = wrap_sublayer(model.encoder.layer[0], "output")
        for name in ("a", "b"):
            layer.add_adapter(name, BottleneckAdapter(32, 8, "relu"))
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}
    with context[mode]():
        packed = layer._packed(["a", "b"])
        with normal_tensors():
            made, grad_inside = torch.ones(2) * 2, torch.is_grad_enabled()
    assert not packed.wd.is_inference() and not made.is_inference()
    assert packed.wd.requires_grad is grad_inside is (mode == "grad")


def test_a_routed_pack_follows_the_adapters_a_call_reads(monkeypatch):
    """A routed bottleneck layer packs its resident adapters once and checks, per call, only what can make that
    pack stale for the call: an adapter change or conversion, a registration anywhere (a weight replaced), and
    updates in place of the adapters the rows use. An update of an unused adapter is picked up when it is used.
    Every output equals the eager modules' over the current weights."""
    from adapter_engine import routed_bottleneck
    from adapter_engine.routing import RoutedStackMixin

    model = adapted_bert()
    layers = [m for m in model.modules() if isinstance(m, RoutedStackMixin)]
    packs = []
    pack_modules = routed_bottleneck.pack_modules
    monkeypatch.setattr(
        routed_bottleneck, "pack_modules", lambda modules, *a: packs.append(1) or pack_modules(modules, *a)
    )
    batch = ids(3)

    def check(spec):
        fused = run(model, batch, spec)
        for layer in layers:
            layer.fused = False
        eager = run(model, batch, spec)
        for layer in layers:
            layer.fused = True
        torch.testing.assert_close(fused, eager, rtol=ATOL, atol=ATOL)

    check("a")
    check(["a", None, "a"])
    assert len(packs) == len(layers)  # one pack per layer, reused by the second route
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.b." in name:
                p.mul_(-1.5)  # in place, an adapter the next call does not use
    check("a")
    assert len(packs) == len(layers)
    check(ae.Stack("a", "b"))  # now used: packed again
    assert len(packs) == 2 * len(layers)
    layers[0].adapters["c"].adapter_up.weight = torch.nn.Parameter(
        torch.randn_like(layers[0].adapters["c"].adapter_up.weight)
    )
    check(["c", "a", None])  # a replaced weight (a registration): every layer packs again
    assert len(packs) == 3 * len(layers)


# ------------------------------------------------------------------------------- cached state, as a state machine
class CachedServingMachine(RuleBasedStateMachine):
    """Random sequences of adapter changes (add, delete, in-place updates, replaced weights and modules, new
    scalings, merges and unmerges, a dtype round trip) between calls, routed or of the adapters set active. After
    each change, a served call (one adapter, a stack, or rows mixing adapters; small batches take the masked LoRA
    path, larger ones the segmented one; or the active adapters) must give what a deep copy of the model, whose
    caches start empty, gives: bit for bit. Every cache of the serving path (LoRA stacks and snapshots, bottleneck
    packs, layouts and route plans, prepared plans and launches) is keyed on something one of these changes must
    invalidate."""

    LORAS, BOTTLENECKS = ("p", "q", "r"), ("a", "b", "c")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = bert()
        self.present: list[str] = []
        self.merged: set[str] = set()
        for name in ("p", "q", "a", "b"):
            self._add(name)

    def _add(self, name: str) -> None:
        if name in self.LORAS:
            config = ae.LoraConfig(r=2 + self.LORAS.index(name), lora_alpha=4)
        else:
            config = ae.BottleneckConfig.seq_bn(reduction_factor=4)
        ae.add_adapter(self.model, name, config)
        self.present.append(name)
        with torch.no_grad():
            for param in self._params(name):
                param.normal_(0.0, 0.3)

    def _params(self, name: str) -> list[torch.Tensor]:
        part = f".lora_A.{name}." if name in self.LORAS else f".adapters.{name}."
        both = (part, part.replace("lora_A", "lora_B"))
        return [p for n, p in self.model.named_parameters() if any(s in n for s in both)]

    @rule(name=st.sampled_from(LORAS + BOTTLENECKS))
    def add(self, name):
        if name not in self.present and name not in self.merged:
            self._add(name)

    @precondition(lambda self: len(self.present) > 1)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(self.present))
        ae.delete_adapter(self.model, name)
        self.present.remove(name)

    @precondition(lambda self: self.present)
    @rule(data=st.data(), factor=st.sampled_from([-1.5, 0.5, 2.0]))
    def update_in_place(self, data, factor):
        name = data.draw(st.sampled_from(self.present))
        with torch.no_grad():
            for param in self._params(name):
                param.mul_(factor)

    @precondition(lambda self: self.present)
    @rule(data=st.data(), whole_module=st.booleans())
    def replace(self, data, whole_module):
        name = data.draw(st.sampled_from(self.present))
        suffix = f"lora_B.{name}" if name in self.LORAS else f"adapters.{name}.adapter_up"
        for qualified, module in list(self.model.named_modules()):
            if qualified.endswith(suffix):
                fresh = torch.randn_like(module.weight) * 0.3
                if whole_module:  # a new module under the same name
                    parent = self.model.get_submodule(qualified.rsplit(".", 1)[0])
                    new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                    new.weight = torch.nn.Parameter(fresh)
                    if module.bias is not None:
                        new.bias = torch.nn.Parameter(module.bias.detach().clone())
                    setattr(parent, qualified.rsplit(".", 1)[1], new)
                else:
                    module.weight = torch.nn.Parameter(fresh)

    @precondition(lambda self: any(n in self.LORAS for n in self.present))
    @rule(data=st.data(), scaling=st.sampled_from([0.5, 3.0]))
    def rescale(self, data, scaling):
        name = data.draw(st.sampled_from([n for n in self.present if n in self.LORAS]))
        for module in self.model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                module.scaling[name] = scaling

    @precondition(lambda self: len(self.present) > 1 and any(n in self.LORAS for n in self.present))
    @rule(data=st.data())
    def merge(self, data):  # folds the LoRA into the base weights and drops it (the base changes in place)
        name = data.draw(st.sampled_from([n for n in self.present if n in self.LORAS]))
        ae.merge_adapter(self.model, name)
        self.present.remove(name)
        self.merged.add(name)

    @precondition(lambda self: self.merged)
    @rule(data=st.data())
    def unmerge(self, data):  # restores the base weights (the adapter stays gone)
        name = data.draw(st.sampled_from(sorted(self.merged)))
        ae.unmerge_adapter(self.model, name)
        self.merged.discard(name)

    @rule()
    def round_trip(self):
        self.model.half()
        self.model.float()

    @precondition(lambda self: self.present)
    @rule(data=st.data())
    def activate(self, data):  # what the calls without a route serve, until the next activation
        ae.set_active_adapters(self.model, data.draw(st.permutations(self.present))[: data.draw(st.integers(1, 3))])

    @precondition(lambda self: self.present)
    @rule(data=st.data(), seq=st.sampled_from([3, 20]))
    def serve(self, data, seq):
        names = self.present
        kind = data.draw(st.sampled_from(["one", "stack", "rows", "active"]))
        bottlenecks = [n for n in names if n in self.BOTTLENECKS]
        if kind == "active":  # no route: the adapters set active (the layers' own plans, packs and launches)
            spec = self.ACTIVE
        elif kind == "one":
            spec = data.draw(st.sampled_from(names))
        elif kind == "stack" and len(bottlenecks) >= 2:
            spec = ae.Stack(*data.draw(st.permutations(bottlenecks))[:2])
        else:
            spec = data.draw(st.lists(st.sampled_from([*names, None]), min_size=4, max_size=4))
        self._check(spec, seq)

    @invariant()
    def serves_like_a_fresh_copy(self):  # after every step: each change meets caches that earlier calls filled
        if self.present:
            self._check([self.present[i % len(self.present)] for i in range(4)], 20)
        self._check(self.ACTIVE, 20)

    ACTIVE = object()  # serve the active adapters, without a route

    def _check(self, spec, seq: int) -> None:
        batch = ids(4, seq=seq)  # 12 rows: the masked LoRA path; 80: segmented (with two LoRAs or more)
        call = run if spec is not self.ACTIVE else (lambda model, batch, _: run_active(model, batch))
        served = call(self.model, batch, spec)
        torch.testing.assert_close(served, call(copy.deepcopy(self.model), batch, spec), rtol=0, atol=0)


CachedServingMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
test_cached_serving_state_machine = CachedServingMachine.TestCase
