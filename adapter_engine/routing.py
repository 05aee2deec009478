"""Per-call and per-row adapter routing, safe under concurrent threads.

A *route* says which adapters run for one forward call: one stack for the whole batch, or one stack per batch
row (rows are sequences; the stack broadcasts over a row's tokens). It lives in a ``contextvars.ContextVar``
that the patched modules read while the call runs, so concurrent threads (each has its own context) with
different routes never see each other's choice, and no module attribute changes on the per-call path::

    with use_adapters("cardiology"):                    # every row: this stack
        model(**batch)
    with use_adapters(["fr", "de", None, Stack("a", "b")]):   # row i gets entry i (None = base only)
        model(**batch)

Inside the modules a route is turned into kernel arguments once per distinct layout and cached on the route:
LoRA layers get ``adapter_ids`` for :func:`~adapter_engine.kernels.lora_linear` (one fused launch for the batch;
-1 = base only), bottleneck sublayers a ``routes`` tensor (rows, levels) for the fused bottleneck stack.

Without a route the modules use the model's active adapters (``set_active_adapters``), as before. A uniform
route whose stack holds none of a layer's adapters runs that layer's original computation (bit-identical to
the unpatched model); in a mixed batch, base-only rows share the fused launch (equal up to rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .bottleneck import BottleneckStackLayer, OutputWithAdapters, ResidualOutsideWithAdapters
from .bottleneck_adapter import pack_modules
from .changes import adapter_generation, adapters_changed, change_stamp, registration_epoch, tensor_version
from .config import Stack
from .kernels._backend import capturing, int_table, kept, normal_tensors
from .kernels.bottleneck import expand_routes
from .kernels.bottleneck_pack import StackOptions

#: One adapter stack: names bottom to top (LoRA / IA3 terms are summed, bottleneck adapters stacked in order).
StackNames = tuple[str, ...]


class Route:
    """Which adapters run in one call: ``stack`` for every row, or ``rows`` (one stack per batch row).

    Build it with :func:`make_route` (or pass a spec to :func:`use_adapters`). Device tensors derived from it
    (adapter ids, bottleneck routes) are cached on the instance, so one call builds each layout once.
    """

    __slots__ = ("stack", "rows", "_cache")

    def __init__(self, stack: StackNames | None = None, rows: Sequence[StackNames] | None = None):
        if (stack is None) == (rows is None):
            raise ValueError("a Route has either one stack for all rows or a stack per row, not both / neither")
        self.stack = tuple(stack) if stack is not None else None
        self.rows = tuple(tuple(r) for r in rows) if rows is not None else None
        if self.rows is not None and not self.rows:
            raise ValueError("a per-row route needs at least one row")
        _check_no_repeats((self.stack,) if self.rows is None else self.rows)
        self._cache: dict[Hashable, Any] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter the route uses, in first-use order."""
        stacks = (self.stack,) if self.stack is not None else self.rows
        return tuple(dict.fromkeys(n for s in stacks for n in s))

    @property
    def uniform(self) -> bool:
        return self.stack is not None

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key for this route (a benign race may build twice; the values are equal)."""
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def per_row(self, kind: str, table: torch.Tensor, lead: tuple[int, ...], expand: Callable[[], torch.Tensor]):
        """``expand()``: this route's per-sequence ``table`` (a tensor it caches) with one entry per row of activations
        shaped ``lead``, made once per call and shape rather than in every layer call (each is a copy, a launch on a
        GPU). A normal tensor even under ``torch.inference_mode``: the row grouping of LoRA ids is cached by version,
        which an inference tensor lacks."""

        def build() -> torch.Tensor:
            with normal_tensors():
                return expand()

        return self.cached((kind, id(table), tuple(lead)), build)

    def __repr__(self) -> str:
        return f"Route(stack={self.stack})" if self.uniform else f"Route(rows={self.rows})"


def _check_no_repeats(stacks: Sequence[StackNames]) -> None:
    """A stack names each adapter once, as ``set_active_adapters`` requires (``Stack("a", "a")`` is refused)."""
    for stack in set(stacks):
        if len(set(stack)) != len(stack):
            raise ValueError(f"the route's stack {stack} names an adapter twice: a stack runs each adapter once")


_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("adapter_engine_route", default=None)


class StaticRoute(Route):
    """A per-row route whose device tensors stay at one address and are refilled in place by :meth:`fill`: what a
    CUDA graph of a routed forward reads (:class:`~adapter_engine.serving.GraphedServer`).

    A layer under a static route decides nothing from the rows: a LoRA layer fuses every resident unmerged LoRA on
    the segmented path, a bottleneck layer packs every resident adapter of one structure and runs ``depth`` levels
    on the mixed-row path. The rows only fill the ids / routes tensors, so one captured forward serves every mix of
    those adapters. What a graph cannot change per call is refused by :meth:`fill` (before any tensor changes): two
    LoRAs of one layer in a row, a row deeper than ``depth``, an adapter of another structure than its layer's
    group, IA3 adapters, an adapter twice in a row; a bottleneck layer with levels switched off
    (``set_depth`` / ``set_level_enabled``) is refused when the forward runs.
    """

    __slots__ = ("depth", "_tensors", "_refused")

    def __init__(self, rows: Sequence[StackNames], depth: int):
        super().__init__(rows=rows)
        self.depth = int(depth)
        # key -> (device tensor, the function that makes its table from rows, raising for rows it cannot express)
        self._tensors: dict[Hashable, tuple[torch.Tensor, Callable[[tuple[StackNames, ...]], list]]] = {}
        self._refused: dict[str, str] = {}
        self._check(self.rows)

    def lora_ids(self, fused: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """(rows,) int32: per row, the index in ``fused`` of its stack's LoRA in this layer, -1 for none."""
        index = {n: i for i, n in enumerate(fused)}
        return self._tensor(("lora", fused, device), functools.partial(self._lora_table, index), device)

    def bottleneck_routes(self, group: tuple[str, ...], others: frozenset[str], device: torch.device) -> torch.Tensor:
        """(rows, depth) int32: per row and level, the index in ``group`` of the adapter, -1 for off. ``others``:
        the layer's resident adapters of another structure (a row naming one is refused)."""
        index = {n: i for i, n in enumerate(group)}
        make = functools.partial(self._bottleneck_table, index, others)
        return self._tensor(("bottleneck", group, others, device), make, device)

    def _tensor(self, key: Hashable, make: Callable[[tuple[StackNames, ...]], list], device) -> torch.Tensor:
        if key not in self._tensors:
            self._tensors[key] = (int_table(make(self.rows), device), make)
        return self._tensors[key][0]

    def refuse(self, names: Sequence[str], why: str) -> None:
        """Adapters no row may name (checked now and by every later :meth:`fill`)."""
        self._refused.update(dict.fromkeys(names, why))
        self._check(self.rows)

    def fill(self, rows: Sequence[StackNames]) -> None:
        """Route the next replay: every table is computed (and checked) first, then copied into its tensor."""
        rows = tuple(tuple(r) for r in rows)
        if len(rows) != len(self.rows):
            raise ValueError(f"this static route has {len(self.rows)} rows, got {len(rows)}")
        self._check(rows)
        tables = [(buf, make(rows)) for buf, make in self._tensors.values()]
        for buf, table in tables:
            host = torch.tensor(table, dtype=buf.dtype)
            # pinned, so the copy is queued behind the previous replay instead of waiting for it to end
            buf.copy_(host.pin_memory() if buf.is_cuda else host, non_blocking=buf.is_cuda)
        self.rows = rows

    def _check(self, rows: tuple[StackNames, ...]) -> None:
        _check_no_repeats(rows)
        for i, row in enumerate(rows):
            if len(row) > self.depth:
                raise ValueError(f"row {i} runs a stack of {len(row)} adapters {row}; this route holds {self.depth}")
            refused = [n for n in row if n in self._refused]
            if refused:
                raise ValueError(f"row {i} names {refused[0]!r}: {self._refused[refused[0]]}")

    @staticmethod
    def _lora_table(index: dict[str, int], rows: tuple[StackNames, ...]) -> list[int]:
        table = []
        for i, row in enumerate(rows):
            hits = [n for n in row if n in index]
            if len(hits) > 1:
                raise ValueError(f"row {i} stacks LoRAs {hits} on one layer: a static route takes one LoRA per layer")
            table.append(index[hits[0]] if hits else -1)
        return table

    def _bottleneck_table(self, index: dict[str, int], others: frozenset[str], rows) -> list[list[int]]:
        table = []
        for i, row in enumerate(rows):
            alien = [n for n in row if n in others]
            if alien:
                raise ValueError(
                    f"row {i} names {alien[0]!r}, whose structure differs from the layer's other adapters "
                    f"{sorted(index)}: a static route packs one structure per layer"
                )
            levels = [index[n] for n in row if n in index]
            table.append(levels + [-1] * (self.depth - len(levels)))
        return table


