"""``output_attentions=True`` with bottleneck adapters on the attention sublayer (``mh_adapter``, as in
``double_seq_bn``). Transformers 5 records attention weights with forward hooks that it installs, at the first forward
that asks, on the modules that are instances of the model's attention class; the wrapper that stands in for such a
module is an instance of that class too and shares its hooks (``adapter_engine.wrapping``). Tiny random models with
eager attention (SDPA returns no weights, patched or not); BERT is the control (its adapters sit after
``attention.output``, outside the attention class).

Attention maps are compared bit for bit, the eager adapter path's within ``ATOL``: the adapters after a layer's
attention change the next layers' inputs, not the weights of that attention, which the tests recompute from the
inputs the module received.
"""

import copy
import io
import re

import pytest
import torch
import torch.nn as nn
import transformers as tf

import adapter_engine as ae
from adapter_engine.bottleneck import BottleneckStackLayer, OutputWithAdapters, unwrap_sublayer, wrap_sublayer

ATOL = 1e-5  # the eager adapter modules against the fused op (fp32, O(1) values: it sums in another order)
_SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2)
_GPT2 |= dict(resid_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
_DISTILBERT = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_VIT |= dict(image_size=8, patch_size=4)
# arch -> (tiny eager model, the attention module's path in a block)
ARCHS = {
    "bert": (lambda: tf.BertModel(tf.BertConfig(**_SIZES, **_NO_DROPOUT)), "attention.self"),
    "gpt2": (lambda: tf.GPT2Model(tf.GPT2Config(**_GPT2)), "attn"),
    "llama": (
        lambda: tf.LlamaModel(tf.LlamaConfig(**_SIZES, num_key_value_heads=2, attn_implementation="eager")),
        "self_attn",
    ),
    "distilbert": (
        lambda: tf.DistilBertModel(tf.DistilBertConfig(**_DISTILBERT, attn_implementation="eager")),
        "attention",
    ),
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(**_VIT, **_NO_DROPOUT), add_pooling_layer=False), "attention"),
}


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


