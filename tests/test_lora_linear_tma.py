"""``lora_linear``'s ``path="persistent"`` (kernels/lora_linear_tma.py: persistent grid, TMA descriptors, the LoRA
term in the epilogue) against the fp64 oracle, forward and every gradient, and the large-M choice that times it
against ``"composition"``.

CPU tier: the kernel runs in the interpreter with a 32 x 32 x 32 tile on 2 "SMs", so every case walks several output
tiles per program, with odd M and N (zero-filled by the descriptors) and K a multiple of 8 (16-byte rows). A spy
counts the kernel's launches: a test that silently fell back to another path fails. CUDA tier: in
tests/test_lora_linear.py (bf16 error no larger than plain torch's, ``path="persistent"``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_lora_linear import TOL, _check, _close, _make, poison  # noqa: F401  (a fixture, used by every test here)

from adapter_engine.kernels import lora_linear
from adapter_engine.kernels.lora_linear_tma import TmaTiles, _aligned, tma_fits

ll = importlib.import_module("adapter_engine.kernels.lora_linear")
ld = importlib.import_module("adapter_engine.kernels.lora_linear_dispatch")  # the choice of path="auto"
lk = importlib.import_module("adapter_engine.kernels.lora_linear_launch")  # the launchers
lt = importlib.import_module("adapter_engine.kernels.lora_linear_tma")  # the persistent kernel
HALF = [torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("poison")  # kernel outputs start as NaN


@pytest.fixture
def launches(monkeypatch):
    """The persistent kernel's launches, as (M, N, K, weight K-major, fused shrink) per call."""
    seen = []
    real = lk.lora_linear_tma_fwd

    def spy(x, weight, lora_A, lora_B, *args, **kwargs):
        tiles = args[-1]
        x_lora = args[4]
        fused = tiles.fuse_shrink and x_lora is None and _aligned(lora_A) and kwargs.get("rows") is None  # (as the
        seen.append((x.shape[0], weight.shape[0], x.shape[1], weight.stride(-1) == 1, fused))  # launcher decides)
        return real(x, weight, lora_A, lora_B, *args, **kwargs)

    for module in (lk, ld):  # (the launcher's persistent path; a served mixed batch's)
        monkeypatch.setattr(module, "lora_linear_tma_fwd", spy)
    return seen


CASES = [  # (rows, K, N, ranks, bias): odd M and N, K a multiple of 8; N a multiple of 8 lets dx take the kernel too
    ((37,), 40, 45, [8], True),
    ((3, 23), 72, 64, [1], False),
    ((70,), 48, 104, [64], True),
    ((5,), 16, 33, [16, 4], True),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}r{'+'.join(map(str, c[3]))}")
