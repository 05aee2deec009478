"""Adapter files of PEFT and AdapterHub: detection, reading (all-or-nothing), key parsing and writing.

PEFT:       ``adapter_config.json`` (has ``peft_type``) + ``adapter_model.safetensors`` | ``adapter_model.bin``;
            keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.ia3_l`` (name stripped).
AdapterHub: ``adapter_config.json`` (field dict under ``"config"``, plus ``name``, ``model_type``, ...) +
            ``adapter.safetensors`` | ``pytorch_adapter.bin``; keys ``<module>.adapters.<name>.adapter_down.0.weight``
            (bottleneck) and ``<module>.loras.<name>.lora_A`` (LoRA, no ``.weight``).

Safetensors is read first; ``.bin`` files only through ``torch.load(weights_only=True)``. Every read problem
(missing, truncated or corrupted file, unknown layout) is a ``ValueError`` / ``FileNotFoundError`` naming the path.
The model-side checks (layers, shapes, missing / extra weights) live in :mod:`adapter_engine.api`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._io import replace_entries, user_path
from .config import AnyConfig, IA3Config, LoraConfig, coerce_config, config_from_dict
from .heads import HEAD_CONFIG, HEAD_FILES, HEAD_WEIGHTS

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS = {
    "peft": ("adapter_model.safetensors", "adapter_model.bin"),
    "adapterhub": ("adapter.safetensors", "pytorch_adapter.bin"),
}
FORMATS = tuple(WEIGHTS)
ADAPTERHUB_VERSION = "adapters.1.3.0"

_PEFT_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_IA3 = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.ia3_l(?:\.[^.]+)?$")
# PEFT's copy of a targeted embedding or output layer's own weights (``save_embedding_layers``: the default when
# ``target_modules`` names ``lm_head`` or ``embed_tokens``), and the LoRA factors of an ``nn.Embedding`` layer.
_PEFT_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
_PEFT_EMBEDDING_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
_AH_LORA = re.compile(r"^(?P<module>.+)\.loras\.(?P<name>[^.]+)\.lora_(?P<ab>[AB])$")
_AH_BN = re.compile(
    r"^(?P<module>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>adapter_(?:down|up|norm_before|norm_after)"
    r"(?:\.\d+)?\.(?:weight|bias))$"
)


@dataclass
class AdapterFile:
    """A parsed adapter folder. ``entries`` maps a module path as saved (no ``base_model.model.`` prefix) to its
    tensors by parameter name (``lora_A``, ``lora_B``, ``ia3_l``, ``adapter_down.0.weight``, ...)."""

    format: str
    path: str
    config: AnyConfig
    saved_name: str | None
    entries: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module>.weight": PEFT's copy of it
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save: module -> state


def find_adapter_dir(path: str | os.PathLike, name: str | None = None) -> str:
    """The folder holding the adapter: ``path/<name>`` when that subfolder holds an adapter (PEFT saves several
    adapters as the default one at the root and the others in subfolders named after them), else ``path`` itself.
    A path to a file inside the folder is accepted too."""
    path = user_path(path)
    if not os.path.exists(path):
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None  # a Hub repository id ("owner/name")?
        hint = (
            ": adapter-engine loads local folders only; for a Hugging Face Hub adapter, download it first "
            "(huggingface_hub.snapshot_download) and pass its folder"
            if hub
            else ""
        )
        raise FileNotFoundError(f"adapter path {path!r} does not exist{hint}")
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if name and os.sep not in name and name not in (".", "..") and _has_any(os.path.join(path, name)):
        return os.path.join(path, name)
    if _has_any(path):
        return path
    subs = sorted(d for d in os.listdir(path) if _has_any(os.path.join(path, d)))
    hint = f"; it has adapter subfolders {subs}: pass one of them (or name=)" if subs else ""
    if os.path.isfile(os.path.join(path, "config.json")):  # a model: save_pretrained's, not save_adapter's
        hint += (
            "; it is a model folder (config.json): save_pretrained of a patched model writes the adapters beside the "
            "base's weights, and adapter_engine.load_model loads it whole; model.save_adapter(name, folder) writes one "
            "adapter alone"
        )
    expected = [CONFIG_NAME] + [w for ws in WEIGHTS.values() for w in ws]
    raise ValueError(f"unknown adapter format in {path!r}: none of {expected} found{hint}")


def _has_any(folder: str) -> bool:
    return os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, f)) for f in (CONFIG_NAME, *WEIGHTS["peft"], *WEIGHTS["adapterhub"])
    )


def detect_format(folder: str, meta: dict[str, Any] | None) -> str:
    """``"peft"`` or ``"adapterhub"`` from the config's fields, else from the weight file names."""
    if meta is not None:
        if "peft_type" in meta:
            return "peft"
        if isinstance(meta.get("config"), dict) or str(meta.get("version", "")).startswith("adapters"):
            return "adapterhub"
    found = [fmt for fmt, files in WEIGHTS.items() if any(os.path.isfile(os.path.join(folder, f)) for f in files)]
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"unknown adapter format in {folder!r}: {CONFIG_NAME} has neither PEFT's 'peft_type' nor AdapterHub's "
        f"'config' and the weight files are {sorted(os.listdir(folder))}"
    )


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupted adapter config {path!r}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"corrupted adapter config {path!r}: expected a JSON object, got {type(data).__name__}")
    return data


