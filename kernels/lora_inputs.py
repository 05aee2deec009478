"""Host-side input preparation shared by the LoRA ops (``lora_linear`` and its ``path="segmented"``).

Nothing here is the op itself: checking the user's arguments (``_adapter_lists``, ``_validate``, ``_row_ids``), fp32
master factors of a 16-bit x in x's dtype (``_compute_factors``, with a cache of the casts for inference),
the per-rank tables of the stacked layout (``_rank_tables``: ``rank_scale[r]`` / ``rank_adapter[r]``, see
kernels/lora_linear.py), the stacking of the adapters' factors into ``A_cat (R, K)`` / ``B_cat (N, R)``
(``_stack``: B_cat row-major, or rank-major for the segmented kernels; ``_stack_cached`` remembers it for
inference), and the rows of a mixed batch grouped by adapter (``_segments_cached``, around ``plan_segments`` of
kernels/lora_segmented.py). Those two caches are keyed on the live tensor objects (weak references) and their
in-place version counters: a changed or freed tensor never hits.
"""

from __future__ import annotations

import collections
import operator
import weakref

import torch

from ._backend import (
    FLOAT_DTYPES,
    captured_cache,
    capturing,
    check_float_dtype,
    check_same_device,
    device_lru_cache,
    kept,
    normal_tensors,
)
from .lora_segmented import SegmentPlan, plan_segments


# ----------------------------------------------------------------------------------------------------------------
# User input: adapter lists, shapes, dtypes, devices, per-row adapter ids
# ----------------------------------------------------------------------------------------------------------------
def _adapter_lists(lora_A, lora_B, scale):
    single = isinstance(lora_A, torch.Tensor)
    if single != isinstance(lora_B, torch.Tensor) or (single and isinstance(scale, (list, tuple))):
        raise TypeError(  # (list() of a single lora_B would take its rows for adapters)
            "lora_A, lora_B and scale must all be single (tensor, tensor, float) or all sequences, got "
            f"{type(lora_A).__name__}, {type(lora_B).__name__} and {type(scale).__name__}"
        )
    try:
        if single:
            return [lora_A], [lora_B], [_scale_value(scale)]
        As, Bs, scales = list(lora_A), list(lora_B), list(scale)
        floats = [s if type(s) is float else _scale_value(s) for s in scales]
    except _TrainableScale as e:
        raise TypeError(str(e)) from None
    except (TypeError, ValueError):
        raise TypeError(
            "lora_A and lora_B must be tensors (or sequences of them) and scale a number (or a sequence of numbers, "
            f"one per adapter), got {type(lora_A).__name__}, {type(lora_B).__name__} and scale {scale!r}"
        ) from None
    if not (len(As) == len(Bs) == len(scales)) or not As:
        raise ValueError(
            f"need equal, non-zero numbers of lora_A, lora_B and scale, got {len(As)}, {len(Bs)}, {len(scales)}"
        )
    return As, Bs, floats


class _TrainableScale(Exception):
    pass


def _scale_value(s) -> float:
    """``float(s)``, refusing a tensor that requires grad: ``float`` detaches it, so it would silently get none."""
    if isinstance(s, torch.Tensor) and s.requires_grad:
        raise _TrainableScale(
            f"scale must be a number: a tensor that requires grad ({s!r}) would get no gradient through the fused "
            "op; pass float(scale), or scale lora_B by it (a learned scale's gradient then reaches it)"
        )
    return float(s)


# ----------------------------------------------------------------------------------------------------------------
# fp32 master factors of a 16-bit x (PEFT's ``autocast_adapter_dtype``)
# ----------------------------------------------------------------------------------------------------------------
# cache of fp32 factors cast to 16 bits, for calls that need no gradient for them: id()s of a call's factors ->
# (weak refs, the dtype, their versions and addresses, the casts (None for a factor taken as given), the factors as
# the op computes with them or None when some are taken as given), least recently used first
_CASTS: collections.OrderedDict = collections.OrderedDict()
_MAX_CASTS = 4096  # (one entry per LoRA layer and adapter set, as _STACKS)
_DTYPE = operator.attrgetter("dtype")
_DEREF = weakref.ref.__call__


