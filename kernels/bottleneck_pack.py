"""Inputs of the fused bottleneck stack kernels: activation codes, the structural options (:class:`StackOptions`),
the adapters packed along the bottleneck axis (:func:`pack_adapters`) and each launch's configuration (tiles from
the ranks, compile-time switches, dot operand mode). Design notes: the docstring of ``kernels/bottleneck.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import INTERPRET, check_float_dtype, device_lru_cache, dot_in_fp32, next_pow2

# Activation names (AdapterHub ``non_linearity``, transformers ACT2FN names) -> kernel codes.
ACTIVATIONS = {
    "identity": 0, "linear": 0, "none": 0,
    "relu": 1,
    "gelu": 2, "gelu_python": 2,  # erf form (transformers GELUActivation)
    # tanh form (NewGELUActivation); transformers' other names for it compute the same formula in another order
    "gelu_new": 3, "gelu_pytorch_tanh": 3, "gelu_fast": 3, "gelu_accurate": 3, "gelu_python_tanh": 3,
    "swish": 4, "silu": 4,
    "tanh": 5,
}  # fmt: skip


# The kernel codes' activations in Triton (the stack kernels, kernels/level_boundary.py).
@triton.jit
def _tanh(x):
    # tanh via exp (libdevice tanh fails in the interpreter); exp of a non-positive number never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _activation(z, code):
    """Per-unit activation of the fp32 tile ``z`` (BLOCK_M, BLOCK_R); ``code`` (1, BLOCK_R) from ACTIVATIONS."""
    out = z
    out = tl.where(code == 1, tl.maximum(z, 0.0), out)
    out = tl.where(code == 2, 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), out)
    out = tl.where(code == 3, 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))), out)
    out = tl.where(code == 4, z * tl.sigmoid(z), out)
    out = tl.where(code == 5, _tanh(z), out)
    return out


# The kernel codes' activations in torch (the reference twin and the backward's weight gradients).
_TORCH_ACTS = {
    0: lambda z: z,
    1: torch.relu,
    2: F.gelu,
    3: lambda z: F.gelu(z, approximate="tanh"),
    4: F.silu,
    5: torch.tanh,
}


def _gelu_tanh_grad(z):
    th = torch.tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)


# Their derivatives in torch (the cuBLAS level backward; twins of bottleneck_bwd._activation_grad, relu' = 1 where
# z > 0 as torch's autograd).
_TORCH_ACT_GRADS = {
    0: torch.ones_like,
    1: lambda z: (z > 0).to(z.dtype),
    2: lambda z: 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327,
    3: _gelu_tanh_grad,
    4: lambda z: torch.sigmoid(z) * (1.0 + z * (1.0 - torch.sigmoid(z))),
    5: lambda z: 1.0 - torch.tanh(z) ** 2,
}


@dataclass(frozen=True)
class StackOptions:
    """Structural options shared by every adapter of one launch (AdapterHub ``BnConfig`` field names)."""

    is_parallel: bool = False
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True  # True | False | "post_add"
    adapter_residual_before_ln: bool = False
    ln_before: bool = False  # the adapter's own LayerNorm on its input (torch path only)
    ln_after: bool = False  # the adapter's own LayerNorm on its output (torch path only)
    eps: float = 1e-12  # the model LayerNorm's eps
    adapter_ln_eps: float = 1e-5  # nn.LayerNorm default, as AdapterHub builds its own LNs

    def __post_init__(self):
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")


class PackedStack(NamedTuple):
    """All adapters of one launch packed along the bottleneck axis (Rt = sum of ranks, A = adapters)."""

    wd: torch.Tensor  # (Rt, H) down weights
    bd: torch.Tensor  # (Rt,) down biases
    wu: torch.Tensor  # (H, Rt) up weights, stored H-contiguous (an (Rt, H) buffer, transposed)
    bu: torch.Tensor  # (A, H) up biases
    unit_owner: torch.Tensor  # (Rt,) int32 adapter index of each unit
    unit_act: torch.Tensor  # (Rt,) int32 activation code of each unit
    scale: torch.Tensor  # (A,) fp32 scaling of each adapter
    offsets: torch.Tensor  # (A+1,) int32 first unit of each adapter
    lnb_w: torch.Tensor | None = None  # (A, H) own ln_before weights
    lnb_b: torch.Tensor | None = None
    lna_w: torch.Tensor | None = None  # (A, H) own ln_after weights
    lna_b: torch.Tensor | None = None
    host: PackedHost | None = None  # the same facts on the host (no device sync to read them)


class PackedHost(NamedTuple):
    offsets: tuple[int, ...]  # (A+1,) first unit of each adapter
    codes: tuple[int, ...]  # (A,) activation code of each adapter
    scales: tuple[float, ...]  # (A,)
    trainable: tuple[bool, ...]  # (A,) any of the adapter's weights requires grad


def pack_adapters(
    down_weights: list[torch.Tensor],
    down_biases: list[torch.Tensor],
    up_weights: list[torch.Tensor],
    up_biases: list[torch.Tensor],
    activations: list[str],
    scalings: list[float],
    ln_before: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ln_after: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PackedStack:
    """Concatenate adapters (down (r_a, H), up (H, r_a), biases (r_a,), (H,)) into a differentiable PackedStack."""
    n = len(down_weights)
    if not (n == len(down_biases) == len(up_weights) == len(up_biases) == len(activations) == len(scalings)) or n == 0:
        raise ValueError(f"pack_adapters needs the same non-zero number of each part, got {n} down weights")
    first = down_weights[0]
    hidden = first.shape[-1] if isinstance(first, torch.Tensor) and first.dim() else None  # (checked per adapter)
    for i, (wd, bd, wu, bu) in enumerate(zip(down_weights, down_biases, up_weights, up_biases, strict=True)):
        # (an integer weight failed inside the kernels' dot, "Unsupported lhs dtype int32", or ran in the twin)
        for part, t in (("down weight", wd), ("down bias", bd), ("up weight", wu), ("up bias", bu)):
            check_float_dtype(f"adapter {i}: {part}", t)
        if wd.dim() != 2 or wu.dim() != 2 or wd.shape[1] != hidden or wu.shape != (hidden, wd.shape[0]):
            raise ValueError(
                f"adapter {i}: down weight must be (r, {hidden}) and up weight ({hidden}, r), "
                f"got {tuple(wd.shape)} and {tuple(wu.shape)}"
            )
        if any(t.device != first.device for t in (wd, bd, wu, bu)):  # (the kernels got a foreign pointer)
            listing = ", ".join(f"{n} on {t.device}" for n, t in (("down weight", wd), ("down bias", bd),
                                                                  ("up weight", wu), ("up bias", bu)))  # fmt: skip
            raise ValueError(f"adapter {i}: all tensors must be on one device (adapter 0's), got {listing}")
        if wd.shape[0] < 1:  # (the twin indexed a rank-0 adapter's activation out of range)
            raise ValueError(f"adapter {i}: the bottleneck needs rank >= 1, got down weight {tuple(wd.shape)}")
        if bd.shape != (wd.shape[0],) or bu.shape != (hidden,):  # (a wrong length shifts the next adapter's biases)
            raise ValueError(
                f"adapter {i}: down bias must be ({wd.shape[0]},) and up bias ({hidden},) for down weight "
                f"{tuple(wd.shape)}, got {tuple(bd.shape)} and {tuple(bu.shape)}"
            )
    codes = []
    for a in activations:
        if not isinstance(a, str) or a.lower() not in ACTIVATIONS:
            raise ValueError(f"unsupported non_linearity {a!r}; supported: {sorted(ACTIVATIONS)}")
        codes.append(ACTIVATIONS[a.lower()])
    dev = down_weights[0].device
    ranks = tuple(w.shape[0] for w in down_weights)
    scales = tuple(float(x) for x in scalings)
    offsets_host = [0]
    for r in ranks:
        offsets_host.append(offsets_host[-1] + r)
    offsets, owner, unit_act, scale = _unit_tables(ranks, tuple(codes), scales, dev)
    trainable = tuple(
        any(t.requires_grad for t in parts)
        for parts in zip(down_weights, down_biases, up_weights, up_biases, strict=True)
    )

    def stack(pairs, k):
        return None if pairs is None else torch.stack([p[k] for p in pairs])

    one = n == 1  # a single adapter needs no copy (the up weight is re-laid out, see _h_contiguous_up)
    return PackedStack(
        wd=down_weights[0] if one else torch.cat(down_weights, 0),
        bd=down_biases[0].contiguous() if one else torch.cat(down_biases, 0),  # (the kernels read it contiguous)
        wu=_h_contiguous_up(up_weights),
        bu=up_biases[0].unsqueeze(0) if one else torch.stack(up_biases, 0),
        unit_owner=owner,
        unit_act=unit_act,
        scale=scale,
        offsets=offsets,
        lnb_w=stack(ln_before, 0),
        lnb_b=stack(ln_before, 1),
        lna_w=stack(ln_after, 0),
        lna_b=stack(ln_after, 1),
        host=PackedHost(tuple(offsets_host), tuple(codes), scales, trainable),
    )


def _h_contiguous_up(up_weights: list[torch.Tensor]) -> torch.Tensor:
    """The up weights as one (H, Rt) view of an (Rt, H)-contiguous copy: the kernels read Wu tiles along H, in
    aligned 16-byte vectors (along the unit axis a tile starts at an adapter's offset, of unknown alignment)."""
    if len(up_weights) == 1:
        return up_weights[0].t().contiguous().t()
    return torch.cat([w.t() for w in up_weights], 0).t()


def _build_unit_tables(ranks: tuple[int, ...], codes: tuple[int, ...], scales: tuple[float, ...], device):
    """Device tables (offsets, unit owner, unit activation, scale) from host lists (constants under dynamo)."""
    offsets, owner, unit_act = [0], [], []
    for a, (r, c) in enumerate(zip(ranks, codes, strict=True)):
        offsets.append(offsets[-1] + r)
        owner += [a] * r
        unit_act += [c] * r
    return (
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(owner, dtype=torch.int32, device=device),
        torch.tensor(unit_act, dtype=torch.int32, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
    )


_cached_unit_tables = device_lru_cache(maxsize=256)(_build_unit_tables)


def _unit_tables(ranks: tuple[int, ...], codes: tuple[int, ...], scales: tuple[float, ...], device: torch.device):
    """Cached outside torch.compile: a host-to-device copy syncs the stream, and training re-packs every step."""
    if torch.compiler.is_compiling():
        return _build_unit_tables(ranks, codes, scales, device)
    return _cached_unit_tables(ranks, codes, scales, device)


# --------------------------------------------------------------------------------------------------- tuning
class _Tiles(NamedTuple):
    """Launch shape of the forward and level-backward kernels, chosen per call from the ranks (no autotuning)."""

    BLOCK_M: int  # rows per program
    BLOCK_H: int  # hidden chunk: K of the down-projection dot, N of the up-projection dot
    BLOCK_R: int  # unit tile of the down projection, >= the largest rank (up to 256): a block whose rows share
    # one adapter reads its level input once per level
    BLOCK_K: int  # unit sub-tile: K of the up-projection and dx dots
    num_warps: int
    num_stages: int
    LOOP_STAGES: int = 1  # pipelining depth of the hidden-chunk loops that hold no dot of their own (1: none)
    maxnreg: int = 255  # registers per thread the GPU build may use (fewer: more programs per SM)

    def launch(self) -> dict:
        """Keyword arguments of a kernel launch (``maxnreg`` only on the GPU: the interpreter takes no such option)."""
        return _launch_kwargs(self)


@functools.lru_cache(maxsize=64)
def _launch_kwargs(tiles: _Tiles) -> dict:
    kwargs = tiles._asdict()
    if INTERPRET:
        del kwargs["maxnreg"]
    return kwargs


@functools.lru_cache(maxsize=64)
def _tiles(max_rank: int, big_inference: bool = False) -> _Tiles:
    """Tiles from the largest rank of a launch; ``big_inference``: a forward that saves nothing for the backward,
    over at least 4096 rows. The sm_90 builds' resource usage is pinned by tests/test_codegen.py (triton 3.9's
    ptxas, offline). On the GPU the forward and the level backward time them against the alternatives of
    :func:`_forward_candidates` and :func:`_level_candidates`. Why these:

    - The dots run as mma.sync, where every warp holds the whole (BLOCK_M, K) A operand in registers: K (BLOCK_H,
      BLOCK_K) stays at 64. A 16x256 A operand alone costs 64 registers per thread; BLOCK_H 128 spilled.
    - BLOCK_R covers the rank, so the level input is read once per level, not once per 64 units (rank 256 read it
      4 times and ran 4x as many loop steps: 2.77 ms vs eager 0.61 ms at 4096 x 4096 on the first H100 run).
    - Every program streams all weights of its level from L2 (4 MB per level at hidden 4096, rank 256), so at wide
      ranks 32-row blocks halve that traffic; 4096 rows are then 128 programs, one wave at one program per SM.
      The saving forward and the backward keep 16 rows: at 32 they spill 32-80 bytes.
    - num_stages=2 lets Triton prefetch the tiles that feed the dots (cp.async) one loop step ahead.
    - ``maxnreg=255`` (see launch): left alone, ptxas capped some builds at 128 registers and spilled 16-96 bytes.
      Narrow ranks run 4 warps at <= 255 registers, two programs per SM, so 4096 rows (256 programs) fit in one
      wave on 132 SMs.
    - LOOP_STAGES=2: the hidden-chunk loops of the one-tile path that the kernel-wide ``num_stages`` does not
      pipeline (LayerNorm moments, up projection with its residual, output LayerNorm; the backward's dx passes)
      are software-pipelined too, so every load there is a cp.async issued one step ahead. Without it each step
      waited on a plain load: a 768-wide row block was a chain of about 50 dependent memory round trips per
      level (sm_90 PTX, hidden 768, rank 48, one level).
    """
    block_r = min(max(16, next_pow2(max_rank)), 256)
    if INTERPRET:  # few programs, few loop steps: the interpreter's cost is per step, not per FLOP
        return _Tiles(32, 128, block_r, block_r, 4, 1)
    if block_r > 64:  # wide unit tiles: 8 warps split the (BLOCK_H, BLOCK_R) weight tile and the z accumulator
        return _Tiles(32 if big_inference else 16, 64, block_r, 64, 8, 2, 2)
    return _Tiles(16, 64, block_r, block_r, 4, 2, 2)


def _tile_path(rows: int, routes_uniform: bool, max_rank: int, tiles: _Tiles) -> int:
    """The kernels' TILE_PATH: 1 when every row block's units fit one BLOCK_R tile (one stack on every row: routes
    expanded from one (L,) list have row stride 0), 2 when no block is known to (a rank above the unit tile), 0 to
    decide per block at run time (mixed rows)."""
    if max_rank > tiles.BLOCK_R:
        return 2
    return 1 if (rows == 1 or routes_uniform) else 0


@functools.lru_cache(maxsize=64)
def _forward_candidates(first: _Tiles, save: bool) -> tuple[_Tiles, ...]:
    """The forward's tiles to time on the GPU (``bottleneck_dispatch._tuned_tiles``): ``first`` (:func:`_tiles`'
    choice) and the alternatives for its unit tile.

    Each candidate's sm_90 build (triton 3.6 and 3.9) is free of register spills at the benchmark shapes (hidden
    768 rank 48 and hidden 4096 rank 256, one and three levels, saving or not; tests/test_codegen.py). Longer
    hidden chunks and 32-row blocks cut the number of dependent loop steps (the narrow-rank forward is latency
    bound) at the price of registers and so of programs per SM; which wins depends on the rows, so it is timed.
    The wide-rank tiles keep BLOCK_H 64: 128 spills there. Across every option set (7 AdapterHub variants, with or
    without the model LN, one stack or mixed rows, saving or not) triton 3.6, the GPU image's version, builds all
    narrow-rank candidates without spills; triton 3.9 spills 24-64 bytes in the 128-wide ones for ``par_bn`` over
    mixed rows only, which their timing then weighs.

    The last narrow-rank candidate is about occupancy. 4096 rows in 16-row blocks are 256 programs, about two per
    SM, and every other candidate runs 8 warps per SM: two programs of 4 warps at 178 registers each, or one of 8
    warps at 186-254. Session 13's H100 profile found the chosen kernel at 9-17x its memory floor at hidden 768
    (55 us for one level, 108 us for three, per 4096 x 768 call), latency bound. Capped at 128 registers, 16-row
    blocks of 8 warps build without spills (sm_90, rank 16 to 64, saving or not, one stack or mixed rows), and two
    of them fit an SM: 16 warps per SM to hide the same latencies. The last one hides them the other way: 128-wide
    hidden chunks pipelined three deep (``num_stages`` and ``LOOP_STAGES`` 3: each loop's loads issued two steps
    ahead; spill-free on triton 3.6 and 3.9 at hidden 768, rank 48, saving or not).
    """
    if INTERPRET:
        return (first,)
    block_r = first.BLOCK_R
    if block_r > 64:
        other = [] if save else [_Tiles(16 if first.BLOCK_M == 32 else 32, 64, block_r, 64, 8, 2, 2)]
        return (first, *other)
    return (
        first,
        _Tiles(16, 128, block_r, block_r, 8, 2, 2),
        _Tiles(16, 256, block_r, block_r, 8, 2, 2),
        _Tiles(32, 128, block_r, block_r, 8, 2, 2),
        _Tiles(16, 64, block_r, block_r, 8, 2, 2, maxnreg=128),
        _Tiles(16, 128, block_r, block_r, 8, 3, 3),
    )


@functools.lru_cache(maxsize=64)
def _level_candidates(first: _Tiles) -> tuple[_Tiles, ...]:
    """The level-backward kernel's tiles to time on the GPU, ``first`` (:func:`_tiles`) first. Narrow ranks only:
    16-row blocks with 128-wide hidden chunks, and 32-row blocks, both on 8 warps (sm_90 builds at hidden 768, rank
    48, one stack or mixed rows, triton 3.6 and 3.9: no spills; 256-wide chunks spill 8 bytes)."""
    if INTERPRET or first.BLOCK_R > 64:
        return (first,)
    return (first, first._replace(BLOCK_H=128, num_warps=8), first._replace(BLOCK_M=32, num_warps=8))


# --------------------------------------------------------------------------------------------------- switches
@functools.lru_cache(maxsize=256)
def _flags(options: StackOptions, has_ln: bool) -> dict:
    """Compile-time switches of the kernel from the structural options (see the docstring of kernels/bottleneck.py)."""
    in_add_y = options.original_ln_before and not options.is_parallel
    in_ln = in_add_y and has_ln
    if options.is_parallel or options.residual_before_ln is True:
        res_mode = 0
    elif options.residual_before_ln == "post_add":
        res_mode = 1 if in_ln else 0  # AdapterHub only re-points the residual when the model LN runs
    else:
        res_mode = 2
    out_add_y = options.original_ln_after
    return {
        "PARALLEL": options.is_parallel,
        "IN_ADD_Y": in_add_y,
        "IN_LN": in_ln,
        "RES_MODE": res_mode,
        "OUT_ADD_Y": out_add_y,
        "OUT_LN": out_add_y and has_ln,
    }


def _dot_mode(h: torch.Tensor, w: torch.Tensor) -> tuple[bool, str]:
    """(fp32 operands?, input_precision). Native half operands on the GPU; the interpreter's bf16 dot is wrong
    (fp32 there) but its fp16 dot is right, so fp16 weights exercise the native-operand path in the CPU tier."""
    dot_fp32 = w.dtype == torch.float32 or (dot_in_fp32(h) and w.dtype == torch.bfloat16)
    precision = "tf32x3" if (h.device.type == "cuda" and w.dtype == torch.float32) else "ieee"
    return dot_fp32, precision


def _max_rank(offsets) -> int:
    return max([b - a for a, b in zip(offsets, offsets[1:], strict=False)] or [1])  # (a list: dynamo traces it)
