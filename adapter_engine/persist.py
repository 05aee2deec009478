"""Saving and loading a whole model with its adapters (absorbed bottlenecks, a trained stack), atomically.

    save_model(model, "out/")     # HF save_pretrained + adapter_engine.json, written to a temporary folder first
    model = load_model("out/")    # the architecture class from config.json, patched, adapters rebuilt and loaded

``save_pretrained`` of a patched model already writes every parameter, adapters included, under their module
names; a plain ``from_pretrained`` ignores the adapter keys. ``adapter_engine.json`` records which adapters
exist (config, kind, modules) and which are active, so :func:`load_model` can rebuild them and load their
weights from the same checkpoint. Writing goes to a temporary sibling folder renamed into place at the end:
an interrupted save leaves the previous checkpoint (or nothing) at the target, never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import OrderedDict

import torch
from torch import nn

from . import api
from . import patching as pt
from ._io import atomic_folder_write, loaded_name, renamed_key, same_key, user_path
from .config import IA3Config, LoraConfig, config_from_dict

log = logging.getLogger(__name__)
MANIFEST = "adapter_engine.json"


def save_model(model: nn.Module, path: str | os.PathLike, **save_kwargs) -> str:
    """``model.save_pretrained(path)`` plus the adapter manifest, written atomically; returns the folder.

    A PEFT ``PeftModel`` is refused: its ``save_pretrained`` writes its adapters alone, which :func:`load_model` cannot
    load (it wrote them with an empty manifest beside them)."""
    if pt._is_peft_model(model):
        raise TypeError(
            "save_model writes a whole model, and a PeftModel's save_pretrained writes its adapters alone: save "
            "model.merge_and_unload() (the merged model), or the adapters with model.save_pretrained(folder)"
        )
    return atomic_folder_write(path, lambda folder: write_model(model, folder, **save_kwargs))


def write_model(model: nn.Module, folder: str, **save_kwargs) -> None:
    """What :func:`save_model` writes, into an existing (temporary) ``folder``: ``save_pretrained`` and the
    manifest :func:`load_model` reads to rebuild the adapters (absorbed bottlenecks, a trained stack)."""
    # (a patched model's save_pretrained is api.save_pretrained: an adapter tensor registered twice, a LayerNorm
    # before the down projection as AdapterHub's module registers it, is saved once, as safetensors requires; it
    # writes the manifest of a model with adapters too: written here for the others)
    model.save_pretrained(folder, **save_kwargs)
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        write_manifest(model, folder)


def write_manifest(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``adapter_engine.json`` into ``folder``: the adapters of ``model`` (config, kind, modules) and which are
    active, for :func:`load_model` to rebuild them over the checkpoint's weights."""
    manifest = {"adapters": {}, "active": [], "absorbed": []}
    if pt.is_patched(model):
        state = pt.get_state(model)
        for name, record in state.adapters.items():
            config = record.config.to_dict()
            if (
                getattr(record.config, "bottleneck_size", None) is not None
            ):  # (not an AdapterHub field: to_dict drops it)
                config["bottleneck_size"] = record.config.bottleneck_size
            manifest["adapters"][name] = {"kind": record.kind, "config": config, "modules": list(record.modules)}
            if record.saved:  # the modules it holds trained copies of (modules_to_save)
                manifest["adapters"][name]["saved"] = list(record.saved)
            if record.head is not None:  # an AdapterHub prediction head among them (to save it as one again)
                manifest["adapters"][name]["head"] = record.head
            if record.kind == "ia3":  # which layers scale their input: not in the config when its targets were not
                ff = [m for m in record.modules if model.get_submodule(m).ia3_feedforward[name]]
                manifest["adapters"][name]["feedforward"] = ff
            # fp32 (master weights of a 16-bit model), or the layers' dtype: read from the adapter's layers, not from
            # its trained copies of whole modules (modules_to_save), which keep the module's dtype
            copies = {id(p) for m in record.saved for p in model.get_submodule(m).modules_to_save[name].parameters()}
            weights = [p for p in api.adapter_parameters(model, name) if id(p) not in copies]
            manifest["adapters"][name]["fp32"] = all(p.dtype == torch.float32 for p in weights)
        manifest["active"] = list(state.active)
        manifest["absorbed"] = list(getattr(state, "absorbed", ()))
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)