def read_tensors(folder: str, fmt: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Load the weight file of ``fmt`` in ``folder`` (safetensors first) onto the CPU."""
    for fname in WEIGHTS[fmt]:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            continue
        return path, read_weight_file(path, "adapter weights")
    raise FileNotFoundError(f"no {fmt} adapter weights in {folder!r}: expected one of {list(WEIGHTS[fmt])}")


def read_weight_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a ``.bin`` read with ``weights_only=True`` (no pickled code), on the
    CPU; a corrupted file, or one that is not a dict of tensors, is a ValueError naming ``what`` it held."""
    try:
        if path.endswith(".safetensors"):
            tensors = load_file(path, device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle raise many types for truncated or corrupted data
        raise ValueError(f"cannot read {what} {path!r} (truncated or corrupted?): {err}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{what} {path!r} are not a dict of tensors")
    return tensors


def split_base_copies(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a PEFT file's copies of its targets' base weights (``<module>.base_layer.weight``, which PEFT saves for
    a LoRA on ``lm_head`` or ``embed_tokens``) from the adapter weights: ``(adapter tensors, {"<module>.weight":
    copy})``. PEFT loads such a copy over the model's weight; the engine loads the adapter only where the copy
    equals the model's weight (see ``api.check_base_copies``). A LoRA of an ``nn.Embedding`` layer is refused here,
    by name: the engine adapts Linear and Conv1D layers."""
    embedding = sorted({m["module"] for k in tensors if (m := _PEFT_EMBEDDING_LORA.match(k))})
    if embedding:
        raise ValueError(
            f"the PEFT adapter has LoRA weights of embedding layers {embedding[:4]} (lora_embedding_A/B): LoRA on an "
            "nn.Embedding is not supported by adapter-engine (Linear and Conv1D layers only); merge it with PEFT"
        )
    copies = {f"{m['module']}.{m['param']}": v for k, v in tensors.items() if (m := _PEFT_BASE_COPY.match(k))}
    rest = {k: v for k, v in tensors.items() if not _PEFT_BASE_COPY.match(k)}
    return rest, copies


def split_saved_modules(
    tensors: dict[str, torch.Tensor], entries: list[str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split the trained module copies of PEFT's ``modules_to_save`` from the adapter weights: ``(adapter tensors,
    {module: its state dict})``. PEFT saves a copy under the module's own keys (``base_model.model.classifier.weight``);
    the module is the shortest prefix of the key that ends with an entry (PEFT's ``str.endswith`` rule)."""
    if not entries:
        return tensors, {}
    rest, saved = {}, {}
    for key, value in tensors.items():
        path = key.removeprefix("base_model.model.").split(".")
        cut = None
        if not (_PEFT_LORA.match(key) or _PEFT_IA3.match(key)):
            cut = next((i for i in range(1, len(path)) if any(".".join(path[:i]).endswith(e) for e in entries)), None)
        if cut is None:
            rest[key] = value
        else:
            saved.setdefault(".".join(path[:cut]), {})[".".join(path[cut:])] = value
    return rest, saved


def parse_keys(fmt: str, tensors: dict[str, torch.Tensor], saved_name: str | None) -> dict[str, dict]:
    """Group the tensors by module; raises ``ValueError`` listing keys that are not adapter weights of ``fmt``."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[str] = []
    for key, value in tensors.items():
        if fmt == "peft":
            m = _PEFT_LORA.match(key)
            param = f"lora_{m['ab']}" if m else None
            if m is None and (m := _PEFT_IA3.match(key)):
                param = "ia3_l"
        else:
            m = _AH_LORA.match(key)
            param = f"lora_{m['ab']}" if m else None
            if m is None and (m := _AH_BN.match(key)):
                param = m["param"]
            if m is not None and saved_name is not None and m["name"] != saved_name:
                m = None
        if m is None:
            extra.append(key)
            continue
        entries.setdefault(m["module"], {})[param] = value
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        base = fmt == "peft" and all(k.endswith((".weight", ".bias")) for k in extra)
        why = (
            ": whole weights of base layers, which PEFT saves for a resized vocabulary (save_embedding_layers), which "
            "adapter-engine does not load over the model's own weights, or trained copies of modules (modules_to_save) "
            "that adapter_config.json's modules_to_save does not name"
            if base
            else ""
        )
        raise ValueError(f"unexpected weights in the {fmt} adapter file: {extra[:5]}{more}{why}")
    if not entries:
        raise ValueError(f"the {fmt} adapter file holds no adapter weights")
    return entries


def read_adapter(path: str | os.PathLike, name: str | None = None, config: Any = None) -> AdapterFile:
    """Read and parse an adapter folder of either library (format detected). ``config`` overrides the saved one."""
    folder = find_adapter_dir(path, name)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    meta = read_json(cfg_path) if os.path.isfile(cfg_path) else None
    fmt = detect_format(folder, meta)
    if config is not None:
        cfg = coerce_config(config)
    elif meta is None:
        raise FileNotFoundError(f"{cfg_path!r} is missing: pass config= to load_adapter")
    elif fmt == "adapterhub" and not isinstance(meta.get("config"), dict):
        raise ValueError(f"AdapterHub config {cfg_path!r} has no 'config' field dict")
    else:
        try:
            cfg = config_from_dict(meta if fmt == "peft" else meta["config"])
        except (ValueError, TypeError) as err:  # a refused or malformed field: name the file it came from
            if type(err) not in (ValueError, TypeError):
                raise
            raise type(err)(f"adapter config {cfg_path!r}: {err}") from None
    saved_name = meta.get("name") if (meta and fmt == "adapterhub") else None
    _, tensors = read_tensors(folder, fmt)
    return parse_adapter(fmt, folder, cfg, meta or {}, tensors, saved_name)


def peft_state_dict_adapter(tensors: Any, config: Any) -> AdapterFile:
    """A PEFT LoRA / IA3 adapter given as tensors and config (transformers' ``load_adapter(adapter_state_dict=,
    peft_config=)``): keys as PEFT saves them or as transformers' ``get_adapter_state_dict`` gives them (without
    ``base_model.model.``)."""
    if config is None:
        raise ValueError("load_adapter(adapter_state_dict=...) needs the adapter's config: pass peft_config= too")
    cfg = coerce_config(config)
    if not isinstance(cfg, (LoraConfig, IA3Config)):
        raise ValueError(f"adapter_state_dict holds PEFT LoRA / IA3 weights; peft_config is a {type(cfg).__name__}")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise TypeError(f"adapter_state_dict must be a dict of tensors, got {type(tensors).__name__}")
    return parse_adapter("peft", "adapter_state_dict", cfg, {}, dict(tensors), None)


def parse_adapter(
    fmt: str,
    folder: str,
    cfg: AnyConfig,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    saved_name: str | None,
) -> AdapterFile:
    """An :class:`AdapterFile` of ``fmt`` from its config and weights (``folder``: where they came from)."""
    tensors, copies = split_base_copies(tensors) if fmt == "peft" else (tensors, {})
    tensors, saved = split_saved_modules(tensors, getattr(cfg, "modules_to_save", None) if fmt == "peft" else None)
    entries = parse_keys(fmt, tensors, saved_name)
    unadapted = sorted(k for k in copies if k.rsplit(".", 1)[0] not in entries)
    if unadapted:
        raise ValueError(f"unexpected weights in the peft adapter file: base weights {unadapted[:4]} of layers "
                         "without adapter weights")  # fmt: skip
    return AdapterFile(format=fmt, path=folder, config=cfg, saved_name=saved_name, entries=entries,
                       meta=meta, base_copies=copies, saved_modules=saved)  # fmt: skip


def write_adapter(
    folder: str | os.PathLike,
    fmt: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    safe_serialization: bool | None = None,
    head: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Write ``adapter_config.json`` and the weight file of ``fmt`` (and an AdapterHub prediction ``head``: its
    ``head_config.json`` and weights, ``pytorch_model_head.bin`` or ``model_head.safetensors``); returns the folder.

    Default weight file: PEFT ``adapter_model.safetensors``; AdapterHub ``pytorch_adapter.bin`` (what
    ``adapters`` 1.3.0 writes and loads by default; ``safe_serialization=True`` writes ``adapter.safetensors``).
    An adapter already in ``folder`` is replaced as a whole: its weight files of either format and serialization
    are removed (a stale ``adapter_model.safetensors`` would otherwise shadow a new ``adapter_model.bin`` on
    load), and so are head files a save without a head would leave behind. Atomic per file: the new files are
    written beside the old ones first, so a failed save leaves the folder as it was.
    """
    if fmt not in WEIGHTS:
        raise ValueError(f"unknown adapter format {fmt!r}; supported: {list(FORMATS)}")
    folder = user_path(folder)
    if os.path.isfile(folder):
        raise ValueError(f"cannot save an adapter to {folder!r}: it is a file, not a folder")
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    safe = (fmt == "peft") if safe_serialization is None else safe_serialization
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    safetensors_name, bin_name = WEIGHTS[fmt]
    weights_name = safetensors_name if safe else bin_name
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    files = [(weights_name, tensors), (CONFIG_NAME, meta)]
    if head is not None:
        head_meta, head_tensors = head
        head_tensors = {k: v.detach().to("cpu").contiguous() for k, v in head_tensors.items()}
        files += [(HEAD_WEIGHTS[0] if safe else HEAD_WEIGHTS[1], head_tensors), (HEAD_CONFIG, head_meta)]
    staged = {name: os.path.join(folder, f".{name}.tmp-{token}") for name, _ in files}
    try:
        for name, content in files:
            if name.endswith(".json"):
                with open(staged[name], "w", encoding="utf-8") as fh:
                    json.dump(content, fh, indent=2, sort_keys=True)
            elif name.endswith(".safetensors"):
                save_file(content, staged[name], metadata={"format": "pt"})
            else:
                torch.save(content, staged[name])
        _commit(folder, staged)
    except BaseException:
        for path in staged.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise
    return folder


def _commit(folder: str, staged: dict[str, str]) -> None:
    """The staged files into place, the adapter's other files (another format's weights) away: all or nothing."""
    stale = [
        name
        for name in (CONFIG_NAME, *(w for ws in WEIGHTS.values() for w in ws), *HEAD_FILES)
        if name not in staged and os.path.isfile(os.path.join(folder, name))
    ]
    replace_entries(folder, staged, remove=stale)
    for name in stale:
        logger.info("removed the stale adapter file %s from %s", name, folder)
