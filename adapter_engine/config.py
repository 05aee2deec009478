"""Adapter configurations with the field names users know from PEFT (LoRA, IA3) and AdapterHub (bottleneck).

Each config is a dataclass. ``from_dict`` reads the dict that the home library writes into ``adapter_config.json``
(PEFT: the file itself; AdapterHub: its ``"config"`` entry), ignoring bookkeeping fields and refusing, with a
``ValueError`` naming the field, features the engine does not implement (DoRA, PHM layers, gating, ...), so that an
adapter never runs with silently different semantics. ``to_dict`` writes a dict the home library accepts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .kernels.bottleneck import ACTIVATIONS as _KERNEL_ACTIVATIONS
from .peft_targets import check_layer_fields, pattern_key, regex_list

logger = logging.getLogger(__name__)

#: Activations a bottleneck adapter may use (AdapterHub's names; "gelu" is the erf form, "swish" is SiLU).
ACTIVATIONS = tuple(sorted(_KERNEL_ACTIVATIONS))


class Stack:
    """Run adapters one after the other (AdapterHub's ``Stack``); for LoRA adapters, their terms are summed.

    ``Stack("a", "b")`` and ``set_active_adapters(model, ["a", "b"])`` mean the same thing.
    """

    def __init__(self, *children: str) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children or not all(isinstance(c, str) for c in children):
            raise TypeError(f"Stack takes adapter names (str), got {children!r}")
        self.children: tuple[str, ...] = tuple(children)

    def __iter__(self):
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and other.children == self.children

    def __repr__(self) -> str:
        return f"Stack({', '.join(repr(c) for c in self.children)})"


def _positive_number(value: Any) -> bool:
    """A real number (not a bool) that is finite and > 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_fields(cls: type, data: Mapping[str, Any], ignored: Sequence[str], unsupported: Mapping[str, Any]) -> dict:
    """Keep the fields of ``cls``; refuse fields in ``unsupported`` whose value is not the neutral one given."""
    known = {f.name for f in dataclasses.fields(cls)}
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key in unsupported:
            neutral = unsupported[key]
            if value != neutral and not (neutral in (None, False) and not value):
                raise ValueError(
                    f"{cls.__name__}: '{key}'={value!r} is not supported by adapter-engine (only {neutral!r})"
                )
        elif key in known:
            kept[key] = value
        elif key not in ignored:
            logger.debug("%s: ignoring unknown field %r=%r", cls.__name__, key, value)
    return kept


def _check_number(owner: str, name: str, value: Any) -> None:
    """A finite int or float (not a bool, not a numeric string: PEFT would not accept those either)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r} ({type(value).__name__})")


def _module_list(owner: str, value: Any) -> list[str] | None:
    """PEFT's ``modules_to_save``: None, or module-name endings (a name alone is one entry)."""
    if value is None:
        return None
    value = [value] if isinstance(value, str) else sorted(value) if isinstance(value, (set, tuple)) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}: modules_to_save must be a list of module names, got {value!r}")
    return value or None


#: PEFT's names of the embedding layers ``ensure_weight_tying`` ties (``EMBEDDING_LAYER_NAMES``)
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_entries(data: Mapping[str, Any]) -> list[str]:
    """The ``modules_to_save`` / ``target_modules`` entries of a PEFT LoRA config that PEFT's ``_check_tied_modules``
    counts as embedding layers (last name part ``embed_tokens`` or ``lm_head``; a regex matching either name)."""
    saved = data.get("modules_to_save") or []
    found = [m for m in ([saved] if isinstance(saved, str) else saved) if m.split(".")[-1] in _EMBEDDING_LAYER_NAMES]
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        found += [e for e in _EMBEDDING_LAYER_NAMES if targets.lower() != "all-linear" and re.fullmatch(targets, e)]
    else:
        found += [t for t in targets if t.split(".")[-1] in _EMBEDDING_LAYER_NAMES]
    return sorted(set(found))