def _adapter_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Adapter keys (``.adapters.``) whose tensor an earlier key of the same adapter module holds -> that key."""
    return tensor_aliases(state_dict, lambda key: ".adapters." in key)


def tensor_aliases(state_dict: dict[str, torch.Tensor], among=lambda key: True) -> dict[str, str]:
    """Keys (those ``among`` accepts) whose tensor an earlier key holds (the same view of the same memory) -> that
    key: tied weights, a module registered under two names. (Empty and meta tensors have no memory to share.)"""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, t in state_dict.items():
        if among(key) and isinstance(t, torch.Tensor) and t.numel() and not t.is_meta:
            ident = (t.data_ptr(), t.shape, t.stride(), t.dtype)
            if ident in first:
                aliases[key] = first[ident]
            else:
                first[ident] = key
    return aliases


def _without_adapter_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    aliases = _adapter_aliases(state_dict)
    return {k: v for k, v in state_dict.items() if k not in aliases}


def load_state_dict(model: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """``model.load_state_dict`` on a patched model (and on one ``full_finetune`` trains): a key the model lacks is
    read under the name ``from_pretrained`` gives it (:func:`~adapter_engine._io.loaded_name`). transformers 5 saves
    some models under their checkpoints' older names (ViT's ``vit.encoder.layer.0.attention.attention.query`` for
    ``vit.layers.0.attention.q_proj``, adapter keys beside them too), and ``Trainer`` resumes from a checkpoint, or
    restores the best one, with a plain ``load_state_dict(strict=False)``: a resumed patched ViT restored none of its
    adapters (nor the weights of its layers) and went on training from fresh ones, and ``load_best_model_at_end``
    kept the last adapters."""
    own = set(model.state_dict(keep_vars=True))
    rename = loaded_name(model)
    renamed = {}
    for key, value in state_dict.items():
        name = key if key in own else rename(key)
        renamed[name if name in own and name not in state_dict else key] = value
    return type(model).load_state_dict(model, like_state_dict(state_dict, renamed), strict, assign)


def like_state_dict(state_dict, entries: dict) -> OrderedDict:
    """``entries`` as a state dict carrying ``state_dict``'s ``_metadata`` (the modules' versions, which torch's
    ``load_state_dict`` reads), for a load of a state dict with keys renamed or added."""
    out = OrderedDict(entries)
    if getattr(state_dict, "_metadata", None) is not None:
        out._metadata = state_dict._metadata
    return out


def _checkpoint_tensors(path: str, keys: set[str], loaded_name=same_key) -> dict[str, torch.Tensor]:
    """The tensors of ``keys`` (the model's names) in the checkpoint at ``path``; ``loaded_name``: a checkpoint
    key's name in the model (``_io.renamed_key``)."""
    from safetensors import safe_open

    found = {}
    files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                name = key if key in keys else loaded_name(key)
                if name in keys:
                    found[name] = fh.get_tensor(key)
    return found


def _where_it_was(config, entry: dict):
    """``config`` targeting exactly the saved layers: an adapter loaded from a file (or with ``config=``) may sit on
    other layers than its config's targets select. IA3 needs the saved feed-forward layers too (manifests of earlier
    versions lack them: their IA3 configs are used as saved)."""

    def names(saved: list[str]) -> list[str]:
        return sorted({m.split(".", 1)[1] if m.startswith("base_model.") else m for m in saved})

    if isinstance(config, (LoraConfig, IA3Config)):  # the modules it holds trained copies of, as saved
        config.modules_to_save = entry.get("saved") or None
    if isinstance(config, LoraConfig):
        config.target_modules = names(entry["modules"])
    elif isinstance(config, IA3Config) and "feedforward" in entry:
        config.target_modules, config.feedforward_modules = names(entry["modules"]), names(entry["feedforward"])
    return config


def load_model(path: str | os.PathLike, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint written by :func:`save_model` (or any HF checkpoint): the architecture class from its
    config (or ``model_class``), then the recorded adapters rebuilt, their weights loaded, the active ones set."""
    import transformers

    path = user_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    config_file, adapter_file = (os.path.join(path, f) for f in ("config.json", "adapter_config.json"))
    if not os.path.isfile(config_file) and os.path.isfile(adapter_file):
        raise ValueError(  # (transformers said the folder's config.json, which it lacks, had no model_type)
            f"{path!r} is an adapter folder (adapter_config.json, no config.json), not a model: load it into its base "
            "model with load_adapter(model, path)"
        )
    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(path)
        names = [n for n in (getattr(config, "architectures", None) or []) if hasattr(transformers, n)]
        model_class = getattr(transformers, names[0]) if names else transformers.AutoModel
    model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return model
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    plain_keys = set(model.state_dict())
    for name, entry in manifest["adapters"].items():
        # (in the dtype it was saved in: a 16-bit LoRA / IA3 adapter of a 16-bit model came back as fp32 masters,
        # twice its memory; manifests of earlier versions lack "fp32": add_adapter's default for LoRA / IA3, the
        # layers' dtype for bottleneck adapters, which had no masters then)
        config = _where_it_was(config_from_dict(entry["config"]), entry)
        fresh = dataclasses.replace(config, init_lora_weights=True) if isinstance(config, LoraConfig) else config
        fp32 = entry.get("fp32", entry.get("kind") != "bottleneck")
        api.add_adapter(model, name, fresh, autocast_adapter_dtype=fp32)  # (weights loaded below)
        record = pt.get_state(model).adapters[name]
        record.config = config  # (its init as saved: 'eva', 'mica', ...)
        for module in [m for m in entry.get("saved") or () if m not in record.saved]:  # (a bottleneck's head copies)
            pt.wrap_saved(model, pt.get_state(model), module).add_copy(name)
            record.saved.append(module)
        record.head = entry.get("head")
    state_dict = model.state_dict()
    aliases = _adapter_aliases(state_dict)  # (saved once: see save_model)
    adapter_keys = set(state_dict) - plain_keys - set(aliases)
    tensors = _checkpoint_tensors(path, adapter_keys, renamed_key(getattr(model, "_weight_conversions", None)))
    missing = sorted(adapter_keys - set(tensors))
    if missing:
        raise ValueError(f"{path!r} lacks adapter weights {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    model.load_state_dict(tensors, strict=False)
    if manifest["active"]:
        api.set_active_adapters(model, manifest["active"])
    if manifest.get("absorbed"):
        pt.get_state(model).absorbed = tuple(manifest["absorbed"])
    log.info("loaded %s with adapters %s (active %s)", type(model).__name__, list(manifest["adapters"]),
             manifest["active"])  # fmt: skip
    return model