def _compute_factors(x, As, Bs, cache: bool = True, weight=None):
    """The factors as the op computes with them: float32 factors of a float16 / bfloat16 ``x`` (master weights, as
    PEFT keeps adapters of a 16-bit model by default: ``autocast_adapter_dtype=True``) in ``x``'s dtype, as autocast
    casts fp32 weights for a 16-bit matmul (PEFT computes their term in fp32 instead: see the README's Precision
    note); every other factor as given (``_validate`` judges them). ``weight`` (the layer's, when given): only a
    weight in ``x``'s dtype has its masters cast; a mismatched call gets its factors as given, so that ``_validate``'s
    error names their own dtypes (it named the casts made here: fp32 masters listed as bf16). Where autograd wants a
    master's gradient the casts are differentiable (it arrives in fp32). Otherwise the copies are cached (``cache``)
    while the call's factors are the same live tensors at the same in-place versions and addresses: a call pays one
    lookup for all of them (C-level maps), not a cast per factor. Cached copies are normal tensors, also when first
    made under ``torch.inference_mode`` (later calls' caches read their versions). Updates through ``.data`` are not
    seen, as in ``_stack_cached``."""
    dt = getattr(x, "dtype", None)
    if (dt is not torch.float16 and dt is not torch.bfloat16) or (
        weight is not None and getattr(weight, "dtype", None) is not dt
    ):
        return As, Bs
    factors = (*As, *Bs)
    if torch.compiler.is_compiling():  # (a compiled graph casts itself; dynamo cannot trace the C-level maps below)
        cast = [t.to(dt) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for t in factors]
        return _split(cast, len(As))
    try:
        if torch.float32 not in map(_DTYPE, factors):
            return As, Bs
    except AttributeError:  # not tensors: _validate names them
        return As, Bs
    n = len(As)
    if not cache or (torch.is_grad_enabled() and any(t.requires_grad for t in factors if t.dtype is torch.float32)):
        return _split(_cast(factors, dt), n)
    try:
        versions, addresses = tuple(map(_VERSION, factors)), tuple(map(_DATA_PTR, factors))
    except RuntimeError:  # an inference tensor: no version counter, never cached
        return _split(_cast(factors, dt, detach=True), n)
    key = tuple(map(id, factors))
    hit = _CASTS.get(key)
    if (
        hit is not None and hit[1] is dt and hit[2] == versions and hit[3] == addresses
        and all(map(operator.is_, map(_DEREF, hit[0]), factors))
    ):  # fmt: skip
        _CASTS.move_to_end(key)
        result = hit[5]
        if result is None:  # (the factors taken as given: the live ones just checked)
            result = _split([t if c is None else c for c, t in zip(hit[4], factors, strict=True)], n)
        return kept(result)  # (a CUDA graph captured now reads the copies: they must outlive the entry)
    with normal_tensors():  # (made under inference_mode they would be inference tensors: no versions to cache by)
        cast = _cast(factors, dt, detach=True)
    result = _split(cast, n)
    if not capturing(factors[0]):  # (made inside a CUDA graph, the copies would be filled only when it replays)
        drop = lambda ref, key=key: _drop(_CASTS, key, ref)  # noqa: E731  (runs when a factor is freed)
        # The entry holds the factors weakly, and a 16-bit factor taken as given too: held in the entry, an evicted
        # 16-bit adapter stacked with a resident master one stayed on the device (outside any memory manager's
        # count) as long as the master lived. Only an all-fp32 call keeps its result ready (the common case).
        casts = tuple(c if c is not t else None for c, t in zip(cast, factors, strict=True))
        ready = result if all(c is not None for c in casts) else None
        _CASTS[key] = (tuple(weakref.ref(t, drop) for t in factors), dt, versions, addresses, casts, ready)
        _CASTS.move_to_end(key)
        if len(_CASTS) > _MAX_CASTS:
            _CASTS.popitem(last=False)
    return result


def _cast(factors, dt: torch.dtype, detach: bool = False) -> list:
    """The fp32 ones among ``factors`` in ``dt`` (differentiably unless ``detach``), the others as given."""
    return [(t.detach() if detach else t).to(dt) if t.dtype is torch.float32 else t for t in factors]


def _split(factors: list, n: int) -> tuple[list, list]:
    return factors[:n], factors[n:]