def test_persistent_forward_and_gradients(launches, case, dtype):
    lead, K, N, ranks, bias = case
    x, w, b, As, Bs = _make(lead, K, N, ranks, dtype, bias)
    scales = [0.75, -1.5][: len(ranks)]
    _check(x, w, b, As, Bs, scales, dtype, path="persistent")
    M = x.numel() // K
    assert launches[0] == (M, N, K, True, True)  # the forward: W (N, K) as it is, the shrink fused
    # dx = dy W + du A_cat on the same kernel when dy's rows are 16-byte aligned: W read as its transpose, du from
    # cuBLAS (B_cat^T is not row-contiguous)
    assert launches[1:] == ([(M, K, N, False, False)] if N % 8 == 0 else [])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_persistent_mixed_ids_fan_in_fan_out_and_dropout(launches, dtype):
    """Mixed adapter ids (incl. -1, one adapter absent), the Conv1D weight layout (read transposed in the forward)
    and dropout (the adapter input differs from x: the shrink comes from cuBLAS)."""
    x, w, b, As, Bs = _make((2, 17), 32, 40, [8, 1, 16], dtype, fifo=True)
    ids = torch.randint(-1, 2, (2, 17))  # adapter 2 absent
    _, grads = _check(x, w, b, As, Bs, [0.5, 2.0, 1.0], dtype, adapter_ids=ids, fan_in_fan_out=True,
                      path="persistent")  # fmt: skip
    assert torch.count_nonzero(grads[3 + 2]) == 0  # lora_A of the absent adapter
    assert launches[0] == (34, 40, 32, False, True)
    launches.clear()
    torch.manual_seed(0)
    y = lora_linear(x, w, As, Bs, [0.5, 2.0, 1.0], b, adapter_ids=ids, fan_in_fan_out=True, dropout=0.5,
                    training=True, path="persistent")  # fmt: skip
    torch.manual_seed(0)
    y_ref = ll.lora_linear_reference(x, w, As, Bs, [0.5, 2.0, 1.0], b, adapter_ids=ids, fan_in_fan_out=True,
                                     dropout=0.5, training=True)  # fmt: skip
    assert launches[0][-1] is False  # not fused: u = dropout(x) A^T from cuBLAS
    assert (y.double() - y_ref.double()).abs().max() <= TOL[dtype] * y_ref.abs().max().double()


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused-shrink", "cublas-shrink"])
@pytest.mark.parametrize("case", ["one adapter", "mixed ids"])
def test_split_k_tiles_add_their_slices_once(monkeypatch, split_k, fuse, case):
    """Split-K tiles (each output tile's K range over ``split_k`` work units of the persistent grid, summed by the
    tile's last unit to finish): y and the stored u as the reference makes them, the tile counters left zeroed for
    the next launch, at a K of two steps, so that with three splits one has no step of its own."""
    from adapter_engine.kernels import lora_epilogue
    from adapter_engine.kernels.lora_inputs import _rank_tables, _stack
    from adapter_engine.kernels.lora_linear_tma import lora_linear_tma_fwd

    monkeypatch.setattr(lora_epilogue, "_COUNTERS", {})
    ranks = [8] if case == "one adapter" else [16, 4]
    x, w, b, As, Bs = _make((37,), 64, 45, ranks, torch.bfloat16)
    A, B = _stack(As, Bs)
    scales = tuple([0.75, -1.5][: len(ranks)])
    rank_scale, rank_adapter, _ = _rank_tables(tuple(ranks), scales, x.device)
    ids = torch.randint(-1, len(ranks), (37,), dtype=torch.int32) if case == "mixed ids" else None
    y = torch.full((37, 45), float("nan"), dtype=x.dtype)
    u = torch.full((37, A.shape[0]), float("nan"), dtype=x.dtype)
    tiles = TmaTiles(32, 32, 32, 4, 1, fuse, 2, split_k)
    d = lambda t: t.double()  # noqa: E731  (the fp64 oracle: the interpreter's bf16 rounds its own way)
    with torch.no_grad():
        lora_linear_tma_fwd(x, w, A, B, rank_scale, rank_adapter, b, ids, None, y, u, tiles)
        want_y, want_u = lk.lora_linear_fwd_reference(d(x), d(w), d(A), d(B), rank_scale, rank_adapter, d(b), ids)
    _close(y, want_y, x.dtype, "y")
    _close(u, want_u, x.dtype, "u")
    (counters,) = lora_epilogue._COUNTERS.values()
    assert not counters.any()


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["per sequence", "per token"])
def test_row_adapters_give_each_row_its_own_adapter_in_the_epilogue(kind, dtype, split_k):
    """``rows=``: a mixed batch's u by row from the segmented shrink, each row's own adapter's term added in the GEMM's
    epilogue (one dot per adapter present in a tile, y written once): the mixed-batch reference on every row, rows of
    id -1 (and, per token, an id past the adapters, which a GPU does not range-check) base only, u's rows of those
    never read (NaN). Per sequence, 10-row runs of one adapter cross the 32-row tiles; per token, ids at random."""
    from adapter_engine.kernels.lora_inputs import _stack
    from adapter_engine.kernels.lora_linear_tma import lora_linear_tma_fwd
    from adapter_engine.kernels.lora_segmented import lora_shrink, plan_segments

    M, K, N, ranks, scales = 70, 48, 45, [8, 16, 4], [0.5, -1.5, 2.0]
    x, w, b, As, Bs = _make((M,), K, N, ranks, dtype)
    x, w = x.detach(), w.detach()
    b = torch.stack([b.detach(), torch.full_like(b, float("nan"))], 1)[:, 0]  # a strided bias (stride 2)
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    if kind == "per sequence":
        ids = (torch.arange(M) // 10 % 4 - 1).to(torch.int32)  # runs of -1, 0, 1, 2
    else:
        ids = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
        ids[[3, 40]] = 7
    A, B = _stack(As, Bs)
    plan = plan_segments(ids, ranks, scales)
    u = lora_shrink(x, A, plan, by_row=True)
    base_only = (ids < 0) | (ids >= len(ranks))
    u[base_only] = float("nan")  # (unwritten by the shrink: the epilogue must not read them)
    y = torch.full((M, N), float("nan"), dtype=dtype)
    tiles = TmaTiles(32, 32, 32, 4, 1, False, 2, split_k)  # (K = 48: two K steps of 32, one per slice)
    with torch.no_grad():
        lora_linear_tma_fwd(
            x, w, A, B, plan.scale, plan.rank_off, b, ids, None, y, None, tiles, rows=(u, plan.rank_off)
        )
    d = lambda t: t.double()  # noqa: E731
    want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As], [d(b_) for b_ in Bs], scales, d(b),
                                    adapter_ids=ids.masked_fill(base_only, -1))  # fmt: skip
    _close(y, want, dtype, "y")


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_tiled_row_adapters_read_a_bias_of_any_stride(layout):
    """The tiled kernel with each row's own adapter in its epilogue (``TILED_ROW_ADAPTERS``, timed on a GPU only),
    launched directly: a strided or expanded (stride 0) bias is read through its stride."""
    from adapter_engine.kernels.lora_inputs import _stack
    from adapter_engine.kernels.lora_segmented import plan_segments

    M, K, N, ranks, scales = 9, 24, 21, [8, 4], [0.5, -1.5]
    x, w, _, As, Bs = _make((M,), K, N, ranks, torch.float16)
    x, w = x.detach(), w.detach()
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    b = torch.randn(2 * N).half()[::2] if layout == "strided" else torch.randn(1).half().expand(N)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0], dtype=torch.int32)
    A, B = _stack(As, Bs, b_rank_major=True)
    plan = plan_segments(ids, ranks, scales)
    y = torch.full((M, N), float("nan"), dtype=torch.float16)
    with torch.no_grad():
        ld._mixed_launch(ld.TILED_ROW_ADAPTERS, x, w, A, B, b, ids, plan, y)
    d = lambda t: t.double()  # noqa: E731
    want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As], [d(b_) for b_ in Bs], scales, d(b),
                                    adapter_ids=ids)  # fmt: skip
    _close(y, want, torch.float16, "y")


