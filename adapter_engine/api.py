"""The public adapter API, as functions and (after :func:`~adapter_engine.patch`) as methods of the model.

    name = load_adapter(model, "path/to/adapter")          # PEFT or AdapterHub folder, format detected
    add_adapter(model, "mine", LoraConfig(r=8))              # fresh initialisation
    set_active_adapters(model, "mine" | ["a", "b"] | Stack("a", "b") | None)
    save_adapter(model, "mine", "out/", format="peft" | "adapterhub")
    delete_adapter(model, "mine"); list_adapters(model); merge_adapter(model); unmerge_adapter(model)

Loading is all-or-nothing: every key, layer and shape is checked (errors name the layer and both shapes) before
the model is touched. A function called on an unpatched model patches it first (and unpatches it again when the
call is refused). The exporters behind ``save_adapter`` live in :mod:`adapter_engine.export`; snapshots for
offloading (``snapshot_adapter``, ``restore_adapter``, ``adapter_nbytes``) in :mod:`adapter_engine.residency`,
re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import heads as hd
from . import patching as pt
from ._adapters import _apply_linear, _check_name, _state, check_not_meta, unpatch_on_error
from .archs import adapterhub_lora_modules, base_prefix, block_paths
from .config import AnyConfig, BottleneckConfig, IA3Config, LoraConfig, Stack, coerce_config
from .export import _export_adapterhub_lora, _export_bottleneck, _export_peft
from .formats import ADAPTERHUB_VERSION, AdapterFile, read_adapter, write_adapter
from .kernels._backend import normal_tensors
from .lora import LoraLinear, adapter_dtype, has_own_forward, is_linear_like, not_wrappable
from .patching import AdapterRecord, PatchState, match_targets, wrap_linear
from .peft_targets import peft_selects
from .residency import AdapterSnapshot, adapter_nbytes, adapter_parameters, restore_adapter, snapshot_adapter
from .saved_modules import ModulesToSaveLayer, conflict, select

logger = logging.getLogger(__name__)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or LoraLinear."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if not isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])


# ----------------------------------------------------------------------------------------------- planning
def _plan_linear(model: nn.Module, state: PatchState, file: AdapterFile, cfg: AnyConfig) -> list[tuple]:
    """Validate a LoRA / IA3 file against the model; returns [(module name, tensors...)] without touching it."""
    modules = dict(model.named_modules())
    if file.format == "adapterhub" and state.spec is not None and file.meta.get("model_type") == state.model_type:
        # made for this architecture, yet on matrices it has no layer for (GPT-2's fused c_attn): say so before the
        # per-layer shape checks, whose "another architecture?" hint would mislead
        adapterhub_lora_modules(model, state.spec, file.meta.get("config", {}))
    plan, unknown = [], []
    want = ("lora_A", "lora_B") if isinstance(cfg, LoraConfig) else ("ia3_l",)
    # IA3's feed-forward layers, by PEFT's rule on the saved name or the model's: a regex written against the
    # model the adapter was saved from (BertModel) also holds in its task model (BertForSequenceClassification)
    ff_targets = cfg.feedforward_modules if isinstance(cfg, IA3Config) else None
    for saved, params in sorted(file.entries.items()):
        name = pt.resolve_module(model, saved, modules)
        if name is None:
            unknown.append(saved)
            continue
        mod = modules[name]
        if not (is_linear_like(mod) or isinstance(mod, LoraLinear)):
            if has_own_forward(mod):
                raise ValueError(not_wrappable(name, mod))
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Embedding)):  # PEFT adapts these too
                raise ValueError(
                    f"layer {name!r} is a {type(mod).__name__}: LoRA / IA3 on {type(mod).__name__} layers is not "
                    "supported by adapter-engine (only nn.Linear and transformers Conv1D layers); merge it with PEFT"
                )
            raise ValueError(f"layer {name!r} is a {type(mod).__name__}, not a Linear/Conv1D: wrong architecture?")
        missing = [p for p in want if p not in params]
        extra = [p for p in params if p not in want]
        if missing or extra:
            raise ValueError(f"layer {name!r}: missing weights {missing}, unexpected weights {extra} for {cfg!r}")
        fin, fout = _dims(mod)
        if isinstance(cfg, LoraConfig):
            a, b = params["lora_A"], params["lora_B"]
            r = cfg.rank_for(name)  # (rank_pattern: PEFT's rank for this layer of this model)
            exp_a, exp_b = (r, fin), (fout, r)
            for label, t, exp in (("lora_A", a, exp_a), ("lora_B", b, exp_b)):
                if tuple(t.shape) != exp:
                    where = f"r={r} from rank_pattern" if r != cfg.r else f"r={r}"
                    raise ValueError(
                        f"layer {name!r}: {label} has shape {tuple(t.shape)} but the model needs {exp} "
                        f"(layer in={fin}, out={fout}, {where}): adapter made for another architecture or size?"
                    )
            plan.append((name, a, b))
        else:
            vec = params["ia3_l"]
            ff = bool(ff_targets) and (_feedforward(saved, ff_targets) or _feedforward(name, ff_targets))
            size = fin if ff else fout
            if vec.numel() != size or vec.dim() > 2:
                raise ValueError(
                    f"layer {name!r}: ia3_l has shape {tuple(vec.shape)} but the model needs {size} values "
                    f"({'input' if ff else 'output'} features of a ({fout}, {fin}) layer)"
                )
            plan.append((name, vec.reshape(-1), ff))
    if unknown:
        made_for = file.meta.get("model_type")
        hint = f"; the adapter was made for model_type {made_for!r}" if made_for else ""
        raise ValueError(
            f"adapter weights for layers the model does not have: {unknown[:4]}"
            f"{' ...' if len(unknown) > 4 else ''} ({type(model).__name__}, model_type {state.model_type!r}{hint})"
        )
    _check_extra(file, cfg, {saved: pt.resolve_module(model, saved, modules) for saved in file.entries})
    for key, copy in file.base_copies.items():
        saved, param = key.rsplit(".", 1)
        name = pt.resolve_module(model, saved, modules)
        check_base_copy(f"{name}.{param}", getattr(modules[name], param, None), copy, file.path)
    _check_missing(model, state, file, cfg, {p[0] for p in plan})
    return plan


def check_base_copy(name: str, weight: torch.Tensor | None, copy: torch.Tensor, path: str) -> None:
    """PEFT saves the base weight of a targeted ``lm_head`` / ``embed_tokens`` beside its LoRA factors and loads it
    over the model's. The engine keeps the model's weight, so it loads the adapter only where both are the same
    (in the precision of either: a copy saved in bf16 matches an fp32 model whose weight rounds to it). A copy that
    differs (a resized or trained vocabulary) is refused: the adapter was trained on that other weight."""
    if weight is None or tuple(weight.shape) != tuple(copy.shape):
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"the PEFT adapter {path!r} carries its own copy of {name} with shape {tuple(copy.shape)}, but the model's "
            f"is {shape}: an adapter trained with a resized vocabulary is not supported"
        )
    weight = weight.detach().to("cpu")
    if not (torch.equal(weight.to(copy.dtype), copy) or torch.equal(copy.to(weight.dtype), weight)):
        raise ValueError(
            f"the PEFT adapter {path!r} carries its own copy of {name} (PEFT saves it for a LoRA on lm_head or "
            "embed_tokens), and it differs from the model's weight: the adapter was trained on another base (or a "
            "trained vocabulary layer), which adapter-engine does not load over the model's weights"
        )


def _feedforward(name: str, targets: list[str] | str) -> bool:
    """PEFT's IA3 rule for ``feedforward_modules``: a regex string fullmatches the name, a list entry is a plain
    suffix of it (``str.endswith``, no dot needed, unlike ``target_modules``: ``"proj"`` selects ``q_proj``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name.endswith(t) for t in targets)


