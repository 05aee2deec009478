"""Bottleneck sublayers that follow the call's route (:mod:`adapter_engine.routing`), safe to share between threads.

:class:`RoutedStackMixin` turns a route into the fused bottleneck stack's arguments: every resident adapter of the
layer that shares the used adapters' structure, packed once and cached per layer, and a small ``routes`` tensor
(rows, levels) per route. :class:`RoutedOutputWithAdapters` and :class:`RoutedResidualOutsideWithAdapters` are the
wrappers ``patch`` places. Kept apart from :mod:`adapter_engine.routing`, which defines routes and which the LoRA
layers import too; this module imports it, never the reverse (routing re-exports these names lazily).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from torch import nn

from .bottleneck import (
    BottleneckStackLayer,
    OutputWithAdapters,
    ResidualOutsideWithAdapters,
    same_tensors,
    structure_differences,
)
from .bottleneck_adapter import pack_modules
from .changes import adapters_changed, change_stamp, tensor_version
from .kernels._backend import capturing, int_table, kept, normal_tensors
from .kernels.bottleneck import expand_routes
from .kernels.bottleneck_pack import StackOptions
from .routing import Route, StaticRoute, check_route_names, check_rows, current_route, routed_under_compile, run_eagerly


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

    def _packed(self, names: list[str], hint: list[list[int]] | None = None, dtype: torch.dtype | None = None):
        """Multi-entry, lock-protected pack cache (the base keeps one entry: threads with different stacks
        would repack on every call). ``names`` may be a :class:`_Group` carrying the adapter modules it was
        built from, so an adapter evicted by another thread meanwhile cannot break this call.

        A pack is made again after an adapter change or conversion (``adapter_generation``), a registration
        anywhere (``registration_epoch``: a weight or module replaced), or an update in place of an adapter this
        call reads (its weights' versions): ``hint`` (per level, the indices into ``names`` that rows use) names
        them, and so does a used adapter's weight swapped through its module's ``_parameters``, which no registration
        hook sees (``torch.func.functional_call``: it ran the pack of the model's own weights, silently). The kernels
        compute only the units of the adapters a row uses, so a stale copy of another adapter is never read, and is
        made again when a later call uses it. Reading the versions of every resident adapter's weights (64 tensors
        for 16 adapters, cold in the CPU caches) was most of a routed layer call's host time."""
        modules = self._modules_of(names)
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for a in modules for p in a.packed_tensors())
        ):
            return super()._packed(list(names), dtype=dtype)  # traced, or a differentiable pack (never cached)
        key = (tuple(names), dtype)  # (the dtype its float32 masters are cast to: pack_modules)
        used = range(len(names)) if hint is None else sorted({i for level in hint for i in level if i >= 0})
        stamp = change_stamp()  # (read before anything it vouches for)
        with self._pack_lock:
            packed, state = self._packs.get(key), self._pack_states.get(key)
        if packed is not None and state[0] == stamp:
            _, weights, versions, every, every_version = state  # (the weights: the same objects while the stamp holds)
            if len(used) == len(names):  # one C-level pass over every weight
                fresh = tuple(map(tensor_version, every)) == every_version
            else:
                fresh = all(tuple(map(tensor_version, weights[i])) == versions[i] for i in used)
            if fresh and all(same_tensors(modules[i].packed_tensors(), weights[i]) for i in used):
                return kept(packed)  # (a CUDA graph captured now reads it)
        weights = tuple(a.packed_tensors() for a in modules)
        versions = tuple(tuple(map(tensor_version, w)) for w in weights)
        with normal_tensors():  # (a later call that autograd records may save them)
            packed = pack_modules(modules, dtype)
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
        if routes.dim() == 2 and h.dim() >= 3 and self.fused and not torch.is_grad_enabled() and not self._drops(names):
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
            differ = structure_differences({n: resident[n].options for n in used})
            raise ValueError(
                f"adapters {used} mix structural options ({differ}); one stack needs one structure (route rows "
                "of different structures in separate calls)"
            )
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

    def _capture(self, module, args):
        if routed_under_compile():  # the wrapper's forward runs eagerly (see forward): so does its residual's capture
            return run_eagerly(super()._capture, module, args)
        return super()._capture(module, args)

    @property
    def _captured(self) -> torch.Tensor | None:
        return self.__dict__["_captured_by_thread"].get(_thread_key())

    @_captured.setter
    def _captured(self, value: torch.Tensor | None) -> None:
        by_thread = self.__dict__["_captured_by_thread"]
        if value is None:
            by_thread.pop(_thread_key(), None)
        else:
            by_thread[_thread_key()] = value


def _thread_key() -> int | None:
    """The key of the calling thread's captured residual; None in a graph ``torch.compile`` traces (which captures
    and reads it in one graph; dynamo cannot trace ``threading.get_ident``: two graph breaks per layer, and
    ``fullgraph=True`` failed)."""
    return None if torch.compiler.is_compiling() else threading.get_ident()


def is_routed_layer(module: nn.Module) -> bool:
    return isinstance(module, RoutedStackMixin) and isinstance(module, BottleneckStackLayer)


__all__ = ["RoutedStackMixin", "RoutedOutputWithAdapters", "RoutedResidualOutsideWithAdapters", "is_routed_layer"]