# use_adapters blocks open now, in any thread: what a compiled graph reads instead of the context variable
_ROUTES_OPEN = 0
_ROUTES_OPEN_LOCK = threading.Lock()


def current_route() -> Route | None:
    """The route of the running call in this thread / context, or None (use the model's active adapters). None
    inside a ``torch.compile`` trace, which cannot read the context variable (see :func:`routed_under_compile`)."""
    if torch.compiler.is_compiling():
        return None
    return _ROUTE.get()


def routed_under_compile() -> bool:
    """Whether a routed layer being traced by ``torch.compile`` must run outside the graph (:func:`run_eagerly`):
    while no :func:`use_adapters` block is open anywhere, a compiled graph uses the model's active adapters with no
    graph break; it guards on ``_ROUTES_OPEN``, so a call inside a block compiles again, and its routed layers then
    run eagerly, reading the route (a graph break per layer: correct, not fast). A compiled model used to ignore the
    route there, silently."""
    return torch.compiler.is_compiling() and _ROUTES_OPEN > 0


@torch.compiler.disable
def run_eagerly(forward: Callable, *args, **kwargs):
    """``forward(*args, **kwargs)`` outside the compiled graph (where :func:`current_route` reads the route)."""
    return forward(*args, **kwargs)


# every live patched model's adapter registry (``patching.PatchState``: an ``adapters`` mapping), by id: what a
# route's names are checked against
_ADAPTER_OWNERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def register_adapter_owner(owner: Any) -> None:
    """Let routes check their names against ``owner.adapters`` (a patched model's state registers itself)."""
    _ADAPTER_OWNERS[id(owner)] = owner