def _validate(x, weight, As, Bs, bias, fan_in_fan_out, allow_fp64=False) -> tuple[int, int, tuple[int, ...]]:
    """(out_features, in_features, each adapter's rank) of a valid call; otherwise an error naming the problem."""
    ok_dtypes = (*FLOAT_DTYPES, torch.float64) if allow_fp64 else FLOAT_DTYPES  # fp64: the reference's oracle mode
    accepted = _accept(x, weight, As, Bs, bias, fan_in_fan_out, ok_dtypes)
    if accepted is not None:
        return accepted
    # Rejected: check again piece by piece, to raise the error that names the culprit.
    uniform = isinstance(x, torch.Tensor) and x.dtype in ok_dtypes
    if uniform:
        dt, dev = x.dtype, x.device
        uniform = all(  # (only the bias may be None)
            (t is None and name == "bias") or (isinstance(t, torch.Tensor) and t.dtype == dt and t.device == dev)
            for name, t in (("weight", weight), ("bias", bias), *(("factor", t) for t in (*As, *Bs)))
        )
    if not uniform:  # find the culprit and name it
        tensors = {"x": x, "weight": weight, "bias": bias}
        tensors.update({f"lora_A[{i}]": a for i, a in enumerate(As)})
        tensors.update({f"lora_B[{i}]": b for i, b in enumerate(Bs)})
        for name, t in tensors.items():
            if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t is not None and not (allow_fp64 and t.dtype == torch.float64):
                check_float_dtype(name, t)
        dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
        if len(set(dtypes.values())) > 1:
            listing = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
            raise TypeError(
                f"x, weight, bias and the LoRA factors must share one dtype (the factors may also be float32 master "
                f"weights of a float16 / bfloat16 x), got {listing}"
            )
        check_same_device(**tensors)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be (..., in) and weight 2-D, got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    layout = "(in, out) (fan_in_fan_out=True)" if fan_in_fan_out else "(out, in)"
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x {tuple(x.shape)} has {x.shape[-1]} features, weight {tuple(weight.shape)} {layout} wants {in_f}"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({out_f},) for weight {tuple(weight.shape)} {layout}")
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter {i}: lora_A {tuple(a.shape)} must be (r, {in_f}) and lora_B {tuple(b.shape)} must be "
                f"({out_f}, r) with the same r"
            )
        if a.shape[0] < 1:
            raise ValueError(f"adapter {i}: rank must be >= 1, got lora_A {tuple(a.shape)}")
    raise AssertionError("_accept rejected a call that every check passes")  # (the two checks must agree)


