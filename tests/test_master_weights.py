"""fp32 master weights of LoRA / IA3 adapters on float16 / bfloat16 models (PEFT's ``autocast_adapter_dtype=True``).

PEFT keeps the adapters of a 16-bit model in fp32 by default, so that an optimizer step is not rounded to 8 or 11
bits. The engine does the same (``add_adapter`` / ``load_adapter``, same default), and the fused op computes with
fp32 factors of a 16-bit ``x`` in ``x``'s dtype, as autocast does for fp32 weights: its outputs equal those of the
factors cast to 16 bits, bit for bit, and their gradients arrive in fp32. A patched PEFT model with fp32 adapters
therefore runs fused (it used to fall back to PEFT's own forward).

CPU tier: fp16 where a model computes (the interpreter's bf16 arithmetic is wrong); the op's bit-for-bit identities
hold for bf16 too, since both sides run the same kernel on the same 16-bit operands.
"""

from __future__ import annotations

import copy
import gc
import importlib
import weakref

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import adapter_engine as ae
from adapter_engine.kernels import lora_linear, lora_linear_reference
from adapter_engine.kernels.lora_linear import stack_loras

li = importlib.import_module("adapter_engine.kernels.lora_inputs")
HALF = [torch.float16, torch.bfloat16]


def _operands(dtype, ranks=(4, 3), lead=(3, 5), K=24, N=19):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    x = rand(*lead, K).to(dtype).requires_grad_()
    w = (rand(N, K, scale=K**-0.5)).to(dtype)
    b = rand(N).to(dtype)
    As = [rand(r, K, scale=K**-0.5).requires_grad_() for r in ranks]  # fp32 masters
    Bs = [rand(N, r, scale=r**-0.5).requires_grad_() for r in ranks]
    return x, w, b, As, Bs


