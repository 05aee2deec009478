"""Triton kernels of adapter-engine, each with a torch reference twin (installed as ``adapter_engine.kernels``).

Dispatch: Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the torch reference otherwise.
"""

if __name__ != "adapter_engine.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m`` or ``PYTHONPATH=.``
    # from it) and transformers probed for Hugging Face's ``kernels`` package, which shares the name. Expose
    # nothing: a second copy of the ops would register the ``adapter_engine::*`` torch custom ops twice (a
    # segfault in torch's op lookup), and a version of "N/A" tells transformers this is not that package.
    __version__ = "N/A"
    __all__ = []
else:
    from ._backend import INTERPRET, use_triton
    from .add_layer_norm import add_layer_norm, add_layer_norm_reference
    from .bottleneck import (
        PackedStack,
        StackOptions,
        bottleneck_stack,
        bottleneck_stack_fwd,
        bottleneck_stack_ref,
        pack_adapters,
    )
    from .level_boundary import level_boundary, level_boundary_reference
    from .lora_linear import lora_linear, lora_linear_reference
    from .lora_segmented import (
        SegmentPlan,
        lora_segmented_bwd,
        lora_segmented_bwd_reference,
        lora_segmented_fwd,
        lora_segmented_fwd_reference,
        plan_segments,
    )
    from .merge import (
        LoraMergePlan,
        merge_lora_,
        merge_lora_many_,
        merge_lora_many_reference_,
        merge_lora_reference_,
        prepare_lora_merge,
        unmerge_lora_,
        unmerge_lora_many_,
    )
    from .scale_ia3 import scale_ia3_, scale_ia3_reference_

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
        "LoraMergePlan",
        "prepare_lora_merge",
        # scale_ia3.py
        "scale_ia3_",
        "scale_ia3_reference_",
        # lora_linear.py
        "lora_linear",
        "lora_linear_reference",
        # lora_segmented.py (mixed batches; lora_linear(adapter_ids=..., path="segmented") is the functional API)
        "lora_segmented_fwd",
        "lora_segmented_fwd_reference",
        "lora_segmented_bwd",
        "lora_segmented_bwd_reference",
        "plan_segments",
        "SegmentPlan",
        # add_layer_norm.py (the level-by-level stack path's fused add + LayerNorm)
        "add_layer_norm",
        "add_layer_norm_reference",
        # level_boundary.py (between two stack levels: the carry's update, the LayerNorm, the next down projection)
        "level_boundary",
        "level_boundary_reference",
        # bottleneck.py
        "bottleneck_stack",
        "bottleneck_stack_fwd",
        "bottleneck_stack_ref",
        "pack_adapters",
        "PackedStack",
        "StackOptions",
    ]