def check_route_names(route: Route, layer: nn.Module, layer_names: Iterable[str]) -> None:
    """Refuse a route naming an adapter that neither a patched model nor the calling layer (``layer_names``) holds,
    once per route and adapter generation (a route object reused after an adapter it names is deleted checks again):
    a misspelled name used to run the base model for its rows, silently (``set_active_adapters`` and PEFT's
    ``adapter_names=`` refuse it). Only layers that ``patch`` made check (a layer used alone runs rows naming no
    adapter of its own on the base, as a layer an adapter leaves out does); static routes check their rows when
    filled."""
    generation = adapter_generation()
    if (
        isinstance(route, StaticRoute)
        or route._cache.get("names_known") == generation
        or "_checks_route_names" not in layer.__dict__
    ):
        return
    owners = list(_ADAPTER_OWNERS.values())
    if owners:
        names = set(route.stack) if route.rows is None else {n for row in route.rows for n in row}
        known = set(layer_names).union(*(owner.adapters for owner in owners))
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(f"the route names unknown adapters {unknown}; the patched models hold {sorted(known)}")
    route._cache["names_known"] = generation


def _as_stack(spec: Any, resolve: Callable[[str], StackNames] | None) -> StackNames:
    if spec is None:
        return ()
    if isinstance(spec, str):
        return tuple(resolve(spec)) if resolve is not None else (spec,)
    if isinstance(spec, Stack):
        return tuple(spec.children)
    raise TypeError(f"a route entry must be an adapter name, a Stack or None, got {spec!r}")


def make_route(
    spec: Route | str | Stack | Sequence[str | Stack | None] | None,
    resolve: Callable[[str], StackNames] | None = None,
) -> Route:
    """A :class:`Route` from a spec: a name or ``Stack`` (every row), ``None`` (base only), or a list/tuple with
    one entry per batch row (a name, a ``Stack`` or None). ``resolve`` maps a name to its stack (e.g. a level
    name to the levels below it and itself); by default a name is the one-adapter stack ``(name,)``."""
    if isinstance(spec, Route):
        return spec
    if spec is None or isinstance(spec, (str, Stack)):
        return Route(stack=_as_stack(spec, resolve))
    if isinstance(spec, Sequence):
        memo: dict[Any, StackNames] = {}
        rows = []
        for entry in spec:
            if entry is not None and not isinstance(entry, (str, Stack)):  # (a list entry is not a memo key)
                raise TypeError(
                    f"a route entry must be an adapter name, a Stack or None, got {entry!r} (a row running several "
                    "adapters takes a Stack: Stack('a', 'b'))"
                )
            key = entry.children if isinstance(entry, Stack) else entry
            if key not in memo:
                memo[key] = _as_stack(entry, resolve)
            rows.append(memo[key])
        return Route(rows=rows)
    raise TypeError(f"adapter routing takes a name, a Stack, None or a list with one of those per row, got {spec!r}")