def _cast(ts, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("path", ["auto", "fused", "epilogue", "addmm", "segmented"])
def test_fp32_master_factors_compute_as_their_16bit_casts_forward_and_backward(dtype, path):
    """Outputs equal the 16-bit casts' bit for bit; each master's gradient is the cast's gradient in fp32 (the
    autograd of the cast); x's gradient is unchanged. With ids (a mixed batch) and without, and with a master and a
    16-bit factor in one call."""
    x, w, b, As, Bs = _operands(dtype)
    ids = torch.tensor([0, -1, 1], dtype=torch.int32)
    kw = dict(adapter_ids=ids) if path == "segmented" else {}
    As[1] = As[1].detach().to(dtype).requires_grad_()  # adapter 1's A is already 16-bit: only fp32 ones are cast
    cA, cB = _cast(As, dtype), _cast(Bs, dtype)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 5, 19).to(dtype)

    y = lora_linear(x, w, As, Bs, [0.5, 2.0], b, path=path, **kw)
    y_cast = lora_linear(x2, w, cA, cB, [0.5, 2.0], b, path=path, **kw)
    assert y.dtype == dtype and torch.equal(y, y_cast)
    (y * dy).sum().backward()
    (y_cast * dy).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    for master, cast in zip([*As, *Bs], [*cA, *cB], strict=True):
        assert master.grad.dtype == master.dtype
        assert torch.equal(master.grad, cast.grad.to(master.dtype))
    with torch.no_grad():  # inference: the cached casts give the same outputs
        assert torch.equal(lora_linear(x, w, As, Bs, [0.5, 2.0], b, path=path, **kw), y_cast)
    # the twin takes the same arguments, with the same meaning: torch's eager order on the 16-bit casts
    ref = lora_linear_reference(x.detach(), w, [a.detach() for a in As], [t.detach() for t in Bs], [0.5, 2.0], b, **kw)
    ref_cast = lora_linear_reference(x.detach(), w, [a.detach() for a in cA], [t.detach() for t in cB], [0.5, 2.0], b,
                                     **kw)  # fmt: skip
    assert ref.dtype == dtype and torch.equal(ref, ref_cast)
    tol = 2e-3 if dtype == torch.float16 else 2e-2  # (one rounding of u and y each, in the dtype)
    torch.testing.assert_close(y_cast, ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_cached_casts_are_normal_tensors_made_for_any_call_that_wants_no_master_gradient():
    """Casts first made under inference_mode are normal tensors (a later call's caches read their versions: as
    inference tensors, _stack_cached concatenated again at every call). Frozen masters are cached under grad mode
    too (training a level above frozen fp32 ones cast them at every call)."""
    x, w, b, As, Bs = _operands(torch.float16)
    x = x.detach()
    factors = [*As, *Bs]
    for t in factors:
        t.requires_grad_(False)
    key = tuple(map(id, factors))
    with torch.inference_mode():
        lora_linear(x.clone(), w, As, Bs, [0.5, 2.0], b)
    casts = li._CASTS[key][-1]
    assert not any(t.is_inference() for t in (*casts[0], *casts[1]))
    with torch.no_grad():
        lora_linear(x, w, As, Bs, [0.5, 2.0], b)
    assert li._CASTS[key][-1] is casts  # (a hit)
    assert any(all(r() is t for r, t in zip(e[0], (*casts[0], *casts[1]), strict=True)) for e in li._STACKS.values())
    li._CASTS.pop(key)
    y = lora_linear(x.requires_grad_(), w, As, Bs, [0.5, 2.0], b)  # grad mode, frozen masters: cached
    assert key in li._CASTS and y.requires_grad


def test_inference_casts_are_cached_until_the_master_changes_and_dropped_with_it():
    """No cast per call in inference: one copy per master, reused while the master is unchanged; an update in place
    (an optimizer step) makes a new one; a freed master leaves nothing behind."""
    x, w, b, (A,), (B,) = _operands(torch.float16, ranks=(4,))
    x = x.detach()
    key = (id(A), id(B))
    with torch.no_grad():
        y0 = lora_linear(x, w, A, B, 0.5, b)
        (a16,), (b16,) = li._CASTS[key][-1]  # (the entry's last item: the factors as the op computes with them)
        assert a16.dtype == b16.dtype == torch.float16
        assert torch.equal(lora_linear(x, w, A, B, 0.5, b), y0)
        assert li._CASTS[key][-1][0][0] is a16 and li._CASTS[key][-1][1][0] is b16
        B.mul_(3.0)  # in place: a new version
        y1 = lora_linear(x, w, A, B, 0.5, b)
        assert li._CASTS[key][-1][1][0] is not b16
        assert torch.equal(y1, lora_linear(x, w, A.half(), B.half(), 0.5, b))
        assert not torch.equal(y0, y1)
    del A
    gc.collect()
    assert key not in li._CASTS


def test_the_cached_casts_of_a_call_mixing_masters_and_16bit_factors_do_not_keep_the_16bit_ones_alive():
    """A 16-bit factor beside fp32 masters is used as given; the cache entry held it (in the result it kept), so an
    adapter deleted from a layer whose other adapter has masters stayed in memory as long as the masters lived. The
    entry now holds it weakly: it is freed, and its entry with it; the cached call still serves the right factors."""
    x, w, b, (A, A16), (B, B16) = _operands(torch.float16, ranks=(4, 3))
    x = x.detach()
    A16, B16 = A16.detach().half(), B16.detach().half()
    with torch.no_grad():
        want = lora_linear(x, w, [A.half(), A16], [B.half(), B16], [0.5, 2.0], b)
        for _ in range(2):  # (a miss, then a hit)
            assert torch.equal(lora_linear(x, w, [A, A16], [B, B16], [0.5, 2.0], b), want)
    key, freed = (id(A), id(A16), id(B), id(B16)), weakref.ref(B16)
    assert key in li._CASTS
    del A16, B16
    gc.collect()
    assert freed() is None and key not in li._CASTS


@pytest.mark.parametrize(
    "x_dtype, w_dtype, a_dtype, culprit",
    [
        (torch.float32, torch.float32, torch.float16, "lora_A\\[0\\] torch.float16"),  # 16-bit factors of fp32 x
        (torch.bfloat16, torch.bfloat16, torch.float16, "lora_A\\[0\\] torch.float16"),  # another 16-bit dtype
        (torch.float16, torch.float32, torch.float32, "weight torch.float32"),  # only the factors may be fp32
        # a 16-bit x reaching an fp32 layer with fp32 factors: every tensor named in its own dtype (the factors were
        # named as the bf16 casts made of them, as if they were the culprits)
        (torch.bfloat16, torch.float32, torch.float32, "weight torch.float32, lora_A\\[0\\] torch.float32, lora_B"),
    ],
)
def test_other_dtype_mixes_are_still_refused_naming_them(x_dtype, w_dtype, a_dtype, culprit):
    x, w = torch.randn(2, 8, dtype=x_dtype), torch.randn(5, 8, dtype=w_dtype)
    A, B = torch.randn(2, 8, dtype=a_dtype), torch.randn(5, 2, dtype=torch.float32)
    for call in (lora_linear, lora_linear_reference):
        with pytest.raises(TypeError, match=f"master weights.*{culprit}"):
            call(x, w, A, B, 1.0)
    with pytest.raises(TypeError, match=f"master weights.*{culprit}"):  # (a served layer's stacked factors)
        stack_loras(x, w, [A], [B], [1.0])


# ------------------------------------------------------------------------------------------------ models
_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)  # fmt: skip
_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama(dtype=torch.float16):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_CFG)).to(dtype).eval()


def _ids():
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def _adapter_weights(model, name):
    return {n: p for n, p in model.named_parameters() if f".{name}" in n and ("lora_" in n or "ia3_" in n)}


def _bn_weights(model, name):
    """The bottleneck adapter weights whose adapter name starts with ``name``."""
    return {n: p for n, p in model.named_parameters() if f".adapters.{name}" in n}


