"""The sublayer wrappers that run a stack of bottleneck adapters (``bottleneck_adapter.BottleneckAdapter``, one
adapter with AdapterHub's parameter names) through the fused op.

A wrapper replaces one Hugging Face sublayer instance and keeps its children under their own names, so the
base weights' state_dict keys do not change and the adapters appear as ``<sublayer>.adapters.<name>.*``,
AdapterHub's keys. Two wrapper forms:

- ``OutputWithAdapters``: the sublayer adds its residual itself (``BertOutput``/``BertSelfOutput``, RoBERTa,
  ViT's ``ViTOutput``): ``out = LN(dropout(dense(x)) + y)`` or ``dense(x) + y`` (no LN, pre-LN models).
- ``ResidualOutsideWithAdapters``: the block adds the residual after the sublayer (Llama/GPT-2 MLP and
  attention, ViT's attention output); the residual ``y`` is captured by a forward pre-hook on the module whose
  input it is (e.g. ``post_attention_layernorm``), and the wrapper returns ``r_n`` so the block's own ``+ y``
  completes AdapterHub's ``r_n + y``.

Depth 0 (no active level) calls the original module's forward: bit-identical to the unpatched model.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
from torch import nn

from .bottleneck_adapter import BottleneckAdapter, pack_modules, repack, split_pack
from .changes import registration_epoch, tensor_version
from .kernels import bottleneck_dispatch
from .kernels._backend import capturing, int_table, kept, normal_tensors
from .kernels.bottleneck import PackedStack, StackOptions, bottleneck_stack, expand_routes
from .wrapping import StandIn

logger = logging.getLogger(__name__)

# Training (autograd recording a stack that needs gradients) runs the eager modules unless this is True. On an H100
# (bench/results/2026-11-27-h100-session7) the fused backward was the slower one everywhere it was measured: a
# stack of 3 alone, top level training, 4096 rows: 3.30 vs 1.66 ms (hidden 768), 4.81 vs 2.00 ms (4096); whole
# models, a training step of the top of 3: 60.2 vs 43.3 ms (bert-base), 41.3 vs 35.1 ms (Llama-shaped). The fused
# forward serves inference, where it was the faster. Both backwards compute the same gradients (tests). A forward
# under autograd counts as training when anything it reads requires grad (a base model whose weights were never
# frozen, say): serve under ``torch.inference_mode()`` or ``torch.no_grad()`` to get the fused forward.
TRAIN_FUSED = False


class BottleneckStackLayer(StandIn):
    """Base of the sublayer wrappers: an ``adapters`` ModuleDict, an ordered active stack, depth control,
    per-level switches and per-row stacks. Subclasses define ``forward``. An instance is also one of the wrapped
    module's class and runs its hooks (``wrapping.StandIn.takes_class``): transformers' ``output_attentions`` hooks
    find the attention sublayers it wraps."""

    takes_class = True

    def __init__(self, original: nn.Module):
        super().__init__(original)
        self.adapters = nn.ModuleDict()
        self.fused = True  # False: AdapterHub-style eager modules (the baseline; also what torch.compile sees)
        self._stack: list[str] = []
        self._depth: int | None = None
        self._disabled: set[int] = set()
        self._row_stacks: list[list[str | None]] | None = None
        self._cache: dict = {}
        # bumped by every change of what runs (the setters below): _prepare reuses its last result until then
        self._generation = 0
        self._prepared: tuple | None = None
        self._pack_memo: tuple | None = None  # see _packed
        self._train_memo: tuple | None = None  # see _training_pack
        self._launches: dict[tuple, tuple] = {}  # see _serve

    def _original_forward(self, *args, **kwargs):
        """The wrapped class's forward run on this wrapper: its current children (e.g. a LoRA-wrapped ``dense``)
        and its ``training`` flag; the same ops as the unpatched module, so bit-identical."""
        return type(self._original).forward(self, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``...: the adapters' parameters keep their objects and in-place versions,
        so the packs cached from them (keyed on both) are dropped here, with every other cached tensor."""
        result = super()._apply(fn, recurse)
        self._forget()
        return result

    def __getstate__(self):  # deepcopy / pickle: no memo of packs or launches (a copy makes its own)
        state = super().__getstate__()
        state["_pack_memo"], state["_train_memo"], state["_launches"] = None, None, {}
        return state

    def _forget(self) -> None:
        """Drop the cached packs and routes, and the prepared plan and launch."""
        self._cache.clear()
        self._pack_memo, self._train_memo, self._launches = None, None, {}
        self._generation += 1

    # ---------------------------------------------------------------------------------------- control
    def add_adapter(self, name: str, adapter: BottleneckAdapter) -> None:
        if not isinstance(adapter, BottleneckAdapter):
            raise TypeError(f"expected a BottleneckAdapter, got {type(adapter).__name__}")
        # the layer's mode, as model.train() / .eval() would have set it: a new module starts in training mode, and
        # an adapter with dropout loaded into an eval model drew masks wherever the eager modules ran (under autograd)
        adapter.train(self.training)
        self.adapters[name] = adapter
        self._forget()

    def delete_adapter(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self._stack = [n for n in self._stack if n != name]
        self._forget()

    def set_active_stack(self, names: Sequence[str] | str | None) -> None:
        """The adapters run bottom to top (AdapterHub ``Stack``); None or [] disables them."""
        names = [names] if isinstance(names, str) else list(names or [])
        self._check_names(names)
        self._stack = names
        self._generation += 1

    @property
    def active_stack(self) -> list[str]:
        return list(self._stack)

    def set_depth(self, depth: int | None) -> None:
        """Run only the bottom ``depth`` levels (0 = the sublayer alone, None = all)."""
        if depth is not None and depth < 0:
            raise ValueError(f"depth must be >= 0 or None, got {depth}")
        self._depth = depth
        self._generation += 1

    def set_level_enabled(self, level: int, enabled: bool = True) -> None:
        """Switch one level of the stack (0 = bottom) off or on again, for every row."""
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        (self._disabled.discard if enabled else self._disabled.add)(level)
        self._generation += 1

    def set_row_stacks(self, stacks: Sequence[Sequence[str | None]] | None) -> None:
        """A stack per batch row (bottom to top; None = level off, shorter = shallower); None = uniform stack."""
        if stacks is not None:
            stacks = [list(s) for s in stacks]
            self._check_names([n for s in stacks for n in s if n is not None])
        self._row_stacks = stacks
        self._generation += 1

    def _check_names(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"unknown adapters {missing}; this layer has {list(self.adapters)}")

    def _level_on(self, level: int) -> bool:
        return level not in self._disabled and (self._depth is None or level < self._depth)

    def _plan(self, rows: int, device: torch.device):
        """(adapter names, routes ((L,) or (rows, L) indices into names, -1 = off), per-level index lists) or None
        when nothing is active. Routes live on the device and are cached per configuration."""
        if self._row_stacks is None:
            levels = [n for i, n in enumerate(self._stack) if self._level_on(i)]
            if not levels:
                return None
            names = list(dict.fromkeys(levels))
            table = [[names.index(n) for n in levels]]
        else:
            if len(self._row_stacks) != rows:
                raise ValueError(f"set_row_stacks got {len(self._row_stacks)} rows but the batch has {rows}")
            depth = max((len(s) for s in self._row_stacks), default=0)
            named = [
                [(s[i] if i < len(s) and self._level_on(i) else None) for i in range(depth)] for s in self._row_stacks
            ]
            names = list(dict.fromkeys(n for row in named for n in row if n is not None))
            if not names:
                return None
            table = [[names.index(n) if n is not None else -1 for n in row] for row in named]
        key = ("routes", tuple(names), tuple(map(tuple, table)), self._row_stacks is None, device)
        if key not in self._cache:
            routes = int_table(table, device)
            self._cache[key] = routes[0] if self._row_stacks is None else routes
        hint = [sorted({row[lvl] for row in table} - {-1}) for lvl in range(len(table[0]))]
        return names, self._cache[key], hint

    def _options(self, names: list[str], eps: float) -> StackOptions:
        opts = {n: self.adapters[n].options for n in names}
        if len(set(opts.values())) > 1:
            differ = structure_differences(opts)
            raise ValueError(f"adapters {names} mix structural options ({differ}); one stack needs one structure")
        return _replace(opts[names[0]], eps=eps)

    def _modules_of(self, names: Sequence[str]) -> list[BottleneckAdapter]:
        """The adapters of ``names`` (routed_bottleneck's groups carry the modules they named when the call started)."""
        modules = getattr(names, "modules", None)
        return list(modules) if modules is not None else [self.adapters[n] for n in names]

    def _packed(self, names: list[str], hint: list[list[int]] | None = None, dtype: torch.dtype | None = None):
        """The pack of ``names`` for activations of ``dtype`` (float32 masters of a 16-bit model packed as their casts
        to it, :func:`~adapter_engine.bottleneck_adapter.pack_modules`; ``hint``: the indices rows use per level; the
        routed layers read it), made again after an update in place of one of their weights (its version), a change
        of this layer (``_generation``: an adapter added or deleted, another stack, a conversion in place), a
        registration anywhere (``registration_epoch``: a weight replaced) or a weight swapped through its module's
        ``_parameters``, which no registration hook sees (``torch.func.functional_call``)."""
        names = tuple(names)
        if torch.compiler.is_compiling():
            # traced: the graph packs the weights itself, so it follows their updates in place. No cache: its key
            # reads the weights' versions, which dynamo cannot specialise (inference under no_grad, where the pack
            # is cacheable, failed to compile with fullgraph=True, a graph break per layer without)
            return pack_modules([self.adapters[n] for n in names], dtype)
        stamp = (self._generation, registration_epoch(), dtype)
        memo = self._pack_memo
        weights = [self.adapters[n].packed_tensors() for n in names]
        params = tuple(p for w in weights for p in w)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._training_pack(names, weights, params, stamp, dtype)
        if (
            memo is not None
            and memo[0] == stamp
            and memo[1] == names
            and same_tensors(params, memo[2])
            and tuple(map(tensor_version, params)) == memo[3]
        ):
            return kept(memo[4])  # (a CUDA graph captured now reads it)
        versions = tuple(p._version for p in params)
        key = ("packed", names, tuple(map(id, params)), versions, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            packed = hit[1]
            self._cache = _keep_recent_packs(self._cache, key, *hit)  # (now the most recent)
        else:
            with normal_tensors():  # (a cached pack may be saved for the backward of a later call)
                packed = pack_modules([self.adapters[n] for n in names], dtype)
            if capturing(params[0]):  # (one made inside a graph is filled only when it replays)
                return packed
            self._cache = _keep_recent_packs(self._cache, key, params, packed)
        self._pack_memo = (stamp, names, params, versions, packed)
        return kept(packed)

    def _training_pack(self, names: tuple[str, ...], weights: list[tuple], params: tuple, stamp, dtype) -> PackedStack:
        """The differentiable pack of a training call: the frozen adapters' parts are copied once and kept
        (``bottleneck_adapter.split_pack``), and each call concatenates them with the current weights of the adapters
        that train. Copied again after a change of this layer or a registration anywhere (``stamp``), another set of
        weights requiring grad, or an update in place, a new dtype or device of a frozen weight (versions and data
        pointers: ``.to()`` on an adapter module alone swaps its tensors' data)."""
        grads = tuple(map(_requires_grad, params))
        memo = self._train_memo
        if memo is None or memo[:3] != (stamp, names, grads) or _frozen_state(memo[3]) != memo[4]:
            with torch.no_grad():
                split = split_pack([self.adapters[n] for n in names], dtype)
            frozen = tuple(p for p, g in zip(params, grads, strict=True) if not g)
            memo = (stamp, names, grads, frozen, _frozen_state(frozen), split)
            if not capturing(params[0]):
                self._train_memo = memo
        split = memo[5]
        if split is not None:
            return repack(split, weights)
        return pack_modules([self.adapters[n] for n in names], dtype)

    def _prepare(self, h: torch.Tensor, eps: float):
        """(adapter names, routes, options, per-level hint) for this batch, or None at depth 0 (run the original
        forward)."""
        rows = h.shape[0] if self._row_stacks is not None else 1
        key = (self._generation, rows, h.device, eps)
        prepared = self._prepared
        if prepared is not None and prepared[0] == key:
            return prepared[1]
        plan = self._plan(rows, h.device)
        result = None if plan is None else (plan[0], plan[1], self._options(plan[0], eps), plan[2])
        self._prepared = (key, result)
        return result

    def _run_stack(self, h, y, layer_norm: nn.Module | None, prep) -> torch.Tensor:
        names, routes, options, hint = prep
        if (
            not self.fused
            or (not TRAIN_FUSED and torch.is_grad_enabled() and _trains(self._modules_of(names), h, y, layer_norm))
            or self._drops(names)
        ):
            return _eager_stack(h, y, layer_norm, self._modules_of(names), routes, options, hint)
        ln_w = layer_norm.weight if layer_norm is not None else None
        ln_b = layer_norm.bias if layer_norm is not None else None
        # fp32 masters of a 16-bit layer compute as their casts to its dtype, h's; under autocast h's dtype is
        # autocast's, not the layer's: the weights are packed as they are (an fp32 model's, as before masters)
        packed = self._packed(names, hint, None if torch.is_autocast_enabled(h.device.type) else h.dtype)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._serve(h, y, ln_w, ln_b, packed, routes, options, hint)
        return bottleneck_stack(h, y, packed, routes, options, ln_w, ln_b, level_adapters=hint)

    def _drops(self, names: Sequence[str]) -> bool:
        """Whether an adapter of ``names`` draws a dropout mask now (training mode, rate > 0): the fused op has no
        dropout, so such a stack runs its eager modules, with or without autograd (AdapterHub's dropout follows the
        modules' training flag alone)."""
        return self.training and any(a.drops for a in self._modules_of(names))

    # geometries kept per layer: serving may alternate batch shapes, one stack and mixed rows, and a GraphedServer's
    # capture of one batch layout meets two (its warm-up's per-sequence routes, its static route's per-row ones)
    _MAX_LAUNCHES = 8

    def _serve(self, h, y, ln_w, ln_b, packed: PackedStack, routes, options: StackOptions, hint) -> torch.Tensor:
        """A call without autograd: the kernel launch that ``bottleneck_stack(return_launch=True)`` made at an
        earlier call of the same geometry, with the same pack, routes layout, options and LayerNorm, repeated without
        the op's input checks and launch planning (about two thirds of a fused layer call's host time beyond the
        sublayer's own, CPU profile). The last few geometries keep theirs; a new pack replaces a geometry's. A CUDA
        graph capture plans its launch (host time is paid once there), so it takes the tuner's choice for graphs
        (``bottleneck_dispatch._tuned_tiles``), which may differ from the eager calls' recorded one."""
        if capturing(h):
            return bottleneck_stack(h, y, packed, routes, options, ln_w, ln_b, level_adapters=hint)
        one_stack = hint is not None and not any(len(used) > 1 for used in hint)
        geometry = (h.shape, h.stride(), h.dtype, h.device, routes.shape, routes.stride(), routes.dtype,
                    routes.device, options, one_stack, bottleneck_dispatch.STACK_PATH)  # fmt: skip
        if y is not None:
            geometry += (y.shape, y.stride(), y.dtype, y.device)
        made = self._launches.get(geometry)
        if made is not None and made[0] is packed and made[1] is ln_w and made[2] is ln_b:
            launch = made[3]
            if launch is None:  # (the reference or the cuBLAS level path ran at that call: plan it again)
                return bottleneck_stack(h, y, packed, routes, options, ln_w, ln_b, level_adapters=hint)
            if made[4] is routes:  # the kernel's routes are these or a view of them (one stack: row stride 0),
                return launch(h, y, made[5])  # made at an earlier call: no copy that could go stale
            expanded = expand_routes(routes, h)
            if expanded.data_ptr() == routes.data_ptr():
                self._launches = {**self._launches, geometry: (*made[:4], routes, expanded)}
            return launch(h, y, expanded)
        out, launch = bottleneck_stack(h, y, packed, routes, options, ln_w, ln_b, hint, return_launch=True)
        # a new dict, swapped in whole: threads sharing a routed layer read it without a lock
        launches = {k: v for k, v in self._launches.items() if k != geometry}
        while len(launches) >= self._MAX_LAUNCHES:
            del launches[next(iter(launches))]
        launches[geometry] = (packed, ln_w, ln_b, launch, None, None)
        self._launches = launches
        return out


def same_tensors(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` are ``others``, object for object (one C-level pass)."""
    return all(map(operator.is_, tensors, others))


def _pack_bytes(packed: PackedStack) -> int:
    return sum(t.numel() * t.element_size() for t in packed if isinstance(t, torch.Tensor))


def _keep_recent_packs(cache: dict, key: tuple, params: tuple, packed: PackedStack) -> dict:
    """``cache`` with ``(params, packed)`` under ``key`` as its most recent pack and, of the others, the most recent
    ones whose bytes add up to at most the largest pack's: a layer serving stacks in turn packs each once, and the
    packs it keeps hold at most twice the memory of its largest (each is a copy of its adapters' weights, outside
    the AdapterMemoryManager's byte count). The entry holds the parameters its key names by id, so that no other
    tensor takes one of those ids while it is cached. A new dict, swapped in whole (threads read it without a lock)."""
    sizes = {k: _pack_bytes(v[1]) for k, v in cache.items() if k[0] == "packed" and k != key}
    kept, budget = {}, max([_pack_bytes(packed), *sizes.values()])
    for k, v in reversed(list(cache.items())):  # newest first
        if k[0] == "packed":
            if k not in sizes or sizes[k] > budget:
                continue
            budget -= sizes[k]
        kept[k] = v
    kept = dict(reversed(list(kept.items())))
    kept[key] = (params, packed)
    return kept


def _trains(modules: Sequence[nn.Module], h, y, layer_norm: nn.Module | None) -> bool:
    """Whether autograd records this stack: gradients wanted for an adapter in it, the inputs or the LayerNorm."""
    if not torch.is_grad_enabled():
        return False
    params = [p for a in modules for p in a.packed_tensors()]
    if layer_norm is not None:
        params += [layer_norm.weight, layer_norm.bias]
    return any(t is not None and t.requires_grad for t in (h, y, *params))


_requires_grad = operator.attrgetter("requires_grad")
_data_ptr = torch.Tensor.data_ptr


def _frozen_state(tensors: tuple) -> tuple:
    """What a kept copy of ``tensors`` depends on: their in-place versions and data pointers."""
    return tuple(map(tensor_version, tensors)), tuple(map(_data_ptr, tensors))


def structure_differences(options: dict[str, StackOptions]) -> str:
    """The structural fields in which adapters (name -> options) differ, each adapter's value named, for the errors
    that refuse them in one stack: ``original_ln_before: s True, h False`` (a set of the options' reprs named none)."""
    first = next(iter(options.values()))
    differ = [f for f in first.__dataclass_fields__ if len({getattr(o, f) for o in options.values()}) > 1]
    return "; ".join(f"{f}: " + ", ".join(f"{n} {getattr(o, f)!r}" for n, o in options.items()) for f in differ)


def _replace(options: StackOptions, **changes) -> StackOptions:
    return StackOptions(**{**options.__dict__, **changes})


def _eager_stack(h, y, layer_norm, adapters: list[BottleneckAdapter], routes, options: StackOptions, hint):
    """AdapterHub's op order with one module call per step in the model dtype (the eager baseline); ``hint`` is
    the host-side list of adapter indices per level (no device sync)."""
    ln = layer_norm

    def level(r, a: BottleneckAdapter):
        if options.is_parallel:
            up = a(y)
            return r + (a.norm_after(up) if options.ln_after else up)
        residual, x = r, r
        if options.original_ln_before:
            t = r + y
            if options.residual_before_ln == "post_add" and ln is not None:
                residual = t
            x = ln(t) if ln is not None else t
        if options.residual_before_ln is False:
            residual = x
        up = a(x)
        if options.adapter_residual_before_ln:
            out = up + residual
            return a.norm_after(out) if options.ln_after else out
        return (a.norm_after(up) if options.ln_after else up) + residual

    r = h
    if routes.dim() == 1:
        for ids in hint:
            r = level(r, adapters[ids[0]])
    else:  # per-row stacks: every used adapter on every row, rows picked by mask (AdapterHub cannot do this)
        for lvl, ids in enumerate(hint):
            new = r
            for idx in (i for i in ids if i >= 0):  # (a hint may list -1: rows with the level off)
                sel = (routes[:, lvl] == idx).view(-1, *([1] * (h.dim() - 1)))
                new = torch.where(sel, level(r, adapters[idx]), new)
            r = new
    if options.original_ln_after:
        r = r + y
        if ln is not None:
            r = ln(r)
    return r


class OutputWithAdapters(BottleneckStackLayer):
    """Wraps a sublayer computing ``LN(dropout(dense(x)) + y)`` (or ``dropout(dense(x)) + y`` without LN).

    Args:
        original: e.g. ``BertOutput``, ``BertSelfOutput``, ``RobertaOutput``, ``ViTOutput`` instance.
        dense, dropout, layer_norm: attribute names of its projection, dropout and LayerNorm; ``layer_norm=None``
            (or a missing attribute) for the pre-LN form.

    ``forward(hidden_states, input_tensor)`` keeps the original signature; h is (B, S, H).
    """

    def __init__(
        self, original: nn.Module, dense: str = "dense", dropout: str = "dropout", layer_norm: str | None = "LayerNorm"
    ):
        super().__init__(original)
        for attr in (dense, dropout):
            if not hasattr(original, attr):
                raise ValueError(f"{type(original).__name__} has no attribute {attr!r}")
        self._names = (dense, dropout, layer_norm if layer_norm and hasattr(original, layer_norm) else None)
        ln = getattr(original, self._names[2]) if self._names[2] else None
        if ln is not None and (not isinstance(ln, nn.LayerNorm) or ln.weight is None):
            raise ValueError(f"{type(original).__name__}.{layer_norm} must be an affine nn.LayerNorm, got {ln}")

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dense, dropout, ln_name = self._names
        ln = getattr(self, ln_name) if ln_name else None
        prep = self._prepare(hidden_states, float(ln.eps) if ln is not None else 1e-12)
        if prep is None:
            return self._original_forward(hidden_states, input_tensor, *args, **kwargs)
        h = getattr(self, dropout)(getattr(self, dense)(hidden_states))
        out = self._run_stack(h, input_tensor, ln, prep)
        routes, options = prep[1], prep[2]
        if options.original_ln_after or routes.dim() == 1:
            return out
        # Per-row stacks without original_ln_after: the levels add the residual and any LN themselves, so a row with
        # every level off would come out as bare h. It is the sublayer's own output, LN(h + y), as at depth 0.
        off = (routes < 0).all(-1)  # one per row of h, or per sequence of a (B, S, H) h
        per_row = off.numel() * h.shape[-1] == h.numel()
        off = off.view(*h.shape[:-1], 1) if per_row else off.view(-1, *[1] * (h.dim() - 1))
        base = h + input_tensor
        return torch.where(off, (ln(base) if ln is not None else base).to(out.dtype), out)


class ResidualOutsideWithAdapters(BottleneckStackLayer):
    """Wraps a sublayer whose output the enclosing block adds to its residual (pre-LN blocks).

    Args:
        original: e.g. ``LlamaMLP``, ``GPT2MLP``, ``ViTSelfOutput`` (tuple outputs: the first element is adapted).
        residual_from: the module whose first input is the residual y (``post_attention_layernorm`` for a
            Llama MLP, ``ln_2`` for GPT-2, ``input_layernorm`` for Llama attention); None when no option reads y.
        layer_norm: the block's LayerNorm that follows its ``+ y`` in a post-LN block (DistilBERT's
            ``output_layer_norm`` / ``sa_layer_norm``), which AdapterHub hands to the adapter layer: the adapters
            then read ``LN(r + y)`` (``original_ln_before``), as in BERT. None for pre-LN blocks (no model LN). Held
            by reference, not as a child: it stays the block's module (and its state_dict key).

    The wrapper returns ``r_n``; the block's ``+ y`` (and its LayerNorm, if any) completes AdapterHub's output
    ``r_n + y`` (``LN(r_n + y)``). Stacks must have ``original_ln_after=True`` (AdapterHub's hooked pre-LN mode has
    the same restriction).
    """

    def __init__(
        self, original: nn.Module, residual_from: nn.Module | None = None, layer_norm: nn.LayerNorm | None = None
    ):
        super().__init__(original)
        self._captured: torch.Tensor | None = None
        self._hook = None
        if layer_norm is not None and (not isinstance(layer_norm, nn.LayerNorm) or layer_norm.weight is None):
            raise ValueError(f"layer_norm must be an affine nn.LayerNorm, got {layer_norm}")
        object.__setattr__(self, "_block_ln", layer_norm)  # (not registered: the block owns it)
        if residual_from is not None:
            self._hook = residual_from.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self._captured = args[0] if args else None

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def forward(self, *args, **kwargs):
        out = self._original_forward(*args, **kwargs)
        y, self._captured = self._captured, None
        h = out[0] if isinstance(out, tuple) else out
        ln = self._block_ln
        prep = self._prepare(h, float(ln.eps) if ln is not None else 1e-12)
        if prep is None:
            return out
        options = prep[2]
        if not options.original_ln_after:
            raise ValueError("adapters after a residual-outside sublayer need original_ln_after=True")
        if y is None and (options.is_parallel or options.original_ln_before):
            raise ValueError("these adapters read the residual y: pass residual_from= (the module whose input it is)")
        # the block adds y (and applies its LayerNorm) itself: run the stack without the output residual
        r = self._run_stack(h, y, ln, (prep[0], prep[1], _replace(options, original_ln_after=False), prep[3]))
        return (r, *out[1:]) if isinstance(out, tuple) else r


def wrap_sublayer(parent: nn.Module, name: str, wrapper_cls: type[BottleneckStackLayer] = OutputWithAdapters, **kwargs):
    """Replace ``parent.<name>`` by a wrapper around it (idempotent); returns the wrapper."""
    child = getattr(parent, name)
    if isinstance(child, BottleneckStackLayer):
        return child
    wrapper = wrapper_cls(child, **kwargs)
    setattr(parent, name, wrapper)
    return wrapper


def unwrap_sublayer(parent: nn.Module, name: str) -> nn.Module:
    """Put the original module back in ``parent.<name>`` (its weights are the wrapper's, shared); returns it."""
    child = getattr(parent, name)
    if not isinstance(child, BottleneckStackLayer):
        return child
    if isinstance(child, ResidualOutsideWithAdapters):
        child.remove_hooks()
    original = child.give_back()
    setattr(parent, name, original)
    return original