def batch(arch: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)}
    ids = torch.randint(3, 64, (2, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask} | ({"use_cache": False} if arch in ("gpt2", "llama") else {})


def with_adapters(base: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``base`` with a ``double_seq_bn`` stack of ``names``, random weights (its init is the identity)."""
    model = copy.deepcopy(base)
    for name in names:
        ae.add_adapter(model, name, "double_seq_bn")
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key:
                p.normal_(0.0, 0.5)
    ae.set_active_adapters(model, names)
    return model


def attention_modules(model: nn.Module, arch: str) -> list[nn.Module]:
    """Each block's module of the model's attention class (a wrapper standing in for it where adapters sit there)."""
    path = re.escape(ARCHS[arch][1])
    return [m for n, m in model.named_modules() if re.fullmatch(rf"(.+\.)?\d+\.{path}", n)]


def same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_output_attentions_with_a_stack_on_the_attention_sublayer(arch):
    """Before: GPT-2, Llama, DistilBERT and ViT returned no attention weights (an empty tuple) for the layers whose
    attention sublayer held the adapters' wrapper."""
    base, inputs = make(arch), batch(arch)
    names = [f"attn_maps_{arch}_{i}" for i in range(2)]
    model = with_adapters(base, names)
    ref = base(**inputs, output_attentions=True, output_hidden_states=True)
    plain = model(**inputs).last_hidden_state

    classes = [type(m) for m in attention_modules(base, arch)]
    calls = []  # (module, args, kwargs, output) of each attention call, to recompute its weights
    handles = [
        m.register_forward_hook(lambda mod, args, kwargs, out: calls.append((mod, args, kwargs, out)), with_kwargs=True)
        for m in attention_modules(model, arch)
    ]
    got = model(**inputs, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()

    assert len(got.attentions) == len(ref.attentions) == 2
    assert len(got.hidden_states) == len(ref.hidden_states)
    assert torch.equal(got.last_hidden_state, plain)  # recording changes no output
    assert torch.equal(got.attentions[0], ref.attentions[0])  # the adapters run after the first layer's attention
    assert (got.attentions[1] - ref.attentions[1]).abs().max() > 1e-4  # and change the second layer's input
    for (module, args, kwargs, _), cls, recorded in zip(calls, classes, got.attentions, strict=True):
        assert isinstance(module, cls)
        assert torch.equal(cls.forward(module, *args, **kwargs)[1], recorded)  # the attention the model computed

    layers = [m for m in model.modules() if isinstance(m, BottleneckStackLayer)]
    for layer in layers:  # the eager adapter modules: the same attention maps
        layer.fused = False
    eager = model(**inputs, output_attentions=True).attentions
    torch.testing.assert_close(eager, got.attentions, atol=ATOL, rtol=0)
    for layer in layers:  # depth 0: the unpatched model's maps, bit for bit
        layer.set_depth(0)
    assert same(model(**inputs, output_attentions=True).attentions, ref.attentions)


@pytest.mark.parametrize("arch", ["distilbert", "llama"])
@torch.no_grad()
def test_attention_maps_after_torch_save_deepcopy_and_unpatch(arch):
    """The wrappers' classes are made at run time (wrapper class + the wrapped module's class): they pickle through
    their two bases. DistilBERT's attention wrapper also holds a hook on itself (the residual it reads)."""
    base, inputs = make(arch), batch(arch)
    model = with_adapters(base, [f"attn_keep_{arch}"])
    buffer = io.BytesIO()
    # saved before the first forward that records: transformers' recording hooks are local functions, so a model it
    # has hooked cannot be pickled, patched or not
    torch.save(model, buffer)
    got = model(**inputs, output_attentions=True)
    for other in (torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), copy.deepcopy(model)):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        out = other(**inputs, output_attentions=True)
        assert torch.equal(out.last_hidden_state, got.last_hidden_state) and same(out.attentions, got.attentions)

    ref = base(**inputs, output_attentions=True).attentions
    ae.unpatch(model)  # hooked while patched: the original modules keep the hooks, and are of their own class again
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert same(model(**inputs, output_attentions=True).attentions, ref)


@torch.no_grad()
def test_hooks_on_a_module_run_on_its_wrapper_and_stay_after_unpatch():
    """Before: hooks on an attention module (transformers' own, installed by an earlier forward with
    ``output_attentions=True``, or a user's) stopped running once adapters wrapped it, silently."""
    model, inputs = make("llama"), batch("llama")
    ref = model(**inputs, output_attentions=True).attentions  # transformers hooks the attention modules now
    first, second = attention_modules(model, "llama")
    seen = []
    handle = first.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    ae.add_adapter(model, "attn_hooked_before", "double_seq_bn")
    ae.set_active_adapters(model, "attn_hooked_before")
    assert attention_modules(model, "llama")[0] is not first  # wrapped
    got = model(**inputs, output_attentions=True).attentions
    assert len(got) == 2 and len(seen) == 1 and torch.equal(seen[0], got[0])
    handle.remove()  # a handle made before the wrapping removes its hook from the wrapper
    later = attention_modules(model, "llama")[1].register_forward_hook(lambda module, args, out: seen.append(out[1]))
    model(**inputs)
    assert len(seen) == 2
    ae.unpatch(model)
    assert attention_modules(model, "llama") == [first, second]
    assert same(model(**inputs, output_attentions=True).attentions, ref) and len(seen) == 3
    later.remove()  # a handle made while wrapped removes its hook from the original module
    model(**inputs)
    assert len(seen) == 3


class Scaled(nn.Module):
    """A sublayer whose instances override a class default (``scale``)."""

    scale = 1.0

    def __init__(self):
        super().__init__()
        self.dense, self.dropout, self.scale = nn.Linear(8, 8), nn.Identity(), 2.0

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states)) * self.scale + input_tensor


def test_a_wrapper_is_of_the_wrapped_class_and_keeps_its_instance_attributes():
    """The wrapper's class now derives from the wrapped module's class, whose class attributes it finds before it
    falls back to the wrapped module's attributes: the module's own values stay the ones read."""
    parent = nn.Module()
    parent.out = original = Scaled()
    h, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want = original(h, y)
    wrapper = wrap_sublayer(parent, "out", OutputWithAdapters, layer_norm=None)
    assert isinstance(wrapper, Scaled) and isinstance(wrapper, OutputWithAdapters)
    assert type(wrapper) is type(OutputWithAdapters(Scaled(), layer_norm=None))  # one class per pair
    assert wrapper.scale == 2.0 and torch.equal(wrapper(h, y), want)
    copied = copy.deepcopy(parent)
    assert type(copied.out) is type(wrapper) and torch.equal(copied.out(h, y), want)
    assert unwrap_sublayer(parent, "out") is original and type(parent.out) is Scaled
