"""A directory of saved adapters: one sub-folder per adapter, PEFT or AdapterHub format (detected on read).

    store = AdapterStore("adapters/")
    store.names()                                         # the adapters it holds
    store.load_into(model, "fr")                          # patched on first use
    store.save(model, "fr")                               # bottleneck: AdapterHub format, else PEFT

The store never invents an adapter: an unknown name is a ``KeyError`` unless the caller passes an explicit
``create=`` config. Names that would leave the directory (``../x``, absolute paths, separators, symlinks that
point outside) are refused with ``ValueError``.

The manager that keeps a capped set of a store's adapters resident in a model, :class:`AdapterMemoryManager`, lives
in :mod:`adapter_engine.memory` (re-exported here); the store tells its managers of each save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import api
from ._io import user_path
from .config import coerce_config
from .formats import WEIGHTS, AdapterFile, _has_any, read_adapter
from .memory import AdapterMemoryManager, MemoryStats  # re-exported: they lived here (memory.py's store is a hint)

logger = logging.getLogger(__name__)


def check_adapter_name(name: Any) -> str:
    """An adapter name usable as one path component: non-empty, no separators, no '.', no NUL."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    bad = [c for c in ("/", "\\", "\x00", ".") if c in name]
    if bad or os.path.isabs(name) or (os.altsep and os.altsep in name):
        raise ValueError(f"adapter name {name!r} is not a plain name (it contains {bad or 'a path'}): refused")
    return name


class AdapterStore:
    """A directory holding one saved adapter per sub-folder (PEFT or AdapterHub format, detected on read).

    Args:
        root: the directory. ``create=True`` makes it when missing; otherwise it must exist.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = False) -> None:
        root = user_path(root)
        if os.path.lexists(root) and not os.path.isdir(root):  # (create=True too: makedirs said only "File exists")
            raise NotADirectoryError(f"adapter store directory {root!r} is a file, not a folder")
        if not os.path.isdir(root):
            if not create:  # (the hint names the class: StackedAdapterModel(store=) has no create argument)
                raise FileNotFoundError(
                    f"adapter store directory {root!r} does not exist (AdapterStore({root!r}, create=True) makes it)"
                )
            os.makedirs(root, exist_ok=True)
        self.root = root
        self._real_root = os.path.realpath(root)
        self._managers: weakref.WeakSet[AdapterMemoryManager] = weakref.WeakSet()  # told of each save (see save)

    def __getstate__(self) -> dict:  # deepcopy / pickle: a copy's managers register with it when they are copied
        state = self.__dict__.copy()
        state["_managers"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._managers = weakref.WeakSet()

    def path(self, name: str) -> str:
        """The folder of adapter ``name`` (it may not exist yet); ``ValueError`` if it would leave the store."""
        check_adapter_name(name)
        full = os.path.join(self.root, name)
        real = os.path.realpath(full)
        if os.path.commonpath([real, self._real_root]) != self._real_root or real == self._real_root:
            raise ValueError(f"adapter {name!r} resolves to {real!r}, outside the store {self._real_root!r}: refused")
        return full

    def __contains__(self, name: object) -> bool:
        try:
            return _has_any(self.path(name))  # type: ignore[arg-type]
        except ValueError:
            return False

    def names(self) -> list[str]:
        """The adapters in the store (sorted; sub-folders holding an adapter config or weights)."""
        out = []
        for entry in sorted(os.listdir(self.root)):
            try:
                if _has_any(self.path(entry)):
                    out.append(entry)
            except ValueError:
                continue  # a symlink out of the store, or a name that is not an adapter name
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _existing(self, name: str) -> str:
        folder = self.path(name)
        if not _has_any(folder):
            raise KeyError(
                f"adapter {name!r} is not in the store {self.root!r} (it has {self.names()[:8]}); "
                f"the store never creates untrained adapters implicitly: load_into(model, {name!r}, create=<config>) "
                "adds a fresh one"
            )
        return folder

    def nbytes_on_disk(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Tensor bytes in adapter ``name``'s safetensors file (read from its header), or 0 when it is a pickle:
        an estimate of its size before it is loaded. ``dtype``: the bytes its tensors take once loaded in that dtype
        (a model loads an adapter in its layers' dtype, and PEFT saves fp32 factors for an fp16 or bf16 base: counted
        as saved, an adapter looked twice its size and made the memory manager evict under its byte cap)."""
        folder = self._existing(name)
        for fname in (WEIGHTS["peft"][0], WEIGHTS["adapterhub"][0]):
            path = os.path.join(folder, fname)
            if fname.endswith(".safetensors") and os.path.isfile(path):
                try:
                    with open(path, "rb") as fh:
                        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
                    entries = [v for k, v in header.items() if k != "__metadata__"]
                    if dtype is not None:
                        return sum(math.prod(v["shape"]) for v in entries) * dtype.itemsize
                    return sum(end - begin for begin, end in (v["data_offsets"] for v in entries))
                except (OSError, ValueError, KeyError, TypeError, struct.error):
                    return 0
        return 0

    def read(self, name: str) -> AdapterFile:
        """Parse adapter ``name`` from disk without touching any model."""
        return read_adapter(self._existing(name))

    def load_into(self, model: nn.Module, name: str, *, create: Any = None) -> str:
        """Load adapter ``name`` into ``model`` (patched on first use); returns ``name``.

        Adapters are loaded (or created) in the model's dtype, as the memory managers count them: a LoRA of a bf16
        model in bf16, not in fp32 master weights (``load_adapter(autocast_adapter_dtype=False)``).
        An unknown name raises ``KeyError``, unless ``create`` is a config: then a *fresh* adapter is added
        (explicitly untrained; save it with :meth:`save` once trained).
        """
        folder = self.path(name)
        if not _has_any(folder):
            if create is None:
                self._existing(name)  # raises the KeyError
            api.add_adapter(model, name, coerce_config(create), autocast_adapter_dtype=False)
            logger.info("created a fresh adapter %r (not in the store %s)", name, self.root)
            return name
        api.load_adapter(model, folder, name=name, autocast_adapter_dtype=False)  # (served in the model's dtype)
        return name

    def save(self, model: nn.Module, name: str, *, format: str | None = None, overwrite: bool = True) -> str:
        """Save adapter ``name`` of ``model`` into the store (bottleneck: AdapterHub format, else PEFT). The memory
        managers over this store learn that the adapter's weights are now the store's copy, so that
        ``offload="drop"`` may drop it (README: save a trained adapter to the store to let it be dropped)."""
        folder = self.path(name)
        if not overwrite and _has_any(folder):
            raise FileExistsError(f"adapter {name!r} already exists in the store at {folder!r}")
        folder = api.save_adapter(model, name, folder, format=format)
        for manager in list(self._managers):
            manager._saved_to_store(model, name)
        return folder


__all__ = ["AdapterStore", "AdapterMemoryManager", "MemoryStats", "check_adapter_name"]
