"""What the GPU compiler makes of the kernels, checked without a GPU: Triton compiles to PTX for an H100 (sm_90)
with the ptxas it ships. The first H100 run found the grouped merge kernel at 6.7% of the bandwidth floor because
its weight loads were scalar (bench/results/2026-11-26-h100-session1/NOTES.md); this keeps them vectorised."""

import functools
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

_COMPILE = textwrap.dedent(
    """
    import json, re, sys
    from collections import Counter
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels.merge import LARGE_RANK_TILES, _merge_lora_kernel

    aligned, uniform, w_stages = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3])
    stages = w_stages or LARGE_RANK_TILES[4]
    signature = {
        "table": "*i64", "bad_ptr": "*i32", "n_rows": "i32", "n_cols": "i32",
        "adapter_offset": "i32", "scale_offset": "i32", "sign": "fp32", "stride_n": "i32", "stride_k": "i32",
    }
    constants = {
        "W_DTYPE": tl.bfloat16, "F_DTYPE": tl.bfloat16, "F_BYTES": 2, "W_ALIGNED": aligned, "F_ALIGNED": aligned,
        "UNIFORM_SCALE": uniform, "CHECK_ONLY": False, "DOT_FP32": False, "DOT_PRECISION": "ieee",
        "MAX_ADAPTERS": 4, "BLOCK_R": 64, "BLOCK_N": LARGE_RANK_TILES[0],
        "BLOCK_K": LARGE_RANK_TILES[1], "ROW_TILES": LARGE_RANK_TILES[2],
        "W_STAGES": stages if stages > 1 else None,  # as the launcher: 0 or 1 = the kernel's num_stages
    }
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    constexprs[(names.index("stride_k"),)] = 1  # the launcher's specialisation of a unit stride
    # What Triton's launcher infers for a 4096 x 4096 bf16 weight: aligned table, sizes divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("table", "n_rows", "n_cols", "stride_n")}
    source = ASTSource(fn=_merge_lora_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(json.dumps(Counter(re.findall(r"(?:ld|st)\\.global[.\\w]*|cp\\.async\\.c[ag]", compiled.asm["ptx"]))))
    """
)


