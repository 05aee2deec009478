"""Make a Hugging Face model adapter-capable in place, per instance and reversibly.

``patch(model)`` replaces the target Linear / Conv1D children with :class:`~adapter_engine.lora.LoraLinear`
(same ``weight``/``bias`` Parameters, same attribute names) and binds the adapter API as methods on that one
instance; ``unpatch(model)`` unmerges anything merged, puts the original module objects back (re-pointed at the
current Parameters, so ``.to()`` and training in between are kept) and removes the methods. No class in
``transformers.models.*`` is touched. A PEFT ``PeftModel`` is patched by giving each of its LoRA layers a fused
per-instance forward (``del layer.forward`` restores PEFT's).

The architecture facts it needs (default targets, where the blocks and their sublayers are) come from one registry
keyed by ``model_type`` (adapter_engine/archs.py); any other model works with explicit ``target_modules``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import REGISTRY, ArchSpec, base_prefix, block_paths, model_type_of, select_spec
from .bottleneck import BottleneckStackLayer, ResidualOutsideWithAdapters, structure_differences
from .bottleneck_adapter import BottleneckAdapter
from .config import BottleneckConfig
from .lora import (
    NOT_LINEAR,
    OWN_FORWARD,
    LoraLinear,
    adapter_dtype,
    fused_peft_forward,
    has_own_forward,
    is_linear_like,
    not_wrappable,
)
from .routed_bottleneck import RoutedOutputWithAdapters, RoutedResidualOutsideWithAdapters
from .routing import set_route_owner
from .saved_modules import ModulesToSaveLayer
from .wrapping import return_hooks

logger = logging.getLogger(__name__)

_STATE_ATTR = "_adapter_engine_state"
_SERIALS = itertools.count(1)
#: PEFT's ``target_modules`` shorthand for every linear layer but the output one.
ALL_LINEAR = "all-linear"


@dataclass
class AdapterRecord:
    """One adapter in a patched model: its config, kind and the (full) names of the modules holding it; ``saved``:
    the modules it holds a trained copy of (PEFT's ``modules_to_save``, :class:`ModulesToSaveLayer`)."""

    config: Any
    kind: str  # "lora" | "ia3" | "bottleneck"
    modules: list[str]
    saved: list[str] = field(default_factory=list)
    head: dict | None = None  # an AdapterHub prediction head among ``saved``: how to save it again (heads.export_head)


@dataclass
class PatchState:
    """Everything ``unpatch`` needs, kept on the model instance (a plain attribute: not in ``state_dict``)."""

    spec: ArchSpec | None
    model_type: str | None
    replaced: dict[str, nn.Module] = field(default_factory=dict)  # full module name -> original module
    peft_layers: list[nn.Module] = field(default_factory=list)
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()  # what ``disable_adapters`` turned off, for ``enable_adapters``
    methods: list[str] = field(default_factory=list)
    # tells models apart in a route's cache of name checks (routing.check_route_names); a copy gets its own
    serial: int = field(default_factory=lambda: next(_SERIALS), compare=False, repr=False)

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) of a patched model is another model
        self.__dict__.update(state)
        self.serial = next(_SERIALS)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is patched (by :func:`patch`, or by an adapter function called on it) and not unpatched since:
    a merge that leaves no adapter unpatches it, a plain transformers model again."""
    return isinstance(model.__dict__.get(_STATE_ATTR), PatchState)


def get_state(model: nn.Module) -> PatchState:
    state = model.__dict__.get(_STATE_ATTR)
    if not isinstance(state, PatchState):
        raise ValueError(f"{type(model).__name__} is not patched: call adapter_engine.patch(model) first")
    return state


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _peft_lora_linear_class() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


def match_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the Linear / Conv1D (or already wrapped) modules selected by PEFT-style ``targets``.

    A string is a regex matched against the full name (``"all-linear"``: every linear layer but the output one, as
    PEFT); a list holds name suffixes. The engine's own adapter layers (a LoRA's factors, a bottleneck adapter's
    projections) are never targets, as PEFT never targets its tuner layers' insides: a regex over a patched model
    used to wrap them in LoRA layers of their own. Raises ``ValueError`` for an entry that matches nothing, or that
    matches a module LoRA cannot wrap.
    """
    modules = dict(model.named_modules())
    names = [n for n in _outside_adapters(modules) if n]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear(model, modules, names)
    if isinstance(targets, str):
        hits = [n for n in names if re.fullmatch(targets, n)]
        entries = {targets: hits}
    else:
        entries = {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}
    selected: list[str] = []
    for entry, hits in entries.items():
        if not hits:
            suffixes = [n for n in names if n.endswith("." + entry)] if isinstance(targets, str) else []
            more = " ..." if len(suffixes) > 2 else ""
            hint = (  # (a bare name as a string: PEFT's rule makes it a regex of the whole name)
                f": a string is a regex that must match a whole module name (PEFT's rule); a list holds name "
                f"suffixes: [{entry!r}] selects {suffixes[:2]}{more}"
                if suffixes
                else ""
            )
            raise ValueError(f"target_modules entry {entry!r} matches no module of {type(model).__name__}{hint}")
        for n in hits:
            mod = modules[n]
            if not (is_linear_like(mod) or isinstance(mod, LoraLinear)):
                if isinstance(targets, str):
                    continue  # a regex may sweep over containers; keep its linear hits only
                why = OWN_FORWARD if has_own_forward(mod) else NOT_LINEAR
                raise ValueError(f"target_modules entry {entry!r} matches {n!r}, a {type(mod).__name__}: {why}")
            if n not in selected:
                selected.append(n)
    if not selected:
        raise ValueError(f"target_modules {targets!r} selects no nn.Linear / Conv1D layer of {type(model).__name__}")
    return selected