@contextlib.contextmanager
def use_adapters(spec: Route | str | Stack | Sequence[str | Stack | None] | None) -> Iterator[Route]:
    """Run the calls inside the block with this route (see :func:`make_route`); nests, thread- and task-local."""
    global _ROUTES_OPEN
    route = make_route(spec)
    token = _ROUTE.set(route)
    with _ROUTES_OPEN_LOCK:
        _ROUTES_OPEN += 1
    try:
        yield route
    finally:
        with _ROUTES_OPEN_LOCK:
            _ROUTES_OPEN -= 1
        _ROUTE.reset(token)


def check_rows(route: Route, batch: int, where: str) -> None:
    if route.rows is not None and len(route.rows) != batch:
        raise ValueError(f"the route has {len(route.rows)} row stacks but {where} got a batch of {batch} rows")


# ----------------------------------------------------------------------------------------------- bottleneck layers
class RoutedStackMixin:
    """Makes a bottleneck sublayer wrapper read the call's :class:`Route`, and safe to share between threads.

    With a route, the fused op gets every resident adapter of the layer that shares the used adapters'
    structure, packed once and cached (a switch of adapters is a different small ``routes`` tensor, never a
    repack or a recompilation); only the units of the adapters a row block uses are computed by the kernel.
    When adapter weights need gradients, only the used adapters are packed (as without a route).

    The layer's level switches (:meth:`set_depth`, :meth:`set_level_enabled`) apply to every row of a routed call
    too: level ``i`` is the ``i``-th of a row's adapters that this layer holds.
    """

    _MAX_PACKS = 4

    def _routing_init(self) -> None:
        self.__dict__["_pack_lock"] = threading.Lock()
        self.__dict__["_packs"] = {}  # adapter names of a launch -> their pack
        # the same names -> (stamp, each adapter's weights, their versions, all weights, all versions) at packing
        self.__dict__["_pack_states"] = {}
        self.__dict__["_layout"] = None  # (stamp, layout), see _resident_layout

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_pack_lock", None)
        state["_packs"], state["_pack_states"], state["_layout"] = {}, {}, None
        if "_captured_by_thread" in state:
            state["_captured_by_thread"] = {}
        return state

    def __setstate__(self, state):  # deepcopy / pickle: locks and caches are per instance
        super().__setstate__(state)
        self._routing_init()

    def _forget(self) -> None:
        """(Adapters added or deleted, the layer converted in place: CUDA graphs of the old state are stale too.)"""
        super()._forget()
        with self._pack_lock:
            self._packs.clear()
            self._pack_states.clear()
        self.__dict__["_layout"] = None
        adapters_changed()

    def _packed(self, names: list[str], hint: list[list[int]] | None = None):
        """Multi-entry, lock-protected pack cache (the base keeps one entry: threads with different stacks
        would repack on every call). ``names`` may be a :class:`_Group` carrying the adapter modules it was
        built from, so an adapter evicted by another thread meanwhile cannot break this call.

        A pack is made again after an adapter change or conversion (``adapter_generation``), a registration
        anywhere (``registration_epoch``: a weight or module replaced), or an update in place of an adapter this
        call reads (its weights' versions): ``hint`` (per level, the indices into ``names`` that rows use) names
        them. The kernels compute only the units of the adapters a row uses, so a stale copy of another adapter is
        never read, and is made again when a later call uses it. Reading the versions of every resident adapter's
        weights (64 tensors for 16 adapters, cold in the CPU caches) was most of a routed layer call's host time."""
        modules = self._modules_of(names)
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for a in modules for p in a.packed_tensors())
        ):
            return super()._packed(list(names))  # traced, or a differentiable pack (never cached)
        key = tuple(names)
        used = range(len(key)) if hint is None else sorted({i for level in hint for i in level if i >= 0})
        stamp = change_stamp()  # (read before anything it vouches for)
        with self._pack_lock:
            packed, state = self._packs.get(key), self._pack_states.get(key)
        if packed is not None and state[0] == stamp:
            _, weights, versions, every, every_version = state  # (the weights: the same objects while the stamp holds)
            if len(used) == len(key):  # one C-level pass over every weight
                fresh = tuple(map(tensor_version, every)) == every_version
            else:
                fresh = all(tuple(map(tensor_version, weights[i])) == versions[i] for i in used)
            if fresh:
                return kept(packed)  # (a CUDA graph captured now reads it)
        weights = tuple(a.packed_tensors() for a in modules)
        versions = tuple(tuple(map(tensor_version, w)) for w in weights)
        with normal_tensors():  # (a later call that autograd records may save them)
            packed = pack_modules(modules)
        if capturing(packed.wd):  # made inside a CUDA graph: filled only when it replays, so never cached
            return packed
        every = tuple(t for w in weights for t in w)
        with self._pack_lock:
            if key not in self._packs:
                while len(self._packs) >= self._MAX_PACKS:
                    old = next(iter(self._packs))
                    del self._packs[old], self._pack_states[old]
            self._packs[key] = packed
            self._pack_states[key] = (stamp, weights, versions, every, tuple(v for vs in versions for v in vs))
        return kept(packed)

    def _resident_layout(self) -> tuple:
        """(resident adapters by name: one snapshot, other threads may add / evict adapters meanwhile; their
        :class:`_Layout`; this layer's launch groups made so far), kept until an adapter change, a conversion or
        a registration anywhere."""
        stamp = change_stamp()
        memo = self._layout
        if memo is not None and memo[0] == stamp:
            return memo[1]
        resident = dict(self.adapters.items())
        layout = (resident, _Layout(resident), {})
        self.__dict__["_layout"] = (stamp, layout)
        return layout

    def forward(self, *args, **kwargs):
        if routed_under_compile():
            return run_eagerly(super().forward, *args, **kwargs)
        return super().forward(*args, **kwargs)

    def _prepare(self, h: torch.Tensor, eps: float):
        route = current_route()
        if route is None:
            return super()._prepare(h, eps)
        check_route_names(route, self, self.adapters)
        if isinstance(route, StaticRoute):
            return self._static_prepare(h, eps, route)
        if not route.uniform:
            check_rows(route, h.shape[0], type(self).__name__)
        resident, layout, groups = self._resident_layout()
        if torch.is_grad_enabled():  # (whether the pack is differentiable decides its adapters: not cached)
            plan = self._route_plan(route, resident, layout, h.device, eps)
        else:  # every layer over the same adapters and level switches shares one plan per route
            key = ("bn_plan", layout, h.device, eps, self.fused, self._depth, frozenset(self._disabled))
            plan = route.cached(key, lambda: self._route_plan(route, resident, layout, h.device, eps))
        if plan is None:
            return None  # depth 0 at this layer: the original forward runs (bit-identical)
        names, routes, options, hint = plan
        if routes.dim() == 2 and h.dim() >= 3 and self.fused and not torch.is_grad_enabled():
            # serving one route per sequence, the kernel reads one per row: expanded (a copy) once per call and shape,
            # on the route, not in every layer call (the eager modules and training take the per-sequence form)
            table = routes
            routes = route.per_row("bn_routes_per_row", table, h.shape[:-1], lambda: expand_routes(table, h))
        group = groups.get(names)
        if group is None:  # this layer's modules of the launch's adapters
            group = groups[names] = _Group(names, tuple(resident[n] for n in names))
        return group, routes, options, hint

    def _route_plan(self, route: Route, resident: dict[str, nn.Module], layout: _Layout, device, eps: float):
        """(adapter names, routes, options, per-level hint) of ``route`` over ``resident``, or None (depth 0): the
        same for every layer over the same resident adapters (names and structures: ``layout``, whose structure ids
        are compared here rather than the options themselves, a dataclass hash or comparison per adapter)."""
        if route.uniform:
            levels = [[n for n in route.stack if n in resident]]
        else:
            levels = [[n for n in row if n in resident] for row in route.rows]
        if self._disabled or self._depth is not None:  # the layer's set_level_enabled / set_depth, for every row
            levels = [[n for i, n in enumerate(row) if self._level_on(i)] for row in levels]
        used = list(dict.fromkeys(n for row in levels for n in row))
        if not used:
            return None
        structure = dict(layout.pairs)
        if len({structure[n] for n in used}) > 1:
            opts = {resident[n].options for n in used}
            raise ValueError(f"adapters {used} mix structural options {opts}; one stack needs one structure")
        options = dataclasses.replace(resident[used[0]].options, eps=eps)
        trains = torch.is_grad_enabled() and any(p.requires_grad for n in used for p in resident[n].packed_tensors())
        if trains or not self.fused:
            names = tuple(used)
        else:  # every resident adapter of the same structure: one cached pack serves any route over them
            names = tuple(n for n, sid in layout.pairs if sid == structure[used[0]])
        depth = max(len(row) for row in levels)
        index = {n: i for i, n in enumerate(names)}
        table = tuple(tuple(index[n] for n in row) + (-1,) * (depth - len(row)) for row in levels)
        routes = route.cached(("bn_routes", names, table, device), lambda: _routes_tensor(table, route.uniform, device))
        hint = [sorted({row[lvl] for row in table} - {-1}) for lvl in range(depth)]
        return names, routes, options, hint

    def _static_prepare(self, h: torch.Tensor, eps: float, route: StaticRoute):
        """A static route's launch: every resident adapter of the first one's structure, ``route.depth`` levels, on
        the kernels' mixed-row path whatever the rows (the level hint names every adapter and "off" at each
        level), so the same launch serves any rows :meth:`StaticRoute.fill` writes."""
        check_rows(route, h.shape[0], type(self).__name__)
        if self._disabled or self._depth is not None:
            raise ValueError(
                "a static route (a CUDA graph) cannot follow a layer's set_depth / set_level_enabled switches: "
                "reset them (set_depth(None), set_level_enabled(level, True)) or route eagerly"
            )
        resident = dict(self.adapters.items())
        if not resident or route.depth == 0:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for a in resident.values() for p in a.packed_tensors()):
            raise RuntimeError("a static route serves without autograd: call the model under torch.inference_mode()")
        structure = next(iter(resident.values())).options
        names = [n for n, a in resident.items() if a.options == structure]
        group = _Group(names, tuple(resident[n] for n in names))
        routes = route.bottleneck_routes(tuple(names), frozenset(resident) - set(names), h.device)
        hint = [[*range(len(names)), -1] for _ in range(route.depth)]
        return group, routes, self._options(names, eps), hint


