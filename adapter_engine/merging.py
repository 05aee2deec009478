"""Strategy 1, "Merge and FFT": fold adapters into the base weights in place and get a plain HF model back.

    merge_adapter(model, "domain")                         # LoRA / IA3: one merge launch per weight shape
    merge_adapter(model, ["a", "b"], weights=[0.7, 0.3])   # several adapters in the same pass, weighted (IA3: l ** w)
    merge_adapter(model, ["a", "b"], combination="ties", density=0.5)   # TIES / DARE task-vector combinations
    merge_adapter(model, "domain", exact=True)             # keep what is needed for a bit-exact unmerge
    unmerge_adapter(model, "domain")                       # restore the weights (1 ulp, or bit-exact)

What folds and what does not: LoRA (``W += s B A``) and IA3 (a per-feature scale of ``W``) are linear in the
input, so they fold into the weights exactly (up to one rounding). So does a bottleneck adapter with an
identity activation that reads the projection's output directly (Houlsby placement): ``h + s W_u (W_d h + b_d)
+ s b_u`` with ``h = W x + b`` is ``W' x + b'`` with ``W' = W + s W_u (W_d W)``, a rank-r update that the merge
kernel applies. A bottleneck adapter with a nonlinear activation, or with a LayerNorm between it and the weight
that produces ``h`` (AdapterHub's seq_bn reads ``LN(h + y)``), is not a function of ``h`` that any weight
matrix can express; ``merge_adapter`` refuses it and says why. With
``absorb=True`` such an adapter instead stays in the model as a permanent, trainable part of the architecture
(full fine-tuning then trains it with everything else).

All-or-nothing: every weight is checked (shapes, finiteness of the merged values) before any is written, so
a merge that fails leaves every weight bit-identical to what it was.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._adapters import check_not_meta
from .kernels import merge_lora_many_, scale_ia3_, unmerge_lora_many_
from .kernels.bottleneck import ACTIVATIONS
from .lora import LoraLinear
from .saved_modules import conflict

log = logging.getLogger(__name__)

_MERGES_ATTR = "_adapter_engine_merges"
COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")


@dataclass
class _LayerMerge:
    """What one layer received: enough to subtract it again (and the original weight when ``exact``)."""

    path: str
    weight: torch.Tensor  # the base weight Parameter itself (shared with the plain module after unpatch)
    bias: torch.Tensor | None
    lora_A: list[torch.Tensor] = field(default_factory=list)
    lora_B: list[torch.Tensor] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    fan_in_fan_out: bool = False
    ia3: list[tuple[torch.Tensor, int, bool]] = field(default_factory=list)  # (vector, dim, scales the bias)
    adapter_index: list[int] = field(default_factory=list)  # position in ``names`` of each LoRA term
    bias_delta: torch.Tensor | None = None  # what a folded bottleneck added to the bias
    original: torch.Tensor | None = None  # CPU copy of the weight before the merge (exact / non-linear merges)
    original_bias: torch.Tensor | None = None
    # a trained module copy's tensor that replaces ``weight`` (modules_to_save), until it has: then None (the deleted
    # copy's memory is not held) and ``replaced`` True
    replacement: torch.Tensor | None = None
    replaced: bool = False


@dataclass
class MergeRecord:
    names: tuple[str, ...]
    combination: str
    layers: list[_LayerMerge]


def _records(model: nn.Module) -> list[MergeRecord]:
    return model.__dict__.setdefault(_MERGES_ATTR, [])


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def merged_hint(model: nn.Module, names: Sequence[str]) -> str:
    """For an error about adapter names ``model`` does not have: those of ``names`` merged into its weights (a merge
    drops the adapter), and how to take them out; else ``""``. They were answered "no adapter named" alone."""
    done = merged_adapters(model)
    merged = [n for n in names if n in done]
    if len(merged) == 1:
        return f" ({merged[0]!r} is merged into the weights: unmerge_adapter(model, {merged[0]!r}) takes it out)"
    return f" ({merged} are merged into the weights: unmerge_adapter(model, name) takes each out)" if merged else ""


def _resolve_names(model: nn.Module, state, names) -> list[str]:
    if names is None:
        names = [n for n in state.active if state.adapters[n].kind in ("lora", "ia3")]
        if not names:
            raise ValueError(f"no active LoRA/IA3 adapter to merge; name one of {list(state.adapters)}")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"no adapter named to merge (an empty list); name some of {list(state.adapters)}, or pass "
                         "None for the active ones")  # fmt: skip
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"adapters {repeated} appear more than once in {names}; name each adapter once")
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        hint = merged_hint(model, unknown)
        raise ValueError(f"no adapter named {unknown}; this model has {list(state.adapters)}{hint}")
    return names


def _bottleneck_refusal(name: str, config, reason: str) -> str:
    act = getattr(config, "non_linearity", "?")
    return (
        f"adapter {name!r} is a bottleneck adapter (activation {act!r}) that cannot be merged: {reason}. Only an "
        "adapter that is linear in the projection's output folds into its weights. This one is not linear in its "
        "input, so no weight matrix can express it. Pass absorb=True (adapter-engine merge --absorb) to keep it as a "
        "permanent, trainable part of the model for full fine-tuning (saved with the model by save_model, reloaded by "
        "load_model)."
    )


def _fold_refusal(model: nn.Module, record, name: str) -> str | None:
    """Why bottleneck adapter ``name`` does not fold exactly into the projection before it (None: it folds).

    It folds when ``r = h + s (W_u (W_d h + b_d) + b_u)`` reads ``h = W x + b`` directly: identity activation,
    no LayerNorm between (``original_ln_before=False``, no own LayerNorms), not parallel, residual ``h``, and
    it is the first level of its stack. Then ``W' = W + s W_u (W_d W)`` (a rank-r update: the merge kernel) and
    ``b' = b + s (W_u (W_d b + b_d) + b_u)``.
    """
    from .bottleneck import OutputWithAdapters

    for path in record.modules:
        wrapper = model.get_submodule(path)
        adapter = wrapper.adapters[name]
        options = adapter.options
        if ACTIVATIONS[adapter.non_linearity] != ACTIVATIONS["identity"]:  # ("none" and "linear" are its names too)
            return f"its activation {adapter.non_linearity!r} is not the identity"
        if options.is_parallel:
            return "it is parallel: it reads the sublayer's input, not the projection's output"
        if options.original_ln_before or options.ln_before or options.ln_after:
            return "a LayerNorm sits between it and the projection that produces its input"
        if options.residual_before_ln is not True:
            return f"its residual is taken after a LayerNorm (residual_before_ln={options.residual_before_ln!r})"
        if not isinstance(wrapper, OutputWithAdapters):
            return f"the projection before it in {path} is not known (a block whose residual is added outside)"
        dense = getattr(wrapper, wrapper._names[0])
        if getattr(dense, "bias", None) is None or getattr(dense, "fan_in_fan_out", False):
            return f"the projection {path}.{wrapper._names[0]} has no bias or a transposed (Conv1D) weight"
        stack = wrapper.active_stack
        if name in stack and stack[0] != name:
            return f"it is not the first level of the active stack {stack} in {path}"
    return None


@torch.no_grad()
def _fold_layers(model: nn.Module, record, name: str, weight: float) -> list[_LayerMerge]:
    """The rank-r updates of the projections that a foldable bottleneck adapter ``name`` follows."""
    layers = []
    for path in record.modules:
        wrapper = model.get_submodule(path)
        adapter = wrapper.adapters[name]
        dense = getattr(wrapper, wrapper._names[0])
        down, up = adapter.down, adapter.adapter_up
        scale = adapter.scaling * weight
        a = down.weight.float() @ dense.weight.float()  # W_d W: (r, in)
        bias_delta = scale * (up.weight.float() @ (down.weight.float() @ dense.bias.float() + down.bias.float()))
        bias_delta = bias_delta + scale * up.bias.float()
        layer = _LayerMerge(f"{path}.{wrapper._names[0]}", dense.weight, dense.bias, bias_delta=bias_delta)
        layer.lora_A, layer.lora_B, layer.scales = [a], [up.weight.detach().float()], [scale]
        layers.append(layer)
    return layers


def _task_deltas(layer: _LayerMerge) -> list[torch.Tensor]:
    """Full-size fp32 deltas ``s_i B_i A_i`` of one layer (TIES / DARE need them element by element)."""
    deltas = []
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scales):
        delta = s * (b.float() @ a.float())
        deltas.append(delta.t() if layer.fan_in_fan_out else delta)
    return deltas


def _combine(
    deltas: list[torch.Tensor], weights: Sequence[float], method: str, density: float, generator: torch.Generator
) -> torch.Tensor:
    """TIES (Yadav et al. 2023) and DARE (Yu et al. 2024) on one layer's task vectors ``s_i B_i A_i``, with PEFT's
    ``merge_utils`` formulas: trim each delta to its top-``density`` magnitudes (TIES) or keep each element with
    probability ``density`` and rescale by 1 / density (DARE); then either the weighted sum (``dare_linear``) or
    TIES's sign election (sign of the unweighted sum, ties to +) and the mean of the weighted entries that agree
    with it. That is PEFT's ``add_weighted_adapter`` with ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd`` at
    full SVD rank (checked to 2e-7); its plain ``ties`` / ``dare_*`` apply the formulas to the A and B factors
    separately, which is not a TIES merge of the task vectors."""
    pruned = []
    for delta in deltas:
        if method == "ties":
            k = int(density * delta.numel())
            mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
            mask[torch.topk(delta.abs().flatten(), k=k).indices] = True
            pruned.append(delta * mask.view_as(delta))
        else:
            keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
            pruned.append(torch.where(keep, delta / density, torch.zeros_like(delta)))
    stacked = torch.stack(pruned)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if method == "dare_linear":
        return weighted.sum(0)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == majority
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def merge_adapter(
    model: nn.Module,
    names: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    *,
    combination: str = "linear",
    density: float = 0.5,
    seed: int = 0,
    exact: bool = False,
    absorb: bool = False,
    safe: bool = True,
) -> nn.Module:
    """Fold adapters into the base weights in place and drop them; returns ``model``.

    Args:
        names: adapter name(s); default: the active LoRA / IA3 adapters.
        weights: one per adapter (default 1.0). LoRA terms are scaled by them: ``W += sum_i w_i s_i B_i A_i``. IA3
            vectors are raised to them and multiply: ``W *= prod_i l_i ** w_i`` per feature (the bias too for an
            output scale), so weight 1 merges what the adapter runs, several IA3 adapters merge as they run
            together, and weight 0 leaves the weight alone. PEFT's ``add_weighted_adapter`` instead builds one IA3
            vector ``sum_i w_i l_i`` (with weights 1 and 1, ``l_a + l_b``: not what the two run together). A power
            with no finite real value (a fractional weight of a negative entry, a negative weight of a zero) is
            refused, naming the adapter and layer.
        combination: ``"linear"`` (the fused merge kernel: one launch per weight shape), or ``"ties"``,
            ``"dare_linear"``, ``"dare_ties"`` with ``density`` (fraction kept) and ``seed`` (DARE's drops).
        exact: keep a CPU copy of every merged weight so that :func:`unmerge_adapter` restores it bit for bit
            (TIES / DARE merges always keep it: their deltas are not low-rank; so does a weight whose IA3 scale
            cannot be divided out again within one ulp: a zero scale, or values scaled into the subnormals).
        absorb: let bottleneck adapters among ``names`` stay as permanent, trainable parts of the model instead
            of refusing them.
        safe: check every merged value for NaN / infinity before writing anything.

    When no adapter is left afterwards the model is unpatched: a plain HF model whose ``save_pretrained`` writes
    a checkpoint plain ``transformers`` loads. Parameter counts before and after are logged.
    """
    from . import patching as pt

    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; supported: {list(COMBINATIONS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    state = pt.get_state(model) if pt.is_patched(model) else None
    if state is None or state.model_type == "peft":
        raise ValueError(
            "merge_adapter needs a model patched by adapter_engine with adapters loaded (patch + load_adapter)"
        )
    names = _resolve_names(model, state, names)
    check_not_meta(model, f"cannot merge {names}")
    if isinstance(weights, (numbers.Number, str, bytes)) or (isinstance(weights, torch.Tensor) and weights.dim() == 0):
        raise TypeError(f"weights must be a sequence of numbers, one per adapter in {names}; got {weights!r}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries for {len(names)} adapters {names}")
    bottlenecks = [n for n in names if state.adapters[n].kind == "bottleneck"]
    refusals = {n: _fold_refusal(model, state.adapters[n], n) for n in bottlenecks}
    folded = [n for n in bottlenecks if refusals[n] is None]
    bottlenecks = [n for n in bottlenecks if refusals[n] is not None]  # the ones that stay (absorbed)
    if bottlenecks and not absorb:
        raise ValueError(
            _bottleneck_refusal(bottlenecks[0], state.adapters[bottlenecks[0]].config, refusals[bottlenecks[0]])
        )
    if folded and (len(folded) > 1 or combination != "linear"):
        raise ValueError(f"fold one bottleneck adapter per merge_adapter call, with combination='linear' ({folded})")
    linear = [n for n in names if n not in bottlenecks and n not in folded]
    if combination != "linear" and any(state.adapters[n].kind != "lora" for n in linear):
        raise ValueError(f"{combination} combines LoRA adapters only; {linear} includes IA3 adapters")
    saved = _collect_saved(model, state, linear, [w for n, w in zip(names, weights) if n in linear], combination, safe)
    params_before = _count_parameters(model)

    if combination == "linear":  # the weights scale the low-rank terms: the merge kernel adds them in one pass
        lora_names = [n for n in linear if n not in folded]
        layers = _collect_layers(model, lora_names, [w for n, w in zip(names, weights) if n in lora_names])
        if folded:  # LoRA terms first (the bottleneck reads the LoRA-adapted projection), then the fold
            _merge_linear(layers, safe, keep_original=True)
            try:
                fold = _fold_layers(model, state.adapters[folded[0]], folded[0], weights[names.index(folded[0])])
                _merge_linear(fold, safe, keep_original=True)
            except BaseException:
                _restore(layers)
                raise
            layers += fold
            linear += folded
        else:
            _merge_linear(layers, safe, keep_original=exact)
    else:  # TIES / DARE weigh the task vectors after trimming and sign election
        layers = _collect_layers(model, linear, [1.0] * len(linear))
        _merge_combined(layers, weights, combination, density, seed, safe)
    _replace(saved)  # after the terms (checked before anything was written: it cannot fail on its own)
    layers += saved
    for n in linear:
        for path in state.adapters[n].saved:
            model.get_submodule(path).delete_adapter(n)
    for module in model.modules():  # drop the merged adapters without undoing anything
        if isinstance(module, LoraLinear):
            for n in linear:
                if module.has_adapter(n):
                    module.delete_adapter(n)
    for n in folded:
        for path in state.adapters[n].modules:
            model.get_submodule(path).delete_adapter(n)
    for n in linear:
        del state.adapters[n]
    state.active = tuple(a for a in state.active if a not in linear)
    for n in bottlenecks:
        state.absorbed = tuple(dict.fromkeys((*getattr(state, "absorbed", ()), n)))
    if linear:
        _records(model).append(MergeRecord(tuple(linear), combination, layers))
    if not state.adapters:
        pt.unpatch(model)
    log.info("merged %s (%s): %d -> %d parameters%s", linear, combination, params_before, _count_parameters(model),
             f"; absorbed {bottlenecks}" if bottlenecks else "")  # fmt: skip
    return model


def _collect_saved(model, state, names, weights, combination: str, safe: bool) -> list[_LayerMerge]:
    """The trained module copies (``modules_to_save``) of adapters ``names`` as replacements of the modules' tensors,
    as PEFT's ``merge_and_unload`` puts the active adapter's copy in the module's place; checked, nothing written."""
    holders: dict[str, list[str]] = {}
    for name, weight in zip(names, weights):
        for path in state.adapters[name].saved:
            holders.setdefault(path, []).append(name)
        if state.adapters[name].saved and (weight != 1.0 or combination != "linear"):
            raise ValueError(
                f"adapter {name!r} holds trained copies of {state.adapters[name].saved} (modules_to_save), which "
                f"replace those modules whole: merge it with combination='linear' and weight 1.0 (got "
                f"{combination!r}, {weight}); nothing was changed"
            )
    layers = []
    for path, holding in holders.items():
        if len(holding) > 1:
            raise ValueError(conflict(holding, repr(path)) + "; merge them one at a time. Nothing was changed")
        module = model.get_submodule(path)
        copy = module.modules_to_save[holding[0]].state_dict()
        for key, tensor in module.state_dict(keep_vars=True).items():
            if key.startswith("modules_to_save."):
                continue
            new = copy[key].detach()
            if safe and new.is_floating_point() and not torch.isfinite(new).all():
                raise ValueError(f"the trained copy of {path}.{key} has non-finite values; nothing was changed")
            layers.append(_LayerMerge(f"{path}.{key}", tensor, None, replacement=new))
    _check_not_shared(model, layers)
    return layers


@torch.no_grad()
def _replace(layers: list[_LayerMerge]) -> None:
    """Each tensor takes its copy's value; the original is kept (on the host) for :func:`unmerge_adapter`."""
    for layer in layers:
        layer.original = layer.weight.detach().to("cpu", copy=True)
    for layer in layers:
        layer.weight.data.copy_(layer.replacement)
        layer.replacement, layer.replaced = None, True


def _layer_weights(layer: _LayerMerge, weights: Sequence[float]) -> list[float]:
    """The weights of the adapters this layer carries (an adapter may target only some layers)."""
    return [weights[i] for i in layer.adapter_index]


def _collect_layers(model: nn.Module, names: list[str], weights: list[float]) -> list[_LayerMerge]:
    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        layer = _LayerMerge(path, module.weight, module.bias, fan_in_fan_out=module.fan_in_fan_out)
        for i, (n, w) in enumerate(zip(names, weights)):
            if n in module.lora_A:
                layer.adapter_index.append(i)
                layer.lora_A.append(module.lora_A[n].weight.detach())
                layer.lora_B.append(module.lora_B[n].weight.detach())
                layer.scales.append(w * module.scaling[n])
            elif n in module.ia3_l:
                ff = module.ia3_feedforward[n]
                dim = (1 if ff else 0) if not module.fan_in_fan_out else (0 if ff else 1)
                vec = module.ia3_l[n].detach()
                _check_ia3_power(vec, w, n, path)
                layer.ia3.append((vec if w == 1.0 else vec.pow(w), dim, not ff))
        if layer.lora_A or layer.ia3:
            layers.append(layer)
    _check_not_shared(model, layers)
    return layers


def _check_not_shared(model: nn.Module, layers: list[_LayerMerge]) -> None:
    """Refuse, before anything is written, to merge into a weight that is not the layer's alone:
    - two merged layers on one weight tensor (tied by the user, or views of one storage): ``W`` would take both
      layers' terms, ``W + d_1 + d_2``, and neither would compute its adapted output (PEFT merges it so silently);
    - a Parameter another module also holds (tied input and output embeddings: GPT-2's ``lm_head.weight`` is
      ``transformer.wte.weight``): ``s B A`` would change the embedding lookup too (PEFT merges and warns).
    Either way the merged model would no longer compute the adapted one."""
    seen: dict[tuple, str] = {}
    for layer in layers:
        w = layer.weight
        where = (w.device, w.data_ptr(), tuple(w.shape), w.stride())  # the same tensor (other overlaps: the kernel)
        if where in seen:
            raise ValueError(
                f"{seen[where]} and {layer.path} share one weight tensor and both carry adapters being merged: the "
                "merged weight would hold both layers' terms, so neither would compute its adapted output; merge "
                "the adapters of one of them, or untie the weights first; nothing was changed"
            )
        seen[where] = layer.path
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for layer in layers:
        names = owners.get(id(layer.weight), [])
        if len(names) > 1:
            raise ValueError(
                f"cannot merge into {layer.path}: its weight is shared by {names} (tied weights), so the merge would "
                "change every one of them; untie them first (load the model with tie_word_embeddings=False and copy "
                "the shared weight), or keep this adapter unmerged. Nothing was changed"
            )


@torch.no_grad()
def _check_ia3_power(vec: torch.Tensor, weight: float, name: str, path: str) -> None:
    """Refuse a merge weight that IA3 vector ``vec`` has no finite real power for: a fractional weight of a negative
    entry, a negative weight of a zero. It gave NaN / infinity, refused as a non-finite weight without the cause
    (``safe=True``) or written into the weight (``safe=False``)."""
    negative = not float(weight).is_integer() and bool((vec < 0).any())
    if negative or (weight < 0 and bool((vec == 0).any())):
        what = "negative entries" if negative else "zero entries"
        raise ValueError(
            f"IA3 adapter {name!r} has {what} in {path}: its merge weight {weight} (the power its vector is raised "
            "to) has no finite real value there; use an integer weight (a positive one for zeros). Nothing was changed"
        )


def _check_ia3(layers: list[_LayerMerge]) -> None:
    """Raise before anything is written if an IA3 scale makes a weight or bias non-finite. Each scale rounds, as
    ``scale_ia3_`` does; a weight that also takes LoRA terms is checked after them (see :func:`_merge_linear`)."""
    for layer in layers:
        w = layer.weight if not layer.lora_A else None
        b = layer.bias
        for vec, dim, scales_bias in layer.ia3:
            if w is not None:
                w = (w.float() * vec.float().reshape((-1, 1) if dim == 0 else (1, -1))).to(layer.weight.dtype)
            if scales_bias and b is not None:
                b = (b.float() * vec.float()).to(b.dtype)
        bad = w is not None and layer.ia3 and not torch.isfinite(w).all()
        bias_bad = b is not None and layer.ia3 and not torch.isfinite(b).all()
        if bad or bias_bad:
            part = "weight" if bad else "bias"
            raise ValueError(f"merging IA3 into {layer.path} would make its {part} non-finite; nothing was changed")


@torch.no_grad()
def _ia3_irreversible(layer: _LayerMerge) -> bool:
    """Whether dividing the IA3 scales out again would not give the weight (or the bias it scales) back within one
    ulp: a zero scale (``0 / 0``), or a value scaled below its dtype's smallest normal number, where the product keeps
    too few digits (an fp16 weight of 0.02 scaled by 1e-4). Such a weight keeps its original for
    :func:`unmerge_adapter` (the weight before the merge stands in for the LoRA-merged one of a mixed layer)."""
    for vec, dim, scales_bias in layer.ia3:
        v = vec.float()
        if bool((v == 0).any()):  # (a zero weight or bias too: 0 / 0)
            return True
        if bool((v.abs() >= 1).all()):  # nothing shrinks
            continue
        if _loses_digits(layer.weight, v.reshape((-1, 1) if dim == 0 else (1, -1))):
            return True
        if scales_bias and layer.bias is not None and _loses_digits(layer.bias, v):
            return True
    return False


def _loses_digits(tensor: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether a value of ``tensor`` times ``scale`` falls below the dtype's smallest normal number with a rounding
    step (the subnormal spacing) that, divided by ``|scale|``, exceeds one ulp of the value: the division would not
    give it back within one ulp."""
    info = torch.finfo(tensor.dtype)
    x = tensor.detach().float()
    small = (x != 0) & ((x * scale).abs() < info.tiny)
    if not bool(small.any()):
        return False
    step = info.tiny * info.eps  # the subnormal spacing (fp16 2^-24)
    ulp = torch.ldexp(torch.full_like(x, info.eps), torch.frexp(x).exponent - 1).clamp_min(step)
    return bool((small & (step / (2 * scale.abs()) > ulp)).any())


@torch.no_grad()
def _merge_linear(layers: list[_LayerMerge], safe: bool, keep_original: bool) -> None:
    # A LoRA term and an IA3 scale on the same weight: the scale applies to the LoRA-merged weight, so it is checked
    # as it is written, with every weight's original kept to restore on failure (rare: costs one host copy).
    mixed = safe and any(layer.lora_A and layer.ia3 for layer in layers)
    keep = [keep_original or (bool(layer.ia3) and _ia3_irreversible(layer)) for layer in layers]
    for layer, kept in zip(layers, keep):
        if kept or mixed:
            layer.original = layer.weight.detach().to("cpu", copy=True)
            layer.original_bias = None if layer.bias is None else layer.bias.detach().to("cpu", copy=True)
    lora_layers = [layer for layer in layers if layer.lora_A]
    new_biases = [
        None if layer.bias_delta is None else (layer.bias.float() + layer.bias_delta).to(layer.bias.dtype)
        for layer in layers
    ]
    if safe:
        _check_ia3(layers)
        for layer, new_bias in zip(layers, new_biases):
            if new_bias is not None and not torch.isfinite(new_bias).all():
                raise ValueError(f"folding into {layer.path} would make its bias non-finite; nothing was changed")
    if lora_layers:  # one launch per weight shape; with safe, every weight is checked before any write
        merge_lora_many_([x.weight.data for x in lora_layers], [x.lora_A for x in lora_layers],
                         [x.lora_B for x in lora_layers], [x.scales for x in lora_layers],
                         fan_in_fan_out=[x.fan_in_fan_out for x in lora_layers], safe=safe)  # fmt: skip
    for layer, new_bias in zip(layers, new_biases):  # a folded bottleneck's bias term (checked above)
        if new_bias is not None:
            layer.bias.data.copy_(new_bias)
    try:
        for layer in layers:  # IA3 after LoRA, as LoraLinear.merge does (biases checked above)
            for vec, dim, scales_bias in layer.ia3:
                try:
                    scale_ia3_(layer.weight.data, vec, dim=dim, safe=mixed and bool(layer.lora_A))
                except ValueError:
                    raise ValueError(
                        f"merging IA3 into {layer.path} after its LoRA terms would make its weight non-finite; "
                        "nothing was changed"
                    ) from None
                if scales_bias and layer.bias is not None:
                    layer.bias.data.mul_(vec)
    except BaseException:
        if mixed:
            _restore(layers)
        raise
    if mixed:
        for layer, kept in zip(layers, keep):
            if not kept:
                layer.original = layer.original_bias = None


@torch.no_grad()
def _restore(layers: list[_LayerMerge]) -> None:
    for layer in layers:
        layer.weight.data.copy_(layer.original.to(layer.weight.device))
        if layer.original_bias is not None:
            layer.bias.data.copy_(layer.original_bias.to(layer.bias.device))


@torch.no_grad()
def _merge_combined(layers, weights, method, density, seed, safe) -> None:
    """TIES / DARE: compute every layer's combined delta, check all, then write (one rounding per element)."""
    generator_device = layers[0].weight.device if layers else torch.device("cpu")
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    merged = []
    for layer in layers:
        delta = _combine(_task_deltas(layer), _layer_weights(layer, weights), method, density, generator)
        new = (layer.weight.float() + delta).to(layer.weight.dtype)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"{method} merge into {layer.path} would produce non-finite values; nothing was changed")
        merged.append(new)
    for layer, new in zip(layers, merged):
        layer.original = layer.weight.detach().to("cpu", copy=True)
        layer.weight.data.copy_(new)


@torch.no_grad()
def unmerge_adapter(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo the :func:`merge_adapter` call that merged ``name`` (default: the last merge; the latest one that merged
    ``name``, when an adapter of that name was merged more than once).

    Linear merges are subtracted again (within one ulp of the merged weight plus one of the weight before the
    merge: each direction rounds once); merges made with ``exact=True`` (and TIES / DARE merges) restore the saved
    weights bit for bit. The adapter itself is not re-attached: load it again to run it unmerged.
    """
    records = model.__dict__.get(_MERGES_ATTR)  # (not _records: a refused call adds nothing to the model)
    if not records:
        raise ValueError(f"{type(model).__name__} has no merged adapter to unmerge")
    latest = (i for i in reversed(range(len(records))) if name in records[i].names)
    index = len(records) - 1 if name is None else next(latest, None)
    if index is None:
        merged = [n for r in records for n in r.names]
        raise ValueError(f"adapter {name!r} was not merged into this model; merged: {merged}")
    record = records[index]
    exact = all(layer.original is not None for layer in record.layers)
    if exact and index != len(records) - 1:
        later = [n for r in records[index + 1 :] for n in r.names]
        raise ValueError(f"unmerge {later} first: a bit-exact restore of {record.names} must undo later merges first")
    if not exact:
        _check_commutes(record, records[index + 1 :])
    if exact:
        _restore(list(reversed(record.layers)))  # a weight may appear twice (LoRA, then a fold): first wins last
    else:  # (a layer with its original kept, a replaced module copy or an IA3 scale that cannot be undone: restored)
        for layer in record.layers:
            for vec, dim, scales_bias in reversed(layer.ia3 if layer.original is None else []):
                scale_ia3_(layer.weight.data, vec, dim=dim, inverse=True)
                if scales_bias and layer.bias is not None:
                    layer.bias.data.div_(vec)
        _restore([layer for layer in record.layers if layer.original is not None])
        lora_layers = [layer for layer in record.layers if layer.lora_A and layer.original is None]
        if lora_layers:
            unmerge_lora_many_([x.weight.data for x in lora_layers], [x.lora_A for x in lora_layers],
                               [x.lora_B for x in lora_layers], [x.scales for x in lora_layers],
                               fan_in_fan_out=[x.fan_in_fan_out for x in lora_layers])  # fmt: skip
    del records[index]
    if not records:  # the last merge undone: nothing of the merges is left on the model
        del model.__dict__[_MERGES_ATTR]
    log.info("unmerged %s (%s)", list(record.names), "bit-exact" if exact else "within one ulp")
    return model


def _check_commutes(record: MergeRecord, later: list[MergeRecord]) -> None:
    """Undoing ``record`` before the ``later`` merges is correct only where they commute on every shared weight:
    LoRA terms with LoRA terms (additions), IA3 scales with IA3 scales (products). A LoRA term and an IA3 scale do
    not (``(W + d) * l - d != W * l``), a later bit-exact merge would restore a copy that still holds
    ``record``'s terms, and a copy ``record`` kept would drop the later merge's terms."""
    for other in later:
        for mine in record.layers:
            for theirs in other.layers:
                if mine.weight is not theirs.weight:
                    continue
                mixed = (mine.lora_A and theirs.ia3) or (mine.ia3 and theirs.lora_A)
                if mixed or theirs.original is not None or mine.original is not None:
                    raise ValueError(
                        f"unmerge {list(other.names)} first: it was merged into {theirs.path} after "
                        f"{list(record.names)}, and undoing {list(record.names)} before it would corrupt that "
                        "weight (LoRA and IA3 merges do not commute; a bit-exact merge restores its saved copy)"
                    )


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters merged into ``model`` (and not unmerged since), oldest first."""
    return [n for record in model.__dict__.get(_MERGES_ATTR, []) for n in record.names]