#: PEFT ``init_lora_weights`` values (besides ``pissa*`` / ``corda*``) whose initialisation rewrites the base weights.
_BASE_CHANGING_INITS = ("olora", "loftq", "lora_ga")
#: ``init_lora_weights`` names ``add_adapter`` initialises as PEFT does ("lora": the engine's name for True).
_FRESH_INITS = ("lora", "gaussian", "orthogonal")
#: PEFT initialisations a saved adapter may name (its forward is plain LoRA) but ``add_adapter`` cannot make: EVA's
#: data-driven init (PEFT's initialize_lora_eva_weights) and MiCA (B from the base's SVD, then frozen in training).
_SAVED_ONLY_INITS = ("eva", "mica")


@dataclass
class LoraConfig:
    """LoRA: ``y = x W^T + b + scaling * dropout(x) A^T B^T`` with ``A (r, in)``, ``B (out, r)`` (PEFT's names).

    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``target_modules`` are module-name
    suffixes (PEFT's rule: ``"dense"`` matches every ``*.dense``) or one regex string matched against full names;
    ``None`` takes the default targets of the model's architecture. PEFT's per-layer fields, with its semantics
    (:func:`~adapter_engine.peft_targets.peft_selects`, :meth:`rank_for`): ``exclude_modules`` leaves layers out;
    ``layers_to_transform`` (an index or a list) keeps only the layers of those blocks (``layers_pattern`` names
    the block list, e.g. ``"layers"``); ``rank_pattern`` / ``alpha_pattern`` give some layers (regex keys matched
    against the end of their names) another ``r`` / ``lora_alpha``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None  # whole modules trained per adapter (a head): see saved_modules.py
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules_to_save = _module_list("LoraConfig", self.modules_to_save)
        check_layer_fields(self)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive int, got {self.r!r}")
        _check_number("LoraConfig", "lora_alpha", self.lora_alpha)
        _check_number("LoraConfig", "lora_dropout", self.lora_dropout)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig: bias={self.bias!r} is not supported (only 'none': base biases stay frozen)")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        init = self.init_lora_weights.lower() if isinstance(self.init_lora_weights, str) else None
        if init is not None and (init.startswith(("pissa", "corda")) or init in _BASE_CHANGING_INITS):
            raise ValueError(
                f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported by adapter-engine: that "
                "initialisation also rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), so an adapter "
                "saved without conversion only fits that modified base. Save it from PEFT with "
                "path_initial_model_for_weight_conversion= (a plain LoRA for the original base) or merge it there"
            )
        if init is not None and init not in _FRESH_INITS + _SAVED_ONLY_INITS:
            raise ValueError(
                f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not a known initialisation; known: True, "
                f"False, {sorted(_FRESH_INITS + _SAVED_ONLY_INITS)}"
            )
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"LoraConfig: init_lora_weights must be a bool or a name, got {self.init_lora_weights!r}")

    @property
    def scaling(self) -> float:
        """The scaling of layers that ``rank_pattern`` / ``alpha_pattern`` leave alone (see :meth:`scaling_for`)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, name: str) -> int:
        """``r`` of the layer with full module name ``name`` (PEFT: ``rank_pattern``'s first matching key, else r)."""
        key = pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def scaling_for(self, name: str) -> float:
        """The scaling of layer ``name``: its alpha over its r (sqrt(r) with ``use_rslora``), as PEFT's layers."""
        key = pattern_key(self.alpha_pattern, name)
        alpha = self.lora_alpha if key is None else self.alpha_pattern[key]
        r = self.rank_for(name)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Read a PEFT ``adapter_config.json`` dict (``peft_type`` "LORA")."""
        peft_type = getattr(data.get("peft_type", "LORA"), "value", data.get("peft_type", "LORA"))
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"LoraConfig.from_dict: peft_type {peft_type!r} is not LORA")
        unsupported = {
            "use_dora": False,
            "lora_bias": False,
            "use_qalora": False,
            "trainable_token_indices": None,
            "target_parameters": None,
            "megatron_config": None,
            "layer_replication": None,
            # LoRA variants of PEFT 0.21 that change the forward (or the training step) of a saved adapter
            "alora_invocation_tokens": None,  # aLoRA: the adapter acts only after the invocation tokens
            "use_bdlora": None,  # block-diagonal A or B factors
            "arrow_config": None,  # routing among several LoRA experts per token
            "kasa_config": None,  # SVD-truncated base weight and a learned singular-value diagonal
            "velora_config": None,  # compressed-activation backward of A (its buffers are saved with the adapter)
            "monteclora_config": None,  # Monte Carlo sampled A in training (its sampler is saved with the adapter)
        }
        ignored = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")
        if data.get("ensure_weight_tying") and (tied := _embedding_entries(data)):
            raise ValueError(
                f"LoraConfig: 'ensure_weight_tying'=True with the embedding layers {tied} in modules_to_save / "
                "target_modules (PEFT adds the input embeddings there itself for a named lm_head) is not supported by "
                "adapter-engine: on a model whose output embeddings are tied to its input embeddings "
                "(tie_word_embeddings), PEFT then ties the lm_head's trained copy or LoRA to the input embedding's, "
                "which the engine does not. On a model without tied embeddings the field changes nothing: set it to "
                "False"
            )
        if data.get("target_parameters"):  # before the others: PEFT fills alpha_pattern for them (MoE "all-linear")
            raise ValueError(
                f"LoraConfig: 'target_parameters'={data['target_parameters']!r} is not supported by adapter-engine: "
                "LoRA on parameters (the fused experts or the router of a mixture-of-experts block) is not a "
                "Linear / Conv1D layer the engine can wrap; only target_modules layers carry LoRA"
            )
        return cls(**_check_fields(cls, data, ignored, unsupported))

    def to_dict(self) -> dict[str, Any]:
        """A PEFT-loadable ``adapter_config.json`` dict."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", task_type=None, base_model_name_or_path=None, inference_mode=True)
        out.update(use_dora=False)
        return out