def _check_extra(file: AdapterFile, cfg: AnyConfig, names: dict[str, str]) -> None:
    """Weights for layers the PEFT config does not select (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``: PEFT would ignore them silently). A layer counts as selected when its saved name (what
    PEFT matched) or the model's name for it is selected."""
    if file.format != "peft" or cfg.target_modules is None:
        return
    extra = sorted(s for s, n in names.items() if not peft_selects(cfg, s) and not peft_selects(cfg, n))
    if extra:
        fields = [f"target_modules {cfg.target_modules!r}"] + [
            f"{f} {getattr(cfg, f)!r}" for f in ("exclude_modules", "layers_to_transform") if getattr(cfg, f, None)
        ]
        raise ValueError(
            f"adapter weights for layers that {' with '.join(fields)} does not select: {extra[:4]}"
            f"{' ...' if len(extra) > 4 else ''} ({file.path!r}); PEFT would ignore them: add them to target_modules "
            "in adapter_config.json or remove their weights"
        )


def _check_missing(model, state, file: AdapterFile, cfg: AnyConfig, found: set[str]) -> None:
    """Layers the config says are adapted but the file has no weights for."""
    expected: set[str] = set()
    if file.format == "peft" and cfg.target_modules is not None:
        try:
            expected = {n for n in match_targets(model, cfg.target_modules) if peft_selects(cfg, n)}
        except ValueError:
            return  # regex written against another wrapper's names: the per-layer checks still hold
        # PEFT leaves the layers inside a module it copies (modules_to_save) out of the targets
        modules = dict(model.named_modules())
        copied = [c for s in file.saved_modules if (c := pt.resolve_module(model, s, modules))]
        expected = {n for n in expected if not pt.within(n, copied)}
        prefix = base_prefix(model)
        if prefix and all(n.startswith(prefix + ".") for n in found):
            expected = {n for n in expected if n.startswith(prefix + ".")}
    elif file.format == "adapterhub" and isinstance(cfg, LoraConfig) and state.spec is not None:
        expected = set(adapterhub_lora_modules(model, state.spec, file.meta.get("config", {})))
    missing = sorted(expected - found)
    if missing:
        raise ValueError(f"missing adapter weights for layers {missing[:4]}{' ...' if len(missing) > 4 else ''}")