def test_new_lora_and_ia3_adapters_of_a_16bit_model_keep_fp32_masters_unless_told_not_to():
    model = _llama()
    ae.add_adapter(model, "mw_lora", ae.LoraConfig(r=4, target_modules=_TARGETS))
    ae.add_adapter(
        model, "mw_ia3", ae.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    ae.add_adapter(model, "mw_half", ae.LoraConfig(r=4, target_modules=_TARGETS), autocast_adapter_dtype=False)
    ae.add_adapter(model, "mw_bn", "seq_bn")
    for name, want in (("mw_lora", torch.float32), ("mw_ia3", torch.float32), ("mw_half", torch.float16)):
        weights = _adapter_weights(model, name)
        assert weights and {p.dtype for p in weights.values()} == {want}, name
    # bottleneck adapters too (they took the layers' dtype, as AdapterHub's do, and trained in 16 bits)
    ae.add_adapter(model, "mw_bnh", "seq_bn", autocast_adapter_dtype=False)
    for name, want in (("mw_bn", torch.float32), ("mw_bnh", torch.float16)):
        assert {p.dtype for p in _bn_weights(model, f"{name}.").values()} == {want}, name
    # transformers' methods on a patched model give the layers' dtype, as transformers' own do
    model.add_adapter(ae.LoraConfig(r=2, target_modules=_TARGETS), adapter_name="mw_tfh")
    model.add_adapter("mw_tf32", ae.LoraConfig(r=2, target_modules=_TARGETS), autocast_adapter_dtype=True)
    model.add_adapter("mw_tfbn", "seq_bn")
    model.add_adapter("mw_tfbn32", "seq_bn", autocast_adapter_dtype=True)
    assert {p.dtype for p in _adapter_weights(model, "mw_tfh").values()} == {torch.float16}
    assert {p.dtype for p in _adapter_weights(model, "mw_tf32").values()} == {torch.float32}
    assert {p.dtype for p in _bn_weights(model, "mw_tfbn.").values()} == {torch.float16}
    assert {p.dtype for p in _bn_weights(model, "mw_tfbn32").values()} == {torch.float32}
    fp32 = _llama(torch.float32)
    ae.add_adapter(fp32, "mw_lora", ae.LoraConfig(r=4, target_modules=_TARGETS))
    assert {p.dtype for p in _adapter_weights(fp32, "mw_lora").values()} == {torch.float32}


def test_a_model_with_fp32_lora_masters_computes_as_with_their_16bit_casts_and_trains_them_in_fp32():
    """Forward: bit for bit the model whose adapter is the masters cast to fp16 (every fused path, alone, stacked
    with another LoRA and in a mixed batch). One training step: fp32 gradients equal the cast model's, and they
    reach the masters unrounded."""
    ids = _ids()
    masters, halves = _llama(), _llama()
    for model, autocast in ((masters, True), (halves, False)):
        for name, r in (("mw_a", 4), ("mw_b", 2)):
            cfg = ae.LoraConfig(r=r, target_modules=_TARGETS, init_lora_weights=False)
            ae.add_adapter(model, name, cfg, autocast_adapter_dtype=autocast)
    with torch.no_grad():
        for n, p in _adapter_weights(halves, "mw_").items():
            p.copy_(masters.get_parameter(n))
    with torch.no_grad():  # (a row whose stack has two LoRAs adds the second's term after the fused call)
        for spec in (
            "mw_a",
            ae.Stack("mw_a", "mw_b"),
            ["mw_a", None, "mw_b"],
            [ae.Stack("mw_a", "mw_b"), "mw_a", None],
        ):
            with ae.use_adapters(spec):
                assert torch.equal(masters(input_ids=ids).logits, halves(input_ids=ids).logits), spec
    grads = {}
    for model in (masters, halves):
        ae.set_active_adapters(model, "mw_a")
        ae.train_adapter(model, "mw_a")
        model(input_ids=ids, labels=ids).loss.backward()
        grads[model is masters] = {n: p.grad for n, p in _adapter_weights(model, "mw_a").items()}
    assert grads[True] and all(g.dtype == torch.float32 for g in grads[True].values())
    for n, g in grads[True].items():
        assert torch.equal(g, grads[False][n].float()), n
    p = next(iter(_adapter_weights(masters, "mw_a").values()))
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(p.grad, alpha=-1e-7)  # a step below fp16's resolution of the weights
    assert not torch.equal(p, before) and torch.equal(p.half(), before.half())
    for model in (masters, halves):  # training with dropout: the second adapter's term is added after the fused call
        for layer in model.modules():
            if hasattr(layer, "lora_dropout"):
                layer.lora_dropout["mw_a"] = 0.3
        model.train()
    outs = []
    for model in (masters, halves):
        torch.manual_seed(5)  # (the same dropout masks)
        with ae.use_adapters(ae.Stack("mw_a", "mw_b")):
            outs.append(model(input_ids=ids).logits)
    assert torch.equal(*outs)


def test_peft_adapters_of_a_16bit_model_are_fp32_and_a_patched_peft_model_runs_them_fused(monkeypatch, tmp_path):
    """PEFT's default: fp32 LoRA / IA3 weights on an fp16 model. Loaded into the engine they stay fp32, exactly; the
    engine's outputs are PEFT's within fp16 rounding. A patched PeftModel with them runs the fused op (it fell back to
    PEFT's own forward), with PEFT's outputs and gradients within the same rounding."""
    peft = pytest.importorskip("peft")
    import adapter_engine.lora as lora_mod

    ids = _ids()
    for cfg in (
        peft.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False),
        peft.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    ):
        pm = peft.get_peft_model(_llama(), cfg).eval()
        saved = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n or "ia3_" in n}
        assert saved and {p.dtype for p in saved.values()} == {torch.float32}
        with torch.no_grad():
            want = pm(input_ids=ids).logits
        pm.save_pretrained(tmp_path / type(cfg).__name__)
        model = _llama()
        ae.load_adapter(model, tmp_path / type(cfg).__name__, name="mw_peft", set_active=True)
        loaded = _adapter_weights(model, "mw_peft")
        assert len(loaded) == len(saved) and {p.dtype for p in loaded.values()} == {torch.float32}
        assert sorted(t.sum().item() for t in loaded.values()) == sorted(t.sum().item() for t in saved.values())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=3e-3, rtol=0)

    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False))
    pm.train()
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    calls = []
    real = lora_mod.lora_linear
    monkeypatch.setattr(lora_mod, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ae.patch(pm)
    got = pm(input_ids=ids, labels=ids).loss
    assert len(calls) == 2 * len(_TARGETS)  # every LoRA layer of both blocks: fused
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    got.backward()
    for n, g in want_grads.items():
        grad = pm.get_parameter(n).grad
        assert grad.dtype == torch.float32
        # relative to each gradient's size: q_proj's are about 2e-3 at most (measured errors: below 3e-3 of that)
        torch.testing.assert_close(grad, g, atol=1e-2 * g.abs().max().item(), rtol=2e-2, msg=n)


def test_save_load_snapshot_and_store_keep_or_choose_the_adapter_dtype(tmp_path):
    """save_adapter writes the masters in fp32 (as PEFT saves them); load_adapter keeps them exactly, or rounds them
    to the layers' dtype with autocast_adapter_dtype=False; a snapshot put back keeps its dtype; the store (serving
    under a memory manager, which counts adapters in the model's dtype) loads in the model's dtype."""
    from safetensors.torch import load_file

    model = _llama()
    ae.add_adapter(model, "mw_s", ae.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False))
    masters = {n.replace("mw_s", "X"): p.detach().clone() for n, p in _adapter_weights(model, "mw_s").items()}
    ae.save_adapter(model, "mw_s", tmp_path / "mw_s")
    assert {t.dtype for t in load_file(tmp_path / "mw_s" / "adapter_model.safetensors").values()} == {torch.float32}
    for autocast, dtype in ((True, torch.float32), (False, torch.float16)):
        other = _llama()
        ae.load_adapter(other, tmp_path / "mw_s", name="mw_l", autocast_adapter_dtype=autocast)
        for n, p in _adapter_weights(other, "mw_l").items():
            assert p.dtype == dtype and torch.equal(p, masters[n.replace("mw_l", "X")].to(dtype)), n
    snap = ae.api.snapshot_adapter(model, "mw_s")
    ae.delete_adapter(model, "mw_s")
    ae.api.restore_adapter(model, "mw_s", snap)
    for n, p in _adapter_weights(model, "mw_s").items():
        assert p.dtype == torch.float32 and torch.equal(p, masters[n.replace("mw_s", "X")]), n
    store = ae.AdapterStore(tmp_path)
    served = _llama()
    store.load_into(served, "mw_s")
    assert {p.dtype for p in _adapter_weights(served, "mw_s").values()} == {torch.float16}


