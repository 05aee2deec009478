"""Process-wide change counters that the patched layers' caches are stamped with, so that a cache checks two
integers on each call instead of reading every tensor it was made from.

- ``adapter_generation``: bumped by ``adapters_changed`` on a change to any patched layer's adapters (added,
  deleted, merged, unmerged) and on a conversion in place (``.half()``, ``.to()``). A CUDA graph of a routed forward
  holds the adapters' addresses and the layers' choices, so ``GraphedServer`` captures again after one.
- ``registration_epoch``: a count of parameter and submodule registrations by any module
  (``child.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, ``layer.lora_A[name] = nn.Linear(...)``),
  through torch's global registration hooks, installed on first use.

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


def _registered(module: nn.Module, name: str, value: object) -> None:
    global _registration
    _registration = next(_REGISTRATIONS)


def registration_epoch() -> int:
    global _hooks_installed
    if not _hooks_installed:
        with _hooks_lock:
            if not _hooks_installed:
                nn.modules.module.register_module_parameter_registration_hook(_registered)
                nn.modules.module.register_module_module_registration_hook(_registered)
                _hooks_installed = True
    return _registration


def change_stamp() -> tuple[int, int]:
    """(``adapter_generation``, ``registration_epoch``): what a cache made from adapter modules is stamped with."""
    return adapter_generation(), registration_epoch()


#: A tensor's in-place version, for one C-level pass over many (``tuple(map(tensor_version, tensors))``); a
#: RuntimeError for an inference tensor, which has none.
tensor_version = operator.attrgetter("_version")
