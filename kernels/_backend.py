"""Where each op runs, and the per-backend facts the kernels need.

Dispatch rule for every op in this package: the Triton kernel runs on CUDA tensors, and on CPU tensors when
the Triton interpreter is on (``TRITON_INTERPRET=1`` set before this package is imported); the torch reference
twin runs otherwise. The interpreter mode is read once at import because ``@triton.jit`` itself decides at
decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import logging
import os
import statistics
import time
from typing import NamedTuple

import torch

try:
    import triton  # noqa: F401
    from triton.compiler.compiler import CompiledKernel

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency, but keep the reference path alive
    HAS_TRITON = False

logger = logging.getLogger(__name__)

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
    """True when the Triton kernel (not the torch reference) should handle ``tensor``'s device. (``is_cuda`` /
    ``is_cpu``: 40 ns each on this project's CPU, where ``tensor.device.type == "cuda"`` takes 250; several calls per
    op call.)"""
    if tensor.is_cuda:
        return HAS_TRITON
    return HAS_TRITON and INTERPRET and tensor.is_cpu


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


_CAPTURING_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("adapter_engine_cpu_capture", default=False)
_KEEP_ALIVE: contextvars.ContextVar[list | None] = contextvars.ContextVar("adapter_engine_keep_alive", default=None)
_CAPTURE_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("adapter_engine_capture", default=None)


def capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s device (nothing may be timed, synced or cached then),
    or, for a CPU tensor, whether a CPU stand-in for one runs (:func:`capture_on_cpu`)."""
    if tensor.is_cuda:  # (CUDA is available: the tensor is there)
        return torch.cuda.is_current_stream_capturing()
    return _CAPTURING_ON_CPU.get()


def capturing_on(device: torch.device | None) -> bool:
    """:func:`capturing` for a device (None: the current CUDA device, if any)."""
    if device is None or device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return _CAPTURING_ON_CPU.get()


@contextlib.contextmanager
def capture_on_cpu():
    """CPU code inside the block takes the paths it would take while a CUDA graph is captured (in one
    :func:`capture_cache`): what a CPU stand-in for a graph (tests/test_serving.py) needs to check that a forward
    does the same work on every replay."""
    token = _CAPTURING_ON_CPU.set(True)
    try:
        with capture_cache():
            yield
    finally:
        _CAPTURING_ON_CPU.reset(token)


@contextlib.contextmanager
def capture_cache():
    """Around one graph capture: results computed *inside* the capture may be reused later in it (their ops are in
    the graph, so a replay recomputes them before they are read), e.g. a mixed batch's row grouping, made by the
    first LoRA layer and read by the others. Without this block a capture caches nothing."""
    token = _CAPTURE_CACHE.set({})
    try:
        yield
    finally:
        _CAPTURE_CACHE.reset(token)


def captured_cache() -> dict | None:
    """The running :func:`capture_cache`'s dict (read it only while :func:`capturing`), or None."""
    return _CAPTURE_CACHE.get()


def kept(value):
    """``value`` (a cached device tensor, or a tuple / pack of them), also held by the running :func:`keeping_alive`
    block: a CUDA graph reads cached tensors at their capture-time addresses, so they must outlive their entry in
    the cache (an LRU may drop it, an adapter change may replace it)."""
    keep = _KEEP_ALIVE.get()
    if keep is not None:
        keep.append(value)
    return value


