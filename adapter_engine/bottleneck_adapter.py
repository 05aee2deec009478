"""One bottleneck adapter as a module, with AdapterHub's parameter names (``adapter_down.0.weight``, ...), and the
packing of several into the fused op's stacked weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.bottleneck import ACTIVATIONS, PackedStack, StackOptions, pack_adapters

_HALF = (torch.float16, torch.bfloat16)


def as_computed(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as a bottleneck adapter computes with it on activations of ``dtype``: a float32 master weight of a float16
    / bfloat16 model (``autocast_adapter_dtype``) cast to that dtype, as autocast casts fp32 weights (differentiable:
    its gradient arrives in fp32); any other tensor as given."""
    return t.to(dtype) if t.dtype is torch.float32 and dtype in _HALF else t


_TORCH_ACT = {
    0: nn.Identity,
    1: nn.ReLU,
    2: nn.GELU,
    3: lambda: nn.GELU(approximate="tanh"),
    4: nn.SiLU,
    5: nn.Tanh,
}


class _Activation(nn.Module):
    """AdapterHub's activation slot in ``adapter_down`` (no parameters)."""

    def __init__(self, name: str):
        super().__init__()
        if name.lower() not in ACTIVATIONS:
            raise ValueError(f"unsupported non_linearity {name!r}; supported: {sorted(ACTIVATIONS)}")
        self.name = name.lower()
        self.f = _TORCH_ACT[ACTIVATIONS[self.name]]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter ``A(v) = dropout(scaling * up(act(down(v))))`` with AdapterHub's parameter names.

    Args:
        hidden_size: H, the model's hidden size.
        bottleneck_size: r, AdapterHub's ``hidden_size // reduction_factor`` (at least 1).
        non_linearity: relu, gelu (erf; also gelu_python), gelu_new (tanh form; also gelu_pytorch_tanh, gelu_fast,
            gelu_accurate, gelu_python_tanh), swish/silu, tanh, identity/linear/none.
        scaling: float multiplier of the up-projection (AdapterHub ``scaling``; 4.0 in ``par_bn``).
        is_parallel, original_ln_before, original_ln_after, residual_before_ln, adapter_residual_before_ln,
        ln_before, ln_after: AdapterHub ``BnConfig`` fields of the same names (structural: all adapters in one
            stack must agree).
        init_weights: "bert" (normal 0.02, zero biases), "houlsby" (truncated normal 1e-2) or "mam_adapter"
            (kaiming down, zero up), as AdapterHub.
        init_weights_seed: AdapterHub's: a nonzero seed draws the init from a generator seeded with it, so that every
            adapter of the config starts alike (AdapterHub's values on the CPU; it reseeds torch's global generator,
            this a generator of its own). None or 0: torch's global generator.
        dropout: AdapterHub's adapter dropout rate, in [0, 1]: applied in training mode to the scaled up-projection,
            before ``ln_after`` and the residual, as AdapterHub's ``Adapter`` / ``ParallelAdapter``; identity in eval
            mode. A stack with an adapter that drops (training mode, rate > 0) runs its eager modules, not the fused
            op, which has no dropout.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        *,
        is_parallel: bool = False,
        original_ln_before: bool = True,
        original_ln_after: bool = True,
        residual_before_ln: bool | str = True,
        adapter_residual_before_ln: bool = False,
        ln_before: bool = False,
        ln_after: bool = False,
        init_weights: str = "bert",
        dropout: float = 0.0,
        init_weights_seed: int | None = None,
    ):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"adapter dropout must be a number in [0, 1], got {dropout!r}")
        if not isinstance(scaling, (int, float)):
            raise TypeError(f"scaling must be a float (learned/channel scaling is not supported), got {scaling!r}")
        bottleneck_size = max(int(bottleneck_size), 1)
        self.hidden_size, self.bottleneck_size, self.scaling = hidden_size, bottleneck_size, float(scaling)
        self.non_linearity = non_linearity.lower()
        self.options = StackOptions(
            is_parallel=is_parallel,
            original_ln_before=original_ln_before,
            original_ln_after=original_ln_after,
            residual_before_ln=residual_before_ln,
            adapter_residual_before_ln=adapter_residual_before_ln,
            ln_before=ln_before,
            ln_after=ln_after,
        )
        seq: list[nn.Module] = []
        if ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden_size)
            seq.append(self.adapter_norm_before)
        seq += [nn.Linear(hidden_size, bottleneck_size), _Activation(non_linearity)]
        self.adapter_down = nn.Sequential(*seq)
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size)
        if ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(float(dropout))  # (AdapterHub's module name; no parameters)
        self.reset_parameters(init_weights, init_weights_seed)

    @property
    def down(self) -> nn.Linear:
        # (read through the module dicts: indexing the Sequential was most of packed_tensors' host time)
        return self._modules["adapter_down"]._modules["1" if self.options.ln_before else "0"]

    @torch.no_grad()
    def reset_parameters(self, init_weights: str = "bert", seed: int | None = None) -> None:
        """AdapterHub's inits, drawn in its order (down, then up); ``seed``: see ``init_weights_seed``."""
        down, up = self.down, self.adapter_up
        gen = None
        if seed and down.weight.device.type != "meta":
            gen = torch.Generator(down.weight.device).manual_seed(seed)
        if init_weights == "bert":
            for lin in (down, up):
                lin.weight.normal_(0.0, 0.02, generator=gen)
                lin.bias.zero_()
        elif init_weights == "houlsby":
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2, generator=gen)
                lin.bias.zero_()
        elif init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=gen)
            down.bias.zero_()
            up.weight.zero_()
            up.bias.zero_()
        else:
            raise ValueError(f"unknown init_weights {init_weights!r}; supported: bert, houlsby, mam_adapter")

    def packed_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every parameter of the adapter (the ones ``pack_modules`` copies: down and up weights and biases, its own
        LayerNorms), read from the submodules' parameter dicts. The fused path keys its pack cache on them at every
        call; ``parameters()`` walks the module tree, a third of a fused stack call's host time (CPU profile)."""
        down, up = self.down._parameters, self._modules["adapter_up"]._parameters
        out = (down["weight"], down["bias"], up["weight"], up["bias"])
        if self.options.ln_before:
            out += (self.adapter_norm_before.weight, self.adapter_norm_before.bias)
        if self.options.ln_after:
            out += (self.adapter_norm_after.weight, self.adapter_norm_after.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """The LayerNorm before the down projection is registered twice (``adapter_norm_before`` and
        ``adapter_down.0``, as AdapterHub's module registers it), and a patched model's ``save_pretrained`` writes it
        once (safetensors refuses shared tensors): a state dict with either name loads both. The missing second name
        used to fail a strict ``load_state_dict`` of such a checkpoint and made ``Trainer``'s resume and best-model
        loads warn of missing adapter weights, though the shared tensor was loaded."""
        if self.options.ln_before:
            for key in ("weight", "bias"):
                first, second = f"{prefix}adapter_norm_before.{key}", f"{prefix}adapter_down.0.{key}"
                if first in state_dict and second not in state_dict:
                    state_dict[second] = state_dict[first]
                elif second in state_dict and first not in state_dict:
                    state_dict[first] = state_dict[second]
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def drops(self) -> bool:
        """Whether a forward now draws a dropout mask (training mode, rate > 0): the fused op cannot run it."""
        return self.training and self.dropout.p > 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eager ``dropout(scaling * up(act(down(LNb(x)))))``: (..., H) -> (..., H), in the weights' dtype arithmetic
        (AdapterHub's order: the scaling, then the dropout). float32 master weights of a 16-bit ``x`` compute as their
        casts to ``x``'s dtype (:func:`as_computed`): the same ops as the adapter cast to it, bit for bit."""
        if x.dtype in _HALF and self.down.weight.dtype is torch.float32:
            up = self._forward_cast(x) * self.scaling
        else:
            up = self.adapter_up(self.adapter_down(x)) * self.scaling
        return self.dropout(up) if self.dropout.p > 0.0 else up

    def _forward_cast(self, x: torch.Tensor) -> torch.Tensor:
        """``up(act(down(LNb(x))))`` with every weight as :func:`as_computed` gives it (nn.Linear and nn.LayerNorm's
        own functional calls, on the casts)."""
        dt = x.dtype
        if self.options.ln_before:
            x = _layer_norm(self.adapter_norm_before, x)
        down, up = self.down, self.adapter_up
        z = F.linear(x, as_computed(down.weight, dt), as_computed(down.bias, dt))
        act = self._modules["adapter_down"]._modules["2" if self.options.ln_before else "1"]
        return F.linear(act(z), as_computed(up.weight, dt), as_computed(up.bias, dt))

    def norm_after(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's own LayerNorm on its output (``ln_after``), float32 masters as their casts to ``x``'s dtype."""
        return _layer_norm(self.adapter_norm_after, x)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    if ln.weight.dtype is torch.float32 and x.dtype in _HALF:
        return F.layer_norm(x, ln.normalized_shape, as_computed(ln.weight, x.dtype), as_computed(ln.bias, x.dtype),
                            ln.eps)  # fmt: skip
    return ln(x)


def pack_modules(adapters: Sequence[BottleneckAdapter], dtype: torch.dtype | None = None) -> PackedStack:
    """The fused op's packed weights of ``adapters`` (stacked along the bottleneck axis, in this order) for
    activations of ``dtype``: float32 masters of a 16-bit model packed as their casts (:func:`as_computed`)."""
    first = adapters[0].options

    def parts(get):
        return [as_computed(get(a), dtype) for a in adapters]

    def norms(attr):
        return list(zip(parts(lambda a: getattr(a, attr).weight), parts(lambda a: getattr(a, attr).bias), strict=True))

    packed = pack_adapters(
        parts(lambda a: a.down.weight),
        parts(lambda a: a.down.bias),
        parts(lambda a: a.adapter_up.weight),
        parts(lambda a: a.adapter_up.bias),
        [a.non_linearity for a in adapters],
        [a.scaling for a in adapters],
        ln_before=norms("adapter_norm_before") if first.ln_before else None,
        ln_after=norms("adapter_norm_after") if first.ln_after else None,
    )
    if dtype not in _HALF:
        return packed
    # which adapters train, read from the weights themselves: casts made without autograd (split_pack's template)
    # require no grad, and the fused backward computed no weight gradients for them
    trainable = tuple(any(t.requires_grad for t in a.packed_tensors()[:4]) for a in adapters)
    return packed._replace(host=packed.host._replace(trainable=trainable))


class TrainingPack(NamedTuple):
    """A pack of adapters of which some train, split so that a training step packs only those again: ``template``
    (the whole pack, copied once, without autograd: its host facts and unit tables), and per run of adapters in
    pack order either the frozen ones' parts (down weight, down bias, up weight transposed (r, H), up bias (k, H):
    views of the template) or the index of an adapter that trains (its parts read at every call)."""

    template: PackedStack
    runs: tuple
    dtype: torch.dtype | None = None  # the activations' dtype it was packed for (see pack_modules)


def split_pack(adapters: Sequence[BottleneckAdapter], dtype: torch.dtype | None = None) -> TrainingPack | None:
    """The :class:`TrainingPack` of ``adapters`` (pack order) for activations of ``dtype``, or None where it saves
    nothing: no adapter frozen, none training, or adapters with their own LayerNorms (packed whole:
    :func:`pack_modules`). Called without autograd."""
    trains = [any(t.requires_grad for t in a.packed_tensors()) for a in adapters]
    if all(trains) or not any(trains) or adapters[0].options.ln_before or adapters[0].options.ln_after:
        return None
    template = pack_modules(adapters, dtype)
    offsets, wu_t, runs, start = template.host.offsets, template.wu.t(), [], 0
    for i, train in enumerate([*trains, True]):  # (a sentinel closes the last frozen run)
        if train:
            if start < i:
                lo, hi = offsets[start], offsets[i]
                runs.append((template.wd[lo:hi], template.bd[lo:hi], wu_t[lo:hi], template.bu[start:i]))
            if i < len(adapters):
                runs.append(i)
            start = i + 1
    return TrainingPack(template, tuple(runs), dtype)


def repack(split: TrainingPack, weights: Sequence[tuple[torch.Tensor, ...]]) -> PackedStack:
    """``split``'s pack with the training adapters' current weights (``weights``: each adapter's ``packed_tensors()``),
    differentiable with respect to them: the same tensors as :func:`pack_modules` makes, four concatenations (float32
    masters cast as the template was packed)."""
    wd, bd, wu, bu = [], [], [], []
    for run in split.runs:
        if isinstance(run, int):
            w = [as_computed(t, split.dtype) for t in weights[run][:4]]
            run = (w[0], w[1], w[2].t(), w[3].unsqueeze(0))
        wd.append(run[0])
        bd.append(run[1])
        wu.append(run[2])
        bu.append(run[3])
    return split.template._replace(wd=torch.cat(wd), bd=torch.cat(bd), wu=torch.cat(wu).t(), bu=torch.cat(bu))