def _ptx_memory_ops(aligned: bool, uniform: bool = True, w_stages: int = 0) -> Counter:
    """Global loads, stores and cp.async copies in the kernel's PTX for an H100 (compiled in a process without the
    interpreter), with LARGE_RANK_TILES (its W_STAGES replaced by ``w_stages`` when not 0; 1: unpipelined)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = [sys.executable, "-c", _COMPILE, "1" if aligned else "0", "1" if uniform else "0", str(w_stages)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return Counter(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("uniform", [True, False], ids=["one-scale", "per-adapter-scales"])
def test_merge_kernel_streams_the_weight_with_16_byte_vectors(uniform):
    ops = _ptx_memory_ops(aligned=True, uniform=uniform, w_stages=1)  # unpipelined: the W tile in plain loads
    assert ops["st.global.v4.b32"] > 0 and not any(op.startswith("st.global") and "v4" not in op for op in ops), ops
    assert ops["ld.global.v4.b32"] >= ops["st.global.v4.b32"], ops  # the weight tile comes in as it goes out
    # B_cat's rows too (as 16-byte loads or cp.async copies): with four r=16 adapters they were 2-byte scalar
    # loads, 32 per thread and row tile against the W tile's 8, until the rank mask got its multiple_of hint
    assert not any(op.startswith("ld.global") and op.endswith(("b16", "b8")) for op in ops), ops


def test_pipelined_row_tiles_load_the_weight_ahead_as_cp_async_copies():
    """W_STAGES > 1 (bench/tune_merge.py candidates): the W tiles of the row-tile loop become cp.async copies issued
    ahead of the tile being stored; the plain 16-byte loads left are the A columns, loaded once per program."""
    plain, pipelined = _ptx_memory_ops(aligned=True, w_stages=1), _ptx_memory_ops(aligned=True, w_stages=3)
    assert pipelined["cp.async.cg"] > plain["cp.async.cg"], (plain, pipelined)
    assert not any(op.startswith("ld.global") and op.endswith(("b16", "b8")) for op in pipelined), pipelined
    assert pipelined["ld.global.v4.b32"] < plain["ld.global.v4.b32"], (plain, pipelined)
    assert pipelined["st.global.v4.b32"] == plain["st.global.v4.b32"] > 0, (plain, pipelined)


def test_unaligned_launches_fall_back_to_scalar_accesses():
    # The generic path (weights with odd strides or offsets) is correct but scalar: that is why ALIGNED exists.
    ops = _ptx_memory_ops(aligned=False, w_stages=1)
    assert ops["st.global.b16"] > 0 and ops["st.global.v4.b32"] == 0, ops


# Prepended to the compile scripts below: registers and stack / local bytes per thread of an sm_90 build, from
# cuobjdump (shipped with Triton) on its cubin. STACK holds the spill slots.
_RESOURCES = textwrap.dedent(
    """
    def resources(compiled):
        import os, re, subprocess, tempfile
        import triton

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        return [int(re.search(key + r":(\\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL")]

    def wgmma_serialized(compiled):
        # ptxas' verdict on the PTX: it may serialize the wgmma pipeline the PTX asks for (info C7515: every HGMMA
        # then waits for 0), which the PTX itself does not show
        import os, subprocess, tempfile
        import triton

        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
            info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                  text=True).stderr
        return "wgmma.mma_async instructions are serialized" in info
    """
)


# ---------------------------------------------------------------------------------------- bottleneck stack kernels
# The fused bottleneck stack ran 4.6x slower than eager PyTorch at hidden 4096 on the first H100 run (2.77 ms vs
# 0.61 ms, bench/bench_bottleneck.py): its loops were latency-bound. Register spills would add local-memory round
# trips to every loop step, so no build the launcher can pick (kernels/bottleneck_pack.py::_tiles, and every
# candidate the forward times on a GPU, ``_forward_candidates``) may spill.
_BOTTLENECK = _RESOURCES + textwrap.dedent(
    """
    import json, re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_fwd
    from adapter_engine.kernels.bottleneck_pack import (StackOptions, _flags, _forward_candidates,
                                                        _level_candidates, _tiles)

    name, hidden, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    save, uniform = sys.argv[4] == "1", sys.argv[5] == "1"
    forward = name == "_bottleneck_stack_fwd_kernel"
    kernel = getattr(bottleneck_fwd if forward else bottleneck_bwd, name)
    first = _tiles(rank, forward and not save)  # what the launcher picks first for 4096 rows
    path = 1 if uniform else 0  # one stack on every row: one unit-tile path; mixed rows: both, chosen per block
    flags = dict(_flags(StackOptions(), True))  # seq_bn after a post-LN sublayer (BERT, the benchmark)
    half = {"h", "y", "out", "wd", "bd", "wu", "bu", "lnw", "lnb", "rs", "rp", "x", "a"}  # bf16 model tensors
    ints = {"owner", "code", "off", "routes", "route"}
    # The launcher's specialisation for contiguous (M, H) activations, (Rt, H) down and H-contiguous up weights,
    # uniform routes: unit strides are compile-time 1, pointers and sizes divisible by 16.
    ones = {"stride_hh", "stride_yh", "stride_oh", "stride_wdh", "stride_wuh", "stride_buh", "stride_rtl",
            "stride_rph"}
    builds = []
    for tiles in (_forward_candidates(first, save) if forward else _level_candidates(first)):
        tiles = dict(tiles.launch())  # a copy: launch() returns a cached dict
        options = {k: tiles.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}
        if forward:
            constants = dict(flags, NUM_LEVELS=3, SAVE=save, TILE_PATH=path, DOT_FP32=False, PRECISION="ieee",
                             **tiles)
        else:
            constants = {k: flags[k] for k in ("PARALLEL", "IN_ADD_Y", "IN_LN", "RES_MODE")}
            constants.update(NEED_X=save, LN_GRAD=False, KEEP_DY=True, TILE_PATH=path, DOT_FP32=False,
                             PRECISION="ieee", **tiles)
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constants:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                base = arg[:-4]
                signature[arg] = "*bf16" if base in half else "*i32" if base in ints else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg == "eps":
                signature[arg] = "fp32"
            else:
                signature[arg] = "constexpr" if arg in ones else "i32"
                if arg not in ones:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        constexprs.update({(kernel.arg_names.index(k),): 1 for k in ones if k in kernel.arg_names})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        regs, stack, local = resources(compiled)
        ptx = compiled.asm["ptx"]
        builds.append({"regs": regs, "stack": stack, "local": local, "shared": compiled.metadata.shared,
                       "scalar_weight_loads": len(re.findall(r"ld\\.global\\.b16", ptx)),
                       "plain_vector_loads": len(re.findall(r"ld\\.global(\\.nc)?\\.v4", ptx)), **options, **tiles})
    print(json.dumps(builds))
    """
)


def _bottleneck_builds(kernel: str, hidden: int, rank: int, save: bool, uniform: bool = True) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = [sys.executable, "-c", _BOTTLENECK, kernel, str(hidden), str(rank), str(int(save)), str(int(uniform))]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kernel, save, uniform",
    [("_bottleneck_stack_fwd_kernel", False, True), ("_bottleneck_stack_fwd_kernel", True, True),
     ("_bottleneck_stack_fwd_kernel", False, False), ("_bottleneck_level_bwd_kernel", True, True),
     ("_bottleneck_level_bwd_kernel", True, False)],
    ids=["forward", "forward-saving", "forward-mixed-rows", "level-backward", "level-backward-mixed-rows"],
)  # fmt: skip
def test_bottleneck_kernels_do_not_spill_registers_at_hidden_4096(kernel, save, uniform):
    """Hidden 4096, rank 256 (reduction 16), a stack of 3 with the model LN: the Llama-shaped benchmark case."""
    for build in _bottleneck_builds(kernel, 4096, 256, save, uniform):
        assert build["stack"] == 0 and build["local"] == 0, build  # STACK holds the spill slots
        assert build["regs"] <= 255 and build["shared"] <= 227 * 1024, build
        # Weight and activation tiles stream as 16-byte vectors (an unaligned unit axis once made every Wu element
        # a 2-byte load); the only 2-byte loads left are the down bias, one (BLOCK_R,) vector per level and path.
        assert build["scalar_weight_loads"] <= 3 * (1 if uniform else 2), build


@pytest.mark.parametrize(
    "kernel, save, uniform",
    [("_bottleneck_stack_fwd_kernel", False, True), ("_bottleneck_stack_fwd_kernel", True, True),
     ("_bottleneck_level_bwd_kernel", True, True), ("_bottleneck_level_bwd_kernel", True, False)],
    ids=["forward", "forward-saving", "level-backward", "level-backward-mixed-rows"],
)  # fmt: skip
def test_bottleneck_candidates_at_hidden_768(kernel, save, uniform):
    """Hidden 768, rank 48, a stack of 3 (the BERT-base case): every candidate tile the GPU times builds without
    spills, and for one stack the hidden loops are software-pipelined (LOOP_STAGES): every load of a row tile is a
    cp.async issued a step ahead, none a plain load that the loop step waits on (the kernels were latency bound at
    this width)."""
    builds = _bottleneck_builds(kernel, 768, 48, save, uniform)
    assert len(builds) > 1  # timed on the GPU
    for build in builds:
        assert build["stack"] == 0 and build["local"] == 0, build
        assert build["regs"] <= 255 and build["shared"] <= 227 * 1024, build
        if uniform:
            assert build["plain_vector_loads"] == 0, build


# ------------------------------------------------------------------------------------------ segmented LoRA expand
# lora_linear(path="segmented") adds each row's own u B_a^T in the expand kernel (kernels/lora_segmented.py). Read
# from a row-major B_cat (N, R), its B_a^T tile (BLOCK_R, BLOCK_N) runs along the rank axis, masked per adapter and
# starting at an unaligned offset r0: the sm_90 build loaded it 2 bytes at a time (16 loads per thread at rank tile
# 16, 64 at 64). These compile the expand with the strides and alignment the forward actually hands it.
_EXPAND = _RESOURCES + textwrap.dedent(
    """
    import json, re, sys
    from collections import Counter
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels import lora_segmented as ls

    spec = json.loads(sys.argv[1])  # argument name -> ["ptr", dtype, aligned] | ["int", value] | ["const", value]
    fn, tiles = getattr(ls, spec.pop("kernel", ["const", "_lora_segmented_expand_kernel"])[1]), ls.TILES
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):  # what Triton's launcher specialises: 1 is constant, multiples of 16
        kind, *rest = spec[name]
        if kind == "ptr":
            sig[name] = "*" + rest[0]
            if rest[1]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int" and rest[0] == 1:
            sig[name], constexprs[(i,)] = "constexpr", 1
        elif kind == "int":
            sig[name] = "i32"
            if rest[0] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name], constexprs[(i,)] = "constexpr", rest[0]
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    regs, stack, local = resources(compiled)
    mem = Counter(re.findall(r"(?:ld|st)\\.global[.\\w]*", compiled.asm["ptx"]))
    print(json.dumps({"regs": regs, "stack": stack, "local": local, "mem": mem}))
    """
)


def _expand_launch_specs(ranks: list[int], monkeypatch) -> dict[str, dict]:
    """The expand kernel's arguments as each forward entry of ``lora_linear(path="segmented")`` launches it (bf16,
    a 48-wide layer), recorded instead of launched; the GPU's tiles replace the interpreter's."""
    import importlib

    import torch

    from adapter_engine.kernels import lora_linear, lora_segmented
    from adapter_engine.kernels._backend import use_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not use_triton(torch.empty(0, device=dev)):
        pytest.skip("the segmented launchers run their torch twins here (CPU without the Triton interpreter)")
    ll = importlib.import_module("adapter_engine.kernels.lora_linear")  # the package attribute is the function
    kernel, calls = lora_segmented._lora_segmented_expand_kernel, []

    class Recorder:  # kernel[grid](*args, **meta): keep the arguments, launch nothing
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((dict(zip(kernel.arg_names, args)), meta))

    M, K, N, dt = 8, 32, 48, torch.bfloat16
    x, w = torch.randn(M, K, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt)
    As = [torch.randn(r, K, device=dev, dtype=dt) for r in ranks]
    Bs = [torch.randn(N, r, device=dev, dtype=dt) for r in ranks]
    scales, ids = [1.0] * len(ranks), torch.arange(M, device=dev) % len(ranks)
    monkeypatch.setattr(lora_segmented, "_lora_segmented_expand_kernel", Recorder())  # where lora_expand_ looks
    monkeypatch.setattr(lora_segmented, "_RECORDED", {})  # (launches planned before would launch the kernel)
    entries = {
        "inference": lambda: lora_linear(x, w, As, Bs, scales, adapter_ids=ids, path="segmented"),
        "training": lambda: lora_linear(
            x, w, [a.requires_grad_() for a in As], [b.requires_grad_() for b in Bs], scales, adapter_ids=ids,
            path="segmented"),
        "torch.compile op": lambda: ll._lora_linear_op(x, None, w, None, ids.int(), As, Bs, scales, "segmented"),
    }  # fmt: skip
    specs = {}
    for name, run in entries.items():
        calls.clear()
        with torch.no_grad() if name == "inference" else torch.enable_grad():
            run()
        ((args, meta),) = calls
        spec = {arg: ["const", v] for arg, v in meta.items()}  # the launcher passes constexprs by keyword
        for arg, v in args.items():
            if isinstance(v, torch.Tensor):
                dtype = {torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}[v.dtype]
                spec[arg] = ["ptr", dtype, v.data_ptr() % 16 == 0]
            else:
                spec[arg] = ["int", v]
        tiles = lora_segmented.TILES  # a 4096-row call on the GPU
        spec.update(BLOCK_M=["const", tiles.expand_block_m(4096)], BLOCK_N=["const", tiles.expand_block_n],
                    DOT_FP32=["const", False], INPUT_PRECISION=["const", "tf32"])  # fmt: skip
        specs[name] = spec
    return specs


@pytest.mark.parametrize("ranks", [[8, 16, 8], [64, 8, 40, 16]], ids=["rank-tile-16", "rank-tile-64"])
def test_segmented_expand_loads_the_B_tile_with_16_byte_vectors(ranks, monkeypatch):
    """The forward's expand (inference, training and the custom op) reads B_a^T as 16-byte vectors along N: per
    thread, the y tile and the B tile each come in as v4.b32 loads, and no tile loads 2 bytes at a time (the u tile
    is read in whole rows, which the shrink zero-fills past each rank: a rank mask would make it 2-byte loads). No
    spills."""
    from adapter_engine.kernels.lora_segmented import TILES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    per_thread = lambda rows, cols: rows * cols // (32 * TILES.num_warps)  # bf16 elements a thread loads of a tile
    builds = {}
    for entry, spec in _expand_launch_specs(ranks, monkeypatch).items():
        key = json.dumps(spec, sort_keys=True)
        if key not in builds:
            out = subprocess.run([sys.executable, "-c", _EXPAND, key], capture_output=True, text=True, env=env,
                                 timeout=300)  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
            builds[key] = json.loads(out.stdout.strip().splitlines()[-1])
        build, c = builds[key], {k: v[1] for k, v in spec.items() if v[0] == "const"}
        b_tile, y_tile = per_thread(c["BLOCK_R"], c["BLOCK_N"]), per_thread(c["BLOCK_M"], c["BLOCK_N"])
        mem, where = build["mem"], (entry, c["BLOCK_R"], build)
        assert mem.get("ld.global.v4.b32", 0) >= (b_tile + y_tile) // 8, where  # 8 bf16 per 16-byte load
        assert not any(op.endswith((".b16", ".b8")) for op in mem if op.startswith("ld.global")), where
        assert build["stack"] == 0 and build["local"] == 0, where


@pytest.mark.parametrize("rank_tile", [16, 64])
def test_segmented_weight_gradient_reads_whole_rows_of_u(rank_tile):
    """The weight-gradient kernel (dA and dB of a mixed batch) reads u / du in whole zero-filled rows, so no tile
    loads 2 bytes at a time (its rank mask used to make every u load scalar), at the launcher's GPU tiles. No
    spills. The specialisation: bf16, 4096 rows, 4096 columns, contiguous operands (as lora_wgrad launches it)."""
    from adapter_engine.kernels.lora_segmented import TILES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    ptr = lambda dtype: ["ptr", dtype, True]  # noqa: E731
    spec = {
        "kernel": ["const", "_lora_segmented_wgrad_kernel"],
        "p_ptr": ptr("bf16"), "q_ptr": ptr("bf16"), "order_ptr": ptr("i64"), "starts_ptr": ptr("i32"),
        "rank_off_ptr": ptr("i32"), "out_ptr": ptr("bf16"), "J": ["int", 4096],
        "stride_pm": ["int", rank_tile], "stride_pr": ["int", 1], "stride_qm": ["int", 4096], "stride_qj": ["int", 1],
        "stride_or": ["int", 4096], "stride_oj": ["int", 1],
        "BLOCK_M": ["const", TILES.wgrad_block_m], "BLOCK_J": ["const", TILES.wgrad_block_j],
        "BLOCK_R": ["const", rank_tile], "DOT_FP32": ["const", False], "INPUT_PRECISION": ["const", "tf32"],
    }  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _EXPAND, json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    build = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(op.endswith((".b16", ".b8")) for op in build["mem"] if op.startswith("ld.global")), build
    assert build["stack"] == 0 and build["local"] == 0, build


# --------------------------------------------------------------------------------- persistent LoRA kernel (TMA)
# lora_linear's path="persistent" only pays if its main loop is Hopper-grade: wgmma fed by TMA copies, several
# wgmma groups in flight (the K loop software-pipelined), and no spills. Every tile the large-M timing may pick
# (kernels/lora_linear_tma.py::tma_candidates), the shrink fused or not, bf16, with the launcher's specialisation
# (divisible sizes and strides, unit inner strides): one adapter of rank 16, and a mixed batch of 4 (rank tile 64).
_LORA_TMA = _RESOURCES + textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels.lora_linear_tma import _lora_linear_tma_fwd_kernel as kernel, tma_candidates

    k_major, block_r, has_ids = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3] == "1"
    rows = sys.argv[4] == "1"  # each row's own adapter in the epilogue (u by row; a mixed batch's serving)
    ones = ("stride_br", "stride_uir", "stride_yn", "stride_uor")
    builds = []
    cases = ([(t, False) for t in tma_candidates(False, block_r, rows=256)] if rows else
             [(t, s) for t in tma_candidates(True, block_r, rows=256) for s in (True, False)])
    for tiles, store_u in cases:
        bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
        constants = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=tiles.group_m, NUM_SMS=132,
                         W_K_MAJOR=k_major, FUSE_SHRINK=tiles.fuse_shrink, HAS_BIAS=False, HAS_IDS=has_ids,
                         STORE_U=store_u, DOT_FP32=False, Y_TMA=True, SPLIT_K=tiles.split_k, ROW_ADAPTERS=rows)
        descs = {"x_desc": [bm, bk], "w_desc": [bn, bk] if k_major else [bk, bn], "a_desc": [block_r, bk],
                 "y_desc": [bm, bn // 2]}
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constants or arg in ones:
                signature[arg] = "constexpr"
            elif arg in descs:
                signature[arg] = "tensordesc<bf16[%d, %d]>" % tuple(descs[arg])
            else:
                ints, fp32 = ("ids_ptr", "rank_adapter_ptr", "rank_off_ptr", "count_ptr"), ("rank_scale_ptr", "ws_ptr")
                signature[arg] = ("*i32" if arg in ints else "*fp32" if arg in fp32 else "*bf16"
                                  if arg.endswith("_ptr") else "i32")
                attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = {(kernel.arg_names.index(n),): v for n, v in constants.items()}
        constexprs.update({(kernel.arg_names.index(n),): 1 for n in ones})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        regs, stack, local = resources(compiled)
        ptx = compiled.asm["ptx"]
        waits = [int(n) for n in re.findall(r"wgmma\\.wait_group\\.sync\\.aligned\\s+(\\d+)", ptx)]
        builds.append({"tiles": list(tiles), "regs": regs, "stack": stack, "local": local,
                       "shared": compiled.metadata.shared, "wgmma": len(re.findall(r"wgmma\\.mma_async", ptx)),
                       "mma_sync": len(re.findall(r"\\bmma\\.sync", ptx)),
                       "tma_loads": len(re.findall(r"cp\\.async\\.bulk\\.tensor", ptx)),
                       "max_wgmma_in_flight": max(waits, default=-1), "store_u": store_u,
                       "serialized": wgmma_serialized(compiled)})
    print(json.dumps(builds))
    """
)


