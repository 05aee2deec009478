"""Routed serving replayed from CUDA graphs: the host work of a forward paid once per batch shape, not per call.

An eager routed forward of BERT-base runs about 10 ms of Python and kernel launches for about 1.5 ms of GPU work
on an H100 (bench/results, session 7): serving at that size is host-bound, and a mixed batch, with its per-row
grouping, more so than one adapter. A CUDA graph replays the launches of one forward without the Python. What it
cannot replay is a choice made on the host, so :class:`GraphedServer` runs the model under a
:class:`~adapter_engine.routing.StaticRoute`, where no layer chooses anything from the rows (every resident
adapter of a layer takes part; rows pick theirs on the device), and refills the route's ids in place per call::

    server = GraphedServer.for_stacked(stacked)          # or GraphedServer(patched_model)
    out = server(["fr", "de", None, "cardiology"], input_ids=ids, attention_mask=mask)   # one entry per row
    out = server("fr", input_ids=ids, attention_mask=mask)                             # every row

Per call: the inputs are copied into the graph's static tensors, the route is refilled, the graph replays and
its outputs are copied out (``copy_outputs=False`` returns the graph's own output tensors, valid until the next
call). One graph per batch layout (input shapes, dtypes, devices, other arguments) and stack depth, captured on
first use after ``warmup`` eager calls (which also autotune the kernels); a server's graphs share one memory pool, so
more layouts do not each keep a forward's activations.

When graphs are captured again: after any change to a patched layer's adapters (added, deleted, merged,
unmerged; with a memory manager, every load and eviction) and after a conversion of the model in place
(``.to()``, ``.half()``: new addresses for every weight), counted by
:func:`~adapter_engine.changes.adapter_generation`. A graph reads adapter weights and the engine's cached copies at
their capture-time addresses; the server holds those copies (:func:`~adapter_engine.kernels._backend.kept`) so a
cache cannot free them under it. Adapter weights changed in place (an optimizer step, ``restore_adapter`` into the
same tensors) are not seen by the cached stacked copies: call :meth:`GraphedServer.reset` after training.
Graphs pay off when the set of resident adapters is stable: size the memory manager's cap for the working set.

Calls are serialised (one set of static tensors per graph). Rows whose stack holds two LoRAs of one layer, or IA3
adapters, cannot be expressed by a static route: the call is refused before anything changes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .api import list_adapters
from .changes import adapter_generation
from .kernels._backend import capture_cache, keeping_alive
from .routing import Route, StackNames, StaticRoute, make_route, use_adapters

#: ``capture(forward, warmup) -> (replay, output)``: runs ``forward`` ``warmup`` times, captures one more call and
#: returns a function that replays it (writing the same output tensors) and the captured call's output.
Capture = Callable[[Callable[[], Any], int], tuple[Callable[[], None], Any]]


def cuda_graph_capture(forward: Callable[[], Any], warmup: int, pool: Any = None) -> tuple[Callable[[], None], Any]:
    """``forward`` warmed up on a side stream (as torch.cuda.graphs asks), then captured in a CUDA graph; ``pool``:
    a memory pool the graph shares with others (``torch.cuda.graph_pool_handle()``), or None for its own."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # (capture_cache: the first LoRA layer's row grouping serves the others)
    with torch.cuda.graph(graph, pool=pool), capture_cache():
        output = forward()
    return graph.replay, output


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    invalidations: int = 0  # times every graph was dropped after an adapter change


@dataclass
class _Graph:
    route: StaticRoute
    inputs: dict[str, Any]
    replay: Callable[[], None]
    output: Any
    held: list = field(default_factory=list)  # cached device tensors the graph reads (kept alive with it)