def test_merging_fp32_masters_into_a_16bit_model_rounds_once():
    """merge_adapter folds fp32 factors into fp16 weights in fp32 (one rounding per element): the merged weight is
    ``(W + s B A)`` computed in fp32 and rounded once, within one fp16 ulp of the fp64 value."""
    model = _llama()
    ae.add_adapter(model, "mw_m", ae.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    A, B, W = layer.lora_A["mw_m"].weight.detach().double(), layer.lora_B["mw_m"].weight.detach().double(), layer.weight
    exact = W.detach().double() + 2.0 * B @ A
    ae.merge_adapter(model, "mw_m")
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2**-14)
    assert W.dtype == torch.float16 and ((W.double() - exact).abs() <= ulp).all()


def test_torch_compile_of_a_16bit_model_with_fp32_masters_is_one_graph_computing_as_the_16bit_casts():
    """A patched fp16 model with fp32 masters (and a 16-bit adapter beside them) compiles to one graph
    (``fullgraph=True``: the op's dtype check of the factors used C-level maps dynamo cannot trace, so it failed,
    and broke the graph at every LoRA layer without fullgraph); it computes as the model with the masters cast to
    fp16, uncompiled, and its gradients reach the masters in fp32."""
    ids = _ids()
    masters, halves = _llama(), _llama()
    for model, autocast in ((masters, True), (halves, False)):
        cfg = ae.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False)
        ae.add_adapter(model, "mw_c", cfg, autocast_adapter_dtype=autocast)
        ae.add_adapter(model, "mw_h", cfg, autocast_adapter_dtype=False)
        ae.set_active_adapters(model, ["mw_c", "mw_h"])
    with torch.no_grad():
        for n, p in _adapter_weights(halves, "mw_").items():
            p.copy_(masters.get_parameter(n))
    torch._dynamo.reset()
    compiled = torch.compile(masters, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, halves(input_ids=ids).logits)
    for model in (compiled, halves):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = _adapter_weights(masters, "mw_c")
    assert grads and all(p.grad.dtype == torch.float32 for p in grads.values())
    for n, p in grads.items():
        assert torch.equal(p.grad, halves.get_parameter(n).grad.float()), n


def test_a_saved_adapter_with_fp32_masters_is_kept_on_the_host_not_dropped_and_reloaded_rounded(tmp_path):
    """offload="drop" drops an adapter saved to the store, to reload it from there; but the store loads in the
    layers' dtype, so fp32 masters came back as fp16, their training below fp16 resolution lost (and counted at
    half their bytes). They are kept on the host and come back as they were; a 16-bit adapter is still dropped."""
    model = _llama()
    store = ae.AdapterStore(tmp_path)
    ae.add_adapter(model, "mw_a", ae.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False))
    ae.add_adapter(model, "mw_b", ae.LoraConfig(r=4, target_modules=_TARGETS), autocast_adapter_dtype=False)
    memory = ae.AdapterMemoryManager(model, store, max_active=1, offload="drop")
    with torch.no_grad():
        for p in _adapter_weights(model, "mw_a").values():
            p.add_(1e-5)  # a trained step below fp16's resolution
    for name in ("mw_b", "mw_a"):
        store.save(model, name)
    masters = {n: p.detach().clone() for n, p in _adapter_weights(model, "mw_a").items()}
    size = ae.api.adapter_nbytes(model, "mw_a")
    memory.evict("mw_b")
    assert memory.stats().offloaded == 0  # (16-bit, as the store loads it: dropped)
    with memory.use(["mw_b"]):  # evicts mw_a
        assert memory.stats().offloaded == 1
    with memory.use(["mw_a"]):
        back = _adapter_weights(model, "mw_a")
        assert back.keys() == masters.keys() and all(torch.equal(p, masters[n]) for n, p in back.items())
        assert {p.dtype for p in back.values()} == {torch.float32} and memory.stats().resident_bytes == size


