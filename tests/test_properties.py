"""Property tests (hypothesis): every kernel against its reference on random shapes (1, primes, odd sizes),
strided and offset views, dtypes, ranks, adapter counts and mixed-batch ids. At least 200 examples per op in
the CPU tier (the interpreter); the CUDA tier repeats them on the GPU with larger shapes."""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapter_engine.kernels import INTERPRET, lora_linear, lora_linear_reference, merge_lora_, scale_ia3_
from adapter_engine.kernels.lora_linear_tma import tma_fits

SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 31, 37, 64, 67, 97])
RANKS = st.sampled_from([1, 2, 7, 8, 16, 33, 64])
CPU_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# CUDA: each drawn shape and dtype compiles its own kernels on the GPU machine's CPU; 60 examples per test ran past
# 190 s on an H100 machine (session 7), so 25 per test, each test its own job in bench/gpu_check.sh
CUDA_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _seed_torch(data) -> None:
    """Seed torch from a drawn integer, first thing in every example: hypothesis replays and shrinks an example by its
    draws, and resets ``random`` and numpy between examples but not torch, so tensor values drawn from torch's running
    generator differed on replay (a failure found under ``--hypothesis-seed`` was reported as a ``FlakyFailure``,
    with no example that reproduced it). The seed shows in a failure's report as ``Draw 1 (torch seed)``."""
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="torch seed"))


def _view(shape, dtype, device, strided):
    """A tensor of ``shape``, either contiguous or a strided, offset view into a larger buffer."""
    if not strided:
        return torch.randn(shape, device=device).to(dtype)
    big = torch.randn(shape[0] * 2 + 3, shape[1] + 5, device=device).to(dtype)
    return big[3::2, 2 : 2 + shape[1]]


def _check_merge(data, device, dtype_choices, big):
    _seed_torch(data)
    dtype = data.draw(st.sampled_from(dtype_choices))
    out_f, in_f = (data.draw(SIZES) * (41 if big else 1), data.draw(SIZES) * (29 if big else 1))
    fan_in_fan_out = data.draw(st.booleans())
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    weight = _view(shape, dtype, device, data.draw(st.booleans()))
    n = data.draw(st.integers(1, 4))
    ranks = [data.draw(RANKS) for _ in range(n)]
    lora_a = [torch.randn(r, in_f, device=device).to(dtype) * 0.3 for r in ranks]
    lora_b = [torch.randn(out_f, r, device=device).to(dtype) * 0.3 for r in ranks]
    scales = [data.draw(st.floats(-4, 4, allow_nan=False, width=32)) for _ in ranks]
    exact = weight.double()
    magnitude = weight.double().abs()
    for a, b, s in zip(lora_a, lora_b, scales):
        delta, size = s * (b.double() @ a.double()), abs(s) * (b.double().abs() @ a.double().abs())
        exact, magnitude = (
            exact + (delta.t() if fan_in_fan_out else delta),
            magnitude + (size.t() if fan_in_fan_out else size),
        )
    merge_lora_(weight, lora_a, lora_b, scales, fan_in_fan_out=fan_in_fan_out)
    rounded = exact.to(dtype).double()
    mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = torch.exp2(torch.floor(torch.log2(rounded.abs().clamp_min(torch.finfo(dtype).tiny))) - mantissa)
    bound = ulp + (sum(ranks) + 2) * 2.0**-24 * magnitude  # one rounding + fp32 accumulation (see test_merge)
    assert ((weight.double() - rounded).abs() <= bound).all()


@CPU_SETTINGS
@given(data=st.data())
def test_merge_property(data):
    _check_merge(data, "cpu", [torch.float32, torch.float16, torch.bfloat16], big=False)