# ----------------------------------------------------------------------------------------------- public API
# (the adapters of a load or add inside a caller's torch.inference_mode are normal tensors, as the memory manager's
# loads: an inference tensor cannot train later, and has no version counter for the serving caches, whose first
# forward failed with a RuntimeError)
@unpatch_on_error  # (outermost: a refused load leaves an unpatched model as it was)
@normal_tensors()
def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    config: Any = None,
    *,
    set_active: bool = False,
    autocast_adapter_dtype: bool | None = True,
    head: bool | None = None,
) -> str:
    """Load a PEFT or AdapterHub adapter folder into ``model``; returns its name.

    ``name`` defaults to the name AdapterHub saved, else the folder's name. ``config`` overrides the saved config.
    Raises ``ValueError`` naming the layer and both shapes when the adapter does not fit the model; nothing is
    loaded unless everything fits. ``autocast_adapter_dtype`` (PEFT's, same default): adapter weights (LoRA, IA3,
    bottleneck) of float16 / bfloat16 layers are kept in float32 (the file's values exactly; computed in the layer's
    dtype); False loads them in the layers' dtype; None as saved (fp32 where the file's tensors are fp32).

    ``head``: an AdapterHub prediction head saved beside the adapter (``head_config.json``) loads as the adapter's
    trained copy of the model's own head where it maps onto it exactly (see :mod:`adapter_engine.heads`), and is left
    out with a warning naming the reason otherwise (None, the default); True raises instead; False skips it.
    """
    if name is not None:  # (before the files are read: a name of another type failed inside the reader)
        _check_name(_state(model), name)
    file = read_adapter(path, name=name, config=config)
    name = name or file.saved_name or os.path.basename(os.path.normpath(file.path))
    return load_adapter_file(
        model, file, name, set_active=set_active, autocast_adapter_dtype=autocast_adapter_dtype, head=head
    )


@unpatch_on_error
@normal_tensors()
def load_adapter_file(
    model: nn.Module,
    file: AdapterFile,
    name: str,
    *,
    set_active: bool = False,
    autocast_adapter_dtype: bool | None,
    head: bool | None = None,
) -> str:
    """:func:`load_adapter` of an adapter already read (:func:`~adapter_engine.formats.read_adapter`) as ``name``."""
    state = _state(model)
    _check_name(state, name)
    check_not_meta(model, f"cannot load adapter {name!r} from {file.path!r}")
    cfg = file.config
    if file.format == "adapterhub" and state.spec is not None:  # AdapterHub's names for a renamed layout (ViT)
        file.entries = {state.spec.from_adapterhub(saved): params for saved, params in file.entries.items()}
    if isinstance(cfg, BottleneckConfig):
        _check_places(model, state, name, cfg)
        plan = pt.plan_bottleneck(model, state, file.entries, cfg, file.meta)
        head_plan = _plan_head(model, file, head)
        modules, saved = pt.apply_bottleneck(model, state, name, cfg, plan, autocast=autocast_adapter_dtype), []
    else:
        plan = _plan_linear(model, state, file, cfg)
        saved_plan = _plan_saved(model, file, cfg, [p[0] for p in plan])
        head_plan = _plan_head(model, file, head)
        modules = _apply_linear(model, state, name, cfg, plan, autocast=autocast_adapter_dtype)
        saved = _apply_saved(model, state, name, saved_plan)
    if head_plan is not None:  # (checked with the rest: a copy of a module no adapter layer holds cannot fail)
        saved += _apply_saved(model, state, name, head_plan.copies)
        hd.set_labels(model, head_plan.label2id)
    state.adapters[name] = AdapterRecord(config=cfg, kind=_kind(cfg), modules=modules, saved=saved,
                                         head=head_plan.record if head_plan is not None else None)  # fmt: skip
    logger.info("loaded %s adapter %r from %s (%d layers)", file.format, name, file.path, len(modules))
    if set_active:
        set_active_adapters(model, name)
    return name