def test_save_model_and_load_model_keep_each_adapters_dtype(tmp_path):
    """load_model rebuilt every LoRA / IA3 adapter of a 16-bit checkpoint with fp32 masters (add_adapter's default),
    also those saved in 16 bits (autocast_adapter_dtype=False, or loaded by a store): twice their memory, and saved
    so from then on. Each comes back in the dtype it was saved in, its weights exactly."""
    model = _llama()
    ae.add_adapter(model, "mw_m", ae.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False))
    ae.add_adapter(model, "mw_h", ae.LoraConfig(r=2, target_modules=_TARGETS), autocast_adapter_dtype=False)
    ae.add_adapter(model, "mw_i", ae.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    ae.add_adapter(
        model, "mw_j", ae.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), autocast_adapter_dtype=False
    )
    saved = _adapter_weights(model, "mw_")
    with torch.no_grad():  # trained-looking values: fresh ones (B = 0, IA3 = 1) would match an adapter left unloaded
        for p in saved.values():
            p.uniform_(0.5, 1.5)
    ae.save_model(model, tmp_path / "ckpt")
    loaded = _adapter_weights(ae.load_model(tmp_path / "ckpt", torch_dtype=torch.float16), "mw_")
    assert loaded.keys() == saved.keys() and {p.dtype for p in saved.values()} == {torch.float16, torch.float32}
    for n, p in loaded.items():
        assert p.dtype == saved[n].dtype and torch.equal(p, saved[n]), n


def test_save_model_and_load_model_keep_the_fp32_masters_of_an_adapter_with_a_trained_head_copy(tmp_path):
    """An adapter with ``modules_to_save`` (the head a ``Trainer`` run trains with it) holds its copy of the head in the
    model's dtype beside its fp32 masters; the manifest's dtype was read from both, so it said 16 bits and
    ``load_model`` (of ``save_model``'s or a ``Trainer.save_model`` folder) brought the masters back rounded to 16 bits
    (and a resumed training trained them so). It is read from the adapter's layers: masters come back as saved."""
    model = _bert()
    for name, cfg in (("mw_hl", ae.LoraConfig(r=4, init_lora_weights=False)), ("mw_hi", ae.IA3Config())):
        cfg.modules_to_save = ["classifier"]
        ae.add_adapter(model, name, cfg)
    saved = _adapter_weights(model, "mw_h")
    with torch.no_grad():  # trained-looking values, not fp16 ones
        for p in saved.values():
            p.uniform_(0.5, 1.5)
    heads = {n: p.detach().clone() for n, p in model.named_parameters() if ".modules_to_save." in n}
    ae.save_model(model, tmp_path / "ckpt")
    back = ae.load_model(tmp_path / "ckpt", torch_dtype=torch.float16)
    loaded = _adapter_weights(back, "mw_h")
    assert loaded.keys() == saved.keys() and {p.dtype for p in saved.values()} == {torch.float32}
    for n, p in loaded.items():
        assert p.dtype == torch.float32 and torch.equal(p, saved[n]), n
    copies = {n: p for n, p in back.named_parameters() if ".modules_to_save." in n}
    assert copies.keys() == heads.keys() and all(torch.equal(p, heads[n]) for n, p in copies.items())
    assert {p.dtype for p in copies.values()} == {torch.float16}


def test_a_saved_stack_comes_back_with_each_adapters_dtype(tmp_path):
    """StackedAdapterModel.load (its adapter folders) loads LoRA adapters as saved: a 16-bit one (from a store, or
    made with autocast_adapter_dtype=False) came back as fp32 masters (load_adapter's default), twice its bytes under
    the stack's byte cap; fp32 masters stay fp32. Their weights come back exactly."""
    donor = _llama()
    ae.add_adapter(donor, "mw_h", ae.LoraConfig(r=2, target_modules=_TARGETS, init_lora_weights=False),
                   autocast_adapter_dtype=False)  # fmt: skip
    ae.save_adapter(donor, "mw_h", tmp_path / "mw_h")
    sam = ae.StackedAdapterModel(_llama(), ("mw_h", tmp_path / "mw_h"))
    sam.add_adapter("mw_m", ae.LoraConfig(r=4, target_modules=_TARGETS, init_lora_weights=False))
    saved = _adapter_weights(sam.model, "mw_")
    assert {n.split(".mw_")[1][0]: p.dtype for n, p in saved.items()} == {"h": torch.float16, "m": torch.float32}
    sam.save(tmp_path / "stack")
    loaded = _adapter_weights(ae.StackedAdapterModel.load(tmp_path / "stack", _llama()).model, "mw_")
    assert loaded.keys() == saved.keys()
    for n, p in loaded.items():
        assert p.dtype == saved[n].dtype and torch.equal(p, saved[n]), n


def test_stacked_ia3_vectors_scale_once_by_their_product_as_peft(tmp_path):
    """Two active IA3 adapters (PEFT's default fp32 vectors on an fp16 model) scale a layer's input or output once, by
    the product of their vectors, as PEFT does: bit for bit PEFT's outputs. They scaled one after the other, rounding
    x (or y) once per vector."""
    peft = pytest.importorskip("peft")
    ids = _ids()
    cfg = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    pm = peft.get_peft_model(_llama(), peft.IA3Config(**cfg), adapter_name="mw_x")
    torch.manual_seed(3)
    pm.add_adapter("mw_y", peft.IA3Config(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.normal_(1.0, 0.3)
    pm.base_model.set_adapter(["mw_x", "mw_y"])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    model = _llama()
    for name in ("mw_x", "mw_y"):
        ae.load_adapter(model, tmp_path / name, name=name)  # (PEFT saves each adapter in a folder of its name)
    with torch.no_grad(), ae.use_adapters(ae.Stack("mw_x", "mw_y")):
        assert torch.equal(model(input_ids=ids).logits, want)


# ------------------------------------------------------------------------------------------------ bottleneck
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3)
_BN = ae.BottleneckConfig.seq_bn(reduction_factor=4)
_BN_OWN_LNS = ae.BottleneckConfig(reduction_factor=4, ln_before=True, ln_after=True, non_linearity="gelu")


def _bert(dtype=torch.float16):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_BERT)).to(dtype).eval()


