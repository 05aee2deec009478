"""Which strategy fits: memory and step-time estimates for Merge and FFT vs Stack and Adapt, and a recommendation.

    shape = model_shape(AutoConfig.from_pretrained(path))          # or load_config("dir/or/config.json")
    hw = hardware("h100") | Hardware("my GPU", memory_bytes=24 * 2**30, tflops=80.0, bandwidth_gbs=900)
    result = plan(shape, hw, batch=16, seq_len=512, domains=3, updates="weekly")
    print(format_plan(result))

Everything is computed from the config, nothing is downloaded or instantiated:

- **parameters** from the architecture (exact for the registered families: BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
  DistilBERT, GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, ViT; the task head as ``AutoModelFor...`` builds it);
- **memory** = weights + gradients + AdamW state (two fp32 moments; mixed precision keeps fp32 master weights)
  + saved activations for ``batch x seq_len`` tokens + the largest transient. Full fine-tuning saves every
  linear layer's input; with a frozen base only the inputs of non-linear ops (attention, activation functions,
  norms) and the adapters' own activations are kept, because a frozen linear needs no input for its gradient;
- **step time** = FLOPs / achievable throughput + optimizer traffic / memory bandwidth. Full fine-tuning costs
  6 FLOPs per parameter and token (forward 2, input gradients 2, weight gradients 2); a frozen base 4 (no weight
  gradients); attention adds ``12 * layers * seq * hidden`` per token (training).

The estimates are first-order; ``adapter-engine demo`` measures both strategies and prints the estimate error.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ._io import user_path

UPDATE_FREQUENCIES = ("daily", "weekly", "monthly", "rarely")
PRECISIONS = {"fp32": (4, 4), "bf16-mixed": (4, 2), "fp16-mixed": (4, 2)}  # (weight bytes, activation bytes)
HEADS = ("none", "sequence-classification", "token-classification", "image-classification", "causal-lm")
# what model_shape reads (each count checked against the models transformers builds, tests/test_planner.py)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "gpt2", "llama", "mistral", "qwen2", "qwen3",
               "gemma", "vit")  # fmt: skip
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")  # BERT's blocks (post-LN, biases everywhere)
_ROBERTA_HEAD = ("roberta", "xlm-roberta", "electra")  # sequence classification: dense + out_proj


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts the estimates need (read from a Hugging Face config by :func:`model_shape`)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int  # learned position embeddings (0 for rotary)
    token_types: int = 0
    gated_mlp: bool = False  # Llama-style gate/up/down MLP with RMSNorm
    qkv_bias: bool = True  # query / key / value projections have biases
    out_bias: bool = True  # the attention output projection has a bias (Llama: attention_bias)
    mlp_bias: bool = True  # the MLP projections have biases (Llama: mlp_bias)
    pooler: bool = False  # the base model (AutoModel) has a pooler
    embedding_size: int = 0  # ELECTRA: embeddings of this width, projected to ``hidden`` (0: ``hidden``)
    qk_norm: bool = False  # Qwen3: RMSNorm weights (head_dim each) on the queries and keys of every layer
    tied_embeddings: bool = True
    num_labels: int = 2
    image_patches: int = 0  # ViT: patches per image (the sequence is patches + 1)
    patch_params: int = 0  # ViT: patch-embedding convolution weights and bias


@dataclass(frozen=True)
class Hardware:
    """One accelerator: memory, achievable dense throughput (TFLOP/s at the training dtype), memory bandwidth."""

    name: str
    memory_bytes: int
    tflops: float
    bandwidth_gbs: float

    def __post_init__(self) -> None:
        if not self.memory_bytes > 0:
            raise ValueError(f"Hardware {self.name!r}: memory_bytes must be positive, got {self.memory_bytes!r}")
        for field_name in ("tflops", "bandwidth_gbs"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"Hardware {self.name!r}: {field_name} must be a positive finite number, got {value!r}"
                )


#: Presets: achievable throughput = about 40% of the dense bf16 peak (typical training MFU), bandwidth as sold.
DEVICES: dict[str, Hardware] = {
    "h100": Hardware("NVIDIA H100 80GB", 80 * 2**30, 0.40 * 989, 3350),
    "h200": Hardware("NVIDIA H200 141GB", 141 * 2**30, 0.40 * 989, 4800),
    "a100-80gb": Hardware("NVIDIA A100 80GB", 80 * 2**30, 0.40 * 312, 2039),
    "a100-40gb": Hardware("NVIDIA A100 40GB", 40 * 2**30, 0.40 * 312, 1555),
    "l4": Hardware("NVIDIA L4 24GB", 24 * 2**30, 0.40 * 121, 300),
    "a10g": Hardware("NVIDIA A10G 24GB", 24 * 2**30, 0.40 * 125, 600),
    "rtx4090": Hardware("NVIDIA RTX 4090 24GB", 24 * 2**30, 0.40 * 165, 1008),
    "t4": Hardware("NVIDIA T4 16GB", 16 * 2**30, 0.40 * 65, 320),
}


def parse_bytes(text: str | int) -> int:
    """``"24GB"``, ``"24GiB"``, ``"512MB"`` or a plain number of bytes -> bytes (GB means GiB, as GPUs are sold)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. '24GB' or '512MB'")
    value, unit = float(match.group(1)), match.group(2)
    return int(value * 1024 ** " KMGT".index(unit or " "))


