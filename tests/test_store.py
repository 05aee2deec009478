"""AdapterStore (a directory of saved adapters, lazy loads, no silent creation, no path escapes) and
AdapterMemoryManager (count and byte caps with LRU eviction, host offload or reload from disk, pinning,
reference counts, statistics, concurrent use from 8 threads).

Reloaded adapters must give outputs bit-identical to before eviction (fp32 weights are copied, never recomputed).
The threaded test runs the torch reference twins of the fused ops (the CPU Triton interpreter is not
thread-safe); the fused path under threads is in tests/test_routing.py's CUDA tier.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import threading
import time

import pytest
import torch
from transformers import BertConfig, BertModel

import adapter_engine as ae
from adapter_engine.kernels import _backend
from adapter_engine.memory import AdapterMemoryManager
from adapter_engine.routing import use_adapters
from adapter_engine.store import AdapterStore

_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
KINDS = {
    "lora": lambda: ae.LoraConfig(r=2, lora_alpha=4),
    "ia3": lambda: ae.IA3Config(),
    "seq_bn": lambda: ae.BottleneckConfig.seq_bn(reduction_factor=4),
}


def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**_BERT)).eval()


@torch.no_grad()
def randomise(model, name: str) -> None:
    for key, p in model.named_parameters():
        if f".{name}." in key or key.endswith(f".{name}"):
            p.uniform_(0.5, 1.5) if "ia3_l" in key else p.normal_(0.0, 0.2)


def ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, 4), generator=torch.Generator().manual_seed(seed))


def out(model, spec, batch=None):
    with use_adapters(spec), torch.no_grad():
        return model(input_ids=ids() if batch is None else batch).last_hidden_state


@pytest.fixture
def filled_store(tmp_path):
    """A store with 6 trained-looking adapters (2 of each kind) and their expected outputs."""
    model = bert()
    store = AdapterStore(tmp_path / "store", create=True)
    expected = {}
    for i, kind in enumerate(list(KINDS) * 2):
        name = f"{kind}{i}"
        ae.add_adapter(model, name, KINDS[kind]())
        randomise(model, name)
        store.save(model, name)
        expected[name] = out(model, name)
    return store, expected


# ------------------------------------------------------------------------------------------------- store
def test_store_lists_reads_and_loads_both_formats(filled_store):
    store, expected = filled_store
    assert store.names() == sorted(expected)
    assert len(store) == 6 and "seq_bn2" in store and "nope" not in store
    fmt = {n: store.read(n).format for n in store}
    assert fmt["seq_bn2"] == "adapterhub" and fmt["lora0"] == "peft" and fmt["ia31"] == "peft"
    model = bert()
    for name in store:
        store.load_into(model, name)
        assert torch.equal(out(model, name), expected[name])


def test_store_never_invents_an_adapter(filled_store):
    store, _ = filled_store
    model = bert()
    with pytest.raises(KeyError, match="never creates untrained adapters"):
        store.load_into(model, "missing")
    # (read and nbytes_on_disk take no create=: the message names load_into's, which does)
    for call in (store.read, store.nbytes_on_disk):
        with pytest.raises(KeyError, match=r"load_into\(model, 'missing', create=<config>\) adds a fresh one"):
            call("missing")
    assert ae.list_adapters(model) == []
    store.load_into(model, "fresh", create=ae.LoraConfig(r=2))  # explicit: a fresh (B = 0) adapter
    assert "fresh" in ae.list_adapters(model) and "fresh" not in store
    # LoRA init: B = 0, outputs unchanged (the fused op sums the base GEMM in its own order: 1e-5)
    torch.testing.assert_close(out(model, "fresh"), out(model, None), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "", "x\x00y", "v1.2"])
def test_store_refuses_names_that_escape_the_directory(filled_store, name):
    store, _ = filled_store
    refused = r"adapter name .*(is not a plain name|must be a non-empty string)"  # (not os's "embedded null byte")
    with pytest.raises(ValueError, match=refused):
        store.path(name)
    with pytest.raises(ValueError, match=refused):
        store.load_into(bert(), name)
    assert name not in store


def test_store_refuses_symlinks_out_of_the_directory(filled_store, tmp_path):
    store, _ = filled_store
    outside = tmp_path / "outside"
    model = bert()
    ae.add_adapter(model, "evil", KINDS["lora"]())
    ae.save_adapter(model, "evil", outside)
    os.symlink(outside, os.path.join(store.root, "evil"))
    os.symlink(os.path.join(store.root, "lora0"), os.path.join(store.root, "alias"))  # inside: allowed
    with pytest.raises(ValueError, match="outside the store"):
        store.path("evil")
    assert "evil" not in store.names() and "alias" in store.names()
    with pytest.raises(ValueError, match="outside the store"):
        store.load_into(bert(), "evil")


def test_store_requires_an_existing_directory(tmp_path):
    """A missing folder names the call that makes it (``StackedAdapterModel(store=...)`` has no ``create``: the hint
    "pass create=True" sent users to an argument it does not take); a file is named as one, not as missing."""
    with pytest.raises(FileNotFoundError, match=r"does not exist \(AdapterStore\(.*nope', create=True\) makes it"):
        AdapterStore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="AdapterStore"):
        ae.StackedAdapterModel(bert(), store=tmp_path / "nope")
    (tmp_path / "a_file").write_text("x")
    for create in (False, True):
        with pytest.raises(NotADirectoryError, match="a_file' is a file, not a folder"):
            AdapterStore(tmp_path / "a_file", create=create)
    assert AdapterStore(tmp_path / "new", create=True).names() == []


# ------------------------------------------------------------------------------------------------- manager
@pytest.mark.parametrize("offload", ["cpu", "drop"])
def test_lru_eviction_under_max_active_and_exact_reloads(filled_store, offload):
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=2, offload=offload)
    order = ["lora0", "ia31", "lora0", "seq_bn2", "ia31", "lora3", "lora0", "seq_bn5"]
    for name in order:
        with memory.use([name]):
            assert len(ae.list_adapters(model)) <= 2
            assert torch.equal(out(model, name), expected[name])
    # LRU by hand: lora0 ia31 | lora0 hit | seq_bn2 evicts ia31 | ia31 evicts lora0 | lora3 evicts seq_bn2 |
    # lora0 evicts ia31 | seq_bn5 evicts lora3
    assert memory.resident() == ["lora0", "seq_bn5"]
    stats = memory.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 7, 5)
    assert stats.loads == 7 and stats.load_time_s > 0
    if offload == "cpu":
        assert (stats.loads_from_disk, stats.loads_from_cpu) == (5, 2) and stats.offloaded == 3
    else:
        assert (stats.loads_from_disk, stats.loads_from_cpu) == (7, 0) and stats.offloaded == 0
    assert stats.resident == 2 and stats.resident_bytes == sum(
        ae.api.adapter_nbytes(model, n) for n in ["lora0", "seq_bn5"]
    )


@pytest.mark.parametrize("offload", ["cpu", "drop"])
def test_loads_inside_inference_mode_make_normal_tensors(filled_store, offload):
    """A serving loop under torch.inference_mode loads adapters too: they must stay trainable, and keep the version
    counters the engine's caches of stacked factors need."""
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload=offload)
    with torch.inference_mode():
        for name in ("lora0", "seq_bn2", "lora0"):  # from disk, from disk (evicting lora0), from the host or disk
            with memory.use([name]):
                assert torch.equal(out(model, name), expected[name])
                params = ae.api.adapter_parameters(model, name)
                assert params and not any(p.is_inference() for p in params)


