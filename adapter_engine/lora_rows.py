"""Per-row routes through a :class:`~adapter_engine.lora.LoraLinear`: the mixin holding its routed forward.

Under a :func:`~adapter_engine.routing.use_adapters` route whose rows differ, each batch row runs its own stack::

    y[i] = x[i] W^T + b + sum_{n in row i} scaling_n * dropout(x[i]) A_n^T B_n^T      (IA3 scales per row too)

one fused ``lora_linear`` launch with ``adapter_ids`` (each row's first LoRA; -1 = base only), further LoRA terms
added on their rows only. A layer plans its rows once per route and layer layout (``_row_plan``); serving fuses every
resident LoRA from one stacked copy of the factors per layer (``_stacked_for``); a static route (a CUDA graph's)
reads its rows' ids from a tensor (``_static_forward``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .changes import change_stamp, tensor_version
from .kernels._backend import capturing, int_table, kept, normal_tensors
from .kernels.lora_linear import StackedLoras, lora_linear, lora_linear_stacked, stack_loras
from .kernels.lora_linear_dispatch import mixed_batch_path
from .routing import Route, StaticRoute, check_rows


class RoutedLoraMixin:
    """The per-row routed forward of :class:`~adapter_engine.lora.LoraLinear` (mixed in before ``nn.Module``). It
    reads the layer's ``weight``, ``bias``, ``fan_in_fan_out``, ``in_features`` / ``out_features``, adapter dicts
    (``lora_A``, ``lora_B``, ``scaling``, ``lora_dropout``, ``ia3_l``, ``ia3_feedforward``), ``merged_adapters``,
    ``training`` and ``_base_forward``, and keeps its memos in the layer's ``_stacked`` and ``_snapshot_memo``."""

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
            x = ia3_scaled(x, self._row_scales(ia3_in, x))
        if not fused:
            y = self._base_forward(x)
        else:
            y = self._rows_call(x, snapshot, fused, ids, path, dropout=p0, training=training)
            for n, index, rate in extras:  # rows whose stack holds a further LoRA of this layer: on those rows only
                xd = F.dropout(x[index], rate, training=training and rate > 0)
                y = y.index_add(
                    0, index, lowrank_term(xd, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n])
                )
        if ia3_out is not None:
            y = ia3_scaled(y, self._row_scales(ia3_out, y))
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
        per_row = [ia3_product([self.ia3_l[n] for n in row]) for row in rows]
        per_row = [ones if vec is None else vec for vec in per_row]
        return torch.stack(per_row).view(like.shape[0], *([1] * (like.dim() - 2)), size)


def ia3_product(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    """The product of IA3 vectors in PEFT's order (None for none): ``v_1 * v_2 * ...``."""
    if not vectors:
        return None
    out = vectors[0]
    for v in vectors[1:]:
        out = out * v
    return out


def ia3_scaled(t: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """``t * vec`` in ``t``'s dtype: an fp32 vector of a 16-bit layer scales in fp32 and rounds once, as PEFT's."""
    return t * vec if vec.dtype == t.dtype else (t * vec).to(t.dtype)


def lowrank_term(xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (xd A^T) B^T`` in ``xd``'s dtype: fp32 master factors of a 16-bit layer cast to it, as the fused op
    computes with them (an adapter gives the same numbers fused or computed here)."""
    return F.linear(F.linear(xd, a.to(xd.dtype)), b.to(xd.dtype)) * scaling


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
