"""Hooks on the modules the engine wraps: a LoRA / IA3 layer (``LoraLinear``) in place of an ``nn.Linear`` / GPT-2
``Conv1D``, a module with trained copies (``modules_to_save``, ``ModulesToSaveLayer``). The wrapper shares the
module's forward / backward hook dicts (``adapter_engine.wrapping.share_hooks``): hooks registered before the
wrapping run on it, with its adapted output, their handles remove them, and hooks added while wrapped stay on the
module that ``unpatch`` or a merge that unpatches gives back. (Bottleneck wrappers:
tests/test_bottleneck_attentions.py.) Tiny random fp32 models; outputs compared bit for bit, with the wrapper's own
call as the reference.
"""

import copy
import io

import pytest
import torch
import transformers as tf
from torch import nn

import adapter_engine as ae
from adapter_engine.lora import LoraLinear

_LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_LLAMA |= dict(intermediate_size=48)
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0, attn_pdrop=0.0)
_GPT2 |= dict(embd_pdrop=0.0)
_RANDOM_IA3 = dict(init_ia3_weights=False)  # (vectors near 1, not 1: the adapted output differs from the base's)


def llama() -> nn.Module:
    torch.manual_seed(0)
    return tf.LlamaModel(tf.LlamaConfig(**_LLAMA)).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tf.GPT2Model(tf.GPT2Config(**_GPT2)).eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))


class Recorder:
    """A picklable hook: records what each call saw (``kind``: forward, forward pre, or full backward hook)."""

    def __init__(self, kind: str):
        self.kind, self.seen = kind, []

    def __call__(self, module, *args):
        self.seen.append(tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in args))


def hook_all(module: nn.Module) -> tuple[dict[str, Recorder], list]:
    """A forward pre hook, a forward hook, one with kwargs and a full backward hook on ``module``; (hooks, handles)."""
    hooks = {k: Recorder(k) for k in ("pre", "forward", "kwargs", "backward")}
    handles = [
        module.register_forward_pre_hook(hooks["pre"]),
        module.register_forward_hook(hooks["forward"]),
        module.register_forward_hook(hooks["kwargs"], with_kwargs=True),
        module.register_full_backward_hook(hooks["backward"]),
    ]
    return hooks, handles


def counts(hooks: dict[str, Recorder]) -> dict[str, int]:
    return {k: len(h.seen) for k, h in hooks.items()}


@pytest.mark.parametrize(
    "make, path, config",
    [
        (llama, "layers.0.self_attn.q_proj", ae.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)),
        (gpt2, "h.0.attn.c_attn", ae.IA3Config(target_modules=["c_attn"], feedforward_modules=[], **_RANDOM_IA3)),
    ],
    ids=["lora-linear", "ia3-conv1d"],
)
def test_hooks_registered_before_an_adapter_run_on_its_layer_with_the_adapted_output(make, path, config):
    """Before: a hook on ``q_proj`` (activation capture, probing, gradient monitoring) stopped firing once a LoRA /
    IA3 adapter wrapped the layer, silently, and its handle no longer reached the layer in the model."""
    model, x = make(), ids()
    base = model.get_submodule(path)
    hooks, handles = hook_all(base)
    ae.add_adapter(model, f"hooked_before_{type(config).__name__}", config)
    ae.set_active_adapters(model, f"hooked_before_{type(config).__name__}")
    layer = model.get_submodule(path)
    assert isinstance(layer, LoraLinear) and layer is not base

    model(x).last_hidden_state.sum().backward()
    assert counts(hooks) == {"pre": 1, "forward": 1, "kwargs": 1, "backward": 1}
    (inp,), out = hooks["forward"].seen[0]
    assert torch.equal(hooks["pre"].seen[0][0][0], inp)
    assert torch.equal(out, layer(inp)) and not torch.equal(out, base(inp))  # the adapted output, not the base's
    assert hooks["backward"].seen[0][1][0].shape == out.shape  # (grad_input, grad_output) of the wrapper's call

    for handle in handles:  # handles made on the base layer remove the hooks from the wrapper
        handle.remove()
    before = counts(hooks)
    model(x).last_hidden_state.sum().backward()
    assert counts(hooks) == before


def test_hooks_added_while_patched_stay_on_the_layer_after_unpatch_and_after_a_merge():
    model, x = llama(), ids()
    config = ae.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ae.add_adapter(model, "hooked_while_patched", config)
    ae.set_active_adapters(model, "hooked_while_patched")
    q, v = (model.get_submodule(f"layers.0.self_attn.{p}") for p in ("q_proj", "v_proj"))
    originals = [ae.patching.get_state(model).replaced[f"layers.0.self_attn.{p}"] for p in ("q_proj", "v_proj")]
    q_hooks, q_handles = hook_all(q)
    v_hooks, _ = hook_all(v)
    adapted = model(x).last_hidden_state
    ae.merge_adapter(model)  # the only adapter: the model is unpatched, the merged layers given back
    assert [model.get_submodule(f"layers.0.self_attn.{p}") for p in ("q_proj", "v_proj")] == originals
    assert all(type(m) is nn.Linear and m._is_full_backward_hook for m in originals)  # full backward hooks still

    merged = model(x).last_hidden_state
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)  # (the merge rounds once per weight)
    merged.sum().backward()
    assert counts(q_hooks) == counts(v_hooks) == {"pre": 2, "forward": 2, "kwargs": 2, "backward": 1}
    for handle in q_handles:  # handles made on the wrapper remove the hooks from the module given back
        handle.remove()
    model(x)
    assert counts(q_hooks)["forward"] == 2 and counts(v_hooks)["forward"] == 3

    other = llama()  # unpatch: the same
    ae.add_adapter(other, "hooked_then_unpatched", ae.LoraConfig(r=4, target_modules=["q_proj"]))
    hooks, _ = hook_all(other.layers[1].self_attn.q_proj)
    ae.unpatch(other)
    other(x).last_hidden_state.sum().backward()
    assert type(other.layers[1].self_attn.q_proj) is nn.Linear
    assert counts(hooks) == {"pre": 1, "forward": 1, "kwargs": 1, "backward": 1}