def _outside_adapters(modules: Mapping[str, nn.Module]) -> list[str]:
    """The names in ``modules`` (a model's ``named_modules``) that are not inside an adapter: not below a
    LoraLinear (its ``lora_A`` / ``lora_B`` factors), in a bottleneck layer's ``adapters`` nor among a module's
    trained copies (``modules_to_save``)."""
    below = {LoraLinear: "", BottleneckStackLayer: "adapters.", ModulesToSaveLayer: "modules_to_save."}
    inside = tuple(
        f"{n}.{suffix}" for n, m in modules.items() for cls, suffix in below.items() if n and isinstance(m, cls)
    )
    return [n for n in modules if not n.startswith(inside)] if inside else list(modules)


def _all_linear(model: nn.Module, modules: Mapping[str, nn.Module], names: list[str]) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every Linear / Conv1D layer except the output layer
    (``get_output_embeddings()``, a language model's head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n in names if is_linear_like(modules[n]) or isinstance(modules[n], LoraLinear)]
    selected = [n for n in linear if modules[n] is not head]
    if not selected:
        raise ValueError(f"target_modules 'all-linear' selects no nn.Linear / Conv1D layer of {type(model).__name__}")
    return selected


def wrap_linear(model: nn.Module, state: PatchState, name: str) -> LoraLinear:
    """Replace module ``name`` by a LoraLinear sharing its Parameters (idempotent); returns the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, LoraLinear):
        return module
    if not is_linear_like(module):
        raise ValueError(not_wrappable(name, module))
    owner = next((n for n in _parents(name) if isinstance(model.get_submodule(n), ModulesToSaveLayer)), None)
    if owner is not None:
        raise ValueError(
            f"layer {name!r} is inside {owner!r}, a module adapters hold trained copies of (modules_to_save): a "
            "LoRA / IA3 layer there would run in the original only, not in the copies"
        )
    wrapper = LoraLinear(module)
    wrapper.train(module.training)
    set_route_owner(wrapper, state)  # routes are checked against this model's adapters
    _set_child(model, name, wrapper)
    state.replaced[name] = module
    return wrapper


def within(name: str, modules: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``modules`` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def check_saved(model: nn.Module, name: str) -> None:
    """Refuse module ``name`` as one adapters keep trained copies of (``modules_to_save``) when a copy could not
    stand in for it: it holds or sits in an adapter layer (a LoRA there would run in the original only; a bottleneck
    layer's fused stack reads its LayerNorm's weights directly, so a copy of it would be ignored)."""
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSaveLayer):
        return
    inner = [n for n, m in module.named_modules() if isinstance(m, (LoraLinear, BottleneckStackLayer))]
    wrappers = (LoraLinear, ModulesToSaveLayer, BottleneckStackLayer)  # (a fused stack reads its modules directly)
    outer = [n for n in _parents(name) if isinstance(model.get_submodule(n), wrappers)]
    if inner or outer or isinstance(module, (nn.ModuleDict, nn.ModuleList)) or hasattr(module, "modules_to_save"):
        why = f": it holds adapter layers {inner[:2]}" if inner else f": it is inside {outer[0]!r}" if outer else ""
        raise ValueError(f"modules_to_save: cannot keep trained copies of {name!r} ({type(module).__name__}){why}")


def wrap_saved(model: nn.Module, state: PatchState, name: str) -> ModulesToSaveLayer:
    """Replace module ``name`` by a :class:`ModulesToSaveLayer` sharing its weights (idempotent); returns it."""
    check_saved(model, name)
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSaveLayer):
        return module
    wrapper = ModulesToSaveLayer(module)
    wrapper.train(module.training)
    _set_child(model, name, wrapper)
    state.replaced[name] = module
    return wrapper


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    if isinstance(parent, BottleneckStackLayer):  # with no active adapter it runs the original sublayer: keep in sync
        setattr(parent.original, child, module)


def _restore(model: nn.Module, name: str, original: nn.Module) -> None:
    current = model.get_submodule(name)
    if isinstance(current, LoraLinear):
        current.unmerge()
        original.weight = current.weight
        original.bias = current.bias
        return_hooks(current, original)  # (the hooks themselves are shared: see LoraLinear)
    elif isinstance(current, (BottleneckStackLayer, ModulesToSaveLayer)):
        if isinstance(current, ResidualOutsideWithAdapters):
            current.remove_hooks()
        for child_name, child in current.named_children():  # children replaced while wrapped (Parameters shared)
            if child_name not in ("adapters", "modules_to_save") and getattr(original, child_name, None) is not child:
                setattr(original, child_name, child)
        # and its own tensors, replaced while wrapped too (load_state_dict(..., assign=True), a device move)
        for member, tensor in (*current.named_parameters(recurse=False), *current.named_buffers(recurse=False)):
            if getattr(original, member, None) is not tensor:
                setattr(original, member, tensor)
        current.give_back()
    original.train(current.training)
    _set_child(model, name, original)


def patch(model: nn.Module, *, target_modules: str | Iterable[str] | None = None) -> nn.Module:
    """Make ``model`` adapter-capable in place (per instance, reversible with :func:`unpatch`); returns it.

    Registered ``model_type`` s (``adapter_engine.archs.REGISTRY``) get PEFT's default LoRA targets wrapped now; any
    other model needs ``target_modules`` (suffixes or a regex, PEFT's rule). A PEFT ``PeftModel`` gets its LoRA layers
    switched to the fused op instead, and keeps PEFT's own API. Patching twice is a no-op, except that the
    ``target_modules`` of a later call are wrapped too (they used to be ignored, silently; a patched ``PeftModel``
    refuses them: its targets are PEFT's).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch nn.Module, got {type(model).__name__}")
    refuse_stacked(model)
    if is_patched(model):
        if target_modules is not None:
            if _is_peft_model(model):
                raise ValueError("a patched PeftModel keeps PEFT's target_modules; add a PEFT adapter to adapt others")
            state = get_state(model)
            for name in match_targets(model, target_modules):  # (checked before any is wrapped)
                wrap_linear(model, state, name)
        return model
    if _is_peft_model(model):
        return _patch_peft(model)
    model_type = model_type_of(model)
    spec = select_spec(model, model_type)
    state = PatchState(spec=spec, model_type=model_type)
    targets = target_modules if target_modules is not None else (spec.lora_targets if spec else None)
    if targets is None:
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}) has no registered default targets; pass "
            f"target_modules=[...] (registered: {sorted(REGISTRY)})"
        )
    names = match_targets(model, targets)
    return _install(model, state, names)