def test_persistent_falls_back_where_tma_cannot_run(launches):
    """fp32, rows that are not 16-byte aligned (K = 45 in bf16), non-contiguous rows and stacked ranks over 64 take
    ``"epilogue"``, the same math on pointer loads, with the same results."""
    x, w, b, As, Bs = _make((9,), 45, 24, [8], torch.bfloat16)
    assert not tma_fits(x, w)
    _check(x, w, b, As, Bs, [1.0], torch.bfloat16, path="persistent")
    x32, w32, b32, As32, Bs32 = _make((9,), 48, 24, [8], torch.float32)
    assert not tma_fits(x32, w32)
    _check(x32, w32, b32, As32, Bs32, [1.0], torch.float32, path="persistent")
    wide = _make((9,), 96, 24, [8], torch.bfloat16)[0]
    assert tma_fits(wide[:, :48].contiguous(), w32.bfloat16()) and not tma_fits(wide[:, ::2], w32.bfloat16())
    x, w, b, As, Bs = _make((9,), 48, 24, [64, 8], torch.bfloat16)  # stacked rank 72: a 128-wide rank tile
    assert tma_fits(x, w, 64) and not tma_fits(x, w, 72)
    _check(x, w, b, As, Bs, [1.0, 0.5], torch.bfloat16, path="persistent")
    assert launches == []


def test_empty_batch(launches):
    x, w, b, As, Bs = _make((0,), 32, 24, [8], torch.bfloat16)
    y = lora_linear(x, w, As[0], Bs[0], 1.0, b, path="persistent")
    assert y.shape == (0, 24)


def test_a_recorded_persistent_launch_calls_its_compiled_kernel_directly_for_operands_aligned_alike(
    monkeypatch, direct_stand_in
):
    """On a GPU the persistent kernel's first launch of a geometry is recorded with its compiled kernel, and a repeat
    calls that directly (no per-launch binding of its 44 parameters by Triton): the four descriptors, the pointers and
    integers in signature order, then the constexprs (a stand-in for the compiled kernel binds them back to the
    kernel's parameter names and runs it in the interpreter, so a misordered argument gives wrong results). A bias
    aligned otherwise (Triton specialises a pointer on its 16-byte alignment) is another geometry: Triton's launch."""
    stand_in, direct = direct_stand_in
    monkeypatch.setattr(lt, "_RECORDED", {})
    x, w, b, As, Bs = _make((37,), 40, 45, [8, 3], torch.float16, grad=False)
    ids = torch.randint(-1, 2, (37,), dtype=torch.int32)
    with torch.no_grad():
        lora_linear(x, w, As, Bs, [0.5, -2.0], b, adapter_ids=ids, path="persistent")
    ((key, recorded),) = lt._RECORDED.items()
    assert recorded.compiled is None  # the interpreter's launch returns no compiled kernel
    lt._RECORDED[key] = stand_in(recorded, 0)  # (the key holds the alignments: nothing left to check per call)
    x2 = torch.randn(37, 40, dtype=torch.float16)
    shifted = torch.empty(46, dtype=torch.float16)[1:].copy_(b)  # 2-byte aligned
    for bias in (b, shifted):
        up = [a.double() for a in As], [b_.double() for b_ in Bs]
        want = ll.lora_linear_reference(x2.double(), w.double(), *up, [0.5, -2.0], bias.double(), adapter_ids=ids)
        with torch.no_grad():
            got = lora_linear(x2, w, As, Bs, [0.5, -2.0], bias, adapter_ids=ids, path="persistent")
        assert (got.double() - want).abs().max() <= TOL[torch.float16] * want.abs().max()
        assert direct == [(2, 1, 1)]  # called directly once, on its 2 "SMs"; the shifted bias went through Triton
    assert len(lt._RECORDED) == 2


