"""CUDA-graphed serving (issue 7): one captured forward serves every mix of resident adapters.

A CUDA graph replays kernels with the arguments they had at capture: whatever the host chose then (which
adapter's tensor, which path, how many rows) is frozen. On the CPU, ``ReplayCheck`` stands in for the graph: its
replay runs the forward again and fails unless that run makes the same torch ops and Triton launches, with the same
sizes and scalars, on the same pre-existing tensors (adapter weights, cached copies, route tensors) as the capture
did. A forward whose launches depended on the rows would pass the eager comparison and fail here. The CUDA tier
replays real graphs.

Tolerances: 1e-5 absolute (fp32, hidden 32, O(1) values): the graph's launch fuses every resident adapter where the
eager route fuses the used ones, so row blocks and rank tiles differ by a few ulp per op through 2 layers.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForSequenceClassification, BertModel

import adapter_engine as ae
from adapter_engine.kernels import _backend, lora_inputs
from adapter_engine.serving import GraphedServer
from adapter_engine.stacking import StackedAdapterModel

ATOL = 1e-5
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)


# ------------------------------------------------------------------------------------------------ the stand-in
def _record(forward) -> tuple[list, object]:
    """(the work of one ``forward()`` call, its output): every torch op and every Triton launch with its sizes,
    scalars and, for a tensor made before the call, its address (tensors made during the call are "new")."""
    made: set[int] = set()
    log: list = []

    def describe(value):
        if isinstance(value, torch.Tensor):
            address = value.untyped_storage().data_ptr()
            where = "new" if address in made else address
            return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, where, value.storage_offset())
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return value if isinstance(value, (int, float, bool, str, type(None), torch.dtype)) else type(value).__name__

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            log.append((str(func), describe(args), tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
            out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    made.add(t.untyped_storage().data_ptr())
            return out

    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log.append(
            ("triton", self.fn.__name__, describe(args), tuple(sorted((k, describe(v)) for k, v in kwargs.items())))
        )
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        with _backend.capture_on_cpu(), Ops():
            output = forward()
    finally:
        InterpretedFunction.run = launch
    return log, output


class ReplayCheck:
    """A CPU stand-in for ``cuda_graph_capture``: replaying checks that the forward does the captured work."""

    def __call__(self, forward, warmup):
        for _ in range(warmup):
            forward()
        work, output = _record(forward)
        self.work = work

        def replay() -> None:
            again, result = _record(forward)
            first = next((i for i, (a, b) in enumerate(zip(work, again, strict=False)) if a != b), None)
            assert len(again) == len(work) and first is None, (
                f"the replay does other work than the capture (step {first}: {work[first] if first is not None else ''}"
                f" vs {again[first] if first is not None else ''}; {len(work)} vs {len(again)} steps)"
            )
            for dst, src in zip(pytree.tree_leaves(output), pytree.tree_leaves(result), strict=True):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)

        return replay, output


def test_the_stand_in_fails_a_forward_that_chooses_on_the_host():
    weights = [torch.randn(4, 4), torch.randn(4, 4)]
    choice = [0]
    replay, _ = ReplayCheck()(lambda: torch.ones(2, 4) @ weights[choice[0]], 0)
    replay()  # the same tensor: the same work
    choice[0] = 1
    with pytest.raises(AssertionError, match="other work than the capture"):
        replay()


# ------------------------------------------------------------------------------------------------ models
@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_" in name or ".adapters." in name:
            p.normal_(0.0, 0.2)


def adapted_bert() -> BertModel:
    """Bottleneck adapters a, b, c (one structure), LoRAs l (query, value; r 2), m (query, key; r 3), k (value; r 4)."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**_BERT)).eval()
    for name in ("a", "b", "c"):
        ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "l", ae.LoraConfig(r=2, lora_alpha=4))
    ae.add_adapter(model, "m", ae.LoraConfig(r=3, lora_alpha=3, target_modules=["query", "key"]))
    ae.add_adapter(model, "k", ae.LoraConfig(r=4, lora_alpha=8, target_modules=["value"]))
    _randomise(model)
    return model


CHOICES = [None, "a", "l", "m", "k", ae.Stack("a", "b"), ae.Stack("l", "a"), ae.Stack("b", "m"), ae.Stack("k", "c")]