_STRUCTURES: dict[StackOptions, int] = {}  # an adapter structure -> a small int (few distinct ones per process)


class _Layout:
    """The resident adapters of a layer as (name, structure id) pairs, hashed once: a route-cache key that every
    layer over the same adapters shares, cheap to hash and compare on each call."""

    __slots__ = ("pairs", "_hash")

    def __init__(self, resident: dict[str, nn.Module]):
        self.pairs = tuple((n, _STRUCTURES.setdefault(a.options, len(_STRUCTURES))) for n, a in resident.items())
        self._hash = hash(self.pairs)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Layout) and self._hash == other._hash and self.pairs == other.pairs)


class _Group(tuple):
    """Adapter names of one launch, with the modules they named when the call started."""

    def __new__(cls, names, modules):
        obj = super().__new__(cls, names)
        obj.modules = modules
        return obj


def _routes_tensor(table, uniform: bool, device: torch.device) -> torch.Tensor:
    routes = int_table(table, device)
    return routes[0] if uniform else routes


class RoutedOutputWithAdapters(RoutedStackMixin, OutputWithAdapters):
    """:class:`~adapter_engine.bottleneck.OutputWithAdapters` that follows the call's route (BERT-style)."""

    def __init__(self, original: nn.Module, **kwargs: Any):
        super().__init__(original, **kwargs)
        self._routing_init()


