"""Triton kernels of adapter-engine, each with a torch reference twin (installed as ``adapter_engine.kernels``).

Dispatch: Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the torch reference otherwise.
"""

from ._backend import INTERPRET, use_triton

__all__ = ["INTERPRET", "use_triton"]

# Each op appends its exports below (one line block per op file).

from .merge import merge_lora_, merge_lora_reference_, scale_ia3_, scale_ia3_reference_, unmerge_lora_  # noqa: E402

__all__ += ["merge_lora_", "merge_lora_reference_", "unmerge_lora_", "scale_ia3_", "scale_ia3_reference_"]