@pytest.mark.parametrize(
    "block_r, has_ids, rows",
    [(16, False, False), (64, True, False), (16, True, True)],
    ids=["one-adapter", "mixed-4-adapters", "mixed-row-adapters"],
)
@pytest.mark.parametrize("k_major", [True, False], ids=["weight-as-stored", "weight-transposed"])
def test_persistent_lora_kernel_builds_wgmma_fed_by_tma_without_spills(k_major, block_r, has_ids, rows):
    """``weight-transposed``: the Conv1D layout and the backward's dx = dy W (W read as (K, N) tiles).
    ``mixed-row-adapters``: a mixed batch's serving, each row's own adapter in the epilogue (its loop over the
    adapters of a tile must not cost the K loop its pipeline)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", _LORA_TMA, str(int(k_major)), str(block_r), str(int(has_ids)), str(int(rows))]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    builds = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(builds) == (5 if rows else 20 if block_r == 16 else 8)  # (64-row tiles of small M, split-K at 16)
    assert {b["tiles"][-1] for b in builds} == ({1, 2} if block_r == 16 else {1})  # (split_k, last)
    for build in builds:
        assert not build["serialized"], build  # ptxas kept the K loop's wgmma pipeline (no C7515)
        assert build["wgmma"] > 0 and build["mma_sync"] == 0, build
        assert build["tma_loads"] > 0, build  # x and W (and A_cat when fused) arrive by TMA
        assert build["max_wgmma_in_flight"] >= 1, build  # the next K step's wgmma issued before this one retires
        assert build["stack"] == 0 and build["local"] == 0, build
        assert build["regs"] <= 255 and build["shared"] <= 227 * 1024, build


# ------------------------------------------------------------------------------------ tiled LoRA kernel (wgmma)
# lora_linear's "fused" and "epilogue" paths (kernels/lora_linear_tiled.py::_lora_linear_fwd_kernel) at every tile the
# autotuner may pick for 16 and 256 rows (``_gpu_configs`` pruned by ``_prune_configs``), N = K = 4096, bf16, the
# launcher's specialisation (contiguous operands). From 64-row tiles up the K loop is wgmma, pipelined one group
# deep; ptxas may still serialize it (info C7515: each HGMMA then waits for 0). A K loop that may run zero times did
# that in triton 3.6 (acc's zeros set on the edge that skips it, after the loop's last wgmma, before its wait).
_LORA_TILED = _RESOURCES + textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels.lora_linear_tiled import _gpu_configs, _lora_linear_fwd_kernel as kernel, _prune_configs

    block_r, has_ids, fuse = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
    rows = sys.argv[4] == "1"  # each row's own adapter in the epilogue (u by row; a mixed batch's serving)
    dtype = sys.argv[5]  # of x, W, A_cat, B_cat and y: bf16 (tensor cores) or fp32 (IEEE dots: FMA)
    precision = "ieee" if dtype == "fp32" else "tf32"
    N = K = 4096
    ptrs = {"ids_ptr": "*i32", "rank_adapter_ptr": "*i32", "rank_scale_ptr": "*fp32", "rank_off_ptr": "*i32",
            "ws_ptr": "*fp32", "count_ptr": "*i32"}  # the rest: *bf16 or *fp32
    builds = []
    row_counts = (16, 64, 256) if dtype == "fp32" else (16, 256)
    for m, store_u in [(m, s) for m in row_counts for s in ((False,) if rows else (True, False))]:
        named = {"M_BUCKET": m, "BLOCK_R": block_r, "FUSE_SHRINK": fuse, "INPUT_PRECISION": precision}
        for c in _prune_configs(_gpu_configs(), named):
            ints = {"M": m, "N": N, "K": K, "R": block_r, "M_BUCKET": m, "stride_xm": K, "stride_wn": K,
                    "stride_ar": K, "stride_bn": block_r, "stride_uim": N if fuse else block_r, "stride_ym": N,
                    "stride_uom": block_r if store_u else N}  # the other strides (unit ones) are 1
            constants = dict(c.kwargs, BLOCK_R=block_r, FUSE_SHRINK=fuse, HAS_BIAS=False, HAS_IDS=has_ids,
                             STORE_U=store_u, DOT_FP32=False, INPUT_PRECISION=precision, EVEN_K=True,
                             ROW_ADAPTERS=rows)
            signature, constexprs, attrs = {}, {}, {}
            for i, arg in enumerate(kernel.arg_names):
                if arg in constants or (arg.startswith("stride_") and arg not in ints):
                    signature[arg], constexprs[(i,)] = "constexpr", constants.get(arg, 1)
                else:
                    signature[arg] = ptrs.get(arg, "*" + dtype) if arg.endswith("_ptr") else "i32"
                    attrs[(i,)] = [["tt.divisibility", 16]]
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            options = {"num_warps": c.num_warps, "num_stages": c.num_stages}
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            regs, stack, local = resources(compiled)
            ptx = compiled.asm["ptx"]
            builds.append({"m": m, "store_u": store_u, "tiles": [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                           c.kwargs["BLOCK_K"], c.num_warps, c.num_stages], "regs": regs, "stack": stack,
                           "local": local, "shared": compiled.metadata.shared,
                           "wgmma": len(re.findall(r"wgmma\\.mma_async", ptx)),
                           "serialized": wgmma_serialized(compiled), "split_k": c.kwargs["SPLIT_K"],
                           "acq_rel_atomics": len(re.findall(r"atom\\.global\\.gpu\\.acq_rel\\.add", ptx)),
                           "partial_loads": len(re.findall(r"ld\\.global\\.cg\\.v4", ptx)),
                           "barriers": len(re.findall(r"bar\\.sync", ptx))})
    print(json.dumps(builds))
    """
)


