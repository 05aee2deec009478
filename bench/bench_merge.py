"""Merge benchmark: fold 1 or 4 LoRA adapters into the Llama-shaped weights of the NOTES.md baseline.

Weights: hidden 4096, intermediate 11008, 4 layers, q/k/v/o/gate/up/down, r=16, bf16 (1.62 GB of targets).
Providers: engine (``merge_lora_many_``: the whole model in one launch, validation included), engine_plan (a
prepared ``LoraMergePlan``: the launch alone), engine_per_weight (``merge_lora_`` per weight), torch_addmm
(``W.addmm_(B, A)`` per adapter) and PEFT (``merge_adapter``).
Physical floor: read and write every target weight once at the copy bandwidth measured in the same run.
"""

import pytest
import torch
from harness import copy_bandwidth, device, on_gpu, pick, timed

from adapter_engine.kernels import merge_lora_, merge_lora_many_, prepare_lora_merge

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
LORA_ALPHA = 32


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=pick(4096, 64),
        intermediate_size=pick(11008, 96),
        num_hidden_layers=pick(4, 1),
        num_attention_heads=pick(32, 4),
        num_key_value_heads=pick(32, 4),
        vocab_size=128,
    )
    with torch.device(device()):
        model = LlamaModel(config).to(torch.bfloat16 if on_gpu() else torch.float32)
    targets = [m for name, m in model.named_modules() if name.split(".")[-1] in TARGETS]
    generator = torch.Generator(device=device()).manual_seed(0)
    adapters = [
        [
            (
                torch.randn(RANK, m.in_features, device=device(), generator=generator).to(m.weight.dtype) * 0.01,
                torch.randn(m.out_features, RANK, device=device(), generator=generator).to(m.weight.dtype) * 0.01,
            )
            for m in targets
        ]
        for _ in range(4)
    ]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets)
    return {"model": model, "targets": targets, "adapters": adapters, "weight_bytes": weight_bytes, "peft": None}


@pytest.fixture(scope="module")
def floor_ms(llama):
    return 2 * llama["weight_bytes"] / copy_bandwidth() * 1e3


def _peft_model(llama, n_adapters):
    from peft import LoraConfig, get_peft_model

    if llama["peft"] is None:
        config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(llama["model"], config, adapter_name="a0")
        for i in range(1, 4):
            peft_model.add_adapter(f"a{i}", config)
        llama["peft"] = peft_model
    names = [f"a{i}" for i in range(n_adapters)]
    return llama["peft"], names


@pytest.mark.parametrize("n_adapters", [1, 4])
@pytest.mark.parametrize("provider", ["engine", "engine_plan", "engine_per_weight", "torch_addmm", "peft"])
def bench_merge(benchmark, llama, floor_ms, provider, n_adapters):
    scale = LORA_ALPHA / RANK
    targets, adapters = llama["targets"], llama["adapters"][:n_adapters]
    setup = None
    weights = [m.weight for m in targets]
    lora_a = [[a[i][0] for a in adapters] for i in range(len(targets))]
    lora_b = [[a[i][1] for a in adapters] for i in range(len(targets))]
    scales = [[scale] * n_adapters for _ in targets]
    if provider == "engine":

        def run():
            merge_lora_many_(weights, lora_a, lora_b, scales)

    elif provider == "engine_plan":
        run = prepare_lora_merge(weights, lora_a, lora_b, scales).merge_

    elif provider == "engine_per_weight":

        def run():
            for i, m in enumerate(targets):
                merge_lora_(m.weight, [a[i][0] for a in adapters], [a[i][1] for a in adapters], [scale] * n_adapters)

    elif provider == "torch_addmm":

        def run():
            for i, m in enumerate(targets):
                for a in adapters:
                    m.weight.data.addmm_(a[i][1], a[i][0], alpha=scale)

    else:
        peft_model, names = _peft_model(llama, n_adapters)

        def run():
            peft_model.base_model.merge_adapter(adapter_names=names)

        def setup():
            peft_model.base_model.unmerge_adapter()

    with torch.no_grad():
        median = timed(
            benchmark,
            run,
            setup=setup,
            provider=provider,
            case=f"{n_adapters} adapter(s)",
            weight_bytes=llama["weight_bytes"],
            floor_ms=floor_ms,
        )
    benchmark.extra_info["fraction_of_floor"] = floor_ms / median
    if provider == "peft":
        peft_model.base_model.unmerge_adapter()


@pytest.mark.skipif(on_gpu(), reason="on a GPU, bench/gpu_check.sh runs the full sweep")
def bench_tune_merge_smoke(tmp_path):
    """The tile sweep (bench/tune_merge.py) at tiny sizes in the interpreter, so the tool cannot rot."""
    import json

    import tune_merge

    tune_merge.main(str(tmp_path / "tune.json"))
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert {row["adapters"] for row in rows} == {1, 4} and all(row["ms"] > 0 for row in rows)