def _plan_head(model: nn.Module, file: AdapterFile, head: bool | None) -> hd.HeadPlan | None:
    """The AdapterHub prediction head beside the adapter, planned onto the model's head (None: none, or left out)."""
    saved = hd.read_head(file.path) if file.format == "adapterhub" and head is not False else None
    if saved is None:
        if head:
            raise ValueError(f"head=True, but {file.path!r} holds no AdapterHub prediction head ({hd.HEAD_CONFIG})")
        if head is False and any(os.path.isfile(os.path.join(file.path, f)) for f in hd.HEAD_FILES):
            logger.info("head=False: the prediction head in %s is not loaded", file.path)
        return None
    plan = hd.plan_head(model, saved)
    if isinstance(plan, hd.HeadPlan):
        return plan
    message = f"{saved.describe()} is not loaded into {type(model).__name__}: {plan}"
    if head:
        raise ValueError(f"head=True: {message}")
    logger.warning("%s; the adapter loads without it", message)
    return None


def _plan_saved(model: nn.Module, file: AdapterFile, cfg: AnyConfig, adapted: list[str]) -> dict[str, dict]:
    """Check the trained module copies of a PEFT file (``modules_to_save``) against the model: {module: state}."""
    if not file.saved_modules:
        return {}
    modules = dict(model.named_modules())
    selectable = set(select(pt._outside_adapters(modules), cfg.modules_to_save))
    plan = {}
    for saved, tensors in sorted(file.saved_modules.items()):
        name = pt.resolve_module(model, saved, modules)
        if name is None or name not in selectable:
            raise ValueError(
                f"the adapter {file.path!r} holds a trained copy of {saved!r} (modules_to_save "
                f"{cfg.modules_to_save}), a module {type(model).__name__} does not have"
            )
        if any(pt.within(a, [name]) for a in adapted):
            raise ValueError(f"modules_to_save: {name!r} also holds the adapter's LoRA / IA3 layers")
        pt.check_saved(model, name)
        own = modules[name].state_dict()
        own = {k: v for k, v in own.items() if not k.startswith("modules_to_save.")}
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"the trained copy of {name!r} in {file.path!r}: missing {missing}, unexpected {extra}")
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"the trained copy of {name!r}: {key} has shape {tuple(t.shape)} but the model's is "
                    f"{tuple(own[key].shape)}: adapter made for another architecture or number of labels?"
                )
        plan[name] = tensors
    return plan


def _apply_saved(model: nn.Module, state: PatchState, name: str, plan: dict[str, dict]) -> list[str]:
    for module_name, tensors in plan.items():
        pt.wrap_saved(model, state, module_name).add_copy(name, tensors)
    return list(plan)


def _check_places(model: nn.Module, state: PatchState, name: str, cfg: BottleneckConfig) -> None:
    """A bottleneck config must place at least one adapter (``leave_out`` may not skip every layer), and one without
    ``original_ln_after`` only after sublayers that add their residual themselves (BERT's ``BertOutput``): where the
    block adds it after the sublayer (GPT-2, Llama, DistilBERT, ViT's attention), AdapterHub's adapter layer then
    leaves the residual out of the block's output, which the engine's wrapper cannot (it used to load and fail at the
    first forward)."""
    places = pt.placements(model, state, cfg)
    if not places:
        blocks = len(block_paths(model, state.spec))
        raise ValueError(
            f"bottleneck adapter {name!r}: leave_out={cfg.leave_out} skips all {blocks} layers of "
            f"{type(model).__name__}: the adapter would have no modules"
        )
    spec = state.spec
    if cfg.residual_before_ln == "post_add" and cfg.original_ln_before and not cfg.is_parallel:
        bare = [p.name for p in places if not _model_layer_norm(model, spec, p)]
        if bare:
            raise ValueError(
                f"bottleneck adapter {name!r}: residual_before_ln='post_add' is not supported in "
                f"{type(model).__name__} at {bare[0]!r} (model_type {state.model_type!r}), where no LayerNorm of the "
                "model follows the sublayer: AdapterHub takes that residual only where one does, and its forward fails "
                "here (the engine ran it as residual_before_ln=True); use residual_before_ln=True"
            )
    outside = [p.name for p in places if (spec.attn_residual if p.which == "mh" else spec.ffn_residual) is not None]
    if not cfg.original_ln_after and outside:
        raise ValueError(
            f"bottleneck adapter {name!r}: original_ln_after=False is not supported in {type(model).__name__} at "
            f"{outside[0]!r} (model_type {state.model_type!r}), where the block adds the residual after the sublayer "
            "(supported after BERT / RoBERTa-style sublayers that add it themselves)"
        )