@functools.cache
def _tiled_builds(block_r: int, has_ids: bool, fuse: bool, rows: bool = False, dtype: str = "bf16") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", _LORA_TILED, str(block_r), str(int(has_ids)), str(int(fuse)), str(int(rows)), dtype]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "block_r, has_ids, fuse, rows",
    [(16, False, True, False), (16, False, False, False), (64, True, True, False), (64, True, False, False),
     (16, True, False, True)],
    ids=["one-adapter-fused", "one-adapter-epilogue", "mixed-4-fused", "mixed-4-epilogue", "mixed-row-adapters"],
)  # fmt: skip
def test_tiled_lora_kernel_keeps_its_wgmma_pipeline(block_r, has_ids, fuse, rows):
    """No build of the tiled kernel is serialized by ptxas (C7515), with or without storing u, nor with each row's
    own adapter in the epilogue (its loop over the adapters of a tile)."""
    builds = _tiled_builds(block_r, has_ids, fuse, rows)
    assert any(b["wgmma"] > 0 for b in builds) and len(builds) >= (4 if rows else 8), builds  # (256 rows: wgmma)
    for build in builds:
        assert not build["serialized"], build
        assert not rows or build["stack"] == 0, build  # (the adapters' loop spills nothing)


@pytest.mark.parametrize(
    "block_r, has_ids, fuse, rows",
    [(16, False, True, False), (64, True, False, False), (16, True, False, True)],
    ids=["one-adapter-fused", "mixed-4-epilogue", "mixed-row-adapters"],
)  # fmt: skip
def test_fp32_tiled_builds_neither_spill_nor_overflow_shared_memory(block_r, has_ids, fuse, rows):
    """fp32 operands (IEEE dots: FMA, no tensor cores) take their own tiles (``_gpu_configs(fp32=True)``): built for
    every regime the autotuner may time (16, 64 and 256 rows), none spills and each fits the H100's shared memory.
    The 16-bit tiles, which fp32 took before, spilled up to 8 KB per thread and three needed over 227 KB."""
    builds = _tiled_builds(block_r, has_ids, fuse, rows, "fp32")
    assert {b["m"] for b in builds} == {16, 64, 256} and len(builds) >= (8 if rows else 16), builds
    for build in builds:
        assert build["stack"] == 0 and build["local"] == 0, build
        assert build["regs"] <= 255 and build["shared"] <= 227 * 1024, build


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "epilogue"])
@pytest.mark.parametrize("block_r, has_ids", [(16, False), (64, True)], ids=["one-adapter", "mixed-4-adapters"])
def test_split_k_builds_reduce_through_one_acquire_release_counter(block_r, has_ids, fuse):
    """The small-M split-K tiles: one gpu-scope acquire-release atomic per program (the tile's counter), the
    partial sums read back past L1 as 16-byte loads, no register spills, and the reduction does not move each
    partial sum into the MMA layout (with an unrolled loop triton 3.6 did: 96 barriers where 16-22 do)."""
    split = [b for b in _tiled_builds(block_r, has_ids, fuse) if b["split_k"] > 1]
    assert len(split) >= 2, split  # 16 rows: 8 and 4 slices
    unsplit = {tuple(b["tiles"]): b["barriers"] for b in _tiled_builds(block_r, has_ids, fuse) if b["split_k"] == 1}
    for build in split:
        assert build["acq_rel_atomics"] == 1 and build["partial_loads"] > 0, build
        assert build["stack"] == 0, build
        assert build["barriers"] <= 3 * max(unsplit.values()), (build, unsplit)