@dataclass
class IA3Config:
    """IA3 (PEFT's names): learned vectors rescale a module's output, or its input for ``feedforward_modules``.

    ``y = (x W^T + b) * l`` with ``l (out,)``; for feed-forward modules ``y = (x * l) W^T + b`` with ``l (in,)``.
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    modules_to_save: list[str] | None = None  # as LoraConfig's
    exclude_modules: list[str] | str | None = None  # as LoraConfig's

    def __post_init__(self) -> None:
        self.modules_to_save = _module_list("IA3Config", self.modules_to_save)
        self.exclude_modules = regex_list("IA3Config", "exclude_modules", self.exclude_modules)
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IA3Config:
        peft_type = getattr(data.get("peft_type", "IA3"), "value", data.get("peft_type", "IA3"))
        if str(peft_type).upper() != "IA3":
            raise ValueError(f"IA3Config.from_dict: peft_type {peft_type!r} is not IA3")
        ignored = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")
        return cls(**_check_fields(cls, data, ignored, {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peft_type="IA3", task_type=None, base_model_name_or_path=None, inference_mode=True)
        return out


# AdapterHub 1.3.0's bottleneck inits, and "normal" (N(0, init_range), the tutorial AdapterConfig's)
_BOTTLENECK_INITS = ("bert", "houlsby", "mam_adapter", "normal")


@dataclass
class BottleneckConfig:
    """A bottleneck adapter ``A(v) = up(act(down(v)))`` (AdapterHub's ``BnConfig`` field names).

    Placement: ``mh_adapter`` after the attention sublayer, ``output_adapter`` after the feed-forward sublayer.
    ``reduction_factor`` sets the bottleneck width ``hidden // reduction_factor`` (a mapping may give per-layer
    factors, keys ``"<layer index>"`` and the default ``"default"``); ``bottleneck_size`` overrides it with an
    exact width. Presets: :meth:`seq_bn` (Pfeiffer), :meth:`double_seq_bn` (Houlsby), :meth:`par_bn`.
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | Mapping[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | str = 1.0
    dropout: float = 0.0
    leave_out: list[int] = field(default_factory=list)
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    init_range: float = 1e-2
    bottleneck_size: int | None = None

    def __post_init__(self) -> None:
        act = str(self.non_linearity).lower()
        if act not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig: unknown non_linearity {self.non_linearity!r}; known: {ACTIVATIONS}")
        self.non_linearity = act
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("BottleneckConfig: at least one of mh_adapter / output_adapter must be True")
        if isinstance(self.scaling, str) and self.scaling.lower() in ("learned", "channel"):
            # a trained scalar (AdapterHub's scaled_par_bn) or per-channel vector (AdapterPlus), saved as a parameter
            raise ValueError(
                f"BottleneckConfig: scaling={self.scaling!r} (a trained scaling parameter) is not supported by "
                "adapter-engine: only a number"
            )
        if isinstance(self.scaling, str):
            try:
                self.scaling = float(self.scaling)
            except ValueError:
                raise ValueError(f"BottleneckConfig: scaling must be a number, got {self.scaling!r}") from None
        if self.init_weights not in _BOTTLENECK_INITS:
            # AdapterHub refuses any other ("Unknown init_weights type"); a fresh adapter got "bert"'s, without a word
            raise ValueError(
                f"BottleneckConfig: unknown init_weights {self.init_weights!r}; supported: {_BOTTLENECK_INITS}"
            )
        if self.residual_before_ln == "post_add" and not (self.original_ln_before or self.is_parallel):
            # AdapterHub takes the "post_add" residual after the sublayer's input is added (original_ln_before); without
            # it, its forward fails (residual unset); the engine ran such an adapter as residual_before_ln=True
            raise ValueError(
                "BottleneckConfig: residual_before_ln='post_add' needs original_ln_before=True (AdapterHub's forward "
                "fails without it); use residual_before_ln=True for the sublayer output as the residual"
            )
        seed = self.init_weights_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"BottleneckConfig: init_weights_seed must be an int or None, got {seed!r}")
        _check_number("BottleneckConfig", "dropout", self.dropout)
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"BottleneckConfig: dropout must be in [0, 1], got {self.dropout!r}")
        rf = self.reduction_factor
        factors = rf.items() if isinstance(rf, Mapping) else [(None, rf)]
        for key, value in factors:
            if not _positive_number(value):
                where = "reduction_factor" if key is None else f"reduction_factor[{key!r}]"
                raise ValueError(f"BottleneckConfig: {where} must be a positive finite number, got {value!r}")
        size = self.bottleneck_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise ValueError(f"BottleneckConfig: bottleneck_size must be a positive int or None, got {size!r}")

    def size_for(self, hidden_size: int, layer: int) -> int:
        """Bottleneck width at ``layer`` for a model of ``hidden_size``: AdapterHub's ``int(hidden // factor)``, raised
        to 1 when the factor exceeds the hidden size, as AdapterHub does (an adapter it saved so used to be refused)."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer) in rf:
                rf = rf[str(layer)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise ValueError(f"BottleneckConfig: reduction_factor {dict(rf)} has no entry for layer {layer}")
        return max(int(hidden_size // rf), 1)  # at least 1, as AdapterHub's Adapter makes it

    @classmethod
    def seq_bn(cls, **kw: Any) -> BottleneckConfig:
        """Pfeiffer / seq_bn: one adapter after the feed-forward block, reading the LayerNormed sum."""
        base = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu"}
        return cls(**base | kw)

    @classmethod
    def double_seq_bn(cls, **kw: Any) -> BottleneckConfig:
        """Houlsby / double_seq_bn: adapters after attention and after the feed-forward block."""
        base = {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish"}
        return cls(**base | {"original_ln_before": False} | kw)

    @classmethod
    def par_bn(cls, **kw: Any) -> BottleneckConfig:
        """Parallel adapter (He et al.): ``scaling * A(y)`` added beside the feed-forward block."""
        base = {"reduction_factor": 2, "is_parallel": True, "scaling": 4.0, "original_ln_before": False}
        return cls(**base | {"residual_before_ln": True, "init_weights": "mam_adapter"} | kw)

    @classmethod
    def preset(cls, name: str) -> BottleneckConfig:
        presets = {"seq_bn": cls.seq_bn, "pfeiffer": cls.seq_bn, "double_seq_bn": cls.double_seq_bn}
        presets |= {"houlsby": cls.double_seq_bn, "par_bn": cls.par_bn, "parallel": cls.par_bn}
        if name.lower() not in presets:
            raise ValueError(f"unknown adapter config name {name!r}; known: {sorted(presets)}")
        return presets[name.lower()]()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BottleneckConfig:
        """Read AdapterHub's config dict (the ``"config"`` entry of its ``adapter_config.json``)."""
        arch = data.get("architecture")
        if arch not in (None, "bottleneck"):
            raise ValueError(f"BottleneckConfig.from_dict: architecture {arch!r} is not a bottleneck adapter")
        unsupported = {
            "phm_layer": False,
            "use_gating": False,
            "inv_adapter": None,
            "cross_adapter": False,
            "stochastic_depth": 0.0,
        }
        ignored = ("architecture", "inv_adapter_reduction_factor", "phm_dim", "shared_W_phm")
        ignored += ("shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm")
        ignored += ("hypercomplex_nonlinearity", "phm_rank", "phm_bias", "factorized_phm_W")
        # AdapterHub's BnConfig has no default for these four (its loader refuses a dict without them), and its
        # default original_ln_before is False (only the seq_bn presets set True): a dict without that field, which
        # AdapterHub runs Houlsby-style, used to take this class's True and run seq_bn-style, without a word
        missing = [k for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity") if k not in data]
        if missing:
            raise ValueError(
                f"BottleneckConfig.from_dict: {missing} missing (AdapterHub's BnConfig requires them); for the "
                "engine's defaults pass a BottleneckConfig(...) or a preset name such as 'seq_bn'"
            )
        data = {"original_ln_before": False, **data}
        return cls(**_check_fields(cls, data, ignored, unsupported))

    def to_dict(self) -> dict[str, Any]:
        """AdapterHub's full field dict (what adapters 1.3.0 writes under ``"config"``)."""
        out = dataclasses.asdict(self)
        out.pop("init_range")
        out.pop("bottleneck_size")
        if out["init_weights"] == "normal":  # not an AdapterHub 1.3.0 init; only fresh adapters use it
            out["init_weights"] = "bert"  # the closest
        out.update(use_gating=False, phm_layer=False, inv_adapter=None, cross_adapter=False)
        out.update(stochastic_depth=0.0, inv_adapter_reduction_factor=None)
        out.update(phm_dim=4, shared_W_phm=False, shared_phm_rule=True, factorized_phm_rule=False, phm_bias=True)
        out.update(phm_c_init="normal", phm_init_range=0.0001, learn_phm=True, factorized_phm_W=True, phm_rank=1)
        out.update(hypercomplex_nonlinearity="glorot-uniform")
        if isinstance(out["reduction_factor"], float) and out["reduction_factor"].is_integer():
            out["reduction_factor"] = int(out["reduction_factor"])
        # AdapterHub looks the activation up in transformers' ACT2FN, where the identity is only "linear", and takes
        # a scaling only as a float (it refused "identity", "none" and an int scaling such as 2 when loading)
        if _KERNEL_ACTIVATIONS[out["non_linearity"]] == _KERNEL_ACTIVATIONS["linear"]:
            out["non_linearity"] = "linear"
        if not isinstance(out["scaling"], str):
            out["scaling"] = float(out["scaling"])
        return out


@dataclass
class AdapterConfig:
    """The tutorial style of adapter config: ``AdapterConfig(hidden_size=768, adapter_size=64, adapter_act="relu")``.

    Houlsby placement by default (after attention and after the feed-forward block, ``out = LN(h + A(h) + y)``);
    ``adapter_initializer_range`` is the std of the normal init of both projections (biases start at zero).
    """

    hidden_size: int
    adapter_size: int = 64
    adapter_act: str = "gelu"
    adapter_initializer_range: float = 1e-2
    mh_adapter: bool = True
    output_adapter: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.adapter_size <= 0:
            raise ValueError(f"AdapterConfig: hidden_size {self.hidden_size} and adapter_size {self.adapter_size}")
        if str(self.adapter_act).lower() not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig: unknown adapter_act {self.adapter_act!r}; known: {ACTIVATIONS}")

    def to_bottleneck(self) -> BottleneckConfig:
        return BottleneckConfig(
            mh_adapter=self.mh_adapter,
            output_adapter=self.output_adapter,
            reduction_factor=self.hidden_size / self.adapter_size,
            bottleneck_size=self.adapter_size,
            non_linearity=self.adapter_act,
            original_ln_before=False,
            residual_before_ln=True,
            init_weights="normal",
            init_range=self.adapter_initializer_range,
        )


AnyConfig = LoraConfig | IA3Config | BottleneckConfig


def config_from_dict(data: Mapping[str, Any]) -> AnyConfig:
    """A config from either library's dict: PEFT's (``peft_type``) or AdapterHub's ``"config"`` entry."""
    peft_type = data.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # a PeftType enum when the dict comes from a peft object
    if peft_type is not None:
        kinds = {"LORA": LoraConfig, "IA3": IA3Config}
        if str(peft_type).upper() not in kinds:
            raise ValueError(f"PEFT adapter type {peft_type!r} is not supported; supported: {sorted(kinds)}")
        return kinds[str(peft_type).upper()].from_dict(data)
    arch = data.get("architecture")
    peft_keys = sorted(k for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in data)
    if arch is None and peft_keys:  # (read as a bottleneck config, it was refused for missing bottleneck fields)
        raise ValueError(
            f"an adapter config dict with PEFT (LoRA / IA3) fields {peft_keys} but no 'peft_type' (PEFT's) or "
            "'architecture' (AdapterHub's) is ambiguous (a dict without them is read as AdapterHub's bottleneck "
            "config): add 'peft_type': 'LORA' (or 'IA3'), or pass LoraConfig(...)"
        )
    if arch in (None, "bottleneck"):
        return BottleneckConfig.from_dict(data)
    if arch == "lora":
        return lora_from_adapterhub(data)
    if arch == "union":  # AdapterHub's ConfigUnion (its mam and unipelt presets): name what it joins
        parts = [c.get("architecture") or "bottleneck" for c in data.get("configs") or () if isinstance(c, Mapping)]
        arch = f"union of {parts} (an AdapterHub ConfigUnion, e.g. its mam or unipelt preset)"
    else:
        arch = repr(arch)
    raise ValueError(f"AdapterHub architecture {arch} is not supported; supported: bottleneck, lora")


def lora_from_adapterhub(data: Mapping[str, Any]) -> LoraConfig:
    """AdapterHub's ``LoRAConfig`` dict as a :class:`LoraConfig` (targets come from the saved weights)."""
    for key, neutral in (("use_gating", False), ("use_dora", False), ("composition_mode", "add"), ("vera_d", None)):
        if data.get(key, neutral) != neutral:
            raise ValueError(f"AdapterHub LoRA: '{key}'={data[key]!r} is not supported (only {neutral!r})")
    if data.get("vera_b") is not None:
        raise ValueError(f"AdapterHub LoRA: 'vera_b'={data['vera_b']!r} is not supported (only None)")
    _check_number("AdapterHub LoRA", "alpha", data.get("alpha", 8))
    _check_number("AdapterHub LoRA", "dropout", data.get("dropout", 0.0))
    return LoraConfig(r=int(data.get("r", 8)), lora_alpha=data.get("alpha", 8), lora_dropout=data.get("dropout", 0.0))


def coerce_config(config: Any) -> AnyConfig:
    """Accept a config object, a tutorial :class:`AdapterConfig`, a dict, or a preset name (``"seq_bn"``, ...)."""
    if isinstance(config, (LoraConfig, IA3Config, BottleneckConfig)):
        return config
    if isinstance(config, AdapterConfig):
        return config.to_bottleneck()
    if isinstance(config, str):
        if config.lower() == "lora":
            return LoraConfig()
        if config.lower() == "ia3":
            return IA3Config()
        return BottleneckConfig.preset(config)
    if isinstance(config, Mapping):
        return config_from_dict(config.get("config", config) if "config" in config else config)
    if type(config).__name__ in ("LoraConfig", "IA3Config") and hasattr(config, "to_dict"):
        return config_from_dict(config.to_dict())  # a peft config object
    raise TypeError(f"unsupported adapter config {type(config).__name__}: pass LoraConfig, BottleneckConfig, ...")