@torch.no_grad()
def test_a_patched_model_with_hooks_on_its_lora_layers_survives_torch_save_and_deepcopy():
    model, x = llama(), ids()
    hook = Recorder("forward")
    model.layers[0].self_attn.q_proj.register_forward_hook(hook)
    ae.add_adapter(model, "hooked_copied", ae.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ae.set_active_adapters(model, "hooked_copied")
    want = model(x).last_hidden_state
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for other in (torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), copy.deepcopy(model)):
        layer = other.layers[0].self_attn.q_proj
        (copied,) = layer._forward_hooks.values()  # the copy's own hook, shared with its own original layer
        assert torch.equal(other(x).last_hidden_state, want) and len(copied.seen) == 2
        ae.unpatch(other)
        other(x)
        assert len(copied.seen) == 3 and len(hook.seen) == 1


def roberta() -> nn.Module:
    """A tiny RoBERTa classifier: its head (``classifier``) holds Linear layers of its own (``dense``, ``out_proj``)."""
    torch.manual_seed(0)
    config = tf.RobertaConfig(**_LLAMA, max_position_embeddings=40, pad_token_id=1, num_labels=3)
    return tf.RobertaForSequenceClassification(config).eval()


def test_hooks_on_a_module_with_trained_copies_run_whichever_module_runs_and_their_handles_remove_them():
    """Before: a hook on ``classifier`` stopped running while no adapter was active (the wrapper ran the original's
    forward without its hooks), and ran from each copy otherwise (deep copies of it, which the handle did not remove:
    it kept running after ``handle.remove()``); a hook on ``classifier.dense`` likewise kept running in the copies."""
    model, x = roberta(), ids()
    config = ae.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"], init_lora_weights=False)
    head, head_dense = model.classifier, model.classifier.dense
    hooks, handles = hook_all(head)
    inner = Recorder("forward")
    handles.append(head_dense.register_forward_hook(inner))
    outputs = []  # (a function, which a deep copy of the hook dicts would share: a hook run twice shows here)
    handles.append(head.register_forward_hook(lambda module, args, out: outputs.append(out)))
    ae.add_adapter(model, "copied_head_a", config)
    ae.add_adapter(model, "copied_head_b", config)
    copies = model.classifier.modules_to_save
    with torch.no_grad():
        for p in copies.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))

    for calls, active in enumerate(("copied_head_a", "copied_head_b", None), start=1):
        ae.set_active_adapters(model, active)
        logits = model(x).logits
        logits.sum().backward()
        assert counts(hooks) == {"pre": calls, "forward": calls, "kwargs": calls, "backward": calls}
        assert len(outputs) == calls and len(inner.seen) == 1  # (copies[...].dense or the original's: the one that ran)
        ran = copies[active] if active else head  # the module whose output the hooks see: the active copy's
        (features,), out = hooks["forward"].seen[-1]
        assert torch.equal(out, logits) and torch.equal(out, type(ran).forward(ran, features))
        inner.seen.clear()  # (the recompute ran a dense layer too)
    for handle in handles:
        handle.remove()
    for active in ("copied_head_a", None):
        ae.set_active_adapters(model, active)
        model(x).logits.sum().backward()
    assert counts(hooks) == {"pre": calls, "forward": calls, "kwargs": calls, "backward": calls}
    assert len(outputs) == calls and not inner.seen

    added, _ = hook_all(model.classifier)  # while patched: it stays on the module given back
    ae.unpatch(model)
    assert model.classifier is head
    model(x).logits.sum().backward()
    assert counts(added) == {"pre": 1, "forward": 1, "kwargs": 1, "backward": 1}


@torch.no_grad()
def test_a_bottleneck_keeps_reading_its_residual_from_a_module_that_gets_trained_copies():
    """A bottleneck layer reads its residual through a hook on a module of the block (Llama's
    ``post_attention_layernorm`` for ``par_bn``). Before: once a LoRA adapter with that module in
    ``modules_to_save`` wrapped it, the hook stopped running and every forward failed ("these adapters read the
    residual y: pass residual_from=")."""
    model, x = llama(), ids()
    ae.add_adapter(model, "residual_reader", "par_bn")
    for key, p in model.named_parameters():
        if ".adapters." in key:
            p.normal_(0.0, 0.5)
    ae.set_active_adapters(model, "residual_reader")
    want = model(x).last_hidden_state
    config = ae.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["post_attention_layernorm"])
    ae.add_adapter(model, "copied_norms", config)
    assert torch.equal(model(x).last_hidden_state, want)
    ae.set_active_adapters(model, ["copied_norms", "residual_reader"])  # (LoRA's B is zero, the copies as they were)
    torch.testing.assert_close(model(x).last_hidden_state, want, atol=1e-5, rtol=0)