class RoutedResidualOutsideWithAdapters(RoutedStackMixin, ResidualOutsideWithAdapters):
    """:class:`~adapter_engine.bottleneck.ResidualOutsideWithAdapters` that follows the call's route; the captured
    residual is kept per thread, so concurrent calls do not read each other's residual."""

    def __init__(
        self, original: nn.Module, residual_from: nn.Module | None = None, layer_norm: nn.LayerNorm | None = None
    ):
        self.__dict__["_captured_by_thread"] = {}
        super().__init__(original, residual_from=residual_from, layer_norm=layer_norm)
        self._routing_init()

    @property
    def _captured(self) -> torch.Tensor | None:
        return self.__dict__["_captured_by_thread"].get(threading.get_ident())

    @_captured.setter
    def _captured(self, value: torch.Tensor | None) -> None:
        by_thread = self.__dict__["_captured_by_thread"]
        if value is None:
            by_thread.pop(threading.get_ident(), None)
        else:
            by_thread[threading.get_ident()] = value


def is_routed_layer(module: nn.Module) -> bool:
    return isinstance(module, RoutedStackMixin) and isinstance(module, BottleneckStackLayer)


__all__ = [
    "Route",
    "StaticRoute",
    "make_route",
    "use_adapters",
    "current_route",
    "adapters_changed",
    "registration_epoch",
    "adapter_generation",
    "RoutedOutputWithAdapters",
    "RoutedResidualOutsideWithAdapters",
]
