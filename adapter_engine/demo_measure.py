"""The demo's measurements: peak memory a block adds (CUDA or the resident set), achievable matmul and copy
throughput, a ``transformers.Trainer`` run with its step times, accuracy and single-request latency."""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Any

import torch


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
