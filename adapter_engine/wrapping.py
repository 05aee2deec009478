"""The wrapper layers that stand in for a model's module (bottleneck stacks, trained module copies) take over its
members: the wrapped module's children, Parameters and buffers become the wrapper's, under their own names, so the
model's ``state_dict`` keys stay what they were and ``unpatch`` can hand them back."""

from __future__ import annotations

from torch import nn


class StandIn(nn.Module):
    """Base of the layers that replace a module ``original`` in a model: its members are theirs (see the module
    docstring), ``_original`` keeps it (not a child: its children are the wrapper's now), and its plain attributes
    (config, sizes, flags) stay reachable through the wrapper."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        object.__setattr__(self, "_original", original)  # set last: __getattr__ falls back to it

    @property
    def original(self) -> nn.Module:
        return self._original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)
