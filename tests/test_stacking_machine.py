"""Stack and Adapt under a memory manager, as random sequences of what a user does (hypothesis state machine).

A :class:`StackedAdapterModel` with caps (``max_active``, ``max_bytes``) and either eviction mode (``offload="cpu"``
keeps evicted adapters in host memory, ``"drop"`` reloads unchanged ones from the store) pushes levels and adds
siblings (fresh, or lazily from an :class:`AdapterStore`), sets depths, activates, names stacks, routes calls (one
adapter, a level's stack, a named stack, or rows mixing them), trains its top level or a sibling a step, evicts,
deletes, and saves and reloads the whole stack. Whatever was evicted, dropped or reloaded, every call must give what a
fresh uncapped model gives with the same adapters at the weights they had when last created or trained (saved aside
then: the truth), and the manager must keep its caps. A lost training step, an adapter reloaded from a stale copy or a
wrong stack would change the logits by far more than the tolerance: 1e-5 on fp32 logits, as a per-row route and a
batch of one row need not round alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from transformers import BertConfig, BertForSequenceClassification

import adapter_engine as ae
from adapter_engine import AdapterStore, StackedAdapterModel, api
from adapter_engine.kernels import _backend

_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_BERT |= dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3)
STORED = ("st0", "st1", "st2", "st3")  # in the store: seq_bn adapters, and a LoRA (st3), random weights
ATOL = 1e-5
SOURCES = st.sampled_from(["store", "fresh", "lora"])  # where a new adapter comes from (a LoRA: fresh)


def _base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_BERT)).eval()


def _format(name: str) -> str:
    return "peft" if name == "st3" or name.startswith("lo") else "adapterhub"


def _config(name: str):
    if name == "st3" or name.startswith("lo"):
        return ae.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    return ae.BottleneckConfig.seq_bn(reduction_factor=4)


@torch.no_grad()
def _randomise(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for key, p in model.named_parameters():
        if f".{name}." in key:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


_ROOT: str | None = None


def _root() -> str:
    """A folder holding the store (made once per process) and a scratch folder per machine."""
    global _ROOT
    if _ROOT is None:
        root = tempfile.mkdtemp(prefix="ae-stack-machine-")
        model = _base()
        for i, name in enumerate(STORED):
            ae.add_adapter(model, name, _config(name))
            _randomise(model, name, seed=10 + i)
            ae.save_adapter(model, name, os.path.join(root, "store", name), _format(name))
        _ROOT = root
    return _ROOT


class StackMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.scratch = tempfile.mkdtemp(dir=_root())
        self.store = AdapterStore(os.path.join(_root(), "store"))
        self.truth: dict[str, str] = {name: self.store.path(name) for name in STORED}  # name -> folder of its weights
        self.levels: list[str] = []
        self.siblings: list[str] = []
        self.running: list[str] = []
        self.stacks: dict[str, tuple[str, ...]] = {}  # named stacks (add_stack), routed by name
        self.fresh = 0
        self.batch = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(1))

    def teardown(self):
        shutil.rmtree(self.scratch, ignore_errors=True)

    @initialize(
        max_active=st.sampled_from([None, 2, 3]),
        small_bytes=st.booleans(),
        offload=st.sampled_from(["cpu", "drop"]),
        levels=st.lists(SOURCES, max_size=3),
        siblings=st.lists(SOURCES, max_size=3),
    )
    def build(self, max_active, small_bytes, offload, levels, siblings):
        # max_bytes: room for about three of the seq_bn adapters (4,416 bytes each; a LoRA 2,048), or no byte cap
        self.caps = dict(max_active=max_active, max_bytes=14_000 if small_bytes else None, offload=offload)
        self.sam = StackedAdapterModel(_base(), store=self.store, **self.caps)
        for source in levels:
            self.add_level(source)
        for source in siblings:
            self.add_sibling(source)

    # ------------------------------------------------------------------------------------------- helpers
    def _known(self) -> list[str]:
        return self.levels + self.siblings

    def _capture(self, name: str) -> None:
        """Save ``name``'s weights now (resident: just created or trained) as its truth."""
        folder = os.path.join(self.scratch, f"{name}-{len(os.listdir(self.scratch))}")
        with self.sam.memory.reading(name):
            ae.save_adapter(self.sam.model, name, folder, _format(name))
        self.truth[name] = folder

    def _expected(self, stacks: list[tuple[str, ...]]) -> torch.Tensor:
        """Each row's logits from an uncapped model running that row's stack, from the truth."""
        ref = _base()
        for name in {n for stack in stacks for n in stack}:
            ae.load_adapter(ref, self.truth[name], name=name)
        rows = []
        with torch.no_grad():
            for row, stack in enumerate(stacks):
                ae.set_active_adapters(ref, list(stack) or None)
                rows.append(ref(input_ids=self.batch[row : row + 1]).logits)
        return torch.cat(rows)

    def _stack_for(self, entry: str | None) -> tuple[str, ...]:
        if entry is None:
            return ()
        if entry in self.stacks:
            return self.stacks[entry]
        if entry in self.levels:
            return tuple(self.levels[: self.levels.index(entry) + 1])
        return (entry,)

    def _check(self, adapter) -> None:
        with _backend.torch_twins_on_cpu(), torch.no_grad():
            if adapter == "running":
                got = self.sam(input_ids=self.batch).logits
                stacks = [tuple(self.running)] * len(self.batch)
            else:
                got = self.sam(input_ids=self.batch, adapter=adapter).logits
                entries = adapter if isinstance(adapter, list) else [adapter] * len(self.batch)
                stacks = [self._stack_for(e) for e in entries]
        expected = self._expected(stacks)
        assert torch.allclose(got, expected, rtol=0, atol=ATOL), (adapter, stacks, (got - expected).abs().max())

    def _new_name(self, source: str) -> tuple[str, object]:
        """(name, config or None to take it from the store)."""
        unused = [n for n in STORED if n not in self._known() and not self.sam.memory.holds(n)]
        if source == "store" and unused:
            return unused[0], None
        self.fresh += 1
        name = f"{'lo' if source == 'lora' else 'fr'}{self.fresh}"
        return name, _config(name)

    def _add(self, name: str, config, level: bool) -> bool:
        try:
            self.sam.add_adapter(name, config, level=level)
        except ValueError as err:  # refused by a cap or a structure: must change nothing
            assert "max_active" in str(err) or "max_bytes" in str(err) or "structure" in str(err), err
            assert name not in self.sam.levels and name not in self.sam._siblings
            return False
        if config is not None:
            _randomise(self.sam.model, name, seed=100 + self.fresh)
            self._capture(name)
        return True

    # ------------------------------------------------------------------------------------------- rules
    @rule(source=SOURCES)
    def add_level(self, source):
        name, config = self._new_name(source)
        with _backend.torch_twins_on_cpu():
            if self._add(name, config, level=True):
                self.levels.append(name)
                self.running = list(self.levels)

    @rule(source=SOURCES)
    def add_sibling(self, source):
        name, config = self._new_name(source)
        if self._add(name, config, level=False):
            self.siblings.append(name)

    @rule(data=st.data())
    def set_depth(self, data):  # (depth 0 unpins every running adapter, siblings too)
        depth = data.draw(st.integers(0, len(self.levels)))
        self.sam.set_depth(depth)
        self.running = self.levels[:depth]

    @precondition(lambda self: self._known())
    @rule(data=st.data())
    def activate(self, data):
        names = data.draw(st.lists(st.sampled_from(self._known()), min_size=1, max_size=3, unique=True))
        try:
            self.sam.activate(names)
        except ValueError as err:  # a cap, or structures that cannot stack: the running stack stays
            assert "max_" in str(err) or "structure" in str(err) or "stack" in str(err), err
            return
        self.running = [n for n in self.levels if n in names] + [n for n in names if n not in self.levels]

    @precondition(lambda self: self._known())
    @rule(data=st.data())
    def add_stack(self, data):
        names = data.draw(st.lists(st.sampled_from(self._known()), min_size=1, max_size=3, unique=True))
        name = f"stk{len(self.stacks)}-{self.fresh}"
        self.sam.add_stack(name, names)
        self.stacks[name] = tuple(names)

    @rule(data=st.data())
    def call(self, data):
        entries = [None, *self._known(), *self.stacks]
        how = data.draw(st.sampled_from(["running", "one", "rows"]))
        if how == "running":
            adapter = "running"
        elif how == "one":
            adapter = data.draw(st.sampled_from(entries))
        else:
            adapter = data.draw(st.lists(st.sampled_from(entries), min_size=3, max_size=3))
        try:
            self._check(adapter)
        except ValueError as err:  # rows whose stacks mix structures, or a call the caps cannot hold
            assert "structure" in str(err) or "max_" in str(err) or "mix" in str(err), err

    @precondition(lambda self: self._known())
    @rule(data=st.data())
    def train(self, data):
        name = data.draw(st.sampled_from([self.levels[-1], *self.siblings] if self.levels else self.siblings))
        with _backend.torch_twins_on_cpu():
            try:
                trainable = self.sam.train_adapter(name)
            except ValueError as err:
                assert "max_" in str(err), err
                return
            self.running = list(self._stack_for(name))
            params = [p for p in self.sam.model.parameters() if p.requires_grad]
            assert params and all(f".{name}." in n for n in trainable), trainable
            loss = self.sam(input_ids=self.batch).logits.square().sum()
            loss.backward()
            with torch.no_grad():  # (a sign step: every weight moves, so a lost step shows in the logits)
                for p in params:
                    p -= 0.05 * p.grad.sign()
                    p.grad = None
        self._capture(name)

    @precondition(lambda self: self._known())
    @rule(data=st.data())
    def evict(self, data):
        name = data.draw(st.sampled_from(self._known()))
        memory = self.sam.memory
        if not memory.is_resident(name):
            return
        if name in memory.pinned:
            before = memory.resident()
            try:
                memory.evict(name)
            except ValueError:
                assert memory.resident() == before
                return
            raise AssertionError(f"evicted pinned {name!r}")
        memory.evict(name)
        assert not memory.is_resident(name)

    @precondition(lambda self: self.siblings or self.levels)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from([*self.siblings, *self.levels[-1:]]))
        self.sam.delete_adapter(name)
        (self.levels if name in self.levels else self.siblings).remove(name)
        self.running = [n for n in self.running if n != name]
        self.stacks = {k: v for k, v in self.stacks.items() if name not in v}
        if name not in STORED:
            del self.truth[name]
        else:  # the store keeps its copy, and a new add takes that one
            self.truth[name] = self.store.path(name)

    @rule()
    def save_and_load(self):
        folder = os.path.join(self.scratch, f"saved-{len(os.listdir(self.scratch))}")
        self.sam.save(folder)
        self.sam = StackedAdapterModel.load(folder, _base(), store=self.store, **self.caps)
        assert self.sam.levels == self.levels and sorted(self.sam._siblings) == sorted(self.siblings)
        assert self.sam._stacks == self.stacks

    # ------------------------------------------------------------------------------------------- invariants
    @invariant()
    def keeps_its_caps_and_stack(self):
        if not hasattr(self, "sam"):
            return
        memory = self.sam.memory
        assert list(self.sam.active_stack) == self.running
        assert set(self.running) <= set(memory.resident()) and set(self.running) == set(memory.pinned)
        if self.caps["max_active"] is not None:
            assert len(memory.resident()) <= self.caps["max_active"], memory.resident
        if self.caps["max_bytes"] is not None:
            held = sum(api.adapter_nbytes(self.sam.model, n) for n in memory.resident())
            assert held <= self.caps["max_bytes"], (memory.resident(), held)