@CPU_SETTINGS
@given(data=st.data())
def test_ia3_property(data):
    _seed_torch(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    shape = (data.draw(SIZES), data.draw(SIZES))
    dim = data.draw(st.sampled_from([0, 1]))
    weight = _view(shape, dtype, "cpu", data.draw(st.booleans()))
    vec = (torch.rand(shape[dim]) + 0.5).to(dtype)
    expected = (weight.double() * vec.double().reshape((-1, 1) if dim == 0 else (1, -1))).to(dtype)
    scale_ia3_(weight, vec, dim=dim)
    if dtype == torch.bfloat16:
        # The interpreter converts fp32 to bf16 by truncation (GPUs round to nearest): within one ulp here.
        ulp = torch.exp2(torch.floor(torch.log2(expected.double().abs().clamp_min(1e-30))) - 7)
        assert ((weight.double() - expected.double()).abs() <= ulp).all()
    else:
        assert torch.equal(weight, expected)  # one product of exact inputs, rounded once in both


def test_failing_examples_replay_with_their_tensors():
    """A failure found with random tensor values replays: hypothesis reports (and shrinks) the assertion itself with
    the seed that reproduces it, not a ``FlakyFailure`` ("failed on the first call but did not on a subsequent one")."""

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(data=st.data())
    def prop(data):
        _seed_torch(data)
        assert torch.randn(()).item() < 1.5  # fails for 7% of the seeds

    with pytest.raises(AssertionError):
        prop()


def _check_lora(data, device, dtype, big, segmented=False, persistent=False):
    _seed_torch(data)
    m = data.draw(st.sampled_from([0, 1, 2, 5, 16, 33])) * (9 if big else 1)
    k, n_out = data.draw(SIZES) * (23 if big else 1), data.draw(SIZES) * (19 if big else 1)
    if persistent:  # rows TMA descriptors take (16-byte aligned) 3 times in 4, unless W is a strided view
        k = data.draw(st.sampled_from([8, 16, 24, 40, 64, 72])) * (16 if big else 1)
        k += data.draw(st.sampled_from([0, 0, 0, 1]))
    n = data.draw(st.integers(1, 3))
    ranks = [data.draw(RANKS) for _ in range(n)]
    x_shape = (m, k) if not data.draw(st.booleans()) else (1, m, k)
    x = torch.randn(x_shape, device=device, dtype=dtype, requires_grad=True)
    weight = _view((n_out, k), dtype, device, data.draw(st.booleans())).mul_(k**-0.5)  # maybe a strided view
    bias = torch.randn(n_out, device=device, dtype=dtype) if data.draw(st.booleans()) else None
    lora_a = [(torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_() for r in ranks]
    lora_b = [(torch.randn(n_out, r, device=device, dtype=dtype) * r**-0.5).requires_grad_() for r in ranks]
    scales = [data.draw(st.floats(0.125, 4, width=32)) for _ in ranks]
    ids = None
    if segmented or data.draw(st.booleans()):
        ids = torch.randint(-1, n, x_shape[:-1], device=device)
    # every kernel behind the op, not only the one "auto" picks at these sizes: the fused launch, the GEMM with
    # the low-rank epilogue, the persistent TMA GEMM (``persistent``: that alone) and the segmented (SGMV) kernels
    # of a mixed batch (``segmented``: those alone)
    paths = ["auto", "fused", "epilogue", "persistent"] + (["segmented"] if ids is not None else [])
    paths = ["segmented"] if segmented else ["persistent"] if persistent else paths
    path = data.draw(st.sampled_from(paths))
    event(f"path={path}")  # (pytest --hypothesis-show-statistics shows the mix)
    if path == "persistent":
        event(f"persistent kernel runs: {tma_fits(x.reshape(-1, k), weight)}")
    y = lora_linear(x, weight, lora_a, lora_b, scales, bias, adapter_ids=ids, path=path)
    leaves = [x, *lora_a, *lora_b]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = lora_linear_reference(
        ref_leaves[0], weight.double(), ref_leaves[1 : 1 + n], ref_leaves[1 + n :], scales,
        None if bias is None else bias.double(), adapter_ids=ids,
    )  # fmt: skip
    # Each output and gradient element is a sum of products. Its error is bounded relative to the largest element,
    # or, where larger, relative to the sum of its products' magnitudes (the textbook forward-error bound of a sum
    # of products, which the same reference gives on the inputs' absolute values): an element that cancels large
    # terms may be off by their rounding. Fuzzing with random seeds found fp16 dB cases that failed the first bound
    # alone (1.65 units of roundoff of the summed magnitudes; plain torch fp16 half as far off), and fp16 elements
    # near the subnormal range (below 6e-5, an absolute spacing of 6e-8) that fail the second alone.
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]  # fp32 accumulation vs fp64; about 6 fp16 roundings
    scale_of = lambda t: max(t.abs().max().item(), 1e-3) if t.numel() else 1.0
    mag_leaves = [t.detach().double().abs().requires_grad_() for t in leaves]
    y_mag = lora_linear_reference(
        mag_leaves[0], weight.double().abs(), mag_leaves[1 : 1 + n], mag_leaves[1 + n :], [abs(s) for s in scales],
        None if bias is None else bias.double().abs(), adapter_ids=ids,
    )  # fmt: skip
    assert y.shape == y_ref.shape
    assert ((y.double() - y_ref).abs() <= tol * y_mag.clamp_min(scale_of(y_ref))).all()
    if m == 0:
        return
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double(), allow_unused=True)
    mag_grads = torch.autograd.grad(y_mag, mag_leaves, dy.double().abs(), allow_unused=True)
    for g, r, mag in zip(grads, ref_grads, mag_grads, strict=True):
        g = torch.zeros_like(r) if g is None else g.double()
        r = torch.zeros_like(g) if r is None else r
        mag = torch.zeros_like(g) if mag is None else mag
        bound = 4 * tol * mag.clamp_min(scale_of(r))
        assert ((g - r).abs() <= bound).all(), ((g - r).abs() / bound).max().item()