def _bn_pair(make, cfg, names):
    """Two copies of a 16-bit model with bottleneck adapters ``names``: fp32 masters in the first (``add_adapter``'s
    default), the same random values rounded to 16 bits in the second."""
    masters, halves = make(), make()
    for model, autocast in ((masters, True), (halves, False)):
        for name in names:
            ae.add_adapter(model, name, cfg, autocast_adapter_dtype=autocast)
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in _bn_weights(masters, "mw_").items():
            p.normal_(1.0 if ("norm" in n and n.endswith("weight")) else 0.0, 0.2)  # (LayerNorm weights about 1)
            halves.get_parameter(n).copy_(p)
    assert {p.dtype for p in _bn_weights(masters, "mw_").values()} == {torch.float32}
    return masters, halves


@pytest.mark.parametrize(
    "make, cfg", [(_bert, _BN), (_llama, _BN), (_bert, _BN_OWN_LNS)], ids=["bert", "llama", "own-layer-norms"]
)
def test_bottleneck_masters_compute_as_their_16bit_casts_on_every_path_and_get_fp32_gradients(monkeypatch, make, cfg):
    """A 16-bit model's bottleneck adapters with fp32 masters: bit for bit the model whose adapters are their fp16
    casts, served (the fused stack with its cached pack, rows routed to different stacks, the layers' depth control)
    and training the top of a stack of two (the eager modules, with dropout, and the fused backward): the outputs,
    and fp32 gradients equal to the casts'. The eager modules failed on fp32 weights and 16-bit activations, and the
    fused op computed with fp32 weights; the fused backward, whose pack casts the frozen adapter without autograd,
    computed no gradient for the training one."""
    import adapter_engine.bottleneck as bn
    from adapter_engine.bottleneck_adapter import BottleneckAdapter

    ids = _ids()
    masters, halves = _bn_pair(make, cfg, ("mw_p", "mw_q", "mw_r"))
    pair = (masters, halves)
    with torch.no_grad():
        for spec in (ae.Stack("mw_p", "mw_q"), ["mw_p", ae.Stack("mw_q", "mw_r"), None]):
            with ae.use_adapters(spec):
                assert torch.equal(masters(input_ids=ids).logits, halves(input_ids=ids).logits), spec
        for model in pair:
            ae.set_active_adapters(model, ["mw_p", "mw_q"])
        for depth in (1, None):
            for model in pair:
                for layer in model.modules():
                    if isinstance(layer, bn.BottleneckStackLayer):
                        layer.set_depth(depth)
            assert torch.equal(masters(input_ids=ids).logits, halves(input_ids=ids).logits), depth
    for model in pair:
        ae.train_adapter(model, "mw_q")
        model.train()
    for fused, rate in ((False, 0.0), (False, 0.3), (True, 0.0)):
        monkeypatch.setattr(bn, "TRAIN_FUSED", fused)
        outs, grads = [], []
        for model in pair:
            for module in model.modules():
                if isinstance(module, BottleneckAdapter):
                    module.dropout.p = rate
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)  # (the same dropout masks)
            out = model(input_ids=ids).logits
            out.float().pow(2).mean().backward()
            outs.append(out)
            grads.append({n: p.grad for n, p in _bn_weights(model, "mw_q").items()})
        assert torch.equal(*outs), (fused, rate)
        assert grads[0] and all(g is not None and g.dtype == torch.float32 for g in grads[0].values())
        for n, g in grads[0].items():
            assert torch.equal(g, grads[1][n].float()), (fused, rate, n)


def test_an_fp32_model_served_under_autocast_packs_its_bottleneck_weights_as_they_are():
    """Under bf16 autocast an fp32 model's sublayers output bf16: the fused stack still reads its fp32 weights, as
    before masters (h's dtype is autocast's there, not the layer's); it packed bf16 copies of them, and its outputs
    changed."""
    from adapter_engine.routing import is_routed_layer

    model = _bert(torch.float32)
    for name in ("mw_a", "mw_b"):
        ae.add_adapter(model, name, _BN)
    ae.set_active_adapters(model, ["mw_a", "mw_b"])
    layers = [m for m in model.modules() if is_routed_layer(m)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), ae.use_adapters(ae.Stack("mw_a", "mw_b")):
        out = model(input_ids=_ids()).logits
    packs = [pack for layer in layers for pack in layer._packs.values()]
    assert out.dtype == torch.bfloat16 and packs and {p.wd.dtype for p in packs} == {torch.float32}