class GraphedServer:
    """Per-request routed forwards of a patched model, replayed from CUDA graphs (see the module docstring).

    Args:
        model: a patched Hugging Face model (or anything called as ``model(**inputs)`` whose adapters are routed).
        resolve: maps a route entry's name to its stack (``StackedAdapterModel.stack_for``); default ``(name,)``.
        memory: an :class:`~adapter_engine.memory.AdapterMemoryManager`: each call's adapters are loaded if needed
            and held resident while it runs. Without one, every name must already be an adapter of the model.
        capture: how a forward is captured (default: a CUDA graph; CPU stand-ins in tests).
        warmup: eager calls before a capture.
        copy_outputs: return copies of the outputs (default) or the graph's own tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        resolve: Callable[[str], StackNames] | None = None,
        memory: Any = None,
        capture: Capture | None = None,
        warmup: int = 2,
        copy_outputs: bool = True,
    ) -> None:
        from .stacking import StackedAdapterModel

        if isinstance(model, StackedAdapterModel):  # (its levels ran alone, or: "not loaded into the model")
            raise TypeError(
                "GraphedServer(model) takes the patched model; for a StackedAdapterModel use "
                "GraphedServer.for_stacked(sam): its levels route with the levels below them, its memory manager "
                "keeps them resident"
            )
        self.model = model
        self._resolve = resolve
        self._memory = memory
        self._capture = capture
        self._warmup = int(warmup)
        self._copy_outputs = copy_outputs
        self._graphs: dict[Hashable, _Graph] = {}
        self._pool: Any = None  # the memory pool every CUDA graph of this server shares (see _default_capture)
        self._generation = adapter_generation()
        self._lock = threading.Lock()
        self.stats = GraphStats()

    @classmethod
    def for_stacked(cls, stacked: nn.Module, **kwargs: Any) -> GraphedServer:
        """A server for a :class:`~adapter_engine.stacking.StackedAdapterModel`: its levels and named stacks resolve
        route entries, its memory manager keeps the adapters resident."""
        return cls(stacked.model, resolve=stacked.stack_for, memory=stacked.memory, **kwargs)

    def reset(self) -> None:
        """Drop every graph (the next call of each layout captures again)."""
        with self._lock:
            self._graphs.clear()

    def __call__(self, adapter: Route | str | Sequence[Any] | None, /, **inputs: Any) -> Any:
        """The model's output for ``inputs`` with ``adapter`` routed (a name, a ``Stack``, None, or one entry per
        batch row, as :func:`~adapter_engine.routing.use_adapters` takes)."""
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ValueError("GraphedServer needs the model's inputs as tensors (input_ids=..., ...)")
        batch = tensors[0].shape[0] if tensors[0].dim() else 0
        if batch < 1:
            raise ValueError(f"GraphedServer needs a batch of at least one row, got {tuple(tensors[0].shape)}")
        route = make_route(adapter, resolve=self._resolve)
        rows = route.rows if route.rows is not None else (route.stack,) * batch
        if len(rows) != batch:
            raise ValueError(f"the route has {len(rows)} row stacks but the inputs have a batch of {batch} rows")
        names = route.names
        if self._memory is None:
            unknown = sorted(set(names) - set(list_adapters(self.model)))
            if unknown:
                raise KeyError(f"adapters {unknown} are not loaded into the model; known: {list_adapters(self.model)}")
        resident = self._memory.use(names) if self._memory is not None else contextlib.nullcontext()
        with resident, self._lock, torch.inference_mode():
            output = self._run(rows, inputs)
            return pytree.tree_map_only(torch.Tensor, torch.clone, output) if self._copy_outputs else output

    def _run(self, rows: tuple[StackNames, ...], inputs: dict[str, Any]) -> Any:
        generation = adapter_generation()
        if generation != self._generation:
            self.stats.invalidations += bool(self._graphs)
            self._graphs.clear()
            self._generation = generation
        depth = max(map(len, rows))
        key = (depth, tuple(sorted((k, _layout(k, v)) for k, v in inputs.items())))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture_graph(rows, depth, inputs)
            if adapter_generation() != generation:  # adapters changed while capturing: this graph may be stale
                del self._graphs[key]
                raise RuntimeError("the model's adapters changed during a graph capture; call again")
        else:
            graph.route.fill(rows)  # (checks every row before it writes)
            for k, v in inputs.items():
                if isinstance(v, torch.Tensor):
                    graph.inputs[k].copy_(v)
        graph.replay()
        self.stats.replays += 1
        return graph.output

    def _capture_graph(self, rows: tuple[StackNames, ...], depth: int, inputs: dict[str, Any]) -> _Graph:
        route = StaticRoute(rows, depth)
        static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

        def forward() -> Any:
            with use_adapters(route):
                return self.model(**static)

        capture = self._capture if self._capture is not None else self._default_capture(inputs)
        with keeping_alive() as held:
            replay, output = capture(forward, self._warmup)
        self.stats.captures += 1
        return _Graph(route, static, replay, output, held)

    def _default_capture(self, inputs: dict[str, Any]) -> Capture:
        """CUDA graphs in one memory pool: each graph's own pool would keep a forward's intermediate activations
        per batch layout. Sharing is safe here because calls are serialised, so no two graphs replay at once, and a
        graph's outputs are copied before the next call (``copy_outputs=False``: valid until the next call). A graph
        may then overwrite memory that another graph's capture freed, but no later call reads it."""
        if not all(v.is_cuda for v in inputs.values() if isinstance(v, torch.Tensor)):
            raise ValueError("CUDA graphs need CUDA inputs; on the CPU, call the model under use_adapters(...) instead")
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return functools.partial(cuda_graph_capture, pool=self._pool)


def _layout(name: str, value: Any) -> Hashable:
    """What of an argument a graph is specific to: a tensor's shape, dtype and device; any other value itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name}={value!r}: arguments other than tensors are fixed in a graph, so they must be hashable"
        ) from None
    return ("value", value)
