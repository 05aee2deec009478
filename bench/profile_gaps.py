"""Where the time goes in the two whole-model gaps the benchmarks could not explain (one forward each).

    python bench/profile_gaps.py OUTDIR [CASE ...]

Session 7's H100 run (bench/results/2026-11-27-h100-session7/NOTES.md):
- bench_serving: 16 LoRAs mixed in one BERT-base batch took 25.1 ms against 15.8 ms for one LoRA, about 390 us
  more per LoRA layer call, where the op alone (bench_lora_linear's mixed rows, 4096x4096) costs 50 us more;
- bench_bottleneck: three stacked adapters after each BERT-base FFN cost about 420 us per layer against 38 us for
  one, where the interpreter's step count and the sm_90 builds grow linearly with the depth;
- bench_bottleneck: training the top of a stack of 3 alone (4096 x 768) took 3.30 ms fused against 1.66 ms eager.
Both rows were host bound. Session 23's H200 added two LoRA cases: a Llama-shaped forward with one adapter took
16.3 ms of host time where the bare model took 5.2, and the engine's forward+backward of one 4096 x 4096 layer at
4096 rows took 1.16 ms for 0.45 ms of kernels. This profiles one forward of each case with torch.profiler (CPU and
CUDA activities; on a CPU, the tiny smoke-test sizes and CPU activity only) and writes, per case, the table of ops
by self CUDA time and by self CPU time, cProfile's table of the host's Python functions, the forward's wall time,
its CUDA kernel time and its number of kernel launches to OUTDIR/profile_<case>.txt and OUTDIR/profile.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_bottleneck  # noqa: E402  (bench/ is not a package: imported from its folder)
import bench_serving  # noqa: E402


def _cases() -> dict:
    """label -> a function that sets the case up and returns its forward."""

    def lora(spec_of):
        def setup():
            ids = bench_serving._inputs()
            names = [f"l{i % bench_serving.N_ADAPTERS}" for i in range(ids.shape[0])]
            model, spec = bench_serving._loras(), spec_of(names)
            return lambda: model(input_ids=ids, adapter=spec).last_hidden_state

        return setup

    def stack(setup_name):
        def setup():
            return bench_bottleneck._forward_case("bert-base", setup_name, True, "forward")[2]

        return setup

    def train(eager: bool):
        def setup():
            step = bench_bottleneck._stack_train_step(bench_bottleneck.pick(768, 48), eager)[0]
            return lambda: torch.enable_grad()(step)()

        return setup

    def lora_train(provider):  # bench_lora_linear_train's 4096 x 4096 row at M = 4096 (session 23's H200: the engine
        # 1.16 ms, composition 0.93, PEFT 0.92, bare 0.40; at GPU-bound sizes the low-rank work should add ~0.1 ms)
        def setup():
            import bench_lora_linear as bl
            import torch.nn.functional as F

            from adapter_engine.kernels import lora_linear

            shape, M = bl.SHAPES[0], bl.pick(4096, 16)
            w, (A, *_), (B, *_), peft_layer = bl._layer({}, shape)
            x = torch.randn(M, shape[0], device=bl.device(), dtype=bl.DTYPE, requires_grad=True)
            dy = torch.randn(M, shape[1], device=bl.device(), dtype=bl.DTYPE)
            forward = {
                "engine": lambda: lora_linear(x, w, A, B, bl.SCALE),
                "composition": lambda: F.linear(x, w).addmm_(F.linear(x, A), B.t(), alpha=bl.SCALE),
                "peft": lambda: peft_layer(x),
            }[provider]
            return torch.enable_grad()(lambda: torch.autograd.grad(forward(), [x, A, B], dy))

        return setup

    def lora_model(spec):  # bench_lora_model's Llama-shaped model (session 23's H200: one adapter for every row took
        # 20.5 ms with 16.3 ms of host time, bare 15.8 with 5.2: about 390 us more host per LoRA layer call)
        def setup():
            import bench_lora_model as bm

            import adapter_engine as ae

            model = bm._engine()
            ids = torch.randint(0, 100, bm.pick((16, 256), (5, 8)), device=bm.device())

            def forward():
                with ae.use_adapters(spec):
                    return model(input_ids=ids).last_hidden_state

            return forward

        return setup

    return {
        "lora_model_one": lora_model("a0"),
        "lora_train_engine": lora_train("engine"),
        "lora_train_composition": lora_train("composition"),
        "lora_train_peft": lora_train("peft"),
        "lora_single": lora(lambda names: names[0]),
        "lora_mixed16": lora(lambda names: names),
        "bert_stack1": stack("stack1"),
        "bert_stack3": stack("stack3"),
        "stack3_train_eager": train(True),
        "stack3_train_fused": train(False),
    }


def _kernel_summary(prof) -> dict:
    """The CUDA kernels of a profile: their summed time, their count and the span from the first one's start to the
    last one's end (ms); span minus kernel time is the GPU's idle time between them."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0.0
    return {
        "cuda_kernel_ms": sum(e.device_time_total for e in kernels) / 1e3,
        "kernel_launches": len(kernels),
        "kernel_span_ms": span / 1e3,
    }


def _host_profile(fn) -> str:
    """cProfile's table of three calls of ``fn`` by own time: which Python functions (the engine's, Triton's
    launcher, autograd's) the host time goes to, which torch.profiler's op table does not say."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(3):
            fn()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


def _graphed_summary(fn) -> tuple[dict, object]:
    """One CUDA-graph replay of ``fn`` (``harness.cuda_graphed``): its wall time and its kernels' time and span, and
    the replay's profile (None when no graph was captured). Session 13's H100 replayed a bert-base forward of 1.75
    ms of kernels in 5.4 ms: this says whether the GPU idles between the graph's kernels or runs them slower than
    eagerly; the profile's table lists the kernels the capture took (session 15's bert-base stack of 3 ran 1.29x
    bare graphed, more than either stack path timed alone), which may differ from the eager forward's."""
    from harness import cuda_graphed
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.no_grad():  # (the training cases enable grad inside)
            replay = cuda_graphed(fn)
    except RuntimeError as err:  # a host sync in the forward (or a backward that cannot be captured)
        return {"skipped": str(err)[:200]}, None
    replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    replay()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    return {"wall_ms": wall_ms, **_kernel_summary(prof)}, prof


def main(out: str, only: list[str]) -> None:
    """Profiles every case, or those named in ``only``."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out, exist_ok=True)
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    summary = {"device": torch.cuda.get_device_name() if gpu else "cpu"}
    for label, setup in _cases().items():
        if only and label not in only:
            continue
        fn = setup()
        with torch.no_grad():
            for _ in range(3):  # compile, autotune, fill the caches
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
            with profile(activities=activities) as prof:
                fn()
                sync()
        host = _host_profile(fn)
        averages = prof.key_averages()
        summary[label] = {"wall_ms": wall_ms, **_kernel_summary(prof)}
        graphed = None
        if gpu:
            summary[label]["graphed"], graphed = _graphed_summary(fn)
        with open(os.path.join(out, f"profile_{label}.txt"), "w") as fh:
            fh.write(f"{label}: {json.dumps(summary[label])}\n\n")
            fh.write(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
            fh.write("\n\n")
            fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
            fh.write("\n\nthe host's Python, 3 calls (cProfile, by own time):\n" + host)
            if graphed is not None:
                fh.write("\n\none CUDA-graph replay:\n")
                fh.write(graphed.key_averages().table(sort_by="self_device_time_total", row_limit=25,
                                                      max_name_column_width=60))  # fmt: skip
        print(label, summary[label])
    with open(os.path.join(out, "profile.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest", sys.argv[2:])