def test_max_bytes_cap(filled_store):
    store, expected = filled_store
    probe = bert()
    store.load_into(probe, "seq_bn2")
    store.load_into(probe, "lora0")
    bn, lora = ae.api.adapter_nbytes(probe, "seq_bn2"), ae.api.adapter_nbytes(probe, "lora0")
    model = bert()
    memory = AdapterMemoryManager(model, store, max_bytes=bn + lora)  # room for one of each, not two bottlenecks
    memory.acquire(["seq_bn2", "lora0"])
    memory.release(["seq_bn2", "lora0"])
    with memory.use(["seq_bn5"]):
        assert torch.equal(out(model, "seq_bn5"), expected["seq_bn5"])
    assert "seq_bn2" not in memory.resident() and memory.stats().resident_bytes <= bn + lora
    with pytest.raises(ValueError, match=rf"cannot fit this call's adapters .*'seq_bn2'.* under max_bytes={bn + lora}"):
        memory.acquire(["seq_bn2", "seq_bn5", "lora0"])
    assert memory.stats().resident_bytes <= bn + lora


def test_a_call_whose_resident_adapters_exceed_max_bytes_is_refused_naming_them_and_their_bytes():
    """Every adapter of the call is resident (adopted from the model) and together, or beside a pinned one, they exceed
    ``max_bytes``: the refusal names the call's adapters, their bytes, the pinned ones and the cap. It read "cannot fit
    adapters [] beside [...]", the empty list being the adapters it still had to load."""
    model = bert()
    for name in ("cf_one", "cf_two", "cf_pin"):
        ae.add_adapter(model, name, ae.LoraConfig(r=2))
    size = ae.api.adapter_nbytes(model, "cf_one")
    memory = AdapterMemoryManager(model, max_bytes=3 * size - 1)
    with pytest.raises(ValueError) as refused:
        memory.acquire(["cf_one", "cf_two", "cf_pin"])
    text = str(refused.value)
    assert "[]" not in text and f"{{'cf_one': {size}, 'cf_two': {size}, 'cf_pin': {size}}} ({3 * size} bytes)" in text
    assert f"max_bytes={3 * size - 1}" in text
    memory = AdapterMemoryManager(model, max_bytes=2 * size - 1)  # (evicts one of the three to the host)
    memory.pin(["cf_pin"])
    with pytest.raises(ValueError, match=rf"\{{'cf_one': {size}\}} .* beside the pinned \{{'cf_pin': {size}\}}"):
        memory.acquire(["cf_one"])


