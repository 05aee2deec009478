"""Adapter residency: an adapter's weights and placement copied out of a patched model
(:class:`AdapterSnapshot`) and put back, and the size of its weights on the device. The store's memory manager
(:mod:`adapter_engine.store`) offloads and reloads adapters with these; the stacking model freezes and trains
them through :func:`adapter_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import patching as pt
from ._adapters import _apply_linear, _check_name, _state, unpatch_on_error
from .config import AnyConfig
from .patching import AdapterRecord


@dataclass
class AdapterSnapshot:
    """An adapter's weights and placement outside the model (for offloading and reloading it).

    ``entries``: LoRA ``(module, lora_A, lora_B)``, IA3 ``(module, vector, feedforward)``, bottleneck
    ``(module, state_dict)``; tensors detached copies on ``device`` (pinned host memory when asked). ``saved``: the
    state dicts of its trained module copies (``modules_to_save``), by module. ``layer_dtypes``: each layer's weight
    dtype when the snapshot was taken (see :func:`restore_adapter`).
    """

    config: AnyConfig
    kind: str
    modules: list[str]
    entries: list[tuple]
    nbytes: int
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layer_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    head: dict | None = None  # an AdapterHub prediction head among ``saved`` (AdapterRecord.head)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The Parameters of adapter ``name`` in ``model`` (in module order)."""
    return [p for _, params in adapter_layers(model, name) for p in params]


@unpatch_on_error
def adapter_layers(model: nn.Module, name: str) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module, the Parameters of adapter ``name`` it holds) for each module the adapter is in, in module order."""
    state = _state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.adapters)}")
    record = state.adapters[name]
    layers = []
    for module_name in record.modules:
        module = model.get_submodule(module_name)
        if record.kind == "lora":
            params = [module.lora_A[name].weight, module.lora_B[name].weight]
        elif record.kind == "ia3":
            params = [module.ia3_l[name]]
        else:
            params = list(module.adapters[name].parameters())
        layers.append((module, params))
    for module_name in record.saved:  # its trained copies of whole modules (modules_to_save)
        module = model.get_submodule(module_name)
        layers.append((module, list(module.modules_to_save[name].parameters())))
    return layers


def adapter_nbytes(model: nn.Module, name: str) -> int:
    """Bytes the weights of adapter ``name`` take in ``model`` (its device memory footprint)."""
    return sum(p.numel() * p.element_size() for p in adapter_parameters(model, name))


@unpatch_on_error
@torch.no_grad()
def snapshot_adapter(
    model: nn.Module, name: str, *, device: str | torch.device = "cpu", pin_memory: bool = False
) -> AdapterSnapshot:
    """Copy adapter ``name`` out of ``model`` (to ``device``, pinned host memory with ``pin_memory``)."""
    state = _state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.adapters)}")
    record = state.adapters[name]

    def copy(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(device, copy=True)
        return out.pin_memory() if pin_memory and out.device.type == "cpu" else out

    entries: list[tuple] = []
    for module_name in record.modules:
        module = model.get_submodule(module_name)
        if record.kind == "lora":
            entries.append((module_name, copy(module.lora_A[name].weight), copy(module.lora_B[name].weight)))
        elif record.kind == "ia3":
            entries.append((module_name, copy(module.ia3_l[name]), module.ia3_feedforward[name]))
        else:
            entries.append((module_name, {k: copy(v) for k, v in module.adapters[name].state_dict().items()}))
    saved = {
        m: {k: copy(v) for k, v in model.get_submodule(m).modules_to_save[name].state_dict().items()}
        for m in record.saved
    }
    layer_dtypes = {m: pt.adapter_layer_dtype(model.get_submodule(m)) for m in record.modules}
    return AdapterSnapshot(record.config, record.kind, list(record.modules), entries, adapter_nbytes(model, name),
                           saved, layer_dtypes, record.head)  # fmt: skip


@unpatch_on_error
def restore_adapter(model: nn.Module, name: str, snapshot: AdapterSnapshot) -> None:
    """Put a :class:`AdapterSnapshot` back into ``model`` as adapter ``name`` (on the layers' devices/dtypes).

    Adapter weights come back as taken (fp32 masters of a 16-bit layer stay fp32) unless their layer was converted
    since (``model.half()``, ``.to(dtype)`` while the adapter was offloaded): then they come back in the layer's new
    dtype, as that conversion would have made them had the adapter stayed in the model. An adapter offloaded from an
    fp32 model used to come back fp32 into the model converted to fp16."""
    state = _state(model)
    _check_name(state, name)
    cfg = snapshot.config
    layer_dtype = lambda m: pt.adapter_layer_dtype(model.get_submodule(m))  # noqa: E731
    if snapshot.kind == "bottleneck":
        where = {p.name: p for p in pt.placements(model, state, cfg)}
        missing = [m for m, _ in snapshot.entries if m not in where]
        if missing:
            raise ValueError(f"adapter {name!r}: this model has no bottleneck place {missing[:4]}")
        plan = [(where[m], _converted_like(layer_dtype(m), snapshot.layer_dtypes.get(m), params))
                for m, params in snapshot.entries]  # fmt: skip
        modules = pt.apply_bottleneck(model, state, name, cfg, plan, autocast=None)
    else:
        entries = [_converted_like(layer_dtype(e[0]), snapshot.layer_dtypes.get(e[0]), e) for e in snapshot.entries]
        modules = _apply_linear(model, state, name, cfg, entries, autocast=None)
    for module_name, tensors in snapshot.saved.items():
        pt.wrap_saved(model, state, module_name).add_copy(name, tensors)
    state.adapters[name] = AdapterRecord(config=cfg, kind=snapshot.kind, modules=modules, saved=list(snapshot.saved),
                                         head=snapshot.head)  # fmt: skip


def _converted_like(now: torch.dtype, then: torch.dtype | None, entry):
    """A snapshot entry's tensors (LoRA / IA3: the tuple ``(module, tensors..., [feedforward])``; bottleneck: its
    state dict) in ``now``, its layer's dtype, when the layer was in another dtype ``then`` at the snapshot (a module
    conversion turns every floating weight into it)."""
    if then is None or now == then:
        return entry
    if isinstance(entry, dict):
        return {k: v.to(now) for k, v in entry.items()}
    return tuple(v.to(now) if isinstance(v, torch.Tensor) else v for v in entry)


__all__ = [
    "AdapterSnapshot",
    "adapter_layers",
    "adapter_parameters",
    "adapter_nbytes",
    "snapshot_adapter",
    "restore_adapter",
]
