"""LoRA and IA3 on a Linear (or GPT-2 ``Conv1D``) layer, running the fused ``lora_linear`` op.

:class:`LoraLinear` replaces an ``nn.Linear`` / ``transformers.pytorch_utils.Conv1D`` in place and keeps the
*same* ``weight`` and ``bias`` Parameter objects under the same names, so the base ``state_dict`` keys, storage
and checkpoints are unchanged. Adapters sit beside them with PEFT's names::

    lora_A[name].weight  (r, in)      lora_B[name].weight  (out, r)      ia3_l[name]  (out,) or (in,)

    y = (x * l_ff) W^T + b                                   base (bit-identical to the original layer)
        + sum_i scaling_i * dropout(x) A_i^T B_i^T           active LoRA adapters, one fused op
    y = y * l_out                                            active IA3 adapters

With no active adapter, ``forward`` runs exactly the original layer's computation (``F.linear`` or Conv1D's
``addmm``), so outputs are bit-identical to the unpatched model.

:func:`fused_peft_forward` is the per-instance forward given to PEFT's own ``lora.Linear`` layers by
``patch(peft_model)``: same outputs and gradients, one fused op; anything it does not cover (DoRA, merged
weights, mixed-batch ``adapter_names``, ...) falls through to PEFT's forward.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .changes import adapters_changed, change_stamp, tensor_version
from .kernels import merge_lora_, scale_ia3_, unmerge_lora_
from .kernels._backend import capturing, int_table, kept, normal_tensors
from .kernels.lora_inputs import forget_stacks
from .kernels.lora_linear import StackedLoras, lora_linear, lora_linear_stacked, stack_loras
from .kernels.lora_linear_dispatch import mixed_batch_path
from .routing import (
    Route,
    StaticRoute,
    check_route_names,
    check_rows,
    current_route,
    routed_under_compile,
    run_eagerly,
)

logger = logging.getLogger(__name__)


# nn.Linear subclasses whose own forward computes x W^T + b as nn.Linear's does (transformers' FalconLinear: a matmul
# and a bias add, the same bits on the CPU)
_FORWARDS_LIKE_LINEAR = ("FalconLinear",)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` computing ``x W^T + b`` (the layers LoRA/IA3 can wrap): not a
    subclass with a forward of its own (:func:`has_own_forward`)."""
    linear = isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoraLinear)
    return linear and not has_own_forward(module)


def has_own_forward(module: nn.Module) -> bool:
    """An ``nn.Linear`` / ``Conv1D`` subclass that overrides ``forward`` (a router, a decoupled or quantized linear,
    transformers' ``IdeficsDecoupledLinear``, ``Llama4Router``): the fused op computes ``x W^T + b`` from its weight
    and would silently replace what that forward does, so such a layer is not wrapped."""
    forward = type(module).forward
    plain = forward is nn.Linear.forward or forward is Conv1D.forward or type(module).__name__ in _FORWARDS_LIKE_LINEAR
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoraLinear) and not plain


OWN_FORWARD = (
    "an nn.Linear subclass with a forward of its own: the fused LoRA op computes x W^T + b and would replace it, so it "
    "cannot carry LoRA/IA3"
)
NOT_LINEAR = "only nn.Linear and transformers Conv1D layers can carry LoRA/IA3"


def not_wrappable(name: str, module: nn.Module) -> str:
    """Why layer ``name`` cannot carry LoRA / IA3 (for an error message)."""
    return f"layer {name!r} is a {type(module).__name__}, " + (OWN_FORWARD if has_own_forward(module) else NOT_LINEAR)


