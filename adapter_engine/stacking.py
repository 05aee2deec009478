"""Strategy 2, "Stack and Adapt": a base model plus an ordered stack of adapters, usable at any depth.

    sam = StackedAdapterModel(AutoModelForSequenceClassification.from_pretrained(path))
    sam.add_adapter("medical", "seq_bn")            # level 1 (fresh), or a saved adapter folder
    sam.train_adapter("medical", train_head=True)    # only this level (and the head) trains
    ... Trainer(model=sam.model, ...).train() or a plain loop over sam(**batch) ...
    sam.add_adapter("cardiology", "seq_bn")         # level 2 builds on level 1
    sam.train_adapter("cardiology")                  # level 1, the base and the head stay frozen
    sam.set_depth(1); sam(**batch)                   # any depth; depth 0 is the base, bit-identical
    sam(**batch, adapter="medical")                  # per call: a level name means the stack up to it
    sam(**batch, adapter=["medical", None, "fr"])    # per row, one fused forward
    sam.delete_adapter("fr")                         # a sibling or the top level: its name is free again
    sam.save("out/"); StackedAdapterModel.load("out/", base_model)

Levels are adapters in the order they were pushed; *siblings* (``level=False``) are resident adapters outside
the stack (one per language, market, ...) for routing. An :class:`~adapter_engine.memory.AdapterMemoryManager`
keeps what is resident under the caps (the running stack is pinned; adapters of a running call are held), and
an :class:`~adapter_engine.store.AdapterStore` supplies adapters lazily on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import api
from ._io import replace_entries, user_path
from .archs import base_prefix
from .config import Stack
from .memory import AdapterMemoryManager
from .patching import is_patched, patch, unpatch
from .persist import like_state_dict, tensor_aliases
from .routing import Route, make_route, use_adapters
from .store import AdapterStore, check_adapter_name

logger = logging.getLogger(__name__)

STACK_FILE = "stack.json"
HEAD_FILE = "head.safetensors"
_UNSET = object()


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head's Parameters: everything outside the base model of a task model (``classifier.*`` in
    ``BertForSequenceClassification``); empty for a bare base model."""
    prefix = base_prefix(model)
    if not prefix:
        return {}
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix + ".")}


