"""What the GPU compiler makes of the kernels, checked without a GPU: Triton compiles to PTX for an H100 (sm_90)
with the ptxas it ships. The first H100 run found the grouped merge kernel at 6.7% of the bandwidth floor because
its weight loads were scalar (bench/results/2026-11-26-h100-session1/NOTES.md); this keeps them vectorised."""

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

    aligned, uniform = sys.argv[1] == "1", sys.argv[2] == "1"
    signature = {
        "table": "*i64", "bad_ptr": "*i32", "n_rows": "i32", "n_cols": "i32",
        "adapter_offset": "i32", "scale_offset": "i32", "sign": "fp32", "stride_n": "i32", "stride_k": "i32",
    }
    constants = {
        "W_DTYPE": tl.bfloat16, "F_DTYPE": tl.bfloat16, "F_BYTES": 2, "W_ALIGNED": aligned, "F_ALIGNED": aligned,
        "UNIFORM_SCALE": uniform, "CHECK_ONLY": False, "DOT_FP32": False, "DOT_PRECISION": "ieee",
        "MAX_ADAPTERS": 4, "BLOCK_R": 64, "BLOCK_N": LARGE_RANK_TILES[0],
        "BLOCK_K": LARGE_RANK_TILES[1], "ROW_TILES": LARGE_RANK_TILES[2], "PREFETCH_W": LARGE_RANK_TILES[4],
    }
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    constexprs[(names.index("stride_k"),)] = 1  # the launcher's specialisation of a unit stride
    # What Triton's launcher infers for a 4096 x 4096 bf16 weight: aligned table, sizes divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("table", "n_rows", "n_cols", "stride_n")}
    source = ASTSource(fn=_merge_lora_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(json.dumps(Counter(re.findall(r"(?:ld|st)\\.global[.\\w]*", compiled.asm["ptx"]))))
    """
)


def _ptx_memory_ops(aligned: bool, uniform: bool = True) -> Counter:
    """Global loads and stores in the kernel's PTX for an H100 (compiled in a process without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = [sys.executable, "-c", _COMPILE, "1" if aligned else "0", "1" if uniform else "0"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return Counter(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("uniform", [True, False], ids=["one-scale", "per-adapter-scales"])
def test_merge_kernel_streams_the_weight_with_16_byte_vectors(uniform):
    ops = _ptx_memory_ops(aligned=True, uniform=uniform)
    assert ops["st.global.v4.b32"] > 0 and not any(op.startswith("st.global") and "v4" not in op for op in ops), ops
    assert ops["ld.global.v4.b32"] >= ops["st.global.v4.b32"], ops  # the weight tile comes in as it goes out
    # B_cat's rows too (as 16-byte loads or cp.async copies): with four r=16 adapters they were 2-byte scalar
    # loads, 32 per thread and row tile against the W tile's 8, until the rank mask got its multiple_of hint
    assert not any(op.startswith("ld.global") and op.endswith(("b16", "b8")) for op in ops), ops


def test_unaligned_launches_fall_back_to_scalar_accesses():
    # The generic path (weights with odd strides or offsets) is correct but scalar: that is why ALIGNED exists.
    ops = _ptx_memory_ops(aligned=False)
    assert ops["st.global.b16"] > 0 and ops["st.global.v4.b32"] == 0, ops


# ---------------------------------------------------------------------------------------- bottleneck stack kernels
# The fused bottleneck stack ran 4.6x slower than eager PyTorch at hidden 4096 on the first H100 run (2.77 ms vs
# 0.61 ms, bench/bench_bottleneck.py): its loops were latency-bound. Register spills would add local-memory round
# trips to every loop step, so the builds the launcher picks (kernels/bottleneck_pack.py::_tiles) must not spill.
_BOTTLENECK = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adapter_engine.kernels import bottleneck_bwd, bottleneck_fwd
    from adapter_engine.kernels.bottleneck_pack import StackOptions, _flags, _tiles

    name, hidden, rank, save = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    forward = name == "_bottleneck_stack_fwd_kernel"
    kernel = getattr(bottleneck_fwd if forward else bottleneck_bwd, name)
    tiles = _tiles(rank, forward and not save).launch()  # what the launcher picks for 4096 rows
    options = {k: tiles.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}
    flags = dict(_flags(StackOptions(), True))  # seq_bn after a post-LN sublayer (BERT, the benchmark)
    half = {"h", "y", "out", "wd", "bd", "wu", "bu", "lnw", "lnb", "rs", "rp", "x", "a"}  # bf16 model tensors
    ints = {"owner", "code", "off", "routes", "route"}
    if forward:
        constants = dict(flags, NUM_LEVELS=3, SAVE=save, DOT_FP32=False, PRECISION="ieee", **tiles)
    else:
        constants = {k: flags[k] for k in ("PARALLEL", "IN_ADD_Y", "IN_LN", "RES_MODE")}
        constants.update(NEED_X=save, LN_GRAD=False, DOT_FP32=False, PRECISION="ieee", **tiles)
    # The launcher's specialisation for contiguous (M, H) activations, (Rt, H) down and H-contiguous up weights,
    # uniform routes: unit strides are compile-time 1, pointers and sizes divisible by 16.
    ones = {"stride_hh", "stride_yh", "stride_oh", "stride_wdh", "stride_wuh", "stride_buh", "stride_rtl",
            "stride_rph"}
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
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack, local = (int(re.search(key + r":(\\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
    ptx = compiled.asm["ptx"]
    print(json.dumps({"regs": regs, "stack": stack, "local": local, "shared": compiled.metadata.shared,
                      "scalar_weight_loads": len(re.findall(r"ld\\.global\\.b16", ptx)), **tiles}))
    """
)


def _bottleneck_build(kernel: str, hidden: int, rank: int, save: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = [sys.executable, "-c", _BOTTLENECK, kernel, str(hidden), str(rank), "1" if save else "0"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kernel, save",
    [("_bottleneck_stack_fwd_kernel", False), ("_bottleneck_stack_fwd_kernel", True),
     ("_bottleneck_level_bwd_kernel", True)],
    ids=["forward", "forward-saving", "level-backward"],
)  # fmt: skip
def test_bottleneck_kernels_do_not_spill_registers_at_hidden_4096(kernel, save):
    """Hidden 4096, rank 256 (reduction 16), a stack of 3 with the model LN: the Llama-shaped benchmark case."""
    build = _bottleneck_build(kernel, 4096, 256, save)
    assert build["stack"] == 0 and build["local"] == 0, build  # STACK holds the spill slots
    assert build["regs"] <= 255 and build["shared"] <= 227 * 1024, build
    # Weight and activation tiles stream as 16-byte vectors (an unaligned unit axis once made every Wu element a
    # 2-byte load); the only 2-byte loads left are the down bias, one (BLOCK_R,) vector per level.
    assert build["scalar_weight_loads"] <= 3, build