def _model_layer_norm(model: nn.Module, spec, place: pt.Placement) -> bool:
    """Whether the adapters of ``place`` get the model's LayerNorm (AdapterHub's ``layer_norm`` argument): the
    sublayer's own (BERT's ``LN(dense(x) + y)``) or the post-LN block's (DistilBERT); pre-LN blocks have none."""
    if (spec.attn_residual if place.which == "mh" else spec.ffn_residual) is not None:
        return (spec.attn_layer_norm if place.which == "mh" else spec.ffn_layer_norm) is not None
    return isinstance(getattr(model.get_submodule(place.name), "LayerNorm", None), nn.LayerNorm)


def _kind(cfg: AnyConfig) -> str:
    return "lora" if isinstance(cfg, LoraConfig) else "ia3" if isinstance(cfg, IA3Config) else "bottleneck"


@unpatch_on_error
@normal_tensors()  # (see load_adapter)
def add_adapter(model: nn.Module, name: str, config: Any, *, autocast_adapter_dtype: bool = True) -> None:
    """Add a freshly initialised adapter (LoRA: B = 0, so outputs start unchanged; bottleneck: AdapterHub's init).

    config: :class:`LoraConfig`, :class:`IA3Config`, :class:`BottleneckConfig`, a tutorial :class:`AdapterConfig`,
    a preset name (``"seq_bn"``, ``"double_seq_bn"``, ``"par_bn"``, ``"lora"``) or a config dict of either library.
    autocast_adapter_dtype (PEFT's, same default): an adapter (LoRA, IA3, bottleneck) of float16 / bfloat16 layers gets
    float32 master weights (see :func:`~adapter_engine.lora.adapter_dtype`); False: the layers' dtype.
    """
    state = _state(model)
    _check_name(state, name)
    cfg = coerce_config(config)
    if isinstance(cfg, BottleneckConfig):
        _check_places(model, state, name, cfg)
        modules, saved = pt.add_bottleneck(model, state, name, cfg, autocast=autocast_adapter_dtype), []
    else:
        spec = state.spec
        default = (spec.lora_targets if isinstance(cfg, LoraConfig) else spec.ia3_targets) if spec else None
        targets = cfg.target_modules if cfg.target_modules is not None else default
        if targets is None:
            raise ValueError(f"model_type {state.model_type!r} is not registered: set target_modules in the config")
        if not targets and cfg.target_modules is None:  # a registered model PEFT has no IA3 defaults for
            raise ValueError(
                f"model_type {state.model_type!r} has no default IA3 target_modules (PEFT has none either): "
                "set target_modules in the config"
            )
        names = match_targets(model, targets)
        kept = [n for n in names if peft_selects(cfg, n, targets)]  # exclude_modules, layers_to_transform
        if not kept:
            raise ValueError(
                f"target_modules {targets!r} selects {names[:4]}{' ...' if len(names) > 4 else ''}, and "
                f"exclude_modules {cfg.exclude_modules!r} / layers_to_transform "
                f"{getattr(cfg, 'layers_to_transform', None)!r} leave none of them"
            )
        names = kept
        saved = []
        if cfg.modules_to_save:
            saved = select(pt._outside_adapters(dict(model.named_modules())), cfg.modules_to_save)
            if not saved:
                raise ValueError(f"modules_to_save {cfg.modules_to_save} selects no module of {type(model).__name__}")
            for s in saved:  # (checked before any layer is wrapped)
                pt.check_saved(model, s)
            # PEFT leaves the layers inside a copied module out of the targets: the copy trains whole
            names = [n for n in names if not pt.within(n, saved)]
            if not names:
                raise ValueError(f"target_modules {targets!r} selects only layers inside modules_to_save {saved}")
        if isinstance(cfg, LoraConfig):
            _check_fresh_init(cfg, names)
        ff: set[str] = set()
        if isinstance(cfg, IA3Config):
            ff_targets = cfg.feedforward_modules if cfg.feedforward_modules is not None else (
                spec.ia3_feedforward if spec and cfg.target_modules is None else [])  # fmt: skip
            listed = isinstance(ff_targets, list) and isinstance(cfg.target_modules, list)
            if listed and not set(ff_targets) <= set(targets):
                raise ValueError(  # (PEFT's IA3Config refuses this too)
                    f"IA3 feedforward_modules {ff_targets!r} must be a subset of target_modules {targets!r}"
                )
            ff = {n for n in names if ff_targets and _feedforward(n, ff_targets)}
        for n in names:
            wrapper = wrap_linear(model, state, n)
            dtype = adapter_dtype(wrapper.weight.dtype, autocast_adapter_dtype)
            if isinstance(cfg, LoraConfig):
                r, scaling = cfg.rank_for(n), cfg.scaling_for(n)  # (rank_pattern / alpha_pattern)
                wrapper.add_lora(name, r, scaling, cfg.lora_dropout, init=cfg.init_lora_weights, dtype=dtype)
            else:
                wrapper.add_ia3(name, feedforward=n in ff, init=cfg.init_ia3_weights, dtype=dtype)
        for s in saved:  # trainable copies of the modules as they are now (PEFT's modules_to_save)
            pt.wrap_saved(model, state, s).add_copy(name)
        modules = names
    state.adapters[name] = AdapterRecord(config=cfg, kind=_kind(cfg), modules=modules, saved=saved)