def ensure_patched(model: nn.Module) -> PatchState:
    """The patch state of ``model``, patching it first when it is not: with the default targets of a registered
    architecture (as :func:`patch`), else with no layer wrapped yet, since an adapter added or loaded next names its
    own ``target_modules`` (PEFT's rule). A bare :func:`patch` of an unregistered model still asks for targets; the
    API functions used to as well, so ``load_adapter`` of a T5 / OPT / Falcon PEFT adapter failed although its
    config names its layers."""
    if not is_patched(model):
        refuse_stacked(model)
        if _is_peft_model(model) or select_spec(model, model_type_of(model)) is not None:
            patch(model)
        else:
            _install(model, PatchState(spec=None, model_type=model_type_of(model)), [])
    return get_state(model)


def refuse_stacked(model: nn.Module) -> None:
    """A :class:`~adapter_engine.stacking.StackedAdapterModel` given where its model belongs (``ae.merge_adapter(sam,
    ...)``): it was patched as a model of no known type, and the call answered that it has no adapters."""
    from .stacking import StackedAdapterModel  # (stacking imports this module)

    if isinstance(model, StackedAdapterModel):
        raise TypeError(
            "this takes the Hugging Face model, not a StackedAdapterModel: pass sam.model, or use the stack's own "
            "methods (sam.add_adapter, sam.train_adapter, sam.save, ...), which keep its levels and memory in step"
        )


