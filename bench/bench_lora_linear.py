"""Fused LoRA linear benchmark (issue 3): one layer, bf16, r=16, against the bare matmul, PEFT and torch.

Shapes (in -> out): 4096 -> 4096 and 4096 -> 11008; M in {1, 16, 256, 4096, 16384} rows.
Providers: ``bare`` (``F.linear``, no adapter), ``engine`` (``lora_linear``, shape dispatch: above 64 rows it times
``"composition"`` against the persistent TMA kernel once per shape), ``engine_<path>`` (each forced path, to tune
``DISPATCH`` in kernels/lora_linear_dispatch.py; ``engine_persistent``, kernels/lora_linear_tma.py, from M = 256 on),
``composition`` (``F.linear`` then an in-place ``addmm_`` of the low-rank term: the best plain-torch order) and
``peft`` (a PEFT ``lora.Linear``).
Cases: forward (inference); forward+backward for adapter training (frozen W, grads for x, A, B; also with fp32
adapter weights, ``engine_fp32`` / ``peft_fp32``: PEFT's default for a bf16 model, ``autocast_adapter_dtype``); a
mixed batch
of 4 or 16 resident adapters with per-row ids incl. -1 (PEFT: ``adapter_names=``): ``engine`` (dispatch, which
takes the segmented path for mixed batches, kernels/lora_segmented.py), ``engine_segmented`` and ``engine_masked``
(forced: the segmented path, and the masked stacked-rank path ``"auto"`` took before it) to retune the rule in
``DISPATCH``, ``engine_one`` (one adapter for every row: the target is >= 0.85x its throughput), and training
(``train_*``: forward + backward for x and every A_i, B_i). Each row stores its ratio to the
bare op measured in the same run (``vs_bare``); bench/report.py recomputes ratios from the JSON as well.
On CPU everything runs at tiny sizes in the interpreter as a smoke test.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
from harness import cuda_graphed, device, host_ms, median_ms, on_gpu, pick, timed
from triton.compiler.compiler import CompiledKernel

from adapter_engine.kernels import lora_linear
from adapter_engine.kernels.lora_linear_tma import TMA_MAX_BLOCK_R, rank_tile

RANK, ALPHA = 16, 32
SCALE = ALPHA / RANK
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
SHAPES = pick([(4096, 4096), (4096, 11008)], [(64, 48)])
ROWS = pick([1, 16, 256, 4096, 16384], [1, 16])
TRAIN_ROWS = pick([256, 4096, 16384], [16])
MIXED_ROWS = pick([16, 256, 4096], [16, 80])
MIXED_ADAPTERS = pick([4, 16], [4, 16])
MIXED_PROVIDERS = ["bare", "engine_one", "engine", "engine_segmented", "engine_masked", "engine_persistent", "peft",
                   "train_engine_one", "train_engine", "train_engine_masked"]  # fmt: skip
FWD_PROVIDERS = ["bare", "engine", "engine_fused", "engine_epilogue", "engine_addmm", "engine_persistent",
                 "composition", "peft"]  # fmt: skip
TRAIN_PROVIDERS = ["bare", "engine", "engine_persistent", "composition", "peft", "engine_fp32", "peft_fp32"]
PERSISTENT_MIN_ROWS = pick(256, 0)  # the persistent kernel's 128-row tiles are for compute-bound M
_BARE_MS: dict[tuple, float] = {}


@pytest.fixture(scope="module")
def layer_cache():
    return {}


def _layer(cache, shape, n_adapters=1):
    """Weights of one layer (no bias, as in Llama) and a PEFT lora.Linear holding the same adapters."""
    key = (shape, n_adapters)
    if key not in cache:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        k, n = shape
        g = torch.Generator(device=device()).manual_seed(0)
        rand = lambda *s, scale: (torch.randn(*s, device=device(), generator=g) * scale).to(DTYPE)
        base = torch.nn.Linear(k, n, bias=False, device=device(), dtype=DTYPE).requires_grad_(False)
        base.weight.copy_(rand(n, k, scale=k**-0.5))
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        peft_layer = PeftLoraLinear(base, "a0", cfg, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        for i in range(1, n_adapters):
            peft_layer.update_layer(f"a{i}", r=RANK, lora_alpha=ALPHA, config=cfg, init_lora_weights=False)
        peft_layer.to(device=device(), dtype=DTYPE)
        As, Bs = [], []
        for i in range(n_adapters):
            a, b = peft_layer.lora_A[f"a{i}"].weight, peft_layer.lora_B[f"a{i}"].weight
            with torch.no_grad():
                a.copy_(rand(RANK, k, scale=k**-0.5))
                b.copy_(rand(n, RANK, scale=RANK**-0.5))
            As.append(a)
            Bs.append(b)
        peft_layer.set_adapter([f"a{i}" for i in range(n_adapters)])
        cache[key] = (base.weight, As, Bs, peft_layer)
    return cache[key]


def _fp32_adapter(cache, shape):
    """Adapter 0 of ``_layer`` as fp32 master weights (A, B) and a PEFT lora.Linear holding it in fp32 on the same
    base: what PEFT's ``get_peft_model`` gives for a bf16 model by default (``autocast_adapter_dtype=True``; its
    forward casts x to fp32 for the low-rank term), and what the engine keeps then (it computes in bf16, as autocast
    does: the two rows run each library's own precision)."""
    key = (shape, "fp32")
    if key not in cache:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear

        w, As, Bs, peft_layer = _layer(cache, shape)
        base = peft_layer.base_layer
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        peft32 = PeftLoraLinear(base, "a0", cfg, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        peft32.lora_A.to(device=device(), dtype=torch.float32)
        peft32.lora_B.to(device=device(), dtype=torch.float32)
        a, b = peft32.lora_A["a0"].weight, peft32.lora_B["a0"].weight
        with torch.no_grad():
            a.copy_(As[0].float())
            b.copy_(Bs[0].float())
        cache[key] = (a, b, peft32)
    return cache[key]


def _record(benchmark, fn, bare_fn, key, **extra):
    if key not in _BARE_MS:
        _BARE_MS[key] = median_ms(bare_fn)
    median = timed(benchmark, fn, bare_ms=_BARE_MS[key], **extra)
    benchmark.extra_info["vs_bare"] = median / _BARE_MS[key]
    # the host's share (session 23's H200: the engine's fwd+bwd at M=4096, 4096x4096 took 1.16 ms eagerly for 0.45 ms
    # of kernels, composition 0.93 ms for 0.48; no row said how much of that was the host's)
    benchmark.extra_info["host_ms"] = host_ms(fn)
    if "shape" in extra:  # what the large-M timing chose for this layer's GEMMs (forward, and dx in the backward)
        from adapter_engine.kernels import lora_linear_tiled

        ll = importlib.import_module("adapter_engine.kernels.lora_linear_dispatch")
        k, n = extra["shape"]
        for name, table in (("large_m_choices", ll._LARGE_M), ("large_m_choices_graphed", ll._LARGE_M_GRAPHED)):
            benchmark.extra_info[name] = {
                " ".join(map(str, key[:4])): str(choice) for key, choice in table.items() if {key[2], key[3]} == {k, n}
            }
        # and the small-M timing's paths for eager calls and graph captures (M bucket, N, R, K, and "wT" for dx = dy W)
        benchmark.extra_info["small_m_choices"] = {
            " ".join(map(str, key[:4])) + ("" if key[6] else " wT"): "eager {}, graphed {}".format(*paths)
            for key, paths in ll._SMALL_M.items()
            if {key[1], key[3]} == {k, n}
        }
        # and what serving a mixed batch past 64 rows chose (M bucket, N, K, ranks: segmented, masked or row adapters)
        benchmark.extra_info["mixed_choices"] = {
            " ".join(map(str, key[:4])): str(choice) for key, choice in ll._MIXED.items() if {key[1], key[2]} == {k, n}
        }
        # and the tiles the autotuner chose for the Triton kernel (M bucket, N, K: BLOCK_M/N/K, SPLIT_K, ...)
        benchmark.extra_info["tiled_choices"] = {
            " ".join(map(str, key[:3])): {c: v for c, v in config.items() if c.isupper() or c.startswith("num_")}
            for key, config in lora_linear_tiled._TUNED.items()
            if {key[1], key[2]} == {k, n}
        }


@pytest.mark.parametrize("provider", FWD_PROVIDERS)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_lora_linear_forward(benchmark, layer_cache, shape, M, provider):
    w, As, Bs, peft_layer = _layer(layer_cache, shape)
    A, B = As[0].detach(), Bs[0].detach()
    if provider == "engine_persistent" and M < PERSISTENT_MIN_ROWS:
        pytest.skip("the persistent kernel is for M >= 256")
    x = torch.randn(M, shape[0], device=device(), dtype=DTYPE)
    bare = lambda: F.linear(x, w)
    if provider == "bare":
        fn = bare
    elif provider.startswith("engine"):
        path = provider.split("_", 1)[1] if "_" in provider else "auto"
        fn = lambda: lora_linear(x, w, A, B, SCALE, path=path)
    elif provider == "composition":
        fn = lambda: F.linear(x, w).addmm_(F.linear(x, A), B.t(), alpha=SCALE)
    else:
        fn = lambda: peft_layer(x)
    case = f"fwd {shape[0]}x{shape[1]} M={M} r={RANK}"
    with torch.no_grad():
        _record(benchmark, fn, bare, ("fwd", shape, M), provider=provider, case=case, M=M, shape=list(shape))


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _empty_kernel_40_args(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19,
    i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19,
):  # fmt: skip
    pass  # as many arguments as the engine's kernels take (37 to 45): what each argument adds to a launch


HOST_CALLS = pick(200, 2)


HOST_PROVIDERS = ["bare", "composition", "engine", "engine_epilogue", "peft", "triton_empty", "triton_empty_40_args"]
HOST_PROVIDERS += ["triton_empty_40_args_direct"]
HOST_PROVIDERS += ["mixed16_segmented", "mixed16_masked"]


@pytest.mark.parametrize("provider", HOST_PROVIDERS)
def bench_host_time(benchmark, layer_cache, provider):
    """Host time per call at M=1, 4096x4096 (``host_us``): ``HOST_CALLS`` calls issued back to back and one
    synchronise, so the time is the host's whenever the host is slower than the GPU's few microseconds per call.
    On session 7's H100 machine the eager rows were host bound (a bare ``F.linear`` at M=1 took 60 us); this says
    how much of each path is Python and launch cost, and what one launch of an empty Triton kernel costs there
    (``triton_empty``: Triton's own launch path, the floor of every Triton launch; ``triton_empty_40_args``: the
    same with 40 arguments, as many as the engine's kernels take; ``triton_empty_40_args_direct``: that kernel's
    compiled form called directly, as the engine's recorded launches call theirs (``_backend.DirectLaunch``: the
    LoRA tiled kernel and segmented shrink / expand, the serving bottleneck launch), without Triton's per-call
    argument binding and specialisation: what recording a launch saves; ``engine`` is recorded). ``mixed16_*``:
    one row per adapter over 16 resident adapters (16 rows), the mixed-batch op on its segmented path (a cuBLAS GEMM
    and two Triton launches) and on the masked one (cuBLAS and torch only): what a LoRA layer of a mixed serving
    batch costs the host."""
    shape = SHAPES[0]
    mixed = provider.startswith("mixed16")
    w, As, Bs, peft_layer = _layer(layer_cache, shape, 16 if mixed else 1)
    A, B = As[0].detach(), Bs[0].detach()
    x = torch.randn(16 if mixed else 1, shape[0], device=device(), dtype=DTYPE)
    ids = torch.arange(16, device=device(), dtype=torch.int32)
    many = [x] * 20 + list(range(1, 21))
    calls = {
        "bare": lambda: F.linear(x, w),
        "composition": lambda: F.linear(x, w).addmm_(F.linear(x, A), B.t(), alpha=SCALE),
        "engine": lambda: lora_linear(x, w, A, B, SCALE),
        "engine_epilogue": lambda: lora_linear(x, w, A, B, SCALE, path="epilogue"),
        "peft": lambda: peft_layer(x),
        "triton_empty": lambda: _empty_kernel[(1,)](x),
        "triton_empty_40_args": lambda: _empty_kernel_40_args[(1,)](*many),
        "mixed16_segmented": lambda: lora_linear(x, w, As, Bs, [SCALE] * 16, adapter_ids=ids, path="segmented"),
        "mixed16_masked": lambda: lora_linear(x, w, As, Bs, [SCALE] * 16, adapter_ids=ids, path="composition"),
    }
    if provider == "triton_empty_40_args_direct":
        compiled = _empty_kernel_40_args[(1,)](*many)  # (the compiled kernel on a GPU; None in the interpreter)
        if not isinstance(compiled, CompiledKernel):
            pytest.skip("a compiled kernel's direct launch needs a GPU")
        calls[provider] = lambda: compiled[(1, 1, 1)](*many)  # every parameter in signature order, 3-d grid
    call = calls[provider]

    def fn():
        for _ in range(HOST_CALLS):
            call()

    with torch.no_grad():
        case = f"host time, {HOST_CALLS} calls, M={x.shape[0]}"
        median = timed(benchmark, fn, provider=provider, case=case, n_rounds=pick(10, 1))
    benchmark.extra_info["host_us"] = median * 1e3 / HOST_CALLS


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("provider", ["bare", "engine", "engine_epilogue", "composition", "peft"])
@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_lora_linear_forward_graphed(benchmark, layer_cache, shape, M, provider):
    """Small-M forward with every provider replayed from a CUDA graph: the kernels' GPU time without the host
    launch path (which the eager rows above include). ``engine_epilogue``: x A^T by cuBLAS first, then the Triton
    GEMM adds u B^T in its epilogue, against ``engine`` (the fused launch at M <= 64, which recomputes x A^T per
    column tile: R / BLOCK_N more reads than W, from L2), to settle ``DISPATCH`` at small M."""
    w, As, Bs, peft_layer = _layer(layer_cache, shape)
    A, B = As[0].detach(), Bs[0].detach()
    x = torch.randn(M, shape[0], device=device(), dtype=DTYPE)
    fns = {
        "bare": lambda: F.linear(x, w),
        "engine": lambda: lora_linear(x, w, A, B, SCALE),
        "engine_epilogue": lambda: lora_linear(x, w, A, B, SCALE, path="epilogue"),
        "composition": lambda: F.linear(x, w).addmm_(F.linear(x, A), B.t(), alpha=SCALE),
        "peft": lambda: peft_layer(x),
    }
    case = f"fwd graphed {shape[0]}x{shape[1]} M={M} r={RANK}"
    with torch.no_grad():
        bare, fn = cuda_graphed(fns["bare"]), cuda_graphed(fns[provider])
        _record(benchmark, fn, bare, ("graphed", shape, M), provider=provider, case=case, M=M, shape=list(shape))


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("M", TRAIN_ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_lora_linear_train(benchmark, layer_cache, shape, M, provider):
    """Forward + backward with a frozen base: gradients for x (the previous layer needs it), A and B."""
    w, As, Bs, peft_layer = _layer(layer_cache, shape)
    A, B = As[0], Bs[0]
    x = torch.randn(M, shape[0], device=device(), dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, shape[1], device=device(), dtype=DTYPE)
    bare = lambda: torch.autograd.grad(F.linear(x, w), [x], dy)
    if provider == "bare":
        fn = bare
    elif provider.endswith("_fp32"):  # fp32 adapter weights on the bf16 base: PEFT's default, the engine's too
        A32, B32, peft32 = _fp32_adapter(layer_cache, shape)
        layer = peft32 if provider == "peft_fp32" else lambda x: lora_linear(x, w, A32, B32, SCALE)
        fn = lambda: torch.autograd.grad(layer(x), [x, A32, B32], dy)
    elif provider.startswith("engine"):
        path = provider.split("_", 1)[1] if "_" in provider else "auto"
        fn = lambda: torch.autograd.grad(lora_linear(x, w, A, B, SCALE, path=path), [x, A, B], dy)
    elif provider == "composition":
        fn = lambda: torch.autograd.grad(F.linear(x, w).addmm_(F.linear(x, A), B.t(), alpha=SCALE), [x, A, B], dy)
    else:
        fn = lambda: torch.autograd.grad(peft_layer(x), [x, A, B], dy)
    case = f"fwd+bwd {shape[0]}x{shape[1]} M={M} r={RANK}"
    _record(benchmark, fn, bare, ("train", shape, M), provider=provider, case=case, M=M, shape=list(shape))


@pytest.mark.parametrize("provider", MIXED_PROVIDERS)
@pytest.mark.parametrize("M", MIXED_ROWS)
@pytest.mark.parametrize("n_adapters", MIXED_ADAPTERS)
def bench_lora_linear_mixed_batch(benchmark, layer_cache, n_adapters, M, provider):
    """``n_adapters`` resident adapters, each row picks one (or -1, base only); ``engine_one``: one adapter for all
    rows; ``train_*``: forward + backward (frozen W; grads for x and every adapter's A and B)."""
    from adapter_engine.kernels.lora_linear_dispatch import DISPATCH

    # the persistent kernel refuses a stacked rank tile above TMA_MAX_BLOCK_R (tma_fits) and the op runs "epilogue":
    # sessions 7 and 13 timed that under this name at 16 adapters (R = 256)
    if provider == "engine_persistent" and rank_tile(RANK * n_adapters) > TMA_MAX_BLOCK_R:
        pytest.skip(f"the persistent kernel takes a stacked rank of at most {TMA_MAX_BLOCK_R}, not {RANK * n_adapters}")
    shape = SHAPES[0]
    w, As, Bs, peft_layer = _layer(layer_cache, shape, n_adapters=n_adapters)
    train = provider.startswith("train_")
    if not train:
        As, Bs = [a.detach() for a in As], [b.detach() for b in Bs]
    x = torch.randn(M, shape[0], device=device(), dtype=DTYPE, requires_grad=train)
    ids = torch.arange(M, device=device()) % (n_adapters + 1) - 1  # -1, 0, 1, ..., n-1, -1, ...
    names = ["__base__" if i < 0 else f"a{i}" for i in ids.tolist()]
    masked = "composition" if M > DISPATCH.fused_max_m else "fused"  # the rule before the segmented path
    scales = [SCALE] * n_adapters
    if train:
        dy = torch.randn(M, shape[1], device=device(), dtype=DTYPE)
        bare = lambda: torch.autograd.grad(F.linear(x, w), [x], dy)
    else:
        bare = lambda: F.linear(x, w)
    fwd = {
        "engine_one": lambda: lora_linear(x, w, As[0], Bs[0], SCALE),
        "engine": lambda: lora_linear(x, w, As, Bs, scales, adapter_ids=ids),
        "engine_segmented": lambda: lora_linear(x, w, As, Bs, scales, adapter_ids=ids, path="segmented"),
        "engine_masked": lambda: lora_linear(x, w, As, Bs, scales, adapter_ids=ids, path=masked),
        "engine_persistent": lambda: lora_linear(x, w, As, Bs, scales, adapter_ids=ids, path="persistent"),
        "peft": lambda: peft_layer(x, adapter_names=names),
    }
    if provider == "bare":
        fn = bare
    elif train:
        forward = fwd[provider.removeprefix("train_")]
        leaves = [x, As[0], Bs[0]] if provider == "train_engine_one" else [x, *As, *Bs]
        fn = lambda: torch.autograd.grad(forward(), leaves, dy)
    else:
        fn = fwd[provider]
    case = f"mixed {n_adapters} adapters {'fwd+bwd ' if train else ''}{shape[0]}x{shape[1]} M={M} r={RANK}"
    with torch.set_grad_enabled(train):
        _record(benchmark, fn, bare, ("mixed", train, shape, M), provider=provider, case=case, M=M,
                shape=list(shape), n_adapters=n_adapters)  # fmt: skip