def test_a_first_persistent_launch_records_its_compiled_kernel(monkeypatch, compiled_stand_in):
    """On a GPU the first launch returns its compiled kernel (``_backend.compiled_kernel``): the recorded launch keeps
    it, and every later call of the geometry, the shrink fused or from cuBLAS, calls it directly."""
    from adapter_engine.kernels import _backend

    make, direct = compiled_stand_in
    stand_in = make(lt._lora_linear_tma_fwd_kernel)
    monkeypatch.setattr(_backend, "compiled_kernel", lambda launched: stand_in)
    monkeypatch.setattr(lt, "_RECORDED", {})
    x, w, b, As, Bs = _make((19,), 32, 40, [8], torch.float16, grad=False)
    want = ll.lora_linear_reference(x.double(), w.double(), As[0].double(), Bs[0].double(), 0.5, b.double())
    for fuse in (True, False):
        monkeypatch.setattr(lk.dispatch, "tma_candidates", lambda *a, fuse=fuse: (TmaTiles(32, 32, 32, 4, 1, fuse, 2),))
        direct.clear()
        for calls in (0, 1, 2):
            with torch.no_grad():
                got = lora_linear(x, w, As[0], Bs[0], 0.5, b, path="persistent")
            assert (got.double() - want).abs().max() <= TOL[torch.float16] * want.abs().max()
            assert len(direct) == calls
    assert [r.compiled for r in lt._RECORDED.values()] == [stand_in, stand_in]  # one per form of the shrink


