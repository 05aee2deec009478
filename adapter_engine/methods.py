"""The adapter methods ``patch`` binds on a model that take both the engine's (and AdapterHub's) call forms and
transformers' (``PeftAdapterMixin``), so HF code calling them reaches the engine's adapters:

    model.add_adapter("mine", config)                        # the engine / AdapterHub: (name, config)
    model.add_adapter(peft_config, adapter_name="mine")      # transformers: (adapter_config, adapter_name="default")
    model.load_adapter(path, adapter_name="mine")            # transformers' keyword names (peft_model_id, ...)
    model.set_adapter(["a", "b"])                            # PEFT's: the active adapters also become trainable
    model.delete_adapter(["a", "b"])                         # transformers deletes several at once

They used to be the functional API bound as is: every transformers form failed with a ``TypeError`` (or took the
config for the name). A transformers form also does what transformers' method does to the active set and to which
weights train (the new or loaded adapter alone, PEFT's freezing of the rest); the engine's forms leave that as is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import api
from .formats import peft_state_dict_adapter, read_adapter
from .stacking import train_adapter


def add_adapter(
    model: nn.Module,
    *args: Any,
    config: Any = None,
    adapter_name: str | None = None,
    autocast_adapter_dtype: bool = False,
    adapter_config: Any = None,
) -> None:
    """``model.add_adapter(name, config)`` (the engine, AdapterHub) or ``model.add_adapter(adapter_config,
    adapter_name=None)`` (transformers; the name defaults to PEFT's ``"default"``): told apart by the first
    argument, a name (str) or a config object (``config=``, or transformers' keyword ``adapter_config=``). Adapter
    weights take the layers' dtype, as transformers' and AdapterHub's methods give them
    (``autocast_adapter_dtype=True``: fp32 masters on 16-bit layers, as :func:`adapter_engine.add_adapter` gives by
    default, like PEFT).

    The transformers form does what transformers' method does: the new adapter becomes the only active one and the
    only trainable parameters (the base model and other adapters frozen, as PEFT's ``inject_adapter_in_model`` and
    ``set_adapter`` leave them), ready for ``Trainer``. It used to add it inactive and freeze nothing: the model ran
    without it and a ``Trainer`` fine-tuned the whole base instead. The engine / AdapterHub form only adds it."""
    if len(args) > 2:
        raise TypeError(f"add_adapter takes a name and a config, got {len(args)} positional arguments")
    if adapter_config is not None:  # (transformers' keyword for the config)
        if config is not None:
            raise TypeError("add_adapter got the config twice (config= and adapter_config=)")
        config = adapter_config
    first, second = (*args, None, None)[:2]
    if isinstance(first, str):  # (name, config)
        if adapter_name is not None or (second is not None and config is not None):
            raise TypeError("add_adapter(name, config): give the name once and the config once")
        config = second if second is not None else config
        if config is None:
            raise TypeError(f"add_adapter({first!r}, config): the adapter's config is missing")
        return api.add_adapter(model, first, config, autocast_adapter_dtype=autocast_adapter_dtype)
    if first is None and config is not None:  # add_adapter(config=..., adapter_name=...)
        first = config
    elif first is not None and config is not None:
        raise TypeError("add_adapter got the config twice (positional, and config= / adapter_config=)")
    elif first is None:
        raise TypeError("add_adapter needs a config: add_adapter(name, config) or add_adapter(config, adapter_name=)")
    if second is not None and adapter_name is not None:
        raise TypeError("add_adapter(adapter_config, adapter_name): give the name once")
    name = adapter_name or second or "default"
    api.add_adapter(model, name, first, autocast_adapter_dtype=autocast_adapter_dtype)
    api.set_active_adapters(model, name)
    train_adapter(model, name)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    name: str | None = None,
    config: Any = None,
    *,
    set_active: bool | None = None,
    peft_model_id: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    peft_config: Any = None,
    adapter_state_dict: dict[str, torch.Tensor] | None = None,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool | None = False,
    low_cpu_mem_usage: bool = False,
    local_files_only: bool = False,
    hotswap: bool | str = "auto",
    adapter_kwargs: dict[str, Any] | None = None,
    **hub_kwargs: Any,
) -> str:
    """:func:`adapter_engine.api.load_adapter`, also under transformers' keyword names (``peft_model_id``,
    ``adapter_name``, ``peft_config``; their positions are the engine's). Adapter weights take the layers' dtype, as
    transformers' method loads them (``autocast_adapter_dtype``: as :func:`adapter_engine.load_adapter`'s, whose
    default is PEFT's fp32 masters).

    A PEFT adapter loads as transformers' method loads it: it becomes the only active adapter, the base model and
    the other adapters are frozen, the adapter itself too unless ``is_trainable=True``, and the model is put in eval
    mode (it used to load inactive: the model went on giving the base model's outputs). An AdapterHub adapter loads
    as AdapterHub's method loads it: inactive, nothing frozen. ``set_active=True`` / ``False`` (the engine's form)
    loads and activates it, or only loads it, whatever its format. ``adapter_state_dict`` with ``peft_config``
    (transformers' form, in place of a folder): a PEFT LoRA / IA3 adapter given as tensors, keyed as PEFT saves them
    or as ``get_adapter_state_dict`` gives them; its name defaults to ``"default"``, as transformers'.

    It reads local folders only: transformers' download options (``token``, ``revision``, ``cache_dir``, ... as
    keywords or in ``adapter_kwargs``) are refused with a ValueError that says so (they used to fail with a bare
    "unexpected keyword argument" TypeError), except a ``subfolder``, looked up in the folder.
    ``low_cpu_mem_usage`` and ``local_files_only`` change nothing (the weights are always put in place, from local
    files); ``hotswap=True`` (replacing a loaded adapter's weights in place) is refused."""
    values = {}
    pairs = ((path, peft_model_id, "path"), (name, adapter_name, "name"), (config, peft_config, "config"))
    for ours, theirs, label in pairs:
        if ours is not None and theirs is not None:
            raise TypeError(f"load_adapter got the {label} twice (positional or engine keyword, and transformers')")
        values[label] = ours if ours is not None else theirs
    if (values["path"] is None) == (adapter_state_dict is None):
        raise TypeError(
            "load_adapter needs the adapter's folder (path, or transformers' peft_model_id) or its tensors "
            "(adapter_state_dict, with peft_config), not both"
            if adapter_state_dict is not None
            else "load_adapter needs the adapter's folder (path, or transformers' peft_model_id)"
        )
    subfolder = _check_options({**(adapter_kwargs or {}), **hub_kwargs}, hotswap)
    if adapter_state_dict is not None:
        file = peft_state_dict_adapter(adapter_state_dict, values["config"])
        name = values["name"] or "default"
    else:
        path = os.path.join(values["path"], subfolder) if subfolder else values["path"]
        file = read_adapter(path, name=values["name"], config=values["config"])
        name = values["name"] or file.saved_name or os.path.basename(os.path.normpath(file.path))
    api.load_adapter_file(model, file, name, set_active=bool(set_active), autocast_adapter_dtype=autocast_adapter_dtype)
    if set_active is None and file.format == "peft":  # PEFT's inject_adapter_in_model and set_adapter, inference_mode
        api.set_active_adapters(model, name)
        train_adapter(model, name)
        if not is_trainable:
            for p in api.adapter_parameters(model, name):
                p.requires_grad_(False)
            model.eval()
    return name


# transformers' download options (``huggingface_hub``'s): what they ask for needs the Hub
_HUB_OPTIONS = ("token", "use_auth_token", "revision", "cache_dir", "force_download", "proxies", "resume_download")


def _check_options(options: dict[str, Any], hotswap: bool | str) -> str | None:
    """Refuse transformers' ``load_adapter`` options that need the Hub (a download option with a value), hotswapping
    and options transformers does not have either; returns the ``subfolder`` asked for."""
    if hotswap not in ("auto", False):
        raise ValueError(
            f"load_adapter: hotswap={hotswap!r} (replacing the weights of a loaded adapter in place) is not supported "
            "by adapter-engine: delete_adapter(name), then load_adapter the new one"
        )
    unknown = sorted(k for k in options if k not in (*_HUB_OPTIONS, "subfolder", "local_files_only", "load_config"))
    if unknown:
        raise TypeError(f"load_adapter got unexpected keyword arguments {unknown}")
    hub = sorted(k for k in options if k != "subfolder" and options[k] not in (None, False))
    if hub:
        given = ", ".join(f"{k}={options[k]!r}" if k not in ("token", "use_auth_token") else k for k in hub)
        raise ValueError(
            f"load_adapter reads local adapter folders only (adapter-engine does not download from the Hugging Face "
            f"Hub), so {given} cannot apply: download the adapter first (huggingface_hub.snapshot_download, with "
            "those options) and pass its folder"
        )
    return options.get("subfolder")


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """transformers' / PEFT's ``set_adapter``: activate ``adapter_name`` (a name or a list, as
    :func:`~adapter_engine.api.set_active_adapters`) and, as PEFT's layers do, make the active adapters' weights
    trainable and the other adapters' frozen; the base model's are left as they are. It used to change only which
    adapters run: after transformers' ``add_adapter`` of a second adapter (which freezes the first),
    ``set_adapter(first)`` ran the first one frozen, and a ``Trainer`` trained nothing. (``set_active_adapters``,
    the engine's and AdapterHub's name, changes only which adapters run.)"""
    api.set_active_adapters(model, adapter_name)
    state = api._state(model)
    for name in state.adapters:
        for p in api.adapter_parameters(model, name):
            p.requires_grad_(name in state.active)


def delete_adapter(
    model: nn.Module, names: str | Sequence[str] | None = None, *, adapter_names: str | Sequence[str] | None = None
) -> None:
    """Remove one adapter, or several (transformers' form, also under its keyword ``adapter_names``); every name is
    checked before any is removed."""
    if (names is None) == (adapter_names is None):
        raise TypeError("delete_adapter takes the adapter name(s) once: delete_adapter(names) or (adapter_names=)")
    names = names if names is not None else adapter_names
    names = [names] if isinstance(names, str) else list(names)
    state = api._state(model)
    unknown = [n for n in names if n not in state.adapters]
    if unknown or not names:
        raise ValueError(f"no adapter named {unknown or names}; this model has {list(state.adapters)}")
    for name in dict.fromkeys(names):
        api.delete_adapter(model, name)
