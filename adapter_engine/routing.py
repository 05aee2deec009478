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

The routed bottleneck layers live in :mod:`adapter_engine.routed_bottleneck` (which imports this module); their
names are still reachable here, lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .changes import adapter_generation, adapters_changed, registration_epoch
from .config import Stack
from .kernels._backend import int_table, normal_tensors

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


def set_route_owner(layer: nn.Module, owner: Any) -> None:
    """Make ``layer`` (an adapter layer that ``patch`` made) check a route's names against ``owner.adapters``: the
    adapters of the model that holds the layer (its ``patching.PatchState``, whose ``serial`` tells models apart)."""
    layer.__dict__["_route_owner"] = owner


def check_route_names(route: Route, layer: nn.Module, layer_names: Iterable[str]) -> None:
    """Refuse a route naming an adapter that neither the calling layer's model nor the layer (``layer_names``) holds,
    once per route, model and adapter generation (a route object reused after an adapter it names is deleted checks
    again): a misspelled name used to run the base model for its rows, silently (``set_active_adapters`` and PEFT's
    ``adapter_names=`` refuse it). The check is per model: against every live model's adapters, a name only another
    model held (or one a memory manager evicted from this one) ran the base here, silently. Only layers that ``patch``
    made check (a layer used alone runs rows naming no adapter of its own on the base, as a layer an adapter leaves
    out does); static routes check their rows when filled."""
    owner = layer.__dict__.get("_route_owner")
    if owner is None or isinstance(route, StaticRoute):
        return
    generation = adapter_generation()
    checked = route._cache.get("names_known")  # model serial -> the adapter generation its check passed at
    if checked is not None and checked.get(owner.serial) == generation:
        return
    names = set(route.stack) if route.rows is None else {n for row in route.rows for n in row}
    known = set(layer_names).union(owner.adapters)
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(
            f"the route names unknown adapters {unknown}: this model holds {sorted(known)} (an adapter a memory "
            "manager evicted is loaded again by memory.use / StackedAdapterModel.route, not by use_adapters)"
        )
    if checked is None:
        checked = route._cache.setdefault("names_known", {})
    checked[owner.serial] = generation


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
        raise ValueError(
            f"the route has {len(route.rows)} row stacks but {where} got a batch of {batch} rows: a per-row route "
            "takes one entry per input row, and only layers that see those rows can follow it; layers fed "
            "flattened tokens (OPT's fc1 / fc2), relative position embeddings (DeBERTa-v2's query_proj / key_proj "
            "with relative attention) or a batch that beam search multiplied cannot: route those per call"
        )


# the routed bottleneck layers, moved to routed_bottleneck (which imports this module, so they cannot be imported at
# the top here): ``routing.RoutedStackMixin`` and ``from adapter_engine.routing import is_routed_layer`` still work
_MOVED = ("RoutedStackMixin", "RoutedOutputWithAdapters", "RoutedResidualOutsideWithAdapters", "is_routed_layer")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from . import routed_bottleneck

        return getattr(routed_bottleneck, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Route",
    "StaticRoute",
    "make_route",
    "use_adapters",
    "current_route",
    "adapters_changed",
    "registration_epoch",
    "adapter_generation",
]
