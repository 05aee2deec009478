"""adapter-engine: kernel-accelerated LoRA and bottleneck adapters for Hugging Face transformers models."""

from . import kernels

__version__ = "0.1.0"

__all__ = ["kernels", "__version__"]

# issue 5: adapters, file formats and drop-in patching of Hugging Face models
from .api import (  # noqa: E402
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_active_adapters,
    unmerge_adapter,
)
from .config import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig, Stack  # noqa: E402
from .patching import is_patched, patch, unpatch  # noqa: E402

__all__ += ["patch", "unpatch", "is_patched", "load_adapter", "add_adapter", "set_active_adapters"]
__all__ += ["delete_adapter", "list_adapters", "save_adapter", "merge_adapter", "unmerge_adapter", "Stack"]
__all__ += ["LoraConfig", "BottleneckConfig", "AdapterConfig", "IA3Config"]

# issue 7: Stack and Adapt (stacked levels, per-call / per-row routing, adapter store and memory manager)
from .routing import Route, current_route, use_adapters  # noqa: E402
from .stacking import StackedAdapterModel, train_adapter  # noqa: E402
from .store import AdapterMemoryManager, AdapterStore, MemoryStats  # noqa: E402

__all__ += ["StackedAdapterModel", "train_adapter", "use_adapters", "Route", "current_route"]
__all__ += ["AdapterStore", "AdapterMemoryManager", "MemoryStats"]

# issue 6: Merge and FFT (whole-model save/load with absorbed adapters; merging lives in api / merging)
from .merging import merged_adapters  # noqa: E402
from .persist import load_model, save_model  # noqa: E402

__all__ += ["save_model", "load_model", "merged_adapters"]
