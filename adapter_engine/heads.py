"""AdapterHub prediction heads saved beside an adapter: ``head_config.json`` + ``pytorch_model_head.bin`` (or
``model_head.safetensors``), which ``model.save_adapter(path, name)`` writes when the model has a head of the
adapter's name (``add_classification_head``) or is a transformers task model with its own (static) head.

A head loads as the adapter's trained copy of the transformers model's own head modules, as PEFT's
``modules_to_save`` copies load (:class:`~adapter_engine.saved_modules.ModulesToSaveLayer`): it runs while the
adapter is active (or routed), the model's own head otherwise. It loads only where it maps exactly onto that head:

- a static head (``"config": null``: a task model after ``adapters.init``) into a model of the same class, with the
  same keys and shapes (``classifier.weight``, ``classifier.bias``);
- a flex ``ClassificationHead`` (Dropout, Linear(h, h), activation, Dropout, Linear(h, labels) on the first token)
  with 2 layers, tanh, ``use_pooler=False``, biases and the model's number of labels, into a RoBERTa-style
  ``classifier`` (``RobertaForSequenceClassification``, ``XLMRobertaForSequenceClassification``: ``dense``, tanh,
  ``out_proj`` on the first token, the same modules in the same order) or ``BertForSequenceClassification`` (the
  first Linear becomes ``bert.pooler.dense``, which BERT runs on the first token with tanh, then ``classifier``: the
  same function; in training BERT has no dropout before the pooler).

Anything else (other head types, sizes or models) is left out with a warning naming the file, the head's type and
the reason; ``load_adapter(..., head=True)`` raises instead, ``head=False`` skips heads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import patching as pt
from .archs import base_prefix

logger = logging.getLogger(__name__)

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")  # AdapterHub's names, safetensors read first
HEAD_FILES = (HEAD_CONFIG, *HEAD_WEIGHTS)
# transformers heads a flex ClassificationHead maps onto: {its Linear's index: (module copied, key prefix in it)}
_ROBERTA_STYLE = ("RobertaClassificationHead", "XLMRobertaClassificationHead")


@dataclass
class SavedHead:
    """A head file pair as read: ``meta`` is ``head_config.json``, ``tensors`` the weights under AdapterHub's keys."""

    path: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def describe(self) -> str:
        cfg = self.meta.get("config")
        kind = "static" if cfg is None else repr(cfg.get("head_type")) if isinstance(cfg, dict) else "unknown"
        return f"the AdapterHub prediction head {self.path!r} ({kind} head of a {self.meta.get('model_class')})"


@dataclass
class HeadPlan:
    """Where a head goes: ``copies`` {module: its state dict}; ``record`` what a save needs to write it again."""

    copies: dict[str, dict[str, torch.Tensor]]
    record: dict[str, Any]
    label2id: dict[str, int] | None


def read_head(folder: str) -> SavedHead | None:
    """The head saved in adapter folder ``folder`` (None without head files); a corrupted file is a ValueError."""
    from .formats import read_json, read_weight_file  # (formats imports this module)

    weights = next((os.path.join(folder, f) for f in HEAD_WEIGHTS if os.path.isfile(os.path.join(folder, f))), None)
    cfg_path = os.path.join(folder, HEAD_CONFIG)
    if weights is None and not os.path.isfile(cfg_path):
        return None
    meta = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    if weights is None:
        return SavedHead(cfg_path, meta, {})
    tensors = read_weight_file(weights, "head weights")
    return SavedHead(weights, meta, tensors)


def plan_head(model: nn.Module, head: SavedHead) -> HeadPlan | str:
    """The head's copies for ``model`` (checked, nothing changed), or the reason it does not map onto its head."""
    if not head.tensors:
        return f"there are no head weights beside {HEAD_CONFIG}"
    if not head.meta:
        return f"{HEAD_CONFIG} is missing: the head's type is unknown"
    cfg = head.meta.get("config")
    if cfg is None:
        found = _static(model, head)
    elif isinstance(cfg, dict):
        found = _flex(model, head, cfg)
    else:
        return f"{HEAD_CONFIG}'s 'config' is neither null nor a field dict"
    if isinstance(found, str):
        return found
    copies, keys = found
    for module_name in copies:
        try:
            pt.check_saved(model, module_name)
        except ValueError as err:
            return str(err)
    labels = (head.meta if cfg is None else cfg).get("label2id")  # (a static head's are the model config's)
    labels = {str(k): int(v) for k, v in labels.items()} if isinstance(labels, dict) else None
    # (a flex head's keys carry its name, which is the adapter's: kept as a template for a save under another name)
    prefix = "" if cfg is None else f"heads.{head.meta.get('name')}."
    record = {"meta": dict(head.meta), "prefix": "" if cfg is None else "heads.{name}.",
              "keys": {k.removeprefix(prefix): list(v) for k, v in keys.items()}}  # fmt: skip
    return HeadPlan(copies, record, labels)


