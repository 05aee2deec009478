"""Whole-model LoRA serving (issue 3): a Llama-shaped model (hidden 4096, 4 layers, q/k/v/o/gate/up/down, r=16, bf16) on
16 x 256 tokens. Providers: ``bare`` (no adapter), ``engine_one`` (one adapter for every row), ``engine_mixed`` (4
resident adapters, each sequence routed to one of them or to none, one fused forward per layer: the segmented
kernels), ``engine_mixed_masked`` (the same batch on the masked stacked-rank path, which above 64 rows times the
persistent TMA GEMM, adapter ids applied in its epilogue, against cuBLAS ``"composition"``: y written once, against
the segmented path's extra pass over y; to settle ``DISPATCH`` for mixed batches), ``peft_one`` and ``peft_mixed``
(PEFT with ``adapter_names=``, which loops over the adapters). Both libraries keep their adapters of this bf16 model
in fp32 by default (``autocast_adapter_dtype``): PEFT computes the low-rank terms in fp32, the engine in bf16 from
copies cached at the first call (since session 22; before, its adapters were bf16). Target (H100): the mixed batch
at most 1.10x the bare model; PEFT measured 2.19x (NOTES.md)."""

import pytest
import torch
from harness import device, force_masked_lora, host_ms, lora_segmented_calls, on_gpu, pick, timed

import adapter_engine as ae

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 4
_MODELS: dict = {}


def _llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=pick(4096, 64), intermediate_size=pick(11008, 96), num_hidden_layers=pick(4, 1),
        num_attention_heads=pick(32, 4), num_key_value_heads=pick(32, 4), vocab_size=pick(32000, 128),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device()):
        return LlamaModel(config).to(torch.bfloat16 if on_gpu() else torch.float32).eval()


def _engine():
    if "engine" not in _MODELS:
        model = _llama()
        for i in range(N_ADAPTERS):
            config = ae.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
            ae.add_adapter(model, f"a{i}", config)
        _MODELS["engine"] = model
    return _MODELS["engine"]


def _peft():
    if "peft" not in _MODELS:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(_llama(), config, adapter_name="a0")
        for i in range(1, N_ADAPTERS):
            model.add_adapter(f"a{i}", config)
        _MODELS["peft"] = model.eval()
    return _MODELS["peft"]


@pytest.mark.parametrize(
    "provider", ["bare", "engine_one", "engine_mixed", "engine_mixed_masked", "peft_one", "peft_mixed"]
)
def bench_lora_model_mixed_batch(benchmark, provider, monkeypatch):
    batch, seq = pick((16, 256), (5, 8))
    ids = torch.randint(0, 100, (batch, seq), device=device())
    routes = [None if i % (N_ADAPTERS + 1) == N_ADAPTERS else f"a{i % (N_ADAPTERS + 1)}" for i in range(batch)]
    if provider.startswith("peft"):
        model = _peft()
        names = ["__base__" if r is None else r for r in routes] if provider == "peft_mixed" else None
        model.base_model.set_adapter("a0")  # (once, untimed: it walks every module; a forward pays none of it)

        def run():
            if names is None:
                return model(input_ids=ids)
            return model(input_ids=ids, adapter_names=names)

    else:
        model = _engine()
        spec = {"bare": None, "engine_one": "a0", "engine_mixed": routes, "engine_mixed_masked": routes}[provider]
        if provider == "engine_mixed_masked":
            force_masked_lora(monkeypatch)

        def run():
            with ae.use_adapters(spec):
                return model(input_ids=ids)

    with torch.no_grad():
        with lora_segmented_calls() as segmented:
            run()  # (untimed: which path the LoRA layers take; session 23's masked row took the segmented one)
        assert provider != "engine_mixed_masked" or not segmented[0], f"{segmented[0]} segmented LoRA calls"
        timed(benchmark, run, n_rounds=pick(20, 1), provider=provider,
              case=f"Llama-shaped {batch}x{seq} tokens, {N_ADAPTERS} adapters")  # fmt: skip
        # the host's share of a forward (equal to the median when the host is the slower side: an eager row then
        # measures Python and launches, not kernels)
        benchmark.extra_info["host_ms"] = host_ms(run)
    if not provider.startswith("peft"):  # what the large-M timings chose for the model's GEMM shapes
        from adapter_engine.kernels.lora_linear_dispatch import _LARGE_M, _MIXED

        benchmark.extra_info["large_m_choices"] = {" ".join(map(str, k[:4])): str(c) for k, c in _LARGE_M.items()}
        benchmark.extra_info["mixed_choices"] = {" ".join(map(str, k[:4])): str(c) for k, c in _MIXED.items()}
        benchmark.extra_info["lora_segmented_calls"] = segmented[0]  # (per forward: 0 on the masked path)