def test_large_m_choice_times_composition_against_the_tiles(monkeypatch, launches):
    """Above ``fused_max_m`` rows ``"auto"`` times ``"composition"`` against the persistent tiles once per shape and
    keeps the faster (here a CPU timer with made-up costs); without timing (``ADAPTER_ENGINE_AUTOTUNE=0``) it keeps
    ``"composition"``, the measured choice of the first H100 runs."""
    import triton

    slow, fast = TmaTiles(32, 32, 32, 4, 1, True, 2), TmaTiles(16, 32, 16, 4, 1, False, 2)
    monkeypatch.setattr(ld, "_large_m_candidates", lambda path, fusable, block_r, rows: ("composition", slow, fast))
    monkeypatch.setattr(ld, "_LARGE_M", {})
    monkeypatch.setattr(ld, "_LARGE_M_GRAPHED", {})
    monkeypatch.setattr(ld, "DISPATCH", ld.LoraLinearDispatch(fused_max_m=4))
    timed = []

    def fake_do_bench(fn, warmup, rep):
        n = len(launches)
        fn()
        timed.append(launches[n:])
        return {0: 2.0, 1: 3.0, 2: 1.0}[len(timed) - 1]  # composition, slow, fast

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(ld, "AUTOTUNE", True)
    x, w, b, As, Bs = _make((19,), 32, 40, [8], torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            launches.clear()
            y = lora_linear(x, w, As[0], Bs[0], 0.5, b)
            assert launches[-1] == (19, 40, 32, True, False)  # the fast tiles ran (unfused shrink)
        assert len(timed) == 3 and timed[0] == []  # composition launched no kernel; timed once only
        want = ll.lora_linear_reference(x.double(), w.double(), As[0].double(), Bs[0].double(), 0.5, b.double())
        assert (y.double() - want).abs().max() <= TOL[torch.bfloat16] * want.abs().max()
        monkeypatch.setattr(ld, "AUTOTUNE", False)
        launches.clear()
        lora_linear(x, w, As[0], Bs[0], 0.5, b)  # same key: the choice is remembered
        assert launches == [(19, 40, 32, True, False)]
        launches.clear()
        lora_linear(x[:, :24].contiguous(), w[:, :24].contiguous(), As[0][:, :24].contiguous(), Bs[0], 0.5, b)
        assert launches == [] and len(timed) == 3  # a new shape, untimed: "composition"


def test_a_graph_capture_takes_the_choice_by_gpu_time(monkeypatch, launches):
    """The timing keeps two choices per shape: eager calls take the one for which the larger of host and GPU time
    is least (here composition: its three launches are cheap for this host), a CUDA-graph capture the least GPU
    time (here the persistent kernel)."""
    from adapter_engine.kernels._backend import Timing, capture_on_cpu

    tiles = TmaTiles(32, 32, 32, 4, 1, True, 2)
    monkeypatch.setattr(ld, "_large_m_candidates", lambda path, fusable, block_r, rows: ("composition", tiles))
    monkeypatch.setattr(ld, "_LARGE_M", {})
    monkeypatch.setattr(ld, "_LARGE_M_GRAPHED", {})
    monkeypatch.setattr(ld, "DISPATCH", ld.LoraLinearDispatch(fused_max_m=4))
    monkeypatch.setattr(ld, "AUTOTUNE", True)
    monkeypatch.setattr(ld, "fastest", lambda c, launch, device: Timing(c[0], c[1], [2.0, 1.0], [0.5, 0.5]))
    x, w, b, As, Bs = _make((19,), 32, 40, [8], torch.bfloat16)
    want = ll.lora_linear_reference(x.double(), w.double(), As[0].double(), Bs[0].double(), 0.5, b.double())
    with torch.no_grad():
        lora_linear(x, w, As[0], Bs[0], 0.5, b)
        assert launches == []  # eager: composition
        with capture_on_cpu():
            y = lora_linear(x, w, As[0], Bs[0], 0.5, b)
        assert launches == [(19, 40, 32, True, True)]  # captured: the persistent kernel
    assert (y.double() - want).abs().max() <= TOL[torch.bfloat16] * want.abs().max()


# ------------------------------------------------------------------------------------------------------ CUDA tier
@pytest.mark.cuda
@pytest.mark.parametrize("fuse", [True, False], ids=["fused shrink", "cuBLAS shrink"])
def test_cuda_recorded_persistent_launch_matches_tritons_launch_bit_for_bit(monkeypatch, fuse):
    """On the GPU the persistent kernel's recorded launch holds the compiled kernel of its first launch and calls it
    directly from then on (its descriptors, pointers and integers in signature order): its output equals that of
    the same launch through Triton's launcher bit for bit, for new operands, mixed ids and a bias."""
    monkeypatch.setattr(lt, "_RECORDED", {})
    tiles = next(t for t in lt.tma_candidates(True, 16, 4096) if t.fuse_shrink == fuse and t.split_k == 1)
    monkeypatch.setattr(ld, "tma_candidates", lambda *args: (tiles,))
    dev, dt, M, K, N = "cuda", torch.bfloat16, 4096, 4096, 4096
    _, w, b, As, Bs = _make((M,), K, N, [16, 8], dt, grad=False)
    w, b, As, Bs = w.to(dev), b.to(dev), [a.to(dev) for a in As], [b_.to(dev) for b_ in Bs]
    ids = torch.randint(-1, 2, (M,), device=dev, dtype=torch.int32)
    call = lambda x: lora_linear(x, w, As, Bs, [2.0, 0.5], b, adapter_ids=ids, path="persistent")  # noqa: E731
    with torch.no_grad():
        call(torch.randn(M, K, device=dev, dtype=dt))
        ((key, recorded),) = lt._RECORDED.items()
        assert recorded.compiled is not None
        x = torch.randn(M, K, device=dev, dtype=dt)
        direct = call(x)
        lt._RECORDED[key] = recorded._replace(compiled=None)  # the same launch through Triton's launcher
        through_triton = call(x)
        want = ll.lora_linear_reference(x.double(), w.double(), [a.double() for a in As], [b_.double() for b_ in Bs],
                                        [2.0, 0.5], b.double(), adapter_ids=ids)  # fmt: skip
    assert torch.equal(direct, through_triton)
    assert (direct.double() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["weight-as-stored", "conv1d-layout"])
@pytest.mark.parametrize("M", [256, 2048])
def test_cuda_persistent_bf16_no_worse_than_torch(launches, M, fan_in_fan_out):
    """bf16 4096 -> 11008, one adapter of rank 16 with a bias (forward) and dx = dy W + du A (backward) on the
    persistent kernel: the relative error of y and every gradient against fp64 is at most 1.02x plain torch bf16's
    (the kernel rounds y once; torch's order rounds x W^T, u B^T and their sum)."""
    from test_lora_linear import _oracle, _rel_err, _run

    dev, dt, K, N = "cuda", torch.bfloat16, 4096, 11008
    x, w, b, As, Bs = _make((M,), K, N, [16], dt, fifo=fan_in_fan_out)
    x = x.detach().to(dev).requires_grad_()
    w, b = w.detach().to(dev), b.detach().to(dev)
    A, B = As[0].detach().to(dev).requires_grad_(), Bs[0].detach().to(dev).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=torch.float64)
    kw = dict(fan_in_fan_out=fan_in_fan_out)
    _run(lora_linear, x, w, b, A, B, 2.0, dy, path="persistent", **kw)  # times the tiles once per shape (launches)
    launches.clear()
    y, grads = _run(lora_linear, x, w, b, A, B, 2.0, dy, path="persistent", **kw)
    # W is K-major for the forward as stored, and for dx = dy W in Conv1D's (in, out) layout (the shrink of the
    # forward fused or not, as timed; dx has none)
    k_major = not fan_in_fan_out
    assert len(launches) == 2 and launches[0][3] == k_major and launches[1][3:] == (not k_major, False)
    y_t, grads_t = _run(ll.lora_linear_reference, x, w, b, A, B, 2.0, dy, **kw)
    y64, grads64 = _oracle(x, w, b, A, B, 2.0, dy, **kw)
    for what, got, plain, want in [("y", y, y_t, y64), *(("grad", *t) for t in zip(grads, grads_t, grads64))]:
        e, e_t = _rel_err(got, want), _rel_err(plain, want)
        assert e <= e_t * 1.02 + 1e-6, f"{what}: persistent error {e:.3g} > 1.02 x torch bf16 error {e_t:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 256, 300])