def test_training_the_top_of_a_16bit_stack_keeps_its_small_adamw_steps():
    """The top level of a 2-level StackedAdapterModel on a bf16 BERT trains fp32 masters (``sam.add_adapter``'s
    default now): 16 AdamW steps at lr 1e-5 change the bf16 value of most of its weights (84%), where the same run on
    bf16 weights (AdapterHub's, ``autocast_adapter_dtype=False``; every new level before) changes a fifth: the
    zero-initialised biases; each later step of a weight is below half a bf16 unit and is rounded away. (bf16 on the
    CPU: training runs the eager modules, torch only.)"""
    ids = torch.randint(3, 64, (4, 5), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    moved = {}
    for autocast in (True, False):
        sam = ae.StackedAdapterModel(_bert(torch.bfloat16))
        sam.add_adapter("mw_g", _BN)
        if autocast:
            sam.add_adapter("mw_c", _BN)
        else:  # (added through the model, then adopted as the next level)
            ae.add_adapter(sam.model, "mw_c", _BN, autocast_adapter_dtype=False)
            sam.add_adapter("mw_c")
        trained = list(sam.train_adapter("mw_c"))
        params = [sam.model.get_parameter(n) for n in trained]
        assert params and {p.dtype for p in params} == {torch.float32 if autocast else torch.bfloat16}
        start = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5)
        sam.model.train()
        for _ in range(16):
            opt.zero_grad()
            sam(input_ids=ids, labels=labels).loss.backward()
            opt.step()
        changed = sum(int((p.to(torch.bfloat16) != s.to(torch.bfloat16)).sum()) for p, s in zip(params, start))
        moved[autocast] = changed / sum(p.numel() for p in params)
    assert moved[True] > 0.7 and moved[False] < 0.3, moved


def test_bottleneck_masters_save_and_load_exactly(tmp_path):
    """``save_adapter`` (AdapterHub's format) writes bottleneck masters in fp32, their values; ``load_adapter`` keeps
    them (its default and ``None``: as saved) or rounds them to the layers' dtype (``False``); a saved stack comes
    back with each level's dtype and values, and computes as before."""
    model = _bert()
    ae.add_adapter(model, "mw_s", _BN)
    with torch.no_grad():
        for p in _bn_weights(model, "mw_s").values():
            p.normal_(0.0, 0.2)
    masters = {n.replace(".mw_s.", ".X."): p.detach().clone() for n, p in _bn_weights(model, "mw_s").items()}
    ae.save_adapter(model, "mw_s", tmp_path / "mw_s", format="adapterhub")
    saved = torch.load(tmp_path / "mw_s" / "pytorch_adapter.bin", weights_only=True)
    assert len(saved) == len(masters) and {t.dtype for t in saved.values()} == {torch.float32}
    for autocast, dtype in ((True, torch.float32), (None, torch.float32), (False, torch.float16)):
        other = _bert()
        ae.load_adapter(other, tmp_path / "mw_s", name="mw_l", autocast_adapter_dtype=autocast)
        loaded = _bn_weights(other, "mw_l")
        assert len(loaded) == len(masters)
        for n, p in loaded.items():
            assert p.dtype == dtype and torch.equal(p, masters[n.replace(".mw_l.", ".X.")].to(dtype)), (autocast, n)

    sam = ae.StackedAdapterModel(_bert())
    sam.add_adapter("mw_h", tmp_path / "mw_s")  # (a folder: as saved, fp32)
    ae.add_adapter(sam.model, "mw_k", _BN, autocast_adapter_dtype=False)
    sam.add_adapter("mw_k")
    sam.add_adapter("mw_m", _BN)
    before = {n: p.detach().clone() for n, p in _bn_weights(sam.model, "mw_").items()}
    assert {n.split(".adapters.mw_")[1][0]: p.dtype for n, p in before.items()} == {
        "h": torch.float32, "k": torch.float16, "m": torch.float32
    }  # fmt: skip
    sam.save(tmp_path / "stack")
    again = ae.StackedAdapterModel.load(tmp_path / "stack", _bert())
    after = _bn_weights(again.model, "mw_")
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(again(input_ids=_ids()).logits, sam(input_ids=_ids()).logits)


def test_bottleneck_masters_are_counted_at_their_bytes_offloaded_and_restored_as_they_were(tmp_path):
    """A memory manager counts bottleneck masters at their fp32 bytes (twice a 16-bit adapter's). Evicted with
    offload="drop" after a save to the store, they are kept in host memory (the store loads in the model's dtype)
    and come back fp32, their values exactly: they were dropped and came back rounded to fp16 (a trained step below
    its resolution lost), or, kept on the host, were restored in the layers' dtype. A snapshot put back after a
    conversion of the model takes the layers' new dtype."""
    model = _bert()
    store = ae.AdapterStore(tmp_path)
    ae.add_adapter(model, "mw_a", _BN)
    ae.add_adapter(model, "mw_b", _BN, autocast_adapter_dtype=False)
    size = ae.api.adapter_nbytes(model, "mw_a")
    assert size == 2 * ae.api.adapter_nbytes(model, "mw_b")
    memory = ae.AdapterMemoryManager(model, store, max_active=1, offload="drop")
    with torch.no_grad():
        for p in _bn_weights(model, "mw_a.").values():
            p.add_(1e-5)  # a trained step below fp16's resolution
    for name in ("mw_b", "mw_a"):
        store.save(model, name)
    masters = {n: p.detach().clone() for n, p in _bn_weights(model, "mw_a.").items()}
    memory.evict("mw_b")
    assert memory.stats().offloaded == 0  # (16-bit, as the store loads it: dropped)
    with memory.use(["mw_b"]):  # evicts mw_a
        assert memory.stats().offloaded == 1 and memory.stats().resident_bytes == size // 2
    with memory.use(["mw_a"]):
        back = _bn_weights(model, "mw_a.")
        assert back.keys() == masters.keys() and all(torch.equal(p, masters[n]) for n, p in back.items())
        assert {p.dtype for p in back.values()} == {torch.float32} and memory.stats().resident_bytes == size
    served = _bert()
    store.load_into(served, "mw_a")
    assert {p.dtype for p in _bn_weights(served, "mw_a.").values()} == {torch.float16}

    other = _bert()
    ae.add_adapter(other, "mw_c", _BN)
    for convert, dtype in ((other.float, torch.float32), (other.half, torch.float16)):
        snap = ae.api.snapshot_adapter(other, "mw_c")
        ae.delete_adapter(other, "mw_c")
        convert()
        ae.api.restore_adapter(other, "mw_c", snap)
        assert {p.dtype for p in _bn_weights(other, "mw_c.").values()} == {dtype}, dtype