class LoraLinear(nn.Module):
    """Drop-in replacement of a Linear / Conv1D layer carrying LoRA and IA3 adapters (see the module docstring).

    Attributes kept from the base layer: ``weight``, ``bias``, ``in_features``, ``out_features`` (and ``nf``,
    ``nx`` for Conv1D, whose weight is stored transposed: ``(in, out)``, ``fan_in_fan_out=True``).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if isinstance(base, Conv1D):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base.weight.shape
            self.nf, self.nx = base.nf, base.nx
        elif isinstance(base, nn.Linear):
            self.fan_in_fan_out = False
            self.out_features, self.in_features = base.weight.shape
        else:
            raise TypeError(f"LoraLinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.ia3_l = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.ia3_feedforward: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # serving's every-resident stack: (StackedLoras, the snapshot, names and versions it was made at), _stacked_for
        self._stacked: tuple[StackedLoras, tuple, tuple, tuple] | None = None
        self._snapshot_memo: tuple | None = None  # see _snapshot

    # ------------------------------------------------------------------------------------------- adapters
    def add_lora(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: bool | str = True) -> None:
        """Add LoRA adapter ``name``: ``A (r, in)`` Kaiming-uniform and ``B (out, r)`` zero (PEFT's init), or
        both random (``init=False``, as PEFT's ``init_lora_weights=False``)."""
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        a = nn.Linear(self.in_features, r, bias=False, **kw)
        b = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if init is True or init == "lora":
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1.0 / r)
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = float(scaling)
        self.lora_dropout[name] = float(dropout)
        adapters_changed()

    def add_ia3(self, name: str, feedforward: bool, init: bool = True) -> None:
        """Add IA3 vector ``name``: ``(in,)`` for feed-forward layers (scales the input), else ``(out,)``."""
        size = self.in_features if feedforward else self.out_features
        vec = torch.ones(size, device=self.weight.device, dtype=self.weight.dtype)
        if not init:
            nn.init.normal_(vec, mean=1.0, std=0.02)
        self.ia3_l[name] = nn.Parameter(vec)
        self.ia3_feedforward[name] = feedforward
        adapters_changed()

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A or name in self.ia3_l

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_B, self.ia3_l):
            if name in store:
                del store[name]
        for store in (self.scaling, self.lora_dropout, self.ia3_feedforward):
            store.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._stacked = self._snapshot_memo = None  # (an evicted adapter's stacked copies go now, not at the next call)
        adapters_changed()

    # ------------------------------------------------------------------------------------------- forward
    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``...: the parameters keep their objects and in-place versions, so the
        op's cache of stacked factors is told to forget this layer's (see ``lora_inputs._stack_cached``), and the
        layer its own stack (``_stacked_for``)."""
        result = super()._apply(fn, recurse)
        forget_stacks(self.parameters())
        self._stacked = self._snapshot_memo = None
        adapters_changed()  # (CUDA graphs read the weights at their old addresses: GraphedServer captures again)
        return result

    def __getstate__(self):  # deepcopy / pickle: no stacked copies (a copy stacks its own on its first call)
        state = super().__getstate__()
        state["_stacked"] = state["_snapshot_memo"] = None
        return state

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in_fan_out:  # transformers Conv1D.forward, verbatim
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if routed_under_compile():  # a compiled model called inside use_adapters: this layer runs eagerly
            return run_eagerly(type(self).forward, self, x)
        mods = self._modules
        if not mods["lora_A"]._modules and not mods["ia3_l"]._parameters:  # no adapter here (yet): the base layer
            return self._base_forward(x)
        route = current_route()
        if route is not None:
            check_route_names(route, self, (*mods["lora_A"]._modules, *mods["ia3_l"]._parameters))
            if not route.uniform:
                return self._per_row_forward(x, route)
        names = self.active_adapters if route is None else route.stack
        # (submodules read through the module dicts: nn.Module attribute lookups were a good part of a call's host
        # time at decode sizes)
        merged = self.merged_adapters
        lora = [n for n in names if n in mods["lora_A"]._modules and n not in merged]
        ia3 = [n for n in names if n in mods["ia3_l"] and n not in merged]
        if not lora and not ia3:
            return self._base_forward(x)
        for n in ia3:
            if self.ia3_feedforward[n]:
                x = x * self.ia3_l[n]
        if not lora:
            y = self._base_forward(x)
        else:
            y = _fused(x, self.weight, self.bias, mods["lora_A"], mods["lora_B"], self.scaling, self.lora_dropout,
                       lora, self.training, self.fan_in_fan_out)  # fmt: skip
        for n in ia3:
            if not self.ia3_feedforward[n]:
                y = y * self.ia3_l[n]
        return y

    def _per_row_forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """A stack per batch row (rows = ``x.shape[0]``, broadcast over the other leading dims): one fused
        ``lora_linear`` launch with ``adapter_ids`` carries each row's first LoRA adapter (-1 = base only); a
        row's further LoRA adapters (stacks of several LoRAs in one layer, or a different dropout rate in
        training) add masked terms after it; IA3 vectors scale per row. With several adapters in the batch,
        ``lora_linear``'s dispatch computes each row's term with its own adapter only (``path="segmented"``).

        Which names each row uses here is worked out once per route and layer layout (``_row_plan``, cached on
        the route and shared by every layer with the same adapters), not per layer call: at 32 rows and 16 adapters
        it was about half of a layer call's host time (CPU profile).

        Serving (eval mode, no autograd) on the segmented path fuses every resident LoRA of the layer, whichever
        the rows use, as the bottleneck layers pack every resident adapter: one stacked copy of the factors per
        layer serves every mix of requests. Fusing only the used ones made a new concatenation for each new set of
        adapters in a batch, each kept by ``lora_linear``'s cache of stacked factors (device memory outside the
        memory manager's count, until one of the factors is freed). Rows pay for their own adapter only. Under
        autograd, and on the masked path (``_every_resident_isolated``; served only when every row uses the same
        adapter, ``_row_plan``), only the used adapters take part."""
        check_rows(route, x.shape[0], f"LoraLinear(in={self.in_features}, out={self.out_features})")
        if isinstance(route, StaticRoute):
            return self._static_forward(x, route)
        training = self.training
        serving = not training and not torch.is_grad_enabled()
        rows = x.numel() // x.shape[-1]
        # One snapshot of the layer's LoRAs: serving fuses every resident one, also those this call does not hold,
        # which other threads may evict meanwhile (their modules stay alive while the snapshot holds them).
        snapshot = self._snapshot()
        mods_A, _, _, resident, ia3, merged = snapshot
        key = (
            resident,
            ia3,
            merged,
            tuple(self.lora_dropout.get(n, 0.0) for n in resident) if training else None,
            serving,
            rows if serving else None,  # (the path the fused call takes)
            x.device,
        )
        plans = route.cached("lora_row_plans", dict)  # one route entry for all layouts
        plan = plans.get(key)
        if plan is None:
            every_resident = serving and self._every_resident_isolated(mods_A, resident, rows, x)
            plan = plans[key] = self._row_plan(route, training, serving, every_resident, resident, x.device)
        if not plan:
            return self._base_forward(x)
        fused, p0, ids, extras, ia3_in, ia3_out, path = plan
        if ids is not None and x.dim() > 2:  # (lora_linear takes per-sequence ids too, but flattening them copies)
            table, lead = ids, x.shape[:-1]
            expand = lambda: table.reshape(-1, *[1] * (len(lead) - 1)).expand(lead).contiguous()  # noqa: E731
            ids = route.per_row("lora_ids_per_row", table, lead, expand)
        if ia3_in is not None:
            x = x * self._row_scales(ia3_in, x)
        if not fused:
            y = self._base_forward(x)
        else:
            y = self._rows_call(x, snapshot, fused, ids, path, dropout=p0, training=training)
            for n, index, rate in extras:  # rows whose stack holds a further LoRA of this layer: on those rows only
                xd = F.dropout(x[index], rate, training=training and rate > 0)
                term = F.linear(F.linear(xd, self.lora_A[n].weight), self.lora_B[n].weight) * self.scaling[n]
                y = y.index_add(0, index, term)
        if ia3_out is not None:
            y = y * self._row_scales(ia3_out, y)
        return y

    def _snapshot(self) -> tuple:
        """(A modules, B modules, scalings: copies of the layer's dicts; the resident LoRA names, in all three; IA3
        (name, feedforward) pairs; merged names), one consistent view kept until an adapter change or conversion
        (``adapter_generation``), a registration anywhere (``registration_epoch``) or a changed scaling. Copying
        and scanning the dicts on every call cost a routed 16-LoRA layer about 8 us (CPU, whole model)."""
        stamp = change_stamp()
        memo = self._snapshot_memo
        if memo is not None and memo[0] == stamp and memo[1][2] == self.scaling:
            return memo[1]
        mods_A, mods_B, scaling = dict(self.lora_A._modules), dict(self.lora_B._modules), dict(self.scaling)
        resident = tuple(n for n in mods_A if n in mods_B and n in scaling)
        ia3 = tuple((n, self.ia3_feedforward[n]) for n in self.ia3_l)
        snapshot = (mods_A, mods_B, scaling, resident, ia3, tuple(self.merged_adapters))
        self._snapshot_memo = (stamp, snapshot)
        return snapshot

    def _static_forward(self, x: torch.Tensor, route: StaticRoute) -> torch.Tensor:
        """A static route's call (a CUDA graph's): every resident unmerged LoRA fused on the segmented path, each row
        reading its own adapter through the route's ids tensor, whatever the rows hold."""
        if self.training or torch.is_grad_enabled():
            raise RuntimeError("a static route serves without autograd: call the model under torch.inference_mode()")
        snapshot = self._snapshot()
        _, _, _, resident, ia3, merged = snapshot
        ia3 = [n for n, _ in ia3 if n not in merged]
        if ia3:
            route.refuse(ia3, "IA3 scales per row are not in a static route (merge the IA3 adapter, or route eagerly)")
        fused = [n for n in resident if n not in merged]
        if not fused:
            return self._base_forward(x)
        ids = route.lora_ids(tuple(fused), x.device)
        return self._rows_call(x, snapshot, fused, ids, "segmented")

    def _rows_call(self, x, snapshot, fused, ids, path, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
        """One fused ``lora_linear`` launch of the LoRAs ``fused`` for rows picking theirs by ``ids``, read from
        ``snapshot`` (``_snapshot``: the layer's A modules, B modules and scalings when the call started, ...)."""
        mods_A, mods_B, scaling = snapshot[:3]
        if path == "segmented" and not training and not torch.is_grad_enabled():
            stacked = self._stacked_for(snapshot, fused, x)
            if stacked is not None:
                return lora_linear_stacked(x, self.weight, stacked, self.bias, adapter_ids=ids,
                                           fan_in_fan_out=self.fan_in_fan_out, path="auto")  # fmt: skip
        return lora_linear(
            x,
            self.weight,
            _weights(mods_A, fused),
            _weights(mods_B, fused),
            [scaling[n] for n in fused],
            self.bias,
            adapter_ids=ids,
            dropout=dropout,
            training=training,
            fan_in_fan_out=self.fan_in_fan_out,
            path=path,
        )

    def _stacked_for(self, snapshot: tuple, fused: Sequence[str], x: torch.Tensor) -> StackedLoras | None:
        """The factors of ``fused`` checked and stacked for inference, made again for another ``snapshot`` (made
        again itself after an adapter change or conversion in place, a parameter or submodule registered anywhere,
        or another scaling: see ``_snapshot``), other names, or an update in place (each factor's version, one
        C-level pass). Checking those reads no adapter module: in a whole model, where a layer's 32 factor tensors
        and modules are cold in the CPU caches, reading each one's identity, version and address took 36 us per call
        of a 16-LoRA layer (CPU), the versions alone 9 us. Not seen: tensors swapped through ``.data`` or
        ``_parameters`` by hand. None (the caller takes ``lora_linear``) for a weight that is not a plain parameter,
        an inference tensor (no version), or while a CUDA graph is captured without a valid stack (a graph captures
        after eager warm-up calls, which make it)."""
        mods_A, mods_B, scaling = snapshot[:3]
        names = tuple(fused)
        try:
            memo = self._stacked
            if memo is not None:
                made, made_from, made_names, versions = memo
                fresh = made_from is snapshot and made_names == names
                if fresh and tuple(map(tensor_version, made.factors)) == versions:
                    return kept(made)  # (a CUDA graph captured now reads its copies: they must outlive the memo)
            if capturing(x):  # made inside a graph, the copies would be filled only when it replays
                return None
            factors = (*map(_WEIGHT, map(_PARAMETERS, map(mods_A.__getitem__, names))),
                       *map(_WEIGHT, map(_PARAMETERS, map(mods_B.__getitem__, names))))  # fmt: skip
            versions = tuple(map(tensor_version, factors))
        except (KeyError, RuntimeError):
            return None
        n = len(names)
        stacked = stack_loras(x, self.weight, factors[:n], factors[n:], [scaling[k] for k in names], self.bias,
                              fan_in_fan_out=self.fan_in_fan_out)  # fmt: skip
        self._stacked = (stacked, snapshot, names, versions)
        return stacked

    def _every_resident_isolated(
        self, mods_A: dict[str, nn.Module], resident: tuple[str, ...], rows: int, x: torch.Tensor
    ) -> bool:
        """Whether fusing every resident LoRA keeps the rows apart: on the segmented path a row reads its own
        adapter only; on the masked one (small batches over a few small adapters) an unused adapter's non-finite
        weight would reach every row, so there only the adapters the rows use are fused."""
        ranks = [mods_A[n].weight.shape[0] for n in resident if n not in self.merged_adapters]
        return len(ranks) > 1 and mixed_batch_path(rows, ranks, x) == "segmented"

    def _row_plan(
        self,
        route: Route,
        training: bool,
        serving: bool,
        every_resident: bool,
        resident: tuple[str, ...],
        device: torch.device,
    ):
        """() (no row uses an adapter of this layer) or (fused LoRA names, their dropout rate, adapter ids (rows,)
        int32 on ``device``, further LoRA terms [(name, their rows (k,) int64 on ``device``, rate)], IA3 input / output
        names per row or None, ``lora_linear``'s path).
        ``resident``: the layer's LoRAs when the call started; ``every_resident``: fuse every unmerged one of them
        (serving on the segmented path), else only those the rows use. Serving (no autograd) rows that do not all
        use the same adapter take the segmented path too, whatever the batch size: on the masked path a non-finite
        weight of one row's adapter would reach every row."""
        merged = self.merged_adapters
        rows_lora = [[n for n in row if n in resident and n not in merged] for row in route.rows]
        rows_ia3 = [[n for n in row if n in self.ia3_l and n not in merged] for row in route.rows]
        if all(not a and not b for a, b in zip(rows_lora, rows_ia3, strict=True)):
            return ()
        ia3_in = [[n for n in row if self.ia3_feedforward[n]] for row in rows_ia3]
        ia3_out = [[n for n in row if not self.ia3_feedforward[n]] for row in rows_ia3]
        used = list(dict.fromkeys(n for row in rows_lora for n in row))
        fused, p0, ids, extras = [], 0.0, None, []
        if used:
            rate = {n: (self.lora_dropout[n] if training else 0.0) for n in used}
            p0 = rate[used[0]]
            fused = [n for n in used if rate[n] == p0]
            if serving and len({next((n for n in row if n in fused), None) for row in rows_lora}) > 1:
                # rows that differ (several adapters, or adapter and base rows): the masked path would meet every
                # row with every fused adapter's columns (0 * NaN), so serving takes the segmented one, where only
                # a row's own adapter reaches it, as PEFT's per-adapter sub-batches keep rows apart
                every_resident = True
            if every_resident:  # (no dropout outside training: one rate)
                fused = [n for n in resident if n not in merged]
            index = {n: i for i, n in enumerate(fused)}
            firsts = [next((n for n in row if n in index), None) for row in rows_lora]
            table = tuple(index[n] if n is not None else -1 for n in firsts)
            ids = route.cached(("lora_ids", table, device), lambda: int_table(table, device))
            for n in used:
                rows = tuple(i for i, row in enumerate(rows_lora) if n in row and firsts[i] != n)
                if rows:
                    where = route.cached(("lora_rows", rows, device), functools.partial(_row_index, rows, device))
                    extras.append((n, where, rate[n]))
        # every resident LoRA fused: the segmented path, also in layers that share this plan but whose ranks would
        # have the dispatch take the masked one (only the rows' own adapters may reach a row)
        path = "segmented" if every_resident else "auto"
        ia3_in, ia3_out = (ia3_in if any(ia3_in) else None), (ia3_out if any(ia3_out) else None)
        return fused, p0, ids, extras, ia3_in, ia3_out, path

    def _row_scales(self, rows: list[list[str]], like: torch.Tensor) -> torch.Tensor:
        """(rows, 1, ..., features): the product of each row's IA3 vectors (ones for rows without one)."""
        size = like.shape[-1]
        ones = torch.ones(size, dtype=like.dtype, device=like.device)
        per_row = []
        for row in rows:
            vec = ones
            for n in row:
                vec = vec * self.ia3_l[n]
            per_row.append(vec)
        return torch.stack(per_row).view(like.shape[0], *([1] * (like.dim() - 2)), size)

    # ------------------------------------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> list[str]:
        """Fold adapters into ``weight`` (and ``bias`` for output-side IA3) in place; returns the names merged."""
        names = [n for n in (self.active_adapters if names is None else names) if self.has_adapter(n)]
        names = [n for n in names if n not in self.merged_adapters]
        lora = [n for n in names if n in self.lora_A]
        if lora:
            a, b = [self.lora_A[n].weight for n in lora], [self.lora_B[n].weight for n in lora]
            merge_lora_(self.weight, a, b, [self.scaling[n] for n in lora], fan_in_fan_out=self.fan_in_fan_out,
                        safe=safe)  # fmt: skip
        for n in names:
            if n in self.ia3_l:
                self._scale_ia3(n, inverse=False, safe=safe)
        self.merged_adapters.extend(names)
        adapters_changed()
        return names

    @torch.no_grad()
    def unmerge(self, names: Sequence[str] | None = None) -> list[str]:
        """Undo :meth:`merge` (within one rounding per element); returns the names unmerged."""
        names = [n for n in (self.merged_adapters if names is None else names) if n in self.merged_adapters]
        for n in reversed(names):  # merge applied LoRA, then IA3 scalings: undo in reverse order
            if n in self.ia3_l:
                self._scale_ia3(n, inverse=True, safe=False)
        lora = [n for n in names if n in self.lora_A]
        if lora:
            a, b = [self.lora_A[n].weight for n in lora], [self.lora_B[n].weight for n in lora]
            unmerge_lora_(self.weight, a, b, [self.scaling[n] for n in lora], fan_in_fan_out=self.fan_in_fan_out)
        self.merged_adapters = [n for n in self.merged_adapters if n not in names]
        adapters_changed()
        return names

    def _scale_ia3(self, name: str, inverse: bool, safe: bool) -> None:
        vec = self.ia3_l[name]
        ff = self.ia3_feedforward[name]
        # weight (out, in) for Linear, (in, out) for Conv1D: IA3 scales the input (ff) or the output features.
        dim = (1 if ff else 0) if not self.fan_in_fan_out else (0 if ff else 1)
        scale_ia3_(self.weight, vec, dim=dim, inverse=inverse, safe=safe)
        if not ff and self.bias is not None:
            self.bias.copy_(self.bias / vec if inverse else self.bias * vec)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}(in={self.in_features}, out={self.out_features}), adapters={sorted(self.lora_A)}"