def test_cuda_every_small_m_candidate_tile_is_correct(M):
    """Each tile ``"auto"`` may time at few rows (the 64-row tiles included), launched directly, shrink fused or not:
    y and the stored u within 1.02x plain torch bf16's error against fp64."""
    from test_lora_linear import _rel_err

    from adapter_engine.kernels.lora_linear_tma import lora_linear_tma_fwd, tma_candidates

    dev, dt, K, N = "cuda", torch.bfloat16, 4096, 4096
    x, w, b, As, Bs = _make((M,), K, N, [16], dt)
    x, w, b, A, B = (t.detach().to(dev) for t in (x, w, b, As[0], Bs[0]))
    scale = torch.full((16,), 2.0, device=dev)
    owner = torch.zeros(16, dtype=torch.int32, device=dev)
    want = x.double() @ w.double().t() + b.double() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    plain = x @ w.t() + b + 2.0 * (x @ A.t()) @ B.t()
    tiles = tma_candidates(True, 16, rows=M)
    assert any(t.block_m == 64 for t in tiles)
    for t in tiles:
        y, u = torch.empty(M, N, device=dev, dtype=dt), torch.empty(M, 16, device=dev, dtype=dt)
        lora_linear_tma_fwd(x, w, A, B, scale, owner, b, None, None, y, u, t)
        assert _rel_err(y, want) <= _rel_err(plain, want) * 1.02 + 1e-6, t
        assert _rel_err(u, 2.0 * x.double() @ A.double().t()) <= 1e-2, t


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["per sequence", "per token"])
@pytest.mark.parametrize("M", [256, 4096])
def test_cuda_every_row_adapter_tile_is_correct(M, kind):
    """Each tile ``_serve_mixed`` may time with each row's own adapter in the epilogue (``RowAdapterTiles``), launched
    after the by-row shrink: bf16, 4096 x 4096, adapters of ranks 16, 8, 16 and 4 with -1 rows, per sequence (runs
    of 128 rows) or per token; y within 1.02x plain torch bf16's error against fp64."""
    from test_lora_linear import _rel_err

    from adapter_engine.kernels.lora_inputs import _stack
    from adapter_engine.kernels.lora_linear_tma import lora_linear_tma_fwd, tma_candidates
    from adapter_engine.kernels.lora_segmented import lora_shrink, plan_segments

    dev, dt, K, N, ranks, scales = "cuda", torch.bfloat16, 4096, 4096, [16, 8, 16, 4], [2.0, 0.5, 1.0, 4.0]
    x, w, b, As, Bs = _make((M,), K, N, ranks, dt)
    x, w, b = (t.detach().to(dev) for t in (x, w, b))
    As, Bs = [a.detach().to(dev) for a in As], [b_.detach().to(dev) for b_ in Bs]
    if kind == "per sequence":
        ids = (torch.arange(M, device=dev) // 128 % 5 - 1).to(torch.int32)
    else:
        ids = torch.randint(-1, 4, (M,), device=dev, dtype=torch.int32)
    A, B = _stack(As, Bs, b_rank_major=True)  # (as serving stacks them)
    plan = plan_segments(ids, ranks, scales)
    d = lambda t: t.double()  # noqa: E731
    want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As], [d(b_) for b_ in Bs], scales, d(b), adapter_ids=ids)
    plain = _rel_err(ll.lora_linear_reference(x, w, As, Bs, scales, b, adapter_ids=ids), want)
    tiles = tma_candidates(False, plan.u_width, rows=M)
    assert tiles
    with torch.no_grad():
        for t in tiles:
            u = lora_shrink(x, A, plan, by_row=True)
            y = torch.full((M, N), float("nan"), device=dev, dtype=dt)
            lora_linear_tma_fwd(
                x, w, A, B, plan.scale, plan.rank_off, b, ids, None, y, None, t, rows=(u, plan.rank_off)
            )
            assert _rel_err(y, want) <= plain * 1.02 + 1e-6, t


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 64])
def test_cuda_tiled_row_adapters_are_correct(M):
    """The tiled kernel with each row's own adapter in its epilogue (``TILED_ROW_ADAPTERS``: a decode step of requests
    on 16 adapters of rank 16, per token, with -1 rows), autotuned as it runs: bf16, 4096 x 4096; y within 1.02x plain
    torch bf16's error against fp64."""
    from test_lora_linear import _rel_err

    from adapter_engine.kernels.lora_inputs import _stack
    from adapter_engine.kernels.lora_segmented import plan_segments

    dev, dt, K, N, n = "cuda", torch.bfloat16, 4096, 4096, 16
    ranks, scales = [16] * n, [0.5 + i / n for i in range(n)]
    x, w, b, As, Bs = _make((M,), K, N, ranks, dt)
    x, w, b = (t.detach().to(dev) for t in (x, w, b))
    As, Bs = [a.detach().to(dev) for a in As], [b_.detach().to(dev) for b_ in Bs]
    ids = torch.randint(-1, n, (M,), device=dev, dtype=torch.int32)
    A, B = _stack(As, Bs, b_rank_major=True)
    plan = plan_segments(ids, ranks, scales)
    d = lambda t: t.double()  # noqa: E731
    want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As], [d(b_) for b_ in Bs], scales, d(b), adapter_ids=ids)
    plain = _rel_err(ll.lora_linear_reference(x, w, As, Bs, scales, b, adapter_ids=ids), want)
    with torch.no_grad():
        y = torch.full((M, N), float("nan"), device=dev, dtype=dt)
        ld._mixed_launch(ld.TILED_ROW_ADAPTERS, x, w, A, B, b, ids, plan, y)
    assert _rel_err(y, want) <= plain * 1.02 + 1e-6


