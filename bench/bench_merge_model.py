"""Merge and FFT at model level: ``merge_adapter`` against PEFT's ``merge_and_unload`` on the Llama-shaped model
(hidden 4096, intermediate 11008, 4 layers, all seven projections, r=16, bf16), and the streamed
``merge_checkpoint`` (throughput in GB/s, peak host memory growth against the largest tensor)."""

import json
import os

import pytest
import torch
from harness import device, on_gpu, pick, rounds, timed

import adapter_engine as ae
from adapter_engine.checkpoint import merge_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=pick(4096, 64), intermediate_size=pick(11008, 96), num_hidden_layers=pick(4, 1),
        num_attention_heads=pick(32, 4), num_key_value_heads=pick(32, 4), vocab_size=128,
    )  # fmt: skip
    with torch.device(device()):
        return LlamaModel(config).to(torch.bfloat16 if on_gpu() else torch.float32)


@pytest.mark.parametrize("provider", ["engine", "engine_safe", "peft", "peft_safe"])
def bench_merge_whole_model(benchmark, llama, provider):
    """``*_safe``: every merged value is checked for NaN / infinity before anything is written (the engine's
    default, ``safe=True``; PEFT's ``safe_merge=True``). The plain rows skip the check (PEFT's default)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    safe = provider.endswith("_safe")
    holder = {}
    if provider.startswith("engine"):

        def setup():
            ae.add_adapter(
                llama, "a", ae.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
            )

        def run():
            ae.merge_adapter(llama, "a", safe=safe)

    else:

        def setup():
            holder["model"] = get_peft_model(llama, config)

        def run():
            holder["model"].merge_and_unload(safe_merge=safe)

    timed(benchmark, run, setup=setup, n_rounds=rounds(5), warmup=pick(1, 0), provider=provider,
          case="Llama-shaped 4 layers r=16")  # fmt: skip


def _vm(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def bench_merge_checkpoint_streamed(benchmark, tmp_path):
    """A sharded checkpoint streamed through the merge: GB/s and peak host memory growth."""
    from safetensors.torch import save_file

    side, n_layers, per_shard = pick(4096, 256), pick(32, 8), 8  # bf16 4096^2: 32 MiB a tensor, 1 GiB in all
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    weight_map = {}
    for shard in range(n_layers // per_shard):
        names = [f"layers.{i}.proj.weight" for i in range(shard * per_shard, (shard + 1) * per_shard)]
        fname = f"model-{shard:05d}.safetensors"
        save_file({n: torch.randn(side, side).to(dtype) for n in names}, base / fname)
        weight_map.update(dict.fromkeys(names, fname))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(
        {f"base_model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(*shape) * 0.01
         for i in range(n_layers) for ab, shape in (("A", (16, side)), ("B", (side, 16)))},
        adapter / "adapter_model.safetensors",
    )  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    out = tmp_path / "out"
    peaks = []

    def run():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        start = _vm("VmRSS:")
        merge_checkpoint(base, adapter, out, overwrite=True, progress=False)
        peaks.append(_vm("VmHWM:") - start)

    total = n_layers * side * side * (2 if on_gpu() else 4)
    median = timed(benchmark, run, n_rounds=rounds(3), warmup=0, provider="engine", case="streamed checkpoint")
    benchmark.extra_info.update(
        checkpoint_bytes=total, largest_tensor_bytes=total // n_layers, gb_per_s=total / median / 1e6,
        peak_host_growth_bytes=max(peaks), peak_growth_vs_largest_tensor=max(peaks) / (total // n_layers),
    )  # fmt: skip
    assert os.path.isdir(out)