def _gib(nbytes: int) -> str:
    """A memory size for the header: whole GiB from 10 GiB up, two decimals below (512 MB is 0.50 GiB, not 0)."""
    gib = nbytes / 2**30
    return f"{gib:.0f} GiB" if gib >= 10 else f"{gib:.2f} GiB"


def hardware(name: str | None = None, memory: str | int | None = None, tflops: float | None = None) -> Hardware:
    """A preset from :data:`DEVICES` (default: a generic 24 GB GPU), with memory / throughput overridden."""
    if name is not None and name.lower() not in DEVICES:
        raise ValueError(f"unknown device {name!r}; presets: {sorted(DEVICES)} (or give --tflops and --gpu-memory)")
    base = DEVICES[name.lower()] if name else Hardware("generic GPU", 24 * 2**30, 0.40 * 125, 600)
    mem = parse_bytes(memory) if memory is not None else base.memory_bytes
    if mem <= 0:
        raise ValueError(f"memory must be positive, got {memory!r}")
    if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
        raise ValueError(f"tflops must be a positive finite number, got {tflops!r}")
    label = base.name if memory is None else f"{base.name if name else 'GPU'} (memory set to {_gib(mem)})"
    return Hardware(label, mem, float(tflops) if tflops else base.tflops, base.bandwidth_gbs)


# ----------------------------------------------------------------------------------------------- the model
def load_config(model: str | os.PathLike):
    """A transformers config from a model folder or a ``config.json`` file (offline)."""
    from transformers import AutoConfig

    path = user_path(model)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if "model_type" not in data:
            raise ValueError(f"{path!r} has no 'model_type': not a transformers config.json")
        if data["model_type"] not in MODEL_TYPES:  # (transformers' own error lists every type it knows, 400+)
            raise ValueError(_unknown_type(data["model_type"]))
        return AutoConfig.for_model(data.pop("model_type"), **data)
    raise FileNotFoundError(f"{path!r} is neither a model folder nor a config.json file")