@CPU_SETTINGS
@given(data=st.data())
def test_lora_linear_property(data):
    _check_lora(data, "cpu", data.draw(st.sampled_from([torch.float32, torch.float16])), big=False)


@CPU_SETTINGS
@given(data=st.data())
def test_lora_persistent_property(data):
    """The persistent TMA kernel (kernels/lora_linear_tma.py) in fp16 on its own 200 examples, K a multiple of 8
    (aligned rows) or one more (the fallback), strided weights included."""
    _check_lora(data, "cpu", torch.float16, big=False, persistent=True)


@CPU_SETTINGS
@given(data=st.data())
def test_lora_segmented_property(data):
    """The segmented (SGMV) kernels of mixed batches get their own 200 examples (the op-level property above draws
    them in about one example in ten)."""
    _check_lora(data, "cpu", data.draw(st.sampled_from([torch.float32, torch.float16])), big=False, segmented=True)


def _layout(t: torch.Tensor, kind: int) -> torch.Tensor:
    """``t``'s values as given (0), in transposed storage (1, 2-D only), or in a view with strides 2 and an offset
    (2)."""
    if kind == 1 and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == 2:
        big = torch.zeros([2 * n + 1 for n in t.shape], dtype=t.dtype)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    return t


@settings(CPU_SETTINGS, max_examples=30)
@given(data=st.data())
def test_lora_linear_layouts_property(data):
    """What the properties above leave fixed, against the fp64 twin (forward and the gradient of every operand that
    requires one, and only those): x 1-D, 2-D or 3-D in any layout (transposed storage, strided offset views),
    ``fan_in_fan_out`` weights in any layout, factors in any layout, scales 0 and negative, per-token or
    per-sequence ids, one adapter given bare, and any subset of the operands requiring grad."""
    _seed_torch(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    k, n_out = data.draw(st.sampled_from([1, 3, 17, 33])), data.draw(st.sampled_from([1, 7, 19, 40]))
    x_shape = data.draw(st.sampled_from([(k,), (5, k), (0, k), (2, 3, k)]))
    ranks = data.draw(st.lists(st.sampled_from([1, 2, 7, 16, 64]), min_size=1, max_size=3))
    fifo = data.draw(st.booleans())
    layout = lambda t: _layout(t, data.draw(st.integers(0, 2)))  # noqa: E731
    grads = [data.draw(st.booleans()) for _ in range(4)]  # x, weight and bias, the As, the Bs
    x = layout(torch.randn(x_shape).to(dtype)).requires_grad_(grads[0])
    w = torch.randn(n_out, k).mul(k**-0.5).to(dtype)
    weight = layout(w.t().contiguous() if fifo else w).requires_grad_(grads[1])
    bias = torch.randn(n_out).to(dtype).requires_grad_(grads[1]) if data.draw(st.booleans()) else None
    lora_a = [layout(torch.randn(r, k).mul(k**-0.5).to(dtype)).requires_grad_(grads[2]) for r in ranks]
    lora_b = [layout(torch.randn(n_out, r).mul(r**-0.5).to(dtype)).requires_grad_(grads[3]) for r in ranks]
    scales = [data.draw(st.sampled_from([0.0, -1.5, 0.5, 2.0])) for _ in ranks]
    ids_shape = data.draw(st.sampled_from([None, x_shape[:-1]] + ([x_shape[:1]] if len(x_shape) == 3 else [])))
    ids = None if ids_shape is None else torch.randint(-1, len(ranks), ids_shape)
    path = data.draw(st.sampled_from(["auto", "fused", "epilogue", "addmm", "composition", "persistent"]
                                     + (["segmented"] if ids is not None else [])))  # fmt: skip
    bare = len(ranks) == 1 and data.draw(st.booleans())
    factors = lambda a, b: (a[0], b[0], scales[0]) if bare else (a, b, scales)  # noqa: E731
    operands = [t for t in (x, weight, bias, *lora_a, *lora_b) if t is not None]
    before = [t.detach().clone() for t in operands]
    y = lora_linear(x, weight, *factors(lora_a, lora_b), bias, adapter_ids=ids, fan_in_fan_out=fifo, path=path)
    assert all(torch.equal(t, b) for t, b in zip(operands, before, strict=True))  # inputs left alone
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in operands]
    r_a, r_b = ref[len(ref) - 2 * len(ranks) : len(ref) - len(ranks)], ref[len(ref) - len(ranks) :]
    y_ref = lora_linear_reference(ref[0], ref[1], *factors(r_a, r_b), ref[2] if bias is not None else None,
                                  adapter_ids=ids, fan_in_fan_out=fifo)  # fmt: skip
    assert y.shape == y_ref.shape and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]  # as in _check_lora
    size = lambda t: max(t.abs().max().item(), 1.0) if t.numel() else 1.0  # noqa: E731
    assert (y.double() - y_ref).abs().max().item() <= 4 * tol * size(y_ref) if y.numel() else True
    trained = [(t, r) for t, r in zip(operands, ref, strict=True) if t.requires_grad]
    assert y.requires_grad == bool(trained)
    if trained:
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [t for t, _ in trained], dy, allow_unused=True)
        want = torch.autograd.grad(y_ref, [r for _, r in trained], dy.double(), allow_unused=True)
        for (t, _), g, r in zip(trained, got, want, strict=True):
            g = torch.zeros_like(t) if g is None else g
            r = torch.zeros_like(t, dtype=torch.float64) if r is None else r
            assert g.shape == t.shape and g.dtype == t.dtype
            assert (g.double() - r).abs().max().item() <= 16 * tol * size(r) if g.numel() else True