StackMachine.TestCase.settings = settings(
    max_examples=10, stateful_step_count=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
test_stack_and_adapt_state_machine = StackMachine.TestCase


class _Draws:
    """``data`` for a rule called by hand: its draws, in order."""

    def __init__(self, *values):
        self.values = list(values)

    def draw(self, strategy):
        return self.values.pop(0)


@pytest.mark.parametrize("offload", ["cpu", "drop"])
def test_a_trained_adapter_from_the_store_comes_back_trained_after_its_eviction(offload):
    """The machine's steps where a lost training step would show: a sibling loaded from the store trains, stops
    running, is evicted (with ``offload="drop"`` it must be kept on the host: the store's copy is stale) and is
    called again; then the same after a save and load of the stack."""
    machine = StackMachine()
    try:
        machine.build(max_active=None, small_bytes=False, offload=offload, levels=["fresh"], siblings=["store"])
        machine.train(_Draws("st0"))
        machine.set_depth(_Draws(0))
        machine.evict(_Draws("st0"))
        assert not machine.sam.memory.is_resident("st0")
        machine.call(_Draws("one", "st0"))
        machine.save_and_load()
        machine.call(_Draws("rows", ["st0", None, machine.levels[0]]))
        machine.keeps_its_caps_and_stack()
    finally:
        machine.teardown()