# ------------------------------------------------------------------------------------------------ add_layer_norm
# The row kernels of the level path (kernels/add_layer_norm.py, kernels/level_boundary.py), built for sm_90 with
# bf16 tensors (fp32 LN weight and bias), 16-byte aligned pointers and sizes, M unaligned, unit inner strides.
_ROW_KERNEL = _RESOURCES + textwrap.dedent(
    """
    import json, re, sys
    from collections import Counter
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(kernel, constants, unit_strides, num_warps):
        fp32 = {"w_ptr", "bias_ptr", "stats_ptr"}
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constants or arg in unit_strides:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*fp32" if arg in fp32 else "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if arg == "eps" else "i32"
                if arg not in ("eps", "M"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = {(kernel.arg_names.index(n),): v for n, v in constants.items()}
        constexprs.update({(kernel.arg_names.index(n),): 1 for n in unit_strides})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        regs, stack, local = resources(compiled)
        ptx = compiled.asm["ptx"]
        ops = Counter(re.findall(r"(?:ld|st)\\.global[.\\w]*", ptx))
        mma = len(re.findall(r"\\b(?:wgmma|mma)\\.", ptx))
        print(json.dumps({"regs": regs, "stack": stack, "local": local, "ops": ops, "mma": mma}))
    """
)


