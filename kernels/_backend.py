"""Where each op runs, and the per-backend facts the kernels need.

Dispatch rule for every op in this package: the Triton kernel runs on CUDA tensors, and on CPU tensors when
the Triton interpreter is on (``TRITON_INTERPRET=1`` set before this package is imported); the torch reference
twin runs otherwise. The interpreter mode is read once at import because ``@triton.jit`` itself decides at
decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency, but keep the reference path alive
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ADAPTER_ENGINE_AUTOTUNE=0: kernels with several GPU configs take the first that fits instead of timing them
# all per new shape (test runs that draw hundreds of odd shapes; the benchmarks keep autotuning on).
AUTOTUNE = os.environ.get("ADAPTER_ENGINE_AUTOTUNE", "1") != "0"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids, in plain Python: ``triton.cdiv`` is a jit function (~2 us per host call,
    which adds up on the small-M paths where host time is most of the call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python (in triton 3.9 it is a constexpr function: ~2 us per call)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel (not the torch reference) should handle ``tensor``'s device."""
    if not HAS_TRITON:
        return False
    if tensor.device.type == "cuda":
        return True
    return INTERPRET and tensor.device.type == "cpu"


@contextlib.contextmanager
def torch_twins_on_cpu(enabled: bool = True):
    """Inside the block, CPU tensors take the torch reference twins even under the interpreter (which is far
    too slow to train a real model). CUDA tensors are unaffected. Process-wide, so not for concurrent use."""
    global INTERPRET
    saved = INTERPRET
    INTERPRET = saved and not enabled
    try:
        yield
    finally:
        INTERPRET = saved


def capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s device (nothing may be timed, synced or cached then)."""
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def fastest(candidates: tuple, launch) -> tuple[object, list[float]]:
    """The candidate whose ``launch(candidate)`` ``triton.testing.do_bench`` times fastest, and every time (ms).
    A candidate the GPU cannot build (too much shared memory) times as infinite. The caller decides when timing
    is allowed (``AUTOTUNE``, not while :func:`capturing`) and undoes whatever the timing runs wrote."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    times = []
    for c in candidates:
        try:
            times.append(triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20))
        except OutOfResources:
            times.append(float("inf"))
    return candidates[times.index(min(times))], times


def dot_in_fp32(tensor: torch.Tensor) -> bool:
    """The interpreter computes bf16 arithmetic and ``tl.dot`` wrongly: feed it fp32 operands there."""
    return tensor.device.type != "cuda"


TORCH_TO_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {tensor.dtype} (shape {tuple(tensor.shape)})"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