def model_shape(config: Any) -> ModelShape:
    """Read a transformers config of one of :data:`MODEL_TYPES`."""
    mt = getattr(config, "model_type", None)
    get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)), default)
    hidden = get("hidden_size", "dim", "n_embd")
    layers = get("num_hidden_layers", "n_layers", "n_layer")
    heads = get("num_attention_heads", "n_heads", "n_head")
    if None in (hidden, layers, heads):
        raise ValueError(f"config of model_type {mt!r} lacks hidden size / layers / heads: cannot estimate it")
    common = dict(model_type=mt, hidden=hidden, layers=layers, heads=heads, num_labels=config.num_labels)
    if mt in (*_BERT_LIKE, "distilbert", "gpt2"):
        inter = get("intermediate_size", "hidden_dim", "n_inner", default=4 * hidden)
        embedding = get("embedding_size", default=hidden) if mt == "electra" else hidden
        return ModelShape(
            **common, kv_heads=heads, head_dim=hidden // heads, intermediate=inter, vocab=config.vocab_size,
            positions=get("max_position_embeddings", "n_positions"), token_types=get("type_vocab_size", default=0)
            if mt != "distilbert" else 0, pooler=mt in ("bert", "roberta", "xlm-roberta"),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            embedding_size=embedding if embedding != hidden else 0,
        )  # fmt: skip
    if mt in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        kv = get("num_key_value_heads", default=heads)
        attention_bias = bool(getattr(config, "attention_bias", False))  # (Qwen2's q/k/v always have biases)
        return ModelShape(
            **common, kv_heads=kv, head_dim=get("head_dim", default=hidden // heads),
            intermediate=config.intermediate_size, vocab=config.vocab_size, positions=0, gated_mlp=True,
            qkv_bias=attention_bias or mt == "qwen2", out_bias=attention_bias and mt in ("llama", "qwen3", "gemma"),
            mlp_bias=bool(getattr(config, "mlp_bias", False)) and mt == "llama", qk_norm=mt == "qwen3",
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )  # fmt: skip
    if mt == "vit":
        patches = (config.image_size // config.patch_size) ** 2
        return ModelShape(
            **common, kv_heads=heads, head_dim=hidden // heads, intermediate=config.intermediate_size, vocab=0,
            positions=patches + 1, pooler=True, image_patches=patches, qkv_bias=bool(config.qkv_bias),
            patch_params=config.num_channels * config.patch_size**2 * hidden + hidden,
        )  # fmt: skip
    raise ValueError(_unknown_type(mt))


def _unknown_type(model_type: Any) -> str:
    return f"model_type {model_type!r} is not one the planner knows ({', '.join(MODEL_TYPES)})"


def layer_parameters(s: ModelShape) -> int:
    """Parameters of one transformer block."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    i, out_bias = s.intermediate, h if s.out_bias else 0
    if s.gated_mlp:
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if s.qkv_bias else 0) + out_bias
        mlp = 3 * h * i + ((2 * i + h) if s.mlp_bias else 0)  # gate, up, down
        return attn + mlp + 2 * h + (2 * s.head_dim if s.qk_norm else 0)  # two RMSNorm weights (+ Qwen3's q/k norms)
    attn = 4 * h * h + (3 * h if s.qkv_bias else 0) + out_bias
    return attn + 2 * h * i + ((i + h) if s.mlp_bias else 0) + 4 * h  # attn, MLP, two LayerNorms


def embedding_parameters(s: ModelShape) -> int:
    h = s.hidden
    if s.model_type == "vit":
        return h + s.positions * h + s.patch_params  # CLS token, positions, patch convolution
    e = s.embedding_size or h
    norm = 0 if s.model_type in ("gpt2",) or s.gated_mlp else 2 * e  # embedding LayerNorm (BERT family)
    project = e * h + h if s.embedding_size else 0  # ELECTRA's embeddings_project
    return (s.vocab + s.positions + s.token_types) * e + norm + project


def head_parameters(s: ModelShape, head: str = "none") -> int:
    """Parameters outside the base model for ``AutoModelFor<head>`` (pooler excluded: see :func:`count_parameters`)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {HEADS}")
    h, n = s.hidden, s.num_labels
    if head == "none":
        return 0
    if (head == "image-classification") != (s.model_type == "vit") or (head == "causal-lm" and s.vocab == 0):
        raise ValueError(f"head {head!r} does not apply to model_type {s.model_type!r}")
    if head == "causal-lm":
        if not (s.gated_mlp or s.model_type == "gpt2"):
            raise ValueError(f"head 'causal-lm' is estimated for decoders only, not {s.model_type!r}")
        return 0 if s.tied_embeddings else s.vocab * h
    if s.model_type in _ROBERTA_HEAD and head == "sequence-classification":
        return h * h + h + h * n + n  # dense + out_proj
    if s.model_type == "distilbert" and head == "sequence-classification":
        return h * h + h + h * n + n  # pre_classifier + classifier
    if s.gated_mlp or s.model_type == "gpt2":
        return h * n + (n if head == "token-classification" else 0)  # score (no bias) / classifier (bias)
    return h * n + n


def count_parameters(s: ModelShape, head: str = "none") -> int:
    """Parameters of ``AutoModel`` (``head="none"``) or ``AutoModelFor<head>`` built from the config."""
    if s.model_type in (*_BERT_LIKE, "distilbert"):
        final_norm = 0  # post-LN blocks: no final norm
    else:
        final_norm = s.hidden * (1 if s.gated_mlp else 2)  # RMSNorm weight / LayerNorm weight and bias
    pooler = s.hidden * s.hidden + s.hidden if s.pooler else 0
    if head != "none" and not (s.model_type == "bert" and head == "sequence-classification"):
        pooler = 0  # among the task models only BertForSequenceClassification keeps the pooler
    return embedding_parameters(s) + s.layers * layer_parameters(s) + final_norm + pooler + head_parameters(s, head)


def bottleneck_parameters(s: ModelShape, reduction_factor: float = 16, *, both_sublayers: bool = False) -> int:
    """Parameters of one bottleneck adapter (seq_bn: after the FFN; ``both_sublayers``: Houlsby) on every layer."""
    r = int(s.hidden // reduction_factor)
    per_place = 2 * s.hidden * r + r + s.hidden
    return s.layers * per_place * (2 if both_sublayers else 1)


# ----------------------------------------------------------------------------------------------- the estimates
@dataclass
class StrategyEstimate:
    """Memory (bytes) and time (seconds) of one training step of one strategy."""

    strategy: str
    total_parameters: int
    trainable_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    workspace_bytes: int
    step_flops: float
    step_time_s: float
    fits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def training_bytes(self) -> int:
        """What training adds on top of the loaded weights (gradients + optimizer + activations + workspace)."""
        return self.gradients_bytes + self.optimizer_bytes + self.activations_bytes + self.workspace_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.training_bytes


def _saved_per_token(s: ModelShape, frozen_base: bool) -> int:
    """Elements autograd keeps per token and layer. Full fine-tuning: every linear input (QKV, attention output,
    MLP in and out) plus the non-linear ops' inputs (Q, K, V and the attention output for SDPA, the activation
    function's input(s), both norms' inputs). A frozen base keeps only the latter."""
    h, i = s.hidden, s.intermediate
    kv = s.kv_heads * s.head_dim
    nonlinear = h + 2 * kv + h + 2 * h + (3 * i if s.gated_mlp else i)
    linear_inputs = h + h + h + i
    return nonlinear + (0 if frozen_base else linear_inputs)


def _tokens(s: ModelShape, batch: int, seq_len: int) -> int:
    return batch * (s.image_patches + 1 if s.model_type == "vit" else seq_len)


def estimate(
    s: ModelShape,
    hw: Hardware,
    strategy: str,
    *,
    batch: int = 16,
    seq_len: int = 512,
    precision: str = "bf16-mixed",
    head: str = "sequence-classification",
    adapters: int = 2,
    reduction_factor: float = 16,
) -> StrategyEstimate:
    """One training step of ``strategy`` ("fft": every weight trains; "stack": ``adapters`` bottleneck levels on a
    frozen base, the top level and the head train) for ``batch x seq_len`` tokens on ``hw``."""
    if strategy not in ("fft", "stack"):
        raise ValueError(f"strategy must be 'fft' or 'stack', got {strategy!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(PRECISIONS)}")
    if batch < 1 or seq_len < 1 or adapters < 1:
        raise ValueError(f"batch ({batch}), seq_len ({seq_len}) and adapters ({adapters}) must be positive")
    master, act_bytes = PRECISIONS[precision]
    tokens = _tokens(s, batch, seq_len)
    seq = tokens // batch
    total = count_parameters(s, head)
    one_adapter = bottleneck_parameters(s, reduction_factor)
    head_params = head_parameters(s, head)  # trains with the top level (BERT's pooler is inside the base: frozen)
    non_embedding = total - embedding_parameters(s)
    attention_flops = 12 * s.layers * seq * s.heads * s.head_dim  # per token: QK^T and AV, forward + backward
    per_layer_tokens = _saved_per_token(s, frozen_base=strategy == "stack")
    if strategy == "fft":
        trainable = total
        weights = total * master
        flops = tokens * (6 * non_embedding + attention_flops)
        activations = tokens * s.layers * per_layer_tokens * act_bytes
    else:
        trainable = one_adapter + head_params
        base_bytes = 4 if precision == "fp32" else 2  # a frozen base is kept in the compute dtype
        weights = total * base_bytes + adapters * one_adapter * master
        flops = tokens * (4 * non_embedding + 6 * adapters * one_adapter + attention_flops)
        r = int(s.hidden // reduction_factor)
        adapter_saved = adapters * (2 * s.hidden + 2 * r)  # LN(h + y) input, down output, activation output
        activations = tokens * s.layers * (per_layer_tokens + adapter_saved) * act_bytes
    gradients = trainable * 4
    optimizer = trainable * 8 + (trainable * 4 if master != act_bytes and strategy == "fft" else 0)
    workspace = tokens * max(s.intermediate, s.vocab if head == "causal-lm" else 0) * 4 * 2
    optimizer_traffic = trainable * 4 * 7  # AdamW reads weight, grad, two moments; writes weight and moments
    seconds = flops / (hw.tflops * 1e12) + optimizer_traffic / (hw.bandwidth_gbs * 1e9)
    est = StrategyEstimate(strategy, total, trainable, weights, gradients, optimizer, activations, workspace, flops,
                           seconds)  # fmt: skip
    est.fits = est.total_bytes <= hw.memory_bytes
    return est


@dataclass
class Plan:
    model: str
    hardware: Hardware
    batch: int
    seq_len: int
    domains: int
    updates: str
    fft: StrategyEstimate
    stack: StrategyEstimate
    recommendation: str
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("fft", "stack"):
            out[key]["total_bytes"] = getattr(self, key).total_bytes
        return out


def plan(
    s: ModelShape,
    hw: Hardware,
    *,
    batch: int = 16,
    seq_len: int = 512,
    domains: int = 1,
    updates: str = "monthly",
    precision: str = "bf16-mixed",
    head: str = "sequence-classification",
    name: str | None = None,
) -> Plan:
    """Estimate both strategies and recommend one, with the reasons (resources, domains, updates, deployment)."""
    if domains < 1:
        raise ValueError(f"domains must be at least 1, got {domains}")
    if updates not in UPDATE_FREQUENCIES:
        raise ValueError(f"updates must be one of {UPDATE_FREQUENCIES}, got {updates!r}")
    kw = dict(batch=batch, seq_len=seq_len, precision=precision, head=head)
    fft, stack = estimate(s, hw, "fft", **kw), estimate(s, hw, "stack", **kw)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    score, reasons = 0, []  # > 0 favours Stack and Adapt
    if not fft.fits and stack.fits:
        score += 10
        reasons.append(f"memory: full fine-tuning needs about {gib(fft.total_bytes)}, more than the "
                       f"{gib(hw.memory_bytes)} available; stacking needs {gib(stack.total_bytes)}")  # fmt: skip
    elif not stack.fits:
        reasons.append(
            f"memory: neither fits at batch {batch} x {seq_len} ({gib(fft.total_bytes)} / "
            f"{gib(stack.total_bytes)} > {gib(hw.memory_bytes)}): lower the batch or use checkpointing"
        )
    else:
        reasons.append(f"memory: both fit ({gib(fft.total_bytes)} for full fine-tuning, {gib(stack.total_bytes)} "
                       f"for stacking, of {gib(hw.memory_bytes)})")  # fmt: skip
    ratio = fft.step_time_s / stack.step_time_s
    reasons.append(f"time: a step takes about {fft.step_time_s * 1e3:.1f} ms fully fine-tuned vs "
                   f"{stack.step_time_s * 1e3:.1f} ms for one adapter level ({ratio:.1f}x)")  # fmt: skip
    if domains > 1:
        score += 2 + min(domains, 10)
        reasons.append(
            f"domains: {domains} domains share one base with one adapter each "
            f"({stack.trainable_parameters / 1e6:.2f}M parameters) and are routed per request; full "
            f"fine-tuning would keep {domains} copies of {fft.total_parameters / 1e6:.1f}M parameters"
        )
    else:
        score -= 2
        reasons.append("domains: one domain: a merged, fully fine-tuned model serves it with no adapter overhead")
    freq = {"daily": 4, "weekly": 3, "monthly": -1, "rarely": -3}[updates]
    score += freq
    reasons.append(
        f"updates: {updates}: "
        + (
            "retraining and shipping one small adapter beats redeploying the whole model"
            if freq > 0
            else "rare retraining makes the full-model cost acceptable"
        )
    )
    reasons.append(
        "deployment: Merge and FFT ships a plain transformers checkpoint (no adapter-engine at "
        "serving time); Stack and Adapt needs adapter-engine to serve, and keeps every depth available"
    )
    recommendation = "Stack and Adapt" if score > 0 else "Merge and FFT"
    if not fft.fits and not stack.fits:
        recommendation = "neither as configured (reduce batch x seq_len)"
    return Plan(name or s.model_type, hw, batch, seq_len, domains, updates, fft, stack, recommendation, reasons)


def format_plan(p: Plan) -> str:
    """The plan as a table with the recommendation and its reasons."""
    hw = p.hardware
    lines = [f"{p.model}: {p.fft.total_parameters / 1e6:.2f}M parameters; {hw.name}, "
             f"{_gib(hw.memory_bytes)}, {hw.tflops:.0f} TFLOP/s achievable; batch {p.batch} x {p.seq_len}",
             "", f"{'':24s} {'Merge and FFT':>16s} {'Stack and Adapt':>16s}"]  # fmt: skip
    rows = [("trainable parameters", lambda e: f"{e.trainable_parameters / 1e6:.3f}M"),
            ("weights", lambda e: f"{e.weights_bytes / 2**20:.0f} MiB"),
            ("gradients", lambda e: f"{e.gradients_bytes / 2**20:.1f} MiB"),
            ("optimizer state", lambda e: f"{e.optimizer_bytes / 2**20:.1f} MiB"),
            ("activations", lambda e: f"{e.activations_bytes / 2**20:.0f} MiB"),
            ("workspace", lambda e: f"{e.workspace_bytes / 2**20:.0f} MiB"),
            ("total", lambda e: f"{e.total_bytes / 2**30:.2f} GiB"),
            ("fits", lambda e: "yes" if e.fits else "NO"),
            ("step time", lambda e: f"{e.step_time_s * 1e3:.1f} ms")]  # fmt: skip
    for label, fmt in rows:
        lines.append(f"{label:24s} {fmt(p.fft):>16s} {fmt(p.stack):>16s}")
    lines += ["", f"recommendation: {p.recommendation}"] + [f"  - {r}" for r in p.reasons]
    return "\n".join(lines)


def relative_error(estimate_value: float, measured: float) -> float:
    """(estimate - measured) / measured; positive means the planner over-estimates."""
    return (estimate_value - measured) / measured if measured else math.inf


__all__ = ["ModelShape", "Hardware", "DEVICES", "StrategyEstimate", "Plan", "parse_bytes", "hardware", "load_config"]
__all__ += ["model_shape", "count_parameters", "layer_parameters", "bottleneck_parameters", "head_parameters"]
__all__ += ["estimate", "plan", "format_plan", "relative_error"]
