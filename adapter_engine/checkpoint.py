"""Out-of-core merge: fold a LoRA/IA3 adapter into a sharded safetensors checkpoint, tensor by tensor.

``merge_checkpoint(base_dir, adapter_dir, out_dir)`` never holds more than one tensor of the checkpoint in
memory. It reads and writes the safetensors format itself, with plain file reads and writes (no ``mmap``: a
mapped file's touched pages count towards the process's resident memory, so a mapped 70B checkpoint would
not be "out of core"):

    file  = u64 little-endian header length N | N bytes of JSON header | raw tensor bytes
    header = {key: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}

Each output shard has the same keys, dtypes and shapes as its input shard, so its header is known before any
tensor is read and the tensors are streamed through one at a time: read, merge on the device (the Triton
merge kernel on a GPU), write. Peak host memory is about one tensor plus its merged copy; peak device memory
is one tensor plus its factors.

Atomicity: everything is written into a temporary sibling folder that is renamed to ``out_dir`` at the end;
an exception removes the temporary folder, and a killed process leaves at most a ``.<name>.partial-*`` folder
beside ``out_dir``, never a half checkpoint at ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._io import atomic_folder_write, copy_module_folders, is_other_format_weights, same_key, user_path
from ._io import loaded_name as _loaded_name
from .api import _check_extra, _feedforward
from .config import IA3Config, LoraConfig
from .formats import read_adapter
from .heads import HEAD_FILES
from .kernels import merge_lora_, scale_ia3_

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


# ------------------------------------------------------------------------------------------ safetensors streaming
@dataclass
class _Shard:
    path: str
    header: dict  # key -> {"dtype", "shape", "data_offsets"}; "__metadata__" kept apart
    metadata: dict
    data_start: int  # file offset of the data section


def _read_header(path: str) -> _Shard:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"truncated safetensors file {path!r}: {size} bytes")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"corrupted safetensors file {path!r}: header length {n} for a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"corrupted safetensors header in {path!r}: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"corrupted safetensors header in {path!r}: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    for key, info in header.items():
        _check_entry(path, key, info, size - data_start)
    return _Shard(path, header, metadata, data_start)


def _check_entry(path: str, key: str, info, data_size: int) -> None:
    """One header entry: a known dtype, and a byte span inside the data section whose length is what its shape and
    dtype need (a corrupted shape would otherwise surface as a reshape error naming neither file nor tensor)."""
    try:
        dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"corrupted safetensors header in {path!r}: tensor {key!r} has entry {info!r}") from None
    if dtype not in _DTYPES:
        raise ValueError(f"{path!r}: tensor {key!r} has unsupported dtype {dtype}")
    if end > data_size or begin > end:
        raise ValueError(f"truncated safetensors file {path!r}: tensor {key!r} ends at byte {end} of the "
                         f"{data_size}-byte data section")  # fmt: skip
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != need:
        raise ValueError(f"corrupted safetensors header in {path!r}: tensor {key!r} of shape {shape} ({dtype}) needs "
                         f"{need} bytes, its span holds {end - begin}")  # fmt: skip


def _read_tensor(fh, shard: _Shard, key: str, buffer: torch.Tensor) -> torch.Tensor:
    """Read ``key`` into the front of ``buffer`` (uint8, at least the largest tensor's size) and return a view:
    one buffer for the whole checkpoint, so host memory does not grow with the number of tensors read."""
    info = shard.header[key]
    begin, end = info["data_offsets"]
    data = buffer[: end - begin]
    fh.seek(shard.data_start + begin)
    if fh.readinto(memoryview(data.numpy())) != end - begin:
        raise ValueError(f"truncated safetensors file {shard.path!r} while reading {key!r}")
    return data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _header_bytes(shard: _Shard) -> bytes:
    header = dict(shard.header)
    if shard.metadata:
        header["__metadata__"] = shard.metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data section 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


def _write_tensor(fh, tensor: torch.Tensor) -> None:
    fh.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def _index_shards(index_path: str) -> list[str]:
    """The shard file names ``model.safetensors.index.json`` lists (each must exist beside it)."""
    try:
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"corrupted checkpoint index {index_path!r}: no readable 'weight_map' ({err!r})") from None
    if not all(isinstance(name, str) for name in names) or not names:
        raise ValueError(f"corrupted checkpoint index {index_path!r}: 'weight_map' lists no shard file names")
    folder = os.path.dirname(index_path)
    missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"checkpoint index {index_path!r} lists shards that are missing: {missing[:4]}")
    return names


# ------------------------------------------------------------------------------------------ adapter -> checkpoint keys
@dataclass
class _Update:
    kind: str  # "lora", "ia3" (a weight), "ia3_bias" (the bias of a non-feed-forward IA3 module) or "replace"
    tensors: dict
    scale: float
    fan_in_fan_out: bool
    ia3_dim: int = 0


def _architecture(base_dir: str) -> tuple[set[str] | None, str | None, Callable[[str], str]]:
    """What the checkpoint's architecture (from its ``config.json``) tells about its keys: the module paths
    (relative to the base model) of its transformers ``Conv1D`` layers (GPT-2 family: weight stored ``(in, out)``),
    its ``base_model_prefix`` (``"bert"``, ``"transformer"``, ``"model"``), and a checkpoint key's name in the model
    (transformers 5 saves some models under their checkpoints' older names, ViT's
    ``vit.encoder.layer.0.attention.attention.query`` for the module ``vit.layers.0.attention.q_proj``, and renames
    them as it loads them; adapters name the modules). ``(None, None, identity)`` when the architecture cannot be
    built (no or custom config): then the adapter's ``fan_in_fan_out`` flag is trusted. The model is built on the
    meta device: no memory, no weights read."""
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        return None, None, same_key
    try:
        from transformers import AutoConfig, AutoModel
        from transformers.pytorch_utils import Conv1D

        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as err:  # unknown / remote-code architectures raise many types
        log.debug("cannot build %s's architecture (%s): trusting the adapter's fan_in_fan_out", base_dir, err)
        return None, None, same_key
    conv1d = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return conv1d, getattr(model, "base_model_prefix", None) or None, _loaded_name(model)


def _is_conv1d(module_key: str, conv1d: set[str]) -> bool:
    """Whether checkpoint module path ``module_key`` (maybe under a head's prefix) is one of ``conv1d``."""
    return any(module_key == c or module_key.endswith(f".{c}") for c in conv1d)


def _plan_updates(
    adapter, keys: set[str], conv1d: set[str] | None = None, prefix: str | None = None
) -> dict[str, _Update]:
    """Map each adapted module of the adapter file to the checkpoint key of its weight (all or nothing).

    ``conv1d``: the architecture's Conv1D module paths (see :func:`_architecture`); when known, the layer type
    decides whether a weight is stored transposed, as in PEFT, whatever the config's ``fan_in_fan_out`` says
    (AdapterHub configs never carry the flag). ``prefix``: its ``base_model_prefix``, for an adapter trained on a
    task model (``bert.encoder...``) merged into a checkpoint of the base model (``encoder...``, as
    all-MiniLM-L6-v2 or the hub's GPT-2 are saved); ``transformers`` loads either into either."""
    cfg = adapter.config
    if not isinstance(cfg, (LoraConfig, IA3Config)):
        raise ValueError(  # (it said the adapter's "nonlinearity cannot be folded": an identity one folds in memory)
            f"merge_checkpoint streams LoRA / IA3 adapters into the weights; {adapter.path!r} holds a bottleneck "
            "adapter: load the model and it (load_adapter) and merge it in memory with merge_adapter, or with "
            "adapter-engine merge (--absorb keeps one whose nonlinearity cannot be folded)"
        )
    updates: dict[str, _Update] = {}
    _check_all_found(adapter, keys, prefix)
    # (weights of layers the config does not select: refused, as load_adapter refuses them; PEFT ignores them)
    _check_extra(adapter, cfg, {m: m for m in adapter.entries})
    for module, tensors in adapter.entries.items():
        candidates = _candidates(module, keys, prefix)
        if len(candidates) != 1:
            raise ValueError(f"adapter module {module!r} matches several weights {sorted(candidates)[:3]} in the base "
                             "checkpoint")  # fmt: skip
        fifo = bool(cfg.fan_in_fan_out)
        if conv1d is not None:
            fifo = _is_conv1d(candidates[0][: -len(".weight")], conv1d)
            if fifo != bool(cfg.fan_in_fan_out):
                log.info("%s is a %s layer: merging with fan_in_fan_out=%s (the adapter config says %s)",
                         candidates[0], "Conv1D" if fifo else "Linear", fifo, cfg.fan_in_fan_out)  # fmt: skip
        if isinstance(cfg, LoraConfig):
            if set(tensors) != {"lora_A", "lora_B"}:
                raise ValueError(f"adapter module {module!r} has weights {sorted(tensors)}, expected lora_A, lora_B")
            r = cfg.rank_for(module)  # (rank_pattern / alpha_pattern: PEFT's r and alpha for this layer)
            if tensors["lora_A"].shape[0] != r or tensors["lora_B"].shape[-1] != r:
                raise ValueError(f"adapter module {module!r}: lora_A {tuple(tensors['lora_A'].shape)} and lora_B "
                                 f"{tuple(tensors['lora_B'].shape)} are not of the config's rank r={r}")  # fmt: skip
            updates[candidates[0]] = _Update("lora", tensors, cfg.scaling_for(module), fifo)
        else:
            # (PEFT's rule, as load_adapter applies it: list entries are plain suffixes, "_proj" marks q_proj)
            ff, weight_module = cfg.feedforward_modules, candidates[0][: -len(".weight")]
            feedforward = bool(ff) and (_feedforward(module, ff) or _feedforward(weight_module, ff))
            # IA3 scales the output features, or the input features of feed-forward modules.
            dim = (0 if fifo else 1) if feedforward else (1 if fifo else 0)
            updates[candidates[0]] = _Update("ia3", tensors, 1.0, fifo, dim)
            bias_key = candidates[0][: -len("weight")] + "bias"
            if not feedforward and bias_key in keys:  # y = (x W^T + b) * l: the bias is scaled too (as PEFT does)
                updates[bias_key] = _Update("ia3_bias", tensors, 1.0, False, 0)
    for module, state in adapter.saved_modules.items():  # modules_to_save: the trained copy replaces each tensor
        for param, value in state.items():
            key = f"{module}.{param}"
            key = key if key in keys or not prefix else key.removeprefix(f"{prefix}.")
            if key not in keys or key in updates:
                why = "also takes the adapter's terms" if key in updates else "is not in the base checkpoint"
                raise ValueError(f"the trained copy of {module!r} (modules_to_save): {key} {why}")
            updates[key] = _Update("replace", {"value": value}, 1.0, False)
    return updates


def _check_all_found(adapter, keys: set[str], prefix: str | None) -> None:
    """Every adapted module has a weight in the checkpoint, else a ValueError listing those that have none."""
    missing = [module for module in adapter.entries if not _candidates(module, keys, prefix)]
    if not missing:
        return
    tied = [m for m in missing if m.rsplit(".", 1)[-1] == "lm_head"]
    why = (
        f"; {tied[0]} is tied to the input embeddings (tie_word_embeddings): the checkpoint stores only the shared "
        "weight, and a merge into it would change the embeddings too (merge_adapter and adapter-engine merge refuse it "
        "as well): keep such an adapter unmerged, or untie the weights first"
        if tied
        else " (an adapter made for another architecture?)"
    )
    more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
    raise ValueError(f"adapter modules {missing[:4]}{more} match no weight in the base checkpoint{why}")


def _candidates(module: str, keys: set[str], prefix: str | None) -> list[str]:
    """The checkpoint keys of ``module``'s weight, also under the base model when the checkpoint has no task head."""
    found = _weight_keys(module, keys)
    if not found and prefix and module.startswith(f"{prefix}."):
        found = _weight_keys(module[len(prefix) + 1 :], keys)
    return found


def _weight_keys(module: str, keys: set[str]) -> list[str]:
    """The checkpoint keys of ``module``'s weight: the path itself, or under a head's prefix."""
    return [k for k in keys if k == f"{module}.weight" or k.endswith(f".{module}.weight")]


def _check_shapes(key: str, info: dict, update: _Update) -> None:
    shape = tuple(info["shape"])
    if update.kind == "replace":
        copy_shape = tuple(update.tensors["value"].shape)
        if copy_shape != shape:
            raise ValueError(f"{key}: shape {shape} differs from its trained copy's {copy_shape} (modules_to_save)")
    elif update.kind == "lora":
        a, b = update.tensors["lora_A"], update.tensors["lora_B"]
        out_f, in_f = ((shape[1], shape[0]) if update.fan_in_fan_out else shape) if len(shape) == 2 else (None, None)
        if len(shape) != 2 or tuple(a.shape) != (a.shape[0], in_f) or tuple(b.shape) != (out_f, a.shape[0]):
            raise ValueError(f"{key}: weight {shape} does not fit lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
    elif (
        len(shape) != (1 if update.kind == "ia3_bias" else 2)
        or update.tensors["ia3_l"].numel() != shape[update.ia3_dim]
    ):
        raise ValueError(f"{key}: weight {shape} does not fit ia3_l {tuple(update.tensors['ia3_l'].shape)}")
    if info["dtype"] not in ("F32", "F16", "BF16"):
        raise ValueError(f"{key}: cannot merge into a {info['dtype']} weight (float32/float16/bfloat16 only)")


_CPU_CHUNK_ELEMENTS = 1 << 18  # row blocks of 256K elements bound the CPU path's fp32 temporaries (~1 MB each)


def _factor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An adapter tensor on ``device`` in its own precision (fp32, fp16, bf16; fp64 and others as fp32)."""
    keep = tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return tensor.to(device, tensor.dtype if keep else torch.float32)


def _merge_tensor_(weight: torch.Tensor, update: _Update, device: torch.device) -> None:
    """Merge into the host tensor ``weight`` in place, on ``device`` (row blocks on the CPU)."""
    if update.kind == "replace":  # a trained module copy (modules_to_save): rounded once to the checkpoint's dtype
        value = update.tensors["value"].to(weight.dtype)
        if not torch.isfinite(value).all():
            raise ValueError(f"a trained module copy {tuple(value.shape)} has non-finite values")
        weight.copy_(value)
        return
    w = weight.to(device)
    if update.kind == "ia3_bias":
        new = (w.float() * update.tensors["ia3_l"].reshape(-1).to(device, torch.float32)).to(w.dtype)
        if not torch.isfinite(new).all():
            raise ValueError(f"IA3 scaling would make a bias {tuple(w.shape)} non-finite")
        weight.copy_(new)
        return
    rows_per_chunk = w.shape[0] if device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // max(1, w.shape[1]))
    if update.kind == "lora":
        # The factors keep their own dtype (fp32 as PEFT saves them): rounding them to an fp16 / bf16 weight's dtype
        # first would round twice, and where B A cancels W the merged value would be off by many ulps.
        a, b = _factor(update.tensors["lora_A"], device), _factor(update.tensors["lora_B"], device)
        for i in range(0, w.shape[0], rows_per_chunk):
            rows = slice(i, i + rows_per_chunk)
            if update.fan_in_fan_out:  # w is (in, out): its rows are A's columns
                merge_lora_(w[rows], a[:, rows], b, update.scale, fan_in_fan_out=True, safe=True)
            else:
                merge_lora_(w[rows], a, b[rows], update.scale, safe=True)
    else:
        vec = _factor(update.tensors["ia3_l"].reshape(-1), device)  # not rounded to w's dtype either
        for i in range(0, w.shape[0], rows_per_chunk):
            rows = slice(i, i + rows_per_chunk)
            scale_ia3_(w[rows], vec[rows] if update.ia3_dim == 0 else vec, dim=update.ia3_dim, safe=True)
    if w.data_ptr() != weight.data_ptr():
        weight.copy_(w)  # back into the same host buffer: no second host copy


def _check_base_copies(adapter, updates: dict[str, _Update], shards: list[_Shard], buffer: torch.Tensor) -> None:
    """PEFT's copies of targeted ``lm_head`` / ``embed_tokens`` weights must equal the checkpoint's (as
    :func:`adapter_engine.api.check_base_copy` requires of a model): read each such tensor once, before writing."""
    from .api import check_base_copy

    weight_keys = {key[: -len("weight")]: key for key, u in updates.items() if u.kind in ("lora", "ia3")}
    for copy_key, copy in adapter.base_copies.items():
        module, param = copy_key.rsplit(".", 1)
        prefix = next((p for p in weight_keys if p == f"{module}." or p.endswith(f".{module}.")), None)
        key = None if prefix is None else prefix + param
        shard = next((s for s in shards if key in s.header), None)
        if shard is None:  # (a bias copy where the checkpoint has no bias)
            check_base_copy(copy_key, None, copy, adapter.path)  # raises: nothing to compare it with
        with open(shard.path, "rb") as fh:
            check_base_copy(key, _read_tensor(fh, shard, key, buffer), copy, adapter.path)
    adapter.base_copies.clear()  # (an lm_head copy may be the largest tensor: not held while streaming)


def _usable_device(device: str | torch.device | None) -> torch.device:
    """``device`` (default: CUDA when available, else CPU), checked before anything is read: an unusable one would
    otherwise fail later in the pinned buffer's allocation, with a message about pinned memory."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"merge_checkpoint: device {str(device)!r} is not usable here ({reason})") from None
    return device


# ------------------------------------------------------------------------------------------ public API
def merge_checkpoint(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Stream ``base_dir``'s safetensors checkpoint through the merge of ``adapter_dir`` into ``out_dir``.

    Args:
        base_dir: an HF model folder with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        adapter_dir: a PEFT or AdapterHub LoRA / IA3 adapter folder.
        out_dir: the merged checkpoint (same shards and index); other files of ``base_dir`` (config, tokenizer)
            are copied. Must not exist unless ``overwrite``.
        device: where to merge (default: CUDA when available, else CPU).

    Returns a summary: tensors read, tensors merged, bytes, and the largest tensor's size.
    """
    from tqdm.auto import tqdm

    base_dir, out_dir = user_path(base_dir), os.path.abspath(user_path(out_dir))
    device = _usable_device(device)
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(f"base checkpoint folder {base_dir!r} does not exist")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; pass overwrite=True to replace it")
    index_path = os.path.join(base_dir, INDEX_NAME)
    if os.path.isfile(index_path):
        shard_names = _index_shards(index_path)
    elif os.path.isfile(os.path.join(base_dir, SINGLE_NAME)):
        shard_names = [SINGLE_NAME]
    else:
        raise FileNotFoundError(f"{base_dir!r} has neither {SINGLE_NAME} nor {INDEX_NAME} (safetensors only)")
    shards = [_read_header(os.path.join(base_dir, name)) for name in shard_names]
    key_info = {key: info for shard in shards for key, info in shard.header.items()}

    adapter = read_adapter(adapter_dir)
    conv1d, prefix, loaded_name = _architecture(base_dir)
    names = {loaded_name(key): key for key in key_info}  # (the model's name of each checkpoint key)
    if len(names) != len(key_info):  # (two keys, one name: not a checkpoint transformers saved; take it as it is)
        names = {key: key for key in key_info}
    updates = {names[k]: u for k, u in _plan_updates(adapter, set(names), conv1d, prefix).items()}
    head = [f for f in HEAD_FILES if adapter.format == "adapterhub" and os.path.isfile(os.path.join(adapter.path, f))]
    if head:  # (a checkpoint has no module to map it onto: load_adapter does, and merge_adapter merges its copy)
        log.warning(
            "merge_checkpoint: the AdapterHub prediction head in %s (%s) is not merged: the streamed merge folds the "
            "LoRA / IA3 weights only; load the task model, load_adapter (which loads a head that maps onto the "
            "model's) and merge_adapter to merge both",
            adapter.path, ", ".join(head),
        )  # fmt: skip
    for key, update in updates.items():
        _check_shapes(key, key_info[key], update)

    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in key_info.values())
    largest = max((info["data_offsets"][1] - info["data_offsets"][0] for info in key_info.values()), default=0)
    # Pinned on a GPU machine, so the host-device copies of each merged tensor run at full speed.
    buffer = torch.empty(largest, dtype=torch.uint8, pin_memory=device.type == "cuda")
    _check_base_copies(adapter, updates, shards, buffer)

    def write(partial: str) -> None:
        with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
            for shard in shards:
                out_path = os.path.join(partial, os.path.basename(shard.path))
                keys = sorted(shard.header, key=lambda k: shard.header[k]["data_offsets"][0])
                with open(shard.path, "rb") as src, open(out_path, "wb") as dst:
                    dst.write(_header_bytes(shard))
                    for key in keys:
                        tensor = _read_tensor(src, shard, key, buffer)
                        if key in updates:
                            _merge_tensor_(tensor, updates[key], device)
                        _write_tensor(dst, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
                        del tensor
                    dst.flush()
                    os.fsync(dst.fileno())
        for name in os.listdir(base_dir):  # config, tokenizer, generation config, index; not unmerged .bin etc.
            src = os.path.join(base_dir, name)
            if os.path.isfile(src) and name not in shard_names and not is_other_format_weights(name):
                shutil.copy2(src, os.path.join(partial, name))
        copy_module_folders(base_dir, partial)  # a sentence-transformers model's pooling / normalize modules

    atomic_folder_write(out_dir, write)
    summary = {
        "tensors": len(key_info),
        "merged": len(updates),
        "bytes": total,
        "largest_tensor_bytes": largest,
        "shards": len(shards),
        "device": str(device),
    }
    # (debug: the CLI prints this summary, and its INFO logging printed it a second time)
    log.debug("merged %d of %d tensors (%.2f GB, %d shards) into %s on %s", len(updates), len(key_info), total / 1e9,
             len(shards), out_dir, device)  # fmt: skip
    return summary
