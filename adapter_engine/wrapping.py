"""The wrapper layers that stand in for a model's module (bottleneck stacks, trained module copies) take over its
members: the wrapped module's children, Parameters and buffers become the wrapper's, under their own names, so the
model's ``state_dict`` keys stay what they were and ``unpatch`` can hand them back.

Every wrapper (and ``LoraLinear``) stands in for the module's hooks (:func:`share_hooks`): the wrapped module's
forward / backward hook dicts are the wrapper's, the same objects, so hooks installed before the wrapping run on the
wrapper (around whatever it computes: the adapted output), a hook handle made on either removes the hook from both,
and hooks installed while wrapped stay on the module when it is put back (:func:`return_hooks`).

A wrapper class with ``takes_class = True`` (the bottleneck layers) also stands in for the module's class: its
instances are of a subclass of both the wrapper class and the wrapped module's class (:func:`stand_in_class`), so
``isinstance`` checks made on the model's modules still find them (transformers 5 records ``output_attentions`` with
forward hooks that it installs, at the first forward that asks, on the modules that are instances of the model's
attention class)."""

from __future__ import annotations

import logging
import threading

from torch import nn

logger = logging.getLogger(__name__)

# the hook dicts of a module call, shared between a wrapper and the module it stands in for
_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


class StandIn(nn.Module):
    """Base of the layers that replace a module ``original`` in a model: its members are theirs (see the module
    docstring), ``_original`` keeps it (not a child: its children are the wrapper's now), and its plain attributes
    (config, sizes, flags) stay reachable through the wrapper."""

    takes_class = False  # True: instances are also of the original's class (module docstring)

    def __new__(cls, original: nn.Module | None = None, *args, **kwargs):
        if cls.takes_class and isinstance(original, nn.Module):
            cls = stand_in_class(cls, type(original))
        return nn.Module.__new__(cls)

    def __init__(self, original: nn.Module) -> None:
        nn.Module.__init__(self)  # (not super(): next in a stand-in class's MRO is the original's class)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        share_hooks(self, original)
        if _combined(type(self)) is not None:
            # the original's own value of a name its class defines too (a flag with a class default): the class's
            # would now be found first, ahead of the fallback to the original below (the wrapper's names stay its own)
            shadowed = _class_names(type(original)) - _class_names(_combined(type(self))[0])
            for name in shadowed.intersection(original.__dict__):
                self.__dict__.setdefault(name, original.__dict__[name])
        object.__setattr__(self, "_original", original)  # set last: __getattr__ falls back to it

    @property
    def original(self) -> nn.Module:
        return self._original

    def give_back(self) -> nn.Module:
        """The original module, for the caller to put back in the model: it keeps the hooks registered on this
        wrapper (the two share their hook dicts), full backward hooks marked as such."""
        original = self._original
        return_hooks(self, original)
        return original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    def __reduce_ex__(self, protocol):
        """Pickle / deepcopy of an instance of a stand-in class: made again from its two bases
        (:func:`stand_in_class`), since the class itself cannot be found by name."""
        bases = _combined(type(self))
        if bases is None:
            return super().__reduce_ex__(protocol)
        return _new_stand_in, bases, self.__getstate__()


def share_hooks(wrapper: nn.Module, original: nn.Module) -> None:
    """Make ``original``'s forward / backward hook dicts ``wrapper``'s, the same objects (see the module docstring).
    ``nn.Module.__call__`` checks the wrapper's dicts as it checks any module's: no cost while they are empty."""
    for name in _CALL_HOOKS:
        wrapper.__dict__[name] = original.__dict__[name]
    wrapper._is_full_backward_hook = original._is_full_backward_hook


def unshare_hooks(module: nn.Module) -> None:
    """Give ``module`` empty hook dicts of its own (a copy of a module whose hooks a wrapper runs around it)."""
    for name in _CALL_HOOKS:
        module.__dict__[name] = type(module.__dict__[name])()
    module._is_full_backward_hook = None


def return_hooks(wrapper: nn.Module, original: nn.Module) -> None:
    """Before ``original`` is put back in ``wrapper``'s place: the hooks are its own already (shared dicts); it takes
    the one thing not shared, whether the backward hooks registered while wrapped are full ones."""
    original._is_full_backward_hook = wrapper._is_full_backward_hook


_CLASSES: dict[tuple[type, type], type] = {}
_CLASSES_LOCK = threading.Lock()


def stand_in_class(wrapper: type[StandIn], original: type[nn.Module]) -> type[StandIn]:
    """The subclass of ``wrapper`` and ``original`` (in that order: the wrapper's members come first) that stands in
    for instances of ``original``, made once per pair; ``wrapper`` itself where the two cannot be combined (an
    ``original`` that is a wrapper, or whose layout or metaclass conflicts)."""
    wrapper = _combined(wrapper)[0] if _combined(wrapper) is not None else wrapper
    key = (wrapper, original)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    with _CLASSES_LOCK:
        if key not in _CLASSES:
            cls = wrapper
            if not issubclass(original, StandIn):
                name = f"{wrapper.__name__}[{original.__name__}]"
                namespace = {"__module__": wrapper.__module__, "__qualname__": name, "_stand_in_of": key}
                try:
                    cls = type(name, (wrapper, original), namespace)
                except TypeError as err:
                    logger.debug("%s stands in for %s without its class: %s", wrapper.__name__, original.__name__, err)
            _CLASSES[key] = cls
        return _CLASSES[key]


def _combined(cls: type) -> tuple[type, type] | None:
    """(wrapper class, original class) of a stand-in class, else None."""
    return cls.__dict__.get("_stand_in_of")


def _class_names(cls: type) -> set[str]:
    """The names that ``cls`` and its bases up to ``nn.Module`` define."""
    return {n for c in cls.__mro__ if not issubclass(nn.Module, c) for n in vars(c)}


def _new_stand_in(wrapper: type[StandIn], original: type[nn.Module]) -> StandIn:
    """An empty instance of the stand-in class of ``wrapper`` and ``original`` (pickle fills in its state)."""
    return nn.Module.__new__(stand_in_class(wrapper, original))
