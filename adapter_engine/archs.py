"""What the engine knows about each architecture: one registry maps ``model_type`` to its layouts (default LoRA / IA3
targets, where the transformer blocks and their sublayers are, AdapterHub's LoRA matrix names). Any other model works
with explicit ``target_modules``; the patching layer (adapter_engine/patching.py) reads these facts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """What the engine knows about one ``model_type`` (paths relative to the base model, e.g. ``BertModel``).

    lora_targets: PEFT's default LoRA target suffixes. ia3_targets / ia3_feedforward: PEFT's IA3 defaults (empty where
    PEFT has none: an IA3 adapter then needs ``target_modules``, as in PEFT).
    layers: path of the ``ModuleList`` of transformer blocks. attn_sublayer / ffn_sublayer: in a block, the
    module whose output gets the ``mh_adapter`` / ``output_adapter`` bottleneck. attn_residual / ffn_residual:
    None when that sublayer adds the residual itself (BERT's ``LN(dropout(dense(x)) + y)``), else the module
    in the block whose first input is the residual (pre-LN blocks add it after the sublayer).
    attn_layer_norm / ffn_layer_norm: for such a sublayer in a post-LN block (DistilBERT), the block's LayerNorm
    after its ``+ y``; AdapterHub passes it to the adapter layer, so the adapters read ``LN(r + y)`` as in BERT.
    attn_matrices: AdapterHub's LoRA ``attn_matrices`` letters -> module path inside a block; intermediate /
    output: the modules of AdapterHub's ``intermediate_lora`` / ``output_lora``.
    adapterhub_attn / adapterhub_ffn: where AdapterHub keeps a block's ``mh_adapter`` / ``output_adapter``
    bottlenecks (its file keys ``<block>.<that>.adapters.<name>...``) when that is not the sublayer itself: in the
    models it patches at block level (DistilBERT, GPT-2, Llama, ViT) its own ``attention_adapters`` /
    ``output_adapters`` modules; None: the sublayer's name (BERT's ``attention.output`` and ``output``).
    adapterhub_layers / adapterhub_renames: for a layout that transformers renamed after the version AdapterHub runs
    on (ViT in transformers 5), AdapterHub's block list path and its module paths inside a block -> this layout's.
    """

    lora_targets: tuple[str, ...]
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]
    layers: str
    attn_sublayer: str
    ffn_sublayer: str
    attn_residual: str | None = None
    ffn_residual: str | None = None
    attn_layer_norm: str | None = None
    ffn_layer_norm: str | None = None
    attn_matrices: Mapping[str, str] = field(default_factory=dict)
    intermediate: str | None = None
    output: str | None = None
    adapterhub_attn: str | None = None
    adapterhub_ffn: str | None = None
    adapterhub_layers: str | None = None
    adapterhub_renames: Mapping[str, str] = field(default_factory=dict)

    def adapterhub_place(self, which: str) -> str:
        """The module path inside a block under which AdapterHub saves the bottlenecks of place ``which``
        (``"mh"`` or ``"output"``)."""
        if which == "mh":
            return self.adapterhub_attn or self.attn_sublayer
        return self.adapterhub_ffn or self.ffn_sublayer

    def from_adapterhub(self, path: str) -> str:
        """A module path of an AdapterHub file (``encoder.layer.0.attention.attention.query``, optionally under a task
        model's prefix) in this layout's names (``layers.0.attention.q_proj``); other paths are returned as given."""
        if not self.adapterhub_layers:
            return path
        return _rename_in_block(path, self.adapterhub_layers, self.layers, self.adapterhub_renames)

    def to_adapterhub(self, path: str) -> str:
        """The inverse of :meth:`from_adapterhub`: a module path of this layout as AdapterHub names it."""
        if not self.adapterhub_layers:
            return path
        theirs = {ours: theirs for theirs, ours in self.adapterhub_renames.items()}
        return _rename_in_block(path, self.layers, self.adapterhub_layers, theirs)


def _rename_in_block(path: str, layers: str, new_layers: str, renames: Mapping[str, str]) -> str:
    """``<head><layers>.<i>.<inner>`` -> ``<head><new_layers>.<i>.<renamed inner>`` (the longest entry of
    ``renames`` that is ``inner`` or a dotted prefix of it); a path outside the block list is returned as given."""
    match = re.match(rf"^((?:.+\.)?){re.escape(layers)}\.(\d+)\.(.+)$", path)
    if match is None:
        return path
    head, index, inner = match.groups()
    for old in sorted(renames, key=len, reverse=True):
        if inner == old or inner.startswith(old + "."):
            inner = renames[old] + inner[len(old) :]
            break
    return f"{head}{new_layers}.{index}.{inner}"


_BERT = ArchSpec(
    lora_targets=("query", "value"),
    ia3_targets=("key", "value", "output.dense"),
    ia3_feedforward=("output.dense",),
    layers="encoder.layer",
    attn_sublayer="attention.output",
    ffn_sublayer="output",
    attn_matrices={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"},
    intermediate="intermediate.dense",
    output="output.dense",
)
_LLAMA = ArchSpec(
    lora_targets=("q_proj", "v_proj"),
    ia3_targets=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
    layers="layers",
    attn_sublayer="self_attn",
    ffn_sublayer="mlp",
    attn_residual="input_layernorm",
    ffn_residual="post_attention_layernorm",
    attn_matrices={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
    intermediate="mlp.up_proj",
    output="mlp.down_proj",
    adapterhub_attn="attention_adapters",
    adapterhub_ffn="output_adapters",
)
# Llama's blocks (the residual added after each sublayer), with PEFT's IA3 defaults for Qwen2, Qwen3 and Gemma, which
# scale q_proj, not k_proj. Qwen3 normalises q and k per head inside its attention, Gemma's RMSNorm scales by (1 + w)
# and its embeddings by sqrt(hidden): neither moves the adapters (Gemma2's extra norms around each sublayer would).
_QWEN = replace(_LLAMA, ia3_targets=("q_proj", "v_proj", "down_proj"))

#: model_type -> layouts, first match wins (transformers 5.x renamed ViT's modules to a Llama-like layout).
REGISTRY: dict[str, tuple[ArchSpec, ...]] = {
    "bert": (_BERT,),
    "roberta": (_BERT,),
    # BERT's layout; PEFT 0.21 has no IA3 defaults for these (IA3Config() without target_modules is refused there too)
    "xlm-roberta": (replace(_BERT, ia3_targets=(), ia3_feedforward=()),),
    "electra": (replace(_BERT, ia3_targets=(), ia3_feedforward=()),),
    "distilbert": (
        ArchSpec(
            lora_targets=("q_lin", "v_lin"),
            ia3_targets=("k_lin", "v_lin", "lin2"),
            ia3_feedforward=("lin2",),
            layers="transformer.layer",
            attn_sublayer="attention",
            ffn_sublayer="ffn",
            attn_residual="attention",
            ffn_residual="ffn",
            attn_layer_norm="sa_layer_norm",
            ffn_layer_norm="output_layer_norm",
            attn_matrices={"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin"},
            intermediate="ffn.lin1",
            output="ffn.lin2",
            adapterhub_attn="attention_adapters",
            adapterhub_ffn="output_adapters",
        ),
    ),
    "vit": (
        ArchSpec(
            lora_targets=("q_proj", "v_proj"),
            ia3_targets=("k_proj", "v_proj", "fc2"),
            ia3_feedforward=("fc2",),
            layers="layers",
            attn_sublayer="attention",
            ffn_sublayer="mlp",
            attn_residual="layernorm_before",
            ffn_residual="layernorm_after",
            attn_matrices={"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"},
            intermediate="mlp.fc1",
            output="mlp.fc2",
            adapterhub_layers="encoder.layer",  # AdapterHub 1.3.0 runs on transformers 4: the old ViT names
            adapterhub_renames={
                **{f"attention.attention.{k}": f"attention.{k[0]}_proj" for k in ("query", "key", "value")},
                "attention.output.dense": "attention.o_proj",
                "intermediate.dense": "mlp.fc1",
                "output.dense": "mlp.fc2",
                "attention_adapters": "attention",
                "output.output_adapters": "mlp",
            },
        ),
        ArchSpec(
            lora_targets=("query", "value"),
            ia3_targets=("key", "value", "output.dense"),
            ia3_feedforward=("output.dense",),
            layers="encoder.layer",
            attn_sublayer="attention.output",
            ffn_sublayer="output",
            attn_residual="layernorm_before",
            attn_matrices={f"{k[0]}": f"attention.attention.{k}" for k in ("query", "key", "value")},
            intermediate="intermediate.dense",
            output="output.dense",
            adapterhub_attn="attention_adapters",
            adapterhub_ffn="output.output_adapters",
        ),
    ),
    "gpt2": (
        ArchSpec(
            lora_targets=("c_attn",),
            ia3_targets=("c_attn", "mlp.c_proj"),
            ia3_feedforward=("mlp.c_proj",),
            layers="h",
            attn_sublayer="attn",
            ffn_sublayer="mlp",
            attn_residual="ln_1",
            ffn_residual="ln_2",
            intermediate="mlp.c_fc",
            output="mlp.c_proj",
            adapterhub_attn="attention_adapters",
            adapterhub_ffn="output_adapters",
        ),
    ),
    "llama": (_LLAMA,),
    "mistral": (_LLAMA,),
    "qwen2": (_QWEN,),
    "qwen3": (_QWEN,),
    "gemma": (_QWEN,),
}


def select_spec(model: nn.Module, model_type: str | None) -> ArchSpec | None:
    """The registered layout of ``model``: the first variant whose block list and LoRA targets exist."""
    for spec in REGISTRY.get(model_type or "", ()):
        try:
            blocks = block_paths(model, spec)
        except ValueError:
            continue
        first = model.get_submodule(blocks[0]) if blocks else None
        names = {n for n, _ in first.named_modules()} if first is not None else set()
        if all(any(n == t or n.endswith("." + t) for n in names) for t in spec.lora_targets):
            return spec
    return None


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def base_prefix(model: nn.Module) -> str:
    """The name of the base model inside a task model (``"bert"`` in BertForSequenceClassification), or ''."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and hasattr(model, prefix) and isinstance(getattr(model, prefix), nn.Module) else ""


def block_paths(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Full names of the transformer blocks (``bert.encoder.layer.0``, ...), in order."""
    prefix = base_prefix(model)
    for path in ([f"{prefix}.{spec.layers}"] if prefix else []) + [spec.layers]:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return [f"{path}.{i}" for i in range(len(blocks))]
    raise ValueError(f"{type(model).__name__} has no block list {spec.layers!r}")


def adapterhub_lora_modules(model: nn.Module, spec: ArchSpec, ah_config: Mapping[str, Any]) -> list[str]:
    """Full names of the layers AdapterHub's ``LoRAConfig`` dict adapts in ``model`` (its selfattn_lora /
    attn_matrices / intermediate_lora / output_lora / leave_out fields)."""
    subs: list[str] = []
    if ah_config.get("selfattn_lora", True):
        for letter in ah_config.get("attn_matrices", ["q", "v"]):
            if letter not in spec.attn_matrices:
                raise ValueError(
                    f"AdapterHub LoRA attn_matrices {letter!r}: {type(model).__name__} has no separate layer for it "
                    "(one projection computes q, k and v, like GPT-2's c_attn, where AdapterHub splits the LoRA over "
                    "the matrices): not supported; use a PEFT LoRA, or AdapterHub's intermediate_lora / output_lora"
                )
            subs.append(spec.attn_matrices[letter])
    for flag, sub in (("intermediate_lora", spec.intermediate), ("output_lora", spec.output)):
        if ah_config.get(flag, False) and sub:
            subs.append(sub)
    leave_out = set(ah_config.get("leave_out", []) or [])
    return [f"{b}.{s}" for i, b in enumerate(block_paths(model, spec)) if i not in leave_out for s in subs]
