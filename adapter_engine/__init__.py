"""adapter-engine: kernel-accelerated LoRA and bottleneck adapters for Hugging Face transformers models.

Strategy 1, Merge and FFT: ``load_adapter`` -> ``merge_adapter`` -> ``save_pretrained`` -> ``finetune.full_finetune``.
Strategy 2, Stack and Adapt: ``StackedAdapterModel`` with ``use_adapters`` routing, ``AdapterStore`` and
``AdapterMemoryManager``, served from CUDA graphs by ``GraphedServer``. The Triton kernels live in
:mod:`adapter_engine.kernels`.
"""

from . import kernels
from .api import (
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_active_adapters,
    unmerge_adapter,
)
from .config import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig, Stack
from .memory import AdapterMemoryManager, MemoryStats
from .merging import merged_adapters
from .patching import is_patched, patch, unpatch
from .persist import load_model, save_model
from .routing import Route, current_route, use_adapters
from .serving import GraphedServer
from .stacking import StackedAdapterModel, train_adapter
from .store import AdapterStore

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "kernels",
    # adapters, formats and patching
    "patch",
    "unpatch",
    "is_patched",
    "load_adapter",
    "add_adapter",
    "set_active_adapters",
    "delete_adapter",
    "list_adapters",
    "save_adapter",
    "Stack",
    "LoraConfig",
    "BottleneckConfig",
    "AdapterConfig",
    "IA3Config",
    # Merge and FFT
    "merge_adapter",
    "unmerge_adapter",
    "merged_adapters",
    "save_model",
    "load_model",
    # Stack and Adapt
    "StackedAdapterModel",
    "train_adapter",
    "use_adapters",
    "Route",
    "current_route",
    "AdapterStore",
    "AdapterMemoryManager",
    "GraphedServer",
    "MemoryStats",
]