def test_the_byte_cap_counts_an_adapter_never_loaded_in_the_models_dtype(filled_store):
    """The store holds fp32 weights (as PEFT saves them for a half-precision base too) that a half-precision model
    loads as fp16, half the bytes. A first load was estimated at the file's size, so under a cap with room for two
    adapters, loading the second evicted the first."""
    store, _ = filled_store
    probe = bert().half()
    for name in ("lora0", "lora3"):  # (PEFT safetensors; AdapterHub's pickle has no header to read: 0)
        store.load_into(probe, name)
        assert store.nbytes_on_disk(name) == 2 * ae.api.adapter_nbytes(probe, name)  # fp32 on disk
        assert store.nbytes_on_disk(name, dtype=torch.float16) == ae.api.adapter_nbytes(probe, name)
    both = ae.api.adapter_nbytes(probe, "lora0") + ae.api.adapter_nbytes(probe, "lora3")
    memory = AdapterMemoryManager(bert().half(), store, max_bytes=both)
    for name in ("lora0", "lora3"):
        with memory.use([name]):
            pass
    assert memory.resident() == ["lora0", "lora3"] and memory.stats().evictions == 0


def test_the_byte_cap_follows_a_conversion_of_the_model_in_place(filled_store):
    """``.float()`` of a half-precision model doubles its resident adapters' bytes: the manager counts them again (its
    statistics and cap used the fp16 sizes, so two adapters stayed resident at twice the cap's room), and the next call
    evicts down to the cap. ``.half()`` back: an offloaded adapter's fp32 size is no longer what it reloads in."""
    store, _ = filled_store
    probe = bert().half()
    for name in ("seq_bn2", "seq_bn5"):
        store.load_into(probe, name)
    half = ae.api.adapter_nbytes(probe, "seq_bn2")
    model = bert().half()
    memory = AdapterMemoryManager(model, store, max_bytes=3 * half)  # two fp16 bottlenecks, one fp32
    for name in ("seq_bn2", "seq_bn5"):
        with memory.use([name]):
            pass
    model.float()
    assert memory.stats().resident_bytes == 4 * half == sum(ae.api.adapter_nbytes(model, n) for n in memory.resident())
    with memory.use(["seq_bn5"]):
        assert memory.resident() == ["seq_bn5"] and memory.stats().resident_bytes == 2 * half
    model.half()  # seq_bn2, offloaded at fp32, reloads in fp16: both fit again
    with memory.use(["seq_bn2"]):
        assert memory.resident() == ["seq_bn5", "seq_bn2"] and memory.stats().resident_bytes == 2 * half


