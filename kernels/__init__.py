"""Triton kernels of adapter-engine, each with a torch reference twin (installed as ``adapter_engine.kernels``).

Dispatch: Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the torch reference otherwise.
"""

from ._backend import INTERPRET, use_triton

__all__ = ["INTERPRET", "use_triton"]

# Each op appends its exports below (one line block per op file).

from .merge import (  # noqa: E402
    LoraMergePlan,
    merge_lora_,
    merge_lora_many_,
    merge_lora_many_reference_,
    merge_lora_reference_,
    prepare_lora_merge,
    scale_ia3_,
    scale_ia3_reference_,
    unmerge_lora_,
    unmerge_lora_many_,
)

__all__ += ["merge_lora_", "merge_lora_many_", "merge_lora_many_reference_", "merge_lora_reference_"]
__all__ += ["unmerge_lora_", "unmerge_lora_many_", "scale_ia3_", "scale_ia3_reference_"]
__all__ += ["LoraMergePlan", "prepare_lora_merge"]

from .lora_linear import lora_linear, lora_linear_reference  # noqa: E402

__all__ += ["lora_linear", "lora_linear_reference"]
from .bottleneck import (  # noqa: E402
    PackedStack,
    StackOptions,
    bottleneck_stack,
    bottleneck_stack_fwd,
    bottleneck_stack_ref,
    pack_adapters,
)

__all__ += ["bottleneck_stack", "bottleneck_stack_fwd", "bottleneck_stack_ref", "pack_adapters", "PackedStack"]
__all__ += ["StackOptions"]