def _row_index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """(k,) int64 batch rows on ``device`` that take a further LoRA term. Only those rows compute it: a term computed
    for every row and masked by a multiply gave the other rows 0 * NaN (NaN) when that adapter's weights were not
    finite. A normal tensor even under ``torch.inference_mode`` (a later backward may save it)."""
    with normal_tensors():
        return torch.tensor(rows, dtype=torch.long, device=device)


_PARAMETERS = operator.attrgetter("_parameters")
_WEIGHT = operator.itemgetter("weight")  # (a KeyError for a parametrized weight)


def _weights(children: dict[str, nn.Module], names: list[str]) -> list[torch.Tensor]:
    """``[children[n].weight for n in names]`` through the module dicts themselves: ``ModuleDict.__getitem__`` and
    ``Module.__getattr__`` cost about 1 us per lookup, 37 us per call of a layer serving 16 resident adapters (CPU
    profile of bench_serving's mixed batch), a host cost every LoRA layer pays on every forward. A weight that is
    not a plain parameter (a parametrization) is read the usual way. ``children``: a ModuleDict's ``_modules``, or
    a snapshot of them."""
    out = []
    for n in names:
        child = children[n]
        w = child._parameters.get("weight")
        out.append(child.weight if w is None else w)
    return out


def _fused(x, weight, bias, lora_A, lora_B, scaling, dropout, names, training, fan_in_fan_out):
    """One fused call for the first adapter (with every adapter that draws no dropout mask, when it draws none
    either); the others' terms are added after it.

    Every adapter of the fused call reads the same dropout input, but PEFT draws an independent mask per adapter, in
    order. So in training a first adapter with dropout is fused alone, and each further adapter with a dropout rate
    draws its own mask after it, in PEFT's order (the same random stream as PEFT for one seed); adapters without
    dropout read x. Several adapters in one fused call with dropout shared one mask: up to 2.4 off PEFT's outputs."""
    if len(names) == 1:  # the common case, as single tensors (no lists to build and read: host time at decode sizes)
        (a,), (b,) = _weights(lora_A._modules, names), _weights(lora_B._modules, names)
        return lora_linear(x, weight, a, b, scaling[names[0]], bias, dropout=dropout[names[0]] if training else 0.0,
                           training=training, fan_in_fan_out=fan_in_fan_out)  # fmt: skip
    rate = {n: dropout[n] if training else 0.0 for n in names}
    fused = [names[0]] if rate[names[0]] else [n for n in names if not rate[n]]
    y = lora_linear(
        x,
        weight,
        _weights(lora_A._modules, fused),
        _weights(lora_B._modules, fused),
        [scaling[n] for n in fused],
        bias,
        dropout=rate[names[0]],
        training=training,
        fan_in_fan_out=fan_in_fan_out,
    )
    for n in names:  # in training only: the adapters the fused call left, in PEFT's order
        if n not in fused:
            xd = F.dropout(x, rate[n], training=True) if rate[n] else x
            y = y + F.linear(F.linear(xd, lora_A[n].weight), lora_B[n].weight) * scaling[n]
    return y