@pytest.mark.parametrize("first", ["seq_bn2", "lora0"])
def test_a_call_over_max_bytes_is_refused_on_first_use_too(filled_store, first):
    """A call whose adapters exceed ``max_bytes`` on their own is refused with ValueError before anything of it
    stays resident, on first use as on later ones (the size of a first load is known only once it is loaded; a
    bottleneck adapter's pickle has no header). The first call used to go over the cap with a log line."""
    store, expected = filled_store
    probe = bert()
    store.load_into(probe, first)
    size = ae.api.adapter_nbytes(probe, first)
    model = bert()
    memory = AdapterMemoryManager(model, store, max_bytes=size - 1)
    for _ in range(2):
        with pytest.raises(ValueError, match=f"do not fit under max_bytes={size - 1}|cannot fit"):
            memory.acquire([first])
        assert ae.list_adapters(model) == [] and memory.stats().resident_bytes == 0
    fresh = bert()
    roomy = AdapterMemoryManager(fresh, store, max_bytes=size)  # exactly its size: fits
    with roomy.use([first]):
        assert torch.equal(out(fresh, first), expected[first])


def test_a_call_over_max_bytes_beside_a_resident_adapter_is_refused_before_loading(filled_store, caplog):
    """A call holding a resident adapter and needing a first load of another that cannot fit beside it under
    ``max_bytes`` (at the cap exactly with one): the store's header gives the size, so it is refused before the load.
    It loaded the adapter over the cap (logging that the caps were exceeded), refused, and kept its copy in host
    memory: a refused call changed the manager's state."""
    store, _ = filled_store
    probe = bert()
    store.load_into(probe, "lora0")
    size = ae.api.adapter_nbytes(probe, "lora0")
    memory = AdapterMemoryManager(bert(), store, max_bytes=size)
    with memory.use(["lora0"]):
        pass
    with (
        caplog.at_level("WARNING", logger="adapter_engine.memory"),
        pytest.raises(ValueError, match=f"max_bytes={size}"),
    ):
        memory.acquire(["lora0", "lora3"])
    stats = memory.stats()
    assert "exceeded" not in caplog.text and (stats.loads, stats.evictions, stats.offloaded) == (1, 0, 0)
    assert memory.resident() == ["lora0"] and not memory.holds("lora3")
    with memory.use(["lora3"]):  # alone it fits, exactly at the cap
        assert memory.resident() == ["lora3"] and memory.stats().resident_bytes == size


def test_pinned_and_in_use_adapters_are_not_evicted(filled_store):
    store, _ = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=2, wait_timeout=0.2)
    memory.pin(["lora0"])
    memory.acquire(["ia31"])  # held by a "running call"
    with pytest.raises(RuntimeError, match="timed out"):
        memory.acquire(["seq_bn2"])  # only ia31 could go, and it is in use
    with pytest.raises(ValueError, match="pinned or in use"):
        memory.evict("lora0")
    with pytest.raises(ValueError, match="max_active"):
        memory.acquire(["seq_bn2", "lora3"])  # with the pinned lora0 that is 3 > 2
    memory.release(["ia31"])
    memory.acquire(["seq_bn2"])
    assert memory.resident() == ["lora0", "seq_bn2"]
    memory.release(["seq_bn2"])
    memory.unpin(["lora0"])
    with memory.use(["lora3", "ia31"]):
        assert sorted(memory.resident()) == ["ia31", "lora3"]


def test_a_waiting_acquire_proceeds_when_the_running_call_releases(filled_store):
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, wait_timeout=30)
    memory.acquire(["lora0"])
    got = {}

    def other():
        with memory.use(["seq_bn2"]):
            got["out"] = out(model, "seq_bn2")

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=0.3)
    assert t.is_alive()  # waiting for lora0's call to finish
    memory.release(["lora0"])
    t.join(timeout=30)
    assert not t.is_alive() and torch.equal(got["out"], expected["seq_bn2"])


def test_unknown_adapters_and_bad_caps(filled_store):
    store, _ = filled_store
    memory = AdapterMemoryManager(bert(), store)
    with pytest.raises(KeyError, match="unknown adapters"):
        memory.acquire(["nope"])
    assert memory.stats().misses == 0
    with pytest.raises(ValueError, match="max_active"):
        AdapterMemoryManager(bert(), store, max_active=0)
    with pytest.raises(ValueError, match="offload"):
        AdapterMemoryManager(bert(), store, offload="disk")