def _own_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task model's tensors outside its base model (what AdapterHub saves as a static head), copies left out."""
    prefix = base_prefix(model)
    return {k: v for k, v in model.state_dict().items()
            if prefix and not k.startswith(prefix + ".") and ".modules_to_save." not in k}  # fmt: skip


def _static(model: nn.Module, head: SavedHead) -> tuple[dict, dict] | str:
    saved_for = head.meta.get("model_class")
    if saved_for != type(model).__name__:
        return (
            f"a static head of {saved_for} loads into that class only (AdapterHub's rule), not {type(model).__name__}"
        )
    own = _own_head(model)
    if set(own) != set(head.tensors):
        return f"its weights {sorted(head.tensors)[:4]} are not the model's head weights {sorted(own)[:4]}"
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in head.tensors.items() if v.shape != own[k].shape
    ]
    if wrong:
        return f"its shapes differ from the model's (another number of labels?): {wrong[:3]}"
    copies: dict[str, dict[str, torch.Tensor]] = {}
    keys = {}
    for key, tensor in head.tensors.items():
        module, _, param = key.partition(".")
        copies.setdefault(module, {})[param] = tensor
        keys[key] = (module, param)
    return copies, keys


def _flex(model: nn.Module, head: SavedHead, cfg: dict) -> tuple[dict, dict] | str:
    kind = cfg.get("head_type")
    if kind != "classification":
        return f"head_type {kind!r}: only 'classification' heads have a transformers counterpart it maps onto"
    fields = {f: cfg.get(f) for f in ("layers", "activation_function", "use_pooler", "bias")}
    if fields != {"layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True}:
        return (
            f"its {fields} differ from the transformers heads it could map onto (layers 2, activation_function "
            "'tanh', use_pooler False, bias True)"
        )
    places = _classification_places(model)
    if places is None:
        return (
            f"{type(model).__name__} has no head of that structure (RobertaForSequenceClassification, "
            "XLMRobertaForSequenceClassification and BertForSequenceClassification have one)"
        )
    labels, model_labels = cfg.get("num_labels"), getattr(model.config, "num_labels", None)
    if labels != model_labels:
        return f"it has {labels} labels, the model's head {model_labels} (load the model with num_labels={labels})"
    prefix = f"heads.{head.meta.get('name')}."
    wanted = {
        f"{prefix}{i}.{p}": (module, f"{inner}{p}") for i, (module, inner) in places.items() for p in ("weight", "bias")
    }
    if set(wanted) != set(head.tensors):
        return f"its weights {sorted(head.tensors)[:4]} are not those of a 2-layer head named {head.meta.get('name')!r}"
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, (module, param) in wanted.items():
        own = model.get_submodule(module).state_dict()[param]
        if head.tensors[key].shape != own.shape:
            return f"{key} has shape {tuple(head.tensors[key].shape)}, the model's {module}.{param} {tuple(own.shape)}"
        copies.setdefault(module, {})[param] = head.tensors[key]
    for module, state in copies.items():  # a copy is the whole module: every tensor of it comes from the head
        own = {k for k in model.get_submodule(module).state_dict() if not k.startswith("modules_to_save.")}
        if set(state) != own:
            return f"{module} has tensors {sorted(own)} besides the head's {sorted(state)}"
    return copies, wanted


def _classification_places(model: nn.Module) -> dict[int, tuple[str, str]] | None:
    """{index of the flex head's Linear: (module of the model, key prefix in it)} for a matching head, else None."""
    classifier = getattr(model, "classifier", None)
    classifier = getattr(classifier, "_original", classifier)  # (a module with copies: its original's class)
    if type(classifier).__name__ in _ROBERTA_STYLE:
        return {1: ("classifier", "dense."), 4: ("classifier", "out_proj.")}
    prefix = base_prefix(model)
    if type(model).__name__ == "BertForSequenceClassification" and getattr(model.bert, "pooler", None) is not None:
        return {1: (f"{prefix}.pooler", "dense."), 4: ("classifier", "")}
    return None


def export_head(model: nn.Module, name: str, record: dict[str, Any]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``head_config.json`` and the weights, under AdapterHub's keys, of the head adapter ``name`` loaded."""
    meta = dict(record["meta"])
    if meta.get("config") is not None:
        meta["name"] = name  # (AdapterHub names a flex head after its adapter; the keys carry the name)
    prefix = record["prefix"].format(name=name)
    tensors = {}
    for key, (module, param) in record["keys"].items():
        copy = model.get_submodule(module).modules_to_save[name]
        tensors[prefix + key] = copy.state_dict()[param]
    return meta, tensors


def set_labels(model: nn.Module, label2id: dict[str, int] | None) -> None:
    """The head's label names into ``model.config`` (as AdapterHub's loader sets them), when it names every label."""
    config = getattr(model, "config", None)
    if not label2id or config is None or sorted(label2id.values()) != list(range(config.num_labels)):
        return
    config.label2id = dict(label2id)
    config.id2label = {i: label for label, i in label2id.items()}