def _accept(x, weight, As, Bs, bias, fan_in_fan_out, ok_dtypes) -> tuple[int, int, tuple[int, ...]] | None:
    """``_validate``'s answer for a valid call in one pass, or None: every tensor shares x's float dtype and
    device, shapes fit. Host time counts (small M, many resident adapters): 16 adapters took 16 us per call
    through the piece-by-piece checks, on this project's CPU."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dtype in ok_dtypes):
        return None
    dt, dev, w_shape = x.dtype, x.device, weight.shape
    if weight.dtype != dt or weight.device != dev or len(w_shape) != 2 or x.dim() < 1:
        return None
    out_f, in_f = (w_shape[1], w_shape[0]) if fan_in_fan_out else w_shape
    if x.shape[-1] != in_f:
        return None
    if bias is not None and not (
        isinstance(bias, torch.Tensor) and bias.dtype == dt and bias.device == dev and bias.shape == (out_f,)
    ):
        return None
    ranks = []
    for a, b in zip(As, Bs, strict=True):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        sa, sb = a.shape, b.shape
        if not (
            a.dtype == dt and b.dtype == dt and a.device == dev and b.device == dev and len(sa) == 2 and len(sb) == 2
            and sa[1] == in_f and sb[0] == out_f and sa[0] == sb[1] >= 1
        ):  # fmt: skip
            return None
        ranks.append(sa[0])
    return out_f, in_f, tuple(ranks)


def _row_ids(adapter_ids, x, n_adapters):
    if adapter_ids is None:
        return None
    if (
        not isinstance(adapter_ids, torch.Tensor)
        or adapter_ids.dtype.is_floating_point
        or adapter_ids.is_complex()
        or adapter_ids.dtype == torch.bool  # (a mask is not a choice of adapters: True / False would read as 1 / 0)
    ):
        got = getattr(adapter_ids, "dtype", type(adapter_ids))
        raise TypeError(f"adapter_ids must be an integer tensor, got {got}")
    lead = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == lead:
        ids = adapter_ids
    elif adapter_ids.dim() == 1 and len(lead) >= 1 and adapter_ids.shape[0] == lead[0]:
        ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)  # per sequence
    else:
        raise ValueError(
            f"adapter_ids {tuple(adapter_ids.shape)} must be shaped like x.shape[:-1] {lead} (per token) "
            f"or x.shape[:1] {lead[:1]} (per sequence)"
        )
    if ids.device != x.device:
        raise ValueError(f"adapter_ids on {ids.device} but x on {x.device}")
    # On CUDA a range check would sync the stream (and it is data-dependent under torch.compile): there, ids
    # outside [-1, n) match no adapter and act as -1.
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= n_adapters:
            raise ValueError(f"adapter_ids must lie in [-1, {n_adapters}) for {n_adapters} adapters, got [{lo}, {hi}]")
    return ids.reshape(-1).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Rank tables and the stacked factors A_cat / B_cat
# ----------------------------------------------------------------------------------------------------------------
@device_lru_cache(maxsize=256)
def _rank_tables(ranks: tuple[int, ...], scales: tuple[float, ...], device: torch.device):
    """(rank_scale (R,) fp32, rank_adapter (R,) int32, shared_scale), cached so no host-to-device copy happens per
    call; shared_scale is the scale every adapter shares (a float, for the torch paths' GEMM alpha) or None."""
    rank_scale = torch.tensor([s for s, r in zip(scales, ranks, strict=True) for _ in range(r)], dtype=torch.float32)
    rank_adapter = torch.tensor([i for i, r in enumerate(ranks) for _ in range(r)], dtype=torch.int32)
    shared = scales[0] if all(s == scales[0] for s in scales) else None
    return rank_scale.to(device), rank_adapter.to(device), shared


def _stack(lora_As, lora_Bs, b_rank_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat (R, K), B_cat (N, R)). ``b_rank_major``: B_cat is an (N, R) view of contiguous B_cat^T (R, N) storage
    (strides (1, N)): the same values, laid out so that each rank's column is one contiguous row of N (the segmented
    expand then loads its B tiles as 16-byte vectors along N, kernels/lora_segmented.py)."""
    if len(lora_As) == 1:  # one adapter: no concatenation, no copy (B only when it must change its layout)
        return lora_As[0], (lora_Bs[0].t().contiguous().t() if b_rank_major else lora_Bs[0])
    if b_rank_major:  # one concatenation either way: along R of the (R, N) storage
        return torch.cat(list(lora_As), 0), torch.cat([b.t() for b in lora_Bs], 0).t()
    return torch.cat(list(lora_As), 0), torch.cat(list(lora_Bs), 1)


_STACKS: collections.OrderedDict = collections.OrderedDict()  # inference-only cache of concatenated factors
_VERSION = operator.attrgetter("_version")  # a tensor's in-place version (raises for inference tensors)
_DATA_PTR = torch.Tensor.data_ptr

# Serving keeps one entry per LoRA layer (every resident adapter fused): room for the layers of large models
# (80 layers x 7 projections = 560), past which every call would concatenate again. An entry lives only as long
# as its factors, so the copies never outnumber the live adapter sets.
_MAX_STACKS = 4096


def _stack_cached(lora_As, lora_Bs, b_rank_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``_stack`` for inference, remembering the concatenation while the same factor tensors are unchanged.

    Serving calls a layer with the same resident adapters again and again; concatenating them costs two launches
    and two allocations per call. An entry is valid while every factor is the same live object (weak references,
    so a freed tensor whose id and address get reused never hits) at the same in-place version and data address,
    for the same layout of B_cat. The address catches a conversion in place: ``model.half()`` or ``model.to(dev)``
    give each parameter new storage (allocated while the old one lives, so at another address) and leave its
    version as it was. There is one entry per set of factor objects: a changed set (an optimizer step between two
    evaluations, a conversion) replaces its entry, so stale copies never pile up on the device. An entry holds the
    copies only (one adapter: its rank-major B), never a factor itself, which would then stay alive through its
    own entry, and it is dropped as soon as one of its factors is freed (an evicted adapter must not leave its
    concatenated copies behind on the device). Not seen: updates through ``.data`` (they bypass the version
    counter: update factors in place with ``copy_`` or an optimizer step, or replace them), and two conversions
    in a row without a call between them whose second lands on the first storage's freed address (a dtype round
    trip). The engine's own LoRA layers forget their entries whenever they are converted (``forget_stacks``).
    """
    one = len(lora_As) == 1
    if one and (not b_rank_major or lora_Bs[0].t().is_contiguous()):  # nothing to copy, nothing to remember
        return _stack(lora_As, lora_Bs, b_rank_major)
    factors = (*lora_As, *lora_Bs)
    try:  # (C-level maps: this runs per layer call, over every resident adapter)
        state = (tuple(map(_VERSION, factors)), tuple(map(_DATA_PTR, factors)))
    except RuntimeError:  # an inference tensor: it keeps no version counter
        return _stack(lora_As, lora_Bs, b_rank_major)
    key = (b_rank_major, tuple(map(id, factors)))
    hit = _STACKS.get(key)
    if hit is not None and hit[2] == state and all(map(operator.is_, [ref() for ref in hit[0]], factors)):
        _STACKS.move_to_end(key)
        A_cat, B_cat = hit[1]
        return kept(((lora_As[0] if one else A_cat), B_cat))  # (a graph captured now reads the cached copies)
    A_cat, B_cat = _stack(lora_As, lora_Bs, b_rank_major)
    if capturing(lora_As[0]):  # made inside a CUDA graph: filled only when it replays, so never for later calls
        return A_cat, B_cat
    drop = lambda ref, key=key: _drop(_STACKS, key, ref)  # noqa: E731  (runs when a factor is freed)
    _STACKS[key] = (tuple(weakref.ref(t, drop) for t in factors), (None if one else A_cat, B_cat), state)
    _STACKS.move_to_end(key)
    if len(_STACKS) > _MAX_STACKS:
        _STACKS.popitem(last=False)
    return A_cat, B_cat


