"""LoRA and IA3 on a Linear (or GPT-2 ``Conv1D``) layer, running the fused ``lora_linear`` op.

:class:`LoraLinear` replaces an ``nn.Linear`` / ``transformers.pytorch_utils.Conv1D`` in place and keeps the
*same* ``weight`` and ``bias`` Parameter objects under the same names, so the base ``state_dict`` keys, storage
and checkpoints are unchanged. Adapters sit beside them with PEFT's names::

    lora_A[name].weight  (r, in)      lora_B[name].weight  (out, r)      ia3_l[name]  (out,) or (in,)

    y = (x * l_ff) W^T + b                                   base (bit-identical to the original layer)
        + sum_i scaling_i * dropout(x) A_i^T B_i^T           active LoRA adapters, one fused op
    y = y * l_out                                            active IA3 adapters

With no active adapter, ``forward`` runs exactly the original layer's computation (``F.linear`` or Conv1D's
``addmm``), so outputs are bit-identical to the unpatched model. Under a route whose rows differ, each row runs its
own stack: that routed forward lives in :mod:`adapter_engine.lora_rows` (``RoutedLoraMixin``).

:func:`fused_peft_forward` is the per-instance forward given to PEFT's own ``lora.Linear`` layers by
``patch(peft_model)``: same outputs and gradients, one fused op; anything it does not cover (DoRA, merged
weights, mixed-batch ``adapter_names``, ...) falls through to PEFT's forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .changes import adapters_changed
from .kernels import merge_lora_, scale_ia3_, unmerge_lora_
from .kernels.lora_inputs import forget_stacks
from .kernels.lora_linear import StackedLoras, lora_linear
from .lora_rows import RoutedLoraMixin, _weights, ia3_product, ia3_scaled, lowrank_term
from .routing import StaticRoute, check_route_names, current_route, routed_under_compile, run_eagerly
from .wrapping import share_hooks

logger = logging.getLogger(__name__)


# nn.Linear subclasses whose own forward computes x W^T + b as nn.Linear's does (transformers' FalconLinear: a matmul
# and a bias add, the same bits on the CPU)
_FORWARDS_LIKE_LINEAR = ("FalconLinear",)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` computing ``x W^T + b`` (the layers LoRA/IA3 can wrap): not a
    subclass with a forward of its own (:func:`has_own_forward`)."""
    return _linear_layer(module) and _plain_forward(module)


def has_own_forward(module: nn.Module) -> bool:
    """An ``nn.Linear`` / ``Conv1D`` subclass that overrides ``forward`` (a router, a decoupled or quantized linear,
    transformers' ``IdeficsDecoupledLinear``, ``Llama4Router``): the fused op computes ``x W^T + b`` from its weight
    and would silently replace what that forward does, so such a layer is not wrapped."""
    return _linear_layer(module) and not _plain_forward(module)


def _linear_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, LoraLinear)


def _plain_forward(module: nn.Module) -> bool:
    forward = type(module).forward
    return forward is nn.Linear.forward or forward is Conv1D.forward or type(module).__name__ in _FORWARDS_LIKE_LINEAR


OWN_FORWARD = (
    "an nn.Linear subclass with a forward of its own: the fused LoRA op computes x W^T + b and would replace it, so it "
    "cannot carry LoRA/IA3"
)
NOT_LINEAR = "only nn.Linear and transformers Conv1D layers can carry LoRA/IA3"


def not_wrappable(name: str, module: nn.Module) -> str:
    """Why layer ``name`` cannot carry LoRA / IA3 (for an error message)."""
    return f"layer {name!r} is a {type(module).__name__}, " + (OWN_FORWARD if has_own_forward(module) else NOT_LINEAR)