def test_a_refused_peft_model_is_left_unpatched_and_a_plain_model_is_patched():
    """A PeftModel is refused (its adapters are PEFT's): it was left patched, its LoRA layers switched to the fused op.
    A plain model is patched, as the manager tracks its adapter layers."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="keep using PEFT's own adapter API"):
        AdapterMemoryManager(pm)
    assert not ae.is_patched(pm)
    model = bert()
    AdapterMemoryManager(model)
    assert ae.is_patched(model)


def test_adapters_outside_the_store_are_kept_on_the_host_when_dropping(filled_store):
    store, _ = filled_store
    model = bert()
    ae.add_adapter(model, "trained_here", KINDS["seq_bn"]())
    randomise(model, "trained_here")
    before = out(model, "trained_here")
    memory = AdapterMemoryManager(model, store, max_active=1, offload="drop")
    with memory.use(["lora0"]):
        pass
    assert memory.stats().offloaded == 1  # not in the store: never dropped
    with memory.use(["trained_here"]):
        assert torch.equal(out(model, "trained_here"), before)


@pytest.mark.parametrize("kind", ["lora", "seq_bn"])
def test_an_adapter_changed_since_it_was_loaded_is_kept_on_the_host_when_dropping(filled_store, kind):
    """offload="drop" drops only the store's copy: an adapter loaded from the store and then updated in place
    (trained) is kept in host memory, and reloads as trained, not as the stale store copy; an unchanged one is
    dropped and reloaded from the store."""
    store, expected = filled_store
    name, other = (f"{kind}0", "ia31") if kind == "lora" else (f"{kind}2", "ia31")
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload="drop")
    with memory.use([name]):
        with torch.no_grad():
            for p in ae.api.adapter_parameters(model, name):
                p.add_(0.25)  # an optimizer step, in place
        trained = out(model, name)
    assert not torch.equal(trained, expected[name])
    with memory.use([other]):  # evicts name: changed, so kept on the host
        pass
    assert memory.stats().offloaded == 1 and name not in ae.list_adapters(model)
    with memory.use([name]):  # evicts other: unchanged since its load, so dropped
        assert torch.equal(out(model, name), trained)
    stats = memory.stats()
    assert stats.offloaded == 0 and (stats.loads_from_disk, stats.loads_from_cpu) == (2, 1)


@pytest.mark.parametrize("kind", ["lora", "seq_bn"])
def test_an_adapter_trained_through_data_is_kept_on_the_host_when_dropping(filled_store, kind):
    """A hand-written training step ``p.data.add_(...)`` bumps no version counter: the manager also compares the
    weights' bits with those it saw at the load, so such an adapter is kept on the host, and reloads as trained.
    It used to be dropped, its training lost."""
    store, expected = filled_store
    name = f"{kind}0" if kind == "lora" else f"{kind}2"
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload="drop")
    with memory.use([name]):
        for p in ae.api.adapter_parameters(model, name):
            p.data.add_(0.25 * torch.randn_like(p))
        trained = out(model, name)
    assert not torch.equal(trained, expected[name])
    with memory.use(["ia31"]):  # evicts name
        pass
    assert memory.stats().offloaded == 1
    with memory.use([name]):
        assert torch.equal(out(model, name), trained)


@pytest.mark.parametrize("offload", ["cpu", "drop"])
def test_a_reloaded_adapter_keeps_each_weights_requires_grad(filled_store, offload):
    store, _ = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload=offload)
    with memory.use(["lora0"]):
        a, b = ae.api.adapter_parameters(model, "lora0")[:2]
        a.requires_grad_(False)  # frozen lora_A of the first layer, the rest trainable
        flags = [p.requires_grad for p in ae.api.adapter_parameters(model, "lora0")]
    assert flags[0] is False and all(flags[1:])
    with memory.use(["seq_bn2"]):  # evicts lora0
        pass
    with memory.use(["lora0"]):
        assert [p.requires_grad for p in ae.api.adapter_parameters(model, "lora0")] == flags


@pytest.mark.parametrize("kind", ["lora", "ia3", "seq_bn"])
def test_an_adapter_offloaded_before_the_model_is_converted_comes_back_converted(filled_store, kind):
    """An adapter evicted to the host from an fp32 model that is then converted with ``.half()`` comes back in fp16,
    computing as it would had it stayed resident through the conversion. LoRA / IA3 weights came back fp32 (taken for
    fp32 master weights of a 16-bit model)."""
    store, _ = filled_store
    name = {"lora": "lora0", "ia3": "ia31", "seq_bn": "seq_bn2"}[kind]
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload="cpu")
    with memory.use([name]):
        pass
    with memory.use(["lora3"]):  # evicts it to the host
        pass
    model.half()
    twin = bert()
    store.load_into(twin, name)
    twin.half()  # resident through the conversion
    with memory.use([name]):
        assert {p.dtype for p in ae.api.adapter_parameters(model, name)} == {torch.float16}
        assert torch.equal(out(model, name), out(twin, name))
        assert memory.stats().resident_bytes == ae.api.adapter_nbytes(model, name)


def test_an_adapter_added_over_a_host_copy_warns_that_the_copy_is_dropped(filled_store, caplog):
    """A fresh adapter added through the model's API under the name of one the manager keeps in host memory replaces
    it (the manager adopts what the model holds): the host copy's weights go, with a warning naming the adapter; they
    used to go silently."""
    store, _ = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1)
    with memory.use(["lora0"]):
        pass
    with memory.use(["ia31"]):  # lora0 to the host
        pass
    ae.add_adapter(model, "lora0", KINDS["lora"]())
    with caplog.at_level("WARNING", logger="adapter_engine.memory"):
        assert memory.stats().offloaded == 0 and memory.is_resident("lora0")
    assert "'lora0' was added to the model under the name of an adapter the memory manager kept" in caplog.text


def test_an_adapter_merged_away_leaves_the_manager_too(filled_store):
    """merge_adapter folds a LoRA into the base and drops it from the model behind the manager's back: the manager
    forgets it (no later eviction of an adapter that is gone); one added through the model's API is adopted."""
    store, _ = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=2)
    with memory.use(["lora0", "seq_bn2"]):
        pass
    ae.merge_adapter(model, "lora0")
    assert memory.resident() == ["seq_bn2"]
    with memory.use(["ia31"]), memory.use(["lora3"]):  # needs to evict seq_bn2, not the merged lora0
        assert sorted(ae.list_adapters(model)) == ["ia31", "lora3"]
    ae.add_adapter(model, "direct", KINDS["lora"]())
    assert "direct" in memory.resident() and len(ae.list_adapters(model)) <= 3
    with memory.use(["seq_bn2"]):
        assert len(ae.list_adapters(model)) == 2