def _check_fresh_init(cfg: LoraConfig, names: list[str]) -> None:
    """``init_lora_weights`` that a saved adapter may name but a fresh one cannot get here (before any change)."""
    init = cfg.init_lora_weights.lower() if isinstance(cfg.init_lora_weights, str) else cfg.init_lora_weights
    if init == "eva":
        raise ValueError(
            "LoraConfig: init_lora_weights='eva' is not supported by add_adapter: EVA initialises the factors from "
            "the model's activations on data (PEFT's initialize_lora_eva_weights), which adapter-engine does not; "
            "initialise it in PEFT and load the saved adapter, or use True / 'gaussian'"
        )
    if init == "mica":
        raise ValueError(
            "LoraConfig: init_lora_weights='mica' is not supported by add_adapter: MiCA takes B from the base "
            "weight's singular vectors and keeps it frozen in training (only A trains), which adapter-engine does "
            "not; initialise it in PEFT and load the saved adapter, or use True / 'gaussian'"
        )
    odd = [f"{n} (r={cfg.rank_for(n)})" for n in names if cfg.rank_for(n) % 2]
    if init == "orthogonal" and odd:
        raise ValueError(f"LoraConfig: init_lora_weights='orthogonal' needs an even r (PEFT's rule): {odd[:3]}")


def _parse_active(adapters: Any) -> tuple[str, ...]:
    if adapters is None:
        return ()
    if isinstance(adapters, str):
        return (adapters,)
    if isinstance(adapters, Stack):
        return adapters.children
    if isinstance(adapters, Sequence) and all(isinstance(a, str) for a in adapters):
        return tuple(adapters)
    raise TypeError(f"active adapters must be a name, a list of names, a Stack or None, got {adapters!r}")


@unpatch_on_error
def set_active_adapters(model: nn.Module, adapters: str | Sequence[str] | Stack | None) -> None:
    """Activate adapters: LoRA/IA3 terms are summed in the given order (PEFT); bottleneck adapters run as a
    ``Stack`` in that order (AdapterHub; a list means a Stack). ``None`` deactivates all. A refused call (unknown
    names, a repeated name, bottleneck adapters of different structures in one layer) changes nothing."""
    state = _state(model)
    names = _parse_active(adapters)
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        from .merging import merged_hint

        hint = merged_hint(model, unknown)
        raise ValueError(f"unknown adapters {unknown}; this model has {list(state.adapters)}{hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"an adapter appears twice in {names}")
    saved_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveLayer)]
    for module_name, module in saved_layers:  # one trained copy per module can run (checked before any change)
        holders = [n for n in names if n in module.modules_to_save]
        if len(holders) > 1:
            heads = [n for n in holders if state.adapters[n].head is not None]
            # AdapterHub runs a Stack of adapters saved with heads through one head: say how to get that here
            hint = (
                f"; {heads} hold AdapterHub prediction heads: load all but the one whose head should run with "
                "load_adapter(..., head=False) to stack them"
                if heads
                else ""
            )
            raise ValueError(conflict(holders, repr(module_name)) + hint)
    # the bottleneck layers first: set_active_bottlenecks checks every layer (one structure per stack) before it
    # changes any, so a refused stack raises here, before the LoRA layers or state.active change
    pt.set_active_bottlenecks(model, state, [n for n in names if state.adapters[n].kind == "bottleneck"])
    state.active = names
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.active_adapters = [n for n in names if module.has_adapter(n)]
    for _, module in saved_layers:
        module.active_adapters = [n for n in names if n in module.modules_to_save]


@unpatch_on_error
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its weights. A merged adapter is not one any more (:func:`merge_adapter` drops
    it): :func:`unmerge_adapter` takes its terms out of the weights."""
    state = _state(model)
    if name not in state.adapters:
        from .merging import merged_hint

        hint = merged_hint(model, [name])
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.adapters)}{hint}")
    record = state.adapters.pop(name)
    for module_name in (*record.modules, *record.saved):
        module = model.get_submodule(module_name)
        module.delete_adapter(name)
    state.active = tuple(n for n in state.active if n != name)


@unpatch_on_error  # (a PeftModel: refused, left as it was)
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added (none in a model that is not patched: asking
    does not patch it; it used to, wrapping its default targets, which a later ``peft.get_peft_model`` refused)."""
    return list(_state(model).adapters) if _asks_patched(model) else []


