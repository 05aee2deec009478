"""The wrapper layers that stand in for a model's module (bottleneck stacks, trained module copies) take over its
members: the wrapped module's children, Parameters and buffers become the wrapper's, under their own names, so the
model's ``state_dict`` keys stay what they were and ``unpatch`` can hand them back."""

from __future__ import annotations

from torch import nn


def adopt_members(wrapper: nn.Module, original: nn.Module) -> None:
    """Register ``original``'s children, Parameters and buffers (persistent or not, as there) on ``wrapper``, and keep
    ``original`` itself as ``wrapper._original``: not a child (its children are the wrapper's now); set last, since
    the wrappers' ``__getattr__`` falls back to it for plain attributes."""
    for name, child in original.named_children():
        wrapper.add_module(name, child)
    for name, param in original.named_parameters(recurse=False):
        wrapper.register_parameter(name, param)
    for name, buf in original.named_buffers(recurse=False):
        wrapper.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
    object.__setattr__(wrapper, "_original", original)
