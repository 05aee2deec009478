"""Small file-system helpers shared by the savers, and the checkpoint key names their loaders read."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable

# Weight files of formats other than safetensors (and their shard indexes): a saver that writes safetensors must not
# copy these from the base folder next to its output, where they would be the base's unmerged weights.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def is_other_format_weights(name: str) -> bool:
    """True for a non-safetensors weight file or its shard index (``pytorch_model.bin``, ``tf_model.h5``,
    ``flax_model.msgpack``, ``pytorch_model-00001-of-00002.bin``, ``pytorch_model.bin.index.json``, ...)."""
    name = name.lower()
    if name.endswith(".index.json"):
        name = name[: -len(".index.json")]
    return name.endswith(OTHER_WEIGHT_SUFFIXES)


def copy_module_folders(src: str, dest: str) -> list[str]:
    """Copy the module folders a sentence-transformers model lists in ``src/modules.json`` (``1_Pooling``,
    ``2_Normalize``, ``2_Dense``: the modules after the transformer, with their own configs and weights, none of them
    adapted) into ``dest``: a merged folder that carries ``modules.json`` without them does not load. Returns the
    folders copied; paths outside ``src`` are ignored."""
    import json

    try:
        with open(os.path.join(src, "modules.json"), encoding="utf-8") as fh:
            paths = [entry.get("path") for entry in json.load(fh)]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    root = os.path.realpath(src)
    copied = []
    for path in paths:
        folder = os.path.realpath(os.path.join(src, path)) if isinstance(path, str) and path else root
        if folder != root and folder.startswith(root + os.sep) and os.path.isdir(folder):
            shutil.copytree(folder, os.path.join(dest, os.path.relpath(folder, root)), dirs_exist_ok=True)
            copied.append(path)
    return copied


def _new_folder(parent: str, prefix: str) -> str:
    """A new empty folder ``parent/prefix<random>`` with the umask's normal folder mode (``mkdtemp`` would give 0700
    whatever the umask, and the folder becomes the saved output)."""
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any folder the user makes
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not make a new folder {prefix}* in {parent!r}")


def user_path(path: str | os.PathLike) -> str:
    """``path`` as a string with a leading ``~`` expanded to the home folder, as a shell does: the savers wrote a
    folder literally named ``~`` below the working directory, and the loaders said the path does not exist."""
    return os.path.expanduser(os.fspath(path))


def atomic_folder_write(path: str | os.PathLike, write) -> str:
    """Call ``write(tmp_folder)``, then move the folder to ``path`` (replacing an existing one only at the end).

    ``path`` may be a missing path or a folder (replaced); an existing file there is refused (FileExistsError),
    before ``write`` runs."""
    path = os.path.abspath(user_path(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} is a file, not a folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = _new_folder(parent, f".{os.path.basename(path)}.partial-")
    try:
        write(partial)
        if os.path.exists(path):
            aside = _new_folder(parent, f".{os.path.basename(path)}.old-")
            os.rename(path, os.path.join(aside, "old"))
            try:
                os.rename(partial, path)
            except BaseException:  # the previous folder goes back: a failed save leaves it as it was
                os.rename(os.path.join(aside, "old"), path)
                os.rmdir(aside)
                raise
            shutil.rmtree(aside, ignore_errors=True)  # (the new folder is in place: a leftover is no failure)
        else:
            os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def replace_entries(folder: str, staged: dict[str, str], remove: tuple[str, ...] | list[str] = ()) -> None:
    """Move each staged file or folder to ``folder/<name>`` and take ``remove`` (names in ``folder``) away, all or
    nothing: what they replace or remove is first moved aside (beside it, under a hidden name), put back if any move
    fails, and deleted once everything is in place."""
    token = secrets.token_hex(4)
    aside: dict[str, str] = {}
    placed: list[str] = []
    try:
        for name in dict.fromkeys([*staged, *remove]):
            dest = os.path.join(folder, name)
            if os.path.lexists(dest):
                old = os.path.join(folder, f".{name}.old-{token}")
                os.replace(dest, old)
                aside[name] = old
        for name, path in staged.items():
            os.replace(path, os.path.join(folder, name))
            placed.append(name)
    except BaseException:
        for name in placed:
            _remove(os.path.join(folder, name))
        for name, old in aside.items():
            os.replace(old, os.path.join(folder, name))
        raise
    for old in aside.values():
        _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def same_key(key: str) -> str:
    return key


def renamed_key(conversions: Iterable | None) -> Callable[[str], str]:
    """A checkpoint key's name in the model, through the key renamings among transformers' weight ``conversions`` (what
    ``from_pretrained`` applies as it loads: transformers 5 saves some models under their checkpoints' older names,
    ViT's ``vit.encoder.layer.0.attention.attention.query`` for the module ``vit.layers.0.attention.q_proj``, the
    adapter keys beside them too); the identity without any (or with a transformers that has no key conversions)."""
    try:
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return same_key
    renamings = [c for c in conversions or () if isinstance(c, WeightRenaming)]
    return (lambda key: rename_source_key(key, renamings, [])[0]) if renamings else same_key


def loaded_name(model) -> Callable[[str], str]:
    """:func:`renamed_key` over the conversions ``from_pretrained`` applies to ``model``: those it recorded when it
    loaded the model, else transformers' registered ones for the model's classes (those ``save_pretrained`` reverts
    as it saves a model built from its config)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model)
        except Exception:  # (a transformers without key conversions saves the model's own names)
            return same_key
    return renamed_key(conversions)