def test_a_deep_copy_of_the_manager_has_its_own_lock_and_model(filled_store):
    store, _ = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=2)
    with memory.use(["lora0"]):
        twin = copy.deepcopy(memory)
    assert twin.lock is not memory.lock and twin.model is not model
    assert twin.resident() == ["lora0"] and twin.stats().resident == 1
    with twin.use(["seq_bn2", "ia31"]):  # the copy's holds: none of the original's
        pass
    assert memory.resident() == ["lora0"] and ae.list_adapters(model) == ["lora0"]


def test_eight_threads_under_a_cap_reference_ops(filled_store, monkeypatch):
    """8 threads x 60 calls, each routing a random mixed batch of 3 rows (1-3 adapters) with max_active=4: outputs
    equal the single-threaded ones (a route or an adapter leaking between threads changes them by O(0.1)), the
    cap holds throughout, and the statistics add up."""
    monkeypatch.setattr(_backend, "INTERPRET", False)
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=4, offload="cpu")
    names = sorted(expected)
    errors, acquisitions, peaks = [], [0], []
    count_lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(seed):
        rng = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(60):
                rows = [rng.choice(names) for _ in range(3)]  # 1 to 3 different adapters per batch
                used = list(dict.fromkeys(rows))
                with memory.use(used):
                    peaks.append(len(ae.list_adapters(model)))
                    with use_adapters(rows), torch.no_grad():
                        y = model(input_ids=ids(3)).last_hidden_state
                for r, name in enumerate(rows):  # a mixed batch packs other adapters beside: equal within 1e-5
                    want = out_cache[name][r]
                    if not torch.allclose(y[r], want, atol=1e-5, rtol=0):
                        errors.append((seed, name, (y[r] - want).abs().max().item()))
                with count_lock:
                    acquisitions[0] += len(used)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    out_cache = {}
    single = bert()
    for name in names:
        store.load_into(single, name)
        with use_adapters(name), torch.no_grad():
            out_cache[name] = single(input_ids=ids(3)).last_hidden_state  # row r of a batch of <= 3
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    stats = memory.stats()
    assert stats.hits + stats.misses == acquisitions[0]
    assert stats.loads == stats.misses and stats.evictions == stats.loads - stats.resident
    assert max(peaks) <= 4 and stats.resident <= 4 and stats.evictions > 0