def ids(batch: int, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def eager(model, spec, batch) -> torch.Tensor:
    with ae.use_adapters(spec), torch.no_grad():
        return model(input_ids=batch).last_hidden_state


def routes(n: int, batch: int, seed: int = 0) -> list[list]:
    """``n`` random per-row routes, each with a stack of 2 in some row (the same depth: one graph)."""
    rng = random.Random(seed)
    return [[*(rng.choice(CHOICES) for _ in range(batch - 1)), ae.Stack("a", "c")] for _ in range(n)]


# ------------------------------------------------------------------------------------------------ tests
def test_one_graph_serves_every_mix_of_the_resident_adapters():
    model = adapted_bert()
    check = ReplayCheck()
    server = GraphedServer(model, capture=check)
    for i, spec in enumerate(routes(5, batch=6)):
        batch = ids(6, seed=i)
        out = server(spec, input_ids=batch).last_hidden_state
        torch.testing.assert_close(out, eager(model, spec, batch), atol=ATOL, rtol=0)
    assert (server.stats.captures, server.stats.replays) == (1, 5)
    # rows are grouped once per ids tensor (one per set of LoRAs a layer holds: query, key, value), not per layer
    (graph,) = server._graphs.values()
    lora_ids = [key for key in graph.route._tensors if key[0] == "lora"]
    assert sum(str(step[0]).startswith("aten.sort") for step in check.work) == len(lora_ids) == 3


def test_uniform_and_base_only_routes():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    batch = ids(3)
    for spec in (ae.Stack("a", "b"), "l", ae.Stack("l", "b"), None):
        out = server(spec, input_ids=batch).last_hidden_state
        torch.testing.assert_close(out, eager(model, spec, batch), atol=ATOL, rtol=0)
    assert server.stats.captures == 3  # depth 2, 1, 2 (a replay), 0


def test_outputs_are_copies_unless_asked_otherwise():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    first = server(["a", "l"], input_ids=ids(2)).last_hidden_state
    kept = first.clone()
    server(["m", None], input_ids=ids(2, seed=3))
    assert torch.equal(first, kept)
    shared = GraphedServer(model, capture=ReplayCheck(), copy_outputs=False)
    out = shared(["a", "l"], input_ids=ids(2)).last_hidden_state
    again = shared(["m", None], input_ids=ids(2, seed=3)).last_hidden_state
    assert out is again  # the graph's own tensor, rewritten by the next call


def test_layouts_and_depths_get_their_own_graphs():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    calls = [(["a", "l"], 5), (["a", ae.Stack("a", "b", "c")], 5), (["a", "l"], 7), (["m", "b"], 5)]
    for spec, seq in calls:
        batch = ids(2, seq=seq)
        out = server(spec, input_ids=batch).last_hidden_state
        torch.testing.assert_close(out, eager(model, spec, batch), atol=ATOL, rtol=0)
    assert (server.stats.captures, server.stats.replays) == (3, 4)  # depth 1 / seq 5 replayed by the last call


def test_an_adapter_change_captures_again():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    batch = ids(3)
    server(["a", "l", None], input_ids=batch)
    ae.add_adapter(model, "n", ae.LoraConfig(r=5, lora_alpha=5, target_modules=["query"]))
    _randomise(model)
    for spec in (["n", "l", "a"], ["b", "n", "n"]):
        out = server(spec, input_ids=batch).last_hidden_state
        torch.testing.assert_close(out, eager(model, spec, batch), atol=ATOL, rtol=0)
    ae.merge_adapter(model, "k")
    out = server(["a", "l", None], input_ids=batch).last_hidden_state
    torch.testing.assert_close(out, eager(model, ["a", "l", None], batch), atol=ATOL, rtol=0)
    assert (server.stats.captures, server.stats.invalidations) == (3, 2)


def test_a_conversion_in_place_captures_again():
    """``model.half()`` gives every weight new storage at a new address: a graph captured before would read the
    old, freed addresses, so the server captures again."""
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    batch, spec = ids(3), ["a", "l", ae.Stack("b", "c")]
    server(spec, input_ids=batch)
    model.half()
    out = server(spec, input_ids=batch).last_hidden_state
    assert out.dtype == torch.float16
    # (fp16: the static route stacks every resident LoRA, the eager call the used ones: other rounding)
    torch.testing.assert_close(out, eager(model, spec, batch), atol=2e-3, rtol=1e-2)
    assert (server.stats.captures, server.stats.invalidations) == (2, 1)


def test_fp32_master_loras_of_an_fp16_model_are_served_from_graphs():
    """LoRAs of an fp16 model keep fp32 master weights (``add_adapter``'s default, as PEFT's): the graph serves them
    from their 16-bit copies made outside the capture, with the eager route's outputs."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**_BERT)).eval().half()
    ae.add_adapter(model, "a", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    ae.add_adapter(model, "l", ae.LoraConfig(r=2, lora_alpha=4))
    ae.add_adapter(model, "m", ae.LoraConfig(r=3, lora_alpha=3, target_modules=["query", "key"]))
    _randomise(model)
    assert model.encoder.layer[0].attention.self.query.lora_A["l"].weight.dtype == torch.float32
    server = GraphedServer(model, capture=ReplayCheck())
    for i, spec in enumerate((["l", "m", None], ["m", ae.Stack("l", "a"), "l"], "l", "m")):
        batch = ids(3, seed=i)
        out = server(spec, input_ids=batch).last_hidden_state
        assert out.dtype == torch.float16
        # (fp16: the static route stacks every resident LoRA, the eager call the used ones: other rounding)
        torch.testing.assert_close(out, eager(model, spec, batch), atol=2e-3, rtol=1e-2)
    assert (server.stats.captures, server.stats.replays) == (2, 4)  # bottleneck depths 0 and 1: one graph each


def test_fp32_master_bottlenecks_of_an_fp16_model_are_served_from_graphs_as_their_fp16_casts():
    """Bottleneck adapters of an fp16 model keep fp32 master weights (``add_adapter``'s default): the graph serves
    them from the pack of their fp16 casts made outside the capture, bit for bit as the model whose adapters are those
    casts is served by its own graph."""
    servers = []
    for autocast in (True, False):
        torch.manual_seed(0)
        model = BertModel(BertConfig(**_BERT)).eval().half()
        for name in ("a", "b"):
            ae.add_adapter(model, name, ae.BottleneckConfig.seq_bn(reduction_factor=4), autocast_adapter_dtype=autocast)
        torch.manual_seed(1)
        _randomise(model)
        servers.append(GraphedServer(model, capture=ReplayCheck()))
    assert {p.dtype for n, p in servers[0].model.named_parameters() if ".adapters." in n} == {torch.float32}
    for i, spec in enumerate((["a", ae.Stack("a", "b"), None], ["b", "a", ae.Stack("b", "a")])):
        batch = ids(3, seed=i)
        masters, halves = (server(spec, input_ids=batch).last_hidden_state for server in servers)
        assert masters.dtype == torch.float16 and torch.equal(masters, halves), spec
    assert [(s.stats.captures, s.stats.replays) for s in servers] == [(1, 2)] * 2


def test_rows_a_static_route_cannot_express_are_refused_and_change_nothing():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    batch = ids(2)
    server(["a", ae.Stack("b", "l")], input_ids=batch)
    with pytest.raises(ValueError, match="stacks LoRAs"):  # l and m both on query
        server(["a", ae.Stack("l", "m")], input_ids=batch)
    with pytest.raises(KeyError, match="not loaded"):
        server(["a", "nope"], input_ids=batch)
    with pytest.raises(ValueError, match="2 row stacks but the inputs have a batch of 3"):
        server(["a", "b"], input_ids=ids(3))
    with pytest.raises(ValueError, match="at least one row"):
        server("a", input_ids=ids(0))
    with pytest.raises(TypeError, match="must be hashable"):
        server(["a", "b"], input_ids=batch, output_attentions=[True])
    spec = [ae.Stack("c", "l"), "m"]  # after the refusals, the same graph still follows its route
    out = server(spec, input_ids=batch).last_hidden_state
    torch.testing.assert_close(out, eager(model, spec, batch), atol=ATOL, rtol=0)
    assert server.stats.captures == 1

    ia3 = adapted_bert()
    ae.add_adapter(ia3, "i", ae.IA3Config())
    server = GraphedServer(ia3, capture=ReplayCheck())
    with pytest.raises(ValueError, match="IA3"):
        server(["a", "i"], input_ids=batch)


def test_cached_copies_the_graph_reads_outlive_their_cache_entries():
    model = adapted_bert()
    server = GraphedServer(model, capture=ReplayCheck())
    spec = ["a", "l", "m", "k"]
    server(spec, input_ids=ids(4))
    from adapter_engine.lora import LoraLinear

    mine = {id(p) for p in model.parameters()}
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and m._stacked is not None]
    stacks = [layer._stacked[0] for layer in layers]
    copies = [weakref.ref(t) for s in stacks for t in (s.A, s.B) if id(t) not in mine]
    assert len(copies) >= 4  # stacked A and B of query and value (the layers with several LoRAs)
    del stacks
    for layer in layers:
        layer._stacked = None  # as an adapter change drops them
    gc.collect()
    assert all(ref() is not None for ref in copies)
    server.reset()
    gc.collect()
    assert all(ref() is None for ref in copies)


def test_a_capture_reads_cached_stacked_factors_and_stores_none():
    """Stacked LoRA factors made inside a capture are only filled when the graph replays: they must never reach
    the cache that later eager calls read. Cached ones are read, and kept alive with the capture."""
    As, Bs = [torch.randn(2, 8), torch.randn(3, 8)], [torch.randn(5, 2), torch.randn(5, 3)]
    mine = lambda: [e for e in lora_inputs._STACKS.values() if all(r() is t for r, t in zip(e[0], (*As, *Bs)))]  # noqa: E731
    with _backend.capture_on_cpu():
        made = lora_inputs._stack_cached(As, Bs)
    assert not mine()
    cached = lora_inputs._stack_cached(As, Bs)
    assert len(mine()) == 1
    with _backend.capture_on_cpu(), _backend.keeping_alive() as kept:
        again = lora_inputs._stack_cached(As, Bs)
    assert again[0] is cached[0] and any(isinstance(k, tuple) and k[0] is cached[0] for k in kept)
    assert torch.equal(made[0], cached[0]) and torch.equal(made[1], cached[1])


def test_a_capture_reads_cached_fp32_master_casts_and_stores_none():
    """The 16-bit copies of fp32 master factors made inside a capture are only filled when the graph replays: they
    must never reach the cache that later eager calls read. Cached ones are read, and kept alive with the capture."""
    x = torch.randn(2, 8).half()
    As, Bs = [torch.randn(2, 8)], [torch.randn(5, 2)]
    key = tuple(map(id, (*As, *Bs)))
    with torch.no_grad():
        with _backend.capture_on_cpu():
            made = lora_inputs._compute_factors(x, As, Bs)
        assert key not in lora_inputs._CASTS
        cached = lora_inputs._compute_factors(x, As, Bs)
        assert key in lora_inputs._CASTS
        with _backend.capture_on_cpu(), _backend.keeping_alive() as kept:
            again = lora_inputs._compute_factors(x, As, Bs)
    assert again[0][0] is cached[0][0] and any(isinstance(k, tuple) and k[0][0] is cached[0][0] for k in kept)
    assert torch.equal(made[0][0], cached[0][0]) and torch.equal(made[1][0], cached[1][0])


def test_a_capture_reads_cached_bottleneck_packs_and_stores_none():
    from adapter_engine.routing import is_routed_layer

    model = adapted_bert()
    layers = [m for m in model.modules() if is_routed_layer(m)]
    spec = ["a", ae.Stack("b", "c")]
    with torch.no_grad():
        with _backend.capture_on_cpu():
            made = eager(model, spec, ids(2))
        assert layers and not any(layer._packs for layer in layers)
        cached = eager(model, spec, ids(2))
        packs = [pack for layer in layers for pack in layer._packs.values()]
        assert len(packs) == len(layers)
        with _backend.capture_on_cpu(), _backend.keeping_alive() as kept:
            again = eager(model, spec, ids(2))
    assert all(any(pack is k for k in kept) for pack in packs)
    assert torch.equal(made, cached) and torch.equal(again, cached)


def test_a_stacked_model_with_a_memory_cap(tmp_path):
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**_BERT, num_labels=3)).eval()
    store = ae.AdapterStore(tmp_path / "store", create=True)
    donor = StackedAdapterModel(BertForSequenceClassification(BertConfig(**_BERT, num_labels=3)))
    for lang in ("fr", "de", "it"):
        donor.add_adapter(lang, ae.LoraConfig(r=2), level=False)
        _randomise(donor.model)
        store.save(donor.model, lang)
    sam = StackedAdapterModel(base, store=store, max_active=4)
    for level in ("general", "cardio"):
        sam.add_adapter(level, ae.BottleneckConfig.seq_bn(reduction_factor=4))
    _randomise(sam.model)
    server = GraphedServer.for_stacked(sam, capture=ReplayCheck())
    batch = ids(3)
    for spec in (["cardio", "fr", None], ["general", "de", "cardio"], ["it", "fr", "cardio"]):
        out = server(spec, input_ids=batch).logits
        with torch.no_grad():
            torch.testing.assert_close(out, sam(input_ids=batch, adapter=spec).logits, atol=ATOL, rtol=0)
    assert server.stats.captures >= 2 and sam.memory.stats().evictions >= 1  # a load or an eviction recaptures


def test_a_stacked_model_given_as_the_model_is_refused_naming_for_stacked():
    """``GraphedServer(sam)`` (the README names ``GraphedServer.for_stacked(sam)`` or a patched model) was taken: its
    levels would route without the levels below them, and its every call said the adapters "are not loaded into the
    model; known: []"."""
    sam = StackedAdapterModel(BertForSequenceClassification(BertConfig(**_BERT, num_labels=3)))
    sam.add_adapter("gs_level", ae.BottleneckConfig.seq_bn(reduction_factor=4))
    with pytest.raises(TypeError, match=r"for a StackedAdapterModel use GraphedServer.for_stacked\(sam\)"):
        GraphedServer(sam, capture=ReplayCheck())
    assert GraphedServer.for_stacked(sam, capture=ReplayCheck())("gs_level", input_ids=ids(2)).logits.shape == (2, 3)


def test_cpu_inputs_need_a_capture_stand_in():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA inputs"):
        GraphedServer(adapted_bert())(["a"], input_ids=ids(1))


@pytest.mark.cuda
@pytest.mark.parametrize("copy_outputs", [True, False])
def test_cuda_graphs_of_several_layouts_share_one_pool_and_replay_in_any_order(copy_outputs):
    """Graphs of three layouts (two batch sizes, two depths) captured into the server's one memory pool, then
    replayed in an order unlike their captures': each call equals the eager route (fp32) and, with
    ``copy_outputs=False``, its output stays right until the next call."""
    model = adapted_bert().cuda()
    server = GraphedServer(model, copy_outputs=copy_outputs)
    layouts = [(4, "a"), (8, "l"), (4, ae.Stack("a", "b"))]  # (rows, what every row but the last gets)
    order = [0, 1, 2, 2, 0, 1, 1, 2, 0, 2, 1, 0]
    for i, k in enumerate(order):
        rows, entry = layouts[k]
        spec = [*([entry] * (rows - 1)), random.Random(i).choice(["c", "m", None])]
        batch = ids(rows, seed=100 + i).cuda()
        out = server(spec, input_ids=batch).last_hidden_state
        torch.testing.assert_close(out, eager(model, spec, batch), atol=1e-5, rtol=1e-5)
    assert (server.stats.captures, server.stats.replays) == (3, len(order))
    assert server._pool is not None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_follow_the_route(dtype):
    """Real graphs: each replay's error against the fp32 eager route is no larger than the eager route's own in
    ``dtype`` (plus 10% and 1e-5)."""
    reference = adapted_bert().cuda()  # the same weights in fp32 (adapted_bert seeds itself)
    model = adapted_bert().to("cuda", dtype)
    server = GraphedServer(model)
    for i, spec in enumerate(routes(4, batch=8, seed=1)):
        batch = ids(8, seed=i).cuda()
        want = eager(reference, spec, batch)
        served = (server(spec, input_ids=batch).last_hidden_state.float() - want).abs().max().item()
        own = (eager(model, spec, batch).float() - want).abs().max().item()
        assert served <= 1.1 * own + 1e-5, (spec, served, own)
    assert (server.stats.captures, server.stats.replays) == (1, 4)


@pytest.mark.cuda
def test_cuda_graph_replays_of_fp32_lora_masters_on_a_bf16_model_equal_their_bf16_casts():
    """PEFT's default precision on real graphs: a bf16 model whose LoRA weights are fp32 masters (holding bf16
    values) serves every route bit for bit as the model whose LoRA weights are those bf16 values, eagerly and
    replayed; the casts are made once, outside the graphs' captures."""
    casts = adapted_bert().to("cuda", torch.bfloat16)
    masters = adapted_bert().to("cuda", torch.bfloat16)
    with torch.no_grad():
        for name, p in masters.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    assert {p.dtype for n, p in masters.named_parameters() if "lora_" in n} == {torch.float32}
    servers = GraphedServer(masters), GraphedServer(casts)
    for i, spec in enumerate(routes(4, batch=8, seed=2)):
        batch = ids(8, seed=i).cuda()
        assert torch.equal(eager(masters, spec, batch), eager(casts, spec, batch)), spec
        got, want = (server(spec, input_ids=batch).last_hidden_state for server in servers)
        assert torch.equal(got, want), spec
    assert servers[0].stats.captures == 1 and servers[0].stats.replays == 4
