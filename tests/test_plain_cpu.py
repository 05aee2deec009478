"""The public API on a CPU without the Triton interpreter: every op takes its torch twin there.

The rest of the CPU tier runs the kernels in the interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before
any kernel module is imported), so these run in a subprocess without it: what a user's own script on a laptop
gets. Each scenario checks its numbers against another way of computing them, not only that nothing raised."""

import os
import subprocess
import sys
import textwrap

_PRELUDE = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaModel

    import adapter_engine as ae
    from adapter_engine.kernels import _backend

    assert not _backend.INTERPRET and not torch.cuda.is_available()
    torch.manual_seed(0)
    TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def llama():
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=128)
        return LlamaModel(config).eval()
    """
)


def run_plain(script: str) -> str:
    """Runs ``_PRELUDE`` + ``script`` in a fresh interpreter without ``TRITON_INTERPRET``; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _PRELUDE + textwrap.dedent(script)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_serving_a_mixed_batch_of_lora_adapters():
    """Rows routed to different LoRA adapters (and to none) in one forward equal each row run alone. (It raised
    "0 active drivers": the mixed-batch dispatch timed its Triton candidates on a CPU tensor.)"""
    run_plain(
        """
        model = llama()
        for i in range(3):
            ae.add_adapter(model, f"a{i}", ae.LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False))
        ids = torch.randint(0, 128, (8, 5))
        routes = [None if i % 4 == 3 else f"a{i % 4}" for i in range(8)]
        with torch.no_grad():
            with ae.use_adapters(routes):
                mixed = model(input_ids=ids).last_hidden_state
            for i, r in enumerate(routes):
                with ae.use_adapters(r):
                    alone = model(input_ids=ids[i : i + 1]).last_hidden_state
                torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )


def test_the_kernel_ops_take_their_torch_twins():
    """Every public op of ``adapter_engine.kernels`` on CPU tensors equals its formula written out in torch, and the
    fused LoRA op's gradients equal autograd's of that formula. (The bottleneck stack's launcher,
    ``bottleneck_stack_fwd``, raised "0 active drivers": it launched its Triton kernel on a CPU tensor.)"""
    run_plain(
        """
        from torch.nn.functional import layer_norm, relu
        from adapter_engine import kernels as K

        close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        H, R = 32, 8
        h, y, ln_w, ln_b = torch.randn(2, 5, H), torch.randn(2, 5, H), torch.rand(H) + 0.5, torch.randn(H)
        wd, bd = [torch.randn(R, H) * 0.2 for _ in range(2)], [torch.randn(R) * 0.1 for _ in range(2)]
        wu, bu = [torch.randn(H, R) * 0.2 for _ in range(2)], [torch.randn(H) * 0.1 for _ in range(2)]
        packed = K.pack_adapters(wd, bd, wu, bu, ["relu", "relu"], [1.0, 0.5])
        # two seq_bn levels in AdapterHub's order: r <- s * up(relu(down(LN(r + y)))) + r, then LN(r + y)
        ln = lambda t: layer_norm(t, (H,), ln_w, ln_b, 1e-12)
        r = h
        for i, s in enumerate((1.0, 0.5)):
            r = s * (relu(ln(r + y) @ wd[i].T + bd[i]) @ wu[i].T + bu[i]) + r
        opts = K.StackOptions()
        close(K.bottleneck_stack_fwd(h, y, ln_w, ln_b, packed, torch.tensor([[0, 1]] * 10, dtype=torch.int32), opts),
              ln(r + y))
        close(K.bottleneck_stack(h, y, packed, torch.tensor([0, 1]), opts, ln_w, ln_b), ln(r + y))

        x, w, bias = torch.randn(7, 24, requires_grad=True), torch.randn(16, 24), torch.randn(16)
        A, B = torch.randn(4, 24, requires_grad=True), torch.randn(16, 4, requires_grad=True)
        want = x @ w.T + bias + 0.5 * (x @ A.T) @ B.T
        grads = torch.autograd.grad(want.sum(), (x, A, B))
        for path in ("auto", "fused", "epilogue", "addmm", "composition", "persistent"):
            got = K.lora_linear(x, w, A, B, 0.5, bias, path=path)
            close(got, want)
            for g, ref in zip(torch.autograd.grad(got.sum(), (x, A, B)), grads):
                close(g, ref)
        ids = torch.tensor([0, 1, -1, 1, 0, 0, 1], dtype=torch.int32)
        As, Bs, scales = [torch.randn(4, 24), torch.randn(2, 24)], [torch.randn(16, 4), torch.randn(16, 2)], [0.5, 2.0]
        want = x @ w.T + bias
        want = torch.stack([row + scales[a] * (x[i] @ As[a].T) @ Bs[a].T if a >= 0 else row
                            for i, (row, a) in enumerate(zip(want, ids.tolist()))])
        for path in ("auto", "segmented", "fused"):
            close(K.lora_linear(x, w, As, Bs, scales, bias, adapter_ids=ids, path=path), want)
        plan = K.plan_segments(ids, [4, 2], scales)
        close(K.lora_segmented_fwd(x, w, torch.cat(As), torch.cat(Bs, 1), plan, bias)[0], want)

        w0, v = torch.randn(16, 24), torch.rand(16) + 0.5
        merged = w0.clone()
        close(K.merge_lora_(merged, A.detach(), B.detach(), 0.5), w0 + 0.5 * B.detach() @ A.detach())
        close(K.unmerge_lora_(merged, A.detach(), B.detach(), 0.5), w0)
        many = [w0.clone(), w0.clone()]
        K.merge_lora_many_(many, [As, As[0]], [Bs, Bs[0]], [scales, 1.0])
        close(many[0], w0 + 0.5 * Bs[0] @ As[0] + 2.0 * Bs[1] @ As[1])
        close(many[1], w0 + Bs[0] @ As[0])
        close(K.scale_ia3_(w0.clone(), v, dim=0), w0 * v[:, None])
        a, b = torch.randn(5, H), torch.randn(5, H)
        close(K.add_layer_norm(a, b, ln_w, ln_b, 1e-5)[1], layer_norm(a + b, (H,), ln_w, ln_b, 1e-5))
        print("ok")
        """
    )


def test_per_row_bottleneck_stacks_equal_each_row_alone():
    """Rows routed to bottleneck stacks of several depths, structures and LayerNorm options (and to none) in one
    forward, served (no autograd) and training (the eager modules), equal each row run alone, and rows without an
    adapter equal the unpatched model; the fused twin equals the eager modules at every depth. (With
    ``original_ln_after=False`` a row without an adapter came out of a BERT output sublayer as its bare projection,
    without the residual and LayerNorm, in every backend.)"""
    run_plain(
        """
        import copy
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=99)
        bert = BertModel(config).eval()
        ids = torch.randint(0, 99, (4, 6))
        with torch.no_grad():
            plain = bert(input_ids=ids).last_hidden_state
        S = ae.BottleneckConfig
        configs = {
            "seq": S.seq_bn(reduction_factor=4),
            "double": S.double_seq_bn(reduction_factor=4),
            "par": S.par_bn(),
            "ln": S.seq_bn(reduction_factor=4, ln_before=True, ln_after=True, residual_before_ln=False),
            "no_ln_after": S.seq_bn(reduction_factor=4, adapter_residual_before_ln=True, original_ln_after=False),
        }
        for kind, cfg in configs.items():
            named = lambda message: f"{kind}: {message}"
            model = copy.deepcopy(bert)
            for level in ("a", "b"):
                ae.add_adapter(model, kind + level, cfg)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".adapters." in name:
                        p.normal_(0, 0.1)
            layers = [m for m in model.modules() if isinstance(m, ae.bottleneck.BottleneckStackLayer)]
            routes = [None, kind + "a", ae.Stack(kind + "a", kind + "b"), None]
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    with ae.use_adapters(routes):
                        mixed = model(input_ids=ids).last_hidden_state
                    for i, route in enumerate(routes):
                        with ae.use_adapters(route):
                            alone = model(input_ids=ids[i : i + 1]).last_hidden_state
                        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5, msg=named)
                        if route is None:
                            torch.testing.assert_close(alone, plain[i : i + 1], rtol=1e-5, atol=1e-5, msg=named)
            with torch.no_grad():
                for depth in (1, 2):
                    ae.set_active_adapters(model, ae.Stack(*[kind + level for level in "ab"[:depth]]))
                    fused = model(input_ids=ids).last_hidden_state
                    for layer in layers:
                        layer.fused = False
                    eager = model(input_ids=ids).last_hidden_state
                    for layer in layers:
                        layer.fused = True
                    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5, msg=named)
        print("ok")
        """
    )