class LoraLinear(RoutedLoraMixin, nn.Module):
    """Drop-in replacement of a Linear / Conv1D layer carrying LoRA and IA3 adapters (see the module docstring).

    Attributes kept from the base layer: ``weight``, ``bias``, ``in_features``, ``out_features`` (and ``nf``,
    ``nx`` for Conv1D, whose weight is stored transposed: ``(in, out)``, ``fan_in_fan_out=True``).

    Hooks: the layer shares the base layer's forward / backward hook dicts (``wrapping.share_hooks``), so a hook on
    ``q_proj`` registered before the adapter came keeps running, its handle removes it, and one added while wrapped
    stays on the base layer after ``unpatch`` / a merge that unpatches. It runs around this layer's call: it sees the
    layer's input and its *adapted* output (LoRA and IA3 applied), the output the model goes on with, which is what a
    hook that reads ``q_proj``'s output (activation capture, probing) is after. PEFT differs: it keeps the original
    as ``base_layer`` inside its LoRA layer, so a hook on the original sees the base output only.
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
        share_hooks(self, base)  # (the class docstring)

    # ------------------------------------------------------------------------------------------- adapters
    def add_lora(
        self, name: str, r: int, scaling: float, dropout: float = 0.0, init: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        """Add LoRA adapter ``name``: ``A (r, in)`` Kaiming-uniform and ``B (out, r)`` zero (PEFT's init), or
        both random (``init=False``, as PEFT's ``init_lora_weights=False``), or PEFT's ``"gaussian"`` /
        ``"orthogonal"`` (r even; B A is not zero at the start, as in PEFT). dtype: the factors' (None: the base
        weight's; float32 for a 16-bit base keeps master weights, see :func:`adapter_dtype`)."""
        kw = {"device": self.weight.device, "dtype": dtype or self.weight.dtype}
        a = nn.Linear(self.in_features, r, bias=False, **kw)
        b = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        init = init.lower() if isinstance(init, str) else init
        if init is True or init == "lora":
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1.0 / r)
            nn.init.zeros_(b.weight)
        elif init == "orthogonal":  # PEFT's orthogonal_init: B A != 0 from the start, rows of one orthogonal Q
            if r % 2:
                raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got r={r}")
            q, _ = torch.linalg.qr(torch.randn(r, r))
            with torch.no_grad():
                a.weight.copy_((torch.randn(self.in_features, r // 2) @ q[0::2]).T / 10.0)
                b.weight.copy_(torch.randn(r // 2, self.out_features).T @ q[1::2] / 10.0)
        elif init is not False:
            raise ValueError(f"init_lora_weights={init!r}: add_adapter cannot initialise it (True, False, 'gaussian', "
                             "'orthogonal')")  # fmt: skip
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = float(scaling)
        self.lora_dropout[name] = float(dropout)
        adapters_changed()

    def add_ia3(self, name: str, feedforward: bool, init: bool = True, dtype: torch.dtype | None = None) -> None:
        """Add IA3 vector ``name``: ``(in,)`` for feed-forward layers (scales the input), else ``(out,)``. dtype: as
        :meth:`add_lora`'s."""
        size = self.in_features if feedforward else self.out_features
        vec = torch.ones(size, device=self.weight.device, dtype=dtype or self.weight.dtype)
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
            here = (*mods["lora_A"]._modules, *mods["ia3_l"]._parameters)
            check_route_names(route, self, here)
            if not route.uniform:
                # a route none of whose rows uses this layer's adapters runs the base layer, whatever batch the layer
                # sees (OPT's flattened tokens, DeBERTa-v2's relative position embeddings: see routing.check_rows);
                # not a static route, whose rows a CUDA graph refills after capture
                used = route.cached("names_used", lambda: frozenset(route.names))
                if not isinstance(route, StaticRoute) and used.isdisjoint(here):
                    return self._base_forward(x)
                return self._per_row_forward(x, route)
        names = self.active_adapters if route is None else route.stack
        # (submodules read through the module dicts: nn.Module attribute lookups were a good part of a call's host
        # time at decode sizes)
        merged = self.merged_adapters
        lora = [n for n in names if n in mods["lora_A"]._modules and n not in merged]
        ia3 = [n for n in names if n in mods["ia3_l"] and n not in merged]
        if not lora and not ia3:
            return self._base_forward(x)
        scale_out = None
        if ia3:  # several IA3 vectors scale once, by their product (PEFT's order: one rounding of x or y)
            ff = self.ia3_feedforward
            scale_in = ia3_product([self.ia3_l[n] for n in ia3 if ff[n]])
            scale_out = ia3_product([self.ia3_l[n] for n in ia3 if not ff[n]])
            if scale_in is not None:
                x = ia3_scaled(x, scale_in)
        if not lora:
            y = self._base_forward(x)
        else:
            y = _fused(x, self.weight, self.bias, mods["lora_A"], mods["lora_B"], self.scaling, self.lora_dropout,
                       lora, self.training, self.fan_in_fan_out)  # fmt: skip
        if scale_out is not None:
            y = ia3_scaled(y, scale_out)
        return y

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
            y = y + lowrank_term(xd, lora_A[n].weight, lora_B[n].weight, scaling[n])
    return y


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of a new LoRA / IA3 adapter's weights on a base layer of ``base_dtype``: float32 for a float16 /
    bfloat16 base with ``autocast_adapter_dtype`` (PEFT's default: fp32 master weights, which an optimizer updates
    without rounding each step to 8 or 11 bits; the fused op computes with them in the base's dtype, as autocast
    does), else the base's own."""
    return torch.float32 if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16) else base_dtype


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
        factor = lora_A[n]._parameters["weight"].dtype
        if factor not in (x.dtype, torch.float32) or not isinstance(dropout[n], (nn.Dropout, nn.Identity)):
            return None  # (fp32 factors of a 16-bit layer, PEFT's autocast_adapter_dtype, are fused as masters)
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