@contextlib.contextmanager
def normal_tensors():
    """Tensors made inside the block are normal ones, not inference tensors, even under the caller's
    ``torch.inference_mode`` (an inference tensor has no version counter and cannot be saved for a backward), and
    grad mode stays the caller's. ``torch.inference_mode(False)`` alone turns grad mode on: inside ``torch.no_grad``,
    a serving layer's pack of its adapters then recorded autograd history and required grad, and the level path's
    cache of GEMM operands skipped such packs, so every call (and every CUDA-graph replay) built them again."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def device_lru_cache(maxsize: int):
    """``functools.lru_cache`` for builders of device tensors, whose results :func:`kept` also hands to a capture.
    They are built as normal tensors even when the first call runs under ``torch.inference_mode``: the cache is
    process-wide, and an inference tensor in it would break every later call that autograd records."""

    def wrap(build):
        cached = functools.lru_cache(maxsize=maxsize)(normal_tensors()(build))

        @functools.wraps(build)
        def call(*args):
            return kept(cached(*args))

        call.cache_clear, call.cache_info = cached.cache_clear, cached.cache_info
        return call

    return wrap


def int_table(table, device: torch.device) -> torch.Tensor:
    """An int32 tensor of ``table`` (ids or routes) on ``device``, made as a normal tensor even under
    ``torch.inference_mode``: callers cache these, and an inference tensor has no version counter (``lora_linear``
    could not remember a LoRA ids tensor's row grouping, a static route could not refill it in place) and cannot be
    saved for a later backward."""
    with normal_tensors():
        return torch.tensor(table, dtype=torch.int32, device=device)


@contextlib.contextmanager
def keeping_alive():
    """Collects what :func:`kept` sees inside the block (a graph capture) into the list it yields."""
    held: list = []
    token = _KEEP_ALIVE.set(held)
    try:
        yield held
    finally:
        _KEEP_ALIVE.reset(token)


class Timing(NamedTuple):
    """What :func:`fastest` measured: the candidate for eager calls, the one for CUDA-graph capture, and the times."""

    eager: object  # least max(host time, GPU time): an eager call costs the slower side's time
    graphed: object  # least GPU time: all that a graph replay costs
    gpu_ms: list[float]
    host_ms: list[float] | None  # None when do_bench timed them (its times already hold the host's enqueue time)


def fastest(candidates: tuple, launch, device: torch.device | None = None) -> Timing:
    """Times ``launch(candidate)`` for every candidate (ms). On a CUDA ``device``: the GPU's work alone
    (:func:`graph_time_ms`) and the host's enqueue time (:func:`host_time_ms`). The choice for graph capture is the
    least GPU time; for eager calls the least of the larger of the two, since a candidate of several launches (a
    level-by-level cuBLAS path) may take longer to enqueue on a slow host than to run, where a GPU-bound model or a
    graph replay only sees its GPU time (session 13's H100 host: 0.48 ms of host time for 0.53 ms of work). Elsewhere,
    or when a candidate cannot be captured in a CUDA graph, every candidate is timed by ``triton.testing.do_bench``
    (a test hands it a CPU timer) and one choice serves both. A candidate the GPU cannot build (too much shared
    memory) times as infinite. The caller decides when timing is allowed (``AUTOTUNE``, not while
    :func:`capturing`) and undoes whatever the timing runs wrote."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    def times_by(timer) -> list[float]:
        times = []
        for c in candidates:
            try:
                times.append(timer(lambda c=c: launch(c)))
            except OutOfResources:
                times.append(float("inf"))
        return times

    def least(times: list[float]):
        return candidates[times.index(min(times))]

    if device is not None and device.type == "cuda":
        try:
            gpu = times_by(functools.partial(graph_time_ms, device=device))
        except RuntimeError as err:  # a candidate that syncs or allocates pinned memory cannot be captured
            logger.warning("timing by CUDA-graph replay failed (%s); timing every candidate by do_bench", err)
        else:
            # each candidate's least enqueue time of several: a slow host's hiccups only add time, and a median of
            # few calls kept them (session 15's H100: 0.17 to 0.28 ms for tiles of one launcher, so the eager pick
            # between candidates within 10% of each other in GPU time followed the hiccups)
            host = times_by(functools.partial(host_time_ms, device=device, calls=7, summary=min))
            return Timing(least([max(h, g) for h, g in zip(host, gpu)]), least(gpu), gpu, host)
    times = times_by(lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20))
    return Timing(least(times), least(times), times, None)


def host_time_ms(fn, device: torch.device, calls: int = 5, summary=statistics.median) -> float:
    """The host's time to enqueue one ``fn()`` (ms, ``summary`` of ``calls``: the median, or for :func:`fastest`
    the least), each call starting on an idle GPU."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return summary(times)


@functools.lru_cache(maxsize=8)
def _timing_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def graph_time_ms(fn, device: torch.device, rep_ms: float = 10.0, replays: int = 5) -> float:
    """GPU time of one ``fn()`` (ms): the median over ``replays`` replays of a CUDA graph holding repeated calls.

    ``triton.testing.do_bench`` records an event pair around each eager call. When the host enqueues a candidate's
    launches more slowly than the GPU runs them (a level-by-level cuBLAS path of about 15 launches on session 13's
    H100 host: 0.48 ms of host time), the pair measures host time, and the tuner kept a row kernel of 1.2 ms over
    that path's 0.53 ms. Inside a graph-replayed or GPU-bound model only GPU time counts, so that is what this
    times. ``triton.testing.do_bench_cudagraph`` does the same but captures in the global mode, in which another
    thread's unsafe CUDA call fails while the capture runs (serving threads); this captures thread-locally, with
    the cyclic garbage collector off (collecting a Triton kernel unloads its module, which breaks a capture)."""
    stream = _timing_stream(device)
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device), torch.cuda.stream(stream):  # (the graph's memory pool is the current device's)
        fn()  # compiles, fills the caches: the capture then only records launches
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        once = max(start.elapsed_time(end), 1e-3)  # host time included: an overestimate gives fewer repeats
        repeats = max(1, min(100, int(rep_ms / once)))
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                for _ in range(repeats):
                    fn()
        finally:
            if collecting:
                gc.enable()
        graph.replay()  # the first replay uploads the graph
        times = []
        for _ in range(replays):
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / repeats)
    caller.wait_stream(stream)
    return statistics.median(times)


def alignment16(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    """Whether each tensor's data is 16-byte aligned (None: True), what Triton specialises a pointer argument on: a
    recorded launch calls its compiled kernel directly only for tensors aligned as at the recording."""
    return tuple(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def compiled_kernel(launched):
    """What a Triton launch returned, when it is a compiled kernel that can be called directly (on a GPU; the
    interpreter returns none): else None."""
    return launched if HAS_TRITON and isinstance(launched, CompiledKernel) else None


RECORDED_GEOMETRIES = 1024  # recorded launches kept per cache (prompts of many lengths each make one)


def record(cache: dict, key, launch) -> None:
    """Keep ``launch`` as ``key``'s recorded launch in ``cache``; past ``RECORDED_GEOMETRIES`` entries the oldest
    goes."""
    cache[key] = launch
    if len(cache) > RECORDED_GEOMETRIES:
        try:
            del cache[next(iter(cache))]
        except (KeyError, RuntimeError, StopIteration):  # another thread changed the cache meanwhile: it trims
            pass


def launch_recorded(cache: dict, key, planner, planner_args: tuple, args: tuple, checked: tuple = ()) -> None:
    """Launch ``key``'s recorded :class:`DirectLaunch` in ``cache`` (or ``planner(*planner_args)``'s, recorded) with
    ``args``, checking the alignment of ``checked`` (see ``DirectLaunch.__call__``). (No closure for the planner: the
    callers' arguments would become cells, host time on every call.)"""
    launch = cache.get(key)
    fresh = launch is None
    if fresh:
        launch = planner(*planner_args)
    again = launch(args, checked)
    if fresh or again is not launch:
        record(cache, key, again)


def launch_signature(args, pointers: int) -> tuple:
    """What Triton specialises a kernel's compiled form on, of its runtime ``args`` whose first ``pointers`` are
    tensors: each tensor's dtype and 16-byte alignment, and the other arguments' values (an integer's equality to 1,
    divisibility by 16 and width). A cache key for :func:`launch_recorded` when the tensors come from anywhere (no
    alignment left to check); with the device, the grid (if the values do not fix it) and the constexprs."""
    return (*[(t.dtype, t.data_ptr() % 16 == 0) for t in args[:pointers]], *args[pointers:])


def launch_by_signature(cache: dict, head: tuple, kernel, grid: tuple[int, ...], kwargs: dict, args: tuple,
                        pointers: int) -> None:  # fmt: skip
    """Launch ``kernel`` over ``grid`` with ``args`` (the first ``pointers`` of them tensors) and ``kwargs``, through
    its launch recorded in ``cache`` under ``head`` (the device and what fixes the constexprs) and the arguments'
    :func:`launch_signature`: on a GPU a repeat calls the compiled kernel of the first launch directly."""
    key = (*head, *launch_signature(args, pointers))
    launch_recorded(cache, key, DirectLaunch.plan, (kernel, grid, kwargs, len(args)), args)


class DirectLaunch(NamedTuple):
    """A Triton kernel's launch planned for one geometry (grid, integer arguments, constexprs: the caller's cache
    key), repeated for new tensors. On a GPU it keeps the compiled kernel of its first launch and calls that
    directly while the tensors are 16-byte aligned as then (Triton's specialisation of a pointer; the integer
    arguments are the geometry's): no per-launch argument binding by Triton's launcher, host time that grows with
    the arguments (an empty kernel of 40 took 35-52 us on the H100 hosts of sessions 13 and 15, of 1 argument
    14-18 us) and that a small call's host time is mostly made of."""

    kernel: object  # the @triton.jit function
    grid: tuple[int, int, int]  # three dimensions: a compiled kernel's launcher reads all three
    kwargs: dict  # the constexprs and the launch options (warps, stages), as Triton's launch takes them
    constexprs: tuple  # the constexprs' values in signature order (the compiled kernel's direct call)
    compiled: object | None = None  # the compiled kernel (GPU), or None: Triton's launch
    alignment: tuple[bool, ...] = ()  # alignment16 of the checked tensors when compiled

    @classmethod
    def plan(cls, kernel, grid: tuple[int, ...], kwargs: dict, runtime_args: int) -> DirectLaunch:
        """A launch of ``kernel`` over ``grid`` with ``kwargs``, after ``runtime_args`` positional arguments."""
        constexprs = tuple(kwargs[name] for name in kernel.arg_names[runtime_args:])
        return cls(kernel, tuple(grid) + (1,) * (3 - len(grid)), kwargs, constexprs)

    def __call__(self, args: tuple, checked: tuple) -> DirectLaunch:
        """Launch with ``args`` (every runtime argument in signature order); ``checked``: the tensors among them
        whose alignment may differ between calls (the caller's own fresh allocations are always aligned). Returns
        the launch to repeat: this one, or after its first launch through Triton on a GPU, one with its compiled
        kernel."""
        if self.compiled is not None and alignment16(*checked) == self.alignment:
            self.compiled[self.grid](*args, *self.constexprs)  # every parameter in signature order
            return self
        launched = compiled_kernel(self.kernel[self.grid](*args, **self.kwargs))
        if self.compiled is not None or launched is None:
            return self
        return self._replace(compiled=launched, alignment=alignment16(*checked))


def dot_in_fp32(tensor: torch.Tensor) -> bool:
    """The interpreter computes bf16 arithmetic and ``tl.dot`` wrongly: feed it fp32 operands there."""
    return not tensor.is_cuda


TORCH_TO_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if getattr(tensor, "dtype", None) not in FLOAT_DTYPES:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got {type(tensor).__name__}")
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {tensor.dtype} (shape {tuple(tensor.shape)})"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_own_memory(name: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor an op writes in place whose elements share memory (a stride of 0 over a dimension of more
    than one element: an ``expand``ed view): the kernels' programs raced on it, leaving one of several results in
    each location, where the torch twins' ``copy_`` raises."""
    if any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride(), strict=True)):
        raise ValueError(
            f"{name} {tuple(tensor.shape)} is updated in place but its elements share memory (strides "
            f"{tensor.stride()}: an expanded view); pass a tensor with memory of its own (.clone())"
        )


def refuse_create_graph(op: str, differentiable: str) -> None:
    """Called first in a fused op's autograd backward: raise when it runs with ``create_graph=True`` (autograd then
    runs backwards with grad mode on). The fused backwards compute their gradients from tensors saved without their
    graph and from kernels whose outputs have none, so a second derivative through them would silently miss terms
    (``torch.autograd.grad`` to chosen inputs skips a ``once_differentiable`` guard, so the check is here).
    ``differentiable``: what to call instead for higher-order gradients."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}'s fused backward is not differentiable (create_graph=True: double backward, gradient penalties, "
            f"Hessian-vector products); use {differentiable} for higher-order gradients"
        )
