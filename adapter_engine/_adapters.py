"""Helpers on a patched model's adapters that :mod:`adapter_engine.api` and :mod:`adapter_engine.residency` share:
the model's checked patch state, the rule for a new adapter's name, and LoRA / IA3 tensors put into wrapped layers.
A module of their own so that both import them without importing each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from . import patching as pt
from .config import AnyConfig, LoraConfig
from .lora import adapter_dtype
from .patching import PatchState, wrap_linear

_F = TypeVar("_F", bound=Callable[..., Any])


def unpatch_on_error(func: _F) -> _F:
    """For an API function whose first argument is the model: a call on an unpatched model patches it first
    (:func:`_state`); when the call then fails, the patch is undone, so that a refused call leaves the model as it was.
    It used to stay patched (its default targets wrapped, the adapter methods bound over transformers' own), and a
    later ``peft.get_peft_model`` of it failed on the wrapped layers ("Target module LoraLinear ... is not
    supported")."""

    @functools.wraps(func)
    def call(model: Any, *args: Any, **kwargs: Any) -> Any:
        fresh = isinstance(model, nn.Module) and not pt.is_patched(model)
        try:
            return func(model, *args, **kwargs)
        except BaseException:
            if fresh and pt.is_patched(model):
                pt.unpatch(model)
            raise

    return call  # type: ignore[return-value]


def _state(model: nn.Module) -> PatchState:
    """The patch state of ``model``, patching it first when it is not (undone by :func:`unpatch_on_error` where the
    call fails)."""
    state = pt.ensure_patched(model)
    if state.model_type == "peft":
        raise ValueError("this is a PEFT PeftModel: keep using PEFT's own adapter API (patch made its layers fused)")
    return state


def _check_name(state: PatchState, name: Any) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in state.adapters:
        raise ValueError(f"adapter name {name!r} is already taken (adapters: {list(state.adapters)})")
    if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
        # the adapters live in ModuleDicts keyed by name, which refuse their own attributes with a bare KeyError
        raise ValueError(
            f"adapter name {name!r} is an attribute of torch's ModuleDict / ParameterDict (the adapters' containers): "
            "pick another name"
        )
    return name


def check_not_meta(model: nn.Module, what: str) -> None:
    """Refuse ``what`` (a load or merge) on a model whose parameters are on the meta device (built under
    ``torch.device("meta")`` or accelerate's ``init_empty_weights``): a load copied the adapter's weights onto meta,
    losing them without a word, and a merge found every weight at address 0 and called them tied."""
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(
            f"{what}: {type(model).__name__} has {len(on_meta)} parameters on the meta device ({on_meta[0]!r}, ...), "
            "a model built without its weights; load them first (from_pretrained, or to_empty and load_state_dict)"
        )


@torch.no_grad()
def _apply_linear(
    model: nn.Module, state: PatchState, name: str, cfg: AnyConfig, plan: list[tuple], autocast: bool | None
) -> list[str]:
    """Put LoRA / IA3 tensors (``plan``: (layer name, tensors...) entries) into wrapped layers. autocast: fp32
    weights for 16-bit layers (PEFT's ``autocast_adapter_dtype``, :func:`~adapter_engine.lora.adapter_dtype`), the
    layers' dtype (False), or fp32 where the given tensors are fp32 (None: a snapshot put back as it was taken)."""
    for entry in plan:
        wrapper = wrap_linear(model, state, entry[0])
        keep = entry[1].dtype == torch.float32 if autocast is None else autocast
        dtype = adapter_dtype(wrapper.weight.dtype, keep)
        if isinstance(cfg, LoraConfig):
            # (r and scaling per layer: PEFT's rank_pattern / alpha_pattern on the layer's name in this model)
            wrapper.add_lora(name, cfg.rank_for(entry[0]), cfg.scaling_for(entry[0]), cfg.lora_dropout, dtype=dtype)
            wrapper.lora_A[name].weight.copy_(entry[1])
            wrapper.lora_B[name].weight.copy_(entry[2])
        else:
            wrapper.add_ia3(name, feedforward=entry[2], dtype=dtype)
            wrapper.ia3_l[name].copy_(entry[1])
    return [entry[0] for entry in plan]