def _drop(cache: dict, key, ref: weakref.ref) -> None:
    """The factor behind ``ref`` was freed: drop its entry from ``cache`` (``_STACKS`` or ``_CASTS``), unless a newer
    one (other factors that took the freed ones' ids) has replaced it. (The entry is found by its weak reference: a
    callback that held the entry would make a reference cycle, and its device copies would wait for the garbage
    collector.)"""
    hit = cache.get(key)
    if hit is not None and any(r is ref for r in hit[0]):
        del cache[key]


def forget_stacks(tensors) -> None:
    """Drop the cached concatenations (and fp32 factors' casts) that hold any of ``tensors`` (a module converted in
    place calls it: a conversion keeps each parameter's version, and a round trip such as ``.half().float()`` may
    even land on the old data address)."""
    ids = {id(t) for t in tensors}
    for key in [k for k in _STACKS if not ids.isdisjoint(k[1])]:
        del _STACKS[key]
    for key in [k for k in _CASTS if not ids.isdisjoint(k)]:
        del _CASTS[key]


# ----------------------------------------------------------------------------------------------------------------
# Rows of a mixed batch grouped by adapter
# ----------------------------------------------------------------------------------------------------------------
_SEGMENTS: collections.OrderedDict = collections.OrderedDict()  # adapter_ids tensor -> its rows grouped by adapter


def _segments_cached(adapter_ids, x, ranks, scales) -> tuple[torch.Tensor, SegmentPlan]:
    """(flat ids (M,) int32, ``plan_segments`` of them), remembered while ``adapter_ids`` is unchanged.

    Serving passes one ids tensor to every LoRA layer of a forward (adapter_engine's routes cache it per batch
    layout); grouping its rows costs a flatten, a sort and a search (3-4 launches) that the other layers skip. An
    entry is valid while the tensor is the same live object (weak reference) at the same in-place version, for
    the same row shape and adapter count. Never cached: inference tensors (no version counter). While a CUDA graph
    is captured only groupings made in the same capture are reused (``_backend.capture_cache``; none without one):
    the graph must contain the grouping, to follow a static ids buffer refilled in place.
    """
    n = len(ranks)
    key = None
    cache = captured_cache() if capturing(x) else _SEGMENTS
    if isinstance(adapter_ids, torch.Tensor) and not adapter_ids.is_inference() and cache is not None:
        key = (id(adapter_ids), adapter_ids._version, tuple(x.shape[:-1]), n, x.device)
        hit = cache.get(key)
        if hit is not None and hit[0]() is adapter_ids:
            if cache is _SEGMENTS:
                _SEGMENTS.move_to_end(key)
            ids, plan = hit[1], hit[2]
            if plan.ranks != ranks or plan.scales != scales:  # same rows, other adapters (e.g. another layer's)
                plan = plan_segments(ids, ranks, scales, grouping=(plan.order, plan.starts))
            return ids, plan
    ids = _row_ids(adapter_ids, x, n)
    plan = plan_segments(ids, ranks, scales)
    if key is not None:
        cache[key] = (weakref.ref(adapter_ids), ids, plan)
        if cache is _SEGMENTS and len(_SEGMENTS) > 64:
            _SEGMENTS.popitem(last=False)
    return ids, plan