@unpatch_on_error
def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters ``model`` runs, in order (none in a model that is not patched, which asking leaves so)."""
    return _state(model).active if _asks_patched(model) else ()


def _asks_patched(model: nn.Module) -> bool:
    """Whether a question about ``model``'s adapters goes to its patch state: a plain model has none, and asking
    leaves it unpatched (a PeftModel is patched, and refused; a StackedAdapterModel is refused naming sam.model)."""
    if pt.is_patched(model) or pt._is_peft_model(model):
        return True
    pt.refuse_stacked(model)
    return False


# transformers' adapter methods (``PeftAdapterMixin``), bound on a patched model so that HF code calling them acts on
# the engine's adapters: left unbound, they reached transformers' PEFT integration, which answered a misleading "PEFT
# >= 0.22" error and left the adapters on.
def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone until :func:`enable_adapters` (the active adapters are remembered)."""
    state = _state(model)
    if state.active:
        state.disabled = state.active
    set_active_adapters(model, None)


def enable_adapters(model: nn.Module) -> None:
    """Activate again the adapters :func:`disable_adapters` turned off (those still present), unless others were
    activated since."""
    state = _state(model)
    names, state.disabled = [n for n in state.disabled if n in state.adapters], ()
    if names and not state.active:
        set_active_adapters(model, names)


def active_adapter_list(model: nn.Module) -> list[str]:
    """transformers' ``model.active_adapters()``: the active adapter names, as a list."""
    return list(_state(model).active)


@unpatch_on_error
def get_adapter_state_dict(
    model: nn.Module, adapter_name: str | None = None, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """transformers' ``model.get_adapter_state_dict()``: the tensors :func:`save_adapter` writes for ``adapter_name``
    (default: the first active one), AdapterHub keys for a bottleneck adapter, and for LoRA / IA3 PEFT's keys without
    their ``base_model.model.`` prefix, as transformers' method gives them (its ``save_pretrained`` and callers add
    the prefix; the engine used to give it already, so theirs got it twice and PEFT found no weights).
    ``state_dict``: the model's state dict to read them from instead of its parameters (transformers' argument, for
    a state dict gathered elsewhere, e.g. under model parallelism), keyed as ``model.state_dict()``."""
    state = _state(model)
    if adapter_name is None:
        if not state.active:
            raise ValueError(f"no active adapter: name one of {list(state.adapters)}")
        adapter_name = state.active[0]
    if adapter_name not in state.adapters:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(state.adapters)}")
    record = state.adapters[adapter_name]
    if record.kind == "bottleneck":
        tensors = dict(_export_bottleneck(model, state, adapter_name, record)[1])
    else:
        prefix = "base_model.model."
        tensors = {k.removeprefix(prefix): v for k, v in _export_peft(model, adapter_name, record)[1].items()}
    return tensors if state_dict is None else _read_from(model, tensors, state_dict)