@pytest.mark.cuda
@CUDA_SETTINGS
@given(data=st.data())
def test_cuda_merge_property(data):
    _check_merge(data, "cuda", [torch.float32, torch.float16, torch.bfloat16], big=True)


@pytest.mark.cuda
@settings(CUDA_SETTINGS, max_examples=13)
@given(data=st.data())
def test_cuda_lora_linear_property_float16(data):
    """One test per dtype (bench/gpu_check.sh runs each as a job of its own): as one test of 25 examples it ran past
    its 194 s job in sessions 7 and 13. In fp16, 13 examples took 39 s on session 15's H100 machine."""
    _check_lora(data, "cuda", torch.float16, big=True)


@pytest.mark.cuda
@settings(CUDA_SETTINGS, max_examples=5)
@given(data=st.data())
def test_cuda_lora_linear_property_float32(data):
    """fp32 on 5 examples: 13 did not finish within 200 s in session 15 (nor 25 in sessions 7 and 13), where fp16's
    13 took 39 s. Each example compiles its kernels anew; what makes fp32's examples slower is not measured yet.
    Fewer examples that finish check more than more that do not."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp64 oracle comparison needs IEEE fp32 on both sides
    _check_lora(data, "cuda", torch.float32, big=True)


@pytest.mark.cuda
@CUDA_SETTINGS
@given(data=st.data())
def test_cuda_lora_segmented_property(data):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_lora(data, "cuda", data.draw(st.sampled_from([torch.float32, torch.float16])), big=True, segmented=True)


def _check_bottleneck(data, device, big, force_levels=False):
    from test_bottleneck import OPTION_GRID

    from adapter_engine.kernels import bottleneck_dispatch
    from adapter_engine.kernels.bottleneck import (
        ACTIVATIONS,
        bottleneck_stack_fwd,
        bottleneck_stack_ref,
        expand_routes,
        pack_adapters,
    )

    _seed_torch(data)
    hidden = data.draw(st.sampled_from([1, 5, 16, 24, 33, 40])) * (24 if big else 1)
    rows = data.draw(st.sampled_from([1, 2, 7, 16, 37])) * (9 if big else 1)
    options = OPTION_GRID[data.draw(st.sampled_from(sorted(OPTION_GRID)))]
    n = data.draw(st.integers(1, 3))
    ranks = [data.draw(st.sampled_from([1, 2, 8, 16])) for _ in range(n)]
    acts = [data.draw(st.sampled_from(sorted(ACTIVATIONS))) for _ in range(n)]
    packed = pack_adapters(
        [torch.randn(r, hidden, device=device) * hidden**-0.5 for r in ranks],
        [torch.randn(r, device=device) * 0.1 for r in ranks],
        [torch.randn(hidden, r, device=device) * r**-0.5 for r in ranks],
        [torch.randn(hidden, device=device) * 0.1 for _ in ranks],
        acts,
        [data.draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])) for _ in ranks],
    )
    h, y = torch.randn(rows, hidden, device=device), torch.randn(rows, hidden, device=device)
    with_ln = data.draw(st.booleans())
    lw = 1 + 0.2 * torch.randn(hidden, device=device) if with_ln else None
    lb = 0.1 * torch.randn(hidden, device=device) if with_ln else None
    levels = data.draw(st.integers(1, 3))
    mixed = not force_levels and data.draw(st.booleans())
    routes = torch.randint(-1, n, (rows, levels), device=device) if mixed else None
    if routes is None:
        routes = torch.tensor([data.draw(st.integers(-1, n - 1)) for _ in range(levels)], device=device)
    one_stack = routes.dim() == 1
    routes = expand_routes(routes, h)
    # one stack on every row may run level by level on cuBLAS (kernels/bottleneck_gemm.py) instead of the kernel
    # ("levels fused": chained level_boundary launches where they apply, the seq_bn default with a model LN)
    paths = (
        ["levels", "levels fused"] if force_levels else (["rows", "levels", "levels fused"] if one_stack else ["rows"])
    )
    path = data.draw(st.sampled_from(paths))
    event(f"bottleneck path {path}")
    saved_path, bottleneck_dispatch.STACK_PATH = bottleneck_dispatch.STACK_PATH, path
    try:
        got = bottleneck_stack_fwd(h, y, lw, lb, packed, routes, options)
    finally:
        bottleneck_dispatch.STACK_PATH = saved_path
    want = bottleneck_stack_ref(h, y, lw, lb, packed, routes, options)
    # fp32 throughout; LayerNorms of sums amplify rounding of near-constant rows a little
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # and training: the cuBLAS level backward against the reference's autograd (not at hidden 1 with a model LN:
    # there the normalised value is rounding noise times 1/sqrt(eps) = 1e6, on both sides)
    if force_levels and not (hidden == 1 and with_ln):
        inputs_train = data.draw(st.booleans())  # else only the adapters (and the LN) train: the first layer's case
        _check_bottleneck_gradients(h, y, lw, lb, packed, routes, options, inputs_train)


def _check_bottleneck_gradients(h, y, lw, lb, packed, routes, options, inputs_train):
    from adapter_engine.kernels import bottleneck_dispatch
    from adapter_engine.kernels.bottleneck import bottleneck_stack, bottleneck_stack_ref

    leaves = [t.detach().requires_grad_(inputs_train) for t in (h, y)] + [
        t.detach().requires_grad_() for t in packed[:4]
    ]
    lw_lb = [t.detach().requires_grad_() if t is not None else None for t in (lw, lb)]
    grad_out = torch.randn_like(h)
    results = []
    for run in ("levels", "reference"):
        trainable = (True,) * len(packed.host.trainable)  # the packed weights themselves are the leaves here
        p = packed._replace(wd=leaves[2], bd=leaves[3], wu=leaves[4], bu=leaves[5],
                            host=packed.host._replace(trainable=trainable))  # fmt: skip
        args = (leaves[0], leaves[1], p, routes[:1].expand_as(routes), options, *lw_lb)
        saved_path, bottleneck_dispatch.STACK_PATH = bottleneck_dispatch.STACK_PATH, run if run == "levels" else "auto"
        try:
            out = (
                bottleneck_stack(*args)
                if run == "levels"
                else bottleneck_stack_ref(args[0], args[1], *lw_lb, p, args[3], options)
            )
            wrt = [t for t in leaves + lw_lb if t is not None and t.requires_grad]
            if out.requires_grad:
                results.append(torch.autograd.grad(out, wrt, grad_out, materialize_grads=True))
            else:  # every level off and nothing else trains: no gradient reaches any leaf
                results.append([torch.zeros_like(t) for t in wrt])
        finally:
            bottleneck_dispatch.STACK_PATH = saved_path
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4 * max(want.abs().max().item(), 1e-3), rtol=1e-4)


@CPU_SETTINGS
@given(data=st.data())
def test_bottleneck_stack_property(data):
    _check_bottleneck(data, "cpu", big=False)


@CPU_SETTINGS
@given(data=st.data())
def test_bottleneck_levels_path_property(data):
    """One stack on every row, level by level on cuBLAS: forward and every gradient."""
    _check_bottleneck(data, "cpu", big=False, force_levels=True)


@pytest.mark.cuda
@CUDA_SETTINGS
@given(data=st.data())
def test_cuda_bottleneck_stack_property(data):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_bottleneck(data, "cuda", big=True)


def _check_add_layer_norm(data, device, big):
    from adapter_engine.kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference

    _seed_torch(data)
    half = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    rows, hidden = data.draw(SIZES) * (37 if big else 1), data.draw(SIZES) * (29 if big else 1)
    a = _view((rows, hidden), half, device, data.draw(st.booleans())) * 3
    b = _view((rows, hidden), data.draw(st.sampled_from([half, torch.float32])), device, data.draw(st.booleans()))
    weight = 1 + 0.2 * torch.randn(hidden, device=device)
    bias = 0.1 * torch.randn(hidden, device=device)
    c = _view((rows, hidden), half, device, data.draw(st.booleans())) if data.draw(st.booleans()) else None
    write_sum = data.draw(st.booleans())
    stats = torch.full((2, rows), float("nan"), device=device) if data.draw(st.booleans()) else None
    s, x = add_layer_norm(a, b, weight, bias, 1e-5, write_sum=write_sum, stats=stats, c=c)
    dtype = torch.promote_types(a.dtype, b.dtype)
    exact = a.float() + b.float() + (c.float() if c is not None else 0)
    # the kernel's own rounded sum (the interpreter truncates fp32 to bf16 where the GPU and torch round to nearest)
    if s is not None:
        s_ref = s
    elif INTERPRET and dtype == torch.bfloat16:
        s_ref = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    else:
        s_ref = exact.to(dtype)
    want = torch.nn.functional.layer_norm(
        s_ref.float(), (hidden,), weight.to(dtype).float(), bias.to(dtype).float(), 1e-5
    )
    if s is not None:
        assert ((s.float() - exact).abs() <= exact.abs() * 2.0 ** -(7 if dtype == torch.bfloat16 else 10)).all()
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(x.float(), want, rtol=tol, atol=tol)
    if not INTERPRET or dtype != torch.bfloat16:  # and the twin, which rounds as the GPU does
        ref = add_layer_norm_reference(a, b, weight, bias, 1e-5, dtype, False, None, c)[1]
        torch.testing.assert_close(x.float(), ref.float(), rtol=tol, atol=tol)
    if stats is not None:
        var, mean = torch.var_mean(s_ref.float(), dim=-1, correction=0)
        torch.testing.assert_close(stats[0], mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[1], torch.rsqrt(var + 1e-5), rtol=1e-3, atol=1e-3)


def _check_level_boundary(data, device, big):
    from adapter_engine.kernels.bottleneck_pack import _TORCH_ACTS
    from adapter_engine.kernels.level_boundary import level_boundary

    _seed_torch(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    rows, hidden = data.draw(SIZES) * (37 if big else 1), data.draw(SIZES) * (13 if big else 1)
    k, width = data.draw(RANKS), data.draw(RANKS)
    mode = data.draw(st.sampled_from(["start", "between", "end"]))
    event(f"level boundary {mode}")
    strided = lambda: data.draw(st.booleans())  # noqa: E731
    c = _view((rows, hidden), dtype, device, strided()) * 2 + 0.5
    y = _view((rows, hidden), dtype, device, strided()) if mode == "start" else None
    act = _view((rows, k), dtype, device, strided()).relu() if mode != "start" else None
    up = (_view((k, hidden), dtype, device, strided()) * k**-0.5) if mode != "start" else None
    code = data.draw(st.sampled_from(sorted(_TORCH_ACTS)))
    down_w = _view((width, hidden), dtype, device, strided()) * hidden**-0.5
    down = (down_w, (0.1 * torch.randn(width, device=device)).to(dtype), code) if mode != "end" else None
    weight, bias = 1 + 0.2 * torch.randn(hidden, device=device), 0.1 * torch.randn(hidden, device=device)
    exact = c.double() + (y.double() if y is not None else 0) + (act.double() @ up.double() if up is not None else 0)
    c_before = c.clone()
    s, out = level_boundary(c, weight, bias, 1e-5, y=y, act=act, up=up, down=down)
    # s: the exact sum rounded once (or, in the interpreter's bf16, truncated): within one unit in the last place
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10 if dtype == torch.float16 else 20)
    assert ((s.double() - exact).abs() <= exact.abs() * ulp + 1e-6).all()
    assert (s is c) == (y is None) and (y is None or torch.equal(c, c_before))
    # out: the torch ops on the kernel's own s
    x = torch.nn.functional.layer_norm(s.double(), (hidden,), weight.to(dtype).double(), bias.to(dtype).double(), 1e-5)
    if down is not None:
        x = _TORCH_ACTS[code](x.to(dtype).double() @ down[0].double().t() + down[1].double())
    tol = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), x, rtol=tol, atol=tol)


@CPU_SETTINGS
@given(data=st.data())
def test_level_boundary_property(data):
    _check_level_boundary(data, "cpu", big=False)


@pytest.mark.cuda
@CUDA_SETTINGS
@given(data=st.data())
def test_cuda_level_boundary_property(data):
    _check_level_boundary(data, "cuda", big=True)


@CPU_SETTINGS
@given(data=st.data())
def test_add_layer_norm_property(data):
    _check_add_layer_norm(data, "cpu", big=False)


@pytest.mark.cuda
@CUDA_SETTINGS
@given(data=st.data())
def test_cuda_add_layer_norm_property(data):
    _check_add_layer_norm(data, "cuda", big=True)