def test_save_model_and_load_model_keep_each_bottleneck_adapters_dtype(tmp_path):
    """load_model rebuilds bottleneck adapters in the dtype they were saved in, their weights exactly: fp32 masters
    came back in the layers' dtype. A manifest of an earlier version, without the dtype, had them all in the layers'
    dtype: they come back so, not as fp32 masters of 16-bit values (twice their memory)."""
    import json

    model = _bert()
    ae.add_adapter(model, "mw_m", _BN)
    ae.add_adapter(model, "mw_h", _BN, autocast_adapter_dtype=False)
    with torch.no_grad():
        for p in _bn_weights(model, "mw_").values():
            p.normal_(0.0, 0.2)
    saved = {n: p.detach().clone() for n, p in _bn_weights(model, "mw_").items()}
    ae.save_model(model, tmp_path / "ckpt")
    loaded = _bn_weights(ae.load_model(tmp_path / "ckpt", torch_dtype=torch.float16), "mw_")
    assert loaded.keys() == saved.keys() and {p.dtype for p in saved.values()} == {torch.float16, torch.float32}
    for n, p in loaded.items():
        assert p.dtype == saved[n].dtype and torch.equal(p, saved[n]), n
    ae.delete_adapter(model, "mw_m")
    ae.save_model(model, tmp_path / "old")
    manifest = tmp_path / "old" / "adapter_engine.json"
    entries = json.loads(manifest.read_text())
    del entries["adapters"]["mw_h"]["fp32"]
    manifest.write_text(json.dumps(entries))
    loaded = _bn_weights(ae.load_model(tmp_path / "old", torch_dtype=torch.float16), "mw_")
    assert loaded and all(p.dtype == torch.float16 and torch.equal(p, saved[n]) for n, p in loaded.items())


@pytest.mark.cuda
def test_cuda_bf16_bottleneck_masters_compute_as_their_bf16_casts():
    """On the GPU, a bf16 model's bottleneck masters: served (the fused kernels, one stack and rows routed to
    different stacks) and training the top of two levels, bit for bit the model whose adapters are their bf16 casts,
    with fp32 gradients equal to the casts'."""
    ids = _ids().cuda()
    masters, halves = _bn_pair(lambda: _bert(torch.bfloat16).cuda(), _BN, ("mw_p", "mw_q"))
    pair = (masters, halves)
    with torch.no_grad():
        for spec in (ae.Stack("mw_p", "mw_q"), ["mw_p", ae.Stack("mw_q", "mw_p"), None]):
            with ae.use_adapters(spec):
                assert torch.equal(masters(input_ids=ids).logits, halves(input_ids=ids).logits), spec
    grads = []
    for model in pair:
        ae.set_active_adapters(model, ["mw_p", "mw_q"])
        ae.train_adapter(model, "mw_q")
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in _bn_weights(model, "mw_q").items()})
    assert grads[0] and all(g.dtype == torch.float32 for g in grads[0].values())
    for n, g in grads[0].items():
        assert torch.equal(g, grads[1][n].float()), n


@pytest.mark.cuda
def test_cuda_bf16_model_with_peft_fp32_adapters_runs_fused_within_bf16_error():
    """On the GPU, a patched bf16 PeftModel with PEFT's default fp32 LoRA weights: the fused model's error against
    an fp64 reference is no larger than PEFT's own with bf16 adapter weights (+10%), and its masters' gradients are
    those of the bf16 casts (the fused op on the same operands)."""
    peft = pytest.importorskip("peft")
    cfg = dict(_CFG, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=_TARGETS, init_lora_weights=False)
    ids = torch.randint(0, 64, (4, 96), generator=torch.Generator().manual_seed(1)).cuda()

    def peft_model(dtype, autocast):
        model = peft.get_peft_model(copy.deepcopy(base).to("cuda", dtype), lora, autocast_adapter_dtype=autocast)
        return model.eval()

    fused = peft_model(torch.bfloat16, True)
    assert {p.dtype for n, p in fused.named_parameters() if "lora_" in n} == {torch.float32}
    eager16 = peft_model(torch.bfloat16, False)
    ref64 = peft_model(torch.float64, False)
    for model in (eager16, ref64):  # the same adapter weights: get_peft_model draws them from one seed
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(fused.get_parameter(n))
    ae.patch(fused)
    with torch.no_grad():
        ref = ref64(input_ids=ids).logits
        err_fused = (fused(input_ids=ids).logits.double() - ref).abs().max().item()
        err_eager = (eager16(input_ids=ids).logits.double() - ref).abs().max().item()
    assert err_fused <= 1.1 * err_eager + 1e-3, (err_fused, err_eager)

    casts = eager16  # its bf16 LoRA weights are the masters' casts
    ae.patch(casts)
    grads = []
    for model in (fused, casts):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert grads[0] and all(g.dtype == torch.float32 for g in grads[0].values())
    for n, g in grads[0].items():
        assert torch.equal(g, grads[1][n].float()), n
