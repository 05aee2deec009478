"""What a bottleneck layer keeps between fused training calls (adapter_engine/bottleneck.py): the frozen levels'
packed copy (``_training_pack``). Every call must match the eager modules after anything that changes what runs:
an optimizer step on the training level, a frozen level edited in place or loaded, its data replaced, another depth,
another level training.

Tolerances: fp32 in the interpreter; outputs 2e-5 (tests/test_bottleneck.py), gradients 1e-4 relative to the
largest entry (a different but equivalent op order).
"""

import pytest
import torch

import adapter_engine.bottleneck as bn
from adapter_engine.bottleneck import wrap_sublayer
from adapter_engine.bottleneck_adapter import BottleneckAdapter

pytestmark = pytest.mark.usefixtures("fused_training")

HIDDEN = 48


def _layer():
    """A BertOutput-shaped layer with levels a, b, c (ranks 6, 12, 3); c trains."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertModel(config).eval()
    w = wrap_sublayer(model.encoder.layer[0], "output")
    w.requires_grad_(False)
    for name, rank, act in (("a", 6, "relu"), ("b", 12, "gelu"), ("c", 3, "tanh")):
        adapter = BottleneckAdapter(HIDDEN, rank, act)
        with torch.no_grad():  # ("bert" init is near zero: make the adapters matter)
            for prm in adapter.parameters():
                prm.normal_(0.0, 0.3)
        adapter.requires_grad_(name == "c")
        w.add_adapter(name, adapter)
    w.set_active_stack(["a", "b", "c"])
    return w


def _step(w, x, y, grad_out):
    """(output, {parameter name: gradient}) of one fused call and of the eager modules; the gradients are cleared."""
    results = []
    for fused in (True, False):
        w.fused = fused
        out = w(x, y)
        out.backward(grad_out)
        results.append((out.detach(), {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}))
        w.zero_grad(set_to_none=True)
    w.fused = True
    (out, grads), (eager_out, eager_grads) = results
    torch.testing.assert_close(out, eager_out, atol=2e-5, rtol=2e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for n, g in grads.items():
        scale = eager_grads[n].abs().max().item()
        torch.testing.assert_close(g, eager_grads[n], atol=1e-4 * scale, rtol=1e-4)
    return out, grads


def test_fused_training_keeps_the_frozen_levels_packed_until_they_change(monkeypatch):
    """Training steps repack only the training level; each change below packs the frozen levels again (counted),
    and every call matches the eager modules with the new weights."""
    splits = []
    real = bn.split_pack
    monkeypatch.setattr(bn, "split_pack", lambda adapters, *a: splits.append(len(adapters)) or real(adapters, *a))
    w = _layer()
    x, y, grad_out = torch.randn(2, 5, 64), torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.5)
    a, b, c = (w.adapters[n] for n in "abc")

    def step():
        out, grads = _step(w, x, y, grad_out)
        return out, sorted({n.split(".")[1] for n in grads})  # the adapters that got gradients

    before, trained = step()
    assert trained == ["c"] and splits == [3]
    for _ in range(2):  # the optimizer updates c in place: the same kept frozen levels, c's new weights
        for p in c.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out, _ = step()
        assert not torch.equal(out, before)
        before = out
    assert splits == [3]

    def frozen_in_place():
        with torch.no_grad():
            a.adapter_up.weight.add_(0.25)

    def frozen_loaded():
        state = {k: v + 0.5 for k, v in b.state_dict().items()}
        b.load_state_dict(state)

    def frozen_data_replaced():  # (as ``.to()`` on the adapter module alone does)
        a.down.bias.data = a.down.bias.data - 0.5

    for change in (frozen_in_place, frozen_loaded, frozen_data_replaced):
        change()
        out, trained = step()
        assert trained == ["c"] and not torch.equal(out, before), change.__name__
        before = out
    assert splits == [3, 3, 3, 3]

    b.requires_grad_(True)  # two levels train
    out, trained = step()
    assert trained == ["b", "c"] and torch.equal(out, before) and splits == [3, 3, 3, 3, 3]
    b.requires_grad_(False)
    w.set_depth(2)  # c, the one training level, is off: nothing trains, no gradient
    with torch.no_grad():
        shallow = w(x, y)
    assert not torch.equal(shallow, before)
    a.requires_grad_(True)
    out, trained = step()  # a trains under frozen b
    assert trained == ["a"] and torch.equal(out, shallow) and splits == [3, 3, 3, 3, 3, 2]
    w.set_depth(None)
    out, trained = step()
    assert trained == ["a", "c"] and torch.equal(out, before) and splits == [3, 3, 3, 3, 3, 2, 3]


def test_a_frozen_adapter_replaced_under_its_name_is_packed_again():
    """A registration anywhere (a frozen level's module replaced) makes the kept frozen levels stale."""
    w = _layer()
    x, y, grad_out = torch.randn(2, 5, 64), torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    before, _ = _step(w, x, y, grad_out)
    old = w.adapters["a"].adapter_up
    new = torch.nn.Linear(old.in_features, old.out_features).requires_grad_(False)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.3)
    w.adapters["a"].adapter_up = new
    after, _ = _step(w, x, y, grad_out)
    assert not torch.equal(after, before)
