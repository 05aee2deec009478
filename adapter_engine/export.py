"""Adapter export: the metadata and tensors :func:`~adapter_engine.api.save_adapter` writes and
:func:`~adapter_engine.api.get_adapter_state_dict` returns, in PEFT's keys (LoRA, IA3) or AdapterHub's (LoRA,
bottleneck; keys relative to the base model, in AdapterHub's names for the layers).

Kept apart from :mod:`adapter_engine.api`, which checks and loads adapters: these functions only read a patched
model's adapters and translate their config and placement into the other library's conventions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import patching as pt
from .archs import base_prefix, block_paths
from .config import BottleneckConfig, LoraConfig
from .formats import ADAPTERHUB_VERSION
from .patching import AdapterRecord, PatchState, match_targets
from .peft_targets import peft_selects


def _export_peft(model: nn.Module, name: str, record: AdapterRecord) -> tuple[dict, dict]:
    cfg = record.config
    tensors: dict[str, torch.Tensor] = {}
    ff_modules = []
    for module_name in record.modules:
        module = model.get_submodule(module_name)
        key = f"base_model.model.{module_name}"
        if record.kind == "lora":
            tensors[f"{key}.lora_A.weight"] = module.lora_A[name].weight
            tensors[f"{key}.lora_B.weight"] = module.lora_B[name].weight
        else:
            ff = module.ia3_feedforward[name]
            ff_modules += [module_name] if ff else []
            vec = module.ia3_l[name]
            tensors[f"{key}.ia3_l"] = vec.reshape(1, -1) if ff else vec.reshape(-1, 1)
    for module_name in record.saved:  # modules_to_save: PEFT saves each copy under the module's own keys
        copy = model.get_submodule(module_name).modules_to_save[name]
        tensors.update({f"base_model.model.{module_name}.{k}": v for k, v in copy.state_dict().items()})
    meta = cfg.to_dict()
    if record.saved and not cfg.modules_to_save:  # (an AdapterHub head loaded as copies: PEFT's entries for them)
        meta["modules_to_save"] = sorted(record.saved)
    if any(model.get_submodule(m).fan_in_fan_out for m in record.modules):
        meta["fan_in_fan_out"] = True  # transformers Conv1D (weight stored (in, out)): PEFT's flag for it
    targets = cfg.target_modules
    try:
        same = (
            targets is not None
            and not isinstance(targets, str)
            and {n for n in match_targets(model, targets) if peft_selects(cfg, n)} == set(record.modules)
        )
    except ValueError:
        same = False
    meta["target_modules"] = list(targets) if same else sorted(record.modules)
    if not same:  # the full names of the layers: exact entries, which PEFT's layer filters would not narrow anyway
        meta.update({k: None for k in ("exclude_modules", "layers_to_transform", "layers_pattern") if k in meta})
    if record.kind == "ia3":  # PEFT wants feedforward_modules written like target_modules (a subset of them)
        ff_cfg = cfg.feedforward_modules
        keep_ff = same and ff_cfg is not None and not isinstance(ff_cfg, str)
        meta["feedforward_modules"] = list(ff_cfg) if keep_ff else sorted(ff_modules)
        # (an empty list is PEFT's "no feed-forward layer"; match_targets refuses it as selecting nothing)
        if keep_ff and set(match_targets(model, ff_cfg) if ff_cfg else ()) != set(ff_modules):
            meta["target_modules"], meta["feedforward_modules"] = sorted(record.modules), sorted(ff_modules)
    return meta, tensors


def _adapterhub_meta(model: nn.Module, state: PatchState, name: str, config: dict) -> dict:
    base = getattr(model, base_prefix(model)) if base_prefix(model) else model
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return {
        "config": config,
        "hidden_size": hidden,
        "model_class": type(base).__name__,
        "model_name": "",
        "model_type": state.model_type,
        "name": name,
        "version": ADAPTERHUB_VERSION,
    }


def _relative(model: nn.Module, module_name: str) -> str:
    """AdapterHub keys are relative to the base model (``encoder.layer.0...`` in a BertModel)."""
    prefix = base_prefix(model)
    return module_name[len(prefix) + 1 :] if prefix and module_name.startswith(prefix + ".") else module_name


def _export_adapterhub_lora(model: nn.Module, state: PatchState, name: str, record: AdapterRecord) -> tuple:
    cfg: LoraConfig = record.config
    spec = state.spec
    if spec is None:
        raise ValueError(f"model_type {state.model_type!r} is not registered: AdapterHub cannot place this LoRA")
    if cfg.use_rslora:
        raise ValueError("AdapterHub LoRA has no rsLoRA scaling: save this adapter with format='peft'")
    own = [m for m in record.modules
           if model.get_submodule(m).lora_A[name].weight.shape[0] != cfg.r
           or not math.isclose(model.get_submodule(m).scaling[name], cfg.scaling)]  # fmt: skip
    if own:
        raise ValueError(
            f"{name!r} has layers with an r or lora_alpha of their own (rank_pattern / alpha_pattern: {own[:3]}), "
            "which AdapterHub's LoRA format cannot hold (one r and alpha for all layers): save it with format='peft'"
        )
    if record.saved and record.head is None:  # (an AdapterHub head loaded as copies is saved as that head again)
        raise ValueError(
            f"{name!r} holds trained copies of {record.saved} (PEFT's modules_to_save), which AdapterHub's LoRA format "
            "cannot hold: save it with format='peft'"
        )
    blocks = block_paths(model, spec)
    kinds = {v: k for k, v in spec.attn_matrices.items()}
    kinds |= {spec.intermediate: "intermediate", spec.output: "output"}
    per_layer: dict[int, set[str]] = {}
    for module_name in record.modules:
        owners = [(i, module_name[len(b) + 1 :]) for i, b in enumerate(blocks) if module_name.startswith(b + ".")]
        hit = owners[0] if owners else None
        if hit is None or hit[1] not in kinds:
            raise ValueError(f"layer {module_name!r} is not one AdapterHub's LoRAConfig can adapt: use format='peft'")
        per_layer.setdefault(hit[0], set()).add(kinds[hit[1]])
    shapes = {frozenset(v) for v in per_layer.values()}
    if len(shapes) != 1:
        raise ValueError(f"AdapterHub LoRA adapts the same layers in every block; {name!r} has {per_layer}")
    kinds_used = next(iter(shapes))
    letters = sorted(k for k in kinds_used if k in spec.attn_matrices)
    config = {
        "architecture": "lora", "r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
        "attn_matrices": letters, "selfattn_lora": bool(letters), "intermediate_lora": "intermediate" in kinds_used,
        "output_lora": "output" in kinds_used, "composition_mode": "add", "init_weights": "lora",
        "init_weights_seed": None, "use_gating": False, "use_dora": False, "dtype": None, "vera_b": None,
        "vera_d": None, "leave_out": [i for i in range(len(blocks)) if i not in per_layer],
    }  # fmt: skip
    tensors = {}
    for module_name in record.modules:
        module = model.get_submodule(module_name)
        key = f"{spec.to_adapterhub(_relative(model, module_name))}.loras.{name}"
        tensors[f"{key}.lora_A"] = module.lora_A[name].weight
        tensors[f"{key}.lora_B"] = module.lora_B[name].weight
    return _adapterhub_meta(model, state, name, config), tensors


def _reduction_factor(hidden: int, size: int, name: str) -> int | float:
    """A reduction factor ``rf`` for which AdapterHub's (and ``BottleneckConfig.size_for``'s) ``int(hidden // rf)`` is
    ``size``. ``hidden / size`` itself is not always one: floating point rounds ``32 / (32 / 5)`` below 5, so
    ``32 // 6.4`` is 4; the next floats below it are (``6.3999999999999995``). Sizes such as 5 of 32 or 13 of 768
    (two in five of the sizes below the hidden size) used to be refused as 'not expressible', and with them the
    save of a whole ``StackedAdapterModel`` holding such a level."""
    rf = hidden / size
    for _ in range(8):  # (one or two steps down suffice: the quotient is within a few ulps of size)
        if int(hidden // rf) == size:
            return int(rf) if float(rf).is_integer() else rf
        rf = math.nextafter(rf, 0.0)
    raise ValueError(f"adapter {name!r}: bottleneck size {size} has no AdapterHub reduction factor for hidden {hidden}")


def _export_bottleneck(model: nn.Module, state: PatchState, name: str, record: AdapterRecord) -> tuple:
    cfg: BottleneckConfig = record.config
    config = cfg.to_dict()
    if cfg.bottleneck_size is not None:  # tutorial AdapterConfig: AdapterHub only knows reduction factors
        config["reduction_factor"] = _reduction_factor(pt.hidden_size_of(model), cfg.bottleneck_size, name)
    saved_as = {p.name: pt.adapterhub_name(state.spec, p) for p in pt.placements(model, state, cfg)}
    tensors = {}
    for module_name in record.modules:
        adapter = model.get_submodule(module_name).adapters[name]
        for key, value in adapter.state_dict().items():
            tensors[f"{state.spec.to_adapterhub(_relative(model, saved_as[module_name]))}.adapters.{name}.{key}"] = (
                value
            )
    return _adapterhub_meta(model, state, name, config), tensors
