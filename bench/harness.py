"""Shared benchmark harness: timing with device events, peak memory, environment facts, sizes per backend.

Every bench script is a pytest-benchmark file. ``timed`` runs ``benchmark.pedantic`` with a wrapper that
records CUDA events around each call and synchronises inside it, so pytest-benchmark's wall-clock stats and
the device-event median land in the same JSON (``extra_info``). Ratios (engine / bare, engine / PEFT) are
computed from one run's JSON by ``bench/report.py``, never across runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if on_gpu() else "cpu"


def pick(gpu_value, cpu_value):
    """Full-size parameter on a GPU, a tiny one on CPU (the smoke-test tier)."""
    return gpu_value if on_gpu() else cpu_value


def rounds(gpu_rounds: int = 30) -> int:
    return gpu_rounds if on_gpu() else 1


def git_revision() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment_info() -> dict:
    import transformers
    import triton

    info = {
        "device_name": torch.cuda.get_device_name() if on_gpu() else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "git_revision": git_revision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object]) -> float:
    """One call of ``fn`` in ms: between CUDA events (synchronised) on a GPU, wall clock on CPU."""
    if on_gpu():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def host_ms(fn: Callable[[], object]) -> float | None:
    """Median time for ``fn()`` to return after a synchronise, without waiting for the GPU: the host's share of
    a call (equal to the whole call when the host is the slower side, or when the call waits for the GPU). None on
    a CPU, where the two are one."""
    if not on_gpu():
        return None
    from adapter_engine.kernels._backend import host_time_ms  # (what the kernels' tuners measure too)

    return host_time_ms(fn, torch.device("cuda"))


def gpu_ms(fn: Callable[[], object]) -> float | None:
    """The GPU's time for one ``fn()`` alone (ms), from CUDA-graph replays of repeated calls: what the kernels'
    tuners compare (``adapter_engine.kernels._backend.graph_time_ms``), free of this host's launch time. None on a
    CPU."""
    if not on_gpu():
        return None
    from adapter_engine.kernels._backend import graph_time_ms

    return graph_time_ms(fn, torch.device("cuda"))


def median_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median of ``reps`` timed calls after ``warmup`` untimed ones (fewer on CPU): a quick baseline."""
    for _ in range(pick(warmup, 1)):
        fn()
    return statistics.median(time_ms(fn) for _ in range(pick(reps, 2)))


def timed(
    benchmark,
    fn: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    n_rounds=None,
    warmup: int | None = None,
    **extra,
) -> float:
    """Time ``fn`` under pytest-benchmark; return the median device time in ms and store it in extra_info.

    ``setup`` runs untimed before every call (for example undoing an in-place merge). Peak memory is measured
    over one extra call after the timed rounds, relative to the memory allocated before it.
    """
    n_rounds = n_rounds or rounds()
    warmup = pick(3, 0) if warmup is None else warmup
    device_ms: list[float] = []

    def call():
        device_ms.append(time_ms(fn))

    benchmark.pedantic(call, setup=setup, rounds=n_rounds, warmup_rounds=warmup, iterations=1)
    timed_ms = device_ms[warmup:] if len(device_ms) > warmup else device_ms
    median = statistics.median(timed_ms)
    peak = peak_memory_bytes(fn, setup)
    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(
        {"median_ms": median, "peak_mem_bytes": peak, "device": environment_info()["device_name"]}
    )
    return median


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up, which also autotunes): replaying it costs the GPU work
    alone, as under ``torch.compile(mode="reduce-overhead")`` or a serving engine's decode graphs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def force_masked_lora(monkeypatch) -> None:
    """Whole-model LoRA rows on the masked stacked-rank path (every used adapter's rank columns for every row): the
    dispatch's rule set so that no mixed batch takes ``"segmented"``, and the patched layers' rows planned as outside
    serving, where serving would keep rows that differ on the segmented path whatever the dispatch says (since commit
    f36158e: a NaN in one request's adapter reaches no other row; session 23's masked row timed that path)."""
    from adapter_engine.kernels.lora_linear_dispatch import DISPATCH
    from adapter_engine.lora_rows import RoutedLoraMixin

    plan = RoutedLoraMixin._row_plan

    def unserved(self, route, training, serving, *rest):
        return plan(self, route, training, False, *rest)

    monkeypatch.setattr(DISPATCH, "segmented_min_adapters", 10**9)
    monkeypatch.setattr(RoutedLoraMixin, "_row_plan", unserved)


@contextlib.contextmanager
def calls_of(module: str, name: str) -> Iterator[list[int]]:
    """``[n]``: how many times the function ``name`` of ``module`` (looked up by that name at each call) ran inside
    the block: which path an untimed call took."""
    owner = importlib.import_module(module)  # (a package may export a function under its module's name)
    count, original = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield count
    finally:
        setattr(owner, name, original)


def lora_segmented_calls() -> contextlib.AbstractContextManager[list[int]]:
    """``[n]``: how many fused LoRA calls inside the block took the segmented path (each groups its rows by adapter,
    ``lora_linear._segments_cached``): which path a model's mixed batch took, for an untimed call."""
    return calls_of("adapter_engine.kernels.lora_linear", "_segments_cached")


def peak_memory_bytes(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> int | None:
    if not on_gpu():
        return None
    if setup is not None:
        setup()
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), measured now on this device."""
    nbytes = nbytes or pick(1 << 30, 1 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize()
    seconds = statistics.median(time_ms(lambda: dst.copy_(src)) for _ in range(pick(20, 3))) / 1e3
    return 2 * nbytes / seconds


@functools.cache
def gemm_flops_per_s(n: int | None = None) -> float:
    """Dense matmul throughput in FLOP/s of an (n x n) @ (n x n) product in the bench dtype (bf16 on a GPU), measured
    once per process on this device: the compute ceiling that floors are set against (about 790 TFLOP/s on an
    H100)."""
    n = n or pick(8192, 128)
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    a = torch.randn(n, n, device=device(), dtype=dtype)
    b = torch.randn(n, n, device=device(), dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    seconds = statistics.median(time_ms(lambda: a @ b) for _ in range(pick(10, 3))) / 1e3
    return 2 * n**3 / seconds