# ------------------------------------------------------------------------------------------------- CUDA tier
@pytest.mark.cuda
def test_gpu_offload_goes_to_pinned_host_memory_and_back_exactly(filled_store):
    store, _ = filled_store
    model = bert().cuda()
    memory = AdapterMemoryManager(model, store, max_active=1, offload="cpu")
    batch = ids().cuda()
    with memory.use(["seq_bn2"]):
        before = out(model, "seq_bn2", batch)
    with memory.use(["lora0"]):  # evicts seq_bn2 to host memory
        snapshot = memory._offloaded["seq_bn2"]
        tensors = [t for _, params in snapshot.entries for t in params.values()]
        assert tensors and all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
    with memory.use(["seq_bn2"]):
        assert torch.equal(out(model, "seq_bn2", batch), before)
        assert all(p.is_cuda for p in ae.api.adapter_parameters(model, "seq_bn2"))
    assert memory.stats().loads_from_cpu == 1


@pytest.mark.parametrize("origin", ["fresh", "trained"])
def test_an_adapter_saved_to_the_store_may_be_dropped_until_it_changes(filled_store, origin):
    """offload="drop" keeps a fresh or trained adapter on the host, and the README's way out is to save it to the
    store: the managers over the store learn of the save, so the adapter is dropped (and reloads as saved) until an
    update in place changes it again. A saved adapter used to stay "changed since its load" and was kept on the host
    for good. Pickled and deep-copied managers (and stores) still do their work."""
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, offload="drop")
    if origin == "fresh":
        name = "made_here"
        ae.add_adapter(model, name, KINDS["seq_bn"]())
    else:
        name = "lora0"
        memory.acquire([name])
        memory.release([name])
    randomise(model, name)  # trained in place
    store.save(model, name)
    saved = out(model, name)
    with memory.use(["ia31"]):  # evicts name: the store's copy now, dropped
        pass
    assert memory.stats().offloaded == 0 and name not in ae.list_adapters(model)
    with memory.use([name]):  # reloaded from the store as saved; then trained again, not saved
        assert torch.equal(out(model, name), saved)
        randomise(model, name)
        trained = out(model, name)
    with memory.use(["ia31"]):
        pass
    assert memory.stats().offloaded == 1  # changed since the save: kept on the host
    with memory.use([name]):
        assert torch.equal(out(model, name), trained)
    assert not torch.equal(trained, saved)
    twin = copy.deepcopy(memory)
    assert twin in twin.store._managers and twin not in store._managers
    assert pickle.loads(pickle.dumps(store)).names() == store.names()


def test_a_nested_block_that_cannot_fit_beside_its_own_thread_s_outer_block_raises_at_once(filled_store):
    """Only this thread could release its outer block's adapters: a nested block needing room they hold waited the
    whole wait_timeout, then said it timed out. It raises at once, naming them; the outer block goes on and releases
    as usual. Another thread's hold is still waited for (see
    test_a_waiting_acquire_proceeds_when_the_running_call_releases), and so is a plain acquire's hold
    (test_pinned_and_in_use_adapters_are_not_evicted)."""
    store, expected = filled_store
    model = bert()
    memory = AdapterMemoryManager(model, store, max_active=1, wait_timeout=60)
    with memory.use(["lora0"]):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"\['lora0'\] are held by this thread's own open use"):
            with memory.use(["seq_bn2"]):
                pass
        assert time.monotonic() - start < 30
        with memory.use(["lora0"]):  # (nesting what fits still works)
            assert torch.equal(out(model, "lora0"), expected["lora0"])
    with memory.use(["seq_bn2"]):  # the outer block released lora0
        assert torch.equal(out(model, "seq_bn2"), expected["seq_bn2"])
    assert memory._scoped == {}