# ----------------------------------------------------------------------------------------------- PEFT interop
def _peft_plain_case(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """(active adapter names, base layer, dropout modules by name) when ``layer`` (a PEFT lora.Linear) is in a state
    the fused op covers exactly, else None. Submodules and weights are read through the module dicts: the attribute
    lookups were a quarter of a patched layer call's host time (CPU profile)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    mods = layer._modules
    base = mods["base_layer"]
    if not isinstance(base, (nn.Linear, Conv1D)) or getattr(layer, "lora_variant", None):
        return None
    lora_A, dropout = mods["lora_A"]._modules, mods["lora_dropout"]._modules
    names = [n for n in layer.active_adapters if n in lora_A]
    if not names:
        return None
    use_dora, lora_bias = layer.use_dora, getattr(layer, "lora_bias", {})
    for n in names:
        if use_dora.get(n, False) or lora_bias.get(n, False):
            return None
        if lora_A[n]._parameters["weight"].dtype != x.dtype or not isinstance(dropout[n], (nn.Dropout, nn.Identity)):
            return None
    if base._parameters["weight"].dtype != x.dtype:
        return None
    return names, base, dropout


def _refuse_routes_to_peft(layer: nn.Module) -> None:
    """A PEFT layer runs its own active adapters (or PEFT's ``adapter_names=``), never a :func:`use_adapters` route:
    a route naming its adapters is refused rather than ignored (it ran the active adapter for every row, silently).
    A route naming none of them may be meant for another model called in the same block: it is left alone."""
    route = current_route()
    if route is None:
        return
    names = route.cached("names_set", lambda: frozenset(route.names))
    if not names.isdisjoint(layer._modules["lora_A"]._modules):
        raise ValueError(
            f"a use_adapters route naming {sorted(names)} reached a PEFT LoRA layer, which does not follow routes: "
            'route a PeftModel with its own adapter_names= (one adapter or "__base__" per row) in forward / generate'
        )


def fused_peft_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Per-instance forward for PEFT ``lora.Linear`` layers: the same math as PEFT's, in one fused op."""
    _refuse_routes_to_peft(self)
    plain = _peft_plain_case(self, x, args, kwargs)
    if plain is None:
        return type(self).forward(self, x, *args, **kwargs)
    names, base, dropout = plain
    rates = {n: (dropout[n].p if isinstance(dropout[n], nn.Dropout) else 0.0) for n in names}
    training = any(dropout[n].training for n in names) if any(rates.values()) else self.training
    mods = self._modules
    return _fused(x, base.weight, base.bias, mods["lora_A"], mods["lora_B"], self.scaling, rates, names, training,
                  isinstance(base, Conv1D))  # fmt: skip