def test_forced_persistent_falls_back_when_no_tile_builds(monkeypatch, launches):
    """A GPU on which no candidate tile builds (too much shared memory: every timing raises) gets ``"epilogue"``
    for a forced ``"persistent"``, with correct results, instead of an error at the real launch."""
    import triton

    tile = TmaTiles(32, 32, 32, 4, 1, True, 2)
    monkeypatch.setattr(
        ld, "_large_m_candidates", lambda path, fusable, block_r, rows: (tile, tile._replace(block_m=16))
    )
    monkeypatch.setattr(ld, "_LARGE_M", {})
    monkeypatch.setattr(ld, "_LARGE_M_GRAPHED", {})
    monkeypatch.setattr(ld, "AUTOTUNE", True)

    def out_of_resources(fn, warmup, rep):
        raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(triton.testing, "do_bench", out_of_resources)
    x, w, b, As, Bs = _make((19,), 32, 40, [8], torch.bfloat16)
    with torch.no_grad():
        y = lora_linear(x, w, As[0], Bs[0], 0.5, b, path="persistent")
    assert launches == []
    want = ll.lora_linear_reference(x.double(), w.double(), As[0].double(), Bs[0].double(), 0.5, b.double())
    assert (y.double() - want).abs().max() <= TOL[torch.bfloat16] * want.abs().max()


@pytest.mark.parametrize("via", ["lora_linear", "serving layer"])
def test_a_mixed_batch_times_the_segmented_path_against_the_persistent_kernel_with_row_adapters(
    monkeypatch, launches, via
):
    """Inference on a mixed batch past ``fused_max_m`` rows (``_serve_mixed``): ``"segmented"`` is timed once per
    shape against the persistent kernel adding each row's own adapter in its epilogue from u by row
    (``RowAdapterTiles``: no second pass over y) and the faster kept, for the functional op and a serving layer's
    stacked call alike; the kernel's mixed-batch output matches the reference. Here a stand-in timer picks the kernel
    for eager calls and ``"segmented"`` for graph captures; the interpreter alone times nothing and keeps
    ``"segmented"``."""
    from adapter_engine.kernels._backend import Timing, capture_on_cpu

    tiles = ld.RowAdapterTiles(TmaTiles(32, 32, 32, 4, 1, False, 2))
    monkeypatch.setattr(ld, "_MIXED", {})
    monkeypatch.setattr(ld, "_MIXED_GRAPHED", {})
    monkeypatch.setattr(ld, "DISPATCH", ld.LoraLinearDispatch(fused_max_m=4))
    monkeypatch.setattr(ld, "AUTOTUNE", True)
    x, w, b, As, Bs = _make((19,), 32, 40, [8, 16, 4], torch.float16)
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    ids = torch.tensor([i % 4 - 1 for i in range(19)], dtype=torch.int32)
    scales = [0.5, 2.0, -1.0]
    if via == "lora_linear":
        call = lambda: lora_linear(x, w, As, Bs, scales, b, adapter_ids=ids)  # noqa: E731
    else:
        stacked = ll.stack_loras(x, w, As, Bs, scales, b)
        call = lambda: ll.lora_linear_stacked(x, w, stacked, b, adapter_ids=ids, path="auto")  # noqa: E731
    want = ll.lora_linear_reference(x.double(), w.double(), [a.double() for a in As], [b_.double() for b_ in Bs],
                                    scales, b.double(), adapter_ids=ids)  # fmt: skip
    with torch.no_grad():
        call()
        assert launches == []  # the interpreter times nothing: "segmented"
        monkeypatch.setattr(ld, "_mixed_candidates", lambda small, u_width, rows: ("segmented", tiles))
        timings = []
        monkeypatch.setattr(ld, "fastest", lambda c, launch, device: timings.append(c) or Timing(c[1], c[0], [], []))
        for calls in (2, 1):  # (the first call also runs each candidate once before the timing)
            launches.clear()
            y = call()
            assert launches == [(19, 40, 32, True, False)] * calls  # the persistent kernel (the shrink apart)
        assert len(timings) == 1  # timed once per shape
        assert (y.double() - want).abs().max() <= TOL[torch.float16] * want.abs().max()
        launches.clear()
        with capture_on_cpu():
            call()
        assert launches == []  # captured: "segmented", the least GPU time here


def _mixed_call(via, x, w, b, As, Bs, scales, ids):
    """A mixed batch served through ``lora_linear`` or a serving layer's stacked call (``lora_linear_stacked``)."""
    if via == "lora_linear":
        return lora_linear(x, w, As, Bs, scales, b, adapter_ids=ids)
    return ll.lora_linear_stacked(x, w, ll.stack_loras(x, w, As, Bs, scales, b), b, adapter_ids=ids, path="auto")