def train_adapter(model: nn.Module, name: str, *, train_head: bool = False) -> list[str]:
    """Freeze the base and every other adapter of patched ``model``; leave adapter ``name`` (and the task head
    with ``train_head``) trainable. Returns the names of the trainable Parameters.

    It does not change which adapters run: activate the stack the adapter trains on top of first. An adapter that is not
    active gets a warning (it trained nothing, silently: a forward ran without it), unless calls route it.
    """
    params = api.adapter_parameters(model, name)
    head = head_parameters(model)
    if train_head and not head:
        raise ValueError(f"{type(model).__name__} has no task head outside its base model: train_head=True is void")
    if name not in api.active_adapters(model):
        logger.warning(
            "train_adapter: adapter %r is not active, so a forward runs without it and it gets no gradient unless "
            "calls route it (use_adapters); activate it first (set_active_adapters, with the adapters it trains on "
            "top of)",
            name,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if train_head:
        for p in head.values():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


class StackedAdapterModel(nn.Module):
    """A base model (any patchable HF model, possibly with merged adapters) with a stack of adapter levels.

    A patched model's own adapters are adopted by the memory manager (routable, ``activate``-able, pushed as a level by
    ``add_adapter(name)``), but the stack starts at depth 0: those the model runs are switched off, with a warning.

    Args:
        base_model: the Hugging Face model; it is patched in place (``self.model``).
        initial_adapter: optional first level: a saved adapter folder, or ``(name, config_or_path)``.
        store: an :class:`AdapterStore` (or its directory) for adapters loaded lazily by name.
        max_active, max_bytes, offload: caps and eviction mode of the memory manager (``self.memory``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        initial_adapter: str | os.PathLike | tuple[str, Any] | None = None,
        *,
        store: AdapterStore | str | os.PathLike | None = None,
        max_active: int | None = None,
        max_bytes: int | None = None,
        offload: str = "cpu",
    ) -> None:
        super().__init__()
        undo = _undo_for(base_model)
        self.model = base_model if is_patched(base_model) else patch(base_model)
        self.levels: list[str] = []
        self._running: list[str] = []
        self._stacks: dict[str, tuple[str, ...]] = {}
        self._siblings: list[str] = []
        self._head_trained = False
        try:  # (a refused store or cap too: it used to leave the base patched)
            if store is not None and not isinstance(store, AdapterStore):
                store = AdapterStore(store)
            self.store = store
            self.memory = AdapterMemoryManager(self.model, store, max_active=max_active, max_bytes=max_bytes,
                                               offload=offload)  # fmt: skip
            self._switch_off_adopted()
            if initial_adapter is not None:
                if isinstance(initial_adapter, tuple):
                    self.add_adapter(*initial_adapter)
                else:
                    path = pathlib.Path(initial_adapter)  # (a folder, even when its name has no separator)
                    self.add_adapter(os.path.basename(os.path.normpath(path)), path)
        except BaseException:
            undo()
            raise

    def _switch_off_adopted(self) -> None:
        """A patched ``base_model`` that runs adapters of its own starts at depth 0 like any other: its active adapters
        are switched off (they stay resident, the memory manager's, unpinned), with a warning naming them. They used
        to keep running while ``active_stack`` was ``()`` and ``depth`` 0, unpinned (evictable), until the first level
        change switched them off; ``initial_adapter`` and :meth:`load` switched them off too."""
        active = api.active_adapters(self.model)
        if active:
            logger.warning(
                "the model runs adapters %s: a StackedAdapterModel starts at depth 0 (the base), so they are switched "
                "off; sam.add_adapter(name) pushes one as a level, sam.activate(%r) runs them again",
                list(active), list(active),
            )  # fmt: skip
            api.set_active_adapters(self.model, None)

    # ------------------------------------------------------------------------------------------- building
    def add_adapter(self, name: str, config_or_path: Any = None, *, level: bool = True) -> str:
        """Push a new level (``level=False``: add a sibling for routing). ``config_or_path``: a config (fresh adapter;
        float32 masters on a 16-bit model, as ``add_adapter``'s), an adapter folder (weights kept in the dtype they were
        saved in), or None to take ``name`` from the memory manager (resident, e.g. loaded by an earlier routed call, or
        offloaded to the host) or else load it from the store. The new level runs at once (depth = all levels). Returns
        the name. A refused call (a name taken by a level, sibling or named stack, more levels than ``max_active``, a
        sibling when the running adapters fill ``max_active`` or leave no room for its bytes under ``max_bytes``, a
        level whose structure cannot stack on the others) leaves the model, the levels and the running stack as they
        were. A config or folder for a name the memory manager already holds (resident, or offloaded to the host) is
        refused: it would replace that adapter. So is a name that cannot name a folder (a separator, '.', NUL):
        :meth:`save` writes one per adapter, and refused the whole stack only then, after the level had trained."""
        check_adapter_name(name)
        with self.memory.lock:
            if name in self.levels or name in self._siblings:
                raise ValueError(f"adapter {name!r} is already in this stack (levels {self.levels})")
            if name in self._stacks:
                raise ValueError(
                    f"{name!r} already names a stack {self._stacks[name]}: routing by it would be ambiguous"
                )
            if config_or_path is not None and self.memory.holds(name):  # (a fresh one replaced a host copy, unsaved)
                where = "resident" if self.memory.is_resident(name) else "offloaded to host memory"
                raise ValueError(
                    f"adapter {name!r} is already the memory manager's ({where}): add it with config_or_path=None "
                    "to adopt it, or pick another name"
                )
            cap = self.memory.max_active
            if level and cap is not None and len(self.levels) + 1 > cap:
                raise ValueError(
                    f"cannot add level {name!r}: the {len(self.levels) + 1} levels would all run (pinned) but "
                    f"max_active is {cap} (levels {self.levels}); add it as a sibling (level=False) instead"
                )
            held = config_or_path is None and self.memory.holds(name)  # already the manager's: adopt it
            pinned = sorted(self.memory.pinned)
            if not level and not held and cap is not None and len(pinned) + 1 > cap:
                raise ValueError(  # (it would stay over the cap, and no routed call could hold it beside the pins)
                    f"cannot add sibling {name!r}: the running adapters {pinned} are pinned and fill max_active={cap}; "
                    "run fewer levels (set_depth) or raise max_active"
                )
            if held:
                pass
            elif config_or_path is None:
                if self.store is None:
                    raise ValueError(f"no config or path for {name!r} and no store to load it from")
                self.memory.make_room_for_one()
                self.store.load_into(self.model, name)  # KeyError when the store does not have it
                self.memory.register(name, from_store=True)
            elif _names_a_folder(config_or_path):
                if not os.path.isdir(user_path(config_or_path)):
                    raise FileNotFoundError(f"adapter folder {os.fspath(config_or_path)!r} for {name!r} does not exist")
                self.memory.make_room_for_one()
                # (as saved: a 16-bit adapter of a saved stack came back as fp32 masters, twice its bytes)
                api.load_adapter(self.model, config_or_path, name=name, autocast_adapter_dtype=None)
                self.memory.register(name)
            else:
                self.memory.make_room_for_one()
                api.add_adapter(self.model, name, config_or_path)
                self.memory.register(name)
            if not level:
                if not held:
                    self._fit_sibling(name)
                self._siblings.append(name)
                return name
            self.levels.append(name)
            try:
                self._set_running(self.levels)
            except BaseException:
                self.levels.pop()
                if not held:  # added by this call: take it out again (restoring the running stack may have evicted it)
                    if name in api.list_adapters(self.model):
                        api.delete_adapter(self.model, name)
                    self.memory.forget(name)
                raise
        return name

    def _fit_sibling(self, name: str) -> None:
        """Sibling ``name``, just added, under ``max_bytes`` (its size is known once it is in the model): refused and
        taken out again when it cannot fit beside the pinned running adapters (as under ``max_active``), else idle
        adapters are evicted to make room. It used to stay resident over the cap; beside the pins, no routed call
        could hold it."""
        cap = self.memory.max_bytes
        if cap is None:
            return
        pinned = sorted(self.memory.pinned)
        held = sum(api.adapter_nbytes(self.model, n) for n in pinned)
        own = api.adapter_nbytes(self.model, name)
        if held + own > cap:
            api.delete_adapter(self.model, name)
            self.memory.forget(name)
            raise ValueError(
                f"cannot add sibling {name!r} ({own} bytes): the running adapters {pinned} are pinned and hold "
                f"{held} bytes of max_bytes={cap}; run fewer levels (set_depth) or raise max_bytes"
            )
        self.memory.acquire([name])  # (evicts idle adapters, least recently used first, until it fits)
        self.memory.release([name])

    def delete_adapter(self, name: str) -> None:
        """Take sibling ``name``, or the top level, out of the stack, the memory manager (resident or offloaded to the
        host) and the model, freeing its name (a store keeps its copy); named stacks that include it are dropped. A
        level below others is refused (the levels above were trained on it), changing nothing. Also for an adapter
        deleted through the model (``sam.model.delete_adapter``), whose name the stack kept: ``save`` failed on it and
        ``add_adapter`` refused the name as taken."""
        with self.memory.lock:
            if name not in self.levels and name not in self._siblings:
                raise ValueError(
                    f"{name!r} is not a level or sibling of this stack (levels {self.levels}, siblings "
                    f"{self._siblings})"
                )
            if name in self.levels and name != self.levels[-1]:
                above = self.levels[self.levels.index(name) + 1 :]
                raise ValueError(f"{name!r} is a level below {above}, which were trained on it: delete those first")
            if name in self._running:
                self._set_running([n for n in self._running if n != name])
            if name in api.list_adapters(self.model):
                api.delete_adapter(self.model, name)
            self.memory.forget(name)
            (self.levels if name in self.levels else self._siblings).remove(name)
            for stack in [k for k, v in self._stacks.items() if name in v]:
                logger.info("named stack %r included the deleted adapter %r: dropped", stack, name)
                del self._stacks[stack]

    def add_stack(self, name: str, adapters: Sequence[str] | Stack) -> None:
        """Name a stack for routing (``adapter=name``), e.g. ``add_stack("paed", ["medical", "paediatrics"])``. The
        name must not be an adapter's (levels, siblings, resident, offloaded or in the store): it would shadow it."""
        names = tuple(adapters.children if isinstance(adapters, Stack) else adapters)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a stack name must be a non-empty string, got {name!r}")
        if self._known(name):
            raise ValueError(f"{name!r} is an adapter's name: a stack named so would shadow the adapter in routing")
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"stack {name!r} must name at least one adapter (names as str), got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"stack {name!r} names an adapter twice: {names}")
        unknown = [n for n in names if not self._known(n)]
        if unknown:
            raise ValueError(f"stack {name!r} names unknown adapters {unknown}")
        self._stacks[name] = names

    def _known(self, name: str) -> bool:
        return name in self.levels or name in self._siblings or self.memory.known(name)

    # ------------------------------------------------------------------------------------------- what runs
    @property
    def active_stack(self) -> tuple[str, ...]:
        """The adapters a call without ``adapter=`` runs, bottom to top."""
        return tuple(self._running)

    @property
    def depth(self) -> int:
        return len(self._running)

    def set_depth(self, depth: int) -> None:
        """Run the bottom ``depth`` levels (0 = the base alone, bit-identical to it)."""
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= len(self.levels):
            raise ValueError(f"depth must be an int in [0, {len(self.levels)}] (levels {self.levels}), got {depth!r}")
        self._set_running(self.levels[:depth])

    def activate(self, names: str | Sequence[str]) -> None:
        """Run exactly ``names``: levels keep their stack order, siblings follow on top in the given order."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if not self._known(n)]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; levels {self.levels}, siblings {self._siblings}")
        self._set_running([n for n in self.levels if n in names] + [n for n in names if n not in self.levels])

    def deactivate(self, name: str) -> None:
        """Stop running ``name`` (the levels above it keep running)."""
        if name not in self._running:
            raise ValueError(f"adapter {name!r} is not running (running: {self._running})")
        self._set_running([n for n in self._running if n != name])

    def _set_running(self, names: Sequence[str]) -> None:
        """Pin and activate exactly ``names``; when either is refused, the previous running stack stays pinned and
        active (adapters loaded for the attempt stay resident, unpinned).

        Pinning ``names`` unpins the running stack first, so under a cap the attempt may evict one of its adapters to
        make room, and an eviction also takes it out of the model's active adapters. A refusal therefore pins the
        previous stack again (reloading what was evicted) and activates it again: it used to leave the model running
        the stack without its evicted levels while ``active_stack`` still named them. The model's active adapters are
        restored as they were, not as ``active_stack`` names them: a level merged into the base (``merge_adapter``)
        has left the model, and activating it again failed over the refusal."""
        with self.memory.lock:
            previous, active = self.memory.pinned, api.active_adapters(self.model)
            try:
                self.memory.set_pinned(names)  # resident (loaded if needed) and never evicted while running
                api.set_active_adapters(self.model, list(names) or None)  # all or nothing
            except BaseException:
                self.memory.set_pinned(previous)
                api.set_active_adapters(self.model, list(active) or None)
                raise
            self._running = list(names)

    def stack_for(self, name: str) -> tuple[str, ...]:
        """A route entry's stack: a named stack, a level (the levels up to and including it), or one adapter."""
        if name in self._stacks:
            return self._stacks[name]
        if name in self.levels:
            return tuple(self.levels[: self.levels.index(name) + 1])
        return (name,)

    # ------------------------------------------------------------------------------------------- calls
    @contextlib.contextmanager
    def route(self, adapter: Any) -> Iterator[Route]:
        """Calls inside the block run ``adapter`` (a name, a ``Stack``, None = base, or one entry per batch row);
        its adapters are loaded if needed and held resident until the block ends. Thread- and task-local."""
        route = make_route(adapter, resolve=self.stack_for)
        with self.memory.use(route.names), use_adapters(route):
            yield route

    def forward(self, *args: Any, adapter: Any = _UNSET, **kwargs: Any) -> Any:
        """The model's forward; ``adapter=`` routes this call (see :meth:`route`), else the active stack runs."""
        if adapter is _UNSET:
            return self.model(*args, **kwargs)
        route = make_route(adapter, resolve=self.stack_for)
        inputs = [kwargs.get(k) for k in ("input_ids", "inputs_embeds", "pixel_values")] + list(args[:1])
        rows = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim()), None)
        if route.rows is not None and rows is not None and len(route.rows) != rows:
            # (named here, before any load: the first adapter layer named itself and listed other models' reasons)
            raise ValueError(
                f"adapter= has {len(route.rows)} entries, one per batch row, but the batch has {rows} rows"
            )
        with self.route(route):
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- training
    def train_adapter(
        self, name: str, *, train_head: bool = False, on_top_of: str | Sequence[str] | None = None
    ) -> list[str]:
        """Make adapter ``name`` the one that trains: the stack below it runs (for a level: the levels below it;
        for a sibling: ``on_top_of``, by default nothing), the base and every other adapter are frozen;
        ``train_head`` also trains the task head. Returns the trainable parameter names."""
        if not self._known(name):
            raise ValueError(f"unknown adapter {name!r}; levels {self.levels}, siblings {self._siblings}")
        if on_top_of is not None:
            below = [on_top_of] if isinstance(on_top_of, str) else list(on_top_of)
            unknown = [n for n in below if not self._known(n)]
            if unknown or name in below:
                raise ValueError(f"on_top_of {below} must name other known adapters (unknown: {unknown})")
            self._set_running([*below, name])
        else:
            self._set_running(self.stack_for(name) if name in self.levels else (name,))
        trainable = train_adapter(self.model, name, train_head=train_head)
        self._head_trained |= train_head
        return trainable

    # transformers.Trainer(model=sam, gradient_checkpointing=True) calls these on its model: they failed with
    # AttributeError ('StackedAdapterModel' object has no attribute ...); they act on self.model
    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.activation_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_disable(self) -> Any:
        return self.model.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> Any:
        return self.model.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_activation_checkpointing", False))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    # ------------------------------------------------------------------------------------------- persistence
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict`` with each tensor once: a bottleneck adapter's LayerNorm before its down
        projection is registered twice (``adapter_norm_before`` and ``adapter_down.0``, as AdapterHub's module has
        it), a model's tied weights (GPT-2's ``lm_head`` and ``wte``) too, and safetensors refuses shared tensors.
        ``transformers.Trainer(model=sam)`` saves checkpoints with ``save_file(sam.state_dict())``: it failed at the
        first checkpoint ('Some tensors share memory'). :meth:`load_state_dict` loads such a state dict."""
        state = super().state_dict(*args, **kwargs)
        for key in tensor_aliases(state):
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` of a state dict that holds each shared tensor once (:meth:`state_dict`): a
        name left out loads from the name kept, so a strict load takes it and ``Trainer``'s resume does not warn of
        missing keys."""
        filled = dict(state_dict)
        for key, kept in tensor_aliases(super().state_dict(keep_vars=True)).items():
            if key not in filled and kept in filled:
                filled[key] = filled[kept]
        return super().load_state_dict(like_state_dict(state_dict, filled), strict, assign)

    def save(self, path: str | os.PathLike) -> str:
        """Write every level and sibling (PEFT or AdapterHub format), the routing stacks, the running stack and a
        trained task head into the folder ``path``; returns it. Adapters the memory manager evicted are written too
        (each loaded for its write, then evicted again: the residency is as before). The head counts as trained when
        :meth:`train_adapter` trained it, or when it requires grad beside a frozen base (trained through the function
        :func:`train_adapter` on ``self.model``, or left unfrozen by hand): such a head used to be left out, and the
        reloaded stack ran the base's untrained head. The head of a model nothing of which was frozen is the
        base's own: left out.

        All or nothing: everything is written to a staging folder inside ``path`` first, then each item (an adapter
        folder, the head, ``stack.json``) replaces its earlier version, rolled back if one fails. A failed save leaves
        the folder as it was (it used to leave earlier adapters rewritten beside a stale ``stack.json``); other
        entries of the folder (the other adapters of a store) are left alone."""
        root = user_path(path)
        if os.path.lexists(root) and not os.path.isdir(root):
            raise FileExistsError(f"cannot save a stack to {root!r}: it is a file, not a folder")
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".stack-save-", dir=root)
        try:
            store = AdapterStore(staging)
            names = self.levels + self._siblings
            for name in names:  # (an evicted one is loaded for its write, past the caps, and evicted again)
                with self.memory.reading(name):
                    store.save(self.model, name)
            head = head_parameters(self.model) if self._head_trained or _head_unfrozen(self.model) else {}
            if head:
                save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, os.path.join(staging, HEAD_FILE))
            meta = {"levels": self.levels, "siblings": self._siblings, "running": self._running,
                    "stacks": {k: list(v) for k, v in self._stacks.items()}, "head": bool(head)}  # fmt: skip
            with open(os.path.join(staging, STACK_FILE), "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=2)
            items = [*names, *([HEAD_FILE] if head else []), STACK_FILE]
            replace_entries(root, {item: os.path.join(staging, item) for item in items})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike, base_model: nn.Module, **kwargs: Any) -> StackedAdapterModel:
        """Rebuild a saved stack on ``base_model`` (the same base it was trained on); ``kwargs`` as ``__init__``. A
        refused load (a missing or corrupted level, a head of another size) leaves ``base_model`` as it was."""
        path = user_path(path)
        meta_path = os.path.join(path, STACK_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path!r} is missing: not a folder written by StackedAdapterModel.save")
        meta = _read_stack_file(meta_path)
        tensors = load_file(os.path.join(path, HEAD_FILE)) if meta.get("head") else None
        if tensors is not None:  # checked before the base is patched: a head of another size is named, not half-loaded
            head = head_parameters(base_model)
            if set(tensors) != set(head):
                raise ValueError(f"saved head {sorted(tensors)} does not match the model's head {sorted(head)}")
            wrong = [
                f"{k} {tuple(v.shape)} vs {tuple(head[k].shape)}"
                for k, v in tensors.items()
                if v.shape != head[k].shape
            ]
            if wrong:
                raise ValueError(f"the saved head does not fit the model's (another number of labels?): {wrong}")
        undo = _undo_for(base_model)
        try:
            model = cls(base_model, **kwargs)
            saved = AdapterStore(path)
            for name in meta["siblings"] + meta["levels"]:  # (siblings first: under a cap, the levels then evict them)
                model.add_adapter(name, saved.path(name), level=name in meta["levels"])
            for name, names in meta.get("stacks", {}).items():
                model.add_stack(name, names)
            model.activate(meta["running"]) if meta["running"] else model.set_depth(0)
        except BaseException:
            undo()
            raise
        if tensors is not None:  # (last: its shapes were checked, and a refused load leaves the head as it was)
            head = head_parameters(model.model)
            with torch.no_grad():
                for k, v in tensors.items():
                    head[k].copy_(v)
            model._head_trained = True
        return model