def _row_kernel_build(script: str, *argv) -> dict:
    """Run ``_ROW_KERNEL`` + ``script`` (which calls ``build``) in a fresh interpreter-free process: its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", _ROW_KERNEL + textwrap.dedent(script), *map(str, argv)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# A bandwidth-bound row kernel (kernels/add_layer_norm.py): every access must be a 16-byte vector, with the whole
# row held in registers and none spilled, at BERT-base's and a Llama-shaped hidden size, bf16, as the launcher tiles.
_ADD_LN = """
    from adapter_engine.kernels.add_layer_norm import _add_layer_norm_fwd_kernel as kernel, _tile

    hidden, save, has_c = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
    rows, block_h, warps = _tile(hidden)
    constants = dict(HAS_C=has_c, WRITE_SUM=not has_c, SAVE_STATS=save, ROWS=rows, BLOCK_H=block_h)
    build(kernel, constants, ("stride_ah", "stride_bh", "stride_ch", "stride_w", "stride_bias"), warps)
"""


@pytest.mark.parametrize("save, has_c", [(False, False), (True, False), (False, True)],
                         ids=["inference", "saving-stats", "three-operands"])  # fmt: skip
@pytest.mark.parametrize("hidden", [768, 4096])
def test_add_layer_norm_moves_rows_as_16_byte_vectors_without_spills(hidden, save, has_c):
    build = _row_kernel_build(_ADD_LN, hidden, int(save), int(has_c))
    assert build["stack"] == 0 and build["local"] == 0, build
    # rows of a, b, s and x and the fp32 LN weight and bias: 16-byte vectors only; the stats: one fp32 per row
    # (768, bf16: {"ld.global.v4.b32": 12, "st.global.v4.b32": 8} at 62 registers, triton 3.9)
    ops = build["ops"]
    assert ops.get("ld.global.v4.b32", 0) > 0 and ops.get("st.global.v4.b32", 0) > 0, ops
    assert set(ops) <= {"ld.global.v4.b32", "st.global.v4.b32"} | ({"st.global.b32"} if save else set()), ops


# kernels/level_boundary.py: a level's up GEMM on the tensor cores with the LayerNorm of whole rows after it and the
# next level's down GEMM on the tensor cores over slices of the stored carry; the (16, BLOCK_H) fp32 accumulator must
# stay in registers at BERT-base's hidden size and the largest it takes, bf16, as the launcher sets it up, for each
# boundary (start: h + y and the first down projection; between two levels; end: the output LayerNorm).
_LEVEL_BOUNDARY = """
    from adapter_engine.kernels.level_boundary import _level_boundary_kernel as kernel, _tiles

    hidden, width, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    tiles = _tiles(hidden, width)
    warps = tiles.pop("num_warps")
    constants = dict(HAS_Y=mode == "start", HAS_UP=mode != "start", WRITE_S=mode != "end", DOWN=mode != "end",
                     ACT=1, DOT_FP32=False, INPUT_PRECISION="tf32", **tiles)
    build(kernel, constants, ("stride_ch", "stride_yh", "stride_ak", "stride_uh", "stride_sh", "stride_dh",
                              "stride_w", "stride_bias", "stride_db"), warps)
"""


@pytest.mark.parametrize("mode", ["start", "between", "end"])
@pytest.mark.parametrize("hidden, width", [(768, 56), (1024, 136)])
def test_level_boundary_keeps_its_rows_in_registers_on_the_tensor_cores(hidden, width, mode):
    build = _row_kernel_build(_LEVEL_BOUNDARY, hidden, width, mode)
    assert build["stack"] == 0 and build["local"] == 0, build
    assert build["mma"] > 0, build