def _install(model: nn.Module, state: PatchState, names: list[str]) -> nn.Module:
    """Put ``state`` on the model, wrap the layers ``names`` and bind the adapter API methods."""
    model.__dict__[_STATE_ATTR] = state
    for name in names:
        wrap_linear(model, state, name)
    _bind_methods(model, state)
    logger.info("patched %s (%s): %d layers wrapped", type(model).__name__, state.model_type, len(names))
    return model


def _patch_peft(model: nn.Module) -> nn.Module:
    state = PatchState(spec=None, model_type="peft")
    cls = _peft_lora_linear_class()
    for _, module in model.named_modules():
        if cls is not None and type(module) is cls:
            module.forward = functools.partial(fused_peft_forward, module)  # (picklable, as in _bind_methods)
            state.peft_layers.append(module)
    model.__dict__[_STATE_ATTR] = state
    logger.info("patched PeftModel: %d LoRA layers run the fused op", len(state.peft_layers))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original modules back (adapters dropped), methods removed. Merged adapters stay in the
    weights (:func:`~adapter_engine.merging.unmerge_adapter` still takes them out). A model that is not patched is
    returned unchanged."""
    if not is_patched(model):
        return model
    state = get_state(model)
    for layer in state.peft_layers:
        layer.__dict__.pop("forward", None)
    for name in sorted(state.replaced, key=lambda n: -n.count(".")):  # innermost first
        _restore(model, name, state.replaced[name])
    for method in state.methods:
        model.__dict__.pop(method, None)
    del model.__dict__[_STATE_ATTR]
    return model


def _bind_methods(model: nn.Module, state: PatchState) -> None:
    # (api, methods and persist import this module)
    from . import api, persist
    from . import methods as hf

    methods: dict[str, Callable] = {
        "load_adapter": hf.load_adapter,  # (these three also take transformers' call forms)
        "add_adapter": hf.add_adapter,
        "set_active_adapters": api.set_active_adapters,
        "set_adapter": hf.set_adapter,  # PEFT's name: also makes the active adapters trainable, as PEFT's
        "delete_adapter": hf.delete_adapter,
        "list_adapters": api.list_adapters,
        "save_adapter": api.save_adapter,
        "merge_adapter": api.merge_adapter,
        "unmerge_adapter": api.unmerge_adapter,
        # transformers' own adapter methods, on the engine's adapters
        "disable_adapters": api.disable_adapters,
        "enable_adapters": api.enable_adapters,
        "active_adapters": api.active_adapter_list,
        "get_adapter_state_dict": api.get_adapter_state_dict,
        "save_pretrained": api.save_pretrained,  # (adapter tensors registered twice are saved once)
        "resize_token_embeddings": api.resize_token_embeddings,  # (refused while the embeddings are wrapped)
        "load_state_dict": persist.load_state_dict,  # (reads the older names transformers 5 saves some models under)
    }
    for name, func in methods.items():
        # (a partial, not a bound method: a bound method pickles as getattr(model, name), which cannot resolve while
        # pickle rebuilds the model, so torch.save / torch.load of a patched model failed)
        model.__dict__[name] = functools.partial(func, model)
        state.methods.append(name)


# ----------------------------------------------------------------------------------------------- bottleneck
def resolve_module(model: nn.Module, saved: str, modules: Mapping[str, Any]) -> str | None:
    """The model's name for a module path saved relative to the base model or to a task model: the first of the
    path's readings that is a key of ``modules``."""
    candidates = [saved]
    declared = getattr(model, "base_model_prefix", "") or ""
    if declared and saved.startswith(declared + "."):
        candidates.append(saved[len(declared) + 1 :])
    prefix = base_prefix(model)
    if prefix and not saved.startswith(prefix + "."):
        candidates.append(f"{prefix}.{saved}")
    return next((c for c in candidates if c in modules), None)


