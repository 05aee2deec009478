"""Triton kernels of adapter-engine, each with a torch reference twin (installed as ``adapter_engine.kernels``).

Dispatch: Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the torch reference otherwise.
"""

from ._backend import INTERPRET, use_triton
from .bottleneck import (
    PackedStack,
    StackOptions,
    bottleneck_stack,
    bottleneck_stack_fwd,
    bottleneck_stack_ref,
    pack_adapters,
)
from .lora_linear import lora_linear, lora_linear_reference
from .merge import (
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

__all__ = [
    "INTERPRET",
    "use_triton",
    # merge.py
    "merge_lora_",
    "merge_lora_many_",
    "merge_lora_many_reference_",
    "merge_lora_reference_",
    "unmerge_lora_",
    "unmerge_lora_many_",
    "scale_ia3_",
    "scale_ia3_reference_",
    "LoraMergePlan",
    "prepare_lora_merge",
    # lora_linear.py
    "lora_linear",
    "lora_linear_reference",
    # bottleneck.py
    "bottleneck_stack",
    "bottleneck_stack_fwd",
    "bottleneck_stack_ref",
    "pack_adapters",
    "PackedStack",
    "StackOptions",
]