def _head_unfrozen(model: nn.Module) -> bool:
    """Whether ``model``'s task head requires grad while some parameter of its base does not: a head that trains on
    a frozen base (not a model that was never frozen, whose head is the base's own)."""
    head = head_parameters(model)
    if not any(p.requires_grad for p in head.values()):
        return False
    return any(not p.requires_grad for n, p in model.named_parameters() if n not in head)


def _undo_for(base_model: nn.Module):
    """A function that puts ``base_model`` back as it is now, after a refused :meth:`StackedAdapterModel.load`,
    ``initial_adapter``, ``store`` or cap: unpatched if it is not patched now, else without the adapters added since
    and with its active adapters again. A saved stack whose second level was missing or corrupted used to leave the
    base patched, running the levels loaded before the refusal."""
    if not is_patched(base_model):
        return lambda: unpatch(base_model)
    before, active = set(api.list_adapters(base_model)), api.active_adapters(base_model)

    def undo() -> None:
        for name in api.list_adapters(base_model):
            if name not in before:
                api.delete_adapter(base_model, name)
        api.set_active_adapters(base_model, list(active) or None)

    return undo


def _read_stack_file(meta_path: str) -> dict:
    """``stack.json`` as written by :meth:`StackedAdapterModel.save`; a truncated or foreign file is a ValueError
    naming it and what is wrong, before the base model is touched (it used to be a bare JSONDecodeError or
    ``KeyError: 'levels'``)."""
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path!r} is not valid JSON ({err}): a truncated or corrupted stack file") from None
    lists = ("levels", "siblings", "running")
    bad = [k for k in lists if not isinstance(meta, dict) or not isinstance(meta.get(k), list)]
    if bad:
        raise ValueError(f"{meta_path!r} lacks the lists {bad}: not a stack file written by StackedAdapterModel.save")
    return meta


def _names_a_folder(config_or_path: Any) -> bool:
    """Whether ``add_adapter``'s argument is an adapter folder rather than a config or a preset name: a path object,
    or a string naming an existing folder or holding a path separator (no preset or config name does). A folder that
    does not exist is then a FileNotFoundError naming it; it used to be read as a preset name ("unknown adapter config
    name") or, as a ``Path``, as an unsupported config type."""
    if isinstance(config_or_path, os.PathLike):
        return True
    if not isinstance(config_or_path, str):
        return False
    return os.path.isdir(config_or_path) or "/" in config_or_path or os.sep in config_or_path


__all__ = ["StackedAdapterModel", "train_adapter", "head_parameters"]