@pytest.mark.parametrize("kind", ["per sequence", "per token"])
@pytest.mark.parametrize("via", ["lora_linear", "serving layer"])
def test_a_small_mixed_batch_times_the_segmented_path_against_the_tiled_kernel_with_row_adapters(
    monkeypatch, via, kind
):
    """Up to ``fused_max_m`` rows (a decode step of requests on many adapters: a stacked rank too wide for the masked
    fused launch), ``_serve_mixed`` times ``"segmented"`` against the tiled kernel adding each row's own adapter in
    its epilogue from u by row (``TILED_ROW_ADAPTERS``); a stand-in timer picks the kernel. Its output matches the
    mixed-batch reference (rows of id -1 base only), for the functional op and a serving layer's stacked call, with
    split-K tiles (the interpreter's 3 slices at 16 rows) and without (33 rows)."""
    from adapter_engine.kernels._backend import Timing

    lt = importlib.import_module("adapter_engine.kernels.lora_linear_tiled")
    monkeypatch.setattr(ld, "_MIXED", {})
    monkeypatch.setattr(ld, "_MIXED_GRAPHED", {})
    monkeypatch.setattr(ld, "AUTOTUNE", True)
    monkeypatch.setattr(ld, "_mixed_candidates", lambda small, u_width, rows: (
        ("segmented", ld.TILED_ROW_ADAPTERS) if small else ("segmented",)))  # fmt: skip
    timings = []
    monkeypatch.setattr(ld, "fastest", lambda c, launch, device: timings.append(c) or Timing(c[-1], c[0], [], []))
    ranks, scales = [16, 8, 16, 16, 16], [0.5, 2.0, -1.0, 1.5, 0.25]  # R = 72 > 64: "auto" takes "segmented"
    d = lambda t: t.double()  # noqa: E731
    for M in (16, 33):
        x, w, b, As, Bs = _make((M,), 40, 72, ranks, torch.float16)
        x, w, b = x.detach(), w.detach(), b.detach()
        As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
        if kind == "per sequence":
            ids = (torch.arange(M) // 4 % 6 - 1).to(torch.int32)
        else:
            ids = torch.randint(-1, len(ranks), (M,), generator=torch.Generator().manual_seed(M), dtype=torch.int32)
        want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As], [d(b_) for b_ in Bs], scales, d(b),
                                        adapter_ids=ids)  # fmt: skip
        lt._RECORDED.clear()
        with torch.no_grad():
            for _ in range(2):
                _close(_mixed_call(via, x, w, b, As, Bs, scales, ids), want, torch.float16, f"y, {M} rows")
        assert [g[0] for g in lt._RECORDED] == ["row adapters"]  # the tiled kernel ran, with row adapters
    assert len(timings) == 2  # once per shape


@pytest.mark.parametrize("gemm", ["persistent", "tiled"])
def test_row_adapters_keep_a_rows_output_from_other_adapters_non_finite_weights(gemm):
    """A serving layer fuses every resident adapter, used or not, and a GEMM adding each row's own adapter in its
    epilogue multiplies the other rows' zeros by that adapter's B too (0 * NaN is NaN). Here an unused adapter's
    factors are all NaN and a used one's B has one NaN and one inf: every other row equals the reference, as on the
    segmented path, and the rows of the adapter with the bad B are non-finite in those two columns only."""
    from adapter_engine.kernels.lora_inputs import _stack
    from adapter_engine.kernels.lora_segmented import plan_segments

    M, K, N, ranks, scales = 40, 48, 45, [8, 16, 4], [0.5, -1.5, 2.0]
    x, w, b, As, Bs = _make((M,), K, N, ranks, torch.float16)
    x, w, b = x.detach(), w.detach(), b.detach()
    As, Bs = [a.detach() for a in As], [b_.detach() for b_ in Bs]
    ids = (torch.arange(M, dtype=torch.int32) % 3 - 1).clamp(max=1)  # -1, 0, 1: adapter 2 unused
    clean = [b_.clone() for b_ in Bs]
    clean[1][[5, 30], 3] = 0.0
    Bs[1][5, 3], Bs[1][30, 3] = float("nan"), float("inf")
    As[2].fill_(float("nan"))
    Bs[2].fill_(float("nan"))
    A, B = _stack(As, Bs, b_rank_major=True)
    plan = plan_segments(ids, ranks, scales)
    choice = ld.TILED_ROW_ADAPTERS if gemm == "tiled" else ld.RowAdapterTiles(TmaTiles(32, 32, 32, 4, 1, False, 2))
    y = torch.full((M, N), float("nan"), dtype=torch.float16)
    with torch.no_grad():
        ld._mixed_launch(choice, x, w, A, B, b, ids, plan, y)
    d = lambda t: t.double()  # noqa: E731
    want = ll.lora_linear_reference(d(x), d(w), [d(a) for a in As[:2]], [d(b_) for b_ in clean[:2]], scales[:2], d(b),
                                    adapter_ids=ids)  # fmt: skip
    theirs, cols = ids == 1, torch.tensor([5, 30])
    _close(y[~theirs], want[~theirs], torch.float16, "the other rows")
    rest = torch.ones(N, dtype=torch.bool)
    rest[cols] = False
    _close(y[theirs][:, rest], want[theirs][:, rest], torch.float16, "the adapter's rows, finite columns")
    assert not y[theirs][:, cols].isfinite().any()
