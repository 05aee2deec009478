"""Process-wide change counters that the patched layers' caches are stamped with, so that a cache checks two
integers on each call instead of reading every tensor it was made from.

- ``adapter_generation``: bumped by ``adapters_changed`` on a change to any patched layer's adapters (added,
  deleted, merged, unmerged) and on a conversion in place (``.half()``, ``.to()``). A CUDA graph of a routed forward
  holds the adapters' addresses and the layers' choices, so ``GraphedServer`` captures again after one.
- ``registration_epoch``: a count of parameter and submodule registrations, by any module, that replace what the
  module held under that name (``child.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``,
  ``layer.lora_A[name] = nn.Linear(...)`` over an existing one), through torch's global registration hooks,
  installed on first use. A registration under a new name is not counted: a module under construction registers
  its parts that way, and so does a container built on every forward (Llama's ``self.layers[:n]`` makes a new
  ``ModuleList`` of the decoder layers per call; counted, it made every cache stale at every forward).

``change_stamp`` pairs them; ``tensor_version`` reads the in-place versions a cache checks beside the stamp.
Neither sees a tensor swapped by hand through ``.data`` or ``_parameters`` (README, Limitations); in-place updates
are seen through each cache's own check of the tensors' versions.
"""

from __future__ import annotations

import itertools
import operator
import threading

from torch import nn

_CHANGES = itertools.count(1)
_generation = 0


def adapters_changed() -> None:
    global _generation
    _generation = next(_CHANGES)


def adapter_generation() -> int:
    return _generation


_REGISTRATIONS = itertools.count(1)
_registration = 0
_hooks_lock = threading.Lock()
_hooks_installed = False


def _replaces(held: dict, name: str, value: object) -> None:
    """Count a registration of ``value`` under ``name`` in a module's dict ``held`` (torch calls the hooks before it
    stores the value) where it replaces another value held there."""
    global _registration
    if name in held and held[name] is not value:
        _registration = next(_REGISTRATIONS)


def _parameter_registered(module: nn.Module, name: str, value: object) -> None:
    _replaces(module._parameters, name, value)


def _module_registered(module: nn.Module, name: str, value: object) -> None:
    _replaces(module._modules, name, value)


def registration_epoch() -> int:
    global _hooks_installed
    if not _hooks_installed:
        with _hooks_lock:
            if not _hooks_installed:
                nn.modules.module.register_module_parameter_registration_hook(_parameter_registered)
                nn.modules.module.register_module_module_registration_hook(_module_registered)
                _hooks_installed = True
    return _registration


def change_stamp() -> tuple[int, int]:
    """(``adapter_generation``, ``registration_epoch``): what a cache made from adapter modules is stamped with."""
    return adapter_generation(), registration_epoch()


#: A tensor's in-place version, for one C-level pass over many (``tuple(map(tensor_version, tensors))``); a
#: RuntimeError for an inference tensor, which has none.
tensor_version = operator.attrgetter("_version")
