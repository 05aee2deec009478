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
        "BLOCK_K": LARGE_RANK_TILES[1], "ROW_TILES": LARGE_RANK_TILES[2],
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


def test_unaligned_launches_fall_back_to_scalar_accesses():
    # The generic path (weights with odd strides or offsets) is correct but scalar: that is why ALIGNED exists.
    ops = _ptx_memory_ops(aligned=False)
    assert ops["st.global.b16"] > 0 and ops["st.global.v4.b32"] == 0, ops