@dataclass(frozen=True)
class Placement:
    layer: int
    block: str
    which: str  # "mh" | "output"
    name: str  # full name of the wrapped sublayer


def adapterhub_name(spec: ArchSpec, place: Placement) -> str:
    """The full module path under which AdapterHub saves the adapters of ``place`` (the sublayer's own name in
    BERT, the block's ``output_adapters`` / ``attention_adapters`` where AdapterHub patches at block level)."""
    return f"{place.block}.{spec.adapterhub_place(place.which)}"


def placements(model: nn.Module, state: PatchState, cfg: BottleneckConfig) -> list[Placement]:
    """Where a bottleneck config puts adapters in this model (one per sublayer, ``leave_out`` skipped)."""
    spec = state.spec
    if spec is None:
        raise ValueError(
            f"bottleneck adapters need a registered architecture; model_type {state.model_type!r} is not one of "
            f"{sorted(REGISTRY)}"
        )
    out = []
    for i, block in enumerate(block_paths(model, spec)):
        if i in set(cfg.leave_out or []):
            continue
        if cfg.mh_adapter:
            out.append(Placement(i, block, "mh", f"{block}.{spec.attn_sublayer}"))
        if cfg.output_adapter:
            out.append(Placement(i, block, "output", f"{block}.{spec.ffn_sublayer}"))
    return out