def _read_from(model: nn.Module, tensors: dict, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (views of the model's own tensors) with each value read from ``state_dict`` instead: the entry of
    the model tensor it views (the same storage and size), in the exported shape."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault((tensor.data_ptr(), tensor.numel()), []).append(name)
    out = {}
    for key, tensor in tensors.items():
        sources = names.get((tensor.data_ptr(), tensor.numel()), [])
        found = next((n for n in sources if n in state_dict), None)
        if found is None:
            raise ValueError(f"state_dict has no entry for {key!r} (the model's {' or '.join(sources) or '?'})")
        value = state_dict[found]
        if value.numel() != tensor.numel():
            raise ValueError(f"state_dict[{found!r}] has shape {tuple(value.shape)}; the model's {tuple(tensor.shape)}")
        out[key] = value.reshape(tensor.shape)
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``save_pretrained`` on a patched model: every parameter, adapters included (a plain
    ``from_pretrained`` ignores the adapter keys; :func:`~adapter_engine.persist.load_model` reads them back), with a
    tensor an adapter registers under two names (its LayerNorm before the down projection, ``ln_before``, as
    AdapterHub's module does) saved once: safetensors refused the shared tensors with a RuntimeError. A
    ``state_dict`` given (``transformers.Trainer`` passes one) loses those second names too. The adapters' manifest
    (``adapter_engine.json``, as :func:`~adapter_engine.persist.save_model` writes it) goes with them, so that
    :func:`~adapter_engine.persist.load_model` rebuilds them: without it, it silently loaded the base model alone.
    Adapters a memory
    manager evicted to host memory are not in the model, so not in the checkpoint: a warning names them
    (``StackedAdapterModel.save`` writes every level and sibling)."""
    from .memory import offloaded_adapters  # (memory imports this module)
    from .persist import _without_adapter_aliases, write_manifest  # (persist imports this module)

    away = offloaded_adapters(model)
    if away:
        logger.warning(
            "save_pretrained: adapters %s are evicted to host memory by a memory manager, not in the model: the "
            "checkpoint leaves them out (StackedAdapterModel.save writes every level and sibling; "
            "AdapterMemoryManager.reading(name) puts one back for a save_adapter)",
            away,
        )

    if len(args) < 2:  # (else state_dict came positionally, save_pretrained's third parameter: left as given)
        given = kwargs.get("state_dict")
        kwargs["state_dict"] = _without_adapter_aliases(model.state_dict() if given is None else given)
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if _state(model).adapters and (args[0] if args else kwargs.get("is_main_process", True)):
        write_manifest(model, save_directory)
    return result


def resize_token_embeddings(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``resize_token_embeddings`` on a patched model, refused before anything changes while an adapter
    layer wraps the input or output embeddings (a LoRA / IA3 target ``lm_head``, a ``modules_to_save`` copy of it):
    transformers resized the input embeddings, then failed on the wrapped head with a TypeError, which left the two
    vocabularies apart."""
    layers = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    wrapped = {side: layer for side, layer in layers.items() if isinstance(layer, (LoraLinear, ModulesToSaveLayer))}
    if wrapped:
        names = {m: n for n, m in model.named_modules()}
        which = ", ".join(f"the {side} embeddings {names.get(layer)!r}" for side, layer in wrapped.items())
        raise ValueError(
            f"resize_token_embeddings: {which} carry adapter layers, which transformers cannot resize: resize before "
            "adding adapters there, or once the model is unpatched (adapter_engine.unpatch, or merge_adapter of all "
            "its adapters)"
        )
    return type(model).resize_token_embeddings(model, *args, **kwargs)


@unpatch_on_error
def merge_adapter(model: nn.Module, names: str | Sequence[str] | None = None, weights=None, **options) -> nn.Module:
    """Fold LoRA / IA3 adapters into the base weights in place and drop them (see
    :func:`adapter_engine.merging.merge_adapter` for ``weights``, ``combination``, ``exact``, ``absorb``)."""
    from .merging import merge_adapter as _merge

    _state(model)
    return _merge(model, names, weights, **options)


def unmerge_adapter(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo the merge of ``name`` (default: the last merge); see :func:`adapter_engine.merging.unmerge_adapter`."""
    from .merging import unmerge_adapter as _unmerge

    return _unmerge(model, name)


@unpatch_on_error
def save_adapter(
    model: nn.Module,
    name: str,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    safe_serialization: bool | None = None,
) -> str:
    """Save adapter ``name`` so that its home library loads it: ``"peft"`` (LoRA, IA3; ``PeftModel.from_pretrained``)
    or ``"adapterhub"`` (bottleneck, LoRA; ``model.load_adapter`` of ``adapters``); None (the default): AdapterHub's
    for a bottleneck adapter, PEFT's for the others (the default was ``"peft"``, which refused every bottleneck
    adapter). Returns the folder."""
    state = _state(model)
    if name not in state.adapters:
        from .memory import offloaded_adapters  # (memory imports this module)
        from .merging import merged_hint

        away = (
            f" ({name!r} is evicted to host memory by a memory manager: save it inside memory.reading({name!r}))"
            if name in offloaded_adapters(model)
            else merged_hint(model, [name])
        )
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.adapters)}{away}")
    record = state.adapters[name]
    if format is None:
        format = "adapterhub" if record.kind == "bottleneck" else "peft"
    if format not in ("peft", "adapterhub"):
        raise ValueError(f"unknown adapter format {format!r}; supported: 'peft', 'adapterhub'")
    if record.kind == "ia3" and format == "adapterhub":
        raise ValueError(f"{name!r} is an IA3 adapter: AdapterHub has no IA3 format, use format='peft'")
    head = hd.export_head(model, name, record.head) if record.head is not None and format == "adapterhub" else None
    if record.kind == "bottleneck":
        if format != "adapterhub":
            raise ValueError(f"{name!r} is a bottleneck adapter: PEFT has no such format, use format='adapterhub'")
        meta, tensors = _export_bottleneck(model, state, name, record)
    elif format == "peft":
        meta, tensors = _export_peft(model, name, record)
    else:
        meta, tensors = _export_adapterhub_lora(model, state, name, record)
    return write_adapter(path, format, meta, tensors, safe_serialization=safe_serialization, head=head)


__all__ = [
    "AdapterSnapshot",
    "adapter_parameters",
    "adapter_nbytes",
    "snapshot_adapter",
    "restore_adapter",
    "load_adapter",
    "add_adapter",
    "set_active_adapters",
    "delete_adapter",
    "list_adapters",
    "active_adapters",
    "save_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "ADAPTERHUB_VERSION",
]