def hidden_size_of(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(f"{type(model).__name__}.config has no integer hidden_size")
    return hidden


def make_bottleneck(cfg: BottleneckConfig, hidden: int, size: int, **factory) -> BottleneckAdapter:
    """A :class:`BottleneckAdapter` for ``cfg`` (init "normal": N(0, init_range) weights, zero biases)."""
    init = "bert" if cfg.init_weights == "normal" else cfg.init_weights  # ("normal" is drawn below)
    try:
        with torch.device(factory.get("device", "cpu")):
            adapter = BottleneckAdapter(
                hidden,
                size,
                cfg.non_linearity,
                cfg.scaling,
                is_parallel=cfg.is_parallel,
                original_ln_before=cfg.original_ln_before,
                original_ln_after=cfg.original_ln_after,
                residual_before_ln=cfg.residual_before_ln,
                adapter_residual_before_ln=cfg.adapter_residual_before_ln,
                ln_before=cfg.ln_before,
                ln_after=cfg.ln_after,
                init_weights=init,
                dropout=cfg.dropout,
                init_weights_seed=cfg.init_weights_seed,
            )
    except TypeError as err:
        raise ValueError(f"bottleneck config {cfg}: {err}") from None
    if cfg.init_weights == "normal":
        with torch.no_grad():
            for lin in (adapter.down, adapter.adapter_up):
                lin.weight.normal_(0.0, cfg.init_range)
                lin.bias.zero_()
    return adapter.to(dtype=factory.get("dtype", torch.float32))


def plan_bottleneck(
    model: nn.Module, state: PatchState, entries: Mapping[str, Mapping[str, torch.Tensor]], cfg: BottleneckConfig,
    meta: Mapping[str, Any],
) -> list[tuple[Placement, Mapping[str, torch.Tensor]]]:  # fmt: skip
    """Check a bottleneck file against the model (layers, parameter names, shapes) without touching it."""
    where = {p.name: p for p in placements(model, state, cfg)}
    modules = dict(model.named_modules())
    hidden = hidden_size_of(model)
    found: dict[str, Mapping[str, torch.Tensor]] = {}
    unknown = []
    saved_as = {adapterhub_name(state.spec, p): p.name for p in where.values()}  # AdapterHub's names for the places
    for saved, params in entries.items():
        name = resolve_module(model, saved, modules)  # the sublayer's name (BERT; engine files of earlier versions)
        if name not in where:
            name = saved_as.get(resolve_module(model, saved, saved_as))  # AdapterHub's block-level module
        if name is None or name not in where:
            unknown.append(saved)
        else:
            found[name] = params
    if unknown:
        made_for = meta.get("model_type")  # (unknown for a PEFT file or a config= override: it said "made for None")
        made_for = f", adapter made for {made_for!r}" if made_for else ""
        raise ValueError(
            f"adapter weights for layers this model has no adapter place for: {sorted(unknown)[:4]} "
            f"(model_type {state.model_type!r}{made_for}; places: {sorted(where)[:2]} ...)"
        )
    missing = sorted(set(where) - set(found))
    if missing:
        raise ValueError(f"missing adapter weights for layers {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    plan = []
    for name, params in found.items():
        place = where[name]
        size = cfg.size_for(hidden, place.layer)
        template = make_bottleneck(cfg, hidden, size, device="meta").state_dict()
        extra, lacking = sorted(set(params) - set(template)), sorted(set(template) - set(params))
        if extra or lacking:
            raise ValueError(f"layer {name!r}: missing weights {lacking}, unexpected weights {extra}")
        for key, t in params.items():
            if tuple(t.shape) != tuple(template[key].shape):
                raise ValueError(
                    f"layer {name!r}: {key} has shape {tuple(t.shape)} but the model needs "
                    f"{tuple(template[key].shape)} (hidden size {hidden}, bottleneck {size}): adapter made for "
                    "another architecture or hidden size?"
                )
        plan.append((place, params))
    return plan


def wrap_bottleneck(model: nn.Module, state: PatchState, place: Placement) -> BottleneckStackLayer:
    """Wrap the sublayer of ``place`` (idempotent); the residual hook goes on the block's module named in the spec."""
    module = model.get_submodule(place.name)
    if isinstance(module, BottleneckStackLayer):
        return module
    spec = state.spec
    mh = place.which == "mh"
    residual = spec.attn_residual if mh else spec.ffn_residual
    sublayer = spec.attn_sublayer if mh else spec.ffn_sublayer
    ln_name = spec.attn_layer_norm if mh else spec.ffn_layer_norm
    ln = model.get_submodule(f"{place.block}.{ln_name}") if ln_name else None  # a post-LN block's (DistilBERT)
    # the routed subclasses (adapter_engine.routed_bottleneck) also follow a per-call / per-row route
    # (adapter_engine.routing) and are thread-safe
    if residual is None:
        wrapper = RoutedOutputWithAdapters(module)
    elif residual == sublayer:  # the sublayer's own input is the residual (DistilBERT): hook the wrapper itself
        wrapper = RoutedResidualOutsideWithAdapters(module, residual_from=None, layer_norm=ln)
        wrapper._hook = wrapper.register_forward_pre_hook(wrapper._capture)  # removed by wrapper.remove_hooks()
    else:
        wrapper = RoutedResidualOutsideWithAdapters(
            module, residual_from=model.get_submodule(f"{place.block}.{residual}"), layer_norm=ln
        )
    wrapper.train(module.training)
    set_route_owner(wrapper, state)  # routes are checked against this model's adapters
    _set_child(model, place.name, wrapper)
    state.replaced[place.name] = module
    return wrapper


def _factory(module: nn.Module) -> dict:
    p = next(module.parameters(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def adapter_layer_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype an adapter layer's own weights are in, which its adapters' float32 masters are cast to
    (``autocast_adapter_dtype``): a LoRA / IA3 layer's weight's; a bottleneck sublayer wrapper's (or a sublayer's)
    first parameter's."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, BottleneckStackLayer) or not isinstance(weight, torch.Tensor):
        return _factory(layer).get("dtype", torch.float32)
    return weight.dtype


def _bottleneck_factory(wrapper: BottleneckStackLayer, keep_fp32: bool) -> dict:
    """A new adapter's device and dtype in ``wrapper``: float32 master weights on a 16-bit sublayer with
    ``keep_fp32`` (PEFT's ``autocast_adapter_dtype``, :func:`~adapter_engine.lora.adapter_dtype`), else its dtype."""
    factory = _factory(wrapper)
    if "dtype" in factory:
        factory["dtype"] = adapter_dtype(factory["dtype"], keep_fp32)
    return factory


@torch.no_grad()
def apply_bottleneck(
    model, state: PatchState, name: str, cfg: BottleneckConfig, plan, autocast: bool | None = False
) -> list[str]:
    """Put bottleneck tensors (``plan``: (placement, state dict) entries) into wrapped sublayers. autocast: float32
    weights on 16-bit sublayers (True), the sublayers' dtype (False), or float32 where the given tensors all are
    (None: a snapshot or a saved stack put back as it was)."""
    hidden = hidden_size_of(model)
    for place, params in plan:
        wrapper = wrap_bottleneck(model, state, place)
        keep = all(v.dtype == torch.float32 for v in params.values()) if autocast is None else autocast
        adapter = make_bottleneck(cfg, hidden, cfg.size_for(hidden, place.layer), **_bottleneck_factory(wrapper, keep))
        adapter.load_state_dict({k: v.to(adapter.down.weight.dtype) for k, v in params.items()})
        wrapper.add_adapter(name, adapter)
    return [place.name for place, _ in plan]


def add_bottleneck(
    model: nn.Module, state: PatchState, name: str, cfg: BottleneckConfig, autocast: bool = False
) -> list[str]:
    """Add a fresh bottleneck adapter at every placement of ``cfg``; ``autocast``: float32 masters on 16-bit layers."""
    where = placements(model, state, cfg)
    hidden = hidden_size_of(model)
    names = []
    for place in where:
        wrapper = wrap_bottleneck(model, state, place)
        factory = _bottleneck_factory(wrapper, autocast)
        wrapper.add_adapter(name, make_bottleneck(cfg, hidden, cfg.size_for(hidden, place.layer), **factory))
        names.append(place.name)
    return names


def set_active_bottlenecks(model: nn.Module, state: PatchState, names: list[str]) -> None:
    """Give every bottleneck sublayer its part of the active stack (checked: one structure per stack)."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, BottleneckStackLayer)}
    for path, layer in layers.items():
        stack = [n for n in names if n in layer.adapters]
        options = {n: layer.adapters[n].options for n in stack}
        if len(set(options.values())) > 1:
            raise ValueError(
                f"adapters {stack} cannot run as one stack in {path!r}: their structures differ "
                f"({structure_differences(options)}); AdapterHub stacks adapters of one kind (e.g. seq_bn with seq_bn)"
            )
    for layer in layers.values():
        layer.set_active_stack([n for n in names if n in layer.adapters])
